"""The C client (clients/c): built with the real compiler, run for real.

- `make -C clients/c test`: the C unit tests (JSON writer, UTF-8 check, reply
  reader without a socket, the context over a Unix socket), again under
  AddressSanitizer + UBSan, and under valgrind.
- libsmtpgate.so loaded with ctypes: the JSON it writes, checked against
  Python's strict UTF-8 decoder and json module for arbitrary input.
- `Peer`, a throwaway server on a real socket speaking the protocol's bytes,
  for what the real daemon cannot be made to answer on demand (BUSY, a WAIT
  that says "failed", a reply that never comes), and to read the exact bytes.
- The real daemon relaying to the real aiosmtpd upstream (conftest.py):
  UTF-8 and attachments arrive intact, Unix socket, failover, refusals, a
  daemon that is down, --wait, AUTH; the library API over ctypes.
"""

from __future__ import annotations

from itertools import pairwise
import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import select
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from support import read_line, stuck_listener, wait_until

ROOT = Path(__file__).resolve().parent.parent
CDIR = ROOT / "clients" / "c"
BUILD = CDIR / "build"
SEND = BUILD / "smtpgate-send"

# smtpgate-send exit codes (docs/exit-codes.md)
QUEUED, USAGE, DATAERR, NOINPUT, NOUSER, FAILED, UNREACHABLE, NOPERM = 0, 64, 65, 66, 67, 69, 75, 77
NOT_FINAL = UNREACHABLE


