from nsa_tp.cli import main

raise SystemExit(main())
