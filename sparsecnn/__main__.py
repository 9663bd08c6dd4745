from sparsecnn.cli import main

raise SystemExit(main())
