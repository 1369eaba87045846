"""What a run shows: FLOPs to reach the baseline's loss, the summary table and the loss-vs-FLOPs plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megastack.fsio import atomic_write_json, atomic_write_text
from megastack.run.dirs import RunDirs
from megastack.run.recipe import Recipe

# ----------------------------------------------------------------------------- results


def eval_curve(stage_dir: Path) -> list[tuple[float, float]]:
    """(cumulative FLOPs, valid loss) of every evaluation a stage logged, in order."""
    from megastack.train.loop import LOG_FILE, log_records

    path = stage_dir / LOG_FILE
    if not path.is_file():
        return []
    points = []
    for _, record in log_records(path):
        if record.get("type") == "eval" and record.get("valid_loss") is not None:
            try:
                points.append((float(record["cumulative_flops"]), float(record["valid_loss"])))
            except (ValueError, TypeError, KeyError):
                continue  # not a point of the curve
    return points


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a curve first reaches ``target`` loss, linearly interpolated; None if it never does."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None:
                return flops
            f0, l0 = previous
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss) if l0 != loss else flops
        previous = (flops, loss)
    return None


def write_summary(
    recipe: Recipe, dirs: RunDirs, stages: list[Any], results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """summary.json, summary.md and the plot, from the stages' markers and logs. The grown chain's FLOPs to
    reach the baseline's final loss are searched after the first growth (the small stage counted)."""
    rows = []
    for stage in stages:
        r = results.get(stage.name)
        if r is None:
            continue
        parameters = stage.train.resolved_model().total_parameters() if stage.train is not None else None
        rows.append(
            {
                "stage": stage.name,
                "parameters": parameters,
                "tokens_per_parameter": r["tokens"] / parameters if parameters and r.get("tokens") else None,
                "tokens": r.get("tokens"),
                "flops": r.get("flops"),
                "cumulative_flops": r.get("cumulative_flops"),
                "final_train_loss": r.get("final_train_loss"),
                "final_valid_loss": r.get("final_valid_loss"),
                "wall_seconds": r.get("wall_seconds"),
                "checkpoint": r.get("checkpoint"),
            }
        )
    chain = [s.name for s in stages if s.train is not None and s.name != "scratch"]
    after_growth = [point for name in chain[1:] for point in eval_curve(dirs.stage_dir(name))]
    grown = eval_curve(dirs.stage_dir(chain[0])) + after_growth
    scratch = eval_curve(dirs.stage_dir("scratch"))
    comparison: dict[str, Any] = {}
    if scratch and grown:
        target = scratch[-1][1]
        reached = flops_to_reach(after_growth, target)
        first = eval_curve(dirs.stage_dir(chain[0]))
        scratch_row = next((r for r in rows if r["stage"] == "scratch"), {})
        comparison = {
            "scratch_final_valid_loss": target,
            "scratch_flops": scratch[-1][0],
            "scratch_tokens_per_parameter": scratch_row.get("tokens_per_parameter"),
            "grown_flops_to_scratch_loss": reached,
            # the small model alone at or below scratch's final loss: the baseline is under-trained, and a
            # saving measured against it says nothing about growth
            "small_final_valid_loss": first[-1][1] if first else None,
            "small_alone_reaches_scratch": bool(first) and first[-1][1] <= target,
        }
        if reached and not comparison["small_alone_reaches_scratch"]:
            comparison["flops_saving"] = 1 - reached / scratch[-1][0]
            comparison["speedup"] = scratch[-1][0] / reached - 1
    summary = {
        "recipe": recipe.name,
        "stages": rows,
        "comparison": comparison,
        "curves": {"grown": grown, "scratch": scratch},
    }
    atomic_write_json(dirs.out / "summary.json", summary)
    atomic_write_text(dirs.out / "summary.md", summary_table(summary))
    plot_curves(summary, dirs.out / "loss_vs_flops.png")
    return summary


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(summary: dict[str, Any]) -> str:
    lines = [
        f"# megastack run: {summary['recipe']}",
        "",
        "| stage | tokens | tokens/param | FLOPs | cumulative FLOPs | final train loss | final valid loss | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["stages"]:
        lines.append(
            f"| {r['stage']} | {_fmt(r['tokens'], ',')} | {_fmt(r.get('tokens_per_parameter'), '.2f')} | "
            f"{_fmt(r['flops'], '.3e')} | "
            f"{_fmt(r['cumulative_flops'], '.3e')} | {_fmt(r['final_train_loss'], '.4f')} | "
            f"{_fmt(r['final_valid_loss'], '.4f')} | {_fmt(r['wall_seconds'], '.1f')} |"
        )
    c = summary["comparison"]
    if c:
        lines += [
            "",
            f"Scratch baseline: final valid loss {c['scratch_final_valid_loss']:.4f} at "
            f"{c['scratch_flops']:.3e} FLOPs.",
        ]
        if c.get("small_alone_reaches_scratch"):
            lines.append(
                f"The {summary['stages'][0]['stage']} model alone reached a validation loss of "
                f"{c['small_final_valid_loss']:.4f}, "
                "at or below the scratch baseline's final loss, before any growth: the baseline is "
                "under-trained at this budget, so no saving is claimed."
            )
        elif c.get("grown_flops_to_scratch_loss"):
            lines.append(
                f"Grown run reached it at {c['grown_flops_to_scratch_loss']:.3e} cumulative FLOPs "
                f"(small stage included): {c['flops_saving']:.1%} fewer FLOPs, speedup "
                f"{c['speedup']:.1%} (FLOPs_scratch / FLOPs_grown - 1)."
            )
        else:
            lines.append("Grown run did not reach the scratch baseline's final loss within its budget.")
        per_param = c.get("scratch_tokens_per_parameter")
        if per_param is not None and per_param < WELL_TRAINED_TOKENS_PER_PARAMETER:
            lines.append(
                f"The scratch baseline trained {per_param:.2f} tokens per parameter, far below the ~20 at which "
                "a model is well trained (Chinchilla; the paper's 1.1B run: about 90): a comparison at this "
                "budget shows the machinery works, not the saving growth gives at a real budget "
                "(bench/speedup.py's presets measure that)."
            )
    return "\n".join(lines) + "\n"


WELL_TRAINED_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022: compute-optimal training


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    c = summary["comparison"]
    note = None
    if c.get("flops_saving") is not None:
        note = (c["grown_flops_to_scratch_loss"], c["scratch_final_valid_loss"], f"{c['flops_saving']:.0%} fewer FLOPs")
    plot_loss_curves(
        [
            ("grown (small + large)", summary["curves"]["grown"], {"fmt": "o-"}),
            ("scratch", summary["curves"]["scratch"], {"fmt": "s--"}),
        ],
        path,
        f"megastack run: {summary['recipe']}",
        note=note,
    )


def plot_loss_curves(
    curves: list[tuple[str | None, list[tuple[float, float]], dict[str, Any]]],
    path: Path,
    title: str,
    *,
    note: tuple[float, float, str] | None = None,
    ylim: tuple[float, float] | None = None,
) -> None:
    """Validation loss against cumulative FLOPs, one line per (label, points, matplotlib style) curve;
    ``note`` = (FLOPs, loss, text) marks where a run reached the baseline's final loss. Shared by
    ``megastack run`` and bench/speedup.py so both draw the same figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points, style in curves:
        if points:
            style = {"markersize": 3} | style
            fmt = style.pop("fmt", "o-")
            ax.plot([p[0] for p in points], [p[1] for p in points], fmt, label=label, **style)
    if note is not None:
        ax.axhline(note[1], color="gray", linewidth=0.8)
        ax.annotate(note[2], (note[0], note[1]), textcoords="offset points", xytext=(5, 8), fontsize=9)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
