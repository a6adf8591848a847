"""Starting the work, once for `qkov.run`, `qkov.validate` and `qkov.demo` (and so for the CLI,
which calls them): every input and the output checked before any cluster starts, then the run
on a Dask cluster or in this process. `loud` prints what the CLI shows on stderr (the plan,
warnings, the cluster's address); the API is loud exactly when it prints progress."""
from __future__ import annotations

import time

from rich.markup import escape

from .console import Progress, err, progress_for
from .spec import JobSpec


def runs_here(job: JobSpec, scheduler: str | None = None, inline: bool = False) -> bool:
    """Whether the work runs on this machine (inline, or on the embedded LocalCluster), so that
    its devices and memory are this machine's to check."""
    return inline or not (scheduler or job.cluster.address or job.cluster.profile)


def check_job(job: JobSpec, *, resume: bool = False, overwrite: bool = False, scheduler: str | None = None,
              inline: bool = False, loud: bool = False, show_plan: bool = False):
    """`run.preflight` as `qkov run` does it (the output as a cluster's workers would write it
    unless `inline`); returns the extraction plan. Loud: the sample-count warning, and with
    `show_plan` the lines `qkov plan` prints."""
    from .extract import completion_notes, sample_count_warning
    from .run import preflight

    plan = preflight(job, resume=resume, overwrite=overwrite, local=runs_here(job, scheduler, inline), cluster=not inline)
    if not loud:
        return plan
    note = plan is not None and next(filter(None, (sample_count_warning(x, y, job.stats.alpha) for x, y in plan.pair_sizes())), None)
    if note:
        err().print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    for line in completion_notes(plan) if plan is not None else ():
        err().print(line, markup=False, highlight=False)
    if show_plan and plan is not None:
        from .plan import plan as run_plan

        for line in run_plan(job, resume=resume or overwrite, extract_plan=plan).lines():
            err().print(line, markup=False, highlight=False)
    return plan


def print_cluster(client) -> None:
    err().print(f"cluster: {escape(client.dashboard_link or client.scheduler.address)}"
                + ("  (dashboard)" if client.dashboard_link else ""), highlight=False)


def launch(job: JobSpec, *, scheduler: str | None = None, resume: bool = False, overwrite: bool = False,
           inline: bool = False, progress: "bool | Progress | None" = True, show_plan: bool = True):
    """Check the job, then run it in this process (`inline`) or on the job's cluster (or
    `scheduler`); returns the `RunSummary`, its timings starting with the checks'. `progress` as
    the API takes it (`console.progress_for`); True also prints the CLI's notices (`loud`)."""
    from .cluster import cluster_client
    from .run import run_job

    loud = bool(progress) and not callable(progress)
    t = time.perf_counter()
    plan = check_job(job, resume=resume, overwrite=overwrite, scheduler=scheduler, inline=inline, loud=loud,
                     show_plan=show_plan)
    preflight_s = time.perf_counter() - t
    with progress_for(progress) as tick:  # after the checks: their lines print before any bar
        if inline:
            summary = run_job(job, resume=resume, overwrite=overwrite, progress=tick, plan=plan)
        else:
            with cluster_client(job.cluster, scheduler) as client:
                if loud:
                    print_cluster(client)
                summary = run_job(job, client=client, resume=resume, overwrite=overwrite, progress=tick, plan=plan)
    summary.timings = {"preflight": preflight_s, **summary.timings}
    return summary
