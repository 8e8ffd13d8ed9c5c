#!/usr/bin/env python3
"""Reference token ids from llama.cpp's SentencePiece ("llama") tokenizer, for
model/tests/gguf_tokenizer.rs (no real SentencePiece GGUF is fetchable here): a small SPM-BPE
vocabulary is learned from a few sentences (deterministic), written as a vocab-only GGUF
with the `gguf` package, and llama-cpp-python (pinned 0.3.36) tokenizes the test texts.
    python tools/scripts/llama_cpp_spm_reference.py OUT.json
Needs: pip install llama-cpp-python==0.3.36 gguf==0.17.1 (numpy comes with gguf)."""
import json, sys, tempfile, os
from collections import Counter
import gguf
from llama_cpp import Llama

CORPUS = [
    "the cat sat on the mat", "the dog sat on the log", "a cat and a dog",
    "then the cat saw the dog", "there is a theory that the moon is cheese",
    "they said that this is the end", "in the beginning there was the word",
    "tokenizers split the text into pieces", "pieces merge by their scores",
]
TEXTS = [
    "the cat sat on the mat", "The Cat", "  two leading spaces", "trailing space ",
    "a  double  space", "new\nline", "digits 1234 and 56", "café and naïve",
    "日本語 text", "emoji 😀 ok", "theory of the thing", "x",
]
SPACE = "\u2581"

def learn(n_merges=120):
    words = Counter()
    for s in CORPUS:
        for w in s.split(" "):
            words[tuple(SPACE + w)] += 1
    chars = sorted({c for w in words for c in w})
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(a + b)
        new = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b); i += 2
                else:
                    out.append(w[i]); i += 1
            new[tuple(out)] += n
        words = new
    return chars, merges

def main():
    chars, merges = learn()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    seen = set(tokens)
    # merged pieces score by merge order (earlier = higher), then the characters
    for i, m in enumerate(merges):
        if m not in seen:
            tokens.append(m); types.append(1); scores.append(-float(i)); seen.add(m)
    for i, c in enumerate(chars):
        if c not in seen:
            tokens.append(c); types.append(1); scores.append(-1000.0 - i); seen.add(c)
    path = os.path.join(tempfile.mkdtemp(), "spm.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64); w.add_embedding_length(8); w.add_block_count(1)
    w.add_feed_forward_length(16); w.add_head_count(2); w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5); w.add_rope_dimension_count(4)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(types)
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    ids = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS]
    out = {"generator": "tools/scripts/llama_cpp_spm_reference.py",
           "llama_cpp_python": __import__("llama_cpp").__version__,
           "tokens": tokens, "scores": scores, "types": types, "texts": TEXTS, "ids": ids}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)

main()
