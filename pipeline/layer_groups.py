"""`[output] keep_gradients = false`: a run in layer groups, extract → score → drop.

The layers are split into groups fixed when the run starts (as many layers per group as
the output's free space holds next to the results, or `[output] layers_per_group`). Each
group is an ordinary extraction into its own sub-run, `_work/r<k>` (gradients, Fisher,
completed-shard records: the same `--resume` guarantees), whose scores are then written
into the run's `scores` (a region of the compact layout: the layers of that group) and
whose Fisher into the run's `fisher` and whose diagnostics into the run's `diagnostics`
(reduced in the same graph as the scores); the group is recorded as done and its sub-run,
gradients included, deleted (on a local disk in the background, while the next group
extracts once the disk has room for it). The Fisher of a layer depends on that layer's gradients only
(λ per tensor), so a group's Fisher and scores equal those of an ungrouped run. The run
keeps `gradients` with its coordinates only (sample ids, tasks, texts, losses), so query
and report work; the statistics never need gradients. `_work` is removed on success.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from . import schema
from .diagnostics import compute_with_diagnostics
from .errors import StoreError, option
from .extract import ExtractPlan, checksummed, run_extract
from .score import compact_scores
from .spec import JobSpec
from .plan import du
from .store import RunStore, is_url, provenance

ATTR_TEMPLATES = "layer_group_templates"  # `_work` attr: the run's gradients/fisher/scores templates are written


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
    from .extract import missing_chunks

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
                       ATTR_TEMPLATES: True})
    for g in (schema.SCORES_GROUP, schema.FISHER, schema.DIAGNOSTICS):
        if store.has_group(g):
            store.root("r+")[g].attrs[schema.ATTR_COMPLETE] = False
    return sorted(l for k in reopen for l in groups[k])


def group_layers(job: JobSpec, plan: ExtractPlan) -> list[list[int]]:
    """The layer groups of a new run: `layers_per_group`, or as few groups as the disk allows."""
    from .plan import _geometry, plan_job

    n_groups = plan_job(job, geometry=_geometry(job, plan)).layer_groups
    per = math.ceil(len(plan.layers) / max(1, n_groups))
    return [list(plan.layers[i : i + per]) for i in range(0, len(plan.layers), per)]


def sub_job(job: JobSpec, layers: list[int], path: str) -> JobSpec:
    """The job of one layer group's sub-run: the same job on `layers`, keeping its gradients."""
    cfg = job.model_dump(mode="json")
    cfg["score"]["layers"] = list(layers)
    cfg["output"].update(path=path, keep_gradients=True, layers_per_group=None, disk_budget=None)
    return JobSpec.model_validate(cfg)


def _templates(store: RunStore, job: JobSpec, grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset,
               layers: list[int]) -> None:
    """The run's `gradients` (coordinates only), `fisher` and `scores` over every layer, metadata only."""
    L = len(layers)
    lay = np.array(layers, dtype=np.int32)
    prov = provenance(job.config_dict(), job.config_hash(), stage="extract")
    coords = grads.drop_vars(list(grads.data_vars)).load().assign_coords({schema.LAYER: lay})
    coords.attrs.update(prov)
    coords.attrs.update({schema.ATTR_GRADIENTS_DROPPED: True, schema.ATTR_COMPLETE: False})
    store.write_dataset(coords, schema.GRADIENTS)

    f = {}
    for b in (v for v in fisher.data_vars if v != schema.DAMPING):
        var = fisher[b]
        f[b] = xr.Variable(var.dims, da.zeros((L, *var.shape[1:]), chunks=(1, *var.shape[1:]), dtype=var.dtype))
    f[schema.DAMPING] = xr.Variable(fisher[schema.DAMPING].dims, da.zeros((fisher.sizes[schema.BLOCK], L), chunks=(fisher.sizes[schema.BLOCK], 1)))
    fds = xr.Dataset(f, coords={schema.LAYER: lay, schema.BLOCK: fisher[schema.BLOCK].values})
    fds.attrs.update(fisher.attrs)
    fds.attrs.update(prov)
    fds.attrs[schema.ATTR_COMPLETE] = False
    store.write_dataset(fds, schema.FISHER, encoding={b: {"chunks": fds[b].data.chunksize} for b in f}, compute=False)

    c = int(scores.attrs["sample_chunk"])
    s = {}
    chunks = {}
    for name, var in scores.data_vars.items():  # pooled matrices in their tiles; keep_pairs' sums and top pairs whole
        chunks[name] = (1, 1, *var.data.chunksize[2:]) if name.startswith("pooled_") else (1, 1, *var.shape[2:])
        s[name] = xr.Variable(var.dims, da.zeros((L, *var.shape[1:]), chunks=chunks[name], dtype=var.dtype), attrs=var.attrs)
    sds = xr.Dataset(s, coords={k: v for k, v in scores.coords.items() if k != schema.LAYER}).assign_coords({schema.LAYER: lay})
    sds.attrs.update(scores.attrs)
    sds.attrs.update(provenance(job.config_dict(), job.config_hash(), stage="score", sample_chunk=c))
    sds.attrs[schema.ATTR_COMPLETE] = False
    store.write_dataset(sds, schema.SCORES_GROUP, compute=False,
                        encoding={v: {"chunks": chunks[v], "compressors": checksummed(v.startswith("pooled_"))} for v in s})


