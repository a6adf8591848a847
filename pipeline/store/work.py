"""The run's bookkeeping in `_work`, and its repairs: what is done, what is damaged, what runs again.

Extraction records each shard as done after its chunks are written (`record_shard`); a
layer-grouped run records its groups. `--resume` trusts a record only where the chunks it
stands for exist: records of shards and layer groups whose chunks are gone are reopened
(`reopen_damaged_shards`, `reopen_damaged_layers`) so that the run computes them again, and
the score stage refuses gradients with missing chunks (`require_intact_gradients`).
"""
from __future__ import annotations

import itertools

import numpy as np

from .. import schema
from ..errors import StoreError
from .paths import sync
from .runstore import RunStore



def has_template(store: RunStore) -> bool:
    """Extraction's template is written: `gradients` and the completed-shard record (written last)."""
    root = store.root()
    try:
        root[schema.WORK][schema.DONE]
        root[schema.GRADIENTS]
        return True
    except KeyError:
        return False


def shards_done(store: RunStore, record: str = schema.DONE) -> np.ndarray:
    """The completed-shard record `record` (schema.DONE, or schema.DONE_FISHER in sketch mode), as booleans."""
    return np.asarray(store.root()[schema.WORK][record][:], dtype=bool)


def record_shard(root, shard: int, fisher_partials: dict[str, np.ndarray], phase: str) -> None:
    """A worker's record of one written shard (`root`: the run's root, open 'r+'): its Fisher
    partial sums (by `_work` array name: schema.fisher_partial), then its done-record, last, so
    that a shard is recorded only once whole."""
    work = root[schema.WORK]
    for name, arr in fisher_partials.items():
        work[name][shard] = arr
    work[schema.DONE_FISHER if phase == "fisher" else schema.DONE][shard] = 1


async def _keys(zstore, prefix: str) -> set[str]:
    return {k async for k in zstore.list_prefix(prefix)}


def missing_chunks(store: RunStore, group: str, *, sample_dim: str | None = None) -> dict[str, list[tuple[int, ...]]]:
    """Chunks of `group`'s data variables that do not exist in the store, by variable. A missing
    chunk reads as the fill value (NaN), so a deleted or never-written chunk would otherwise give
    NaN scores (or shift other slices' q-values) without a word. `sample_dim`: check only the
    chunks of shards whose completed-shard record says they were written (an interrupted run's
    pending shards are legitimately absent)."""
    root = store.root()
    try:
        g = root[group]
    except KeyError:
        return {}
    done = None
    if sample_dim is not None:
        try:
            done = shards_done(store)
        except KeyError:
            return {}
    have = sync(_keys(store.zarr(read_only=True), f"{group}/"))
    out: dict[str, list[tuple[int, ...]]] = {}
    for name, arr in g.arrays():
        dims = tuple(arr.metadata.dimension_names or ())
        if len(arr.shape) < 3:  # coordinates (ids, texts, losses) are not the data; an all-fill chunk of
            continue            # them (e.g. empty texts) is legitimately never written
        grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks)]
        if done is not None:
            if not dims or dims[0] != sample_dim:
                continue
            grid[0] = [k for k in grid[0] if k < len(done) and done[k]]
        lost = [idx for idx in itertools.product(*grid)
                if f"{group}/{name}/{arr.metadata.encode_chunk_key(idx)}" not in have]
        if lost:
            out[name] = lost
    return out


def damaged_shards(store: RunStore) -> list[int]:
    """Shards recorded as complete some of whose gradient chunks do not exist."""
    lost = missing_chunks(store, schema.GRADIENTS, sample_dim=schema.SAMPLE)
    return sorted({idx[0] for chunks in lost.values() for idx in chunks})


def reopen_damaged_shards(store: RunStore) -> list[int]:
    """--resume: clear the completed-shard record of every shard whose gradient chunks are gone
    (and the completeness of what was computed from them), so that the run recomputes them."""
    shards = damaged_shards(store)
    if shards:
        root = store.root("r+")
        done = root[schema.WORK][schema.DONE]
        for k in shards:
            done[k] = 0
        for g in (schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP):
            if store.has_group(g):
                root[g].attrs[schema.ATTR_COMPLETE] = False
    return shards


def require_intact_gradients(store: RunStore) -> None:
    """The score stage's gate: every gradient chunk of every completed shard exists."""
    shards = damaged_shards(store)
    if shards:
        raise StoreError(
            f"{store.path} is damaged: gradient chunks of completed shards {shards} are missing (deleted, or never "
            "written by a crashed writer); `qkov run JOB.toml --resume` recomputes them."
        )


