from smtpgate.tools.cli import main

raise SystemExit(main())
