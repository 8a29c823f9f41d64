"""Password hashes (the auth section of pyrestserver) against independent implementations.

References: Apache htpasswd (all schemes), OpenSSL `passwd` (apr1/$5$/$6$),
libxcrypt via `crypt.crypt` on the pyenv Python 3.11 (run as a subprocess so
these comparisons also run on 3.9/3.13), and pyca/bcrypt.
Set HT_SEED to vary the random passwords.
"""

import base64
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

import pyrestserver as hh

PY311 = next(iter(sorted(__import__("glob").glob(
    os.path.expanduser("~/.pyenv/versions/3.11.*/bin/python")))), "")
SEED = int(os.environ.get("HT_SEED", "20240601"))
ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CHARS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
         "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ::::\t" "éüß€日本語🔑\u00a0")

needs_htpasswd = pytest.mark.skipif(not shutil.which("htpasswd"), reason="no htpasswd")
needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="no openssl")


def _have_ref_crypt():
    if not os.path.exists(PY311):
        return False
    return subprocess.run([PY311, "-W", "ignore", "-c", "import crypt"]).returncode == 0


needs_crypt = pytest.mark.skipif(not _have_ref_crypt(), reason="no python3.11 crypt")


def rand_pw(rng, maxlen):
    """Random UTF-8 password of at most `maxlen` bytes (no NUL/CR/LF)."""
    out = b""
    for _ in range(rng.randint(0, maxlen)):
        c = rng.choice(CHARS).encode()
        if len(out) + len(c) > maxlen:
            break
        out += c
    return out


def make_passwords(maxlen=255, n_random=40, seed=SEED):
    rng = random.Random(seed)
    pws = [b"", b"a", b"password", b"pass:word", b"::", b"\xc3\xa9t\xc3\xa9",
           "日本語🔑".encode(), b"$apr1$", b"{SHA}", b" leading and trailing "]
    for n in (7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 71, 72, 73, 127, 128, 129, 255):
        if n <= maxlen:
            pws.append(bytes(rng.choice(b"abcXYZ019:") for _ in range(n)))
    pws += [rand_pw(rng, rng.choice((12, 40, maxlen))) for _ in range(n_random)]
    return pws


def wrong_variants(pw):
    out = {pw + b"x", b"x" + pw, pw + b"\x00"}
    if pw:
        out |= {pw[:-1], pw[:-1] + bytes([pw[-1] ^ 1]), pw.upper() + b"!"}
    out.discard(pw)
    return out


PASSWORDS = make_passwords()


def htpasswd(flags, pw):
    r = subprocess.run(["htpasswd", "-ni", *flags, "user"], input=pw,
                       capture_output=True, check=True)
    line = r.stdout.decode().strip()
    assert line.startswith("user:"), line
    return line[len("user:"):]


def crypt_ref(pairs):
    """crypt.crypt on Python 3.11 (libxcrypt); None where it refuses."""
    script = ("import crypt, json, sys\n"
              "print(json.dumps([crypt.crypt(p, s) for p, s in json.load(sys.stdin)]))")
    r = subprocess.run([PY311, "-W", "ignore", "-c", script], capture_output=True, check=True,
                       input=json.dumps([(p.decode(), s) for p, s in pairs]).encode())
    return [None if (v is None or v.startswith("*")) else v for v in json.loads(r.stdout)]


def openssl_ref(algo, salt, pws):
    """`openssl passwd` for many passwords at once (one per stdin line)."""
    r = subprocess.run(["openssl", "passwd", "-" + algo, "-salt", salt, "-stdin"],
                       input=b"".join(p + b"\n" for p in pws), capture_output=True, check=True)
    out = r.stdout.decode().splitlines()
    assert len(out) == len(pws)
    return [None if v == "<NULL>" else v for v in out]


def assert_verifies(pw, stored):
    assert hh.verify_password(pw, stored) is True, (pw, stored)
    for bad in wrong_variants(pw):
        assert hh.verify_password(bad, stored) is False, (bad, stored)


# --------------------------------------------------------------- htpasswd --

