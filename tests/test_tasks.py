"""Task files: text and input_ids rows, ids, limit, truncation, every error; the built-in demo tasks."""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from qkov.pipeline.data import make_tasks
from qkov.pipeline.spec import ModelSpec, TaskSpec
from qkov.workers.tasks import Sample, TaskFileError, load_task, validate_vocab

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "pipeline" / "data"
VOCAB = {"<unk>": 0, "<s>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6, "a": 7, "dog": 8, "ran": 9}


def _word_tokenizer():
    """A whitespace word-level fast tokenizer that prepends <s> by default, like Llama's."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    t = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>", model_max_length=4)


@pytest.fixture(scope="module")
def word_tokenizer():
    return _word_tokenizer()


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _spec(path: Path, **kw) -> TaskSpec:
    return TaskSpec(name="t", path=str(path), **kw)


def _ids(text: str) -> list[int]:
    return [1] + [VOCAB[w] for w in text.split()]


def test_text_rows_are_tokenised_with_bos(tmp_path, capfd):
    texts = ["the cat sat on the mat", "a dog ran"]
    p = _write(tmp_path / "t.jsonl", [{"id": "s1", "text": texts[0]}, {"id": "s2", "text": texts[1], "label": 1}])
    samples = load_task(_spec(p), _word_tokenizer(), max_length=64, label="math")  # fresh: it warns once per instance
    assert samples == [
        Sample(id="s1", task="math", input_ids=tuple(_ids(texts[0])), text=texts[0], label=None),
        Sample(id="s2", task="math", input_ids=tuple(_ids(texts[1])), text=texts[1], label=1),
    ]
    # 7 tokens > the tokenizer's model_max_length=4, and still no "sequence too long" warning (a log line)
    assert "longer than" not in capfd.readouterr().err


def test_custom_text_field(tmp_path, word_tokenizer):
    p = _write(tmp_path / "t.jsonl", [{"id": "x", "prompt": "a dog"}])
    (s,) = load_task(_spec(p, text_field="prompt"), word_tokenizer, 16, "a")
    assert s.input_ids == (1, 7, 8)


def test_input_ids_rows_need_no_tokenizer(tmp_path):
    p = _write(tmp_path / "t.jsonl", [{"id": "a", "input_ids": [5, 0, 7]}, {"id": "b", "input_ids": [3, 3], "text": "shown"}])
    samples = load_task(_spec(p), None, 16, "code")
    assert [(s.id, s.input_ids, s.text) for s in samples] == [("a", (5, 0, 7), None), ("b", (3, 3), "shown")]
    assert {s.task for s in samples} == {"code"}


def test_ids_kept_as_written_and_defaults(tmp_path):
    rows = [
        '{"id": "007", "input_ids": [1, 2]}',
        '{"id": 7, "input_ids": [1, 2]}',
        '{"id": 1.50, "input_ids": [1, 2]}',
        '{"id": "x y", "input_ids": [1, 2]}',
        '',  # blank lines are skipped and do not count as rows
        '{"input_ids": [1, 2]}',
    ]
    p = _write(tmp_path / "t.jsonl", rows)
    assert [s.id for s in load_task(_spec(p), None, 8, "math")] == ["007", "7", "1.50", "x y", "math-4"]
    # id_field None: every id is the default
    assert [s.id for s in load_task(_spec(p, id_field=None), None, 8, "b")] == [f"b-{k}" for k in range(5)]
    # another id field name
    q = _write(tmp_path / "u.jsonl", [{"key": "k1", "input_ids": [1, 2]}, {"key": 12, "input_ids": [3, 4]}])
    assert [s.id for s in load_task(_spec(q, id_field="key"), None, 8, "a")] == ["k1", "12"]


def test_limit_reads_first_rows_only(tmp_path):
    rows = [{"id": f"r{k}", "input_ids": [k, k + 1]} for k in range(5)] + ["{not json"]
    p = _write(tmp_path / "t.jsonl", rows)
    samples = load_task(_spec(p, limit=3), None, 8, "a")
    assert [s.id for s in samples] == ["r0", "r1", "r2"]
    with pytest.raises(TaskFileError, match=r"line 6: invalid JSON"):
        load_task(_spec(p), None, 8, "a")


def test_limit_larger_than_file(tmp_path):
    p = _write(tmp_path / "t.jsonl", [{"input_ids": [1, 2]}] * 3)
    with pytest.raises(TaskFileError, match=r"limit=10 but the file has only 3 rows") as e:
        load_task(_spec(p, limit=10), None, 8, "a")
    assert str(p) in str(e.value)


def test_truncation_of_ids_and_text(tmp_path, word_tokenizer):
    p = _write(tmp_path / "t.jsonl", [{"id": "long", "text": "the cat sat on the mat"}, {"id": "ids", "input_ids": list(range(10))}])
    a, b = load_task(_spec(p), word_tokenizer, max_length=4, label="t")
    assert a.input_ids == (1, 2, 3, 4) and a.text == "the cat sat"  # <s> + 3 words; text cut to what is kept
    assert b.input_ids == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("", r"empty task file"),
        ("\n  \n", r"empty task file"),
        ('{"input_ids": [1, 2]}\n{"input_ids": [1, 2], \n', r"line 2: invalid JSON"),
        ('[1, 2, 3]\n', r"line 1: expected a JSON object"),
        ('{"input_ids": [1, 2]}\n{"body": "x", "id": "q"}\n', r"line 2: row has neither the text field 'text' nor 'input_ids' \(its fields: \['body', 'id'\]\)"),
        ('{"id": "neg", "input_ids": [1, -2]}\n', r"line 1 \(sample 'neg'\): input_ids must be a list of ints >= 0"),
        ('{"id": "flt", "input_ids": [1, 2.0]}\n', r"sample 'flt'.*input_ids must be a list of ints"),
        ('{"id": "bool", "input_ids": [true, 2]}\n', r"sample 'bool'.*input_ids must be a list of ints"),
        ('{"id": "s", "input_ids": [4, 5], "label": "pos"}\n', r"sample 's'.*label must be an int >= 0"),
        ('{"id": null, "input_ids": [4, 5]}\n', r"line 1: id field 'id' must be a non-empty string or a number"),
        ('{"id": "one", "input_ids": [4]}\n', r"line 1: sample 'one' has 1 token\(s\); at least 2"),
        ('{"id": "e", "input_ids": []}\n', r"sample 'e' has 0 token\(s\)"),
        (
            '{"id": "a", "input_ids": [1, 2]}\n{"id": "b", "input_ids": [1, 2]}\n{"id": "a", "input_ids": [1, 2]}\n'
            '{"id": 5, "input_ids": [1, 2]}\n{"id": "5", "input_ids": [1, 2]}\n',
            r"duplicate sample ids \(2\): 'a' on lines \[1, 3\]; '5' on lines \[4, 5\]",
        ),
    ],
)
def test_errors_name_file_and_line(tmp_path, content, pattern):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(TaskFileError, match=pattern) as e:
        load_task(_spec(p), None, 8, "a")
    assert str(e.value).startswith(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(TaskFileError, match=r"task 't': task file not found: .*nope\.jsonl"):
        load_task(_spec(tmp_path / "nope.jsonl"), None, 8, "a")


def test_text_rows_without_tokenizer(tmp_path):
    p = _write(tmp_path / "t.jsonl", [{"id": "a", "input_ids": [1, 2]}, {"id": "b", "text": "hello"}])
    with pytest.raises(TaskFileError, match="tokenizer missing for text tasks: give rows with input_ids or a model folder with a tokenizer"):
        load_task(_spec(p), None, 8, "a")


def test_short_text_sample_named(tmp_path, word_tokenizer):
    p = _write(tmp_path / "t.jsonl", [{"id": "ok", "text": "a dog"}, {"id": "tiny", "text": ""}])
    with pytest.raises(TaskFileError, match=r"line 2: sample 'tiny' has 1 token"):  # only <s>
        load_task(_spec(p), word_tokenizer, 8, "a")


def test_validate_vocab(tmp_path):
    p = _write(tmp_path / "t.jsonl", [{"id": "fine", "input_ids": [0, 9]}, {"id": "big", "input_ids": [3, 12]}, {"id": "edge", "input_ids": [10, 1]}])
    samples = load_task(_spec(p), None, 8, "math")
    validate_vocab(samples, 13)
    with pytest.raises(TaskFileError, match=r"task 'math': 2 sample\(s\) have token ids >= the model's vocabulary size 10: 'big' \(max id 12\), 'edge' \(max id 10\)"):
        validate_vocab(samples, 10)


# ------------------------------------------------------------------ built-in demo tasks

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer; converting the model once into the repo's .cache/qkov (reused across runs)."""
    from qkov.workers.models import load_tokenizer

    old = os.environ.get("QKOV_CACHE")
    os.environ["QKOV_CACHE"] = old or str(ROOT / ".cache" / "qkov")
    try:
        yield load_tokenizer(ModelSpec(name="smollm2-135m"))
    finally:
        if old is None:
            os.environ.pop("QKOV_CACHE")


DEMO_TASKS = [("arithmetic.jsonl", "arith"), ("python_code.jsonl", "code"), ("geography.jsonl", "geo")]


def _rows(fname: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / fname).read_text(encoding="utf-8").splitlines()]


