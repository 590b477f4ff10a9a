"""Measurement jobs: score the model with a few units quantized, in this process or on Ray
workers, with every result journaled as it completes.

A job is a tuple of ``(unit, format)`` pairs, quantized together; the empty job scores the
unquantized model. Workers each hold one copy of the model and a :class:`LayerReplay` of the
calibration windows, and take jobs until none are left.

The journal is a JSON-lines file: a header line naming the run, then one line per finished
job, flushed and fsynced. Records hold the loss and, when the run kept reference
log-probabilities, the KL divergence, so ``measured`` and ``kl`` share one journal per model and
calibration windows: a ``kl`` run also answers a later ``measured`` run. A run that is
interrupted (Ctrl-C, a killed process, a lost worker) loses at most the jobs in flight; running
it again with the same journal skips every job already recorded. A torn last line from a killed
writer is ignored.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import socket
import uuid
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.apply import QuantizedWeightCache, fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.sensitivity.replay import LayerReplay

if TYPE_CHECKING:
    from bitalloc.importance import Importance

Job = tuple[tuple[str, str], ...]
JOURNAL_VERSION = 1
#: Name prefix of the Ray actors that run measurement jobs.
ACTOR_PREFIX = "bitalloc-measure-"


def job_key(job: Job) -> str:
    """Stable text key of a job (``unit=format`` pairs joined by ``;``; empty for the base)."""
    return ";".join(f"{unit}={fmt}" for unit, fmt in sorted(job))


class JobEvaluator:
    """Scores jobs on one model copy. ``layers`` maps unit name -> decoder layer index;
    ``importance`` weights each unit's clipping search (None: plain squared error)."""

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        layers: Mapping[str, int],
        *,
        keep_logprobs: bool,
        importance: Importance | None = None,
    ):
        self.model = model
        self.layers = dict(layers)
        self.importance = importance
        self.replay = LayerReplay(model, windows, keep_logprobs=keep_logprobs)
        # Jobs on one model repeat most (unit, format) pairs: quantize each once.
        self.quantized = QuantizedWeightCache()

    def run(self, job: Job) -> dict[str, Any]:
        """The job's scores: ``loss`` and ``kl`` (None without reference log-probs)."""
        if not job:
            # The unquantized model is its own reference: its KL is exactly zero.
            return {
                "loss": self.replay.base_loss,
                "kl": 0.0 if self.replay.keeps_logprobs else None,
            }
        start = min(self.layers[unit] for unit, _ in job)
        with fake_quantized(self.model, dict(job), self.quantized, self.importance):
            score = self.replay.score(start)
        return {"loss": score.loss, "kl": score.kl}


class Journal:
    """Append-only record of finished jobs for one run (see the module docstring)."""

    def __init__(self, path: Path, run: Mapping[str, Any]):
        self.path = Path(path)
        self.run = dict(run)
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"version": JOURNAL_VERSION, "run": self.run})

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("run") != json.loads(json.dumps(self.run)):
            raise BitallocError(
                f"journal {self.path} belongs to another run (different model, units, formats, "
                "tokens or method); pass another results path or delete that file"
            )
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a killed writer; that job is simply run again
            self.done[record["job"]] = record

    def _append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def record(self, job: Job, result: Mapping[str, Any]) -> None:
        """Persist one finished job (a later record of the same job replaces an earlier one)."""
        entry = {"job": job_key(job), **result}
        self._append(entry)
        self.done[entry["job"]] = entry


