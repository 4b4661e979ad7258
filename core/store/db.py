"""The SQLite connection: opening and checking the file, schema migrations, transactions.

One writer (the core's event loop thread). A transaction commits before its events are logged
or announced to listeners, so nothing is reported that a crash could still undo.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from core.model import EventKind, Reason

log = logging.getLogger("alienec2.events")

# Each entry moves the schema from version i to i + 1. Version 1 is the first release (no
# token_hash), version 2 the second (token_hash, assignments); neither set user_version, so
# an unversioned file is recognised by its columns (see _detect_version).
MIGRATIONS: list[str] = [
    # 0 -> 1: the first release's schema.
    """
    CREATE TABLE vms (
        id TEXT PRIMARY KEY, cloud TEXT NOT NULL, launch_id TEXT NOT NULL, state TEXT NOT NULL,
        launched_at REAL NOT NULL, state_since REAL NOT NULL, registered_at REAL,
        last_heartbeat REAL, idle_since REAL, job_id INTEGER, address TEXT,
        kill_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX vms_state ON vms(state);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT NOT NULL, env TEXT NOT NULL,
        wall_time_s REAL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL, vm_id TEXT, submitted_at REAL NOT NULL,
        assigned_at REAL, started_at REAL, finished_at REAL, exit_code INTEGER,
        output_tail TEXT, reason TEXT
    );
    CREATE INDEX jobs_state ON jobs(state, id);
    CREATE INDEX jobs_submitted ON jobs(submitted_at);
    CREATE TABLE launches (
        id TEXT PRIMARY KEY, cloud TEXT NOT NULL, count INTEGER NOT NULL,
        client_token TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
        instance_ids TEXT NOT NULL DEFAULT '[]', error TEXT
    );
    CREATE INDEX launches_state ON launches(state);
    CREATE TABLE clouds (
        name TEXT PRIMARY KEY, backoff_until REAL NOT NULL, backoff_level INTEGER NOT NULL,
        boot_failures INTEGER NOT NULL, last_error TEXT
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
        message TEXT NOT NULL, vm_id TEXT, job_id INTEGER, cloud TEXT
    );
    """,
    # 1 -> 2: per-VM tokens, the record of which VM had which attempt.
    """
    ALTER TABLE vms ADD COLUMN token_hash TEXT;
    CREATE UNIQUE INDEX vms_token ON vms(token_hash);
    CREATE TABLE assignments (
        job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, vm_id TEXT NOT NULL,
        assigned_at REAL NOT NULL, PRIMARY KEY (job_id, attempt)
    );
    CREATE INDEX events_vm ON events(vm_id, seq);
    """,
    # 2 -> 3: reason codes on events; pruning by age.
    """
    ALTER TABLE events ADD COLUMN reason TEXT;
    CREATE INDEX events_ts ON events(ts);
    CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
    """,
    # 3 -> 4: pilot runs (e.g. AliEn JobAgents) recorded beside the built-in queue's jobs;
    # pilot activity on VMs; the launch settings each VM was started with (rollouts).
    """
    ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'job';
    ALTER TABLE jobs ADD COLUMN run_key TEXT;
    ALTER TABLE jobs ADD COLUMN alien_job_id TEXT;
    CREATE UNIQUE INDEX jobs_run_key ON jobs(run_key) WHERE run_key IS NOT NULL;
    CREATE INDEX jobs_vm_state ON jobs(vm_id, state);
    ALTER TABLE vms ADD COLUMN pilot_busy INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE launches ADD COLUMN settings_hash TEXT;
    """,
    # 4 -> 5: a VM runs up to pool.slots_per_vm jobs: each job holds a slot of its VM (the
    # index says one job per slot); a job held before the upgrade holds slot 0. The VM's
    # single job_id is emptied and no longer read, not dropped: DROP COLUMN needs SQLite
    # 3.35, and EL9 and Debian 11 ship 3.34. Assignments remember the slot too.
    """
    ALTER TABLE jobs ADD COLUMN slot INTEGER;
    UPDATE jobs SET slot = 0
        WHERE EXISTS (SELECT 1 FROM vms WHERE vms.job_id = jobs.id AND vms.id = jobs.vm_id);
    CREATE UNIQUE INDEX jobs_vm_slot ON jobs(vm_id, slot) WHERE slot IS NOT NULL;
    UPDATE vms SET job_id = NULL;
    ALTER TABLE assignments ADD COLUMN slot INTEGER NOT NULL DEFAULT 0;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(Exception):
    """The state file cannot be used; the message is one line naming the file and what to do."""


def _detect_version(db: sqlite3.Connection) -> int:
    """The schema version of a file: ``user_version``, or for files written before it was
    kept, what their columns say."""
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    if version:
        return version
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "vms" not in tables:
        return 0
    columns = {row[1] for row in db.execute("PRAGMA table_info(vms)")}
    return 2 if "token_hash" in columns else 1


