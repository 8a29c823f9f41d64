#!/usr/bin/env python3
"""pyrestserver: a REST backend for restic in one standard-library Python file.

It is a drop-in replacement for restic's Go ``rest-server``: same URLs, same
status codes, same flags, same layout on disk.  Copy this file anywhere that
has Python 3.9 or newer and run::

    python3 pyrestserver.py --path /srv/restic --no-auth

then point restic at ``rest:http://HOST:8000/REPO/``.

The module reads top to bottom in the order a request flows through it:

1. constants and errors;
2. storage: the ``StorageProvider`` protocol and ``LocalStorageProvider``;
3. authentication (htpasswd, proxy header, client certificates);
4. quota and per-repo usage;
5. metrics (a small Prometheus text exporter);
6. the HTTP API: router and handlers (``ResticRESTApp``, also a WSGI app);
7. the built-in server: HTTP/1.1 framing, timeouts, TLS, sendfile;
8. the command line (``main``).

Every object but ``config`` is named by the SHA-256 of its content, so every
upload is verified before it is published; every publish is atomic and durable
(temp file, fsync, link without overwrite, fsync of the directory) before the
client hears 200.
"""

import argparse
import base64
import binascii
import errno
import hashlib
import hmac
import importlib
import io
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import cycle, islice

__version__ = "0.2.0"

# =============================================================================
# Constants and errors
# =============================================================================

OBJECT_TYPES = ("data", "index", "keys", "locks", "snapshots")
#: Path segments that end the repository part of a URL (never repo names).
RESERVED_NAMES = frozenset(OBJECT_TYPES + ("config",))
#: rest-server allows repositories at most two folders deep (``/alice/work/``).
MAX_REPO_DEPTH = 2
#: Upload temp files live next to their final name, so publishing is a link on
#: one filesystem.  A leading dot keeps them out of listings and can never
#: collide with an object name (64 hex digits) or a repo name (no leading dot).
TEMP_PREFIX = ".upload-"
OBJECT_ID = re.compile(r"[0-9a-f]{64}\Z")
V1_TYPE = "application/vnd.x.restic.rest.v1"
V2_TYPE = "application/vnd.x.restic.rest.v2"
#: Bytes read, hashed and written per step of an upload (and read per step of
#: a download that cannot use sendfile).  Uploads read into reused buffers of
#: this size, so it is also the memory one upload in progress holds.
CHUNK_SIZE = 256 * 1024
LISTING_CACHE_ENTRIES = 100_000  # objects whose listing the local backend remembers
#: An upload asks the kernel to start writing its data to disk after every
#: this many bytes, so that the fsync before the 200 waits only for the tail.
WRITEBACK_STEP = 2 * 1024 * 1024


class StorageError(Exception):
    """Storage failed for a reason that is not the client's fault (HTTP 500)."""


class NotFound(StorageError):
    """The object, listing or repository really does not exist (HTTP 404)."""


class ObjectExists(StorageError):
    """Publishing would overwrite an existing object (HTTP 403)."""


class InsufficientStorage(StorageError):
    """The disk or a quota is full (HTTP 507)."""


class QuotaExceeded(InsufficientStorage):
    """An upload would take a repository or the server over its quota."""


class ConfigError(Exception):
    """A command-line or configuration problem: a one-line message, exit 1."""


def storage_error(exc, what):
    """Map an OSError to the error the HTTP layer answers for it.

    Only "really not there" may become NotFound: restic takes a 404 to mean
    "does not exist", so an unreadable file answered 404 would hide data.
    """
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return NotFound(what)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"{what}: {exc.strerror}")
    return StorageError(f"{what}: {exc.strerror or exc}")


# =============================================================================
# Storage: the protocol every backend implements, and the local filesystem
# =============================================================================
#
# The HTTP layer speaks to storage only through ``StorageProvider``.  A repo is
# a tuple of folder names (``()`` for the root repo, ``("alice", "work")``); an
# object is ``(repo, kind, name)`` where kind is ``config`` (name ``config``) or
# one of OBJECT_TYPES (name: the 64-hex id).  Names reaching a provider have
# already been validated by the router.


class StorageProvider:
    """The storage backend protocol.

    Uploads stream: ``begin_save`` returns an ``Upload`` that receives chunks and
    is then either committed (published atomically, never overwriting) or
    aborted.  Reads return an ``ObjectReader`` that knows its size and serves
    byte ranges.  Errors are the exceptions above.
    """

    #: Shown in logs and ``/health``.
    name = "abstract"

    def create_repo(self, repo):
        """Create the repository's folders; an existing repo is fine."""
        raise NotImplementedError

    def stat(self, repo, kind, name):
        """Return the object's size in bytes, or raise NotFound."""
        raise NotImplementedError

    def stat_before_save(self, repo, kind, name):
        """The existence check before an upload (403 without reading the
        body).  A provider whose ``commit`` refuses to overwrite anyway may
        answer from a cache here instead of asking its storage."""
        return self.stat(repo, kind, name)

    def open_object(self, repo, kind, name):
        """Return an ObjectReader for the object, or raise NotFound."""
        raise NotImplementedError

    def begin_save(self, repo, kind, name, length=None):
        """Start an upload of ``length`` bytes (None when unknown)."""
        raise NotImplementedError

    def delete(self, repo, kind, name):
        """Delete an object; return its size, or None if it did not exist."""
        raise NotImplementedError

    def list(self, repo, kind):
        """Return ``[(name, size), ...]`` sorted by name; NotFound if the
        repository or type folder does not exist."""
        raise NotImplementedError

    def scan(self):
        """Yield ``(repo, kind, name, size, mtime)`` for every stored object.

        Used once at startup for quota accounting and repo metrics.  A backend
        that cannot afford a full listing may yield nothing.
        """
        return iter(())

    def recover(self):
        """Remove temp files left by a crash; return how many were removed."""
        return 0

    def check_health(self):
        """Raise StorageError if storage is not usable right now."""

    def close(self):
        """Release resources at shutdown."""


class Upload:
    """One object being uploaded; see ``StorageProvider.begin_save``."""

    def write(self, chunk):
        """Append ``chunk``, a bytes-like object that is only valid during the
        call (the server reuses its buffer): copy what must be kept."""
        raise NotImplementedError

    def commit(self):
        """Publish durably; raise ObjectExists if the name is taken."""
        raise NotImplementedError

    def abort(self):
        """Throw the upload away; must be safe to call more than once."""
        raise NotImplementedError


class ObjectReader:
    """An open object: ``size``, ranged reads, and ``close``.

    ``sendfile_source()`` may return an open binary file whose bytes are the
    object's (offset 0 = first byte), letting the server use zero-copy sendfile.
    """

    size = 0

    def iter_range(self, start, length, chunk_size=CHUNK_SIZE):
        raise NotImplementedError

    def sendfile_source(self):
        return None

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalObjectReader(ObjectReader):
    def __init__(self, fileobj, size):
        self.file = fileobj
        self.size = size

    def iter_range(self, start, length, chunk_size=CHUNK_SIZE):
        remaining = length
        position = start
        while remaining > 0:
            try:
                data = os.pread(self.file.fileno(), min(chunk_size, remaining), position)
            except OSError as exc:
                raise storage_error(exc, "read") from None
            if not data:
                raise StorageError("object shrank while being read")
            position += len(data)
            remaining -= len(data)
            yield data

    def sendfile_source(self):
        return self.file

    def close(self):
        self.file.close()


