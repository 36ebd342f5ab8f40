"""``--engine ray``: shards on Ray workers, each loading the model from its folder once.

Design note
-----------
The driver reads the data file and sends each shard's records to a pool of actors (one per
worker, ``num_cpus=1``); an actor loads the model and tokenizer from the folder (the same path
on every node: a shared file system, or the same copy on each) and returns the shard's sums as
JSON. At most two shards per worker are in flight, so the driver's memory stays bounded; each
result is handed to ``on_done`` (which writes the shard file) as it arrives, in whatever order.
The tables merge shards in shard order, so they do not depend on that order. Without
``address`` a local cluster of ``workers`` CPUs is started and shut down at the end; with one
(``ray://head:10001``, ``head:6379``, ``auto``) the existing cluster is joined and left running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import AttnScopeError
from .aggregate import Accumulator
from .engine import ShardResult

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}


@dataclass(frozen=True)
class WorkerSpec:
    model: str
    batch_size: int
    max_length: int
    top_k: int


class ShardWorker:
    """A Ray actor's state: the model, loaded once, and the runner of its shards."""

    def __init__(self, spec: WorkerSpec) -> None:
        from ..run import _load
        from .engine import ShardRunner

        tokenizer, model = _load(spec.model)
        self.runner = ShardRunner(
            model,
            tokenizer,
            batch_size=spec.batch_size,
            max_length=spec.max_length,
            top_k=spec.top_k,
        )

    def run(self, index: int, records: list[tuple[int, str | None]]) -> dict[str, Any]:
        result = self.runner.run(records)
        return {
            "index": index,
            "records": len(records),
            **result.counts(),
            "skipped": result.skipped,
            "sums": result.sums.to_json(),
        }


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise AttnScopeError("--engine ray needs Ray: pip install 'attnscope[ray]'") from None
    return ray


def run_ray(
    shards: Iterator[tuple[int, list[tuple[int, str | None]]]],
    spec: WorkerSpec,
    workers: int,
    address: str | None,
    on_done: Callable[[int, int, ShardResult], None],
) -> None:
    """Run every shard on ``workers`` Ray actors; ``on_done`` as each finishes."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        environment = {"env_vars": WORKER_ENV}
        try:
            if address is None:
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    logging_level="warning",
                    runtime_env=environment,
                )
            else:  # Ray Client (ray://) takes fewer options than a local start
                ray.init(address=address, runtime_env=environment)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise AttnScopeError(f"could not start or join {where} ({error})") from None
        started = True
    try:
        actor = ray.remote(num_cpus=1)(ShardWorker)
        pool = [actor.remote(spec) for _ in range(workers)]
        free = list(range(workers)) * 2  # two shards queued per actor: it never waits
        pending: dict[Any, int] = {}  # object ref -> the actor running it
        for index, records in shards:
            while not free:
                _collect(ray, pending, free, spec, on_done)
            worker = free.pop(0)
            pending[pool[worker].run.remote(index, records)] = worker
        while pending:
            _collect(ray, pending, free, spec, on_done)
    finally:
        if started:
            ray.shutdown()


def _collect(
    ray: Any,
    pending: dict[Any, int],
    free: list[int],
    spec: WorkerSpec,
    on_done: Callable[[int, int, ShardResult], None],
) -> None:
    ready, _ = ray.wait(list(pending), num_returns=1)
    for ref in ready:
        free.append(pending.pop(ref))
        try:
            data = ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, AttnScopeError):
                raise AttnScopeError(str(cause)) from None
            raise AttnScopeError(f"a Ray worker failed: {cause or error}") from None
        except ray.exceptions.RayError as error:
            raise AttnScopeError(f"a Ray worker was lost ({error}); rerun to resume") from None
        result = ShardResult(
            Accumulator.from_json(data["sums"], spec.max_length, spec.top_k),
            texts=data["texts"],
            tokens=data["tokens"],
            truncated=data["truncated"],
            empty=data["empty"],
            skipped=data["skipped"],
        )
        on_done(data["index"], data["records"], result)
