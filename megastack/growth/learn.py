"""G_learn (LiGO-style learned growth operator, Wang et al. 2023), depth direction.

For every weight type k (attn_norm, qkv, proj, mlp_norm, fc1, fc2) a matrix D_k in R^{L2 x L1} maps the
small model's layers to the large model's: W'_{l,k} = sum_j D_k[l, j] W_{j,k}. D starts at the stacking
map of ``--factor``/``--layer-map`` (D[l, layer_map[l]] = 1), so step 0 IS G_stack; a short Adam run then
minimises the language-model loss of the grown model on the user's tokens (``--data``, ``--learn-tokens``).
Only D is trained; the small weights, embedding, final norm and output layer are fixed (copied).

Why it is written this way: the grown model is the plain-PyTorch reference (megastack/model/reference.py)
evaluated with ``torch.func.functional_call`` on weights computed from (D, small weights), so gradients
reach D through an ordinary forward. Launched on N ranks (torchrun, srun, mpirun) it is data parallel:
every rank draws the same seeded batch positions, computes the loss of its share, and the gradients of D
are all-reduced (gloo), so every rank holds the same D. The learned D then becomes a normal Plan
(``LinearCombination`` recipes) that the streaming executor writes like any other growth, each output
piece reading the same piece of every source layer of its weight type.

Width (``--dimension width|both``, LiGO's B matrices): every width axis gets a dense learnable expansion
matrix B (target size x source size), initialised at the G_direct map of megastack/growth/width.py (so
step 0 is exactly G_direct width, function preserving, followed by the stacking map): the residual
stream's B_write (embedding and output columns, proj/fc2 rows), B_read (qkv/fc1 columns), B_norm (block
norm weights) and B_final (final norm) are shared by all layers; each source layer j has its own B_qkv
(QKV rows, group layout), B_heads (proj columns), B_ffn_in (gate and up rows) and B_ffn_out (fc2
columns). A grown weight is W'_l = sum_j D[l, j] B_rows_j W_j B_cols_j^T, D and B trained together (B at
a hundredth of the learning rate: Adam moves every entry of a dense matrix by about lr per step, and at
a tenth B overfit 20k tokens: worse held-out loss than G_direct on unseen files). Each
output piece of a learned-width tensor reads whole source tensors (every source layer of its type) and
multiplies only the rows of B its positions need.

Memory: the learning step holds the small model and one grown model per rank (data parallel, no
TP/PP), so it suits models that fit one device; writing streams as usual.

Data (``--data``, repeatable): a Megatron indexed dataset prefix (PREFIX.bin/.idx, e.g. what
``megastack data`` writes; a directory holding ``corpus.bin/.idx`` is taken as that prefix), a ``.npy``
array of token ids, or text files / directories read as UTF-8 bytes (a byte tokenizer: token = byte,
needs vocab >= 256). Tokens are concatenated in the order given; the last windows are held out to
report the loss before (= stack) and after learning. Hook: once megastack/train/data.py's tokenizer can
encode user text for the model's vocabulary, plain text with a sentencepiece model belongs in
``load_tokens``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megastack import layout
from megastack.config import ModelConfig
from megastack.errors import UserError
from megastack.growth.layer_map import first_occurrences
from megastack.growth.spec import resolve_layer_map
from megastack.layout import Piece
from megastack.plan import AsWeight, Copy, Plan, Read

HELDOUT_WINDOWS = 8
WIDTH_LR_FACTOR = 0.01  # B's learning rate relative to D's (0.1 overfit the test corpus, see README)
TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".html", ".csv", ".yaml", ".yml"}


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LinearCombination:
    """target <- sum_j weights[j] * sources[j] (same shape): one row of a learned depth map D."""

    sources_: tuple[str, ...]
    weights: tuple[float, ...]
    stacked: str | None = None  # the source layer G_stack puts here: the map's starting point

    def for_state(self, state: str, weight: str) -> Any:
        """Adam's state under a learned map: the moments of the source layer the map started from (the stack's
        copy), since no moments describe the learned mixture's own history (its gradients were never taken)
        and the mixture stays near its start; the fp32 master copy mixed like the weight, from the masters."""
        if state == "fp32_param":
            masters = tuple(layout.state_name(state, name) for name in self.sources_)
            return AsWeight(LinearCombination(masters, self.weights), weight)
        if self.stacked is None:
            raise UserError(f"{weight}: a learned mixture without its starting layer; Adam's state cannot follow it")
        return Copy(layout.state_name(state, self.stacked))

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        acc = None
        for name, w in zip(self.sources_, self.weights):
            if w == 0.0:
                continue
            term = read(name, pieces).to(torch.float32) * w
            acc = term if acc is None else acc + term
        if acc is None:
            from megastack.layout import pieces_shape

            return torch.zeros(pieces_shape(shape, pieces), dtype=dtype)
        return acc.to(dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return [(name, pieces) for name, w in zip(self.sources_, self.weights) if w != 0.0]


def _mapping(source: ModelConfig, spec: Any) -> list[int]:
    if spec.dimension == "width":
        return list(range(source.num_layers))
    return resolve_layer_map(spec, source.num_layers)


def _wide(source: ModelConfig, spec: Any, layers: int) -> ModelConfig:
    """The target config: the width flags' shape (G_direct: the source's epsilon) at ``layers`` layers."""
    if spec.dimension == "depth":
        return replace(source, num_layers=layers, name=f"{source.name or 'model'}-grown{layers}L")
    from megastack.growth.width import width_target

    wide = width_target(source, spec.hidden, spec.ffn, spec.heads, spec.query_groups)
    return replace(wide, num_layers=layers, name=f"{source.name or 'model'}-grown{layers}L{wide.hidden_size}H")


def initial_maps(source: ModelConfig, spec: Any) -> dict[str, list[list[float]]]:
    """D at the stacking map of the spec's --factor/--layer-map (identity for width only), per weight type."""
    _check_spec(spec)
    mapping = _mapping(source, spec)
    d = [[1.0 if j == src else 0.0 for j in range(source.num_layers)] for src in mapping]
    return {kind: [row[:] for row in d] for kind in layout.LAYER_KINDS}


