"""What the operator CLI does, as functions returning typed results (TypedDicts: the CLI prints them for people, or
as they are with ``--json``).

Every function takes the ``Settings`` and, where it sends or reports on messages, a ``Control``
(``cryomae.operator.control``): RabbitMQ directly, or the inbox of the ``cryomae run`` process.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from cryomae.errors import InputError
from cryomae.io.coordinates import Corrections, read_corrections
from cryomae.messages import (
    MicrographReady,
    Rethreshold,
    SessionCommand,
    TrainRequest,
    check_name,
    decode,
    valid_name,
)
from cryomae.messaging import open_broker, topology
from cryomae.messaging.base import Envelope
from cryomae.messaging.delivery import QUEUE_HEADER, REASON_HEADER
from cryomae.operator.control import BrokerControl, Control, SpoolControl
from cryomae.service.diskspace import disk_space
from cryomae.service.heartbeats import trainer_liveness
from cryomae.service.inbox import DLQ_LISTED
from cryomae.service.watcher import WATCHER_STATE
from cryomae.settings import Settings
from cryomae.store.outputs import SessionOutputs, repick_messages
from cryomae.store.projects import ProjectStore
from cryomae.watching import check_folder
from cryomae.watching.ledger import read_incomplete, read_ledger, read_replaced
from cryomae.words import escaped, plural, training_progress

# ------------------------------------------------------------------------------------------------ results
# What each action returns: typed for the CLI (and mypy), printed as is by ``--json``.


class ProjectCreated(TypedDict):
    project: str
    path: str
    diameter: float | None
    train_overrides: dict[str, Any]


class TrainingRequested(TypedDict):
    request: str
    delivery: str


class ExemplarsAdded(TypedDict):
    project: str
    exemplar_set: str
    exemplars: int
    diameter: float
    micrograph: str
    warnings: list[str]
    training: TrainingRequested | None


class CorrectionsAdded(TypedDict):
    project: str
    session: str
    exemplar_set: str
    base: str
    added: int
    already: int
    replaced: int
    missed: int
    wrong: int
    micrographs: int
    training: TrainingRequested | None


class SessionStarted(TypedDict):
    project: str
    session: str
    folder: str
    delivery: str


class SessionStopped(TypedDict):
    project: str
    session: str
    delivery: str


class Rethresholded(TypedDict):
    project: str
    session: str
    threshold: float | None
    delivery: str


class Repicked(TypedDict):
    project: str
    session: str
    model_version: str
    micrographs: int
    missing: list[str]
    delivery: str


class ProjectStatus(TypedDict):
    project: str
    diameter: float | None
    current_version: str | None
    versions: list[str]
    training: dict[str, Any] | None
    training_state: str
    waiting: int | None


class IncompleteFile(TypedDict):
    path: str
    since: float
    problem: str


class SessionStatus(TypedDict):
    project: str
    session: str
    folder: str | None
    watched: bool
    seen: int | None
    picked: int
    failed: int
    particles: int
    threshold: float | None
    last_seen_at: float | None
    incomplete: int
    incomplete_files: list[IncompleteFile]
    replaced_files: list[IncompleteFile]


class Status(TypedDict):
    broker: str
    mode: str
    running: bool
    queues: dict[str, int] | None
    state: str
    store: str
    trainers: list[dict[str, Any]]
    projects: list[ProjectStatus]
    sessions: list[SessionStatus]
    disks: list[dict[str, Any]]


class DeadLetter(TypedDict, total=False):
    reason: str
    queue: str
    deliveries: int
    id: str
    kind: str | None
    project: str
    session: str
    path: str
    micrograph: str
    exemplar_set: str
    body: str
    undecodable: str


class DeadLetters(TypedDict):
    queue: str
    running: bool
    depth: int | None
    messages: list[DeadLetter]


class Replayed(TypedDict):
    queue: str
    replayed: int | None
    note: str


class Purged(TypedDict):
    queue: str
    purged: int | None
    note: str


# ------------------------------------------------------------------------------------------------ control


def open_control(settings: Settings) -> Control:
    """RabbitMQ when the settings name it, else the running one-process mode's inbox."""
    if settings.broker.url.startswith("memory"):
        return SpoolControl(settings.state)
    broker = open_broker(settings.broker_url(), settings.broker.namespace, settings.broker.heartbeat)
    return BrokerControl(broker, ProjectStore(settings.store))