class LocalUpload(Upload):
    """Temp file in the destination folder; published by link() so it can
    never replace an existing object, then the folder is fsynced."""

    def __init__(self, provider, final_path, fd, temp_path):
        self.provider = provider
        self.final_path = final_path
        self.fd = fd
        self.temp_path = temp_path
        self.done = False
        self.written = 0
        self.written_back = 0  # bytes whose writeback has been started

    def write(self, chunk):
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                raise storage_error(exc, "write") from None
            view = view[written:]
            self.written += written
        if self.written - self.written_back >= WRITEBACK_STEP:
            self._start_writeback()

    def _start_writeback(self):
        """Start writing the bytes written so far to disk, without waiting.

        Left alone, a pack sits dirty in the page cache until the fsync in
        commit() writes all of it while the client waits for its 200; on a
        slow disk that is most of an upload's time.  POSIX_FADV_DONTNEED on
        Linux starts the writeback of the range and drops only pages that are
        already clean, so the data mostly stays cached.  It is advice: where
        it is missing or refused, commit()'s fsync does all the work."""
        start, self.written_back = self.written_back, self.written
        try:
            os.posix_fadvise(self.fd, start, self.written - start, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass

    def commit(self):
        provider = self.provider
        try:
            provider.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            try:
                os.link(self.temp_path, self.final_path)
            except FileExistsError:
                raise ObjectExists(self.final_path) from None
            os.unlink(self.temp_path)
            self.done = True
            provider._forget_listing(self.final_path)
            provider.fsync_dir(os.path.dirname(self.final_path))
        except OSError as exc:
            raise storage_error(exc, "publish") from None
        finally:
            self.abort()

    def abort(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if not self.done:
            self.done = True
            try:
                os.unlink(self.temp_path)
            except OSError:
                pass
        self.provider.forget_upload(self)


class LocalStorageProvider(StorageProvider):
    """Repositories in a local folder, in restic's own ``local`` layout, so a
    repository can be opened both through the server and as a plain path."""

    name = "local"

    def __init__(self, base_path, readonly=False, group_accessible=False, log=None):
        self.base = os.path.abspath(base_path)
        self._root = self.base.rstrip("/") + "/"
        self.readonly = readonly
        self.dir_mode = 0o770 if group_accessible else 0o700
        self.file_mode = 0o660 if group_accessible else 0o600
        self.log = log or (lambda message: None)
        self._fsync_supported = True
        # Temp names: a random stem drawn once and a counter, unique within
        # this process; O_EXCL keeps them apart from any other process.
        self._temp_stem = secrets.token_hex(8)
        self._temp_counter = itertools.count()
        self._uploads = set()
        self._uploads_lock = threading.Lock()
        # folder -> (mtime_ns, [(name, size)]): listing `data` stats every
        # pack; a folder whose mtime has not moved lists the same.
        self._listings = {}
        self._listed_entries = 0  # bounded: about 200 bytes of memory each
        self._listings_lock = threading.RLock()

    # -- paths ---------------------------------------------------------------
    def repo_dir(self, repo):
        return os.path.join(self.base, *repo)

    def object_path(self, repo, kind, name):
        # os.path.join, spelled out: the segments are checked names.
        where = self._root + "".join([segment + "/" for segment in repo])
        if kind == "config":
            return where + "config"
        if kind == "data":
            return f"{where}data/{name[:2]}/{name}"
        return f"{where}{kind}/{name}"

    # -- durability helpers --------------------------------------------------
    def fsync(self, fd):
        if not self._fsync_supported:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOTTY):
                raise
            self._fsync_supported = False
            self.log("WARNING: fsync is not supported by the data storage; "
                     "a crash or power loss may lose recent uploads")

    def fsync_dir(self, path):
        if not self._fsync_supported:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def _check_writable(self):
        if self.readonly:
            raise StorageError("storage is read-only")

    # -- protocol ------------------------------------------------------------
    def create_repo(self, repo):
        self._check_writable()
        root = self.repo_dir(repo)
        made = []
        try:
            self._makedirs(root, made)
            for kind in OBJECT_TYPES:
                self._mkdir(os.path.join(root, kind), made)
            data = os.path.join(root, "data")
            for i in range(256):
                self._mkdir(os.path.join(data, f"{i:02x}"), made)
            self._sync_parents(made)
        except OSError as exc:
            raise storage_error(exc, "create repository") from None
        return bool(made)

    def _sync_parents(self, made):
        """Make new folders durable: fsync each one's parent, deepest first."""
        for parent in sorted({os.path.dirname(p) for p in made}, key=len, reverse=True):
            self.fsync_dir(parent)

    def _mkdir(self, path, made=None):
        try:
            os.mkdir(path, self.dir_mode)
            if made is not None:
                made.append(path)
            return True
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return False

    def _makedirs(self, path, made=None):
        if os.path.isdir(path):
            return False
        parent = os.path.dirname(path)
        if parent != path:
            self._makedirs(parent, made)
        return self._mkdir(path, made)

    def stat(self, repo, kind, name):
        path = self.object_path(repo, kind, name)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise storage_error(exc, "stat") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(path)
        return st.st_size

    def open_object(self, repo, kind, name):
        path = self.object_path(repo, kind, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink where an object should be
                raise NotFound(path) from None
            raise storage_error(exc, "open") from None
        fileobj = os.fdopen(fd, "rb", buffering=0)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(path)
        except BaseException:
            fileobj.close()
            raise
        return LocalObjectReader(fileobj, st.st_size)

    def begin_save(self, repo, kind, name, length=None):
        self._check_writable()
        final_path = self.object_path(repo, kind, name)
        folder = os.path.dirname(final_path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        for attempt in range(2):
            temp_path = os.path.join(
                folder, f"{TEMP_PREFIX}{self._temp_stem}{next(self._temp_counter):x}")
            try:
                fd = os.open(temp_path, flags, self.file_mode)
                break
            except FileNotFoundError:
                if attempt:
                    raise StorageError("cannot create upload folder") from None
                if not os.path.isdir(self.repo_dir(repo)):
                    raise NotFound("repository does not exist") from None
                # A type or data/xx folder is missing (created by hand, or
                # removed): create it, as rest-server does.
                try:
                    made = []
                    self._makedirs(folder, made)
                    self._sync_parents(made)
                except OSError as exc:
                    raise storage_error(exc, "mkdir") from None
            except OSError as exc:
                raise storage_error(exc, "create temp file") from None
        upload = LocalUpload(self, final_path, fd, temp_path)
        with self._uploads_lock:
            self._uploads.add(upload)
        return upload

    def forget_upload(self, upload):
        with self._uploads_lock:
            self._uploads.discard(upload)

    def abort_all_uploads(self):
        """At shutdown: remove the temp files of uploads still in flight."""
        with self._uploads_lock:
            uploads = list(self._uploads)
        for upload in uploads:
            upload.abort()

    def delete(self, repo, kind, name):
        self._check_writable()
        path = self.object_path(repo, kind, name)
        try:
            size = os.lstat(path).st_size
            os.unlink(path)
            self._forget_listing(path)
        except OSError as exc:
            if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                return None
            raise storage_error(exc, "delete") from None
        # A delete is made durable before the 200 where its order matters:
        # an index, snapshot or key that came back after a crash could point
        # at packs already gone.  A pack is deleted only once no index names
        # it, so one that came back is an orphan restic calls non-critical
        # and the next prune removes; rest-server fsyncs no delete at all.
        if kind != "data":
            try:
                self.fsync_dir(os.path.dirname(path))
            except OSError as exc:
                raise storage_error(exc, "delete") from None
        return size

    def list(self, repo, kind):
        folder = os.path.join(self.repo_dir(repo), kind)
        try:
            if kind != "data":
                return self._list_folder(folder)
            result = []
            with os.scandir(folder) as entries:
                subdirs = sorted(e.path for e in entries if e.is_dir(follow_symlinks=False))
            for sub in subdirs:
                result.extend(self._list_folder(sub))
            return result
        except OSError as exc:
            raise storage_error(exc, "list") from None

    def _list_folder(self, folder):
        """A folder's objects, from the cache while its mtime is unchanged.

        A listing is cached only if the folder's mtime was over a second old
        when it was read, so a change within the same timestamp tick can
        never hide behind an equal mtime; our own writes drop the entry.
        """
        mtime = os.stat(folder).st_mtime_ns
        cached = self._listings.get(folder)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        items = self._read_folder(folder)
        with self._listings_lock:
            self._forget_listing(folder, is_folder=True)
            if (time.time_ns() - mtime > 1_000_000_000
                    and self._listed_entries + len(items) <= LISTING_CACHE_ENTRIES):
                self._listings[folder] = (mtime, items)
                self._listed_entries += len(items)
        return items

    def _forget_listing(self, path, is_folder=False):
        with self._listings_lock:
            old = self._listings.pop(path if is_folder else path[:path.rindex("/")], None)
            if old is not None:
                self._listed_entries -= len(old[1])

    @staticmethod
    def _read_folder(folder):
        items = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # temp files and stray dotfiles (.DS_Store)
                if entry.is_file(follow_symlinks=False):
                    items.append((entry.name, entry.stat(follow_symlinks=False).st_size))
        items.sort()
        return items

    def _repo_dirs(self):
        """Every folder that looks like a repository, up to MAX_REPO_DEPTH deep."""
        found = []

        def visit(path, repo):
            try:
                with os.scandir(path) as entries:
                    listing = {e.name: e.is_dir(follow_symlinks=False) for e in entries}
            except OSError:
                return
            children = [name for name, is_dir in listing.items() if is_dir]
            if "config" in listing or any(listing.get(k) for k in OBJECT_TYPES):
                found.append(repo)
            if len(repo) < MAX_REPO_DEPTH:
                for name in sorted(children):
                    if name not in RESERVED_NAMES and not name.startswith("."):
                        visit(os.path.join(path, name), repo + (name,))

        if os.path.isdir(self.base):
            visit(self.base, ())
        return found

    def _walk_repo(self, repo, with_sizes):
        """Yield (kind, name, size, mtime) for a repo's objects, plus
        ("temp", path, 0, 0) for leftover temp files and ("unreadable", path,
        0, 0) for folders that cannot be listed; callers pick what they need."""
        root = self.repo_dir(repo)
        folders = [("config", root)]
        for kind in OBJECT_TYPES:
            folder = os.path.join(root, kind)
            folders.append((kind, folder))
            if kind == "data" and os.path.isdir(folder):
                try:
                    with os.scandir(folder) as entries:
                        folders.extend(("data", e.path) for e in entries
                                       if e.is_dir(follow_symlinks=False))
                except OSError:
                    pass
        for kind, folder in folders:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError:
                yield ("unreadable", folder, 0, 0)
                continue
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    yield ("temp", entry.path, 0, 0)
                    continue
                if kind == "config" and entry.name != "config":
                    continue
                if entry.name.startswith("."):
                    continue
                if not with_sizes:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield (kind, entry.name, st.st_size, st.st_mtime)

    def scan(self):
        for repo in self._repo_dirs():
            for kind, name, size, mtime in self._walk_repo(repo, True):
                if kind not in ("temp", "unreadable"):
                    yield (repo, kind, name, size, mtime)

    def recover(self):
        if self.readonly:
            return 0
        removed = 0
        for repo in self._repo_dirs():
            for kind, path, _, _ in self._walk_repo(repo, False):
                if kind == "temp":
                    try:
                        os.unlink(path)
                        removed += 1
                    except OSError:
                        pass
        return removed

    def check_health(self):
        if not os.path.isdir(self.base):
            raise StorageError("data directory does not exist")
        if not os.access(self.base, os.R_OK | os.X_OK | (0 if self.readonly else os.W_OK)):
            raise StorageError("data directory is not accessible")


# =============================================================================
# Authentication: htpasswd files, proxy headers, client certificates
# =============================================================================

# --- password hashes (Apache htpasswd formats) -------------------------------
_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# Byte order of the final digest in the crypt-style base64 output.  The
# shuffles are part of each algorithm's definition; the formulas below just
# generate the index triples listed in the reference implementations.
_APR1_ORDER = [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5), (11,)]
_SHA256_ORDER = [(i * 21 % 30, (i * 21 + 10) % 30, (i * 21 + 20) % 30)
                 for i in range(10)] + [(31, 30)]
_SHA512_ORDER = [(i * 22 % 63, (i * 22 + 21) % 63, (i * 22 + 42) % 63)
                 for i in range(21)] + [(63,)]

_SHA_ROUNDS_DEFAULT, _SHA_ROUNDS_MIN, _SHA_ROUNDS_MAX = 5000, 1000, 999999999
# SHA-crypt cost grows with the square of the password length (seconds for
# 64 KiB), so an unauthenticated client could burn CPU with huge
# Basic-auth passwords.  htpasswd itself refuses passwords over 255 bytes and
# libxcrypt over 511, so no legitimate entry needs more than this.
MAX_PASSWORD_BYTES = 1024
# glibc semantics: "rounds=<digits>$" is only a rounds field if it parses;
# otherwise the text is simply taken as (part of) the salt.
_SHA_SETTING = re.compile(r"\$([56])\$(?:rounds=([0-9]+)\$)?([^$]{0,16})")


class UnsupportedHash(ValueError):
    """The stored entry uses a scheme we deliberately do not verify."""


class BcryptMissing(RuntimeError):
    """A bcrypt entry was found but the optional ``bcrypt`` package is absent."""


def _b64(digest, order):
    out = []
    for group in order:
        v = int.from_bytes(bytes(digest[i] for i in group), "big")
        for _ in range((len(group) * 8 + 5) // 6):
            out.append(_ITOA64[v & 63])
            v >>= 6
    return "".join(out)


def _stretch(new, digest, p, s, rounds):
    """Shared inner loop of md5-crypt and SHA-crypt.

    Round i hashes  P|[S]|[P]|prev  (odd i)  or  prev|[S]|[P]|P  (even i),
    with S present when i % 3 and the middle P when i % 7, so the input
    pattern repeats every 42 rounds.  Odd rounds start with constant data,
    so their hash state is prepared once and ``.copy()``-ed, which saves
    real work for long passwords.
    """
    steps = []
    for i in range(42):
        mid = (s if i % 3 else b"") + (p if i % 7 else b"")
        steps.append((new(p + mid), None) if i & 1 else (None, mid + p))
    for pre, tail in islice(cycle(steps), rounds):
        if pre is None:
            digest = new(digest + tail).digest()
        else:
            h = pre.copy()
            h.update(digest)
            digest = h.digest()
    return digest


def apr1_hash(password: bytes, salt: str) -> str:
    """Apache's md5-crypt variant; ``salt`` may also be a full $apr1$ hash."""
    if salt.startswith("$apr1$"):
        salt = salt[6:]
    s = salt.split("$", 1)[0][:8].encode("ascii")
    p = password
    alt = hashlib.md5(p + s + p).digest()
    ctx = hashlib.md5(p + b"$apr1$" + s)
    ctx.update((alt * (len(p) // 16 + 1))[:len(p)])
    i = len(p)
    while i:
        ctx.update(b"\0" if i & 1 else p[:1])
        i >>= 1
    digest = _stretch(hashlib.md5, ctx.digest(), p, s, 1000)
    return "$apr1$%s$%s" % (s.decode(), _b64(digest, _APR1_ORDER))


def sha_crypt(password: bytes, setting: str) -> str:
    """SHA-256/512-crypt per Drepper's spec, with glibc's rounds handling.

    Out-of-range ``rounds=`` values are clamped (glibc) rather than rejected
    (libxcrypt), and the field is echoed only if the setting carried one.
    """
    m = _SHA_SETTING.match(setting)
    if not m:
        raise ValueError("not a $5$/$6$ setting")
    kind, rounds_txt, salt = m.groups()
    new, size, order = ((hashlib.sha256, 32, _SHA256_ORDER) if kind == "5"
                        else (hashlib.sha512, 64, _SHA512_ORDER))
    rounds = _SHA_ROUNDS_DEFAULT
    if rounds_txt is not None:
        rounds = max(_SHA_ROUNDS_MIN, min(int(rounds_txt), _SHA_ROUNDS_MAX))
    s = salt.encode("ascii")
    p, n = password, len(password)

    b = new(p + s + p).digest()
    a = new(p + s)
    a.update((b * (n // size + 1))[:n])
    i = n
    while i:
        a.update(b if i & 1 else p)
        i >>= 1
    a = a.digest()

    # DP covers n copies of P, i.e. n**2 bytes: feed it in chunks of ~64 KiB
    # instead of building one string (4 GiB for a 64 KiB password).
    dp = new()
    per_chunk = max(1, 65536 // n) if n else 1
    chunk = p * per_chunk
    full, rest = divmod(n, per_chunk)
    for _ in range(full):
        dp.update(chunk)
    dp.update(p * rest)
    dp = dp.digest()
    p2 = (dp * (n // size + 1))[:n]
    ds = new(s * (16 + a[0])).digest()
    s2 = ds[:len(s)]  # salt is at most 16 bytes, always shorter than ds

    digest = _stretch(new, a, p2, s2, rounds)
    prefix = "$%s$" % kind
    if rounds_txt is not None:
        prefix += "rounds=%d$" % rounds
    return "%s%s$%s" % (prefix, salt, _b64(digest, order))


def make_sha512_crypt(password: bytes, rounds: int = _SHA_ROUNDS_DEFAULT) -> str:
    """New $6$ hash; the rounds field is written only when non-default."""
    if not _SHA_ROUNDS_MIN <= rounds <= _SHA_ROUNDS_MAX:
        raise ValueError("rounds must be in [%d, %d]" % (_SHA_ROUNDS_MIN, _SHA_ROUNDS_MAX))
    salt = "".join(secrets.choice(_ITOA64) for _ in range(16))
    extra = "" if rounds == _SHA_ROUNDS_DEFAULT else "rounds=%d$" % rounds
    return sha_crypt(password, "$6$%s%s" % (extra, salt))


def hash_kind(stored: str) -> str:
    """Classify an htpasswd entry by its prefix (for dispatch and logging)."""
    for prefixes, kind in ((("$2y$", "$2a$", "$2b$"), "bcrypt"),
                           (("$apr1$",), "apr1"),
                           (("$5$",), "sha256-crypt"),
                           (("$6$",), "sha512-crypt"),
                           (("{SHA}",), "sha1")):
        if stored.startswith(prefixes):
            return kind
    # Other "$id$" / "{SCHEME}" entries ($1$, argon2, {SSHA}, ...) are known
    # formats we don't handle; anything else is a bare DES crypt or plaintext,
    # which cannot be told apart reliably.
    return "unknown" if stored.startswith(("$", "{")) else "plaintext-or-des"


def _bcrypt_check(password, stored):
    try:
        import bcrypt
    except ImportError:
        raise BcryptMissing("bcrypt entries need the 'bcrypt' package") from None
    # bcrypt only looks at 72 bytes, so a longer password would be accepted
    # on its prefix alone (and bcrypt>=5 raises).  It also cycles the key
    # with a NUL terminator, so b"\0\0" would match an empty password.
    if len(password) > 72 or b"\0" in password:
        return False
    try:
        return bcrypt.checkpw(password, stored.encode("ascii"))
    except ValueError:  # malformed or non-ASCII hash
        return False


def verify_password(password: bytes, stored: str) -> bool:
    """Check ``password`` against one htpasswd hash field.

    Raises UnsupportedHash for schemes we refuse (plaintext, DES, $1$, ...)
    and BcryptMissing when bcrypt is needed but absent, so the caller can
    report a configuration problem instead of a silent login failure.
    Every other problem with the stored value, and any password longer than
    MAX_PASSWORD_BYTES, just means "no match".
    """
    kind = hash_kind(stored)
    if kind in ("unknown", "plaintext-or-des"):
        raise UnsupportedHash(kind)
    if len(password) > MAX_PASSWORD_BYTES:
        return False
    if kind == "bcrypt":
        return _bcrypt_check(password, stored)
    try:
        if kind == "apr1":
            computed = apr1_hash(password, stored)
        elif kind == "sha1":
            computed = "{SHA}" + base64.b64encode(hashlib.sha1(password).digest()).decode()
        else:
            computed = sha_crypt(password, stored)
        return hmac.compare_digest(computed.encode(), stored.encode())
    except ValueError:  # malformed setting, non-ASCII salt, lone surrogates
        return False


def require_bcrypt():
    """Refuse to start with bcrypt users but no bcrypt package: a silent 401
    for every backup would be worse."""
    try:
        import bcrypt  # noqa: F401
    except ImportError:
        raise ConfigError("the htpasswd file has bcrypt entries but the bcrypt package is "
                          "not installed: pip install pyrestserver[bcrypt]") from None



# --- the htpasswd file -----------------------------------------------------------
#: Usernames rest-server accepts: letters (any script), digits, ``@ . _ -``.
USERNAME_PATTERN = re.compile(r"^(?:[^\W_]|[\d@._-])+\Z")


def valid_username(name):
    return bool(name) and USERNAME_PATTERN.match(name) is not None


class HtpasswdError(ConfigError):
    pass


def parse_htpasswd(text, source="htpasswd", warn=None):
    """Return {user: hash} from htpasswd text.

    Like rest-server: ``#`` comments, leading spaces and blank lines are
    ignored, invalid usernames are skipped with a warning, the last duplicate
    wins.  Unlike rest-server, a malformed line is an error naming its line
    number instead of a crash, and insecure formats (plaintext, DES crypt) are
    refused with a warning naming the user.
    """
    warn = warn or (lambda message: None)
    users = {}
    for number, raw in enumerate(text.split("\n"), 1):  # not splitlines(): \x0c, \u2028...
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed:
            raise HtpasswdError(f"{source}: line {number}: expected user:hash")
        if not valid_username(user):
            warn(f"Ignoring invalid username {user!r} in {source} (line {number}): "
                 "use letters, numbers, '_', '-', '.' and '@'")
            continue
        kind = hash_kind(hashed)
        if kind in ("plaintext-or-des", "unknown"):
            warn(f"Ignoring user {user!r} in {source} (line {number}): insecure or "
                 "unsupported hash; recreate it with htpasswd -B (bcrypt) or -5 (SHA-512)")
            continue
        users[user] = hashed
    return users


class Htpasswd:
    """The users of an htpasswd file, reloaded when it changes.

    Checking a password costs one slow hash; verified credentials are then
    remembered for ``CACHE_SECONDS`` (sliding) as a keyed digest, never the
    password itself.  Unknown users cost the same as wrong passwords, and only
    a few slow checks run at once so a flood of bad passwords cannot starve
    the CPU that legitimate restores need.
    """

    CACHE_SECONDS = 60.0
    RECHECK_SECONDS = 30.0

    def __init__(self, path, log=None, slow_checks=None):
        self.path = path
        self.log = log or (lambda message: None)
        self.users = {}
        self._signature = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        self._cache = {}
        self._cache_key = secrets.token_bytes(32)
        self._slow = threading.BoundedSemaphore(slow_checks or max(1, os.cpu_count() or 1))
        self._dummy_hash = None
        self.verifications = 0  # slow hash checks done (tests count these)
        self.load()

    def _stat_signature(self):
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self):
        """(Re)read the file; raise ConfigError if it is missing or malformed."""
        try:
            signature = self._stat_signature()
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise HtpasswdError(f"{self.path}: not valid UTF-8") from None
        users = parse_htpasswd(text, self.path, self.log)
        if any(hash_kind(h) == "bcrypt" for h in users.values()):
            require_bcrypt()
        with self._lock:
            self.users = users
            self._signature = signature
            self._checked_at = time.monotonic()
            self._cache.clear()
            # Unknown users are checked against the costliest entry, so a
            # miss takes as long as a wrong password for the slowest user.
            self._dummy_hash = max(users.values(), key=_hash_cost, default=None)
        return users

    def reload(self):
        """Reload now (SIGHUP); a failure keeps the previous users."""
        try:
            self.load()
            self.log(f"Reloaded htpasswd file {self.path}")
            return True
        except ConfigError as exc:
            self.log(f"Could not reload htpasswd file: {exc}")
            return False

    def _maybe_reload(self):
        now = time.monotonic()
        if now - self._checked_at < self.RECHECK_SECONDS:
            return
        self._checked_at = now
        try:
            changed = self._stat_signature() != self._signature
        except OSError as exc:
            self.log(f"Could not stat htpasswd file: {exc.strerror}")
            return
        if changed:
            self.reload()

    def _cache_token(self, user, password):
        return hmac.new(self._cache_key, user.encode() + b"\0" + password, "sha256").digest()

    def check(self, user, password):
        """True if ``password`` (bytes) is right for ``user``."""
        self._maybe_reload()
        token = self._cache_token(user, password)
        now = time.monotonic()
        with self._lock:
            stored = self.users.get(user)
            expiry = self._cache.get(token)
            if expiry is not None and expiry > now and stored is not None:
                self._cache[token] = now + self.CACHE_SECONDS
                return True
            if len(self._cache) > 10000:
                self._cache = {k: v for k, v in self._cache.items() if v > now}
            dummy = self._dummy_hash
        with self._slow:
            self.verifications += 1
            if stored is None:
                # Spend the same time as a wrong password: no user enumeration.
                if dummy is not None:
                    self._verify(password, dummy)
                return False
            ok = self._verify(password, stored)
        if ok:
            with self._lock:
                if self.users.get(user) == stored:
                    self._cache[token] = time.monotonic() + self.CACHE_SECONDS
        else:
            self.log(f"Invalid htpasswd entry for {user}.")
        return ok

    @staticmethod
    def _verify(password, stored):
        try:
            return verify_password(password, stored)
        except (UnsupportedHash, ValueError):
            return False


def _hash_cost(stored):
    kind = hash_kind(stored)
    if kind == "bcrypt":
        return (5, stored[4:6])  # the cost factor follows the prefix
    rounds = re.match(r"\$[56]\$rounds=(\d+)\$", stored)
    return ({"sha512-crypt": 4, "sha256-crypt": 3, "apr1": 2}.get(kind, 1),
            rounds.group(1).zfill(10) if rounds else "0005000")


def parse_basic_auth(header):
    """Return (user, password bytes) from an Authorization header, or None.

    Strict: bad base64, a missing colon or a non-UTF-8 username is simply "no
    credentials" (401), never an error.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class Authenticator:
    """Decides who a request is from: htpasswd Basic auth, a trusted proxy
    header, or a verified TLS client certificate.  ``None`` means refused."""

    def __init__(self, htpasswd=None, proxy_header=None, enabled=True):
        self.htpasswd = htpasswd
        self.proxy_header = proxy_header.lower() if proxy_header else None
        self.enabled = enabled

    def authenticate(self, request):
        if not self.enabled:
            return ""
        if request.tls_user:
            return request.tls_user
        if self.proxy_header:
            user = request.headers.get(self.proxy_header, "").strip()
            return user if valid_username(user) else None
        if self.htpasswd is None:
            return None
        creds = parse_basic_auth(request.headers.get("authorization"))
        if creds is None:
            return None
        user, password = creds
        if not valid_username(user):
            return None
        return user if self.htpasswd.check(user, password) else None


# =============================================================================
# Quota and per-repo usage
# =============================================================================


class RepoUsage:
    __slots__ = ("bytes", "snapshot_times", "reserved")

    def __init__(self):
        self.bytes = 0
        self.snapshot_times = {}  # snapshot file name -> upload time
        self.reserved = 0


class UsageLedger:
    """Bytes stored per repository, kept current by our own writes.

    One startup scan fills it; afterwards every upload reserves its length
    before writing (so concurrent uploads cannot together overshoot a limit),
    and every commit or delete adjusts it.  Only object and config bytes
    count: folders, temp files and the htpasswd file do not.
    """

    def __init__(self, max_total=0, max_repo=0):
        self.max_total = max_total
        self.max_repo = max_repo
        self.repos = {}
        self.total = 0
        self.reserved = 0
        self._lock = threading.Lock()

    @property
    def enforcing(self):
        return bool(self.max_total or self.max_repo)

    def _repo(self, repo):
        usage = self.repos.get(repo)
        if usage is None:
            usage = self.repos[repo] = RepoUsage()
        return usage

    def load(self, scan):
        with self._lock:
            for repo, kind, _name, size, mtime in scan:
                usage = self._repo(repo)
                usage.bytes += size
                self.total += size
                if kind == "snapshots":
                    usage.snapshot_times[_name] = mtime

    def reserve(self, repo, amount):
        """Claim ``amount`` bytes for an upload; QuotaExceeded if it won't fit."""
        if not self.enforcing or amount <= 0:
            return
        with self._lock:
            usage = self._repo(repo)
            if self.max_total and self.total + self.reserved + amount > self.max_total:
                raise QuotaExceeded(f"server has reached its maximum size ({self.max_total} bytes)")
            if self.max_repo and usage.bytes + usage.reserved + amount > self.max_repo:
                raise QuotaExceeded(f"repository has reached its maximum size ({self.max_repo} bytes)")
            usage.reserved += amount
            self.reserved += amount

    def release(self, repo, amount):
        if not self.enforcing or amount <= 0:
            return
        with self._lock:
            usage = self._repo(repo)
            usage.reserved -= amount
            self.reserved -= amount

    def added(self, repo, kind, size, reserved=0, name=None):
        """An object was published (its reservation, if any, becomes usage)."""
        with self._lock:
            usage = self._repo(repo)
            if self.enforcing and reserved:
                usage.reserved -= reserved
                self.reserved -= reserved
            usage.bytes += size
            self.total += size
            if kind == "snapshots":
                usage.snapshot_times[name] = time.time()

    def removed(self, repo, kind, size, name=None):
        with self._lock:
            usage = self._repo(repo)
            usage.bytes = max(0, usage.bytes - size)
            self.total = max(0, self.total - size)
            if kind == "snapshots":
                usage.snapshot_times.pop(name, None)

    def snapshot(self):
        with self._lock:
            return {repo: (u.bytes, len(u.snapshot_times),
                           max(u.snapshot_times.values(), default=0.0))
                    for repo, u in self.repos.items()}


# =============================================================================
# Metrics: a small Prometheus text-format exporter
# =============================================================================


def _escape_label(value):
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """rest-server's blob counters (same names, help texts and labels), upload
    verification failures, HTTP requests by method and status, per-repo size
    and snapshot figures, and the standard ``process_*`` metrics."""

    BLOB_COUNTERS = (
        ("rest_server_blob_write_total", "Total number of blobs written"),
        ("rest_server_blob_write_bytes_total", "Total number of bytes written to blobs"),
        ("rest_server_blob_read_total", "Total number of blobs read"),
        ("rest_server_blob_read_bytes_total", "Total number of bytes read from blobs"),
        ("rest_server_blob_delete_total", "Total number of blobs deleted"),
        ("rest_server_blob_delete_bytes_total", "Total number of bytes of blobs deleted"),
    )

    def __init__(self, ledger=None):
        self.ledger = ledger
        self.started = time.time()
        self._lock = threading.Lock()
        self._blob = {name: {} for name, _ in self.BLOB_COUNTERS}
        self._verify_failures = {}
        self._requests = {}

    def blob(self, op, user, repo, kind, size):
        """op: write, read or delete."""
        key = (user, "/".join(repo), kind)
        with self._lock:
            count = self._blob[f"rest_server_blob_{op}_total"]
            count[key] = count.get(key, 0) + 1
            total = self._blob[f"rest_server_blob_{op}_bytes_total"]
            total[key] = total.get(key, 0) + size

    def verification_failed(self, user, repo, kind):
        key = (user, "/".join(repo), kind)
        with self._lock:
            self._verify_failures[key] = self._verify_failures.get(key, 0) + 1

    def request(self, method, status):
        key = (method, str(status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def render(self):
        out = []
        with self._lock:
            for name, help_text in self.BLOB_COUNTERS:
                out.append(f"# HELP {name} {help_text}\n# TYPE {name} counter\n")
                for (user, repo, kind), value in sorted(self._blob[name].items()):
                    out.append(f'{name}{{repo="{_escape_label(repo)}",type="{kind}",'
                               f'user="{_escape_label(user)}"}} {value}\n')
            name = "restic_upload_verification_failures_total"
            out.append(f"# HELP {name} Uploads rejected because the content did not "
                       f"match the object name\n# TYPE {name} counter\n")
            for (user, repo, kind), value in sorted(self._verify_failures.items()):
                out.append(f'{name}{{repo="{_escape_label(repo)}",type="{kind}",'
                           f'user="{_escape_label(user)}"}} {value}\n')
            name = "pyrestserver_http_requests_total"
            out.append(f"# HELP {name} HTTP requests answered, by method and status\n"
                       f"# TYPE {name} counter\n")
            for (method, status), value in sorted(self._requests.items()):
                out.append(f'{name}{{code="{status}",method="{_escape_label(method)}"}} {value}\n')
        if self.ledger is not None:
            repos = sorted(self.ledger.snapshot().items())
            for name, help_text, index in (
                ("restic_repo_size_bytes", "Bytes stored in the repository (objects and config)", 0),
                ("restic_repo_snapshots", "Number of snapshot files in the repository", 1),
                ("restic_repo_last_snapshot_timestamp_seconds",
                 "Upload time of the newest snapshot file (Unix time)", 2),
            ):
                out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
                for repo, values in repos:
                    out.append(f'{name}{{repo="{_escape_label("/".join(repo))}"}} '
                               f'{_number(values[index])}\n')
        out.append(self._process_metrics())
        return "".join(out).encode("utf-8")

    def _process_metrics(self):
        times = os.times()
        lines = [
            ("process_cpu_seconds_total", "counter",
             "Total user and system CPU time spent in seconds.", times.user + times.system),
            ("process_start_time_seconds", "gauge",
             "Start time of the process since unix epoch in seconds.", self.started),
        ]
        rss = _resident_memory()
        if rss is not None:
            lines.append(("process_resident_memory_bytes", "gauge",
                          "Resident memory size in bytes.", rss))
        try:
            lines.append(("process_open_fds", "gauge", "Number of open file descriptors.",
                          len(os.listdir("/proc/self/fd"))))
        except OSError:
            pass
        try:
            import resource
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY:
                lines.append(("process_max_fds", "gauge",
                              "Maximum number of open file descriptors.", soft))
        except (ImportError, OSError, ValueError):
            pass
        lines.append(("process_threads", "gauge", "Number of OS threads in the process.",
                      threading.active_count()))
        return "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {_number(v)}\n"
                       for n, t, h, v in lines)


def _number(value):
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


def _resident_memory():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# =============================================================================
# The HTTP API: request model, router and handlers (shared by both doors)
# =============================================================================
#
# Both front doors (the built-in server below and any WSGI server) turn an
# HTTP request into a ``Request``, call ``ResticRESTApp.handle`` and send the
# ``Response`` back.  Everything restic-specific happens in between.


class HTTPError(Exception):
    """Answer the request with ``status``; ``detail`` goes to the debug log."""

    def __init__(self, status, detail=None, headers=()):
        super().__init__(detail or HTTPStatus(status).phrase)
        self.status = status
        self.detail = detail
        self.headers = list(headers)


class BodyError(Exception):
    """The request body was malformed or ended early (the client's fault)."""


class BufferPool:
    """Upload buffers handed back after each request and reused: memory stays
    at one buffer per upload in progress instead of a fresh allocation per
    read, which the allocator would spread over per-thread arenas."""

    def __init__(self, size, keep=8):
        self.size = size
        self.keep = keep
        self._free = []

    def take(self):
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(self.size)

    def give(self, buffer):
        if len(self._free) < self.keep:
            self._free.append(buffer)


def _readinto_of(stream):
    """``stream.readinto``, or the same built on ``read`` (WSGI input streams
    need not have ``readinto``)."""
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return readinto

    def read_into(view):
        data = stream.read(len(view))
        view[:len(data)] = data
        return len(data)
    return read_into


class BodyReader:
    """A request body of known length.  ``before_read`` runs once, before the
    first byte is read (the built-in server sends ``100 Continue`` there)."""

    def __init__(self, stream, length, before_read=None):
        self._readinto = _readinto_of(stream)
        self.length = length
        self.remaining = length
        self.before_read = before_read

    @property
    def consumed(self):
        return self.remaining == 0

    def readinto(self, buffer):
        """Read at most ``len(buffer)`` body bytes into it; 0 at the end."""
        if self.remaining <= 0:
            return 0
        if self.before_read is not None:
            self.before_read()
            self.before_read = None
        view = memoryview(buffer)
        if len(view) > self.remaining:
            view = view[:self.remaining]
        try:
            n = self._readinto(view)
        except (OSError, ValueError) as exc:
            raise BodyError(f"reading body: {exc}") from None
        if not n:
            raise BodyError("unexpected EOF")
        self.remaining -= n
        return n


class Request:
    """One HTTP request as the API sees it (headers keyed in lower case)."""

    __slots__ = ("method", "target", "version", "headers", "body", "remote_addr",
                 "tls_user", "user", "started")

    def __init__(self, method, target, headers, body=None, remote_addr="-",
                 version="HTTP/1.1", tls_user=None):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        self.remote_addr = remote_addr
        self.tls_user = tls_user
        self.user = None
        self.started = time.time()

    @classmethod
    def from_wsgi(cls, environ):
        target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if not target:
            path = environ.get("PATH_INFO", "").encode("latin-1")
            target = urllib.parse.quote(environ.get("SCRIPT_NAME", "").encode("latin-1") + path,
                                        safe="/;=,+@!$&'()*:~")
            if environ.get("QUERY_STRING"):
                target += "?" + environ["QUERY_STRING"]
        headers = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                headers[key[5:].replace("_", "-").lower()] = value
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        body = None
        length = environ.get("CONTENT_LENGTH", "")
        if length.isdigit() and length.isascii():
            body = BodyReader(environ["wsgi.input"], int(length))
        elif environ["REQUEST_METHOD"] in ("POST", "PUT"):
            body = _UntilEOFReader(environ["wsgi.input"])
        # Trust a client certificate only if the WSGI server says it verified it.
        cert_user = (environ.get("SSL_CLIENT_S_DN_CN") or None
                     if environ.get("SSL_CLIENT_VERIFY") == "SUCCESS" else None)
        return cls(environ["REQUEST_METHOD"], target, headers, body,
                   environ.get("REMOTE_ADDR", "-"), environ.get("SERVER_PROTOCOL", "HTTP/1.1"),
                   cert_user)


class _UntilEOFReader:
    """A WSGI body without a Content-Length (the server de-chunked it)."""

    length = None

    def __init__(self, stream):
        self._readinto = _readinto_of(stream)
        self.consumed = False

    def readinto(self, buffer):
        if self.consumed:
            return 0
        n = self._readinto(memoryview(buffer))
        if not n:
            self.consumed = True
        return n


class Response:
    """Status, headers and either a bytes body or a byte range of an object."""

    __slots__ = ("status", "headers", "body", "reader", "start", "length")

    def __init__(self, status=200, headers=None, body=b"", reader=None, start=0, length=None):
        self.status = status
        self.headers = headers if headers is not None else []
        self.body = body
        self.reader = reader
        self.start = start
        self.length = len(body) if length is None else length

    def iter_body(self):
        if self.reader is None:
            if self.body:
                yield self.body
            return
        try:
            yield from self.reader.iter_range(self.start, self.length)
        finally:
            self.reader.close()

    def close(self):
        if self.reader is not None:
            self.reader.close()


def error_response(status, headers=()):
    """Go's http.Error shape, which rest-server uses: the reason phrase."""
    body = (HTTPStatus(status).phrase + "\n").encode()
    return Response(status, [("Content-Type", "text/plain; charset=utf-8"),
                             ("X-Content-Type-Options", "nosniff")] + list(headers), body)


# --- routing -------------------------------------------------------------------


class Route:
    """Where a URL points: a repository and what is asked of it."""

    __slots__ = ("repo", "kind", "name", "query")

    def __init__(self, repo, kind, name, query):
        self.repo = repo    # tuple of folder names
        self.kind = kind    # "repo", "config", "list" or an object type
        self.name = name    # object id, list type, or None
        self.query = query

    @property
    def repo_label(self):
        return "/".join(self.repo)


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f\\/]")
# What restic sends for an object, in names that need no decoding or checks
# beyond this pattern (and not being reserved): parse_route's quick answer.
_PLAIN_OBJECT_TARGET = re.compile(
    r"/((?:[0-9A-Za-z_\-][0-9A-Za-z_.\-]{0,254}/){0,%d})(data|index|keys|locks|snapshots)"
    r"/([0-9a-f]{64})\Z" % MAX_REPO_DEPTH)


def parse_route(target):
    """Map a request target to a Route, or raise HTTPError (400/404).

    Paths are never cleaned or redirected: a segment that is empty, ``.``,
    ``..``, starts with a dot, holds a slash, backslash or control character
    after decoding, or is not valid UTF-8 is refused.  The first up to two
    segments that are not reserved names form the repository.
    """
    plain = _PLAIN_OBJECT_TARGET.match(target)
    if plain is not None:
        repo = tuple(plain.group(1).split("/")[:-1])
        if RESERVED_NAMES.isdisjoint(repo):
            return Route(repo, plain.group(2), plain.group(3), "")
    if not target.startswith("/"):
        raise HTTPError(400, "request target must be a path")
    path, _, query = target.partition("?")
    raw_segments = path.split("/")[1:]
    segments = []
    for raw in raw_segments:
        try:
            segment = urllib.parse.unquote(raw, errors="strict") if "%" in raw else raw
        except UnicodeDecodeError:
            raise HTTPError(400, "path is not valid UTF-8") from None
        segments.append(segment)
    # All segments but the last must be proper names; the last may be empty
    # (a trailing slash).
    for i, segment in enumerate(segments):
        if segment == "" and i == len(segments) - 1:
            continue
        if (segment in ("", ".", "..") or segment.startswith(".")
                or _CONTROL_CHARS.search(segment)):
            raise HTTPError(404, f"Invalid request path: {path}")
        if len(segment.encode("utf-8", "surrogatepass")) > 255:
            raise HTTPError(400, "path segment longer than a file name may be")
    repo = []
    i = 0
    while (i < len(segments) - 1 and len(repo) < MAX_REPO_DEPTH
           and segments[i] not in RESERVED_NAMES):
        repo.append(segments[i])
        i += 1
    rest = segments[i:]
    repo = tuple(repo)
    if rest == [""]:
        return Route(repo, "repo", None, query)
    if rest == ["config"]:
        return Route(repo, "config", "config", query)
    if len(rest) == 2 and rest[0] in OBJECT_TYPES:
        if rest[1] == "":
            return Route(repo, "list", rest[0], query)
        if OBJECT_ID.match(rest[1]):
            return Route(repo, rest[0], rest[1], query)
    raise HTTPError(404, f"no such resource: {path}")


_RANGE_NUMBER = re.compile(r"[0-9]*\Z")  # ASCII only: str.isdigit() accepts '²', int() does not


def parse_range(header, size):
    """Return (start, length) for a single ``bytes=`` range, None to serve the
    whole object (no header, or several ranges), or raise HTTPError(416)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        raise HTTPError(416, "invalid range", [("Content-Range", f"bytes */{size}")])
    if "," in spec:
        return None  # multiple ranges: restic never asks; a full 200 is valid HTTP
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not _RANGE_NUMBER.match(first) or not _RANGE_NUMBER.match(last):
        raise HTTPError(416, "invalid range", [("Content-Range", f"bytes */{size}")])
    if first == "":
        if last == "":
            raise HTTPError(416, "invalid range", [("Content-Range", f"bytes */{size}")])
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise HTTPError(416, "invalid range: failed to overlap",
                            [("Content-Range", f"bytes */{size}")])
        start = max(0, size - suffix)
        return start, size - start
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise HTTPError(416, "invalid range: failed to overlap",
                        [("Content-Range", f"bytes */{size}")])
    return start, end - start + 1


# --- the application ---------------------------------------------------------------


def v2_listing(items):
    """The JSON text of a v2 listing: ``[{"name":"...","size":N},...]``.

    Listing `data` is restic's largest answer (one entry per pack), so the
    text is formatted directly rather than through a dict per object (two to
    four times faster, measured alone).  It equals json.dumps when no name
    needs escaping, and the checks prove that: six quotes an entry and nothing
    else that JSON escapes.  Restic's names are hex; any other takes json.dumps."""
    body = ",".join([f'{{"name":"{name}","size":{size}}}' for name, size in items])
    if (body.count('"') == 6 * len(items) and "\\" not in body
            and body.isascii() and body.isprintable()):
        return f"[{body}]"
    return json.dumps([{"name": n, "size": s} for n, s in items], separators=(",", ":"))


class ResticRESTApp:
    """The restic REST API over a StorageProvider.

    Use ``handle(Request)`` from a server, or the object itself as a WSGI
    application (``ResticRESTApp(provider=...)`` under gunicorn or waitress).
    """

    def __init__(self, provider, *, append_only=False, append_only_exempt=(),
                 private_repos=False, verify_upload=True, auth=None, auth_required=None,
                 ledger=None, metrics=None, prometheus=False, prometheus_no_auth=False,
                 access_log=None, log=None, debug=False):
        self.provider = provider
        self.append_only = append_only
        self.append_only_exempt = frozenset(append_only_exempt)
        self.verify_upload = verify_upload
        if auth is None:
            auth = Authenticator(enabled=bool(auth_required))
        self.auth = auth
        self.private_repos = private_repos and auth.enabled
        self.ledger = ledger or UsageLedger()
        self.metrics = metrics or Metrics(self.ledger)
        self.prometheus = prometheus
        self.prometheus_no_auth = prometheus_no_auth
        self.access_log = access_log
        self.log = log or (lambda message: None)
        self.debug = debug
        self.buffers = BufferPool(CHUNK_SIZE)

    # -- entry points ------------------------------------------------------------
    def handle(self, request):
        try:
            response = self.dispatch(request)
        except HTTPError as exc:
            if self.debug and exc.detail:
                self.log(f"{request.method} {_printable(request.target)}: {exc.detail}")
            response = error_response(exc.status, exc.headers)
        except NotFound as exc:
            if self.debug:
                self.log(f"{request.method} {_printable(request.target)}: not found: {exc}")
            response = error_response(404)
        except ObjectExists:
            response = error_response(403)
        except InsufficientStorage as exc:
            self.log(f"{request.method} {_printable(request.target)}: {exc}")
            response = error_response(507)
        except Exception as exc:  # never a traceback to the client
            self.log(f"ERROR: {request.method} {_printable(request.target)}: "
                     f"{type(exc).__name__}: {exc}")
            response = error_response(500)
        if self.prometheus:
            self.metrics.request(request.method, response.status)
        if self.access_log is not None:
            self.access_log.write(request, response)
        return response

    def __call__(self, environ, start_response):
        request = Request.from_wsgi(environ)
        response = self.handle(request)
        headers = [(k, str(v)) for k, v in response.headers]
        headers.append(("Content-Length", str(response.length)))
        start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
        if request.method == "HEAD":
            response.close()
            return [b""]
        return _ClosingIterator(response)

    # -- dispatch ------------------------------------------------------------------
    def dispatch(self, request):
        method = request.method
        path = request.target.partition("?")[0]
        if self.debug:
            self.log(f"{method} {_printable(request.target)}")
        if path == "/health":
            return self.health(request)
        if path == "/metrics" and self.prometheus:
            return self.serve_metrics(request)
        user = self.auth.authenticate(request)
        if user is None:
            raise HTTPError(401, "authentication failed",
                            [("WWW-Authenticate", 'Basic realm="restic"')])
        request.user = user
        route = parse_route(request.target)
        if self.private_repos and (not route.repo or route.repo[0] != user):
            raise HTTPError(401, f"user {user!r} may not access /{route.repo_label}",
                            [("WWW-Authenticate", 'Basic realm="restic"')])
        kind = route.kind
        if kind == "repo":
            if method != "POST":
                raise HTTPError(405, headers=[("Allow", "POST")])
            return self.create_repo(request, route)
        if kind == "list":
            if method != "GET":
                raise HTTPError(405, headers=[("Allow", "GET")])
            return self.list_objects(request, route)
        if method in ("GET", "HEAD"):
            return self.get_object(request, route, head=method == "HEAD")
        if method == "POST":
            return self.save_object(request, route)
        if method == "DELETE":
            return self.delete_object(request, route)
        raise HTTPError(405, headers=[("Allow", "HEAD, GET, POST, DELETE")])

    # -- handlers ------------------------------------------------------------------
    def health(self, request):
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, headers=[("Allow", "GET, HEAD")])
        try:
            self.provider.check_health()
        except StorageError as exc:
            self.log(f"health check failed: {exc}")
            return error_response(503)
        return Response(200, [("Content-Type", "text/plain; charset=utf-8")], b"ok\n")

    def serve_metrics(self, request):
        if not self.prometheus_no_auth:
            user = self.auth.authenticate(request)
            if user is None or (self.private_repos and user != "metrics"):
                raise HTTPError(401, "metrics: not authorized",
                                [("WWW-Authenticate", 'Basic realm="restic"')])
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, headers=[("Allow", "GET")])
        body = self.metrics.render()
        return Response(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], body)

    def create_repo(self, request, route):
        values = urllib.parse.parse_qs(route.query, keep_blank_values=True).get("create")
        if not values or values[0] != "true":
            raise HTTPError(400, "create repository: query must be ?create=true")
        if self.provider.create_repo(route.repo):
            self.log(f"Creating repository directories in /{route.repo_label}")
        return Response(200)

    def list_objects(self, request, route):
        items = self.provider.list(route.repo, route.name)
        if request.headers.get("accept") == V2_TYPE:
            body = v2_listing(items)
            content_type = V2_TYPE
        else:
            body = json.dumps([n for n, _ in items], separators=(",", ":"))
            content_type = V1_TYPE
        return Response(200, [("Content-Type", content_type)], body.encode())

    def get_object(self, request, route, head):
        provider = self.provider
        if head:
            size = provider.stat(route.repo, route.kind, route.name)
            return Response(200, [], b"", length=size)
        reader = provider.open_object(route.repo, route.kind, route.name)
        count = route.kind != "config" and self.prometheus
        try:
            wanted = parse_range(request.headers.get("range"), reader.size)
        except HTTPError as exc:
            reader.close()
            if count:  # rest-server counts every GET of an existing blob
                self.metrics.blob("read", request.user, route.repo, route.kind,
                                  len(error_response(exc.status).body))
            raise
        headers = [("Accept-Ranges", "bytes"), ("Content-Type", "application/octet-stream")]
        if wanted is None:
            start, length, status = 0, reader.size, 200
        else:
            start, length = wanted
            status = 206
            headers.append(("Content-Range",
                            f"bytes {start}-{start + length - 1}/{reader.size}"))
        if count:
            self.metrics.blob("read", request.user, route.repo, route.kind, length)
        return Response(status, headers, reader=reader, start=start, length=length)

    def _body_chunks(self, body):
        """The request body as views of one pooled buffer, each valid until
        the next is asked for; a malformed or cut body is a 400."""
        buffer = self.buffers.take()
        view = memoryview(buffer)
        try:
            while True:
                n = body.readinto(view)
                if not n:
                    return
                yield view[:n]
        except BodyError as exc:
            raise HTTPError(400, str(exc)) from None
        finally:
            self.buffers.give(buffer)

    def _append_only_for(self, user):
        return self.append_only and user not in self.append_only_exempt

    def save_object(self, request, route):
        repo, kind, name = route.repo, route.kind, route.name
        body = request.body
        if body is None:
            raise HTTPError(411, "upload needs a Content-Length or chunked body")
        try:
            self.provider.stat_before_save(repo, kind, name)
            exists = True
        except NotFound:
            exists = False
        if exists:
            return self._save_existing(request, route)
        verify = self.verify_upload and kind != "config"
        hasher = hashlib.sha256() if verify else None
        ledger = self.ledger
        reserved = 0
        if body.length is not None:
            ledger.reserve(repo, body.length)
            reserved = body.length
        received = 0
        upload = None
        try:
            upload = self.provider.begin_save(repo, kind, name, body.length)
            for chunk in self._body_chunks(body):
                received += len(chunk)
                if body.length is None:
                    ledger.reserve(repo, len(chunk))
                    reserved += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                upload.write(chunk)
            if hasher is not None and hasher.hexdigest() != name:
                if self.prometheus:
                    self.metrics.verification_failed(request.user, repo, kind)
                raise HTTPError(400, "file content does not match hash")
            upload.commit()
        except ObjectExists:
            ledger.release(repo, reserved)
            # Lost a race with an identical upload of the same name.
            if verify and self._append_only_for(request.user):
                return Response(200)
            raise HTTPError(403, "object exists") from None
        except BaseException:
            ledger.release(repo, reserved)
            if upload is not None:
                upload.abort()
            raise
        ledger.added(repo, kind, received, reserved, name)
        if kind != "config" and self.prometheus:
            self.metrics.blob("write", request.user, repo, kind, received)
        return Response(200)

    def _save_existing(self, request, route):
        """An upload of a name that exists: rest-server answers 403.  In
        append-only mode a retry of an upload that already landed (restic's
        retry after a lost response cannot DELETE first) answers 200 without
        rewriting anything, if the bytes are the same."""
        if not self._append_only_for(request.user):
            raise HTTPError(403, "object exists")
        body = request.body
        if self.verify_upload and route.kind != "config":
            hasher = hashlib.sha256()
            for chunk in self._body_chunks(body):
                hasher.update(chunk)
            if hasher.hexdigest() != route.name:
                raise HTTPError(400, "file content does not match hash")
            return Response(200)
        with self.provider.open_object(route.repo, route.kind, route.name) as reader:
            offset, same = 0, True
            for chunk in self._body_chunks(body):
                if same:
                    same = (offset + len(chunk) <= reader.size and chunk == b"".join(
                        reader.iter_range(offset, len(chunk))))
                offset += len(chunk)
            if same and offset == reader.size:
                return Response(200)
        raise HTTPError(403, "object exists with different content")

    def delete_object(self, request, route):
        if self._append_only_for(request.user) and route.kind != "locks":
            raise HTTPError(403, "append-only mode: deletes are not allowed")
        size = self.provider.delete(route.repo, route.kind, route.name)
        if size is not None:
            self.ledger.removed(route.repo, route.kind, size, route.name)
            if route.kind != "config" and self.prometheus:
                self.metrics.blob("delete", request.user, route.repo, route.kind, size)
        return Response(200)


class _ClosingIterator:
    """WSGI body that closes the object when the server is done with it."""

    def __init__(self, response):
        self.response = response
        self._chunks = response.iter_body()

    def __iter__(self):
        return self._chunks

    def close(self):
        self.response.close()


def _printable(text):
    """Escape anything that could forge or break a log line."""
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


# =============================================================================
# The built-in server: HTTP/1.1 framing, timeouts, TLS, sendfile
# =============================================================================
#
# http.server parses leniently: it accepts bare LF, obs-folded and duplicate
# headers, ``Content-Length: +1_0``, and leaves an unread body on the wire to
# be parsed as the next request.  This handler reads the request head itself,
# strictly, so that what a proxy in front of us sees is what we execute.

MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
DRAIN_LIMIT = 64 * 1024  # unread body we swallow to keep a connection; more: close
SMALL_BODY = 64 * 1024  # bodies up to this size are sent with the head in one write
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_CONTROL = rb"\x00-\x08\x0a-\x1f\x7f"  # all but tab
_TOKEN = re.compile(_TOKEN_CHARS + rb"+\Z")
_REQUEST_LINE = re.compile(
    "(" + _TOKEN_CHARS.decode() + r"+) ([\x21-\x7e]+) (HTTP/1\.[01])\r\n\Z")
_BAD_VALUE = re.compile(b"[" + _CONTROL + b"]")
# A whole header block that the line-by-line rules would accept as it is:
# token, colon, a value without control characters, CRLF; then the blank line.
_VALID_HEADERS = re.compile(
    b"(?:" + _TOKEN_CHARS + b"+:[^" + _CONTROL + b"]*\r\n)" + b"{0,%d}\r\n" % MAX_HEADERS)
_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}
_DIGITS = re.compile(r"[0-9]{1,18}\Z")


class HeadError(Exception):
    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status


def _add_header(headers, key, value):
    """Repeated headers join with commas; a second Content-Length or Host
    must repeat the first exactly (two lengths would split the stream)."""
    old = headers.get(key)
    if old is None:
        headers[key] = value
    elif key in ("content-length", "host"):
        if old != value:
            raise HeadError(400, f"conflicting {key} headers")
    else:
        headers[key] = old + ", " + value


class ChunkedReader:
    """A strict decoder for ``Transfer-Encoding: chunked`` request bodies."""

    length = None

    def __init__(self, rfile, before_read=None):
        self.rfile = rfile
        self.before_read = before_read
        self.left_in_chunk = 0
        self.consumed = False

    def _line(self, limit=4096):
        line = self.rfile.readline(limit + 1)
        if not line.endswith(b"\r\n") or len(line) > limit:
            raise BodyError("malformed chunked body")
        return line[:-2]

    def readinto(self, buffer):
        if self.consumed:
            return 0
        if self.before_read is not None:
            self.before_read()
            self.before_read = None
        try:
            if self.left_in_chunk == 0:
                size_field, semicolon, _extensions = self._line().partition(b";")
                if semicolon:  # whitespace is allowed only before extensions
                    size_field = size_field.rstrip(b" \t")
                if not size_field or len(size_field) > 16 or not re.fullmatch(
                        rb"[0-9a-fA-F]+", size_field):
                    raise BodyError("bad chunk size")
                self.left_in_chunk = int(size_field, 16)
                if self.left_in_chunk == 0:
                    for _ in range(MAX_HEADERS):  # trailers, ignored
                        if self._line(MAX_REQUEST_LINE) == b"":
                            self.consumed = True
                            return 0
                    raise BodyError("too many trailers")
            view = memoryview(buffer)
            if len(view) > self.left_in_chunk:
                view = view[:self.left_in_chunk]
            n = self.rfile.readinto(view)
            if not n:
                raise BodyError("unexpected EOF")
            self.left_in_chunk -= n
            if self.left_in_chunk == 0 and self.rfile.read(2) != b"\r\n":
                raise BodyError("chunk not followed by CRLF")
            return n
        except OSError as exc:
            raise BodyError(f"reading body: {exc}") from None


class _SocketWriter:
    """Unbuffered writes that always send everything (sendall)."""

    def __init__(self, sock):
        self.write = sock.sendall
        self.sock = sock

    def sendfile(self, source, start, length):
        return self.sock.sendfile(source, start, length)

    def close(self):
        pass


# --- plain TCP: timeouts enforced by the kernel ---------------------------------
#
# A socket with a Python timeout polls before every recv and send, and each
# settimeout() is an ioctl: four extra syscalls for a HEAD, each one a chance
# for another thread to take the GIL.  Plain TCP connections therefore stay
# blocking: reads time out by SO_RCVTIMEO, set only when the phase's timeout
# differs from the one in force, at the moment the socket is read (a request
# already in the buffer costs none); writes try once without waiting and fall
# back to a Python-timed sendall, whose deadline covers the whole write.  TLS
# sockets keep Python timeouts: ssl retries a blocking read that timed out.

def _timeval(seconds):
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _kernel_timeouts_work():
    """Whether SO_RCVTIMEO takes a C timeval of two longs here (and sends
    can be made non-waiting)."""
    if not hasattr(socket, "MSG_DONTWAIT"):
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            value = _timeval(1.5)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            return probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(value)) == value
    except (OSError, AttributeError, struct.error):
        return False


class _KernelTimedReader(io.RawIOBase):
    """Raw reads of a blocking socket under SO_RCVTIMEO; ``timeout`` is the
    one wanted now, applied lazily before the next real read."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        self.applied = None

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.timeout != self.applied:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.timeout))
            self.applied = self.timeout
        try:
            return self.sock.recv_into(buffer)
        except BlockingIOError:  # EAGAIN: SO_RCVTIMEO ran out
            raise socket.timeout("timed out") from None


class _KernelTimedWriter:
    """Writes to a blocking socket: one non-waiting send, which takes a
    response head or a small body whole; the rest, and sendfile, under the
    body timeout as a Python socket timeout (a deadline for the whole write)."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout

    def write(self, data):
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self._timed(self.sock.sendall, memoryview(data)[sent:])

    def sendfile(self, source, start, length):
        return self._timed(self.sock.sendfile, source, start, length)

    def _timed(self, send, *args):
        self.sock.settimeout(self.timeout)
        try:
            return send(*args)
        finally:
            self.sock.settimeout(None)

    def close(self):
        pass


class RequestHandler(BaseHTTPRequestHandler):
    """One client connection: requests in a loop while keep-alive holds."""

    protocol_version = "HTTP/1.1"
    rbufsize = 256 * 1024

    def setup(self):
        server = self.server
        sock = self.request
        self.tls_user = None
        self.requests_served = 0
        self.busy = False
        self.connection = sock
        # The first request head (and the TLS handshake) must arrive within
        # the header timeout of the accept, however slowly bytes trickle in.
        self.waiting_since = time.monotonic()
        self.head_deadline = self.waiting_since + server.timeouts["header"]
        self.evicted = False
        server.track(self, True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = server.tls_context
        if context is not None:
            try:
                sock = self._tls_handshake(sock, context)
            except BaseException:
                server.track(self, False)  # finish() is not called when setup() fails
                raise
            self.request = sock
        self.use_sendfile = context is None
        self.connection = sock
        if context is None and server.kernel_timeouts:
            if sock.gettimeout() is not None:
                sock.settimeout(None)
            self.reader = _KernelTimedReader(sock, server.timeouts["header"])
            self.rfile = io.BufferedReader(self.reader, self.rbufsize)
            self.wfile = _KernelTimedWriter(sock, server.timeouts["body"])
        else:
            self.reader = None
            self.timeout_set = sock.gettimeout()
            self.rfile = sock.makefile("rb", self.rbufsize)
            self.wfile = _SocketWriter(sock)

    def _tls_handshake(self, sock, context):
        """In this connection's own thread, bounded by a timeout: a client
        that never finishes its handshake holds only its own thread."""
        sock.settimeout(self.server.timeouts["header"])
        first = sock.recv(1, socket.MSG_PEEK)
        if not first:
            raise ConnectionAbortedError("closed before TLS handshake")
        if first != b"\x16":  # not a TLS record: plain HTTP to the TLS port
            body = b"Client sent an HTTP request to an HTTPS server.\n"
            sock.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            raise ConnectionAbortedError("plain HTTP on the TLS port")
        tls = context.wrap_socket(sock, server_side=True)
        cert = tls.getpeercert()
        if cert:
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        self.tls_user = value
        return tls

    def finish(self):
        self.server.track(self, False)
        try:
            self.wfile.close()
            self.rfile.close()
        except OSError:
            pass
        if self.request is not None and isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.close()
            except OSError:
                pass

    def handle(self):
        self.close_connection = False
        while not self.close_connection and not self.server.stopping:
            self.handle_one_request()

    # -- reading a request head --------------------------------------------------
    def handle_one_request(self):
        self.close_connection = True
        timeouts = self.server.timeouts
        try:
            if self.requests_served:
                self.waiting_since = time.monotonic()
                self.set_timeout(timeouts["idle"])
                waiting = self.rfile.peek(1)
                if not waiting:
                    return
                self.head_deadline = time.monotonic() + timeouts["header"]
                # A head already in the buffer is parsed without reading the
                # socket, so its timeout would not apply; one syscall saved.
                if b"\r\n\r\n" not in waiting:
                    self.set_timeout(timeouts["header"])
            else:
                self.set_timeout(timeouts["header"])
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not line:
                return
            self.busy = True
            try:
                request = self.read_head(line)
            except HeadError as exc:
                self.send_plain_error(exc.status)
                return
            self.head_deadline = None
            self.set_timeout(timeouts["body"])
            self.serve(request)
        except (OSError, ssl.SSLError):
            self.close_connection = True
        finally:
            self.busy = False
            self.requests_served += 1

    def set_timeout(self, seconds):
        if self.reader is not None:
            self.reader.timeout = seconds
        # socket.settimeout() costs a syscall even when nothing changes.
        elif seconds != self.timeout_set:
            self.connection.settimeout(seconds)
            self.timeout_set = seconds

    def read_head(self, line):
        if len(line) > MAX_REQUEST_LINE:
            raise HeadError(414, "request line too long")
        text = line.decode("latin-1")  # the pattern admits ASCII only
        match = _REQUEST_LINE.match(text)
        if match is None:
            raise HeadError(400, "malformed request line")
        method, target, version = match.groups()
        self.command, self.path, self.request_version = method, target, version
        self.requestline = text[:-2]
        headers = self.buffered_headers()
        if headers is None:
            headers = self.read_headers()
        if version == "HTTP/1.1" and "host" not in headers:
            raise HeadError(400, "missing Host header")
        body = self.body_reader(headers, version)
        return Request(method, target, headers, body, self.client_host(), version, self.tls_user)

    def buffered_headers(self):
        """The headers, if the whole block is already buffered and valid
        (nearly every request): one pattern match instead of a loop of reads
        and checks per line.  None leaves the bytes to ``read_headers``, which
        also finds the exact fault in a block that is not valid."""
        rfile = self.rfile
        waiting = rfile.peek(1)
        if waiting.startswith(b"\r\n"):
            size = 2
        else:
            size = waiting.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES) + 4
            if size < 4:
                return None
        if _VALID_HEADERS.fullmatch(waiting, 0, size) is None:
            return None
        headers = {}
        if size > 2:
            for line in waiting[:size - 4].decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                _add_header(headers, name.lower(), value.strip(" \t"))
        rfile.read(size)
        return headers

    def read_headers(self):
        headers = {}
        total = 0
        for _ in range(MAX_HEADERS + 1):
            raw = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(raw)
            if total > MAX_HEADER_BYTES:
                raise HeadError(431, "headers too large")
            if raw == b"\r\n":
                break
            if not raw.endswith(b"\r\n"):
                raise HeadError(400, "header line without CRLF")
            name, colon, value = raw[:-2].partition(b":")
            if not colon or not _TOKEN.match(name):
                raise HeadError(400, "malformed header")  # also obs-fold
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise HeadError(400, "control character in header")
            _add_header(headers, name.decode("ascii").lower(), value.decode("latin-1"))
        else:
            raise HeadError(431, "too many headers")
        return headers

    def body_reader(self, headers, version):
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        expect = headers.get("expect")
        send_continue = None
        if expect is not None:
            if expect.lower() != "100-continue":
                raise HeadError(417, "unsupported Expect")
            if version == "HTTP/1.1":
                send_continue = self._send_continue
        if te is not None:
            if cl is not None:
                raise HeadError(400, "both Content-Length and Transfer-Encoding")
            if te.strip().lower() != "chunked":
                raise HeadError(501, "unsupported transfer coding")
            return ChunkedReader(self.rfile, send_continue)
        if cl is None:
            return None
        if not _DIGITS.match(cl):
            raise HeadError(400, "bad Content-Length")
        length = int(cl)
        if send_continue is not None and length:
            return BodyReader(self.rfile, length, send_continue)
        return BodyReader(self.rfile, length)

    def _send_continue(self):
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def client_host(self):
        address = self.client_address
        if isinstance(address, tuple) and address:
            return address[0]
        return "unix"

    # -- answering -----------------------------------------------------------------
    def serve(self, request):
        response = self.server.app.handle(request)
        body = request.body
        keep_alive = self._keep_alive(request)
        drain = False
        if body is not None and not body.consumed:
            pending = getattr(body, "before_read", None) is not None
            if (isinstance(body, BodyReader) and not pending
                    and body.remaining <= DRAIN_LIMIT and response.status != 400):
                drain = True
            else:
                keep_alive = False  # the unread body must never become a request
        self.close_connection = not keep_alive
        try:
            self.send(request, response)
        finally:
            response.close()
        if drain and keep_alive:
            buffers = self.server.app.buffers
            buffer = buffers.take()
            try:
                while body.readinto(buffer):
                    pass
            except BodyError:
                self.close_connection = True
            finally:
                buffers.give(buffer)

    def _keep_alive(self, request):
        if self.server.stopping:
            return False
        connection = request.headers.get("connection", "").lower()
        if request.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    def send(self, request, response):
        status = response.status
        lines = [_STATUS_LINES[status]]
        for key, value in response.headers:
            lines.append(f"{key}: {value}\r\n")
        lines.append(f"Content-Length: {response.length}\r\n")
        lines.append(f"Date: {self.server.http_date()}\r\n")
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        if request.method == "HEAD":
            self.wfile.write(head)
            return
        if response.reader is None:
            self.wfile.write(head + response.body if len(response.body) < 65536 else head)
            if len(response.body) >= 65536:
                self.wfile.write(response.body)
            return
        if response.length <= SMALL_BODY:
            # Index, key and snapshot files and small ranges: one write with
            # the head is cheaper than setting up sendfile.
            self.wfile.write(head + b"".join(response.iter_body()))
            return
        self.wfile.write(head)
        source = response.reader.sendfile_source() if self.use_sendfile else None
        if source is not None and response.length:
            sent = self.wfile.sendfile(source, response.start, response.length)
            if sent != response.length:
                raise ConnectionAbortedError("object shrank while being sent")
            return
        for chunk in response.iter_body():
            self.wfile.write(chunk)

    def send_plain_error(self, status):
        body = (HTTPStatus(status).phrase + "\n").encode()
        self.close_connection = True
        self.wfile.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, HTTPStatus(status).phrase.encode(), len(body), body))

    def log_message(self, format, *args):  # the access log is the app's
        pass


class ResticServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on a socket we made, with a cap on concurrent
    connections, per-phase timeouts, TLS done per connection, and a
    graceful stop that lets requests in flight finish."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, listen_socket, app, *, tls_context=None, timeouts=None,
                 max_connections=1000, log=None):
        super().__init__(listen_socket.getsockname() or ("", 0), RequestHandler,
                         bind_and_activate=False)
        self.socket.close()
        self.socket = listen_socket
        self.address_family = listen_socket.family
        self.app = app
        self.tls_context = tls_context
        self.timeouts = dict(DEFAULT_TIMEOUTS, **(timeouts or {}))
        self.log = log or (lambda message: None)
        self.stopping = False
        self.slots = threading.BoundedSemaphore(max_connections)
        self.connections = set()
        self._connections_lock = threading.Lock()
        self._date = (0, "")
        self.kernel_timeouts = tls_context is None and _kernel_timeouts_work()
        threading.Thread(target=self._enforce_head_deadlines, name="head-deadlines",
                         daemon=True).start()

    def _enforce_head_deadlines(self):
        """Cut connections whose request head is overdue (slowloris)."""
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._connections_lock:
                late = [h for h in self.connections
                        if h.head_deadline is not None and h.head_deadline < now]
            for handler in late:
                handler.head_deadline = None
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def http_date(self):
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)))
        return self._date[1]

    def process_request(self, request, client_address):
        # When every slot is taken, the connection that has waited longest
        # without sending a complete request (idle keep-alive, or a head
        # trickling in) makes room; failing that, accept() waits.
        while not self.slots.acquire(blocking=False):
            self._evict_longest_waiting()
            if self.slots.acquire(timeout=0.5):
                break
            if self.stopping:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _evict_longest_waiting(self):
        with self._connections_lock:
            waiting = [h for h in self.connections if not h.evicted
                       and (h.head_deadline is not None or not h.busy)]
        if waiting:
            victim = min(waiting, key=lambda h: h.waiting_since)
            victim.evicted = True
            victim.head_deadline = None
            try:
                victim.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def track(self, handler, opened):
        with self._connections_lock:
            if opened:
                self.connections.add(handler)
            else:
                self.connections.discard(handler)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError, ConnectionError, ValueError)):
            return  # a client went away or failed its handshake: routine
        self.log(f"ERROR: connection from {client_address}: {type(exc).__name__}: {exc}")

    def stop(self, grace=30.0):
        """Stop accepting, close idle keep-alive connections, wait up to
        ``grace`` seconds for requests in flight."""
        self.stopping = True
        self.shutdown()
        try:  # new clients get "connection refused", not a silent hang
            self.socket.close()
        except OSError:
            pass
        deadline = time.monotonic() + grace
        while True:
            with self._connections_lock:
                handlers = list(self.connections)
            busy = [h for h in handlers if h.busy]
            for handler in handlers:
                if not handler.busy:
                    try:
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            if not busy or time.monotonic() > deadline:
                return not busy
            time.sleep(0.05)


