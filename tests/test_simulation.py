"""End to end: `fedclinic simulate` through Flower's real simulation runtime, as a user runs it."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fedclinic
from fedclinic.cli import main as cli_main
from fedclinic.privacy.ledger import Ledger
from fedclinic.runtime.processes import command_of, of_flwr_home, stop_processes, with_env

# the steps after training (attack, compress, explain) are tested on their own and in one run (tests/test_full_run.py)
NO_POST = ["--set", "robustness.enabled=false", "--set", "compression.enabled=false", "--set", "explain.enabled=false"]
# one Ray actor trains the sites in turn (Flower's default is one per core): each actor imports torch and Opacus,
# and these runs are not about sites in parallel
SMALL = ["--set", "data.site-size=300", "--set", "data.test-size=300", "--set", "federation.client-cpus=2", *NO_POST]

def simulate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedclinic.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=timeout)


def processes_started_for(run_dir: Path) -> list[int]:
    """PIDs of live processes of this run's Flower runtime (its FLWR_HOME), Ray's included."""
    return sorted(of_flwr_home(run_dir / ".flwr"))


@pytest.mark.parametrize("setting, words", [
    ("privacy.delta=0.5", "privacy.delta=0.5 must be below"),
    ("privacy.target-epsilon=1e-7", "no noise level reaches epsilon=1e-07"),
    ("data.path=missing.npz", "missing.npz"),
])
def test_an_impossible_setting_is_refused_before_anything_runs(tmp_path, capsys, setting, words):
    # (the command's own main, in this process: an exception it let through would fail the test as a traceback)
    code = cli_main(["simulate", "--out", str(tmp_path / "runs"), "--name", "refused", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0  # one sentence
    assert words in err
    assert list(tmp_path.iterdir()) == []  # no run directory was started, nor the --out folder made
    # the budget is checked while Flower's SuperLink starts: refused, it is stopped
    assert processes_started_for(tmp_path / "runs" / "refused") == []


def test_an_out_folder_that_is_a_file_is_refused_in_one_sentence(tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("a user's file")
    code = cli_main(["simulate", "--out", str(taken), "--name", "run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0  # one sentence
    assert f"{taken} is a file, not a directory" in err
    assert taken.read_text() == "a user's file"  # nothing of the user's lost


@pytest.mark.slow
def test_ctrl_c_or_kill_stops_every_process_the_run_started(tmp_path):
    # Prepare: two runs started together, one to be stopped with Ctrl-C, one with kill (SIGTERM). Ctrl-C's
    # default action, also when this test runs in a background job (whose shell ignores SIGINT, and a process
    # that starts with SIGINT ignored never turns it into KeyboardInterrupt)
    stops = {"ctrl-c": signal.SIGINT, "kill": signal.SIGTERM}
    procs = {name: subprocess.Popen([sys.executable, "-m", "fedclinic.cli", "simulate", "--sites", "2", "--rounds",
                                     "3", "--out", str(tmp_path), "--name", name, *SMALL],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
             for name in stops}
    try:
        # Execute: each run is stopped once its ServerApp has scored the initial model (the progress file's
        # first line), with the SuperLink, the simulation and Ray running
        deadline, ended = time.monotonic() + 180, {}
        while len(ended) < len(procs) and time.monotonic() < deadline:
            for name, proc in procs.items():
                progress = tmp_path / name / "progress.jsonl"
                if name not in ended and progress.exists() and progress.read_text().count("\n") >= 1:
                    assert processes_started_for(tmp_path / name), f"{name}: the SuperLink is not running"
                    proc.send_signal(stops[name])
                    ended[name] = proc
            time.sleep(0.5)
        assert set(ended) == set(procs), f"never started: {set(procs) - set(ended)}"
        # Assert: each run says it was interrupted, exits 130 and leaves nothing running
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 130, f"{name}: " + out + err
            assert "interrupted" in err, name
            assert processes_started_for(tmp_path / name) == [], name
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            stop_processes(of_flwr_home(tmp_path / name / ".flwr"))


def write_scans(path: Path) -> Path:
    """A MedMNIST-style RGB file: 600 / 60 / 200 images of 28 x 28, labels N x 1, no *_boxes keys."""
    import numpy as np

    rng = np.random.default_rng(1)

    def split(n):
        labels = rng.integers(0, 2, (n, 1))
        images = rng.integers(0, 120, (n, 28, 28, 3)).astype(np.uint8)
        images[labels[:, 0] == 1, 8:20, 8:20, :] += 120  # class 1: a bright square
        return images, labels

    arrays = {}
    for name, n in (("train", 600), ("val", 60), ("test", 200)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    np.savez(path, **arrays)
    return path


def budget_plan(*args: str) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["budget", "--plan", "--json", *args]) == 0
    return json.loads(out.getvalue())["sites"]


@dataclass(frozen=True)
class BudgetRun:
    proc: subprocess.CompletedProcess
    run: Path
    first_round_epsilon: float  # what site 1 spends in one round
    budget: float  # site 1's own budget: between one round's epsilon and two rounds'
    predicted: list[dict]  # `budget --plan` for the run's settings


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> BudgetRun:
    """One real simulation of a user's .npz file (no boxes) split among 3 sites for 3 rounds, with a fixed sigma,
    record-level DP at the sites and site-level DP on the server; site 1 agrees to a budget between the epsilon
    it spends in one round and in two. Shared by the tests of the file and of the budget."""
    tmp = tmp_path_factory.mktemp("budget")
    scans = write_scans(tmp / "scans.npz")
    common = ["--data", str(scans), "--sites", "3", "--rounds", "3", "--set", "data.partitioner=iid",
              "--set", "training.batch-size=64", "--set", "privacy.mode=both", "--set", "privacy.noise-multiplier=1.5",
              "--set", "federation.min-sites=1", "--set", "federation.client-cpus=2", *NO_POST]
    eps = budget_plan(*common)[1]["epsilon_by_round"]
    budget = round((eps[0] + eps[1]) / 2, 3)
    common += ["--set", f'privacy.site-budgets="1={budget}"']
    predicted = budget_plan(*common)
    run = tmp / "budget"
    try:
        yield BudgetRun(simulate(*common, "--out", str(tmp), "--name", "budget"), run, eps[0], budget, predicted)
    finally:
        stop_processes(of_flwr_home(run / ".flwr"))


@pytest.mark.slow
def test_a_users_npz_without_boxes_is_split_among_sites_and_iou_is_not_applicable(budget_run):
    # Execute (fixture): a MedMNIST-style RGB file, labels N x 1, no *_boxes keys, split among 3 sites
    proc, run = budget_run.proc, budget_run.run
    # Assert
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["final"]["iou"] is None  # not applicable: the file has no boxes
    assert sum(s["n"] for s in results["sites"]) == 540  # 600 train images, 10% kept for validation
    assert "n/a" in (run / "report.md").read_text()
    assert fedclinic.load_model(run / "global_model.pt").arch["in_channels"] == 3
    # the last line names what the run left: compression was off, so no int8 model
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run directory:") and "global_model.pt" in last and "report.html" in last
    assert "int8" not in last and not (run / "global_model.int8.onnx").exists()
    assert processes_started_for(run) == []


@pytest.mark.slow
def test_a_site_over_its_budget_stops_where_the_calculator_says_and_central_dp_has_its_own_epsilon(budget_run,
                                                                                                   capsys):
    # Prepare (fixture): the calculator's plan for the run
    from fedclinic.privacy.accounting import epsilon

    predicted, budget = budget_run.predicted, budget_run.budget
    assert [site["rounds_within_budget"] for site in predicted] == [3, 1, 3]
    assert [site["finetunes"] for site in predicted] == [True, False, True]  # site 1 cannot fine-tune either
    # Execute (fixture)
    proc, run = budget_run.proc, budget_run.run
    # Assert: site 1 declined round 2 and spent exactly its first round, the others went on
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    sites = {s["site"]: s for s in results["sites"]}
    assert (sites[1]["stopped_in_round"], sites[1]["rounds_trained"]) == (2, 1)
    assert sites[1]["epsilon"] == pytest.approx(budget_run.first_round_epsilon, rel=1e-6)
    assert sites[1]["epsilon"] <= budget
    assert [sites[k]["rounds_trained"] for k in (0, 2)] == [3, 3] and results["stop_reason"] is None
    assert "site 1 stopped before round 2" in proc.stdout
    assert cli_main(["ledger", "show", str(run / "sites" / "site-1"), "--json"]) == 0
    ledger = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in ledger["rounds"]] == [1] and ledger["epsilon"] <= budget
    personalized = {s["site"]: s for s in results["personalization"]["sites"]}
    assert [personalized[k]["declined"] for k in range(3)] == [False, True, False]
    assert personalized[1]["epsilon"] == sites[1]["epsilon"]  # declined: spent nothing more
    # the site-level epsilon: three Gaussian releases at noise 1.0, no amplification claimed;
    # checked against Opacus's RDP accountant (Flower's own uses Google's dp-accounting)
    central = results["privacy"]["central"]
    assert central["epsilon"] == pytest.approx(epsilon([(1.0, 1.0, 3)], delta=1e-3), rel=0.02)
    report = (run / "report.md").read_text()
    assert "Record-level DP" in report and "Site-level DP" in report and "declined round 2" in report
    assert "site 1 declines the fine-tuning" in report


class KilledServer:
    """`fedclinic ARGS` writing to `run`, started at once; a thread kills its server process (flwr-simulation
    runs the ServerApp) as soon as `when()` holds, while the test does other work. finish() gives the command's
    (exit status, stderr); stop() leaves nothing of it running, whatever happened."""

    def __init__(self, args: list[str], run: Path, *, when) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fedclinic.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.marker, self.when, self.killed = f"FLWR_HOME={run / '.flwr'}", when, []
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()

    def watch(self) -> None:
        # the server process is found while it starts, so that the kill follows `when()` within one poll: looked
        # for only after it, on a busy machine the run had sometimes ended first
        deadline, server = time.monotonic() + 300, []
        while time.monotonic() < deadline and self.proc.poll() is None:
            if not server:
                found = [pid for pid in with_env(self.marker) if "flwr-simulation" in command_of(pid)]
                server = found if len(found) == 1 else []
            if server and self.when():
                os.kill(server[0], signal.SIGKILL)
                self.killed.append(server[0])
                return
            time.sleep(0.2)

    def finish(self) -> tuple[int, str]:
        self.watcher.join(timeout=320)
        assert self.killed, "the server process was never killed"
        _, err = self.proc.communicate(timeout=180)
        return self.proc.returncode, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_a_fedadam_run_whose_server_is_killed_after_round_1_resumes_to_the_model_of_an_uninterrupted_run(tmp_path):
    # Prepare: the same small FedAdam federation twice; the second one's server process (flwr-simulation runs
    # the ServerApp) is killed as soon as round 1 is checkpointed, and the run is resumed with
    # `simulate --resume`, which must end with the same number of rounds, each recorded and spent once
    from fedclinic.server.checkpoint import CheckpointError, load_checkpoint

    settings = ["federation.sites=3", "federation.rounds=3", *SMALL[1::2], "privacy.audit=false",
                "federation.strategy=fedadam", "federation.server-learning-rate=0.01"]
    fedadam = ["--out", str(tmp_path), *[a for s in settings for a in ("--set", s)]]
    run = tmp_path / "killed"
    library = tmp_path / "library"  # where the uninterrupted run goes, named by the time it starts

    def homes() -> list[Path]:
        return [path / ".flwr" for path in [run, *(library.iterdir() if library.exists() else [])]]

    def checkpointed() -> int:
        try:
            return load_checkpoint(run)["round"]
        except CheckpointError:
            return -1

    # the run to be killed starts first and runs beside the uninterrupted one
    killed = KilledServer(["simulate", *fedadam, "--name", "killed"], run, when=lambda: checkpointed() >= 1)
    try:
        # the uninterrupted run through the library call, unnamed, which returns the run's typed results.json
        whole = fedclinic.run(fedclinic.load_config(None, [*settings, f"output.dir={json.dumps(str(library))}"]))
        assert [path.name for path in library.iterdir()] == [whole.run_dir.name] == [whole.run]
        assert [r.round for r in whole.rounds] == [0, 1, 2, 3] and len(whole.sites) == 3
        assert whole.final.accuracy == whole.rounds[-1].accuracy
        assert whole.to_dict() == json.loads((whole.run_dir / "results.json").read_text())
        returncode, err = killed.finish()
        # the killed run is reported as a failure, with the reason, and leaves its checkpoint
        assert returncode == 2 and "fedclinic: error:" in err
        assert "the process running the ServerApp (flwr-simulation) exited while the run was 'running'" in err, err
        assert checkpointed() == 1 and not (run / "results.json").exists()
        # Execute
        resumed = simulate("--resume", str(run))
        # Assert: the same global model, tensor for tensor, and the strategy recorded with the run's config
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        expected = fedclinic.load_model(whole.run_dir / "global_model.pt").state_dict()
        got = fedclinic.load_model(run / "global_model.pt").state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        results = json.loads((run / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == [0, 1, 2, 3]
        assert [r["sites_trained"] for r in results["rounds"][1:]] == [3, 3, 3]
        assert re.search(r"^\s+3\s", resumed.stdout, re.M)  # the table's last round
        # each site's ledger has one entry per round: a site asked again for a round it had trained from the
        # same model resends that update (no second spend); then the fine-tuning the resumed server asked for
        for k in range(3):
            ledger = Ledger.open(run / "sites" / f"site-{k}", site=k)
            assert [(e.round, e.kind) for e in ledger.entries] == [(1, "round"), (2, "round"), (3, "round"),
                                                                   (4, "fine-tuning")]
        assert results["config"]["federation.strategy"] == "fedadam"
        assert results["config"]["federation.server-learning-rate"] == 0.01
        # nothing of any leg is left running, Ray's agents of the killed leg included
        assert all(of_flwr_home(home) == set() for home in homes())
    finally:  # a failed assertion above leaves nothing running either
        killed.stop()
        for home in homes():
            stop_processes(of_flwr_home(home))


def test_following_a_run_ends_at_its_servers_finished_line_and_not_at_an_earlier_runs(tmp_path):
    from fedclinic.runtime.processes import FlowerError
    from fedclinic.runtime.runs import finished_row, follow
    from fedclinic.runtime.simulation import LocalSuperLink

    # Prepare: a real SuperLink; the progress file of a run directory whose run 7 wrote everything (a resumed
    # run's directory holds such a file when its next run, 8, starts)
    (tmp_path / "progress.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps(finished_row(7)) + "\n")
    shown = []
    with LocalSuperLink(tmp_path) as link:
        # Execute and assert: run 7 completed, said by its own line (and the command stops Flower's processes
        # next, so it need not wait for Flower to mark the run finished); the line is not a progress row to show
        follow(link.connection, 7, tmp_path, shown.append, until_written=True)
        assert shown == [{"round": 1}]
        # run 8 has no such line, so the SuperLink is asked, and it knows no run 8
        with pytest.raises(FlowerError, match="the Flower run ended as 'unknown'"):
            follow(link.connection, 8, tmp_path)
    assert processes_started_for(tmp_path) == []


class AnsweringConnection:
    """The SuperLink's verdicts on the run, in order (what `flwr ls` would say), for ServerWatch."""

    def __init__(self, flwr_home: Path, *verdicts: str) -> None:
        self.flwr_home, self.verdicts = flwr_home, list(verdicts)

    def status(self, run_id: int) -> str:
        return self.verdicts.pop(0)


