from smtpgate.cli import main

raise SystemExit(main())
