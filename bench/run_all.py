"""Run megastack's benchmarks and write BENCHMARKS.md from what they measured.

Every bench runs as its own subprocess with its own JSON output; run_all stores each result with the
command that produced it, the machine (CPU model, cores, RAM, disk), the date, the commit and the load
average around it under bench/results/<name>.json, then rewrites BENCHMARKS.md: each bench's figures go
between `<!-- run_all: NAME -->` markers inside its section (a section is appended if missing);
everything outside the markers (the prose other developers wrote) is kept as it is. `--render-only`
rebuilds BENCHMARKS.md from the stored JSON without running anything.

    python bench/run_all.py                                 # everything (hours on 2 cores; ~25 GB disk)
    python bench/run_all.py --only projection,mergekit      # some of them
    python bench/run_all.py --quick                         # minutes: smoke sizes, 1 repeat; writes a temp
                                                            # directory, never the repository's BENCHMARKS.md
    python bench/run_all.py --render-only

Benches: grow (bench/grow.py), convert (bench/convert.py), train (bench/train.py), speedup
(bench/speedup.py --preset cpu), projection (bench/projection.py), mergekit (bench/mergekit_peer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MIB, GIB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class Bench:
    script: str
    title: str  # the BENCHMARKS.md section it belongs in
    args: Callable[[argparse.Namespace], list[str]]  # its arguments (without --json)
    json_flag: bool = True  # False: the bench prints its JSON on stdout


def _repeats(a: argparse.Namespace) -> list[str]:
    return ["--repeats", str(1 if a.quick else a.repeats)]


BENCHES: dict[str, Bench] = {
    "grow": Bench("bench/grow.py", "Growth", _repeats),
    "convert": Bench("bench/convert.py", "Conversion", lambda a: _repeats(a) + (["--ranks", "1"] if a.quick else [])),
    "train": Bench(
        "bench/train.py",
        "Training",
        lambda a: ["--repeats", "1", "--steps", "20"] if a.quick else ["--repeats", str(a.repeats)],
        json_flag=False,
    ),
    "speedup": Bench(
        "bench/speedup.py", "Speedup", lambda a: ["--preset", "smoke" if a.quick else "cpu", "--out", a.speedup_out]
    ),
    "projection": Bench("bench/projection.py", "Scale projection", lambda a: ["--ranks", "1,8"] if a.quick else []),
    "mergekit": Bench(
        "bench/mergekit_peer.py",
        "HF stacking vs mergekit",
        lambda a: (
            _repeats(a)
            + (["--mergekit", a.mergekit] if a.mergekit else [])
            + (["--model", "tiny", "--layers", "2"] if a.quick else [])
        ),
    ),
}


# ----------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    disk = shutil.disk_usage(tempfile.gettempdir())
    fs = None
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        best = max((m for m in mounts if tempfile.gettempdir().startswith(m[1])), key=lambda m: len(m[1]))
        fs = f"{best[0]} ({best[2]})"
    except (OSError, ValueError):
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "disk_bytes": disk.total,
        "disk_free_bytes": disk.free,
        "filesystem": fs,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def describe_machine(m: dict[str, Any]) -> str:
    ram = f"{m['ram_bytes'] / GIB:.0f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (
        f"{m['cpu']}, {m['cores']} cores, {ram}, disk {m['disk_bytes'] / GIB:.0f} GiB on {m.get('filesystem')}"
        f"{gpu}; Python {m['python']}, torch {m['torch']}"
    )


def commit() -> str:
    """HEAD, and whether the code measured differs from it (results and this document do not count: benches
    write them while they run)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!BENCHMARKS.md"],
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


# ----------------------------------------------------------------------------- running


