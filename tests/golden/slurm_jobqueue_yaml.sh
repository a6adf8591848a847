#!/usr/bin/env bash

#SBATCH -J qkov-worker
#SBATCH -e qkov-dask-logs/qkov-worker-%J.err
#SBATCH -o qkov-dask-logs/qkov-worker-%J.out
#SBATCH -n 1
#SBATCH --cpus-per-task=8
#SBATCH --mem=60G
#SBATCH -t 04:00:00
#SBATCH --gres=gpu:1

{python} -m distributed.cli.dask_worker {scheduler} --name dummy-name --nthreads 1 --memory-limit 59.60GiB --nanny --death-timeout 120 --local-directory ${TMPDIR:-/tmp} --resources GPU=1
