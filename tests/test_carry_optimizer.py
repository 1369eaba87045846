"""Adam's state carried into a new stage under another layout (``init_optimizer: carried``).

Reference: ReferenceLlama + torch AdamW in memory, k steps, then n more with the same optimizer (its
moments and step) under a new warmup + cosine schedule. megastack: a DP2 ZeRO-1 stage of k steps writes
Adam's state in the model's sharded space at its end; a new stage started from it with the state carried
under ZeRO-0, ZeRO-3, TP2, PP2 and on one rank (another DP size) equals the reference; with a fresh
optimizer it does not.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from reference_loop import launch_stages, reference_adamw, reference_steps, stage_losses

from ckpt_factory import write_checkpoint

MODEL = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 96,
    "vocab_size": 1024,
    "seq_length": 32,
    "name": "carry",
}
UPCYCLE = {"experts": 4, "topk": 2, "granularity": 2}
WIDE = {**MODEL, "hidden_size": 128, "num_attention_heads": 8, "num_query_groups": 4, "ffn_hidden_size": 192}
MOE = {**MODEL, "num_experts": 4, "moe_topk": 2, "moe_ffn_hidden_size": MODEL["ffn_hidden_size"] // 2}
FIRST, SECOND, GLOBAL_BATCH, MICRO = 4, 4, 8, 2
OPTIMIZER = {"lr": 2e-3, "warmup_iters": 2, "clip_grad": 0.5, "weight_decay": 0.1}
RTOL = 1e-5
# Weights after 8 steps, against the reference loop: every layout lands 1.7e-5 (relative norm) from it and
# within 1e-8 of each other; DP2 ZeRO-1's first stage differs from the single-process loop by reduction
# order, which Adam's m / (sqrt(v) + eps) amplifies for entries with tiny gradients.
WEIGHTS_RTOL = 5e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def stage(out: Path, init: Path, iters: int, carried: bool, model: dict = MODEL, **parallel) -> dict:
    return {
        "model": model,
        "out_dir": str(out),
        "init_from": str(init),
        "init_optimizer": "carried" if carried else "fresh",
        "optimizer": OPTIMIZER,
        "parallel": {"micro_batch_size": MICRO, "global_batch_size": GLOBAL_BATCH, **parallel},
        "schedule": {"train_iters": iters, "eval_interval": 0, "eval_iters": 0, "save_interval": 0, "log_interval": 1},
        "data": {"cache_dir": str(out.parent / "cache")},
        "logging": {"tensorboard": False, "progress": "off"},
    }


def reference(tmp: Path):
    """k steps, then n steps continuing the same AdamW under the second stage's schedule and batches."""
    from megastack import layout
    from megastack.config import ModelConfig
    from megastack.model.reference import ReferenceLlama
    from megastack.train.config import OptimizerConfig
    from megastack.train.data import build_datasets, resolve_data

    cfg = ModelConfig(**MODEL)
    model = ReferenceLlama(cfg).init_weights(seed=11)
    init = write_checkpoint(model, tmp / "init")
    prefixes, tokenizer = resolve_data([], None, cfg.vocab_size)
    data = build_datasets(
        prefixes, None, "98,2,0", tokenizer, cfg.seq_length, 1234, max(FIRST, SECOND) * GLOBAL_BATCH, 0, tmp / "ref"
    )
    opt_cfg = OptimizerConfig(**OPTIMIZER)
    opt = reference_adamw(model, opt_cfg)

    def run(iters: int) -> list[float]:
        return reference_steps(model, opt, opt_cfg, data, iters, GLOBAL_BATCH, MICRO)

    first = run(FIRST)
    snapshot = copy.deepcopy(model), {n: copy.deepcopy(opt.state[p]) for n, p in model.named_parameters()}
    second = run(SECOND)
    return init, first, second, layout.logical_from_hf(model.state_dict(), cfg), snapshot, data


