"""Dense -> mixture of experts (``grow --dimension experts``): the upcycled torch_dist checkpoint loads strictly
into megatron-core's MoE GPTModel under TP/PP/EP layouts with the dense model's logits, trains, and grows
further in depth; the refusals are one line."""

from __future__ import annotations

import json

import pytest
import torch

from megastack import layout
from megastack.ckpt import megatron_args
from megastack.ckpt.detect import open_checkpoint
from megastack.ckpt.manifest import read_manifest, resolve_iteration_dir
from megastack.ckpt.torch_dist import read_common
from megastack.growth.operators import make_plan
from megastack.growth.spec import GrowthSpec

from ckpt_factory import logits, reference, sample_tokens, small_config, write_checkpoint
from conftest import assert_one_line_error, in_process, run_cli, run_workers

UPCYCLED = {  # name -> grow flags
    "moe4": ["--experts", "4", "--topk", "2"],
    "moe4_zero_router": ["--experts", "4", "--topk", "4", "--router-init", "zero"],
    "moe8_granular2": ["--experts", "8", "--topk", "4", "--granularity", "2"],
}


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upcycle")
    dense = reference(small_config(num_layers=4, vocab_size=1024))  # the demo corpus's vocab: it trains too
    write_checkpoint(dense, tmp / "dense")
    for name, flags in UPCYCLED.items():
        proc = run_cli("grow", str(tmp / "dense"), str(tmp / name), "--dimension", "experts", *flags)
        assert proc.returncode == 0, proc.stderr
    more = [
        ("grow", "moe4", "moe4_zero_x2", "--operator", "zero", "--factor", "2"),
        ("convert", "dense", "dense_hf", "--to", "hf"),
        ("convert", "moe8_granular2", "mixtral_granular", "--to", "hf"),  # Mixtral from torch_dist
        ("grow", "dense_hf", "mixtral", "--dimension", "experts", "--experts", "4", "--topk", "3"),  # HF -> HF
        ("convert", "mixtral", "from_mixtral", "--to", "torch_dist"),
        ("convert", "moe4", "moe4_legacy_pp2ep2", "--to", "legacy", "--pp", "2", "--ep", "2"),
        ("convert", "moe8_granular2", "moe8_legacy_ep4", "--to", "legacy", "--ep", "4"),
        ("convert", "moe4", "moe4_legacy_tp2pp2ep2", "--to", "legacy", "--tp", "2", "--pp", "2", "--ep", "2"),
    ]
    for command, src, dst, *flags in more:
        proc = run_cli(command, str(tmp / src), str(tmp / dst), *flags)
        assert proc.returncode == 0, proc.stderr
    return tmp, dense


def test_upcycled_checkpoint_loads_in_megatron_core_moe_with_the_dense_logits(upcycled):
    """megatron-core's dist_checkpointing, strict, into its MoE GPTModel cut by TP, PP and EP: the logits are
    the dense reference model's (every expert a copy; top-k softmax weights summing to one)."""
    tmp, dense = upcycled
    tokens = sample_tokens(dense.cfg, batch=4)
    torch.save(tokens, tmp / "tokens.pt")
    layouts = {
        "moe4": [[2, 2], [1, 4], [2, 1, 2], [1, 1, 4]],
        "moe4_zero_router": [[1, 2, 2]],
        "moe8_granular2": [[2, 2], [1, 2, 2]],
        "moe4_zero_x2": [[2, 2]],  # G_zero on the experts: new blocks are the identity
        "from_mixtral": [[2, 1, 2]],  # upcycled HF -> HF, then converted
    }
    checkpoints = [{"name": n, "path": str(tmp / n), "how": "dist", "layouts": ls} for n, ls in layouts.items()]
    checkpoints += [  # Megatron-LM's legacy rank files (mp_rank_TT[_PPP]_EEE), each rank's own file, strictly
        {
            "name": "moe4_legacy_pp2ep2",
            "path": str(tmp / "moe4_legacy_pp2ep2"),
            "how": "legacy",
            "layouts": [[1, 2, 2]],
        },
        {"name": "moe8_legacy_ep4", "path": str(tmp / "moe8_legacy_ep4"), "how": "legacy", "layouts": [[1, 1, 4]]},
        {
            "name": "moe4_legacy_tp2pp2ep2",
            "path": str(tmp / "moe4_legacy_tp2pp2ep2"),
            "how": "reader",
            "layouts": [[1, 1]],
        },
    ]
    (tmp / "job.json").write_text(
        json.dumps({"tokens": str(tmp / "tokens.pt"), "out": str(tmp), "checkpoints": checkpoints})
    )
    results = run_workers("load_checkpoints.py", 4, str(tmp / "job.json"))
    wanted = {(c["name"], *([*layout_, 1][:3])) for c in checkpoints for layout_ in c["layouts"]}
    assert {(r["name"], r["tp"], r["pp"], r["ep"]) for r in results} == wanted
    expected = logits(dense, tokens)
    for r in results:
        diff = (torch.load(r["file"], weights_only=True) - expected).abs().max().item()
        assert diff <= 1e-5, (r, diff)


