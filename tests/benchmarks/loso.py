"""Choosing a default leaving one sample out: the in-sample and the held-out figure side by side (issue 24).

A free choice (a rule, a parameter, a combination of them) is a list of *variants*, each with an F1 at the
automatic cutoff on every development dataset, and possibly for several exemplar draws. Choosing the variant
with the best mean on the same data that reports it flatters it; here each *sample* is held out in turn, the
variant is chosen on the other samples only, and the held-out sample is scored under that choice. The mean of
those held-out figures is the figure a decision rests on.

- A **sample** is one specimen: ``empiar10017/bin4`` and ``empiar10017/full`` are the same micrographs at two
  binnings, so they form one sample ``empiar10017``; every other dataset (``sim/<name>``) is its own.
- A sample's figure is the mean of its datasets' figures; a dataset's figure is the mean over the draws, and
  the minimum over the draws is reported beside it (a sample's figure in one draw is the mean of its datasets
  in that draw).
- Every choice maximises the mean over samples; a tie goes to the variant listed first (list the current
  default first, so that it stays unless something beats it).
- The **leave-one-sample-out choice** is the variant chosen for the most held-out samples (a tie again to the
  one listed first). When it differs from the in-sample choice the decision rests on it; either way its
  figure is the leave-one-sample-out mean, not the in-sample one.

Pure functions on plain numbers (numpy and the standard library only); ``study.py choose`` feeds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# One variant's figures: dataset name -> F1 (one draw) or the F1 of each draw, in the same draw order everywhere.
Figures = Mapping[str, Mapping[str, float | Sequence[float]]]


def sample_of(dataset: str) -> str:
    """The sample a dataset belongs to: the EMPIAR entry for ``empiarNNNNN/<binning>``, else the name itself."""
    head, sep, _ = dataset.partition("/")
    return head if sep and head.startswith("empiar") else dataset


@dataclass(frozen=True)
class HeldOut:
    """One sample held out: the variant chosen on the other samples and the held-out sample's F1 under it."""

    sample: str
    datasets: tuple[str, ...]
    chosen: str  # chosen on the other samples only
    f1: float  # this sample's F1 under ``chosen`` (mean over draws)
    f1_min: float  # ... its lowest draw
    in_sample_f1: float  # this sample's F1 under the in-sample choice (mean over draws)
    in_sample_min: float  # ... its lowest draw


@dataclass(frozen=True)
class Choice:
    """The in-sample and the leave-one-sample-out choice of one free choice, with their figures."""

    variants: tuple[str, ...]
    samples: tuple[str, ...]
    n_draws: int
    sample_f1: dict[str, dict[str, float]]  # variant -> sample -> F1, mean over draws
    sample_min: dict[str, dict[str, float]]  # variant -> sample -> F1 of the lowest draw
    variant_mean: dict[str, float]  # variant -> mean over samples (its in-sample figure)
    in_sample: str  # the variant with the best mean over all samples
    in_sample_mean: float
    held_out: tuple[HeldOut, ...]  # one per sample, in ``samples`` order
    loso_mean: float  # mean over samples of the held-out F1

    @property
    def counts(self) -> dict[str, int]:
        """How many held-out samples chose each variant (variants never chosen left out), in variant order."""
        chosen = [h.chosen for h in self.held_out]
        return {v: chosen.count(v) for v in self.variants if v in chosen}

    @property
    def loso_choice(self) -> str:
        """The variant chosen for the most held-out samples; a tie goes to the variant listed first."""
        counts = self.counts
        return max(counts, key=lambda v: (counts[v], -self.variants.index(v)))

    @property
    def stable(self) -> bool:
        """Whether every held-out sample chose the in-sample choice."""
        return all(h.chosen == self.in_sample for h in self.held_out)

    def decision(self) -> str:
        """One sentence: which choice the decision rests on, and with which figure."""
        loso, ins = self.loso_choice, self.in_sample
        figures = f"leave-one-sample-out mean {self.loso_mean:.3f}, in-sample mean {self.in_sample_mean:.3f}"
        if self.stable:
            return (
                f"The decision rests on `{ins}`: it is chosen without each held-out sample as well as on all "
                f"{len(self.samples)} ({figures}; the held-out figure is the one to quote)."
            )
        spread = ", ".join(f"`{v}` {n}" for v, n in self.counts.items())
        if loso == ins:
            return (
                f"The decision rests on `{ins}`, the in-sample choice and the leave-one-sample-out one, though "
                f"not chosen for every held-out sample (held-out choices: {spread}; {figures}; the held-out figure "
                "is the one to quote)."
            )
        return (
            f"The decision rests on the leave-one-sample-out choice `{loso}`, chosen for the most held-out "
            f"samples, not on the in-sample choice `{ins}` (held-out choices: {spread}; {figures}; the in-sample "
            "figure flatters its choice)."
        )


def _draws(value: float | Sequence[float]) -> list[float]:
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    if not values:
        raise ValueError("a dataset has no figure")
    return values


def _best(variants: Sequence[str], mean: Mapping[str, float], tol: float) -> str:
    """The variant with the highest figure; within ``tol`` of a variant listed earlier, the earlier one stays."""
    best = variants[0]
    for v in variants[1:]:
        if mean[v] > mean[best] + tol:
            best = v
    return best


