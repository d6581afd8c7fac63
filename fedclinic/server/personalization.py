"""After the last round: each connected site fine-tunes the final global model on its own data ("FL + fine-tuning").

    found = personalize_sites(grid, arrays, config, run_dir, last_round=4, say=print)  # results' "personalization"

The ServerApp sends every connected SuperNode one "evaluate.personalize"
message carrying the final global model; each site answers with how the global
model and its own fine-tuned copy score on its own validation split
(clients/personalize.py), never with the copy. Failed and missing replies are
logged in one line and left out, as in a round. `personalization_section` is
the Flower-free summary: per site, and the mean, worst and best over the sites
that fine-tuned.
"""

from __future__ import annotations

from logging import WARNING
from pathlib import Path
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedclinic.config import Config
from fedclinic.evaluation import SCORES, summarize
from fedclinic.strategies.sites import failure

RELEASE = ("The validation accuracies are released outside the DP guarantee: they are aggregate statistics of each "
           "site's own validation records, which DP-SGD does not cover.")


def guarantee(config: Config) -> str:
    """How the fine-tuning is private, in plain words (results' `guarantee`)."""
    if config.privacy.local:
        return ("Fine-tuning is charged to each site's ledger: it is DP-SGD at the site's planned noise multiplier, "
                "calibrated before round 1 for the rounds and the fine-tuning together, so a site's epsilon after it "
                "stays within its budget, and a site it would take past its budget declines it. The personalised "
                "model never leaves its site.")
    return (f"Fine-tuning is not private: privacy.mode={config.privacy.mode} has no record-level DP at the sites. "
            "The personalised model never leaves its site.")


def personalize_sites(grid: Grid, arrays: ArrayRecord, config: Config, run_dir: Path, *, last_round: int,
                      say: Callable[[str], None], point: str = "") -> dict | None:
    """Ask every connected site to fine-tune `arrays`; results.json's "personalization" (None when it is off).
    `point`: a sweep's keys for this run, sent to the sites as every round's messages send them."""
    epochs, timeout = config.personalize.epochs, config.federation.round_timeout
    if epochs == 0:
        return None
    nodes = sorted(grid.get_node_ids())
    say(f"personalisation: {len(nodes)} site(s) fine-tune the global model for {epochs} epoch(s) on their own data")
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": last_round + 1,
                                                                    "run-dir": str(run_dir.resolve()),
                                                                    "point": point})})
    replies = list(grid.send_and_receive(
        [Message(content=content, message_type="evaluate.personalize", dst_node_id=node) for node in nodes],
        timeout=timeout))
    rows = []
    for msg in replies:
        if msg.has_error():
            log(WARNING, "fedclinic: personalisation: node %d failed and is left out: %s", msg.metadata.src_node_id,
                failure(msg.error.reason))
            continue
        reason = str(msg.content["status"]["declined"]) if "status" in msg.content.config_records else None
        if reason:
            say(reason)
        rows.append(site_row(dict(msg.content["metrics"]), reason, private=config.privacy.local))
    if len(replies) < len(nodes):
        log(WARNING, "fedclinic: personalisation: %d site(s) did not reply within %g s and are left out",
            len(nodes) - len(replies), timeout)
    return personalization_section(rows, config)


def site_row(metrics: dict, reason: str | None, *, private: bool) -> dict:
    """A site's reply as results.json holds it."""
    declined = bool(metrics["declined"])
    return {
        "site": int(metrics["site"]),
        "n": int(metrics["num-examples"]),
        "global": {key: float(metrics[f"global-{key}"]) for key in SCORES},
        "personalized": None if declined else {key: float(metrics[f"personalized-{key}"]) for key in SCORES},
        "epsilon": float(metrics["epsilon"]) if private else None,
        "declined": declined,
        "reason": reason if declined else None,
    }


def personalization_section(rows: list[dict], config: Config) -> dict:
    """The sites' rows in site order and, over the sites that fine-tuned, the mean, worst and best of each model."""
    rows = sorted(rows, key=lambda row: row["site"])
    tuned = [row for row in rows if not row["declined"]]
    sites = [row["site"] for row in tuned]
    return {
        "guarantee": guarantee(config),
        "release": RELEASE,
        "epochs": config.personalize.epochs,
        "sites": rows,
        "compared": len(tuned),  # the sites in `global` and `personalized`: those that fine-tuned
        "global": summarize([row["global"] for row in tuned], sites),
        "personalized": summarize([row["personalized"] for row in tuned], sites),
    }

