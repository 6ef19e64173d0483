"""The light core install: ``pip install atm_jax`` = jax, flax, optax, numpy.

A fresh ``python -m venv`` (no system site-packages) gets exactly the dependency
closure of ``pyproject.toml``'s core ``dependencies`` (read from the installed
distributions' metadata, markers evaluated, no extras) linked in from this
interpreter's site-packages, plus the ``atm_jax`` package. That is what ``pip
install .`` would put there, without ≈100 s of unpacking wheels; then the README's
library example runs in it and the experiment stack must be absent.

``ATM_JAX_PIP_INSTALL_TEST=1`` also runs the real thing: build the wheel and
``pip install -c constraints.txt`` it into a fresh venv (2-6 min here; not in CI).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Import names of the `experiments` extra that the core must neither need nor pull in.
HEAVY = ("tensorflow_datasets", "tensorflow", "transformers", "tokenizers", "safetensors",
         "huggingface_hub", "matplotlib", "PIL", "tqdm", "ml_collections", "torch")
HEAVY_DISTS = ("tensorflow-datasets", "tensorflow", "transformers", "tokenizers", "safetensors",
               "huggingface-hub", "matplotlib", "pillow", "tqdm", "ml-collections", "torch")


def core_requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """Installed distributions that ``requirements`` need, transitively (no extras)."""
    env = {"extra": ""}
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        found[name] = dist = metadata.distribution(req.name)
        todo += [Requirement(r) for r in dist.requires or []]
        # Extras named on the requirement (e.g. "etils[epath]") bring their own deps.
        for extra in req.extras:
            todo += [Requirement(r) for r in dist.requires or []
                     if Requirement(r).marker is not None
                     and Requirement(r).marker.evaluate({"extra": extra})]
    return found


def readme_library_example() -> str:
    """The first python block of the README's "Use it as a library" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def core_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("core_venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    site = Path(purelib)
    host_site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for dist in closure(core_requirements()).values():
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(dist.locate_file(top))
            if top in ("..", "__pycache__") or not src.exists() or (site / top).exists():
                continue
            if src.resolve().parent != host_site:  # outside site-packages (scripts)
                continue
            (site / top).symlink_to(src)
    (site / "atm_jax").symlink_to(ROOT / "atm_jax")
    return python


def _run(python: Path, code: str, *, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**env, "JAX_PLATFORMS": "cpu"}, cwd=str(python.parent))


# One interpreter for all checks (each start imports jax: seconds on a busy machine).
CHECKS = f"""
import importlib.util, sys
assert not [m for m in {HEAVY!r} if importlib.util.find_spec(m)], "not a core-only venv"
exec(compile(EXAMPLE, "README", "exec"))
import atm_jax
from atm_jax import tree, merge, select, atm
print("HEAVY", [m for m in {HEAVY!r} if m in sys.modules])
from atm_jax import extras
try:
    extras.require("tqdm", feature="atm_jax.finetune progress bars")
except extras.MissingExtraError as e:
    print("EXTRA", "ImportError" if isinstance(e, ImportError) else "not-ImportError", e)
try:
    from atm_jax import finetune
    print("FINETUNE", [m for m in {HEAVY!r} if m in sys.modules])
except ImportError as e:
    print("FINETUNE failed:", type(e).__name__, e)
"""


@pytest.fixture(scope="module")
def core_run(core_python) -> subprocess.CompletedProcess:
    out = _run(core_python, f"EXAMPLE = {readme_library_example()!r}\n" + CHECKS)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_core_dependencies_leave_the_experiment_stack_out():
    assert [canonicalize_name(Requirement(r).name) for r in core_requirements()] == \
        ["jax", "flax", "optax", "numpy", "scipy"]
    names = set(closure(core_requirements()))
    assert not names & set(HEAVY_DISTS), sorted(names & set(HEAVY_DISTS))
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    own = [Requirement(r) for r in extras["test"] if canonicalize_name(Requirement(r).name) == "atm-jax"]
    assert len(own) == 1 and {"experiments", "merge"} <= own[0].extras, extras["test"]
    moved = {canonicalize_name(Requirement(r).name) for r in extras["experiments"]}
    assert set(HEAVY_DISTS) - {"tensorflow", "torch"} <= moved


def test_readme_library_example_runs_on_the_core_alone(core_run):
    assert "HEAVY []" in core_run.stdout
    assert "Leaf 'dense/bias': delta has shape (3, 8) but base has (8,)" in core_run.stdout
    assert "StateMergeWarning" in core_run.stdout


def test_finetune_imports_on_the_core(core_run):
    assert "FINETUNE []" in core_run.stdout, core_run.stdout[-500:]


def test_a_missing_extra_names_the_pip_command(core_run):
    line = next(ln for ln in core_run.stdout.splitlines() if ln.startswith("EXTRA"))
    assert line.startswith("EXTRA ImportError atm_jax.finetune progress bars needs 'tqdm'")
    assert 'pip install "atm_jax[experiments]"' in line


@pytest.mark.skipif(os.environ.get("ATM_JAX_PIP_INSTALL_TEST") != "1",
                    reason="set ATM_JAX_PIP_INSTALL_TEST=1: a real pip install (2-6 min)")
def test_pip_install_of_the_wheel_brings_only_the_core(tmp_path):
    wheels, venv, src = tmp_path / "wheels", tmp_path / "venv", tmp_path / "src"
    # Build from a copy: setuptools writes build/ next to the sources.
    shutil.copytree(ROOT / "atm_jax", src / "atm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(src), "-w", str(wheels)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "-c",
                    str(ROOT / "constraints.txt"), *map(str, wheels.glob("*.whl"))], check=True)
    out = _run(python, "import importlib.util\n"
               f"print([m for m in {HEAVY!r} if importlib.util.find_spec(m)])\n"
               + readme_library_example())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("[]")