def choose(figures: Figures, tol: float = 1e-12) -> Choice:
    """In-sample and leave-one-sample-out choice among ``figures``' variants (in their given order).

    Every variant must have a figure for the same datasets and the same number of draws, and there must be at
    least two samples (one is held out, the others choose). ``tol``: a variant must beat an earlier one by more
    than this to displace it (the default only absorbs rounding of equal means)."""
    variants = tuple(figures)
    if not variants:
        raise ValueError("no variants")
    datasets = sorted(figures[variants[0]])
    if not datasets:
        raise ValueError(f"variant {variants[0]!r} has no datasets")
    draws: dict[str, dict[str, list[float]]] = {}
    for v in variants:
        if sorted(figures[v]) != datasets:
            raise ValueError(f"variant {v!r} has datasets {sorted(figures[v])}, {variants[0]!r} has {datasets}")
        draws[v] = {d: _draws(figures[v][d]) for d in datasets}
    n_draws = len(draws[variants[0]][datasets[0]])
    uneven = [(v, d) for v in variants for d in datasets if len(draws[v][d]) != n_draws]
    if uneven:
        raise ValueError(f"every dataset needs {n_draws} draws; {uneven[0][0]!r} on {uneven[0][1]!r} has another count")
    members: dict[str, list[str]] = {}
    for d in datasets:
        members.setdefault(sample_of(d), []).append(d)
    samples = tuple(sorted(members))
    if len(samples) < 2:
        raise ValueError(f"leaving one sample out needs at least two samples, got {list(samples)}")

    # per variant and sample, the figure of each draw: the mean of the sample's datasets in that draw
    per_draw = {v: {s: np.mean([draws[v][d] for d in members[s]], axis=0) for s in samples} for v in variants}
    sample_f1 = {v: {s: float(np.mean(per_draw[v][s])) for s in samples} for v in variants}
    sample_min = {v: {s: float(np.min(per_draw[v][s])) for s in samples} for v in variants}
    variant_mean = {v: float(np.mean([sample_f1[v][s] for s in samples])) for v in variants}
    in_sample = _best(variants, variant_mean, tol)

    held_out = []
    for s in samples:
        others = {v: float(np.mean([sample_f1[v][o] for o in samples if o != s])) for v in variants}
        chosen = _best(variants, others, tol)
        held_out.append(
            HeldOut(
                sample=s,
                datasets=tuple(members[s]),
                chosen=chosen,
                f1=sample_f1[chosen][s],
                f1_min=sample_min[chosen][s],
                in_sample_f1=sample_f1[in_sample][s],
                in_sample_min=sample_min[in_sample][s],
            )
        )
    return Choice(
        variants=variants,
        samples=samples,
        n_draws=n_draws,
        sample_f1=sample_f1,
        sample_min=sample_min,
        variant_mean=variant_mean,
        in_sample=in_sample,
        in_sample_mean=variant_mean[in_sample],
        held_out=tuple(held_out),
        loso_mean=float(np.mean([h.f1 for h in held_out])),
    )


def _cell(mean: float, low: float, n_draws: int) -> str:
    return f"{mean:.3f}" if n_draws == 1 else f"{mean:.3f} (min {low:.3f})"


def _sample_label(h: HeldOut) -> str:
    if h.datasets == (h.sample,):
        return h.sample
    return f"{h.sample} ({', '.join(d.partition('/')[2] or d for d in h.datasets)})"


def markdown(choice: Choice, figure: str = "F1 at the automatic cutoff", short: str = "F1") -> str:
    """The report: per held-out sample the variant chosen without it and its figure (``short``: its name in the
    column heads) beside the in-sample choice's, the means of both, each variant's in-sample mean, and the
    sentence saying what the decision rests on."""
    many = choice.n_draws > 1
    draws = f", mean over {choice.n_draws} exemplar draws (min: the lowest draw)" if many else ""
    lines = [
        f"Figure: {figure}{draws}. In-sample choice: `{choice.in_sample}` (best mean over all "
        f"{len(choice.samples)} samples).",
        "",
        f"| held-out sample | chosen on the other samples | its {short} | {short} of the in-sample choice "
        f"`{choice.in_sample}` |",
        "|---|---|---|---|",
    ]
    lines.extend(
        f"| {_sample_label(h)} | `{h.chosen}` | {_cell(h.f1, h.f1_min, choice.n_draws)} | "
        f"{_cell(h.in_sample_f1, h.in_sample_min, choice.n_draws)} |"
        for h in choice.held_out
    )
    lines += [
        f"| **mean** | leave one sample out | **{choice.loso_mean:.3f}** | in sample **{choice.in_sample_mean:.3f}** |",
        "",
        "| variant | mean over samples (in sample) | lowest sample |"
        + (" lowest draw of any sample |" if many else ""),
        "|---|---|---|" + ("---|" if many else ""),
    ]
    for v in choice.variants:
        low = min(choice.sample_f1[v].values())
        row = f"| `{v}` | {choice.variant_mean[v]:.3f} | {low:.3f} |"
        if many:
            row += f" {min(choice.sample_min[v].values()):.3f} |"
        lines.append(row)
    lines += ["", choice.decision()]
    return "\n".join(lines) + "\n"
