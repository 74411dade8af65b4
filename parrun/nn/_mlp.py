"""A two-layer perceptron, parallel over rows of the batch, fused per tile."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

import parrun

from .._checks import check_grain
from ._ops import ACTIVATIONS, bias_act_

# Rows per tile of the MLP. A tile is two BLAS calls, and each call packs the whole weight
# matrix it multiplies by (32 MiB in all for 1024 -> 4096 -> 1024 float32), so small tiles
# spend their time packing. One core, x[i:i+rows] @ w1 @ w2 over a 4096x1024 batch into 4096
# hidden: 66 GFLOP/s in 64-row tiles, 92 in 128, 111 in 256, 116 in 512, 125 in 1024 (on
# 384 -> 1536 -> 384: 113 at 128 rows, 126 at 256, 133 at 512, 136 at 1024); parrun.mlp on 2
# workers took 0.45 s in 64-row pieces and 0.28 s in 1024. So a worker gets two tiles of
# TILE_ROWS to MAX_TILE_ROWS, or one tile when its share is smaller than two: the batch is cut
# finer than TILE_ROWS only to give every worker rows.
TILE_ROWS = 256
MAX_TILE_ROWS = 1024


def default_grain(rows: int, workers: int) -> int:
    """Rows per piece for ``rows`` over ``workers``: two pieces a worker of TILE_ROWS to
    MAX_TILE_ROWS rows, or one piece a worker when shares are smaller (and then as many rows
    as a share has, so that no worker is left idle)."""
    share = -(-rows // workers)
    if share >= 2 * TILE_ROWS:
        return min(MAX_TILE_ROWS, -(-share // 2))
    return max(1, share)


def slices_grain(rows: int, workers: int, slices: int) -> int:
    """Rows per block with the hidden layer in ``slices``: blocks x slices pieces, a multiple
    of the workers (as many pieces each; one each where the slices divide the workers),
    blocks of at most MAX_TILE_ROWS rows. Tall blocks are what the slices are for."""
    blocks = workers // math.gcd(workers, slices)
    return max(1, min(MAX_TILE_ROWS, -(-rows // blocks)))


def _check_mlp(x, w1, b1, w2, b2, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    arrays = [np.asarray(a) for a in (x, w1, b1, w2, b2)]
    x, w1, b1, w2, b2 = arrays
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    for name, a in zip(("w1", "b1", "w2", "b2"), arrays[1:]):
        if a.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but x has {x.dtype}")
    if x.ndim != 2 or w1.ndim != 2 or w2.ndim != 2 or b1.ndim != 1 or b2.ndim != 1:
        raise ValueError("shapes: x (batch, d_in), w1 (d_in, d_hidden), b1 (d_hidden,), "
                         "w2 (d_hidden, d_out), b2 (d_out,)")
    if x.shape[1] != w1.shape[0] or w1.shape[1] != b1.shape[0] or \
            w1.shape[1] != w2.shape[0] or w2.shape[1] != b2.shape[0]:
        raise ValueError(f"shapes do not chain: x {x.shape}, w1 {w1.shape}, b1 {b1.shape}, "
                         f"w2 {w2.shape}, b2 {b2.shape}")


def mlp_reference(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
                  b2: np.ndarray, activation: str = "relu") -> np.ndarray:
    """Serial NumPy: ``act(x @ w1 + b1) @ w2 + b2`` on the whole batch."""
    _check_mlp(x, w1, b1, w2, b2, activation)
    h = x @ w1
    h += b1
    ACTIVATIONS[activation](h)
    y = h @ w2
    y += b2
    return y


class _MLPSlices:
    """Pieces (row block, slice of the hidden layer) of an MLP, each into its own partial
    output: ``partial[rows, j] = act(x[rows] @ w1[:, cols_j] + b1[cols_j]) @ w2[cols_j]``.

    Splitting the hidden layer keeps BLAS calls tall when the batch has few rows a worker:
    with s slices, s workers share each block of rows, so the blocks can be s times taller
    than a worker's share of the rows (see ``mlp``).
    """

    # Run by pool.map, one flag a piece back: map's crash recovery runs a dead worker's pieces
    # again, which is safe here (each partial is written from x and the weights alone).

    def __init__(self, x, w1, b1, w2, partial, activation, block, w1t=None):
        self.x, self.w1, self.b1, self.w2, self.partial = x, w1, b1, w2, partial
        self.activation, self.block, self.w1t = activation, block, w1t

    def __call__(self, pieces: np.ndarray) -> np.ndarray:
        slices = self.partial.shape[1]
        hidden = self.b1.shape[0]
        for p in pieces:
            b, j = divmod(int(p), slices)
            r0, r1 = b * self.block, min(self.x.shape[0], (b + 1) * self.block)
            c0, c1 = hidden * j // slices, hidden * (j + 1) // slices
            # w1's columns c0:c1 are strided; the same block of w1.T (where given) is
            # contiguous, and BLAS takes it transposed: 12% faster on one core.
            w = self.w1t[c0:c1].T if self.w1t is not None else self.w1[:, c0:c1]
            h = self.x[r0:r1] @ w
            bias_act_(h, self.b1[c0:c1], self.activation)
            np.matmul(h, self.w2[c0:c1], out=self.partial[r0:r1, j])
        return np.ones(len(pieces), np.int8)


class _SumSlices:
    """``out = partial.sum(axis=1) + b2``, rows of the partial outputs of ``_MLPSlices``."""

    __parrun_rerun_safe__ = True  # out is written from the partials alone

    def __init__(self, b2):
        self.b2 = b2

    def __call__(self, partial: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.sum(partial, axis=1, out=out)
        out += self.b2
        return out


class _MLPTile:
    """The per-tile kernel: Linear + bias + activation + Linear + bias, into ``out``.

    The hidden activations exist only for one tile of rows (tile x d_hidden), never for the
    whole batch.
    """

    # out is computed from x alone (written, then added to): a dead worker's piece may run
    # again (see parrun._pool._rerun_safe).
    __parrun_rerun_safe__ = True

    def __init__(self, w1, b1, w2, b2, activation):
        self.w1, self.b1, self.w2, self.b2, self.activation = w1, b1, w2, b2, activation

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        h = x @ self.w1
        bias_act_(h, self.b1, self.activation)
        np.matmul(h, self.w2, out=out)
        out += self.b2
        return out


def mlp(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
        activation: str = "relu", out: np.ndarray | None = None,
        pool: parrun.Pool | None = None, grain: int | None = None,
        hidden_slices: int = 1) -> np.ndarray:
    """``act(x @ w1 + b1) @ w2 + b2``, parallel over rows of ``x``.

    Args:
        x: (batch, d_in) float32 or float64.
        w1: (d_in, d_hidden); b1: (d_hidden,); w2: (d_hidden, d_out); b2: (d_out,); all of
            x's dtype. Weights not already shared are copied into shared memory once per call
            (keep them shared, as ``MLPModel`` does, to pay that once).
        activation: 'relu' or 'gelu' (exact, erf-based, as torch's default).
        out: (batch, d_out) to write into; allocated (shared) if None.
        pool: the pool to run on (default: ``parrun.default_pool()``).
        grain: rows per piece (default: ``default_grain``, two pieces a worker of 256-1024
            rows where the batch allows).
        hidden_slices: cut the hidden layer into this many slices as well as the batch into
            rows (default 1: rows only). A piece is then a block of rows times one slice, into
            its own partial output (batch x slices x d_out, shared scratch), and a second pass
            sums the partials. For a batch with few rows a worker (4096 rows on 16 workers is
            256 each, a tile that packs the whole weights for few rows), 4 slices give pieces
            of 1024 rows; the cost is the scratch and the second pass. ``MLPModel``
            keeps the scratch between calls (a fresh one costs a page fault a 4 KiB page;
            kept, it holds batch x slices x d_out numbers in shared memory until a batch of
            another shape or ``release()``), and w1 transposed, so that a slice is
            contiguous.

    Returns:
        out, (batch, d_out). Each piece of rows runs the whole chain on its tile, with one
        BLAS thread per worker.
    """
    return _mlp(x, w1, b1, w2, b2, activation, out, pool, grain, hidden_slices)


def _mlp(x, w1, b1, w2, b2, activation, out, pool, grain, hidden_slices, model=None):
    """``mlp``; ``model`` (an ``MLPModel``) gives w1 transposed and a scratch kept between
    calls for the hidden slices."""
    _check_mlp(x, w1, b1, w2, b2, activation)
    x, w1, b1, w2, b2 = (np.asanyarray(a) for a in (x, w1, b1, w2, b2))  # (lists too)
    if isinstance(hidden_slices, bool) or not isinstance(hidden_slices, (int, np.integer)):
        raise TypeError(f"hidden_slices must be an int, got {type(hidden_slices).__name__}")
    if hidden_slices < 1 or (hidden_slices > 1 and hidden_slices > w1.shape[1]):
        raise ValueError(f"hidden_slices must be from 1 to d_hidden ({w1.shape[1]}), "
                         f"got {hidden_slices}")
    pool = pool or parrun.default_pool()
    temps = []
    weights = []
    held = None
    for w in (w1, b1, w2, b2):
        if not parrun.is_shared(w):
            w = parrun.asshared(w)
            temps.append(w)
        weights.append(w)
    mine = out is None  # allocated here: released if the call fails
    try:
        if out is None:
            out = parrun.empty((x.shape[0], w2.shape[1]), x.dtype)
        elif not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
        elif out.shape != (x.shape[0], w2.shape[1]) or out.dtype != x.dtype:
            raise ValueError(f"out must be {(x.shape[0], w2.shape[1])} {x.dtype}, got "
                             f"{out.shape} {out.dtype}")
        if grain is None and hidden_slices > 1:
            grain = slices_grain(x.shape[0], pool.workers, hidden_slices)
        elif grain is None:
            # BLAS needs tall tiles to pack each weight for enough rows (see TILE_ROWS).
            # Time-sized pieces would be a couple of rows here (a row costs ~0.1 ms) and run
            # at a tenth of the speed.
            grain = default_grain(x.shape[0], pool.workers)
        elif hidden_slices > 1:  # (pool.map checks it where rows alone are split)
            grain = check_grain(grain)
        w1s, b1s, w2s, b2s = weights
        if hidden_slices == 1:
            return pool.map(_MLPTile(w1s, b1s, w2s, b2s, activation), x, out=out, grain=grain)
        if not parrun.is_shared(x):
            x = parrun.asshared(x)
            temps.append(x)
        shape = (x.shape[0], hidden_slices, w2.shape[1])
        w1t = model._transposed_w1() if model is not None else None
        if model is not None and model._scratch_lock.acquire(blocking=False):
            held = model._scratch_lock  # one caller at a time uses the kept scratch
            partial = model._scratch(shape)
        else:
            partial = parrun.empty(shape, x.dtype)
            temps.append(partial)
        blocks = -(-x.shape[0] // grain)
        pieces = parrun.asshared(np.arange(blocks * hidden_slices, dtype=np.int64))
        done = parrun.zeros(len(pieces), np.int8)
        temps += [pieces, done]
        fn = _MLPSlices(x, w1s, b1s, w2s, partial, activation, grain, w1t)
        pool.map(fn, pieces, out=done, grain=1)
        if not done.all():
            raise RuntimeError(f"{len(done) - int(done.sum())} of {len(done)} MLP pieces "
                               "did not run")
        return pool.map(_SumSlices(b2s), partial, out=out)
    except BaseException:
        if mine and out is not None:
            out.release()
        raise
    finally:
        if held is not None:
            held.release()
        for t in temps:
            t.release()


class MLPModel:
    """An MLP whose weights live in shared memory, for batched inference on a pool.

    The weights are copied into shared memory once, here, into arrays of the model's own,
    read-only (``model.w1``...): workers map them once and never receive their bytes again;
    what the caller later does to its arrays does not reach the model, and writing into the
    model's raises (a new model takes new weights). ``release()`` frees those copies only.
    """

    def __init__(self, w1: Any, b1: Any, w2: Any, b2: Any, activation: str = "relu",
                 pool: parrun.Pool | None = None):
        w1a = np.asarray(w1)
        if w1a.dtype not in (np.float32, np.float64) or w1a.ndim != 2:
            raise TypeError(f"w1 must be a 2-D float32 or float64 array, got {w1a.ndim}-D "
                            f"{w1a.dtype}")
        _check_mlp(np.zeros((1, w1a.shape[0]), w1a.dtype), w1, b1, w2, b2, activation)
        # Copies of its own, even of shared arrays: release() once freed the caller's (and
        # every array in their segment), and w1 transposed (kept for hidden_slices) went
        # stale when w1 was changed in place. Read-only: a change raises instead.
        self.w1, self.b1, self.w2, self.b2 = (_frozen_copy(a) for a in (w1, b1, w2, b2))
        self.activation = activation
        self.pool = pool
        self._tile = _MLPTile(self.w1, self.b1, self.w2, self.b2, activation)
        # For hidden_slices, made on first use and kept: w1 transposed, and the partials of
        # the last batch shape (a thread that finds them taken makes its own).
        self._w1t: Any = None
        self._partial: Any = None
        self._scratch_lock = threading.Lock()
        self._w1t_lock = threading.Lock()
        self._released = False

    def predict(self, batch: np.ndarray, out: np.ndarray | None = None,
                hidden_slices: int = 1) -> np.ndarray:
        """(batch, d_in) -> (batch, d_out), rows split across the workers (and the hidden
        layer in ``hidden_slices``, as ``mlp`` does)."""
        self._check_open()
        return _mlp(batch, self.w1, self.b1, self.w2, self.b2, self.activation, out,
                    self.pool, None, hidden_slices, model=self)

    def _check_open(self) -> None:
        if self._released:
            raise ValueError("this MLPModel was released: its weights are gone")

    def _transposed_w1(self) -> Any:
        with self._w1t_lock:
            if self._w1t is None:
                self._w1t = _frozen_copy(self.w1.T)
            return self._w1t

    def _scratch(self, shape: tuple[int, int, int]) -> Any:
        """The partials for ``shape``, kept until a batch of another shape (the caller
        holds ``_scratch_lock``)."""
        self._check_open()  # (release() may have come between predict's check and the lock)
        if self._partial is None or self._partial.shape != shape:
            if self._partial is not None:
                self._partial.release()
            self._partial = parrun.empty(shape, self.w1.dtype)
        return self._partial

    def predict_many(self, batches, in_flight: int | None = None):
        """Yield the prediction of each batch, in order, keeping every worker busy.

        Each batch is one task (all its rows in one worker); up to ``in_flight`` batches
        (default two per worker) run at once, so the workers never wait for the caller.
        """
        from collections import deque

        self._check_open()
        if in_flight is not None and (isinstance(in_flight, bool) or
                                      not isinstance(in_flight, (int, np.integer))):
            raise TypeError(f"in_flight must be an int, got {type(in_flight).__name__}")
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight must be 1 or more, got {in_flight}")
        pool = self.pool or parrun.default_pool()
        depth = in_flight or 2 * pool.workers
        window: deque = deque()
        for batch in batches:
            batch = np.asarray(batch)
            _check_mlp(batch, self.w1, self.b1, self.w2, self.b2, self.activation)  # as predict
            window.append(pool.submit(_predict_batch, self._tile, batch))
            if len(window) >= depth:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def release(self) -> None:
        """Free the shared weights (and the hidden slices' scratch), once a predict running
        with the scratch is done; the model can no longer predict."""
        with self._scratch_lock:
            self._released = True
            for a in (self.w1, self.b1, self.w2, self.b2, self._w1t, self._partial):
                if a is not None:
                    a.release()
            self._w1t = self._partial = None


def _frozen_copy(a: Any) -> Any:
    """A read-only shared copy of ``a`` (C order)."""
    src = np.asarray(a)
    c = parrun.empty(src.shape, src.dtype)
    np.copyto(c, src)
    c.flags.writeable = False
    return c


def _predict_batch(tile: _MLPTile, batch: np.ndarray) -> np.ndarray:
    out = np.empty((batch.shape[0], tile.w2.shape[1]), batch.dtype)
    return tile(batch, out)
