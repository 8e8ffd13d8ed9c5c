//! `kfrun bench cost`: the GPU cost model on paper (issue 7), until a GPU measures it.
//! One pure function per kernel family gives the bytes moved and the FLOPs of one call
//! from its shapes; a roofline turns them into H100 time, `max(bytes / BW, flops / peak)`
//! (and, for launches of fewer blocks than SMs, what one SM can stream or compute) plus a
//! per-launch overhead; a pass model sums the kernels of one KV-cached forward pass
//! of the DDiT (AR step: 1 query row per sequence; PFLM step: K committed + K hint rows),
//! and predicts AR vs PFLM tokens/s across batch sizes. docs/COST_MODEL.md explains the
//! constants and the limits.
//!
//! Letters: B sequences, R rows (B x rows per sequence), d model width, H heads, D head
//! dim, V vocabulary, L layers, C cached positions, K tokens per PFLM step, s bytes per
//! stored element (activations, weights and KV cache share one dtype; accumulation is f32).
//!
//! FLOP conventions: a multiply-add is 2, an add/mul/compare 1, and a transcendental
//! (exp, tanh, erf, sin, cos, sqrt in f32) counts as [`TRANSC`] FLOP-equivalents; f64
//! transcendentals (the sampler and the noise features compute in f64) as [`TRANSC_F64`].

use anyhow::{bail, ensure, Result};
use kf_model::DditConfig;
use serde::Serialize;
use std::path::PathBuf;

/// FLOP-equivalents of one f32 transcendental: an H100 SM issues 16 SFU ops per clock
/// against 128 FP32 lanes (1/8 the instruction rate, so 16 FLOPs of FMA-as-2), and the
/// non-fast-math expf/tanhf/erff are a short polynomial of about the same length.
pub const TRANSC: f64 = 16.0;
/// FLOP-equivalents of one f64 exp/sin/cos: range reduction plus a degree ~11 polynomial
/// in FMAs (no SFU for f64).
pub const TRANSC_F64: f64 = 28.0;
/// Threads per block of the 1-D elementwise kernels and their block cap (as
/// `kf_kernels::elementwise::config`).
const EW_BLOCK: f64 = 256.0;
const EW_MAX_BLOCKS: f64 = 1024.0;
/// cuBLAS picks split-K / stream-K for skinny shapes, so a GEMM is taken to fill the GPU:
/// at least this many blocks (tiles of 128 x 128 otherwise).
const GEMM_MIN_BLOCKS: f64 = 1024.0;
/// Query rows per attention block (one block per (sequence, head, query tile)).
pub const ATTN_Q_TILE: usize = 64;

/// The execution unit whose peak bounds a kernel's arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Dense f16/bf16 tensor cores (cuBLAS GEMM on 2-byte storage).
    Tensor16,
    /// Dense TF32 tensor cores (cuBLAS f32 GEMM with TF32 allowed).
    Tf32,
    /// FP32 CUDA cores (our own kernels; cuBLAS SGEMM without TF32).
    Fp32,
    /// FP64 CUDA cores (the sampler and the noise features compute in f64).
    Fp64,
}

/// The GPU: peaks, achievable fractions, and launch overheads.
#[derive(Clone, Debug, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    /// Peak HBM bandwidth, bytes/s.
    pub hbm_peak: f64,
    /// The fraction of it a streaming kernel achieves.
    pub bw_frac: f64,
    /// Dense peaks, FLOP/s.
    pub tensor16: f64,
    pub tf32: f64,
    pub fp32: f64,
    pub fp64: f64,
    /// The fraction of a compute peak a well-shaped kernel achieves.
    pub flop_frac: f64,
    pub sms: f64,
    /// Bytes/s one SM streams on its own: ~64 KiB in flight (2048 threads x 2 loads of
    /// 16 B) over ~0.8 us of DRAM latency. Bounds kernels with few blocks.
    pub sm_bytes_s: f64,
    /// Per kernel, launched one by one on a stream (CPU launch cost and the gap between
    /// dependent kernels), seconds.
    pub launch_s: f64,
    /// Per kernel node of a CUDA graph replay, seconds.
    pub graph_node_s: f64,
    /// Per forward pass, fixed: copy the chosen tokens to the host, synchronise, upload the
    /// next ids / positions / noises (and, with graphs, launch the graph), seconds.
    pub pass_host_s: f64,
}

impl Gpu {
    /// H100 SXM5 80 GB (NVIDIA H100 datasheet / Hopper whitepaper numbers, dense).
    pub fn h100_sxm() -> Gpu {
        Gpu {
            name: "H100 SXM5 80GB",
            hbm_peak: 3.35e12,
            bw_frac: 0.8,
            tensor16: 989.4e12,
            tf32: 494.7e12,
            fp32: 66.9e12,
            fp64: 33.5e12,
            flop_frac: 0.7,
            sms: 132.0,
            sm_bytes_s: 80e9,
            launch_s: 4e-6,
            graph_node_s: 1e-6,
            pass_host_s: 10e-6,
        }
    }

    pub fn bandwidth(&self) -> f64 {
        self.hbm_peak * self.bw_frac
    }

    /// Achievable FLOP/s of `unit`.
    pub fn rate(&self, unit: Unit) -> f64 {
        self.flop_frac
            * match unit {
                Unit::Tensor16 => self.tensor16,
                Unit::Tf32 => self.tf32,
                Unit::Fp32 => self.fp32,
                Unit::Fp64 => self.fp64,
            }
    }
}

/// Storage dtype of weights, activations and the KV cache, and the GEMM unit it implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Bf16,
    F16,
    /// f32 storage, cuBLAS SGEMM on CUDA cores.
    F32,
    /// f32 storage, cuBLAS GEMM with TF32 tensor cores allowed.
    F32Tf32,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Precision> {
        Ok(match s {
            "bf16" => Precision::Bf16,
            "f16" => Precision::F16,
            "f32" => Precision::F32,
            "tf32" => Precision::F32Tf32,
            o => bail!("unknown --dtype \"{o}\" (expected bf16, f16, f32 or tf32)"),
        })
    }
    /// Bytes per stored element.
    pub fn bytes(self) -> f64 {
        match self {
            Precision::Bf16 | Precision::F16 => 2.0,
            Precision::F32 | Precision::F32Tf32 => 4.0,
        }
    }
    pub fn gemm_unit(self) -> Unit {
        match self {
            Precision::Bf16 | Precision::F16 => Unit::Tensor16,
            Precision::F32 => Unit::Fp32,
            Precision::F32Tf32 => Unit::Tf32,
        }
    }
}

/// Bytes and FLOPs of one kernel call.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Cost {
    /// Bytes read + written in HBM (each operand once: ideal tiling and cache reuse).
    pub bytes: f64,
    pub flops: f64,
    pub unit: Unit,
    /// Thread blocks launched; below one per SM only that share of the GPU works.
    pub blocks: f64,
    /// Of `bytes`, the model's parameters read (weights, biases, norm weights).
    pub weight_bytes: f64,
}

impl Cost {
    fn new(bytes: f64, flops: f64, unit: Unit, blocks: f64) -> Cost {
        Cost {
            bytes,
            flops,
            unit,
            blocks: blocks.max(1.0),
            weight_bytes: 0.0,
        }
    }
    /// A call that moves `bytes` and computes `flops` on the FP32 cores (benchmarks).
    pub fn stream(bytes: f64, flops: f64) -> Cost {
        Cost::new(bytes, flops, Unit::Fp32, 1.0)
    }
    fn weights(mut self, w: f64) -> Cost {
        self.weight_bytes = w;
        self
    }
    /// FLOPs per byte.
    pub fn intensity(&self) -> f64 {
        self.flops / self.bytes.max(1.0)
    }
    /// Memory time (s): the bytes at the achievable bandwidth, or one block's stream of
    /// activations at what one SM streams alone, whichever is longer (the second binds a
    /// launch of few blocks; weight vectors every block reads come from L2 and are left
    /// out of it).
    pub fn mem_s(&self, gpu: &Gpu) -> f64 {
        let per_block = (self.bytes - self.weight_bytes) / self.blocks;
        (self.bytes / gpu.bandwidth()).max(per_block / gpu.sm_bytes_s)
    }
    /// Compute time (s): the FLOPs at the achievable rate of its unit, or one block's
    /// FLOPs at one SM's share of it when the launch does not fill the GPU.
    pub fn comp_s(&self, gpu: &Gpu) -> f64 {
        let rate = gpu.rate(self.unit);
        (self.flops / rate).max(self.flops / self.blocks * gpu.sms / rate)
    }
    /// Roofline time without launch overhead: `max(bytes / BW, flops / peak)`.
    pub fn roofline_s(&self, gpu: &Gpu) -> f64 {
        self.mem_s(gpu).max(self.comp_s(gpu))
    }
    pub fn memory_bound(&self, gpu: &Gpu) -> bool {
        self.mem_s(gpu) >= self.comp_s(gpu)
    }
}

