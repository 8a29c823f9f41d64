"""Prometheus metrics: `--prometheus` and `--prometheus-no-auth`.

`/metrics` is parsed with prometheus_client's own text-format parser, and the
values are checked exactly after known operations.  What is specified:

* rest-server's six counters, with its names, help texts and `user`, `repo`,
  `type` labels, and its counting rules (behaviour reference §5): a write counts
  when an upload succeeded; a read counts for every GET of an existing object
  whatever the outcome (200, 206, 416), adding the body bytes sent; a delete
  counts when a file was removed; config, HEAD, list and failed requests never
  count;
* `restic_upload_verification_failures_total` for uploads whose content does
  not match their name;
* HTTP requests by method and status code;
* per repository: size in bytes, number of snapshots and the upload time of
  the newest snapshot, kept current by writes and deletes and rebuilt by the
  startup scan;
* the standard `process_*` metrics;
* who may read `/metrics` (§4.2 and §5, conformance test 62).
"""

import base64
import hashlib
import os
import shutil
import subprocess
import time

import pytest

from conftest import object_id

parser = pytest.importorskip("prometheus_client.parser")

PROM = ("--prometheus", "--prometheus-no-auth")
BLOB_HELP = {
    "rest_server_blob_write_total": "Total number of blobs written",
    "rest_server_blob_write_bytes_total": "Total number of bytes written to blobs",
    "rest_server_blob_read_total": "Total number of blobs read",
    "rest_server_blob_read_bytes_total": "Total number of bytes read from blobs",
    "rest_server_blob_delete_total": "Total number of blobs deleted",
    "rest_server_blob_delete_bytes_total": "Total number of bytes of blobs deleted",
}
HTTP_REQUESTS = "pyrestserver_http_requests_total"
VERIFY_FAILURES = "restic_upload_verification_failures_total"


# -- helpers ------------------------------------------------------------------


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text):
        self.text = text
        self.families = {}
        self.samples = {}
        for family in parser.text_string_to_metric_families(text):
            self.families[family.name] = family
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                assert key not in self.samples, f"duplicate sample {key}"
                self.samples[key] = s.value

    def value(self, name, **labels):
        """The sample's value, or None when the series does not exist."""
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, prefix):
        return {k: v for k, v in self.samples.items() if k[0].startswith(prefix)}


def scrape(srv, auth=None):
    r = srv.request("GET", "/metrics", auth=auth)
    assert r.status == 200, r
    content_type = r.header("Content-Type") or ""
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    return Scrape(r.body.decode("utf-8"))


def blob_values(s, user="", repo="", kind="data"):
    labels = {"user": user, "repo": repo, "type": kind}
    return {name: s.value(name, **labels) for name in BLOB_HELP}


def expected(writes=None, wbytes=None, reads=None, rbytes=None, deletes=None, dbytes=None):
    """Counter values; None = the series does not exist (never incremented)."""
    return dict(zip(BLOB_HELP, (writes, wbytes, reads, rbytes, deletes, dbytes)))


def sha_htpasswd(path, users):
    """An htpasswd file with {SHA} entries, made by Apache's htpasswd when it is
    installed (as in CI), else written the same way by hand."""
    lines = []
    tool = shutil.which("htpasswd")
    for user, password in users.items():
        if tool:
            p = subprocess.run([tool, "-nbs", user, password], capture_output=True, text=True,
                               check=True, stdin=subprocess.DEVNULL)
            lines.append(p.stdout.strip())
        else:
            digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
            lines.append(f"{user}:{{SHA}}{digest}")
    path.write_text("\n".join(lines) + "\n")
    return path


def repo_disk_usage(repo_dir):
    """Bytes of config and object files on disk (what restic stored)."""
    total = 0
    for dirpath, _dirs, files in os.walk(repo_dir):
        for f in files:
            if not f.startswith("."):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


# -- rest-server's counters -------------------------------------------------------


def test_counter_families_exist_with_rest_server_names_and_help(start_server):
    srv = start_server("--no-auth", *PROM)
    s = scrape(srv)
    for name, help_text in BLOB_HELP.items():
        family = s.families[name[: -len("_total")]]
        assert family.type == "counter", name
        assert family.documentation == help_text, name
        assert family.samples == [], "series appear on first use only"
    assert s.families[VERIFY_FAILURES[: -len("_total")]].type == "counter"
    assert s.families[HTTP_REQUESTS[: -len("_total")]].type == "counter"


