"""The bf16 codec's numpy and torch pairs (qkov.pipeline.codec) agree bit for bit."""
import numpy as np
import pytest

from qkov.pipeline import codec

torch = pytest.importorskip("torch")


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)  # every class of float32
    ties = (rng.integers(0, 2**16, 2000, dtype=np.uint32) << 16) | 0x8000  # exactly halfway: to even
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-39, -1e-39,
                        3.4028235e38, -3.4028235e38, 1.0, -1.0, 65504.0], dtype=np.float32)
    return np.concatenate([bits.view(np.float32), ties.view(np.float32), special,
                           rng.standard_normal(2000).astype(np.float32)])


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_encode_numpy_equals_torch(device):
    x = _values()
    want = codec.encode(x, "bfloat16")
    got = codec.encode_torch(torch.from_numpy(x).to(device), "bfloat16")
    assert got.dtype == np.uint16
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]
    assert np.array_equal(codec.encode_torch(torch.from_numpy(x), "float32").view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("device", _devices())
def test_decode_numpy_equals_torch(device):
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # every bf16 pattern
    want = codec.decode(bits, "bfloat16")
    got = codec.decode_torch(torch.from_numpy(bits.view(np.int16)).to(device), "bfloat16").cpu().numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    moved = codec.to_device(bits, "bfloat16", device, torch.float32).cpu().numpy()
    assert np.array_equal(moved.view(np.uint32), want.view(np.uint32))
