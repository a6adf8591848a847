"""The run store's schema, in one place.

A run is one Zarr v3 group with sub-groups per stage. Every name a stage reads or
writes comes from here, so that readers and writers cannot drift apart.
"""
from __future__ import annotations

SCHEMA_VERSION = 1

BLOCKS: tuple[str, ...] = ("Q", "K", "V", "O")
SCORES: tuple[str, ...] = ("interference", "alignment")

# groups
GRADIENTS = "gradients"
FISHER = "fisher"
SCORES_GROUP = "scores"
STATS = "stats"
CHECKS = "checks"
WORK = "_work"  # bookkeeping: completed-shard records, Fisher partial sums, locks

# dimension names
SAMPLE = "sample"
LAYER = "layer"
HEAD = "head"
KV_HEAD = "kv_head"
PARAM = "param"
SAMPLE_A = "sample_a"
SAMPLE_B = "sample_b"
SAMPLE_I = "sample_i"  # pooled (A then B) score matrices used by the statistics
SAMPLE_J = "sample_j"
BLOCK = "block"
SCORE = "score"

# coordinate / variable names in `gradients`
SAMPLE_ID = "sample_id"
TASK = "task"
N_TOKENS = "n_tokens"
LOSS = "loss"

# attrs
ATTR_SCHEMA = "qkov_schema_version"
ATTR_PROVENANCE = "qkov_provenance"
ATTR_COMPLETE = "qkov_complete"  # set last, when a group is fully written


def head_dim(block: str) -> str:
    """Name of the head dimension of a block: K/V live on KV heads (GQA/MQA)."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")
    return KV_HEAD if block in ("K", "V") else HEAD


def pooled_name(score: str) -> str:
    """Variable holding the pooled (A∪B)×(A∪B) matrix of a score, for the permutation null."""
    return f"pooled_{score}"
