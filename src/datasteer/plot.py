"""Draw a run record (``OUTPUT_DIR/steering.jsonl``) as a PNG.

matplotlib is optional (``pip install 'datasteer[plot]'``) and imported only when a plot is
drawn. The figure is built on an Agg canvas directly, without pyplot, so that drawing
changes no global matplotlib state of the caller.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from datasteer.runlog import read_records

# Per-domain dicts that are not statistics of the update: drawn elsewhere or not at all.
_NOT_STATS = frozenset({"proportions", "served", "domain_counts"})


def _num(value: Any) -> float:
    """A record value as a float; the run log writes non-finite floats as strings ("nan", "inf")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _domains(records: list[dict[str, Any]], key: str) -> list[str]:
    """The domains of ``key`` over all records, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record.get(key) or {}))
    return list(seen)


def _is_stat(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(not isinstance(v, dict | list) for v in value.values())


def _plot_mix(fig: Any, records: list[dict[str, Any]]) -> None:
    records = sorted((r for r in records if "proportions" in r), key=lambda r: r["first_step"])
    domains = _domains(records, "proportions")
    stats = list(dict.fromkeys(k for r in records for k, v in r.items() if k not in _NOT_STATS and _is_stat(v)))
    axes = fig.subplots(1 + len(stats), 1, sharex=True, squeeze=False)[:, 0]
    # The last update holds until the end of its interval: repeat its value there.
    end = max(int(records[-1].get("last_step", records[-1]["first_step"])), int(records[-1]["first_step"])) + 1
    xs = [int(r["first_step"]) for r in records] + [end]
    for i, domain in enumerate(domains):
        ys = [_num(r["proportions"].get(domain)) for r in records]
        axes[0].step(xs, [*ys, ys[-1]], where="post", color=f"C{i}", label=domain)
    axes[0].set_ylabel("proportion")
    axes[0].set_ylim(bottom=0.0)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    for ax, stat in zip(axes[1:], stats, strict=True):
        with_stat = [r for r in records if _is_stat(r.get(stat))]
        for i, domain in enumerate(domains):
            ax.plot(
                [int(r["first_step"]) for r in with_stat],
                [_num(r[stat].get(domain)) for r in with_stat],
                "o-",
                color=f"C{i}",
                markersize=3,
            )
        ax.set_ylabel(stat)
    axes[-1].set_xlabel("step (first step each update shapes)")


def _plot_select(fig: Any, records: list[dict[str, Any]]) -> None:
    records = sorted((r for r in records if "domain_counts" in r), key=lambda r: r["first_step"])
    domains = _domains(records, "domain_counts")
    ax = fig.subplots()
    starts = [int(r["first_step"]) for r in records]
    # Each bar spans the steps its selection is trained on.
    widths = [max(1, int(r.get("last_step", r["first_step"])) - int(r["first_step"]) + 1) for r in records]
    totals = [sum(_num(v) for v in r["domain_counts"].values()) or 1.0 for r in records]
    bottoms = [0.0] * len(records)
    for i, domain in enumerate(domains):
        shares = [_num(r["domain_counts"].get(domain, 0)) / t for r, t in zip(records, totals, strict=True)]
        ax.bar(starts, shares, widths, bottoms, align="edge", color=f"C{i}", edgecolor="white", lw=0.5, label=domain)
        bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("share of selected samples")
    ax.set_xlabel("step (each bar: the steps one selection is trained on)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _plot_weight(fig: Any, records: list[dict[str, Any]]) -> None:
    records = sorted((r for r in records if "weight_mean" in r), key=lambda r: r["step"])
    domains = _domains(records, "weight_domain_mean")
    axes = fig.subplots(2 if domains else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    steps = [int(r["step"]) for r in records]
    low = [_num(r.get("weight_min")) for r in records]
    high = [_num(r.get("weight_max")) for r in records]
    ax.fill_between(steps, low, high, color="C0", alpha=0.25, step="mid", label="min / max")
    ax.plot(steps, [_num(r["weight_mean"]) for r in records], "o-", color="C0", markersize=3, label="mean")
    if any("weight_ess" in r for r in records):
        ax.plot(steps, [_num(r.get("weight_ess")) for r in records], "--", color="C3", label="ESS / n")
    ax.set_ylabel("sample weight")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if domains:
        for i, domain in enumerate(domains):
            ys = [_num((r.get("weight_domain_mean") or {}).get(domain)) for r in records]
            axes[1].plot(steps, ys, "o-", color=f"C{i}", markersize=3, label=domain)
        axes[1].set_ylabel("mean weight per domain")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes[-1].set_xlabel("step")


_PLOTTERS = {
    "mix": (_plot_mix, "proportions"),
    "select": (_plot_select, "domain_counts"),
    "weight": (_plot_weight, "weight_mean"),
}


def plot_run(output_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw a run's ``steering.jsonl`` as a PNG.

    One section per stage the run has, in composition order. Mix: the proportions per domain
    as step curves over the step each update starts to shape, plus one panel per per-domain
    statistic (``alpha``, ``delta``, ...). Select: the domain shares of each selection as
    stacked bars. Weight: the mean weight per step with a min/max band and the effective
    sample size, and the mean weight of each domain.

    Args:
        output_dir: the run's output directory, holding ``steering.jsonl``.
        output: where to write the PNG; ``OUTPUT_DIR/steering.png`` if None.

    Returns:
        The path of the PNG written.

    Raises:
        FileNotFoundError: there is no ``steering.jsonl``.
        ValueError: it holds no records this function can draw.
        ImportError: matplotlib is not installed.
    """
    path = Path(output_dir) / "steering.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run record")
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: empty run record")
    drawn = []  # (paradigm, its records, panels) in composition order
    for paradigm, (_, key) in _PLOTTERS.items():
        mine = [r for r in records if r.get("paradigm") == paradigm and key in r]
        if mine:
            panels = 1
            if paradigm == "mix":
                panels += len({k for r in mine for k, v in r.items() if k not in _NOT_STATS and _is_stat(v)})
            if paradigm == "weight" and any(r.get("weight_domain_mean") for r in mine):
                panels += 1
            drawn.append((paradigm, mine, panels))
    if not drawn:
        raise ValueError(f"{path}: no record to draw (expected mix, select or weight records)")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib: pip install 'datasteer[plot]' ({err})") from None

    total = sum(panels for _, _, panels in drawn)
    fig = Figure(figsize=(8.0, 1.0 + 2.4 * total), layout="constrained")
    FigureCanvasAgg(fig)
    parts = fig.subfigures(len(drawn), 1, height_ratios=[panels for _, _, panels in drawn], squeeze=False)[:, 0]
    for part, (paradigm, mine, _) in zip(parts, drawn, strict=True):
        _PLOTTERS[paradigm][0](part, mine)
        part.suptitle(f"{paradigm}: {mine[0].get('algorithm', '?')}", fontsize="medium")
    fig.suptitle(str(Path(output_dir)), fontsize="medium")
    target = Path(output) if output is not None else Path(output_dir) / "steering.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    return target
