"""The run directory: what a run leaves behind, machine- and human-readable.

runs/<name>/
  config.toml      the resolved configuration (load it back with --config)
  progress.jsonl   one line per round as it happens (what `fedclinic simulate` shows), then "finished_run"
  metrics.csv      a row per round and site, plus a `central` row per round
  results.json     the summary; keys documented in docs/outputs.md
  global_model.pt  the final global model: fedclinic.load_model(path)
  *.png            plots
  report.md        what happened, in plain words
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from fedclinic import __version__
from fedclinic.atomic import atomic_file
from fedclinic.config import Config, ConfigError
from fedclinic.report.schema import Results
from fedclinic.report.text import format_metric, format_table, write_reports  # noqa: F401 (format_table: for the CLI)


def run_directory(config: Config) -> Path:
    """runs/<name>/, created; the name is a timestamp unless output.name is set."""
    name = config.output.name or time.strftime("%Y%m%d-%H%M%S")
    path = Path(config.output.dir) / name
    # the first part of the path that exists and is not a directory, if any, is named in one sentence
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"the run directory {path} cannot be made: {blocked} is a file, not a directory "
                          "(choose another --out or --name)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, value: dict) -> None:
    """`value` as JSON in `path`, atomically: a reader never sees half a file, an interrupted write keeps the old."""
    with atomic_file(path, "w") as f:
        json.dump(value, f, indent=2)


def write_results(run_dir: Path, results: dict) -> None:
    """The run's results.json: the one place that writes it, and only what the schema (report/schema.py) allows."""
    Results.from_dict(results)
    write_json(Path(run_dir) / "results.json", results)


def read_results(run_dir: Path) -> Results:
    """The run's results.json, typed; SchemaError when it does not have the schema's keys."""
    return Results.from_dict(json.loads((Path(run_dir) / "results.json").read_text()), run_dir=Path(run_dir))


def update_results(run_dir: Path, changes: dict) -> dict:
    """The run's results.json with each top-level key of `changes` set, written back; returns all of it."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    results.update(changes)
    write_results(run_dir, results)
    return results


def with_wall_time(run_dir: Path, seconds: float) -> dict:
    """results.json with the command's wall time (timings.wall_seconds) added; returns it."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    results["timings"]["wall_seconds"] = seconds
    write_results(run_dir, results)
    return results


def _clean(value):
    """JSON has no NaN: "not applicable" metrics (IoU without boxes) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _progress_line(row: dict) -> str:
    return json.dumps({k: _clean(v) for k, v in row.items()}) + "\n"


def json_safe(value):
    """`_clean` through nested dicts and lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return _clean(value)


