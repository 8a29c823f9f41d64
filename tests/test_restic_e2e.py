"""End-to-end tests: the real restic binary against a running pyrestserver.

Every test starts `python3 pyrestserver.py --no-auth` (or the zipapp) on a
fresh data directory and drives restic 0.14+ over HTTP.  Besides restic's own
verdict (`check --read-data`, byte-for-byte restores) the tests look at the
data directory to make sure the server stored what restic sent.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_tree, temp_files, tree_digest

pytestmark = pytest.mark.e2e

TYPES = ("data", "index", "keys", "locks", "snapshots")


# -- restic runs ---------------------------------------------------------------


@pytest.fixture
def make_restic(make_restic):
    """conftest's make_restic, plus: every successful restic run must be free of
    retries.  restic retries failed requests (e.g. a 500) with backoff and often
    succeeds in the end, which would hide a server error from the test."""

    def make(repo_url, **kw):
        r = make_restic(repo_url, **kw)
        plain_run = r.run

        def run(*args, **kwargs):
            p = plain_run(*args, **kwargs)
            if p.returncode == 0:
                retries = [line for line in p.stderr.splitlines() if "retrying after" in line]
                assert not retries, (
                    f"restic {' '.join(args)} had to retry requests:\n" + "\n".join(retries)
                )
            return p

        r.run = run
        return r

    return make


# -- helpers ----------------------------------------------------------------


def restored_root(target, source):
    """restic restores an absolute source path below the target directory."""
    return Path(target) / os.path.abspath(source).lstrip("/")


def snapshots(restic, *opts, repo=None):
    p = restic.run(*opts, "snapshots", "--json", repo=repo)
    return json.loads(p.stdout)


def repo_files(repo_dir, kind, with_temp=False):
    """Object files of one type in a repository directory on disk (without the
    server's in-flight `.upload-*` temp files unless with_temp)."""
    base = Path(repo_dir) / kind
    found = base.glob("??/*") if kind == "data" else base.iterdir()
    return sorted(
        p for p in found
        if p.is_file() and (with_temp or not p.name.startswith(".upload-"))
    )


def assert_objects_named_by_content(repo_dir):
    """Every stored object (except config) is named by the SHA-256 of its bytes;
    data objects sit in the 2-hex-char fan-out directory of their name."""
    count = 0
    for kind in ("data", "index", "keys", "snapshots"):
        for p in repo_files(repo_dir, kind):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            assert p.name == digest, f"{p}: content hash {digest}"
            if kind == "data":
                assert p.parent.name == p.name[:2], p
            count += 1
    return count


def assert_repo_layout(repo_dir):
    repo_dir = Path(repo_dir)
    assert (repo_dir / "config").is_file()
    for kind in TYPES:
        assert (repo_dir / kind).is_dir(), kind
    fanout = sorted(p.name for p in (repo_dir / "data").iterdir() if p.is_dir())
    assert fanout == [f"{i:02x}" for i in range(256)]


def backup_restore_check(restic, tmp_path, opts=(), name="src", seed=1, repo_dir=None):
    """init, backup, snapshots, ls, restore (compared byte for byte), check --read-data."""
    opts = list(opts)
    restic.run(*opts, "init")
    if repo_dir is not None:
        assert_repo_layout(repo_dir)

    src = make_tree(tmp_path / name, seed=seed)
    restic.run(*opts, "backup", str(src))

    snaps = snapshots(restic, *opts)
    assert len(snaps) == 1
    assert snaps[0]["paths"] == [str(src)]

    listing = restic.run(*opts, "ls", "latest").stdout.splitlines()
    assert str(src / "big.bin") in listing
    assert str(src / "ünïcode name.txt") in listing
    assert str(src / "d0" / "e0" / "file 0.bin") in listing

    target = tmp_path / f"restore-{name}"
    restic.run(*opts, "restore", "latest", "--target", str(target))
    assert tree_digest(restored_root(target, src)) == tree_digest(src)

    check = restic.run(*opts, "check", "--read-data")
    assert "no errors were found" in check.stdout

    if repo_dir is not None:
        assert assert_objects_named_by_content(repo_dir) > 0
        assert len(repo_files(repo_dir, "snapshots")) == 1
        assert len(repo_files(repo_dir, "keys")) == 1
        assert repo_files(repo_dir, "locks") == []
        assert temp_files(repo_dir) == []
    return src, snaps[0]


def write_random_tree(root, files, size, seed):
    rnd = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"blob-{i}.bin").write_bytes(rnd.randbytes(size))
    return root


