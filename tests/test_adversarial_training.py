"""Adversarial training at the sites: adversarial images in the local batches, the same DP accounting."""

import copy

import pytest
import torch
from opacus.grad_sample import GradSampleModule, wrap_model

from fedclinic.clients.site import Site, build_model, train_round
from fedclinic.clients.training import as_dataset, mix_adversarial, train_locally
from fedclinic.config import RobustnessConfig, load_config
from fedclinic.analysis.adversarial import perturb
from fedclinic.model import multitask_loss
from fedclinic.privacy.ledger import Ledger

from opacus_marks import NO_INPUT_GRADIENT

# 16 x 16 scans and a narrow model: each training run takes about a second on one core
SMALL = ["data.image-size=16", "data.site-size=200", "data.test-size=100", "training.batch-size=32",
         "training.local-epochs=1", "model.width=8", "training.device=cpu"]
EPS = 4 / 255
FGSM = [f"robustness.train-eps={EPS}", "robustness.train-attack=fgsm"]
# float rounding in x + delta - x: a change may exceed eps by this much
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the runs stay quick and reproducible on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SITE = Site(index=0, count=2, state_dir=None)


def site_model(config):
    """Site 0's training images and the model every run of these tests starts from."""
    train, _ = SITE.data(config)
    torch.manual_seed(0)
    return train, build_model(config, train)


def test_adversarial_dp_training_spends_exactly_the_privacy_of_clean_training(tmp_path):
    # Prepare: the same site, seed and starting model, trained clean and with FGSM examples
    # (no fine-tuning after the rounds: the two planned rounds spend the whole budget)
    planned = ["federation.rounds=2", "privacy.target-epsilon=4", "personalize.epochs=0"]
    clean_config = load_config(None, SMALL + planned)
    adv_config = load_config(None, SMALL + FGSM + planned)
    runs = {}
    for name, config in (("clean", clean_config), ("adversarial", adv_config)):
        site = Site(index=0, count=2, state_dir=tmp_path / name)
        state = site_model(config)[1].state_dict()
        # Execute: both planned rounds
        for r in (1, 2):
            state, metrics, reason = train_round(config, site, state, server_round=r)
            assert reason == ""
        runs[name] = (state, metrics, Ledger.open(tmp_path / name, site=0))
    # Assert: identical sigma, q, steps and epsilon; different weights
    (clean_state, clean_metrics, clean_ledger), (adv_state, adv_metrics, adv_ledger) = runs.values()
    assert adv_ledger.history == clean_ledger.history and len(adv_ledger.history) == 2
    assert adv_ledger.plan == clean_ledger.plan
    assert adv_metrics["epsilon"] == clean_metrics["epsilon"] == pytest.approx(4.0, rel=0.01)
    for key in ("sigma", "sample-rate", "steps"):
        assert adv_metrics[key] == clean_metrics[key]
    assert any(not torch.equal(adv_state[k], clean_state[k]) for k in clean_state)


def training_inputs(config):
    """Train one site's model with `config`; return the batches its training forward passes saw."""
    train, model = site_model(config)
    seen = []

    def record(module, args):
        # the attack's forward passes take images that require a gradient; the training step's do not
        if not args[0].requires_grad:
            seen.append(args[0].detach().clone())

    model.register_forward_pre_hook(record)
    result = train_locally(model, train, training=config.training, privacy=config.privacy,
                           robustness=config.robustness, box_weight=1.0, noise_multiplier=1.0, seed=7)
    return seen, model.state_dict(), result


