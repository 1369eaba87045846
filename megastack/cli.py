"""megastack's command line: one entry, one subcommand per stage of a growth run.

Handlers are imported lazily so ``--help`` and argument errors answer without importing megatron.
A subcommand that is not built yet says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import gc
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from megastack import __version__
from megastack.ckpt.formats import FORMATS
from megastack.ckpt.source_check import early_source_check
from megastack.dist import discover
from megastack.errors import UserError, report
from megastack.growth.spec import OPERATORS

# subcommand -> "module:function" taking the parsed args and returning an exit code; imported only when the
# command runs, so `megastack plan` never imports torch.
HANDLERS: dict[str, str] = {
    "plan": "megastack.planner:cli_plan",
    "grow": "megastack.growth.cli:cli_grow",
    "convert": "megastack.ckpt.convert:cli_convert",
    "inspect": "megastack.ckpt.inspect:cli_inspect",
    "verify": "megastack.ckpt.inspect:cli_verify",
    "data": "megastack.train.data:cli_data",
    "train": "megastack.train.loop:cli_train",
    "run": "megastack.run.cli:cli_run",
    "validate": "megastack.validate:cli_validate",
}


def resolve_handler(command: str) -> Callable[[argparse.Namespace], int]:
    """The command's handler, imported with Python's cyclic garbage collector paused: importing torch makes
    a few hundred thousand objects, and the collections they trigger walk them all again and again (0.1-0.2
    s of the ~1.1 s import here; nothing imported is garbage)."""
    module_name, function = HANDLERS[command].split(":")
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        module = importlib.import_module(module_name)
    finally:
        if was_enabled:
            gc.enable()
    return getattr(module, function)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r:.40}") from None


def positive(text: str) -> int:
    """An argparse type: sizes, counts and parallel degrees (0 never silently means "the default")."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def count(text: str) -> int:
    """An argparse type: a non-negative integer (seeds)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (what is wrong, where to look), exit 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _add_source_check(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-source-check",
        action="store_true",
        help="do not re-hash the source's files against its megastack.json while writing (by default a mismatch "
        "publishes nothing; skipping it saves reading the source twice, for a source already checked, e.g. by "
        "'megastack verify')",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="megastack", description="Grow small LLMs into large ones on Megatron sharded checkpoints, and train them."
    )
    parser.add_argument("--version", action="version", version=f"megastack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help="plan a growth run (small model, growth timing d, factor g) from scaling laws")
    p.add_argument("--params", required=True, help="target model parameters N, e.g. 7e9 or 7B")
    p.add_argument("--tokens", required=True, help="target training tokens D, e.g. 2e12 or 2T")
    p.add_argument("--factor", default="4", help="growth factor g (default 4; the paper found 2-4 best)")
    p.add_argument("--model", help="target model config (YAML path or shipped name) to derive the small model")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("grow", help="grow a Megatron checkpoint (stack, zero, random, learn; depth or width)")
    p.add_argument("src", help="source checkpoint directory (torch_dist or legacy; format detected)")
    p.add_argument("dst", help="destination directory (must not exist)")
    p.add_argument(
        "--operator",
        default="stack",
        choices=list(OPERATORS),
        help="; ".join(f"{op.name}: {op.summary}" for op in OPERATORS.values()),
    )
    p.add_argument("--factor", type=positive, default=None, help="growth factor g (depth: layers x g)")
    p.add_argument(
        "--layer-map",
        help="source layers per target layer, e.g. '0-5,0-5' or '0,1,1,2', or a mergekit passthrough YAML (slices)",
    )
    p.add_argument("--keep", help="--operator prune: the source layers kept, in order, e.g. '0-19,22-23'")
    p.add_argument(
        "--dimension",
        default="depth",
        choices=["depth", "width", "both", "experts"],
        help="depth (--factor/--layer-map), width (--hidden/--ffn/--heads/--query-groups), both, or experts "
        "(dense -> mixture of experts: --experts/--topk)",
    )
    p.add_argument("--experts", type=positive, help="experts: experts per MoE layer, each a copy of the dense MLP")
    p.add_argument("--topk", type=positive, help="experts: experts each token is routed to (default 2)")
    p.add_argument(
        "--granularity",
        type=positive,
        default=1,
        help="experts: split the dense MLP into this many finer experts (granular upcycling; default 1)",
    )
    p.add_argument(
        "--router-init",
        choices=["random", "zero"],
        default="random",
        help="experts: router weights N(0, init_std) or zero; either keeps the dense function (default random)",
    )
    p.add_argument("--hidden", type=positive, help="width: target hidden size (a multiple of the head dim)")
    p.add_argument("--ffn", type=positive, help="width: target FFN hidden size")
    p.add_argument("--heads", type=positive, help="width: target attention heads (default hidden / head dim)")
    p.add_argument("--query-groups", type=positive, help="width: target query groups (default: keep heads per group)")
    p.add_argument(
        "--data",
        action="append",
        help="learn: token data (indexed-dataset prefix, 'megastack data' "
        "dir, .npy tokens, or text files/dirs read as bytes); repeatable",
    )
    p.add_argument(
        "--learn-tokens", type=positive, default=65536, help="learn: tokens to train the maps on (default 65536)"
    )
    p.add_argument(
        "--learn-batch", type=positive, default=8, help="learn: sequences per step over all ranks (default 8)"
    )
    p.add_argument("--learn-lr", type=float, default=0.01, help="learn: Adam learning rate of the maps (default 0.01)")
    p.add_argument("--noise", type=float, default=0.0, help="W <- (1-A) W + A eps (the paper uses 0.2)")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--tp", type=positive, help="output tensor-parallel size (legacy output; default: the input's)")
    p.add_argument("--pp", type=positive, help="output pipeline-parallel size (legacy output; default: the input's)")
    p.add_argument(
        "--ep",
        type=positive,
        help="output expert-parallel size (legacy output of a mixture of experts; default: the input's)",
    )
    p.add_argument(
        "--norm-names",
        choices=["te", "local"],
        help="legacy output (and a mixture of experts' norm in torch_dist): norm keys for Megatron-LM's "
        "--transformer-impl transformer_engine or local (default: as the source)",
    )
    p.add_argument(
        "--carry-optimizer",
        action="store_true",
        help="grow Adam's state with the weights (from megastack train's torch_dist checkpoints or Megatron-LM's "
        "optimizer state, legacy or torch_dist; written as torch_dist)",
    )
    p.add_argument(
        "--to",
        choices=list(FORMATS),
        help="output format (default: the source's; --carry-optimizer from legacy needs torch_dist)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the per-rank plan (reads, writes, peak memory) only")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--ranks", type=positive, help="with --dry-run: plan for this many ranks (default: the launcher's)")
    _add_source_check(p)

    p = sub.add_parser("convert", help="convert between Hugging Face, torch_dist and legacy Megatron (resharding)")
    p.add_argument("src", help="source checkpoint (format detected)")
    p.add_argument("dst", help="destination directory (must not exist)")
    p.add_argument("--to", required=True, choices=list(FORMATS))
    p.add_argument("--tp", type=positive, help="output tensor-parallel size (legacy; default: the input's, else 1)")
    p.add_argument("--pp", type=positive, help="output pipeline-parallel size (legacy; default: the input's, else 1)")
    p.add_argument("--ep", type=positive, help="output expert-parallel size (legacy MoE; default: the input's, else 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="output dtype (default: the input's)")
    p.add_argument("--model", help="model config (YAML or shipped name) for a source without its architecture")
    p.add_argument(
        "--norm-names",
        choices=["te", "local"],
        help="legacy output (and a mixture of experts' norm in torch_dist): norm keys for Megatron-LM's "
        "--transformer-impl transformer_engine or local (default: as the source)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the per-rank plan (reads, writes, peak memory) only")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    _add_source_check(p)

    p = sub.add_parser("inspect", help="describe a checkpoint: format, architecture, layout, tensors, history")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys, see README)")

    p = sub.add_parser("verify", help="check a checkpoint against its manifest (checksums and shapes)")
    p.add_argument("ckpt")

    p = sub.add_parser("data", help="train a sentencepiece tokenizer and write Megatron indexed datasets")
    p.add_argument("inputs", nargs="*", help="text or jsonl files or directories (default: the demo corpus)")
    p.add_argument("--out", default="data", help="output directory")
    p.add_argument("--vocab-size", type=positive, default=1024)

    p = sub.add_parser("validate", help="check a config file (model, layout, training stage or recipe)")
    p.add_argument("config", help="YAML file")

    p = sub.add_parser("train", help="train one stage (launch with torchrun, deepspeed, srun or mpirun)")
    p.add_argument("config", help="training config YAML")

    p = sub.add_parser("run", help="run a whole recipe: small stage, growth, large stage, scratch baseline")
    p.add_argument("recipe", nargs="?", help="recipe YAML or shipped name (default: the embedded tiny recipe)")
    p.add_argument("--out", help="output directory (default: runs/<recipe name> under the current directory)")
    p.add_argument("--nproc", type=positive, default=2, help="local processes when not under a launcher (default 2)")
    p.add_argument("--stage", help="run only this stage (small, grow, large, scratch); earlier ones must be done")
    return parser


def _interrupted(stop: BaseException) -> int:
    """One line and the shell's exit code for the signal; the command's own cleanup has already run."""
    terminated = isinstance(stop, Terminated)
    print(
        f"megastack: {'terminated (SIGTERM)' if terminated else 'interrupted'}; unfinished output was "
        "removed (published checkpoints are kept)",
        file=sys.stderr,
    )
    return 143 if terminated else 130


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N`` to every command; the rank is in the environment
    too (LOCAL_RANK), so take it from there and keep the command's own arguments clean."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                skip = True
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                break
        else:
            out.append(arg)
    return out


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every ``finally`` and cleanup runs."""


