#!/usr/bin/env python3
"""The peer of `kfrun bench --peer torch`: generation throughput of the same DDiT (AR decoding
with a KV cache) and of the PFLM student's K-token step, in PyTorch eager on the CPU.

Written from ../shared/design/KFORCING.md (sections 2, 4, 5 and 7), not from our Rust code:
- backbone: token embedding; per block h += W_o Attn(RoPE(W_qkv LN1(h))), h += MLP(LN2(h))
  (LayerNorm weight only, eps 1e-5; RoPE base 10000, rotate-half; MLP d -> 4d -> d with
  biases and GELU tanh); LN_f then Linear(d, V, bias);
- a static KV cache per layer ([B, H, T_max, D_h], written in place, attention over the
  filled prefix as a view): what a careful eager implementation does (HF's StaticCache);
- AR: prefill the prompt, then one row per sequence per token, the token drawn by the
  inverse-CDF map (section 3) with u from torch's generator;
- PFLM K: prefill the prompt but its last token; each step's queries are the tokens
  committed last step followed by K hints (noise encoder: features of u and tau, combined
  projection, x + MLP(LayerNorm(x)) with GELU erf), hint i at position t + i, seeing the
  cache, the committed rows and hints 1..=i; argmax read-off; the hints' K/V are overwritten
  by the next step's rows. The last step uses fewer hints so exactly max_new tokens come out.

Weights are random (throughput does not depend on their values). Timing is ours: per
(mode, K, batch) one warm-up run, then `--runs` timed runs of B prompts x max_new tokens,
prefill included; tokens/s = B * max_new / median seconds. Prints one JSON object.
"""

