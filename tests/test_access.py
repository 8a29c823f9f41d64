"""Access control beyond logging in (issue 3): private repositories, /metrics,
append-only mode, concurrent uploads of one name, quotas, and restic end to end.

Status policy (reliability plan §0.1):
* another user's repository, in any spelling: 401 (rest-server), 403 or 404
  (a path the router refuses) -- never 2xx, never a redirect, never a 5xx, and
  never an answer that differs between existing and missing objects;
* append-only: deletes of anything but locks are 403, overwrites are refused;
  a retry of an upload that already landed (same bytes) is 200 and rewrites
  nothing (pyrestserver's answer to rest-server issue #196);
* over quota is always 507 (rest-server: 500 for chunked bodies) and leaves no
  temp file behind.
"""

import base64
import hashlib
import http.client
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (IN_CI, TYPES, V2, ServerProcess, basic_auth, make_tree, obj_path,
                      object_id, race, read_until_closed, temp_files, tree_digest)

REALM = 'Basic realm="restic"'
DENIED = (400, 401, 403, 404)
KINDS = TYPES + ("config",)


# -- helpers ------------------------------------------------------------------


def sha_entry(user, password):
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    return f"{user}:{{SHA}}{digest}"


def write_users(path, users):
    Path(path).write_text("".join(sha_entry(u, p) + "\n" for u, p in users.items()),
                          encoding="utf-8")


def target(repo, kind, name=None):
    prefix = f"/{repo.strip('/')}" if repo.strip("/") else ""
    if kind == "config":
        return f"{prefix}/config"
    return f"{prefix}/{kind}/{name or ''}"


def body_for(kind, tag):
    return f"{kind} object {tag} ".encode() * 7


def put(srv, repo, kind, body, auth=None, name=None):
    """POST an object (named by its hash unless `name`) or the config."""
    if kind == "config":
        return srv.request("POST", target(repo, "config"), body=body, auth=auth)
    return srv.request("POST", target(repo, kind, name or object_id(body)), body=body, auth=auth)


def file_state(path):
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size,
            hashlib.sha256(Path(path).read_bytes()).hexdigest())


def object_files(root):
    """Every regular file under root except .htpasswd, relative."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel != ".htpasswd":
                out.append(rel)
    return sorted(out)


def assert_denied(r, what):
    assert r.status in DENIED, f"{what}: {r.status} {r.body[:80]!r}"


def comparable(r):
    """A response without its Date: what a client could compare."""
    headers = sorted((k.lower(), v) for k, v in r.headers.items() if k.lower() != "date")
    return r.status, headers, r.body


def post_early(srv, path, body):
    """POST over a raw socket that still reads the answer when the server
    replies before taking the whole body (e.g. a 403 for an existing name)
    and closes; http.client gives up with BrokenPipeError there.
    Returns the status code."""
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        try:
            s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                       "Connection: close\r\n\r\n").encode() + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while b"\r\n" not in data:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def post_chunked(srv, path, body, chunk=16384, auth=None):
    """POST with Transfer-Encoding: chunked (restic never does, proxies may)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Transfer-Encoding", "chunked")
        if auth:
            conn.putheader("Authorization", basic_auth(*auth))
        conn.endheaders()
        try:
            for i in range(0, len(body), chunk):
                piece = body[i:i + chunk]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer before the whole body arrived
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# =============================================================================
# Private repositories
# =============================================================================

USERS = {
    "alice": "pw-alice",
    "bob": "pw-bob",
    "ali": "pw-ali",            # a prefix of alice
    "alicex": "pw-alicex",      # alice is a prefix of it
    "Alice": "pw-Alice",        # case
    "\u0430lice": "pw-cyr",     # Cyrillic a: looks like alice
    "\uff41\uff4c\uff49\uff43\uff45": "pw-full",  # fullwidth alice (NFKC: alice)
    "metrics": "pw-metrics",
    "data": "pw-data",          # reserved words: a naive "first segment == user"
    "config": "pw-config",      # check would hand them the root repository
    "keys": "pw-keys",
    "..": "pw-dotdot",          # a valid name by rest-server's rules
    "caf\u00e9": "pw-cafe",      # NFC
}
CYRILLIC, FULLWIDTH = "\u0430lice", "\uff41\uff4c\uff49\uff43\uff45"
SEEDED = ("alice", "alice/sub", "bob", "alicex", "Alice", "")  # "" = the root repo


def seed_repo(srv, repo, auth=None):
    """Create a repo with a config and one object of every type; return what was stored."""
    srv.create_repo(repo, auth=auth)
    label = repo or "root"
    stored = {"config": f"config of {label}".encode()}
    assert put(srv, repo, "config", stored["config"], auth=auth).status == 200
    for kind in TYPES:
        body = body_for(kind, label)
        assert put(srv, repo, kind, body, auth=auth).status == 200
        stored[kind] = (object_id(body), body)
    return stored


@pytest.fixture(scope="module", params=["builtin", "wsgi"])
def private(request, tmp_path_factory):
    """A --private-repos server whose data directory holds seeded repos of
    alice, alice/sub, bob, alicex, Alice and the root; users as in USERS."""
    base = tmp_path_factory.mktemp(f"private-{request.param}")
    data = base / "data"
    data.mkdir()
    seeder = ServerProcess(data, ["--no-auth"]).start()
    try:
        seeded = {repo: seed_repo(seeder, repo) for repo in SEEDED}
    finally:
        seeder.stop()
    write_users(data / ".htpasswd", USERS)  # the default location
    srv = ServerProcess(data, ["--private-repos", "--prometheus"], door=request.param).start()
    srv.seeded = seeded
    yield srv
    srv.stop()


def as_user(user):
    return (user, USERS[user])


def attack_requests(prefix, ids):
    """Every kind of access to the repository that `prefix` spells:
    (method, path, body)."""
    missing = {kind: object_id(body_for(kind, "missing")) for kind in TYPES}
    reqs = [("GET", f"{prefix}/config", None), ("HEAD", f"{prefix}/config", None),
            ("POST", f"{prefix}/config", b"evil config"), ("DELETE", f"{prefix}/config", None),
            ("POST", f"{prefix}/?create=true", None)]
    for kind in TYPES:
        oid, body = ids[kind]
        evil = body_for(kind, "evil")
        reqs += [("GET", f"{prefix}/{kind}/{oid}", None), ("HEAD", f"{prefix}/{kind}/{oid}", None),
                 ("DELETE", f"{prefix}/{kind}/{oid}", None),
                 ("POST", f"{prefix}/{kind}/{oid}", body),
                 ("POST", f"{prefix}/{kind}/{object_id(evil)}", evil),
                 ("GET", f"{prefix}/{kind}/{missing[kind]}", None),
                 ("DELETE", f"{prefix}/{kind}/{missing[kind]}", None),
                 ("GET", f"{prefix}/{kind}/", None)]
    return reqs


# (attacker, how the URL spells the repository, whose object ids to use)
ATTACKS = [
    ("alice", "/bob", "bob"),
    ("alice", "/bob/sub", "bob"),
    ("alice", "/alicex", "alicex"),
    ("alice", "/Alice", "Alice"),
    ("alice", "/ALICE", "alice"),
    ("alice", "/alic", "alice"),
    ("alice", "/alice%20", "alice"),
    ("alice", "/alice.", "alice"),
    ("alice", "", ""),                       # the root repository: /config, /data/...
    ("bob", "/alice", "alice"),
    ("bob", "/alice/sub", "alice/sub"),
    ("bob", "/%61lice", "alice"),
    ("bob", "/%61%6C%69%63%65", "alice"),
    ("bob", "/bob/../alice", "alice"),
    ("bob", "/bob/%2e%2e/alice", "alice"),
    ("bob", "/bob/%2E%2E/alice", "alice"),
    ("bob", "/bob%2F..%2Falice", "alice"),
    ("bob", "/bob%2f..%2falice", "alice"),
    ("bob", "/bob/..%2Falice", "alice"),
    ("bob", "/bob/sub/../../alice", "alice"),
    ("bob", "/bob/./../alice", "alice"),
    ("bob", "/bob%5C..%5Calice", "alice"),
    ("bob", "//alice", "alice"),
    ("bob", "/./alice", "alice"),
    ("bob", "/%2Falice", "alice"),
    ("bob", "/alice%00", "alice"),
    ("bob", "/bob%00/../alice", "alice"),
    ("ali", "/alice", "alice"),
    ("alicex", "/alice", "alice"),
    ("Alice", "/alice", "alice"),
    (CYRILLIC, "/alice", "alice"),
    (FULLWIDTH, "/alice", "alice"),
    ("metrics", "/alice", "alice"),
    ("data", "", ""),
    ("config", "", ""),
    ("keys", "", ""),
    ("..", "/alice", "alice"),
    ("..", "/%2e%2e", ""),
    ("..", "/..", ""),
    ("caf\u00e9", "/cafe%CC%81", "alice"),      # NFD spelling of the user's own name
    ("caf\u00e9", "/caf%E9", "alice"),          # latin-1 spelling
]


def attack_id(case):
    user, prefix, _ = case
    return f"{user.encode('unicode_escape').decode()}->{prefix or '/(root)'}"


class TestPrivateRepos:
    @pytest.mark.parametrize("user", sorted(USERS))
    def test_every_attacker_below_really_logs_in(self, private, user):
        """Otherwise a 401 in the matrix would prove nothing.  An invalid path
        is refused by the router only after a successful login (404)."""
        assert private.request("GET", "/./keys/", auth=as_user(user)).status == 404
        assert private.request("GET", "/./keys/", auth=(user, "wrong")).status == 401

    def test_owner_reaches_own_repo_and_sub_repo(self, private):
        alice = as_user("alice")
        for repo in ("alice", "alice/sub"):
            stored = private.seeded[repo]
            assert private.request("POST", f"/{repo}/?create=true", auth=alice).status == 200
            r = private.request("GET", f"/{repo}/config", auth=alice)
            assert (r.status, r.body) == (200, stored["config"])
            assert private.request("HEAD", f"/{repo}/config", auth=alice).status == 200
            for kind in TYPES:
                oid, body = stored[kind]
                r = private.request("GET", target(repo, kind, oid), auth=alice)
                assert (r.status, r.body) == (200, body)
                r = private.request("GET", target(repo, kind), auth=alice, headers={"Accept": V2})
                assert r.status == 200 and oid in r.body.decode()
                new = body_for(kind, f"owner-{repo}")
                assert put(private, repo, kind, new, auth=alice).status == 200
                r = private.request("DELETE", target(repo, kind, object_id(new)), auth=alice)
                assert r.status == 200
                assert not obj_path(private.data_dir, repo, kind, object_id(new)).exists()

    def test_owner_may_create_a_new_sub_repo(self, private):
        alice = as_user("alice")
        assert private.request("POST", "/alice/work/?create=true", auth=alice).status == 200
        assert (private.data_dir / "alice" / "work" / "keys").is_dir()

    def test_percent_encoded_own_name_is_the_own_repo_or_refused(self, private):
        """Decoding may happen, but it must lead to the same folder the
        access check looked at."""
        r = private.request("GET", "/%61lice/config", auth=as_user("alice"))
        assert r.status in (200, 400, 404)
        if r.status == 200:
            assert r.body == private.seeded["alice"]["config"]

    @pytest.mark.parametrize("case", ATTACKS, ids=[attack_id(c) for c in ATTACKS])
    def test_no_spelling_reaches_another_users_repo(self, private, case):
        """GET/HEAD/POST/DELETE on config and objects, listing and create:
        all refused, and nothing on disk changes (no file, no folder)."""
        user, prefix, victim = case
        before = tree_digest(private.data_dir)
        outside = sorted(os.listdir(private.data_dir.parent))
        for method, path, body in attack_requests(prefix, private.seeded[victim]):
            r = private.request(method, path, body=body, auth=as_user(user))
            assert_denied(r, f"{user!r} {method} {path}")
        assert tree_digest(private.data_dir) == before
        assert sorted(os.listdir(private.data_dir.parent)) == outside

    def test_user_name_is_matched_exactly_after_decoding(self, private):
        """café (NFC, UTF-8) owns /caf%C3%A9/ and nothing that merely
        normalises or decodes to something similar."""
        auth = as_user("caf\u00e9")
        assert private.request("POST", "/caf%C3%A9/?create=true", auth=auth).status == 200
        assert (private.data_dir / "caf\u00e9" / "keys").is_dir()
        for spelled in ("/cafe%CC%81", "/caf%E9", "/CAF%C3%89", "/caf%C3%A9%20"):
            r = private.request("POST", f"{spelled}/?create=true", auth=auth)
            assert_denied(r, spelled)
        assert sorted(p.name for p in private.data_dir.iterdir()
                      if p.name.lower().startswith("caf")) == ["caf\u00e9"]

    @pytest.mark.parametrize("path", ["/bob/config", "/bob/keys/", "/config",
                                      "/bob/?create=true"])
    def test_401_for_another_users_repo_carries_the_challenge(self, private, path):
        """Every 401 names the scheme (RFC 7235 §3.1; issue 3: "401 responses
        carry WWW-Authenticate"), also the private-repos refusal."""
        method = "POST" if "create" in path else "GET"
        r = private.request(method, path, auth=as_user("alice"))
        assert r.status == 401
        assert r.header("WWW-Authenticate") == REALM

    @pytest.mark.parametrize("user", [CYRILLIC, FULLWIDTH])
    def test_look_alike_user_gets_a_separate_repo(self, private, user):
        """A user whose name looks like (or normalises to) alice works in a
        folder of exactly that name, never in alice's."""
        spelled = "/" + "".join(f"%{b:02X}" for b in user.encode())
        auth = as_user(user)
        r = private.request("GET", f"{spelled}/config", auth=auth)
        assert r.status == 404
        assert private.request("POST", f"{spelled}/?create=true", auth=auth).status == 200
        assert (private.data_dir / user / "keys").is_dir()
        r = private.request("GET", f"{spelled}/keys/", auth=auth)
        assert (r.status, r.body) == (200, b"[]")
        oid = private.seeded["alice"]["keys"][0]
        assert private.request("GET", f"{spelled}/keys/{oid}", auth=auth).status == 404

    def test_absolute_form_request_target_is_refused(self, private):
        oid = private.seeded["alice"]["keys"][0]
        for path in (f"/alice/keys/{oid}", "/alice/config"):
            reply = private.raw(
                (f"GET http://{private.address}{path} HTTP/1.1\r\nHost: {private.address}\r\n"
                 f"Authorization: {basic_auth(*as_user('bob'))}\r\n"
                 "Connection: close\r\n\r\n").encode())
            code = int(reply.split(b" ", 2)[1])
            assert code in DENIED, reply[:200]

    @pytest.mark.parametrize("auth", [None, ("alice", "pw-alice"), ("alice", "wrong"),
                                      ("nobody", "x")],
                             ids=["anonymous", "other-user", "wrong-password", "unknown-user"])
    def test_no_existence_oracle(self, private, auth):
        """Someone without access to bob's repo gets byte-identical answers for
        bob's existing objects, missing objects, and a repo that does not exist."""
        stored = private.seeded["bob"]
        for kind in TYPES:
            oid = stored[kind][0]
            missing = object_id(body_for(kind, "never stored"))
            for method in ("GET", "HEAD", "DELETE", "POST"):
                answers = [comparable(private.request(method, path, body=b"x" if method == "POST"
                                                      else None, auth=auth))
                           for path in (target("bob", kind, oid), target("bob", kind, missing),
                                        target("nobody", kind, oid))]
                assert answers[0][0] in DENIED
                assert answers[0] == answers[1] == answers[2], (method, kind)
            answers = [comparable(private.request("GET", target(repo, kind), auth=auth))
                       for repo in ("bob", "nobody")]
            assert answers[0][0] in DENIED and answers[0] == answers[1]
        for method in ("GET", "HEAD", "DELETE"):
            answers = [comparable(private.request(method, path, auth=auth))
                       for path in ("/bob/config", "/nobody/config", "/bob/sub/config")]
            assert answers[0][0] in DENIED
            assert answers[0] == answers[1] == answers[2], method

    @pytest.mark.parametrize("path", ["/.htpasswd", "/%2Ehtpasswd", "/alice/../.htpasswd",
                                      "/alice/%2e%2e/.htpasswd", "/alice%2F..%2F.htpasswd"])
    def test_the_htpasswd_file_is_never_served(self, private, path):
        for user in ("alice", "metrics"):
            r = private.request("GET", path, auth=as_user(user))
            assert_denied(r, f"{user} GET {path}")
            assert b"{SHA}" not in r.body

    def test_metrics_only_for_the_user_named_metrics(self, private):
        r = private.request("GET", "/metrics", auth=as_user("metrics"))
        assert r.status == 200 and b"# TYPE" in r.body
        for auth in (as_user("alice"), None, ("metrics", "wrong")):
            r = private.request("GET", "/metrics", auth=auth)
            assert r.status == 401, auth
            assert r.header("WWW-Authenticate") == REALM


class TestMetricsAuth:
    @pytest.fixture
    def users_file(self, tmp_path):
        path = tmp_path / "htpasswd"
        write_users(path, {"alice": "pw-alice", "metrics": "pw-metrics"})
        return str(path)

    def test_prometheus_no_auth_opens_metrics_even_with_private_repos(
            self, start_server, users_file):
        srv = start_server("--htpasswd-file", users_file, "--private-repos", "--prometheus",
                           "--prometheus-no-auth")
        assert srv.request("GET", "/metrics").status == 200
        assert srv.request("GET", "/metrics", auth=("alice", "pw-alice")).status == 200
        # ...but nothing else
        assert srv.request("GET", "/alice/keys/").status == 401

    def test_without_private_repos_metrics_needs_any_valid_user(self, start_server, users_file):
        srv = start_server("--htpasswd-file", users_file, "--prometheus")
        assert srv.request("GET", "/metrics", auth=("alice", "pw-alice")).status == 200
        assert srv.request("GET", "/metrics").status == 401
        assert srv.request("GET", "/metrics", auth=("alice", "nope")).status == 401


# =============================================================================
# Append-only
# =============================================================================

AO_USERS = {"alice": "pw-alice", "admin": "pw-admin", "ops": "pw-ops"}
ALICE = ("alice", "pw-alice")
ADMIN = ("admin", "pw-admin")


class SeededRepo:
    """A repo with a config and one object of every type, on some server."""

    count = 0

    def __init__(self, srv, auth=None):
        SeededRepo.count += 1
        self.srv, self.auth = srv, auth
        self.repo = f"r{SeededRepo.count}"
        self.stored = seed_repo(srv, self.repo, auth=auth)

    def name(self, kind):
        return "config" if kind == "config" else self.stored[kind][0]

    def body(self, kind):
        return self.stored["config"] if kind == "config" else self.stored[kind][1]

    def url(self, kind, name=None):
        return target(self.repo, kind, name or (None if kind == "config" else self.name(kind)))

    def path(self, kind):
        return obj_path(self.srv.data_dir, self.repo, kind, self.name(kind))

    def request(self, method, kind, auth="default", **kw):
        return self.srv.request(method, self.url(kind, kw.pop("name", None)),
                                auth=self.auth if auth == "default" else auth, **kw)


def shared_server(tmp_path_factory, door, args, users=None):
    base = tmp_path_factory.mktemp("shared")
    data = base / "data"
    data.mkdir()
    if users:
        write_users(base / "htpasswd", users)
        args = ["--htpasswd-file", str(base / "htpasswd")] + list(args)
    return ServerProcess(data, args, door=door).start()


@pytest.fixture(scope="module", params=["builtin", "wsgi"])
def ao_server(request, tmp_path_factory):
    """--append-only with admin exempt, one per door for the whole module."""
    srv = shared_server(tmp_path_factory, request.param,
                        ["--append-only", "--append-only-exempt", "admin"], AO_USERS)
    yield srv
    srv.stop()


@pytest.fixture
def ao(ao_server):
    """A fresh repo seeded by alice on the append-only server."""
    return SeededRepo(ao_server, ALICE)


class TestAppendOnly:
    def test_create_repo_is_allowed_and_idempotent(self, ao):
        before = tree_digest(ao.srv.data_dir / ao.repo)
        assert ao.srv.request("POST", f"/{ao.repo}/?create=true", auth=ALICE).status == 200
        assert tree_digest(ao.srv.data_dir / ao.repo) == before
        assert ao.srv.request("POST", f"/{ao.repo}-new/?create=true", auth=ALICE).status == 200

    @pytest.mark.parametrize("kind", KINDS)
    def test_new_uploads_are_allowed(self, ao, kind):
        repo = ao.repo + "-fresh"
        ao.srv.create_repo(repo, auth=ALICE)
        body = body_for(kind, "fresh")
        assert put(ao.srv, repo, kind, body, auth=ALICE).status == 200
        name = "config" if kind == "config" else object_id(body)
        assert obj_path(ao.srv.data_dir, repo, kind, name).read_bytes() == body

    @pytest.mark.parametrize("kind", KINDS)
    def test_reads_and_lists_are_allowed(self, ao, kind):
        r = ao.request("GET", kind)
        assert (r.status, r.body) == (200, ao.body(kind))
        assert ao.request("HEAD", kind).status == 200
        if kind != "config":
            r = ao.srv.request("GET", target(ao.repo, kind), auth=ALICE)
            assert r.status == 200 and ao.name(kind) in r.body.decode()

    @pytest.mark.parametrize("kind", ["data", "index", "keys", "snapshots", "config"])
    def test_deletes_are_refused(self, ao, kind):
        state = file_state(ao.path(kind))
        assert ao.request("DELETE", kind).status == 403
        assert file_state(ao.path(kind)) == state

    @pytest.mark.parametrize("kind", ["data", "index", "keys", "snapshots"])
    def test_deletes_of_missing_objects_are_refused_too(self, ao, kind):
        """rest-server parity: the answer does not depend on existence."""
        missing = object_id(body_for(kind, "missing"))
        assert ao.request("DELETE", kind, name=missing).status == 403

    def test_delete_of_missing_config_is_refused(self, ao):
        ao.srv.create_repo(ao.repo + "-noconfig", auth=ALICE)
        r = ao.srv.request("DELETE", f"/{ao.repo}-noconfig/config", auth=ALICE)
        assert r.status == 403

    def test_locks_can_be_deleted(self, ao):
        path = ao.path("locks")
        assert ao.request("DELETE", "locks").status == 200
        assert not path.exists()
        assert ao.request("DELETE", "locks").status == 200
        assert ao.request("DELETE", "locks", name=object_id(b"no such lock")).status == 200

    @pytest.mark.parametrize("kind", KINDS)
    def test_retry_of_an_upload_that_landed_is_200_and_rewrites_nothing(self, ao, kind):
        """restic retries a save whose response was lost, and in append-only
        mode it cannot delete first (rest-server issue #196)."""
        state = file_state(ao.path(kind))
        time.sleep(0.02)  # a rewrite would show in mtime/ctime
        assert ao.request("POST", kind, body=ao.body(kind)).status == 200
        assert file_state(ao.path(kind)) == state
        assert temp_files(ao.srv.data_dir) == []

    @pytest.mark.parametrize("kind", KINDS)
    def test_overwrite_with_other_bytes_is_refused(self, ao, kind):
        state = file_state(ao.path(kind))
        body = ao.body(kind)
        for change, evil in (("other", body[:-1] + b"!"), ("longer", body + b"!"),
                             ("shorter", body[:-1]), ("empty", b"")):
            r = ao.request("POST", kind, body=evil)
            if kind == "config":
                assert r.status == 403, change
            else:  # the body does not match its name: 400 (hash) or 403 (exists)
                assert r.status in (400, 403), change
            assert file_state(ao.path(kind)) == state, change
        assert temp_files(ao.srv.data_dir) == []

    @pytest.mark.parametrize("kind", KINDS)
    def test_exempt_user_may_delete(self, ao, kind):
        assert ao.request("DELETE", kind).status == (200 if kind == "locks" else 403)
        if kind != "locks":
            assert ao.path(kind).exists()
        assert ao.request("DELETE", kind, auth=ADMIN).status == 200
        assert not ao.path(kind).exists()

    @pytest.mark.parametrize("flags", [["--append-only-exempt", "admin,ops"],
                                       ["--append-only-exempt", "admin",
                                        "--append-only-exempt", "ops"],
                                       ["--append-only-exempt=ops, admin"]],
                             ids=["comma", "repeated", "equals-with-space"])
    def test_several_exempt_users(self, start_server, tmp_path, flags):
        write_users(tmp_path / "htpasswd", AO_USERS)
        srv = start_server("--htpasswd-file", str(tmp_path / "htpasswd"), "--append-only",
                           *flags)
        seeded = SeededRepo(srv, ALICE)
        for user, kind in ((ADMIN, "snapshots"), (("ops", "pw-ops"), "index")):
            assert seeded.request("DELETE", kind).status == 403
            assert seeded.request("DELETE", kind, auth=user).status == 200
        assert seeded.request("DELETE", "keys").status == 403


@pytest.fixture(scope="module", params=["builtin", "wsgi"])
def ao_noverify_server(request, tmp_path_factory):
    srv = shared_server(tmp_path_factory, request.param,
                        ["--no-auth", "--append-only", "--no-verify-upload"])
    yield srv
    srv.stop()


class TestAppendOnlyWithoutVerification:
    """--no-verify-upload: the server cannot rely on the name, so it compares bytes."""

    @pytest.mark.parametrize("kind", KINDS)
    def test_same_bytes_are_200_without_rewriting(self, ao_noverify_server, kind):
        seeded = SeededRepo(ao_noverify_server)
        state = file_state(seeded.path(kind))
        time.sleep(0.02)
        assert seeded.request("POST", kind, body=seeded.body(kind)).status == 200
        assert file_state(seeded.path(kind)) == state

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("change", ["other", "longer", "shorter", "empty"])
    def test_other_bytes_are_403_and_rewrite_nothing(self, ao_noverify_server, kind, change):
        seeded = SeededRepo(ao_noverify_server)
        state = file_state(seeded.path(kind))
        body = seeded.body(kind)
        evil = {"other": b"!" + body[1:], "longer": body + b"!", "shorter": body[:-1],
                "empty": b""}[change]
        assert seeded.request("POST", kind, body=evil).status == 403
        assert file_state(seeded.path(kind)) == state
        assert temp_files(ao_noverify_server.data_dir) == []


# =============================================================================
# Concurrent uploads of one name
# =============================================================================


class TestConcurrentSameName:
    N = 10

    @pytest.mark.parametrize("mode", ["normal", "append-only"])
    def test_same_object_uploaded_by_ten_clients_is_published_once(
            self, start_server, door, mode):
        args = ["--no-auth"] + (["--append-only"] if mode == "append-only" else [])
        srv = start_server(*args, door=door)
        srv.create_repo("r")
        for round_ in range(3):
            body = os.urandom(1024 * 1024)
            oid = object_id(body)
            path = obj_path(srv.data_dir, "r", "data", oid)
            before = set(os.listdir(path.parent))
            results = race(self.N, lambda i: post_early(srv, f"/r/data/{oid}", body))
            assert set(results) <= {200, 403}, results
            assert 200 in results, results
            assert path.read_bytes() == body
            assert set(os.listdir(path.parent)) - before == {oid}
            assert temp_files(srv.data_dir) == []
            # and once it exists, nobody replaces it
            state = file_state(path)
            results = race(self.N, lambda i: post_early(srv, f"/r/data/{oid}", body))
            expected = {200} if mode == "append-only" else {403}
            assert set(results) == expected, results
            assert file_state(path) == state

    @pytest.mark.parametrize("mode", ["normal", "append-only"])
    def test_config_race_with_different_bytes_has_exactly_one_winner(
            self, start_server, door, mode):
        args = ["--no-auth"] + (["--append-only"] if mode == "append-only" else [])
        srv = start_server(*args, door=door)
        for round_ in range(3):
            repo = f"r{round_}"
            srv.create_repo(repo)
            bodies = [f"config {i} ".encode() * 20000 for i in range(self.N)]
            results = race(self.N, lambda i: post_early(srv, f"/{repo}/config", bodies[i]))
            assert sorted(results) == [200] + [403] * (self.N - 1), results
            winner = bodies[results.index(200)]
            assert (srv.data_dir / repo / "config").read_bytes() == winner
            assert temp_files(srv.data_dir) == []

    def test_unverified_object_race_with_different_bytes_has_exactly_one_winner(
            self, start_server, door):
        srv = start_server("--no-auth", "--no-verify-upload", door=door)
        srv.create_repo("r")
        for round_ in range(3):
            name = object_id(f"name {round_}".encode())
            bodies = [f"body {i} ".encode() * 100000 for i in range(self.N)]
            results = race(self.N, lambda i: post_early(srv, f"/r/snapshots/{name}", bodies[i]))
            assert sorted(results) == [200] + [403] * (self.N - 1), results
            winner = bodies[results.index(200)]
            assert (srv.data_dir / "r" / "snapshots" / name).read_bytes() == winner
            assert temp_files(srv.data_dir) == []


# =============================================================================
# Quotas
# =============================================================================


def blob(n, tag):
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{tag}-{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def stored_objects(srv, repo="r"):
    return [p for p in object_files(Path(srv.data_dir, repo)) if "/" in p]


class TestQuota:
    def test_upload_over_the_limit_is_507_with_content_length(self, start_server, door):
        srv = start_server("--no-auth", "--max-size", "200000", door=door)
        srv.create_repo("r")
        first = blob(150000, "a")
        assert srv.upload("r", "data", first).status == 200
        over = blob(60000, "b")
        r = srv.upload("r", "data", over)
        assert (r.status, r.body) == (507, b"Insufficient Storage\n")
        assert not obj_path(srv.data_dir, "r", "data", object_id(over)).exists()
        assert temp_files(srv.data_dir) == []
        r = srv.request("GET", "/r/data/", headers={"Accept": V2})
        assert r.body.decode().count('"name"') == 1

    def test_chunked_upload_over_the_limit_is_507(self, start_server, door):
        """rest-server answers 500 here, which restic retries for ever."""
        srv = start_server("--no-auth", "--max-size", "200000", door=door)
        srv.create_repo("r")
        assert srv.upload("r", "data", blob(150000, "a")).status == 200
        over = blob(60000, "b")
        code, body = post_chunked(srv, f"/r/data/{object_id(over)}", over)
        assert (code, body) == (507, b"Insufficient Storage\n")
        assert not obj_path(srv.data_dir, "r", "data", object_id(over)).exists()
        assert temp_files(srv.data_dir) == []
        fits = blob(40000, "c")
        assert post_chunked(srv, f"/r/data/{object_id(fits)}", fits)[0] == 200

    def test_limit_is_inclusive_and_exact(self, start_server, door):
        srv = start_server("--no-auth", "--max-size", "200000", door=door)
        srv.create_repo("r")
        assert srv.upload("r", "data", blob(150000, "a")).status == 200
        assert srv.upload("r", "keys", blob(50000, "b")).status == 200  # exactly full
        assert srv.upload("r", "locks", blob(1, "c")).status == 507
        assert srv.upload("r", "locks", b"").status == 200  # nothing still fits

    def test_delete_gives_the_space_back(self, start_server, door):
        srv = start_server("--no-auth", "--max-size", "200000", door=door)
        srv.create_repo("r")
        first = blob(150000, "a")
        assert srv.upload("r", "data", first).status == 200
        later = blob(60000, "b")
        assert srv.upload("r", "data", later).status == 507
        assert srv.request("DELETE", f"/r/data/{object_id(first)}").status == 200
        assert srv.upload("r", "data", later).status == 200
        # deleting something that is not there gives nothing back
        assert srv.request("DELETE", f"/r/data/{object_id(first)}").status == 200
        assert srv.upload("r", "data", blob(150000, "c")).status == 507

    def test_failed_uploads_give_their_reservation_back(self, start_server, door):
        srv = start_server("--no-auth", "--max-size", "200000", door=door)
        srv.create_repo("r")
        body = blob(150000, "a")
        for _ in range(3):  # hash mismatches: 400, nothing stored, nothing reserved
            r = srv.request("POST", f"/r/data/{object_id(b'other')}", body=body)
            assert r.status == 400
        assert srv.upload("r", "data", body).status == 200

    def test_config_counts_towards_the_limit(self, start_server, door):
        srv = start_server("--no-auth", "--max-size", "1000", door=door)
        srv.create_repo("r")
        assert put(srv, "r", "config", blob(2000, "cfg")).status == 507
        assert not (srv.data_dir / "r" / "config").exists()
        assert temp_files(srv.data_dir) == []
        assert put(srv, "r", "config", blob(500, "cfg")).status == 200
        assert srv.upload("r", "keys", blob(600, "k")).status == 507
        assert srv.upload("r", "keys", blob(500, "k")).status == 200

    def test_startup_counts_objects_but_not_folders_or_other_files(
            self, start_server, tmp_path):
        """Ten created repos hold ~2600 folders (10 MiB at 4 KiB each, which
        rest-server would count); they, a big .htpasswd, stray files and a
        leftover temp file count nothing.  Stored objects do."""
        data = tmp_path / "data"
        first = start_server("--no-auth", data_dir=data)
        for i in range(10):
            first.create_repo(f"r{i}")
        first.create_repo("r0/sub")
        stored = blob(100000, "stored")
        assert first.upload("r1", "data", stored).status == 200
        first.stop()
        (data / ".htpasswd").write_text("# padding\n" * 20000)
        (data / "README.txt").write_bytes(blob(50000, "readme"))
        (data / "r2" / "data" / "00" / ".upload-leftover").write_bytes(blob(50000, "tmp"))

        srv = start_server("--no-auth", "--max-size", "200000", data_dir=data)
        assert srv.upload("r3", "data", blob(100001, "x")).status == 507  # 100000 in use
        assert srv.upload("r3", "data", blob(100000, "y")).status == 200
        assert srv.upload("r0/sub", "keys", blob(1, "z")).status == 507

    def test_concurrent_uploads_reserve_their_length_first(self, start_server, door):
        """Five uploads of 60 000 bytes in flight at once under a 200 000 limit:
        exactly three fit; the other two are refused, whatever the timing."""
        srv = start_server("--no-auth", "--max-size", "200000", door=door)
        srv.create_repo("r")
        bodies = [blob(60000, f"c{i}") for i in range(5)]
        socks = []
        for body in bodies:
            s = socket.create_connection((srv.host, srv.port), timeout=30)
            s.sendall((f"POST /r/data/{object_id(body)} HTTP/1.1\r\nHost: x\r\n"
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                      + body[:30000])
            socks.append(s)
        time.sleep(0.5)
        replies = []
        for s, body in zip(socks, bodies):
            early = select.select([s], [], [], 0)[0]
            if not early:
                s.sendall(body[30000:])
            data = read_until_closed(s)
            s.close()
            replies.append(int(data.split(b" ", 2)[1]))
        assert sorted(replies) == [200, 200, 200, 507, 507], replies
        assert len(stored_objects(srv)) == 3
        assert temp_files(srv.data_dir) == []

    def test_per_repo_limit(self, start_server, door):
        srv = start_server("--no-auth", "--max-repo-size", "100000", door=door)
        for repo in ("a", "b"):
            srv.create_repo(repo)
        first = blob(80000, "a1")
        assert srv.upload("a", "data", first).status == 200
        r = srv.upload("a", "data", blob(30000, "a2"))
        assert (r.status, r.body) == (507, b"Insufficient Storage\n")
        assert post_chunked(srv, "/a/data/" + object_id(blob(30000, "a3")),
                            blob(30000, "a3"))[0] == 507
        assert srv.upload("b", "data", blob(80000, "b1")).status == 200  # b has its own limit
        assert srv.request("DELETE", f"/a/data/{object_id(first)}").status == 200
        assert srv.upload("a", "data", blob(30000, "a2")).status == 200
        assert temp_files(srv.data_dir) == []

    def test_per_repo_and_total_limits_together(self, start_server, door):
        srv = start_server("--no-auth", "--max-size", "150000", "--max-repo-size", "100000",
                           door=door)
        for repo in ("a", "b"):
            srv.create_repo(repo)
        assert srv.upload("a", "data", blob(90000, "a")).status == 200
        assert srv.upload("b", "data", blob(60000, "b")).status == 200  # total now full
        assert srv.upload("b", "keys", blob(10, "b2")).status == 507
        assert srv.upload("a", "keys", blob(20000, "a2")).status == 507


# =============================================================================
# restic end to end
# =============================================================================

_DROP_NO_PROGRESS = """#!/bin/sh
# restic 0.14 has no --no-progress flag; drop it and run the real binary
for arg do
  shift
  if [ "$arg" != --no-progress ]; then set -- "$@" "$arg"; fi
done
exec '{binary}' "$@"
"""


@pytest.fixture
def restic_for(make_restic, restic_bin, tmp_path):
    """make_restic that also works with restic 0.14 (see conftest's Restic.run)."""
    works = subprocess.run([restic_bin, "--no-progress", "version"], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=60).returncode == 0
    wrapper = tmp_path / "restic-wrapper"
    if not works:
        wrapper.write_text(_DROP_NO_PROGRESS.format(binary=restic_bin))
        wrapper.chmod(0o755)

    def make(url, **kw):
        r = make_restic(url, **kw)
        if not works:
            r.binary = str(wrapper)
        return r

    return make


@pytest.fixture
def bcrypt_users(tmp_path):
    """htpasswd -B entries for the given users, in a file."""
    tool = shutil.which("htpasswd")
    if tool is None:
        if IN_CI:
            pytest.fail("htpasswd is required under CI=true (apt-get install apache2-utils)")
        pytest.skip("htpasswd not installed (apt-get install apache2-utils)")

    def write(path, users):
        lines = []
        for user, password in users.items():
            p = subprocess.run([tool, "-n", "-b", "-B", user, password], capture_output=True,
                               text=True, check=True, stdin=subprocess.DEVNULL)
            lines.append(p.stdout.strip())
        Path(path).write_text("\n".join(lines) + "\n")
        return str(path)

    return write


def snapshot_paths(restic):
    import json
    return sorted(tuple(s["paths"]) for s in json.loads(restic.run("snapshots", "--json").stdout))


def run_until_logged(restic, args, log, pattern, timeout=60):
    """Run restic until the access log shows `pattern`; then kill it.
    Returns the matching log lines (restic 0.14 retries a 403 for ~45 s)."""
    cmd = [restic.binary, "-r", restic.repo_url, *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=restic.env())
    deadline = time.monotonic() + timeout
    found = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = [line for line in Path(log).read_text().splitlines()
                     if re.search(pattern, line)]
            if found:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=30)[0]
    found = found or [line for line in Path(log).read_text().splitlines()
                      if re.search(pattern, line)]
    return proc.returncode, out.decode(errors="replace"), found


@pytest.mark.e2e
class TestResticEndToEnd:
    def test_bcrypt_user_backs_up_and_restores(self, start_server, restic_for, bcrypt_users,
                                               tmp_path):
        users = bcrypt_users(tmp_path / "htpasswd", {"backup-user": "b4ckup.pw"})
        srv = start_server("--htpasswd-file", users)
        restic = restic_for(srv.repo_url("vault", userinfo="backup-user:b4ckup.pw"))
        restic.run("init")
        src = make_tree(tmp_path / "src", files=10, big=300000)
        restic.run("backup", str(src))
        restic.run("restore", "latest", "--target", str(tmp_path / "out"))
        restored = tmp_path / "out" / str(src).lstrip("/")
        assert tree_digest(restored) == tree_digest(src)
        assert "no errors were found" in restic.run("check", "--read-data").stdout

    def test_private_repos_each_user_sees_only_their_own(self, start_server, restic_for,
                                                         bcrypt_users, tmp_path):
        users = bcrypt_users(tmp_path / "htpasswd", {"alice": "pw-a", "bob": "pw-b"})
        log = tmp_path / "access.log"
        srv = start_server("--htpasswd-file", users, "--private-repos", "--log", str(log))
        alice = restic_for(srv.repo_url("alice", userinfo="alice:pw-a"))
        bob = restic_for(srv.repo_url("bob", userinfo="bob:pw-b"))
        for restic, name in ((alice, "a-src"), (bob, "b-src")):
            restic.run("init")
            restic.run("backup", str(make_tree(tmp_path / name, files=5, big=1000)))
        assert snapshot_paths(alice) == [(str(tmp_path / "a-src"),)]
        assert snapshot_paths(bob) == [(str(tmp_path / "b-src"),)]
        bob_before = tree_digest(srv.data_dir / "bob")

        # alice, with her own credentials, points restic at bob's repository
        thief = restic_for(srv.repo_url("bob", userinfo="alice:pw-a"), password=bob.password)
        code, out, lines = run_until_logged(thief, ["snapshots"], log,
                                            r' alice \[.*"\w+ /bob/')
        assert code != 0, out
        assert lines, "no request of alice's on /bob/ in the access log"
        assert all(re.search(r'" 40[134] ', line) for line in lines), lines
        assert tree_digest(srv.data_dir / "bob") == bob_before
        assert snapshot_paths(bob) == [(str(tmp_path / "b-src"),)]

    def test_append_only_backup_forget_unlock_and_exempt_prune(
            self, start_server, restic_for, bcrypt_users, tmp_path):
        users = bcrypt_users(tmp_path / "htpasswd", {"client": "pw-c", "admin": "pw-a"})
        log = tmp_path / "access.log"
        srv = start_server("--htpasswd-file", users, "--append-only",
                           "--append-only-exempt", "admin", "--log", str(log))
        repo_dir = srv.data_dir / "repo"
        client = restic_for(srv.repo_url("repo", userinfo="client:pw-c"))
        client.run("init")
        src = make_tree(tmp_path / "src", files=5, big=200000)
        client.run("backup", str(src))
        (src / "new.txt").write_text("second backup\n")
        client.run("backup", str(src))
        assert len(os.listdir(repo_dir / "snapshots")) == 2
        assert os.listdir(repo_dir / "locks") == []  # backup removed its own locks

        # forget must delete a snapshot file: refused (restic 0.14 retries 403 for ~45 s)
        code, out, lines = run_until_logged(
            client, ["forget", "--keep-last", "1"], log,
            r'"DELETE /repo/snapshots/[0-9a-f]{64} HTTP/1\.1" 403 ')
        assert lines, f"forget's DELETE was not refused with 403:\n{out}"
        assert code != 0
        assert len(os.listdir(repo_dir / "snapshots")) == 2
        assert len(os.listdir(repo_dir / "locks")) == 1  # left by the killed forget

        out = client.run("unlock").stdout
        assert os.listdir(repo_dir / "locks") == [], out
        assert re.search(r'"DELETE /repo/locks/[0-9a-f]{64} HTTP/1\.1" 200 ', log.read_text())

        admin = restic_for(srv.repo_url("repo", userinfo="admin:pw-a"))
        admin.run("forget", "--keep-last", "1", "--prune")
        assert len(os.listdir(repo_dir / "snapshots")) == 1
        assert len(snapshot_paths(client)) == 1
        assert "no errors were found" in client.run("check", "--read-data").stdout