def _private(path: Path) -> None:
    """The state holds the launch key: its directory is 0700 and its files 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if candidate.exists() and candidate.stat().st_mode & 0o077:
            candidate.chmod(0o600)


class Database:
    """Connection, transactions and the event log's write side."""

    def __init__(self, path: str | Path, synchronous: str = "full") -> None:
        self.path = str(path)
        memory = self.path == ":memory:"
        try:
            if not memory:
                _private(Path(path))
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            self._db.execute("PRAGMA foreign_keys=ON")
            if not memory:
                self._check_integrity()
            self._migrate()
        except StateError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"{self.path}: {_explain(exc)}") from None
        self._in_tx = False
        self._pending: list[tuple[EventKind, str]] = []
        # Called after each commit with the event kinds it made durable and how many of each
        # (long polls wake on it).
        self.listeners: list[Callable[[Counter[str]], None]] = []

    def close(self) -> None:
        self._db.close()

    def reader(self) -> Self | None:
        """This store on a read-only connection of its own, for reads on another thread than
        the writer's (WAL: a reader sees committed transactions only, and never blocks the
        writer). None for an in-memory database, which no second connection can open."""
        if self.path == ":memory:":
            return None
        clone = copy.copy(self)
        clone._db = sqlite3.connect(
            f"{Path(self.path).absolute().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
        clone._db.row_factory = sqlite3.Row
        clone._in_tx, clone._pending, clone.listeners = False, [], []
        return clone

    @contextmanager
    def one_read(self) -> Iterator[None]:
        """Several reads that see the same commit: one read transaction."""
        if self._db.in_transaction:
            yield  # inside a transaction already: its reads see one state
            return
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _check_integrity(self) -> None:
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StateError(
                f"{self.path}: the state file is corrupt ({problems[0]}); stop the core and "
                "restore it from a backup (sqlite3 FILE '.backup COPY'), or move it away to "
                "start empty (running instances are then re-adopted by tag)"
            )

    def _migrate(self) -> None:
        version = _detect_version(self._db)
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: schema version {version} is newer than this release knows "
                f"({SCHEMA_VERSION}); run the newer alienec2 or restore a backup taken before "
                "the upgrade"
            )
        if version == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for step in MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if version:
            log.info(
                "event=state_migrated from=%d to=%d path=%s", version, SCHEMA_VERSION, self.path
            )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several store calls as one atomic unit (they join it)."""
        with self._tx():
            yield

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable unit; nested use joins the outer transaction. Its events are
        logged and announced only after the commit."""
        if self._in_tx:
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
            pending, self._pending = self._pending, []
            if pending:
                for _, line in pending:
                    log.info(line)
                kinds = Counter(str(kind) for kind, _ in pending)
                for listener in self.listeners:
                    listener(kinds)
        finally:
            self._in_tx = False
            self._pending = []

    def _event(
        self,
        now: float,
        kind: EventKind,
        message: str,
        *,
        vm_id: str | None = None,
        job_id: int | None = None,
        cloud: str | None = None,
        reason: Reason | None = None,
    ) -> None:
        """Append an event inside the current transaction."""
        assert self._in_tx, "events are written inside a transaction"
        self._db.execute(
            "INSERT INTO events(ts, kind, message, vm_id, job_id, cloud, reason) "
            "VALUES (?,?,?,?,?,?,?)",
            (now, kind, message, vm_id, job_id, cloud, reason),
        )
        fields = [f"event={kind}"]
        if vm_id:
            fields.append(f"vm={vm_id}")
        if job_id is not None:
            fields.append(f"job={job_id}")
        if cloud:
            fields.append(f"cloud={cloud}")
        if reason:
            fields.append(f"reason={reason}")
        fields.append(f"msg={json.dumps(message)}")
        self._pending.append((kind, " ".join(fields)))

    def record_event(
        self,
        now: float,
        kind: EventKind,
        message: str,
        *,
        vm_id: str | None = None,
        job_id: int | None = None,
        cloud: str | None = None,
        reason: Reason | None = None,
    ) -> None:
        """An observation worth telling the admin that changes no state (e.g. a demand error)."""
        with self._tx():
            self._event(now, kind, message, vm_id=vm_id, job_id=job_id, cloud=cloud, reason=reason)


def _explain(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, PermissionError) or "readonly" in text or "read-only" in text:
        return (
            f"cannot write the state file ({text}); the core needs read and write access to "
            "it and its directory"
        )
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "disk image" in text
    ):
        return (
            f"the state file is corrupt or truncated ({text}); restore it from a backup or "
            "move it away to start empty"
        )
    return text
