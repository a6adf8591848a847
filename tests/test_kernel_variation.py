"""Runs whose worker processes pick other CPU kernels than the client agree at float tolerance.

CI lands on whatever x86-64 machine is free (Intel here, AMD EPYC there): torch then picks
other SIMD kernels, and BLAS splits its sums by thread count, so float32 results differ in
their last bits between processes and machines. Every cross-execution comparison in the
suite must therefore be a tolerance comparison (`qkov.testing.assert_runs_close`), float
attributes included. This test makes the difference happen on any one machine: the workers
run with another ATen kernel set (`ATEN_CPU_CAPABILITY`) and another thread count than the
test process, so a bitwise assumption fails here and not on the next machine.
"""
from __future__ import annotations

import numpy as np
import pytest

from qkov.pipeline import schema
from qkov.testing import assert_runs_close, tiny_job

# the workers' ATen kernels and (worker processes, threads each: an extraction task uses its
# worker's threads); the client keeps torch's defaults
VARIATIONS = {
    "generic-kernels-2x1-threads": ("default", 2, 1),
    "avx2-kernels-1x2-threads": ("avx2", 1, 2),
}


def _job(tmp, name: str):
    # the Fisher and λ come from sums over every worker's partials: where last bits move first
    return tiny_job(tmp, "llama_gqa", n_a=6, n_b=5, min_len=24, max_len=40,
                    extract={"shard_size": 2}, fisher={"batch_size": 4, "beta": 0.9},
                    score={"layers": [0, 1]}, stats={"n_permutations": 19, "n_bootstrap": 19},
                    output={"path": str(tmp / name)})


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    from qkov.pipeline.run import run_job

    tmp = tmp_path_factory.mktemp("kernels")
    job = _job(tmp, "inline")
    run_job(job)
    return tmp, job


@pytest.mark.slow
@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_workers_on_other_kernels_give_the_same_run(inline_run, variation, monkeypatch):
    from distributed import Client, LocalCluster

    from qkov.pipeline.run import run_job
    from qkov.pipeline.store import RunStore

    tmp, ref = inline_run
    job = _job(tmp, variation)
    # In the environment each worker process starts with, so torch reads it at import. Set in
    # ours (restored after the test; torch here is loaded already): the nanny gives the
    # process environment precedence over its pre-spawn config, and copies that config
    # into our environment for good.
    kernels, workers, threads = VARIATIONS[variation]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", kernels)
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=":0") as cl, Client(cl) as c:
        seen = c.run(lambda: __import__("os").environ["ATEN_CPU_CAPABILITY"])
        assert set(seen.values()) == {kernels}
        run_job(job, client=c)
    assert_runs_close(job.output.path, ref.output.path)
    # λ is stored once, as the `damping` variable (compared above at tolerance), never as attrs
    fisher = RunStore(job.output.path).open_fisher()
    assert not [k for k in fisher.attrs if k.startswith("lambda")]
    assert np.all(fisher[schema.DAMPING].values > 0)
