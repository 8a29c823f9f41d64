"""Operating the server: access log, process log, listen addresses, systemd
socket activation, signals, /health, --version and --help.

What is specified:

* `--log FILE|-` writes one Combined Log Format line per request, with the
  authenticated user in the user field and never a credential; everything a
  client sends is escaped so no line can be forged or broken; SIGHUP reopens
  the file (logrotate);
* the process log on stderr has a timestamp on every line; `--debug` adds one
  line per request, without credentials;
* `--listen` takes `HOST:PORT`, `:PORT`, `[::1]:PORT` and `unix:/path` (the
  socket file is removed on shutdown); systemd socket activation passes exactly
  one socket, more is an error (as in rest-server);
* SIGTERM/SIGINT: stop, let requests in flight finish (up to
  `--shutdown-timeout`), leave no temp files, exit 0; idle keep-alive
  connections do not delay the exit;
* `GET /health`: 200 without authentication when the data directory is usable,
  503 when it is not; a repository named `health` still works;
* `--version` prints the version; `--help` groups the options.
"""

import base64
import datetime
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import IN_CI, SERVER_SCRIPT, basic_auth, object_id, temp_files

CLF = re.compile(
    r'(?P<host>\S+) - (?P<user>\S+) '
    r'\[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] '
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"\Z'
)
STDERR_TIMESTAMP = re.compile(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} ")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PASSWORD = "s3cret-Pa55"


# -- helpers ------------------------------------------------------------------


def htpasswd_sha(path, users):
    """An htpasswd file with {SHA} users made by Apache's `htpasswd -nbs`."""
    tool = shutil.which("htpasswd")
    if tool is None:
        if IN_CI:
            pytest.fail("htpasswd is required under CI=true (apt-get install apache2-utils)")
        pytest.skip("htpasswd not installed (apt-get install apache2-utils)")
    lines = []
    for user, password in users.items():
        p = subprocess.run([tool, "-nbs", user, password], capture_output=True, text=True,
                           check=True, stdin=subprocess.DEVNULL)
        assert p.stdout.startswith(f"{user}:{{SHA}}"), p.stdout
        lines.append(p.stdout.strip())
    path.write_text("\n".join(lines) + "\n")
    return path


def log_lines(path):
    text = Path(path).read_bytes().decode("utf-8")
    assert text == "" or text.endswith("\n"), repr(text[-200:])
    return text.splitlines()


def parse_clf(line):
    assert not CONTROL.search(line), repr(line)
    m = CLF.match(line)
    assert m, f"not a Combined Log Format line: {line!r}"
    return m.groupdict()


def raw_request(srv, data, timeout=5):
    """Send one raw request (the caller includes Connection: close); the status."""
    answer = srv.raw(data, timeout=timeout)
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert m, answer[:200]
    return int(m.group(1))


