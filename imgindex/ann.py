"""Vector index kinds, put together so that they cannot be misused: exact (flat), HNSW, IVF-Flat,
IVF-PQ, or a raw FAISS factory string for experts.

* **Metrics.** The flat index keeps the raw vectors and serves both metrics exactly. An
  approximate index is built for one metric: ``l2`` on the raw vectors, ``cosine`` on
  L2-normalised vectors with inner product (so cosine is never computed on unnormalised data).
* **Training.** IVF needs at least 39 training vectors per list and PQ 39 per centroid (256 per
  sub-quantizer), as FAISS itself recommends; an index is never trained on fewer. Until the
  collection is large enough, a flat index stands in, and the requested kind is built at the
  first save after it is (:func:`plan` says which and why).
* **Base, delta, tombstones.** A :class:`VectorIndex` is the FAISS index loaded from disk (the
  *base*, memory-mapped for readers where FAISS allows it), plus vectors added since it was saved
  (the *delta*, searched exactly) and ids removed since (the *tombstones*, filtered out of every
  search). A reader can therefore bring an old, read-only, memory-mapped file up to date with
  SQLite without copying it, and HNSW, which cannot delete, stays correct under deletions.
* **Search returns candidates.** :meth:`VectorIndex.search` returns candidate ids; the caller
  re-scores them exactly against the stored vectors (:mod:`imgindex.search`), so approximate
  indexes only decide *which* images are considered, never the reported numbers.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.atomic import FileDigest, write_new
from imgindex.scoring import BestK, normalized, ranking_keys, squared_norms

KINDS = ("flat", "hnsw", "ivf-flat", "ivf-pq", "factory")
# Defaults chosen with benchmarks/scale.py (1M AugNet-like vectors, 2 cores).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_PQ_M = 64  # bytes per vector in the codes
# Above this many vectors, "auto" leaves the exact index for an approximate one.
AUTO_EXACT_LIMIT = 200_000


@dataclass(frozen=True)
class IndexSpec:
    """What kind of vector index, for which metric, with which construction parameters."""

    kind: str = "flat"
    metric: str = "both"  # flat serves both; an approximate index "l2" or "cosine"
    params: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown index type {self.kind!r}; choose auto, flat, hnsw, ivf-flat, ivf-pq "
                "or factory:STRING"
            )
        if self.kind == "flat":
            object.__setattr__(self, "metric", "both")
        elif self.metric not in ("l2", "cosine"):
            raise ValueError(f"an approximate index needs metric l2 or cosine, not {self.metric!r}")

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def serves(self, metric: str) -> bool:
        return self.metric in ("both", metric)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "metric": self.metric, "params": dict(self.params)}

    def check(self, dim: int) -> None:
        """ValueError unless FAISS can build this index for ``dim``-number vectors: checked when
        it is asked for, not after embedding a collection (a bad value stored would fail every
        build, or crash FAISS)."""
        limits = {"M": (2, 256), "ef_construction": (1, 100_000), "nlist": (1, 1 << 20)}
        limits["m"] = (1, dim)
        for key, value in self.params.items():
            if key == "factory":
                continue
            low, high = limits[key]
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{self.kind}: {key} must be a whole number from {low} to {high}")
        if self.kind == "ivf-pq" and dim % int(self.params.get("m", IVF_PQ_M)):
            raise ValueError(f"ivf-pq: m must divide the vector size {dim}")
        if self.kind == "factory":
            import faiss

            try:
                faiss.index_factory(dim, str(self.params["factory"]))
            except Exception as exc:  # FAISS raises RuntimeError with its C++ message
                # "Error in <function> at <file>:<line>: <what went wrong>": keep what went wrong.
                reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(exc).strip())
                raise ValueError(
                    f"factory:{self.params['factory']}: FAISS cannot build it ({reason})"
                ) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(data["kind"], data.get("metric", "both"), dict(data.get("params", {})))

    def describe(self) -> str:
        names = {
            "flat": "Flat (exact)",
            "hnsw": "HNSW",
            "ivf-flat": "IVF-Flat",
            "ivf-pq": "IVF-PQ with exact re-ranking",
            "factory": f"FAISS factory {self.params.get('factory')!r}",
        }
        shown = {k: v for k, v in self.params.items() if k != "factory"}
        text = names[self.kind]
        if shown:
            text += " (" + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) + ")"
        if self.kind != "flat":
            text += f", {self.metric}"
        return text

    def min_training_vectors(self) -> int:
        """Vectors needed to train this kind (0: no training)."""
        if self.kind == "ivf-flat":
            return 39 * int(self.params["nlist"])
        if self.kind == "ivf-pq":
            return max(39 * int(self.params["nlist"]), 39 * 256)
        if self.kind == "factory":
            return _factory_training_needs(self.params["factory"])
        return 0

    def factory_string(self) -> str:
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{self.params.get('M', HNSW_M)},Flat"
        if self.kind == "ivf-flat":
            return f"IVF{self.params['nlist']},Flat"
        if self.kind == "ivf-pq":
            return f"IVF{self.params['nlist']},PQ{self.params.get('m', IVF_PQ_M)}"
        return str(self.params["factory"])


def parse_index_type(text: str, metric: str = "l2") -> IndexSpec | None:
    """``auto`` (None), ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``, optionally with parameters
    (``hnsw:M=48``, ``ivf-pq:nlist=4096,m=32``), or ``factory:STRING`` for any FAISS factory."""
    text = text.strip()
    if text == "auto":
        return None
    if text.startswith("factory:"):
        return IndexSpec("factory", metric, {"factory": text[len("factory:") :]})
    kind, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"index parameter {item!r} should look like name=value")
        params[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    allowed = {"flat": set(), "hnsw": {"M", "ef_construction"}, "ivf-flat": {"nlist"},
               "ivf-pq": {"nlist", "m"}}  # fmt: skip
    if kind not in allowed:
        raise ValueError(
            f"unknown index type {kind!r}; choose auto, flat, hnsw, ivf-flat, ivf-pq or "
            "factory:STRING"
        )
    unknown = set(params) - allowed[kind]
    if unknown:
        raise ValueError(
            f"{kind} takes {sorted(allowed[kind]) or 'no parameters'}, not {sorted(unknown)}"
        )
    return IndexSpec(kind, metric if kind != "flat" else "both", params)


def plan(
    requested: IndexSpec | None, n: int, dim: int, available_bytes: int | None = None
) -> tuple[IndexSpec, str | None]:
    """The index to build for ``n`` vectors, and a note when it is not what was asked for.

    ``requested`` None means auto: exact up to AUTO_EXACT_LIMIT vectors, then HNSW if it fits in
    half the available memory, else IVF-PQ. Parameters left open are filled in for ``n``.
    """
    note = None
    if requested is None:
        if n <= AUTO_EXACT_LIMIT:
            return IndexSpec("flat"), None
        available = available_bytes if available_bytes is not None else available_memory()
        hnsw_bytes = n * (4 * dim + 2 * HNSW_M * 4 + 32)
        kind = "hnsw" if hnsw_bytes < available // 2 else "ivf-pq"
        requested = IndexSpec(kind, "l2")
        note = f"auto: {n} vectors, chose {kind}"
    spec = _fill_params(requested, n)
    needed = spec.min_training_vectors()
    if n < needed:
        why = (
            f"{spec.describe()} needs {needed} vectors to train and the index has {n}; "
            "using the exact flat index until it has enough"
        )
        return IndexSpec("flat"), why
    return spec, note


def _fill_params(spec: IndexSpec, n: int) -> IndexSpec:
    params = dict(spec.params)
    if spec.kind in ("ivf-flat", "ivf-pq") and "nlist" not in params:
        # About 4 sqrt(n) lists (FAISS's guideline is 4 to 16 sqrt(n)), a power of two, and
        # never more than training allows.
        target = 4 * math.sqrt(max(n, 1))
        nlist = 2 ** max(4, round(math.log2(target)))
        while nlist > 16 and 39 * nlist > n:
            nlist //= 2
        params["nlist"] = nlist
    if spec.kind == "ivf-pq":
        params.setdefault("m", IVF_PQ_M)
    if spec.kind == "hnsw":
        params.setdefault("M", HNSW_M)
        params.setdefault("ef_construction", HNSW_EF_CONSTRUCTION)
    return IndexSpec(spec.kind, spec.metric, params)


def _factory_training_needs(factory: str) -> int:
    import re

    needs = 0
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        needs = max(needs, 39 * int(ivf.group(1)))
    for pq in re.finditer(r"PQ\d+(?:x(\d+))?", factory):
        bits = int(pq.group(1) or 8)
        needs = max(needs, 39 * 2**bits)
    return needs


def available_memory() -> int:
    """Bytes of memory available to this process (MemAvailable), or 8 GiB if unknown."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