@pytest.fixture(scope="module")
def built():
    """`make -C clients/c` once per run; the products must all be there."""
    proc = subprocess.run(["make", "-s", "-C", str(CDIR)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("smtpgate-send", "libsmtpgate.a", "libsmtpgate.so", "libsmtpgate.so.0", "smtpgate.pc"):
        assert (BUILD / name).exists(), name
    return BUILD


def run_send(args: list[str], body: bytes | str = b"", env: dict | None = None, timeout: float = 30):
    """Runs smtpgate-send with a clean environment; returns the CompletedProcess (text)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    data = body.encode() if isinstance(body, str) else body
    proc = subprocess.run([str(SEND), *args], input=data, capture_output=True, timeout=timeout,
                          env={**clean, **(env or {})})
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def dead_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- a throwaway peer on a real socket ----------------------------------------

class Peer:
    """Listens on 127.0.0.1 (or a Unix path); records each connection's bytes and
    answers every request line with `answer(line) -> bytes | None` (None: no reply)."""

    def __init__(self, answer, unix_path: str | None = None, ipv6: bool = False):
        self.answer = answer
        family = socket.AF_UNIX if unix_path else socket.AF_INET6 if ipv6 else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.bind(unix_path or ("::1" if ipv6 else "127.0.0.1", 0))
        self.sock.listen(8)
        port = None if unix_path else self.sock.getsockname()[1]
        self.uri = f"unix://{unix_path}" if unix_path else f"tcp://[::1]:{port}" if ipv6 else f"tcp://127.0.0.1:{port}"
        self.connections: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(bytearray())
            threading.Thread(target=self._serve, args=(conn, self.connections[-1]), daemon=True).start()

    def _serve(self, conn: socket.socket, seen: bytearray):
        with conn:
            conn.settimeout(15)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                start = len(seen)
                seen += data
                for line in bytes(seen[seen.rfind(b"\n", 0, start) + 1:]).split(b"\n")[:-1]:
                    reply = self.answer(line)
                    if reply:
                        conn.sendall(reply)

    def close(self):
        # shutdown first: close() alone leaves the accept() blocked in the
        # other thread holding the listening socket, which goes on answering
        # with this test's script on its port for the rest of the run.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def replies(**by_verb: bytes):
    """An answer function: the reply for each verb (default OK PONG / OK for AUTH)."""
    table = {"PING": b"OK PONG\r\n", "AUTH": b"OK\r\n", **by_verb}
    return lambda line: table.get(line.split(b" ", 1)[0].decode(), b"ERR BAD_REQUEST unknown\r\n")


@pytest.fixture
def peer():
    made: list[Peer] = []

    def make(answer=None, unix_path=None, ipv6=False, **by_verb) -> Peer:
        made.append(Peer(answer or replies(**by_verb), unix_path, ipv6))
        return made[-1]

    yield make
    for p in made:
        p.close()


# -- the C unit tests ----------------------------------------------------------

def test_make_test_runs_unit_tests_plain_under_sanitizers_and_valgrind(built):
    proc = subprocess.run(["make", "-C", str(CDIR), "test"], capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for name in ("test_json", "test_reader", "test_msg", "test_net"):
        assert f"== build/{name}" in out and f"== build/asan/{name}" in out
        if shutil.which("valgrind"):
            assert f"== valgrind build/{name}" in out
    assert "FAIL" not in out
    assert out.count(" 0 failed") == 8


def test_install_puts_library_header_and_pkgconfig_under_destdir(built, tmp_path):
    proc = subprocess.run(["make", "-s", "-C", str(CDIR), "install", "PREFIX=/opt/sg", f"DESTDIR={tmp_path}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "opt" / "sg"
    for rel in ("bin/smtpgate-send", "bin/smtpgate-sendmail", "share/man/man1/smtpgate-send.1",
                "include/smtpgate.h", "lib/libsmtpgate.a", "lib/libsmtpgate.so", "lib/libsmtpgate.so.0",
                "lib/pkgconfig/smtpgate.pc"):
        assert (root / rel).exists(), rel
    pc = (root / "lib/pkgconfig/smtpgate.pc").read_text()
    assert "prefix=/opt/sg" in pc and "-lsmtpgate" in pc and re.search(r"Version: \d+\.\d+\.\d+", pc)
    if shutil.which("pkg-config"):
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "smtpgate"], capture_output=True, text=True,
                               env={**os.environ, "PKG_CONFIG_PATH": str(root / "lib/pkgconfig")}).stdout.split()
        assert flags == ["-I/opt/sg/include", "-L/opt/sg/lib", "-lsmtpgate"]
    # A program built against the installed copy (as pkg-config would tell it) links.
    prog = tmp_path / "prog.c"
    prog.write_text('#include <smtpgate.h>\n#include <stdio.h>\nint main(void){smtpgate_msg *m=smtpgate_msg_new();'
                    'smtpgate_msg_free(m);puts(SMTPGATE_VERSION);return 0;}\n')
    cc = subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", f"-I{root}/include", str(prog),
                         f"{root}/lib/libsmtpgate.a", "-o", str(tmp_path / "prog")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    assert subprocess.run([str(tmp_path / "prog")], capture_output=True, text=True).stdout.strip() == "0.1.0"
    # The shared library exports the public API and nothing internal.
    if shutil.which("nm"):
        nm = subprocess.run(["nm", "-D", "--defined-only", str(root / "lib/libsmtpgate.so")],
                            capture_output=True, text=True, check=True).stdout
        exported = {line.split()[-1].split("@")[0] for line in nm.splitlines() if line.split()[1] in "TDBR"}
        assert "smtpgate_send" in exported and all(name.startswith("smtpgate_") for name in exported), exported


def test_uninstalled_pkgconfig_builds_a_program_that_runs_against_the_build(built, tmp_path):
    """`PKG_CONFIG_PATH=clients/c/build pkg-config ...` before `make install`, from another directory."""
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "smtpgate"], capture_output=True, text=True,
                           check=True, env={**os.environ, "PKG_CONFIG_PATH": str(BUILD)}).stdout.split()
    assert flags == [f"-I{CDIR}/include", f"-L{BUILD}", f"-Wl,-rpath,{BUILD}", "-lsmtpgate"]
    prog = tmp_path / "prog.c"
    prog.write_text('#include <smtpgate.h>\n#include <stdio.h>\n#include <stdlib.h>\n'
                    'int main(void){smtpgate_msg *m=smtpgate_msg_new();smtpgate_msg_set_from(m,"a@example.com");'
                    'smtpgate_msg_add_to(m,"b@example.org");char *json=smtpgate_msg_json(m,NULL);printf("%s %s\\n",SMTPGATE_VERSION,json);'
                    'free(json);smtpgate_msg_free(m);return 0;}\n')
    cc = subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", "prog.c", *flags, "-o", "prog"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    run = subprocess.run(["./prog"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stdout) == (0, '0.1.0 {"from":"a@example.com","to":["b@example.org"]}\n'), run.stderr
    # Linked against the shared library in build/, found through the rpath.
    ldd = subprocess.run(["ldd", "prog"], cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert f"libsmtpgate.so.0 => {BUILD}/libsmtpgate.so.0" in ldd, ldd


# -- the library through ctypes -----------------------------------------------

class Ctx(ctypes.Structure):
    _fields_ = [("err", ctypes.c_int), ("errstr", ctypes.c_char * 128), ("code", ctypes.c_char * 32),
                ("fd", ctypes.c_int)]


class Reply(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("payload", ctypes.c_char_p), ("len", ctypes.c_size_t),
                ("code", ctypes.c_char * 32)]


ERR_IO, ERR_EOF, ERR_PROTOCOL, ERR_OOM, ERR_TIMEOUT, ERR_SERVER, ERR_INVALID = 1, 3, 4, 5, 6, 7, 8


class Lib:
    """libsmtpgate.so with the prototypes the tests use."""

    def __init__(self, path: Path):
        lib = self.lib = ctypes.CDLL(str(path))
        P, S, I, Z = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
        sigs = {
            "smtpgate_connect": ([S, I], ctypes.POINTER(Ctx)), "smtpgate_free": ([ctypes.POINTER(Ctx)], None),
            "smtpgate_msg_new": ([], P), "smtpgate_msg_free": ([P], None), "smtpgate_msg_error": ([P], S),
            "smtpgate_msg_json": ([P, ctypes.POINTER(Z)], P),
            "smtpgate_msg_set_text_n": ([P, S, Z], I), "smtpgate_msg_set_html_n": ([P, S, Z], I),
            "smtpgate_msg_attach": ([P, S, S, S, S, Z], I), "smtpgate_msg_attach_file": ([P, S, S, S], I),
            "smtpgate_msg_add_header": ([P, S, S], I),
            "smtpgate_send": ([ctypes.POINTER(Ctx), P, S, Z], I),
            "smtpgate_status": ([ctypes.POINTER(Ctx), S, ctypes.POINTER(I), ctypes.POINTER(P)], I),
            "smtpgate_wait": ([ctypes.POINTER(Ctx), S, I, ctypes.POINTER(I), ctypes.POINTER(P)], I),
            "smtpgate_ping": ([ctypes.POINTER(Ctx)], I), "smtpgate_auth": ([ctypes.POINTER(Ctx), S], I),
            "smtpgate_command": ([ctypes.POINTER(Ctx), S, ctypes.POINTER(P)], I),
            "smtpgate_set_timeout": ([ctypes.POINTER(Ctx), I], I),
            "smtpgate_reader_new": ([Z], P), "smtpgate_reader_free": ([P], None),
            "smtpgate_reader_feed": ([P, S, Z], I),
            "smtpgate_reader_get_reply": ([P, ctypes.POINTER(ctypes.POINTER(Reply))], I),
            "smtpgate_reply_free": ([ctypes.POINTER(Reply)], None),
        }
        for field in ("from", "subject", "text", "html", "idempotency_key"):
            sigs[f"smtpgate_msg_set_{field}"] = ([P, S], I)
        for field in ("to", "cc", "bcc", "reply_to"):
            sigs[f"smtpgate_msg_add_{field}"] = ([P, S], I)
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        self.libc = ctypes.CDLL(None)
        self.libc.free.argtypes = [ctypes.c_void_p]

    def take(self, ptr) -> bytes:
        """The C string at ptr (malloc'd by the library), freed."""
        data = ctypes.string_at(ptr)
        self.libc.free(ptr)
        return data

    def message(self, fields: dict) -> int:
        """A smtpgate_msg from a dict shaped like the SEND JSON (strings given as str or bytes)."""
        m = self.lib.smtpgate_msg_new()
        enc = lambda v: v if isinstance(v, bytes) else v.encode()  # noqa: E731
        for key, value in fields.items():
            if key in ("to", "cc", "bcc", "reply_to"):
                for item in ([value] if isinstance(value, (str, bytes)) else value):
                    getattr(self.lib, f"smtpgate_msg_add_{key}")(m, enc(item))
            elif key in ("text", "html"):
                getattr(self.lib, f"smtpgate_msg_set_{key}_n")(m, enc(value), len(enc(value)))
            elif key == "headers":
                for name, val in value.items():
                    self.lib.smtpgate_msg_add_header(m, enc(name), enc(val))
            elif key == "attachments":
                for a in value:
                    self.lib.smtpgate_msg_attach(m, enc(a["filename"]), a.get("content_type") and enc(a["content_type"]),
                                                 None, a["data"], len(a["data"]))
            else:
                getattr(self.lib, f"smtpgate_msg_set_{key}")(m, enc(value))
        return m

    def json_of(self, fields: dict) -> tuple[bytes | None, str | None]:
        """(the JSON the library writes, None) or (None, its error)."""
        m = self.message(fields)
        try:
            err = self.lib.smtpgate_msg_error(m)
            ptr = self.lib.smtpgate_msg_json(m, None)
            return (self.take(ptr) if ptr else None), (err.decode() if err else None)
        finally:
            self.lib.smtpgate_msg_free(m)

    def connect(self, uri: str, timeout_ms: int = 5000):
        ctx = self.lib.smtpgate_connect(uri.encode(), timeout_ms)
        assert ctx, "out of memory"
        return ctx

    def send(self, ctx, fields: dict) -> str | None:
        m = self.message(fields)
        buf = ctypes.create_string_buffer(128)
        try:
            rc = self.lib.smtpgate_send(ctx, m, buf, 128)
        finally:
            self.lib.smtpgate_msg_free(m)
        return buf.value.decode() if rc == 0 else None

    def state(self, ctx, verb: str, msg_id: str, seconds: int = 0) -> tuple[int, dict | None]:
        state, out = ctypes.c_int(-1), ctypes.c_void_p()
        if verb == "wait":
            rc = self.lib.smtpgate_wait(ctx, msg_id.encode(), seconds, ctypes.byref(state), ctypes.byref(out))
        else:
            rc = self.lib.smtpgate_status(ctx, msg_id.encode(), ctypes.byref(state), ctypes.byref(out))
        return (state.value, json.loads(self.take(out.value))) if rc == 0 else (rc, None)


@pytest.fixture(scope="module")
def lib(built):
    return Lib(built / "libsmtpgate.so")


STATE_SENT, STATE_FAILED = 4, 5


@settings(max_examples=300, deadline=None)
@given(subject=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
       text=st.text(alphabet=st.characters(blacklist_categories=("Cs",))),
       to=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
                   min_size=1, max_size=3))
def test_any_unicode_is_written_as_json_that_python_reads_back_exactly(lib, subject, text, to):
    written, err = lib.json_of({"from": "a@example.com", "to": to, "subject": subject, "text": text})
    assert err is None
    assert b"\n" not in written and b"\r" not in written  # one protocol line, whatever the input
    assert json.loads(written.decode("utf-8")) == {"from": "a@example.com", "to": to, "subject": subject,
                                                   "text": text}


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=12))
def test_bytes_are_accepted_exactly_when_they_are_valid_utf8(lib, raw):
    """Differential test of the UTF-8 check against Python's strict decoder."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        decoded = None
    written, err = lib.json_of({"from": "a@example.com", "to": "b@example.org", "text": raw})
    if decoded is None:
        assert written is None and err.startswith("text: invalid UTF-8 at byte ")
    else:
        assert err is None and json.loads(written)["text"] == decoded


def read_replies(lib, chunks: list[bytes], max_line: int = 0) -> tuple[list[tuple], bool]:
    """Feeds chunks to a reply reader, taking replies out after each; (replies, error seen)."""
    reader = lib.lib.smtpgate_reader_new(max_line)
    got, failed = [], False
    try:
        for chunk in chunks:
            if lib.lib.smtpgate_reader_feed(reader, chunk, len(chunk)) != 0:
                return got, True
            reply = ctypes.POINTER(Reply)()
            while True:
                if lib.lib.smtpgate_reader_get_reply(reader, ctypes.byref(reply)) != 0:
                    return got, True
                if not reply:
                    break
                r = reply.contents
                got.append(("OK", r.payload) if r.type == 1 else ("ERR", r.code, r.payload))
                lib.lib.smtpgate_reply_free(reply)
        return got, failed
    finally:
        lib.lib.smtpgate_reader_free(reader)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)] or [b""]


# Payload bytes: anything but the line ends and NUL (a reply line never carries them).
printable = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00"))
code = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=20).map(str.encode)
reply_model = st.one_of(st.tuples(st.just("OK"), printable),
                        st.tuples(st.just("ERR"), code, printable.map(lambda b: b.lstrip(b" "))))


@settings(max_examples=300, deadline=None)
@given(replies_=st.lists(reply_model, max_size=8), cuts=st.lists(st.integers(0, 10_000), max_size=12),
       bare_lf=st.booleans())
def test_reply_reader_matches_the_protocol_model_however_the_bytes_are_split(lib, replies_, cuts, bare_lf):
    end = b"\n" if bare_lf else b"\r\n"
    wire = b"".join((b"OK" + (b" " + r[1] if r[1] else b"") if r[0] == "OK" else
                     b"ERR " + r[1] + (b" " + r[2] if r[2] else b"")) + end for r in replies_)
    expected = [("OK", r[1]) if r[0] == "OK" else ("ERR", r[1], r[2]) for r in replies_]
    assert read_replies(lib, split_at(wire, cuts)) == (expected, False)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_reply_reader_never_accepts_what_is_not_a_reply(lib, data, cuts):
    """Arbitrary bytes: each reply taken out is a well-formed line of the input; anything else is an error."""
    got, failed = read_replies(lib, split_at(data, cuts), max_line=64)
    lines = data.split(b"\n")
    complete = [line[:-1] if line.endswith(b"\r") else line for line in lines[:-1]]
    for i, reply in enumerate(got):
        line = complete[i]
        assert len(line) <= 64
        if reply[0] == "OK":
            assert line == b"OK" + (b" " + reply[1] if line != b"OK" else b"")
        else:
            assert line == b"ERR " + reply[1] + (b" " + reply[2] if len(line) > 4 + len(reply[1]) else b"")
    if not failed:  # every complete line was a reply, and the pending tail is within the limit
        assert len(got) == len(complete) and len(lines[-1]) <= 65


def test_attachments_from_memory_are_base64_and_type_guessed(lib):
    data = bytes(range(256)) * 3
    written, err = lib.json_of({"from": "a@example.com", "to": "b@example.org",
                                "attachments": [{"filename": "报告.pdf", "data": data},
                                                {"filename": "x.bin", "content_type": "application/x-y", "data": b""}]})
    assert err is None
    parts = json.loads(written)["attachments"]
    import base64
    assert parts[0] == {"filename": "报告.pdf", "content_type": "application/pdf",
                        "content_base64": base64.b64encode(data).decode()}
    assert parts[1] == {"filename": "x.bin", "content_type": "application/x-y", "content_base64": ""}


def test_library_wire_bytes_and_server_error_code_against_a_peer(lib, peer):
    p = peer(SEND=b"ERR DENIED recipient outside policy\r\n")
    ctx = lib.connect(p.uri)
    try:
        assert ctx.contents.err == 0
        assert lib.send(ctx, {"from": "a@example.com", "to": "b@example.org", "subject": "Ünïcødé\t\"q\"",
                              "text": "line1\r\nline2\x00"}) is None
        assert (ctx.contents.err, ctx.contents.code) == (ERR_SERVER, b"DENIED")
        assert ctx.contents.errstr == b"DENIED: recipient outside policy"
        assert lib.lib.smtpgate_ping(ctx) == 0  # an ERR reply leaves the connection usable
        assert bytes(p.connections[0]) == (
            'SEND {"from":"a@example.com","to":["b@example.org"],"subject":"Ünïcødé\\t\\"q\\"",'
            '"text":"line1\\r\\nline2\\u0000"}\nPING\n').encode()
        assert len(p.connections) == 1
    finally:
        lib.lib.smtpgate_free(ctx)


def test_library_timeout_when_no_reply_comes(lib, peer):
    p = peer(answer=lambda line: None)
    ctx = lib.connect(p.uri)
    try:
        lib.lib.smtpgate_set_timeout(ctx, 100)
        assert lib.lib.smtpgate_ping(ctx) == -1
        assert ctx.contents.err == ERR_TIMEOUT and ctx.contents.fd == -1
        assert p.uri.encode() in ctx.contents.errstr
    finally:
        lib.lib.smtpgate_free(ctx)


def test_library_connect_timeout_when_the_listen_queue_is_full(lib):
    """Non-blocking connect + poll: a SYN the kernel drops (accept queue full) ends at the timeout."""
    with stuck_listener() as stuck:
        ctx = lib.connect(stuck, 200)
        assert (ctx.contents.err, ctx.contents.fd) == (ERR_TIMEOUT, -1)
        assert ctx.contents.errstr.startswith(b"connect timed out: tcp://127.0.0.1:")
        lib.lib.smtpgate_free(ctx)


# -- smtpgate-send against a peer: bytes and exit codes ------------------------

def test_send_cli_wire_bytes_with_token_and_body_from_stdin(built, peer):
    p = peer(SEND=b"OK 01PEER\r\n")
    body = "第一行\n\"quoted\" \\ tab\t end\n"
    proc = run_send(["--server", p.uri, "-f", "Ops <ops@example.com>", "-t", "a@example.org", "-t", "b@example.org",
                     "-c", "c@example.org", "-b", "d@example.org", "-r", "help@example.com", "-s", "磁盘告警",
                     "-H", "X-Alert-Id: 42", "-k", "alert-42"], body, env={"SMTPGATE_TOKEN": "tok-123"})
    assert (proc.returncode, proc.stdout, proc.stderr) == (QUEUED, "01PEER\n", "")
    wire = bytes(p.connections[0])
    auth, send, rest = wire.split(b"\n")
    assert (auth, rest) == (b"AUTH tok-123", b"")
    assert send.startswith(b"SEND ")
    assert json.loads(send[5:]) == {
        "from": "Ops <ops@example.com>", "to": ["a@example.org", "b@example.org"], "cc": ["c@example.org"],
        "bcc": ["d@example.org"], "reply_to": ["help@example.com"], "subject": "磁盘告警", "text": body,
        "headers": {"X-Alert-Id": "42"}, "idempotency_key": "alert-42"}


def test_each_request_is_one_write_syscall(built, peer, tmp_path):
    """No request goes out in pieces (Nagle + delayed ACK would stall it)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    p = peer(SEND=b"OK 01PEER\r\n")
    trace = tmp_path / "trace.txt"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    proc = subprocess.run(["strace", "-qq", "-e", "trace=write,sendto,sendmsg,writev,setsockopt", "-e", "signal=none",
                           "-s", "8", "-o", str(trace), str(SEND), "--server", p.uri, "-f", "a@example.com",
                           "-t", "b@example.org", "-s", "big", "--html"],
                          input=b"<p>" + b"x" * 50000 + b"</p>", capture_output=True, timeout=30,
                          env={**clean, "SMTPGATE_TOKEN": "tok"})
    assert proc.returncode == QUEUED, proc.stderr
    writes = [w for w in trace.read_text().splitlines() if re.search(r"(write|sendto|sendmsg|writev)\(", w)]
    socket_writes = [w for w in writes if re.search(r'"(AUTH|SEND)', w)]
    assert len(socket_writes) == 2, "\n".join(writes)
    assert sum(int(w.rsplit("= ", 1)[1]) for w in socket_writes) == len(p.connections[0])
    assert len(p.connections[0]) > 50000
    assert re.search(r"setsockopt\(\d+, SOL_TCP, TCP_NODELAY, \[1\], 4\) = 0", trace.read_text())


