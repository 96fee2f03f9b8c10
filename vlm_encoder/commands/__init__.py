"""Subcommands of the `vlm-encoder` console script, one module each."""
