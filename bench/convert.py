"""Benchmark: `megastack convert` on a checkpoint of the paper's 1.1B shape against the disk's I/O bound.

Writes a Hugging Face checkpoint of configs/models/llama-1.1b.yaml's shape (bf16, random weights, 2 GiB
safetensors shards, no megastack.json: like a download) with megastack's HF writer, then measures:
- every pair of formats (hf, torch_dist, legacy TP1) and legacy TP1 -> TP2 (the reshard), on 1 and 2
  ranks (--pairs picks some); the torch_dist and legacy inputs are made once from the HF source (timed
  too, one run);
- wall time of the whole command (process start, imports, conversion, manifest, fsync, publish) and of
  the conversion inside the process, median of --repeats;
- the I/O bound in the same run, after each repeat: read every input byte once and write the output's
  byte count once with fsync, same filesystem, no compute (bench/iobound.py);
- peak RSS of each rank (VmHWM, which counts the file-backed pages of mmap'd legacy inputs) and the peak
  of its anonymous memory (RssAnon sampled every 20 ms), i.e. what the conversion itself allocates.
With --cold the source is evicted from the page cache before each run and each bound (a checkpoint written
long ago, or by another node: both read it from the disk); without it each runs with whatever the page cache
holds (the bound, run after the conversion, usually finds the source cached).
Each source is read once from the disk right before its first timed run (iobound.settle: here the first run
after a source was written was the slowest of every repeated cold run, and the bound, run after it, never paid
that; read at the start instead, the torch_dist and legacy inputs were slow again in their first rows, after
the HF rows' ~100 GiB of reads and writes).

Usage: python bench/convert.py [--shape 1.1b|7b] [--workdir DIR] [--repeats 3] [--cold] [--json OUT.json]
       (disk: ~11 GB at 1.1B, ~60 GB at 7B)
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from iobound import dir_bytes, evict, io_bound, settle  # noqa: E402  (bench/, the script's own directory)
from sources import write_hf_download  # noqa: E402

from megastack.ckpt.manifest import resolve_iteration_dir  # noqa: E402
from megastack.config import load_model_config  # noqa: E402

RANK_SCRIPT = """
import atexit, sys, threading, time
import megastack.cli as cli  # the `megastack` command, exit included; torch comes with its handler, as there

def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

# VmHWM (peak RSS) starts afresh at exec; ru_maxrss would carry over the parent's peak.
peak_anon = [status("RssAnon")]
stop = threading.Event()
def sample():
    while not stop.wait(0.02):
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
threading.Thread(target=sample, daemon=True).start()
after_imports = {}
resolve = cli.resolve_handler
def resolve_measured(command):  # in-process time and the baselines start once the handler (torch) is imported
    handler = resolve(command)
    after_imports.update(anon=status("RssAnon"), hwm=status("VmHWM"), start=time.monotonic())
    return handler
cli.resolve_handler = resolve_measured

@atexit.register  # console_main leaves with os._exit after the atexit handlers (cli._exit_now)
def report():
    elapsed = time.monotonic() - after_imports["start"]
    stop.set()
    print("BENCH", elapsed, status("VmHWM"), after_imports["hwm"], max(peak_anon[0], status("RssAnon")),
          after_imports["anon"], flush=True)