def test_demo_files_are_generated_by_the_script():
    files = make_tasks.render()
    assert sorted(files) == sorted(f for f, _ in DEMO_TASKS)
    for name, content in files.items():
        assert (DATA / name).read_text(encoding="utf-8") == content, f"{name} is stale: run python -m qkov.pipeline.data.make_tasks"


@pytest.mark.parametrize("fname, prefix", DEMO_TASKS)
def test_demo_rows_split_into_prompt_and_completion(fname, prefix):
    rows = _rows(fname)
    assert [r["id"] for r in rows] == [f"{prefix}-{k:03d}" for k in range(1, 65)]  # unique, in order
    assert len({r["text"] for r in rows}) == 64
    for r in rows:
        assert list(r) == ["id", "text", "prompt", "completion"], r
        assert r["prompt"] and r["completion"], r
        assert r["prompt"] + r["completion"] == r["text"], r
    if prefix == "arith":  # the question up to its "?", then the worked answer from its space
        assert all(r["prompt"].endswith("?") and "?" not in r["completion"] for r in rows)
        assert all(re.fullmatch(r" [0-9 ()+\-×÷]+ = -?\d+\. .+", r["completion"]) for r in rows)
    elif prefix == "code":  # the header and docstring parse on their own; the body follows from the newline
        for r in rows:
            assert r["prompt"].endswith('"""') and r["completion"].startswith("\n"), r
            node = ast.parse(r["prompt"]).body[-1]
            assert isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node), r
            assert len(node.body) == 1, r  # nothing of the body is in the prompt
    else:
        assert all(r["completion"].startswith(" ") and r["completion"][1].isupper() for r in rows)
        assert all(r["prompt"].endswith(("?", ".")) for r in rows)


