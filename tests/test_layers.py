"""The layers point one way: ``web`` and ``worker`` import the core (``svdfarm``), the core
imports neither (nor torch, nor the CLI), and the CLI sits above all three. The web side and
the core install and run without torch; ``svdfarm up`` counts GPUs without importing it.

Checked twice: statically (every import in the core's source, inside functions too) and by
running the web app, ``svdfarm jobs`` and the GPU count in fresh interpreters and looking at
what they loaded.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "svdfarm"
#: What the core must never import: the layers above it and the worker's heavy libraries.
ABOVE_THE_CORE = ("web", "worker", "cli")
HEAVY = ("torch", "diffusers", "transformers", "accelerate")
#: A string that names a module of a layer above, as an import by name would spell it.
MODULE_PATH = re.compile(r"(?:web|worker|cli|torch|diffusers)(?:\.\w+)+")
#: The one such string the core may hold: Celery's ``include`` of the worker's tasks.
ALLOWED_NAMES = {("svdfarm/celery_app.py", "worker.tasks")}


def imported_modules(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every absolute import in ``tree``, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.lineno, node.module


def forbidden_imports(source: str, forbidden: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line, module)`` of each import of a package in ``forbidden`` or below it."""
    return [
        (line, module)
        for line, module in imported_modules(ast.parse(source))
        if module.split(".")[0] in forbidden
    ]


def module_names(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of each string constant that is a dotted module path of a layer above
    the core (how ``importlib`` or Celery would load it by name)."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and MODULE_PATH.fullmatch(node.value)
    ]


def core_sources() -> list[Path]:
    """Every Python file of the core."""
    found = sorted(CORE.rglob("*.py"))
    assert len(found) > 10, found
    return found


def test_the_check_sees_imports_anywhere_and_names_by_string() -> None:
    """Top-level, function-local, ``from`` and dotted imports are caught; the core's own
    modules and relative imports are not; dotted names of modules above are found."""
    source = textwrap.dedent(
        """
        import torch.cuda
        from web import create_app
        from svdfarm.models import Job
        from . import states

        def later():
            import worker.probe
            from cli.jobs import main
            import webob, workers

        TASKS = ["worker.tasks"]
        ACTOR = "worker"
        """
    )
    assert forbidden_imports(source, (*ABOVE_THE_CORE, *HEAVY)) == [
        (2, "torch.cuda"),
        (3, "web"),
        (8, "worker.probe"),
        (9, "cli.jobs"),
    ]
    assert module_names(source) == [(12, "worker.tasks")]


def test_the_core_imports_no_layer_above_it_nor_torch() -> None:
    """No module under svdfarm/ imports ``web``, ``worker``, ``cli`` or torch and its family,
    not even inside a function."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in core_sources()
        for line, module in forbidden_imports(path.read_text(), (*ABOVE_THE_CORE, *HEAVY))
    ]
    assert not offenders, "\n".join(offenders)


def test_the_core_names_no_module_above_it_but_the_celery_tasks() -> None:
    """The only dotted name of an upper module in the core is ``"worker.tasks"``, in the Celery
    app's ``include`` (the worker registers its tasks; the core never imports them)."""
    found = {
        (str(path.relative_to(ROOT)), text)
        for path in core_sources()
        for _, text in module_names(path.read_text())
    }
    assert found == ALLOWED_NAMES


def test_the_cli_commands_that_start_processes_import_no_torch() -> None:
    """Only :mod:`cli.local` (render, caps, model: the worker's code run by hand) reaches the
    worker's libraries; the rest of the CLI imports neither torch nor its family."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "cli").glob("*.py"))
        if path.name != "local.py"
        for line, module in forbidden_imports(path.read_text(), HEAVY)
    ]
    assert not offenders, "\n".join(offenders)


def _run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter at the repository root, without the caller's
    ``SVDFARM_*`` settings, with ``env`` added."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SVDFARM_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**base, "SVDFARM_DATA_DIR": str(tmp_path / "var"), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


WEB_AND_CORE = """
import pkgutil, sys, importlib
import svdfarm
for module in pkgutil.iter_modules(svdfarm.__path__):
    importlib.import_module(f"svdfarm.{module.name}")
above = sorted(m for m in sys.modules if m.split(".")[0] in ("web", "worker", "cli"))
assert not above, f"importing the core imported {above}"

from svdfarm import db
from svdfarm.settings import load_settings
db.upgrade(load_settings().database_url)
from web import create_app
app = create_app()
assert app.test_client().get("/healthz").status_code == 200
assert app.test_client().get("/").status_code == 200

import cli
assert cli.main(["jobs", "list"]) == 0
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
assert not heavy, f"the web side loaded {heavy}"
assert not [m for m in sys.modules if m.split(".")[0] == "worker"], "the web loaded the worker"
print("ok")
"""


def test_the_web_app_and_svdfarm_jobs_run_without_torch(tmp_path: Path) -> None:
    """In a fresh interpreter: importing every core module loads no ``web``, ``worker`` or
    ``cli``; creating the web app on a SQLite database, serving two pages and running
    ``svdfarm jobs list`` loads neither torch, diffusers nor the worker."""
    done = _run(WEB_AND_CORE, tmp_path, SVDFARM_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "ok"


GPU_COUNT = """
import sys
from cli import build_parser
from cli.gpus import cuda_device_count, nvidia_driver_present
import cli.serve
assert nvidia_driver_present(), "the fake nvidia-smi is on the PATH"
print(cuda_device_count())
assert "torch" not in sys.modules, "counting GPUs imported torch in the parent"
"""


def test_up_counts_gpus_without_importing_torch(tmp_path: Path) -> None:
    """With a driver seemingly present (a fake ``nvidia-smi``), ``svdfarm up``'s GPU count
    asks torch in a child process: the parent's ``sys.modules`` never holds torch, and this
    CPU machine (its cards hidden) counts 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    done = _run(
        GPU_COUNT,
        tmp_path,
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        CUDA_VISIBLE_DEVICES="",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0"]


def _extra(name: str) -> set[str]:
    """The package names of one of pyproject.toml's extras ('' for the base dependencies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["optional-dependencies"][name] if name else project["dependencies"]
    return {canonicalize_name(Requirement(r).name) for r in listed}


@pytest.mark.parametrize(
    ("extras", "needs", "never"),
    [
        (("",), {"sqlalchemy", "alembic", "celery", "psycopg", "pillow"}, set(HEAVY)),
        (("", "web"), {"flask", "gunicorn", "waitress", "prometheus-client"}, set(HEAVY)),
        (("", "worker"), {"torch", "diffusers", "imageio-ffmpeg", "numpy"}, {"flask"}),
    ],
    ids=["core", "web", "worker"],
)
def test_the_extras_say_what_each_side_needs(
    extras: tuple[str, ...], needs: set[str], never: set[str]
) -> None:
    """``pip install .`` is the core, ``.[web]`` adds Flask without torch, ``.[worker]`` adds
    torch and diffusers without Flask."""
    names = set().union(*(_extra(e) for e in extras))
    assert needs <= names, needs - names
    assert not names & never, names & never
