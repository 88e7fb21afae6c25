"""``pyplot()``: matplotlib's pyplot on the Agg backend (files only, no display), imported on first use.

Every plot posttrain writes (eval and run reports, the data filter's report, the experiments) goes through it, so
none of them imports matplotlib before it draws: ``posttrain``'s start-up does not pay for it.
"""

from __future__ import annotations

import sys


def pyplot(optional: bool = False):
    """``matplotlib.pyplot`` with the Agg backend selected. ``optional``: None (and a line on stderr) when
    matplotlib is not installed, for a caller that can go on without its plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not optional:
            raise
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path, dpi: int = 110):
    """Lay out, write (at ``dpi``) and close a figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
