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
from megastack.ckpt.manifest import build_manifest, lineage
from megastack.errors import UserError
from megastack.fsio import atomic_write_text
from megastack.train import checkpointing, data, optimizer_state
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
    wall_start = time.monotonic()
    # torch's deprecation notices for the collectives DeepSpeed calls, once per call: nothing to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    inputs = check_inputs(config)
    stage = Stage(config, inputs, verbose)
    try:
        stage.build()
        end = stage.loop(stop_at)
        return stage.finish(end, wall_start)
    finally:
        stage.close()


@dataclass
class Inputs:
    """Step 1: what the checks established, before anything is written."""

    rank: int
    world: int
    global_batch: int
    accumulation: int
    total_iters: int
    resume_from: Path | None
    prefixes: list[str]
    tokenizer: Any


def check_inputs(config: TrainConfig) -> Inputs:
    """1. layout, data files, tokenizer vs vocab, init_from's architecture: every check before a write."""
    from megastack.dist import init_distributed

    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg, par = config.resolved_model(), config.parallel
    check_layout(par, cfg)
    accumulation = par.gradient_accumulation_steps(world)
    global_batch = par.micro_batch_size * par.data_parallel_size(world) * accumulation
    resume_from = checkpointing.resume_dir(config.out_dir) if config.resume else None
    if config.init_from and resume_from is None:
        checkpointing.check_source(config.init_from, cfg)
    prefixes, tokenizer = _on_rank0_first(
        data.resolve_data, list(config.data.prefixes), config.data.tokenizer, cfg.vocab_size, config.data.demo_bytes
    )
    if config.init_optimizer == "carried" and not config.init_from:
        raise UserError("init_optimizer: carried needs init_from (the checkpoint whose Adam state to carry)")
    total_iters = config.schedule.iterations(global_batch * cfg.seq_length)
    return Inputs(rank, world, global_batch, accumulation, total_iters, resume_from, prefixes, tokenizer)


@dataclass
class Losses:
    """The numbers the summary reports; a resumed job starts from the interrupted job's, so a stage resumed
    at its very end (killed after the last save) still reports its last train loss and its best eval."""

    last_train: float | None = None
    last_valid: float | None = None
    best_valid: float | None = None