MAX_TIMEOUT = 86400.0 * 365  # beyond this a timeout is a typo (and overflows a timeval)
DEFAULT_TIMEOUTS = {
    "header": 30.0,   # to receive a request head (and TLS handshake)
    "body": 120.0,    # of silence while reading a request body
    "idle": 300.0,    # keep-alive idle time between requests
}


def make_tls_context(cert, key, min_version="1.2", client_ca=None):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if min_version == "1.3"
                               else ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2: ECDHE with AEAD only
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS client CA {client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def listen_socket(address, backlog=1024):
    """Create the listening socket for ``--listen``: ``:PORT``, ``HOST:PORT``,
    ``[V6]:PORT`` or ``unix:/path``; systemd socket activation wins."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS"):
        count = int(os.environ["LISTEN_FDS"])
        if count > 1:
            raise ConfigError(f"got {count} listeners from systemd, expected one")
        if count == 1:
            sock = socket.socket(fileno=3)
            return sock, "systemd"
    if address.startswith("unix:"):
        path = address[5:]
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from a crash
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from None
        sock.listen(backlog)
        return sock, "unix"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"invalid listen address {address!r}: use HOST:PORT, :PORT or unix:/path")
    host = host.strip("[]")
    try:
        if not host:
            if socket.has_dualstack_ipv6():
                sock = socket.create_server(("", int(port)), family=socket.AF_INET6,
                                            backlog=backlog, dualstack_ipv6=True)
            else:
                sock = socket.create_server(("", int(port)), backlog=backlog)
        else:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
            sock = socket.create_server(info[4][:2], family=info[0], backlog=backlog)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock, "tcp"


def socket_display(sock, kind):
    if kind == "unix":
        return "unix:" + sock.getsockname()
    name = sock.getsockname()
    if isinstance(name, str):
        return name
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


# =============================================================================
# The command line
# =============================================================================


class ProcessLog:
    """The server's own log on stderr, one timestamped line per event."""

    def __init__(self, stream=None):
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, message):
        line = f"{time.strftime('%Y/%m/%d %H:%M:%S')} {message}\n"
        with self._lock:
            stream = self.stream or sys.stderr
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass


class AccessLog:
    """Combined Log Format, like rest-server's ``--log``, but with the
    authenticated user, and with request data escaped so nothing a client
    sends can forge a line.  ``reopen`` (on SIGHUP) lets logrotate work."""

    def __init__(self, target):
        self.target = target
        self._lock = threading.Lock()
        self.stream = None
        self.reopen()

    def reopen(self):
        if self.target == "-":
            self.stream = sys.stdout
            return
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open log file {self.target}: {exc.strerror}") from None
        old, self.stream = self.stream, os.fdopen(fd, "a", encoding="utf-8")
        if old is not None:
            old.close()

    def write(self, request, response):
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(request.started))
        user = _printable(request.user) if request.user else "-"
        headers = request.headers
        line = (f'{request.remote_addr} - {user} [{when}] '
                f'"{_printable(request.method)} {_printable(request.target)} {request.version}" '
                f'{response.status} {0 if request.method == "HEAD" else response.length} '
                f'"{_printable(headers.get("referer", ""))}" '
                f'"{_printable(headers.get("user-agent", ""))}"\n')
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass


def parse_size(text):
    """``--max-size`` value: bytes, or with a K/M/G/T suffix (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500000000, 500M, 2G)")
    factor = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    return int(match.group(1)) * factor


def _requested_backend(argv):
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return "local"


def load_backend_module(name):
    """Backends other than ``local`` live in ``pyrestserver_<name>`` modules
    that define ``create_provider(args, log)`` and optionally
    ``add_arguments(parser)``; nothing is imported until asked for."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"invalid backend name {name!r}")
    try:
        return importlib.import_module(f"pyrestserver_{name}")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or name
        raise ConfigError(
            f"backend {name!r} is not available ({missing} is not installed): "
            f"pip install 'pyrestserver[{name}]'") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every real default; flags without one say so in their help."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == "" or isinstance(default, list):
            return action.help
        return super()._get_help_string(action)


