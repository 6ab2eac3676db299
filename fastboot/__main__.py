from fastboot.cli.main import main

raise SystemExit(main())
