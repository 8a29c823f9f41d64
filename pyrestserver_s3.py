"""pyrestserver's S3 backend: repositories in an S3-compatible bucket.

Install with ``pip install 'pyrestserver[s3]'`` (boto3), then run::

    pyrestserver --backend s3 --s3-bucket NAME [--s3-prefix P] [--s3-endpoint URL]

Credentials come from boto3's standard chain (environment variables, shared
config and credentials files, ``--s3-profile``, container and instance roles).

Objects use restic's own S3 key layout, so a bucket written through
pyrestserver also opens with ``restic -r s3:<endpoint>/<bucket>/<prefix>``::

    <prefix>/config                  <prefix>/keys/<id>    (also locks, snapshots, index)
    <prefix>/data/<id[:2]>/<id>      <prefix>/alice/work/config ... (repo /alice/work/)

The server keeps no authoritative state: every HEAD, GET, LIST and DELETE goes
to S3, so any number of instances can serve one bucket and what one of them
acknowledged is visible to all the others at once (S3 is strongly consistent).
Uploads are spooled to an anonymous temp file while the core hashes them, then
published with one PUT carrying ``If-None-Match: *`` (atomic create, never an
overwrite) where the store honours it, or after a HEAD where it does not
(``--s3-conditional-writes``).  See docs/s3.md for request costs and deployment.
"""

import base64
import hashlib
import os
import secrets
import tempfile
import threading
import time

import boto3
import botocore
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

try:  # urllib3 is a botocore dependency; its errors can escape a streaming read
    from urllib3.exceptions import HTTPError as _Urllib3Error
except ImportError:  # pragma: no cover
    _Urllib3Error = OSError


import pyrestserver as core  # noqa: E402  (the running core: it aliases itself)

StorageError = core.StorageError
NotFound = core.NotFound
ObjectExists = core.ObjectExists
InsufficientStorage = core.InsufficientStorage
ConfigError = core.ConfigError
CHUNK_SIZE = core.CHUNK_SIZE
OBJECT_TYPES = core.OBJECT_TYPES
RESERVED_NAMES = core.RESERVED_NAMES
MAX_REPO_DEPTH = core.MAX_REPO_DEPTH

#: S3's limit for one PUT; restic's packs are at most 128 MiB.
MAX_SINGLE_PUT = 5 * 1024 ** 3
#: How often a streaming GET that broke off is resumed with a ranged GET.
READ_RESUMES = 3
#: /health asks S3 at most this often (load balancers poll every few seconds).
HEALTH_CACHE_SECONDS = 10.0
#: 409 ConditionalRequestConflict: another conditional write of the key is in
#: flight; retry (AWS's advice) this many times before calling it taken.
CONFLICT_RETRIES = 4

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_QUOTA_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "StorageFull"})
_CONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "409", "OperationAborted"})


# =============================================================================
# Command line
# =============================================================================


def add_arguments(group):
    group.add_argument("--s3-bucket", required=True, metavar="NAME",
                       help="bucket that holds the repositories (must exist)")
    group.add_argument("--s3-prefix", default="", metavar="PREFIX",
                       help="key prefix of the root repository; /alice/work/ lives under "
                            "PREFIX/alice/work/")
    group.add_argument("--s3-endpoint", default=None, metavar="URL",
                       help="S3 endpoint for S3-compatible stores, e.g. http://minio:9000 "
                            "(default: AWS, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    group.add_argument("--s3-region", default=None, metavar="REGION",
                       help="region (default: from the AWS config chain; us-east-1 for a "
                            "custom endpoint without one)")
    group.add_argument("--s3-profile", default=None, metavar="NAME",
                       help="named profile from the shared AWS config/credentials files")
    group.add_argument("--s3-addressing-style", choices=("auto", "path", "virtual"),
                       default="auto",
                       help="bucket in the path or in the host name (auto: path style with "
                            "--s3-endpoint, botocore's choice on AWS)")
    group.add_argument("--s3-conditional-writes", choices=("auto", "on", "off"), default="auto",
                       help="publish with If-None-Match: * (on), HEAD then PUT (off, not atomic "
                            "across instances), or probe the store once at startup (auto)")
    group.add_argument("--s3-storage-class", default=None, metavar="CLASS",
                       help="storage class for new objects (e.g. STANDARD_IA)")
    group.add_argument("--s3-retry-mode", choices=("standard", "adaptive"), default="standard",
                       help="botocore retry mode for throttling, 5xx and network errors")
    group.add_argument("--s3-max-attempts", type=int, default=5, metavar="N",
                       help="attempts per S3 request before the client gets a 500")
    group.add_argument("--s3-max-connections", type=int, default=64, metavar="N",
                       help="size of the HTTP connection pool to S3")
    group.add_argument("--s3-list-objects-v1", action="store_true",
                       help="list with ListObjects (v1) for stores without ListObjectsV2")
    group.add_argument("--s3-spool-dir", default=None, metavar="DIR",
                       help="where uploads are spooled before the PUT (default: the system "
                            "temp dir; needs room for every upload in flight)")


