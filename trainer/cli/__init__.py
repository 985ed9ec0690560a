"""The trainer's subcommands of ``dicomnode`` (listed in :data:`dicomnode.cli.COMMANDS`)."""