def grown_reference(snapshot, data, operator: str):
    """The small model after the first stage and its AdamW state, stacked x2 by hand (G_zero: the repeated
    blocks' attention and MLP outputs zero, their moments zero), then the second stage's steps."""
    from megastack import layout
    from megastack.config import ModelConfig
    from megastack.model.reference import ReferenceLlama
    from megastack.train.config import OptimizerConfig

    small, small_state = snapshot
    layers = MODEL["num_layers"]
    cfg = ModelConfig(**{**MODEL, "num_layers": 2 * layers})
    model = ReferenceLlama(cfg)

    def source_of(name: str) -> str:
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers.") :].split(".", 1)
            return f"model.layers.{int(index) % layers}.{rest}"
        return name

    def zeroed(name: str) -> bool:
        repeated = name.startswith("model.layers.") and int(name.split(".")[2]) >= layers
        return operator == "zero" and repeated and name.endswith(("o_proj.weight", "down_proj.weight"))

    source = dict(small.named_parameters())
    state = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.zeros_like(param) if zeroed(name) else source[source_of(name)])
            s = small_state[source_of(name)]
            state[name] = {
                k: (torch.zeros_like(v) if zeroed(name) and k != "step" else v.clone()) for k, v in s.items()
            }
    opt_cfg = OptimizerConfig(**OPTIMIZER)
    opt = reference_adamw(model, opt_cfg)
    for name, param in model.named_parameters():
        opt.state[param] = state[name]
    history = reference_steps(model, opt, opt_cfg, data, SECOND, GLOBAL_BATCH, MICRO)
    return history, layout.logical_from_hf(model.state_dict(), cfg)


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("carry")
    init, first, second, weights, snapshot, data = reference(tmp)
    bf16 = {"precision": "bf16"}
    first_runs = [
        {"name": "first", "config": stage(tmp / "first", init, FIRST, False)},
        {"name": "first_bf16", "config": stage(tmp / "first_bf16", init, FIRST, False, **bf16)},
    ]
    small = launch_stages(tmp, "first", 2, first_runs)
    layouts = {
        "zero0": {"zero_stage": 0},
        "zero2": {"zero_stage": 2},
        "zero3": {"zero_stage": 3},
        "tp2": {"tensor": 2},
        "pp2": {"pipeline": 2},
    }
    runs = [{"name": n, "config": stage(tmp / n, tmp / "first", SECOND, True, **p)} for n, p in layouts.items()]
    runs.append({"name": "fresh", "config": stage(tmp / "fresh", tmp / "first", SECOND, False)})
    runs.append({"name": "bf16", "config": stage(tmp / "bf16", tmp / "first_bf16", SECOND, True, zero_stage=2, **bf16)})
    # growth with the optimizer: the first stage's checkpoint stacked x2 (and by G_zero), Adam's state too
    from megastack.ckpt.execute import Comm
    from megastack.growth.api import grow
    from megastack.growth.spec import GrowthSpec

    grown = {}
    for operator in ("stack", "zero"):
        grow(
            tmp / "first", tmp / f"grown_{operator}", GrowthSpec(operator, factor=2, carry_optimizer=True), comm=Comm()
        )
        grown[operator] = grown_reference(snapshot, data, operator)
    big = {**MODEL, "num_layers": 2 * MODEL["num_layers"]}
    grown_layouts = {"g_zero1": {}, "g_zero3": {"zero_stage": 3}, "g_tp2": {"tensor": 2}, "g_pp2": {"pipeline": 2}}
    for n, p in grown_layouts.items():
        runs.append({"name": n, "config": stage(tmp / n, tmp / "grown_stack", SECOND, True, model=big, **p)})
    runs.append({"name": "g_zero", "config": stage(tmp / "g_zero", tmp / "grown_zero", SECOND, True, model=big)})
    # upcycling with the optimizer: 4 granular experts (2 copies of the MLP cut in halves), top 2
    grow(tmp / "first", tmp / "upcycled", GrowthSpec(dimension="experts", **UPCYCLE, carry_optimizer=True), comm=Comm())
    runs.append({"name": "u_carried", "config": stage(tmp / "u_carried", tmp / "upcycled", SECOND, True, model=MOE)})
    # width with the optimizer: direct (function-preserving duplication) to hidden 128, ffn 192
    widen = GrowthSpec(dimension="width", hidden=WIDE["hidden_size"], ffn=WIDE["ffn_hidden_size"], carry_optimizer=True)
    grow(tmp / "first", tmp / "widened", widen, comm=Comm())
    runs.append({"name": "w_carried", "config": stage(tmp / "w_carried", tmp / "widened", SECOND, True, model=WIDE)})
    results = small | launch_stages(tmp, "second", 2, runs)
    one = [
        {"name": "single", "config": stage(tmp / "single", tmp / "first", SECOND, True)},
        {"name": "no_state", "config": stage(tmp / "no_state", init, SECOND, True)},  # init has no Adam state
        {"name": "g_single", "config": stage(tmp / "g_single", tmp / "grown_stack", SECOND, True, model=big)},
    ]
    results |= launch_stages(tmp, "one", 1, one)
    return {"tmp": tmp, "first": first, "second": second, "weights": weights, "results": results, "grown": grown}


