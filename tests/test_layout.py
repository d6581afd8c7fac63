"""The package's shape: imports point down the layers, the core never imports Flower, no module is huge."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedclinic"

# each part of fedclinic (a package or a top-level module) and its layer: a part may import only from lower
# layers and from itself. The core (config .. evaluation) is Flower-free; analysis/, report/ and runtime/ work on
# its results and on Flower's processes; the apps (clients/, strategies/, server/) and the shell (cli/) sit on top
LAYERS = {
    "config": 0, "scattering": 0, "device": 0, "atomic": 0,
    "data": 1, "privacy": 1,
    "model": 2, "poisoning": 2,
    "evaluation": 3,
    "analysis": 4, "report": 4, "runtime": 4,
    "clients": 5, "strategies": 5,
    "baselines": 6, "canary_audit": 6,
    "server": 7, "sweep": 7, "api": 7,
    "cli": 8,
    "__init__": 9,
}
# the modules that may import Flower: the ClientApp, the ServerApp and the strategies it builds
FLOWER_APPS = {"clients/app.py", "server", "strategies"}
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def part(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported(path: Path) -> list[str]:
    """Every module name `path` imports, at any depth of the file (lazy imports inside functions too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_every_part_of_the_package_has_a_layer():
    assert sorted({part(p) for p in modules()} - set(LAYERS)) == []


def test_no_module_imports_upward():
    upward = []
    for path in modules():
        here = part(path)
        for name in imported(path):
            pieces = name.split(".")
            if pieces[0] != "fedclinic" or len(pieces) == 1:
                continue
            there = pieces[1]
            if there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert upward == []


def test_only_the_flower_apps_import_flower():
    def is_app(path: Path) -> bool:
        relative = path.relative_to(PACKAGE).as_posix()
        return relative in FLOWER_APPS or relative.split("/")[0] in FLOWER_APPS

    flower = [str(p.relative_to(PACKAGE)) for p in modules() if not is_app(p)
              and any(name.split(".")[0] == "flwr" for name in imported(p))]
    assert flower == []


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_importing_the_plots_leaves_the_users_matplotlib_backend_alone():
    # a notebook's backend, then every module that draws
    code = ("import matplotlib; matplotlib.use('svg'); import fedclinic.report.plots, fedclinic.analysis.explain, "
            "fedclinic.analysis.audit, fedclinic.cli.run; print(matplotlib.get_backend())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "svg"


def test_the_command_starts_flower_before_torch_and_the_server_never_imports_opacus():
    # every simulated run pays these imports: the command's before its SuperLink starts (torch and matplotlib,
    # 2.2 s), the ServerApp's before round 1 (Opacus, 1.6 s), though neither process trains with DP-SGD
    code = ("import sys; import fedclinic.cli, fedclinic.api, fedclinic.runtime.simulation; before = set(sys.modules); "
            "import fedclinic.server.app; print(sorted({m.split('.')[0] for m in before} & {'torch', 'matplotlib', "
            "'opacus'}), 'opacus' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "False"]
