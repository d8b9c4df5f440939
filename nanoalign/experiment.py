"""What the experiments in experiments/ share: arms x seeds of training runs, run as parallel subprocesses,
resumable, and the results table.

An experiment is a flat recipe (experiments/hbat.py, r3.py, real.py):

    jobs = [experiment.Job(f"{arm}/seed{s}", exp_dir / arm / f"seed{s}", [
                experiment.script("train_dpo.py", "--seed=...", f"--out_dir={run_dir}", ...),
                experiment.script("-m", "nanoalign.evaluate", ...)])
            for arm in ARMS for s in seeds]
    experiment.run_jobs(jobs, parallel=2)                 # skips the jobs finished earlier
    results = {"arms": {arm: {metric: [one value per seed]}}, "metrics": [...]}
    experiment.write_results(exp_dir, results)            # results.json + results.md (mean ± std per arm)

Decisions
- A run is a subprocess of the same flat script a user runs (`python train_dpo.py ...`), in the working
  directory the experiment was started in, so an experiment is exactly a list of command lines that anyone can rerun by hand (each job's commands
  are written to its `commands.txt`, its output to `log.txt`).
- Parallel processes, one thread each: the tiny models are too small for intra-op threads to pay off, so on a
  2-core laptop two runs side by side finish in about half the time of two runs one after another.
- Resume: a job writes `done` when all its commands succeeded, with a fingerprint (size and modification time
  of every file) of what its commands name outside its own directory: the models it starts from, the data it
  reads. Rerunning the experiment skips the jobs whose command lines and inputs are unchanged, and starts any
  other again from an empty directory (a half-written run, one made with other flags, or one made from a model
  that has been retrained since, is never mixed with a new one).
- A failing command stops the experiment with one line naming the job, the command and the log file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import report
from .train import REPO_ROOT

DONE = report.DONE  # a finished job's marker, which the report also reads


@dataclass
class Job:
    name: str                   # "arm/seed0": shown in the progress bar and in errors
    run_dir: Path               # the job's directory: its runs write here; log.txt, commands.txt, done
    commands: list[list[str]]   # command lines run in order, from the repository root


def script(*argv: str) -> list[str]:
    """A command line running a script of this repository (`train_dpo.py`, found in the repository root whatever
    the working directory) or a module (`-m nanoalign.evaluate`) with this Python. Relative paths in the flags
    are relative to the working directory the experiment runs in, as for a user typing the command there."""
    first = [str(REPO_ROOT / argv[0])] if argv and str(argv[0]).endswith(".py") else []
    return [sys.executable, *first, *map(str, argv[len(first):])]


def shell_line(command: list[str]) -> str:
    """The command as a user would type it from the repository root: `python train_dpo.py --seed=1 ...`."""
    root = str(REPO_ROOT) + os.sep
    return " ".join("python" if c == sys.executable else c.removeprefix(root) if c.endswith(".py") else c
                    for c in command)


def _script_text(job: Job) -> str:
    return "".join(shell_line(c) + "\n" for c in job.commands)


def inputs(job: Job) -> list[Path]:
    """What the job's commands name outside its own directory and that exists: the checkpoints and data files
    it reads (flag values and bare arguments that are paths; the scripts themselves are not counted), and
    data/world.json: the scripts read the world's files by default (the held-out prompts of every evaluation,
    R3's PPO prompts) without naming them, and a rebuilt world rewrites it."""
    own, found = Path(job.run_dir).resolve(), []
    for command in job.commands:
        for arg in command[1:]:
            value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
            path = Path(value).resolve() if value and not value.endswith(".py") else None
            if path is not None and path.exists() and own not in (path, *path.parents) and path not in found:
                found.append(path)
    world_file = (REPO_ROOT / "data" / "world.json").resolve()
    return found + [world_file] if world_file.exists() and world_file not in found else found


