"""The answers passes' Triton kernels (qkov.workers.pass_kernels), run by Triton's CPU
interpreter, against their torch forms and float64 definitions; and a whole answers-mode run
on the kernels against the same run on the torch forms."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

import torch

from qkov.workers import pass_kernels as pk

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs triton under its CPU interpreter (make test installs it; conftest sets it)")


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels on CPU tensors, under Triton's interpreter (conftest's TRITON_INTERPRET=1)."""
    monkeypatch.setenv("QKOV_PASS_KERNELS", "interpret")
    pk.available.cache_clear()
    yield
    pk.available.cache_clear()


def _torch_forms(monkeypatch):
    monkeypatch.setenv("QKOV_PASS_KERNELS", "0")
    pk.available.cache_clear()


@pytest.mark.parametrize("rounding", [False, True])
def test_pass1_kernel_equals_the_torch_forms(interpreted, monkeypatch, rounding):
    """Task sums of runs of rows (one run with no task), the Fisher's weighted Σ t² per stream
    (a zero weight adds nothing; a run without weights skips it), P not a multiple of the block,
    accumulated onto earlier sums of a strided (3, tasks) view; and the non-finite flag."""
    g = torch.Generator().manual_seed(3)
    B, H, P, tasks = 6, 3, 2 * pk.BLOCK + 77, 3
    t = torch.randn((B, H, P), generator=g) * 1e-3
    t[1, 2, 5] = 1 + 2**-8 + 2**-9  # a tie, rounded to even (up): not a truncation
    t[0, 0, 7] = 1 + 2**-9 + 2**-12  # rounded down
    acc0 = torch.rand((3, tasks, 2, H, P), generator=g)
    fisher0 = torch.rand((2, 2, H, P), generator=g, dtype=torch.float64)
    runs = [(0, 2, 2, (0.5, 0.0)), (2, 3, None, (0.25, 1.0)), (3, 6, 0, None)]
    got_acc, got_f = acc0.clone(), fisher0.clone()
    bad = pk.pass1_update(t, runs, got_acc[:, :, 1], got_f[:, 1], rounding)
    _torch_forms(monkeypatch)
    want_acc, want_f = acc0.clone(), fisher0.clone()
    bad_ref = pk.pass1_update(t, runs, want_acc[:, :, 1], want_f[:, 1], rounding)
    assert int(bad) == int(bad_ref) == 0
    np.testing.assert_allclose(got_acc.numpy(), want_acc.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_f.numpy(), want_f.numpy(), rtol=1e-6, atol=1e-9)
    assert torch.equal(got_acc[:, :, 0], acc0[:, :, 0]) and torch.equal(got_f[:, 0], fisher0[:, 0])  # other layer untouched
    # the definitions, float64: task 2 holds rows 0-1, task 0 rows 3-5; stream 1 only row 2's Σt²
    x = t.double()
    r = x.to(torch.bfloat16).double() if rounding else x
    want = acc0[:, 2, 1].double() + torch.stack([r[:2].sum(0), r[:2].abs().sum(0), (r[:2] ** 2).sum(0)])
    np.testing.assert_allclose(got_acc[:, 2, 1].double().numpy(), want.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_f[1, 1].numpy(), (fisher0[1, 1] + (x[2] ** 2)).numpy(), rtol=1e-6)
    if rounding:  # the rounded values torch stores, not truncations: 1 + 2^-7 and 1 at the planted entries
        inc = got_acc[0, 2, 1] - acc0[0, 2, 1]
        assert abs(float(inc[2, 5]) - (1 + 2**-7 + float(t[0, 2, 5]))) < 1e-5
        assert abs(float(inc[0, 7]) - (1 + float(t[1, 0, 7]))) < 1e-5


