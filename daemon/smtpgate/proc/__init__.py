"""What the daemon's processes share: the framing of their pipes
(framing.py), the asyncio side of a pipe (pipe.py), and how a child is
started and sets itself up (child.py)."""
