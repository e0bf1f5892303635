"""Top-k search of query rows against a bank, exact (chunked torch matmul) or approximate (faiss).

The exact search walks the bank in chunks of ``chunk_size`` rows, so memory stays at
``queries + one chunk + one [Q, chunk] score block`` whatever the bank size; float16 bank rows are converted
chunk by chunk into one reused float32 buffer. Levels whose similarity is not a plain dot product (Dice) pass
their own ``score_chunk`` function to :func:`chunked_topk`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

DEFAULT_CHUNK = 256


def chunked_topk(
    score_chunk: Callable[[int, int], torch.Tensor],
    n_refs: int,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, indices) per query over ``n_refs`` references, scored chunk by chunk.

    ``score_chunk(start, stop)`` returns the ``[Q, stop - start]`` similarities (larger = more similar).
    ``exclude[q]`` is a reference index that query ``q`` may not match (leave-one-out), or -1.

    >>> refs = torch.eye(4)
    >>> values, indices = chunked_topk(lambda a, b: refs[:2] @ refs[a:b].T, 4, 1, chunk_size=3)
    >>> indices.flatten().tolist()
    [0, 1]
    """
    k = min(k, n_refs - (0 if exclude is None else 1))
    if k < 1:
        raise ValueError(f"cannot search {n_refs} reference(s) for a nearest neighbour")
    best_values = best_indices = None
    for start in range(0, n_refs, chunk_size):
        stop = min(start + chunk_size, n_refs)
        scores = score_chunk(start, stop).float()
        if exclude is not None:
            inside = (exclude >= start) & (exclude < stop)
            rows = torch.nonzero(inside).flatten()
            scores[rows, exclude[rows] - start] = -torch.inf
        values, indices = scores.topk(min(k, stop - start), dim=1)
        indices = indices + start
        if best_values is not None:
            values = torch.cat([best_values, values], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
            values, order = values.topk(min(k, values.shape[1]), dim=1)
            indices = indices.gather(1, order)
        best_values, best_indices = values, indices
    return best_values, best_indices


def rows_to_tensor(refs, start: int, stop: int, device, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of a numpy array/memmap or tensor as float32 on ``device`` (reusing ``buffer``)."""
    chunk = refs[start:stop]
    chunk = torch.from_numpy(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
    if buffer is None:
        return chunk.to(device=device, dtype=torch.float32)
    return buffer[: stop - start].copy_(chunk)


def inner_product_topk(
    queries: torch.Tensor,
    refs,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``queries @ refs.T`` with ``refs`` a [N, D] array, memmap or tensor (any float dtype).

    >>> refs = np.eye(3, dtype=np.float16)
    >>> inner_product_topk(torch.tensor([[0.0, 2.0, 1.0]]), refs, 2)[1].tolist()
    [[1, 2]]
    """
    queries = queries.float()
    buffer = torch.empty(min(chunk_size, len(refs)), refs.shape[1], device=queries.device)

    def score_chunk(start: int, stop: int) -> torch.Tensor:
        return queries @ rows_to_tensor(refs, start, stop, queries.device, buffer).T

    return chunked_topk(score_chunk, len(refs), k, chunk_size=chunk_size, exclude=exclude)


class FaissIndex:
    """Approximate (or exact flat) inner-product search with faiss, for large banks.

    Args:
        kind: ``"flat"`` (exact ``IndexFlatIP``), ``"ivf"`` (``IndexIVFFlat``, inverted lists) or
            ``"hnsw"`` (``IndexHNSWFlat``, graph).
        nlist: number of IVF lists (default ``4 * sqrt(N)``); nprobe: lists visited per query.
        hnsw_m: HNSW graph degree; ef_search: HNSW search breadth.

    >>> index = FaissIndex("flat")
    >>> index.add(np.eye(3, dtype=np.float32))
    >>> index.search(torch.tensor([[0.0, 1.0, 0.0]]), 1)[1].tolist()
    [[1]]
    """

    KINDS = ("flat", "ivf", "hnsw")

    def __init__(self, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32,
                 ef_search: int = 128) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"faiss index kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.nlist, self.nprobe, self.hnsw_m, self.ef_search = kind, nlist, nprobe, hnsw_m, ef_search
        self._index = None

    def add(self, refs, chunk_size: int = 4096) -> None:
        """Index the rows of ``refs`` ([N, D], any float dtype), added in float32 chunks."""
        import faiss

        n, dim = refs.shape
        if self.kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
        else:
            nlist = self.nlist or max(1, min(n // 8, int(4 * np.sqrt(n))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.linspace(0, n - 1, min(n, 64 * nlist)).astype(int)
            index.train(np.ascontiguousarray(refs[sample], dtype=np.float32))
            index.nprobe = min(self.nprobe, nlist)
        for start in range(0, n, chunk_size):
            index.add(np.ascontiguousarray(refs[start : start + chunk_size], dtype=np.float32))
        self._index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (inner products, indices) per query row; indices are -1 where fewer than ``k`` were found."""
        if self._index is None:
            raise RuntimeError("FaissIndex.search called before add()")
        values, indices = self._index.search(np.ascontiguousarray(queries.detach().cpu().float().numpy()), k)
        values[indices < 0] = -np.inf
        return torch.from_numpy(values).to(queries.device), torch.from_numpy(indices).to(queries.device)
