"""``python cli.py ...`` from a checkout: the same command as the installed ``sdconvert``.

The command's code is ``converters/cli.py``; this file only runs it (Python puts this folder on
``sys.path`` when it runs a script, so the package imports without path edits).
"""

import sys

from converters.cli import main

if __name__ == "__main__":
    sys.exit(main())
