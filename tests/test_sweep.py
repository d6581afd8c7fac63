"""`fedclinic sweep`: the points it builds, sweep.csv, resuming, and one real sweep through Flower."""

import csv
import json
import time
from pathlib import Path

import pytest

from fedclinic import cli
from fedclinic.cli import run as cli_run
from fedclinic.config import ConfigError, load_config, replace
from fedclinic.report import run_directory
from fedclinic.sweep import (COLUMNS, build_points, format_points, parse_grid, parse_values, point_row, run_points,
                             write_csv, write_sweep)

TINY = ["--sites", "2", "--rounds", "1", "--set", "data.site-size=160", "--set", "data.test-size=100",
        "--set", "training.batch-size=32", "--set", "training.local-epochs=1",
        # one Ray actor trains both sites in turn: each actor imports torch and Opacus
        "--set", "federation.client-cpus=2",
        # a cheap attack fills the robust_accuracy column; compressing and explaining are tested elsewhere
        "--set", "robustness.steps=2", "--set", "robustness.max-images=50",
        "--set", "compression.enabled=false", "--set", "explain.enabled=false"]


def base_config(tmp_path, **privacy):
    config = load_config(None, [f"output.dir={json.dumps(str(tmp_path))}", "output.name=sw"])
    return replace(config, privacy=privacy) if privacy else config


def fake_results(*, accuracy=0.5, iou=0.3, max_epsilon=2.0, **extra) -> dict:
    return {"final": {"accuracy": accuracy, "f1": 0.4, "iou": iou, "loss": 1.0, "max_epsilon": max_epsilon},
            "timings": {"wall_seconds": 12.0}, **extra}


def fake_run(config) -> dict:
    """What a finished run leaves that the sweep reads: config.toml and results.json in its run directory."""
    run_dir = run_directory(config)
    (run_dir / "config.toml").write_text(config.to_toml())
    results = fake_results(max_epsilon=config.privacy.target_epsilon)
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


def fake_run_all(configs, on_result, ran=None) -> None:
    """run_points' `run_all`: each configuration in turn, as one Flower run does them; `ran` records the names."""
    for i, config in enumerate(configs):
        if ran is not None:
            ran.append(config.output.name)
        on_result(i, fake_run(config))


def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --- the points -----------------------------------------------------------

def test_points_are_the_baseline_then_each_epsilon_then_each_sigma_each_crossed_with_the_clipping_norms(tmp_path):
    # Prepare: a fixed sigma in the base must not leak into the calibrated points
    base = base_config(tmp_path, noise_multiplier=2.0)
    # Execute
    points = build_points(base, epsilons=(1.0, 3.0), noise_multipliers=(0.5,), clipping_norms=(0.5, 2.0))
    # Assert
    assert [p.label for p in points] == ["baseline", "eps-1-clip-0.5", "eps-1-clip-2", "eps-3-clip-0.5",
                                         "eps-3-clip-2", "sigma-0.5-clip-0.5", "sigma-0.5-clip-2"]
    by_label = {p.label: p.config.privacy for p in points}
    assert by_label["baseline"].mode == "off"
    eps = by_label["eps-3-clip-0.5"]
    assert (eps.mode, eps.target_epsilon, eps.noise_multiplier, eps.max_grad_norm) == ("local", 3.0, 0.0, 0.5)
    sigma = by_label["sigma-0.5-clip-2"]
    assert (sigma.mode, sigma.noise_multiplier, sigma.max_grad_norm) == ("local", 0.5, 2.0)
    assert sigma.target_epsilon == base.privacy.target_epsilon  # the fixed sigma's hard budget
    assert [p.run_dir for p in points] == [tmp_path / "sw" / p.label for p in points]


def test_only_privacy_keys_differ_between_points(tmp_path):
    base = base_config(tmp_path)
    points = build_points(base, epsilons=(1.0,), noise_multipliers=(0.7,))
    assert [p.label for p in points] == ["baseline", "eps-1", "sigma-0.7"]

    def shared(config):
        return {k: v for k, v in config.to_flat().items() if not k.startswith(("privacy.", "output."))}

    assert all(shared(p.config) == shared(base) for p in points)


