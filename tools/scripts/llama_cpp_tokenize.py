#!/usr/bin/env python3
"""Reference token ids and chat-template rendering from llama.cpp (llama-cpp-python) for
model/tests/gguf_tokenizer.rs: tokenizes the test texts with the GGUF file's own
vocabulary (`vocab_only`, no BOS, special tokens parsed) and renders the file's chat
template for one user message (with jinja2, as llama-cpp-python's chat formatter does),
then prints them as Rust literals to paste into the test.

Usage: /work/runs/llama-venv/bin/python tools/scripts/llama_cpp_tokenize.py \
           SmolLM2-135M-Instruct.Q4_1.gguf
"""

import json
import sys

import jinja2
from llama_cpp import Llama

# keep in sync with TEXTS in model/tests/gguf_tokenizer.rs
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Numbers: 12345 3.14 -0.5e10 2024-06-11 1,000,000 and x2y3",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: print('ok')\n",
    "naïve café — ünïcode ✓ 日本語のテキスト 😀👍🏽 Ελληνικά русский",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, trailing spaces   \n\n\n  multiple\r\nlines\t\ttabs  ",
    "I'm sure they'll've done it; it's JOHN'S and we'd've",
    "<|endoftext|>a<file_sep>b<|im_end|><|unknown|>",
    "",
    " ",
    "\n",
]


def main():
    path = sys.argv[1]
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    print("const EXPECTED: &[&[u32]] = &[")
    for t in TEXTS:
        ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
        print(f"    &{ids},")
    print("];")
    template = llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment(loader=jinja2.BaseLoader())
    out = env.from_string(template).render(
        messages=[{"role": "user", "content": "What is 2+2?"}],
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
    )
    print("const CHAT_WHAT_IS: &str = " + json.dumps(out) + ";")
    print("// tokens of the rendered chat:", llm.tokenize(out.encode(), add_bos=False, special=True))


if __name__ == "__main__":
    main()