@needs_htpasswd
@pytest.mark.parametrize("flags,kind", [
    (["-m"], "apr1"), (["-2"], "sha256-crypt"), (["-5"], "sha512-crypt"), (["-s"], "sha1"),
])
def test_htpasswd_generated(flags, kind):
    for pw in PASSWORDS:
        stored = htpasswd(flags, pw)
        assert hh.hash_kind(stored) == kind
        assert_verifies(pw, stored)
        if kind == "apr1":
            assert hh.apr1_hash(pw, stored) == stored
        elif kind != "sha1":
            assert hh.sha_crypt(pw, stored) == stored


@needs_htpasswd
@pytest.mark.parametrize("flag", ["-2", "-5"])
@pytest.mark.parametrize("rounds", [1000, 1001, 4999, 5000, 5001, 12345, 54321])
def test_htpasswd_rounds(flag, rounds):
    rng = random.Random(SEED + rounds)
    for pw in [b"", b"secret", rand_pw(rng, 200), rand_pw(rng, 30)]:
        stored = htpasswd([flag, "-r", str(rounds)], pw)
        assert "$rounds=%d$" % rounds in stored
        assert hh.sha_crypt(pw, stored) == stored
        assert_verifies(pw, stored)


@needs_htpasswd
def test_htpasswd_bcrypt():
    pytest.importorskip("bcrypt")
    pws = [p for p in PASSWORDS if len(p) <= 72][::2]
    for cost in ("4", "5"):
        for pw in pws:
            stored = htpasswd(["-B", "-C", cost], pw)
            assert stored.startswith("$2y$0%s$" % cost)
            assert hh.hash_kind(stored) == "bcrypt"
            assert_verifies(pw, stored)


@needs_htpasswd
def test_htpasswd_bcrypt_over_72_bytes_is_rejected():
    """htpasswd silently truncates to 72 bytes; we refuse such passwords."""
    pytest.importorskip("bcrypt")
    pw72 = bytes(range(65, 65 + 26)) * 2 + b"0123456789abcdefghij"
    assert len(pw72) == 72
    stored = htpasswd(["-B", "-C", "4"], pw72 + b"EXTRA")
    assert hh.verify_password(pw72, stored) is True       # what htpasswd hashed
    assert hh.verify_password(pw72 + b"EXTRA", stored) is False
    assert hh.verify_password(pw72 + b"X", stored) is False
    assert hh.verify_password(b"x" * 10000, stored) is False


@needs_htpasswd
@pytest.mark.parametrize("flags,kind", [(["-p"], "plaintext-or-des"), (["-d"], "plaintext-or-des")])
def test_htpasswd_unsupported(flags, kind):
    for pw in (b"secret", b"pw:x", b"12345678"):
        stored = htpasswd(flags, pw)
        assert hh.hash_kind(stored) == kind
        with pytest.raises(hh.UnsupportedHash):
            hh.verify_password(pw, stored)


# ------------------------------------------------------- crypt (libxcrypt) --

def _crypt_cases():
    rng = random.Random(SEED + 1)
    pws = make_passwords(maxlen=300, n_random=25, seed=SEED + 2) + [b"L" * 511, b"y" * 500]  # libxcrypt max: 511
    salts = ["", "a", "saltstring", "0123456789abcdef", "0123456789abcdefXYZ", "./..//./"]
    salts += ["".join(rng.choice(ITOA64) for _ in range(rng.randint(1, 20))) for _ in range(8)]
    cases = []
    for i, pw in enumerate(pws):
        kind = "56"[i % 2]
        salt = salts[i % len(salts)]
        extra = ["", "rounds=1000$", "rounds=1001$", "rounds=5000$", "rounds=7777$"][i % 5]
        cases.append((pw, "$%s$%s%s" % (kind, extra, salt)))
        cases.append((pw, "$%s$%s" % ("65"[i % 2], salt)))
    # Setting carrying a previous hash, like during verification.
    cases.append((b"pw", "$5$abc$ignored-hash-part"))
    cases.append((b"pw", "$6$rounds=1000$rounds=2000$x"))
    cases.append((b"pw", "$5$rounds=1000$"))
    return cases


@needs_crypt
def test_sha_crypt_matches_libxcrypt():
    cases = _crypt_cases()
    refs = crypt_ref(cases)
    for (pw, setting), ref in zip(cases, refs):
        assert ref is not None, setting  # all of these are valid for libxcrypt
        assert hh.sha_crypt(pw, setting) == ref, (pw, setting)
        assert hh.verify_password(pw, ref) is True
        assert hh.verify_password(pw + b"!", ref) is False


