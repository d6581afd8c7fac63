"""One real `fedclinic simulate --baselines --strict` with every step on, and the tests of what it leaves: the
rounds and the steps after training, the baselines, the fine-tuning and the canary audit."""

import csv
import json
import math
import subprocess
import sys

import pytest

import fedclinic
from fedclinic.config import load_config
from fedclinic.data import site_data
from fedclinic.runtime.processes import of_flwr_home, stop_processes


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The run, shared by this module's tests: (the command's CompletedProcess, its run directory). Three sites
    of 300 images, two DP rounds, the fine-tuning, the attacks, compression, explanations, the membership audit
    with 300 canaries, then the pooled and silo baselines; label-alpha=100 (near iid) and three local epochs, so
    two rounds learn; cheap attack and explanation settings."""
    out = tmp_path_factory.mktemp("full-run")
    settings = ["data.site-size=300", "data.test-size=300", "data.label-alpha=100", "training.local-epochs=3",
                "robustness.max-images=120", "robustness.steps=3", "explain.max-images=40",
                "robustness.round-check-eps=0.0078", "privacy.audit-canaries=300"]
    try:
        proc = subprocess.run([sys.executable, "-m", "fedclinic.cli", "simulate", "--sites", "3", "--rounds", "2",
                               "--out", str(out), "--name", "e2e", "--baselines", "--strict",
                               *[a for s in settings for a in ("--set", s)]],
                              capture_output=True, text=True, timeout=900)
        yield proc, out / "e2e"
    finally:  # whatever the tests found, nothing of the run is left running
        stop_processes(of_flwr_home(out / "e2e" / ".flwr"))


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
    # the ServerApp's last progress line says the run directory is complete, so the command asked no `flwr ls`
    rows = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    assert [i for i, row in enumerate(rows) if "finished_run" in row] == [len(rows) - 1]
    assert of_flwr_home(run / ".flwr") == set()


@pytest.mark.slow
def test_simulate_with_baselines_starts_them_from_the_federations_round_0_model_on_its_test_set(full_run):
    # Execute (fixture): a federation through Flower's simulation runtime, then its baselines in the CLI's process
    proc, run = full_run
    # Assert: the baselines' initial model scores on the server's test set what the ServerApp's round 0 scored
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    initial = json.loads((run / "baselines.json").read_text())["initial"]
    round_0 = results["rounds"][0]
    assert (initial["loss"], initial["accuracy"], initial["iou"]) == pytest.approx(
        (round_0["loss"], round_0["accuracy"], round_0["iou"]), rel=1e-6)
    assert set(results["baselines"]) == {"pooled", "silo"}
    assert results["baselines"]["silo"]["sites"][0]["test"]["n"] == initial["n"] == 300
    assert "pooled, DP-SGD" in proc.stdout and "silo, worst site" in proc.stdout
    assert "## Federated vs pooled vs silo" in (run / "report.md").read_text()


@pytest.mark.slow
def test_a_simulated_run_personalises_every_site_and_reports_it(full_run, capsys):
    # Execute (fixture): a real simulation, 3 sites, 2 rounds, fine-tuning on by default
    from fedclinic.cli import main

    proc, run = full_run
    # Assert
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads((run / "results.json").read_text())["personalization"]
    data = load_config(run / "config.toml").data
    assert found["epochs"] == 1 and found["compared"] == 3
    assert [s["site"] for s in found["sites"]] == [0, 1, 2]
    for s in found["sites"]:
        assert s["n"] == len(site_data(data, s["site"], 3)[1])  # the site's own validation split
        assert not s["declined"] and 0 <= s["personalized"]["accuracy"] <= 1
        # planned from round 1 for the rounds and the fine-tuning: the whole budget, never more
        assert s["epsilon"] == pytest.approx(8.0, rel=0.01) and s["epsilon"] <= 8.0
    assert set(found["global"]) == set(found["personalized"]) == {"mean", "worst", "best", "worst_site",
                                                                  "best_site"}
    assert main(["ledger", "show", str(run / "sites" / "site-1"), "--json"]) == 0
    ledger = json.loads(capsys.readouterr().out)
    assert [(r["round"], r["kind"]) for r in ledger["rounds"]] == [(1, "round"), (2, "round"), (3, "fine-tuning")]
    report = (run / "report.md").read_text()
    assert "## Personalised on each site's own data" in report and "| **worst** |" in report
    assert found["guarantee"] in report and found["release"] in report
    assert "personalised on own validation splits: mean accuracy" in proc.stdout


@pytest.mark.slow
def test_a_simulated_run_with_canaries_puts_the_audits_epsilon_beside_the_accountants(full_run):
    proc, run_dir = full_run
    assert proc.returncode == 0, proc.stderr[-3000:]  # --strict: no privacy bug flagged
    results = json.loads((run_dir / "results.json").read_text())
    audit = results["audit"]
    assert audit["canaries"] == 300 and audit["confidence"] == 0.95
    assert 0 <= audit["epsilon_lower_bound"] <= audit["epsilon"] and not audit["likely_privacy_bug"]
    assert audit["epsilon"] == pytest.approx(max(s["epsilon"] for s in audit["sites"]))
    for site, entry in zip(results["sites"], audit["sites"]):
        assert site["epsilon_lower_bound"] == entry["epsilon_lower_bound"] <= entry["epsilon"] <= site["epsilon"]
        assert entry["canaries"] > 0 and 0 < entry["included"] < entry["canaries"]
    assert math.isfinite(audit["calibrated"]["auc"]) and audit["calibrated"]["attack"] == "offline LiRA"
    kept = json.loads((run_dir / "canary_audit.json").read_text())["per_canary"]
    assert len(kept["included"]) == len(kept["decoding"]) == len(kept["black_box"]) == 300
    report = (run_dir / "report.md").read_text()
    assert "**Canary audit**" in report and "| site | epsilon (this run) | epsilon (audited run) | epsilon-hat |" in report
    assert "canary audit, 300 canaries: epsilon >= " in proc.stdout
    assert "offline LiRA" in json.loads((run_dir / "audit.json").read_text())["calibrated"]["attack"]
