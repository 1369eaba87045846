"""The growth planner behind ``megastack plan``: small model, growth timing d and factor g from fitted laws.

Users ask before spending a cluster month how large the small model should be, how many tokens it
trains before growing and what growth saves; recipes take d from the same numbers. Everything here is
arithmetic on published fitted laws (their papers in ``SOURCES``), so this module imports
only the config loader: no torch, no megatron, and ``megastack plan`` answers instantly.

FLOPs accounting (one rule everywhere): FLOPs = 6 x parameters x tokens with TOTAL parameters (embeddings
included), the unit users quote N in. The input-embedding lookup costs no FLOPs, so this overcounts a
little, most for the small model: the small stage's cost is conservative. The paper's setting is
followed: the small model trains d tokens, the grown model then trains the full D tokens, the scratch
baseline trains the target for D tokens. So growth costs small + large > scratch for the same D; it pays
off by reaching scratch's loss in fewer tokens, which the paper measured (``PAPER_SPEEDUPS``) and no fitted
law here predicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from megastack.config import ModelConfig, load_model_config, to_dict
from megastack.errors import UserError

# Du et al. 2024 (arXiv 2405.15319): log10(d) = A log10(N) + B / log10(C) + E, fitted on 410M-7B targets.
TIMING_A, TIMING_B, TIMING_E = 0.88, 163.27, -5.74
FIT_MIN_PARAMS, FIT_MAX_PARAMS = 410e6, 7e9
BEST_FACTORS = (2.0, 4.0)  # the paper's sweeps found the optimum g in this range and fixed g = 4

# Kaplan et al. 2020 (arXiv 2001.08361): L(N, D) = [(Nc/N)^(aN/aD) + Dc/D]^aD, N non-embedding, nats.
KAPLAN_NC, KAPLAN_DC, KAPLAN_AN, KAPLAN_AD = 8.8e13, 5.4e13, 0.076, 0.095
OVERFIT_COEF, OVERFIT_EXP = 5e3, 0.74  # overfitting is avoided when D >= 5e3 N^0.74

# DeepNarrow (Tay et al. 2021): hidden / layers above this counts as wide and shallow. Llama-style models
# sit at 40-130 (410M: 43, 1.1B: 85, 3B: 80, 7B and 13B: 128, 70B: 102); 256 is twice the widest of those.
DEEPNARROW_MAX_ASPECT = 256.0

# How far --params may sit from a paper model size for its measured speedup to be shown, as a ratio.
SPEEDUP_MATCH_RATIO = 1.25
_PARAMS_MISMATCH = 0.10  # --params vs the --model config's total: above this relative gap, say so

SOURCES = (
    "growth timing d: Du et al. 2024, 'Stacking Your Transformers' (arXiv 2405.15319), "
    "log10(d) = 0.88 log10(N) + 163.27/log10(C) - 5.74 with C = 6ND, fitted on 410M-7B targets; "
    "outside that range d is an extrapolation",
    "growth factor g: the same paper found the optimum between 2 and 4 and fixed g = 4",
    "losses: Kaplan et al. 2020 (arXiv 2001.08361), L(N, D) = [(Nc/N)^(aN/aD) + Dc/D]^aD with "
    "Nc = 8.8e13, Dc = 5.4e13, aN = 0.076, aD = 0.095, N non-embedding, nats on their data and tokenizer "
    "(fitted on models up to 1.5B non-embedding parameters); use the trend, not the absolute value",
    "overfitting check: Kaplan et al. 2020, D >= 5e3 N^0.74",
    "FLOPs: 6 x total parameters x tokens; the grown model trains D tokens after growth, as in the paper",
)


@dataclass(frozen=True)
class PaperSpeedup:
    """A speedup Du et al. measured with G_stack at g = 4: a measured number, not a prediction."""

    model: str
    params: float
    speedup: float
    setting: str


PAPER_SPEEDUPS = (
    PaperSpeedup("1.1B", 1.1e9, 0.491, "400M base grown to 1.1B, d = 10B, D = 97.5B tokens"),
    PaperSpeedup("3B", 3e9, 0.545, "measured at 240B tokens"),
    PaperSpeedup("7B", 7e9, 0.546, "reached scratch's 300B-token loss with 194B tokens"),
)


# ----------------------------------------------------------------------------- numbers from the user

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_PLAIN = re.compile(r"\+?(\d[\d_]*)?(\.\d[\d_]*)?([eE][+-]?\d+)?")
_COMMAS = re.compile(r"\+?\d{1,3}(,\d{3})+(\.\d+)?")


def parse_count(text: str | float, flag: str = "--params", what: str = "a count") -> float:
    """``7e9``, ``7B``, ``2T``, ``410m``, ``7_000_000_000``, ``7,000,000,000`` -> float, at least 1.

    Suffixes K, M, B, T (any case) are powers of 1000; commas must group thousands so ``1,5B`` is not
    silently read as 15B. Anything else is a one-line UserError naming the flag.
    """
    example = "e.g. 7e9, 7B or 2T"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text)
        body = raw.strip()
        scale = 1.0
        if body and body[-1].lower() in _SUFFIXES:
            scale = _SUFFIXES[body[-1].lower()]
            body = body[:-1].rstrip()
        if "," in body:
            if not _COMMAS.fullmatch(body):
                raise UserError(f"{flag}: '{raw}' has commas that do not group thousands; {example}")
            body = body.replace(",", "")
        if body.startswith("-") and _PLAIN.fullmatch(body[1:]) and any(c.isdigit() for c in body):
            raise UserError(f"{flag}: '{raw}' is negative; it must be {what} of at least 1, {example}")
        if not body or not any(c.isdigit() for c in body) or not _PLAIN.fullmatch(body):
            raise UserError(f"{flag}: '{raw}' is not a number; pass {what}, {example}")
        value = float(body) * scale
    if not math.isfinite(value):
        raise UserError(f"{flag}: '{text}' is not a finite number; pass {what}, {example}")
    if value < 1:
        raise UserError(f"{flag}: '{text}' must be {what} of at least 1, {example}")
    if value > MAX_COUNT:
        raise UserError(
            f"{flag}: '{text}' is above {MAX_COUNT:.0e}, beyond any model or corpus the fitted laws "
            f"speak for (and FLOP counts would overflow); pass {what}, {example}"
        )
    return value


MAX_COUNT = 1e18


def parse_factor(text: str | float) -> float:
    """The growth factor g: a finite number >= 1 (g = 1 means no growth)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        body = str(text).strip()
        unsigned = body[1:] if body.startswith("-") else body
        if not any(c.isdigit() for c in body) or not _PLAIN.fullmatch(unsigned):
            raise UserError(f"--factor: '{text}' is not a number; pass a growth factor of at least 1, e.g. 4")
        value = float(body)
    if not math.isfinite(value):
        raise UserError(f"--factor: '{text}' is not a finite number; pass a growth factor such as 4")
    if value < 1:
        raise UserError(f"--factor: '{text}' must be a growth factor of at least 1 (the paper found 2-4 best), e.g. 4")
    return value


