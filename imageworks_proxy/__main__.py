from imageworks_proxy.cli.server import main

raise SystemExit(main())
