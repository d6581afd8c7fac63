"""Pooled and silo baselines: the federation's test set, initial weights, seeds, sigma and budgets; the command."""

import json
import math
import subprocess
import sys
import time

import dp_accounting
import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier

import fedclinic.baselines as baselines
from fedclinic import cli
from fedclinic.baselines import run_baselines
from fedclinic.clients.site import Site, build_model, train_round, training_seed
from fedclinic.clients.training import round_lr_scale
from fedclinic.config import load_config, replace
from fedclinic.data import server_test_set, site_data
from fedclinic.evaluation import evaluate
from fedclinic.model import MultiTaskNet
from fedclinic.privacy.ledger import Ledger
from fedclinic.report import RunRecorder

# 2 sites of ~140 training images, 2 rounds of 1 local epoch: every baseline trains in seconds
TINY = ["data.site-size=200", "data.test-size=100", "training.batch-size=32", "federation.sites=2",
        "federation.rounds=2", "training.local-epochs=1"]
OPACUS_RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def tiny(*settings: str):
    return load_config(None, [*TINY, *settings])


def servers_initial_weights(config) -> dict:
    """The ServerApp's initial global model, built the way server/app.py has always built it."""
    test_set = server_test_set(config.data)
    torch.manual_seed(config.data.seed)
    model = MultiTaskNet(in_channels=test_set.channels, num_classes=test_set.num_classes, width=config.model.width,
                         encoder=config.model.encoder)
    return model.state_dict()


@pytest.fixture(scope="module")
def traced():
    """One DP run of the baselines (site 1 with its own budget), with every train_locally call recorded."""
    config = tiny("privacy.site-budgets=\"1=4\"")
    calls = []
    real = baselines.train_locally

    def recording(model, data, **kwargs):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = real(model, data, **kwargs)
        calls.append({"start": start, "end": {k: v.detach().clone() for k, v in model.state_dict().items()},
                      "model": model, "n": len(data), "seed": kwargs["seed"], "lr_scale": kwargs["lr_scale"],
                      "epochs": kwargs["training"].local_epochs, "private": kwargs["privacy"].local,
                      "threads": torch.get_num_threads()})
        return result

    baselines.train_locally = recording
    threads = torch.get_num_threads()
    lines, steps = [], []
    try:
        found = run_baselines(config, lines.append, on_step=lambda *step: steps.append(step))
    finally:
        baselines.train_locally = real
    assert torch.get_num_threads() == threads  # restored
    # one line and one step of the progress bar per model: pooled non-private, pooled DP-SGD, each silo site
    assert steps == [("baselines", k, 4) for k in range(1, 5)] and len(lines) == 4
    return config, found, calls


def dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Google's dp-accounting, not the Opacus accountant the code uses."""
    acc = dp_accounting.rdp.RdpAccountant(OPACUS_RDP_ORDERS)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


# --- the same test set and seeds as the federation ---------------------------------------------------

def by_baseline(config, calls) -> list[list[dict]]:
    """The train_locally calls in groups of federation.rounds: pooled non-private, pooled DP-SGD, silo 0, silo 1."""
    rounds = config.federation.rounds
    assert len(calls) == 4 * rounds  # site 1's own budget of 4 still allows both rounds
    return [calls[i:i + rounds] for i in range(0, len(calls), rounds)]


def test_every_baseline_starts_from_the_servers_initial_model_and_trains_as_its_site_does_round_by_round(traced):
    config, found, calls = traced
    initial = servers_initial_weights(config)
    train = [site_data(config.data, k, 2)[0] for k in range(2)]
    groups = by_baseline(config, calls)
    # pooled non-private, pooled DP-SGD, silo site 0, silo site 1: who trains, on what, with whose seeds
    expected = [(len(train[0]) + len(train[1]), False, 0), (len(train[0]) + len(train[1]), True, 0),
                (len(train[0]), True, 0), (len(train[1]), True, 1)]
    for group, (n, private, site) in zip(groups, expected, strict=True):
        first = group[0]["start"]
        assert first.keys() == initial.keys() and all(torch.equal(first[k], initial[k]) for k in initial)
        for r, call in enumerate(group, 1):
            assert (call["n"], call["private"]) == (n, private)
            assert call["seed"] == training_seed(config, site, r)  # the site's own round r
            assert call["lr_scale"] == round_lr_scale(config.training, r, config.federation.rounds)
            assert call["epochs"] == config.training.local_epochs
            assert call["threads"] == config.federation.client_cpus  # a simulated site's threads
        for before, after in zip(group, group[1:]):  # each round goes on from the last, no averaging between
            assert all(torch.equal(after["start"][k], before["end"][k]) for k in initial)
    assert found["initial"] == evaluate(build_model(config, train[0], initial), server_test_set(config.data),
                                        box_weight=config.model.box_weight)


