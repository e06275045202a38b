"""The ``cryomae`` command: offline training, picking, evaluation and previews; the live services
(``service``, ``run``, ``demo``); and the operator's commands (``project``, ``exemplars``, ``session``,
``status``, ``dlq``, ``config``).

Each sub-command is a thin layer: parse options, call the library, print for people (or JSON for scripts).
Exit codes: 0 success, 1 an input or model problem (the message names the file), 2 bad usage or settings,
3 the broker cannot be reached (try again later).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from cryomae.config import PickConfig, TrainConfig
from cryomae.errors import ConfigError, CryomaeError, InputError, TransientError
from cryomae.logging import configure_logging, json_asked
from cryomae.model.presets import PRESETS
from cryomae.picking.threshold import THRESHOLD_RULES
from cryomae.threads import configure_threads
from cryomae.words import escaped, plural

log = structlog.get_logger("cryomae.operator.cli")


def _threshold(value: str) -> str | float:
    if value in THRESHOLD_RULES:
        return value
    try:
        return float(value)
    except ValueError:
        rules = ", ".join(THRESHOLD_RULES)
        raise argparse.ArgumentTypeError(f"expected {rules} or a number, got {value!r}") from None


def _session_threshold(value: str) -> float:
    """``session rethreshold --threshold``: a score (``--clear`` goes back to each micrograph's own cutoff)."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(
            f"expected a score (a number, e.g. 0.42), got {value!r}; --clear goes back to each micrograph's own "
            "automatic cutoff"
        )
    return number


