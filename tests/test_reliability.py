"""Reliability and security campaign (issue 7): break the server the way crashes,
broken disks and attackers do, and measure what survives.

Plan: ../shared/reference/reliability-plan.md (threat model §1, cases §2, fault
simulation §3, figures §5).  Each test prints one or more ``FIGURE`` lines
(also recorded as JUnit test-suite properties) and asserts the target figure:

1. crash safety: >= 200 SIGKILLs at random points of concurrent uploads, kills
   at each syscall of the write path (strace), a restic backup through a
   server kill, connection resets and flipped bytes -> 0 partial or corrupt
   objects, restic ``check --read-data`` clean;
2. thousands of corrupted uploads of every type -> 0 stored mismatches;
3. strace audit: every 200 for a write follows fsync(temp), link, fsync(dir);
   an fsync error never yields 200;
4. full disk (tmpfs) -> 507, space returns; injected ENOSPC -> 507; read-only
   filesystem and EIO -> 500, never 404;
5. 1000 aborted uploads and body timeouts -> 0 temp files, fds, threads left;
6. append-only and private repositories: 0 bypasses over encodings x methods x
   races;
7. a generated corpus of request-smuggling variants -> 0 smuggled requests run;
8. 1000 slowloris connections + idle TLS connections -> restic still < 5 s;
9. hypothesis fuzzing of the request parser and router -> no 5xx, no
   traceback, nothing touched outside --path.

Needs root for the mount and strace cases (CI runs as root); elsewhere they
skip, except under CI=true where they fail.  Helpers live in tests/faults.py.
"""

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pyrestserver
from conftest import (IN_CI, TYPES, V2, basic_auth, exchange, make_tree, obj_path, object_id,
                      race, temp_files, tree_digest)
from faults import (FaultProxy, KeepAlive, ServerClosed, Strace, audit_store, fd_count, figure,
                    free_bytes, mounts_available, parse_strace, raise_nofile, read_only_bind,
                    read_response, request_bytes, rst_close, thread_count, tmpfs, tree_state,
                    upload_watching, wait_for)

KINDS = TYPES + ("config",)
MiB = 1 << 20


# -- shared fixtures and helpers ---------------------------------------------------------


@pytest.fixture
def report(record_testsuite_property):
    """report(name, **values): print a FIGURE line and record it as a property
    of the JUnit test suite (so CI's XML report carries the figures)."""
    def emit(name, **values):
        line = figure(name, **values)
        record_testsuite_property(f"FIGURE {name}", line[len("FIGURE " + name) + 1:])
        return line
    return emit


