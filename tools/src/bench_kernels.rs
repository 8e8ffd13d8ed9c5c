//! `kfrun bench kernels --device cuda|emu`: achieved GB/s and GFLOP/s per kernel family on a
//! kernel device, next to the device's measured copy bandwidth and GEMM rate (cuBLAS on a GPU).
//! Each kernel runs through the same launchers the model uses (`kf_ops::kdev::launch`); time is
//! the median of `--runs` calls, each followed by a device synchronize; bytes and FLOPs per call
//! are the cost model's (tools/src/cost_model.rs: each operand moved once), so "GB/s" is the
//! useful traffic a call achieves, comparable with the copy bandwidth. On the emulator
//! (`--device emu`, the CUDA sources run on the CPU with bounds and race checks) the numbers only
//! show that every path runs; a GPU gives the real ones.

use crate::cost_model::{self as cm, Cost};
use anyhow::{bail, ensure, Context, Result};
use clap::Args as ClapArgs;
use kf_engine::DType;
use kf_ops::attention::{AttnParams, AttnPattern};

use kf_ops::kdev::launch::{self as kl, AttnDims, AttnPath, AttnView};
use kf_ops::kdev::{DTensor, GemmSpec, KernelDevice};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Kernel device: emu (the CPU emulator of the CUDA kernels) or cuda / cuda:N (a build with
    /// the cuda feature and a GPU).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Shapes: paper (B 8 x T 512, d 768, 12 heads of 64, V 50257; the GPU default) or tiny
    /// (B 2 x T 64, d 128, 2 heads of 64, V 512; the emulator default).
    #[arg(long)]
    size: Option<String>,
    /// Timed calls per kernel (median reported), after one warm-up call.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The shapes of one benchmark run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Size {
    pub name: &'static str,
    pub batch: usize,
    pub seq: usize,
    pub d: usize,
    pub heads: usize,
    pub vocab: usize,
    /// Bytes of the copy-bandwidth probe.
    pub copy_bytes: usize,
    /// m = n = k of the GEMM-rate probe.
    pub gemm: usize,
}

impl Size {
    pub fn paper() -> Size {
        Size {
            name: "paper",
            batch: 8,
            seq: 512,
            d: 768,
            heads: 12,
            vocab: 50257,
            copy_bytes: 1 << 30,
            gemm: 4096,
        }
    }
    pub fn tiny() -> Size {
        Size {
            name: "tiny",
            batch: 2,
            seq: 64,
            d: 128,
            heads: 2,
            vocab: 512,
            copy_bytes: 1 << 20,
            gemm: 128,
        }
    }
    fn parse(s: &str) -> Result<Size> {
        match s {
            "paper" => Ok(Size::paper()),
            "tiny" => Ok(Size::tiny()),
            o => bail!("--size {o}: expected paper or tiny"),
        }
    }
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// One benchmarked call.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub family: &'static str,
    pub kernel: String,
    pub shape: String,
    pub median_us: f64,
    pub bytes: f64,
    pub flops: f64,
    pub gb_s: f64,
    pub gflop_s: f64,
    /// Achieved GB/s over the device's measured copy bandwidth.
    pub of_copy_bw: f64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub size: Size,
    pub runs: usize,
    pub copy_gb_s: f64,
    pub gemm_gflop_s: f64,
    pub rows: Vec<Row>,
}

