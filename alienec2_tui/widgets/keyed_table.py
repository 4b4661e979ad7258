"""A table whose rows are records keyed by id, drawn line by line (Textual's Line API): only
the rows on screen are ever rendered, so 10,000 VMs cost a sort, not 10,000 widgets' worth of
cells. It keeps the cursor on the same record across updates, filters and sorts, and repaints
only the cells whose text changed (an SSH session pays for what changed, not for the table)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from alienec2_tui.keys import TABLE_KEYS, bindings
from alienec2_tui.widgets.format import STATE_STYLES

PAD = 1  # blank cells each side of a cell, as Textual's DataTable draws them
STATE_RICH_STYLES = {state: Style.parse(style) for state, style in STATE_STYLES.items()}


class KeyedTable(ScrollView, can_focus=True):
    BINDINGS: ClassVar[list[BindingType]] = bindings(TABLE_KEYS)
    COLUMNS: ClassVar[tuple[str, ...]] = ()
    SORTS: ClassVar[tuple[str, ...]] = ()
    NOUN: ClassVar[str] = "rows"
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "keyed-table--header",
        "keyed-table--cursor",
        "keyed-table--even-row",
        "keyed-table--odd-row",
    }
    # The look of Textual's DataTable (its header, zebra stripes and row cursor).
    DEFAULT_CSS = """
    KeyedTable {
        background: $surface;
        color: $foreground;
        &:focus {
            background-tint: $foreground 5%;
            & > .keyed-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .keyed-table--header {
                background-tint: $foreground 5%;
            }
        }
        &:dark > .keyed-table--even-row {
            background: $surface-darken-1 40%;
        }
        & > .keyed-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        & > .keyed-table--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .keyed-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """

    class RowSelected(Message):
        """Enter (or a click on the cursor's row) opened a row."""

        def __init__(self, table: KeyedTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> KeyedTable:
            return self.table

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records: dict[str, dict[str, Any]] = {}  # the core's records, by key
        self._order: list[str] = []  # the keys shown (filtered), in sort order
        self._index: dict[str, int] | None = {}  # key -> row; None until asked again
        self._painted: dict[int, tuple[str, tuple[str, ...]]] = {}  # screen line -> row drawn
        self._widths = [len(column) for column in self.COLUMNS]
        self.filter_text = ""
        self.sort_column = self.SORTS[0]
        self.now = 0.0
        self.cursor_row = 0
        self.note = ""  # shown below the table instead of the sort, e.g. the last decision

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

    def cell_style(self, column: str, value: str) -> Style | None:
        """A cell's own style over its row's: states in their colour."""
        return STATE_RICH_STYLES.get(value) if column == "state" else None

    # ---- the records --------------------------------------------------------------------

    def on_mount(self) -> None:
        self._resize_virtual()
        self._title()

    def matches(self, record: dict[str, Any]) -> bool:
        needle = self.filter_text.lower()
        return not needle or any(needle in field.lower() for field in self.searched(record))

    def show(self, records: Iterable[dict[str, Any]], now: float) -> int:
        """Replace every record (a snapshot); returns how many records differ."""
        old = self.records
        self.records = {self.key_of(r): r for r in records}
        changes = sum(1 for key, r in self.records.items() if old.get(key) != r)
        changes += sum(1 for key in old if key not in self.records)
        self.now = now
        self._reorder(fit=self.records.values())
        return changes

    def update(self, records: Iterable[dict[str, Any]], removed: Iterable[str] = ()) -> int:
        """Apply changes (an event's records): add or replace these, drop ``removed``. The rows
        are sorted again only if a sort value or the filter's verdict changed."""
        column, now = self.sort_column, self.now
        reorder = False
        changed = []
        for key in removed:
            if self.records.pop(key, None) is not None:
                reorder = True
        for record in records:
            key = self.key_of(record)
            before = self.records.get(key)
            if before == record:
                continue
            self.records[key] = record
            changed.append(record)
            if (
                before is None
                or self.matches(before) != self.matches(record)
                or self.sort_value(before, column, now) != self.sort_value(record, column, now)
            ):
                reorder = True
        if reorder:
            self._reorder(fit=changed)
        elif changed:
            self._repaint_changed()
        return len(changed)

    def set_now(self, now: float) -> None:
        """Time moved on: repaint just the cells whose text changed (ages), not the table."""
        self.now = now
        self._repaint_changed()

    def _repaint_changed(self) -> None:
        """Repaint the cells of the rows on screen whose text differs from what was drawn."""
        scroll_x = self.scroll_offset.x
        starts = self._column_starts()
        for line, (key, drawn) in list(self._painted.items()):
            record = self.records.get(key)
            if record is None:
                continue
            row = self.row_for(record, self.now)
            if row == drawn:
                continue
            if self._fit([record]):
                self.refresh()
                return
            # One region per line, from its first changed cell to its last: the terminal is
            # written once per line, not once per cell.
            changed = [i for i, (a, b) in enumerate(zip(drawn, row, strict=True)) if a != b]
            left = starts[changed[0]]
            right = starts[changed[-1]] + self._widths[changed[-1]] + 2 * PAD
            self.refresh(Region(left - scroll_x, line, right - left, 1))

    def _reorder(self, fit: Iterable[dict[str, Any]] = ()) -> None:
        selected = self.selected_key()
        column, now = self.sort_column, self.now
        shown = [(key, r) for key, r in self.records.items() if self.matches(r)]
        shown.sort(key=lambda item: (self.sort_value(item[1], column, now), item[0]))
        self._order = [key for key, _ in shown]
        self._index = None
        self._fit(fit)
        self._resize_virtual()
        self.keep_cursor(selected)
        self._title()
        self.refresh()

    def _fit(self, records: Iterable[dict[str, Any]]) -> bool:
        """Widen columns to these records' text; True if any grew."""
        widths = self._widths
        grown = False
        for record in records:
            for index, value in enumerate(self.row_for(record, self.now)):
                if len(value) > widths[index]:
                    widths[index] = len(value)
                    grown = True
        if grown:
            self._resize_virtual()
        return grown

    def _resize_virtual(self) -> None:
        width = sum(w + 2 * PAD for w in self._widths)
        self.virtual_size = Size(width, len(self._order) + 1)

    def _column_starts(self) -> list[int]:
        starts, x = [], 0
        for width in self._widths:
            starts.append(x)
            x += width + 2 * PAD
        return starts

    # ---- rows and the cursor ------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._order)

    def shown_keys(self) -> list[str]:
        """The keys of the rows shown, top to bottom."""
        return list(self._order)

    def get_row_index(self, key: str) -> int:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._order)}
        return self._index[key]

    def selected_key(self) -> str | None:
        if not self._order:
            return None
        return self._order[min(self.cursor_row, len(self._order) - 1)]

    def selected(self) -> dict[str, Any] | None:
        key = self.selected_key()
        return self.records.get(key) if key is not None else None

    def keep_cursor(self, key: str | None) -> None:
        """Put the cursor back on ``key`` if it is still shown (rows above it may have come or
        gone, or been sorted); else keep it within the rows."""
        if key is not None and key in self.records and self.matches(self.records[key]):
            self.move_cursor(row=self.get_row_index(key))
        else:
            self.move_cursor(row=self.cursor_row)

    def move_cursor(self, row: int, animate: bool = False) -> None:
        row = max(0, min(row, len(self._order) - 1))
        if row != self.cursor_row:
            self.cursor_row = row
            self.refresh()
        self._scroll_to_cursor()

    def _body_height(self) -> int:
        return max(self.scrollable_content_region.height - 1, 1)

    def _scroll_to_cursor(self) -> None:
        top, body = int(self.scroll_y), self._body_height()
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, immediate=True)
        elif self.cursor_row >= top + body:
            self.scroll_to(y=self.cursor_row - body + 1, animate=False, immediate=True)

    def action_cursor_down(self) -> None:
        self.move_cursor(self.cursor_row + 1)

    def action_cursor_up(self) -> None:
        self.move_cursor(self.cursor_row - 1)

    def action_scroll_top(self) -> None:
        self.move_cursor(0)

    def action_scroll_bottom(self) -> None:
        self.move_cursor(len(self._order) - 1)

    def action_page_down(self) -> None:
        self.move_cursor(self.cursor_row + self._body_height())

    def action_page_up(self) -> None:
        self.move_cursor(self.cursor_row - self._body_height())

    def action_select_cursor(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.post_message(self.RowSelected(self, key))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y == 0:
            return
        row = int(self.scroll_y) + offset.y - 1
        if row >= len(self._order):
            return
        if row == self.cursor_row:
            self.action_select_cursor()
        else:
            self.move_cursor(row)

    def on_resize(self) -> None:
        self._scroll_to_cursor()

    # ---- sort and filter ----------------------------------------------------------------

    def apply_sort(self) -> None:
        self._reorder()

    def cycle_sort(self) -> str:
        self.sort_column = self.SORTS[(self.SORTS.index(self.sort_column) + 1) % len(self.SORTS)]
        self._reorder()
        return self.sort_column

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        self._reorder()

    def _title(self) -> None:
        shown, total = len(self._order), len(self.records)
        count = f"{shown} of {total}" if self.filter_text else str(total)
        self.border_title = f"{self.NOUN} ({count})"
        if self.note:
            self.border_subtitle = self.note
            return
        note = f"/{self.filter_text}  " if self.filter_text else ""
        self.border_subtitle = f"{note}sort: {self.sort_column}"

    def set_note(self, note: str) -> None:
        if note != self.note:
            self.note = note
            self._title()

    # ---- drawing ------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            self._painted.pop(0, None)
            style = base + self.get_component_rich_style("keyed-table--header")
            strip = self._strip(self.COLUMNS, style)
        else:
            index = scroll_y + y - 1
            if index >= len(self._order):
                self._painted.pop(y, None)
                return Strip.blank(width, base)
            key = self._order[index]
            row = self.row_for(self.records[key], self.now)
            self._painted[y] = (key, row)
            parity = "keyed-table--odd-row" if index % 2 else "keyed-table--even-row"
            style = base + self.get_component_rich_style(parity)
            if index == self.cursor_row:
                style += self.get_component_rich_style("keyed-table--cursor")
            strip = self._strip(row, style, cells=True)
        return strip.crop_extend(scroll_x, scroll_x + width, base)

    def _strip(self, values: tuple[str, ...], style: Style, cells: bool = False) -> Strip:
        segments = []
        pad = " " * PAD
        for column, value, width in zip(self.COLUMNS, values, self._widths, strict=True):
            own = self.cell_style(column, value) if cells else None
            text = f"{pad}{value[:width].ljust(width)}{pad}"
            segments.append(Segment(text, style + own if own else style))
        return Strip(segments)