def test_upcycled_tensors_are_the_dense_mlp_and_megatron_args_describe_the_moe(upcycled):
    tmp, dense = upcycled
    src = open_checkpoint(tmp / "dense")
    moe = open_checkpoint(tmp / "moe8_granular2")
    cfg = moe.cfg
    assert (cfg.num_experts, cfg.moe_topk, cfg.expert_ffn_size) == (8, 4, 48)
    f = src.cfg.ffn_hidden_size // 2
    gate, up = src.read("layers.1.fc1").chunk(2)
    for e in (0, 1, 6, 7):  # expert e is half s = e % 2 of copy e // 2 of the dense MLP
        s = e % 2
        fc1 = moe.read(f"layers.1.expert_fc1.{e}")
        assert torch.equal(fc1, torch.cat([gate[s * f : (s + 1) * f], up[s * f : (s + 1) * f]]))
        assert torch.equal(moe.read(f"layers.1.expert_fc2.{e}"), 2 * src.read("layers.1.fc2")[:, s * f : (s + 1) * f])
    router = moe.read("layers.1.router")
    assert torch.equal(router[0], router[1]) and not torch.equal(router[0], router[2])  # one row per copy
    assert abs(router.std().item() - cfg.init_std) < 0.01
    assert torch.equal(moe.read("layers.2.qkv"), src.read("layers.2.qkv"))
    # Megatron-LM's args in common.pt rebuild the same model (what its loader and `megastack` read without
    # megastack.json); the routing megastack builds is written out
    args = read_common(moe.path)["args"]
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (8, 4, 48)
    assert args.moe_router_pre_softmax is False and args.moe_router_score_function == "softmax"
    again = megatron_args.model_config(args, "common.pt")
    assert (again.num_experts, again.moe_topk, again.expert_ffn_size) == (8, 4, 48)
    event = read_manifest(resolve_iteration_dir(tmp / "moe8_granular2"))["history"][-1]
    assert event["dimension"] == "experts" and event["granularity"] == 2 and event["router_init"] == "random"
    assert run_cli("verify", str(tmp / "moe8_granular2")).returncode == 0
    # depth growth of the MoE model copies every expert with its layer
    grown = open_checkpoint(tmp / "moe4_zero_x2")
    assert grown.cfg.num_layers == 8 and grown.cfg.num_experts == 4
    four = open_checkpoint(tmp / "moe4")
    assert torch.equal(grown.read("layers.5.expert_fc1.3"), four.read("layers.1.expert_fc1.3"))
    assert not grown.read("layers.5.expert_fc2.3").any()  # G_zero: the repeated block's outputs are zero


