"""HTTP/1.1 message framing of the built-in door (raw sockets).

Request smuggling and desync: conflicting Content-Length, CL+TE, obfuscated
Transfer-Encoding, lax number parsing, bare-LF lines, bodies left unread after an
early error.  Each smuggling test hides an *observable* request — a POST that
would create the repo `smuggled/` — and asserts it never ran.

Also: strict chunked decoding, Expect: 100-continue, keep-alive and pipelining,
oversized heads, and request-target forms.  Only the built-in door is tested:
behind the WSGI door the WSGI server (waitress) owns framing.

Policy: framing defects → 400 (an unsupported transfer coding → 400 or 501) and
the connection is closed; nothing is stored; the server stays up.
"""

import hashlib
import re
import socket
import threading
import time

import pytest

import pyrestserver

from conftest import basic_auth, exchange, object_id, read_until_closed, temp_files

SMUGGLED = b"POST /smuggled/?create=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
HELLO = b"hello world"
HELLO_ID = object_id(HELLO)
HELLO_CHUNKED = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


# -- raw HTTP helpers ---------------------------------------------------------


class RawResponse:
    def __init__(self, version, status, reason, headers, body, complete=True):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers  # [(lower-case name, value)]
        self.body = body
        self.complete = complete

    def header(self, name):
        values = self.all(name)
        return values[-1] if values else None

    def all(self, name):
        return [v for k, v in self.headers if k == name.lower()]

    @property
    def interim(self):
        return 100 <= self.status < 200

    def __repr__(self):
        return f"<RawResponse {self.status} {self.headers} {self.body[:80]!r}>"


