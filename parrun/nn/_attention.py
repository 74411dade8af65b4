"""Scaled dot-product attention, parallel over (batch, head, query-block) tiles, each tile
computed block-wise over keys with an online softmax (flash-attention style)."""

from __future__ import annotations

import numbers
import operator

import numpy as np

import parrun

from ._ops import softmax_step_

# Query rows per tile: the scheduled item. Smaller tiles pay more Python and smaller BLAS
# calls per FLOP; larger ones leave fewer tiles to steal and push the (block_k x block_q)
# scores out of L2. Measured on 1024 x 64 heads, one core, scores kept transposed and the
# causal diagonal as its own block: 256 is 5-10% faster than 128 or 512, causal or not.
BLOCK_Q = 256
# Keys per inner block: a tile's temporaries are BLOCK_K x BLOCK_Q scores, whatever the
# sequence length. Larger blocks mean fewer NumPy calls (1024 beat 512 and 256 by 5-10%).
BLOCK_K = 1024


def _check(q, k, v, mask):
    q, k, v = (np.asarray(a) for a in (q, k, v))
    if q.dtype not in (np.float32, np.float64) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a float32 or float64 dtype, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be (batch, heads, seq, head_dim)")
    if k.shape != (*v.shape[:3], k.shape[3]) or q.shape[:2] != k.shape[:2] or \
            q.shape[3] != k.shape[3]:
        raise ValueError(f"shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}")
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool and m.dtype.kind != "f":
            # An integer 0/1 mask (a tokenizer's attention_mask) taken as additive masked
            # nothing: refused, as torch refuses it.
            raise TypeError(f"mask must be boolean (True = attend) or floating (added to "
                            f"the scores), got {m.dtype}; for a 0/1 mask pass "
                            "mask.astype(bool)")
        if m.dtype != bool and m.dtype != q.dtype:
            m = m.astype(q.dtype)
        want = (*q.shape[:3], k.shape[2])
        try:
            fits = np.broadcast_shapes(m.shape, want) == want  # a 5-D mask broadcasts too
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"mask of shape {m.shape} does not broadcast to {want}")
        mask = m
    return q, k, v, mask


def _mask_block(mask, b, h, q0, q1, k0, k1):
    """The (q1-q0, k1-k0) block of a mask broadcast to (B, H, Sq, Sk)."""
    m = mask
    while m.ndim < 4:
        m = m[None]
    bi = b if m.shape[0] > 1 else 0
    hi = h if m.shape[1] > 1 else 0
    rows = slice(q0, q1) if m.shape[2] > 1 else slice(0, 1)
    cols = slice(k0, k1) if m.shape[3] > 1 else slice(0, 1)
    return m[bi, hi, rows, cols]


def attention_reference(q, k, v, causal=False, mask=None, scale=None):
    """Serial NumPy, one (batch, head) at a time, full softmax (O(seq^2) per head). A query
    with every key masked (or no keys) gets zeros, as torch's scaled_dot_product_attention
    gives."""
    q, k, v, mask = _check(q, k, v, mask)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.empty((*q.shape[:3], v.shape[3]), q.dtype)
    for b in range(B):
        for h in range(H):
            s = (q[b, h] @ k[b, h].T) * q.dtype.type(scale)
            if causal:
                s[np.triu(np.ones((Sq, Sk), bool), 1)] = -np.inf
            if mask is not None:
                m = _mask_block(mask, b, h, 0, Sq, 0, Sk)
                s = np.where(m, s, -np.inf) if m.dtype == bool else s + m
            top = s.max(axis=1, keepdims=True, initial=-np.inf)
            s -= np.where(np.isneginf(top), 0, top)  # (all masked: exp(-inf) = 0, not NaN)
            np.exp(s, out=s)
            total = s.sum(axis=1, keepdims=True)
            s /= np.where(total == 0, 1, total)
            out[b, h] = s @ v[b, h]
    return out


