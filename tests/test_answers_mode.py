"""Answers mode (`[score] mode = "answers"`, issue 28): no per-sample gradient and no pair score
is stored, and every answer is made of each task's gradient sums and per-sample scalars.

Against exact mode on the same job and seeds: every point estimate, the transfer test and the
diagnostics are equal to float rounding; the CIs and the interference labels test are first-
order approximations, whose coverage and level are checked here on data with a known truth."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from qkov.pipeline import schema
from qkov.pipeline import stats as st
from qkov.pipeline.run import run_job
from qkov.pipeline.slice_reductions import stats_weights
from qkov.pipeline.store import RunStore
from qkov.testing import tiny_job
from qkov.workers.reductions import stat_sums_np

# exact in answers mode (schema docs: stats_stage.ANSWERS_EXACT)
EXACT = ("mean", "effect", "sharing", "sharing_ab", "sharing_ba", "transfer", "transfer_p_value", "transfer_q_value",
         "transfer_direction")
DIAGNOSTICS = (schema.GRAD_NORM, schema.FISHER_NORM, schema.ROW_MEAN, schema.COL_MEAN, schema.OUTLIER_SCORE,
               schema.FISHER_MIN, schema.FISHER_MEDIAN, schema.FISHER_MAX, schema.EFFECTIVE_DIM)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("answers")
    out = {"tmp": tmp}
    modes = {"exact": ({"mode": "exact"}, {}),
             "answers": ({"mode": "answers"}, {"keep_work": True}),  # (6 shards; `_work` kept for the resume test)
             # the interference sketched at k = P (every slice of this model has 256 entries): exact; and
             # one shard, whose task makes both passes
             "top": ({"mode": "answers", "keep_pairs": "top", "sketch_dim": 256, "top_k": 5}, {"keep_work": True})}
    for name, (score, output) in modes.items():  # (the Fisher of task A: a third task leaves it as it is)
        job = tiny_job(tmp, "llama_gqa", n_a=12, n_b=11, score=score, fisher={"source": "a"},
                       extract={"shard_size": 64 if name == "top" else 4, "batch_size": 3},
                       stats={"n_permutations": 99, "n_bootstrap": 99}, output={"path": str(tmp / f"run-{name}"), **output})
        out[f"{name}-summary"] = run_job(job)
        out[name] = RunStore.of(job)
        out[f"{name}-job"] = job
    return out


def test_the_extract_stage_says_where_its_time_went(runs):
    """Each run's extract stage names its parts (each pass's batches, answers_whole's consolidation
    between its passes, the shards' writes, the client's consolidations), in seconds (≥ 0)."""
    want = {"exact": {"exact", "write", "consolidate"}, "answers": {"fisher", "answers", "write", "consolidate"},
            "top": {"fisher", "between", "answers", "write", "consolidate"}}
    for name, parts in want.items():
        got = runs[f"{name}-summary"].extract["seconds"]
        assert set(got) == parts and all(np.isfinite(v) and v >= 0 for v in got.values()), (name, got)


def _close(a, b, rtol=2e-5) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.nanmax(np.abs(a)) if np.isfinite(a).any() else 1.0
    return a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


def test_every_point_estimate_the_transfer_test_and_the_diagnostics_equal_exact_modes(runs):
    want, got = runs["exact"].open_stats(), runs["answers"].open_stats()
    for v in EXACT:
        assert _close(got[v].values, want[v].values), v
    both = np.isfinite(want["cosine"].values) & np.isfinite(got["cosine"].values)
    assert _close(got["cosine"].values[both], want["cosine"].values[both])  # (random weights: mostly no direction;
    # the cosine's point estimate is checked on clear directions in test_moment_sums_are_exact_where_they_claim_to_be)
    assert got.attrs["mode"] == "answers" and "transfer test" in got.attrs["exact"]
    dw, dg = xr.open_zarr(runs["exact"].path, group=schema.DIAGNOSTICS), xr.open_zarr(runs["answers"].path, group=schema.DIAGNOSTICS)
    for v in DIAGNOSTICS:
        assert _close(dg[v].values, dw[v].values, rtol=1e-4), v
    assert (dg[schema.OUTLIER].values == dw[schema.OUTLIER].values).all()


def test_nothing_per_sample_and_parameter_and_no_pair_score_is_stored(runs):
    store = runs["answers"]
    grads = xr.open_zarr(store.path, group=schema.GRADIENTS, consolidated=False)
    for b in ("Q", "K", "V", "O"):  # a few scalars per sample and slice, not its P gradient entries
        assert grads[b].dims[-1] == schema.PART and grads[b].shape[-1] == len(schema.answer_parts(["a", "b"]))
    scores = xr.open_zarr(store.path, group=schema.SCORES_GROUP, consolidated=False)
    assert sorted({str(v).rsplit("_", 1)[0] for v in scores.data_vars}) == ["moments_alignment", "moments_interference"]
    assert not [v for v in scores.data_vars if schema.SAMPLE_J in scores[v].dims]
    for score in schema.SCORES:  # what a reader of qkov.open_scores sees: each number says what it answers
        attrs = store.open_scores()[schema.moments_name(score)].attrs
        assert score in attrs["question"] and attrs["units"] and attrs["direction"].startswith("as the score")
    fisher = xr.open_zarr(store.path, group=schema.FISHER, consolidated=False)  # P per block: dropped, λ kept
    assert fisher.attrs[schema.ATTR_VALUES_DROPPED] and schema.DAMPING in fisher and "Q" not in fisher


def test_labels_null_for_interference_by_projection_and_none_for_the_alignment(runs):
    got = runs["answers"].open_stats()
    assert np.isnan(got["p_value"].sel(score="alignment").values).all()
    p = got["p_value"].sel(score="interference").values[got["in_family"].broadcast_like(got["mean"].sel(score="interference")).values]
    assert np.isfinite(p).all() and ((p > 0) & (p <= 1)).all()
    assert "Hajek" in got.attrs["approximate"]


def test_keep_pairs_top_sketches_the_interference_for_its_labels_test_and_top_pairs(runs):
    """keep_pairs = "top" in answers mode: the interference's operands u, v sketched (here at
    k = P, where the permutation sketch is exact), its labels test and top pairs from them; the
    alignment still needs no pair and every answer of "none" is unchanged."""
    import qkov

    want, got, plain = runs["exact"].open_stats(), runs["top"].open_stats(), runs["answers"].open_stats()
    inter = dict(score="interference")
    for v in ("p_value", "q_value", "p_fwer", "null_mean", "significant", "direction", "layer_p_value"):
        assert _close(got[v].sel(**inter).values, want[v].sel(**inter).values, rtol=1e-5), v
    for v in EXACT:  # (one shard's float32 task sums, summed in another order: last digits)
        assert _close(got[v].values, plain[v].values, rtol=2e-6), v
    assert "sketched interference (k = 256" in got.attrs["approximate"]
    for head, block in ((1, "Q"), (3, "K")):
        top = [qkov.query(r.path, layer=1, head=head, block=block, top=5, score="interference")["blocks"][0]["top_pairs"]
               for r in (runs["top"], runs["exact"])]
        assert [(p["sample_a"], p["sample_b"]) for p in top[0]] == [(p["sample_a"], p["sample_b"]) for p in top[1]]
    grads = xr.open_zarr(runs["top"].path, group=schema.GRADIENTS, consolidated=False)
    assert grads[schema.sketch_var("Q", "u")].shape[-1] == 256 and schema.sketch_var("Q", "w") not in grads


def test_the_statistics_come_from_the_stored_moments_a_planted_change_shows(runs, tmp_path):
    """Statistics rerun without the model (any seed and counts: the moments hold no draw);
    scaling one sample's stored moments moves exactly the answers it enters."""
    import shutil

    import qkov
    import zarr

    copy = tmp_path / "planted"
    shutil.copytree(runs["answers"].path, copy)
    again = qkov.run_stats(str(copy), seed=5, n_permutations=49, name="again")
    base = RunStore(str(copy)).open_stats()
    assert _close(again["transfer"].values, base["transfer"].values, rtol=1e-12)
    arr = zarr.open_group(str(copy), mode="r+")[f"{schema.SCORES_GROUP}/{schema.moments_name('alignment', 'Q')}"]
    m = arr[:]
    m[1, 0, 0, 1:] *= 3.0  # layer 1, head 0, sample 0 (task A): its row and column sums
    arr[:] = m
    RunStore(str(copy)).group_attrs(schema.SCORES_GROUP)  # (no cache to refresh: the next read sees it)
    planted = qkov.run_stats(str(copy), name="planted")
    moved = ~np.isclose(planted["transfer"].values, base["transfer"].values, rtol=1e-9)
    where = np.argwhere(moved)
    assert where.size and {tuple(x) for x in where[:, :2]} == {(list(base["block"].values).index("Q"), 1)}


