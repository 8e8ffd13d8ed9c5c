#!/usr/bin/env python3
"""Independent numpy reference of the DDiT forward (KFORCING.md section 2), for the
parity test model/tests/model_parity.rs. Written from the spec, not from the Rust code.

    python3 ddit_numpy.py --model DIR --ids IDS.json --out LOGITS.f64

DIR holds config.json and model.safetensors (read with the small parser below: F32, F16,
BF16 and F64 tensors). IDS.json is a list of B lists of T token ids. The logits [B, T, V]
are computed in float64 and written as raw little-endian float64, row-major.
"""
import argparse
import json
import struct
import sys

import numpy as np

NP_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def read_safetensors(path):
    """name -> float64 array. Format: u64 LE header size, JSON header, raw data."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[base + start : base + end]
        dt = info["dtype"]
        if dt == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dt in NP_DTYPES:
            arr = np.frombuffer(buf, dtype=NP_DTYPES[dt])
        else:
            sys.exit(f"ddit_numpy: tensor {name} has unsupported dtype {dt}")
        out[name] = arr.astype(np.float64).reshape(info["shape"])
    return out


def layer_norm(x, w, eps):
    # LayerNorm with a weight and no bias, biased variance
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x, positions, base):
    # x [B, T, H, D]; NeoX layout: frequency j applies to dims j and j + D/2
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, D/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, D]
    cos = np.cos(angles)[None, :, None, :]
    sin = np.sin(angles)[None, :, None, :]
    return x * cos + rotate_half(x) * sin


def causal_attention(q, k, v):
    # [B, T, H, D] each
    t, dim = q.shape[1], q.shape[-1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim)
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    scores = np.where(future[None, None], -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def forward(cfg, w, ids):
    bsz, t = ids.shape
    d, heads = cfg["d_model"], cfg["n_heads"]
    hd = d // heads
    eps = cfg.get("ln_eps", 1e-5)
    base = cfg.get("rope_base", 10000.0)
    pos = np.arange(t)
    h = w["vocab_embed.embedding"][ids]  # [B, T, d]
    for i in range(cfg["n_layers"]):
        p = f"blocks.{i}."
        x = layer_norm(h, w[p + "norm1.weight"], eps)
        qkv = (x @ w[p + "attn_qkv.weight"].T).reshape(bsz, t, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = rope(q, pos, base), rope(k, pos, base)
        a = causal_attention(q, k, v).reshape(bsz, t, d)
        h = h + a @ w[p + "attn_out.weight"].T
        x = layer_norm(h, w[p + "norm2.weight"], eps)
        m = gelu_tanh(x @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"])
        h = h + m @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"]
    x = layer_norm(h, w["output_layer.norm_final.weight"], eps)
    logits = x @ w["output_layer.linear.weight"].T + w["output_layer.linear.bias"]
    mask = cfg.get("mask_token_id")
    if mask is not None:
        logits[..., mask] = -1000.0
    return logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(f"{a.model}/config.json") as f:
        cfg = json.load(f)
    weights = read_safetensors(f"{a.model}/model.safetensors")
    with open(a.ids) as f:
        ids = np.array(json.load(f), dtype=np.int64)
    logits = forward(cfg, weights, ids)
    logits.astype("<f8").tofile(a.out)
    print(f"ddit_numpy: logits {list(logits.shape)} written to {a.out}")


if __name__ == "__main__":
    main()
