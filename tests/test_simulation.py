"""End to end: `fedclinic simulate` through Flower's real simulation runtime, as a user runs it."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedclinic
from fedclinic.runtime.processes import stop_processes, with_env
from fedclinic.privacy.ledger import Ledger
from test_deployment import command_of

# the steps after training (attack, compress, explain) are tested on their own and in one run (full_run)
NO_POST = ["--set", "robustness.enabled=false", "--set", "compression.enabled=false", "--set", "explain.enabled=false"]
SMALL = ["--set", "data.site-size=300", "--set", "data.test-size=300", *NO_POST]

def simulate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedclinic.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=timeout)


def processes_started_for(run_dir: Path) -> list[int]:
    """PIDs of live processes whose environment points Flower at this run's FLWR_HOME."""
    return sorted(with_env(f"FLWR_HOME={run_dir / '.flwr'}"))


@pytest.mark.slow
def test_three_sites_two_rounds_write_a_run_whose_model_learns_and_epsilon_grows(full_run):
    # Execute (fixture): 3 sites, 2 rounds, every step after training on
    proc, run = full_run
    # Assert
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["final"]["accuracy"] > 0.45  # three balanced classes: chance is 1/3
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert len(results["sites"]) == 3 and all(s["rounds_trained"] == 2 for s in results["sites"])
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["site"] != "central"]
    for site in ("0", "1", "2"):
        eps = {int(r["round"]): float(r["epsilon"]) for r in rows if r["site"] == site}
        assert 0 < eps[1] < eps[2] <= 8.0 * 1.001  # cumulative, within the budget
    assert 0 <= results["audit"]["auc"] <= 1 and results["audit"]["members"] == results["audit"]["nonmembers"] > 0
    assert "membership inference (loss threshold)" in proc.stdout  # the audit, on by default
    assert "Empirical audit" in (run / "report.md").read_text()
    # after training: the model attacked, compressed and explained, in results.json, the report and the output
    robustness = results["robustness"]
    assert [a["eps"] for a in robustness["attacks"]] == [0.0039, 0.0078, 0.0157, 0.0314] and robustness["n"] == 120
    assert robustness["clean_accuracy"] >= robustness["attacks"][0]["robust_accuracy"] >= robustness["robust_accuracy"]
    assert all(r["fgsm_accuracy"] is not None for r in results["rounds"][1:])  # the per-round check
    compression = results["compression"]
    assert abs(compression["accuracy_change"]) <= 0.05
    assert (run / "global_model.int8.onnx").stat().st_size < (run / "global_model.onnx").stat().st_size
    assert compression["files"]["int8_path"] == "global_model.int8.onnx"
    assert 0 <= results["explanations"]["integrated_gradients"]["mass_in_box"] <= 1
    assert "under attack (PGD linf)" in proc.stdout and "int8 model:" in proc.stdout
    report = (run / "report.md").read_text()
    assert "## Under attack" in report and "## Compressed for deployment" in report and "## What the model looks at" in report
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and 'src="explanations.png"' not in html  # self-contained
    for name in ("config.toml", "report.md", "central_metrics.png", "epsilon_per_site.png",
                 "label_distribution.png", "site_samples.png", "audit.json", "audit_roc.png",
                 "global_model.int8.onnx", "explanations.png"):
        assert (run / name).stat().st_size > 0, name
    model = fedclinic.load_model(run / "global_model.pt")
    assert not model.training
    assert "round" in proc.stdout and "rec eps" in proc.stdout  # the final table
    assert processes_started_for(run) == []


