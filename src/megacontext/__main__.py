import sys

from megacontext.cli import main

sys.exit(main())