def test_a_poisoning_grid_crosses_every_privacy_point_with_every_attack_and_defence(tmp_path):
    # Prepare
    base = base_config(tmp_path)
    attacks, defences = parse_grid("none,backdoor", "fedavg,krum,clip-0.5")
    # Execute
    points = build_points(base, epsilons=(8.0,), attacks=attacks, defences=defences, attackers="1,3")
    # Assert
    assert [p.label for p in points] == [f"{privacy}-{attack}-{defence}" for privacy in ("baseline", "eps-8")
                                         for attack in ("none", "backdoor") for defence in ("fedavg", "krum", "clip-0.5")]
    fed = {p.label: p.config.federation for p in points}
    assert (fed["eps-8-backdoor-krum"].attack, fed["eps-8-backdoor-krum"].attackers) == ("backdoor", "1,3")
    assert (fed["eps-8-none-krum"].attack, fed["eps-8-none-krum"].attackers) == ("", "")
    # Krum is built for the two attackers also where nobody attacks: the same rule in every row
    assert fed["eps-8-none-krum"].strategy == "krum" and fed["eps-8-none-krum"].num_malicious == 2
    assert (fed["baseline-backdoor-clip-0.5"].strategy, fed["baseline-backdoor-clip-0.5"].update_clip_norm) == (
        "fedavg", 0.5)
    assert fed["baseline-none-fedavg"].update_clip_norm == 0
    assert {p.config.privacy.mode for p in points if p.label.startswith("eps-8")} == {"local"}
    assert [p.run_dir for p in points] == [tmp_path / "sw" / p.label for p in points]
    assert parse_grid(None, None) == ((), ())


def test_a_poisoning_grid_writes_its_table_and_plot(tmp_path):
    # Prepare: the rows of a finished grid, with a backdoor's success rate where a backdoor ran
    points = build_points(base_config(tmp_path), attacks=("none", "backdoor"), defences=("fedavg", "fedmedian"))
    results = {"baseline-none-fedavg": fake_results(accuracy=0.9), "baseline-none-fedmedian": fake_results(accuracy=0.8),
               "baseline-backdoor-fedavg": fake_results(accuracy=0.85),
               "baseline-backdoor-fedmedian": fake_results(accuracy=0.82)}
    results["baseline-backdoor-fedavg"]["final"]["backdoor_success_rate"] = 0.7
    results["baseline-backdoor-fedmedian"]["final"]["backdoor_success_rate"] = 0.1
    rows = [point_row(p, results[p.label]) for p in points]
    # Execute
    written = write_sweep(rows, tmp_path, grid=True)
    # Assert
    assert [w.name for w in written] == ["sweep.csv", "accuracy_vs_epsilon.png", "iou_vs_epsilon.png",
                                         "poisoning.md", "poisoning.png"]
    table = (tmp_path / "poisoning.md").read_text()
    assert "| privacy | DP-SGD clip | attack | fedavg | fedmedian |" in table
    assert "| off | — | none | 0.900 / 0.300 | 0.800 / 0.300 |" in table
    assert "| off | — | backdoor | 0.850 / 0.300 / 0.700 | 0.820 / 0.300 / 0.100 |" in table
    assert (tmp_path / "poisoning.png").read_bytes().startswith(b"\x89PNG")
    written_rows = csv_rows(tmp_path / "sweep.csv")
    assert [(r["attack"], r["defence"], r["backdoor_success_rate"]) for r in written_rows] == [
        ("none", "fedavg", ""), ("none", "fedmedian", ""), ("backdoor", "fedavg", "0.7"), ("backdoor", "fedmedian", "0.1")]
    assert "backdoor" in format_points(rows).splitlines()[0]


def test_value_lists_are_parsed_and_repeats_dropped():
    assert parse_values("1, 3,8,3", "--epsilons") == (1.0, 3.0, 8.0)
    assert parse_values(None, "--epsilons") == ()


