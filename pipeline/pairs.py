"""Reading pairs back: a slice's highest-scoring (sample_a, sample_b) pairs, from the stored
pair scores or, for keep_pairs = "top" runs, from the top pairs the score stage kept.
A reader's helper: imports no stage."""
from __future__ import annotations

import numpy as np
import xarray as xr

from . import schema
from .errors import UsageError


def top_pairs(scores: xr.Dataset, layer: int, head: int, block: str = "Q", n: int = 10,
              score: str = "interference") -> list[dict]:
    """The head's n highest-scoring (sample_a, sample_b) pairs with the users' sample ids.
    A run with keep_pairs = "top" lists its stored top pairs (interference highest, alignment
    most negative first); "none" has no pairs to list."""
    a_ids, b_ids = scores[schema.SAMPLE_A].values, scores[schema.SAMPLE_B].values
    if score not in scores:
        keep = scores.attrs.get(schema.ATTR_KEEP_PAIRS, "all")
        if schema.top_name(score) not in scores:
            if keep == "none":
                return []
            raise UsageError(f"scores has no {score!r} pairs")
        sel = dict(block=block, layer=layer, head=head)
        v, ia, ib = (scores[schema.top_name(score, p)].sel(**sel).values for p in ("value", "a", "b"))
        if n > v.size:
            raise UsageError(f"this run kept the top {v.size} pairs per slice (keep_pairs = 'top', top_k); ask for at most {v.size}")
        return [{"sample_a": str(a_ids[i]), "sample_b": str(b_ids[j]), score: float(x)} for x, i, j in zip(v[:n], ia[:n], ib[:n])]
    m = scores[score].sel(block=block, layer=layer, head=head).values
    order = np.argsort(m, axis=None)[::-1][:n]
    ia, ib = np.unravel_index(order, m.shape)
    return [{"sample_a": str(a_ids[i]), "sample_b": str(b_ids[j]), score: float(m[i, j])} for i, j in zip(ia, ib)]