def test_mixtral_export_computes_the_dense_model_in_transformers(upcycled):
    """The Hugging Face output of an upcycled model is a Mixtral (MixtralForCausalLM) that transformers loads
    strictly, with the dense model's logits: from torch_dist (granular experts) and grown HF -> HF."""
    from transformers import AutoModelForCausalLM

    tmp, dense = upcycled
    tokens = sample_tokens(dense.cfg)
    expected = logits(dense, tokens)
    for name, experts, topk in (("mixtral_granular", 8, 4), ("mixtral", 4, 3)):
        config = json.loads((tmp / name / "config.json").read_text())
        assert config["architectures"] == ["MixtralForCausalLM"]
        assert (config["num_local_experts"], config["num_experts_per_tok"]) == (experts, topk)
        model, info = AutoModelForCausalLM.from_pretrained(tmp / name, dtype=torch.float32, output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
        with torch.no_grad():
            got = model.eval()(tokens).logits
        assert (got - expected).abs().max().item() <= 1e-5, name


def test_upcycle_noise_breaks_the_copies_apart():
    cfg = small_config()
    plan = make_plan(cfg, GrowthSpec(dimension="experts", experts=4, noise=0.2, seed=3))
    weights = {name: torch.randn(layout.logical_shape(cfg, name)) for name in layout.logical_names(cfg)}
    produce = plan.producer(
        type("R", (), {"read": lambda self, n, p=None: layout.take_pieces(weights[n], p)})(), torch.float32
    )
    e0, e1 = produce("layers.0.expert_fc1.0", None), produce("layers.0.expert_fc1.1", None)
    assert not torch.equal(e0, e1)
    mix = 0.8 * weights["layers.0.fc1"]  # W' = 0.8 W + 0.2 std eps, eps per expert
    assert ((e0 - mix) / (0.2 * cfg.init_std)).std().item() == pytest.approx(1.0, abs=0.1)


@pytest.mark.timeout(600)
def test_upcycled_model_trains_with_megatron_moe_layers(upcycled, tmp_path):
    """The trainer on 2 ranks from the upcycled checkpoint, DP2 ZeRO-1 and PP2: megatron-core's MoE layers
    and aux loss; the two layouts give the same losses, the loss falls, the routers move, and the saved
    checkpoint reads back as the same MoE. TP is refused (megatron-core wants sequence parallelism)."""
    from reference_loop import launch_stages, stage_losses

    tmp, _ = upcycled
    src = open_checkpoint(tmp / "moe4")

    def stage(out, **parallel):
        return {
            "model": read_manifest(src.path)["model"],
            "out_dir": str(out),
            "init_from": str(tmp / "moe4"),
            "parallel": {"zero_stage": 1, "micro_batch_size": 2, "global_batch_size": 8, **parallel},
            "optimizer": {"lr": 3.0e-3, "warmup_iters": 2},
            "schedule": {"train_iters": 12, "eval_interval": 0, "save_interval": 0, "log_interval": 1},
            "logging": {"tensorboard": False, "progress": "off"},
        }

    runs = [
        {"name": "dp2", "config": stage(tmp_path / "dp2")},
        {"name": "pp2", "config": stage(tmp_path / "pp2", pipeline=2)},
        {"name": "tp2", "config": stage(tmp_path / "tp2", tensor=2)},
    ]
    results = launch_stages(tmp_path, "moe", 2, runs)
    assert "is not built in the trainer" in results["tp2"]["error"]  # MoE under TP needs sequence parallelism
    assert "error" not in results["dp2"] and "error" not in results["pp2"], results
    dp2, pp2 = stage_losses(tmp_path / "dp2"), stage_losses(tmp_path / "pp2")
    assert len(dp2) == 12 and pp2 == pytest.approx(dp2, rel=1e-4)
    assert sum(dp2[-3:]) / 3 < sum(dp2[:3]) / 3 - 0.2, dp2
    out = open_checkpoint(tmp_path / "dp2")
    assert out.cfg.num_experts == 4
    assert not torch.equal(out.read("layers.0.router"), src.read("layers.0.router"))


def test_upcycle_refusals_are_one_line(upcycled, tmp_path):
    tmp, _ = upcycled
    dense = str(tmp / "dense")
    cases = [
        (["--dimension", "experts", "--experts", "4", "--topk", "1"], "--topk 1"),
        (["--dimension", "experts", "--experts", "6", "--granularity", "4"], "--granularity 4"),
        (["--dimension", "experts"], "--experts"),
        (["--experts", "4"], "--dimension experts"),
        (["--dimension", "experts", "--experts", "4", "--factor", "2"], "keeps the depth"),
        (["--dimension", "experts", "--experts", "4", "--operator", "zero"], "does not upcycle"),
    ]
    for flags, needle in cases:
        assert_one_line_error(run_cli("grow", dense, str(tmp_path / "out"), *flags), needle)
    assert_one_line_error(
        in_process("grow", str(tmp / "moe4"), str(tmp_path / "out"), "--dimension", "experts", "--experts", "8"),
        "already has 4 experts",
    )
    for flags, needle in (
        (["--to", "legacy", "--ep", "3"], "--ep 3: must divide num_experts (4)"),
        (["--to", "hf", "--ep", "2"], "--ep applies to legacy output only"),
    ):
        assert_one_line_error(in_process("convert", str(tmp / "moe4"), str(tmp_path / "out"), *flags), needle)
    assert_one_line_error(in_process("convert", dense, str(tmp_path / "out"), "--to", "legacy", "--ep", "2"), "dense")
    assert not (tmp_path / "out").exists()
