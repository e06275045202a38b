"""The watcher service as a process: `python services/watcher.py` is `cryomae service watcher` (CRYOMAE_* settings)."""

import sys

from cryomae.operator.cli import main

if __name__ == "__main__":
    sys.exit(main(["service", "watcher", *sys.argv[1:]]))
