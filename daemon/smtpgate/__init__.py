"""smtpgate: a mail relay daemon behind a socket."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1"
