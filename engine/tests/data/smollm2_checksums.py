#!/usr/bin/env python3
"""Prints the expected values of engine/tests/gguf.rs's SmolLM2 test: for a few tensors
of SmolLM2-135M-Instruct.Q4_1.gguf, the dequantization by the `gguf` Python package
(llama.cpp's numpy reference) as FNV-1a 64 hashes of the f32 little-endian bytes (whole
tensor, or rows 0, 1000 and the last row for the large embedding) and the f64 sum.

Usage: /tmp/gguf-venv/bin/python engine/tests/data/smollm2_checksums.py FILE.gguf
"""

import sys

import numpy as np
import gguf

TENSORS = [
    "token_embd.weight",
    "blk.0.attn_norm.weight",
    "blk.0.attn_q.weight",
    "blk.29.ffn_down.weight",
    "output_norm.weight",
]


def fnv1a64(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for x in b:
        h ^= x
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    r = gguf.GGUFReader(sys.argv[1])
    for t in r.tensors:
        if t.name not in TENSORS:
            continue
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape(-1, x.shape[-1])
        rows = [0, 1000, x.shape[0] - 1] if x.size > 1_000_000 else None
        h = fnv1a64(x.tobytes()) if rows is None else [fnv1a64(x[i].tobytes()) for i in rows]
        s = float(x.astype(np.float64).sum())
        print(f'("{t.name}", "{t.tensor_type.name}", {list(x.shape)}, {s!r}, {h}, {rows})')


if __name__ == "__main__":
    main()