def test_pass1_kernel_flags_a_non_finite_value(interpreted):
    t = torch.zeros((2, 1, 300))
    acc = torch.zeros((3, 1, 1, 300))
    assert int(pk.pass1_update(t, [(0, 2, 0, None)], acc, None, False)) == 0
    t[1, 0, 299] = float("inf")
    assert int(pk.pass1_update(t, [(0, 2, 0, None)], acc, None, False)) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass1_kernel_stores_the_rows_as_exact_mode_does(interpreted, monkeypatch, dtype):
    """Exact mode's single read: each row written into its (layer, head, sample) place of a shard
    buffer (bf16: rounded to nearest even, ties included) bit for bit as the torch form writes
    it, beside the Fisher's sums, with rows of zero weight stored and not summed."""
    g = torch.Generator().manual_seed(5)
    B, H, P, L, n = 5, 3, pk.BLOCK + 9, 2, 11
    t = torch.randn((B, H, P), generator=g)
    t[2, 1, 3] = 1 + 2**-8 + 2**-9  # a tie
    runs = [(0, 2, None, (1.0,)), (2, 3, None, None), (3, 5, None, (0.5,))]
    out = {}
    for form in ("kernel", "torch"):
        if form == "torch":
            _torch_forms(monkeypatch)
        buf = torch.full((L, H, n, P), -3.0, dtype=dtype)
        fisher = torch.zeros((1, L, H, P), dtype=torch.float64)
        bad = pk.pass1_update(t, runs, None, fisher[:, 1], False, store=(buf, 1, 4))
        out[form] = (buf, fisher, int(bad))
    (kb, kf, kbad), (tb, tf, tbad) = out["kernel"], out["torch"]
    assert kbad == tbad == 0
    assert torch.equal(kb.view(torch.int16) if dtype == torch.bfloat16 else kb, tb.view(torch.int16) if dtype == torch.bfloat16 else tb)
    assert torch.equal(kb[1, :, 4:9].transpose(0, 1), t.to(dtype))  # rows 4..8 of layer 1
    assert (kb[0] == -3).all() and (kb[1, :, :4] == -3).all() and (kb[1, :, 9:] == -3).all()
    np.testing.assert_allclose(kf.numpy(), tf.numpy(), rtol=1e-6)
    want = (t[:2].double() ** 2).sum(0) + 0.5 * (t[3:].double() ** 2).sum(0)  # row 2 weighs nothing
    np.testing.assert_allclose(kf[0, 1].numpy(), want.numpy(), rtol=1e-5)


@pytest.mark.parametrize("rounding", [False, True])
@pytest.mark.parametrize("P", [pk.BLOCK, 3 * pk.BLOCK + 5])
def test_pass2_kernel_equals_an_elementwise_float64_reference(interpreted, rounding, P):
    """Each sample's scalars (schema.answer_parts order) from one read of t, with the task sums
    a strided view of a per-layer array, against the definitions in float64."""
    from qkov.pipeline import schema

    rng = np.random.default_rng(P)
    B, H, tasks = pk.ROWS + 2, 3, 2  # (two groups of rows, the second part-filled)
    g = rng.normal(size=(B, H, P)) * rng.uniform(0.1, 3.0, size=(1, H, 1))
    inv = rng.uniform(0.5, 2.0, size=(H, P))
    sums = np.stack([rng.normal(size=(tasks, 2, H, P)), np.abs(rng.normal(size=(tasks, 2, H, P))),
                     rng.uniform(size=(tasks, 2, H, P))])
    tt = torch.tensor(g, dtype=torch.float32)
    got = pk.pass2_scalars(tt, torch.tensor(inv, dtype=torch.float32),
                           torch.tensor(sums, dtype=torch.float32)[:, :, 1], rounding).numpy()
    g = (tt.to(torch.bfloat16) if rounding else tt).double().numpy()
    s = torch.tensor(sums, dtype=torch.float32).double().numpy()[:, :, 1]
    w = torch.tensor(inv, dtype=torch.float32).double().numpy()
    u, v = g * g * w, np.abs(g)
    own = [(g * g).sum(-1), u.sum(-1), (u * v).sum(-1)]
    per_task = [x for k in range(tasks) for x in ((g * w * s[0, k]).sum(-1), (u * s[1, k]).sum(-1),
                                                 (v * w * s[2, k]).sum(-1))]
    want = np.stack(own + per_task, axis=-1)
    assert got.shape == want.shape == (B, H, len(schema.answer_parts(range(tasks)))) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_triton_that_cannot_run_the_kernels_leaves_the_torch_forms_with_a_warning(interpreted, monkeypatch):
    """The once-per-device probe: every variant runs here (the interpreter); where one raises
    (a Triton these kernels do not suit), the passes keep their torch forms and say so."""
    pk._runs_on.cache_clear()
    assert pk._runs_on(torch.device("cpu"))

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no such intrinsic")

    monkeypatch.setattr(pk, "_kernels", lambda: (Broken(), Broken(), Broken()))
    pk._runs_on.cache_clear()
    with pytest.warns(RuntimeWarning, match="torch forms"):
        assert not pk._runs_on(torch.device("cpu"))
    pk._runs_on.cache_clear()


