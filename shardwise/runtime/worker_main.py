"""The command line of a local worker process (started by ``launch.start_worker``; the loop itself is
``_worker``)::

    python -m shardwise.runtime.worker_main RANK FD SENTINEL NAME

Nothing imports this module, so it runs once, as ``__main__``, and ``_worker``'s names keep their own
module for pickling."""

from __future__ import annotations

import sys

from shardwise.runtime._worker import entry

if __name__ == "__main__":
    entry(sys.argv[1:])