def need(condition, what):
    """Skip when a fault cannot be simulated here; under CI=true, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def can_mount():
    return mounts_available()


@pytest.fixture(scope="session")
def has_strace():
    return shutil.which("strace") is not None and os.geteuid() == 0


def target(repo, kind, name=None):
    if kind == "config":
        return f"/{repo}/config"
    return f"/{repo}/{kind}/{name or ''}"


def listing(srv, repo, kind, auth=None):
    """{name: size} from a v2 listing."""
    r = srv.request("GET", f"/{repo}/{kind}/", headers={"Accept": V2}, auth=auth)
    assert r.status == 200, (kind, r)
    return {item["name"]: item["size"] for item in json.loads(r.body)}


def assert_listings_match_disk(srv, repo="r"):
    """Every listed name is a complete object on disk with the listed size, and
    every object on disk is listed: a listing never shows a partial object."""
    for kind in TYPES:
        listed = listing(srv, repo, kind)
        folder = srv.data_dir / repo / kind
        on_disk = {}
        for dirpath, _dirs, files in os.walk(folder):
            for f in files:
                if not f.startswith("."):
                    on_disk[f] = os.path.getsize(os.path.join(dirpath, f))
        assert listed == on_disk, (kind, set(listed) ^ set(on_disk))


def random_body(rng, limit):
    """Random bytes; sizes spread over empty, small, and up to `limit`."""
    pick = rng.random()
    if pick < 0.05:
        size = 0
    elif pick < 0.5:
        size = rng.randint(1, 64 * 1024)
    else:
        size = rng.randint(64 * 1024, limit)
    return rng.randbytes(size)


def server_threads(srv):
    return thread_count(srv.pid)


# =============================================================================
# 1. Crash safety: SIGKILL at random points and at each step of the write path
# =============================================================================


class Uploader(threading.Thread):
    """Uploads random objects (and, if asked, the config) over one keep-alive
    connection, slowly enough that a kill lands mid-upload, until the
    connection dies.  Records what was acknowledged."""

    PIECE = 64 * 1024

    def __init__(self, srv, repo, rng, config=None, limit=3 * MiB, pace=0.001):
        super().__init__(daemon=True)
        self.srv, self.repo, self.rng = srv, repo, rng
        self.config = config
        self.limit = limit
        self.pace = pace
        self.acked = []        # (kind, name, size)
        self.started = 0
        self.interrupted = 0

    def upload(self, sock, rfile, kind, name, body):
        head = request_bytes("POST", target(self.repo, kind, name), b"",
                             [("Content-Length", str(len(body)))])
        self.started += 1
        sock.sendall(head)
        view = memoryview(body)
        for i in range(0, len(body), self.PIECE):
            sock.sendall(view[i:i + self.PIECE])
            time.sleep(self.pace)
        resp = read_response(rfile, "POST")
        if resp.status == 200:
            self.acked.append((kind, name, len(body)))
        return resp.status

    def run(self):
        try:
            sock = socket.create_connection((self.srv.host, self.srv.port), timeout=10)
        except OSError:
            return
        rfile = sock.makefile("rb")
        try:
            if self.config is not None:
                self.upload(sock, rfile, "config", "config", self.config)
            while True:
                kind = self.rng.choice(("data", "data", "data", "index", "keys", "locks",
                                        "snapshots"))
                body = random_body(self.rng, self.limit)
                self.upload(sock, rfile, kind, object_id(body), body)
        except (OSError, ServerClosed):
            self.interrupted += 1
        finally:
            sock.close()


def check_after_restart(srv, repo, acked, configs_sent, verified):
    """Count what a crash and restart left wrong: temp files, objects whose
    SHA-256 is not their name, a partial config, acknowledged uploads that
    are gone, listings that differ from the complete objects on disk."""
    audit = audit_store(srv.data_dir, verified)
    config = audit.configs.get(f"{repo}/config")
    lost = [(kind, name) for kind, name, size in acked
            if not (obj_path(srv.data_dir, repo, kind, name).exists()
                    and obj_path(srv.data_dir, repo, kind, name).stat().st_size == size)]
    try:
        assert_listings_match_disk(srv, repo)
        listing_mismatch = 0
    except AssertionError:
        listing_mismatch = 1
    return audit, {
        "temps_after_restart": len(audit.temps),
        "corrupt": len(audit.corrupt) + len(audit.misplaced) + len(audit.strays),
        "partial_config": int(config is not None and config not in configs_sent),
        "acked_lost": len(lost),
        "listing_mismatch": listing_mismatch,
    }


def wipe_objects(data_dir, repo):
    """Remove all objects and the config, keeping the repo folders (keeps the
    kill loop's audits small)."""
    base = Path(data_dir, repo)
    with contextlib.suppress(FileNotFoundError):
        (base / "config").unlink()
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            os.unlink(os.path.join(dirpath, f))


@pytest.mark.slow
def test_sigkill_at_random_points_of_uploads(start_server, data_dir, report):
    """F1/T73: 200 SIGKILLs, each at a uniformly random moment while 3 clients
    stream uploads of every type and the config (0 B to 3 MiB, ~60 MB/s each,
    keep-alive).  After each restart: no temp file, every object's SHA-256 is
    its name, the config is absent or complete, every acknowledged upload is
    there, listings show exactly the complete objects."""
    kills = 200
    rng = random.Random(7)
    repo = "r"
    args = ("--no-auth", "--header-timeout", "5", "--body-timeout", "5")
    srv = start_server(*args, data_dir=data_dir)
    srv.create_repo(repo)
    verified = {}
    stats = dict(kills=0, uploads_started=0, uploads_cut_by_kill=0, acked=0,
                 temps_seen_after_kill=0, objects_checked=0, configs_present=0)
    bad = dict(temps_after_restart=0, corrupt=0, partial_config=0, acked_lost=0,
               listing_mismatch=0)
    configs_sent = []
    for i in range(kills):
        config = rng.randbytes(rng.choice((16, 300, 70000, 2 * MiB)))
        configs_sent.append(config)
        uploaders = [Uploader(srv, repo, random.Random(rng.random()),
                              config=config if n == 0 else None) for n in range(3)]
        for u in uploaders:
            u.start()
        time.sleep(rng.uniform(0.0, 0.3))
        srv.kill()
        for u in uploaders:
            u.join(10)
        acked = [a for u in uploaders for a in u.acked]
        stats["kills"] += 1
        stats["uploads_started"] += sum(u.started for u in uploaders)
        stats["uploads_cut_by_kill"] += sum(u.interrupted for u in uploaders)
        stats["acked"] += len(acked)
        stats["temps_seen_after_kill"] += len(temp_files(data_dir))
        srv = start_server(*args, data_dir=data_dir)
        audit, found = check_after_restart(srv, repo, acked, configs_sent, verified)
        for k, v in found.items():
            bad[k] += v
        stats["objects_checked"] += len(audit.objects)
        stats["configs_present"] += f"{repo}/config" in audit.configs
        wipe_objects(data_dir, repo)
        verified.clear()
    srv.stop()
    report("sigkill_random", **stats, **bad)
    assert stats["kills"] >= 200
    assert stats["temps_seen_after_kill"] > 0, "no kill landed mid-upload"
    assert bad == dict.fromkeys(bad, 0), bad


def post_raw(srv, path, body, timeout=20):
    """One POST on a fresh connection; the status, or None if the server died
    or closed the connection without answering."""
    try:
        with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
            s.sendall(request_bytes("POST", path, body))
            return read_response(s.makefile("rb"), "POST").status
    except (OSError, ServerClosed):
        return None


# (syscall, n-th call in the request's thread, published afterwards?)
WRITE_PATH_STEPS = [
    ("openat", 1, False),   # creating the temp file
    ("write", 1, False),    # first body chunk
    ("write", 2, False),    # second body chunk (1 MiB in)
    ("fsync", 1, False),    # fsync of the temp file
    ("link", 1, False),     # publishing (link temp -> final name)
    ("unlink", 1, True),    # removing the temp name after the link
    ("fsync", 2, True),     # fsync of the folder
    ("sendto", 1, True),    # sending "200 OK"
]


@pytest.mark.slow
def test_sigkill_at_each_step_of_the_write_path(start_server, data_dir, report, has_strace,
                                                tmp_path):
    """F1/T74: strace kills the server (SIGKILL at syscall entry) at each step
    of an upload of a data pack, a key and the config.  After the restart the
    object is absent if the kill came before the link, complete after it, and
    never partial; no temp file survives; the listing matches the disk."""
    need(has_strace, "strace (as root)")
    args = ("--no-auth",)
    srv = start_server(*args, data_dir=data_dir)
    srv.create_repo("r")
    outcomes = {"absent": 0, "complete": 0, "partial": 0, "answered_200": 0}
    rounds = 0
    for syscall, nth, published in WRITE_PATH_STEPS:
        for kind in ("data", "keys", "config"):
            body = os.urandom(3 * MiB + 12345)
            name = "config" if kind == "config" else object_id(body)
            inject = f"inject={syscall}:signal=KILL:when={nth}"
            with Strace(srv.pid, tmp_path / "kill.trace", "-e", f"trace={syscall}", "-e", inject):
                status = post_raw(srv, target("r", kind, name), body)
                srv.proc.wait(20)
            assert srv.returncode == -signal.SIGKILL, (syscall, nth, kind, srv.returncode)
            rounds += 1
            outcomes["answered_200"] += status == 200
            srv = start_server(*args, data_dir=data_dir)
            path = obj_path(data_dir, "r", kind, name)
            if not path.exists():
                state = "absent"
            elif path.read_bytes() == body:
                state = "complete"
            else:
                state = "partial"
            outcomes[state] += 1
            assert state == ("complete" if published else "absent"), (syscall, nth, kind, state)
            assert temp_files(data_dir) == [], (syscall, nth, kind)
            assert_listings_match_disk(srv, "r")
            if path.exists():
                path.unlink()
    report("sigkill_write_path_steps", steps=len(WRITE_PATH_STEPS), kills=rounds, **outcomes)
    assert outcomes["partial"] == 0 and outcomes["answered_200"] == 0


def count_packs(data_dir, repo):
    base = Path(data_dir, repo, "data")
    return sum(1 for _ in base.glob("*/*") if not _.name.startswith("."))


@pytest.mark.slow
@pytest.mark.e2e
def test_restic_backup_through_a_server_kill_resets_and_flipped_bytes(
        start_server, data_dir, make_restic, tmp_path, report):
    """F1/F12/T133: restic backs up ~45 MB through a proxy that resets a
    connection every 6 MiB and flips a byte every 9 MiB, and the server is
    SIGKILLed mid-backup and restarted (the proxy then points at the new
    process).  The backup completes, `check --read-data` is clean, the
    restore is identical, and no temp file or corrupt object is left."""
    args = ("--no-auth", "--body-timeout", "10")
    srv = start_server(*args, data_dir=data_dir)
    # Six of each kind of fault: restic 0.14 gives up on an object after 10 tries.
    proxy = FaultProxy((srv.host, srv.port), reset_every=6 * MiB, flip_every=9 * MiB,
                       max_faults=6)
    backup = None
    try:
        url = f"rest:http://127.0.0.1:{proxy.port}/r/"
        restic = make_restic(url)
        restic.run("init")
        src = make_tree(tmp_path / "src", files=40, seed=5, big=40 * MiB)
        cmd = [restic.binary, "-r", url, "--pack-size", "4",
               "--limit-upload", "16384", "backup", str(src)]
        backup = subprocess.Popen(cmd, env=restic.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        landed = wait_for(lambda: count_packs(data_dir, "r") >= 3 or backup.poll() is not None,
                          120, interval=0.02)
        packs_at_kill = count_packs(data_dir, "r")
        killed_mid_backup = bool(landed) and backup.poll() is None
        srv.kill()
        temps_after_kill = len(temp_files(data_dir))
        srv = start_server(*args, data_dir=data_dir)
        proxy.upstream = (srv.host, srv.port)
        out, err = backup.communicate(timeout=600)
        temps_when_backup_done = len(temp_files(data_dir))
        check = restic.run("check", "--read-data", check=False)
        dst = tmp_path / "restore"
        restored = restic.run("restore", "latest", "--target", str(dst), check=False)
        same = restored.returncode == 0 and tree_digest(dst / src.relative_to("/")) == \
            tree_digest(src)
        wait_for(lambda: not temp_files(data_dir), 12)  # a client gone silent: body timeout
        audit = audit_store(data_dir)
        report("restic_backup_faults", server_kills=1, killed_mid_backup=killed_mid_backup,
               packs_at_kill=packs_at_kill, temps_after_kill=temps_after_kill,
               temps_when_backup_done=temps_when_backup_done,
               proxy_resets=proxy.resets, proxy_flips=proxy.flips,
               backup_rc=backup.returncode, check_read_data_rc=check.returncode,
               restore_identical=same, packs=count_packs(data_dir, "r"),
               corrupt=len(audit.corrupt), temps=len(audit.temps))
    finally:
        if backup is not None and backup.poll() is None:
            backup.kill()
            backup.wait(10)
        proxy.close()
    assert killed_mid_backup, ("the kill should land mid-backup", err[-2000:])
    assert backup.returncode == 0, err[-3000:]
    assert proxy.resets >= 3 and proxy.flips >= 2
    assert check.returncode == 0 and "no errors were found" in check.stdout, check.stdout + \
        check.stderr
    assert same
    assert audit.clean, audit.summary()


# =============================================================================
# 2. Corrupted uploads
# =============================================================================


def corrupt(body, how, rng):
    """A corrupted copy of a non-empty `body` (never equal to it)."""
    bad = _corrupt(body, how, rng)
    while bad == body:  # another random 1-byte body can be the same byte
        bad = _corrupt(body, how, rng)
    return bad


def _corrupt(body, how, rng):
    if how == "flip":
        i = rng.randrange(len(body))
        return body[:i] + bytes([body[i] ^ (1 << rng.randrange(8))]) + body[i + 1:]
    if how == "truncate":
        return body[:rng.randrange(len(body))]
    if how == "append":
        return body + rng.randbytes(rng.randint(1, 64))
    if how == "wrong_id":
        return rng.randbytes(len(body))
    raise ValueError(how)


def chunked(body, rng):
    out = bytearray()
    i = 0
    while i < len(body):
        n = rng.randint(1, 70000)
        out += b"%x\r\n%s\r\n" % (len(body[i:i + n]), body[i:i + n])
        i += n
    return bytes(out + b"0\r\n\r\n")


@pytest.mark.slow
def test_thousands_of_corrupted_uploads_store_nothing(start_server, report):
    """F2: 10 000 corrupted uploads (byte flipped, truncated, extended, or the
    content of another id) over 5 types, a tenth of them chunked, interleaved
    with valid uploads, on keep-alive connections: every corrupted one is 400,
    and afterwards every stored object's SHA-256 is its name."""
    srv = start_server("--no-auth")
    srv.create_repo("r")
    per_case = 500
    hows = ("flip", "truncate", "append", "wrong_id")
    jobs = [(kind, how) for kind in TYPES for how in hows for _ in range(per_case)]
    random.Random(11).shuffle(jobs)
    results = {"corrupt_sent": 0, "corrupt_accepted": 0, "valid_sent": 0, "valid_accepted": 0}
    unexpected = []
    lock = threading.Lock()

    def worker(n):
        rng = random.Random(100 + n)
        conn = KeepAlive(srv.host, srv.port)
        mine = {"corrupt_sent": 0, "corrupt_accepted": 0, "valid_sent": 0, "valid_accepted": 0}
        for i, (kind, how) in enumerate(jobs[n::4]):
            size = rng.choice((1, 2, 100, 4096, 30000)) if i % 50 else rng.randint(1, 1 * MiB)
            body = rng.randbytes(size)
            bad = corrupt(body, how, rng)
            headers = ()
            payload = bad
            if i % 10 == 0:
                headers, payload = [("Transfer-Encoding", "chunked")], chunked(bad, rng)
            r = conn.request("POST", target("r", kind, object_id(body)), payload, headers)
            mine["corrupt_sent"] += 1
            mine["corrupt_accepted"] += r.status == 200
            if r.status != 400:
                unexpected.append((kind, how, r.status))
            if i % 10 == 5:
                good = rng.randbytes(rng.randint(1, 5000))
                r = conn.request("POST", target("r", kind, object_id(good)), good)
                mine["valid_sent"] += 1
                mine["valid_accepted"] += r.status == 200
        conn.close()
        with lock:
            for k, v in mine.items():
                results[k] += v

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    elapsed = time.monotonic() - started
    audit = audit_store(srv.data_dir)
    report("corrupted_uploads", types=len(TYPES), **results, stored_objects=len(audit.objects),
           stored_mismatch=len(audit.corrupt), temps=len(audit.temps),
           seconds=f"{elapsed:.1f}")
    assert results["corrupt_sent"] >= 10000
    assert results["corrupt_accepted"] == 0 and unexpected == [], unexpected[:10]
    assert audit.corrupt == [] and audit.temps == [] and audit.strays == []
    assert results["valid_accepted"] == results["valid_sent"]
    assert len(audit.objects) <= results["valid_sent"]


# =============================================================================
# 3. Durability: the order of syscalls before every 200 (strace audit)
# =============================================================================

AUDIT_SYSCALLS = ("trace=openat,write,fsync,fdatasync,link,linkat,rename,renameat,renameat2,"
                  "unlink,unlinkat,mkdir,mkdirat,sendto")


def response_segments(events):
    """Per thread, the syscalls leading to each response: [(events, status)]."""
    by_thread = {}
    segments = []
    for e in events:
        current = by_thread.setdefault(e.tid, [])
        if e.name == "sendto":
            m = re.search(r'"HTTP/1\.1 (\d{3}) ', e.args)
            if m:
                segments.append((current, int(m.group(1))))
                by_thread[e.tid] = []
                continue
        current.append(e)
    return segments


def is_pack_path(path):
    """data/<xx>/<id>: where the local backend keeps packs."""
    return os.path.basename(os.path.dirname(os.path.dirname(path))) == "data"


def durability_violations(segment):
    """What a 200 answer must follow: a list of (rule, detail) violations.

    * publish: each link(temp, final) comes after every write to temp and an
      fsync(temp), and is followed by fsync(folder of final);
    * mkdir: each new folder is followed by an fsync of its parent (else the
      folder, and all that was published in it, can vanish on power loss);
    * delete: each unlink of an object other than a pack (and not a temp) is
      followed by fsync(folder); a pack comes back after a crash only as an
      orphan restic ignores (see test_pack_delete_does_not_wait_for_fsync)."""
    problems = []

    def fsynced(path, after):
        return any(e.name in ("fsync", "fdatasync") and e.ret == 0 and e.fd_path() == path
                   and e.index > after for e in segment)

    for e in segment:
        if e.name in ("link", "linkat", "rename", "renameat", "renameat2") and e.ret == 0:
            paths = e.strings()
            temp, final = paths[0], paths[-1]
            writes = [w.index for w in segment if w.name == "write" and w.fd_path() == temp]
            syncs = [s.index for s in segment if s.name in ("fsync", "fdatasync")
                     and s.fd_path() == temp and s.ret == 0 and s.index < e.index]
            if not syncs:
                problems.append(("publish", f"{e.name} of {final} without fsync of the temp"))
            elif writes and max(writes) > max(syncs):
                problems.append(("publish", f"write to {temp} after its fsync"))
            if not fsynced(os.path.dirname(final), e.index):
                problems.append(("publish", f"no fsync of the folder after publishing {final}"))
        elif e.name in ("mkdir", "mkdirat") and e.ret == 0:
            path = e.strings()[-1]
            if not fsynced(os.path.dirname(path), e.index):
                problems.append(("mkdir", f"mkdir {path} without fsync of its parent"))
        elif e.name in ("unlink", "unlinkat") and e.ret == 0:
            path = e.strings()[-1]
            if not os.path.basename(path).startswith(".upload-") and \
                    not is_pack_path(path) and not fsynced(os.path.dirname(path), e.index):
                problems.append(("delete", f"unlink {path} without fsync of its folder"))
    return problems


def audit_workload(srv, rng):
    """Uploads of every type and size, configs, deletes, reads and repo
    creation (including a nested repo whose parent is new, and an upload
    whose data/xx folder was removed) on three keep-alive connections.
    Returns the number of 200s the clients got for writes."""
    for repo in ("a", "a/b", "c/d"):
        assert srv.request("POST", f"/{repo}/?create=true").status == 200
    writes_acked = [3]
    lock = threading.Lock()

    def client(n):
        conn = KeepAlive(srv.host, srv.port)
        repo = ("a", "a/b", "c/d")[n]
        mine = []
        config = os.urandom(rng.randint(1, 5000))
        assert conn.request("POST", f"/{repo}/config", config).status == 200
        ok = 1
        for i in range(25):
            kind = rng.choice(TYPES)
            body = os.urandom(rng.choice((0, 100, 70000, 1500000)))
            r = conn.request("POST", target(repo, kind, object_id(body)), body)
            assert r.status in (200, 403), r
            if r.status == 200:
                ok += 1
                mine.append((kind, object_id(body)))
            if i % 5 == 4:
                kind, name = mine.pop(0)
                assert conn.request("DELETE", target(repo, kind, name)).status == 200
                ok += 1
            if i % 7 == 0 and mine:
                assert conn.request("GET", target(repo, *mine[-1])).status == 200
        conn.close()
        with lock:
            writes_acked[0] += ok

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    body = b"an object whose data/xx folder went missing"
    oid = object_id(body)
    shutil.rmtree(srv.data_dir / "a" / "data" / oid[:2])
    assert srv.request("POST", target("a", "data", oid), body=body).status == 200
    return writes_acked[0] + 1


@pytest.mark.slow
def test_every_200_for_a_write_follows_fsync_publish_fsync_dir(start_server, report, has_strace,
                                                              tmp_path):
    """F3/T75: an strace audit of ~100 writes on three connections: before the
    status line of every 200 for an upload the server did fsync(temp), link,
    fsync(folder); after every mkdir an fsync of the parent; after every
    delete of an index, snapshot, key or lock an fsync of the folder."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth")
    trace = tmp_path / "audit.trace"
    with Strace(srv.pid, trace, "-e", AUDIT_SYSCALLS):
        acked = audit_workload(srv, random.Random(3))
    segments = response_segments(parse_strace(trace))
    write_200s = [seg for seg, status in segments if status == 200 and any(
        e.name in ("link", "linkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat")
        or (e.name in ("unlink", "unlinkat") and ".upload-" not in e.args) for e in seg)]
    counts = {"publish": [0, 0], "mkdir": [0, 0], "delete": [0, 0]}  # [200s, violating]
    details = []
    for seg in write_200s:
        rules = {
            "publish": any(e.name in ("link", "linkat") for e in seg),
            "mkdir": any(e.name in ("mkdir", "mkdirat") for e in seg),
            "delete": any(e.name in ("unlink", "unlinkat") and ".upload-" not in e.args
                          and not is_pack_path(e.strings()[-1]) for e in seg),
        }
        found = durability_violations(seg)
        details += found
        for rule, applies in rules.items():
            if applies:
                counts[rule][0] += 1
                counts[rule][1] += any(r == rule for r, _ in found)
    report("durability_audit", write_200s=len(write_200s), acked_by_clients=acked,
           upload_200s=counts["publish"][0],
           upload_200s_after_fsync_link_fsyncdir=counts["publish"][0] - counts["publish"][1],
           delete_200s=counts["delete"][0],
           delete_200s_after_unlink_fsyncdir=counts["delete"][0] - counts["delete"][1],
           mkdir_200s=counts["mkdir"][0],
           mkdir_200s_after_parent_fsync=counts["mkdir"][0] - counts["mkdir"][1])
    assert len(write_200s) == acked, "every acknowledged write must appear in the trace"
    assert counts["publish"][1] == 0 and counts["delete"][1] == 0, details
    assert counts["mkdir"][1] == 0, details


def seed_one_of_each_type(srv, repo):
    """Create the repo and store one small object of each type: {kind: name}."""
    srv.create_repo(repo)
    names = {}
    for kind in TYPES:
        body = f"seed {kind}".encode()
        assert srv.upload(repo, kind, body).status == 200
        names[kind] = object_id(body)
    return names


def test_pack_delete_does_not_wait_for_fsync_other_deletes_do(start_server, report,
                                                               has_strace, tmp_path):
    """A DELETE of an index, snapshot, key or lock answers 200 only after the
    folder is fsynced: restic's prune deletes the old index before the packs it
    names, and that order must survive a crash.  A pack delete answers without
    one (rest-server fsyncs no delete): a pack comes back after a crash only
    once no index names it, an orphan `restic check` calls non-critical."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth")
    names = seed_one_of_each_type(srv, "r")
    trace = tmp_path / "delete.trace"
    with Strace(srv.pid, trace, "-e", AUDIT_SYSCALLS):
        statuses = {kind: srv.request("DELETE", target("r", kind, names[kind])).status
                    for kind in TYPES}
    synced = {}
    for segment, status in response_segments(parse_strace(trace)):
        unlinked = [e.strings()[-1] for e in segment
                    if e.name in ("unlink", "unlinkat") and e.ret == 0]
        if status == 200 and len(unlinked) == 1:
            folder = os.path.dirname(unlinked[0])
            kind = "data" if is_pack_path(unlinked[0]) else os.path.basename(folder)
            synced[kind] = any(e.name in ("fsync", "fdatasync") and e.ret == 0
                               and e.fd_path() == folder for e in segment)
    report("delete_fsync_by_type", **{kind: synced.get(kind) for kind in TYPES})
    assert statuses == {kind: 200 for kind in TYPES}
    assert synced == {kind: kind != "data" for kind in TYPES}
    for kind in TYPES:
        assert not obj_path(srv.data_dir, "r", kind, names[kind]).exists()


@pytest.mark.parametrize("when", ["1+", "1", "2"],
                         ids=["every-fsync", "temp-file-fsync", "folder-fsync"])
def test_fsync_error_never_yields_200(start_server, report, has_strace, tmp_path, when):
    """F3/T77: fsync failing with EIO (strace inject) fails the upload or delete
    with 500 -- never 200, never a retry of fsync that then "succeeds" -- leaves
    no temp file, and whatever is stored is complete."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth")
    seeded = seed_one_of_each_type(srv, "r")
    statuses = []
    stored = []
    with Strace(srv.pid, tmp_path / "eio.trace", "-e", "trace=fsync,fdatasync",
                "-e", f"inject=fsync,fdatasync:error=EIO:when={when}"):
        for kind in KINDS:
            body = os.urandom(300000)
            name = "config" if kind == "config" else object_id(body)
            status = post_raw(srv, target("r", kind, name), body)
            statuses.append(status)
            path = obj_path(srv.data_dir, "r", kind, name)
            if path.exists():
                assert path.read_bytes() == body
                stored.append(kind)
        if when != "2":  # a delete does one fsync (of the folder); a pack's none
            for kind in TYPES:
                if kind != "data":
                    r = srv.request("DELETE", target("r", kind, seeded[kind]))
                    statuses.append(r.status)
    injected = sum(e.injected for e in parse_strace(tmp_path / "eio.trace"))
    report(f"fsync_eio_when_{when}", writes=len(statuses), injected=injected,
           answered_200=statuses.count(200), answered_500=statuses.count(500),
           complete_objects_kept=len(stored), temps=len(temp_files(srv.data_dir)))
    assert injected >= len(statuses)
    assert statuses.count(200) == 0, statuses
    assert set(statuses) == {500}, statuses
    assert temp_files(srv.data_dir) == []
    if when != "2":  # the fsync of the temp file failed: nothing may be published
        assert stored == []
    assert srv.request("GET", "/health").status == 200


def writeback_ranges(events, path_part):
    """(offset, length, event index) of each POSIX_FADV_DONTNEED on a temp
    file whose path contains path_part, and the index of its first fsync."""
    ranges, fsync_at = [], None
    for e in events:
        fd_path = e.fd_path() or ""
        if ".upload-" not in fd_path or path_part not in fd_path:
            continue
        if e.name.startswith("fadvise64") and "POSIX_FADV_DONTNEED" in e.args:
            offset, length = (int(x) for x in re.findall(r", (\d+)", e.args)[:2])
            ranges.append((offset, length, e.index))
        elif e.name in ("fsync", "fdatasync") and fsync_at is None:
            fsync_at = e.index
    return ranges, fsync_at


def test_large_uploads_start_writeback_before_their_fsync(start_server, report, has_strace,
                                                          tmp_path):
    """An upload of a pack asks the kernel to write its data to disk every
    2 MiB (POSIX_FADV_DONTNEED), so the fsync before the 200 waits only for
    the tail: the advice covers the file from its start, in order, without a
    gap, before the fsync.  A small object gets none.  The advice may be
    refused (here every call fails with EIO): the upload is the same 200, the
    object complete, its fsync done."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth")
    srv.create_repo("r")
    big, small = os.urandom(9 * MiB + 4321), os.urandom(4096)
    trace = tmp_path / "writeback.trace"
    with Strace(srv.pid, trace, "-e", "trace=/^fadvise64,fsync"):
        statuses = [post_raw(srv, target("r", "data", object_id(body)), body)
                    for body in (big, small)]
    events = parse_strace(trace)
    ranges, fsync_at = writeback_ranges(events, f"/data/{object_id(big)[:2]}/")
    small_ranges, _ = writeback_ranges(events, f"/data/{object_id(small)[:2]}/")
    refused = tmp_path / "refused.trace"
    again = os.urandom(9 * MiB)
    with Strace(srv.pid, refused, "-e", "trace=/^fadvise64,fsync",
                "-e", "inject=/^fadvise64:error=EIO"):
        status_refused = post_raw(srv, target("r", "data", object_id(again)), again)
    refused_events = parse_strace(refused)
    injected = sum(e.injected for e in refused_events)
    report("upload_writeback", advice_calls=len(ranges), fsync_index=fsync_at,
           advised_mib=round(sum(r[1] for r in ranges) / MiB, 2), small_advice=len(small_ranges),
           refused_injected=injected, refused_status=status_refused)
    assert statuses == [200, 200] and status_refused == 200
    assert len(ranges) == 4, ranges  # 9 MiB: at 2, 4, 6 and 8 MiB
    assert [r[0] for r in ranges] == [0] + [r[0] + r[1] for r in ranges[:-1]], ranges
    assert all(r[1] >= 2 * MiB for r in ranges), ranges
    assert fsync_at is not None and all(r[2] < fsync_at for r in ranges)
    assert small_ranges == []
    assert injected == 4
    assert any(e.name == "fsync" and e.ret == 0 and ".upload-" in (e.fd_path() or "")
               for e in refused_events)
    for body in (big, small, again):
        assert obj_path(srv.data_dir, "r", "data", object_id(body)).read_bytes() == body


