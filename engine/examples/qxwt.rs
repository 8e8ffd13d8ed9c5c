//! Times `xwt` with quantized weights (Q4_1, Q4_0, Q8_0) against f32 weights on the Linear
//! shapes of SmolLM2-135M (hidden 576, kv 192, MLP 1536, vocab 49152, 30 layers), m = 1, 4,
//! 16, 64 rows. Two tables:
//! - per shape, W streamed from memory (each call takes the next of enough copies of W to
//!   exceed the caches): ms a call, GB/s of weights read, GFLOP/s;
//! - a whole decode step (all 30 layers' 7 products and the 49152 x 576 head, each weight
//!   once, in order, as a step reads them): ms a step, GB/s, and steps/s at m = 1, the
//!   ceiling the Linear layers put on batch-1 tokens/s.
//!
//! `cargo run --release -p kf-engine --example qxwt [-- THREADS [MS [step]]]` (defaults: 2
//! threads, m = 1,4,16,64; `step`: only the decode-step table). The weights are random blocks (timing only).

use anyhow::{Context, Result};
use kf_engine::gemm::{xwt, QFormat, WRows, QK};
use std::time::Instant;

/// (name, K, N) of SmolLM2-135M's Linear weights.
const SHAPES: [(&str, usize, usize); 6] = [
    ("q/o 576->576", 576, 576),
    ("k/v 576->192", 576, 192),
    ("up/gate 576->1536", 576, 1536),
    ("down 1536->576", 1536, 576),
    ("head 576->49152", 576, 49152),
    ("qkv-fused 576->960", 576, 960),
];
const LAYERS: usize = 30;
const STREAM_BYTES: usize = 256 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Dt {
    F32,
    Q(QFormat),
}

impl Dt {
    fn name(self) -> String {
        match self {
            Dt::F32 => "f32".into(),
            Dt::Q(f) => f.to_string(),
        }
    }
    fn bytes(self, n: usize, k: usize) -> usize {
        match self {
            Dt::F32 => n * k * 4,
            Dt::Q(f) => n * k / QK * f.block_bytes(),
        }
    }
}

/// One weight in one dtype.
enum W {
    F32(Vec<f32>),
    Q(QFormat, Vec<u8>),
}

impl W {
    fn new(dt: Dt, n: usize, k: usize, seed: &mut u64) -> W {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        match dt {
            Dt::F32 => W::F32(
                (0..n * k)
                    .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
                    .collect(),
            ),
            Dt::Q(f) => {
                let bb = f.block_bytes();
                let mut v = vec![0u8; n * k / QK * bb];
                for b in v.chunks_exact_mut(bb) {
                    let r = next();
                    b.copy_from_slice(&r.to_le_bytes().repeat(5)[..bb]);
                    // small finite scales: f16 0.0039 (0x1c00) and offset -0.0039
                    b[..2].copy_from_slice(&0x1c00u16.to_le_bytes());
                    if f == QFormat::Q4_1 {
                        b[2..4].copy_from_slice(&0x9c00u16.to_le_bytes());
                    }
                }
                W::Q(f, v)
            }
        }
    }
    fn rows(&self) -> WRows<'_> {
        match self {
            W::F32(v) => WRows::F32(v),
            W::Q(QFormat::Q8_0, v) => WRows::Q8_0(v),
            W::Q(QFormat::Q4_0, v) => WRows::Q4_0(v),
            W::Q(QFormat::Q4_1, v) => WRows::Q4_1(v),
        }
    }
}

