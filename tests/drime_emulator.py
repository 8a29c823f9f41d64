"""A Drime Cloud API emulator for the tests (standard library only).

It serves the part of the Drime HTTP API that pydrime 0.8.2 and
``pyrestserver_drime`` use, on ``127.0.0.1`` port 0, from a thread of the test
process::

    emu = DrimeEmulator(max_per_page=100).start()
    ... DRIME_API_URL=emu.url (ends in /api/v1), DRIME_API_KEY=emu.api_key ...
    emu.stop()

What it models (see docs/drime.md for the API itself):

* entries (folders and files) with ids, names, sizes, ``parent_id`` (``None``
  at the workspace root, or 0 with ``root_parent_id=0``), workspaces, trash;
* ``GET /drive/file-entries``: a Laravel-style paginator, ``perPage`` capped
  at ``max_per_page``, filters ``parentIds`` (comma list, ``0`` = root; with
  ``multi_parent=False`` only the first id is honoured, like a service that
  does not support several), ``query``, ``type``, ``deletedOnly``;
* ``POST /folders``, ``POST /uploads`` (multipart/form-data), the presigned
  flows (``/s3/simple/presign`` and ``/s3/multipart/*`` then ``/s3/entries``)
  whose PUT URLs point at this same server (``/_s3/...``, no auth);
* ``GET /file-entries/download/{hash}``: streams the bytes, honours a single
  ``Range`` (unless ``honour_range=False``), optionally through a 302 redirect
  to ``/_blob/{id}`` (``redirect_downloads=True``), like a CDN;
* ``POST /file-entries/delete`` (``deleteForever`` or to the trash, recursive);
* ``GET /cli/loggedUser``, ``POST /auth/login``, ``GET /file-entries/{id}``;
* duplicate names: ``duplicate_policy`` ``"allow"`` (two entries, what
  pydrime's tests and the original backend saw), ``"rename"`` (``x (1)``) or
  ``"reject"`` (422);
* faults: ``add_fault(...)`` makes every N-th (``every``) or the next K
  (``times``) matching calls fail with a status (429 + ``Retry-After``, 500,
  ...), before or after the call took effect (``mode="after"``: the response
  is lost but the entry exists), by dropping the connection, by answering an
  HTML page with 200, by storing a short upload, or by cutting a download
  short; ``latency`` delays every API call;
* a counter of calls per endpoint (``calls``), the bytes served per download
  (``served``), and helpers to inspect or plant entries directly.
"""

import base64
import collections
import email.parser
import email.policy
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_PREFIX = "/api/v1"
#: Endpoints that are not API calls (presigned storage URLs).
STORAGE_ENDPOINTS = ("PUT /_s3", "GET /_blob")


def drime_hash(entry_id):
    return base64.b64encode(f"{entry_id}|".encode()).decode().rstrip("=")


def _unhash(value):
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4)).decode()
        return int(raw.rstrip("|"))
    except (ValueError, UnicodeDecodeError):
        return None


def _now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


class Fault:
    """One fault rule; see DrimeEmulator.add_fault."""

    def __init__(self, status=500, every=None, times=None, endpoints=None, mode="before",
                 retry_after=None, message="injected fault"):
        self.status = status
        self.every = every
        self.times = times
        self.endpoints = set(endpoints) if endpoints else None
        self.mode = mode
        self.retry_after = retry_after
        self.message = message
        self.seen = 0
        self.fired = 0

    def matches(self, endpoint):
        if self.endpoints is None:
            return not endpoint.startswith(STORAGE_ENDPOINTS)
        return endpoint in self.endpoints

    def check(self, endpoint):
        """Count a matching call; True if this one must fail."""
        if not self.matches(endpoint):
            return False
        self.seen += 1
        if self.times is not None:
            if self.fired >= self.times:
                return False
            if self.every is None or self.seen % self.every == 0:
                self.fired += 1
                return True
            return False
        if self.every and self.seen % self.every == 0:
            self.fired += 1
            return True
        return False