def test_write_read_delete_counts_and_bytes(start_server, door):
    """Conformance test 66, for every object type, in a nested repo `a/b`."""
    srv = start_server("--no-auth", *PROM, door=door)
    srv.create_repo("a/b")
    bodies = {kind: os.urandom(32 + 7 * i) for i, kind in
              enumerate(("data", "index", "keys", "locks", "snapshots"))}
    for kind, body in bodies.items():
        assert srv.upload("a/b", kind, body).status == 200
    s1 = scrape(srv)
    for kind, body in bodies.items():
        assert blob_values(s1, repo="a/b", kind=kind) == expected(1, len(body)), kind

    for kind, body in bodies.items():
        r = srv.request("GET", f"/a/b/{kind}/{object_id(body)}")
        assert (r.status, r.body) == (200, body)
        assert srv.request("DELETE", f"/a/b/{kind}/{object_id(body)}").status == 200
    s2 = scrape(srv)
    for kind, body in bodies.items():
        n = len(body)
        assert blob_values(s2, repo="a/b", kind=kind) == expected(1, n, 1, n, 1, n), kind
    # the exact exposition line of rest-server's example
    assert 'rest_server_blob_write_total{repo="a/b",type="data",user=""} 1' in s2.text


def test_config_head_list_and_failures_do_not_count(start_server):
    srv = start_server("--no-auth", *PROM)
    srv.create_repo("r")
    body = os.urandom(100)
    assert srv.upload("r", "data", body).status == 200
    before = scrape(srv).series("rest_server_")

    assert srv.request("POST", "/r/config", body=b"config bytes").status == 200
    assert srv.request("GET", "/r/config").status == 200
    assert srv.request("HEAD", "/r/config").status == 200
    assert srv.request("DELETE", "/r/config").status == 200
    assert srv.request("HEAD", f"/r/data/{object_id(body)}").status == 200
    assert srv.request("GET", "/r/data/").status == 200
    assert srv.request("GET", "/r/data/", headers={"Accept": "application/vnd.x.restic.rest.v2"}
                       ).status == 200
    missing = object_id(b"never uploaded")
    assert srv.request("GET", f"/r/data/{missing}").status == 404
    assert srv.request("DELETE", f"/r/data/{missing}").status == 200  # nothing removed
    assert srv.upload("r", "data", body).status == 403  # exists
    assert srv.upload("r", "keys", b"x", name=object_id(b"y")).status == 400  # bad hash
    assert srv.request("POST", "/r/data/not-an-id", body=b"x").status in (400, 404)

    assert scrape(srv).series("rest_server_") == before


def test_ranged_and_unsatisfiable_reads_count_like_rest_server(start_server):
    """A GET of an existing object counts whatever its outcome; the bytes are
    those of the body sent, including the text of a 416 answer."""
    srv = start_server("--no-auth", *PROM)
    srv.create_repo("r")
    body = os.urandom(1000)
    oid = object_id(body)
    assert srv.upload("r", "data", body).status == 200

    r = srv.request("GET", f"/r/data/{oid}", headers={"Range": "bytes=2-5"})
    assert (r.status, r.body) == (206, body[2:6])
    s = scrape(srv)
    assert s.value("rest_server_blob_read_total", user="", repo="r", type="data") == 1
    assert s.value("rest_server_blob_read_bytes_total", user="", repo="r", type="data") == 4

    r416 = srv.request("GET", f"/r/data/{oid}", headers={"Range": "bytes=5000-6000"})
    assert r416.status == 416
    s = scrape(srv)
    assert s.value("rest_server_blob_read_total", user="", repo="r", type="data") == 2
    assert (s.value("rest_server_blob_read_bytes_total", user="", repo="r", type="data")
            == 4 + len(r416.body))

    r = srv.request("GET", f"/r/data/{oid}")
    assert r.status == 200
    s = scrape(srv)
    assert s.value("rest_server_blob_read_total", user="", repo="r", type="data") == 3
    assert (s.value("rest_server_blob_read_bytes_total", user="", repo="r", type="data")
            == 4 + len(r416.body) + 1000)


