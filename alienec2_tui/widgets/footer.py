"""The key footer, fitted to the terminal's width."""

from __future__ import annotations

from rich.cells import cell_len
from textual import events
from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

PALETTE = "-command-palette"


def key_width(key: FooterKey) -> int:
    """Columns a compact footer key takes: "key description" and its right margin."""
    words = cell_len(key.key_display) + (cell_len(key.description) + 1 if key.description else 0)
    return words + 1


class FittedFooter(Footer):
    """Textual's compact footer, but showing only the keys that fit whole, in order. Textual's
    own draws the palette key over the ones past the edge, which leaves a stray letter of a
    key (a `p` for pause at 120 columns). `?` lists every key."""

    def __init__(self) -> None:
        super().__init__(compact=True)
        self._fitted_to = 0

    def compose(self) -> ComposeResult:
        children: list[Widget] = list(super().compose())
        room = self.size.width
        self._fitted_to = room
        if not room:
            yield from children  # not laid out yet: it is composed again on its first resize
            return
        palette = [c for c in children if c.has_class(PALETTE)]
        room -= sum(key_width(c) for c in palette if isinstance(c, FooterKey))  # + its border
        for child in children:
            if child in palette:
                continue
            need = key_width(child) if isinstance(child, FooterKey) else 0
            if need > room:
                break
            room -= need
            yield child
        yield from palette

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._fitted_to:
            self.call_after_refresh(self.recompose)
