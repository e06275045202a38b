"""Cost of the one-process mode's queue journal: publish and acknowledge with and without it.

    .venv/bin/python tests/benchmarks/journal.py [--messages 500]

Each publish with the journal writes one file and fsyncs it and its folder; each acknowledgement deletes it.
Prints milliseconds per message for both transports' in-memory variant (no RabbitMQ involved).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from cryomae.messages import MicrographReady
from cryomae.messaging import topology
from cryomae.messaging.base import Envelope
from cryomae.messaging.journal import Journal
from cryomae.messaging.memory import MemoryBroker


def _message(i: int) -> MicrographReady:
    now = time.time()
    return MicrographReady(
        project="bench", session="s1", path=f"/data/bench/s1/mic_{i:05d}.mrc", size=1, mtime=now, complete_at=now
    )


def measure(n: int, journaled: bool) -> tuple[float, float]:
    """Milliseconds per message: publish, then consume and acknowledge."""
    with tempfile.TemporaryDirectory() as folder:
        broker = MemoryBroker("bench", Journal(Path(folder)) if journaled else None)
        broker.declare()
        t0 = time.perf_counter()
        for i in range(n):
            broker.publish(topology.MICROGRAPHS, _message(i))
        t1 = time.perf_counter()
        done = threading.Event()
        seen = [0]

        def handle(envelope: Envelope) -> None:
            seen[0] += 1
            if seen[0] == n:
                done.set()

        consumer = broker.consume(topology.MICROGRAPHS, handle)
        done.wait(600)
        consumer.stop(10)
        t2 = time.perf_counter()
        broker.close()
    return 1e3 * (t1 - t0) / n, 1e3 * (t2 - t1) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    args = parser.parse_args()
    for journaled in (False, True):
        publish, consume = measure(args.messages, journaled)
        print(
            f"journal {'on ' if journaled else 'off'}: publish {publish:.3f} ms, consume + ack {consume:.3f} ms "
            f"per message ({args.messages} messages)"
        )


if __name__ == "__main__":
    main()