@needs_crypt
def test_drepper_spec_vectors_and_glibc_clamping():
    spec = [
        (b"Hello world!", "$5$saltstring"),
        (b"Hello world!", "$5$rounds=10000$saltstringsaltstring"),
        (b"This is just a test", "$5$rounds=5000$toolongsaltstring"),
        (b"a very much longer text to encrypt.  This one even stretches over more"
         b"than one line.", "$5$rounds=1400$anotherlengthysaltstring"),
        (b"we have a short salt string but not a short password", "$5$rounds=77777$short"),
        (b"a short string", "$5$rounds=123456$asaltof16chars.."),
        (b"Hello world!", "$6$saltstring"),
        (b"Hello world!", "$6$rounds=10000$saltstringsaltstring"),
        (b"This is just a test", "$6$rounds=5000$toolongsaltstring"),
        (b"a short string", "$6$rounds=123456$asaltof16chars.."),
    ]
    refs = crypt_ref(spec)
    for (pw, setting), ref in zip(spec, refs):
        assert hh.sha_crypt(pw, setting) == ref
    # libxcrypt rejects these settings; glibc (and we) clamp / normalise them.
    clamped = [
        (b"the minimum number is still observed", "$5$rounds=10$roundstoolow",
         "$5$rounds=1000$roundstoolow"),
        (b"the minimum number is still observed", "$6$rounds=10$roundstoolow",
         "$6$rounds=1000$roundstoolow"),
        (b"x", "$5$rounds=0$abc", "$5$rounds=1000$abc"),
        (b"x", "$6$rounds=0005000$abc", "$6$rounds=5000$abc"),
    ]
    assert crypt_ref([(pw, s) for pw, s, _ in clamped]) == [None] * len(clamped)
    refs = crypt_ref([(pw, eq) for pw, _, eq in clamped])
    for (pw, setting, _), ref in zip(clamped, refs):
        assert hh.sha_crypt(pw, setting) == ref


def test_rounds_upper_clamp_and_non_numeric_rounds(monkeypatch):
    seen = []
    monkeypatch.setattr(hh, "_stretch", lambda new, d, p, s, rounds: seen.append(rounds) or d)
    assert hh.sha_crypt(b"x", "$6$rounds=1000000000$abc").startswith("$6$rounds=999999999$abc$")
    assert hh.sha_crypt(b"x", "$5$rounds=99999999999999999999999$abc").startswith(
        "$5$rounds=999999999$abc$")
    assert seen == [999999999, 999999999]
    # Unparseable rounds fields are just salt (glibc); salt is cut at 16 chars.
    assert hh.sha_crypt(b"x", "$5$rounds=abc$x").startswith("$5$rounds=abc$")
    assert hh.sha_crypt(b"x", "$5$rounds=$x").startswith("$5$rounds=$")
    assert hh.sha_crypt(b"x", "$5$rounds=5000").startswith("$5$rounds=5000$")
    assert hh.sha_crypt(b"x", "$5$rounds=-5$x").startswith("$5$rounds=-5$")
    with pytest.raises(ValueError):  # non-ASCII digits are not a rounds field
        hh.sha_crypt(b"x", "$5$rounds=\u0661\u0662\u0663\u0664$x")
    assert seen == [999999999, 999999999] + [5000] * 4


# ----------------------------------------------------------------- openssl --

@needs_openssl
@pytest.mark.parametrize("algo", ["apr1", "5", "6"])
def test_openssl_passwd(algo):
    rng = random.Random(SEED + 3)
    pws = make_passwords(maxlen=400, n_random=30, seed=SEED + 4)
    # Non-UTF-8 bytes too: the algorithms work on raw bytes.
    pws += [bytes(rng.choice([b for b in range(1, 256) if b not in (10, 13)])
                  for _ in range(rng.randint(1, 80))) for _ in range(15)]
    pws = [p for p in pws if len(p) <= 256]  # openssl silently truncates at 256
    salts = ["a", "ab", "saltsalt", "saltsalt9", "./././..", "0123456789abcdef", "0123456789abcdefgh"]
    salts += ["".join(rng.choice(ITOA64) for _ in range(rng.randint(1, 16))) for _ in range(4)]
    if algo != "apr1":
        salts += ["rounds=1000$abc", "rounds=2345$0123456789abcdef"]
    checked = 0
    for salt in salts:
        for pw, ref in zip(pws, openssl_ref(algo, salt, pws)):
            if ref is None:  # openssl -5/-6 refuse empty passwords
                assert pw == b"" and algo != "apr1"
                continue
            mine = hh.apr1_hash(pw, salt) if algo == "apr1" else hh.sha_crypt(pw, "$%s$%s" % (algo, salt))
            assert mine == ref, (pw, salt)
            assert hh.verify_password(pw, ref) is True
            assert hh.verify_password(pw + b"\x01", ref) is False
            checked += 1
    assert checked > 300