def reopen_damaged_scores(store: RunStore) -> bool:
    """--resume of a run that kept its gradients: complete scores with missing chunks are marked
    incomplete, so that the score stage runs again. True when they were."""
    if store.is_complete(schema.SCORES_GROUP) and missing_chunks(store, schema.SCORES_GROUP):
        store.root("r+")[schema.SCORES_GROUP].attrs[schema.ATTR_COMPLETE] = False
        return True
    return False


# ---- layer groups (`[output] keep_gradients = false`) -------------------------


def is_grouped(store: RunStore) -> bool:
    """The run at `store` was started in layer groups (whatever the job file now says): `_work`
    records its groups, or (finished, `_work` removed) its gradients were dropped."""
    if not store.exists():
        return False
    if schema.ATTR_LAYER_GROUPS in (store.group_attrs(schema.WORK) or {}):
        return True
    return bool((store.group_attrs(schema.GRADIENTS) or {}).get(schema.ATTR_GRADIENTS_DROPPED))


def _damaged_layers(store: RunStore, n_layers: int, finished: bool) -> set[int]:
    """Positions along `layer` whose score chunks are missing (a missing chunk reads as the fill
    value; the scores' chunks are always written, unlike zarr's, which skips a chunk of fill
    values: a Fisher or diagnostics chunk may legitimately be absent). A missing chunk of an
    array not chunked per layer counts for every layer in a finished run (in a running one
    it may not be written yet)."""
    root = store.root()
    out: set[int] = set()
    for name, lost in missing_chunks(store, schema.SCORES_GROUP).items():
        dims = tuple(root[schema.SCORES_GROUP][name].metadata.dimension_names or ())
        if schema.LAYER in dims and root[schema.SCORES_GROUP][name].chunks[dims.index(schema.LAYER)] == 1:
            out |= {idx[dims.index(schema.LAYER)] for idx in lost}
        elif finished:
            return set(range(n_layers))
    return out


def reopen_damaged_layers(store: RunStore) -> list[int]:
    """--resume of a layer-grouped run: the groups whose score chunks are missing are recorded as not done (and those groups not complete), so the run extracts
    and scores them again; the gradients they came from are gone. A finished run (its `_work`
    removed) gets one group per layer, every layer done but the damaged ones. Returns the
    layers reopened."""
    if store.group_attrs(schema.SCORES_GROUP) is None:  # no group written yet: nothing recorded done
        return []
    root = store.root()
    values = [int(v) for v in np.asarray(root[schema.SCORES_GROUP][schema.LAYER][:])]
    attrs = store.group_attrs(schema.WORK) or {}
    groups = attrs.get(schema.ATTR_LAYER_GROUPS)
    finished = groups is None
    if finished:
        groups, done = [[v] for v in values], set(range(len(values)))
    else:
        done = set(attrs.get(schema.ATTR_GROUPS_DONE, []))
    lost = {values[p] for p in _damaged_layers(store, len(values), finished)}
    reopen = {k for k in done if lost & set(groups[k])}
    if not reopen:
        return []
    work = store.root("r+").require_group(schema.WORK)
    work.attrs.update({schema.ATTR_LAYER_GROUPS: groups, schema.ATTR_GROUPS_DONE: sorted(done - reopen),
                       schema.ATTR_TEMPLATES: True})
    for g in (schema.SCORES_GROUP, schema.FISHER, schema.DIAGNOSTICS):
        if store.has_group(g):
            store.root("r+")[g].attrs[schema.ATTR_COMPLETE] = False
    return sorted(l for k in reopen for l in groups[k])


def layer_group(store: RunStore, k: int) -> RunStore:
    """Layer group k's sub-run, inside the run (`schema.layer_group_path`)."""
    return RunStore(f"{store.path.rstrip('/')}/{schema.layer_group_path(k)}", store.storage_options)


def drop_layer_group(store: RunStore, k: int) -> str | None:
    """Layer group k's finished sub-run leaves its place: on a local disk renamed aside (atomic:
    a resumed run no longer finds it) and returned, for the caller to delete (`store.delete`)
    when it suits; on an object store (no rename) deleted now (None)."""
    if store.local is None:
        layer_group(store, k).delete()
        return None
    store.rename(schema.layer_group_path(k), schema.dropped_group_path(k))
    return schema.dropped_group_path(k)


def clear_dropped(store: RunStore) -> None:
    """Delete the sub-runs a stopped run had renamed aside to delete (they hold no unrecorded work)."""
    local = store.local
    if local is not None:
        for p in (local / schema.WORK).glob(schema.dropped_group_path("*").rsplit("/", 1)[-1]):
            store.delete(f"{schema.WORK}/{p.name}")
