"""Authentication: htpasswd files, Basic credentials, reloads, the credential
cache, timing, and proxy-header auth (issue 3).

Every htpasswd entry here is written by Apache's own `htpasswd` tool
(apache2-utils), except the `$2a$`/`$2b$` bcrypt variants, which that tool
never writes and which are made with the `bcrypt` package.  A server is always
a real process; "logged in" means the request got past authentication
(`GET /keys/` on a prepared root repository answers 200), "refused" means 401.

What pyrestserver promises beyond Go rest-server (reference §4.1):
* it accepts `$apr1$` (htpasswd's default), `$5$` and `$6$` as well as bcrypt
  and `{SHA}`; plaintext and DES crypt are refused with a warning naming the user;
* a malformed htpasswd line is a clear error with its line number, not a crash;
* a missing `bcrypt` package with bcrypt users in the file stops the server
  instead of silently refusing every backup;
* 401 carries `WWW-Authenticate: Basic realm="restic"`;
* verified credentials are cached for 60 s (rest-server's cache lasts <= 5 s),
  a reload empties the cache, and an unknown user costs as much as a wrong
  password.

TLS client-certificate authentication is tested with the TLS tests.
"""

import base64
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IN_CI, SERVER_SCRIPT, ServerProcess, basic_auth

REALM = 'Basic realm="restic"'
BCRYPT_MISSING_HINT = "pip install pyrestserver[bcrypt]"


# -- helpers ------------------------------------------------------------------


@pytest.fixture(scope="session")
def htpasswd_tool():
    """Apache's htpasswd (Debian: apache2-utils)."""
    path = shutil.which("htpasswd")
    if path is None:
        if IN_CI:
            pytest.fail("htpasswd is required under CI=true (apt-get install apache2-utils)")
        pytest.skip("htpasswd not installed (apt-get install apache2-utils)")
    return path


@pytest.fixture(scope="session")
def entry(htpasswd_tool):
    """entry(flags, user, password) -> one 'user:hash' line written by htpasswd."""

    def make(flags, user, password):
        p = subprocess.run(
            [htpasswd_tool, "-n", "-b", *flags, user, password],
            capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
        )
        line = p.stdout.strip().splitlines()[0]
        assert line.startswith(user + ":"), line
        return line

    return make


def bcrypt_entry(user, password, prefix, rounds=4):
    """A bcrypt line with an explicit $2a$/$2b$/$2y$ prefix (htpasswd only writes $2y$)."""
    bcrypt = pytest.importorskip("bcrypt")
    salt_prefix = b"2a" if prefix == "$2a$" else b"2b"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds, prefix=salt_prefix)).decode()
    # $2y$ is the same algorithm as $2b$ under PHP's name (the one htpasswd writes)
    return f"{user}:{prefix}{hashed[4:]}"


def write_htpasswd(path, lines, newline="\n"):
    Path(path).write_bytes(newline.join(lines).encode("utf-8") + newline.encode())


@pytest.fixture
def auth_server(start_server, tmp_path):
    """auth_server(lines, *args, door=, env=) -> a server using an htpasswd file
    with these lines (at srv.htpasswd), on its own data directory, with a root
    repository prepared so that `GET /keys/` answers 200 once logged in."""
    count = [0]

    def start(lines, *args, door="builtin", env=None, newline="\n"):
        count[0] += 1
        n = count[0]
        path = tmp_path / f"htpasswd-{n}"
        write_htpasswd(path, lines, newline)
        data = tmp_path / f"data-{n}"
        (data / "keys").mkdir(parents=True)
        srv = start_server("--htpasswd-file", str(path), *args, door=door, data_dir=data, env=env)
        srv.htpasswd = path
        return srv

    return start


def probe(srv, auth=None, headers=None, method="GET"):
    """Status of a request that needs nothing but a successful login."""
    return srv.request(method, "/keys/", auth=auth, headers=headers)


def status(srv, auth=None, headers=None):
    return probe(srv, auth, headers).status


def timed(srv, auth):
    start = time.perf_counter()
    r = probe(srv, auth)
    return r.status, time.perf_counter() - start


