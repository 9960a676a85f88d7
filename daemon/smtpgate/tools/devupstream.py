"""The embedded upstream of `--dev`: an aiosmtpd server inside the daemon.

It accepts every message and writes it as an .eml file into a folder, so a
new user sees the whole path (hand-off, spool, SMTP relay) work on a fresh
machine without a mail server of their own. Never for production: it
accepts anything from anyone on loopback.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP


class MaildirHandler:
    def __init__(self, folder: Path, log):
        self.folder = folder
        self.log = log
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{self.count:06d}.eml"
        header = (f"X-Smtpgate-Dev-Envelope-From: {envelope.mail_from}\r\n"
                  f"X-Smtpgate-Dev-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n").encode()
        data = header + envelope.original_content
        path = self.folder / name
        await asyncio.get_running_loop().run_in_executor(None, path.write_bytes, data)
        self.log.info("dev_upstream_received", file=str(path), rcpts=len(envelope.rcpt_tos))
        return f"250 2.0.0 Ok: written to {name}"


async def start_dev_upstream(folder: str, log, host: str = "127.0.0.1"):
    """Start the embedded upstream on a free loopback port; return (server, port)."""
    path = Path(folder)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, functools.partial(path.mkdir, parents=True, exist_ok=True))
    handler = MaildirHandler(path, log)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="smtpgate-dev", decode_data=False,
                     data_size_limit=None, enable_SMTPUTF8=True),
        host, 0)
    port = server.sockets[0].getsockname()[1]
    log.info("dev_upstream_started", address=f"{host}:{port}", maildir=str(path))
    return server, port