def test_first_stage_writes_adams_state_in_model_space(carried):
    from megastack.ckpt.detect import open_checkpoint

    result = carried["results"]["first"]
    assert "error" not in result, result
    assert stage_losses(carried["tmp"] / "first") == pytest.approx(carried["first"], rel=RTOL)
    manifest = json.loads((Path(result["checkpoint"]) / "megastack.json").read_text())
    assert manifest["optimizer"] == {"step": FIRST, "states": ["exp_avg", "exp_avg_sq"]}
    assert open_checkpoint(result["checkpoint"]).optimizer_states() == ("exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("name", ["single", "zero0", "zero2", "zero3", "tp2", "pp2"])
def test_carried_state_continues_adam_under_any_layout(carried, name):
    from megastack import layout
    from megastack.ckpt.detect import open_checkpoint

    result = carried["results"][name]
    assert "error" not in result, result
    got, expected = stage_losses(carried["tmp"] / name), carried["second"]
    assert len(got) == SECOND and all(abs(a - b) <= RTOL * abs(b) for a, b in zip(got, expected)), (got, expected)
    reader = open_checkpoint(result["checkpoint"])
    single = open_checkpoint(carried["results"]["single"]["checkpoint"])
    assert sorted(layout.logical_names(reader.cfg)) == sorted(carried["weights"])
    for logical, want in carried["weights"].items():
        have = reader.read(logical).double()
        # against the reference: the rounding of 8 steps (a fresh AdamW lands 0.16 away: test below)
        assert rel(have, want.double()) <= WEIGHTS_RTOL, (name, logical, rel(have, want.double()))
        # against the same carried stage on one rank: the layouts agree to float rounding
        assert rel(have, single.read(logical).double()) <= 1e-6, (name, logical)


def test_a_fresh_optimizer_does_not_match(carried):
    """The carried moments are what make the runs equal: a fresh AdamW from the same weights differs."""
    from megastack.ckpt.detect import open_checkpoint

    got, expected = stage_losses(carried["tmp"] / "fresh"), carried["second"]
    assert got[0] == pytest.approx(expected[0], rel=RTOL)  # same weights, same first batch
    assert abs(got[-1] - expected[-1]) > 100 * RTOL * abs(expected[-1]), (got, expected)
    reader = open_checkpoint(carried["results"]["fresh"]["checkpoint"])
    worst = max(rel(reader.read(k).double(), v.double()) for k, v in carried["weights"].items())
    assert worst > 100 * WEIGHTS_RTOL, worst


def test_bf16_carries_the_fp32_master_copy(carried):
    """bf16 training keeps fp32 master weights in the optimizer: they are written and carried too, and the
    carried bf16 stage tracks the fp32 reference."""
    from megastack.ckpt.detect import open_checkpoint

    first = carried["results"]["first_bf16"]
    manifest = json.loads((Path(first["checkpoint"]) / "megastack.json").read_text())
    assert manifest["optimizer"]["states"] == ["fp32_param", "exp_avg", "exp_avg_sq"]
    assert open_checkpoint(first["checkpoint"]).optimizer_states() == ("fp32_param", "exp_avg", "exp_avg_sq")
    got, expected = stage_losses(carried["tmp"] / "bf16"), carried["second"]
    assert "error" not in carried["results"]["bf16"] and len(got) == SECOND
    assert all(abs(a - b) <= 2e-2 * abs(b) for a, b in zip(got, expected)), (got, expected)


def test_carrying_from_a_checkpoint_without_adam_state_is_one_line(carried):
    error = carried["results"]["no_state"]["error"]
    assert "init_optimizer: carried" in error and "has no Adam state" in error and "\n" not in error
    assert not (carried["tmp"] / "no_state" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize(
    "name,operator",
    [
        ("g_single", "stack"),
        ("g_zero1", "stack"),
        ("g_zero3", "stack"),
        ("g_tp2", "stack"),
        ("g_pp2", "stack"),
        ("g_zero", "zero"),
    ],
)
def test_growth_carries_adams_state(carried, name, operator):
    """train k -> grow --carry-optimizer -> train n (carried) equals the small model and its AdamW state
    stacked by hand and stepped n more times, under every layout (and another DP size than the first stage's)."""
    from megastack.ckpt.detect import open_checkpoint

    result = carried["results"][name]
    assert "error" not in result, result
    expected_losses, expected_weights = carried["grown"][operator]
    got = stage_losses(carried["tmp"] / name)
    assert len(got) == SECOND and all(abs(a - b) <= RTOL * abs(b) for a, b in zip(got, expected_losses)), (
        got,
        expected_losses,
    )
    reader = open_checkpoint(result["checkpoint"])
    for logical, want in expected_weights.items():
        have, want = reader.read(logical).double(), want.double()
        if operator == "zero" and logical in zeroed_by_g_zero():
            # started at 0 with zero moments, Adam moves each entry by about lr * g / (|g| + eps) per step:
            # entries whose gradient is near eps swing with rounding, so the bound is on the movement itself
            assert (have - want).abs().max().item() <= 0.05 * OPTIMIZER["lr"] * SECOND, (name, logical)
        else:
            assert rel(have, want) <= WEIGHTS_RTOL, (name, logical, rel(have, want))
    manifest = json.loads((carried["tmp"] / f"grown_{operator}" / "iter_0000000" / "megastack.json").read_text())
    assert manifest["optimizer"] == {"step": FIRST, "states": ["exp_avg", "exp_avg_sq"]}


def zeroed_by_g_zero() -> set[str]:
    layers = MODEL["num_layers"]
    return {f"layers.{i}.{kind}" for i in range(layers, 2 * layers) for kind in ("proj", "fc2")}


def test_upcycling_carries_adams_state(carried):
    """grow --dimension experts --carry-optimizer: each granular expert's moments are its slice of the dense
    MLP's (fc2's exp_avg x G, exp_avg_sq x G^2, as its weight x G), the router's zero; the carried MoE stage
    starts at the dense model's loss (the same function) and trains."""
    from megastack.ckpt.detect import open_checkpoint

    dense, moe = open_checkpoint(carried["tmp"] / "first"), open_checkpoint(carried["tmp"] / "upcycled")
    assert moe.optimizer_states() == ("exp_avg", "exp_avg_sq")
    f = MODEL["ffn_hidden_size"] // 2
    for state, scale in (("exp_avg", 2.0), ("exp_avg_sq", 4.0)):
        fc1, fc2 = dense.read(f"{state}/layers.1.fc1"), dense.read(f"{state}/layers.1.fc2")
        gate, up = fc1.chunk(2)
        for e in range(4):
            s = e % 2
            want1 = torch.cat([gate[s * f : (s + 1) * f], up[s * f : (s + 1) * f]])
            assert torch.equal(moe.read(f"{state}/layers.1.expert_fc1.{e}"), want1)
            assert torch.equal(moe.read(f"{state}/layers.1.expert_fc2.{e}"), scale * fc2[:, s * f : (s + 1) * f])
        assert not moe.read(f"{state}/layers.1.router").any()
        assert torch.equal(moe.read(f"{state}/layers.2.qkv"), dense.read(f"{state}/layers.2.qkv"))
    result = carried["results"]["u_carried"]
    assert "error" not in result, result
    losses = stage_losses(carried["tmp"] / "u_carried")
    assert len(losses) == SECOND and losses[0] == pytest.approx(carried["second"][0], rel=1e-5)


def test_width_growth_carries_adams_state(carried):
    """grow --dimension width --carry-optimizer: each target entry copies a source entry times a factor s
    (duplicated FFN neurons and heads split their outgoing columns), and its moments copy that entry's
    times s and s^2. Checked without the maps: (exp_avg / W, exp_avg_sq / W^2) of every target entry is the
    pair of some source entry of the same weight. The carried stage starts at the small model's loss (direct
    width keeps the function) and trains."""
    from megastack import layout
    from megastack.ckpt.detect import open_checkpoint

    small, wide = open_checkpoint(carried["tmp"] / "first"), open_checkpoint(carried["tmp"] / "widened")
    assert wide.optimizer_states() == ("exp_avg", "exp_avg_sq") and wide.cfg.hidden_size == WIDE["hidden_size"]
    for name in layout.logical_names(wide.cfg):
        w, m, v = (small.read(n).double().flatten() for n in (name, f"exp_avg/{name}", f"exp_avg_sq/{name}"))
        w2, m2, v2 = (wide.read(n).double().flatten() for n in (name, f"exp_avg/{name}", f"exp_avg_sq/{name}"))
        assert w2.numel() > w.numel() or name.endswith("norm"), name
        keep, keep2 = w.abs() > 1e-6, w2.abs() > 1e-6
        r1, r2 = (m / w)[keep], (v / w**2)[keep]
        order = r1.argsort()
        t1, t2 = (m2 / w2)[keep2], (v2 / w2**2)[keep2]
        at = torch.searchsorted(r1[order], t1)
        ok = torch.zeros(len(t1), dtype=torch.bool)
        for guess in (order[at.clamp(max=len(order) - 1)], order[(at - 1).clamp(min=0)]):  # either side
            ok |= ((r1[guess] - t1).abs() <= 1e-6 * t1.abs() + 1e-12) & ((r2[guess] - t2).abs() <= 1e-6 * t2.abs())
        assert bool(ok.all()), f"{name}: {int((~ok).sum())} entries whose moments are not a source entry's, scaled"
    result = carried["results"]["w_carried"]
    assert "error" not in result, result
    losses = stage_losses(carried["tmp"] / "w_carried")
    assert len(losses) == SECOND and losses[0] == pytest.approx(carried["second"][0], rel=1e-5)
    assert losses[-1] < losses[0]


def test_learned_depth_growth_carries_adams_state(carried, tmp_path):
    """G_learn with the state: each grown layer's moments are those of the source layer the map started from
    (the stack's copy: no gradients were ever taken of the learned mixture), its fp32 master copy the same
    mixture of the source's master copies as the weight is of the weights (bf16 training). Maps given by hand
    (learning them is tested in test_growth_learn.py)."""
    from megastack import layout
    from megastack.ckpt.detect import open_checkpoint
    from megastack.ckpt.execute import Comm, execute
    from megastack.ckpt.torch_dist import TorchDistWriter
    from megastack.config import to_dict
    from megastack.growth.operators import make_plan
    from megastack.growth.spec import GrowthSpec
    from megastack.plan import with_optimizer_state

    src = open_checkpoint(carried["tmp"] / "first_bf16")
    states = src.optimizer_states()
    assert states == ("fp32_param", "exp_avg", "exp_avg_sq")
    layers = src.cfg.num_layers
    maps = {  # layer i of 8 mixes source i mod 4 (weight 0.75) with source (i + 1) mod 4 (0.25)
        kind: [
            [0.75 if j == i % layers else 0.25 if j == (i + 1) % layers else 0.0 for j in range(layers)]
            for i in range(2 * layers)
        ]
        for kind in layout.LAYER_KINDS
    }
    spec = GrowthSpec("learn", factor=2, learned={"maps": maps, "report": {}}, carry_optimizer=True)
    plan = with_optimizer_state(make_plan(src.cfg, spec), states)
    writer = TorchDistWriter(plan.target, src.dtype("embedding"), optimizer_states=states)
    execute(
        writer,
        plan.producer(src, src.dtype("embedding")),
        tmp_path / "learned",
        Comm(),
        {"format": "torch_dist", "model": to_dict(plan.target)},
    )
    grown = open_checkpoint(tmp_path / "learned")
    for i in range(2 * layers):
        for kind in layout.LAYER_KINDS:
            name, a, b = (
                layout.layer_name(i, kind),
                layout.layer_name(i % layers, kind),
                layout.layer_name((i + 1) % layers, kind),
            )
            for state in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(grown.read(f"{state}/{name}"), src.read(f"{state}/{a}")), (state, name)
            want = 0.75 * src.read(f"fp32_param/{a}") + 0.25 * src.read(f"fp32_param/{b}")
            assert torch.allclose(grown.read(f"fp32_param/{name}"), want, rtol=0, atol=1e-6), name
            mixed = 0.75 * src.read(a).float() + 0.25 * src.read(b).float()  # the weight: the same mixture
            assert torch.equal(grown.read(name), mixed.to(torch.bfloat16)), name


def test_learned_width_growth_carries_adams_state(carried):
    """G_learn across width with the state: the moments are those of the maps' starting point (G_direct's
    width copy of the stacked layer, as grow --operator stack --dimension width carries them), whatever the
    learned maps became; the fp32 master is the learned mixture of the master copies, as the weight is of the
    bf16 weights. Maps given by hand: G_direct's, perturbed (learning them is tested in test_growth_learn.py)."""
    from megastack import layout
    from megastack.ckpt.detect import open_checkpoint
    from megastack.growth.learn import initial_learned
    from megastack.growth.operators import make_plan
    from megastack.growth.spec import GrowthSpec
    from megastack.plan import with_optimizer_state

    src = open_checkpoint(carried["tmp"] / "first_bf16")
    states = src.optimizer_states()
    assert states == ("fp32_param", "exp_avg", "exp_avg_sq")
    shape = {
        "dimension": "width",
        "hidden": WIDE["hidden_size"],
        "ffn": WIDE["ffn_hidden_size"],
        "carry_optimizer": True,
    }
    learned = initial_learned(src.cfg, GrowthSpec("learn", **shape))
    noise = torch.Generator().manual_seed(3)
    learned["width"] = {k: b + 0.01 * torch.randn(b.shape, generator=noise) for k, b in learned["width"].items()}
    learned |= {"report": {}}
    plan = with_optimizer_state(make_plan(src.cfg, GrowthSpec("learn", learned=learned, **shape)), states)
    direct = with_optimizer_state(make_plan(src.cfg, GrowthSpec("stack", **shape)), states)
    assert plan.target == direct.target
    dtype = src.dtype("embedding")
    grown, copied = plan.producer(src, dtype), direct.producer(src, dtype)
    for name in layout.logical_names(plan.target):
        for state in ("exp_avg", "exp_avg_sq"):
            key = layout.state_name(state, name)
            assert torch.equal(grown(key, None), copied(key, None)), key
        weight, master = grown(name, None).float(), grown(layout.state_name("fp32_param", name), None)
        assert master.dtype == torch.float32 and master.shape == weight.shape
        assert (weight - master).abs().max() <= 2e-2 * master.abs().max(), name  # bf16 weights vs fp32 masters
        start = copied(layout.state_name("fp32_param", name), None)
        assert not torch.allclose(master, start, rtol=0, atol=1e-4), name  # the learned mixture, not the start
