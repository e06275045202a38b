"""The picker service as a process: `python services/picker.py` is `cryomae service picker` (CRYOMAE_* settings)."""

import sys

from cryomae.operator.cli import main

if __name__ == "__main__":
    sys.exit(main(["service", "picker", *sys.argv[1:]]))
