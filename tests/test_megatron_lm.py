"""Checkpoints that Megatron-LM itself wrote (core_v0.16.1; tests/fixtures/megatron_lm/, made by its
``save_checkpoint`` after two training steps and by its HF -> Megatron converter at TP2 PP2): inspected,
exported to HF (logits against Megatron-LM's own forward), grown (against the in-memory stack), their args
carried with only the changed fields changed, and a malicious pickle in every place an object may sit
refused by name. Megatron-LM's own load of the grown outputs is recorded in docs/checkpoints.md (it needs
Megatron-LM's source, which CI does not have).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from megastack import layout
from megastack.ckpt.convert import convert
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.inspect import inspect_checkpoint
from megastack.ckpt.legacy import rank_dir
from megastack.ckpt.manifest import resolve_iteration_dir
from megastack.ckpt.safe_load import load_pt, save_pt

from conftest import assert_one_line_error, in_process, run_cli, run_workers

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "megatron_lm"
TRAINING_SAVES = ("legacy", "legacy_distopt", "torch_dist", "torch_dist_distopt", "torch_dist_distopt_fr")
ALL = (*TRAINING_SAVES, "legacy_tp2pp2")
transformers = pytest.importorskip("transformers")


def saved_args(ckpt: Path):
    directory = resolve_iteration_dir(ckpt)
    if (directory / "common.pt").is_file():
        return load_pt(directory / "common.pt")["args"]
    rank0 = sorted(p for p in directory.iterdir() if p.name.startswith("mp_rank_"))[0]
    return load_pt(rank0 / "model_optim_rng.pt", mmap=True)["args"]


def changed_fields(before, after) -> set[str]:
    names = set(vars(before)) | set(vars(after))
    return {n for n in names if getattr(before, n, None) != getattr(after, n, None)}


@pytest.mark.parametrize("name", ALL)
def test_inspect_reads_what_megatron_lm_wrote(name):
    info = inspect_checkpoint(FIXTURES / name)
    m = info["model"]
    assert (
        m["num_layers"],
        m["hidden_size"],
        m["num_attention_heads"],
        m["num_query_groups"],
        m["ffn_hidden_size"],
        m["vocab_size"],
        m["tie_embeddings"],
    ) == (4, 32, 4, 2, 64, 128, False)
    # Megatron-LM 0.16 names the epsilon layernorm_epsilon; the training saves hold the model's 1e-6. Its
    # own HF converter stores it under the pre-0.16 name that 0.16 no longer reads, so that file says 1e-5.
    assert m["norm_epsilon"] == (1e-5 if name == "legacy_tp2pp2" else 1e-6)
    mlm = info["megatron"]
    assert mlm["args"] and mlm["epsilon_field"] == "layernorm_epsilon" and mlm["transformer_impl"] == "local"
    assert mlm["checkpoint_version"] == 3.0
    if name in TRAINING_SAVES:
        assert info["iteration"] == 2 and mlm["rng_state"] and "optimizer" in mlm["not_carried"]
        assert mlm["tokenizer_type"] == "HuggingFaceTokenizer"
        kind = {
            "legacy": "Megatron optimizer",
            "legacy_distopt": "distrib_optim.pt",
            "torch_dist": "sharded",
            "torch_dist_distopt": "dp_reshardable",
            "torch_dist_distopt_fr": "fully_reshardable",
        }[name]
        assert kind in mlm["optimizer"]
    else:
        assert info["layout"] == {"tp": 2, "pp": 2} and mlm["optimizer"] is None and not mlm["rng_state"]


def test_inspect_cli_names_what_it_will_not_carry():
    proc = run_cli("inspect", str(FIXTURES / "legacy_distopt"))
    assert proc.returncode == 0, proc.stderr
    assert "layernorm_epsilon field" in proc.stdout and "distrib_optim.pt" in proc.stdout
    assert "not carried by grow/convert: optimizer, opt_param_scheduler, rng_state" in proc.stdout
    assert "--no-load-optim --no-load-rng" in proc.stdout
    assert "except by grow --carry-optimizer --to torch_dist" in proc.stdout


@pytest.mark.parametrize("name", TRAINING_SAVES)
def test_hf_export_matches_megatron_lms_own_forward(name, tmp_path):
    ref = torch.load(FIXTURES / f"{name}.ref.pt", weights_only=True)
    convert(FIXTURES / name, tmp_path / "hf", "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert model.config.rms_norm_eps == 1e-6
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    assert (logits - ref["logits"]).abs().max().item() <= 1e-5


def test_tp2pp2_conversion_holds_the_hf_weights(tmp_path):
    """Megatron-LM's converter output (TP2 PP2, local names, per-stage layer numbers) reads back as the
    HF model it was made from, tensor for tensor."""
    from safetensors.torch import load_file

    reader = open_checkpoint(FIXTURES / "legacy_tp2pp2")
    hf = layout.logical_from_hf(load_file(FIXTURES / "hf_tiny" / "model.safetensors"), reader.cfg)
    for name in layout.logical_names(reader.cfg):
        assert torch.equal(reader.read(name), hf[name]), name


def grown_pairs(src: Path, dst: Path):
    a, b = open_checkpoint(src), open_checkpoint(dst)
    assert b.cfg.num_layers == 2 * a.cfg.num_layers
    for name in layout.logical_names(b.cfg):
        layer, kind = layout.split_name(name)
        source = name if layer is None else layout.layer_name(layer % a.cfg.num_layers, kind)
        yield name, a.read(source), b.read(name)


@pytest.mark.parametrize("name", ALL)
def test_grow_keeps_megatron_args_and_stacks(name, tmp_path):
    dst = tmp_path / "grown"
    proc = in_process("grow", str(FIXTURES / name), str(dst), "--factor", "2")
    assert proc.returncode == 0, proc.stderr
    for tensor_name, want, got in grown_pairs(FIXTURES / name, dst):  # G_stack: layer i <- layer i mod L
        assert torch.equal(want, got), tensor_name
    before, after = saved_args(FIXTURES / name), saved_args(dst)
    # Only what growth changes: the depth, a new stage's counters, the epsilon under both names.
    allowed = {
        "num_layers",
        "iteration",
        "consumed_train_samples",
        "consumed_valid_samples",
        "skipped_train_samples",
        "norm_epsilon",
        "layernorm_epsilon",
    }
    assert changed_fields(before, after) <= allowed, changed_fields(before, after) - allowed
    assert after.num_layers == 8 and after.iteration == 0 and after.consumed_train_samples == 0
    assert after.layernorm_epsilon == after.norm_epsilon == before.layernorm_epsilon
    for kept in (
        "tokenizer_type",
        "tokenizer_model",
        "make_vocab_size_divisible_by",
        "transformer_impl",
        "hidden_dropout",
        "attention_dropout",
        "model_type",
        "attention_backend",
        "exit_signal",
    ):
        assert getattr(after, kept) == getattr(before, kept), kept
    directory = resolve_iteration_dir(dst)
    if name.startswith("torch_dist"):  # what Megatron-LM's load_checkpoint needs to resume without --finetune
        common = load_pt(directory / "common.pt")
        assert common["iteration"] == 0 and common["checkpoint_version"] == 3.0
        assert not any(k.startswith("optimizer") for k in common)
    else:  # the source's naming (local spec), every rank, every stage
        for f in directory.glob("mp_rank_*/model_optim_rng.pt"):
            blob = load_pt(f)
            assert set(blob) == {"model", "args", "checkpoint_version", "iteration"}
            norms = [k for k in blob["model"] if "layernorm" in k or "layer_norm" in k]
            assert norms and all(
                "input_layernorm" in k or "pre_mlp_layernorm" in k or "final_layernorm" in k for k in norms
            ), norms


def pickled_globals(path: Path) -> set[str]:
    """Every class or function a torch file's pickle names (what an unpickler would import)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return found