def test_every_baseline_is_scored_on_exactly_the_server_test_set(traced):
    config, found, calls = traced
    test_set = server_test_set(config.data)
    pooled, silo = found["pooled"], found["silo"]
    for entry, group in zip([pooled["non_private"], pooled["private"], *silo["sites"]], by_baseline(config, calls)):
        again = evaluate(group[-1]["model"], test_set, box_weight=config.model.box_weight)
        assert entry["test"] == again and entry["test"]["n"] == len(test_set)


def test_the_same_configuration_gives_the_same_numbers(traced):
    config, found, _ = traced
    again = run_baselines(config)

    def numbers(entry):
        return {k: v for k, v in entry.items() if k != "seconds"}

    assert numbers(again["pooled"]["private"]) == numbers(found["pooled"]["private"])
    assert [numbers(s) for s in again["silo"]["sites"]] == [numbers(s) for s in found["silo"]["sites"]]


# --- privacy ---------------------------------------------------------------------------------------

# Opacus's bisection probes very large sigmas, whose best RDP order is the largest it tries (as in accounting.py)
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_pooled_dp_sigma_matches_an_independent_calibration_and_spends_the_target(traced):
    config, found, _ = traced
    private, p = found["pooled"]["private"], config.privacy
    n = private["n"]
    batches = math.ceil(n / config.training.batch_size)  # Poisson sampling at q = 1 / batches, batches a epoch
    steps = config.federation.rounds * config.training.local_epochs * batches
    reference = get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=p.delta, sample_rate=1 / batches,
                                     steps=steps, accountant="rdp", epsilon_tolerance=0.001)
    assert (private["sample_rate"], private["steps"]) == (pytest.approx(1 / batches), steps)
    assert private["sigma"] == pytest.approx(reference, rel=0.01)
    spent = dp_accounting_epsilon(private["sigma"], private["sample_rate"], private["steps"], p.delta)
    assert private["epsilon"] == pytest.approx(spent, rel=0.01)
    assert spent == pytest.approx(p.target_epsilon, rel=0.01) and private["target_epsilon"] == p.target_epsilon


def test_a_silo_site_trains_with_the_sigma_of_its_federated_ledger_plan_and_spends_its_own_budget(traced, tmp_path):
    config, found, _ = traced
    # a site alone fine-tunes nothing: its plan is the federated one without personalisation
    rounds_only = replace(config, personalize={"epochs": 0})
    for k, row in enumerate(found["silo"]["sites"]):
        train, _ = site_data(config.data, k, 2)
        train_round(rounds_only, Site(k, 2, tmp_path / f"site-{k}"), build_model(config, train).state_dict(),
                    server_round=1)
        plan = Ledger.open(tmp_path / f"site-{k}", site=k).plan
        assert row["sigma"] == plan.noise_multiplier and row["sample_rate"] == pytest.approx(plan.sample_rate)
        assert row["steps"] == plan.rounds * plan.steps_per_round
        assert row["budget"] == config.privacy.budget(k) == plan.target_epsilon
        spent = dp_accounting_epsilon(row["sigma"], row["sample_rate"], row["steps"], config.privacy.delta)
        assert row["epsilon"] == pytest.approx(spent, rel=0.01) and spent == pytest.approx(row["budget"], rel=0.01)
    assert [row["budget"] for row in found["silo"]["sites"]] == [8.0, 4.0]
    assert found["silo"]["max_epsilon"] == max(row["epsilon"] for row in found["silo"]["sites"])


def test_with_a_fixed_sigma_a_silo_site_trains_only_the_rounds_its_budget_allows():
    # Prepare: at sigma 1, site 1 (128 images, q = 1/4) spends 4.87 in round 1 and would reach 6.25 in round 2
    config = tiny("privacy.noise-multiplier=1.0", "privacy.site-budgets=\"1=5\"")
    # Execute
    sites = run_baselines(config, non_private=False)["silo"]["sites"]
    # Assert: site 0 (budget 8) trains both rounds, site 1 stops after one, as it would in the federation
    assert [s["epochs"] for s in sites] == [2, 1]
    assert all(s["sigma"] == 1.0 and s["epsilon"] <= s["budget"] for s in sites)


def test_under_central_dp_pooled_and_silo_are_non_private_and_say_so():
    found = run_baselines(tiny("privacy.mode=central"))
    assert found["pooled"]["private"] is None and found["pooled"]["non_private"]["epsilon"] is None
    assert found["silo"]["private"] is False and found["silo"]["max_epsilon"] is None
    assert all(s["sigma"] is None and s["epsilon"] is None for s in found["silo"]["sites"])
    assert "no record-level epsilon" in found["pooled"]["note"] == found["silo"]["note"]


# --- silo's summaries --------------------------------------------------------------------------------

