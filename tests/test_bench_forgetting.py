"""The forgetting benchmark's own parts (benchmarks/bench_forgetting.py), on a tiny model: its
slice scores, computed in parameter space from head semantics, equal the prediction check's
transfer (qkov.workers.prediction.transfer_all); every strategy freezes as many weights; a frozen
slice does not move under fine-tuning and only the chosen slices move when they alone train."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import bench_forgetting as bf
from qkov.testing import VOCAB, tiny_model
from qkov.workers import prediction as P
from qkov.workers.layouts import discover_layout
from qkov.workers.losses import loss_task_for


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, VOCAB, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(10)]
    model = tiny_model("llama_gqa", seed=0)
    layout = discover_layout(model)
    return model, layout, ids, bf.slice_scores(model, layout, ids[:5], ids[5:], fisher_batch=4, batch_size=3)


def test_slice_transfer_equals_the_prediction_checks(tiny):
    model, layout, ids, sc = tiny
    ref = P.transfer_all(model, layout, ids, None, 5, loss_task_for(model), "pooled", 0.99, 4, 1e-6, 0.0, batch_size=4)
    got = {(s.block, s.layer, s.head): t for s, t in zip(sc.slices, sc.transfer)}
    scale = float(np.abs(sc.transfer).max())  # per-sample gradients of other batches differ in the last bits
    assert len(got) == sum(v.size for v in ref.values())
    for (block, layer), heads in ref.items():
        np.testing.assert_allclose([got[(block, layer, h)] for h in range(heads.size)], heads, rtol=1e-6, atol=1e-7 * scale)
    assert (sc.interference > 0).all() and (sc.grad_b > 0).all()
    assert sc.transfer.min() < 0 < sc.transfer.max()  # a test with both signs: conflict and synergy differ


def test_strategies_freeze_equal_counts_and_frozen_means_frozen(tiny):
    model, layout, ids, sc = tiny
    assert len(set(sc.size.tolist())) == 1
    rng = np.random.default_rng(0)
    chosen = {s: bf.choose(s, sc, 5, rng) for s in bf.STRATEGIES}
    assert chosen["none"] == [] and all(len(set(c)) == 5 for s, c in chosen.items() if s != "none")
    assert chosen["conflict"] == sorted(np.argsort(sc.transfer)[:5].tolist())
    assert chosen["synergy"] == sorted(np.argsort(-sc.transfer)[:5].tolist())
    names = list(layout.param_names)
    params = dict(model.named_parameters())
    pristine = {n: params[n].detach().clone() for n in names}
    sl = [sc.slices[i] for i in chosen["conflict"]]
    order = np.arange(5)
    try:
        frozen = bf.masks_of(model, layout, sl)
        assert sum(int(v.sum()) for v in frozen.values()) == 5 * int(sc.size[0])
        bf.finetune(model, names, pristine, frozen, ids[5:], order, 2, 2, 1e-2)  # asserts the frozen entries held
        moved = {n: params[n].detach() != pristine[n] for n in names}
        assert any(bool((moved[n] & ~frozen[n]).any()) for n in names)
        only = bf.masks_of(model, layout, sl, invert=True)
        bf.finetune(model, names, pristine, only, ids[5:], order, 2, 2, 1e-2)
        for n in names:
            assert not bool(((params[n].detach() != pristine[n]) & only[n]).any()), n
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(pristine[n])
