"""Prometheus metrics of the live services, and the HTTP endpoint that serves them with the health checks.

Every process (``cryomae service NAME`` or ``cryomae run``) serves, on ``metrics_port`` (9400 by default):

- ``/metrics``: the metrics below (Prometheus text format), plus the client library's process metrics;
- ``/healthz``: liveness, 200 while the service starts (its start-up has its own time limits: the broker wait)
  and while its main loop is turning; 503 when the loop has not checked in for ``LIVENESS_STALE_S`` seconds (a
  hung process that a probe should restart);
- ``/readyz``: readiness, 200 when the broker is connected, every consumer runs and, for a picker, the current
  model of every project that has one is loaded; 503 otherwise. Both answer JSON with the details.

Names follow Prometheus conventions: a ``cryomae_`` prefix, base units (seconds, bytes), ``_total`` for
counters, ``_ratio`` for fractions, ``_info`` for labels carried by a gauge of 1. Labels are bounded: project and
session names, queue names, and a small set of failure reasons (``REASONS``).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from cryomae import __version__
from cryomae.errors import CheckpointError, ConfigError, CryomaeError, InputError, TransientError
from cryomae.messaging import topology

LIVENESS_STALE_S = 60.0

# failure reasons (bounded label values); see failure_reason()
REASONS = ("unreadable_input", "outside_data_roots", "invalid_message", "model", "transient", "error")

BUILD_INFO = Gauge("cryomae_build_info", "cryomae version of this process (always 1)", ["version"])
BUILD_INFO.labels(__version__).set(1)

MESSAGES_HANDLED = Counter(
    "cryomae_messages_handled_total",
    "Messages a service finished handling, by queue and outcome (ok, parked, retry, dead_letter)",
    ["queue", "outcome"],
)
DEAD_LETTERED = Counter(
    "cryomae_messages_dead_lettered_total",
    "Messages sent to a dead-letter queue, by the queue they came from",
    ["queue"],
)
QUEUE_WAIT = Histogram(
    "cryomae_queue_wait_seconds",
    "Time from a message's creation to the start of its handling",
    ["queue"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
MICROGRAPHS_SEEN = Counter(
    "cryomae_micrographs_seen_total", "Complete micrographs the watcher published", ["project", "session"]
)
MICROGRAPHS_PICKED = Counter("cryomae_micrographs_picked_total", "Micrographs picked", ["project"])
MICROGRAPHS_FAILED = Counter(
    "cryomae_micrographs_failed_total", "Micrographs whose picking failed (each attempt), by reason", ["reason"]
)
MICROGRAPHS_WRITTEN = Counter(
    "cryomae_micrographs_written_total",
    "Micrographs whose picks the writer wrote, by result (new, replaced, duplicate, stale)",
    ["project", "result"],
)
PARTICLES_WRITTEN = Counter(
    "cryomae_particles_written_total", "Particles written to new micrographs' STAR files", ["project"]
)
GALLERY_SECONDS = Histogram(
    "cryomae_gallery_seconds",
    "Seconds the writer's gallery thread took for one batch of a session (pictures, candidates, page)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
GALLERY_FAILURES = Counter(
    "cryomae_gallery_failures_total", "Gallery batches that failed (logged as gallery_failed; STAR files unaffected)"
)
GALLERY_UNREADABLE = Counter(
    "cryomae_gallery_unreadable_total", "Micrographs the gallery could not read for their picture (listed without one)"
)
PARTICLES_PER_MICROGRAPH = Histogram(
    "cryomae_particles_per_micrograph",
    "Picks per micrograph at the picker's cutoff",
    ["project"],
    buckets=(0, 5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200),
)
PICK_SECONDS = Histogram(
    "cryomae_pick_duration_seconds",
    "Time to read and pick one micrograph",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
LATENCY = Histogram(
    "cryomae_end_to_end_latency_seconds",
    "Time from a micrograph judged complete by the watcher to its rows written in the session STAR files",
    buckets=(0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
MODEL_VERSION = Gauge(
    "cryomae_model_version_info", "The model version a picker uses for a project (always 1)", ["project", "version"]
)
TRAININGS = Counter(
    "cryomae_trainings_total", "Training runs, by outcome (done, failed, interrupted by a stop)", ["outcome"]
)
TRAINING_PROGRESS = Gauge(
    "cryomae_training_progress_ratio", "Fraction of the current training done (pre-training then SCS)", ["project"]
)
TRAINING_LOSS = Gauge(
    "cryomae_training_loss", "Running mean of a training loss in the current stage", ["project", "stage", "loss"]
)
TRAINING_SECONDS = Histogram(
    "cryomae_training_duration_seconds", "Wall time of a successful training", buckets=(10, 30, 60, 120, 300, 600, 1800)
)
DISK_FULL = Gauge(
    "cryomae_disk_full",
    "1 while the service waits for space on its output disk (a write failed: no space left, or quota exceeded)",
    ["service"],
)
SESSIONS_WATCHED = Gauge("cryomae_sessions_watched", "Session folders the watcher watches")

# Label values known in advance start at 0 in every process, so that the first event after a start is an
# increase (PromQL's increase() cannot see a series that is born at 1): the alert rules on dead letters,
# failures and failed trainings rely on it.
for _queue in topology.WORK_QUEUES:
    DEAD_LETTERED.labels(_queue)
for _reason in REASONS:
    MICROGRAPHS_FAILED.labels(_reason)
for _outcome in ("done", "failed", "interrupted"):
    TRAININGS.labels(_outcome)


def failure_reason(exc: BaseException) -> str:
    """A bounded label for an exception (one of ``REASONS``)."""
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, CheckpointError | ConfigError):
        return "model"
    if isinstance(exc, InputError):
        text = str(exc)
        if "outside the configured data roots" in text or "not absolute" in text:
            return "outside_data_roots"
        if exc.path is None and "message" in text:
            return "invalid_message"
        return "unreadable_input"
    if isinstance(exc, CryomaeError):
        return "unreadable_input"
    return "error"


def _gpu_memory() -> None:
    """Register GPU memory gauges when this process can see a GPU."""
    import torch

    if not torch.cuda.is_available():
        return
    used = Gauge("cryomae_gpu_memory_used_bytes", "GPU memory held by this process's tensors", ["device"])
    reserved = Gauge("cryomae_gpu_memory_reserved_bytes", "GPU memory reserved by this process's allocator", ["device"])
    for i in range(torch.cuda.device_count()):
        used.labels(f"cuda:{i}").set_function(functools.partial(_cuda_bytes, torch.cuda.memory_allocated, i))
        reserved.labels(f"cuda:{i}").set_function(functools.partial(_cuda_bytes, torch.cuda.memory_reserved, i))


def _cuda_bytes(query: Callable[[int], int], device: int) -> float:
    return float(query(device))


_gpu_registered = False
_gpu_lock = threading.Lock()


def register_gpu_metrics() -> None:
    global _gpu_registered
    with _gpu_lock:
        if not _gpu_registered:
            _gpu_registered = True
            _gpu_memory()


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background thread (``port`` 0: any free port)."""

    def __init__(
        self, host: str, port: int, ready: Callable[[], dict[str, Any]], stale_after_s: float = LIVENESS_STALE_S
    ) -> None:
        self._ready = ready
        self.stale_after_s = stale_after_s
        self._beat: float | None = None  # None: still starting
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    beat = server._beat
                    if beat is None:
                        self._json(200, {"alive": True, "starting": True})
                    else:
                        age = time.monotonic() - beat
                        ok = age < server.stale_after_s
                        self._json(200 if ok else 503, {"alive": ok, "last_check_s": round(age, 1)})
                elif path == "/readyz":
                    state = server.readiness()
                    self._json(200 if state["ready"] else 503, state)
                else:
                    self._json(404, {"error": f"no such endpoint {path}; try /metrics, /healthz or /readyz"})

            def _json(self, code: int, data: dict[str, Any]) -> None:
                self._send(code, (json.dumps(data, default=str) + "\n").encode(), "application/json")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class names it
                return  # probes every few seconds would flood the log

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="cryomae-http", daemon=True)

    def readiness(self) -> dict[str, Any]:
        try:
            services = self._ready()
        except Exception as exc:  # noqa: BLE001 -- a readiness check must answer, not crash the endpoint
            return {"ready": False, "error": str(exc)}
        ok = bool(services) and all(all(bool(v) for v in s.values()) for s in services.values())
        return {"ready": ok, "services": services}

    def beat(self) -> None:
        """The main loop is alive (called every loop turn)."""
        self._beat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