# ----------------------------------------------------------------------------- the laws


def growth_timing(params: float, tokens: float) -> float:
    """Du et al.'s fitted d in tokens: log10(d) = 0.88 log10(N) + 163.27 / log10(6 N D) - 5.74."""
    compute = 6.0 * params * tokens
    log_c = math.log10(compute)
    if log_c <= 0:  # only for C <= 1, which parse_count's minimum of 1 rules out; a guard for API callers
        raise UserError(f"training compute 6ND = {compute:g} FLOPs is too small for the growth-timing fit")
    return 10.0 ** (TIMING_A * math.log10(params) + TIMING_B / log_c + TIMING_E)


def kaplan_loss(non_embedding_params: float, tokens: float) -> float:
    """Kaplan's L(N, D) in nats: [(Nc/N)^(aN/aD) + Dc/D]^aD."""
    return ((KAPLAN_NC / non_embedding_params) ** (KAPLAN_AN / KAPLAN_AD) + KAPLAN_DC / tokens) ** KAPLAN_AD


def min_tokens_without_overfitting(non_embedding_params: float) -> float:
    """Kaplan's D >= 5e3 N^0.74: fewer tokens than this and the model starts to overfit."""
    return OVERFIT_COEF * non_embedding_params**OVERFIT_EXP


