"""Packaging: `pip install .` gives a working `pyrestserver` console script, and
the module runs as a plain script with nothing but the standard library."""

import shutil
import subprocess
import sys
import venv

import pytest

from conftest import ROOT, SERVER_SCRIPT

pytestmark = pytest.mark.slow

SOURCES = ["pyproject.toml", "README.md", "pyrestserver.py", "pyrestserver_drime.py",
           "pyrestserver_s3.py"]


def run(cmd, **kw):
    kw.setdefault("timeout", 300)
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, **kw,
    )


def script_version(cwd):
    """`python3 pyrestserver.py --version` output."""
    p = run([sys.executable, SERVER_SCRIPT, "--version"], cwd=cwd, timeout=60)
    assert p.returncode == 0, p.stderr
    return (p.stdout + p.stderr).strip()


def module_version():
    """pyrestserver.__version__ of the checkout, read by a fresh interpreter."""
    p = run([sys.executable, "-c", "import pyrestserver; print(pyrestserver.__version__)"],
            cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_script_version(tmp_path):
    version = module_version()
    assert version
    out = script_version(tmp_path)
    assert version in out
    assert "pyrestserver" in out.lower()


def test_pip_install_console_script(tmp_path):
    version = module_version()

    # build from a copy so that the checkout gets no build/ or *.egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    vpy = env_dir / "bin" / "python"
    p = run([vpy, "-m", "pip", "install", "-q", "--no-deps", str(src)], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr

    # the console script
    cli = env_dir / "bin" / "pyrestserver"
    assert cli.exists()
    p = run([cli, "--version"], cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    out = (p.stdout + p.stderr).strip()
    assert version in out
    assert "pyrestserver" in out.lower()

    # installed metadata carries the module's version; the module is importable
    # from the venv with the standard library only (installed with --no-deps)
    p = run([vpy, "-c",
             "import importlib.metadata as m, pyrestserver; "
             "print(m.version('pyrestserver')); print(pyrestserver.__version__); "
             "print(pyrestserver.__file__)"],
            cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    dist_version, mod_version, mod_file = p.stdout.split("\n")[:3]
    assert mod_version == version
    assert dist_version == version
    assert mod_file.startswith(str(env_dir)), mod_file

    # --help works too (it must not need a data directory)
    p = run([cli, "--help"], cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--path" in p.stdout + p.stderr
