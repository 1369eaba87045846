"""The executor: split a writer's output units across ranks, fill each from a producer, publish atomically.

The same code runs as one process or as N ranks under torchrun, srun or mpirun (gloo is enough: ranks
exchange only small status objects; tensors go through the shared filesystem). Every rank computes the
same unit list and assignment from metadata, writes its own units into the staging directory, and rank
0 writes the format's index files, the manifest and the tracker, then renames the staging directory
into place. Any rank's failure fails all ranks and removes the staging directory.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megastack import layout
from megastack.ckpt.base import FileHash, Produce, Reader, Unit, Writer
from megastack.ckpt.manifest import iter_dir_name, write_manifest, write_tracker
from megastack.ckpt.source_check import SourceCheck
from megastack.compat.streaming import release_idle_blocks, streaming_settings
from megastack.errors import UserError
from megastack.fsio import (
    DestinationLock,
    prefetch_files,
    publish_dir,
    refuse_existing,
    staging_dir,
)
from megastack.progress import Progress


@dataclass
class Comm:
    """The few collectives the executor needs; trivial for one process."""

    rank: int = 0
    world: int = 1

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def comm_from_launcher() -> Comm:
    """One process, or the ranks of whichever launcher started us (gloo process group)."""
    from megastack.dist import discover, init_distributed

    env = discover()
    if env.world_size == 1:
        return Comm()
    import torch.distributed as dist

    if not dist.is_initialized():
        init_distributed()
        # A gloo group still alive at interpreter exit can abort the process ("terminate called
        # without an active exception") after the work is done; tear it down first.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Comm(env.rank, env.world_size)


def assign(units: list[Unit], world: int, order_key: Callable[[Unit], Any] | None = None) -> list[list[Unit]]:
    """Largest units first, each to the least-loaded rank: a deterministic, balanced split by bytes.
    Within a rank, units keep the checkpoint's order, or ``order_key``'s (e.g. grouping by source)."""
    loads = [0] * world
    out: list[list[Unit]] = [[] for _ in range(world)]
    for unit in sorted(units, key=lambda u: (-u.nbytes, u.key)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        out[rank].append(unit)
        loads[rank] += unit.nbytes
    order = {u.key: i for i, u in enumerate(units)}
    for units_of_rank in out:
        units_of_rank.sort(key=lambda u: (order_key(u) if order_key else (), order[u.key]))
    return out


@dataclass
class RankPlan:
    rank: int
    units: list[str]
    write_bytes: int
    read_bytes: int
    reads: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    optimizer_bytes: int = 0  # of write_bytes: Adam's state carried with the weights (--carry-optimizer)


def plan_rows(plans: list[RankPlan]) -> list[dict[str, Any]]:
    """The dry run's per-rank records (what --dry-run --json prints under "ranks")."""
    return [
        {
            "rank": p.rank,
            "units": len(p.units),
            "write_bytes": p.write_bytes,
            "read_bytes": p.read_bytes,
            "read_files": len(p.reads),
            "predicted_peak_bytes": p.peak_bytes,
            "optimizer_write_bytes": p.optimizer_bytes,
            "reads": p.reads,
        }
        for p in plans
    ]


def plan_table(rows: list[dict[str, Any]]) -> list[str]:
    """The dry run's per-rank table, one line a rank, in GiB."""
    gib = 1 << 30
    adam = any(r["optimizer_write_bytes"] for r in rows)  # a column only when Adam's state is carried
    head = f"{'rank':>4} {'units':>6} {'read GiB':>9} {'files':>6} {'write GiB':>10} {'peak GiB':>9}"
    lines = [head + (f" {'of which Adam GiB':>17}" if adam else "")]
    for r in rows:
        lines.append(
            f"{r['rank']:>4} {r['units']:>6} {r['read_bytes'] / gib:>9.3f} {r['read_files']:>6} "
            f"{r['write_bytes'] / gib:>10.3f} {r['predicted_peak_bytes'] / gib:>9.3f}"
            + (f" {r['optimizer_write_bytes'] / gib:>17.3f}" if adam else "")
        )
    return lines


