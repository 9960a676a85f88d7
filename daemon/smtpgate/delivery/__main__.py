"""`python -m smtpgate.delivery`: the delivery process (process.main),
started by the daemon's DeliveryProcess."""

import sys

from smtpgate.delivery.process import main

sys.exit(main(sys.argv[1:]))
