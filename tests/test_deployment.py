"""Flower's Deployment Engine on loopback: the demo, a SuperNode killed mid-run, a bad file, a dead SuperLink; resume's refusals."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedclinic.config import load_config
from fedclinic.runtime.processes import command_of, descendants, with_env
from fedclinic.runtime.local import LocalDeployment
from fedclinic.privacy.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
# tiny sites, no post-training steps: these tests are about processes, messages and state
TINY = ["data.site-size=150", "data.test-size=60", "training.batch-size=32", "robustness.enabled=false",
        "compression.enabled=false", "explain.enabled=false", "privacy.audit=false"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedclinic.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def sets(settings: list[str]) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def deployment_config(tmp_path: Path, name: str, *settings: str):
    """(config, run directory) of a tiny run named `name` under tmp_path, the directory made."""
    config = load_config(None, [*TINY, *settings, f'output.dir="{tmp_path}"', f'output.name="{name}"'])
    (tmp_path / name).mkdir()
    return config, tmp_path / name


def rounds_seen(run_dir: Path) -> list[int]:
    path = run_dir / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if '"round"' in line]


@pytest.mark.slow
def test_the_demo_runs_a_supernode_per_site_with_tls_and_authentication_and_stops_them(tmp_path):
    # Execute: what `make deploy-demo` runs (3 sites), smaller
    proc = cli("demo", "--sites", "2", "--rounds", "1", "--out", str(tmp_path), "--name", "demo", *sets(TINY))
    # Assert: the same table as simulate, every site trained every round from its own file
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TLS + SuperNode authentication" in proc.stdout and "rec eps" in proc.stdout
    run = tmp_path / "demo"
    results = json.loads((run / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert [r["sites_trained"] for r in results["rounds"][1:]] == [2]
    sites = run / "deployment" / "sites"
    for k in range(2):
        ledger = Ledger.open(sites / f"site-{k}" / "state", site=k)  # in the site's own state dir
        # the round, then the fine-tuning after it (personalize.epochs), charged to the same ledger
        assert [(e.round, e.kind) for e in ledger.entries] == [(1, "round"), (2, "fine-tuning")]
        assert ledger.rounds_trained == 1 and 0 < ledger.epsilon() <= 8.0 * 1.001
        assert not (run / "sites").exists()  # no ledger in the server's run directory
    # the server was given only its own test file
    run_config = (run / "deployment" / "run-config.toml").read_text()
    assert f'test-path = "{run / "deployment" / "server" / "test.npz"}"' in run_config
    # secure by default: the commands it ran use TLS and SuperNode authentication, never --insecure
    commands = (run / "deployment" / "commands.txt").read_text()
    assert "--insecure" not in commands
    assert "--enable-supernode-auth" in commands and commands.count("flwr supernode register") == 2
    assert commands.count("--auth-supernode-private-key") == 2 and commands.count("--root-certificates") == 2
    # nothing of the deployment is left running
    assert with_env(f"FLWR_HOME={run / 'deployment' / 'flwr-home'}") == set()


def test_the_deployment_doc_gives_the_commands_the_demo_runs():
    doc = (ROOT / "docs" / "deployment.md").read_text()
    section = doc[doc.index("## Run across machines"):]
    end = section.find("\n## ", 4)  # the next section, if there is one
    section = section if end < 0 else section[:end]
    config = load_config(None, ["federation.sites=1"])
    deployment = LocalDeployment(Path("/nonexistent"), config)
    for name, args in (("flower-superlink", deployment.superlink_args()), ("flower-supernode",
                                                                           deployment.supernode_args(0))):
        flags = [a for a in args if a.startswith("--")]
        line = next(line for line in section.splitlines() if line.strip().startswith(name))
        # the doc's command carries every flag the demo passes (values differ: hosts and paths)
        block = section[section.index(line):]
        block = block[: block.index("\n\n")] if "\n\n" in block else block
        missing = [f for f in flags if f not in block]
        assert not missing, f"docs/deployment.md's {name} lacks {missing}"
    for command in ("flwr supernode register", "fedclinic certs", "flwr run"):
        assert command in section


class LastFileBad(LocalDeployment):
    """A deployment whose last site holds a file that is not an .npz archive."""

    def prepare(self) -> None:
        super().prepare()
        self.site_files[-1].write_bytes(b"not a zip archive")


@pytest.mark.slow
def test_a_supernode_killed_mid_round_or_with_a_malformed_file_is_left_out_and_the_others_go_on(tmp_path):
    # Prepare: 3 sites, 3 rounds, site 2's file not an .npz archive, so one site alone may train a round; a round
    # waits at most 75 s for its replies; no fine-tuning (the demo's test has it)
    config, run = deployment_config(tmp_path, "faults", "federation.sites=3", "federation.rounds=3",
                                    "federation.min-sites=1", "federation.round-timeout=75",
                                    "federation.rejoin-wait=120", "personalize.epochs=0")
    events = {}

    def fault(deployment: LocalDeployment) -> None:
        """Once site 1 runs its round-2 ClientApp, kill its SuperNode (a crash); start it again after round 2.

        (Flower refuses a second SuperNode with the same key while the first still counts as online, so a
        crashed site comes back once the SuperLink has marked it offline; round 3 waits for it,
        federation.rejoin-wait.)
        """
        if "killed" not in events and 1 in rounds_seen(run):
            supernode = deployment.supernodes[1].pid
            if any("flwr-clientapp" in command_of(pid) for pid in descendants(supernode)):
                deployment.kill_site(1)
                events["killed"] = time.monotonic()
        if "killed" in events and "restarted" not in events and 2 in rounds_seen(run):
            events["round2"] = time.monotonic()
            deployment.start_site(1)
            events["restarted"] = True

    # Execute
    with LastFileBad(run, config) as deployment:
        marker = f"FLWR_HOME={deployment.connection.flwr_home}"
        deployment.run(while_running=lambda: fault(deployment))
    # Assert: site 2 was left out of every round with its reason, the others trained
    results = json.loads((run / "results.json").read_text())
    assert sorted(s["site"] for s in results["sites"]) == [0, 1]
    log = (run / "flower.log").read_text()
    bad = run / "deployment" / "sites" / "site-2" / "data.npz"
    assert f"failed and is left out: DataError: {bad}: is not an .npz archive" in log, log[-3000:]
    assert not (run / "deployment" / "sites" / "site-2" / "state" / "ledger.json").exists()
    # round 2 went on without site 1, within the bound; round 3 had it back
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2, 3]
    assert [r["sites_trained"] for r in results["rounds"][1:]] == [2, 1, 2]
    assert events["round2"] - events["killed"] < 75 + 30
    # the killed site's ledger is whole; restarted, it went on from it (round 3 adds to round 1)
    state = run / "deployment" / "sites" / "site-1" / "state"
    ledger = Ledger.open(state, site=1)
    # killed while its ClientApp started: round 2 spent nothing
    assert [(e.round, e.kind) for e in ledger.entries] == [(1, "round"), (3, "round")]
    accountant = RDPAccountant()  # Opacus's own, over the entries on disk
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries]
    assert ledger.epsilon() == pytest.approx(accountant.get_epsilon(delta=config.privacy.delta), rel=1e-9)
    assert list(state.glob("*.tmp")) == []
    assert with_env(marker) == set()


@pytest.mark.slow
def test_a_dead_superlink_fails_the_demo_with_the_reason_and_stops_everything(tmp_path):
    # (insecure, which the demo runs only when asked, and says so)
    proc = subprocess.Popen([sys.executable, "-m", "fedclinic.cli", "demo", "--sites", "2", "--rounds", "3", "--out",
                             str(tmp_path), "--name", "dead", "--insecure", *sets(TINY)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "dead"
    marker = f"FLWR_HOME={run / 'deployment' / 'flwr-home'}"
    try:
        deadline = time.monotonic() + 300
        while 1 not in rounds_seen(run) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert 1 in rounds_seen(run), "round 1 never finished"
        superlink = [pid for pid in with_env(marker) if "flower-superlink" in command_of(pid)]
        assert len(superlink) == 1
        os.kill(superlink[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        warning, error = err.strip().splitlines()  # the insecure warning, then one sentence
        assert "WARNING: --insecure: no TLS and no SuperNode authentication" in warning
        assert error.startswith("fedclinic: error: the SuperLink exited during the run")
        assert "--insecure" in (run / "deployment" / "commands.txt").read_text()
        assert with_env(marker) == set()
    finally:
        if proc.poll() is None:
            proc.kill()


def refused(capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of the command's own main, in this process."""
    from fedclinic.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_resume_refuses_a_directory_without_a_checkpoint(tmp_path, capsys):
    code, err = refused(capsys, "simulate", "--resume", str(tmp_path))
    assert code == 2
    assert err.strip() == f"fedclinic: error: {tmp_path} has no checkpoint.pt: there is no finished round to resume from"


