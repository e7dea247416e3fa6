"""C{python -m ion ...}: the ION command line (see ion.core.cc.cli)."""

import sys

from ion.core.cc.cli import main

if __name__ == "__main__":
    sys.exit(main())