# -- tests ------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts", [["-o", "rest.connections=1"], []], ids=["connections1", "default"]
)
def test_backup_restore_check(start_server, make_restic, tmp_path, opts):
    srv = start_server("--no-auth")
    restic = make_restic(srv.repo_url("repo"))
    backup_restore_check(restic, tmp_path, opts, repo_dir=srv.data_dir / "repo")


def test_backup_restore_check_wsgi_door(start_server, make_restic, tmp_path):
    """The same flow through the WSGI application (tests/wsgi_door.py, waitress)."""
    srv = start_server("--no-auth", door="wsgi")
    restic = make_restic(srv.repo_url("repo"))
    backup_restore_check(restic, tmp_path, repo_dir=srv.data_dir / "repo")


def test_root_repo(start_server, make_restic, tmp_path):
    """The repository at the URL root lives directly in --path."""
    srv = start_server("--no-auth")
    restic = make_restic(srv.repo_url())
    backup_restore_check(restic, tmp_path, repo_dir=srv.data_dir)


def test_sub_repo(start_server, make_restic, tmp_path):
    srv = start_server("--no-auth")
    restic = make_restic(srv.repo_url("alice/work"))
    backup_restore_check(restic, tmp_path, repo_dir=srv.data_dir / "alice" / "work")
    # the intermediate folder is not a repository itself
    assert not (srv.data_dir / "alice" / "config").exists()
    assert not (srv.data_dir / "config").exists()


def test_forget_prune(start_server, make_restic, tmp_path):
    srv = start_server("--no-auth")
    repo_dir = srv.data_dir / "repo"
    restic = make_restic(srv.repo_url("repo"))
    restic.run("init")

    src = make_tree(tmp_path / "src", seed=1)
    rnd = random.Random(7)
    for round_ in range(3):
        # new content each round: the old big.bin becomes garbage after forget
        (src / "big.bin").write_bytes(rnd.randbytes(3 * 1024 * 1024))
        (src / f"added-{round_}.txt").write_text(f"round {round_}\n")
        restic.run("backup", str(src))
    assert len(snapshots(restic)) == 3
    latest = tree_digest(src)
    packs_before = {p.name for p in repo_files(repo_dir, "data")}

    restic.run("forget", "--keep-last", "1", "--prune")

    snaps = snapshots(restic)
    assert len(snaps) == 1
    assert len(repo_files(repo_dir, "snapshots")) == 1
    packs_after = {p.name for p in repo_files(repo_dir, "data")}
    # prune deleted (or repacked) packs that held the two forgotten big.bin files
    assert packs_before - packs_after, "prune removed no pack file"
    assert repo_files(repo_dir, "locks") == []

    check = restic.run("check", "--read-data")
    assert "no errors were found" in check.stdout
    target = tmp_path / "restore"
    restic.run("restore", "latest", "--target", str(target))
    assert tree_digest(restored_root(target, src)) == latest
    assert_objects_named_by_content(repo_dir)