def failed_login_times(srv, user, n):
    """n wrong passwords for `user` interleaved with n unknown users: the
    seconds each 401 took, as (wrong password, unknown user)."""
    wrong, unknown = [], []
    for i in range(n):
        code, t = timed(srv, (user, f"guess-{i}"))
        assert code == 401
        wrong.append(t)
        code, t = timed(srv, (f"nobody-{i}", f"guess-{i}"))
        assert code == 401
        unknown.append(t)
    return wrong, unknown


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def count_lines(srv, text):
    return sum(text in line for line in srv.stderr_lines)


def sighup_and_wait(srv, expect):
    """Send SIGHUP and wait until the server logged one more `expect` line."""
    before = count_lines(srv, expect)
    os.kill(srv.pid, signal.SIGHUP)
    assert wait_for(lambda: count_lines(srv, expect) > before), (
        f"no {expect!r} after SIGHUP:\n{srv.stderr}")


def run_to_exit(args, env=None, timeout=20):
    """Run pyrestserver expecting it to exit without ever serving."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, str(SERVER_SCRIPT), *args, "--listen", "127.0.0.1:0"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=full_env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"server kept running although it should have refused to start:\n{exc.stderr}")
    assert "start server on" not in p.stderr, p.stderr
    return p


# -- hash formats -------------------------------------------------------------

# (id, htpasswd flags, expected hash prefix)
ACCEPTED_FORMATS = [
    ("bcrypt-htpasswd-B", ["-B"], "$2y$"),
    ("apr1-htpasswd-m", ["-m"], "$apr1$"),
    ("apr1-htpasswd-default", [], "$apr1$"),
    ("sha256crypt-htpasswd-2", ["-2"], "$5$"),
    ("sha512crypt-htpasswd-5", ["-5"], "$6$"),
    ("sha512crypt-rounds-htpasswd-5-r", ["-5", "-r", "1000"], "$6$rounds=1000$"),
    ("sha1-htpasswd-s", ["-s"], "{SHA}"),
]
COLON_PASSWORD = "pä ss:wörd:x"


class TestHashFormats:
    @pytest.mark.parametrize("flags,prefix", [f[1:] for f in ACCEPTED_FORMATS],
                             ids=[f[0] for f in ACCEPTED_FORMATS])
    def test_htpasswd_tool_format_right_password_in_wrong_password_out(
            self, auth_server, entry, flags, prefix):
        """Every secure format Apache's htpasswd writes logs in with the right
        password (also a non-ASCII one containing colons) and nothing else."""
        lines = [entry(flags, "alice", "s3cret"), entry(flags, "zoe", COLON_PASSWORD)]
        assert all(line.split(":", 1)[1].startswith(prefix) for line in lines), lines
        srv = auth_server(lines)
        assert status(srv, ("alice", "s3cret")) == 200
        assert status(srv, ("zoe", COLON_PASSWORD)) == 200
        assert status(srv, ("alice", "s3cret ")) == 401
        assert status(srv, ("alice", "S3cret")) == 401
        assert status(srv, ("alice", "")) == 401
        assert status(srv, ("zoe", COLON_PASSWORD.split(":")[0])) == 401
        assert status(srv, ("alice", COLON_PASSWORD)) == 401
        assert "Ignoring" not in srv.stderr

    @pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
    def test_bcrypt_variants_from_the_bcrypt_module(self, auth_server, prefix):
        line = bcrypt_entry("alice", "s3cret", prefix)
        assert line.startswith("alice:" + prefix)
        srv = auth_server([line])
        assert status(srv, ("alice", "s3cret")) == 200
        assert status(srv, ("alice", "s3cre")) == 401
        assert status(srv, ("alice", "s3cret\0")) == 401

    @pytest.mark.parametrize("flag,name", [("-p", "plaintext"), ("-d", "des")])
    def test_insecure_formats_are_refused_with_a_warning_naming_the_user(
            self, auth_server, entry, flag, name):
        """Plaintext (-p) and DES crypt (-d) entries never log in, even with the
        right password; the server starts, says which user it ignored, and the
        other users keep working."""
        weak_user = f"weak-{name}"
        srv = auth_server([entry(["-B"], "alice", "s3cret"), entry([flag], weak_user, "pw123")])
        assert status(srv, (weak_user, "pw123")) == 401
        stored = srv.htpasswd.read_text().splitlines()[1].split(":", 1)[1]
        assert status(srv, (weak_user, stored)) == 401  # the stored text is no password either
        assert status(srv, ("alice", "s3cret")) == 200
        warnings = [line for line in srv.stderr_lines if weak_user in line]
        assert warnings, f"no startup warning naming {weak_user}:\n{srv.stderr}"

    def test_other_unsupported_schemes_never_log_in(self, auth_server, entry):
        """{SSHA} and $1$ md5-crypt entries (both correct hashes of "pw") are
        refused too: fail closed, with a warning naming the user."""
        import hashlib
        salt = b"NaCl1234"
        ssha = "{SSHA}" + base64.b64encode(hashlib.sha1(b"pw" + salt).digest() + salt).decode()
        srv = auth_server([
            entry(["-s"], "alice", "s3cret"),
            f"ssha:{ssha}",
            "md5crypt:$1$saltsalt$6SNdNaZLKst2LlSm7oPPL1",  # openssl passwd -1 -salt saltsalt pw
        ])
        for user in ("ssha", "md5crypt"):
            assert status(srv, (user, "pw")) == 401, user
            assert any(user in line for line in srv.stderr_lines), (user, srv.stderr)
        assert status(srv, ("alice", "s3cret")) == 200


class TestBcryptPackageMissing:
    def test_bcrypt_entries_without_bcrypt_refuse_to_start(self, tmp_path, entry, hide_bcrypt):
        """A silent 401 for every backup would be worse than not starting."""
        htpasswd = tmp_path / "htpasswd"
        write_htpasswd(htpasswd, [entry(["-s"], "bob", "pw"), entry(["-B"], "alice", "s3cret")])
        p = run_to_exit(["--path", str(tmp_path / "data"), "--htpasswd-file", str(htpasswd)],
                        env=hide_bcrypt)
        assert p.returncode != 0
        assert BCRYPT_MISSING_HINT in p.stderr
        assert "Traceback" not in p.stderr

    def test_files_without_bcrypt_entries_do_not_need_bcrypt(
            self, auth_server, entry, hide_bcrypt):
        srv = auth_server([entry(["-s"], "bob", "pw"), entry(["-m"], "carol", "pw2")],
                          env=hide_bcrypt)
        assert status(srv, ("bob", "pw")) == 200
        assert status(srv, ("carol", "pw2")) == 200
        assert status(srv, ("bob", "nope")) == 401

    def test_reload_that_adds_bcrypt_without_bcrypt_keeps_old_users(
            self, auth_server, entry, hide_bcrypt):
        srv = auth_server([entry(["-s"], "bob", "pw")], env=hide_bcrypt)
        write_htpasswd(srv.htpasswd, [entry(["-B"], "alice", "s3cret")])
        sighup_and_wait(srv, "Could not reload")
        assert BCRYPT_MISSING_HINT in srv.stderr
        assert status(srv, ("bob", "pw")) == 200
        assert status(srv, ("alice", "s3cret")) == 401


# -- parsing ------------------------------------------------------------------


class TestParsing:
    @pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
    def test_rest_server_parsing_rules(self, auth_server, entry, newline):
        """Comments and blank lines are ignored, leading spaces tolerated,
        invalid usernames skipped with a warning, the last duplicate wins,
        passwords may contain colons, usernames may be non-ASCII letters."""
        lines = [
            "# users of the backup server",
            "#carol:" + entry(["-s"], "carol", "pw").split(":", 1)[1],
            "",
            "   " + entry(["-B"], "henry", "pw-henry"),
            "\t" + entry(["-s"], "tabby", "pw-tabby"),
            entry(["-s"], "bad user", "pw"),
            entry(["-s"], "x/y", "pw"),
            entry(["-s"], "foo/config", "pw"),
            entry(["-s"], "dave", "first"),
            entry(["-m"], "dave", "second"),
            entry(["-B"], "ivan", "pass:with:colons"),
            entry(["-s"], "zoë", "pw-zoe"),
            entry(["-s"], "a.b_c-d@example.org", "pw-mail"),
        ]
        srv = auth_server(lines, newline=newline)
        assert status(srv, ("carol", "pw")) == 401
        assert status(srv, ("#carol", "pw")) == 401
        assert status(srv, ("henry", "pw-henry")) == 200
        assert status(srv, ("tabby", "pw-tabby")) == 200
        assert status(srv, ("bad user", "pw")) == 401
        assert status(srv, ("x/y", "pw")) == 401
        assert status(srv, ("foo/config", "pw")) == 401
        assert status(srv, ("dave", "second")) == 200
        assert status(srv, ("dave", "first")) == 401
        assert status(srv, ("ivan", "pass:with:colons")) == 200
        assert status(srv, ("ivan", "pass")) == 401
        assert status(srv, ("zoë", "pw-zoe")) == 200
        assert status(srv, ("a.b_c-d@example.org", "pw-mail")) == 200
        for bad in ("bad user", "x/y", "foo/config"):
            assert any(bad in line for line in srv.stderr_lines), (bad, srv.stderr)

    @pytest.mark.parametrize("bad_line", ["alice-without-hash", "emptyhash:", ":"],
                             ids=["no-colon", "empty-hash", "only-colon"])
    def test_malformed_line_is_an_error_with_its_line_number(
            self, tmp_path, entry, bad_line):
        htpasswd = tmp_path / "htpasswd"
        write_htpasswd(htpasswd, [entry(["-s"], "bob", "pw"), "# comment", bad_line,
                                  entry(["-s"], "carol", "pw")])
        p = run_to_exit(["--path", str(tmp_path / "data"), "--htpasswd-file", str(htpasswd)])
        assert p.returncode != 0
        assert "line 3" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr

    def test_file_that_is_not_utf8_is_a_clear_error(self, tmp_path, entry):
        htpasswd = tmp_path / "htpasswd"
        htpasswd.write_bytes(entry(["-s"], "bob", "pw").encode() + b"\n\xff\xfe:junk\n")
        p = run_to_exit(["--path", str(tmp_path / "data"), "--htpasswd-file", str(htpasswd)])
        assert p.returncode != 0
        assert str(htpasswd) in p.stderr
        assert "Traceback" not in p.stderr

    @pytest.mark.parametrize("explicit", [False, True], ids=["default-path", "htpasswd-file"])
    def test_missing_htpasswd_refuses_to_start(self, tmp_path, explicit):
        """Without --no-auth a missing file is fatal before listening, and the
        message says how to fix it: --no-auth, or create a user."""
        data = tmp_path / "data"
        data.mkdir()
        args = ["--path", str(data)]
        if explicit:
            args += ["--htpasswd-file", str(tmp_path / "nope" / "htpasswd")]
        p = run_to_exit(args)
        assert p.returncode != 0
        assert "--no-auth" in p.stderr
        assert "user add" in p.stderr
        assert "Traceback" not in p.stderr

    def test_htpasswd_path_that_is_a_directory_refuses_to_start(self, tmp_path):
        (tmp_path / "dir").mkdir()
        p = run_to_exit(["--path", str(tmp_path / "data"),
                         "--htpasswd-file", str(tmp_path / "dir")])
        assert p.returncode != 0
        assert "Traceback" not in p.stderr

    @pytest.mark.parametrize("lines", [[], ["# nobody here yet", ""]], ids=["empty", "comments"])
    def test_file_without_users_starts_and_refuses_everyone(self, auth_server, lines):
        srv = auth_server(lines)
        assert status(srv) == 401
        assert status(srv, ("alice", "")) == 401
        assert status(srv, ("", "")) == 401
        assert srv.request("POST", "/?create=true", auth=("alice", "x")).status == 401


# -- the 401 response and malformed credentials --------------------------------


class TestUnauthorizedResponse:
    @pytest.mark.parametrize("auth", [None, ("alice", "wrong"), ("mallory", "s3cret")],
                             ids=["no-credentials", "wrong-password", "unknown-user"])
    @pytest.mark.parametrize("method,path", [("GET", "/keys/"), ("HEAD", "/config"),
                                             ("POST", "/?create=true"),
                                             ("DELETE", "/keys/" + "0" * 64)])
    def test_401_carries_basic_challenge(self, shared_auth_server, auth, method, path):
        r = shared_auth_server.request(method, path, auth=auth)
        assert r.status == 401
        assert r.header("WWW-Authenticate") == REALM
        if method != "HEAD":
            assert r.body == b"Unauthorized\n"
        else:
            assert r.body == b""

    def test_401_is_sent_before_reading_a_large_body(self, auth_server, entry):
        """A refused upload is answered without storing anything."""
        srv = auth_server([entry(["-B"], "alice", "s3cret")])
        body = os.urandom(512 * 1024)
        import hashlib
        r = srv.request("POST", "/data/" + hashlib.sha256(body).hexdigest(), body=body,
                        auth=("alice", "wrong"))
        assert r.status == 401
        assert [f for _, _, files in os.walk(srv.data_dir) for f in files] == []


def test_refused_upload_with_expect_100_continue_gets_401_not_continue(auth_server, entry):
    """The client is told no before it sends 100 MiB (built-in server; a WSGI
    server decides about 100 Continue itself)."""
    srv = auth_server([entry(["-B"], "alice", "s3cret")])
    head = (f"POST /data/{'ab' * 32} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {basic_auth('alice', 'wrong')}\r\n"
            "Content-Length: 104857600\r\nExpect: 100-continue\r\n\r\n").encode()
    reply = srv.raw(head, timeout=5)
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:100]
    assert b"100 Continue" not in reply


LONG_PASSWORD = "L" * 36 + "ö" * 18  # exactly 72 bytes in UTF-8, bcrypt's limit


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MALFORMED_AUTHORIZATION = [
    ("bad-base64", "Basic !!!!"),
    ("base64-with-junk", "Basic " + b64(b"alice:s3cret")[:4] + "*" + b64(b"alice:s3cret")[4:]),
    ("scheme-only", "Basic"),
    ("scheme-and-space", "Basic "),
    ("token-without-scheme", b64(b"alice:s3cret")),
    ("no-colon", "Basic " + b64(b"alice")),
    ("empty-user", "Basic " + b64(b":s3cret")),
    ("non-utf8-user", "Basic " + b64(b"al\xffice:s3cret")),
    ("non-utf8-password", "Basic " + b64(b"alice:s3cr\xe9t")),
    ("nul-after-password", "Basic " + b64(b"alice:s3cret\x00")),
    ("user-with-slash", "Basic " + b64(b"alice/../alice:s3cret")),
    ("bcrypt-100-byte-password", "Basic " + b64(("long:" + LONG_PASSWORD + "x" * 28).encode())),
    ("bcrypt-73-byte-password", "Basic " + b64(("long:" + LONG_PASSWORD + "x").encode())),
    ("huge-token", "Basic " + "QUFB" * 4000),
    ("bearer", "Bearer " + b64(b"alice:s3cret")),
    ("digest", 'Digest username="alice", realm="restic", nonce="abc", uri="/keys/", '
               'response="00000000000000000000000000000000"'),
    ("negotiate", "Negotiate YIIBhwYGKwYBBQUCoIIBezCCAXeg"),
    ("latin1-bytes", "Basic \xe9\xe9\xe9\xe9"),
]


@pytest.fixture(scope="module", params=["builtin", "wsgi"])
def shared_auth_server(request, tmp_path_factory, entry):
    """One server per door for the read-only credential checks below."""
    base = tmp_path_factory.mktemp(f"shared-auth-{request.param}")
    htpasswd = base / "htpasswd"
    write_htpasswd(htpasswd, [entry(["-B", "-C", "4"], "alice", "s3cret"),
                              entry(["-B", "-C", "4"], "long", LONG_PASSWORD),
                              entry(["-s"], "bob", "pw")])
    data = base / "data"
    (data / "keys").mkdir(parents=True)
    srv = ServerProcess(data, ["--htpasswd-file", str(htpasswd)], door=request.param).start()
    yield srv
    srv.stop()


class TestCredentials:
    @pytest.mark.parametrize("value", [v for _, v in MALFORMED_AUTHORIZATION],
                             ids=[i for i, _ in MALFORMED_AUTHORIZATION])
    def test_malformed_authorization_is_401_never_500(self, shared_auth_server, value):
        srv = shared_auth_server
        r = probe(srv, headers={"Authorization": value})
        assert r.status == 401, (value, r)
        assert r.header("WWW-Authenticate") == REALM
        assert status(srv, ("alice", "s3cret")) == 200  # and the server is fine

    @pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC", "bAsIc"])
    def test_scheme_name_is_case_insensitive(self, shared_auth_server, scheme):
        token = b64(b"alice:s3cret")
        assert status(shared_auth_server, headers={"Authorization": f"{scheme} {token}"}) == 200

    def test_bcrypt_password_of_exactly_72_bytes_works(self, shared_auth_server):
        assert len(LONG_PASSWORD.encode()) == 72
        assert status(shared_auth_server, ("long", LONG_PASSWORD)) == 200
        assert status(shared_auth_server, ("long", LONG_PASSWORD[:-1])) == 401

    def test_two_authorization_headers_never_log_in_as_the_wrong_one(self, shared_auth_server):
        srv = shared_auth_server
        good, bad = basic_auth("alice", "s3cret"), basic_auth("alice", "wrong")
        for first, second in ((bad, good), (good, bad)):
            reply = srv.raw((f"GET /keys/ HTTP/1.1\r\nHost: x\r\nAuthorization: {first}\r\n"
                             f"Authorization: {second}\r\nConnection: close\r\n\r\n").encode())
            code = int(reply.split(b" ", 2)[1])
            assert code in (400, 401), reply[:200]

    @pytest.mark.parametrize("auth", [("alice", "s3cret"), ("bob", "pw")])
    def test_user_cannot_use_another_users_password(self, shared_auth_server, auth):
        other = ("bob", "s3cret") if auth[0] == "alice" else ("alice", "pw")
        assert status(shared_auth_server, auth) == 200
        assert status(shared_auth_server, other) == 401

    def test_usernames_are_case_sensitive(self, shared_auth_server):
        assert status(shared_auth_server, ("Alice", "s3cret")) == 401
        assert status(shared_auth_server, ("ALICE", "s3cret")) == 401
        assert status(shared_auth_server, (" alice", "s3cret")) == 401


# -- reloading ------------------------------------------------------------------


class TestReload:
    def test_sighup_reloads_at_once(self, auth_server, entry):
        """New user in, changed password changed, removed user out, the old
        password's cache entry gone."""
        srv = auth_server([entry(["-B"], "alice", "old-pw"), entry(["-s"], "bob", "pw")])
        assert status(srv, ("alice", "old-pw")) == 200  # now cached
        assert status(srv, ("carol", "pw-carol")) == 401
        write_htpasswd(srv.htpasswd, [entry(["-B"], "alice", "new-pw"),
                                      entry(["-5"], "carol", "pw-carol")])
        sighup_and_wait(srv, "Reloaded htpasswd")
        assert status(srv, ("carol", "pw-carol")) == 200
        assert status(srv, ("alice", "new-pw")) == 200
        assert status(srv, ("alice", "old-pw")) == 401
        assert status(srv, ("bob", "pw")) == 401
        assert srv.returncode is None

    @pytest.mark.parametrize("breakage", ["malformed-line", "deleted", "not-utf8"])
    def test_failed_reload_keeps_previous_users_and_says_why(
            self, auth_server, entry, breakage):
        srv = auth_server([entry(["-B"], "alice", "s3cret")])
        assert status(srv, ("alice", "s3cret")) == 200
        if breakage == "malformed-line":
            write_htpasswd(srv.htpasswd, [entry(["-s"], "mallory", "pw"), "half-written-li"])
        elif breakage == "deleted":
            srv.htpasswd.unlink()
        else:
            srv.htpasswd.write_bytes(entry(["-s"], "mallory", "pw").encode() + b"\n\xff\xff\n")
        sighup_and_wait(srv, "Could not reload")
        assert status(srv, ("alice", "s3cret")) == 200
        assert status(srv, ("alice", "wrong")) == 401
        assert status(srv, ("mallory", "pw")) == 401
        assert srv.returncode is None
        # once the file is fixed, the next reload takes it
        write_htpasswd(srv.htpasswd, [entry(["-s"], "mallory", "pw")])
        sighup_and_wait(srv, "Reloaded htpasswd")
        assert status(srv, ("mallory", "pw")) == 200
        assert status(srv, ("alice", "s3cret")) == 401

    def test_reload_to_an_empty_file_locks_everyone_out(self, auth_server, entry):
        """No users is never 'no authentication'."""
        srv = auth_server([entry(["-B"], "alice", "s3cret")])
        assert status(srv, ("alice", "s3cret")) == 200
        srv.htpasswd.write_bytes(b"")
        sighup_and_wait(srv, "Reloaded htpasswd")
        assert status(srv, ("alice", "s3cret")) == 401
        assert status(srv) == 401

    @pytest.mark.slow
    def test_file_change_is_picked_up_within_30_seconds_without_a_signal(
            self, auth_server, entry):
        """The server notices a changed mtime or size by itself (checked at
        most every 30 s, on the next request).  Two servers share the wait:
        the built-in one sees an in-place edit of the same size (only the
        mtime changes), the WSGI one a new user written by atomic rename."""
        same_size = auth_server([entry(["-B"], "alice", "old-pw")])
        renamed = auth_server([entry(["-B"], "alice", "old-pw")], door="wsgi")
        started = time.monotonic()
        for srv in (same_size, renamed):
            assert status(srv, ("alice", "old-pw")) == 200  # cached from now on

        old_size = same_size.htpasswd.stat().st_size
        new_line = entry(["-B"], "alice", "new-pw")
        with open(same_size.htpasswd, "r+b") as f:  # rewrite in place: same inode
            f.write((new_line + "\n").encode())
            f.truncate()
        assert same_size.htpasswd.stat().st_size == old_size

        tmp = renamed.htpasswd.with_suffix(".tmp")
        write_htpasswd(tmp, [entry(["-B"], "alice", "old-pw"), entry(["-2"], "carol", "pw-c")])
        os.replace(tmp, renamed.htpasswd)

        time.sleep(max(0.0, 31.5 - (time.monotonic() - started)))
        assert status(same_size, ("alice", "new-pw")) == 200
        assert status(same_size, ("alice", "old-pw")) == 401
        assert status(renamed, ("carol", "pw-c")) == 200
        assert status(renamed, ("alice", "old-pw")) == 200


