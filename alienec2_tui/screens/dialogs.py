"""Small modal dialogs: confirm, resize, submit. They return values; the app acts (resize
asks the core itself, so a refusal keeps the dialog and its input)."""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from alienec2_tui.widgets.ordered_input import OrderedInput


class ConfirmDialog(ModalScreen[bool]):
    """Asks before anything terminates or drains. Cancel has the focus: Enter on the default
    does nothing harmful; only `y` (or a click on the red button) confirms."""

    AUTO_FOCUS = "#cancel"
    BINDINGS = [Binding("escape,n", "cancel", "Cancel"), Binding("y", "confirm", "Confirm")]

    def __init__(self, question: str, confirm: str = "Yes", vm_id: str | None = None) -> None:
        super().__init__()
        self._question = question
        self._confirm = confirm
        self.vm_id = vm_id  # the VM it acts on: the app closes the dialog if the VM goes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._question, id="question")
            with Horizontal(classes="buttons"):
                yield Button("Cancel (n, esc)", variant="primary", id="cancel")
                yield Button(f"{self._confirm} (y)", variant="error", id="confirm")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


Apply = Callable[[int, int], Awaitable[str | None]]


class ResizeDialog(ModalScreen[tuple[int, int] | None]):
    """``apply(min, max)`` asks the core and returns its refusal, or None once applied."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, min_vms: int, max_vms: int, apply: Apply) -> None:
        super().__init__()
        self._min, self._max = min_vms, max_vms
        self._apply = apply

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Resize the pool")
            yield Label("min VMs")
            yield OrderedInput(str(self._min), id="min", type="integer")
            yield Label("max VMs")
            yield OrderedInput(str(self._max), id="max", type="integer")
            yield Label("", id="problem", classes="problem")
            with Horizontal(classes="buttons"):
                yield Button("Resize", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    async def _submit(self) -> None:
        problem = self.query_one("#problem", Label)
        try:
            low = int(self.query_one("#min", Input).value)
            high = int(self.query_one("#max", Input).value)
        except ValueError:
            problem.update("min and max must be whole numbers")
            return
        refusal = await self._apply(low, high)
        if refusal is not None:
            problem.update(Text(refusal))
            return
        self.dismiss((low, high))

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "min":
            self.query_one("#max", Input).focus()
        else:
            await self._submit()

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            await self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SubmitDialog(ModalScreen[list[str] | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Submit a job: a command line, split like a shell would")
            yield OrderedInput(placeholder="sh -c 'echo hello; sleep 5'", id="command")
            yield Label("", id="problem", classes="problem")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            argv = shlex.split(event.value)
        except ValueError as exc:
            self.query_one("#problem", Label).update(str(exc))
            return
        if not argv:
            self.query_one("#problem", Label).update("type a command")
            return
        self.dismiss(argv)

    def action_cancel(self) -> None:
        self.dismiss(None)
