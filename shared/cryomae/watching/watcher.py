"""The watcher: finds complete micrographs in watched session folders and publishes each exactly once.

One loop (``run()`` in the caller's thread, or ``start()`` on a background thread) does, every
``check_interval`` seconds:

1. takes up sessions that are new or whose folder was unavailable (inotify watch or polling, see
   ``WatchSettings.mode``; the choice and its reason are logged);
2. turns inotify events into pending files;
3. lists folders that are due: at once when a session is taken up (the catch-up of files that arrived while the
   watcher was down), then every ``poll_interval`` in poll mode or every ``rescan_interval`` in inotify mode
   (events lost to a full inotify queue);
4. checks pending files for completeness (``cryomae.watching.completeness``) and publishes the complete ones,
   then records them in the ledger (publish first: a crash in between repeats the file, never loses it). Files
   that can never complete (or resolve outside the data roots) are published at once, for the picker to
   dead-letter with the reason; files that may still grow wait up to the give-up time, listed in the ledger as
   incomplete (``cryomae status`` shows them) until they are published, deleted or their session stopped.
   A candidate that cannot be examined (a symlink loop, a dangling symlink, no permission) is skipped, logged once
   and listed there too with its reason, until it can be examined or is gone; the rest of the folder is listed.

A published path is the resolved session folder joined with the file's path inside it (absolute; a file that is
itself a symlink keeps its own name, so picks carry the session's names). Files already there when a session is
taken up wait one settle time like new ones. A path is published once per session, ever
(``cryomae.watching.ledger``); a different file later found under a published name is logged as a warning and
not published (re-picks are an explicit operator action).
``publish`` raising ``TransientError`` is retried after ``poll_interval``; any other exception ends the loop
(``run()`` raises it; after ``start()``, ``join()``/``stop()`` raise it) so that the service exits non-zero.
"""

from __future__ import annotations

import math
import os
import queue
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import structlog
from watchdog.observers import Observer

from cryomae.config import WatchSettings
from cryomae.errors import CryomaeError, InputError, TransientError
from cryomae.messages import MicrographReady, SessionCommand, check_name
from cryomae.watching.candidates import check_pattern, examine, is_candidate, list_candidates
from cryomae.watching.completeness import PendingFile, Signature, Verdict, incompleteness, signature_of
from cryomae.watching.filesystems import Mount, mount_of, needs_polling, read_mounts
from cryomae.watching.inotify import ObserverFactory, stop_observer, watch_folder
from cryomae.watching.ledger import Ledger, Publication, SessionRecord
from cryomae.watching.sessions import Mode, SessionInfo, SessionStats, WatchedSession, check_folder

log = structlog.get_logger("cryomae.watcher")

Publish = Callable[[MicrographReady], None]
_Event = tuple[WatchedSession, Path, bool]  # session, path, is a folder


