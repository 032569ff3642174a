"""Hot loops of the compressors: exact Top-k selection and Block-Sign encode/decode.

Each kernel has two implementations with identical results: numpy on CPU tensors (numpy reuses large buffers
and asks for huge pages, so it runs several times faster than fresh torch allocations on a small CPU) and
torch ops on any other device (CUDA clients compress on the GPU). ``device_path=True`` forces the torch
implementation, which lets the tests check on a CPU-only machine that both agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_compams.bits import pack_bits, unpack_bits

__all__ = ["block_l1_means", "blocksign_decode", "blocksign_encode", "l1_mean", "topk_indices"]

# Sample size for the Top-k threshold estimate and the head-room above k that the threshold aims for.
_SAMPLE = 1 << 16
_SLACK = 1.25
# Elements per chunk of the CPU passes: the temporaries stay in the L2 cache instead of d-sized arrays.
_CHUNK = 1 << 17
# Byte -> its 8 bits, most significant first (np.packbits order): the Block-Sign decode lookup table.
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.bool_)


def _use_numpy(x: torch.Tensor, device_path: bool) -> bool:
    return x.device.type == "cpu" and not device_path


def topk_indices(x: torch.Tensor, k: int, *, device_path: bool = False) -> torch.Tensor:
    """Indices of the k largest |x_i|, sorted ascending; ties go to the lower index (exact, deterministic).

    A threshold estimated from a strided sample keeps about 1.25 k candidates in one pass; the exact k-th
    magnitude is then found among the candidates only. If the estimate keeps fewer than k, the threshold is
    lowered and the pass repeated, so the result is always exact whatever the data.
    """
    d = x.numel()
    if not 0 < k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if _use_numpy(x, device_path):
        return torch.from_numpy(_topk_numpy(x.numpy(), k))
    return _topk_torch(x, k)


def _threshold_candidates(sorted_sample: np.ndarray | torch.Tensor, d: int, k: int, attempt: int):
    """Threshold such that about ``k * slack**(attempt+1)`` of d magnitudes lie at or above it."""
    n = len(sorted_sample)
    target = min(d, int(k * _SLACK ** (attempt + 1)) + 64)
    rank = n - 1 - int(target / d * n)  # ascending sample: count above rank ~ target/d of the sample
    return None if rank < 0 else sorted_sample[rank]


def _topk_numpy(x: np.ndarray, k: int) -> np.ndarray:
    d = x.size
    cands = None
    if 4 * k < d:
        sample = np.sort(np.abs(x[:: max(1, d // _SAMPLE)]))
        for attempt in range(4):
            t = _threshold_candidates(sample, d, k, attempt)
            if t is None:
                break
            c = _at_or_above_numpy(x, t)
            if c.size >= k:
                cands = c
                break
    if cands is None:
        cands = np.arange(d)
        vals = np.abs(x)
    else:
        vals = np.abs(x[cands])
    m = vals.size
    kth = np.partition(vals, m - k)[m - k]  # the k-th largest magnitude
    keep = vals > kth
    need = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(vals == kth)[:need]] = True  # ties: lowest indices first
    return cands[keep].astype(np.int64)


def _at_or_above_numpy(x: np.ndarray, t) -> np.ndarray:
    """``np.flatnonzero(np.abs(x) >= t)``, one cache-sized chunk at a time (no d-sized temporaries)."""
    d = x.size
    buf = np.empty(min(d, _CHUNK), dtype=x.dtype)
    mask = np.empty(buf.size, dtype=np.bool_)
    parts = []
    for start in range(0, d, _CHUNK):
        n = min(_CHUNK, d - start)
        np.abs(x[start : start + n], out=buf[:n])
        np.greater_equal(buf[:n], t, out=mask[:n])
        c = np.flatnonzero(mask[:n])
        if c.size:
            parts.append(c + start)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.intp)


def _topk_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x.abs()
    d = a.numel()
    cands = None
    if 4 * k < d:
        sample = torch.sort(a[:: max(1, d // _SAMPLE)]).values
        for attempt in range(4):
            t = _threshold_candidates(sample, d, k, attempt)
            if t is None:
                break
            c = torch.nonzero(a >= t).squeeze(1)
            if c.numel() >= k:
                cands = c
                break
    if cands is None:
        cands = torch.arange(d, device=x.device)
    vals = a[cands]
    m = vals.numel()
    kth = torch.kthvalue(vals, m - k + 1).values
    keep = vals > kth
    need = k - int(keep.sum())
    ties = torch.nonzero(vals == kth).squeeze(1)[:need]
    keep[ties] = True
    return cands[keep]


def _abs_sum_f64_numpy(x: np.ndarray, buf: np.ndarray) -> float:
    """``sum |x|`` accumulated in float64, one cache-sized chunk of |x| (in ``buf``) at a time."""
    total = 0.0
    for start in range(0, x.size, _CHUNK):
        n = min(_CHUNK, x.size - start)
        np.abs(x[start : start + n], out=buf[:n])
        total += float(np.add.reduce(buf[:n], dtype=np.float64))
    return total


def block_l1_means(
    x: torch.Tensor, block_sizes: tuple[int, ...], *, device_path: bool = False
) -> torch.Tensor:
    """``||x_B||_1 / d_B`` for every block, accumulated in float64 and returned in x's dtype.

    A float32 sum of many magnitudes drifts (torch's float32 L1 norm of 1e7 values with mean 1 was 5e-4 off
    relative on the CPU, 1.7e-4 for 131k values on an H200), and CPU and CUDA round differently; a float64 sum
    is exact to well below float32's last bit, so both devices give the same scale up to the final rounding.
    On the CPU each block streams once through a cache-sized float32 buffer of |x| into float64 sums (no
    d-sized temporary); on a device the blocks' sums are one segmented reduction, so the launch count does not
    grow with the number of tensors.
    """
    sizes = torch.tensor(block_sizes, dtype=torch.float64, device=x.device)
    if _use_numpy(x, device_path):
        flat = x.numpy()
        buf = np.empty(min(_CHUNK, max(flat.size, 1)), dtype=flat.dtype)
        ends = np.cumsum(np.asarray(block_sizes, dtype=np.int64))
        sums = [
            _abs_sum_f64_numpy(flat[e - n : e], buf) for e, n in zip(ends.tolist(), block_sizes, strict=True)
        ]
        return (torch.tensor(sums, dtype=torch.float64) / sizes).to(x.dtype)
    lengths = torch.tensor(block_sizes, dtype=torch.int64, device=x.device)
    sums = torch.segment_reduce(x.abs().double(), "sum", lengths=lengths)
    return (sums / sizes).to(x.dtype)


def l1_mean(x: torch.Tensor) -> torch.Tensor:
    """``||x||_1 / numel`` accumulated in float64 (see :func:`block_l1_means`), as a 0-d tensor of x's dtype."""
    return block_l1_means(x, (x.numel(),))[0]