@needs_openssl
def test_md5_crypt_is_unsupported():
    stored = openssl_ref("1", "abcdefgh", [b"pw"])[0]
    assert stored.startswith("$1$")
    assert hh.hash_kind(stored) == "unknown"
    with pytest.raises(hh.UnsupportedHash):
        hh.verify_password(b"pw", stored)


def test_apr1_salt_handling():
    full = hh.apr1_hash(b"pw", "abcdefgh")
    assert hh.apr1_hash(b"pw", "abcdefghijkl") == full  # salt cut at 8
    assert hh.apr1_hash(b"pw", full) == full             # a full hash works as salt
    assert hh.apr1_hash(b"pw", "abc$def").startswith("$apr1$abc$")
    assert re.fullmatch(r"\$apr1\$\$[./0-9A-Za-z]{22}", hh.apr1_hash(b"pw", ""))
    # A stored hash with a >8 char salt cannot be reproduced, so never matches.
    assert hh.verify_password(b"pw", full.replace("abcdefgh", "abcdefghX")) is False


# ------------------------------------------------------------ {SHA}, misc --

def test_sha1():
    for pw in PASSWORDS:
        stored = "{SHA}" + base64.b64encode(hashlib.sha1(pw).digest()).decode()
        assert hh.hash_kind(stored) == "sha1"
        assert_verifies(pw, stored)
    assert hh.verify_password(b"", "{SHA}") is False
    assert hh.verify_password(b"pw", "{SHA}not base64!") is False


def test_make_sha512_crypt():
    seen = set()
    for pw in PASSWORDS[:20]:
        stored = hh.make_sha512_crypt(pw)
        assert re.fullmatch(r"\$6\$[./0-9A-Za-z]{16}\$[./0-9A-Za-z]{86}", stored), stored
        assert hh.hash_kind(stored) == "sha512-crypt"
        assert_verifies(pw, stored)
        seen.add(stored.split("$")[2])
    assert len(seen) == 20  # fresh salt each time
    stored = hh.make_sha512_crypt(b"pw", rounds=1234)
    assert re.fullmatch(r"\$6\$rounds=1234\$[./0-9A-Za-z]{16}\$[./0-9A-Za-z]{86}", stored)
    assert hh.verify_password(b"pw", stored) and not hh.verify_password(b"pw2", stored)
    for bad in (0, 999, 10 ** 9):
        with pytest.raises(ValueError):
            hh.make_sha512_crypt(b"pw", rounds=bad)


@needs_crypt
def test_make_sha512_crypt_matches_libxcrypt():
    made = [(pw, hh.make_sha512_crypt(pw, r)) for pw, r in zip(PASSWORDS[:12], [5000, 1000, 6543] * 4)]
    assert crypt_ref(made) == [h for _, h in made]


def test_hash_kind():
    cases = {
        "$2y$05$" + "a" * 53: "bcrypt", "$2a$10$x": "bcrypt", "$2b$": "bcrypt",
        "$apr1$abc$def": "apr1", "$5$abc$def": "sha256-crypt", "$6$": "sha512-crypt",
        "{SHA}abc": "sha1", "plain": "plaintext-or-des", "": "plaintext-or-des",
        "abJnggxhB/yWI": "plaintext-or-des", "$1$abc$def": "unknown", "$2x$05$abc": "unknown",
        "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA": "unknown", "{SSHA}abc": "unknown",
        "$y$j9T$salt$hash": "unknown", "$7$": "unknown", "$apr$": "unknown",
        "{sha}abc": "unknown", "$5": "unknown",
    }
    for stored, kind in cases.items():
        assert hh.hash_kind(stored) == kind, stored