@pytest.mark.parametrize("text, words", [
    ("1,x", "--epsilons expects numbers separated by commas, e.g. 1,3,8; got '1,x'"),
    ("", "got ''"),
    ("3,0", "--epsilons values must be finite numbers > 0, got 0"),
    ("-2", "got -2"),
    ("nan", "got nan"),
])
def test_a_bad_value_list_is_refused_in_one_sentence(text, words):
    with pytest.raises(ConfigError) as refused:
        parse_values(text, "--epsilons")
    assert words in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("args, words", [
    (["--epsilons", "1,x"], "--epsilons expects numbers"),
    (["--epsilons", "0"], "--epsilons values must be finite numbers > 0, got 0"),
    ([], "sweep needs --epsilons"),
    (["--epsilons", "1e-7"], "no noise level reaches epsilon=1e-07"),
    (["--attacks", "none,flood"], "--attacks takes none, label-flip, sign-flip, scale, noise, nan, backdoor; got 'flood'"),
    (["--defences", "fedavg,clip-0"], "--defences takes fedavg, "),
    (["--defences", "median"], "or clip-C (updates clipped to norm C > 0, e.g. clip-1); got 'median'"),
    (["--defences", "krum", "--attackers", "1;2"], 'federation.attackers must look like "1,3"'),
    (["--attacks", "sign-flip", "--attackers", "7"], "federation.attackers names site 7"),
    (["--defences", "bulyan"], "federation.strategy=bulyan needs at least 4 * federation.num-malicious + 3 = 7"),
])
def test_the_command_refuses_bad_input_with_exit_2_before_anything_runs(tmp_path, capsys, args, words):
    code = cli.main(["sweep", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and words in err
    assert list(tmp_path.iterdir()) == []


# --- sweep.csv and the plots ------------------------------------------------

def test_sweep_csv_has_a_row_per_point_with_its_settings_and_final_metrics(tmp_path):
    # Prepare
    baseline, eps, sigma = build_points(base_config(tmp_path), epsilons=(3.0,), noise_multipliers=(1.5,))
    rows = [point_row(baseline, fake_results(accuracy=0.8, max_epsilon=0.0)),
            point_row(eps, fake_results(accuracy=0.6, iou=None, max_epsilon=2.99,
                                        robustness={"robust_accuracy": 0.41})),
            point_row(sigma, fake_results(accuracy=0.55, max_epsilon=5.1))]
    # Execute
    write_csv(rows, tmp_path / "sweep.csv")
    # Assert
    written = csv_rows(tmp_path / "sweep.csv")
    assert tuple(written[0]) == COLUMNS
    assert [r["point"] for r in written] == ["baseline", "eps-3", "sigma-1.5"]
    assert written[0]["mode"] == "off" and written[0]["max_epsilon"] == "" and written[0]["target_epsilon"] == ""
    assert (written[1]["target_epsilon"], written[1]["noise_multiplier"], written[1]["max_epsilon"]) == ("3.0", "", "2.99")
    assert written[1]["iou"] == "" and written[1]["robust_accuracy"] == "0.41"
    assert written[2]["noise_multiplier"] == "1.5" and written[2]["robust_accuracy"] == ""
    assert written[2]["accuracy"] == "0.55" and written[2]["wall_seconds"] == "12.0"
    assert written[2]["run_dir"] == str(tmp_path / "sw" / "sigma-1.5")


def test_plots_are_written_and_iou_only_when_the_data_has_boxes(tmp_path):
    points = build_points(base_config(tmp_path), epsilons=(1.0, 8.0), clipping_norms=(0.5, 2.0))
    rows = [point_row(p, fake_results(accuracy=0.4 + 0.05 * i, max_epsilon=p.config.privacy.target_epsilon))
            for i, p in enumerate(points)]
    (tmp_path / "with-boxes").mkdir()
    assert [f.name for f in write_sweep(rows, tmp_path / "with-boxes")] == [
        "sweep.csv", "accuracy_vs_epsilon.png", "iou_vs_epsilon.png"]
    assert (tmp_path / "with-boxes" / "accuracy_vs_epsilon.png").read_bytes().startswith(b"\x89PNG")

    no_boxes = [{**row, "iou": None} for row in rows]
    (tmp_path / "no-boxes").mkdir()
    assert [f.name for f in write_sweep(no_boxes, tmp_path / "no-boxes")] == ["sweep.csv", "accuracy_vs_epsilon.png"]


# --- resuming ---------------------------------------------------------------

def test_a_finished_point_is_reused_a_partial_one_rerun_afresh_and_a_changed_one_rerun(tmp_path):
    # Prepare: baseline finished; eps-1 interrupted (no results.json); eps-3 finished with another round count
    base = base_config(tmp_path)
    baseline, eps1, eps3 = build_points(base, epsilons=(1.0, 3.0))
    fake_run(baseline.config)
    run_directory(eps1.config)
    (eps1.run_dir / "config.toml").write_text(eps1.config.to_toml())
    (eps1.run_dir / "flower.log").write_text("interrupted")
    fake_run(replace(eps3.config, federation={"rounds": 9}))
    ran, lines = [], []
    # Execute
    rows = run_points([baseline, eps1, eps3], run_all=lambda configs, on_result: fake_run_all(configs, on_result, ran),
                      say=lines.append)
    # Assert
    assert ran == ["eps-1", "eps-3"]
    assert not (eps1.run_dir / "flower.log").exists()  # the partial directory was removed, not patched
    assert load_config(eps3.run_dir / "config.toml") == eps3.config
    assert [r["point"] for r in rows] == ["baseline", "eps-1", "eps-3"]
    assert lines[0].startswith("[1/3] baseline: reused")
    assert any(line.startswith("[2/3] eps-1: started") for line in lines)
    assert any(line.startswith("[3/3] eps-3: done") for line in lines)


def test_ctrl_c_exits_130_and_the_same_command_resumes_where_it_stopped(tmp_path, capsys, monkeypatch):
    # Prepare: the sweep's one Flower run is interrupted while its second point trains
    calls = []

    def interrupted_second(configs, say, link, on_result):
        for i, config in enumerate(configs):
            calls.append(config.output.name)
            if config.output.name == "eps-2":
                raise KeyboardInterrupt
            on_result(i, fake_run(config))

    monkeypatch.setattr(cli_run, "run_all", interrupted_second)
    command = ["sweep", "--epsilons", "2,4", "--out", str(tmp_path), "--quiet"]  # no --name: derived from the options
    # Execute
    first = cli.main(command)
    err = capsys.readouterr().err
    monkeypatch.setattr(cli_run, "run_all", lambda configs, say, link, on_result: fake_run_all(configs, on_result, calls))
    second = cli.main(command)
    out = capsys.readouterr().out
    # Assert
    assert first == 130
    assert "interrupted with 1 of 3 points done" in err and "run the same command again to resume" in err
    assert second == 0
    assert calls == ["baseline", "eps-2", "eps-2", "eps-4"]  # the baseline was not run again
    [sweep_dir] = tmp_path.iterdir()
    assert sweep_dir.name.startswith("sweep-")
    assert [r["point"] for r in csv_rows(sweep_dir / "sweep.csv")] == ["baseline", "eps-2", "eps-4"]
    assert "eps-4" in out and "started" not in out  # --quiet: only the final table


# --- end to end ---------------------------------------------------------------

@pytest.mark.slow
def test_a_real_sweep_and_poisoning_grid_writes_its_tables_and_plots_and_the_same_command_again_reruns_nothing(
        tmp_path, capsys):
    # Prepare: privacy off and at epsilon 3, each with site 1 of 2 running the backdoor from its real ClientApp
    # against FedAvg with every update clipped to norm 0.05 (one sweep, so Flower's start-up is paid once)
    command = ["sweep", "--epsilons", "3", "--attacks", "backdoor", "--defences", "clip-0.05", "--attackers", "1",
               *TINY, "--out", str(tmp_path), "--name", "tradeoff"]
    sweep_dir = tmp_path / "tradeoff"
    labels = ["baseline-backdoor-clip-0.05", "eps-3-backdoor-clip-0.05"]
    # Execute: both points through Flower's simulation runtime
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    # Assert: a row per point with its run's final metrics, the backdoor's success measured in every round
    assert f"[1/2] {labels[0]}: started" in out and "round 1/1" in out and f"[2/2] {labels[1]}: done" in out
    rows = {r["point"]: r for r in csv_rows(sweep_dir / "sweep.csv")}
    assert list(rows) == labels
    for label, row in rows.items():
        results = json.loads((sweep_dir / label / "results.json").read_text())
        final = results["final"]
        assert float(row["accuracy"]) == pytest.approx(final["accuracy"]) and 0 <= final["accuracy"] <= 1
        assert float(row["iou"]) == pytest.approx(final["iou"])
        assert float(row["wall_seconds"]) > 0 and row["run_dir"] == str(sweep_dir / label)
        assert 0 <= float(row["audit_auc"]) <= 1  # the membership-inference audit of each point
        assert float(row["robust_accuracy"]) == pytest.approx(results["robustness"]["robust_accuracy"])
        assert results["config"]["federation.attack"] == "backdoor" and results["config"]["federation.attackers"] == "1"
        assert [r["round"] for r in results["rounds"]] == [0, 1]
        assert all(0 <= r["backdoor_success_rate"] <= 1 for r in results["rounds"])
        assert float(row["backdoor_success_rate"]) == pytest.approx(final["backdoor_success_rate"])
        assert row["attack"] == "backdoor" and "Backdoor success rate" in (sweep_dir / label / "report.md").read_text()
        assert results["config"]["federation.update-clip-norm"] == 0.05
        norms = [float(r["update_norm"]) for r in csv_rows(sweep_dir / label / "metrics.csv") if r["site"] != "central"]
        assert len(norms) == 2 and min(norms) > 0.05  # every update was over the norm, so every one was clipped
    assert rows[labels[0]]["mode"] == "off" and rows[labels[0]]["max_epsilon"] == ""
    assert rows[labels[1]]["mode"] == "local" and float(rows[labels[1]]["target_epsilon"]) == 3.0
    assert 0 < float(rows[labels[1]]["max_epsilon"]) <= 3.0 * 1.001
    assert (sweep_dir / "poisoning.png").read_bytes().startswith(b"\x89PNG")
    assert not (sweep_dir / "accuracy_vs_epsilon.png").exists()  # the trade-off plots are of points nobody attacks
    table = (sweep_dir / "poisoning.md").read_text().splitlines()
    assert table[-2].startswith("| off | — | backdoor | ") and table[-1].startswith("| ε = 3 | ")
    assert all(row.count(" / ") == 2 for row in table[-2:])  # accuracy / IoU / backdoor success
    # both points ran in one Flower run, on one SuperLink started once for the sweep
    assert (sweep_dir / "superlink.log").read_text().count("Starting Flower SuperLink") == 1
    assert (sweep_dir / "superlink.log").read_text().count("Created run") == 1
    assert not any((sweep_dir / label / "superlink.log").exists() for label in rows)

    # Execute: the same command again reruns nothing
    finished = {label: (sweep_dir / label / "results.json").stat().st_mtime_ns for label in rows}
    started = time.monotonic()
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert time.monotonic() - started < 20
    assert out.count("reused") == 2 and "started" not in out
    assert {label: (sweep_dir / label / "results.json").stat().st_mtime_ns for label in rows} == finished
    # (which points a rerun runs again, a missing or partial one, is tested above on the same run_points)


# --- baselines ----------------------------------------------------------------

def fake_baselines(*, private: bool) -> dict:
    """The results.json section fedclinic.baselines writes, with only what the sweep reads."""
    model = {"test": {"accuracy": 0.7, "iou": 0.5}, "epsilon": 3.0 if private else None}
    return {"pooled": {"non_private": None if private else model, "private": model if private else None},
            "silo": {"private": private, "max_epsilon": 2.9 if private else None,
                     "test": {"mean": {"accuracy": 0.5, "iou": 0.3}, "worst": {"accuracy": 0.4},
                              "best": {"accuracy": 0.6}}}}


def test_the_baselines_of_each_point_fill_the_pooled_and_silo_columns_and_the_table(tmp_path):
    # Prepare
    baseline, eps = build_points(base_config(tmp_path), epsilons=(3.0,))
    without = [point_row(baseline, fake_results()), point_row(eps, fake_results())]
    # Execute
    rows = [point_row(baseline, fake_results(baselines=fake_baselines(private=False))),
            point_row(eps, fake_results(baselines=fake_baselines(private=True)))]
    write_csv(rows, tmp_path / "sweep.csv")
    # Assert: the non-private point shows the non-private pooled model, the private one the DP-SGD one
    written = csv_rows(tmp_path / "sweep.csv")
    assert [(r["pooled_accuracy"], r["pooled_epsilon"], r["silo_max_epsilon"]) for r in written] == [
        ("0.7", "", ""), ("0.7", "3.0", "2.9")]
    assert (written[1]["silo_accuracy"], written[1]["silo_worst_accuracy"], written[1]["silo_best_accuracy"]) == (
        "0.5", "0.4", "0.6")
    assert all(without[0][c] is None for c in COLUMNS if c.startswith(("pooled_", "silo_")))
    assert "pooled" in format_points(rows).splitlines()[0] and "pooled" not in format_points(without)


def test_with_baselines_every_point_gets_them_once_also_a_reused_one(tmp_path):
    # Prepare: the baseline point finished before, without baselines
    baseline, eps = build_points(base_config(tmp_path), epsilons=(3.0,))
    fake_run(baseline.config)
    added = []

    def add_baselines(point):
        added.append(point.label)
        results = json.loads((point.run_dir / "results.json").read_text())
        results["baselines"] = fake_baselines(private=point.config.privacy.local)
        (point.run_dir / "results.json").write_text(json.dumps(results))
        return results

    # Execute: twice
    rows = run_points([baseline, eps], run_all=fake_run_all, say=lambda line: None, add_baselines=add_baselines)
    again = run_points([baseline, eps], run_all=fake_run_all, say=lambda line: None, add_baselines=add_baselines)
    # Assert
    assert added == ["baseline", "eps-3"]
    assert [r["silo_accuracy"] for r in rows] == [r["silo_accuracy"] for r in again] == [0.5, 0.5]
