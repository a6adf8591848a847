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
import threading
import time

import dask.array as da
import numpy as np
import xarray as xr

from . import schema
from .diagnostics import compute_with_diagnostics
from .errors import StoreError, UsageError, option
from .extract import ExtractPlan, run_extract
from .score import compact_scores
from .spec import JobSpec
from .store import RunStore, checksummed, provenance
from .store.work import clear_dropped, drop_layer_group, has_template, layer_group


def group_layers(job: JobSpec, plan: ExtractPlan, device=None) -> list[list[int]]:
    """The layer groups of a new run: `layers_per_group`, or as few groups as the disk allows
    (the fused path: as the device memory `device` = (free bytes, name) holds)."""
    from .plan import _geometry, plan_job

    n_groups = plan_job(job, geometry=_geometry(job, plan), device=device).layer_groups
    per = math.ceil(len(plan.layers) / max(1, n_groups))
    return [list(plan.layers[i : i + per]) for i in range(0, len(plan.layers), per)]


def sub_job(job: JobSpec, layers: list[int], path: str) -> JobSpec:
    """The job of one layer group's sub-run: the same job on `layers`, keeping its gradients."""
    cfg = job.model_dump(mode="json")
    cfg["score"]["layers"] = list(layers)
    cfg["output"].update(path=path, keep_gradients=True, layers_per_group=None, disk_budget=None, gradients_in="auto")
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

    c = int(scores.attrs[schema.ATTR_SAMPLE_CHUNK])
    s = {}
    chunks = {}
    for name, var in scores.data_vars.items():  # pooled matrices in their tiles; keep_pairs' sums and top pairs whole
        chunks[name] = (1, 1, *var.data.chunksize[2:]) if name.startswith(schema.pooled_name("")) else (1, 1, *var.shape[2:])
        s[name] = xr.Variable(var.dims, da.zeros((L, *var.shape[1:]), chunks=chunks[name], dtype=var.dtype), attrs=var.attrs)
    sds = xr.Dataset(s, coords={k: v for k, v in scores.coords.items() if k != schema.LAYER}).assign_coords({schema.LAYER: lay})
    sds.attrs.update(scores.attrs)
    sds.attrs.update(provenance(job.config_dict(), job.config_hash(), stage="score", **{schema.ATTR_SAMPLE_CHUNK: c}))
    sds.attrs[schema.ATTR_COMPLETE] = False
    store.write_dataset(sds, schema.SCORES_GROUP, compute=False,
                        encoding={v: {"chunks": chunks[v], "compressors": checksummed(v.startswith(schema.pooled_name("")))} for v in s})


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
        self.thread: threading.Thread | None = None
        self.waited = 0.0  # seconds the loop spent waiting for deletions

    def drop(self, k: int) -> None:
        self.wait()  # one deletion at a time
        t0 = time.perf_counter()
        aside = drop_layer_group(self.store, k)
        if aside is None:  # an object store: deleted in place, the loop waited for it
            self.waited += time.perf_counter() - t0
            return
        self.thread = threading.Thread(target=self.store.delete, args=(aside,), name=f"qkov-drop-r{k}", daemon=True)
        self.thread.start()

    def wait_for_room(self, need: int) -> None:
        t0 = time.perf_counter()
        while self.thread is not None and self.thread.is_alive() and (self.store.free_bytes() or 0) < need:
            self.thread.join(0.2)
        self.waited += time.perf_counter() - t0

    def wait(self) -> None:
        t0 = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.waited += time.perf_counter() - t0


def _score_options(job: JobSpec) -> dict:
    return dict(scores_dtype=job.score.scores_dtype, keep_pairs=job.score.keep_pairs, top_k=job.score.top_k, stats=job.stats)


def run_layer_groups(store: RunStore, job: JobSpec, executor, *, plan: ExtractPlan, progress=None) -> dict:
    """Extract, score and drop each layer group in turn (see the module docstring). Returns
    extraction counts as `run_extract` does, summed over the groups computed in this call."""
    work = store.root("r+").require_group(schema.WORK)
    groups = work.attrs.get(schema.ATTR_LAYER_GROUPS)
    device, why = _device_for_groups(job, executor)
    if groups is None:  # fixed once: a resumed run keeps its groups whatever the job's disk settings say now
        groups = group_layers(job, plan, device)
        work.attrs[schema.ATTR_LAYER_GROUPS] = groups
        work.attrs[schema.ATTR_GROUPS_DONE] = []
    where, why = _gradients_in(job, plan, groups, device, why)
    work.attrs[schema.ATTR_GRADIENTS_IN] = {"where": where, "why": why}
    layers = [l for g in groups for l in g]
    if layers != list(plan.layers):
        raise StoreError(f"{option('resume')} refused: this run's layer groups {groups} do not cover the job's layers {list(plan.layers)}")
    run = _GroupRun(store, job, executor, plan, groups, progress or (lambda *_: None), fused=(where == "device"))
    total = run.run(set(work.attrs.get(schema.ATTR_GROUPS_DONE, [])))
    total["gradients_in"] = {"where": where, "why": why}
    return total


