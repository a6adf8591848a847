"""`[score] keep_pairs` (issue 17): "top" / "none" reduce each score tile on the worker to the
statistics' sums (and the top pairs per slice); nothing N×N is written, and the statistics
equal those of "all" (same seeds)."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from qkov.pipeline import schema
from qkov.pipeline.errors import QkovError
from qkov.pipeline.run import run_job
from qkov.pipeline.store import RunStore
from qkov.testing import compare_datasets, tiny_job


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    out = {}
    for keep in ("all", "top", "none"):
        job = tiny_job(tmp, "llama_gqa", n_a=12, n_b=11, score={"keep_pairs": keep, "top_k": 5},
                       stats={"n_permutations": 99, "n_bootstrap": 49, "alternative": "two-sided"},
                       output={"path": str(tmp / f"run-{keep}")})
        run_job(job)
        out[keep] = RunStore.of(job)
    return out


def test_top_and_none_give_the_statistics_of_all(runs):
    want = runs["all"].open_stats()
    for keep in ("top", "none"):
        got = runs[keep].open_stats()
        assert not compare_datasets(got, want, what=f"stats ({keep})")


def test_nothing_n_by_n_is_stored_and_the_top_pairs_are_those_of_all(runs):
    import qkov

    raw = xr.open_zarr(runs["top"].path, group=schema.SCORES_GROUP, consolidated=False)
    assert not [v for v in raw.data_vars if schema.SAMPLE_J in raw[v].dims or schema.SAMPLE_I in raw[v].dims]
    # per slice and score 1 + K + 4(1 + B) + N sums (float64) and top_k pairs: O(N), not O(N²)
    assert raw[schema.stat_sums_name("interference", "Q")].shape[-1] == 1 + 99 + 4 * (1 + 49) + 23
    assert raw[schema.top_name("alignment", "a", "K")].shape == (2, 2, 5)
    for score in schema.SCORES:
        for head, block in ((1, "Q"), (3, "K")):
            got = qkov.query(runs["top"].path, layer=1, head=head, block=block, top=5, score=score)["blocks"][0]["top_pairs"]
            ref = qkov.query(runs["all"].path, layer=1, head=head, block=block, top=5, score=score)["blocks"][0]["top_pairs"]
            assert [(p["sample_a"], p["sample_b"]) for p in got] == [(p["sample_a"], p["sample_b"]) for p in ref]
            assert [p[score] for p in got] == pytest.approx([p[score] for p in ref], rel=1e-6, abs=1e-12)
    none = qkov.query(runs["none"].path, layer=1, head=1, block="Q", top=5)
    assert none["blocks"][0]["top_pairs"] == []


def test_statistics_with_other_seeds_need_the_pair_scores(runs):
    import qkov

    with pytest.raises(QkovError, match="kept no pair scores"):
        qkov.run_stats(runs["top"].path, seed=7, name="other")
    ok = qkov.run_stats(runs["top"].path, alpha=0.2, name="looser")  # alpha/alternative are not in the sums
    assert np.isfinite(ok["p_value"].values[..., :]).any()


def test_tiles_merge_to_the_same_sums_and_top_pairs(runs):
    """Score tiles of 5 samples (5 × 5 tiles per slice, A×B straddling them): the sums and top
    pairs reduced per tile and merged equal those of one whole-matrix tile."""
    from qkov.pipeline.score import compact_scores
    from qkov.pipeline.spec import StatsSpec
    from qkov.workers.parts import DiagnosticParts

    store = runs["all"]
    stats = StatsSpec(n_permutations=99, n_bootstrap=49, alternative="two-sided")
    grads, fisher = store.open_gradients(decode=False), store.open_fisher()
    whole = compact_scores(grads, fisher, keep_pairs="top", top_k=7, stats=stats).load()
    tiled = compact_scores(grads, fisher, keep_pairs="top", top_k=7, stats=stats, sample_chunk=5).load()
    for v in whole.data_vars:
        if v.startswith(("stat_sums", "top_interference_Q", "top_interference_K", "top_interference_V",
                         "top_interference_O", "top_alignment_Q", "top_alignment_K", "top_alignment_V", "top_alignment_O")):
            # other tile shapes multiply in another order: float32 rounding of the scores themselves
            scale = np.abs(whole[v].values).max()
            np.testing.assert_allclose(tiled[v].values, whole[v].values, rtol=1e-5, atol=1e-6 * scale, err_msg=v)
        else:  # the pairs' positions
            assert np.array_equal(tiled[v].values, whole[v].values), v
    ab = store.open_scores()["interference"].sel(block="V", layer=0, head=2).values
    ia, ib = np.unravel_index(np.argsort(-ab, axis=None, kind="stable")[:7], ab.shape)
    assert list(tiled[schema.top_name("interference", "a", "V")].values[0, 1]) == list(ia)  # V: KV head 1
    assert list(tiled[schema.top_name("interference", "b", "V")].values[0, 1]) == list(ib)


def test_tiles_reduced_on_the_device_equal_the_graph_reduction(runs):
    """With direct reads (a local store) each tile is reduced inside its score task
    (`reduced_block_scores`); whole or in 5-sample tiles, its sums and top pairs equal the
    Dask-graph reduction of the same tiles (`slice_statistics`, `top_pairs_lazy`)."""
    from qkov.pipeline.score import compact_scores
    from qkov.pipeline.spec import StatsSpec
    from qkov.workers.parts import DiagnosticParts

    store = runs["all"]
    stats = StatsSpec(n_permutations=99, n_bootstrap=49, alternative="two-sided")
    grads, fisher = store.open_gradients(decode=False), store.open_fisher()
    readers = store.direct_chunks(schema.GRADIENTS)
    for chunk in (None, 5):
        ref = compact_scores(grads, fisher, keep_pairs="top", top_k=7, stats=stats, sample_chunk=chunk).load()
        side: dict = {}
        got = compact_scores(grads, fisher, keep_pairs="top", top_k=7, stats=stats, sample_chunk=chunk, readers=readers,
                             side=side).load()
        assert set(got.data_vars) == set(ref.data_vars)
        assert isinstance(side["Q"], DiagnosticParts)  # the diagnostics' parts, reduced in the same tasks
        assert all(x is not None for x in (side["Q"].sq, side["Q"].rows, side["Q"].cols, side["Q"].diag))
        for v in ref.data_vars:
            scale = np.abs(ref[v].values).max()
            if ref[v].dtype.kind == "f":  # sums and pair values; positions exactly
                np.testing.assert_allclose(got[v].values, ref[v].values, rtol=1e-5, atol=1e-6 * scale, err_msg=v)
            else:
                assert np.array_equal(got[v].values, ref[v].values), v


def test_diagnostics_of_top_and_none_equal_those_of_all(runs):
    """The diagnostics a keep_pairs = "top" | "none" run reduces from its tiles on the device
    (norms, marginals, alignment diagonal) equal those computed from the stored pooled scores."""
    from qkov.pipeline.health import open_diagnostics

    want = open_diagnostics(runs["all"])
    for keep in ("top", "none"):
        got = open_diagnostics(runs[keep])
        for v in want.data_vars:
            a, b = np.asarray(got[v].values), np.asarray(want[v].values)
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.nanmax(np.abs(b)), err_msg=f"{keep} {v}")
            else:
                assert np.array_equal(a, b), f"{keep} {v}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device")])])
def test_tile_top_twins_agree(device):
    """The top pairs' twins (qkov.workers.reductions): the numpy `tile_top` of the Dask graph
    and the torch `tile_top_t` of the score tasks pick the same pairs of a tile, on tiles
    inside, across and outside the A×B block, with fewer A×B pairs than k or more."""
    import torch

    from qkov.workers.reductions import best_k, tile_top, tile_top_t

    rng = np.random.default_rng(7)
    n_a, n, k = 6, 13, 5
    pooled = rng.permutation(n * n).reshape(n, n).astype(np.float32)  # distinct values: no ties to order
    for (r0, r1), (c0, c1) in [((0, 13), (0, 13)), ((0, 4), (6, 13)), ((4, 9), (2, 8)), ((5, 6), (12, 13)), ((7, 13), (0, 6))]:
        tile = pooled[r0:r1, c0:c1]
        for largest in (True, False):
            want = best_k(tile_top(tile, n_a, (r0, c0), k, largest), k, largest)
            got = tile_top_t(torch.from_numpy(tile)[None].to(device), n_a, (r0, c0), k, largest)[0]
            np.testing.assert_array_equal(got, want)
