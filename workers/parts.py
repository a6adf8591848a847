"""What a score task hands back besides (or instead of) its scores: the one contract between
the score kernels (qkov.workers.kernels), the graphs that assemble their tiles
(qkov.pipeline.score_graph) and the diagnostics (qkov.pipeline.diagnostics).

A new kernel returns a `TileParts`; every field is a partial that adds up (the top pairs:
merges) over the tiles of a slice, so the graph reduces them without knowing the kernel.
Both are plain frozen dataclasses of numpy (or, assembled per block, Dask) arrays: they
pickle, so Dask tasks may return them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DiagnosticParts:
    """What the diagnostics need of a slice's gradients and scores.

    Of one tile (a task's, numpy, heads first; `qkov.workers.reductions.side_parts`):
      sq (Hc, ci) Σ g² of the tile's rows; rows (Hc, ci, 2) Σ_j M[i, j]·other[j] over its
      columns and cols (Hc, cj, 2) Σ_i M[i, j]·other[i] over its rows (other: the task-A /
      task-B mean weights, so they add up to the interference's other-task means);
      diag (Hc, ci) the alignment diagonal A_ii, on diagonal tiles only (else None).
    Of one block (lazy, samples first, as the score stage hands them to the diagnostics):
      sq, diag (N, L, H_b); rows, cols (N, L, H_b, 2)."""
    sq: Any
    rows: Any
    cols: Any
    diag: Any = None


@dataclass(frozen=True)
class TileParts:
    """One score task's tile at pooled position (r0, c0), everything float64 unless said:
      diagnostics  its `DiagnosticParts`
      sums         (2, Hc, width) the stats sums of [interference, alignment]
                   (qkov.workers.reductions.stat_sums_t), or None
      top          (2, Hc, 3, k) the tile's k best A×B pairs (value, row in A, column in B;
                   interference highest, alignment lowest), or None
      interference, alignment  (1, Hc, ci, cj) float32 scores when the task keeps them (the
                   alignment folded, `schema.fold_symmetric`, when the tile is a whole slice)."""
    diagnostics: DiagnosticParts
    sums: np.ndarray | None = None
    top: np.ndarray | None = None
    interference: np.ndarray | None = None
    alignment: np.ndarray | None = None
