from backupmx.cli.main import main

raise SystemExit(main())
