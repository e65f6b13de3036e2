"""A torchrun rank of `converters.distributed` made to fail, for tests/test_parallel.py.

    torchrun ... tests/jobs/failing_rank.py SCENARIO convert SRC DST [options]

SCENARIO (rank 1 only): `read` - cannot read the source (fails before any collective);
`interrupt` - Ctrl-C while writing its share; `killed` - writes one file, then dies as the OOM
killer would kill it (no clean-up of its own).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import converters.api
from converters import distributed
from converters.core import parallel
from converters.core.errors import ConverterError


def main() -> int:
    scenario, arguments = sys.argv[1], sys.argv[2:]
    if os.environ["RANK"] == "1":
        if scenario == "read":

            def cannot_read(*args: Any, **kwargs: Any) -> Any:
                raise ConverterError("rank 1 cannot read the source")

            converters.api.read = cannot_read  # type: ignore[assignment]
        else:

            def failing_run(jobs: Any, indices: list[int], workers: int) -> Any:
                if scenario == "interrupt":
                    raise KeyboardInterrupt
                jobs[indices[0]]()
                os._exit(137)

            parallel._run = failing_run  # type: ignore[assignment]
    return distributed.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