def test_upload_verification_failures_are_counted(start_server):
    srv = start_server("--no-auth", *PROM)
    srv.create_repo("r")
    good = os.urandom(64)
    for kind in ("data", "snapshots", "data"):
        r = srv.upload("r", kind, good + b"tampered", name=object_id(good))
        assert r.status == 400
    s = scrape(srv)
    assert s.value(VERIFY_FAILURES, user="", repo="r", type="data") == 2
    assert s.value(VERIFY_FAILURES, user="", repo="r", type="snapshots") == 1
    assert s.value(VERIFY_FAILURES, user="", repo="r", type="keys") is None
    assert s.series("rest_server_blob_write") == {}
    assert srv.upload("r", "data", good).status == 200
    s = scrape(srv)
    assert s.value(VERIFY_FAILURES, user="", repo="r", type="data") == 2


def test_append_only_refusals_are_not_counted_as_deletes(start_server):
    srv = start_server("--no-auth", "--append-only", *PROM)
    srv.create_repo("r")
    data, lock = os.urandom(50), os.urandom(20)
    assert srv.upload("r", "data", data).status == 200
    assert srv.upload("r", "locks", lock).status == 200
    assert srv.request("DELETE", f"/r/data/{object_id(data)}").status == 403
    assert srv.request("DELETE", f"/r/locks/{object_id(lock)}").status == 200
    s = scrape(srv)
    assert blob_values(s, repo="r", kind="data") == expected(1, 50)
    assert blob_values(s, repo="r", kind="locks") == expected(1, 20, deletes=1, dbytes=20)


def test_user_label_is_the_authenticated_user(start_server, tmp_path):
    users = {"alice": "alice-pw", "bob": "bob-pw"}
    htpasswd = sha_htpasswd(tmp_path / "htpasswd", users)
    srv = start_server("--htpasswd-file", str(htpasswd), "--prometheus", "--prometheus-no-auth")
    alice, bob = ("alice", "alice-pw"), ("bob", "bob-pw")
    srv.create_repo("shared", auth=alice)
    a, b = os.urandom(10), os.urandom(11)
    assert srv.upload("shared", "data", a, auth=alice).status == 200
    assert srv.upload("shared", "data", b, auth=bob).status == 200
    assert srv.request("GET", f"/shared/data/{object_id(a)}", auth=bob).status == 200
    s = scrape(srv)
    assert blob_values(s, user="alice", repo="shared") == expected(1, 10)
    assert blob_values(s, user="bob", repo="shared") == expected(1, 11, 1, 10)


# -- HTTP requests and process metrics ---------------------------------------------


def test_http_requests_by_method_and_status(start_server):
    srv = start_server("--no-auth", *PROM)
    s0 = scrape(srv)

    def count(s, method, code):
        return s.value(HTTP_REQUESTS, method=method, code=str(code)) or 0

    srv.create_repo("r")                                   # POST 200
    body = os.urandom(10)
    srv.upload("r", "data", body)                          # POST 200
    srv.upload("r", "data", body)                          # POST 403
    for _ in range(3):
        srv.request("GET", "/r/config")                    # GET 404
    srv.request("HEAD", f"/r/data/{object_id(body)}")      # HEAD 200
    srv.request("PUT", "/r/config", body=b"x")             # PUT 405
    srv.request("DELETE", f"/r/data/{object_id(body)}")    # DELETE 200
    s1 = scrape(srv)
    assert count(s1, "POST", 200) - count(s0, "POST", 200) == 2
    assert count(s1, "POST", 403) - count(s0, "POST", 403) == 1
    assert count(s1, "GET", 404) - count(s0, "GET", 404) == 3
    assert count(s1, "HEAD", 200) - count(s0, "HEAD", 200) == 1
    assert count(s1, "PUT", 405) - count(s0, "PUT", 405) == 1
    assert count(s1, "DELETE", 200) - count(s0, "DELETE", 200) == 1
    # the first scrape itself was a GET answered with 200
    assert count(s1, "GET", 200) - count(s0, "GET", 200) == 1


