"""Numerical health and sample diagnostics (issue 19), checked against numpy on the stored groups:
a planted ill-conditioned slice, a planted ×50 gradient outlier, marginals equal to the stored
scores' row/column means, `qkov stats --exclude` equal to statistics of the stored scores with
those rows and columns removed, and what `qkov query` / `qkov report` show of them."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from qkov.pipeline import schema as S
from qkov.pipeline.diagnostics import fisher_health, modified_z, other_task_means
from qkov.pipeline.exclude import resolve_samples
from qkov.pipeline.health import HEALTH_VARS as D_HEALTH, OUTLIER_Z, head_diagnostics
from qkov.pipeline.errors import QkovError, UsageError
from qkov.pipeline.executors import InlineExecutor
from qkov.pipeline.store import RunStore

pytestmark = [
    pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata:zarr.errors.ZarrUserWarning"),
]

ILL = ("Q", 0, 1)  # planted: tiny Fisher, large λ
OUT_SLICES = [("Q", 1, 2), ("V", 0, 1)]  # planted: one sample's gradients × 50 (V: KV head 1 = query heads 2, 3)
N_A, N_B = 10, 8


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One real tiny run (Llama GQA: 4 query heads, 2 KV heads, 2 layers)."""
    from qkov.pipeline.run import run_job
    from qkov.testing import tiny_job

    tmp = tmp_path_factory.mktemp("diag")
    job = tiny_job(tmp, "llama_gqa", n_a=N_A, n_b=N_B)
    run_job(job)
    return job


