"""Scale projection: what growing a 7B or 70B checkpoint costs per rank, from `megastack grow --dry-run`.

No weights are needed: the bench writes torch_dist checkpoints that hold only their metadata (the DCP
`.metadata` with the chunk layout a Megatron TP x PP save leaves, no `.distcp` data), runs
`megastack grow SRC DST --factor 4 --dry-run --json --ranks N` on them as a user would, and turns each
rank's planned bytes into time under stated assumptions:

- every rank reads its planned source bytes and writes its planned target bytes once;
- ranks share their node's filesystem bandwidth (--node-gbps, read + write together, default 2 GB/s)
  and --ranks-per-node of them sit on a node; the parallel filesystem scales with nodes;
- growth is I/O bound (stacking copies bytes; bench/grow.py measures the real ratio to the I/O bound on
  this machine), so time = max over nodes of (its ranks' read + write bytes) / node bandwidth;
- memory = the planner's predicted peak per rank (a few output chunks in flight), not measured.

Usage: python bench/projection.py [--ranks 1,8,64,256] [--node-gbps 2] [--ranks-per-node 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megastack.config import ModelConfig, load_model_config, to_dict  # noqa: E402
from megastack.errors import UserError  # noqa: E402

GIB = 1 << 30

# (name, small model, growth factor, TP and PP of the saved small checkpoint's chunks)
LLAMA_70B = ModelConfig(
    num_layers=80,
    hidden_size=8192,
    num_attention_heads=64,
    num_query_groups=8,
    ffn_hidden_size=28672,
    vocab_size=32000,
    seq_length=4096,
    dtype="bf16",
    name="llama-70b",
)


def models() -> list[tuple[str, ModelConfig, int, int, int]]:
    return [
        ("7B", load_model_config("llama-7b-small"), 4, 4, 1),
        ("70B", replace(LLAMA_70B, num_layers=20, name="llama-70b-small"), 4, 8, 4),
    ]


def write_metadata_only(root: Path, cfg: ModelConfig, tp: int, pp: int) -> None:
    """A torch_dist checkpoint of ``cfg`` with .metadata only, chunked as a TP x PP megatron-core save."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from megastack import layout
    from megastack.ckpt.torch_dist import METADATA_JSON, dcp_key

    layers = cfg.num_layers
    it = root / "iter_0000001"
    it.mkdir(parents=True)
    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for name in layout.logical_names(cfg):
        key, layer = dcp_key(name)
        kind = layout.split_name(name)[1]
        shape = layout.logical_shape(cfg, name)
        stage = 0 if layer is None else layer // (layers // pp)
        md = state.setdefault(
            key,
            TensorStorageMetadata(
                TensorProperties(dtype=torch.bfloat16), torch.Size(shape if layer is None else (layers, *shape)), []
            ),
        )
        for r in range(tp):
            replicated = layout.TP_RULE[kind] == "replicated"
            if replicated and r:
                continue
            pieces = [layout.Piece(0, 0, shape[0])] if replicated else layout.tp_pieces(kind, shape, r, tp)
            for p in pieces:
                offsets, sizes = [0] * len(shape), list(shape)
                offsets[p.dim], sizes[p.dim] = p.start, p.length
                if layer is not None:
                    offsets, sizes = [layer, *offsets], [1, *sizes]
                md.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                nbytes = torch.Size(sizes).numel() * 2
                storage[MetadataIndex(key, offsets)] = _StorageInfo(f"__{stage * tp + r}_0.distcp", 0, nbytes)
    (it / ".metadata").write_bytes(pickle.dumps(Metadata(state, storage_data=storage)))
    (it / "metadata.json").write_text(json.dumps(METADATA_JSON))
    (it / "megastack.json").write_text(json.dumps({"format": "torch_dist", "model": to_dict(cfg)}))
    (root / "latest_checkpointed_iteration.txt").write_text("1\n")


