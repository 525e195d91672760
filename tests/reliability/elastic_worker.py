"""`amoc` as torchrun's worker script, for tests/reliability/test_reliability_restart.py.

torchrun runs it as `torchrun ... elastic_worker.py pretrain ...` (instead of `-m amoc`).
Each worker writes its pid to $AMOC_TEST_PIDS/rank<R>-attempt<N> (so that a test can
SIGKILL one rank), and with $AMOC_TEST_LATE_RANK0=S rank 0 of a restarted group starts S
seconds late, as on a slow node, before it runs `amoc` unchanged.
"""

import os
import sys
import time
from pathlib import Path

from amoc.cli import main

if __name__ == "__main__":
    rank, attempt = os.environ.get("RANK", "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    folder = Path(os.environ["AMOC_TEST_PIDS"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}-attempt{attempt}").write_text(str(os.getpid()))
    if rank == "0" and attempt != "0":
        time.sleep(float(os.environ.get("AMOC_TEST_LATE_RANK0", "0")))
    sys.exit(main())
