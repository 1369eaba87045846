"""The training loop of one stage, top to bottom. ``train(config) -> StageSummary`` is the public entry.

    1. check the inputs (layout, data files, tokenizer vs vocab, init_from architecture): nothing written yet
    2. megatron parallel_state, the model; weights from the resume point, init_from, or megatron's init
    3. DeepSpeed engine (fresh AdamW; on resume its saved state), megatron GPTDatasets
    4. for each iteration: the step's micro-batches -> megatron schedule fwd/bwd -> DeepSpeed step;
       log, evaluate, save (atomically; the tracker moves last)
    5. final evaluation and checkpoint; a StageSummary for the caller (the chained-run stage)

It runs inside an already initialised process group (the chained run calls it in-process) or starts one
from whichever launcher started the process (torchrun, deepspeed, srun, mpirun, or none).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from megastack import flops
from megastack.config import to_dict
from megastack.errors import NotBuiltError, UserError
from megastack.fsio import atomic_write_text
from megastack.train import checkpointing, data
from megastack.train.config import TrainConfig, load_train_config
from megastack.train.engine import Batch, Stepper, check_layout, initialize, learning_rate
from megastack.train.ramp import MaskRamp

LOG_FILE = "train.jsonl"


def log_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every record in a stage's train.jsonl; a line torn by a killed job, or one that is
    not a JSON object, is skipped (resume and the run's report read the same file the same way)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append((line, record))
    return records


def _at_or_before(value: Any, iteration: int) -> bool:
    return isinstance(value, (int, float)) and value <= iteration


@dataclass
class StageSummary:
    """What a finished stage reports to its caller."""

    iterations: int  # optimizer steps of this stage (total, including any before a resume)
    tokens: int  # tokens trained in this stage
    flops: float  # model FLOPs of this stage
    cumulative_flops: float  # including every earlier stage (carried through megastack.json)
    final_train_loss: float | None
    final_valid_loss: float | None
    best_valid_loss: float | None
    wall_seconds: float  # of this process's run (a resumed stage counts only the resumed part)
    checkpoint: str | None  # the last published checkpoint (iter_* directory)
    out_dir: str


# ----------------------------------------------------------------------------- logging


class Logs:
    """JSONL records (every rank computes, rank 0 writes), TensorBoard scalars, a bar or plain lines.

    ``enabled`` is true on global rank 0 only; ``console`` false keeps the files but prints nothing."""

    def __init__(
        self, out: Path, enabled: bool, console: bool, tensorboard: bool, progress: str, total: int, start: int
    ):
        self.enabled = enabled
        self.path = out / LOG_FILE
        self.tb = None
        self.bar = None
        self.lines = False
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("megastack train: tensorboard is not installed; writing train.jsonl only", file=sys.stderr)
        if not console:
            progress = "off"
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self.lines = progress != "off" and not use_bar
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop records of iterations past the checkpoint (they will be redone) and the summary of
        the interrupted job (the stage is not over)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line
            for line, r in log_records(self.path)
            if _at_or_before(r.get("iteration", 0), iteration) and r.get("type") != "summary"
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def record(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        entry = {"type": kind, **fields, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.tb is not None and "iteration" in fields:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "valid_loss"):
                if fields.get(key) is not None:
                    tag = "valid/loss" if key == "valid_loss" else f"train/{key}"
                    self.tb.add_scalar(tag, fields[key], fields["iteration"])
            if kind == "eval" and fields.get("valid_loss") is not None:
                self.tb.add_scalar("valid/loss_vs_gflops", fields["valid_loss"], int(fields["cumulative_flops"] / 1e9))

    def progress(self, iteration: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = iteration
            self.bar.set_postfix_str(text, refresh=True)
        elif self.lines:
            print(f"iter {iteration}: {text}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        elif self.lines:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- the stage


def _on_rank0_first(fn, *args):
    """Run ``fn`` on global rank 0, then on the others (rank 0 may build a cache the others reuse).

    A UserError on rank 0 reaches every rank as the same one-line error."""
    rank = torch.distributed.get_rank()
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except UserError as exc:
            error = str(exc)
    status = [error]
    torch.distributed.broadcast_object_list(status, src=0)
    if status[0]:
        raise UserError(status[0])
    if rank != 0:
        result = fn(*args)
    return result


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train(config: TrainConfig, *, verbose: bool = True, stop_at: int | None = None) -> StageSummary:
    """Train one stage as ``config`` says; collective (every rank calls it). Returns the stage's summary.

    ``stop_at``: save and return after that iteration, as a job whose time runs out would; a later call
    with the same config resumes there (the summary then describes the stage so far)."""
    from megatron.core import parallel_state as ps

    from megastack.dist import init_distributed, init_model_parallel
    from megastack.model.build import build_model
    from megastack.plan import GrowthRecord

    wall_start = time.monotonic()
    # torch's deprecation notices for the collectives DeepSpeed calls, once per call: nothing to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = config.resolved_model()
    par, opt, sched = config.parallel, config.optimizer, config.schedule
    out = Path(config.out_dir)

    # 1. inputs: every check before anything is written
    check_layout(par, cfg)
    dp = par.data_parallel_size(world)
    accumulation = par.gradient_accumulation_steps(world)
    global_batch = par.micro_batch_size * dp * accumulation
    tokens_per_iter = global_batch * cfg.seq_length
    total_iters = sched.iterations(tokens_per_iter)
    resume_from = checkpointing.resume_dir(out) if config.resume else None
    source = resume_from or (Path(config.init_from) if config.init_from else None)
    if config.init_from and resume_from is None:
        checkpointing.check_source(config.init_from, cfg)
    prefixes, tokenizer = _on_rank0_first(
        data.resolve_data, list(config.data.prefixes), config.data.tokenizer, cfg.vocab_size
    )
    if config.init_from and config.init_optimizer == "carried" and resume_from is None:
        raise NotBuiltError(
            "init_optimizer: carried is not built yet (growth does not write optimizer state); "
            "use the default 'fresh' (the paper re-creates AdamW after growth)"
        )

    # 2. layout and model
    init_model_parallel(par.tensor, par.pipeline, seed=config.seed)
    module = build_model(cfg, par)
    source_manifest: dict[str, Any] = {}
    if source is not None:
        source_manifest = checkpointing.load_weights(
            module, cfg, source, where="resume" if resume_from else "init_from"
        )
    train_state: dict[str, Any] = dict(source_manifest.get("train", {})) if resume_from else {}
    if resume_from:
        base_flops = float(train_state.get("base_cumulative_flops", 0.0))
        base_history = list(train_state.get("base_history", []))
        ramp_info = train_state.get("mask_ramp")
    else:
        base_flops = float(source_manifest.get("cumulative_flops", 0.0))
        base_history = list(source_manifest.get("history", []))
        growth = GrowthRecord.from_json(source_manifest.get("growth") or {"operator": "none"}, str(source))
        new_layers = list(growth.new_layers or [])
        ramp_info = (
            {"new_layers": new_layers, "width_masks": growth.width_masks, "steps": config.mask_ramp_steps}
            if growth.mask_ramp and (new_layers or growth.width_masks) and config.mask_ramp_steps > 0
            else None
        )
    ramp = (
        MaskRamp(module, cfg, ramp_info["new_layers"], ramp_info.get("width_masks", []), ramp_info["steps"])
        if ramp_info
        else None
    )

    # 3. engine, data
    engine = initialize(module, par, opt, accumulation)
    start_iter, consumed_samples = 0, 0
    if resume_from:
        client = checkpointing.load_engine_state(engine, resume_from)
        start_iter, consumed_samples = int(client["iteration"]), int(client["consumed_samples"])
    datasets = data.build_datasets(
        prefixes,
        config.data.weights,
        config.data.split,
        tokenizer,
        cfg.seq_length,
        config.data.seed,
        train_samples=consumed_samples + (total_iters - start_iter) * global_batch,
        valid_samples=sched.eval_iters * global_batch,
        cache_dir=config.data.cache_dir or (out / "data_cache"),
    )
    device = _device()
    stepper = Stepper(engine, par, cfg.seq_length, device)
    dp_rank, micro = ps.get_data_parallel_rank(), par.micro_batch_size
    iter_flops = flops.flops_per_iteration(cfg, global_batch)
    peak = flops.peak_flops(config.logging.peak_flops)
    logs = Logs(
        out,
        enabled=rank == 0,
        console=verbose,
        tensorboard=config.logging.tensorboard,
        progress=config.logging.progress,
        total=total_iters,
        start=start_iter,
    )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_partials(out)
        logs.truncate_after(start_iter)
    logs.message(
        f"megastack train: {cfg.name or 'model'} {cfg.total_parameters():,} params, TP{par.tensor} "
        f"PP{par.pipeline} DP{dp} ZeRO-{par.zero_stage} {par.precision}, global batch {global_batch} "
        f"({accumulation} micro-batches of {micro} per rank), {total_iters} iterations"
        + (f", resuming at {start_iter} from {resume_from}" if resume_from else "")
        + (f", from {config.init_from}" if config.init_from and not resume_from else "")
    )

    def step_batches(dataset: Any, first_sample: int, count: int) -> list[Batch]:
        return [
            Batch.of(data.micro_batch(dataset, first_sample + (m * dp + dp_rank) * micro, micro), device)
            for m in range(count)
        ]

    def evaluate() -> float | None:
        if datasets.valid is None or sched.eval_iters == 0:
            return None
        # the same first eval_iters global batches of the valid split every time: comparable across stages
        losses = [
            stepper.eval_loss(step_batches(datasets.valid, i * global_batch, accumulation))
            for i in range(sched.eval_iters)
        ]
        return sum(losses) / len(losses)

    # the numbers the summary reports; a resumed job starts from the interrupted job's, so a stage resumed
    # at its very end (killed after the last save) still reports its last train loss and its best eval
    saved = train_state.get("losses", {})
    state = {
        "last_loss": saved.get("last_train"),
        "valid": saved.get("last_valid"),
        "best": saved.get("best_valid"),
        "checkpoint": None,
    }

    def stage_flops(iteration: int) -> float:
        return iteration * iter_flops

    def save(iteration: int) -> None:
        done = iteration * tokens_per_iter
        event = {
            "event": "train",
            "iterations": iteration,
            "tokens": done,
            "flops": stage_flops(iteration),
            "model": cfg.name,
            "init_from": str(config.init_from) if config.init_from else None,
        }
        manifest = {
            "format": "torch_dist",
            "model": to_dict(cfg),
            "iteration": iteration,
            "consumed_tokens": done,
            "cumulative_flops": base_flops + stage_flops(iteration),
            "history": base_history + [event],
            "train": {
                "base_cumulative_flops": base_flops,
                "base_history": base_history,
                "mask_ramp": ramp_info,
                "consumed_samples": consumed_samples,
                "global_batch_size": global_batch,
                "total_iters": total_iters,
                "losses": {"last_train": state["last_loss"], "last_valid": state["valid"], "best_valid": state["best"]},
            },
        }
        client = {"iteration": iteration, "consumed_samples": consumed_samples}
        path = checkpointing.save(out, iteration, engine, par.zero_stage, manifest, client, sched.keep_last)
        state["checkpoint"] = str(path)
        logs.record("save", iteration=iteration, path=str(path))

    # 4. the loop
    if sched.eval_at_start and start_iter == 0:
        _record_eval(logs, state, evaluate(), 0, tokens_per_iter, base_flops)
    window_start, window_iters = time.monotonic(), 0
    end = total_iters if stop_at is None else max(start_iter, min(stop_at, total_iters))
    for iteration in range(start_iter, end):
        if ramp is not None:
            ramp.set_step(iteration)
        result = stepper.train_step(
            step_batches(datasets.train, consumed_samples, accumulation), learning_rate(iteration, opt, total_iters)
        )
        consumed_samples += global_batch
        done = iteration + 1
        window_iters += 1
        state["last_loss"] = result.loss
        if done % sched.log_interval == 0 or done == total_iters:
            elapsed = time.monotonic() - window_start
            tps = window_iters * tokens_per_iter / elapsed if elapsed > 0 else None
            achieved = window_iters * iter_flops / elapsed if elapsed > 0 else 0.0
            util = flops.mfu(achieved, world, peak)
            logs.record(
                "train",
                iteration=done,
                loss=result.loss,
                lr=result.lr,
                grad_norm=result.grad_norm,
                tokens=done * tokens_per_iter,
                stage_flops=stage_flops(done),
                cumulative_flops=base_flops + stage_flops(done),
                tokens_per_s=tps,
                mfu=util,
            )
            logs.progress(
                done,
                f"loss {result.loss:.4f} lr {result.lr:.2e} "
                + (f"{tps:,.0f} tok/s" if tps else "")
                + (f" MFU {util:.1%}" if util else ""),
            )
            window_start, window_iters = time.monotonic(), 0
        if sched.eval_interval and done % sched.eval_interval == 0 and done != total_iters:
            _record_eval(logs, state, evaluate(), done, tokens_per_iter, base_flops + stage_flops(done))
        if sched.save_interval and done % sched.save_interval == 0 and done != total_iters:
            save(done)
            window_start = time.monotonic()

    # 5. the end of the stage (or of this job's share of it)
    if end == total_iters:
        _record_eval(logs, state, evaluate(), end, tokens_per_iter, base_flops + stage_flops(end))
    save(end)
    summary = StageSummary(
        iterations=end,
        tokens=end * tokens_per_iter,
        flops=stage_flops(end),
        cumulative_flops=base_flops + stage_flops(end),
        final_train_loss=state["last_loss"],
        final_valid_loss=state["valid"],
        best_valid_loss=state["best"],
        wall_seconds=round(time.monotonic() - wall_start, 3),
        checkpoint=state["checkpoint"],
        out_dir=str(out),
    )
    logs.record("summary", iteration=end, **{k: v for k, v in asdict(summary).items() if k != "iterations"})
    logs.message(
        f"{'done' if end == total_iters else 'stopped'}: {end} iterations, final train loss "
        f"{summary.final_train_loss}, valid {summary.final_valid_loss}, {summary.cumulative_flops:.3e} "
        f"cumulative FLOPs, checkpoint {summary.checkpoint}"
    )
    logs.close()
    if ramp is not None:
        ramp.remove()
    engine.destroy()
    return summary


def _record_eval(
    logs: Logs, state: dict[str, Any], valid: float | None, iteration: int, tokens_per_iter: int, cumulative: float
) -> None:
    if valid is None:
        return
    state["valid"] = valid
    state["best"] = valid if state["best"] is None else min(state["best"], valid)
    logs.record(
        "eval", iteration=iteration, valid_loss=valid, tokens=iteration * tokens_per_iter, cumulative_flops=cumulative
    )
    logs.message(f"iter {iteration}: valid loss {valid:.4f}")


def cli_train(args: Any) -> int:
    """``megastack train CONFIG``: under torchrun / deepspeed / srun / mpirun, or as one process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = load_train_config(args.config)
    train(config)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
