"""Peer benchmark: depth stacking of a Hugging Face Llama with mergekit's passthrough merge vs megastack.

The same model, the same result: a Hugging Face checkpoint of the 1.1B shape cut to 6 layers (bf16,
random weights, written by the bench) is stacked x4 into 24 layers (layer order 0-5, 0-5, 0-5, 0-5, which
is G_stack):
- mergekit: `mergekit-yaml` with a passthrough config of four `layer_range: [0, 6]` slices, HF in, HF out;
- megastack, HF in -> HF out in one command: `megastack grow --factor 4` on the HF checkpoint (1 and 2 ranks);
- the same through Megatron's format: `megastack convert --to torch_dist`, `megastack grow --factor 4`,
  `megastack convert --to hf`, each step timed, and grow alone on the torch_dist copy (1 and 2 ranks).
The bench checks that mergekit's and megastack's HF outputs hold bit-identical tensors, so the timings
compare the same work. Each command runs as its own process under /usr/bin/time (wall, peak RSS); medians
of --repeats. The I/O bound of the HF -> HF job (read the source once, write the output's bytes once,
fsync, same filesystem: bench/iobound.py) is measured in the same run.

mergekit is installed apart from megastack's environment so that it cannot change torch:
    python -m venv --system-site-packages .venv-mergekit
    .venv-mergekit/bin/pip install --no-deps mergekit immutables accelerate peft
    python bench/mergekit_peer.py --mergekit .venv-mergekit/bin/mergekit-yaml [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from iobound import dir_bytes, io_bound  # noqa: E402  (bench/, the script's own directory)
from sources import write_hf_download  # noqa: E402

from megastack.errors import UserError  # noqa: E402


def write_source(path: Path, model: str, layers: int) -> dict[str, Any]:
    """A bf16 HF checkpoint of ``model``'s shape with ``layers`` layers (like a download: no megastack.json)."""
    from megastack.config import load_model_config

    cfg = dataclasses.replace(load_model_config(model), num_layers=layers, name=f"bench-{model}-{layers}L")
    write_hf_download(path, cfg)
    return {"parameters": cfg.total_parameters(), "layers": layers, "bytes": dir_bytes(path)}


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command under /usr/bin/time; a failure stops the bench."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        start = time.monotonic()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", stats.name, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=7200,
        )
        wall = time.monotonic() - start
        if proc.returncode != 0:
            raise UserError(f"{' '.join(argv[:3])} failed: {(proc.stderr.strip() or proc.stdout).splitlines()[-1]}")
        return wall, int(stats.read().split()[-1]) * 1024