def build_parser(backend_module=None):
    parser = argparse.ArgumentParser(
        prog="pyrestserver",
        description="A REST server for restic backups (a drop-in replacement for rest-server).",
        epilog="Commands: 'pyrestserver user --help' manages htpasswd users; "
               "'pyrestserver repos --help' lists repositories.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-v", "--version", action="version",
                        version=f"pyrestserver version {__version__}")
    g = parser.add_argument_group("storage")
    g.add_argument("--path", default=os.path.join(_tempdir(), "restic"),
                   help="data directory")
    g.add_argument("--backend", default="local",
                   help="storage backend: local, or NAME for the pyrestserver_NAME module "
                        "(drime, s3)")
    g.add_argument("--max-size", type=parse_size, default=0, metavar="BYTES",
                   help="maximum size of all repositories together (0: no limit)")
    g.add_argument("--max-repo-size", type=parse_size, default=0, metavar="BYTES",
                   help="maximum size of each repository (0: no limit)")
    g.add_argument("--no-verify-upload", action="store_true",
                   help="do not verify that uploads match their SHA-256 name (not recommended)")
    g.add_argument("--group-accessible-repos", action="store_true",
                   help="create folders 0770 and files 0660 instead of 0700/0600")
    g = parser.add_argument_group("access control")
    g.add_argument("--no-auth", action="store_true", help="disable authentication")
    g.add_argument("--htpasswd-file", default=None, metavar="FILE",
                   help="htpasswd file (default: <path>/.htpasswd)")
    g.add_argument("--proxy-auth-username", default="", metavar="HEADER",
                   help="take the username from this request header (set by a trusted proxy)")
    g.add_argument("--append-only", action="store_true",
                   help="refuse deletes and overwrites (except locks)")
    g.add_argument("--append-only-exempt", action="append", default=[], metavar="USER[,USER]",
                   help="users not bound by --append-only (e.g. an admin who prunes)")
    g.add_argument("--private-repos", action="store_true",
                   help="users may only access /<username>/... repositories")
    g = parser.add_argument_group("network and TLS")
    g.add_argument("--listen", default=":8000",
                   help="listen address: HOST:PORT, :PORT, [V6]:PORT or unix:/path")
    g.add_argument("--tls", action="store_true", help="serve HTTPS")
    g.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="TLS certificate chain (default: <path>/public_key)")
    g.add_argument("--tls-key", default=None, metavar="FILE",
                   help="TLS private key (default: <path>/private_key)")
    g.add_argument("--tls-min-ver", default="1.2", help="minimum TLS version: 1.2 or 1.3")
    g.add_argument("--tls-client-ca", default=None, metavar="FILE",
                   help="require client certificates signed by this CA; the certificate's "
                        "common name is the user")
    g = parser.add_argument_group("observability")
    g.add_argument("--log", default=None, metavar="FILE",
                   help="write an access log (Combined Log Format) to FILE, or - for stdout")
    g.add_argument("--debug", action="store_true", help="log every request and error detail")
    g.add_argument("--prometheus", action="store_true", help="serve Prometheus metrics at /metrics")
    g.add_argument("--prometheus-no-auth", action="store_true",
                   help="serve /metrics without authentication")
    g.add_argument("--cpu-profile", default=None, metavar="FILE",
                   help="accepted for rest-server compatibility; use py-spy to profile")
    g = parser.add_argument_group("limits")
    g.add_argument("--header-timeout", type=float, default=DEFAULT_TIMEOUTS["header"],
                   metavar="SECONDS", help="time to receive a request head or TLS handshake")
    g.add_argument("--body-timeout", type=float, default=DEFAULT_TIMEOUTS["body"],
                   metavar="SECONDS", help="longest silence while receiving a request body")
    g.add_argument("--idle-timeout", type=float, default=DEFAULT_TIMEOUTS["idle"],
                   metavar="SECONDS", help="keep-alive idle time between requests")
    g.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="concurrent client connections")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish")
    if backend_module is not None and hasattr(backend_module, "add_arguments"):
        backend_module.add_arguments(parser.add_argument_group(f"{backend_module.__name__}"))
    return parser


