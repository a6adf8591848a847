"""Sketch mode: the seeded sparse projections (qkov.workers.sketch) and the two-pass pipeline."""
from __future__ import annotations

from pathlib import Path

from qkov.pipeline.store import RunStore
from qkov.workers.fisher import inverse_damped_fisher
import numpy as np
import pytest
import torch
import xarray as xr
from scipy.stats import spearmanr

from qkov.pipeline import schema
from qkov.workers.sketch import operands, projection, sketch, slice_seed


def dense(proj, size: int) -> torch.Tensor:
    """The projection as an explicit (k, P) matrix, built independently of `sketch`."""
    m = torch.zeros(proj.dim, size, dtype=torch.float64)
    for r in range(proj.rows.shape[0]):
        for p in range(size):
            m[proj.rows[r, p], p] += proj.signs[r, p]
    return m


@pytest.mark.parametrize("nnz", [1, 3])
def test_sketch_is_the_dense_projection(nnz):
    P, k = 50, 8
    proj = projection(P, k, 7, "Q", 3, 1, nnz)
    x = torch.randn(4, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sketch(x, proj), x @ dense(proj, P).T)


@pytest.mark.parametrize("nnz", [1, 4])
def test_unbiased_inner_products_and_norms(nnz):
    """Averaged over seeds, S(x)·S(y) → x·y and ‖S(x)‖² → ‖x‖², within 4 standard errors
    of the mean (the spread measured over the same draws); the spread itself stays under
    the CountSketch variance bound (‖x‖²‖y‖² + (x·y)²)/k."""
    P, k, n = 120, 16, 3000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(P, dtype=torch.float64, generator=g)
    y = 0.6 * x + torch.randn(P, dtype=torch.float64, generator=g)
    dots, norms = np.empty(n), np.empty(n)
    for s in range(n):
        proj = projection(P, k, s, "K", 0, 0, nnz)
        sx, sy = sketch(x, proj), sketch(y, proj)
        dots[s], norms[s] = float(sx @ sy), float(sx @ sx)
    xy, xx, yy = float(x @ y), float(x @ x), float(y @ y)
    assert abs(dots.mean() - xy) < 4 * dots.std() / np.sqrt(n)
    assert abs(norms.mean() - xx) < 4 * norms.std() / np.sqrt(n)
    assert dots.var() < 1.2 * (xx * yy + xy**2) / k
    assert dots.std() > 0.01 * abs(xy)  # a genuinely random projection (k < P)


def test_injective_when_k_at_least_p():
    P = 40
    x, y = torch.randn(2, P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for k in (P, 3 * P):
        proj = projection(P, k, 5, "V", 1, 0)
        assert len(set(proj.rows[0].tolist())) == P
        assert float(sketch(x, proj) @ sketch(y, proj)) == pytest.approx(float(x @ y), rel=1e-12)


def test_deterministic_and_distinct_per_slice():
    P, k = 300, 32
    a = projection(P, k, 0, "Q", 2, 1)
    b = projection(P, k, 0, "Q", 2, 1)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.signs, b.signs)
    others = [projection(P, k, *key) for key in ((1, "Q", 2, 1), (0, "K", 2, 1), (0, "Q", 3, 1), (0, "Q", 2, 0))]
    for o in others:
        assert not torch.equal(a.rows, o.rows) and not torch.equal(a.signs, o.signs)
    assert slice_seed(0, "Q", 12, 1) != slice_seed(0, "Q", 1, 21)  # no digit-concatenation clash


