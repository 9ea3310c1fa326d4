"""`python -m minitrain` is the `minitrain` console command."""

from minitrain.cli import main

main()