@dataclass
class SearchParams:
    """Query-time knobs: IVF lists probed, HNSW candidate list size."""

    nprobe: int | None = None
    ef_search: int | None = None


class VectorIndex:
    """The searchable vectors of an image index: base + delta - tombstones (module docstring)."""

    def __init__(self, spec: IndexSpec, dim: int, base: Any, mutable: bool):
        import faiss

        self._faiss = faiss
        self.spec = spec
        self.dim = dim
        self.base = base
        self.mutable = mutable  # the base is in memory and may be changed in place
        self.base_ids = self._read_base_ids()
        self.tombstones = np.empty(0, dtype=np.int64)
        self.delta_ids = np.empty(0, dtype=np.int64)
        self.delta = np.empty((0, dim), dtype=np.float32)  # raw vectors
        # (vectors view, squared norms, ids in storage order) of a flat base, made on first use
        self._flat_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- making ------------------------------------------------------------------------------

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> VectorIndex:
        """An empty index of ``spec``; kinds that need training must be built with :meth:`build`."""
        if spec.min_training_vectors() or spec.kind in ("ivf-flat", "ivf-pq"):
            raise ValueError(f"{spec.describe()} must be trained: use VectorIndex.build")
        return cls(spec, dim, _new_base(spec, dim), mutable=True)

    @classmethod
    def build(
        cls,
        spec: IndexSpec,
        dim: int,
        chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
        sample: Callable[[int], np.ndarray],
        n: int,
    ) -> VectorIndex:
        """Build ``spec`` from all vectors: ``chunks()`` yields (ids, vectors) covering them,
        ``sample(m)`` returns m of them at random for training."""
        base = _new_base(spec, dim)
        if not base.is_trained:
            needed = spec.min_training_vectors()
            if n < needed:
                raise ValueError(f"{spec.describe()} needs {needed} vectors to train, not {n}")
            # FAISS asks for 39 to 256 vectors per centroid; more only slows k-means down.
            train = sample(min(n, max(needed, 50_000)))
            base.train(_prepare(spec, train))
        index = cls(spec, dim, base, mutable=True)
        for ids, vectors in chunks():
            index.add(ids, vectors)
        return index

    @classmethod
    def load(cls, path: Path, spec: IndexSpec, dim: int, mmap: bool) -> VectorIndex | None:
        """The index saved at ``path``, or None if there is none or it does not match
        ``spec``. With ``mmap`` the vectors stay on disk (read-only) where FAISS allows it."""
        import faiss

        # FAISS memory-maps flat codes (flat, HNSW storage) with IO_FLAG_MMAP_IFC and inverted
        # lists with IO_FLAG_MMAP; each flag fails on the other kind, and plain IO_FLAG_MMAP
        # reads flat codes into memory (3 KB a vector, all read before the first search).
        attempts = [0]
        if mmap:
            ifc = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
            ivf = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
            attempts = [ifc, ivf] if spec.kind in ("flat", "hnsw") else [ivf, ifc]
        base = None
        for flags in attempts:
            try:
                base = faiss.read_index(str(path), flags)
                break
            except Exception:  # missing, unreadable, or this flag does not fit this kind
                continue
        if base is None:
            return None
        expected = _new_base(spec, dim)
        if base.d != dim or _base_kind(base) != _base_kind(expected):
            return None
        if _inner(base).metric_type != _inner(expected).metric_type:
            return None  # an HNSW file for cosine is no HNSW file for l2
        return cls(spec, dim, base, mutable=not mmap)

    def write_temporary(self, target: Path) -> tuple[Path, FileDigest]:
        """Write the base, with the delta folded in (tombstones stay derivable), to a new
        temporary file beside ``target``, for the caller to rename over it. See
        :func:`write_temporary`."""
        self._fold_delta()
        return write_temporary(self._faiss, self.base, target)

    # -- contents -----------------------------------------------------------------------------

    def ids(self) -> np.ndarray:
        """Live ids, sorted."""
        live = np.setdiff1d(self.base_ids, self.tombstones, assume_unique=True)
        return np.union1d(live, self.delta_ids)

    @property
    def ntotal(self) -> int:
        return len(self.base_ids) - len(self.tombstones) + len(self.delta_ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        revived = np.intersect1d(ids, self.tombstones)
        if len(revived):  # ids are never reused, but be safe: a tombstone must not hide them
            self.tombstones = np.setdiff1d(self.tombstones, revived, assume_unique=True)
        if self.mutable:
            self.base.add_with_ids(_prepare(self.spec, vectors), ids)
            self.base_ids = np.union1d(self.base_ids, ids)
            self._flat_cache = None
        else:
            self.delta_ids = np.concatenate([self.delta_ids, ids])
            self.delta = np.concatenate([self.delta, vectors])

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        in_delta = np.isin(self.delta_ids, ids)
        if in_delta.any():
            self.delta_ids, self.delta = self.delta_ids[~in_delta], self.delta[~in_delta]
        in_base = np.intersect1d(ids, self.base_ids)
        if not len(in_base):
            return
        if self.mutable and self.spec.kind != "hnsw" and _supports_remove(self.base):
            self.base.remove_ids(in_base)
            self.base_ids = np.setdiff1d(self.base_ids, in_base, assume_unique=True)
            self._flat_cache = None
        else:
            self.tombstones = np.union1d(self.tombstones, in_base)

    @property
    def nlist(self) -> int | None:
        """How many inverted lists an IVF index has (None for other kinds)."""
        ivf = _ivf_of(self.base)
        return int(ivf.nlist) if ivf is not None else None

    @property
    def tombstone_fraction(self) -> float:
        return len(self.tombstones) / max(1, len(self.base_ids))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray | None:
        """Stored raw vectors of ``ids`` if this index keeps them exactly (flat, or HNSW for
        l2), else None (then SQLite has them)."""
        keeps_raw = self.spec.kind == "flat" or (
            self.spec.kind == "hnsw" and self.spec.metric == "l2"
        )
        if not keeps_raw:
            return None
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        in_delta = np.isin(ids, self.delta_ids)
        if in_delta.any():
            position = {int(i): n for n, i in enumerate(self.delta_ids)}
            out[in_delta] = self.delta[[position[int(i)] for i in ids[in_delta]]]
        if (~in_delta).any():
            out[~in_delta] = self.base.reconstruct_batch(ids[~in_delta])
        return out

    def memory_bytes(self) -> int:
        """Rough bytes this index holds in RAM (the base's codes and structure, the delta)."""
        return _base_bytes(self.base) + self.delta.nbytes + 8 * len(self.delta_ids)

    # -- searching ----------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        metric: str,
        params: SearchParams | None = None,
        allowed: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Candidate ids for each query (about ``k`` of the best, best first for exact kinds);
        restricted to ``allowed`` ids when given. The caller re-scores them exactly."""
        if not self.spec.serves(metric):
            from imgindex.errors import IncompatibleIndexError

            raise IncompatibleIndexError(
                f"this index is {self.spec.describe()}: it answers {self.spec.metric} queries "
                f"only (`imgindex build FOLDERS --index-type {self.spec.kind} --index-metric "
                f"{metric}` makes one for {metric}; `--index-type flat` answers both)"
            )
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.spec.kind == "flat":
            found = self._scan_flat(queries, k, metric, allowed)
        else:
            found = self._search_approximate(queries, k, params or SearchParams(), allowed)
        if len(self.delta_ids):
            extra = self._scan_delta(queries, k, metric, allowed)
            found = [np.concatenate([a, b]) for a, b in zip(found, extra, strict=True)]
        return found

    def _flat_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The flat base's vectors as a numpy view (no copy, memory-mapped or not), their
        squared norms and their ids in storage order (computed once per change)."""
        if self._flat_cache is None:
            flat = self._faiss.downcast_index(self.base.index)
            n = flat.ntotal
            view = np.empty((0, self.dim), np.float32)
            if n:
                codes = self._faiss.rev_swig_ptr(flat.get_xb(), n * self.dim)
                view = np.asarray(codes, dtype=np.float32).reshape(n, self.dim)
            norms = np.empty(n, dtype=np.float32)
            for lo, block in _aligned_blocks(view):
                norms[lo : lo + len(block)] = squared_norms(block)
            ids = self._faiss.vector_to_array(self.base.id_map).astype(np.int64)
            self._flat_cache = (view, norms, ids)
        return self._flat_cache

    def _scan_flat(
        self, queries: np.ndarray, k: int, metric: str, allowed: np.ndarray | None
    ) -> list[np.ndarray]:
        """Exact scan in blocks: one pass over the vectors per block of queries (a matrix
        product, so bound by memory bandwidth or by BLAS)."""
        view, norms, ids_in_order = self._flat_view()
        keep = None
        if len(self.tombstones) or allowed is not None:
            keep = np.ones(len(view), dtype=bool)
            if len(self.tombstones):
                keep &= ~np.isin(ids_in_order, self.tombstones)
            if allowed is not None:
                keep &= np.isin(ids_in_order, allowed)
        out = []
        for start in range(0, len(queries), 256):
            q = queries[start : start + 256]
            best = BestK(len(q), k)
            for lo, block in _aligned_blocks(view):
                hi = lo + len(block)
                scores = ranking_keys(q, block, metric, norms[lo:hi])
                if keep is not None:
                    scores[:, ~keep[lo:hi]] = np.inf
                best.offer(scores, np.arange(lo, hi))
            out += [ids_in_order[rows] for rows in best.result()]
        return out

    def _scan_delta(
        self, queries: np.ndarray, k: int, metric: str, allowed: np.ndarray | None
    ) -> list[np.ndarray]:
        ids, vectors = self.delta_ids, self.delta
        if allowed is not None:
            mask = np.isin(ids, allowed)
            ids, vectors = ids[mask], vectors[mask]
        if not len(ids):
            return [np.empty(0, dtype=np.int64) for _ in queries]
        order = np.argsort(ranking_keys(queries, vectors, metric), axis=1)[:, :k]
        return [ids[row] for row in order]

    def _search_approximate(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams,
        allowed: np.ndarray | None,
    ) -> list[np.ndarray]:
        faiss = self._faiss
        if not len(self.base_ids):
            return [np.empty(0, dtype=np.int64) for _ in queries]
        selector = None
        if allowed is not None:
            keep = np.setdiff1d(np.asarray(allowed, dtype=np.int64), self.tombstones)
            selector = faiss.IDSelectorBatch(keep)
        elif len(self.tombstones):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.tombstones))
        search_params = self._faiss_params(params, selector)
        _, found = self.base.search(
            _prepare(self.spec, queries), min(k, len(self.base_ids)), params=search_params
        )
        return [row[row >= 0] for row in found]

    def _faiss_params(self, params: SearchParams, selector: Any) -> Any:
        faiss = self._faiss
        ivf = _ivf_of(self.base)
        if ivf is not None:
            p = faiss.SearchParametersIVF()
            p.nprobe = params.nprobe or default_nprobe(ivf.nlist)
        elif (
            self.spec.kind == "hnsw"
            or "HNSW" in type(faiss.downcast_index(_inner(self.base))).__name__
        ):
            p = faiss.SearchParametersHNSW()
            p.efSearch = params.ef_search or HNSW_EF_SEARCH
        else:
            p = faiss.SearchParameters()
        if selector is not None:
            p.sel = selector
            p._selector_ref = selector  # keep the C++ object alive during the search
        return p

    # -- internals ----------------------------------------------------------------------------

    def _read_base_ids(self) -> np.ndarray:
        faiss = self._faiss
        if hasattr(self.base, "id_map"):
            return np.sort(faiss.vector_to_array(self.base.id_map).astype(np.int64))
        ivf = _ivf_of(self.base)
        if ivf is None:
            return np.arange(self.base.ntotal, dtype=np.int64)
        invlists = ivf.invlists
        parts = []
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(lst, ptr)
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    def _fold_delta(self) -> None:
        if len(self.delta_ids):
            if not self.mutable:
                raise RuntimeError("a read-only index cannot be saved")
            ids, vectors = self.delta_ids, self.delta
            self.delta_ids = np.empty(0, dtype=np.int64)
            self.delta = np.empty((0, self.dim), dtype=np.float32)
            self.add(ids, vectors)