/// Median wall time (s) of `runs` calls of `f`, each synchronised, after one warm-up call.
fn time<D: KernelDevice + ?Sized>(
    dev: &D,
    runs: usize,
    f: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Deterministic f32 values in [-1, 1) (no RNG state to carry: a hash of the index).
fn values(n: usize, salt: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i ^ salt.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
            let h = (h ^ (h >> 13)).wrapping_mul(0xc2b2_ae35);
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// Runs every family on `dev` with shapes `sz`.
pub fn bench<D: KernelDevice + ?Sized>(dev: &D, sz: Size, runs: usize) -> Result<Report> {
    ensure!(runs >= 1, "--runs must be at least 1");
    ensure!(
        sz.d.is_multiple_of(sz.heads) && matches!(sz.d / sz.heads, 64 | 128),
        "head dim {} has no attention kernel (64 or 128)",
        sz.d / sz.heads
    );
    let (copy_gb_s, gemm_gflop_s) = device_probes(dev, sz.copy_bytes, sz.gemm)?;
    let mut bn = Bencher {
        dev,
        runs,
        copy_gb_s,
        rows: Vec::new(),
    };
    pointwise(&mut bn, &sz)?;
    attention(&mut bn, &sz)?;
    norm_backward(&mut bn, &sz)?;
    decode_products(&mut bn, &sz)?;
    loss_and_optimizer(&mut bn, &sz)?;
    vocab_rows(&mut bn, &sz)?;
    block_gemm(&mut bn, &sz)?;
    Ok(Report {
        device: dev.name(),
        size: sz,
        runs,
        copy_gb_s,
        gemm_gflop_s,
        rows: bn.rows,
    })
}

/// The timed rows of one run, with what timing them needs.
struct Bencher<'a, D: KernelDevice + ?Sized> {
    dev: &'a D,
    runs: usize,
    copy_gb_s: f64,
    rows: Vec<Row>,
}

impl<D: KernelDevice + ?Sized> Bencher<'_, D> {
    /// A device tensor of `n` deterministic values (`salt` picks them).
    fn up(&self, n: usize, shape: &[usize], salt: u32) -> Result<DTensor> {
        DTensor::from_slice(self.dev, &values(n, salt), shape)
    }

    /// Times `f` (median of the runs) and records its row.
    fn push(
        &mut self,
        family: &'static str,
        kernel: &str,
        shape: String,
        cost: Cost,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let secs =
            time(self.dev, self.runs, f).with_context(|| format!("benchmarking {kernel}"))?;
        let gb_s = cost.bytes / secs / 1e9;
        self.rows.push(Row {
            family,
            kernel: kernel.to_string(),
            shape,
            median_us: secs * 1e6,
            bytes: cost.bytes,
            flops: cost.flops,
            gb_s,
            gflop_s: cost.flops / secs / 1e9,
            of_copy_bw: gb_s / self.copy_gb_s,
        });
        Ok(())
    }
}

/// Elementwise, GELU, LayerNorm forward and the embedding gather over the batch's rows.
fn pointwise<D: KernelDevice + ?Sized>(bn: &mut Bencher<'_, D>, sz: &Size) -> Result<()> {
    let dev = bn.dev;
    let s = 4.0; // f32 storage
    let (d, v) = (sz.d, sz.vocab);
    let r = sz.rows();
    let sh = |a: &[usize]| format!("{a:?}");
    let x = bn.up(r * d, &[r, d], 3)?;
    let y = bn.up(r * d, &[r, d], 4)?;
    let w = bn.up(d, &[d], 5)?;
    let bias = bn.up(d, &[d], 6)?;
    bn.push(
        "elementwise",
        "add_f32",
        sh(&[r, d]),
        cm::add(r * d, s),
        &mut || kl::add(dev, &x, &y).map(drop),
    )?;
    bn.push(
        "elementwise",
        "bias_add_f32",
        sh(&[r, d]),
        cm::bias_add(r, d, s),
        &mut || kl::bias_add(dev, &x, &bias).map(drop),
    )?;
    let x4 = bn.up(r * 4 * d, &[r, 4 * d], 7)?;
    bn.push(
        "elementwise",
        "gelu_tanh_f32",
        sh(&[r, 4 * d]),
        cm::gelu_tanh_fwd(r * 4 * d, s),
        &mut || kl::gelu_tanh(dev, &x4).map(drop),
    )?;
    let b4 = bn.up(4 * d, &[4 * d], 15)?;
    bn.push(
        "elementwise",
        "bias_gelu_tanh_f32",
        sh(&[r, 4 * d]),
        cm::gelu_tanh_fwd(r * 4 * d, s),
        &mut || kl::bias_gelu_tanh(dev, &x4, &b4).map(drop),
    )?;
    bn.push(
        "gelu",
        "gelu_erf_f32",
        sh(&[r, 4 * d]),
        cm::gelu_erf_fwd(r * 4 * d, s),
        &mut || kl::gelu_erf(dev, &x4).map(drop),
    )?;
    drop(x4);
    bn.push(
        "layernorm",
        "layernorm_fwd_f32",
        sh(&[r, d]),
        cm::layernorm_fwd(r, d, s, false, true),
        &mut || kl::layer_norm(dev, &x, &w, None, 1e-5, false).map(drop),
    )?;
    let table = bn.up(v * d, &[v, d], 8)?;
    let ids: Vec<u32> = (0..r as u32).map(|i| (i * 7919) % v as u32).collect();
    let ids = DTensor::from_slice(dev, &ids, &[r])?;
    bn.push(
        "embedding",
        "embedding_fwd_f32",
        format!("{r} of [{v}, {d}]"),
        cm::embedding_fwd(r, d, s),
        &mut || kl::embedding(dev, &ids, &table).map(drop),
    )?;
    drop(table);
    Ok(())
}