fn ew_blocks(n: f64) -> f64 {
    (n / EW_BLOCK).ceil().clamp(1.0, EW_MAX_BLOCKS)
}

// ---------------------------------------------------------------- kernel families

/// Embedding gather: `rows` ids (u32) -> `rows x d` table rows copied out.
pub fn embedding_fwd(rows: usize, d: usize, s: f64) -> Cost {
    let (r, d) = (rows as f64, d as f64);
    Cost::new(4.0 * r + 2.0 * r * d * s, 0.0, Unit::Fp32, ew_blocks(r * d))
}

/// Embedding backward: scatter-add `rows x d` gradients into an f32 `[V, d]` gradient
/// (atomics: read + write per element), after zeroing it.
pub fn embedding_bwd(rows: usize, v: usize, d: usize, s: f64) -> Cost {
    let (r, v, d) = (rows as f64, v as f64, d as f64);
    Cost::new(
        4.0 * r + r * d * s + 8.0 * r * d + 4.0 * v * d,
        r * d,
        Unit::Fp32,
        ew_blocks(r * d),
    )
}

/// LayerNorm forward, one block per row, f32 statistics; `bias`: the noise encoder's
/// LayerNorm; `save_stats`: training writes mean and 1/std per row.
pub fn layernorm_fwd(rows: usize, d: usize, s: f64, bias: bool, save_stats: bool) -> Cost {
    let (r, df) = (rows as f64, d as f64);
    let params = df * s * if bias { 2.0 } else { 1.0 };
    let stats = if save_stats { 8.0 * r } else { 0.0 };
    // sum (1) + squared deviation (2) + normalise and scale (3) (+ bias 1) per element,
    // one rsqrt per row
    let per = if bias { 7.0 } else { 6.0 };
    Cost::new(
        2.0 * r * df * s + params + stats,
        r * (per * df + TRANSC),
        Unit::Fp32,
        r,
    )
    .weights(params)
}

/// LayerNorm backward: reads x, dy, the weight and the statistics, writes dx, and the
/// weight (and bias) gradient as f32 partial sums per block of 32 rows.
pub fn layernorm_bwd(rows: usize, d: usize, s: f64, bias: bool) -> Cost {
    let (r, df) = (rows as f64, d as f64);
    let nparam = if bias { 2.0 } else { 1.0 };
    let partials = (r / 32.0).ceil() * df * 4.0 * nparam;
    Cost::new(
        3.0 * r * df * s + df * s + 8.0 * r + partials,
        12.0 * r * df,
        Unit::Fp32,
        r,
    )
}

/// RoPE (rotate-half) on one `[rows, H, D]` tensor, cos/sin from an f32 table per
/// position. The backward is the same kernel with -sin (same cost).
pub fn rope(rows: usize, heads: usize, head_dim: usize, s: f64) -> Cost {
    let (r, n) = (rows as f64, (heads * head_dim) as f64);
    let table = r * head_dim as f64 * 4.0;
    Cost::new(
        2.0 * r * n * s + table,
        3.0 * r * n,
        Unit::Fp32,
        ew_blocks(r * n / 2.0),
    )
}

/// The decode path's fused RoPE + KV append: reads q, k, v of the QKV GEMM's output,
/// writes the rotated q and the rotated k and v into the cache slots of this pass (the
/// CPU path does rope(q), rope(k) and a cache copy; one kernel on the GPU).
pub fn rope_qk_cache(rows: usize, heads: usize, head_dim: usize, s: f64) -> Cost {
    let (r, n) = (rows as f64, (heads * head_dim) as f64);
    let table = r * head_dim as f64 * 4.0;
    Cost::new(
        6.0 * r * n * s + table,
        6.0 * r * n,
        Unit::Fp32,
        ew_blocks(3.0 * r * n / 2.0),
    )
}

/// A device copy of `n` elements (a strided gather / scatter such as the KV append, or a
/// memcpy): read and written once.
pub fn copy(n: usize, s: f64) -> Cost {
    let n = n as f64;
    Cost::new(2.0 * n * s, 0.0, Unit::Fp32, ew_blocks(n))
}

/// The RoPE cos / sin tables of `rows` positions (f32, made once per pass, in double).
pub fn rope_tables(rows: usize, head_dim: usize) -> Cost {
    let n = (rows * head_dim / 2) as f64;
    Cost::new(
        8.0 * n + 4.0 * rows as f64,
        40.0 * n,
        Unit::Fp32,
        ew_blocks(n),
    )
}

/// The MLP's bias and GELU (tanh) in one pass over `rows x n` (the as-built decode path).
pub fn bias_gelu_tanh(rows: usize, n: usize, s: f64) -> Cost {
    let c = gelu_tanh_fwd(rows * n, s);
    Cost::new(
        c.bytes + n as f64 * s,
        c.flops + (rows * n) as f64,
        c.unit,
        c.blocks,
    )
    .weights(n as f64 * s)
}

/// GELU, tanh approximation (the backbone's MLP), over `n` elements.
pub fn gelu_tanh_fwd(n: usize, s: f64) -> Cost {
    let n = n as f64;
    Cost::new(2.0 * n * s, n * (7.0 + TRANSC), Unit::Fp32, ew_blocks(n))
}

/// GELU, exact erf form (the noise encoder's MLP), over `n` elements.
pub fn gelu_erf_fwd(n: usize, s: f64) -> Cost {
    let n = n as f64;
    Cost::new(2.0 * n * s, n * (4.0 + TRANSC), Unit::Fp32, ew_blocks(n))
}

/// GELU backward (either form): reads x and dy, writes dx.
pub fn gelu_bwd(n: usize, s: f64) -> Cost {
    let n = n as f64;
    Cost::new(3.0 * n * s, n * (12.0 + TRANSC), Unit::Fp32, ew_blocks(n))
}

/// `y = x + b` over `rows x n` with a bias of `n`.
pub fn bias_add(rows: usize, n: usize, s: f64) -> Cost {
    let (r, n) = (rows as f64, n as f64);
    Cost::new(2.0 * r * n * s + n * s, r * n, Unit::Fp32, ew_blocks(r * n)).weights(n * s)
}

/// `c = a + b` over `n` elements (the residual adds).
pub fn add(n: usize, s: f64) -> Cost {
    let n = n as f64;
    Cost::new(3.0 * n * s, n, Unit::Fp32, ew_blocks(n))
}

/// Row softmax over `rows x v` (one block per row, the row read once: it fits in shared
/// memory for the vocabularies here).
pub fn softmax_fwd(rows: usize, v: usize, s: f64) -> Cost {
    let (r, v) = (rows as f64, v as f64);
    Cost::new(2.0 * r * v * s, r * v * (4.0 + TRANSC), Unit::Fp32, r)
}

/// Softmax backward: `dx = y * (dy - sum(dy * y))`, reads y and dy, writes dx.
pub fn softmax_bwd(rows: usize, v: usize, s: f64) -> Cost {
    let (r, v) = (rows as f64, v as f64);
    Cost::new(3.0 * r * v * s, 4.0 * r * v, Unit::Fp32, r)
}

/// Score entries per (sequence, head) of `q_rows` new rows after `cache` cached positions,
/// causal by absolute position: row i sees `cache + i + 1` keys.
pub fn attention_scores(q_rows: usize, cache: usize) -> f64 {
    let (r, c) = (q_rows as f64, cache as f64);
    r * c + r * (r + 1.0) / 2.0
}

/// K/V rows one (sequence, head) reads: each query tile of [`ATTN_Q_TILE`] rows reads the
/// keys its last row sees, once (flash-style; no L2 reuse between tiles assumed).
fn attention_kv_rows(q_rows: usize, cache: usize) -> f64 {
    (0..q_rows.div_ceil(ATTN_Q_TILE))
        .map(|t| (cache + ((t + 1) * ATTN_Q_TILE).min(q_rows)) as f64)
        .sum()
}

/// Flash attention forward over a KV cache (prefill: `cache` = 0, `q_rows` = the prompt;
/// decode: `cache` = committed positions, `q_rows` = this pass's rows), `batch` sequences.
/// Our own kernel: CUDA cores (FP32), online softmax, one block per (sequence, head, query
/// tile). `save_lse`: training keeps the row log-sum-exp for the backward.
pub fn attention_fwd(
    batch: usize,
    heads: usize,
    head_dim: usize,
    q_rows: usize,
    cache: usize,
    s: f64,
    save_lse: bool,
) -> Cost {
    let (b, h, hd) = (batch as f64, heads as f64, head_dim as f64);
    let d = h * hd;
    let r = q_rows as f64;
    let scores = b * h * attention_scores(q_rows, cache);
    // QK (2D) + PV (2D) per score, scale/max/sum/rescale (4) and one exp
    let flops = scores * (4.0 * hd + 4.0 + TRANSC);
    let kv = b * attention_kv_rows(q_rows, cache) * 2.0 * d * s;
    let lse = if save_lse { b * h * r * 4.0 } else { 0.0 };
    let blocks = b * h * q_rows.div_ceil(ATTN_Q_TILE) as f64;
    Cost::new(2.0 * b * r * d * s + kv + lse, flops, Unit::Fp32, blocks)
}