def stack_factor(num_layers: int, factor: float) -> int:
    """The depth factor G_stack can use for a target of ``num_layers``: g itself when it divides the layers.

    Otherwise the divisor-based factor nearest g (ties: the one in the paper's 2-4 range, then the smaller).
    The whole stack is repeated, so the small depth L/g must be a whole number.
    """
    if factor != int(factor):
        raise UserError(
            f"--factor {factor:g} is not a whole number; depth stacking (G_stack) repeats the small "
            "model's layer stack a whole number of times, pass e.g. --factor 4"
        )
    g = int(factor)
    if num_layers % g == 0:
        return g
    choices = [f for f in range(2, num_layers + 1) if num_layers % f == 0]
    if not choices:
        raise UserError(f"a {num_layers}-layer target cannot be grown in depth; it needs at least 2 layers")
    return min(choices, key=lambda f: (abs(f - g), not BEST_FACTORS[0] <= f <= BEST_FACTORS[1], f))


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class GrowthPlan:
    """One growth plan: what to train, for how long, what it costs. ``to_dict`` is the ``--json`` output."""

    params: float  # N, the target's parameters as given (drives d and the validity range)
    tokens: float  # D, tokens the grown model trains after growth (and the scratch baseline trains)
    requested_factor: float
    factor: float  # the factor used: requested, or the nearest one the target's layers allow
    growth_tokens: int  # d, tokens the small model trains before growing
    target_parameters: float  # total, for FLOPs
    target_non_embedding_parameters: float  # Kaplan's N
    small_parameters: float
    small_non_embedding_parameters: float
    small_estimated: bool  # True without a model config: N / g, not a real architecture
    target: ModelConfig | None
    small: ModelConfig | None
    notes: tuple[str, ...]

    @property
    def compute(self) -> float:
        """C = 6 N D with N as given: the compute the timing fit takes."""
        return 6.0 * self.params * self.tokens

    @property
    def flops_small(self) -> float:
        return 6.0 * self.small_parameters * self.growth_tokens

    @property
    def flops_large(self) -> float:
        return 6.0 * self.target_parameters * self.tokens

    @property
    def flops_scratch(self) -> float:
        return 6.0 * self.target_parameters * self.tokens

    @property
    def flops_growth(self) -> float:
        """Small stage plus large stage: what the paper's speedup is measured against."""
        return self.flops_small + self.flops_large

    @property
    def loss_scratch(self) -> float:
        return kaplan_loss(self.target_non_embedding_parameters, self.tokens)

    @property
    def loss_small_at_growth(self) -> float:
        return kaplan_loss(self.small_non_embedding_parameters, self.growth_tokens)

    @property
    def min_tokens(self) -> float:
        return min_tokens_without_overfitting(self.target_non_embedding_parameters)

    @property
    def paper_speedup(self) -> PaperSpeedup | None:
        """The paper's measured speedup for a target of about this size grown x4, if it measured one."""
        if self.factor != 4:
            return None
        for known in PAPER_SPEEDUPS:
            if 1 / SPEEDUP_MATCH_RATIO <= self.params / known.params <= SPEEDUP_MATCH_RATIO:
                return known
        return None

    def to_dict(self) -> dict[str, Any]:
        speedup = self.paper_speedup
        small: dict[str, Any] = {
            "parameters": _plain(self.small_parameters),
            "non_embedding_parameters": _plain(self.small_non_embedding_parameters),
            "estimated": self.small_estimated,
            "num_layers": self.small.num_layers if self.small else None,
            "config": to_dict(self.small) if self.small else None,
        }
        return {
            "params": _plain(self.params),
            "tokens": _plain(self.tokens),
            "compute": self.compute,
            "growth_tokens": self.growth_tokens,
            "growth_fraction": self.growth_tokens / self.tokens,
            "factor": _plain(self.factor),
            "requested_factor": _plain(self.requested_factor),
            "small_model": small,
            "target_model": {
                "name": self.target.name if self.target else None,
                "num_layers": self.target.num_layers if self.target else None,
                "parameters": _plain(self.target_parameters),
                "non_embedding_parameters": _plain(self.target_non_embedding_parameters),
            },
            "flops": {
                "small": self.flops_small,
                "large": self.flops_large,
                "growth": self.flops_growth,
                "scratch": self.flops_scratch,
                "small_overhead": self.flops_small / self.flops_scratch,
            },
            "paper_speedup": None
            if speedup is None
            else {
                "model": speedup.model,
                "speedup": speedup.speedup,
                "setting": speedup.setting,
                "note": "measured by Du et al. 2024 with G_stack, g = 4; not a prediction for this plan",
            },
            "loss": {
                "scratch": self.loss_scratch,
                "small_at_growth": self.loss_small_at_growth,
                "law": "Kaplan et al. 2020 L(N, D), nats",
            },
            "overfitting": {"min_tokens": self.min_tokens, "ok": self.tokens >= self.min_tokens},
            "notes": list(self.notes),
            "sources": list(SOURCES),
        }

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False)  # valid JSON or an error, never NaN
        except ValueError:
            raise UserError(
                "the plan's numbers overflow (a non-finite value); pass smaller --params/--tokens"
            ) from None