def blocksign_encode(
    x: torch.Tensor, block_sizes: tuple[int, ...], *, device_path: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sign bits (1 for x >= 0) and per-block scales ``||x_B||_1 / d_B`` (Li et al., Def. 2)."""
    scales = block_l1_means(x, block_sizes, device_path=device_path)
    if _use_numpy(x, device_path):
        signs = torch.from_numpy(_pack_signs_numpy(x.numpy()))
    else:
        signs = pack_bits(x >= 0)
    return signs, scales


def blocksign_decode(
    signs: torch.Tensor,
    scales: torch.Tensor,
    block_sizes: tuple[int, ...],
    dim: int,
    *,
    device_path: bool = False,
) -> torch.Tensor:
    """``sign_B * scale_B`` for every block, concatenated into one dense vector of ``scales.dtype``."""
    if _use_numpy(signs, device_path):
        return torch.from_numpy(_blocksign_decode_numpy(signs.numpy(), scales.numpy(), block_sizes, dim))
    bits = unpack_bits(signs, dim)
    sizes = torch.tensor(block_sizes, device=scales.device)
    per_coord = torch.repeat_interleave(scales, sizes, output_size=dim)
    return torch.where(bits, per_coord, -per_coord)


def _pack_signs_numpy(x: np.ndarray) -> np.ndarray:
    """``np.packbits(x >= 0)``, one cache-sized chunk (a multiple of 8) at a time."""
    d = x.size
    out = np.empty((d + 7) // 8, dtype=np.uint8)
    mask = np.empty(min(d, _CHUNK), dtype=np.bool_)
    for start in range(0, d, _CHUNK):
        n = min(_CHUNK, d - start)
        np.greater_equal(x[start : start + n], 0, out=mask[:n])
        out[start // 8 : (start + n + 7) // 8] = np.packbits(mask[:n])
    return out


def _blocksign_decode_numpy(
    signs: np.ndarray, scales: np.ndarray, block_sizes: tuple[int, ...], dim: int
) -> np.ndarray:
    """``sign_B * scale_B`` per block, whole bytes of signs at a time.

    Each whole byte of signs goes to the block holding its first bit, where a 256 x 8 table of ``+-scale_B``
    maps it to its 8 values in one gather. The few coordinates that sit in a byte started by an earlier block
    (at most 7 per block boundary) and those of a final partial byte are then rewritten with their own
    block's scale, all in one vectorised step.
    """
    out = np.empty(dim, dtype=scales.dtype)
    ends = np.cumsum(np.asarray(block_sizes, dtype=np.int64))
    n_whole = dim // 8
    offset = 0
    for end, s in zip(ends.tolist(), scales, strict=True):
        lo, hi = -(-offset // 8), min(-(-end // 8), n_whole)  # bytes starting in [offset, end)
        if hi > lo:
            table = np.where(_BYTE_BITS, s, -s).astype(out.dtype, copy=False)
            np.take(table, signs[lo:hi], axis=0, out=out[8 * lo : 8 * hi].reshape(-1, 8), mode="clip")
        offset = end
    cuts = ends[:-1][ends[:-1] % 8 != 0]  # block starts inside a byte
    fix = cuts[:, None] + np.arange(8)
    fix = fix[(fix <= (cuts[:, None] | 7)) & (fix < dim)]  # from the cut to the end of its byte
    fix = np.concatenate((fix, np.arange(8 * n_whole, dim)))
    if fix.size:
        block = np.searchsorted(ends, fix, side="right")
        bit = (signs[fix >> 3] >> (7 - (fix & 7))) & 1
        out[fix] = np.where(bit.astype(np.bool_), scales[block], -scales[block])
    return out
