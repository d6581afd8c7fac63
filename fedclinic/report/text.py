"""report.md and report.html of a run: privacy, utility, robustness, compression, explanations, in plain words.

Both are rendered from results.json; report.html is the same text with every
image embedded, so it can be mailed to someone who did not run anything.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

from markdown_it import MarkdownIt


def format_metric(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_ratio(ratio: float, more: str, less: str, sign: str = "×") -> str:
    """2.00× smaller; a ratio below 1 the other way round: 0.62 -> 1.61× larger."""
    return f"{ratio:.2f}{sign} {more}" if ratio >= 1 else f"{1 / ratio:.2f}{sign} {less}"


def format_table(results: dict) -> str:
    """The short table `fedclinic simulate` ends with: record-level eps is the largest any site spent."""
    central = results["privacy"]["central"] is not None
    extra = f"  {'site eps':>8}" if central else ""
    lines = [f"{'round':>5}  {'accuracy':>8}  {'IoU':>6}  {'rec eps':>7}{extra}", "-" * (33 + len(extra))]
    for r in results["rounds"]:
        site_eps = f"  {format_metric(r['central_epsilon'], '.2f'):>8}" if central else ""
        lines.append(f"{r['round']:>5}  {format_metric(r['accuracy']):>8}  {format_metric(r['iou']):>6}  {r['max_epsilon']:>7.2f}{site_eps}")
    return "\n".join(lines)


def _poisoning_section(results: dict) -> list[str]:
    """Who attacked, with what, against which aggregator; and every site whose replies the server refused."""
    cfg, lines = results["config"], []
    if cfg.get("federation.attackers"):
        boost = f" (boost {cfg['federation.attack-boost']:g})" if cfg["federation.attack"] in ("sign-flip", "scale") else ""
        lines += [f"Simulated attack: site(s) {cfg['federation.attackers']} ran `{cfg['federation.attack']}`{boost} "
                  f"inside their ClientApp; the server aggregated with `{cfg['federation.strategy']}`. The accuracy "
                  "below is under that attack.", ""]
    success = results["final"].get("backdoor_success_rate")
    if success is not None:
        first = results["rounds"][0].get("backdoor_success_rate")
        before = "" if first is None else f" (the initial model's: {first:.1%})"
        lines += [f"**Backdoor success rate: {success:.1%}**{before}: the share of the server's test images of "
                  f"another class that the final model classifies as class {cfg['federation.backdoor-target']} once "
                  "they carry the trigger patch.", ""]
    clip = cfg.get("federation.update-clip-norm")
    if clip:
        lines += [f"The server clipped every kept reply's update to L2 norm {clip:g} (federation.update-clip-norm) "
                  "before aggregating it.", ""]
    refused = [s for s in results["sites"] if s.get("refused")]
    if refused:
        lines += ["The server refused these sites' replies (left out of the round's aggregate):", "",
                  "| site | rounds refused | last reason |", "| ---: | ---: | :--- |"]
        lines += [f"| {s['site']} | {s['refused']} | {s['refused_reason']} |" for s in refused]
        failing = [str(s["site"]) for s in refused if s["refused"] >= 2]
        if failing:
            lines += ["", f"**Site {', '.join(failing)} keeps failing:** its replies were refused in more than one "
                      "round; look at that site before the next run."]
    while lines and not lines[-1]:
        lines.pop()
    return ["", "## Under poisoning", "", *lines] if lines else []


def _robustness_section(rob: dict) -> list[str]:
    lines = [
        "## Under attack",
        f"{rob['attack'].upper()} ({rob['norm']}, {rob['steps']} step(s)) on {rob['n']} test images; budgets in "
        "pixel units of images in [0, 1] (1/255 is one grey level). Robust accuracy: the class head attacked; "
        "IoU under attack: the box head attacked, on the images with a lesion.",
        "",
        "| eps | eps × 255 | accuracy | IoU |",
        "| ---: | ---: | ---: | ---: |",
        f"| 0 | 0 | {format_metric(rob['clean_accuracy'])} | {format_metric(rob['clean_iou'])} |",
    ]
    for a in rob["attacks"]:
        lines.append(f"| {a['eps']:.4f} | {a['eps'] * 255:.1f} | {format_metric(a['robust_accuracy'])} | "
                     f"{format_metric(a['iou_under_attack'])} |")
    return lines + [""]


def _compression_section(comp: dict) -> list[str]:
    before, after = comp["before"], comp["after"]
    return [
        "## Compressed for deployment",
        f"`{comp['files']['int8_path']}`: int8 ONNX (ONNX Runtime static quantization, calibrated on "
        f"{comp['calibration_images']} server images; {comp['prune_amount']:.0%} of weights pruned). It runs with "
        f"onnxruntime alone. Compared on {comp['n']} test images, {comp['threads']} CPU thread(s):",
        "",
        "| | global_model.pt | int8 ONNX | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| size on disk | {before['bytes'] / 1024:.1f} KB | {after['bytes'] / 1024:.1f} KB | "
        f"{format_ratio(comp['size_ratio'], 'smaller', 'larger')} |",
        f"| ms per image, batch 1 | {before['ms_per_image_b1']:.3f} | {after['ms_per_image_b1']:.3f} | "
        f"{format_ratio(comp['speedup_b1'], 'faster', 'slower')} |",
        f"| ms per image, batch 64 | {before['ms_per_image_b64']:.3f} | {after['ms_per_image_b64']:.3f} | "
        f"{format_ratio(comp['speedup_b64'], 'faster', 'slower')} |",
        f"| accuracy | {format_metric(before['accuracy'])} | {format_metric(after['accuracy'])} | "
        f"{format_metric(comp['accuracy_change'] * 100, '+.1f')} points |",
        f"| IoU | {format_metric(before['iou'])} | {format_metric(after['iou'])} | {format_metric(comp['iou_change'], '+.3f')} |",
        f"| robust accuracy (transfer) | {format_metric(before['robust_accuracy'])} | {format_metric(after['robust_accuracy'])} | "
        f"{format_metric(comp['robust_accuracy_change'], '+.3f')} |",
        "",
        f"The two models predict the same class for {comp['agreement']:.1%} of the images.",
        "",
    ]


def _explanations_section(found: dict) -> list[str]:
    lines = [
        "## What the model looks at",
        "Attribution maps of sample test images (Captum); the green box is the true lesion, the magenta one the "
        "predicted box. Scores over the test images with a lesion, each map explaining the true class: the share "
        "of positive attribution inside the lesion box, against the box's share of the image (chance), and how "
        "often the strongest pixel falls inside the box (pointing game).",
        "",
        "| method | mass in box | chance | pointing hit rate | images |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method, s in found.items():
        lines.append(f"| {method.replace('_', ' ')} | {format_metric(s['mass_in_box'])} | {format_metric(s['chance_mass'])} | "
                     f"{format_metric(s['pointing_hit_rate'])} | {s['images']} |")
    return lines + ["", "![explanations](explanations.png)", ""]


def comparison_rows(results: dict) -> list[tuple[str, dict, float | None]]:
    """(model, its scores on the server's test set, record-level epsilon spent) for the federated model (when the
    results have one), the pooled models and silo's mean, worst and best site (worst and best per metric)."""
    pooled, silo = results["baselines"]["pooled"], results["baselines"]["silo"]
    rows = []
    if "final" in results:
        rows.append(("federated", results["final"],
                     results["final"]["max_epsilon"] if results["privacy"]["record_level"] else None))
    for key, label in (("non_private", "pooled, non-private"), ("private", "pooled, DP-SGD")):
        if pooled[key]:
            rows.append((label, pooled[key]["test"], pooled[key]["epsilon"]))
    for key in ("mean", "worst", "best"):
        rows.append((f"silo, {key} site" if key != "mean" else "silo, mean of sites", silo["test"][key],
                     silo["max_epsilon"]))
    return rows


