"""Operator commands (issue 9): `user add|delete|list|verify`, `repos`, the
first-start hint and `--help` / `--version`.

Everything runs as a real process: the commands are run as
`python pyrestserver.py ...`, servers are started with the shared fixtures,
htpasswd files are made and checked by Apache's own `htpasswd` (apache2-utils)
and repositories are filled by the real restic binary.

What the commands promise:
* `user add NAME` prompts twice for the password (no echo), or reads the first
  line of stdin with `--password-stdin`; entries are bcrypt (`$2b$`) when the
  `bcrypt` package can be imported and SHA-512-crypt (`$6$`) otherwise, and
  both the server and `htpasswd -v` accept them;
* the file is replaced atomically with mode 0600; every other line (other
  users in any format, comments, blank lines) stays byte-identical; concurrent
  editors never lose each other's changes;
* a running server sees the change on SIGHUP, or by itself within 30 s;
* `repos` reports every repository with its size, snapshot count and newest
  snapshot time, and flags stray temp files, a missing config and unreadable
  files, as a table or as JSON, without changing anything;
* the first start without an htpasswd file (and without `--no-auth`) fails
  with the exact command that creates the first user.
"""

import datetime
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (
    IN_CI,
    ROOT,
    SERVER_SCRIPT,
    TYPES,
    Restic,
    ServerProcess,
    make_tree,
)

# -- helpers ------------------------------------------------------------------


def cli(*args, input=None, env=None, cwd=None, timeout=60, python=None):
    """Run `python pyrestserver.py ARGS...`; input is text (UTF-8) or bytes."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    if isinstance(input, str):
        input = input.encode("utf-8")
    p = subprocess.run(
        [python or sys.executable, str(SERVER_SCRIPT), *map(str, args)],
        input=input if input is not None else b"",
        capture_output=True, env=full_env, cwd=cwd, timeout=timeout,
    )
    p.stdout = p.stdout.decode("utf-8", "replace")
    p.stderr = p.stderr.decode("utf-8", "replace")
    return p


def add_user(htpasswd, name, password, env=None):
    p = cli("user", "add", name, "--htpasswd-file", htpasswd, "--password-stdin",
            input=password + "\n", env=env)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p


def entries(path):
    """{user: hash} of the non-comment lines of an htpasswd file."""
    found = {}
    for line in Path(path).read_text("utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            user, _, hashed = line.partition(":")
            found[user] = hashed
    return found


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def probe(srv, auth=None):
    """Status of a request that needs nothing but a successful login
    (the data directories below contain a `keys/` folder)."""
    return srv.request("GET", "/keys/", auth=auth).status


def auth_data_dir(tmp_path, name="data"):
    d = tmp_path / name
    (d / "keys").mkdir(parents=True)
    return d


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def sighup_and_wait(srv, expect="Reloaded htpasswd file"):
    before = sum(expect in line for line in srv.stderr_lines)
    os.kill(srv.pid, signal.SIGHUP)
    assert wait_for(lambda: sum(expect in line for line in srv.stderr_lines) > before), (
        f"no {expect!r} after SIGHUP:\n{srv.stderr}")


def run_in_pty(argv, answers, timeout=60, cwd=None):
    """Run argv with a pseudo-terminal as its controlling terminal (so getpass
    really prompts on a tty); answer each prompt in `answers` [(prompt, text)]
    in order.  Returns (exit code, everything the terminal showed)."""
    import fcntl
    import termios

    master, slave = os.openpty()
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    out, pos, pending = b"", 0, list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            while pending:
                at = out.find(pending[0][0].encode(), pos)
                if at < 0:
                    break
                prompt, text = pending.pop(0)
                pos = at + len(prompt)
                os.write(master, text.encode("utf-8") + b"\n")
        else:
            proc.kill()
            pytest.fail(f"{argv} did not finish; terminal showed:\n{out!r}")
    finally:
        os.close(master)
    return proc.wait(10), out.decode("utf-8", "replace")


@pytest.fixture(scope="session")
def htpasswd_tool():
    """Apache's htpasswd (Debian: apache2-utils)."""
    path = shutil.which("htpasswd")
    if path is None:
        if IN_CI:
            pytest.fail("htpasswd is required under CI=true (apt-get install apache2-utils)")
        pytest.skip("htpasswd not installed (apt-get install apache2-utils)")
    return path


