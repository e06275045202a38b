"""Does a facility encoder pay off? Leave-one-sample-out: pre-train on the other samples, test on the one left out.

For each of the 7 distinct development sets, a facility encoder is pre-trained (``cryomae.training.encoder``) on
every micrograph of the other 6 sets, and the held-out set's project is trained from it on its 15 exemplars as
usual. Beside it, at each feature layer: the untrained encoder (neither training stage) and the project trained
from scratch (the default). Each variant is a ``study.py`` cache, scored with the default picking rules; the
variants that ``ablations.py`` also measures reuse its caches. Writes docs/facility-encoder.md and .json.

    .venv/bin/python tests/benchmarks/encoder_study.py                      # about 90 minutes on 2 CPU cores
    .venv/bin/python tests/benchmarks/encoder_study.py --layers 0 --epochs 2  # a quick look

Deeper layers embed every window separately (no shared-token shortcut), so they are scored at stride window/4
to fit a CPU's time; compare them with each other, not with layer 0 at window/8. This file is not collected by
pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.config import EncoderConfig, PickConfig, TrainConfig
from cryomae.training.encoder import pretrain_encoder
from tests.benchmarks.ablations import DATASETS, VARIANTS, slug
from tests.benchmarks.accuracy import DEFAULT_DATA_ROOT, PROJECT_ROOT, discover_datasets, few_shot_split
from tests.benchmarks.study import DEFAULT_CACHE, load, prepare, table

DEEP_STRIDE = 0.25  # stride / window for the layers past the patch embedding (as in ablations.py)


def ablation_cache(root: Path, name: str) -> Path:
    """The cache ``ablations.py`` keeps for its variant ``name`` (its default variant has its own folder)."""
    if name == VARIANTS[0].name:
        return root / "ablation-default"
    assert any(v.name == name for v in VARIANTS), name
    return root / f"ablation-{slug(name)}"


def archive(data_root: Path, held_out: str) -> list[Path]:
    """Every micrograph of the development sets but the held-out one (the facility's archive)."""
    files = []
    for ds in discover_datasets(data_root):
        if ds.name in DATASETS and ds.name != held_out:
            split = few_shot_split(ds, None)
            files += [split.reference, *split.queries]
    return files


def encoders(data_root: Path, root: Path, cfg: EncoderConfig) -> dict[str, Path]:
    """One facility encoder per held-out set (pre-trained unless cached): held-out name -> encoder directory."""
    out = {}
    for name in DATASETS:
        tag = f"epochs{cfg.epochs}" if cfg.preset == "fast" else f"{cfg.preset}-epochs{cfg.epochs}"
        path = root / "facility-encoders" / tag / name.replace("/", "__")
        if not (path / "manifest.json").is_file():
            t0 = time.perf_counter()
            pretrain_encoder(archive(data_root, name), path, cfg)
            print(f"encoder without {name}: pre-trained in {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = path
    return out


def variants(layers: Sequence[int], epochs: int) -> list[tuple[str, int, str, dict[str, Any]]]:
    """(label, layer, start, training overrides); start is untrained, scratch or facility."""
    rows = []
    for layer in layers:
        deep = {} if layer == 0 else {"feature_layer": layer}
        rows += [
            ("untrained encoder", layer, "untrained", {"pretrain_epochs": 0, "epochs": 0, **deep}),
            ("trained from scratch (the default)", layer, "scratch", deep),
            (f"trained from the facility encoder ({epochs} epochs)", layer, "facility", deep),
            (
                f"facility encoder + SCS only (no project pre-training, {epochs} epochs)",
                layer,
                "facility",
                {"pretrain_epochs": 0, **deep},
            ),
        ]
    return rows


def cache_for(
    root: Path, label: str, layer: int, start: str, train: dict[str, Any], epochs: int, preset: str = "fast"
) -> Path:
    if preset != "fast":  # nothing to share with ablations.py, which measures the fast preset
        return root / f"encoder-{preset}-{start}-layer{layer}-{slug(label)}-e{epochs}"
    if start == "untrained" and layer == 0:
        return ablation_cache(root, "untrained encoder (neither stage)")
    if start == "scratch" and layer == 0:
        return ablation_cache(root, VARIANTS[0].name)
    if start == "scratch" and layer in (1, 2, -1):
        names = {
            1: "feature after transformer block 1",
            2: "feature after block 2",
            -1: "feature after the last block, normed",
        }
        return ablation_cache(root, f"{names[layer]} (stride window/4)")
    return root / f"encoder-{start}-layer{layer}-{slug(label)}-e{epochs}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--layers", default="0,1,-1", help="feature layers (comma list; 0 = patch embedding)")
    p.add_argument("--epochs", type=int, default=8, help="facility encoder epochs")
    p.add_argument("--preset", default="fast", help="model preset of the encoders and the projects (default fast)")
    p.add_argument("--regions", type=int, default=128, help="regions per micrograph and size per epoch")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "facility-encoder.md")
    p.add_argument(
        "--no-scs-only", action="store_true", help="skip the facility encoder + SCS only variant (saves time)"
    )
    p.add_argument("--json-in", type=Path, default=None, help="keep the rows of an earlier run from here")
    args = p.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    enc_cfg = EncoderConfig(preset=args.preset, epochs=args.epochs, regions_per_micrograph=args.regions)
    t0 = time.perf_counter()
    enc = encoders(args.data_root, args.cache, enc_cfg)
    pretrain_s = time.perf_counter() - t0
    earlier = json.loads(args.json_in.read_text()) if args.json_in and args.json_in.is_file() else {}
    rows = earlier.get("rows", [])
    pretrain_s = max(pretrain_s, earlier.get("pretrain_seconds", 0.0))  # cached encoders: the first run's time
    everything = variants(sorted({*layers, *(r["layer"] for r in rows)}, key=lambda x: (x < 0, x)), args.epochs)
    # the facility variants first: the others may reuse caches that ablations.py is still writing
    plan = sorted(variants(layers, args.epochs), key=lambda v: v[2] != "facility")
    if args.no_scs_only:
        plan = [v for v in plan if "SCS only" not in v[0]]
    for label, layer, start, train in plan:
        cache = cache_for(args.cache, label, layer, start, train, args.epochs, args.preset)
        pick = PickConfig(**({} if layer == 0 else {"stride_fraction": DEEP_STRIDE}))
        print(f"== layer {layer}: {label} ({cache.name})", flush=True)
        for name in DATASETS:  # one training configuration per held-out set (its own encoder)
            encoder = {"encoder": str(enc[name])} if start == "facility" else {}
            cfg = TrainConfig(**train, preset=args.preset, **encoder)
            prepare(args.data_root, cache, [name], cfg, pick)
        result = table(load(args.data_root, cache, DATASETS), pick, quiet=True)
        m = result["mean"]
        print(f"   F1 {m['f1']:.3f} AP {m['ap']:.3f} best global F1 {m['oracle']:.3f}", flush=True)
        rows.append({"label": label, "layer": layer, "start": start, "cache": str(cache), **result})
        rows = [r for r in rows if (r["label"], r["layer"]) != (label, layer)] + [rows[-1]]
        rows.sort(key=lambda r: [v[:2] for v in everything].index((r["label"], r["layer"])))
        command = " ".join([".venv/bin/python tests/benchmarks/encoder_study.py", *(argv or sys.argv[1:])])
        args.out.write_text(markdown(rows, command, enc_cfg, pretrain_s))
        args.out.with_suffix(".json").write_text(
            json.dumps({"encoder": enc_cfg.model_dump(), "pretrain_seconds": pretrain_s, "rows": rows}, indent=1)
        )
    return 0


