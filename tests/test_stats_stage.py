"""The stats stage on synthetic scores stores: results against direct references, store
hygiene (scores untouched), settings conflicts, refusals, and a 2-process cluster."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import xarray as xr

from qkov.pipeline import schema as S
from qkov.pipeline import stats as st
from qkov.pipeline.spec import StatsSpec, config_hash
from qkov.pipeline.executors import DaskExecutor
from qkov.pipeline.stats_stage import StatsStageError, compute_stats
from qkov.pipeline.schema import IS_A
from qkov.pipeline.stats_stage import run_stats as _run_stats
from qkov.pipeline.store import RunStore, StoreError


def run_stats(run, settings, executor=None, **kw):
    return _run_stats(RunStore(run), settings, executor, **kw)


def open_stats(run, name=None):
    return RunStore(run).open_stats(name)

# the synthetic store is written the way the score stage writes it (str coords, consolidated)
pytestmark = [
    pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata:zarr.errors.ZarrUserWarning"),
]

N_A, N_B, N_LAYER, N_HEAD, N_KV = 6, 5, 2, 4, 2
SETTINGS = StatsSpec(n_permutations=199, n_bootstrap=200, seed=3)
PLANTED = ("Q", 1, 2)  # block, layer, head with a large A-side effect
ABLATED = ("O", 0, 3)  # all-zero scores


def synthetic_scores(seed: int = 0) -> xr.Dataset:
    """Scores shaped as the score stage writes them; K/V identical within a KV group."""
    n = N_A + N_B
    kv_head = np.arange(N_HEAD) // (N_HEAD // N_KV)
    inter = np.zeros((4, N_LAYER, N_HEAD, n, n), np.float32)
    align = np.zeros_like(inter)
    for b, blk in enumerate(S.BLOCKS):
        for l in range(N_LAYER):
            for h in range(N_HEAD):
                key = kv_head[h] if blk in ("K", "V") else h
                rng = np.random.default_rng([seed, b, l, int(key)])
                u, v, g = np.abs(rng.normal(size=(n, 8))), np.abs(rng.normal(size=(n, 8))), rng.normal(size=(n, 8))
                if (blk, l, h) == PLANTED:
                    u[:N_A] *= 4.0
                    v[N_A:] *= 4.0
                if (blk, l, h) == ABLATED:
                    u[:] = g[:] = 0.0
                inter[b, l, h], align[b, l, h] = u @ v.T, g @ g.T
    ids = [f"a{i}" for i in range(N_A)] + [f"b{i}" for i in range(N_B)]
    p5 = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_I, S.SAMPLE_J)
    ab5 = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_A, S.SAMPLE_B)
    return xr.Dataset(
        {
            S.pooled_name("interference"): (p5, inter),
            S.pooled_name("alignment"): (p5, align),
            "interference": (ab5, inter[..., :N_A, N_A:]),
            "alignment": (ab5, align[..., :N_A, N_A:]),
        },
        coords={
            S.BLOCK: list(S.BLOCKS), S.LAYER: np.arange(N_LAYER), S.HEAD: np.arange(N_HEAD),
            S.KV_HEAD: (S.HEAD, kv_head), S.SAMPLE_I: ids, S.SAMPLE_J: ids,
            S.SAMPLE_A: ids[:N_A], S.SAMPLE_B: ids[N_A:], IS_A: (S.SAMPLE_I, np.arange(n) < N_A),
        },
        attrs={"n_a": N_A, "n_b": N_B, S.ATTR_COMPLETE: True, S.ATTR_SCHEMA: S.SCHEMA_VERSION},
    ).chunk({S.BLOCK: 1, S.LAYER: 1, S.HEAD: 1})


def write_run(path: Path, complete: bool = True) -> str:
    run = str(path / "run.zarr")
    xr.Dataset({"Q": (("sample", "param"), np.ones((3, 4), np.float32))}).to_zarr(run, group=S.GRADIENTS, mode="w")
    ds = synthetic_scores()
    ds.attrs[S.ATTR_COMPLETE] = complete
    ds.to_zarr(run, group=S.SCORES_GROUP, mode="w")
    return run


def tree_hashes(root: str, sub: str) -> dict[str, str]:
    base = Path(root) / sub
    return {str(f.relative_to(base)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(base.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def run_and_result(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("stats"))
    before = {g: tree_hashes(run, g) for g in (S.SCORES_GROUP, S.GRADIENTS)}
    ds = run_stats(run, SETTINGS)
    return run, ds, before


def test_dataset_shape_and_family(run_and_result):
    _, ds, _ = run_and_result
    assert dict(ds.sizes) == {S.SCORE: 2, S.BLOCK: 4, S.LAYER: N_LAYER, S.HEAD: N_HEAD}
    for v in ("mean", "p_value", "q_value", "significant", "p_fwer", "ci_low", "ci_high"):
        assert ds[v].dims == (S.SCORE, S.BLOCK, S.LAYER, S.HEAD), v
    assert list(ds[S.SCORE].values) == list(S.SCORES)
    assert ds["significant"].dtype == bool
    fam = ds["in_family"].sel(block=["K", "V"]).values
    assert fam.tolist() == [[True, False, True, False]] * 2
    assert ds["in_family"].sel(block=["Q", "O"]).values.all()
    assert ds.attrs["family_size"] == N_LAYER * (2 * N_HEAD + 2 * N_KV)
    for k, v in SETTINGS.model_dump().items():
        assert ds.attrs[k] == v
    assert ds.attrs[S.ATTR_SCHEMA] == S.SCHEMA_VERSION
    assert ds.attrs[S.ATTR_PROVENANCE]["config_hash"] == config_hash(SETTINGS.model_dump(mode="json"))
    assert ds.attrs[S.ATTR_PROVENANCE]["config"] == SETTINGS.model_dump(mode="json")
    # duplicated K/V heads repeat their KV head
    for v in ("mean", "p_value", "q_value", "p_fwer", "ci_low"):
        kv = ds[v].sel(block=["K", "V"])
        np.testing.assert_array_equal(kv.isel(head=1).values, kv.isel(head=0).values)
        np.testing.assert_array_equal(kv.isel(head=3).values, kv.isel(head=2).values)


def test_values_match_direct_references(run_and_result):
    _, ds, _ = run_and_result
    sc = synthetic_scores().load()
    ind_a, ind_b = st.permutation_indicators(N_A, N_B, SETTINGS.n_permutations, SETTINGS.seed)
    w_a, w_b = st.bootstrap_weights(N_A, N_B, SETTINGS.n_bootstrap, SETTINGS.seed)
    fam = ds["in_family"].values
    for score in S.SCORES:
        pooled = sc[S.pooled_name(score)].values.astype(np.float64)
        ab = sc[score].values.astype(np.float64)
        obs, null, p_ref, lo_ref, hi_ref, where = [], [], [], [], [], []
        for b in range(4):
            for l in range(N_LAYER):
                for h in np.flatnonzero(fam[b]):
                    s = pooled[b, l, h]
                    t0 = ab[b, l, h].mean()
                    tn = np.array([s[ia == 1][:, ib == 1].mean() for ia, ib in zip(ind_a, ind_b)])
                    boots = [ab[b, l, h][np.repeat(np.arange(N_A), wa.astype(int))][:, np.repeat(np.arange(N_B), wb.astype(int))].mean() for wa, wb in zip(w_a, w_b)]
                    lo, hi = np.quantile(boots, [0.025, 0.975])
                    # two-sided (the default): distance from the mean m of the K + 1 values
                    both = np.append(tn, t0)
                    m, tol = both.mean(), 1e-12 * np.abs(both).max()
                    p = 1.0 if tn.std() == 0 else (1 + np.sum(np.abs(tn - m) >= np.abs(t0 - m) - tol)) / (1 + len(tn))
                    obs.append(t0), null.append(tn), p_ref.append(p), lo_ref.append(lo), hi_ref.append(hi), where.append((b, l, h))
        got = ds.sel(score=score)
        idx = tuple(np.array(where).T)
        np.testing.assert_allclose(got["mean"].values[idx], obs, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(got["p_value"].values[idx], p_ref)
        np.testing.assert_array_equal(got["q_value"].values[idx], scipy.stats.false_discovery_control(p_ref, method="bh"))
        np.testing.assert_allclose(got["ci_low"].values[idx], lo_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got["ci_high"].values[idx], hi_ref, rtol=1e-10, atol=1e-12)
        # max-T from the definition, loops only
        allv = np.column_stack([obs, null])  # [F, 1+K]: standardise over the K+1 values
        live = allv.std(axis=1) > 0
        sd = np.where(live, allv.std(axis=1), 1)
        z = np.abs(np.array(null) - allv.mean(1, keepdims=True)) / sd[:, None]  # two-sided: |z|
        z_obs = np.abs(np.array(obs) - allv.mean(1)) / sd
        mx = z[live].max(axis=0)
        pf = [1.0 if not live[f] else (1 + np.sum(mx >= z_obs[f] - 1e-9)) / (1 + mx.size) for f in range(len(obs))]
        np.testing.assert_array_equal(got["p_fwer"].values[idx], pf)
    inter = ds.sel(score="interference")
    planted = inter["p_value"].sel(block=PLANTED[0], layer=PLANTED[1], head=PLANTED[2])
    assert planted <= 0.02 and planted == inter["p_value"].min()
    assert inter["p_value"].sel(block=ABLATED[0], layer=ABLATED[1], head=ABLATED[2]) == 1.0
    assert inter["p_fwer"].sel(block=ABLATED[0], layer=ABLATED[1], head=ABLATED[2]) == 1.0


def test_other_groups_untouched_and_reopenable(run_and_result):
    run, ds, before = run_and_result
    for g, hashes in before.items():
        assert tree_hashes(run, g) == hashes, g
    back = open_stats(run)
    xr.testing.assert_identical(back, ds)
    assert back.attrs[S.ATTR_COMPLETE] is True
    assert S.STATS in xr.open_datatree(run, engine="zarr").children


def test_rerun_settings_conflicts(tmp_path):
    run = write_run(tmp_path)
    first = run_stats(run, SETTINGS)
    xr.testing.assert_identical(run_stats(run, SETTINGS).drop_attrs(), first.drop_attrs())  # same settings: fine
    other = SETTINGS.model_copy(update={"alternative": "greater", "seed": 5})
    with pytest.raises(StatsStageError, match="different settings.*replace"):
        run_stats(run, other)
    named = run_stats(run, other, name="greater")
    assert open_stats(run, "greater").attrs["alternative"] == "greater"
    assert open_stats(run).attrs["alternative"] == "two-sided"  # the default; the original is untouched
    assert not np.array_equal(named["p_value"].values, first["p_value"].values)
    run_stats(run, other, replace=True)
    assert open_stats(run).attrs["seed"] == 5


def test_refuses_incomplete_or_missing_scores(tmp_path):
    run = write_run(tmp_path, complete=False)
    with pytest.raises(StoreError, match="incomplete 'scores' group.*--resume"):
        run_stats(run, SETTINGS)
    with pytest.raises(StoreError, match="no qkov run"):
        run_stats(str(tmp_path / "empty.zarr"), SETTINGS)
    with pytest.raises(StoreError, match="no 'stats' group.*qkov stats"):
        open_stats(run)


def test_sample_chunked_scores_give_same_result():
    sc = synthetic_scores()
    whole = compute_stats(sc, SETTINGS)
    chunked = compute_stats(sc.chunk({S.SAMPLE_I: 4, S.SAMPLE_J: 3}), SETTINGS)
    for v in ("mean", "ci_low", "ci_high"):
        np.testing.assert_allclose(chunked[v].values, whole[v].values, rtol=1e-12)
    for v in ("p_value", "q_value", "p_fwer", "significant"):
        np.testing.assert_array_equal(chunked[v].values, whole[v].values)


def test_distributed_matches_default_scheduler(run_and_result):
    distributed = pytest.importorskip("distributed")
    run, ds, _ = run_and_result
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            got = run_stats(run, SETTINGS, DaskExecutor(client), name="dist")
    for v in ("mean", "ci_low", "ci_high"):
        np.testing.assert_allclose(got[v].values, ds[v].values, rtol=1e-12)
    # p-values are permutation counts, not sums: a permuted statistic within rounding of the
    # observed one counts as a tie in either process (stats.p_values' tolerance), so they match exactly
    for v in ("p_value", "q_value", "p_fwer", "significant", "in_family"):
        np.testing.assert_array_equal(got[v].values, ds[v].values)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device")])])
def test_device_stat_sums_equal_the_numpy_sums(device):
    """The statistics' sums' twins (qkov.workers.reductions): a GPU worker and the score tasks
    compute each chunk's sums with torch (`stat_sums`), CPU workers with numpy (`stat_sums_np`);
    on chunks on, off and across the diagonal (A and B rows mixed), they are equal."""
    from qkov.pipeline.slice_reductions import stats_weights
    from qkov.workers.reductions import stat_sums, stat_sums_np

    rng = np.random.default_rng(4)
    is_a = np.array([True] * 7 + [False] * 6)
    S_full = rng.standard_normal((1, 2, 3, 13, 13))
    weights = stats_weights(is_a.tobytes(), 49, 30, 5)
    for (r0, r1), (c0, c1) in [((0, 13), (0, 13)), ((0, 5), (5, 13)), ((4, 10), (2, 9)), ((7, 13), (7, 13)), ((9, 13), (0, 3))]:
        block = S_full[..., r0:r1, c0:c1]
        want = stat_sums_np(block, weights, is_a, (r0, c0))
        got = stat_sums(block, weights, is_a, (r0, c0), device)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