def initial_learned(source: ModelConfig, spec: Any) -> dict[str, Any]:
    """Every learned map at its initial value: D at stacking and, for width, B at G_direct."""
    out: dict[str, Any] = {"maps": initial_maps(source, spec)}
    if spec.dimension != "depth":
        out["width"] = initial_width(source, _wide(source, spec, source.num_layers))
    return out


def _direct_start(source: ModelConfig, target: ModelConfig, seed: int) -> Callable[[str, str], Any]:
    """(source name, target name) -> G_direct's width recipe: the learned width maps' starting point."""
    from megastack.growth.width import WidthMaps, width_recipe

    maps = WidthMaps(source, target, "direct")
    return lambda source_name, target_name: width_recipe(maps, source_name, target_name, seed, target.num_layers)


def _check_spec(spec: Any) -> None:
    if spec.noise:
        raise UserError("--noise does not combine with --operator learn (it would undo the learned maps); drop it")


def learned_plan(source: ModelConfig, spec: Any) -> Plan:
    """The plan for learned maps ``spec.learned`` ({"maps": {kind: D}, "report": {...}})."""
    _check_spec(spec)
    if spec.learned is None:
        raise UserError(
            "--operator learn learns its maps from data: give --data (token or text files) and "
            "optionally --learn-tokens"
        )
    mapping = _mapping(source, spec)
    maps = spec.learned["maps"]
    target = _wide(source, spec, len(mapping))
    width = spec.learned.get("width") if spec.dimension != "depth" else None
    if spec.dimension != "depth" and width is None:
        raise UserError("--dimension width/both with --operator learn needs learned width maps; give --data")
    start = _direct_start(source, target, spec.seed) if width is not None else None
    recipes: dict[str, Any] = {}
    for name in layout.logical_names(source):
        if layout.split_name(name)[0] is None:
            recipes[name] = (
                Copy(name) if start is None else LearnedWidth(name, (name,), (None,), (1.0,), width, start(name, name))
            )
    for kind in layout.LAYER_KINDS:
        d = maps[kind]
        if len(d) != len(mapping) or any(len(row) != source.num_layers for row in d):
            raise UserError(f"learned map for {kind} is not {len(mapping)} x {source.num_layers}")
        names = tuple(layout.layer_name(j, kind) for j in range(source.num_layers))
        for position, row in enumerate(d):
            weights = tuple(float(w) for w in row)
            target_name, stacked = layout.layer_name(position, kind), layout.layer_name(mapping[position], kind)
            recipes[target_name] = (
                LinearCombination(names, weights, stacked)
                if start is None
                else LearnedWidth(
                    kind, names, tuple(range(source.num_layers)), weights, width, start(stacked, target_name)
                )
            )
    new_layers = sorted(set(range(len(mapping))) - set(first_occurrences(mapping)))
    info: dict[str, Any] = {
        "operator": "learn",
        "dimension": spec.dimension,
        "factor": len(mapping) / source.num_layers,
        "layer_map": mapping,
        "new_layers": new_layers,
        "noise": 0.0,
        "seed": spec.seed,
        "learned_maps": maps,
        "learn": spec.learned.get("report", {}),
    }
    if width is not None:
        from megastack.growth.width import WidthMaps

        info["width"] = WidthMaps(source, target, "direct").info() | {"operator": "learn", "init": "direct"}
        info["learned_width"] = {name: {"shape": list(b.shape), "sha256": _digest(b)} for name, b in width.items()}
    return Plan(source, target, recipes, info)


