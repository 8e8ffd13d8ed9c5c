#!/usr/bin/env python3
"""llama.cpp's view of a GGUF model on real text, for kfrun's parity test
(model/tests/llama_parity.rs). Runs llama-cpp-python (pinned: 0.3.36, CPU build) on the
first documents of data/excerpt/corpus.jsonl and writes, as JSON: the token ids of the
text (llama.cpp's tokenizer), per position the top-5 ids with their log-probs and the
log-prob of the next token, and a greedy 64-token continuation of the first 32 tokens.

    python tools/scripts/llama_cpp_reference.py MODEL.gguf OUT.json [--tokens 320] [--kv f32]

`--kv f32` keeps llama.cpp's KV cache in f32 (type_k = type_v = GGML_TYPE_F32, no flash
attention) instead of its default f16: how far llama.cpp moves from itself with one
precision choice is the noise floor of the parity numbers.
"""
import argparse, json, math, sys

import numpy as np
from llama_cpp import Llama


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--corpus", default="data/excerpt/corpus.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", choices=["f16", "f32"], default="f16")
    a = ap.parse_args()
    text = ""
    with open(a.corpus) as f:
        for line in f:
            text += json.loads(line)["text"] + "\n\n"
            if len(text) > 8 * a.tokens:
                break
    kv = {} if a.kv == "f16" else {"type_k": 0, "type_v": 0, "flash_attn": False}
    llm = Llama(model_path=a.model, n_ctx=1024, logits_all=True, n_threads=a.threads,
                n_batch=512, verbose=False, seed=0, **kv)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[: a.tokens]
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)])
    top5, lp_next = [], []
    for t in range(len(ids)):
        lp = log_softmax(scores[t])
        order = np.argsort(-lp)[:5]
        top5.append([[int(i), float(lp[i])] for i in order])
        lp_next.append(float(lp[ids[t + 1]]) if t + 1 < len(ids) else None)
    # greedy continuation of the first 32 tokens
    llm.reset()
    prompt = ids[:32]
    greedy = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        greedy.append(int(tok))
        if len(greedy) == 64:
            break
    text_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    json.dump({
        "model": a.model.split("/")[-1],
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "text": llm.detokenize(ids).decode("utf-8", "replace"),
        "ids": [int(i) for i in ids],
        "top5": top5,
        "lp_next": lp_next,
        "greedy_prompt": [int(i) for i in prompt],
        "greedy": greedy,
    }, open(a.out, "w"))
    print(f"{len(ids)} tokens, greedy {len(greedy)}", file=sys.stderr)


if __name__ == "__main__":
    main()
