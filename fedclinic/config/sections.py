"""The sections of a run's configuration: one frozen dataclass per concern, each field commented and validated.

    from fedclinic.config import PrivacyConfig
    PrivacyConfig(target_epsilon=3)       # ConfigError names a bad value in one sentence

fedclinic/config/__init__.py assembles them into `Config` and reads TOML
files and --set overrides; the field comments here are docs/configuration.md's key table
(written by fedclinic/config/keys.py).
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration a user wrote that fedclinic cannot run."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    # a MedMNIST-style .npz file; empty means the generated synthetic hospital sites
    path: str = ""
    # seed of everything random about the data (site profiles, sizes, images, splits)
    seed: int = 0
    # side length in pixels of the synthetic scans
    image_size: int = 32
    # mean number of images per synthetic site
    site_size: int = 800
    # spread of site sizes (sigma of a log-normal around site-size); 0 means equal sizes
    quantity_skew: float = 0.5
    # Dirichlet alpha of each site's label prevalence; small = skewed, large = near iid
    label_alpha: float = 1.0
    # how a file's train split is divided among sites: iid, dirichlet (label skew), quantity
    partitioner: str = "dirichlet"
    # size of the server's held-out synthetic test set
    test_size: int = 1000
    # the server's own held-out .npz file (test_* keys), as in deployment where the server
    # holds no site data; empty means data.path's test split, or the generated test set
    test_path: str = ""
    # share of each site's partition kept aside as its local validation split
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _require(self.image_size >= 16, f"data.image-size must be at least 16 pixels, got {self.image_size}")
        _require(self.site_size >= 10, f"data.site-size must be at least 10 images, got {self.site_size}")
        _require(self.quantity_skew >= 0, f"data.quantity-skew must be >= 0, got {self.quantity_skew}")
        _require(self.label_alpha > 0, f"data.label-alpha must be > 0, got {self.label_alpha}")
        _require(
            self.partitioner in ("iid", "dirichlet", "quantity"),
            f"data.partitioner must be one of iid, dirichlet, quantity, got {self.partitioner!r}",
        )
        _require(self.test_size >= 10, f"data.test-size must be at least 10 images, got {self.test_size}")
        _require(0 <= self.val_fraction < 0.5, f"data.val-fraction must be in [0, 0.5), got {self.val_fraction}")


ENCODERS = ("scattering", "cnn")


@dataclass(frozen=True)
class ModelConfig:
    # scattering (a fixed wavelet scattering transform, then two trained conv blocks:
    # learns far better under DP) or cnn (four trained conv blocks)
    encoder: str = "scattering"
    # channels of the trained conv blocks (the cnn encoder doubles them twice on the way)
    width: int = 16
    # lambda: weight of the box loss next to the classification loss
    box_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.encoder in ENCODERS, f"model.encoder must be scattering or cnn, got {self.encoder!r}")
        _require(self.width >= 4, f"model.width must be at least 4, got {self.width}")
        _require(self.box_weight >= 0, f"model.box-weight must be >= 0, got {self.box_weight}")


@dataclass(frozen=True)
class TrainingConfig:
    # passes over the site's data per round
    local_epochs: int = 1
    # expected batch size; with DP, Poisson sampling at rate 1 / ceil(site size / batch-size),
    # so a site smaller than the batch takes all its images in every step
    batch_size: int = 128
    # local optimizer: sgd or adam (Opacus wraps either as DP-SGD / DP-Adam)
    optimizer: str = "sgd"
    # learning rate of the local optimizer with DP-SGD (its updates are averages of
    # clipped, noisy per-example gradients, smaller than plain ones)
    learning_rate: float = 3.0
    # learning rate of the non-private baseline (privacy.mode=off or central), whose batch
    # gradient is clipped at privacy.max-grad-norm; at the DP rate it diverges
    baseline_learning_rate: float = 0.3
    # SGD momentum (ignored by adam)
    momentum: float = 0.9
    # auto (a GPU when one is present, else the CPU), cpu, or cuda
    device: str = "auto"
    # scanner (each image seen through randomly different gamma, contrast, brightness and
    # sensor noise) or none
    augment: str = "scanner"
    # augmented views of each record per step; under DP their gradients are averaged before
    # clipping, so more views cost compute, not privacy
    augment_views: int = 1
    # learning rate over the rounds: cosine (from the full rate down to a tenth in the last
    # round) or constant
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        _require(self.local_epochs >= 1, f"training.local-epochs must be >= 1, got {self.local_epochs}")
        _require(self.batch_size >= 1, f"training.batch-size must be >= 1, got {self.batch_size}")
        _require(self.learning_rate > 0, f"training.learning-rate must be > 0, got {self.learning_rate}")
        _require(
            self.baseline_learning_rate > 0,
            f"training.baseline-learning-rate must be > 0, got {self.baseline_learning_rate}",
        )
        _require(self.optimizer in ("sgd", "adam"), f"training.optimizer must be sgd or adam, got {self.optimizer!r}")
        _require(0 <= self.momentum < 1, f"training.momentum must be in [0, 1), got {self.momentum}")
        _require(
            self.device in ("auto", "cpu", "cuda"),
            f"training.device must be auto, cpu or cuda, got {self.device!r}",
        )
        _require(self.augment in ("scanner", "none"), f"training.augment must be scanner or none, got {self.augment!r}")
        _require(self.augment_views >= 1, f"training.augment-views must be at least 1, got {self.augment_views}")
        _require(self.schedule in ("cosine", "constant"),
                 f"training.schedule must be cosine or constant, got {self.schedule!r}")


MODES = ("local", "central", "both", "off")


@dataclass(frozen=True)
class PrivacyConfig:
    # which guarantee: local (record-level DP-SGD at every site), central (site-level:
    # clipped site updates, noise on the aggregate), both, or off (non-private baseline)
    mode: str = "local"
    # each site's record-level epsilon over the whole training (all rounds), not per
    # round; noise is calibrated to it, and it is each site's hard budget
    target_epsilon: float = 8.0
    # each site's delta; must be below 1 / (size of the smallest site)
    delta: float = 1e-5
    # fixed DP-SGD noise multiplier; 0 means calibrate it to target-epsilon
    noise_multiplier: float = 0.0
    # per-site budgets overriding target-epsilon as a site's hard limit, "SITE=EPS,...",
    # e.g. "0=2.5,3=4"; a deployed site sets max-epsilon in its node config instead
    site_budgets: str = ""
    # per-example gradient clipping norm C
    max_grad_norm: float = 1.0
    # privacy accountant: rdp or prv (Opacus)
    accountant: str = "rdp"
    # Opacus per-sample gradient engine: hooks, functorch or ew (torch's expanded weights,
    # the fastest on the default model: bench/dp_overhead.py)
    grad_sample_mode: str = "ew"
    # central DP: L2 norm each site's model update is clipped to
    central_clipping_norm: float = 1.0
    # central DP: noise std on the sum of site updates, in units of central-clipping-norm
    central_noise_multiplier: float = 1.0
    # central DP: the site-level delta; must be below 1 / (number of sites)
    central_delta: float = 1e-3
    # after a simulated run, a membership-inference audit of the final model against
    # every site's training images (simulation only: the auditor needs the sites' data)
    audit: bool = True
    # with privacy.audit: canaries in all for the one-run audit's epsilon lower bound, which
    # trains the federation once more in the command's process with them (0 = no canary audit)
    audit_canaries: int = 0

    def __post_init__(self) -> None:
        _require(self.audit_canaries >= 0,
                 f"privacy.audit-canaries must be >= 0 (0 = no canary audit), got {self.audit_canaries}")
        _require(self.audit or not self.audit_canaries,
                 f"privacy.audit-canaries={self.audit_canaries} needs privacy.audit = true (the canary audit is "
                 "part of the audit after a simulated run)")
        _require(self.mode in MODES, f"privacy.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _require(self.target_epsilon > 0, f"privacy.target-epsilon must be > 0, got {self.target_epsilon}")
        _require(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        _require(self.noise_multiplier >= 0, f"privacy.noise-multiplier must be >= 0, got {self.noise_multiplier}")
        self.budgets()  # refuses a malformed site-budgets string
        _require(self.max_grad_norm > 0, f"privacy.max-grad-norm must be > 0, got {self.max_grad_norm}")
        _require(self.accountant in ("rdp", "prv"), f"privacy.accountant must be rdp or prv, got {self.accountant!r}")
        _require(
            self.grad_sample_mode in ("hooks", "functorch", "ew"),
            f"privacy.grad-sample-mode must be hooks, functorch or ew, got {self.grad_sample_mode!r}",
        )
        _require(
            self.central_clipping_norm > 0,
            f"privacy.central-clipping-norm must be > 0, got {self.central_clipping_norm}",
        )
        _require(
            self.central_noise_multiplier > 0,
            f"privacy.central-noise-multiplier must be > 0, got {self.central_noise_multiplier}",
        )
        _require(0 < self.central_delta < 1, f"privacy.central-delta must be in (0, 1), got {self.central_delta}")

    @property
    def local(self) -> bool:
        """Record-level DP-SGD at the sites."""
        return self.mode in ("local", "both")

    @property
    def central(self) -> bool:
        """Site-level DP on the server's aggregate."""
        return self.mode in ("central", "both")

    def budgets(self) -> dict[int, float]:
        """The per-site overrides of privacy.site-budgets: {site: epsilon}."""
        budgets = {}
        for item in filter(None, (part.strip() for part in self.site_budgets.split(","))):
            site, _, eps = item.partition("=")
            try:
                budgets[int(site)] = float(eps)
            except ValueError:
                raise ConfigError(
                    f"privacy.site-budgets must look like \"0=2.5,3=4\" (site=epsilon), got {self.site_budgets!r}"
                ) from None
            _require(budgets[int(site)] > 0, f"privacy.site-budgets: site {site}'s epsilon must be > 0, got {eps}")
        return budgets

    def budget(self, site: int) -> float:
        """The site's hard record-level budget epsilon_max."""
        return self.budgets().get(site, self.target_epsilon)


