"""minitrain: supervised fine-tuning of causal language models, small enough to read in an afternoon."""

__version__ = "0.1.0"
