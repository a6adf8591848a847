"""`qkov info`: what a run holds, group by group — its settings, whether it is complete and its
bytes on disk — and who holds its lock, if anyone. Read-only and cheap: group attributes and
file sizes, no array is read."""
from __future__ import annotations

import json
from typing import Any

from . import schema
from .store import RunStore, fsspec_fs, local_path

# attrs that are bookkeeping, not settings
_BOOKKEEPING = {schema.ATTR_PROVENANCE, schema.ATTR_SCHEMA, schema.ATTR_COMPLETE}
_SHORT = 80  # longer attrs (descriptions of methods, rules) are the statistics' documentation, not settings
_ORDER = (schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP, schema.STATS, schema.DIAGNOSTICS, schema.CHECKS)
_WHAT = {
    schema.GRADIENTS: "per-sample gradients (or their sketches) and the samples",
    schema.FISHER: "the empirical Fisher and the damping",
    schema.SCORES_GROUP: "pair scores (interference, alignment) per slice",
    schema.STATS: "statistics (the job's [stats] settings, or `qkov stats --replace`)",
    schema.DIAGNOSTICS: "numerical health and per-sample outlier flags",
    schema.CHECKS: "sanity checks (`qkov check`)",
    schema.WORK: "bookkeeping of an unfinished run (completed-shard records, Fisher partial sums)",
}


def _setting(value: Any) -> Any:
    """An attr as shown: short values as they are, long lists as their length; None for documentation."""
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} items"
    text = json.dumps(value, default=str)
    return value if len(text) <= _SHORT else None


def _bytes(store: RunStore, group: str | None = None) -> int:
    """Bytes of the files under the run (or one group of it)."""
    path = store.path.rstrip("/") + (f"/{group}" if group else "")
    root = local_path(path)
    if root is None:
        fs, p = fsspec_fs(path, store.storage_options)
        return int(fs.du(p, total=True)) if fs.exists(p) else 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _rank(name: str) -> tuple[int, str]:
    """Stage order; named statistics after `stats`, by name; bookkeeping last."""
    stage = schema.STATS if name.startswith(schema.STATS + "_") else name
    rank = _ORDER.index(stage) if stage in _ORDER else len(_ORDER) + (name == schema.WORK)
    return rank, name


def describe_run(run: "str | RunStore", storage_options: dict | None = None) -> dict[str, Any]:
    """The run's groups (named statistics `stats_<name>` included) in stage order, each with
    `complete` (True/False; None for bookkeeping), `bytes` on disk, `created` and `settings`
    (its short attrs); the run's total bytes, schema version, config hash and lock owner (None
    when nobody holds it)."""
    store = RunStore.coerce(run, storage_options)
    root = store.root()
    if not store.is_run():
        from .errors import StoreError

        raise StoreError(f"no qkov run at {store.path}: it holds no run's metadata. Run `qkov run JOB.toml` first, or check the path.")
    names = []
    for name in sorted((n for n, _ in root.groups() if n != schema.LOCK_GROUP), key=_rank):
        if name != schema.PAIRS:
            names.append(name)
            continue
        for x, y in store.pair_keys():  # more than two tasks: each pair's sub-run, group by group
            sub = store.pair(x, y)
            if sub.exists():
                names += [f"{schema.pair_group(x, y)}/{n}" for n in sorted((n for n, _ in sub.root().groups()), key=_rank)]
    groups = []
    for name in names:
        attrs = store.group_attrs(name) or {}
        settings = {k: v for k, v in ((k, _setting(v)) for k, v in attrs.items() if k not in _BOOKKEEPING) if v is not None}
        leaf = name.rsplit("/", 1)[-1]
        stats_name = leaf.removeprefix(schema.STATS + "_") if leaf.startswith(schema.STATS + "_") else None
        groups.append({
            "group": name,
            "what": _WHAT.get(leaf) or (f"statistics named {stats_name!r} (`qkov stats --name {stats_name}`; read them "
                                        f"with --stats {stats_name})" if stats_name else ""),
            "complete": None if name == schema.WORK else attrs.get(schema.ATTR_COMPLETE) is True,
            "bytes": _bytes(store, name),
            "created": (attrs.get(schema.ATTR_PROVENANCE) or {}).get("created"),
            "settings": settings,
        })
    prov = dict(root.attrs.get(schema.ATTR_PROVENANCE) or {})
    return {
        "run": store.path,
        "schema_version": root.attrs.get(schema.ATTR_SCHEMA),
        "created": prov.get("created"),
        "config_hash": prov.get("config_hash"),
        "bytes": _bytes(store),
        "locked_by": store.read_lock(),
        "groups": groups,
    }


def _size(n: int) -> str:
    from .plan import _size as size

    return size(n)


def format_info(info: dict[str, Any]):
    """A rich rendering of `describe_run`: one row per group."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    held = info["locked_by"]
    lock = (f"locked by host {held.get('host')}, pid {held.get('pid')} since {held.get('since')}" if held else "not locked")
    t = Table(title=Text(f"{info['run']}: {_size(info['bytes'])} on disk, created {info['created']}, {lock}"),
              title_justify="left", caption=Text("complete: the stage that writes the group finished it (a group that "
                                                  "is not complete is never read as a result)"), caption_justify="left")
    for col, just in (("group", "left"), ("complete", "left"), ("bytes", "right"), ("settings", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for g in info["groups"]:
        done = {True: "yes", False: "NO", None: "–"}[g["complete"]]
        settings = ", ".join(f"{k}={v}" for k, v in g["settings"].items())
        t.add_row(Text(g["group"]), Text(done, style="bold red" if done == "NO" else ""), _size(g["bytes"]),
                  Text((g["what"] + ("; " if g["what"] and settings else "") + settings)))
    return Group(t)