# =============================================================================
# 4. Storage faults: full disk, injected ENOSPC, read-only filesystem, EIO
# =============================================================================


def post_head(path, length):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n").encode()


@pytest.mark.slow
def test_full_disk_is_507_space_returns_and_the_next_upload_works(start_server, tmp_path,
                                                                   report, can_mount):
    """F9/T78: --path on a 20 MiB tmpfs.  Uploads that cannot fit (data packs,
    a config, a chunked upload, uploads racing for the last space) are all
    answered 507, leave no temp file, give the space back, and the next upload
    that fits is stored."""
    need(can_mount, "mounting a tmpfs (root)")
    mount = tmp_path / "small"
    mount.mkdir()
    with tmpfs(mount, "20m"):
        srv = start_server("--no-auth", data_dir=mount / "data")
        try:
            srv.create_repo("r")
            filler = os.urandom(12 * MiB)
            assert srv.upload("r", "data", filler).status == 200
            free_before = free_bytes(mount)
            statuses = []
            rng = random.Random(5)
            too_big = []
            for i in range(12):
                kind = ("data", "index", "snapshots", "config")[i % 4]
                body = os.urandom(free_before + rng.randint(1, 4 * MiB))
                name = "config" if kind == "config" else object_id(body)
                too_big.append((kind, name))
                status, _ = upload_watching(srv.host, srv.port,
                                            post_head(target("r", kind, name), len(body)), body)
                statuses.append(status)
            # chunked: no length to check up front
            body = os.urandom(free_before + MiB)
            head = (f"POST {target('r', 'data', object_id(body))} HTTP/1.1\r\nHost: x\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n").encode()
            status, _ = upload_watching(srv.host, srv.port, head, chunked(body, rng))
            statuses.append(status)
            # two uploads that each fit alone but not together
            halves = [os.urandom(free_before * 2 // 3) for _ in range(2)]
            with ThreadPoolExecutor(2) as pool:
                raced = list(pool.map(lambda b: upload_watching(
                    srv.host, srv.port, post_head(target("r", "data", object_id(b)), len(b)),
                    b)[0], halves))
            # each fits alone: one may win; the other no longer fits and must be 507
            assert sorted(raced) in ([200, 507], [507, 507]), raced
            statuses.append(507 if 507 in raced else raced)
            for b, st in zip(halves, raced):
                if st == 200:
                    assert srv.request("DELETE", target("r", "data", object_id(b))).status == 200
            free_after = free_bytes(mount)
            temps = temp_files(mount)
            fits = os.urandom(free_after // 2)
            next_ok = srv.upload("r", "keys", fits).status
            stored_ok = obj_path(srv.data_dir, "r", "keys", object_id(fits)).read_bytes() == fits
            leftovers = [kn for kn in too_big if obj_path(srv.data_dir, "r", *kn).exists()]
            block = os.statvfs(mount).f_frsize
            report("full_disk", uploads_too_big=len(statuses),
                   answered_507=statuses.count(507),
                   percent_507=f"{100 * statuses.count(507) // len(statuses)}",
                   free_before=free_before, free_after=free_after, temps=len(temps),
                   next_upload=next_ok)
            assert statuses.count(507) == len(statuses), statuses
            assert temps == [] and leftovers == []
            assert abs(free_after - free_before) <= block
            assert next_ok == 200 and stored_ok
            assert audit_store(srv.data_dir).clean
        finally:
            srv.stop()


def test_enospc_injected_on_write_is_507(start_server, tmp_path, report, has_strace):
    """T79: ENOSPC from the 2nd write(2) of an upload (strace inject) -> 507,
    no temp file, nothing published, and the server keeps serving."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth")
    srv.create_repo("r")
    statuses = []
    with Strace(srv.pid, tmp_path / "enospc.trace", "-e", "trace=write",
                "-e", "inject=write:error=ENOSPC:when=2"):
        for kind in KINDS:
            body = os.urandom(3 * MiB)
            name = "config" if kind == "config" else object_id(body)
            statuses.append(upload_watching(srv.host, srv.port,
                                            post_head(target("r", kind, name), len(body)),
                                            body)[0])
            assert not obj_path(srv.data_dir, "r", kind, name).exists()
    report("enospc_injected", uploads=len(statuses), answered_507=statuses.count(507),
           temps=len(temp_files(srv.data_dir)))
    assert statuses == [507] * len(statuses)
    assert temp_files(srv.data_dir) == []
    assert srv.upload("r", "keys", b"after the disk filled up").status == 200


def test_read_only_filesystem_is_500_never_404(start_server, data_dir, report, can_mount):
    """T80: the data directory remounted read-only (EROFS): writes and deletes
    are 500 (restic would take a 404 for "does not exist"), reads still work."""
    need(can_mount, "bind mounts (root)")
    srv = start_server("--no-auth", data_dir=data_dir)
    srv.create_repo("r")
    stored = {}
    for kind in KINDS:
        body = f"before ro {kind}".encode()
        name = "config" if kind == "config" else object_id(body)
        assert srv.request("POST", target("r", kind, name), body=body).status == 200
        stored[kind] = (name, body)
    srv.create_repo("noconfig")
    results = {}
    with read_only_bind(data_dir):
        for kind in KINDS:
            body = f"while ro {kind}".encode()
            if kind == "config":
                results[("POST", "config")] = srv.request(
                    "POST", "/noconfig/config", body=body).status
                continue
            results[("POST", kind)] = srv.upload("r", kind, body).status
            results[("DELETE", kind)] = srv.request(
                "DELETE", target("r", kind, stored[kind][0])).status
        results[("POST", "new-repo")] = srv.request("POST", "/fresh/?create=true").status
        reads = [srv.request("GET", target("r", kind, stored[kind][0])) for kind in KINDS]
    report("read_only_fs", writes=len(results),
           answered_500=sum(s == 500 for s in results.values()),
           answered_404=sum(s == 404 for s in results.values()),
           reads_ok=sum(r.status == 200 and r.body == stored[k][1] for r, k in zip(reads, KINDS)))
    assert all(s == 500 for s in results.values()), results
    assert all(r.status == 200 for r in reads)
    assert srv.upload("r", "keys", b"writable again").status == 200


def test_eio_reading_is_500_never_404(start_server, data_dir, tmp_path, report, has_strace):
    """T81/T35: EIO opening, stating or listing stored objects (strace inject
    on that path) is 500, never 404 -- also for the existence check before an
    upload, which must fail closed rather than take "unreadable" for "absent".
    EIO while the body is being sent (the status line is already out) cuts
    the response short, so the client sees an error, never a complete 200."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth", data_dir=data_dir)
    srv.create_repo("r")
    body = os.urandom(256 * 1024)
    oid = object_id(body)
    assert srv.upload("r", "snapshots", body).status == 200
    path = obj_path(data_dir, "r", "snapshots", oid)
    cases = {}
    traces = [tmp_path / f"eio-{n}.trace" for n in ("open", "list", "read")]
    with Strace(srv.pid, traces[0], "-P", str(path),
                "-e", "trace=openat,newfstatat,statx,stat,lstat",
                "-e", "inject=openat,newfstatat,statx,stat,lstat:error=EIO"):
        cases["GET (open)"] = srv.request("GET", target("r", "snapshots", oid)).status
        cases["HEAD (stat)"] = srv.request("HEAD", target("r", "snapshots", oid)).status
        cases["POST existing (stat)"] = srv.upload("r", "snapshots", body).status
    with Strace(srv.pid, traces[1], "-P", str(path.parent),
                "-e", "trace=getdents64,openat", "-e", "inject=getdents64:error=EIO"):
        cases["LIST (getdents)"] = srv.request("GET", "/r/snapshots/").status
    with Strace(srv.pid, traces[2], "-P", str(path),
                "-e", "trace=sendfile,read,pread64,readv,preadv",
                "-e", "inject=sendfile,read,pread64,readv,preadv:error=EIO"):
        with socket.create_connection((srv.host, srv.port), timeout=10) as s:
            s.sendall(request_bytes("GET", target("r", "snapshots", oid)))
            try:
                resp = read_response(s.makefile("rb"))
                cases["GET (read)"] = resp.status if resp.complete else "cut short"
            except (ServerClosed, OSError):
                cases["GET (read)"] = "closed"
    injected = [sum(e.injected for e in parse_strace(t)) for t in traces]
    report("eio", cases=len(cases), answered_500=sum(v == 500 for v in cases.values()),
           answered_404=sum(v == 404 for v in cases.values()),
           read_error_mid_body=cases["GET (read)"].replace(" ", "_")
           if isinstance(cases["GET (read)"], str) else cases["GET (read)"])
    assert all(injected), injected
    assert all(v == 500 for k, v in cases.items() if k != "GET (read)"), cases
    assert cases["GET (read)"] in (500, "cut short", "closed"), cases
    assert srv.request("GET", target("r", "snapshots", oid)).body == body


# =============================================================================
# 5. Aborted and stalled uploads: no temp file, fd or thread left behind
# =============================================================================


def settle(srv, baseline_threads, timeout=10):
    return wait_for(lambda: not temp_files(srv.data_dir)
                    and server_threads(srv) <= baseline_threads, timeout)


def abort_upload(srv, rng):
    """Start an upload and walk away mid-body: FIN or RST, at a random byte."""
    size = rng.choice((1, 1000, 100000, 2 * MiB))
    kind = rng.choice(KINDS)
    name = "config" if kind == "config" else object_id(rng.randbytes(8))
    body = rng.randbytes(size)
    cut = rng.randrange(size)
    if rng.random() < 0.1:
        head = (f"POST {target('r', kind, name)} HTTP/1.1\r\nHost: x\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        payload = chunked(body, rng)
        cut = rng.randrange(len(payload) - 5)  # never the final 0-chunk
    else:
        head = post_head(target("r", kind, name), size)
        payload = body
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    try:
        s.sendall(head + payload[:cut])
        time.sleep(rng.choice((0, 0, 0.001, 0.01)))
    finally:
        if rng.random() < 0.5:
            rst_close(s)
        else:
            s.close()


@pytest.mark.slow
def test_aborted_uploads_leave_no_temp_file_fd_or_thread(start_server, report):
    """F8/T71: 1000 uploads abandoned at a random byte (FIN or RST; a tenth
    chunked; every type and the config): afterwards no temp file, the same
    number of open fds and threads as before, and the store is clean."""
    srv = start_server("--no-auth", "--body-timeout", "2")
    srv.create_repo("r")
    for i in range(3):  # warm up lazily created state before the baseline
        assert srv.upload("r", "keys", f"warm {i}".encode()).status == 200
        abort_upload(srv, random.Random(i))
    assert settle(srv, 10**6)
    time.sleep(0.5)
    fds0, threads0 = fd_count(srv.pid), server_threads(srv)
    started = time.monotonic()
    rngs = [random.Random(1000 + i) for i in range(1000)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda rng: abort_upload(srv, rng), rngs))
    settled = settle(srv, threads0)
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    fds1, threads1 = fd_count(srv.pid), server_threads(srv)
    temps = temp_files(srv.data_dir)
    audit = audit_store(srv.data_dir)
    report("aborted_uploads", aborted=len(rngs), temps_left=len(temps), fds_before=fds0,
           fds_after=fds1, leaked_fds=fds1 - fds0, threads_before=threads0,
           threads_after=threads1, seconds_to_settle=f"{elapsed:.1f}")
    assert settled and temps == []
    assert fds1 == fds0 and threads1 == threads0
    assert audit.clean and len(audit.objects) == 3
    assert srv.upload("r", "keys", b"still serving").status == 200


def test_stalled_uploads_are_cut_by_the_body_timeout(start_server, report):
    """F8/T57: 30 uploads that stop sending half-way hold a temp file each until
    --body-timeout (3 s) cuts them: then no temp file, fd or thread is left,
    and no stalled client got a 2xx."""
    srv = start_server("--no-auth", "--body-timeout", "3")
    srv.create_repo("r")
    assert srv.upload("r", "keys", b"warm").status == 200
    time.sleep(0.3)
    fds0, threads0 = fd_count(srv.pid), server_threads(srv)
    plan = []
    for i in range(30):
        kind = KINDS[i % len(KINDS)]
        body = os.urandom(200000)
        repo = f"r{i}" if kind == "config" else "r"
        if kind == "config":
            srv.create_repo(repo)
        plan.append((target(repo, kind, None if kind == "config" else object_id(body)), body))
    socks = []
    for path, body in plan:
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        s.sendall(post_head(path, len(body)) + body[:100000])
        socks.append(s)
    stalled_at = time.monotonic()
    during = wait_for(lambda: len(temp_files(srv.data_dir)) == len(socks), 2.0)
    held = len(temp_files(srv.data_dir))
    assert settle(srv, threads0, timeout=15)
    cut_after = time.monotonic() - stalled_at
    answers = []
    for s in socks:
        try:
            data = s.recv(200)
            answers.append(int(data.split()[1]) if data else "closed")
        except OSError:
            answers.append("reset")
        s.close()
    time.sleep(0.3)
    fds1, threads1 = fd_count(srv.pid), server_threads(srv)
    report("stalled_uploads", stalled=len(socks), temps_while_stalled=held,
           temps_after_timeout=len(temp_files(srv.data_dir)),
           seconds_until_cut=f"{cut_after:.1f}", leaked_fds=fds1 - fds0,
           threads_before=threads0, threads_after=threads1,
           answers=",".join(sorted({str(a) for a in answers})))
    assert during, "the stalled uploads should have been in progress"
    assert temp_files(srv.data_dir) == []
    assert fds1 == fds0 and threads1 == threads0
    assert not any(isinstance(a, int) and 200 <= a < 300 for a in answers), answers



@pytest.mark.parametrize("size, pipelined", [(16 << 20, 1), (60 << 10, 300)],
                         ids=["16 MiB pack (sendfile)", "300 pipelined 60 KiB answers"])
def test_downloads_to_clients_that_stop_reading_are_cut_by_the_body_timeout(
        start_server, report, size, pipelined):
    """F8: 10 clients ask for a 16 MiB pack, or pipeline 300 requests for a
    60 KiB object (each answer one write with its head), and never read.  The
    send waits on a full socket buffer; --body-timeout (3 s) of no progress
    cuts it: no thread or fd is left, nobody got everything, and the server
    serves on."""
    srv = start_server("--no-auth", "--body-timeout", "3")
    srv.create_repo("r")
    pack = os.urandom(size)
    name = object_id(pack)
    assert srv.upload("r", "data", pack).status == 200
    time.sleep(0.3)
    fds0, threads0 = fd_count(srv.pid), server_threads(srv)
    socks = []
    for _ in range(10):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((srv.host, srv.port))
        s.sendall(f"GET /r/data/{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * pipelined)
        socks.append(s)
    stalled_at = time.monotonic()
    assert settle(srv, threads0, timeout=10)
    cut_after = time.monotonic() - stalled_at
    received = []
    for s in socks:
        s.settimeout(10)
        got = 0
        try:
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        except OSError:
            pass
        received.append(got)
        s.close()
    time.sleep(0.3)
    fds1, threads1 = fd_count(srv.pid), server_threads(srv)
    report("stalled_downloads", size=size, pipelined=pipelined, stalled=len(socks),
           seconds_until_cut=f"{cut_after:.1f}", most_bytes_received=max(received),
           leaked_fds=fds1 - fds0, threads_before=threads0, threads_after=threads1)
    assert cut_after >= 2.5, "cut before the body timeout"
    assert max(received) < len(pack) * pipelined, "a stalled client should not get it all"
    assert fds1 == fds0 and threads1 == threads0
    again = srv.request("GET", f"/r/data/{name}")
    assert again.status == 200 and again.body == pack


# =============================================================================
# 6. Access control: append-only and private repositories, spellings x methods x races
# =============================================================================


def sha_user(user, password):
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    return f"{user}:{{SHA}}{digest}\n"


def file_states(paths):
    out = {}
    for p in paths:
        try:
            st = os.stat(p)
            out[str(p)] = (st.st_ino, st.st_mtime_ns, st.st_size,
                           hashlib.sha256(Path(p).read_bytes()).hexdigest())
        except FileNotFoundError:
            out[str(p)] = None
    return out


def pct(text, which=None):
    """Percent-encode the characters of `text` at the positions in `which`
    (all when None), with upper-case hex digits."""
    return "".join(f"%{ord(c):02X}" if which is None or i in which else c
                   for i, c in enumerate(text))


def spellings_of_object(repo, kind, oid):
    """Alternative spellings of /repo/kind/oid: encodings, dot segments, empty
    segments, suffixes, and traversal out of the deletable locks folder."""
    k = kind
    return [
        f"/{repo}/{k}/{oid}", f"/{repo}/{k}/{pct(oid)}", f"/{repo}/{k}/{pct(oid, {0})}",
        f"/{repo}/{k}/{pct(oid).lower()}", f"/{repo}/{pct(k)}/{oid}",
        f"/{pct(repo)}/{k}/{oid}", f"/{repo}/{k}/{oid.upper()}",
        f"/{repo}/{k.upper()}/{oid}", f"/{repo}//{k}/{oid}", f"//{repo}/{k}/{oid}",
        f"/{repo}/./{k}/{oid}", f"/{repo}/{k}/./{oid}", f"/{repo}/x/../{k}/{oid}",
        f"/{repo}/{k}/{oid}/", f"/{repo}/{k}/{oid}%2F", f"/{repo}/{k}/{oid};x",
        f"/{repo}/{k}/{oid}?x=1", f"/{repo}/{k}/{oid}#x", f"/{repo}/{k}/{oid}%00",
        f"/{repo}/{k}/{oid}%20", f"/{repo}%2F{k}/{oid}", f"/{repo}/{k}%2F{oid}",
        f"/{repo}/locks/../{k}/{oid}", f"/{repo}/locks/%2e%2e/{k}/{oid}",
        f"/{repo}/locks/..%2F{k}%2F{oid}", f"/{repo}/locks/%2E%2E%2F{k}%2F{oid}",
        f"/{repo}/locks/..%5C{k}%5C{oid}", f"/{repo}/{k}/%252e%252e/{oid}",
        f"/{repo}/{k}/{oid[:-1]}", f"/{repo}/{k}/{oid}0",
        f"http://x/{repo}/{k}/{oid}", f"/{repo}/{k}/\uff10{oid[1:]}".encode("utf-8").decode(
            "latin-1"),
    ]


def spellings_of_config(repo):
    return [f"/{repo}/config", f"/{repo}/{pct('config')}", f"/{repo}/{pct('config', {0})}",
            f"/{pct(repo)}/config", f"/{repo}/config/", f"/{repo}//config", f"/{repo}/./config",
            f"/{repo}/x/../config", f"/{repo}/locks/../config", f"/{repo}/locks/%2e%2e/config",
            f"/{repo}/locks/..%2Fconfig", f"/{repo}/CONFIG", f"/{repo}/config%00",
            f"/{repo}/config;x", f"/{repo}/config?x", f"//{repo}/config", f"/{repo}%2Fconfig"]


def write_requests(path, body, other):
    """(method, extra headers, body, version) for every way to try to
    delete or overwrite what `path` names."""
    reqs = []
    for version in ("HTTP/1.1", "HTTP/1.0"):
        reqs += [("DELETE", (), b"", version), ("POST", (), other, version),
                 ("POST", (), b"", version), ("POST", (), body, version)]
    reqs += [("PUT", (), other, "HTTP/1.1"), ("PATCH", (), other, "HTTP/1.1"),
             ("MOVE", (("Destination", "/x"),), b"", "HTTP/1.1"),
             ("delete", (), b"", "HTTP/1.1"),
             ("POST", (("X-HTTP-Method-Override", "DELETE"),), b"", "HTTP/1.1"),
             ("GET", (("X-HTTP-Method-Override", "DELETE"), ("X-Method-Override", "DELETE"),
                      ("X-HTTP-Method", "DELETE")), b"", "HTTP/1.1"),
             ("POST", (("Transfer-Encoding", "chunked"),),
              b"%x\r\n%s\r\n0\r\n\r\n" % (len(other), other) if other else b"0\r\n\r\n",
              "HTTP/1.1")]
    return reqs


def status_of(conn, method, path, body=b"", headers=(), version="HTTP/1.1"):
    """The status of one request on a kept connection, or "closed"."""
    if version == "HTTP/1.0":
        headers = list(headers) + [("Connection", "keep-alive")]
    try:
        return conn.request(method, path, body, headers, version).status
    except (OSError, ServerClosed):
        return "closed"


@pytest.fixture
def ao_users(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(sha_user("alice", "pw-alice") + sha_user("admin", "pw-admin")
                    + sha_user("bob", "pw-bob"))
    return path


@pytest.mark.slow
def test_append_only_bypass_matrix(start_server, report, ao_users):
    """F6/T31-T33: alice, on an --append-only server (admin exempt), tries to
    delete or overwrite each stored object and the config through ~30
    spellings x 15 methods/versions/overrides: 0 changes to any stored file,
    0 deletes answered 2xx."""
    srv = start_server("--htpasswd-file", str(ao_users), "--append-only",
                       "--append-only-exempt", "admin")
    alice = basic_auth("alice", "pw-alice")
    srv.create_repo("r", auth=("alice", "pw-alice"))
    seeded = {}
    for kind in KINDS:
        body = f"append-only seed {kind} ".encode() * 30
        name = "config" if kind == "config" else object_id(body)
        assert srv.request("POST", target("r", kind, name), body=body,
                           auth=("alice", "pw-alice")).status == 200
        seeded[kind] = (name, body)
    protected = [obj_path(srv.data_dir, "r", k, seeded[k][0]) for k in KINDS if k != "locks"]
    before = file_states(protected)
    tree_before = tree_state(srv.data_dir)
    conn = KeepAlive(srv.host, srv.port, timeout=10, auth=alice)
    attempts = deletes_2xx = 0
    statuses = {}
    for kind in KINDS:
        if kind == "locks":
            continue
        name, body = seeded[kind]
        paths = spellings_of_config("r") if kind == "config" else \
            spellings_of_object("r", kind, name)
        for path in paths:
            for method, headers, payload, version in write_requests(path, body, body + b"!"):
                status = status_of(conn, method, path, payload, headers, version)
                attempts += 1
                statuses[status] = statuses.get(status, 0) + 1
                if method.upper() == "DELETE" and isinstance(status, int) and status < 300:
                    deletes_2xx += 1
    # the same through the authentication door: credentials that are not admin's
    for auth in (basic_auth("admin", "wrong"), basic_auth("Admin", "pw-admin"),
                 basic_auth("admin ", "pw-admin"), "Basic " + base64.b64encode(
                     b"admin:pw-admin\x00").decode(), basic_auth("alice", "pw-alice")):
        for kind in ("keys", "config"):
            path = target("r", kind, seeded[kind][0])
            other = KeepAlive(srv.host, srv.port, timeout=10, auth=auth)
            status = status_of(other, "DELETE", path, b"", (("X-Forwarded-User", "admin"),
                                                             ("Remote-User", "admin")))
            other.close()
            attempts += 1
            deletes_2xx += isinstance(status, int) and status < 300
    conn.close()
    after = file_states(protected)
    changed = [p for p in protected if before[str(p)] != after[str(p)]]
    tree_after = tree_state(srv.data_dir)
    vanished = sorted(set(tree_before) - set(tree_after))
    report("append_only_matrix", attempts=attempts, bypasses=len(changed) + len(vanished),
           deletes_answered_2xx=deletes_2xx,
           statuses=",".join(f"{k}:{v}" for k, v in sorted(statuses.items(), key=str)))
    assert changed == [] and vanished == [], (changed, vanished)
    assert deletes_2xx == 0
    assert temp_files(srv.data_dir) == []
    # the exempt admin really can delete: the matrix above was not vacuous
    assert srv.request("DELETE", target("r", "keys", seeded["keys"][0]),
                       auth=("admin", "pw-admin")).status == 200


def post_status(srv, method, path, body=b""):
    """A request on its own connection that still reads an early answer."""
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        try:
            s.sendall(request_bytes(method, path, body, [("Connection", "close")]))
        except OSError:
            pass
        try:
            return read_response(s.makefile("rb"), method).status
        except (OSError, ServerClosed):
            return "closed"


@pytest.mark.slow
def test_append_only_races(start_server, report):
    """F6/T34: races in --append-only mode, 100 rounds each:
    * 10 clients create one config with different bytes: exactly 1 wins (200),
      9 get 403, the file holds the winner's bytes;
    * with --no-verify-upload, 10 clients create one snapshot name with
      different bytes: exactly 1 wins;
    * 5 DELETEs race 5 POSTs (same bytes) of an existing object: every DELETE
      403, the file is never replaced or removed;
    * a DELETE of locks/<id> races uploads of keys/<id>, the same id: the key
      is never touched."""
    srv = start_server("--no-auth", "--append-only")
    nv = start_server("--no-auth", "--append-only", "--no-verify-upload",
                      data_dir=srv.data_dir.parent / "data-noverify")
    nv.create_repo("r")
    srv.create_repo("r")
    rounds = 100
    figures = dict(config_rounds=0, config_one_winner=0, noverify_rounds=0,
                   noverify_one_winner=0, delete_post_rounds=0, deletes_2xx=0, replaced=0,
                   lock_key_rounds=0, keys_touched=0)
    for i in range(rounds):
        repo = f"c{i}"
        srv.create_repo(repo)
        bodies = [f"config {i}/{n} ".encode() * 500 for n in range(10)]
        results = race(10, lambda n: post_status(srv, "POST", f"/{repo}/config", bodies[n]))
        figures["config_rounds"] += 1
        if sorted(results) == [200] + [403] * 9:
            figures["config_one_winner"] += 1
            assert (srv.data_dir / repo / "config").read_bytes() == bodies[results.index(200)]

        name = object_id(f"unverified {i}".encode())
        bodies = [f"snapshot {i}/{n} ".encode() * 500 for n in range(10)]
        results = race(10, lambda n: post_status(nv, "POST", f"/r/snapshots/{name}", bodies[n]))
        figures["noverify_rounds"] += 1
        if sorted(results) == [200] + [403] * 9:
            figures["noverify_one_winner"] += 1
            assert (nv.data_dir / "r" / "snapshots" / name).read_bytes() == \
                bodies[results.index(200)]

        body = f"existing {i}".encode() * 100
        oid = object_id(body)
        assert srv.upload("r", "index", body).status == 200
        path = obj_path(srv.data_dir, "r", "index", oid)
        state = file_states([path])
        results = race(10, lambda n: post_status(
            srv, "DELETE" if n % 2 else "POST", f"/r/index/{oid}", b"" if n % 2 else body))
        figures["delete_post_rounds"] += 1
        figures["deletes_2xx"] += sum(r == 200 for n, r in enumerate(results) if n % 2)
        figures["replaced"] += file_states([path]) != state
        assert all(r == 403 for n, r in enumerate(results) if n % 2), results
        assert all(r == 200 for n, r in enumerate(results) if not n % 2), results

        key = f"key {i}".encode()
        kid = object_id(key)
        results = race(6, lambda n: post_status(srv, "DELETE", f"/r/locks/{kid}") if n % 2
                       else post_status(srv, "POST", f"/r/keys/{kid}", key))
        figures["lock_key_rounds"] += 1
        kpath = obj_path(srv.data_dir, "r", "keys", kid)
        figures["keys_touched"] += not (kpath.exists() and kpath.read_bytes() == key)
    report("append_only_races", **figures)
    assert figures["config_one_winner"] == rounds
    assert figures["noverify_one_winner"] == rounds
    assert figures["deletes_2xx"] == 0 and figures["replaced"] == 0
    assert figures["keys_touched"] == 0
    assert temp_files(srv.data_dir) == [] and temp_files(nv.data_dir) == []


VICTIM_SPELLINGS = ["bob", "%62ob", "b%6Fb", "bo%62", "%62%6F%62", "%62%6f%62", "Bob", "BOB",
                    "bob%00", "bob%20", "bob.", " bob".replace(" ", "%09")]
TRAVERSALS = [
    "/{v}", "/alice/../{v}", "/alice/%2e%2e/{v}", "/alice/%2E%2E/{v}", "/alice/.%2e/{v}",
    "/alice/%2e./{v}", "/alice%2f..%2f{v}", "/alice%2F..%2F{v}", "/alice/..%2f{v}",
    "/alice/..%5c{v}", "/alice%5c..%5c{v}", "//{v}", "/./{v}", "/%2e/{v}",
    "/alice/sub/../../{v}", "/alice/./../{v}", "/%2f{v}", "/alice/%2e%2e%2f{v}",
    "/alice%00/../{v}", "/alice/..;/{v}", "/alice;/../{v}", "/alice/../../{v}",
    "/alice/%252e%252e/{v}", "/alice/sub/..%2F..%2F{v}", "/alice\\..\\{v}",
]


@pytest.mark.slow
def test_private_repos_bypass_matrix(start_server, report, tmp_path):
    """F7/T23-T25: alice, with --private-repos, aims at bob's repository
    through 12 spellings of "bob" x 25 traversal patterns (300 prefixes) x
    GET/HEAD/POST/DELETE on the config, an object and a listing: 0 reads of
    bob's data, 0 changes to bob's files or to anything outside alice's repo."""
    users = tmp_path / "htpasswd"
    users.write_text(sha_user("alice", "pw-alice") + sha_user("bob", "pw-bob"))
    srv = start_server("--htpasswd-file", str(users), "--private-repos")
    bob = ("bob", "pw-bob")
    srv.create_repo("bob", auth=bob)
    secret = b"BOB-SECRET-CONFIG"
    assert srv.request("POST", "/bob/config", body=secret, auth=bob).status == 200
    key = b"BOB-SECRET-KEY " * 10
    kid = object_id(key)
    assert srv.upload("bob", "keys", key, auth=bob).status == 200
    srv.create_repo("alice", auth=("alice", "pw-alice"))
    (tmp_path / "OUTSIDE").write_bytes(b"outside")
    before = tree_state(tmp_path, skip=[srv.data_dir / "alice"])
    alice = basic_auth("alice", "pw-alice")
    prefixes = sorted({t.format(v=v) for t in TRAVERSALS for v in VICTIM_SPELLINGS})
    evil = b"EVIL " * 10
    conn = KeepAlive(srv.host, srv.port, timeout=10, auth=alice)
    attempts = reads = 0
    statuses = {}
    for prefix in prefixes:
        for method, suffix, body in (
                ("GET", "/config", b""), ("HEAD", "/config", b""), ("GET", f"/keys/{kid}", b""),
                ("HEAD", f"/keys/{kid}", b""), ("GET", "/keys/", b""),
                ("POST", "/config", evil), ("POST", f"/keys/{object_id(evil)}", evil),
                ("POST", "/?create=true", b""), ("DELETE", "/config", b""),
                ("DELETE", f"/keys/{kid}", b"")):
            attempts += 1
            resp = conn.request(method, prefix + suffix, body)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            leaked = secret in resp.body or b"BOB-SECRET-KEY" in resp.body or \
                kid.encode() in resp.body
            if leaked or (method in ("GET", "HEAD") and 200 <= resp.status < 300):
                reads += 1
    conn.close()
    after = tree_state(tmp_path, skip=[srv.data_dir / "alice"])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    report("private_repos_matrix", prefixes=len(prefixes), methods=4, attempts=attempts,
           reads_of_bob=reads, changes_outside_alice=len(changed),
           statuses=",".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
    assert len(prefixes) >= 200
    assert reads == 0 and changed == [], changed[:10]
    assert not any(500 <= s for s in statuses), statuses


# =============================================================================
# 7. HTTP framing: a generated corpus of request-smuggling attempts
# =============================================================================

SMUGGLE_AUTH = ("smuggler", "pw-smuggler")


def smuggled(n):
    """The hidden request: it would create repo smug<n>/ if it ever ran."""
    return (f"POST /smug{n}/?create=true HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {basic_auth(*SMUGGLE_AUTH)}\r\nContent-Length: 0\r\n\r\n").encode()


def framing_variants(s):
    """(category, header lines, payload) for hidden request `s`.  Under a
    correct reading each message either is refused or carries `s` inside its
    body; a parser that disagrees with its neighbour about where the body ends
    (or ignores a defective header) would run `s`."""
    n = len(s)
    zero = b"0\r\n\r\n" + s                               # CL covers it; chunked ends before
    size_line = b"%x\r\n" % n
    te_cl = size_line + s + b"\r\n0\r\n\r\n"                # chunk holds it; CL=len(size_line)
    out = []
    # CL.CL: two lengths, or one lax length that a lenient parser reads as 0
    for lines in (["Content-Length: 0", f"Content-Length: {n}"],
                  [f"Content-Length: {n}", "Content-Length: 0"],
                  [f"Content-Length: 0, {n}"], [f"Content-Length: {n}, 0"],
                  [f"Content-Length: {n},0"], [f"Content-Length: {n}", "content-length: 0"],
                  [f"Content-Length: {n}", "Content-Length: "], [f"Content-Length: +{n}"],
                  [f"Content-Length: {n // 10}_{n % 10}"], [f"Content-Length: 0x{n:x}"],
                  [f"Content-Length: {n}.0"], [f"Content-Length: {n};x"],
                  [f"Content-Length: {n}e0"], [f"Content-Length: -0{n}"]):
        out.append(("CL.CL", lines, s))
    te_values = ["chunked", "Chunked", "CHUNKED", "chunked ", " chunked", "\tchunked",
                 "identity, chunked", "chunked, identity", "gzip, chunked", "x-chunked",
                 "chunked;q=1", "chunked, chunked", '"chunked"', "chunk"]
    te_names = ["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING",
                "Transfer_Encoding"]
    # CL.TE: the length covers a zero chunk and the hidden request
    for value in te_values:
        out.append(("CL.TE", [f"Content-Length: {len(zero)}", f"Transfer-Encoding: {value}"],
                    zero))
    for name in te_names[1:]:
        out.append(("CL.TE", [f"{name}: chunked", f"Content-Length: {len(zero)}"], zero))
    # TE.CL: the chunk holds the hidden request; the length stops before it
    for value in te_values[:6] + ["identity, chunked"]:
        out.append(("TE.CL", [f"Transfer-Encoding: {value}", f"Content-Length: {len(size_line)}"],
                    te_cl))
    out.append(("TE.CL", [f"Content-Length: {len(size_line)}", "Transfer-Encoding: chunked"],
                te_cl))
    # TE.TE: an odd coding; a parser that ignores it reads no body and runs s
    for value in te_values + ["identity", "gzip", "", "chunked\x0b", "chunkedx"]:
        out.append(("TE.TE", [f"Transfer-Encoding: {value}"], s))
    for pair in (["chunked", "identity"], ["identity", "chunked"], ["chunked", "chunked"],
                 ["chunked", ""]):
        out.append(("TE.TE", [f"Transfer-Encoding: {v}" for v in pair], s))
    for name in te_names[1:3]:  # (Transfer_Encoding is another header: s is then a
        out.append(("TE.TE", [f"{name}: xchunked"], s))  # legitimate pipelined request)
    # obs-fold: a folded header that one parser joins and another drops
    for lines, payload in (
            (["Transfer-Encoding:", " chunked", f"Content-Length: {len(zero)}"], zero),
            (["Transfer-Encoding: x", "\tchunked", f"Content-Length: {len(zero)}"], zero),
            (["Content-Length:", f" {n}"], s),
            (["X-Pad: y", f" Content-Length: {n}"], s),
            (["X-Pad: y", " Transfer-Encoding: chunked", f"Content-Length: {len(zero)}"], zero),
            ([f"Content-Length: {n}", " 0"], s),
            (["Transfer-Encoding: chunked", " ", f"Content-Length: {len(zero)}"], zero)):
        out.append(("obs-fold", lines, payload))
    # bare LF (and bare CR) inside the head
    for lines, payload in (
            ([f"X-Pad: y\nContent-Length: {n}"], s),
            (["X-Pad: y\nTransfer-Encoding: chunked", f"Content-Length: {len(zero)}"], zero),
            ([f"Content-Length: {n}\n"], s),
            ([f"Content-Length: 0\rContent-Length: {n}"], s),
            (["X-Pad: y\rTransfer-Encoding: chunked", f"Content-Length: {len(zero)}"], zero),
            ([f"Content-Length: {n}", "\nX: y"], s)):
        out.append(("bare-LF", lines, payload))
    # whitespace before the colon, or at the start of the first header line
    for lines, payload in (([f"Content-Length : {n}"], s), ([f"Content-Length\t: {n}"], s),
                           (["Transfer-Encoding : chunked", f"Content-Length: {len(zero)}"], zero),
                           ([f"Content-Length: {len(zero)}", "Transfer-Encoding\t: chunked"], zero),
                           ([f" Content-Length: {n}"], s)):
        out.append(("space-before-colon", lines, payload))
    return out


def framed(method, target, lines, payload, version="HTTP/1.1", auth=SMUGGLE_AUTH,
           line_end=b"\r\n"):
    head = [f"{method} {target} {version}", "Host: x"]
    if auth:
        head.append(f"Authorization: {basic_auth(*auth)}")
    head += lines
    return line_end.join(h.encode("latin-1") for h in head) + line_end + line_end + payload


def response_statuses(srv, data, timeout=5.0):
    """Send `data`, half-close, read until the server closes; return the
    status codes of the responses."""
    received, _ = exchange(srv, data, shut_wr=True, timeout=timeout)
    return [int(m) for m in re.findall(rb"(?:^|\n)HTTP/1\.[01] (\d{3}) ", received)]


@pytest.mark.slow
def test_request_smuggling_corpus(start_server, report, tmp_path):
    """F13/T55-T64: ~300 generated smuggling attempts (CL.CL, CL.TE, TE.CL,
    TE.TE, obs-fold, bare LF/CR, space before colon) behind four kinds of
    front request, plus bodies left unread by early answers (401, 403, 404,
    405, 100-continue; small, at and above the drain limit): each hides an
    authenticated request that would create a repo.  0 may run."""
    users = tmp_path / "htpasswd"
    users.write_text(sha_user(*SMUGGLE_AUTH))
    srv = start_server("--htpasswd-file", str(users), "--body-timeout", "3")
    srv.create_repo("r", auth=SMUGGLE_AUTH)
    existing = b"an existing key"
    assert srv.upload("r", "keys", existing, auth=SMUGGLE_AUTH).status == 200
    assert srv.request("POST", "/r/config", body=b"cfg", auth=SMUGGLE_AUTH).status == 200
    fronts = [("POST", f"/r/keys/{object_id(b'x')}"), ("POST", f"/r/keys/{object_id(existing)}"),
              ("GET", "/r/config"), ("DELETE", f"/r/locks/{object_id(b'l')}")]
    corpus = []  # (category, bytes)
    n = 0
    kinds = len(framing_variants(smuggled(0)))
    for method, path in fronts:
        for i in range(kinds):
            n += 1
            category, lines, payload = framing_variants(smuggled(n))[i]
            corpus.append((category, n, framed(method, path, lines, payload)))
    # bodies left unread by an early answer (and bodies on bodiless requests)
    early = [("POST", f"/r/keys/{object_id(existing)}", (), SMUGGLE_AUTH),   # 403 exists
             ("POST", "/r/keys/not-an-id", (), SMUGGLE_AUTH),                 # 404
             ("POST", "/../x", (), SMUGGLE_AUTH),                            # 404
             ("POST", f"/r/keys/{object_id(b'y')}", (), ("smuggler", "wrong")),  # 401
             ("PUT", "/r/config", (), SMUGGLE_AUTH),                         # 405
             ("POST", "/r/?create=true", (), SMUGGLE_AUTH),                  # 200, body unused
             ("GET", "/r/config", (), SMUGGLE_AUTH), ("HEAD", "/r/config", (), SMUGGLE_AUTH),
             ("DELETE", f"/r/locks/{object_id(b'l')}", (), SMUGGLE_AUTH),
             ("POST", f"/r/keys/{object_id(existing)}", ("Expect: 100-continue",), SMUGGLE_AUTH),
             ("POST", "/nope/keys/" + object_id(b"z"), ("Expect: 100-continue",), SMUGGLE_AUTH)]
    for method, path, extra, auth in early:
        for pad in (0, 64 * 1024 - 200, 200 * 1024):
            n += 1
            payload = b"p" * pad + smuggled(n)
            corpus.append(("unread-body", n, framed(method, path, [
                *extra, f"Content-Length: {len(payload)}"], payload, auth=auth)))
            n += 1
            body = b"p" * pad + smuggled(n)
            payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            corpus.append(("unread-body", n, framed(method, path, [
                *extra, "Transfer-Encoding: chunked"], payload, auth=auth)))

    def run(item):
        category, number, data = item
        return category, number, response_statuses(srv, data)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, corpus))
    time.sleep(0.2)
    executed = sorted(p.name for p in srv.data_dir.glob("smug*"))
    per_category = {}
    five_xx = []
    for category, number, statuses in results:
        total, ran = per_category.get(category, (0, 0))
        per_category[category] = (total + 1, ran + (srv.data_dir / f"smug{number}").exists())
        five_xx += [(category, number, st) for st in statuses if st >= 500 and st != 501]
    report("smuggling", variants=len(corpus), executed=len(executed),
           **{k.replace("-", "_"): f"{v[1]}/{v[0]}" for k, v in per_category.items()},
           server_errors=len(five_xx))
    assert len(corpus) >= 200
    assert executed == [], executed
    assert five_xx == [], five_xx[:10]
    assert srv.returncode is None and "Traceback" not in srv.stderr
    # the hidden request is real: sent on its own, it runs
    assert response_statuses(srv, smuggled(0)) == [200]
    assert (srv.data_dir / "smug0").is_dir()



# =============================================================================
# 8. Availability: slowloris and idle TLS connections
# =============================================================================


@pytest.fixture
def tls_files(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path / "tls"
    d.mkdir()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(d / "cert.pem"), append=True)
    return d


class Slowloris:
    """n TLS connections that send a request head one byte per second."""

    def __init__(self, host, port, ca, n):
        self.host, self.port = host, port
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.n = n
        self.socks = []
        self.stop = threading.Event()
        self.failed = 0
        self.lock = threading.Lock()

    def _open(self, _):
        try:
            raw = socket.create_connection((self.host, self.port), timeout=20)
            s = self.ctx.wrap_socket(raw, server_hostname=self.host)
            s.sendall(b"GET /r/config HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            with self.lock:
                self.failed += 1
            return
        with self.lock:
            self.socks.append(s)

    def open(self):
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(self._open, range(self.n)))
        self.dripper = threading.Thread(target=self._drip, daemon=True)
        self.dripper.start()

    def _drip(self):
        while not self.stop.wait(1.0):
            for s in list(self.socks):
                try:
                    s.send(b"X")
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.slow
@pytest.mark.e2e
def test_slowloris_and_idle_tls_do_not_starve_restic(start_server, make_restic, tls_files,
                                                     report):
    """F10/T82-T85: with 1000 TLS connections dripping a request head one byte
    a second, one idle TCP connection to the TLS port (no ClientHello) and one
    idle established TLS connection, `restic snapshots` completes in < 5 s;
    after --header-timeout (10 s here) every one of them is cut and the
    server's thread count is back to its baseline within 5 s more.

    The default --max-connections (1000) applies: the attackers take every
    slot, and each new connection evicts the one that has waited longest
    without sending a complete request."""
    raise_nofile(8192)
    header_timeout = 10
    srv = start_server("--no-auth", "--tls", "--tls-cert", str(tls_files / "cert.pem"),
                       "--tls-key", str(tls_files / "key.pem"), "--header-timeout",
                       str(header_timeout))
    restic = make_restic(srv.repo_url("r", scheme="rest:https"))
    cacert = ("--cacert", str(tls_files / "ca.pem"))
    restic.run(*cacert, "init")
    t0 = time.monotonic()
    restic.run(*cacert, "snapshots")
    quiet_seconds = time.monotonic() - t0
    time.sleep(0.5)
    baseline = server_threads(srv)
    idle_tcp = socket.create_connection((srv.host, srv.port))
    ctx = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    idle_tls = ctx.wrap_socket(socket.create_connection((srv.host, srv.port)),
                               server_hostname=srv.host)
    attack = Slowloris(srv.host, srv.port, tls_files / "ca.pem", 1000)
    opened_at = time.monotonic()
    try:
        attack.open()
        open_seconds = time.monotonic() - opened_at
        held = server_threads(srv)
        t0 = time.monotonic()
        p = restic.run(*cacert, "snapshots", check=False, timeout=120)
        restic_seconds = time.monotonic() - t0
        still_held = server_threads(srv)
        recovered = wait_for(lambda: server_threads(srv) <= baseline,
                             header_timeout + 5 + 5)
        recovered_after = time.monotonic() - opened_at
        report("slowloris", slowloris=len(attack.socks), failed_to_open=attack.failed,
               idle_tcp=1, idle_tls=1, seconds_to_open=f"{open_seconds:.1f}",
               server_threads_baseline=baseline, server_threads_under_attack=held,
               restic_snapshots_seconds=f"{restic_seconds:.2f}",
               restic_snapshots_seconds_without_attack=f"{quiet_seconds:.2f}",
               threads_when_restic_done=still_held,
               threads_back_to_baseline_after=f"{recovered_after:.1f}")
    finally:
        attack.close()
        idle_tcp.close()
        idle_tls.close()
    assert len(attack.socks) == 1000
    assert p.returncode == 0, p.stderr
    # restic's own connections evict a few attackers (the longest-waiting
    # ones); the attack itself must still be on when restic is done.
    assert still_held >= baseline + 990, "the attack was over before restic ran"
    assert restic_seconds < 5.0
    assert recovered and recovered_after <= header_timeout + 5 + 1



def test_failed_tls_handshakes_leave_no_connection_record(tls_files, tmp_path, report):
    """T86 (in-process, to see the server's own bookkeeping): plain HTTP to the
    TLS port, garbage ClientHellos, clients that hang up at once and clients
    that never send a byte (cut by the header timeout) must not stay in
    ResticServer.connections, which the head-deadline watchdog scans every
    second and SIGTERM walks: it would grow with every port scan."""
    data = tmp_path / "inproc"
    data.mkdir()
    app = pyrestserver.ResticRESTApp(pyrestserver.LocalStorageProvider(str(data)),
                                     auth=pyrestserver.Authenticator(enabled=False))
    ctx = pyrestserver.make_tls_context(str(tls_files / "cert.pem"), str(tls_files / "key.pem"))
    sock, _ = pyrestserver.listen_socket("127.0.0.1:0")
    server = pyrestserver.ResticServer(sock, app, tls_context=ctx, timeouts={"header": 1.0})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    try:
        for i in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(4096)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"\x16\x03\x01\x00\x05hello")
                with contextlib.suppress(OSError):
                    s.recv(4096)
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        good = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
        with good.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                              server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(2.5)  # past the header timeout of the idle ones
        for s in idle:
            s.close()
        left = wait_for(lambda: len(server.connections) == 0, 3)
        report("tls_failed_handshakes", attempts=63,
               connection_records_left=len(server.connections))
        assert left, f"{len(server.connections)} connection records leaked"
    finally:
        server.stop(grace=1)
        sock.close()


# =============================================================================
# 9. Fuzzing the request parser and router (hypothesis)
# =============================================================================

FUZZ_SETTINGS = dict(deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))

HEX = "0123456789abcdef"
SEGMENTS = ["r", "alice", "data", "keys", "locks", "snapshots", "index", "config", "", ".",
            "..", "%2e", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "\\", "%00", "%0a",
            "%ff", "%c3%a9", "%C0%AE", "%e2%80%ae", "%252e", "%", "%2", "%zz", ";", "?", "#",
            "~", "+", "a b", "%20", "caf%C3%A9", "\uff0e\uff0e", "\u2215", "..\u2215..",
            "x" * 256, "xn--", "*", "@", ".htpasswd", "%2ehtpasswd", "..%00"]
OBJECT_IDS = st.one_of(st.text(HEX, min_size=64, max_size=64),
                       st.text(HEX + "ABCDEF", min_size=0, max_size=70))


def segment():
    return st.one_of(st.sampled_from(SEGMENTS), OBJECT_IDS,
                     st.text(st.characters(codec="utf-8"), max_size=8),
                     st.text("%0123456789abcdefABCDEF./\\", max_size=9))


@st.composite
def targets(draw):
    parts = draw(st.lists(segment(), max_size=6))
    path = "/" + "/".join(parts)
    if draw(st.booleans()):
        path += "/"
    if draw(st.integers(0, 4)) == 0:
        path += "?" + draw(st.sampled_from(["create=true", "create=false", "create=true&x",
                                            "create", "", "create=true%00", "a=%zz"]))
    if draw(st.integers(0, 10)) == 0:
        path = draw(st.sampled_from(["", "*", "http://x", "//", "http://x/r/config"])) + path
    return path


def check_route(route):
    for seg in route.repo:
        assert seg and not seg.startswith("."), route.repo
        assert seg not in ("..", ".") and not re.search(r"[/\\\x00-\x1f\x7f]", seg), route.repo
        assert seg not in pyrestserver.RESERVED_NAMES, route.repo
    assert len(route.repo) <= pyrestserver.MAX_REPO_DEPTH
    base = "/srv/base"
    joined = os.path.normpath(os.path.join(base, *route.repo))
    assert joined == base or joined.startswith(base + "/"), route.repo
    if route.kind in TYPES:
        assert re.fullmatch(r"[0-9a-f]{64}", route.name)
    elif route.kind == "list":
        assert route.name in TYPES
    else:
        assert route.kind in ("repo", "config"), route.kind


@settings(max_examples=4000, **FUZZ_SETTINGS)
@given(st.one_of(targets(), st.text(max_size=60).map(lambda t: "/" + t)))
@example("/..%2f../config")
@example("/%2e%2e/%2e%2e/keys/" + "a" * 64)
def test_parse_route_never_yields_a_dangerous_repo(target_):
    """parse_route either refuses (HTTPError 400/404) or yields a repo of at
    most two plain folder names (no '', '.', '..', leading dot, slash,
    backslash, NUL or control character, no reserved word) that stays under
    the base folder, and a type/id/config that matches restic's layout."""
    try:
        route = pyrestserver.parse_route(target_)
    except pyrestserver.HTTPError as exc:
        assert exc.status in (400, 404), exc.status
        return
    check_route(route)


LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
NUMBERS = st.one_of(st.integers(0, 2**70).map(str), st.sampled_from(
    ["", " ", "+1", "-1", "1_0", "0x10", "1e3", "\xb2", "\xb3", "\xb9", "1\xb2", "\xbd",
     "007", "9" * 30]))


@st.composite
def range_headers(draw):
    if draw(st.integers(0, 3)) == 0:
        return draw(st.text(LATIN1, max_size=30))
    unit = draw(st.sampled_from(["bytes"] * 4 + ["Bytes", "BYTES", " bytes", "bytes ", "items",
                                                 ""]))
    specs = draw(st.lists(st.tuples(NUMBERS, st.sampled_from(["-"] * 4 + ["", "--", " - "]),
                                    NUMBERS), min_size=1, max_size=3))
    return unit + "=" + ",".join(a + d + b for a, d, b in specs)


@settings(max_examples=4000, **FUZZ_SETTINGS)
@given(st.one_of(st.none(), range_headers()), st.integers(0, 2**40))
@example("bytes=\xb2-", 100)
@example("bytes=0-\xb9", 100)
def test_parse_range_stays_within_the_object(header, size):
    """parse_range returns None (whole object), a (start, length) inside the
    object (length >= 1, start + length <= size), or HTTPError 416 carrying
    `Content-Range: bytes */size` -- nothing else, for any latin-1 header
    (what the built-in door and WSGI hand over)."""
    try:
        result = pyrestserver.parse_range(header, size)
    except pyrestserver.HTTPError as exc:
        assert exc.status == 416
        assert ("Content-Range", f"bytes */{size}") in exc.headers
        return
    if result is not None:
        start, length = result
        assert 0 <= start and length >= 1 and start + length <= size, (header, size, result)


def test_range_header_with_superscript_digits_is_not_a_server_error(start_server):
    """Regression found by the fuzzers: str.isdigit() accepts '²' (byte 0xB2 in
    a latin-1 header) but int() does not; a Range header is never a 5xx."""
    srv = start_server("--no-auth")
    srv.create_repo("r")
    assert srv.upload("r", "keys", b"0123456789").status == 200
    path = target("r", "keys", object_id(b"0123456789"))
    statuses = {}
    for value in (b"bytes=\xb2-", b"bytes=0-\xb9", b"bytes=\xb3-4", b"bytes=-\xb2"):
        got = response_statuses(srv, request_bytes("GET", path, b"", [
            ("Connection", "close")]).replace(b"\r\n\r\n", b"\r\nRange: " + value + b"\r\n\r\n"))
        statuses[value.decode("latin-1")] = got
    assert all(s and s[0] in (200, 206, 416) for s in statuses.values()), statuses


FUZZ_METHODS = ["GET", "HEAD", "POST", "DELETE", "PUT", "OPTIONS", "PATCH", "TRACE", "CONNECT",
                "PRI", "get", "G\x00T", "GET /", "", "M" * 100, "POST\t", "\u00e9"]
FUZZ_HEADER_NAMES = ["Content-Length", "Transfer-Encoding", "Range", "Accept", "Authorization",
                     "Expect", "Connection", "Host", "Content-Type", "X-Pad", "Content-Length ",
                     " Range", "Range:", "", "\x00", "A" * 300]
FUZZ_HEADER_VALUES = st.one_of(
    NUMBERS, st.sampled_from(["chunked", "identity", "100-continue", "close", "keep-alive",
                              V2, "bytes=0-", "bytes=-1", "Basic Zm9vOmJhcg==", "Basic !!",
                              "", " ", "\t", "a\r\nb", "\xff", "bytes=\xb2-"]),
    st.text(LATIN1, max_size=40))


VISIBLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@st.composite
def wellformed_requests(draw, known_paths):
    """Syntactically valid requests with odd targets and header values."""
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "DELETE", "PUT",
                                   "OPTIONS"]))
    path = draw(st.sampled_from(known_paths)) if draw(st.integers(0, 9)) < 7 else draw(targets())
    headers = ["Host: x"]
    if draw(st.booleans()):
        headers.append(f"Range: {VISIBLE.sub('', draw(range_headers())).strip()}")
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["Accept", "Authorization", "Expect", "Connection",
                                     "Content-Type", "X-Pad", "If-None-Match", "Cookie"]))
        headers.append(f"{name}: {VISIBLE.sub('', draw(FUZZ_HEADER_VALUES)).strip()}")
    body = draw(st.one_of(st.just(b""), st.binary(max_size=100)))
    if body or method in ("POST", "PUT") and draw(st.booleans()):
        headers.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([f"{method} {path} HTTP/1.1"] + headers) + "\r\n\r\n").encode(
        "latin-1", "replace") + body


