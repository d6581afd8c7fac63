"""Empirical privacy audit: can a loss-threshold attack tell the images a model trained on?

    from fedclinic.analysis.audit import audit_run
    audit = audit_run("runs/my-run")   # writes runs/my-run/audit.json and audit_roc.png
    audit["auc"], audit["tpr_at_1pct_fpr"]

The attack (Yeom et al., 2018) guesses "member" (trained on) when an image's
loss under the model is below a threshold; sweeping the threshold gives an ROC
curve. AUC 0.5 means it cannot tell members from unseen images; an overfitted
model gives its members away by their low losses. The low-FPR end matters
most (Carlini et al., 2022): under (epsilon, delta)-DP every attack has
TPR <= e^epsilon * FPR + delta, so a DP-SGD model must stay near the diagonal
there. An audit gives a lower bound on leakage, never a proof of privacy.

With a reference model (the canary audit's replay, trained on fresh scans
of the same sites and its canaries: fedclinic.canary_audit), the attack is also calibrated
per image: offline LiRA (Carlini et al. 2022) compares an image's
confidence under the global model, log(p / (1 - p)) of its true class, with
its confidence under the reference model, which saw neither members nor
non-members, in units of the reference's spread over all images (one
reference model gives no per-image variance; Carlini et al. recommend the
global one when references are few). An image that is merely easy is easy
for the reference too, so what stays is what training on it added.

Members are each site's training images. Non-members are images from the
same site that no one trained on: fresh scans from the site's own scanner
and prevalence for the synthetic sites, the site's validation split for file
data. Each site contributes as many members as non-members.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from fedclinic.config import Config, load_config
from fedclinic.data import ImageSet, site_data
from fedclinic.data.partition import stream
from fedclinic.data.synthetic import generate_fresh_site_scans
from fedclinic.device import resolve_device
from fedclinic.evaluation.metrics import batches, evaluating
from fedclinic.model import MultiTaskNet, load_model, per_example_losses

# non-members wanted over all sites for synthetic data: FPR steps of 0.1% need 1000 of them
MIN_NONMEMBERS = 1000


class AuditError(ValueError):
    """A run directory that cannot be audited."""


def example_losses(
    model: nn.Module, data: ImageSet, *, box_weight: float, device: str | torch.device, batch_size: int = 256
) -> np.ndarray:
    """Each image's training loss (cross-entropy + box_weight * box loss), as float64.

    The loss of one example as `multitask_loss` counts it in training, so the
    attack sees what the optimizer saw. `model` must already live on `device`;
    its train/eval mode is left as it was.
    """
    losses = [torch.empty(0, dtype=torch.float64)]
    with evaluating(model):
        for images, labels, true_boxes in batches(data, batch_size=batch_size, device=device):
            cls_loss, box_loss = per_example_losses(*model(images), labels, true_boxes)
            losses.append((cls_loss + box_weight * box_loss).double().cpu())
    return torch.cat(losses).numpy()


def _losses(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError(f"no {name} losses were given; an ROC curve needs at least one {name}")
    if np.isnan(values).any():
        raise ValueError(f"{np.isnan(values).sum()} of the {name} losses are NaN; a diverged model cannot be audited")
    return values


def roc(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, auc) of the loss-threshold attack: a score (loss) <= threshold is guessed "member".

    One point per distinct score, from (0, 0) to (1, 1). A threshold that
    several scores share moves the curve diagonally, so the AUC (trapezoids)
    equals the Mann-Whitney statistic with half credit for ties: the chance
    that a random member has a lower loss than a random non-member.
    """
    members, nonmembers = _losses(member_scores, "member"), _losses(nonmember_scores, "non-member")
    thresholds = np.unique(np.concatenate([members, nonmembers]))
    tpr = np.searchsorted(np.sort(members), thresholds, side="right") / len(members)
    fpr = np.searchsorted(np.sort(nonmembers), thresholds, side="right") / len(nonmembers)
    fpr, tpr = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr, tpr, target: float) -> float:
    """The best TPR among the curve's points with FPR <= target; 0.0 if there is none."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    allowed = fpr <= target
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def attack_summary(member_losses, nonmember_losses) -> dict:
    """AUC, TPR at 1% and 0.1% FPR, advantage (max TPR - FPR), set sizes and the curve."""
    fpr, tpr, auc = roc(member_losses, nonmember_losses)
    return {
        "auc": auc,
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_01pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "advantage": float(np.max(tpr - fpr)),
        "members": len(np.ravel(member_losses)),
        "nonmembers": len(np.ravel(nonmember_losses)),
        "curve": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def true_class_confidence(model: nn.Module, data: ImageSet, *, device: str | torch.device,
                          batch_size: int = 256) -> np.ndarray:
    """log(p / (1 - p)) of each image's true class under `model` (LiRA's statistic): the true logit minus the
    log-sum-exp of the others, which stays finite where p rounds to 1."""
    found = [torch.empty(0, dtype=torch.float64)]
    with evaluating(model):
        for images, labels, _ in batches(data, batch_size=batch_size, device=device):
            logits = model(images)[0].double()
            true = logits.gather(1, labels[:, None])[:, 0]
            others = logits.scatter(1, labels[:, None], -math.inf)
            found.append((true - torch.logsumexp(others, dim=1)).cpu())
    return torch.cat(found).numpy()


def calibrated_scores(target: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
    """Offline LiRA's score of each image (higher: member): its confidence under the target model minus the
    references' mean for it, over the references' spread across every image and reference."""
    stacked = np.stack(references)
    spread = float(np.std(stacked)) or 1.0
    return (target - stacked.mean(axis=0)) / spread


def audit_model(
    model: nn.Module, members: ImageSet, nonmembers: ImageSet, *, box_weight: float, device: str | torch.device
) -> dict:
    """The loss-threshold attack on `model` (already on `device`): `attack_summary` of the two sets' losses."""
    return attack_summary(
        example_losses(model, members, box_weight=box_weight, device=device),
        example_losses(model, nonmembers, box_weight=box_weight, device=device),
    )


