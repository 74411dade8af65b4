"""Render the Mandelbrot set with parrun (numba kernel when installed) and write a PNG.

    python examples/mandelbrot.py [--size 2000] [--iter 256] [--out mandelbrot.png]
"""

import argparse
import struct
import time
import zlib

import numpy as np

import parrun
from parrun import nn


def write_png(path: str, rgb: np.ndarray) -> None:
    """A minimal PNG writer: (h, w, 3) uint8, no dependencies."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def colour(img: np.ndarray, max_iter: int) -> np.ndarray:
    t = np.sqrt(img / max_iter)
    rgb = np.stack([9 * (1 - t) * t**3, 15 * (1 - t) ** 2 * t**2, 8.5 * (1 - t) ** 3 * t], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--iter", type=int, default=256)
    ap.add_argument("--out", default="mandelbrot.png")
    args = ap.parse_args()
    with parrun.Pool() as pool:
        nn.mandelbrot(64, 64, args.iter, pool=pool)  # compile the kernel in each worker
        t = time.perf_counter()
        img = nn.mandelbrot(args.size, args.size, args.iter, pool=pool)
        dt = time.perf_counter() - t
        st = pool.last_stats
    print(f"{args.size}x{args.size}, {args.iter} iterations: {dt:.3f} s on {pool.workers} "
          f"workers ({st.pieces} pieces, {st.steals} steals)")
    write_png(args.out, colour(np.asarray(img), args.iter))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
