"""``python -m netframe``: the command line."""

import sys

from netframe.cli import main

if __name__ == "__main__":
    sys.exit(main())
