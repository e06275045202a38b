"""An operator's marks are final on the micrographs they were made on (issue 26).

A model trained on an operator's corrections (``cryomae exemplars correct``) keeps the marks in its manifest,
by micrograph. When that model picks one of those micrographs again (the re-pick after training), what the
operator said there holds whatever the model scores:

- a candidate within half a particle diameter of a pick marked **wrong** is dropped, so no cutoff, the automatic
  one or one moved on the session page, brings it back;
- a particle marked **missed** becomes a candidate at the marked centre, scored as the micrograph's best
  candidate (and never below its cutoff), so it is picked at any cutoff that picks anything; candidates within
  half a diameter of it are the same particle and give way to it.

A pick a little off a particle is corrected by marking it wrong and marking the centre as missed: the wrong
mark drops the pick, the missed mark puts the centre back. Elsewhere the model's picks are as it scores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryomae.picking.picker import PickResult

__all__ = [
    "MARKS_KEY",
    "MicrographMarks",
    "honour_marks",
    "marks_by_micrograph",
    "marks_for_manifest",
    "marks_from_manifest",
    "marks_on",
]

MARKS_KEY = "operator_marks"  # in a model's manifest: micrograph path -> {"missed": [[x, y], ...], "wrong": [...]}
SAME_PARTICLE = 0.5  # in diameters: a candidate this near a mark is the marked pick or particle


@dataclass(frozen=True)
class MicrographMarks:
    """The centres (original pixels, x = column) an operator marked on one micrograph."""

    missed: np.ndarray  # [P, 2]
    wrong: np.ndarray  # [N, 2]


def marks_for_manifest(marks: Mapping[str, MicrographMarks]) -> dict[str, dict[str, list[list[float]]]]:
    """The manifest's record of the marks (JSON, centres to 0.01 pixel)."""
    return {
        path: {
            kind: [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(xy).reshape(-1, 2)]
            for kind, xy in (("missed", m.missed), ("wrong", m.wrong))
        }
        for path, m in sorted(marks.items())
    }


def marks_on(manifest: Mapping[str, Any], micrograph: str) -> MicrographMarks | None:
    """The marks a model's manifest keeps for one micrograph (its resolved path), None where it has none: the
    picker reads only the micrograph it picks, not every corrected one."""
    entry = (manifest.get(MARKS_KEY) or {}).get(micrograph)
    if entry is None:
        return None
    return MicrographMarks(
        missed=np.asarray(entry.get("missed", []), dtype=np.float64).reshape(-1, 2),
        wrong=np.asarray(entry.get("wrong", []), dtype=np.float64).reshape(-1, 2),
    )


def marks_from_manifest(manifest: Mapping[str, Any]) -> dict[str, MicrographMarks]:
    """The marks a model's manifest keeps, by micrograph path (none for a model trained without corrections)."""
    return {path: m for path in (manifest.get(MARKS_KEY) or {}) if (m := marks_on(manifest, path)) is not None}


def _near(xy: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    """Which of xy [C, 2] lie within ``radius`` of any of centres [K, 2]."""
    if not len(xy) or not len(centres):
        return np.zeros(len(xy), dtype=bool)
    gaps = np.linalg.norm(xy[:, None, :] - centres[None, :, :], axis=2)
    return np.asarray(gaps.min(axis=1) <= radius)


def honour_marks(
    result: PickResult, marks: MicrographMarks | None, diameter: float
) -> tuple[PickResult, dict[str, int]]:
    """``result`` with the operator's marks on its micrograph applied (see the module's docstring), and how many
    candidates the wrong marks dropped and how many missed particles were added."""
    if marks is None or not (len(marks.missed) or len(marks.wrong)):
        return result, {"dropped": 0, "added": 0}
    xy, scores = result.candidates_xy.reshape(-1, 2), result.candidate_scores
    radius = SAME_PARTICLE * diameter
    wrong = _near(xy, marks.wrong, radius)
    keep = ~wrong & ~_near(xy, marks.missed, radius)
    finite = scores[keep][np.isfinite(scores[keep])]  # the best of the candidates that stay
    top = float(finite.max()) if len(finite) else 0.0
    if np.isfinite(result.threshold):
        top = max(top, float(result.threshold))
    added = np.asarray(marks.missed, dtype=np.float64).reshape(-1, 2)
    out = dataclasses.replace(
        result,
        candidates_xy=np.concatenate([added, xy[keep]]),  # still in descending score: the added score as the best
        candidate_scores=np.concatenate([np.full(len(added), top, dtype=scores.dtype), scores[keep]]),
        threshold=result.threshold if np.isfinite(result.threshold) or not len(added) else top,
    )
    return out, {"dropped": int(wrong.sum()), "added": len(added)}


def marks_by_micrograph(
    paths: Sequence[str | None], missed: Sequence[np.ndarray], wrong: Sequence[np.ndarray]
) -> dict[str, MicrographMarks]:
    """Marks of several micrographs, merged by path (marks without a path are left out)."""
    out: dict[str, list[list[np.ndarray]]] = {}
    for path, p, n in zip(paths, missed, wrong, strict=True):
        if path is None:
            continue
        entry = out.setdefault(path, [[], []])
        entry[0].append(np.asarray(p, dtype=np.float64).reshape(-1, 2))
        entry[1].append(np.asarray(n, dtype=np.float64).reshape(-1, 2))
    return {path: MicrographMarks(np.concatenate(p), np.concatenate(n)) for path, (p, n) in out.items()}
