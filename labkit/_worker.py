"""Entry point of one worker process: ``python -m labkit._worker JOB_DIR RANK`` (see supervisor)."""

import sys

from labkit.supervisor import _worker_main

if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]))
