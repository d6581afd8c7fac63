"""Privacy budget arithmetic: epsilon of a history of DP-SGD releases, and sigma for a target.

Pure functions over a history of `(noise_multiplier, sample_rate, steps)`
entries, the same shape Opacus's accountants keep. A site's history holds
every round it trained in, so its epsilon composes over the whole training.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Iterable

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import MAX_SIGMA
from scipy.optimize import brentq

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

Release = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant by name ("rdp" or "prv")."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; expected one of {sorted(ACCOUNTANTS)}") from None


def merged(history: Iterable[Release]) -> list[Release]:
    """The history with the steps of equal (sigma, q) summed, in order of first appearance.

    Composing T steps of one Gaussian mechanism is the same mechanism
    composed T times, however the steps were split into rounds: RDP adds up
    per step and the PRV accountant composes by counts, so epsilon does not
    change. Opacus's RDP accountant evaluates every entry afresh (about 70 ms
    each here), so a site's ledger of one entry per round would cost seconds
    per round late in a run.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, t in history:
        if t > 0:
            key = (float(sigma), float(q))
            steps[key] = steps.get(key, 0) + int(t)
    return [(sigma, q, t) for (sigma, q), t in steps.items()]


def epsilon(history: Iterable[Release], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of all releases in `history` composed; 0 for an empty history."""
    history = merged(history)
    if not history:
        return 0.0
    return _epsilon(tuple(history), float(delta), accountant)


# Pure functions of their arguments, and a site asks the same questions again: the epsilon after its next
# round is the epsilon of its ledger a round later, and every process of a run plans the same sites.
# Opacus's RDP evaluation at a sample rate of 1/2 costs about 0.2 s, its calibration about 3 s.
@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[Release, ...], delta: float, accountant: str) -> float:
    if accountant == "rdp":  # Opacus's RDPAccountant.get_epsilon, with each (sigma, q)'s RDP of one step kept
        rdp = sum([_rdp_at(sigma, q, ORDERS) * steps for sigma, q, steps in history])
        return float(rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])
    acc = make_accountant(accountant)
    acc.history = list(history)
    # Opacus's PRV of a step at sample rate 1 (a site smaller than its batch) takes log(1 - q) = -inf, which its
    # formula handles (every t lies above it), but numpy warns of the division by zero at every evaluation
    full_batch = any(q == 1.0 for _, q, _ in history)
    with np.errstate(divide="ignore") if full_batch else contextlib.nullcontext():
        return float(acc.get_epsilon(delta=delta))


ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
# Opacus's RDP of an integer order is a short closed sum (microseconds); of a fractional one (1.1 to 10.9), a
# series that takes milliseconds at the sample rates of small sites: nearly all of an evaluation's cost
INTEGER_ORDERS = tuple(a for a in ORDERS if float(a).is_integer())


# A site's ledger grows by one round at a time at the same (sigma, q), and its hard stop asks for the epsilon of
# one round more: RDP is linear in the steps (Opacus's compute_rdp is the one-step RDP times the steps), so the
# one-step RDP at Opacus's orders, about 0.1 s each, is computed once per (sigma, q), not once per question
@functools.lru_cache(maxsize=1024)
def _rdp_at(sigma: float, q: float, orders: tuple[float, ...]):
    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))


def _rdp_spent(sigma: float, q: float, steps: int, delta: float, orders: tuple[float, ...]) -> tuple[float, float]:
    """(epsilon, its best order) of `steps` steps, minimised over `orders` only: never below the epsilon over all
    of Opacus's orders, and equal to it when the best of those is among `orders`."""
    eps, best = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=_rdp_at(sigma, q, orders) * steps, delta=delta)
    return float(eps), float(best)


def steps_per_epoch(*, num_examples: int, batch_size: int) -> int:
    """Optimizer steps of one epoch, as Opacus's Poisson loader takes them."""
    return math.ceil(num_examples / batch_size)


