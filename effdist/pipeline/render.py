"""Timeline pictures of simulated schedules: SVG written as text (one <rect> per action) and PNG via matplotlib;
and `write_measured_png`, a measured step (timeline.py) above its simulation.

One panel per schedule; one row per rank with its actions (colour = op kind, lighter for a rank's later chunks,
microbatch number inside when it fits) and, under it, a strip with the rank's activation memory over time
(scaled to the largest peak in the panel, the rank's own peak written at the right).

In the SVG only actions are <rect> elements (legend swatches and memory strips are <path>s), so tools can count
or pick actions; each rect carries data-rank/data-action attributes and a <title> tooltip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

from effdist.pipeline import timeline
from effdist.pipeline.ir import B, BW, F, W, ActionKind, Schedule
from effdist.pipeline.simulate import SimulationResult, Timing

KIND_COLOURS = {F: "#4e79a7", B: "#59a14f", W: "#edc948", BW: "#e15759"}
KIND_LABELS = {F: "F forward", B: "B input grad", W: "W weight grad", BW: "BW full backward"}
MEMORY_COLOUR = "#9c755f"

_LABEL_W = 64      # px for "rank r" labels
_PEAK_W = 70       # px for the peak label right of the timeline
_ROW_BAR = 20      # px of the action bar
_ROW_MEM = 12      # px of the memory strip
_ROW_GAP = 6
_ROW_H = _ROW_BAR + _ROW_MEM + _ROW_GAP
_TITLE_H = 26
_LEGEND_H = 24


def _lighter(colour: str, step: int) -> str:
    """Blend a #rrggbb colour toward white by 35% per step (a rank's second, third... chunk)."""
    if step == 0:
        return colour
    mix = min(0.35 * step, 0.8)
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * mix):02x}" for c in rgb)


def action_colour(kind: ActionKind, local_chunk_index: int) -> str:
    return _lighter(KIND_COLOURS[kind], local_chunk_index)


def _as_list(results: SimulationResult | Sequence[SimulationResult]) -> list[SimulationResult]:
    return [results] if isinstance(results, SimulationResult) else list(results)


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _time_text(t: float, seconds: bool) -> str:
    """A simulated time as written in the pictures: milliseconds when the costs are calibrated seconds (a
    llama-1b step is tens to hundreds of ms), else simulation units."""
    return f"{t * 1000.0:.3g} ms" if seconds else _fmt(t)


def _title(result: SimulationResult, seconds: bool = False) -> str:
    s = result.schedule
    return (f"{s.name}: pp={s.pp}, microbatches={s.num_microbatches}, chunks/rank={s.num_chunks // s.pp}, "
            f"makespan={_time_text(result.makespan, seconds)}, bubble={100 * result.bubble_rate:.1f}%, "
            f"peak activation={_fmt(result.peak_activation_units)} units")


