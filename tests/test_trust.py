"""Trust at first contact (issue 18): no open doors, no silent data loss, no silent wrong
results. Each test here fails on the code before its fix.
"""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import numpy as np
import pytest
import torch

# ---------------------------------------------------------------- bug 6: embedded clusters listen on loopback only


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of these processes."""
    import psutil

    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _cluster_pids() -> set[int]:
    import os

    import psutil

    me = psutil.Process(os.getpid())
    return {me.pid, *(c.pid for c in me.children(recursive=True))}


def _assert_loopback_only(cluster, n_workers: int) -> None:
    from distributed import Client

    with Client(cluster) as client:
        client.wait_for_workers(n_workers, timeout=60)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        socks = _listening(_cluster_pids())
        # the scheduler, every nanny and worker, and the dashboard were found and checked
        ports = {p for _, _, p in socks}
        assert int(client.scheduler.address.rsplit(":", 1)[1]) in ports
        assert all(int(a.rsplit(":", 1)[1]) in ports for a in workers)
        assert cluster.dashboard_link and int(cluster.dashboard_link.split(":")[2].split("/")[0]) in ports
        assert len({pid for pid, _, _ in socks}) >= 1 + n_workers  # this process (scheduler, nannies), each worker
        exposed = [s for s in socks if not ipaddress.ip_address(s[1]).is_loopback]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert all(a.startswith("tcp://127.0.0.1:") for a in workers)


def test_embedded_cpu_cluster_listens_on_loopback_only():
    from pipeline.cluster import local_cluster
    from pipeline.spec import ClusterSpec

    with local_cluster(ClusterSpec(n_workers=2)) as cluster:
        _assert_loopback_only(cluster, 2)


def test_embedded_gpu_cluster_listens_on_loopback_only():
    """The GPU SpecCluster (scheduler, nannies, workers, dashboard); the GPU label only routes work."""
    from pipeline.cluster import gpu_cluster, gpu_worker_options
    from pipeline.spec import ClusterSpec

    with gpu_cluster(gpu_worker_options(ClusterSpec(n_workers=2), n_gpu=1, n_cpu=2)) as cluster:
        _assert_loopback_only(cluster, 2)


# ---------------------------------------------------------------- bug 7: query shows the user's text as written

MARKUP_IDS = ("return ordered[mid]", "[/]", "[bold red]x[/]", "a\\[b]")


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory):
    """A finished tiny run whose sample ids, texts and task names look like rich markup."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from qkov.testing import VOCAB, tiny_job, write_job_file

    tmp = tmp_path_factory.mktemp("markup")
    g = torch.Generator().manual_seed(1)

    def rows(prefix: str, n: int) -> list[dict]:
        out = []
        for k in range(n):
            sid = MARKUP_IDS[k] if prefix == "a" and k < len(MARKUP_IDS) else f"{prefix}[{k}]"
            out.append({"id": sid, "text": f"[italic]{prefix} text {k}[/italic] ordered[mid]",
                        "input_ids": torch.randint(3, VOCAB, (6,), generator=g).tolist()})
        return out

    files = {}
    for t, n in (("a", 4), ("b", 3)):
        files[t] = tmp / f"{t}.jsonl"
        files[t].write_text("".join(json.dumps(r) + "\n" for r in rows(t, n)))
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})
    out = tmp / "run"
    toml = write_job_file(job, tmp / "job.toml", output={"path": str(out)},
                          tasks={"a": {"path": str(files["a"]), "name": "[red]math"}, "b": {"path": str(files["b"]), "name": "co[/]de"}})
    res = CliRunner().invoke(app, ["run", str(toml), "--inline"])
    assert res.exit_code == 0, res.output
    return out


def test_query_prints_ids_texts_and_task_names_as_written(markup_run):
    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(app, ["query", str(markup_run), "--layer", "0", "--head", "0", "--block", "Q", "--top", "12"],
                             env={"COLUMNS": "400"})
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 0, res.output
    for sid in MARKUP_IDS:
        assert sid in res.output, f"{sid!r} not shown as written:\n{res.output}"
    for name in ("[red]math", "co[/]de", "[italic]a text 0[/italic] ordered[mid]"):
        assert name in res.output, f"{name!r} not shown as written:\n{res.output}"


# ---------------------------------------------------------------- bug 9: an accepted damping cannot overflow the weights


def _pair_kernel():
    try:
        from workers.kernels import pair_kernel
    except ImportError:  # before the kernels moved out of the score stage
        from pipeline.score import pair_kernel
    return pair_kernel


def test_tiny_damping_on_a_zero_fisher_entry_scores_zero_not_nan():
    """Î = 0 where every gradient is 0; a tiny accepted damping_rel makes λ ~1e-84, so
    1/(Î+λ) and its root overflow float32: inf·0 = NaN where the formula gives 0."""
    from workers.fisher import damping, inverse_regularised
    from workers.sketch import operands

    rng = np.random.default_rng(0)
    g = rng.standard_normal((1, 1, 5, 8)).astype(np.float32) * 1e-2  # (layer, head, sample, param)
    g[..., :3] = 0.0  # these entries never get a gradient (e.g. an ablated head's)
    fisher = (g[0].astype(np.float64) ** 2).mean(axis=1)  # (head, param): 0 on the first 3 entries
    lam = damping(fisher[None], rel=1e-80, abs_=0.0)  # accepted by the job schema (damping_rel >= 0)
    inv = inverse_regularised(fisher[None], lam[:, None, None])
    assert np.isfinite(inv.astype(np.float32)).all() and np.isfinite(np.sqrt(inv).astype(np.float32)).all()
    out = _pair_kernel()(g, g, inv)  # (2, 1, 1, 5, 5)
    assert np.isfinite(out).all()
    ref = np.einsum("ip,p,jp->ij", g[0, 0].astype(np.float64) ** 2, inv[0, 0], np.abs(g[0, 0].astype(np.float64)))
    np.testing.assert_allclose(out[0, 0, 0], ref, rtol=1e-5)
    u, v, w = operands(torch.from_numpy(g[0, 0]), torch.from_numpy(inv[0, 0].astype(np.float32)))
    assert torch.isfinite(u).all() and torch.isfinite(w).all()


def test_run_with_a_tiny_damping_and_an_ablated_head_has_finite_scores(tmp_path):
    """End to end: head 0 of layer 0 ablated (its O columns zeroed), so its Q/K/V gradients and
    Fisher are exactly 0; damping_rel = 1e-80 is accepted and the run's scores are finite, 0 there."""
    import xarray as xr
    from typer.testing import CliRunner

    from pipeline.cli import app
    from qkov.testing import save_model, tiny_job, tiny_model, write_job_file

    model = tiny_model("llama", seed=0)
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, :hd] = 0.0
    folder = save_model(model, None, tmp_path / "ablated")
    job = tiny_job(tmp_path, "llama", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})
    out = tmp_path / "run"
    toml = write_job_file(job, tmp_path / "job.toml", model={"path": str(folder)}, output={"path": str(out)},
                          fisher={"damping_rel": 1e-80, "damping_abs": 0.0}, score={"layers": [0], "blocks": ["Q", "V"]})
    res = CliRunner().invoke(app, ["run", str(toml), "--inline"])
    assert res.exit_code == 0, res.output
    scores = xr.open_zarr(out, group="scores", consolidated=False)
    for var in ("interference", "alignment"):
        vals = scores[var].values
        assert np.isfinite(vals).all(), f"{var}: {np.isnan(vals).sum()} NaN"
        assert (scores[var].sel(layer=0, head=0).values == 0).all()
