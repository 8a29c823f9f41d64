"""TLS: `--tls`, `--tls-cert`, `--tls-key`, `--tls-min-ver`, `--tls-client-ca`.

Certificates come from a throw-away CA made with `trustme`.  What is specified:

* TLS 1.0 and 1.1 are refused; 1.2 and 1.3 work; `--tls-min-ver 1.3` refuses 1.2;
* TLS 1.2 negotiates only ECDHE key exchange with an AEAD cipher (rest-server's
  fixed list: AES-GCM and ChaCha20-Poly1305);
* ALPN selects `http/1.1` and never `h2` (restic's Go client asks for h2 first);
* the handshake runs in the connection's own thread: a client that connects and
  sends nothing (or half a ClientHello) never delays anyone else;
* plain HTTP to the TLS port gets a clean 400 and the server carries on;
* `--tls-cert`/`--tls-key` without `--tls` is an error, as in rest-server;
  unusable certificate files stop the server before it listens (it never falls
  back to plain HTTP);
* SIGHUP reloads a renewed certificate and key without a restart;
* with `--tls-client-ca` a client certificate is required and its common name
  is the user (so `--private-repos` works with certificates);
* restic works end to end over TLS with `--cacert`.
"""

import hashlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import SERVER_SCRIPT, make_tree, object_id, temp_files, tree_digest

trustme = pytest.importorskip("trustme")


# -- certificates ---------------------------------------------------------------


class Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and the PEM files."""

    def __init__(self, directory, key_type=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file = self.dir / "cert.pem"
        self.key_file = self.dir / "key.pem"
        self.leaf = None
        self.issue(key_type=key_type)

    def issue(self, key_type=None, cert_file=None, key_file=None):
        """(Re)issue the server certificate into the cert and key files."""
        kw = {} if key_type is None else {"key_type": key_type}
        self.leaf = self.ca.issue_cert("127.0.0.1", "localhost", **kw)
        with open(cert_file or self.cert_file, "wb") as f:
            for pem in self.leaf.cert_chain_pems:
                f.write(pem.bytes())
        self.leaf.private_key_pem.write_to_path(str(key_file or self.key_file))
        return self.leaf

    def leaf_der(self):
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode())

    def server_args(self):
        return ["--tls", "--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file)]

    def client_context(self, client_cert=None, minimum=None, maximum=None, ciphers=None,
                       alpn=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.ca_file))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 on purpose
            if minimum is not None:
                ctx.minimum_version = minimum
            if maximum is not None:
                ctx.maximum_version = maximum
        if ciphers is not None:
            ctx.set_ciphers(ciphers)
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        if client_cert is not None:
            client_cert.configure_cert(ctx)
        return ctx


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path / "tls")


def tls_connect(srv, ctx, timeout=10):
    """A finished TLS handshake with the server (the caller closes it)."""
    raw = socket.create_connection((srv.host, srv.port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=srv.host)
    except BaseException:
        raw.close()
        raise


def https(srv, ctx, method, path, body=None, headers=None, timeout=10):
    """One HTTPS request on a fresh connection: (status, body)."""
    conn = http.client.HTTPSConnection(srv.host, srv.port, context=ctx, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_alive(srv, certs):
    assert srv.returncode is None, srv.stderr
    status, body = https(srv, certs.client_context(), "GET", "/health")
    assert status == 200, body


def run_server_expecting_failure(tmp_path, *args, timeout=30):
    """Run pyrestserver with args that must make it exit before serving."""
    data = tmp_path / "fail-data"
    data.mkdir(exist_ok=True)
    p = subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), "--path", str(data), "--listen", "127.0.0.1:0",
         *map(str, args)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    assert "start server on" not in p.stderr, p.stderr
    return p


# -- serving --------------------------------------------------------------------


def test_https_serves_the_api_with_the_configured_certificate(start_server, certs):
    srv = start_server("--no-auth", *certs.server_args())
    ctx = certs.client_context()
    with tls_connect(srv, ctx) as tls:
        assert tls.getpeercert(binary_form=True) == certs.leaf_der()
    assert https(srv, ctx, "POST", "/r/?create=true")[0] == 200
    blob = os.urandom(5000)
    assert https(srv, ctx, "POST", f"/r/data/{object_id(blob)}", body=blob)[0] == 200
    assert https(srv, ctx, "GET", f"/r/data/{object_id(blob)}") == (200, blob)
    assert any("TLS enabled" in line for line in srv.stderr_lines), srv.stderr


def test_default_certificate_and_key_are_read_from_the_data_directory(start_server, tmp_path):
    """Like rest-server: `--tls` alone uses <path>/public_key and <path>/private_key."""
    data = tmp_path / "data"
    data.mkdir()
    certs = Certs(tmp_path / "tls")
    certs.issue(cert_file=data / "public_key", key_file=data / "private_key")
    srv = start_server("--no-auth", "--tls", data_dir=data)
    with tls_connect(srv, certs.client_context()) as tls:
        assert tls.getpeercert(binary_form=True) == certs.leaf_der()


# -- protocol versions, ciphers, ALPN ---------------------------------------------


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_before_1_2_is_refused(start_server, certs, version):
    srv = start_server("--no-auth", *certs.server_args())
    old = getattr(ssl.TLSVersion, version)
    # SECLEVEL=0 lets this OpenSSL offer the old protocol at all, so the refusal
    # we see is the server's protocol_version alert, not a client-side limit.
    ctx = certs.client_context(minimum=old, maximum=old, ciphers="DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError) as err:
        tls_connect(srv, ctx).close()
    if err.value.reason in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE"):
        pytest.skip(f"this OpenSSL cannot offer {version} at all")
    assert "PROTOCOL_VERSION" in (err.value.reason or str(err.value)), err.value
    assert_alive(srv, certs)


def test_tls_1_2_and_1_3_are_accepted_by_default(start_server, certs):
    srv = start_server("--no-auth", *certs.server_args())
    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        ctx = certs.client_context(minimum=version, maximum=version)
        with tls_connect(srv, ctx) as tls:
            assert tls.version() == name
        assert https(srv, ctx, "GET", "/health")[0] == 200


def test_tls_min_ver_1_3_refuses_1_2(start_server, certs):
    srv = start_server("--no-auth", *certs.server_args(), "--tls-min-ver", "1.3")
    ctx12 = certs.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError) as err:
        tls_connect(srv, ctx12).close()
    assert "PROTOCOL_VERSION" in (err.value.reason or str(err.value)), err.value
    ctx13 = certs.client_context(minimum=ssl.TLSVersion.TLSv1_3)
    with tls_connect(srv, ctx13) as tls:
        assert tls.version() == "TLSv1.3"
    assert https(srv, ctx13, "GET", "/health")[0] == 200


@pytest.mark.parametrize("value", ["1.1", "1.0", "tls1.3", ""])
def test_unsupported_tls_min_ver_is_an_error(tmp_path, certs, value):
    p = run_server_expecting_failure(tmp_path, "--no-auth", *certs.server_args(),
                                     "--tls-min-ver", value)
    assert p.returncode == 1, p.stderr
    assert "Unsupported TLS min version" in p.stderr, p.stderr


def client_tls12_suites():
    """Every TLS 1.2 cipher suite this OpenSSL can offer, with its properties."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return [c for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"]


@pytest.mark.parametrize("key_type", ["ECDSA", "RSA"])
def test_tls_1_2_negotiates_only_ecdhe_with_aead(start_server, tmp_path, key_type):
    """Offer one TLS 1.2 suite at a time: the server accepts exactly the ECDHE
    suites with an AEAD cipher that fit its key (never RSA key exchange, DHE,
    CBC, RC4, 3DES, NULL or export suites)."""
    certs = Certs(tmp_path / "tls", key_type=getattr(trustme.KeyType, key_type))
    srv = start_server("--no-auth", *certs.server_args())
    accepted, refused = [], []
    for suite in client_tls12_suites():
        ctx = certs.client_context(maximum=ssl.TLSVersion.TLSv1_2,
                                   ciphers=suite["name"] + ":@SECLEVEL=0")
        try:
            with tls_connect(srv, ctx, timeout=5) as tls:
                assert tls.cipher()[0] == suite["name"]
                accepted.append(suite)
        except ssl.SSLError:
            refused.append(suite["name"])
    names = sorted(s["name"] for s in accepted)
    assert names, "no TLS 1.2 suite was accepted"
    for suite in accepted:
        assert suite["kea"] == "kx-ecdhe", names
        assert suite["aead"], names
        assert suite["auth"] == f"auth-{key_type.lower()}", names
    # rest-server's suites for this key type are all available
    alg = key_type
    for wanted in (f"ECDHE-{alg}-AES128-GCM-SHA256", f"ECDHE-{alg}-AES256-GCM-SHA384",
                   f"ECDHE-{alg}-CHACHA20-POLY1305"):
        assert wanted in names, names
    for unwanted in ("AES128-SHA", "AES256-GCM-SHA384", f"ECDHE-{alg}-AES128-SHA",
                     "DHE-RSA-AES128-GCM-SHA256"):
        assert unwanted not in names, names
    assert_alive(srv, certs)