sys.exit(cli.console_main())
"""


def write_source(path: Path, model: str = "llama-1.1b") -> tuple[int, int]:
    """The ``model``-shape HF checkpoint (bf16, N(0, 0.02) matrices, unit norms); (bytes, parameters)."""
    cfg = dataclasses.replace(load_model_config(model), name=f"bench-{model}")
    write_hf_download(path, cfg)
    return dir_bytes(path), cfg.total_parameters()


def convert_once(args: list[str], ranks: int) -> dict:
    """One `megastack convert` on ``ranks`` local processes: wall, in-process seconds, peaks (max rank)."""
    from megastack.dist import launch_local

    argv = [sys.executable, "-c", RANK_SCRIPT, "convert", *args]
    start = time.monotonic()
    if ranks == 1:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600, cwd=REPO)
        outputs, ok = [proc.stdout + proc.stderr], proc.returncode == 0
    else:
        result = launch_local(argv, ranks, timeout=3600, cwd=REPO)
        outputs, ok = result.outputs, result.ok
    wall = time.monotonic() - start
    if not ok:
        raise SystemExit("convert failed:\n" + "\n".join(outputs)[-4000:])
    rows = [line.split()[1:] for out in outputs for line in out.splitlines() if line.startswith("BENCH")]
    return {
        "wall_s": wall,
        "inner_s": max(float(r[0]) for r in rows),
        "peak_rss": max(int(r[1]) for r in rows),
        "rss_after_imports": max(int(r[2]) for r in rows),
        "peak_anon": max(int(r[3]) for r in rows),
        "anon_after_imports": max(int(r[4]) for r in rows),
    }


# The output arguments of each format (legacy at TP1: the format pair alone; the reshard is its own row).
TO = {"hf": ["--to", "hf"], "torch_dist": ["--to", "torch_dist"], "legacy": ["--to", "legacy", "--tp", "1"]}
# label -> (input format, output arguments): every pair of formats, and legacy's reshard.
PAIRS = {
    f"{a}->{b}": (a, TO[b]) for a in ("hf", "torch_dist", "legacy") for b in ("hf", "torch_dist", "legacy") if a != b
} | {"legacy TP1->TP2": ("legacy", ["--to", "legacy", "--tp", "2"])}


def measure(label: str, src: Path, to_args: list[str], ranks: int, repeats: int, work: Path, cold: bool) -> dict:
    runs, bounds = [], []
    out_bytes = 0
    for i in range(repeats):
        dst = work / f"out_{label}_{ranks}_{i}"
        if cold:
            evict(src)
        runs.append(convert_once([str(src), str(dst), *to_args], ranks))
        out_bytes = dir_bytes(dst)
        shutil.rmtree(dst)
        bounds.append(io_bound(resolve_iteration_dir(src), out_bytes, work / "io_bound.bin", cold))
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "inner_s")}
    bound = statistics.median(b["bound_s"] for b in bounds)
    row = {
        "label": label,
        "ranks": ranks,
        "input_bytes": dir_bytes(resolve_iteration_dir(src)),
        "output_bytes": out_bytes,
        "runs": runs,
        "io_bound_s": [b["bound_s"] for b in bounds],
        "io_bound_runs": bounds,
        "median_wall_s": med["wall_s"],
        "median_inner_s": med["inner_s"],
        "median_io_bound_s": bound,
        "peak_rss_bytes": max(r["peak_rss"] for r in runs),
        "peak_anon_bytes": max(r["peak_anon"] for r in runs),
        "anon_after_imports_bytes": max(r["anon_after_imports"] for r in runs),
    }
    gib, mib = 1 << 30, 1 << 20
    print(
        f"{label} ranks={ranks}: wall {row['median_wall_s']:.1f}s (in-process {row['median_inner_s']:.1f}s), "
        f"I/O bound {row['median_io_bound_s']:.1f}s -> {row['median_wall_s'] / row['median_io_bound_s']:.2f}x; "
        f"in {row['input_bytes'] / gib:.2f} GiB, out {out_bytes / gib:.2f} GiB; peak RSS "
        f"{row['peak_rss_bytes'] / mib:.0f} MiB, peak anon {row['peak_anon_bytes'] / mib:.0f} MiB "
        f"(after imports {row['anon_after_imports_bytes'] / mib:.0f} MiB)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["1.1b", "7b"], default="1.1b", help="llama-1.1b or llama-7b (default 1.1b)")
    parser.add_argument("--workdir", help="where to write (default: a temp dir; needs ~11 GB, ~60 GB at 7B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts to measure")
    parser.add_argument("--pairs", help=f"comma-separated conversions to measure (default all: {', '.join(PAIRS)})")
    parser.add_argument(
        "--no-source-check",
        action="store_true",
        help="pass --no-source-check (megastack-written sources are not re-hashed against their manifest)",
    )
    parser.add_argument(
        "--cold", action="store_true", help="evict the source from the page cache before each run and each bound"
    )
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    extra = ["--no-source-check"] if args.no_source_check else []
    wanted = args.pairs.split(",") if args.pairs else list(PAIRS)
    unknown = sorted(set(wanted) - set(PAIRS))
    if unknown:
        raise SystemExit(f"--pairs: unknown {unknown}; choose from {', '.join(PAIRS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megastack-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = 11 if args.shape == "1.1b" else 60
    if free < need << 30:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, the benchmark needs ~{need} GiB; pass --workdir")
    hf = work / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    start = time.monotonic()
    src_bytes, params = write_source(hf, f"llama-{args.shape}")
    print(
        f"source: {params / 1e9:.3f}B parameters, {src_bytes / 2**30:.2f} GiB bf16 HF safetensors "
        f"(written in {time.monotonic() - start:.1f}s)",
        flush=True,
    )
    results: dict = {
        "shape": args.shape,
        "parameters": params,
        "source_bytes": src_bytes,
        "cpus": os.cpu_count(),
        "source_check": not args.no_source_check,
        "cold": args.cold,
        "rows": [],
    }
    ranks = [int(r) for r in args.ranks.split(",")]
    # The other formats' inputs, converted once from the HF source (timed, one run each, 1 rank).
    inputs = {"hf": hf}
    for fmt in sorted({PAIRS[p][0] for p in wanted} - {"hf"}):
        inputs[fmt] = work / f"{fmt}_input"
        if inputs[fmt].exists():
            shutil.rmtree(inputs[fmt])
        setup = convert_once([str(hf), str(inputs[fmt]), *TO[fmt]], 1)
        print(
            f"hf->{fmt} ranks=1 (one run, an input below): wall {setup['wall_s']:.1f}s, peak RSS "
            f"{setup['peak_rss'] / 2**20:.0f} MiB, peak anon {setup['peak_anon'] / 2**20:.0f} MiB",
            flush=True,
        )
        results[f"setup_hf_to_{fmt}"] = setup
    settled = set()
    for label in wanted:
        src_format, to_args = PAIRS[label]
        if src_format not in settled:  # right before its first row: read earlier, later traffic evicted it again
            settle(inputs[src_format])
            settled.add(src_format)
        for n in ranks:
            row = measure(label, inputs[src_format], to_args + extra, n, args.repeats, work, args.cold)
            results["rows"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