@pytest.mark.parametrize("verdicts, fails", [
    (["running"], True),  # killed mid-run: the run fails at once, with the reason
    (["unknown", "running"], True),  # no answer at first (a loaded machine): it asks again
    (["finished:completed"], False),  # the process ended the run first: its log stream ends by itself
])
def test_the_watch_fails_a_run_whose_server_process_is_gone_while_the_superlink_still_runs_it(tmp_path, verdicts,
                                                                                               fails):
    from fedclinic.runtime.processes import FlowerError, flower_env
    from fedclinic.runtime.simulation import ServerWatch, server_processes

    # Prepare: a process of this run's environment whose command line names flwr-simulation
    home = tmp_path / ".flwr"
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flwr-simulation"],
                              env=flower_env(home))
    watch = ServerWatch(AnsweringConnection(home, *verdicts), run_id=1, grace=0.05)
    try:
        deadline = time.monotonic() + 10
        while not server_processes(home) and time.monotonic() < deadline:
            time.sleep(0.05)  # its environment is readable once it runs (before its exec, it is pytest's)
        watch()  # it has seen the server process
        # Execute: the process dies (SIGKILL, as the kernel's OOM killer does)
        server.kill()
        server.wait(timeout=10)
        raised = None
        deadline = time.monotonic() + 10
        while watch.connection.verdicts and time.monotonic() < deadline:
            try:
                watch()
            except FlowerError as err:
                raised = err
                break
            time.sleep(0.06)
        # Assert
        assert watch.connection.verdicts == []  # every verdict was asked for
        if fails:
            assert "exited while the run was 'running': killed, or out of memory?" in str(raised)
        else:
            assert raised is None
            watch()  # and it does not ask again
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize("lingers", [False, True])
def test_a_shared_superlink_submits_the_next_run_only_once_the_previous_runs_server_process_is_gone(tmp_path,
                                                                                                   lingers):
    from fedclinic.runtime.processes import flower_env
    from fedclinic.runtime.simulation import previous_servers_gone, server_processes

    # Prepare: a sweep's previous point's flwr-simulation, exiting in 1 s, or hung
    home = tmp_path / ".flwr"
    previous = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({60 if lingers else 1})",
                                 "flwr-simulation"], env=flower_env(home))
    try:
        deadline = time.monotonic() + 10
        while not server_processes(home) and time.monotonic() < deadline:
            time.sleep(0.05)  # its environment is readable once it runs
        # Execute
        previous_servers_gone(home, timeout=3.0)
        # Assert: gone, by itself or stopped after the timeout, so ServerWatch sees the next run's process alone
        assert server_processes(home) == set() and previous.wait(timeout=10) == (-15 if lingers else 0)
    finally:
        if previous.poll() is None:
            previous.kill()
