"""Packaging: `pip install .` gives a working `pyrestserver` console script, and
the module runs as a plain script with nothing but the standard library."""

import shutil
import subprocess
import sys
import venv
from pathlib import Path

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


def copy_sources(dest):
    dest.mkdir()
    for name in SOURCES:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dest / name)
    return dest


def test_extras_install_and_each_backend_loads(tmp_path):
    """`pip install .[bcrypt,drime,s3]` in a clean venv brings what each extra
    promises: bcrypt hashes, and the drime and s3 backends load by name."""
    src = copy_sources(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    vpy = env_dir / "bin" / "python"
    p = run([vpy, "-m", "pip", "install", "-q", f"{src}[bcrypt,drime,s3]"], cwd=tmp_path,
            timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run([vpy, "-c",
             "import bcrypt, pyrestserver as core; "
             "print(core.make_password_hash(b'pw')[:4]); "
             "print(core.load_backend_module('drime').__name__); "
             "print(core.load_backend_module('s3').__name__)"], cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["$2b$", "pyrestserver_drime", "pyrestserver_s3"]


def test_backend_without_its_extra_names_the_extra(tmp_path):
    """Without boto3, `--backend s3` stops with a one-line hint, no traceback."""
    src = copy_sources(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    vpy = env_dir / "bin" / "python"
    p = run([vpy, "-m", "pip", "install", "-q", "--no-deps", str(src)], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run([env_dir / "bin" / "pyrestserver", "--backend", "s3", "--s3-bucket", "b",
             "--path", tmp_path / "d", "--no-auth"], cwd=tmp_path, timeout=60)
    assert p.returncode == 1
    assert "pip install 'pyrestserver[s3]'" in p.stderr
    assert "Traceback" not in p.stderr



def _cmdline(pid):
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def test_script_run_continues_as_module_with_same_pid_options_and_arguments(start_server,
                                                                             tmp_path):
    """A script's parse tree lives as long as the script runs, so a script run
    re-executes itself (Python 3.10+) as a module run: same PID, same
    interpreter options, same arguments after the script path."""
    srv = start_server("--no-auth", python_args=("-X", "dev", "-u"))
    argv = _cmdline(srv.pid)
    assert argv[0] == sys.executable
    assert argv[-6:] == [str(SERVER_SCRIPT), "--path", str(tmp_path / "data"), "--no-auth",
                         "--listen", "127.0.0.1:0"]
    if sys.version_info >= (3, 10):
        assert argv[1:4] == ["-X", "dev", "-u"]
        assert argv[4] == "-c" and "_run_loaded_script" in argv[5]
    else:  # no sys.orig_argv: runs in place
        assert argv[1:4] == ["-X", "dev", "-u"] and "-c" not in argv
    assert srv.request("POST", "/?create=true").status == 200
    assert (tmp_path / "data" / "config").exists() is False  # create makes folders only
    assert (tmp_path / "data" / "data").is_dir()
    assert srv.stop() == 0


def test_script_run_under_a_profiler_stays_in_place(start_server, tmp_path):
    """Re-executing would escape a debugger or profiler: under `-m cProfile`
    the script runs where it was started."""
    srv = start_server("--no-auth",
                       python_args=("-m", "cProfile", "-o", str(tmp_path / "prof")))
    argv = _cmdline(srv.pid)
    assert "cProfile" in argv and "-c" not in argv
    assert srv.request("GET", "/config").status == 404
    assert srv.stop() == 0
    assert (tmp_path / "prof").stat().st_size > 0
