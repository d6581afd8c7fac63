"""What a command shows while it works: bars on a terminal, plain lines elsewhere, nothing with --quiet."""

import io

from rich.console import Console

from fedclinic.cli.options import show_row
from fedclinic.cli.progress import Progress

ROUND = {"round": 3, "accuracy": 0.61, "iou": 0.3, "max_epsilon": 2.5, "sites_trained": 5, "elapsed": 12.0}


def terminal() -> tuple[Progress, io.StringIO]:
    screen = io.StringIO()
    return Progress(console=Console(file=screen, force_terminal=True, width=100)), screen


def test_on_a_terminal_each_kind_of_step_has_its_own_bar_which_goes_when_complete(capsys):
    say, screen = terminal()
    show_row(say, ROUND, 20)  # a round of 20
    show_row(say, {"message": "pgd linf eps 0.0039: robust accuracy 0.500", "step": ["attacks", 2, 5]}, 20)
    bars = {task.description: (task.completed, task.total) for task in say.bars.tasks}
    assert bars == {"rounds": (3, 20), "attacks": (2, 5)}
    assert "round 3/20: accuracy 0.610" in capsys.readouterr().out  # before any bar: a plain line
    say.bars.refresh()
    assert "3/20" in screen.getvalue() and "2/5" in screen.getvalue()
    assert "pgd linf eps 0.0039: robust accuracy 0.500" in screen.getvalue()  # printed above the bars
    say.step("rounds", 20, 20)
    assert [task.description for task in say.bars.tasks] == ["attacks"]
    say.step("attacks", 5, 5)
    assert say.bars is None  # every bar complete: the display is stopped


def test_elsewhere_every_step_is_one_plain_line_and_no_bar(capsys):
    say = Progress(console=Console(file=io.StringIO()))  # a file or a pipe, not a terminal
    show_row(say, {"round": 0, **{k: v for k, v in ROUND.items() if k != "round"}}, 20)
    show_row(say, ROUND, 20)
    assert say.bars is None
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["initial model", "round 3/20"]


def test_quiet_shows_nothing(capsys):
    screen = io.StringIO()
    say = Progress(quiet=True, console=Console(file=screen, force_terminal=True))
    show_row(say, ROUND, 20)
    assert say.bars is None and capsys.readouterr().out == "" and screen.getvalue() == ""
