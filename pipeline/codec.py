"""The stored encodings of float arrays, numpy and torch side by side (one codec).

`bfloat16`: round-to-nearest-even to bf16, kept as the 16-bit pattern (uint16); NaN is
stored as 0x7FC0. The numpy pair runs in Dask tasks and the store; the torch pair runs
where the tensors are (a worker's GPU), so only the 16-bit patterns cross to or from the
host. tests/test_codec.py pins the two pairs bit for bit. torch is imported lazily: the
client and the store do not need it.
"""
from __future__ import annotations

import numpy as np

BFLOAT16 = "bfloat16"


def _check(encoding: str | None) -> bool:
    """True for bf16, False for float32; anything else is refused."""
    if encoding in (None, "float32"):
        return False
    if encoding != BFLOAT16:
        raise ValueError(f"unknown encoding {encoding!r}")
    return True


def decode(arr, encoding: str | None) -> np.ndarray:
    """Stored representation → float32 numpy (works on numpy blocks inside dask)."""
    if not _check(encoding):
        return np.asarray(arr, dtype=np.float32)
    bits = np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def encode(arr, encoding: str | None) -> np.ndarray:
    """float32 numpy → the stored representation: bfloat16 by round-to-nearest-even (as torch
    rounds), kept as its 16-bit pattern (uint16); NaN stays NaN. Inverse of `decode` on bf16 values."""
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if not _check(encoding):
        return x
    bits = x.view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


def encode_torch(t, encoding: str | None) -> np.ndarray:
    """`encode` of a float32 tensor, rounded where the tensor lives: the host receives the
    stored representation (half the bytes for bf16) and does no conversion pass."""
    bits = encoded_on_device(t, encoding)
    return bits.cpu().numpy().view(np.uint16 if bits is not t else np.float32)


def encoded_on_device(t, encoding: str | None):
    """The stored representation of a float32 tensor, where it lives: t itself (float32), or its
    bf16 bit patterns as int16. NaN is stored as `encode` stores it (torch keeps a NaN's
    payload, which differs by device)."""
    import torch

    if not _check(encoding):
        return t
    return torch.where(torch.isnan(t), 0x7FC0, t.to(torch.bfloat16).view(torch.int16))


def decode_torch(bits, encoding: str | None, dtype=None):
    """`decode` of a tensor of stored values on its own device (bf16: the 16-bit patterns as
    int16 or uint16, reinterpreted in place), as `dtype` (default float32)."""
    import torch

    dtype = dtype or torch.float32
    if not _check(encoding):
        return bits.to(dtype)
    if bits.dtype != torch.int16:
        bits = bits.view(torch.int16)
    return bits.view(torch.bfloat16).to(dtype)


def to_device(x: np.ndarray, encoding: str | None, dev: str, dtype):
    """A stored block (float32, or bf16 patterns as uint16) as a tensor of `dtype` on `dev`.
    bf16 patterns travel to a GPU as they are (half the bytes) and are decoded there; on CPU
    they are widened exactly to float32 by `decode` first."""
    import torch

    x = np.ascontiguousarray(x)
    if _check(encoding) and dev != "cpu":
        return decode_torch(torch.from_numpy(x.view(np.int16)).to(dev, non_blocking=True), encoding, dtype)
    return torch.from_numpy(decode(x, encoding)).to(dev).to(dtype)
