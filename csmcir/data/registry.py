"""One registry of the datasets csmcir reads, with what each can do.

``open_dataset(name, root)`` is the one way every command and library function opens a dataset;
``DATASETS[name]`` says whether it trains (the DataModule), whether rankings drop each query's
reference, and whether it has an official protocol (``csmcir evaluate``, ``submit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CsmcirError

__all__ = ["DATASETS", "DatasetInfo", "dataset_names", "open_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset name means.

    Args:
        name: the name commands take (``--dataset``, ``data.dataset``).
        layout: ``custom`` (the documented custom format) or ``benchmark`` (a release layout).
        trainable: ``csmcir fit`` can train on it (CIRCO is evaluation only).
        remove_reference: rankings leave each query's reference image out.
        official_protocol: ``csmcir evaluate`` scores it by the benchmark's own definition.
        submission: ``csmcir submit`` writes test-server files for it.
    """

    name: str
    layout: str
    trainable: bool
    remove_reference: bool
    official_protocol: bool
    submission: bool = False


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("custom", "custom", trainable=True, remove_reference=True, official_protocol=False),
        # the synthetic benchmark is written in the custom format (csmcir synth)
        DatasetInfo("synthetic", "custom", trainable=True, remove_reference=True, official_protocol=False),
        DatasetInfo("fashioniq", "benchmark", trainable=True, remove_reference=False, official_protocol=True),
        DatasetInfo("cirr", "benchmark", trainable=True, remove_reference=True, official_protocol=True, submission=True),
        DatasetInfo("circo", "benchmark", trainable=False, remove_reference=False, official_protocol=True, submission=True),
        DatasetInfo("shoes", "benchmark", trainable=True, remove_reference=True, official_protocol=True),
    )
}


def dataset_names(**capabilities: bool) -> list[str]:
    """The names whose capabilities match, e.g. ``dataset_names(trainable=True)``."""
    return [n for n, d in DATASETS.items() if all(getattr(d, k) == v for k, v in capabilities.items())]


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise CsmcirError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def open_dataset(name: str, root: str | Path, category: str | None = None, captions: str | Path | None = None):
    """Open a dataset by name: a :class:`~csmcir.data.custom.CustomCIR` for ``custom`` and
    ``synthetic``, a :class:`~csmcir.data.benchmarks.BenchmarkCIR` for the real benchmarks
    (``category``: FashionIQ's, ``None`` = all three). ``captions`` is the target-side caption
    file (default ``root/captions.jsonl``)."""
    info = dataset_info(name)
    if info.layout == "custom":
        from .custom import CustomCIR

        return CustomCIR(root, captions)
    from .benchmarks import BenchmarkCIR

    return BenchmarkCIR(name, root, category, captions)
