"""REST API conformance: the endpoint table of restic's REST protocol (v1 and v2).

Every test here runs twice through the `server` fixture: once against the
built-in HTTP server and once against the WSGI application under waitress.
A test reads as a specification of one behaviour; where pyrestserver
deliberately differs from Go rest-server, the docstring says so.

Status-code policy under test:
* success of create / POST / DELETE / HEAD is exactly 200 (restic rejects 201/204);
* error bodies are the reason phrase plus a newline, `text/plain; charset=utf-8`,
  with `X-Content-Type-Options: nosniff`; a HEAD error has no body;
* odd or hostile paths get 400 or 404, never a redirect and never a 5xx.
"""

import hashlib
import json
import os
import re
import socket
import stat
import time
from pathlib import Path

import pytest

from conftest import TYPES, V2, basic_auth, exchange, object_id, payload, temp_files, tree_digest

V1 = "application/vnd.x.restic.rest.v1"
ERROR_CONTENT_TYPE = "text/plain; charset=utf-8"
OBJECT_ALLOW = {"HEAD", "GET", "POST", "DELETE"}
CONFIG_ALLOW = {"HEAD", "GET", "POST", "DELETE"}
BAD_PATH = (400, 404)


# -- helpers ------------------------------------------------------------------


def repo_dir(data_dir, repo):
    return Path(data_dir) / repo if repo else Path(data_dir)


def object_path(data_dir, repo, kind, oid):
    """Where restic's local/REST layout keeps an object on disk."""
    base = repo_dir(data_dir, repo)
    if kind == "data":
        return base / "data" / oid[:2] / oid
    return base / kind / oid


def prefix(repo):
    return f"/{repo}" if repo else ""


def allow_set(resp):
    return {m.strip().upper() for m in (resp.header("Allow") or "").split(",") if m.strip()}


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_no_leak(resp, srv):
    """No traceback, no server-side path, no Python version in a response."""
    text = resp.body.decode("latin-1")
    assert "Traceback" not in text, resp
    assert str(srv.data_dir) not in text, resp
    assert str(srv.data_dir.parent) not in text, resp
    assert not re.search(r"Python/\d", text), resp
    server_header = resp.header("Server") or ""
    assert "python" not in server_header.lower(), server_header


def assert_error(resp, status, srv=None, head=False):
    """An error response in the agreed shape: `<Reason phrase>\\n`, text/plain, nosniff."""
    assert resp.status == status, resp
    if head:
        assert resp.body == b"", resp
    else:
        assert resp.reason, "status line carries a reason phrase"
        assert resp.body == (resp.reason + "\n").encode(), resp
        ctype = (resp.header("Content-Type") or "").replace(" ", "").lower()
        assert ctype == ERROR_CONTENT_TYPE.replace(" ", ""), resp.header("Content-Type")
        assert (resp.header("X-Content-Type-Options") or "").lower() == "nosniff"
    if srv is not None:
        assert_no_leak(resp, srv)


def assert_ok_empty(resp):
    """Exactly 200 with an empty body (create, POST, DELETE)."""
    assert resp.status == 200, resp
    assert resp.body == b"", resp


def status_of(raw_response):
    """Status code of the first final response in raw bytes (None if none)."""
    for m in re.finditer(rb"HTTP/1\.[01] (\d{3})", raw_response):
        code = int(m.group(1))
        if code >= 200:
            return code
    return None


def list_names(srv, path, accept=None):
    headers = {"Accept": accept} if accept else {}
    r = srv.request("GET", path, headers=headers)
    assert r.status == 200, r
    return r, json.loads(r.body)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def sha_htpasswd(tmp_path, user="alice", password="secret"):
    """An htpasswd file with one {SHA} user (no external tools needed)."""
    import base64

    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    path = tmp_path / "users.htpasswd"
    path.write_text(f"{user}:{{SHA}}{digest}\n")
    return path


# -- repository creation and routing -------------------------------------------


class TestRepoCreation:
    def test_create_root_repo_makes_type_dirs_and_256_data_subdirs(self, server):
        """POST /?create=true → 200, empty body; data index keys locks snapshots and
        data/00..ff exist."""
        r = server.request("POST", "/?create=true")
        assert_ok_empty(r)
        for kind in TYPES:
            assert (server.data_dir / kind).is_dir(), kind
        subdirs = sorted(p.name for p in (server.data_dir / "data").iterdir())
        assert subdirs == [f"{i:02x}" for i in range(256)]

    def test_create_is_idempotent_and_removes_nothing(self, server):
        """Creating an existing repo again → 200 and every file stays as it was."""
        server.create_repo("r")
        assert server.request("POST", "/r/config", body=b"cfg").status == 200
        body = b"a key"
        assert server.upload("r", "keys", body).status == 200
        before = tree_digest(server.data_dir)
        assert_ok_empty(server.request("POST", "/r/?create=true"))
        assert tree_digest(server.data_dir) == before

    @pytest.mark.parametrize("query", ["", "?create=false", "?create=1", "?create=TRUE",
                                       "?create=", "?create", "?Create=true", "?create=yes"])
    def test_create_flag_must_be_exactly_true(self, server, query):
        """POST on a repo root without exactly `create=true` → 400 `Bad Request\\n`,
        nothing created."""
        r = server.request("POST", f"/r/{query}")
        assert_error(r, 400, server)
        assert not (server.data_dir / "r").exists()

    @pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "PUT", "PATCH"])
    @pytest.mark.parametrize("target", ["/", "/r/", "/r/?create=true"])
    def test_other_methods_on_repo_root_are_405_allow_post(self, server, method, target):
        """Any method but POST on a repo root → 405 with `Allow: POST`; nothing deleted."""
        server.create_repo("")
        server.create_repo("r")
        before = tree_digest(server.data_dir)
        r = server.request(method, target, body=b"" if method in ("PUT", "PATCH") else None)
        assert_error(r, 405, server, head=(method == "HEAD"))
        assert allow_set(r) == {"POST"}
        assert tree_digest(server.data_dir) == before

    def test_sub_repos_one_and_two_levels_deep(self, server):
        """POST /alice/?create=true and /alice/work/?create=true both create a full repo."""
        assert_ok_empty(server.request("POST", "/alice/?create=true"))
        assert_ok_empty(server.request("POST", "/alice/work/?create=true"))
        for repo in ("alice", "alice/work"):
            base = server.data_dir / repo
            for kind in TYPES:
                assert (base / kind).is_dir(), (repo, kind)
            assert len(list((base / "data").iterdir())) == 256

    def test_repo_depth_is_limited_to_two(self, server):
        """/a/b/c/ is never a repo: create → 404 and nothing at depth 3 is served,
        even when such files exist on disk."""
        r = server.request("POST", "/a/b/c/?create=true")
        assert r.status == 404, r
        assert not (server.data_dir / "a" / "b" / "c").exists()

        deep = server.data_dir / "a" / "b" / "c"
        (deep / "keys").mkdir(parents=True)
        (deep / "config").write_bytes(b"DEEP-CONFIG")
        body = b"deep key"
        (deep / "keys" / object_id(body)).write_bytes(body)
        before = tree_digest(server.data_dir)

        r = server.request("GET", "/a/b/c/config")
        assert r.status == 404, r
        assert b"DEEP" not in r.body
        assert server.request("HEAD", "/a/b/c/config").status == 404
        r = server.request("GET", f"/a/b/c/keys/{object_id(body)}")
        assert r.status == 404, r
        assert server.request("GET", "/a/b/c/keys/").status == 404
        assert server.request("DELETE", "/a/b/c/config").status in BAD_PATH
        other = b"another deep key"
        r = server.request("POST", f"/a/b/c/keys/{object_id(other)}", body=other)
        assert r.status in BAD_PATH, r
        assert tree_digest(server.data_dir) == before

    @pytest.mark.parametrize("target", ["/alice?create=true", "/alice/x?create=true",
                                        "/alice/work?create=true"])
    def test_create_needs_trailing_slash(self, server, target):
        """A repo root ends with `/`: `/alice?create=true` → 404, nothing created."""
        r = server.request("POST", target)
        assert r.status in BAD_PATH, r
        assert list(server.data_dir.iterdir()) == []

    @pytest.mark.parametrize("reserved", TYPES)
    def test_type_names_are_never_repo_names(self, server, reserved):
        """`POST /data/?create=true` is the (root) listing endpoint → 405 Allow: GET;
        no repo named after a type is created."""
        for target in (f"/{reserved}/?create=true", f"/a/{reserved}/?create=true"):
            r = server.request("POST", target)
            assert_error(r, 405, server)
            assert allow_set(r) == {"GET"}
        assert list(server.data_dir.iterdir()) == []

    def test_config_is_never_a_repo_name(self, server):
        """`POST /x/config/?create=true` and `/config/?create=true` → 404; nothing created."""
        for target in ("/x/config/?create=true", "/config/?create=true",
                       "/x/config/y/?create=true"):
            r = server.request("POST", target)
            assert r.status in BAD_PATH, (target, r)
        assert list(server.data_dir.iterdir()) == []

    def test_unknown_remainders_are_404(self, server, repo):
        """Paths that match no endpoint → 404 for every method."""
        for path in ("/r/nonsense", "/r/data/ab/", "/r/keys/abc/def", "/r/config/x",
                     "/r/snapshots/x/y/"):
            for method in ("GET", "HEAD", "POST", "DELETE"):
                r = server.request(method, path, body=b"x" if method == "POST" else None)
                assert r.status in BAD_PATH, (method, path, r)


# -- config ---------------------------------------------------------------------


class TestConfig:
    def test_missing_config_is_404(self, server, repo):
        """Before upload: HEAD → 404 without body; GET → 404 `Not Found\\n`."""
        assert_error(server.request("HEAD", "/r/config"), 404, server, head=True)
        assert_error(server.request("GET", "/r/config"), 404, server)

    def test_post_config_stores_exact_bytes_mode_0600(self, server, repo):
        """POST /config body `abc` → 200, empty body; file == `abc`, mode 0600."""
        assert_ok_empty(server.request("POST", "/r/config", body=b"abc"))
        path = server.data_dir / "r" / "config"
        assert path.read_bytes() == b"abc"
        assert mode_of(path) == 0o600
        assert temp_files(server.data_dir) == []

    def test_head_config_reports_length_without_body(self, server, repo):
        """HEAD /config → exactly 200, Content-Length 3, no body."""
        server.request("POST", "/r/config", body=b"abc")
        r = server.request("HEAD", "/r/config")
        assert r.status == 200
        assert r.header("Content-Length") == "3"
        assert r.body == b""

    def test_get_config_returns_body(self, server, repo):
        """GET /config → 200 with the stored bytes, exact Content-Length, Accept-Ranges."""
        cfg = payload(300, b"cfg")
        server.request("POST", "/r/config", body=cfg)
        r = server.request("GET", "/r/config")
        assert r.status == 200
        assert r.body == cfg
        assert r.header("Content-Length") == str(len(cfg))
        assert r.header("Accept-Ranges") == "bytes"

    def test_get_config_with_range_from_zero_returns_everything(self, server, repo):
        """restic sends `Range: bytes=0-` → 200 or 206 with the full body."""
        server.request("POST", "/r/config", body=b"abc")
        r = server.request("GET", "/r/config", headers={"Range": "bytes=0-"})
        assert r.status in (200, 206)
        assert r.body == b"abc"
        assert r.header("Content-Length") == "3"
        if r.status == 206:
            assert r.header("Content-Range") == "bytes 0-2/3"

    def test_get_config_honours_partial_range(self, server, repo):
        """GET /config honours Range like objects: `bytes=1-1` → 206 `b`."""
        server.request("POST", "/r/config", body=b"abc")
        r = server.request("GET", "/r/config", headers={"Range": "bytes=1-1"})
        assert r.status == 206
        assert r.body == b"b"
        assert r.header("Content-Range") == "bytes 1-1/3"
        assert r.header("Content-Length") == "1"

    def test_second_post_config_is_403_and_keeps_content(self, server, repo):
        """An existing config is never overwritten: 403, content unchanged."""
        assert server.request("POST", "/r/config", body=b"abc").status == 200
        r = server.request("POST", "/r/config", body=b"other")
        assert_error(r, 403, server)
        assert (server.data_dir / "r" / "config").read_bytes() == b"abc"
        # also with the very same content
        assert_error(server.request("POST", "/r/config", body=b"abc"), 403, server)

    def test_delete_config_is_idempotent(self, server, repo):
        """DELETE /config → 200; again → 200; then GET → 404."""
        server.request("POST", "/r/config", body=b"abc")
        assert_ok_empty(server.request("DELETE", "/r/config"))
        assert not (server.data_dir / "r" / "config").exists()
        assert_ok_empty(server.request("DELETE", "/r/config"))
        assert server.request("GET", "/r/config").status == 404

    def test_config_can_be_uploaded_again_after_delete(self, server, repo):
        """After DELETE, POST /config works again (restic's retry path)."""
        server.request("POST", "/r/config", body=b"abc")
        server.request("DELETE", "/r/config")
        assert_ok_empty(server.request("POST", "/r/config", body=b"new"))
        assert server.request("GET", "/r/config").body == b"new"

    @pytest.mark.parametrize("method", ["PUT", "OPTIONS", "PATCH"])
    def test_other_methods_on_config_are_405(self, server, repo, method):
        """PUT/OPTIONS/PATCH /config → 405, `Allow: HEAD, GET, POST, DELETE`; no write."""
        body = b"abc" if method != "OPTIONS" else None
        r = server.request(method, "/r/config", body=body)
        assert_error(r, 405, server)
        assert allow_set(r) == CONFIG_ALLOW
        assert not (server.data_dir / "r" / "config").exists()

    def test_config_in_root_and_sub_repos_are_separate(self, server):
        """Root, /alice/ and /alice/work/ each have their own config file."""
        for repo, cfg in (("", b"root"), ("alice", b"alice"), ("alice/work", b"work")):
            server.create_repo(repo)
            assert server.request("POST", f"{prefix(repo)}/config", body=cfg).status == 200
        for repo, cfg in (("", b"root"), ("alice", b"alice"), ("alice/work", b"work")):
            assert (repo_dir(server.data_dir, repo) / "config").read_bytes() == cfg
            assert server.request("GET", f"{prefix(repo)}/config").body == cfg

    def test_post_config_to_never_created_repo(self, server):
        """POST /neverCreated/config: 200 (stored) or 404 — never a partial config."""
        r = server.request("POST", "/neverCreated/config", body=b"cfg")
        assert r.status in (200, 404), r
        path = server.data_dir / "neverCreated" / "config"
        if r.status == 200:
            assert path.read_bytes() == b"cfg"
        else:
            assert not path.exists()
        assert temp_files(server.data_dir) == []

    def test_truncated_config_upload_does_not_block_a_later_upload(self, server, repo):
        """Content-Length 100 but 5 bytes then close → no config is left behind and a
        later full POST /config succeeds (rest-server leaves a partial file → 403)."""
        exchange(
            server,
            b"POST /r/config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabcde",
            shut_wr=True, timeout=5.0,
        )
        path = server.data_dir / "r" / "config"
        assert wait_for(lambda: not path.exists() and not temp_files(server.data_dir))
        full = payload(100, b"full config")
        r = server.request("POST", "/r/config", body=full)
        assert_ok_empty(r)
        assert server.request("GET", "/r/config").body == full
        assert temp_files(server.data_dir) == []


# -- objects of every type -------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
class TestObjects:
    def test_upload_stores_object_in_restic_layout(self, server, repo, kind):
        """POST /{type}/ID(b) → 200, empty body; on disk at data/<id[:2]>/<id> for
        data and {type}/<id> otherwise, mode 0600, exact bytes, no temp file."""
        body = payload(1000, kind.encode())
        oid = object_id(body)
        r = server.upload("r", kind, body)
        assert_ok_empty(r)
        path = object_path(server.data_dir, "r", kind, oid)
        assert path.read_bytes() == body
        assert mode_of(path) == 0o600
        assert temp_files(server.data_dir) == []

    def test_head_reports_size_without_body(self, server, repo, kind):
        """HEAD /{type}/ID → exactly 200, Content-Length = size, no body."""
        body = payload(777, kind.encode())
        server.upload("r", kind, body)
        r = server.request("HEAD", f"/r/{kind}/{object_id(body)}")
        assert r.status == 200
        assert r.header("Content-Length") == "777"
        assert r.body == b""

    def test_get_returns_bytes_length_and_accept_ranges(self, server, repo, kind):
        """GET /{type}/ID → 200, body, Content-Length, `Accept-Ranges: bytes`."""
        body = payload(5000, kind.encode())
        server.upload("r", kind, body)
        r = server.request("GET", f"/r/{kind}/{object_id(body)}")
        assert r.status == 200
        assert r.body == body
        assert r.header("Content-Length") == "5000"
        assert r.header("Accept-Ranges") == "bytes"

    def test_overwrite_is_refused_with_403(self, server, repo, kind):
        """Uploading an existing object again → 403 and the file is untouched."""
        body = payload(100, kind.encode())
        server.upload("r", kind, body)
        path = object_path(server.data_dir, "r", kind, object_id(body))
        before = os.stat(path)
        r = server.upload("r", kind, body)
        assert_error(r, 403, server)
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
            before.st_ino, before.st_mtime_ns, before.st_size)
        assert path.read_bytes() == body
        assert temp_files(server.data_dir) == []

    def test_hash_mismatch_is_400_and_leaves_nothing(self, server, repo, kind):
        """A body whose SHA-256 is not the name → 400 `Bad Request\\n`; no object and
        no `.upload-*` temp file (bit flip, one byte short/long, empty, other body)."""
        good = payload(1000, kind.encode())
        oid = object_id(good)
        flipped = bytes([good[0] ^ 1]) + good[1:]
        variants = {
            "bit flip": flipped,
            "truncated by one": good[:-1],
            "extended by one": good + b"x",
            "empty": b"",
            "other object": payload(1000, b"other"),
        }
        for label, body in variants.items():
            r = server.request("POST", f"/r/{kind}/{oid}", body=body)
            assert r.status == 400, (label, r)
            assert_error(r, 400, server)
            assert not object_path(server.data_dir, "r", kind, oid).exists(), label
            assert temp_files(server.data_dir) == [], label
        assert server.request("HEAD", f"/r/{kind}/{oid}").status == 404
        # and the right body is still accepted afterwards
        assert server.request("POST", f"/r/{kind}/{oid}", body=good).status == 200

    def test_delete_is_idempotent(self, server, repo, kind):
        """DELETE → 200; again → 200; then GET and HEAD → 404."""
        body = payload(64, kind.encode())
        oid = object_id(body)
        server.upload("r", kind, body)
        assert_ok_empty(server.request("DELETE", f"/r/{kind}/{oid}"))
        assert not object_path(server.data_dir, "r", kind, oid).exists()
        assert_ok_empty(server.request("DELETE", f"/r/{kind}/{oid}"))
        assert_error(server.request("GET", f"/r/{kind}/{oid}"), 404, server)
        assert_error(server.request("HEAD", f"/r/{kind}/{oid}"), 404, server, head=True)

    def test_delete_of_never_existing_object_is_200(self, server, repo, kind):
        """Idempotent delete also holds for an ID that never existed."""
        assert_ok_empty(server.request("DELETE", f"/r/{kind}/{object_id(b'never')}"))

    def test_empty_object_is_a_valid_upload(self, server, repo, kind):
        """POST ID("") with an empty body → 200; HEAD Content-Length 0; GET empty."""
        oid = object_id(b"")
        assert_ok_empty(server.request("POST", f"/r/{kind}/{oid}", body=b""))
        r = server.request("HEAD", f"/r/{kind}/{oid}")
        assert r.status == 200 and r.header("Content-Length") == "0"
        r = server.request("GET", f"/r/{kind}/{oid}")
        assert r.status == 200 and r.body == b""

    def test_missing_object_is_404(self, server, repo, kind):
        """GET/HEAD of an ID that is not stored → 404."""
        oid = object_id(b"missing " + kind.encode())
        assert_error(server.request("GET", f"/r/{kind}/{oid}"), 404, server)
        assert_error(server.request("HEAD", f"/r/{kind}/{oid}"), 404, server, head=True)

    def test_no_verify_upload_accepts_mismatching_body(self, start_server, door, kind):
        """With --no-verify-upload a body that does not match its name is stored."""
        srv = start_server("--no-auth", "--no-verify-upload", door=door)
        srv.create_repo("r")
        oid = object_id(b"the name")
        r = srv.request("POST", f"/r/{kind}/{oid}", body=b"another body")
        assert_ok_empty(r)
        assert object_path(srv.data_dir, "r", kind, oid).read_bytes() == b"another body"
        # overwrite is still refused
        assert srv.request("POST", f"/r/{kind}/{oid}", body=b"third").status == 403

    def test_short_body_leaves_nothing(self, server, repo, kind):
        """Content-Length n, n-10 bytes sent, then EOF → 400 (or just a close);
        never 200, no object, no temp file."""
        body = payload(1000, kind.encode())
        oid = object_id(body)
        req = (f"POST /r/{kind}/{oid} HTTP/1.1\r\nHost: x\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:-10]
        got, _ = exchange(server, req, shut_wr=True, timeout=5.0)
        assert status_of(got) in (None, 400), got[:200]
        path = object_path(server.data_dir, "r", kind, oid)
        assert wait_for(lambda: not temp_files(server.data_dir))
        assert not path.exists()
        assert server.request("HEAD", f"/r/{kind}/{oid}").status == 404

    def test_upload_to_never_created_repo(self, server, kind):
        """POST /new/{type}/ID → 200 (parent dirs created, rest-server parity) or 404;
        never a partial file."""
        body = payload(200, kind.encode())
        oid = object_id(body)
        r = server.request("POST", f"/new/{kind}/{oid}", body=body)
        assert r.status in (200, 404), r
        path = object_path(server.data_dir, "new", kind, oid)
        if r.status == 200:
            assert path.read_bytes() == body
            assert server.request("GET", f"/new/{kind}/{oid}").body == body
        else:
            assert not path.exists()
        assert temp_files(server.data_dir) == []

    def test_objects_of_sub_repos_live_in_their_repo(self, server, kind):
        """/alice/work/{type}/ID is stored under alice/work/ and not visible at /alice/."""
        server.create_repo("alice")
        server.create_repo("alice/work")
        body = payload(123, kind.encode())
        oid = object_id(body)
        assert_ok_empty(server.upload("alice/work", kind, body))
        assert object_path(server.data_dir, "alice/work", kind, oid).read_bytes() == body
        assert server.request("HEAD", f"/alice/{kind}/{oid}").status == 404
        assert server.request("GET", f"/alice/work/{kind}/{oid}").body == body


class TestObjectNames:
    def test_invalid_ids_are_404_for_every_method(self, server, repo):
        """Only 64 lower-case hex chars name an object: upper case, 63/65 chars, non-hex,
        suffixes, a trailing slash or the disk layout path → 404; nothing is created,
        read or deleted."""
        body = b"real object"
        oid = object_id(body)
        assert server.upload("r", "data", body).status == 200
        assert server.upload("r", "keys", body).status == 200
        before = tree_digest(server.data_dir)
        bad_names = {
            "upper case": oid.upper(),
            "63 chars": oid[:63],
            "65 chars": oid + "0",
            "non-hex": "g" + oid[1:],
            "trailing slash": oid + "/",
            "temp-ish suffix": oid + ".tmp",
            "upload temp name": ".upload-" + oid,
            "plus sign": "+" + oid[1:],
            "encoded NUL": oid + "%00",
        }
        failures = []
        for kind in ("data", "keys"):
            for label, name in bad_names.items():
                for method in ("GET", "HEAD", "POST", "DELETE"):
                    r = server.request(method, f"/r/{kind}/{name}",
                                       body=body if method == "POST" else None)
                    if r.status not in BAD_PATH or b"real object" in r.body:
                        failures.append((method, kind, label, r.status))
        for method in ("GET", "HEAD", "POST", "DELETE"):
            r = server.request(method, f"/r/data/{oid[:2]}/{oid}",
                               body=body if method == "POST" else None)
            if r.status not in BAD_PATH:
                failures.append((method, "data", "disk layout path", r.status))
        assert failures == []
        assert tree_digest(server.data_dir) == before

    @pytest.mark.parametrize("kind", ["Data", "datas", "tmp", "DATA", "key"])
    def test_unknown_types_are_404(self, server, repo, kind):
        """`/r/Data/<id>`, `/r/tmp/<id>`, … are not object paths → 404, nothing written."""
        body = b"payload"
        before = tree_digest(server.data_dir)
        for method in ("GET", "HEAD", "POST", "DELETE"):
            r = server.request(method, f"/r/{kind}/{object_id(body)}",
                               body=body if method == "POST" else None)
            assert r.status in BAD_PATH, (method, r)
        assert tree_digest(server.data_dir) == before

    def test_type_path_without_trailing_slash_is_404(self, server, repo):
        """`GET /r/data` (no slash) is neither a listing nor an object → 404."""
        for kind in TYPES:
            assert server.request("GET", f"/r/{kind}").status == 404, kind


class TestMethodNotAllowed:
    @pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS"])
    def test_object_path_allows_head_get_post_delete(self, server, repo, method):
        """PUT/PATCH/OPTIONS /{type}/<id> → 405 `Allow: HEAD, GET, POST, DELETE`, no write."""
        body = b"put body"
        oid = object_id(body)
        for kind in TYPES:
            r = server.request(method, f"/r/{kind}/{oid}",
                               body=body if method != "OPTIONS" else None)
            assert_error(r, 405, server)
            assert allow_set(r) == OBJECT_ALLOW, kind
            assert not object_path(server.data_dir, "r", kind, oid).exists()

    @pytest.mark.parametrize("method", ["HEAD", "POST", "DELETE", "PUT"])
    def test_listing_path_allows_only_get(self, server, repo, method):
        """HEAD/POST/DELETE/PUT /{type}/ → 405 `Allow: GET`; HEAD error has no body."""
        for kind in TYPES:
            r = server.request(method, f"/r/{kind}/",
                               body=b"" if method in ("POST", "PUT") else None)
            assert_error(r, 405, server, head=(method == "HEAD"))
            assert allow_set(r) == {"GET"}, kind
            assert (server.data_dir / "r" / kind).is_dir()

    @pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "TRACE", "FOO"])
    def test_unknown_methods_are_refused(self, server, repo, method):
        """Unknown/WebDAV methods → 405 (with Allow) or 501; never 2xx."""
        server.request("POST", "/r/config", body=b"abc")
        for path in ("/r/", "/r/config", "/r/keys/", f"/r/keys/{object_id(b'x')}"):
            r = server.request(method, path)
            assert r.status in (405, 501), (path, r)
            if r.status == 405:
                assert allow_set(r), path
            assert_no_leak(r, server)
        assert (server.data_dir / "r" / "config").read_bytes() == b"abc"


# -- Range -----------------------------------------------------------------------


SIZE = 1000
BLOB = payload(SIZE, b"range")


@pytest.fixture(params=["object", "config"])
def ranged(request, server):
    """A 1000-byte resource served with Range support: a data object or the config."""
    server.create_repo("r")
    if request.param == "object":
        assert server.upload("r", "data", BLOB).status == 200
        path = f"/r/data/{object_id(BLOB)}"
    else:
        assert server.request("POST", "/r/config", body=BLOB).status == 200
        path = "/r/config"
    return server, path


def get_range(srv, path, spec):
    return srv.request("GET", path, headers={"Range": spec})


def assert_partial(r, start, end):
    """206 with exactly bytes start..end (inclusive), a matching Content-Range and an
    exact Content-Length (restic compares it with the requested length)."""
    assert r.status == 206, r
    assert r.header("Content-Range") == f"bytes {start}-{end}/{SIZE}"
    assert r.header("Content-Length") == str(end - start + 1)
    assert r.header("Transfer-Encoding") is None
    assert r.body == BLOB[start:end + 1]


def assert_unsatisfiable(r, srv):
    assert r.status == 416, r
    assert r.header("Content-Range") == f"bytes */{SIZE}"
    assert_error(r, 416, srv)


class TestRange:
    def test_simple_range_is_206(self, ranged):
        """`bytes=2-5` → 206, `Content-Range: bytes 2-5/N`, Content-Length 4."""
        srv, path = ranged
        assert_partial(get_range(srv, path, "bytes=2-5"), 2, 5)

    @pytest.mark.parametrize("spec,start,end", [
        ("bytes=0-0", 0, 0),
        ("bytes=999-999", 999, 999),
        ("bytes=999-", 999, 999),
        ("bytes=500-", 500, 999),
        ("bytes=-3", 997, 999),
        ("bytes=-1", 999, 999),
        ("bytes=990-1100", 990, 999),
    ])
    def test_single_ranges(self, ranged, spec, start, end):
        """Open ranges, suffix ranges and ends past EOF (clamped) → exact 206."""
        srv, path = ranged
        assert_partial(get_range(srv, path, spec), start, end)

    @pytest.mark.parametrize("spec", ["bytes=0-", "bytes=-2000", "bytes=0-999"])
    def test_ranges_covering_everything(self, ranged, spec):
        """A range covering the whole resource → 206 or 200 with the full body."""
        srv, path = ranged
        r = get_range(srv, path, spec)
        assert r.status in (200, 206), r
        assert r.body == BLOB
        assert r.header("Content-Length") == str(SIZE)
        if r.status == 206:
            assert r.header("Content-Range") == f"bytes 0-{SIZE - 1}/{SIZE}"

    @pytest.mark.parametrize("spec", ["bytes=1000-", "bytes=1000-1010", "bytes=1100-1200"])
    def test_start_at_or_past_end_is_416(self, ranged, spec):
        """Start >= size → 416 with `Content-Range: bytes */N` (restic: permanent)."""
        srv, path = ranged
        assert_unsatisfiable(get_range(srv, path, spec), srv)

    @pytest.mark.parametrize("spec", ["foo", "bytes=abc", "bytes=", "bytes=-", "bytes=a-b"])
    def test_malformed_range_is_416(self, ranged, spec):
        """A syntactically broken Range header → 416."""
        srv, path = ranged
        r = get_range(srv, path, spec)
        assert r.status == 416, r
        assert_error(r, 416, srv)

    def test_inverted_range_is_ignored_or_416(self, ranged):
        """`bytes=5-2` is invalid: either 416 or the full 200 — never partial bytes."""
        srv, path = ranged
        r = get_range(srv, path, "bytes=5-2")
        assert r.status in (200, 416), r
        if r.status == 200:
            assert r.body == BLOB

    def test_multi_range_is_full_200_or_valid_multipart(self, ranged):
        """`bytes=0-1,4-5` → 200 with the full body, or a well-formed 206
        multipart/byteranges with both parts."""
        srv, path = ranged
        r = get_range(srv, path, "bytes=0-1,4-5")
        assert r.status in (200, 206), r
        if r.status == 200:
            assert r.body == BLOB
            return
        parts = parse_byteranges(r)
        assert parts == [(f"bytes 0-1/{SIZE}", BLOB[0:2]), (f"bytes 4-5/{SIZE}", BLOB[4:6])]
        assert r.header("Content-Length") == str(len(r.body))

    def test_head_ignores_range(self, ranged):
        """HEAD with Range → 200 and the full Content-Length, no body."""
        srv, path = ranged
        r = srv.request("HEAD", path, headers={"Range": "bytes=2-5"})
        assert r.status == 200
        assert r.header("Content-Length") == str(SIZE)
        assert r.body == b""

    @pytest.mark.parametrize("offset,length,expect", [
        (SIZE - 99, 100, (SIZE - 99, SIZE - 1)),
        (SIZE - 50, 100, (SIZE - 50, SIZE - 1)),
        (SIZE, 100, None),
        (SIZE + 100, 100, None),
    ])
    def test_restic_out_of_bounds_reads(self, ranged, offset, length, expect):
        """restic's backend suite: length 100 near/after the end → the available bytes
        as 206, or 416 when the offset is >= size."""
        srv, path = ranged
        r = get_range(srv, path, f"bytes={offset}-{offset + length - 1}")
        if expect is None:
            assert_unsatisfiable(r, srv)
        else:
            assert_partial(r, *expect)

    def test_range_on_empty_object(self, server, repo):
        """`bytes=0-` on a 0-byte object → 200 empty or 416; never a bogus 206."""
        oid = object_id(b"")
        server.request("POST", f"/r/keys/{oid}", body=b"")
        r = server.request("GET", f"/r/keys/{oid}", headers={"Range": "bytes=0-"})
        assert r.status in (200, 416), r
        if r.status == 200:
            assert r.body == b""


def parse_byteranges(resp):
    """[(Content-Range, bytes)] of a multipart/byteranges body."""
    ctype = resp.header("Content-Type") or ""
    m = re.match(r'\s*multipart/byteranges\s*;\s*boundary="?([^";]+)"?', ctype)
    assert m, ctype
    delimiter = b"--" + m.group(1).encode()
    sections = resp.body.split(delimiter)
    parts = []
    for section in sections[1:]:
        if section.startswith(b"--"):
            break
        assert section.startswith(b"\r\n"), section[:20]
        head, sep, body = section[2:].partition(b"\r\n\r\n")
        assert sep, section[:80]
        assert body.endswith(b"\r\n")
        body = body[:-2]
        headers = {}
        for line in head.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers.get("content-range"), body))
    return parts


# -- listing -----------------------------------------------------------------------


class TestListing:
    @pytest.mark.parametrize("kind", TYPES)
    def test_empty_listing_v2(self, server, repo, kind):
        """Fresh repo, `Accept: application/vnd.x.restic.rest.v2` → 200, exact v2
        Content-Type, body `[]`."""
        r, names = list_names(server, f"/r/{kind}/", accept=V2)
        assert r.header("Content-Type") == V2
        assert names == []

    @pytest.mark.parametrize("kind", TYPES)
    def test_empty_listing_v1(self, server, repo, kind):
        """Without Accept → 200, `application/vnd.x.restic.rest.v1`, body `[]`."""
        r, names = list_names(server, f"/r/{kind}/")
        assert r.header("Content-Type") == V1
        assert names == []

    @pytest.mark.parametrize("kind", TYPES)
    def test_listing_v2_names_and_sizes_sorted(self, server, repo, kind):
        """v2 → `[{"name": id, "size": n}, …]`, sorted by name, exact sizes."""
        bodies = [payload(10 * (i + 1), f"{kind}{i}".encode()) for i in range(5)]
        for b in bodies:
            assert server.upload("r", kind, b).status == 200
        r, entries = list_names(server, f"/r/{kind}/", accept=V2)
        assert r.header("Content-Type") == V2
        expected = sorted(({"name": object_id(b), "size": len(b)} for b in bodies),
                          key=lambda e: e["name"])
        assert entries == expected
        assert all(set(e) == {"name", "size"} for e in entries)

    @pytest.mark.parametrize("kind", TYPES)
    def test_listing_v1_names_sorted(self, server, repo, kind):
        """v1 → a JSON array of the names (strings), sorted."""
        bodies = [payload(7, f"{kind}{i}".encode()) for i in range(5)]
        for b in bodies:
            server.upload("r", kind, b)
        r, names = list_names(server, f"/r/{kind}/")
        assert r.header("Content-Type") == V1
        assert names == sorted(object_id(b) for b in bodies)

    def test_data_listing_walks_all_fan_out_subdirs(self, server, repo):
        """`data/` lists the files inside its `xx/` subdirectories, across prefixes."""
        bodies = [payload(50, f"d{i}".encode()) for i in range(20)]
        for b in bodies:
            server.upload("r", "data", b)
        prefixes = {object_id(b)[:2] for b in bodies}
        assert len(prefixes) > 5
        _, names = list_names(server, "/r/data/")
        assert names == sorted(object_id(b) for b in bodies)

    @pytest.mark.parametrize("accept", [V2 + ", */*", "*/*", V1, "application/json",
                                        V2 + "; q=1", "application/vnd.x.restic.rest.v3"])
    def test_v2_only_for_the_exact_accept_string(self, server, repo, accept):
        """Any Accept other than exactly the v2 string → v1 format; the body always
        matches the Content-Type (restic picks its parser from Content-Type)."""
        body = b"one data blob"
        server.upload("r", "data", body)
        r, names = list_names(server, "/r/data/", accept=accept)
        assert r.header("Content-Type") == V1
        assert names == [object_id(body)]

    @pytest.mark.parametrize("kind", TYPES)
    def test_listing_of_never_created_repo_is_404(self, server, kind):
        """GET /new/{type}/ on a repo that does not exist → 404 (v1 and v2)."""
        assert_error(server.request("GET", f"/new/{kind}/"), 404, server)
        assert_error(server.request("GET", f"/new/{kind}/", headers={"Accept": V2}), 404, server)
        assert not (server.data_dir / "new").exists()

    def test_listing_of_missing_type_dir_is_404(self, server, repo):
        """A repo dir whose type dir is missing → 404 (not an empty list)."""
        (server.data_dir / "r" / "locks").rmdir()
        assert server.request("GET", "/r/locks/").status == 404
        assert server.request("GET", "/r/locks/", headers={"Accept": V2}).status == 404

    def test_listing_ignores_junk_dotfiles_and_temp_files(self, server, repo):
        """Only regular files whose names do not start with `.` are listed: no plain
        files directly in data/, no `.upload-*`, no `.DS_Store`, no directories."""
        body_d, body_k = b"data blob", b"key blob"
        server.upload("r", "data", body_d)
        server.upload("r", "keys", body_k)
        base = server.data_dir / "r"
        (base / "data" / "junk").write_bytes(b"junk")
        sub = base / "data" / object_id(body_d)[:2]
        (sub / ".DS_Store").write_bytes(b"x")
        (sub / (".upload-" + object_id(b"inflight"))).write_bytes(b"partial")
        (base / "keys" / ".upload-123").write_bytes(b"partial")
        (base / "keys" / ".hidden").write_bytes(b"x")
        (base / "keys" / object_id(b"a directory")).mkdir()
        _, names = list_names(server, "/r/data/")
        assert names == [object_id(body_d)]
        r, entries = list_names(server, "/r/keys/", accept=V2)
        assert entries == [{"name": object_id(body_k), "size": len(body_k)}]

    def test_v2_listing_of_names_json_must_escape_is_still_exact_json(self, server, repo):
        """Files put into a type folder by hand may have any name; the v2 listing is
        still valid JSON that names each exactly (restic's own names are hex)."""
        body_k = b"key blob"
        server.upload("r", "keys", body_k)
        odd = ['quote"in', "back\\slash", "tab\tname", "caf\u00e9", "del\x7f", "}{,:"]
        for i, name in enumerate(odd):
            (server.data_dir / "r" / "keys" / name).write_bytes(b"x" * i)
        r, entries = list_names(server, "/r/keys/", accept=V2)
        expected = [{"name": n, "size": odd.index(n)} for n in odd]
        expected.append({"name": object_id(body_k), "size": len(body_k)})
        assert entries == sorted(expected, key=lambda e: e["name"])

    def test_listings_of_repos_are_separate(self, server):
        """The root repo's listing does not include a sub-repo's objects and vice versa."""
        server.create_repo("")
        server.create_repo("alice")
        server.create_repo("alice/work")
        bodies = {"": b"root key", "alice": b"alice key", "alice/work": b"work key"}
        for repo, body in bodies.items():
            assert server.upload(repo, "keys", body).status == 200
        for repo, body in bodies.items():
            _, names = list_names(server, f"{prefix(repo)}/keys/")
            assert names == [object_id(body)], repo

    def test_in_flight_upload_is_not_listed(self, server, repo):
        """While an upload is half sent, the listing shows neither the object nor a
        temp name; once complete, the object appears."""
        body = payload(200_000, b"inflight")
        oid = object_id(body)
        head = (f"POST /r/data/{oid} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((server.host, server.port), timeout=10) as s:
            s.sendall(head + body[:100_000])
            time.sleep(0.3)
            for accept in (None, V2):
                _, names = list_names(server, "/r/data/", accept=accept)
                assert names == [], names
            s.sendall(body[100_000:])
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert status_of(reply) == 200, reply[:200]
        _, names = list_names(server, "/r/data/")
        assert names == [oid]

    def test_listing_sizes_match_head(self, server, repo):
        """The v2 size of each entry equals HEAD's Content-Length (restic relies on it)."""
        for i in range(3):
            server.upload("r", "snapshots", payload(100 + i, f"s{i}".encode()))
        _, entries = list_names(server, "/r/snapshots/", accept=V2)
        for e in entries:
            r = server.request("HEAD", f"/r/snapshots/{e['name']}")
            assert int(r.header("Content-Length")) == e["size"]


# -- hostile and odd paths ----------------------------------------------------------


# Targets that must be rejected with 400/404 whatever the method.  The layout built
# by `hostile_layout` makes each one observable if it were resolved: `outside_repo`
# (a repo next to the data dir), `alice`/`bob`/`a/b` repos, a hidden repo `.hidden`,
# `.htpasswd`, and a root config — every one with sentinel content.
HOSTILE_PATHS = [
    "/../outside_repo/config",
    "/../outside_repo/keys/",
    "/%2e%2e/outside_repo/config",
    "/%2E%2E/outside_repo/config",
    "/.%2e/outside_repo/config",
    "/%2e./outside_repo/config",
    "/..%2foutside_repo/config",
    "/..%2Foutside_repo%2Fconfig",
    "/%2e%2e%2foutside_repo/config",
    "/alice/../bob/config",
    "/alice/%2e%2e/bob/config",
    "/alice%2f..%2fbob/config",
    "/alice%2F..%2Fbob/config",
    "/alice%5c..%5cbob/config",
    "/alice\\..\\bob/config",
    "/..\\outside_repo/config",
    "/%5c%5cx/config",
    "/data/../config",
    "/keys/../config",
    "/./config",
    "/%2e/config",
    "/alice/./config",
    "/alice/%2e/config",
    "/alice/..",
    "/alice/../",
    "/..",
    "/../",
    "//config",
    "///config",
    "//alice/config",
    "/alice//config",
    "/alice/.//config",
    "/a%2Fb/config",
    "/a%2fb/config",
    "/a%2Fb/keys/",
    "/a%00b/config",
    "/alice%00/config",
    "/alice/config%00",
    "/%00/config",
    "/a%0d%0ab/config",
    "/a%0ab/config",
    "/a%09b/config",
    "/a%7fb/config",
    "/a%1b%5b31m/config",
    "/.htpasswd",
    "/.htpasswd/config",
    "/.hidden/config",
    "/.hidden/keys/",
    "/alice/.hidden/config",
    "/%2ehidden/config",
    "/%C0%AE%C0%AE/outside_repo/config",
    "/%FF/config",
    "/caf%C3/config",
    "/%ED%A0%80/config",
]

HOSTILE_CREATES = [
    "/../x/?create=true",
    "/%2e%2e/x/?create=true",
    "/..%2fx/?create=true",
    "/alice/../x/?create=true",
    "/.hidden2/?create=true",
    "/%2ehidden2/?create=true",
    "/a%2Fc/?create=true",
    "/x%00y/?create=true",
    "//x/?create=true",
    "/x\\y/?create=true",
    "/%FF/?create=true",
]

SENTINELS = [b"OUTSIDE-CONFIG", b"ALICE-CONFIG", b"BOB-CONFIG", b"AB-CONFIG",
             b"HIDDEN-CONFIG", b"ROOT-CONFIG", b"HTPASSWD-SECRET", b"OUTSIDE-FILE"]


def hostile_layout(srv):
    """Repos and sentinel files inside and next to the data dir."""
    data = srv.data_dir
    outside = data.parent / "outside_repo"
    (outside / "keys").mkdir(parents=True)
    (outside / "config").write_bytes(b"OUTSIDE-CONFIG")
    (data.parent / "OUTSIDE").write_bytes(b"OUTSIDE-FILE")
    for repo, cfg in (("", b"ROOT-CONFIG"), ("alice", b"ALICE-CONFIG"),
                      ("bob", b"BOB-CONFIG"), ("a/b", b"AB-CONFIG")):
        srv.create_repo(repo)
        assert srv.request("POST", f"{prefix(repo)}/config", body=cfg).status == 200
    hidden = data / ".hidden"
    (hidden / "keys").mkdir(parents=True)
    (hidden / "config").write_bytes(b"HIDDEN-CONFIG")
    (data / "alice" / ".hidden").mkdir()
    (data / "alice" / ".hidden" / "config").write_bytes(b"HIDDEN-CONFIG")
    (data / ".htpasswd").write_bytes(b"alice:HTPASSWD-SECRET\n")
    return tree_digest(data.parent)


class TestHostilePaths:
    @pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
    def test_traversal_and_odd_paths_are_rejected(self, server, method):
        """`..`, `%2e%2e`, `//`, `/./`, `%2F`, backslash, NUL, control chars, dot
        segments and invalid UTF-8 → 400/404: no redirect, no 5xx, no sentinel bytes
        in the answer, and nothing inside or outside --path changes."""
        before = hostile_layout(server)
        failures = []
        for path in HOSTILE_PATHS:
            r = server.request(method, path, body=b"EVIL" if method == "POST" else None)
            problems = []
            if r.status not in BAD_PATH:
                problems.append(f"status {r.status}")
            if r.header("Location"):
                problems.append("Location " + r.header("Location"))
            if any(s in r.body for s in SENTINELS):
                problems.append("sentinel in body")
            if b"Traceback" in r.body or str(server.data_dir).encode() in r.body:
                problems.append("leak")
            if problems:
                failures.append((path, problems))
        assert failures == []
        assert tree_digest(server.data_dir.parent) == before
        assert "Traceback" not in server.stderr

    def test_hostile_repo_creation_is_rejected(self, server):
        """`POST <odd path>/?create=true` → 400/404 and no directory appears anywhere."""
        before = hostile_layout(server)
        failures = []
        for target in HOSTILE_CREATES:
            r = server.request("POST", target)
            if r.status not in BAD_PATH or r.header("Location"):
                failures.append((target, r.status))
        assert failures == []
        assert tree_digest(server.data_dir.parent) == before
        assert "Traceback" not in server.stderr

    def test_encoded_slash_is_not_a_separator(self, server):
        """`/a%2Fb/config` is not `/a/b/config` (deliberate deviation from rest-server,
        which serves a/b): GET/HEAD → 400/404; POST/DELETE change nothing."""
        server.create_repo("a/b")
        server.request("POST", "/a/b/config", body=b"AB-CONFIG")
        body = b"a key"
        before = tree_digest(server.data_dir)
        r = server.request("GET", "/a%2Fb/config")
        assert r.status in BAD_PATH and b"AB-CONFIG" not in r.body, r
        assert server.request("HEAD", "/a%2Fb/config").status in BAD_PATH
        assert server.request("DELETE", "/a%2Fb/config").status in BAD_PATH
        r = server.request("POST", f"/a%2Fb/keys/{object_id(body)}", body=body)
        assert r.status in BAD_PATH, r
        assert server.request("GET", "/a%2Fb/keys/").status in BAD_PATH
        assert tree_digest(server.data_dir) == before

    def test_htpasswd_is_never_served(self, server):
        """`GET /.htpasswd` → 404/400 and its content never appears."""
        (server.data_dir / ".htpasswd").write_bytes(b"alice:HTPASSWD-SECRET\n")
        for path in ("/.htpasswd", "/.htpasswd/", "/.htpasswd/config", "/%2ehtpasswd"):
            r = server.request("GET", path)
            assert r.status in BAD_PATH, (path, r)
            assert b"HTPASSWD-SECRET" not in r.body

    def test_repo_name_that_is_a_file_on_disk_is_not_a_server_error(self, server):
        """`/private_key/config` where `private_key` is a file: reads and uploads are
        4xx (the repo does not exist), never 5xx; creating a repo there fails; the
        file is never modified or served."""
        key = server.data_dir / "private_key"
        key.write_bytes(b"PRIVATE")
        body = b"k"
        for method, path in (("GET", "/private_key/config"), ("HEAD", "/private_key/config"),
                             ("GET", "/private_key/keys/"),
                             ("POST", "/private_key/config"),
                             ("POST", f"/private_key/keys/{object_id(body)}"),
                             ("DELETE", "/private_key/config")):
            r = server.request(method, path, body=body if method == "POST" else None)
            assert r.status < 500, (method, path, r)
            assert r.status != 200 or method == "DELETE", (method, path, r)
            assert b"PRIVATE" not in r.body
        r = server.request("POST", "/private_key/?create=true")
        assert r.status != 200, r
        assert_no_leak(r, server)
        assert key.read_bytes() == b"PRIVATE"

    @pytest.mark.parametrize("length", [256, 1000, 4000])
    def test_overlong_repo_segment_is_4xx(self, server, length):
        """A repo segment longer than a file name may be (ENAMETOOLONG) → 4xx, not 500."""
        name = "a" * length
        for method, path in (("POST", f"/{name}/?create=true"), ("GET", f"/{name}/config"),
                             ("POST", f"/{name}/config")):
            r = server.request(method, path, body=b"cfg" if path.endswith("config") else None)
            assert 400 <= r.status < 500, (method, length, r)
            assert_no_leak(r, server)

    def test_query_string_never_enters_path_resolution(self, server):
        """`/alice/config?x=/../bob` serves alice's config; the query is ignored."""
        for repo, cfg in (("alice", b"ALICE"), ("bob", b"BOB")):
            server.create_repo(repo)
            server.request("POST", f"/{repo}/config", body=cfg)
        r = server.request("GET", "/alice/config?x=/../bob/config")
        assert r.status == 200 and r.body == b"ALICE"
        r = server.request("GET", "/alice/config?../../bob")
        assert r.status == 200 and r.body == b"ALICE"


# -- error shape, leaks, health, startup ----------------------------------------


class TestErrorShape:
    def test_error_bodies_are_reason_phrase_plain_text(self, server, repo):
        """400, 403, 404, 405, 416 bodies are `<Reason>\\n`, text/plain; charset=utf-8,
        nosniff; none leaks a traceback, the data path or the Python version."""
        body = b"object"
        server.upload("r", "keys", body)
        oid = object_id(body)
        cases = [
            (400, server.request("POST", "/r/?create=nope")),
            (400, server.request("POST", f"/r/keys/{oid[::-1]}", body=body)),
            (403, server.upload("r", "keys", body)),
            (404, server.request("GET", "/r/config")),
            (404, server.request("GET", "/nope/keys/")),
            (405, server.request("PUT", "/r/config", body=b"x")),
            (416, server.request("GET", f"/r/keys/{oid}", headers={"Range": "bytes=100-"})),
        ]
        for status, r in cases:
            assert_error(r, status, server)
        assert cases[0][1].body == b"Bad Request\n"
        assert cases[2][1].body == b"Forbidden\n"
        assert cases[3][1].body == b"Not Found\n"
        assert cases[5][1].body == b"Method Not Allowed\n"

    def test_head_error_has_no_body_on_the_wire(self, server, repo):
        """A HEAD 404/405 sends headers only: nothing follows the blank line."""
        for path in ("/r/config", "/r/keys/"):
            got, _ = exchange(server, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n"
                                      f"Connection: close\r\n\r\n".encode(), timeout=5.0)
            head, sep, rest = got.partition(b"\r\n\r\n")
            assert sep, got
            assert status_of(head) in (404, 405)
            assert rest == b"", (path, rest)

    def test_server_header_does_not_reveal_python(self, server, repo):
        """No response's Server header names Python or its version."""
        server.request("POST", "/r/config", body=b"abc")
        for method, path in (("GET", "/r/config"), ("GET", "/r/keys/"), ("GET", "/missing"),
                             ("HEAD", "/r/config"), ("PUT", "/r/config"),
                             ("POST", "/?create=nope"), ("GET", "/health")):
            r = server.request(method, path, body=b"" if method in ("PUT", "POST") else None)
            assert_no_leak(r, server)

    def test_success_bodies_are_empty(self, server):
        """create, POST object, POST config and DELETE answer exactly 200 with no body."""
        assert_ok_empty(server.request("POST", "/?create=true"))
        assert_ok_empty(server.request("POST", "/config", body=b"c"))
        assert_ok_empty(server.upload("", "locks", b"lock"))
        assert_ok_empty(server.request("DELETE", f"/locks/{object_id(b'lock')}"))
        assert_ok_empty(server.request("DELETE", "/config"))


class TestHealth:
    def test_health_without_auth_configured(self, server):
        """GET /health → 200 on a --no-auth server."""
        r = server.request("GET", "/health")
        assert r.status == 200
        assert_no_leak(r, server)

    def test_health_needs_no_credentials_when_auth_is_on(self, start_server, door, tmp_path):
        """With htpasswd auth, /health → 200 without credentials while the API → 401."""
        htpasswd = sha_htpasswd(tmp_path)
        srv = start_server("--htpasswd-file", str(htpasswd), door=door)
        r = srv.request("GET", "/health")
        assert r.status == 200
        r = srv.request("GET", "/config")
        assert_error(r, 401, srv)
        assert r.body == b"Unauthorized\n"
        r = srv.request("POST", "/?create=true", headers={"Authorization":
                                                          basic_auth("alice", "secret")})
        assert r.status == 200


class TestStartupCleanup:
    def plant(self, data_dir, repo=""):
        base = repo_dir(data_dir, repo)
        for kind in TYPES:
            (base / kind).mkdir(parents=True, exist_ok=True)
        (base / "data" / "ab").mkdir(exist_ok=True)
        body = b"kept object"
        oid = object_id(body)
        (base / "data" / oid[:2]).mkdir(exist_ok=True)
        (base / "data" / oid[:2] / oid).write_bytes(body)
        temps = [base / "data" / "ab" / ".upload-leftover1", base / "keys" / ".upload-leftover2"]
        old = time.time() - 86400
        for t in temps:
            t.write_bytes(b"partial")
            os.utime(t, (old, old))
        return temps, base / "data" / oid[:2] / oid

    def test_startup_removes_leftover_upload_files(self, start_server, door, data_dir):
        """`.upload-*` leftovers in data/ab/ and keys/ are removed at startup; real
        objects and other files are kept."""
        temps, kept = self.plant(data_dir)
        (data_dir / ".htpasswd").write_bytes(b"keep me\n")
        srv = start_server("--no-auth", door=door, data_dir=data_dir)
        assert wait_for(lambda: not any(t.exists() for t in temps))
        assert kept.read_bytes() == b"kept object"
        assert (data_dir / ".htpasswd").read_bytes() == b"keep me\n"
        assert srv.request("GET", f"/data/{kept.name}").body == b"kept object"

    def test_startup_removes_leftover_upload_files_in_sub_repos(self, start_server, door,
                                                                 data_dir):
        """The startup sweep also covers sub-repos (one and two levels deep)."""
        temps1, kept1 = self.plant(data_dir, "alice")
        temps2, kept2 = self.plant(data_dir, "alice/work")
        start_server("--no-auth", door=door, data_dir=data_dir)
        assert wait_for(lambda: not any(t.exists() for t in temps1 + temps2))
        assert kept1.exists() and kept2.exists()