def dry_run(
    writer: Writer, reader: Reader, sources_of: Callable[[str, Any], list[tuple[str, Any]]], world: int
) -> list[RankPlan]:
    """What each rank would read and write, and its predicted peak tensor memory, from metadata alone.

    ``sources_of(target, pieces)`` lists the (source name, pieces) a target piece is made from.
    Peak: the unit being written (a torch_dist chunk, or a whole legacy/hf file) and its serialised
    copy, the source slice read for it, and the reader's cached source chunk (loaded bytes + tensor).
    """
    return [rank_plan(rank, units, reader, sources_of) for rank, units in enumerate(assign(writer.units(), world))]


def rank_plan(
    rank: int, units: list[Unit], reader: Reader, sources_of: Callable[[str, Any], list[tuple[str, Any]]]
) -> RankPlan:
    """One rank's share of ``dry_run``: what its ``units`` read and write, and their predicted peak."""
    cached_chunk = getattr(reader, "max_chunk_bytes", lambda: 0)()
    reads: dict[str, int] = {}
    peak = 0
    for unit in units:
        largest_read = 0
        for request in unit.requests:
            for source, pieces in sources_of(request.name, request.pieces):
                touched = reader.sources(source, pieces)
                for path, nbytes in touched.items():
                    reads[path] = reads.get(path, 0) + nbytes
                largest_read = max(largest_read, sum(touched.values()))
        peak = max(peak, 2 * unit.nbytes + largest_read + 2 * cached_chunk)
    return RankPlan(
        rank,
        [u.key for u in units],
        sum(u.nbytes for u in units),
        sum(reads.values()),
        dict(sorted(reads.items())),
        peak,
        sum(u.nbytes for u in units if any(layout.split_state(r.name)[0] for r in u.requests)),
    )


@dataclass
class Source:
    """What a command reads: ``reader``, and ``sources_of(target, pieces)``, the (source name, pieces) each
    target piece is made from. Each rank reads the files it reads mostly into the page cache before writing
    (fsio.prefetch_files); with ``check``, a source with a megastack.json has its files re-hashed against it
    while the output is written (``SourceCheck``)."""

    reader: Reader
    sources_of: Callable[[str, Any], list[tuple[str, Any]]]
    check: bool = True