def test_grown_args_pickle_as_megatron_classes(tmp_path):
    """The stand-ins in the output's args are written under Megatron-LM's own class names (what its
    safe-globals list admits), never as megastack's classes."""
    in_process("grow", str(FIXTURES / "torch_dist"), str(tmp_path / "g"), "--factor", "2")
    names = pickled_globals(resolve_iteration_dir(tmp_path / "g") / "common.pt")
    assert {
        "megatron.core.enums.ModelType",
        "megatron.core.transformer.enums.AttnBackend",
        "signal.Signals",
        "argparse.Namespace",
    } <= names
    assert not any(n.startswith("megastack") for n in names), names


def test_convert_reshards_with_args_and_norm_names(tmp_path):
    dst = tmp_path / "tp2"
    assert (
        in_process(
            "convert", str(FIXTURES / "legacy"), str(dst), "--to", "legacy", "--tp", "2", "--norm-names", "te"
        ).returncode
        == 0
    )
    args = saved_args(dst)
    assert changed_fields(saved_args(FIXTURES / "legacy"), args) <= {
        "tensor_model_parallel_size",
        "transformer_impl",
        "norm_epsilon",
    }
    assert args.tensor_model_parallel_size == 2 and args.transformer_impl == "transformer_engine"
    assert args.iteration == 2  # a conversion is the same run: its counters are kept
    model = load_pt(resolve_iteration_dir(dst) / "mp_rank_01" / "model_optim_rng.pt")["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    # and back to the local names, read by megastack either way
    back = tmp_path / "tp1"
    assert (
        in_process("convert", str(dst), str(back), "--to", "legacy", "--tp", "1", "--norm-names", "local").returncode
        == 0
    )
    for name in layout.logical_names(open_checkpoint(back).cfg):
        assert torch.equal(open_checkpoint(back).read(name), open_checkpoint(FIXTURES / "legacy").read(name))


def test_hf_to_megatron_writes_args_pretrain_gpt_accepts(tmp_path):
    proc = in_process("convert", str(FIXTURES / "hf_tiny"), str(tmp_path / "td"), "--to", "torch_dist")
    assert proc.returncode == 0, proc.stderr
    common = load_pt(resolve_iteration_dir(tmp_path / "td") / "common.pt")
    args = common["args"]
    assert common["iteration"] == 0 and args.layernorm_epsilon == args.norm_epsilon == 1e-6
    assert (args.normalization, args.swiglu, args.position_embedding_type, args.add_bias_linear) == (
        "RMSNorm",
        True,
        "rope",
        False,
    )
    assert args.num_query_groups == 2 and args.group_query_attention and args.untie_embeddings_and_output_weights
    assert args.tokenizer_type == "HuggingFaceTokenizer" and Path(args.tokenizer_model) == (FIXTURES / "hf_tiny")


class Planted:
    """A pickle that would create a file if it ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, where: str, marker: Path) -> None:
    """Rewrite a Megatron-LM file with a code-running object at ``where``, everything else as it was."""
    blob = load_pt(path)
    if where == "args":
        blob["args"].exit_signal = Planted(marker)
    elif where == "rng_state":
        blob["rng_state"][0]["np_rng_state"] = Planted(marker)
    elif where == "optimizer":
        blob["optimizer"]["param_groups"][0]["default_config"] = Planted(marker)
    elif where == "opt_param_scheduler":
        blob["opt_param_scheduler"]["lr_decay_style"] = Planted(marker)
    else:
        blob[where] = Planted(marker)
    save_pt(blob, path)  # Megatron's objects under their own names, the planted one as os.system


@pytest.mark.parametrize(
    "name,where",
    [
        ("legacy", "args"),
        ("legacy", "rng_state"),
        ("legacy", "optimizer"),
        ("legacy", "opt_param_scheduler"),
        ("legacy", "rerun_state_machine"),
        ("torch_dist", "args"),
        ("torch_dist", "optimizer"),
        ("torch_dist", "opt_param_scheduler"),
        ("torch_dist", "content_metadata"),
    ],
)
def test_planted_pickle_is_refused_by_name(name, where, tmp_path):
    src = tmp_path / name
    shutil.copytree(FIXTURES / name, src)
    directory = resolve_iteration_dir(src)
    target = directory / ("common.pt" if name == "torch_dist" else "mp_rank_00/model_optim_rng.pt")
    marker = tmp_path / "ran"
    plant(target, where, marker)
    before = target.read_bytes()
    for argv in (
        ["inspect", str(src)],
        ["grow", str(src), str(tmp_path / "out"), "--factor", "2"],
        ["convert", str(src), str(tmp_path / "hf"), "--to", "hf"],
    ):
        proc = in_process(*argv)
        assert_one_line_error(proc, "refused to load", f"global '{os.system.__module__}.system'", target.name)
        assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()
    assert target.read_bytes() == before


def test_unknown_megatron_class_is_refused_by_name(tmp_path):
    """A class megastack does not know (here a real, harmless one) is refused, named, not imported."""
    import datetime

    src = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "legacy", src)
    target = resolve_iteration_dir(src) / "mp_rank_00" / "model_optim_rng.pt"
    blob = load_pt(target)
    blob["args"].odd = datetime.timedelta(days=1)
    save_pt(blob, target)
    assert_one_line_error(in_process("inspect", str(src)), "global 'datetime.timedelta'", str(target))


def test_docs_table_lists_every_args_field():
    from megastack.ckpt.megatron_args import FIELDS

    docs = (Path(__file__).resolve().parent.parent / "docs" / "checkpoints.md").read_text()
    for field, spec in FIELDS.items():
        row = f"| `{field}` | {', '.join(f'`{n}`' for n in spec.names)} | {spec.kind.__name__} |"
        assert row in docs, row


def split_into_stages(src: Path, dst: Path, pp: int = 2) -> None:
    """The legacy training save cut into PP stages as Megatron-LM's save_checkpoint writes them with
    --pipeline-model-parallel-size: every stage's file has the same keys (args, optimizer, scheduler, rng),
    its own layers numbered from 0, the embedding on the first stage, the final norm and output layer on
    the last."""
    iteration = (src / "latest_checkpointed_iteration.txt").read_text().strip()
    blob = load_pt(resolve_iteration_dir(src) / "mp_rank_00" / "model_optim_rng.pt")
    layers = blob["args"].num_layers
    per = layers // pp
    blob["args"].pipeline_model_parallel_size = pp
    for stage in range(pp):
        model = {}
        for key, value in blob["model"].items():
            parts = key.split(".")
            if key.startswith("decoder.layers."):
                layer = int(parts[2])
                if layer // per == stage:
                    model[".".join([*parts[:2], str(layer - stage * per), *parts[3:]])] = value
            elif key.startswith("embedding.") and stage == 0 or not key.startswith("embedding.") and stage == pp - 1:
                model[key] = value
        out = dst / f"iter_{int(iteration):07d}" / f"mp_rank_00_{stage:03d}" / "model_optim_rng.pt"
        out.parent.mkdir(parents=True)
        save_pt({**blob, "model": model}, out)
    (dst / "latest_checkpointed_iteration.txt").write_text(iteration)


def test_pipeline_stages_of_a_training_save(tmp_path):
    src = tmp_path / "pp2"
    split_into_stages(FIXTURES / "legacy", src)
    info = inspect_checkpoint(src)
    assert info["layout"] == {"tp": 1, "pp": 2} and info["model"]["norm_epsilon"] == 1e-6
    ref = torch.load(FIXTURES / "legacy.ref.pt", weights_only=True)
    convert(src, tmp_path / "hf", "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(ref["tokens"]).logits - ref["logits"]).abs().max().item() <= 1e-5
    assert in_process("grow", str(src), str(tmp_path / "g"), "--factor", "2").returncode == 0
    for tensor_name, want, got in grown_pairs(src, tmp_path / "g"):
        assert torch.equal(want, got), tensor_name
    after = saved_args(tmp_path / "g")
    assert after.pipeline_model_parallel_size == 2 and after.num_layers == 8 and after.transformer_impl == "local"


def test_fresh_args_agree_with_megatron_lms_own_save():
    """The args megastack writes for a source without them (HF, its own files) hold, field for field, what
    Megatron-LM's own save of the same Llama holds (its loader compares some of them with its defaults)."""
    from megastack.ckpt.megatron_args import output_args

    real = saved_args(FIXTURES / "legacy")
    cfg = open_checkpoint(FIXTURES / "legacy").cfg
    fresh = output_args(None, cfg, 1, 1, torch.float32, iteration=2, new_stage=False, te_names=False)
    # the run's own choice (its tokenizer) may differ; the pre-0.16 epsilon name and apply_layernorm_1p are extra
    differ = {n for n in vars(fresh) if n in vars(real) and getattr(fresh, n) != getattr(real, n)}
    assert differ <= {"tokenizer_type"}, {n: (getattr(fresh, n), getattr(real, n)) for n in differ}
    missing = {n for n in vars(fresh) if n not in vars(real)}
    assert missing <= {"norm_epsilon", "apply_layernorm_1p"}, missing


def test_convert_keeps_a_torch_dist_saves_iteration(tmp_path):
    assert in_process("convert", str(FIXTURES / "torch_dist"), str(tmp_path / "l"), "--to", "legacy").returncode == 0
    assert (tmp_path / "l" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert saved_args(tmp_path / "l").iteration == 2


# ----------------------------------------------------------------------------- Adam's state (--carry-optimizer)

CARRIED_SAVES = TRAINING_SAVES  # plain and distributed optimizer; torch_dist dp_reshardable and fully_reshardable


def dcp_tensors(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every DCP entry under ``prefix``, read by torch.distributed.checkpoint's own loader."""
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(str(directory))
    entries = reader.read_metadata().state_dict_metadata
    out = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in entries.items()
        if key.startswith(prefix) and hasattr(md, "size")
    }
    load(out, storage_reader=reader, no_dist=True)
    return out


def dcp_tensor_keys(ckpt: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    entries = FileSystemReader(str(resolve_iteration_dir(ckpt))).read_metadata().state_dict_metadata
    return {key for key, md in entries.items() if hasattr(md, "size")}


PARALLEL_SAVES = [  # Megatron-LM's same 2 steps on 2 and 4 gloo ranks (mlm_train_save.py --tp/--pp; DP = the rest)
    *(f"{layout}/{n}" for layout in ("tp2", "pp2") for n in CARRIED_SAVES),
    "tp2pp2/legacy_distopt",
    "tp2pp2/torch_dist_distopt",
    "dp2/legacy_distopt",  # the distributed optimizer sharded over 2 data-parallel ranks
    "dp2/torch_dist_distopt",
    "dp2/legacy_distopt_buckets",  # the same with --overlap-grad-reduce: 9 DDP buckets (legacy: concatenated)
    "dp2/torch_dist_distopt_buckets",
]
TIED_SAVES = [  # tied embeddings, one rank and PP2 (the last stage's output layer is the embedding's copy)
    "tied/legacy",
    *(f"tied/pp2/{n}" for n in ("legacy", "legacy_distopt", "torch_dist", "torch_dist_distopt")),
]
MOE_SAVES = ["moe/legacy", "moe/torch_dist"]  # 4 experts, top 2, one rank (EP 1), the plain optimizer
# megatron-core's local spec saves a MoE layer's norm under the dense fused name, its TE spec under its own
MOE_NORM_KEYS = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")


FP16_SAVES = ["fp16/legacy", "fp16/torch_dist", "fp16/torch_dist_distopt"]  # with Megatron's loss scaler
FP16_SCALER = {"scale": torch.tensor([1024.0]), "growth_tracker": 2, "hysteresis_tracker": 2}  # after its 2 steps


def megatron_stacked(reference: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Megatron-LM's own torch_dist save's entries under ``prefix``, each weight's name to its tensor, stacked
    by hand as G_stack x2 of its 4 layers (layer i <- i mod 4)."""
    entries = dcp_tensors(resolve_iteration_dir(reference), prefix)
    return {key: torch.cat([t, t]) if ".decoder.layers." in "." + key else t for key, t in entries.items()}


@pytest.mark.parametrize(
    "name",
    [*CARRIED_SAVES, *(f"bf16/{n}" for n in CARRIED_SAVES), *PARALLEL_SAVES, *FP16_SAVES, *TIED_SAVES, *MOE_SAVES],
)
def test_megatron_lms_adam_state_grows_with_the_weights(name, tmp_path):
    """Megatron-LM's moments (legacy: by parameter index; the distributed optimizer's flat buffers, legacy and
    torch_dist; torch_dist: named entries) through G_stack x2. The reference is Megatron-LM's own torch_dist
    save, which names each moment by its weight, stacked by hand along the layer axis; the saves of a layout come
    from the same 2 steps, so the mapping of indices and buffer offsets onto weights must reproduce it
    exactly. In bf16 (Megatron's mixed-precision optimizer) the fp32 master copies come along the same way
    (legacy fp32_from_fp16_params, the distributed optimizer's param buffer, torch_dist fp32_param). Under TP2,
    PP2 and TP2 x PP2 (the same run on 2 and 4 ranks) each rank's shards (rank files with their own param
    groups, per-rank buffers) merge into the weight; the reference is that layout's own torch_dist save. In
    fp16 the masters come as in bf16 and the loss scaler (scale 1024, trackers) carries into common.pt as
    Megatron-LM's own save holds it (its load resumes at that scale: docs/checkpoints.md).
    The output is written for the optimizer the source was trained with: the plain optimizer's entries and
    common.pt as its torch_dist save writes them; from the distributed optimizer (any of its three saves), its
    fully_reshardable format, common.pt equal to Megatron-LM's own fully_reshardable save of the same run."""
    dst = tmp_path / "grown"
    mixed = name.startswith(("bf16/", "fp16/"))  # mixed precision: fp32 master copies beside the moments
    distributed = "distopt" in name
    family = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    reference = FIXTURES / f"{family}torch_dist"
    proc = in_process(
        "grow", str(FIXTURES / name), str(dst), "--factor", "2", "--carry-optimizer", "--to", "torch_dist"
    )
    assert proc.returncode == 0, proc.stderr
    want = megatron_stacked(reference, "optimizer.state.")
    if distributed:  # the master is 'param'; in fp32 training it is the weight itself
        weights = megatron_stacked(reference, "")
        masters = {k: v for k, v in want.items() if ".fp32_param." in k}
        want = {k: v for k, v in want.items() if k not in masters}
        if mixed:
            want |= {k.replace(".fp32_param.", ".param."): v for k, v in masters.items()}
        else:
            want |= {
                f"optimizer.state.param.{k}": w for k, w in weights.items() if f"optimizer.state.exp_avg.{k}" in want
            }
    got = dcp_tensors(resolve_iteration_dir(dst), "optimizer.state.")
    # 6 per layer (MoE: norms, attention, router, experts' fc1 and fc2), embedding, final norm, output layer
    n_weights = {"tied/": 8, "moe/": 10}.get(name.split("/")[0] + "/", 9)
    assert set(got) == set(want) and len(want) == (3 if mixed or distributed else 2) * n_weights
    for key, expected in want.items():
        assert torch.equal(got[key], expected), key
    manifest = json.loads((resolve_iteration_dir(dst) / "megastack.json").read_text())
    states = ["fp32_param", "exp_avg", "exp_avg_sq"] if mixed else ["exp_avg", "exp_avg_sq"]
    assert manifest["optimizer"] == {"step": 2, "states": states}
    # what Megatron-LM's load_checkpoint needs beside them to resume WITH the optimizer: its param groups
    # (as its own torch_dist save writes them: no 'params', no 'step'), Adam's step, the scheduler (a new stage)
    common = load_pt(resolve_iteration_dir(dst) / "common.pt")
    own = load_pt(resolve_iteration_dir(reference) / "common.pt")
    assert common["opt_param_scheduler"] == {**own["opt_param_scheduler"], "num_steps": 0}
    assert common["iteration"] == 0
    want_scaler = FP16_SCALER
    if distributed:  # as Megatron-LM's own fully_reshardable save writes it: Adam's step in the param groups
        fully = load_pt(
            resolve_iteration_dir(FIXTURES / f"{'bf16/' if mixed else ''}torch_dist_distopt_fr") / "common.pt"
        )
        assert common["content_metadata"] == fully["content_metadata"]
        scaler = common["optimizer"].pop("grad_scaler", None)
        assert scaler == (want_scaler if name.startswith("fp16/") else None)
        groups = (own["optimizer"]["optimizer"] if mixed else own["optimizer"])["param_groups"]
        sharding = fully["optimizer"]["param_state_sharding_type"]
        want_groups = [g | {"step": 2.0} for g in groups]  # the layout's own groups (dp2's LR differs)
        assert common["optimizer"] == {
            "optimizer": {"param_groups": want_groups},
            "param_state_sharding_type": sharding,
        }
        if family in ("", "bf16/"):  # the same run's fully_reshardable save, whole
            assert common["optimizer"] == fully["optimizer"]
        return
    if mixed:  # the mixed-precision optimizer nests torch's state one level down, as its own save does
        scaler = {"grad_scaler"} if name.startswith("fp16/") else set()
        assert set(common["optimizer"]) == set(own["optimizer"]) == {"optimizer", *scaler}
        if scaler:
            assert common["optimizer"]["grad_scaler"] == own["optimizer"]["grad_scaler"] == want_scaler
        common["optimizer"], own["optimizer"] = common["optimizer"]["optimizer"], own["optimizer"]["optimizer"]
    assert common["optimizer"]["param_groups"] == own["optimizer"]["param_groups"]
    assert common["optimizer"]["state"] == {"common_step": torch.tensor(2.0)}


def rank_file_moments(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """A legacy rank file's Adam state by model key, paired as torch's Optimizer.load_state_dict pairs it with
    Megatron's parameters: group by group (weight-decayed: the matrices; wd_mult 0: the 1-D norms), each
    group's parameters in the file's module order; and its param groups without their parameter lists."""
    blob = load_pt(path)
    model = {k: v for k, v in blob["model"].items() if isinstance(v, torch.Tensor)}
    optimizer = blob["optimizer"]
    inner = optimizer.get("optimizer", optimizer)
    masters = optimizer.get("fp32_from_fp16_params")  # bf16/fp16: one list per group
    out = {}
    for g, group in enumerate(inner["param_groups"]):
        members = [k for k in model if (model[k].dim() == 1) == (group["wd_mult"] == 0.0)]
        assert len(members) == len(group["params"]), path
        for i, (key, index) in enumerate(zip(members, group["params"])):
            out[key] = dict(inner["state"][index]) | ({"master": masters[g][i]} if masters else {})
    return out, [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]


@pytest.mark.parametrize("name", MOE_SAVES)
@pytest.mark.parametrize("norm_names", [None, "te", "local"])
def test_moe_norm_key_follows_the_run_that_resumes(name, norm_names, tmp_path):
    """Megatron-LM's local spec (these saves: --transformer-impl local) stores a MoE layer's norm under the
    dense fused name, its TE spec under pre_mlp_layernorm: torch_dist output keeps the source run's (so the run
    finds every weight and moment where its own save put them) unless --norm-names asks for the other; either
    way it reads back as the same tensors."""
    dst = tmp_path / "grown"
    flags = ["--norm-names", norm_names] if norm_names else []
    proc = in_process("grow", str(FIXTURES / name), str(dst), "--factor", "2", "--to", "torch_dist", *flags)
    assert proc.returncode == 0, proc.stderr
    own = {k for k in dcp_tensor_keys(FIXTURES / "moe" / "torch_dist") if not k.startswith("optimizer.")}
    got = dcp_tensor_keys(dst)  # Megatron-LM's own save of the run, and the output: the weights' keys
    local, te = (f"decoder.layers.{k}" for k in MOE_NORM_KEYS)
    assert local in own and te not in own
    assert got == (own if norm_names != "te" else {k.replace(local, te) for k in own})
    assert saved_args(dst).transformer_impl == ("transformer_engine" if norm_names == "te" else "local")
    grown, source = open_checkpoint(dst), open_checkpoint(FIXTURES / name)
    for layer in range(8):
        norm = layout.layer_name(layer, "mlp_norm")
        assert torch.equal(grown.read(norm), source.read(layout.layer_name(layer % 4, "mlp_norm")))


def test_norm_names_of_a_dense_torch_dist_output_is_refused(tmp_path):
    proc = in_process("grow", str(FIXTURES / "torch_dist"), str(tmp_path / "o"), "--factor", "2", "--norm-names", "te")
    assert_one_line_error(proc, "--norm-names applies to legacy output and to a mixture of experts in torch_dist")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "name, flags",
    [
        ("tp2/legacy", []),
        ("pp2/legacy", []),
        ("tp2/torch_dist", ["--to", "legacy", "--tp", "2"]),
        ("tied/pp2/legacy", []),  # the last stage's output layer: the embedding's copy, last in its file
        ("tied/pp2/torch_dist", ["--to", "legacy", "--pp", "2"]),
        ("moe/legacy", []),  # router and each expert's fc1, fc2 after the layer's norm, in module order
    ],
)
def test_legacy_output_holds_each_ranks_moments(name, flags, tmp_path):
    """grow --carry-optimizer into legacy rank files under TP2 and PP2: every output file's optimizer, read as
    Megatron-LM's load pairs it with the parameters, holds for each of its weights the moments that the same
    layout's own legacy training save (Megatron-LM's tp2/legacy, pp2/legacy) holds for the weight G_stack copies
    (layer L <- L mod 4, on whichever stage and in whichever file that is), with that file's param groups, a
    step tensor of its own per parameter and the scheduler at a new stage's step 0. From tp2/torch_dist the
    reference is the same run's legacy save; with tied embeddings the last stage's output layer (the
    embedding's copy) is numbered last, as in Megatron-LM's own file."""
    dst = tmp_path / "grown"
    proc = in_process("grow", str(FIXTURES / name), str(dst), "--factor", "2", "--carry-optimizer", *flags)
    assert proc.returncode == 0, proc.stderr
    tp, pp = (2, 1) if name.startswith("tp2/") else (1, 2) if "pp2/" in name else (1, 1)
    source = resolve_iteration_dir(FIXTURES / name.rsplit("/", 1)[0] / "legacy")
    grown = resolve_iteration_dir(dst)
    compared = 0
    for r in range(tp):
        for stage in range(pp):
            held, groups = rank_file_moments(grown / rank_dir(r, stage, pp) / "model_optim_rng.pt")
            per_stage = 8 // pp
            for key, state in held.items():
                parts = key.split(".")
                src_stage = pp - 1 if stage == pp - 1 and parts[0] != "embedding" else 0
                if parts[:2] == ["decoder", "layers"]:  # the layer it copies, on its own stage in the source
                    copied = (stage * per_stage + int(parts[2])) % 4
                    src_stage, parts[2] = copied // (4 // pp), str(copied % (4 // pp))
                want, want_groups = rank_file_moments(source / rank_dir(r, src_stage, pp) / "model_optim_rng.pt")
                assert groups == want_groups, key
                assert set(state) == set(want[".".join(parts)]) == {"step", "exp_avg", "exp_avg_sq"}, key
                for field, tensor in want[".".join(parts)].items():
                    assert torch.equal(state[field], tensor), (r, stage, key, field)
                compared += 1
            blob = load_pt(grown / rank_dir(r, stage, pp) / "model_optim_rng.pt")
            inner = blob["optimizer"]["state"]
            assert len({t["step"].data_ptr() for t in inner.values()}) == len(inner)  # stepped in place, each its own
            assert blob["opt_param_scheduler"]["num_steps"] == 0
    per_layer = 4 + 1 + 2 * 4 if name.startswith("moe/") else 6  # MoE: norms, attention, router, 4 experts
    assert compared == (8 * per_layer + 3) * tp  # every weight of every file (TP: each rank its shard)


@pytest.mark.parametrize(
    "name, flags",
    [
        ("tp2/legacy_distopt", []),
        ("pp2/legacy_distopt", []),  # the second stage: one DDP bucket whatever the args say
        ("tp2pp2/legacy_distopt", []),
        ("tied/pp2/legacy_distopt", []),  # each stage's copy of the tied embedding in a bucket of its own
        ("tp2/torch_dist_distopt", ["--to", "legacy", "--tp", "2"]),  # the order the buckets proved
    ],
)
def test_legacy_distributed_output_holds_each_ranks_buffer(name, flags, tmp_path):
    """grow --carry-optimizer of a distributed-optimizer source into legacy rank files under TP2, PP2 and
    tied PP2: every rank directory gets Megatron-LM's pair (the rank file's param groups with Adam's step and
    no state, distrib_optim.pt beside it), and each rank's flat buffer, read back the way megastack reads
    Megatron-LM's own legacy saves (the buffer's master weights must sit at each weight's offset, or the read
    is refused), holds for every weight the source's state of the layer G_stack copies; megatron-core's own
    DistributedOptimizer loads the one-rank outputs (``test_megatron_cores_own_optimizer_resumes_...``)."""
    dst = tmp_path / "grown"
    proc = in_process("grow", str(FIXTURES / name), str(dst), "--factor", "2", "--carry-optimizer", *flags)
    assert proc.returncode == 0, proc.stderr
    source, grown = open_checkpoint(FIXTURES / name), open_checkpoint(dst)
    tp, pp = grown.tp, grown.pp
    assert (tp, pp) == (source.tp if not flags else 2, getattr(source, "pp", 1))
    groups = source.megatron_resume_state(2)["optimizer"]["optimizer"]["param_groups"]
    for r in range(tp):
        for stage in range(pp):
            directory = resolve_iteration_dir(dst) / rank_dir(r, stage, pp)
            assert (directory / "distrib_optim.pt").is_file()
            assert load_pt(directory / "model_optim_rng.pt")["optimizer"] == {"optimizer": {"param_groups": groups}}
    assert grown.optimizer_states() == source.optimizer_states() and grown.optimizer_step() == 2
    compared = 0
    for weight in layout.logical_names(grown.cfg):
        layer, kind = layout.split_name(weight)
        copied = weight if layer is None else layout.layer_name(layer % 4, kind)
        for state in grown.optimizer_states():
            got = grown.read(layout.state_name(state, weight))
            assert torch.equal(got, source.read(layout.state_name(state, copied))), (weight, state)
            compared += 1
    assert compared == 2 * (8 * 6 + (2 if name.startswith("tied/") else 3))


@pytest.mark.parametrize("name", ["tp2/torch_dist_distopt", "tp2pp2/torch_dist_distopt"])
def test_bucket_reads_take_only_the_requested_rows(name):
    """Pieces of Adam's state in the distributed optimizer's TP-sharded buckets: a block of rows (what the
    torch_dist writer asks for a large tensor), the other dimension, one TP rank's own pieces (a glu weight's
    two halves) equal the whole state cut the same way, and the bytes read (``sources``) are the piece's, not
    every shard's whole span."""
    from megastack.layout import Piece

    reader = open_checkpoint(FIXTURES / name)
    checked = 0
    for weight in ("embedding", "layers.1.qkv", "layers.2.proj", "layers.3.fc1", "layers.0.fc2", "final_norm"):
        state = layout.state_name("exp_avg", weight)
        whole = reader.read(state)
        kind = layout.split_name(weight)[1]
        requests = [
            [Piece(0, 1, 3)],
            [Piece(0, whole.shape[0] - 2, 2)],
            layout.tp_pieces(kind, tuple(whole.shape), 1, 2),
        ]
        if whole.dim() == 2:
            requests.append([Piece(1, 3, 5)])
        for pieces in requests:
            got = reader.read(state, pieces)
            assert torch.equal(got, layout.take_pieces(whole, pieces)), (weight, pieces)
            assert sum(reader.sources(state, pieces).values()) == got.numel() * 4 or pieces[0].dim == 1
            checked += 1
    assert checked >= 20


def test_ddp_bucket_sizes_are_megatron_cores():
    """megatron_optim.bucket_sizes cuts the buffer as megatron-core's DDP did in the --overlap-grad-reduce
    --ddp-bucket-size 4097 run: the per-bucket sizes its torch_dist save stores, and their sum the legacy save's
    one concatenated buffer; without --overlap-grad-reduce, one bucket of the one-bucket save's size."""
    from megastack.ckpt import megatron_optim

    reader = open_checkpoint(FIXTURES / "dp2" / "torch_dist_distopt_buckets")
    numels = [
        math.prod(layout.logical_shape(reader.cfg, n))
        for n in megatron_optim.module_order(reader.cfg, megatron_optim.LAYER_ORDERS[0])
    ]
    stored = reader._stored_object("optimizer.distributed.dp_group_idx_0.per_bucket_numel_unpadded/shard_0_1")
    ((by_dtype,),) = stored
    (saved,) = by_dtype.values()
    assert megatron_optim.bucket_sizes(numels, 4097) == [int(n) for n in saved] and len(saved) == 9
    legacy = load_pt(
        resolve_iteration_dir(FIXTURES / "dp2" / "legacy_distopt_buckets") / "mp_rank_00" / "distrib_optim.pt"
    )
    assert sum(saved) == next(iter(legacy[0].values()))["numel_unpadded"] == 45504
    one = load_pt(resolve_iteration_dir(FIXTURES / "dp2" / "legacy_distopt") / "mp_rank_00" / "distrib_optim.pt")
    assert megatron_optim.bucket_sizes(numels, None) == [next(iter(one[0].values()))["numel_unpadded"]]
    args = load_pt(
        resolve_iteration_dir(FIXTURES / "dp2" / "legacy_distopt_buckets") / "mp_rank_00" / "model_optim_rng.pt"
    )["args"]
    assert megatron_optim.ddp_bucket_candidates(args, "args") == [4097, None]


def as_fused_adam(src: Path, dst: Path) -> None:
    """Megatron-LM's plain-optimizer save as it is written on GPU, where megatron-core's Adam is TE's (or apex's)
    FusedAdam: Adam's step in every param group (FusedAdam's ``group["step"]``, an int), none per parameter
    (transformer_engine/pytorch/optimizers/fused_adam.py); torch_dist then has no ``common_step`` (megatron-core
    saves one only when the parameters carry a step). Made from the CPU fixture, whose optimizer is torch's
    AdamW: no GPU here to let FusedAdam write it."""
    shutil.copytree(src, dst)
    directory = resolve_iteration_dir(dst)
    for path in [*directory.glob("mp_rank_*/model_optim_rng.pt"), *directory.glob("common.pt")]:
        blob = load_pt(path)
        inner = blob["optimizer"].get("optimizer", blob["optimizer"])
        steps = {int(entry.pop("step")) for entry in inner["state"].values() if isinstance(entry, dict)}
        steps |= {int(inner["state"].pop("common_step"))} if "common_step" in inner["state"] else set()
        (step,) = steps
        inner["param_groups"] = [g | {"step": step} for g in inner["param_groups"]]
        save_pt(blob, path)


@pytest.mark.parametrize("name", ["legacy", "torch_dist", "bf16/legacy"])
def test_fused_adams_step_stays_in_the_param_groups(name, tmp_path):
    """A source whose Adam keeps its step in the param groups (FusedAdam, Megatron-LM on GPU) is grown with the
    same moments, and its output keeps the step there, in legacy and torch_dist: FusedAdam's load_state_dict
    takes every per-parameter entry for a moment (a 'step' entry fails it), and torch's Adam needs one per
    parameter, so each source's own convention is the one its run resumes with."""
    fused = tmp_path / "fused"
    as_fused_adam(FIXTURES / name, fused)
    for output in ("legacy", "torch_dist"):
        plain, dst = tmp_path / f"plain_{output}", tmp_path / f"fused_{output}"
        for src, out in ((FIXTURES / name, plain), (fused, dst)):
            proc = in_process("grow", str(src), str(out), "--factor", "2", "--carry-optimizer", "--to", output)
            assert proc.returncode == 0, proc.stderr
        assert json.loads((resolve_iteration_dir(dst) / "megastack.json").read_text())["optimizer"]["step"] == 2
        if output == "torch_dist":
            got = dcp_tensors(resolve_iteration_dir(dst), "optimizer.")
            want = dcp_tensors(resolve_iteration_dir(plain), "optimizer.")
            assert set(got) == set(want) and len(got) >= 18 and all(torch.equal(got[k], want[k]) for k in got)
            common = load_pt(resolve_iteration_dir(dst) / "common.pt")["optimizer"]
            inner = common.get("optimizer", common)
            assert inner["state"] == {} and {g["step"] for g in inner["param_groups"]} == {2}
            continue
        got, groups = rank_file_moments(resolve_iteration_dir(dst) / "mp_rank_00" / "model_optim_rng.pt")
        want, want_groups = rank_file_moments(resolve_iteration_dir(plain) / "mp_rank_00" / "model_optim_rng.pt")
        assert set(got) == set(want) and len(got) == 8 * 6 + 3
        for key, state in got.items():
            assert set(state) == set(want[key]) - {"step"}, key  # no per-parameter step
            assert all(torch.equal(state[f], want[key][f]) for f in state), key
        assert groups == [g | {"step": 2} for g in want_groups]


MCORE_LOADS = [  # (source, precision, growths, output): plain and distributed optimizer, fp32/bf16/fp16, TP2
    ("legacy", "fp32", 1, "torch_dist"),
    ("torch_dist_distopt_fr", "fp32", 1, "torch_dist"),
    ("tp2/torch_dist_distopt", "fp32", 1, "torch_dist"),
    ("bf16/torch_dist", "bf16", 1, "torch_dist"),
    ("bf16/legacy_distopt", "bf16", 2, "torch_dist"),  # grown twice (4 -> 8 -> 16 layers): the resume entries go on
    ("fp16/legacy", "fp16", 2, "torch_dist"),
    ("fp16/torch_dist_distopt", "fp16", 1, "torch_dist"),
    # legacy output: Megatron's plain optimizer in each rank file (from a legacy or a torch_dist save)
    ("legacy", "fp32", 1, "legacy"),
    ("torch_dist", "fp32", 1, "legacy"),
    ("bf16/legacy", "bf16", 1, "legacy"),
    ("fp16/legacy", "fp16", 2, "legacy"),
    ("tied/legacy", "fp32", 1, "legacy"),  # tied embeddings: no output layer of its own
    # legacy output of the distributed optimizer: its param groups in the rank file, distrib_optim.pt beside it
    ("legacy_distopt", "fp32", 1, "legacy"),
    ("bf16/legacy_distopt", "bf16", 2, "legacy"),  # grown twice: megastack's own distrib_optim.pt read back
    ("torch_dist_distopt", "fp32", 1, "legacy"),  # dp_reshardable buckets: their proven order laid out again
    ("dp2/legacy_distopt_buckets", "fp32", 1, "legacy"),  # --overlap-grad-reduce: DDP buckets of 4097 elements
]
# the local spec's layer parameter names -> the torch_dist (TE) names of Megatron-LM's saves
LOCAL_TO_TE = {layout.MCORE_LAYER_LOCAL[kind]: te for kind, te in layout.MCORE_LAYER_TE.items()}


def test_megatron_cores_own_optimizer_resumes_the_grown_moments(tmp_path):
    """The grown checkpoints loaded by megatron-core's own optimizer (get_megatron_optimizer over its DDP, the
    load Megatron-LM's load_checkpoint does: sharded state dicts with the checkpoint's content metadata,
    dist_checkpointing.load, optimizer.load_state_dict) on 2 data-parallel ranks: the plain optimizer
    (FP32Optimizer, Float16OptimizerWithFloat16Params) from plain sources, the DistributedOptimizer (each
    rank its range of the flat buffer) from distributed-optimizer sources. Every parameter's exp_avg,
    exp_avg_sq and fp32 master it holds equal Megatron-LM's own torch_dist save of the source's run stacked
    by hand (in fp32 the master is the weight), the ranks' ranges cover each parameter once (the plain
    optimizer: each rank all of it), the step is 2 and fp16 resumes at the source's loss scale, also after
    a second growth of the grown checkpoint (the resume entries go on through megastack's own output).
    Legacy output is loaded as Megatron-LM's load_checkpoint loads legacy files (model, then
    optimizer.load_state_dict of the rank file's ``optimizer``): Adam's state by parameter index, so a
    parameter order other than megatron-core's would hand a weight another's moments; the distributed
    optimizer's legacy output also through load_parameter_state of its distrib_optim.pt (DDP bucketed as the
    file's args say), whose flat layout must be megatron-core's buffer for every range to hold its weight's."""
    job = {"checkpoints": [], "out": str(tmp_path)}
    for name, precision, growths, output in MCORE_LOADS:
        label, src = f"{name}@{output}", FIXTURES / name
        for growth in range(growths):
            dst = tmp_path / f"{label.replace('/', '_')}_{growth}"
            proc = in_process("grow", str(src), str(dst), "--factor", "2", "--carry-optimizer", "--to", output)
            assert proc.returncode == 0, proc.stderr
            src = dst
        job["checkpoints"].append(
            {
                "name": label,
                "path": str(dst),
                "precision": precision,
                "distributed": "distopt" in name,
                "format": output,
            }
        )
    (tmp_path / "job.json").write_text(json.dumps(job))
    results = run_workers("load_optimizer.py", 2, str(tmp_path / "job.json"))
    assert len(results) == 2 * len(MCORE_LOADS)
    for name, precision, growths, output in MCORE_LOADS:
        family = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        reference = dcp_tensors(resolve_iteration_dir(FIXTURES / f"{family}torch_dist"), "")  # 4 layers
        covered: dict[str, list] = {}  # parameter -> [numel, (start, end) per rank]
        for result in (r for r in results if r["name"] == f"{name}@{output}"):
            held = torch.load(result["file"], weights_only=True)
            assert held["steps"] == [2.0], name
            assert held["grad_scaler"] == (FP16_SCALER if precision == "fp16" else None), name
            for param, slot in held["params"].items():
                parts = param.split(".")
                if parts[:2] == ["decoder", "layers"]:  # decoder.layers.<i>.<rest>: layer i of the stack
                    rest = ".".join(parts[3:])
                    key, layer = "decoder.layers." + LOCAL_TO_TE[rest], int(parts[2]) % 4  # G_stack
                else:
                    key, layer = param, None
                master = "optimizer.state.fp32_param." if precision != "fp32" else ""  # fp32: the weight
                fields = {
                    "exp_avg": "optimizer.state.exp_avg.",
                    "exp_avg_sq": "optimizer.state.exp_avg_sq.",
                    "master": master,
                }
                for field, prefix in fields.items():
                    whole = reference[prefix + key]
                    whole = (whole if layer is None else whole[layer]).flatten()
                    assert torch.equal(slot[field].flatten(), whole[slot["start"] : slot["end"]]), (name, param, field)
                covered.setdefault(param, [whole.numel()]).append((slot["start"], slot["end"]))
        # 6 per layer + embedding, final norm, output layer (tied: the embedding)
        assert len(covered) == 4 * 2**growths * 6 + (2 if name.startswith("tied/") else 3), name
        for param, (numel, *spans) in covered.items():
            if "distopt" in name:  # the ranks' ranges tile the parameter, each element on one rank
                spans.sort()
                assert [spans[0][0], spans[-1][1]] == [0, numel], (name, param)
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (name, param)
            else:  # the plain optimizer: every rank holds all of it
                assert spans == [(0, numel)] * 2, (name, param)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2", "dp2"])
def test_parallel_training_saves_hold_the_one_rank_runs_moments(layout):
    """The tp2/, pp2/, tp2pp2/, dp2/ saves are Megatron-LM's same 2 steps on 2 and 4 ranks (dp2: each rank the
    same tokens, so the mean gradient is one rank's): their own named torch_dist
    entries (read by torch DCP) equal the one-rank run's to float rounding, so the references above are the
    model's moments, not an artefact of the sharding."""
    got = dcp_tensors(resolve_iteration_dir(FIXTURES / layout / "torch_dist"), "optimizer.state.")
    tp1 = dcp_tensors(resolve_iteration_dir(FIXTURES / "torch_dist"), "optimizer.state.")
    assert set(got) == set(tp1) and len(tp1) == 18
    for key, want in tp1.items():  # relative to each tensor's norm: exp_avg_sq entries run down to 1e-10
        assert (got[key] - want).norm() <= 1e-5 * want.norm() and want.norm() > 0, key


def test_megatron_lms_distributed_optimizer_buffer_layout(tmp_path):
    """distrib_optim.pt's flat param buffer, cut by the layout megastack infers (reverse module order, starts
    padded to 64), holds each weight's own values: the fp32 master copy equals the saved weight."""
    from megastack.ckpt.megatron_optim import MOMENTS, legacy_rank_states

    path = resolve_iteration_dir(FIXTURES / "legacy_distopt") / "mp_rank_00" / "model_optim_rng.pt"
    blob = load_pt(path)
    states, step = legacy_rank_states(blob, path)
    assert step == 2 and set(states) == {k for k in blob["model"] if not k.endswith("_extra_state")}
    assert all(set(s) == set(MOMENTS) for s in states.values())
    flat = load_pt(path.parent / "distrib_optim.pt")[0][(torch.float32, torch.float32)]["param"]
    covered = 0
    for key, moments in states.items():  # views into the buffer: the same offsets give the master weight
        offset = moments["exp_avg"].storage_offset()
        numel = blob["model"][key].numel()
        assert torch.equal(flat[offset : offset + numel].view_as(blob["model"][key]), blob["model"][key]), key
        covered += numel
    assert covered == sum(v.numel() for k, v in blob["model"].items() if not k.endswith("_extra_state"))


def _edit_rank_file(src: Path, dst: Path, edit) -> None:
    shutil.copytree(src, dst)
    path = resolve_iteration_dir(dst) / "mp_rank_00" / "model_optim_rng.pt"
    blob = load_pt(path)
    edit(blob)
    save_pt(blob, path)


@pytest.mark.parametrize(
    "case, needles, code",
    [
        ("group size", ("param group lists 17", "the optimizer does not match the model"), 1),
        ("step differs", ("Adam's step differs",), 1),
        ("moment shape", ("optimizer.state[2].exp_avg", "is (32, 32) float32", "needs (64, 32)"), 1),
        ("custom lr_mult", ("lr_mult=2.0", "custom parameter groups"), 2),
        ("torch_dist fully_sharded_model_space", ("'fully_sharded_model_space' is not read yet",), 2),
        ("args tied, buckets untied", ("buckets ([22816] elements, TP 0, PP 1)", "do not hold the weights"), 2),
        ("no optimizer", ("holds no optimizer state",), 1),
        ("loss scale", ("field 'grad_scaler'.scale", "positive"), 1),
        ("buffer order", ("distrib_optim.pt", "master weights at", "not megatron-core's"), 1),
    ],
)
def test_megatron_optimizer_state_refusals(case, needles, code, tmp_path):
    """Each inconsistency of a Megatron-LM optimizer state is one line naming the file and field, exit 1
    (bad input) or 2 (a layout not read yet), nothing written."""
    src, dst = tmp_path / "src", tmp_path / "grown"

    def edit(blob):
        opt = blob["optimizer"]
        if case == "group size":
            opt["param_groups"][0]["params"] = opt["param_groups"][0]["params"][:-1]
        elif case == "step differs":
            opt["state"][3]["step"] = torch.tensor(5.0)
        elif case == "moment shape":
            opt["state"][2]["exp_avg"] = torch.zeros(32, 32)
        elif case == "custom lr_mult":
            opt["param_groups"][1]["lr_mult"] = 2.0

    if case == "buffer order":  # two same-shaped weights swapped in the model dict: the buffer no longer matches
        shutil.copytree(FIXTURES / "legacy_distopt", src)
        path = resolve_iteration_dir(src) / "mp_rank_00" / "model_optim_rng.pt"
        blob = load_pt(path)
        a, b = "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc1.weight"
        blob["model"][a], blob["model"][b] = blob["model"][b], blob["model"][a]
        save_pt(blob, path)
    elif case == "torch_dist fully_sharded_model_space":  # older Megatron-LM's sharding of the distributed optimizer
        shutil.copytree(FIXTURES / "torch_dist_distopt", src)
        path = resolve_iteration_dir(src) / "common.pt"
        common = load_pt(path)
        common["optimizer"]["param_state_sharding_type"] = "fully_sharded_model_space"
        save_pt(common, path)
    elif case == "args tied, buckets untied":  # args that say tied over an untied run's buckets: no layout fits
        shutil.copytree(FIXTURES / "pp2" / "torch_dist_distopt", src)
        path = resolve_iteration_dir(src) / "common.pt"
        common = load_pt(path)
        common["args"].untie_embeddings_and_output_weights = False
        save_pt(common, path)
    elif case == "loss scale":  # fp16's loss scaler with a scale no run could have reached
        _edit_rank_file(
            FIXTURES / "fp16" / "legacy",
            src,
            lambda blob: blob["optimizer"]["grad_scaler"].update(scale=torch.tensor([-1.0])),
        )
    elif case == "no optimizer":
        src = FIXTURES / "legacy_tp2pp2"
    else:
        _edit_rank_file(FIXTURES / "legacy", src, edit)
    proc = in_process("grow", str(src), str(dst), "--factor", "2", "--carry-optimizer", "--to", "torch_dist")
    assert proc.returncode == code
    assert_one_line_error(proc, *needles)
    assert not dst.exists()


def test_dry_run_reports_adams_bytes_per_rank():
    """--dry-run with --carry-optimizer: each rank's bytes of Adam's state among its writes (two fp32 moments
    of every grown weight in all), and the weights' own bytes beside them."""
    proc = in_process(
        "grow",
        str(FIXTURES / "legacy"),
        "unused",
        "--factor",
        "2",
        "--carry-optimizer",
        "--to",
        "torch_dist",
        "--dry-run",
        "--json",
        "--ranks",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    ranks = json.loads(proc.stdout)["ranks"]
    source = open_checkpoint(FIXTURES / "legacy").cfg
    params = dataclasses.replace(source, num_layers=2 * source.num_layers).total_parameters()  # fp32 weights
    adam = sum(r["optimizer_write_bytes"] for r in ranks)
    assert len(ranks) == 2 and all(r["optimizer_write_bytes"] > 0 for r in ranks)
    assert adam == 2 * 4 * params and sum(r["write_bytes"] for r in ranks) == adam + 4 * params
