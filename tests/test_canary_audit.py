"""The one-run canary audit: its canaries, the coins kept from the sites, the evidence it reads off an update, a
broken DP-SGD flagged and the calibrated attack (in a real run: tests/test_full_run.py)."""

import dataclasses

import numpy as np
import pytest
import torch

import fedclinic.canary_audit as canary_audit_module
from fedclinic.analysis.audit import calibrated_scores, roc, true_class_confidence
from fedclinic.analysis.canaries import (clipped_gradients, draw_coins, flat, make_canaries, prepare, round_evidence,
                                         trained_names)
from fedclinic.canary_audit import canary_audit, share_out
from fedclinic.cli.privacy import privacy_bug_status
from fedclinic.clients.site import Site
from fedclinic.config import load_config
from fedclinic.data import server_test_set, site_data
from fedclinic.data.synthetic import generate_reference_scans
from fedclinic.model import initial_model, multitask_loss
from fedclinic.privacy.ledger import Ledger, make_plan

# three small sites, five rounds: a few seconds per audit
SMALL = ["federation.sites=3", "data.site-size=300", "federation.rounds=5", "privacy.target-epsilon=0.5",
         "personalize.epochs=0"]


def test_canaries_are_noise_scans_with_a_random_class_and_no_lesion():
    train, _ = site_data(load_config(None, []).data, 0, 5)
    canaries = make_canaries(np.random.default_rng(0), 500, like=train)
    assert canaries.images.shape == (500, *train.images.shape[1:]) and canaries.images.dtype == np.uint8
    assert canaries.images.std() > 60  # uniform noise over 0..255 (std 74), nothing like a scan
    assert set(canaries.labels) == {0, 1, 2} and canaries.class_names == train.class_names
    assert np.isnan(canaries.boxes).all()
    coins = draw_coins(np.random.default_rng(0), 10_000)
    assert 0.48 < coins.mean() < 0.52


@pytest.mark.parametrize("total, sizes", [(1000, [705, 557, 1487, 630, 592]), (7, [1, 1, 1]), (0, [3, 4])])
def test_the_canaries_are_shared_out_in_proportion_to_the_sites_and_none_is_lost(total, sizes):
    counts = share_out(total, sizes)
    assert sum(counts) == total
    assert all(abs(c - total * n / sum(sizes)) < 1 for c, n in zip(counts, sizes))


def test_clipped_gradients_are_single_example_backward_passes_clipped_to_the_norm():
    config = load_config(None, [])
    data, _ = site_data(config.data, 0, 5)
    data = data.subset(np.arange(6))
    model = initial_model(config, data)
    found = clipped_gradients(model, prepare(model, data), box_weight=1.0, clip=0.05)
    names = trained_names(model)
    for i in range(len(data)):  # the independent reference: autograd on the whole model, one image at a time
        model.zero_grad()
        x = torch.from_numpy(data.images[i:i + 1]).float() / 255
        loss, _ = multitask_loss(*model(x), torch.from_numpy(data.labels[i:i + 1]),
                                 torch.from_numpy(data.boxes[i:i + 1]), box_weight=1.0)
        loss.backward()
        g = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
        expected = g / max(1.0, float(g.norm()) / 0.05)
        assert torch.allclose(found[i], expected, atol=1e-6, rtol=1e-4)


def test_decoding_finds_exactly_the_canaries_an_update_was_built_from():
    # Prepare: one full-batch SGD step on the site's records and the canaries whose coin came up
    config = load_config(None, [])
    records, _ = site_data(config.data, 1, 5)
    model = initial_model(config, records)
    canaries = make_canaries(np.random.default_rng(1), 60, like=records)
    coins = draw_coins(np.random.default_rng(2), 60)
    prepared_canaries, prepared_records = prepare(model, canaries), prepare(model, records)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    names = trained_names(model)
    step = 0.01 * (clipped_gradients(model, prepared_canaries, box_weight=1.0, clip=1.0)[coins].sum(0)
                   + clipped_gradients(model, prepared_records, box_weight=1.0, clip=1.0).sum(0))
    reply, offset = dict(sent), 0
    for name in names:
        n = sent[name].numel()
        reply[name] = sent[name] - step[offset:offset + n].view_as(sent[name])
        offset += n
    # Execute
    evidence = round_evidence(model, sent, reply, prepared_canaries, prepared_records, box_weight=1.0, clip=1.0)
    # Assert: each canary's coefficient is its weight in the step, 0.01 or 0
    assert np.allclose(evidence["decoding"], np.where(coins, 0.01, 0.0), atol=1e-4)
    assert evidence["alignment"].shape == (60,) and np.all(np.abs(evidence["alignment"]) <= 1)
    assert torch.equal(flat(sent, names), flat(model.state_dict(), names))  # scored at the model sent


