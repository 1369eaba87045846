"""Benchmark: `megastack grow` on a real-size checkpoint against the I/O bound of the same disk.

Writes a 6-layer checkpoint of the paper's 1.1B shape (or, with --shape 7b, an 8-layer one of the 7B
shape; bf16, random weights) with megastack's torch_dist (or --format legacy: Megatron-LM's TP1 rank file)
writer, grows it x4 (to 24 or 32 layers) with `megastack grow --factor 4` on 1 and 2 ranks, and measures
in the same run:
- wall time of the growth (median of --repeats), each rank a separate process as users run it, and the
  time inside the process after its imports (the slowest rank's);
- the I/O bound: reading every source byte once and writing the grown checkpoint's bytes once (fsync'd)
  on the same filesystem, with no compute;
- peak RSS of the growing process (ru_maxrss of the rank), against the largest single tensor.
With --cold the source is evicted from the page cache before each run and each bound (a checkpoint written
long ago, or by another node): reads then come from the disk, and read-ahead matters.
Each source is read once from the disk before anything is timed (iobound.settle: here the first run after
a source was written was the slowest of every repeated cold run, and the bound, run after it, never paid that).

Usage: python bench/grow.py [--shape 1.1b|7b] [--format torch_dist|legacy] [--workdir DIR] [--repeats 3]
       [--cold] [--json OUT.json]          (disk: ~6 GB at 1.1B, ~32 GB at 7B)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from iobound import dir_bytes, evict, io_bound, settle  # noqa: E402  (bench/, the script's own directory)

from megastack import layout
from megastack.ckpt import formats
from megastack.ckpt.execute import Comm, execute
from megastack.ckpt.manifest import resolve_iteration_dir
from megastack.config import load_model_config, to_dict
from megastack.plan import seeded_normal

RANK_SCRIPT = """
import atexit, sys, time
import megastack.cli as cli  # the `megastack` command, exit included; torch comes with its handler, as there
from megastack.memory import peak_rss_bytes
after_imports = {}
resolve = cli.resolve_handler
def resolve_measured(command):  # in-process time and the baseline start once the handler (torch) is imported
    handler = resolve(command)
    after_imports.update(base=peak_rss_bytes(), start=time.monotonic())
    return handler
cli.resolve_handler = resolve_measured

@atexit.register  # console_main leaves with os._exit after the atexit handlers (cli._exit_now)
def report():
    peak = peak_rss_bytes()
    print("BENCH", time.monotonic() - after_imports["start"], peak, peak - after_imports["base"], flush=True)

sys.exit(cli.console_main())
"""


SHAPES = {"1.1b": ("llama-1.1b", 6), "7b": ("llama-7b", 8)}  # model, source layers (grown x4)


def write_source(path: Path, shape: str, fmt: str) -> tuple[int, int]:
    """A bf16 checkpoint of ``shape`` with its source layer count in ``fmt``; returns (bytes, largest tensor)."""
    model, layers = SHAPES[shape]
    cfg = replace(load_model_config(model), num_layers=layers, name=f"bench-{shape}-small")

    def produce(name, pieces):
        return (seeded_normal(layout.logical_shape(cfg, name), 0, name, pieces) * 0.02).to(torch.bfloat16)

    writer = formats.make_writer(fmt, cfg, torch.bfloat16, None)
    execute(writer, produce, path, Comm(), {"format": fmt, "model": to_dict(cfg)}, iteration=0)
    largest = max(torch.Size(layout.logical_shape(cfg, n)).numel() * 2 for n in layout.logical_names(cfg))
    return dir_bytes(path), largest


def grow_once(
    src: Path, dst: Path, ranks: int, cold: bool = False, extra: tuple[str, ...] = ()
) -> tuple[float, float, int, int]:
    """Wall seconds of the whole command, the slowest rank's seconds after its imports, and the largest peak
    RSS of any rank (absolute, above imports). ``cold``: the source evicted from the page cache first."""
    from megastack.dist import launch_local

    if cold:
        evict(src)

    argv = [sys.executable, "-c", RANK_SCRIPT, "grow", str(src), str(dst), "--factor", "4", *extra]
    start = time.monotonic()
    if ranks == 1:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
        outputs, ok = [proc.stdout + proc.stderr], proc.returncode == 0
    else:
        result = launch_local(argv, ranks, timeout=3600)
        outputs, ok = result.outputs, result.ok
    wall = time.monotonic() - start
    if not ok:
        raise SystemExit("grow failed:\n" + "\n".join(outputs)[-4000:])
    rows = [line.split() for out in outputs for line in out.splitlines() if line.startswith("BENCH")]
    return wall, max(float(r[1]) for r in rows), max(int(r[2]) for r in rows), max(int(r[3]) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b", help="model shape (default 1.1b)")
    parser.add_argument("--format", choices=["torch_dist", "legacy"], default="torch_dist", help="source and output")
    parser.add_argument("--workdir", help="where to write (default: a temp dir; ~6 GB at 1.1B, ~32 GB at 7B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cold", action="store_true", help="evict the source from the page cache before each run and each bound"
    )
    parser.add_argument(
        "--no-source-check", action="store_true", help="pass --no-source-check (the source is not re-hashed)"
    )
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    extra = ("--no-source-check",) if args.no_source_check else ()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megastack-bench-grow-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    src_bytes, largest = write_source(src, args.shape, args.format)
    settle(src)
    results: dict = {
        "shape": args.shape,
        "format": args.format,
        "cold": args.cold,
        "source_check": not args.no_source_check,
        "source_layers": SHAPES[args.shape][1],
        "source_bytes": src_bytes,
        "largest_tensor_bytes": largest,
        "runs": {},
    }
    for ranks in (1, 2):
        walls, inner, peaks, grown, bounds = [], [], [], [], []
        for i in range(args.repeats):
            dst = work / f"dst{ranks}_{i}"
            wall, in_process, peak, above = grow_once(src, dst, ranks, args.cold, extra)
            inner.append(in_process)
            grown.append(above)
            out_bytes = dir_bytes(dst)
            shutil.rmtree(dst)
            bounds.append(io_bound(resolve_iteration_dir(src), out_bytes, work / "io_bound.bin", args.cold))
            walls.append(wall)
            peaks.append(peak)
        results["output_bytes"] = out_bytes
        results["runs"][ranks] = {
            "wall_s": walls,
            "median_wall_s": statistics.median(walls),
            "in_process_s": inner,
            "median_in_process_s": statistics.median(inner),
            "io_bound_s": [b["bound_s"] for b in bounds],
            "io_bound_runs": bounds,
            "median_io_bound_s": statistics.median(b["bound_s"] for b in bounds),
            "peak_rss_bytes": max(peaks),
            "peak_rss_above_imports_bytes": max(grown),
        }
        r = results["runs"][ranks]
        print(
            f"ranks={ranks}: grow median {r['median_wall_s']:.2f}s (in-process {r['median_in_process_s']:.2f}s), "
            f"I/O bound median {r['median_io_bound_s']:.2f}s "
            f"(ratio {r['median_wall_s'] / r['median_io_bound_s']:.2f}x), peak RSS "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB, {r['peak_rss_above_imports_bytes'] / 2**20:.0f} MiB above "
            f"imports (largest tensor {largest / 2**20:.0f} MiB)",
            flush=True,
        )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
