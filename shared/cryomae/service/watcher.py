"""The watcher service: watches session folders (``cryomae.watching.Watcher``) and publishes each complete
micrograph to the micrographs queue; takes session commands (start, stop watching) from the watcher queue.

A start for a project that is not in the store is refused before anything is watched: an InputError naming the
project (dead-lettered at the first delivery), by the same rule as ``cryomae session start``
(``ProjectStore.get_project``). The watcher reads the store only; under Helm it is mounted read-only."""

from __future__ import annotations

from typing import Any

from cryomae.errors import InputError
from cryomae.messages import REASON_CHARS, MicrographReady, PickFailed, SessionCommand, SessionStarted
from cryomae.messaging import Broker, Consumer, Envelope, topology
from cryomae.messaging.delivery import QUEUE_HEADER, REASON_HEADER, shorten
from cryomae.service import metrics
from cryomae.service.handling import get_logger, handling
from cryomae.settings import Settings
from cryomae.store.outputs import check_micrograph_name
from cryomae.store.projects import ProjectStore
from cryomae.watching import Watcher

log = get_logger("watcher")
WATCHER_STATE = "watcher"  # the watcher's folder inside the state folder (its ledger; ``cryomae status`` reads it)


class WatcherService:
    """The watcher publishing to the micrographs queue, and taking session commands from the watcher queue."""

    def __init__(self, broker: Broker, settings: Settings, store: ProjectStore | None = None) -> None:
        self.broker = broker
        self.store = store or ProjectStore(settings.store)
        self.watcher = Watcher(
            settings.state / WATCHER_STATE, self.publish, settings.watch_settings(), on_replaced=self.replaced
        )
        self._consumer: Consumer | None = None

    def publish(self, message: MicrographReady) -> None:
        """A micrograph found complete: to the pickers; one whose picks could never be written (its name, see
        ``check_micrograph_name``) straight to the micrographs' dead letters with the reason, and to the writer for
        the session page, so that it is counted as failed and not picked first."""
        try:
            check_micrograph_name(message.path)
        except InputError as exc:
            self.refuse(message, str(exc))
            return
        self.broker.publish(topology.MICROGRAPHS, message)
        metrics.MICROGRAPHS_SEEN.labels(message.project, message.session).inc()

    def refuse(self, message: MicrographReady, reason: str) -> None:
        """Dead-letter a micrograph at the door, as the picker would (reason and queue headers), and tell the writer."""
        why = shorten(reason, REASON_CHARS)
        self.broker.publish(
            topology.dead_letters(topology.MICROGRAPHS),
            message,
            {REASON_HEADER: why, QUEUE_HEADER: topology.MICROGRAPHS},
        )
        self._tell_writer(message.project, message.session, message.path, why, message.id)
        metrics.MICROGRAPHS_SEEN.labels(message.project, message.session).inc()
        metrics.MICROGRAPHS_FAILED.labels("unreadable_input").inc()
        log.warning("micrograph_refused", project=message.project, session=message.session, reason=why)

    def replaced(self, project: str, session: str, path: str, reason: str) -> None:
        """A published micrograph was replaced on disk: a note for the session page (its list of micrographs to
        look at, with the command that re-picks it; a later pick of it takes it off)."""
        self._tell_writer(project, session, path, reason)

    def _tell_writer(self, project: str, session: str, path: str, reason: str, message_id: str = "") -> None:
        """A note for the session page's list of micrographs to look at (``PickFailed``)."""
        note = PickFailed(
            project=project,
            session=session,
            micrograph=path,
            micrograph_id=message_id,
            reason=shorten(reason, REASON_CHARS),
        )
        self.broker.publish(topology.PICKS, note)

    def handle(self, env: Envelope) -> None:
        with handling(log, env, (SessionCommand,)) as h:
            h.fields.update(action=h.message.action, folder=h.message.folder)
            if h.message.action == "start":
                # InputError "no project '...' in <store> (create it with ...)": as at the CLI, before watching
                self.store.get_project(h.message.project)
                # the writer hears of the session before any of its picks (the same queue, in order)
                self.announce(h.message.project, h.message.session, h.message.folder)
            self.watcher.handle(h.message)
            metrics.SESSIONS_WATCHED.set(len(self.watcher.sessions()))

    def announce(self, project: str, session: str, folder: str) -> None:
        """Tell the writer of a watched session (``SessionStarted``): it writes picks of started sessions only."""
        self.broker.publish(topology.PICKS, SessionStarted(project=project, session=session, folder=folder))

    def start(self) -> None:
        self.watcher.start()
        for info in self.watcher.sessions():  # watched before a restart: the writer may not know them yet
            self.announce(info.project, info.session, str(info.folder))
        metrics.SESSIONS_WATCHED.set(len(self.watcher.sessions()))
        self._consumer = self.broker.consume(topology.WATCHER, self.handle, prefetch=1)

    def stop(self, timeout: float | None = None) -> None:
        if self._consumer is not None:
            self._consumer.stop(timeout)
        self.watcher.close()

    def check(self) -> None:
        """Raise the exception that ended the watcher's loop, if it ended."""
        self.watcher.join(0)

    def ready(self) -> dict[str, Any]:
        return {
            "broker": self.broker.connected,
            "watching": self.watcher.running,
            "consumer": self._consumer is not None and self._consumer.running,
        }