def _delivery(control: Control) -> str:
    return "queued for the running `cryomae run` process" if control.deferred else "sent"


# ------------------------------------------------------------------------------------------------ projects


def project_create(
    settings: Settings, name: str, diameter: float | None, train_overrides: dict[str, Any], exist_ok: bool
) -> ProjectCreated:
    project = ProjectStore(settings.store).create_project(name, diameter, train_overrides, exist_ok=exist_ok)
    return {
        "project": project.name,
        "path": str(project.path),
        "diameter": project.diameter,
        "train_overrides": project.train_overrides,
    }


def exemplars_add(
    settings: Settings,
    control: Control | None,
    project: str,
    micrograph: Path,
    coords: Path,
    diameter: float | None,
) -> ExemplarsAdded:
    """Validate and store an exemplar set, then request training (unless ``control`` is None)."""
    exset = ProjectStore(settings.store).add_exemplars(project, micrograph, coords, diameter, roots=settings.roots())
    out: ExemplarsAdded = {
        "project": project,
        "exemplar_set": exset.id,
        "exemplars": exset.count,
        "diameter": exset.diameter,
        "micrograph": str(exset.micrograph),
        "warnings": list(exset.warnings),
        "training": None,
    }
    if control is not None:
        request = TrainRequest(project=project, exemplar_set=exset.id)
        control.send(topology.TRAINING, request)
        out["training"] = {"request": request.id, "delivery": _delivery(control)}
    return out


def exemplars_correct(
    settings: Settings, control: Control | None, project: str, session: str, path: Path
) -> CorrectionsAdded:
    """Validate an operator's corrections (the session page's ``corrections.star``) against the session's outputs,
    store them as a new exemplar set on top of the current model's, and request training with a re-pick of the
    session once the new version is published (unless ``control`` is None)."""
    store = ProjectStore(settings.store)
    store.get_project(project)
    check_name(session, "session name")
    marks = read_corrections(path)
    if (marks.project, marks.session) not in ((None, None), (project, session)):
        raise InputError(path, f"the corrections are for {marks.project}/{marks.session}, not for {project}/{session}")
    folder = session_outputs_dir(settings, project, session)
    if not folder.is_dir():
        raise InputError(folder, f"no outputs for session {project}/{session}: nothing was picked there")
    outputs = SessionOutputs(folder, read_only=True)
    if outputs.owner not in (None, (project, session)):
        raise InputError(folder, f"these outputs are {outputs.owner[0]}/{outputs.owner[1]}'s, not {project}/{session}")
    paths = {outputs.star_name(e.micrograph): e.micrograph for e in outputs.micrographs()}
    unknown = sorted(set(marks.names) - set(paths))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InputError(path, f"not a picked micrograph of {project}/{session}: {shown}")
    absolute = Corrections([paths[n] for n in marks.names], marks.xy, marks.particle, project, session)
    base = store.current_exemplar_set(project)
    exset, counts = store.add_corrections(project, base.id, absolute, path, roots=settings.roots())
    out: CorrectionsAdded = {
        "project": project,
        "session": session,
        "exemplar_set": exset.id,
        "base": base.id,
        "added": counts["added"],
        "already": counts["already"],
        "replaced": counts["replaced"],
        "missed": exset.missed,
        "wrong": exset.wrong,
        "micrographs": len(exset.corrections),
        "training": None,
    }
    if control is not None:
        request = TrainRequest(project=project, exemplar_set=exset.id, repick_session=session)
        control.send(topology.TRAINING, request)
        out["training"] = {"request": request.id, "delivery": _delivery(control)}
    return out