def test_exit_codes_for_refused_busy_everywhere_and_usage(built, peer, tmp_path):
    message = ["-f", "a@example.com", "-t", "b@example.org", "-s", "s"]
    refused = peer(SEND=b"ERR BAD_ADDRESS not an address\r\n")
    busy = peer(SEND=b"ERR BUSY spool full\r\n")
    proc = run_send(["--server", refused.uri, "--server", busy.uri, *message], "x")
    assert proc.returncode == NOUSER and "BAD_ADDRESS: not an address" in proc.stderr
    assert proc.stdout == "" and busy.connections == []  # a refusal is not retried elsewhere

    proc = run_send(["--server", busy.uri, "--server", f"tcp://127.0.0.1:{dead_port()}", *message], "x")
    assert proc.returncode == UNREACHABLE
    assert "BUSY: spool full" in proc.stderr and "Connection refused" in proc.stderr

    assert run_send(message[:4], "x").returncode == USAGE  # no -s
    assert run_send([*message, "--bogus"], "x").returncode == USAGE
    assert run_send([*message, "-a", str(tmp_path / "missing.txt")], "x").returncode == NOINPUT
    bad = run_send(["--server", busy.uri, *message], b"caf\xe9")
    assert bad.returncode == DATAERR and "text: invalid UTF-8 at byte 3" in bad.stderr
    assert len(busy.connections) == 1  # invalid input never reached a daemon
    helped = run_send(["--help"])
    assert helped.returncode == 0 and "exit codes (sysexits.h" in helped.stdout and "SMTPGATE_TOKEN" in helped.stdout


