"""Task files in every supported format read the same samples, and each format's bad input is
refused in one line naming the file and the row (exit 2 from the CLI)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkov.pipeline.cli import app
from qkov.pipeline.errors import TaskFileError
from qkov.pipeline.spec import TaskSpec
from qkov.testing import VOCAB, tiny_job, write_job_file
from qkov.workers.tasks import load_task

ROWS = [  # ids as users write them (a number, a string), text and tokens, a classifier label
    {"id": 7, "text": "two plus two", "input_ids": [1, 5, 9, 3], "label": 1},
    {"id": "b-2", "text": "def f(x): return x", "input_ids": [4, 4, 8], "label": 0},
    {"id": "1.50", "text": "a, \"quoted\" cell", "input_ids": [2, 7, 7, 7, 6], "label": 2},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:  # lists as JSON text, the way pandas users write them with json.dumps
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def _table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist([{**r, "id": str(r["id"])} for r in rows])


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(_table(rows), path)
    return path


def write_dataset(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list([{**r, "id": str(r["id"])} for r in rows]).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": (write_jsonl, "t.jsonl"), "csv": (write_csv, "t.csv"), "parquet": (write_parquet, "t.parquet"),
           "datasets": (write_dataset, "t_folder")}


def spec(path: Path, **kw) -> TaskSpec:
    return TaskSpec(name="t", path=str(path), **kw)


def as_tuples(samples) -> list[tuple]:
    return [(s.id, s.input_ids, s.text, s.label, s.targets) for s in samples]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_reads_the_same_samples(tmp_path, fmt):
    write, name = WRITERS[fmt]
    got = load_task(spec(write(tmp_path / name, ROWS)), None, max_length=4, label="a")
    want = load_task(spec(write_jsonl(tmp_path / "ref.jsonl", [{**r, "id": str(r["id"])} for r in ROWS])), None, 4, "a")
    assert as_tuples(got) == as_tuples(want)
    assert [s.id for s in got] == ["7", "b-2", "1.50"] and got[2].input_ids == (2, 7, 7, 7)  # truncated to 4
    # limit reads the first rows only; an id_field of None numbers the rows
    two = load_task(spec(tmp_path / name, limit=2, id_field=None), None, 4, "a")
    assert [s.id for s in two] == ["a-0", "a-1"] and as_tuples(two)[0][1:] == as_tuples(want)[0][1:]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_completion_labels_read_alike_in_every_format(tmp_path, fmt):
    """input_ids rows with HF labels (-100 = not predicted) give the same targets everywhere."""
    rows = [{"id": "q1", "input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]},
            {"id": "q2", "input_ids": [8, 9, 2], "labels": [-100, 9, 2]}]
    write, name = WRITERS[fmt]
    got = load_task(spec(write(tmp_path / name, rows), loss="completion"), None, 16, "a")
    assert [s.targets for s in got] == [(False, False, True, True), (False, True, True)]
    # loss = "all" ignores the labels: every next token counts
    assert [s.targets for s in load_task(spec(tmp_path / name), None, 16, "a")] == [None, None]


def refusal(path: Path, match: str, **kw) -> str:
    with pytest.raises(TaskFileError, match=match) as e:
        load_task(spec(path, **kw), None, 16, "a")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_a_shuffled_selected_sharded_dataset_reads_in_its_own_order(tmp_path):
    """What users save: a shuffled subset (an indices mapping) in several shard files."""
    import datasets

    ds = datasets.Dataset.from_list([{"id": str(i), "input_ids": [i + 1, i + 2]} for i in range(10)])
    picked = ds.shuffle(seed=0).select(range(6))
    picked.save_to_disk(str(tmp_path / "picked"), num_shards=2)
    got = load_task(spec(tmp_path / "picked"), None, 8, "a")
    assert [s.id for s in got] == [r["id"] for r in picked] and [s.input_ids for s in got] == [tuple(r["input_ids"]) for r in picked]


def test_a_csv_cell_longer_than_csvs_default_limit_is_read(tmp_path):
    long = " ".join(["word"] * 60_000)  # 300 KB in one cell
    (s,) = load_task(spec(write_csv(tmp_path / "long.csv", [{"id": "doc", "text": long, "input_ids": [1, 2, 3]}])), None, 8, "a")
    assert s.text == long and s.input_ids == (1, 2, 3)


def test_each_formats_bad_input_is_named(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('id,input_ids\nx,"[1, 2]"\ny,"[3, 4]",extra\n', encoding="utf-8")
    assert "line 3" in refusal(ragged, "columns expected")
    badlist = tmp_path / "badlist.csv"
    badlist.write_text('id,input_ids\nx,"[1, 2"\n', encoding="utf-8")
    assert "line 2" in refusal(badlist, "not a JSON list")
    neg = write_parquet(tmp_path / "neg.parquet", [{"id": "x", "input_ids": [1, -2]}])
    assert "row 1" in refusal(neg, "input_ids must be a list of ints >= 0")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    refusal(broken, "not a readable Parquet file")
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"input_ids": [1, 2]}])}).save_to_disk(str(dd))
    assert str(dd / "train") in refusal(dd, "a DatasetDict folder")
    plain = tmp_path / "plain_folder"
    plain.mkdir()
    refusal(plain, "not one written by datasets")
    nolabels = write_csv(tmp_path / "nolabels.csv", [{"id": "x", "input_ids": [1, 2, 3]}])
    refusal(nolabels, "needs HF-style `labels`", loss="completion")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"id": "x", "input_ids": [1, 2, 3], "labels": [-100, 7, 3]}])
    refusal(wrong, r"labels\[1\] = 7 is neither -100 nor the token", loss="completion")
    prompt_only = write_jsonl(tmp_path / "prompt_only.jsonl", [{"id": "x", "input_ids": [1, 2, 3], "labels": [1, -100, -100]}])
    refusal(prompt_only, "no completion token within the first 16 tokens", loss="completion")


def test_a_bad_row_in_any_format_exits_2_from_the_cli(tmp_path):
    """`qkov validate` reads the task files: one line naming the file and row, exit 2, no traceback."""
    job = tiny_job(tmp_path, "llama_gqa", n_a=3, n_b=3)
    bad = {"csv": ('id,input_ids\nx,"[1, 2, 3]"\ny,"[1, 2,"\n', "line 3"),
           "parquet": (None, "row 2")}
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(bad["csv"][0], encoding="utf-8")
    bad_pq = write_parquet(tmp_path / "bad.parquet", [{"id": "x", "input_ids": [1, 2]}, {"id": "y", "input_ids": [1, VOCAB + 5]}])
    for path, where, says in ((bad_csv, "line 3", "not a JSON list"), (bad_pq, "", "vocabulary size")):
        jf = write_job_file(job, tmp_path / f"job_{path.suffix[1:]}.toml",
                            tasks={"b": {"name": "b", "path": str(path)}})
        res = CliRunner().invoke(app, ["validate", str(jf)])
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        out = " ".join(res.output.split())
        assert res.exit_code == 2 and says in out and where in out and "Traceback" not in out, out
