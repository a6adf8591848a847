"""What a score tile is reduced to where it lies, numpy and torch side by side.

Each reduction is a partial that adds up (top pairs: merges) over the tiles of a slice:
  the statistics' sums  `stat_sums_np` (numpy: the stats stage on CPU workers) and
                        `stat_sums` / `stat_sums_t` (torch: GPU workers and the score tasks)
  the top A×B pairs     `tile_top` (numpy) and `tile_top_t` (torch), merged by `best_k`
  the diagnostics       `side_parts` (torch, in the score tasks)
Each numpy/torch pair is pinned by one equality test (tests/test_stats_stage.py for the
sums, tests/test_keep_pairs.py for the top pairs). The weight rows come from the stats
stage (`qkov.pipeline.slice_reductions.stats_weights`): here they are only multiplied.
"""
from __future__ import annotations

import threading

import numpy as np

from .parts import DiagnosticParts

# ---------------------------------------------------------------- the statistics' sums, numpy


def cross_sums(S: np.ndarray, left: np.ndarray, right: np.ndarray, max_bytes: int = 64 * 2**20) -> np.ndarray:
    """Σ_ij left[k, i] · S[..., i, j] · right[k, j] for every weight row k.

    S: [..., n, m] (any float dtype; accumulated in float64), left: [K, n],
    right: [K, m] -> [..., K]. Computed as rowsum((left @ S) * right), with the slices
    side by side in one matmul (one BLAS call, not one per small slice), in groups that
    keep the [K, slices·m] intermediate under `max_bytes`.
    """
    S = np.asarray(S, dtype=np.float64)
    lead, (n, m) = S.shape[:-2], S.shape[-2:]
    k = left.shape[0]
    if S.size == 0:  # e.g. a sample chunk with no A rows: contributes nothing
        return np.zeros((*lead, k))
    flat = S.reshape(-1, n, m)
    out = np.empty((flat.shape[0], k))
    step = max(1, max_bytes // (8 * k * max(m, 1)))
    for s0 in range(0, flat.shape[0], step):
        part = flat[s0 : s0 + step]
        g = part.shape[0]
        prod = (left @ part.transpose(1, 0, 2).reshape(n, g * m)).reshape(k, g, m)
        out[s0 : s0 + g] = np.einsum("kgm,km->gk", prod, right)
    return out.reshape(*lead, k)


def _left_products(S: np.ndarray, left: np.ndarray, rights: list[np.ndarray], max_bytes: int = 64 * 2**20) -> np.ndarray:
    """Σ_ij left[k, i] S[..., i, j] right_r[k, j] for several right weight matrices at the
    cost of one matmul (left @ S is shared): S [..., n, m], left [K, n], rights [K, m]
    each -> [..., K, len(rights)]. Grouped over slices like `cross_sums`."""
    lead, (n, m) = S.shape[:-2], S.shape[-2:]
    k = left.shape[0]
    out = np.zeros((int(np.prod(lead, dtype=np.int64)), k, len(rights)))
    if S.size == 0:
        return out.reshape(*lead, k, len(rights))
    flat = S.reshape(-1, n, m)
    step = max(1, max_bytes // (8 * k * max(m, 1)))
    for s0 in range(0, flat.shape[0], step):
        part = flat[s0 : s0 + step]
        g = part.shape[0]
        prod = (left @ part.transpose(1, 0, 2).reshape(n, g * m)).reshape(k, g, m)
        for r, right in enumerate(rights):
            out[s0 : s0 + g, :, r] = np.einsum("kgm,km->gk", prod, right, optimize=True)  # BLAS path: 3x faster
    return out.reshape(*lead, k, len(rights))


def pair_sums(S: np.ndarray, wa: np.ndarray, wb: np.ndarray, is_a: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The weighted block sums (ab, ba, aa, bb) of a pooled matrix or of one chunk of it.

    S: [..., n, m], the chunk whose top-left entry is pooled position `offset` = (r0, c0);
    wa, wb: [R, N] weight rows over all N pooled positions (`qkov.pipeline.stats.effect_weights`);
    is_a: [N]. Returns [..., R, 4] in the order ab, ba, aa, bb (`stats.PAIR_PARTS`); partial sums of the
    chunks of one matrix add up to the sums of the whole matrix.
    """
    S = np.asarray(S, dtype=np.float64)
    is_a = np.asarray(is_a, dtype=bool)
    (r0, c0), (n, m) = offset, S.shape[-2:]
    rows, cols = np.arange(r0, r0 + n), np.arange(c0, c0 + m)
    ra, rb = rows[is_a[rows]], rows[~is_a[rows]]
    # A rows once against both column groups (wb is 0 on A columns, wa on B columns): ab and aa
    # from one matmul, likewise ba and bb from the B rows
    a_rows = _left_products(S[..., ra - r0, :], wa[:, ra], [wb[:, cols], wa[:, cols]])
    b_rows = _left_products(S[..., rb - r0, :], wb[:, rb], [wa[:, cols], wb[:, cols]])
    out = np.stack([a_rows[..., 0], b_rows[..., 0], a_rows[..., 1], b_rows[..., 1]], axis=-1)
    diag = np.arange(max(r0, c0), min(r0 + n, c0 + m))  # pooled positions on this chunk's diagonal
    if diag.size:
        for k, w, sel in ((2, wa, diag[is_a[diag]]), (3, wb, diag[~is_a[diag]])):
            if sel.size:
                out[..., k] -= S[..., sel - r0, sel - c0] @ (w[:, sel] ** 2).T
    return out


def ab_margins(S: np.ndarray, is_a: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Margins of the A×B block of a pooled matrix (or of one chunk at `offset`): [..., N]
    with entry i ∈ A = Σ_{j∈B} S_ij and entry j ∈ B = Σ_{i∈A} S_ij. Chunks add up."""
    S = np.asarray(S, dtype=np.float64)
    is_a = np.asarray(is_a, dtype=bool)
    (r0, c0), (n, m) = offset, S.shape[-2:]
    ra, cb = is_a[r0 : r0 + n], ~is_a[c0 : c0 + m]
    out = np.zeros((*S.shape[:-2], is_a.size))
    out[..., r0 : r0 + n] += (S @ cb.astype(np.float64)) * ra  # matvecs: no masked copy of the chunk
    out[..., c0 : c0 + m] += (ra.astype(np.float64) @ S) * cb
    return out


def stat_sums_np(block: np.ndarray, weights: tuple, is_a: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """The stats sums of a pooled-score chunk block [..., n, m] at pooled `offset`, weights =
    (left [1+K, N], right [1+K, N], wa [1+B, N], wb [1+B, N]): [..., (1+K) + 4(1+B) + N], the
    1+K permutation cross sums, the (1+B) × 4 effect block sums (their A×B column is also the
    bootstrap of T) and the N A×B margins. Unnormalised: chunks add up."""
    left, right, wa, wb = weights
    (r0, c0), (n, m) = offset, block.shape[-2:]
    perm = cross_sums(block, left[:, r0 : r0 + n], right[:, c0 : c0 + m])
    pairs = pair_sums(block, wa, wb, is_a, offset)
    margins = ab_margins(block, is_a, offset)
    return np.concatenate([perm, pairs.reshape(*pairs.shape[:-2], -1), margins], axis=-1)


# ---------------------------------------------------------------- the statistics' sums, torch


_WEIGHTS_ON_DEVICE: dict = {}  # (id of the host weights, device) -> (host weights kept alive, device copies)
_WEIGHTS_LOCK = threading.Lock()


def _device_weights(weights: tuple, device: str) -> tuple:
    """The stats weight rows as float64 tensors on `device`, copied once per worker process:
    they are the same for every chunk of a run (`stats_weights` caches the host arrays, so
    their identity is the key), and re-sending ~100 MB of them per chunk cost more than
    the chunk's sums."""
    import torch

    key = (*map(id, weights), device)
    with _WEIGHTS_LOCK:
        hit = _WEIGHTS_ON_DEVICE.get(key)
        if hit is None:
            if len(_WEIGHTS_ON_DEVICE) >= 4:
                _WEIGHTS_ON_DEVICE.pop(next(iter(_WEIGHTS_ON_DEVICE)))
            hit = (weights, tuple(torch.from_numpy(np.array(x, dtype=np.float64)).to(device)
                                  for x in weights))  # a copy: the host rows are read-only
            _WEIGHTS_ON_DEVICE[key] = hit
    return hit[1]


def stat_sums(block: np.ndarray, weights: tuple, is_a: np.ndarray, offset: tuple[int, int], device: str) -> np.ndarray:
    """`stat_sums_np` on `device`, float64 throughout: each part is a few matmuls that a GPU
    runs in milliseconds where CPU threads take seconds per slice."""
    import torch

    S = torch.as_tensor(np.ascontiguousarray(block), device=torch.device(device))
    lead = S.shape[:-2]
    out = stat_sums_t(S.reshape(-1, *S.shape[-2:]), _device_weights(weights, device), is_a, offset)
    return out.cpu().numpy().reshape(*lead, -1)


def stat_sums_t(S, weights, is_a: np.ndarray, offset: tuple[int, int]):
    """`stat_sums_np` of a (g, n, m) tensor of chunks (any float dtype) with the weights
    already on its device; returns a (g, width) float64 tensor there."""
    import torch

    dev, f64 = S.device, torch.float64
    L, R, WA, WB = weights
    idx = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64), device=dev)  # noqa: E731  (small index vectors)
    S = S.to(f64)
    n, m = S.shape[-2:]
    r0, c0 = offset
    is_a = np.asarray(is_a, dtype=bool)
    rows = np.arange(r0, r0 + n)
    ra, rb = rows[is_a[rows]], rows[~is_a[rows]]

    def bilinear(rows_sel, lw, rights):  # Σ_ij lw[k, i] S[i, j] right[k, j] over rows_sel, left product shared
        if rows_sel.size == 0:
            return [torch.zeros((S.shape[0], lw.shape[0]), dtype=f64, device=dev) for _ in rights]
        if rows_sel.size == n:  # every row of the chunk: slices, no gather
            prod = lw[:, r0 : r0 + n] @ S
        else:
            prod = lw.index_select(1, idx(rows_sel)) @ S.index_select(1, idx(rows_sel - r0))  # (g, K, m)
        return [(prod * r[:, c0 : c0 + m]).sum(-1) for r in rights]

    (perm,) = bilinear(rows, L, [R])
    ab, aa = bilinear(ra, WA, [WB, WA])
    ba, bb = bilinear(rb, WB, [WA, WB])
    diag = np.arange(max(r0, c0), min(r0 + n, c0 + m))
    for part, w, sel in ((aa, WA, diag[is_a[diag]]), (bb, WB, diag[~is_a[diag]])):
        if sel.size:
            part -= S[:, idx(sel - r0), idx(sel - c0)] @ (w.index_select(1, idx(sel)) ** 2).T
    pairs = torch.stack([ab, ba, aa, bb], dim=-1).reshape(S.shape[0], -1)
    ra_m = torch.as_tensor(is_a[r0 : r0 + n], dtype=f64, device=dev)
    cb_m = torch.as_tensor(~is_a[c0 : c0 + m], dtype=f64, device=dev)
    margins = torch.zeros((S.shape[0], is_a.size), dtype=f64, device=dev)
    margins[:, r0 : r0 + n] += (S @ cb_m) * ra_m
    margins[:, c0 : c0 + m] += (ra_m @ S) * cb_m
    return torch.cat([perm, pairs, margins], dim=-1)


def tile_sums(scores, weights: tuple, n_a: int, r0: int, c0: int) -> np.ndarray:
    """The stats sums (2, Hc, width) float64 of a (2, Hc, ci, cj) score tile at pooled (r0, c0),
    computed where the tile is; `weights` = the stats stage's (left, right, wa, wb) rows."""
    hc, ci, cj = scores.shape[1:]
    is_a = np.arange(weights[0].shape[1]) < n_a
    return stat_sums_t(scores.reshape(2 * hc, ci, cj), _device_weights(weights, str(scores.device)), is_a,
                       (r0, c0)).reshape(2, hc, -1).cpu().numpy()


# ---------------------------------------------------------------- the top pairs


def tile_top(tile: np.ndarray, n_a: int, offset: tuple[int, int], k: int, largest: bool) -> np.ndarray:
    """A score tile's k best A×B pairs, tile (n, m) at pooled `offset`: (3, k) float64
    (value, row in A, column in B), NaN-padded when it holds fewer A×B pairs; unordered."""
    r0, c0 = offset
    sub = tile[: max(0, n_a - r0), max(0, n_a - c0):]
    out = np.full((3, k), np.nan)
    if sub.size:
        flat = sub.ravel().astype(np.float64)
        key = -flat if largest else flat
        take = np.argpartition(key, k - 1)[:k] if flat.size > k else np.arange(flat.size)
        i, j = np.unravel_index(take, sub.shape)
        out[:, : take.size] = flat[take], r0 + i, max(0, n_a - c0) + c0 - n_a + j
    return out


def tile_top_t(tile, n_a: int, offset: tuple[int, int], k: int, largest: bool) -> np.ndarray:
    """`tile_top` of each head of a tensor tile (hc, n, m) where it lies: (hc, 3, k), best first."""
    import torch

    r0, c0 = offset
    hc, n, m = tile.shape
    out = np.full((hc, 3, k), np.nan)
    sub = tile[:, : max(0, min(n, n_a - r0)), max(0, n_a - c0):]
    if sub.numel():
        kk = min(k, sub.shape[1] * sub.shape[2])
        vals, where = torch.topk(sub.reshape(hc, -1), kk, dim=1, largest=largest)
        where = where.cpu().numpy()
        out[:, 0, :kk] = vals.double().cpu().numpy()
        out[:, 1, :kk] = r0 + where // sub.shape[2]
        out[:, 2, :kk] = c0 + max(0, n_a - c0) + where % sub.shape[2] - n_a
    return out


def best_k(c: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The k best candidates (3, M) (value, row, column; NaN values are padding) -> (3, k), best first."""
    c = c[:, ~np.isnan(c[0])]
    order = np.argsort(-c[0] if largest else c[0], kind="stable")[:k]
    out = np.full((3, k), np.nan)
    out[:, : order.size] = c[:, order]
    return out


# ---------------------------------------------------------------- the diagnostics' parts


def side_parts(a_all, scores, other: np.ndarray, r0: int, c0: int) -> DiagnosticParts:
    """The tile's `DiagnosticParts`, from what is already on the device: a_all its row
    operands, scores (2, Hc, ci, cj) [interference, alignment] at pooled position (r0, c0),
    other (N, 2) the task-A / task-B mean weights."""
    import torch

    ci, cj = scores.shape[2:]
    w = torch.as_tensor(np.asarray(other, dtype=np.float64), device=scores.device)
    inter = scores[0].double()
    diag = scores[1].diagonal(dim1=1, dim2=2).double().cpu().numpy() if r0 == c0 and ci == cj else None
    return DiagnosticParts(sq=sq_norms(a_all), rows=(inter @ w[c0 : c0 + cj]).cpu().numpy(),
                           cols=(inter.transpose(1, 2) @ w[r0 : r0 + ci]).cpu().numpy(), diag=diag)


def sq_norms(x, rows_per_step: int = 1024) -> np.ndarray:
    """Σ_p x[h, i, p]² in float64 (Hc, n), a block of rows at a time (bf16 and float32 widen
    exactly; the float64 copy of a whole slice would be 4x the operands' bytes)."""
    import torch

    out = torch.empty(x.shape[:2], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[1], rows_per_step):
        out[:, i : i + rows_per_step] = (x[:, i : i + rows_per_step].double() ** 2).sum(-1)
    return out.cpu().numpy()
