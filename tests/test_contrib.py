"""contrib/: the systemd service and socket units.

* both units parse (`systemd-analyze verify` when systemd is installed, and a
  structural check always);
* the service is hardened (read-only system, private /tmp, no new privileges,
  no home directories, only IP and unix sockets, @system-service system calls,
  umask 077, ...), and `systemd-analyze security` rates it OK;
* the socket unit hands exactly one stream socket to the service;
* the service's ExecStart command line is one pyrestserver accepts: it is run
  here (with a temporary --path and --listen) and serves requests, on its own
  and under socket activation.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SERVER_SCRIPT

CONTRIB = ROOT / "contrib"
SERVICE = CONTRIB / "pyrestserver.service"
SOCKET = CONTRIB / "pyrestserver.socket"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


# -- a small unit-file reader ---------------------------------------------------------


def parse_unit(path):
    """{section: [(key, value), ...]} following systemd.syntax(7): comments start
    with # or ;, a trailing backslash continues a line, keys may repeat."""
    sections = {}
    current = None
    pending = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not pending and (not line.strip() or line.lstrip().startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line.strip())
        if m:
            current = m.group(1)
            assert current not in sections, f"{path.name}:{number}: section repeated"
            sections[current] = []
            continue
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)\s*=\s*(.*)", line.strip())
        assert m, f"{path.name}:{number}: not 'Key=value': {line!r}"
        assert current is not None, f"{path.name}:{number}: setting outside a section"
        sections[current].append((m.group(1), m.group(2).strip()))
    assert not pending, f"{path.name}: ends in a line continuation"
    return sections


def setting(unit, section, key):
    """The effective value of a single-valued setting (the last one wins)."""
    found = [v for k, v in unit.get(section, []) if k == key]
    assert found, f"[{section}] {key}= missing"
    return found[-1]


def list_setting(unit, section, key):
    """The effective items of a list setting (an empty assignment resets it)."""
    items = []
    for k, v in unit.get(section, []):
        if k == key:
            items = [] if v == "" else items + v.split()
    return items


def seconds(value):
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|m)?", value.strip())
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def exec_start_argv(unit):
    argv = shlex.split(setting(unit, "Service", "ExecStart"))
    while argv[0][:1] in "-@:+!":  # systemd's ExecStart prefixes
        argv[0] = argv[0][1:]
    return argv


def flag_value(argv, flag):
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def replace_flag(argv, flag, value):
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out + [flag, value]


@pytest.fixture(scope="module")
def service():
    return parse_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit():
    return parse_unit(SOCKET)


# -- the files parse -------------------------------------------------------------------


def test_units_have_the_expected_sections(service, socket_unit):
    assert set(service) == {"Unit", "Service", "Install"}
    assert set(socket_unit) == {"Unit", "Socket", "Install"}
    assert setting(service, "Unit", "Description")
    assert setting(socket_unit, "Unit", "Description")
    assert setting(service, "Service", "Type") in ("simple", "exec", "notify")
    assert exec_start_argv(service)[0].startswith("/"), "ExecStart needs an absolute path"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    """`systemd-analyze verify` prints a warning (and still exits 0) for every
    unknown key or bad value, so the test wants no output about our units.
    It also checks that ExecStart's program exists: the copy here points it at
    an executable copy of pyrestserver.py."""
    exe = tmp_path / "bin" / "pyrestserver"
    exe.parent.mkdir()
    shutil.copy(SERVER_SCRIPT, exe)
    exe.chmod(0o755)
    program = exec_start_argv(parse_unit(SERVICE))[0]
    units = tmp_path / "units"
    units.mkdir()
    (units / SERVICE.name).write_text(SERVICE.read_text().replace(program, str(exe)))
    shutil.copy(SOCKET, units / SOCKET.name)
    p = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(units / SOCKET.name),
         str(units / SERVICE.name)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    about_us = [line for line in (p.stdout + p.stderr).splitlines()
                if str(units) in line or "pyrestserver" in line]
    assert p.returncode == 0, p.stdout + p.stderr
    assert about_us == [], "\n".join(about_us)