/// RoPE and attention: the causal forward, a KV-cached PFLM step, the training backward.
fn attention<D: KernelDevice + ?Sized>(bn: &mut Bencher<'_, D>, sz: &Size) -> Result<()> {
    let dev = bn.dev;
    let s = 4.0; // f32 storage
    let (b, t, d, h) = (sz.batch, sz.seq, sz.d, sz.heads);
    let hd = d / h;
    let r = sz.rows();
    let sh = |a: &[usize]| format!("{a:?}");
    let pos: Vec<u32> = (0..t as u32).collect();
    let pos = DTensor::from_slice(dev, &pos, &[t])?;
    let (cos, sin) = kl::rope_tables(dev, &pos, hd, &kf_ops::rope::RopeFreqs::plain(10000.0))?;
    let q = bn.up(r * d, &[b, t, h, hd], 9)?;
    let k = bn.up(r * d, &[b, t, h, hd], 10)?;
    let vv = bn.up(r * d, &[b, t, h, hd], 11)?;
    bn.push(
        "rope",
        "rope_fwd_f32",
        sh(&[b, t, h, hd]),
        cm::rope(r, h, hd, s),
        &mut || kl::rope(dev, &q, &cos, &sin).map(drop),
    )?;
    let causal = AttnParams {
        pattern: AttnPattern::Causal,
        q_start: 0,
        scale: 1.0 / (hd as f64).sqrt(),
        key_skip: vec![],
    };
    let dims = AttnDims {
        b,
        h,
        d: hd,
        tq: t,
        tk: t,
    };
    bn.push(
        "attention",
        &format!("attn_fwd_d{hd}_f32"),
        format!("causal {:?}", [b, t, h, hd]),
        cm::attention_fwd(b, h, hd, t, 0, s, true),
        &mut || {
            kl::attention(
                dev,
                AttnView::contiguous(&q)?,
                AttnView::contiguous(&k)?,
                AttnView::contiguous(&vv)?,
                dims,
                &causal,
                AttnPath::Tiles,
            )
            .map(drop)
        },
    )?;
    // a KV-cached PFLM step: 8 query rows (4 committed + 4 hints) over the whole cache
    let tq = 8.min(t);
    let qd = bn.up(b * tq * d, &[b, tq, h, hd], 12)?;
    let step = AttnParams {
        q_start: t - tq,
        ..causal.clone()
    };
    bn.push(
        "attention",
        &format!("attn_decode_d{hd}_f32"),
        format!("{tq} rows over {t} keys, B {b}"),
        cm::attention_fwd(b, h, hd, tq, t - tq, s, false),
        &mut || {
            kl::attention(
                dev,
                AttnView::contiguous(&qd)?,
                AttnView::contiguous(&k)?,
                AttnView::contiguous(&vv)?,
                AttnDims { tq, ..dims },
                &step,
                AttnPath::Auto,
            )
            .map(drop)
        },
    )?;
    // training: the attention backward (dot, dQ, dK/dV) of the causal forward above
    let fwd = kl::attention(
        dev,
        AttnView::contiguous(&q)?,
        AttnView::contiguous(&k)?,
        AttnView::contiguous(&vv)?,
        dims,
        &causal,
        AttnPath::Tiles,
    )?;
    let go = bn.up(r * d, &[b, t, h, hd], 16)?;
    bn.push(
        "attention",
        &format!("attn_bwd_d{hd}_f32 (dot + dq + dkdv)"),
        format!("causal {:?}", [b, t, h, hd]),
        cm::attention_bwd(b, h, hd, t, s),
        &mut || {
            kl::attention_bwd(
                dev,
                AttnView::contiguous(&q)?,
                AttnView::contiguous(&k)?,
                AttnView::contiguous(&vv)?,
                &fwd.o,
                &fwd.lse,
                &go,
                dims,
                &causal,
            )
            .map(drop)
        },
    )?;
    drop((q, k, vv, qd, cos, sin, fwd, go));
    Ok(())
}