@pytest.mark.parametrize("stored", [
    "plain", "", "abJnggxhB/yWI", "$1$abc$def", "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
    "{SSHA}abc", "$2x$05$abc", "$y$j9T$salt$hash", "_J9..salt",
])
def test_unsupported_raises(stored):
    with pytest.raises(hh.UnsupportedHash):
        hh.verify_password(b"pw", stored)


MALFORMED = [
    "$apr1$", "$apr1$$", "$apr1$abc", "$apr1$abc$", "$apr1$abc$short", "$apr1$é$xyz",
    "$apr1$abc$\udcff", "$apr1$abcdefghijk$AAAAAAAAAAAAAAAAAAAAAA",
    "$5$", "$5$$", "$5$abc", "$5$abc$", "$5$rounds=$", "$5$rounds=1000", "$5$rounds=1000$",
    "$5$é$abc", "$5$\udcff", "$6$rounds=1000$abc$" + "A" * 200, "$6$abc$\x00",
    "$6$" + "$" * 50, "$6$rounds=99999999999999999999999999x$a$b",
    "{SHA}", "{SHA}====", "{SHA}\udcff", "{SHA}日本",
]


@pytest.mark.parametrize("stored", MALFORMED)
def test_malformed_returns_false(stored):
    for pw in (b"", b"pw", b"x" * 100):
        assert hh.verify_password(pw, stored) is False


def test_mutated_hashes_never_raise():
    """Truncations/mutations of valid hashes: only bool or UnsupportedHash."""
    rng = random.Random(SEED + 5)
    good = [hh.apr1_hash(b"pw", "abcdefgh"), hh.sha_crypt(b"pw", "$5$rounds=1000$abc"),
            hh.sha_crypt(b"pw", "$6$rounds=1000$0123456789abcdef"),
            "{SHA}" + base64.b64encode(hashlib.sha1(b"pw").digest()).decode()]
    junk = "$:./aZ09{}\x00é\udcff=rounds"
    for stored in good:
        variants = [stored[:i] for i in range(len(stored))]
        for _ in range(150):
            s = list(stored)
            for _ in range(rng.randint(1, 3)):
                s[rng.randrange(len(s))] = rng.choice(junk)
            variants.append("".join(s))
        for v in variants:
            if "rounds=" in v and not v.startswith(("$5$rounds=1000$", "$6$rounds=1000$")):
                continue  # might legitimately request up to 1e9 rounds
            try:
                r = hh.verify_password(b"pw", v)
            except hh.UnsupportedHash:
                continue
            assert r is (v == stored), v


def test_constant_time_compare_used(monkeypatch):
    calls = []
    real = hh.hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(hh.hmac, "compare_digest", spy)
    stores = [hh.apr1_hash(b"pw", "abc"), hh.sha_crypt(b"pw", "$5$abc"),
              hh.sha_crypt(b"pw", "$6$abc"), "{SHA}" + base64.b64encode(hashlib.sha1(b"pw").digest()).decode()]
    for s in stores:
        assert hh.verify_password(b"pw", s) and not hh.verify_password(b"nope", s)
    assert calls == [(bytes, bytes)] * 8


def test_password_length_cap():
    """SHA-crypt is quadratic in password length; verify refuses huge ones."""
    limit = hh.MAX_PASSWORD_BYTES
    for pw in (b"q" * limit, b"q" * (limit + 1)):
        for stored in (hh.sha_crypt(pw, "$6$rounds=1000$abc"), hh.sha_crypt(pw, "$5$abc"),
                       hh.apr1_hash(pw, "abc"),
                       "{SHA}" + base64.b64encode(hashlib.sha1(pw).digest()).decode()):
            assert hh.verify_password(pw, stored) is (len(pw) <= limit)
    with pytest.raises(hh.UnsupportedHash):  # config errors still surface
        hh.verify_password(b"q" * (limit + 1), "plaintext")