def run_jobs(
    model: nn.Module,
    windows: torch.Tensor,
    layers: Mapping[str, int],
    jobs: Sequence[Job],
    *,
    keep_logprobs: bool,
    journal: Journal | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    progress: bool = True,
    desc: str = "measuring",
    importance: Importance | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every job; returns job key -> result (``loss``, ``kl``).

    ``workers=0`` runs in this process on ``model`` itself (restored after every job);
    ``workers>=1`` starts that many Ray actors (one CPU and one torch thread each), on a local
    Ray started here or on the cluster at ``ray_address`` / ``$RAY_ADDRESS``. Jobs recorded in
    ``journal`` are not run again.
    """
    results: dict[str, dict[str, Any]] = dict(journal.done) if journal else {}
    # A job recorded without KL (by a loss-only run) is run again when KL is wanted.
    todo = [
        job
        for job in dict.fromkeys(jobs)
        if job_key(job) not in results
        or (keep_logprobs and results[job_key(job)].get("kl") is None)
    ]
    bar = tqdm(
        total=len(set(jobs)),
        initial=len(set(jobs)) - len(todo),
        desc=desc,
        unit="job",
        disable=not progress,
    )
    try:
        if todo:
            with job_pool(
                model,
                windows,
                layers,
                keep_logprobs=keep_logprobs,
                workers=min(workers, len(todo)),
                ray_address=ray_address,
                importance=importance,
            ) as pool:
                for _, job, result in run_all(pool, [(job, job) for job in todo]):
                    if journal is not None:
                        journal.record(job, result)
                    results[job_key(job)] = {"job": job_key(job), **result}
                    bar.update(1)
    finally:
        bar.close()
    return results


class InProcessPool:
    """Runs jobs one at a time in this process, on the model itself (restored after each)."""

    capacity = 1

    def __init__(self, evaluator: JobEvaluator):
        self.evaluator = evaluator
        self._queue: list[tuple[Hashable, Job]] = []

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet returned by :meth:`wait`."""
        return len(self._queue)

    def submit(self, tag: Hashable, job: Job) -> None:
        """Queue ``job``; ``tag`` comes back with its result."""
        self._queue.append((tag, job))

    def wait(self) -> tuple[Hashable, Job, dict[str, Any]]:
        """Run the oldest queued job and return ``(tag, job, result)``."""
        tag, job = self._queue.pop(0)
        return tag, job, self.evaluator.run(job)

    def cancel(self) -> list[tuple[Hashable, Job]]:
        """Drop the queued jobs, returning them."""
        dropped, self._queue = self._queue, []
        return dropped


class RayPool:
    """Runs jobs on ``workers`` Ray actors, each holding one model copy.

    A job whose worker dies (killed, out of memory) goes back to the queue on a fresh actor;
    a job that loses its worker three times raises :class:`BitallocError`. Results already
    returned are never affected.
    """

    def __init__(
        self,
        ray: Any,
        model,
        windows,
        layers,
        *,
        keep_logprobs: bool,
        workers: int,
        importance: Importance | None = None,
    ):
        self._ray = ray
        self._actor_cls = ray.remote(num_cpus=1)(_RayWorker)
        self._args = (ray.put(model), windows, dict(layers), keep_logprobs, importance)
        self._run_id = uuid.uuid4().hex[:8]
        self._started = itertools.count()
        self._idle = [self._new_actor() for _ in range(workers)]
        self._running: dict[Any, tuple[Any, Hashable, Job]] = {}
        self._queue: list[tuple[Hashable, Job]] = []
        self._attempts: dict[str, int] = {}
        self.capacity = workers

    def _new_actor(self) -> Any:
        # Named, so that the workers of a run can be found (inspection, tests).
        name = f"{ACTOR_PREFIX}{self._run_id}-{next(self._started)}"
        return self._actor_cls.options(name=name).remote(*self._args)

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet returned by :meth:`wait`."""
        return len(self._running) + len(self._queue)

    def submit(self, tag: Hashable, job: Job) -> None:
        """Start ``job`` on an idle worker (or queue it); ``tag`` comes back with its result."""
        self._queue.append((tag, job))
        self._dispatch()

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            actor = self._idle.pop()
            tag, job = self._queue.pop(0)
            self._running[actor.run.remote(job)] = (actor, tag, job)

    def wait(self) -> tuple[Hashable, Job, dict[str, Any]]:
        """Block until some job finishes; return ``(tag, job, result)``."""
        from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

        while True:
            ready, _ = self._ray.wait(list(self._running), num_returns=1)
            actor, tag, job = self._running.pop(ready[0])
            try:
                result = self._ray.get(ready[0])
            except (RayActorError, OutOfMemoryError, WorkerCrashedError):
                # The worker died (killed, out of memory): a fresh one takes its place.
                self._ray.kill(actor)
                key = job_key(job)
                self._attempts[key] = self._attempts.get(key, 0) + 1
                if self._attempts[key] > 2:
                    raise BitallocError(
                        f"measuring {key or 'the unquantized model'} failed 3 times (worker "
                        "lost); finished results are kept, run again to resume"
                    ) from None
                self._idle.append(self._new_actor())
                self._queue.append((tag, job))
                self._dispatch()
                continue
            self._idle.append(actor)
            self._dispatch()
            return tag, job, result

    def cancel(self) -> list[tuple[Hashable, Job]]:
        """Drop queued and running jobs (their workers are killed), returning them."""
        dropped = [(tag, job) for _, tag, job in self._running.values()] + self._queue
        for actor, _, _ in self._running.values():
            self._ray.kill(actor)
        self._running.clear()
        self._queue.clear()
        return dropped


def run_all(
    pool: InProcessPool | RayPool, items: Sequence[tuple[Hashable, Job]]
) -> Iterator[tuple[Hashable, Job, dict[str, Any]]]:
    """Submit every ``(tag, job)`` to ``pool`` and yield ``(tag, job, result)`` as each
    finishes (both pools queue what their workers cannot start yet)."""
    for tag, job in items:
        pool.submit(tag, job)
    while pool.pending:
        yield pool.wait()


@contextlib.contextmanager
def job_pool(
    model: nn.Module,
    windows: torch.Tensor,
    layers: Mapping[str, int],
    *,
    keep_logprobs: bool,
    workers: int = 0,
    ray_address: str | None = None,
    importance: Importance | None = None,
) -> Iterator[InProcessPool | RayPool]:
    """A pool that scores jobs: in this process (``workers=0``) or on that many Ray actors;
    ``importance`` weights each unit's clipping search.

    Both pools share one interface: ``capacity``, ``pending``, ``submit(tag, job)``,
    ``wait() -> (tag, job, result)`` and ``cancel()``.
    """
    if workers <= 0:
        yield InProcessPool(
            JobEvaluator(model, windows, layers, keep_logprobs=keep_logprobs, importance=importance)
        )
        return
    with ray_session(ray_address, min(workers, os.cpu_count() or 1)) as ray:
        # Each actor takes one CPU: more actors than the cluster's CPUs would never start, and
        # the jobs given to them would wait forever.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if workers > cpus:
            warnings.warn(
                f"{workers} workers asked for, but Ray has {cpus} CPUs: using {cpus}",
                stacklevel=3,
            )
            workers = cpus
        pool = RayPool(
            ray,
            model,
            windows,
            layers,
            keep_logprobs=keep_logprobs,
            workers=workers,
            importance=importance,
        )
        try:
            yield pool
        finally:
            pool.cancel()


def check_ray_address(address: str) -> None:
    """Fail fast, with the fix, when nothing listens at a Ray address (``ray.init`` itself
    retries for a long time before it gives up)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise BitallocError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379 or ray://head:10001)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as exc:
        raise BitallocError(
            f"cannot reach Ray at {address!r} ({exc.strerror or exc}); start a head there with "
            "`ray start --head`, fix --ray-address / RAY_ADDRESS, or leave it unset to start a "
            "local Ray"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[Any]:
    """Use the running Ray, or connect to ``address``, or start a local Ray with ``num_cpus``;
    a Ray started here is shut down on exit."""
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_ray_address(address)
        try:
            ray.init(
                address=address,
                num_cpus=None if address else num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
            )
        except ConnectionError as exc:
            # Ray >= 2.59 heads may require a token; a client without one fails here.
            raise BitallocError(
                f"cannot connect to the Ray cluster at {address!r} ({exc}); if the head uses "
                "token authentication, set RAY_AUTH_MODE=token and give its token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN); see README, "
                "'On a Ray cluster'"
            ) from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class _RayWorker:
    """A Ray actor holding one model copy (single-threaded: the actors share the cores)."""

    def __init__(self, model, windows, layers, keep_logprobs, importance=None):
        torch.set_num_threads(1)
        self.evaluator = JobEvaluator(
            model, windows, layers, keep_logprobs=keep_logprobs, importance=importance
        )

    def run(self, job: Job) -> dict[str, Any]:
        result = self.evaluator.run(tuple(tuple(pair) for pair in job))
        # Peak resident memory of this worker so far (Linux reports KiB), for benchmarks.
        result["worker_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result
