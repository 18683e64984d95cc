"""The project installs as ``zerotrain.optim`` / ``zerotrain.service``, and only under those names."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SOURCES = ("pyproject.toml", "setup.py", "README.md", "optim", "service")


def test_the_checkout_root_is_not_importable():
    """``import optim`` beside ``zerotrain.optim`` would make every class exist twice
    (``resolve_algorithm`` matches classes by identity): the suite never puts the
    repo root on ``sys.path`` (``make test`` runs ``python -P -m pytest``)."""
    entries = {Path(p or os.getcwd()).resolve() for p in sys.path}
    assert ROOT not in entries
    import zerotrain.optim

    assert Path(zerotrain.optim.__file__).resolve().parent == ROOT / "optim"
    for name in ("optim.adamax", "service.jobs"):
        assert importlib.util.find_spec(name.split(".")[0]) is None or (
            importlib.util.find_spec(name) is None
        ), f"{name} is importable under its folder's name"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built wheel, installed without dependencies into a fresh venv that sees this
    environment's packages (torch, ray, grpc...) but not the checkout or its editable install."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("zerotrain-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # A bare path in a .pth file: the project's packages, but none of its .pth files
    # (the editable install's import hook among them) run.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    Path(site, "project_site.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return venv


def test_wheel_imports_the_optimizers_without_the_service(installed_wheel: Path, tmp_path: Path):
    code = (
        "import sys, zerotrain.optim as o\n"
        "o.Adamax, o.Nadam, o.ZeroOptimizer\n"
        "print(o.__file__)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc', 'optim', 'service')"
        " or m.startswith('zerotrain.service')]\n"
        "assert not loaded, loaded\n"
    )
    out = subprocess.run(
        [installed_wheel / "bin" / "python", "-c", code],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(installed_wheel)


def test_wheel_installs_the_console_scripts(installed_wheel: Path, tmp_path: Path):
    for script in ("trainctl", "zerotrain-serve"):
        out = subprocess.run(
            [installed_wheel / "bin" / script, "--help"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"usage: {script}"), out.stdout[:200]
