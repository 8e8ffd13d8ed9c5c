#!/usr/bin/env python3
"""Writes engine/tests/data/quants.gguf, the fixture of engine/tests/gguf.rs: an
independent check of kf-engine's GGUF reader and dequantization against the `gguf`
Python package (the llama.cpp project's reference implementation in numpy).

For every ggml type the package can quantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0) a random [2, 256] tensor is quantized with `gguf.quants.quantize`; for the
K-quants it cannot quantize (Q2_K..Q6_K) random block bytes with finite f16 scales are
used. Beside each tensor `NAME` the file holds `NAME.expected`, an F32 tensor of
`gguf.quants.dequantize(NAME)`, so the Rust test needs no Python. Metadata of every value
type is included too. Deterministic (fixed seed).

Usage: python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf numpy
       /tmp/gguf-venv/bin/python engine/tests/data/make_gguf.py
"""

import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quants.gguf")
ROWS, COLS = 2, 256
rng = np.random.default_rng(20240611)

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# byte offsets of the f16 scales inside one block of each K-quant
K_SCALES = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def k_blocks(qtype):
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for blk in raw:
        for off in K_SCALES[qtype]:
            scale = np.float16(rng.uniform(-0.05, 0.05))
            blk[off : off + 2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    return raw.reshape(ROWS, -1)


def main():
    w = gguf.GGUFWriter(OUT, arch="kftest")
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -7)
    w.add_uint64("test.u64", 1 << 40)
    w.add_int64("test.i64", -(1 << 40))
    w.add_float32("test.f32", 0.1)
    w.add_float64("test.f64", 1e-300)
    w.add_bool("test.bool", True)
    w.add_uint8("test.u8", 255)
    w.add_int8("test.i8", -128)
    w.add_uint16("test.u16", 65535)
    w.add_int16("test.i16", -32768)
    w.add_string("test.str", "naïve ✓ <|im_start|>")
    w.add_array("test.strs", ["a", "", "ü"])
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, -1.25])

    for qtype in QUANTIZABLE + list(K_SCALES):
        name = qtype.name.lower()
        if qtype in QUANTIZABLE:
            x = rng.standard_normal((ROWS, COLS), dtype=np.float32)
            q = gguf.quants.quantize(x, qtype)
        else:
            q = k_blocks(qtype)
        expected = gguf.quants.dequantize(q, qtype).astype(np.float32)
        assert expected.shape == (ROWS, COLS), (qtype, expected.shape)
        assert np.isfinite(expected).all(), qtype
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, q)
        else:
            w.add_tensor(name, q, raw_dtype=qtype)
        w.add_tensor(name + ".expected", expected)
        print(f"{name}: {q.nbytes} bytes, sum of expected {expected.astype(np.float64).sum():.6f}")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
