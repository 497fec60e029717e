from idflux.train.cli import main

raise SystemExit(main())
