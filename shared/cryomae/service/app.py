"""The live services as processes: ``cryomae service NAME`` runs one, ``cryomae run`` runs them all in one.

``App`` builds the chosen services over one broker from the ``Settings``, declares the topology (waiting for
the broker up to ``broker_wait_seconds``), starts them downstream first (writer, trainer, picker, then the
watcher, so nothing piles up) and stops them in the reverse order, letting the message in hand finish.
``serve`` is the process's main loop: it returns 0 after SIGTERM, 130 after SIGINT (Ctrl-C) and 1 when a
service failed for good (the watcher's loop ended with an error, a consumer stopped), so that the process exits
non-zero and its supervisor (Kubernetes, systemd, compose) restarts it. It takes the state folder's locks
(``build``) before it listens on the metrics port, so that a second instance is told the real reason.

With the in-memory broker (one process), the operator CLI's requests come through the state folder's inbox
(``cryomae.operator.control``), and the queues are journaled in ``<state>/queues`` (``cryomae.messaging.journal``):
what was queued or in hand when the process stopped is there again at the next start.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

from cryomae.errors import ConfigError, CryomaeError, TransientError
from cryomae.messaging import Broker, open_broker, redact_url, topology
from cryomae.messaging.journal import Journal
from cryomae.messaging.memory import MemoryBroker
from cryomae.service.handling import get_logger
from cryomae.service.inbox import Inbox
from cryomae.service.metrics import HealthServer, register_gpu_metrics
from cryomae.service.watcher import WatcherService
from cryomae.settings import Settings
from cryomae.store.projects import ProjectStore

log = get_logger("app")

SERVICES = topology.SERVICES
QUEUES_JOURNAL = "queues"  # the in-memory broker's journal, inside the state folder


class Service(Protocol):
    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def ready(self) -> dict[str, Any]: ...


def wait_for_broker(broker: Broker, seconds: float, url: str) -> None:
    """Declare the topology, retrying while the broker is unreachable for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    delay = 1.0
    while True:
        try:
            broker.declare()
            return
        except TransientError as exc:
            if time.monotonic() + delay > deadline:
                raise TransientError(f"broker {redact_url(url)} unreachable for {seconds:.0f} s: {exc}") from None
            log.warning("broker_unreachable", url=redact_url(url), error=str(exc), retry_in_s=delay)
            time.sleep(delay)  # back-off between connection attempts, not synchronisation
            delay = min(delay * 2, 15.0)


