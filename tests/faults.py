"""Fault-injection helpers for the reliability campaign (tests/test_reliability.py).

Everything here acts on a real pyrestserver process from the outside, the way a
crash, a broken disk or a hostile client would:

* ``figure``: print (and return) one ``FIGURE name key=value ...`` line;
* ``/proc`` probes: open file descriptors and threads of a process;
* ``audit_store``: walk a data directory and check that every object file's
  SHA-256 is its name, and that no upload temp file is left;
* raw HTTP/1.1 over sockets: ``read_response``, ``KeepAlive`` (a keep-alive
  connection that reconnects when the server closes it), ``upload_watching``
  (streams a body while watching for an early answer, as Go's client does);
* ``Strace``: attach strace to a running server, to trace syscalls or to inject
  faults (``-e inject=fsync:error=EIO``, ``-e inject=link:signal=KILL``), and
  ``parse_strace`` for its output;
* ``tmpfs`` and ``read_only_bind``: mounts for full-disk and read-only faults
  (root only; unmounted on exit);
* ``FaultProxy``: a TCP proxy that resets connections and flips bytes.

Only processes started here are ever signalled, and only by PID.
"""

import contextlib
import hashlib
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

OBJECT_ID = re.compile(r"[0-9a-f]{64}\Z")
TYPES = ("data", "index", "keys", "locks", "snapshots")
TEMP_PREFIX = ".upload-"


# -- figures --------------------------------------------------------------------


def figure(name, **values):
    """Print one machine-greppable result line and return it."""
    line = "FIGURE " + name + " " + " ".join(f"{k}={v}" for k, v in values.items())
    print(line, flush=True)
    return line


# -- /proc ----------------------------------------------------------------------------


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Threads: line for {pid}")


def wait_for(predicate, timeout, interval=0.05):
    """Poll until predicate() is true; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def raise_nofile(want):
    """Raise this process's soft RLIMIT_NOFILE to at least `want` (up to hard,
    and for root also the hard limit); return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard != resource.RLIM_INFINITY and hard < want and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


# -- the store on disk --------------------------------------------------------------------


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


@dataclass
class StoreAudit:
    objects: dict = field(default_factory=dict)   # relpath -> size, named objects
    configs: dict = field(default_factory=dict)   # relpath -> bytes
    corrupt: list = field(default_factory=list)   # objects whose SHA-256 != name
    misplaced: list = field(default_factory=list)  # data objects outside data/<id[:2]>/
    temps: list = field(default_factory=list)     # upload temp files
    strays: list = field(default_factory=list)    # other files in type folders

    @property
    def clean(self):
        return not (self.corrupt or self.misplaced or self.temps or self.strays)

    def summary(self):
        return (f"objects={len(self.objects)} corrupt={len(self.corrupt)} "
                f"temps={len(self.temps)} strays={len(self.strays)}")


def audit_store(root, verified=None):
    """Check every file under `root` (a data directory in restic's layout).

    `verified` (a dict) caches files already hashed, keyed by (path, inode,
    size, mtime), so that repeated audits of a growing store stay cheap.
    """
    root = Path(root)
    audit = StoreAudit()
    for dirpath, _dirs, files in os.walk(root):
        here = Path(dirpath)
        for name in files:
            path = here / name
            rel = str(path.relative_to(root))
            if name.startswith(TEMP_PREFIX):
                audit.temps.append(rel)
                continue
            if name == "config":
                audit.configs[rel] = path.read_bytes()
                continue
            parent, grand = here.name, here.parent.name
            in_type_dir = parent in TYPES or (grand == "data" and len(parent) == 2)
            if not in_type_dir:
                continue  # .htpasswd, certificates, sentinels: not objects
            if not OBJECT_ID.match(name):
                audit.strays.append(rel)
                continue
            if parent == "data" or (grand == "data" and parent != name[:2]):
                audit.misplaced.append(rel)
            st = path.stat()
            key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
            audit.objects[rel] = st.st_size
            if verified is not None and key in verified:
                continue
            if sha256_file(path) != name:
                audit.corrupt.append(rel)
            elif verified is not None:
                verified[key] = True
    return audit


def tree_state(root, skip=()):
    """{relpath: (kind, size, mtime_ns, inode)} of everything under root except
    the paths in `skip` (and what is below them)."""
    root = Path(root)
    skip = {Path(s).resolve() for s in skip}
    out = {}
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skip]
        for name in dirs + files:
            p = here / name
            if p.resolve() in skip:
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


# -- raw HTTP/1.1 ---------------------------------------------------------------------------


class ServerClosed(Exception):
    """The server closed the connection before a complete response."""


@dataclass
class RawResponse:
    status: int
    headers: dict
    body: bytes
    complete: bool = True

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)


