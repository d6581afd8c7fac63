"""The typed configuration of a fedclinic run: defaults, TOML file, --set overrides.

    fedclinic simulate --config my.toml --set privacy.target-epsilon=3

One frozen dataclass per concern. Keys are the dotted kebab-case names of
Flower's run-config (`privacy.target-epsilon`), so the same key works in a
TOML file, in `--set`, and in `flwr run . --run-config "..."`. The defaults
here and in `[tool.flwr.app.config]` of pyproject.toml are one truth
(tests/test_config.py fails when they drift).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


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


@dataclass(frozen=True)
class ModelConfig:
    # channels of the first convolution; the encoder doubles it twice
    width: int = 16
    # lambda: weight of the box loss next to the classification loss
    box_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.width >= 4, f"model.width must be at least 4, got {self.width}")
        _require(self.box_weight >= 0, f"model.box-weight must be >= 0, got {self.box_weight}")


@dataclass(frozen=True)
class TrainingConfig:
    # passes over the site's data per round
    local_epochs: int = 2
    # expected batch size; with DP, Poisson sampling at rate batch-size / site size
    batch_size: int = 128
    # local optimizer: sgd or adam (Opacus wraps either as DP-SGD / DP-Adam)
    optimizer: str = "sgd"
    # learning rate of the local optimizer with DP-SGD (its updates are averages of
    # clipped, noisy per-example gradients, smaller than plain ones)
    learning_rate: float = 0.3
    # learning rate of the non-private baseline (privacy.mode=off or central), whose batch
    # gradient is clipped at privacy.max-grad-norm; at the DP rate it diverges
    baseline_learning_rate: float = 0.1
    # SGD momentum (ignored by adam)
    momentum: float = 0.9
    # auto (a GPU when one is present, else the CPU), cpu, or cuda
    device: str = "auto"

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
    # Opacus per-sample gradient engine: hooks, functorch or ew
    grad_sample_mode: str = "hooks"
    # central DP: L2 norm each site's model update is clipped to
    central_clipping_norm: float = 1.0
    # central DP: noise std on the sum of site updates, in units of central-clipping-norm
    central_noise_multiplier: float = 1.0
    # central DP: the site-level delta; must be below 1 / (number of sites)
    central_delta: float = 1e-3
    # after a simulated run, a membership-inference audit of the final model against
    # every site's training images (simulation only: the auditor needs the sites' data)
    audit: bool = True

    def __post_init__(self) -> None:
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
class FederationConfig:
    # number of hospital sites (SuperNodes in simulation)
    sites: int = 5
    # federated rounds
    rounds: int = 4
    # share of sites asked to train each round
    fraction_train: float = 1.0
    # fewest sites a round needs (capped at federation.sites)
    min_sites: int = 2
    # share of sites asked to evaluate on their local validation split each round
    # (0 by default: site metrics on patient data are a release DP-SGD does not cover)
    fraction_evaluate: float = 0.0
    # CPU cores reserved for each simulated site
    client_cpus: int = 1
    # share of a GPU for each simulated site (0 = CPU only; 0.25 = four sites per GPU)
    client_gpus: float = 0.0

    def __post_init__(self) -> None:
        _require(self.sites >= 1, f"federation.sites must be at least 1, got {self.sites}")
        _require(self.rounds >= 1, f"federation.rounds must be at least 1, got {self.rounds}")
        _require(0 < self.fraction_train <= 1, f"federation.fraction-train must be in (0, 1], got {self.fraction_train}")
        _require(self.min_sites >= 1, f"federation.min-sites must be at least 1, got {self.min_sites}")
        _require(
            0 <= self.fraction_evaluate <= 1,
            f"federation.fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}",
        )
        _require(self.client_cpus > 0, f"federation.client-cpus must be > 0, got {self.client_cpus}")
        _require(self.client_gpus >= 0, f"federation.client-gpus must be >= 0, got {self.client_gpus}")


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
    # no progress lines, only the final table
    quiet: bool = False


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_flat(self) -> dict[str, Any]:
        """The run-config form: {"privacy.target-epsilon": 8.0, ...}."""
        flat = {}
        for section in fields(self):
            part = getattr(self, section.name)
            for f in fields(part):
                flat[f"{section.name}.{f.name.replace('_', '-')}"] = getattr(part, f.name)
        return flat

    def to_toml(self) -> str:
        """The resolved configuration as TOML, readable back by `load_config`."""
        lines = []
        for section in fields(self):
            lines.append(f"[{section.name}]")
            part = getattr(self, section.name)
            for f in fields(part):
                lines.append(f"{f.name.replace('_', '-')} = {_toml_value(getattr(part, f.name))}")
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "Config":
        """Build from dotted kebab-case keys; unknown keys and wrong types are refused."""
        by_section: dict[str, dict[str, Any]] = {}
        known = VALID_KEYS
        for key, value in flat.items():
            if key not in known:
                raise ConfigError(_unknown_key_message(key))
            section, name = key.split(".", 1)
            by_section.setdefault(section, {})[name.replace("-", "_")] = _coerce(key, value)
        parts = {}
        for section in fields(cls):
            part_cls = section.default_factory  # type: ignore[misc]
            parts[section.name] = part_cls(**by_section.get(section.name, {}))
        return cls(**parts)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


DEFAULTS: dict[str, Any] = Config().to_flat()
VALID_KEYS = frozenset(DEFAULTS)


def _unknown_key_message(key: str) -> str:
    near = difflib.get_close_matches(key, sorted(VALID_KEYS), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else "; run `fedclinic simulate --help` for the keys"
    return f"unknown configuration key {key!r}{hint}"


def _coerce(key: str, value: Any) -> Any:
    """Check a value against the type of its default; ints are accepted for floats."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be a {type(default).__name__}, got {value!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """`privacy.target-epsilon=3` -> ("privacy.target-epsilon", 3.0); bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    if key not in VALID_KEYS:
        raise ConfigError(_unknown_key_message(key))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # an unquoted string such as a file path
    return key, value


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then `key=value` overrides, validated."""
    flat = dict(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        for key, value in _flatten(table).items():
            if key not in VALID_KEYS:
                raise ConfigError(f"in {str(path)!r}: {_unknown_key_message(key)}")
            flat[key] = value
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
    return Config.from_flat(flat)


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """The Config of a Flower run (`context.run_config`): only known keys are read."""
    return Config.from_flat({k: v for k, v in run_config.items() if k in VALID_KEYS})


def check_sites(config: Config, site_sizes: list[int]) -> None:
    """Refuse settings that the sites' actual sizes make impossible."""
    _require(len(site_sizes) >= 1, "the federation has no site; at least one is needed")
    smallest = min(site_sizes)
    site = site_sizes.index(smallest)
    _require(
        config.training.batch_size <= smallest,
        f"training.batch-size={config.training.batch_size} is larger than site {site}, "
        f"which has only {smallest} training images",
    )
    if config.privacy.local:
        _require(
            config.privacy.delta < 1 / smallest,
            f"privacy.delta={config.privacy.delta} must be below 1/{smallest} "
            f"(site {site} has {smallest} training images); choose a smaller delta",
        )
    sites = len(site_sizes)
    if config.privacy.central:
        _require(
            config.privacy.central_delta < 1 / sites,
            f"privacy.central-delta={config.privacy.central_delta} must be below 1/{sites} "
            f"(the federation has {sites} sites); choose a smaller delta",
        )
    unknown = sorted(k for k in config.privacy.budgets() if not 0 <= k < sites)
    _require(
        not unknown,
        f"privacy.site-budgets names site {unknown[0] if unknown else ''}, "
        f"but the sites are numbered 0 to {sites - 1}",
    )


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy with some fields changed: replace(cfg, privacy={"mode": "off"})."""
    parts = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    return dataclasses.replace(config, **parts)