class Stage:
    """Steps 2-5 of one training stage; ``close`` releases what it holds whatever happened."""

    def __init__(self, config: TrainConfig, inputs: Inputs, verbose: bool):
        self.config, self.inputs, self.verbose = config, inputs, verbose
        self.cfg, self.par, self.sched = config.resolved_model(), config.parallel, config.schedule
        self.out = Path(config.out_dir)
        self.engine: Any = None
        self.ramp: MaskRamp | None = None
        self.logs: Logs | None = None
        self.checkpoint: str | None = None
        self.carried_step: int | None = None  # init_optimizer: carried: the Adam step it continues from
        self.tokens_per_iter = inputs.global_batch * self.cfg.seq_length
        self.iter_flops = flops.flops_per_iteration(self.cfg, inputs.global_batch)

    def build(self) -> None:
        """2. layout and model (weights from the resume point, init_from, or megatron's init);
        3. the engine (fresh AdamW; on resume its saved state), data and logs."""
        from megatron.core import parallel_state as ps

        from megastack.dist import init_model_parallel
        from megastack.model.build import build_model

        config, inputs, verbose = self.config, self.inputs, self.verbose
        # 2. layout and model; weights from the resume point, init_from, or megatron's init
        init_model_parallel(self.par.tensor, self.par.pipeline, seed=config.seed)
        module = build_model(self.cfg, self.par)
        resume_from = inputs.resume_from
        source = resume_from or (Path(config.init_from) if config.init_from else None)
        source_manifest: dict[str, Any] = {}
        if source is not None:
            where = "resume" if resume_from else "init_from"
            source_manifest = checkpointing.load_weights(module, self.cfg, source, where=where)
        train_state: dict[str, Any] = dict(source_manifest.get("train", {})) if resume_from else {}
        if resume_from:
            self.base_flops = float(train_state.get("base_cumulative_flops", 0.0))
            self.base_history = list(train_state.get("base_history", []))
            self.ramp_info = train_state.get("mask_ramp")
        else:
            self.base_flops, self.base_history = lineage(source_manifest)
            self.ramp_info = self._ramp_info(source_manifest, source)
        if self.ramp_info:
            info = self.ramp_info
            self.ramp = MaskRamp(module, self.cfg, info["new_layers"], info.get("width_masks", []), info["steps"])
        saved = train_state.get("losses", {})
        self.losses = Losses(saved.get("last_train"), saved.get("last_valid"), saved.get("best_valid"))

        # 3. engine (fresh AdamW; on resume its saved state), data, logs
        self.engine = initialize(module, self.par, config.optimizer, inputs.accumulation)
        self.start_iter, self.consumed_samples = 0, 0
        if resume_from:
            client = checkpointing.load_engine_state(self.engine, resume_from)
            self.start_iter, self.consumed_samples = int(client["iteration"]), int(client["consumed_samples"])
        elif config.init_optimizer == "carried":
            self.carried_step = optimizer_state.carry_in(self.engine, module, self.cfg, source, source_manifest)
        self.datasets = data.build_datasets(
            inputs.prefixes,
            config.data.weights,
            config.data.split,
            inputs.tokenizer,
            self.cfg.seq_length,
            config.data.seed,
            train_samples=self.consumed_samples + (inputs.total_iters - self.start_iter) * inputs.global_batch,
            valid_samples=self.sched.eval_iters * inputs.global_batch,
            cache_dir=config.data.cache_dir or (self.out / "data_cache"),
        )
        self.device = _device()
        self.stepper = Stepper(self.engine, self.par, self.cfg.seq_length, self.device, config.optimizer.clip_grad)
        self.dp, self.dp_rank = self.par.data_parallel_size(inputs.world), ps.get_data_parallel_rank()
        self.logs = Logs(
            self.out,
            enabled=inputs.rank == 0,
            console=verbose,
            tensorboard=config.logging.tensorboard,
            progress=config.logging.progress,
            total=inputs.total_iters,
            start=self.start_iter,
        )
        if inputs.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_stale_partials(self.out)
            self.logs.truncate_after(self.start_iter)
        par = self.par
        self.logs.message(
            f"megastack train: {self.cfg.name or 'model'} {self.cfg.total_parameters():,} params, TP{par.tensor} "
            f"PP{par.pipeline} DP{self.dp} ZeRO-{par.zero_stage} {par.precision}, global batch "
            f"{inputs.global_batch} ({inputs.accumulation} micro-batches of {par.micro_batch_size} per rank), "
            f"{inputs.total_iters} iterations"
            + (f", resuming at {self.start_iter} from {resume_from}" if resume_from else "")
            + (f", from {config.init_from}" if config.init_from and not resume_from else "")
            + (f", Adam's state carried (step {self.carried_step})" if self.carried_step is not None else "")
        )

    def _ramp_info(self, source_manifest: dict[str, Any], source: Path | None) -> dict[str, Any] | None:
        """The grown checkpoint's instructions for ramping its new blocks in (none for other sources)."""
        from megastack.plan import GrowthRecord

        growth = GrowthRecord.from_json(source_manifest.get("growth") or {"operator": "none"}, str(source))
        new_layers = list(growth.new_layers or [])
        if growth.mask_ramp and (new_layers or growth.width_masks) and self.config.mask_ramp_steps > 0:
            return {"new_layers": new_layers, "width_masks": growth.width_masks, "steps": self.config.mask_ramp_steps}
        return None

    def stage_flops(self, iteration: int) -> float:
        return iteration * self.iter_flops

    def batches(self, dataset: Any, first_sample: int) -> list[Batch]:
        """This rank's micro-batches of the global batch starting at ``first_sample``."""
        micro = self.par.micro_batch_size
        return [
            Batch.of(data.micro_batch(dataset, first_sample + (m * self.dp + self.dp_rank) * micro, micro), self.device)
            for m in range(self.inputs.accumulation)
        ]

    def evaluate(self, iteration: int) -> None:
        """The same first eval_iters global batches of the valid split every time: comparable across stages."""
        if self.datasets.valid is None or self.sched.eval_iters == 0:
            return
        batch = self.inputs.global_batch
        losses = [
            self.stepper.eval_loss(self.batches(self.datasets.valid, i * batch)) for i in range(self.sched.eval_iters)
        ]
        valid = sum(losses) / len(losses)
        self.losses.last_valid = valid
        self.losses.best_valid = valid if self.losses.best_valid is None else min(self.losses.best_valid, valid)
        self.logs.record(
            "eval",
            iteration=iteration,
            valid_loss=valid,
            tokens=iteration * self.tokens_per_iter,
            cumulative_flops=self.base_flops + self.stage_flops(iteration),
        )
        self.logs.message(f"iter {iteration}: valid loss {valid:.4f}")

    def save(self, iteration: int) -> None:
        done = iteration * self.tokens_per_iter
        event = {
            "event": "train",
            "iterations": iteration,
            "tokens": done,
            "flops": self.stage_flops(iteration),
            "model": self.cfg.name,
            "init_from": str(self.config.init_from) if self.config.init_from else None,
        }
        manifest = build_manifest(
            fmt="torch_dist",
            model=self.cfg,
            iteration=iteration,
            consumed_tokens=done,
            cumulative_flops=self.base_flops + self.stage_flops(iteration),
            history=self.base_history,
            event=event,
            train={
                "base_cumulative_flops": self.base_flops,
                "base_history": self.base_history,
                "mask_ramp": self.ramp_info,
                "consumed_samples": self.consumed_samples,
                "global_batch_size": self.inputs.global_batch,
                "total_iters": self.inputs.total_iters,
                "losses": asdict(self.losses),
            },
        )
        export = self.config.export_optimizer == "always" or (
            self.config.export_optimizer == "final" and iteration == self.inputs.total_iters
        )
        states = optimizer_state.adam_states(self.par.precision) if export else ()
        if export:
            manifest["optimizer"] = {"step": optimizer_state.adam_step(self.engine), "states": list(states)}
        client = {"iteration": iteration, "consumed_samples": self.consumed_samples}
        path = checkpointing.save(
            self.out,
            iteration,
            self.engine,
            self.cfg,
            self.par.zero_stage,
            manifest,
            client,
            self.sched.keep_last,
            states,
        )
        self.checkpoint = str(path)
        self.logs.record("save", iteration=iteration, path=str(path))

    def loop(self, stop_at: int | None) -> int:
        """4. for each iteration: the step's micro-batches -> fwd/bwd -> optimizer step; log, evaluate, save.
        Returns the iteration it stopped after."""
        sched, total, opt = self.sched, self.inputs.total_iters, self.config.optimizer
        peak = flops.peak_flops(self.config.logging.peak_flops)
        if sched.eval_at_start and self.start_iter == 0:
            self.evaluate(0)
        window_start, window_iters = time.monotonic(), 0
        end = total if stop_at is None else max(self.start_iter, min(stop_at, total))
        for iteration in range(self.start_iter, end):
            if self.ramp is not None:
                self.ramp.set_step(iteration)
            batches = self.batches(self.datasets.train, self.consumed_samples)
            result = self.stepper.train_step(batches, learning_rate(iteration, opt, total))
            self.consumed_samples += self.inputs.global_batch
            done = iteration + 1
            window_iters += 1
            self.losses.last_train = result.loss
            if done % sched.log_interval == 0 or done == total:
                elapsed = time.monotonic() - window_start
                tps = window_iters * self.tokens_per_iter / elapsed if elapsed > 0 else None
                util = flops.mfu(
                    window_iters * self.iter_flops / elapsed if elapsed > 0 else 0.0, self.inputs.world, peak
                )
                self.logs.record(
                    "train",
                    iteration=done,
                    loss=result.loss,
                    lr=result.lr,
                    grad_norm=result.grad_norm,
                    tokens=done * self.tokens_per_iter,
                    stage_flops=self.stage_flops(done),
                    cumulative_flops=self.base_flops + self.stage_flops(done),
                    tokens_per_s=tps,
                    mfu=util,
                )
                self.logs.progress(
                    done,
                    f"loss {result.loss:.4f} lr {result.lr:.2e} "
                    + (f"{tps:,.0f} tok/s" if tps else "")
                    + (f" MFU {util:.1%}" if util else ""),
                )
                window_start, window_iters = time.monotonic(), 0
            if sched.eval_interval and done % sched.eval_interval == 0 and done != total:
                self.evaluate(done)
            if sched.save_interval and done % sched.save_interval == 0 and done != total:
                self.save(done)
                window_start = time.monotonic()
        return end

    def finish(self, end: int, wall_start: float) -> StageSummary:
        """5. the end of the stage (or of this job's share of it): final evaluation, checkpoint, summary."""
        if end == self.inputs.total_iters:
            self.evaluate(end)
        self.save(end)
        summary = StageSummary(
            iterations=end,
            tokens=end * self.tokens_per_iter,
            flops=self.stage_flops(end),
            cumulative_flops=self.base_flops + self.stage_flops(end),
            final_train_loss=self.losses.last_train,
            final_valid_loss=self.losses.last_valid,
            best_valid_loss=self.losses.best_valid,
            wall_seconds=round(time.monotonic() - wall_start, 3),
            checkpoint=self.checkpoint,
            out_dir=str(self.out),
        )
        self.logs.record("summary", iteration=end, **{k: v for k, v in asdict(summary).items() if k != "iterations"})
        self.logs.message(
            f"{'done' if end == self.inputs.total_iters else 'stopped'}: {end} iterations, final train loss "
            f"{summary.final_train_loss}, valid {summary.final_valid_loss}, {summary.cumulative_flops:.3e} "
            f"cumulative FLOPs, checkpoint {summary.checkpoint}"
        )
        return summary

    def close(self) -> None:
        """Logs flushed, ramp hooks removed, the engine released: after a finished stage or a failed one."""
        if self.logs is not None:
            self.logs.close()
        if self.ramp is not None:
            self.ramp.remove()
        if self.engine is not None:
            self.engine.destroy()


def cli_train(args: Any) -> int:
    """``megastack train CONFIG``: under torchrun / deepspeed / srun / mpirun, or as one process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = load_train_config(args.config)
    try:
        train(config)
    finally:  # also after a refusal: a gloo group left alive at exit can abort ("terminate called ...")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
