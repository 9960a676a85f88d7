"""What the daemon's processes share: the framing of their pipes
(framing.py), the asyncio side of a pipe (pipe.py), calls answered by token
(calls.py), how a child is started and sets itself up (child.py), and
background work at SCHED_IDLE while intake is light (policy.py)."""