/// Flash attention backward (training, causal over `t` rows): recomputes the scores, five
/// products of 2D FLOPs per score (S, dV, dP, dQ, dK); reads q, k, v, o, dO and the
/// log-sum-exp, writes dq, dk, dv.
pub fn attention_bwd(batch: usize, heads: usize, head_dim: usize, t: usize, s: f64) -> Cost {
    let (b, h, hd) = (batch as f64, heads as f64, head_dim as f64);
    let d = h * hd;
    let tf = t as f64;
    let scores = b * h * attention_scores(t, 0);
    let flops = scores * (10.0 * hd + 8.0 + TRANSC);
    let bytes = 8.0 * b * tf * d * s + b * h * tf * 4.0 * 2.0;
    let blocks = b * h * t.div_ceil(ATTN_Q_TILE) as f64;
    Cost::new(bytes, flops, Unit::Fp32, blocks)
}

/// Cross-entropy forward and its gradient in one kernel (one block per row): reads the
/// logits and the targets, writes the per-row loss and dlogits.
pub fn cross_entropy(rows: usize, v: usize, s: f64) -> Cost {
    let (r, v) = (rows as f64, v as f64);
    Cost::new(
        2.0 * r * v * s + 8.0 * r,
        r * v * (5.0 + TRANSC),
        Unit::Fp32,
        r,
    )
}

/// Inverse-CDF sampling (KFORCING.md section 3), one block per row: the row read once
/// (held in shared memory), weights and block sums in f64 (the GPU must match the CPU's
/// f64 arithmetic bit for bit), a search and a rescan of one 64-entry block.
pub fn sample_inverse_cdf(rows: usize, v: usize, s: f64) -> Cost {
    let (r, v) = (rows as f64, v as f64);
    Cost::new(
        r * v * s + 12.0 * r,
        r * v * (3.0 + TRANSC_F64),
        Unit::Fp64,
        r,
    )
}

/// Argmax with frequency penalty over `[B, K, V]` logits: one block per batch row (its K
/// positions in order, each updating the row's counts), scores `l - p * count` in f64.
pub fn argmax_penalty(batch: usize, k: usize, v: usize, s: f64) -> Cost {
    let (b, k, v) = (batch as f64, k as f64, v as f64);
    Cost::new(
        b * k * v * s + b * v * 4.0 + b * k * 12.0,
        b * k * v * 3.0,
        Unit::Fp64,
        b,
    )
}

/// The PFLM noise features: `[cos, sin](2 pi s f_j)` of u and of tau, computed in f64,
/// written as `rows x 2d` in storage dtype.
pub fn noise_features(rows: usize, d: usize, s: f64) -> Cost {
    let (r, df) = (rows as f64, d as f64);
    Cost::new(
        16.0 * r + 2.0 * r * df * s,
        2.0 * r * df * (3.0 + TRANSC_F64),
        Unit::Fp64,
        r,
    )
}

/// One AdamW step over `n` parameters (parameter and gradient in storage dtype, the two
/// moments in f32): reads p, g, m, v, writes p, m, v.
pub fn adamw(n: usize, s: f64) -> Cost {
    let n = n as f64;
    Cost::new(
        n * (3.0 * s + 16.0),
        n * (14.0 + TRANSC),
        Unit::Fp32,
        ew_blocks(n),
    )
}

/// What a GEMM's epilogue does besides writing `C = A B`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epilogue {
    /// `+ bias[n]`.
    pub bias: bool,
    /// GELU (tanh) after the bias (cuBLASLt `GELU_BIAS`).
    pub gelu: bool,
    /// `+ C` read from the output buffer (beta = 1: the residual add).
    pub residual: bool,
}

/// cuBLAS GEMM `[m, k] x [k, n] -> [m, n]`, f32 accumulation: each operand read once
/// (a lower bound on traffic), the weight `[k, n]` counted as parameters. cuBLAS picks
/// split-K / stream-K for skinny shapes, so it is taken to fill the GPU.
pub fn gemm(m: usize, n: usize, k: usize, s: f64, unit: Unit, epi: Epilogue) -> Cost {
    let (mf, nf, kf) = (m as f64, n as f64, k as f64);
    let bias = if epi.bias { nf * s } else { 0.0 };
    let resid = if epi.residual { mf * nf * s } else { 0.0 };
    let mut flops = 2.0 * mf * nf * kf;
    if epi.bias {
        flops += mf * nf;
    }
    if epi.gelu {
        flops += mf * nf * (7.0 + TRANSC);
    }
    if epi.residual {
        flops += mf * nf;
    }
    Cost::new(
        (mf * kf + kf * nf + mf * nf) * s + bias + resid,
        flops,
        unit,
        ((mf / 128.0).ceil() * (nf / 128.0).ceil()).max(GEMM_MIN_BLOCKS),
    )
    .weights(kf * nf * s + bias)
}

// ---------------------------------------------------------------- the forward pass

/// How kernels are launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Launch {
    /// One by one on a stream: [`Gpu::launch_s`] each.
    Stream,
    /// Replayed from a captured CUDA graph: [`Gpu::graph_node_s`] each.
    Graph,
}

/// One way of running the model: launch mode, and either the kernels the engine launches
/// today (`fused: false`, "as built": a test checks them launch for launch against the
/// emulator's counts) or the target plan (`fused: true`: GEMM epilogues absorb bias, GELU
/// (tanh) and residual adds, RoPE and the KV append are one kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mode {
    pub launch: Launch,
    pub fused: bool,
}

impl Mode {
    pub fn label(&self) -> &'static str {
        match (self.launch, self.fused) {
            (Launch::Stream, false) => "stream launches, kernels as built",
            (Launch::Stream, true) => "stream launches, fused plan",
            (Launch::Graph, false) => "CUDA graph, kernels as built",
            (Launch::Graph, true) => "CUDA graph, fused plan",
        }
    }
    /// Overhead per kernel launch, seconds.
    pub fn per_launch_s(&self, gpu: &Gpu) -> f64 {
        match self.launch {
            Launch::Stream => gpu.launch_s,
            Launch::Graph => gpu.graph_node_s,
        }
    }
}

/// The model's shape (from a [`DditConfig`]) and the student's k.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ModelShape {
    pub layers: usize,
    pub d: usize,
    pub heads: usize,
    pub vocab: usize,
}

impl ModelShape {
    pub fn from_config(cfg: &DditConfig) -> ModelShape {
        ModelShape {
            layers: cfg.n_layers,
            d: cfg.d_model,
            heads: cfg.n_heads,
            vocab: cfg.vocab_size,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.d / self.heads.max(1)
    }
}

/// What reads the head's logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// No head (the PFLM prefill fills the cache only).
    None,
    /// AR: inverse-CDF sampling on the last row of each sequence.
    Sample,
    /// PFLM: argmax with frequency penalty at the K hints.
    Argmax,
}

/// One forward pass: per sequence `tokens` embedded rows and `hints` noise-encoded rows
/// (after them), `cache` positions already in the KV cache, the head on `head_rows` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Pass {
    pub batch: usize,
    pub tokens: usize,
    pub hints: usize,
    pub cache: usize,
    pub head_rows: usize,
    pub readout: Readout,
}

impl Pass {
    /// One AR decode step: 1 new row after `cache` positions, sampled.
    pub fn ar_step(batch: usize, cache: usize) -> Pass {
        Pass {
            batch,
            tokens: 1,
            hints: 0,
            cache,
            head_rows: 1,
            readout: Readout::Sample,
        }
    }
    /// One PFLM step: `n_new` committed rows + `k` hints after `cache`, argmax at the hints.
    pub fn pflm_step(batch: usize, n_new: usize, k: usize, cache: usize) -> Pass {
        Pass {
            batch,
            tokens: n_new,
            hints: k,
            cache,
            head_rows: k,
            readout: Readout::Argmax,
        }
    }
    pub fn rows_per_seq(&self) -> usize {
        self.tokens + self.hints
    }
}

/// One kernel in a pass, launched `count` times (e.g. once per layer) with this cost.
#[derive(Clone, Debug, Serialize)]
pub struct Call {
    /// Kernel family (`gemm`, `layernorm_fwd`, ...).
    pub kernel: &'static str,
    /// Its role in the model (`qkv`, `ln1`, ...).
    pub role: &'static str,
    pub shape: String,
    pub count: usize,
    pub cost: Cost,
}

