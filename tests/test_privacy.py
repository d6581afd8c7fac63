"""Privacy arithmetic and the site ledger, checked against Google's dp-accounting."""

import json
import warnings

import dp_accounting
import pytest

from fedclinic.privacy.accounting import calibrate_noise, epsilon, make_accountant, plan_site, reachable, sample_rate
from fedclinic.privacy.ledger import Ledger, Plan

OPACUS_RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def reference_epsilon(history, delta, accountant):
    """Independent accountant: Google's dp-accounting (RDP, or PLD for PRV)."""
    if accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant(OPACUS_RDP_ORDERS)
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant, tolerance", [("rdp", 0.01), ("prv", 0.02)])
@pytest.mark.parametrize("sigma, q, steps, delta", [(0.9, 0.08, 52, 1e-5), (1.1, 0.01, 1000, 1e-5), (2.0, 0.2, 30, 1e-6)])
def test_epsilon_agrees_with_an_independent_accountant(accountant, tolerance, sigma, q, steps, delta):
    ours = epsilon([(sigma, q, steps)], delta=delta, accountant=accountant)
    ref = reference_epsilon([(sigma, q, steps)], delta, accountant)
    assert ours == pytest.approx(ref, rel=tolerance)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_cumulative_epsilon_is_epsilon_of_the_concatenated_history_and_grows(accountant):
    # Prepare: a site that trains 4 rounds of 13 steps at q = 1/13
    sigma, q, per_round, delta = 0.8, 1 / 13, 13, 1e-5
    ledger = Ledger(site=0, plan=Plan(sigma, q, per_round, 4, 8.0, delta, accountant))
    spent = []
    # Execute
    for k in range(1, 5):
        ledger.record(round=k, noise_multiplier=sigma, sample_rate=q, steps=per_round)
        spent.append(ledger.epsilon())
    # Assert: composing round by round == one accountant over all k * 13 steps
    for k, eps in enumerate(spent, start=1):
        assert eps == pytest.approx(epsilon([(sigma, q, k * per_round)], delta=delta, accountant=accountant), rel=1e-3)
    assert spent == sorted(spent) and spent[0] < spent[-1]
    assert spent[-1] == pytest.approx(reference_epsilon([(sigma, q, 4 * per_round)], delta, accountant), rel=0.02)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_sigma_meets_the_target_within_one_percent(accountant, target):
    q, steps, delta = 0.08, 50, 1e-5
    sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=accountant)
    eps = epsilon([(sigma, q, steps)], delta=delta, accountant=accountant)
    assert eps <= target * 1.0001
    assert eps >= target * 0.99


@pytest.mark.parametrize("target, q, steps", [(8.0, 0.5, 20), (8.0, 0.2, 50)])
def test_calibrated_sigma_is_the_smallest_that_meets_the_target_over_all_of_opacus_orders(target, q, steps):
    # the search runs over the integer orders first; at these settings the best order is a fractional one,
    # where the integer orders alone would give a sigma about 1% too large
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    accountant = make_accountant("rdp")  # Opacus's own, at all of its orders
    accountant.history = [(sigma, q, steps)]
    eps, best_order = accountant.get_privacy_spent(delta=1e-5)
    assert not float(best_order).is_integer()
    assert eps <= target
    accountant.history = [(sigma * (1 - 2e-4), q, steps)]
    assert accountant.get_epsilon(delta=1e-5) > target


def test_a_reachable_budget_is_said_so_without_warnings_about_orders_it_never_used():
    # the quick check over the integer orders alone ends at its smallest order, 2; over all orders the best is 1.9
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert reachable(target_epsilon=60.0, delta=1e-5, sample_rate=1.0, steps=10_000)
    assert [str(w.message) for w in seen] == []
    assert not reachable(target_epsilon=1e-6, delta=1e-5, sample_rate=1.0, steps=10_000)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
@pytest.mark.parametrize("target, q, steps", [(0.2, 0.5, 2000), (40.0, 0.5, 4)])
def test_a_sigma_beyond_the_first_brackets_is_found_too(target, q, steps):
    # a tiny budget over many steps needs sigma > 20 (the search's first bracket); a huge one sigma < 0.6
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    eps = epsilon([(sigma, q, steps)], delta=1e-5)
    assert target * 0.99 <= eps <= target * 1.0001
    assert sigma > 20 if target < 1 else sigma < 0.6


def test_site_plan_spends_exactly_its_budget_over_all_planned_rounds():
    sigma, q, per_round = plan_site(num_examples=700, batch_size=64, local_epochs=2, rounds=3,
                                    target_epsilon=3.0, delta=1e-5)
    assert q == pytest.approx(1 / 11) and per_round == 22  # ceil(700 / 64) = 11 batches per epoch
    assert epsilon([(sigma, q, 3 * per_round)], delta=1e-5) == pytest.approx(3.0, rel=0.01)
    assert sample_rate(num_examples=64, batch_size=64) == 1.0


def test_unknown_accountant_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown accountant 'gdpx'"):
        make_accountant("gdpx")


def test_an_impossible_budget_says_so():
    with pytest.raises(ValueError, match="no noise level reaches epsilon=1e-06"):
        calibrate_noise(target_epsilon=1e-6, delta=1e-5, sample_rate=1.0, steps=10_000)


def test_ledger_survives_a_restart(tmp_path):
    ledger = Ledger.open(tmp_path / "site-2", site=2)
    ledger.set_plan(Plan(1.0, 0.1, 10, 3, 5.0, 1e-5, "rdp"))
    ledger.record(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    before = ledger.epsilon()
    # a new process opens the same state directory
    again = Ledger.open(tmp_path / "site-2", site=2)
    assert again.rounds_trained == 1 and again.epsilon() == before > 0
    assert again.plan == ledger.plan


def test_a_corrupted_or_foreign_ledger_is_refused_not_reset(tmp_path):
    (tmp_path / "ledger.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not a readable fedclinic privacy ledger; refusing to reset it"):
        Ledger.open(tmp_path, site=0)
    (tmp_path / "ledger.json").write_text(json.dumps({"format": "fedclinic-ledger/1", "site": 4, "plan": None, "entries": []}))
    with pytest.raises(ValueError, match="belongs to site 4, not site 0"):
        Ledger.open(tmp_path, site=0)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_ledger_of_many_equal_rounds_has_the_epsilon_of_the_steps_composed_one_by_one(accountant):
    # Prepare: 6 rounds of one plan, and a second plan's round between them
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(1.1, 0.2, 10)] * 3 + [(0.9, 0.1, 7)] + [(1.1, 0.2, 10)] * 3
    reference = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    reference.history = list(history)  # Opacus's own accountant over every entry as it is
    # Execute
    eps = epsilon(history, delta=1e-5, accountant=accountant)
    # Assert
    assert eps == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_rdp_epsilon_is_opacus_rdp_accountants_bit_for_bit(seed):
    # the one-step RDP is kept per (sigma, q) and multiplied by the steps, as Opacus's compute_rdp does
    import random

    from opacus.accountants import RDPAccountant

    rng = random.Random(seed)
    history = [(rng.uniform(0.5, 5), rng.uniform(0.01, 0.5), rng.randint(1, 200)) for _ in range(rng.randint(1, 4))]
    reference = RDPAccountant()
    reference.history = list(history)
    for delta in (1e-5, 1e-3):
        assert epsilon(history, delta=delta) == reference.get_epsilon(delta=delta)