def _diagnostics_template(store: RunStore, job: JobSpec, diag: xr.Dataset, layers: list[int]) -> None:
    """The run's `diagnostics` over every layer, metadata only (the per-layer variables are
    written group by group, `diag` being the first group's)."""
    L = len(layers)
    data = {}
    for name, var in diag.data_vars.items():
        if schema.LAYER in var.dims:
            shape = tuple(L if d == schema.LAYER else n for d, n in zip(var.dims, var.shape))
            chunks = tuple(1 if d == schema.LAYER else n for d, n in zip(var.dims, var.shape))
            data[name] = xr.Variable(var.dims, da.zeros(shape, chunks=chunks, dtype=var.dtype), attrs=var.attrs)
        else:
            data[name] = var
    ds = xr.Dataset(data, coords={k: v for k, v in diag.coords.items() if k != schema.LAYER})
    ds = ds.assign_coords({schema.LAYER: np.array(layers, dtype=diag[schema.LAYER].dtype)})
    ds.attrs.update(diag.attrs)
    ds.attrs.update(provenance(job.config_dict(), job.config_hash(), stage="diagnostics"))
    ds.attrs[schema.ATTR_COMPLETE] = False
    store.write_dataset(ds, schema.DIAGNOSTICS, compute=False)  # the zeros are never computed


class _Dropper:
    """Deletes finished sub-runs of a local output in a background thread. Unlinking written
    files is not free: on the H200 host (ext4 mounted with `discard`) rmtree of 10 GiB of
    synced files took 3.2 s, ~11 s per 35 GB layer group, which the next group's
    extraction need not wait for when the disk already has room for it. `wait_for_room`
    holds the next group back until it has (or the deletion is over); `wait` joins it."""

    def __init__(self, store: RunStore):
        self.store = store
        self.local = not is_url(store.path)
        self.thread: threading.Thread | None = None
        self.waited = 0.0  # seconds the loop spent waiting for deletions

    def drop(self, sub: RunStore, k: int) -> None:
        self.wait()  # one deletion at a time
        if not self.local:
            t0 = time.perf_counter()
            sub.delete()
            self.waited += time.perf_counter() - t0
            return
        src = Path(sub.path.removeprefix("file://"))
        dst = Path(self.store.path.removeprefix("file://")) / schema.dropped_group_path(k)
        src.rename(dst)  # atomic: the sub-run is gone from where a resumed run would look for it
        self.thread = threading.Thread(target=shutil.rmtree, args=(dst,), kwargs={"ignore_errors": True},
                                       name=f"qkov-drop-r{k}", daemon=True)
        self.thread.start()

    def wait_for_room(self, need: int) -> None:
        from .plan import free_bytes

        t0 = time.perf_counter()
        while self.thread is not None and self.thread.is_alive() and (free_bytes(self.store.path) or 0) < need:
            self.thread.join(0.2)
        self.waited += time.perf_counter() - t0

    def wait(self) -> None:
        t0 = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.waited += time.perf_counter() - t0


def _leftovers(store: RunStore) -> None:
    """Sub-runs a stopped run was deleting (they hold no unrecorded work)."""
    if not is_url(store.path):
        for p in (Path(store.path.removeprefix("file://")) / schema.WORK).glob(Path(schema.dropped_group_path("*")).name):
            shutil.rmtree(p, ignore_errors=True)


def _score_options(job: JobSpec) -> dict:
    return dict(scores_dtype=job.score.scores_dtype, keep_pairs=job.score.keep_pairs, top_k=job.score.top_k, stats=job.stats)


