"""Relaying stored messages upstream: the scheduler and its workers
(scheduler.py), the connections to each upstream (pool.py), the retry
policy (retry.py), and the process delivery runs in (process.py)."""