def format_comparison(results: dict) -> str:
    """The federated, pooled and silo models on the server's test set, as the commands print them."""
    lines = [f"{'model':<20}  {'accuracy':>8}  {'IoU':>6}  {'rec eps':>7}", "-" * 47]
    for label, scores, eps in comparison_rows(results):
        lines.append(f"{label:<20}  {format_metric(scores['accuracy']):>8}  {format_metric(scores['iou']):>6}  "
                     f"{format_metric(eps, '.2f'):>7}")
    return "\n".join(lines)


def _baselines_section(results: dict) -> list[str]:
    """Federated vs pooled vs silo on the server's test set; silo on the sites' own validation splits too."""
    pooled, silo = results["baselines"]["pooled"], results["baselines"]["silo"]
    some = pooled["private"] or pooled["non_private"]
    lines = [
        "## Federated vs pooled vs silo",
        f"The same model, started from the federation's initial weights and trained by the sites' own local "
        f"training for {some['epochs']} epoch(s) over its data (the passes a site makes in the federation), scored "
        f"on the server's held-out test set ({some['test']['n']} images). **Pooled**: the training data of all "
        f"{pooled['sites']} sites in one place ({some['n']} images). **Silo**: each site alone on its own data. "
        f"Privacy: {pooled['note']}. Worst and best are per column; rec eps is the record-level epsilon spent "
        "(silo: the most any site spent).",
        "",
        "| model | accuracy | F1 | IoU | rec eps |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, scores, eps in comparison_rows(results):
        lines.append(f"| {label} | {format_metric(scores['accuracy'])} | {format_metric(scores['f1'])} | "
                     f"{format_metric(scores['iou'])} | {format_metric(eps, '.2f')} |")
    lines += ["", "Silo, each site on its own validation split:", "",
              "| | accuracy | F1 | IoU |", "| --- | ---: | ---: | ---: |"]
    for key in ("mean", "worst", "best"):
        v = silo["val"][key]
        lines.append(f"| {key} | {format_metric(v['accuracy'])} | {format_metric(v['f1'])} | {format_metric(v['iou'])} |")
    lines += ["", "| site | images | sigma | eps spent | test accuracy | test IoU | own val accuracy | own val IoU | "
              "val images |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in silo["sites"]:
        lines.append(f"| {s['site']} | {s['n']} | {format_metric(s['sigma'])} | {format_metric(s['epsilon'], '.2f')} | "
                     f"{format_metric(s['test']['accuracy'])} | {format_metric(s['test']['iou'])} | "
                     f"{format_metric(s['val']['accuracy'])} | {format_metric(s['val']['iou'])} | {s['val']['n']} |")
    return lines + [""]


def _personalization_section(results: dict) -> list[str]:
    """Global vs personalised model on each site's own validation split, beside silo's when the baselines ran."""
    p, baselines = results["personalization"], results.get("baselines")
    silo = baselines and {**{s["site"]: s["val"] for s in baselines["silo"]["sites"]}, **baselines["silo"]["val"]}
    lines = [
        "## Personalised on each site's own data",
        f"After the last round each site fine-tuned the global model for {p['epochs']} epoch(s) on its own training "
        f"split (FL + fine-tuning) and scored both models on its own validation split. {p['guarantee']} {p['release']}",
        "", "| site | val images | global accuracy | personalised accuracy | global IoU | personalised IoU | "
        + ("silo accuracy | " if silo else "") + "eps after |",
        "| ---: " * (7 + bool(silo)) + "|",
    ]
    rows = [(s["site"], s["site"], s["n"], s["global"], s["personalized"], format_metric(s["epsilon"], ".2f"))
            for s in p["sites"]]
    # over the sites that fine-tuned, each column its own worst and best
    rows += [(f"**{key}**", key, "", p["global"][key], p["personalized"][key], "") for key in ("mean", "worst", "best")]
    for label, key, n, before, after, eps in rows:
        cells = [label, n, format_metric(before["accuracy"]), format_metric(after["accuracy"]) if after else "declined",
                 format_metric(before["iou"]), format_metric(after["iou"]) if after else "declined"]
        cells += [format_metric(silo.get(key, {}).get("accuracy"))] if silo else []
        lines.append("| " + " | ".join(str(c) for c in cells + [eps]) + " |")
    reasons = [f"- {s['reason']}." for s in p["sites"] if s["declined"]]
    return lines + [""] + (reasons + [""] if reasons else [])


def render_baselines_report(results: dict) -> str:
    """report.md of a run directory that holds baselines and no federation (`fedclinic baselines` alone)."""
    lines = [f"# fedclinic baselines `{results['run']}`", "",
             "No federation ran here: these are the pooled and silo baselines of the configuration in config.toml "
             "(`fedclinic simulate --baselines` runs both).", ""]
    return "\n".join(lines + _baselines_section(results)) + "\n"


def _post_training_sections(results: dict) -> list[str]:
    lines = [""]
    if results.get("personalization"):
        lines += _personalization_section(results)
    if results.get("baselines"):
        lines += _baselines_section(results)
    if results.get("robustness"):
        lines += _robustness_section(results["robustness"])
    if results.get("compression"):
        lines += _compression_section(results["compression"])
    if results.get("explanations"):
        lines += _explanations_section(results["explanations"])
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
    from fedclinic.report.privacy_text import privacy_section  # it formats with this module's helpers

    lines += privacy_section(results)
    lines += _poisoning_section(results)
    lines += [
        "",
        "## The global model on the server's held-out test set",
        f"Final accuracy {format_metric(final['accuracy'])}, macro-F1 {format_metric(final['f1'])}, mean IoU of lesion boxes "
        f"{format_metric(final['iou'])} (n/a means the data has no boxes).",
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
    lines += _post_training_sections(results)
    t = results["timings"]
    steps = [f"{name} {seconds:.1f} s" for name, seconds in t.get("post_training_seconds", {}).items()]
    lines += [
        "",
        "## Timings",
        f"Server {t['server_seconds']:.1f} s; local training at all sites {t['site_train_seconds']:.1f} s; "
        f"central evaluation {t['central_eval_seconds']:.1f} s" + (f"; after training: {', '.join(steps)}." if steps else "."),
        "",
        "The global model loads with `fedclinic.load_model('global_model.pt')`.",
    ]
    return "\n".join(lines) + "\n"


def render_html(markdown: str, path: Path) -> str:
    """report.md as one self-contained HTML page: every image in `path` embedded as a data URI."""
    def embed(match: re.Match) -> str:
        image = path / match.group(2)
        if not image.exists():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = MarkdownIt("commonmark").enable("table").render(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", embed, markdown))
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>fedclinic report</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "img{max-width:100%}pre{background:#f4f4f4;padding:.5em}</style></head><body>\n"
        f"{body}</body></html>\n"
    )


def write_reports(results: dict, path: Path) -> None:
    """report.md and report.html into the run directory `path` (of the baselines alone when no federation ran)."""
    markdown = render_report(results, path) if "rounds" in results else render_baselines_report(results)
    (path / "report.md").write_text(markdown)
    (path / "report.html").write_text(render_html(markdown, path))
