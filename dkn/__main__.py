from dkn.cli import main

raise SystemExit(main())
