"""The one-run audit's epsilon lower bound (Steinke, Nasr & Jagielski 2023) against the paper's worked values."""

import math

import numpy as np
import pytest
from scipy.stats import beta

from fedclinic.privacy.canary_bound import epsilon_lower_bound, epsilon_lower_bound_from_scores, guess_counts, p_value


@pytest.mark.parametrize("canaries, guesses, correct, delta, paper", [
    (100, 100, 75, 0.0, 0.702),      # Appendix D: m = r = 100, v = 75, delta = 0
    (100, 100, 75, 1e-4, 0.699),     # ... with delta = 1e-4
    (1000, 100, 75, 1e-4, 0.673),    # ... and 900 abstentions
    (100_000, 1510, 1439, 1e-5, 2.675),  # section 7's white-box DP-SGD audit, 95%
])
def test_the_bound_reproduces_the_papers_worked_values(canaries, guesses, correct, delta, paper):
    assert epsilon_lower_bound(canaries, guesses, correct, delta=delta, confidence=0.95) == pytest.approx(paper,
                                                                                                         abs=1e-3)


@pytest.mark.parametrize("guesses, correct", [(20, 20), (100, 75), (400, 260), (1000, 990)])
def test_without_delta_the_bound_is_the_clopper_pearson_limit_of_the_guess_accuracy(guesses, correct):
    # independent reference: with delta = 0 the bound is log(q / (1 - q)) for q the one-sided 95% Clopper-Pearson
    # lower limit of the accuracy correct / guesses
    q = beta.ppf(0.05, correct, guesses - correct + 1)
    assert epsilon_lower_bound(10_000, guesses, correct, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_guessing_no_better_than_a_coin_rules_nothing_out():
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 58, delta=1e-5) == 0.0  # within chance at 95%
    assert epsilon_lower_bound(1000, 0, 0, delta=1e-5) == 0.0


def test_the_p_value_grows_with_epsilon_and_with_delta():
    values = [p_value(1000, 200, 150, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < 1e-3 and values[-1] > 0.5
    assert p_value(1000, 200, 150, 1.0, 1e-3) > p_value(1000, 200, 150, 1.0, 0.0)


def test_impossible_counts_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"correct \(5\) <= guesses \(4\)"):
        p_value(10, 4, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        epsilon_lower_bound(10, 4, 3, delta=0.0, confidence=1.0)


def test_guess_counts_guess_in_for_the_highest_scores_and_out_for_the_lowest():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, True, True])
    assert guess_counts(scores, included, 1, 1) == (2, 2)   # 0.9 in (right), 0.1 out (right)
    assert guess_counts(scores, included, 2, 2) == (4, 2)   # 0.8 in and 0.2 out are wrong
    assert guess_counts(scores, included, 0, 1) == (1, 1)


def test_scores_that_reveal_the_coins_give_a_large_bound_and_scores_that_do_not_give_none():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    leaky = epsilon_lower_bound_from_scores(included + rng.normal(0, 0.1, 1000), included, delta=1e-5)
    assert leaky["epsilon_lower_bound"] > 3 and leaky["guesses"] == leaky["correct"]
    assert leaky["canaries"] == 1000 and leaky["confidence"] == 0.95
    blind = epsilon_lower_bound_from_scores(rng.normal(size=1000), included, delta=1e-5)
    assert blind["epsilon_lower_bound"] < 0.5


def test_the_best_of_several_guess_counts_keeps_its_confidence():
    # a union bound over the shares tried: under coins independent of the scores, a bound above 0 at 95% turns
    # up in at most about 5% of audits
    rng = np.random.default_rng(1)
    found = sum(epsilon_lower_bound_from_scores(rng.normal(size=200), rng.random(200) < 0.5,
                                                delta=1e-5)["epsilon_lower_bound"] > 0 for _ in range(200))
    assert found <= 20


def test_several_guessers_share_the_confidence_and_the_best_one_is_named():
    # Prepare: one guesser that reads the coins, two that guess blind
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    scores = {"blind": rng.normal(size=1000), "reader": included + rng.normal(0, 0.3, 1000),
              "other": rng.normal(size=1000)}
    # Execute
    found = epsilon_lower_bound_from_scores(scores, included, delta=1e-5)
    alone = epsilon_lower_bound_from_scores(scores["reader"], included, delta=1e-5)
    # Assert: the reader's bound, a little lower than alone (the confidence is split three ways, not one)
    assert found["guesser"] == "reader" and 0 < found["epsilon_lower_bound"] < alone["epsilon_lower_bound"]
    # ... and blind guessers together still find a bound above 0 in at most about 5% of audits
    hits = sum(epsilon_lower_bound_from_scores({k: rng.normal(size=200) for k in "abc"}, rng.random(200) < 0.5,
                                               delta=1e-5)["epsilon_lower_bound"] > 0 for _ in range(200))
    assert hits <= 20
