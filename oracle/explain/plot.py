"""A picture of one counterexample (``dfc-oracle explain FILE --plot OUT.png``; the optional extra
``plot``: ``pip install 'dfc-oracle[plot]'``).

Three panels, top to bottom in the order the call runs:

1. **routing** — slots per source rank (rows) and global expert (columns), the matrix
   ``cnt[s][g]`` the ranks exchange; the experts are grouped by the rank they live on;
2. **receive buffers** — each destination rank's rows in buffer order (expert-major, then source
   rank, §5), coloured by local expert and labelled with the source rank, with the truncation
   line at ``max_output_size``: rows right of it are dropped and their tokens' out rows undefined;
3. **error / tolerance** — every out value's error as a ratio of the judge's tolerance
   (:func:`oracle.judge.verdict.error_ratios`: the profile's envelope plus ``ulps``, or the ideal
   bound), token by column with the ranks stacked, on a log scale; above 1 fails, undefined
   rows are grey, NaN or inf where the reference is finite is black, the worst value circled.

matplotlib is imported only here, and only with its Agg backend (no display, no global pyplot
state): :func:`counterexample_figure` returns the :class:`matplotlib.figure.Figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oracle.files.atomic import atomic_write
from oracle.judge.verdict import Verdict, error_ratios
from oracle.model.numerics import Numerics
from oracle.model.reference import route
from spec import Problem

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["INSTALL", "PANELS", "counterexample_figure", "require_matplotlib", "save_plot"]

Array = np.ndarray[Any, Any]
INSTALL = "pip install 'dfc-oracle[plot]'"
#: The first words of each panel's title, top to bottom.
PANELS = ("routing", "receive buffers", "error / tolerance")
#: Ratios below this are drawn as this (exact values have ratio 0: no logarithm).
_FLOOR = 1e-3
#: Cells up to which the routing matrix and the buffers print their numbers.
_LABELLED = 400


def require_matplotlib() -> None:
    """Raise :class:`ImportError` saying how to install the extra when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(f"--plot needs matplotlib: {INSTALL}") from err