def _tempdir():
    import tempfile
    return tempfile.gettempdir()


def parse_args(argv):
    backend = _requested_backend(argv)
    module = None if backend == "local" else load_backend_module(backend)
    args = build_parser(module).parse_args(argv)
    args.backend_module = module
    if (args.tls_cert or args.tls_key or args.tls_client_ca) and not args.tls:
        raise ConfigError("requires enabled TLS")
    if args.tls_min_ver not in ("1.2", "1.3"):
        raise ConfigError(f"Unsupported TLS min version: {args.tls_min_ver}. "
                          "Allowed versions are 1.2 or 1.3")
    for flag in ("header_timeout", "body_timeout", "idle_timeout", "shutdown_timeout"):
        value = getattr(args, flag)
        if not 0 < value <= MAX_TIMEOUT and not (flag == "shutdown_timeout" and value == 0):
            raise ConfigError(f"--{flag.replace('_', '-')} must be a number of seconds "
                              f"above 0 and at most {MAX_TIMEOUT:.0f}, not {value:g}")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, not {args.max_connections}")
    args.append_only_exempt = [u.strip() for item in args.append_only_exempt
                               for u in item.split(",") if u.strip()]
    return args


def build_app(args, log):
    """Storage, auth, quota, metrics and the API, as the flags say."""
    log(f"Data directory: {args.path}")
    if args.backend_module is None:
        os.makedirs(args.path, mode=0o770 if args.group_accessible_repos else 0o700,
                    exist_ok=True)
        provider = LocalStorageProvider(args.path, group_accessible=args.group_accessible_repos,
                                        log=log)
    else:
        provider = args.backend_module.create_provider(args, log)
    if args.no_auth:
        auth = Authenticator(enabled=False)
        log("Authentication disabled")
    elif args.proxy_auth_username:
        auth = Authenticator(proxy_header=args.proxy_auth_username)
        log("Proxy Authentication enabled.")
    elif (args.tls_client_ca and not args.htpasswd_file
          and not os.path.exists(os.path.join(args.path, ".htpasswd"))):
        auth = Authenticator()  # the verified certificate's common name is the user
        log("Authentication enabled (TLS client certificates)")
    else:
        path = args.htpasswd_file or os.path.join(args.path, ".htpasswd")
        if not os.path.exists(path):
            raise ConfigError(
                f"cannot load {path}: no such file (use --no-auth to disable authentication)\n"
                f"Create the first user with:  {_self_command()} user add NAME "
                f"--htpasswd-file {shlex.quote(path)}")
        htpasswd = Htpasswd(path, log=log)
        auth = Authenticator(htpasswd=htpasswd)
        log("Authentication enabled")
        log(f"Loaded htpasswd file {path} ({len(htpasswd.users)} users)")
    removed = provider.recover()
    if removed:
        log(f"Removed {removed} temp files left by an earlier run")
    ledger = UsageLedger(args.max_size, args.max_repo_size)
    if ledger.enforcing or args.prometheus:
        log("Initializing quota (can take a while)...")
        ledger.load(provider.scan())
        log(f"Quota initialized, currently using {ledger.total / 2**30:.2f} GiB")
    app = ResticRESTApp(
        provider, append_only=args.append_only, append_only_exempt=args.append_only_exempt,
        private_repos=args.private_repos, verify_upload=not args.no_verify_upload, auth=auth,
        ledger=ledger, prometheus=args.prometheus, prometheus_no_auth=args.prometheus_no_auth,
        access_log=AccessLog(args.log) if args.log else None, log=log, debug=args.debug)
    log(f"Append only mode {'enabled' if args.append_only else 'disabled'}"
        + (f" (exempt: {', '.join(args.append_only_exempt)})"
           if args.append_only and args.append_only_exempt else ""))
    log(f"Private repositories {'enabled' if app.private_repos else 'disabled'}")
    log(f"Group accessible repos {'enabled' if args.group_accessible_repos else 'disabled'}")
    return app


