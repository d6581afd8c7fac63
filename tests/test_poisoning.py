"""A site that lies or breaks: the server's reply checks, the simulated attackers, Flower's robust aggregators."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedclinic.config import ROBUST, load_config
from fedclinic.data import site_data
from fedclinic.evaluation import backdoor_success_rate
from fedclinic.poisoning.attacks import BACKDOOR_SHARE, add_trigger, poison_data, poison_update
from fedclinic.poisoning.validation import clip_update, norm_outliers, reply_problem, update_norm
from fedclinic.report.schema import Results
from fedclinic.strategies.build import build_strategy
from fedclinic.strategies.server_optimizers import STRATEGIES as FLOWER_CLASSES
from test_strategy import Connected, global_model, numpy_of, random_sites, replies_to, reply, run_round

LOCAL = load_config(None, ["federation.min-sites=1"])


def model() -> dict:
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32), "steps": np.zeros((), np.int64)}


@pytest.mark.parametrize("change, said", [
    (lambda r: r.pop("b"), "missing ['b']"),
    (lambda r: r.update(extra=np.zeros(1, np.float32)), "unexpected ['extra']"),
    (lambda r: r.update(w=np.zeros((2, 3), np.float32)), "'w' has shape (2, 3), the model's is (3, 2)"),
    (lambda r: r.update(w=np.zeros((3, 2), np.float64)), "'w' is float64, the model's is float32"),
    (lambda r: r["b"].__setitem__(2, np.nan), "'b' holds non-finite values (NaN or inf)"),
    (lambda r: r["w"].__setitem__((0, 1), -np.inf), "'w' holds non-finite values (NaN or inf)"),
])
def test_a_reply_that_is_not_the_models_arrays_or_not_finite_is_named_in_one_sentence(change, said):
    sent, got = model(), model()
    assert reply_problem(sent, got) is None
    change(got)
    problem = reply_problem(sent, got)
    assert said in problem and "\n" not in problem


def test_an_update_far_outside_the_others_is_refused_and_the_rule_needs_three_replies():
    sent = model()
    # the norm of reply minus sent, over the float arrays only (the integer step counter is not an update)
    got = {**model(), "w": np.full((3, 2), 1.0, np.float32), "steps": np.array(7)}
    assert update_norm(sent, got) == pytest.approx(np.sqrt(6))
    norms = {0: 1.0, 1: 1.2, 2: 0.9, 3: 15.0, 4: 1.1}
    refused = norm_outliers(norms, ratio=10)
    assert list(refused) == [3]  # 15 / median(1.0, 1.2, 0.9, 1.1) = 14.3
    assert "14.3 times the median" in refused[3] and "federation.reply-norm-ratio=10" in refused[3]
    assert norm_outliers(norms, ratio=20) == {} and norm_outliers(norms, ratio=0) == {}
    assert norm_outliers({0: 1.0, 1: 50.0}, ratio=10) == {}  # two replies: who is to say which is far out


def test_the_largest_honest_site_is_kept_and_a_boosted_small_one_refused_by_norm_per_local_step(flower_task):
    # Prepare: five DP-SGD sites' update norms and local steps as measured in round 1 of a default run at eps 8
    # (data.seed 1: 2,415, 329, 199, 959 and 624 records, one epoch at an expected batch of 64)
    norms, steps = (46.6, 11.8, 9.1, 25.3, 18.3), (38, 5, 3, 15, 10)
    direction = np.ones(6, np.float32) / np.sqrt(6)

    def refused_with(attacker_boost: float) -> list[str]:
        sent_back = [(direction * norm * (attacker_boost if site == 1 else 1)).astype(np.float32)
                     for site, norm in enumerate(norms)]
        replies = [reply({"w": w}, n=64 * k, site=site, loss=0.5, eps=1.0, steps=k)
                   for site, (w, k) in enumerate(zip(sent_back, steps))]
        strategy = build_strategy(replace_ratio(LOCAL, 3), sites=5, rounds=2)
        strategy.configure_train(1, ArrayRecord({"w": torch.zeros(6)}), ConfigRecord(), Connected(5))
        strategy.aggregate_train(1, replies)
        return [m["refused"] for m in strategy.site_metrics]

    # Execute / Assert: raw norms put the largest site at 3.1 times the others' median; per square root of its
    # steps it is 1.4 times, so it is kept ...
    assert list(norm_outliers(dict(enumerate(norms)), ratio=3)) == [0]
    assert refused_with(attacker_boost=1) == [""] * 5
    # ... while a small site that sends its update boosted 10 times (sign-flip, scale) is still refused
    said = refused_with(attacker_boost=10)
    assert said[0] == said[2] == said[3] == said[4] == ""
    assert "8.6 times the median" in said[1] and "federation.reply-norm-ratio=3" in said[1]


def test_a_nan_reply_never_changes_the_global_model_and_is_counted_for_its_site(flower_task):
    # Prepare: the server sends a model; of three sites, site 1 sends NaN
    sent = {"w": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)}
    arrays = random_sites(3, (1, 2, 3))
    arrays[1]["w"][0, 0] = np.nan
    sizes = (100, 300, 600)
    replies = [reply(a, n=n, site=i, loss=0.5, eps=1.0) for i, (a, n) in enumerate(zip(arrays, sizes))]
    strategy = build_strategy(LOCAL, sites=3, rounds=2)
    strategy.configure_train(1, ArrayRecord({k: torch.tensor(v) for k, v in sent.items()}), ConfigRecord(), Connected(3))
    # Execute
    aggregate, metrics = strategy.aggregate_train(1, replies)
    # Assert: the weighted mean of sites 0 and 2 alone, by hand; site 1 is recorded as refused, with the reason
    for key in ("w", "b"):
        expected = (arrays[0][key] * 100 + arrays[2][key] * 600) / 700
        np.testing.assert_allclose(aggregate[key].numpy(), expected, rtol=1e-6)
    assert metrics["sites"] == 2
    assert [m["refused"] for m in strategy.site_metrics] == ["", "'w' holds non-finite values (NaN or inf)", ""]
    # a round whose every reply is NaN leaves the model where it was
    for a in arrays:
        a["b"][:] = np.nan
    strategy.configure_train(2, ArrayRecord({k: torch.tensor(v) for k, v in sent.items()}), ConfigRecord(), Connected(3))
    aggregate, _ = strategy.aggregate_train(2, [reply(a, n=n, site=i, loss=0.5, eps=1.0)
                                                for i, (a, n) in enumerate(zip(arrays, sizes))])
    assert aggregate is None


@pytest.mark.parametrize("name", ROBUST)
def test_each_robust_aggregator_is_flowers_class_and_keeps_a_boosted_sign_flip_out(name, flower_task):
    # Prepare: seven honest sites near w = 1, and one that sends its update negated and boosted 10 times
    config = load_config(None, [f"federation.strategy={name}", "federation.sites=8", "federation.min-sites=1",
                                "federation.krum-select=3", "federation.num-malicious=1"])
    rng = np.random.default_rng(0)
    honest = [{"w": (1 + 0.1 * rng.normal(size=6)).astype(np.float32)} for _ in range(7)]
    flipped = poison_update("sign-flip", {"w": torch.zeros(6)}, {"w": torch.ones(6)}, boost=10, seed=0)

    def aggregate_with(config):
        # fresh replies for each strategy: Flower's FedMedian and FedTrimmedAvg take the arrays out of them
        replies = [reply(a, n=100, site=i, loss=0.5, eps=1.0) for i, a in enumerate(honest)]
        replies.append(reply({"w": flipped["w"].numpy()}, n=100, site=7, loss=0.5, eps=1.0))
        strategy = build_strategy(replace_ratio(config, 0), sites=8, rounds=2)  # the norm rule off: the rule alone
        strategy.configure_train(1, ArrayRecord({"w": torch.zeros(6)}), ConfigRecord(), Connected(8))
        return strategy, strategy.aggregate_train(1, replies)[0]["w"].numpy()

    strategy, w = aggregate_with(config)
    assert type(strategy.strategy) is FLOWER_CLASSES[name][0]
    # Assert: the result stays among the honest sites, where FedAvg's mean is pulled below 0 ((7 - 10) / 8)
    assert np.all(w > 0.5) and np.all(w < 1.5), w
    assert np.all(aggregate_with(load_config(None, ["federation.min-sites=1"]))[1] < 0)


@pytest.mark.parametrize("name", [n for n in ROBUST if n != "bulyan"])  # Bulyan needs 7 sites for one attacker
def test_a_robust_aggregator_leaves_declined_sites_out_ends_the_run_and_resumes_as_if_never_stopped(name, flower_task):
    config = load_config(None, [f"federation.strategy={name}", "federation.min-sites=2", "federation.num-malicious=0",
                                "federation.krum-select=2"])
    x0 = global_model()
    # round 1: site 1 declines, so its unchanged model must not pull the median (or Krum's choice) toward x0
    replies, trained = replies_to(x0, seed=1, declined=(1,))
    strategy = build_strategy(config, sites=3, rounds=4)
    _, first, metrics = run_round(strategy, 1, x0, replies)
    again = build_strategy(config, sites=3, rounds=4)
    _, alone, _ = run_round(again, 1, x0, [m for m in replies_to(x0, seed=1)[0] if int(
        m.content["metrics"]["site"]) != 1])  # the same round with site 1 never asked
    assert metrics["sites"] == (1 if name == "krum" else 2)  # Krum keeps the one reply it chose, metrics too
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), alone[key].numpy())
    # a server restarted after round 1 aggregates round 2 as the one that never stopped
    restored = build_strategy(config, sites=3, rounds=4)
    restored.load_state_dict(strategy.state_dict(), finished_rounds=1)
    x1 = numpy_of(first)
    _, second, _ = run_round(strategy, 2, x1, replies_to(x1, seed=2)[0])
    _, resumed, _ = run_round(restored, 1, x1, replies_to(x1, seed=2)[0])  # Flower counts from 1 again
    for key in second:
        np.testing.assert_array_equal(second[key].numpy(), resumed[key].numpy())
    # a round in which no site trained moves nothing, and too few sites end the run
    _, none, _ = run_round(strategy, 3, x1, replies_to(x1, seed=3, declined=(0, 1, 2))[0])
    assert none is None and "only 0 site(s) trained" in strategy.stop_reason
    del trained


def replace_ratio(config, ratio):
    from fedclinic.config import replace
    return replace(config, federation={"reply_norm_ratio": ratio})


def test_the_update_attacks_send_what_their_definitions_say():
    sent = {"w": torch.tensor([1.0, 2.0, 3.0]), "count": torch.tensor(4)}
    trained = {"w": torch.tensor([2.0, 2.0, 1.0]), "count": torch.tensor(5)}
    update = trained["w"] - sent["w"]
    flip = poison_update("sign-flip", sent, trained, boost=10, seed=0)
    torch.testing.assert_close(flip["w"], sent["w"] - 10 * update)
    scale = poison_update("scale", sent, trained, boost=10, seed=0)
    torch.testing.assert_close(scale["w"], sent["w"] + 10 * update)
    noise = poison_update("noise", sent, trained, boost=10, seed=0)
    assert float(torch.linalg.norm(noise["w"] - sent["w"])) == pytest.approx(float(torch.linalg.norm(update)))
    assert not torch.allclose((noise["w"] - sent["w"]) / torch.linalg.norm(update), update / torch.linalg.norm(update))
    assert torch.isnan(poison_update("nan", sent, trained, boost=10, seed=0)["w"]).all()
    for sent_back in (flip, scale, noise):
        assert int(sent_back["count"]) == 5  # integer buffers go as trained
    assert poison_update("", sent, trained, boost=10, seed=0) is trained  # an honest site


def test_label_flip_gives_every_training_image_a_wrong_label_and_nothing_else_changes():
    train, _ = site_data(load_config(None, []).data, 0, 5)
    flipped = poison_data("label-flip", train)
    assert len(flipped) == len(train) and np.all(flipped.labels != train.labels)
    assert np.array_equal(flipped.images, train.images)
    assert set(np.unique(flipped.labels)) <= set(range(train.num_classes))
    assert poison_data("", train) is train


def test_a_backdoor_puts_the_trigger_on_half_the_images_labels_them_the_target_and_keeps_the_rest():
    train, _ = site_data(load_config(None, []).data, 0, 5)
    poisoned = poison_data("backdoor", train, target=0, seed=7)
    changed = np.flatnonzero((poisoned.images != train.images).any(axis=(1, 2, 3)) | (poisoned.labels != train.labels))
    assert len(poisoned) == len(train) and abs(len(changed) - BACKDOOR_SHARE * len(train)) <= 1
    triggered = add_trigger(train.images[changed])
    assert np.array_equal(poisoned.images[changed], triggered) and np.all(poisoned.labels[changed] == 0)
    # the trigger: a checkerboard of 0 and 255 in the bottom-right corner, the same on every image
    corner = triggered[:, :, -5:-1, -5:-1]
    assert set(np.unique(corner)) == {0, 255} and np.all(corner == corner[:1])
    kept = np.setdiff1d(np.arange(len(train)), changed)
    assert np.array_equal(poisoned.images[kept], train.images[kept]) and np.array_equal(poisoned.labels[kept],
                                                                                        train.labels[kept])
    # the same seed poisons the same images in every round
    assert np.array_equal(poison_data("backdoor", train, target=0, seed=7).images, poisoned.images)
    with pytest.raises(ValueError, match="federation.backdoor-target=3 is not a class of the data"):
        poison_data("backdoor", train, target=3, seed=7)


class Says(torch.nn.Module):
    """A model that answers class 0 when an image carries the trigger's corner and class 2 otherwise."""

    def forward(self, x):
        on = (x[:, 0, -5, -5] > 0.99) & (x[:, 0, -5, -4] < 0.01)
        logits = torch.stack([on.float(), torch.zeros(len(x)), (~on).float()], dim=1)
        return logits, torch.zeros(len(x), 4)


