"""The ``cryomae`` command: offline training, picking, evaluation, previews and a built-in example.

Each sub-command is a thin layer: parse options, call the library, print for people (or JSON for scripts).
Exit codes: 0 success, 1 an input or model problem (the message names the file), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from cryomae.config import PickConfig, TrainConfig
from cryomae.errors import CryomaeError
from cryomae.logging import configure_logging
from cryomae.model.presets import PRESETS

log = structlog.get_logger("cryomae.cli")


def _threshold(value: str) -> str | float:
    if value in ("auto", "gmm", "robust", "knn", "otsu"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, gmm, robust, otsu, knn or a number, got {value!r}") from None


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
    for name in ("preset", "box_factor", "epochs", "pretrain_epochs", "seed", "device"):
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
    from cryomae.workflows import train_from_files

    cfg = _train_config(args)
    out = train_from_files(args.reference, args.coords, args.diameter, args.out, cfg, args.unlabeled or [])
    print(f"model written to {out}")
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    from cryomae.workflows import pick_files

    summary = pick_files(args.model, args.micrographs, args.out, _pick_config(args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for row in summary["micrographs"]:
            print(
                f"{row['micrograph']}: {row['picks']} picks (threshold {row['threshold']:.4f}, {row['seconds']:.2f} s)"
            )
        print(f"{summary['total_picks']} picks on {len(summary['micrographs'])} micrographs -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cryomae.workflows import evaluate_dirs

    ev = evaluate_dirs(args.picks, args.truth, args.diameter, args.iou)
    print(json.dumps(ev.to_dict(), indent=2) if args.json else ev.format_table())
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from cryomae.workflows import preview_file

    out = preview_file(args.micrograph, args.picks, args.out, args.truth, args.diameter)
    print(f"preview written to {out}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from cryomae.workflows import run_example

    result = run_example(Path(args.out), preset=args.preset, seed=args.seed)
    print(result["table"])
    print(f"\nexample written to {args.out}: data/, model/, picks/, preview.png, evaluation.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cryomae", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines even on a terminal")
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
        "--score", choices=["max", "mean"], help="mean (default) or max cosine similarity over the exemplar bank"
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
        description="Picks are yellow circles of the particle diameter, ground truth green.",
    )
    v.add_argument("micrograph", type=Path, help="the micrograph to draw on")
    v.add_argument("--picks", type=Path, required=True, help="coordinate file (.star, .box or .csv)")
    v.add_argument("--truth", type=Path, help="ground-truth coordinate file")
    v.add_argument("--out", type=Path, required=True, help="PNG to write")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=True if args.log_json else None)
    try:
        return int(args.func(args))
    except CryomaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # pydantic validation of options and configs
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