def parse_responses(data, methods=()):
    """Split a byte stream into HTTP/1.x responses.  `methods` lists the request
    methods in order so that responses to HEAD are known to have no body."""
    methods = list(methods)
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise AssertionError(f"unframed bytes after {len(out)} responses: {data[pos:pos+200]!r}")
        lines = data[pos:end].decode("latin-1").split("\r\n")
        m = re.match(r"(HTTP/\d\.\d) (\d{3})(?: (.*))?$", lines[0])
        assert m, f"bad status line {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        status = int(m.group(2))
        pos = end + 4
        resp = RawResponse(m.group(1), status, m.group(3) or "", headers, b"")
        if resp.interim:
            out.append(resp)
            continue
        method = methods.pop(0) if methods else "GET"
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if method == "HEAD" or status in (204, 304):
            pass
        elif te is not None:
            assert te.lower() == "chunked", te
            body = bytearray()
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    resp.complete = False
                    pos = len(data)
                    break
                size = int(data[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                if size == 0:
                    trailer_end = data.find(b"\r\n", pos)
                    while trailer_end != pos and trailer_end >= 0:
                        pos = trailer_end + 2
                        trailer_end = data.find(b"\r\n", pos)
                    pos = (trailer_end + 2) if trailer_end >= 0 else len(data)
                    break
                body += data[pos:pos + size]
                pos += size + 2
            resp.body = bytes(body)
        elif cl is not None:
            n = int(cl)
            resp.body = data[pos:pos + n]
            resp.complete = len(resp.body) == n
            pos += n
        else:
            resp.body = data[pos:]
            pos = len(data)
        out.append(resp)
    return out


def final_responses(data, methods=()):
    return [r for r in parse_responses(data, methods) if not r.interim]


def assert_no_leak(responses, srv):
    for r in responses:
        assert b"Traceback" not in r.body, r
        assert str(srv.data_dir).encode() not in r.body, r
        assert "python" not in (r.header("server") or "").lower(), r


def assert_healthy(srv):
    """The server still answers and has printed no traceback."""
    assert srv.returncode is None, srv.stderr
    r = srv.request("GET", "/health")
    assert r.status == 200, r
    assert "Traceback" not in srv.stderr, srv.stderr


def assert_rejected(srv, data, statuses=(400,), shut_wr=False):
    """Exactly one final response with a status in `statuses`, then the server
    closes the connection (a reset before any answer is tolerated only if no
    2xx was sent)."""
    got, closed = exchange(srv, data, shut_wr=shut_wr)
    responses = final_responses(got)
    assert_no_leak(responses, srv)
    assert closed, f"connection left open after {responses}"
    assert len(responses) == 1, responses
    assert responses[0].status in statuses, responses
    return responses[0]


def smuggled_ran(srv):
    return (srv.data_dir / "smuggled").exists()


def request_head(method, target, headers=(), version="HTTP/1.1"):
    lines = [f"{method} {target} {version}", "Host: x", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.fixture
def srv(start_server):
    """A built-in-door --no-auth server with a created repo `r`."""
    s = start_server("--no-auth")
    s.create_repo("r")
    return s


def hello_path(srv, kind="keys"):
    return srv.data_dir / "r" / kind / HELLO_ID


# -- Content-Length ----------------------------------------------------------------


class TestContentLength:
    def test_valid_content_length_upload_works(self, srv):
        """Control case: a plain upload with `Content-Length: 11` → 200."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}", ["Content-Length: 11"]) + HELLO
        got, _ = exchange(srv, req + request_head("GET", "/health", ["Connection: close"]))
        statuses = [r.status for r in final_responses(got)]
        assert statuses == [200, 200]
        assert hello_path(srv).read_bytes() == HELLO

    def test_conflicting_content_lengths_are_rejected(self, srv):
        """CL.CL: `Content-Length: 0` and `Content-Length: N` → 400 + close; neither
        the empty object nor the request hidden in the body is processed."""
        empty_id = object_id(b"")
        req = request_head("POST", f"/r/keys/{empty_id}",
                           ["Content-Length: 0", f"Content-Length: {len(SMUGGLED)}"]) + SMUGGLED
        assert_rejected(srv, req)
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert not (srv.data_dir / "r" / "keys" / empty_id).exists()
        assert_healthy(srv)

    def test_conflicting_content_lengths_in_one_field_are_rejected(self, srv):
        """`Content-Length: 0, 71` (a list with different values) → 400 + close."""
        empty_id = object_id(b"")
        req = request_head("POST", f"/r/keys/{empty_id}",
                           [f"Content-Length: 0, {len(SMUGGLED)}"]) + SMUGGLED
        assert_rejected(srv, req)
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert not (srv.data_dir / "r" / "keys" / empty_id).exists()
        assert_healthy(srv)

    @pytest.mark.parametrize("value", [
        b"+11", b"1_1", b"1 1", b"\x0b11", b"\x0c11", b"11\x0b", b"0x0b", b"1.1e1", b"-11",
        b"11.0", b"", b"eleven", "\uff11\uff11".encode(), "\u0661\u0661".encode(),
        "11\u00a0".encode("latin-1"),
    ])
    def test_lax_content_length_syntax_is_rejected(self, srv, value):
        """Only `1*DIGIT` is a Content-Length: `+11`, `1_1`, VT/FF padding, hex,
        exponent, sign, fullwidth/Arabic-Indic digits (all accepted by Python's
        int()) → 400 + close, and the 11-byte body is not stored."""
        req = (f"POST /r/keys/{HELLO_ID} HTTP/1.1\r\nHost: x\r\n".encode()
               + b"Content-Length: " + value + b"\r\n\r\n" + HELLO)
        assert_rejected(srv, req)
        assert not hello_path(srv).exists()
        assert temp_files(srv.data_dir) == []
        assert_healthy(srv)

    @pytest.mark.parametrize("value", ["99999999999999999999999", str(2 ** 64),
                                       str(2 ** 63)])
    def test_absurd_content_length_is_rejected(self, srv, value):
        """A Content-Length beyond 2^63-1 → 400 (or 413), never a wait for the body."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}", [f"Content-Length: {value}"]) + HELLO
        assert_rejected(srv, req, statuses=(400, 413))
        assert not hello_path(srv).exists()
        assert_healthy(srv)

    def test_short_body_then_eof_stores_nothing(self, srv):
        """CL = n, n-5 bytes, FIN → 400 or a bare close; no object and no temp file."""
        body = b"0123456789" * 10
        req = request_head("POST", f"/r/data/{object_id(body)}",
                           [f"Content-Length: {len(body)}"]) + body[:-5]
        got, closed = exchange(srv, req, shut_wr=True)
        responses = final_responses(got)
        assert closed
        assert [r.status for r in responses] in ([], [400]), responses
        time.sleep(0.2)
        assert not list((srv.data_dir / "r" / "data").rglob(object_id(body)))
        assert temp_files(srv.data_dir) == []
        assert_healthy(srv)

    def test_post_without_length_has_empty_body(self, srv):
        """A POST with neither Content-Length nor Transfer-Encoding has a 0-byte body
        (RFC 9112 §6.3): the hello object is refused (hash), and the bytes that
        follow are never taken as its body."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}") + HELLO
        got, _ = exchange(srv, req)
        responses = final_responses(got)
        assert responses and responses[0].status in (400, 411), responses
        assert not hello_path(srv).exists()
        assert_healthy(srv)


# -- Transfer-Encoding -----------------------------------------------------------


class TestTransferEncoding:
    @pytest.mark.parametrize("order", ["cl-first", "te-first"])
    def test_content_length_with_transfer_encoding_is_rejected(self, srv, order):
        """CL.TE / TE.CL: both headers → 400 + close; the chunked body's object is not
        stored and the request after its last chunk is not executed."""
        body = HELLO_CHUNKED + SMUGGLED
        cl = f"Content-Length: {len(body)}"
        te = "Transfer-Encoding: chunked"
        headers = [cl, te] if order == "cl-first" else [te, cl]
        assert_rejected(srv, request_head("POST", f"/r/keys/{HELLO_ID}", headers) + body)
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert not hello_path(srv).exists()
        assert_healthy(srv)

    @pytest.mark.parametrize("te_lines", [
        [b"Transfer-Encoding: xchunked"],
        [b"Transfer-Encoding: chunked, identity"],
        [b"Transfer-Encoding: identity"],
        [b"Transfer-Encoding: identity, chunked"],
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: chunked, chunked"],
        [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"],
        [b"Transfer-Encoding:\r\n chunked"],
        [b"Transfer-Encoding: \x0bchunked"],
        [b"Transfer-Encoding : chunked"],
        [b"Transfer-Encoding: chunked\x00"],
    ], ids=["xchunked", "chunked-identity", "identity", "identity-chunked", "gzip-chunked",
            "chunked-twice-in-list", "two-te-headers", "te-chunked-then-identity", "obs-fold",
            "vertical-tab", "space-before-colon", "nul"])
    def test_obfuscated_transfer_encoding_is_rejected(self, srv, te_lines):
        """TE.TE: any Transfer-Encoding other than exactly `chunked` (obs-fold, lists,
        unknown codings, padding) → 400/501 + close; nothing stored, nothing smuggled."""
        req = (f"POST /r/keys/{HELLO_ID} HTTP/1.1\r\nHost: x\r\n".encode()
               + b"".join(line + b"\r\n" for line in te_lines) + b"\r\n"
               + HELLO_CHUNKED + SMUGGLED)
        assert_rejected(srv, req, statuses=(400, 501))
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert not hello_path(srv).exists()
        assert temp_files(srv.data_dir) == []
        assert_healthy(srv)

    def test_obfuscated_te_with_content_length_is_rejected(self, srv):
        """`Transfer-Encoding: xchunked` plus a Content-Length → 400/501 + close."""
        body = HELLO_CHUNKED + SMUGGLED
        req = request_head("POST", f"/r/keys/{HELLO_ID}",
                           ["Transfer-Encoding: xchunked", f"Content-Length: {len(body)}"]) + body
        assert_rejected(srv, req, statuses=(400, 501))
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert_healthy(srv)

    def test_transfer_encoding_on_http10_closes_the_connection(self, srv):
        """An HTTP/1.0 request with `Transfer-Encoding: chunked` has suspect framing
        (RFC 9112 §6.1): it is refused (400/501), or processed and the connection
        closed right after — the bytes behind it never run as a request."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}", ["Transfer-Encoding: chunked"],
                           version="HTTP/1.0") + HELLO_CHUNKED + SMUGGLED
        got, closed = exchange(srv, req)
        responses = final_responses(got)
        assert closed
        assert len(responses) == 1 and responses[0].status in (200, 400, 501), responses
        if responses[0].status == 200:
            assert hello_path(srv).read_bytes() == HELLO
        else:
            assert not hello_path(srv).exists()
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert_healthy(srv)


# -- line endings and header-block defects -----------------------------------------


class TestHeaderBlock:
    def test_bare_lf_request_is_rejected(self, srv):
        """A request whose lines end in bare LF → 400 + close; it is not executed."""
        req = b"POST /barelf/?create=true HTTP/1.1\nHost: x\nContent-Length: 0\n\n"
        assert_rejected(srv, req)
        assert not (srv.data_dir / "barelf").exists()
        assert_healthy(srv)

    def test_bare_lf_hiding_transfer_encoding_is_rejected(self, srv):
        """`X: a\\nTransfer-Encoding: chunked` inside a CRLF head → 400 + close."""
        body = HELLO_CHUNKED + SMUGGLED
        req = (f"POST /r/keys/{HELLO_ID} HTTP/1.1\r\nHost: x\r\n"
               f"X-Pad: a\nTransfer-Encoding: chunked\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        assert_rejected(srv, req, statuses=(400, 501))
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert not hello_path(srv).exists()
        assert_healthy(srv)

    def test_bare_cr_in_header_is_rejected(self, srv):
        """A bare CR inside a header line → 400 + close."""
        req = (f"POST /r/keys/{HELLO_ID} HTTP/1.1\r\nHost: x\r\n"
               f"X-Pad: a\rTransfer-Encoding: chunked\r\n\r\n").encode() + HELLO_CHUNKED
        assert_rejected(srv, req, statuses=(400, 501))
        assert not hello_path(srv).exists()
        assert_healthy(srv)

    @pytest.mark.parametrize("line", [
        b"Content-Length : 11",
        b"this line has no colon",
        b"X-Nul: a\x00b",
        b"X\x01Bad: 1",
        b" Content-Length: 11",
    ], ids=["space-before-colon", "no-colon", "nul-in-value", "ctl-in-name", "leading-space"])
    def test_malformed_header_lines_are_rejected(self, srv, line):
        """Header-line defects (space before colon, no colon, NUL, control chars,
        a continuation line right after the request line) → 400 + close."""
        req = (f"POST /r/keys/{HELLO_ID} HTTP/1.1\r\n".encode() + line
               + b"\r\nHost: x\r\nContent-Length: 11\r\n\r\n" + HELLO)
        assert_rejected(srv, req)
        assert not hello_path(srv).exists()
        assert_healthy(srv)

    @pytest.mark.parametrize("cut", [None, b"HTTP/1.1\r\n", b"X-Pad", b"close\r\n"],
                             ids=["whole", "after-request-line", "inside-a-header",
                                  "before-the-blank-line"])
    def test_a_head_means_the_same_however_it_arrives(self, srv, cut):
        """Repeated headers join with commas (two Connection headers make
        `keep-alive, close`), values lose the blanks around them, an equal second
        Content-Length is one length, a different second Host is a 400: all the
        same whether the head comes in one piece or in two."""
        def send_in_two(head):
            at = len(head) if cut is None else head.index(cut) + len(cut)
            with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(head[:at])
                time.sleep(0.1)
                sock.sendall(head[at:])
                return final_responses(read_until_closed(sock))

        upload = (f"POST /r/keys/{HELLO_ID} HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
                  "X-Pad: \t spaced \t\r\nContent-Length: 11\r\nConnection: keep-alive\r\n"
                  "Connection: close\r\n\r\n").encode() + HELLO
        responses = send_in_two(upload)
        assert [r.status for r in responses] == [200], responses
        assert responses[0].header("connection") == "close"
        assert hello_path(srv).read_bytes() == HELLO

        two_hosts = (b"GET /r/config HTTP/1.1\r\nHost: x\r\nX-Pad: a\r\nHost: y\r\n"
                     b"Connection: close\r\n\r\n")
        assert [r.status for r in send_in_two(two_hosts)] == [400]
        assert_healthy(srv)

    def test_oversized_header_is_431_or_400(self, srv):
        """One 70 KiB header → 431 or 400, never processed."""
        req = request_head("POST", "/big/?create=true", ["X-Big: " + "a" * 70_000])
        got, _ = exchange(srv, req)
        responses = final_responses(got)
        assert [r.status for r in responses] in ([400], [431]), responses
        assert not (srv.data_dir / "big").exists()
        assert_healthy(srv)

    def test_oversized_header_block_is_431_or_400(self, srv):
        """2 MiB of headers in 2000 lines → 431 or 400, never processed."""
        headers = [f"X-H{i}: " + "b" * 1000 for i in range(2000)]
        got, _ = exchange(srv, request_head("POST", "/big/?create=true", headers))
        responses = final_responses(got)
        assert [r.status for r in responses] in ([400], [431]), responses
        assert not (srv.data_dir / "big").exists()
        assert_healthy(srv)

    def test_overlong_request_line_is_414_or_400(self, srv):
        """A 100 KiB request target → 414 or 400; server stays up."""
        got, _ = exchange(srv, request_head("GET", "/" + "a" * 100_000 + "/config"))
        responses = final_responses(got)
        assert [r.status for r in responses] in ([400], [414]), responses
        assert_healthy(srv)

    def test_response_splitting_via_path_is_impossible(self, srv):
        """An encoded CRLF in the target never becomes a response header."""
        got, _ = exchange(srv, request_head(
            "GET", "/r%0d%0aX-Injected:%201/config", ["Connection: close"]))
        responses = final_responses(got)
        assert len(responses) == 1 and responses[0].status in (400, 404), responses
        assert responses[0].header("x-injected") is None
        assert b"X-Injected" not in got.split(b"\r\n\r\n")[0]
        assert_healthy(srv)


# -- unread bodies after an early answer -----------------------------------------------


class TestUnreadBody:
    @pytest.mark.parametrize("case", ["404", "405", "403", "400", "416", "200-get",
                                      "200-delete"])
    def test_body_after_early_answer_is_never_executed(self, srv, case):
        """A keep-alive request answered without reading its body (404 bad path,
        405 PUT, 403 existing object, 400 bad create flag, 416, GET/DELETE with a
        body) whose body is a complete POST request: exactly one response, and the
        request in the body never runs (body drained or connection closed)."""
        existing = b"existing object"
        assert srv.upload("r", "keys", existing).status == 200
        oid = object_id(existing)
        cl = f"Content-Length: {len(SMUGGLED)}"
        method, target, extra, expected = {
            "404": ("POST", "/r/nonsense/path", [], 404),
            "405": ("PUT", "/r/config", [], 405),
            "403": ("POST", f"/r/keys/{oid}", [], 403),
            "400": ("POST", "/r/?create=nope", [], 400),
            "416": ("GET", f"/r/keys/{oid}", ["Range: bytes=5000-"], 416),
            "200-get": ("GET", "/health", [], 200),
            "200-delete": ("DELETE", f"/r/locks/{object_id(b'no lock')}", [], 200),
        }[case]
        req = request_head(method, target, [cl, *extra]) + SMUGGLED
        got, _ = exchange(srv, req, timeout=2.0)
        responses = final_responses(got, [method])
        assert [r.status for r in responses] == [expected], responses
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert (srv.data_dir / "r" / "keys" / oid).read_bytes() == existing
        assert_healthy(srv)

    def test_chunked_body_after_early_answer_is_never_executed(self, srv):
        """Same with a chunked body carrying the hidden request in its chunk data."""
        chunk = b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n"
        req = request_head("POST", "/r/nonsense/path", ["Transfer-Encoding: chunked"]) + chunk
        got, _ = exchange(srv, req, timeout=2.0)
        assert [r.status for r in final_responses(got)] == [404]
        time.sleep(0.2)
        assert not smuggled_ran(srv)
        assert_healthy(srv)

    def test_body_after_401_is_never_executed(self, start_server, tmp_path):
        """With auth on, a request rejected with 401 whose body is a complete request
        (using valid credentials) → one 401; the hidden request never runs."""
        digest = __import__("base64").b64encode(hashlib.sha1(b"secret").digest()).decode()
        htpasswd = tmp_path / "users.htpasswd"
        htpasswd.write_text(f"alice:{{SHA}}{digest}\n")
        s = start_server("--htpasswd-file", str(htpasswd))
        hidden = (b"POST /smuggled/?create=true HTTP/1.1\r\nHost: x\r\nAuthorization: "
                  + basic_auth("alice", "secret").encode() + b"\r\nContent-Length: 0\r\n\r\n")
        req = request_head("POST", f"/keys/{HELLO_ID}",
                           [f"Content-Length: {len(hidden)}"]) + hidden
        got, _ = exchange(s, req, timeout=2.0)
        assert [r.status for r in final_responses(got)] == [401]
        time.sleep(0.2)
        assert not (s.data_dir / "smuggled").exists()
        r = s.request("GET", "/health")
        assert r.status == 200
        assert "Traceback" not in s.stderr


# -- chunked uploads ----------------------------------------------------------------


class TestChunkedUpload:
    @pytest.mark.parametrize("body", [
        HELLO_CHUNKED,
        b"5;ext=x\r\nhello\r\n6;a=b;c=\"d\"\r\n world\r\n0\r\n\r\n",
        b"B\r\nhello world\r\n0\r\n\r\n",
        b"".join(b"1\r\n%c\r\n" % c for c in HELLO) + b"0\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
    ], ids=["two-chunks", "extensions", "upper-hex", "one-byte-chunks", "trailer"])
    def test_valid_chunked_upload_is_stored(self, srv, body):
        """A well-formed chunked upload with the right hash → 200; GET returns it."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}", ["Transfer-Encoding: chunked"]) + body
        got, _ = exchange(srv, req + request_head("GET", "/health", ["Connection: close"]))
        assert [r.status for r in final_responses(got)] == [200, 200]
        assert hello_path(srv).read_bytes() == HELLO
        assert srv.request("GET", f"/r/keys/{HELLO_ID}").body == HELLO

    def test_large_chunked_data_upload(self, srv):
        """A 3 MiB chunked data upload in 64 KiB chunks → 200, stored under data/xx/."""
        data = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)
        oid = object_id(data)
        chunks = b"".join(b"%x\r\n" % len(data[i:i + 65536]) + data[i:i + 65536] + b"\r\n"
                          for i in range(0, len(data), 65536))
        req = request_head("POST", f"/r/data/{oid}", ["Transfer-Encoding: chunked",
                                                       "Connection: close"]) + chunks + b"0\r\n\r\n"
        got, _ = exchange(srv, req, timeout=10)
        assert [r.status for r in final_responses(got)] == [200]
        assert (srv.data_dir / "r" / "data" / oid[:2] / oid).read_bytes() == data

    @pytest.mark.parametrize("body", [
        b"0x5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"0_5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"zz\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"fffffffffffffffffffff\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"5\r\nhello6\r\n world\r\n0\r\n\r\n",
        b"5\r\nhello world\r\n0\r\n\r\n",
        b"5\nhello\n6\n world\n0\n\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nContent-Length: 5\r\n",
    ], ids=["0x-prefix", "plus-sign", "leading-space", "underscore", "negative", "not-hex",
            "empty-size", "huge-size", "missing-crlf", "data-longer-than-size", "lf-only",
            "unterminated-trailer"])
    def test_malformed_chunked_body_is_400(self, srv, body):
        """Chunk sizes Python's int(x, 16) would accept (`0x5`, `+5`, ` 5`, `0_5`),
        bad sizes, a missing CRLF, data longer than its size, LF-only lines → 400 +
        close; no object, no temp file."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}", ["Transfer-Encoding: chunked"]) + body
        got, closed = exchange(srv, req, shut_wr=body.endswith(b"5\r\n"))
        responses = final_responses(got)
        assert closed, responses
        assert [r.status for r in responses] == [400], responses
        time.sleep(0.2)
        assert not hello_path(srv).exists()
        assert temp_files(srv.data_dir) == []
        assert_healthy(srv)

    @pytest.mark.parametrize("body", [
        b"5\r\nhello\r\n6\r\n wo",
        b"5\r\nhello\r\n6\r\n world\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n",
        b"5\r\nhel",
    ], ids=["eof-inside-chunk", "eof-before-last-chunk", "eof-before-final-crlf",
            "eof-in-first-chunk"])
    def test_truncated_chunked_body_stores_nothing(self, srv, body):
        """EOF in the middle of a chunked body → 400 or a bare close; no object, no temp."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}", ["Transfer-Encoding: chunked"]) + body
        got, closed = exchange(srv, req, shut_wr=True)
        responses = final_responses(got)
        assert closed
        assert [r.status for r in responses] in ([], [400]), responses
        time.sleep(0.2)
        assert not hello_path(srv).exists()
        assert temp_files(srv.data_dir) == []
        assert_healthy(srv)

    def test_chunked_hash_mismatch_is_400(self, srv):
        """A correctly framed chunked body with the wrong content → 400, nothing stored."""
        body = b"5\r\nhello\r\n6\r\n WORLD\r\n0\r\n\r\n"
        req = request_head("POST", f"/r/keys/{HELLO_ID}", ["Transfer-Encoding: chunked",
                                                           "Connection: close"]) + body
        got, _ = exchange(srv, req)
        assert [r.status for r in final_responses(got)] == [400]
        assert not hello_path(srv).exists()
        assert temp_files(srv.data_dir) == []


# -- Expect: 100-continue -------------------------------------------------------------


def read_until(sock, marker_count, timeout=3.0):
    """Read until `marker_count` complete response heads have arrived (or timeout)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\r\n\r\n") < marker_count and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    return data


class TestExpectContinue:
    def test_100_continue_then_200(self, srv):
        """`Expect: 100-continue` → `100 Continue` before the body is sent, then 200."""
        head = request_head("POST", f"/r/keys/{HELLO_ID}",
                            ["Content-Length: 11", "Expect: 100-continue"])
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:
            s.sendall(head)
            interim = read_until(s, 1)
            assert re.match(rb"HTTP/1\.1 100 ", interim), interim
            s.sendall(HELLO)
            rest = read_until(s, 1)
        responses = final_responses(interim + rest)
        assert [r.status for r in responses] == [200], responses
        assert hello_path(srv).read_bytes() == HELLO

    def test_rejected_expect_continue_request_stores_nothing(self, srv):
        """A request that will be refused (existing object → 403) is answered with its
        final status; if a 100 was sent anyway, the body is consumed and the result
        is still 403; the object is unchanged."""
        assert srv.upload("r", "keys", HELLO).status == 200
        head = request_head("POST", f"/r/keys/{HELLO_ID}",
                            ["Content-Length: 11", "Expect: 100-continue"])
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:
            s.sendall(head)
            first = read_until(s, 1)
            if re.match(rb"HTTP/1\.1 100 ", first):
                s.sendall(HELLO)
                first += read_until(s, 1)
        responses = final_responses(first)
        assert [r.status for r in responses] == [403], responses
        assert hello_path(srv).read_bytes() == HELLO

    def test_unknown_expectation_is_417(self, srv):
        """`Expect: something-else` → 417 Expectation Failed; nothing stored."""
        req = request_head("POST", f"/r/keys/{HELLO_ID}",
                           ["Content-Length: 11", "Expect: something-else"]) + HELLO
        got, _ = exchange(srv, req)
        responses = final_responses(got)
        assert responses and responses[0].status == 417, responses
        assert not hello_path(srv).exists()
        assert_healthy(srv)


# -- keep-alive and pipelining --------------------------------------------------------


class TestKeepAlive:
    def test_two_requests_on_one_connection(self, srv):
        """Two requests sent one after the other on one connection are both answered."""
        srv.request("POST", "/r/config", body=b"abc")
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:
            s.sendall(request_head("GET", "/r/config"))
            first = read_until(s, 1)
            time.sleep(0.05)
            first += s.recv(65536) if first.endswith(b"\r\n\r\n") else b""
            s.sendall(request_head("HEAD", "/r/config", ["Connection: close"]))
            second = read_until(s, 1)
        r1 = final_responses(first, ["GET"])
        r2 = final_responses(second, ["HEAD"])
        assert [(r.status, r.body) for r in r1] == [(200, b"abc")]
        assert [(r.status, r.body) for r in r2] == [(200, b"")]
        assert r2[0].header("content-length") == "3"

    def test_pipelined_successful_requests_all_answered_in_order(self, srv):
        """Ten pipelined requests (POST, HEAD, ranged GET, list, DELETE…) in one send →
        ten framed responses in order; HEAD bodies empty; every response has an exact
        Content-Length or chunked framing."""
        body = b"pipelined object"
        oid = object_id(body)
        reqs = [
            ("POST", request_head("POST", "/r/config", ["Content-Length: 3"]) + b"cfg", 200),
            ("POST", request_head("POST", f"/r/keys/{oid}",
                                  [f"Content-Length: {len(body)}"]) + body, 200),
            ("HEAD", request_head("HEAD", f"/r/keys/{oid}"), 200),
            ("GET", request_head("GET", f"/r/keys/{oid}", ["Range: bytes=2-5"]), 206),
            ("GET", request_head("GET", f"/r/keys/{oid}"), 200),
            ("GET", request_head("GET", "/r/keys/"), 200),
            ("HEAD", request_head("HEAD", "/r/config"), 200),
            ("GET", request_head("GET", "/r/config", ["Range: bytes=0-"]), (200, 206)),
            ("DELETE", request_head("DELETE", f"/r/keys/{oid}"), 200),
            ("GET", request_head("GET", "/health", ["Connection: close"]), 200),
        ]
        got, closed = exchange(srv, b"".join(r[1] for r in reqs))
        responses = final_responses(got, [r[0] for r in reqs])
        assert len(responses) == len(reqs), responses
        for (method, _, expected), resp in zip(reqs, responses):
            ok = expected if isinstance(expected, tuple) else (expected,)
            assert resp.status in ok, (method, resp)
            assert resp.complete
            assert resp.header("content-length") is not None or \
                resp.header("transfer-encoding") == "chunked", resp
            if method == "HEAD":
                assert resp.body == b""
        assert responses[3].body == body[2:6]
        assert responses[4].body == body
        assert closed

    @pytest.mark.parametrize("error", ["404", "405", "416", "400-hash"])
    def test_after_an_error_the_connection_is_closed_or_still_in_sync(self, srv, error):
        """After an error response the server either closes the connection (and says
        `Connection: close`) or answers the next pipelined request correctly."""
        srv.request("POST", "/r/config", body=b"abc")
        first = {
            "404": request_head("GET", "/r/keys/" + "0" * 64),
            "405": request_head("PUT", "/r/config", ["Content-Length: 0"]),
            "416": request_head("GET", "/r/config", ["Range: bytes=10-"]),
            "400-hash": request_head("POST", f"/r/keys/{HELLO_ID}",
                                     ["Content-Length: 5"]) + b"wrong",
        }[error]
        got, closed = exchange(srv, first + request_head("GET", "/r/config",
                                                         ["Connection: close"]))
        responses = final_responses(got)
        assert responses and responses[0].status == int(error[:3]), responses
        if len(responses) == 1:
            assert closed
            assert (responses[0].header("connection") or "").lower() == "close"
        else:
            assert [(r.status, r.body) for r in responses[1:]] == [(200, b"abc")]
        assert_healthy(srv)


    @pytest.mark.parametrize("stall", ["idle", "head", "body"])
    def test_timeouts_hold_for_every_request_of_a_connection(self, start_server, stall):
        """After a first request is answered on a keep-alive connection, the
        next one is held to the same limits: silence longer than
        --idle-timeout, a head still unfinished after --header-timeout, or a
        body that stops for --body-timeout each end the connection (the body
        case with nothing stored).  Limits 1 s / 2 s / 2 s here."""
        srv = start_server("--no-auth", "--idle-timeout", "1", "--header-timeout", "2",
                           "--body-timeout", "2")
        srv.create_repo("r")
        follow_up = {
            "idle": b"",
            "head": b"GET /health HTTP/1.1\r\nHost: x\r\n",  # no blank line: unfinished
            "body": request_head("POST", f"/r/keys/{HELLO_ID}", ["Content-Length: 11"]) + b"hello",
        }[stall]
        with socket.create_connection((srv.host, srv.port), timeout=15) as s:
            s.sendall(request_head("GET", "/health"))
            first = final_responses(read_until(s, 1), ["GET"])
            assert [r.status for r in first] == [200]
            started = time.monotonic()
            s.sendall(follow_up)
            received = read_until_closed(s)
            waited = time.monotonic() - started
        assert b"200 OK" not in received, received
        assert 0.8 <= waited <= 8.0, f"{stall}: connection ended after {waited:.2f} s"
        assert not hello_path(srv).exists()
        assert temp_files(srv.data_dir) == []
        assert_healthy(srv)


class TestTimeoutStrategies:
    """Plain TCP connections are blocking sockets whose read timeout the kernel
    enforces (SO_RCVTIMEO, changed only when the phase's timeout differs);
    where that is not available they fall back to Python socket timeouts.
    Both must behave the same; in-process here, to choose the strategy."""

    @pytest.fixture(params=[True, False], ids=["kernel", "python"])
    def inproc(self, request, tmp_path):
        app = pyrestserver.ResticRESTApp(pyrestserver.LocalStorageProvider(str(tmp_path)),
                                         auth=pyrestserver.Authenticator(enabled=False))
        sock, _ = pyrestserver.listen_socket("127.0.0.1:0")
        server = pyrestserver.ResticServer(
            sock, app, timeouts={"idle": 1.0, "header": 2.0, "body": 2.0})
        if request.param:
            assert server.kernel_timeouts, "Linux takes SO_RCVTIMEO as a timeval"
        server.kernel_timeouts = request.param
        thread = threading.Thread(target=server.serve_forever,
                                  kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        yield server, sock.getsockname()[1], tmp_path
        server.stop(grace=1.0)
        thread.join(5)

    def test_keep_alive_requests_then_the_idle_timeout(self, inproc):
        server, port, data = inproc
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request_head("POST", "/r/?create=true", ["Content-Length: 0"]))
            s.sendall(request_head("POST", f"/r/keys/{HELLO_ID}", ["Content-Length: 11"]) + HELLO)
            s.sendall(request_head("GET", f"/r/keys/{HELLO_ID}"))
            got = final_responses(read_until(s, 3), ["POST", "POST", "GET"])
            assert [r.status for r in got] == [200, 200, 200], got
            assert got[2].body == HELLO
            started = time.monotonic()
            assert read_until_closed(s) == b""
            waited = time.monotonic() - started
        assert 0.8 <= waited <= 5.0, f"idle connection ended after {waited:.2f} s"

    def test_a_stalled_body_is_cut_by_the_body_timeout(self, inproc):
        server, port, data = inproc
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request_head("POST", "/r/?create=true", ["Content-Length: 0"]))
            assert [r.status for r in final_responses(read_until(s, 1), ["POST"])] == [200]
            s.sendall(request_head("POST", f"/r/keys/{HELLO_ID}", ["Content-Length: 11"]) + b"hel")
            started = time.monotonic()
            received = read_until_closed(s)
            waited = time.monotonic() - started
        assert b"200 OK" not in received, received
        assert 1.5 <= waited <= 6.0, f"stalled body cut after {waited:.2f} s"
        assert not (data / "r" / "keys" / HELLO_ID).exists()
        assert temp_files(data) == []


