"""A text field whose editing keys act in the order they are typed."""

from __future__ import annotations

from textual import events
from textual.widgets import Input


class OrderedInput(Input):
    """Textual's ``Input``, but its own keys (BSpace, the arrows, Enter...) act when the
    field reads them, in turn with the characters around them. Textual runs a widget's
    bindings only once the key has bubbled up to the app, by which time the characters
    queued behind it in the same burst (a fast typist, a paste, one terminal read) were
    already typed: `Tab BSpace 2` in the resize dialog deleted the 2 and left max empty."""

    async def _on_key(self, event: events.Key) -> None:
        for binding in self._bindings.key_to_bindings.get(event.key, []):
            if await self.app.run_action(binding.action, self):
                event.stop()
                event.prevent_default()  # not again by Input's handler, nor by the app
                return
        # Not one of its keys, or its action declined (copy with nothing selected): on as before.