@dataclass(frozen=True)
class PersonalizeConfig:
    # local epochs each site fine-tunes the global model for after the last round (FL + fine-tuning);
    # under record-level DP it is DP-SGD charged to the site's ledger, and the site's noise is planned
    # for it from round 1; 0 switches personalisation off
    epochs: int = 1

    def __post_init__(self) -> None:
        _require(self.epochs >= 0,
                 f"personalize.epochs must be >= 0 (0 switches personalisation off), got {self.epochs}")


ATTACKS, NORMS, TRAIN_ATTACKS = ("fgsm", "pgd"), ("linf", "l2"), ("none", "fgsm", "pgd")


def parse_eps_list(text: str, key: str) -> tuple[float, ...]:
    """"0.0039,0.0078" -> (0.0039, 0.0078): attack budgets in pixel units of images in [0, 1]."""
    try:
        values = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ConfigError(f"{key} must be numbers separated by commas, e.g. \"0.0039,0.0078\", got {text!r}") from None
    _require(bool(values) and all(0 <= v <= 1 for v in values),
             f"{key} must list one or more budgets in [0, 1] (pixel units), got {text!r}")
    return values


@dataclass(frozen=True)
class RobustnessConfig:
    # after the last round, attack the global model on the server's test set
    enabled: bool = True
    # the attack of the full evaluation: pgd or fgsm
    attack: str = "pgd"
    # the attack's norm: linf or l2
    norm: str = "linf"
    # attack budgets, pixel units of images in [0, 1] (1/255, 2/255, 4/255, 8/255)
    eps: str = "0.0039,0.0078,0.0157,0.0314"
    # PGD steps
    steps: int = 10
    # test images attacked (a seeded sample; 0 = all)
    max_images: int = 500
    # FGSM at this budget after every round, a cheap check (0 = off)
    round_check_eps: float = 0.0
    # adversarial training at the sites: none, fgsm or pgd examples mixed into the local batches
    train_attack: str = "none"
    # budget of those training examples (pixel units)
    train_eps: float = 0.0157
    # share of each local batch replaced by its adversarial version
    train_fraction: float = 0.5

    def __post_init__(self) -> None:
        _require(self.attack in ATTACKS, f"robustness.attack must be fgsm or pgd, got {self.attack!r}")
        _require(self.norm in NORMS, f"robustness.norm must be linf or l2, got {self.norm!r}")
        parse_eps_list(self.eps, "robustness.eps")
        _require(self.steps >= 1, f"robustness.steps must be at least 1, got {self.steps}")
        _require(self.max_images >= 0, f"robustness.max-images must be >= 0, got {self.max_images}")
        _require(0 <= self.round_check_eps <= 1, f"robustness.round-check-eps must be in [0, 1], got {self.round_check_eps}")
        _require(self.train_attack in TRAIN_ATTACKS,
                 f"robustness.train-attack must be none, fgsm or pgd, got {self.train_attack!r}")
        _require(0 <= self.train_eps <= 1, f"robustness.train-eps must be in [0, 1], got {self.train_eps}")
        _require(0 < self.train_fraction <= 1, f"robustness.train-fraction must be in (0, 1], got {self.train_fraction}")

    @property
    def eps_list(self) -> tuple[float, ...]:
        return parse_eps_list(self.eps, "robustness.eps")