class App:
    """Some or all services over one broker; ``start``/``stop``, ``check`` for failures, ``ready``."""

    def __init__(self, settings: Settings, services: Sequence[str] = SERVICES, broker: Broker | None = None) -> None:
        unknown = sorted(set(services) - set(SERVICES))
        if unknown or not services:
            raise ConfigError(f"unknown service(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SERVICES)}")
        self.settings = settings
        self.names = [s for s in SERVICES if s in services]
        if broker is None and settings.broker.url.startswith("memory"):
            # one process: the queues are journaled in the state folder (its lock keeps a second process off)
            broker = MemoryBroker(settings.broker.namespace, Journal(settings.state / QUEUES_JOURNAL))
        self.broker = broker or open_broker(settings.broker_url(), settings.broker.namespace, settings.broker.heartbeat)
        self.embedded = isinstance(self.broker, MemoryBroker)
        self.store = ProjectStore(settings.store)
        self.services: dict[str, Service] = {}
        self.inbox: Inbox | None = None
        self.health: HealthServer | None = None  # set by serve()
        self._started = False

    def _build(self, name: str) -> Service:
        # Each service's code is imported here, by the process that runs it: a watcher never loads the writer's
        # imaging libraries, and only the picker and the trainer load torch (and register the GPU's gauges).
        s = self.settings
        if name == "writer":
            from cryomae.service.gallery import GalleryWorker, seen_in_ledger
            from cryomae.service.writer import Writer

            gallery = None
            if s.gallery.enabled:
                seen = partial(seen_in_ledger, s.state)
                gallery = GalleryWorker(
                    size=s.gallery.size, max_pixels=s.max_micrograph_pixels, roots=s.roots(), seen=seen
                )
            return Writer(self.broker, s.outputs, store=self.store, roots=s.roots(), gallery=gallery)
        if name in ("picker", "trainer"):
            register_gpu_metrics()
        if name == "trainer":
            from cryomae.service.trainer import Trainer

            return Trainer(
                self.broker,
                self.store,
                s.train,
                s.device,
                max_pixels=s.max_micrograph_pixels,
                roots=s.roots(),
                outputs=s.outputs,
            )
        if name == "picker":
            from cryomae.service.picker import Picker

            return Picker(
                self.broker,
                self.store,
                s.roots(),
                s.pick,
                s.device,
                s.model_check_seconds,
                workers=s.pick_workers,
                max_pixels=s.max_micrograph_pixels,
            )
        return WatcherService(self.broker, s, self.store)

    def build(self) -> None:
        """Construct the services (taking the state folder's locks; nothing talks to the broker yet)."""
        try:
            for name in self.names:
                if name not in self.services:
                    self.services[name] = self._build(name)
        except BaseException:
            self.stop()
            raise

    def start(self) -> None:
        self.build()
        try:
            wait_for_broker(self.broker, self.settings.broker_wait_seconds, self.settings.broker.url)
            for service in self.services.values():
                service.start()
            if self.embedded:
                self.inbox = Inbox(self.broker, self.store, self.settings.state)
                self.inbox.start()
        except BaseException:
            self.stop()
            raise
        self._started = True
        log.info(
            "services_started",
            services=self.names,
            broker=redact_url(self.settings.broker.url),
            store=str(self.settings.store),
            outputs=str(self.settings.outputs),
            data_roots=[str(r) for r in self.settings.roots()],
        )

    def check(self) -> None:
        """Raise when a service has failed for good (the caller exits non-zero)."""
        for name, service in self.services.items():
            if isinstance(service, WatcherService):
                service.check()
            state = service.ready()
            threads = {k: v for k, v in state.items() if k in ("consumer", "consumers", "watching")}
            if self._started and not all(threads.values()):
                raise CryomaeError(f"the {name} service stopped: {threads}")
        if self.inbox is not None and self._started and not self.inbox.running:
            raise CryomaeError("the inbox of the one-process mode stopped")

    def ready(self) -> dict[str, Any]:
        """Each service's readiness checks (empty until started: not ready)."""
        if not self._started:
            return {}
        return {name: service.ready() for name, service in self.services.items()}

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the services upstream first (each finishes the message in hand), then close the broker."""
        errors: list[BaseException] = []
        if self.inbox is not None:
            self.inbox.stop(timeout)
        for name in reversed(list(self.services)):
            try:
                self.services[name].stop(timeout)
            except Exception as exc:  # noqa: BLE001 -- stop the others anyway; the first error is raised after
                log.error("service_stop_failed", service=name, error=str(exc))
                errors.append(exc)
        self.services.clear()
        self.broker.close()
        self._started = False
        log.info("services_stopped", services=self.names)
        if errors:
            raise errors[0]


def serve(app: App, stop: threading.Event | None = None, check_every_s: float = 1.0) -> int:
    """Run ``app`` until SIGTERM/SIGINT (or ``stop`` is set): 0 after a requested stop or SIGTERM, 130 after
    SIGINT (Ctrl-C), 1 after a failure, 3 when the broker stayed unreachable at start-up. Serves /metrics,
    /healthz and /readyz meanwhile. A second SIGINT while stopping leaves at once (``os._exit(130)``): what
    was in hand is journaled (one process) or redelivered by RabbitMQ."""
    stop = stop or threading.Event()
    interrupted: list[int] = []
    health = None
    app.build()  # the state folder's locks first: a second instance hears the real reason, not a busy port
    if app.settings.metrics_port is not None:
        try:
            health = HealthServer(app.settings.metrics_host, app.settings.metrics_port, app.ready)
        except OSError as exc:
            where = f"{app.settings.metrics_host}:{app.settings.metrics_port}"
            log.error("http_listen_failed", address=where, error=str(exc))
            raise ConfigError(f"cannot serve metrics on {where} ({exc}); set CRYOMAE_METRICS_PORT") from None
        health.start()
        log.info("http_listening", port=health.port, endpoints=["/metrics", "/healthz", "/readyz"])
    app.health = health
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and interrupted:
            os.write(2, b"interrupted again: leaving now (unfinished work is redelivered at the next start)\n")
            os._exit(130)
        if signum == signal.SIGINT:
            interrupted.append(signum)
            os.write(2, b"interrupted: stopping (work in hand is returned to its queue; Ctrl-C again to leave now)\n")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    code = 0
    try:
        try:
            app.start()
        except TransientError as exc:
            log.error("broker_unavailable", error=str(exc))
            code = 3
            return code
        if health is not None:
            health.beat()
        while not stop.wait(check_every_s):
            app.check()
            if health is not None:
                health.beat()
    except (CryomaeError, OSError) as exc:
        log.error("service_failed", error=str(exc), error_type=type(exc).__name__)
        code = 1
    finally:
        try:
            app.stop()
        except Exception as exc:  # noqa: BLE001 -- logged, and the exit code says it
            log.error("service_stop_failed", error=str(exc))
            code = code or 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if health is not None:
            health.stop()
    return 130 if interrupted and code == 0 else code