def audit_sets(config: Config, site: int) -> tuple[ImageSet, ImageSet, str]:
    """(members, non-members, where the non-members come from) of `site`, of equal size.

    The larger set is subsampled with a stream of the data seed, so the same
    run always gives the same audit.
    """
    sites = config.federation.sites
    train, val = site_data(config.data, site, sites)
    if config.data.path:
        nonmembers, source = val, "each site's validation split"
    else:
        wanted = min(math.ceil(MIN_NONMEMBERS / sites), len(train))
        nonmembers, source = generate_fresh_site_scans(config.data, site, wanted), "fresh scans of each synthetic site"
    if len(nonmembers) == 0:
        raise AuditError(
            f"site {site} has no held-out images (data.val-fraction = {config.data.val_fraction}); "
            "the audit needs non-members"
        )
    n = min(len(train), len(nonmembers))
    rng = stream(config.data.seed, "membership audit", site)

    def sample(data: ImageSet) -> ImageSet:
        return data.subset(np.sort(rng.choice(len(data), n, replace=False)))

    return sample(train), sample(nonmembers), source


def _load_run(run_dir: Path) -> tuple[Config, MultiTaskNet]:
    if not run_dir.is_dir():
        raise AuditError(f"run directory '{run_dir}' does not exist")
    try:
        config = load_config(run_dir / "config.toml")
        model = load_model(run_dir / "global_model.pt")
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        raise AuditError(f"cannot audit run '{run_dir}': {err}") from None
    return config, model


def _check_fits(model: MultiTaskNet, data: ImageSet, run_dir: Path) -> None:
    arch = model.arch
    if (arch["in_channels"], arch["num_classes"]) != (data.channels, data.num_classes):
        raise AuditError(
            f"cannot audit run '{run_dir}': its model takes {arch['in_channels']}-channel images of "
            f"{arch['num_classes']} classes, but its data has {data.channels} channels and {data.num_classes} classes"
        )


def plot_roc(audit: dict, path: Path) -> None:
    """Log-log ROC of the attacks with the chance diagonal: the low-FPR corner is where leaks show."""
    # the smallest non-zero rate either axis can show; log axes cannot show 0
    floor = 1 / max(audit["members"], audit["nonmembers"])
    # a bare Figure draws with Agg and touches no pyplot state, so no backend needs choosing
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    curves = [("loss threshold", audit)]
    if audit.get("calibrated"):
        curves.append(("offline LiRA", audit["calibrated"]))
    for name, found in curves:
        ax.plot(found["curve"]["fpr"], found["curve"]["tpr"], label=f"{name} (AUC {found['auc']:.3f})")
    ax.plot([floor, 1], [floor, 1], color="k", linestyle="--", linewidth=1, label="chance")
    for rate in (0.001, 0.01):
        ax.axvline(rate, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title="Membership inference on the global model")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def audit_run(run_dir: str | Path, *, reference: nn.Module | None = None,
              on_site: Callable[[int, int], None] | None = None) -> dict:
    """Audit a run directory's global model against every site's data; writes audit.json and audit_roc.png.

    Returns `attack_summary` pooled over the sites, plus "sites" (each site's
    AUC and set sizes), "nonmembers_from" and, with a `reference` model that
    trained on none of the sets, "calibrated" (offline LiRA's
    `attack_summary`). `on_site(done, total)` is told of each site audited.
    """
    run_dir = Path(run_dir)
    config, model = _load_run(run_dir)
    device = resolve_device(config.training.device)
    model.to(device)
    if reference is not None:
        reference.to(device)
    box_weight = config.model.box_weight
    member_losses, nonmember_losses, sites = [], [], []
    calibrated: tuple[list, list] = ([], [])
    for site in range(config.federation.sites):
        members, nonmembers, source = audit_sets(config, site)
        _check_fits(model, members, run_dir)
        member_losses.append(example_losses(model, members, box_weight=box_weight, device=device))
        nonmember_losses.append(example_losses(model, nonmembers, box_weight=box_weight, device=device))
        _, _, auc = roc(member_losses[-1], nonmember_losses[-1])
        sites.append({"site": site, "auc": auc, "members": len(members), "nonmembers": len(nonmembers)})
        if reference is not None:
            for found, data in zip(calibrated, (members, nonmembers)):
                found.append(calibrated_scores(true_class_confidence(model, data, device=device),
                                               [true_class_confidence(reference, data, device=device)]))
        if on_site is not None:
            on_site(site + 1, config.federation.sites)
    audit = attack_summary(np.concatenate(member_losses), np.concatenate(nonmember_losses))
    audit.update(sites=sites, nonmembers_from=source)
    if reference is not None:  # attack_summary guesses "member" for low scores: LiRA's are high for members
        audit["calibrated"] = {"attack": "offline LiRA", "references": 1,
                               **attack_summary(-np.concatenate(calibrated[0]), -np.concatenate(calibrated[1]))}
    (run_dir / "audit.json").write_text(json.dumps(audit, indent=2))
    plot_roc(audit, run_dir / "audit_roc.png")
    return audit
