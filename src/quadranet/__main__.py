"""`python -m quadranet ...`: the same command line as `quadranet ...`."""

import sys

from quadranet.cli import main

if __name__ == "__main__":
    sys.exit(main())