# ----------------------------------------------------------------------------- learned width (LiGO's B)

# The expansion matrix on each kind's rows and columns. "hidden.*" are shared by all layers; the others
# are per source layer ("layers.{j}.qkv", ...). None: the dimension is not widened (vocab).
B_ROWS = {
    "embedding": None,
    "output": None,
    "final_norm": "hidden.final",
    "attn_norm": "hidden.norm",
    "mlp_norm": "hidden.norm",
    "qkv": "qkv",
    "proj": "hidden.write",
    "fc1": "ffn_in",
    "fc2": "hidden.write",
}
B_COLS = {
    "embedding": "hidden.write",
    "output": "hidden.write",
    "qkv": "hidden.read",
    "proj": "heads",
    "fc1": "hidden.read",
    "fc2": "ffn_out",
}
LAYER_AXES = ("qkv", "heads", "ffn_in", "ffn_out")


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def initial_width(source: ModelConfig, wide: ModelConfig) -> dict[str, torch.Tensor]:
    """Dense B matrices equal to the G_direct maps (B[i, index[i]] = scale[i])."""
    from megastack.growth.width import Axis, WidthMaps

    maps = WidthMaps(source, replace(wide, num_layers=source.num_layers), "direct")

    def dense(axis: Axis, size: int) -> torch.Tensor:
        b = torch.zeros(len(axis.index), size, dtype=torch.float64)
        b[torch.arange(len(axis.index)), axis.index] = axis.scale
        return b.to(torch.float32)

    h = source.hidden_size
    out = {f"hidden.{role}": dense(maps.hidden_axis(role), h) for role in ("write", "read", "norm", "final")}
    per_layer = {
        "qkv": dense(maps.qkv_axis(), source.qkv_rows),
        "heads": dense(maps.head_axis(), source.num_attention_heads * source.head_dim),
        "ffn_in": dense(Axis.make(maps.ffn), source.ffn_hidden_size),
        "ffn_out": dense(maps.ffn_axis("fanout"), source.ffn_hidden_size),
    }
    for j in range(source.num_layers):
        for axis in LAYER_AXES:
            out[f"layers.{j}.{axis}"] = per_layer[axis].clone()
    return out


