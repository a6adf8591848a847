"""Compact `scores` storage (issue 17): pooled matrices stored once per block head (K/V per
KV head), the symmetric alignment's upper triangle once (folded), chunks compressed
losslessly; the per-query-head, full and A×B arrays are read-time views; `scores_dtype`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from qkov.pipeline import codec, schema
from qkov.pipeline.run import run_job
from qkov.pipeline.store import RunStore
from qkov.testing import tiny_job

N_A, N_B = 6, 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny GQA job (4 query heads, 2 KV heads) with float32 and bfloat16 scores."""
    tmp = tmp_path_factory.mktemp("compact")
    out = {}
    for dtype in ("float32", "bfloat16"):
        job = tiny_job(tmp, "llama_gqa", n_a=N_A, n_b=N_B, score={"scores_dtype": dtype},
                       stats={"n_permutations": 199, "n_bootstrap": 99}, output={"path": str(tmp / f"run-{dtype}")})
        run_job(job)
        out[dtype] = RunStore.of(job)
    return out


def _raw(store: RunStore) -> xr.Dataset:
    return xr.open_zarr(store.path, group=schema.SCORES_GROUP, consolidated=False)


def _stored_bytes(store: RunStore, matrices_only: bool = False) -> int:
    root = Path(store.path) / schema.SCORES_GROUP
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "/c/" in str(p)
               and (not matrices_only or p.relative_to(root).parts[0].startswith("pooled_")))


def test_stored_once_per_block_head_and_views_are_the_same_values(runs):
    store = runs["float32"]
    raw = _raw(store)
    # the pooled matrices, K/V on their KV heads, and (float32) the statistics' sums the score
    # tasks reduced beside them; no A×B copies
    pooled = {schema.stored_pooled_name(s, b) for s in schema.SCORES for b in schema.BLOCKS}
    assert set(raw.data_vars) == pooled | {schema.stat_sums_name(s, b) for s in schema.SCORES for b in schema.BLOCKS}
    assert set(_raw(runs["bfloat16"]).data_vars) == pooled  # its statistics read the rounded values back
    assert raw[schema.stored_pooled_name("interference", "K")].dims == ("layer", "kv_head", "sample_i", "sample_j")
    folded = raw[schema.stored_pooled_name("alignment", "K")]
    assert folded.dims == ("layer", "kv_head", "fold_row", "fold_col") and folded.attrs[schema.ATTR_FOLDED] == N_A + N_B
    assert folded.shape[2:] == schema.folded_shape(N_A + N_B)  # (2k+1)·k: N(N+1)/2 values and k+1 spare
    assert raw.sizes["kv_head"] == 2 and raw.sizes["head"] == 4
    view = store.open_scores()
    # the logical dataset users read (same dims and names as before the compact layout)
    assert view["interference"].dims == ("block", "layer", "head", "sample_a", "sample_b")
    assert view["pooled_alignment"].dims == ("block", "layer", "head", "sample_i", "sample_j")
    assert list(view.kv_head.values) == [0, 0, 1, 1] and list(view.block.values) == list(schema.BLOCKS)
    assert view.sizes["sample_a"] == N_A and view.sizes["sample_b"] == N_B
    assert list(view.sample_i.values) == list(view.sample_a.values) + list(view.sample_b.values)
    kv_of = view.kv_head.values
    for s in schema.SCORES:
        pooled = view[schema.pooled_name(s)].values
        assert np.array_equal(view[s].values, pooled[..., :N_A, N_A:])  # the A×B block, not a copy that could drift
        if s == "alignment":  # exactly symmetric: one stored value per pair
            assert np.array_equal(pooled, np.swapaxes(pooled, -1, -2))
        for bi, b in enumerate(schema.BLOCKS):
            stored = raw[schema.stored_pooled_name(s, b)].values
            if s == "alignment":
                stored = schema.unfold_symmetric(stored, N_A + N_B)
            want = stored[:, kv_of] if b in "KV" else stored
            assert np.array_equal(pooled[bi], want), (s, b)
    # the API's xarray tree shows the same logical group
    import qkov

    tree = qkov.open_run(store.path)
    assert set(tree["scores"].to_dataset().data_vars) == set(view.data_vars)
    assert tree["scores"]["interference"].dims == view["interference"].dims


