"""Kernel selection, rank discovery, the local launcher, the CPU compat module and the CLI skeleton."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megastack.dist import DistEnv, discover, free_port, launch_local, slurm_master_port
from megastack.errors import UserError
from megastack.model.build import Kernels, Machine, check_precision, select_kernels

from conftest import assert_one_line_error, run_cli

# ----------------------------------------------------------------------------- kernel selection


def test_cpu_gets_local_spec_and_no_fusions():
    assert select_kernels(Machine(cuda=False, transformer_engine=True, apex=True)) == Kernels(
        "local", False, False, False, False
    )


def test_gpu_with_te_gets_te_spec_and_fusions():
    k = select_kernels(Machine(cuda=True, transformer_engine=True, apex=False))
    assert k.spec == "transformer_engine" and k.apply_rope_fusion and k.bias_activation_fusion
    assert k.masked_softmax_fusion
    assert not k.gradient_accumulation_fusion  # DeepSpeed allocates no main_grad buffers
    assert select_kernels(Machine(True, True, False), main_grad_buffers=True).gradient_accumulation_fusion


def test_gpu_without_te_falls_back_to_local_spec():
    k = select_kernels(Machine(cuda=True, transformer_engine=False, apex=False))
    assert k.spec == "local" and not k.apply_rope_fusion and not k.masked_softmax_fusion
    assert k.bias_activation_fusion
    assert select_kernels(Machine(True, False, True)).masked_softmax_fusion


def test_fp16_refused_on_cpu_only():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        check_precision("fp16", Machine(False, False, False))
    check_precision("fp16", Machine(True, False, False))
    check_precision("bf16", Machine(False, False, False))


def test_cpu_spec_config_matches_selection():
    pytest.importorskip("megatron.core")
    from megastack.config import ModelConfig, ParallelConfig
    from megastack.model.build import transformer_config

    cfg = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=256, seq_length=16
    )
    machine = Machine(False, False, False)
    tc = transformer_config(cfg, ParallelConfig(precision="bf16"), select_kernels(machine), machine)
    assert tc.use_cpu_initialization and tc.bf16 and not tc.apply_rope_fusion and tc.normalization == "RMSNorm"
    assert tc.gated_linear_unit and not tc.add_bias_linear and tc.num_query_groups == 4


def test_compat_is_inert_when_cuda_present(monkeypatch):
    import torch

    from megastack.compat import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu, "_applied", False)
    before = torch.cuda.synchronize
    assert cpu.apply() is False
    assert torch.cuda.synchronize is before
    assert type(cpu.device_mode()).__name__ == "nullcontext"


def test_cpu_rng_tracker_forks_independent_streams():
    import torch

    from megastack.compat.cpu import CpuRNGStatesTracker

    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    torch.manual_seed(5)
    outside = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)
    assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(1)))
    with tracker.fork("a"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the forked stream advanced


# ----------------------------------------------------------------------------- rank discovery


def test_discover_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert discover(env) == DistEnv(3, 4, 1, "h0", 1234, "torchrun")


def test_discover_slurm_uses_nodelist_and_job_port():
    env = {
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node1",
    }
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (2, 4, 0, "slurm")
    assert d.master_addr == "node1" and d.master_port == slurm_master_port("77") == 20077


def test_discover_torchrun_wins_inside_slurm():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "9",
    }
    assert discover(env).launcher == "torchrun" and discover(env).rank == 5


def test_discover_openmpi_and_mpich_without_mpi():
    ompi = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "5000",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    assert discover(ompi) == DistEnv(1, 2, 1, "10.0.0.1", 5000, "openmpi")
    mpich = {"PMI_RANK": "0", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}
    d = discover(mpich, allow_mpi=False)
    assert (d.rank, d.world_size, d.launcher) == (0, 3, "mpich")


def test_discover_single_process():
    assert discover({}).launcher == "single" and discover({}).world_size == 1


def test_mpirun_rendezvous_over_mpi4py(tmp_path):
    """Two ranks under MPICH's mpiexec agree on rank 0's rendezvous through mpi4py."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec beside this Python (pip install mpich)")
    # each rank writes a file: MPICH's mpiexec forwards rank output unreliably (a rank's line went missing in CI)
    code = (
        "import pathlib, sys; from megastack.dist import discover; d = discover(); "
        "pathlib.Path(sys.argv[1], f'rank{d.rank}').write_text(f'{d.rank} {d.world_size} {d.master_port}')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = [(tmp_path / f"rank{rank}").read_text().split() for rank in (0, 1)]
    assert [line[:2] for line in lines] == [["0", "2"], ["1", "2"]]
    assert lines[0][2] == lines[1][2]  # same port on both ranks


# ----------------------------------------------------------------------------- local launcher


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_rank_waits_for_the_store_to_listen_then_returns_at_once():
    """Non-zero ranks poll rank 0's port before dialling the store (torch's client backs off 0.1-0.6 s when
    refused); the poll ends on the first accepted connection, or at its deadline when nobody listens."""
    import socket
    import threading

    from megastack.dist import _await_listener

    port = free_port()
    server = socket.socket()

    def listen_later() -> None:
        time.sleep(0.3)
        server.bind(("127.0.0.1", port))
        server.listen()

    threading.Thread(target=listen_later, daemon=True).start()
    start = time.monotonic()
    _await_listener("127.0.0.1", port, timeout_s=30.0)
    waited = time.monotonic() - start
    server.close()
    assert 0.25 < waited < 20.0  # returned once the server listened, not at the 30 s deadline
    start = time.monotonic()
    _await_listener("127.0.0.1", free_port(), timeout_s=0.2)  # nobody listens: gives up at the deadline
    assert 0.15 < time.monotonic() - start < 10.0


def test_launch_local_passes_rank_env():
    code = "import os; print('R', os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_PORT'])"
    result = launch_local([sys.executable, "-c", code], 3, timeout=60)
    assert result.ok
    ranks = sorted(out.split()[1] for out in result.outputs)
    assert ranks == ["0", "1", "2"]


def test_launch_local_splits_the_cores_between_ranks(monkeypatch):
    """Like torchrun: ranks that each start one thread per core only contend (4 ranks on 2 cores: 3x slower)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code = "import os; print(os.environ['OMP_NUM_THREADS'])"
    result = launch_local([sys.executable, "-c", code], 2, timeout=60)
    assert result.ok and [out.strip() for out in result.outputs] == [str(max(1, os.cpu_count() // 2))] * 2
    result = launch_local([sys.executable, "-c", code], 2, timeout=60, env={"OMP_NUM_THREADS": "3"})
    assert result.ok and [out.strip() for out in result.outputs] == ["3", "3"]  # the user's choice stands


def test_launch_local_timeout_leaves_no_process(tmp_path):
    pidfile = tmp_path / "pids"
    code = (
        f"import os, subprocess, time; child = subprocess.Popen(['sleep', '300']);"
        f"open('{pidfile}', 'a').write(f'{{os.getpid()}} {{child.pid}}\\n'); time.sleep(300)"
    )
    start = time.monotonic()
    result = launch_local([sys.executable, "-c", code], 2, timeout=5)
    assert result.timed_out and not result.ok
    assert time.monotonic() - start < 60
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 4
    time.sleep(0.2)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid


def test_launch_local_stops_others_when_one_rank_fails():
    code = "import os, sys, time; r = int(os.environ['RANK']); sys.exit(3) if r == 1 else time.sleep(300)"
    start = time.monotonic()
    result = launch_local([sys.executable, "-c", code], 2, timeout=120)
    assert not result.ok and not result.timed_out and result.returncodes[1] == 3
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------- CLI skeleton

SUBCOMMANDS = ["plan", "grow", "convert", "inspect", "verify", "data", "train", "run", "validate"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and f"megastack {command}" in proc.stdout


def test_every_command_has_a_handler():
    from megastack.cli import HANDLERS, build_parser, resolve_handler

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == set(HANDLERS)
    assert all(callable(resolve_handler(command)) for command in HANDLERS)


def test_the_cli_and_rank_discovery_import_without_torch():
    """The CLI parses, discovers its rank and starts a source check before a handler imports torch (~0.9 s
    of one core): megastack.cli, megastack.dist and megastack.ckpt.source_check stay free of it."""
    code = "import sys, megastack.cli, megastack.dist, megastack.ckpt.source_check; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


EXIT_PROBE = """
import atexit, sys
from megastack.cli import console_main
class Sentinel:
    def __del__(self):  # runs in the interpreter's teardown, which a command leaving at once skips
        print("teardown", flush=True)
sentinel = Sentinel()
atexit.register(lambda: print("atexit ran", flush=True))
sys.exit(console_main())
"""


def test_convert_and_grow_leave_at_once_after_their_atexit_handlers(tmp_path):
    """console_main ends a convert or grow with os._exit (cli._exit_now: the interpreter's teardown costs
    ~0.11 s with torch imported): atexit handlers still run, printed lines and the exit code still arrive,
    the output is published; other commands exit as Python does."""
    from ckpt_factory import reference, small_config, write_checkpoint

    write_checkpoint(reference(small_config()), tmp_path / "td")

    def probe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", EXIT_PROBE, *args], capture_output=True, text=True, timeout=300)

    done = probe("convert", str(tmp_path / "td"), str(tmp_path / "hf"), "--to", "hf")
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout and "atexit ran" in done.stdout and "teardown" not in done.stdout
    assert (tmp_path / "hf" / "config.json").is_file()
    refused = probe("grow", str(tmp_path / "td"), str(tmp_path / "hf"), "--factor", "2")  # DST exists
    assert refused.returncode == 1 and "already exists" in refused.stderr
    assert "atexit ran" in refused.stdout and "teardown" not in refused.stdout
    other = probe("plan", "--help")
    assert other.returncode == 0 and "atexit ran" in other.stdout and "teardown" in other.stdout


def test_handlers_import_with_the_collector_paused_and_leave_its_state_as_found(monkeypatch):
    """resolve_handler pauses Python's cyclic collector while the handler's module imports (torch's import
    makes objects that collections would walk over and over) and leaves it on or off as it found it."""
    import gc
    import importlib

    from megastack import cli

    seen: list[bool] = []
    monkeypatch.setattr(importlib, "import_module", lambda name: seen.append(gc.isenabled()) or cli)
    monkeypatch.setitem(cli.HANDLERS, "plan", "megastack.cli:main")
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            assert cli.resolve_handler("plan") is cli.main
            assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
    assert seen == [False, False]


def test_an_option_not_built_yet_says_so_and_exits_2(tmp_path):
    """The interface names it; the code does not do it yet: one line, exit 2, nothing written."""
    src = Path(__file__).parent / "fixtures" / "megatron_lm" / "legacy_distopt"  # local spec -> a TE run's buffer
    proc = run_cli("grow", str(src), str(tmp_path / "dst"), "--factor", "2", "--carry-optimizer", "--norm-names", "te")
    assert proc.returncode == 2
    assert_one_line_error(proc, "not built yet")
    assert not (tmp_path / "dst").exists()


def test_python_m_and_console_script_agree():
    proc = run_cli("--version")
    assert proc.returncode == 0 and "megastack" in proc.stdout


def test_readme_quick_start_matches_ci():
    """README's Quick start has exactly two commands; the second is what .ci/run runs."""
    import re

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_an_installed_wheel_finds_the_shipped_configs(tmp_path):
    """Shipped model and recipe names are package data: a wheel installed away from the checkout (no
    configs/ beside it) still resolves `llama-7b` and the embedded default recipe."""
    import shutil
    import zipfile

    from conftest import REPO

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "megastack", src / "megastack", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site"
    zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).extractall(site)
    code = (
        "import megastack.config as c, megastack.run.recipe as p; "
        "print(c.__file__); print(c.load_model_config('llama-7b').num_layers); print(p.load_recipe(None)[1])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert run.returncode == 0, run.stderr
    where, layers, recipe = run.stdout.split()
    assert where.startswith(str(site)) and layers == "32" and recipe.startswith(str(site))


@pytest.mark.timeout(300)
def test_reinitialising_model_parallel_releases_its_process_groups():
    """Each training stage re-initialises megatron's parallel_state; megatron's destroy_model_parallel only
    drops references, so without megastack's release every stage leaked ~13 gloo groups (two threads each)."""
    from conftest import run_workers

    results = run_workers("process_groups.py", 2)
    assert len(results) == 2
    for r in results:
        first, *later = r["threads"]
        assert max(later) <= first, r  # the sixth layout costs no more threads than the first


_GLOO_THREADS_AFTER_DESTROY = """
import gc, sys
from pathlib import Path
from megastack.dist import init_distributed
import torch.distributed as dist

def gloo_threads():
    return sum((t / "comm").read_text().startswith("pt_gloo") for t in Path("/proc/self/task").iterdir())

init_distributed()
import torch._dynamo  # what an optimizer's first step imports; it imports torch.distributed.nn.functional
dist.barrier()
alive = gloo_threads()
dist.destroy_process_group()
gc.collect()
print(alive, gloo_threads())
"""


@pytest.mark.timeout(120)
def test_destroying_the_process_group_stops_its_threads_after_late_imports():
    """A gloo group still alive at interpreter exit aborts the process after the work is done: its worker
    thread drops the last collective's tensors and needs the GIL of a finalizing interpreter. The group
    must go when destroyed, even after torch._dynamo imported torch.distributed.nn.functional (whose
    default arguments bind the default group at import)."""
    run = subprocess.run(
        [sys.executable, "-c", _GLOO_THREADS_AFTER_DESTROY],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    alive, after = map(int, run.stdout.split())
    assert alive > 0 and after == 0, run.stdout