def _device_for_groups(job: JobSpec, executor) -> tuple[object, str]:
    """(the fused path's device memory as measured on the worker (free bytes, name), or None; why
    not, where it cannot be used at all)."""
    from qkov.workers.resident import device_memory

    if job.output.gradients_in == "disk" or job.score.mode != "exact":
        return None, ""
    if not executor.one_process():
        return None, ("the cluster has several workers, and the fused path holds a group's gradients in the one "
                      "process that scores them")
    return executor.map(device_memory, [job.extract.device], gpu=True)[0], ""


def _gradients_in(job: JobSpec, plan: ExtractPlan, groups: list[list[int]], device, why: str) -> tuple[str, str]:
    """("device" | "disk", why) for this call's groups: the fused path where the job allows it, one
    process runs every task and the largest group fits the measured device (`qkov.pipeline.plan.
    hold_on_device`, the rule `qkov plan` states)."""
    from .plan import _geometry, plan_job

    if why:  # (several workers)
        if job.output.gradients_in == "device":
            raise UsageError(f"[output] gradients_in = \"device\" but {why}; run with one worker, or leave gradients_in out")
        return "disk", why
    p = plan_job(job, geometry=_geometry(job, plan), device=device)
    if p.gradients_in != "device":
        return "disk", p.gradients_in_why
    held = math.ceil(len(plan.layers) / p.layer_groups)
    if max(map(len, groups)) > held and job.output.gradients_in == "auto":  # groups fixed by an earlier attempt
        return "disk", f"this run's groups of {max(map(len, groups))} layers, fixed when it started, exceed the {held} the device holds now"
    return "device", p.gradients_in_why


