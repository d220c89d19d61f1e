"""The floor plan holds: small files, a short top level, task packages that keep to themselves.

docs/layout.md describes the layout; these checks keep it true as tasks are added.
"""

import ast
from collections import Counter
from pathlib import Path

import dlrun

ROOT = Path(dlrun.__file__).parent
MODULES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)
TASKS = sorted(p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").is_file())
# A task may build on another only here: distillation trains a classifier (its trainer extends
# classification's), and CycleGAN is a GAN (it scores its discriminators with the GAN losses).
BUILDS_ON = {("distill", "classification"), ("cyclegan", "gan")}
# Each task package names its parts alike, so `ls dlrun/tasks/<task>` reads the same in every
# one: these names repeat across task packages by design, and nowhere else.
TASK_ROLES = {"__init__.py", "trainer.py", "losses.py", "metrics.py", "modes.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in MODULES
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long, long


def test_the_top_level_holds_at_most_15_modules() -> None:
    top = [p.name for p in ROOT.glob("*.py")]
    assert len(top) <= 15, top


def test_task_packages_do_not_import_each_other() -> None:
    assert {"classification", "detection", "gan", "cyclegan", "segmentation"} <= set(TASKS)
    crossings = set()
    for task in TASKS:
        for path in (ROOT / "tasks" / task).rglob("*.py"):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[:2] == ["dlrun", "tasks"] and len(parts) > 2 and parts[2] != task:
                    crossings.add((task, parts[2]))
    assert crossings <= BUILDS_ON, crossings - BUILDS_ON


def test_shared_layers_import_no_task() -> None:
    """models/, data/, engine/, config/, launch/ and scoring/ serve every task: none reaches up
    into one (the CLI and the Python API pick a task by its config, never by import)."""
    shared = [p for p in MODULES if p.relative_to(ROOT).parts[0] not in ("tasks", "cli.py")]
    reaching = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("dlrun.tasks"))
        for p in shared
    }
    assert not {k: v for k, v in reaching.items() if v}


def test_no_two_modules_share_a_name_outside_the_task_roles() -> None:
    names = Counter(p.name for p in MODULES if p.name not in TASK_ROLES)
    assert not [n for n, k in names.items() if k > 1], names.most_common(3)
    outside_tasks = [p for p in MODULES if p.relative_to(ROOT).parts[0] != "tasks"]
    roles = Counter(p.name for p in outside_tasks if p.name in TASK_ROLES - {"__init__.py"})
    assert not roles, roles  # trainer.py, losses.py ... are the task packages' names only
