"""What a command shows while it works: rich's progress bars on a terminal, one plain line per step elsewhere.

    say = Progress(quiet=config.output.quiet)
    say("  starting Flower's simulation runtime ...")   # a line, printed above any bar
    say.step("rounds", 3, 20)                            # on a terminal: the "rounds" bar at 3 of 20
    say.close()                                          # the bars go; the lines stay

Lines always print (unless quiet); bars only when stdout is a terminal, where
each kind of step (rounds, sweep points, attacks, ...) gets its own bar, which
goes away when it is complete. When stdout is a file or a pipe (CI, a log,
`| tee`), the lines are all there is: one plain line per step.
"""

from __future__ import annotations

import atexit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars


class Progress:
    """A command's progress: `say(line)` for a line, `step(kind, done, total)` for the bar of that kind."""

    def __init__(self, *, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console()
        self.bars: Bars | None = None
        self.tasks: dict[str, int] = {}
        atexit.register(self.close)  # a run that fails leaves the terminal's cursor as it found it

    def __call__(self, *parts: object) -> None:
        if self.quiet:
            return
        line = " ".join(str(p) for p in parts)
        if self.bars is not None:
            self.bars.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def step(self, kind: str, done: int, total: int) -> None:
        """`done` of `total` steps of `kind` are finished; a terminal shows it as a bar, anything else nothing."""
        if self.quiet or not self.console.is_terminal or total <= 0:
            return
        if self.bars is None:
            self.bars = Bars(TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=self.console, transient=True)
            self.bars.start()
        if kind not in self.tasks:
            self.tasks[kind] = self.bars.add_task(kind, total=total)
        self.bars.update(self.tasks[kind], completed=done, total=total)
        if done >= total:
            self.bars.remove_task(self.tasks.pop(kind))
            if not self.tasks:
                self.close()

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None
            self.tasks.clear()
