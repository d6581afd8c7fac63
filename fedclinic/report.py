"""The run directory: what a run leaves behind, machine- and human-readable.

runs/<name>/
  config.toml      the resolved configuration (load it back with --config)
  progress.jsonl   one line per round as it happens (what `fedclinic simulate` shows)
  metrics.csv      a row per round and site, plus a `central` row per round
  results.json     the summary; keys documented in README.md ("What a run leaves behind")
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
from fedclinic.config import Config
from fedclinic.model import save_model
from fedclinic.plots import plot_central, plot_epsilon


def run_directory(config: Config) -> Path:
    """runs/<name>/, created; the name is a timestamp unless output.name is set."""
    name = config.output.name or time.strftime("%Y%m%d-%H%M%S")
    path = Path(config.output.dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clean(value):
    """JSON has no NaN: "not applicable" metrics (IoU without boxes) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder:
    """Collects a run's numbers as they arrive and writes the run directory at the end."""

    def __init__(self, path: Path, config: Config, *, started: float) -> None:
        self.path = path
        self.config = config
        self.started = started
        self.central: list[dict] = []  # one dict per round, round 0 = the initial model
        (path / "config.toml").write_text(config.to_toml())
        (path / "progress.jsonl").write_text("")

    def central_round(self, server_round: int, scores: dict, site_metrics: list[dict]) -> str:
        """Record the central evaluation after `server_round`; returns a progress line."""
        trained = [m for m in site_metrics if m["round"] == server_round]
        row = {
            "round": server_round,
            **{k: float(scores[k]) for k in ("loss", "accuracy", "f1", "iou", "seconds")},
            "max_epsilon": max((float(m["epsilon"]) for m in site_metrics), default=0.0),
            "sites_trained": len(trained),
            "elapsed": time.time() - self.started,
        }
        self.central.append(row)
        with open(self.path / "progress.jsonl", "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        return format_progress(row, self.config.federation.rounds)

    def finish(self, model, class_names, site_metrics: list[dict], *, strategy_seconds: float) -> dict:
        save_model(model, self.path / "global_model.pt", class_names=class_names)
        sites = summarize_sites(site_metrics, self.config)
        results = self._results(sites, site_metrics, strategy_seconds)
        (self.path / "results.json").write_text(json.dumps(results, indent=2))
        self._write_metrics_csv(site_metrics)
        plot_central(self.central, self.path / "central_metrics.png")
        if self.config.privacy.local:
            plot_epsilon(site_metrics, self.path / "epsilon_per_site.png", self.config.privacy.target_epsilon)
        (self.path / "report.md").write_text(render_report(results, self.path))
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
                "guarantee": "record-level DP-SGD at each site" if privacy.local else "none",
                "accountant": privacy.accountant if privacy.local else None,
                "target_epsilon": privacy.target_epsilon if privacy.local else None,
                "delta": privacy.delta if privacy.local else None,
            },
            "rounds": [{k: _clean(v) for k, v in r.items()} for r in self.central],
            "final": {k: _clean(final.get(k)) for k in ("accuracy", "f1", "iou", "loss", "max_epsilon")},
            "sites": sites,
            "timings": {
                "server_seconds": strategy_seconds,
                "site_train_seconds": train_seconds,
                "central_eval_seconds": eval_seconds,
            },
        }

    def _write_metrics_csv(self, site_metrics: list[dict]) -> None:
        columns = ["round", "site", "num_examples", "loss", "accuracy", "f1", "iou", "epsilon", "sigma", "seconds"]
        with open(self.path / "metrics.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(columns)
            for r in self.central:
                out.writerow([r["round"], "central", "", r["loss"], r["accuracy"], r["f1"], r["iou"],
                              r["max_epsilon"], "", r["seconds"]])
            for m in sorted(site_metrics, key=lambda m: (m["round"], m["site"])):
                out.writerow([m["round"], int(m["site"]), int(m["num-examples"]), m["train-loss"], "", "", "",
                              m["epsilon"], m["sigma"], m["train-seconds"]])


def summarize_sites(site_metrics: list[dict], config: Config) -> list[dict]:
    """Per site: n, sigma, epsilon spent, delta, rounds trained (its last reply)."""
    last: dict[int, dict] = {}
    for m in site_metrics:
        last[int(m["site"])] = m
    return [
        {
            "site": site,
            "n": int(m["num-examples"]),
            "sigma": float(m["sigma"]),
            "epsilon": float(m["epsilon"]),
            "delta": float(m["delta"]),
            "rounds_trained": int(m["rounds-trained"]),
            "last_round": int(m["round"]),
        }
        for site, m in sorted(last.items())
    ]


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_progress(row: dict, rounds: int) -> str:
    head = "initial model" if row["round"] == 0 else f"round {row['round']}/{rounds}"
    return (
        f"{head:>13}: accuracy {_fmt(row['accuracy'])}  IoU {_fmt(row['iou'])}  "
        f"max eps {row['max_epsilon']:.2f}  sites {row['sites_trained']}  [{row['elapsed']:.0f} s]"
    )


def format_table(results: dict) -> str:
    """The short table `fedclinic simulate` ends with."""
    lines = [f"{'round':>5}  {'accuracy':>8}  {'IoU':>6}  {'max eps':>7}", "-" * 33]
    for r in results["rounds"]:
        lines.append(f"{r['round']:>5}  {_fmt(r['accuracy']):>8}  {_fmt(r['iou']):>6}  {r['max_epsilon']:>7.2f}")
    return "\n".join(lines)


def render_report(results: dict, path: Path) -> str:
    cfg = results["config"]
    final = results["final"]
    privacy = results["privacy"]
    lines = [
        f"# fedclinic run `{results['run']}`",
        "",
        f"{len(results['sites'])} hospital sites trained one shared model for {len(results['rounds']) - 1} rounds "
        f"({'synthetic sites' if not cfg['data.path'] else 'data from ' + cfg['data.path']}).",
        "",
        "## Privacy",
    ]
    if privacy["mode"] in ("local", "both"):
        lines += [
            f"Every site trained with DP-SGD (Opacus, {privacy['accountant'].upper()} accountant), aiming at "
            f"epsilon = {privacy['target_epsilon']} at delta = {privacy['delta']} over the whole training. "
            "Epsilon below is record-level (it protects each patient record of a site) and counts every round "
            "the site took part in, not one round.",
            "",
            "| site | images | sigma | epsilon spent | delta | rounds trained |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in results["sites"]:
            lines.append(f"| {s['site']} | {s['n']} | {s['sigma']:.3f} | {s['epsilon']:.3f} | {s['delta']:g} | "
                         f"{s['rounds_trained']} |")
        lines += ["", "![epsilon per site](epsilon_per_site.png)"]
    else:
        lines.append("Privacy was **off**: this is the non-private baseline, with no formal guarantee for patients.")
    lines += [
        "",
        "## The global model on the server's held-out test set",
        f"Final accuracy {_fmt(final['accuracy'])}, macro-F1 {_fmt(final['f1'])}, mean IoU of lesion boxes "
        f"{_fmt(final['iou'])} (n/a means the data has no boxes).",
        "",
        "```",
        format_table(results),
        "```",
        "",
        "![central metrics](central_metrics.png)",
    ]
    for name, title in (("label_distribution.png", "Label distribution per site"), ("site_samples.png", "Sample images per site")):
        if (path / name).exists():
            lines += ["", f"## {title}", f"![{title}]({name})"]
    t = results["timings"]
    lines += [
        "",
        "## Timings",
        f"Server {t['server_seconds']:.1f} s; local training at all sites {t['site_train_seconds']:.1f} s; "
        f"central evaluation {t['central_eval_seconds']:.1f} s.",
        "",
        "The global model loads with `fedclinic.load_model('global_model.pt')`.",
    ]
    return "\n".join(lines) + "\n"
