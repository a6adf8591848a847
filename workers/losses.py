"""Per-sample losses: the seam between a model family and the gradient code.

A `LossTask` turns a batch into one loss per sample, each the sample's *own*
loss (a mean over its own tokens, never over the batch), so that gradients of
their sum are per-sample gradients that do not depend on batch composition.
Losses are computed in float32 from the logits whatever the model dtype.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

# Keys a batch may carry that are model inputs (anything else, e.g. labels, is the task's).
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@runtime_checkable
class LossTask(Protocol):
    name: str

    def per_sample_loss(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """(B,) float32: each sample's own loss, differentiable w.r.t. the model's activations."""
        ...


def attention_mask_of(batch: dict[str, Tensor]) -> Tensor:
    """The batch's attention mask, or all ones when it has none."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"]) if mask is None else mask


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch}


def batch_labels(labels, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
    """A batch's `labels` from per-sample ones, or None when no sample has one.

    A sample's label is a class index (a classifier: (B,) with -100 for none) or, for a
    completion loss, its target mask (a tuple of bools per token: a causal LM's (B, T) HF labels,
    the token where it is a target and -100 elsewhere, padding included; a sample without one
    has every real token a target)."""
    if labels is None or all(lab is None for lab in labels):
        return None
    if all(lab is None or isinstance(lab, int) for lab in labels):
        return torch.tensor([-100 if lab is None else lab for lab in labels], dtype=torch.long, device=input_ids.device)
    if not all(lab is None or isinstance(lab, tuple) for lab in labels):
        raise ValueError("a batch mixes class labels and completion target masks")
    keep = attention_mask != 0
    for r, lab in enumerate(labels):
        if lab is not None:
            row = torch.zeros(keep.shape[1], dtype=torch.bool)
            row[: len(lab)] = torch.as_tensor(lab, dtype=torch.bool)
            keep[r] &= row.to(keep.device)
    return torch.where(keep, input_ids, torch.full_like(input_ids, -100))


def pad_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[int | tuple[bool, ...] | None] | None, device,
              pad_id: int = 0) -> dict[str, Tensor]:
    """A right-padded batch, the one every path builds (extraction, checks, the prediction check);
    padding is masked out of attention and of the loss. labels: class indices or completion target
    masks (`batch_labels`)."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for r, x in enumerate(input_ids):
        ids[r, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[r, : len(x)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    lab = batch_labels(labels, batch["input_ids"], batch["attention_mask"])
    if lab is not None:
        batch["labels"] = lab
    return batch


def causal_lm_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> Tensor:
    """Mean next-token NLL per sample, (B,) float32.

    Position t predicts token t+1; a prediction counts when both tokens are real
    (attention_mask = 1), so padding on either side never enters the loss, and, given
    HF-style causal-LM `labels` (B, T), when token t+1's label is not -100 (a completion
    loss: the prompt's tokens are context, never targets).
    """
    supervised = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
    if labels is not None:
        supervised = supervised & (labels[:, 1:] != -100)
    counts = supervised.sum(dim=1)
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"samples {bad} have fewer than 2 real tokens (or, with a completion loss, no completion "
                         "token after the first): a causal-LM loss needs at least one next-token prediction")
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(counts.shape[0], -1) * supervised
    return nll.sum(dim=1) / counts


def completion_labels(batch: dict[str, Tensor]) -> Tensor | None:
    """The batch's causal-LM labels (B, T) when it carries a completion mask, else None
    (a (B,) `labels` is a classifier's classes)."""
    labels = batch.get("labels")
    return labels if labels is not None and labels.dim() == 2 else None


class CausalLMLoss:
    """Mean next-token NLL over each sample's real tokens (HF `labels = input_ids`), or over its
    completion's tokens when the batch carries HF labels with -100 on the prompt."""

    name = "causal_lm"

    def per_sample_loss(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model(**model_inputs(batch), use_cache=False).logits
        return causal_lm_nll(logits, batch["input_ids"], attention_mask_of(batch), completion_labels(batch))


class SequenceClassificationLoss:
    """Cross-entropy of `batch["labels"]` (one class index per sample)."""

    name = "sequence_classification"

    def per_sample_loss(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            raise ValueError("sequence classification needs batch['labels'] (one class index per sample)")
        logits = model(**model_inputs(batch)).logits
        return F.cross_entropy(logits.float(), batch["labels"].to(logits.device), reduction="none")


def _class_names(mapping) -> set[str]:
    """Class names of a transformers auto mapping (values are names or tuples of names)."""
    out: set[str] = set()
    for v in mapping.values():
        out.update((v,) if isinstance(v, str) else v)
    return out


def loss_task_for(model: torch.nn.Module) -> LossTask:
    """The loss task matching a transformers model's head."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    cls = type(model).__name__
    # The mappings know the odd names (GPT2LMHeadModel); the suffixes cover models they do not list.
    if cls in _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or cls.endswith("ForCausalLM"):
        return CausalLMLoss()
    if cls in _class_names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) or cls.endswith("ForSequenceClassification"):
        return SequenceClassificationLoss()
    raise ValueError(
        f"no loss task for model class {cls}: supported are causal-LM heads (*ForCausalLM, GPT2LMHeadModel, ...) "
        "and sequence classifiers (*ForSequenceClassification); load the model with one of these heads "
        "or pass your own LossTask (an object with `name` and `per_sample_loss(model, batch) -> (B,) tensor`)"
    )
