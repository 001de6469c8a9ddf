"""The project's one plotting style: matplotlib on an off-screen Agg canvas (no display needed),
110 dpi PNGs, light grids, plain numbers on log axes. saes/ and snmf/ draw their figures with these."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

DPI = 110

# Plain numbers (0.4, 2, 30) on log axes instead of 4×10⁻¹.
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def si(v: float) -> str:
    """1500 -> 1.5k, 2000000 -> 2M."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


SI = FuncFormatter(lambda v, _: si(v))


def figure(width: float, height: float) -> Figure:
    """A figure in the project's style (constrained layout)."""
    return Figure(figsize=(width, height), layout="constrained")


def plain_log(axis) -> None:
    """Plain-number major and 2/5 minor tick labels on a log axis."""
    axis.set_major_formatter(PLAIN)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))


def save_png(fig: Figure, out_png: str | Path) -> Path:
    """Render `fig` to `out_png` (its folder created). Pass a temp path to publish it with other files."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=DPI, format="png")
    return out_png