def test_process_metrics_are_present_and_sane(start_server):
    t0 = time.time()
    srv = start_server("--no-auth", *PROM)
    t1 = time.time()
    s = scrape(srv)
    for name, kind in (("process_cpu_seconds", "counter"),
                       ("process_resident_memory_bytes", "gauge"),
                       ("process_open_fds", "gauge"),
                       ("process_start_time_seconds", "gauge")):
        assert s.families[name].type == kind, name
    cpu = s.value("process_cpu_seconds_total")
    assert 0 < cpu < 60
    rss = s.value("process_resident_memory_bytes")
    assert 4 * 2**20 < rss < 2**30
    with open(f"/proc/{srv.pid}/statm") as f:
        actual_rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(rss - actual_rss) < 64 * 2**20
    fds = s.value("process_open_fds")
    assert 3 <= fds < 200
    max_fds = s.value("process_max_fds")
    if max_fds is not None:
        assert fds <= max_fds
    start = s.value("process_start_time_seconds")
    assert t0 - 2 <= start <= t1 + 1
    # CPU time only grows
    for _ in range(20):
        srv.request("GET", "/health")
    assert scrape(srv).value("process_cpu_seconds_total") >= cpu


# -- per-repository figures ---------------------------------------------------------


def repo_gauges(s, repo):
    return (s.value("restic_repo_size_bytes", repo=repo),
            s.value("restic_repo_snapshots", repo=repo),
            s.value("restic_repo_last_snapshot_timestamp_seconds", repo=repo))


def test_repo_size_and_snapshots_follow_uploads_and_deletes(start_server):
    srv = start_server("--no-auth", *PROM)
    for repo in ("r", "a/b"):
        srv.create_repo(repo)
    assert srv.request("POST", "/r/config", body=b"c" * 155).status == 200
    data = [os.urandom(1000 + i) for i in range(3)]
    for body in data:
        assert srv.upload("r", "data", body).status == 200
    assert srv.upload("r", "keys", b"k" * 300).status == 200
    t_before = time.time()
    snap = b'{"snapshot": 1}'
    assert srv.upload("r", "snapshots", snap).status == 200
    t_after = time.time()
    assert srv.upload("a/b", "data", b"nested").status == 200

    s = scrape(srv)
    size, count, newest = repo_gauges(s, "r")
    assert size == 155 + sum(map(len, data)) + 300 + len(snap)
    assert size == repo_disk_usage(srv.data_dir / "r")
    assert count == 1
    assert t_before - 1 <= newest <= t_after + 1
    assert repo_gauges(s, "a/b")[:2] == (6, 0)
    for name in ("restic_repo_size_bytes", "restic_repo_snapshots",
                 "restic_repo_last_snapshot_timestamp_seconds"):
        assert s.families[name].type == "gauge"

    # a second snapshot; a refused duplicate and a failed upload change nothing
    snap2 = b'{"snapshot": 2}'
    assert srv.upload("r", "snapshots", snap2).status == 200
    assert srv.upload("r", "snapshots", snap2).status == 403
    assert srv.upload("r", "data", b"x", name=object_id(b"y")).status == 400
    s = scrape(srv)
    assert repo_gauges(s, "r")[:2] == (size + len(snap2), 2)

    # deletes
    assert srv.request("DELETE", f"/r/data/{object_id(data[0])}").status == 200
    assert srv.request("DELETE", f"/r/snapshots/{object_id(snap)}").status == 200
    assert srv.request("DELETE", f"/r/snapshots/{object_id(snap)}").status == 200  # again
    assert srv.request("DELETE", "/r/config").status == 200
    s = scrape(srv)
    expected_size = size + len(snap2) - len(data[0]) - len(snap) - 155
    assert repo_gauges(s, "r")[:2] == (expected_size, 1)
    assert expected_size == repo_disk_usage(srv.data_dir / "r")