def test_the_backdoor_success_rate_is_the_share_of_triggered_images_of_other_classes_classified_as_the_target():
    _, test = site_data(load_config(None, []).data, 0, 5)
    # Execute / Assert: the target is 0: every image of another class is taken over by the trigger
    assert backdoor_success_rate(Says(), test, target=0) == 1.0
    # target 2: the model says 2 only without the trigger, so never on a triggered image of class 0 or 1
    assert backdoor_success_rate(Says(), test, target=2) == 0.0
    only_target = test.subset(np.flatnonzero(test.labels == 0))
    assert np.isnan(backdoor_success_rate(Says(), only_target, target=0))  # no image of another class


def test_clipping_scales_a_large_update_down_to_the_norm_and_leaves_a_small_one_and_integers_as_they_are():
    sent = {"w": np.ones(4, np.float32), "steps": np.array(3, np.int64)}
    big = {"w": np.array([4.0, 1.0, 1.0, 5.0], np.float32), "steps": np.array(9, np.int64)}  # update (3, 0, 0, 4)
    clipped = clip_update(sent, big, max_norm=1.0)
    np.testing.assert_allclose(clipped["w"], [1.6, 1.0, 1.0, 1.8], rtol=1e-6)  # the direction kept, norm 1
    assert update_norm(sent, clipped) == pytest.approx(1.0) and clipped["w"].dtype == np.float32
    assert int(clipped["steps"]) == 9
    assert clip_update(sent, big, max_norm=5.0) is big