/// The kernels of one forward pass in launch order (per-layer kernels listed once, with
/// `count` = layers).
pub fn forward_pass(m: &ModelShape, prec: Precision, fused: bool, p: &Pass) -> Vec<Call> {
    let mut c = Calls {
        out: Vec::new(),
        s: prec.bytes(),
        gu: prec.gemm_unit(),
        fused,
    };
    let b = p.batch;
    // embeddings of the token rows; the hint rows come from the noise encoder, whose last
    // GEMM writes them into the same [B, T, d] buffer (strided output, no concat)
    if p.tokens > 0 {
        let r = b * p.tokens;
        let cost = embedding_fwd(r, m.d, c.s);
        c.push(
            "embedding_fwd",
            "tokens",
            format!("{r} ids, d {}", m.d),
            1,
            cost,
        );
    }
    if p.hints > 0 {
        c.noise_encoder(m, b * p.hints);
        if p.tokens > 0 && !fused {
            // as built, the token and hint rows are joined along time: two strided copies
            let rows = b * p.rows_per_seq();
            for part in ["tokens", "hints"] {
                c.push(
                    "strided_copy",
                    part,
                    format!("into {rows} x {}", m.d),
                    1,
                    copy(rows * m.d / 2, c.s),
                );
            }
        }
    }
    if !fused {
        let cost = rope_tables(b * p.rows_per_seq(), m.head_dim());
        c.push(
            "rope_tables",
            "rope",
            format!("{} positions", b * p.rows_per_seq()),
            1,
            cost,
        );
    }
    c.blocks(m, p);
    // the head, on the rows that need logits (the LayerNorm reads them strided)
    if p.head_rows > 0 && p.readout != Readout::None {
        c.head(m, p);
    }
    c.out
}

/// The calls of a pass as they are listed: element size, GEMM unit and whether the GEMMs
/// fuse their bias / GELU / residual epilogues (else those are separate kernels).
struct Calls {
    out: Vec<Call>,
    s: f64,
    gu: Unit,
    fused: bool,
}

impl Calls {
    fn push(
        &mut self,
        kernel: &'static str,
        role: &'static str,
        shape: String,
        count: usize,
        cost: Cost,
    ) {
        self.out.push(Call {
            kernel,
            role,
            shape,
            count,
            cost,
        })
    }

    /// A `[mm, k] . [k, n]` GEMM with the epilogues `bias`, `gelu`, `residual` asks for when
    /// fused. As built, a residual starts the output (`bias_add` of the residual and the
    /// bias, or a `copy` of the residual) that the GEMM accumulates into, and a bias without
    /// one follows the GEMM as `bias_add`, or with the GELU as `bias_gelu_tanh`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self,
        role: &'static str,
        count: usize,
        (mm, n, k): (usize, usize, usize),
        bias: bool,
        gelu: bool,
        residual: bool,
        resid_role: &'static str,
    ) {
        let f = self.fused;
        let e = Epilogue {
            bias: bias && f,
            gelu: gelu && f,
            residual: residual && f,
            ..Epilogue::default()
        };
        let cost = gemm(mm, n, k, self.s, self.gu, e);
        let (s, sh) = (self.s, format!("{mm} x {n}"));
        if !f && residual {
            let (kernel, c) = if bias {
                ("bias_add", bias_add(mm, n, s))
            } else {
                ("copy", copy(mm * n, s))
            };
            self.push(kernel, resid_role, sh.clone(), count, c);
        }
        self.push("gemm", role, format!("{mm}x{k} . {k}x{n}"), count, cost);
        if !f && !residual && bias {
            let (kernel, c) = if gelu {
                ("bias_gelu_tanh", bias_gelu_tanh(mm, n, s))
            } else {
                ("bias_add", bias_add(mm, n, s))
            };
            self.push(kernel, role, sh, count, c);
        }
    }

    /// The noise encoder on `r` hint rows: features, projection, LayerNorm, the MLP with its
    /// residual.
    fn noise_encoder(&mut self, m: &ModelShape, r: usize) {
        let (d, s) = (m.d, self.s);
        let cost = noise_features(r, d, s);
        self.push(
            "noise_features",
            "noise enc",
            format!("{r} x 2d {}", 2 * d),
            1,
            cost,
        );
        self.gemm("noise proj", 1, (r, d, 2 * d), true, false, false, "");
        let cost = layernorm_fwd(r, d, s, true, false);
        self.push(
            "layernorm_fwd",
            "noise ln",
            format!("{r} x {d}, bias"),
            1,
            cost,
        );
        self.gemm("noise mlp0", 1, (r, 4 * d, d), true, false, false, "");
        // exact GELU: no cuBLASLt epilogue computes erf, so it stays a kernel
        let cost = gelu_erf_fwd(r * 4 * d, s);
        self.push(
            "gelu_erf_fwd",
            "noise mlp",
            format!("{r} x {}", 4 * d),
            1,
            cost,
        );
        self.gemm(
            "noise mlp2",
            1,
            (r, d, 4 * d),
            true,
            false,
            true,
            "noise resid",
        );
    }

    /// The transformer blocks (each kernel once, `count` = layers).
    fn blocks(&mut self, m: &ModelShape, p: &Pass) {
        let (d, h, hd, l, s) = (m.d, m.heads, m.head_dim(), m.layers, self.s);
        let (b, rows) = (p.batch, p.batch * p.rows_per_seq());
        let ln = format!("{rows} x {d}");
        let cost = layernorm_fwd(rows, d, s, false, false);
        self.push("layernorm_fwd", "ln1", ln.clone(), l, cost);
        self.gemm("qkv", l, (rows, 3 * d, d), false, false, false, "");
        if self.fused {
            let cost = rope_qk_cache(rows, h, hd, s);
            let shape = format!("{rows} x 3 x {h} x {hd}");
            self.push("rope_qk_cache", "rope+kv", shape, l, cost);
        } else {
            // as built: q and k rotated from the qkv rows in place, k and v appended to the
            // KV cache by one strided copy each
            for part in ["q", "k"] {
                let shape = format!("{rows} x {h} x {hd}");
                self.push("rope_fwd", part, shape, l, rope(rows, h, hd, s));
            }
            for part in ["kv append k", "kv append v"] {
                let shape = format!("{rows} x {h} x {hd}");
                self.push("strided_copy", part, shape, l, copy(rows * d, s));
            }
        }
        let shape = format!(
            "B {b}, {} q rows, {} cached, H {h}, D {hd}",
            p.rows_per_seq(),
            p.cache
        );
        let cost = attention_fwd(b, h, hd, p.rows_per_seq(), p.cache, s, false);
        self.push("attention_fwd", "attention", shape, l, cost);
        self.gemm("attn out", l, (rows, d, d), false, false, true, "resid1");
        let cost = layernorm_fwd(rows, d, s, false, false);
        self.push("layernorm_fwd", "ln2", ln, l, cost);
        self.gemm("mlp0", l, (rows, 4 * d, d), true, true, false, "");
        self.gemm("mlp2", l, (rows, d, 4 * d), true, false, true, "resid2");
    }

    /// The final LayerNorm, the head GEMM and the read-off on the rows that need logits.
    fn head(&mut self, m: &ModelShape, p: &Pass) {
        let (d, v, s, b) = (m.d, m.vocab, self.s, p.batch);
        let r = b * p.head_rows;
        if !self.fused && p.head_rows < p.rows_per_seq() {
            // as built: the rows that need logits gathered first
            self.push(
                "strided_copy",
                "head rows",
                format!("{r} x {d}"),
                1,
                copy(r * d, s),
            );
        }
        let cost = layernorm_fwd(r, d, s, false, false);
        self.push("layernorm_fwd", "ln_f", format!("{r} x {d}"), 1, cost);
        self.gemm("head", 1, (r, v, d), true, false, false, "");
        if !self.fused {
            // as built: the reserved token's logit written by one strided copy of a value
            self.push(
                "strided_copy",
                "mask logit",
                format!("{r} rows"),
                1,
                copy(r, s),
            );
        }
        // fused, the reserved token's logit is skipped inside the read-off kernel (no launch)
        match p.readout {
            Readout::Sample => {
                let cost = sample_inverse_cdf(r, v, s);
                self.push(
                    "sample_inverse_cdf",
                    "sample",
                    format!("{r} x {v}"),
                    1,
                    cost,
                )
            }
            Readout::Argmax => {
                let shape = format!("B {b} x K {} x {v}", p.head_rows);
                let cost = argmax_penalty(b, p.head_rows, v, s);
                self.push("argmax_penalty", "read off", shape, 1, cost)
            }
            Readout::None => {}
        }
    }
}

/// Where a pass's time goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Memory,
    Compute,
    Launch,
}

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::Memory => "memory",
            Bound::Compute => "compute",
            Bound::Launch => "launch",
        }
    }
}

/// A pass's time, split into memory-bound kernel time, compute-bound kernel time and
/// overhead (launches + the per-pass host round trip).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PassTime {
    pub launches: usize,
    pub bytes: f64,
    pub flops: f64,
    pub weight_bytes: f64,
    pub mem_s: f64,
    pub comp_s: f64,
    pub overhead_s: f64,
    pub total_s: f64,
    pub bound: Bound,
}

