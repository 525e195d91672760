import sys

from amoc.cli import main

sys.exit(main())