# The commands that write a checkpoint from a source: its check starts before torch is imported, and the
# process leaves at once when they return (every output fsync'd and published).
CHECKPOINT_WRITERS = ("convert", "grow")
_parsed_command: list[str | None] = [None]  # the command main() parsed last
_signalled: list[BaseException] = []  # the interruption this process received, once it has


def _raise_terminated(signum: int, frame: Any) -> None:
    _signalled.append(Terminated())
    raise _signalled[-1]


def _raise_interrupted(signum: int, frame: Any) -> None:
    _signalled.append(KeyboardInterrupt())
    raise _signalled[-1]


def _interruption(exc: BaseException) -> BaseException | None:
    """The signal behind ``exc``, or None. Recorded when it arrived, because a library it interrupted may
    turn it into another error (torch.load inside a signal, a collective cut short: RuntimeError, ...)."""
    if _signalled:
        return _signalled[0]
    return exc if isinstance(exc, (KeyboardInterrupt, Terminated)) else None


def main(argv: Sequence[str] | None = None) -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if on_main_thread:
        _signalled.clear()
        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
            signal.SIGINT: signal.signal(signal.SIGINT, _raise_interrupted),
        }
    try:
        return _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def console_main() -> int:
    """The `megastack` command (console script and ``python -m megastack``): :func:`main`, then freeze
    the garbage collector's objects so the interpreter's exit skips collecting them: with torch imported,
    its final collections take ~0.3 s of every command, and nothing here relies on them (outputs are
    closed, fsync'd and renamed before a handler returns; atexit handlers still run). A convert or grow
    then leaves at once (``_exit_now``)."""
    code = main()
    gc.freeze()
    if _parsed_command[0] in CHECKPOINT_WRITERS:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, which frees every module's objects one by one (~0.11 s
    with torch imported): atexit handlers run and the standard streams (Python's and C's) are flushed
    first. For commands whose every output is closed, fsync'd and published when they return; never while
    a non-daemon thread runs (Python would wait for it)."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a reader gone (head): nothing to keep
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)  # C stdio (a library's printf into a pipe)
    os._exit(code)


def _source_to_check(args: argparse.Namespace) -> tuple[str | None, tuple[int, int]]:
    """The checkpoint a convert or grow re-checks while it writes, and this rank's share (rank, world):
    started before the handler imports torch (``early_source_check``)."""
    if args.command not in CHECKPOINT_WRITERS or args.dry_run or args.no_source_check:
        return None, (0, 1)
    try:
        env = discover(allow_mpi=False)
    except ValueError:  # a launcher variable that is not a number: the command itself says so
        return None, (0, 1)
    return args.src, (env.rank, env.world_size)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(strip_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    _parsed_command[0] = args.command
    if not args.command:
        parser.print_help()
        return 2
    try:
        with early_source_check(*_source_to_check(args)):
            return int(resolve_handler(args.command)(args) or 0)
    except UserError as error:
        cause = _interruption(error)
        if cause is None:
            return report(error)
        return _interrupted(cause)
    except (KeyboardInterrupt, Terminated) as stop:
        return _interrupted(_interruption(stop) or stop)
    except Exception as exc:
        cause = _interruption(exc)
        if cause is None:
            raise
        return _interrupted(cause)
    except BrokenPipeError:  # output piped into head & co.: stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