def default_nprobe(nlist: int) -> int:
    """IVF lists probed by default: 1/64 of them, at least 16 (chosen with benchmarks/scale.py
    on a million AugNet-shaped vectors, whose recall the README shows; `imgindex tune` measures
    the user's own index)."""
    return min(nlist, max(16, nlist // 64))


def _aligned_blocks(view: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) blocks of ``view`` that BLAS can read at full speed.

    A memory-mapped FAISS file places the vectors at an odd byte offset, and numpy multiplies
    misaligned floats several times slower (benchmarks/scale.py shows the scan's speed), so
    such blocks are first copied into a small aligned buffer that stays in cache.
    """
    if view.flags.aligned:
        for lo in range(0, len(view), 65536):
            yield lo, view[lo : lo + 65536]
        return
    buffer = np.empty((4096, view.shape[1]), dtype=np.float32)
    for lo in range(0, len(view), 4096):
        block = buffer[: min(4096, len(view) - lo)]
        np.copyto(block, view[lo : lo + len(block)])
        yield lo, block


def _prepare(spec: IndexSpec, vectors: np.ndarray) -> np.ndarray:
    """Vectors as the FAISS base stores them: normalised for a cosine index, else raw."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return normalized(v) if spec.metric == "cosine" else v


def _new_base(spec: IndexSpec, dim: int) -> Any:
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT if spec.metric == "cosine" else faiss.METRIC_L2
    if spec.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
    if spec.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(spec.params.get("M", HNSW_M)), metric)
        hnsw.hnsw.efConstruction = int(spec.params.get("ef_construction", HNSW_EF_CONSTRUCTION))
        return faiss.IndexIDMap2(hnsw)
    index = faiss.index_factory(dim, spec.factory_string(), metric)
    if _ivf_of(index) is None:
        return faiss.IndexIDMap2(index)  # kinds without ids of their own
    return index


def _inner(base: Any) -> Any:
    return base.index if hasattr(base, "id_map") else base


def _ivf_of(base: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(_inner(base))
    except Exception:
        return None


def _base_kind(base: Any) -> str:
    import faiss

    inner = faiss.downcast_index(_inner(base))
    return type(inner).__name__


def _supports_remove(base: Any) -> bool:
    return _ivf_of(base) is not None or "Flat" in _base_kind(base)


def _base_bytes(base: Any) -> int:
    """Approximate RAM of a FAISS base: codes plus per-vector structure."""
    import faiss

    inner = faiss.downcast_index(_inner(base))
    n = base.ntotal
    ids = 8 * n * (2 if hasattr(base, "id_map") else 1)  # IndexIDMap2 also keeps a reverse map
    ivf = _ivf_of(base)
    if ivf is not None:
        return n * ivf.code_size + 8 * n + 4 * ivf.d * ivf.nlist
    if hasattr(inner, "hnsw"):
        links = faiss.vector_to_array(inner.hnsw.neighbors).nbytes
        return n * 4 * base.d + links + ids
    return n * getattr(inner, "code_size", 4 * base.d) + ids


def write_temporary(faiss: Any, index: Any, target: Path) -> tuple[Path, FileDigest]:
    """Write ``index`` to a new file beside ``target`` (:func:`imgindex.atomic.write_new`);
    return its path and digest. ``faiss.write_index`` to a file name only prints a failed close
    and returns, so every byte goes through Python's own writes instead."""
    return write_new(
        target, lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))
    )