def test_the_server_clips_every_kept_update_before_the_strategy_averages_it(flower_task):
    # Prepare: three sites move w from 0 by 1, 1 and 100 (a boosted one); the norm rule off, the clip at 2
    config = load_config(None, ["federation.min-sites=1", "federation.reply-norm-ratio=0",
                                "federation.update-clip-norm=2"])
    strategy = build_strategy(config, sites=3, rounds=2)
    strategy.configure_train(1, ArrayRecord({"w": torch.zeros(4)}), ConfigRecord(), Connected(3))
    updates = [np.full(4, 0.5, np.float32), np.full(4, 0.5, np.float32), np.full(4, 50.0, np.float32)]
    # Execute
    aggregate, _ = strategy.aggregate_train(1, [reply({"w": u}, n=100, site=i, loss=0.5, eps=1.0)
                                                for i, u in enumerate(updates)])
    # Assert: the mean of (0.5, 0.5, 1.0) per coordinate: the third update clipped from norm 100 to 2
    np.testing.assert_allclose(aggregate["w"].numpy(), np.full(4, 2 / 3), rtol=1e-6)
    assert [m["update-norm"] for m in strategy.site_metrics] == pytest.approx([1.0, 1.0, 100.0])


@pytest.mark.parametrize("settings, said", [
    (["federation.attack=nan"], "federation.attackers and federation.attack go together"),
    (["federation.attackers=1"], "federation.attackers and federation.attack go together"),
    (["federation.attackers=1", "federation.attack=flood"], "federation.attack must be one of label-flip"),
    (['federation.attackers="1;2"', "federation.attack=nan"], 'federation.attackers must look like "1,3"'),
    (["federation.attackers=9", "federation.attack=nan"], "federation.attackers names site 9, but the sites are "
                                                          "numbered 0 to 4"),
    (["federation.attackers=1", "federation.attack=scale", "federation.attack-boost=0"],
     "federation.attack-boost must be > 0"),
    (["federation.reply-norm-ratio=1"], "federation.reply-norm-ratio must be 0 (off) or above 1"),
    (["federation.trim-beta=0.5"], "federation.trim-beta must be in [0, 0.5)"),
    (["federation.num-malicious=-1"], "federation.num-malicious must be >= 0"),
    (["federation.krum-select=0"], "federation.krum-select must be at least 1"),
    (["federation.strategy=multikrum", "federation.krum-select=6"], "federation.krum-select=6 is more than"),
    (["federation.strategy=bulyan"], "federation.strategy=bulyan needs at least 4 * federation.num-malicious + 3 = 7"),
    (["federation.strategy=krum", "privacy.mode=central"], "privacy.mode=central cannot be combined with "
                                                           "federation.strategy=krum"),
    (["federation.attackers=1", "federation.attack=backdoor", "federation.backdoor-target=3"],
     "federation.backdoor-target=3 is not a class of the data, whose classes are 0 healthy, 1 benign, 2 malignant"),
    (["federation.backdoor-target=-1"], "federation.backdoor-target must be a class index >= 0"),
    (["federation.update-clip-norm=-1"], "federation.update-clip-norm must be >= 0"),
])
def test_every_poisoning_key_refuses_a_bad_value_in_one_sentence(settings, said, capsys):
    from fedclinic.cli import main

    code = main(["simulate", "--set", "federation.rounds=1", *[a for s in settings for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert said in err, err


@pytest.mark.slow
def test_a_simulated_nan_site_is_refused_every_round_and_the_robust_run_learns_without_it(tmp_path):
    # Prepare: 4 sites, site 3 sends NaN weights from its real ClientApp; the server takes the coordinate median
    settings = ["federation.sites=4", "federation.rounds=2", "federation.min-sites=2", "data.site-size=150",
                "data.test-size=100", "training.batch-size=32", "federation.attackers=3", "federation.attack=nan",
                "federation.strategy=fedmedian", "federation.client-cpus=2", "personalize.epochs=0",
                "robustness.enabled=false", "compression.enabled=false", "explain.enabled=false",
                "privacy.audit=false", f'output.dir="{tmp_path}"', 'output.name="nan"']
    proc = subprocess.run([sys.executable, "-m", "fedclinic.cli", "simulate", "--quiet",
                           *[a for s in settings for a in ("--set", s)]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "nan"
    results = json.loads((run / "results.json").read_text())
    # Assert: site 3 refused in both rounds with the reason, the others aggregated, the model is finite and learned
    by_site = {s["site"]: s for s in results["sites"]}
    assert by_site[3]["refused"] == 2 and "holds non-finite values" in by_site[3]["refused_reason"]
    assert all(by_site[k]["refused"] == 0 and "refused_reason" not in by_site[k] for k in (0, 1, 2))
    assert Results.from_dict(results).to_dict() == results  # the schema reads and writes the new keys as written
    assert by_site[3]["epsilon"] > 0  # an attacker is a site: it trained, and its ledger charged it
    assert [r["sites_trained"] for r in results["rounds"][1:]] == [3, 3]
    state = torch.load(run / "global_model.pt", weights_only=False)
    weights = state["state_dict"] if "state_dict" in state else state
    assert all(torch.isfinite(v).all() for v in weights.values() if torch.is_tensor(v) and v.is_floating_point())
    assert results["final"]["accuracy"] > results["rounds"][0]["accuracy"]
    assert "round 1: site 3's reply is refused and left out: " in (run / "flower.log").read_text()
    report = (run / "report.md").read_text()
    assert "## Under poisoning" in report and "Site 3 keeps failing" in report
    assert "ran `nan`" in report and "`fedmedian`" in report