@dataclass(frozen=True)
class CompressionConfig:
    # after the last round, export the global model to ONNX and quantize it to int8 (ONNX Runtime)
    enabled: bool = True
    # share of weights zeroed by global magnitude pruning before export (0 = none)
    prune_amount: float = 0.0
    # server test images used to calibrate the int8 ranges
    calibration_images: int = 256

    def __post_init__(self) -> None:
        _require(0 <= self.prune_amount < 1, f"compression.prune-amount must be in [0, 1), got {self.prune_amount}")
        _require(self.calibration_images >= 1,
                 f"compression.calibration-images must be at least 1, got {self.calibration_images}")


@dataclass(frozen=True)
class ExplainConfig:
    # after the last round, attribution maps (Captum) and how much of them falls in the lesion box
    enabled: bool = True
    # sample test images drawn per class in explanations.png
    per_class: int = 3
    # test images with a lesion scored for the pointing game (a seeded sample; 0 = all)
    max_images: int = 200

    def __post_init__(self) -> None:
        _require(self.per_class >= 1, f"explain.per-class must be at least 1, got {self.per_class}")
        _require(self.max_images >= 0, f"explain.max-images must be >= 0, got {self.max_images}")


@dataclass(frozen=True)
class OutputConfig:
    # folder that holds one sub-folder per run
    dir: str = "runs"
    # name of this run's folder; empty means a timestamp
    name: str = ""
    # no progress lines or bars, only the final table
    quiet: bool = False
    # continue the run in output.dir/output.name from its checkpoint.pt (set by --resume RUN_DIR)
    resume: bool = False
    # a sweep's later points, run one after another in this same Flower run (set by fedclinic sweep): JSON, a list
    # of the keys in which each point differs from this run
    next_points: str = ""