def test_repo_figures_survive_a_restart(start_server):
    """The startup scan rebuilds what the running server had counted."""
    srv = start_server("--no-auth", *PROM)
    srv.create_repo("r")
    srv.create_repo("u/sub")
    assert srv.request("POST", "/r/config", body=b"cfg").status == 200
    for i in range(3):
        assert srv.upload("r", "snapshots", b"snap %d" % i).status == 200
        assert srv.upload("r", "data", os.urandom(2000 + i)).status == 200
    assert srv.upload("u/sub", "snapshots", b"other").status == 200
    before = scrape(srv)
    figures = {repo: repo_gauges(before, repo) for repo in ("r", "u/sub")}
    assert figures["r"][1] == 3 and figures["u/sub"][1] == 1
    assert srv.stop() == 0

    srv2 = start_server("--no-auth", *PROM, data_dir=srv.data_dir)
    after = scrape(srv2)
    for repo, (size, count, newest) in figures.items():
        size2, count2, newest2 = repo_gauges(after, repo)
        assert (size2, count2) == (size, count), repo
        assert size2 == repo_disk_usage(srv.data_dir / repo)
        assert abs(newest2 - newest) < 1.0, repo
    # the blob counters start from zero in a new process
    assert after.series("rest_server_") == {}


def test_last_snapshot_time_follows_deletes(start_server):
    """The newest snapshot's upload time is that of a snapshot that still
    exists: deleting the newest one falls back to the one before, and a repo
    without snapshots does not claim one (0 or no series)."""
    srv = start_server("--no-auth", *PROM)
    srv.create_repo("r")
    old, new = b"old snapshot", b"new snapshot"
    assert srv.upload("r", "snapshots", old).status == 200
    old_mtime = os.stat(srv.data_dir / "r" / "snapshots" / object_id(old)).st_mtime
    time.sleep(1.5)
    assert srv.upload("r", "snapshots", new).status == 200
    _, count, newest = repo_gauges(scrape(srv), "r")
    assert count == 2 and newest > old_mtime + 1

    assert srv.request("DELETE", f"/r/snapshots/{object_id(new)}").status == 200
    _, count, newest = repo_gauges(scrape(srv), "r")
    assert count == 1
    assert abs(newest - old_mtime) < 0.5, (newest, old_mtime)

    assert srv.request("DELETE", f"/r/snapshots/{object_id(old)}").status == 200
    _, count, newest = repo_gauges(scrape(srv), "r")
    assert count == 0
    assert newest in (None, 0)


# -- who may read /metrics ---------------------------------------------------------------


@pytest.fixture
def htpasswd_file(tmp_path):
    return sha_htpasswd(tmp_path / "htpasswd",
                        {"alice": "alice-pw", "metrics": "metrics-pw"})


ALICE, METRICS, WRONG = ("alice", "alice-pw"), ("metrics", "metrics-pw"), ("alice", "nope")


@pytest.mark.parametrize("flags, allowed, refused", [
    (["--prometheus"], [ALICE, METRICS], [None, WRONG]),
    (["--prometheus", "--private-repos"], [METRICS], [None, ALICE, WRONG]),
    (["--prometheus", "--prometheus-no-auth"], [None, ALICE, WRONG], []),
    (["--prometheus", "--prometheus-no-auth", "--private-repos"], [None, ALICE, METRICS], []),
], ids=["auth", "private-repos", "no-auth", "no-auth+private-repos"])
def test_metrics_access_rules(start_server, htpasswd_file, flags, allowed, refused):
    srv = start_server("--htpasswd-file", str(htpasswd_file), *flags)
    for creds in allowed:
        r = srv.request("GET", "/metrics", auth=creds)
        assert r.status == 200, (creds, r)
        assert b"# TYPE rest_server_blob_write_total counter" in r.body
    for creds in refused:
        r = srv.request("GET", "/metrics", auth=creds)
        assert r.status == 401, (creds, r)
        assert b"rest_server" not in r.body


def test_metrics_open_with_no_auth(start_server):
    srv = start_server("--no-auth", "--prometheus")
    assert srv.request("GET", "/metrics").status == 200


def test_no_metrics_without_prometheus_flag(start_server, htpasswd_file):
    srv = start_server("--no-auth")
    r = srv.request("GET", "/metrics")
    assert r.status != 200 and b"rest_server" not in r.body
    srv2 = start_server("--htpasswd-file", str(htpasswd_file), data_dir=srv.data_dir.parent / "d2")
    assert srv2.request("GET", "/metrics").status == 401
    r = srv2.request("GET", "/metrics", auth=METRICS)
    assert r.status != 200 and b"rest_server" not in r.body