def _b(width: dict[str, torch.Tensor], axis: str | None, layer: int | None) -> torch.Tensor | None:
    if axis is None:
        return None
    return width[axis] if axis.startswith("hidden.") else width[f"layers.{layer}.{axis}"]


def expand(
    kind: str,
    w: torch.Tensor,
    width: dict[str, torch.Tensor],
    layer: int | None,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """B_rows[rows] W B_cols[cols]^T for one source tensor (all rows/cols when None); differentiable."""
    r, c = _b(width, B_ROWS[kind], layer), _b(width, B_COLS.get(kind), layer)
    if r is None and rows is not None:  # vocab rows: select before widening
        w, rows = w[rows], None
    if c is not None:
        w = w @ (c if cols is None else c[cols]).T
    if kind == "fc1":  # [gate; up]: the same neuron expansion on both halves
        f2 = r.shape[0]
        rows = torch.arange(2 * f2) if rows is None else rows
        gate, up = w.chunk(2, dim=0)
        is_gate = (rows < f2)[:, None]
        sel = r[torch.where(rows < f2, rows, rows - f2)]
        return torch.where(is_gate, sel @ gate, sel @ up)
    if r is None:
        return w if rows is None else w[rows]
    return (r if rows is None else r[rows]) @ w


def _positions(size: int, pieces: list[Piece] | None, dim: int) -> torch.Tensor | None:
    if not pieces or pieces[0].dim != dim:
        return None
    return torch.cat([torch.arange(p.start, p.start + p.length) for p in pieces])


@dataclass(frozen=True, eq=False)
class LearnedWidth:
    """target <- sum_j weights[j] * B_rows_j W_j B_cols_j^T over the source tensors (learned width + depth)."""

    kind: str
    sources_: tuple[str, ...]
    layers: tuple[int | None, ...]
    weights: tuple[float, ...]
    width: dict[str, torch.Tensor]
    start: Any = None  # G_direct's copy of the stacked layer (a WidthCopy): where the learned maps started

    def for_state(self, state: str, weight: str) -> Any:
        """Adam's state under learned width maps, by the depth rule (LinearCombination.for_state): the moments
        of the maps' starting point, i.e. the stacked source layer's moments through G_direct's width maps
        (WidthCopy.for_state: x s and x s^2, zero where new); the fp32 master mixed like the weight."""
        if state == "fp32_param":
            masters = tuple(layout.state_name(state, name) for name in self.sources_)
            return AsWeight(replace(self, sources_=masters, start=None), weight)
        if self.start is None:
            raise UserError(f"{weight}: learned width maps without their starting point; Adam's state cannot follow")
        return self.start.for_state(state, weight)

    def produce(self, target: str, shape: tuple[int, ...], read: Read, pieces, dtype) -> torch.Tensor:
        pieces = list(pieces) if pieces else None
        rows, cols = _positions(shape[0], pieces, 0), _positions(shape[-1], pieces, 1)
        acc = None
        with torch.no_grad():
            for name, layer, w in zip(self.sources_, self.layers, self.weights):
                if w == 0.0:
                    continue
                term = expand(self.kind, read(name, None).to(torch.float32), self.width, layer, rows, cols) * w
                acc = term if acc is None else acc + term
        if acc is None:
            from megastack.layout import pieces_shape

            return torch.zeros(pieces_shape(shape, pieces), dtype=dtype)
        return acc.to(dtype)

    def sources(self, pieces) -> list[tuple[str, Any]]:
        return [(name, None) for name, w in zip(self.sources_, self.weights) if w != 0.0]


# ----------------------------------------------------------------------------- data


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def _indexed_prefix(path: Path) -> str | None:
    """The indexed-dataset prefix a --data path names, if it names one."""
    text = str(path)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix) and Path(text[: -len(suffix)] + ".idx").is_file():
            return text[: -len(suffix)]
    if Path(text + ".bin").is_file() and Path(text + ".idx").is_file():
        return text
    if path.is_dir() and (path / "corpus.bin").is_file() and (path / "corpus.idx").is_file():
        return str(path / "corpus")  # what 'megastack data' writes
    return None