# -- the credential cache and timing -------------------------------------------


class TestCacheAndTiming:
    def test_verified_credentials_are_cached_and_reload_clears_the_cache(
            self, auth_server, entry):
        """With a bcrypt cost-12 user the first login pays for one slow hash;
        the following ones (new connections each) do not, also after more than
        rest-server's accidental 5-second lifetime.  A wrong password is never
        served from the cache, and after SIGHUP the next login is slow again."""
        srv = auth_server([entry(["-B", "-C", "12"], "alice", "s3cret"),
                           entry(["-s"], "bob", "pw")])
        assert status(srv, ("bob", "pw")) == 200  # warm up the connection path
        code, first = timed(srv, ("alice", "s3cret"))
        assert code == 200
        assert first > 0.05, f"a cost-12 bcrypt check took only {first:.3f}s"

        later = []
        for _ in range(20):
            code, t = timed(srv, ("alice", "s3cret"))
            assert code == 200
            later.append(t)
        assert max(later) < first / 4, (first, later)

        time.sleep(6)  # rest-server's sweeper would have dropped the entry by now
        code, t = timed(srv, ("alice", "s3cret"))
        assert code == 200 and t < first / 4, (first, t)

        code, t = timed(srv, ("alice", "s3cret!"))
        assert code == 401 and t > first / 2, (first, t)
        assert status(srv, ("bob", "s3cret")) == 401

        sighup_and_wait(srv, "Reloaded htpasswd")
        code, t = timed(srv, ("alice", "s3cret"))
        assert code == 200 and t > first / 2, ("cache survived the reload", first, t)
        code, t = timed(srv, ("alice", "s3cret"))
        assert code == 200 and t < first / 4, (first, t)

    def test_unknown_user_costs_as_much_as_a_wrong_password(self, auth_server, entry):
        """No user enumeration by timing: interleaved samples of a wrong
        password for an existing bcrypt user and of an unknown user; their
        medians agree within 20 %."""
        srv = auth_server([entry(["-B", "-C", "8"], "alice", "s3cret"),
                           entry(["-B", "-C", "8"], "bob", "pw")])
        failed_login_times(srv, "alice", 3)  # warm-up
        wrong, unknown = failed_login_times(srv, "alice", 40)
        ratio = statistics.median(unknown) / statistics.median(wrong)
        assert 0.8 <= ratio <= 1.2, (
            f"unknown user median {statistics.median(unknown) * 1000:.1f} ms, "
            f"wrong password median {statistics.median(wrong) * 1000:.1f} ms")

    def test_unknown_user_is_not_cheaper_than_a_bcrypt_user_listed_after_a_cheap_one(
            self, auth_server, entry):
        """The dummy check for unknown users must cost as much as the
        expensive entries, wherever they are in the file: with a {SHA} user
        first and a bcrypt user second, an unknown name must not answer
        faster than a wrong password for the bcrypt user (that would tell an
        attacker which names are bcrypt users)."""
        srv = auth_server([entry(["-s"], "legacy", "pw"),
                           entry(["-B", "-C", "9"], "alice", "s3cret")])
        wrong, unknown = failed_login_times(srv, "alice", 25)
        ratio = statistics.median(unknown) / statistics.median(wrong)
        assert ratio >= 0.8, (
            f"unknown user median {statistics.median(unknown) * 1000:.1f} ms, "
            f"bcrypt wrong password median {statistics.median(wrong) * 1000:.1f} ms")


