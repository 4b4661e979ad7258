"""A table whose rows are records keyed by id: it updates only the cells that changed (5,000
rows stay responsive) and keeps the cursor on the same record across refreshes, filters and
sorts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from rich.text import Text
from textual.binding import BindingType
from textual.widgets import DataTable

from alienec2_tui.keys import TABLE_KEYS, bindings
from alienec2_tui.widgets.format import state_text


class KeyedTable(DataTable[Any]):
    BINDINGS: ClassVar[list[BindingType]] = bindings(TABLE_KEYS)
    COLUMNS: ClassVar[tuple[str, ...]] = ()
    SORTS: ClassVar[tuple[str, ...]] = ()
    NOUN: ClassVar[str] = "rows"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.records: dict[str, dict[str, Any]] = {}  # the last answer, by key
        self._shown: dict[str, tuple[str, ...]] = {}
        self.filter_text = ""
        self.sort_column = self.SORTS[0]
        self.now = 0.0

    # ---- what a subclass says about its records ----------------------------------------

    def key_of(self, record: dict[str, Any]) -> str:
        return str(record["id"])

    def row_for(self, record: dict[str, Any], now: float) -> tuple[str, ...]:
        raise NotImplementedError

    def sort_value(self, record: dict[str, Any], column: str, now: float) -> Any:
        return str(record[column])

    def searched(self, record: dict[str, Any]) -> Iterable[str]:
        """The fields the filter looks in."""
        return (self.key_of(record),)

    def cell(self, column: str, value: str) -> Text | str:
        return state_text(value) if column == "state" else value

    # ---- behaviour ---------------------------------------------------------------------

    def on_mount(self) -> None:
        for column in self.COLUMNS:
            self.add_column(column, key=column)
        self._title()

    def matches(self, record: dict[str, Any]) -> bool:
        needle = self.filter_text.lower()
        return not needle or any(needle in field.lower() for field in self.searched(record))

    def show(self, records: Iterable[dict[str, Any]], now: float) -> int:
        """Bring the table in line with ``records``; returns how many cells or rows changed."""
        selected = self.selected_key()
        self.now = now
        self.records = {self.key_of(r): r for r in records}
        wanted = {
            key: self.row_for(record, now)
            for key, record in self.records.items()
            if self.matches(record)
        }
        changes = 0
        for key in [k for k in self._shown if k not in wanted]:
            self.remove_row(key)
            del self._shown[key]
            changes += 1
        resort = False
        sort_index = (
            self.COLUMNS.index(self.sort_column) if self.sort_column in self.COLUMNS else -1
        )
        for key, row in wanted.items():
            old = self._shown.get(key)
            if old is None:
                self.add_row(
                    *(self.cell(c, v) for c, v in zip(self.COLUMNS, row, strict=True)), key=key
                )
                resort = True
                changes += 1
            elif old != row:
                for index, (column, before, after) in enumerate(
                    zip(self.COLUMNS, old, row, strict=True)
                ):
                    if before != after:
                        self.update_cell(key, column, self.cell(column, after))
                        resort = resort or index == sort_index
                        changes += 1
            self._shown[key] = row
        if resort:
            self.apply_sort()
        self.keep_cursor(selected)
        if changes:
            self._title()
        return changes

    def keep_cursor(self, key: str | None) -> None:
        """Put the cursor back on ``key`` if it is still shown (rows above it may have come or
        gone, or been sorted)."""
        if key is None or key not in self._shown:
            return
        index = self.get_row_index(key)
        if index != self.cursor_row:
            self.move_cursor(row=index, animate=False)

    def apply_sort(self) -> None:
        column, now = self.sort_column, self.now
        key = self.COLUMNS[0]
        self.sort(key, key=lambda value: self._sort_key(value, column, now))

    def _sort_key(self, value: Any, column: str, now: float) -> Any:
        # Sort by the cell's record, found through the row's first cell (the record's key).
        record = self.records.get(str(value.plain if isinstance(value, Text) else value))
        return self.sort_value(record, column, now) if record is not None else ""

    def cycle_sort(self) -> str:
        selected = self.selected_key()
        self.sort_column = self.SORTS[(self.SORTS.index(self.sort_column) + 1) % len(self.SORTS)]
        self.apply_sort()
        self.keep_cursor(selected)
        self._title()
        return self.sort_column

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)

    def selected(self) -> dict[str, Any] | None:
        key = self.selected_key()
        return self.records.get(key) if key is not None else None

    def set_filter(self, text: str) -> None:
        selected = self.selected_key()
        self.filter_text = text.strip()
        self.show(list(self.records.values()), self.now)
        self.keep_cursor(selected)
        self._title()

    def _title(self) -> None:
        shown, total = len(self._shown), len(self.records)
        count = f"{shown} of {total}" if self.filter_text else str(total)
        self.border_title = f"{self.NOUN} ({count})"
        note = f"/{self.filter_text}  " if self.filter_text else ""
        self.border_subtitle = f"{note}sort: {self.sort_column}"