/// The LayerNorm backward and the bias gradient's column sums.
fn norm_backward<D: KernelDevice + ?Sized>(bn: &mut Bencher<'_, D>, sz: &Size) -> Result<()> {
    let dev = bn.dev;
    let s = 4.0; // f32 storage
    let d = sz.d;
    let r = sz.rows();
    let sh = |a: &[usize]| format!("{a:?}");
    let x = bn.up(r * d, &[r, d], 3)?;
    let y = bn.up(r * d, &[r, d], 4)?;
    let w = bn.up(d, &[d], 5)?;
    let ln = kl::layer_norm(dev, &x, &w, None, 1e-5, false)?;
    bn.push(
        "layernorm",
        "layernorm_bwd (dx + dw)",
        sh(&[r, d]),
        cm::layernorm_bwd(r, d, s, false),
        &mut || kl::layer_norm_bwd(dev, &x, &w, &y, Some(&ln.mean), &ln.rstd, false).map(drop),
    )?;
    drop(ln);
    bn.push(
        "reduce",
        "colsum_f32 (bias gradient)",
        sh(&[r, d]),
        Cost::stream(4.0 * (r * d + d) as f64, (r * d) as f64),
        &mut || kl::colsum(dev, &x).map(drop),
    )?;
    Ok(())
}

/// Decode GEMMs on half weights (gemv_wt) next to the f32 GEMM of the same shape.
fn decode_products<D: KernelDevice + ?Sized>(bn: &mut Bencher<'_, D>, sz: &Size) -> Result<()> {
    let dev = bn.dev;
    let (d, v) = (sz.d, sz.vocab);
    let sh = |a: &[usize]| format!("{a:?}");
    // decode GEMMs on half weights (gemv_wt) next to the f32 GEMM of the same shape: one
    // sequence's PFLM K = 4 step (2K = 8 rows) through the LM head, and an AR step (1 row)
    // through the MLP's up projection
    for (rows, n, what) in [(8, v, "LM head, 8 rows"), (1, 4 * d, "MLP up, 1 row")] {
        let xs = bn.up(rows * d, &[rows, d], 21)?;
        let w32 = values(n * d, 22);
        let w16: Vec<half::f16> = w32.iter().map(|&x| half::f16::from_f32(x)).collect();
        let w16 = DTensor::from_slice(dev, &w16, &[n, d])?;
        let w32 = DTensor::from_slice(dev, &w32, &[n, d])?;
        let io = 4.0 * (rows * d + rows * n) as f64;
        let flops = 2.0 * (rows * n * d) as f64;
        bn.push(
            "gemv",
            &format!("gemv_wt_f16 ({what})"),
            sh(&[rows, d, n]),
            Cost::stream(2.0 * (n * d) as f64 + io, flops),
            &mut || kl::linear(dev, &xs, &w16, None).map(drop),
        )?;
        bn.push(
            "gemm",
            &format!("f32 GEMM, gemv_wt's shape ({what})"),
            sh(&[rows, d, n]),
            Cost::stream(4.0 * (n * d) as f64 + io, flops),
            &mut || kl::linear(dev, &xs, &w32, None).map(drop),
        )?;
    }
    Ok(())
}