/// Sums the calls of a pass under `mode`.
pub fn pass_time(calls: &[Call], gpu: &Gpu, mode: Mode) -> PassTime {
    let (mut mem, mut comp, mut bytes, mut flops, mut wb) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut launches = 0;
    for c in calls {
        let n = c.count as f64;
        let t = n * c.cost.roofline_s(gpu);
        if c.cost.memory_bound(gpu) {
            mem += t;
        } else {
            comp += t;
        }
        bytes += n * c.cost.bytes;
        flops += n * c.cost.flops;
        wb += n * c.cost.weight_bytes;
        launches += c.count;
    }
    let overhead = launches as f64 * mode.per_launch_s(gpu) + gpu.pass_host_s;
    let bound = if overhead >= mem && overhead >= comp {
        Bound::Launch
    } else if mem >= comp {
        Bound::Memory
    } else {
        Bound::Compute
    };
    PassTime {
        launches,
        bytes,
        flops,
        weight_bytes: wb,
        mem_s: mem,
        comp_s: comp,
        overhead_s: overhead,
        total_s: mem + comp + overhead,
        bound,
    }
}

/// The decoding scenario: prompt and generated lengths, the student's K.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Scenario {
    pub prompt: usize,
    pub max_new: usize,
    pub k: usize,
}

impl Scenario {
    /// The AR step at the end of the run: the cache holds prompt + max_new - 1 positions.
    pub fn ar_step(&self, batch: usize) -> Pass {
        Pass::ar_step(batch, self.prompt + self.max_new - 1)
    }
    /// The PFLM step at the end of the run: K committed + K hints after the cache, the
    /// last hint at position prompt + max_new - 1 (the same last position as the AR step).
    pub fn pflm_step(&self, batch: usize) -> Pass {
        let cache = (self.prompt + self.max_new).saturating_sub(2 * self.k);
        Pass::pflm_step(batch, self.k, self.k, cache)
    }
    /// Every pass of `kfrun generate` for AR (model/src/generate.rs): a prefill of the
    /// prompt sampling from its last row, then max_new - 1 one-row steps.
    pub fn ar_run(&self, batch: usize) -> Vec<Pass> {
        let mut v = vec![Pass {
            batch,
            tokens: self.prompt,
            hints: 0,
            cache: 0,
            head_rows: 1,
            readout: Readout::Sample,
        }];
        v.extend(
            (0..self.max_new.saturating_sub(1)).map(|j| Pass::ar_step(batch, self.prompt + j)),
        );
        v
    }
    /// Every pass of `generate_pflm` (model/src/pflm.rs): a prefill of all but the prompt's
    /// last token, then steps of [pending tokens | K hints] (the prompt's last token on
    /// step 1, the K tokens of the previous step after that).
    pub fn pflm_run(&self, batch: usize) -> Vec<Pass> {
        let mut v = Vec::new();
        let mut cache = 0;
        if self.prompt > 1 {
            v.push(Pass {
                batch,
                tokens: self.prompt - 1,
                hints: 0,
                cache: 0,
                head_rows: 0,
                readout: Readout::None,
            });
            cache = self.prompt - 1;
        }
        let (mut pending, mut g) = (1, 0);
        while g < self.max_new {
            let kk = self.k.min(self.max_new - g);
            v.push(Pass::pflm_step(batch, pending, kk, cache));
            cache += pending;
            pending = kk;
            g += kk;
        }
        v
    }
}

/// One summary row: the two steps and the two whole runs at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub batch: usize,
    pub ar_step: PassTime,
    pub pflm_step: PassTime,
    pub ar_tokens_per_s: f64,
    pub pflm_tokens_per_s: f64,
    pub speedup: f64,
    /// The whole `prompt + max_new` run (prefill and growing context included).
    pub ar_run_s: f64,
    pub pflm_run_s: f64,
    pub run_speedup: f64,
}

/// Summary rows for `batches` under `mode`.
pub fn summary(
    m: &ModelShape,
    prec: Precision,
    gpu: &Gpu,
    mode: Mode,
    sc: &Scenario,
    batches: &[usize],
) -> Vec<Row> {
    let time = |p: &Pass| pass_time(&forward_pass(m, prec, mode.fused, p), gpu, mode);
    batches
        .iter()
        .map(|&b| {
            let ar = time(&sc.ar_step(b));
            let pf = time(&sc.pflm_step(b));
            let ar_tps = b as f64 / ar.total_s;
            let pf_tps = (b * sc.k) as f64 / pf.total_s;
            let ar_run: f64 = sc.ar_run(b).iter().map(|p| time(p).total_s).sum();
            let pf_run: f64 = sc.pflm_run(b).iter().map(|p| time(p).total_s).sum();
            Row {
                batch: b,
                ar_step: ar,
                pflm_step: pf,
                ar_tokens_per_s: ar_tps,
                pflm_tokens_per_s: pf_tps,
                speedup: pf_tps / ar_tps,
                ar_run_s: ar_run,
                pflm_run_s: pf_run,
                run_speedup: ar_run / pf_run,
            }
        })
        .collect()
}

// ---------------------------------------------------------------- the command

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Model preset: paper (12 layers, d 768, 12 heads, V 30522), small or tiny.
    #[arg(long, default_value = "paper")]
    arch: String,
    /// Storage dtype: bf16, f16, f32 (SGEMM) or tf32 (f32 storage, TF32 GEMMs).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// The PFLM's tokens per step.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    batches: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 6)]
    prompt_len: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 32)]
    max_new: usize,
    /// Batch sizes of the per-kernel tables, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    kernel_batches: Vec<usize>,
    /// Write every number (constants, summary rows, per-kernel calls) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn us(s: f64) -> String {
    format!("{:.2}", s * 1e6)
}

fn si(x: f64) -> String {
    let a = x.abs();
    if a >= 1e12 {
        format!("{:.2} T", x / 1e12)
    } else if a >= 1e9 {
        format!("{:.2} G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0} ")
    }
}

fn kernel_table(title: &str, calls: &[Call], gpu: &Gpu, mode: Mode) -> String {
    let mut s = format!(
        "\n{title}\n\n| kernel | role | shape | calls | bytes/call | FLOPs/call | FLOP/B | roofline us/call | bound | us total (with launches) |\n|---|---|---|---:|---:|---:|---:|---:|---|---:|\n"
    );
    for c in calls {
        let r = c.cost.roofline_s(gpu);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {}B | {}FLOP | {:.1} | {} | {} | {} |\n",
            c.kernel,
            c.role,
            c.shape,
            c.count,
            si(c.cost.bytes),
            si(c.cost.flops),
            c.cost.intensity(),
            us(r),
            if c.cost.memory_bound(gpu) {
                "memory"
            } else {
                "compute"
            },
            us(c.count as f64 * (r + mode.per_launch_s(gpu)))
        ));
    }
    let t = pass_time(calls, gpu, mode);
    s.push_str(&format!(
        "\nTotal: {} launches, {}B ({}B of weights), {}FLOP; memory-bound kernels {} us, compute-bound {} us, overhead {} us ({} per launch + {} per pass) = **{} us**, {}-bound.\n",
        t.launches,
        si(t.bytes),
        si(t.weight_bytes),
        si(t.flops),
        us(t.mem_s),
        us(t.comp_s),
        us(t.overhead_s),
        us(mode.per_launch_s(gpu)),
        us(gpu.pass_host_s),
        us(t.total_s),
        t.bound.name()
    ));
    s
}

fn summary_table(rows: &[Row], k: usize, mode: Mode) -> String {
    let mut s = format!(
        "\n{}\n\n| batch | AR tokens/s | PFLM K={k} tokens/s | speedup | bound AR / PFLM | whole-run speedup |\n|---:|---:|---:|---:|---|---:|\n",
        mode.label()
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2}x | {} / {} | {:.2}x |\n",
            r.batch,
            r.ar_tokens_per_s,
            r.pflm_tokens_per_s,
            r.speedup,
            r.ar_step.bound.name(),
            r.pflm_step.bound.name(),
            r.run_speedup
        ));
    }
    s
}

