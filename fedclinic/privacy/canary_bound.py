"""The one-run audit's lower bound on epsilon from canary guesses.

Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run"
(NeurIPS 2023): m canaries are each put into the training data or left out
by an independent fair coin. After training, the auditor guesses "in" for
some canaries and "out" for others and abstains on the rest: r guesses, v of
them right. If training is (eps, delta)-DP, v is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 5.2 and
Corollary 5.4), so any eps whose p-value for v is below 1 - confidence is
ruled out: the largest such eps is a lower bound on the true epsilon at that
confidence. This module computes that bound from the paper's statement; it
knows nothing of models, sites or Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import binom

# the guess counts tried by epsilon_lower_bound_from_scores, as shares of the canaries: each share is guessed
# "in" for that share's highest scores and "out" for as many of its lowest
GUESS_SHARES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability of `correct` or more right guesses out of `guesses` on `canaries` coin-flipped canaries,
    were training (epsilon, delta)-DP: Corollary 5.4's tail P[Binomial(r, q) >= v], q = e^eps / (1 + e^eps), plus
    its delta term 2 m delta max_i P[v > Binomial(r, q) >= v - i] / i."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"the audit needs 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"the audit tests epsilon >= 0 and 0 <= delta <= 1, not epsilon={epsilon}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))
    if correct == 0 or delta == 0:
        return min(tail, 1.0)
    below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))  # P[v > B >= v - i], i = 1..v
    worst = float(np.max(below / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * worst, 1.0)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, *, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` rule out at `confidence`: with probability
    at least `confidence`, training was not (eps, delta)-DP for any eps below it. 0 when nothing is ruled out."""
    if not 0 < confidence < 1:
        raise ValueError(f"the audit's confidence is a probability strictly between 0 and 1, not {confidence}")
    level = 1.0 - confidence
    if p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(canaries, guesses, correct, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        if p_value(canaries, guesses, correct, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def guess_counts(scores: np.ndarray, included: np.ndarray, guesses_in: int, guesses_out: int) -> tuple[int, int]:
    """(guesses, right ones) when the `guesses_in` highest scores are guessed in and the `guesses_out` lowest out."""
    order = np.argsort(scores, kind="stable")
    out_right = int(np.sum(~included[order[:guesses_out]]))
    in_right = int(np.sum(included[order[len(order) - guesses_in:]])) if guesses_in else 0
    return guesses_in + guesses_out, in_right + out_right


def epsilon_lower_bound_from_scores(scores: Sequence[float] | Mapping[str, Sequence[float]],
                                    included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                                    shares: Sequence[float] = GUESS_SHARES) -> dict:
    """The audit's bound from one score per canary (higher: more likely trained on) and the auditor's coins.

    `scores` is one guesser's scores, or {name: scores} of several guessers. Every guesser is tried at each
    share of GUESS_SHARES as k+ = k- = share * m guesses, and the best bound is kept; the confidence is split
    over every (guesser, share) tried (a union bound), so that choosing the best after the fact keeps the stated
    confidence. Returns the bound with the guesses and the guesser that gave it ("scores" for a single one)."""
    guessers = dict(scores) if isinstance(scores, Mapping) else {"scores": scores}
    included = np.asarray(included, dtype=bool)
    checked = {name: _checked(values, included) for name, values in guessers.items()}
    canaries = len(included)
    each = 1.0 - (1.0 - confidence) / (len(shares) * len(checked))
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0, "guesser": next(iter(checked))}
    for name, values in checked.items():
        for share in shares:
            k = max(1, min(canaries // 2, round(share * canaries)))
            guesses, correct = guess_counts(values, included, k, k)
            bound = epsilon_lower_bound(canaries, guesses, correct, delta=delta, confidence=each)
            if bound > best["epsilon_lower_bound"] or not best["guesses"]:
                best = {"epsilon_lower_bound": bound, "guesses": guesses, "correct": correct, "guesser": name}
    return {**best, "canaries": canaries, "confidence": confidence}


def _checked(scores: Sequence[float], included: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.shape != included.shape or scores.ndim != 1 or not len(scores):
        raise ValueError(f"the audit needs one score per canary: {scores.shape} scores for {included.shape} coins")
    if not np.all(np.isfinite(scores)):
        raise ValueError("the audit's canary scores must be finite numbers")
    return scores