def test_failover_past_a_busy_daemon_and_a_dead_one(built, peer):
    busy = peer(SEND=b"ERR INTERNAL disk error\r\n")
    good = peer(SEND=b"OK 01GOOD\r\n")
    proc = run_send(["--server", f"tcp://127.0.0.1:{dead_port()}", "--server", busy.uri, "--server", good.uri,
                     "-f", "a@example.com", "-t", "b@example.org", "-s", "s"], "body")
    assert (proc.returncode, proc.stdout) == (QUEUED, "01GOOD\n")
    assert len(busy.connections) == 1 and len(good.connections) == 1


@pytest.mark.parametrize("state, code", [("sent", QUEUED), ("failed", FAILED), ("deferred", NOT_FINAL)])
def test_wait_exit_code_follows_the_final_state(built, peer, state, code):
    reply = b'OK {"id":"01W","state":"%s","attempts":1,"recipients":[]}\r\n' % state.encode()
    p = peer(SEND=b"OK 01W\r\n", WAIT=reply)
    proc = run_send(["--server", p.uri, "--wait", "1", "-f", "a@example.com", "-t", "b@example.org", "-s", "s"], "x")
    assert (proc.returncode, proc.stdout) == (code, "01W\n")
    assert re.search(rb"\nWAIT 01W [01]\n", bytes(p.connections[0]))
    if code != QUEUED:
        assert state in proc.stderr


