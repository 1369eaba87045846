"""The reference Llama equals Hugging Face transformers, and the layout cuts are exact inverses."""

import pytest
import torch

from megastack import layout
from megastack.config import ModelConfig
from megastack.model.reference import ReferenceLlama, stacked_reference

transformers = pytest.importorskip("transformers")


def hf_model(cfg: ModelConfig):
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    return transformers.LlamaForCausalLM(hc).eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_reference_equals_transformers(tie, groups):
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=groups,
        ffn_hidden_size=96,
        vocab_size=256,
        seq_length=16,
        tie_embeddings=tie,
        rotary_base=500.0,
    )
    ref = ReferenceLlama(cfg).init_weights(seed=1)
    hf = hf_model(cfg)
    hf.load_state_dict(ref.state_dict(), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ref(tokens)).abs().max().item() < 1e-5


def test_qkv_fusion_groups_by_hand():
    # 4 heads, 2 groups, head dim 1, hidden 1: rows are labelled so the grouped order is visible.
    cfg = ModelConfig(
        num_layers=1,
        hidden_size=4,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=4,
        vocab_size=8,
        seq_length=4,
    )
    assert cfg.head_dim == 1
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]]).expand(4, 4)  # heads 0,1 -> group 0; 2,3 -> group 1
    k = torch.tensor([[20.0], [21.0]]).expand(2, 4)
    v = torch.tensor([[30.0], [31.0]]).expand(2, 4)
    fused = layout.fuse_qkv(q, k, v, cfg)
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    q2, k2, v2 = layout.split_qkv(fused, cfg)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize(
    "kind,shape",
    [
        ("qkv", (16, 8)),
        ("proj", (8, 8)),
        ("fc1", (12, 8)),
        ("fc2", (8, 6)),
        ("embedding", (32, 8)),
        ("attn_norm", (8,)),
    ],
)
@pytest.mark.parametrize("tp", [1, 2])
def test_tp_shard_merge_round_trip(kind, shape, tp):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    shards = [layout.tp_shard(kind, full, r, tp) for r in range(tp)]
    for s in shards:
        assert tuple(s.shape) == layout.tp_shard_shape(kind, shape, tp)
    assert torch.equal(layout.tp_merge(kind, shards), full)


def test_glu_shard_holds_gate_and_up_halves():
    fc1 = torch.arange(8.0).reshape(8, 1)  # gate rows 0-3, up rows 4-7
    assert layout.tp_shard("fc1", fc1, 1, 2)[:, 0].tolist() == [2, 3, 6, 7]


def test_hf_logical_round_trip_is_exact():
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        vocab_size=64,
        seq_length=8,
    )
    state = ReferenceLlama(cfg).init_weights(seed=2).state_dict()
    logical = layout.logical_from_hf(state, cfg)
    assert set(logical) == set(layout.logical_names(cfg))
    for name, tensor in logical.items():
        assert tuple(tensor.shape) == layout.logical_shape(cfg, name)
    back = layout.hf_from_logical(logical, cfg)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_mcore_names_round_trip():
    assert layout.logical_from_mcore_name("decoder.layers.1.mlp.linear_fc1.weight", 4) == "layers.5.fc1"
    assert layout.logical_from_mcore_name("decoder.layers.0.input_layernorm.weight") == "layers.0.attn_norm"
    assert (
        layout.logical_from_mcore_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
        == "layers.0.attn_norm"
    )
    assert layout.mcore_name("layers.5.fc1", 4) == "decoder.layers.1.mlp.linear_fc1.weight"
    assert layout.mcore_name("output") == "output_layer.weight"
    assert layout.logical_from_mcore_name("decoder.layers.0.self_attention.linear_qkv._extra_state") is None


def test_stage_layers_split_evenly():
    assert [list(layout.stage_layers(8, r, 4)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_stacked_reference_repeats_blocks():
    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=64, seq_length=8
    )
    small = ReferenceLlama(cfg).init_weights(seed=3)
    big = stacked_reference(small, [0, 1, 0, 1])
    assert big.cfg.num_layers == 4
    assert torch.equal(big.model.layers[2].self_attn.q_proj.weight, small.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(big.lm_head.weight, small.lm_head.weight)
