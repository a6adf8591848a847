#!/bin/sh
# qkov's install smoke test: a tiny job (a random tiny Llama built from its transformers
# config by qkov.testing, two pre-tokenised task files) run end to end with the installed
# `qkov`, then queried, from a temporary folder outside any source tree. It fails unless
# qkov, pipeline and workers are imported from the installed package (sys.prefix).
#
# deploy/Dockerfile runs it after installing qkov into the image; tests/test_wheel.py
# runs it against the wheel installed into a fresh venv. CPU only, about 20 s.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"

python - <<'PY'
import os
import sys
from pathlib import Path

import qkov
import qkov.pipeline
import qkov.pipeline.executors
import qkov.workers

prefix = Path(sys.prefix).resolve()
for m in (qkov, qkov.pipeline, qkov.pipeline.executors, qkov.workers):
    where = Path(m.__file__).resolve()
    assert where.is_relative_to(prefix), f"{m.__name__} is imported from {where}, not from the installed package under {prefix}"

from qkov.testing import tiny_job, write_job_file

here = Path.cwd()
job = tiny_job(here, "llama_gqa", n_a=4, n_b=3, extract={"shard_size": 4, "batch_size": 4},
               score={"layers": [1], "blocks": ["Q", "O"]}, stats={"n_permutations": 19, "n_bootstrap": 19},
               output={"path": str(here / "run")})
write_job_file(job, here / "job.toml")
PY

qkov run job.toml --inline
qkov query run --layer 1 --head 2 --block Q --top 3
echo "qkov smoke test passed ($(command -v qkov))"