def test_the_sites_get_only_the_canaries_whose_coin_came_up_and_never_a_coin(tmp_path, monkeypatch):
    # Prepare: watch every call of the site's own training code
    config = load_config(None, SMALL[:-2] + ["federation.rounds=2"])
    seen = []
    real = canary_audit_module.train_round

    def watched(run_config, site, state_dict, *, server_round, proximal_mu=0.0):
        seen.append((run_config, site, server_round))
        return real(run_config, site, state_dict, server_round=server_round, proximal_mu=proximal_mu)

    monkeypatch.setattr(canary_audit_module, "train_round", watched)
    sizes = [len(site_data(config.data, k, 3)[0]) for k in range(3)]
    # the run's plans: what make_plan gives a site of the run's size, with a sigma of the run's own (1.5, 2, 2.5), which
    # a replayed site must take as it is rather than calibrate again
    plans = [dataclasses.replace(make_plan(num_examples=n, batch_size=config.training.batch_size, local_epochs=1,
                                           rounds=2, privacy=config.privacy, budget=config.privacy.target_epsilon,
                                           finetune_epochs=1), noise_multiplier=1.5 + k / 2)
             for k, n in enumerate(sizes)]
    # Execute
    audit = canary_audit(config, canaries=90, work_dir=tmp_path / "audit", seed=3, plans=plans)
    # Assert: a site trains on fresh reference scans plus exactly its canaries whose coin came up, as many
    # records as the run's site, so it keeps the run's plan (sigma)
    assert [(s.index, r) for _, s, r in seen] == [(k, r) for r in (1, 2) for k in range(3)]
    assert {f.name for f in dataclasses.fields(Site)} == {"index", "count", "state_dir", "data_path", "max_epsilon",
                                                          "records"}
    for run_config, site, _ in seen:
        k = site.index
        assert run_config == config  # the run's own configuration: it holds no coin and no auditor's seed
        records = site.records.images
        assert len(records) == sizes[k]
        reference = generate_reference_scans(config.data, k, sizes[k] - int(audit.coins[k].sum()))
        assert np.array_equal(records[:len(reference)], reference.images)
        coins, planted = audit.coins[k], audit.planted[k].images
        assert np.array_equal(records[len(reference):], planted[coins])
        left_out = {image.tobytes() for image in planted[~coins]}
        assert not left_out & {image.tobytes() for image in records}
    assert audit.canaries["included"] == np.concatenate(audit.coins).tolist()
    assert [Ledger.open(tmp_path / "audit" / f"site-{k}", site=k).plan for k in range(3)] == plans


def test_the_coins_come_from_the_auditors_own_random_source_not_from_the_configuration(tmp_path):
    config = load_config(None, SMALL[:-2] + ["federation.rounds=1"])
    first = canary_audit(config, canaries=200, work_dir=tmp_path / "a")
    second = canary_audit(config, canaries=200, work_dir=tmp_path / "b")
    assert not np.array_equal(np.concatenate(first.coins), np.concatenate(second.coins))


def test_a_dp_sgd_whose_noise_is_off_while_its_ledger_claims_sigma_is_flagged(tmp_path, monkeypatch, capsys):
    # Prepare: claimed epsilon 0.5 per site over 5 rounds; the same audit (seed 0) with the noise intact, then off
    config = load_config(None, SMALL)
    intact = canary_audit(config, canaries=600, work_dir=tmp_path / "intact", seed=0).summary
    import opacus.optimizers.optimizer as dp_optimizer

    # the test-only switch: Opacus's noise draws give zeros, nothing else changes
    monkeypatch.setattr(dp_optimizer, "_generate_noise",
                        lambda std, reference, generator=None, secure_mode=False: torch.zeros_like(reference))
    broken = canary_audit(config, canaries=600, work_dir=tmp_path / "broken", seed=0).summary
    # Assert: the ledgers claim the same sigma and epsilon either way ...
    for k in range(3):
        claimed = [Ledger.open(tmp_path / run / f"site-{k}", site=k) for run in ("intact", "broken")]
        assert claimed[0].plan.noise_multiplier == claimed[1].plan.noise_multiplier > 1
        assert claimed[0].epsilon() == pytest.approx(claimed[1].epsilon()) == pytest.approx(0.5, abs=1e-3)
    # ... the intact training stays below its epsilon, the broken one is caught above it
    assert not intact["likely_privacy_bug"] and intact["epsilon_lower_bound"] <= intact["epsilon"]
    assert all(s["epsilon_lower_bound"] <= s["epsilon"] for s in intact["sites"])
    assert broken["likely_privacy_bug"] and broken["sites_exceeding"]
    assert broken["epsilon_lower_bound"] > broken["epsilon"]
    # ... and the command line says so on stderr, failing only with --strict
    assert privacy_bug_status(intact, strict=True) == 0 and capsys.readouterr().err == ""
    assert privacy_bug_status(broken, strict=False) == 0
    assert privacy_bug_status(broken, strict=True) == 3
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 2 and all("LIKELY PRIVACY BUG" in line for line in said)
    assert all(f"site {k}:" in said[0] for k in broken["sites_exceeding"])


def test_true_class_confidence_is_the_log_odds_of_the_softmax():
    config = load_config(None, [])
    data = server_test_set(config.data).subset(np.arange(50))
    model = initial_model(config, data)
    found = true_class_confidence(model, data, device="cpu")
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(data.images).float() / 255)[0].double(), 1)
    p = p[torch.arange(50), torch.from_numpy(data.labels)].numpy()
    assert np.allclose(found, np.log(p / (1 - p)), atol=1e-6)


def test_calibration_finds_members_that_a_global_threshold_misses():
    # members are hard images the model learnt a little; non-members easy ones it never saw: a global threshold
    # on confidence calls the easy ones members, the per-image comparison with a reference does not
    rng = np.random.default_rng(0)
    difficulty = np.concatenate([rng.normal(-2, 1, 500), rng.normal(2, 1, 500)])  # members first
    reference = difficulty + rng.normal(0, 0.1, 1000)
    target = difficulty + np.r_[np.full(500, 0.5), np.zeros(500)] + rng.normal(0, 0.1, 1000)
    _, _, raw_auc = roc(-target[:500], -target[500:])
    scores = calibrated_scores(target, [reference])
    _, _, calibrated_auc = roc(-scores[:500], -scores[500:])
    assert raw_auc < 0.1 and calibrated_auc > 0.99