def markdown(rows: list[dict[str, Any]], command: str, cfg: EncoderConfig, pretrain_s: float) -> str:
    names = [n.split("/")[-1] for n in DATASETS]
    lines = [
        "# Facility encoder: leave one sample out",
        "",
        f"Command: `{command}`. For each of the 7 distinct development sets, a facility encoder (`{cfg.preset}`",
        "preset) is pre-trained on every micrograph of the other 6 sets (about 60 micrographs; "
        f"{cfg.epochs} epochs, {cfg.scales_per_micrograph} particle sizes per micrograph drawn from "
        f"{cfg.min_diameter:g}-{cfg.max_diameter:g} px, {cfg.regions_per_micrograph} regions each; the 7 took "
        f"{pretrain_s / 60:.0f} min in all here), and the held-out set's project is trained from it. F1 at the",
        "automatic cutoff, AP over all candidates and the best global-cutoff F1, means over the 7 sets. Layer 0 is",
        "the patch embedding, scored at stride window/8; deeper layers at window/4 (compare them with each other).",
        "",
        "| layer | variant | F1 | AP | best global F1 | " + " | ".join(f"F1 {n}" for n in names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        m = r["mean"]
        per = " | ".join(f"{r['rows'][d]['f1']:.3f}" for d in DATASETS)
        layer = {0: "0 (patch embedding)", -1: "last block, normed"}.get(r["layer"], f"block {r['layer']}")
        lines.append(f"| {layer} | {r['label']} | {m['f1']:.3f} | {m['ap']:.3f} | {m['oracle']:.3f} | {per} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
