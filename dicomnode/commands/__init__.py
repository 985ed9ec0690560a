"""Subcommands of ``dicomnode`` that live outside cli.py (each module has ``register(subparsers)``)."""
