"""The privacy ledger on disk: crashes, interrupted writes, two writers, and `fedclinic ledger show`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedclinic.cli import main
from fedclinic.privacy.ledger import Ledger, LedgerError, Plan
from test_privacy import reference_epsilon

PLAN = Plan(1.1, 0.05, 40, 5, 8.0, 1e-5, "rdp")

WRITER = """
import sys
from fedclinic.privacy.ledger import Ledger, Plan
ledger = Ledger.open(sys.argv[1], site=3)
ledger.set_plan(Plan(1.1, 0.05, 40, 5, 8.0, 1e-5, "rdp"))
print("ready", flush=True)
r = ledger.rounds_trained
while True:
    r += 1
    ledger.record(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=40)
"""


def test_a_site_killed_in_the_middle_of_writes_leaves_a_whole_ledger(tmp_path):
    # Prepare: a process appending releases as fast as it can (each write rewrites the whole file)
    lengths = []
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "ready"
            time.sleep(0.05 + 0.07 * attempt)
        finally:
            writer.send_signal(signal.SIGKILL)  # no chance to finish a write cleanly
            writer.wait(timeout=10)
        # Assert: whatever moment it died, the ledger reads back whole: rounds 1..k in order
        ledger = Ledger.open(tmp_path, site=3)
        rounds = [e.round for e in ledger.entries]
        assert rounds == list(range(1, len(rounds) + 1))
        lengths.append(len(rounds))
    assert lengths[-1] > 0  # the writer did get to write


def test_an_interrupted_write_keeps_the_previous_ledger(tmp_path, monkeypatch):
    ledger = Ledger.open(tmp_path, site=0)
    ledger.set_plan(PLAN)
    ledger.record(round=1, noise_multiplier=1.1, sample_rate=0.05, steps=40)
    before = (tmp_path / "ledger.json").read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the new file is written, the move never happens
    with pytest.raises(OSError, match="disk full"):
        ledger.record(round=2, noise_multiplier=1.1, sample_rate=0.05, steps=40)
    monkeypatch.undo()
    assert (tmp_path / "ledger.json").read_bytes() == before
    assert Ledger.open(tmp_path, site=0).rounds_trained == 1
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # no half-written file left


LOCKER = """
import sys
from fedclinic.privacy.ledger import Ledger, LedgerError
try:
    with Ledger.locked(sys.argv[1], site=0) as ledger:
        ledger.record(round=9, noise_multiplier=1.1, sample_rate=0.05, steps=40)
except LedgerError as err:
    print(err)
    sys.exit(3)
"""


def test_two_processes_cannot_write_the_same_ledger_at_once(tmp_path):
    with Ledger.locked(tmp_path, site=0) as held:  # this process trains site 0 ...
        held.set_plan(PLAN)
        # ... while a second process is pointed at the same state directory
        other = subprocess.run([sys.executable, "-c", LOCKER, str(tmp_path)], capture_output=True, text=True,
                               timeout=60)
        assert other.returncode == 3, other.stderr
        assert "is in use by another process" in other.stdout
        held.record(round=1, noise_multiplier=1.1, sample_rate=0.05, steps=40)
    assert [e.round for e in Ledger.open(tmp_path, site=0).entries] == [1]  # the refused writer wrote nothing
    # once the first is done, the second may go on from the latest history
    again = subprocess.run([sys.executable, "-c", LOCKER, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [e.round for e in Ledger.open(tmp_path, site=0).entries] == [1, 9]


def test_a_corrupted_ledger_is_refused_and_left_as_it_is(tmp_path, capsys):
    (tmp_path / "ledger.json").write_text('{"format": "fedclinic-ledger/1", "site": 0, "entries": [{"rou')
    with pytest.raises(LedgerError, match="not a readable fedclinic privacy ledger; refusing to reset it"):
        with Ledger.locked(tmp_path, site=0):
            pass
    assert main(["ledger", "show", str(tmp_path)]) == 2
    assert "refusing to reset it" in capsys.readouterr().err
    assert (tmp_path / "ledger.json").read_text().endswith('"rou')  # evidence kept for the privacy officer


def test_ledger_show_prints_what_the_site_spent_by_round(tmp_path, capsys):
    ledger = Ledger.open(tmp_path, site=2)
    ledger.set_plan(PLAN)
    for r, sigma in ((1, 1.1), (2, 1.1), (3, 0.9)):
        ledger.record(round=r, noise_multiplier=sigma, sample_rate=0.05, steps=40)
    assert main(["ledger", "show", str(tmp_path), "--json"]) == 0
    spent = json.loads(capsys.readouterr().out)
    history = [(1.1, 0.05, 40), (1.1, 0.05, 40), (0.9, 0.05, 40)]
    assert [r["round"] for r in spent["rounds"]] == [1, 2, 3] and spent["site"] == 2
    for i, row in enumerate(spent["rounds"]):  # cumulative, against Google's dp-accounting
        assert row["epsilon"] == pytest.approx(reference_epsilon(history[: i + 1], 1e-5, "rdp"), rel=0.01)
    assert spent["epsilon"] == spent["rounds"][-1]["epsilon"]
    assert main(["ledger", "show", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"site 2: epsilon {spent['epsilon']:.4f} spent at delta 1e-05 over 3 round(s)")
    assert len([line for line in text.splitlines() if line.split()[0].isdigit()]) == 3


def test_ledger_show_of_a_directory_without_a_ledger_says_so(tmp_path, capsys):
    assert main(["ledger", "show", str(tmp_path / "nowhere")]) == 2
    assert "holds no privacy ledger" in capsys.readouterr().err


def test_a_ledger_written_before_fine_tuning_existed_still_loads_and_shows(tmp_path, capsys):
    # Prepare: the file as fedclinic wrote it before: no finetune_steps in the plan, no kind in the entries
    old = {"format": "fedclinic-ledger/1", "site": 4,
           "plan": {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps_per_round": 40, "rounds": 5,
                    "target_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"},
           "entries": [{"round": r, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40, "time": 0.0}
                       for r in (1, 2)]}
    (tmp_path / "ledger.json").write_text(json.dumps(old))
    # Execute
    ledger = Ledger.open(tmp_path, site=4)
    # Assert: every entry a round, a plan without fine-tuning, the same epsilon
    assert ledger.rounds_trained == 2 and [e.kind for e in ledger.entries] == ["round", "round"]
    assert ledger.plan.finetune_steps == 0
    assert ledger.epsilon() == pytest.approx(reference_epsilon([(1.1, 0.05, 80)], 1e-5, "rdp"), rel=0.01)
    assert main(["ledger", "show", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "over 2 round(s) (RDP accountant)" in text and "fine-tuning" not in text


def test_ledger_show_marks_the_fine_tuning_after_the_rounds(tmp_path, capsys):
    ledger = Ledger.open(tmp_path, site=0)
    ledger.set_plan(Plan(1.1, 0.05, 40, 2, 8.0, 1e-5, "rdp", finetune_steps=20))
    for r in (1, 2):
        ledger.record(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=40)
    ledger.record(round=3, noise_multiplier=1.1, sample_rate=0.05, steps=20, kind="fine-tuning")
    assert main(["ledger", "show", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "over 2 round(s) and the fine-tuning" in lines[0] and "then 20 steps of fine-tuning" in lines[1]
    assert lines[-1].split()[0] == "3" and lines[-1].endswith("fine-tuning")
    assert Ledger.open(tmp_path, site=0).rounds_trained == 2
