"""How the score work is cut into tasks: heads per task and samples per chunk. The score
graphs, the diagnostics' own reads and the plan all size their tasks here."""
from __future__ import annotations

import math

DEFAULT_SAMPLE_CHUNK = 512
TASK_BYTES = 256 * 2**20  # input bytes per score task: heads of a layer are batched up to this
DIRECT_TASK_BYTES = 2**30  # rows one direct-read score task holds: read by the task itself, never through Dask


def heads_per_task(n_heads: int, chunk: int, width: int, itemsize: int) -> int:
    """How many heads of a layer one score task takes: as many as fit TASK_BYTES (at least 1),
    so small slices share a task (fewer, larger reads and kernel calls) and large ones do not
    blow up a worker's memory."""
    return int(max(1, min(n_heads, TASK_BYTES // max(1, chunk * width * itemsize))))


def sketched_heads_per_task(n_heads: int, n: int, group_bytes: int = TASK_BYTES) -> int:
    """How many heads one answers-mode task takes whose slices' N×N sketched interference it
    reduces whole (`slice_reductions.sketched_interference`): as many as fit group_bytes in float64."""
    return int(max(1, min(n_heads, group_bytes // (8 * n * n))))


def auto_sample_chunk(n: int, width: int, itemsize: int, direct: bool = False) -> int:
    """Samples per score chunk: all of them when one head's whole slice fits a task (each
    chunk then travels to the worker, and its GPU, once per slice instead of once per chunk
    pair), else DEFAULT_SAMPLE_CHUNK. `direct` (tasks read their own rows from a local
    store): the fewest equal chunks whose rows fit DIRECT_TASK_BYTES, since each of the k
    row chunks is read k times (a slice of 8000 samples in 512-sample tiles was read 16
    times over, 1.3 TB for a 3-layer run of SmolLM2)."""
    if n * width * itemsize <= TASK_BYTES:
        return n
    if not direct:
        return DEFAULT_SAMPLE_CHUNK
    k = math.ceil(n * width * itemsize / DIRECT_TASK_BYTES)
    return max(DEFAULT_SAMPLE_CHUNK, math.ceil(n / k))
