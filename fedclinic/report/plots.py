"""PNG plots of a run: matplotlib Figures drawn straight to PNG (no pyplot, no screen, no global backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from fedclinic.data import ImageSet

# sites named one by one in a plot (legend entries, ticks, rows of samples); a larger federation is drawn whole
MAX_NAMED_SITES = 20


def plot_central(rounds: list[dict], path: Path) -> None:
    """Central accuracy and IoU of the global model per round."""
    x = [r["round"] for r in rounds]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(x, [r["accuracy"] for r in rounds], marker="o", label="accuracy")
    ax.plot(x, [r["f1"] for r in rounds], marker="s", label="macro-F1")
    iou = [r["iou"] for r in rounds]
    if any(np.isfinite(v) for v in iou):
        ax.plot(x, iou, marker="^", label="mean IoU (lesions)")
    ax.set(xlabel="round", ylabel="score", ylim=(0, 1), title="Global model on the server's test set")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_epsilon(site_metrics: list[dict], path: Path, target: float) -> None:
    """Cumulative epsilon of each site after each round it trained in."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    by_site: dict[int, list[dict]] = {}
    for m in site_metrics:
        by_site.setdefault(int(m["site"]), []).append(m)
    named = len(by_site) <= MAX_NAMED_SITES  # a legend of a thousand sites says nothing
    for site, rows in sorted(by_site.items()):
        rows.sort(key=lambda m: m["round"])
        ax.plot([m["round"] for m in rows], [m["epsilon"] for m in rows], marker="o" if named else None,
                label=f"site {site}" if named else None, linewidth=1 if named else 0.5, alpha=1 if named else 0.3)
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label="target")
    title = "Record-level privacy loss per site" + ("" if named else f" ({len(by_site)} sites)")
    ax.set(xlabel="round", ylabel="epsilon spent (cumulative)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_label_distribution(sites: list[ImageSet], path: Path) -> None:
    """Stacked bars: how many images of each class every site holds."""
    counts = np.stack([s.label_counts() for s in sites])
    names = sites[0].class_names
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    bottom = np.zeros(len(sites))
    for k, name in enumerate(names):
        ax.bar(range(len(sites)), counts[:, k], bottom=bottom, label=name)
        bottom += counts[:, k]
    ax.set(xlabel="site", ylabel="training images", title="Label distribution per site")
    if len(sites) <= MAX_NAMED_SITES:
        ax.set_xticks(range(len(sites)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_site_samples(sites: list[ImageSet], path: Path, per_site: int = 6) -> None:
    """A few images of every site (of the first MAX_NAMED_SITES in a larger federation), with class and lesion box."""
    sites = sites[:MAX_NAMED_SITES]
    fig = Figure(figsize=(1.4 * per_site, 1.5 * len(sites)))
    axes = fig.subplots(len(sites), per_site, squeeze=False)
    for i, data in enumerate(sites):
        for j in range(per_site):
            ax = axes[i, j]
            ax.axis("off")
            if j >= len(data):
                continue
            img = data.images[j]
            h, w = img.shape[1:]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"site {i}: {data.class_names[data.labels[j]]}", fontsize=6)
            if data.boxes is not None and np.isfinite(data.boxes[j]).all():
                cx, cy, bw, bh = data.boxes[j]
                ax.add_patch(Rectangle(((cx - bw / 2) * w - 0.5, (cy - bh / 2) * h - 0.5), bw * w, bh * h,
                                           fill=False, edgecolor="red", linewidth=0.8))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_privacy_tradeoff(rows: list[dict], metric: str, path: Path, *, ylabel: str) -> None:
    """A final metric of each sweep point against the epsilon it spent (log x); the baseline as a dashed line.

    `rows` are sweep rows: `mode`, `noise_multiplier`, `max_grad_norm`, `max_epsilon` and the metric (None = not
    measured).
    Private points are joined by clipping norm; a point that spent no epsilon has no place on a log axis.
    """
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    private = [r for r in rows if r["mode"] != "off" and r[metric] is not None and (r["max_epsilon"] or 0) > 0]
    for norm in sorted({r["max_grad_norm"] for r in private}):
        group = sorted((r for r in private if r["max_grad_norm"] == norm), key=lambda r: r["max_epsilon"])
        ax.plot([r["max_epsilon"] for r in group], [r[metric] for r in group], marker="o",
                label=f"DP-SGD, clipping norm {norm:g}")
        for r in group:
            if r["noise_multiplier"]:  # a target-epsilon point sits at its epsilon; a fixed sigma needs naming
                ax.annotate(f"σ={r['noise_multiplier']:g}", (r["max_epsilon"], r[metric]), xytext=(3, 3),
                            textcoords="offset points", fontsize=7)
    if private:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    for r in rows:
        if r["mode"] == "off" and r[metric] is not None:
            ax.axhline(r[metric], color="k", linestyle="--", linewidth=1, label="non-private")
    ax.set(xlabel="epsilon spent (largest over sites)", ylabel=ylabel, ylim=(0, 1),
           title=f"Privacy/utility trade-off: {ylabel}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def privacy_setting(row: dict) -> str:
    """A sweep row's privacy setting in words: "off", "ε = 8" (a target) or "σ = 1" (a fixed noise multiplier)."""
    if row["mode"] == "off":
        return "off"
    return f"ε = {row['target_epsilon']:g}" if not row["noise_multiplier"] else f"σ = {row['noise_multiplier']:g}"


def plot_poisoning(rows: list[dict], path: Path) -> None:
    """A poisoning grid's final clean accuracy, IoU and backdoor success rate: a panel per metric (those measured),
    a group of bars per defence, a bar per privacy setting and attack.

    `rows` are sweep rows: `mode`, `target_epsilon`, `noise_multiplier`, `attack`, `defence` and the metrics.
    """
    metrics = [(m, label) for m, label in (("accuracy", "clean accuracy"), ("iou", "mean IoU (lesions)"),
                                           ("backdoor_success_rate", "backdoor success rate"))
               if any(r[m] is not None for r in rows)]
    defences = list(dict.fromkeys(r["defence"] for r in rows))

    def setting(r: dict) -> str:
        return f"{privacy_setting(r)}, {r['attack']}"

    settings = list(dict.fromkeys(setting(r) for r in rows))
    width = 0.8 / len(settings)
    fig = Figure(figsize=(max(6.0, 1.2 * len(defences)), 2.8 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, (metric, label) in zip(axes, metrics):
        for i, name in enumerate(settings):
            found = {r["defence"]: r[metric] for r in rows if setting(r) == name}
            values = [found.get(d) if found.get(d) is not None else float("nan") for d in defences]
            ax.bar([j + (i - (len(settings) - 1) / 2) * width for j in range(len(defences))], values, width,
                   label=name)
        ax.set_xticks(range(len(defences)), defences)
        ax.set(ylabel=label, ylim=(0, 1))
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("Under poisoning: each defence, per privacy setting and attack")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