def test_operands_give_the_exact_scores():
    g = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    inv = torch.rand(30, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1
    u, v, w = operands(g, inv)
    m_ref = torch.einsum("ip,jp,p->ij", g**2, g.abs(), inv)
    a_ref = torch.einsum("ip,jp,p->ij", g, g, inv)
    torch.testing.assert_close(u @ v.T, m_ref)
    torch.testing.assert_close(w @ w.T, a_ref)


# ---------------------------------------------------------------- the pipeline

HIDDEN = 128  # 4 heads of 32: P = 32 · 128 = 4096 entries per slice
P = 32 * HIDDEN
SMALL_K = 128


def _run(tmp: Path, name: str, **score) -> Path:
    from qkov.pipeline.run import run_job
    from qkov.testing import tiny_job

    job = tiny_job(tmp, "llama_gqa", model_kwargs={"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN},
                   score=score, output={"path": str(tmp / name), "keep_work": True})  # records read below
    run_job(job)
    return Path(job.output.path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sketch")
    return {
        "exact": _run(tmp, "exact"),
        "full": _run(tmp, "full", mode="sketch", sketch_dim=P),
        "small": _run(tmp, "small", mode="sketch", sketch_dim=SMALL_K, sketch_seed=3),
    }


def _scores(run: Path) -> xr.Dataset:
    

    return RunStore(str(run)).open_scores().load()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_full_dimension_sketch_equals_exact(runs):
    """k ≥ P: the hash is injective, so S(x)·S(y) = x·y and only the sketches' float32
    storage (one rounding per entry, ~6e-8 relative) separates the scores from exact mode's
    (float32 gradients): 1e-5 of each slice's largest score leaves a wide margin."""
    e, s = _scores(runs["exact"]), _scores(runs["full"])
    for name in schema.SCORES:
        ref = e[schema.pooled_name(name)].values
        scale = np.abs(ref).max(axis=(-2, -1), keepdims=True)
        assert np.all(np.abs(s[schema.pooled_name(name)].values - ref) <= 1e-5 * scale)


def _norms(run: Path, block: str) -> tuple[np.ndarray, np.ndarray]:
    """‖u_i‖, ‖v_i‖ per (layer, head, sample) from an exact run's gradients and Fisher."""
    

    g = RunStore(str(run)).open_gradients()[block].values.astype(np.float64)  # (n, L, H, P)
    inv = inverse_damped_fisher(RunStore(str(run)).open_fisher(), block).compute()
    u, v = g * g * inv, np.abs(g)
    return np.linalg.norm(u, axis=-1).transpose(1, 2, 0), np.linalg.norm(v, axis=-1).transpose(1, 2, 0)


def test_small_sketch_error_is_as_predicted(runs):
    """k = 128 ≪ P = 4096. A CountSketch estimate of x·y has standard deviation
    σ = √((‖x‖²‖y‖² + (x·y)²)/k) (slightly less with balanced buckets), so over many pairs
    the median of |error|/σ is that of a half-normal, 0.674: checked in [0.45, 0.8] for
    interference (x, y = u_i, v_j; norms from the exact run) and alignment (w_i, w_j,
    ‖w_i‖² = A_ii). Too small would mean no real sketching, too large a broken one."""
    e, s = _scores(runs["exact"]), _scores(runs["small"])
    for b in ("Q", "K"):
        nu, nv = _norms(runs["exact"], b)
        m_e = e[schema.pooled_name("interference")].sel(block=b).values
        m_s = s[schema.pooled_name("interference")].sel(block=b).values
        if b == "K":  # stored per query head: keep one query head per KV head
            heads = [int(np.flatnonzero(e[schema.KV_HEAD].values == k)[0]) for k in range(nu.shape[1])]
            m_e, m_s = m_e[:, heads], m_s[:, heads]
        sigma = np.sqrt(((nu[..., :, None] * nv[..., None, :]) ** 2 + m_e**2) / SMALL_K)
        assert 0.45 < np.median(np.abs(m_s - m_e) / sigma) < 0.8, b
    a_e, a_s = e[schema.pooled_name("alignment")].values, s[schema.pooled_name("alignment")].values
    diag = np.abs(np.einsum("...ii->...i", a_e))
    sigma = np.sqrt((diag[..., :, None] * diag[..., None, :] + a_e**2) / SMALL_K)
    assert 0.45 < np.median(np.abs(a_s - a_e) / sigma) < 0.8


def test_small_sketch_keeps_the_interference_ranking(runs):
    """Median relative interference pair error stays moderate (< 0.3) and heads ranked by
    mean interference (what the stats stage tests) keep their order: Spearman ρ > 0.9.
    (Alignment ranks are not tested here: on a random tiny model cross-task alignment
    cosines are ~0.03, below the sketch's 1/√k noise; the benchmark measures them on SmolLM2.)"""
    e, s = _scores(runs["exact"]), _scores(runs["small"])
    m_e, m_s = e["interference"].values, s["interference"].values
    assert 0.02 < np.median(np.abs(m_s - m_e) / np.abs(m_e)) < 0.3
    rho = spearmanr(m_e.mean(axis=(-2, -1)).ravel(), m_s.mean(axis=(-2, -1)).ravel()).statistic
    assert rho > 0.9, rho


def test_store_holds_only_sketches(runs):
    

    g = RunStore(str(runs["small"])).open_gradients()
    assert g.attrs["mode"] == "sketch" and g.attrs["sketch_dim"] == SMALL_K and g.attrs["sketch_seed"] == 3
    for b in schema.BLOCKS:  # no gradient: each sample's scalars per slice (its exact answers), and the sketches
        assert g[b].dims[-1] == schema.PART and g[b].sizes[schema.PART] == len(schema.answer_parts(["a", "b"]))
        for part in schema.SKETCH_PARTS:
            var = g[schema.sketch_var(b, part)]
            assert var.dims == (schema.SAMPLE, schema.LAYER, schema.head_dim(b), schema.SKETCH)
            assert var.sizes[schema.SKETCH] == SMALL_K
    # 3 · 128 numbers per slice instead of 4096 (9.4 %), plus coordinates
    exact, small = _size(runs["exact"] / schema.GRADIENTS), _size(runs["small"] / schema.GRADIENTS)
    assert small < 0.15 * exact
    import zarr

    work = zarr.open_group(str(runs["small"] / schema.WORK), mode="r")
    assert np.all(work[schema.DONE_FISHER][:] == 1) and np.all(work[schema.DONE][:] == 1)


def test_sketch_matches_the_stored_fisher(runs):
    """The stored u sketch is S(g²/Î_reg) of an exact run's gradients and Fisher (same model)."""
    
    from qkov.workers.sketch import sketch_block

    ge, gs = RunStore(str(runs["exact"])).open_gradients(), RunStore(str(runs["small"])).open_gradients()
    inv = inverse_damped_fisher(RunStore(str(runs["exact"])).open_fisher(), "K").compute()
    ref = sketch_block(ge["K"].values, inv, "K", tuple(int(l) for l in ge[schema.LAYER].values), SMALL_K, 3)
    for part in schema.SKETCH_PARTS:
        np.testing.assert_allclose(gs[schema.sketch_var("K", part)].values, ref[part], rtol=1e-5,
                                   atol=1e-6 * np.abs(ref[part]).max())


def test_stats_ran_on_sketches(runs):
    st = xr.open_zarr(str(runs["small"]), group=schema.STATS, consolidated=False)
    assert np.isfinite(st["p_value"].values).all()
    assert ((st["p_value"].values > 0) & (st["p_value"].values <= 1)).all()


def test_resume_redoes_only_the_unfinished_sketch_pass(runs, tmp_path):
    """A shard whose pass-2 record is missing is recomputed on resume to the same bytes;
    pass 1 (its record kept) is not rerun."""
    import shutil

    import zarr

    from qkov.pipeline.executors import executor_for
    from qkov.pipeline.extract import plan_extract, run_extract
    from qkov.pipeline.spec import parse_job

    run = tmp_path / "small"
    shutil.copytree(runs["small"], run)
    root = zarr.open_group(str(run), mode="r+")
    before = root[schema.GRADIENTS][schema.sketch_var("Q", "w")][:]
    root[schema.GRADIENTS][schema.sketch_var("Q", "w")][:4] = 0.0
    root[schema.WORK][schema.DONE][0] = 0
    config = RunStore(str(run)).config()
    config["output"]["path"] = str(run)
    job = parse_job(config)
    out = run_extract(RunStore.of(job), job, executor_for(None), plan=plan_extract(job), fresh=False)
    assert out["computed"] == 1
    np.testing.assert_array_equal(root[schema.GRADIENTS][schema.sketch_var("Q", "w")][:], before)


def test_resume_refuses_sketches_of_another_projection_scheme(runs, tmp_path):
    """A sketch-mode run begun with another projection scheme (or before schemes were
    recorded) is not finished with this one: its sketches would not compare."""
    import shutil

    import zarr

    from qkov.pipeline.executors import executor_for
    from qkov.pipeline.extract import plan_extract, run_extract
    from qkov.pipeline.spec import parse_job
    from qkov.pipeline.store import StoreError

    run = tmp_path / "old"
    shutil.copytree(runs["small"], run)
    root = zarr.open_group(str(run), mode="r+")
    assert root[schema.GRADIENTS].attrs["sketch_projection"] == "keyed-hash-runs-v3"
    del root[schema.GRADIENTS].attrs["sketch_projection"]  # as written before schemes were recorded
    root[schema.WORK][schema.DONE][0] = 0
    config = RunStore(str(run)).config()
    config["output"]["path"] = str(run)
    job = parse_job(config)
    with pytest.raises(StoreError, match="randperm-v1.*overwrite=True"):
        run_extract(RunStore.of(job), job, executor_for(None), plan=plan_extract(job), fresh=False)


def test_every_point_estimate_and_the_transfer_test_are_exact_in_sketch_mode(runs):
    """Sketch mode also keeps each sample's scalars (answers mode's, docs/answers.md): at k = 128
    ≪ P the means, effects, sharing, transfer and its test equal exact mode's to float rounding,
    while the labels tests come from the sketched pair scores (and differ from exact mode's)."""
    exact, small = (RunStore(str(runs[k])).open_stats() for k in ("exact", "small"))
    for v in ("mean", "effect", "sharing", "sharing_ab", "sharing_ba", "transfer", "transfer_p_value", "transfer_direction"):
        want, got = exact[v].values.astype(float), small[v].values.astype(float)
        assert np.allclose(got, want, rtol=2e-5, atol=2e-5 * np.nanmax(np.abs(want)), equal_nan=True), v
    assert not np.allclose(small["null_mean"].values, exact["null_mean"].values, rtol=1e-4)
    assert small.attrs["mode"] == "sketch" and "sketched alignment (k = 128" in small.attrs["approximate"]


def test_leaving_a_sample_out_uses_the_pair_scores_not_moments_that_still_hold_it(runs, tmp_path):
    """`qkov stats --exclude` in sketch mode: the stored moments are row sums over every sample,
    the excluded one too, so the statistics come from the (sketched) pair scores alone; at k = P
    those are exact mode's, and so are the answers without the sample."""
    import shutil

    import qkov

    ids = [str(x) for x in RunStore(str(runs["exact"])).open_scores()[schema.SAMPLE_I].values]
    got = {}
    for name in ("exact", "full"):
        shutil.copytree(runs[name], tmp_path / name)
        got[name] = qkov.run_stats(str(tmp_path / name), exclude=[ids[0]], name="without")
    for v in ("mean", "transfer", "sharing", "effect"):
        want = got["exact"][v].values.astype(float)
        assert np.allclose(got["full"][v].values, want, rtol=1e-4, atol=1e-5 * np.nanmax(np.abs(want)), equal_nan=True), v