def dry_run(src: Path, factor: int, ranks: int) -> tuple[dict[str, Any], float]:
    """`megastack grow --dry-run --json` as a subprocess; (its plan, its wall seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megastack",
            "grow",
            str(src),
            str(src.parent / "dst"),
            "--factor",
            str(factor),
            "--dry-run",
            "--json",
            "--ranks",
            str(ranks),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise UserError(f"megastack grow --dry-run failed: {(proc.stderr.strip() or proc.stdout).splitlines()[-1]}")
    return json.loads(proc.stdout), time.monotonic() - start


def project(plan: dict[str, Any], node_bytes_per_s: float, per_node: int) -> dict[str, Any]:
    rows = plan["ranks"]
    nodes = [rows[i : i + per_node] for i in range(0, len(rows), per_node)]
    node_bytes = [sum(r["read_bytes"] + r["write_bytes"] for r in node) for node in nodes]
    total_read = sum(r["read_bytes"] for r in rows)
    total_write = sum(r["write_bytes"] for r in rows)
    return {
        "ranks": len(rows),
        "nodes": len(nodes),
        "target_parameters": plan["target_parameters"],
        "total_read_bytes": total_read,
        "total_write_bytes": total_write,
        "max_rank_read_bytes": max(r["read_bytes"] for r in rows),
        "max_rank_write_bytes": max(r["write_bytes"] for r in rows),
        "min_rank_write_bytes": min(r["write_bytes"] for r in rows),
        "max_rank_peak_bytes": max(r["predicted_peak_bytes"] for r in rows),
        "max_rank_read_files": max(r["read_files"] for r in rows),
        "projected_seconds": max(node_bytes) / node_bytes_per_s,
        "balanced_seconds": (total_read + total_write) / len(nodes) / node_bytes_per_s,
    }


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,8,64,256", help="rank counts to plan for (comma-separated)")
    parser.add_argument("--node-gbps", type=float, default=2.0, help="filesystem GB/s per node, read + write")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    try:
        ranks = parse_ints(args.ranks, "--ranks")
        if not args.node_gbps > 0 or args.ranks_per_node < 1:
            raise UserError("--node-gbps and --ranks-per-node must be positive")
        results: dict[str, Any] = {
            "assumptions": {
                "node_bytes_per_s": args.node_gbps * 1e9,
                "ranks_per_node": args.ranks_per_node,
                "model": "time = max over nodes of (read + write bytes of its ranks) / node bandwidth; growth "
                "I/O bound; the filesystem scales with nodes; memory = planner's predicted peak",
            },
            "models": [],
        }
        with tempfile.TemporaryDirectory(prefix="megastack-projection-") as tmp:
            for label, small, factor, tp, pp in models():
                src = Path(tmp) / label / "src"
                write_metadata_only(src, small, tp, pp)
                entry: dict[str, Any] = {
                    "label": label,
                    "source": small.name,
                    "source_layers": small.num_layers,
                    "factor": factor,
                    "source_chunks": f"TP{tp} PP{pp}",
                    "source_parameters": small.total_parameters(),
                    "plans": [],
                }
                for n in ranks:
                    plan, wall = dry_run(src, factor, n)
                    entry["target_layers"] = plan["target_layers"]
                    row = project(plan, args.node_gbps * 1e9, args.ranks_per_node) | {"dry_run_wall_s": wall}
                    entry["plans"].append(row)
                    print(
                        f"{label} {small.num_layers} -> {plan['target_layers']} layers, {n} ranks: "
                        f"{row['max_rank_write_bytes'] / GIB:.2f} GiB max write/rank, "
                        f"{row['max_rank_peak_bytes'] / GIB:.2f} GiB peak/rank, "
                        f"{row['projected_seconds']:.0f} s projected (dry run {wall:.1f} s)",
                        flush=True,
                    )
                results["models"].append(entry)
    except UserError as exc:
        print(f"projection: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
