"""`--resume` and `--overwrite` land on a run (issue 32, classes 3, 4 and 6): an output inside
another run (a symlink into its group) is refused; an interrupted `--overwrite` never leaves
the old run's groups beside a new one; a finished layer-grouped run that lost a score chunk is
repaired whatever `[output]` says now; a full disk mid-way is one line and the run resumes to
the intact result; statistics that cannot fit memory or a file name are refused before
anything is allocated or written; memory:// is refused for a cluster; `--exclude` matches ids
exactly."""
from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkov.pipeline import schema
from qkov.pipeline.cli import app
from qkov.pipeline.errors import StoreError, UsageError
from qkov.pipeline.run import run_job
from qkov.pipeline.store import DirectChunks, RunStore
from qkov.testing import assert_runs_close, tiny_job, write_job_file

VALUES = (schema.FISHER, schema.SCORES_GROUP, schema.DIAGNOSTICS, schema.STATS)


def qkov(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback is a bug, not a refusal
    return res.exit_code, " ".join(res.output.split())


def one_line_refusal(*args) -> str:
    code, out = qkov(*args)
    assert code == 2 and out.count("error:") == 1 and "Traceback" not in out, out
    return out


def tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


def with_output(job, path, **output):
    return job.model_copy(update={"output": job.output.model_copy(update={"path": str(path), **output})})


def assert_same_values(run, ref, groups=VALUES) -> None:
    assert_runs_close(run, ref, groups=groups)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny job and its finished ordinary run (the reference every repaired run must equal)."""
    tmp = tmp_path_factory.mktemp("resume_safety")
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, extract={"shard_size": 4, "batch_size": 4},
                   stats={"n_permutations": 9, "n_bootstrap": 9}, output={"path": str(tmp / "ref")})
    run_job(job)
    return tmp, job


@pytest.fixture(scope="module")
def full_disk(env, monkeypatch_module):
    """A layer-grouped run (one layer per group) whose disk fills while it extracts group 1,
    then `--resume`d on a disk with room: (the error, the run's path)."""
    tmp, job = env
    out = tmp / "full-disk"
    grouped = with_output(job, out, keep_gradients=False, layers_per_group=1)
    write = DirectChunks.write

    def no_space(self, idx, data):
        if f"{os.sep}r1{os.sep}" in self.folder:  # group 0 is scored and dropped; group 1 meets a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path(idx))
        return write(self, idx, data)

    monkeypatch_module.setattr(DirectChunks, "write", no_space)
    with pytest.raises(StoreError) as refused:
        run_job(grouped)
    monkeypatch_module.setattr(DirectChunks, "write", write)
    run_job(grouped, resume=True)
    return str(refused.value), out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ---------------------------------------------------------------- class 4: the file system refuses


def test_a_full_disk_mid_layer_group_is_one_line_and_the_run_resumes_to_the_intact_result(env, full_disk):
    message, out = full_disk
    assert "ENOSPC" in message and "--resume" not in message and "resume=True" in message, message
    assert "\n" not in message
    assert_same_values(out, env[1].output.path)
    assert not (out / schema.WORK).exists()


def test_the_command_line_names_what_the_file_system_refused(env, monkeypatch):
    """An OSError the file system raises (here: a read-only mount while the statistics are
    written) is exit 2 with one line, not a traceback."""
    tmp, job = env
    run = tmp / "read-only"
    shutil.copytree(job.output.path, run)

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(run / "stats_x"))

    monkeypatch.setattr(RunStore, "write_dataset", read_only)
    out = one_line_refusal("stats", run, "--name", "x", "--n-permutations", 19)
    assert "EROFS" in out and "read-only" in out
    import qkov as api  # the API gives the same one-line error (a StoreError), not the raw OSError

    with pytest.raises(StoreError, match="read-only") as e:
        api.run_stats(run, name="y", n_permutations=19)
    assert "\n" not in str(e.value)


def test_statistics_beyond_memory_or_a_file_name_are_refused_before_anything_is_allocated(env):
    tmp, job = env
    run = Path(job.output.path)
    before = tree(run)
    out = one_line_refusal("stats", run, "--n-permutations", 10**12)
    assert "--n-permutations = 1000000000000" in out and "of memory" in out and "this machine has" in out, out
    out = one_line_refusal("stats", run, "--name", "n" * 300, "--n-permutations", 19)
    assert "--name is 300 characters; at most 249" in out, out
    import qkov

    with pytest.raises(UsageError, match="n_permutations = 1000000000000"):
        qkov.run_stats(run, n_permutations=10**12)
    with pytest.raises(UsageError, match=r"stats\.n_permutations = 1000000000000"):  # a job's [stats], before any work
        run_job(with_output(job.model_copy(update={"stats": job.stats.model_copy(update={"n_permutations": 10**12})}),
                            tmp / "huge-stats"))
    assert not (tmp / "huge-stats").exists()
    assert tree(run) == before


# ---------------------------------------------------------------- class 3: resume lands on a run


def test_an_output_inside_another_run_is_refused(env):
    """output.path a symlink into another run's group: run, --resume and --overwrite refuse it
    in one line and the other run is untouched (--resume wrote a nested run inside it)."""
    tmp, job = env
    other = tmp / "other"
    shutil.copytree(job.output.path, other)
    link = tmp / "link-into-a-group"
    link.symlink_to(other / schema.FISHER)
    toml = write_job_file(job, tmp / "link.toml", output={"path": str(link)})
    before = tree(other)
    for flags in ((), ("--resume",), ("--overwrite",)):
        out = one_line_refusal("run", toml, "--inline", *flags)
        assert f"lies inside {other} (a qkov run)" in out, out
    assert tree(other) == before


def test_an_interrupted_overwrite_leaves_no_group_of_the_old_run(env, monkeypatch):
    """Ctrl-C while --overwrite deletes the old run (raised inside the deletion): the old run
    is no longer a run and --resume refuses it; the next --overwrite finishes the replacement
    and the new run holds only its own groups."""
    tmp, job = env
    out = tmp / "replaced"
    shutil.copytree(job.output.path, out)
    RunStore(str(out)).root("r+").attrs["old"] = True
    again = with_output(job, out)
    rmtree = shutil.rmtree

    def ctrl_c(path, *a, **k):  # the first folder the main thread deletes (zarr's own threads pass: the lock's release)
        if threading.current_thread() is threading.main_thread() and str(out) in str(path):
            monkeypatch.setattr(shutil, "rmtree", rmtree)
            raise KeyboardInterrupt
        return rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_job(again, overwrite=True)
    assert shutil.rmtree is rmtree  # it was interrupted while deleting
    assert not RunStore(str(out)).exists()  # nothing there opens as a run, old or new
    for refused in (dict(resume=True), {}):
        with pytest.raises(StoreError, match="interrupted --overwrite|interrupted overwrite=True"):
            run_job(again, **refused)
    run_job(again, overwrite=True)
    assert "old" not in RunStore(str(out)).root().attrs
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in Path(job.output.path).iterdir())
    assert_same_values(out, job.output.path)


