"""The privacy commands: `fedclinic budget` (the calculator), `fedclinic ledger show`, `fedclinic audit`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedclinic.cli.options import resolve
from fedclinic.config import ConfigError, PrivacyConfig, check_sites


def budget_parser(sub) -> None:
    p = sub.add_parser(
        "budget",
        help="privacy budget calculator: epsilon, the noise for a target epsilon, or a per-site plan",
        description="epsilon of DP-SGD (--noise-multiplier), the noise multiplier for a target (--target-epsilon), "
        "or with --plan a per-site table for a simulate configuration (same options as simulate).",
    )
    p.add_argument("--sample-rate", type=float, metavar="Q", help="Poisson sampling rate q = batch size / examples")
    p.add_argument("--noise-multiplier", type=float, metavar="S", help="sigma: print the epsilon it gives")
    p.add_argument("--target-epsilon", type=float, metavar="E", help="print the sigma that meets this epsilon")
    p.add_argument("--steps", type=int, metavar="T", help="optimizer steps over the whole training")
    p.add_argument("--delta", type=float, metavar="D", default=1e-5, help="delta (default 1e-5)")
    p.add_argument("--accountant", choices=["rdp", "prv"],
                   help=f"default: privacy.accountant's ({PrivacyConfig.accountant}); with --plan it sets that key")
    p.add_argument("--plan", action="store_true", help="a table per site for the configuration given by the options below")
    p.add_argument("--site-sizes", metavar="N,N,...", help="training images of each site (instead of the configured data)")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[])
    p.add_argument("--sites", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--data", metavar="FILE.npz")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def budget(args: argparse.Namespace) -> int:
    if args.plan:
        from fedclinic.privacy.accounting import plan_sites

        return _budget_plan(args, plan_sites)
    args.accountant = args.accountant or PrivacyConfig.accountant
    if args.sample_rate is None or args.steps is None:
        raise ConfigError("budget needs --sample-rate and --steps (or --plan)")
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ConfigError("budget needs exactly one of --noise-multiplier (to get epsilon) or --target-epsilon (to get sigma)")
    q, steps, delta = args.sample_rate, args.steps, args.delta
    for ok, message in ((0 < q <= 1, f"--sample-rate must be in (0, 1], got {q}"),
                        (steps >= 1, f"--steps must be at least 1, got {steps}"),
                        (0 < delta < 1, f"--delta must be in (0, 1), got {delta}")):
        if not ok:
            raise ConfigError(message)
    from fedclinic.privacy.accounting import calibrate_noise, epsilon  # Opacus: 1.6 s, after the arguments' checks

    out = {"sample_rate": q, "steps": steps, "delta": delta, "accountant": args.accountant}
    if args.noise_multiplier is not None:
        if args.noise_multiplier <= 0:
            raise ConfigError(f"--noise-multiplier must be > 0, got {args.noise_multiplier}")
        out["noise_multiplier"] = args.noise_multiplier
        out["epsilon"] = epsilon([(args.noise_multiplier, q, steps)], delta=delta, accountant=args.accountant)
    else:
        if args.target_epsilon <= 0:
            raise ConfigError(f"--target-epsilon must be > 0, got {args.target_epsilon}")
        try:
            sigma = calibrate_noise(target_epsilon=args.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                    accountant=args.accountant)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        out["noise_multiplier"] = sigma
        out["epsilon"] = epsilon([(sigma, q, steps)], delta=delta, accountant=args.accountant)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"epsilon = {out['epsilon']:.4f} at delta = {delta:g} ({args.accountant.upper()}), "
              f"sigma = {out['noise_multiplier']:.4f}, q = {q:g}, {steps} steps")
    return 0


def _budget_plan(args: argparse.Namespace, plan_sites) -> int:
    from fedclinic.data import site_sizes

    config = resolve(args)
    if args.site_sizes:
        try:
            sizes = [int(n) for n in args.site_sizes.split(",")]
        except ValueError:
            raise ConfigError(f"--site-sizes expects whole numbers separated by commas, got {args.site_sizes!r}") from None
    else:
        sizes = site_sizes(config.data, config.federation.sites)
    check_sites(config, sizes)
    t, p = config.training, config.privacy
    try:
        rows = plan_sites(sizes, batch_size=t.batch_size, local_epochs=t.local_epochs,
                          rounds=config.federation.rounds, target_epsilon=p.target_epsilon, delta=p.delta,
                          accountant=p.accountant, noise_multiplier=p.noise_multiplier, budgets=p.budgets(),
                          finetune_epochs=config.personalize.epochs)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.json:
        print(json.dumps({"target_epsilon": p.target_epsilon, "delta": p.delta, "accountant": p.accountant,
                          "sites": rows}))
        return 0
    noise = f"fixed sigma {p.noise_multiplier:g}" if p.noise_multiplier else "sigma calibrated to each site's budget"
    finetune = config.personalize.epochs
    then = f", then {finetune} epoch(s) of fine-tuning" if finetune else ""
    print(f"budget epsilon {p.target_epsilon:g} at delta {p.delta:g} per site over {config.federation.rounds} rounds"
          f"{then} ({p.accountant.upper()}; {noise}); batch {t.batch_size}, {t.local_epochs} local epoch(s)")
    rounds = config.federation.rounds
    head = "  ".join(f"eps@r{r}" for r in range(1, rounds + 1)) + ("  eps@ft" if finetune else "")
    print(f"{'site':>4}  {'images':>6}  {'q':>7}  {'steps/r':>7}  {'sigma':>6}  {'budget':>6}  {head}  trains")
    for row in rows:
        eps = "  ".join(f"{e:>6.2f}" for e in row["epsilon_by_round"])
        eps += f"  {row['epsilon_after_finetuning']:>6.2f}" if finetune else ""
        stop = row["rounds_within_budget"]
        trains = ("all rounds" if stop == rounds else "no round" if stop == 0
                  else f"round{'s 1-' if stop > 1 else ' '}{stop}, then stops")
        if finetune:
            trains += ", fine-tunes" if row["finetunes"] else ", declines the fine-tuning"
        print(f"{row['site']:>4}  {row['n']:>6}  {row['sample_rate']:>7.4f}  {row['steps_per_round']:>7}  "
              f"{row['noise_multiplier']:>6.3f}  {row['budget']:>6.2f}  {eps}  {trains}")
    return 0


def audit_parser(sub) -> None:
    p = sub.add_parser("audit", help="membership-inference audit of a run's global model",
                       description="A loss-threshold membership-inference attack on RUN_DIR/global_model.pt: each "
                       "site's training images against images of the same site that no one trained on. Prints "
                       "AUC and TPR at 1% and 0.1% FPR; writes audit.json and audit_roc.png into RUN_DIR and "
                       "adds the audit to its results.json and report.md.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--canaries", type=int, metavar="N",
                   help="also the one-run canary audit with N canaries (default: the run's privacy.audit-canaries): "
                        "the federation trained once more in this process, a lower bound on epsilon beside the "
                        "accountant's, and a calibrated attack (offline LiRA); needs the run's results.json")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 3 when the canary audit flags a likely privacy bug")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def audit(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if args.canaries is not None and args.canaries < 0:
        raise ConfigError(f"--canaries must be >= 0, got {args.canaries}")
    finished = (run_dir / "results.json").exists()  # a fedclinic run: the audit goes into its results and reports
    if finished:
        from fedclinic.api import audit_into_run

        found = audit_into_run(run_dir, canaries=args.canaries)["audit"]
    elif args.canaries:
        raise ConfigError(f"{run_dir} has no results.json: the canary audit adds its bounds to a run's results")
    else:  # a run directory from elsewhere: just the model and its config
        from fedclinic.analysis.audit import audit_run

        found = {k: v for k, v in audit_run(run_dir).items() if k != "curve"}
    if args.json:
        print(json.dumps(found))
    else:
        print(format_audit(found))
        written = ["audit.json", "audit_roc.png"] + (["canary_audit.json"] if "canaries" in found else [])
        if finished:
            written += ["results.json", "report.md", "report.html"]
        print("written: " + ", ".join(str(run_dir / name) for name in written))
    return privacy_bug_status(found, strict=args.strict)


def format_audit(found: dict) -> str:
    """The audit's lines: the loss-threshold attack, the calibrated one, the canary audit's bounds."""
    lines = [f"membership inference (loss threshold), {found['members']} members vs {found['nonmembers']} "
             f"non-members ({found['nonmembers_from']}): AUC {found['auc']:.3f}, "
             f"TPR {found['tpr_at_1pct_fpr']:.3f} at 1% FPR, {found['tpr_at_01pct_fpr']:.3f} at 0.1% FPR"]
    if found.get("calibrated"):
        c = found["calibrated"]
        lines.append(f"membership inference ({c['attack']}, calibrated by a reference model): AUC {c['auc']:.3f}, "
                     f"TPR {c['tpr_at_1pct_fpr']:.3f} at 1% FPR, {c['tpr_at_01pct_fpr']:.3f} at 0.1% FPR")
    if "epsilon_lower_bound" in found:
        accounted = "none (not private)" if found["epsilon"] is None else f"{found['epsilon']:.2f}"
        lines.append(f"canary audit, {found['canaries']} canaries: epsilon >= {found['epsilon_lower_bound']:.2f} "
                     f"at {found['confidence']:.0%} confidence from the sites' updates ({found['correct']} of "
                     f"{found['guesses']} guesses right), >= {found['black_box']['epsilon_lower_bound']:.2f} from the "
                     f"final model alone; the accountant's epsilon: {accounted}")
    return "\n".join(lines)


def privacy_bug_status(found: dict, *, strict: bool) -> int:
    """Say loudly on stderr when the canary audit caught more leakage than the accountant allows; the exit
    status: 3 with `strict`, else 0."""
    if not found.get("likely_privacy_bug"):
        return 0
    where = ", ".join(f"site {s['site']}: {s['epsilon_lower_bound']:.2f} > {s['epsilon']:.2f}" for s in found["sites"]
                      if s["site"] in found["sites_exceeding"])
    print(f"fedclinic: LIKELY PRIVACY BUG: the canary audit's epsilon lower bound exceeds the accountant's epsilon "
          f"at {found['confidence']:.0%} confidence ({where or 'the federation: '}"
          f"{'' if where else format(found['epsilon_lower_bound'], '.2f') + ' > ' + format(found['epsilon'], '.2f')}"
          "): the training leaked more than its accounting claims", file=sys.stderr)
    return 3 if strict else 0


def ledger_parser(sub) -> None:
    p = sub.add_parser("ledger", help="what a site has spent, from its privacy ledger",
                       description="fedclinic ledger show DIR: a site's noise plan and every DP release it made, "
                       "with its cumulative epsilon after each round and the fine-tuning. DIR is a site's state "
                       "directory (runs/NAME/sites/site-K in simulation, the SuperNode's state-dir when deployed).")
    p.add_argument("action", choices=["show"])
    p.add_argument("state_dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def ledger(args: argparse.Namespace) -> int:
    from fedclinic.privacy.ledger import ROUND, Ledger

    book = Ledger.open(args.state_dir, site=None)
    spent = book.spending()
    if args.json:
        print(json.dumps(spent))
        return 0
    plan = spent["plan"]
    if plan is None:
        print(f"site {spent['site']}: no DP release recorded yet")
        return 0
    rounds = [r for r in spent["rounds"] if r["kind"] == ROUND]
    finetuned = " and the fine-tuning" if len(rounds) < len(spent["rounds"]) else ""
    print(f"site {spent['site']}: epsilon {spent['epsilon']:.4f} spent at delta {spent['delta']:g} "
          f"over {len(rounds)} round(s){finetuned} ({spent['accountant'].upper()} accountant)")
    finetune = f", then {plan['finetune_steps']} steps of fine-tuning" if plan["finetune_steps"] else ""
    print(f"plan: sigma {plan['noise_multiplier']:.4f}, q {plan['sample_rate']:.4g}, "
          f"{plan['steps_per_round']} steps a round, {plan['rounds']} rounds{finetune}, "
          f"budget epsilon {plan['target_epsilon']:g}")
    print(f"{'round':>5}  {'sigma':>7}  {'q':>7}  {'steps':>5}  {'epsilon':>8}  when (UTC)")
    for r in spent["rounds"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))
        kind = "" if r["kind"] == ROUND else f"  {r['kind']}"
        print(f"{r['round']:>5}  {r['noise_multiplier']:>7.4f}  {r['sample_rate']:>7.4g}  {r['steps']:>5}  "
              f"{r['epsilon']:>8.4f}  {when}{kind}")
    return 0