def offline_security_supported():
    if SYSTEMD_ANALYZE is None:
        return False
    p = subprocess.run([SYSTEMD_ANALYZE, "security", "--help"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    return "--offline" in p.stdout


@pytest.mark.skipif(not offline_security_supported(),
                    reason="needs systemd-analyze security --offline (systemd >= 250)")
def test_systemd_analyze_security_rates_the_service_ok(tmp_path):
    unit = tmp_path / SERVICE.name
    shutil.copy(SERVICE, unit)
    p = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.0, m.group(0)
    assert m.group(2) == "OK"


# -- what the units say ----------------------------------------------------------------


def test_service_is_hardened(service):
    def yes(key):
        assert setting(service, "Service", key) in ("yes", "true", "on", "1"), key

    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID",
                "RestrictRealtime", "LockPersonality", "MemoryDenyWriteExecute"):
        yes(key)
    assert setting(service, "Service", "ProtectSystem") == "strict"
    assert setting(service, "Service", "ProtectHome") in ("yes", "true", "tmpfs")
    assert setting(service, "Service", "UMask") in ("077", "0077")
    assert set(list_setting(service, "Service", "RestrictAddressFamilies")) == {
        "AF_UNIX", "AF_INET", "AF_INET6"}
    filters = [v for k, v in service["Service"] if k == "SystemCallFilter"]
    assert "@system-service" in filters[0].split()
    assert setting(service, "Service", "CapabilityBoundingSet") == ""
    # a dedicated or dynamic user, never root
    user = dict(service["Service"]).get("User")
    dynamic = dict(service["Service"]).get("DynamicUser") in ("yes", "true")
    assert dynamic or (user and user not in ("root", "0"))


def test_service_may_write_its_data_directory(service):
    data = flag_value(exec_start_argv(service), "--path")
    assert data and data.startswith("/"), "ExecStart sets an absolute --path"
    writable = list_setting(service, "Service", "ReadWritePaths")
    state = ["/var/lib/" + d for d in list_setting(service, "Service", "StateDirectory")]
    assert any(data == p.lstrip("-") or data.startswith(p.lstrip("-").rstrip("/") + "/")
               for p in writable + state), (data, writable, state)


def test_service_stop_and_reload_fit_the_server(service):
    """systemd waits longer than the server lets uploads finish, and reload is
    SIGHUP (htpasswd, TLS certificate and --log file are reopened)."""
    argv = exec_start_argv(service)
    grace = float(flag_value(argv, "--shutdown-timeout") or 30)
    assert seconds(setting(service, "Service", "TimeoutStopSec")) > grace
    kill = dict(service["Service"]).get("KillSignal", "SIGTERM")
    assert kill in ("SIGTERM", "SIGINT")
    reload_cmd = setting(service, "Service", "ExecReload")
    assert re.search(r"kill\s+(-HUP|-s\s*HUP|-SIGHUP|--signal[= ]HUP)\s+\$MAINPID", reload_cmd)


def test_socket_hands_one_stream_socket_to_the_service(socket_unit, service):
    listens = [(k, v) for k, v in socket_unit["Socket"] if k.startswith("Listen")]
    assert len(listens) == 1, "pyrestserver accepts exactly one socket from systemd"
    key, value = listens[0]
    assert key == "ListenStream"
    assert dict(socket_unit["Socket"]).get("Accept", "no") in ("no", "false")
    target = dict(socket_unit["Socket"]).get("Service", SERVICE.name)
    assert target == SERVICE.name
    assert "sockets.target" in list_setting(socket_unit, "Install", "WantedBy")
    # the same port as the service's own --listen, so both ways look alike
    listen = flag_value(exec_start_argv(service), "--listen") or ":8000"
    assert value.rpartition(":")[2] == listen.rpartition(":")[2]


# -- the ExecStart command line runs --------------------------------------------------------


def test_exec_start_command_line_starts_the_server(start_server, service, tmp_path):
    """ExecStart's flags, with --path and --listen pointed somewhere temporary,
    start a server (with the default <path>/.htpasswd, as an operator would
    create it) that answers requests and stops cleanly on SIGTERM."""
    argv = exec_start_argv(service)[1:]
    data = tmp_path / "data"
    data.mkdir()
    (data / ".htpasswd").write_text("")  # no users yet: everything is refused
    argv = replace_flag(argv, "--path", str(data))
    argv = replace_flag(argv, "--listen", "127.0.0.1:0")
    srv = start_server(*argv, data_dir=data)
    assert srv.request("GET", "/health").status == 200
    assert srv.request("POST", "/r/?create=true").status == 401
    assert srv.stop() == 0


@pytest.mark.skipif(SOCKET_ACTIVATE is None,
                    reason="systemd-socket-activate not installed (apt-get install systemd)")
def test_exec_start_command_line_under_socket_activation(service, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    data.mkdir()
    (data / ".htpasswd").write_text("")
    argv = replace_flag(exec_start_argv(service)[1:], "--path", str(data))
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", sys.executable, str(SERVER_SCRIPT), *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items()
             if k not in ("LISTEN_FDS", "LISTEN_PID")})
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=20)
                break
            except OSError:
                assert time.monotonic() < deadline, "systemd-socket-activate is not listening"
                time.sleep(0.05)
        with conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "systemd socket activation mode" in err.decode()
