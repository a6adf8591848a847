"""Damage anywhere in a finished run is refused in one line or changes nothing (issue 32,
classes 1 and 2): a flipped byte in a random chunk of every group, and each array's metadata
edited to a wrong shape, data type or layout version. `qkov stats`, `query` and `report` each
exit 0 with the intact run's results or exit 2 with one line naming what is damaged; never a
traceback, never other numbers, never a shorter table.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

GROUPS = ("gradients", "fisher", "scores", "stats", "diagnostics")
# the commands, run from the case's folder on `run` (so that their output never names the folder)
STATS = ("stats", "run", "--name", "again")
COMMANDS = {
    "stats": STATS,
    "query": ("query", "run", "--json"),  # every slice's answers
    "slice": ("query", "run", "--layer", "1", "--head", "1", "--block", "K", "--json"),  # its pairs, health, texts
}
REPORT = ("report", "run", "--out", "page")


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A finished tiny run keeping its top pairs (keep_pairs = "top": its own arrays, read by
    query and report), and what each command answers on it."""
    from qkov.pipeline.run import run_job
    from qkov.testing import tiny_job

    tmp = tmp_path_factory.mktemp("damage")
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9},
                   score={"keep_pairs": "top", "top_k": 10}, output={"path": str(tmp / "src" / "run")})
    run_job(job)
    src = Path(job.output.path)
    _copy(src, tmp / "ref")
    return src, _answers(tmp / "ref", COMMANDS)


def _invoke(folder: Path, args) -> tuple[int, str, str]:
    import os

    from typer.testing import CliRunner

    from qkov.pipeline.cli import app

    here = os.getcwd()
    os.chdir(folder)
    try:
        res = CliRunner().invoke(app, list(args), env={"COLUMNS": "2000"})
    finally:
        os.chdir(here)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{' '.join(args)}: a traceback, not a refusal") from res.exception
    return res.exit_code, res.stdout, res.stderr


def _stats_values(run: Path):
    import xarray as xr

    ds = xr.open_zarr(run, group="stats_again", consolidated=False).load()
    return ds.drop_attrs(deep=False)


def _answers(folder: Path, commands: dict) -> dict:
    out = {}
    for name, args in commands.items():
        code, stdout, stderr = _invoke(folder, args)
        if code == 0:
            stdout = _stats_values(folder / "run") if name == "stats" else stdout
        out[name] = (code, stdout, stderr)
    return out


def _same_or_refused(got: dict, ref: dict, case: str, names: tuple[str, ...] = ()) -> list[str]:
    """Each command exited 0 with the intact answer, or 2 with one error line (naming one of
    `names`, when given); returns the commands that refused."""
    import xarray as xr

    refused = []
    for cmd, (code, out, err) in got.items():
        if code == 0:
            if cmd == "stats":
                xr.testing.assert_identical(out, ref[cmd][1])
            else:
                assert out == ref[cmd][1], f"{case}: `{cmd}` exit 0 with other output"
            continue
        assert code == 2, f"{case}: `{cmd}` exit {code}:\n{out}\n{err}"
        errors = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in errors if not ln[:1].isdigit()]  # progress lines are timestamped
        assert len(errors) == 1 and errors[0].startswith("error: "), f"{case}: `{cmd}` not one line:\n{err}"
        assert "Traceback" not in err and (not names or any(n in errors[0] for n in names)), f"{case}: `{cmd}`: {errors[0]}"
        refused.append(cmd)
    return refused


def _copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(src, folder / "run"))


def _arrays(run: Path, group: str) -> list[Path]:
    return sorted(p.parent for p in (run / group).glob("*/zarr.json"))


def _chunks(array: Path) -> list[Path]:
    return sorted(p for p in (array / "c").rglob("*") if p.is_file()) if (array / "c").is_dir() else []