def render_svg(results: SimulationResult | Sequence[SimulationResult], width: int = 1200,
               seconds: bool = False) -> str:
    """The SVG document as a string. `seconds`: the costs were calibrated seconds (effdist simulate
    --calibration); the axis, titles and tooltips then read in milliseconds."""
    results = _as_list(results)
    span = max(r.makespan for r in results) or 1.0
    plot_w = width - _LABEL_W - _PEAK_W
    scale = plot_w / span
    parts: list[str] = []
    y = 0

    # legend
    x = _LABEL_W
    for kind in (F, B, W, BW):
        parts.append(f'<path d="M{x} {y + 6}h12v12h-12z" fill="{KIND_COLOURS[kind]}"/>')
        parts.append(f'<text x="{x + 16}" y="{y + 16}" font-size="12">{escape(KIND_LABELS[kind])}</text>')
        x += 150
    parts.append(f'<path d="M{x} {y + 6}h12v12h-12z" fill="{MEMORY_COLOUR}" fill-opacity="0.6"/>')
    parts.append(f'<text x="{x + 16}" y="{y + 16}" font-size="12">activation memory (strip under each rank)</text>')
    y += _LEGEND_H

    for result in results:
        schedule = result.schedule
        parts.append(f'<text x="4" y="{y + 18}" font-size="13" font-weight="bold">{escape(_title(result, seconds))}</text>')
        y += _TITLE_H
        peak_all = max(result.peak_activation_units, 1e-12)
        for rank, row in enumerate(result.timings):
            top = y + rank * _ROW_H
            local = {c: i for i, c in enumerate(schedule.chunks_of(rank))}
            parts.append(f'<text x="4" y="{top + 15}" font-size="12">rank {rank}</text>')
            for t in row:
                a = t.action
                x0, w = _LABEL_W + t.start * scale, max((t.end - t.start) * scale, 0.5)
                tip = (f"rank {rank}: {a} (chunk {a.chunk}, microbatch {a.microbatch}) "
                       f"{_time_text(t.start, seconds)}-{_time_text(t.end, seconds)}")
                parts.append(
                    f'<rect x="{x0:.2f}" y="{top}" width="{w:.2f}" height="{_ROW_BAR}" '
                    f'fill="{action_colour(a.kind, local[a.chunk])}" stroke="#ffffff" stroke-width="0.5" '
                    f'data-rank="{rank}" data-action={quoteattr(str(a))}><title>{escape(tip)}</title></rect>')
                label = str(a.microbatch)
                if w >= 7 * len(label) + 2:
                    parts.append(f'<text x="{x0 + w / 2:.2f}" y="{top + 14}" font-size="10" text-anchor="middle">{label}</text>')
            # memory strip: a filled step curve from the baseline
            base = top + _ROW_BAR + _ROW_MEM
            curve = result.ranks[rank].memory_units + [(result.makespan, 0.0)]
            d = [f"M{_LABEL_W} {base}"]
            for (t0, level), (t1, _) in zip(curve, curve[1:]):
                yy = base - _ROW_MEM * level / peak_all
                d.append(f"L{_LABEL_W + t0 * scale:.2f} {yy:.2f}L{_LABEL_W + t1 * scale:.2f} {yy:.2f}")
            d.append(f"L{_LABEL_W + result.makespan * scale:.2f} {base}Z")
            parts.append(f'<path d="{"".join(d)}" fill="{MEMORY_COLOUR}" fill-opacity="0.6" stroke="none"/>')
            parts.append(f'<text x="{width - _PEAK_W + 4}" y="{base}" font-size="10">peak {_fmt(result.ranks[rank].peak_activation_units)}</text>')
        y += schedule.pp * _ROW_H + 8
    # time axis
    parts.append(f'<path d="M{_LABEL_W} {y}H{_LABEL_W + plot_w}" stroke="#333333"/>')
    for i in range(11):
        t = span * i / 10
        x = _LABEL_W + t * scale
        parts.append(f'<path d="M{x:.2f} {y}v4" stroke="#333333"/>')
        tick = f"{t * 1000.0:.3g}" if seconds else _fmt(t)
        parts.append(f'<text x="{x:.2f}" y="{y + 16}" font-size="10" text-anchor="middle">{tick}</text>')
    label = "time (ms, from the calibration)" if seconds else "time (simulation units)"
    parts.append(f'<text x="{_LABEL_W + plot_w / 2:.2f}" y="{y + 32}" font-size="11" text-anchor="middle">{label}</text>')
    y += 38
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" viewBox="0 0 {width} {y}" '
            f'font-family="sans-serif">')
    background = f'<path d="M0 0H{width}V{y}H0Z" fill="#ffffff"/>'
    return "\n".join([head, background, *parts, "</svg>\n"])


def write_svg(results: SimulationResult | Sequence[SimulationResult], path: str | Path, width: int = 1200,
              seconds: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_svg(results, width, seconds))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _draw_actions(ax, schedule: Schedule, rows: Sequence[Sequence[Timing]], px_per_unit: float,
                  scale: float = 1.0) -> None:
    """Rank r's actions as bars at y in [r, r + 0.6] (colour by kind and local chunk, microbatch number where it
    fits); times are multiplied by `scale`. Shared by the simulated and the measured pictures."""
    for rank, row in enumerate(rows):
        local = {c: i for i, c in enumerate(schedule.chunks_of(rank))}
        groups: dict[str, list[tuple[float, float]]] = {}
        for t in row:
            start, length = t.start * scale, (t.end - t.start) * scale
            groups.setdefault(action_colour(t.action.kind, local[t.action.chunk]), []).append((start, length))
            label = str(t.action.microbatch)
            if length * px_per_unit >= 6 * len(label) + 2:
                ax.text(start + length / 2, rank + 0.3, label, ha="center", va="center", fontsize=6)
        for colour, bars in groups.items():
            ax.broken_barh(bars, (rank, 0.6), facecolors=colour, edgecolors="white", linewidth=0.3)


def _rank_axis(ax, pp: int, span: float, title: str) -> None:
    ax.set_ylim(pp, 0)
    ax.set_xlim(0, span)
    ax.set_yticks([r + 0.5 for r in range(pp)], [f"rank {r}" for r in range(pp)], fontsize=8)
    ax.set_title(title, fontsize=9, loc="left")
    ax.tick_params(axis="x", labelsize=8)