def test_smtpgate_send_is_clean_under_valgrind(built, peer, tmp_path):
    """The command itself (failover, attachment, --wait, error paths) leaks nothing and touches no bad memory."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (tests/setup.sh installs it)")
    p = peer(SEND=b"OK 01V\r\n", WAIT=b'OK {"id":"01V","state":"failed","recipients":[]}\r\n')
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 100)
    valgrind = ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=all",
                str(SEND)]
    common = ["-f", "a@example.com", "-t", "b@example.org", "-s", "s"]
    runs = [([f"--server=tcp://127.0.0.1:{dead_port()}", "--server", p.uri, *common, "-c", "c@example.org",
              "-a", str(tmp_path / "a.bin"), "-H", "X-A: 1", "--wait", "2"], FAILED),
            ([*common, "-a", str(tmp_path / "missing")], NOINPUT),
            ([f"--server=tcp://127.0.0.1:{dead_port()}", *common], UNREACHABLE)]
    for args, code in runs:
        proc = subprocess.run([*valgrind, *args], input=b"body", capture_output=True, timeout=60)
        assert proc.returncode == code, proc.stderr.decode()


def test_server_from_environment_and_ipv6_literal(built, peer, tmp_path):
    p = peer(SEND=b"OK 01ENV\r\n", unix_path=str(tmp_path / "peer.sock"))
    proc = run_send(["-f", "a@example.com", "-t", "b@example.org", "-s", "s"], "x", env={"SMTPGATE_SERVER": p.uri})
    assert (proc.returncode, proc.stdout) == (QUEUED, "01ENV\n")
    try:
        v6 = peer(SEND=b"OK 01V6\r\n", ipv6=True)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    proc = run_send(["--server", v6.uri, "-f", "a@example.com", "-t", "b@example.org", "-s", "s"], "x")
    assert (proc.returncode, proc.stdout, v6.uri.startswith("tcp://[::1]:")) == (QUEUED, "01V6\n", True)


# -- against the real daemon and upstream --------------------------------------
# Sends that reach the upstream use --wait, so each test ends with its message
# final: the daemon is then never stopped in the middle of a delivery.

def test_utf8_subject_and_body_arrive_intact(built, daemon, upstream):
    body = "今天我不回家\n晚饭自己吃。\nÜmlaut, emoji 😀, \"quotes\" and \\backslash\\\n"
    proc = run_send(["--server", daemon.uri, "--wait", "20", "-f", "监控 <monitor@example.com>",
                     "-t", "kelly@example.org", "-s", "记得收衣服 ✓"], body)
    assert proc.returncode == QUEUED, proc.stderr
    assert re.fullmatch(r"\S+\n", proc.stdout)
    got = upstream.wait_for(1)[0]
    assert got.mail_from == "monitor@example.com" and got.rcpt_tos == ["kelly@example.org"]
    msg = got.message
    assert msg["subject"] == "记得收衣服 ✓"
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == body


def test_attachment_from_a_file_arrives_intact_over_the_unix_socket(built, daemon, upstream, tmp_path):
    blob = os.urandom(300_000) + bytes(range(256))
    path = tmp_path / "graph.png"
    path.write_bytes(blob)
    proc = run_send(["--server", daemon.unix_uri, "--wait", "20", "-f", "a@example.com", "-t", "b@example.org", "-s", "graph",
                     "-a", str(path), "--html"], "<p>see <b>graph</b></p>")
    assert proc.returncode == QUEUED, proc.stderr
    msg = upstream.wait_for(1)[0].message
    parts = list(msg.iter_attachments())
    assert [(a.get_filename(), a.get_content_type()) for a in parts] == [("graph.png", "image/png")]
    assert parts[0].get_content() == blob
    assert "<b>graph</b>" in msg.get_body(("html",)).get_content()


def test_failover_to_the_daemon_and_daemon_down(built, daemon, upstream):
    proc = run_send(["--server", f"tcp://127.0.0.1:{dead_port()}", "--server", daemon.uri, "--wait", "20",
                     "-f", "a@example.com", "-t", "b@example.org", "-s", "failover"], "x")
    assert proc.returncode == QUEUED, proc.stderr
    assert "Connection refused" in proc.stderr  # the dead one is reported, then passed over
    assert upstream.wait_for(1)[0].message["subject"] == "failover"
    daemon.stop()
    down = run_send(["--server", daemon.uri, "--server", daemon.unix_uri, "-f", "a@example.com",
                     "-t", "b@example.org", "-s", "s"], "x")
    assert down.returncode == UNREACHABLE and down.stdout == ""
    assert daemon.uri in down.stderr and daemon.unix in down.stderr


def test_refused_request_exit_code(built, daemon, upstream):
    proc = run_send(["--server", daemon.uri, "-f", "a@example.com", "-t", "not an address", "-s", "s"], "x")
    assert proc.returncode == NOUSER and proc.stdout == ""
    assert "BAD_ADDRESS" in proc.stderr
    injected = run_send(["--server", daemon.uri, "-f", "a@example.com", "-t", "b@example.org",
                         "-s", "hi\r\nBcc: victim@example.net"], "x")
    assert injected.returncode == DATAERR and "BAD_HEADER" in injected.stderr
    assert upstream.messages == []


def test_wait_for_sent_and_for_failed(built, daemon, upstream):
    sent = run_send(["--server", daemon.uri, "--wait", "20", "-f", "a@example.com", "-t", "b@example.org",
                     "-s", "waited"], "x")
    assert sent.returncode == QUEUED, sent.stderr
    assert upstream.messages[0].message["subject"] == "waited"  # sent before the command returned
    upstream.script_rcpt("nobody@example.org", "550 5.1.1 no such user")
    failed = run_send(["--server", daemon.uri, "--wait", "20", "-f", "a@example.com",
                       "-t", "nobody@example.org", "-s", "bounce"], "x")
    assert failed.returncode == FAILED
    assert "550 5.1.1 no such user" in failed.stderr


def test_token_daemon_via_environment(built, make_daemon, upstream):
    daemon = make_daemon(tokens=["c-client-token-7b3e"])
    args = ["--server", daemon.uri, "-f", "a@example.com", "-t", "b@example.org", "-s", "s"]
    missing = run_send(args, "x")
    assert missing.returncode == NOPERM and "AUTH_REQUIRED" in missing.stderr
    wrong = run_send(args, "x", env={"SMTPGATE_TOKEN": "not-the-token"})
    assert wrong.returncode == NOPERM and "AUTH_FAILED" in wrong.stderr
    assert "not-the-token" not in wrong.stderr
    right = run_send([*args, "--wait", "20"], "x", env={"SMTPGATE_TOKEN": "c-client-token-7b3e"})
    assert right.returncode == QUEUED, right.stderr


def test_library_api_against_the_daemon(lib, daemon, upstream):
    ctx = lib.connect(daemon.uri)
    try:
        assert ctx.contents.err == 0 and lib.lib.smtpgate_ping(ctx) == 0
        payload = ctypes.c_void_p()
        assert lib.lib.smtpgate_command(ctx, b"HELLO 1", ctypes.byref(payload)) == 0
        assert lib.take(payload.value).startswith(b"smtpgate 1 ")
        msg_id = lib.send(ctx, {
            "from": "App <app@example.com>", "to": ["t@example.org"], "cc": "c@example.org",
            "bcc": "hidden@example.org", "reply_to": "r@example.com", "subject": "全部字段",
            "text": "plain ✓", "html": "<p>html ✓</p>", "headers": {"X-Ticket": "T-1"},
            "attachments": [{"filename": "a.txt", "data": "附件".encode()}]})
        assert msg_id, ctx.contents.errstr
        state, doc = lib.state(ctx, "wait", msg_id, 20)
        assert state == STATE_SENT and doc["id"] == msg_id and doc["state"] == "sent"
        got = upstream.messages[0]
        assert sorted(got.rcpt_tos) == ["c@example.org", "hidden@example.org", "t@example.org"]
        msg = got.message
        assert "hidden@example.org" not in got.data.decode(errors="replace")  # bcc: envelope only
        assert (msg["subject"], msg["x-ticket"], msg["reply-to"]) == ("全部字段", "T-1", "r@example.com")
        assert msg.get_body(("plain",)).get_content().strip() == "plain ✓"
        assert [a.get_payload(decode=True) for a in msg.iter_attachments()] == ["附件".encode()]
        state, doc = lib.state(ctx, "status", msg_id)
        assert state == STATE_SENT
        assert lib.state(ctx, "status", "01NOSUCHMESSAGE")[0] == -1
        assert (ctx.contents.err, ctx.contents.code) == (ERR_SERVER, b"NOT_FOUND")
        assert lib.lib.smtpgate_ping(ctx) == 0
    finally:
        lib.lib.smtpgate_free(ctx)


def test_readme_example_program_sends_and_waits(built, daemon, upstream):
    proc = subprocess.run([str(BUILD / "example_send_mail")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SMTPGATE_SERVER": daemon.uri})
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"queued as \S+\nsent\n", proc.stdout)
    msg = upstream.messages[0].message
    assert (msg["subject"], [a.get_filename() for a in msg.iter_attachments()]) == ("记得收衣服", ["note.txt"])


def test_library_reconnects_after_the_daemon_closed_an_idle_connection(lib, make_daemon, upstream):
    daemon = make_daemon(idle_timeout=0.3, tokens=["c-client-token-7b3e"])
    ctx = lib.connect(daemon.uri)
    try:
        assert lib.lib.smtpgate_auth(ctx, b"c-client-token-7b3e") == 0
        assert lib.lib.smtpgate_ping(ctx) == 0
        # Wait (bounded) until the daemon's close has reached the library's socket.
        poller = select.poll()
        poller.register(ctx.contents.fd, select.POLLIN)
        assert poller.poll(10_000), "the daemon did not close the idle connection"
        # A SEND without an idempotency key is never repeated, so it only succeeds if the
        # library saw the close before writing, connected again and repeated AUTH.
        msg_id = lib.send(ctx, {"from": "a@example.com", "to": "b@example.org", "subject": "after idle"})
        assert msg_id, ctx.contents.errstr
        assert lib.state(ctx, "wait", msg_id, 20)[0] == STATE_SENT
    finally:
        lib.lib.smtpgate_free(ctx)


def test_too_large_is_refused_and_the_library_connection_stays_usable(built, lib, make_daemon, upstream, tmp_path):
    daemon = make_daemon(max_message_size=100_000)  # request lines up to 2 x 100 kB + 64 KiB
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(300_000))  # 400 kB of base64: over the line limit, drained by the daemon
    proc = run_send(["--server", daemon.uri, "-f", "a@example.com", "-t", "b@example.org", "-s", "big",
                     "-a", str(big)], "x")
    assert proc.returncode == DATAERR and "TOO_LARGE" in proc.stderr
    ctx = lib.connect(daemon.uri)
    try:
        fields = {"from": "a@example.com", "to": "b@example.org", "subject": "big",
                  "attachments": [{"filename": "big.bin", "data": big.read_bytes()}]}
        assert lib.send(ctx, fields) is None
        assert (ctx.contents.err, ctx.contents.code) == (ERR_SERVER, b"TOO_LARGE")
        assert lib.lib.smtpgate_ping(ctx) == 0  # the line was read to its end, not left in the stream
    finally:
        lib.lib.smtpgate_free(ctx)
    assert upstream.messages == []


# -- review fixes: the token, the id buffer, failover, smtpgate-sendmail --------

SENDMAIL = BUILD / "smtpgate-sendmail"
SMTPGATE = Path(sys.executable).parent / "smtpgate"  # `smtpgate sendmail -bs` runs it
TOKEN = "c-client-token-7b3e"


def accepted(daemon) -> int:
    """The daemon's count of SENDs it stored since it started (STATS)."""
    return json.loads(daemon.request("STATS")[3:])["counters"]["accepted"]


def test_busy_at_auth_keeps_the_token_for_the_next_connection(lib, make_daemon, upstream):
    """A daemon at max_connections answers `ERR BUSY too many connections` to a
    new connection, whatever it sent: that says nothing of the token, which
    must still be sent after the reconnect (it was wiped: AUTH_REQUIRED forever)."""
    daemon = make_daemon(tokens=[TOKEN], max_connections=1)
    with daemon.connect() as held:  # the daemon's only place
        held.sendall(b"PING\n")
        assert read_line(held) == "OK PONG"
        ctx = lib.connect(daemon.uri)
        try:
            assert lib.lib.smtpgate_auth(ctx, TOKEN.encode()) == -1
            assert (ctx.contents.err, ctx.contents.code) == (ERR_SERVER, b"BUSY"), ctx.contents.errstr
        except BaseException:
            lib.lib.smtpgate_free(ctx)
            raise
    try:
        # The place is given back once the daemon sees `held` close (bounded).
        wait_until(lambda: lib.lib.smtpgate_ping(ctx) == 0 or ctx.contents.code != b"BUSY", 10, "free place")
        msg_id = lib.send(ctx, {"from": "a@example.com", "to": "b@example.org", "subject": "after BUSY"})
        assert msg_id, ctx.contents.errstr  # not "AUTH_REQUIRED: send AUTH <token> first"
        assert lib.state(ctx, "wait", msg_id, 20)[0] == STATE_SENT
    finally:
        lib.lib.smtpgate_free(ctx)


