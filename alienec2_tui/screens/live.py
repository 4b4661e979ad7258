"""A modal screen that keeps itself current: it fetches its record every ``refresh_s`` while
open and shows the core's refusal or absence instead of going stale silently."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import Static

from alienec2_tui.client import AdminError, CoreUnreachable

Fetch = Callable[[], Awaitable[dict[str, Any]]]


class LiveScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, fetch: Fetch, refresh_s: float = 1.0) -> None:
        super().__init__()
        self._fetch = fetch
        self._refresh_s = refresh_s
        self.record: dict[str, Any] | None = None
        self.updates = 0

    def on_mount(self) -> None:
        self.follow()

    @work(exclusive=True, group="live")
    async def follow(self) -> None:
        try:
            while True:
                await self._update()
                if self.record is not None and self.finished(self.record):
                    return
                await asyncio.sleep(self._refresh_s)
        except NoMatches:
            return  # closed (or the app quit) while a fetch was on its way

    async def _update(self) -> None:
        try:
            record = await self._fetch()
        except (AdminError, CoreUnreachable) as exc:
            message = exc.message if isinstance(exc, AdminError) else str(exc)
            self.query_one("#live-problem", Static).update(Text(message))
            return
        self.record = record
        self.query_one("#live-problem", Static).update("")
        self.show(record)
        self.updates += 1

    def show(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def finished(self, record: dict[str, Any]) -> bool:
        """Nothing more will change: stop asking."""
        return False