/// The loss over the vocabulary (forward and backward) and AdamW over one block's MLP weight.
fn loss_and_optimizer<D: KernelDevice + ?Sized>(bn: &mut Bencher<'_, D>, sz: &Size) -> Result<()> {
    let dev = bn.dev;
    let s = 4.0; // f32 storage
    let (d, v) = (sz.d, sz.vocab);
    let r = sz.rows();
    let sh = |a: &[usize]| format!("{a:?}");
    // the loss over the vocabulary: every row of a training batch
    let lt = bn.up(r * v, &[r, v], 17)?;
    let targets: Vec<u32> = (0..r as u32).map(|i| (i * 31) % v as u32).collect();
    let targets = DTensor::from_slice(dev, &targets, &[r])?;
    bn.push(
        "cross_entropy",
        "cross_entropy_fwd + mean",
        sh(&[r, v]),
        cm::cross_entropy(r, v, s),
        &mut || kl::cross_entropy(dev, &lt, &targets, None).map(drop),
    )?;
    let ce = kl::cross_entropy(dev, &lt, &targets, None)?;
    let one = DTensor::from_slice(dev, &[1.0f32], &[1])?;
    bn.push(
        "cross_entropy",
        "cross_entropy_bwd",
        sh(&[r, v]),
        cm::cross_entropy(r, v, s),
        &mut || {
            kl::cross_entropy_bwd(dev, &lt, &targets, (&ce.lse, &ce.count), &one, None).map(drop)
        },
    )?;
    drop((lt, ce));
    // the optimizer over one block's MLP weight
    let n_p = 4 * d * d;
    let (p, g, m1, m2) = (
        bn.up(n_p, &[4 * d, d], 18)?,
        bn.up(n_p, &[4 * d, d], 19)?,
        DTensor::zeros(dev, &[4 * d, d], DType::F32)?,
        DTensor::zeros(dev, &[4 * d, d], DType::F32)?,
    );
    let acfg = kf_ops::adamw::AdamWConfig::default();
    let mut step = 0u64;
    bn.push(
        "adamw",
        "adamw_f32",
        format!("{n_p}"),
        cm::adamw(n_p, s),
        &mut || {
            step += 1;
            kl::adamw_step(dev, &p, &g, &m1, &m2, step, &acfg)
        },
    )?;
    drop((p, g, m1, m2));
    Ok(())
}

/// Vocabulary-wide rows of a decode step (softmax, sampling, argmax + penalty), noise features, Philox.
fn vocab_rows<D: KernelDevice + ?Sized>(bn: &mut Bencher<'_, D>, sz: &Size) -> Result<()> {
    let dev = bn.dev;
    let s = 4.0; // f32 storage
    let (b, d, v) = (sz.batch, sz.d, sz.vocab);
    let r = sz.rows();
    let sh = |a: &[usize]| format!("{a:?}");
    // vocabulary-wide rows: one row per sequence of a decode step (B x K = 4 positions)
    let lr = b * 4;
    let logits = bn.up(lr * v, &[lr, v], 13)?;
    bn.push(
        "softmax",
        "softmax_fwd_f32",
        sh(&[lr, v]),
        cm::softmax_fwd(lr, v, s),
        &mut || kl::softmax(dev, &logits, false).map(drop),
    )?;
    let u: Vec<f64> = (0..lr).map(|i| (i as f64 + 0.5) / lr as f64).collect();
    let u = DTensor::from_slice(dev, &u, &[lr])?;
    bn.push(
        "sampling",
        "sample_inverse_cdf_f32",
        sh(&[lr, v]),
        cm::sample_inverse_cdf(lr, v, s),
        &mut || kl::sample_inverse_cdf(dev, &logits, &u, 1.0).map(drop),
    )?;
    let l3 = DTensor::from_buf(dev, dev.alloc(lr * v * 4)?, &[b, 4, v], DType::F32)?;
    dev.copy(&logits.buf, 0, &l3.buf, 0, lr * v * 4)?;
    let counts = DTensor::zeros(dev, &[b, v], DType::U32)?;
    bn.push(
        "argmax",
        "argmax_penalty_f32",
        sh(&[b, 4, v]),
        cm::argmax_penalty(b, 4, v, s),
        &mut || kl::argmax_penalty(dev, &l3, &counts, 0.5).map(drop),
    )?;
    drop((logits, l3, counts, u));
    let levels: Vec<f64> = (0..r).map(|i| (i as f64 + 0.5) / r as f64).collect();
    let levels = DTensor::from_slice(dev, &levels, &[r])?;
    bn.push(
        "noise",
        "noise_features_f32",
        sh(&[r, d]),
        cm::noise_features(r, d, s),
        &mut || kl::noise_features(dev, &levels, d).map(drop),
    )?;
    let n = r * d;
    bn.push(
        "philox",
        "philox_uniform_f64",
        format!("{n}"),
        Cost::stream(8.0 * n as f64, 0.0),
        &mut || kl::philox_uniform_f64(dev, n, 1, 2, 0).map(drop),
    )?;
    Ok(())
}

