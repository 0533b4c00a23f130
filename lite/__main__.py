from lite.cli import main

raise SystemExit(main())
