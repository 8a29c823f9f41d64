"""Shared fixtures: every test talks to a real pyrestserver process over a real socket.

A server is started as a subprocess on port 0; the port is read back from the
`start server on HOST:PORT` line that pyrestserver (like rest-server) prints on
stderr.  Tests stop only the processes they started, by PID.

The `door` a server is started through is either the built-in HTTP server
(`python pyrestserver.py ...`) or the WSGI application (`tests/wsgi_door.py`,
which serves `pyrestserver.app_from_argv(...)` with a WSGI server); API tests
run against both.
"""

import base64
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "pyrestserver.py"
WSGI_DOOR = Path(__file__).resolve().parent / "wsgi_door.py"
START_LINE = re.compile(r"start server on (\S+)")
IN_CI = os.environ.get("CI", "").lower() == "true"
TYPES = ("data", "index", "keys", "locks", "snapshots")
V2 = "application/vnd.x.restic.rest.v2"


def object_id(body: bytes) -> str:
    """restic names every object but `config` by the SHA-256 of its content."""
    return hashlib.sha256(body).hexdigest()


def payload(n, tag=b""):
    """n deterministic pseudo-random bytes (different tags give different bytes)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(tag + i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:n])


def race(n, fn):
    """Run fn(i) in n threads released together; return the results in order
    (an exception a call raised stands in its place, for the caller to check)."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def read_until_closed(sock):
    """Everything `sock` receives until the peer closes or resets it (a
    socket timeout propagates)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def exchange(srv, data, shut_wr=False, timeout=3.0):
    """Send exact bytes on a fresh connection to `srv` (optionally half-close),
    read until the server closes or `timeout` s pass in silence.  Returns
    (everything received, whether the server closed the connection)."""
    chunks = []
    closed = False
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if shut_wr:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered early and closed
            closed = True
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    return b"".join(chunks), closed


def basic_auth(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {token}"


class Response:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers  # http.client.HTTPMessage (case-insensitive)
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:60]!r}>"


class ServerProcess:
    """One pyrestserver process started for a test."""

    def __init__(self, data_dir, args=(), door="builtin", env=None, python=None, script=None,
                 python_args=()):
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.door = door
        self.python = python or sys.executable
        self.python_args = list(python_args)  # interpreter options before the script
        self.script = script
        self.env = env
        self.proc = None
        self.stderr_lines = []
        self.address = None
        self._reader = None

    # -- lifecycle ---------------------------------------------------------
    def command(self):
        if self.script is not None:
            entry = [str(self.script)]
        elif self.door == "wsgi":
            entry = [str(WSGI_DOOR)]
        else:
            entry = [str(SERVER_SCRIPT)]
        args = self.args
        if not any(a == "--path" or a.startswith("--path=") for a in args):
            args = ["--path", str(self.data_dir)] + args
        if not any(a == "--listen" or a.startswith("--listen=") for a in args):
            args = args + ["--listen", "127.0.0.1:0"]
        return [self.python] + self.python_args + entry + args

    def start(self, timeout=60):
        env = dict(os.environ)
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(self.data_dir.parent),
        )
        found = threading.Event()

        def read_stderr():
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.stderr_lines.append(line)
                m = START_LINE.search(line)
                if m and not found.is_set():
                    self.address = m.group(1)
                    found.set()
            found.set()

        self._reader = threading.Thread(target=read_stderr, daemon=True)
        self._reader.start()
        if not found.wait(timeout) or self.address is None:
            self.stop()
            raise RuntimeError(
                "server did not start:\n" + "\n".join(self.stderr_lines[-40:])
            )
        return self

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc is None or self.proc.poll() is not None:
            return self.returncode
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def kill(self):
        return self.stop(signal.SIGKILL)

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self):
        return self.proc.pid

    @property
    def stderr(self):
        return "\n".join(self.stderr_lines)

    # -- addressing --------------------------------------------------------
    @property
    def host(self):
        host, _, _ = self.address.rpartition(":")
        return host.strip("[]")

    @property
    def port(self):
        return int(self.address.rpartition(":")[2])

    @property
    def url(self):
        """Base URL without a trailing slash, e.g. http://127.0.0.1:43111"""
        return f"http://{self.address}"

    def repo_url(self, repo="", scheme="rest:http", userinfo=""):
        repo = repo.strip("/")
        at = f"{userinfo}@" if userinfo else ""
        path = f"/{repo}/" if repo else "/"
        return f"{scheme}://{at}{self.address}{path}"

    # -- requests ----------------------------------------------------------
    def request(self, method, path, body=None, headers=None, auth=None, timeout=30):
        """One request on a fresh connection; the path is sent exactly as given."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if auth is not None:
                hdrs["Authorization"] = basic_auth(*auth)
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, resp.reason, resp.msg, data)
        finally:
            conn.close()

    def raw(self, data: bytes, timeout=5, read_until_close=True):
        """Send exact bytes; return everything the server sent back before
        closing the connection (or before `timeout` seconds of silence)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(data)
            chunks = []
            s.settimeout(timeout)
            while True:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
            return b"".join(chunks)

    def create_repo(self, repo="", auth=None):
        path = f"/{repo.strip('/')}/?create=true" if repo.strip("/") else "/?create=true"
        r = self.request("POST", path, auth=auth)
        assert r.status == 200, (r.status, r.body)
        return r

    def upload(self, repo, kind, body, auth=None, name=None):
        name = name or object_id(body)
        prefix = f"/{repo.strip('/')}" if repo.strip("/") else ""
        return self.request("POST", f"{prefix}/{kind}/{name}", body=body, auth=auth)


