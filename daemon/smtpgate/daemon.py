"""`smtpgate serve`: a linear start, then serve until a signal.

config -> logging -> spool (locked, recovered before the first connection)
-> embedded dev upstream (--dev) -> the hand-off and the line door (own or
systemd sockets, bound) -> SMTP door -> delivery (and beside it the webhook
sender) -> READY=1 -> serve. The
addresses are bound before delivery starts, so an address in use stops
the start before any message is claimed; a start that fails closes what
it had started.
SIGTERM/SIGINT: stop the doors, let in-flight deliveries finish within the
grace period, keep the rest queued; a second one interrupts them at once.
SIGHUP: reload the configuration file. SIGUSR1: the queue tool changed the
spool (and a down upstream is probed at once).
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import time

from smtpgate import __version__
from smtpgate.config import Config, ConfigError, check_doors, load_config, parse_hostport
from smtpgate.log import get_logger, setup_logging
from smtpgate.spool.schema import UNFINISHED_STATES, State

STATUS_EVERY = 5.0
PURGE_EVERY = 300.0
STOP_GRACE = 20.0
# Descriptors a process needs besides its connections: stdio, the event
# loop's epoll and wake-up pair, the listening sockets, the spool's lock,
# database, -wal and -shm, the pipes to and from each child, the spare of
# intake/acceptor.py; with room to spare.
FD_MARGIN = 64


def delivery_settings(config: Config, dev_port: int | None = None):
    """Build the delivery layer's settings (upstreams, pool, retries) from the config."""
    from smtpgate.delivery.settings import DeliverySettings
    from smtpgate.smtp import Timeouts, UpstreamSettings
    from smtpgate.webhooks.sender import webhook_settings

    command = config.upstream_command_timeout
    timeouts = Timeouts(
        connect=config.upstream_connect_timeout, tls_handshake=config.upstream_tls_timeout,
        greeting=config.upstream_greeting_timeout, command=command, mail=command, rcpt=command,
        data_init=config.upstream_data_timeout, data_block=config.upstream_data_block_timeout,
        data_end=config.upstream_data_end_timeout)
    if dev_port is not None and not config.upstream:
        upstreams = [UpstreamSettings(host="127.0.0.1", port=dev_port, tls="none",
                                      helo_name=config.helo_name, timeouts=timeouts)]
    else:
        upstreams = []
        for value in config.upstream:
            host, port = parse_hostport(value, "upstream")
            upstreams.append(UpstreamSettings(
                host=host, port=port, tls=config.upstream_tls,
                username=config.upstream_user, password=config.upstream_password,
                xoauth2_token=config.upstream_oauth2_token,
                allow_plaintext_auth=config.upstream_allow_plaintext_auth,
                ca_file=config.upstream_ca_file, verify=config.upstream_verify,
                helo_name=config.helo_name, timeouts=timeouts))
    return DeliverySettings(
        upstreams=upstreams,
        connections_per_upstream=config.connections_per_upstream,
        max_age=config.max_age,
        retry_base=config.retry_base,
        retry_max=config.retry_max,
        rate_per_minute=config.rate_per_minute,
        idle_timeout=config.upstream_idle_timeout,
        probe_base=config.upstream_probe_base,
        probe_max=config.upstream_probe_max,
        nice=config.delivery_nice,
        webhooks=webhook_settings(config),
        figures=bool(config.http_listen),
    )


