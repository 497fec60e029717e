from idflux.cli import main

raise SystemExit(main())