def wait_until(predicate, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_exit(srv, timeout):
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server still running after {timeout}s:\n{srv.stderr}") from None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def unix_request(path, method, target, body=None):
    conn = UnixHTTPConnection(path)
    try:
        conn.request(method, target, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def short_dir():
    """A short directory for unix sockets (sun_path holds only 108 bytes)."""
    d = tempfile.mkdtemp(prefix="prs-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


# -- access log -----------------------------------------------------------------


def test_access_log_has_one_combined_line_per_request_with_the_user(start_server, tmp_path,
                                                                      door):
    """Through both front doors: the access log is written by the application."""
    htpasswd = htpasswd_sha(tmp_path / "htpasswd", {"alice": PASSWORD})
    log = tmp_path / "access.log"
    srv = start_server("--htpasswd-file", str(htpasswd), "--log", str(log), door=door)
    alice = ("alice", PASSWORD)
    t0 = time.time()
    sent = []

    def req(method, path, auth=None, body=None, headers=None):
        r = srv.request(method, path, auth=auth, body=body, headers=headers)
        sent.append((method, path, r.status, len(r.body), auth, dict(headers or {})))
        return r

    assert req("GET", "/alice/config").status == 401
    assert req("POST", "/alice/?create=true", auth=alice).status == 200
    assert req("POST", "/alice/config", auth=alice, body=b"config!").status == 200
    assert req("GET", "/alice/config", auth=alice).status == 200
    assert req("HEAD", "/alice/config", auth=alice).status == 200
    assert req("GET", "/alice/keys/", auth=alice,
               headers={"Referer": "http://example.test/x", "User-Agent": "restic/0.14.0"}
               ).status == 200
    assert req("GET", "/alice/config", auth=("alice", "wrong")).status == 401
    assert req("GET", "/health").status == 200

    lines = log_lines(log)
    assert len(lines) == len(sent), lines
    for line, (method, path, status, size, auth, headers) in zip(lines, sent):
        f = parse_clf(line)
        assert f["host"] == "127.0.0.1"
        assert f["request"] == f"{method} {path} HTTP/1.1"
        assert int(f["status"]) == status
        assert int(f["size"]) == (0 if method == "HEAD" else size)
        assert f["user"] == ("alice" if auth == alice else "-"), line
        assert f["referer"] == headers.get("Referer", "")
        if "User-Agent" in headers:
            assert f["agent"] == headers["User-Agent"]
        when = datetime.datetime.strptime(f["time"], "%d/%b/%Y:%H:%M:%S %z").timestamp()
        assert t0 - 2 <= when <= time.time() + 2, line
    text = log.read_text()
    assert PASSWORD not in text and "wrong" not in text
    assert basic_auth("alice", PASSWORD).split()[1] not in text
    assert PASSWORD not in srv.stderr


def test_access_log_escapes_what_clients_send(start_server, tmp_path):
    """Reliability plan T120: quotes, backslashes, tabs, bytes >= 0x80 and
    encoded CR/LF in the request line, User-Agent, Referer and username can
    neither break a field nor start a new line."""
    log = tmp_path / "access.log"
    srv = start_server("--no-auth", "--log", str(log))
    fake = '127.0.0.1 - admin [01/Jan/2030:00:00:00 +0000] "GET / HTTP/1.1" 200 0 "" ""'
    accepted = [
        b'GET /a"b/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        b"GET /x%0d%0a" + fake.replace(" ", "%20").replace('"', "%22").encode()
        + b"/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /back\\slash/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b'GET /config HTTP/1.1\r\nHost: x\r\nUser-Agent: evil" 200 0 "\t\\x1b[31m\xe9\xff'
        b'\r\nReferer: "quoted"\tand\\more\r\nConnection: close\r\n\r\n',
        b"GET /config HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
        + base64.b64encode(b"ev\nil\r\n" + fake.encode() + b":pw")
        + b"\r\nConnection: close\r\n\r\n",
    ]
    for data in accepted:
        raw_request(srv, data)
    # requests the server refuses while reading the head (control characters
    # in the request line or a header): answered 400, never logged raw
    refused = [
        b"GET /a\x1b[31m/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /config HTTP/1.1\r\nHost: x\r\nUser-Agent: a\rb\r\nConnection: close\r\n\r\n",
        b"GET /config HTTP/1.1\r\nHost: x\r\nUser-Agent: a\x1b[2Jb\r\nConnection: close\r\n\r\n",
    ]
    for data in refused:
        assert raw_request(srv, data) == 400
    assert srv.request("GET", "/health").status == 200

    lines = log_lines(log)
    fields = [parse_clf(line) for line in lines]
    # one line for each request the application answered, in order, and no other
    apps = [f for f in fields if f["request"].endswith("HTTP/1.1")]
    assert len(apps) == len(lines)
    assert len(lines) in range(len(accepted) + 1, len(accepted) + len(refused) + 2), lines
    assert fields[0]["request"] == 'GET /a\\"b/config HTTP/1.1'
    assert "admin" not in [f["user"] for f in fields]
    assert all(f["user"] == "-" for f in fields)
    agent = fields[3]["agent"]
    assert '\\"' in agent and "\t" not in agent
    assert "\\t" in agent or "\\x09" in agent
    assert "\\\\x1b" in agent or "\\x5cx1b" in agent  # the backslash itself is escaped
    assert "\\xe9" in agent.lower() or "\\u00e9" in agent.lower()
    assert '\\"quoted\\"' in fields[3]["referer"]
    assert fields[-1]["request"] == "GET /health HTTP/1.1"


def test_sighup_reopens_the_access_log(start_server, tmp_path):
    log = tmp_path / "access.log"
    log.write_text("an earlier line\n")  # appended to, never truncated
    srv = start_server("--no-auth", "--log", str(log))
    assert srv.request("GET", "/health").status == 200
    rotated = tmp_path / "access.log.1"
    os.rename(log, rotated)
    assert srv.request("POST", "/r/?create=true").status == 200  # still the old file
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(log.exists, what="a new log file after SIGHUP")
    assert srv.request("GET", "/r/keys/").status == 200
    old, new = log_lines(rotated), log_lines(log)
    assert old[0] == "an earlier line"
    assert [parse_clf(x)["request"] for x in old[1:]] == [
        "GET /health HTTP/1.1", "POST /r/?create=true HTTP/1.1"]
    assert [parse_clf(x)["request"] for x in new] == ["GET /r/keys/ HTTP/1.1"]
    assert srv.returncode is None


def test_log_dash_writes_the_access_log_to_stdout(tmp_path):
    """Conformance test 67: `--log -`."""
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--path", str(data), "--no-auth", "--log", "-",
         "--listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        for line in proc.stderr:
            m = re.search(r"start server on (\S+)", line)
            if m:
                address = m.group(1)
                break
        assert address, "server did not start"
        host, port = address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/data/", headers={"User-Agent": "probe/1"})
        body = conn.getresponse().read()
        conn.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    lines = out.splitlines()
    assert len(lines) == 1, lines
    f = parse_clf(lines[0])
    assert (f["request"], f["agent"]) == ("GET /data/ HTTP/1.1", "probe/1")
    assert int(f["size"]) == len(body)


# -- process log ----------------------------------------------------------------


def test_process_log_lines_have_timestamps(start_server):
    before = time.time()
    srv = start_server("--no-auth")
    srv.create_repo("r")  # logs "Creating repository directories in /r"
    assert srv.stop() == 0
    lines = [line for line in srv.stderr_lines if line.strip()]
    assert any("start server on" in line for line in lines)
    assert any("Creating repository" in line for line in lines)
    assert any("shutdown cleanly" in line for line in lines)
    for line in lines:
        m = STDERR_TIMESTAMP.match(line)
        assert m, f"no timestamp: {line!r}"
        stamp = time.mktime(time.strptime(m.group(0).strip(), "%Y/%m/%d %H:%M:%S"))
        assert before - 2 <= stamp <= time.time() + 2, line


def test_debug_logs_each_request_without_credentials(start_server, tmp_path):
    htpasswd = htpasswd_sha(tmp_path / "htpasswd", {"alice": PASSWORD})
    srv = start_server("--htpasswd-file", str(htpasswd), "--debug")
    assert srv.request("POST", "/alice/?create=true", auth=("alice", PASSWORD)).status == 200
    assert srv.request("GET", "/alice/keys/?x=1", auth=("alice", "bad-" + PASSWORD)).status == 401
    wait_until(lambda: "GET /alice/keys/?x=1" in srv.stderr, what="debug lines")
    assert "POST /alice/?create=true" in srv.stderr
    token = basic_auth("alice", PASSWORD).split()[1]
    assert PASSWORD not in srv.stderr and token not in srv.stderr


# -- listen addresses -----------------------------------------------------------


def test_unix_socket_listener(start_server, short_dir):
    """Conformance test 68: HTTP over a unix socket; the socket file is removed
    on SIGTERM; a stale socket file from a crash does not stop a restart."""
    path = short_dir / "pyrestserver.sock"
    srv = start_server("--no-auth", "--listen", f"unix:{path}")
    assert srv.address == f"unix:{path}"
    assert path.is_socket()
    assert unix_request(str(path), "POST", "/r/?create=true")[0] == 200
    body = os.urandom(3000)
    assert unix_request(str(path), "POST", f"/r/data/{object_id(body)}", body)[0] == 200
    assert unix_request(str(path), "GET", f"/r/data/{object_id(body)}") == (200, body)
    assert srv.stop() == 0
    assert not path.exists()

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # what a SIGKILLed server leaves behind
    assert path.is_socket()
    srv2 = start_server("--no-auth", "--listen", f"unix:{path}", data_dir=srv.data_dir)
    assert unix_request(str(path), "GET", f"/r/data/{object_id(body)}") == (200, body)
    assert srv2.stop() == 0
    assert not path.exists()


def test_unix_listener_never_replaces_a_regular_file(tmp_path, short_dir):
    path = short_dir / "not-a-socket"
    path.write_text("precious\n")
    p = subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), "--path", str(tmp_path / "data"), "--no-auth",
         "--listen", f"unix:{path}"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode != 0
    assert "start server on" not in p.stderr
    assert path.read_text() == "precious\n"


def ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listener(start_server):
    srv = start_server("--no-auth", "--listen", "[::1]:0")
    assert srv.address.startswith("[::1]:")
    assert srv.host == "::1"
    srv.create_repo("r")
    assert srv.request("GET", "/r/keys/").status == 200


def test_port_only_listener_serves_all_addresses(start_server):
    """`--listen :PORT` (rest-server's default form) listens on every address."""
    srv = start_server("--no-auth", "--listen", ":0")
    port = srv.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    if ipv6_loopback():
        conn = http.client.HTTPConnection("::1", port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()


# -- systemd socket activation ----------------------------------------------------

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate not installed (apt-get install systemd)")


def activation_env():
    env = dict(os.environ)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    return env


def trigger(port, timeout=10):
    """Connect once systemd-socket-activate listens (that starts the server)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@needs_socket_activate
def test_systemd_socket_activation(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    # --listen names an address that cannot work: it must be ignored
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", sys.executable, str(SERVER_SCRIPT),
         "--path", str(data), "--no-auth", "--listen", "unix:/nonexistent-dir/x.sock"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=activation_env())
    try:
        with trigger(port) as first:
            first.sendall(b"POST /r/?create=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            first.settimeout(20)
            assert first.recv(100).startswith(b"HTTP/1.1 200"), "first request"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/r/keys/")
        assert conn.getresponse().status == 200
        conn.close()
        assert (data / "r" / "keys").is_dir()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "systemd socket activation mode" in err
    assert f"start server on 127.0.0.1:{port}" in err


@needs_socket_activate
def test_systemd_socket_activation_with_two_sockets_is_an_error(tmp_path):
    port1, port2 = free_port(), free_port()
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port1}", "-l", f"127.0.0.1:{port2}",
         sys.executable, str(SERVER_SCRIPT), "--path", str(tmp_path / "data"), "--no-auth"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=activation_env())
    try:
        with trigger(port1):
            _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 1, err
    assert "got 2 listeners from systemd, expected one" in err
    assert "start server on" not in err


# -- signals ------------------------------------------------------------------------


def test_sigterm_lets_an_upload_in_flight_finish(start_server):
    srv = start_server("--no-auth")
    srv.create_repo("r")
    body = os.urandom(2 * 1024 * 1024)
    oid = object_id(body)
    head = (f"POST /r/data/{oid} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    pieces = [body[i:i + len(body) // 20] for i in range(0, len(body), len(body) // 20)]
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(head)
        for piece in pieces[:10]:  # ~1 s for the first half
            s.sendall(piece)
            time.sleep(0.1)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert srv.returncode is None, "the server did not wait for the upload"
        assert temp_files(srv.data_dir) != []  # the upload is still in progress
        for piece in pieces[10:]:  # ~1 s for the rest
            s.sendall(piece)
            time.sleep(0.1)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert wait_exit(srv, 10) == 0
    path = srv.data_dir / "r" / "data" / oid[:2] / oid
    assert path.read_bytes() == body
    assert temp_files(srv.data_dir) == []
    assert any("shutdown cleanly" in line for line in srv.stderr_lines), srv.stderr


def test_sigterm_cuts_off_a_stalled_upload_after_the_shutdown_timeout(start_server):
    srv = start_server("--no-auth", "--shutdown-timeout", "1")
    srv.create_repo("r")
    body = os.urandom(100_000)
    oid = object_id(body)
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(f"POST /r/data/{oid} HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
        wait_until(lambda: temp_files(srv.data_dir), what="the upload to start")
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert wait_exit(srv, 10) == 0
        assert time.monotonic() - t0 < 6
    assert temp_files(srv.data_dir) == []
    assert not (srv.data_dir / "r" / "data" / oid[:2] / oid).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_connections_do_not_delay_shutdown(start_server, sig):
    srv = start_server("--no-auth")
    kept = []
    try:
        for _ in range(3):  # keep-alive connections after one request each
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200 and not resp.will_close
            kept.append(conn)
        for _ in range(2):  # connected, nothing sent
            kept.append(socket.create_connection((srv.host, srv.port), timeout=10))
        time.sleep(0.3)
        t0 = time.monotonic()
        srv.proc.send_signal(sig)
        assert wait_exit(srv, 10) == 0
        assert time.monotonic() - t0 < 3.0
    finally:
        for c in kept:
            c.close()


# -- /health ----------------------------------------------------------------------------


def test_health_needs_no_authentication(start_server, tmp_path):
    htpasswd = htpasswd_sha(tmp_path / "htpasswd", {"alice": PASSWORD})
    srv = start_server("--htpasswd-file", str(htpasswd), "--private-repos")
    r = srv.request("GET", "/health")
    assert r.status == 200
    assert srv.request("HEAD", "/health").status == 200
    assert srv.request("GET", "/health?verbose=1").status == 200
    # the exemption is for /health only
    assert srv.request("GET", "/health/config").status == 401
    assert srv.request("GET", "/alice/config").status == 401
    assert srv.request("POST", "/health").status not in range(200, 300)


def test_health_is_503_when_the_data_directory_is_unusable(start_server, tmp_path):
    htpasswd = htpasswd_sha(tmp_path / "htpasswd", {"alice": PASSWORD})
    srv = start_server("--htpasswd-file", str(htpasswd))
    data = srv.data_dir
    assert srv.request("GET", "/health").status == 200
    shutil.rmtree(data)
    assert srv.request("GET", "/health").status == 503
    data.write_text("a file where the data directory was\n")
    r = srv.request("GET", "/health")
    assert r.status == 503
    assert str(data) not in r.body.decode("latin-1")
    data.unlink()
    data.mkdir()
    assert srv.request("GET", "/health").status == 200


def test_a_repository_named_health_still_works(start_server, tmp_path):
    htpasswd = htpasswd_sha(tmp_path / "htpasswd", {"alice": PASSWORD})
    srv = start_server("--htpasswd-file", str(htpasswd))
    alice = ("alice", PASSWORD)
    assert srv.request("POST", "/health/?create=true", auth=alice).status == 200
    assert (srv.data_dir / "health" / "keys").is_dir()
    assert srv.request("POST", "/health/config", body=b"cfg", auth=alice).status == 200
    r = srv.request("GET", "/health/config", auth=alice)
    assert (r.status, r.body) == (200, b"cfg")
    assert srv.request("HEAD", "/health/config", auth=alice).status == 200
    body = os.urandom(100)
    assert srv.upload("health", "data", body, auth=alice).status == 200
    r = srv.request("GET", "/health/data/", auth=alice)
    assert r.status == 200 and object_id(body).encode() in r.body
    assert srv.request("DELETE", f"/health/data/{object_id(body)}", auth=alice).status == 200
    assert srv.request("GET", "/health/config").status == 401
    # and /health is still the health check
    assert srv.request("GET", "/health").status == 200
    assert (srv.data_dir / "health" / "config").read_bytes() == b"cfg"


# -- command line -------------------------------------------------------------------------


def module_version():
    m = re.search(r'^__version__ = "([^"]+)"', SERVER_SCRIPT.read_text(), re.M)
    assert m, "pyrestserver.py defines __version__"
    return m.group(1)


@pytest.mark.parametrize("flag, value", [
    ("--idle-timeout", "0"), ("--header-timeout", "-1"), ("--body-timeout", "nan"),
    ("--body-timeout", "1e30"), ("--shutdown-timeout", "-5"), ("--max-connections", "0")])
def test_limits_out_of_range_are_refused_at_startup(tmp_path, flag, value):
    """A timeout must be above 0 (a zero one would make every socket
    non-blocking, a negative one failed each connection silently) and below a
    year; --shutdown-timeout may be 0; --max-connections at least 1."""
    p = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--path", str(tmp_path / "d"),
                        "--no-auth", "--listen", "127.0.0.1:0", flag, value],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} must be"), p.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(tmp_path, flag):
    p = subprocess.run([sys.executable, str(SERVER_SCRIPT), flag], capture_output=True,
                       text=True, timeout=30, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"pyrestserver version {module_version()}"


def help_sections(text):
    """{heading: text} for argparse's option groups."""
    sections, current = {}, None
    for line in text.splitlines():
        m = re.match(r"([A-Za-z][^:]*):\s*$", line)
        if m and not line.startswith(" "):
            current = m.group(1)
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_help_groups_the_options(tmp_path):
    p = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--help"], capture_output=True,
                       text=True, timeout=30, cwd=tmp_path, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, COLUMNS="100"))
    assert p.returncode == 0, p.stderr
    text = p.stdout
    # every rest-server 0.14 flag, and the ones this issue adds
    for flag in ("--path", "--listen", "--log", "--cpu-profile", "--debug", "--tls",
                 "--tls-cert", "--tls-key", "--tls-min-ver", "--no-auth", "--htpasswd-file",
                 "--proxy-auth-username", "--append-only", "--private-repos", "--prometheus",
                 "--prometheus-no-auth", "--max-size", "--no-verify-upload",
                 "--group-accessible-repos", "--version", "--help", "--tls-client-ca"):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", text, re.M), flag
    sections = help_sections(text)
    groups = {h: body for h, body in sections.items()
              if h not in ("usage", "options", "optional arguments", "positional arguments")}
    assert len(groups) >= 4, list(sections)

    def group_of(flag):
        found = [h for h, body in groups.items()
                 if re.search(rf"^\s+(-\w, )?{re.escape(flag)}\b", body, re.M)]
        assert len(found) == 1, (flag, list(groups))
        return found[0]

    tls = group_of("--tls-cert")
    assert "TLS" in tls
    assert group_of("--tls-key") == group_of("--tls-min-ver") == tls
    assert group_of("--htpasswd-file") == group_of("--private-repos") == group_of("--no-auth")
    assert group_of("--log") == group_of("--prometheus")
    assert len({tls, group_of("--no-auth"), group_of("--log"), group_of("--path")}) == 4
