"""The only place megastack bends megatron-core to run on CPU (gloo). Inert when CUDA is present.

megatron-core assumes CUDA at a handful of call sites even for fp32 local-spec models (each patch below
names its call site). ``apply()`` patches exactly those, and only when
``torch.cuda.is_available()`` is false, so the same megastack code runs unpatched on GPU clusters.
``device_mode()`` scopes a cuda->cpu device mapping to calls that allocate on "cuda" internally
(pipeline schedules, model construction with tied embeddings under PP); on GPU it is a no-op.
``megatron_optimizer_mode()`` does the same for megatron-core's own optimizer (tests load what megastack
writes with it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare ordinal means a CUDA device to torch


class _CudaToCpu(TorchFunctionMode):
    """Maps device="cuda" to cpu and makes ``Tensor.cuda()`` a no-op inside the ``with`` block."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def device_mode() -> contextlib.AbstractContextManager:
    """Context for megatron calls that allocate on "cuda" themselves; nothing on GPU."""
    if cuda_present():
        return contextlib.nullcontext()
    return _CudaToCpu()


class _MegatronOptimizerOnCpu(_CudaToCpu):
    """_CudaToCpu, and ``Tensor.type()`` answered with its CUDA name: megatron-core's mixed-precision
    optimizer (optimizer.py's Float16OptimizerWithFloat16Params) accepts only ``torch.cuda.*Tensor``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            if out.startswith("torch.") and ".cuda." not in out:
                return "torch.cuda." + out[len("torch.") :]
        return out


class _NoStream:
    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def megatron_optimizer_mode() -> Iterator[None]:
    """Context for building and loading megatron-core's own optimizer (get_megatron_optimizer, its
    DistributedDataParallel wrapper, load_state_dict) on CPU: allocations on "cuda" go to cpu, tensor type
    names read as CUDA's, and the CUDA streams DDP waits on are stand-ins. megastack trains with DeepSpeed's
    optimizer; this is for checking that what megastack writes is what megatron-core's optimizer resumes
    from. Nothing on GPU."""
    if cuda_present():
        yield
        return
    saved = torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream
    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        with _MegatronOptimizerOnCpu():
            yield
    finally:
        torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream = saved


class CpuRNGStatesTracker:
    """megatron's CUDA RNG-states tracker, on torch's CPU generator.

    Attention dropout forks the tracker on every forward even at dropout 0; the stock tracker reads
    CUDA generator states. Same interface: add / fork / get_states / set_states / reset.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def apply() -> bool:
    """Patch megatron-core's CUDA-only call sites for CPU. Returns True if patches are active."""
    global _applied
    if cuda_present():
        return False
    if _applied:
        return True
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as transformer_utils

    # rotary_pos_embedding.py moves inv_freq to torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    # p2p_communication.py and filesystem_async.py synchronise CUDA streams.
    torch.cuda.synchronize = lambda device=None: None
    # fused_softmax.py builds the default causal mask on "cuda" when attention_mask is None.
    cached_mask = functools.lru_cache(maxsize=8)(_cpu_causal_mask)
    transformer_utils.get_default_causal_mask = cached_mask
    fused_softmax.get_default_causal_mask = cached_mask
    # dot_product_attention.py forks the CUDA RNG tracker on every forward.
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # model_parallel_cuda_manual_seed seeds the CUDA default generator; seed the CPU one instead.
    torch.cuda.manual_seed = lambda seed: None
    _applied = True
    return True


def moe_without_te() -> bool:
    """megatron-core 0.16's router reads ``te_general_gemm``, which moe_utils.py defines only when Transformer
    Engine imports (a NameError otherwise); without TE it means "no TE GEMM": torch.mm, its own fallback.
    Needed wherever TE is absent (CPU always); inert where TE is installed. Returns True if it patched."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if getattr(moe_utils, "HAVE_TE", False) or hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def distributed_optimizer_without_te() -> bool:
    """megatron-core 0.16's DistributedOptimizer with torch's Adam (no Transformer Engine or apex: CPU always)
    cannot load a checkpoint: its state_dict() asserts every parameter's state holds one ``step`` (none before
    the first step), and its fully_reshardable load then copies every state key, ``step`` included, from
    tensors that never hold one (KeyError). Stand-ins for both, used where megatron-core's own optimizer
    loads what megastack wrote (tests): before loading, ``seed_empty_state(optimizer)``; the copy keeps the
    state's own step (the load sets it from the param groups). Inert where TE or apex is installed (their
    fused Adam keeps the step in the param groups). Returns True if it patched."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE or getattr(distrib_optimizer, "_megastack_step_kept", False):
        return False
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def keep_step(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        step = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]].get("step")
        return original(self, model_param, tensors if step is None else {**tensors, "step": step})

    cls._set_main_param_and_optimizer_states = keep_step
    distrib_optimizer._megastack_step_kept = True
    return True


def seed_empty_state(optimizer: Any) -> None:
    """Give a megatron-core DistributedOptimizer on torch's Adam the state its load expects (zeros, step 0;
    all overwritten by the load). See ``distributed_optimizer_without_te``."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner.init_state_fn(inner.optimizer, inner.config)
        for state in inner.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def prepare_deepspeed() -> bool:
    """DeepSpeed on CPU without hidden C++ builds. Returns True if the CPU settings were applied.

    DeepSpeed picks its CPU accelerator from DS_ACCELERATOR (set before its first accelerator query)
    and otherwise JIT-compiles ``deepspeed_shm_comm`` (45-80 s) on every CPU backend init; marking that op
    incompatible makes it use plain gloo collectives. Nothing of this happens when CUDA is present."""
    if cuda_present():
        return False
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True
