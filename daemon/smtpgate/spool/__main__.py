"""`python -m smtpgate.spool`: the spool's writer process (writer.main),
started by the daemon's spool (store.py)."""

import sys

from smtpgate.spool.writer import main

sys.exit(main(sys.argv[1:]))
