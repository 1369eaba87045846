"""Rank discovery for every launcher, process-group setup, free ports, and a local N-process launcher.

Launchers name ranks differently: torchrun and the deepspeed launcher set RANK/WORLD_SIZE, srun sets
SLURM_PROCID/SLURM_NTASKS, Open MPI sets OMPI_COMM_WORLD_*, MPICH's Hydra sets PMI_*. ``discover()``
maps all of them to one ``DistEnv``; where the launcher gives no rendezvous address (mpirun), rank 0's
host and a free port are shared through mpi4py.
"""

from __future__ import annotations

import datetime
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | openmpi | mpich | slurm | single


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM nodelist, via ``scontrol show hostnames`` (handles node[1-4] ranges)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def slurm_master_port(job_id: str) -> int:
    """A per-job port so concurrent jobs on one node do not collide (fixed ports did, see notes)."""
    return 20000 + int(job_id) % 40000 if job_id.isdigit() else 29500


def _int(env: Mapping[str, str], *names: str, default: int = 0) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def _mpi_rendezvous() -> tuple[str, int]:
    """Rank 0's host and a free port, shared with every rank over MPI."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    payload = (
        (socket.gethostname() if comm.Get_size() > 1 else "127.0.0.1", free_port()) if comm.Get_rank() == 0 else None
    )
    return comm.bcast(payload, root=0)


def discover(env: Mapping[str, str] | None = None, *, allow_mpi: bool = True) -> DistEnv:
    """This process's rank, world and rendezvous from whichever launcher started it."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR")
    port = _int(env, "MASTER_PORT", default=0)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, world, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "openmpi"
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
    elif "PMI_RANK" in env or "PMIX_RANK" in env:
        launcher = "mpich"
        rank, world = _int(env, "PMI_RANK", "PMIX_RANK"), _int(env, "PMI_SIZE", default=1)
        local = _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        addr = addr or slurm_master_addr(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        port = port or slurm_master_port(env.get("SLURM_JOB_ID", ""))
    else:
        return DistEnv(0, 1, 0, addr or "127.0.0.1", port or 0, "single")
    if launcher in ("openmpi", "mpich") and (not addr or not port):
        if allow_mpi:
            mpi_addr, mpi_port = _mpi_rendezvous()
            addr, port = addr or mpi_addr, port or mpi_port
        else:
            addr, port = addr or "127.0.0.1", port or 29500
    return DistEnv(rank, world, local, addr or "127.0.0.1", port or 29500, launcher)


def _await_listener(addr: str, port: int, timeout_s: float) -> None:
    """Return once ``addr:port`` accepts a connection, or after ``timeout_s`` (init then waits on its own).

    A rank whose TCPStore client dials before rank 0's server listens is refused and retries after
    torch's exponential backoff: 0.1-0.6 s added to a multi-rank start, at random (3 of 16 two-rank
    starts here). Polling every 5 ms first lets the client connect on its first try."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((addr, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.005)


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Start torch.distributed (nccl on GPU, gloo on CPU) for whichever launcher started us."""
    import torch  # here, not at the top: the CLI reads ranks with discover() before it imports torch

    denv = discover()
    if torch.distributed.is_initialized():
        return denv
    os.environ.update(
        RANK=str(denv.rank),
        WORLD_SIZE=str(denv.world_size),
        LOCAL_RANK=str(denv.local_rank),
        MASTER_ADDR=denv.master_addr,
    )
    port = denv.master_port or free_port()  # single process: any free port
    os.environ["MASTER_PORT"] = str(port)
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when it is
    # imported; imported after this call (torch._dynamo pulls it in when an optimizer first steps),
    # those defaults hold the default group past destroy_process_group, so its worker threads outlive
    # the interpreter and abort the process at exit ("terminate called without an active exception").
    # Imported now, the defaults are None.
    importlib.import_module("torch.distributed.nn.functional")

    if denv.rank != 0:
        _await_listener(denv.master_addr, port, min(timeout_s, 60.0))  # a rank 0 slower than that: torch's retry
    torch.distributed.init_process_group(
        backend=backend, rank=denv.rank, world_size=denv.world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return denv


def release_model_parallel() -> None:
    """Forget megatron's parallel_state and destroy the process groups it created: its own
    ``destroy_model_parallel`` only drops the references, so every re-initialisation (one per stage of a
    recipe or a speedup sweep) left ~13 live groups behind (on gloo, two threads each: 500+ threads after a
    dozen stages; on NCCL, communicator memory)."""
    import torch
    from megatron.core import parallel_state as ps

    groups = list({id(g): g for g in (getattr(ps, "_global_process_group_list", None) or [])[1:] if g}.values())
    ps.destroy_model_parallel()
    if groups:
        torch.distributed.barrier()  # every rank is done with them
        for group in groups:
            try:
                torch.distributed.destroy_process_group(group)
            except ValueError:  # the same group listed twice (megatron reuses some for several roles): gone
                pass


def init_model_parallel(tensor: int, pipeline: int, seed: int = 1234, expert: int = 1) -> None:
    """(Re)initialise megatron's parallel_state and its RNG trackers for a TP x PP (x EP) layout."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megastack.compat import cpu

    cpu.apply()
    if ps.model_parallel_is_initialized():
        release_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline, expert_model_parallel_size=expert
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ----------------------------------------------------------------------------- local launcher


@dataclass
class LocalResult:
    returncodes: list[int]
    outputs: list[str]
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def describe(self) -> str:
        parts = [
            f"rank {r}: rc={rc}\n{out[-4000:]}"
            for r, (rc, out) in enumerate(zip(self.returncodes, self.outputs, strict=False))
        ]
        return ("TIMED OUT\n" if self.timed_out else "") + "\n".join(parts)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the launching process dies (Linux), so a killed
    launcher never leaves ranks behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch_local(
    argv: Sequence[str],
    nprocs: int,
    *,
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    stream_rank0: bool = False,
) -> LocalResult:
    """Run ``argv`` as ``nprocs`` ranks on this machine (torchrun-style env, gloo) with a hard timeout.

    Each rank gets its own session; on timeout, on failure of any rank, on Ctrl-C, or on return, every
    process group is killed, so nothing is left behind. Output of each rank is captured to a file;
    ``stream_rank0`` lets rank 0 write to this process's terminal instead (its captured output is then
    empty).
    """
    port = free_port()
    base = {**os.environ, **(env or {})}
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        PYTHONUNBUFFERED="1",
    )
    if "OMP_NUM_THREADS" not in base:  # as torchrun: ranks that each spawn a thread per core only contend
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    procs: list[subprocess.Popen] = []
    logs = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for rank in range(nprocs):
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            output = {} if stream_rank0 and rank == 0 else {"stdout": log, "stderr": subprocess.STDOUT}
            procs.append(
                subprocess.Popen(
                    list(argv),
                    env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                    **output,
                )
            )
        while True:
            codes = [p.poll() for p in procs]
            if all(code is not None for code in codes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            if any(code not in (None, 0) for code in codes):
                time.sleep(2.0)  # let the other ranks print their view of the failure, then stop them
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            _kill_group(p)
        for p in procs:
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return LocalResult([p.returncode for p in procs], outputs, timed_out)


def python_argv(module_or_script: str, *args: str) -> list[str]:
    """[python, -m module, args...] or [python, script.py, args...]."""
    if module_or_script.endswith(".py") or Path(module_or_script).exists():
        return [sys.executable, module_or_script, *args]
    return [sys.executable, "-m", module_or_script, *args]