import argparse
import json
import math
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--k", type=int, required=True, help="the student's k (PFLM K = 1..k)")
    ap.add_argument("--batches", type=str, required=True, help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, required=True)
    ap.add_argument("--max-new", type=int, required=True)
    ap.add_argument("--runs", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(json.dumps({"error": f"torch is not installed ({e})"}))
        return 0
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    V, d, L, H = a.vocab, a.d, a.layers, a.heads
    dh = d // H
    if d % H or dh % 2:
        print(json.dumps({"error": f"d {d} and heads {H} need an even head dim"}))
        return 1

    def r(*shape):
        return torch.randn(*shape) * 0.02

    emb = r(V, d)
    blocks = [
        dict(
            n1=torch.ones(d), qkv=r(3 * d, d), o=r(d, d), n2=torch.ones(d),
            w0=r(4 * d, d), b0=torch.zeros(4 * d), w2=r(d, 4 * d), b2=torch.zeros(d),
        )
        for _ in range(L)
    ]
    nf, head_w, head_b = torch.ones(d), r(V, d), torch.zeros(V)
    ne = dict(
        cp_w=r(d, 2 * d), cp_b=torch.zeros(d), ln_w=torch.ones(d), ln_b=torch.zeros(d),
        m0_w=r(4 * d, d), m0_b=torch.zeros(4 * d), m2_w=r(d, 4 * d), m2_b=torch.zeros(d),
    )
    inv_freq = 10000.0 ** (-torch.arange(dh // 2, dtype=torch.float64) / (dh // 2))

    def rope(x, pos):
        # x [B, T, H, Dh]; rotate-half with cos/sin of pos * f_j
        ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]
        c = torch.cos(ang).float()[None, :, None, :]
        s = torch.sin(ang).float()[None, :, None, :]
        x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    def new_cache(b, t):
        return [(torch.empty(b, H, t, dh), torch.empty(b, H, t, dh)) for _ in range(L)]

    def forward(x, pos, cache, l0, allow):
        """Rows x [B, T, d] at positions pos [T] after l0 cached keys; their K/V are written
        to the cache at l0.. (hint rows are overwritten by the next step); allow [T, l0 + T]
        (True = visible) or None (every row sees every key)."""
        b, t, _ = x.shape
        h = x
        for blk, (kc, vc) in zip(blocks, cache):
            a_ = F.layer_norm(h, (d,), blk["n1"], None, 1e-5)
            qkv = (a_ @ blk["qkv"].T).view(b, t, 3, H, dh)
            q = rope(qkv[:, :, 0], pos).transpose(1, 2)
            kc[:, :, l0 : l0 + t] = rope(qkv[:, :, 1], pos).transpose(1, 2)
            vc[:, :, l0 : l0 + t] = qkv[:, :, 2].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, kc[:, :, : l0 + t], vc[:, :, : l0 + t], attn_mask=allow
            )
            h = h + o.transpose(1, 2).reshape(b, t, d) @ blk["o"].T
            m = F.layer_norm(h, (d,), blk["n2"], None, 1e-5)
            m = F.gelu(m @ blk["w0"].T + blk["b0"], approximate="tanh")
            h = h + m @ blk["w2"].T + blk["b2"]
        return h

    def logits_of(h):
        return F.layer_norm(h, (d,), nf, None, 1e-5) @ head_w.T + head_b

    def causal(t, l0=0):
        return torch.ones(t, l0 + t, dtype=torch.bool).tril(diagonal=l0)

    def inverse_cdf(logits, u):
        # token(p, u): the first token whose running sum reaches u (index order)
        c = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
        return torch.searchsorted(c, u[:, None].float()).clamp(max=V - 1)[:, 0]

    def features(s):
        ang = 2 * math.pi * s.to(torch.float64)[:, None] * inv_freq_d[None, :]
        return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)

    inv_freq_d = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2))

    def hints(u, tau):
        b, kk = u.shape
        f = torch.cat([features(u.flatten()), features(torch.full((b * kk,), tau))], -1)
        x = f.float() @ ne["cp_w"].T + ne["cp_b"]
        y = F.layer_norm(x, (d,), ne["ln_w"], ne["ln_b"], 1e-5)
        y = F.gelu(y @ ne["m0_w"].T + ne["m0_b"]) @ ne["m2_w"].T + ne["m2_b"]
        return (x + y).view(b, kk, d)

    def gen_ar(prompts, max_new):
        b, p = prompts.shape
        cache = new_cache(b, p + max_new)
        h = forward(emb[prompts], torch.arange(p), cache, 0, causal(p))
        logits, l0 = logits_of(h[:, -1]), p
        for step in range(max_new):
            tok = inverse_cdf(logits, torch.rand(b, dtype=torch.float64))
            if step + 1 < max_new:
                h = forward(emb[tok][:, None], torch.tensor([l0]), cache, l0, None)
                logits, l0 = logits_of(h[:, -1]), l0 + 1
        return max_new

    def gen_pflm(prompts, max_new, k):
        b, p = prompts.shape
        cache = new_cache(b, p + max_new + k)
        if p > 1:
            forward(emb[prompts[:, :-1]], torch.arange(p - 1), cache, 0, causal(p - 1))
        l0, committed, made, passes = p - 1, prompts[:, -1:], 0, 0
        while made < max_new:
            kk = min(k, max_new - made)
            c = committed.shape[1]
            x = torch.cat([emb[committed], hints(torch.rand(b, kk, dtype=torch.float64), 1.0)], 1)
            last = l0 + c - 1
            pos = torch.cat([torch.arange(l0, l0 + c), last + torch.arange(1, kk + 1)])
            allow = torch.zeros(c + kk, l0 + c + kk, dtype=torch.bool)
            allow[:c, : l0 + c] = causal(c, l0)  # committed rows: causal
            allow[c:, : l0 + c] = True  # hints see the cache and the committed rows
            allow[c:, l0 + c :] = torch.ones(kk, kk, dtype=torch.bool).tril()  # and hints 1..=i
            h = forward(x, pos, cache, l0, allow)
            committed = logits_of(h[:, c:]).argmax(-1)
            l0, made, passes = l0 + c, made + kk, passes + 1
        return passes

    rows = []
    with torch.inference_mode():
        for bsz in [int(x) for x in a.batches.split(",") if x]:
            for mode, k in [("ar", 1)] + [("pflm", k) for k in range(1, a.k + 1)]:
                prompts = torch.randint(0, V, (bsz, a.prompt_len))
                run = (lambda: gen_ar(prompts, a.max_new)) if mode == "ar" else (
                    lambda: gen_pflm(prompts, a.max_new, k)
                )
                passes = run()  # warm-up
                secs = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    run()
                    secs.append(time.perf_counter() - t0)
                med = statistics.median(secs)
                rows.append(dict(batch=bsz, mode=mode, k=k, tokens_per_s=bsz * a.max_new / med,
                                 passes=passes, secs=secs))
                print(f"torch: batch {bsz} {mode} K={k}: {bsz * a.max_new / med:.1f} tokens/s",
                      file=sys.stderr)
    print(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
