import sys

from lastmile.cli import main

sys.exit(main())
