#!/usr/bin/env python3
"""JAX (jit, CPU) peer of `kfrun bench train` (tools/src/bench_train.rs).

The DDiT teacher of KFORCING.md section 2, written from that text: untied token
embedding [V, d]; per block, pre-norm: LN1 (weight only, eps 1e-5) -> x W_qkv^T
(no bias) split as (three, heads, head_dim) -> rotate-half RoPE (base 10000) on
q and k -> causal softmax attention with scale 1/sqrt(D) -> W_o (no bias),
residual; LN2 -> Linear(d, 4d, bias) -> GELU (tanh) -> Linear(4d, d, bias),
residual; then LN_f (weight only) and Linear(d, V, bias). f32 throughout.

One jitted train step does what kf_model's Trainer does for one update: for each
of `grad_accum` micro-batches (a lax.scan) the mean next-token cross-entropy and
its gradient (value_and_grad), the gradients averaged, clipped to `grad_clip` by
global norm, and optax AdamW with the config's lr schedule (linear warmup, then
cosine to min_lr), betas, eps, and decoupled weight decay on rank >= 2
parameters only. Parameters and optimizer state are donated (updated in place).

Token batches [grad_accum, B, T + 1] are random ids in [0, vocab), new each step
and made outside the timed region. B, T, grad_accum and the model dimensions come
from the same training-config JSON as `kfrun train` (`model.preset` and explicit
dimensions resolved like kf_model::train::TrainConfig::model_config); the vocab
comes from --vocab (the Rust side takes it from the data).

Threads: before jax is imported, the process is pinned to --threads CPUs
(sched_setaffinity; XLA's CPU thread pool sizes itself from the affinity mask)
and XLA_FLAGS gets --xla_cpu_multi_thread_eigen (false for 1 thread) and
--xla_force_host_platform_device_count=1. The CPU time / wall time ratio of
the timed steps is reported as `cpu_util` so the thread count can be checked.

Timing: the first step (compile + run) and --warmup further steps are excluded;
then --steps steps are timed one by one (block_until_ready) and the median is
reported. Prints one JSON object on stdout:
  {"tokens_per_s", "step_ms", "steps_ms": [...], "compile_s", "tokens_per_step",
   "batch", "seq_len", "grad_accum", "n_params", "threads", "cpu_util",
   "jax", "jaxlib", "optax", "loss_first", "loss_last", ...}
or {"error": "..."} when jax/optax cannot be imported (exit status 2).

With --breakdown, also each op of the model jitted alone at the run's shapes (forward,
and forward + backward for a constant output gradient), and the phases of an update
(forward + loss, value_and_grad of one micro-batch, the optax update), as "ops" and
"phases" in the JSON.

Usage: jax_ddit_train.py --config configs/small.json --vocab 8192 --threads 2
       [--steps 5] [--warmup 1] [--batch B] [--seq-len T] [--grad-accum A] [--seed S]
       [--breakdown [--reps R]] [--no-check]
"""

import argparse
import json
import math
import os
import sys
import time

PRESETS = {
    # name: (n_layers, d_model, n_heads, vocab_size, max_seq_len), as kf_model::config
    "tiny": (2, 64, 4, 512, 128),
    "small": (4, 256, 4, 8192, 256),
    "paper": (12, 768, 12, 30522, 1024),
}


def resolve(cfg, vocab, batch, seq_len, accum):
    """The model dimensions and run sizes of a training config, as model_config does."""
    m = cfg.get("model", {})
    preset = m.get("preset")
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown model preset {preset!r} (expected tiny, small or paper)")
    n_layers, d_model, n_heads, _, max_seq = PRESETS[preset or "tiny"]
    if preset is None:
        max_seq = cfg["seq_len"]
    n_layers = m.get("n_layers", n_layers)
    d_model = m.get("d_model", d_model)
    n_heads = m.get("n_heads", n_heads)
    max_seq = m.get("max_seq_len", max_seq)
    r = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "vocab_size": vocab,
        "rope_base": float(m.get("rope_base", 10000.0)),
        "ln_eps": float(m.get("ln_eps", 1e-5)),
        "batch": batch or cfg["batch_size"],
        "seq_len": seq_len or cfg["seq_len"],
        "grad_accum": accum or cfg["grad_accum"],
    }
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise SystemExit(f"d_model {d_model} must split into {n_heads} heads of even size")
    if r["seq_len"] > max_seq:
        raise SystemExit(f"seq_len {r['seq_len']} exceeds max_seq_len {max_seq}")
    return r


