"""Subcommands of the ``gpunet`` CLI, one module each."""
