"""The Drime Cloud backend (`--backend drime`, pyrestserver_drime.py).

Every test runs the real server as a subprocess with `--backend drime`, talking
through pydrime (unchanged) to the Drime API emulator in tests/drime_emulator.py,
which runs in a thread of the test process on 127.0.0.1 port 0.  The emulator
counts API calls per endpoint, so the tests also pin the number of calls each
operation costs.

Regression tests for the defects measured in the original package's Drime
backend (docs/drime.md lists them):

1. listings cut at 1000 entries            -> test_listings_are_complete_past_the_page_size
2. duplicate folders / invisible packs     -> test_concurrent_first_writes_make_one_folder
3. duplicate entries on re-save            -> test_resave_makes_no_duplicate,
                                              test_legacy_duplicates_are_resolved
4. transient 429 answered as 404           -> test_transient_errors_are_retried,
                                              test_persistent_errors_are_never_404
5. whole packs in memory, full downloads    -> test_upload_memory_is_bounded,
   for ranged reads                            test_ranged_get_downloads_only_the_range
6. predictable temp paths                  -> test_uploads_spool_to_a_private_temp_dir
7. --append-only made everything read-only -> test_append_only_allows_backups
8. 257 API calls to list data              -> test_listing_data_is_cheap
9. folder map never invalidated            -> test_folder_deleted_elsewhere_is_recreated

An opt-in test against the real service runs only when DRIME_API_KEY is set in
the environment (test_live_service_unknowns).
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import IN_CI, V2, make_tree, object_id, tree_digest

try:
    import pydrime  # noqa: F401
except ImportError:  # pragma: no cover
    if IN_CI:
        raise
    pytest.skip("pydrime is not installed (pip install pydrime)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drime_emulator import DrimeEmulator  # noqa: E402

PAGE = 100  # the emulator's page-size cap in these tests (the backend asks for 1000)
FAST = ("--drime-retry-delay", "0.01", "--drime-max-retry-wait", "2")
LIVE_KEY = os.environ.get("DRIME_API_KEY")


# -- fixtures and helpers -----------------------------------------------------------


@pytest.fixture
def emulator():
    emu = DrimeEmulator(max_per_page=PAGE).start()
    yield emu
    emu.stop()


@pytest.fixture
def drime(start_server, emulator, tmp_path):
    """Factory: a --backend drime server on the emulator (or on emu=...)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def start(*args, emu=None, env=None, door="builtin", workspace="0"):
        emu = emu or emulator
        full_env = {"DRIME_API_KEY": emu.api_key, "DRIME_API_URL": emu.url,
                    "HOME": str(home), "DRIME_ROOT_FOLDER": "", "DRIME_WORKSPACE_ID": ""}
        full_env.update(env or {})
        return start_server("--no-auth", "--backend", "drime", "--workspace-id", workspace,
                            *FAST, *args, env=full_env, door=door)

    return start


def run_server(args, env, cwd, timeout=30):
    """Run the server expecting it to exit (configuration errors)."""
    full = dict(os.environ)
    full.update(env)
    return subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent
                                               / "pyrestserver.py"), *args],
                          capture_output=True, text=True, env=full, cwd=str(cwd),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def body_with_prefix(prefix, size=2000, seed=0):
    """Random bytes whose sha256 (the object id) starts with ``prefix``."""
    rnd = random.Random(f"{prefix}-{seed}")
    while True:
        body = rnd.randbytes(size)
        if object_id(body).startswith(prefix):
            return body


def upload(srv, kind, body, repo="r", name=None):
    r = srv.upload(repo, kind, body, name=name)
    assert r.status == 200, (r, srv.stderr[-2000:])
    return name or object_id(body)


def put_config(srv, body, repo="r"):
    return srv.request("POST", f"/{repo}/config", body=body)


def get(srv, path, **kw):
    return srv.request("GET", path, **kw)


def list_v2(srv, path):
    r = srv.request("GET", path, headers={"Accept": V2})
    assert r.status == 200, r
    return {item["name"]: item["size"] for item in json.loads(r.body)}


def parallel(fn, items, threads=8):
    results = [None] * len(items)
    errors = []

    def work(i, item):
        try:
            results[i] = fn(item)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i, it)) for i, it in enumerate(items)]
    for n in range(0, len(ts), threads):
        batch = ts[n:n + threads]
        for t in batch:
            t.start()
        for t in batch:
            t.join(120)
    if errors:
        raise errors[0]
    return results


def plant_repo(emu, repo="r", workspace=0, parent=None):
    """Make a repo's folders directly in the emulator; {kind: folder entry}."""
    root = emu.add_folder(repo, parent, workspace)
    folders = {"": root}
    for kind in ("data", "index", "keys", "locks", "snapshots"):
        folders[kind] = emu.add_folder(kind, root["id"], workspace)
    return folders


