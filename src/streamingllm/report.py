"""Showing work and results: progress bars, aligned terminal tables, CSV files and PNG figures.

Shared by the evaluations, the benchmarks and the command line (the core never prints). tqdm
comes with transformers; matplotlib is optional (the ``plots`` extra) and is imported only when
a figure is drawn.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from .extras import require


def progress_bar(total: int, desc: str, unit: str = "tok", enabled: bool = True, leave: bool = True):
    """A tqdm progress bar on stderr: ``total`` units, refreshed at most every 0.5 s on a terminal
    and every 15 s in a log; ``enabled=False`` gives a silent one with the same methods."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=leave,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15)


def format_value(v, digits: int = 4) -> str:
    """A cell: '' for None, floats with ``digits`` decimals (non-finite as nan/inf), else str."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, first_left: bool = True) -> str:
    """Aligned text table: a header line, a rule, then ``rows`` (cells already formatted).

    The first column is left-aligned (``first_left``), the others right-aligned.
    """
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 and first_left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(table[0]), line(["-" * w for w in widths])] + [line(r) for r in table[1:]])


def write_csv(rows: Sequence[dict], path, columns: Sequence[str], digits: int = 6) -> Path:
    """Write ``rows`` (dicts) to ``path`` with a header of ``columns``; folders are created.

    Missing and None values are written as empty cells; floats with ``digits`` significant digits.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else f"{r[c]:.{digits}g}" if isinstance(r[c], float) else r[c]
                        for c in columns])
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (the ``plots`` extra)."""
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plots")


def save_figure(fig, path, title: str | None = None) -> Path:
    """Title, lay out and write ``fig`` as a PNG at ``path`` (folders created); returns the path."""
    plt = pyplot()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
