"""``cryomae demo``: a collection session played into a watched folder and picked live.

Every service runs in this process (``App``) over the in-memory broker, or over RabbitMQ with ``broker``. A
feeder writes the dataset's micrographs into the session folder one every ``interval_s`` seconds the way a
detector does (written under a temporary name, then renamed); after ``exemplars_after`` micrographs, 15 exemplars
of the first micrograph are registered (the few-shot protocol of the development data: the first micrograph by
name is the reference, exemplars ``default_rng(0).choice(n, 15)`` of its true centres), which starts training.
Micrographs that arrive before the model wait and are picked as soon as it is published. With ``hold_for_model``
(the default) the feeder then pauses until the model is published, as an operator would start collecting only
once the picker is trained, so that the micrographs after it measure the live latency on any machine.

The report: throughput, latency from file complete to rows in the session STAR (for micrographs that arrived
after the model, and for the backlog that waited for it), and precision, recall and F1 against the ground truth
on every micrograph but the reference.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryomae.errors import ConfigError, InputError
from cryomae.evaluation.metrics import evaluate
from cryomae.gallery.page import GALLERY_DIR, INDEX_NAME
from cryomae.io import Coordinates, read_coordinates, write_coordinates, write_mrc
from cryomae.messaging import topology
from cryomae.operator import actions as ops
from cryomae.operator.control import BrokerControl
from cryomae.service.app import App
from cryomae.service.inbox import queue_names
from cryomae.settings import Settings
from cryomae.store.outputs import MicrographEntry, SessionOutputs
from cryomae.store.projects import ProjectStore
from cryomae.words import plural, time_left, training_progress

PROJECT = "demo"
SESSION = "session01"
MARKER = ".cryomae-demo"
N_EXEMPLARS = 15
KNOWN_DIAMETERS = {"bin4": 27.0, "full": 108.0}  # empiar10017 folders (../shared/data/README.md)


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("runs/demo")
    source: str = "auto"  # auto, synthetic, or a folder with micrographs/*.mrc and coords/*.star
    count: int = 20
    interval_s: float = 8.0
    exemplars_after: int = 3
    broker: str = "memory://"
    preset: str = "fast"
    diameter: float | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)  # on top of the preset and the source's
    # no fixed limit while the session progresses: the demo gives up only when nothing (a micrograph written, a
    # training step, a pick) has happened for stall_s seconds; timeout_s is an overall limit for benchmarks
    stall_s: float = 900.0
    timeout_s: float | None = None
    hold_for_model: bool = True  # pause the feed after the exemplars until the model is published


@dataclass(frozen=True)
class Source:
    name: str
    micrographs: list[Path]
    truth: list[Path]
    diameter: float
    train_overrides: dict[str, Any]


def _shared_data() -> Path | None:
    """``../shared/data`` beside the project checkout (or the current folder), when it is there."""
    for base in (Path(__file__).resolve().parents[3], Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def _folder_source(folder: Path, diameter: float | None) -> Source:
    mics = sorted((folder / "micrographs").glob("*.mrc"))
    if not mics:
        raise InputError(folder / "micrographs", "no .mrc micrographs to play (the demo plays MRC files)")
    truth = [folder / "coords" / f"{m.stem}.star" for m in mics]
    missing = [t for t in truth if not t.is_file()]
    if missing:
        raise InputError(missing[0], "ground truth missing for this micrograph")
    if diameter is None:
        info = folder / "dataset.json"
        if info.is_file():
            diameter = float(json.loads(info.read_text())["particle_diameter_px"])
        elif folder.name in KNOWN_DIAMETERS:
            diameter = KNOWN_DIAMETERS[folder.name]
        else:
            raise ConfigError(f"{folder}: give the particle diameter (--diameter); no dataset.json there")
    return Source(str(folder), mics, truth, diameter, {})


def _synthetic_source(out: Path, count: int) -> Source:
    from cryomae.synthetic import make_micrograph

    folder = out / "synthetic"
    (folder / "micrographs").mkdir(parents=True, exist_ok=True)
    (folder / "coords").mkdir(parents=True, exist_ok=True)
    mics, truth = [], []
    for i in range(count):
        m = make_micrograph(shape=(512, 512), diameter=24.0, n_particles=70, n_distractors=20, seed=i)
        mics.append(folder / "micrographs" / f"synthetic_{i:03d}.mrc")
        truth.append(folder / "coords" / f"synthetic_{i:03d}.star")
        write_mrc(mics[-1], m.image, pixel_size=2.0)
        write_coordinates(truth[-1], Coordinates(m.centres))
    # the synthetic particles are small shapes among dark distractors: 1.5 diameters of context suit them
    return Source("synthetic", mics, truth, 24.0, {"box_factor": 1.5})


def resolve_source(opts: DemoOptions) -> Source:
    if opts.source == "synthetic":
        return _synthetic_source(opts.out, opts.count)
    if opts.source == "auto":
        data = _shared_data()
        folder = None if data is None else data / "empiar10017" / "bin4"
        if folder is None or not folder.is_dir():
            return _synthetic_source(opts.out, opts.count)
        return _folder_source(folder, opts.diameter)
    return _folder_source(Path(opts.source).expanduser().resolve(), opts.diameter)


def _prepare_out(out: Path) -> None:
    """Empty the working folder: only a folder that is empty or was made by an earlier demo is replaced."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise InputError(out, "exists and was not made by `cryomae demo`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by cryomae demo\n")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_s": None, "p95_s": None, "max_s": None}
    arr = np.asarray(values)
    return {
        "n": len(values),
        "p50_s": round(float(np.percentile(arr, 50)), 3),
        "p95_s": round(float(np.percentile(arr, 95)), 3),
        "max_s": round(float(arr.max()), 3),
    }