class Watcher:
    """Watches session folders and hands each complete micrograph, once, to ``publish``.

    ``state_dir`` holds the ledger (published files and watched sessions; one watcher per folder). ``clock``
    (monotonic seconds), ``mounts`` (the mount table) and ``observer_factory`` (watchdog) can be replaced in
    tests. Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        state_dir: str | Path,
        publish: Publish,
        settings: WatchSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        mounts: Callable[[], Sequence[Mount]] = read_mounts,
        observer_factory: ObserverFactory = Observer,
        on_replaced: Callable[[str, str, str, str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._publish = publish
        # told (project, session, path, reason) when a published file is replaced on disk (the session page)
        self._on_replaced = on_replaced
        self._clock = clock
        self._mounts = mounts
        self._observer_factory = observer_factory
        self._ledger = Ledger(Path(state_dir))
        try:
            self._ledger.clear_incomplete()  # what an earlier run listed: every file is looked at again
        except BaseException:
            self._ledger.close()
            raise
        self._lock = threading.Lock()  # sessions dict and what other threads read of a session
        self._step_lock = threading.RLock()  # one step at a time; stop_session waits for a publish in progress
        self._sessions = {(r.project, r.session): WatchedSession(r) for r in self._ledger.sessions()}
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------------------------------- sessions

    def start_session(
        self, project: str, session: str, folder: str | Path, pattern: str = "*.mrc", recursive: bool = True
    ) -> SessionInfo:
        """Watch a session folder from now on (persisted: resumed after a restart). Files already there are
        published too, after the same completeness check. Starting a watched session again with the same folder,
        pattern and recursion does nothing; with other values it replaces them (published files stay published).
        InputError: a bad name or pattern, or a folder that is missing, unreadable or outside every data root."""
        self._check_open()
        check_name(project, "project name")
        check_name(session, "session name")
        check_pattern(pattern)
        resolved = check_folder(folder, self._settings.data_roots)
        with self._lock:
            old = self._sessions.get((project, session))
        if old is not None:
            r = old.record
            if (r.folder, r.pattern, r.recursive) == (resolved, pattern, recursive):
                log.info("session_already_watched", project=project, session=session, folder=str(resolved))
                return old.info()
            self.stop_session(project, session)
        record = SessionRecord(project, session, resolved, pattern, recursive, time.time())
        self._ledger.save_session(record)
        watched = WatchedSession(record)
        with self._lock:
            self._sessions[watched.key] = watched
        self._wake.set()
        log.info(
            "session_started",
            project=project,
            session=session,
            folder=str(resolved),
            pattern=pattern,
            recursive=recursive,
            replaced_settings=old is not None,
        )
        return watched.info()

    def stop_session(self, project: str, session: str) -> bool:
        """Stop watching a session (its files found from now on are not published; its pending files are
        dropped and will be caught up if the session is started again). Waits for a publish in progress, so
        nothing of the session is published after this returns. False when the session was not watched."""
        self._check_open()
        with self._step_lock:
            with self._lock:
                watched = self._sessions.pop((project, session), None)
            dropped = self._ledger.drop_session(project, session)
            if watched is not None and watched.observer is not None:
                stop_observer(watched.observer)
                watched.observer = None
        if watched is None and not dropped:
            log.info("session_not_watched", project=project, session=session)
            return False
        log.info(
            "session_stopped", project=project, session=session, dropped_pending=len(watched.pending) if watched else 0
        )
        return True

    def handle(self, command: SessionCommand) -> None:
        """Carry out a session command (start or stop); InputError for a start without a usable folder."""
        if command.action == "stop":
            self.stop_session(command.project, command.session)
            return
        if not command.folder:
            raise InputError(None, f"start command for session {command.project}/{command.session} names no folder")
        self.start_session(command.project, command.session, command.folder, command.pattern, command.recursive)

    def sessions(self) -> list[SessionInfo]:
        """The watched sessions, by project and session name."""
        with self._lock:
            return [self._sessions[key].info() for key in sorted(self._sessions)]

    def publications(self, project: str, session: str) -> dict[str, Publication]:
        """Every file the watcher published for a session, by path (from the ledger)."""
        self._check_open()
        return self._ledger.publications(project, session)

    def session_stats(self, project: str, session: str) -> SessionStats:
        """Counts for a session (zeros for one the watcher never saw)."""
        self._check_open()
        summary = self._ledger.summary(project, session)
        with self._lock:
            watched = self._sessions.get((project, session))
            pending = len(watched.pending) if watched else 0
            incomplete = watched.incomplete() if watched else 0
            replaced = len(watched.replaced) if watched else 0
            state = watched.state if watched else None
        return SessionStats(
            project,
            session,
            state,
            seen=summary.published + pending,
            published=summary.published,
            pending=pending,
            incomplete=incomplete,
            gave_up=summary.gave_up,
            replaced=replaced,
            last_published_at=summary.last_published_at,
        )

    # ---------------------------------------------------------------------------------------- running

    def run(self) -> None:
        """Watch in the calling thread until ``stop()`` (e.g. from a signal handler); raises what ends it."""
        self._begin()
        self._loop()

    def start(self) -> None:
        """Watch on a background thread; ``stop()`` ends it, ``join()`` waits for it."""
        self._begin()
        self._thread = threading.Thread(target=self._loop_in_thread, name="cryomae-watcher", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background loop to end; whether it has. Raises the exception that ended it, if any."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self._failure is not None:
            raise self._failure
        return thread is None or not thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop (no new step starts; a step in progress finishes) and wait up to ``timeout`` for a
        background loop; raises the exception that ended the loop, if any."""
        self._stopping.set()
        self._wake.set()
        if not self.join(timeout):
            log.warning("watcher_stop_timed_out", timeout_s=timeout)

    def close(self) -> None:
        """Stop, release the inotify watches and close the state database (idempotent)."""
        try:
            self.stop()
        finally:
            with self._step_lock:
                self._release_observers()
                self._closed = True
                self._ledger.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether the loop was started and has not ended."""
        thread = self._thread
        return self._started and not self._stopping.is_set() and (thread is None or thread.is_alive())

    def step(self) -> None:
        """One pass of the loop (take up sessions, events, due listings, completeness checks, publishing).
        ``run()`` calls it every ``check_interval``; tests with a fake clock call it directly."""
        with self._step_lock:
            self._check_open()
            now = self._clock()
            for watched in self._current():
                if watched.state == "watching" and watched.mode == "inotify":
                    self._check_watch(watched, now)
                if watched.state != "watching" and now >= watched.next_attempt:
                    self._activate(watched, now)
            self._drain_events(now)
            for watched in self._current():
                if watched.state == "watching":
                    self._list_due(watched, now)
                    self._check_pending(watched, now)

    # ------------------------------------------------------------------------------------- the loop

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the watcher is closed")

    def _begin(self) -> None:
        with self._lock:
            self._check_open()
            if self._started:
                raise RuntimeError("the watcher was already started (a stopped watcher is not restarted)")
            self._started = True

    def _loop(self) -> None:
        try:
            while True:
                with self._step_lock:
                    if self._stopping.is_set():
                        break
                    self.step()
                self._wake.wait(self._settings.check_interval)
                self._wake.clear()
        finally:
            with self._step_lock:
                self._release_observers()

    def _loop_in_thread(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._failure = exc
            log.error("watcher_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    def _release_observers(self) -> None:
        """Stop every inotify watch; the sessions go back to pending (nothing watches them)."""
        for watched in self._current():
            if watched.observer is not None:
                stop_observer(watched.observer)
            with self._lock:
                watched.observer, watched.state, watched.mode = None, "pending", None

    def _current(self) -> list[WatchedSession]:
        with self._lock:
            return list(self._sessions.values())

    def _is_current(self, watched: WatchedSession) -> bool:
        with self._lock:
            return self._sessions.get(watched.key) is watched

    # ------------------------------------------------------------------------- taking up a session

    def _activate(self, watched: WatchedSession, now: float) -> None:
        """Check the folder, choose inotify or polling, load what was published, and list the folder next."""
        r = watched.record
        try:
            folder = check_folder(r.folder, self._settings.data_roots)
        except InputError as exc:
            watched.next_attempt = now + self._settings.poll_interval
            if watched.state != "unavailable" or watched.reason != str(exc):
                log.error(
                    "session_unavailable",
                    project=r.project,
                    session=r.session,
                    problem=str(exc),
                    retry_every_s=self._settings.poll_interval,
                )
            with self._lock:
                watched.state, watched.reason = "unavailable", str(exc)
            return
        try:
            st = os.stat(folder)
        except OSError:
            return  # gone again since the check: the next step finds out why
        mode, reason = self._choose_mode(folder)
        observer = None
        if mode == "inotify":
            try:
                observer = watch_folder(
                    folder,
                    r.recursive,
                    on_file=lambda path: self._events.put((watched, path, False)),
                    on_folder=lambda path: self._events.put((watched, path, True)),
                    observer_factory=self._observer_factory,
                )
            except OSError as exc:
                mode, reason = "poll", f"the inotify watch failed ({exc.strerror or exc}); polling instead"
        published = {
            path: Signature(p.size, p.mtime_ns) for path, p in self._ledger.publications(r.project, r.session).items()
        }
        with self._lock:
            watched.folder, watched.observer, watched.published = folder, observer, published
            watched.identity = (st.st_dev, st.st_ino)
            watched.state, watched.mode, watched.reason, watched.next_scan = "watching", mode, reason, now
        log.info(
            "session_watching",
            project=r.project,
            session=r.session,
            folder=str(folder),
            mode=mode,
            reason=reason,
            published_before=len(published),
        )

    def _check_watch(self, watched: WatchedSession, now: float) -> None:
        """Notice an inotify watch that no longer covers the session (its folder deleted, moved away or replaced,
        or the watch ended) and take the session up again (unavailable, retried, until the folder is back)."""
        try:
            st = os.stat(watched.folder)
            lost = "" if (st.st_dev, st.st_ino) == watched.identity else "the session folder was replaced"
        except OSError as exc:
            lost = f"the session folder is gone ({exc.strerror or exc})"
        emitters = watched.observer.emitters if watched.observer is not None else set()
        if not lost and not all(emitter.is_alive() for emitter in emitters):
            lost = "the inotify watch ended"
        if not lost:
            return
        r = watched.record
        log.warning(
            "session_watch_lost", project=r.project, session=r.session, folder=str(watched.folder), problem=lost
        )
        if watched.observer is not None:
            stop_observer(watched.observer)
        with self._lock:
            watched.observer, watched.state, watched.mode, watched.reason = None, "pending", None, lost
        watched.next_attempt = now

    def _choose_mode(self, folder: Path) -> tuple[Mode, str]:
        """inotify or polling for a folder, and why."""
        configured = self._settings.mode
        if configured != "auto":
            return configured, f"mode {configured} is configured"
        mount = mount_of(folder, self._mounts())
        if mount is None:
            return "inotify", "filesystem type unknown (no mount table); inotify, polling if the watch fails"
        where = f"{mount.fs_type} filesystem mounted at {mount.mount_point}"
        if needs_polling(mount.fs_type):
            return "poll", f"{where}: inotify does not see files written by other machines"
        return "inotify", f"{where}: a local filesystem, inotify sees every change"

    # ----------------------------------------------------------------------------- finding files

    def _drain_events(self, now: float) -> None:
        """Turn queued inotify events into pending files (folders to list, for events on folders)."""
        seen: set[tuple[int, Path, bool]] = set()
        while True:
            try:
                watched, path, is_folder = self._events.get_nowait()
            except queue.Empty:
                return
            if (id(watched), path, is_folder) in seen or watched.state != "watching" or not self._is_current(watched):
                continue
            seen.add((id(watched), path, is_folder))
            r = watched.record
            if is_folder:
                if r.recursive and path.is_relative_to(watched.folder):
                    watched.folders_to_list.add(path)
                continue
            try:
                relative = path.relative_to(watched.folder)
            except ValueError:
                continue
            if is_candidate(relative, r.pattern, r.recursive):
                known = str(path) in watched.published
                if not known:
                    _, problem = examine(path)
                    self._note_unexaminable(watched, [(path, problem)] if problem else [], path)
                    if problem:
                        continue
                self._consider(watched, path, signature_of(path) if known else None, now)

    def _list_due(self, watched: WatchedSession, now: float) -> None:
        """List the whole folder when due (catch-up, poll, rescan), else the folders inotify reported."""
        r = watched.record
        whole = now >= watched.next_scan
        starts: Sequence[Path | None] = [None] if whole else sorted(watched.folders_to_list)
        watched.folders_to_list.clear()
        for start in starts:
            listing = list_candidates(watched.folder, r.pattern, r.recursive, start)
            for path, st in listing.files:
                self._consider(watched, path, Signature.of(st), now)
            self._note_unexaminable(watched, listing.unexaminable, start or watched.folder)
            if start is None:
                self._note_listing_problem(watched, "; ".join(listing.errors))
        if whole:
            interval = self._settings.poll_interval if watched.mode == "poll" else self._settings.rescan_interval
            watched.next_scan = now + (interval or math.inf)

    def _note_listing_problem(self, watched: WatchedSession, problem: str) -> None:
        """Log a change in whether the session folder can be listed (once per change, not every poll)."""
        if problem == watched.listing_problem:
            return
        r = watched.record
        if problem:
            log.warning("session_listing_failed", project=r.project, session=r.session, problem=problem)
        else:
            log.info("session_listing_recovered", project=r.project, session=r.session)
        watched.listing_problem = problem

    def _note_unexaminable(self, watched: WatchedSession, found: Sequence[tuple[Path, str]], under: Path) -> None:
        """Record the candidates under ``under`` (a folder just listed, or one file) that cannot be examined: each
        is logged and listed in the ledger (``cryomae status``) once, and its row cleared when it no longer is
        (it can be examined now, or it is gone)."""
        r = watched.record
        now_found = {str(path): problem for path, problem in found}
        for key in [k for k in watched.unexaminable if k not in now_found and Path(k).is_relative_to(under)]:
            del watched.unexaminable[key]
            self._ledger.clear_incomplete(r.project, r.session, key)
            log.info("micrograph_examinable_again", project=r.project, session=r.session, path=key)
        for key, problem in now_found.items():
            if watched.unexaminable.get(key) == problem:
                continue
            log.warning(
                "micrograph_unexaminable",
                project=r.project,
                session=r.session,
                path=key,
                problem=problem,
                action="skipped (the rest of the folder is listed); fix or remove the entry",
            )
            self._ledger.note_incomplete(r.project, r.session, key, time.time(), problem)
            watched.unexaminable[key] = problem

    def _consider(self, watched: WatchedSession, path: Path, signature: Signature | None, now: float) -> None:
        with self._lock:
            changed = watched.consider(path, signature, now)
        if changed is not None:
            done = watched.published[str(path)]
            r = watched.record
            reason = (
                f"replaced after it was picked ({done.size} -> {changed.size} bytes): not picked again; re-pick it "
                f"with `cryomae session repick --project {r.project} --session {r.session} --micrograph "
                f"{shlex.quote(str(path))}`"
            )
            self._ledger.note_replaced(r.project, r.session, str(path), time.time(), reason)
            if self._on_replaced is not None:
                try:
                    self._on_replaced(r.project, r.session, str(path), reason)
                except CryomaeError as exc:  # the ledger keeps it for status; only the page misses it
                    log.warning("replaced_note_not_sent", path=str(path), error=str(exc))
            log.warning(
                "published_file_replaced",
                project=watched.record.project,
                session=watched.record.session,
                path=str(path),
                published_size=done.size,
                size=changed.size,
                published_mtime=done.mtime,
                mtime=changed.mtime,
                action="not re-published; re-pick it explicitly if the new file should be picked",
            )

    # --------------------------------------------------------------------- completeness, publishing

    def _check_pending(self, watched: WatchedSession, now: float) -> None:
        s = self._settings
        for pending in list(watched.pending.values()):
            if pending.retry_at > now:
                continue
            before = pending.verdict
            verdict = pending.check(now, s.settle_seconds, s.give_up_seconds, s.data_roots, s.max_pixels)
            if verdict is Verdict.GONE:
                with self._lock:
                    watched.pending.pop(str(pending.path), None)
                if pending.noted and str(pending.path) not in watched.unexaminable:
                    self._ledger.clear_incomplete(watched.record.project, watched.record.session, str(pending.path))
            elif verdict is Verdict.INCOMPLETE and before is not Verdict.INCOMPLETE:
                problem = incompleteness(pending.path)
                log.info(
                    "micrograph_incomplete",
                    project=watched.record.project,
                    session=watched.record.session,
                    path=str(pending.path),
                    size=pending.signature.size if pending.signature else None,
                    problem=problem,
                    give_up_after_s=s.give_up_seconds,
                )
                since = time.time() - (now - pending.since)  # the last change seen, as wall-clock time
                self._ledger.note_incomplete(
                    watched.record.project, watched.record.session, str(pending.path), since, problem
                )
                pending.noted = True
            elif verdict in (Verdict.COMPLETE, Verdict.GIVE_UP, Verdict.REJECT):
                self._publish_file(watched, pending, now)

    def _publish_file(self, watched: WatchedSession, pending: PendingFile, now: float) -> None:
        """Publish, then record (at least once); a TransientError leaves the file pending for a later retry."""
        r, signature = watched.record, pending.signature
        assert signature is not None  # a settled file has one
        complete = pending.verdict is Verdict.COMPLETE
        if pending.verdict is Verdict.REJECT:
            log.warning(
                "micrograph_rejected",
                project=r.project,
                session=r.session,
                path=str(pending.path),
                problem=pending.problem,
                action="published at once (it can never become complete), for the picker to reject with this reason",
            )
        elif not complete:
            log.warning(
                "micrograph_given_up",
                project=r.project,
                session=r.session,
                path=str(pending.path),
                problem=incompleteness(pending.path),
                unchanged_s=round(now - pending.since, 3),
                action="published anyway, for the picker to reject with this reason",
            )
        message = MicrographReady(
            project=r.project,
            session=r.session,
            path=str(pending.path),
            size=signature.size,
            mtime=signature.mtime,
            complete_at=time.time(),
        )
        try:
            self._publish(message)
        except TransientError as exc:
            pending.retry_at = now + self._settings.poll_interval
            log.warning(
                "publish_failed", path=str(pending.path), error=str(exc), retry_in_s=self._settings.poll_interval
            )
            return
        publication = Publication(
            str(pending.path), signature.size, signature.mtime_ns, message.id, time.time(), complete
        )
        self._ledger.record(r.project, r.session, publication)
        with self._lock:
            watched.pending.pop(str(pending.path), None)
            watched.published[str(pending.path)] = signature
        log.info(
            "micrograph_published",
            project=r.project,
            session=r.session,
            path=str(pending.path),
            size=signature.size,
            message_id=message.id,
            complete=complete,
            found_to_published_s=round(now - pending.first_seen, 3),
        )