def sample_rate(*, num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q; Opacus derives it as 1 / (batches per epoch)."""
    return 1 / steps_per_epoch(num_examples=num_examples, batch_size=batch_size)


# the first upper bracket of Opacus's calibration (get_noise_multiplier doubles sigma from 10)
FIRST_BRACKET = 20.0


def reachable(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> bool:
    """Whether any noise level (up to the one Opacus's calibration tries last) meets the target.

    Epsilon falls as sigma grows, so the target is reachable when Opacus's
    first bracket already meets it (almost always; with RDP, asked first at
    the integer orders alone, which costs microseconds), else exactly when
    its last one does (at a sample rate of 1/2 that evaluation alone takes
    seconds).
    """
    if accountant == "rdp":  # epsilon over the integer orders bounds it from above: when that meets the target, so
        with warnings.catch_warnings(record=True):  # does the whole; its best order says nothing about the whole's
            warnings.simplefilter("always")
            if _rdp_spent(FIRST_BRACKET, sample_rate, steps, delta, INTEGER_ORDERS)[0] <= target_epsilon:
                return True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        return any(epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant) <= target_epsilon
                   for sigma in (FIRST_BRACKET, MAX_SIGMA))


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest sigma (within 0.1% of target epsilon) whose epsilon after `steps` is <= target.

    Opacus's `get_noise_multiplier` bisects sigma: about 17 evaluations of its
    accountant, 0.2-0.4 s each at the default RDP orders (paid by every
    simulated worker in round 1). log(epsilon) is smooth and monotone in
    log(sigma), so Brent's method (scipy) on that curve finds the same sigma
    in 7 to 10 evaluations; a last step up by 0.01% settles a root that lands a
    hair above the target.

    With RDP, the search first runs over Opacus's integer orders alone, whose
    epsilon is never below the one over all orders. At its root the epsilon
    over all orders is evaluated once: if its best order is one of those
    searched, both epsilons equal the target there, and since epsilon falls as
    sigma grows that root is the one over all orders too. Otherwise the
    orders near the best one join the search, and it runs again below that
    root. The answer is the root over all of Opacus's orders, at about a
    third of the cost.
    """
    make_accountant(accountant)  # reject unknown names with a clear message
    caught: dict[float, list[warnings.WarningMessage]] = {}

    def eps(log_sigma: float, orders: tuple[float, ...] | None = None) -> float:
        # The search probes very large sigmas, where RDP's best order is the largest one Opacus tries;
        # that bound is loose, but those probes are discarded: only the chosen sigma's warnings are shown.
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if orders is not None:
                return _rdp_spent(math.exp(log_sigma), sample_rate, steps, delta, orders)[0]
            value = epsilon([(math.exp(log_sigma), sample_rate, steps)], delta=delta, accountant=accountant)
        caught.setdefault(log_sigma, seen)
        return value

    def root(orders: tuple[float, ...] | None, high: float) -> float:
        """log sigma where epsilon at `orders` (None: the accountant's own) meets the target; Opacus's brackets."""
        while eps(high, orders) > target_epsilon:  # Opacus's upper brackets: double until the target is met
            if high > math.log(MAX_SIGMA):
                raise ValueError(
                    f"no noise level reaches epsilon={target_epsilon} at delta={delta} "
                    f"with sample rate {sample_rate:.4g} over {steps} steps; raise the target epsilon"
                )
            high += math.log(2)
        low = high - math.log(2)
        while eps(low, orders) <= target_epsilon:  # a lower bracket that misses the target
            low, high = low - math.log(4), low
        return brentq(lambda x: math.log(eps(x, orders) / target_epsilon), low, high, xtol=1e-6)

    log_sigma = math.log(FIRST_BRACKET)
    orders = INTEGER_ORDERS if accountant == "rdp" else None
    while orders is not None:
        try:
            log_sigma = root(orders, log_sigma)
        except ValueError:  # out of reach at these orders: all of them decide
            orders, log_sigma = None, math.log(FIRST_BRACKET)
            break
        with warnings.catch_warnings(record=True) as seen:  # over all orders: kept, in case this sigma is chosen
            warnings.simplefilter("always")
            best = _rdp_spent(math.exp(log_sigma), sample_rate, steps, delta, ORDERS)[1]
        caught.setdefault(log_sigma, seen)
        if best in orders:
            break
        orders = tuple(sorted({*orders, *(a for a in ORDERS if abs(a - best) <= 0.5)}))
    if orders is None:
        log_sigma = root(None, log_sigma)
    while eps(log_sigma) > target_epsilon:
        log_sigma += 1e-4
    for shown in caught[log_sigma]:
        warnings.warn_explicit(shown.message, shown.category, shown.filename, shown.lineno)
    return math.exp(log_sigma)


def plan_site(
    *,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    noise_multiplier: float = 0.0,
    finetune_epochs: int = 0,
) -> tuple[float, float, int]:
    """(noise_multiplier, sample_rate, steps_per_round) for a site that trains every round, then fine-tunes.

    Sigma is calibrated to the target over all `rounds` and the `finetune_epochs`
    of fine-tuning after the last one (personalize.epochs), unless a fixed
    `noise_multiplier` > 0 is given.
    """
    q = sample_rate(num_examples=num_examples, batch_size=batch_size)
    per_epoch = steps_per_epoch(num_examples=num_examples, batch_size=batch_size)
    per_round = local_epochs * per_epoch
    steps = rounds * per_round + finetune_epochs * per_epoch
    sigma = noise_multiplier or calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps, accountant=accountant
    )
    return sigma, q, per_round


def plan_sites(
    sizes: list[int],
    *,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    noise_multiplier: float = 0.0,
    budgets: dict[int, float] | None = None,
    finetune_epochs: int = 0,
) -> list[dict]:
    """Per site: q, steps per round, sigma, epsilon after each round, and whether the fine-tuning fits its budget.

    A site in `budgets` calibrates to its own epsilon instead of `target_epsilon`.
    The fine-tuning (`finetune_epochs`, after the rounds its budget allows) fits
    when the epsilon after it is within the budget: the hard stop of a round.
    """
    rows = []
    for site, n in enumerate(sizes):
        budget = (budgets or {}).get(site, target_epsilon)
        sigma, q, per_round = plan_site(
            num_examples=n, batch_size=batch_size, local_epochs=local_epochs, rounds=rounds,
            target_epsilon=budget, delta=delta, accountant=accountant, noise_multiplier=noise_multiplier,
            finetune_epochs=finetune_epochs,
        )
        by_round = [epsilon([(sigma, q, r * per_round)], delta=delta, accountant=accountant) for r in range(1, rounds + 1)]
        within = rounds_within(by_round, budget)
        finetune_steps = finetune_epochs * steps_per_epoch(num_examples=n, batch_size=batch_size)
        after = epsilon([(sigma, q, within * per_round + finetune_steps)], delta=delta, accountant=accountant)
        rows.append({"site": site, "n": n, "sample_rate": q, "steps_per_round": per_round,
                     "noise_multiplier": sigma, "epsilon_by_round": by_round, "budget": budget,
                     "rounds_within_budget": within, "finetune_steps": finetune_steps,
                     "epsilon_after_finetuning": after if finetune_steps else None,
                     "finetunes": bool(finetune_steps) and after <= budget})
    return rows


def rounds_within(epsilon_by_round: list[float], budget: float) -> int:
    """How many rounds a site trains before its next round would exceed `budget` (the hard stop)."""
    return next((r for r, eps in enumerate(epsilon_by_round) if eps > budget), len(epsilon_by_round))
