from imageworks_proxy.cli import main

raise SystemExit(main())
