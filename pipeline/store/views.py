"""The logical views of stored groups: what readers see, whatever the stored form.

The gradients decoded to float32, text coordinates as plain `str`, and the `scores` group
as the logical dataset (`scores_view`) with what each score answers (`with_score_attrs`).
"""
from __future__ import annotations

import numpy as np

from .. import codec, schema


def decoded(var):
    """A `gradients` variable as float32 whether or not it was opened decoded."""
    if var.dtype != np.uint16:
        return var
    enc = var.attrs[schema.ATTR_ENCODING]
    return var.copy(data=var.data.map_blocks(codec.decode, enc, dtype=np.float32))


def pair_gradients(ds, task_a: str, task_b: str):
    """The gradients of a run of more than two tasks as one pair's two-task view: the samples
    of other tasks are left out the way skipped samples are (`finite` False), and `n_a` is
    where task A's rows end (every task's rows are contiguous, A's before B's), so that the
    stages' rows of A are `finite[:n_a]` and of B `finite[n_a:]` as in a two-task run."""
    task = np.asarray(ds[schema.TASK].values).astype(str)
    in_a, in_b = task == task_a, task == task_b
    end_a = int(np.flatnonzero(in_a)[-1]) + 1
    finite = np.asarray(ds[schema.FINITE].values, dtype=bool) & (in_a | in_b)
    out = ds.assign_coords({schema.FINITE: (schema.SAMPLE, finite, ds[schema.FINITE].attrs)})
    out.attrs.update({schema.ATTR_N_A: end_a, schema.ATTR_N_B: task.size - end_a, schema.ATTR_TASK_A: task_a,
                      schema.ATTR_TASK_B: task_b})
    return out


def has_scalars(grads) -> bool:
    """A `gradients` group holding each sample's scalars per slice (answers mode; sketch mode
    since 2026-12), from which the answers and diagnostics are exact."""
    return schema.PART in grads.dims


def sorted_vars(ds):
    """`ds` with its variables in name order: zarr lists a group's arrays in the file system's
    order, which differs between machines, so "the first variable" would differ too."""
    names = sorted(ds.data_vars, key=str)
    return ds if list(ds.data_vars) == names else ds[names].assign_coords(ds.coords).assign_attrs(ds.attrs)


def plain_text_coords(ds):
    """`ds` with its text coordinates (sample ids, tasks, texts, blocks) as fixed-width `str`
    arrays. Zarr reads them as numpy's variable-width StringDType, which xarray cannot plot
    ("Plotting requires coordinates to be numeric…") and which `.astype(str)` does not convert."""
    text = {name: c for name, c in ds.coords.items() if c.dtype.kind == "T"}
    if not text:
        return ds
    return ds.assign_coords({name: (c.dims, np.asarray(c.values.astype(object), dtype=str), c.attrs)
                             for name, c in text.items()})


def with_score_attrs(ds):
    """The logical scores with what each answers (attrs `question`, `units`, `direction`, as the
    statistics' variables carry); `pooled_<score>` is the same score over every pair of A∪B."""
    for name in list(ds.data_vars):
        base = str(name).removeprefix(schema.pooled_name(""))
        if base in schema.SCORE_DOCS:
            question, units, direction = schema.SCORE_DOCS[base]
            if base != name:
                question += f" (every pair of the pooled samples A and B; the A x B block is `{base}`)"
            ds.variables[name].attrs.update(question=question, units=units, direction=direction)
        base = str(name).removeprefix(schema.moments_name(""))
        if base in schema.SCORE_DOCS and base != name:  # answers and sketch mode: per-sample sums of the score
            ds.variables[name].attrs.update(
                question=f"Per sample i: what the {base} pair matrix S adds up to over each task, the statistics' "
                         f"input in place of the pairs (moment: diag = S_ii, row_a / row_b = sum over A / B of "
                         f"S_ik, col_a / col_b = sum over A / B of S_ki)",
                units=schema.SCORE_DOCS[base][1], direction="as the score: " + schema.SCORE_DOCS[base][2])
    return ds