def run_layer_groups(store: RunStore, job: JobSpec, executor, plan: ExtractPlan, progress=None) -> dict:
    """Extract, score and drop each layer group in turn (see the module docstring). Returns
    extraction counts as `run_extract` does, summed over the groups computed in this call."""
    tick = progress or (lambda *_: None)
    work = store.root("r+").require_group(schema.WORK)
    groups = work.attrs.get(schema.ATTR_LAYER_GROUPS)
    if groups is None:  # fixed once: a resumed run keeps its groups whatever the job's disk settings say now
        groups = group_layers(job, plan)
        work.attrs[schema.ATTR_LAYER_GROUPS] = groups
        work.attrs[schema.ATTR_GROUPS_DONE] = []
    layers = [l for g in groups for l in g]
    if layers != list(plan.layers):
        raise StoreError(f"{option('resume')} refused: this run's layer groups {groups} do not cover the job's layers {list(plan.layers)}")
    done = set(work.attrs.get(schema.ATTR_GROUPS_DONE, []))
    n_shards = len(plan.shards)
    total = {"shards": n_shards * len(groups), "computed": 0, "weights_hash": None, "skipped": [], "groups": len(groups),
             "setup_s": 0.0, "extract_s": 0.0, "score_s": 0.0, "drop_s": 0.0}  # time spent in each, summed over the groups
    # progress in the order the stages run: extraction starts (its first group), scoring follows it
    tick("extract", len(done) * n_shards, n_shards * len(groups))
    scoring = False
    _leftovers(store)
    dropper, last_bytes = _Dropper(store), 0
    for k, group in enumerate(groups):
        sub = RunStore(f"{store.path.rstrip('/')}/{schema.layer_group_path(k)}", store.storage_options)
        if k in done:
            sub.delete()  # recorded, but the run stopped before its sub-run was deleted
            continue
        sjob = sub_job(job, group, sub.path)
        if not (sub.is_complete(schema.GRADIENTS) and sub.is_complete(schema.FISHER)):
            from .run import _has_template

            dropper.wait_for_room(last_bytes)  # the previous group's size: no group is larger than the first
            t0 = time.perf_counter()
            fresh = not sub.exists() or not _has_template(sub)
            if fresh:
                sub.create_run(sjob.config_dict(), sjob.config_hash(), stage="layer group")
            total["setup_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            res = run_extract(sub, sjob, executor, plan=dataclasses.replace(plan, layers=tuple(group)), fresh=fresh,
                              on_progress=lambda d, n, k=k: tick("extract", k * n_shards + d, n_shards * len(groups)))
            total["extract_s"] += time.perf_counter() - t0
            total["computed"] += res["computed"]
            total["weights_hash"] = res["weights_hash"]
            total["skipped"] = res["skipped"]
            total["warning"] = res.get("warning")
        tick("extract", (k + 1) * n_shards, n_shards * len(groups))  # also for a group extracted before a resume
        if not scoring:
            tick("score", len(done), len(groups))
            scoring = True
        t0 = time.perf_counter()
        grads, fisher = sub.open_gradients(decode=False), sub.open_fisher()
        readers = sub.direct_chunks(schema.GRADIENTS)  # score tasks read their own rows, as in run_score
        if not work.attrs.get(ATTR_TEMPLATES):
            first = compact_scores(grads, fisher, device=job.score.device, readers=readers, **_score_options(job))
            _templates(store, job, grads, fisher, first, layers)
            work.attrs[ATTR_TEMPLATES] = True
        main = store.root()[schema.GRADIENTS]
        if not np.array_equal(np.asarray(main[schema.FINITE][:]), np.asarray(grads[schema.FINITE].values)):
            raise StoreError(f"layer group {k} skipped other samples for non-finite gradients than group 0; "
                             "rerun with [output] keep_gradients = true")
        chunk = int(store.group_attrs(schema.SCORES_GROUP)["sample_chunk"])
        side: dict = {}
        scores = compact_scores(grads, fisher, sample_chunk=chunk, device=job.score.device, readers=readers, side=side,
                                **_score_options(job))
        region = {schema.LAYER: slice(layers.index(group[0]), layers.index(group[0]) + len(group))}
        diag = compute_with_diagnostics(executor, store.write_region(scores, schema.SCORES_GROUP, region, compute=False),
                                        grads, fisher, scores, readers, job.score.device, side)
        if store.group_attrs(schema.DIAGNOSTICS) is None:
            _diagnostics_template(store, job, diag, layers)
        store.write_region(diag, schema.DIAGNOSTICS, region)
        store.write_region(fisher.load(), schema.FISHER, region)
        total["score_s"] += time.perf_counter() - t0
        done.add(k)
        work.attrs[schema.ATTR_GROUPS_DONE] = sorted(done)  # recorded before the gradients go
        last_bytes = max(last_bytes, du(sub.path))
        dropper.drop(sub, k)
        tick("score", len(done), len(groups))
    if not scoring:  # every group was scored before a resume
        tick("score", len(done), len(groups))
    dropper.wait()
    total["drop_s"] = dropper.waited
    _finish(store, job)
    return total


def _finish(store: RunStore, job: JobSpec) -> None:
    """Every group written: the groups marked complete."""
    for g in (schema.GRADIENTS, schema.FISHER, schema.DIAGNOSTICS, schema.SCORES_GROUP):
        store.mark_complete(g)
