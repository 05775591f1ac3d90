"""A faiss index over gallery embeddings, with the gallery ids and a JSON of index info beside it.

On disk an index is a folder of three files::

    index.faiss      the faiss index (always a CPU index), written by ``faiss.write_index``
    ids.txt          the gallery ids, one a line, in the order of the index rows
    index_info.json  caller info + {"dim", "count", "metric", "kind", "faiss_version",
                     "format_version"}

Each file is written atomically and ``index_info.json`` is written last, so its presence marks a
complete index. Scores are inner products; embeddings are L2-normalised by the caller, which
makes them cosine similarities.

Index kinds (``GalleryIndex.build(kind=...)``) live in ``_KINDS``; adding one (e.g. an IVF index
that trains on the embeddings) means adding an entry there:

* ``"flat"``: ``IndexFlatIP``, exact search (the default).
* ``"ivf_flat"``: ``IndexIVFFlat``, approximate: k-means cells (``nlist`` from :func:`ivf_nlist`)
  and a search of the ``nprobe`` cells nearest each query. Full vectors, so recall is limited only
  by ``nprobe``. Parameters under ``"ivf"`` in the info.
* ``"ivf_pq"``: ``IndexIVFPQ``: the same cells, vectors compressed to ``D / 4`` bytes by product
  quantisation (16x smaller than float32). Cheapest in memory, least exact.
* ``"hnsw"``: ``IndexHNSWFlat`` with the inner-product metric, approximate; its parameters are
  recorded under ``"hnsw"`` in the info. CPU only.
* ``"auto"``: ``"flat"`` up to :data:`AUTO_FLAT_MAX` embeddings, ``"ivf_flat"`` above
  (docs/benchmarks.md, "Retrieval at scale", has the measurements behind the switch).

Approximate kinds trade recall for speed; ``csmcir bench retrieval`` measures that trade.

GPU: with faiss-gpu installed and a GPU visible, indexes of kinds that support it are moved to
GPU 0 for adding and searching (``use_gpu=None``, the default, decides automatically); what is
saved is always a CPU index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import CsmcirError
from ..io import atomic_path, ensure_writable_dir

__all__ = ["GalleryIndex", "faiss_gpu_available", "FORMAT_VERSION", "INDEX_KINDS"]

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
INFO_FILE = "index_info.json"
METRIC = "inner_product"

#: faiss GPU indexes cannot return more than this many neighbours per query; larger ``k`` is
#: answered by a CPU copy of the index.
_GPU_MAX_K = 2048
#: Below this many queries a CPU flat index is searched with torch (matmul + topk): faiss runs one
#: thread per query, torch's matrix-vector product uses every core (docs/benchmarks.md, section 7).
FLAT_TORCH_MAX_QUERIES = 20

# HNSW parameters: graph degree, build-time and search-time beam widths.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128

# IVF: cells per index size (ivf_nlist) and cells searched per query. IVF_NPROBE is the largest that
# keeps 1M-vector search >= 10x faster than exact in `csmcir bench retrieval` (docs/benchmarks.md,
# section 7); recall@50 there: 0.99998 on clustered data, 0.959 on the synthetic model's own
# embeddings (45k). Raise it (`csmcir index --nprobe`) for embeddings with less structure.
IVF_NPROBE = 16
IVF_TRAIN_PER_CELL = 50  # k-means training sample: this many points a cell (faiss wants >= 39)
#: ``kind="auto"`` indexes galleries up to this size exactly, larger ones with ``ivf_flat``.
AUTO_FLAT_MAX = 200_000


def ivf_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: the power of two nearest 4 * sqrt(n), with >= 39 points a cell."""
    target = 4.0 * float(np.sqrt(max(n, 1)))
    nlist = 1 << int(round(np.log2(max(target, 1.0))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return max(nlist, 1)


@dataclass(frozen=True)
class _Kind:
    """How to make an empty (trained, if it needs training) CPU index of one kind."""

    make: Callable[[np.ndarray], Any]  # float32 [N, D] embeddings -> empty faiss index
    params: Callable[[Any], dict]  # index -> parameters recorded in index_info.json
    gpu: bool  # whether faiss can move this kind to a GPU


def _make_flat(emb: np.ndarray) -> Any:
    return faiss.IndexFlatIP(emb.shape[1])


def _make_hnsw(emb: np.ndarray) -> Any:
    index = faiss.IndexHNSWFlat(emb.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


def _train_sample(emb: np.ndarray, n: int) -> np.ndarray:
    n = min(emb.shape[0], n)
    if n == emb.shape[0]:
        return emb
    rows = np.sort(np.random.default_rng(0).choice(emb.shape[0], n, replace=False))
    return emb[rows]


def _make_ivf(emb: np.ndarray, pq: bool) -> Any:
    d = emb.shape[1]
    nlist = ivf_nlist(emb.shape[0])
    quantizer = faiss.IndexFlatIP(d)
    n_train = IVF_TRAIN_PER_CELL * nlist
    if pq:
        # D/4 one-byte codes; fewer bits when the gallery is too small to train 256 centroids
        m = next(m for m in (d // 4, d // 8, d // 2, d) if m >= 1 and d % m == 0)
        bits = min(8, int(np.log2(emb.shape[0] / 39)) if emb.shape[0] >= 39 else 0)
        if bits < 4:
            raise CsmcirError(f"ivf_pq needs at least {39 * 16} embeddings to train, got {emb.shape[0]}: use flat")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        n_train = max(n_train, 40 * (1 << bits))
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 0
    index.train(_train_sample(emb, n_train))
    index.nprobe = min(IVF_NPROBE, nlist)
    return index  # faiss's Python wrapper keeps `quantizer` alive as long as `index`


def _ivf_params(index: Any) -> dict:
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    out = {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}
    if isinstance(ivf, faiss.IndexIVFPQ):
        out["pq_m"], out["pq_bits"] = int(ivf.pq.M), int(ivf.pq.nbits)
    return {"ivf": out}


def _hnsw_params(index: Any) -> dict:
    h = index.hnsw
    return {"hnsw": {"M": HNSW_M, "ef_construction": h.efConstruction, "ef_search": h.efSearch}}


_KINDS: dict[str, _Kind] = {
    "flat": _Kind(make=_make_flat, params=lambda index: {}, gpu=True),
    "ivf_flat": _Kind(make=lambda e: _make_ivf(e, pq=False), params=_ivf_params, gpu=True),
    "ivf_pq": _Kind(make=lambda e: _make_ivf(e, pq=True), params=_ivf_params, gpu=True),
    "hnsw": _Kind(make=_make_hnsw, params=_hnsw_params, gpu=False),
}
INDEX_KINDS = (*_KINDS, "auto")


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _is_gpu_index(index: Any) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def _faiss_message(e: BaseException) -> str:
    """One line from a faiss error: drop its C++ location prefix (``Error in f() at x.cpp:12:``)."""
    text = " ".join(str(e).split())
    return _FAISS_LOCATION.sub("", text) or text


_FAISS_LOCATION = re.compile(r"^Error in .*? at \S+:\d+: (Error: )?")


class GalleryIndex:
    """A faiss index of gallery embeddings and the id of each row.

    Build one with :meth:`build`, query it with :meth:`search`, store it with :meth:`save` and
    read it back with :meth:`load`. ``info`` is a JSON-serialisable dict: the caller's info (e.g.
    the model and checkpoint that made the embeddings) merged with the standard fields ``dim``,
    ``count``, ``metric``, ``kind``, ``faiss_version`` and ``format_version``.
    """

    def __init__(self, index: Any, ids: list[str], info: dict) -> None:
        """Wrap a ready faiss ``index`` whose row ``i`` is gallery item ``ids[i]``.

        Most callers want :meth:`build` or :meth:`load`. Raises :class:`CsmcirError` when the
        number of ids is not the number of vectors in the index.
        """
        if len(ids) != index.ntotal:
            raise CsmcirError(f"{len(ids)} gallery ids for an index of {index.ntotal} vectors")
        self._index = index
        self._ids = list(ids)
        self._info = dict(info)
        self._gpu_resources: Any = None  # keeps faiss GPU resources alive beside a GPU index
        self._cpu_copy: Any = None  # lazily made CPU copy of a GPU index, for k > _GPU_MAX_K

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def build(
        cls, embeddings: np.ndarray, ids: Sequence[str], kind: str = "flat", info: dict | None = None, use_gpu: bool | None = None
    ) -> GalleryIndex:
        """Index ``embeddings`` (row ``i`` is gallery item ``ids[i]``) for inner-product search.

        Args:
            embeddings: ``[N, D]`` L2-normalised embeddings; cast to contiguous float32.
            ids: ``N`` distinct, non-empty id strings without line breaks (they are stored one a
                line in ``ids.txt``).
            kind: one of :data:`INDEX_KINDS`; ``"flat"`` (exact) by default; ``"auto"`` picks
                ``"flat"`` or ``"ivf_flat"`` by gallery size.
            info: extra JSON-serialisable facts to keep in ``index_info.json``. The standard
                fields (``dim``, ``count``, ...) are always set by the index and win over keys
                of the same name here.
            use_gpu: ``None`` = use a GPU when :func:`faiss_gpu_available` and the kind supports
                it; ``True`` = require one; ``False`` = CPU.

        Raises:
            CsmcirError: bad embeddings (not 2-D, empty, not numeric, NaN/inf), an id count that
                differs from the row count, a duplicate / empty / multi-line id, an unknown kind,
                info that is not JSON-serialisable, or ``use_gpu=True`` without a usable GPU.
        """
        if kind not in INDEX_KINDS:
            raise CsmcirError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        emb = _as_float32_matrix(embeddings, "embeddings")
        if emb.shape[0] == 0:
            raise CsmcirError("no embeddings to index")
        if kind == "auto":
            kind = "flat" if emb.shape[0] <= AUTO_FLAT_MAX else "ivf_flat"
        spec = _KINDS[kind]
        ids = list(ids)
        if len(ids) != emb.shape[0]:
            raise CsmcirError(f"{len(ids)} ids for {emb.shape[0]} embedding rows")
        _check_ids(ids, "ids")
        info = dict(info or {})
        try:
            json.dumps(info)
        except (TypeError, ValueError) as e:
            raise CsmcirError(f"index info is not JSON-serialisable: {e}") from None

        gpu = _resolve_gpu(use_gpu, kind, spec)
        cpu_index = spec.make(emb)
        resources = None
        index = cpu_index
        if gpu:
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
        index.add(emb)

        info.update(spec.params(cpu_index))
        info.update(
            dim=int(emb.shape[1]),
            count=int(emb.shape[0]),
            metric=METRIC,
            kind=kind,
            faiss_version=faiss.__version__,
            format_version=FORMAT_VERSION,
        )
        out = cls(index, ids, info)
        out._gpu_resources = resources
        return out

    # ---- properties -----------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        """Number of indexed gallery items."""
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def ids(self) -> list[str]:
        """Gallery ids in row order (a copy)."""
        return list(self._ids)

    @property
    def info(self) -> dict:
        """The index info as written to ``index_info.json`` (a copy)."""
        return dict(self._info)

    @property
    def kind(self) -> str:
        return str(self._info.get("kind", ""))

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU."""
        return _is_gpu_index(self._index)

    # ---- searching ------------------------------------------------------------------------

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade recall for speed: IVF cells searched per query (``nprobe``, IVF kinds) or the HNSW
        search beam (``ef_search``). The new value is recorded in :attr:`info` and saved."""
        if nprobe is not None:
            if not self.kind.startswith("ivf"):
                raise CsmcirError(f"nprobe applies to ivf_flat and ivf_pq indexes, not {self.kind!r}")
            nlist = int(self._info["ivf"]["nlist"])
            if not 1 <= int(nprobe) <= nlist:
                raise CsmcirError(f"nprobe must be in 1..{nlist} (the index's cells), got {nprobe}")
            if _is_gpu_index(self._index):
                faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", int(nprobe))
            else:
                faiss.extract_index_ivf(self._index).nprobe = int(nprobe)
            self._cpu_copy = None
            self._info["ivf"] = {**self._info["ivf"], "nprobe": int(nprobe)}
        if ef_search is not None:
            if self.kind != "hnsw":
                raise CsmcirError(f"ef_search applies to hnsw indexes, not {self.kind!r}")
            if int(ef_search) < 1:
                raise CsmcirError(f"ef_search must be >= 1, got {ef_search}")
            self._index.hnsw.efSearch = int(ef_search)
            self._info["hnsw"] = {**self._info["hnsw"], "ef_search": int(ef_search)}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """The ``k`` best gallery items for each query, by descending inner product.

        Args:
            queries: ``[Q, D]`` L2-normalised query embeddings (cast to float32).
            k: results per query, >= 1; clipped to :attr:`ntotal`.

        Returns:
            ``(scores, ids)``: a float32 ``[Q, k']`` array and, per query, its ``k'`` ids best
            first. An approximate index (``"hnsw"``) may find fewer than ``k'`` items for a
            query: the missing places score ``-inf`` and are left out of that query's id list.
            The order of exactly tied scores is faiss's.

        Raises:
            CsmcirError: queries not 2-D, not numeric or not finite, a query dimension that
                differs from the index's (both are named), or ``k < 1``.
        """
        scores, labels = self.search_rows(queries, k)
        ids = [[self._ids[j] for j in row if j >= 0] for row in labels.tolist()]
        return scores, ids

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`search`, with gallery row numbers (int64 ``[Q, k']``, ``-1`` where an
        approximate index found nothing) instead of ids."""
        q = _as_float32_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise CsmcirError(f"query dimension {q.shape[1]} does not match the index dimension {self.dim}")
        if int(k) < 1:
            raise CsmcirError(f"k must be >= 1, got {k}")
        k_eff = min(int(k), self.ntotal)
        index = self._index
        if self.kind == "flat" and not _is_gpu_index(index) and q.shape[0] < FLAT_TORCH_MAX_QUERIES:
            return self._torch_flat_search(q, k_eff)
        if k_eff > _GPU_MAX_K and _is_gpu_index(index):
            if self._cpu_copy is None:
                self._cpu_copy = faiss.index_gpu_to_cpu(index)
            index = self._cpu_copy
        scores, labels = index.search(q, k_eff)
        missing = labels < 0
        if missing.any():
            scores[missing] = -np.inf
        return scores, labels

    def _torch_flat_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        # a view of the flat index's own float32 storage: no copy of the gallery
        xb = faiss.rev_swig_ptr(self._index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
        with torch.inference_mode():
            top = torch.topk(torch.from_numpy(q) @ torch.from_numpy(xb).T, k, dim=1)
        return top.values.numpy(), top.indices.numpy().astype(np.int64)

    # ---- storing --------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> None:
        """Write ``index.faiss``, ``ids.txt`` and then ``index_info.json`` into ``out_dir``.

        All three are first written to temporary files in ``out_dir``; only when all are written
        is an existing ``index_info.json`` removed and the files renamed into place, index info
        last. A failure while writing leaves ``out_dir`` as it was, with no temporary files.
        ``out_dir`` is created if needed.

        Raises:
            CsmcirError: ``out_dir`` cannot be created or written, or a file cannot be written.
        """
        out = ensure_writable_dir(out_dir)
        index = self._index
        if _is_gpu_index(index):
            index = faiss.index_gpu_to_cpu(index)
        info_text = json.dumps(self._info, indent=2) + "\n"
        ids_text = "".join(f"{i}\n" for i in self._ids)
        info_path, ids_path, index_path = out / INFO_FILE, out / IDS_FILE, out / INDEX_FILE
        current = out  # the file being written, for the error message
        try:
            # Context managers exit in reverse order: index.faiss, ids.txt, then index_info.json
            # are renamed into place.
            with atomic_path(info_path) as info_tmp, atomic_path(ids_path) as ids_tmp, atomic_path(index_path) as index_tmp:
                current = index_path
                try:
                    faiss.write_index(index, str(index_tmp))
                except RuntimeError as e:
                    raise CsmcirError(f"cannot write {index_path}: {_faiss_message(e)}") from None
                current = ids_path
                ids_tmp.write_text(ids_text, encoding="utf-8")
                current = info_path
                info_tmp.write_text(info_text, encoding="utf-8")
                current = out
                info_path.unlink(missing_ok=True)  # from here the folder is not a complete index
        except OSError as e:
            raise CsmcirError(f"cannot write {current}: {e.strerror or e}") from None

    @classmethod
    def load(cls, index_dir: str | Path, use_gpu: bool | None = None) -> GalleryIndex:
        """Read an index folder written by :meth:`save`.

        ``use_gpu`` is as for :meth:`build`. Raises :class:`CsmcirError`, naming the file, when
        the folder or one of its files is missing, ``index_info.json`` is malformed or of another
        format version, ``index.faiss`` cannot be read or disagrees with the info (dimension,
        count, metric), or ``ids.txt`` has the wrong number of ids or a duplicate.
        """
        folder = Path(index_dir)
        if not folder.is_dir():
            raise CsmcirError(f"index folder {folder} does not exist or is not a folder")
        info_path, ids_path, index_path = folder / INFO_FILE, folder / IDS_FILE, folder / INDEX_FILE
        info = _read_info(info_path)
        for path in (index_path, ids_path):
            if not path.is_file():
                raise CsmcirError(f"{path} is missing")

        try:
            index = faiss.read_index(str(index_path))
        except (RuntimeError, MemoryError) as e:
            raise CsmcirError(f"{index_path} is not a readable faiss index: {_faiss_message(e)}") from None
        if index.d != info["dim"] or index.ntotal != info["count"]:
            raise CsmcirError(
                f"{index_path} holds {index.ntotal} vectors of dimension {index.d}, but "
                f"{info_path} says {info['count']} of dimension {info['dim']}"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CsmcirError(f"{index_path} does not use the inner-product metric")

        try:
            text = ids_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CsmcirError(f"cannot read {ids_path}: {e}") from None
        ids = text.split("\n")
        if ids and ids[-1] == "":
            ids.pop()
        if len(ids) != index.ntotal:
            raise CsmcirError(f"{ids_path} has {len(ids)} ids but the index holds {index.ntotal}")
        _check_ids(ids, str(ids_path))

        kind = str(info["kind"])
        spec = _KINDS.get(kind)
        resources = None
        if _resolve_gpu(use_gpu, kind, spec):
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)
        out = cls(index, ids, info)
        out._gpu_resources = resources
        return out


def _as_float32_matrix(a: Any, name: str) -> np.ndarray:
    """``a`` as a contiguous float32 ``[N, D]`` array with ``D >= 1`` and finite values."""
    try:
        arr = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise CsmcirError(f"{name} are not a numeric array: {e}") from None
    if arr.ndim != 2:
        raise CsmcirError(f"{name} must be a 2-D array [N, D], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise CsmcirError(f"{name} have dimension 0")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise CsmcirError(f"{name} contain NaN or infinite values (first in row {bad})")
    return arr


def _check_ids(ids: list[str], source: str) -> None:
    """Ids must be non-empty strings without line breaks, and distinct."""
    seen: set[str] = set()
    for row, gid in enumerate(ids):
        if not isinstance(gid, str) or not gid or "\n" in gid or "\r" in gid:
            raise CsmcirError(f"{source}: id {gid!r} in row {row} is not a non-empty one-line string")
        if gid in seen:
            raise CsmcirError(f"{source}: duplicate id {gid!r} (row {row})")
        seen.add(gid)


def _resolve_gpu(use_gpu: bool | None, kind: str, spec: _Kind | None) -> bool:
    """Decide whether to put an index of ``kind`` on the GPU."""
    supported = spec is not None and spec.gpu
    if use_gpu is None:
        return supported and faiss_gpu_available()
    if use_gpu and not faiss_gpu_available():
        raise CsmcirError("use_gpu=True but faiss has no GPU support or sees no GPU")
    if use_gpu and not supported:
        raise CsmcirError(f"index kind {kind!r} cannot run on a GPU")
    return bool(use_gpu)


def _read_info(path: Path) -> dict:
    """Read and check ``index_info.json``."""
    if not path.is_file():
        raise CsmcirError(f"{path} is missing: not an index folder, or the index was not completely written")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CsmcirError(f"{path} is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(info, dict):
        raise CsmcirError(f"{path} does not hold a JSON object")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise CsmcirError(f"{path}: format_version {version!r} is not supported (this csmcir reads {FORMAT_VERSION})")
    for key in ("dim", "count"):
        if not isinstance(info.get(key), int) or isinstance(info.get(key), bool):
            raise CsmcirError(f"{path}: {key!r} is missing or not an integer")
    if info.get("metric") != METRIC:
        raise CsmcirError(f"{path}: metric {info.get('metric')!r} is not {METRIC!r}")
    if not isinstance(info.get("kind"), str):
        raise CsmcirError(f"{path}: 'kind' is missing or not a string")
    return info
