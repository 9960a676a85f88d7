"""The command-line side: the `smtpgate` command (cli.py) and its
subcommands (sendmail.py, queue.py, demo.py), the line-protocol client they
use (lineclient.py), and the embedded upstream of `serve --dev`
(devupstream.py)."""
