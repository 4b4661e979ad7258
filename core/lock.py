"""One core per state file: an exclusive lock held for the life of the process."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from core.store import StateError


class StateLock:
    """``flock`` on ``<state>.lock``, which holds the owner's pid. The kernel drops the lock
    when the process dies, so a killed core never blocks the next start."""

    def __init__(self, state_path: str | Path) -> None:
        self.path = Path(f"{state_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot open the lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            raise StateError(
                f"{self.path.with_suffix('')}: another core (pid {holder}) is using this state "
                "file; stop it first, or give this core its own state.path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """The pid the lock file names (its holder's, while it is held)."""
        try:
            return self.path.read_text(errors="replace")[:32].strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