/// The GEMM of one block at these rows (x·Wᵀ of the fused QKV projection).
fn block_gemm<D: KernelDevice + ?Sized>(bn: &mut Bencher<'_, D>, sz: &Size) -> Result<()> {
    let dev = bn.dev;
    let d = sz.d;
    let r = sz.rows();
    let x = bn.up(r * d, &[r, d], 3)?;
    // the GEMMs of one block at these rows (x·Wᵀ of the fused QKV projection)
    let wq = bn.up(3 * d * d, &[3 * d, d], 14)?;
    bn.push(
        "gemm",
        "gemm qkv",
        format!("{r}x{}x{d}", 3 * d),
        Cost::stream(
            4.0 * (r * d + 3 * d * d + r * 3 * d) as f64,
            2.0 * (r * 3 * d * d) as f64,
        ),
        &mut || kl::linear(dev, &x, &wq, None).map(drop),
    )?;
    Ok(())
}

fn print(rep: &Report) {
    println!(
        "kernels on {} ({} shapes), median of {} calls; device copy {:.1} GB/s, f32 GEMM {}^3 \
         {:.1} GFLOP/s (medians of 3) (cuBLAS on a GPU, the CPU GEMM on emu)",
        rep.device, rep.size.name, rep.runs, rep.copy_gb_s, rep.size.gemm, rep.gemm_gflop_s
    );
    println!(
        "| family | kernel | shape | us | GB/s | GFLOP/s | of copy BW |\n|---|---|---|---:|---:|---:|---:|"
    );
    for r in &rep.rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.0}% |",
            r.family,
            r.kernel,
            r.shape,
            r.median_us,
            r.gb_s,
            r.gflop_s,
            100.0 * r.of_copy_bw
        );
    }
}

pub fn run(a: &Args) -> Result<()> {
    let device = crate::device_arg::select_device(&a.device)?;
    if device.is_cpu() {
        bail!(
            "--device cpu: kfrun bench kernels runs the CUDA kernels; use --device cuda (a GPU) \
             or emu (the CPU emulator)"
        );
    }
    // the emulator is slow: tiny shapes unless asked otherwise
    let default_size = if device == kf_engine::Device::Emu {
        "tiny"
    } else {
        "paper"
    };
    let sz = Size::parse(a.size.as_deref().unwrap_or(default_size))?;
    let report = bench(&*device.kernel()?, sz, a.runs)?;
    print(&report);
    if let Some(p) = &a.json {
        kf_engine::fs::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

/// Median of three synchronised runs of `f` (after one warm-up), in seconds.
fn median3<D: KernelDevice + ?Sized>(dev: &D, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = [0.0; 3];
    for x in &mut t {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        *x = t0.elapsed().as_secs_f64();
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[1])
}

/// Copy bandwidth (GB/s, read + write) and f32 GEMM rate (GFLOP/s) of a kernel device:
/// medians of three.
pub(crate) fn device_probes<D: KernelDevice + ?Sized>(
    dev: &D,
    bytes: usize,
    gemm: usize,
) -> Result<(f64, f64)> {
    let (src, dst) = (dev.alloc_zeroed(bytes)?, dev.alloc_zeroed(bytes)?);
    let tc = median3(dev, &mut || dev.copy(&src, 0, &dst, 0, bytes))?;
    drop((src, dst));
    let g = gemm;
    let x = vec![0.5f32; g * g];
    let (a, b) = (
        DTensor::from_slice(dev, &x, &[g, g])?,
        DTensor::from_slice(dev, &x, &[g, g])?,
    );
    let c = DTensor::zeros(dev, &[g, g], kf_engine::DType::F32)?;
    let spec = GemmSpec::simple(g, g, g, true);
    let tg = median3(dev, &mut || kl::matmul_into(dev, &spec, &a, &b, &c))?;
    Ok((
        2.0 * bytes as f64 / tc / 1e9,
        2.0 * (g as f64).powi(3) / tg / 1e9,
    ))
}
