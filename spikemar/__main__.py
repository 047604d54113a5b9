from spikemar.cli import main

raise SystemExit(main())