class RunRecorder:
    """Collects a run's numbers as they arrive and writes the run directory at the end."""

    def __init__(self, path: Path, config: Config, *, started: float, resumed: list[dict] | None = None) -> None:
        """`resumed`: the rounds recorded before the server stopped, when it resumes from its checkpoint."""
        self.path = path
        self.config = config
        self.started = started
        self.central: list[dict] = list(resumed or [])  # one dict per round, round 0 = the initial model
        (path / "config.toml").write_text(config.to_toml())
        # resumed: the rounds of the checkpoint, and not a line the stopped server wrote after it
        (path / "progress.jsonl").write_text("".join(_progress_line(row) for row in self.central))

    def note(self, message: str, step: tuple[str, int, int] | None = None) -> None:
        """A line of progress that is not a round (the post-training steps), for the command to show;
        `step` = (kind, done, total) when the line finishes one of `total` steps of that kind."""
        self.append({"message": message} if step is None else {"message": message, "step": list(step)})

    def append(self, row: dict) -> None:
        """One line of the progress file."""
        with open(self.path / "progress.jsonl", "a") as f:
            f.write(_progress_line(row))

    def central_round(
        self, server_round: int, scores: dict, site_metrics: list[dict], central_epsilon: float | None = None
    ) -> str:
        """Record the central evaluation after `server_round`; returns a progress line."""
        trained = [m for m in site_metrics if m["round"] == server_round and not m["declined"] and not m.get("refused")]
        row = {
            "round": server_round,
            **{k: float(scores[k]) for k in ("loss", "accuracy", "f1", "iou", "seconds")},
            "max_epsilon": max((float(m["epsilon"]) for m in site_metrics), default=0.0),
            "central_epsilon": central_epsilon,
            "fgsm_accuracy": scores.get("fgsm_accuracy"),
            "sites_trained": len(trained),
            "elapsed": time.time() - self.started,
        }
        if "backdoor_success_rate" in scores:  # only under a backdoor attack, as the schema has it
            row["backdoor_success_rate"] = float(scores["backdoor_success_rate"])
        self.central.append(row)
        self.append(row)
        return format_progress(row, self.config.federation.rounds)

    def finish(
        self,
        model,
        class_names,
        site_metrics: list[dict],
        *,
        strategy_seconds: float,
        stop_reason: str = "",
        central_epsilon: float | None = None,
        post_training: dict | None = None,
        personalization: dict | None = None,
    ) -> dict:
        # torch and matplotlib, imported here: the command imports this package before it starts Flower
        from fedclinic.model import save_model
        from fedclinic.report.plots import plot_central, plot_epsilon

        save_model(model, self.path / "global_model.pt", class_names=class_names)
        sites = summarize_sites(site_metrics, self.config, personalization)
        results = self._results(sites, site_metrics, strategy_seconds)
        results["stop_reason"] = stop_reason or None
        post_training = dict(post_training or {"robustness": None, "compression": None, "explanations": None})
        results["timings"]["post_training_seconds"] = post_training.pop("post_training_seconds", {})
        results.update(json_safe(post_training))
        results["personalization"] = json_safe(personalization)  # None when personalize.epochs is 0
        if results["privacy"]["central"]:
            results["privacy"]["central"]["epsilon"] = central_epsilon
        write_results(self.path, results)
        self._write_metrics_csv(site_metrics)
        plot_central(self.central, self.path / "central_metrics.png")
        if self.config.privacy.local:
            plot_epsilon(site_metrics, self.path / "epsilon_per_site.png", self.config.privacy.target_epsilon)
        write_reports(results, self.path)
        return results

    def _results(self, sites: list[dict], site_metrics: list[dict], strategy_seconds: float) -> dict:
        privacy = self.config.privacy
        final = self.central[-1] if self.central else {}
        train_seconds = sum(float(m["train-seconds"]) for m in site_metrics)
        eval_seconds = sum(r["seconds"] for r in self.central)
        return {
            "fedclinic_version": __version__,
            "run": self.path.name,
            "config": self.config.to_flat(),
            "privacy": {
                "mode": privacy.mode,
                "record_level": {
                    "guarantee": "record-level DP-SGD at each site: protects each patient record of a site",
                    "accountant": privacy.accountant,
                    "target_epsilon": privacy.target_epsilon,
                    "noise_multiplier": privacy.noise_multiplier or None,
                    "delta": privacy.delta,
                } if privacy.local else None,
                "central": {
                    "guarantee": "site-level central DP: protects whether a site took part and what it sent",
                    "accountant": "rdp (Flower)",
                    "noise_multiplier": privacy.central_noise_multiplier,
                    "clipping_norm": privacy.central_clipping_norm,
                    "delta": privacy.central_delta,
                    "epsilon": None,
                } if privacy.central else None,
            },
            "rounds": [{k: _clean(v) for k, v in r.items()} for r in self.central],
            "final": {k: _clean(final.get(k)) for k in ("accuracy", "f1", "iou", "loss", "max_epsilon", "central_epsilon")}
            | ({"backdoor_success_rate": _clean(final["backdoor_success_rate"])} if "backdoor_success_rate" in final
               else {}),
            "sites": sites,
            "timings": {
                "server_seconds": strategy_seconds,
                "site_train_seconds": train_seconds,
                "central_eval_seconds": eval_seconds,
            },
        }

    def _write_metrics_csv(self, site_metrics: list[dict]) -> None:
        columns = ["round", "site", "num_examples", "loss", "accuracy", "f1", "iou", "epsilon", "sigma", "seconds",
                   "declined", "refused", "update_norm"]
        with open(self.path / "metrics.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(columns)
            for r in self.central:
                out.writerow([r["round"], "central", "", r["loss"], r["accuracy"], r["f1"], r["iou"],
                              r["max_epsilon"], "", r["seconds"], "", "", ""])
            for m in sorted(site_metrics, key=lambda m: (m["round"], m["site"])):
                out.writerow([m["round"], int(m["site"]), int(m["num-examples"]), m["train-loss"], "", "", "",
                              m["epsilon"], m["sigma"], m["train-seconds"], int(m["declined"]), m.get("refused", ""),
                              "" if m.get("update-norm") is None else m["update-norm"]])


def summarize_sites(site_metrics: list[dict], config: Config, personalization: dict | None = None) -> list[dict]:
    """Per site: n, sigma, epsilon spent (the fine-tuning included), budget, delta, rounds trained, the round it
    stopped in (if it did), whether it fine-tuned after the last round, the rounds the server refused its reply in."""
    tuned = {s["site"]: s for s in (personalization or {"sites": []})["sites"] if not s["declined"]}
    by_site: dict[int, list[dict]] = {}
    for m in site_metrics:
        by_site.setdefault(int(m["site"]), []).append(m)
    rows = []
    for site, replies in sorted(by_site.items()):
        last = replies[-1]
        declined = [int(m["round"]) for m in replies if m["declined"]]
        refused = [m["refused"] for m in replies if m.get("refused")]
        spent = tuned.get(site, {}).get("epsilon")  # after the fine-tuning, when the site fine-tuned under DP
        rows.append({
            "site": site,
            "n": int(last["num-examples"]),
            "sigma": float(last["sigma"]),
            "epsilon": float(last["epsilon"] if spent is None else spent),
            "budget": float(last["budget"]) if config.privacy.local else None,
            "delta": float(last["delta"]),
            "rounds_trained": int(last["rounds-trained"]),
            "last_round": max((int(m["round"]) for m in replies if not m["declined"]), default=0),
            "stopped_in_round": min(declined, default=None),
            "finetuned": site in tuned,
            "refused": len(refused),
            **({"refused_reason": refused[-1]} if refused else {}),  # absent for a site never refused, as the schema
        })
    return rows


def format_progress(row: dict, rounds: int) -> str:
    if "message" in row:
        return f"  {row['message']}"
    head = "initial model" if row["round"] == 0 else f"round {row['round']}/{rounds}"
    central = "" if row.get("central_epsilon") is None else f"  site-level eps {row['central_epsilon']:.2f}"
    if row.get("fgsm_accuracy") is not None:
        central += f"  FGSM accuracy {row['fgsm_accuracy']:.3f}"
    return (
        f"{head:>13}: accuracy {format_metric(row['accuracy'])}  IoU {format_metric(row['iou'])}  "
        f"max record eps {row['max_epsilon']:.2f}{central}  sites {row['sites_trained']}  [{row['elapsed']:.0f} s]"
    )
