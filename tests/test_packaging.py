"""The installed distribution: one import namespace, every module importable with the declared
dependencies, and a light client (SDK + admin CLI) that needs neither torch nor Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "cluster", "router", "prefill_worker", "decode_worker", "kv_transfer", "proto")


def run_python(code: str, cwd: Path, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_every_module_imports(tmp_path: Path) -> None:
    """In a fresh interpreter, outside the repository: a dependency missing from the environment
    fails here with the module that needs it."""
    code = """
import importlib, json, pkgutil, splitserve
failed = {}
names = ["splitserve"] + ["splitserve." + f for f in %r]
for folder in list(names[1:]):
    pkg = importlib.import_module(folder)
    names += [m.name for m in pkgutil.iter_modules(pkg.__path__, folder + ".")]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"imported": len(names), "failed": failed}))
""" % (FOLDERS,)
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["failed"] == {}, report["failed"]
    assert report["imported"] > 50


def test_only_the_splitserve_namespace_is_installed(tmp_path: Path) -> None:
    code = """
import importlib
for name in %r:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"top-level {name!r} is importable")
import splitserve.engine, splitserve.proto.worker_pb2
print(splitserve.engine.__name__)
""" % (FOLDERS,)
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "splitserve.engine"


def _base_distributions() -> set[str]:
    """The project's base dependencies and everything they require, as normalized names."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in deps]
    seen: set[str] = set()
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [re.split(r"[<>=!~ ;\[(]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]
    return seen


@pytest.mark.parametrize("modules", [
    ["splitserve"],  # `from splitserve import Client`
    ["splitserve.proto.client"],
    ["splitserve.cluster.cli", "splitserve.cluster.bench"],  # status, scale, drain, down, bench
])
def test_the_light_client_needs_only_the_base_dependencies(tmp_path: Path, modules: list[str]) -> None:
    """Import the client with every installed distribution outside the base dependencies
    hidden, as on a machine where only `pip install splitserve` ran."""
    code = """
import importlib, json, sys
from importlib.metadata import packages_distributions
allowed = set(%r)
dists = packages_distributions()
hidden = {m for m, ds in dists.items() if not any(d.lower().replace("_", "-") in allowed for d in ds)}
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
for m in %r:
    importlib.import_module(m)
import splitserve
splitserve.Client
from splitserve.cluster.cli import build_parser
build_parser().parse_args(["status"])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "redis", "tokenizers", "safetensors"))))
""" % (sorted(_base_distributions() | {"splitserve"}), modules)
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_serve_without_the_serve_extra_says_which_extra(tmp_path: Path) -> None:
    """What a client-only install prints for `splitserve serve` (torch made unimportable here)."""
    code = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "ray", "redis", "safetensors", "tokenizers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from splitserve.cluster.cli import main
sys.exit(main(["serve", "--model", "/nonexistent"]))
"""
    out = run_python(code, tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "splitserve[serve]"' in lines[0], out.stderr


def test_an_uninstalled_checkout_imports_as_the_namespace() -> None:
    """A copy of the working tree that was never installed (what a GPU machine gets) imports as
    `splitserve.*` from its root: no site-packages here, so no install can answer for it."""
    code = "import sys; sys.path.insert(0, %r); import splitserve.cluster.net as n; print(n.__file__)" % str(ROOT)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "cluster" / "net.py")