# ------------------------------------------------------------------------------------------------ sessions


def session_start(
    settings: Settings, control: Control, project: str, session: str, folder: Path, pattern: str, recursive: bool
) -> SessionStarted:
    ProjectStore(settings.store).get_project(project)  # the project must exist
    check_name(session, "session name")
    resolved = check_folder(Path(os.path.abspath(folder)), settings.roots())  # the watcher checks it again
    command = SessionCommand(
        action="start", project=project, session=session, folder=str(resolved), pattern=pattern, recursive=recursive
    )
    control.send(topology.WATCHER, command)
    return {"project": project, "session": session, "folder": str(resolved), "delivery": _delivery(control)}


def session_stop(settings: Settings, control: Control, project: str, session: str) -> SessionStopped:
    command = SessionCommand(
        action="stop", project=check_name(project, "project name"), session=check_name(session, "session name")
    )
    control.send(topology.WATCHER, command)
    return {"project": project, "session": session, "delivery": _delivery(control)}


def session_outputs_dir(settings: Settings, project: str, session: str) -> Path:
    return settings.outputs / check_name(project, "project name") / check_name(session, "session name")


def gallery_build(settings: Settings, project: str, session: str) -> dict[str, Any]:
    """Draw a session's gallery again from its outputs (every picture, the candidates, the page), e.g. for a session
    written before the gallery existed; the outputs are only read. A running writer may write beside it."""
    from cryomae.gallery.page import SessionGallery, read_pixels
    from cryomae.service.gallery import seen_in_ledger

    folder = session_outputs_dir(settings, project, session)
    if not folder.is_dir():
        raise InputError(folder, f"no outputs for session {project}/{session}")
    gallery = SessionGallery(SessionOutputs(folder, read_only=True), settings.gallery.size)
    roots, unreadable = settings.roots(), []
    entries = gallery.outputs.micrographs()
    for entry in entries:
        pixels, problem = read_pixels(entry.micrograph, roots, settings.max_micrograph_pixels)
        if problem is not None:
            unreadable.append({"micrograph": entry.micrograph, "problem": problem})
        gallery.add(entry.micrograph, pixels)
    page = gallery.write_index(seen_in_ledger(settings.state, project, session))
    return {"page": str(page), "micrographs": len(entries), "unreadable": unreadable}


def session_rethreshold(
    settings: Settings, control: Control, project: str, session: str, threshold: float | None
) -> Rethresholded:
    folder = session_outputs_dir(settings, project, session)
    if not folder.is_dir():
        raise InputError(folder, f"no outputs for session {project}/{session} yet")
    control.send(topology.PICKS, Rethreshold(project=project, session=session, threshold=threshold))
    return {"project": project, "session": session, "threshold": threshold, "delivery": _delivery(control)}


def session_repick(
    settings: Settings,
    control: Control,
    project: str,
    session: str,
    every: bool,
    micrographs: Sequence[str] = (),
) -> Repicked:
    """Re-pick a session's micrographs picked with an older model version than the current one (``every``:
    all of them; ``micrographs``: these, e.g. one replaced on disk after its pick, whatever their model)."""
    current = ProjectStore(settings.store).current_version(project)
    if current is None:
        raise InputError(None, f"project {project!r} has no model yet; its micrographs are picked when it has one")
    outputs = SessionOutputs(session_outputs_dir(settings, project, session), read_only=True)
    messages, missing = repick_messages(outputs, project, session, current, every, micrographs)
    for message in messages:
        control.send(topology.MICROGRAPHS, message)
    return {
        "project": project,
        "session": session,
        "model_version": current,
        "micrographs": len(messages),
        "missing": missing,
        "delivery": _delivery(control),
    }


# ------------------------------------------------------------------------------------------------ status


