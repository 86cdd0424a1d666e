"""Subcommands of the ``dreamblend`` CLI."""

from __future__ import annotations

import re

_REST_MARKUP = re.compile(r":[a-z]+:`([^`]+)`|``([^`]+)``")


def help_text(doc: str) -> str:
    """A docstring as --help shows it: plain text, reST roles and literals (:mod:`x`, ``x``) unwrapped."""
    return _REST_MARKUP.sub(lambda m: m.group(1) or m.group(2), doc)