def megastack_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megastack", *args]


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Whether two HF directories hold the same tensors (names, dtypes, bytes); and how many."""
    from safetensors import safe_open

    def index(root: Path) -> dict[str, Path]:
        out = {}
        for shard in sorted(root.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                out.update({k: shard for k in f.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False, len(ia)
    for name in sorted(ia):
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            if ta.dtype != tb.dtype or ta.shape != tb.shape or not bool((ta == tb).all()):
                return False, len(ia)
    return True, len(ia)


def passthrough_config(src: Path, layers: int, factor: int) -> str:
    slices = "".join(f"  - sources:\n      - model: {src}\n        layer_range: [0, {layers}]\n" for _ in range(factor))
    return f"slices:\n{slices}merge_method: passthrough\ndtype: bfloat16\n"


def summarise(runs: list[tuple[float, int]]) -> dict[str, Any]:
    return {
        "wall_s": [round(w, 3) for w, _ in runs],
        "median_wall_s": statistics.median(w for w, _ in runs),
        "peak_rss_bytes": max(p for _, p in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mergekit",
        default=shutil.which("mergekit-yaml"),
        help="the mergekit-yaml executable (default: the one on PATH)",
    )
    parser.add_argument("--model", default="llama-1.1b", help="shape of the model (a shipped model config)")
    parser.add_argument("--layers", type=int, default=6, help="layers of the source")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where to write (default: a temp dir; ~8 GB for the 1.1B shape)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1 or args.layers < 1 or args.factor < 2:
            raise UserError("--repeats and --layers must be positive and --factor at least 2")
        if not Path("/usr/bin/time").exists():
            raise UserError("/usr/bin/time is needed to measure peak memory (apt-get install time)")
        results = bench(args)
    except UserError as exc:
        print(f"mergekit_peer: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def mergekit_version(exe: str) -> str | None:
    python = Path(exe).with_name("python")
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megastack-bench-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src-hf"
    shutil.rmtree(src, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    results: dict[str, Any] = {
        "source": write_source(src, args.model, args.layers),
        "model": args.model,
        "factor": args.factor,
        "target_layers": args.layers * args.factor,
    }
    mergekit: dict[str, Any] = {"available": bool(args.mergekit and Path(args.mergekit).exists())}
    if not mergekit["available"]:
        mergekit["error"] = (
            "mergekit-yaml not found (give --mergekit; install: python -m venv "
            "--system-site-packages .venv-mergekit && .venv-mergekit/bin/pip install --no-deps "
            "mergekit immutables accelerate peft)"
        )
    else:
        mergekit["version"] = mergekit_version(args.mergekit)
    config = work / "passthrough.yaml"
    config.write_text(passthrough_config(src, args.layers, args.factor))
    steps: dict[str, list[tuple[float, int]]] = {
        k: []
        for k in (
            "mergekit",
            "megastack_grow_hf",
            "megastack_grow_hf_2_ranks",
            "convert_to_torch_dist",
            "grow",
            "convert_to_hf",
            "megastack_hf_to_hf",
            "grow_2_ranks",
        )
    }
    bounds: list[float] = []
    identical, tensors = None, 0
    for i in range(args.repeats):
        td, grown, hf_out, mk_out = work / "td", work / "grown", work / "hf-out", work / "mk-out"
        direct, direct2 = work / "hf-direct", work / "hf-direct-2"
        for p in (td, grown, hf_out, mk_out, work / "grown2", direct, direct2):
            shutil.rmtree(p, ignore_errors=True)
        if mergekit["available"]:
            steps["mergekit"].append(
                timed([args.mergekit, str(config), str(mk_out), "--no-copy-tokenizer", "--no-write-model-card"], env)
            )
        # HF in, HF out in one command (1 and 2 ranks): mergekit's job as mergekit does it
        steps["megastack_grow_hf"].append(
            timed(megastack_cmd("grow", str(src), str(direct), "--factor", str(args.factor)), env)
        )
        steps["megastack_grow_hf_2_ranks"].append(grow_two_ranks(src, direct2, args.factor, env))
        a = timed(megastack_cmd("convert", str(src), str(td), "--to", "torch_dist"), env)
        b = timed(megastack_cmd("grow", str(td), str(grown), "--factor", str(args.factor)), env)
        c = timed(megastack_cmd("convert", str(grown), str(hf_out), "--to", "hf"), env)
        steps["convert_to_torch_dist"].append(a)
        steps["grow"].append(b)
        steps["convert_to_hf"].append(c)
        steps["megastack_hf_to_hf"].append((a[0] + b[0] + c[0], max(a[1], b[1], c[1])))
        steps["grow_2_ranks"].append(grow_two_ranks(td, work / "grown2", args.factor, env))
        out_bytes = dir_bytes(hf_out)
        if i == 0:
            results["direct_equals_three_commands"] = same_tensors(direct, hf_out)[0]
            results["direct_2_ranks_equals_1"] = same_tensors(direct2, direct)[0]
        if mergekit["available"] and i == 0:
            identical, tensors = same_tensors(mk_out, direct)
            results["mergekit_output_bytes"] = dir_bytes(mk_out)
        results["megastack_output_bytes"] = out_bytes
        bounds.append(io_bound(src, out_bytes, work / "io_bound.bin"))
        print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}s" for k, v in steps.items() if v), flush=True)
    results["steps"] = {k: summarise(v) for k, v in steps.items() if v}
    results["io_bound_s"] = [round(b["bound_s"], 3) for b in bounds]
    results["io_bound_runs"] = bounds
    results["median_io_bound_s"] = statistics.median(b["bound_s"] for b in bounds)
    results["identical_outputs"] = identical
    results["tensors_compared"] = tensors
    results["mergekit"] = mergekit
    results["repeats"] = args.repeats
    if not args.workdir:
        shutil.rmtree(work)
    return results


def grow_two_ranks(src: Path, dst: Path, factor: int, env: dict[str, str]) -> tuple[float, int]:
    """`megastack grow` on 2 local ranks (torchrun-style env); wall and the larger rank's peak RSS."""
    from megastack.dist import free_port

    port = str(free_port())
    start = time.monotonic()
    procs, stats = [], []
    for rank in range(2):
        stat = tempfile.NamedTemporaryFile("r", suffix=".time")
        stats.append(stat)
        rank_env = env | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [
                    "/usr/bin/time",
                    "-f",
                    "%M",
                    "-o",
                    stat.name,
                    *megastack_cmd("grow", str(src), str(dst), "--factor", str(factor)),
                ],
                env=rank_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = [p.communicate(timeout=7200)[1] for p in procs]
    wall = time.monotonic() - start
    if any(p.returncode for p in procs):
        raise UserError(f"2-rank grow failed: {next(e for e in errors if e.strip()).strip().splitlines()[-1]}")
    peak = max(int(s.read().split()[-1]) * 1024 for s in stats)
    for s in stats:
        s.close()
    return wall, peak


if __name__ == "__main__":
    sys.exit(main())