class _Drop(Exception):
    """Close the connection without answering."""


class DrimeEmulator:
    def __init__(self, api_key="emulator-key", max_per_page=100, duplicate_policy="allow",
                 redirect_downloads=False, honour_range=True, multi_parent=True,
                 root_parent_id=None, login=("user@example.invalid", "secret")):
        self.api_key = api_key
        self.max_per_page = max_per_page
        self.duplicate_policy = duplicate_policy
        self.redirect_downloads = redirect_downloads
        self.honour_range = honour_range
        self.multi_parent = multi_parent
        self.root_parent_id = root_parent_id
        self.login_credentials = login
        self.latency = 0.0
        self.lock = threading.RLock()
        self.entries = {}  # id -> entry dict (the JSON the API returns)
        self.blobs = {}  # file entry id -> path of its bytes
        self.s3_objects = {}  # storage key -> path (uploaded, not yet an entry)
        self.multipart = {}  # uploadId -> {"key", "parts": {n: (etag, bytes)}}
        self._ids = itertools.count(101)
        self.calls = collections.Counter()
        self.served = []  # (entry id, status, bytes sent) per download
        self.requests = []  # (method, path) of every request, in order
        self.faults = []
        self.dir = tempfile.mkdtemp(prefix="drime-emulator-")
        self.server = None
        self.thread = None

    # -- lifecycle -------------------------------------------------------------
    def start(self):
        emulator = self

        class Handler(_Handler):
            emu = emulator

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="drime-emulator")
        self.thread.start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def base(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self):
        """The API base URL (what DRIME_API_URL must be)."""
        return self.base + API_PREFIX

    # -- faults and counters ---------------------------------------------------------
    def add_fault(self, status=500, every=None, times=None, endpoints=None, mode="before",
                  retry_after=None, message="injected fault"):
        """Make matching calls fail.

        every=N: every N-th matching call; times=K: the next K matching calls (with
        every: K times, every N-th).  endpoints: names like "POST /uploads" (default:
        every API call).  mode: "before" (nothing happens, the error is returned),
        "after" (the call takes effect, then the error is returned: a lost response),
        "drop" (close the connection without a response), "html" (200 with an HTML
        page), "short" (uploads: store half the bytes and report that size),
        "truncate" (downloads: promise the full length, send half, close).
        """
        fault = Fault(status, every, times, endpoints, mode, retry_after, message)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self):
        with self.lock:
            self.faults = []

    def reset_counts(self):
        with self.lock:
            self.calls.clear()
            self.served.clear()
            self.requests.clear()

    def api_calls(self, endpoint=None):
        with self.lock:
            if endpoint is not None:
                return self.calls[endpoint]
            return sum(n for k, n in self.calls.items() if not k.startswith(STORAGE_ENDPOINTS))

    def counts(self):
        with self.lock:
            return dict(self.calls)

    # -- direct state access for tests --------------------------------------------------
    def _entry(self, name, kind, parent_id, workspace_id=0, size=0):
        entry_id = next(self._ids)
        stamp = _now()
        parent = parent_id if parent_id else self.root_parent_id
        entry = {
            "id": entry_id,
            "name": name,
            "file_name": secrets.token_hex(8) if kind != "folder" else name,
            "mime": "" if kind == "folder" else "application/octet-stream",
            "file_size": size,
            "parent_id": parent,
            "created_at": stamp,
            "updated_at": stamp,
            "deleted_at": None,
            "type": kind,
            "extension": os.path.splitext(name)[1].lstrip(".") or None,
            "hash": drime_hash(entry_id),
            "url": f"api/v1/file-entries/{entry_id}",
            "workspace_id": workspace_id,
            "owner_id": 1,
            "path": None,
            "public": False,
            "description": None,
            "thumbnail": False,
            "users": [{"id": 1, "email": self.login_credentials[0], "owns_entry": True}],
            "tags": [],
            "permissions": None,
        }
        self.entries[entry_id] = entry
        return entry

    def add_folder(self, name, parent_id=None, workspace_id=0):
        with self.lock:
            return self._entry(name, "folder", parent_id, workspace_id)

    def add_file(self, name, data, parent_id=None, workspace_id=0, kind=None):
        with self.lock:
            entry = self._entry(name, kind or self._file_kind(name), parent_id, workspace_id,
                                len(data))
            path = os.path.join(self.dir, f"blob-{entry['id']}")
            with open(path, "wb") as f:
                f.write(data)
            self.blobs[entry["id"]] = path
            return entry

    @staticmethod
    def _file_kind(name):
        # Drime gives files a kind ("file", "text", "image", ...), never "folder":
        # clients must test type != "folder".  "config" gets "text" here.
        return "text" if name == "config" else "file"

    def live(self, workspace_id=None):
        with self.lock:
            return [e for e in self.entries.values() if e["deleted_at"] is None
                    and (workspace_id is None or e["workspace_id"] == workspace_id)]

    def children(self, parent_id, workspace_id=0):
        with self.lock:
            return sorted((e for e in self.live(workspace_id)
                           if (e["parent_id"] or 0) == (parent_id or 0)),
                          key=lambda e: e["id"])

    def find(self, path, workspace_id=0):
        """The entries at a slash-separated path ([] if none); several when the
        last component has duplicates."""
        parents = [0]
        found = []
        for part in [p for p in path.split("/") if p]:
            found = [e for pid in parents for e in self.children(pid, workspace_id)
                     if e["name"] == part]
            parents = [e["id"] for e in found if e["type"] == "folder"]
        return found

    def find_one(self, path, workspace_id=0):
        found = self.find(path, workspace_id)
        assert len(found) == 1, (path, found)
        return found[0]

    def blob(self, entry_id):
        with open(self.blobs[entry_id], "rb") as f:
            return f.read()

    def duplicates(self):
        """[(parent id, name, count)] for names held by more than one live entry."""
        seen = collections.Counter((e["workspace_id"], e["parent_id"] or 0, e["name"])
                                   for e in self.live())
        return [(p, n, c) for (_, p, n), c in seen.items() if c > 1]

    def files_under(self, path, workspace_id=0):
        """{relative path: size} of every live file below a folder path."""
        out = {}
        roots = self.find(path, workspace_id) if path else [None]

        def walk(parent_id, prefix):
            for e in self.children(parent_id, workspace_id):
                rel = f"{prefix}{e['name']}"
                if e["type"] == "folder":
                    walk(e["id"], rel + "/")
                else:
                    out[rel] = e["file_size"]

        for r in roots:
            walk(r["id"] if r else 0, "")
        return out

    def delete(self, entry_id, forever=True):
        with self.lock:
            self._delete(entry_id, forever)

    # -- internals used by the handler ---------------------------------------------------
    def _fault_for(self, endpoint):
        with self.lock:
            for fault in self.faults:
                if fault.check(endpoint):
                    return fault
        return None

    def _parent_ok(self, parent_id, workspace_id):
        if not parent_id:
            return True
        parent = self.entries.get(parent_id)
        return (parent is not None and parent["type"] == "folder"
                and parent["deleted_at"] is None and parent["workspace_id"] == workspace_id)

    def _name_for(self, name, parent_id, workspace_id):
        """Apply the duplicate-name policy; None means "reject"."""
        taken = {e["name"] for e in self.children(parent_id, workspace_id)}
        if name not in taken or self.duplicate_policy == "allow":
            return name
        if self.duplicate_policy == "reject":
            return None
        stem, ext = os.path.splitext(name)
        for i in itertools.count(1):
            candidate = f"{stem} ({i}){ext}"
            if candidate not in taken:
                return candidate

    def _folder_chain(self, parent_id, parts, workspace_id):
        for part in parts:
            existing = [e for e in self.children(parent_id, workspace_id)
                        if e["name"] == part and e["type"] == "folder"]
            parent_id = (existing[0] if existing else
                         self._entry(part, "folder", parent_id, workspace_id))["id"]
        return parent_id

    def _store_file(self, name, path, parent_id, workspace_id):
        size = os.path.getsize(path)
        entry = self._entry(name, self._file_kind(name), parent_id, workspace_id, size)
        final = os.path.join(self.dir, f"blob-{entry['id']}")
        os.replace(path, final)
        self.blobs[entry["id"]] = final
        return entry

    def _delete(self, entry_id, forever):
        entry = self.entries.get(entry_id)
        if entry is None:
            return
        for child in [e for e in self.entries.values() if e["parent_id"] == entry_id]:
            self._delete(child["id"], forever)
        if forever:
            del self.entries[entry_id]
            path = self.blobs.pop(entry_id, None)
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        else:
            entry["deleted_at"] = _now()

    def _temp_path(self):
        return os.path.join(self.dir, "tmp-" + secrets.token_hex(8))