def _set_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse KEY=VALUE overrides; values are JSON when they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _train_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(json.loads(Path(args.config).read_text()))
    for name in ("preset", "box_factor", "epochs", "pretrain_epochs", "seed", "device", "encoder"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values.update(_set_pairs(args.set or []))
    return TrainConfig(**values)


def _pick_config(args: argparse.Namespace) -> PickConfig:
    values: dict[str, Any] = {}
    if args.stride_fraction is not None:
        values["stride_fraction"] = args.stride_fraction
    if args.threshold is not None:
        values["threshold"] = args.threshold
    if args.score is not None:
        values["score"] = args.score
    if args.no_nms:
        values["nms"] = False
    if args.device is not None:
        values["device"] = args.device
    if args.batch_size is not None:
        values["batch_size"] = args.batch_size
    return PickConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from cryomae.operator.workflows import train_from_files

    cfg = _train_config(args)
    out = train_from_files(args.reference, args.coords, args.diameter, args.out, cfg, args.unlabeled or [])
    print(f"model written to {out}")
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    from cryomae.operator.workflows import pick_files

    summary = pick_files(args.model, args.micrographs, args.out, _pick_config(args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for row in summary["micrographs"]:
            print(
                f"{row['micrograph']}: {plural(row['picks'], 'pick')} (threshold {row['threshold']:.4f}, "
                f"{row['seconds']:.2f} s)"
            )
        on = plural(len(summary["micrographs"]), "micrograph")
        print(f"{plural(summary['total_picks'], 'pick')} on {on} -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cryomae.operator.workflows import evaluate_dirs

    ev = evaluate_dirs(args.picks, args.truth, args.diameter, args.iou)
    print(json.dumps(ev.to_dict(), indent=2) if args.json else ev.format_table())
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from cryomae.operator.workflows import preview_file

    out = preview_file(
        args.micrograph, args.picks, args.out, args.truth, args.diameter, size=args.size, legend=not args.no_legend
    )
    print(f"preview written to {out}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from cryomae.operator.workflows import run_example

    result = run_example(Path(args.out), preset=args.preset, seed=args.seed)
    print(result["table"])
    print(f"\nexample written to {args.out}: data/, model/, picks/, preview.png, evaluation.json")
    return 0


# ------------------------------------------------------------------------------------------ facility encoder


def _micrograph_files(paths: Sequence[Path]) -> list[Path]:
    """The given micrographs, with every folder replaced by the micrographs below it (any depth)."""
    from cryomae.io.micrographs import MICROGRAPH_SUFFIXES

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in MICROGRAPH_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


def cmd_encoder_pretrain(args: argparse.Namespace) -> int:
    from cryomae.config import EncoderConfig
    from cryomae.training.encoder import next_version, pretrain_encoder

    files = _micrograph_files(args.micrographs)
    if not files:
        raise InputError(None, "no micrographs found in " + ", ".join(str(p) for p in args.micrographs))
    values: dict[str, Any] = {}
    for name in ("preset", "epochs", "min_diameter", "max_diameter", "seed", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values.update(_set_pairs(args.set or []))
    cfg = EncoderConfig(**values)
    out = args.out if args.out is not None else next_version(_settings(args).store / "encoders" / args.name)
    on = plural(len(files), "micrograph")
    print(f"pre-training a facility encoder on {on} -> {out} (resumable: run again to go on)")

    def report(stage: str, step: int, total: int, losses: dict[str, float]) -> None:
        print(
            f"  {stage}: step {step}/{total} ({100 * step / total:.0f} %), loss {losses.get('mse', float('nan')):.4f}"
        )

    written = pretrain_encoder(files, out, cfg, on_progress=report)
    print(f"facility encoder written to {written}; train projects from it with --encoder {written}")
    return 0


def cmd_encoder_list(args: argparse.Namespace) -> int:
    from cryomae.errors import CheckpointError
    from cryomae.model.layout import MANIFEST, read_manifest

    root = _settings(args).store / "encoders"
    rows = []
    for manifest in sorted(root.glob(f"*/v*/{MANIFEST}")):
        try:
            m = read_manifest(manifest)
            rows.append(
                {
                    "encoder": str(manifest.parent),
                    "preset": m["preset"]["name"],
                    "micrographs": m["micrographs"]["count"],
                    "epochs": m["config"]["epochs"],
                    "created": m["created"],
                    "checksum": m["checksum"][:12],
                }
            )
        except (CheckpointError, KeyError, TypeError) as e:
            rows.append({"encoder": str(manifest.parent), "problem": str(e)})
    text = "\n".join(
        f"{r['encoder']}: "
        + (
            r["problem"]
            if "problem" in r
            else f"{r['preset']}, {plural(r['micrographs'], 'micrograph')}, "
            f"{plural(r['epochs'], 'epoch')}, {r['created']}, checksum {r['checksum']}"
        )
        for r in rows
    )
    _print(args, rows, text or f"no facility encoders under {root}")
    return 0


# ------------------------------------------------------------------------------------------ live services


def _settings(args: argparse.Namespace) -> Any:
    """The service settings: environment, .env and secrets, then these command-line options."""
    from cryomae.settings import load_settings

    overrides: dict[str, Any] = {}
    if getattr(args, "broker", None):
        overrides["broker"] = {"url": args.broker}
    for name in ("store", "outputs", "state"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "data_root", None):
        overrides["data_roots"] = args.data_root
    if getattr(args, "device", None):
        overrides["device"] = args.device
    return load_settings(**overrides)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    from cryomae.operator.actions import dumps

    print(dumps(data) if getattr(args, "json", False) else text)


def _serve(args: argparse.Namespace, names: Sequence[str]) -> int:
    from cryomae.service.app import App, serve

    settings = _settings(args)
    _log_from_settings(args, settings)
    configure_threads(settings.threads)  # again: .env and the secrets folder may set it too
    code = serve(App(settings, names))
    # Everything is stopped and flushed; leave without the interpreter's teardown, in which native threads
    # (torch's pools) can abort the process and turn a clean stop into exit 134 for the supervisor.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _log_from_settings(args: argparse.Namespace, settings: Any) -> None:
    level = args.log_level or settings.log_level
    log_file = getattr(args, "log_file", None) or settings.log_file
    configure_logging(level, json=True if args.log_json else settings.log_json, file=log_file)
    if log_file is not None:
        print(f"logging to {Path(log_file).resolve()}", file=sys.stderr)


def cmd_service(args: argparse.Namespace) -> int:
    if _settings(args).broker.url.startswith("memory"):
        raise ConfigError(
            "a service on its own needs RabbitMQ: set CRYOMAE_BROKER__URL=amqp://user@host:5672/ (or --broker); "
            "`cryomae run` runs every service in one process with the in-memory broker"
        )
    return _serve(args, [args.name])


def cmd_run(args: argparse.Namespace) -> int:
    return _serve(args, args.services)


def cmd_demo(args: argparse.Namespace) -> int:
    from cryomae.operator.demo import DemoOptions, run_demo

    # the demo prints its own progress; the services' per-message log lines only with --log-level INFO, as text
    configure_logging(args.log_level or "WARNING", json=json_asked(args.log_json))
    opts = DemoOptions(
        out=args.out,
        source=args.source,
        count=args.count,
        interval_s=args.interval,
        exemplars_after=args.exemplars_after,
        broker=args.broker or "memory://",
        preset=args.preset,
        diameter=args.diameter,
        train_overrides=_set_pairs(args.set or []),
        stall_s=args.stall_limit,
    )
    report = run_demo(opts, progress=None if args.json else print)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0 if report["complete"] else 1


def cmd_project_create(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    overrides = _set_pairs(args.set or [])
    if args.preset:
        overrides["preset"] = args.preset
    out = ops.project_create(_settings(args), args.name, args.diameter, overrides, args.exist_ok)
    _print(args, out, f"project {out['project']} at {out['path']}")
    return 0


def cmd_project_list(args: argparse.Namespace) -> int:
    from cryomae.operator.actions import status_projects

    rows = status_projects(_settings(args))
    lines = [f"{r['project']}: diameter {r['diameter']}, current model {r['current_version'] or '-'}" for r in rows]
    _print(args, rows, "\n".join(lines) or "no projects")
    return 0


def _with_control(args: argparse.Namespace, action: Any) -> Any:
    from cryomae.operator.actions import open_control

    control = open_control(_settings(args))
    try:
        return action(control)
    finally:
        control.close()


def cmd_exemplars_add(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    settings = _settings(args)

    def act(control: Any) -> Any:
        return ops.exemplars_add(settings, control, args.project, args.micrograph, args.coords, args.diameter)

    out = act(None) if args.no_train else _with_control(args, act)
    counted = plural(out["exemplars"], "exemplar")
    lines = [f"exemplar set {out['exemplar_set']}: {counted}, diameter {out['diameter']} px"]
    lines += [f"warning: {w}" for w in out["warnings"]]
    if out["training"]:
        lines.append(f"training requested ({out['training']['delivery']}); follow it with `cryomae status`")
    for w in out["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    _print(args, out, "\n".join(lines))
    return 0


def cmd_exemplars_correct(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    settings = _settings(args)

    def act(control: Any) -> Any:
        return ops.exemplars_correct(settings, control, args.project, args.session, args.corrections)

    out = act(None) if args.no_train else _with_control(args, act)
    lines = [
        (
            f"exemplar set {out['exemplar_set']} (on {out['base']}): {plural(out['missed'], 'missed particle')} and "
            f"{plural(out['wrong'], 'wrong pick')} on {plural(out['micrographs'], 'micrograph')}; from this file "
            f"{out['added']} new, {out['replaced']} replaced, {out['already']} already applied"
        )
    ]
    if out["training"]:
        lines.append(
            f"training requested ({out['training']['delivery']}); once the new model is published, session "
            f"{out['session']} is re-picked with it; follow it with `cryomae status` and on the session page"
        )
    _print(args, out, "\n".join(lines))
    return 0


def cmd_session_start(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    settings = _settings(args)
    out = _with_control(
        args,
        lambda c: ops.session_start(
            settings, c, args.project, args.session, args.folder, args.pattern, not args.no_recursive
        ),
    )
    _print(args, out, f"watching {out['folder']} as {out['project']}/{out['session']} ({out['delivery']})")
    return 0


def cmd_session_stop(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    settings = _settings(args)
    out = _with_control(args, lambda c: ops.session_stop(settings, c, args.project, args.session))
    _print(args, out, f"stop watching {out['project']}/{out['session']} ({out['delivery']})")
    return 0


def cmd_session_rethreshold(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    settings = _settings(args)
    value = None if args.clear else args.threshold
    out = _with_control(args, lambda c: ops.session_rethreshold(settings, c, args.project, args.session, value))
    shown = "each micrograph's automatic cutoff" if value is None else f"score >= {value}"
    _print(args, out, f"{out['project']}/{out['session']}: threshold -> {shown} ({out['delivery']})")
    return 0


def cmd_session_repick(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    settings = _settings(args)
    out = _with_control(
        args, lambda c: ops.session_repick(settings, c, args.project, args.session, args.all, args.micrograph)
    )
    text = (
        f"{plural(out['micrographs'], 'micrograph')} of {out['project']}/{out['session']} to re-pick with model "
        f"{out['model_version']} ({out['delivery']})"
    )
    if out["missing"]:
        gone = plural(len(out["missing"]), "micrograph is", "micrographs are")
        text += f"\n{gone} no longer on disk: " + ", ".join(escaped(m) for m in out["missing"][:5])
    _print(args, out, text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    settings = _settings(args)
    out = _with_control(args, lambda c: ops.status(settings, c))
    _print(args, out, ops.format_status(out))
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from cryomae.operator import actions as ops

    if args.action == "list":
        out = _with_control(args, lambda c: ops.dlq_list(c, args.queue, args.limit))
        text = ops.format_dead_letters(out)
    elif args.action == "replay":
        out = _with_control(args, lambda c: ops.dlq_replay(c, args.queue, args.limit))
        done = "requested" if out["replayed"] is None else f"{plural(out['replayed'], 'message')} moved back"
        text = f"{out['queue']}: replay {done} {out['note']}".rstrip()
    else:
        if not args.yes:
            print(f"purging deletes the dead letters of {args.queue} for good; add --yes", file=sys.stderr)
            return 2
        out = _with_control(args, lambda c: ops.dlq_purge(c, args.queue))
        done = "requested" if out["purged"] is None else f"{plural(out['purged'], 'message')} deleted"
        text = f"{out['queue']}: purge {done} {out['note']}".rstrip()
    _print(args, out, text)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from cryomae.settings import reference_markdown

    print(reference_markdown(), end="")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from cryomae.operator.actions import config_show, dumps

    print(dumps(config_show(_settings(args))))
    return 0


def cmd_gallery_build(args: argparse.Namespace) -> int:
    from cryomae.operator.actions import gallery_build

    out = gallery_build(_settings(args), args.project, args.session)
    problems = "".join(f"\n  no picture: {escaped(u['problem'])}" for u in out["unreadable"])
    _print(args, out, f"{plural(out['micrographs'], 'micrograph')} drawn; open {out['page']}{problems}")
    return 0


def cmd_gallery_serve(args: argparse.Namespace) -> int:
    from cryomae.gallery.server import make_server, session_pages
    from cryomae.operator.actions import session_outputs_dir

    settings = _settings(args)
    if (args.project is None) != (args.session is None):
        raise InputError(None, "give both --project and --session, or neither (every session)")
    root = settings.outputs if args.project is None else session_outputs_dir(settings, args.project, args.session)
    server = make_server(root, args.host, args.port)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    base = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}"
    pages = session_pages(root)
    print(f"serving {root} read-only on {base}/ (Ctrl-C stops)", flush=True)
    for page in pages[:20]:
        print(f"  {base}/{page.relative_to(root).as_posix()}", flush=True)
    if not pages:
        made = "" if root.is_dir() else f" ({root} does not exist yet)"
        print(f"  no session page yet{made}: {base}/ lists each one as the writer writes it", flush=True)
    try:
        server.serve_forever()  # Ctrl-C: KeyboardInterrupt, which main() turns into exit 130 like every command
    finally:
        server.server_close()
    return 0


def _add_live_parsers(sub: Any) -> None:
    from cryomae.messaging.topology import SERVICES

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("settings (override CRYOMAE_* environment variables)")
    g.add_argument("--broker", metavar="URL", help="memory:// (one process) or amqp://user@host:5672/vhost")
    g.add_argument("--store", type=Path, help="project and model store folder")
    g.add_argument("--outputs", type=Path, help="folder of the per-session STAR outputs")
    g.add_argument("--state", type=Path, help="service state folder (watcher ledger, inbox); local disk")
    g.add_argument(
        "--data-root", type=Path, action="append", metavar="FOLDER", help="folder micrographs may come from (repeat)"
    )
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print JSON for scripts")
    project = argparse.ArgumentParser(add_help=False)
    project.add_argument("--project", required=True, help="the project (`cryomae project create`)")
    session = argparse.ArgumentParser(add_help=False, parents=[project])
    session.add_argument("--session", required=True, help="the session's name (as given to `session start`)")

    enc = sub.add_parser(
        "encoder",
        help="pre-train the facility encoder every project can start from",
        description="A facility encoder is the MAE pre-trained on many micrographs of any samples (an archive); "
        "projects trained with --encoder (or CRYOMAE_TRAIN__ENCODER) start from it.",
    ).add_subparsers(dest="action", required=True)
    epre = enc.add_parser(
        "pretrain",
        parents=[common],
        help="pre-train a facility encoder (resumable)",
        description="Masked reconstruction on random regions of the micrographs, at particle sizes drawn from "
        "--min-diameter to --max-diameter pixels. After every epoch its state is saved beside the output; run "
        "the same command again after an interruption to go on. Writes weights.safetensors and a manifest "
        "sealed by a checksum.",
    )
    epre.add_argument("micrographs", type=Path, nargs="+", metavar="MICROGRAPH", help="micrographs or folders of them")
    epre.add_argument(
        "--out", type=Path, help="encoder directory to write (default: STORE/encoders/NAME/vNNNN, the next version)"
    )
    epre.add_argument("--name", default="facility", help="encoder name in the store (default facility)")
    epre.add_argument("--preset", choices=list(PRESETS), help="model preset (default fast; projects must match)")
    epre.add_argument("--epochs", type=int, help="passes over the micrographs (default 20)")
    epre.add_argument("--min-diameter", type=float, help="smallest particle diameter drawn, pixels (default 24)")
    epre.add_argument("--max-diameter", type=float, help="largest particle diameter drawn, pixels (default 160)")
    epre.add_argument("--seed", type=int, help="random seed (default 0)")
    epre.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    epre.add_argument("--set", action="append", metavar="KEY=VALUE", help="any EncoderConfig field (repeatable)")
    epre.set_defaults(func=cmd_encoder_pretrain)
    elist = enc.add_parser("list", parents=[common, js], help="the facility encoders in the store")
    elist.set_defaults(func=cmd_encoder_list)

    process = argparse.ArgumentParser(add_help=False)  # what a long-running process takes besides the settings
    process.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="write the log to FILE (appended, rotated at 50 MB, 5 kept) instead of the terminal (or CRYOMAE_LOG_FILE)",
    )
    process.add_argument("--device", help="auto (default), cpu, cuda or cuda:N (or CRYOMAE_DEVICE)")
    s = sub.add_parser(
        "service",
        parents=[common, process],
        help="run one live service (needs RabbitMQ)",
        description="Run one service until SIGTERM/SIGINT; exits 1 when it fails for good (its supervisor "
        "restarts it), 3 when the broker stays unreachable at start-up.",
    )
    s.add_argument("name", choices=SERVICES)
    s.set_defaults(func=cmd_service)

    r = sub.add_parser(
        "run",
        parents=[common, process],
        help="run watcher, picker, writer and trainer in one process (in-memory broker by default)",
        description="The single-workstation mode. Operator commands (`cryomae session start`, `exemplars add`, "
        "`status`, ...) reach it through the state folder when the broker is memory://.",
    )
    r.add_argument("--services", nargs="+", choices=SERVICES, default=list(SERVICES), help="subset to run")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser(
        "demo",
        parents=[js],
        help="play a collection session into a watched folder and pick it live",
        description="Writes micrographs into a watched session folder at a steady rate, registers 15 exemplars "
        "from the first one, picks everything live and reports throughput, latency and F1 against the truth.",
    )
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder (replaced)")
    d.add_argument(
        "--source",
        default="auto",
        help="auto (../shared/data/empiar10017/bin4 when present, else synthetic), synthetic, or a dataset "
        "folder with micrographs/ and coords/",
    )
    d.add_argument("--count", type=int, default=20, help="micrographs to play (default 20)")
    d.add_argument("--interval", type=float, default=8.0, help="seconds between micrographs (default 8)")
    d.add_argument(
        "--exemplars-after", type=int, default=3, help="micrographs written before the exemplars are registered"
    )
    d.add_argument("--broker", metavar="URL", help="memory:// (default) or amqp://user:password@host:5672/")
    d.add_argument("--preset", choices=list(PRESETS), default="fast", help="model preset (default fast)")
    d.add_argument("--diameter", type=float, help="particle diameter in px (a --source folder without dataset.json)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="training hyperparameter override (repeat)")
    d.add_argument(
        "--stall-limit",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="give up when nothing (a micrograph written, a training step, a pick) has happened for this long "
        "(default 900); there is no limit while the session progresses",
    )
    d.set_defaults(func=cmd_demo)

    p = sub.add_parser("project", help="create and list projects").add_subparsers(dest="action", required=True)
    pc = p.add_parser("create", parents=[common, js], help="create a project")
    pc.add_argument("name")
    pc.add_argument("--diameter", type=float, help="default particle diameter in pixels")
    pc.add_argument("--preset", choices=list(PRESETS), help="model preset for its training")
    pc.add_argument("--set", action="append", metavar="KEY=VALUE", help="training hyperparameter override")
    pc.add_argument("--exist-ok", action="store_true", help="succeed if it exists (its settings are kept)")
    pc.set_defaults(func=cmd_project_create)
    pl = p.add_parser("list", parents=[common, js], help="list projects")
    pl.set_defaults(func=cmd_project_list)

    e = sub.add_parser("exemplars", help="register exemplars and train").add_subparsers(dest="action", required=True)
    ea = e.add_parser(
        "add",
        parents=[common, js, project],
        help="validate and store exemplars marked on one micrograph, and request training",
        description="Checks that the micrograph lies under a data root (CRYOMAE_DATA_ROOTS, symlinks resolved) "
        "and reads, that there is at least one exemplar and every one lies inside the image (warns below 5), "
        "stores the set in the project and asks the trainer for a model.",
    )
    ea.add_argument("--micrograph", type=Path, required=True, help="the micrograph the particles were marked on")
    ea.add_argument("--coords", type=Path, required=True, help="centres: RELION .star, EMAN .box or .csv")
    ea.add_argument("--diameter", type=float, help="particle diameter in pixels (default: the project's)")
    ea.add_argument("--no-train", action="store_true", help="store the set without requesting training")
    ea.set_defaults(func=cmd_exemplars_add)
    ec = e.add_parser(
        "correct",
        parents=[common, js, project],
        help="add an operator's corrections from the session page, train, and re-pick the session",
        description="Reads the session page's corrections.star (missed particles and wrong picks marked on the "
        "session's micrographs), checks that every micrograph is one the session picked and lies under a data "
        "root, that every mark lies inside its micrograph and that no two marks of the file mark one particle, "
        "stores them with the current model's exemplars as a new exemplar set, and asks the trainer for a model; "
        "once it is published the session's micrographs are picked again with it.",
    )
    ec.add_argument("--session", required=True, help="the session the corrections were marked on")
    ec.add_argument(
        "--from", dest="corrections", type=Path, required=True, help="the page's corrections.star", metavar="FILE"
    )
    ec.add_argument("--no-train", action="store_true", help="store the corrections without requesting training")
    ec.set_defaults(func=cmd_exemplars_correct)

    ga = sub.add_parser(
        "gallery",
        help="the session pages: serve them read-only, or draw one again",
        description="The writer keeps OUTPUTS/<project>/<session>/gallery/index.html beside the STAR files: "
        "every micrograph with its picks, a cutoff slider, the session's summary. It opens from disk as it is.",
    ).add_subparsers(dest="action", required=True)
    gs = ga.add_parser(
        "serve",
        parents=[common],
        help="serve the session pages read-only over HTTP (127.0.0.1 by default)",
        description="Serves the outputs folder (or one session's folder) read-only: GET and HEAD of files inside "
        "it, no folder listings, no hidden files; / links every session page; /healthz answers ok.",
    )
    gs.add_argument("--project", help="serve only this project's session (with --session)")
    gs.add_argument("--session", help="serve only this session's folder (with --project)")
    gs.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    gs.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    gs.set_defaults(func=cmd_gallery_serve)
    gb = ga.add_parser(
        "build",
        parents=[common, js, session],
        help="draw a session's gallery again from its outputs (reads the micrographs)",
    )
    gb.set_defaults(func=cmd_gallery_build)

    se = sub.add_parser("session", help="watch, stop, re-threshold and re-pick sessions").add_subparsers(
        dest="action", required=True
    )
    ss = se.add_parser("start", parents=[common, js, session], help="start watching a session folder")
    ss.add_argument("--folder", type=Path, required=True, help="the session folder (under a data root)")
    ss.add_argument("--pattern", default="*.mrc", help="glob of micrograph names (default *.mrc)")
    ss.add_argument("--no-recursive", action="store_true", help="only the folder itself, not its sub-folders")
    ss.set_defaults(func=cmd_session_start)
    st = se.add_parser("stop", parents=[common, js, session], help="stop watching a session")
    st.set_defaults(func=cmd_session_stop)
    sr = se.add_parser(
        "rethreshold", parents=[common, js, session], help="change a session's cutoff without re-picking"
    )
    cut = sr.add_mutually_exclusive_group(required=True)
    cut.add_argument("--threshold", type=_session_threshold, help="keep the candidates scoring at least this")
    cut.add_argument(
        "--clear", action="store_true", help="clear the session's cutoff: each micrograph's own automatic cutoff again"
    )
    sr.set_defaults(func=cmd_session_rethreshold)
    sp = se.add_parser("repick", parents=[common, js, session], help="re-pick a session with the current model")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every micrograph, not only those of older models")
    which.add_argument(
        "--micrograph",
        action="append",
        default=[],
        metavar="PATH",
        help="this picked micrograph (repeat the option), whatever its model: e.g. one replaced on disk since",
    )
    sp.set_defaults(func=cmd_session_repick)

    stt = sub.add_parser("status", parents=[common, js], help="queues, models and per-session counts")
    stt.set_defaults(func=cmd_status)

    q = sub.add_parser(
        "dlq",
        parents=[common, js],
        help="list, replay or purge dead-lettered messages",
        description="Messages that failed (with the reason) wait in a dead-letter queue per work queue.",
    )
    q.add_argument("action", choices=["list", "replay", "purge"])
    q.add_argument("--queue", default="micrographs", help="micrographs (default), picks, training or watcher")
    q.add_argument("--limit", type=int, default=None, help="at most this many (list: default 100)")
    q.add_argument("--yes", action="store_true", help="confirm a purge")
    q.set_defaults(func=cmd_dlq)

    c = sub.add_parser("config", help="show the settings in force, or all of them").add_subparsers(
        dest="action", required=True
    )
    cs = c.add_parser("show", parents=[common], help="the settings, secrets hidden, as JSON")
    cs.set_defaults(func=cmd_config_show)
    cr = c.add_parser("reference", help="every setting with its default and meaning, as a Markdown table")
    cr.set_defaults(func=cmd_config_reference)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryomae",
        description="Few-shot cryo-EM particle picking (CryoMAE): offline training, picking, evaluation and "
        "previews; the live services (service, run, demo); and the operator's commands (project, exemplars, "
        "session, status, dlq, config).",
    )
    p.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING or ERROR (default: `service` and `run` INFO or CRYOMAE_LOG_LEVEL; `train`, `pick`, "
        "`example` and `encoder pretrain` INFO; every other command WARNING)",
    )
    p.add_argument(
        "--log-json",
        action="store_true",
        help="log JSON lines, also on a terminal (default: `service` and `run` off a terminal, or CRYOMAE_LOG_JSON; "
        "every other command only with this flag or CRYOMAE_LOG_JSON=true)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model from exemplars marked on one reference micrograph",
        description="Pre-train the MAE on regions of the reference micrograph (and any "
        "--unlabeled ones), train it with the self-cross similarity loss on the exemplars, and "
        "write a model directory (safetensors weights, manifest with checksum, exemplar bank).",
    )
    t.add_argument("reference", type=Path, help="reference micrograph (MRC, JPEG, PNG or TIFF)")
    t.add_argument(
        "--coords",
        type=Path,
        required=True,
        help="exemplar centres: RELION .star, EMAN .box or .csv (x = column, y = row)",
    )
    t.add_argument("--diameter", type=float, required=True, help="particle diameter in pixels of the micrograph")
    t.add_argument("--out", type=Path, required=True, help="model directory to write (replaced atomically)")
    t.add_argument("--preset", choices=list(PRESETS), help="model preset (default: fast)")
    t.add_argument(
        "--unlabeled",
        type=Path,
        nargs="*",
        metavar="MICROGRAPH",
        help="extra micrographs of the same sample for pre-training regions",
    )
    t.add_argument("--box-factor", type=float, help="region side / particle diameter (default 1.0)")
    t.add_argument("--epochs", type=int, help="SCS training epochs over the unlabeled regions")
    t.add_argument("--pretrain-epochs", type=int, help="pre-training epochs")
    t.add_argument("--seed", type=int, help="random seed (training is deterministic for a seed)")
    t.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    t.add_argument(
        "--encoder",
        help="start from this facility encoder (`cryomae encoder pretrain`): its directory, or a folder of "
        "versions (the newest is used); default random weights, or CRYOMAE_TRAIN__ENCODER",
    )
    t.add_argument("--config", type=Path, help="JSON file of training hyperparameters")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any hyperparameter, e.g. --set beta=2 --set pi_hat=0.2 (repeatable)",
    )
    t.set_defaults(func=cmd_train)

    k = sub.add_parser(
        "pick",
        help="pick particles on micrographs with a trained model",
        description="Writes OUT/<stem>_autopick.star per micrograph (RELION), OUT/autopick.star "
        "(data_coordinate_files index), OUT/particles.star (every pick of the run), "
        "OUT/candidates/<stem>_candidates.star (every scored candidate, for re-thresholding) "
        "and OUT/pick_run.json (model, thresholds, timings).",
    )
    k.add_argument(
        "micrographs",
        type=Path,
        nargs="+",
        metavar="MICROGRAPH",
        help="micrographs to pick (MRC, JPEG, PNG or TIFF); their name stems must differ",
    )
    k.add_argument("--model", type=Path, required=True, help="model directory written by `cryomae train`")
    k.add_argument("--out", type=Path, required=True, help="output directory")
    k.add_argument("--stride-fraction", type=float, help="window stride / window side (default 1/8)")
    k.add_argument(
        "--threshold",
        type=_threshold,
        help="auto (default: gmm where this micrograph's candidate scores are clearly bimodal, else robust), "
        "gmm (where a two-Gaussian mixture fitted to the candidate scores says 'particle'), robust (median "
        "plus 1.5 robust standard deviations), otsu (Otsu's cut), knn (the paper's k-nearest-neighbour rule, "
        "k = 5), or a fixed score",
    )
    k.add_argument(
        "--score",
        choices=["max", "mean", "mean_max"],
        help="mean (default), max, or mean_max (a blend) of the cosine similarities to the exemplar bank",
    )
    k.add_argument(
        "--no-nms", action="store_true", help="keep every window above the cutoff (the paper's behaviour; duplicates)"
    )
    k.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    k.add_argument("--batch-size", type=int, help="windows per encoder batch (default 2048)")
    k.add_argument("--json", action="store_true", help="print the run summary as JSON")
    k.set_defaults(func=cmd_pick)

    e = sub.add_parser(
        "evaluate",
        help="score picks against ground truth (CryoMAE paper rule)",
        description="Precision, recall and F1 with square boxes of side = diameter and a "
        "one-to-one match at IoU >= 0.5, per micrograph and pooled; average precision over the "
        "score ranking (over OUT/candidates when present, else over the picks).",
    )
    e.add_argument("--picks", type=Path, required=True, help="output directory of `cryomae pick`")
    e.add_argument("--truth", type=Path, required=True, help="directory of <stem>.star ground-truth files")
    e.add_argument("--diameter", type=float, required=True, help="particle diameter in pixels")
    e.add_argument("--iou", type=float, default=0.5, help="IoU needed for a true positive (default 0.5)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_evaluate)

    v = sub.add_parser(
        "preview",
        help="draw picks (and ground truth) on a low-pass filtered micrograph",
        description="Circles of the particle diameter: picks yellow, candidates just below the cutoff sky blue (for "
        "the picks of `cryomae pick`, read from its candidates/ folder), ground truth bluish green; a legend counts "
        "each. The same pictures as the session gallery.",
    )
    v.add_argument("micrograph", type=Path, help="the micrograph to draw on")
    v.add_argument("--picks", type=Path, required=True, help="coordinate file (.star, .box or .csv)")
    v.add_argument("--truth", type=Path, help="ground-truth coordinate file")
    v.add_argument("--out", type=Path, required=True, help="picture to write: PNG, or JPEG for .jpg")
    v.add_argument("--size", type=int, default=1024, help="longer side of the picture in pixels (default 1024)")
    v.add_argument("--no-legend", action="store_true", help="leave out the key of colours and counts")
    v.add_argument(
        "--diameter", type=float, help="particle diameter in pixels (default: read from pick_run.json beside the picks)"
    )
    v.set_defaults(func=cmd_preview)

    x = sub.add_parser(
        "example",
        help="the built-in example: synthetic data -> train -> pick -> evaluate",
        description="Makes small synthetic micrographs with known centres, trains on 15 "
        "exemplars of the first, picks the others, evaluates and draws a preview.",
    )
    x.add_argument("--out", type=Path, default=Path("runs/example"), help="output directory")
    x.add_argument("--preset", choices=list(PRESETS), default="fast", help="model preset (default fast)")
    x.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of training (default 0)")
    x.set_defaults(func=cmd_example)
    _add_live_parsers(sub)
    return p


# Long-running processes: JSON lines off a terminal by default (for a log collector), configured again from the
# settings once they are read (``_log_from_settings``).
_PROCESSES = frozenset({"service", "run"})
# One-shot commands that do long work and report its progress in the log (training steps, each micrograph picked).
_PROGRESS_IN_THE_LOG = frozenset({"train", "pick", "example", "encoder pretrain"})


def _configure_command_logging(args: argparse.Namespace) -> None:
    """A service logs JSON lines when its stderr is not a terminal. Every other command prints its own output for a
    person or a script: its log lines are readable text, never JSON unless asked for (``--log-json`` or
    ``CRYOMAE_LOG_JSON``), and only warnings and errors unless the command's progress is in the log (``train``,
    ``pick``) or ``--log-level`` says otherwise; so ``cryomae status --json 2>&1`` is the status and nothing else."""
    if args.command in _PROCESSES:
        configure_logging(args.log_level or "INFO", json=True if args.log_json else None)
        return
    name = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    default = "INFO" if args.command in _PROGRESS_IN_THE_LOG or name in _PROGRESS_IN_THE_LOG else "WARNING"
    configure_logging(args.log_level or default, json=json_asked(args.log_json))


def main(argv: Sequence[str] | None = None) -> int:
    # `kill -USR1 PID` writes every thread's stack to stderr: what a stuck process is waiting for
    if sys.__stderr__ is not None:  # the process's own stderr, also while a caller captures sys.stderr
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True, chain=False)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_command_logging(args)
    try:  # before anything loads torch: its pools read their size and wait policy once, when they load
        configure_threads()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        # one line, not a traceback; leave without the interpreter's teardown, in which torch's native
        # threads can abort the process (exit 134) after an interrupt
        print("\ninterrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except TransientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CryomaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # pydantic validation of options and configs
        print(f"error: {e}", file=sys.stderr)
        return 2


def _service_entry(name: str) -> Any:
    def entry() -> int:
        return main(["service", name, *sys.argv[1:]])

    entry.__name__ = f"service_{name}"
    entry.__doc__ = f"The ``cryomae-{name}`` console script: ``cryomae service {name}``."
    return entry


service_picker = _service_entry("picker")
service_writer = _service_entry("writer")
service_trainer = _service_entry("trainer")
service_watcher = _service_entry("watcher")


if __name__ == "__main__":
    sys.exit(main())
