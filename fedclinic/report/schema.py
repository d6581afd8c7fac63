"""The schema of results.json: the dataclasses its one writer checks it against, and docs/outputs.md describes.

    results = Results.from_dict(json.loads(path.read_text()))   # refuses a key too many or too few
    results.final.accuracy, results.sites[0].epsilon, results.to_dict()

The sections every run has are typed field by field. The sections of steps
that may not run (personalization, robustness, compression, explanations,
audit, baselines) are JSON objects, or null when the step did not run; their
keys are listed in docs/outputs.md.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SchemaError(ValueError):
    """A results.json that does not have the keys or types of the schema; the message names the key."""


@dataclass(frozen=True)
class Round:
    """The central evaluation after a round on the server's test set (round 0: the initial model)."""

    round: int
    loss: float
    accuracy: float
    f1: float
    iou: float | None  # None: not applicable (no lesion boxes)
    seconds: float
    max_epsilon: float
    central_epsilon: float | None
    fgsm_accuracy: float | None
    sites_trained: int
    elapsed: float
    # under federation.attack=backdoor only: the share of triggered test images of other classes classified as
    # federation.backdoor-target
    backdoor_success_rate: float | None = None


@dataclass(frozen=True)
class Final:
    accuracy: float | None
    f1: float | None
    iou: float | None
    loss: float | None
    max_epsilon: float | None
    central_epsilon: float | None
    backdoor_success_rate: float | None = None  # the last round's, under federation.attack=backdoor only


@dataclass(frozen=True)
class SiteResult:
    site: int
    n: int
    sigma: float
    epsilon: float
    budget: float | None
    delta: float
    rounds_trained: int
    last_round: int
    stopped_in_round: int | None
    finetuned: bool
    refused: int = 0  # rounds in which the server refused the site's reply (poisoning/validation.py)
    refused_reason: str | None = None  # why, the last time
    # the canary audit's lower bound on the site's epsilon (privacy.audit-canaries), at audit.confidence
    epsilon_lower_bound: float | None = None


@dataclass(frozen=True)
class RecordLevel:
    guarantee: str
    accountant: str
    target_epsilon: float
    noise_multiplier: float | None
    delta: float


@dataclass(frozen=True)
class Central:
    guarantee: str
    accountant: str
    noise_multiplier: float
    clipping_norm: float
    delta: float
    epsilon: float | None


@dataclass(frozen=True)
class Privacy:
    mode: str
    record_level: RecordLevel | None
    central: Central | None


@dataclass(frozen=True)
class Timings:
    server_seconds: float
    site_train_seconds: float
    central_eval_seconds: float
    post_training_seconds: dict[str, float]
    wall_seconds: float | None = None  # the command's, added once it has stopped every process


@dataclass(frozen=True)
class Results:
    fedclinic_version: str
    run: str
    config: dict[str, Any]
    privacy: Privacy
    rounds: list[Round]
    final: Final
    sites: list[SiteResult]
    timings: Timings
    stop_reason: str | None
    personalization: dict[str, Any] | None
    robustness: dict[str, Any] | None
    compression: dict[str, Any] | None
    explanations: dict[str, Any] | None
    audit: dict[str, Any] | None = None
    baselines: dict[str, Any] | None = None
    # where the run is; not a key of results.json
    run_dir: Path | None = field(default=None, metadata={"written": False}, compare=False)

    @classmethod
    def from_dict(cls, value: dict, run_dir: Path | None = None) -> "Results":
        """The typed results; SchemaError naming the first key that is missing, unknown or of the wrong type."""
        results = _build(cls, value, "results")
        return dataclasses.replace(results, run_dir=run_dir)

    def to_dict(self) -> dict:
        """results.json's content."""
        return _plain(self)


def written_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a schema class that are keys of results.json."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("written", True)]


def schema_keys(cls: type = Results) -> dict[str, list[str]]:
    """Class name -> its keys, for every schema class reachable from `cls` (what docs/outputs.md must name)."""
    found: dict[str, list[str]] = {}
    pending = [cls]
    while pending:
        current = pending.pop()
        if current.__name__ in found:
            continue
        fields = written_fields(current)
        found[current.__name__] = [f.name for f in fields]
        hints = typing.get_type_hints(current)
        pending += [t for f in fields for t in _types_in(hints[f.name]) if dataclasses.is_dataclass(t)]
    return found


def _types_in(hint) -> list:
    args = typing.get_args(hint)
    return [hint] if not args else [t for a in args for t in _types_in(a)]


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in written_fields(type(value))
                if not (getattr(value, f.name) is None and f.default is None)}  # a key that is only there once set
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _build(hint, value, where: str):
    """`value` read as `hint` (a schema class, X | None, list[X], dict[...], a plain type)."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, where)
    if origin is list:
        _expect(isinstance(value, list), where, "a list", value)
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        _expect(isinstance(value, dict), where, "an object", value)
        return value
    if dataclasses.is_dataclass(hint):
        _expect(isinstance(value, dict), where, "an object", value)
        fields = written_fields(hint)
        names = {f.name for f in fields}
        unknown = sorted(set(value) - names)
        if unknown:
            raise SchemaError(f"{where} has a key the schema does not know: {unknown[0]!r}")
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in value]
        if missing:
            raise SchemaError(f"{where} lacks the key {missing[0]!r}")
        hints = typing.get_type_hints(hint)
        return hint(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if hint is float:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), where, "a number", value)
        return float(value)
    _expect(isinstance(value, hint) and not (hint is int and isinstance(value, bool)), where,
            f"of type {hint.__name__}", value)
    return value


def _expect(ok: bool, where: str, what: str, value) -> None:
    if not ok:
        raise SchemaError(f"{where} should be {what}, not {value!r}"[:300])