def _plain(x: float) -> int | float:
    """Whole numbers as JSON integers (counts and factors read better as 7000000000 than 7000000000.0)."""
    return int(x) if float(x).is_integer() else x


def plan_growth(params: float, tokens: float, factor: float = 4, model: ModelConfig | str | None = None) -> GrowthPlan:
    """Plan growing to a target of ``params`` parameters trained on ``tokens`` tokens.

    ``model`` (a ModelConfig, a YAML path or a shipped name) makes the small model a real architecture:
    the target's config at depth L/g, counted exactly. Without it the small model is estimated as N/g.
    Bad input raises a one-line UserError.
    """
    params = parse_count(params, "--params", "a number of parameters")
    tokens = parse_count(tokens, "--tokens", "a number of tokens")
    requested = parse_factor(factor)
    if isinstance(model, str):
        model = load_model_config(model)
    notes: list[str] = []

    if model is None:
        g = requested
        target_total = target_ne = params
        small_total = small_ne = params / g
        small_cfg = None
        notes.append(
            f"no --model: the small model is estimated as N/g = {_human(small_total)} parameters and N "
            "stands in for non-embedding parameters in the loss and overfitting laws; g is a ratio of "
            "non-embedding parameters and the embedding does not shrink, so the real small model is "
            "somewhat larger; pass --model for exact counts"
        )
        if g != int(g):
            notes.append(
                f"g = {g:g} is not a whole number: depth stacking (G_stack) needs one; width growth "
                "did not speed training up in the paper"
            )
    else:
        g = stack_factor(model.num_layers, requested)
        label = model.name or "the target"
        if g != requested:
            notes.append(
                f"factor {requested:g} does not divide {label}'s {model.num_layers} layers; using the "
                f"nearest valid factor {g} ({model.num_layers // g} -> {model.num_layers} layers)"
            )
        small_layers = model.num_layers // g
        small_name = f"{model.name}-{small_layers}L" if model.name else ""  # not '-small': shipped names differ
        small_cfg = dataclasses.replace(model, num_layers=small_layers, name=small_name)
        target_total, target_ne = model.total_parameters(), model.non_embedding_parameters()
        small_total, small_ne = small_cfg.total_parameters(), small_cfg.non_embedding_parameters()
        if abs(params - target_total) > _PARAMS_MISMATCH * target_total:
            notes.append(
                f"--params {_human(params)} differs from {label}'s {_human(target_total)} total "
                "parameters; d and the validity range use --params, FLOPs and losses the config's counts"
            )
        aspect = model.hidden_size / model.num_layers
        if aspect > DEEPNARROW_MAX_ASPECT:
            notes.append(
                f"{label} is wide and shallow (hidden/layers = {aspect:.0f} > {DEEPNARROW_MAX_ASPECT:.0f}); "
                "DeepNarrow (Tay et al. 2021): at equal parameters, depth helps downstream quality more "
                "than width, consider more layers"
            )

    if g == 1:
        notes.append("g = 1 is no growth: the small model is the target")
    elif not BEST_FACTORS[0] <= g <= BEST_FACTORS[1]:
        notes.append(f"g = {g:g} is outside 2-4, the range the paper found best (it fixed g = 4)")
    if not FIT_MIN_PARAMS <= params <= FIT_MAX_PARAMS:
        notes.append(
            f"N = {_human(params)} is outside the 410M-7B range the growth-timing fit was made on: "
            "d is an extrapolation"
        )

    d = growth_timing(params, tokens)
    if d >= tokens:
        notes.append(
            f"d = {_human(d)} tokens is not below D = {_human(tokens)}: the small stage would outlast "
            "the large one; the fit is outside its regime here, consider more tokens"
        )
    min_tokens = min_tokens_without_overfitting(target_ne)
    if tokens < min_tokens:
        notes.append(
            f"D = {_human(tokens)} is below Kaplan's {_human(min_tokens)} tokens (5e3 N^0.74): the "
            "target may overfit if data repeats"
        )

    return GrowthPlan(
        params=params,
        tokens=tokens,
        requested_factor=requested,
        factor=g,
        growth_tokens=max(1, round(d)),
        target_parameters=float(target_total),
        target_non_embedding_parameters=float(target_ne),
        small_parameters=float(small_total),
        small_non_embedding_parameters=float(small_ne),
        small_estimated=model is None,
        target=model,
        small=small_cfg,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- the command


def _human(x: float) -> str:
    """1.11e10 -> '11.1B': the way users quote sizes."""
    x = float(f"{x:.3g}")  # round first so 999.6e9 reads 1T, not 1e+03B
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _sci(x: float) -> str:
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _share(part: float, whole: float) -> str:
    """'0.56% of' or '27x': a share that stays readable when the part outgrows the whole."""
    ratio = part / whole
    return f"{100 * ratio:.2g}% of" if ratio < 1 else f"{ratio:.3g}x"


def format_plan(plan: GrowthPlan) -> str:
    """The readable table ``megastack plan`` prints."""
    rows: list[tuple[str, str]] = []
    rows.append(
        (
            "target",
            f"N = {_human(plan.params)} parameters, D = {_human(plan.tokens)} tokens, "
            f"C = 6ND = {_sci(plan.compute)} FLOPs",
        )
    )
    if plan.target is not None:
        rows.append(
            (
                "target model",
                f"{plan.target.name or 'config'}: {plan.target.num_layers} layers x hidden "
                f"{plan.target.hidden_size}, {_human(plan.target_parameters)} parameters "
                f"({_human(plan.target_non_embedding_parameters)} non-embedding)",
            )
        )
    rows.append(
        (
            "growth timing d",
            f"{_human(plan.growth_tokens)} tokens ({_sci(plan.growth_tokens)}, "
            f"{_share(plan.growth_tokens, plan.tokens)} D)",
        )
    )
    factor = f"{plan.factor:g}"
    if plan.factor != plan.requested_factor:
        factor += f" (asked {plan.requested_factor:g})"
    rows.append(("growth factor g", factor))
    if plan.small is not None:
        small = (
            f"{plan.small.num_layers} layers x hidden {plan.small.hidden_size} "
            f"({plan.small.name or 'target'} = target at depth {plan.target.num_layers}/{plan.factor:g}), "
            f"{_human(plan.small_parameters)} parameters "
            f"({_human(plan.small_non_embedding_parameters)} non-embedding)"
        )
    else:
        small = f"~{_human(plan.small_parameters)} parameters (N/g estimate; pass --model for an architecture)"
    rows.append(("small model", small))
    rows.append(("FLOPs small stage", f"{_sci(plan.flops_small)} (6 x small params x d)"))
    rows.append(
        ("FLOPs large stage", f"{_sci(plan.flops_large)} (6 x target params x D: the grown model trains D tokens)")
    )
    rows.append(
        (
            "FLOPs growth total",
            f"{_sci(plan.flops_growth)} (the small stage adds {_share(plan.flops_small, plan.flops_scratch)} scratch)",
        )
    )
    rows.append(("FLOPs scratch", f"{_sci(plan.flops_scratch)} (6 x target params x D)"))
    speedup = plan.paper_speedup
    if speedup is not None:
        rows.append(
            (
                "paper's speedup",
                f"{100 * speedup.speedup:.1f}% measured for {speedup.model} "
                f"({speedup.setting}); a measurement, not a prediction for this plan",
            )
        )
    else:
        rows.append(
            ("paper's speedup", "not measured for this size and factor (the paper measured 1.1B, 3B, 7B at g = 4)")
        )
    rows.append(
        (
            "Kaplan loss",
            f"scratch L(N, D) = {plan.loss_scratch:.3f} nats; small model at growth "
            f"L(N_small, d) = {plan.loss_small_at_growth:.3f}",
        )
    )
    ok = "ok" if plan.tokens >= plan.min_tokens else "BELOW"
    rows.append(("overfitting check", f"D >= 5e3 N^0.74 = {_human(plan.min_tokens)} tokens: {ok}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    if plan.notes:
        lines.append("notes:")
        lines.extend(f"  - {note}" for note in plan.notes)
    lines.append("sources:")
    lines.extend(f"  - {source}" for source in SOURCES)
    return "\n".join(lines)


def cli_plan(args: Any) -> int:
    """``megastack plan --params N --tokens D [--factor G] [--model CONFIG] [--json]``."""
    plan = plan_growth(
        parse_count(args.params, "--params", "a number of parameters"),
        parse_count(args.tokens, "--tokens", "a number of tokens"),
        parse_factor(args.factor),
        load_model_config(args.model) if args.model else None,
    )
    print(plan.to_json() if args.json else format_plan(plan))
    return 0
