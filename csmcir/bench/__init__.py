"""Cost benchmarks behind `csmcir bench`: :mod:`.efficiency` (csmcir vs a full MLLM) and
:mod:`.retrieval` (exact and approximate search at scale)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_bench_outputs(result: dict, out: str | Path, stem: str, markdown: str, plot: Callable) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and, with matplotlib installed, ``<stem>.png`` into ``out``.

    ``plot(plt, result)`` draws the figure and returns it; without matplotlib (the ``bench``
    extra) only the JSON and the markdown are written.
    """
    from ..io import ensure_writable_dir

    folder = ensure_writable_dir(out)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}.png"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths[:2]
    fig = plot(plt, result)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths
