"""`smtpgate demo`: run `serve --dev` in a temporary folder, send one
message through it, and show what the embedded upstream received."""

from __future__ import annotations

import email
import email.policy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from smtpgate.spool.schema import State
from smtpgate.tools.lineclient import LineClient

EX_OK, EX_SOFTWARE = 0, 70  # sysexits.h


def run_demo() -> int:
    """Start the daemon, hand it one message, wait for it, print it; the exit code."""
    with tempfile.TemporaryDirectory(prefix="smtpgate-demo-") as folder:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        cmd = [sys.executable, "-m", "smtpgate", "serve", "--dev", "--spool", folder,
               "--listen", f"127.0.0.1:{port}", "--log-format", "console", "--log-level", "warning"]
        print("$ " + " ".join(cmd[2:]).replace("-m smtpgate", "smtpgate"))
        daemon = subprocess.Popen(cmd)
        try:
            client = None
            for _ in range(200):
                try:
                    client = LineClient(f"tcp://127.0.0.1:{port}", timeout=30)
                    break
                except OSError:
                    if daemon.poll() is not None:
                        return EX_SOFTWARE
                    time.sleep(0.05)
            if client is None:
                print("smtpgate demo: the daemon did not start", file=sys.stderr)
                return EX_SOFTWARE
            with client:
                message = {"from": "App <app@example.com>", "to": "kelly@example.org",
                           "subject": "记得收衣服", "text": "今天我不回家。\nsmtpgate demo"}
                line = "SEND " + json.dumps(message, ensure_ascii=False, separators=(",", ":"))
                print(f"> {line}")
                msg_id = client.request(line)
                print(f"< OK {msg_id}")
                print(f"> WAIT {msg_id} 10")
                state = client.wait(msg_id, 10)
                print(f"< OK {json.dumps(state, ensure_ascii=False)}")
            maildir = os.path.join(folder, "dev-mail")
            for name in sorted(os.listdir(maildir)):
                with open(os.path.join(maildir, name), "rb") as fh:
                    print_received(name, fh.read())
            return EX_OK if state["state"] == State.SENT else EX_SOFTWARE
        finally:
            daemon.terminate()
            daemon.wait(30)


def print_received(name: str, raw: bytes) -> None:
    """The message as a mail reader shows it: the envelope, the header
    fields decoded (RFC 2047 encoded words) and the text decoded from its
    transfer encoding (base64, quoted-printable)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    print(f"\n--- the embedded upstream received {name} ({len(raw)} bytes on the wire):")
    print(f"envelope: {message['X-Smtpgate-Dev-Envelope-From']} -> "
          f"{message['X-Smtpgate-Dev-Envelope-To']}")
    for field in ("From", "To", "Cc", "Subject", "Date", "Message-ID"):
        if message[field] is not None:
            print(f"{field}: {message[field]}")
    body = message.get_body(("plain", "html"))
    print()
    print(body.get_content().replace("\r\n", "\n").rstrip("\n") if body is not None else "(no text part)")
