"""The trainer service as a process: `python services/trainer.py` is `cryomae service trainer` (CRYOMAE_* settings)."""

import sys

from cryomae.operator.cli import main

if __name__ == "__main__":
    sys.exit(main(["service", "trainer", *sys.argv[1:]]))
