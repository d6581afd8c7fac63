"""The typed configuration: one truth with pyproject.toml, sources in order, bad values refused."""

import tomllib
from pathlib import Path

import pytest

import json

from fedclinic.config import (Config, ConfigError, DEFAULTS, check_sites, differing_keys, from_run_config, load_config,
                              replace, sweep_runs)

ROOT = Path(__file__).resolve().parent.parent


def _flatten(table, prefix=""):
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_pyproject_run_config_defaults_equal_dataclass_defaults():
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Execute
    flower_defaults = _flatten(pyproject["tool"]["flwr"]["app"]["config"])
    # Assert: same keys, same values, same types
    assert flower_defaults.keys() == DEFAULTS.keys()
    for key, value in DEFAULTS.items():
        assert flower_defaults[key] == value, key
        assert type(flower_defaults[key]) is type(value), key


def test_sources_apply_in_order_defaults_file_then_set(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[privacy]\ntarget-epsilon = 3.0\ndelta = 1e-6\n[federation]\nrounds = 7\n")
    config = load_config(cfg_file, ["privacy.target-epsilon=2", "data.path=some/file.npz"])
    assert config.privacy.target_epsilon == 2.0  # --set beats the file
    assert config.privacy.delta == 1e-6  # the file beats the default
    assert config.federation.rounds == 7
    assert config.federation.sites == 5  # default untouched
    assert config.data.path == "some/file.npz"  # an unquoted value is a string


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_config(None, ["privacy.mode=off", "output.name=x y", "data.label-alpha=0.3"])
    saved = tmp_path / "config.toml"
    saved.write_text(config.to_toml())
    assert load_config(saved) == config


def test_flower_run_config_gives_the_same_config():
    config = load_config(None, ["federation.sites=3"])
    assert from_run_config({**config.to_flat(), "unrelated-flower-key": 1}) == config


def test_a_sweeps_later_points_travel_as_the_keys_they_change_and_come_back_whole():
    # Prepare: the first point without privacy, then two DP points as a sweep's run config carries them
    first = load_config(None, ["federation.sites=3", "privacy.mode=off", "output.name=baseline"])
    later = [replace(first, privacy={"mode": "local", "target_epsilon": eps}, output={"name": f"eps-{eps:g}"})
             for eps in (1.0, 3.0)]
    submitted = replace(first, output={"next_points": json.dumps([differing_keys(first, c) for c in later])})
    # Execute: what the ServerApp reads back from Flower's run config
    runs = sweep_runs(from_run_config(submitted.to_flat()))
    # Assert: every point whole, in order; a site of a later point is sent only what differs
    assert [config for config, _ in runs] == [first, *later]
    assert runs[0][1] == "" and json.loads(runs[1][1]) == {"privacy.mode": "local", "privacy.target-epsilon": 1.0,
                                                           "output.name": "eps-1"}


@pytest.mark.parametrize("points, words", [("[{", "output.next-points is not a JSON list"),
                                           ('{"privacy.mode": "off"}', "a JSON list of objects"),
                                           ('[{"privacy.epsilon": 3}]', "privacy.epsilon")])
def test_a_malformed_list_of_sweep_points_is_refused_in_one_sentence(points, words):
    config = load_config(None, [f"output.next-points={json.dumps(points)}"])
    with pytest.raises(ConfigError, match=words):
        sweep_runs(config)


@pytest.mark.parametrize(
    "override, words",
    [
        ("privacy.target-epsilon=0", "privacy.target-epsilon must be > 0, got 0"),
        ("privacy.target-epsilon=-1", "privacy.target-epsilon must be > 0, got -1"),
        ("privacy.delta=0", "privacy.delta must be in (0, 1), got 0"),
        ("privacy.delta=1.5", "privacy.delta must be in (0, 1), got 1.5"),
        ("federation.sites=0", "federation.sites must be at least 1, got 0"),
        ("federation.rounds=0", "federation.rounds must be at least 1, got 0"),
        ("privacy.accountant='gdp'", "privacy.accountant must be rdp or prv, got 'gdp'"),
        ("federation.rounds=2.5", "federation.rounds must be a int, got 2.5"),
        # an unquoted value of a text key is its text (federation.attack=nan is the attack, not a float)
        ("privacy.mode=1", "privacy.mode must be one of local, central, both, off, got '1'"),
        ("privacy.mode=strict", "privacy.mode must be one of local, central, both, off, got 'strict'"),
        ("privacy.noise-multiplier=-1", "privacy.noise-multiplier must be >= 0, got -1"),
        ('privacy.site-budgets="1:3"', 'privacy.site-budgets must look like "0=2.5,3=4" (site=epsilon), got \'1:3\''),
        ('privacy.site-budgets="2=0"', "privacy.site-budgets: site 2's epsilon must be > 0"),
        ("privacy.central-noise-multiplier=0", "privacy.central-noise-multiplier must be > 0, got 0"),
        ("federation.strategy=fedsgd",
         "federation.strategy must be one of fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox, fedmedian, "
         "fedtrimmedavg, krum, multikrum, bulyan, got 'fedsgd'"),
        ("federation.server-learning-rate=-0.1", "federation.server-learning-rate must be >= 0 (0 = Flower's default), "
                                                 "got -0.1"),
        ("federation.server-momentum=1", "federation.server-momentum must be in [0, 1), got 1"),
        ("federation.beta-1=1", "federation.beta-1 must be in [0, 1), got 1"),
        ("federation.beta-2=-0.5", "federation.beta-2 must be in [0, 1), got -0.5"),
        ("federation.tau=0", "federation.tau must be > 0, got 0"),
        ("federation.proximal-mu=-1", "federation.proximal-mu must be >= 0, got -1"),
    ],
)
def test_impossible_settings_are_refused_with_the_bad_value(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value)


def test_a_config_file_gives_a_text_key_a_number_and_is_refused(tmp_path):
    # (on the command line an unquoted value of a text key is text; in a TOML file the types are the file's)
    path = tmp_path / "c.toml"
    path.write_text("[privacy]\nmode = 1\n")
    with pytest.raises(ConfigError, match="privacy.mode must be a str, got 1"):
        load_config(path)
    assert load_config(None, ["federation.attackers=1", "federation.attack=nan"]).federation.attack == "nan"


def test_unknown_key_suggests_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'privacy.target-epsilon'"):
        load_config(None, ["privacy.target-epsilom=3"])
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[federation]\nsite = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'federation.sites'"):
        load_config(cfg_file)


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_delta_must_be_below_one_over_the_smallest_site():
    config = load_config(None, ["privacy.delta=0.009", "training.batch-size=8"])
    check_sites(config, [500, 111, 300])  # 0.009 < 1/111
    with pytest.raises(ConfigError, match=r"privacy.delta=0.009 must be below 1/150 \(site 1 has 150"):
        check_sites(config, [500, 150, 300])


def test_site_level_delta_and_per_site_budgets_must_fit_the_federation():
    config = load_config(None, ["privacy.mode=both", "privacy.central-delta=0.2", "training.batch-size=8"])
    with pytest.raises(ConfigError, match=r"privacy.central-delta=0.2 must be below 1/5 \(the federation has 5 sites\)"):
        check_sites(config, [100] * 5)
    config = load_config(None, ['privacy.site-budgets="0=2,7=1"', "training.batch-size=8"])
    assert config.privacy.budget(0) == 2.0 and config.privacy.budget(3) == config.privacy.target_epsilon
    with pytest.raises(ConfigError, match="privacy.site-budgets names site 7, but the sites are numbered 0 to 4"):
        check_sites(config, [100] * 5)


def test_delta_is_not_checked_for_the_non_private_baseline():
    config = load_config(None, ["privacy.delta=0.5", "privacy.mode=off", "training.batch-size=8"])
    check_sites(config, [10, 20])


def test_a_single_site_runs_and_min_sites_must_be_positive():
    assert load_config(None, ["federation.sites=1"]).federation.sites == 1
    with pytest.raises(ConfigError, match="federation.min-sites must be at least 1, got 0"):
        load_config(None, ["federation.min-sites=0"])


def test_defaults_are_the_documented_default_run():
    config = Config()
    assert (config.federation.sites, config.privacy.mode) == (5, "local")
    assert (config.privacy.target_epsilon, config.privacy.delta) == (8.0, 1e-5)



def test_pinned_makes_paths_absolute_and_names_an_unnamed_run_once(tmp_path, monkeypatch):
    from fedclinic.config import pinned

    # Prepare: relative paths and no name, as a library user might give them
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ['output.dir="runs"', 'data.path="scans.npz"'])
    # Execute
    first = pinned(config)
    # Assert: every process of the run means the same directory and file, whatever its working directory
    assert first.output.dir == str(tmp_path / "runs") and first.data.path == str(tmp_path / "scans.npz")
    assert first.output.name and pinned(first) == first
    assert pinned(config, default_name="demo-1").output.name == "demo-1"
    assert pinned(load_config(None, ['output.name="mine"'])).output.name == "mine"