def _normalize_prefix(text):
    parts = [p for p in (text or "").split("/") if p]
    for part in parts:
        if part in (".", "..") or any(ord(c) < 32 or c == "\\" for c in part):
            raise ConfigError(f"--s3-prefix {text!r}: invalid path segment {part!r}")
    return "/".join(parts)


def create_provider(args, log):
    endpoint = args.s3_endpoint
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"--s3-endpoint {endpoint!r} must start with http:// or https://")
    if args.s3_max_attempts < 1:
        raise ConfigError("--s3-max-attempts must be at least 1")
    if args.s3_max_connections < 1:
        raise ConfigError("--s3-max-connections must be at least 1")
    spool_dir = args.s3_spool_dir
    if spool_dir is not None and not os.path.isdir(spool_dir):
        raise ConfigError(f"--s3-spool-dir {spool_dir}: not a directory")
    prefix = _normalize_prefix(args.s3_prefix)
    try:
        session = boto3.session.Session(profile_name=args.s3_profile)
    except botocore.exceptions.ProfileNotFound as exc:
        raise ConfigError(f"S3: {exc}") from None
    custom = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    region = args.s3_region or session.region_name
    if region is None and custom:
        region = "us-east-1"
    style = args.s3_addressing_style
    if style == "auto" and custom:
        style = "path"  # S3-compatible stores rarely have per-bucket host names
    client = session.client("s3", endpoint_url=endpoint, region_name=region,
                            config=make_config(args.s3_retry_mode, args.s3_max_attempts,
                                               args.s3_max_connections, style))
    provider = S3StorageProvider(
        client, args.s3_bucket, prefix=prefix, conditional_writes=args.s3_conditional_writes,
        storage_class=args.s3_storage_class, list_v1=args.s3_list_objects_v1,
        spool_dir=spool_dir,
        want_sizes=bool(args.max_size or args.max_repo_size or args.prometheus), log=log)
    where = f"s3://{args.s3_bucket}/{prefix}" + ("/" if prefix else "")
    log(f"S3 backend: {where} at {client.meta.endpoint_url} (region {client.meta.region_name})")
    provider.check_access()
    provider.setup_conditional_writes()
    return provider


def make_config(retry_mode="standard", max_attempts=5, max_connections=64, addressing="auto"):
    """botocore settings: retries, pool, timeouts, and checksums only where
    required (botocore >= 1.36 otherwise adds CRC32 checksums that some
    S3-compatible stores reject)."""
    options = dict(
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},
        max_pool_connections=max_connections,
        connect_timeout=10,
        read_timeout=60,
        tcp_keepalive=True,
        user_agent_extra=f"pyrestserver/{getattr(core, '__version__', '0')}",
    )
    if addressing != "auto":
        options["s3"] = {"addressing_style": addressing}
    try:
        return Config(request_checksum_calculation="when_required",
                      response_checksum_validation="when_required", **options)
    except TypeError:  # botocore < 1.36 has neither option nor the CRC default
        return Config(**options)


# =============================================================================
# Errors
# =============================================================================


def _code(exc):
    error = exc.response.get("Error", {}) if isinstance(exc, ClientError) else {}
    return str(error.get("Code", ""))


def _status(exc):
    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def s3_error(exc, what):
    """Map a botocore error to the core's exceptions.

    Only "the key is not there" becomes NotFound: restic takes a 404 to mean
    "does not exist", so a throttled, failing or unreachable store must reach
    the client as a 500 (after botocore's own retries), never as a 404.
    """
    code, status = _code(exc), _status(exc)
    if isinstance(exc, ClientError):
        if code in _NOT_FOUND_CODES:
            return NotFound(what)
        if code in _QUOTA_CODES:
            return InsufficientStorage(f"{what}: S3 {code}")
        detail = exc.response.get("Error", {}).get("Message") or ""
        return StorageError(f"{what}: S3 answered {status} {code} {detail}".rstrip())
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


