"""Drime Cloud storage for pyrestserver: ``pyrestserver --backend drime``.

Repositories live in folders of a Drime workspace, in restic's own layout::

    <root folder>/<repo>/config
    <root folder>/<repo>/{keys,locks,snapshots,index}/<id>
    <root folder>/<repo>/data/<id[:2]>/<id>

The Drime HTTP API is reached through the ``pydrime`` package (the ``drime``
extra).  pydrime is used for what it does well (JSON calls, listings, folder
creation, deletes, multipart uploads through presigned URLs); its own retries
are switched off (``max_retries=0``) because this module retries every call
itself, checking first whether an earlier try already took effect, so that a
retry never creates a second folder or a second entry.  Simple uploads and
ranged, streamed downloads go through pydrime's HTTP session directly, because
pydrime names an upload after the local file, does not retry uploads or
downloads, and has no ranged download.

Design (details and API-call counts per restic operation: docs/drime.md):

* An in-memory map of folders and objects (name -> entry id, size), filled by
  paged listings and kept current by this process's own writes, so HEAD and GET
  cost no listing.  A miss re-lists just that folder before answering 404.
* LIST of ``data`` is one paged listing of all ``data/xx`` folders at once
  (``parentIds=a,b,...``), after a one-time probe that the service honours
  several parent ids; otherwise one paged listing per folder.
* Folder find-or-create runs under a per-folder lock; object uploads under a
  per-name lock.  An upload is confirmed by the entry the service returns
  (name, size, parent) before ``commit`` returns.
* Only a service answer that really means "not there" becomes NotFound (404);
  429, 5xx, network errors and garbled answers are retried with backoff,
  honouring ``Retry-After``, then become StorageError (500).
* Uploads are spooled to a file in a private ``mkdtemp`` folder (mode 0700,
  unpredictable name), never held in memory; GETs stream, ranged GETs ask
  Drime for just the range and fall back to skipping when Range is ignored.

Only the API key is supported (``DRIME_API_KEY`` or ``--drime-api-key-file``);
Drime's username/password login is not.
"""

import contextlib
import email.utils
import hashlib
import os
import random
import re
import shutil
import stat as stat_module
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

MiB = 1 << 20


import pyrestserver as core  # noqa: E402  (the running core: it aliases itself)

StorageError = core.StorageError
NotFound = core.NotFound
ObjectExists = core.ObjectExists
InsufficientStorage = core.InsufficientStorage
ConfigError = core.ConfigError
OBJECT_TYPES = core.OBJECT_TYPES
CHUNK_SIZE = core.CHUNK_SIZE

SPOOL_PREFIX = "pyrestserver-drime-"
DEFAULT_API_URL = "https://app.drime.cloud/api/v1"
_HEX_ID = re.compile(r"[0-9a-f]{64}\Z")
_TOMBSTONE_SECONDS = 600.0


# =============================================================================
# pydrime, imported without side effects
# =============================================================================


def import_pydrime():
    """Import pydrime without letting it read ``.env`` from the working directory.

    ``import pydrime`` builds a global ``Config()`` that calls
    ``dotenv.load_dotenv(cwd/.env)``, which would copy any variable from a stray
    ``.env`` file into this process's environment (an API key or URL, or a proxy
    setting that httpx then honours).  The loader is replaced by a no-op for the
    duration of the import.  (pydrime also reads ``~/.config/pydrime/config``;
    that is harmless here because the key and URL are always passed explicitly.)
    """
    if "pydrime" in sys.modules:
        import pydrime
        return pydrime
    try:
        import dotenv
    except ImportError:
        dotenv = None
    saved = getattr(dotenv, "load_dotenv", None)
    if dotenv is not None:
        dotenv.load_dotenv = lambda *args, **kwargs: False
    try:
        import httpx  # noqa: F401  (pydrime's HTTP client; used for uploads/downloads)
        import pydrime
        import pydrime.api  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"backend 'drime' needs the pydrime package ({exc.name or exc} is missing): "
            "pip install 'pyrestserver[drime]'") from None
    finally:
        if dotenv is not None:
            dotenv.load_dotenv = saved
    return pydrime


# =============================================================================
# Errors and retries
# =============================================================================


class _Failure:
    """What went wrong with one Drime call, classified."""

    __slots__ = ("kind", "status", "retry_after", "message")

    def __init__(self, kind, message, status=None, retry_after=None):
        self.kind = kind  # "retry", "missing", "fatal", "space"
        self.message = message
        self.status = status
        self.retry_after = retry_after

    def __str__(self):
        return self.message


class _Missing(Exception):
    """The service said 404 for something (an id, a parent folder)."""


class _Rejected(Exception):
    """The service refused a write with a 4xx that is not 404/429 (e.g. 422)."""


class _HTTPStatus(Exception):
    """A non-2xx answer to one of our own (non-pydrime) requests."""

    def __init__(self, status, headers, text):
        super().__init__(f"HTTP {status}: {text[:200]}")
        self.status = status
        self.headers = headers
        self.text = text


class _Garbled(Exception):
    """An answer that is not the JSON we expect (HTML page, truncated JSON...)."""


def parse_retry_after(value, now=None):
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


_SPACE_WORDS = re.compile(r"quota|storage space|not enough space|no space|space left|"
                          r"insufficient|exhausted", re.IGNORECASE)


def _status_failure(status, headers, message):
    retry_after = parse_retry_after(headers.get("Retry-After")) if headers is not None else None
    if status == 429 or status == 408:
        return _Failure("retry", message, status, retry_after)
    if status == 507 or (400 <= status < 500 and status != 404 and _SPACE_WORDS.search(message)):
        return _Failure("space", message, status)
    if status >= 500:
        return _Failure("retry", message, status, retry_after)
    if status == 404:
        return _Failure("missing", message, status)
    return _Failure("fatal", message, status)


