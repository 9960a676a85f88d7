"""The spool on a real SQLite file in tmp_path: durability, group commit,
idempotency, back-pressure, recovery, STATUS/WAIT payloads, purge, queue tools."""

from __future__ import annotations

from itertools import pairwise
import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strace_witness import Trace, have_strace, strace_command
from support import children_of, process_name

from smtpgate.spool.errors import SpoolFull, SpoolLocked
from smtpgate.spool.ops import RecipientOutcome
from smtpgate.spool.store import Spool
from smtpgate.spool.ulid import new_ulid
from smtpgate.spool.writer import WAL_PAGES

SPEC = b'{"from":"app@example.com","to":["a@example.org"],"text":"hi"}'
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


async def opened(path, **kwargs) -> Spool:
    spool = Spool(path, **{"min_free_bytes": 0, **kwargs})
    await spool.open()
    return spool


def test_ok_messages_survive_kill_9_of_the_writer_process(tmp_path):
    """Every id printed after enqueue returned is there after the writer
    process (smtpgate-spool) died of SIGKILL in the middle of its work."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from smtpgate.spool.store import Spool
        async def main():
            spool = Spool({str(tmp_path)!r}, min_free_bytes=0)
            await spool.open()
            async def caller(i):
                n = 0
                while True:
                    msg_id, *_ = await spool.enqueue(b"spec", "s@x.org", [f"r{{i}}-{{n}}@y.org"])
                    sys.stdout.write(msg_id + "\\n"); sys.stdout.flush()
                    n += 1
            await asyncio.gather(*(caller(i) for i in range(16)))
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    acknowledged = []
    try:
        for line in proc.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) == 300:
                (writer,) = [pid for pid in children_of(proc.pid) if process_name(pid) == "smtpgate-spool"]
                os.kill(writer, signal.SIGKILL)
        # The owner's enqueues fail once its writer is gone: it ends, and
        # every id it printed before that was answered by the dead writer.
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
        proc.wait()
    assert len(acknowledged) >= 300

    async def check():
        spool = await opened(tmp_path)  # the dead processes' lock is gone
        try:
            states = [await spool.status(msg_id) for msg_id in acknowledged]
        finally:
            await spool.close()
        return states

    states = run(check())
    lost = [msg_id for msg_id, s in zip(acknowledged, states, strict=True) if s is None or s["state"] != "queued"]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged ids lost"


def test_concurrent_enqueues_share_commits(tmp_path):
    async def main():
        spool = await opened(tmp_path)
        results = await asyncio.gather(*(spool.enqueue(SPEC, "s@x.org", ["a@y.org"]) for _ in range(64)))
        await spool.close()
        return spool, results

    spool, results = run(main())
    assert len({r.id for r in results}) == 64
    assert spool.operations == 64
    # one transaction (one fsync) per enqueue would make 64 commits
    assert spool.commits <= 64 // 4


def test_batched_enqueues_store_every_recipient_and_respect_max_queued(tmp_path):
    # 13 concurrent enqueues land in multi-row INSERTs of 8, 4 and 1 rows.
    async def main():
        spool = await opened(tmp_path, max_queued=10)
        outcomes = await asyncio.gather(
            *(spool.enqueue(SPEC, "s@x.org", [f"a{i}@y.org", f"b{i}@y.org", f"a{i}@y.org"]) for i in range(13)),
            return_exceptions=True)
        stored = [o for o in outcomes if not isinstance(o, Exception)]
        states = [await spool.status(msg_id) for msg_id, *_ in stored]
        full = [o for o in outcomes if isinstance(o, SpoolFull)]
        stats = await spool.stats()
        await spool.close()
        return stored, states, full, stats

    stored, states, full, stats = run(main())
    assert (len(stored), len(full)) == (10, 3)
    assert stats["states"]["queued"] == 10 and stats["counters"]["accepted"] == 10
    for (msg_id, *_), state in zip(stored, states, strict=True):
        i = int(state["recipients"][0]["address"][1:].split("@")[0])
        assert [r["address"] for r in state["recipients"]] == [f"a{i}@y.org", f"b{i}@y.org"]  # deduplicated, in order
        assert state["id"] == msg_id and state["state"] == "queued"


def test_a_failing_operation_does_not_fail_its_batch(tmp_path):
    async def main():
        spool = await opened(tmp_path)
        calls = [spool.enqueue(SPEC, "s@x.org", [f"r{i}@y.org"]) for i in range(9)]
        calls.insert(4, spool.enqueue(SPEC, "s@x.org", [object()]))  # sqlite cannot bind it
        results = await asyncio.gather(*calls, return_exceptions=True)
        stored = [await spool.status(r[0]) for r in results if isinstance(r, tuple)]
        stats = await spool.stats()
        await spool.close()
        return results, stored, stats

    results, stored, stats = run(main())
    assert isinstance(results[4], Exception)
    assert len(stored) == 9 and all(s["state"] == "queued" for s in stored)
    assert stats["states"]["queued"] == 9


def test_idempotency_key_returns_first_id_within_window(tmp_path):
    clock = Clock()

    async def main():
        spool = await opened(tmp_path, clock=clock, idempotency_window=100)
        first = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "key-1")
        again = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "key-1")
        same_batch = await asyncio.gather(*(spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "key-2") for _ in range(5)))
        clock.now += 101
        after_window = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "key-1")
        stats = await spool.stats()
        await spool.close()
        return first, again, same_batch, after_window, stats

    first, again, same_batch, after_window, stats = run(main())
    assert first[1] is False and again[:2] == (first[0], True)
    assert len({r.id for r in same_batch}) == 1
    assert [r.existing for r in same_batch].count(False) == 1
    assert after_window[1] is False and after_window[0] != first[0]
    assert stats["states"]["queued"] == 3  # key-1 twice (window passed) + key-2 once
    assert stats["counters"]["accepted"] == 3


def test_spool_full_when_max_queued_is_reached_and_frees_when_final(tmp_path):
    async def main():
        spool = await opened(tmp_path, max_queued=3)
        ids = [(await spool.enqueue(SPEC, "s@x.org", ["a@y.org"]))[0] for _ in range(3)]
        with pytest.raises(SpoolFull):
            await spool.enqueue(SPEC, "s@x.org", ["a@y.org"])
        await spool.claim_due(1e12, 1)
        await spool.record_attempt(ids[0], [RecipientOutcome("a@y.org", "sent", "250 ok")])
        fourth, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"])
        stats = await spool.stats()
        await spool.close()
        return fourth, stats

    fourth, stats = run(main())
    assert len(fourth) == 26
    assert stats["states"] == {"queued": 3, "sending": 0, "deferred": 0, "sent": 1, "failed": 0}


def test_spool_full_when_disk_is_low_stores_nothing(tmp_path):
    async def main():
        spool = await opened(tmp_path)
        spool.min_free_bytes = 1 << 62  # more than any disk has
        with pytest.raises(SpoolFull):
            await spool.enqueue(SPEC, "s@x.org", ["a@y.org"])
        listing = await spool.list_messages(include_final=True)
        await spool.close()
        return listing

    assert run(main()) == []


def test_second_spool_on_the_same_directory_is_refused(tmp_path):
    async def main():
        first = await opened(tmp_path)
        with pytest.raises(SpoolLocked, match="in use by another smtpgate"):
            await opened(tmp_path)
        await first.close()
        again = await opened(tmp_path)
        await again.close()

    run(main())


def test_messages_left_sending_by_a_crash_are_queued_again(tmp_path):
    async def main():
        spool = await opened(tmp_path)
        msg_id, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org", "b@y.org"])
        claimed = await spool.claim_due(1e12, 10)
        assert (await spool.status(msg_id))["state"] == "sending"
        await spool.close()  # the delivery never recorded its attempt
        spool = await opened(tmp_path)
        state = await spool.status(msg_id)
        again = await spool.claim_due(1e12, 10)
        await spool.close()
        return msg_id, claimed, state, again

    msg_id, claimed, state, again = run(main())
    assert [c.id for c in claimed] == [msg_id]
    assert state["state"] == "queued"
    assert [(c.id, c.recipients) for c in again] == [(msg_id, ["a@y.org", "b@y.org"])]


def test_status_payload_follows_the_protocol(tmp_path):
    clock = Clock()

    async def main():
        spool = await opened(tmp_path, clock=clock)
        msg_id, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org", "b@y.org", "a@y.org"])
        queued = await spool.status(msg_id)
        (claimed,) = await spool.claim_due(clock.now, 10)
        clock.now += 2
        await spool.record_attempt(
            msg_id,
            [
                RecipientOutcome("a@y.org", "sent", "250 2.0.0 Ok: queued as 4F2"),
                RecipientOutcome("b@y.org", "deferred", "451 4.3.0 try later"),
            ],
            next_attempt=clock.now + 60,
            possible_duplicate=True,
        )
        deferred = await spool.status(msg_id)
        (retry,) = await spool.claim_due(clock.now + 60, 10)
        await spool.record_attempt(msg_id, [RecipientOutcome("b@y.org", "failed", "550 5.1.1 no such user")])
        final = await spool.status(msg_id)
        missing = await spool.status("01JD3Q7Z8K4W6X2V9N5B0C1T00")
        await spool.close()
        return msg_id, queued, claimed, deferred, retry, final, missing

    msg_id, queued, claimed, deferred, retry, final, missing = run(main())
    assert queued == {
        "id": msg_id,
        "state": "queued",
        "attempts": 0,
        "created": queued["created"],
        "updated": queued["created"],
        "recipients": [
            {"address": "a@y.org", "state": "queued", "reply": None},
            {"address": "b@y.org", "state": "queued", "reply": None},
        ],
    }
    assert RFC3339.match(queued["created"])
    assert claimed.recipients == ["a@y.org", "b@y.org"] and claimed.spec_json == SPEC
    assert deferred["state"] == "deferred" and deferred["attempts"] == 1
    assert deferred["next_attempt"] > deferred["updated"] > deferred["created"]
    assert deferred["possible_duplicate"] is True
    assert retry.recipients == ["b@y.org"] and retry.possible_duplicate
    assert final["state"] == "failed" and final["attempts"] == 2 and "next_attempt" not in final
    assert final["recipients"] == [
        {"address": "a@y.org", "state": "sent", "reply": "250 2.0.0 Ok: queued as 4F2"},
        {"address": "b@y.org", "state": "failed", "reply": "550 5.1.1 no such user"},
    ]
    assert missing is None


def test_wait_final_wakes_on_commit_and_times_out_with_current_state(tmp_path):
    async def main():
        spool = await opened(tmp_path)
        msg_id, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"])
        timed_out = await spool.wait_final(msg_id, 0.05)
        waiter = asyncio.create_task(spool.wait_final(msg_id, 3600))
        await asyncio.sleep(0)
        await spool.claim_due(1e12, 1)
        assert not waiter.done()
        await spool.record_attempt(msg_id, [RecipientOutcome("a@y.org", "sent", "250 ok")])
        woken = await asyncio.wait_for(waiter, 10)  # far less than the hour asked for
        already_final = await spool.wait_final(msg_id, 3600)
        missing = await spool.wait_final("01JD3Q7Z8K4W6X2V9N5B0C1T00", 3600)
        await spool.close()
        return timed_out, woken, already_final, missing

    timed_out, woken, already_final, missing = run(main())
    assert timed_out["state"] == "queued"
    assert woken["state"] == "sent" and already_final == woken
    assert missing is None


def test_purge_deletes_old_final_messages_and_expired_keys(tmp_path):
    clock = Clock()

    async def main():
        spool = await opened(tmp_path, clock=clock, keep_final=1000, idempotency_window=500)
        old_sent, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "k-old")
        pending, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"])
        await spool.claim_due(clock.now, 1)
        await spool.record_attempt(old_sent, [RecipientOutcome("a@y.org", "sent", "250 ok")])
        clock.now += 900
        new_failed, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "k-new")
        await spool.claim_due(clock.now, 10)
        await spool.record_attempt(new_failed, [RecipientOutcome("a@y.org", "failed", "550 no")])
        await spool.release([pending])
        clock.now += 200
        purged = await spool.purge(clock.now)
        states = {m: await spool.status(m) for m in (old_sent, pending, new_failed)}
        key_reused = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "k-old")
        key_kept = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], "k-new")
        stats = await spool.stats()
        await spool.close()
        return old_sent, new_failed, purged, states, key_reused, key_kept, stats

    old_sent, new_failed, purged, states, key_reused, key_kept, stats = run(main())
    assert purged == (1, 1)
    assert states[old_sent] is None
    assert states[new_failed]["state"] == "failed"
    assert [s["state"] for m, s in states.items() if m not in (old_sent, new_failed)] == ["queued"]
    assert key_reused[1] is False  # its key expired with the window
    assert key_kept[:2] == (new_failed, True)
    assert stats["states"]["sent"] == 0 and stats["states"]["failed"] == 1


def test_a_purge_deletes_in_transactions_of_at_most_its_limit_oldest_first(tmp_path):
    """A week-old day of mail is purged at once every 5 minutes: one
    transaction of 30,000 held every SEND 0.5 s. The spool purges `limit`
    at a time, the oldest first, and goes on until less was left."""
    clock = Clock()

    async def main():
        spool = await opened(tmp_path, clock=clock, keep_final=1000, idempotency_window=1000)
        ids = []
        for n in range(25):
            msg_id, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], f"k{n}")
            ids.append(msg_id)
            await spool.claim_due(clock.now, 1)
            await spool.record_attempt(msg_id, [RecipientOutcome("a@y.org", "sent", "250 ok")])
            clock.now += 1
        clock.now += 990  # the first 15 are past keep_final and the window, the last 10 not
        commits = spool.commits
        purged = await spool.purge(clock.now, limit=4)
        chunks = spool.commits - commits
        left = [m for m in ids if await spool.status(m) is not None]
        await spool.close()
        return ids, purged, chunks, left

    ids, purged, chunks, left = run(main())
    assert purged == (15, 15)
    assert chunks == 4  # 4 + 4 + 4 + 3
    assert left == ids[15:]


def test_one_purge_deletes_the_oldest_messages_and_keys_up_to_its_limit(tmp_path):
    from smtpgate.proc.calls import Call
    from smtpgate.spool.ops import Limits, Purge
    from smtpgate.spool.writer import Writer

    writer = Writer(str(tmp_path / "spool.sqlite3"), Limits(10**6, 100.0, 100.0))
    writer.open()
    conn = writer.conn
    conn.execute("BEGIN")
    for n in range(6):  # updated 1..6, in an order that is not their ids'
        msg_id = new_ulid(1.8e9 + n)
        conn.execute("INSERT INTO messages (id, state, envelope_from, spec, created, updated, next_attempt)"
                     " VALUES (?, 'sent', 'a@x.org', x'7b7d', 0, ?, 0)", (msg_id, 1.0 + (n * 5) % 6))
        conn.execute("INSERT INTO recipients VALUES (?, 'r@y.org', 0, 'sent', '250 ok')", (msg_id,))
        conn.execute("INSERT INTO idempotency VALUES ('shop', ?, ?, ?)", (f"k{n}", msg_id, 1.0 + (n * 5) % 6))
    conn.execute("COMMIT")
    writer.state_counts["sent"] = 6
    try:
        assert writer.run_batch([Call(1, Purge(200.0, 4))]).results[1] == (4, 4)
        assert sorted(u for (u,) in conn.execute("SELECT updated FROM messages")) == [5.0, 6.0]
        assert sorted(c for (c,) in conn.execute("SELECT created FROM idempotency")) == [5.0, 6.0]
        assert conn.execute("SELECT COUNT(*) FROM recipients").fetchone() == (2,)
        assert writer.state_counts["sent"] == 2
    finally:
        writer.close()


def _may_leave_idle() -> bool:
    from smtpgate.proc.policy import can_leave_idle

    return can_leave_idle()


@pytest.mark.skipif(not _may_leave_idle(), reason="this process may not set a thread to SCHED_IDLE and back")
def test_checkpoints_after_light_commits_run_at_sched_idle_and_heavy_or_late_ones_do_not(tmp_path):
    """After commits of one SEND each (a lone caller) the checkpoint runs on
    a thread at SCHED_IDLE; after commits of many SENDs at the normal policy,
    and so does one still running when the next is due."""
    import itertools

    from smtpgate.proc.calls import Call
    from smtpgate.spool.ops import Enqueue, Limits
    from smtpgate.spool.writer import CHECKPOINT_COMMITS, CHECKPOINT_OPERATIONS, Writer

    writer = Writer(str(tmp_path / "spool.sqlite3"), Limits(10**6, 3600.0, 3600.0))
    writer.open()
    checkpointer, tokens = writer.checkpointer, itertools.count()

    def commits(count: int, sends: int) -> None:
        for _ in range(count):
            writer.run_batch([Call(next(tokens), Enqueue(1.8e9, b"{}", "a@x.org", ["b@y.org"], None, "shop", 0, False))
                              for _ in range(sends)])

    def policy() -> int:
        checkpointer._idle.wait(10)  # the checkpoint done: what it ran at stays
        return os.sched_getscheduler(checkpointer._thread.native_id)

    try:
        assert policy() == os.SCHED_OTHER
        commits(CHECKPOINT_COMMITS, 1)
        assert policy() == os.SCHED_IDLE
        commits(CHECKPOINT_OPERATIONS // 20, 20)
        assert policy() == os.SCHED_OTHER
        commits(CHECKPOINT_COMMITS, 1)
        assert policy() == os.SCHED_IDLE
        checkpointer._idle.clear()  # as if that checkpoint were still running, starved
        try:
            commits(CHECKPOINT_COMMITS, 1)
            assert os.sched_getscheduler(checkpointer._thread.native_id) == os.SCHED_OTHER
        finally:
            checkpointer._idle.set()
    finally:
        writer.close()


def test_messages_failed_at_max_age_while_held_count_for_their_caller(tmp_path):
    """Expire (every upstream down, max_age passed): the caller's pending
    count (max_pending) goes down, and its failed count up."""
    clock = Clock()

    async def main():
        spool = await opened(tmp_path, clock=clock)
        for caller in ("shop", "shop", "blog"):
            await spool.enqueue(SPEC, "s@x.org", ["a@y.org"], caller=caller)
        before = dict(spool.pending)
        clock.now += 100
        failed = await spool.expire(clock.now, "451 down (smtpgate: gave up after max_age)")
        after, counters = dict(spool.pending), spool.caller_counters
        await spool.close()
        return before, failed, after, counters

    before, failed, after, counters = run(main())
    assert (before, failed, after) == ({"shop": 2, "blog": 1}, 3, {})
    assert counters == {"shop": {"delivered": 0, "failed": 2, "deferred": 0},
                        "blog": {"delivered": 0, "failed": 1, "deferred": 0}}


def test_queue_tools_list_retry_delete(tmp_path):
    clock = Clock()

    async def main():
        spool = await opened(tmp_path, clock=clock)
        a, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"])
        b, *_ = await spool.enqueue(SPEC, "s@x.org", ["b@y.org"], "kb")
        await spool.claim_due(clock.now, 10)
        for msg_id, rcpt in ((a, "a@y.org"), (b, "b@y.org")):
            await spool.record_attempt(
                msg_id, [RecipientOutcome(rcpt, "deferred", "451 later")], next_attempt=clock.now + 3600
            )
        not_due = await spool.claim_due(clock.now, 10)
        listing = await spool.list_messages()
        retried_one = await spool.retry(a)
        due_after_retry = await spool.claim_due(clock.now, 10)
        retried_all = await spool.retry()
        deleted = await spool.delete(b)
        deleted_again = await spool.delete(b)
        new_b = await spool.enqueue(SPEC, "s@x.org", ["b@y.org"], "kb")
        stats = await spool.stats()
        await spool.close()
        return a, b, not_due, listing, retried_one, due_after_retry, retried_all, deleted, deleted_again, new_b, stats

    a, b, not_due, listing, retried_one, due, retried_all, deleted, deleted_again, new_b, stats = run(main())
    assert not_due == []
    deferred = [{"address": "a@y.org", "state": "deferred", "reply": "451 later"}]
    assert [(m["id"], m["state"], m["attempts"], m["from"], m["recipients"]) for m in listing] == [
        (a, "deferred", 1, "s@x.org", deferred),
        (b, "deferred", 1, "s@x.org", [dict(deferred[0], address="b@y.org")]),
    ]
    assert retried_one == 1 and [c.id for c in due] == [a]
    assert retried_all == 1  # only b is still deferred; a is being sent
    assert deleted is True and deleted_again is False
    assert new_b[1] is False and new_b[0] != b  # the deleted message's key is gone
    assert stats["states"] == {"queued": 1, "sending": 1, "deferred": 0, "sent": 0, "failed": 0}
    assert stats["counters"]["deferred"] == 2


def test_ulids_are_crockford_base32_time_prefixed_and_random_within_a_millisecond():
    now = 1_800_000_000.0
    ids = [new_ulid(now) for _ in range(1000)]  # all in the same millisecond
    later = new_ulid(now + 0.001)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert {i[:10] for i in ids} == {ids[0][:10]} and later[:10] > ids[0][:10]  # 10 chars = 48-bit time
    # Each random part is drawn afresh: no id is one step from another (the
    # monotonic variant's +1), so one's own id tells nothing of the next.
    # (The chance that two of 1000 fresh 80-bit draws are within 2**40 is
    # about 1000**2 * 2**40 / 2**80, one in a million.)
    rands = sorted(int(i[10:].translate(_FROM_CROCKFORD), 32) for i in ids)
    assert min(b - a for a, b in pairwise(rands)) > 1 << 40


_FROM_CROCKFORD = str.maketrans("0123456789ABCDEFGHJKMNPQRSTVWXYZ", "0123456789abcdefghijklmnopqrstuv")


@given(st.integers(0, (1 << 48) - 1), st.integers(0, (1 << 80) - 1))
def test_ulid_encoding_is_crockford_base32_of_time_and_randomness(ms, rand):
    from smtpgate.spool.ulid import _encode

    # The ULID spec's layout, five bits a character from the top.
    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = (ms << 80) | rand
    assert _encode(ms, rand) == "".join(crockford[(value >> (5 * i)) & 31] for i in range(25, -1, -1))


@given(st.integers(0, (1 << 48) - 1), st.integers(0, (1 << 80) - 1))
def test_a_ulids_time_reads_back_to_the_millisecond(ms, rand):
    from smtpgate.spool.ulid import _encode, ulid_seconds

    assert ulid_seconds(_encode(ms, rand)) == ms / 1000


def test_spool_files_stay_private(tmp_path):
    async def main():
        spool = await opened(tmp_path / "spool")
        await spool.close()

    run(main())
    assert os.stat(tmp_path / "spool").st_mode & 0o077 == 0


def test_recount_after_the_queue_tool_changed_the_database(tmp_path):
    import sqlite3

    async def main():
        spool = await opened(tmp_path)
        ids = [(await spool.enqueue(SPEC, "s@x.org", ["a@y.org"]))[0] for _ in range(3)]
        # what `smtpgate queue delete` does beside a running daemon
        other = sqlite3.connect(tmp_path / "spool.sqlite3", isolation_level=None)
        other.execute("DELETE FROM messages WHERE id=?", (ids[0],))
        other.close()
        before = (await spool.stats())["states"]["queued"]
        counts = await spool.recount()
        after = (await spool.stats())["states"]
        await spool.close()
        return before, counts, after

    before, counts, after = run(main())
    assert before == 3
    assert counts["queued"] == 2 and after == counts


@pytest.mark.skipif(not have_strace(), reason="strace is not installed (tests/setup.sh installs it)")
def test_only_batches_with_durable_writes_fsync(tmp_path):
    # The kernel's record, not the writer's own count: a phase marker on
    # stdout, then the fsyncs of the spool until the next marker.
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from smtpgate.proc.framing import pack
        from smtpgate.spool.ops import RecipientOutcome, RecordAttempt, RecordAttempts
        from smtpgate.spool.store import Spool
        def phase(name):
            sys.stdout.write("phase " + name + "\\n"); sys.stdout.flush()
        async def main():
            spool = Spool({str(tmp_path / "spool")!r}, min_free_bytes=0)
            await spool.open()
            phase("enqueue")
            ids = [(await spool.enqueue(b"spec", "s@x.org", ["a@y.org"]))[0] for _ in range(3)]
            phase("deliver")
            await spool.claim_due(1e12, 10)
            sent = [RecipientOutcome("a@y.org", "sent", "250 ok")]
            for msg_id in ids[:2]:
                await spool.record_attempt(msg_id, sent)
            # as the delivery process sends its records
            await spool.submit(RecordAttempts(pack([RecordAttempt(time.time(), ids[2], sent, None, False)])))
            phase("delete")
            await spool.delete(ids[0])
            phase("end")
            await spool.close()
        asyncio.run(main())
        """
    )
    trace_path = tmp_path / "strace.txt"
    subprocess.run([*strace_command(trace_path), sys.executable, "-c", script], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    trace = Trace.read(trace_path)
    marks = [c.entry for c in trace.calls if c.name == "write" and c.args.split(", ", 1)[-1].startswith('"phase ')]
    assert len(marks) == 4
    flushes = [f.entry for f in trace.flushes()]
    per_phase = [sum(start < f < end for f in flushes) for start, end in pairwise(marks)]
    # Each enqueue commits with an fsync; the claim and the records commit
    # without (synchronous=NORMAL: a power cut only means a message is sent
    # again); the delete fsyncs again.
    assert per_phase == [3, 0, 1]


def test_every_pipe_message_crosses_the_pipe_as_itself():
    import copyreg

    from smtpgate.delivery import process
    from smtpgate.proc import calls
    from smtpgate.proc.framing import encode, take_messages
    from smtpgate.spool import ops

    types = [value for module in (calls, ops, process) for value in vars(module).values()
             if isinstance(value, type) and issubclass(value, tuple) and value.__module__ == module.__name__]
    assert len(types) == 38
    # Each is marked @message (the cheap pickling), and comes back as its own type.
    assert [t.__name__ for t in types if t not in copyreg.dispatch_table] == []
    sent = [t(*(f"{t.__name__}.{field}" for field in t._fields)) for t in types]
    buf = bytearray(b"".join(encode(sent)))
    received = take_messages(buf)
    assert received == sent and [type(m) for m in received] == types


def test_a_frame_names_the_messages_reconstructor_once():
    import pickletools

    from smtpgate.proc.calls import Call
    from smtpgate.proc.framing import encode
    from smtpgate.spool.ops import RecipientOutcome, RecordAttempt

    # A frame of 13 attempt records (26 messages) refers to `_message` once
    # and then by the pickle's memo: a global looked up per message (an
    # extension code, never memoized) cost twice the pickling (framing.py).
    records = [RecordAttempt(1.5, f"id{i}", [RecipientOutcome("a@b", "sent", "250 ok")], None, False)
               for i in range(13)]
    _, data = encode([Call(1, records)])
    lookups = [op.name for op, _, _ in pickletools.genops(data) if op.name in
               ("GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4")]
    assert lookups == ["STACK_GLOBAL"]


def test_frames_survive_any_split_of_the_pipe():
    from smtpgate.proc.framing import encode, take_messages

    frames = [[(1, "enqueue", 1.5, (b"x" * 70_000, "a@b", ["c@d"], None))], [("reply", [], {}), 7], []]
    stream = b"".join(b"".join(encode(messages)) for messages in frames)
    for step in (1, 3, 4096, len(stream)):
        buf, got = bytearray(), []
        for i in range(0, len(stream), step):
            buf += stream[i:i + step]
            got += take_messages(buf)
        assert got == [m for messages in frames for m in messages] and buf == b""


def test_the_writer_runs_this_package_whatever_the_current_directory(tmp_path, monkeypatch):
    # A folder named smtpgate in the current directory must not stand in for
    # the package in the child (python -P -m smtpgate.spool).
    cwd = tmp_path / "cwd"
    (cwd / "smtpgate").mkdir(parents=True)
    (cwd / "smtpgate" / "__init__.py").write_text("raise ImportError('not the smtpgate package')\n")
    monkeypatch.chdir(cwd)

    async def main():
        spool = await opened(tmp_path / "spool")
        msg_id, *_ = await spool.enqueue(SPEC, "s@x.org", ["a@y.org"])
        state = await spool.status(msg_id)
        await spool.close()
        return state

    assert run(main())["state"] == "queued"


def vm_steps(conn, run, every: int = 10) -> tuple:
    """run() and its cost on `conn` in SQLite's virtual machine steps (in
    units of `every`; the progress handler: deterministic, unlike time)."""
    counted = [0]

    def count() -> int:
        counted[0] += 1
        return 0

    conn.set_progress_handler(count, every)
    try:
        return run(), counted[0]
    finally:
        conn.set_progress_handler(None, 0)


def spool_db(path, rows: list[tuple[str, float, str]]):
    """A spool database at `path` (every schema step) holding a message of
    MAIL_SPEC for each (state, created, caller) of `rows`, in this order."""
    import sqlite3

    from smtpgate.spool.schema import migrate

    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    conn.execute("BEGIN")
    for n, (state, created, caller) in enumerate(rows):
        conn.execute("INSERT INTO messages (id, state, envelope_from, spec, created, updated, next_attempt, caller)"
                     " VALUES (?, ?, 'a@x.org', ?, ?, ?, 2e9, ?)",
                     (new_ulid(1.8e9 + n), state, MAIL_SPEC, created, created, caller))
    conn.execute("COMMIT")
    return conn


def test_a_search_by_recipient_stops_reading_once_it_has_found_enough(tmp_path):
    """Its cost, in SQLite's virtual machine steps (the progress handler:
    deterministic, unlike time): a search that every address matches costs
    less than one that matches none, for an admin and for a caller; the
    worst, every address matching another caller's message, a few times
    that (a message looked up per matching address)."""
    import sqlite3

    from smtpgate.spool import queries
    from smtpgate.spool.schema import migrate

    conn = sqlite3.connect(tmp_path / "search.db", isolation_level=None)
    migrate(conn)
    conn.execute("BEGIN")
    for n in range(3000):
        msg_id = new_ulid(1.8e9 + n)
        conn.execute("INSERT INTO messages (id, state, envelope_from, spec, created, updated, next_attempt, caller)"
                      " VALUES (?, 'sent', 'a@x.org', x'7b7d', 0, 0, 0, ?)", (msg_id, ("shop", "blog")[n % 2]))
        conn.execute("INSERT INTO recipients VALUES (?, ?, 0, 'sent', NULL)", (msg_id, f"user{n}@example.org"))
    conn.execute("COMMIT")

    def steps(recipient: str, caller: str | None = None) -> tuple[int, int]:
        found, steps = vm_steps(conn, lambda: queries.queue_entries(
            conn, 2e9, include_final=True, limit=50, live=False, recipient=recipient, caller=caller), every=100)
        return len(found), steps

    every, none = steps("example"), steps("nobody")
    assert (every[0], none[0]) == (50, 0)
    assert every[1] < none[1]  # it stopped after 50 (of 3000): no collecting and sorting every match
    theirs, worst = steps("example", caller="shop"), steps("example", caller="nobody")
    assert theirs[0] == 50 and theirs[1] < none[1]
    # Every address matches and none is the caller's: a lookup each.
    assert worst[0] == 0 and worst[1] <= 8 * none[1]


def test_the_oldest_waiting_message_is_found_without_reading_every_waiting_one(tmp_path):
    """/metrics asks at every scrape (queries.oldest_due). Its cost in
    SQLite's virtual machine steps (deterministic, unlike time) must not
    grow with the messages waiting: 3,000 cost what 30 do. Messages being
    sent, or sent, that are older still are not waiting."""
    from smtpgate.spool import queries

    def steps(name: str, waiting: int) -> tuple[float | None, int]:
        conn = spool_db(tmp_path / name, [("sent", 100.0, "shop"), ("sending", 200.0, "shop")] + [
            (("queued", "deferred")[n % 2], 1000.0 + n, "shop") for n in range(waiting)])
        return vm_steps(conn, lambda: queries.oldest_due(conn))

    few, many = steps("few.db", 30), steps("many.db", 3000)
    assert few[0] == many[0] == 1000.0
    assert many[1] <= 2 * few[1] + 2


def test_the_queue_pages_oldest_waiting_are_read_without_the_final_messages_kept_before_them(tmp_path):
    """The page's list (queue_entries waiting=True), reloaded every 10 s:
    the messages kept final for a week came first in store order. Its cost
    in VM steps is the same behind 3,000 final messages as behind 30; it
    lists the queued and deferred ones oldest first, for everyone or for
    one caller, and neither those being sent nor final ones."""
    from smtpgate.spool import queries

    def spool_of(name: str, final: int):
        return spool_db(tmp_path / name, [("sent", 1.0 + n, "shop") for n in range(final)] + [
            ("deferred", 900.0, "blog"), ("sending", 50.0, "shop"), ("queued", 800.0, "shop"), ("queued", 700.0, "blog")])

    def listed(conn, caller: str | None = None) -> tuple[list, int]:
        entries, steps = vm_steps(conn, lambda: queries.queue_entries(conn, 1e9, limit=50, live=False, waiting=True,
                                                                      caller=caller))
        return [(e["state"], e["created"]) for e in entries], steps

    few, many = spool_of("few.db", 30), spool_of("many.db", 3000)
    expected = [("queued", queries.rfc3339(700.0)), ("queued", queries.rfc3339(800.0)),
                ("deferred", queries.rfc3339(900.0))]
    (few_listed, few_steps), (many_listed, many_steps) = listed(few), listed(many)
    assert few_listed == many_listed == expected
    assert many_steps <= 2 * few_steps + 2
    assert listed(many, caller="shop")[0] == [("queued", queries.rfc3339(800.0))]


def test_expiring_held_messages_reads_only_those_past_their_max_age(tmp_path):
    """During an outage delivery asks the writer, once a minute, to fail
    the held messages past max_age (Expire). The writer is on every SEND's
    way: its cost in VM steps is the same with 3,000 messages held as with
    30 when none is that old, and it fails exactly those that are."""
    from smtpgate.proc.calls import Call
    from smtpgate.spool.ops import Expire, Limits
    from smtpgate.spool.writer import Writer

    def writer_of(name: str, held: int) -> Writer:
        (tmp_path / name).mkdir()
        writer = Writer(str(tmp_path / name / "spool.sqlite3"), Limits(10**6, 3600.0, 3600.0))
        writer.open()
        conn = writer.conn
        conn.execute("BEGIN")
        for n in range(held):
            msg_id = new_ulid(1.8e9 + n)
            conn.execute("INSERT INTO messages (id, state, envelope_from, spec, created, updated, next_attempt)"
                          " VALUES (?, 'queued', 'a@x.org', ?, ?, ?, ?)", (msg_id, MAIL_SPEC, 1000.0 + n, 1000.0 + n,
                                                                           1000.0 + n))
            conn.execute("INSERT INTO recipients VALUES (?, 'r@y.org', 0, 'queued', NULL)", (msg_id,))
        conn.execute("COMMIT")
        writer.state_counts["queued"] = held
        return writer

    def expire(writer: Writer, created_before: float) -> tuple[int, int]:
        outcome, steps = vm_steps(writer.conn, lambda: writer.run_batch(
            [Call(1, Expire(1e9, created_before, "550 gave up"))]))
        return outcome.results[1], steps

    few, many = writer_of("few", 30), writer_of("many", 3000)
    try:
        (none_few, few_steps), (none_many, many_steps) = expire(few, 999.0), expire(many, 999.0)
        assert none_few == none_many == 0
        assert many_steps <= 2 * few_steps + 5
        assert expire(many, 1004.0)[0] == 5
        assert many.state_counts["failed"] == 5 and many.state_counts["queued"] == 2995
    finally:
        few.close()
        many.close()


# A spec of about the size of a small mail (the benches' is 2.7 KB): a
# lone caller's commit then writes 4-6 WAL pages.
MAIL_SPEC = b'{"from":"app@example.com","to":["a@example.org"],"text":"' + b"x" * 2500 + b'"}'
WAL_FRAME = 24 + 4096  # a WAL frame: its header and one page


def wal_after(path, sends) -> tuple[int, int]:
    """Run `sends(spool)` on a spool in `path`: how long its WAL has been
    (SQLite overwrites it in place once it starts over, so its file keeps
    the greatest length it reached, in pages) and the SENDs it accepted."""
    async def main():
        spool = await opened(path)
        await sends(spool)
        pages = (await asyncio.to_thread(os.path.getsize, path / "spool.sqlite3-wal") - 32) // WAL_FRAME
        accepted = (await spool.stats())["counters"]["accepted"]
        await spool.close()
        return pages, accepted

    return run(main())


def test_checkpoints_let_the_wal_start_over_beside_a_lone_caller(tmp_path):
    # 2,500 commits of 4-6 pages: three times WAL_PAGES without a
    # checkpoint that lets the WAL start over (the writer's own, when idle).
    async def one_at_a_time(spool):
        for i in range(2500):
            await spool.enqueue(MAIL_SPEC, "s@x.org", [f"r{i}@y.org"])

    pages, accepted = wal_after(tmp_path, one_at_a_time)
    assert accepted == 2500
    assert pages < 1.5 * WAL_PAGES


def test_the_wal_stays_bounded_under_a_flood_of_sends(tmp_path):
    # 24,000 SENDs at once (15,000 pages and more) leave the writer no idle
    # moment: SQLite's own checkpoint bounds the WAL instead (twice
    # WAL_PAGES, plus the batch that passes it).
    async def all_at_once(spool):
        await asyncio.gather(*(spool.enqueue(MAIL_SPEC, "s@x.org", [f"r{i}@y.org"]) for i in range(24_000)))

    pages, accepted = wal_after(tmp_path, all_at_once)
    assert accepted == 24_000
    assert pages < 3 * WAL_PAGES


@pytest.mark.parametrize("webhook_callers", [None, frozenset()], ids=["webhooks", "no-webhooks"])
def test_a_batch_of_attempt_records_stores_what_the_records_one_by_one_store(tmp_path, webhook_callers):
    """RecordAttempts runs a batch in a few statements (writer.py): each
    message's state, counters, caller counts and webhook events must be
    those of the same records run one at a time, unknown ids and one
    message twice in a batch included."""
    from smtpgate.proc.calls import Call
    from smtpgate.proc.framing import pack
    from smtpgate.spool.ops import Enqueue, Limits, RecordAttempt, RecordAttempts
    from smtpgate.spool.schema import DB_FILE
    from smtpgate.spool.writer import Writer

    now = 1_800_000_000.0
    sent, failed, deferred = "sent", "failed", "deferred"
    recipients = [["a@y.org"], ["a@y.org", "b@y.org"], ["a@y.org", "b@y.org"], ["a@y.org", "b@y.org"], ["a@y.org"]]
    before = [(3, [("a@y.org", sent, "250 ok"), ("b@y.org", deferred, "451 later")], now + 5, False)]
    batches = [
        [(0, [("a@y.org", sent, "250 ok")], None, False),
         (1, [("a@y.org", sent, "250 ok"), ("b@y.org", failed, "550 no")], None, False),
         (2, [("a@y.org", sent, "250 ok"), ("b@y.org", deferred, "451 later")], now + 60, True),
         (3, [("b@y.org", sent, "250 ok")], None, False),
         (None, [("a@y.org", sent, "250 ok")], None, False)],
        [(4, [("a@y.org", deferred, "421 bye")], now + 30, True), (4, [("a@y.org", sent, "250 ok")], None, False)],
    ]

    def stored(folder, how: str):
        folder.mkdir()
        writer = Writer(str(folder / DB_FILE), Limits(10**6, 3600.0, 3600.0, webhook_callers))
        writer.open()
        tokens = iter(range(10**6))

        def run(op):
            call = Call(next(tokens), op)
            outcome = writer.run_batch([call])
            writer.committed(outcome)
            assert call.token not in outcome.errors, outcome.errors
            return outcome.results[call.token]

        ids = [run(Enqueue(now, b"{}", "s@x.org", to, None, "shop", 0, claim=True)).id for to in recipients]

        def record(i, outcomes, next_attempt, dup):
            msg_id = ids[i] if i is not None else "01JD3Q7Z8K4W6X2V9N5B0C1T00"
            return RecordAttempt(now + 1, msg_id, [RecipientOutcome(*o) for o in outcomes], next_attempt, dup)

        results = [run(record(*r)) for r in before]
        for batch in batches:
            records = [record(*r) for r in batch]
            if how == "one by one":
                results += [run(r) for r in records]
            else:
                results += run(RecordAttempts(pack(records)))
        names = {msg_id: f"m{i}" for i, msg_id in enumerate(ids)}
        conn = writer.conn
        rows = {
            "messages": conn.execute("SELECT id, state, attempts, updated, next_attempt, possible_duplicate"
                                     " FROM messages").fetchall(),
            "recipients": conn.execute("SELECT message_id, address, state, reply FROM recipients").fetchall(),
            "events": conn.execute("SELECT message_id, caller, type, created, next_attempt FROM webhook_outbox"
                                   " ORDER BY seq").fetchall(),
        }
        rows = {table: [tuple(names.get(v, v) for v in row) for row in found] for table, found in rows.items()}
        rows["messages"].sort()
        rows["recipients"].sort()
        figures = (dict(writer.state_counts), dict(writer.counters), dict(writer.pending), writer.caller_counters)
        writer.close()
        return results, rows, figures

    one_by_one = stored(tmp_path / "one", "one by one")
    batched = stored(tmp_path / "batched", "batched")
    assert batched == one_by_one
    results, rows, _ = batched
    assert results == [deferred, sent, failed, deferred, sent, None, deferred, sent]
    assert [row[1] for row in rows["messages"]] == [sent, failed, deferred, sent, sent]
    # A deferred message is due at its record's next_attempt, a final one's is the attempt's time.
    assert [row[4] for row in rows["messages"]] == [now + 1, now + 1, now + 60, now + 1, now + 1]
    assert bool(rows["events"]) == (webhook_callers is None)
