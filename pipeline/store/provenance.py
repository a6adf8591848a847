"""Provenance: the attrs stamped on every group, saying what produced it."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
from typing import Any

from .. import schema


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("qkov", "torch", "transformers", "dask", "distributed", "zarr", "xarray", "numpy", "scipy"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance(config: dict[str, Any] | None = None, config_hash: str | None = None, **extra: Any) -> dict[str, Any]:
    """Attrs stamped on every group: what produced it (kronfluence-style config stamp)."""
    return {
        schema.ATTR_SCHEMA: schema.SCHEMA_VERSION,
        schema.ATTR_PROVENANCE: json.loads(
            json.dumps(
                {
                    "config": config,
                    "config_hash": config_hash,
                    "versions": versions(),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **extra,
                },
                default=str,
            )
        ),
    }