_STREAM_ERRORS = (BotoCoreError, _Urllib3Error, OSError, ValueError)


# =============================================================================
# Reading
# =============================================================================


class S3ObjectReader(core.ObjectReader):
    """An object's size plus ranged GETs.

    ``body`` is an already-open GET of the whole object (small metadata files
    are fetched that way: one request); otherwise each ``iter_range`` issues a
    GET for exactly the bytes asked for.
    """

    def __init__(self, provider, key, size, body=None):
        self.provider = provider
        self.key = key
        self.size = size
        self.body = body

    def iter_range(self, start, length, chunk_size=CHUNK_SIZE):
        if length <= 0:
            self.close()
            return
        if start < 0 or start + length > self.size:
            raise StorageError(f"range {start}+{length} outside object of {self.size} bytes")
        body, self.body = self.body, None
        if body is not None and (start != 0 or length != self.size):
            body.close()  # a partial read of an object opened whole: ask for the range
            body = None
        position, end = start, start + length
        resumes = 0
        while position < end:
            try:
                if body is None:
                    body = self.provider.get_range(self.key, position, end - position, self.size)
                while position < end:
                    data = body.read(min(chunk_size, end - position))
                    if not data:
                        raise StorageError(f"GET {self.key}: body ended at byte {position}")
                    position += len(data)
                    yield data
            except StorageError:
                raise
            except _STREAM_ERRORS as exc:
                if resumes >= READ_RESUMES:
                    raise StorageError(f"GET {self.key}: {type(exc).__name__}: {exc}") from None
                resumes += 1
                time.sleep(0.2 * resumes)
            finally:
                if body is not None:
                    body.close()
                    body = None

    def close(self):
        body, self.body = self.body, None
        if body is not None:
            body.close()


# =============================================================================
# Writing
# =============================================================================


class S3Upload(core.Upload):
    """Spools to an anonymous temp file (never a whole pack in memory), then
    publishes with one PUT in ``commit``."""

    def __init__(self, provider, key, length):
        self.provider = provider
        self.key = key
        self.length = length
        self.size = 0
        try:
            self.md5 = hashlib.md5(usedforsecurity=False)
        except (TypeError, ValueError):  # FIPS builds: no MD5 at all
            self.md5 = None
        try:
            self.file = tempfile.TemporaryFile(prefix=".pyrestserver-s3-",
                                               dir=provider.spool_dir)
        except OSError as exc:
            raise core.storage_error(exc, "create spool file") from None

    def write(self, chunk):
        if self.file is None:
            raise StorageError("upload already finished")
        self.size += len(chunk)
        if self.size > MAX_SINGLE_PUT:
            raise StorageError("object larger than one S3 PUT allows (5 GiB)")
        if self.md5 is not None:
            self.md5.update(chunk)
        try:
            self.file.write(chunk)
        except OSError as exc:
            raise core.storage_error(exc, "spool upload") from None

    def commit(self):
        if self.file is None:
            raise StorageError("upload already finished")
        try:
            self.file.flush()
            self.file.seek(0)
        except OSError as exc:
            self.abort()
            raise core.storage_error(exc, "spool upload") from None
        try:
            md5 = self.md5.digest() if self.md5 is not None else None
            self.provider.publish(self.key, self.file, self.size, md5)
        finally:
            self.abort()

    def abort(self):
        spool, self.file = self.file, None
        if spool is not None:
            try:
                spool.close()
            except OSError:
                pass


# =============================================================================
# The provider
# =============================================================================


