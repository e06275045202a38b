"""Scoring picks against ground truth (the CryoMAE paper's IoU >= 0.5 one-to-one rule)."""

from cryomae.evaluation.metrics import (
    Evaluation,
    Score,
    average_precision,
    box_iou,
    evaluate,
    match_picks,
    score_micrograph,
)

__all__ = [
    "Evaluation",
    "Score",
    "average_precision",
    "box_iou",
    "evaluate",
    "match_picks",
    "score_micrograph",
]