@pytest.mark.parametrize("setting, words", [
    ("privacy.delta=0.5", "privacy.delta=0.5 must be below"),
    ("privacy.target-epsilon=1e-7", "no noise level reaches epsilon=1e-07"),
    ("data.path=missing.npz", "missing.npz"),
])
def test_an_impossible_setting_is_refused_before_anything_runs(tmp_path, setting, words):
    proc = simulate("--out", str(tmp_path), "--set", setting, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0  # one sentence, no traceback
    assert words in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory was started


def test_an_out_folder_that_is_a_file_is_refused_in_one_sentence(tmp_path):
    taken = tmp_path / "results.txt"
    taken.write_text("a user's file")
    proc = simulate("--out", str(taken), "--name", "run", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0  # one sentence, no traceback
    assert f"{taken} is a file, not a directory" in proc.stderr
    assert taken.read_text() == "a user's file"  # nothing of the user's lost


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_or_kill_stops_every_process_the_run_started(tmp_path, stop):
    # Ctrl-C's default action, also when this test runs in a background job (whose shell ignores SIGINT,
    # and a process that starts with SIGINT ignored never turns it into KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "fedclinic.cli", "simulate", "--sites", "2", "--rounds", "3",
                             "--out", str(tmp_path), "--name", "stopme", *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        run = tmp_path / "stopme"
        deadline = time.monotonic() + 120
        while not processes_started_for(run) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_started_for(run), "the SuperLink never started"
        progress = run / "progress.jsonl"  # its first line: the ServerApp has scored the initial model
        while not (progress.exists() and progress.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert progress.exists(), "the run never started"
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert "interrupted" in err
        assert processes_started_for(run) == []
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_a_users_npz_without_boxes_is_split_among_sites_and_iou_is_not_applicable(tmp_path):
    # Prepare: a MedMNIST-style RGB file, labels N x 1, no *_boxes keys
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
    np.savez(tmp_path / "scans.npz", **arrays)
    # Execute
    proc = simulate("--data", str(tmp_path / "scans.npz"), "--sites", "2", "--rounds", "1", "--out", str(tmp_path),
                    "--name", "npz", "--set", "data.partitioner=iid", "--set", "training.batch-size=64", *NO_POST)
    # Assert
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "npz" / "results.json").read_text())
    assert results["final"]["iou"] is None  # not applicable: the file has no boxes
    assert sum(s["n"] for s in results["sites"]) == 540  # 600 train images, 10% kept for validation
    assert "n/a" in (tmp_path / "npz" / "report.md").read_text()
    assert fedclinic.load_model(tmp_path / "npz" / "global_model.pt").arch["in_channels"] == 3
    # the last line names what the run left: compression was off, so no int8 model
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run directory:") and "global_model.pt" in last and "report.html" in last
    assert "int8" not in last and not (tmp_path / "npz" / "global_model.int8.onnx").exists()


def budget_plan(capsys, *args: str) -> list[dict]:
    from fedclinic.cli import main

    assert main(["budget", "--plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["sites"]


@pytest.mark.slow
def test_a_site_over_its_budget_stops_where_the_calculator_says_and_central_dp_has_its_own_epsilon(tmp_path, capsys):
    # Prepare: a fixed sigma, record-level DP at the sites and site-level DP on the server;
    # site 1 agrees to a budget between the epsilon it spends in one round and in two
    from fedclinic.privacy.accounting import epsilon

    common = ["--sites", "3", "--rounds", "3", "--set", "privacy.mode=both", "--set", "privacy.noise-multiplier=1.5",
              "--set", "federation.min-sites=1", *SMALL]
    eps = budget_plan(capsys, *common)[1]["epsilon_by_round"]
    budget = round((eps[0] + eps[1]) / 2, 3)
    common += ["--set", f'privacy.site-budgets="1={budget}"']
    predicted = budget_plan(capsys, *common)
    assert [site["rounds_within_budget"] for site in predicted] == [3, 1, 3]
    assert [site["finetunes"] for site in predicted] == [True, False, True]  # site 1 cannot fine-tune either
    # Execute
    proc = simulate(*common, "--out", str(tmp_path), "--name", "budget")
    # Assert: site 1 declined round 2 and spent exactly its first round, the others went on
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "budget"
    results = json.loads((run / "results.json").read_text())
    sites = {s["site"]: s for s in results["sites"]}
    assert (sites[1]["stopped_in_round"], sites[1]["rounds_trained"]) == (2, 1)
    assert sites[1]["epsilon"] == pytest.approx(eps[0], rel=1e-6) and sites[1]["epsilon"] <= budget
    assert [sites[k]["rounds_trained"] for k in (0, 2)] == [3, 3] and results["stop_reason"] is None
    assert "site 1 stopped before round 2" in proc.stdout
    from fedclinic.cli import main

    assert main(["ledger", "show", str(run / "sites" / "site-1"), "--json"]) == 0
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


def kill_the_server(args: list[str], run: Path, *, when) -> tuple[int, str]:
    """`fedclinic ARGS` writing to `run`, its server process (flwr-simulation runs the ServerApp) killed
    as soon as `when()` holds; (exit status, stderr) of the command."""
    proc = subprocess.Popen([sys.executable, "-m", "fedclinic.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker = f"FLWR_HOME={run / '.flwr'}"
    try:
        deadline = time.monotonic() + 300
        while not when() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        server = [pid for pid in with_env(marker) if "flwr-simulation" in command_of(pid)]
        assert when() and len(server) == 1
        os.kill(server[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.slow
def test_a_fedadam_run_whose_server_is_killed_after_round_1_resumes_to_the_model_of_an_uninterrupted_run(tmp_path):
    # Prepare: the same small FedAdam federation twice; the second one's server process (flwr-simulation runs
    # the ServerApp) is killed as soon as round 1 is checkpointed, and the run is resumed with
    # `simulate --resume`, which must end with the same number of rounds, each recorded and spent once
    from fedclinic.server.checkpoint import CheckpointError, load_checkpoint

    fedadam = ["--sites", "3", "--rounds", "3", "--out", str(tmp_path), *SMALL, "--set", "privacy.audit=false",
               "--set", "federation.strategy=fedadam", "--set", "federation.server-learning-rate=0.01"]
    run = tmp_path / "killed"
    markers = [f"FLWR_HOME={tmp_path / name / '.flwr'}" for name in ("whole", "killed")]

    def checkpointed() -> int:
        try:
            return load_checkpoint(run)["round"]
        except CheckpointError:
            return -1

    try:
        whole = simulate(*fedadam, "--name", "whole")
        assert whole.returncode == 0, whole.stdout + whole.stderr
        returncode, err = kill_the_server(["simulate", *fedadam, "--name", "killed"], run,
                                          when=lambda: checkpointed() >= 1)
        # the killed run is reported as a failure, with the reason, and leaves its checkpoint
        assert returncode == 2 and "fedclinic: error:" in err
        assert checkpointed() == 1 and not (run / "results.json").exists()
        # Execute
        resumed = simulate("--resume", str(run))
        # Assert: the same global model, tensor for tensor, and the strategy recorded with the run's config
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        expected = fedclinic.load_model(tmp_path / "whole" / "global_model.pt").state_dict()
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
        assert all(with_env(marker) == set() for marker in markers)
    finally:  # a failed assertion above leaves nothing running either
        for marker in markers:
            stop_processes(with_env(marker))