class S3StorageProvider(core.StorageProvider):
    name = "s3"

    def __init__(self, client, bucket, prefix="", conditional_writes="auto", storage_class=None,
                 list_v1=False, spool_dir=None, want_sizes=False, log=None):
        self.client = client
        self.bucket = bucket
        self.prefix = _normalize_prefix(prefix)
        self.mode = conditional_writes
        #: True: PUT with If-None-Match: *; False: HEAD, then a plain PUT.
        self.conditional = conditional_writes == "on"
        self.storage_class = storage_class
        self.list_v1 = list_v1
        self.spool_dir = spool_dir
        self.want_sizes = want_sizes
        self.log = log or (lambda message: None)
        self._health = (0.0, None)
        self._health_lock = threading.Lock()

    # -- keys ----------------------------------------------------------------
    def repo_prefix(self, repo):
        """Key prefix of a repository, with a trailing slash ('' for the bucket root)."""
        parts = ([self.prefix] if self.prefix else []) + list(repo)
        return "".join(part + "/" for part in parts)

    def key(self, repo, kind, name):
        base = self.repo_prefix(repo)
        if kind == "config":
            return base + "config"
        if kind == "data":
            return f"{base}data/{name[:2]}/{name}"
        return f"{base}{kind}/{name}"

    # -- startup ---------------------------------------------------------------
    def check_access(self):
        """One small listing: the bucket exists, the credentials work and may
        list the prefix.  Any failure stops the server with a clear message."""
        where = f"bucket {self.bucket!r}"
        try:
            self._list_page(self.repo_prefix(()), max_keys=1)
        except botocore.exceptions.NoCredentialsError:
            raise ConfigError(
                "S3: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or use --s3-profile, or an instance/container "
                "role)") from None
        except botocore.exceptions.PartialCredentialsError as exc:
            raise ConfigError(f"S3: incomplete credentials: {exc}") from None
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            if code == "NoSuchBucket" or (status == 404 and not code.startswith("NoSuchKey")):
                raise ConfigError(f"S3: {where} does not exist at "
                                  f"{self.client.meta.endpoint_url}") from None
            if code in ("PermanentRedirect", "AuthorizationHeaderMalformed",
                        "IllegalLocationConstraintException") or status == 301:
                raise ConfigError(f"S3: {where} is in another region; set --s3-region "
                                  f"({code or status})") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                        "ExpiredToken", "InvalidClientTokenId"):
                raise ConfigError(f"S3: the credentials were rejected ({code}); check "
                                  "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, --s3-profile "
                                  "and --s3-region") from None
            if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
                raise ConfigError(f"S3: access to {where} denied ({code or status}); the "
                                  "credentials need s3:ListBucket, s3:GetObject, "
                                  "s3:PutObject and s3:DeleteObject") from None
            raise ConfigError(f"S3: cannot list {where}: {status} {code}") from None
        except BotoCoreError as exc:
            raise ConfigError(f"S3: cannot reach {self.client.meta.endpoint_url}: {exc}") from None

    def conditional_put_supported_by_sdk(self):
        model = self.client.meta.service_model.operation_model("PutObject")
        return "IfNoneMatch" in model.input_shape.members

    def setup_conditional_writes(self):
        """Decide how uploads are published; in ``auto`` mode, probe once."""
        sdk = self.conditional_put_supported_by_sdk()
        if self.mode == "off":
            self.conditional = False
            self.log("S3 conditional writes off: HEAD, then PUT (not atomic across instances)")
            return
        if not sdk:
            if self.mode == "on":
                raise ConfigError("--s3-conditional-writes on needs a newer boto3/botocore "
                                  "(PutObject's IfNoneMatch parameter)")
            self.conditional = False
            self.log("S3 conditional writes: this botocore cannot send If-None-Match; "
                     "using HEAD, then PUT (not atomic across instances)")
            return
        if self.mode == "on":
            self.conditional = True
            self.log("S3 conditional writes on: PUT with If-None-Match: *")
            return
        verdict = self.probe_conditional_writes()
        self.conditional = verdict == "honoured"
        if self.conditional:
            self.log("S3 conditional writes: the store honours If-None-Match: * (atomic "
                     "create across instances)")
        else:
            self.log(f"S3 conditional writes: {verdict}; using HEAD, then PUT (not atomic "
                     "across instances; see docs/s3.md)")

    def probe_conditional_writes(self):
        """Write a probe object twice with If-None-Match: * and delete it.

        Returns "honoured" when the second PUT is refused with 412, otherwise a
        short description of what the store did.
        """
        key = f"{self.repo_prefix(())}.pyrestserver-probe-{secrets.token_hex(8)}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
        except ClientError as exc:
            return f"probe PUT failed ({_status(exc)} {_code(exc)})"
        except BotoCoreError as exc:
            return f"probe PUT failed ({exc})"
        try:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
            except ClientError as exc:
                if _code(exc) in _CONDITION_CODES or _status(exc) == 412:
                    return "honoured"
                return f"the store rejects If-None-Match ({_status(exc)} {_code(exc)})"
            except BotoCoreError as exc:
                return f"probe PUT failed ({exc})"
            return "the store ignores If-None-Match"
        finally:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                self.log(f"WARNING: could not delete probe object {key}: {exc}")

    # -- protocol --------------------------------------------------------------
    def create_repo(self, repo):
        """S3 has no folders: a repository exists once its objects do."""
        return False

    def stat(self, repo, kind, name):
        return self._head(self.key(repo, kind, name))["ContentLength"]

    def open_object(self, repo, kind, name):
        key = self.key(repo, kind, name)
        if kind == "data":
            # Packs are usually read in parts: learn the size, fetch ranges later.
            return S3ObjectReader(self, key, self.stat(repo, kind, name))
        # Metadata files are read whole: one GET gives both size and bytes.
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, f"GET {key}") from None
        return S3ObjectReader(self, key, response["ContentLength"], response["Body"])

    def get_range(self, key, start, length, size):
        """Open a GET for bytes [start, start+length) of an object of ``size``
        bytes; return a file-like body positioned at ``start``."""
        end = start + length - 1
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key,
                                              Range=f"bytes={start}-{end}")
        except (ClientError, BotoCoreError) as exc:
            if _code(exc) == "InvalidRange":
                raise StorageError(f"GET {key}: object changed size while being read") from None
            raise s3_error(exc, f"GET {key}") from None
        body = response["Body"]
        content_range = response.get("ContentRange")
        try:
            if content_range:
                # "bytes first-last/total"; some stores answer 200 with it.
                spec, _, total = content_range.partition(" ")[2].partition("/")
                first, _, last = spec.partition("-")
                if (int(first), int(last)) != (start, end) or total not in (str(size), "*"):
                    raise StorageError(f"GET {key}: asked for {start}-{end}/{size}, "
                                       f"got {content_range}")
                return body
            # No Content-Range: the store sent the whole object.
            if response.get("ContentLength") != size:
                raise StorageError(f"GET {key}: object changed size while being read")
            skip = start
            while skip:
                data = body.read(min(CHUNK_SIZE, skip))
                if not data:
                    raise StorageError(f"GET {key}: body ended early")
                skip -= len(data)
            return body
        except BaseException:
            body.close()
            raise

    def begin_save(self, repo, kind, name, length=None):
        if length is not None and length > MAX_SINGLE_PUT:
            raise StorageError("object larger than one S3 PUT allows (5 GiB)")
        return S3Upload(self, self.key(repo, kind, name), length)

    def publish(self, key, fileobj, size, md5):
        """PUT without ever replacing an existing object."""
        params = dict(Bucket=self.bucket, Key=key, Body=fileobj, ContentLength=size,
                      ContentType="application/octet-stream")
        if md5 is not None:  # S3 checks it; Object Lock buckets require it
            params["ContentMD5"] = base64.b64encode(md5).decode("ascii")
        if self.storage_class:
            params["StorageClass"] = self.storage_class
        if self.conditional:
            self._put_if_absent(params, md5)
        else:
            self._head_then_put(params)

    def _head_then_put(self, params):
        """The fallback for stores that ignore If-None-Match: not atomic, two
        instances racing on one new name may both PUT (same bytes for every
        object but config, which restic writes once, at init)."""
        key = params["Key"]
        try:
            self._head(key)
        except NotFound:
            pass
        else:
            raise ObjectExists(key)
        try:
            self.client.put_object(**params)
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, f"PUT {key}") from None

    def _put_if_absent(self, params, md5):
        key = params["Key"]
        params = dict(params, IfNoneMatch="*")
        for attempt in range(CONFLICT_RETRIES + 1):
            params["Body"].seek(0)
            try:
                self.client.put_object(**params)
                return
            except BotoCoreError as exc:
                raise s3_error(exc, f"PUT {key}") from None
            except ClientError as exc:
                code, status = _code(exc), _status(exc)
                if code in _CONDITION_CODES or status == 412:
                    retried = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                    if retried and md5 is not None and self._holds(key, md5):
                        return  # our own earlier attempt landed; its answer was lost
                    raise ObjectExists(key) from None
                if code in _CONFLICT_CODES or status == 409:
                    # another conditional write of this key is in flight
                    if attempt < CONFLICT_RETRIES:
                        time.sleep(0.1 * 2 ** attempt)
                        continue
                    raise ObjectExists(key) from None
                if code == "NotImplemented" or status == 501:
                    raise StorageError(f"PUT {key}: the store does not support If-None-Match; "
                                       "run with --s3-conditional-writes off") from None
                raise s3_error(exc, f"PUT {key}") from None

    def _head(self, key):
        """The object's HEAD response; NotFound or StorageError otherwise."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, f"HEAD {key}") from None

    def _holds(self, key, md5):
        """Does the object at ``key`` have exactly the bytes whose MD5 is given?
        (A single-part PUT's ETag is the MD5 of its bytes, unless encrypted
        with SSE-KMS/SSE-C; then this says no and the upload answers 403.)"""
        try:
            etag = self._head(key).get("ETag", "")
        except StorageError:
            return False
        return etag.strip('"').lower() == md5.hex()

    def delete(self, repo, kind, name):
        key = self.key(repo, kind, name)
        size = None
        if self.want_sizes:  # quota and metrics need the size; S3's DELETE does not tell
            try:
                size = self._head(key)["ContentLength"]
            except NotFound:
                return None
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            error = s3_error(exc, f"DELETE {key}")
            if isinstance(error, NotFound):
                return None
            raise error from None
        return size

    def list(self, repo, kind):
        """One paged, recursive listing (⌈n/1000⌉ requests, also for data/).

        A type nobody has written to (or a repository never created) lists as
        empty: S3 has no folders to tell the two apart.
        """
        base = f"{self.repo_prefix(repo)}{kind}/"
        items = []
        for key, size, _mtime in self._list(base):
            rest = key[len(base):]
            if kind == "data":
                sub, _, name = rest.partition("/")
                if len(sub) != 2 or not name or "/" in name:
                    continue
            else:
                name = rest
                if not name or "/" in name:
                    continue
            if name.startswith("."):
                continue
            items.append((name, size))
        items.sort()
        return items

    def _list_page(self, prefix, max_keys=1000, token=None):
        params = dict(Bucket=self.bucket, Prefix=prefix, MaxKeys=max_keys)
        if self.list_v1:
            if token:
                params["Marker"] = token
            return self.client.list_objects(**params)
        if token:
            params["ContinuationToken"] = token
        return self.client.list_objects_v2(**params)

    def _list(self, prefix):
        """Yield (key, size, mtime) for every key under ``prefix``."""
        token = None
        while True:
            try:
                page = self._list_page(prefix, token=token)
            except (ClientError, BotoCoreError) as exc:
                error = s3_error(exc, f"LIST {prefix}")
                if isinstance(error, NotFound):  # NoSuchKey cannot happen on a list
                    error = StorageError(f"LIST {prefix}: {exc}")
                raise error from None
            contents = page.get("Contents") or []
            for entry in contents:
                modified = entry.get("LastModified")
                yield (entry["Key"], entry.get("Size", 0),
                       modified.timestamp() if modified is not None else 0.0)
            if not page.get("IsTruncated"):
                return
            if self.list_v1:
                token = page.get("NextMarker") or (contents[-1]["Key"] if contents else None)
            else:
                token = page.get("NextContinuationToken")
            if not token:
                raise StorageError(f"LIST {prefix}: truncated listing without a continuation")

    def scan(self):
        """Every object under the prefix, for quota and metrics at startup:
        one paged listing of the whole prefix (⌈n/1000⌉ requests)."""
        base = self.repo_prefix(())
        for key, size, mtime in self._list(base):
            parsed = parse_key(key[len(base):])
            if parsed is not None:
                repo, kind, name = parsed
                yield (repo, kind, name, size, mtime)

    def check_health(self):
        """A one-key listing, at most every HEALTH_CACHE_SECONDS."""
        with self._health_lock:
            checked, error = self._health
            now = time.monotonic()
            if now - checked >= HEALTH_CACHE_SECONDS or checked == 0.0:
                try:
                    self._list_page(self.repo_prefix(()), max_keys=1)
                    error = None
                except (ClientError, BotoCoreError) as exc:
                    error = f"S3: {type(exc).__name__}: {exc}"
                self._health = (now, error)
        if error:
            raise StorageError(error)

    def close(self):
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


def parse_key(rest):
    """(repo, kind, name) for a key relative to the prefix, or None.

    Mirrors the core's router: up to MAX_REPO_DEPTH leading folders that are
    not reserved names form the repository.
    """
    parts = rest.split("/")
    repo = []
    i = 0
    while i < len(parts) - 1 and len(repo) < MAX_REPO_DEPTH and parts[i] not in RESERVED_NAMES:
        if not parts[i] or parts[i].startswith("."):
            return None
        repo.append(parts[i])
        i += 1
    tail = parts[i:]
    if tail == ["config"]:
        return tuple(repo), "config", "config"
    if len(tail) == 2 and tail[0] in OBJECT_TYPES and tail[0] != "data":
        name = tail[1]
    elif len(tail) == 3 and tail[0] == "data" and len(tail[1]) == 2:
        name = tail[2]
    else:
        return None
    if not name or name.startswith("."):
        return None
    return tuple(repo), tail[0], name
