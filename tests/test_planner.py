"""The growth planner: the fitted laws against worked examples, number parsing, bad input, the CLI.

Expected values are computed here from the formulas as published (growth-science.md), never from the
planner's own constants, so a typo in a constant fails a test. No torch or megatron: these run instantly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from megastack.errors import UserError
from megastack.planner import parse_count, parse_factor, plan_growth

from conftest import REPO, assert_one_line_error, run_cli


def hand_d(n: float, d_tokens: float) -> float:
    """Du et al.: log10(d) = 0.88 log10(N) + 163.27 / log10(6 N D) - 5.74, typed in from the paper."""
    return 10 ** (0.88 * math.log10(n) + 163.27 / math.log10(6 * n * d_tokens) - 5.74)


def hand_kaplan(n: float, d_tokens: float) -> float:
    return ((8.8e13 / n) ** (0.076 / 0.095) + 5.4e13 / d_tokens) ** 0.095


def llama_params(layers: int, hidden: int, heads: int, groups: int, ffn: int, vocab: int) -> tuple[int, int]:
    """(non-embedding, total) parameters of an untied Llama, counted by hand: QKV, out, SwiGLU, 2 norms."""
    head_dim = hidden // heads
    attn = (heads + 2 * groups) * head_dim * hidden + hidden * hidden
    per_layer = attn + 3 * hidden * ffn + 2 * hidden
    non_embedding = layers * per_layer + hidden  # + final norm
    return non_embedding, non_embedding + 2 * vocab * hidden


# ----------------------------------------------------------------------------- worked examples


@pytest.mark.parametrize(
    "n, tokens, by_hand",
    [
        (7e9, 2e12, 1.1113e10),  # the notes' example: "N = 7e9, D = 2e12 gives d ~ 1.1e10"
        (1.1e9, 97.5e9, 1.1554e10),  # the paper's 1.1B run (it used d = 10B)
        (410e6, 1e11, 7.0184e9),
    ],
)
def test_growth_timing_worked_examples(n, tokens, by_hand):
    plan = plan_growth(n, tokens)
    assert plan.growth_tokens == pytest.approx(hand_d(n, tokens), rel=1e-9, abs=1)
    assert plan.growth_tokens == pytest.approx(by_hand, rel=1e-3)  # worked out on paper, digit by digit
    assert plan.compute == pytest.approx(6 * n * tokens)


def test_7b_example_without_model():
    n, tokens = 7e9, 2e12
    plan = plan_growth(n, tokens)
    d = hand_d(n, tokens)
    assert 1.05e10 < plan.growth_tokens < 1.2e10
    assert plan.factor == 4
    assert plan.small_estimated and plan.small is None
    assert plan.small_parameters == pytest.approx(n / 4)
    assert plan.flops_small == pytest.approx(6 * (n / 4) * d, rel=1e-9)
    assert plan.flops_large == pytest.approx(6 * n * tokens)
    assert plan.flops_scratch == pytest.approx(6 * n * tokens)
    assert plan.flops_growth == pytest.approx(6 * (n / 4) * d + 6 * n * tokens, rel=1e-9)
    assert plan.loss_scratch == pytest.approx(hand_kaplan(n, tokens), rel=1e-9)
    assert plan.min_tokens == pytest.approx(5e3 * n**0.74, rel=1e-9)
    assert plan.paper_speedup is not None and plan.paper_speedup.speedup == pytest.approx(0.546)
    assert any("estimated as N/g" in note for note in plan.notes)
    assert not any("extrapolation" in note for note in plan.notes)


def test_kaplan_and_overfitting_by_hand():
    # (8.8e13 / 1e9)^0.8 = 88000^0.8 = 9033.0; 5.4e13 / 1e11 = 540; 9573.0^0.095 = 2.3888
    plan = plan_growth(1e9, 1e11)
    assert plan.loss_scratch == pytest.approx(2.3888, rel=1e-4)
    # 5e3 * (1e9)^0.74 = 5e3 * 10^6.66 = 5e3 * 4.5709e6 = 2.2854e10
    assert plan.min_tokens == pytest.approx(2.2854e10, rel=1e-4)
    assert plan.to_dict()["overfitting"]["ok"] and not any("may overfit" in note for note in plan.notes)
    short = plan_growth(1e9, 1e10)  # 1e10 < 2.2854e10
    assert not short.to_dict()["overfitting"]["ok"] and any("may overfit" in note for note in short.notes)


def test_with_shipped_model_counts_the_small_config():
    plan = plan_growth(7e9, 2e12, model="llama-7b")
    small_ne, small_total = llama_params(8, 4096, 32, 8, 11008, 32000)
    big_ne, big_total = llama_params(32, 4096, 32, 8, 11008, 32000)
    assert (small_ne, small_total) == (1_417_744_384, 1_679_888_384)
    assert plan.small is not None and plan.small.num_layers == 8 and plan.small.hidden_size == 4096
    assert plan.small_parameters == small_total and plan.small_non_embedding_parameters == small_ne
    assert plan.target_parameters == big_total
    d = hand_d(7e9, 2e12)  # d uses --params, the size the fit is quoted in
    assert plan.flops_small == pytest.approx(6 * small_total * d, rel=1e-9)
    assert plan.flops_scratch == pytest.approx(6 * big_total * 2e12)
    assert plan.loss_scratch == pytest.approx(hand_kaplan(big_ne, 2e12), rel=1e-9)
    assert any("differs from llama-7b" in note for note in plan.notes)
    assert not any("DeepNarrow" in note for note in plan.notes)


def test_nearest_valid_factor_and_notes():
    plan = plan_growth(1.1e9, 97.5e9, factor=5, model="llama-1.1b")  # 24 layers: 4 and 6 tie, 4 is in 2-4
    assert (plan.requested_factor, plan.factor, plan.small.num_layers) == (5, 4, 6)
    assert any("does not divide" in note and "24 layers" in note for note in plan.notes)
    assert plan_growth(3e9, 1e11, factor=3, model="llama-3b").factor == 2  # 32 layers: 2 and 4 tie
    wide = plan_growth(7e9, 2e12, factor=8)
    assert any("outside 2-4" in note for note in wide.notes) and wide.paper_speedup is None
    far = plan_growth(70e9, 2e12)
    assert any("extrapolation" in note and "410M-7B" in note for note in far.notes)
    assert any("extrapolation" in note for note in plan_growth(100e6, 1e10).notes)


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, value",
    [
        ("7e9", 7e9),
        ("7B", 7e9),
        ("7b", 7e9),
        ("2T", 2e12),
        ("2t", 2e12),
        ("410M", 410e6),
        ("32k", 32e3),
        ("1.5B", 1.5e9),
        ("97.5B", 97.5e9),
        ("7_000_000_000", 7e9),
        ("7,000,000,000", 7e9),
        (" 7B ", 7e9),
        ("7 B", 7e9),
        ("1000", 1000),
        ("2.5e+11", 2.5e11),
        ("+3B", 3e9),
        (7e9, 7e9),
        (1, 1),
    ],
)
def test_parse_count_formats(text, value):
    assert parse_count(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    ["-7B", "-1", "0", "0B", "0.5", "nan", "inf", "-inf", "abc", "", "B", "7BB", "1,5B", "1e999", "7e", "1..5", "0x10"],
)
def test_parse_count_rejects(text):
    with pytest.raises(UserError) as info:
        parse_count(text, "--tokens", "a number of tokens")
    assert str(info.value).startswith("--tokens:") and "\n" not in str(info.value)


def test_parse_factor():
    assert parse_factor("4") == 4 and parse_factor("2.5") == 2.5 and parse_factor("1") == 1
    for bad in ("0.5", "0", "-4", "--4", "+-4", "abc", "nan", "inf", "1e400", "4e", ""):
        with pytest.raises(UserError, match="--factor"):
            parse_factor(bad)


# ----------------------------------------------------------------------------- the command


def test_cli_json_keys():
    proc = run_cli("plan", "--params", "7B", "--tokens", "2T", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"growth_tokens", "factor", "small_model", "flops", "notes", "sources"} <= set(out)
    assert {"small", "large", "scratch"} <= set(out["flops"])
    assert out["growth_tokens"] == pytest.approx(hand_d(7e9, 2e12), abs=1)
    assert out["factor"] == 4
    assert out["flops"]["scratch"] == pytest.approx(6 * 7e9 * 2e12)


def test_cli_table_with_model_and_note():
    proc = run_cli(
        "plan", "--params", "1.1B", "--tokens", "97.5B", "--model", "llama-1.1b", "--factor", "5", timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "growth timing d" in proc.stdout and "6 layers x hidden 2048" in proc.stdout
    assert "does not divide" in proc.stdout and "410M-7B" in proc.stdout
    proc = run_cli("plan", "--params", "70B", "--tokens", "2T", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert any("extrapolation" in note for note in json.loads(proc.stdout)["notes"])


def test_deepnarrow_note(tmp_path):
    cfg = tmp_path / "wide.yaml"
    cfg.write_text(
        textwrap.dedent("""\
        name: wide
        num_layers: 4
        hidden_size: 2048
        num_attention_heads: 16
        ffn_hidden_size: 5632
        vocab_size: 32000
        seq_length: 2048
    """)
    )
    plan = plan_growth(3e8, 1e11, model=str(cfg))
    assert plan.small.num_layers == 1
    assert any("DeepNarrow" in note for note in plan.notes)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--params=-7B", "--tokens", "2T"], ["--params", "-7B"]),
        (["--params", "-7", "--tokens", "2T"], ["--params", "negative"]),
        (["--params", "0", "--tokens", "2T"], ["--params"]),
        (["--params", "7B", "--tokens", "0"], ["--tokens"]),
        (["--params", "seven", "--tokens", "2T"], ["--params", "not a number"]),
        (["--params", "7B", "--tokens", "nan"], ["--tokens"]),
        (["--params", "7B", "--tokens", "2T", "--factor", "0.5"], ["--factor", "at least 1"]),
        (["--params", "7B", "--tokens", "2T", "--factor", "four"], ["--factor"]),
        (["--params", "7B", "--tokens", "2T", "--model", "llama-7b", "--factor", "2.5"], ["--factor", "whole"]),
        (["--params", "7B", "--tokens", "2T", "--model", "no-such-model"], ["no-such-model"]),
    ],
)
def test_cli_bad_input_is_one_line(args, needles):
    assert_one_line_error(run_cli("plan", *args, timeout=60), *needles)


def test_cli_one_layer_model_cannot_grow(tmp_path):
    cfg = tmp_path / "one.yaml"
    cfg.write_text(
        "num_layers: 1\nhidden_size: 64\nnum_attention_heads: 4\nffn_hidden_size: 128\n"
        "vocab_size: 256\nseq_length: 32\n"
    )
    assert_one_line_error(
        run_cli("plan", "--params", "1M", "--tokens", "1B", "--model", str(cfg), timeout=60),
        "1-layer",
        "at least 2 layers",
    )


def test_plan_imports_no_torch_or_megatron():
    code = (
        "import sys; from megastack.cli import main; "
        "assert main(['plan', '--params', '7B', '--tokens', '2T', '--model', 'llama-7b']) == 0; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'deepspeed')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
