"""One torchrun rank of `converters.distributed`, writing its own peak RSS (KiB) to FOLDER/rank-N.

    torchrun --standalone --nproc-per-node=2 bench/rank_rss.py FOLDER convert SRC DST [options]

For bench/parallel.py: GNU time around torchrun would measure only the launcher.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from converters import distributed

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    code = distributed.main(sys.argv[2:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (folder / f"rank-{os.environ['RANK']}").write_text(str(peak))
    sys.exit(code)
