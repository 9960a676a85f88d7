"""The front doors of the daemon and the hand-off they share.

line_door.py serves the line protocol (TCP, Unix and systemd sockets),
smtp_door.py accepts mail over SMTP (aiosmtpd); both hand a message to
handoff.py, which checks it and stores it.
"""