def run_bench(name: str, bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """One bench as a subprocess; the stored record (result or the error's last line)."""
    script = REPO / bench.script
    record: dict[str, Any] = {
        "bench": name,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": commit(),
        "machine": machine(),
        "load_before": os.getloadavg(),
    }
    if not script.exists():
        return record | {"error": f"{bench.script} does not exist yet", "command": None}
    out_json = args.results / f"{name}.out.json"
    argv = [sys.executable, bench.script, *bench.args(args)]
    shown = " ".join(["python", *argv[1:]])
    if bench.json_flag:
        argv += ["--json", str(out_json)]
    print(f"run_all: {shown}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    record |= {
        "command": shown,
        "wall_s": round(time.monotonic() - start, 1),
        "load_after": os.getloadavg(),
        "returncode": proc.returncode,
    }
    record["log_tail"] = (proc.stdout + proc.stderr).splitlines()[-40:]
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        return record | {"error": lines[-1]}
    try:
        if bench.json_flag:
            record["result"] = json.loads(out_json.read_text())
            out_json.unlink()
        else:
            text = proc.stdout
            record["result"] = json.loads(text[text.index("\n{") + 1 if not text.startswith("{") else 0 :])
    except (ValueError, OSError) as exc:
        record["error"] = f"no JSON result ({exc})"
    if name == "speedup" and "result" in record:
        src = REPO / args.speedup_out / "speedup.png"
        if src.is_file():
            shutil.copyfile(src, args.results / "speedup.png")
    return record


# ----------------------------------------------------------------------------- rendering


def header(record: dict[str, Any]) -> list[str]:
    load = record.get("load_before"), record.get("load_after")
    loads = (
        ""
        if not all(load)
        else (
            f"; load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load[0])} before, "
            f"{'/'.join(f'{x:.1f}' for x in load[1])} after"
        )
    )
    return [
        f"Command: `{record.get('command')}` (run by `python bench/run_all.py`), {record['date']}, commit "
        f"{record['commit']}, {record.get('wall_s', 0) / 60:.1f} min.",
        f"Machine: {describe_machine(record['machine'])}{loads}.",
        "",
    ]


def _bound_text(rows: list[dict[str, Any]]) -> str:
    if any("io_bound_runs" in x for x in rows):
        return (
            "Bound: read every input byte once + write the output's bytes once with fsync, same disk, after each "
            "run (bench/iobound.py): written plainly, with write-behind (writeback started every 64 MiB) and, "
            "where the file system takes it, with O_DIRECT (as megastack's writers write there); the fastest "
            "counts; the plain write's time in brackets."
        )
    return "Bound: read every input byte once + write the output once (fsync), same disk, measured between repeats."


def _bound(x: dict[str, Any]) -> str:
    """The median bound, and the median plain-write time where the run recorded both."""
    plain = [b["plain_s"] for b in x.get("io_bound_runs", []) if "plain_s" in b]
    return f"{x['median_io_bound_s']:.1f} s" + (f" ({statistics.median(plain):.1f} s)" if plain else "")


def render_grow(r: dict[str, Any]) -> list[str]:
    lines = [
        f"Source: 6-layer 1.1B-shape torch_dist, {r['source_bytes'] / GIB:.2f} GiB bf16 -> 24 layers "
        f"({r['output_bytes'] / GIB:.2f} GiB); largest tensor {r['largest_tensor_bytes'] / MIB:.0f} MiB. "
        f"{_bound_text(list(r['runs'].values()))}",
        "",
        "| ranks | grow wall (median) | in-process | I/O bound (median) | wall / bound | peak RSS | above imports "
        "| runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ranks, x in r["runs"].items():
        inner = f"{x['median_in_process_s']:.1f} s" if "median_in_process_s" in x else "-"
        lines.append(
            f"| {ranks} | {x['median_wall_s']:.1f} s | {inner} | {_bound(x)} | "
            f"{x['median_wall_s'] / x['median_io_bound_s']:.1f}x | {x['peak_rss_bytes'] / MIB:.0f} MiB | "
            f"{x['peak_rss_above_imports_bytes'] / MIB:.0f} MiB | "
            f"{', '.join(f'{w:.1f}' for w in x['wall_s'])} s |"
        )
    return lines


def render_convert(r: dict[str, Any]) -> list[str]:
    lines = [
        f"Source: {r['parameters'] / 1e9:.3f}B parameters, {r['source_bytes'] / GIB:.2f} GiB bf16 HF; the "
        f"torch_dist and legacy TP1 inputs converted from it once. {_bound_text(r['rows'])}",
        "",
        "| conversion | ranks | wall (median) | in-process | I/O bound (median) | wall / bound | peak RSS | "
        "peak anon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['label']} | {x['ranks']} | {x['median_wall_s']:.1f} s | {x['median_inner_s']:.1f} s | "
            f"{_bound(x)} | {x['median_wall_s'] / x['median_io_bound_s']:.1f}x | "
            f"{x['peak_rss_bytes'] / MIB:.0f} MiB | {x['peak_anon_bytes'] / MIB:.0f} MiB |"
        )
    return lines


def render_generic(r: dict[str, Any]) -> list[str]:
    lines = ["| quantity | value |", "|---|---|"]
    for key, value in r.items():
        if not isinstance(value, dict):
            lines.append(f"| {key} | {value} |")
    return lines


def render_speedup(r: dict[str, Any]) -> list[str]:
    sys.path.insert(0, str(REPO / "bench"))
    from speedup import report_markdown

    body = report_markdown(r).splitlines()[2:]  # without its own title
    return body + ["", "![validation loss vs FLOPs](bench/results/speedup.png)"]


def render_projection(r: dict[str, Any]) -> list[str]:
    a = r["assumptions"]
    lines = [
        f"Assumptions: {a['node_bytes_per_s'] / 1e9:g} GB/s of filesystem bandwidth per node (read + write "
        f"together), {a['ranks_per_node']} ranks per node; {a['model']}. Source checkpoints hold metadata only "
        "(no data is read); the byte counts are megastack's own plan (`megastack grow SRC DST --factor 4 "
        "--dry-run --json --ranks N`), the times are arithmetic on them, not measurements. Reads are counted as "
        "planned: every target copy of a layer reads its source bytes (about factor x the source in total; "
        "repeats of a chunk on one rank may come from the page cache, so this is an upper bound).",
        "",
    ]
    for m in r["models"]:
        lines += [
            f"**{m['label']}**: `{m['source']}` ({m['source_layers']} layers, "
            f"{m['source_parameters'] / 1e9:.2f}B parameters, chunked like a {m['source_chunks']} save) -> "
            f"{m['target_layers']} layers, {m['plans'][0]['target_parameters'] / 1e9:.2f}B parameters, bf16.",
            "",
            "| ranks | nodes | read total | write total | max read / rank | max write / rank | "
            "predicted peak memory / rank | projected time | dry run took |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in m["plans"]:
            lines.append(
                f"| {p['ranks']} | {p['nodes']} | {p['total_read_bytes'] / GIB:.1f} GiB | "
                f"{p['total_write_bytes'] / GIB:.1f} GiB | {p['max_rank_read_bytes'] / GIB:.2f} GiB | "
                f"{p['max_rank_write_bytes'] / GIB:.2f} GiB | {p['max_rank_peak_bytes'] / MIB:.0f} MiB | "
                f"{_duration(p['projected_seconds'])} | {p['dry_run_wall_s']:.0f} s |"
            )
        lines.append("")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render_mergekit(r: dict[str, Any]) -> list[str]:
    mk, steps, bound = r["mergekit"], r["steps"], r["median_io_bound_s"]
    src = r["source"]
    lines = [
        f"Model: `{r['model']}` shape cut to {src['layers']} layers ({src['parameters'] / 1e9:.3f}B parameters, "
        f"{src['bytes'] / GIB:.2f} GiB bf16 HF, random weights), stacked x{r['factor']} into "
        f"{r['target_layers']} layers (G_stack order), {r['repeats']} repeats, medians; each command a separate "
        "process (Python start and imports included), peak RSS from /usr/bin/time.",
        "",
    ]
    if not mk["available"]:
        lines += [f"mergekit: not measured: {mk['error']}", ""]
    else:
        same = {True: "bit-identical", False: "DIFFERENT", None: "not compared"}[r["identical_outputs"]]
        lines += [
            f"mergekit {mk.get('version')} (passthrough, `--no-copy-tokenizer --no-write-model-card`, defaults "
            f"otherwise), installed with `--no-deps` beside megastack's torch. Outputs: {same} "
            f"({r['tensors_compared']} tensors compared).",
            "",
        ]
    lines += ["| what | input -> output | wall (median) | wall / I/O bound | peak RSS |", "|---|---|---|---|---|"]
    names = {
        "mergekit": ("mergekit-yaml passthrough", "HF -> HF"),
        "megastack_grow_hf": ("megastack grow --factor 4 (1 rank, one command)", "HF -> HF"),
        "megastack_grow_hf_2_ranks": ("megastack grow --factor 4 (2 ranks, one command)", "HF -> HF"),
        "megastack_hf_to_hf": ("megastack convert + grow + convert (sum)", "HF -> HF"),
        "convert_to_torch_dist": ("  megastack convert --to torch_dist", "HF -> torch_dist"),
        "grow": ("  megastack grow --factor 4 (1 rank)", "torch_dist -> torch_dist"),
        "convert_to_hf": ("  megastack convert --to hf", "torch_dist -> HF"),
        "grow_2_ranks": ("megastack grow --factor 4 (2 ranks)", "torch_dist -> torch_dist"),
    }
    for key, (label, io) in names.items():
        if key in steps:
            s = steps[key]
            hf_to_hf = ("mergekit", "megastack_grow_hf", "megastack_grow_hf_2_ranks", "megastack_hf_to_hf")
            ratio = f"{s['median_wall_s'] / bound:.1f}x" if key in hf_to_hf else "-"
            lines.append(
                f"| {label} | {io} | {s['median_wall_s']:.1f} s | {ratio} | {s['peak_rss_bytes'] / MIB:.0f} MiB |"
            )
    if "direct_equals_three_commands" in r:
        lines += [
            "",
            "One-command HF grow output equals the convert + grow + convert output: "
            f"{r['direct_equals_three_commands']}; its 2-rank output equals its 1-rank output: "
            f"{r['direct_2_ranks_equals_1']} (tensors compared byte for byte; mergekit's compared with the "
            "one-command output).",
        ]
    lines += [
        "",
        f"I/O bound of the HF -> HF job (read the source once, write {r['megastack_output_bytes'] / GIB:.2f} "
        f"GiB once with fsync, bench/iobound.py: the fastest of a plain write, one with write-behind and one "
        "with O_DIRECT): "
        f"{_bound(r)} median (plain write in brackets).",
    ]
    return lines


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "grow": render_grow,
    "convert": render_convert,
    "train": render_generic,
    "speedup": render_speedup,
    "projection": render_projection,
    "mergekit": render_mergekit,
}


def render_block(name: str, record: dict[str, Any] | None) -> str:
    if record is None:
        lines = [f"Not run yet: `python bench/run_all.py --only {name}`."]
    else:
        lines = header(record)
        if "error" in record:
            lines.append(f"Failed: {record['error']}")
        else:
            lines += RENDERERS[name](record["result"])
    return "\n".join(lines).rstrip() + "\n"


def update_document(text: str, blocks: dict[str, tuple[str, str]]) -> str:
    """Replace each marked block (or add it at the end of its section, or as a new section); keep the rest."""
    for name, (title, body) in blocks.items():
        begin, end = f"<!-- run_all: {name} -->", f"<!-- /run_all: {name} -->"
        block = f"{begin}\n{body}{end}"
        if begin in text and end in text:
            text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
            continue
        match = re.search(rf"^## {re.escape(title)}\s*$", text, flags=re.M)
        if match:
            following = re.search(r"^## ", text[match.end() :], flags=re.M)
            at = match.end() + following.start() if following else len(text)
            text = text[:at].rstrip("\n") + "\n\n" + block + "\n\n" + text[at:]
        else:
            text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    return text.rstrip("\n") + "\n"


def load_record(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated, from {', '.join(BENCHES)} (default: all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke sizes, 1 repeat; results and a BENCHMARKS.md in a temporary directory (never the repository's)",
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from stored results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit", help="mergekit-yaml executable for the peer bench (default: on PATH)")
    parser.add_argument(
        "--speedup-out",
        help="bench/speedup.py's run directory (default runs/speedup-cpu, "
        "resumable: finished runs there are reused; --quick: a temporary one)",
    )
    parser.add_argument("--results", help="where results are stored (default: bench/results)")
    parser.add_argument("--output", help="the document to write (default: BENCHMARKS.md)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown or args.repeats < 1:
        print(
            f"run_all: error: {'--repeats must be positive' if not unknown else 'unknown bench ' + unknown[0]}"
            f" (benches: {', '.join(BENCHES)})",
            file=sys.stderr,
        )
        return 2
    quick_dir = Path(tempfile.mkdtemp(prefix="megastack-run-all-quick-")) if args.quick else None
    args.results = Path(args.results) if args.results else (quick_dir or RESULTS)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.speedup_out:
        args.speedup_out = str(Path(args.speedup_out).absolute())
    else:  # the subprocess runs in the repository root
        args.speedup_out = str(quick_dir / "speedup-smoke") if quick_dir else "runs/speedup-cpu"
    output = (
        Path(args.output) if args.output else (args.results / "BENCHMARKS.md" if quick_dir else REPO / "BENCHMARKS.md")
    )
    if not args.render_only:
        for name in names:
            record = run_bench(name, BENCHES[name], args)
            (args.results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"run_all: {name}: {'failed: ' + record['error'] if 'error' in record else 'done'}", flush=True)
    base = output.read_text() if output.is_file() else (REPO / "BENCHMARKS.md").read_text()
    blocks = {name: (BENCHES[name].title, render_block(name, load_record(args.results, name))) for name in BENCHES}
    output.write_text(update_document(base, blocks))
    print(f"run_all: wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