def pin_threads(n):
    """Restricts this process (and the threads XLA starts later) to n CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = []
    if cpus and n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
    flags = os.environ.get("XLA_FLAGS", "")
    flags += " --xla_cpu_multi_thread_eigen=" + ("true" if n > 1 else "false")
    flags += " --xla_force_host_platform_device_count=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    return sorted(os.sched_getaffinity(0)) if cpus else None


def check_parity(forward, params, r, rng):
    """Max |logit difference| / max |logit| of this file's forward (f32, jit) against the
    project's independent float64 numpy reference tools/reference/ddit_numpy.py (which the
    Rust model is parity-tested against) on 2 random sequences; None if it is missing."""
    import numpy as np
    import jax

    ref_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference")
    sys.path.insert(0, ref_dir)
    try:
        import ddit_numpy
    except ImportError:
        return None
    finally:
        sys.path.pop(0)
    # matrices rescaled from std 0.02 to 1.6 / sqrt(d) (q and k entries of std ~1.6, so
    # attention is far from uniform at every width), vectors perturbed
    gain = 1.6 / math.sqrt(r["d_model"]) / 0.02
    w = {}
    for n, t in params.items():
        t = np.asarray(t, dtype=np.float64)
        w[n] = gain * t if t.ndim >= 2 else t + 0.1 * rng.standard_normal(t.shape)
    ids = rng.integers(0, r["vocab_size"], size=(2, r["seq_len"]), dtype=np.int32)
    p32 = {n: jax.numpy.asarray(t, dtype=jax.numpy.float32) for n, t in w.items()}
    got = np.asarray(jax.jit(forward)(p32, ids), dtype=np.float64)
    want = ddit_numpy.forward(r, w, ids.astype(np.int64))
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def time_jit(fn, args, reps):
    """Median seconds of a jitted call (compiled by a first, untimed call)."""
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def breakdown(jax, jnp, np, c, params, opt_state, opt, loss_fn, batch, reps):
    """Per-op forward and forward+backward times at the model's shapes (each op jitted
    alone; the fwd+bwd function returns the output and the input gradients for a constant
    output gradient, so neither half is dead code), and the phases of one update."""
    B, T, d, H, D, V, L, A = (c[k] for k in "B T d H D V L A".split())
    rng = c["rng"]
    key = jax.random.PRNGKey(1234)
    counter = [0]

    def rn(*shape):
        counter[0] += 1
        return jax.random.normal(jax.random.fold_in(key, counter[0]), shape, jnp.float32)

    ids = jnp.asarray(rng.integers(0, V, size=(B, T), dtype=np.int32))
    tg = jnp.asarray(rng.integers(0, V, size=(B * T,), dtype=np.int32))
    x, x2, m = rn(B, T, d), rn(B, T, d), rn(B, T, 4 * d)
    qkv, q, k = rn(B, T, 3 * d), rn(B, T, H, D), rn(B, T, H, D)
    part = lambda t, i: t.reshape(B, T, 3, H, D)[:, :, i]
    ops = [
        ("embedding", 1, lambda tab: tab[ids], (rn(V, d),)),
        ("layer_norm", 2 * L + 1, c["layer_norm"], (x, rn(d))),
        ("linear qkv", L, lambda x, w: x @ w.T, (x, rn(3 * d, d))),
        ("rope (q or k)", 2 * L, lambda t: c["rope"](part(t, 0)), (qkv,)),
        ("attention", L, lambda q, k, t: c["attend"](q, k, part(t, 2)), (q, k, qkv)),
        ("linear out", L, lambda x, w: x @ w.T, (x, rn(d, d))),
        ("residual add", 2 * L, lambda a, b: a + b, (x, x2)),
        ("linear mlp0+b", L, lambda x, w, b: x @ w.T + b, (x, rn(4 * d, d), rn(4 * d))),
        ("gelu_tanh", L, lambda m: jax.nn.gelu(m, approximate=True), (m,)),
        ("linear mlp2+b", L, lambda m, w, b: m @ w.T + b, (m, rn(d, 4 * d), rn(d))),
        ("linear head+b", 1, lambda x, w, b: x @ w.T + b, (x, rn(V, d), rn(V))),
        ("cross_entropy", 1, lambda lg: c["cross_entropy"](lg, tg), (rn(B * T, V),)),
    ]
    rows = []
    for name, calls, f, xs in ops:
        out = jax.eval_shape(f, *xs)
        seed = jnp.full(out.shape, 1e-3, out.dtype)

        def fb(*a, f=f, seed=seed):
            y, vjp = jax.vjp(f, *a)
            return y, vjp(seed)

        fwd = time_jit(jax.jit(f), xs, reps)
        both = time_jit(jax.jit(fb), xs, reps)
        rows.append({"name": name, "calls": calls * A, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3})
        print(f"  JAX op {name}: fwd {fwd * 1e3:.2f} ms, fwd+bwd {both * 1e3:.2f} ms", file=sys.stderr)
    tok = batch()[0]
    grads = jax.grad(loss_fn)(params, tok)
    phases = {
        "fwd_loss_ms": time_jit(jax.jit(loss_fn), (params, tok), reps) * 1e3,
        "grad_ms": time_jit(jax.jit(jax.value_and_grad(loss_fn)), (params, tok), reps) * 1e3,
        "optimizer_ms": time_jit(
            jax.jit(lambda g, s, p: opt.update(g, s, p)), (grads, opt_state, params), reps
        )
        * 1e3,
        "micro_batches": A,
    }
    return {"ops": rows, "phases": phases}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--grad-accum", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the parity check")
    ap.add_argument("--check-only", action="store_true", help="only the parity check")
    ap.add_argument("--breakdown", action="store_true", help="also time each op and phase")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per op in --breakdown")
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    r = resolve(cfg, args.vocab, args.batch, args.seq_len, args.grad_accum)
    affinity = pin_threads(max(1, args.threads))

    try:
        import numpy as np
        import jax
        import jax.numpy as jnp
        import jaxlib
        import optax
    except ImportError as e:
        print(json.dumps({"error": f"jax/optax not importable: {e}"}))
        return 2

    L, d, H, V = r["n_layers"], r["d_model"], r["n_heads"], r["vocab_size"]
    D = d // H
    B, T, A = r["batch"], r["seq_len"], r["grad_accum"]
    eps, base = r["ln_eps"], r["rope_base"]

    # ---- parameters (names and shapes as the checkpoint's) ----
    key = jax.random.PRNGKey(args.seed)
    specs = [("vocab_embed.embedding", (V, d), "w")]
    for i in range(L):
        p = f"blocks.{i}"
        specs += [
            (f"{p}.norm1.weight", (d,), "1"),
            (f"{p}.attn_qkv.weight", (3 * d, d), "w"),
            (f"{p}.attn_out.weight", (d, d), "w"),
            (f"{p}.norm2.weight", (d,), "1"),
            (f"{p}.mlp.0.weight", (4 * d, d), "w"),
            (f"{p}.mlp.0.bias", (4 * d,), "0"),
            (f"{p}.mlp.2.weight", (d, 4 * d), "w"),
            (f"{p}.mlp.2.bias", (d,), "0"),
        ]
    specs += [
        ("output_layer.norm_final.weight", (d,), "1"),
        ("output_layer.linear.weight", (V, d), "w"),
        ("output_layer.linear.bias", (V,), "0"),
    ]
    params = {}
    for j, (name, shape, init) in enumerate(specs):
        if init == "w":
            params[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, j), shape, jnp.float32)
        elif init == "1":
            params[name] = jnp.ones(shape, jnp.float32)
        else:
            params[name] = jnp.zeros(shape, jnp.float32)
    n_params = sum(int(np.prod(s)) for _, s, _ in specs)

    # ---- the model ----
    def layer_norm(x, w):
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + eps) * w

    inv_freq = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # [D/2]
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.asarray(np.cos(ang), jnp.float32)[None, :, None, :]  # [1, T, 1, D/2]
    sin = jnp.asarray(np.sin(ang), jnp.float32)[None, :, None, :]

    def rope(x):  # [B, T, H, D], rotate-half (NeoX)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    scale = 1.0 / math.sqrt(D)

    def attend(q, k, v):  # [b, T, H, D] each, causal
        s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
        s = jnp.where(causal, s, -jnp.inf)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)

    def forward(p, ids):  # ids [b, T] -> logits [b, T, V]
        nb = ids.shape[0]
        h = p["vocab_embed.embedding"][ids]
        for i in range(L):
            b = f"blocks.{i}"
            x = layer_norm(h, p[f"{b}.norm1.weight"])
            qkv = (x @ p[f"{b}.attn_qkv.weight"].T).reshape(nb, T, 3, H, D)
            q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
            a = attend(q, k, v)
            h = h + a.reshape(nb, T, d) @ p[f"{b}.attn_out.weight"].T
            x = layer_norm(h, p[f"{b}.norm2.weight"])
            m = jax.nn.gelu(x @ p[f"{b}.mlp.0.weight"].T + p[f"{b}.mlp.0.bias"], approximate=True)
            h = h + m @ p[f"{b}.mlp.2.weight"].T + p[f"{b}.mlp.2.bias"]
        x = layer_norm(h, p["output_layer.norm_final.weight"])
        return x @ p["output_layer.linear.weight"].T + p["output_layer.linear.bias"]

    def cross_entropy(logits, targets):  # [..., V], [...]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    def loss_fn(p, tokens):  # tokens [B, T + 1]
        return cross_entropy(forward(p, tokens[:, :-1]), tokens[:, 1:])

    # ---- the optimiser: kf_model::train::optim::OptimConfig::lr_at, AdamW, clipping ----
    lr, min_lr = float(cfg["lr"]), float(cfg["min_lr"])
    warm, total = int(cfg["warmup_steps"]), int(cfg["total_steps"])

    def schedule(i):
        span = max(total - warm, 1)
        frac = jnp.clip((i - warm) / span, 0.0, 1.0)
        cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(i < warm, lr * (i + 1) / max(warm, 1), cosine)

    decay_mask = {n: len(s) >= 2 for n, s, _ in specs}
    chain = []
    if float(cfg["grad_clip"]) > 0:
        chain.append(optax.clip_by_global_norm(float(cfg["grad_clip"])))
    chain.append(
        optax.adamw(
            schedule,
            b1=float(cfg["beta1"]),
            b2=float(cfg["beta2"]),
            eps=float(cfg["eps"]),
            weight_decay=float(cfg["weight_decay"]),
            mask=decay_mask,
        )
    )
    opt = optax.chain(*chain)
    opt_state = opt.init(params)

    def train_step(p, state, tokens):  # tokens [A, B, T + 1]
        zeros = jax.tree_util.tree_map(jnp.zeros_like, p)

        def micro(acc, tok):
            loss, g = jax.value_and_grad(loss_fn)(p, tok)
            return jax.tree_util.tree_map(jnp.add, acc, g), loss

        gsum, losses = jax.lax.scan(micro, zeros, tokens)
        grads = jax.tree_util.tree_map(lambda g: g / A, gsum)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, jnp.mean(losses)

    step = jax.jit(train_step, donate_argnums=(0, 1))
    rng = np.random.default_rng(args.seed)
    parity = None if args.no_check else check_parity(forward, params, r, rng)
    if args.check_only:
        print(json.dumps({"parity_max_rel_err": parity, "n_params": n_params}))
        return 0

    def batch():
        return jnp.asarray(rng.integers(0, V, size=(A, B, T + 1), dtype=np.int32))

    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch())
    loss_first = float(loss.block_until_ready())
    compile_s = time.perf_counter() - t0
    for _ in range(max(0, args.warmup)):
        params, opt_state, loss = step(params, opt_state, batch())
        loss.block_until_ready()
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(max(1, args.steps)):
        tok = batch()
        tok.block_until_ready()
        t = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, tok)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    cpu_util = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    loss_last = float(loss)
    med = sorted(times)[len(times) // 2]
    tokens = A * B * T
    extra = {}
    if args.breakdown:
        ctx = dict(
            B=B, T=T, d=d, H=H, D=D, V=V, L=L, A=A, rng=rng, layer_norm=layer_norm,
            rope=rope, attend=attend, cross_entropy=cross_entropy,
        )
        extra = breakdown(jax, jnp, np, ctx, params, opt_state, opt, loss_fn, batch, args.reps)
    print(
        json.dumps(
            {
                **extra,
                "tokens_per_s": tokens / med,
                "step_ms": med * 1e3,
                "steps_ms": [t * 1e3 for t in times],
                "compile_s": compile_s,
                "tokens_per_step": tokens,
                "batch": B,
                "seq_len": T,
                "grad_accum": A,
                "n_layers": L,
                "d_model": d,
                "n_heads": H,
                "vocab": V,
                "n_params": n_params,
                "threads": args.threads,
                "affinity": affinity,
                "cpu_util": cpu_util,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "optax": optax.__version__,
                "numpy": np.__version__,
                "parity_max_rel_err": parity,
                "loss_first": loss_first,
                "loss_last": loss_last,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