def _failed_by_session(control: Control) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for env in control.dead_letters(topology.MICROGRAPHS, 10_000) or []:
        try:
            msg = decode(env.body)
        except InputError:  # what ``decode`` raises for any body: listed by ``dlq list``, not counted here
            continue
        if isinstance(msg, MicrographReady):
            key = (msg.project, msg.session)
            counts[key] = counts.get(key, 0) + 1
    return counts


def training_state(training: dict[str, Any] | None, trainers: list[dict[str, Any]], queued: int | None) -> str:
    """A project's training for people, with the liveness of the trainer that has (or had) its request."""
    if not training:
        return "never trained"
    state = str(training.get("state", "unknown"))
    in_queue = "" if queued is None else f"; {plural(queued, 'request')} in the training queue"
    if state == "failed":
        return f"training failed: {training.get('error', '?')}"
    if state == "queued":
        why = f" ({training['interrupted']})" if training.get("interrupted") else ""
        return f"training queued{why}{in_queue}"
    if state == "training":
        progress = f" ({shown})" if (shown := training_progress(training)) else ""
        owner = training.get("trainer")
        beats = [t for t in trainers if owner is None or t.get("id") == owner]
        if any(t["alive"] for t in beats):
            return f"training{progress}"
        if beats:
            silent = min(t["age_s"] for t in beats)
            gone = f"its trainer {owner or beats[0]['id']} stopped (no heartbeat for {silent:.0f} s)"
        else:
            gone = "no trainer is running"
        was = f" (was at {training['progress']})" if training.get("progress") else ""
        return f"training request queued{was}: {gone}; it is trained again when a trainer runs{in_queue}"
    if state == "done":
        return "training done"
    return f"training {state}"


def status_projects(
    settings: Settings, depths: dict[str, int] | None = None, trainers: list[dict[str, Any]] | None = None
) -> list[ProjectStatus]:
    """Every project with its model versions, training state and micrographs waiting for a first model."""
    store = ProjectStore(settings.store)
    trainers = trainer_liveness(settings.store) if trainers is None else trainers
    queued = None if depths is None else depths.get(topology.TRAINING, 0)
    return [
        {
            "project": project.name,
            "diameter": project.diameter,
            "current_version": store.current_version(project.name),
            "versions": store.versions(project.name),
            "training": (training := store.training_status(project.name)),
            "training_state": training_state(training, trainers, queued),
            "waiting": None if depths is None else depths.get(topology.waiting(project.name), 0),
        }
        for project in store.projects()
    ]


def status(settings: Settings, control: Control) -> Status:
    """Queue depths, projects with their model versions and training state, and per-session counts."""
    depths = control.depths()
    trainers = trainer_liveness(settings.store)
    projects = status_projects(settings, depths, trainers)
    watched, summaries = read_ledger(settings.state / WATCHER_STATE)
    folders = {(r.project, r.session): str(r.folder) for r in watched}
    incomplete = read_incomplete(settings.state / WATCHER_STATE)  # files waiting, may still grow (or give up)
    replaced = read_replaced(settings.state / WATCHER_STATE)  # picked files changed on disk since
    failed = _failed_by_session(control)
    keys = set(folders) | set(summaries) | set(incomplete) | set(failed) | set(replaced)  # failures only, too
    if settings.outputs.is_dir():
        keys |= {
            (p.name, s.name)
            for p in settings.outputs.iterdir()
            if p.is_dir() and valid_name(p.name)
            for s in p.iterdir()
            if s.is_dir() and valid_name(s.name)
        }
    sessions: list[SessionStatus] = []
    for project, session in sorted(keys):
        outputs = SessionOutputs(session_outputs_dir(settings, project, session), read_only=True)
        counts = outputs.counts()
        summary = summaries.get((project, session))
        picked_at = (
            {e.micrograph: e.picked_at for e in outputs.micrographs()} if replaced.get((project, session)) else {}
        )
        sessions.append(
            {
                "project": project,
                "session": session,
                "folder": folders.get((project, session)),
                "watched": (project, session) in folders,
                "seen": None if summary is None else summary.published,
                "picked": counts.micrographs,
                "failed": failed.get((project, session), 0),
                "particles": counts.particles,
                "threshold": counts.threshold,
                "last_seen_at": None if summary is None else summary.last_published_at,
                "incomplete": len(incomplete.get((project, session), [])),
                "incomplete_files": [
                    {"path": f.path, "since": f.since, "problem": f.problem}
                    for f in incomplete.get((project, session), [])
                ],
                # replaced after their pick, and not re-picked since
                "replaced_files": [
                    {"path": f.path, "since": f.since, "problem": f.problem}
                    for f in replaced.get((project, session), [])
                    if picked_at.get(f.path, -math.inf) < f.since
                ],
            }
        )
    return {
        "broker": settings.redacted()["broker"]["url"],
        "mode": "one process (in-memory broker)" if control.deferred else "rabbitmq",
        "running": depths is not None,
        "queues": depths,
        "state": str(settings.state.resolve()),
        "store": str(settings.store.resolve()),
        "trainers": trainers,
        "projects": projects,
        "sessions": sessions,
        # the outputs' and the state's filesystems: a full one stops the writer (it waits, and resumes by itself)
        "disks": [disk_space(settings.outputs), disk_space(settings.state)],
    }


