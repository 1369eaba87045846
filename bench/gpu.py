"""The GPU check: megastack's trainer on one GPU against a plain PyTorch loop, and a grown checkpoint's
logits on the GPU against the CPU reference. One prepared script, sized for under 8 minutes on one H200.

1. ``megastack train`` (megastack.train.loop.train: megatron-core GPTModel, Transformer Engine's layer spec
   when ``transformer_engine`` imports and megatron's local spec otherwise, DeepSpeed ZeRO-1, bf16) of the
   410M shape on one GPU: tokens/s and MFU from its own log (first window dropped), peak GPU memory.
2. The same model as a plain PyTorch loop: ReferenceLlama with SDPA attention, fp32 weights under bf16
   autocast, fused AdamW, torch.compile when it works (else eager, and why), the same batch shape.
3. Growth: a random 1.1B-small (6 layers) checkpoint, grown x4 by G_stack with ``megastack.growth.api.grow``;
   the grown checkpoint loaded by megatron-core's own ``dist_checkpointing.load`` into a GPTModel on the GPU
   (fp32, TF32 off); its logits against the plain-PyTorch reference built on the CPU by stacking the
   source's layers by hand.

    python bench/gpu.py --out runs/gpu            # on a GPU machine; writes OUT/gpu.json, prints a table
    python bench/gpu.py --cpu --out /tmp/gpu      # the smoke the test suite runs: tiny shapes on the CPU

Nothing is installed from the internet. On a machine without megatron-core, deepspeed or sentencepiece,
carry them as wheels (the device tool's README: ``pip download --no-deps --only-binary=:all:
--python-version 3.12 ... -d .whl megatron-core==X deepspeed==Y``; deepspeed ships an sdist only: build its
wheel here with ``pip wheel --no-deps deepspeed==Y -w .whl``) and install them with ``pip install --no-index
--target /tmp/site .whl/*.whl`` first; the script says which import is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Sizes:
    """One preset's shapes and lengths."""

    train_model: str
    micro_batch: int
    steps: int
    window: int
    grow_source: str
    grow_factor: int
    grow_tokens: int  # sequence length of the logits check
    precision: str


GPU = Sizes("llama-410m", 8, 30, 5, "llama-1.1b-small", 4, 256, "bf16")
CPU = Sizes("tiny", 4, 6, 2, "tiny-small", 4, 32, "fp32")  # the smoke: every step of the check, in seconds


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    from megastack.flops import peak_flops
    from megastack.model.build import Machine

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    machine = Machine.detect()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": version("megatron-core"),
        "deepspeed": version("deepspeed"),
        "transformer_engine": version("transformer-engine") or version("transformer_engine"),
        "layer_spec": "transformer_engine" if machine.transformer_engine and machine.cuda else "local",
        "peak_bf16_flops": peak_flops(None),
    }


# ----------------------------------------------------------------------------- 1. megastack train


def megastack_train(sizes: Sizes, out: Path) -> dict[str, Any]:
    import torch

    from megastack.config import from_dict
    from megastack.train.config import TrainConfig
    from megastack.train.loop import LOG_FILE, log_records, train

    config = from_dict(
        TrainConfig,
        {
            "model": sizes.train_model,
            "out_dir": str(out),
            "resume": False,
            "parallel": {
                "micro_batch_size": sizes.micro_batch,
                "global_batch_size": sizes.micro_batch,
                "precision": sizes.precision,
            },
            "optimizer": {"lr": 3e-4, "warmup_iters": 5},
            "schedule": {
                "train_iters": sizes.steps,
                "eval_interval": 0,
                "eval_iters": 0,
                "save_interval": 0,
                "log_interval": sizes.window,
            },
            "data": {"cache_dir": str(out.parent / "data_cache")},
            "logging": {"tensorboard": False, "progress": "off"},
        },
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    summary = train(config, verbose=False)
    records = [r for _, r in log_records(out / LOG_FILE) if r.get("type") == "train"][1:]  # warm-up dropped
    return {
        "model": sizes.train_model,
        "precision": sizes.precision,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "mfu": statistics.median(r["mfu"] for r in records) if all(r.get("mfu") for r in records) else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "final_loss": summary.final_train_loss,
        "wall_seconds": round(time.monotonic() - start, 1),
    }


# ----------------------------------------------------------------------------- 2. the plain PyTorch loop


def sdpa_model(cfg: Any) -> Any:
    """ReferenceLlama with its attention through torch's scaled_dot_product_attention (flash/cuDNN kernels
    on GPU), the way a plain PyTorch trainer would write it."""
    import torch.nn.functional as F

    from megastack.model import reference

    class SdpaAttention(reference.Attention):
        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
            q, k = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.groups)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    model = reference.ReferenceLlama(cfg).init_weights(seed=0)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is reference.Attention:
                sdpa = SdpaAttention(cfg)
                sdpa.load_state_dict(child.state_dict())
                setattr(module, name, sdpa)
    return model