/// Each kernel family once at a reference shape of the model (training at `b_train`
/// sequences of `t_train` tokens, decoding at batch 64).
pub fn family_calls(m: &ModelShape, prec: Precision, n_params: usize) -> Vec<Call> {
    let s = prec.bytes();
    let (d, h, hd, v) = (m.d, m.heads, m.head_dim(), m.vocab);
    let (bt, t) = (8usize, 1024usize);
    let r = bt * t;
    let call = |kernel: &'static str, role: &'static str, shape: String, cost: Cost| Call {
        kernel,
        role,
        shape,
        count: 1,
        cost,
    };
    let none = Epilogue::default();
    vec![
        call(
            "embedding_fwd",
            "train",
            format!("{r} ids, d {d}"),
            embedding_fwd(r, d, s),
        ),
        call(
            "embedding_bwd",
            "train",
            format!("{r} ids, V {v}, d {d}"),
            embedding_bwd(r, v, d, s),
        ),
        call(
            "layernorm_fwd",
            "train",
            format!("{r} x {d}"),
            layernorm_fwd(r, d, s, false, true),
        ),
        call(
            "layernorm_bwd",
            "train",
            format!("{r} x {d}"),
            layernorm_bwd(r, d, s, false),
        ),
        call(
            "rope",
            "train (q or k)",
            format!("{r} x {h} x {hd}"),
            rope(r, h, hd, s),
        ),
        call(
            "rope_qk_cache",
            "decode B 64",
            format!("64 x 3 x {h} x {hd}"),
            rope_qk_cache(64, h, hd, s),
        ),
        call(
            "gelu_tanh_fwd",
            "train",
            format!("{r} x {}", 4 * d),
            gelu_tanh_fwd(r * 4 * d, s),
        ),
        call(
            "gelu_bwd",
            "train",
            format!("{r} x {}", 4 * d),
            gelu_bwd(r * 4 * d, s),
        ),
        call(
            "gelu_erf_fwd",
            "noise enc B 64 K 4",
            format!("256 x {}", 4 * d),
            gelu_erf_fwd(256 * 4 * d, s),
        ),
        call(
            "bias_add",
            "train",
            format!("{r} x {}", 4 * d),
            bias_add(r, 4 * d, s),
        ),
        call("add", "train", format!("{r} x {d}"), add(r * d, s)),
        call(
            "softmax_fwd",
            "logits B 64",
            format!("64 x {v}"),
            softmax_fwd(64, v, s),
        ),
        call(
            "softmax_bwd",
            "logits B 64",
            format!("64 x {v}"),
            softmax_bwd(64, v, s),
        ),
        call(
            "attention_fwd",
            "train prefill",
            format!("B {bt}, T {t}, H {h}, D {hd}"),
            attention_fwd(bt, h, hd, t, 0, s, true),
        ),
        call(
            "attention_bwd",
            "train",
            format!("B {bt}, T {t}, H {h}, D {hd}"),
            attention_bwd(bt, h, hd, t, s),
        ),
        call(
            "attention_fwd",
            "decode AR B 64",
            format!("B 64, 1 q row, 37 cached, H {h}, D {hd}"),
            attention_fwd(64, h, hd, 1, 37, s, false),
        ),
        call(
            "attention_fwd",
            "decode PFLM B 64",
            format!("B 64, 8 q rows, 30 cached, H {h}, D {hd}"),
            attention_fwd(64, h, hd, 8, 30, s, false),
        ),
        call(
            "cross_entropy",
            "train",
            format!("{r} x {v}"),
            cross_entropy(r, v, s),
        ),
        call(
            "sample_inverse_cdf",
            "AR B 64",
            format!("64 x {v}"),
            sample_inverse_cdf(64, v, s),
        ),
        call(
            "argmax_penalty",
            "PFLM B 64 K 4",
            format!("64 x 4 x {v}"),
            argmax_penalty(64, 4, v, s),
        ),
        call(
            "noise_features",
            "PFLM B 64 K 4",
            format!("256 x {}", 2 * d),
            noise_features(256, d, s),
        ),
        call(
            "adamw",
            "train",
            format!("{n_params} params"),
            adamw(n_params, s),
        ),
        call(
            "gemm",
            "train mlp0",
            format!("{r}x{d} . {d}x{}", 4 * d),
            gemm(r, 4 * d, d, s, prec.gemm_unit(), none),
        ),
        call(
            "gemm",
            "train head",
            format!("{r}x{d} . {d}x{v}"),
            gemm(r, v, d, s, prec.gemm_unit(), none),
        ),
        call(
            "gemm",
            "decode qkv B 1",
            format!("1x{d} . {d}x{}", 3 * d),
            gemm(1, 3 * d, d, s, prec.gemm_unit(), none),
        ),
    ]
}

fn family_table(calls: &[Call], gpu: &Gpu) -> String {
    let mut s = String::from(
        "\n| kernel | case | shape | bytes | FLOPs | FLOP/B | unit | roofline us | bound |\n|---|---|---|---:|---:|---:|---|---:|---|\n",
    );
    for c in calls {
        s.push_str(&format!(
            "| {} | {} | {} | {}B | {}FLOP | {:.1} | {:?} | {} | {} |\n",
            c.kernel,
            c.role,
            c.shape,
            si(c.cost.bytes),
            si(c.cost.flops),
            c.cost.intensity(),
            c.cost.unit,
            us(c.cost.roofline_s(gpu)),
            if c.cost.memory_bound(gpu) {
                "memory"
            } else {
                "compute"
            }
        ));
    }
    s
}

/// The modes the command prints, the first being the per-kernel tables' mode.
pub const MODES: [Mode; 3] = [
    Mode {
        launch: Launch::Graph,
        fused: false,
    },
    Mode {
        launch: Launch::Stream,
        fused: false,
    },
    Mode {
        launch: Launch::Graph,
        fused: true,
    },
];

