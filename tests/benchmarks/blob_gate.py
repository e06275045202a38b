"""Which models get the blob term: the gate on the exemplars' DoG profile, chosen leaving one sample out.

The blob term (``cryomae.picking.blobs``) is added or not per model, from the exemplars' DoG profile measured at
training, so a gate's F1 on every dataset and exemplar draw follows exactly from two measured variants: the term
on every model (``blob_min_share=0``) and the cosine alone (``blob_weight=0``). Both were measured per dataset
and draw by the ``study.py choose`` runs kept in docs/blob-term.json. This script measures each dataset's and
draw's exemplar profile on the reference (``blob_profile``, as training does: seconds), makes each gate's figures
from those two and chooses among them and the measured variants with ``loso.choose``, the measured ones listed
first (the session-16 default, gated on the exemplars' median, first of all).

    .venv/bin/python tests/benchmarks/blob_gate.py --json docs/blob-gate.json

Not collected by pytest (not named ``test_*.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tests.benchmarks.loso as loso
from cryomae.io.micrographs import read_micrograph
from cryomae.picking.blobs import blob_profile
from tests.benchmarks.accuracy import DEFAULT_DATA_ROOT, PROJECT_ROOT, discover_datasets, few_shot_split

MEASURED = PROJECT_ROOT / "docs" / "blob-term.json"
DRAWS = 5
SHARES = (0.5, 0.4, 0.3)  # the strictest first: a tie goes to it
WEIGHTS, CAPS = ("0.3", "0.6", "1.0"), ("null", "1.0")
SESSION_16 = "min_z=1 blob_weight=0.6 blob_z_cap=null"  # the default this gate replaces: the median at least 1


def profiles(data_root: Path, names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Each dataset's exemplar profile on its reference, one per draw (``default_rng(0..DRAWS-1)``)."""
    out = {}
    for ds in discover_datasets(data_root):
        if ds.name not in names:
            continue
        reference = read_micrograph(few_shot_split(ds, 1).reference).data
        out[ds.name] = [
            blob_profile(reference, split.exemplars_xy, split.diameter)
            for split in (few_shot_split(ds, 1, draw=k) for k in range(DRAWS))
        ]
    return out


def gated(
    measured: dict[str, dict[str, list[float]]], found: dict[str, list[dict[str, Any]]], share: float, w: str, cap: str
) -> dict[str, list[float]]:
    """The figures of the term at weight ``w`` and cap ``cap`` on the models whose exemplar share is at least
    ``share``, the cosine alone on the others."""
    on, off = measured[f"min_z=0 blob_weight={w} blob_z_cap={cap}"], measured["min_z=0 blob_weight=0 blob_z_cap=null"]
    return {
        ds: [on[ds][k] if found[ds][k]["exemplar_share"] >= share else off[ds][k] for k in range(DRAWS)] for ds in on
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    measured: dict[str, dict[str, list[float]]] = json.loads(MEASURED.read_text())["figures"]
    found = profiles(args.data_root.resolve(), sorted(measured[SESSION_16]))
    figures = {SESSION_16: measured[SESSION_16], **measured}
    for w in WEIGHTS:
        for cap in CAPS:
            for share in SHARES:
                figures[f"share={share} blob_weight={w} blob_z_cap={cap}"] = gated(measured, found, share, w, cap)
    choice = loso.choose(figures)
    print(loso.markdown(choice), end="")
    if args.json:
        doc = {
            "command": " ".join([".venv/bin/python tests/benchmarks/blob_gate.py", *(argv or sys.argv[1:])]),
            "measured_from": str(MEASURED.relative_to(PROJECT_ROOT)),
            "profiles": found,
            "figures": figures,
            "decision": choice.decision(),
            "loso_mean": choice.loso_mean,
            "in_sample_mean": choice.in_sample_mean,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