def test_silo_is_summarised_as_worst_mean_best_and_each_site_scored_on_its_own_validation_split(traced):
    config, found, _ = traced
    silo = found["silo"]
    for k, row in enumerate(silo["sites"]):
        _, val = site_data(config.data, k, 2)
        assert row["val"]["n"] == len(val) > 0
    for split in ("test", "val"):
        summary = silo[split]
        for metric in ("accuracy", "f1", "iou"):
            values = [row[split][metric] for row in silo["sites"]]
            assert summary["worst"][metric] == min(values) and summary["best"][metric] == max(values)
            assert summary["worst"][metric] <= summary["mean"][metric] <= summary["best"][metric]
            assert summary["mean"][metric] == pytest.approx(sum(values) / len(values))
        accuracy = [row[split]["accuracy"] for row in silo["sites"]]
        assert accuracy[summary["worst_site"]] == min(accuracy) and accuracy[summary["best_site"]] == max(accuracy)


# --- the command -------------------------------------------------------------------------------------

def federated_run(tmp_path, *settings):
    """A run directory as a finished federation leaves it (config.toml, results.json, report), by its own writer."""
    config = load_config(None, [*TINY, *settings, f"output.dir={json.dumps(str(tmp_path))}", "output.name=fed"])
    run_dir = tmp_path / "fed"
    run_dir.mkdir()
    recorder = RunRecorder(run_dir, config, started=time.time())
    test_set = server_test_set(config.data)
    scores = {**evaluate(build_model(config, test_set), test_set, box_weight=1.0), "seconds": 0.1}
    recorder.central_round(0, scores, [])
    recorder.finish(build_model(config, test_set), test_set.class_names, [], strategy_seconds=1.0)
    return run_dir


def test_baselines_of_a_run_directory_add_a_section_to_its_results_and_report(tmp_path, capsys):
    # Prepare
    run_dir = federated_run(tmp_path, "federation.rounds=1")
    before = json.loads((run_dir / "results.json").read_text())
    # Execute
    code = cli.main(["baselines", str(run_dir), "--quiet"])
    # Assert
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["baselines"]) == {"pooled", "silo"}
    assert {k: v for k, v in results.items() if k != "baselines"} == before  # nothing else changed
    written = json.loads((run_dir / "baselines.json").read_text())
    assert written["pooled"] == results["baselines"]["pooled"] and written["silo"] == results["baselines"]["silo"]
    assert {k: v for k, v in written["config"].items() if k != "output.quiet"} == \
        {k: v for k, v in before["config"].items() if k != "output.quiet"}  # the run's own settings
    report = (run_dir / "report.md").read_text()
    assert "## Federated vs pooled vs silo" in report and "| federated |" in report and "| silo, worst site |" in report
    assert "Federated vs pooled vs silo" in (run_dir / "report.html").read_text()
    assert "federated" in out and "pooled, DP-SGD" in out and "baseline pooled" not in out  # --quiet: the table


@pytest.mark.parametrize("args, words", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "holds no config.toml, so it is not a fedclinic run directory"),
    (["{run}", "--rounds", "3"], "uses the run's own config.toml; --rounds cannot change it"),
    (["{run}", "--set", "privacy.target-epsilon=3"], "cannot change privacy.target-epsilon"),
    (["{broken}"], "cannot be read as JSON"),
    (["--set", "privacy.delta=0.01", "--out", "{new}"], "privacy.delta=0.01 must be below 1/"),
    (["--set", "privacy.target-epsilon=1e-7", "--out", "{new}"], "no noise level reaches epsilon=1e-07"),
    (["--out", "{tmp}", "--name", "fed"], "already holds a federated run; give it as RUN_DIR"),
])
def test_bad_input_is_refused_in_one_sentence_with_exit_2_and_nothing_is_lost(tmp_path, capsys, args, words):
    # Prepare: a finished run, an empty folder, a run whose results.json is broken
    places = {"{missing}": tmp_path / "missing", "{empty}": tmp_path / "empty", "{broken}": tmp_path / "broken",
              "{run}": federated_run(tmp_path), "{new}": tmp_path / "new", "{tmp}": tmp_path}
    places["{empty}"].mkdir()
    places["{broken}"].mkdir()
    (places["{broken}"] / "config.toml").write_text(load_config(None, TINY).to_toml())
    (places["{broken}"] / "results.json").write_text("{half a file")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    # Execute
    code = cli.main(["baselines", *[str(places.get(a, a)) for a in args]])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.strip().count("\n") == 0, err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_running_the_baselines_imports_no_flower(tmp_path):
    # Execute: the command in a fresh interpreter, then what it imported
    script = ("import sys; from fedclinic.cli import main; "
              f"code = main(['baselines', '--quiet', '--out', {str(tmp_path)!r}, '--name', 'alone', "
              + ", ".join(repr(f"--set={s}") for s in TINY if "rounds" not in s) + ", '--rounds', '1']); "
              "print(code, sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    # Assert
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []"
    run_dir = tmp_path / "alone"
    assert sorted(p.name for p in run_dir.iterdir()) == ["baselines.json", "config.toml", "report.html", "report.md"]
    assert "# fedclinic baselines `alone`" in (run_dir / "report.md").read_text()
