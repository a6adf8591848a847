"""`qkov stats --exclude`: `resolve_samples` maps the user's ids to the pooled rows and refuses
unknown or ambiguous ones; `without_samples` drops them from an opened scores dataset (rows and
columns), so the statistics are recomputed from the stored scores, with the Fisher (and λ)
still the one estimated from every sample. Imports no stage."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from . import schema as S
from .errors import UsageError, param


def resolve_samples(scores: xr.Dataset, requested: Sequence[str]) -> np.ndarray:
    """Positions in the pooled rows (sample_i) of the samples named in `requested`.

    Each entry is a sample id, `TASK:ID` (when an id occurs in both tasks), or several of
    those separated by commas (an entry that is itself an id is taken whole). Unknown or
    ambiguous ids are a UsageError naming them: nothing is dropped silently."""
    ids = np.array([str(x) for x in scores[S.SAMPLE_I].values], dtype=object)  # StringDType: no fixed-width cast
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    tasks = {str(scores.attrs.get(S.ATTR_TASK_A)): is_a, str(scores.attrs.get(S.ATTR_TASK_B)): ~is_a}
    found: set[int] = set()
    unknown: list[str] = []
    ambiguous: list[str] = []

    # compared as Python strings: `ids == token` makes numpy turn `token` into a fixed-width
    # string, which drops trailing NULs ("a\0" would match sample "a")
    def matches(token: str) -> np.ndarray:
        return np.array([i == token for i in ids], dtype=bool)

    def one(token: str) -> bool:
        hits = np.flatnonzero(matches(token))
        if hits.size == 1:
            found.add(int(hits[0]))
            return True
        if hits.size > 1:
            ambiguous.append(token)
            return True
        for name, mask in tasks.items():
            if token.startswith(name + ":"):
                hits = np.flatnonzero(matches(token[len(name) + 1:]) & mask)
                if hits.size == 1:
                    found.add(int(hits[0]))
                    return True
        return False

    for entry in requested:
        entry = str(entry)
        if one(entry):
            continue
        parts = [p.strip() for p in entry.split(",") if p.strip()]
        for p in parts if "," in entry else [entry]:
            if not one(p):
                unknown.append(p)
    if ambiguous:
        names = list(tasks)
        raise UsageError(f"{param('exclude')}: sample id(s) {ambiguous[:5]} occur in both tasks; write "
                         f"'{names[0]}:ID' or '{names[1]}:ID'")
    if unknown:
        raise UsageError(f"{param('exclude')}: {len(unknown)} id(s) are not among the run's scored samples: {unknown[:5]}"
                         f"{' …' if len(unknown) > 5 else ''} (e.g. {', '.join(ids[:3])}; samples skipped for "
                         "non-finite gradients are not in the scores)")
    return np.array(sorted(found), dtype=np.int64)


def without_samples(scores: xr.Dataset, drop: np.ndarray) -> xr.Dataset:
    """The scores dataset with the pooled rows `drop` removed: their rows and columns of the
    pooled matrices and of the A×B blocks; n_a / n_b follow. Needs ≥ 2 samples left per task
    (the within-task means of the effect sizes take pairs of different samples)."""
    if not any(S.pooled_name(s) in scores for s in S.SCORES):
        mode = scores.attrs.get(S.ATTR_MODE) or "exact"
        raise UsageError(f"{param('exclude')} recomputes the statistics from the stored pair scores, and this run stored none "
                         f"(score.mode = {mode!r}, keep_pairs = {scores.attrs.get('keep_pairs')!r}); rerun in exact or "
                         "sketch mode with keep_pairs = \"all\" to leave samples out afterwards, or drop them from the task files")
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    keep = np.ones(is_a.size, dtype=bool)
    keep[np.asarray(drop, dtype=np.int64)] = False
    left_a, left_b = int((keep & is_a).sum()), int((keep & ~is_a).sum())
    if min(left_a, left_b) < 2:
        raise UsageError(f"{param('exclude')} leaves {left_a} sample(s) of task {scores.attrs.get(S.ATTR_TASK_A)!r} and {left_b} of "
                         f"{scores.attrs.get(S.ATTR_TASK_B)!r}; the statistics need at least 2 per task")
    idx = np.flatnonzero(keep)
    # reduced over every sample, the excluded ones too: the stats sums, and the per-sample moments
    # (their row and column sums); the statistics then come from the pair scores alone
    reduced = [v for v in scores.data_vars if v.startswith((S.stat_sums_name(""), S.moments_name("")))]
    out = scores.drop_vars(reduced).isel({S.SAMPLE_I: idx, S.SAMPLE_J: idx, S.SAMPLE_A: np.flatnonzero(keep[is_a]),
                                       S.SAMPLE_B: np.flatnonzero(keep[~is_a])})
    out.attrs.update({S.ATTR_N_A: left_a, S.ATTR_N_B: left_b})
    out.attrs.pop(S.ATTR_SUMS_SETTINGS, None)
    return out
