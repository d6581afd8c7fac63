"""A site's round: local DP-SGD with Opacus, its ledger, and the plain baseline."""

import subprocess
import sys

import pytest
import torch

from fedclinic.clients.site import Site, build_model, evaluate_round, train_round
from fedclinic.clients.training import train_locally
from fedclinic.config import load_config
from fedclinic.data import site_data
from fedclinic.privacy.accounting import epsilon
from fedclinic.privacy.ledger import Ledger

from opacus_marks import NO_INPUT_GRADIENT

SMALL = ["data.site-size=200", "data.test-size=100", "training.batch-size=32"]


def initial_state(config, site):
    train, _ = site.data(config)
    torch.manual_seed(0)
    return build_model(config, train).state_dict()


def test_dp_rounds_spend_the_planned_budget_and_persist_it(tmp_path):
    # Prepare: one site that plans 3 rounds at epsilon = 3, and no fine-tuning after them (the plan that
    # includes it: test_personalize.py)
    config = load_config(None, SMALL + ["federation.rounds=3", "privacy.target-epsilon=3", "personalize.epochs=0"])
    site = Site(index=1, count=3, state_dir=tmp_path / "site-1")
    state = initial_state(config, site)
    spent = []
    # Execute: all three planned rounds
    for r in (1, 2, 3):
        state, metrics, _ = train_round(config, site, state, server_round=r)
        spent.append(metrics["epsilon"])
    # Assert: epsilon is cumulative, reaches the target at the last planned round, and is on disk
    ledger = Ledger.open(tmp_path / "site-1", site=1)
    assert ledger.rounds_trained == 3 and metrics["rounds-trained"] == 3
    assert spent[0] < spent[1] < spent[2] == pytest.approx(3.0, rel=0.01)
    assert spent[2] == pytest.approx(epsilon(ledger.history, delta=1e-5), rel=1e-9)
    train, _ = site.data(config)
    batches = -(-len(train) // 32)  # Poisson sampling at q = 1 / ceil(n / B), ceil(n / B) steps an epoch
    assert [e.steps for e in ledger.entries] == [config.training.local_epochs * batches] * 3
    assert metrics["sample-rate"] == pytest.approx(1 / batches)
    assert metrics["num-examples"] == len(train) and metrics["sigma"] == ledger.plan.noise_multiplier > 0


def test_dp_training_changes_the_model_and_returns_plain_keys(tmp_path):
    config = load_config(None, SMALL)
    site = Site(index=0, count=2, state_dir=None)
    before = initial_state(config, site)
    after, _, _ = train_round(config, site, before, server_round=1)
    assert after.keys() == before.keys()  # no Opacus "_module." prefix reaches the server
    assert any(not torch.equal(after[k], before[k]) for k in before)


# run in a fresh interpreter: this test process has long imported Opacus (other tests, the ledger)
OPACUS_LOADED_AFTER = """
import sys
from fedclinic.clients.training import train_locally
from fedclinic.config import load_config
from fedclinic.data import site_data
from fedclinic.model import build_model
config = load_config(None, {settings!r})
train, _ = site_data(config.data, 0, 2)
result = train_locally(build_model(config, train), train, training=config.training, privacy=config.privacy,
                       box_weight=1.0, noise_multiplier=1.0, seed=0)
print(result.noise_multiplier, result.sample_rate, "opacus" in sys.modules)
"""


@pytest.mark.parametrize("mode, loaded", [("off", "0.0 1.0 False"), ("local", "True")])
def test_the_non_private_baseline_never_imports_opacus_and_dp_does(mode, loaded):
    code = OPACUS_LOADED_AFTER.format(settings=SMALL + [f"privacy.mode={mode}"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(loaded)


def test_the_non_private_baseline_reports_no_epsilon():
    config = load_config(None, SMALL + ["privacy.mode=off"])
    train, _ = site_data(config.data, 0, 2)
    _, metrics, _ = train_round(config, Site(0, 2, None), build_model(config, train).state_dict(), server_round=1)
    assert metrics["epsilon"] == 0.0 and metrics["sigma"] == 0.0


def test_non_private_local_training_learns_the_site_task():
    config = load_config(None, ["data.site-size=600", "privacy.mode=off", "training.local-epochs=3",
                                "training.learning-rate=0.05"])
    site = Site(index=0, count=1, state_dir=None)
    state = initial_state(config, site)
    before = evaluate_round(config, site, state)
    state, _, _ = train_round(config, site, state, server_round=1)
    after = evaluate_round(config, site, state)
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert after["loss"] < before["loss"]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_every_offered_grad_sample_mode_trains_and_takes_the_planned_steps(mode):
    config = load_config(None, SMALL + [f"privacy.grad-sample-mode={mode}", "training.local-epochs=1"])
    train, _ = site_data(config.data, 0, 3)
    model = build_model(config, train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_locally(model, train, training=config.training, privacy=config.privacy,
                           box_weight=1.0, noise_multiplier=1.0, seed=0)
    assert result.steps == -(-len(train) // 32)
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)


@NO_INPUT_GRADIENT
def test_fedprox_term_reaches_each_per_example_gradient_before_clipping():
    # Prepare: a model moved away from the global weights it started from, and Opacus's per-example gradients
    from opacus import GradSampleModule

    from fedclinic.clients.training import add_proximal_gradient
    from fedclinic.model import multitask_loss

    config = load_config(None, SMALL)
    train, _ = site_data(config.data, 0, 2)
    torch.manual_seed(0)
    model = build_model(config, train)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.from_numpy(train.images[:6]).float() / 255
    y, boxes = torch.from_numpy(train.labels[:6]), torch.as_tensor(train.boxes[:6])
    mu = 0.7
    wrapped = GradSampleModule(model)
    logits, pred = wrapped(x)
    multitask_loss(logits, pred, y, boxes, box_weight=1.0)[0].backward()
    # Execute
    params = list(model.parameters())
    add_proximal_gradient(params, anchor, mu, private=True)
    # Assert: row i is the gradient of example i's loss + mu/2 ||w - w_global||^2, by plain autograd
    plain = build_model(config, train)
    plain.load_state_dict(model.state_dict())
    for i in range(6):
        plain.zero_grad()
        logits, pred = plain(x[i:i + 1])
        loss = multitask_loss(logits, pred, y[i:i + 1], boxes[i:i + 1], box_weight=1.0)[0]
        loss = loss + mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(plain.parameters(), anchor))
        loss.backward()
        for p, reference in zip(params, plain.parameters()):
            torch.testing.assert_close(p.grad_sample[i], reference.grad, rtol=1e-4, atol=1e-6)


def test_under_dp_fedprox_keeps_the_site_model_nearer_the_global_one():
    # Prepare: the same site, seed, batches and noise; only mu differs
    config = load_config(None, SMALL + ["training.local-epochs=3"])
    train, _ = site_data(config.data, 0, 2)

    def distance_travelled(mu):
        torch.manual_seed(0)
        model = build_model(config, train)
        start = [p.detach().clone() for p in model.parameters()]
        train_locally(model, train, training=config.training, privacy=config.privacy, box_weight=1.0,
                      noise_multiplier=0.5, seed=3, proximal_mu=mu)
        return sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start)).sqrt().item()

    # Execute
    free, pulled = distance_travelled(0.0), distance_travelled(5.0)
    # Assert: the proximal pull survives Opacus's clipping and noise
    assert pulled < 0.9 * free


@NO_INPUT_GRADIENT
def test_a_records_augmented_views_give_one_gradient_the_mean_of_theirs_before_clipping():
    # Prepare: 4 records seen through 3 scanner views each, Opacus's per-row gradients
    from opacus import GradSampleModule

    from fedclinic.clients.training import average_views
    from fedclinic.data.augment import scanner_views
    from fedclinic.model import multitask_loss

    config = load_config(None, SMALL)
    train, _ = site_data(config.data, 0, 2)
    torch.manual_seed(0)
    model = build_model(config, train)
    records, views = 4, 3
    x = torch.from_numpy(train.images[:records]).float() / 255
    y, boxes = torch.from_numpy(train.labels[:records]), torch.as_tensor(train.boxes[:records])
    seen = scanner_views(x, views=views, generator=torch.Generator().manual_seed(1))
    logits, pred = GradSampleModule(model)(seen)
    multitask_loss(logits, pred, y.repeat_interleave(views), boxes.repeat_interleave(views, 0), box_weight=1.0)[0].backward()
    # Execute
    average_views(list(model.parameters()), records=records, views=views)
    # Assert: one gradient per record, that of its views' mean loss, by plain autograd
    plain = build_model(config, train, model.state_dict())
    for i in range(records):
        plain.zero_grad()
        rows = slice(i * views, (i + 1) * views)
        logits, pred = plain(seen[rows])
        multitask_loss(logits, pred, y[i].repeat(views), boxes[i:i + 1].repeat(views, 1), box_weight=1.0)[0].backward()
        for p, reference in zip(model.parameters(), plain.parameters()):
            assert p.grad_sample.shape[0] == records
            torch.testing.assert_close(p.grad_sample[i], reference.grad, rtol=1e-4, atol=1e-6)


def test_under_dp_opacus_clips_one_gradient_per_record_however_many_views_it_was_seen_through(tmp_path, monkeypatch):
    # Prepare: a DP round with 3 views per record; spies on how many records each batch holds
    # (as the augmentation receives them) and how many gradients Opacus's optimizer clips
    from opacus.optimizers.optimizer import DPOptimizer

    import fedclinic.clients.training as training

    records, clipped, norms = [], [], []
    views = training.scanner_views

    def spy_views(x, **kwargs):
        records.append(len(x))
        return views(x, **kwargs)

    clip = DPOptimizer.clip_and_accumulate

    def spy_clip(self):
        clipped.append(self.params[0].grad_sample.shape[0])
        per_example = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in self.params], dim=1).norm(dim=1)
        factors = (self.max_grad_norm / (per_example + 1e-6)).clamp(max=1.0)
        norms.append((per_example * factors).max().item() if len(per_example) else 0.0)
        return clip(self)

    monkeypatch.setattr(training, "scanner_views", spy_views)
    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy_clip)
    config = load_config(None, SMALL + ["training.augment-views=3"])
    site = Site(index=0, count=2, state_dir=tmp_path)
    # Execute
    _, metrics, _ = train_round(config, site, initial_state(config, site), server_round=1)
    # Assert: every optimizer step clipped exactly one gradient per sampled record, each at most
    # the clipping norm: the views cost no privacy
    assert metrics["steps"] == len(clipped) == len(records) > 0
    assert clipped == records
    assert max(norms) <= config.privacy.max_grad_norm + 1e-5