def classify(exc, httpx_module, pydrime_module):
    """Map an exception from pydrime or httpx to a _Failure, or None when it
    is not a Drime/HTTP problem (a bug: let it propagate)."""
    if isinstance(exc, _Missing):
        return _Failure("missing", str(exc), 404)
    if isinstance(exc, _Rejected):
        return _Failure("fatal", str(exc))
    if isinstance(exc, _Garbled):
        return _Failure("retry", str(exc))
    if isinstance(exc, _HTTPStatus):
        return _status_failure(exc.status, exc.headers, str(exc))
    # walk the chain: pydrime wraps httpx errors (and its own) in other errors
    chain, seen = [], set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, httpx_module.HTTPStatusError):
            response = e.response
            text = ""
            try:
                text = response.text[:200]
            except Exception:  # a streamed body that was never read
                pass
            return _status_failure(response.status_code, response.headers,
                                   f"HTTP {response.status_code} {text}".strip())
    errors = pydrime_module
    for e in chain:
        if isinstance(e, (httpx_module.RequestError, httpx_module.StreamError)):
            return _Failure("retry", f"network error: {type(e).__name__}: {e}")
        if isinstance(e, errors.DrimeRateLimitError):
            return _Failure("retry", str(e), 429)
        if isinstance(e, errors.DrimeNetworkError):
            return _Failure("retry", str(e))
        if isinstance(e, errors.DrimeNotFoundError):
            return _Failure("missing", str(e), 404)
        if isinstance(e, errors.DrimePermissionError):
            return _Failure("fatal", f"permission denied: {e}", 403)
        if isinstance(e, errors.DrimeAuthenticationError):
            # pydrime also raises this for a 200 answer with an HTML page (a
            # maintenance page or a captive portal): that one is worth a retry
            if e.__cause__ is None:
                return _Failure("retry", "HTML page instead of JSON")
            return _Failure("fatal", "API key rejected (401)", 401)
        if isinstance(e, errors.DrimeInvalidResponseError):
            return _Failure("retry", str(e))
    if isinstance(exc, errors.DrimeAPIError):
        # e.g. DrimeUploadError("Upload failed: ...") without a status: retry
        return _Failure("retry", str(exc))
    return None


# =============================================================================
# The map
# =============================================================================


class _Entry:
    """A file as the map knows it: the entry id, its size, and the ids of
    other entries with the same name (old duplicates, newest wins)."""

    __slots__ = ("id", "size", "seq", "dups", "mtime")

    def __init__(self, entry_id, size, seq=0, dups=(), mtime=0.0):
        self.id = entry_id
        self.size = size
        self.seq = seq  # > 0: written by this process at that sequence number
        self.dups = tuple(dups)
        self.mtime = mtime


class _Folder:
    """A folder path with the Drime folder ids that hold it (normally one;
    several same-named sibling folders, as older tools made, are one folder)."""

    __slots__ = ("path", "ids", "files", "children", "loaded_at", "tree_loaded_at",
                 "tombstones", "load_lock", "seq")

    def __init__(self, path, ids, seq=0):
        self.path = path
        self.ids = list(ids)
        self.files = {}  # name -> _Entry
        self.children = {}  # name -> _Folder
        self.loaded_at = None  # monotonic start time of the last complete listing
        self.tree_loaded_at = None  # data folder: all data/xx listed at this time
        self.tombstones = {}  # name -> (seq, monotonic time) of our deletes
        self.load_lock = threading.Lock()
        self.seq = seq  # > 0: created by this process

    @property
    def id(self):
        return self.ids[0]

    def mark_new(self, now):
        """A folder we just created: known to be empty."""
        self.loaded_at = now
        self.tree_loaded_at = now


def _entry_mtime(row):
    for key in ("updated_at", "created_at"):
        value = row.get(key)
        if isinstance(value, str) and len(value) >= 19:
            try:
                when = datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
            except ValueError:
                continue
            return when.replace(tzinfo=timezone.utc).timestamp()
    return 0.0


def _valid_name(folder_kind, name, xx=None):
    """Names restic can use in a folder (others are never listed to restic)."""
    if folder_kind == "repo":
        return name == "config"
    if not _HEX_ID.match(name):
        return False
    return xx is None or name.startswith(xx)


# =============================================================================
# Reader and upload
# =============================================================================


class DrimeReader(core.ObjectReader):
    def __init__(self, provider, folder, kind, name, entry):
        self.provider = provider
        self.folder = folder
        self.kind = kind
        self.name = name
        self.entry = entry
        self.size = entry.size

    def iter_range(self, start, length, chunk_size=CHUNK_SIZE):
        return self.provider._download(self, start, length, chunk_size)


class DrimeUpload(core.Upload):
    """Spools the body to a private temp file; commit uploads and confirms it."""

    def __init__(self, provider, repo, kind, name, length):
        self.provider = provider
        self.repo = repo
        self.kind = kind
        self.name = name
        self.length = length
        self.written = 0
        self.dir = None
        self.fd = None
        self.done = False
        try:
            self.dir = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-",
                                        dir=provider.spool_dir)
            # the file is named like the object: pydrime's multipart upload names
            # the entry after the local file
            self.path = os.path.join(self.dir, name)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                              | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            self.abort()
            raise core.storage_error(exc, "spool upload") from None

    def write(self, chunk):
        view = memoryview(chunk)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                raise core.storage_error(exc, "spool upload") from None
            view = view[n:]
            self.written += n

    def commit(self):
        try:
            if self.done:
                raise StorageError("upload already finished")
            os.close(self.fd)
            self.fd = None
            if self.length is not None and self.written != self.length:
                raise StorageError(f"upload of {self.name}: got {self.written} bytes, "
                                   f"expected {self.length}")
            self.provider._publish(self.repo, self.kind, self.name, self.path, self.written)
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
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)


# =============================================================================
# The provider
# =============================================================================


