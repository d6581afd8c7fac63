"""A site's privacy ledger: its noise plan and every DP release it made, kept on disk.

The ledger is a history, and epsilon is a pure function over it
(fedclinic.privacy.accounting), so a restarted site still knows what it has
spent. Writes are atomic: a new file is written beside the old one and moved
over it, so a crash leaves either the old or the new ledger, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedclinic.config import PrivacyConfig
from fedclinic.privacy.accounting import Release, epsilon, plan_site

FORMAT = "fedclinic-ledger/1"
FILENAME = "ledger.json"


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


@dataclass(frozen=True)
class Entry:
    """One DP release: a round of local DP-SGD."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: float


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
        return len(self.entries)

    def epsilon(self) -> float:
        """Epsilon spent so far, over every round, at the plan's delta."""
        if self.plan is None:
            return 0.0
        return epsilon(self.history, delta=self.plan.delta, accountant=self.plan.accountant)

    def set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self.save()

    def record(self, *, round: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Append a release and write the ledger before anything leaves the site."""
        self.entries.append(Entry(round, noise_multiplier, sample_rate, steps, time.time()))
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
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def open(cls, state_dir: str | Path | None, *, site: int) -> "Ledger":
        """The site's ledger in `state_dir` (created if absent), or an in-memory one."""
        if state_dir is None:
            return cls(site=site)
        path = Path(state_dir) / FILENAME
        if not path.exists():
            return cls(site=site, path=path)
        try:
            payload = json.loads(path.read_text())
            if payload.get("format") != FORMAT:
                raise ValueError
            plan = None if payload["plan"] is None else Plan(**payload["plan"])
            entries = [Entry(**e) for e in payload["entries"]]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is not a readable fedclinic privacy ledger; refusing to reset it") from None
        if payload["site"] != site:
            raise ValueError(f"{path} belongs to site {payload['site']}, not site {site}")
        return cls(site=site, plan=plan, entries=entries, path=path)


def make_plan(*, num_examples: int, batch_size: int, local_epochs: int, rounds: int, privacy: PrivacyConfig) -> Plan:
    """The site's sigma for its target (epsilon, delta) over all planned rounds."""
    sigma, q, per_round = plan_site(
        num_examples=num_examples,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )
    return Plan(sigma, q, per_round, rounds, privacy.target_epsilon, privacy.delta, privacy.accountant)
