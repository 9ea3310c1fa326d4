#compdef minitrain

_minitrain_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _MINITRAIN_COMPLETE=complete_zsh minitrain)
}

compdef _minitrain_completion minitrain