def read_response(rfile, method="GET"):
    """Read one final response from a binary file object (interim 1xx skipped)."""
    while True:
        line = rfile.readline(65537)
        if not line:
            raise ServerClosed("no status line")
        m = re.match(rb"HTTP/1\.[01] (\d{3})", line)
        if m is None:
            raise AssertionError(f"bad status line {line[:200]!r}")
        status = int(m.group(1))
        headers = {}
        while True:
            h = rfile.readline(65537)
            if not h:
                raise ServerClosed("inside headers")
            if h in (b"\r\n", b"\n"):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200:
            continue
        length = int(headers.get("content-length", "0"))
        if method == "HEAD" or status in (204, 304):
            return RawResponse(status, headers, b"")
        body = rfile.read(length)
        return RawResponse(status, headers, body, len(body) == length)


def request_bytes(method, target, body=b"", headers=(), version="HTTP/1.1"):
    lines = [f"{method} {target} {version}", "Host: x"]
    names = {k.lower() for k, _ in headers}
    if body or method in ("POST", "PUT"):
        if "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class KeepAlive:
    """One keep-alive connection; reconnects when the server closed it.

    ``request`` sends the target exactly as given (no normalisation)."""

    def __init__(self, host, port, timeout=30, auth=None):
        self.host, self.port, self.timeout = host, port, timeout
        self.auth = auth
        self.sock = None
        self.rfile = None
        self.connects = 0

    def _connect(self):
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        self.connects += 1

    def close(self):
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.rfile.close()
                self.sock.close()
        self.sock = self.rfile = None

    def request(self, method, target, body=b"", headers=(), version="HTTP/1.1", retry=True):
        headers = list(headers)
        if self.auth is not None:
            headers.append(("Authorization", self.auth))
        data = request_bytes(method, target, body, headers, version)
        for attempt in (0, 1):
            if self.sock is None:
                self._connect()
            try:
                self.sock.sendall(data)
                resp = read_response(self.rfile, method)
            except (ServerClosed, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt or not retry:
                    raise
                continue
            if resp.header("connection", "").lower() == "close":
                self.close()
            return resp
        raise AssertionError("unreachable")


def upload_watching(host, port, head, body, piece=256 * 1024, timeout=30):
    """Send `head` + `body` while watching for an early answer (as Go's HTTP
    client does: a response that arrives while the body is still being sent is
    returned).  Returns (status or None, bytes of body sent)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setblocking(False)
    out = memoryview(head + body)
    sent = 0
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            want_write = [sock] if sent < len(out) else []
            readable, writable, _ = select.select([sock], want_write, [], 0.5)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    break
                if not chunk:
                    break
                received += chunk
                if b"\r\n" in received:
                    break
            if writable:
                try:
                    sent += sock.send(out[sent:sent + piece])
                except (ConnectionResetError, BrokenPipeError):
                    want_write = []
                    sent = len(out)  # nothing more can be sent; keep reading
    finally:
        sock.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    return (int(m.group(1)) if m else None), max(0, sent - len(head))


def rst_close(sock):
    """Close with a TCP reset instead of a FIN (also waking up a thread that
    is blocked reading the socket, which would otherwise delay the close)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    sock.close()


# -- strace ------------------------------------------------------------------------------------


class Strace:
    """``strace -f -p PID`` attached to a running server for the duration of a
    ``with`` block.  Extra arguments select what to trace or inject, e.g.
    ``Strace(pid, out, "-e", "inject=fsync:error=EIO")``.  Leaving the block
    detaches (SIGINT to strace); if an injected signal killed the server,
    strace has already exited."""

    def __init__(self, pid, output, *args):
        self.pid = pid
        self.output = str(output)
        self.args = list(args)
        self.proc = None
        self.messages = []

    def __enter__(self):
        cmd = ["strace", "-f", "-y", "-s", "24", "-o", self.output, *self.args,
               "-p", str(self.pid)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        attached = threading.Event()

        def read():
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                self.messages.append(line)
                if "attached" in line:
                    attached.set()
            attached.set()

        threading.Thread(target=read, daemon=True).start()
        if not attached.wait(15) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("strace did not attach: " + "\n".join(self.messages))
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __exit__(self, *exc):
        self.stop()


@dataclass
class Sys:
    tid: int
    name: str
    args: str
    ret: object      # int, or None when unknown ('?')
    error: str = ""  # e.g. "EIO" for a failed call
    injected: bool = False
    index: int = 0

    def path_args(self):
        """Quoted strings and <fd paths> in the arguments (not the working
        directory that -y prints after AT_FDCWD)."""
        args = re.sub(r"AT_FDCWD<[^<>]*>", "AT_FDCWD", self.args)
        return re.findall(r'"((?:[^"\\]|\\.)*)"|<([^<>]*)>', args)

    def fd_path(self, n=0):
        """The path strace -y printed for the n-th fd argument."""
        found = re.findall(r"\d+<([^<>]*)>", self.args)
        return found[n] if len(found) > n else None

    def strings(self):
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)


_STRACE_CALL = re.compile(r"(\w+)\((.*)\)\s+=\s+(-?\d+|0x[0-9a-f]+|\?)(?:\s+(\w+))?(.*)$")


def parse_strace(path):
    """Parse `strace -f -o` output into Sys events in order, joining
    ``<unfinished ...>`` / ``<... resumed>`` pairs per thread."""
    pending = {}
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = re.match(r"(\d+)\s+(.*)$", line)
            if not m:
                continue
            tid, rest = int(m.group(1)), m.group(2)
            if rest.endswith("<unfinished ...>"):
                pending[tid] = rest[: -len("<unfinished ...>")].rstrip()
                continue
            resumed = re.match(r"<\.\.\. (\w+) resumed>\s?(.*)$", rest)
            if resumed:
                rest = pending.pop(tid, resumed.group(1) + "(") + resumed.group(2)
            if rest.startswith(("+++", "---")):
                events.append(Sys(tid, rest[:3], rest, None, index=len(events)))
                continue
            c = _STRACE_CALL.match(rest)
            if not c:
                continue
            ret = c.group(3)
            value = None if ret == "?" else int(ret, 0)
            events.append(Sys(tid, c.group(1), c.group(2), value,
                              error=(c.group(4) or "") if value == -1 else "",
                              injected="INJECTED" in (c.group(5) or ""), index=len(events)))
    return events


# -- mounts --------------------------------------------------------------------------------


def _run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def mounts_available():
    """True if this process may mount filesystems (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        return False
    probe = Path(f"/tmp/.pyrestserver-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)).returncode == 0
        if ok:
            _run("umount", str(probe))
        return ok
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _umount(path):
    for args in (("umount", str(path)), ("umount", "-l", str(path))):
        if _run(*args).returncode == 0:
            return
        time.sleep(0.2)


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` (e.g. "20m") mounted on the existing folder `path`."""
    r = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    if r.returncode:
        raise RuntimeError(f"mount tmpfs failed: {r.stderr}")
    try:
        yield Path(path)
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only_bind(path):
    """Make `path` read-only by bind-mounting it over itself."""
    r = _run("mount", "--bind", str(path), str(path))
    if r.returncode:
        raise RuntimeError(f"bind mount failed: {r.stderr}")
    try:
        r = _run("mount", "-o", "remount,bind,ro", str(path))
        if r.returncode:
            raise RuntimeError(f"remount ro failed: {r.stderr}")
        yield Path(path)
    finally:
        _umount(path)


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- a fault-injecting TCP proxy -------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port), which can
    be changed at any time (e.g. after the server restarted on a new port).

    Faults, counted over the client-to-server byte stream of all connections:
    * ``reset_every=N``: after each N bytes, reset that connection (both sides);
    * ``flip_every=N``: XOR one byte with 0x01 each N bytes, only past the
      first `flip_skip` bytes of a connection (to mostly hit bodies);
    * ``max_faults=N``: stop injecting each kind of fault after N of them, so a
      client with a finite retry budget (restic 0.14: 10 tries) can finish.
    """

    def __init__(self, upstream, reset_every=None, flip_every=None, flip_skip=4096, seed=1,
                 max_faults=None):
        self.upstream = upstream
        self.max_faults = max_faults
        self.reset_every = reset_every
        self.flip_every = flip_every
        self.flip_skip = flip_skip
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.total = 0
        self.next_reset = reset_every
        self.next_flip = flip_every
        self.connections = 0
        self.resets = 0
        self.flips = 0
        self.refused = 0
        self.closed = False
        self.sockets = set()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            with self.lock:
                self.refused += 1
            rst_close(client)
            return
        upstream.settimeout(None)
        with self.lock:
            self.connections += 1
            self.sockets.update((client, upstream))
        done = threading.Event()

        def back():
            try:
                while True:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                done.set()

        threading.Thread(target=back, daemon=True).start()
        offset = 0
        reset = False
        try:
            while not reset:
                data = client.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        upstream.shutdown(socket.SHUT_WR)
                    break
                data = bytearray(data)
                with self.lock:
                    start = self.total
                    self.total += len(data)
                    if self.flip_every and (self.max_faults is None
                                            or self.flips < self.max_faults):
                        while self.next_flip < self.total:
                            pos = self.next_flip - start
                            if offset + pos >= self.flip_skip:
                                data[pos] ^= 0x01
                                self.flips += 1
                            self.next_flip += self.flip_every
                    if (self.reset_every and self.total >= self.next_reset
                            and (self.max_faults is None or self.resets < self.max_faults)):
                        self.next_reset = self.total + self.reset_every
                        self.resets += 1
                        reset = True
                        data = data[: max(0, len(data) - self.rng.randint(1, len(data)))]
                offset += len(data)
                upstream.sendall(data)
        except OSError:
            reset = True
        if reset:
            rst_close(client)
            rst_close(upstream)
        else:
            done.wait(120)
            client.close()
            upstream.close()
        with self.lock:
            self.sockets.discard(client)
            self.sockets.discard(upstream)

    def close(self):
        self.closed = True
        self.listener.close()
        with self.lock:
            socks = list(self.sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
