"""The fused path: a layer group's per-sample gradients held in the extraction worker's device
memory, never written, and read from there by the score tasks of the same process.

`[output] gradients_in = "device"` (`qkov.pipeline.layer_groups`): each shard of a group's
extraction deposits its (L, H, n, P) slices here, in the store's representation (bf16 or
float32: the values the disk path would write and read back, so the scores are the same),
keyed by the group's sub-run path; the score tasks get a `ResidentRows` where the disk path
gives them a `DirectChunks`, and the group's entry is released once its scores are written.
One process holds them: the run uses this path only on a single-worker cluster (or inline).
"""
from __future__ import annotations

import threading

import numpy as np
import torch

_HELD: dict[str, dict[str, list[tuple[int, torch.Tensor]]]] = {}  # sub-run path -> block -> [(start, (L, H, n, P))]
_LOCK = threading.Lock()


def deposit(key: str, start: int, bufs: dict[str, torch.Tensor]) -> None:
    """Hold one shard's slices (`bufs`: block -> (L, H, n, P)) of the sub-run `key`. A worker
    holds one group at a time: another key's leftovers (a failed run's) are dropped first."""
    with _LOCK:
        for other in [k for k in _HELD if k != key]:
            del _HELD[other]
        held = _HELD.setdefault(key, {})
        for b, t in bufs.items():
            shards = [s for s in held.get(b, []) if s[0] != start]  # a retried shard replaces its own
            held[b] = sorted([*shards, (start, t)], key=lambda s: s[0])


def release(key: str) -> int:
    """Drop the sub-run's slices; returns the bytes let go (0 where none were held)."""
    with _LOCK:
        held = _HELD.pop(key, {})
    return sum(t.numel() * t.element_size() for shards in held.values() for _, t in shards)


def device_memory(device: str) -> tuple[int, str] | None:
    """(free bytes, name) of this worker's GPU, where the job's device setting gives it one; else None."""
    from .device import resolve_device

    if resolve_device(device) == "cpu":
        return None
    # the allocator's cached blocks (a finished extraction's batches) are free to this process:
    # left out, a warm-up at batch 64 hid 13 GB of an H100 and split SmolLM2 into 4 groups, not 3
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info()[0]), torch.cuda.get_device_name()


def held_bytes() -> int:
    with _LOCK:
        return sum(t.numel() * t.element_size() for h in _HELD.values() for shards in h.values() for _, t in shards)


class ResidentRows:
    """What a score task reads a block's rows through on the fused path (in place of
    `qkov.pipeline.store.DirectChunks`): picklable (a key and shapes), resolved in the worker
    process that holds the slices. `shape`/`dtype` are the stored variable's, (sample, layer,
    head, param) and its raw dtype, so the score graph is built exactly as for the disk path."""

    def __init__(self, key: str, block: str, shape: tuple[int, ...], dtype: str):
        self.key, self.block, self.shape, self.dtype = key, block, tuple(shape), np.dtype(dtype)

    def rows_on_device(self, layer: int, heads: list[int], rows: np.ndarray, device: str) -> torch.Tensor:
        """(len(heads), len(rows), P) in the stored representation (torch bf16 or float32), on `device`."""
        with _LOCK:
            shards = list(_HELD.get(self.key, {}).get(self.block, []))
        if not shards:
            from qkov.pipeline.errors import StoreError

            raise StoreError(f"the gradients of {self.key} (block {self.block}) are not held by this worker: it was "
                             "restarted, or the run has several workers; rerun with --resume")
        rows = np.asarray(rows, dtype=np.int64)
        h0, h1 = int(heads[0]), int(heads[-1]) + 1
        contiguous = list(heads) == list(range(h0, h1))
        parts = []
        for start, t in shards:
            n = t.shape[2]
            mine = rows[(rows >= start) & (rows < start + n)] - start
            if mine.size == 0:
                continue
            x = t[layer, h0:h1] if contiguous else t[layer, torch.as_tensor(list(heads), device=t.device)]
            if mine.size == n or (mine[-1] - mine[0] + 1 == mine.size):  # a run of rows: a view
                x = x[:, int(mine[0]) : int(mine[-1]) + 1]
            else:
                x = x[:, torch.as_tensor(mine, device=t.device)]
            parts.append(x)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.to(device)
