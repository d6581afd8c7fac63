"""What the server refuses in a site's reply before aggregating it.

    problem = reply_problem(sent, reply)          # None, or one sentence: keys, shapes, dtypes, NaN/inf
    refused = norm_outliers({site: update_norm(sent, arrays), ...}, ratio=10,
                            steps={site: local_steps, ...})   # {site: reason}
    arrays = clip_update(sent, arrays, max_norm=1.0)   # the update scaled down to norm 1 (if it was over)

`sent` and `reply` map each array's name to a numpy array: the global model
the server sent with the round, and what the site sent back.
"""

from __future__ import annotations

import math

import numpy as np

MIN_REPLIES_FOR_NORMS = 3  # with two replies nobody can tell which one is far out


def reply_problem(sent: dict[str, np.ndarray], reply: dict[str, np.ndarray]) -> str | None:
    """Why the reply cannot be aggregated with the model that was sent, in one sentence; None when it can."""
    missing, extra = sorted(set(sent) - set(reply)), sorted(set(reply) - set(sent))
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        return f"its arrays are not the model's: {' and '.join(parts)}"
    for name, array in sent.items():
        got = reply[name]
        if got.shape != array.shape:
            return f"{name!r} has shape {tuple(got.shape)}, the model's is {tuple(array.shape)}"
        if got.dtype != array.dtype:
            return f"{name!r} is {got.dtype}, the model's is {array.dtype}"
        if np.issubdtype(got.dtype, np.inexact) and not np.isfinite(got).all():
            return f"{name!r} holds non-finite values (NaN or inf)"
    return None


def update_norm(sent: dict[str, np.ndarray], reply: dict[str, np.ndarray]) -> float:
    """The L2 norm of the update, reply minus sent, over every floating-point array (in float64)."""
    total = 0.0
    for name, array in sent.items():
        if np.issubdtype(array.dtype, np.inexact):
            total += float(np.sum((reply[name].astype(np.float64) - array.astype(np.float64)) ** 2))
    return math.sqrt(total)


def norm_outliers(norms: dict[int, float], *, ratio: float, steps: dict[int, int] | None = None) -> dict[int, str]:
    """{site: reason} for each update whose norm per square root of its local steps is over `ratio` times the
    median of the round's other updates'.

    An update is the sum of its site's steps, so a larger site (more steps in an epoch) sends a larger one:
    under DP-SGD its noise grows with the square root of the steps, and without DP its drift grows at least
    as fast. Compared raw, the largest honest hospital's update can be 3 times the others' median (measured:
    2,415 records against 199 to 959), so each norm is divided by the square root of the steps the site
    reports (`steps` None or a site missing: 1 step). The rule needs at least three replies (two others to
    take a median of); `ratio` 0 turns it off.
    """
    if not ratio or len(norms) < MIN_REPLIES_FOR_NORMS:
        return {}
    per_step = {site: norm / math.sqrt(max((steps or {}).get(site, 1), 1)) for site, norm in norms.items()}
    refused = {}
    for site, norm in per_step.items():
        others = float(np.median([n for s, n in per_step.items() if s != site]))
        if others > 0 and norm > ratio * others:
            refused[site] = (f"its update's norm per square root of its local steps, {norm:.4g}, is "
                             f"{norm / others:.1f} times the median of the round's other replies ({others:.4g}), "
                             f"over federation.reply-norm-ratio={ratio:g}")
    return refused


def clip_update(sent: dict[str, np.ndarray], reply: dict[str, np.ndarray], *, max_norm: float) -> dict[str, np.ndarray]:
    """`reply` with its update (reply minus sent, over the floating-point arrays, as `update_norm`) scaled to
    `max_norm` when its norm is larger; integer arrays and an update within the norm are left as they are.

    Written here rather than taken from Flower's central-DP clipping
    (flwr.supercore.differential_privacy.compute_clip_model_update), which
    counts integer buffers into the norm and cannot scale them in place.
    """
    norm = update_norm(sent, reply)
    if norm <= max_norm:
        return reply
    factor = max_norm / norm
    return {name: (sent[name] + factor * (array.astype(np.float64) - sent[name])).astype(array.dtype)
            if np.issubdtype(array.dtype, np.inexact) else array for name, array in reply.items()}
