"""The report's privacy section: the guarantees the run had, and what the audits measured beside them."""

from __future__ import annotations

from fedclinic.report.text import format_metric


def privacy_section(results: dict) -> list[str]:
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
            "every round the site took part in and any fine-tuning after them, and a site declines any round (or "
            "fine-tuning) that would take it past its budget.",
            "",
            "| site | images | sigma | epsilon spent | budget | delta | rounds trained | stopped |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | :--- |",
        ]
        for s in results["sites"]:
            stopped = f"declined round {s['stopped_in_round']}" if s["stopped_in_round"] else "no"
            lines.append(f"| {s['site']} | {s['n']} | {s['sigma']:.3f} | {s['epsilon']:.3f} | {s['budget']:g} | "
                         f"{s['delta']:g} | {s['rounds_trained']}{' + fine-tuning' if s.get('finetuned') else ''} | "
                         f"{stopped} |")
        lines += ["", "![epsilon per site](epsilon_per_site.png)", ""]
    if privacy["central"]:
        c = privacy["central"]
        lines += [
            f"**Site-level DP** (central, Flower's server-side fixed clipping): each site's update was clipped to "
            f"L2 norm {c['clipping_norm']} and "
            f"Gaussian noise (multiplier {c['noise_multiplier']}) was added to the aggregate. "
            f"Site-level epsilon = {format_metric(c['epsilon'])} at delta = {c['delta']:g} (Flower's RDP accountant, no "
            "amplification by sampling claimed). It protects whether a hospital took part and what it sent.",
            "",
        ]
    if not privacy["record_level"] and not privacy["central"]:
        lines.append("Privacy was **off**: this is the non-private baseline, with no formal guarantee for patients.")
    if results.get("stop_reason"):
        lines += ["", f"**Stopped early:** {results['stop_reason']}."]
    if results.get("audit"):
        lines += ["", *audit_section(results)]
    return lines


def audit_section(results: dict) -> list[str]:
    """The membership attacks on the final model, and the canary audit's epsilon lower bounds beside the
    accountant's epsilon."""
    a = results["audit"]
    lines = [
        "**Empirical audit.** A loss-threshold membership-inference attack on the final model, "
        f"{a['members']} training images of the sites against {a['nonmembers']} images nobody trained on "
        f"({a['nonmembers_from']}): AUC {a['auc']:.3f} (0.5 = cannot tell them apart), "
        f"TPR {a['tpr_at_1pct_fpr']:.3f} at 1% FPR and {a['tpr_at_01pct_fpr']:.3f} at 0.1% FPR. "
        "An audit is a lower bound on leakage, not a proof of privacy.",
    ]
    if a.get("calibrated"):
        c = a["calibrated"]
        lines += ["", f"Calibrated per image ({c['attack']}, against a reference model trained on fresh scans of "
                  f"the same sites): AUC {c['auc']:.3f}, TPR {c['tpr_at_1pct_fpr']:.3f} at 1% FPR and "
                  f"{c['tpr_at_01pct_fpr']:.3f} at 0.1% FPR."]
    lines += ["", "![membership-inference ROC](audit_roc.png)"]
    if "epsilon_lower_bound" not in a:
        return lines
    if a["likely_privacy_bug"]:
        lines += ["", f"**LIKELY PRIVACY BUG:** the audit's epsilon lower bound exceeds the accountant's epsilon "
                  f"(sites {', '.join(map(str, a['sites_exceeding'])) or 'of the federation'}) at "
                  f"{a['confidence']:.0%} confidence: the training leaked more than its accounting claims."]
    lines += [
        "",
        f"**Canary audit** (one run, Steinke, Nasr & Jagielski 2023): the federation was trained once more, in the "
        f"command's process, with {a['canaries']} canaries (noise scans with random labels), each put into its "
        "site's data by a coin only the auditor knew; the run's own model, scores and baselines never saw one. "
        f"From the sites' updates in every round (what the server sees), {a['correct']} of {a['guesses']} guesses "
        f"were right: with {a['confidence']:.0%} confidence the training was not DP for any epsilon below "
        f"**{a['epsilon_lower_bound']:.2f}** (epsilon-hat; the accountant's: {format_metric(a['epsilon'])}). "
        f"From the final model alone: {a['black_box']['epsilon_lower_bound']:.2f}. A lower bound is what this "
        "attack could show, not the true epsilon.",
        "",
        "| site | epsilon (this run) | epsilon (audited run) | epsilon-hat | canaries (in) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    run_epsilon = {s["site"]: s["epsilon"] for s in results["sites"]}
    private = results["privacy"]["record_level"] is not None
    for s in a["sites"]:
        spent = format_metric(run_epsilon.get(s["site"])) if private else "—"
        lines.append(f"| {s['site']} | {spent} | {format_metric(s['epsilon'])} | {s['epsilon_lower_bound']:.2f} | "
                     f"{s['canaries']} ({s['included']}) |")
    return lines