# ---------------------------------------------------------------- the math, against the pair matrices


def _moments(S: np.ndarray, is_a: np.ndarray) -> np.ndarray:
    """Per-sample moments (`schema.MOMENTS` order) of pair matrices S [..., N, N]."""
    return np.stack([np.einsum("...ii->...i", S), S[..., is_a].sum(-1), S[..., ~is_a].sum(-1),
                     S[..., is_a, :].sum(-2), S[..., ~is_a, :].sum(-2)], -1)


def test_moment_sums_are_exact_where_they_claim_to_be():
    rng = np.random.default_rng(0)
    n_a, n_b, k, b = 7, 5, 19, 29
    is_a = np.arange(n_a + n_b) < n_a
    S = rng.gamma(2.0, size=(n_a + n_b, n_a + n_b))  # an interference-like, asymmetric matrix
    weights = stats_weights(is_a.tobytes(), k, b, 3)
    left, _, wa, wb = weights
    got = st.moment_sums(_moments(S, is_a)[None], is_a, left, wa, wb)[0]
    want = stat_sums_np(S, weights, is_a, (0, 0))
    obs, perms, boot, margins = schema.stat_sums_parts(k, b)
    np.testing.assert_allclose(got[margins], want[margins], rtol=1e-12)
    np.testing.assert_allclose(got[boot][:4], want[boot][:4], rtol=1e-12)  # row 0: ab, ba, aa, bb
    for score, mat in (("interference", S), ("alignment", None)):
        if mat is None:  # a Gram matrix with clear task means: cosine defined
            g = rng.normal(size=(n_a + n_b, 16)) + np.where(is_a[:, None], 1.0, -0.5) * np.linspace(1, 2, 16)
            mat = g @ g.T
        sums = {"moments": st.moment_sums(_moments(mat, is_a)[None], is_a, left, wa, wb)[0],
                "pairs": stat_sums_np(mat, weights, is_a, (0, 0))}
        eff = {k: st.effect_summary(score, v[boot].reshape(1, 1 + b, 4), v[margins][None], is_a, b, 3, 0.95, min_z=None)
               for k, v in sums.items()}
        for var in ("effect", "sharing", "sharing_ab", "transfer", "cosine", "transfer_p_value"):
            if var in eff["pairs"]:
                assert np.isfinite(eff["pairs"][var]).all()
                np.testing.assert_allclose(eff["moments"][var], eff["pairs"][var], rtol=1e-10, err_msg=var)
    # the projection's permutation mean is T's exact permutation mean (the pooled off-diagonal mean)
    ind = np.array([[i in c for i in range(n_a + n_b)] for c in __import__("itertools").combinations(range(n_a + n_b), n_a)],
                   dtype=np.float64)
    t_lin = st.moment_sums(_moments(S, is_a)[None], is_a, ind, wa, wb)[0][: ind.shape[0]]
    off = (S.sum() - np.trace(S)) / ((n_a + n_b) * (n_a + n_b - 1))
    assert t_lin.mean() == pytest.approx(off, rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_task_sums_add_each_tasks_rows_as_the_definitions_do(dtype):
    """The first pass's per-task sums Σg, Σ|g|, Σg² (qkov.workers.answers.task_sums_update, runs of
    rows per task) against float64 sums over each task's rows, for a batch whose tasks
    alternate, accumulated over two batches; and the Fisher's Σ g² over rows."""
    import torch

    from qkov.workers import answers as ans

    rng = np.random.default_rng(7)
    B, H, P, tasks = 6, 2, 300, 3
    task_of = [2, 2, 0, 1, 1, 2]
    acc = torch.zeros((3, tasks, H, P), dtype=torch.float32)
    want = np.zeros((3, tasks, H, P))
    for _ in range(2):
        g = torch.tensor(rng.normal(size=(B, H, P)) * 1e-3, dtype=torch.float32).to(getattr(torch, dtype))
        ans.task_sums_update(acc, g, ans.row_runs(task_of))
        x = g.double().numpy()
        for r, k in enumerate(task_of):
            want[:, k] += (x[r], np.abs(x[r]), x[r] ** 2)
    assert ans.row_runs(task_of) == [(2, 0, 2), (0, 2, 3), (1, 3, 5), (2, 5, 6)]
    for kind in range(3):
        np.testing.assert_allclose(acc[kind].numpy(), want[kind], rtol=1e-5, atol=1e-6 * np.abs(want[kind]).max())
    np.testing.assert_allclose(ans.squares_sum(g[1:4]).numpy(), (x[1:4] ** 2).sum(0), rtol=1e-5)


@pytest.mark.parametrize("P", [4096, 4099, 6000])  # split into runs; prime (one run); a divisor far from 1024
def test_each_samples_scalars_equal_an_elementwise_float64_reference(P):
    """The second pass's GEMMs (split-K over each head's entries, qkov.workers.answers.head_gemm)
    against the definitions: Σg², A_ii, M_ii and the per-task inner products with the sums."""
    import torch

    from qkov.workers import answers as ans

    rng = np.random.default_rng(P)
    B, H, tasks = 5, 3, 2
    g = rng.normal(size=(B, H, P)) * rng.uniform(0.1, 3.0, size=(1, H, 1))
    inv = rng.uniform(0.5, 2.0, size=(H, P))
    sums = np.stack([rng.normal(size=(tasks, H, P)), np.abs(rng.normal(size=(tasks, H, P))),
                     rng.uniform(size=(tasks, H, P))])
    args = torch.tensor(g, dtype=torch.float32), torch.tensor(inv, dtype=torch.float32), torch.tensor(sums, dtype=torch.float32)
    got = ans.sample_scalars(*args).numpy()
    # the same from the weights as a worker caches them (contiguous GEMM operands)
    cached = ans.sample_scalars(args[0], None, None, ans.cached_columns(ans.scalar_weights(*args[1:]))).numpy()
    np.testing.assert_allclose(cached, got, rtol=1e-6, atol=1e-6 * np.abs(got).max())
    # and from a reused buffer (what a worker does where they are not cached), after other weights
    buf = ans.weights_buffer(tasks, (H, P), "cpu")
    ans.scalar_weights(args[1] * 2, args[2] + 1, out=buf)
    reused = ans.sample_scalars(args[0], None, None, ans.scalar_weights(*args[1:], out=buf)).numpy()
    np.testing.assert_array_equal(reused, got)
    u, v = g * g * inv, np.abs(g)
    own = [(g * g).sum(-1), u.sum(-1), (u * v).sum(-1)]
    per_task = [x for k in range(tasks) for x in ((g * inv * sums[0, k]).sum(-1), (u * sums[1, k]).sum(-1),
                                                 (v * inv * sums[2, k]).sum(-1))]
    want = np.stack(own + per_task, axis=-1)
    assert got.shape == want.shape == (B, H, len(schema.answer_parts(range(tasks))))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    assert P % ans.split_length(P) == 0


def test_margin_correction_makes_a_sketch_s_first_order_part_exact():
    """A sketched interference matrix corrected by the exact moments (`stats.margin_corrected`):
    an exact matrix is left as it is; a noisy one gets the exact diagonal, row and column
    sums, so the labels test's linear part and every block mean come from exact numbers; its labels p-values then track the exact
    matrix's closer than the raw sketch's over many slices; dask gives numpy's values."""
    import dask.array as da

    rng = np.random.default_rng(4)
    n_a, n_b, k = 9, 8, 199
    n = n_a + n_b
    is_a = np.arange(n) < n_a
    g = rng.gamma(1.5, size=(40, n, 64)) * np.where(is_a[:, None], 1.0, 1.3)  # 40 slices
    S = np.einsum("snp,smp->snm", g * g, g)
    np.testing.assert_allclose(st.margin_corrected(S, _moments(S, is_a)), S, rtol=1e-12)
    noisy = S * rng.lognormal(0.0, 0.6, size=S.shape)  # a sketch's multiplicative noise
    fixed = st.margin_corrected(noisy, _moments(S, is_a))
    np.testing.assert_allclose(np.einsum("...ii->...i", fixed), np.einsum("...ii->...i", S), rtol=1e-12)
    np.testing.assert_allclose(fixed.sum(-1), S.sum(-1), rtol=1e-12)
    np.testing.assert_allclose(fixed.sum(-2), S.sum(-2), rtol=1e-12)
    assert np.abs(noisy.sum(-1) - S.sum(-1)).max() > 0.01 * S.sum(-1).max()  # the noise is there to correct
    lazy = st.margin_corrected(da.from_array(noisy, chunks=(1, n, n)), da.from_array(_moments(S, is_a), chunks=(1, n, 5)))
    np.testing.assert_allclose(lazy.compute(), fixed, rtol=1e-12)
    weights = stats_weights(is_a.tobytes(), k, 1, 0)

    def p_values(mats):
        sums = np.stack([stat_sums_np(m, weights, is_a, (0, 0)) for m in mats])
        return st.p_values(sums[:, 0], sums[:, 1 : 1 + k].T, "two-sided")

    exact, raw, corrected = p_values(S), p_values(noisy), p_values(fixed)
    assert np.abs(corrected - exact).mean() < 0.5 * np.abs(raw - exact).mean()


def _gradients(rng, mu_a, mu_b, n_a, n_b):
    p = mu_a.size
    return np.vstack([mu_a + rng.normal(size=(n_a, p)), mu_b + rng.normal(size=(n_b, p))])


@pytest.mark.parametrize("signal", [0.0, 0.3], ids=["means-vanish", "means-clear"])
def test_transfer_ci_from_moments_covers_the_true_transfer(signal):
    """Gaussian gradients with known task means: the 95 % CI of transfer = ⟨μ_A, μ_B⟩ made from
    the moments covers the truth at least nominally (conservative where both means vanish, the
    Hoeffding variance's interaction term), over 200 independent data sets."""
    rng = np.random.default_rng(11)
    n_a = n_b = 30
    p, reps, boots = 64, 200, 199
    mu_a = rng.normal(size=p) * signal
    mu_b = 0.5 * mu_a + rng.normal(size=p) * signal
    is_a = np.arange(n_a + n_b) < n_a
    hits = []
    for rep in range(reps):
        g = _gradients(rng, mu_a, mu_b, n_a, n_b)
        left, _, wa, wb = stats_weights(is_a.tobytes(), 1, boots, rep)
        sums = st.moment_sums(_moments(g @ g.T, is_a)[None], is_a, left, wa, wb)[0]
        _, _, boot, margins = schema.stat_sums_parts(1, boots)
        eff = st.effect_summary("alignment", sums[boot].reshape(1, 1 + boots, 4), sums[margins][None], is_a, boots, rep, 0.95)
        hits.append(eff["transfer_ci_low"][0] <= mu_a @ mu_b <= eff["transfer_ci_high"][0])
    assert 0.92 <= np.mean(hits) <= 1.0


def test_the_interference_projection_test_holds_its_level():
    """Both tasks drawn from one distribution (the labels null): the projection test rejects at
    about its level alpha = 0.1 (binomial 99.9 % band over 300 data sets)."""
    rng = np.random.default_rng(5)
    n_a, n_b, p, k = 14, 10, 32, 99
    is_a = np.arange(n_a + n_b) < n_a
    rejected = 0
    for rep in range(300):
        g = rng.standard_t(4, size=(n_a + n_b, p))
        M = (g * g) @ np.abs(g).T
        left, _, wa, wb = stats_weights(is_a.tobytes(), k, 1, rep)
        sums = st.moment_sums(_moments(M, is_a)[None], is_a, left, wa, wb)[0]
        pv = st.p_values(sums[:1], sums[1 : 1 + k][:, None], "two-sided")[0]
        rejected += pv <= 0.1
    assert 0.1 * 300 - 3.3 * np.sqrt(300 * 0.09) <= rejected <= 0.1 * 300 + 3.3 * np.sqrt(300 * 0.09)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("over,match", [
    ({"score": {"mode": "answers"}, "fisher": {"source": "pair"}}, "one Fisher"),
    ({"score": {"mode": "answers"}, "output": {"keep_gradients": False}}, "stores no"),
])
def test_answers_mode_refuses_settings_it_cannot_honour(tmp_path, over, match):
    from qkov.pipeline.errors import QkovError

    with pytest.raises((QkovError, ValueError), match=match):
        tiny_job(tmp_path, "llama_gqa", n_a=4, n_b=4, **over)


def test_three_tasks_one_extraction_answers_every_pair(runs):
    """More than two tasks: one extraction's scalars (against every task's sums) serve every
    pair; the pair of the two-task runs' tasks answers exactly as they do."""
    job = tiny_job(runs["tmp"], "llama_gqa", n_a=12, n_b=11, more=(7,), score={"mode": "answers"}, fisher={"source": "a"},
                   stats={"n_permutations": 99, "n_bootstrap": 99}, output={"path": str(runs["tmp"] / "run3")})
    run_job(job)
    store = RunStore.of(job)
    got, want = store.select("a,b").open_stats(), runs["exact"].open_stats()
    for v in EXACT:
        assert _close(got[v].values, want[v].values), v
    for pair in ("a,c", "b,c"):
        assert np.isfinite(store.select(pair).open_stats()["transfer"].values).all()


def test_an_interrupted_second_pass_resumes_to_the_same_answers(runs, tmp_path):
    """A second pass cut short (a shard without its done-record, its chunk gone) resumes from the
    first pass's records: the task sums are consolidated again and only that shard is recomputed."""
    import shutil

    import zarr

    shutil.copytree(runs["answers"].path, tmp_path / "run")
    job = runs["answers-job"].model_copy(update={"output": runs["answers-job"].output.model_copy(update={"path": str(tmp_path / "run")})})
    want = runs["answers"].open_stats()
    root = zarr.open_group(job.output.path, mode="r+")
    root[schema.WORK][schema.DONE][1] = 0
    shutil.rmtree(tmp_path / "run" / schema.GRADIENTS / "Q" / "c" / "1")  # shard 1's scalars, lost
    for group in (schema.GRADIENTS, schema.SCORES_GROUP):
        root[group].attrs[schema.ATTR_COMPLETE] = False
    summary = run_job(job, resume=True)
    assert summary.extract["computed"] == 1
    got = RunStore.of(job).open_stats()
    for v in EXACT:
        assert _close(got[v].values, want[v].values, rtol=1e-12), v
    assert RunStore.of(job).group_attrs(schema.FISHER)[schema.ATTR_VALUES_DROPPED]


def test_one_shard_makes_both_passes_in_one_task_without_writing_task_sums(runs):
    """shard_size ≥ the samples ("top" here): both passes run in one task with the task sums in
    its memory; `_work` never holds a P-sized array per task. Over several shards it does, until
    the run ends ("answers": `_work` kept)."""
    import zarr

    for name, held in (("top", False), ("answers", True)):
        work = zarr.open_group(runs[name].path, mode="r")[schema.WORK]
        assert (schema.TASK_SUMS in work.group_keys()) == held == any(k.startswith("task_sums") for k in work.array_keys())


def test_leaving_samples_out_afterwards_needs_pair_scores(runs):
    """`qkov stats --exclude` in answers mode: the moments hold every sample's row sums, so a
    sample cannot be left out of them; refused in one line naming the mode, nothing written."""
    import qkov
    from qkov.pipeline.errors import UsageError

    ids = [str(x) for x in runs["answers"].open_scores()[schema.SAMPLE_I].values]
    with pytest.raises(UsageError, match="stored pair scores.*mode = 'answers'"):
        qkov.run_stats(runs["answers"].path, exclude=[ids[0]], name="without")
    assert not runs["answers"].has_group(schema.stats_group("without"))


@pytest.mark.parametrize("group_bytes", [1, 8 * 9 * 9 * 2, 1 << 30])  # a head per task, 2 of 3 heads, all heads
def test_sketched_interference_in_one_task_per_head_group_equals_the_chained_graph(group_bytes):
    """The answers-mode score graph reduces each group of heads' sketched interference (u·vᵀ,
    margin-corrected) to its stats sums and top pairs in one task: the same numbers as the
    chained per-slice graph it replaced (`slice_statistics`, `top_pairs_lazy` of
    `margin_corrected`), to the bit, however the heads are grouped."""
    import dask.array as da

    from qkov.pipeline.slice_reductions import sketched_interference, slice_statistics, top_pairs_lazy
    from qkov.pipeline.stats import margin_corrected

    rng = np.random.default_rng(3)
    L, H, n, dim, n_a, k = 2, 3, 9, 5, 4, 6
    u, v = (rng.random((L, H, n, dim)).astype(np.float32) for _ in range(2))
    m = rng.random((L, H, n, 5)).astype(np.float32)
    is_a = np.arange(n) < n_a
    sums, top = sketched_interference(da.from_array(u, chunks=(1, 1, 4, dim)), da.from_array(v, chunks=(1, 1, 4, dim)),
                                      da.from_array(m), is_a, 19, 17, 5, k, group_bytes=group_bytes)
    pairs = margin_corrected(da.from_array(u, chunks=(1, 1, -1, -1)) @ da.from_array(v, chunks=(1, 1, -1, -1)).swapaxes(-1, -2),
                             da.from_array(m, chunks=(1, 1, -1, -1)))
    want_sums = slice_statistics(pairs[None], is_a, 19, 17, 5)[0].compute()
    want_top = top_pairs_lazy(pairs, n_a, k, largest=True).compute()
    assert np.array_equal(sums.compute(), want_sums) and np.array_equal(top.compute(), want_top, equal_nan=True)