/// Median of `runs` timings of `f`, each repeated to at least 30 ms, in seconds a call.
fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut reps = 1;
    loop {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        if t.elapsed().as_secs_f64() > 0.03 {
            break;
        }
        reps *= 2;
    }
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        v.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[runs / 2])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args
        .get(1)
        .map_or(Ok(2), |s| s.parse())
        .context("THREADS")?;
    let ms: Vec<usize> = match args.get(2) {
        Some(s) => s
            .split(',')
            .map(|v| v.parse().context("MS"))
            .collect::<Result<_>>()?,
        None => vec![1, 4, 16, 64],
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    println!("CPU: {cpu}, {threads} threads");
    let dts = [
        Dt::F32,
        Dt::Q(QFormat::Q8_0),
        Dt::Q(QFormat::Q4_0),
        Dt::Q(QFormat::Q4_1),
    ];
    let mut seed = 0x1234_5678_9abc_def1u64;
    let xmax = vec![0.37f32; 64 * 1536];
    let x: Vec<f32> = xmax
        .iter()
        .enumerate()
        .map(|(i, v)| v * ((i * 7919 % 1000) as f32 / 500.0 - 1.0))
        .collect();

    // a third argument `step`: only the decode-step table
    let per_shape = args.get(3).map(String::as_str) != Some("step");
    println!("\n== per shape, W streamed (ms a call / GB/s of W / GFLOP/s)");
    println!(
        "{:<20} {:>3} {:>6} {:>28} {:>28} {:>28} {:>28}",
        "shape", "m", "", "f32", "Q8_0", "Q4_0", "Q4_1"
    );
    for &(name, k, n) in SHAPES.iter().filter(|_| per_shape) {
        let pools: Vec<Vec<W>> = dts
            .iter()
            .map(|&dt| {
                let copies = STREAM_BYTES.div_ceil(dt.bytes(n, k)).max(2);
                (0..copies).map(|_| W::new(dt, n, k, &mut seed)).collect()
            })
            .collect();
        for &m in &ms {
            let mut line = format!("{name:<20} {m:>3} {:>6}", "");
            for (dt, pool_w) in dts.iter().zip(&pools) {
                let mut c = vec![0f32; m * n];
                let mut at = 0;
                let t = pool.install(|| {
                    time(5, || {
                        at = (at + 1) % pool_w.len();
                        xwt(m, n, k, &x, k, pool_w[at].rows(), k, &mut c, n, false)
                    })
                })?;
                let gb = dt.bytes(n, k) as f64 / t / 1e9;
                let gf = 2.0 * (m * n * k) as f64 / t / 1e9;
                line += &format!(" {:>9.4} ms {:>5.1} GB/s {:>5.0} GF", t * 1e3, gb, gf);
            }
            println!("{line}");
        }
    }

    println!(
        "\n== a whole SmolLM2-135M decode step (30 layers x 7 products + head), W from memory"
    );
    for &dt in &dts {
        let mut layer_shapes = Vec::new();
        for _ in 0..LAYERS {
            for &(k, n) in &[
                (576, 576),
                (576, 192),
                (576, 192),
                (576, 576),
                (576, 1536),
                (576, 1536),
                (1536, 576),
            ] {
                layer_shapes.push((k, n));
            }
        }
        layer_shapes.push((576, 49152));
        let ws: Vec<W> = layer_shapes
            .iter()
            .map(|&(k, n)| W::new(dt, n, k, &mut seed))
            .collect();
        let bytes: usize = layer_shapes.iter().map(|&(k, n)| dt.bytes(n, k)).sum();
        let flops_1: usize = layer_shapes.iter().map(|&(k, n)| 2 * n * k).sum();
        let mut c = vec![0f32; 64 * 49152];
        for &m in &ms {
            let t = pool.install(|| {
                time(5, || {
                    for (w, &(k, n)) in ws.iter().zip(&layer_shapes) {
                        xwt(m, n, k, &x, k, w.rows(), k, &mut c, n, false)?;
                    }
                    Ok(())
                })
            })?;
            println!(
                "{:<5} m {m:>3}: {:>8.3} ms a step, {:>6.1} MB of W, {:>5.1} GB/s, {:>5.0} GFLOP/s, {:>7.1} steps/s",
                dt.name(),
                t * 1e3,
                bytes as f64 / 1e6,
                bytes as f64 / t / 1e9,
                (flops_1 * m) as f64 / t / 1e9,
                1.0 / t
            );
        }
    }
    Ok(())
}