class DrimeStorageProvider(core.StorageProvider):
    name = "drime"

    def __init__(self, client, *, workspace_id=0, root_folder="", page_size=1000, retries=5,
                 retry_delay=1.0, max_retry_wait=60.0, connections=8,
                 multipart_threshold=30 * MiB, part_size=16 * MiB, spool_dir=None,
                 timeout=60.0, log=None, debug=False, pydrime_module=None, httpx_module=None):
        self.pydrime = pydrime_module or import_pydrime()
        if httpx_module is None:
            import httpx as httpx_module
        self.httpx = httpx_module
        self.client = client
        self.workspace_id = workspace_id
        self.root_path = tuple(p for p in root_folder.split("/") if p)
        self.page_size = page_size
        self.retries = retries
        self.retry_delay = retry_delay
        self.max_retry_wait = max_retry_wait
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.spool_dir = spool_dir
        self.timeout = timeout
        self.log = log or (lambda message: None)
        self.debug = debug
        self.slots = threading.BoundedSemaphore(max(1, connections))
        self.lock = threading.RLock()  # guards every map structure
        self._locks = {}
        self._locks_guard = threading.Lock()
        self._seq = 0
        self.root = _Folder((), [0])
        self.multi_parent = None  # unknown until probed
        self._health_ok_until = 0.0
        self._warned = set()
        self._s3_http = None

    # -- small helpers ---------------------------------------------------------------
    def _next_seq(self):
        with self.lock:
            self._seq += 1
            return self._seq

    @contextlib.contextmanager
    def _locked(self, key):
        """A lock per key (folder path or object), dropped when nobody holds it."""
        with self._locks_guard:
            item = self._locks.get(key)
            if item is None:
                item = self._locks[key] = [threading.Lock(), 0]
            item[1] += 1
        try:
            with item[0]:
                yield
        finally:
            with self._locks_guard:
                item[1] -= 1
                if item[1] == 0:
                    del self._locks[key]

    def _debug(self, message):
        if self.debug:
            self.log(f"drime: {message}")

    def _warn_once(self, key, message):
        with self.lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.log(f"WARNING: drime: {message}")

    def _wait(self, attempt, failure, what):
        delay = self.retry_delay * (2 ** attempt)
        delay = min(delay, self.max_retry_wait) * random.uniform(0.75, 1.25)
        if failure.retry_after is not None:
            delay = max(min(failure.retry_after, self.max_retry_wait), 0.0)
        self._debug(f"{what}: {failure} (retry {attempt + 1}/{self.retries} "
                    f"in {delay:.2f}s)")
        if delay > 0:
            time.sleep(delay)

    def _raise(self, failure, what):
        cls = InsufficientStorage if failure.kind == "space" else StorageError
        exc = cls(f"drime {what}: {failure}")
        exc.failure = failure
        raise exc

    def _classify(self, exc):
        return classify(exc, self.httpx, self.pydrime)

    def _call(self, what, fn, *args, check=None, reconcile=None, retries=None, **kwargs):
        """Run one Drime call with retries.

        ``check(result)`` raises _Garbled for an answer of the wrong shape (retried);
        ``reconcile()`` runs before each retry and returns a result if an earlier
        try took effect after all (its response was lost), else None.  A "missing"
        answer raises _Missing; other failures StorageError/InsufficientStorage.
        """
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                with self.slots:
                    result = fn(*args, **kwargs)
                if check is not None:
                    check(result)
                return result
            except Exception as exc:
                failure = self._classify(exc)
                if failure is None:
                    raise
                if failure.kind == "missing":
                    raise _Missing(f"{what}: {failure}") from None
                if failure.kind != "retry" or attempt >= retries:
                    self._raise(failure, what)
            self._wait(attempt, failure, what)
            attempt += 1
            if reconcile is not None:
                result = reconcile()
                if result is not None:
                    return result

    # -- listings --------------------------------------------------------------------
    @staticmethod
    def _check_page(result):
        if not isinstance(result, dict) or not isinstance(result.get("data"), list):
            raise _Garbled(f"unexpected listing answer: {str(result)[:200]}")

    def _list_children(self, parent_ids, what, strict=True):
        """Every live entry whose parent is one of ``parent_ids`` (0 = workspace
        root), following the pages to the end whatever page size the service
        applies."""
        wanted = set(parent_ids)
        rows = {}
        page = 1
        while True:
            result = self._call(
                f"list {what} (page {page})", self.client.get_file_entries,
                per_page=self.page_size, page=page, parent_ids=list(parent_ids),
                workspace_id=self.workspace_id, check=self._check_page)
            data = result["data"]
            for row in data:
                if not (isinstance(row, dict) and isinstance(row.get("id"), int)
                        and isinstance(row.get("name"), str) and isinstance(row.get("type"), str)):
                    raise StorageError(f"drime list {what}: malformed entry {str(row)[:200]}")
                if row.get("deleted_at"):
                    continue
                parent = row.get("parent_id") or 0
                if parent not in wanted:
                    if strict:
                        raise StorageError(
                            f"drime list {what}: the service returned an entry of folder "
                            f"{parent}, not of {sorted(wanted)} (parentIds ignored?)")
                    row = dict(row, _foreign=True)
                rows[row["id"]] = row
            last = result.get("last_page")
            current = result.get("current_page", page)
            if not data:
                break
            if isinstance(last, int) and isinstance(current, int):
                if current >= last:
                    break
            elif "next_page" in result and not result.get("next_page"):
                break
            page += 1
            if page > 1_000_000:
                raise StorageError(f"drime list {what}: endless pagination")
        return list(rows.values())

    def _apply_listing(self, folder, rows, seq0, started):
        """Replace a folder's files and subfolders by a fresh listing, keeping
        what this process wrote or deleted while the listing was under way."""
        files, subs = {}, {}
        for row in sorted(rows, key=lambda r: r["id"]):
            if row["type"] == "folder":
                subs.setdefault(row["name"], []).append(row["id"])
            else:
                size = row.get("file_size")
                files.setdefault(row["name"], []).append(
                    (row["id"], size if isinstance(size, int) else 0, _entry_mtime(row)))
        with self.lock:
            now = time.monotonic()
            new_files = {}
            for name, found in files.items():
                tomb = folder.tombstones.get(name)
                if tomb is not None and tomb[0] > seq0:
                    continue  # we deleted it while the listing ran
                entry_id, size, mtime = found[-1]  # several: the newest wins
                old = folder.files.get(name)
                new_files[name] = _Entry(entry_id, size,
                                         old.seq if old is not None and old.id == entry_id else 0,
                                         [f[0] for f in found[:-1]], mtime)
                if len(found) > 1:
                    self._warn_once(("dup", folder.path, name),
                                    f"{len(found)} entries named {'/'.join(folder.path + (name,))}"
                                    f"; using the newest (id {entry_id})")
            for name, entry in folder.files.items():
                if name not in new_files and entry.seq > seq0:
                    tomb = folder.tombstones.get(name)
                    if tomb is None or tomb[0] < entry.seq:
                        new_files[name] = entry  # we wrote it while the listing ran
            folder.files = new_files
            new_children = {}
            for name, ids in subs.items():
                child = folder.children.get(name)
                if child is None:
                    child = _Folder(folder.path + (name,), ids)
                elif sorted(child.ids) != sorted(ids):
                    if child.seq > seq0:
                        ids = sorted(set(ids) | set(child.ids))
                    child.ids = ids
                    child.loaded_at = child.tree_loaded_at = None  # listing covers new ids
                if len(ids) > 1:
                    self._warn_once(("dupdir", child.path),
                                    f"{len(ids)} folders named {'/'.join(child.path)}; "
                                    "treating them as one")
                new_children[name] = child
            for name, child in folder.children.items():
                if name not in new_children and child.seq > seq0:
                    new_children[name] = child  # created while the listing ran
            folder.children = new_children
            folder.loaded_at = started
            for name, (seq, when) in list(folder.tombstones.items()):
                if now - when > _TOMBSTONE_SECONDS:
                    del folder.tombstones[name]

    def _load(self, folder, newer_than=None):
        """List one folder (all its ids) into the map.  With ``newer_than``, do
        nothing if a listing that started at or after that time completed."""
        with folder.load_lock:
            if (newer_than is not None and folder.loaded_at is not None
                    and folder.loaded_at >= newer_than):
                return
            seq0 = self._next_seq()
            started = time.monotonic()
            what = "/".join(folder.path) or "workspace root"
            if len(folder.ids) > 1 and not self.multi_parent:
                rows = []
                for folder_id in list(folder.ids):
                    rows.extend(self._list_children([folder_id], what))
            else:
                rows = self._list_children(folder.ids, what)
            self._apply_listing(folder, rows, seq0, started)

    def _load_data_tree(self, data, newer_than=None):
        """List ``data`` and every ``data/xx`` folder in it."""
        with data.load_lock:
            if (newer_than is not None and data.tree_loaded_at is not None
                    and data.tree_loaded_at >= newer_than):
                return
            seq0 = self._next_seq()
            started = time.monotonic()
            rows = self._list_children(data.ids, "/".join(data.path))
            self._apply_listing(data, rows, seq0, started)
            with self.lock:
                subs = list(data.children.values())
            if not subs:
                data.tree_loaded_at = started
                return
            if len(subs) > 1 and self.multi_parent is None:
                self._probe_multi_parent(data)
            if self.multi_parent:
                by_parent = {}
                for sub in subs:
                    for i in sub.ids:
                        by_parent[i] = sub
                ids = list(by_parent)
                found = {id(sub): [] for sub in subs}
                seq1 = self._next_seq()
                started1 = time.monotonic()
                for n in range(0, len(ids), 256):
                    group = ids[n:n + 256]
                    for row in self._list_children(group, "/".join(data.path) + "/*"):
                        found[id(by_parent[row.get("parent_id") or 0])].append(row)
                for sub in subs:
                    with sub.load_lock:
                        self._apply_listing(sub, found[id(sub)], seq1, started1)
            else:
                for sub in subs:
                    self._load(sub, newer_than=started)
            data.tree_loaded_at = started

    def _probe_multi_parent(self, data):
        """Does the service honour several ``parentIds`` in one listing?  Ask for
        the children of the repository folder and of its ``data`` folder together
        (both have some): children of both must come back, and nothing else."""
        with self.lock:
            repo = self.root
            for name in data.path[:-1]:
                repo = repo.children.get(name) if repo is not None else None
        if repo is None:
            return
        probe_ids = [repo.id, data.id]
        try:
            rows = self._list_children(probe_ids, "probe: several parentIds", strict=False)
        except StorageError as exc:
            self.log(f"drime: probing several parentIds per listing failed ({exc})")
            return  # try again next time; this listing goes folder by folder
        parents = {row.get("parent_id") or 0 for row in rows}
        ok = (not any(row.get("_foreign") for row in rows) and parents == set(probe_ids))
        self.multi_parent = ok
        self.log("drime: the service " + ("honours" if ok else "does not honour")
                 + " several parentIds per listing"
                 + ("" if ok else "; listing data/xx folders one by one"))

    # -- folders ---------------------------------------------------------------------
    def _child(self, parent, name, *, create=False, relist_on_miss=True, since=None):
        """The subfolder ``name`` of ``parent`` (None if it does not exist)."""
        with self.lock:
            child = parent.children.get(name)
            cold = parent.loaded_at is None
        if child is not None:
            return child
        if cold:
            self._load(parent)
        elif relist_on_miss:
            self._load(parent, newer_than=since if since is not None else time.monotonic())
        else:
            pass
        with self.lock:
            child = parent.children.get(name)
        if child is not None or not create:
            return child
        return self._create_child(parent, name)

    def _create_child(self, parent, name):
        path = parent.path + (name,)
        with self._locked(("folder",) + path):
            with self.lock:
                child = parent.children.get(name)
            if child is not None:
                return child
            parent_id = parent.id

            def reconcile():
                self._load(parent)
                with self.lock:
                    return parent.children.get(name)

            def check(result):
                if not isinstance(result, dict) or not isinstance(result.get("folder"), dict) \
                        or not isinstance(result["folder"].get("id"), int):
                    raise _Garbled(f"unexpected answer to folder creation: {str(result)[:200]}")

            try:
                result = self._call(f"create folder {'/'.join(path)}", self.client.create_folder,
                                    name=name, parent_id=parent_id or None,
                                    workspace_id=self.workspace_id, check=check,
                                    reconcile=reconcile)
            except _Missing:
                self._forget_folder(parent)
                raise StorageError(f"drime: folder {'/'.join(parent.path)} vanished") from None
            if isinstance(result, _Folder):
                return result  # an earlier try had created it
            row = result["folder"]
            if row.get("name") != name or ("parent_id" in row
                                            and (row.get("parent_id") or 0) != parent_id):
                # renamed ("x (1)"): someone else created it meanwhile
                self._delete_ids([row["id"]], f"misnamed folder {row.get('name')!r}")
                self._load(parent)
                with self.lock:
                    child = parent.children.get(name)
                if child is None:
                    raise StorageError(f"drime: cannot create folder {'/'.join(path)}")
                return child
            seq = self._next_seq()
            with self.lock:
                child = _Folder(path, [row["id"]], seq)
                child.mark_new(time.monotonic())
                parent.children[name] = child
            self._debug(f"created folder {'/'.join(path)} (id {row['id']})")
            return child

    def _forget_folder(self, folder):
        """A folder id turned out not to work (deleted or trashed by someone
        else): drop it from the map; its parent is listed again on next use."""
        with self.lock:
            folder.loaded_at = folder.tree_loaded_at = None
            folder.files = {}
            folder.children = {}
            parent = self.root
            for name in folder.path[:-1]:
                parent = parent.children.get(name)
                if parent is None:
                    return
            if folder.path and parent.children.get(folder.path[-1]) is folder:
                del parent.children[folder.path[-1]]
            parent.loaded_at = parent.tree_loaded_at = None

    def _walk(self, path, *, create=False, relist_on_miss=True, since=None):
        node = self.root
        for name in path:
            node = self._child(node, name, create=create, relist_on_miss=relist_on_miss,
                               since=since)
            if node is None:
                return None
        return node

    def _repo_folder(self, repo, *, create=False, relist_on_miss=True, since=None):
        return self._walk(self.root_path + tuple(repo), create=create,
                          relist_on_miss=relist_on_miss, since=since)

    def _object_folder(self, repo, kind, name, *, create=False, relist_on_miss=True,
                       since=None):
        """The folder holding an object, loaded; None if it does not exist."""
        folder = self._repo_folder(repo, relist_on_miss=relist_on_miss, since=since)
        if folder is None:
            raise NotFound("repository does not exist")
        if kind == "config":
            if folder.loaded_at is None:
                self._load(folder)
            return folder
        folder = self._child(folder, kind, create=create, relist_on_miss=relist_on_miss,
                             since=since)
        if folder is None:
            return None
        if kind == "data":
            data = folder
            if data.tree_loaded_at is None and not create:
                self._load_data_tree(data)
            folder = self._child(data, name[:2], create=create, relist_on_miss=relist_on_miss,
                                 since=since)
            if folder is None:
                return None
        if folder.loaded_at is None:
            self._load(folder)
        return folder

    # -- lookups ---------------------------------------------------------------------
    def _lookup(self, repo, kind, name, relist_on_miss=True):
        since = time.monotonic()
        folder = self._object_folder(repo, kind, name, relist_on_miss=relist_on_miss, since=since)
        if folder is None:
            raise NotFound(f"{kind}/{name}")
        with self.lock:
            entry = folder.files.get(name)
        if entry is None and relist_on_miss:
            self._load(folder, newer_than=since)
            with self.lock:
                entry = folder.files.get(name)
        if entry is None:
            raise NotFound(f"{kind}/{name}")
        return folder, entry

    # -- protocol ----------------------------------------------------------------------
    def create_repo(self, repo):
        created = False
        node = self.root
        since = time.monotonic()
        # a miss re-lists before creating: another server may have made the folder
        for name in self.root_path + tuple(repo):
            child = self._child(node, name, since=since)
            if child is None:
                child = self._create_child(node, name)
                created = True
            node = child
        for kind in OBJECT_TYPES:
            child = self._child(node, kind, since=since)
            if child is None:
                self._create_child(node, kind)
                created = True
        return created

    def stat(self, repo, kind, name):
        # A miss re-lists the folder before answering 404.
        return self._lookup(repo, kind, name, relist_on_miss=True)[1].size

    def stat_before_save(self, repo, kind, name):
        """``stat`` for the upload path: trusts the map on a miss (the upload
        itself is checked), which keeps an upload at one API call."""
        return self._lookup(repo, kind, name, relist_on_miss=False)[1].size

    def open_object(self, repo, kind, name):
        folder, entry = self._lookup(repo, kind, name)
        return DrimeReader(self, folder, kind, name, entry)

    def begin_save(self, repo, kind, name, length=None):
        if self._repo_folder(repo) is None:
            raise NotFound("repository does not exist")
        return DrimeUpload(self, repo, kind, name, length)

    def delete(self, repo, kind, name):
        since = time.monotonic()
        folder = self._object_folder(repo, kind, name, since=since)
        if folder is None:
            return None
        with self._locked(self._object_key(repo, kind, name)):
            with self.lock:
                entry = folder.files.get(name)
            if entry is None:
                self._load(folder, newer_than=since)
                with self.lock:
                    entry = folder.files.get(name)
            if entry is None:
                return None
            ids = [entry.id] + list(entry.dups)

            def gone():
                self._load(folder)
                with self.lock:
                    current = folder.files.get(name)
                return True if current is None or current.id not in ids else None

            self._delete_ids(ids, f"{kind}/{name}", reconcile=gone)
            seq = self._next_seq()
            with self.lock:
                current = folder.files.get(name)
                if current is not None and current.id in ids:
                    del folder.files[name]
                folder.tombstones[name] = (seq, time.monotonic())
            return entry.size

    def _delete_ids(self, ids, what, reconcile=None):
        try:
            self._call(f"delete {what}", self.client.delete_file_entries, entry_ids=list(ids),
                       delete_forever=True, workspace_id=self.workspace_id, reconcile=reconcile)
        except _Missing:
            pass  # already gone

    def list(self, repo, kind):
        since = time.monotonic()
        folder = self._repo_folder(repo, since=since)
        if folder is None:
            raise NotFound("repository does not exist")
        folder = self._child(folder, kind, since=since)
        if folder is None:
            raise NotFound(f"{kind} folder does not exist")
        items = []
        if kind == "data":
            self._load_data_tree(folder, newer_than=since)
            with self.lock:
                subs = [(xx, sub) for xx, sub in folder.children.items()]
            for xx, sub in subs:
                with self.lock:
                    files = list(sub.files.items())
                items.extend((n, e.size) for n, e in files if _valid_name("type", n, xx))
        else:
            self._load(folder, newer_than=since)
            with self.lock:
                files = list(folder.files.items())
            items.extend((n, e.size) for n, e in files if _valid_name("type", n))
        items.sort()
        return items

    # -- uploads -----------------------------------------------------------------------
    def _publish(self, repo, kind, name, path, size):
        with self._locked(self._object_key(repo, kind, name)):
            folder = self._object_folder(repo, kind, name, create=True, relist_on_miss=False)
            with self.lock:
                exists = name in folder.files
            if exists:
                raise ObjectExists(f"{kind}/{name}")
            row, folder = self._upload(repo, kind, name, path, size, folder)
            seq = self._next_seq()
            with self.lock:
                folder.files[name] = _Entry(row["id"], size, seq, (), time.time())
                folder.tombstones.pop(name, None)

    @staticmethod
    def _object_key(repo, kind, name):
        return ("object",) + tuple(repo) + (kind, name)

    def _upload(self, repo, kind, name, path, size, folder):
        """Upload with retries; return the confirmed entry (a dict with an id)
        and the folder it is in."""
        what = f"upload {'/'.join(folder.path + (name,))}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._wait(attempt - 1, last, what)
                # did an earlier try land after all (a lost response)?
                try:
                    folder = self._object_folder(repo, kind, name, create=True,
                                                 relist_on_miss=False)
                    found = self._landed(folder, name, size, kind)
                except ObjectExists:
                    raise
                except StorageError as exc:
                    last = _Failure("retry", str(exc))
                    continue
                if found is not None:
                    return found, folder
            parent_id = folder.id
            try:
                row = self._upload_once(parent_id, name, path, size)
            except Exception as exc:
                failure = self._classify(exc)
                if failure is None:
                    raise
                if failure.kind == "space":
                    self._raise(failure, what)
                if failure.kind in ("missing", "fatal") and failure.status not in (401, 403):
                    # a 404 or 422 on an upload: the folder may be gone (deleted
                    # or trashed by someone else).  Look it up again and retry.
                    self._forget_folder(folder)
                    failure = _Failure("retry", failure.message, failure.status)
                if failure.kind != "retry":
                    self._raise(failure, what)
                last = failure
                continue
            problem = self._verify(row, name, size, parent_id)
            if problem is None:
                return row, folder
            self.log(f"drime: {what}: {problem}; removing that entry")
            if isinstance(row, dict) and isinstance(row.get("id"), int):
                try:
                    self._delete_ids([row["id"]], f"bad upload of {name}")
                except StorageError:
                    pass
                if isinstance(row.get("name"), str) and row["name"] != name:
                    # the service renamed ours ("x (1)"): the name was taken
                    # meanwhile.  Same size and named by its content: that is
                    # this very object, so the upload is done; else it exists.
                    found = self._landed(folder, name, size, kind)
                    if found is not None and kind != "config":
                        return found, folder
                    raise ObjectExists(f"{kind}/{name}")
            last = _Failure("retry", problem)
        raise StorageError(f"drime {what}: failed after {self.retries + 1} tries: {last}")

    @staticmethod
    def _verify(row, name, size, parent_id):
        if not isinstance(row, dict) or not isinstance(row.get("id"), int):
            return f"unexpected answer {str(row)[:200]}"
        if row.get("name") != name:
            return f"stored as {row.get('name')!r}"
        if row.get("file_size") != size:
            return f"stored {row.get('file_size')} bytes of {size}"
        if "parent_id" in row and (row.get("parent_id") or 0) != parent_id:
            return f"stored in folder {row.get('parent_id')}, not {parent_id}"
        if "users" in row and not row["users"]:
            return "entry has no users (an incomplete upload, says pydrime)"
        return None

    def _landed(self, folder, name, size, kind):
        """After a failed try: re-list the folder; return the entry if one with
        this name and size is there (extra copies are deleted), else None.  An
        entry with this name and another size is a partial upload of an earlier
        try and is deleted, except for ``config``, which is never deleted here
        (ObjectExists)."""
        self._load(folder)
        with self.lock:
            entry = folder.files.get(name)
        if entry is None:
            return None
        if entry.size == size:
            if entry.dups:
                self._delete_ids(list(entry.dups), f"duplicate uploads of {name}")
                with self.lock:
                    current = folder.files.get(name)
                    if current is not None and current.id == entry.id:
                        current.dups = ()
            return {"id": entry.id, "name": name, "file_size": size}
        if kind == "config":
            raise ObjectExists("config")
        self._delete_ids([entry.id] + list(entry.dups), f"partial upload of {name}")
        with self.lock:
            current = folder.files.get(name)
            if current is not None and current.id == entry.id:
                del folder.files[name]
        return None

    def _upload_once(self, parent_id, name, path, size):
        if size > self.multipart_threshold:
            result = self._upload_multipart(parent_id, name, path, size)
        else:
            with self.slots:
                result = self._upload_simple(parent_id, name, path)
        if not isinstance(result, dict) or not isinstance(result.get("fileEntry"), dict):
            raise _Garbled(f"unexpected upload answer: {str(result)[:200]}")
        return result["fileEntry"]

    def _upload_multipart(self, parent_id, name, path, size):
        """The presigned multipart flow (as pydrime's upload_file_multipart does
        it), with each part streamed from the spool file instead of read into
        memory, and sent through one shared client without the API key.

        create -> batch-sign-part-urls (10 parts per call) -> PUT parts ->
        complete -> s3/entries.  Part PUTs and signing are retried here; any
        other failure fails this try (the caller checks whether it landed)."""
        raw = self.client._request  # pydrime's JSON call (no retries: max_retries=0)

        def api(*args, **kwargs):
            with self.slots:
                return raw(*args, **kwargs)

        meta = {"filename": name, "mime": "application/octet-stream", "size": size,
                "extension": "", "relativePath": name, "workspaceId": self.workspace_id}
        if parent_id:
            meta["parentId"] = parent_id
        created = api("POST", "/s3/multipart/create", json=meta)
        upload_id = created.get("uploadId") if isinstance(created, dict) else None
        key = created.get("key") if isinstance(created, dict) else None
        if not upload_id or not isinstance(key, str):
            raise _Garbled(f"unexpected multipart answer: {str(created)[:200]}")
        parts = []
        try:
            count = max(1, -(-size // self.part_size))
            for first in range(1, count + 1, 10):
                numbers = list(range(first, min(count, first + 9) + 1))

                def check(result):
                    urls = result.get("urls") if isinstance(result, dict) else None
                    if not isinstance(urls, list):
                        raise _Garbled(f"unexpected answer to part signing: {str(result)[:200]}")

                signed = self._call(f"sign parts of {name}", raw, "POST",
                                    "/s3/multipart/batch-sign-part-urls", check=check,
                                    json={"key": key, "uploadId": upload_id,
                                          "partNumbers": numbers})
                urls = {u.get("partNumber"): u.get("url") for u in signed["urls"]
                        if isinstance(u, dict)}
                for number in numbers:
                    if not urls.get(number):
                        raise _Garbled(f"no signed URL for part {number}")
                    offset = (number - 1) * self.part_size
                    length = min(self.part_size, size - offset)
                    etag = self._call(f"part {number} of {name}", self._put_part,
                                      urls[number], path, offset, length)
                    parts.append({"PartNumber": number, "ETag": etag})
            api("POST", "/s3/multipart/complete",
                json={"key": key, "uploadId": upload_id, "parts": parts})
        except BaseException:
            try:
                api("POST", "/s3/multipart/abort", json={"key": key, "uploadId": upload_id})
            except Exception:
                pass
            raise
        entry = {"clientMime": "application/octet-stream", "clientName": name,
                 "filename": key.split("/")[-1], "size": size, "clientExtension": "",
                 "relativePath": name, "workspaceId": self.workspace_id}
        if parent_id:
            entry["parentId"] = parent_id
        return api("POST", "/s3/entries", json=entry)

    def _storage_http(self):
        """An HTTP client for presigned storage URLs: no Drime API key on them."""
        with self.lock:
            if self._s3_http is None:
                self._s3_http = self.httpx.Client(
                    timeout=self.httpx.Timeout(max(self.timeout, 120.0), connect=10.0))
            return self._s3_http

    def _put_part(self, url, path, offset, length):
        def body():
            with open(path, "rb") as f:
                f.seek(offset)
                left = length
                while left > 0:
                    chunk = f.read(min(256 * 1024, left))
                    if not chunk:
                        raise StorageError("spool file shrank")
                    left -= len(chunk)
                    yield chunk

        response = self._storage_http().put(
            url, content=body(), headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(length)})
        if response.status_code >= 300:
            raise _HTTPStatus(response.status_code, response.headers, response.text)
        return response.headers.get("ETag", "").strip('"')

    def _upload_simple(self, parent_id, name, path):
        """``POST /uploads`` with the object's name (pydrime's upload_file_simple
        loses the status code, so Retry-After and 404 could not be told apart)."""
        fields = {"relativePath": name, "workspaceId": str(self.workspace_id)}
        if parent_id:
            fields["parentId"] = str(parent_id)
        http = self.client._get_client()
        with open(path, "rb") as fh:
            response = http.post(f"{self.client.api_url}/uploads",
                                 files={"file": (name, fh, "application/octet-stream")},
                                 data=fields, timeout=max(self.timeout, 120.0))
        return self._json_answer(response)

    @staticmethod
    def _json_answer(response):
        if response.status_code >= 400:
            raise _HTTPStatus(response.status_code, response.headers, response.text)
        if "application/json" not in response.headers.get("Content-Type", ""):
            raise _Garbled(f"non-JSON answer ({response.headers.get('Content-Type')})")
        try:
            return response.json()
        except ValueError:
            raise _Garbled("invalid JSON answer") from None

    # -- downloads ---------------------------------------------------------------------
    def _open_download(self, entry_id, start, end, size):
        """One GET of bytes [start, end); returns (response, bytes to skip)."""
        url = f"{self.client.api_url}/file-entries/download/" \
              f"{self.pydrime.calculate_drime_hash(entry_id)}"
        ranged = start > 0 or end < size
        headers = {"Range": f"bytes={start}-{end - 1}"} if ranged else {}
        http = self.client._get_client()
        request = http.build_request("GET", url, headers=headers, timeout=self.timeout)
        response = http.send(request, stream=True)
        try:
            status = response.status_code
            if status >= 400:
                response.read()
                raise _HTTPStatus(status, response.headers, response.text)
            if status == 206:
                m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*",
                                 response.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
                    raise _Garbled(f"wrong Content-Range {response.headers.get('Content-Range')!r}"
                                   f" for bytes {start}-{end - 1}")
                if m.group(3) != "*" and int(m.group(3)) != size:
                    raise _Garbled(f"object is {m.group(3)} bytes, expected {size}")
                return response, 0
            if status == 200:
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != size \
                        and "Content-Encoding" not in response.headers:
                    raise _Garbled(f"object is {length} bytes, expected {size}")
                if ranged:
                    self._warn_once("norange", "the download URL ignored a Range header; "
                                    "ranged reads download from the start of the object")
                return response, start
            raise _Garbled(f"unexpected download status {status}")
        except BaseException:
            response.close()
            raise

    def _download(self, reader, start, length, chunk_size):
        """Yield bytes [start, start+length) of an object.

        A whole content-addressed object is hashed while it streams, and its last
        chunk is held back until the hash matches the name: on a mismatch the
        client gets a cut response (and retries), never complete wrong bytes."""
        if length <= 0:
            return
        verify = (start == 0 and length == reader.entry.size and reader.kind != "config"
                  and _HEX_ID.match(reader.name))
        if not verify:
            yield from self._stream(reader, start, length, chunk_size)
            return
        hasher = hashlib.sha256()
        pending = None
        for chunk in self._stream(reader, start, length, chunk_size):
            hasher.update(chunk)
            if pending is not None:
                yield pending
            pending = chunk
        if hasher.hexdigest() != reader.name:
            raise StorageError(f"drime download {reader.kind}/{reader.name}: the bytes "
                               "do not match the object id")
        if pending is not None:
            yield pending

    def _stream(self, reader, start, length, chunk_size):
        """Yield bytes [start, start+length), resuming after errors."""
        entry = reader.entry
        end = start + length
        position = start
        attempt = 0
        what = f"download {reader.kind}/{reader.name}"
        while position < end:
            failure = None
            try:
                response, skip = self._open_download(entry.id, position, end, entry.size)
            except Exception as exc:
                failure = self._classify(exc)
                if failure is None:
                    raise
            else:
                progressed = False
                try:
                    for chunk in response.iter_bytes(chunk_size):
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk = chunk[skip:]
                            skip = 0
                        chunk = chunk[:end - position]
                        if not chunk:
                            break
                        position += len(chunk)
                        progressed = True
                        yield chunk
                        if position >= end:
                            break
                    if position < end:
                        failure = _Failure("retry", f"download ended at byte {position} of {end}")
                except (self.httpx.RequestError, self.httpx.StreamError) as exc:
                    failure = _Failure("retry", f"network error: {type(exc).__name__}: {exc}")
                finally:
                    response.close()
                if progressed:
                    attempt = 0
            if failure is None:
                continue
            if failure.kind == "missing":
                # the entry is gone (deleted elsewhere): forget it, the next
                # request re-lists; this one can only fail (headers are sent)
                with self.lock:
                    current = reader.folder.files.get(reader.name)
                    if current is not None and current.id == entry.id:
                        del reader.folder.files[reader.name]
                raise StorageError(f"drime {what}: the entry no longer exists")
            if failure.kind != "retry" or attempt >= self.retries:
                with self.lock:
                    reader.folder.loaded_at = None  # re-list it on the next request
                self._raise(failure, what)
            self._wait(attempt, failure, what)
            attempt += 1

    # -- the rest of the protocol -----------------------------------------------------------
    def scan(self):
        """Every object of every repository under the root folder (used for
        --max-size and --prometheus at startup): one paged listing per folder."""
        try:
            root = self._walk(self.root_path, relist_on_miss=False)
            if root is None:
                return
            yield from self._scan_folder(root, ())
        except StorageError as exc:
            raise ConfigError(f"drime: cannot scan repositories: {exc}") from None

    def _scan_folder(self, folder, repo):
        if folder.loaded_at is None:
            self._load(folder)
        with self.lock:
            children = dict(folder.children)
            files = dict(folder.files)
        is_repo = "config" in files or any(k in children for k in OBJECT_TYPES)
        if is_repo:
            if "config" in files:
                e = files["config"]
                yield (repo, "config", "config", e.size, e.mtime)
            for kind in OBJECT_TYPES:
                if kind in children:
                    for name, size in self.list(repo, kind):
                        yield (repo, kind, name, size, 0.0)
        if len(repo) < core.MAX_REPO_DEPTH:
            for name in sorted(children):
                if name not in core.RESERVED_NAMES and not name.startswith("."):
                    yield from self._scan_folder(children[name], repo + (name,))

    def recover(self):
        """Remove spool folders left by crashed servers (whose process is gone)."""
        base = self.spool_dir or tempfile.gettempdir()
        removed = 0
        try:
            names = os.listdir(base)
        except OSError:
            return 0
        for name in names:
            m = re.fullmatch(re.escape(SPOOL_PREFIX) + r"(\d+)-\w+", name)
            if not m or int(m.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # that server is still running
            except ProcessLookupError:
                pass
            except OSError:
                continue
            path = os.path.join(base, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat_module.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        return removed

    def check_health(self):
        now = time.monotonic()
        if now < self._health_ok_until:
            return
        if self.check_key(retry=False) != "ok":
            raise StorageError("drime: the API key is not accepted")
        self._health_ok_until = now + 30.0

    def check_key(self, retry=True):
        """"ok", or "rejected" when the service refuses the API key; raises
        StorageError when the service cannot be asked."""
        try:
            result = self._call("check API key", self.client.get_logged_user,
                                retries=None if retry else 0)
        except StorageError as exc:
            failure = getattr(exc, "failure", None)
            if failure is not None and failure.status in (401, 403):
                return "rejected"
            raise
        user = result.get("user") if isinstance(result, dict) else None
        return "ok" if user else "rejected"

    def close(self):
        for client in (self.client, self._s3_http):
            try:
                if client is not None:
                    client.close()
            except Exception:
                pass


# =============================================================================
# Command line
# =============================================================================


def add_arguments(group):
    group.add_argument("--workspace-id", type=int, default=None, metavar="ID",
                       help="Drime workspace (default: $DRIME_WORKSPACE_ID or 0, "
                            "the personal workspace)")
    group.add_argument("--drime-root-folder", default=None, metavar="PATH",
                       help="folder inside the workspace under which repositories live, "
                            "e.g. backups/restic (default: $DRIME_ROOT_FOLDER or the top "
                            "level of the workspace)")
    group.add_argument("--drime-api-key-file", default=None, metavar="FILE",
                       help="read the API key from FILE (default: $DRIME_API_KEY); "
                            "the key is never accepted on the command line")
    group.add_argument("--drime-page-size", type=int, default=1000, metavar="N",
                       help="entries asked for per listing page (the service may cap it)")
    group.add_argument("--drime-retries", type=int, default=5, metavar="N",
                       help="retries of a Drime call after 429, 5xx or network errors")
    group.add_argument("--drime-retry-delay", type=float, default=1.0, metavar="SECONDS",
                       help="first retry delay (doubles each time; Retry-After wins)")
    group.add_argument("--drime-max-retry-wait", type=float, default=60.0, metavar="SECONDS",
                       help="longest wait before one retry")
    group.add_argument("--drime-connections", type=int, default=8, metavar="N",
                       help="concurrent Drime API calls and uploads")
    group.add_argument("--drime-multipart-threshold", type=core.parse_size, default=30 * MiB,
                       metavar="BYTES", help="objects larger than this are uploaded in parts "
                                             "through presigned URLs")
    group.add_argument("--drime-part-size", type=core.parse_size, default=16 * MiB,
                       metavar="BYTES", help="part size of multipart uploads (streamed from "
                                             "the spool file)")
    group.add_argument("--drime-spool-dir", default=None, metavar="DIR",
                       help="where uploads are spooled before they go to Drime "
                            "(default: the system temp folder)")
    group.add_argument("--drime-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="network timeout of one Drime request")


def _api_key(args, log):
    path = getattr(args, "drime_api_key_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                if os.fstat(f.fileno()).st_mode & 0o077:
                    log(f"WARNING: --drime-api-key-file {path} is readable by other users "
                        "(chmod 600 it)")
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --drime-api-key-file {path}: "
                              f"{exc.strerror or exc}") from None
        if not key:
            raise ConfigError(f"--drime-api-key-file {path} is empty")
        return key
    key = os.environ.get("DRIME_API_KEY", "").strip()
    if not key:
        hint = (" (DRIME_USERNAME/DRIME_PASSWORD are not supported: create an API key "
                "in Drime's settings)") if os.environ.get("DRIME_USERNAME") else ""
        raise ConfigError("the drime backend needs an API key: set DRIME_API_KEY or use "
                          "--drime-api-key-file FILE" + hint)
    return key


def create_provider(args, log):
    key = _api_key(args, log)
    url = os.environ.get("DRIME_API_URL", "").strip() or DEFAULT_API_URL
    if not re.match(r"https?://[^/]+", url):
        raise ConfigError(f"DRIME_API_URL must be an http(s) URL, not {url!r}")
    workspace = args.workspace_id
    if workspace is None:
        value = os.environ.get("DRIME_WORKSPACE_ID", "0").strip() or "0"
        try:
            workspace = int(value)
        except ValueError:
            raise ConfigError(f"DRIME_WORKSPACE_ID is not a number: {value!r}") from None
    root = args.drime_root_folder
    if root is None:
        root = os.environ.get("DRIME_ROOT_FOLDER", "")
    root = "/".join(p for p in root.split("/") if p)
    if any(p in (".", "..") for p in root.split("/")):
        raise ConfigError(f"--drime-root-folder: invalid path {root!r}")
    for name, value, low in (("--drime-page-size", args.drime_page_size, 1),
                             ("--drime-retries", args.drime_retries, 0),
                             ("--drime-connections", args.drime_connections, 1),
                             ("--drime-part-size", args.drime_part_size, MiB)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}")
    spool = args.drime_spool_dir
    if spool is not None and not os.path.isdir(spool):
        raise ConfigError(f"--drime-spool-dir {spool}: not a directory")
    pydrime = import_pydrime()
    client = pydrime.DrimeClient(
        api_key=key, api_url=url.rstrip("/"), max_retries=0, retry_delay=args.drime_retry_delay,
        timeout=args.drime_timeout, s3_timeout=max(args.drime_timeout, 120.0),
        s3_max_retries=args.drime_retries, s3_retry_delay=args.drime_retry_delay)
    provider = DrimeStorageProvider(
        client, workspace_id=workspace, root_folder=root, page_size=args.drime_page_size,
        retries=args.drime_retries, retry_delay=args.drime_retry_delay,
        max_retry_wait=args.drime_max_retry_wait, connections=args.drime_connections,
        multipart_threshold=args.drime_multipart_threshold, part_size=args.drime_part_size,
        spool_dir=spool, timeout=args.drime_timeout, log=log, debug=args.debug,
        pydrime_module=pydrime)
    try:
        verdict = provider.check_key(retry=False)
    except StorageError as exc:
        log(f"WARNING: drime: cannot reach {url} yet: {exc}")
    else:
        if verdict != "ok":
            raise ConfigError(f"drime: the API key was rejected by {url}")
    log(f"Drime backend: {url}, workspace {workspace}, "
        f"root folder {'/' + root if root else '(workspace top level)'}")
    return provider