def test_scores_bytes_against_the_per_query_head_layout(runs):
    """Before compression, the stored values are the pooled matrices per block head: for H query
    heads and KV heads, (2H + 2KV)·N² (interference) + (2H + 2KV)·(2k+1)·k (the folded
    alignment, k = ⌈N/2⌉) per layer, instead of 2·4H·(N² + n_a·n_b) (K/V per query head plus
    A×B copies): for SmolLM2's 9/3 heads at equal n_a = n_b, 24·1.5/90 = 0.40×. The chunks'
    compression takes it lower on real scores (benchmarks; these tiny random ones barely compress)."""
    store = runs["float32"]
    view = store.open_scores()
    n, h, kv, L = N_A + N_B, 4, 2, view.sizes["layer"]
    mats = [v for v in view.data_vars if not v.startswith(schema.stat_sums_name(""))]
    before = sum(view[v].nbytes for v in mats)  # what the previous layout stored (float32, uncompressed)
    assert before == 2 * L * 4 * h * (n * n + N_A * N_B) * 4
    rows, cols = schema.folded_shape(n)
    values = L * (2 * h + 2 * kv) * (n * n + rows * cols) * 4
    chunks = 2 * L * (2 * h + 2 * kv)
    for run, item in ((store, 4), (runs["bfloat16"], 2)):
        got = _stored_bytes(run, matrices_only=True)
        assert got <= values * item / 4 + chunks * (16 + 4)  # at most blosc's 16-byte header + the crc32c per chunk
    readers = store.direct_chunks(schema.SCORES_GROUP)
    assert all(r.blosc is not None for v, r in readers.items() if v.startswith("pooled_"))  # compressed chunks
    assert all(r.blosc is None for v, r in readers.items() if not v.startswith("pooled_"))


def test_statistics_from_the_score_tasks_sums_equal_those_from_the_stored_pairs(runs):
    """A float32 run's stats stage reads the sums its score tasks reduced, not the N×N scores;
    the same statistics computed from the stored pair scores agree to float rounding."""
    from qkov.pipeline.stats_stage import compute_stats
    from qkov.pipeline.spec import StatsSpec

    store = runs["float32"]
    scores = store.open_scores()
    settings = StatsSpec(**{k: v for k, v in store.open_stats().attrs.items() if k in StatsSpec.model_fields})
    assert scores.attrs[schema.ATTR_SUMS_SETTINGS] == {"n_permutations": 199, "n_bootstrap": 99,
                                                       "seed": settings.seed}
    from_sums = compute_stats(scores, settings)
    from_pairs = compute_stats(scores.drop_vars([v for v in scores.data_vars if v.startswith("stat_sums_")]), settings)
    for var in from_pairs.data_vars:
        x, y = from_sums[var].values, from_pairs[var].values
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9 * np.abs(np.nan_to_num(y)).max(), err_msg=var)
        else:
            assert np.array_equal(x, y), var


def test_bfloat16_scores_are_the_rounded_float32_scores_and_keep_the_statistics(runs):
    f32, bf16 = runs["float32"].open_scores(), runs["bfloat16"].open_scores()
    assert _raw(runs["bfloat16"])[schema.stored_pooled_name("alignment", "Q")].dtype == np.uint16
    for s in schema.SCORES:
        got = bf16[s].values
        assert np.array_equal(codec.decode(codec.encode(got, "bfloat16"), "bfloat16"), got), s  # bf16 values
        # the nearest bf16 of the other run's float32 score: the two runs' float32 scores may
        # differ in their last bits (another execution), which can move a value sitting on a
        # rounding boundary to the neighbouring bf16, never further
        want = f32[s].values
        assert np.all(np.abs(got - want) <= 2.0**-8 * np.abs(want) * (1 + 1e-5) + 1e-6 * np.abs(want).max()), s
        assert np.mean(got == codec.decode(codec.encode(want, "bfloat16"), "bfloat16")) > 0.99, s
    # statistics: means of n_a·n_b rounded scores move by far less than one bf16 ulp (2^-8 relative)
    a, b = runs["float32"].open_stats(), runs["bfloat16"].open_stats()
    for var in ("mean", "ci_low", "ci_high"):
        x, y = a[var].values, b[var].values
        scale = np.nanmax(np.abs(x), axis=(1, 2, 3), keepdims=True)
        assert np.nanmax(np.abs(x - y) / scale) < 2**-8, var
    # p-values are permutation counts: a permutation whose statistic ties T_obs to within the
    # rounding may change side, so they move by a few 1/(K+1) at most
    dp = np.abs(a["p_value"].values - b["p_value"].values)
    dp = dp[np.broadcast_to(a["in_family"].values[None, :, None, :], dp.shape)]
    assert np.nanmax(dp) <= 5 / 200, np.nanmax(dp)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_the_fold_keeps_the_upper_triangle_exactly(n):
    """`fold_symmetric` moves values, never computes them: unfolding gives back the upper
    triangle bit for bit and its mirror below, for numpy and for dask (any chunks)."""
    import dask.array as da

    a = np.random.default_rng(n).normal(size=(2, 3, n, n)).astype(np.float32)  # not symmetric
    want = np.where(np.arange(n)[:, None] <= np.arange(n)[None, :], a, np.swapaxes(a, -1, -2))
    f = schema.fold_symmetric(a)
    assert f.shape == (2, 3, *schema.folded_shape(n)) and f.size - 6 * n * (n + 1) // 2 <= 6 * (n + 2)  # ~half of n²
    assert np.array_equal(schema.unfold_symmetric(f, n), want)
    lazy = schema.unfold_symmetric(schema.fold_symmetric(da.from_array(a, chunks=(1, 2, 3, 4))).rechunk((1, 1, 2, 3)), n)
    assert isinstance(lazy, da.Array) and np.array_equal(lazy.compute(), want)
    import torch  # a score task folds on its device: the same values in the same places

    assert np.array_equal(schema.fold_symmetric(torch.from_numpy(a)).numpy(), f)