def fingerprint(paths) -> dict:
    """{path: [[file, size, mtime_ns], ...]} for each path, a directory by every file under it: rewriting an
    input, even with the same bytes, changes it (cheap to take, and never misses a retrained model)."""
    out = {}
    for path in map(Path, paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        out[str(path)] = [[str(f.relative_to(path)) if f != path else "", st.st_size, st.st_mtime_ns]
                          for f in files for st in [f.stat()]]
    return out


def finished(job: Job) -> bool:
    """Did this job finish earlier with the same command lines, from the same inputs? (Other flags, or a model
    retrained since: it must run again.)"""
    run_dir = Path(job.run_dir)
    if not (run_dir / DONE).exists() or (run_dir / "commands.txt").read_text() != _script_text(job):
        return False
    return json.loads((run_dir / DONE).read_text()).get("inputs") == fingerprint(inputs(job))


def run_job(job: Job, threads: int = 1) -> float:
    """Run a job's commands in order (skipped if it finished before with the same commands); returns its wall
    time in seconds."""
    run_dir = Path(job.run_dir)
    if finished(job):
        return 0.0
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted job starts again from nothing
    run_dir.mkdir(parents=True)
    (run_dir / "commands.txt").write_text(_script_text(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_DISABLE": "1"}
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        for command in job.commands:
            log.write(f"$ {shell_line(command)}\n")
            log.flush()
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                log.flush()
                tail = (run_dir / "log.txt").read_text().strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"{job.name}: `{shell_line(command)}` failed (exit {done.returncode}): "
                                   f"{tail[0]} (log: {run_dir / 'log.txt'})")
    wall = time.time() - t0
    # the inputs as they are now that every command has read them
    (run_dir / DONE).write_text(json.dumps({"wall_s": wall, "inputs": fingerprint(inputs(job))}) + "\n")
    return wall


def run_jobs(jobs: list[Job], parallel: int = 2, threads: int = 1) -> None:
    """Run the jobs, `parallel` at a time, each process with `threads` intra-op threads; a progress bar over jobs.
    A failure stops the experiment: the jobs already running finish, the queued ones never start, and the first
    error is raised."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique: {names}")
    todo = [j for j in jobs if not finished(j)]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs finished earlier: skipped", flush=True)
    failed = threading.Event()

    def guarded(job: Job) -> float | None:
        if failed.is_set():
            return None  # an earlier job failed: the queued ones never start
        try:
            return run_job(job, threads)
        except BaseException:
            failed.set()
            raise

    with tqdm(total=len(todo), desc="runs", unit="run", dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(guarded, job): job for job in todo}
        errors = []
        for future in as_completed(futures):
            if (error := future.exception()) is not None:
                errors.append(error)
            elif future.result() is not None:
                bar.set_postfix_str(f"{futures[future].name} {future.result():.0f} s")
                bar.update()
    if errors:
        raise errors[0]


def ensure(path, command: list[str]) -> None:
    """A prerequisite (the SFT model, the reward model): run `command`, its output shown, unless `path` exists."""
    if Path(path).exists():
        return
    print(f"{path} is missing: {shell_line(command)}", flush=True)
    subprocess.run(command, check=True)


def read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (did the run finish? see {path.parent / 'log.txt'})")
    return json.loads(path.read_text())


def job_wall(run_dir) -> float:
    """The wall time of a finished job (its `done` record), in seconds."""
    return read_json(Path(run_dir) / DONE)["wall_s"]


def write_results(exp_dir, results: dict, name: str = "results") -> str:
    """Write <name>.json and <name>.md (report.summary_table: mean ± sample std per arm) under exp_dir, print
    the table, and return it."""
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    table = report.summary_table(results)
    title = results.get("title")
    (exp_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (exp_dir / f"{name}.md").write_text((f"# {title}\n\n" if title else "") + table)
    print(f"\n{table}\nresults in {exp_dir / f'{name}.json'} and {exp_dir / f'{name}.md'}", flush=True)
    return table

