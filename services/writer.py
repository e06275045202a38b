"""The writer service as a process: `python services/writer.py` is `cryomae service writer` (CRYOMAE_* settings)."""

import sys

from cryomae.operator.cli import main

if __name__ == "__main__":
    sys.exit(main(["service", "writer", *sys.argv[1:]]))
