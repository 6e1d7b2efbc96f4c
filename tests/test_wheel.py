"""What users install: the built wheel, its data files and its console script.

Every other test imports the editable checkout, which finds a module whatever the packaging
says; these build the wheel, install it (``--no-deps``) into a folder outside the checkout and
run it from there, so a module or data file that the wheel leaves out fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SET = ROOT / "synth_sets" / "fashion-mnist_ipc10_default.h5"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a clean copy of the sources: setuptools reuses a checkout's build/ folder,
    # whose stale files would hide a module that the packaging leaves out.
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "ddkd", src / "ddkd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with the environment's setuptools (no download, seconds).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("ddkd-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    return target


def _package_files() -> set[str]:
    """Every module and data file under ddkd/ that a user needs (no caches)."""
    files = set()
    for path in (ROOT / "ddkd").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.add(path.relative_to(ROOT).as_posix())
    return files


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_package_files() - names)
    assert not missing, f"the wheel leaves out {missing}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("LICENSE")
               for n in names), "the wheel carries no LICENSE"


# The test environment's editable install of the checkout adds an import hook that would still
# find a module the wheel lacks: the installed copy runs with that hook removed.
_WITHOUT_EDITABLE = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
    "getattr(f, '__module__', '').startswith('__editable__')]; "
    "sys.path_hooks[:] = [h for h in sys.path_hooks if not "
    "getattr(h, '__module__', '').startswith('__editable__')]; "
    "sys.path_importer_cache.clear(); "
)


def _run_installed(installed: Path, tmp_path: Path, code: str,
                   *args: str) -> subprocess.CompletedProcess:
    # Run from a folder outside the checkout, with only the installed copy on the path.
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-c", _WITHOUT_EDITABLE + code, *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def _run_script(installed: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The wheel's console script ``bin/ddkd``, run as its shebang would run it."""
    script = installed / "bin" / "ddkd"
    code = (f"import runpy; sys.argv = [{str(script)!r}, *sys.argv[1:]]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    return _run_installed(installed, tmp_path, code, *args)


def test_installed_wheel_loads_a_set(installed, tmp_path):
    code = ("import ddkd; s = ddkd.load_synthset(sys.argv[1]); "
            "print(ddkd.__file__); print(tuple(s.images.shape))")
    done = _run_installed(installed, tmp_path, code, str(SHIPPED_SET))
    assert done.returncode == 0, done.stderr
    where, shape = done.stdout.split("\n")[:2]
    assert Path(where).resolve().is_relative_to(installed.resolve()), where
    assert shape == "(100, 1, 28, 28)"


def test_installed_console_script_inspects_a_set(installed, tmp_path):
    done = _run_script(installed, tmp_path, "inspect", str(SHIPPED_SET), "--png",
                       str(tmp_path / "grid.png"))
    assert done.returncode == 0, done.stderr
    assert "100" in done.stdout
    assert (tmp_path / "grid.png").stat().st_size > 0
    version = _run_script(installed, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("ddkd "), version


def test_every_imported_distribution_is_declared():
    """Each top-level module ddkd imports comes from the standard library or a declared
    dependency (lightning_fabric ships inside pytorch-lightning)."""
    import ast
    import configparser

    provides = {"torch": "torch", "torchvision": "torchvision", "kornia": "kornia",
                "numpy": "numpy", "h5py": "h5py", "lightly": "lightly", "tqdm": "tqdm",
                "matplotlib": "matplotlib", "lightning_fabric": "pytorch-lightning",
                "PIL": "pillow"}
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for line in cfg["options"]["install_requires"].splitlines()
                if line.strip() and not line.strip().startswith("#")}
    # Pillow arrives with torchvision and matplotlib, both of which require it.
    declared.add("pillow")
    imported = set()
    for path in (ROOT / "ddkd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "ddkd"}
    unknown = third_party - set(provides)
    assert not unknown, f"imported but not mapped to a distribution: {unknown}"
    undeclared = {provides[m] for m in third_party} - declared
    assert not undeclared, f"imported but not declared in setup.cfg: {undeclared}"


def test_inspect_writes_its_grid_into_the_current_folder(installed, tmp_path):
    """Not beside the set: for a set inside an installed package that is site-packages."""
    beside = SHIPPED_SET.with_suffix(".png")
    existed = beside.exists()
    done = _run_script(installed, tmp_path, "inspect", str(SHIPPED_SET))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fashion-mnist_ipc10_default.png").stat().st_size > 0
    assert beside.exists() == existed
