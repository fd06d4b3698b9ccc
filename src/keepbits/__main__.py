from keepbits.cli import main

raise SystemExit(main())