# -- request-target forms and versions ---------------------------------------------------


class TestRequestTarget:
    @pytest.mark.parametrize("line", [
        "GET http://x/r/config HTTP/1.1",
        "GET http://127.0.0.1/r/config HTTP/1.1",
        "GET http://evil.example/../outside/config HTTP/1.1",
        "POST http://x/viaabsolute/?create=true HTTP/1.1",
        "GET * HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "GET r/config HTTP/1.1",
        "GET ?x HTTP/1.1",
        "CONNECT x:1 HTTP/1.1",
    ])
    def test_non_origin_form_targets_are_refused(self, srv, line):
        """Absolute-form, asterisk-form, authority-form and relative targets → 4xx
        (400/404; 405/501 for CONNECT), never 3xx, never the config."""
        srv.request("POST", "/r/config", body=b"SECRET-CONFIG")
        req = (line + "\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode()
        got, _ = exchange(srv, req)
        responses = final_responses(got, [line.split()[0]])
        assert len(responses) == 1, responses
        allowed = (400, 404, 405, 501) if line.startswith("CONNECT") else (400, 404)
        assert responses[0].status in allowed, responses
        assert responses[0].header("location") is None
        assert b"SECRET-CONFIG" not in got
        assert not (srv.data_dir / "viaabsolute").exists()
        assert_healthy(srv)

    @pytest.mark.parametrize("raw_line", [
        b"GET /r/\x00/config HTTP/1.1",
        b"GET /r/con\x01fig HTTP/1.1",
        b"GET /r/con fig HTTP/1.1",
        b"GET  HTTP/1.1",
        b"GET /r/config HTTP/1.1 extra",
        b"GET /r/config FOO/1.1",
        b"GET /r/config HTTP/x.y",
        b"G\x00T /r/config HTTP/1.1",
    ], ids=["nul", "ctl", "space", "empty-target", "extra-word", "bad-protocol",
            "bad-version", "nul-method"])
    def test_malformed_request_lines_are_400(self, srv, raw_line):
        """Raw NUL/control bytes/spaces in the request line, bad versions → 400 + close."""
        srv.request("POST", "/r/config", body=b"SECRET-CONFIG")
        got, closed = exchange(srv, raw_line + b"\r\nHost: x\r\n\r\n")
        responses = final_responses(got)
        assert closed
        assert [r.status for r in responses] in ([400], [505]), responses
        assert b"SECRET-CONFIG" not in got
        assert_healthy(srv)

    @pytest.mark.parametrize("line", ["GET /r/config HTTP/2.0", "GET /r/config HTTP/3.0",
                                      "PRI * HTTP/2.0"])
    def test_unsupported_http_versions(self, srv, line):
        """HTTP/2+ request lines (including the h2c preface) → 505 or 400 + close."""
        srv.request("POST", "/r/config", body=b"SECRET-CONFIG")
        tail = "\r\n\r\nSM\r\n\r\n" if line.startswith("PRI") else "\r\nHost: x\r\n\r\n"
        got, closed = exchange(srv, (line + tail).encode())
        responses = final_responses(got)
        assert closed
        assert [r.status for r in responses] in ([400], [505]), responses
        assert b"SECRET-CONFIG" not in got
        assert_healthy(srv)

    def test_http09_request_never_returns_content(self, srv):
        """An HTTP/0.9 style `GET /r/config` (no version) never yields the config."""
        srv.request("POST", "/r/config", body=b"SECRET-CONFIG")
        got, _ = exchange(srv, b"GET /r/config\r\n")
        assert b"SECRET-CONFIG" not in got
        assert_healthy(srv)

    def test_http10_request_is_answered_and_closed(self, srv):
        """An HTTP/1.0 GET without keep-alive gets its answer and then a close."""
        srv.request("POST", "/r/config", body=b"abc")
        got, closed = exchange(srv, b"GET /r/config HTTP/1.0\r\n\r\n")
        responses = final_responses(got)
        assert [(r.status, r.body) for r in responses] == [(200, b"abc")]
        assert closed
