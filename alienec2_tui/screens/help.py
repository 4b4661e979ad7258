"""`?`: every key of the console, written from the app's own bindings."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, bindings: list[Binding]) -> None:
        super().__init__()
        self._keys = bindings

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Label("alienec2 console — keys", id="help-title")
            table: DataTable[Any] = DataTable(cursor_type="none", show_header=False)
            yield table
            yield Label("Every action is also in the command palette (ctrl+p).", classes="dim")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("key", "action")
        for binding in self._keys:
            table.add_row(binding.key_display or binding.key, binding.description)
