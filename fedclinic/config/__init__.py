"""The typed configuration of a fedclinic run: defaults, TOML file, --set overrides.

    fedclinic simulate --config my.toml --set privacy.target-epsilon=3

One frozen dataclass per concern (sections.py). Keys are the dotted kebab-case names of
Flower's run-config (`privacy.target-epsilon`), so the same key works in a
TOML file, in `--set`, and in `flwr run . --run-config "..."`. The defaults
here and in `[tool.flwr.app.config]` of pyproject.toml are one truth
(tests/test_config.py fails when they drift).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from fedclinic.config.federation import POISONING, ROBUST, STRATEGIES, FederationConfig, site_ids  # noqa: F401
from fedclinic.config.sections import (  # noqa: F401 (the public names of fedclinic.config)
    ConfigError,
    _require,
    DataConfig,
    ModelConfig,
    TrainingConfig,
    MODES,
    PrivacyConfig,
    PersonalizeConfig,
    ATTACKS,
    NORMS,
    TRAIN_ATTACKS,
    parse_eps_list,
    RobustnessConfig,
    CompressionConfig,
    ExplainConfig,
    OutputConfig,
)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
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
    """`privacy.target-epsilon=3` -> ("privacy.target-epsilon", 3.0); bare words are strings, and so is any
    unquoted value of a text key (`federation.attack=nan` is the attack, `federation.attackers=1` one site)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    if key not in VALID_KEYS:
        raise ConfigError(_unknown_key_message(key))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # an unquoted string such as a file path
    if isinstance(DEFAULTS[key], str) and not isinstance(value, str):
        value = raw
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


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, defaults: list[str] = ()) -> Config:
    """DEFAULTS, then `defaults` (a command's own, `key=value`), the TOML file, then `overrides`, validated."""
    flat = dict(DEFAULTS)
    flat.update(parse_override(text) for text in defaults)
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


def differing_keys(base: Config, config: Config) -> dict[str, Any]:
    """The flat keys in which `config` differs from `base`: what a sweep's later point sends its sites."""
    before = base.to_flat()
    return {key: value for key, value in config.to_flat().items() if before[key] != value}


def with_keys(config: Config, keys: Mapping[str, Any]) -> Config:
    """`config` with some flat keys changed ({"privacy.mode": "off"}); unknown keys and wrong types are refused."""
    return Config.from_flat({**config.to_flat(), **keys})


def sweep_runs(config: Config) -> list[tuple[Config, str]]:
    """The runs one Flower run holds: `config` itself, then the later points of output.next-points; each with the
    keys its sites are sent (JSON; "" for the first, whose keys are the run config's)."""
    first = replace(config, output={"next_points": ""})
    try:
        later = json.loads(config.output.next_points) if config.output.next_points else []
    except json.JSONDecodeError as err:
        raise ConfigError(f"output.next-points is not a JSON list of points: {err}") from None
    _require(isinstance(later, list) and all(isinstance(keys, dict) for keys in later),
             "output.next-points must be a JSON list of objects, one per point")
    return [(first, "")] + [(with_keys(first, keys), json.dumps(keys)) for keys in later]


def check_sites(config: Config, site_sizes: list[int]) -> None:
    """Refuse settings that the sites' actual sizes make impossible."""
    _require(len(site_sizes) >= 1, "the federation has no site; at least one is needed")
    smallest = min(site_sizes)
    check_site_size(config, smallest, site=site_sizes.index(smallest))
    check_federation(config, len(site_sizes))


def check_site_size(config: Config, size: int, *, site: int) -> None:
    """Refuse a delta that a site of `size` training images cannot have (a deployed site checks itself).

    A batch larger than the site is no error: the site then takes all its images in every step (with DP,
    Poisson sampling at rate 1), as Opacus's loader does.
    """
    if config.privacy.local:
        _require(
            config.privacy.delta < 1 / size,
            f"privacy.delta={config.privacy.delta} must be below 1/{size} "
            f"(site {site} has {size} training images); choose a smaller delta",
        )


def check_federation(config: Config, sites: int) -> None:
    """Refuse what the number of sites makes impossible: a site-level delta, budgets of sites that do not exist."""
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
    fed = config.federation
    outside = [k for k in fed.attacking_sites() if k >= sites]
    _require(not outside, f"federation.attackers names site {outside[0] if outside else ''}, "
             f"but the sites are numbered 0 to {sites - 1}")
    _require(fed.strategy != "bulyan" or sites >= 4 * fed.num_malicious + 3,
             f"federation.strategy=bulyan needs at least 4 * federation.num-malicious + 3 = "
             f"{4 * fed.num_malicious + 3} sites, the federation has {sites}; lower federation.num-malicious")
    _require(fed.strategy != "multikrum" or fed.krum_select <= sites,
             f"federation.krum-select={fed.krum_select} is more than the federation's {sites} sites")
    _require(not (config.privacy.central and fed.strategy in ROBUST),
             f"privacy.mode={config.privacy.mode} cannot be combined with federation.strategy={fed.strategy}: "
             "Flower's central-DP wrapper adds its noise to a mean of clipped updates, which a robust "
             "aggregator does not make; use record-level DP (privacy.mode=local) with it")


def check_classes(config: Config, class_names: tuple[str, ...]) -> None:
    """Refuse a backdoor target that is not one of the data's classes."""
    target = config.federation.backdoor_target
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
    _require(config.federation.attack != "backdoor" or target < len(class_names),
             f"federation.backdoor-target={target} is not a class of the data, whose classes are {classes}")


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy with some fields changed: replace(cfg, privacy={"mode": "off"})."""
    parts = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    return dataclasses.replace(config, **parts)


def pinned(config: Config, *, default_name: str | None = None) -> Config:
    """The config with its paths made absolute and its run named (`default_name`, else the time), so that every
    process of the run (the command, the ServerApp, the sites, whatever their working directory) means the same
    run directory and files."""
    import time

    name = config.output.name or default_name or time.strftime("%Y%m%d-%H%M%S")
    absolute = lambda path: str(Path(path).resolve()) if path else ""  # noqa: E731
    return replace(config, data={"path": absolute(config.data.path), "test_path": absolute(config.data.test_path)},
                   output={"dir": str(Path(config.output.dir).resolve()), "name": name})
