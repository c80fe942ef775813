"""The built wheel, installed without extras, has what it needs: every module imports and
the CLI works against a running system (``forecast query`` once crashed on ``httpx``,
which only the ``test`` extra installed).

Installing the wheel with its dependencies into a fresh virtual environment took 4 min
13 s on this machine (torch, lightning, pytorch-forecasting, chDB: 2.5 GB unpacked, no
pip cache), too slow for the suite. So the fresh environment gets the wheel alone
(``--no-deps``) and borrows the dependencies from the project's environment: a ``.pth``
file adds its site-packages, and an import hook hides every distribution there that
the wheel's ``Requires-Dist`` (followed transitively, without extras) does not reach.
That set is computed, not listed: it is the ``test`` extra and what only it pulls in
(pytest, hypothesis, schemathesis, playwright, ruff, import-linter, ...), and it
matched, name for name, what a real full install left out.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT, start_system

pytestmark = pytest.mark.integration

PIP = [sys.executable, "-m", "pip"]

HIDER = '''"""Written by tests/test_packaging.py: distributions outside the runtime dependencies
cannot be imported, as if they were not installed."""
import sys

HIDDEN = frozenset({hidden!r})


class HideTestExtras:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden)", name=name)
        return None


sys.meta_path.insert(0, HideTestExtras())
'''


def build_wheel(source: Path, out: Path) -> Path:
    """The wheel of a copy of ``source`` (a build in the working tree would leave
    ``build/`` where other runs build too)."""
    tree = out / "src"
    tree.mkdir(parents=True)
    project = tomllib.loads((source / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy(source / name, tree / name)
    for pattern in packages:
        shutil.copytree(
            source / pattern.rstrip("*"),
            tree / pattern.rstrip("*"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    options = ["-q", "--no-deps", "--no-build-isolation", "-w", str(out / "dist")]
    subprocess.run(
        [*PIP, "wheel", *options, str(tree)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (out / "dist").glob("forecast_engine-*.whl")
    return wheel


def runtime_closure(requires: list[str]) -> set[str]:
    """The distributions that ``requires`` reaches, installed here, without extras."""
    reached: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), frozenset()) for r in requires]
    while todo:
        requirement, parent_extras = todo.pop()
        environments = [{"extra": e} for e in parent_extras] or [{"extra": ""}]
        if requirement.marker is not None and not any(
            requirement.marker.evaluate(env) for env in environments
        ):
            continue
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in reached:
            continue
        reached.add(key)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        todo += [(Requirement(r), key[1]) for r in dist.requires or []]
    return {name for name, _ in reached}


def top_level_modules(dist: metadata.Distribution) -> set[str]:
    """The names ``dist`` puts at the top of ``sys.path`` (packages and modules)."""
    names = set()
    for file in dist.files or []:
        first = file.parts[0]
        if len(file.parts) == 1 and first.endswith((".py", ".so")):
            names.add(first.split(".")[0])
        elif len(file.parts) > 1 and first not in ("..", "__pycache__"):
            names.add(first)
    return {n for n in names if not n.endswith((".dist-info", ".data", ".egg-info"))}


def install_without_extras(source: Path, out: Path) -> Path:
    """A fresh environment with the wheel of ``source``; returns its ``bin`` folder."""
    wheel = build_wheel(source, out)
    venv = out / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    installed = next(metadata.distributions(path=[purelib], name="forecast-engine"))
    keep = runtime_closure(installed.requires or []) | {"forecast-engine"}
    hidden, needed = set(), set()
    for dist in metadata.distributions():
        kept = canonicalize_name(dist.metadata["Name"]) in keep
        (needed if kept else hidden).update(top_level_modules(dist))
    hidden -= needed  # a namespace package shared with a runtime dependency stays
    assert {"pytest", "hypothesis", "schemathesis"} <= hidden
    here = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "project-site-packages.pth").write_text("\n".join(here) + "\n")
    Path(purelib, "hide_test_extras.py").write_text(HIDER.format(hidden=sorted(hidden)))
    Path(purelib, "00-hide-test-extras.pth").write_text("import hide_test_extras\n")
    return venv / "bin"


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_wheel_without_extras_imports_everything_and_queries_a_running_system(
    tmp_path: Path,
) -> None:
    bin_dir = install_without_extras(ROOT, tmp_path / "install")
    hidden = run([str(bin_dir / "python"), "-c", "import pytest"], cwd=tmp_path)
    assert "No module named 'pytest' (hidden)" in hidden.stderr, hidden.stderr

    every_module = (
        "import importlib, importlib.resources, pkgutil, forecast\n"
        "assert forecast.__file__.startswith(__import__('sys').prefix), forecast.__file__\n"
        "for top in ('forecast', 'streams', 'models', 'sinks', 'gateway', 'bench'):\n"
        "    package = importlib.import_module(top)\n"
        "    for info in pkgutil.walk_packages(package.__path__, top + '.'):\n"
        "        if info.name != 'forecast.__main__':\n"
        "            importlib.import_module(info.name)\n"
        "static = importlib.resources.files('gateway') / 'static'\n"
        "for name in ('index.html', 'app.js', 'style.css', 'vendor/uplot/uPlot.iife.min.js',\n"
        "             'vendor/uplot/uPlot.min.css', 'vendor/uplot/LICENSE.txt'):\n"
        "    assert (static / name).is_file(), name  # the console's files are in the wheel\n"
    )
    imported = run([str(bin_dir / "python"), "-c", every_module], cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr[-3000:]
    helped = run([str(bin_dir / "forecast"), "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: forecast"), helped.stderr

    system = start_system(tmp_path / "system")
    try:
        sql = "SELECT name FROM system.tables WHERE database = 'forecast' AND name = 'readings'"
        answer = run(
            [str(bin_dir / "forecast"), "query", sql, "--format", "json"],
            cwd=tmp_path,
            env={**system.env, "FORECAST_KAFKA_BOOTSTRAP": system.kafka},
        )
        assert answer.returncode == 0, answer.stderr[-3000:]
        assert json.loads(answer.stdout) == [{"name": "readings"}]
    finally:
        assert system.stop() == 0