def test_alpn_selects_http11_and_never_h2(start_server, certs):
    srv = start_server("--no-auth", *certs.server_args())
    # what Go's HTTP client (restic, ForceAttemptHTTP2) offers
    ctx = certs.client_context(alpn=["h2", "http/1.1"])
    with tls_connect(srv, ctx) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
    assert https(srv, ctx, "GET", "/health")[0] == 200
    # a client that only speaks h2 must not get h2 either
    ctx_h2 = certs.client_context(alpn=["h2"])
    try:
        with tls_connect(srv, ctx_h2) as tls:
            assert tls.selected_alpn_protocol() is None
    except ssl.SSLError as exc:  # refusing the handshake (no_application_protocol) is fine
        assert "APPLICATION_PROTOCOL" in str(exc).upper(), exc
    assert_alive(srv, certs)


# -- hostile or broken clients ------------------------------------------------------


def test_plain_http_to_the_tls_port_gets_400_and_the_server_carries_on(start_server, certs):
    srv = start_server("--no-auth", *certs.server_args())
    answer = srv.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.") and b" 400 " in status_line + b" ", answer
    # a request body must not be parsed as another request either
    srv.raw(b"POST /r/?create=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
    assert not (srv.data_dir / "r").exists()
    # random bytes, and a TLS record header followed by garbage
    srv.raw(os.urandom(1024), timeout=5)
    srv.raw(b"\x16\x03\x01\x00\x30" + b"\x00" * 48, timeout=5)
    assert_alive(srv, certs)
    assert "Traceback" not in srv.stderr, srv.stderr


def test_idle_tcp_connections_do_not_stall_other_tls_clients(start_server, certs):
    """Reliability plan T103: with the handshake done in the accepting thread,
    one silent socket blocks every TLS client until the header timeout (30 s
    by default); here each connection handshakes in its own thread."""
    srv = start_server("--no-auth", *certs.server_args())
    silent = []
    try:
        for _ in range(3):
            silent.append(socket.create_connection((srv.host, srv.port), timeout=10))
        half = socket.create_connection((srv.host, srv.port), timeout=10)
        half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        silent.append(half)
        time.sleep(0.3)  # let the server accept them first
        ctx = certs.client_context()
        for _ in range(3):
            t0 = time.monotonic()
            status, _ = https(srv, ctx, "GET", "/health", timeout=10)
            elapsed = time.monotonic() - t0
            assert status == 200
            assert elapsed < 1.0, f"TLS request took {elapsed:.2f}s behind idle connections"
    finally:
        for s in silent:
            s.close()


def test_stalled_handshakes_are_dropped_after_the_header_timeout(start_server, certs):
    """A connection that never completes its handshake costs a thread only
    until `--header-timeout`, not forever."""
    srv = start_server("--no-auth", *certs.server_args(), "--header-timeout", "1")
    silent = socket.create_connection((srv.host, srv.port), timeout=10)
    half = socket.create_connection((srv.host, srv.port), timeout=10)
    half.sendall(b"\x16\x03\x01\x02\x00\x01")
    t0 = time.monotonic()
    try:
        for s in (silent, half):
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            assert data == b"" or data.startswith(b"\x15"), data  # closed (maybe after an alert)
            if data:
                assert s.recv(100) == b""
        assert time.monotonic() - t0 < 5
    finally:
        silent.close()
        half.close()
    assert_alive(srv, certs)


# -- configuration errors -------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
def test_tls_file_flags_without_tls_are_an_error(tmp_path, certs, flag):
    value = certs.cert_file if flag == "--tls-cert" else certs.key_file
    p = run_server_expecting_failure(tmp_path, "--no-auth", flag, value)
    assert p.returncode == 1, p.stderr
    assert "requires enabled TLS" in p.stderr, p.stderr


def test_unusable_certificate_files_stop_the_server_before_it_listens(tmp_path, certs):
    """Reliability plan T109: never fall back to plain HTTP."""
    other = Certs(tmp_path / "other")
    missing = tmp_path / "no-such-file.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = {
        "missing key": ["--tls-cert", certs.cert_file, "--tls-key", missing],
        "missing cert": ["--tls-cert", missing, "--tls-key", certs.key_file],
        "key of another certificate": ["--tls-cert", certs.cert_file,
                                       "--tls-key", other.key_file],
        "garbage certificate": ["--tls-cert", garbage, "--tls-key", certs.key_file],
        "no files in the data directory": [],
    }
    for name, args in cases.items():
        p = run_server_expecting_failure(tmp_path, "--no-auth", "--tls", *args)
        assert p.returncode != 0, (name, p.stderr)
        assert "Traceback" not in p.stderr, (name, p.stderr)
        assert "error" in p.stderr.lower(), (name, p.stderr)


