"""`?`: every key of the console, written from the same table as the bindings. Keys marked
"row" act on the selected row; read-only consoles list no key that changes the pool."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from alienec2_tui.keys import help_rows


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, readonly: bool = False) -> None:
        super().__init__()
        self._readonly = readonly

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            title = "alienec2 console — keys" + (" (read-only)" if self._readonly else "")
            yield Label(title, id="help-title")
            table: DataTable[Any] = DataTable(cursor_type="none", show_header=False)
            yield table
            yield Label(
                "row: acts on the selected row. Every action is also in the palette (ctrl+p).",
                classes="dim",
            )

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("key", "action", "on")
        for keys, description, row in help_rows(self._readonly):
            table.add_row(keys, description, row)