def no_bad_names(emu):
    """No duplicate names anywhere and no auto-renamed copies ("x (1)")."""
    assert emu.duplicates() == []
    assert not [e["name"] for e in emu.live() if " (" in e["name"]]


# -- the basics, through both front doors ------------------------------------------------


@pytest.mark.parametrize("door", ["builtin", "wsgi"])
def test_repository_round_trip(drime, emulator, door):
    srv = drime(door=door)
    srv.create_repo("r")
    assert sorted(emulator.files_under("r")) == []
    assert {e["name"] for e in emulator.children(emulator.find_one("r")["id"])} == {
        "data", "index", "keys", "locks", "snapshots"}

    config = b"config bytes"
    assert put_config(srv, config).status == 200
    key = upload(srv, "keys", b"a key")
    pack = upload(srv, "data", os.urandom(50000))
    assert emulator.files_under("r") == {"config": 12, "keys/" + key: 5,
                                         f"data/{pack[:2]}/{pack}": 50000}

    assert get(srv, "/r/config").body == config
    r = srv.request("HEAD", f"/r/data/{pack}")
    assert r.status == 200 and r.header("Content-Length") == "50000"
    assert list_v2(srv, "/r/keys/") == {key: 5}
    assert list_v2(srv, "/r/data/") == {pack: 50000}
    r = srv.request("GET", "/r/keys/")
    assert json.loads(r.body) == [key]

    assert srv.upload("r", "keys", b"a key").status == 403  # exists (rest-server parity)
    assert srv.request("DELETE", f"/r/keys/{key}").status == 200
    assert srv.request("HEAD", f"/r/keys/{key}").status == 404
    assert srv.request("DELETE", f"/r/keys/{key}").status == 200  # gone: still fine
    assert srv.request("GET", "/nope/config").status == 404
    assert srv.request("GET", "/r/index/" + "0" * 64).status == 404
    assert srv.upload("nope", "keys", b"x").status == 404
    assert emulator.files_under("r") == {"config": 12, f"data/{pack[:2]}/{pack}": 50000}
    no_bad_names(emulator)


# -- defect 1 and 8: complete, cheap listings ----------------------------------------------


def test_listings_are_complete_past_the_page_size(drime, emulator):
    folders = plant_repo(emulator)
    names = {}
    for i in range(1500):
        body = f"index {i}".encode()
        names[object_id(body)] = len(body)
        emulator.add_file(object_id(body), body, folders["index"]["id"])
    srv = drime()
    listed = list_v2(srv, "/r/index/")
    assert listed == names  # 15 pages of 100 (the original stopped at one page of 1000)
    late = sorted(names)[1400]
    emulator.reset_counts()
    r = srv.request("HEAD", f"/r/index/{late}")
    assert r.status == 200 and int(r.header("Content-Length")) == names[late]
    assert emulator.api_calls() == 0  # HEAD after a listing costs nothing
    emulator.reset_counts()
    assert len(list_v2(srv, "/r/index/")) == 1500
    assert emulator.api_calls() == 15


def test_listing_data_is_cheap(drime, emulator):
    folders = plant_repo(emulator)
    subs = {f"{i:02x}": emulator.add_folder(f"{i:02x}", folders["data"]["id"])["id"]
            for i in range(256)}
    packs = {}
    rnd = random.Random(3)
    for i in range(1200):
        body = rnd.randbytes(64)
        name = object_id(body)
        packs[name] = 64
        emulator.add_file(name, body, subs[name[:2]])
    srv = drime()
    srv.request("HEAD", "/r/config")  # warm up the repository folder
    emulator.reset_counts()
    assert list_v2(srv, "/r/data/") == packs
    first = emulator.api_calls()
    # data folder (256 entries: 3 pages) + one-time probe of several parentIds
    # (repo + data: 3 pages) + every data/xx at once (12 pages); the original: 257
    assert first <= 3 + 3 + 12, emulator.counts()
    emulator.reset_counts()
    assert list_v2(srv, "/r/data/") == packs
    assert emulator.api_calls() == 3 + 12, emulator.counts()
    emulator.reset_counts()
    some = sorted(packs)[::97]
    for name in some:
        assert srv.request("HEAD", f"/r/data/{name}").status == 200
    assert emulator.api_calls() == 0


def test_listing_without_several_parent_ids(drime):
    """A service that honours only one parentId: found by the probe, then one
    listing per data/xx folder; nothing missing."""
    emu = DrimeEmulator(max_per_page=PAGE, multi_parent=False).start()
    try:
        folders = plant_repo(emu)
        packs = {}
        for prefix in ("00", "7f", "a1", "ff"):
            sub = emu.add_folder(prefix, folders["data"]["id"])
            for seed in range(3):
                body = body_with_prefix(prefix, 100, seed)
                packs[object_id(body)] = 100
                emu.add_file(object_id(body), body, sub["id"])
        srv = drime(emu=emu)
        assert list_v2(srv, "/r/data/") == packs
        assert "does not honour several parentIds" in srv.stderr
        emu.reset_counts()
        assert list_v2(srv, "/r/data/") == packs
        assert emu.api_calls() == 1 + 4
    finally:
        emu.stop()


