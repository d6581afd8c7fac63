"""A site's privacy ledger: its noise plan and every DP release it made, kept on disk.


The ledger is a history, and epsilon is a pure function over it
(fedclinic.privacy.accounting), so a restarted site still knows what it has
spent. Writes are atomic: a new file is written beside the old one and moved
over it, so a crash leaves either the old or the new ledger, never half. A
site holds an exclusive lock on its ledger for a whole round (`Ledger.locked`),
so a second process pointed at the same state directory is refused instead of
spending the same budget twice.

A release is a round of the federation or the site's fine-tuning after the
last round (kind "fine-tuning", numbered as the round after it). Ledgers
written before fine-tuning existed load as they were: every entry a round,
a plan without fine-tuning.
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from fedclinic.atomic import atomic_file
from fedclinic.config import PrivacyConfig
from fedclinic.privacy.accounting import Release, epsilon, plan_site, steps_per_epoch

FORMAT = "fedclinic-ledger/1"
FILENAME = "ledger.json"
LOCKNAME = "ledger.lock"


class LedgerError(ValueError):
    """A ledger that cannot be used: unreadable, another site's, or in use."""


@dataclass(frozen=True)
class Plan:
    """How a site spends its budget, fixed before its first round."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str
    finetune_steps: int = 0  # steps of the fine-tuning after the last round (personalize.epochs), planned for too


ROUND, FINETUNING = "round", "fine-tuning"


@dataclass(frozen=True)
class Entry:
    """One DP release: a round of local DP-SGD, or the fine-tuning after the last round."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: float
    kind: str = ROUND  # ROUND or FINETUNING


@dataclass
class Ledger:
    site: int
    plan: Plan | None = None
    entries: list[Entry] = field(default_factory=list)
    path: Path | None = None  # None keeps the ledger in memory only

    @property
    def history(self) -> list[Release]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def rounds_trained(self) -> int:
        """Rounds of the federation trained (the fine-tuning is not one)."""
        return sum(e.kind == ROUND for e in self.entries)

    def epsilon(self) -> float:
        """Epsilon spent so far, over every release (the rounds and any fine-tuning), at the plan's delta."""
        if self.plan is None:
            return 0.0
        return epsilon(self.history, delta=self.plan.delta, accountant=self.plan.accountant)

    def spending(self) -> dict:
        """What the site has spent: its plan, and each release with the cumulative epsilon after it."""
        plan = self.plan
        delta, accountant = (plan.delta, plan.accountant) if plan else (None, None)
        rounds = [
            {**asdict(e), "epsilon": epsilon(self.history[: i + 1], delta=delta, accountant=accountant)}
            for i, e in enumerate(self.entries)
        ]
        return {"site": self.site, "plan": None if plan is None else asdict(plan), "delta": delta,
                "accountant": accountant, "epsilon": self.epsilon(), "rounds": rounds}

    def epsilon_after_round(self) -> float:
        """Epsilon the site would have spent after one more round of its plan."""
        return self.epsilon_after(self.plan.steps_per_round)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon the site would have spent after `steps` more steps at its plan's sigma and q."""
        plan = self.plan
        step = (plan.noise_multiplier, plan.sample_rate, steps)
        return epsilon(self.history + [step], delta=plan.delta, accountant=plan.accountant)

    def set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self.save()

    def record(self, *, round: int, noise_multiplier: float, sample_rate: float, steps: int, kind: str = ROUND) -> None:
        """Append a release and write the ledger before anything leaves the site."""
        self.entries.append(Entry(round, noise_multiplier, sample_rate, steps, time.time(), kind))
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "site": self.site,
            "plan": None if self.plan is None else asdict(self.plan),
            "entries": [asdict(e) for e in self.entries],
        }
        with atomic_file(self.path, "w") as f:  # interrupted, the old ledger is untouched
            json.dump(payload, f, indent=1)

    @classmethod
    def open(cls, state_dir: str | Path | None, *, site: int | None) -> "Ledger":
        """The ledger in `state_dir` (new if absent, in memory if None); `site` None reads any site's."""
        if state_dir is None:
            return cls(site=site or 0)
        path = Path(state_dir) / FILENAME
        if not path.exists():
            if site is None:
                raise LedgerError(f"{state_dir} holds no privacy ledger ({FILENAME})")
            return cls(site=site, path=path)
        try:
            payload = json.loads(path.read_text())
            if payload.get("format") != FORMAT:
                raise ValueError
            plan = None if payload["plan"] is None else Plan(**payload["plan"])
            entries = [Entry(**e) for e in payload["entries"]]
        except (ValueError, KeyError, TypeError):
            raise LedgerError(f"{path} is not a readable fedclinic privacy ledger; refusing to reset it") from None
        if site is not None and payload["site"] != site:
            raise LedgerError(f"{path} belongs to site {payload['site']}, not site {site}")
        return cls(site=payload["site"], plan=plan, entries=entries, path=path)

    @classmethod
    @contextmanager
    def locked(cls, state_dir: str | Path | None, *, site: int) -> Iterator["Ledger"]:
        """The site's ledger, held exclusively until the block ends (a round)."""
        if state_dir is None:
            yield cls(site=site)
            return
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        lock_path = Path(state_dir) / LOCKNAME
        with open(lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerError(
                    f"the privacy ledger in {state_dir} is in use by another process; "
                    "two processes must not train the same site"
                ) from None
            try:
                yield cls.open(state_dir, site=site)  # read under the lock: the latest history
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def make_plan(
    *, num_examples: int, batch_size: int, local_epochs: int, rounds: int, privacy: PrivacyConfig, budget: float,
    finetune_epochs: int = 0,
) -> Plan:
    """The site's sigma for its budget (epsilon, delta) over its planned rounds and fine-tuning, or the fixed one."""
    sigma, q, per_round = plan_site(
        num_examples=num_examples,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        target_epsilon=budget,
        delta=privacy.delta,
        accountant=privacy.accountant,
        noise_multiplier=privacy.noise_multiplier,
        finetune_epochs=finetune_epochs,
    )
    finetune_steps = finetune_epochs * steps_per_epoch(num_examples=num_examples, batch_size=batch_size)
    return Plan(sigma, q, per_round, rounds, budget, privacy.delta, privacy.accountant, finetune_steps)