ID_BUFFER_PROGRAM = r"""
#include <stdio.h>
#include <smtpgate.h>
/* Each send with an id buffer that cannot take every id: what the call says,
 * and whether the request was written. */
int main(int argc, char **argv)
{
    smtpgate_ctx *c = smtpgate_connect(argv[1], 5000);
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, "a@example.com");
    smtpgate_msg_add_to(m, "b@example.org");
    smtpgate_msg_set_subject(m, "id buffer");
    char small[10];
    int rc;
    (void)argc;
    rc = smtpgate_send(c, m, small, sizeof small);
    printf("%d %d %d\n", rc, c->err, c->request_sent);
    fflush(stdout);
    rc = smtpgate_send(c, m, NULL, SMTPGATE_ID_SIZE);
    printf("%d %d %d\n", rc, c->err, c->request_sent);
    fflush(stdout);
    rc = smtpgate_send_json(c, "{\"from\":\"a@example.com\",\"to\":\"b@example.org\"}", NULL,
                            SMTPGATE_ID_SIZE);
    printf("%d %d %d\n", rc, c->err, c->request_sent);
    fflush(stdout);
    rc = smtpgate_ping(c);
    printf("%d %d\n", rc, c->err);
    smtpgate_msg_free(m);
    smtpgate_free(c);
    return 0;
}
"""


def test_id_buffer_is_checked_before_the_send_is_written(built, daemon, tmp_path):
    """A buffer too small for the id (or none) is SMTPGATE_ERR_INVALID, "refused
    before anything was sent": it was checked only after the daemon had stored
    the message (a caller's retry queued it twice), and a NULL id crashed."""
    prog = tmp_path / "id_buffer.c"
    prog.write_text(ID_BUFFER_PROGRAM)
    cc = subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", f"-I{CDIR}/include", str(prog),
                         str(BUILD / "libsmtpgate.a"), "-o", str(tmp_path / "id_buffer")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    run = subprocess.run([str(tmp_path / "id_buffer"), daemon.uri], capture_output=True, text=True, timeout=30)
    # Each refused with nothing written (request_sent 0), and not killed by SIGSEGV.
    assert run.stdout.splitlines() == [f"-1 {ERR_INVALID} 0"] * 3 + ["0 0"], (run.returncode, run.stderr)
    assert run.returncode == 0
    assert accepted(daemon) == 0  # nothing reached the daemon's spool