class _AttentionTiles:
    """Runs tiles (b, h, query block) of attention and writes them into ``out``."""

    def __init__(self, q, k, v, out, mask, causal, scale, block_q, block_k):
        self.q, self.k, self.v, self.out, self.mask = q, k, v, out, mask
        self.causal, self.scale, self.block_q, self.block_k = causal, scale, block_q, block_k

    def __call__(self, tiles: np.ndarray) -> int:
        for t in tiles:
            self.tile(int(t))
        return len(tiles)

    def tile(self, t: int) -> None:
        q = self.q
        _, H, Sq, _ = q.shape
        Sk = self.k.shape[2]
        nq = -(-Sq // self.block_q)
        b, rest = divmod(t, H * nq)
        h, qb = divmod(rest, nq)
        q0 = qb * self.block_q
        q1 = min(Sq, q0 + self.block_q)
        mask = None
        if self.mask is not None:
            mask = _mask_block(self.mask, b, h, q0, q1, 0, Sk)
        self.out[b, h, q0:q1] = attend(q[b, h, q0:q1], self.k[b, h], self.v[b, h],
                                       self.scale, mask=mask, causal=self.causal,
                                       q_offset=q0, block_k=self.block_k)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
           mask: np.ndarray | None = None, causal: bool = False, q_offset: int = 0,
           block_k: int = BLOCK_K) -> np.ndarray:
    """Attention of ``q`` (..., Lq, d) over ``k``, ``v`` (..., Lk, d), serially, one block
    of keys at a time with an online softmax: temporaries are (..., block_k, Lq).

    Args:
        mask: broadcastable to (..., Lq, Lk): bool (True = attend) or additive.
        causal: query row i (at absolute position ``q_offset + i``) sees keys 0..that
            position; key blocks past the last query are skipped, not computed.
    """
    dt = q.dtype.type
    # Scores are kept transposed, (keys, queries): the softmax's reductions then run over
    # whole contiguous rows instead of along each short row (2x faster for 40 x 40 scores,
    # ~15% for 1024 x 256); BLAS takes either layout at the same speed.
    qt = np.swapaxes(q * dt(scale), -1, -2)  # (..., d, Lq)
    Lq, Lk = q.shape[-2], k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    m = np.full((*lead, 1, Lq), -np.inf, q.dtype)  # running max over keys
    denom = np.zeros((*lead, 1, Lq), q.dtype)  # running sum of exp
    acc = np.zeros((*lead, Lq, v.shape[-1]), q.dtype)  # sum of exp x values
    hidden = None  # (..., Lk, Lq) or (..., Lk, 1): True where a key is masked out
    if mask is not None:
        mt = np.swapaxes(mask, -1, -2)
        hidden = ~mt if mask.dtype == bool else None
    # Key blocks: with a causal mask, the keys before this tile's first query are seen by
    # every query (whole blocks, no mask); the keys from it to its last query form one
    # triangular block; later keys are never computed.
    if causal:
        full = min(Lk, q_offset)
        blocks = [(k0, min(full, k0 + block_k), False) for k0 in range(0, full, block_k)]
        if q_offset < Lk:
            blocks.append((q_offset, min(Lk, q_offset + Lq), True))
    else:
        blocks = [(k0, min(Lk, k0 + block_k), False) for k0 in range(0, Lk, block_k)]
    first = True
    for k0, k1, diagonal in blocks:
        st = k[..., k0:k1, :] @ qt  # (..., kb, Lq)
        if diagonal:  # key k0 + j is later than query q_offset + i where j > i
            np.copyto(st, dt(-np.inf), where=np.tri(k1 - k0, Lq, -1, dtype=bool))
        if mask is not None:
            if hidden is not None:
                hb = hidden[..., k0:k1, :] if hidden.shape[-2] != 1 else hidden
                np.copyto(st, dt(-np.inf), where=hb)
            else:
                st += mt[..., k0:k1, :] if mt.shape[-2] != 1 else mt
        corr = softmax_step_(st, m, denom)
        if first:  # nothing accumulated yet: no rescaling
            np.matmul(np.swapaxes(st, -1, -2), v[..., k0:k1, :], out=acc)
            first = False
        else:
            acc *= np.swapaxes(corr, -1, -2)
            acc += np.swapaxes(st, -1, -2) @ v[..., k0:k1, :]
    denom[denom == 0] = 1  # queries with every key masked, or no keys: zeros, as torch gives
    acc /= np.swapaxes(denom, -1, -2)
    return acc


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False,
              mask: np.ndarray | None = None, scale: float | None = None,
              out: np.ndarray | None = None, pool: parrun.Pool | None = None,
              block_q: int | None = None, block_k: int | None = None) -> np.ndarray:
    """Scaled dot-product attention, as ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim); float32
            or float64, one dtype.
        causal: query i attends to keys 0..i (torch's ``is_causal``).
        mask: broadcastable to (batch, heads, seq_q, seq_k): boolean (True = attend) or
            additive (added to the scores), e.g. a key-padding mask of shape
            (batch, 1, 1, seq_k).
        scale: default 1/sqrt(head_dim).
        out: (batch, heads, seq_q, head_dim) to write into; allocated (shared) if None.
        pool: the pool to run on (default: ``parrun.default_pool()``).

    Returns:
        out. Tiles of (batch, head, query block) are the scheduled items; causal tiles have
        uneven costs and work stealing evens them out (``pool.last_stats.steals``). A tile
        keeps O(block_q x block_k) temporaries.
    """
    q, k, v, mask = _check(q, k, v, mask)
    pool = pool or parrun.default_pool()
    block_q = BLOCK_Q if block_q is None else operator.index(block_q)
    block_k = BLOCK_K if block_k is None else operator.index(block_k)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be at least 1, got {block_q}, {block_k}")
    B, H, Sq, D = q.shape
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, (bool, np.bool_)) or
                              not isinstance(scale, (numbers.Real, np.floating, np.integer))):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    temps = []

    def shared(a):
        if a is None or parrun.is_shared(a):
            return a
        a = parrun.asshared(a)
        temps.append(a)
        return a

    try:
        if out is None:
            out = parrun.empty((B, H, Sq, v.shape[3]), q.dtype)
        elif not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
        elif out.shape != (B, H, Sq, v.shape[3]) or out.dtype != q.dtype:
            raise ValueError(f"out must be {(B, H, Sq, v.shape[3])} {q.dtype}, got "
                             f"{out.shape} {out.dtype}")
        if any(np.may_share_memory(out, a) for a in (q, k, v, mask) if a is not None):
            # In place (out=q, or k, v): a tile would overwrite rows that others still
            # read. Into a fresh array, then copied.
            target = parrun.empty(out.shape, out.dtype)
            temps.append(target)
        else:
            target = shared(out)
        nq = -(-Sq // block_q)
        tiles = shared(np.arange(B * H * nq, dtype=np.int64))
        fn = _AttentionTiles(shared(q), shared(k), shared(v), target, shared(mask), causal,
                             scale, block_q, block_k)
        done = pool.map_reduce(fn, operator.add, tiles, grain=1, initial=0)
        assert done == len(tiles), (done, len(tiles))
        if target is not out:
            np.copyto(out, target)
        return out
    finally:
        for t in temps:
            t.release()