def counterexample_figure(
    problem: Problem,
    outputs: list[tuple[Array, Array]] | None,
    *,
    numerics: Numerics,
    ulps: float = 0.0,
    title: str = "",
) -> Figure:
    """The three panels of the module docstring for ``problem`` and the implementation's
    ``outputs`` (``None``: the third panel says there are none), judged with ``numerics`` and
    ``ulps`` as the file was. Raises ImportError without matplotlib."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg = problem.config
    tokens = sum(cfg.tokens_per_rank)
    # Inches: the routing and buffer panels grow with EP, the heat map with the tokens.
    heights = [1.2 + 0.35 * cfg.ep_size, 1.2 + 0.35 * cfg.ep_size,
               min(2.0 + 0.25 * tokens, 9.0)]
    fig = Figure(figsize=(11, sum(heights) + 1.4), layout="constrained")
    FigureCanvasAgg(fig)
    routing_ax, buffers_ax, error_ax = fig.subplots(3, 1, height_ratios=heights)
    _routing(routing_ax, problem)
    _buffers(buffers_ax, problem)
    _errors(error_ax, problem, outputs, numerics, ulps)
    fig.suptitle(f"{title}\n{cfg.summary()}" if title else cfg.summary(), fontsize=10)
    return fig


def save_plot(path: Path, problem: Problem, outputs: list[tuple[Array, Array]] | None, *,
              numerics: Numerics, ulps: float = 0.0, title: str = "") -> Path:
    """Draw :func:`counterexample_figure` into ``path`` (PNG, or what its suffix names)."""
    fig = counterexample_figure(problem, outputs, numerics=numerics, ulps=ulps, title=title)
    kind = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, dpi=110, format=kind))


def _routing(ax: Axes, problem: Problem) -> None:
    from matplotlib.ticker import MaxNLocator

    cfg = problem.config
    counts = route(problem).counts
    image = ax.imshow(counts, cmap="Blues", aspect="auto", vmin=0,
                      vmax=max(int(counts.max()), 1), interpolation="nearest")
    bar = ax.figure.colorbar(image, ax=ax, label="slots", pad=0.01)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if counts.size <= _LABELLED:
        for (s, g), n in np.ndenumerate(counts):
            ax.text(g, s, str(n), ha="center", va="center", fontsize=8,
                    color="white" if n > counts.max() / 2 else "black")
    e = cfg.experts_per_rank
    for d in range(1, cfg.ep_size):
        ax.axvline(d * e - 0.5, color="black", linewidth=1)
    _ticks(ax.set_xticks, cfg.num_experts, lambda g: str(g))
    _ticks(ax.set_yticks, cfg.ep_size, lambda s: str(s))
    top = ax.secondary_xaxis("top")
    top.set_xticks([d * e + (e - 1) / 2 for d in range(cfg.ep_size)],
                   [f"on rank {d}" for d in range(cfg.ep_size)], fontsize=8)
    top.tick_params(length=0)
    ax.set_xlabel(f"global expert g (lives on rank g // {e})")
    ax.set_ylabel("source rank")
    ax.set_title("routing: slots per source rank and global expert", loc="left", fontsize=10)


def _buffers(ax: Axes, problem: Problem) -> None:
    from matplotlib.colors import ListedColormap

    cfg = problem.config
    layouts = route(problem).receive
    width = max([layout.rows for layout in layouts] + [cfg.max_output_size or 0, 1])
    experts = np.full((cfg.ep_size, width), np.nan)
    for d, layout in enumerate(layouts):
        experts[d, : layout.rows] = layout.local_expert
    palette = [f"C{i % 10}" for i in range(cfg.experts_per_rank)]
    ax.imshow(np.ma.masked_invalid(experts), cmap=ListedColormap(palette), aspect="auto",
              vmin=-0.5, vmax=cfg.experts_per_rank - 0.5, interpolation="nearest")
    ax.set_facecolor("white")
    if width * cfg.ep_size <= _LABELLED:
        for d, layout in enumerate(layouts):
            for row, src in enumerate(layout.src_rank):
                ax.text(row, d, str(src), ha="center", va="center", fontsize=7, color="white")
    cap = cfg.max_output_size
    for d, layout in enumerate(layouts):
        if layout.dropped:
            ax.add_patch(_rectangle((layout.kept - 0.5, d - 0.5), layout.dropped))
        if not layout.rows:
            ax.text(-0.4, d, "receives 0 rows", va="center", fontsize=8, color="0.4")
    handles = [_swatch(palette[e], f"local expert {e}") for e in range(cfg.experts_per_rank)]
    if cap is not None:
        handles.append(ax.axvline(cap - 0.5, color="red", linewidth=2,
                                  label=f"max_output_size = {cap}"))
    dropped = sum(layout.dropped for layout in layouts)
    truncation = ("no truncation (max_output_size None)" if cap is None else
                  f"hatched: {dropped} rows dropped past max_output_size = {cap}")
    ax.set_title("receive buffers: rows in buffer order, colour = local expert, number = source "
                 f"rank; {truncation}", loc="left", fontsize=10)
    _ticks(ax.set_yticks, cfg.ep_size, lambda d: str(d))
    ax.set_ylabel("destination rank")
    ax.set_xlabel("receive row")
    ax.set_xlim(-0.5, width - 0.5)
    _ticks(ax.set_xticks, width, lambda row: str(row))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8,
              frameon=False)


def _errors(ax: Axes, problem: Problem, outputs: list[tuple[Array, Array]] | None,
            numerics: Numerics, ulps: float) -> None:
    ratios = None if outputs is None else error_ratios(problem, outputs, numerics=numerics,
                                                       ulps=ulps)
    judged = numerics.describe() + (f" + {ulps:g} ulp" if ulps else "")
    if ratios is None or isinstance(ratios, Verdict):
        why = ("the file holds no outputs" if ratios is None
               else f"the outputs failed at stage '{ratios.stage}'")
        ax.text(0.5, 0.5, f"no values to compare: {why}", ha="center", va="center")
        ax.set_axis_off()
        ax.set_title(f"error / tolerance ({judged}): none", loc="left", fontsize=10)
        return
    from matplotlib.colors import TwoSlopeNorm

    ratio = np.concatenate(ratios)
    defined = ~np.isnan(ratio)
    finite = np.isfinite(ratio) & defined
    top = max(float(ratio[finite].max(initial=0.0)), 10.0)
    shown = np.log10(np.clip(np.where(finite, ratio, _FLOOR), _FLOOR, None))
    shown[defined & ~finite] = np.log10(top) + 1  # NaN or inf where the reference is finite
    cmap = _ratio_colours()
    image = ax.imshow(np.ma.masked_where(~defined, shown), cmap=cmap, aspect="auto",
                      norm=TwoSlopeNorm(vmin=np.log10(_FLOOR), vcenter=0, vmax=np.log10(top)),
                      interpolation="nearest")
    bar = ax.figure.colorbar(image, ax=ax, pad=0.01, extend="max")
    bar.set_label("|error| / tolerance (log)")
    decades = np.arange(np.log10(_FLOOR), np.floor(np.log10(top)) + 1)
    bar.set_ticks(decades.tolist(), labels=[f"{10.0**d:g}" for d in decades])
    bar.ax.axhline(0, color="black", linewidth=1)
    starts = np.cumsum([0, *problem.config.tokens_per_rank])
    for start in starts[1:-1]:
        ax.axhline(start - 0.5, color="black", linewidth=1)
    active = np.concatenate([r.is_active() for r in problem.ranks])
    reason = np.where(defined.any(axis=1), "", np.where(active, " (lost a slot)", " (masked)"))
    labels = [f"r{r} t{t}{reason[start + t]}"
              for r, (start, m) in enumerate(zip(starts, problem.config.tokens_per_rank))
              for t in range(m)]
    if len(labels) <= 40:
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    else:
        ax.set_yticks(starts[:-1], [f"r{r} t0" for r in range(len(starts) - 1)], fontsize=7)
    ax.set_xlabel("column")
    ax.set_ylabel("rank, token")
    bad = int((ratio[defined] > 1).sum())
    worst = "" if not defined.any() else _worst(ax, ratio, starts)
    ax.set_title(f"error / tolerance ({judged}): {bad} of {int(defined.sum())} defined values "
                 f"above 1 (fail){worst}\ngrey: rows the contract leaves undefined; black: NaN "
                 "or inf where the reference is finite", loc="left", fontsize=10)


def _worst(ax: Axes, ratio: Array, starts: Array) -> str:
    """Circle the worst value and say where it is."""
    row, col = np.unravel_index(int(np.nanargmax(ratio)), ratio.shape)
    value = float(ratio[row, col])
    if value == 0:
        return ""
    rank = int(np.searchsorted(starts, row, side="right") - 1)
    ax.plot(col, row, marker="o", markersize=12, markerfacecolor="none", markeredgecolor="black",
            markeredgewidth=1.5)
    return f"; worst {value:.3g} at rank {rank} token {int(row - starts[rank])} column {col}"


def _ratio_colours() -> Any:
    """Greens at or below 1 (passing, darker when closer to 1), reds above; black over."""
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list(
        "ratio", [(0.0, "#f4fbf2"), (0.5, "#41ab5d"), (0.5, "#fdd0a2"), (1.0, "#a50f15")])
    return cmap.with_extremes(bad="0.8", over="black")


def _rectangle(corner: tuple[float, float], width: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(corner, width, 1, facecolor="white", alpha=0.55, hatch="//",
                     edgecolor="0.3", linewidth=0)


def _swatch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, label=label)


def _ticks(setter: Any, n: int, label: Any) -> None:
    """At most about 32 ticks on an axis of ``n`` cells."""
    step = max(1, int(np.ceil(n / 32)))
    positions = list(range(0, n, step))
    setter(positions, [label(i) for i in positions])