class Daemon:
    def __init__(self, config: Config, config_path: str | None, overrides: dict, loop: str = "asyncio"):
        self.config = config
        self.loop_name = loop  # the event loop running this (eventloop.py), the delivery process's too
        self.config_path = config_path
        self.overrides = overrides
        self.log = get_logger()
        self.stopping = asyncio.Event()
        self.dev_server = None
        self.dev_port = None
        self.smtp_server = None
        self.http = None
        self.exit_code = 0
        self.spool_lost = False

    async def run(self) -> int:
        from smtpgate import systemd
        from smtpgate.delivery.process import DeliveryProcess
        from smtpgate.intake.handoff import Handoff
        from smtpgate.intake.limits import Limits
        from smtpgate.intake.line_door import LineDoor
        from smtpgate.spool.store import Spool

        config = self.config
        loop = asyncio.get_running_loop()
        inherited = systemd.listen_fds()
        self.spool = Spool(config.spool, **spool_limits(config))
        await self.spool.open()
        for path, mode in self.spool.modes_fixed:
            # The spool directory is the one directory make_private() fixes.
            self.log.warning("spool_mode_fixed", path=path, was=f"{mode:04o}",
                             now="0700" if path == self.spool.path_dir else "0600")
        self.spool.on_writer_lost = self._spool_lost
        if self.spool.schema_upgrade:
            old, new = self.spool.schema_upgrade
            self.log.info("spool_upgraded", spool=config.spool, schema_from=old, schema_to=new)
        self.delivery = None
        try:
            if config.dev:
                from smtpgate.tools.devupstream import start_dev_upstream
                folder = config.dev_maildir or os.path.join(config.spool, "dev-mail")
                self.dev_server, self.dev_port = await start_dev_upstream(folder, self.log)
            self.delivery = DeliveryProcess(self.spool, delivery_settings(config, self.dev_port), self.log,
                                            log_format=config.log_format, log_level=config.log_level,
                                            on_lost=self._delivery_lost, loop=self.loop_name)
            self.handoff = handoff = Handoff(config, self.spool, self.delivery, self.log)
            limits = Limits(config, self.log)
            self.line_door = LineDoor(config, handoff, self.spool, self.log, limits)
            await self.line_door.start(inherited)
            check_doors(config, self.bound_doors())  # systemd's sockets are not in the file
            if config.smtp_listen:
                from smtpgate.intake.smtp_door import start_smtp_intake
                host, port = parse_hostport(config.smtp_listen, "smtp_listen")
                # The hand-off's callers: a SIGHUP that changes them applies here too.
                self.smtp_server = await start_smtp_intake(
                    host, port, enqueue=handoff.take_raw, callers=handoff.callers,
                    max_message_bytes=config.max_message_size, log=self.log,
                    hostname=config.helo_name, limits=limits)
            if config.http_listen:
                from smtpgate.http.server import HttpSide
                self.http = HttpSide(config, door=self.line_door, spool=self.spool, delivery=self.delivery,
                                     limits=limits, callers=handoff.callers,
                                     queue_changed=self._queue_changed_here, log=self.log)
                await self.http.start()
            if not config.hold:
                await self.delivery.start()  # and with it the webhook sender
        except BaseException:
            await self._close_started()
            raise

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        # `smtpgate queue retry|delete` changed the spool behind our back.
        loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(self.queue_changed()))
        systemd.notify("READY=1", f"STATUS=serving, version {__version__}")
        await self.line_door.start_serving()
        if self.http is not None:
            await self.http.start_serving()
        self.log.info("started", version=__version__, pid=os.getpid(), event_loop=self.loop_name,
                      upstreams=config.upstream or (["dev"] if config.dev else []))
        housekeeping = asyncio.create_task(self._housekeeping(systemd))
        await self.stopping.wait()

        self.log.info("stopping", grace=STOP_GRACE)
        systemd.notify("STOPPING=1")
        housekeeping.cancel()
        if self.smtp_server is not None:
            self.smtp_server.close()
        if self.http is not None:
            await self.http.close()
        if self.spool_lost and not self.config.hold:
            # No outcome can be recorded any more, so every message delivery
            # started from now on would be sent again after the restart (up
            # to CLAIM_AHEAD x workers claimed ahead): stop it before the
            # intake's grace period rather than after.
            await self.delivery.stop(STOP_GRACE)
        await self.line_door.close(grace=2.0)
        if not self.config.hold:
            await self.delivery.stop(STOP_GRACE)
        if self.dev_server is not None:
            self.dev_server.close()
        await self.spool.close()
        self.log.info("stopped")
        return self.exit_code

    async def _close_started(self) -> None:
        """A start that failed half-way: stop what it had started, in order."""
        if self.smtp_server is not None:
            self.smtp_server.close()
        if self.http is not None:
            await self.http.close()
        if self.delivery is not None:
            await self.delivery.stop(0)
        if self.dev_server is not None:
            self.dev_server.close()
        await self.spool.close()

    def _stop_signal(self) -> None:
        """SIGTERM/SIGINT: stop; a second one while stopping interrupts the
        deliveries the stop waits for (their messages stay queued)."""
        if not self.stopping.is_set():
            self.stopping.set()
            return
        self.log.warning("stopping_now", note="second signal: deliveries in flight are interrupted; "
                         "their messages stay queued")
        if self.delivery is not None:
            self.delivery.stop_now()

    def _delivery_lost(self, why: str) -> None:
        """Claimed messages would stay 'sending' until a restart: restart now
        (the next start puts them back to 'queued')."""
        self.exit_code = 70  # EX_SOFTWARE
        self.stopping.set()

    def _spool_lost(self, why: str) -> None:
        """Nothing can be stored any more: stop, so that the service
        manager starts a fresh daemon (what was committed is on disk)."""
        self.log.error("spool_failed", error=why)
        self.spool_lost = True
        self.exit_code = 73  # EX_CANTCREAT, as when the spool cannot be opened
        self.stopping.set()

    async def _housekeeping(self, systemd) -> None:
        watchdog = systemd.watchdog_interval()
        tick = min(STATUS_EVERY, watchdog) if watchdog else STATUS_EVERY
        last_purge = 0.0
        delivered, last_delivery = 0, ""
        while True:
            if watchdog:
                systemd.notify("WATCHDOG=1")
            try:
                stats = await self.spool.stats()
                states = stats["states"]
                if stats["counters"]["delivered"] != delivered:
                    delivered = stats["counters"]["delivered"]
                    last_delivery = ", last delivery " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                queued = sum(states.get(k, 0) for k in UNFINISHED_STATES)
                down = [u for u in stats["upstreams"] if u["state"] == "down"]
                outage = (f", upstream {down[0]['name']} down since {down[0]['since']}"
                          if down and len(down) == len(stats["upstreams"]) else "")
                systemd.notify(f"STATUS=queue {queued}, sent {states.get(State.SENT, 0)}, "
                               f"failed {states.get(State.FAILED, 0)}{last_delivery}{outage}")
                if time.monotonic() - last_purge > PURGE_EVERY:
                    last_purge = time.monotonic()
                    await self.spool.purge(time.time())
            except Exception:
                self.log.exception("housekeeping_failed")
            await asyncio.sleep(tick)

    async def queue_changed(self) -> None:
        await self.spool.recount()
        self._queue_changed_here()

    def _queue_changed_here(self) -> None:
        """A retry or delete went through our own spool (the queue page):
        the writer's counts are right; delivery looks again."""
        if not self.config.hold:
            self.delivery.probe_now()
            self.delivery.wake()

    def bound_doors(self) -> list[tuple[str, str, str]]:
        """The TCP sockets the doors listen on, as check_doors takes them."""
        doors = []
        for sock in self.line_door.acceptor.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                host, port = sock.getsockname()[:2]
                doors.append(("listen", f"{host}:{port}", host))
        for key in ("smtp_listen", "http_listen"):
            if value := getattr(self.config, key):
                doors.append((key, value, parse_hostport(value, key)[0]))
        return doors

    async def reload(self) -> None:
        from smtpgate import systemd

        systemd.reloading()
        try:
            config = load_config(self.config_path, self.overrides)
            check_descriptors(config, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            # The doors stay where they were bound: a file that takes every
            # token away must not open a door that listens on a network.
            check_doors(config, self.bound_doors())
        except ConfigError as exc:
            self.log.error("reload_refused", error=str(exc))
            systemd.ready()
            return
        try:
            self.handoff.callers.load(config)
        except ValueError as exc:
            self.log.error("reload_refused", error=str(exc))
            systemd.ready()
            return
        was_held = self.config.hold
        # Listening addresses, the spool and --dev need a restart; the rest applies now.
        self.config.__dict__.update({k: v for k, v in config.__dict__.items()
                                     if k not in ("listen", "socket", "spool", "dev", "smtp_listen", "http_listen")})
        await self.spool.configure(**spool_limits(self.config))
        self.delivery.reload(delivery_settings(self.config, self.dev_port))
        if was_held and not self.config.hold:
            await self.delivery.start()
        elif self.config.hold and not was_held:
            await self.delivery.stop(STOP_GRACE)
        self.log.info("reloaded", config=self.config_path)
        systemd.ready()


def descriptors_needed(config: Config) -> int:
    """File descriptors a process of ours may need at most: the daemon with
    both doors full, or the delivery child with every upstream connection
    open (it inherits the daemon's limit)."""
    doors = 1 + bool(config.smtp_listen) + bool(config.http_listen)
    daemon = doors * config.max_connections + FD_MARGIN
    if config.dev:  # the embedded upstream takes the relay's connections in the daemon
        daemon += config.connections_per_upstream
    relay = config.connections_per_upstream * max(1, len(config.upstream)) + FD_MARGIN
    return max(daemon, relay)


def check_descriptors(config: Config, limit: int) -> None:
    """ConfigError unless `limit` descriptors are enough for `config`."""
    needed = descriptors_needed(config)
    if needed > limit:
        count = 1 + bool(config.smtp_listen) + bool(config.http_listen)
        doors = f"each of {count} doors" if count > 1 else "the line door"
        raise ConfigError(
            f"max_connections: {config.max_connections} connections on {doors} need {needed} "
            f"file descriptors, the limit is {limit}: raise it (ulimit -n, LimitNOFILE=) "
            "or lower max_connections")


def raise_descriptor_limit(config: Config) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (the soft default, 1024,
    is for select(); we use epoll), then check that the doors fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # a system call filter (the unit's ~@resources): LimitNOFILE= sets it instead
    check_descriptors(config, soft)


def spool_limits(config: Config) -> dict:
    """The spool's settings that a reload may change."""
    from smtpgate.webhooks.sender import webhook_callers

    return {"max_queued": config.max_queued, "min_free_bytes": config.min_free_space,
            "keep_final": config.keep_final, "idempotency_window": config.idempotency_window,
            "webhook_callers": webhook_callers(config)}


def serve(config_path: str | None, overrides: dict) -> int:
    """Run the daemon; return the process exit code."""
    try:
        config = load_config(config_path, overrides)
        raise_descriptor_limit(config)
    except ConfigError as exc:
        print(f"smtpgate: configuration error: {exc}", flush=True, file=__import__("sys").stderr)
        return 78  # EX_CONFIG
    setup_logging(config.log_format, config.log_level)
    from smtpgate import eventloop
    from smtpgate.spool.errors import SpoolError

    loop = eventloop.resolve(config.event_loop)
    try:
        return eventloop.run(Daemon(config, config_path, overrides, loop).run(), loop)
    except SpoolError as exc:  # locked by another daemon, wrong schema, unusable directory
        get_logger().error("start_failed", error=str(exc))
        return 73  # EX_CANTCREAT
    except ConfigError as exc:  # systemd's sockets on a network, and no token
        get_logger().error("start_failed", error=str(exc))
        return 78  # EX_CONFIG
    except OSError as exc:  # an address in use, a socket path we may not create
        get_logger().error("start_failed", error=str(exc))
        return 71  # EX_OSERR