def stalled(daemon):
    """The daemon frozen (SIGSTOP): the kernel still completes connects and takes
    the request's bytes, but no reply comes until it is thawed (SIGCONT)."""
    import signal

    @contextlib.contextmanager
    def frozen():
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
    return frozen()


def test_send_that_went_out_unanswered_is_not_failed_over(built, make_daemon, upstream):
    """The first daemon takes the SEND's bytes but does not answer in time: it may
    store the message, so handing it to the second one too would deliver it twice."""
    first, second = make_daemon(), make_daemon()
    with stalled(first):
        proc = run_send(["--server", first.uri, "--server", second.uri, "--timeout", "1",
                         "-f", "a@example.com", "-t", "b@example.org", "-s", "stalled"], "x")
    assert (proc.returncode, proc.stdout) == (UNREACHABLE, ""), proc.stderr
    assert "read timed out" in proc.stderr and "outcome unknown" in proc.stderr
    assert "may deliver it twice" in proc.stderr and "-k KEY" in proc.stderr
    assert accepted(second) == 0  # never tried
    # Thawed, the first daemon reads the SEND and delivers it: once, not twice.
    assert [m.message["subject"] for m in upstream.wait_for(1)] == ["stalled"]
    assert accepted(first) == 1 and len(upstream.wait_for(2, timeout=1)) == 1


def test_keyed_send_unanswered_is_repeated_to_the_same_daemon_only(built, peer):
    """With -k, a SEND that went out unanswered is sent once more to the same
    daemon (a repeat with the key queues nothing new), never to the next one."""
    sends = []

    def first_send_unanswered(line):
        if line.startswith(b"SEND "):
            sends.append(line)
            return None if len(sends) == 1 else b"OK 01KEYED\r\n"
        return replies()(line)
    stalls, other = peer(answer=first_send_unanswered), peer(SEND=b"OK 01OTHER\r\n")
    proc = run_send(["--server", stalls.uri, "--server", other.uri, "--timeout", "1", "-k", "order-42",
                     "-f", "a@example.com", "-t", "b@example.org", "-s", "keyed"], "x")
    assert (proc.returncode, proc.stdout) == (QUEUED, "01KEYED\n"), proc.stderr
    assert "sending it again with its idempotency key" in proc.stderr
    assert other.connections == [] and len(stalls.connections) == 2
    assert sends[0] == sends[1] and json.loads(sends[0][5:])["idempotency_key"] == "order-42"


def test_send_help_and_exit_codes_doc_tell_the_unknown_outcome(built):
    helped = run_send(["--help"]).stdout
    assert "never\n                   once the SEND went out unanswered" in helped
    assert "maybe stored" in helped and "same -k to the same daemon" in helped
    doc = (ROOT / "docs" / "exit-codes.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| 75 |"))
    assert "no reply came" in row and "twice" in row


def run_sendmail(args: list[str], stdin: bytes = b"", env: dict | None = None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    path = f"{SMTPGATE.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run([str(SENDMAIL), *args], input=stdin, capture_output=True, timeout=30,
                          env={**clean, "PATH": path, "SMTPGATE_CONFIG": os.devnull, **(env or {})})


def test_sendmail_unresolvable_host_exits_68_and_help_alone_exits_0(built):
    proc = run_sendmail(["a@example.org"], b"Subject: s\n\nx\n", {"SMTPGATE_SERVER": "tcp://smtpgate.invalid:2526"})
    assert proc.returncode == 68, proc.stderr  # EX_NOHOST, as `smtpgate sendmail`
    assert b"cannot resolve the daemon's host in tcp://smtpgate.invalid:2526" in proc.stderr
    helped = run_sendmail(["--help"])
    assert (helped.returncode, helped.stderr) == (0, b"")
    text = helped.stdout.decode()
    assert "exit codes (sysexits.h" in text and "68  the daemon's host name does not resolve" in text
    python = subprocess.run([str(SMTPGATE), "sendmail", "--help"], capture_output=True, text=True, timeout=30)
    codes = lambda t: re.findall(r"^  (\d\d?)  ", t.split("exit codes")[1], re.M)  # noqa: E731
    assert set(codes(python.stdout)) <= set(codes(text))  # every code the Python command lists
    # Not among other words: in a mail() command line it stays an unknown option.
    assert run_sendmail(["-t", "--help"]).returncode == USAGE


BS_INJECTION = (b"EHLO form.test\r\nMAIL FROM:<shop@example.com>\r\nRCPT TO:<victim@example.net>\r\n"
                b"DATA\r\nSubject: chosen by the form\r\n\r\nspam\r\n.\r\nQUIT\r\n")


@pytest.mark.parametrize("args", [["-t", "-i", "-bs"], ["-fx@example.com", "-bs"], ["-bs", "-fx@example.com"],
                                  ["-bs", "kelly@example.org"], ["-bs", "-i", "-t"]])
def test_sendmail_bs_is_taken_only_first_with_at_most_i_or_v_after_it(built, daemon, upstream, args):
    """PHP appends mail()'s fifth parameter split at spaces: `-fx@example.com -bs` made a
    contact form's text (stdin) SMTP commands choosing their own recipients. Refused by
    the C command itself, before it runs `smtpgate sendmail -bs` (the Python rule)."""
    proc = run_sendmail(args, BS_INJECTION, {"SMTPGATE_SERVER": daemon.uri})
    assert proc.returncode == USAGE, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(b"smtpgate-sendmail: -bs (SMTP on stdin) is taken only as the first argument")
    assert proc.stdout == b"" and accepted(daemon) == 0
    # As mailers that speak SMTP name it (Symfony "-bs", Laravel "-bs -i"), it is the session it was.
    for n, ok in enumerate((["-bs"], ["-bs", "-i"]), 1):
        alone = run_sendmail(ok, BS_INJECTION.replace(b"victim@example.net", b"kelly@example.org"),
                             {"SMTPGATE_SERVER": daemon.uri})
        assert alone.returncode == 0 and b"250 2.0.0 OK queued as" in alone.stdout, alone.stderr
        assert [m.rcpt_tos for m in upstream.wait_for(n)] == [["kelly@example.org"]] * n
