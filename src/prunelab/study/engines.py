"""Engines: where a study's runs execute. Each takes ``(run id, config values)`` tasks and calls
``done(id, outcome)`` in the driver as each run ends (``worker.execute`` makes the outcome).

* ``serial`` (``--workers 1``): in this process, one run after the other;
* ``local`` (``--workers N``): N spawned processes (``concurrent.futures`` with the spawn context: a
  fresh interpreter, no forked torch state). A worker that dies (killed, out of memory) breaks the pool:
  a fresh pool takes the unfinished runs, and a run in flight at two such deaths is recorded as failed;
* ``ray`` (``--engine ray --address ADDR``): one Ray task per run, asking for its threads as CPUs (and a
  GPU when the run's device is cuda). Run folders must be on a filesystem every node sees at the same
  path; the driver alone writes study.json.

An interrupt (Ctrl-C, SIGTERM in the CLI) stops the workers at once: run folders are checkpointed
atomically, so a killed run resumes from its last epoch next time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from ..errors import PrunelabError
from .worker import execute, one_line

Task = tuple[str, dict[str, Any]]
Done = Callable[[str, dict[str, Any]], None]
Notice = Callable[[str], None]
RAY_INSTALL = "pip install 'prunelab[ray]' (or pip install 'ray[default]==2.60.*')"
MAX_WORKER_DEATHS = 2


class Serial:
    """Runs in the driver's own process."""

    name = "serial"

    def __init__(self, threads: int | None = None):
        self.threads, self.slots = threads, 1

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "workers": 1, "threads": self.threads}

    def run(self, tasks: list[Task], done: Done, notice: Notice) -> None:
        for run_id, config in tasks:
            done(run_id, execute(config, self.threads))


class Local:
    """``workers`` spawned processes, ``threads`` torch threads each."""

    name = "local"

    def __init__(self, workers: int, threads: int | None = None):
        self.workers, self.threads, self.slots = workers, threads, workers

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "workers": self.workers, "threads": self.threads}

    def run(self, tasks: list[Task], done: Done, notice: Notice) -> None:
        pending = dict(tasks)
        deaths: dict[str, int] = {}
        while pending:
            order = list(pending)
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_leave_interrupts_to_the_driver)
            futures = {pool.submit(execute, pending[run_id], self.threads): run_id for run_id in order}
            broken = False
            try:
                while futures and not broken:
                    finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for future in finished:
                        run_id = futures.pop(future)
                        try:
                            outcome = future.result()
                        except BrokenProcessPool:
                            broken = True
                            continue
                        pending.pop(run_id)
                        done(run_id, outcome)
            except BaseException:
                _terminate(pool)
                raise
            pool.shutdown(wait=True, cancel_futures=True)
            if broken:
                # the pool hands runs out in submission order: the first `workers` unfinished were in flight
                in_flight = [run_id for run_id in order if run_id in pending][: self.workers]
                notice(f"a worker process died (killed, or out of memory) during {len(in_flight)} run(s); "
                       "a fresh pool takes the unfinished runs")
                for run_id in in_flight:
                    deaths[run_id] = deaths.get(run_id, 0) + 1
                    if deaths[run_id] >= MAX_WORKER_DEATHS:
                        pending.pop(run_id)
                        done(run_id, {"status": "failed", "error": f"its worker process died {deaths[run_id]} "
                                      "times (killed, or out of memory)"})


def _leave_interrupts_to_the_driver() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver decides


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now: shutdown() alone would wait for the runs in flight to end."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private, stable since 3.8
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)
    pool.shutdown(wait=True, cancel_futures=True)  # the workers are gone: this only joins its threads


class Ray:
    """One Ray task per run, on the cluster at ``address`` (None: RAY_ADDRESS, else a local Ray)."""

    name = "ray"

    def __init__(self, address: str | None = None, threads: int | None = None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise PrunelabError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}") from None
        self.address, self.threads, self.slots = address, threads, 1

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "address": self.address, "threads": self.threads}

    def run(self, tasks: list[Task], done: Done, notice: Notice) -> None:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            env = {k: os.environ[k] for k in ("PRUNELAB_DATA", "PRUNELAB_DATA_URL") if k in os.environ}
            try:
                ray.init(address=self.address, runtime_env={"env_vars": env} if env else None,
                         logging_level="warning", **({} if self.address else {"include_dashboard": False}))
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise PrunelabError(f"cannot reach the Ray cluster at {self.address or 'RAY_ADDRESS'}: "
                                    f"{one_line(error)}") from None
        cpus = self.threads or 1
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
        remote = ray.remote(execute)
        refs = {}
        for run_id, config in tasks:
            gpus = 1 if str(config.get("device", "cpu")).startswith("cuda") else 0
            refs[remote.options(num_cpus=cpus, num_gpus=gpus).remote(config, self.threads)] = run_id
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    run_id = refs.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as error:  # the task's process or node died
                        outcome = {"status": "failed", "error": one_line(error).split(" Traceback")[0][:300]}
                    done(run_id, outcome)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started_here:
                ray.shutdown()


def make_engine(engine: str, *, workers: int = 1, threads: int | None = None, address: str | None = None):
    """The engine of the CLI's flags, checked before any run starts."""
    if workers < 1:
        raise PrunelabError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise PrunelabError(f"--threads must be >= 1, got {threads}")
    if engine == "ray":
        return Ray(address, threads)
    if engine != "local":
        raise PrunelabError(f"unknown engine {engine!r}; choose from: local, ray")
    if address is not None:
        raise PrunelabError("--address names a Ray cluster: use it with --engine ray")
    if threads is None:  # the user's OpenMP setting, else share the cores: never oversubscribe them
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // workers)
    return Serial(threads) if workers == 1 else Local(workers, threads)