def test_scanner_views_change_intensities_only_and_come_record_by_record():
    from fedclinic.data.augment import scanner_views

    x = torch.rand(5, 1, 16, 16)
    seen = scanner_views(x, views=2, generator=torch.Generator().manual_seed(0))
    again = scanner_views(x, views=2, generator=torch.Generator().manual_seed(0))

    assert seen.shape == (10, 1, 16, 16) and torch.equal(seen, again)
    assert 0 <= seen.min() and seen.max() <= 1
    assert not torch.equal(seen[0], seen[1])  # two different scanners
    # every view is its own record seen differently: nearer its own image than any other record's
    distance = torch.cdist(seen.flatten(1), x.flatten(1))
    assert (distance.argmin(dim=1) == torch.arange(5).repeat_interleave(2)).all()


@pytest.mark.parametrize("settings", [["training.augment-views=3"], ["training.augment=none"],
                                      ["training.schedule=constant"]])
def test_the_recipe_leaves_what_the_ledger_records_and_epsilon_unchanged(tmp_path, settings):
    # Prepare: the default recipe (scanner augmentation, 1 view, cosine schedule) against a variant of it
    import dp_accounting

    def round_one(extra, where):
        config = load_config(None, SMALL + ["federation.rounds=2", *extra])
        site = Site(index=0, count=2, state_dir=where)
        _, metrics, _ = train_round(config, site, initial_state(config, site), server_round=1)
        return config, Ledger.open(where, site=0), metrics

    # Execute
    _, default, _ = round_one([], tmp_path / "default")
    config, variant, metrics = round_one(settings, tmp_path / "variant")
    # Assert: the same release (sigma, q, steps), and epsilon by Google's accountant, not Opacus's
    assert variant.history == default.history and variant.plan == default.plan
    sigma, q, steps = variant.history[0]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert metrics["epsilon"] == pytest.approx(accountant.get_epsilon(config.privacy.delta), rel=1e-3)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_site_smaller_than_the_batch_takes_all_its_records_each_step_and_spends_the_gaussian_mechanisms_epsilon(
        tmp_path, recwarn, accountant):
    # Prepare: a site of 200 records (160 after its validation split) and an expected batch of 5,000
    import dp_accounting

    config = load_config(None, SMALL + ["training.batch-size=5000", "training.local-epochs=3", "federation.rounds=2",
                                        "personalize.epochs=0", f"privacy.accountant={accountant}"])
    site = Site(index=0, count=2, state_dir=tmp_path / "site-0")
    train, _ = site.data(config)
    # Execute
    state, metrics, _ = train_round(config, site, initial_state(config, site), server_round=1)
    # Assert: one full-batch step per epoch (Poisson sampling at rate 1), and epsilon is that of 3 Gaussian
    # mechanisms, composed without sampling by Google's accountants (RDP; PLD for Opacus's PRV, which is tighter)
    ledger = Ledger.open(tmp_path / "site-0", site=0)
    assert metrics["sample-rate"] == 1.0 and metrics["steps"] == 3 and [e.steps for e in ledger.entries] == [3]
    assert metrics["num-examples"] == len(train) < 5000
    event = dp_accounting.GaussianDpEvent(metrics["sigma"])
    if accountant == "rdp":
        reference = dp_accounting.rdp.RdpAccountant([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    else:
        reference = dp_accounting.pld.PLDAccountant()
    reference.compose(event, 3)
    assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(config.privacy.delta), rel=1e-2)
    assert all(torch.isfinite(v).all() for v in state.values())
    # log(1 - q) at q = 1 is -inf in Opacus's PRV formula: no warning at each of the ledger's questions
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_the_cosine_schedule_falls_from_the_full_rate_to_a_tenth_over_the_rounds():
    from fedclinic.clients.training import round_lr_scale

    cosine, constant = load_config(None, []).training, load_config(None, ["training.schedule=constant"]).training

    scales = [round_lr_scale(cosine, r, 5) for r in range(1, 6)]

    assert scales[0] == 1.0 and scales[-1] == pytest.approx(0.1)
    assert scales == sorted(scales, reverse=True) and scales[2] == pytest.approx(0.55)
    assert [round_lr_scale(constant, r, 5) for r in range(1, 6)] == [1.0] * 5
    assert round_lr_scale(cosine, 1, 1) == 1.0


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_an_empty_poisson_batch_is_still_a_counted_step_of_noise_alone(mode):
    # Prepare: a private model whose Poisson batches are empty, as a batch of a small site can be
    from fedclinic.clients.training import noise_only_step, privacy_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.GroupNorm(4, 40), torch.nn.Linear(40, 30))
    before = [p.detach().clone() for p in model.parameters()]
    sigma, clip, batch, size = 2.0, 0.5, 8, 80
    data = torch.utils.data.TensorDataset(torch.zeros(size, 50))
    engine = privacy_engine("rdp")  # the secure-RNG warning once per process, as in a run
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=torch.utils.data.DataLoader(data, batch_size=batch), noise_multiplier=sigma,
        max_grad_norm=clip, poisson_sampling=True, grad_sample_mode=mode)
    params = [p for p in model.parameters() if p.requires_grad]
    # Execute
    noise_only_step(optimizer, params)
    # Assert: the update is Gaussian noise of std sigma * C / (expected batch), and the accountant saw one step
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    assert moved.mean().abs() < 0.01
    assert moved.std().item() == pytest.approx(sigma * clip / batch, rel=0.05)
    assert engine.accountant.history == [(sigma, batch / size, 1)]
