"""The membership-inference audit: ROC maths, per-example losses, DP vs no DP, and a run directory."""

import json
import math

import numpy as np
import pytest
import torch

from fedclinic.clients.site import build_model
from fedclinic.clients.training import train_locally
from fedclinic.config import Config, load_config
from fedclinic.data import CLASS_NAMES, site_data
from fedclinic.data.synthetic import generate_fresh_site_scans
from fedclinic.model import MultiTaskNet, multitask_loss, save_model
from fedclinic.privacy.accounting import plan_site
from fedclinic.analysis.audit import (
    MIN_NONMEMBERS,
    AuditError,
    audit_model,
    audit_run,
    audit_sets,
    example_losses,
    roc,
    tpr_at_fpr,
)

# --- the ROC maths against brute force --------------------------------------------------------


def pairwise_auc(members, nonmembers) -> float:
    """P(a member's loss < a non-member's), ties counting half, over every pair."""
    wins = sum((m < n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


def best_tpr(members, nonmembers, target: float) -> float:
    """The best TPR of "loss <= t is a member" over every threshold t whose FPR is <= target."""
    best = 0.0
    for t in [-math.inf, *members, *nonmembers]:
        fpr = sum(n <= t for n in nonmembers) / len(nonmembers)
        if fpr <= target:
            best = max(best, sum(m <= t for m in members) / len(members))
    return best


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer losses from a small range, so many are tied, within and across the two sets."""
    rng = np.random.default_rng(seed)
    members = rng.integers(0, 8, rng.integers(1, 40)).astype(float)
    nonmembers = rng.integers(2, 10, rng.integers(1, 40)).astype(float)
    return members, nonmembers


@pytest.mark.parametrize("seed", range(20))
def test_auc_and_tpr_at_fpr_match_brute_force_over_all_pairs_and_thresholds(seed):
    members, nonmembers = random_case(seed)
    fpr, tpr, auc = roc(members, nonmembers)
    assert auc == pytest.approx(pairwise_auc(members, nonmembers), abs=1e-12)
    for target in (0.0, 0.01, 0.05, 0.2, 0.5, 1.0):
        assert tpr_at_fpr(fpr, tpr, target) == pytest.approx(best_tpr(members, nonmembers, target), abs=1e-12)


@pytest.mark.parametrize(
    "members, nonmembers, auc",
    [
        ([0.1, 0.2, 0.3], [0.4, 0.5], 1.0),  # every member has the lower loss
        ([0.4, 0.5], [0.1, 0.2, 0.3], 0.0),  # every member has the higher loss
        ([1.0, 1.0], [1.0, 1.0, 1.0], 0.5),  # all tied: a coin toss
        ([1.0, 2.0], [2.0, 3.0], 3.5 / 4),  # one tied pair of four counts half
    ],
)
def test_hand_made_cases_give_the_expected_auc(members, nonmembers, auc):
    fpr, tpr, got = roc(members, nonmembers)
    assert got == pytest.approx(auc)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_tpr_at_fpr_is_one_for_perfect_separation_and_zero_without_an_allowed_point():
    fpr, tpr, _ = roc([0.1, 0.2], [0.3, 0.4])
    assert tpr_at_fpr(fpr, tpr, 0.0) == 1.0
    fpr, tpr, _ = roc([0.3, 0.4], [0.1, 0.2])
    assert tpr_at_fpr(fpr, tpr, 0.4) == 0.0
    assert tpr_at_fpr([0.5, 1.0], [0.7, 1.0], 0.1) == 0.0  # no point at or below the target


def test_empty_or_nan_losses_are_refused():
    with pytest.raises(ValueError, match="non-member"):
        roc([0.1], [])
    with pytest.raises(ValueError, match="NaN"):
        roc([0.1, math.nan], [0.2])


# --- per-example losses -----------------------------------------------------------------------


def test_example_losses_are_the_training_loss_of_each_image_alone():
    # Prepare: lesion and healthy scans, in batches of 3 so the last one is short
    cfg = load_config(None, ["data.image-size=16"])
    data = generate_fresh_site_scans(cfg.data, 0, 7)
    torch.manual_seed(0)
    model = MultiTaskNet(in_channels=1, num_classes=3, width=4).train()
    # Execute
    losses = example_losses(model, data, box_weight=2.0, device="cpu", batch_size=3)
    # Assert: the model is handed back in train mode, and each loss is multitask_loss on that image alone
    assert model.training
    model.eval()
    for i in range(len(data)):
        x = torch.from_numpy(data.images[i : i + 1]).float() / 255
        alone, _ = multitask_loss(*model(x), torch.from_numpy(data.labels[i : i + 1]),
                                  torch.from_numpy(data.boxes[i : i + 1]), box_weight=2.0)
        assert losses[i] == pytest.approx(alone.item(), rel=1e-5)
    assert np.isnan(data.boxes).any() and np.isfinite(data.boxes).all(axis=1).any()


# --- the attack sees what DP-SGD hides ---------------------------------------------------------

TRAIN = 160  # members; as many fresh scans of the same site are the non-members
EPOCHS = 60


def train_and_audit(*, target_epsilon: float | None) -> dict:
    """Train a small model for many epochs on TRAIN scans, then attack it; no DP when target_epsilon is None."""
    privacy = ["privacy.mode=off"] if target_epsilon is None else ["privacy.mode=local"]
    # a recipe made to overfit: the trained CNN encoder, no augmentation
    config = load_config(None, ["data.image-size=16", "model.encoder=cnn", "training.augment=none",
                                "model.width=8", "training.batch-size=32", "training.schedule=constant",
                                f"training.local-epochs={EPOCHS}", "training.device=cpu",
                                # DP-SGD at sigma ~ 7 diverges at the default 0.3: the test should
                                # see a model that trained, not one that blew up
                                "training.learning-rate=0.05",
                                # without DP the recipe overfits at 0.1 (measured: AUC 0.70 at the
                                # default 0.3, which is tuned for federations, not for memorising)
                                "training.baseline-learning-rate=0.1"] + privacy)
    scans = generate_fresh_site_scans(config.data, 0, 2 * TRAIN)
    members, nonmembers = scans.subset(np.arange(TRAIN)), scans.subset(np.arange(TRAIN, 2 * TRAIN))
    sigma = 0.0
    if target_epsilon is not None:  # one site, one round of EPOCHS epochs
        sigma, _, _ = plan_site(num_examples=TRAIN, batch_size=config.training.batch_size, local_epochs=EPOCHS,
                                rounds=1, target_epsilon=target_epsilon, delta=config.privacy.delta)
    torch.manual_seed(0)
    model = build_model(config, members)
    train_locally(model, members, training=config.training, privacy=config.privacy, box_weight=1.0,
                  noise_multiplier=sigma, seed=0)
    return audit_model(model, members, nonmembers, box_weight=1.0, device="cpu")


@pytest.fixture
def one_thread():
    """Batches of 32 tiny images gain nothing from a second thread, and on a busy 2-core machine
    (CI, parallel jobs) two threads waiting on each other made this test 10-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_an_overfitted_model_gives_its_members_away_and_dp_sgd_hides_them(one_thread):
    # Execute: the same recipe, without DP and with DP-SGD at epsilon = 1
    plain = train_and_audit(target_epsilon=None)
    private = train_and_audit(target_epsilon=1.0)
    # Assert: the attack beats chance on the plain model, and is near chance under DP
    # (for 160 vs 160 the AUC of a blind attack has a standard deviation of about 0.03)
    assert plain["auc"] > 0.75
    assert private["auc"] < 0.6
    assert private["auc"] < plain["auc"] - 0.15
    assert plain["advantage"] > private["advantage"]
    assert plain["members"] == plain["nonmembers"] == TRAIN


# --- a run directory ---------------------------------------------------------------------------

TINY = ["data.image-size=16", "data.site-size=60", "model.width=4", "federation.sites=2", "training.device=cpu"]


def tiny_run(tmp_path):
    config = load_config(None, TINY)
    (tmp_path / "config.toml").write_text(config.to_toml())
    torch.manual_seed(0)
    model = MultiTaskNet(in_channels=1, num_classes=3, width=config.model.width)
    save_model(model, tmp_path / "global_model.pt", class_names=CLASS_NAMES)
    return config


def test_audit_run_writes_the_documented_json_and_the_roc_plot(tmp_path):
    # Prepare
    config = tiny_run(tmp_path)
    # Execute
    steps = []
    audit = audit_run(tmp_path, on_site=lambda done, total: steps.append((done, total)))
    # Assert
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written == json.loads(json.dumps(audit))
    assert {"auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "advantage", "members", "nonmembers",
            "curve", "sites", "nonmembers_from"} <= written.keys()
    assert 0 <= written["auc"] <= 1 and len(written["curve"]["fpr"]) == len(written["curve"]["tpr"])
    assert [s["site"] for s in written["sites"]] == [0, 1]
    train_sizes = [len(site_data(config.data, k, 2)[0]) for k in range(2)]
    assert [s["members"] for s in written["sites"]] == [s["nonmembers"] for s in written["sites"]] == train_sizes
    assert written["members"] == written["nonmembers"] == sum(train_sizes)
    assert (tmp_path / "audit_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert audit_run(tmp_path)["auc"] == audit["auc"]  # the same run gives the same audit
    assert steps == [(1, 2), (2, 2)]  # the progress bar: one step per site


def test_fedclinic_audit_adds_the_audit_to_the_runs_results_and_reports(tmp_path, capsys):
    from fedclinic.cli import main

    # Prepare: a finished run's results.json without an audit
    finished_results(tmp_path, tiny_run(tmp_path))
    # Execute
    assert main(["audit", str(tmp_path)]) == 0
    # Assert
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert results["audit"]["auc"] == audit["auc"] and "curve" not in results["audit"]
    assert f"AUC {audit['auc']:.3f}" in out
    assert f"written: {tmp_path / 'audit.json'}, {tmp_path / 'audit_roc.png'}, {tmp_path / 'results.json'}, " in out
    assert "Empirical audit" in (tmp_path / "report.md").read_text()
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()  # the ROC, embedded
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def finished_results(tmp_path, config) -> None:
    """The results.json of a 0-round run, written by the run's own recorder."""
    from fedclinic.data import server_test_set
    from fedclinic.evaluation import evaluate
    from fedclinic.model import load_model
    from fedclinic.report import RunRecorder

    model, test_set = load_model(tmp_path / "global_model.pt"), server_test_set(config.data)
    recorder = RunRecorder(tmp_path, config, started=0.0)
    recorder.central_round(0, {**evaluate(model, test_set, box_weight=1.0), "seconds": 0.1}, [])
    recorder.finish(model, CLASS_NAMES, [], strategy_seconds=0.0)


def test_synthetic_non_members_are_fresh_scans_of_the_site_never_its_own():
    config = load_config(None, TINY)
    train, val = site_data(config.data, 1, 2)
    # Execute
    members, nonmembers, source = audit_sets(config, 1)
    # Assert: members are training scans; no non-member is a scan the site holds
    held = {image.tobytes() for image in np.concatenate([train.images, val.images])}
    assert all(image.tobytes() in {t.tobytes() for t in train.images} for image in members.images)
    assert not any(image.tobytes() in held for image in nonmembers.images)
    assert "fresh" in source


def test_default_synthetic_sites_give_at_least_a_thousand_balanced_non_members():
    config = Config()
    sets = [audit_sets(config, k) for k in range(config.federation.sites)]
    assert sum(len(nonmembers) for _, nonmembers, _ in sets) >= MIN_NONMEMBERS
    assert all(len(members) == len(nonmembers) for members, nonmembers, _ in sets)


def test_file_data_uses_each_sites_validation_split(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{split}_{key}": value for split, n in (("train", 300), ("val", 20), ("test", 20)) for key, value in
              (("images", rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)),
               ("labels", (np.arange(n) % 3).astype(np.uint8)[:, None]))}
    np.savez(tmp_path / "data.npz", **arrays)
    config = load_config(None, [f"data.path={tmp_path / 'data.npz'}", "federation.sites=2"])
    # Execute
    members, nonmembers, source = audit_sets(config, 0)
    # Assert
    _, val = site_data(config.data, 0, 2)
    assert np.array_equal(nonmembers.images, val.images) and len(members) == len(val)
    assert "validation" in source


def test_a_run_without_a_model_or_a_directory_gives_one_clear_error(tmp_path):
    tiny_run(tmp_path)
    (tmp_path / "global_model.pt").unlink()
    with pytest.raises(AuditError, match="global_model.pt' does not exist"):
        audit_run(tmp_path)
    with pytest.raises(ValueError, match="run directory '.*nowhere' does not exist"):
        audit_run(tmp_path / "nowhere")


def test_a_model_that_does_not_fit_the_runs_data_is_refused(tmp_path):
    tiny_run(tmp_path)
    save_model(MultiTaskNet(in_channels=1, num_classes=2, width=4), tmp_path / "global_model.pt",
               class_names=("a", "b"))
    with pytest.raises(AuditError, match="2 classes"):
        audit_run(tmp_path)