def test_demo_defaults_to_three_sites_and_rounds_but_set_and_flags_win():
    from fedclinic.cli.deploy import demo_parser
    from fedclinic.cli.options import resolve

    parser = argparse.ArgumentParser()
    demo_parser(parser.add_subparsers(dest="command"))
    defaults = ["federation.sites=3", "federation.rounds=3"]

    def fed(*argv):
        config = resolve(parser.parse_args(["demo", *argv]), defaults=defaults).federation
        return config.sites, config.rounds

    assert fed() == (3, 3)
    assert fed("--set", "federation.sites=5", "--set", "federation.rounds=7") == (5, 7)
    assert fed("--sites", "4") == (4, 3)


@pytest.mark.parametrize("args, words", [
    (["--rounds", "5"], "--rounds cannot change it"),
    (["--set", "privacy.target-epsilon=3"], "--resume cannot change privacy.target-epsilon"),
])
def test_resume_refuses_to_change_what_the_ledgers_and_checkpoint_were_made_with(tmp_path, capsys, args, words):
    code, err = refused(capsys, "simulate", "--resume", str(tmp_path), *args)
    assert code == 2 and words in err, err


def test_output_resume_is_only_set_by_resume(tmp_path, capsys):
    code, err = refused(capsys, "simulate", "--out", str(tmp_path), "--set", "output.resume=true")
    assert code == 2 and "use that" in err, err
    assert list(tmp_path.iterdir()) == []