# -- proxy authentication -------------------------------------------------------


class TestProxyAuth:
    HEADER = "X-Forwarded-User"

    @pytest.fixture
    def proxy_server(self, start_server, door, tmp_path):
        """Proxy auth needs no htpasswd file at all."""
        data = tmp_path / "data"
        (data / "keys").mkdir(parents=True)
        assert not (data / ".htpasswd").exists()
        return start_server("--proxy-auth-username", self.HEADER, door=door, data_dir=data)

    def test_valid_username_from_the_header_is_logged_in(self, proxy_server):
        assert status(proxy_server, headers={self.HEADER: "alice"}) == 200
        assert status(proxy_server, headers={self.HEADER.lower(): "alice"}) == 200
        assert status(proxy_server, headers={self.HEADER: "zoë@example.org"}) == 200

    @pytest.mark.parametrize("headers", [
        {},
        {HEADER: ""},
        {HEADER: "   "},
        {"X-Forwarded-Users": "alice"},
        {"Authorization": basic_auth("alice", "s3cret")},
    ], ids=["missing", "empty", "blank", "other-header", "basic-alone"])
    def test_no_username_is_401(self, proxy_server, headers):
        assert status(proxy_server, headers=headers) == 401

    def test_underscore_spelling_of_the_header_is_not_the_header(self, proxy_server):
        """A proxy that strips `X-Forwarded-User` does not strip
        `X_Forwarded_User`; CGI-style servers map both to one variable, so the
        underscore spelling must never log anyone in."""
        assert status(proxy_server, headers={"X_Forwarded_User": "alice"}) == 401

    def test_two_username_headers_log_in_nobody(self, proxy_server):
        reply = proxy_server.raw(
            b"GET /keys/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-User: alice\r\n"
            b"X-Forwarded-User: bob\r\nConnection: close\r\n\r\n")
        assert int(reply.split(b" ", 2)[1]) in (400, 401), reply[:200]

    @pytest.mark.parametrize("user", ["a b", "x/y", "../bob", "alice:pw", "bob%2F..",
                                      "alice,bob", "al\tice", "*"])
    def test_invalid_usernames_are_401(self, proxy_server, user):
        assert status(proxy_server, headers={self.HEADER: user}) == 401

    def test_proxy_user_with_private_repos(self, start_server, door, tmp_path):
        srv = start_server("--proxy-auth-username", self.HEADER, "--private-repos", door=door)
        alice = {self.HEADER: "alice"}
        assert srv.request("POST", "/alice/?create=true", headers=alice).status == 200
        assert srv.request("GET", "/alice/keys/", headers=alice).status == 200
        assert srv.request("POST", "/bob/?create=true", headers={self.HEADER: "bob"}).status == 200
        assert srv.request("GET", "/bob/keys/", headers=alice).status in (401, 403)
        assert srv.request("GET", "/bob/keys/").status == 401
