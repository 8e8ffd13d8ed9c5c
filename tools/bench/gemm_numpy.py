#!/usr/bin/env python3
"""numpy/OpenBLAS reference timings for `kfrun bench gemm` (tools/src/bench_gemm.rs).

Times f32 C = A @ B for each shape with B stored K x N ("nn") and B stored N x K
and used transposed ("nt": `a @ bt.T`, which numpy hands to BLAS as a transposed
operand without copying). Thread count comes from OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS / MKL_NUM_THREADS, set by the caller. Each sample repeats the
product until it lasts >= --min-ms; the median per-call time of --runs samples is
reported. Prints one JSON object on stdout:
  {"numpy": "...", "blas": "...", "rows": [{"m":..,"k":..,"n":..,"layout":"nn",
   "median_s":.., "gflops":..}, ...]}
Usage: gemm_numpy.py [--shapes "1,768,768;8,768,3072"] [--runs 7] [--min-ms 50]
(shapes are M,K,N).

With --stream-bytes B (`kfrun bench decode`), only x @ W.T is timed ("nt", W stored
N x K as a Linear weight) and each call takes the next of enough copies of W to
hold >= B bytes, so the weights come from memory, not cache, as in a decode step.
"""

import argparse
import json
import sys
import time

DEFAULT_SHAPES = "1,768,768;8,768,3072;64,768,3072;512,768,768;1024,1024,1024"


def blas_name(np):
    try:
        cfg = np.show_config(mode="dicts")
        deps = cfg.get("Build Dependencies", {})
        blas = deps.get("blas", {})
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy without mode="dicts"
        return "unknown"


def time_one(fn, min_s, runs):
    fn()  # warm-up (also sizes the inner repeat count)
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-9)
    reps = max(1, int(min_s / one) + 1)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps)
    samples.sort()
    return samples[len(samples) // 2]


def streamed(np, rng, m, k, n, args):
    """x @ W.T with W rotating through copies that together exceed the caches."""
    copies = max(2, -(-args.stream_bytes // (n * k * 4)))
    key = (k, n)
    if STREAM_CACHE.get("key") != key:
        STREAM_CACHE.clear()
        w = rng.standard_normal((n, k), dtype=np.float32)
        STREAM_CACHE["key"] = key
        STREAM_CACHE["ws"] = [w.copy() for _ in range(copies)]
    ws = STREAM_CACHE["ws"]
    x = rng.standard_normal((m, k), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    turn = [0]

    def call():
        turn[0] = (turn[0] + 1) % len(ws)
        np.matmul(x, ws[turn[0]].T, out=out)

    med = time_one(call, args.min_ms / 1000.0, args.runs)
    return {"m": m, "k": k, "n": n, "layout": "nt", "median_s": med, "gflops": 2.0 * m * n * k / med / 1e9}


STREAM_CACHE = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--min-ms", type=float, default=50.0)
    ap.add_argument("--stream-bytes", type=int, default=0)
    args = ap.parse_args()
    try:
        import numpy as np
    except ImportError as e:
        print(json.dumps({"error": f"numpy not importable: {e}"}))
        return 2

    rng = np.random.default_rng(0)
    rows = []
    for spec in args.shapes.split(";"):
        spec = spec.strip()
        if not spec:
            continue
        m, k, n = (int(x) for x in spec.split(","))
        if args.stream_bytes > 0:
            rows.append(streamed(np, rng, m, k, n, args))
            continue
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        bt = np.ascontiguousarray(b.T)  # N x K, row-major
        out = np.empty((m, n), dtype=np.float32)
        for layout, fn in (
            ("nn", lambda: np.matmul(a, b, out=out)),
            ("nt", lambda: np.matmul(a, bt.T, out=out)),
        ):
            med = time_one(fn, args.min_ms / 1000.0, args.runs)
            rows.append(
                {
                    "m": m,
                    "k": k,
                    "n": n,
                    "layout": layout,
                    "median_s": med,
                    "gflops": 2.0 * m * n * k / med / 1e9,
                }
            )
    print(json.dumps({"numpy": np.__version__, "blas": blas_name(np), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