def test_unlock_removes_stale_lock(start_server, make_restic, tmp_path):
    srv = start_server("--no-auth")
    repo_dir = srv.data_dir / "repo"
    restic = make_restic(srv.repo_url("repo"))
    restic.run("init")

    # A backup from stdin takes its lock and then waits for input; killing it
    # leaves the lock file behind (stale: same host, dead PID).
    holder = subprocess.Popen(
        [restic.binary, "-r", restic.repo_url, "backup", "--stdin",
         "--stdin-filename", "held.txt"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=restic.env(),
    )
    try:
        deadline = time.monotonic() + 60
        while not repo_files(repo_dir, "locks"):
            if holder.poll() is not None:
                pytest.fail("restic exited early:\n" + holder.stderr.read().decode())
            assert time.monotonic() < deadline, "restic never created a lock"
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait(10)
        holder.stderr.close()
        holder.stdin.close()

    locks = repo_files(repo_dir, "locks")
    assert len(locks) == 1
    assert locks[0].name == hashlib.sha256(locks[0].read_bytes()).hexdigest()
    listed = restic.run("list", "locks", "--no-lock").stdout.split()
    assert listed == [locks[0].name]

    out = restic.run("unlock")
    assert "successfully removed locks" in out.stdout
    assert repo_files(repo_dir, "locks") == []
    assert restic.run("list", "locks", "--no-lock").stdout.split() == []

    # a lock of a live restic process is removed with --remove-all only
    restic.run("unlock", "--remove-all")
    assert repo_files(repo_dir, "locks") == []
    # the repository is still usable
    src = make_tree(tmp_path / "src", files=5, big=1000)
    restic.run("backup", str(src))
    assert len(snapshots(restic)) == 1


def test_key_add_list(start_server, make_restic, tmp_path):
    srv = start_server("--no-auth")
    repo_dir = srv.data_dir / "repo"
    restic = make_restic(srv.repo_url("repo"))
    restic.run("init")
    src = make_tree(tmp_path / "src", files=5, big=1000)
    restic.run("backup", str(src))

    newpw = tmp_path / "new-password"
    newpw.write_text("second secret\n")
    restic.run("key", "add", "--new-password-file", str(newpw), "--user", "bob",
               "--host", "otherhost")

    keys = repo_files(repo_dir, "keys")
    assert len(keys) == 2
    listing = restic.run("key", "list").stdout
    assert "bob" in listing and "otherhost" in listing
    # each key's short ID (first 8 hex chars of the object name) is listed
    for k in keys:
        assert k.name[:8] in listing

    other = make_restic(srv.repo_url("repo"), password="second secret")
    snaps = snapshots(other)
    assert len(snaps) == 1 and snaps[0]["paths"] == [str(src)]

    wrong = make_restic(srv.repo_url("repo"), password="not a key")
    p = wrong.run("snapshots", check=False)
    assert p.returncode != 0
    assert "wrong password" in (p.stderr + p.stdout).lower()


def test_tag_add_remove(start_server, make_restic, tmp_path):
    srv = start_server("--no-auth")
    repo_dir = srv.data_dir / "repo"
    restic = make_restic(srv.repo_url("repo"))
    restic.run("init")
    src = make_tree(tmp_path / "src", files=5, big=1000)
    restic.run("backup", "--tag", "first", str(src))
    (old,) = snapshots(restic)
    assert old["tags"] == ["first"]

    restic.run("tag", "--add", "foo", "--add", "bar", old["id"])
    (snap,) = snapshots(restic)
    assert sorted(snap["tags"]) == ["bar", "first", "foo"]
    assert snap["id"] != old["id"]
    # the rewritten snapshot replaced the old one on disk
    assert [p.name for p in repo_files(repo_dir, "snapshots")] == [snap["id"]]

    restic.run("tag", "--remove", "foo,first")
    (snap2,) = snapshots(restic)
    assert snap2["tags"] == ["bar"]
    assert [p.name for p in repo_files(repo_dir, "snapshots")] == [snap2["id"]]

    (tagged,) = snapshots(restic, "--tag", "bar")
    assert tagged["id"] == snap2["id"]
    assert snapshots(restic, "--tag", "foo") == []


def test_copy_between_repos(start_server, make_restic, tmp_path):
    """`restic copy` between two repositories on one server (default connections:
    with rest.connections=1 restic 0.14 stalls on copy, see reference §12)."""
    srv = start_server("--no-auth")
    src_restic = make_restic(srv.repo_url("source"), password="source pw")
    src, snap = backup_restore_check(src_restic, tmp_path, name="tree",
                                     repo_dir=srv.data_dir / "source")

    pwfile = tmp_path / "source-password"
    pwfile.write_text("source pw\n")
    from_args = ["--from-repo", srv.repo_url("source"), "--from-password-file", str(pwfile)]
    dst = make_restic(srv.repo_url("dest"), password="dest pw")
    dst.run("init", *from_args, "--copy-chunker-params")
    assert_repo_layout(srv.data_dir / "dest")
    out = dst.run("copy", *from_args)
    assert snap["short_id"] in out.stdout

    (copied,) = snapshots(dst)
    assert copied["paths"] == [str(src)]
    assert copied["original"] == snap["id"]
    target = tmp_path / "restore-copy"
    dst.run("restore", "latest", "--target", str(target))
    assert tree_digest(restored_root(target, src)) == tree_digest(src)
    assert "no errors were found" in dst.run("check", "--read-data").stdout
    assert_objects_named_by_content(srv.data_dir / "dest")

    # same chunker parameters: copying again transfers nothing new
    dst.run("copy", *from_args)
    assert len(snapshots(dst)) == 1


@pytest.mark.slow
def test_server_killed_mid_upload(start_server, make_restic, tmp_path):
    """SIGKILL the server during a backup: after a restart no temp file is left,
    every stored pack is complete, and restic can finish the job."""
    srv = start_server("--no-auth")
    data = srv.data_dir
    repo_dir = data / "repo"
    restic = make_restic(srv.repo_url("repo"))
    restic.run("init")
    src = write_random_tree(tmp_path / "big", files=6, size=10 * 1024 * 1024, seed=3)

    # throttle the upload (8 MiB/s) so that the kill lands while packs are in flight
    backup = subprocess.Popen(
        [restic.binary, "-r", restic.repo_url, "--limit-upload", "8192",
         "backup", str(src)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=restic.env(),
    )
    saw_temp = False
    try:
        deadline = time.monotonic() + 120
        while not repo_files(repo_dir, "data"):
            assert backup.poll() is None, "backup finished before any pack was seen"
            assert time.monotonic() < deadline, "no pack file appeared"
            saw_temp = saw_temp or bool(temp_files(data))
            time.sleep(0.01)
        # one pack is complete; wait (briefly) until the next one is in flight
        deadline = time.monotonic() + 2
        while not saw_temp and time.monotonic() < deadline:
            saw_temp = bool(temp_files(data))
            time.sleep(0.01)
        assert backup.poll() is None, "backup completed before the server was killed"
        srv.kill()
        assert srv.returncode == -signal.SIGKILL
    finally:
        backup.kill()
        backup.wait(10)
    left_behind = temp_files(data)
    print(f"temp file seen before the kill: {saw_temp}; left behind: {left_behind}")
    # the kill interrupted uploads, so the restart has something to clean up
    assert left_behind, "no upload was in flight when the server was killed"

    srv2 = start_server("--no-auth", data_dir=data)
    assert temp_files(data) == [], "temp files survived the restart"
    stored = repo_files(repo_dir, "data", with_temp=True)
    assert stored, "no complete pack survived"
    for p in stored:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, f"damaged pack {p}"
    assert_objects_named_by_content(repo_dir)

    restic2 = make_restic(srv2.repo_url("repo"))
    restic2.run("unlock")  # the killed backup left its (now stale) lock
    assert repo_files(repo_dir, "locks") == []
    restic2.run("backup", str(src))
    assert len(snapshots(restic2)) == 1
    check = restic2.run("check", "--read-data")
    assert "no errors were found" in check.stdout
    target = tmp_path / "restore"
    restic2.run("restore", "latest", "--target", str(target))
    assert tree_digest(restored_root(target, src)) == tree_digest(src)
    assert temp_files(data) == []


def build_zipapp(tmp_path):
    """Build pyrestserver.pyz with the Makefile recipe (output kept in tmp_path);
    without make, with the same python -m zipapp steps."""
    pyz = tmp_path / "pyrestserver.pyz"
    stage = tmp_path / "zipstage"
    make = shutil.which("make")
    if make and (ROOT / "Makefile").exists():
        subprocess.run(
            [make, "-s", "-C", str(ROOT), f"ZIPAPP={pyz}", f"ZIPSTAGE={stage}",
             f"PYTHON={sys.executable}", str(pyz)],
            check=True, capture_output=True, timeout=120,
        )
    else:
        stage.mkdir()
        shutil.copy(ROOT / "pyrestserver.py", stage)
        (stage / "__main__.py").write_text(
            "import sys\nimport pyrestserver\n\nsys.exit(pyrestserver.main())\n"
        )
        subprocess.run(
            [sys.executable, "-m", "zipapp", str(stage), "-o", str(pyz)],
            check=True, timeout=120,
        )
    assert pyz.is_file()
    return pyz


@pytest.mark.slow
def test_zipapp_backup_restore(start_server, make_restic, tmp_path):
    pyz = build_zipapp(tmp_path)
    version = subprocess.run(
        [sys.executable, str(pyz), "--version"], capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL, cwd=str(tmp_path),
    )
    assert version.returncode == 0, version.stderr
    assert "pyrestserver" in (version.stdout + version.stderr).lower()

    srv = start_server("--no-auth", script=pyz)
    restic = make_restic(srv.repo_url("zipped"))
    restic.run("init")
    assert_repo_layout(srv.data_dir / "zipped")
    src = make_tree(tmp_path / "src", seed=5)
    restic.run("backup", str(src))
    target = tmp_path / "restore"
    restic.run("restore", "latest", "--target", str(target))
    assert tree_digest(restored_root(target, src)) == tree_digest(src)
    assert_objects_named_by_content(srv.data_dir / "zipped")