@pytest.mark.parametrize("rounding", [False, True])
@pytest.mark.parametrize("P, dim, nnz", [(3000, 256, 1), (4096, 64, 2), (1000, 2048, 1)])
def test_sketch_kernel_equals_the_torch_sketch(interpreted, P, dim, nnz, rounding):
    """Count sketches of u, v, w (one gathered read of t for all) against qkov.workers.sketch's:
    P not a multiple of the buckets or of the kernel's chunks, two rows per projection, dim > P."""
    from qkov.workers.sketch import layer_projection, sketch_layer

    g = torch.Generator().manual_seed(P + dim)
    B, H = pk.ROWS + 1, 2  # (two groups of rows)
    t = torch.randn((B, H, P), generator=g)
    inv = torch.rand((H, P), generator=g) + 0.3
    proj = layer_projection(P, dim, 0, "Q", 0, H, nnz)
    assert pk.sketch_kernel_fits(dim) and not pk.sketch_kernel_fits(dim + 1)
    got = pk.sketch_parts(t, inv, proj, ("u", "v", "w"), rounding)
    some = pk.sketch_parts(t, inv, proj, ("v", "u"), rounding)  # (answers mode's two)
    assert list(some) == ["u", "v"] and torch.equal(some["u"], got["u"]) and torch.equal(some["v"], got["v"])
    want = sketch_layer(t.to(torch.bfloat16).float() if rounding else t, inv, proj)
    for name in ("u", "v", "w"):
        assert got[name].shape == want[name].shape == (B, H, dim) and got[name].dtype == torch.float32
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-5,
                                   atol=1e-5 * float(want[name].abs().max()), err_msg=name)


