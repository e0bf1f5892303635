"""Top-k search of query rows against a bank, exact (chunked torch matmul) or approximate (faiss).

The exact search walks the bank in chunks of ``chunk_size`` rows, so memory stays at
``queries + one chunk + one [Q, chunk] score block`` whatever the bank size. Levels whose similarity is not a
plain dot product (Dice) pass their own ``score_chunk`` function to :func:`chunked_topk`.

Where the rows are, per device (:func:`place_rows` puts them there once per bank and device):

- CPU: float16 rows held in RAM while they fit a host memory budget (``device_budget``: default
  :data:`DEVICE_BUDGET_FRACTION` of the machine's RAM). On CPUs that multiply bfloat16 in hardware (AMX or
  AVX512-BF16, :func:`fast_bf16`) they are ranked in bfloat16 (:class:`RankedRows`, 2 bytes a value): a search
  ranks every row in one bfloat16 matmul, about 3x faster than float32, then re-scores the best ranked rows exactly
  in float32 from the stored rows, as many as it takes to prove that no other row can be in the top-k
  (:func:`ranked_topk`), so it returns the float32 search's neighbours and scores (up to float32 summation order:
  rows whose products differ by less than that may come in either order). Smooth images (the voxel level's rows)
  are ranked by their lower half of frequencies along each axis only, a quarter of a 2D image's values and an
  eighth of a 3D one's (a 2,000 x 64³ voxel bank takes 125 MiB), their bound counting what the rest can add; on
  other CPUs in float32 (4 bytes a value). Other rows are held there as float32, one float32 matmul. Rows beyond
  the budget stay memory-mapped as stored and are converted chunk by chunk into one reused float32 buffer. Other
  rows (float32, masks) stay memory-mapped.
- CUDA (and any other accelerator): torch tensors in their stored dtype (the voxel level's rows are float16),
  resident on the device up to a memory budget (``device_budget``: default :data:`DEVICE_BUDGET_FRACTION` of the
  device's memory and at most :data:`FREE_MEMORY_FRACTION` of what is free on it, counted in stored bytes); rows
  beyond it stay in host memory as stored (memory-mapped) and are streamed to the device chunk by chunk through two
  page-locked staging buffers (:class:`RowStream`; 2 x :data:`DEVICE_CHUNK_BYTES` pinned at most).
  float16 rows are multiplied in half precision with float32 accumulation and output
  (``torch.mm(..., out_dtype=torch.float32)``) where the device has it, the queries scaled to unit range first.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable

import numpy as np
import scipy.fft
import torch

from .separable import along_axes
from .validation import check_number

DEFAULT_CHUNK = 256  # rows per chunk on the CPU (cache-sized)
DEVICE_CHUNK_BYTES = 256 * 2**20  # bytes of rows per chunk on an accelerator (few, large matmuls)
BF16_UNIT = 2.0**-8  # largest relative rounding error of a bfloat16 value (8 significant bits)
FLOAT32_UNIT = 2.0**-24  # and of a float32 value (24)
RESCORE_DEPTHS = (4, 16, 64)  # best ranked rows re-scored exactly per query, deeper until the top-k is proven
# of |q| max|r|: float32 sums of products in two orders (the ranking's, the re-scoring's) differed by 5e-6 of it for
# z-scored rows (products of both signs), but by 1.7e-4 for 262,144 and 1e-3 for a million products of one sign
SUM_ORDER_ERROR = 2.0**-9
SPLIT_BYTES = 64 * 2**20  # float32 rows transformed at a time to rank them by their low frequencies
# and in pieces of about this (:func:`row_pieces`), whose temporaries the allocator reuses: glibc maps a request over
# its mmap threshold (at most 32 MiB) afresh from the OS each time, and touching new pages took as long as the work
PIECE_BYTES = 4 * 2**20
LOW_PASS_RESIDUAL = 0.1  # image rows are ranked by their low frequencies where the rest is at most this share of them
# of |q| max|r| for the float32 transforms of both sides (1e-7 each), and of |r|² added to a rest's squared norm
LOW_PASS_ERROR = 4 * 2.0**-14
DEVICE_BUDGET_FRACTION = 0.25  # default share of a CUDA device's memory (of the RAM, on the CPU) bank rows may take
FREE_MEMORY_FRACTION = 0.5  # and at most this share of a CUDA device's free memory, so that a full one still trains
SCORE_BYTES = 64 * 2**20  # largest [Q, chunk] float32 score block when rows are searched in place
RESCORE_BYTES = 4 * 2**20  # float32 rows read at a time to re-score bfloat16-ranked rows exactly (cache-sized)
# values a long product sums in one run (:func:`blocked_dots_`), the runs' sums then added: over the 262,144 values of
# a 64³ image, one run (MKL's matrix-vector product, torch's vector_norm) was off by up to 1e-5 (the dot) and 2e-4
# (the squares) where a constant background adds the same product thousands of times, and differed with the thread
# count; runs of 512 are as accurate as float64 to 1e-7, and each is summed by one thread whatever the batch
SUM_BLOCK = 512


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
        if exclude is not None:  # without a sync (torch.nonzero's), which would stall streamed rows on CUDA
            inside = ((exclude >= start) & (exclude < stop))[:, None].to(scores.device)
            columns = (exclude - start).clamp(0, stop - start - 1)[:, None].to(scores.device)
            scores.masked_fill_(torch.zeros_like(scores, dtype=torch.bool).scatter_(1, columns, inside), -torch.inf)
        values, indices = scores.topk(min(k, stop - start), dim=1)
        indices = indices + start
        if best_values is not None:
            values = torch.cat([best_values, values], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
            values, order = values.topk(min(k, values.shape[1]), dim=1)
            indices = indices.gather(1, order)
        best_values, best_indices = values, indices
    return best_values, best_indices


def _tensor(rows) -> torch.Tensor:
    """A numpy array or memmap as a tensor sharing its memory (made contiguous where it is not); a tensor as it is."""
    return torch.from_numpy(np.ascontiguousarray(rows)) if isinstance(rows, np.ndarray) else rows


def as_tensor(rows, device) -> torch.Tensor:
    """Bank rows (a numpy array or memmap, or a tensor on any device, any float dtype) as float32 on ``device``."""
    return _tensor(rows).to(device=device, dtype=torch.float32)


def take_rows(rows, indices: torch.Tensor, device) -> torch.Tensor:
    """``rows[indices]`` as float32 on ``device``, for tensor, numpy/memmap or :class:`RankedRows` (their stored
    rows) ``rows``; gathered by torch where it can write to them (numpy's gather is single-threaded and slower)."""
    rows = rows.exact if isinstance(rows, RankedRows) else rows
    if isinstance(rows, np.ndarray) and rows.flags.writeable:
        rows = torch.from_numpy(rows)
    if isinstance(rows, torch.Tensor):
        return as_tensor(rows.index_select(0, indices.to(rows.device)), device)
    return as_tensor(rows[indices.cpu().numpy()], device)


class RowStream:
    """Rows of a bank array, a chunk at a time, in one reused buffer of ``rows`` rows on ``device`` in ``dtype``:
    rows already there in that dtype are used in place, others are copied in. Host rows go to CUDA through two
    page-locked staging buffers used in turn, so that two chunks are pinned whatever the size of the bank, and
    reading the next chunk from a memory-mapped array overlaps the asynchronous copy of the last one.

    >>> stream = RowStream(np.arange(6, dtype=np.float16).reshape(3, 2), 2, "cpu", torch.float32)
    >>> stream(2, 3).tolist()
    [[4.0, 5.0]]
    """

    def __init__(self, refs, rows: int, device, dtype: torch.dtype) -> None:
        self.refs, self.device = refs, torch.device(device)
        shape = (min(rows, len(refs)), *refs.shape[1:])
        self.buffer = torch.empty(shape, device=self.device, dtype=dtype)
        self.staging = []
        if self.device.type == "cuda" and not (isinstance(refs, torch.Tensor) and refs.is_cuda):
            stored = _tensor(refs[:1]).dtype
            with torch.cuda.device(self.device):  # pinned in that device's context, not the current device's
                self.staging = [torch.empty(shape, dtype=stored, pin_memory=True) for _ in range(2)]
            self.copied: list[torch.cuda.Event | None] = [None, None]

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        chunk, rows = _tensor(self.refs[start:stop]), stop - start
        if chunk.device == self.device and chunk.dtype == self.buffer.dtype:
            return chunk
        if not self.staging:
            return self.buffer[:rows].copy_(chunk)
        turn = (start // len(self.buffer)) % 2
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # the copy that read this staging buffer last has finished
        staged = self.staging[turn][:rows].copy_(chunk)
        self.buffer[:rows].copy_(staged, non_blocking=True)  # on the stream of the buffer's device, current or not
        self.copied[turn] = torch.cuda.Event()
        self.copied[turn].record(torch.cuda.current_stream(self.device))
        return self.buffer[:rows]


def _is_half(rows) -> bool:
    return rows.dtype in (np.float16, torch.float16) if isinstance(rows, np.ndarray) else rows.dtype == torch.float16


@functools.lru_cache(maxsize=None)
def half_products(device: torch.device) -> bool:
    """Whether ``device`` multiplies float16 matrices with float32 accumulation and output (CUDA; the ``meta``
    device too, shape-only). The CPU multiplies in float32.

    >>> half_products(torch.device("cpu"))
    False
    """
    if device.type == "cpu":
        return False
    one = torch.ones(1, 1, device=device, dtype=torch.float16)
    try:
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def chunk_rows(row_bytes: int, device) -> int:
    """Rows per chunk of the exact search: :data:`DEFAULT_CHUNK` on the CPU, :data:`DEVICE_CHUNK_BYTES` worth on
    an accelerator."""
    if torch.device(device).type == "cpu":
        return DEFAULT_CHUNK
    return max(1, DEVICE_CHUNK_BYTES // max(row_bytes, 1))  # large rows too: two pinned staging chunks of 256 MiB


def _in_place(refs, queries: torch.Tensor) -> bool:
    """Whether ``refs`` are a tensor on the queries' device in their dtype, searchable without any copy."""
    return isinstance(refs, torch.Tensor) and refs.device == queries.device and refs.dtype == queries.dtype


def inner_product_topk(
    queries: torch.Tensor,
    refs,
    k: int,
    *,
    chunk_size: int | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``queries @ refs.T`` with ``refs`` a [N, D] array, memmap or tensor (any float dtype, on
    any device), computed on the queries' device; float32 scores. ``chunk_size`` rows are scored at a time
    (default: :func:`chunk_rows`; rows already on the device in the queries' dtype, as :func:`place_rows` leaves
    them, in one matmul, or chunks of :data:`SCORE_BYTES` of scores).

    >>> refs = np.eye(3, dtype=np.float16)
    >>> inner_product_topk(torch.tensor([[0.0, 2.0, 1.0]]), refs, 2)[1].tolist()
    [[1, 2]]
    """
    if isinstance(refs, RankedRows):
        return ranked_topk(queries, refs, k, exclude=exclude)
    device = queries.device
    half = _is_half(refs) and half_products(device)
    queries, scale = queries.float(), None
    if half:  # unit range, so that float16 keeps the queries' precision (NCC rows are tiny: z / voxel count)
        scale = queries.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        queries = (queries / scale).half()
    if _in_place(refs, queries):
        chunk_size, stream = chunk_size or max(DEFAULT_CHUNK, SCORE_BYTES // (4 * len(queries))), None
    else:
        chunk_size = chunk_size or chunk_rows(refs.shape[1] * (2 if half else 4), device)
        stream = RowStream(refs, chunk_size, device, queries.dtype)

    def score_chunk(start: int, stop: int) -> torch.Tensor:
        rows = refs[start:stop] if stream is None else stream(start, stop)
        return torch.mm(queries, rows.T, out_dtype=torch.float32) * scale if half else queries @ rows.T

    return chunked_topk(score_chunk, len(refs), k, chunk_size=chunk_size, exclude=exclude)


@functools.lru_cache(maxsize=None)
def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16, through oneDNN), about 3x
    faster than float32; the CPU search then ranks in bfloat16 (:class:`RankedRows`)."""
    cpu = torch.cpu
    return torch.backends.mkldnn.is_available() and any(
        getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


class RankedRows:
    """Stored float16 bank rows ``[N, ...]`` for the CPU search, held in RAM a second time as ``dtype`` (bfloat16 by
    default) ``[N, K]`` (``ranking``) to rank every row fast; indexing, ``len``, ``shape`` and ``reshape`` give the
    stored rows (``exact``), from which :func:`ranked_topk` re-scores the best ranked ones in float32.

    Rows of images (``[N, C, *grid]``) are ranked by their low frequencies only where ``bases`` are given
    (:func:`ranking_bases`: where those hold all but :data:`LOW_PASS_RESIDUAL` of them): their orthonormal DCT-II
    coefficients of the lower half of frequencies along each spatial axis, a quarter of a 2D image's values, an
    eighth of a 3D one's. The transform is orthonormal, so a product is that of the low frequencies plus that of the
    rest, at most ``|q_rest| |r_rest|`` (Cauchy-Schwarz), which :meth:`keys` adds row by row (``rest_norms``), so
    that a few noisy rows do not loosen the bound of the others. The voxel level's rows are smoothed: their rest is
    0.7-4% of them on the phantoms and the benchmark rows, and the ranking a quarter or an eighth of the work.

    >>> rows = RankedRows(np.arange(6, dtype=np.float16).reshape(3, 1, 2))
    >>> len(rows), rows.shape, rows.ranking.dtype, rows.reshape(3, -1)[[2]].tolist()
    (3, (3, 1, 2), torch.bfloat16, [[4.0, 5.0]])
    """

    def __init__(self, exact: np.ndarray, bases: list[torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        units = {torch.bfloat16: BF16_UNIT, torch.float32: FLOAT32_UNIT}  # a value's largest rounding, relative
        if dtype not in units:
            raise ValueError(f"bank rows are ranked in bfloat16 or float32, not {dtype}")
        self.exact, self.image_shape, self.bases, self.unit = exact, exact.shape[1:], bases, units[dtype]
        flat = exact.reshape(len(exact), -1)
        self.ranking = torch.empty(len(flat), ranking_width(exact, self.bases), dtype=dtype)
        # of the stored rows, of what is ranked of them, of its rounding errors and of what is not ranked
        self.largest_norm = self.largest_ranked = self.largest_rounding = 0.0
        self.rest_norms = None if bases is None else torch.empty(len(flat))  # bounds of each row's rest's norm
        step = min(DEFAULT_CHUNK, _split_rows(flat))
        for start in range(0, len(flat), step):
            chunk = as_tensor(flat[start : start + step], "cpu")
            ranked, rest_norms = _split(chunk, self.image_shape, self.bases)
            rounded = self.ranking[start : start + len(chunk)]
            rounded.copy_(ranked)
            self.largest_norm = max(self.largest_norm, _largest_norm(chunk))
            self.largest_ranked = max(self.largest_ranked, _largest_norm(ranked))
            self.largest_rounding = max(self.largest_rounding, _largest_norm(ranked - rounded.float()))
            if rest_norms is not None:
                self.rest_norms[start : start + len(chunk)] = rest_norms
        self.largest_rest = 0.0 if self.rest_norms is None or not len(flat) else float(self.rest_norms.max())

    def __len__(self) -> int:
        return len(self.exact)

    def __getitem__(self, index):
        return self.exact[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.exact.shape

    @property
    def dtype(self):
        return self.exact.dtype

    def reshape(self, *shape) -> RankedRows:
        """The same rows, the stored ones reshaped (row by row: the ranking rows stay ``[N, K]``)."""
        reshaped = copy.copy(self)
        reshaped.exact = self.exact.reshape(*shape)
        if len(reshaped.exact) != len(self.ranking):
            raise ValueError(f"cannot reshape {len(self)} bank rows to {reshaped.exact.shape}: rows stay rows")
        return reshaped

    def rank(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Float32 ``queries`` ``[Q, D]`` as the ranking multiplies them (``[Q, K]`` in its dtype), an upper bound
        ``[Q]`` on the norm of the rest of each (None where rows are ranked whole), and the slack ``[Q]`` of
        :meth:`bound` for each."""
        ranked, rest_norms = _split(queries, self.image_shape, self.bases)
        return ranked.to(self.ranking.dtype), rest_norms, self.slack(queries, ranked, rest_norms)

    def keys(self, ranked: torch.Tensor, rest_norms: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """``[Q, stop - start]`` float32: the ranking products of queries (``ranked``, ``rest_norms`` as
        :meth:`rank` gives them) with rows ``start:stop``, plus ``|q_rest| |r_rest|`` where rows are ranked by their
        low frequencies; rows are ranked by these, and :meth:`bound` starts from them."""
        products = (ranked @ self.ranking[start:stop].T).float()
        return products if rest_norms is None else products.addr_(rest_norms, self.rest_norms[start:stop])

    def slack(self, queries: torch.Tensor, ranked: torch.Tensor, rest_norms: torch.Tensor | None) -> torch.Tensor:
        """``[Q]``: the most the exact products of ``queries`` (their ``ranked`` part, and the norms of the rest)
        with these rows can exceed their ranking products, beyond the rounding of the products themselves
        (:meth:`bound`).

        The ranking multiplies the rounded ``q~ = q + dq`` and ``r~ = r - dr`` of the ranked parts, summed in
        float32, so the ranked parts' product is at most the rounded one plus ``|q~| max|dr| + |dq| max|r|``, with
        ``|q~| <= (1 + u) |q|`` and ``|dq| <= u |q|`` (``u``: the ranking dtype's unit rounding); plus
        ``SUM_ORDER_ERROR |q| max|r|`` for the order float32 sums in. Rows ranked by their low frequencies add
        ``LOW_PASS_ERROR |q| max|r|`` for the float32 transforms, and ``u |q_rest| max|r_rest| / (1 - u)`` for
        the rounding of the products within :meth:`keys` (which add the rests' product row by row)."""
        norms, ranked_norms = (torch.linalg.vector_norm(x, dim=1) for x in (queries, ranked))
        slack = (ranked_norms * ((1 + self.unit) * self.largest_rounding + self.unit * self.largest_ranked)
                 + norms * SUM_ORDER_ERROR * self.largest_norm)
        if rest_norms is not None:
            slack += (rest_norms * self.largest_rest * (self.unit / (1 - self.unit))
                      + norms * LOW_PASS_ERROR * self.largest_norm)
        return slack

    def bound(self, keys: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
        """The most the exact products of queries with rows can be, given their :meth:`keys` and the queries'
        ``slack`` (:meth:`rank`): a product ``s`` in the ranking dtype is rounded from one at most
        ``s + u |s| / (1 - u)``, and a key is ``s`` plus the rests' product, rounded to float32 once more (the
        float32 roundings of the rests' norms and product, at most 2^-24 of ``|q| max|r|`` each, are within
        ``SUM_ORDER_ERROR``)."""
        return keys + keys.abs() * (self.unit / (1 - self.unit) + FLOAT32_UNIT) + slack


def _largest_norm(rows: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(rows, dim=1).max())


def ranking_bases(rows: np.ndarray) -> list[torch.Tensor] | None:
    """The bases :class:`RankedRows` ranks ``rows`` ``[N, C, *grid]`` by: per spatial axis, the orthonormal DCT-II
    basis ``[n // 2, n]`` of its lower half of frequencies, where the rows are images of two or more spatial axes of
    at least 8 voxels and all but :data:`LOW_PASS_RESIDUAL` of each of the first rows (:data:`SPLIT_BYTES` of them)
    is in those; else None (rows are ranked whole). It decides speed only: the bound holds either way."""
    grid = rows.shape[2:]
    if len(grid) < 2 or min(grid) < 8:
        return None
    bases = [torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0)[: n // 2]).float() for n in grid]
    flat = rows.reshape(len(rows), -1)
    first = as_tensor(flat[: min(DEFAULT_CHUNK, _split_rows(flat))], "cpu")
    _, rest_norms = _split(first, rows.shape[1:], bases)
    return bases if bool((rest_norms <= LOW_PASS_RESIDUAL * torch.linalg.vector_norm(first, dim=1)).all()) else None


def ranking_width(rows: np.ndarray, bases: list[torch.Tensor] | None) -> int:
    """Values a row of ``rows`` is ranked by, with ``bases`` (:func:`ranking_bases`)."""
    return int(np.prod(rows.shape[1:])) if bases is None else rows.shape[1] * int(np.prod([len(b) for b in bases]))


def _split_rows(flat) -> int:
    """Rows of ``flat`` ``[N, D]`` that :data:`SPLIT_BYTES` of float32 holds (at least one)."""
    return max(1, SPLIT_BYTES // (4 * flat.shape[1]))


def row_pieces(count: int, row_bytes: int) -> list[slice]:
    """``count`` rows of ``row_bytes`` each in consecutive pieces of about ``PIECE_BYTES``, and of at least 2 rows
    where there are 2: torch sums a single row's values over its threads (a batch's, a row per thread), in another
    order, so a piece of one row would differ from the whole batch in its last digits.

    >>> row_pieces(9, PIECE_BYTES // 4), row_pieces(1, 2**40)
    ([slice(0, 5, None), slice(5, 9, None)], [slice(0, 1, None)])
    """
    if count == 0:
        return [slice(0, 0)]
    parts = np.array_split(np.arange(count), max(1, count // max(2, PIECE_BYTES // max(1, row_bytes))))
    return [slice(int(part[0]), int(part[-1]) + 1) for part in parts]


def _split(rows: torch.Tensor, image_shape, bases) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, D]`` float32 rows of ``[C, *grid]`` images as ranked (``[B, K]``: their low frequencies along
    ``bases``, or themselves where None) and an upper bound ``[B]`` on the norm of the part of them not ranked (None
    where ranked whole): Pythagoras, the bases being orthonormal, in float64, with :data:`LOW_PASS_ERROR` ``|r|²``
    more for the float32 transform. Transformed a few rows at a time (:func:`row_pieces`)."""
    if bases is None:
        return rows, None
    pieces = [rows[piece] for piece in row_pieces(len(rows), 4 * rows.shape[1])]
    return tuple(torch.cat(parts) for parts in zip(*(_split_piece(piece, image_shape, bases) for piece in pieces)))


def _split_piece(rows: torch.Tensor, image_shape, bases) -> tuple[torch.Tensor, torch.Tensor]:
    low = along_axes(rows.view(-1, *image_shape), bases).flatten(1)
    norms, low_norms = (torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square() for x in (rows, low))
    return low, (norms - low_norms).clamp_min(0).add(LOW_PASS_ERROR * norms).sqrt().float()


def ranked_topk(queries: torch.Tensor, refs: RankedRows, k: int, *,
                exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` of ``queries @ refs.T`` in float32, as :func:`inner_product_topk` finds it, found by ranking
    every row (:class:`RankedRows`) and re-scoring exactly the ``RESCORE_DEPTHS`` best ranked rows of each query, deeper
    until :meth:`RankedRows.bound` proves it: once the k-th best exact score beats the bound of the next ranked
    score, no row left unscored can enter the top-k. Queries it cannot prove within ``RESCORE_DEPTHS[-1]`` rows are
    searched in full in float32.

    >>> refs = RankedRows(np.eye(3, dtype=np.float16))
    >>> ranked_topk(torch.tensor([[0.0, 2.0, 1.0]]), refs, 2)[1].tolist()
    [[1, 2]]
    """
    queries, n = queries.float(), len(refs)
    rounded, rests, slack = refs.rank(queries)
    chunk = max(DEFAULT_CHUNK, SCORE_BYTES // (4 * len(queries)))
    ranked_values, ranked_indices = chunked_topk(lambda a, b: refs.keys(rounded, rests, a, b), n,
                                                 max(k, RESCORE_DEPTHS[-1]) + 1, chunk_size=chunk, exclude=exclude)
    ranked = ranked_values.shape[1]  # one more than the rows re-scored, where there are that many
    k = min(k, ranked)
    left = torch.full((len(queries),), n) if exclude is None else n - (exclude.cpu() >= 0).long()  # rows to match
    exact = torch.full_like(ranked_values, -torch.inf)
    values = torch.empty(len(queries), k)
    indices = torch.empty(len(queries), k, dtype=torch.long)
    pending, scored = torch.arange(len(queries)), 0
    for stop in sorted({min(max(d, k), ranked) for d in RESCORE_DEPTHS}):
        unproven = queries if len(pending) == len(queries) else queries[pending]  # no copy while all are pending
        exact[pending, scored:stop] = _exact_scores(unproven, refs, ranked_indices[pending, scored:stop])
        scored = stop
        best, order = exact[pending, :stop].topk(k, dim=1)
        if stop < ranked:  # every row not scored ranks at most as the next one
            proven = best[:, -1] > refs.bound(ranked_values[pending, stop], slack[pending])
        else:  # every ranked row scored; rows not ranked (where there are any) rank at most as the last one
            proven = (left[pending] <= ranked) | (best[:, -1] > refs.bound(ranked_values[pending, -1], slack[pending]))
        done = pending[proven]
        values[done], indices[done] = best[proven], ranked_indices[done].gather(1, order[proven])
        pending = pending[~proven]
        if not len(pending):
            return values, indices
    values[pending], indices[pending] = inner_product_topk(
        queries[pending], refs.exact.reshape(n, -1), k, exclude=None if exclude is None else exclude[pending])
    return values, indices


def _exact_scores(queries: torch.Tensor, refs: RankedRows, indices: torch.Tensor) -> torch.Tensor:
    """``[Q, M]`` float32 products of each query with its ``indices`` rows, read from the stored rows into two
    reused buffers of about ``RESCORE_BYTES`` (stored rows gathered, then converted), so that no large copy is
    made: a query's rows are split over several blocks where they do not fit one."""
    flat = torch.from_numpy(refs.exact.reshape(len(refs), -1))
    per_block = max(1, RESCORE_BYTES // (4 * flat.shape[1]))  # rows
    width = indices.shape[1]
    queries_at_once, columns_at_once = max(1, per_block // width), min(width, per_block)
    stored = torch.empty(min(per_block, indices.numel()), flat.shape[1], dtype=flat.dtype)
    converted = torch.empty(stored.shape)
    scores = torch.empty(indices.shape)
    for start in range(0, len(queries), queries_at_once):
        for column in range(0, width, columns_at_once):
            block = (slice(start, start + queries_at_once), slice(column, column + columns_at_once))
            part = indices[block]
            rows = converted[: part.numel()]
            rows.copy_(torch.index_select(flat, 0, part.flatten(), out=stored[: part.numel()]))
            scores[block] = blocked_dots_(rows.view(*part.shape, -1), queries[block[0], None])
    return scores


@functools.lru_cache(maxsize=64)
def sum_block(size: int) -> int:
    """The largest divisor of ``size`` up to ``SUM_BLOCK``: the run :func:`blocked_dots_` sums at once."""
    return max(b for b in range(1, min(size, SUM_BLOCK) + 1) if size % b == 0)


def blocked_dots_(scratch: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``(scratch * vectors).sum(-1)`` (broadcast; last axis of length ``D``), each product's values summed in runs
    of :func:`sum_block` of ``D``, then the runs' sums added (see ``SUM_BLOCK``): within about 1e-7 of float64 sums,
    and the same to the last digit whatever the batch or thread count. ``scratch`` is overwritten by the products
    (no copy of its size is made). On the CPU it takes up to twice the time of one matrix-vector product of a few
    rows (whose single run is less accurate), a third of that of batched products run by run, and a tenth of a batch
    of one-row products.

    >>> scratch = torch.ones(2, 1024)
    >>> blocked_dots_(scratch, torch.full((1024,), 0.5)).tolist(), scratch[0, 0].item()
    ([512.0, 512.0], 0.5)
    """
    block = sum_block(scratch.shape[-1])
    return scratch.unflatten(-1, (-1, block)).mul_(vectors.unflatten(-1, (-1, block))).sum(-1).sum(-1)


def host_memory() -> int:
    """Bytes of RAM on this machine (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def device_budget(device, budget: int | None = None) -> int:
    """Bytes of bank rows that may stay resident on ``device``: ``budget`` when given; else
    :data:`DEVICE_BUDGET_FRACTION` of a CUDA device's total memory, and at most :data:`FREE_MEMORY_FRACTION` of the
    memory free on it now (outside torch's cache, which the training run holds for itself) or, on the CPU,
    :data:`DEVICE_BUDGET_FRACTION` of the machine's RAM; 0 on other devices.

    >>> device_budget("cpu") > 0, device_budget("meta"), device_budget("meta", 2**20)
    (True, 0, 1048576)
    """
    if budget is not None:
        return check_number("device_budget", budget, low=0, integer=True)
    device = torch.device(device)
    if device.type == "cpu":
        return int(DEVICE_BUDGET_FRACTION * host_memory())
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return int(min(DEVICE_BUDGET_FRACTION * total, FREE_MEMORY_FRACTION * free))


def place_rows(arrays: dict[str, dict[str, np.ndarray]], device, budget: int | None = None) -> dict:
    """Bank arrays (``{level: {key: [N, ...] array}}``) ready for search on ``device``, resident there while they
    fit in ``device_budget(device, budget)`` bytes (in order, level by level).

    On the CPU, float16 arrays are held in RAM while they fit: as :class:`RankedRows` (in bfloat16 where the CPU has
    :func:`fast_bf16`, else, for smooth images, their low frequencies in float32), counted at what the ranking holds,
    or else as float32 tensors (4 bytes a value); the rest stay as they
    are (memory-mapped), converted chunk by chunk at each search. Elsewhere, torch tensors in their
    stored dtype: on the device while they fit, the rest in host memory as stored (memory-mapped), from which the
    search streams them chunk by chunk (:class:`RowStream`).

    >>> rows = {"voxel": {"rows": np.ones((4, 3), dtype=np.float16)}}
    >>> place_rows(rows, "meta", budget=24)["voxel"]["rows"].device.type
    'meta'
    >>> place_rows(rows, "meta", budget=0)["voxel"]["rows"].device.type
    'cpu'
    >>> type(place_rows(rows, "cpu", budget=0)["voxel"]["rows"])
    <class 'numpy.ndarray'>
    """
    device = torch.device(device)
    left, placed = device_budget(device, budget), {}
    for name, level_arrays in arrays.items():
        placed[name] = {}
        for key, array in level_arrays.items():
            if device.type == "cpu":
                placed[name][key], left = _to_host(array, left)
                continue
            tensor = _tensor(array)  # rows beyond the budget stay where they are (memory-mapped), streamed from there
            if tensor.nbytes <= left:
                left -= tensor.nbytes
                tensor = tensor.to(device)
            placed[name][key] = tensor
    return placed


def placed_bytes(arrays: dict, device) -> tuple[int, int]:
    """(bytes held, bytes left as stored) of one level's arrays as :func:`place_rows` put them for ``device``: held
    on the device (on the CPU: in RAM, as bfloat16 or float32), or left as stored (memory-mapped on the CPU;
    elsewhere in host memory, read to the device at every search)."""
    cpu, held, stored = torch.device(device).type == "cpu", 0, 0
    for array in arrays.values():
        if isinstance(array, RankedRows):
            held += array.ranking.nbytes
        elif isinstance(array, torch.Tensor) and (array.device.type != "cpu" or cpu):
            held += array.nbytes
        else:
            stored += array.nbytes
    return held, stored


def describe_placement(placed: dict, device, budget: int | None = None) -> str:
    """Where :func:`place_rows` put a bank's arrays for ``device`` within ``budget`` (see :func:`device_budget`), in
    one line: the bytes held there and the bytes left as stored (:func:`placed_bytes`).

    >>> rows = {"voxel": {"rows": np.ones((4, 3), dtype=np.float16), "thumbs": np.ones((4, 1), dtype=np.float16)}}
    >>> describe_placement(place_rows(rows, "meta", budget=24), "meta", 24)
    'bank arrays for search on meta: 24 B held there (budget 24 B), 8 B streamed from host memory at every search'
    """
    device = torch.device(device)
    held, stored = (sum(sizes) for sizes in zip(*(placed_bytes(arrays, device) for arrays in placed.values())))
    where = "held in RAM" if device.type == "cpu" else "held there"
    left = "read memory-mapped as stored" if device.type == "cpu" else "streamed from host memory at every search"
    budget = _size(device_budget(device, budget))
    return f"bank arrays for search on {device}: {_size(held)} {where} (budget {budget}), {_size(stored)} {left}"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _to_host(array: np.ndarray, left: int) -> tuple:
    """``array`` held in RAM when it is float16 and fits in ``left`` bytes, else as it is; and the bytes left. Held
    as :class:`RankedRows`: in bfloat16 where the CPU has :func:`fast_bf16`; elsewhere in float32 where they are
    ranked by their low frequencies (:func:`ranking_bases`), else as a float32 tensor, searched in one product."""
    if array.dtype != np.float16:
        return array, left
    bases, dtype = ranking_bases(array), torch.bfloat16 if fast_bf16() else torch.float32
    ranked = dtype == torch.bfloat16 or bases is not None
    nbytes = len(array) * ranking_width(array, bases) * dtype.itemsize if ranked else array.size * 4
    if nbytes > left:
        return array, left
    held = RankedRows(array, bases, dtype) if ranked else torch.from_numpy(np.asarray(array, dtype=np.float32))
    return held, left - nbytes


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
