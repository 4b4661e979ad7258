"""Runtime settings: admin overrides (pool bounds, pause) and keys that must survive a restart."""

from __future__ import annotations

import json
from typing import Any

from core.model import EventKind
from core.store.db import Database


class Settings(Database):
    def setting(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_settings(self, values: dict[str, Any], now: float, message: str) -> None:
        """Write several settings in one transaction (e.g. min and max together)."""
        with self._tx():
            for key, value in values.items():
                self._db.execute(
                    "INSERT INTO settings(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(value)),
                )
            self._event(now, EventKind.SETTING_CHANGED, message)

    def set_setting(self, key: str, value: Any, now: float, message: str) -> None:
        self.set_settings({key: value}, now, message)

    def forget_settings(self, keys: list[str], now: float, message: str) -> None:
        """Remove settings (their defaults rule again) in one transaction, with an event."""
        with self._tx():
            self._db.executemany("DELETE FROM settings WHERE key = ?", [(key,) for key in keys])
            self._event(now, EventKind.SETTING_CHANGED, message)