# ------------------------------------------------------------------------------------------------ dead letters


def _queue(name: str) -> str:
    if name not in topology.WORK_QUEUES:
        raise InputError(None, f"unknown queue {name!r}; choose from {', '.join(topology.WORK_QUEUES)}")
    return name


def describe_dead_letter(env: Envelope) -> DeadLetter:
    """A dead letter as ``dlq list`` shows it; one whose body does not decode (too large, nested too deep, not a
    message) is listed with the start of its body and why (``undecodable``), never an exception."""
    row: DeadLetter = {
        "reason": str(env.headers.get(REASON_HEADER, "")),
        "queue": str(env.headers.get(QUEUE_HEADER, "")),
        "deliveries": env.delivery_count,
    }
    try:
        msg = decode(env.body, source="")
    except InputError as exc:
        row["body"] = env.body[:200].decode(errors="replace")
        row["undecodable"] = str(exc)
        return row
    row.update({"id": msg.id, "kind": getattr(msg, "kind", None)})
    for key in ("project", "session", "path", "micrograph", "exemplar_set"):
        if hasattr(msg, key):
            row[key] = getattr(msg, key)
    return row


def dlq_list(control: Control, queue: str, limit: int | None = None) -> DeadLetters:
    """The depth and the first ``limit`` (default ``DLQ_LISTED``) dead letters of a work queue, described."""
    # depths first: peeking holds the listed letters unacknowledged for a moment, and a depth read meanwhile
    # would not count them
    depths = control.depths()
    letters = control.dead_letters(_queue(queue), DLQ_LISTED if limit is None else limit)
    return {
        "queue": topology.dead_letters(queue),
        "running": letters is not None,
        "depth": None if depths is None else depths.get(topology.dead_letters(queue), 0),
        "messages": [describe_dead_letter(e) for e in letters or []],
    }


def dlq_replay(control: Control, queue: str, limit: int | None) -> Replayed:
    outcome = control.replay(_queue(queue), limit)
    return {"queue": topology.dead_letters(queue), "replayed": outcome.count, "note": outcome.note}


def dlq_purge(control: Control, queue: str) -> Purged:
    outcome = control.purge(_queue(queue))
    return {"queue": topology.dead_letters(queue), "purged": outcome.count, "note": outcome.note}