# -- defect 2: concurrent first writes -------------------------------------------------------


def test_concurrent_first_writes_make_one_folder(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    emulator.latency = 0.02  # widen any race
    bodies = [body_with_prefix("ee", 3000, seed) for seed in range(8)]
    statuses = parallel(lambda b: srv.upload("r", "data", b).status, bodies)
    assert statuses == [200] * 8
    data = emulator.find_one("r/data")
    assert [e["name"] for e in emulator.children(data["id"])] == ["ee"]
    assert len(emulator.files_under("r/data/ee")) == 8
    for b in bodies:
        assert get(srv, f"/r/data/{object_id(b)}").body == b
    no_bad_names(emulator)
    # a new server process (empty map) sees them all too
    srv.stop()
    emulator.latency = 0
    srv2 = drime()
    for b in bodies:
        assert get(srv2, f"/r/data/{object_id(b)}").body == b
    assert len(list_v2(srv2, "/r/data/")) == 8


def test_concurrent_uploads_of_one_object(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    emulator.latency = 0.01
    body = os.urandom(20000)
    statuses = parallel(lambda _: srv.upload("r", "data", body).status, range(6))
    assert 200 in statuses and set(statuses) <= {200, 403}, statuses
    name = object_id(body)
    assert emulator.files_under("r/data") == {f"{name[:2]}/{name}": 20000}
    # and many different objects at once, 8 at a time like a busy restic
    bodies = [os.urandom(5000 + i) for i in range(24)]
    assert parallel(lambda b: srv.upload("r", "data", b).status, bodies) == [200] * 24
    assert len(emulator.files_under("r/data")) == 25
    no_bad_names(emulator)


# -- defect 3: duplicates ---------------------------------------------------------------


def test_resave_makes_no_duplicate(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    assert put_config(srv, b"one").status == 200
    assert put_config(srv, b"two!").status == 403
    assert srv.upload("r", "keys", b"k1").status == 200
    assert srv.upload("r", "keys", b"k1").status == 403
    assert get(srv, "/r/config").body == b"one"
    no_bad_names(emulator)
    assert len(emulator.files_under("r")) == 2


def test_legacy_duplicates_are_resolved(drime, emulator):
    """Repos written by the original backend can hold two entries for one name
    and two folders for one data/xx: the newest entry wins, folders are merged."""
    folders = plant_repo(emulator)
    key = b"newer, 20 bytes....."
    name = object_id(key)
    emulator.add_file(name, key[:10], folders["keys"]["id"])  # an old partial copy
    emulator.add_file(name, key, folders["keys"]["id"])
    a = emulator.add_folder("ee", folders["data"]["id"])
    b = emulator.add_folder("ee", folders["data"]["id"])
    p1, p2 = body_with_prefix("ee", 500, 1), body_with_prefix("ee", 500, 2)
    emulator.add_file(object_id(p1), p1, a["id"])
    emulator.add_file(object_id(p2), p2, b["id"])
    srv = drime()
    assert get(srv, f"/r/keys/{name}").body == key
    assert list_v2(srv, "/r/keys/") == {name: 20}
    assert get(srv, f"/r/data/{object_id(p1)}").body == p1
    assert get(srv, f"/r/data/{object_id(p2)}").body == p2
    assert list_v2(srv, "/r/data/") == {object_id(p1): 500, object_id(p2): 500}
    assert srv.request("DELETE", f"/r/keys/{name}").status == 200
    assert emulator.find(f"r/keys/{name}") == []  # both copies removed
    assert "entries named" in srv.stderr


def test_renaming_service_is_detected(drime):
    """With a service that renames on a name clash ("x (1)"), an object written
    elsewhere meanwhile is found: our renamed copy is removed and the existing
    entry (same name, same size, named by its content) is the object."""
    emu = DrimeEmulator(max_per_page=PAGE, duplicate_policy="rename").start()
    try:
        srv = drime(emu=emu)
        srv.create_repo("r")
        upload(srv, "keys", b"first")
        body = b"written by someone else"
        emu.add_file(object_id(body), body, emu.find_one("r/keys")["id"])
        assert srv.upload("r", "keys", body).status == 200
        no_bad_names(emu)
        assert get(srv, f"/r/keys/{object_id(body)}").body == body
        # config is not content-addressed: a clash there is "exists"
        emu.add_file("config", b"their config", emu.find_one("r")["id"])
        assert put_config(srv, b"our config!!").status == 403
        no_bad_names(emu)
        assert emu.blob(emu.find_one("r/config")["id"]) == b"their config"
    finally:
        emu.stop()


# -- defect 4: honest errors ---------------------------------------------------------------------


def test_transient_errors_are_retried(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    emulator.add_fault(status=429, every=3, retry_after="0")
    emulator.add_fault(status=502, every=5, endpoints={"GET /file-entries/download",
                                                        "GET /drive/file-entries"})
    emulator.add_fault(mode="drop", every=7)
    bodies = [os.urandom(3000 + i) for i in range(12)]
    for b in bodies:
        upload(srv, "data", b)
        upload(srv, "snapshots", b)
    for b in bodies:
        assert get(srv, f"/r/data/{object_id(b)}").body == b
        assert get(srv, f"/r/snapshots/{object_id(b)}").body == b
    assert len(list_v2(srv, "/r/data/")) == 12
    for b in bodies[:6]:
        assert srv.request("DELETE", f"/r/snapshots/{object_id(b)}").status == 200
    assert len(list_v2(srv, "/r/snapshots/")) == 6
    assert sum(f.fired for f in emulator.faults) > 10
    no_bad_names(emulator)
    assert len(emulator.files_under("r")) == 18


def test_retry_after_is_honoured(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    emulator.add_fault(status=429, times=1, retry_after="1", endpoints={"POST /uploads"})
    start = time.monotonic()
    upload(srv, "keys", b"patience")
    assert time.monotonic() - start >= 1.0
    assert emulator.api_calls("POST /uploads") == 2


def test_persistent_errors_are_never_404(drime, emulator):
    folders = plant_repo(emulator)
    body = os.urandom(4000)
    sub = emulator.add_folder(object_id(body)[:2], folders["data"]["id"])
    emulator.add_file(object_id(body), body, sub["id"])
    emulator.add_file("config", b"cfg", emulator.find_one("r")["id"])
    srv = drime("--drime-retries", "2")
    # a cold server cannot list: 500, never "does not exist"
    emulator.add_fault(status=429, every=1, retry_after="0",
                       endpoints={"GET /drive/file-entries"})
    for method, path in (("HEAD", "/r/config"), ("GET", "/r/config"),
                         ("GET", f"/r/data/{object_id(body)}"), ("GET", "/r/keys/")):
        assert srv.request(method, path).status == 500, (method, path)
    emulator.clear_faults()
    assert get(srv, "/r/config").body == b"cfg"
    assert srv.request("HEAD", f"/r/data/{object_id(body)}").status == 200
    # downloads keep failing: the GET fails (500 or a cut response), never 404
    emulator.add_fault(status=503, every=1, endpoints={"GET /file-entries/download"})
    for path in ("/r/config", f"/r/data/{object_id(body)}"):
        try:
            r = get(srv, path)
        except Exception:  # the response was cut: fine, restic retries
            continue
        assert r.status != 404 and r.body != body, r
    # uploads keep failing: 500, and nothing half-written stays behind
    emulator.add_fault(status=500, every=1, endpoints={"POST /uploads"})
    assert srv.upload("r", "keys", b"nope").status == 500
    emulator.clear_faults()
    assert emulator.find("r/keys")[0] and emulator.files_under("r/keys") == {}
    # a garbled answer (an HTML page with 200) is an error too, not "empty"
    emulator.add_fault(mode="html", every=1, endpoints={"GET /drive/file-entries"})
    assert srv.request("GET", "/r/keys/").status == 500


def test_corrupt_download_is_not_served(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    body = os.urandom(100000)
    name = upload(srv, "data", body)
    entry = emulator.find_one(f"r/data/{name[:2]}/{name}")
    with open(emulator.blobs[entry["id"]], "r+b") as f:
        f.seek(5000)
        f.write(b"\0" * 10)
    try:
        r = get(srv, f"/r/data/{name}")
    except Exception:
        r = None  # the connection was cut at the end: restic sees an error
    assert r is None or r.body != body[:5000] + b"\0" * 10 + body[5010:]


# -- defects 5 and 6: streaming, bounded memory, private temp files ------------------------


def test_uploads_spool_to_a_private_temp_dir(drime, emulator, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    os.symlink(victim, spool / "config")  # the original wrote $TMP/config
    body = os.urandom(300000)
    os.symlink(victim, spool / object_id(body))
    srv = drime("--drime-spool-dir", str(spool))
    srv.create_repo("r")
    emulator.latency = 0.3
    seen = []

    def watch():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            for d in spool.iterdir():
                if d.is_dir() and not d.is_symlink():
                    files = list(d.iterdir())
                    if files:
                        seen.append((d, d.stat().st_mode & 0o777,
                                     [(f.name, f.stat().st_mode & 0o777) for f in files]))
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    t.start()
    assert srv.upload("r", "data", body).status == 200
    t.join()
    assert put_config(srv, b"cfg").status == 200
    emulator.latency = 0
    assert victim.read_bytes() == b"untouched"
    assert seen, "no spool folder seen during the upload"
    folder, mode, files = seen[0]
    assert mode == 0o700 and files == [(object_id(body), 0o600)]
    assert folder.name.startswith(f"pyrestserver-drime-{srv.pid}-")
    assert len(folder.name) > len(f"pyrestserver-drime-{srv.pid}-") + 6  # random part
    assert sorted(p.name for p in spool.iterdir()) == sorted(["config", object_id(body)])
    assert get(srv, f"/r/data/{object_id(body)}").body == body


def _peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_upload_memory_is_bounded(drime, emulator):
    srv = drime("--drime-multipart-threshold", "16M", "--drime-part-size", "4M")
    srv.create_repo("r")
    upload(srv, "keys", b"warm up")
    get(srv, "/r/keys/")
    before = _peak_rss_kib(srv.pid)
    small = os.urandom(12 * 1024 * 1024)  # simple upload
    big = os.urandom(40 * 1024 * 1024)  # multipart, 4 MiB parts
    upload(srv, "data", small)
    upload(srv, "data", big)
    assert get(srv, f"/r/data/{object_id(big)}").body == big
    grown = (_peak_rss_kib(srv.pid) - before) / 1024
    assert grown < 16, f"peak memory grew by {grown:.1f} MiB for 12 + 40 MiB objects"
    assert emulator.api_calls("POST /s3/multipart/create") == 1
    assert emulator.api_calls("PUT /_s3") == 10


def test_ranged_get_downloads_only_the_range(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    body = os.urandom(3 * 1024 * 1024)
    name = upload(srv, "data", body)
    emulator.reset_counts()
    r = get(srv, f"/r/data/{name}", headers={"Range": "bytes=1000000-1000999"})
    assert r.status == 206 and r.body == body[1000000:1001000]
    assert emulator.served == [(emulator.find_one(f"r/data/{name[:2]}/{name}")["id"], 206, 1000)]
    assert emulator.api_calls() == 1  # the download, no listing
    r = get(srv, f"/r/data/{name}", headers={"Range": "bytes=3145000-"})
    assert r.status == 206 and r.body == body[3145000:]


@pytest.mark.parametrize("redirect,honour", [(True, True), (False, False), (True, False)],
                         ids=["redirect", "no-range", "redirect-no-range"])
def test_ranged_get_fallbacks(drime, redirect, honour):
    emu = DrimeEmulator(max_per_page=PAGE, redirect_downloads=redirect,
                        honour_range=honour).start()
    try:
        srv = drime(emu=emu)
        srv.create_repo("r")
        body = os.urandom(600000)
        name = upload(srv, "data", body)
        for start, end in ((0, 99), (123456, 234567), (599990, 599999)):
            r = get(srv, f"/r/data/{name}", headers={"Range": f"bytes={start}-{end}"})
            assert r.status == 206 and r.body == body[start:end + 1]
        assert get(srv, f"/r/data/{name}").body == body
        # a download cut short is resumed where it stopped
        target = "GET /_blob" if redirect else "GET /file-entries/download"
        emu.add_fault(mode="truncate", times=2, endpoints={target})
        assert get(srv, f"/r/data/{name}").body == body
        if not honour:
            assert "ignored a Range header" in srv.stderr
    finally:
        emu.stop()


# -- defect 7: append-only ---------------------------------------------------------------------


def test_append_only_allows_backups(drime, emulator):
    srv = drime("--append-only")
    srv.create_repo("r")
    assert put_config(srv, b"cfg").status == 200
    name = upload(srv, "data", b"pack")
    lock = upload(srv, "locks", b"lock")
    assert srv.request("DELETE", f"/r/data/{name}").status == 403
    assert srv.request("DELETE", f"/r/locks/{lock}").status == 200
    assert sorted(emulator.files_under("r")) == ["config", f"data/{name[:2]}/{name}"]


# -- uploads are confirmed; retries never duplicate ------------------------------------------


def test_lost_responses_make_no_duplicates(drime, emulator):
    srv = drime()
    emulator.add_fault(status=500, mode="after", every=2,
                       endpoints={"POST /folders", "POST /uploads", "POST /file-entries/delete"})
    srv.create_repo("r")
    bodies = [os.urandom(1000 + i) for i in range(10)]
    for b in bodies:
        upload(srv, "data", b)
        upload(srv, "index", b)
    for b in bodies[:5]:
        assert srv.request("DELETE", f"/r/index/{object_id(b)}").status == 200
    no_bad_names(emulator)
    files = emulator.files_under("r")
    assert len(files) == 15
    assert {n for n in files if n.startswith("index/")} == {
        f"index/{object_id(b)}" for b in bodies[5:]}
    assert sum(f.fired for f in emulator.faults) >= 10


def test_short_upload_is_redone(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    emulator.add_fault(mode="short", times=1, endpoints={"POST /uploads"})
    body = os.urandom(10000)
    name = upload(srv, "snapshots", body)
    assert emulator.files_under("r/snapshots") == {name: 10000}
    assert get(srv, f"/r/snapshots/{name}").body == body
    assert emulator.api_calls("POST /file-entries/delete") == 1


def test_multipart_upload_with_faults(drime, emulator):
    srv = drime("--drime-multipart-threshold", "1M", "--drime-part-size", "1M")
    srv.create_repo("r")
    emulator.add_fault(status=500, times=1, endpoints={"PUT /_s3"})
    emulator.add_fault(status=500, mode="after", times=1, endpoints={"POST /s3/entries"})
    body = os.urandom(3 * 1024 * 1024 + 123)
    name = upload(srv, "data", body)
    assert emulator.files_under("r/data") == {f"{name[:2]}/{name}": len(body)}
    assert get(srv, f"/r/data/{name}").body == body
    no_bad_names(emulator)


def test_concurrent_multipart_uploads_with_few_slots(drime, emulator):
    """More multipart uploads at once than --drime-connections: no deadlock."""
    srv = drime("--drime-connections", "2", "--drime-multipart-threshold", "1M",
                "--drime-part-size", "1M")
    srv.create_repo("r")
    bodies = [os.urandom(2 * 1024 * 1024 + i) for i in range(5)]
    assert parallel(lambda b: srv.upload("r", "data", b).status, bodies) == [200] * 5
    assert len(emulator.files_under("r/data")) == 5
    no_bad_names(emulator)


def test_folder_deleted_elsewhere_is_recreated(drime, emulator):
    srv = drime()
    srv.create_repo("r")
    upload(srv, "keys", b"k1")
    emulator.delete(emulator.find_one("r/keys")["id"], forever=True)
    k2 = upload(srv, "keys", b"k2")
    assert emulator.files_under("r/keys") == {k2: 2}
    emulator.delete(emulator.find_one("r/keys")["id"], forever=False)  # to the trash
    k3 = upload(srv, "keys", b"k3")
    assert emulator.files_under("r/keys") == {k3: 2}
    assert list_v2(srv, "/r/keys/") == {k3: 2}
    no_bad_names(emulator)


# -- configuration ---------------------------------------------------------------------------------


def test_root_folder_and_workspace(drime, emulator):
    srv = drime("--drime-root-folder", "backups/restic", workspace="7")
    srv.create_repo("alice/work")
    upload(srv, "keys", b"k", repo="alice/work")
    assert emulator.live(workspace_id=0) == []
    assert emulator.files_under("backups/restic/alice/work", workspace_id=7) == {
        "keys/" + object_id(b"k"): 1}
    assert list_v2(srv, "/alice/work/keys/") == {object_id(b"k"): 1}


def test_root_parent_id_zero(drime):
    """Some answers give parent_id 0 instead of null for the workspace root."""
    emu = DrimeEmulator(max_per_page=PAGE, root_parent_id=0).start()
    try:
        srv = drime(emu=emu)
        srv.create_repo("r")
        name = upload(srv, "keys", b"k")
        srv.stop()
        srv2 = drime(emu=emu)
        assert get(srv2, f"/r/keys/{name}").body == b"k"
        srv2.create_repo("r")
        no_bad_names(emu)
    finally:
        emu.stop()


def test_api_key_configuration(emulator, tmp_path, start_server):
    base = {"DRIME_API_URL": emulator.url, "HOME": str(tmp_path), "DRIME_API_KEY": ""}
    args = ["--no-auth", "--backend", "drime", "--listen", "127.0.0.1:0",
            "--path", str(tmp_path / "data")]
    p = run_server(args, base, tmp_path)
    assert p.returncode == 1 and "DRIME_API_KEY" in p.stderr, p.stderr
    # the original README's username/password login never worked: not supported
    p = run_server(args, dict(base, DRIME_USERNAME="u", DRIME_PASSWORD="p"), tmp_path)
    assert p.returncode == 1 and "not supported" in p.stderr, p.stderr
    p = run_server(args, dict(base, DRIME_API_KEY="wrong"), tmp_path)
    assert p.returncode == 1 and "rejected" in p.stderr, p.stderr
    # the server's working directory is tmp_path: a .env there is not read
    # (pydrime would load it into the environment, and httpx honours proxies)
    (tmp_path / ".env").write_text("HTTP_PROXY=http://127.0.0.1:9\n"
                                   "ALL_PROXY=http://127.0.0.1:9\n"
                                   "DRIME_API_KEY=from-dotenv\n")
    p = run_server(args, base, tmp_path)
    assert p.returncode == 1 and "DRIME_API_KEY" in p.stderr, p.stderr
    # a key file keeps the key out of `ps`
    key_file = tmp_path / "drime.key"
    key_file.write_text(emulator.api_key + "\n")
    key_file.chmod(0o600)
    srv = start_server("--no-auth", "--backend", "drime", "--drime-api-key-file",
                       str(key_file), *FAST, env=base)
    with open(f"/proc/{srv.pid}/cmdline", "rb") as f:
        assert emulator.api_key.encode() not in f.read()
    srv.create_repo("r")  # through the emulator, not the proxy named in .env
    assert emulator.find("r")
    assert "cannot reach" not in srv.stderr


def test_quota_scan_and_health(drime, emulator):
    """--max-size scans the repositories at startup (and answers 507 when full);
    /health asks Drime whether the key works."""
    folders = plant_repo(emulator)
    emulator.add_file("config", b"c" * 1000, folders[""]["id"])
    for i in range(3):
        body = os.urandom(30000)
        sub = emulator.add_folder(object_id(body)[:2], folders["data"]["id"])
        emulator.add_file(object_id(body), body, sub["id"])
    srv = drime("--max-size", "100000")
    assert "currently using" in srv.stderr
    assert srv.upload("r", "data", os.urandom(5000)).status == 200
    assert srv.upload("r", "data", os.urandom(20000)).status == 507
    emulator.reset_counts()
    assert srv.request("GET", "/health").status == 200
    assert srv.request("GET", "/health").status == 200
    assert emulator.counts() == {"GET /cli/loggedUser": 1}  # cached for 30 s


# -- API-call budgets ----------------------------------------------------------------------------------


def test_api_call_budgets(drime, emulator):
    srv = drime()
    emulator.reset_counts()
    srv.create_repo("r")
    # list the workspace root (cold), then create r and its 5 folders
    assert emulator.api_calls() == 1 + 6, emulator.counts()
    emulator.reset_counts()
    srv.create_repo("r")  # exists: nothing to do
    assert emulator.api_calls() == 0

    def cost(fn):
        emulator.reset_counts()
        fn()
        return emulator.api_calls()

    pack = body_with_prefix("3c", 5000)
    assert cost(lambda: upload(srv, "data", pack)) == 2  # new data/3c folder + upload
    pack2 = body_with_prefix("3c", 5000, 1)
    assert cost(lambda: upload(srv, "data", pack2)) == 1
    assert cost(lambda: srv.request("HEAD", f"/r/data/{object_id(pack)}")) == 0
    assert cost(lambda: get(srv, f"/r/data/{object_id(pack)}")) == 1
    assert cost(lambda: get(srv, f"/r/data/{object_id(pack)}",
                            headers={"Range": "bytes=10-19"})) == 1
    assert cost(lambda: list_v2(srv, "/r/data/")) == 1 + 1  # data, then data/3c
    assert cost(lambda: srv.request("DELETE", f"/r/data/{object_id(pack)}")) == 1
    assert cost(lambda: upload(srv, "keys", b"k")) == 1
    assert cost(lambda: list_v2(srv, "/r/keys/")) == 1
    # a miss re-lists just that folder (another server may have written it)
    assert cost(lambda: srv.request("HEAD", "/r/keys/" + "1" * 64)) == 1
    other = b"written by another server"
    emulator.add_file(object_id(other), other, emulator.find_one("r/keys")["id"])
    assert get(srv, f"/r/keys/{object_id(other)}").body == other


# -- restic end to end ---------------------------------------------------------------------------


_FILTER = """#!/bin/sh
# restic 0.14 has no --no-progress (it shows no progress without a terminal)
for a do
  shift
  [ "$a" = --no-progress ] || set -- "$@" "$a"
done
exec "{restic}" "$@"
"""


@pytest.fixture
def restic_for(make_restic, restic_bin, tmp_path):
    ok = subprocess.run([restic_bin, "--no-progress", "version"], capture_output=True,
                        stdin=subprocess.DEVNULL, timeout=60).returncode == 0

    def make(url):
        r = make_restic(url)
        if not ok:
            shim = tmp_path / f"restic-filter-{uuid.uuid4().hex[:6]}"
            shim.write_text(_FILTER.replace("{restic}", restic_bin))
            shim.chmod(0o755)
            r.binary = str(shim)
        return r

    return make


def restic_workflow(restic, emulator, tmp_path, calls):
    def run(label, *args):
        emulator.reset_counts()
        p = restic.run(*args)
        calls[label] = emulator.api_calls()
        return p

    src = make_tree(tmp_path / "src", files=30, seed=5, big=3 * 1024 * 1024)
    run("init", "init")
    run("backup", "backup", str(src))
    first = tree_digest(src)
    (src / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    (src / "new.txt").write_text("second round\n")
    run("backup (2nd)", "backup", str(src))
    snaps = json.loads(run("snapshots", "snapshots", "--json").stdout)
    assert len(snaps) == 2
    target = tmp_path / "restore"
    run("restore", "restore", snaps[0]["id"], "--target", str(target))
    restored = target / str(src).lstrip("/")
    assert tree_digest(restored) == first
    assert "no errors were found" in run("check --read-data", "check", "--read-data").stdout
    run("forget --prune", "forget", "--keep-last", "1", "--prune")
    run("unlock", "unlock")
    assert "no errors were found" in run("check (after prune)", "check", "--read-data").stdout
    target2 = tmp_path / "restore2"
    run("restore (latest)", "restore", "latest", "--target", str(target2))
    assert tree_digest(target2 / str(src).lstrip("/")) == tree_digest(src)


@pytest.mark.e2e
def test_restic_end_to_end(drime, emulator, restic_for, tmp_path):
    srv = drime()
    restic = restic_for(srv.repo_url("repo"))
    calls = {}
    restic_workflow(restic, emulator, tmp_path, calls)
    no_bad_names(emulator)
    assert emulator.files_under("repo/locks") == {}
    print("API calls per restic operation:", json.dumps(calls))
    # generous ceilings; the measured numbers are in docs/drime.md
    assert calls["init"] <= 12 and calls["backup"] <= 40 and calls["snapshots"] <= 12, calls
    # every stored object is named by its content
    for path, size in emulator.files_under("repo").items():
        name = path.rsplit("/", 1)[-1]
        if name != "config":
            entry = emulator.find_one(f"repo/{path}")
            assert hashlib.sha256(emulator.blob(entry["id"])).hexdigest() == name
            assert size == len(emulator.blob(entry["id"]))


@pytest.mark.e2e
def test_restic_end_to_end_with_faults(drime, emulator, restic_for, tmp_path):
    """Faults every few calls (429 with Retry-After, 5xx after the write took
    effect, dropped connections, cut downloads), multipart uploads: nothing is
    lost, nothing is duplicated."""
    srv = drime("--drime-multipart-threshold", "1M", "--drime-part-size", "1M")
    emulator.add_fault(status=429, every=7, retry_after="0")
    emulator.add_fault(status=500, mode="after", every=5,
                       endpoints={"POST /uploads", "POST /folders", "POST /s3/entries",
                                  "POST /file-entries/delete"})
    emulator.add_fault(mode="drop", every=11)
    emulator.add_fault(mode="truncate", every=4, endpoints={"GET /file-entries/download"})
    emulator.add_fault(status=503, every=6, endpoints={"PUT /_s3"})
    emulator.latency = 0.002
    restic = restic_for(srv.repo_url("repo"))
    calls = {}
    restic_workflow(restic, emulator, tmp_path, calls)
    fired = {f"{f.mode}/{f.status}": f.fired for f in emulator.faults}
    assert all(n > 0 for n in fired.values()), fired
    no_bad_names(emulator)
    assert emulator.files_under("repo/locks") == {}


# -- the real service (opt-in) ------------------------------------------------------------------------


@pytest.mark.skipif(not LIVE_KEY, reason="set DRIME_API_KEY to probe the real Drime service")
def test_live_service_unknowns(tmp_path):
    """Probes what the emulator can only assume about the real service and prints
    the answers: page-size cap, several parentIds, Range on downloads, the
    duplicate-name policy of /uploads.  Works in a scratch folder that it deletes."""
    import pyrestserver_drime as backend

    pd = backend.import_pydrime()
    import httpx

    url = os.environ.get("DRIME_API_URL") or backend.DEFAULT_API_URL
    workspace = int(os.environ.get("DRIME_WORKSPACE_ID") or 0)
    client = pd.DrimeClient(api_key=LIVE_KEY, api_url=url, max_retries=3)
    found = {}
    scratch = client.create_folder(f"pyrestserver-probe-{uuid.uuid4().hex[:8]}",
                                   workspace_id=workspace)["folder"]
    try:
        sub_a = client.create_folder("a", parent_id=scratch["id"], workspace_id=workspace)
        sub_b = client.create_folder("b", parent_id=scratch["id"], workspace_id=workspace)
        ids = [sub_a["folder"]["id"], sub_b["folder"]["id"]]
        http = client._get_client()

        def put(name, data, parent):
            r = http.post(f"{url}/uploads", files={"file": (name, data,
                                                            "application/octet-stream")},
                          data={"relativePath": name, "workspaceId": str(workspace),
                                "parentId": str(parent)})
            r.raise_for_status()
            return r.json()["fileEntry"]

        first = put("x", b"0123456789" * 100, ids[0])
        second = put("x", b"abc", ids[0])
        found["duplicate name on /uploads"] = second["name"]
        put("y", b"y", ids[1])
        both = client.get_file_entries(parent_ids=ids, per_page=100, workspace_id=workspace)
        found["several parentIds"] = sorted({e["parent_id"] for e in both["data"]}) == ids
        big = client.get_file_entries(parent_ids=[ids[0]], per_page=100000,
                                      workspace_id=workspace)
        found["perPage honoured up to"] = big.get("per_page")
        r = http.get(f"{url}/file-entries/download/{pd.calculate_drime_hash(first['id'])}",
                     headers={"Range": "bytes=10-19"})
        found["Range"] = (r.status_code, r.headers.get("Content-Range"), len(r.content))
        assert isinstance(httpx.__version__, str)
    finally:
        client.delete_file_entries([scratch["id"]], delete_forever=True,
                                   workspace_id=workspace)
    print("live Drime service:", json.dumps(found))
    (tmp_path / "live-drime.json").write_text(json.dumps(found))