@pytest.mark.parametrize("mode", ["top", "sketch"])
def test_a_run_on_the_kernels_equals_one_on_the_torch_forms(tmp_path, monkeypatch, mode):
    """Answers mode with the interference sketched (both passes, bf16 rounding, u and v
    sketched) and sketch mode (u, v, w), on the interpreted kernels, against the same runs on
    the torch forms: the same answers."""
    import xarray as xr

    from qkov.pipeline import schema
    from qkov.pipeline.run import run_job
    from qkov.testing import tiny_job

    score = ({"mode": "answers", "keep_pairs": "top", "sketch_dim": 64, "storage_dtype": "bfloat16", "top_k": 5}
             if mode == "top" else {"mode": "sketch", "sketch_dim": 64})

    def answers(name, **env):
        for k, v in env.items():  # (the workers, spawned, inherit them)
            monkeypatch.setenv(k, v)
        pk.available.cache_clear()
        job = tiny_job(tmp_path, "llama_gqa", n_a=7, n_b=6, score=score, fisher={"source": "a"},
                       extract={"shard_size": 64, "batch_size": 4},
                       stats={"n_permutations": 19, "n_bootstrap": 19}, output={"path": str(tmp_path / name)})
        run_job(job)
        return xr.open_zarr(str(tmp_path / name), group=schema.STATS), xr.open_zarr(str(tmp_path / name), group=schema.GRADIENTS)

    (kern, kern_g), (ref, ref_g) = answers("kernels", QKOV_PASS_KERNELS="interpret"), answers("torch", QKOV_PASS_KERNELS="0")
    sketches = [schema.sketch_var(b, p) for b in "QKVO" for p in (("u", "v") if mode == "top" else schema.SKETCH_PARTS)]
    for name in sketches + [v for v in ref_g.data_vars if v not in sketches]:  # the sketches and the scalars themselves
        want = ref_g[name].values.astype(np.float64)
        np.testing.assert_allclose(kern_g[name].values, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)
    assert set(kern.data_vars) == set(ref.data_vars)
    compared = [n for n in ("mean", "sharing", "transfer", "cosine", "effect", "transfer_p_value") if n in ref]
    assert len(compared) >= 3
    for name in compared:  # (float32 sums in another order: differences relative to each answer's scale)
        want = ref[name].values
        scale = np.abs(want[np.isfinite(want)]).max(initial=0.0)
        np.testing.assert_allclose(kern[name].values, want, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_an_exact_fused_run_on_the_kernels_equals_one_on_the_torch_forms(tmp_path, monkeypatch):
    """Exact mode on the fused path (the gradients held where they are formed: the kernel stores
    the rows, bf16 here; float32 rows: the unit test above) on the interpreted kernels, against
    the torch forms: the same Fisher, scores and answers to float rounding."""
    storage = "bfloat16"
    from qkov.pipeline.run import run_job
    from qkov.testing import assert_runs_close, tiny_job

    def run(name, **env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        pk.available.cache_clear()
        job = tiny_job(tmp_path, "llama_gqa", n_a=5, n_b=4, score={"storage_dtype": storage},
                       extract={"shard_size": 64, "batch_size": 4}, stats={"n_permutations": 19, "n_bootstrap": 19},
                       output={"path": str(tmp_path / name), "keep_gradients": False, "gradients_in": "device"})
        res = run_job(job)
        assert res.extract["gradients_in"]["where"] == "device"
        return tmp_path / name

    kern = run("kernels", QKOV_PASS_KERNELS="interpret")
    ref = run("torch", QKOV_PASS_KERNELS="0")
    assert_runs_close(kern, ref, rtol=1e-4)


def test_the_kernels_compile_for_an_h100():
    """Every kernel variant the passes launch, compiled ahead of time for sm_90 (H100/H200) by
    Triton's own compiler and ptxas, no GPU needed: what the interpreter does not check (types,
    constexpr branches, the lowering) fails here instead of on a device. In a fresh process:
    the interpreter, once imported, stays."""
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).resolve().parent  # (this checkout's tests and packages, whatever the working directory)
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]; import test_pass_kernels as t; "
            "t.compile_all()")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode == 3:
        pytest.skip("this triton has no CUDA backend")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["compiled", "32"], out.stdout