def test_a_finished_layer_grouped_run_that_lost_a_score_chunk_is_repaired_whatever_output_says(env, full_disk):
    """Resumed after `keep_gradients = false` was removed from the job: the lost layer's group
    runs again (its gradients were dropped), the scores end complete and equal the intact run's
    (it died with `max() arg is an empty sequence`, leaving the scores marked incomplete)."""
    tmp, job = env
    out = tmp / "lost-chunk"
    shutil.copytree(full_disk[1], out)
    lost = out / schema.SCORES_GROUP / "pooled_interference_K" / "c" / "1" / "0" / "0" / "0"  # layer 1's tile
    lost.unlink()
    summary = run_job(with_output(job, out), resume=True)  # keep_gradients = true (the default) now
    assert summary.repaired_scores and summary.extract["computed"] == summary.extract["shards"] // 2 and summary.extract["groups"] == 2, summary
    assert RunStore(str(out)).is_complete(schema.SCORES_GROUP) and lost.exists()
    assert_same_values(out, job.output.path)
    assert not (out / schema.WORK).exists()


# ---------------------------------------------------------------- class 6: smaller edges


def test_memory_output_is_refused_for_a_cluster(env):
    tmp, job = env
    toml = write_job_file(job, tmp / "memory.toml", output={"path": "memory://qkov-resume-safety"})
    for args in (("validate", toml), ("run", toml)):
        out = one_line_refusal(*args)
        assert "memory:// store lives in this process only" in out and "--inline" in out, out
    import qkov

    with pytest.raises(UsageError, match="inline=True"):
        qkov.run(with_output(job, "memory://qkov-resume-safety"), progress=False)


def test_exclude_matches_ids_exactly(env):
    """`a1\\0` is not sample `a1` (numpy's fixed-width strings drop a trailing NUL)."""
    import qkov

    tmp, job = env
    run = tmp / "exclude"
    shutil.copytree(job.output.path, run)
    with pytest.raises(UsageError, match="not among the run's scored samples"):
        qkov.run_stats(run, exclude=["a1\0"], name="nul")
    assert not (run / "stats_nul").exists()


# ---------------------------------------------------------------- class 5: hints only when true


def test_the_summary_never_offers_a_rerun_that_cannot_add_what_is_missing(env):
    """All sharing ratios / transfer tests undefined (NaN) in statistics that have them: the
    note says so, instead of "rerun `qkov stats` to add them"."""
    from qkov.pipeline.query import headline_tables

    stats = RunStore(env[1].output.path).open_stats()
    for v in [v for v in stats.data_vars if str(v).startswith(("sharing", "transfer", "cosine"))]:
        stats[v] = stats[v].where(False)
    notes = {t["key"]: t["note"] for t in headline_tables(stats, 5)}
    assert "rerun `qkov stats`" not in notes["shared"] and "undefined (NaN) in every slice" in notes["shared"], notes
    assert "rerun `qkov stats`" not in notes["conflict"] and "undefined (NaN) in every slice" in notes["conflict"], notes
    old = stats.drop_vars([v for v in stats.data_vars if str(v).startswith("sharing")])
    assert "rerun `qkov stats` to add them" in {t["key"]: t["note"] for t in headline_tables(old, 5)}["shared"]