def test_rows_check_names_broken_splits():
    good = {"id": "a-1", "text": "Q? A.", "prompt": "Q?", "completion": " A."}
    assert make_tasks.row_problems([good]) == []
    bad = [good, {**good, "id": "a-2", "completion": " B."}, {**good, "id": "a-3", "prompt": "", "completion": "Q? A."},
           {"id": "a-4", "text": "x"}, dict(good)]
    assert make_tasks.row_problems(bad) == [
        "a-2: prompt + completion != text", "a-3: empty prompt or completion",
        "a-4: fields ['id', 'text'], expected ['id', 'text', 'prompt', 'completion']", "repeated ids", "repeated texts",
    ]


def test_geography_facts_table():
    names = [c.name for c in make_tasks.COUNTRIES]
    assert len(set(names)) == len(names)
    assert len({c.capital for c in make_tasks.COUNTRIES}) == len(names)
    for c in make_tasks.COUNTRIES:
        assert c.neighbour != c.name and c.largest_city != "" and c.capital and c.currency, c
        assert not (c.island and c.neighbour), c
    facts = make_tasks.geography_facts()
    assert len(facts) == 64 and len({(f.country, f.template) for f in facts}) == 64
    assert {f.template for f in facts} == {t.__name__.removeprefix("_geo_") for t in make_tasks.GEOGRAPHY}
    assert [f.text for f in facts] == [r["text"] for r in _rows("geography.jsonl")]
    assert all(f.country.removeprefix("the ") in f.text for f in facts)
    assert make_tasks.geography_facts() == facts  # seeded: the same every time


@pytest.mark.parametrize("fname, prefix", DEMO_TASKS)
def test_demo_tasks_load_with_smollm2(smollm2_tokenizer, fname, prefix):
    samples = load_task(TaskSpec(name=prefix, path=str(DATA / fname)), smollm2_tokenizer, 128, prefix)
    assert [s.id for s in samples] == [f"{prefix}-{k:03d}" for k in range(1, 65)]
    lengths = [len(s.input_ids) for s in samples]
    assert 20 <= min(lengths) and max(lengths) <= 80, lengths
    assert len({s.text for s in samples}) == 64  # no repeated sample
    validate_vocab(samples, len(smollm2_tokenizer))


def test_arithmetic_answers_are_correct():
    rows = [json.loads(line) for line in (DATA / "arithmetic.jsonl").read_text().splitlines()]
    kinds = set()
    for r in rows:
        # "... question? <expression> = <answer>. <answer sentence>": recompute the expression independently
        m = re.search(r"\? ([0-9 ()+\-×÷]+) = (-?\d+)\. (.*)$", r["text"])
        assert m, r
        expr, answer, sentence = m.groups()
        assert eval(expr.replace("×", "*").replace("÷", "/")) == int(answer), r  # noqa: S307
        assert answer in sentence, r
        kinds.add(re.sub(r"\d+", "N", expr))
    assert len(kinds) >= 10  # many different operation shapes, not one template


def test_code_samples_run_and_pass_their_checks():
    texts = {json.loads(line)["text"] for line in (DATA / "python_code.jsonl").read_text().splitlines()}
    funcs = make_tasks.python_functions()
    assert {f.text for f in funcs} == texts
    for f in funcs:
        ns: dict = {}
        exec(compile(f.text, "<sample>", "exec"), ns)  # noqa: S102
        assert f.checks and all(eval(c, ns) for c in f.checks), f.text  # noqa: S307
        assert '"""' in f.text  # every sample has a docstring
    assert sum(f.text.lstrip().startswith(("class", "from dataclasses")) or "\nclass " in f.text for f in funcs) >= 3