# -- certificate reload -----------------------------------------------------------------


def wait_for_line(srv, text, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in srv.stderr_lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the server log:\n{srv.stderr}")


def test_sighup_reloads_a_renewed_certificate(start_server, certs):
    srv = start_server("--no-auth", *certs.server_args())
    ctx = certs.client_context()
    first = certs.leaf_der()
    keep_alive = tls_connect(srv, ctx)
    try:
        assert keep_alive.getpeercert(binary_form=True) == first

        certs.issue()  # renewed in place, as certbot or an ACME client would
        second = certs.leaf_der()
        assert second != first
        # not before a reload
        with tls_connect(srv, ctx) as tls:
            assert tls.getpeercert(binary_form=True) == first
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_line(srv, "Reloaded TLS certificate")
        with tls_connect(srv, ctx) as tls:
            assert tls.getpeercert(binary_form=True) == second
        assert https(srv, ctx, "GET", "/health")[0] == 200

        # a broken renewal keeps the working certificate and the server up
        certs.cert_file.write_text("not a certificate\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_line(srv, "Could not reload TLS certificate")
        with tls_connect(srv, ctx) as tls:
            assert tls.getpeercert(binary_form=True) == second
        assert srv.returncode is None

        # the connection opened before the reloads still works
        keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert keep_alive.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        keep_alive.close()


# -- client certificates ------------------------------------------------------------------


def client_ca_server(start_server, certs, tmp_path, *extra):
    """A server that requires client certificates from `certs.ca` (the same CA
    signs the server certificate here; any CA file works)."""
    empty_htpasswd = tmp_path / "htpasswd"
    empty_htpasswd.write_text("")
    return start_server(*certs.server_args(), "--tls-client-ca", str(certs.ca_file),
                        "--htpasswd-file", str(empty_htpasswd), *extra)


def client_cert(ca, user):
    return ca.issue_cert(f"{user}.clients.test", common_name=user)


def assert_refused_without_usable_client_cert(srv, ctx):
    """The handshake fails (TLS 1.2) or the server aborts the connection right
    after it (TLS 1.3 checks the client certificate late): no HTTP answer."""
    with pytest.raises(OSError):  # ssl.SSLError, ConnectionResetError, RemoteDisconnected
        https(srv, ctx, "GET", "/health", timeout=5)


def test_client_certificate_is_required_with_a_client_ca(start_server, certs, tmp_path):
    srv = client_ca_server(start_server, certs, tmp_path)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = certs.client_context(minimum=version, maximum=version)
        assert_refused_without_usable_client_cert(srv, ctx)
    # a certificate from another CA is refused as well
    stranger = trustme.CA()
    ctx = certs.client_context(client_cert=client_cert(stranger, "alice"))
    assert_refused_without_usable_client_cert(srv, ctx)
    # and the right one works
    ctx = certs.client_context(client_cert=client_cert(certs.ca, "alice"))
    assert https(srv, ctx, "GET", "/health")[0] == 200
    assert srv.returncode is None


def test_client_certificate_common_name_is_the_user(start_server, certs, tmp_path):
    srv = client_ca_server(start_server, certs, tmp_path, "--private-repos")
    alice = certs.client_context(client_cert=client_cert(certs.ca, "alice"))
    bob = certs.client_context(client_cert=client_cert(certs.ca, "bob"))
    assert https(srv, alice, "POST", "/alice/?create=true")[0] == 200
    assert https(srv, alice, "POST", "/alice/config", body=b"alice config")[0] == 200
    assert https(srv, alice, "GET", "/alice/config") == (200, b"alice config")
    assert https(srv, alice, "POST", "/alice/work/?create=true")[0] == 200
    assert https(srv, alice, "POST", "/bob/?create=true")[0] == 401
    assert https(srv, alice, "GET", "/config")[0] == 401
    assert https(srv, bob, "GET", "/alice/config")[0] == 401
    assert https(srv, bob, "POST", "/bob/?create=true")[0] == 200
    assert (srv.data_dir / "alice" / "config").read_bytes() == b"alice config"
    assert not (srv.data_dir / "bob" / "config").exists()


def test_client_ca_alone_needs_no_htpasswd_file(start_server, certs):
    """Client certificates are an authentication method of their own: a server
    with `--tls-client-ca` (and no htpasswd file anywhere) starts, and the
    certificate's common name is the user."""
    srv = start_server(*certs.server_args(), "--tls-client-ca", str(certs.ca_file),
                       "--private-repos")
    alice = certs.client_context(client_cert=client_cert(certs.ca, "alice"))
    assert https(srv, alice, "POST", "/alice/?create=true")[0] == 200
    assert https(srv, alice, "POST", "/bob/?create=true")[0] == 401


# -- restic end to end -------------------------------------------------------------------


def restic_run(restic_bin, workdir, repo, *args, cacert=None, timeout=600):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "RESTIC_PASSWORD": "correct horse",
        "RESTIC_CACHE_DIR": str(Path(workdir) / "cache"),
        "TMPDIR": str(workdir),
    }
    cmd = [restic_bin, "-r", repo] + (["--cacert", str(cacert)] if cacert else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"restic {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.mark.e2e
def test_restic_end_to_end_over_tls(start_server, certs, restic_bin, tmp_path):
    srv = start_server("--no-auth", *certs.server_args())
    repo = f"rest:https://{srv.address}/repo/"
    work = tmp_path / "restic-work"
    work.mkdir()

    # without the CA restic refuses the server's certificate
    env_probe = subprocess.run(
        [restic_bin, "-r", repo, "snapshots"], capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(work),
             "RESTIC_PASSWORD": "x", "RESTIC_CACHE_DIR": str(work / "cache0")},
        stdin=subprocess.DEVNULL)
    assert env_probe.returncode != 0
    assert "certificate" in (env_probe.stdout + env_probe.stderr).lower()

    restic_run(restic_bin, work, repo, "init", cacert=certs.ca_file)
    src = make_tree(tmp_path / "src", files=20, big=512 * 1024)
    restic_run(restic_bin, work, repo, "backup", str(src), cacert=certs.ca_file)
    target = tmp_path / "restore"
    restic_run(restic_bin, work, repo, "restore", "latest", "--target", str(target),
               cacert=certs.ca_file)
    restored = target / os.path.abspath(src).lstrip("/")
    assert tree_digest(restored) == tree_digest(src)
    check = restic_run(restic_bin, work, repo, "check", "--read-data", cacert=certs.ca_file)
    assert "no errors were found" in check.stdout
    repo_dir = srv.data_dir / "repo"
    snapshots = list((repo_dir / "snapshots").iterdir())
    assert len(snapshots) == 1
    assert snapshots[0].name == hashlib.sha256(snapshots[0].read_bytes()).hexdigest()
    assert temp_files(repo_dir) == []
