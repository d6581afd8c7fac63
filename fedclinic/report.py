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

    def central_round(
        self, server_round: int, scores: dict, site_metrics: list[dict], central_epsilon: float | None = None
    ) -> str:
        """Record the central evaluation after `server_round`; returns a progress line."""
        trained = [m for m in site_metrics if m["round"] == server_round and not m["declined"]]
        row = {
            "round": server_round,
            **{k: float(scores[k]) for k in ("loss", "accuracy", "f1", "iou", "seconds")},
            "max_epsilon": max((float(m["epsilon"]) for m in site_metrics), default=0.0),
            "central_epsilon": central_epsilon,
            "sites_trained": len(trained),
            "elapsed": time.time() - self.started,
        }
        self.central.append(row)
        with open(self.path / "progress.jsonl", "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
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
    ) -> dict:
        save_model(model, self.path / "global_model.pt", class_names=class_names)
        sites = summarize_sites(site_metrics, self.config)
        results = self._results(sites, site_metrics, strategy_seconds)
        results["stop_reason"] = stop_reason or None
        if results["privacy"]["central"]:
            results["privacy"]["central"]["epsilon"] = central_epsilon
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
            "final": {k: _clean(final.get(k)) for k in ("accuracy", "f1", "iou", "loss", "max_epsilon", "central_epsilon")},
            "sites": sites,
            "timings": {
                "server_seconds": strategy_seconds,
                "site_train_seconds": train_seconds,
                "central_eval_seconds": eval_seconds,
            },
        }

    def _write_metrics_csv(self, site_metrics: list[dict]) -> None:
        columns = ["round", "site", "num_examples", "loss", "accuracy", "f1", "iou", "epsilon", "sigma", "seconds",
                   "declined"]
        with open(self.path / "metrics.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(columns)
            for r in self.central:
                out.writerow([r["round"], "central", "", r["loss"], r["accuracy"], r["f1"], r["iou"],
                              r["max_epsilon"], "", r["seconds"], ""])
            for m in sorted(site_metrics, key=lambda m: (m["round"], m["site"])):
                out.writerow([m["round"], int(m["site"]), int(m["num-examples"]), m["train-loss"], "", "", "",
                              m["epsilon"], m["sigma"], m["train-seconds"], int(m["declined"])])


def summarize_sites(site_metrics: list[dict], config: Config) -> list[dict]:
    """Per site: n, sigma, epsilon spent, budget, delta, rounds trained, the round it stopped in (if it did)."""
    by_site: dict[int, list[dict]] = {}
    for m in site_metrics:
        by_site.setdefault(int(m["site"]), []).append(m)
    rows = []
    for site, replies in sorted(by_site.items()):
        last = replies[-1]
        declined = [int(m["round"]) for m in replies if m["declined"]]
        rows.append({
            "site": site,
            "n": int(last["num-examples"]),
            "sigma": float(last["sigma"]),
            "epsilon": float(last["epsilon"]),
            "budget": float(last["budget"]) if config.privacy.local else None,
            "delta": float(last["delta"]),
            "rounds_trained": int(last["rounds-trained"]),
            "last_round": max((int(m["round"]) for m in replies if not m["declined"]), default=0),
            "stopped_in_round": min(declined, default=None),
        })
    return rows


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_progress(row: dict, rounds: int) -> str:
    head = "initial model" if row["round"] == 0 else f"round {row['round']}/{rounds}"
    central = "" if row.get("central_epsilon") is None else f"  site-level eps {row['central_epsilon']:.2f}"
    return (
        f"{head:>13}: accuracy {_fmt(row['accuracy'])}  IoU {_fmt(row['iou'])}  "
        f"max record eps {row['max_epsilon']:.2f}{central}  sites {row['sites_trained']}  [{row['elapsed']:.0f} s]"
    )


def format_table(results: dict) -> str:
    """The short table `fedclinic simulate` ends with: record-level eps is the largest any site spent."""
    central = results["privacy"]["central"] is not None
    extra = f"  {'site eps':>8}" if central else ""
    lines = [f"{'round':>5}  {'accuracy':>8}  {'IoU':>6}  {'rec eps':>7}{extra}", "-" * (33 + len(extra))]
    for r in results["rounds"]:
        site_eps = f"  {_fmt(r['central_epsilon'], '.2f'):>8}" if central else ""
        lines.append(f"{r['round']:>5}  {_fmt(r['accuracy']):>8}  {_fmt(r['iou']):>6}  {r['max_epsilon']:>7.2f}{site_eps}")
    return "\n".join(lines)


def _privacy_section(results: dict) -> list[str]:
    """What each epsilon protects, what every site spent, who stopped and why."""
    privacy = results["privacy"]
    lines = []
    if privacy["record_level"]:
        rec = privacy["record_level"]
        noise = (f"a fixed noise multiplier {rec['noise_multiplier']}" if rec["noise_multiplier"]
                 else "noise calibrated to each site's budget")
        lines += [
            f"**Record-level DP** (local DP-SGD, Opacus, {rec['accountant'].upper()} accountant): every site trained "
            f"with {noise}; its budget is epsilon = {rec['target_epsilon']} at delta = {rec['delta']:g} over the "
            "whole training unless it set its own. This epsilon protects each patient record of a site, counts "
            "every round the site took part in, and a site declines any round that would take it past its budget.",
            "",
            "| site | images | sigma | epsilon spent | budget | delta | rounds trained | stopped |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | :--- |",
        ]
        for s in results["sites"]:
            stopped = f"declined round {s['stopped_in_round']}" if s["stopped_in_round"] else "no"
            lines.append(f"| {s['site']} | {s['n']} | {s['sigma']:.3f} | {s['epsilon']:.3f} | {s['budget']:g} | "
                         f"{s['delta']:g} | {s['rounds_trained']} | {stopped} |")
        lines += ["", "![epsilon per site](epsilon_per_site.png)", ""]
    if privacy["central"]:
        c = privacy["central"]
        lines += [
            f"**Site-level DP** (central, Flower's server-side fixed clipping): each site's update was clipped to "
            f"L2 norm {c['clipping_norm']} and "
            f"Gaussian noise (multiplier {c['noise_multiplier']}) was added to the aggregate. "
            f"Site-level epsilon = {_fmt(c['epsilon'])} at delta = {c['delta']:g} (Flower's RDP accountant, no "
            "amplification by sampling claimed). It protects whether a hospital took part and what it sent.",
            "",
        ]
    if not privacy["record_level"] and not privacy["central"]:
        lines.append("Privacy was **off**: this is the non-private baseline, with no formal guarantee for patients.")
    if results.get("stop_reason"):
        lines += ["", f"**Stopped early:** {results['stop_reason']}."]
    if results.get("audit"):
        a = results["audit"]
        lines += [
            "",
            "**Empirical audit.** A loss-threshold membership-inference attack on the final model, "
            f"{a['members']} training images of the sites against {a['nonmembers']} images nobody trained on "
            f"({a['nonmembers_from']}): AUC {a['auc']:.3f} (0.5 = cannot tell them apart), "
            f"TPR {a['tpr_at_1pct_fpr']:.3f} at 1% FPR and {a['tpr_at_01pct_fpr']:.3f} at 0.1% FPR. "
            "An audit is a lower bound on leakage, not a proof of privacy.",
            "",
            "![membership-inference ROC](audit_roc.png)",
        ]
    return lines


def render_report(results: dict, path: Path) -> str:
    cfg = results["config"]
    final = results["final"]
    lines = [
        f"# fedclinic run `{results['run']}`",
        "",
        f"{len(results['sites'])} hospital sites trained one shared model for {len(results['rounds']) - 1} rounds "
        f"({'synthetic sites' if not cfg['data.path'] else 'data from ' + cfg['data.path']}).",
        "",
        "## Privacy",
        "",
    ]
    lines += _privacy_section(results)
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