def obj_path(data_dir, repo, kind, name):
    """Where the local backend stores an object (restic's local layout)."""
    base = Path(data_dir, *[p for p in repo.split("/") if p])
    if kind == "config":
        return base / "config"
    if kind == "data":
        return base / "data" / name[:2] / name
    return base / kind / name


def temp_files(root):
    """Files left by pyrestserver's upload path (never an object name)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.startswith(".upload-"):
                found.append(os.path.join(dirpath, f))
    return found


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
def hide_bcrypt(tmp_path):
    """Environment in which `import bcrypt` fails in a server process (a
    PYTHONPATH entry whose bcrypt.py raises ImportError), as on a Pi without
    the extra."""
    d = tmp_path / "no-bcrypt"
    d.mkdir()
    (d / "bcrypt.py").write_text('raise ImportError("bcrypt is hidden by the test suite")\n')
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(d) + (os.pathsep + old if old else "")}


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(*args, door="builtin", data_dir=None, env=None,
    python=None, script=None, python_args=())."""
    started = []

    def start(*args, door="builtin", data_dir=None, env=None, python=None, script=None,
              python_args=()):
        d = Path(data_dir) if data_dir else tmp_path / "data"
        d.mkdir(parents=True, exist_ok=True)
        srv = ServerProcess(d, args, door=door, env=env, python=python, script=script,
                            python_args=python_args)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(params=["builtin", "wsgi"])
def door(request):
    """The two front doors that share one API implementation."""
    return request.param


@pytest.fixture
def server(start_server, door):
    """A --no-auth server on a fresh data directory, through each door."""
    return start_server("--no-auth", door=door)


@pytest.fixture
def repo(server):
    """A created root-level repo named `r` on `server`."""
    server.create_repo("r")
    return "r"


# -- restic ---------------------------------------------------------------


def find_restic():
    return shutil.which("restic")


@pytest.fixture(scope="session")
def restic_bin():
    path = find_restic()
    if path is None:
        if IN_CI:
            pytest.fail("restic is required under CI=true (apt-get install restic)")
        pytest.skip("restic not installed (apt-get install restic)")
    return path


class Restic:
    """Runs the real restic binary against a repository URL."""

    def __init__(self, binary, repo_url, workdir, password="correct horse", env=None):
        self.binary = binary
        self.repo_url = repo_url
        self.workdir = Path(workdir)
        self.password = password
        self.extra_env = env or {}
        self.cache = self.workdir / "restic-cache"

    def env(self):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "RESTIC_PASSWORD": self.password,
            "RESTIC_CACHE_DIR": str(self.cache),
            "TMPDIR": str(self.workdir),
        }
        env.update(self.extra_env)
        return env

    def run(self, *args, check=True, timeout=600, repo=None):
        # restic prints no progress when its output is not a terminal
        # (restic 0.14 has no --no-progress flag).
        cmd = [self.binary, "-r", repo or self.repo_url] + list(args)
        p = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env(), timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"restic {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
            )
        return p


@pytest.fixture
def make_restic(restic_bin, tmp_path):
    def make(repo_url, **kw):
        wd = tmp_path / f"restic-{len(os.listdir(tmp_path))}"
        wd.mkdir()
        return Restic(restic_bin, repo_url, wd, **kw)

    return make


def make_tree(root, files=40, seed=1, big=2 * 1024 * 1024):
    """A deterministic source tree: nested small files, one larger file, an empty
    file, a symlink and unusual names."""
    import random

    rnd = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        sub = root / f"d{i % 5}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"file {i}.bin").write_bytes(rnd.randbytes(rnd.randint(0, 20000)))
    (root / "big.bin").write_bytes(rnd.randbytes(big))
    (root / "empty").write_bytes(b"")
    (root / "ünïcode name.txt").write_text("hello\n")
    os.symlink("big.bin", root / "link-to-big")
    return root


def tree_digest(root):
    """{relative path: sha256 or link target} for comparing restored trees."""
    root = Path(root)
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out