@pytest.fixture
def apache_verify(htpasswd_tool):
    """apache_verify(file, user, password) -> True if `htpasswd -vb` accepts it."""

    def verify(path, user, password):
        p = subprocess.run([htpasswd_tool, "-vb", str(path), user, password],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return p.returncode == 0

    return verify


@pytest.fixture(scope="module")
def restic_binary(restic_bin, tmp_path_factory):
    """restic itself, or for restic < 0.16 (no global --no-progress flag, which
    conftest's Restic always passes) a wrapper that drops that flag."""
    probe = subprocess.run([restic_bin, "--no-progress", "version"], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=60)
    if probe.returncode == 0:
        return restic_bin
    wrapper = tmp_path_factory.mktemp("restic-wrapper") / "restic"
    wrapper.write_text(
        "#!/bin/sh\n"
        "for arg do shift; [ \"$arg\" = --no-progress ] || set -- \"$@\" \"$arg\"; done\n"
        f"exec '{restic_bin}' \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def need_bcrypt():
    return pytest.importorskip("bcrypt")


# Users of the Apache-made file: (name, htpasswd flags, password, kind word `user list` shows)
APACHE_USERS = [
    ("alice", ["-B", "-C", "5"], "alice-pw", "bcrypt"),
    ("bob", ["-m"], "bob-pw", "apr1"),
    ("carol", ["-5"], "carol-pw", "sha512"),
    ("dave", ["-2"], "dave-pw", "sha256"),
    ("erin", ["-s"], "erin-pw", "sha1"),
]


@pytest.fixture
def apache_file(tmp_path, htpasswd_tool):
    """An htpasswd file written by Apache's htpasswd (one user per format),
    with comments, blank lines and a commented-out entry added by hand;
    mode 0644 as an admin might have left it."""
    path = tmp_path / "etc" / "htpasswd"
    path.parent.mkdir()
    for i, (user, flags, password, _kind) in enumerate(APACHE_USERS):
        create = ["-c"] if i == 0 else []
        subprocess.run([htpasswd_tool, "-b", *create, *flags, str(path), user, password],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
    made = path.read_bytes().splitlines(keepends=True)
    assert len(made) == len(APACHE_USERS)
    content = (
        b"# restic users - managed by ops\n"
        + b"".join(made[:2])
        + b"\n"
        + b"# bob:$apr1$oldentry$0000000000000000000000\n"
        + b"   \n"
        + b"".join(made[2:])
        + b"# end of list\n"
    )
    path.write_bytes(content)
    os.chmod(path, 0o644)
    return path


def lines_of(path):
    return Path(path).read_bytes().split(b"\n")


# == user add =====================================================================


class TestUserAdd:
    def test_password_stdin_creates_0600_bcrypt_entry_accepted_by_server_and_apache(
            self, tmp_path, start_server, apache_verify, need_bcrypt):
        """From nothing: `user add --password-stdin` creates <path>/.htpasswd
        (and the data directory) with mode 0600 and a $2b$ entry, which Apache's
        htpasswd and a server started afterwards both accept."""
        data = tmp_path / "fresh" / "data"
        p = cli("user", "add", "alice", "--path", data, "--password-stdin", input="s3cret\n")
        assert p.returncode == 0, p.stderr
        htpasswd = data / ".htpasswd"
        assert mode_of(htpasswd) == 0o600
        users = entries(htpasswd)
        assert list(users) == ["alice"]
        assert users["alice"].startswith("$2b$"), users
        assert "alice" in p.stdout and str(htpasswd) in p.stdout
        assert apache_verify(htpasswd, "alice", "s3cret")
        assert not apache_verify(htpasswd, "alice", "s3cret2")
        # no temp file of the atomic write is left next to the file
        leftovers = [f for f in os.listdir(data)
                     if f not in (".htpasswd", ".htpasswd.lock")]
        assert leftovers == []

        (data / "keys").mkdir()
        srv = start_server("--path", str(data), data_dir=data)
        assert probe(srv, ("alice", "s3cret")) == 200
        assert probe(srv, ("alice", "wrong")) == 401
        assert probe(srv) == 401

    def test_without_bcrypt_writes_sha512_crypt_accepted_by_server_and_apache(
            self, tmp_path, start_server, apache_verify, hide_bcrypt):
        """Standard library only: the entry is $6$ (SHA-512-crypt), accepted by
        `htpasswd -v` and by a server that has no bcrypt either."""
        data = auth_data_dir(tmp_path)
        htpasswd = data / ".htpasswd"
        add_user(htpasswd, "alice", "s3cret", env=hide_bcrypt)
        hashed = entries(htpasswd)["alice"]
        assert hashed.startswith("$6$"), hashed
        assert mode_of(htpasswd) == 0o600
        assert apache_verify(htpasswd, "alice", "s3cret")
        assert not apache_verify(htpasswd, "alice", "S3cret")
        v = cli("user", "verify", "alice", "--path", data, "--password-stdin",
                input="s3cret\n", env=hide_bcrypt)
        assert v.returncode == 0, v.stderr
        srv = start_server("--path", str(data), data_dir=data, env=hide_bcrypt)
        assert probe(srv, ("alice", "s3cret")) == 200
        assert probe(srv, ("alice", "s3cret ")) == 401

    def test_password_stdin_uses_exactly_the_first_line(self, tmp_path, start_server,
                                                        apache_verify):
        """Spaces, colons and non-ASCII characters are part of the password;
        only the line ending (LF or CRLF) is dropped, and later lines are ignored."""
        data = auth_data_dir(tmp_path)
        htpasswd = data / ".htpasswd"
        password = " pä ss:wörd "
        p = cli("user", "add", "alice", "--htpasswd-file", htpasswd, "--password-stdin",
                input=password + "\r\nsecond line\n")
        assert p.returncode == 0, p.stderr
        assert apache_verify(htpasswd, "alice", password)
        assert not apache_verify(htpasswd, "alice", password.strip())
        srv = start_server("--path", str(data), data_dir=data)
        assert probe(srv, ("alice", password)) == 200
        assert probe(srv, ("alice", password.strip())) == 401

    def test_empty_password_is_refused(self, tmp_path):
        htpasswd = tmp_path / "htpasswd"
        p = cli("user", "add", "alice", "--htpasswd-file", htpasswd, "--password-stdin",
                input="\n")
        assert p.returncode != 0
        assert "password" in p.stderr.lower()
        assert not htpasswd.exists() or "alice" not in entries(htpasswd)

    def test_interactive_add_prompts_twice_without_echo(self, tmp_path, start_server,
                                                        apache_verify):
        """On a terminal the password is asked twice and never shown."""
        data = auth_data_dir(tmp_path)
        code, shown = run_in_pty(
            [sys.executable, str(SERVER_SCRIPT), "user", "add", "alice", "--path", str(data)],
            [("Password", "tty-s3cret"), ("Password", "tty-s3cret")])
        assert code == 0, shown
        assert shown.count("Password") >= 2, shown
        assert "tty-s3cret" not in shown, "the password was echoed"
        assert apache_verify(data / ".htpasswd", "alice", "tty-s3cret")
        srv = start_server("--path", str(data), data_dir=data)
        assert probe(srv, ("alice", "tty-s3cret")) == 200

    def test_interactive_mismatch_fails_and_leaves_the_file_alone(self, apache_file):
        before = apache_file.read_bytes()
        inode = os.stat(apache_file).st_ino
        code, shown = run_in_pty(
            [sys.executable, str(SERVER_SCRIPT), "user", "add", "bob",
             "--htpasswd-file", str(apache_file)],
            [("Password", "first-try"), ("Password", "second-try")])
        assert code != 0, shown
        assert "match" in shown.lower(), shown
        assert apache_file.read_bytes() == before
        assert os.stat(apache_file).st_ino == inode
        assert mode_of(apache_file) == 0o644

    @pytest.mark.parametrize("name", [
        "a:b", "a b", "#alice", "a/b", "tab\tname", "new\nline", "quote'd", "semi;colon",
        "x" + "\u200b",  # zero-width space: invisible, not a letter
    ], ids=lambda n: repr(n))
    def test_invalid_usernames_are_refused(self, apache_file, name):
        before = apache_file.read_bytes()
        p = cli("user", "add", name, "--htpasswd-file", apache_file, "--password-stdin",
                input="pw\n")
        assert p.returncode != 0, p.stdout
        assert "invalid username" in p.stderr.lower(), p.stderr
        assert apache_file.read_bytes() == before

    @pytest.mark.parametrize("name", ["jörg", "a.b@c-d_e", "user42", "Ωmega"])
    def test_unusual_but_valid_usernames_are_accepted(self, tmp_path, name, hide_bcrypt):
        """Letters of any script, digits and @ . _ - are usernames (as in rest-server)."""
        data = auth_data_dir(tmp_path)
        add_user(data / ".htpasswd", name, "pw", env=hide_bcrypt)
        assert list(entries(data / ".htpasswd")) == [name]

    def test_root_editing_keeps_owner_and_group_of_the_file(self, apache_file, hide_bcrypt):
        """An admin runs `sudo ... user add` on the file of a server that runs as
        its own user: the replaced file must stay that user's, or the server
        can no longer read it (reload fails, next start fails)."""
        if os.geteuid() != 0:
            pytest.skip("needs root to hand the file to another user")
        os.chown(apache_file, 65534, 65534)
        add_user(apache_file, "frank", "frank-pw", env=hide_bcrypt)
        st = os.stat(apache_file)
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert mode_of(apache_file) == 0o600


# == editing files made by Apache's htpasswd ==========================================


class TestApacheFiles:
    def test_adding_a_user_keeps_every_other_line_byte_identical(
            self, apache_file, apache_verify, hide_bcrypt):
        before = apache_file.read_bytes()
        add_user(apache_file, "frank", "frank-pw", env=hide_bcrypt)
        after = apache_file.read_bytes()
        assert after.startswith(before)
        added = after[len(before):]
        assert re.fullmatch(rb"frank:\$6\$[^\n]+\n", added), added
        assert mode_of(apache_file) == 0o600
        assert apache_verify(apache_file, "frank", "frank-pw")
        for user, _flags, password, _kind in APACHE_USERS:
            assert apache_verify(apache_file, user, password), user

    def test_adding_an_existing_user_replaces_only_that_line(
            self, apache_file, apache_verify, hide_bcrypt):
        before = lines_of(apache_file)
        index = [i for i, line in enumerate(before) if line.startswith(b"bob:")]
        assert len(index) == 1
        p = add_user(apache_file, "bob", "new-bob-pw", env=hide_bcrypt)
        assert "updated" in p.stdout.lower() or "replaced" in p.stdout.lower(), p.stdout
        after = lines_of(apache_file)
        assert len(after) == len(before)
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert changed == index
        assert after[index[0]].startswith(b"bob:$6$")
        # the commented-out "# bob:..." line is a comment, not bob's entry
        assert b"# bob:$apr1$oldentry$0000000000000000000000" in after
        assert apache_verify(apache_file, "bob", "new-bob-pw")
        assert not apache_verify(apache_file, "bob", "bob-pw")
        assert apache_verify(apache_file, "carol", "carol-pw")

    def test_delete_removes_only_that_line(self, apache_file, apache_verify):
        before = lines_of(apache_file)
        carol = [line for line in before if line.startswith(b"carol:")]
        p = cli("user", "delete", "carol", "--htpasswd-file", apache_file)
        assert p.returncode == 0, p.stderr
        after = lines_of(apache_file)
        assert after == [line for line in before if line not in carol]
        assert mode_of(apache_file) == 0o600
        assert not apache_verify(apache_file, "carol", "carol-pw")
        for user, _flags, password, _kind in APACHE_USERS:
            if user != "carol":
                assert apache_verify(apache_file, user, password), user

    def test_deleting_a_missing_user_exits_1_with_a_clear_message(self, apache_file):
        before = apache_file.read_bytes()
        p = cli("user", "delete", "mallory", "--htpasswd-file", apache_file)
        assert p.returncode == 1
        assert "mallory" in p.stderr and str(apache_file) in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
        assert apache_file.read_bytes() == before
        # a commented-out entry is not a user either
        p = cli("user", "delete", "#", "--htpasswd-file", apache_file)
        assert p.returncode != 0
        assert apache_file.read_bytes() == before

    def test_list_prints_every_user_with_its_hash_kind(self, apache_file, hide_bcrypt):
        add_user(apache_file, "frank", "frank-pw", env=hide_bcrypt)
        p = cli("user", "list", "--htpasswd-file", apache_file)
        assert p.returncode == 0, p.stderr
        rows = {}
        for line in p.stdout.splitlines():
            if line.strip():
                name, *rest = line.split()
                rows[name] = " ".join(rest).lower()
        expected = {u: kind for u, _f, _p, kind in APACHE_USERS}
        expected["frank"] = "sha512"
        assert set(rows) == set(expected), p.stdout
        for user, kind in expected.items():
            assert kind in rows[user], (user, rows[user])
        assert "bcrypt" not in rows["bob"] and "sha512" not in rows["dave"]

    def test_list_does_not_modify_the_file(self, apache_file):
        before, st = apache_file.read_bytes(), os.stat(apache_file)
        assert cli("user", "list", "--htpasswd-file", apache_file).returncode == 0
        assert apache_file.read_bytes() == before
        assert os.stat(apache_file).st_ino == st.st_ino
        assert os.stat(apache_file).st_mtime_ns == st.st_mtime_ns

    def test_verify_exits_0_for_the_right_password_and_1_otherwise(self, apache_file):
        for user, _flags, password, _kind in APACHE_USERS:
            ok = cli("user", "verify", user, "--htpasswd-file", apache_file,
                     "--password-stdin", input=password + "\n")
            assert ok.returncode == 0, (user, ok.stdout, ok.stderr)
            bad = cli("user", "verify", user, "--htpasswd-file", apache_file,
                      "--password-stdin", input=password + "x\n")
            assert bad.returncode == 1, (user, bad.stdout, bad.stderr)
        missing = cli("user", "verify", "mallory", "--htpasswd-file", apache_file,
                      "--password-stdin", input="pw\n")
        assert missing.returncode == 1
        assert "mallory" in missing.stderr

    def test_verify_refuses_a_plaintext_entry(self, apache_file, htpasswd_tool):
        """htpasswd -p writes the password as is; verify must not accept it as a hash."""
        subprocess.run([htpasswd_tool, "-b", "-p", str(apache_file), "pat", "plain-pw"],
                       check=True, capture_output=True)
        p = cli("user", "verify", "pat", "--htpasswd-file", apache_file,
                "--password-stdin", input="plain-pw\n")
        assert p.returncode == 1
        assert "Traceback" not in p.stderr

    def test_apache_htpasswd_can_keep_editing_our_file(self, apache_file, htpasswd_tool,
                                                       apache_verify, hide_bcrypt):
        add_user(apache_file, "frank", "frank-pw", env=hide_bcrypt)
        subprocess.run([htpasswd_tool, "-b", "-B", "-C", "4", str(apache_file), "gina",
                        "gina-pw"], check=True, capture_output=True)
        subprocess.run([htpasswd_tool, "-D", str(apache_file), "alice"], check=True,
                       capture_output=True)
        assert apache_verify(apache_file, "frank", "frank-pw")
        assert apache_verify(apache_file, "gina", "gina-pw")
        p = cli("user", "list", "--htpasswd-file", apache_file)
        names = {line.split()[0] for line in p.stdout.splitlines() if line.strip()}
        assert names == {"bob", "carol", "dave", "erin", "frank", "gina"}

    @pytest.mark.parametrize("newline,comment", [
        (b"\r\n", b"# made on windows"),
        (b"\n", b"# page break \x0c in a comment"),
        (b"\n", "# line separator \u2028 in a comment".encode()),
    ], ids=["crlf-file", "form-feed-in-comment", "u2028-in-comment"])
    def test_unusual_line_content_is_kept_byte_identical(self, tmp_path, entry_line,
                                                          hide_bcrypt, newline, comment):
        """A file last saved on Windows (CRLF line ends, which the server reads
        fine), or with odd characters in a comment, keeps its other lines
        exactly as they were."""
        path = tmp_path / "htpasswd"
        original = newline.join([comment, entry_line("bob", "bob-pw").encode(), b""])
        path.write_bytes(original)
        add_user(path, "frank", "frank-pw", env=hide_bcrypt)
        after = path.read_bytes()
        assert after.startswith(original), after
        assert set(entries(path)) >= {"bob", "frank"}

    def test_file_that_is_not_utf8_gives_a_clear_error_and_is_left_alone(self, tmp_path,
                                                                          entry_line):
        """A Latin-1 comment (the server itself refuses such a file with a
        message): the command says what is wrong instead of a traceback."""
        path = tmp_path / "htpasswd"
        content = b"# J\xe9r\xf4me's account\n" + entry_line("bob", "bob-pw").encode() + b"\n"
        path.write_bytes(content)
        for args, stdin in ((["add", "frank", "--password-stdin"], "pw\n"),
                            (["delete", "bob"], None), (["list"], None)):
            p = cli("user", *args, "--htpasswd-file", path, input=stdin)
            assert p.returncode != 0, args
            assert "Traceback" not in p.stderr, p.stderr
            assert str(path) in p.stderr, p.stderr
            assert path.read_bytes() == content

    def test_list_on_a_missing_file_says_so_and_creates_nothing(self, tmp_path):
        """A mistyped --path must not create directories or lock files."""
        missing = tmp_path / "no-such-data"
        p = cli("user", "list", "--path", missing)
        assert not missing.exists(), os.listdir(missing)
        assert p.returncode != 0
        assert str(missing) in p.stderr


@pytest.fixture
def entry_line(htpasswd_tool):
    """entry_line(user, password) -> one apr1 'user:hash' line written by htpasswd."""

    def make(user, password):
        p = subprocess.run([htpasswd_tool, "-n", "-b", "-m", user, password],
                           capture_output=True, text=True, check=True)
        return p.stdout.strip()

    return make


# == concurrent editors =============================================================


class TestConcurrentEdits:
    def _spawn(self, args, stdin, env):
        proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "user", *map(str, args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        return proc, stdin

    def _run_all(self, jobs, env=None):
        """Start every job before waiting for any (the hashing happens before the
        file is locked, so the editors really overlap)."""
        started = [self._spawn(args, stdin, env) for args, stdin in jobs]
        for proc, stdin in started:  # every password is handed over before any wait
            proc.stdin.write(stdin.encode() if stdin else b"")
            proc.stdin.close()
        results = []
        for proc, _stdin in started:
            proc.wait(120)  # the little output they print fits in the pipes
            out, err = proc.stdout.read(), proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
            results.append((proc.returncode, out.decode(), err.decode()))
        return results

    def test_twenty_simultaneous_adds_all_land_and_nothing_is_corrupted(
            self, apache_file, apache_verify, hide_bcrypt):
        before = apache_file.read_bytes()
        names = [f"user{i:02d}" for i in range(20)]
        results = self._run_all([
            (["add", n, "--htpasswd-file", apache_file, "--password-stdin"], f"pw-{n}\n")
            for n in names], env=hide_bcrypt)
        assert all(code == 0 for code, _o, _e in results), results
        after = apache_file.read_bytes()
        # the original bytes are untouched; 20 well-formed lines were appended
        assert after.startswith(before)
        added = after[len(before):].decode().splitlines()
        assert sorted(line.split(":", 1)[0] for line in added) == names
        assert all(re.fullmatch(r"user\d\d:\$(2b|6)\$\S+", line) for line in added), added
        assert mode_of(apache_file) == 0o600
        for n in names:
            assert apache_verify(apache_file, n, f"pw-{n}"), n
        stray = [f for f in os.listdir(apache_file.parent)
                 if f not in ("htpasswd", "htpasswd.lock")]
        assert stray == []

    def test_simultaneous_adds_and_deletes_end_with_exactly_the_expected_users(
            self, apache_file, hide_bcrypt):
        jobs = [(["add", f"new{i}", "--htpasswd-file", apache_file, "--password-stdin"],
                 f"pw{i}\n") for i in range(10)]
        jobs += [(["delete", user, "--htpasswd-file", apache_file], None)
                 for user, *_ in APACHE_USERS[:3]]
        results = self._run_all(jobs, env=hide_bcrypt)
        assert all(code == 0 for code, _o, _e in results), results
        expected = {f"new{i}" for i in range(10)} | {u for u, *_ in APACHE_USERS[3:]}
        assert set(entries(apache_file)) == expected
        text = apache_file.read_text()
        assert "# restic users - managed by ops" in text and "# end of list" in text


# == a running server picks changes up ===========================================


class TestRunningServer:
    def test_sighup_picks_up_added_and_deleted_users(self, tmp_path, start_server,
                                                     hide_bcrypt):
        data = auth_data_dir(tmp_path)
        add_user(data / ".htpasswd", "alice", "alice-pw", env=hide_bcrypt)
        srv = start_server("--path", str(data), data_dir=data)
        assert probe(srv, ("alice", "alice-pw")) == 200  # now also in the credential cache
        assert probe(srv, ("bob", "bob-pw")) == 401

        add_user(data / ".htpasswd", "bob", "bob-pw", env=hide_bcrypt)
        sighup_and_wait(srv)
        assert probe(srv, ("bob", "bob-pw")) == 200

        p = cli("user", "delete", "alice", "--path", data)
        assert p.returncode == 0, p.stderr
        sighup_and_wait(srv)
        assert probe(srv, ("alice", "alice-pw")) == 401
        assert probe(srv, ("bob", "bob-pw")) == 200

    @pytest.mark.slow
    def test_changes_are_picked_up_without_a_signal_within_30_seconds(
            self, tmp_path, start_server, hide_bcrypt):
        """The server re-checks the file's identity (mtime, size, inode) every
        30 s, so an edit is live without SIGHUP (this test waits ~31 s)."""
        data = auth_data_dir(tmp_path)
        add_user(data / ".htpasswd", "alice", "alice-pw", env=hide_bcrypt)
        srv = start_server("--path", str(data), data_dir=data)
        assert probe(srv, ("alice", "alice-pw")) == 200
        add_user(data / ".htpasswd", "carol", "carol-pw", env=hide_bcrypt)
        assert cli("user", "delete", "alice", "--path", data).returncode == 0
        time.sleep(31)
        assert probe(srv, ("carol", "carol-pw")) == 200
        assert probe(srv, ("alice", "alice-pw")) == 401

    @pytest.mark.e2e
    def test_from_nothing_to_an_authenticated_restic_backup(self, tmp_path, start_server,
                                                            make_restic, restic_binary):
        data = tmp_path / "data"
        p = cli("user", "add", "alice", "--path", data, "--password-stdin", input="pi-pw\n")
        assert p.returncode == 0, p.stderr
        srv = start_server("--path", str(data), data_dir=data)
        src = make_tree(tmp_path / "src", files=5, big=10_000)
        good = make_restic(srv.repo_url("alice", userinfo="alice:pi-pw"))
        good.binary = restic_binary
        good.run("init")
        good.run("backup", str(src))
        snaps = json.loads(good.run("snapshots", "--json").stdout)
        assert len(snaps) == 1
        bad = make_restic(srv.repo_url("alice", userinfo="alice:wrong"))
        bad.binary = restic_binary
        denied = bad.run("snapshots", check=False, timeout=120)
        assert denied.returncode != 0


# == first start without users =====================================================


def first_start(data, cwd, script=str(SERVER_SCRIPT)):
    p = subprocess.run(
        [sys.executable, script, "--path", str(data), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30, cwd=cwd, stdin=subprocess.DEVNULL)
    assert "start server on" not in p.stderr, p.stderr
    return p


def printed_command(stderr):
    """The shell command shown for creating the first user (NAME as placeholder)."""
    for line in stderr.splitlines():
        if "user add" in line:
            at = line.index("user add")
            start = line.rfind(":", 0, at)  # after "Create the first user with:"
            return line[start + 1:].strip()
    pytest.fail(f"no 'user add' command in:\n{stderr}")


def run_printed(command, cwd, name="alice", password="first-pw"):
    """Run the printed command exactly as an operator would paste it (with NAME
    filled in and the password on stdin)."""
    assert "NAME" in command, command
    command = command.replace("NAME", name) + " --password-stdin"
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["/bin/sh", "-c", command], input=password + "\n",
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


class TestFirstStart:
    def test_missing_htpasswd_fails_with_the_command_that_creates_the_first_user(
            self, tmp_path, start_server):
        data = tmp_path / "data"
        p = first_start(data, cwd=ROOT, script="pyrestserver.py")
        assert p.returncode != 0
        assert "--no-auth" in p.stderr
        command = printed_command(p.stderr)
        assert "user add" in command
        made = run_printed(command, cwd=ROOT)
        assert made.returncode == 0, (command, made.stderr)
        assert mode_of(data / ".htpasswd") == 0o600
        (data / "keys").mkdir()
        srv = start_server("--path", str(data), data_dir=data)
        assert probe(srv, ("alice", "first-pw")) == 200

    def test_printed_command_works_when_started_from_another_directory(self, tmp_path):
        """`python3 /opt/restic/pyrestserver.py --path ...` from the home directory:
        the hint must name the script so that it runs from there too."""
        data = tmp_path / "data"
        p = first_start(data, cwd=tmp_path)
        assert p.returncode != 0
        made = run_printed(printed_command(p.stderr), cwd=tmp_path)
        assert made.returncode == 0, (printed_command(p.stderr), made.stderr)
        assert "alice" in entries(data / ".htpasswd")

    def test_printed_command_survives_a_path_with_spaces(self, tmp_path):
        data = tmp_path / "my backups" / "data"
        p = first_start(data, cwd=ROOT, script="pyrestserver.py")
        assert p.returncode != 0
        command = printed_command(p.stderr)
        made = run_printed(command, cwd=ROOT)
        assert made.returncode == 0, (command, made.stderr)
        assert "alice" in entries(data / ".htpasswd")

    def test_printed_command_targets_an_explicit_htpasswd_file(self, tmp_path):
        users = tmp_path / "etc" / "restic-users"
        p = subprocess.run(
            [sys.executable, "pyrestserver.py", "--path", str(tmp_path / "data"),
             "--htpasswd-file", str(users), "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
        assert p.returncode != 0 and "start server on" not in p.stderr
        command = printed_command(p.stderr)
        assert str(users) in command
        made = run_printed(command, cwd=ROOT)
        assert made.returncode == 0, (command, made.stderr)
        assert list(entries(users)) == ["alice"]
        assert not (tmp_path / "data" / ".htpasswd").exists()

    def test_no_auth_starts_without_an_htpasswd_file(self, start_server, tmp_path):
        srv = start_server("--no-auth")
        assert srv.request("GET", "/config").status == 404  # served, no repo yet
        assert not (srv.data_dir / ".htpasswd").exists()


# == --help and --version ============================================================


def help_blocks(text):
    """{'--flag': normalized help text} and {section title: [flags]} from argparse help."""
    sections, flags = {}, {}
    section, current = None, None
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            section, current = line[:-1], None
            sections[section] = []
            continue
        m = re.match(r"^  (-\w, )?(--[\w-]+)(.*)$", line)
        if m and section is not None:
            current = m.group(2)
            sections[section].append(current)
            flags[current] = m.group(3)
        elif current and line.startswith("    "):
            flags[current] += " " + line.strip()
    return sections, {k: " ".join(v.split()) for k, v in flags.items()}


@pytest.fixture(scope="module")
def main_help():
    p = cli("--help")
    assert p.returncode == 0, p.stderr
    return p.stdout


class TestHelp:

    def test_options_are_grouped(self, main_help):
        sections, _ = help_blocks(main_help)
        wanted = {"storage": {"--path", "--backend"},
                  "access control": {"--no-auth", "--htpasswd-file", "--append-only",
                                     "--private-repos", "--proxy-auth-username"},
                  "network and TLS": {"--listen", "--tls", "--tls-cert", "--tls-key",
                                      "--tls-min-ver", "--tls-client-ca"},
                  "observability": {"--log", "--debug", "--prometheus",
                                    "--prometheus-no-auth"},
                  "limits": {"--max-connections", "--header-timeout", "--idle-timeout"}}
        for title, expected in wanted.items():
            assert title in sections, sorted(sections)
            assert expected <= set(sections[title]), (title, sections[title])
        # nothing but --help/--version is left ungrouped
        ungrouped = [f for title, fs in sections.items() if title not in wanted for f in fs]
        assert set(ungrouped) <= {"--help", "--version"}, ungrouped
        # and the quota flags sit in one of the groups
        grouped = {f for title in wanted for f in sections[title]}
        assert {"--max-size", "--max-repo-size"} <= grouped

    def test_every_flag_with_a_default_shows_it(self, main_help):
        # the parser of this very file (not some installed copy), to enumerate every flag
        spec = importlib.util.spec_from_file_location("pyrestserver_help_probe", SERVER_SCRIPT)
        pyrestserver = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pyrestserver)
        _, flags = help_blocks(main_help)
        missing = []
        for action in pyrestserver.build_parser()._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if not long or long[0] in ("--help", "--version"):
                continue
            default = action.default
            if default is None or default is False or default == [] or default == "":
                continue
            if f"default: {default}" not in flags[long[0]]:
                missing.append((long[0], default, flags[long[0]]))
        assert missing == []

    def test_rest_server_defaults_are_stated(self, main_help):
        _, flags = help_blocks(main_help)
        assert f"default: {os.path.join(tempfile.gettempdir(), 'restic')}" in flags["--path"]
        assert "default: :8000" in flags["--listen"]
        assert "default: 1.2" in flags["--tls-min-ver"]
        assert "<path>/.htpasswd" in flags["--htpasswd-file"]
        assert "default: 0" in flags["--max-size"]

    def test_subcommand_help_states_the_default_data_directory(self):
        default = os.path.join(tempfile.gettempdir(), "restic")
        for command in ("user", "repos"):
            p = cli(command, "--help")
            assert p.returncode == 0, p.stderr
            _, flags = help_blocks(p.stdout)
            assert default in flags["--path"], (command, flags["--path"])

    def test_main_help_points_to_the_commands(self, main_help):
        assert "user" in main_help and "repos" in main_help

    @pytest.mark.parametrize("flag", ["--version", "-v"])
    def test_version(self, flag):
        version = re.search(r'^__version__ = "([^"]+)"', SERVER_SCRIPT.read_text(),
                            re.M).group(1)
        p = cli(flag)
        assert p.returncode == 0
        assert re.search(rf"\b{re.escape(version)}\b", p.stdout + p.stderr), p.stdout


# == repos ========================================================================


class TestReposCommand:
    def test_missing_data_directory_is_a_clear_error(self, tmp_path):
        p = cli("repos", "--path", tmp_path / "nope")
        assert p.returncode == 1
        assert str(tmp_path / "nope") in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "nope").exists()

    def test_empty_data_directory_lists_nothing(self, tmp_path):
        (tmp_path / "empty").mkdir()
        p = cli("repos", "--path", tmp_path / "empty", "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == []


REPO_SNAPSHOTS = {"photos": 2, "alice/work": 3}


@pytest.fixture(scope="module")
def restic_data(tmp_path_factory, restic_binary):
    """A data directory filled by restic through a --no-auth server: two
    repositories (one nested) with a few snapshots each.  Returns
    (data dir, {repo: restic's `snapshots --json`})."""
    base = tmp_path_factory.mktemp("repos")
    data = base / "data"
    data.mkdir()
    srv = ServerProcess(data, ["--no-auth"]).start()
    snapshots = {}
    try:
        for n, (repo, count) in enumerate(REPO_SNAPSHOTS.items()):
            src = make_tree(base / f"src-{n}", files=8, seed=n, big=50_000)
            work = base / f"restic-{n}"
            work.mkdir()
            r = Restic(restic_binary, srv.repo_url(repo), work)
            r.run("init")
            for i in range(count):
                (src / f"changes-{i}.txt").write_text(f"backup {i} of {repo}\n")
                r.run("backup", str(src))
            snapshots[repo] = json.loads(r.run("snapshots", "--json").stdout)
    finally:
        srv.stop()
    return data, snapshots


@pytest.fixture
def data_copy(restic_data, tmp_path):
    """A private copy (mtimes kept) that a test may damage."""
    src, snapshots = restic_data
    dst = tmp_path / "copy"
    shutil.copytree(src, dst, symlinks=True)
    return dst, snapshots


def fs_usage(repo_dir):
    """(bytes of config + objects, object count, newest snapshot mtime) from the filesystem."""
    repo_dir = Path(repo_dir)
    size = (repo_dir / "config").stat().st_size if (repo_dir / "config").is_file() else 0
    count, newest = 0, 0.0
    for kind in TYPES:
        for f in (repo_dir / kind).rglob("*"):
            if f.is_file() and not f.is_symlink() and not f.name.startswith("."):
                size += f.stat().st_size
                count += 1
                if kind == "snapshots":
                    newest = max(newest, f.stat().st_mtime)
    return size, count, newest


def utc(stamp):
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def repos_json(data):
    p = cli("repos", "--path", data, "--json")
    assert p.returncode == 0, p.stderr
    return {r["repo"].strip("/"): r for r in json.loads(p.stdout)}


def repos_table(data):
    p = cli("repos", "--path", data)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    return lines[0], {line.split()[0].strip("/"): line for line in lines[1:]}


HUMAN = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|kB|KB|MB|GB)\b")


@pytest.mark.e2e
class TestRepos:
    def test_json_numbers_match_the_filesystem_and_restic(self, restic_data):
        data, snapshots = restic_data
        reports = repos_json(data)
        assert set(reports) == set(REPO_SNAPSHOTS)
        for repo, report in reports.items():
            size, objects, newest = fs_usage(data / repo)
            assert report["size"] == size, repo
            assert report["objects"] == objects, repo
            assert report["snapshots"] == len(snapshots[repo]) == REPO_SNAPSHOTS[repo]
            assert abs(utc(report["last_snapshot"]) - newest) < 1.0, (report, newest)
            # restic's own time of the newest snapshot is (a little) before its file
            restic_newest = max(
                datetime.datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", s["time"]))
                .timestamp() for s in snapshots[repo])
            assert -2 <= utc(report["last_snapshot"]) - restic_newest < 120
            assert report["problems"] == [] and report["temp_files"] == 0

    def test_table_lists_each_repository(self, restic_data):
        data, _ = restic_data
        header, rows = repos_table(data)
        for column in ("REPO", "SIZE", "SNAPSHOTS", "LAST SNAPSHOT"):
            assert column in header.upper()
        assert set(rows) == set(REPO_SNAPSHOTS)
        reports = repos_json(data)
        units = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
        for repo, line in rows.items():
            assert line.split()[0] == f"/{repo}/"
            report = reports[repo]
            assert re.search(rf"\s{report['snapshots']}\s", line), line
            assert report["last_snapshot"] in line
            assert line.rstrip().endswith("ok"), line
            number, unit = HUMAN.search(line).groups()
            shown = float(number) * units[unit]
            assert abs(shown - report["size"]) <= 0.05 * units[unit] + 1, (line, report)

    def test_a_planted_temp_file_is_flagged_and_left_in_place(self, data_copy):
        data, _ = data_copy
        temp = data / "photos" / "data" / "ab" / ".upload-xyz"
        temp.parent.mkdir(exist_ok=True)
        temp.write_bytes(b"half an upload" * 1000)
        clean_size = fs_usage(data / "photos")[0]
        reports = repos_json(data)
        photos = reports["photos"]
        assert photos["temp_files"] == 1
        assert any("temp" in problem for problem in photos["problems"]), photos
        assert photos["size"] == clean_size  # the temp file is not repository data
        assert reports["alice/work"]["problems"] == []
        _, rows = repos_table(data)
        assert "temp" in rows["photos"] and not rows["photos"].rstrip().endswith("ok")
        assert rows["alice/work"].rstrip().endswith("ok")
        assert temp.exists(), "inspecting must not delete anything"

    def test_a_repository_missing_its_config_is_flagged_as_damaged(self, data_copy):
        data, snapshots = data_copy
        (data / "alice" / "work" / "config").unlink()
        reports = repos_json(data)
        work = reports["alice/work"]
        assert any("config" in problem for problem in work["problems"]), work
        assert work["snapshots"] == len(snapshots["alice/work"])
        assert reports["photos"]["problems"] == []
        _, rows = repos_table(data)
        assert "config" in rows["alice/work"]

    def test_a_dangling_snapshot_entry_is_flagged_as_unreadable(self, data_copy):
        """(The suite runs as root, for whom permissions never block a read; a
        symlink to nowhere is an entry that cannot be read for anyone.)"""
        data, _ = data_copy
        name = "f" * 64
        os.symlink("/nonexistent/target", data / "photos" / "snapshots" / name)
        photos = repos_json(data)["photos"]
        assert any("unreadable" in p and name in p for p in photos["problems"]), photos
        _, rows = repos_table(data)
        assert "unreadable" in rows["photos"]

    @pytest.fixture
    def as_nobody(self, restic_data):
        """(world-readable copy of the data, runner) for running `repos` as an
        unprivileged user, so that file permissions really apply."""
        python = "/usr/bin/python3"
        if os.geteuid() != 0:
            pytest.skip("needs root to switch to an unprivileged user")
        if not os.access(python, os.X_OK):
            pytest.skip(f"{python} (a Python any user can run) is not available")
        top = Path(tempfile.mkdtemp(prefix="pyrestserver-repos-"))
        try:
            os.chmod(top, 0o755)
            data = top / "data"
            shutil.copytree(restic_data[0], data, symlinks=True)
            for dirpath, dirs, files in os.walk(data):
                os.chmod(dirpath, 0o755)
                for f in files:
                    os.chmod(os.path.join(dirpath, f), 0o644)

            def run(*args):
                return subprocess.run(
                    [python, str(SERVER_SCRIPT), *args], capture_output=True, text=True,
                    user=65534, group=65534, extra_groups=[], cwd="/", timeout=60,
                    env={"PATH": "/usr/bin:/bin", "HOME": "/"})

            probe_run = run("--version")
            if probe_run.returncode != 0:
                pytest.skip(f"pyrestserver cannot run as nobody: {probe_run.stderr}")
            yield data, run
        finally:
            shutil.rmtree(top)

    def test_an_unreadable_file_is_flagged(self, as_nobody):
        data, run = as_nobody
        index = next((data / "alice" / "work" / "index").iterdir())
        os.chmod(index, 0)
        p = run("repos", "--path", str(data), "--json")
        assert p.returncode == 0, p.stderr
        reports = {r["repo"].strip("/"): r for r in json.loads(p.stdout)}
        work = reports["alice/work"]
        assert any("unreadable" in x and index.name in x for x in work["problems"]), work
        assert reports["photos"]["problems"] == []

    def test_an_unreadable_snapshots_folder_is_flagged(self, as_nobody):
        """A folder that cannot be listed hides every snapshot in it: that is
        damage to report, not a healthy repository with 0 snapshots."""
        data, run = as_nobody
        os.chmod(data / "photos" / "snapshots", 0)
        p = run("repos", "--path", str(data), "--json")
        assert p.returncode == 0, p.stderr
        photos = {r["repo"].strip("/"): r for r in json.loads(p.stdout)}["photos"]
        assert photos["problems"] != [], photos
        assert any("snapshots" in x for x in photos["problems"]), photos