def _score(entries: list[MicrographEntry], source: Source, reference: str) -> dict[str, Any]:
    truth_of = {m.stem: t for m, t in zip(source.micrographs, source.truth, strict=True)}
    picks: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    truth: dict[str, np.ndarray] = {}
    for e in entries:
        stem = Path(e.micrograph).stem
        if stem == reference or stem not in truth_of:
            continue
        c = read_coordinates(e.coordinate_file)
        picks[stem] = (c.xy, c.scores)
        truth[stem] = read_coordinates(truth_of[stem]).xy
    if not truth:
        return {"micrographs": 0}
    ev = evaluate(picks, truth, source.diameter)
    p = ev.pooled
    return {
        "micrographs": len(truth),
        "precision": round(p.precision, 3),
        "recall": round(p.recall, 3),
        "f1": round(p.f1, 3),
        "picks": p.n_picks,
        "truth": p.n_truth,
    }


def run_demo(opts: DemoOptions, progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Play the session, wait until every micrograph is picked (or nothing has progressed for ``stall_s``, or
    ``timeout_s`` has passed), and return the report."""
    say = progress or (lambda _line: None)
    out = opts.out.resolve()
    _prepare_out(out)
    source = resolve_source(DemoOptions(**{**opts.__dict__, "out": out}))
    count = min(opts.count, len(source.micrographs))
    if count < 2:
        raise ConfigError(f"the demo needs at least 2 micrographs, {source.name} has {len(source.micrographs)}")
    session_folder = out / "microscope" / SESSION
    session_folder.mkdir(parents=True)
    namespace = "cryomae-demo"  # its own queues on a shared RabbitMQ; emptied below, so runs never mix
    settings = Settings(
        broker={"url": opts.broker, "namespace": namespace},
        store=out / "store",
        outputs=out / "outputs",
        state=out / "state",
        data_roots=[out / "microscope"],
        watch={"settle_seconds": 1.0, "check_interval": 0.2},
    )
    ProjectStore(settings.store).create_project(
        PROJECT, source.diameter, {"preset": opts.preset, **source.train_overrides, **opts.train_overrides}
    )
    say(f"demo: {count} micrographs from {source.name}, one every {opts.interval_s:g} s, into {session_folder}")
    say(f"demo: broker {opts.broker.split('@')[-1]}, outputs in {settings.outputs / PROJECT / SESSION}")
    app = App(settings)
    app.start()
    for queue in queue_names(app.store):  # what an earlier demo run left on RabbitMQ
        app.broker.purge(queue)
    control = BrokerControl(app.broker, ProjectStore(settings.store))
    written: list[Path] = []
    feeder_error: list[BaseException] = []
    registered_at: list[float] = []
    held: list[float] = []  # seconds the feed paused for the model
    stopping = threading.Event()
    store = ProjectStore(settings.store)

    def feed() -> None:
        try:
            for i, src in enumerate(source.micrographs[:count]):
                tmp = session_folder / f".{src.name}.part"
                shutil.copyfile(src, tmp)
                os.replace(tmp, session_folder / src.name)
                written.append(session_folder / src.name)
                if i + 1 == min(opts.exemplars_after, count) or (i == 0 and opts.exemplars_after <= 0):
                    table = read_coordinates(source.truth[0])
                    chosen = np.random.default_rng(0).choice(len(table), N_EXEMPLARS, replace=False)
                    ex = out / "exemplars.star"
                    write_coordinates(ex, Coordinates(table.xy[chosen]))
                    ops.exemplars_add(settings, control, PROJECT, session_folder / source.micrographs[0].name, ex, None)
                    registered_at.append(time.time())
                    say(f"demo: {N_EXEMPLARS} exemplars of {source.micrographs[0].name} registered; training")
                    if opts.hold_for_model and i + 1 < count:
                        say("demo: feed paused until the model is published (the live latency is measured after it)")
                        t0 = time.monotonic()
                        # the feeder's own pace: it looks for the model as the progress display does
                        while store.current_version(PROJECT) is None and not stopping.wait(0.5):
                            pass
                        held.append(time.monotonic() - t0)
                if i + 1 < count and stopping.wait(opts.interval_s):  # the microscope's pace (the demo's input)
                    return
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, which raises it
            feeder_error.append(exc)

    started = time.time()
    try:
        ops.session_start(settings, control, PROJECT, SESSION, session_folder, "*.mrc", True)
        feeder = threading.Thread(target=feed, name="demo-feeder", daemon=True)
        feeder.start()
        began = last_change = time.monotonic()
        last, seen, stopped = "", None, ""
        dead_letters = topology.dead_letters(topology.MICROGRAPHS)
        while True:
            app.check()
            if feeder_error:
                raise feeder_error[0]
            entries = session_entries(settings)
            picked, failed = len(entries), app.broker.depth(dead_letters)
            version = store.current_version(PROJECT)
            training = store.training_status(PROJECT) or {}
            if version is not None:
                model = version
            elif training.get("state") == "failed":
                stopped = "nothing can be picked without a model (`cryomae status` shows the training's error)"
                break
            elif registered_at:
                model = f"training ({training_progress(training) or 'starting'})"
            else:
                model = "- (exemplars not registered yet)"
            now = time.monotonic()
            if (state := (len(written), picked, failed, training.get("progress"), version)) != seen:
                seen, last_change = state, now
            left = _time_left(entries, count, len(written), opts.interval_s, version)
            line = (
                f"demo: written {len(written)}/{count}, picked {picked}, "
                f"{plural(sum(e.particles for e in entries), 'particle')}, model {model}"
                + (f", {plural(failed, 'micrograph')} dead-lettered" if failed else "")
                + (f"; {left}" if left else "")
            )
            if line != last:
                say(line)
                last = line
            if picked >= count:
                break
            if picked + failed >= count:
                stopped = f"{plural(failed, 'micrograph was', 'micrographs were')} dead-lettered (`cryomae dlq list`)"
                break
            if now - last_change > opts.stall_s:
                stopped = f"nothing progressed for {opts.stall_s:g} s (no micrograph written, training step or pick)"
                break
            if opts.timeout_s is not None and now - began > opts.timeout_s:
                stopped = f"the demo's time limit of {opts.timeout_s:g} s ran out"
                break
            time.sleep(0.5)  # progress display cadence
        finished = time.time()
    finally:
        stopping.set()
        app.stop()
    entries = session_entries(settings)
    training = ops.status_projects(settings)[0]["training"] or {}
    model_at = float(training.get("finished", finished))
    page = (settings.outputs / PROJECT / SESSION / GALLERY_DIR / INDEX_NAME).resolve()
    live = [e.applied_at - e.complete_at for e in entries if e.complete_at >= model_at]
    backlog = [e.applied_at - e.complete_at for e in entries if e.complete_at < model_at]
    after = [e for e in entries if e.applied_at >= model_at]
    span = (max(e.applied_at for e in after) - model_at) if after else 0.0
    waited = [e for e in entries if e.complete_at < model_at]
    drain = (max(e.applied_at for e in waited) - model_at) if waited else 0.0
    # micrographs that found nothing queued before them (the one before already written): the latency of a
    # picker that keeps up
    ordered = sorted(entries, key=lambda e: e.complete_at)
    steady = [
        e.applied_at - e.complete_at
        for before, e in itertools.pairwise(ordered)
        if e.complete_at >= model_at and before.applied_at <= e.complete_at
    ]
    report = {
        "complete": len(entries) >= count,
        "unfinished": None if len(entries) >= count else _unfinished(count, len(entries), training, stopped),
        "source": source.name,
        "broker": opts.broker.split("@")[-1],
        "micrographs": count,
        "picked": len(entries),
        "dead_lettered": failed,
        "particles": sum(e.particles for e in entries),
        "interval_s": opts.interval_s,
        "wall_s": round(finished - started, 1),
        "training_s": None if training.get("seconds") is None else round(float(training["seconds"]), 1),
        "training": training_report(training),
        "feed_held_s": round(sum(held), 1),
        "throughput_per_min": None if span <= 0 else round(len(after) / span * 60.0, 1),
        "backlog_per_min": None if drain <= 0 else round(len(waited) / drain * 60.0, 1),
        "latency_live": _percentiles(live),
        "latency_caught_up": _percentiles(steady),
        "latency_backlog": _percentiles(backlog),
        "accuracy": _score(entries, source, source.micrographs[0].stem),
        "outputs": str(settings.outputs / PROJECT / SESSION),
        "gallery": str(page) if page.is_file() else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(format_report(report))
    return report


def _time_left(entries: list[MicrographEntry], count: int, written: int, interval_s: float, version: str | None) -> str:
    """The demo's time left once the model is picking: the feed's remaining micrographs at the microscope's pace,
    or the micrographs not yet picked at the picker's pace so far, whichever is longer (empty before the model,
    when the training's own estimate is shown, and before the first pick)."""
    if version is None or not entries or len(entries) >= count:
        return ""
    times = sorted(e.applied_at for e in entries)
    pace = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else interval_s
    return time_left(max((count - written) * interval_s, (count - len(entries)) * pace))


def training_report(training: dict[str, Any]) -> str:
    """The training in a few words for the report: its time, or how far it got and why it stopped."""
    state = training.get("state")
    if not training:
        return "not started (no exemplars registered)"
    if state == "done" and training.get("seconds") is not None:
        return f"{float(training['seconds']):.1f} s"
    if state == "failed":
        return f"failed: {training.get('error', 'no reason given')}"
    progress = training_progress(training)
    return f"not finished ({progress})" if progress else "not finished (no training step done)"


def _unfinished(count: int, picked: int, training: dict[str, Any], stopped: str) -> str:
    """What did not finish and why, in one sentence for the operator."""
    what = f"{count - picked} of {plural(count, 'micrograph')} not picked"
    if training.get("state") != "done":
        what += f"; training {training_report(training)}"
    return f"{what}: {stopped or 'the demo was stopped'}"


def session_entries(settings: Settings) -> list[MicrographEntry]:
    """The session's micrographs as the outputs hold them (read-only)."""
    return SessionOutputs(settings.outputs / PROJECT / SESSION, read_only=True).micrographs()


def format_report(r: dict[str, Any]) -> str:
    def lat(d: dict[str, Any]) -> str:
        if not d["n"]:
            return "none"
        return f"p50 {d['p50_s']} s, p95 {d['p95_s']} s, max {d['max_s']} s over {plural(d['n'], 'micrograph')}"

    acc = r["accuracy"]
    score = (
        f"precision {acc['precision']}, recall {acc['recall']}, F1 {acc['f1']} "
        f"on {plural(acc['micrographs'], 'micrograph')} "
        f"({plural(acc['picks'], 'pick')}, {plural(acc['truth'], 'true particle')}; the reference micrograph excluded)"
        if acc.get("micrographs")
        else "no micrographs to score"
    )
    headline = next(
        (
            f"{lat(r[key])} ({what})"
            for key, what in (
                ("latency_live", "micrographs written after the model was published"),
                ("latency_caught_up", "micrographs with nothing queued before them"),
                ("latency_backlog", "every micrograph waited for the model: no live figure"),
            )
            if r[key]["n"]
        ),
        "none (no micrograph was picked)",
    )
    held = f" (the feed paused {r['feed_held_s']} s for it)" if r.get("feed_held_s") else ""
    pace = f" (the microscope's pace here: {60.0 / r['interval_s']:.0f}/min)" if r["interval_s"] > 0 else ""
    backlog = (
        f"picked at {r['backlog_per_min']} micrographs/min once the model was published (capacity)"
        if r["backlog_per_min"] is not None
        else "not measured (no micrograph waited for the model and was picked)"
    )
    throughput = (
        f"{r['throughput_per_min']} micrographs/min{pace}"
        if r["throughput_per_min"] is not None
        else "not measured (fewer than two micrographs picked after the model)"
    )
    page = (
        f"{r['gallery']} (open it in a browser, or `cryomae gallery serve`)"
        if r["gallery"]
        else "not written (no micrograph was picked)"
    )
    return "\n".join(
        [
            "",
            (
                f"demo {'complete' if r['complete'] else 'INCOMPLETE'}: {r['picked']}/{r['micrographs']} micrographs "
                f"picked, {plural(r['particles'], 'particle')}, {r['dead_lettered']} dead-lettered, {r['wall_s']} s"
            ),
            *([] if r["complete"] else [f"  what did not finish: {r.get('unfinished')}"]),
            f"  latency (file complete -> rows in the STAR): {headline}",
            f"  training: {r['training']}{held}",
            f"  latency (file complete -> rows in the STAR), arriving after the model: {lat(r['latency_live'])}",
            f"  latency once the backlog was picked (nothing queued before them): {lat(r['latency_caught_up'])}",
            f"  latency of the micrographs that waited for the model: {lat(r['latency_backlog'])}",
            f"  backlog: {backlog}",
            f"  throughput after the model: {throughput}",
            f"  accuracy: {score}",
            f"  outputs: {r['outputs']}",
            f"  session page: {page}",
        ]
    )