def _self_command():
    """How this program was started, quoted so the printed command runs."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else "pyrestserver"
    if script.endswith((".py", ".pyz")):
        return f"python3 {shlex.quote(script)}"
    return "pyrestserver"


def app_from_argv(argv, log=None):
    """A WSGI application configured by the same flags as the server."""
    return build_app(parse_args(list(argv)), log or ProcessLog())


def serve(argv, log):
    args = parse_args(argv)
    if args.cpu_profile:
        log("WARNING: --cpu-profile is accepted for compatibility and ignored; use py-spy")
    app = build_app(args, log)
    tls_context = None
    if args.tls:
        cert = args.tls_cert or os.path.join(args.path, "public_key")
        key = args.tls_key or os.path.join(args.path, "private_key")
        tls_context = make_tls_context(cert, key, args.tls_min_ver, args.tls_client_ca)
    sock, kind = listen_socket(args.listen)
    unix_path = sock.getsockname() if kind == "unix" else None
    server = ResticServer(
        sock, app, tls_context=tls_context, max_connections=args.max_connections, log=log,
        timeouts={"header": args.header_timeout, "body": args.body_timeout,
                  "idle": args.idle_timeout})
    stop = threading.Event()

    def on_stop(signum, frame):
        stop.set()

    def on_hangup(signum, frame):
        htpasswd = app.auth.htpasswd
        if htpasswd is not None:
            htpasswd.reload()
        if app.access_log is not None:
            try:
                app.access_log.reopen()
            except ConfigError as exc:
                log(str(exc))
        if args.tls:
            try:
                server.tls_context = make_tls_context(cert, key, args.tls_min_ver,
                                                      args.tls_client_ca)
                log("Reloaded TLS certificate and key")
            except ConfigError as exc:
                log(f"Could not reload TLS certificate: {exc}")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hangup)
    if kind == "systemd":
        log("systemd socket activation mode")
    log(f"start server on {socket_display(sock, kind)}")
    if args.tls:
        log(f"TLS enabled, private key {key}, pubkey {cert}")
    # A short poll interval makes SIGTERM prompt; ten wakeups a second cost nothing.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="accept", daemon=True)
    thread.start()
    while not stop.wait(1.0):
        pass
    log("shutting down")
    clean = server.stop(args.shutdown_timeout)
    thread.join(5)
    if isinstance(app.provider, LocalStorageProvider):
        app.provider.abort_all_uploads()
    app.provider.close()
    if kind == "unix":
        try:
            os.unlink(unix_path)
        except OSError:
            pass
    sock.close()
    log("shutdown cleanly" if clean else "shutdown: requests still in flight were cut off")
    return 0


# --- operator commands: users and repositories --------------------------------------


def _htpasswd_path(args):
    return args.htpasswd_file or os.path.join(args.path, ".htpasswd")


def make_password_hash(password):
    """bcrypt when the extra is installed, else SHA-512-crypt (stdlib only)."""
    try:
        import bcrypt
    except ImportError:
        return make_sha512_crypt(password)
    if len(password) > 72:
        raise ConfigError("bcrypt passwords are limited to 72 bytes")
    return bcrypt.hashpw(password, bcrypt.gensalt()).decode("ascii")


def _read_password(args, confirm):
    if args.password_stdin:
        line = sys.stdin.buffer.readline()
        password = line.rstrip(b"\r\n")
    else:
        import getpass
        password = getpass.getpass("Password: ").encode("utf-8")
        if confirm and getpass.getpass("Password again: ").encode("utf-8") != password:
            raise ConfigError("the passwords do not match")
    if not password:
        raise ConfigError("empty password")
    return password


class HtpasswdEditor:
    """Edits an htpasswd file in place of Apache's tool: other lines and
    comments stay as they were, the file is replaced atomically (mode 0600),
    and concurrent editors take turns through a lock file."""

    def __init__(self, path, write=True):
        # Edit the file a symlink points to, not the link.
        self.path = os.path.realpath(path)
        self.write = write
        self.owner = None
        self._lock = None

    def __enter__(self):
        if self.write:
            import fcntl
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            self._lock = open(self.path + ".lock", "a")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                st = os.fstat(f.fileno())
                self.owner = (st.st_uid, st.st_gid)
        except FileNotFoundError:
            if not self.write:
                self.__exit__()
                raise ConfigError(f"no htpasswd file at {self.path}") from None
            data = b""
        except OSError as exc:
            self.__exit__()
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.__exit__()
            raise ConfigError(f"{self.path} is not valid UTF-8; not touching it") from None
        # Split on "\n" only, so every other line (CRLF, odd characters) is
        # written back byte for byte.
        self.lines = text.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @staticmethod
    def _user_of(line):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            return None
        return stripped.split(":", 1)[0]

    def users(self):
        found = {}
        for line in self.lines:
            user = self._user_of(line)
            if user is not None:
                found[user] = line.strip().split(":", 1)[1]
        return found

    def set(self, user, hashed):
        entry = f"{user}:{hashed}"
        kept, replaced = [], False
        for line in self.lines:
            if self._user_of(line) == user:
                if not replaced:
                    kept.append(entry)
                    replaced = True
                continue
            kept.append(line)
        if not replaced:
            kept.append(entry)
        self.lines = kept
        return replaced

    def delete(self, user):
        before = len(self.lines)
        self.lines = [line for line in self.lines if self._user_of(line) != user]
        return len(self.lines) != before

    def save(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        temp = os.path.join(folder, f".{os.path.basename(self.path)}.{secrets.token_hex(6)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if self.owner is not None and self.owner != (os.geteuid(), os.getegid()):
                os.fchown(fd, *self.owner)  # root editing must not lock the server out
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write("".join(line + "\n" for line in self.lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def command_user(argv):
    parser = argparse.ArgumentParser(
        prog="pyrestserver user", formatter_class=_HelpFormatter,
        description="Manage the users of the htpasswd file the server reads. A running "
                    "server picks changes up within 30 seconds, or at once on SIGHUP.")
    parser.add_argument("action", choices=("add", "delete", "list", "verify"))
    parser.add_argument("name", nargs="?")
    parser.add_argument("--path", default=os.path.join(_tempdir(), "restic"),
                        help="data directory (the file is <path>/.htpasswd by default)")
    parser.add_argument("--htpasswd-file", default=None, help="the htpasswd file")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    args = parser.parse_args(argv)
    path = _htpasswd_path(args)
    if args.action != "list":
        if not args.name:
            parser.error(f"user {args.action} needs a NAME")
        if not valid_username(args.name):
            raise ConfigError(f"invalid username {args.name!r}: use letters, numbers, "
                              "'_', '-', '.' and '@'")
    if args.action == "list":
        with HtpasswdEditor(path, write=False) as editor:
            for user, hashed in sorted(editor.users().items()):
                print(f"{user}\t{hash_kind(hashed)}")
        return 0
    if args.action == "verify":
        with HtpasswdEditor(path, write=False) as editor:
            stored = editor.users().get(args.name)
        if stored is None:
            raise ConfigError(f"no user {args.name!r} in {path}")
        try:
            ok = verify_password(_read_password(args, confirm=False), stored)
        except UnsupportedHash:
            raise ConfigError(f"user {args.name!r} has an unsupported hash") from None
        except BcryptMissing:
            raise ConfigError("bcrypt is not installed: pip install pyrestserver[bcrypt]") from None
        print("password correct" if ok else "password WRONG")
        return 0 if ok else 1
    if args.action == "add":
        hashed = make_password_hash(_read_password(args, confirm=True))
        with HtpasswdEditor(path) as editor:
            replaced = editor.set(args.name, hashed)
            editor.save()
        print(f"{'Updated' if replaced else 'Added'} user {args.name} in {path}")
        return 0
    with HtpasswdEditor(path) as editor:
        if not editor.delete(args.name):
            raise ConfigError(f"no user {args.name!r} in {path}")
        editor.save()
    print(f"Deleted user {args.name} from {path}")
    return 0


def inspect_repository(provider, repo):
    """Size, snapshots and visible damage of one local repository."""
    report = {"repo": "/" + "".join(part + "/" for part in repo), "size": 0, "objects": 0,
              "snapshots": 0, "last_snapshot": None, "temp_files": 0, "problems": []}
    root = provider.repo_dir(repo)
    if not os.path.isfile(os.path.join(root, "config")):
        report["problems"].append("missing config")
    for kind in OBJECT_TYPES:
        if not os.path.isdir(os.path.join(root, kind)):
            report["problems"].append(f"missing {kind}/")
    newest = 0.0
    for kind, name, size, mtime in provider._walk_repo(repo, True):
        if kind == "temp":
            report["temp_files"] += 1
            continue
        if kind == "unreadable":
            report["problems"].append(f"unreadable {os.path.relpath(name, root)}/")
            continue
        report["size"] += size
        if kind == "config":
            continue
        report["objects"] += 1
        if kind == "snapshots":
            report["snapshots"] += 1
            newest = max(newest, mtime)
    def walk_error(exc):
        report["problems"].append(f"unreadable {os.path.relpath(exc.filename, root)}/")

    for dirpath, _dirs, files in os.walk(root, onerror=walk_error):
        for name in files:
            if not os.access(os.path.join(dirpath, name), os.R_OK):
                report["problems"].append(f"unreadable {os.path.relpath(os.path.join(dirpath, name), root)}")
    if newest:
        report["last_snapshot"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest))
    if report["temp_files"]:
        report["problems"].append(f"{report['temp_files']} stray temp files")
    report["problems"] = list(dict.fromkeys(report["problems"]))  # each once
    return report


def command_repos(argv):
    parser = argparse.ArgumentParser(
        prog="pyrestserver repos", formatter_class=_HelpFormatter,
        description="List the repositories under the data directory.")
    parser.add_argument("--path", default=os.path.join(_tempdir(), "restic"), help="data directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.path):
        raise ConfigError(f"no data directory at {args.path}")
    provider = LocalStorageProvider(args.path, readonly=True)
    reports = [inspect_repository(provider, repo) for repo in provider._repo_dirs()]
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    rows = [("REPO", "SIZE", "SNAPSHOTS", "LAST SNAPSHOT", "STATUS")]
    for r in reports:
        rows.append((r["repo"], _human_size(r["size"]), str(r["snapshots"]),
                     r["last_snapshot"] or "-", "; ".join(r["problems"]) or "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    return 0


def _human_size(size):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


COMMANDS = {"user": command_user, "repos": command_repos}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    log = ProcessLog()
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return serve(argv, log)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# Running this file as a script.  CPython keeps a script's parse tree, about
# 6 MiB for this file, until the script returns, which for a server is never.
# So ``python3 pyrestserver.py`` replaces itself (same PID, same interpreter
# options and arguments) with an interpreter that compiles this file as the
# module ``pyrestserver``, where the tree is freed as soon as the code exists.

#: Interpreter flags that may come before the script and mean the same before
#: ``-c`` (others, e.g. ``-m pdb`` or ``-x``, and we run in place instead).
_PLAIN_FLAGS = frozenset("bBdEIOPqsSuv")

_LOAD_AS_MODULE = (
    "import sys;from importlib.machinery import SourceFileLoader as L;p=sys.argv[1];"
    "l=L('pyrestserver',p);m=type(sys)('pyrestserver');m.__file__=p;"
    "sys.modules['pyrestserver']=m;exec(l.source_to_code(l.get_data(p),p),m.__dict__);"
    "m._run_loaded_script()")


def _reload_command():
    """The command that re-runs this script as a module, or None where that
    could change what runs: Python 3.9 (no ``sys.orig_argv``), a debugger,
    profiler or ``-i``, an unknown interpreter option."""
    original = getattr(sys, "orig_argv", None)
    if (not original or not sys.executable or sys.flags.inspect
            or sys.gettrace() is not None or sys.getprofile() is not None):
        return None
    count = len(sys.argv)
    if len(original) <= count or original[-count:] != sys.argv:
        return None
    options = original[1:-count]
    i = 0
    while i < len(options):
        option = options[i]
        if option in ("-X", "-W"):
            i += 2
            continue
        if not (option.startswith(("-X", "-W")) or (
                len(option) > 1 and option[0] == "-" and set(option[1:]) <= _PLAIN_FLAGS)):
            return None
        i += 1
    if i != len(options):
        return None
    return [sys.executable, *options, "-c", _LOAD_AS_MODULE, *sys.argv]


def _release_memory():
    """Hand freed heap pages back to the OS (glibc only; a no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def _run_loaded_script():
    """Second half of a script run, in the interpreter ``_reload_command``
    started: restore what a script run would have seen, then serve."""
    sys.argv = sys.argv[1:]
    if sys.path and sys.path[0] == "":  # -c put the working folder first
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    _release_memory()  # what compiling this file used
    sys.exit(main())


if __name__ == "__main__":
    command = _reload_command()
    if command is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, command)
        except OSError:
            pass  # run in this interpreter instead
    # Backends import ``pyrestserver``; make that this very module, not a
    # second copy whose exception classes the running server would not know.
    sys.modules.setdefault("pyrestserver", sys.modules[__name__])
    sys.exit(main())