def _copy(job, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(job.output.path, dst)
    return RunStore(str(dst))


def _rescore(store, job):
    from qkov.pipeline.score import run_score

    run_score(store, job, InlineExecutor())
    return store.open_dataset(S.DIAGNOSTICS).load()


def _kv(block, head, kv_of):
    return int(kv_of[head]) if S.head_dim(block) == S.KV_HEAD else head


@pytest.fixture(scope="module")
def planted(base_run, tmp_path_factory):
    """The run with an ill-conditioned Q slice and a ×50 outlier sample in OUT_SLICES, rescored."""
    tmp = tmp_path_factory.mktemp("planted")
    store = _copy(base_run, tmp, "run")
    before = store.open_dataset(S.DIAGNOSTICS).load()
    # the planted sample: a B sample flagged nowhere before (so every new flag is the planting's)
    flagged_before = before[S.OUTLIER].any((S.BLOCK, S.LAYER, S.HEAD)).values
    cands = [k for k in range(N_A, N_A + N_B) if not flagged_before[k]]
    assert cands, "every B sample is already an outlier somewhere"
    k = cands[0]
    root = store.root("r+")
    kv_of = np.asarray(root[S.GRADIENTS][S.KV_HEAD_OF][:])
    for b, layer, head in OUT_SLICES:
        arr = root[S.GRADIENTS][b]
        li = list(root[S.GRADIENTS][S.LAYER][:]).index(layer)
        arr[k, li, _kv(b, head, kv_of)] = arr[k, li, _kv(b, head, kv_of)] * 50.0
    fisher = store.open_fisher().load()
    b, layer, head = ILL
    fisher[b].loc[{S.LAYER: layer, S.HEAD: head}] = fisher[b].sel({S.LAYER: layer, S.HEAD: head}) * 1e-6
    fisher[S.DAMPING].loc[{S.BLOCK: b, S.LAYER: layer}] = fisher[S.DAMPING].sel({S.BLOCK: b, S.LAYER: layer}) * 1e3
    store.write_dataset(fisher, S.FISHER, complete=True)
    diag = _rescore(store, base_run)
    return store, diag, k, before


# ---------------------------------------------------------------- health


def test_planted_ill_conditioned_slice_is_flagged_and_share_matches_numpy(planted):
    store, diag, _, _ = planted
    fisher = store.open_fisher().load()
    kv_of = diag[S.KV_HEAD].values
    for b in diag[S.BLOCK].values:
        b = str(b)
        for layer in diag[S.LAYER].values:
            lam = float(fisher[S.DAMPING].sel({S.BLOCK: b, S.LAYER: layer}))
            for h in diag[S.HEAD].values:
                f = np.asarray(fisher[b].sel({S.LAYER: layer}).values[_kv(b, int(h), kv_of)], dtype=np.float64)
                d = diag.sel({S.BLOCK: b, S.LAYER: layer, S.HEAD: h})
                share = float(np.mean(lam > f))
                assert float(d[S.DAMPED_SHARE]) == pytest.approx(share, abs=1e-12)
                assert float(d[S.EFFECTIVE_DIM]) == pytest.approx(float(np.sum(f / (f + lam))), rel=1e-9)
                assert float(d[S.FISHER_MIN]) == pytest.approx(f.min(), rel=1e-6)
                assert float(d[S.FISHER_MEDIAN]) == pytest.approx(np.median(f), rel=1e-6)
                assert float(d[S.FISHER_MAX]) == pytest.approx(f.max(), rel=1e-6)
                assert float(d[S.DAMPING]) == pytest.approx(lam, rel=1e-12)
                assert bool(d[S.ILL_CONDITIONED]) == (share > 0.5), (b, layer, h)
    ill = diag[S.ILL_CONDITIONED]
    assert bool(ill.sel({S.BLOCK: ILL[0], S.LAYER: ILL[1], S.HEAD: ILL[2]}))
    assert float(diag[S.DAMPED_SHARE].sel({S.BLOCK: ILL[0], S.LAYER: ILL[1], S.HEAD: ILL[2]})) > 0.99
    assert int(ill.sum()) == 1, "only the planted slice is ill-conditioned"
    assert "ill_conditioned = damped_share > 0.5" in diag.attrs["ill_conditioned_rule"]


def test_fisher_health_pure():
    f = np.array([[0.0, 1.0, 2.0, 3.0, 100.0]])
    out = fisher_health(f, np.array([2.5]))
    np.testing.assert_allclose(out[0], [0.0, 2.0, 100.0, 0.6, np.sum(f / (f + 2.5))])


# ---------------------------------------------------------------- outliers


def test_planted_outlier_is_flagged_where_planted_and_nowhere_else(planted):
    _, diag, k, before = planted
    sid = str(diag[S.SAMPLE_I].values[k])
    kv_of = diag[S.KV_HEAD].values
    where = set()
    for b, layer, head in OUT_SLICES:  # V: every query head of the planted KV head
        heads = [h for h in range(kv_of.size) if kv_of[h] == kv_of[head]] if S.head_dim(b) == S.KV_HEAD else [head]
        where |= {(b, layer, h) for h in heads}
    flags = diag[S.OUTLIER].sel({S.SAMPLE_I: sid})
    got = {(str(b), int(l), int(h)) for b, l, h in zip(*(flags[d].values[i] for d, i in
                                                          zip(flags.dims, np.nonzero(flags.values))))}
    assert got == where
    for b, layer, h in where:
        z = float(diag[S.OUTLIER_SCORE].sel({S.BLOCK: b, S.LAYER: layer, S.HEAD: h, S.SAMPLE_I: sid}))
        assert z > OUTLIER_Z
        # ×50 moves log-norms by log 50 ≈ 3.9: with the other samples spread less than that, z is large
        assert float(diag[S.GRAD_NORM].sel({S.BLOCK: b, S.LAYER: layer, S.HEAD: h, S.SAMPLE_I: sid})) == pytest.approx(
            50 * float(before[S.GRAD_NORM].sel({S.BLOCK: b, S.LAYER: layer, S.HEAD: h, S.SAMPLE_I: sid})), rel=1e-4)
    # the other samples' flags move only inside the planted slices (the Fisher is the same elsewhere
    # except in the ill-conditioned slice, whose λ changed)
    other = diag[S.OUTLIER].drop_sel({S.SAMPLE_I: sid})
    prev = before[S.OUTLIER].drop_sel({S.SAMPLE_I: sid})
    changed = other.values != prev.values
    for idx in zip(*np.nonzero(changed)):
        b, layer = str(other[S.BLOCK].values[idx[0]]), int(other[S.LAYER].values[idx[1]])
        assert (b, layer) in {(s[0], s[1]) for s in OUT_SLICES} | {ILL[:2]}, idx


def test_modified_z_by_task_and_degenerate_spreads():
    x = np.array([1.0, 1.1, 0.9, 1.0, 9.0, 100.0, 101.0, 99.0])
    groups = np.array([True] * 5 + [False] * 3)
    z = modified_z(x, groups)
    assert z[4] > 3.5 and np.all(np.abs(z[:4]) < 3.5)  # task A's 9.0 stands out from A
    assert np.all(np.abs(z[5:]) < 3.5)  # task B's 100s are not outliers of A's scale
    same = modified_z(np.array([2.0, 2.0, 2.0, 5.0]), np.zeros(4, bool))  # MAD 0: mean deviation used
    assert same[3] > 0 and np.isfinite(same).all() and same[0] == pytest.approx(0.0)
    assert np.all(modified_z(np.ones(4), np.zeros(4, bool)) == 0)


# ---------------------------------------------------------------- marginals and norms


def test_marginals_and_norms_equal_the_stored_scores_and_gradients(planted):
    store, diag, _, _ = planted
    scores = store.open_scores().load()
    grads = store.open_gradients().load()
    is_a = scores[S.IS_A].values
    kv_of = scores[S.KV_HEAD].values
    keep = grads[S.FINITE].values
    for b in [str(x) for x in scores[S.BLOCK].values]:
        for layer in scores[S.LAYER].values:
            for h in scores[S.HEAD].values:
                sel = {S.BLOCK: b, S.LAYER: layer, S.HEAD: h}
                d = diag.sel(sel)
                m = scores["interference"].sel(sel).values.astype(np.float64)  # A × B
                pm = scores[S.pooled_name("interference")].sel(sel).values.astype(np.float64)
                row = np.concatenate([m.mean(1), pm[~is_a][:, is_a].mean(1)])  # A: over B; B: over A
                col = np.concatenate([pm[~is_a][:, is_a].mean(0), m.mean(0)])  # A: M[B, a]; B: M[A, b]
                np.testing.assert_allclose(d[S.ROW_MEAN].values, row, rtol=1e-5, atol=1e-7 * np.abs(pm).max())
                np.testing.assert_allclose(d[S.COL_MEAN].values, col, rtol=1e-5, atol=1e-7 * np.abs(pm).max())
                al = scores[S.pooled_name("alignment")].sel(sel).values
                np.testing.assert_allclose(d[S.FISHER_NORM].values ** 2, np.diag(al), rtol=1e-5)
                g = grads[b].sel({S.LAYER: layer}).values[keep][:, _kv(b, int(h), kv_of)].astype(np.float64)
                np.testing.assert_allclose(d[S.GRAD_NORM].values, np.linalg.norm(g, axis=1), rtol=1e-5)


def test_other_task_means_pure():
    rng = np.random.default_rng(0)
    m = rng.random((5, 5))
    is_a = np.array([1, 1, 0, 0, 0], bool)
    row, col = other_task_means(m, is_a)
    np.testing.assert_allclose(row, [m[0, 2:].mean(), m[1, 2:].mean(), m[2, :2].mean(), m[3, :2].mean(), m[4, :2].mean()])
    np.testing.assert_allclose(col, [m[2:, 0].mean(), m[2:, 1].mean(), m[:2, 2].mean(), m[:2, 3].mean(), m[:2, 4].mean()])


# ---------------------------------------------------------------- --exclude


def _reference_without(scores: xr.Dataset, drop_ids: list[str]) -> xr.Dataset:
    """The stored scores with those samples' rows and columns deleted by numpy, rebuilt from scratch."""
    ids = [str(x) for x in scores[S.SAMPLE_I].values]
    is_a = scores[S.IS_A].values
    gone = np.array([i in drop_ids for i in ids])
    keep = np.flatnonzero(~gone)
    ka, kb = np.flatnonzero(~gone[is_a]), np.flatnonzero(~gone[~is_a])
    n_a = len(ka)
    kept_ids = [ids[i] for i in keep]
    data = {}
    for s in S.SCORES:
        p = scores[S.pooled_name(s)].values
        p = np.delete(np.delete(p, np.flatnonzero(gone), axis=3), np.flatnonzero(gone), axis=4)
        data[S.pooled_name(s)] = ((S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_I, S.SAMPLE_J), p)
        ab = scores[s].values[:, :, :, ka][:, :, :, :, kb]
        data[s] = ((S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_A, S.SAMPLE_B), ab)
    return xr.Dataset(data, coords={
        S.BLOCK: scores[S.BLOCK].values, S.LAYER: scores[S.LAYER].values, S.HEAD: scores[S.HEAD].values,
        S.KV_HEAD: (S.HEAD, scores[S.KV_HEAD].values), S.SAMPLE_I: kept_ids, S.SAMPLE_J: kept_ids,
        S.SAMPLE_A: kept_ids[:n_a], S.SAMPLE_B: kept_ids[n_a:], S.IS_A: (S.SAMPLE_I, np.arange(len(keep)) < n_a),
    }, attrs={S.ATTR_N_A: n_a, S.ATTR_N_B: len(keep) - n_a})


def test_exclude_equals_stats_of_the_stored_scores_without_those_rows_and_columns(base_run, tmp_path):
    from qkov.pipeline.stats_stage import compute_stats, rerun_stats, stats_settings
    from qkov.testing import compare_datasets

    store = _copy(base_run, tmp_path, "run")
    drop = ["a3", "b1", "b6"]
    got = rerun_stats(store, name="without", exclude=["a3", "b1,b6"])
    assert got.attrs[S.ATTR_EXCLUDED] == ["a3", "b1", "b6"]
    assert got.attrs[S.ATTR_EXCLUDED_TASKS] == ["alpha", "beta", "beta"]
    stored = store.open_stats("without")
    assert list(stored.attrs[S.ATTR_EXCLUDED]) == drop
    assert (stored.attrs[S.ATTR_N_A], stored.attrs[S.ATTR_N_B]) == (N_A - 1, N_B - 2)
    ref = compute_stats(_reference_without(store.open_scores().load(), drop), stats_settings(store))
    for d in (stored, ref):
        for a in (S.ATTR_EXCLUDED, S.ATTR_EXCLUDED_TASKS, S.ATTR_COMPLETE, S.ATTR_SCHEMA):
            d.attrs.pop(a, None)
    assert compare_datasets(stored, ref, what="stats --exclude") == []
    # and it is not the full-sample statistics (the check above can fail)
    full = store.open_stats()
    assert not np.allclose(full["mean"].values, stored["mean"].values, equal_nan=True)
    assert full.attrs[S.ATTR_EXCLUDED] == []


def test_exclude_from_the_cli_unknown_ids_and_silent_replacement_are_refused(base_run, tmp_path):
    from qkov.pipeline.cli import app

    store = _copy(base_run, tmp_path, "run")
    runner = CliRunner()
    res = runner.invoke(app, ["stats", store.path, "--exclude", "b2", "--exclude", "alpha:a0", "--name", "wo"])
    assert res.exit_code == 0, res.output
    assert "excluded 2 sample(s): a0, b2" in res.output
    assert list(store.open_stats("wo").attrs[S.ATTR_EXCLUDED]) == ["a0", "b2"]
    before = set(store.entries())
    res = runner.invoke(app, ["stats", store.path, "--exclude", "b2,nope", "--name", "bad"])
    assert res.exit_code == 2 and "not among the run's scored samples: ['nope']" in res.output, res.output
    assert set(store.entries()) == before and not store.has_group(S.stats_group("bad"))
    # the default `stats` group holds the full-sample statistics: an exclusion never silently replaces them
    res = runner.invoke(app, ["stats", store.path, "--exclude", "b2"])
    # whitespace collapsed: rich wraps the line where the temporary path's length puts it
    assert res.exit_code == 2 and "excluded_samples: [] -> ['b2']" in " ".join(res.output.split()), res.output


def test_resolve_samples_ambiguous_and_task_qualified_ids():
    ids = ["x", "y", "x", "z"]
    ds = xr.Dataset(coords={S.SAMPLE_I: ids, S.IS_A: (S.SAMPLE_I, np.array([1, 1, 0, 0], bool))},
                    attrs={S.ATTR_TASK_A: "math", S.ATTR_TASK_B: "code"})
    assert resolve_samples(ds, ["code:x", "y"]).tolist() == [1, 2]
    with pytest.raises(UsageError, match="occur in both tasks"):
        resolve_samples(ds, ["x"])
    with pytest.raises(UsageError, match=r"\['w'\]"):
        resolve_samples(ds, ["y,w"])
    assert issubclass(UsageError, QkovError)


# ---------------------------------------------------------------- query and report


def test_query_warns_when_top_pairs_are_dominated_by_a_flagged_sample(planted):
    from qkov.pipeline.query import format_query, query_head
    from rich.console import Console

    store, diag, k, _ = planted
    sid = str(diag[S.SAMPLE_I].values[k])
    b, layer, head = OUT_SLICES[0]
    res = query_head(store.path, layer, head, block=b, top=5)
    blk = res["blocks"][0]
    dg = blk["diagnostics"]
    assert dg is not None and dg["warning"] and sid in dg["warning"]
    assert dg["b_on_a"][0]["sample"] == sid and dg["b_on_a"][0]["outlier"]  # interferes most with task A
    assert [f["sample"] for f in dg["flagged"]][0] == sid
    assert dg["health"][S.N_PARAMS] > 0 and dg["health"][S.ILL_CONDITIONED] is False
    with Console(width=160, record=True) as c:
        c.print(format_query(res))
    text = c.export_text()
    assert "norm outliers" in text and sid in text and "interfere most" in text
    # a slice without flagged samples in its top pairs: no warning
    res = query_head(store.path, 0, 0, block="O", top=5)
    assert res["blocks"][0]["diagnostics"]["warning"] is None or sid not in res["blocks"][0]["diagnostics"]["warning"]
    # the ill-conditioned slice says so
    res = query_head(store.path, ILL[1], ILL[2], block=ILL[0], top=3)
    assert res["blocks"][0]["diagnostics"]["health"][S.ILL_CONDITIONED] is True


def test_head_diagnostics_warning_rule(planted):
    _, diag, k, _ = planted
    sid = str(diag[S.SAMPLE_I].values[k])
    b, layer, head = OUT_SLICES[0]
    pairs = [{"sample_a": "a0", "sample_b": sid}, {"sample_a": "a1", "sample_b": "b0"}]
    assert head_diagnostics(diag, b, layer, head, pairs)["warning"]  # 1 of 2: half
    pairs.append({"sample_a": "a2", "sample_b": "b0"})
    assert head_diagnostics(diag, b, layer, head, pairs)["warning"] is None  # 1 of 3


def test_report_has_a_health_panel(planted, tmp_path):
    from qkov.pipeline.report import make_report

    store, diag, k, _ = planted
    page = make_report(store.path, out_dir=tmp_path / "rep").read_text(encoding="utf-8")
    assert "Numerical health" in page
    assert str(diag[S.SAMPLE_I].values[k]) in page
    assert f"{ILL[0]}</td><td class='num'>{ILL[1]}</td><td class='num'>{ILL[2]}" in page


def test_sketch_mode_diagnostics_equal_exact_mode_when_the_sketch_covers_the_slice(base_run, tmp_path):
    """Sketch mode stores no gradients but each sample's scalars (answers mode's): its diagnostics
    come from those, exactly. From the sketches alone (what `diagnostics_dataset` computes without
    them) grad_norm = ||S(|g|)|| and fisher_norm = sqrt(S(w).S(w)); with k >= P the projection is
    injective, so both equal exact mode's (float rounding)."""
    from pathlib import Path

    from qkov.pipeline.run import run_job
    from qkov.testing import tiny_job

    exact = RunStore(base_run.output.path).open_dataset(S.DIAGNOSTICS).load()
    k = int(exact[S.N_PARAMS].max())
    job = tiny_job(Path(base_run.output.path).parent, "llama_gqa", n_a=N_A, n_b=N_B,
                   score={"mode": "sketch", "sketch_dim": k}, output={"path": str(tmp_path / "sketch")})
    run_job(job)
    sk = RunStore(job.output.path).open_dataset(S.DIAGNOSTICS).load()
    assert sk.attrs["mode"] == "sketch" and "scalars" in sk.attrs["source"]
    for v in (*D_HEALTH, S.GRAD_NORM, S.FISHER_NORM, S.ROW_MEAN, S.COL_MEAN, S.OUTLIER_SCORE):
        np.testing.assert_allclose(sk[v].values, exact[v].values, rtol=1e-4, atol=1e-6 * float(np.nanmax(np.abs(exact[v].values))),
                                   err_msg=v)
    near = np.abs(exact[S.OUTLIER_SCORE].values - OUTLIER_Z) < 1e-3  # rounding may tip a value sitting on the cut
    assert np.array_equal(sk[S.OUTLIER].values[~near], exact[S.OUTLIER].values[~near])
    # and from the sketches alone (keep_pairs runs store no N×N scores)
    from qkov.pipeline.diagnostics import diagnostics_dataset

    store = RunStore(job.output.path)
    got = diagnostics_dataset(store.open_gradients(decode=False), store.open_fisher(), _without_pairs(store.open_scores()))
    _assert_same_diagnostics(got, sk)


def _without_pairs(scores: xr.Dataset) -> xr.Dataset:
    """The scores as a `score.keep_pairs` run stores them: no N×N matrices."""
    return scores.drop_vars([v for v in scores.data_vars if S.SAMPLE_I in scores[v].dims or S.SAMPLE_A in scores[v].dims])


def _assert_same_diagnostics(got: xr.Dataset, want: xr.Dataset) -> None:
    for v in want.data_vars:
        if want[v].dtype == bool:
            continue
        np.testing.assert_allclose(got[v].values, want[v].values, rtol=2e-5,
                                   atol=1e-6 * float(np.nanmax(np.abs(want[v].values))), err_msg=v)
    near = np.abs(want[S.OUTLIER_SCORE].values - OUTLIER_Z) < 1e-3
    assert np.array_equal(got[S.OUTLIER].values[~near], want[S.OUTLIER].values[~near])


def test_without_stored_pairs_the_diagnostics_come_from_the_operands(planted):
    """keep_pairs runs store no N×N scores: means over the other task are u_i·v̄ and ū·v_i, A_ii = Σ u_i."""
    from qkov.pipeline.diagnostics import diagnostics_dataset

    store, diag, _, _ = planted
    scores = _without_pairs(store.open_scores())
    assert S.pooled_name("interference") not in scores
    got = diagnostics_dataset(store.open_gradients(decode=False), store.open_fisher(), scores)
    _assert_same_diagnostics(got, diag)
    from qkov.pipeline.exclude import without_samples

    with pytest.raises(UsageError, match="stored pair scores"):  # nothing to leave samples out of
        without_samples(scores, np.array([0]))