@st.composite
def hostile_requests(draw, known_paths):
    """Anything: garbage, odd methods, versions, line endings and headers."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=300))
    method = draw(st.sampled_from(FUZZ_METHODS))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.10",
                                                       "http/1.1", "HTTP/1.1 ", ""]))
    eol = draw(st.sampled_from(["\r\n"] * 8 + ["\n", "\r"]))
    path = draw(st.one_of(targets(), st.sampled_from(known_paths)))
    line = f"{method} {path} {version}"
    headers = ["Host: x"] if draw(st.integers(0, 5)) else []
    for _ in range(draw(st.integers(0, 5))):
        headers.append(f"{draw(st.sampled_from(FUZZ_HEADER_NAMES))}: {draw(FUZZ_HEADER_VALUES)}")
    body = draw(st.one_of(st.just(b""), st.binary(max_size=200),
                          st.sampled_from([b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n",
                                           b"GET /r/config HTTP/1.1\r\nHost: x\r\n\r\n"])))
    if draw(st.booleans()):
        headers.append(f"Content-Length: {len(body)}")
    head = eol.join([line] + headers) + eol + eol
    return head.encode("latin-1", "replace") + body


def raw_requests(known_paths):
    return st.one_of(wellformed_requests(known_paths), hostile_requests(known_paths))


def paths_outside(events, data_dir):
    """Paths named by file syscalls that are neither under `data_dir` nor
    the interpreter's own library (modules imported lazily, e.g. codecs)."""
    import sysconfig
    allowed = [os.path.realpath(data_dir)] + sorted({
        os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib", "purelib",
                                                             "platlib")})
    found = set()
    for e in events:
        for quoted, fdpath in e.path_args():
            p = quoted or fdpath
            if p.startswith("/") and not any(p == a or p.startswith(a + "/") for a in allowed):
                found.add(f"{e.name} {p}")
    return found