def scores_view(raw):
    """The logical `scores` dataset from its stored form: `pooled_<score>` (block, layer, head,
    sample_i, sample_j) and the A×B `<score>` (block, layer, head, sample_a, sample_b), coord
    `kv_head(head)`. A compact store (schema.SCORES_LAYOUT) holds each block's pooled matrices
    once on its own heads (the symmetric alignment folded: its upper triangle once); here the
    alignment is unfolded, K/V are indexed per query head and the A×B block is sliced out,
    lazily, so nothing is copied or read until a value is asked for. A store written before
    the compact layout already is the logical dataset and is returned as it is."""
    import xarray as xr

    if raw.attrs.get(schema.ATTR_SCORES_LAYOUT) not in schema.COMPACT_LAYOUTS:
        return raw
    kv_of = np.asarray(raw[schema.KV_HEAD_OF].values)
    ids = raw[schema.SAMPLE_I].values
    n_a = int(raw.attrs[schema.ATTR_N_A])
    coords = {
        schema.BLOCK: raw[schema.BLOCK].values,
        schema.LAYER: raw[schema.LAYER].values,
        schema.HEAD: raw[schema.HEAD].values,
        schema.KV_HEAD: (schema.HEAD, kv_of),
        schema.SAMPLE_I: ids,
        schema.IS_A: (schema.SAMPLE_I, raw[schema.IS_A].values),
        schema.SAMPLE_A: ids[:n_a],
        schema.SAMPLE_B: ids[n_a:],
        schema.SAMPLE_J: ids,
    }
    if schema.MOMENT in raw.coords:
        coords[schema.MOMENT] = raw[schema.MOMENT].values
    return xr.Dataset(_logical_scores(raw, kv_of, n_a), coords=coords, attrs=dict(raw.attrs))


def _logical_scores(raw, kv_of: np.ndarray, n_a: int) -> dict:
    """The logical variables of a compact `scores` group (see `scores_view`), by name."""
    per_head = (schema.BLOCK, schema.LAYER, schema.HEAD)
    blocks = [str(b) for b in raw[schema.BLOCK].values]
    data = {}
    for s in schema.SCORES:
        full = _stacked(raw, schema.pooled_name(s), blocks, kv_of)
        if full is not None:  # keep_pairs = "all"
            data[schema.pooled_name(s)] = (per_head + (schema.SAMPLE_I, schema.SAMPLE_J), full)
            data[s] = (per_head + (schema.SAMPLE_A, schema.SAMPLE_B), full[..., :n_a, n_a:])
        moments = _stacked(raw, schema.moments_name(s), blocks, kv_of)  # score.mode = "answers"
        if moments is not None:
            data[schema.moments_name(s)] = (per_head + (schema.SAMPLE_I, schema.MOMENT), moments)
        sums = _stacked(raw, schema.stat_sums_name(s), blocks, kv_of)  # keep_pairs = "top" | "none"
        if sums is not None:
            data[schema.stat_sums_name(s)] = (per_head + (schema.STAT,), sums)
        for part in ("value", "a", "b"):
            top = _stacked(raw, schema.top_name(s, part), blocks, kv_of)
            if top is not None:
                data[schema.top_name(s, part)] = (per_head + (schema.RANK,), top)
    return data


def _stacked(raw, name: str, blocks: list[str], kv_of: np.ndarray):
    """One logical array (block first, K/V per query head, the alignment unfolded) from the
    per-block stored `<name>_<block>`, lazily; None when the group does not hold `name`."""
    import dask.array as da

    if f"{name}_{blocks[0]}" not in raw:
        return None
    parts = []
    for b in blocks:
        var = raw[f"{name}_{b}"]
        arr = decoded(var).data
        if schema.ATTR_FOLDED in var.attrs:  # the alignment's upper triangle, once (compact-v2)
            n = int(var.attrs[schema.ATTR_FOLDED])
            if isinstance(arr, da.Array) and arr.numblocks[-2:] == (1, 1):  # whole folded slices: a task per slice
                arr = arr.map_blocks(schema.unfold_symmetric, n, chunks=arr.chunks[:-2] + ((n,), (n,)), dtype=arr.dtype)
            else:
                arr = schema.unfold_symmetric(arr, n)
        parts.append(arr[:, kv_of] if schema.head_dim(b) == schema.KV_HEAD else arr)
    return da.stack(parts)