def plain_loop(sizes: Sizes, compile_model: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from megastack.config import load_model_config
    from megastack.flops import flops_per_token, peak_flops

    cfg = load_model_config(sizes.train_model)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = sdpa_model(replace(cfg, dtype="fp32")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda)
    step_model, compiled, why = model, False, None
    if compile_model:
        try:
            step_model, compiled = torch.compile(model), True
        except Exception as exc:  # noqa: BLE001 - the report says why and the loop runs eager
            why = f"{type(exc).__name__}: {exc}"[:200]
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if sizes.precision == "bf16" else torch.float32

    def step() -> float:
        tokens = torch.randint(0, cfg.vocab_size, (sizes.micro_batch, cfg.seq_length + 1), generator=generator)
        tokens = tokens.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = step_model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises, as megastack's logged loss does

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        step()  # compilation / warm-up
    except Exception as exc:  # noqa: BLE001 - torch.compile can fail late, at the first call
        if not compiled:
            raise
        why, step_model, compiled = f"{type(exc).__name__}: {exc}"[:200], model, False
        step()
    rates = []
    for _ in range(max(1, (sizes.steps - 1) // sizes.window)):
        start = time.monotonic()
        for _ in range(sizes.window):
            step()
        rates.append(sizes.window * sizes.micro_batch * cfg.seq_length / (time.monotonic() - start))
    tps, peak = statistics.median(rates), peak_flops(None)
    return {
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(cfg) / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "compiled": compiled,
        "compile_error": why,
    }


# ----------------------------------------------------------------------------- 3. growth on the GPU


def grow_check(sizes: Sizes, work: Path) -> dict[str, Any]:
    import torch

    from megastack import layout
    from megastack.ckpt.execute import Comm, execute
    from megastack.ckpt.torch_dist import TorchDistWriter
    from megastack.config import ParallelConfig, load_model_config, to_dict
    from megastack.growth.api import grow
    from megastack.growth.spec import GrowthSpec
    from megastack.layout import take_pieces
    from megastack.model.reference import ReferenceLlama

    work.mkdir(parents=True, exist_ok=True)
    source_cfg = replace(load_model_config(sizes.grow_source), dtype="fp32")
    source = ReferenceLlama(source_cfg).init_weights(seed=7).eval()
    tensors = layout.logical_from_hf(source.state_dict(), source_cfg)
    manifest = {"format": "torch_dist", "model": to_dict(source_cfg), "iteration": 0, "history": []}
    src = execute(
        TorchDistWriter(source_cfg, torch.float32),
        lambda name, pieces, tensors=tensors: take_pieces(tensors[name], pieces),
        work / "source",
        Comm(),
        manifest,
    )
    start = time.monotonic()
    job = grow(src, work / "grown", GrowthSpec(operator="stack", factor=sizes.grow_factor), comm=Comm())
    grow_seconds = time.monotonic() - start
    target_cfg = job.plan.target

    # the CPU reference: the source's layers stacked by hand (G_stack repeats the whole stack)
    reference = ReferenceLlama(target_cfg).eval()
    reference.model.embed_tokens.load_state_dict(source.model.embed_tokens.state_dict())
    reference.model.norm.load_state_dict(source.model.norm.state_dict())
    reference.lm_head.load_state_dict(source.lm_head.state_dict())
    for i, layer in enumerate(reference.model.layers):
        layer.load_state_dict(source.model.layers[i % source_cfg.num_layers].state_dict())
    tokens = torch.randint(0, target_cfg.vocab_size, (1, sizes.grow_tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).double()
    del reference, source, tensors  # the logits check needs only the grown checkpoint now

    logits = megatron_logits(work / "grown", target_cfg, tokens, ParallelConfig())
    diff = (logits.double() - expected).abs().max().item()
    return {
        "source": sizes.grow_source,
        "source_layers": source_cfg.num_layers,
        "target_layers": target_cfg.num_layers,
        "target_parameters": target_cfg.total_parameters(),
        "grow_seconds": round(grow_seconds, 2),
        "max_abs_logit_diff": diff,
        "max_abs_logit": expected.abs().max().item(),
        "equal": diff <= 1e-4 * max(1.0, expected.abs().max().item()),
    }


def megatron_logits(path: Path, cfg: Any, tokens: Any, parallel: Any) -> Any:
    """Logits of the checkpoint at ``path`` through megatron-core's GPTModel (on the GPU when there is one),
    loaded by megatron-core's own dist_checkpointing.load, fp32 with TF32 off."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megastack.ckpt.detect import open_checkpoint
    from megastack.dist import init_distributed, init_model_parallel
    from megastack.model.build import build_model
    from megastack.model.forward import forward_logits

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_distributed()
    init_model_parallel(1, 1)
    reader = open_checkpoint(path)
    model = build_model(cfg, parallel)
    loaded = dist_checkpointing.load(
        {"model": model.sharded_state_dict()}, str(reader.path), strict=StrictHandling.RAISE_ALL
    )
    model.load_state_dict(loaded["model"], strict=True)
    device = next(model.parameters()).device
    logits = forward_logits(model, tokens.to(device), micro_batch_size=1)
    return logits.cpu()


# ----------------------------------------------------------------------------- report


def table(report: dict[str, Any]) -> str:
    env, ms, plain, g = report["environment"], report["megastack"], report["plain"], report["grow"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    def gib(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} GiB"

    lines = [
        f"GPU check {env['date']} on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, megatron-core "
        f"{env['megatron_core']}, deepspeed {env['deepspeed']}, layer spec {env['layer_spec']}):",
        "",
        "| run | tokens/s | MFU | peak memory |",
        "|---|---|---|---|",
        f"| megastack train {ms['model']} {ms['precision']} | {ms['tokens_per_s']:,.0f} | {pct(ms['mfu'])} | "
        f"{gib(ms['peak_memory_gib'])} |",
        f"| plain PyTorch (SDPA{', compiled' if plain['compiled'] else ', eager'}) | {plain['tokens_per_s']:,.0f} | "
        f"{pct(plain['mfu'])} | {gib(plain['peak_memory_gib'])} |",
        "",
        f"megastack / plain tokens/s: {report['ratio']:.2f}. Grow {g['source']} {g['source_layers']} -> "
        f"{g['target_layers']} layers ({g['target_parameters'] / 1e9:.2f}B) in {g['grow_seconds']} s; grown logits "
        f"on {env['device']} vs the CPU reference: max |diff| {g['max_abs_logit_diff']:.2e} "
        f"(max |logit| {g['max_abs_logit']:.2f}): {'equal' if g['equal'] else 'DIFFERENT'}.",
    ]
    if plain["compile_error"]:
        lines.append(f"torch.compile did not work: {plain['compile_error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the smoke: tiny shapes on the CPU (the test suite's)")
    parser.add_argument("--out", default="runs/gpu-check", help="work directory; OUT/gpu.json is the result")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each loop")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("bench/gpu.py: no GPU here; run it on a GPU machine, or --cpu for the smoke", file=sys.stderr)
        return 2
    sizes = CPU if args.cpu else GPU
    if args.steps:
        sizes = replace(sizes, steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"preset": "cpu" if args.cpu else "gpu", "environment": environment()}
    print(f"gpu check: {report['environment']}", flush=True)
    report["megastack"] = megastack_train(sizes, out / "train")
    print(f"gpu check: megastack train {report['megastack']}", flush=True)
    report["plain"] = plain_loop(sizes, compile_model=not args.cpu)
    print(f"gpu check: plain loop {report['plain']}", flush=True)
    report["ratio"] = report["megastack"]["tokens_per_s"] / report["plain"]["tokens_per_s"]
    report["grow"] = grow_check(sizes, out / "grow")
    print(f"gpu check: grow {report['grow']}", flush=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report), end="")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if report["grow"]["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
