"""Config loading: shipped configs are valid; malformed ones give one line naming the file and field."""

import textwrap
from pathlib import Path

import pytest

from megastack.config import (
    ConfigError,
    LayoutConfig,
    ModelConfig,
    ParallelConfig,
    from_dict,
    load_model_config,
)
from megastack.errors import UserError
from megastack.validate import load_any_config

from conftest import REPO, assert_one_line_error, run_cli

GOOD_MODEL = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    vocab_size=256,
    seq_length=32,
)


def test_shipped_model_configs_load():
    names = sorted(p.stem for p in (REPO / "configs" / "models").glob("*.yaml"))
    assert {"tiny", "tiny-small", "llama-410m", "llama-1.1b", "llama-3b", "llama-7b"} <= set(names)
    for name in names:
        cfg = load_model_config(name)
        assert cfg.name == name


def test_paper_table_and_small_counterparts():
    for name, layers, hidden, heads, groups, ffn in [
        ("llama-410m", 24, 1024, 16, 1, 4096),
        ("llama-1.1b", 24, 2048, 16, 4, 5632),
        ("llama-3b", 32, 2560, 20, 4, 7040),
        ("llama-7b", 32, 4096, 32, 8, 11008),
    ]:
        big, small = load_model_config(name), load_model_config(name + "-small")
        shape = (
            big.num_layers,
            big.hidden_size,
            big.num_attention_heads,
            big.query_groups,
            big.ffn_hidden_size,
            big.vocab_size,
            big.seq_length,
        )
        assert shape == (layers, hidden, heads, groups, ffn, 32000, 2048)
        assert small.num_layers * 4 == big.num_layers and small.hidden_size == big.hidden_size


def test_parameter_count_by_hand():
    # hidden 64, 4 heads of 16, 2 groups: qkv rows (4 + 2*2) * 16 = 128.
    cfg = ModelConfig(**GOOD_MODEL)
    per_layer = 128 * 64 + 64 * 64 + 3 * 64 * 96 + 2 * 64
    assert cfg.non_embedding_parameters() == 4 * per_layer + 64
    assert cfg.total_parameters() == 4 * per_layer + 64 + 2 * 256 * 64


def test_parallel_derived_sizes():
    p = ParallelConfig(tensor=2, pipeline=1, micro_batch_size=2, global_batch_size=16)
    assert p.data_parallel_size(4) == 2
    assert p.gradient_accumulation_steps(4) == 4
    with pytest.raises(UserError, match="multiple of tensor x pipeline"):
        p.data_parallel_size(3)


def yaml_text(model: dict | None = None, parallel: dict | None = None, extra: str = "") -> str:
    import yaml

    body = {"model": {**GOOD_MODEL, **(model or {})}}
    body["model"] = {k: v for k, v in body["model"].items() if v != "__drop__"}
    if parallel is not None:
        body["parallel"] = parallel
    return yaml.safe_dump(body) + extra


BAD = [
    ("missing field", yaml_text({"hidden_size": "__drop__"}), "model.hidden_size", "missing"),
    ("wrong type", yaml_text({"num_layers": "four"}), "model.num_layers", "integer"),
    ("bool for int", yaml_text({"num_layers": True}), "model.num_layers", "integer"),
    ("heads do not divide hidden", yaml_text({"num_attention_heads": 6}), "model.num_attention_heads", "divide"),
    ("groups do not divide heads", yaml_text({"num_query_groups": 3}), "model.num_query_groups", "divide"),
    ("negative size", yaml_text({"ffn_hidden_size": -8}), "model.ffn_hidden_size", "positive"),
    ("zero layers", yaml_text({"num_layers": 0}), "model.num_layers", "positive"),
    ("unknown model key", yaml_text({"hidden": 64}), "model.hidden", "not a known field"),
    ("unknown top key", yaml_text(extra="optimizer: adam\n"), "optimizer", "not a known field"),
    ("bad dtype", yaml_text({"dtype": "fp8"}), "model.dtype", "'fp32'"),
    ("tp does not divide heads", yaml_text(parallel={"tensor": 3}), "parallel.tensor", "num_attention_heads"),
    (
        "tp does not divide groups",
        yaml_text({"num_query_groups": 1}, {"tensor": 2}),
        "parallel.tensor",
        "num_query_groups",
    ),
    ("tp does not divide vocab", yaml_text({"vocab_size": 255}, {"tensor": 2}), "parallel.tensor", "vocab_size"),
    ("pp does not divide layers", yaml_text(parallel={"pipeline": 3}), "parallel.pipeline", "num_layers"),
    ("zero-3 with pp", yaml_text(parallel={"pipeline": 2, "zero_stage": 3}), "parallel.zero_stage", "pipeline"),
    ("bad zero stage", yaml_text(parallel={"zero_stage": 4}), "parallel.zero_stage", "one of"),
    ("negative micro batch", yaml_text(parallel={"micro_batch_size": -1}), "parallel.micro_batch_size", "positive"),
    (
        "batch not divisible",
        yaml_text(parallel={"data": 2, "micro_batch_size": 2, "global_batch_size": 6}),
        "parallel.global_batch_size",
        "multiple",
    ),
    ("not a mapping", "- 1\n- 2\n", "(top level)", "mapping"),
    ("nan epsilon", yaml_text({"norm_epsilon": float("nan")}), "model.norm_epsilon", "finite"),
]


@pytest.mark.parametrize("case,text,field_name,needle", BAD, ids=[b[0] for b in BAD])
def test_malformed_config_is_one_clear_error(tmp_path: Path, case, text, field_name, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_any_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and f"'{field_name}'" in message and needle in message, message


def test_cli_validate_reports_one_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text(parallel={"tensor": 3}))
    assert_one_line_error(run_cli("validate", str(path)), str(path), "parallel.tensor")
    path.write_text("model: [unclosed\n")
    assert_one_line_error(run_cli("validate", str(path)), "not valid YAML")
    assert_one_line_error(run_cli("validate", str(tmp_path / "missing.yaml")), "not found")
    ok = run_cli("validate", str(REPO / "configs" / "models" / "tiny.yaml"))
    assert ok.returncode == 0 and "valid ModelConfig" in ok.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_validate_accepts_every_shipped_config(path: Path):
    """Models, training stages and recipes are each checked by their own loader (a training config was
    once read as a layout and refused for its 'data' key)."""
    kind = {"models": "ModelConfig", "recipes": "Recipe", "train": "TrainConfig"}.get(path.parent.name)
    cfg = load_any_config(path)
    if kind is not None:
        assert type(cfg).__name__ == kind


def test_layout_config_accepts_model_by_name():
    cfg = from_dict(LayoutConfig, {"model": "tiny", "parallel": {"tensor": 2}})
    assert cfg.resolved_model().num_layers == 8


def test_model_yaml_with_scientific_notation(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_text(
        textwrap.dedent("""\
        num_layers: 2
        hidden_size: 64
        num_attention_heads: 4
        ffn_hidden_size: 96
        vocab_size: 256
        seq_length: 32
        norm_epsilon: 1e-6
        """)
    )
    assert load_any_config(path).norm_epsilon == 1e-6
