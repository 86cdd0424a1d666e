"""Subcommands of the ``dreamblend`` CLI."""
