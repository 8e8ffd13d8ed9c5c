#!/usr/bin/env python3
"""llama.cpp's batch-1 decode and prefill speed on a GGUF (llama-cpp-python, pinned 0.3.36),
for the README's comparison with `kfrun generate` on the same threads:
    python tools/scripts/llama_cpp_speed.py MODEL.gguf [--threads 2] [--new 64] [--runs 3]
Prints JSON: median decode tokens/s (greedy, `--new` tokens after an 8-token prompt) and
median prefill tokens/s of a 512-token prompt."""
import argparse, json, statistics, time
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--new", type=int, default=64)
ap.add_argument("--runs", type=int, default=3)
a = ap.parse_args()
llm = Llama(model_path=a.model, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
            n_batch=512, verbose=False)
prompt = llm.tokenize(b"Once upon a time, in a small village", add_bos=False)[:8]
dec, pre = [], []
for _ in range(a.runs):
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    n = 0
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=False):
        n += 1
        if n == a.new:
            break
    dec.append(n / (time.perf_counter() - t0))
    long = (prompt * 64)[:512]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long)
    pre.append(len(long) / (time.perf_counter() - t0))
print(json.dumps({"decode_tok_s": statistics.median(dec), "prefill_tok_s": statistics.median(pre),
                  "threads": a.threads, "runs": a.runs, "decode_all": dec, "prefill_all": pre}))