class _Handler(BaseHTTPRequestHandler):
    emu = None  # set by DrimeEmulator.start
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every keep-alive answer waits ~40 ms

    def log_message(self, format, *args):
        pass

    # -- plumbing --------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status, body=b"", content_type="application/json", headers=()):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status, obj, headers=()):
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _endpoint(self, method, path):
        if path.startswith("/_s3/"):
            return "PUT /_s3"
        if path.startswith("/_blob/"):
            return "GET /_blob"
        if not path.startswith(API_PREFIX + "/"):
            return f"{method} ?"
        rest = path[len(API_PREFIX):]
        if rest.startswith("/file-entries/download/"):
            return "GET /file-entries/download"
        if re.fullmatch(r"/file-entries/\d+", rest):
            return f"{method} /file-entries/{{id}}"
        return f"{method} {rest}"

    def _dispatch(self, method):
        emu = self.emu
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        body = self._body()
        endpoint = self._endpoint(method, path)
        with emu.lock:
            emu.calls[endpoint] += 1
            emu.requests.append((method, self.path))
        if emu.latency and not endpoint.startswith(STORAGE_ENDPOINTS):
            time.sleep(emu.latency)
        if path.startswith(API_PREFIX + "/") and endpoint != "POST /auth/login":
            if self.headers.get("Authorization") != f"Bearer {emu.api_key}":
                return self._json(401, {"message": "Unauthenticated."})
        fault = emu._fault_for(endpoint)
        if fault is not None and fault.mode == "before":
            return self._fail(fault)
        if fault is not None and fault.mode == "drop":
            self.close_connection = True
            return
        if fault is not None and fault.mode == "html":
            return self._send(200, b"<html><body>maintenance</body></html>",
                              "text/html; charset=UTF-8")
        try:
            handler = ROUTES.get(endpoint)
            if handler is None:
                return self._json(404, {"message": f"no route {method} {path}"})
            handler(self, query, body, fault)
        except _Drop:
            self.close_connection = True
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    def _fail(self, fault):
        headers = []
        if fault.retry_after is not None:
            headers.append(("Retry-After", str(fault.retry_after)))
        self._json(fault.status, {"message": fault.message}, headers)

    def _reply(self, fault, status, obj):
        """Answer, unless an "after" fault eats the response."""
        if fault is not None and fault.mode == "after":
            return self._fail(fault)
        self._json(status, obj)

    # -- routes ------------------------------------------------------------------------
    def r_list(self, q, body, fault):
        emu = self.emu
        try:
            per_page = max(1, int(q.get("perPage", 50)))
            page = max(1, int(q.get("page", 1)))
            workspace = int(q.get("workspaceId", 0))
        except ValueError:
            return self._json(422, {"message": "invalid parameters"})
        per_page = min(per_page, emu.max_per_page)
        deleted_only = q.get("deletedOnly", "").lower() in ("1", "true")
        with emu.lock:
            rows = [e for e in emu.entries.values() if e["workspace_id"] == workspace
                    and (e["deleted_at"] is not None) == deleted_only]
            if q.get("parentIds"):
                try:
                    ids = [int(x) for x in q["parentIds"].split(",") if x.strip()]
                except ValueError:
                    return self._json(422, {"message": "invalid parentIds"})
                if not emu.multi_parent:
                    ids = ids[:1]
                wanted = set(ids)
                rows = [e for e in rows if (e["parent_id"] or 0) in wanted]
            if q.get("query"):
                needle = q["query"].lower()
                rows = [e for e in rows if needle in e["name"].lower()]
            if q.get("type"):
                if q["type"] == "folder":
                    rows = [e for e in rows if e["type"] == "folder"]
                else:
                    rows = [e for e in rows if e["type"] == q["type"]]
            rows.sort(key=lambda e: (e["type"] != "folder", e["name"], e["id"]))
            total = len(rows)
            last = max(1, math.ceil(total / per_page))
            chunk = [dict(e) for e in rows[(page - 1) * per_page:page * per_page]]
        first = (page - 1) * per_page + 1 if chunk else None
        self._reply(fault, 200, {
            "current_page": page,
            "data": chunk,
            "from": first,
            "to": first + len(chunk) - 1 if chunk else None,
            "per_page": per_page,
            "total": total,
            "last_page": last,
            "next_page": page + 1 if page < last else None,
            "prev_page": page - 1 if page > 1 else None,
        })

    def r_entry(self, q, body, fault):
        emu = self.emu
        entry_id = int(self.path.split("?")[0].rstrip("/").rsplit("/", 1)[1])
        with emu.lock:
            entry = emu.entries.get(entry_id)
            entry = dict(entry) if entry and entry["deleted_at"] is None else None
        if entry is None:
            return self._json(404, {"message": "not found"})
        self._reply(fault, 200, {"fileEntry": entry, "status": "success"})

    def r_folders(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        name = data.get("name")
        workspace = int(data.get("workspaceId") or 0)
        parent = data.get("parentId")
        if not isinstance(name, str) or not name or "/" in name:
            return self._json(422, {"message": "The name field is required."})
        with emu.lock:
            if not emu._parent_ok(parent, workspace):
                return self._json(422, {"message": "The selected parent id is invalid."})
            final = emu._name_for(name, parent, workspace)
            if final is None:
                return self._json(422, {"message": "An entry with this name already exists."})
            entry = dict(emu._entry(final, "folder", parent, workspace))
        self._reply(fault, 200, {"status": "success", "folder": entry})

    def r_uploads(self, q, body, fault):
        emu = self.emu
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return self._json(422, {"message": "multipart/form-data expected"})
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
        fields, file_name, file_data = {}, None, None
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                file_name = part.get_filename()
                file_data = part.get_payload(decode=True) or b""
            elif name:
                fields[name] = part.get_payload(decode=True).decode()
        if file_name is None or file_data is None:
            return self._json(422, {"message": "The file field is required."})
        workspace = int(fields.get("workspaceId") or 0)
        parent = int(fields["parentId"]) if fields.get("parentId") else None
        if fault is not None and fault.mode == "short":
            file_data = file_data[:len(file_data) // 2]
        with emu.lock:
            if not emu._parent_ok(parent, workspace):
                return self._json(422, {"message": "The selected parent id is invalid."})
            # like the real service (as pydrime observed it): folders in relativePath
            # are created, the entry takes the uploaded file's name
            rel = fields.get("relativePath", "")
            folders = [p for p in rel.split("/")[:-1] if p]
            parent = emu._folder_chain(parent, folders, workspace) if folders else parent
            final = emu._name_for(file_name, parent, workspace)
            if final is None:
                return self._json(422, {"message": "An entry with this name already exists."})
            tmp = emu._temp_path()
            with open(tmp, "wb") as f:
                f.write(file_data)
            entry = dict(emu._store_file(final, tmp, parent, workspace))
        self._reply(fault, 200, {"status": "success", "fileEntry": entry})

    def r_presign(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        key = f"uploads/{secrets.token_hex(8)}/{secrets.token_hex(8)}"
        self._reply(fault, 200, {"url": f"{emu.base}/_s3/{key}?simple=1&sig="
                                        f"{secrets.token_hex(8)}", "key": key,
                                 "acl": "private", "size": data.get("size")})

    def r_mp_create(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        upload_id = secrets.token_hex(12)
        key = f"uploads/{secrets.token_hex(8)}/{secrets.token_hex(8)}"
        with emu.lock:
            emu.multipart[upload_id] = {"key": key, "parts": {}, "size": data.get("size")}
        self._reply(fault, 200, {"uploadId": upload_id, "key": key})

    def r_mp_sign(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        with emu.lock:
            upload = emu.multipart.get(data.get("uploadId"))
        if upload is None or upload["key"] != data.get("key"):
            return self._json(404, {"message": "no such upload"})
        urls = [{"partNumber": n,
                 "url": f"{emu.base}/_s3/{upload['key']}?uploadId={data['uploadId']}"
                        f"&partNumber={n}&sig={secrets.token_hex(8)}"}
                for n in data.get("partNumbers", [])]
        self._reply(fault, 200, {"urls": urls})

    def r_s3_put(self, q, body, fault):
        emu = self.emu
        key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path[len("/_s3/"):])
        etag = '"' + hashlib.md5(body).hexdigest() + '"'
        with emu.lock:
            if q.get("simple"):
                tmp = emu._temp_path()
                with open(tmp, "wb") as f:
                    f.write(body)
                emu.s3_objects[key] = tmp
            else:
                upload = emu.multipart.get(q.get("uploadId"))
                if upload is None or upload["key"] != key:
                    return self._send(404, b"NoSuchUpload", "application/xml")
                upload["parts"][int(q.get("partNumber", 0))] = (etag.strip('"'), body)
        if fault is not None and fault.mode == "after":
            return self._fail(fault)
        self._send(200, b"", "application/xml", [("ETag", etag)])

    def r_mp_complete(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        with emu.lock:
            upload = emu.multipart.get(data.get("uploadId"))
            if upload is None or upload["key"] != data.get("key"):
                return self._json(404, {"message": "no such upload"})
            parts = sorted(data.get("parts", []), key=lambda p: p["PartNumber"])
            tmp = emu._temp_path()
            with open(tmp, "wb") as f:
                for p in parts:
                    etag, chunk = upload["parts"].get(p["PartNumber"], (None, None))
                    if etag is None or etag != str(p.get("ETag", "")).strip('"'):
                        os.unlink(tmp)
                        return self._json(422, {"message": "invalid part"})
                    f.write(chunk)
            emu.s3_objects[upload["key"]] = tmp
            del emu.multipart[data["uploadId"]]
        self._reply(fault, 200, {"location": upload["key"]})

    def r_mp_abort(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        with emu.lock:
            emu.multipart.pop(data.get("uploadId"), None)
        self._reply(fault, 200, {"status": "success"})

    def r_s3_entries(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        workspace = int(data.get("workspaceId") or 0)
        parent = data.get("parentId")
        filename = data.get("filename")
        with emu.lock:
            key = next((k for k in emu.s3_objects if k.split("/")[-1] == filename), None)
            if key is None:
                return self._json(422, {"message": "uploaded object not found"})
            if os.path.getsize(emu.s3_objects[key]) != data.get("size"):
                return self._json(422, {"message": "size mismatch"})
            if not emu._parent_ok(parent, workspace):
                return self._json(422, {"message": "The selected parent id is invalid."})
            final = emu._name_for(data.get("clientName") or filename, parent, workspace)
            if final is None:
                return self._json(422, {"message": "An entry with this name already exists."})
            path = emu.s3_objects.pop(key)
            entry = dict(emu._store_file(final, path, parent, workspace))
        self._reply(fault, 200, {"status": "success", "fileEntry": entry})

    def r_delete(self, q, body, fault):
        emu = self.emu
        data = json.loads(body or b"{}")
        forever = bool(data.get("deleteForever"))
        with emu.lock:
            for entry_id in data.get("entryIds", []):
                emu._delete(int(entry_id), forever)
        self._reply(fault, 200, {"status": "success"})

    def r_logged_user(self, q, body, fault):
        self._reply(fault, 200, {"user": {"id": 1, "email": self.emu.login_credentials[0]}})

    def r_login(self, q, body, fault):
        data = json.loads(body or b"{}")
        if (data.get("email"), data.get("password")) != tuple(self.emu.login_credentials):
            return self._json(422, {"message": "These credentials do not match our records."})
        self._reply(fault, 200, {"status": "success",
                                 "user": {"id": 1, "access_token": self.emu.api_key}})

    def r_download(self, q, body, fault):
        emu = self.emu
        value = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[1]
        entry_id = _unhash(value)
        with emu.lock:
            entry = emu.entries.get(entry_id) if entry_id is not None else None
            ok = entry is not None and entry["type"] != "folder" and entry["deleted_at"] is None
        if not ok:
            return self._json(404, {"message": "not found"})
        if emu.redirect_downloads:
            self._send(302, b"", "text/plain",
                       [("Location", f"{emu.base}/_blob/{entry_id}?sig={secrets.token_hex(8)}")])
            return
        self._serve_blob(entry_id, fault)

    def r_blob(self, q, body, fault):
        entry_id = int(urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[1])
        with self.emu.lock:
            ok = entry_id in self.emu.blobs
        if not ok:
            return self._send(404, b"NoSuchKey", "application/xml")
        self._serve_blob(entry_id, fault)

    def _serve_blob(self, entry_id, fault):
        emu = self.emu
        with emu.lock:
            path = emu.blobs[entry_id]
        size = os.path.getsize(path)
        start, end, status = 0, size, 200
        header = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip()) if header else None
        if m and emu.honour_range and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start, end = max(0, size - int(m.group(2))), size
            if start >= size or end <= start:
                return self._send(416, b"", "application/octet-stream",
                                  [("Content-Range", f"bytes */{size}")])
            status = 206
        length = end - start
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        limit = length // 2 if fault is not None and fault.mode == "truncate" else length
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            while sent < limit:
                chunk = f.read(min(1 << 16, limit - sent))
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
        with emu.lock:
            emu.served.append((entry_id, status, sent))
        if sent < length:
            self.wfile.flush()
            raise _Drop()


ROUTES = {
    "GET /drive/file-entries": _Handler.r_list,
    "GET /file-entries/{id}": _Handler.r_entry,
    "POST /folders": _Handler.r_folders,
    "POST /uploads": _Handler.r_uploads,
    "POST /s3/simple/presign": _Handler.r_presign,
    "POST /s3/multipart/create": _Handler.r_mp_create,
    "POST /s3/multipart/batch-sign-part-urls": _Handler.r_mp_sign,
    "POST /s3/multipart/complete": _Handler.r_mp_complete,
    "POST /s3/multipart/abort": _Handler.r_mp_abort,
    "POST /s3/entries": _Handler.r_s3_entries,
    "PUT /_s3": _Handler.r_s3_put,
    "POST /file-entries/delete": _Handler.r_delete,
    "GET /cli/loggedUser": _Handler.r_logged_user,
    "POST /auth/login": _Handler.r_login,
    "GET /file-entries/download": _Handler.r_download,
    "GET /_blob": _Handler.r_blob,
}