def _user_message(exc: BaseException, dst: Path) -> str | None:
    """What a user should read for a failure, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    seen = exc
    while seen is not None and not isinstance(seen, OSError):  # torch.save wraps I/O errors
        seen = seen.__cause__ or seen.__context__
    if seen is not None:
        exc = seen
    if not isinstance(exc, OSError):
        # Writers in other languages report I/O failures as their own errors: safetensors' Rust
        # "I/O error: No space left on device (os error 28)", torch's zip writer "PytorchStreamWriter failed
        # writing" or, when a short write went unnoticed, "unexpected pos".
        text = str(exc)
        code = _OS_ERROR.search(text)
        if code is not None:
            exc = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        elif any(m in text for m in ("PytorchStreamWriter failed", "file write failed", "unexpected pos")):
            exc = OSError(5, "write failed (disk full or an I/O error)")
        else:
            return None
    where = f" ({exc.filename})" if exc.filename else ""
    hint = {
        28: "free some space or write elsewhere",
        30: "the destination is read-only; write elsewhere",
        13: "check the destination's permissions",
    }.get(exc.errno or 0, "check the destination")
    return f"cannot write {dst}: {exc.strerror or exc}{where}; {hint}; nothing was published"


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _all_ranks(comm: Comm, dst: Path, cleanup: Callable[[], None], step: Callable[[], Any]) -> Any:
    """Run ``step`` on this rank; if any rank failed, every rank raises the first failure's message and
    rank 0 runs ``cleanup`` (removes the staging directory it owns), so nothing half-written survives."""
    error, result = None, None
    try:
        result = step()
    except Exception as exc:
        error = _user_message(exc, dst)
        if error is None:
            if comm.world == 1:
                cleanup()
                raise
            error = f"rank {comm.rank}: {type(exc).__name__}: {exc}"
    errors = [e for e in comm.gather(error) if e]
    if errors:
        if comm.rank == 0:
            cleanup()
        raise UserError(errors[0])
    return result


def execute(
    writer: Writer,
    produce: Produce,
    dst: str | Path,
    comm: Comm,
    manifest: dict[str, Any],
    iteration: int | None = 0,
    progress: str | None = None,
    order_key: Callable[[Unit], Any] | None = None,
    source: Source | None = None,
) -> Path:
    """Write ``dst`` with every rank's share of ``writer``'s units; rank 0 publishes it.

    ``iteration`` None writes the files directly in ``dst`` (Hugging Face); otherwise ``dst`` is a
    checkpoint root with ``iter_NNNNNNN/`` and the tracker file, like Megatron-LM's. A crash at any
    point leaves either no ``dst`` or a complete one; the ``.dst.partial`` sibling a crash leaves behind
    is removed by the next run. ``source``: see ``Source``; checked, a mismatch of its files (each rank hashes
    a share, in a thread) publishes nothing; unchecked, the event in ``manifest``'s history says so.
    """
    if source is not None and not source.check and manifest.get("history"):
        *before, event = manifest["history"]
        manifest = {**manifest, "history": [*before, {**event, "source_checked": False}]}  # taken on trust
    dst = Path(dst)
    refuse_existing(dst)
    staging = staging_dir(dst)
    target = staging if iteration is None else staging / iter_dir_name(iteration)
    start = time.monotonic()
    lock = DestinationLock(dst)

    def cleanup() -> None:
        if lock.held:  # never another command's partial output
            shutil.rmtree(staging, ignore_errors=True)

    def prepare() -> None:
        if comm.rank == 0:
            lock.acquire()  # refuses while another live command writes the same DST
            refuse_existing(dst)
            if staging.exists():
                shutil.rmtree(staging)  # a crashed earlier attempt; this run starts over
            target.mkdir(parents=True)

    source_check = SourceCheck.of(
        source.reader.path if source is not None and source.check else None, (comm.rank, comm.world)
    )

    def write() -> Any:
        mine = assign(writer.units(), comm.world, order_key)[comm.rank]
        if source is not None:
            prefetch_files(source.reader.path, rank_plan(comm.rank, mine, source.reader, source.sources_of).reads)
        source_check.start()  # after the pre-read (unless the CLI started it): it reads from the page cache
        values = sum(
            math.prod(layout.pieces_shape(layout.logical_shape(writer.cfg, r.name), r.pieces))
            for unit in mine
            for r in unit.requests
        )
        bar = Progress(values, progress or "", enabled=progress is not None and comm.rank == 0, unit="value")

        def produce_logged(name: str, pieces: Any):
            release_idle_blocks()
            tensor = produce(name, pieces)
            bar.update(tensor.numel())
            return tensor

        try:
            with streaming_settings():  # allocator and threads set for streaming (compat/streaming.py)
                return writer.write_units(target, mine, produce_logged, comm.rank)
        finally:
            bar.close()

    try:
        _all_ranks(comm, dst, cleanup, prepare)
        results = comm.gather(_all_ranks(comm, dst, cleanup, write))
        _all_ranks(comm, dst, cleanup, source_check.result)
        _publish(comm, dst, staging, target, writer, results, manifest, iteration, start, cleanup)
    except BaseException as exc:
        if not isinstance(exc, Exception):  # interrupted (SIGINT, SIGTERM): leave nothing half-written
            cleanup()
        raise
    finally:
        lock.release()
    return dst


def _publish(
    comm: Comm,
    dst: Path,
    staging: Path,
    target: Path,
    writer: Writer,
    results: list[Any],
    manifest: dict[str, Any],
    iteration: int | None,
    start: float,
    cleanup: Callable[[], None],
) -> None:
    """Rank 0 finalises the files, writes the manifest and the tracker, and renames staging into place."""

    def publish() -> None:
        if comm.rank != 0:
            return
        writer.finalize(target, results)
        known = {r.relative_path: r.digest for rs in results for r in (rs or []) if isinstance(r, FileHash)}
        write_manifest(target, {**manifest, "write_seconds": round(time.monotonic() - start, 3)}, known)
        if iteration is not None:
            write_tracker(staging, iteration)
        publish_dir(staging, dst)

    _all_ranks(comm, dst, cleanup, publish)