def load_tokens(paths: list[str], vocab_size: int, limit: int) -> torch.Tensor:
    """At most ``limit`` tokens from the --data paths, concatenated in order, as int64."""
    import numpy as np

    parts: list[torch.Tensor] = []
    total = 0
    for raw in paths:
        if total >= limit:
            break
        path = Path(raw)
        prefix = _indexed_prefix(path)
        if prefix is not None:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            dataset = IndexedDataset(prefix, mmap=True)
            for i in range(len(dataset)):
                doc = torch.from_numpy(np.asarray(dataset[i], dtype=np.int64))
                parts.append(doc[: limit - total])
                total += len(parts[-1])
                if total >= limit:
                    break
            continue
        if not path.exists():
            raise UserError(
                f"--data {raw}: not found; give an indexed-dataset prefix, a .npy token file, or text files/directories"
            )
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r")
            if array.ndim != 1 or array.dtype.kind not in "iu":
                raise UserError(
                    f"--data {raw}: expected a 1-D integer array of token ids, got {array.dtype} {array.shape}"
                )
            parts.append(torch.from_numpy(np.asarray(array[: limit - total], dtype=np.int64)))
            total += len(parts[-1])
            continue
        if vocab_size < 256:
            raise UserError(
                f"--data {raw}: text is read as bytes (256 tokens) but the model's vocab is "
                f"{vocab_size}; give token ids (.npy or an indexed dataset) instead"
            )
        files = _text_files(path)
        if not files:
            raise UserError(f"--data {raw}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) found")
        for f in files:
            data = f.read_bytes()[: limit - total]
            parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64))
            total += len(parts[-1])
            if total >= limit:
                break
    tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise UserError(
            f"--data: token ids range {int(tokens.min())}..{int(tokens.max())} but the model's vocab "
            f"is {vocab_size}; use data tokenised for this model"
        )
    return tokens


# ----------------------------------------------------------------------------- learning


