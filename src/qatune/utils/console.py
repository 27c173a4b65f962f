"""Progress bars on stderr (stdout stays for results), off on non-main ranks. Messages go through `logging`."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """A rich progress bar on stderr with a free-text field (loss, tokens/s...) and an ETA; a no-op when off."""

    def __init__(self, label: str, total: int, *, done: int = 0, enabled: bool = True):
        self.bar = None
        if not enabled:
            return
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=Console(stderr=True))
        self.task = self.bar.add_task(label, total=total, completed=done, info="")
        self.bar.start()

    def update(self, completed: int, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, info=info)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