def naive_sha_crypt(pw, setting_salt, rounds, kind):
    """Literal, unoptimised transcription of Drepper's spec (test oracle)."""
    H = hashlib.sha256 if kind == "5" else hashlib.sha512
    size = H().digest_size
    salt = setting_salt.encode()[:16]
    B = H(pw + salt + pw).digest()
    A = H(pw + salt)
    cnt = len(pw)
    while cnt > size:
        A.update(B)
        cnt -= size
    A.update(B[:cnt])
    cnt = len(pw)
    while cnt > 0:
        A.update(B if cnt & 1 else pw)
        cnt >>= 1
    A = A.digest()
    DP = H()
    for _ in range(len(pw)):
        DP.update(pw)
    DP = DP.digest()
    P = b""
    while len(P) < len(pw):
        P += DP
    P = P[:len(pw)]
    DS = H()
    for _ in range(16 + A[0]):
        DS.update(salt)
    S = DS.digest()[:len(salt)]
    C = A
    for r in range(rounds):
        h = H()
        h.update(P if r & 1 else C)
        if r % 3:
            h.update(S)
        if r % 7:
            h.update(P)
        h.update(C if r & 1 else P)
        C = h.digest()
    if kind == "5":
        triples = [(0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
                   (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29)]
        tail, tail_chars = (C[31] << 8) | C[30], 3
    else:
        triples = [(0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4),
                   (47, 5, 26), (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51),
                   (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13), (56, 14, 35),
                   (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19),
                   (62, 20, 41)]
        tail, tail_chars = C[63], 2
    out = ""
    for b2, b1, b0 in triples:
        w = (C[b2] << 16) | (C[b1] << 8) | C[b0]
        for _ in range(4):
            out += ITOA64[w & 63]
            w >>= 6
    for _ in range(tail_chars):
        out += ITOA64[tail & 63]
        tail >>= 6
    return "$%s$rounds=%d$%s$%s" % (kind, rounds, salt.decode(), out)


@pytest.mark.parametrize("kind", ["5", "6"])
def test_sha_crypt_matches_naive_oracle_long_passwords(kind):
    """Lengths beyond the 511 bytes libxcrypt accepts, incl. DP chunking edges."""
    rng = random.Random(SEED + 6)
    for n in (0, 1, 63, 64, 65, 511, 512, 1000, 1024, 1025, 4096, 5000):
        pw = bytes(rng.randrange(256) for _ in range(n))
        for salt, rounds in (("saltstring", 1000), ("0123456789abcdefXX", 1042)):
            setting = "$%s$rounds=%d$%s" % (kind, rounds, salt)
            assert hh.sha_crypt(pw, setting) == naive_sha_crypt(pw, salt, rounds, kind), n


# ------------------------------------------------------------------ bcrypt --

def test_bcrypt_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # makes `import bcrypt` fail
    with pytest.raises(hh.BcryptMissing):
        hh.verify_password(b"pw", "$2y$05$abcdefghijklmnopqrstuuMK5B7vwMx3uJEYOfaNbNCB4Bn3aLTo6")
    assert not issubclass(hh.BcryptMissing, hh.UnsupportedHash)


def test_bcrypt_variants_and_edge_cases():
    bcrypt = pytest.importorskip("bcrypt")
    for prefix in (b"2a", b"2b"):
        stored = bcrypt.hashpw(b"pw:\xc3\xa9", bcrypt.gensalt(4, prefix=prefix)).decode()
        assert stored.startswith("$%s$" % prefix.decode())
        assert hh.hash_kind(stored) == "bcrypt"
        assert_verifies(b"pw:\xc3\xa9", stored)
    stored = bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(4)).decode()
    assert hh.verify_password(b"a" * 72, stored) is True
    assert hh.verify_password(b"a" * 73, stored) is False
    assert hh.verify_password(b"a" * 71, stored) is False
    assert hh.verify_password(b"a\x00b", stored) is False
    empty = bcrypt.hashpw(b"", bcrypt.gensalt(4)).decode()
    assert hh.verify_password(b"", empty) is True
    for nul in (b"\x00", b"\x00\x00", b"\x00" * 72):  # bcrypt itself says True here
        assert bcrypt.checkpw(nul, empty.encode()) and hh.verify_password(nul, empty) is False
    for bad in ("$2y$", "$2y$05$", "$2y$05$short", "$2b$99$" + "a" * 53, "$2y$05$" + "é" * 53,
                stored[:-1], stored + "x", stored[:30], "$2a$\udcff"):
        assert hh.verify_password(b"pw", bad) is False, bad


# ------------------------------------------------------------------ timing --

def test_sha512_default_rounds_is_fast():
    import statistics
    import time
    stored = hh.make_sha512_crypt(b"correct horse battery staple")
    times = []
    for _ in range(20):
        t = time.perf_counter()
        hh.verify_password(b"correct horse battery staple", stored)
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.05