def _flip(rng: random.Random, run: Path, group: str) -> Path:
    """Flip one random byte of one random chunk of the group."""
    chunk = rng.choice([c for a in _arrays(run, group) for c in _chunks(a)])
    data = bytearray(chunk.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= rng.randrange(1, 256)
    chunk.write_bytes(bytes(data))
    return chunk


def test_every_chunk_of_a_finished_run_carries_a_checksum(intact):
    """Every array qkov wrote (statistics, diagnostics, top pairs, sums, Fisher, coordinates,
    not only gradients and pair scores) ends its codec chain in crc32c: the store's default."""
    src, _ = intact
    docs = {str(p.parent.relative_to(src)): json.loads(p.read_text()) for p in src.rglob("zarr.json")}
    arrays = {k: [c["name"] for c in d["codecs"]] for k, d in docs.items() if d["node_type"] == "array"}
    assert {k.split("/")[0] for k in arrays} == set(GROUPS)
    unchecked = {k: v for k, v in arrays.items() if v[-1] != "crc32c"}
    assert not unchecked, unchecked


# QKOV_DAMAGE_SEEDS=n: n seeds per group (1 in the suite, which keeps this file near 15 s on 2 cores)
SEEDS = range(int(__import__("os").environ.get("QKOV_DAMAGE_SEEDS", "1")))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group", GROUPS)
def test_a_flipped_byte_in_any_group_is_refused_or_harmless(intact, tmp_path, group, seed):
    src, ref = intact
    rng = random.Random(f"{group}-{seed}")
    run = _copy(src, tmp_path)
    chunk = _flip(rng, run, group)
    name = str(chunk.relative_to(run))
    got = _answers(tmp_path, COMMANDS)
    refused = _same_or_refused(got, ref, f"{name} damaged", names=(name,))
    for cmd in refused:
        assert "do not match its checksum" in got[cmd][2], got[cmd][2]
    # what reads the group meets the damage: scores (stats: its sums; the slice: its top pairs),
    # statistics (both queries), diagnostics and the samples' coordinates (the slice's health and texts)
    reads = {"scores": {"stats", "slice"}, "stats": {"query", "slice"}, "diagnostics": {"slice"}}.get(group, set())
    if group == "gradients" and name.split("/")[1] not in ("Q", "K", "V", "O"):  # not the gradients themselves
        reads = {"slice"}
    assert reads <= set(refused), f"{name}: read as data by {sorted(reads - set(refused))}"


def _edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


WIDER = {"float32": "float64", "float64": "float32", "int32": "int64", "int64": "int32", "int8": "int16",
         "uint16": "uint32", "bool": "int16", "string": "float64"}
SAME_SIZE = {"float32": "int32", "float64": "int64", "int32": "float32", "int64": "float64", "int8": "uint8",
             "uint16": "int16", "bool": "uint8"}


def _data_type(array: Path) -> str:
    dtype = json.loads((array / "zarr.json").read_text())["data_type"]
    return dtype if isinstance(dtype, str) else ""  # fixed-length strings: a dict


def _edits(rng: random.Random, run: Path) -> list[tuple[str, str, object]]:
    """(what, zarr.json relative to the run, change): one random array of a random group with its
    first axis 3 longer (9 -> 12 samples), with a data type of another size (float32 -> float64),
    with one of the same size (float32 -> int32); a random group's, the root's and the scores'
    layout versions."""
    def pick(group=None, ok=lambda a: True):
        return rng.choice([a for a in _arrays(run, group or rng.choice(GROUPS)) if ok(a)])

    shape, wider = pick(), pick(ok=lambda a: _data_type(a) in WIDER)
    same, group = pick(ok=lambda a: _data_type(a) in SAME_SIZE), rng.choice(GROUPS)
    where = lambda a: str((a / "zarr.json").relative_to(run))  # noqa: E731
    return [
        (f"{shape.relative_to(run)} shape", where(shape), lambda d: d["shape"].__setitem__(0, d["shape"][0] + 3)),
        (f"{wider.relative_to(run)} data type", where(wider), lambda d: d.update(data_type=WIDER[d["data_type"]])),
        (f"{same.relative_to(run)} data type (same size)", where(same), lambda d: d.update(data_type=SAME_SIZE[d["data_type"]])),
        (f"{group} schema version", f"{group}/zarr.json", lambda d: d["attributes"].update(qkov_schema_version=2)),
        ("root schema version", "zarr.json", lambda d: d["attributes"].update(qkov_schema_version=2)),
        ("scores layout version", "scores/zarr.json", lambda d: d["attributes"].update(scores_layout="compact-v3")),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_edited_metadata_is_refused_in_one_line(intact, tmp_path, seed):
    """An edit is refused by each command that reads what was edited (in one line naming it and
    the version found and expected) and changes nothing for the others; the run's and the
    scores' layout versions by every command."""
    src, ref = intact
    for k, (what, doc, change) in enumerate(_edits(random.Random(seed), src)):
        folder = tmp_path / f"e{k}"
        run = _copy(src, folder)
        _edit(run / doc, change)
        got = _answers(folder, COMMANDS)
        refused = _same_or_refused(got, ref, what, names=(what.split(" ")[0],) if "/" in what else ())
        if "version" in what:
            for cmd in refused:
                assert "version 2, this qkov reads version 1" in got[cmd][2] or "'compact-v3', this qkov reads" in got[cmd][2]
        if what.startswith(("root", "scores layout")):
            assert refused == list(COMMANDS), f"{what}: believed by {set(COMMANDS) - set(refused)}"


def test_report_refuses_damage_in_what_it_shows(intact, tmp_path):
    """`qkov report` (its figures take seconds, so only damage it must refuse before drawing):
    a flipped byte in the top pairs (it showed a shorter table), in the statistics (a zstd
    traceback), and their metadata declaring a data type of another size; nothing is left behind."""
    src, _ = intact
    rng = random.Random(0)
    cases = [("flip", "scores", lambda a: a.name.startswith("top_")), ("flip", "stats", lambda a: True),
             ("wider", "scores", lambda a: a.name.startswith("top_interference")), ("wider", "stats", lambda a: _data_type(a) in WIDER)]
    for k, (how, group, which) in enumerate(cases):
        folder = tmp_path / f"r{k}"
        run = _copy(src, folder)
        array = rng.choice([a for a in _arrays(run, group) if which(a)])
        if how == "flip":
            chunk = rng.choice(_chunks(array))
            data = bytearray(chunk.read_bytes())
            data[rng.randrange(len(data))] ^= 0x20
            chunk.write_bytes(bytes(data))
        else:
            _edit(array / "zarr.json", lambda d: d.update(data_type=WIDER[d["data_type"]]))
        code, out, err = _invoke(folder, REPORT)
        assert code == 2 and _same_or_refused({"report": (code, out, err)}, {}, f"{how} {array.name}",
                                              names=(f"{group}/{array.name}",)) == ["report"]
        assert not (folder / "page").exists()