def _finish(plt, fig, path: str | Path, dpi: int, memory: bool) -> Path:
    """Legend of the op kinds (and the memory strip), layout, and the file."""
    from matplotlib.patches import Patch

    handles = [Patch(color=KIND_COLOURS[k], label=KIND_LABELS[k]) for k in (F, B, W, BW)]
    if memory:
        handles.append(Patch(color=MEMORY_COLOUR, alpha=0.6, label="activation memory"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.97, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_png(results: SimulationResult | Sequence[SimulationResult], path: str | Path, dpi: int = 110,
              seconds: bool = False) -> Path:
    """The same picture through matplotlib (Agg backend; no display needed); `seconds` as in `render_svg`
    (the x axis then reads in ms)."""
    plt = _pyplot()
    results = _as_list(results)
    heights = [r.schedule.pp * 0.45 + 0.6 for r in results]
    fig, axes = plt.subplots(len(results), 1, figsize=(14, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    scale = 1000.0 if seconds else 1.0  # calibrated seconds are drawn in ms
    span = max(r.makespan for r in results) * scale or 1.0
    for ax, result in zip(axes[:, 0], results):
        schedule = result.schedule
        peak_all = max(result.peak_activation_units, 1e-12)
        _draw_actions(ax, schedule, result.timings, px_per_unit=14 * dpi * 0.85 / span, scale=scale)
        for rank in range(schedule.pp):
            curve = result.ranks[rank].memory_units + [(result.makespan, 0.0)]
            xs = [p[0] * scale for p in curve]
            ys = [rank + 0.95 - 0.33 * p[1] / peak_all for p in curve]
            ax.fill_between(xs, [rank + 0.95] * len(xs), ys, step="post", color=MEMORY_COLOUR, alpha=0.6, linewidth=0)
            ax.text(span * 1.005, rank + 0.8, f"peak {_fmt(result.ranks[rank].peak_activation_units)}", fontsize=7, va="center")
        _rank_axis(ax, schedule.pp, span, _title(result, seconds))
    axes[-1, 0].set_xlabel("time (ms, from the calibration)" if seconds else "time (simulation units)", fontsize=8)
    return _finish(plt, fig, path, dpi, memory=True)


def write_measured_png(measured: Sequence[Timing], simulated: SimulationResult, path: str | Path,
                       simulated_in_seconds: bool = False, dpi: int = 110) -> Path:
    """Measured timeline of one step (records of timeline.py, seconds; drawn in ms) above the simulated timeline
    of the same schedule. The simulator's time is scaled so that both makespans match, unless
    `simulated_in_seconds` (its Costs were measured, e.g. timeline.fit_costs): then both share one ms axis and the
    makespans can be compared. Right of each rank: its bubble (idle / step time), measured and simulated."""
    plt = _pyplot()
    schedule = simulated.schedule
    rows = timeline.by_rank(measured, schedule.pp)
    timeline.check_against(rows, schedule)
    seen = timeline.bubbles(rows)
    measured_ms = seen.makespan * 1000.0
    if simulated_in_seconds:
        sim_scale = 1000.0
        costs = _costs_text(simulated.costs, 1000.0, " ms", simulated.chunk_costs)
        how = f"makespan={_fmt(simulated.makespan * 1000.0)} ms"
    else:
        sim_scale = measured_ms / (simulated.makespan or 1.0)
        costs = _costs_text(simulated.costs, chunk_costs=simulated.chunk_costs)
        how = (f"makespan={_fmt(simulated.makespan)} units, drawn at {sim_scale:.3g} ms per unit to match the "
               "measured one")
    span = max(measured_ms, simulated.makespan * sim_scale) or 1.0
    px_per_unit = 14 * dpi * 0.85 / span
    height = schedule.pp * 0.45 + 0.6
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 2 * height + 1.0), sharex=True)
    _draw_actions(top, schedule, rows, px_per_unit, scale=1000.0)
    _draw_actions(bottom, schedule, simulated.timings, px_per_unit, scale=sim_scale)
    for rank in range(schedule.pp):
        top.text(span * 1.005, rank + 0.3, f"bubble {100 * seen.ranks[rank]:.1f}%", fontsize=7, va="center")
        bottom.text(span * 1.005, rank + 0.3, f"bubble {100 * simulated.ranks[rank].bubble_rate:.1f}%", fontsize=7,
                    va="center")
    _rank_axis(top, schedule.pp, span,
               f"{schedule.name} measured: pp={schedule.pp}, microbatches={schedule.num_microbatches}, "
               f"chunks/rank={schedule.num_chunks // schedule.pp}, step={_fmt(measured_ms)} ms, "
               f"bubble={100 * seen.overall:.1f}%")
    _rank_axis(bottom, schedule.pp, span,
               f"simulated, {costs}: {how}, "
               f"bubble={100 * simulated.bubble_rate:.1f}%")
    bottom.set_xlabel("time since the step start (ms)", fontsize=8)
    return _finish(plt, fig, path, dpi, memory=False)


def _costs_text(costs, scale: float = 1.0, unit: str = "", chunk_costs=None) -> str:
    """`costs per stage F 10.4 ms, B 14.1 ms, W 14.1 ms`; with per-chunk costs, each kind's range over the chunks
    (`costs per chunk F 10.1-12.0 ms, ...`)."""
    def number(values) -> str:
        low, high = min(values) * scale, max(values) * scale
        return f"{low:.3g}{unit}" if f"{low:.3g}" == f"{high:.3g}" else f"{low:.3g}-{high:.3g}{unit}"

    each = chunk_costs if chunk_costs else [costs]
    parts = [("F", [c.forward for c in each]), ("B", [c.backward_input for c in each]),
             ("W", [c.backward_weight for c in each])]
    if costs.comm:
        parts.append(("comm", [costs.comm]))
    return ("costs per chunk " if chunk_costs else "costs per stage ") + ", ".join(
        f"{name} {number(values)}" for name, values in parts)