pub fn run(a: &Args) -> Result<()> {
    ensure!(a.k >= 1, "--k must be at least 1");
    ensure!(a.prompt_len >= 1, "--prompt-len must be at least 1");
    ensure!(a.max_new >= 1, "--max-new must be at least 1");
    ensure!(
        !a.batches.is_empty() && a.batches.iter().chain(&a.kernel_batches).all(|&b| b >= 1),
        "--batches and --kernel-batches must list sizes >= 1"
    );
    ensure!(
        2 * a.k <= a.prompt_len + a.max_new,
        "--k {} needs 2K <= prompt + max_new positions",
        a.k
    );
    let cfg = DditConfig::preset(&a.arch)?;
    let prec = Precision::parse(&a.dtype)?;
    let m = ModelShape::from_config(&cfg);
    let gpu = Gpu::h100_sxm();
    let sc = Scenario {
        prompt: a.prompt_len,
        max_new: a.max_new,
        k: a.k,
    };
    let mut text = format!(
        "# GPU cost model: {} ({} layers, d {}, {} heads, V {}, {:.1} M parameters), {:?} storage, f32 accumulation, on an {}\n\nConstants: HBM {:.2} TB/s peak x {} achievable = {:.2} TB/s; dense tensor f16/bf16 {:.1} TFLOP/s, TF32 {:.1}, FP32 {:.1}, FP64 {:.1}, x {} achievable; {} SMs, one SM streams {:.0} GB/s alone; launch {} us per kernel on a stream, {} us per CUDA graph node, {} us per pass (tokens to the host, sync, next inputs up).\nScenario: prompt {} + {} generated tokens; AR step = 1 row after {} cached positions; PFLM step = {} committed + {} hints after {} cached (the last steps of the run).\n",
        a.arch,
        m.layers,
        m.d,
        m.heads,
        m.vocab,
        cfg.n_params() as f64 / 1e6,
        prec,
        gpu.name,
        gpu.hbm_peak / 1e12,
        gpu.bw_frac,
        gpu.bandwidth() / 1e12,
        gpu.tensor16 / 1e12,
        gpu.tf32 / 1e12,
        gpu.fp32 / 1e12,
        gpu.fp64 / 1e12,
        gpu.flop_frac,
        gpu.sms,
        gpu.sm_bytes_s / 1e9,
        us(gpu.launch_s),
        us(gpu.graph_node_s),
        us(gpu.pass_host_s),
        sc.prompt,
        sc.max_new,
        sc.ar_step(1).cache,
        sc.k,
        sc.k,
        sc.pflm_step(1).cache,
    );
    let mut modes_json = Vec::new();
    text.push_str("\n## Predicted tokens/s, AR vs PFLM\n");
    for mode in MODES {
        let rows = summary(&m, prec, &gpu, mode, &sc, &a.batches);
        text.push_str(&summary_table(&rows, a.k, mode));
        modes_json.push(serde_json::json!({ "mode": mode, "label": mode.label(), "rows": rows }));
    }
    let mode = MODES[0];
    text.push_str(&format!(
        "\n## Per-kernel cost of one step ({})\n",
        mode.label()
    ));
    let mut kernels_json = Vec::new();
    for &b in &a.kernel_batches {
        for (name, pass) in [("AR", sc.ar_step(b)), ("PFLM", sc.pflm_step(b))] {
            let calls = forward_pass(&m, prec, mode.fused, &pass);
            let title = format!(
                "### {name} step, batch {b} (rows per sequence: {}, cached positions: {})",
                pass.rows_per_seq(),
                pass.cache
            );
            text.push_str(&kernel_table(&title, &calls, &gpu, mode));
            kernels_json.push(serde_json::json!({
                "step": name, "batch": b, "pass": pass,
                "time": pass_time(&calls, &gpu, mode), "calls": calls,
            }));
        }
    }
    let fam = family_calls(&m, prec, cfg.n_params());
    text.push_str(
        "\n## Every kernel family once, at a reference shape (training: 8 x 1024 tokens)\n",
    );
    text.push_str(&family_table(&fam, &gpu));
    print!("{text}");
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "arch": a.arch, "config": cfg, "precision": prec, "gpu": gpu, "scenario": sc,
            "transc_flops": TRANSC, "transc_f64_flops": TRANSC_F64,
            "modes": modes_json, "kernels": kernels_json, "families": fam,
        });
        kf_engine::fs::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())?;
        eprintln!("kfrun bench cost: wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn paper() -> (DditConfig, ModelShape) {
        let cfg = DditConfig::preset("paper").unwrap();
        let m = ModelShape::from_config(&cfg);
        (cfg, m)
    }
    const GRAPH: Mode = Mode {
        launch: Launch::Graph,
        fused: false,
    };
    fn sc() -> Scenario {
        Scenario {
            prompt: 6,
            max_new: 32,
            k: 4,
        }
    }

    #[test]
    fn cost_gemm_bytes_and_flops_of_known_shapes() {
        let c = gemm(1, 768, 768, 2.0, Unit::Tensor16, Epilogue::default());
        assert_eq!(c.flops, 2.0 * 768.0 * 768.0);
        assert_eq!(c.bytes, 2.0 * (768.0 + 768.0 * 768.0 + 768.0));
        assert_eq!(c.weight_bytes, 2.0 * 768.0 * 768.0);
        let c = gemm(64, 3072, 768, 4.0, Unit::Fp32, Epilogue::default());
        assert_eq!(c.flops, 2.0 * 64.0 * 3072.0 * 768.0);
        assert_eq!(
            c.bytes,
            4.0 * (64.0 * 768.0 + 768.0 * 3072.0 + 64.0 * 3072.0)
        );
        // the epilogue adds the bias vector and the residual read
        let e = Epilogue {
            bias: true,
            gelu: false,
            residual: true,
        };
        let f = gemm(64, 3072, 768, 4.0, Unit::Fp32, e);
        assert_eq!(f.bytes - c.bytes, 4.0 * (3072.0 + 64.0 * 3072.0));
        assert_eq!(f.weight_bytes, 4.0 * (768.0 * 3072.0 + 3072.0));
    }

    #[test]
    fn cost_roofline_is_max_of_memory_and_compute() {
        let gpu = Gpu::h100_sxm();
        // GEMV: memory time = bytes / (3.35e12 * 0.8)
        let c = gemm(1, 768, 768, 2.0, Unit::Tensor16, Epilogue::default());
        assert!((c.roofline_s(&gpu) - c.bytes / 2.68e12).abs() < 1e-15);
        assert!(c.memory_bound(&gpu));
        // a large square GEMM: compute time = flops / (989.4e12 * 0.7)
        let c = gemm(8192, 8192, 8192, 2.0, Unit::Tensor16, Epilogue::default());
        assert!(!c.memory_bound(&gpu));
        let want = c.flops / (989.4e12 * 0.7);
        assert!((c.roofline_s(&gpu) - want).abs() < 1e-9 * want);
        // a one-block kernel streams at one SM's rate, and computes at 1/132 of the GPU
        let one = softmax_fwd(1, 30522, 2.0);
        assert!((one.mem_s(&gpu) - one.bytes / 80e9).abs() < 1e-15);
        assert!((one.comp_s(&gpu) - one.flops * 132.0 / (66.9e12 * 0.7)).abs() < 1e-15);
        // 16 rows: 16 SMs at 80 GB/s stay under the HBM limit, the same time as one row;
        // 64 rows would pull 5.1 TB/s, so HBM binds
        let few = softmax_fwd(16, 30522, 2.0);
        assert!((few.mem_s(&gpu) - one.mem_s(&gpu)).abs() < 1e-15);
        let many = softmax_fwd(64, 30522, 2.0);
        assert!((many.mem_s(&gpu) - many.bytes / 2.68e12).abs() < 1e-15);
    }

    #[test]
    fn cost_attention_counts_causal_scores() {
        // AR decode: 1 row after 37 cached sees 38 keys
        assert_eq!(attention_scores(1, 37), 38.0);
        // 8 rows after 30 cached: 31 + 32 + ... + 38
        assert_eq!(attention_scores(8, 30), (31..=38).sum::<usize>() as f64);
        // prefill of T rows: T (T + 1) / 2
        assert_eq!(attention_scores(1024, 0), 1024.0 * 1025.0 / 2.0);
        let c = attention_fwd(2, 12, 64, 1, 37, 2.0, false);
        assert_eq!(c.flops, 2.0 * 12.0 * 38.0 * (4.0 * 64.0 + 4.0 + TRANSC));
        // q + o, and the 38 keys and values of each sequence
        assert_eq!(
            c.bytes,
            2.0 * 2.0 * 768.0 * 2.0 + 2.0 * 38.0 * 2.0 * 768.0 * 2.0
        );
        // 130 prefill rows span three query tiles, each reading the keys its last row sees
        let p = attention_fwd(1, 1, 64, 130, 0, 2.0, false);
        let kv_rows = 64.0 + 128.0 + 130.0;
        assert_eq!(
            p.bytes,
            2.0 * 130.0 * 64.0 * 2.0 + kv_rows * 2.0 * 64.0 * 2.0
        );
    }

    /// The GEMMs, biases and norms of one AR step read every parameter but the embedding
    /// table exactly once: checked against the model's own parameter count.
    #[test]
    fn cost_ar_step_reads_every_weight_once() {
        let (cfg, m) = paper();
        for fused in [false, true] {
            let calls = forward_pass(&m, Precision::Bf16, fused, &Pass::ar_step(1, 37));
            let w: f64 = calls
                .iter()
                .map(|c| c.count as f64 * c.cost.weight_bytes)
                .sum();
            let want = 2.0 * (cfg.n_params() - cfg.vocab_size * cfg.d_model) as f64;
            assert_eq!(w, want, "fused {fused}");
        }
        // the PFLM step also reads the noise encoder, counted by kf_model's parameter specs
        // (10 d^2 + 8 d: its LayerNorm has a bias)
        let d = cfg.d_model;
        let noise: usize = kf_model::pflm::noise_param_specs(d)
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum();
        let calls = forward_pass(&m, Precision::Bf16, false, &Pass::pflm_step(1, 4, 4, 30));
        let w: f64 = calls
            .iter()
            .map(|c| c.count as f64 * c.cost.weight_bytes)
            .sum();
        assert_eq!(
            w,
            2.0 * (cfg.n_params() - cfg.vocab_size * d + noise) as f64
        );
    }

    /// Launch counts per kernel of one decode step on the emulator (`kf_engine::emu::counts`,
    /// the difference between generating three and two steps' tokens), named as the cost
    /// model names them: the dtype / element-size suffix dropped, the attention entries as
    /// `attention_fwd`, device copies as `copy`.
    fn emulated_step(
        cfg: &DditConfig,
        batch: usize,
        pflm_k: Option<usize>,
    ) -> BTreeMap<String, u64> {
        use kf_engine::{no_grad, Device};
        use kf_model::generate::{generate, GenerateOptions};
        use kf_model::pflm::{generate_pflm, Pflm, PflmGenerateOptions};
        let _g = no_grad();
        let teacher = kf_model::Ddit::init(cfg, 3).unwrap();
        let prompts: Vec<Vec<u32>> = (0..batch).map(|i| vec![i as u32 + 1, 7, 9]).collect();
        let run = |steps: usize| -> kf_engine::emu::Counts {
            let base = GenerateOptions {
                max_new: steps * pflm_k.unwrap_or(1),
                tau: 0.8,
                seed: 2,
                use_cache: true,
                ..Default::default()
            };
            if let Some(k) = pflm_k {
                let student = Pflm::from_teacher(teacher.clone(), k, 4).unwrap();
                let dev = student.to_device(Device::Emu).unwrap();
                let opts = PflmGenerateOptions {
                    base,
                    k,
                    freq_penalty: 0.5,
                };
                kf_engine::emu::reset_counts();
                generate_pflm(&dev, &prompts, &opts, |_, _| Ok(())).unwrap();
            } else {
                let dev = teacher.to_device(Device::Emu).unwrap();
                kf_engine::emu::reset_counts();
                generate(&dev, &prompts, &base, |_, _| Ok(())).unwrap();
            }
            kf_engine::emu::counts()
        };
        // steps 2 and 3 (the first pass's cache shape can differ: with one token to make,
        // the last one needs no KV row)
        let (one, two) = (run(2), run(3));
        let mut out = BTreeMap::new();
        for (e, n) in &two.by_entry {
            let n = n - one.by_entry.get(e).copied().unwrap_or(0);
            let name = if e.starts_with("attn_") {
                "attention_fwd".to_string()
            } else if e == "gelu_erf_f32" {
                "gelu_erf_fwd".to_string()
            } else {
                e.rsplit_once('_').map_or(e.clone(), |(a, _)| a.to_string())
            };
            if n > 0 {
                *out.entry(name).or_default() += n;
            }
        }
        if two.copies > one.copies {
            out.insert("copy".to_string(), two.copies - one.copies);
        }
        out
    }

    /// The as-built plan is what the engine launches: an AR and a PFLM K = 4 decode step of a
    /// small model on the emulator, kernel for kernel (a change to either side that the other
    /// does not follow fails here).
    #[test]
    fn the_as_built_plan_is_what_the_emulator_launches() {
        let mut cfg = DditConfig::preset("tiny").unwrap();
        cfg.n_layers = 2;
        cfg.d_model = 128;
        cfg.n_heads = 2;
        cfg.vocab_size = 97;
        cfg.max_seq_len = 64;
        cfg.mask_token_id = Some(96);
        cfg.eos_token_id = None;
        let m = ModelShape::from_config(&cfg);
        let planned = |p: &Pass| {
            let mut out: BTreeMap<String, u64> = BTreeMap::new();
            for c in forward_pass(&m, Precision::F32, false, p) {
                *out.entry(c.kernel.to_string()).or_default() += c.count as u64;
            }
            out
        };
        let b = 3;
        // AR: prompts of 3, the second step after 4 cached positions
        assert_eq!(
            emulated_step(&cfg, b, None),
            planned(&Pass::ar_step(b, 4)),
            "AR step"
        );
        assert_eq!(
            emulated_step(&cfg, b, Some(4)),
            planned(&Pass::pflm_step(b, 4, 4, 7)),
            "PFLM K = 4 step"
        );
    }

    #[test]
    fn cost_launch_counts() {
        let (_, m) = paper();
        let n = |fused, p: &Pass| -> usize {
            forward_pass(&m, Precision::Bf16, fused, p)
                .iter()
                .map(|c| c.count)
                .sum()
        };
        // as built: embedding, RoPE tables, 14 per block (LN, qkv GEMM, 2 RoPE, 2 KV appends,
        // attention, residual copy, out GEMM, LN, GEMM, bias + GELU, residual + bias, GEMM),
        // then ln_f, head GEMM, bias, the mask logit, sampler
        assert_eq!(n(false, &Pass::ar_step(1, 37)), 2 + 12 * 14 + 5);
        // fused: 8 per block, the head bias in the GEMM
        assert_eq!(n(true, &Pass::ar_step(1, 37)), 1 + 12 * 8 + 3);
        // PFLM as built adds the noise encoder (features, 3 GEMMs, 3 bias adds, LN, GELU),
        // two copies joining token and hint rows and the head rows' gather
        assert_eq!(
            n(false, &Pass::pflm_step(1, 4, 4, 30)),
            2 + 9 + 2 + 12 * 14 + 6
        );
        // fused: features, 3 GEMMs (bias and residual in the epilogue), LN, GELU (erf)
        assert_eq!(n(true, &Pass::pflm_step(1, 4, 4, 30)), 1 + 6 + 12 * 8 + 3);
    }

    /// At batch 1 the kernels are memory-bound (every GEMM, and the step's kernel time),
    /// and the batch-1 step is dominated by fixed overhead even with a CUDA graph.
    #[test]
    fn cost_batch1_step_is_memory_bound() {
        let (_, m) = paper();
        let gpu = Gpu::h100_sxm();
        for pass in [sc().ar_step(1), sc().pflm_step(1)] {
            let calls = forward_pass(&m, Precision::Bf16, false, &pass);
            for c in calls.iter().filter(|c| c.kernel == "gemm") {
                assert!(c.cost.memory_bound(&gpu), "{c:?}");
            }
            let t = pass_time(&calls, &gpu, GRAPH);
            assert!(t.mem_s > 10.0 * t.comp_s, "{t:?}");
            // reading ~218 MB of bf16 weights at 2.68 TB/s takes ~81 us
            assert!(t.mem_s > 0.95 * t.weight_bytes / gpu.bandwidth(), "{t:?}");
            assert_eq!(t.bound, Bound::Launch, "{t:?}");
        }
        // without launch overhead, batch-256 PFLM's GEMMs are compute-bound
        let calls = forward_pass(&m, Precision::Bf16, false, &sc().pflm_step(256));
        for c in calls
            .iter()
            .filter(|c| c.kernel == "gemm" && c.role != "noise proj")
        {
            assert!(!c.cost.memory_bound(&gpu), "{c:?}");
        }
    }

    #[test]
    fn cost_monotone_in_batch_and_speedup_bounded() {
        let (_, m) = paper();
        let gpu = Gpu::h100_sxm();
        let batches = [1, 2, 4, 8, 16, 32, 64, 128, 256];
        for mode in MODES {
            for prec in [Precision::Bf16, Precision::F32] {
                let rows = summary(&m, prec, &gpu, mode, &sc(), &batches);
                for w in rows.windows(2) {
                    let (a, b) = (&w[0], &w[1]);
                    // more sequences: each step takes longer, but more tokens per second
                    assert!(b.ar_step.total_s > a.ar_step.total_s);
                    assert!(b.pflm_step.total_s > a.pflm_step.total_s);
                    assert!(b.ar_tokens_per_s > a.ar_tokens_per_s);
                    assert!(b.pflm_tokens_per_s > a.pflm_tokens_per_s);
                    // and PFLM's advantage shrinks as the GEMMs turn compute-bound
                    assert!(b.speedup <= a.speedup * (1.0 + 1e-9), "{mode:?} {prec:?}");
                }
                for r in &rows {
                    // a PFLM step does more work than an AR step, and yields at most K tokens
                    assert!(r.pflm_step.total_s > r.ar_step.total_s);
                    assert!(r.speedup > 0.0 && r.speedup < 4.0, "{r:?}");
                    assert!(r.run_speedup > 0.0 && r.run_speedup < 4.0, "{r:?}");
                }
            }
        }
    }

    #[test]
    fn cost_generation_runs_match_the_engine_loops() {
        let s = sc();
        // AR: prefill of 6, then 31 steps with the cache growing from 6 to 36
        let ar = s.ar_run(1);
        assert_eq!(ar.len(), 32);
        assert_eq!((ar[0].tokens, ar[0].cache), (6, 0));
        assert_eq!(ar.last().unwrap().cache, 36);
        // PFLM K=4: prefill of 5, then 8 steps: [1 | 4 hints], then [4 | 4 hints]
        let pf = s.pflm_run(1);
        assert_eq!(pf.len(), 1 + 8);
        assert_eq!((pf[0].tokens, pf[0].readout), (5, Readout::None));
        assert_eq!((pf[1].tokens, pf[1].hints, pf[1].cache), (1, 4, 5));
        assert_eq!((pf[2].tokens, pf[2].hints, pf[2].cache), (4, 4, 6));
        assert_eq!(pf.last().unwrap().cache, 6 + 24);
        let hints: usize = pf.iter().map(|p| p.hints).sum();
        assert_eq!(hints, 32);
        // a window that does not divide max_new: the last step has fewer hints
        let odd = Scenario {
            prompt: 1,
            max_new: 6,
            k: 4,
        }
        .pflm_run(2);
        assert_eq!(odd.len(), 2);
        assert_eq!((odd[1].tokens, odd[1].hints), (4, 2));
        // the step model's last hint sits where the run's last one does
        let p = s.pflm_step(1);
        assert_eq!(p.cache + p.rows_per_seq(), 38);
        assert_eq!(s.ar_step(1).cache + 1, 38);
    }

    #[test]
    fn cost_fusion_and_graphs_only_help() {
        let (_, m) = paper();
        let gpu = Gpu::h100_sxm();
        for b in [1, 64, 256] {
            for pass in [sc().ar_step(b), sc().pflm_step(b)] {
                let t = |fused, launch| {
                    pass_time(
                        &forward_pass(&m, Precision::Bf16, fused, &pass),
                        &gpu,
                        Mode { launch, fused },
                    )
                };
                let (s0, g0, g1) = (
                    t(false, Launch::Stream),
                    t(false, Launch::Graph),
                    t(true, Launch::Graph),
                );
                assert!(g0.total_s < s0.total_s);
                assert!(g1.total_s < g0.total_s);
                assert!(g1.bytes < g0.bytes);
                // fusion moves the epilogues, it does not drop FLOPs or weights
                assert!((g1.weight_bytes - g0.weight_bytes).abs() < 1.0);
                assert!(g1.flops > 0.99 * g0.flops && g1.flops < 1.01 * g0.flops);
            }
        }
    }

    #[test]
    fn cost_every_family_has_positive_costs() {
        let (cfg, m) = paper();
        let gpu = Gpu::h100_sxm();
        for prec in [
            Precision::Bf16,
            Precision::F16,
            Precision::F32,
            Precision::F32Tf32,
        ] {
            let fam = family_calls(&m, prec, cfg.n_params());
            let mut names: Vec<&str> = fam.iter().map(|c| c.kernel).collect();
            names.sort();
            names.dedup();
            assert!(names.len() >= 20, "{names:?}");
            for c in &fam {
                assert!(c.cost.bytes > 0.0 && c.cost.roofline_s(&gpu) > 0.0, "{c:?}");
            }
        }
        // f32 storage moves twice the bytes of bf16 for a streaming kernel
        assert_eq!(add(1000, 4.0).bytes, 2.0 * add(1000, 2.0).bytes);
        assert!(Precision::parse("fp8").is_err());
    }
}
