"""qkov.testing's run comparison: float rounding passes, a real error fails.

Tests that compare runs from different execution paths (in-process vs worker processes,
local vs S3) use `assert_runs_close`, because other thread counts or CPUs change the last
bits of float32 sums. These tests show the tolerance still catches one value off by 1e-3
relative, a dropped sample, a changed id or a flipped decision.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

from qkov.pipeline import schema
from qkov.testing import RTOL, assert_runs_close, compare_datasets, tiny_job


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import qkov

    tmp = tmp_path_factory.mktemp("compare")
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, score={"layers": [1]},
                   stats={"n_permutations": 19, "n_bootstrap": 19}, output={"path": str(tmp / "run")})
    qkov.run(job, inline=True)
    return tmp, job.output.path


def _copy(run, name: str):
    tmp, path = run
    dst = tmp / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(path, dst)
    return dst


def _edit(path, group: str, var: str, fn) -> None:
    arr = zarr.open_group(str(path), mode="r+", zarr_format=3)[group][var]
    arr[...] = fn(np.asarray(arr[...]))


def _float_var(path, group: str, dims: int = 2) -> str:
    """A float variable of `group` with at least `dims` dims (the largest such), whatever the store layout names it."""
    ds = xr.open_zarr(str(path), group=group, consolidated=False)
    names = [n for n, v in ds.data_vars.items() if v.dtype.kind == "f" and v.ndim >= dims]
    assert names, f"no float variable in {group}"
    return max(sorted(names), key=lambda n: ds[n].size)


def _bump_large(rel: float):
    """Multiply one value of at least a tenth of the variable's largest magnitude by (1 + rel)."""
    def fn(x):
        flat = x.reshape(-1).copy()
        k = int(np.flatnonzero(np.abs(flat) >= 0.1 * np.abs(flat).max())[0])
        flat[k] = flat[k] * (1 + rel)
        return flat.reshape(x.shape)
    return fn


def test_a_run_equals_itself_and_its_float_rounding(run):
    _, path = run
    assert_runs_close(path, path)
    noisy = _copy(run, "noisy")
    eps = np.finfo(np.float32).eps
    for group in (schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP):
        _edit(noisy, group, _float_var(path, group), lambda x: (x * np.float32(1 + 4 * eps)).astype(x.dtype))  # a few ulps
    assert_runs_close(noisy, path)


def test_float_attrs_are_compared_at_the_values_tolerance(run):
    """A float attr computed from worker results (a λ or a threshold) may differ in its last
    bits between processes and CPUs, as the values do: a few ulps pass, 1e-3 relative fails,
    and ints, bools and strings stay exact."""
    _, path = run
    near, far, other = _copy(run, "attr-near"), _copy(run, "attr-far"), _copy(run, "attr-int")
    x = 0.123456789
    for p, value in ((path, x), (near, x * (1 + 8 * float(np.finfo(np.float32).eps))), (far, x * (1 + 1e-3)), (other, x)):
        attrs = zarr.open_group(str(p), mode="r+", zarr_format=3)[schema.FISHER].attrs
        attrs["probe_float"] = value
        attrs["probe_int"] = 7 if p != other else 8
    assert_runs_close(near, path, groups=(schema.FISHER,))
    with pytest.raises(AssertionError, match=r"fisher: attrs differ at \['probe_float'\]"):
        assert_runs_close(far, path, groups=(schema.FISHER,))
    with pytest.raises(AssertionError, match=r"fisher: attrs differ at \['probe_int'\]"):
        assert_runs_close(other, path, groups=(schema.FISHER,))


@pytest.mark.parametrize("group", [schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP, schema.STATS])
def test_one_value_off_by_1e_3_relative_is_rejected(run, group):
    _, path = run
    var = _float_var(path, group, dims=1)
    bad = _copy(run, f"bad-{group}")
    _edit(bad, group, var, _bump_large(1e-3))
    with pytest.raises(AssertionError, match=rf"{group}: {var}: 1 of \d+ values differ beyond rtol"):
        assert_runs_close(bad, path)


def test_changed_ids_and_flipped_decisions_are_rejected(run):
    _, path = run
    bad = _copy(run, "bad-discrete")
    _edit(bad, schema.STATS, "significant", lambda x: ~x)
    with pytest.raises(AssertionError, match=r"stats: significant: \d+ of \d+ non-float values differ"):
        assert_runs_close(bad, path, groups=[schema.STATS])
    ids = xr.open_zarr(str(path), group=schema.GRADIENTS, consolidated=False)["sample_id"].values
    a = xr.Dataset(coords={"sample_id": ("sample", ids)})
    other = ids.astype(object)
    other[-1] = "other"
    b = a.assign_coords(sample_id=("sample", other))
    assert compare_datasets(b, a) == ["sample_id: 1 of 7 non-float values differ (first at flat index [6])"]


def test_a_dropped_sample_is_rejected(run):
    _, path = run
    g = xr.open_zarr(str(path), group=schema.GRADIENTS, consolidated=False).load()
    problems = compare_datasets(g.isel(sample=slice(1, None)), g, what="gradients")
    assert problems and "sizes differ" in problems[0]


def test_tolerance_is_relative_to_the_value_and_to_the_variables_scale():
    b = xr.Dataset({"x": ("i", np.array([1000.0, 1.0, 0.0], dtype=np.float32))})
    ok = b.copy(data={"x": b["x"].values * np.float32(1 + RTOL / 2) + np.float32([0, 0, 1000 * RTOL / 2])})
    assert compare_datasets(ok, b) == []
    for k in range(3):  # 1e-3 of the scale anywhere, or 1e-3 of a large value, is an error
        x = b["x"].values.copy()
        x[k] += 1e-3 * 1000
        assert compare_datasets(b.copy(data={"x": x}), b), k
    nan = b.copy(data={"x": np.array([1000.0, np.nan, 0.0], dtype=np.float32)})
    assert "NaN" in compare_datasets(nan, b)[0]
    assert compare_datasets(nan, nan) == []
    assert "dtype" in compare_datasets(b.astype(np.float64), b)[0]