def _grown_state(
    maps: dict[str, torch.Tensor],
    stacks: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    target: ModelConfig,
    width: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Hugging Face-named weights of the grown model, a differentiable function of the maps D (and B)."""
    if width is None:
        logical = dict(fixed)
    else:
        logical = {name: expand(name, t, width, None) for name, t in fixed.items()}
    for kind, d in maps.items():
        layers = stacks[kind]
        if width is not None:
            layers = torch.stack([expand(kind, layers[j], width, j) for j in range(len(layers))])
        grown = torch.einsum("lj,j...->l...", d, layers)
        for position in range(target.num_layers):
            logical[layout.layer_name(position, kind)] = grown[position]
    return layout.hf_from_logical(logical, target)


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])


def _loss(model: torch.nn.Module, state: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call

    logits = functional_call(model, state, (batch[:, :-1],))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def learn_maps(reader: Any, spec: Any, data: list[str] | None, tokens: int, batch: int, lr: float, comm: Any) -> Any:
    """Optimise D on the LM loss; returns ``spec`` with ``learned`` set (the same on every rank)."""
    _check_spec(spec)
    if not data:
        raise UserError(
            "--operator learn learns its maps from data: give --data (an indexed-dataset prefix, "
            "a .npy of token ids, or text files read as bytes)"
        )
    if tokens <= 0:
        raise UserError(f"--learn-tokens must be positive, got {tokens}")
    if batch <= 0 or batch % comm.world:
        raise UserError(f"--learn-batch {batch} must be a positive multiple of the {comm.world} rank(s)")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"--learn-lr must be a positive number, got {lr}")
    source: ModelConfig = reader.cfg
    initial = initial_learned(source, spec)
    init = initial["maps"]
    target = _wide(source, spec, len(init["qkv"]))
    seq = source.seq_length
    steps = max(1, tokens // (batch * seq))
    need = steps * batch * seq * 2 + (HELDOUT_WINDOWS + 1) * (seq + 1)
    stream = load_tokens(data, source.vocab_size, need)
    heldout = min(HELDOUT_WINDOWS, max(1, len(stream) // (10 * (seq + 1))))
    train_len = len(stream) - heldout * (seq + 1)
    if train_len < seq + 1 + batch:
        raise UserError(
            f"--data holds {len(stream)} tokens; learning with sequences of {seq} needs at least "
            f"{(heldout + 2) * (seq + 1) + batch}; give more data"
        )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    small = {name: reader.read(name).to(device=device, dtype=torch.float32) for name in layout.logical_names(source)}
    fixed = {name: t for name, t in small.items() if layout.split_name(name)[0] is None}
    stacks = {
        kind: torch.stack([small[layout.layer_name(j, kind)] for j in range(source.num_layers)])
        for kind in layout.LAYER_KINDS
    }
    del small
    maps = {kind: torch.tensor(d, dtype=torch.float32, device=device, requires_grad=True) for kind, d in init.items()}
    width = (
        {name: b.to(device).requires_grad_(True) for name, b in initial["width"].items()}
        if "width" in initial
        else None
    )
    params = list(maps.values()) + (list(width.values()) if width else [])
    from megastack.model.reference import ReferenceLlama

    with torch.device("meta"):
        model = ReferenceLlama(target)
    model.eval()
    held = _windows(stream, torch.arange(heldout) * (seq + 1) + train_len, seq).to(device)

    def heldout_loss() -> float:
        with torch.no_grad():
            return float(_loss(model, _grown_state(maps, stacks, fixed, target, width), held))

    loss_stack = heldout_loss()
    groups = [{"params": list(maps.values()), "lr": lr}]
    if width:
        groups.append({"params": list(width.values()), "lr": lr * WIDTH_LR_FACTOR})
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(spec.seed)
    local = batch // comm.world
    losses: list[float] = []
    start = time.monotonic()
    for _ in range(steps):
        starts = torch.randint(0, train_len - seq, (batch,), generator=generator)
        mine = _windows(stream, starts[comm.rank * local : (comm.rank + 1) * local], seq).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, _grown_state(maps, stacks, fixed, target, width), mine)
        loss.backward()
        reported = loss.detach().float().cpu().reshape(1)
        if comm.world > 1:
            import torch.distributed as dist

            flat = torch.cat([m.grad.detach().cpu().reshape(-1) for m in params] + [reported])
            dist.all_reduce(flat)
            flat /= comm.world
            offset = 0
            for m in params:
                m.grad.copy_(flat[offset : offset + m.numel()].view_as(m.grad).to(device))
                offset += m.numel()
            reported = flat[-1:]
        optimizer.step()
        losses.append(float(reported))
    loss_learned = heldout_loss()
    report = {
        "tokens": steps * batch * seq,
        "steps": steps,
        "batch": batch,
        "seq_length": seq,
        "lr": lr,
        "ranks": comm.world,
        "data": [str(Path(p).resolve()) for p in data],
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "heldout_windows": heldout,
        "heldout_loss_stack": loss_stack,
        "heldout_loss_learned": loss_learned,
        "seconds": round(time.monotonic() - start, 3),
    }
    learned = {kind: [[float(w) for w in row] for row in m.detach().cpu().tolist()] for kind, m in maps.items()}
    out: dict[str, Any] = {"maps": learned, "report": report}
    if width:
        out["width"] = {name: b.detach().cpu() for name, b in width.items()}
    return replace(spec, learned=out)
