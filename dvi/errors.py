"""Errors a user can fix: the CLI prints them as one line with exit code 2 (dvi/cli/__init__.py).
Libraries raise them from here, never from the CLI."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, ConnectionError)
