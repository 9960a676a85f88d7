"""The spool's errors: raised in the daemon, and sent back by the writer
process through its pipe (the only exceptions that cross it)."""


class SpoolError(Exception):
    """Base of the spool's errors."""


class SpoolFull(SpoolError):
    """Back-pressure: too many messages queued or too little disk; nothing stored."""


class SpoolLocked(SpoolError):
    """Another process holds the spool directory."""


class CallerFull(SpoolFull):
    """Back-pressure for one caller: it has `max_pending` messages not yet
    final; nothing stored. The others may still send."""
