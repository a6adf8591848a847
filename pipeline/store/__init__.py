"""The run store: every byte of a run goes through this package.

    paths       where a run lives: local folder or fsspec URL (the one place that decides),
                free space, size, deletion
    runstore    `RunStore`: opening, completeness gates, layout checks, reads and writes of groups
    views       the logical views readers get (decoded gradients, the logical `scores`)
    chunks      the chunk format: crc32c on every chunk, checked reads, `DirectChunks` I/O
    lock        the output's ownership lock
    provenance  the attrs stamped on every group
    work        the run's bookkeeping in `_work` (completed shards, layer groups) and its repairs
    output      the output as a place to write: reachable, not nested, an old run replaced

Part of the shared floor that worker code imports: nothing here imports a stage or a worker.
"""
from ..errors import StoreError
from .chunks import CheckedStore, DirectChunks, checksummed, checksummed_encoding, direct_dask
from .lock import acquire_lock, read_lock, release_lock
from .paths import fsspec_fs, is_url, local_path, zarr_store
from .provenance import provenance, versions
from .runstore import ENCODINGS, KEEP_PAIRS, SCORES_DTYPES, RunStore
from .views import decoded, has_scalars, plain_text_coords, scores_view, with_score_attrs

__all__ = ["RunStore", "StoreError", "provenance", "versions", "decoded", "has_scalars", "scores_view", "with_score_attrs",
           "plain_text_coords", "DirectChunks", "CheckedStore", "direct_dask", "checksummed", "checksummed_encoding",
           "is_url", "local_path", "zarr_store", "fsspec_fs", "acquire_lock", "read_lock", "release_lock",
           "KEEP_PAIRS", "SCORES_DTYPES", "ENCODINGS"]
