"""results.json: its typed schema, its one writer's checks, and what `fedclinic.run` returns; the run's plots."""

import json

import pytest

from fedclinic.report import read_results, update_results, write_results
from fedclinic.report.schema import Results, SchemaError
from test_baselines import federated_run


@pytest.fixture
def run_dir(tmp_path):
    """A run directory whose results.json the run recorder wrote (one round of a tiny federation)."""
    return federated_run(tmp_path, "federation.rounds=1")


def test_what_the_recorder_writes_reads_back_typed_and_unchanged(run_dir):
    # Prepare
    written = json.loads((run_dir / "results.json").read_text())
    # Execute
    results = read_results(run_dir)
    # Assert
    assert results.run_dir == run_dir and results.run == "fed"
    assert results.final.accuracy == written["rounds"][-1]["accuracy"] == results.rounds[-1].accuracy
    assert results.rounds[0].round == 0 and results.privacy.mode == "local"
    assert results.privacy.record_level.target_epsilon == 8.0 and results.privacy.central is None
    assert results.to_dict() == written


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(surprise=1), "results has a key the schema does not know: 'surprise'"),
    (lambda r: r["final"].pop("accuracy"), "results.final lacks the key 'accuracy'"),
    (lambda r: r["rounds"][0].update(sites_trained="two"), "results.rounds[0].sites_trained should be of type int"),
    (lambda r: r["privacy"].update(record_level=[]), "results.privacy.record_level should be an object"),
    (lambda r: r["timings"].update(server_seconds=True), "results.timings.server_seconds should be a number"),
])
def test_the_writer_refuses_what_the_schema_does_not_allow_and_keeps_the_file(run_dir, change, words):
    # Prepare
    before = (run_dir / "results.json").read_text()
    results = json.loads(before)
    change(results)
    # Execute
    with pytest.raises(SchemaError) as refused:
        write_results(run_dir, results)
    # Assert: one sentence naming the key; the file as it was
    assert str(refused.value).startswith(words)
    assert (run_dir / "results.json").read_text() == before


def test_the_sections_of_later_steps_are_added_through_the_same_checks(run_dir):
    # Execute: a step after the run (the audit, the baselines) adds its section
    results = update_results(run_dir, {"audit": {"auc": 0.5}})
    # Assert
    assert read_results(run_dir).audit == {"auc": 0.5} == results["audit"]
    with pytest.raises(SchemaError, match="results has a key the schema does not know: 'audits'"):
        update_results(run_dir, {"audits": {}})


def test_an_optional_section_may_be_null_but_a_run_section_may_not(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert Results.from_dict({**results, "robustness": None}).robustness is None
    with pytest.raises(SchemaError, match=r"results.final should be an object, not None"):
        Results.from_dict({**results, "final": None})


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    import struct

    return struct.unpack(">II", path.read_bytes()[16:24])


def test_a_federation_of_300_sites_gets_plots_of_a_readable_size(tmp_path):
    # Prepare: 300 sites of 4 scans each, two rounds of ledger metrics
    import numpy as np

    from fedclinic.data import ImageSet
    from fedclinic.report.plots import MAX_NAMED_SITES, plot_epsilon, plot_label_distribution, plot_site_samples

    rng = np.random.default_rng(0)
    sites = [ImageSet(rng.integers(0, 255, (4, 1, 32, 32), dtype=np.uint8), rng.integers(0, 3, 4), None,
                      ("healthy", "benign", "malignant")) for _ in range(300)]
    metrics = [{"site": k, "round": r, "epsilon": 4.0 * r} for k in range(300) for r in (1, 2)]
    # Execute
    plot_site_samples(sites, tmp_path / "many.png")
    plot_site_samples(sites[:MAX_NAMED_SITES], tmp_path / "named.png")
    plot_label_distribution(sites, tmp_path / "labels.png")
    plot_epsilon(metrics, tmp_path / "epsilon.png", target=8.0)
    # Assert: the samples show the first sites only (a row per site of 300 would be 50,000 pixels tall)
    assert png_size(tmp_path / "many.png") == png_size(tmp_path / "named.png")
    assert png_size(tmp_path / "labels.png") == png_size(tmp_path / "epsilon.png") == (660, 385)