@pytest.mark.parametrize(
    ("privacy_mode", "attack", "fraction"),
    [("local", ["robustness.train-attack=fgsm"], 0.5),
     ("off", ["robustness.train-attack=pgd", "robustness.steps=3"], 0.25)],
)
def test_the_training_step_sees_the_planned_share_of_perturbed_images(privacy_mode, attack, fraction):
    # Prepare: the same run clean and adversarial; same seed, so the same batches are drawn
    base = SMALL + [f"privacy.mode={privacy_mode}", f"robustness.train-eps={EPS}"]
    clean_config = load_config(None, base)
    adv_config = load_config(None, base + attack + [f"robustness.train-fraction={fraction}"])
    # Execute
    clean_batches, clean_weights, _ = training_inputs(clean_config)
    adv_batches, adv_weights, result = training_inputs(adv_config)
    # Assert: each batch is its clean batch with round(fraction * n) images moved within the eps-ball
    assert [b.shape for b in adv_batches] == [b.shape for b in clean_batches]
    assert len(adv_batches) == result.steps == -(-result.num_examples // 32)  # one epoch: ceil(n / B) batches
    for clean, adv in zip(clean_batches, adv_batches):
        change = (adv - clean).abs().flatten(1).amax(dim=1)
        assert int((change > 0).sum()) == round(fraction * len(clean))
        assert change.max() <= EPS + TOLERANCE
        assert adv.min() >= 0 and adv.max() <= 1
    if attack[0].endswith("fgsm"):  # FGSM moves every pixel by the whole budget (where [0, 1] allows)
        moved = torch.cat([(a - c).abs().flatten(1).amax(dim=1) for c, a in zip(clean_batches, adv_batches)])
        assert moved[moved > 0] == pytest.approx(EPS, abs=TOLERANCE)
    assert any(not torch.equal(adv_weights[k], clean_weights[k]) for k in clean_weights)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
@NO_INPUT_GRADIENT
def test_crafting_leaves_grads_and_per_sample_grads_as_a_plain_step_on_the_mixed_batch(mode):
    # Prepare: a batch, and the model wrapped as DP-SGD wraps it, with the gradients of a first step
    train, net = site_model(load_config(None, SMALL))
    images, labels, boxes = as_dataset(train)[:24]
    x = images.float() / 255
    reference = wrap_model(copy.deepcopy(net), grad_sample_mode=mode)
    wrapped = wrap_model(net, grad_sample_mode=mode)

    def gradients(model):
        # "ew" fills only p.grad_sample; p.grad stays None until the DP optimizer sets it
        return [(p.grad, p.grad_sample) for p in model.parameters()]

    def step(model, batch):
        model.zero_grad(set_to_none=True)
        logits, pred_boxes = model(batch)
        multitask_loss(logits, pred_boxes, labels, boxes, box_weight=1.0)[0].backward()
        return [tuple(None if g is None else g.clone() for g in pair) for pair in gradients(model)]

    def same(a, b):
        return a is b is None or (a is not None and b is not None and torch.equal(a, b))

    before = step(wrapped, x)
    generator = torch.Generator().manual_seed(0)
    robustness = RobustnessConfig(train_attack="pgd", steps=2, train_eps=EPS, train_fraction=0.5)
    # Execute
    mixed = mix_adversarial(wrapped, x, labels, boxes, robustness=robustness, generator=generator)
    after_crafting = gradients(wrapped)
    training_step = step(wrapped, mixed)
    # Assert: crafting changed half the images and no gradient; the step then matches a plain one
    assert int(((mixed - x).flatten(1).abs().amax(dim=1) > 0).sum()) == 12
    if isinstance(wrapped, GradSampleModule):
        assert wrapped.hooks_enabled  # switched back on for the training step
    for (grad, grad_sample), (grad_now, grad_sample_now) in zip(before, after_crafting):
        assert same(grad_now, grad) and same(grad_sample_now, grad_sample)
    for (grad, grad_sample), (grad_ref, grad_sample_ref) in zip(training_step, step(reference, mixed)):
        assert grad_sample.shape[0] == 24
        assert same(grad_sample, grad_sample_ref) and same(grad, grad_ref)


def test_a_dp_trained_model_comes_back_plain_to_train_again_and_to_attack():
    # Prepare: a site model, as a bench or a caller keeping the model between rounds holds it
    config = load_config(None, SMALL + FGSM)
    train, model = site_model(config)
    images, labels, boxes = as_dataset(train)[:8]
    # Execute: two DP rounds on the same model object, then an attack on it in eval mode
    for seed in (1, 2):
        train_locally(model, train, training=config.training, privacy=config.privacy, robustness=config.robustness,
                      box_weight=1.0, noise_multiplier=1.0, seed=seed)
    x_adv = perturb(model.eval(), images.float() / 255, labels, boxes, attack="pgd", eps=EPS, steps=2)
    # Assert: no Opacus state is left on the parameters, and the attack ran
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert (x_adv - images.float() / 255).abs().max() <= EPS + TOLERANCE
