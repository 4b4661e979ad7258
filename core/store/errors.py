"""What the store refuses, as exceptions the service and web layers translate."""

from __future__ import annotations


class NotFound(LookupError):
    """The VM, job or launch named does not exist."""


class Conflict(Exception):
    """The request does not fit the current state (e.g. cancelling a finished job)."""