def format_status(data: Status) -> str:
    """``cryomae status`` for people."""
    lines = [f"broker: {data['broker']} ({data['mode']})"]
    if data["queues"] is None:
        lines.append(
            f"queues: unknown (no `cryomae run` process uses the state folder {data['state']}; requests wait in its "
            "inbox. The folders come from the settings, relative to the working folder unless absolute: run operator "
            "commands where `cryomae run` runs, or with the same CRYOMAE_STATE, CRYOMAE_STORE and CRYOMAE_OUTPUTS)"
        )
    else:
        busy = {q: n for q, n in data["queues"].items() if n}
        lines.append("queues: " + (", ".join(f"{q} {n}" for q, n in busy.items()) or "all empty"))
    alive = [t for t in data.get("trainers", []) if t["alive"]]
    if alive:
        beats = ", ".join(f"{t['id']}, heartbeat {t['age_s']:.0f} s ago" for t in alive)
        lines.append(f"trainer: running ({beats})")
    elif data.get("trainers"):
        last = min(t["age_s"] for t in data["trainers"])
        lines.append(f"trainer: not running (last heartbeat {last:.0f} s ago)")
    else:
        lines.append("trainer: not running")
    lines.extend(
        f"disk FULL: {escaped(d['path'])} has {d['free_bytes'] / 2**20:.1f} MiB free; the writer waits for space "
        "and resumes by itself once some is freed (nothing is lost)"
        for d in data.get("disks", [])
        if d["full"]
    )
    lines.append("")
    lines.append("projects:" if data["projects"] else f"projects: none in the store {data['store']}")
    for p in data["projects"]:
        waiting = f", {plural(p['waiting'], 'micrograph')} waiting for a model" if p["waiting"] else ""
        lines.append(
            f"  {p['project']}: model {p['current_version'] or '-'} ({plural(len(p['versions']), 'version')}), "
            f"{escaped(p['training_state'])}{waiting}"
        )
    lines.append("")
    if not data["sessions"]:
        lines.append("sessions: none")
        return "\n".join(lines)
    header = ("project/session", "watched", "seen", "picked", "failed", "particles", "cutoff")
    rows = [
        (
            f"{s['project']}/{s['session']}",
            "yes" if s["watched"] else "no",
            "-" if s["seen"] is None else str(s["seen"]),
            str(s["picked"]),
            str(s["failed"]),
            str(s["particles"]),
            # the session's cutoff (`cryomae session rethreshold`), else each micrograph's automatic one
            "automatic" if s["threshold"] is None else f"{s['threshold']:g}",
        )
        for s in data["sessions"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("  ".join(cells))
    for s in data["sessions"]:
        where = f"{s['project']}/{s['session']}"
        listed = (
            (
                s.get("incomplete_files", []),
                f"{len(s.get('incomplete_files', []))} incomplete",
                "incomplete since {} ({})",
            ),
            (
                s.get("replaced_files", []),
                f"{plural(len(s.get('replaced_files', [])), 'micrograph')} replaced",
                "seen {}, {}",
            ),
        )
        for files, title, template in listed:
            if files:
                lines += ["", f"{where}: {title}"]
                for f in files:
                    at = datetime.fromtimestamp(f["since"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                    lines.append(f"  {escaped(f['path'])}: " + template.format(at, escaped(f["problem"])))
    return "\n".join(lines)


def format_dead_letters(data: DeadLetters) -> str:
    """``cryomae dlq list`` for people: every name and reason ``escaped`` (``--json`` keeps them raw)."""
    if not data["running"]:
        return f"{data['queue']}: unknown (no `cryomae run` process is running)"
    depth = "depth unknown" if data["depth"] is None else plural(data["depth"], "message")
    lines = [f"{data['queue']}: {depth}"]
    for m in data["messages"]:
        what = m.get("path") or m.get("micrograph") or m.get("exemplar_set") or m.get("body", "")
        lines.append(f"  {escaped(m.get('id', '?'))} {escaped(m.get('kind', '?'))} {escaped(what)}")
        lines.append(f"    reason: {escaped(m['reason'])}")
        if "undecodable" in m:
            lines.append(f"    undecodable: {escaped(m['undecodable'])}")
    return "\n".join(lines)


def config_show(settings: Settings) -> dict[str, Any]:
    return settings.redacted()


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