class _GroupRun:
    """One `run_layer_groups` call: its groups in turn, with the counts and times it returns."""

    def __init__(self, store: RunStore, job: JobSpec, executor, plan: ExtractPlan, groups: list[list[int]], tick,
                 fused: bool = False):
        self.store, self.job, self.executor, self.plan, self.groups, self.tick = store, job, executor, plan, groups, tick
        self.fused = fused  # the groups' gradients held in the worker's memory (qkov.workers.resident)
        self.layers = [l for g in groups for l in g]
        self.n_shards = len(plan.shards)
        self.total = {"shards": self.n_shards * len(groups), "computed": 0, "weights_hash": None, "skipped": [],
                      "groups": len(groups), "setup_s": 0.0, "extract_s": 0.0, "score_s": 0.0, "drop_s": 0.0}  # time in each, summed
        self.dropper, self.last_bytes = _Dropper(store), 0

    def run(self, done: set[int]) -> dict:
        n_all = self.n_shards * len(self.groups)
        # progress in the order the stages run: extraction starts (its first group), scoring follows it
        self.tick("extract", len(done) * self.n_shards, n_all)
        scoring = False
        clear_dropped(self.store)
        for k, group in enumerate(self.groups):
            sub = layer_group(self.store, k)
            if k in done:
                sub.delete()  # recorded, but the run stopped before its sub-run was deleted
                continue
            if _resident(sub) or (self.fused and sub.exists() and not sub.is_complete(schema.GRADIENTS)):
                sub.delete()  # its gradients were held by a worker (gone since), or it would mix paths: anew
            resident = False
            if not (sub.is_complete(schema.GRADIENTS) and sub.is_complete(schema.FISHER)):
                resident = self.extract(k, group, sub)
            self.tick("extract", (k + 1) * self.n_shards, n_all)  # also for a group extracted before a resume
            if not scoring:
                self.tick("score", len(done), len(self.groups))
                scoring = True
            self.score(k, group, sub, resident)
            done.add(k)
            self.store.root("r+")[schema.WORK].attrs[schema.ATTR_GROUPS_DONE] = sorted(done)  # recorded before the gradients go
            self.last_bytes = max(self.last_bytes, sub.size_bytes())
            self.dropper.drop(k)
            self.tick("score", len(done), len(self.groups))
        if not scoring:  # every group was scored before a resume
            self.tick("score", len(done), len(self.groups))
        self.dropper.wait()
        self.total["drop_s"] = self.dropper.waited
        for g in (schema.GRADIENTS, schema.FISHER, schema.DIAGNOSTICS, schema.SCORES_GROUP):  # every group written
            self.store.mark_complete(g)
        return self.total

    def extract(self, k: int, group: list[int], sub: RunStore) -> bool:
        """Layer group k's gradients and Fisher into its sub-run (resumed where it has a template);
        on the fused path the gradients stay in the worker's memory (returns whether they do)."""
        sjob = sub_job(self.job, group, sub.path)
        self.dropper.wait_for_room(self.last_bytes)  # the previous group's size: no group is larger than the first
        t0 = time.perf_counter()
        fresh = not sub.exists() or not has_template(sub)
        if fresh:
            sub.create_run(sjob.config_dict(), sjob.config_hash(), stage="layer group")
        if self.fused:  # recorded before any shard is: a later call knows these gradients were never written
            sub.root("r+").require_group(schema.WORK).attrs[schema.ATTR_RESIDENT] = True
        self.total["setup_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        n_all = self.n_shards * len(self.groups)
        res = run_extract(sub, sjob, self.executor, plan=dataclasses.replace(self.plan, layers=tuple(group)), fresh=fresh,
                          on_progress=lambda d, n: self.tick("extract", k * self.n_shards + d, n_all), resident=self.fused)
        self.total["extract_s"] += time.perf_counter() - t0
        self.total["computed"] += res["computed"]
        self.total["weights_hash"] = res["weights_hash"]
        self.total["skipped"] = res["skipped"]
        self.total["warning"] = res.get("warning")
        spent = self.total.setdefault("seconds", {})  # summed over the groups, as run_extract's over shards
        for part, sec in res.get("seconds", {}).items():
            spent[part] = round(spent.get(part, 0.0) + sec, 3)
        return self.fused

    def score(self, k: int, group: list[int], sub: RunStore, resident: bool = False) -> None:
        """Layer group k's scores, diagnostics and Fisher into their layers' region of the run."""
        store, job = self.store, self.job
        t0 = time.perf_counter()
        grads, fisher = sub.open_gradients(decode=False), sub.open_fisher()
        if resident:  # the fused path: the score tasks read the rows extraction left in the worker's memory
            from qkov.workers.resident import ResidentRows

            readers = {b: ResidentRows(sub.path, b, grads[b].shape, grads[b].dtype.str) for b in self.plan.blocks}
        else:
            readers = sub.direct_chunks(schema.GRADIENTS)  # score tasks read their own rows, as in run_score
        try:
            self._score(k, group, sub, grads, fisher, readers)
        finally:
            if resident:
                from qkov.workers.resident import release

                self.executor.map(release, [sub.path], gpu=True)
        self.total["score_s"] += time.perf_counter() - t0

    def _score(self, k: int, group: list[int], sub: RunStore, grads, fisher, readers) -> None:
        store, job = self.store, self.job
        work = store.root("r+")[schema.WORK]
        if not work.attrs.get(schema.ATTR_TEMPLATES):
            first = compact_scores(grads, fisher, device=job.score.device, readers=readers, **_score_options(job))
            _templates(store, job, grads, fisher, first, self.layers)
            work.attrs[schema.ATTR_TEMPLATES] = True
        main = store.root()[schema.GRADIENTS]
        if not np.array_equal(np.asarray(main[schema.FINITE][:]), np.asarray(grads[schema.FINITE].values)):
            raise StoreError(f"layer group {k} skipped other samples for non-finite gradients than group 0; "
                             "rerun with [output] keep_gradients = true")
        chunk = int(store.group_attrs(schema.SCORES_GROUP)[schema.ATTR_SAMPLE_CHUNK])
        side: dict = {}
        first = self.layers.index(group[0])
        # the score tasks write the pooled matrices into the run's arrays themselves, where those allow it
        write_to = {"arrays": store.direct_chunks(schema.SCORES_GROUP), "first": first}
        scores = compact_scores(grads, fisher, sample_chunk=chunk, device=job.score.device, readers=readers, side=side,
                                write_to=write_to, **_score_options(job))
        region = {schema.LAYER: slice(first, first + len(group))}
        diag = compute_with_diagnostics(self.executor, store.write_region(scores, schema.SCORES_GROUP, region, compute=False),
                                        grads, fisher, scores, readers, job.score.device, side)
        if store.group_attrs(schema.DIAGNOSTICS) is None:
            _diagnostics_template(store, job, diag, self.layers)
        store.write_region(diag, schema.DIAGNOSTICS, region)
        store.write_region(fisher.load(), schema.FISHER, region)


def _resident(sub: RunStore) -> bool:
    """Whether a sub-run's gradients were held in a worker's memory (never written)."""
    if not (sub.exists() and has_template(sub)):
        return False
    try:
        return bool(sub.root()[schema.WORK].attrs.get(schema.ATTR_RESIDENT))
    except KeyError:
        return False
