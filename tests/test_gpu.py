"""GPU code paths give the CPU path's results (run on the device machine; skipped without CUDA)."""
from __future__ import annotations

from qkov.pipeline.store import RunStore
import numpy as np
import pytest
import torch

from qkov.pipeline.executors import InlineExecutor
from qkov.pipeline.extract import run_extract
from qkov.pipeline.run import prepare_output
from qkov.pipeline.score import score_dataset
from qkov.testing import tiny_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_gpu_extract_and_score_equal_cpu(tmp_path, arch):
    runs = {}
    for dev in ("cpu", "cuda"):
        job = tiny_job(tmp_path, arch, n_a=9, n_b=7, extract={"device": dev}, output={"path": str(tmp_path / f"run-{dev}")})
        prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
        run_extract(RunStore.of(job), job, InlineExecutor())
        grads, fisher = RunStore(job.output.path).open_gradients(), RunStore(job.output.path).open_fisher()
        runs[dev] = (grads, fisher, score_dataset(grads, fisher, device=dev).load())
    (g_cpu, f_cpu, s_cpu), (g_gpu, f_gpu, s_gpu) = runs["cpu"], runs["cuda"]
    for b in "QKVO":
        ref = g_cpu[b].values
        assert np.abs(g_gpu[b].values - ref).max() <= 1e-4 * np.abs(ref).max(), b
        np.testing.assert_allclose(f_gpu[b].values, f_cpu[b].values, rtol=1e-4, atol=1e-4 * np.abs(f_cpu[b].values).max())
    for name in ("interference", "alignment", "pooled_interference", "pooled_alignment"):
        ref = s_cpu[name].values
        got = s_gpu[name].values
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), name


def test_gpu_score_kernel_equals_cpu_on_the_same_gradients(tmp_path):
    job = tiny_job(tmp_path, "phi3", n_a=12, n_b=10)
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    run_extract(RunStore.of(job), job, InlineExecutor())
    grads, fisher = RunStore(job.output.path).open_gradients(), RunStore(job.output.path).open_fisher()
    cpu = score_dataset(grads, fisher, device="cpu").load()
    gpu = score_dataset(grads, fisher, device="cuda").load()  # float32 accumulation, TF32 off
    for name in ("pooled_interference", "pooled_alignment"):
        ref = cpu[name].values
        assert np.abs(gpu[name].values - ref).max() <= 1e-4 * np.abs(ref).max(), name


def test_gpu_sketch_mode_equals_cpu(tmp_path):
    out = {}
    for dev in ("cpu", "cuda"):
        job = tiny_job(tmp_path, "llama_gqa", n_a=8, n_b=8, extract={"device": dev},
                       score={"mode": "sketch", "sketch_dim": 512}, output={"path": str(tmp_path / f"sk-{dev}")})
        prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
        run_extract(RunStore.of(job), job, InlineExecutor())
        out[dev] = score_dataset(RunStore(job.output.path).open_gradients(), RunStore(job.output.path).open_fisher(), device=dev).load()
    for name in ("pooled_interference", "pooled_alignment"):
        ref = out["cpu"][name].values
        assert np.abs(out["cuda"][name].values - ref).max() <= 1e-4 * np.abs(ref).max(), name


def test_gpu_bf16_operands_for_bf16_storage(tmp_path):
    """bf16-stored gradients are scored on the GPU as bf16 operands with float32 accumulation
    (the stage's raw-bits path); they agree with a float64 CPU reference on the same stored
    values to bf16 operand rounding (~2⁻⁸ per term, averaging out over the slice)."""
    from qkov.workers.grads import has_bmm_out_dtype

    if not has_bmm_out_dtype(torch.device("cuda")):
        pytest.skip("this torch has no torch.mm(out_dtype=float32): the stage keeps float32 operands")
    job = tiny_job(tmp_path, "llama_gqa", n_a=12, n_b=10, score={"storage_dtype": "bfloat16"})
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    run_extract(RunStore.of(job), job, InlineExecutor())
    fisher = RunStore(job.output.path).open_fisher()
    ref = score_dataset(RunStore(job.output.path).open_gradients(), fisher, device="cpu", accumulate="float64").load()
    raw = RunStore(job.output.path).open_gradients(decode=False)
    assert raw["Q"].dtype == np.uint16
    gpu = score_dataset(raw, fisher, device="cuda").load()
    for name in ("pooled_interference", "pooled_alignment"):
        want, got = ref[name].values, gpu[name].values
        err = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < err <= 5e-3, (name, err)  # > 0: the bf16 path really ran


def test_bf16_rounding_on_the_device_equals_the_host():
    """Extraction rounds bf16 storage on the GPU before the copy; the bits equal the CPU's."""
    from qkov.workers.writer import to_stored

    torch.manual_seed(0)
    x = torch.randn(100_000) * torch.logspace(-30, 3, 100_000)
    np.testing.assert_array_equal(to_stored(x.cuda(), "bfloat16"), to_stored(x, "bfloat16"))


def test_gpu_answers_mode_in_one_task_equals_cpu(tmp_path):
    """Answers mode, one shard (both passes in one task: the task sums kept on the device, 1/(Î+λ)
    formed there, the batches copied from pinned memory) with the interference sketched (its
    reduction's matmul and sums on the device): the CPU run's stats and top pairs, to float32 rounding."""
    from qkov.pipeline.run import run_job
    from qkov.testing import compare_datasets

    out = {}
    for dev in ("cpu", "cuda"):
        job = tiny_job(tmp_path, "llama_gqa", n_a=12, n_b=11, extract={"device": dev, "shard_size": 64, "batch_size": 4},
                       score={"mode": "answers", "keep_pairs": "top", "sketch_dim": 256, "top_k": 5},
                       output={"path": str(tmp_path / f"ans-{dev}")})
        run_job(job)
        out[dev] = RunStore.of(job)
    assert compare_datasets(out["cpu"].open_stats(), out["cuda"].open_stats(), rtol=1e-4, what="stats") == []
    # the top pairs' values (their rows and columns could trade places at a near-tie of float rounding)
    top = ["top_interference"]
    assert compare_datasets(out["cpu"].open_scores()[top], out["cuda"].open_scores()[top], rtol=1e-4, what="top") == []