def test_creating_the_root_repo_touches_nothing_outside_path(start_server, tmp_path,
                                                             has_strace):
    """T01/§7.1: POST /?create=true (restic init of a repository at --path
    itself) makes its folders inside --path and fsyncs those; it must not
    open the folder above --path, which the server user may not be able to
    read (a 0711 parent makes the first init answer 500)."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth")
    with Strace(srv.pid, tmp_path / "root-create.trace", "-e", "trace=%file,fsync"):
        assert srv.request("POST", "/?create=true").status == 200
        assert srv.request("POST", "/sub/?create=true").status == 200
    assert paths_outside(parse_strace(tmp_path / "root-create.trace"), srv.data_dir) == set()


@pytest.mark.slow
def test_fuzzed_requests_never_5xx_nor_touch_anything_outside_path(start_server, tmp_path,
                                                                  report, has_strace):
    """T93: ~60 s (env PYRESTSERVER_FUZZ_SECONDS) of hypothesis-generated raw
    requests (methods, targets with encodings/dots/slashes/unicode, versions,
    line endings, headers, bodies, plain garbage) against a seeded server: no 5xx but 501 for an
    unknown transfer coding, no traceback or ERROR in its log, the server
    stays up, nothing changes outside --path, and (strace) no file syscall
    names a path outside --path."""
    need(has_strace, "strace (as root)")
    srv = start_server("--no-auth")
    srv.create_repo("r")
    assert srv.request("POST", "/r/config", body=b"fuzz config").status == 200
    known = ["/r/config", "/r/", "/r/?create=true", "/?create=true", "/health"]
    for kind in TYPES:
        assert srv.upload("r", kind, f"fuzz {kind}".encode()).status == 200
        known += [target("r", kind, object_id(f"fuzz {kind}".encode())), f"/r/{kind}/"]
    (tmp_path / "OUTSIDE").write_bytes(b"outside")
    (tmp_path / "config").write_bytes(b"outside config")
    (tmp_path / "keys").mkdir()
    before = tree_state(tmp_path, skip=[srv.data_dir, tmp_path / "fuzz.trace"])
    budget = float(os.environ.get("PYRESTSERVER_FUZZ_SECONDS", "60"))
    seen = {"requests": 0, "responses": 0}
    statuses = {}
    bad = []

    @settings(max_examples=1000, **FUZZ_SETTINGS)
    @given(raw_requests(known))
    def one(data):
        got = response_statuses(srv, data, timeout=10)
        seen["requests"] += 1
        seen["responses"] += len(got)
        for s in got:
            statuses[s] = statuses.get(s, 0) + 1
        if any(s >= 500 and s != 501 for s in got):  # collected, reported at the end
            bad.append((data[:300], got))

    started = time.monotonic()
    batches = 0
    with Strace(srv.pid, tmp_path / "fuzz.trace", "-e", "trace=%file"):
        while time.monotonic() - started < budget:
            batches += 1
            try:
                one()
            finally:
                alive = srv.returncode is None
            assert alive, srv.stderr
    elapsed = time.monotonic() - started
    after = tree_state(tmp_path, skip=[srv.data_dir, tmp_path / "fuzz.trace"])
    outside = paths_outside(parse_strace(tmp_path / "fuzz.trace"), srv.data_dir)
    log_errors = [line for line in srv.stderr_lines if "Traceback" in line or "ERROR" in line]
    report("fuzz_http", requests=seen["requests"], responses=seen["responses"],
           seconds=f"{elapsed:.0f}", batches=batches, server_errors=len(bad),
           log_errors=len(log_errors), changed_outside=len(
               [k for k in set(before) | set(after) if before.get(k) != after.get(k)]),
           paths_outside_in_syscalls=len(outside),
           statuses=",".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
    assert bad == [], sorted(bad, key=lambda b: len(b[0]))[:3]
    assert before == after
    assert sorted(outside) == [], sorted(outside)
    assert log_errors == [], log_errors[:5]