def compile_all() -> None:
    """(run by the test above in a fresh process) every kernel variant, compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        sys.exit(3)
    kernels = importlib.import_module("qkov.workers._pass_triton")
    variants = []
    p1 = {"t_ptr": "*fp32", "n_cols": "i64", "row0": "i32", "n_rows": "i32", "acc_ptr": "*fp32", "acc_kind_stride": "i64",
          "fisher_ptr": "*fp64", "fisher_stride": "i64", "cw_ptr": "*fp64", "n_streams": "i32", "bad_ptr": "*i32",
          "out_head_stride": "i64", "out_row0": "i32", "P": "i32"}
    for rounding in (False, True):  # the answers' pass 1
        for has_acc in (False, True):
            for has_f in (False, True):
                variants.append((kernels.pass1, {**p1, "out_ptr": "*fp32"}, {
                    "ROUND": rounding, "HAS_ACC": has_acc, "HAS_FISHER": has_f, "STORE": 0, "BLOCK": pk.BLOCK1}))
    for store, out in ((1, "*fp32"), (2, "*bf16")):  # exact mode's
        for has_f in (False, True):
            variants.append((kernels.pass1, {**p1, "out_ptr": out}, {
                "ROUND": False, "HAS_ACC": False, "HAS_FISHER": has_f, "STORE": store, "BLOCK": pk.BLOCK1}))
    p2 = {"t_ptr": "*fp32", "inv_ptr": "*fp32", "sums_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "n_rows": "i32",
          "n_tasks": "i32", "n_blocks": "i32", "n_heads": "i32", "s_kind": "i64", "s_task": "i64"}
    variants += [(kernels.pass2, p2, {"ROUND": r, "ROWS": pk.ROWS, "BLOCK": pk.BLOCK}) for r in (False, True)]
    sk = {"t_ptr": "*fp32", "inv_ptr": "*fp32", "order_ptr": "*i32", "signs_ptr": "*i8", "out_ptr": "*fp32",
          "out_part_stride": "i64", "P": "i32", "n_rows": "i32", "n_heads": "i32", "nnz": "i32", "n_progs": "i32",
          "scale": "fp32"}
    variants += [(kernels.sketch, sk, {"ROUND": rounding, "DO_U": True, "DO_V": True, "DO_W": w, "DIM": dim,
                                       "CHUNK": max(dim, pk.BLOCK), "N_SUB": n_sub,
                                       "ROWS": pk.ROWS if dim <= pk.BLOCK else 1})
                 for rounding, w in ((True, False), (False, True)) for dim in (256, 4096) for n_sub in (1, 8)]
    f1 = {"T": "i32", "IN": "i32", "OUT": "i32", "R": "i32", "C": "i32", "first": "i64", "head_stride": "i64",
          "n_ct": "i32", "row0": "i32", "n_rows": "i32", "acc_ptr": "*fp32", "acc_kind_stride": "i64",
          "fisher_ptr": "*fp64", "fisher_stride": "i64", "cw_ptr": "*fp64", "n_streams": "i32", "bad_ptr": "*i32"}
    tiles = {"BM": 64, "BN": 64, "BK": 32}
    for dt, rounding, has_acc, has_f in (("bf16", True, True, True), ("bf16", False, True, True), ("fp32", False, True, True),
                                         ("bf16", True, True, False), ("bf16", False, False, True)):  # the fused pass 1
        variants.append((kernels.fused_pass1, {**f1, "x_ptr": f"*{dt}", "go_ptr": f"*{dt}"}, {
            "ROUND": rounding, "HAS_ACC": has_acc, "HAS_FISHER": has_f, "UPCAST": dt == "fp32", **tiles}))
    f2 = {"T": "i32", "IN": "i32", "OUT": "i32", "R": "i32", "C": "i32", "first": "i64", "head_stride": "i64",
          "n_ct": "i32", "n_rows": "i32", "n_heads": "i32", "inv_ptr": "*fp32", "sums_ptr": "*fp32", "s_kind": "i64",
          "s_task": "i64", "n_tasks": "i32", "out_ptr": "*fp32", "n_tiles": "i32", "order_ptr": "*i32", "signs_ptr": "*i8",
          "sk_ptr": "*fp32", "sk_part_stride": "i64", "nnz": "i32", "scale": "fp32"}
    for dt, rounding, sketch, (bm, bn) in (("bf16", True, False, (64, 64)), ("bf16", False, False, (64, 64)),
                                           ("fp32", False, False, (64, 64)), ("bf16", True, True, (32, 256)),
                                           ("bf16", True, True, (64, 128))):  # the fused pass 2 (8B: Q/K/V, O tiles)
        variants.append((kernels.fused_pass2, {**f2, "x_ptr": f"*{dt}", "go_ptr": f"*{dt}"}, {
            "ROUND": rounding, "SKETCH": sketch, "UPCAST": dt == "fp32", "DIM": 256 if sketch else bm * bn,
            "BM": bm, "BN": bn, "BK": 32}))
    for fn, types, const in variants:
        names = list(fn.arg_names)
        assert set(types) | set(const) == set(names), set(names) ^ (set(types) | set(const))
        signature = {n: types.get(n, "constexpr") for n in names}
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()})
        big = const.get("CHUNK", 0) > pk.BLOCK or "BM" in const  # (launched with 8 warps: pass_kernels)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8} if big else None)
        assert compiled.asm["cubin"], (fn.__name__, const)
    print("compiled", len(variants))
