//! `kfrun bench decode`: the products a decode step runs, `x [m, K] · Wᵀ` with W [N, K] a
//! Linear weight of the paper architecture (qkv, attention out, MLP up / down, head), at
//! m = 1..512 rows, with the weights streamed from memory as in a real step: every call takes
//! the next of enough copies of W to exceed the caches. Printed per dtype of W (f32, f16,
//! bf16, activations and sums f32; or ggml blocks q8_0 / q4_0 / q4_1, the integer kernels
//! with activations rounded to 8-bit blocks): GFLOP/s streamed, the same product with W hot in cache,
//! their ratio, the GB/s at which W is read, and numpy/OpenBLAS on the same streamed f32
//! weights (a child process on the same threads). For f32 also the general GEMM route
//! (`gemm`, what `linear` used before the decode kernels) as a reference in the same run.
//! A benchmark: targets are printed as PASS / MISS, never turned into errors.

use crate::bench_gemm::{fill, run_numpy, time_median_of};
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use kf_engine::gemm::{xwt, QFormat, WRows, QK};
use kf_engine::gguf::GgmlType;
use std::path::PathBuf;
use std::time::Duration;

/// The paper architecture's Linear weights, (name, K = in, N = out).
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 768, 2304),
    ("attn out", 768, 768),
    ("mlp up", 768, 3072),
    ("mlp down", 3072, 768),
    ("head", 768, 30522),
];
/// Copies of W together at least this large, so each call reads W from DRAM.
const STREAM_BYTES: usize = 256 << 20;
/// W up to this size is also timed hot (it stays in L2/L3 between calls).
const HOT_MAX_BYTES: usize = 16 << 20;
const RUNS: usize = 5;
/// What `--dtype` takes.
const DTYPES: [&str; 6] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"];
const MIN_RUN: Duration = Duration::from_millis(40);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weight dtypes, comma-separated (f32, f16, bf16, q8_0, q4_0, q4_1).
    #[arg(long, default_value = "f32,bf16,f16", value_delimiter = ',')]
    dtype: Vec<String>,
    /// Rows of x (batch x tokens per step), comma-separated.
    #[arg(
        long,
        default_value = "1,4,8,16,32,64,128,256,512",
        value_delimiter = ','
    )]
    ms: Vec<usize>,
    /// Only these weights (qkv, "attn out", "mlp up", "mlp down", head), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Python interpreter with numpy, for the OpenBLAS column.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One weight in one dtype, in enough copies to stream.
enum Pool {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<f16>>),
    BF16(Vec<Vec<bf16>>),
    Blocks(QFormat, Vec<Vec<u8>>),
}

/// The block format of a `--dtype` name (none for the float dtypes).
fn blocks_of(dtype: &str) -> Option<(QFormat, GgmlType)> {
    match dtype {
        "q8_0" => Some((QFormat::Q8_0, GgmlType::Q8_0)),
        "q4_0" => Some((QFormat::Q4_0, GgmlType::Q4_0)),
        "q4_1" => Some((QFormat::Q4_1, GgmlType::Q4_1)),
        _ => None,
    }
}

/// Bytes a weight of `dtype` takes per element.
fn elem_bytes(dtype: &str) -> f64 {
    match (dtype, blocks_of(dtype)) {
        (_, Some((f, _))) => f.block_bytes() as f64 / QK as f64,
        ("f32", _) => 4.0,
        _ => 2.0,
    }
}

impl Pool {
    fn new(dtype: &str, n: usize, k: usize) -> Result<Pool> {
        let base = fill(n * k, 7);
        let bytes = (n * k) as f64 * elem_bytes(dtype);
        let bytes = bytes as usize;
        let copies = STREAM_BYTES.div_ceil(bytes).max(2);
        Ok(match dtype {
            "f32" => Pool::F32(vec![base; copies]),
            "f16" => Pool::F16(vec![
                base.iter().map(|&v| f16::from_f32(v)).collect();
                copies
            ]),
            "bf16" => Pool::BF16(vec![
                base.iter().map(|&v| bf16::from_f32(v)).collect();
                copies
            ]),
            q => match blocks_of(q) {
                Some((f, ty)) => {
                    Pool::Blocks(f, vec![kf_engine::quant::quantize(ty, &base)?; copies])
                }
                None => bail!("--dtype {q}: expected {}", DTYPES.join(", ")),
            },
        })
    }
    fn copies(&self) -> usize {
        match self {
            Pool::F32(v) => v.len(),
            Pool::F16(v) => v.len(),
            Pool::BF16(v) => v.len(),
            Pool::Blocks(_, v) => v.len(),
        }
    }
    fn get(&self, i: usize) -> WRows<'_> {
        match self {
            Pool::F32(v) => WRows::F32(&v[i]),
            Pool::F16(v) => WRows::F16(&v[i]),
            Pool::BF16(v) => WRows::BF16(&v[i]),
            Pool::Blocks(QFormat::Q8_0, v) => WRows::Q8_0(&v[i]),
            Pool::Blocks(QFormat::Q4_0, v) => WRows::Q4_0(&v[i]),
            Pool::Blocks(QFormat::Q4_1, v) => WRows::Q4_1(&v[i]),
        }
    }
}

struct Row {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    dtype: String,
    streamed: f64,
    hot: Option<f64>,
    gemm: Option<f64>,
    blas: Option<f64>,
}

impl Row {
    fn gb_s(&self) -> f64 {
        let bytes = (self.n * self.k) as f64 * elem_bytes(&self.dtype);
        // GFLOP/s -> calls/s -> bytes of W/s
        self.streamed * 1e9 / (2.0 * (self.m * self.n * self.k) as f64) * bytes / 1e9
    }
}

pub fn run(threads: usize, a: &Args) -> Result<()> {
    let shapes: Vec<_> = SHAPES
        .iter()
        .filter(|(name, ..)| a.only.is_empty() || a.only.iter().any(|o| o == name))
        .collect();
    if shapes.is_empty() {
        bail!(
            "--only {:?} names no weight (qkv, attn out, mlp up, mlp down, head)",
            a.only
        );
    }
    if let Some(&m) = a.ms.iter().find(|&&m| m == 0 || m > 4096) {
        bail!("--ms: {m} rows is outside 1..=4096");
    }
    for d in &a.dtype {
        if !DTYPES.contains(&d.as_str()) {
            bail!("--dtype {d}: expected {}", DTYPES.join(", "));
        }
    }
    let copy = crate::bench_gen::copy_bandwidth();
    println!(
        "decode x·Wᵀ benchmark: {threads} thread(s), weights streamed from >= {} MiB of copies, \
         median of {RUNS} runs of >= {} ms; copy bandwidth {copy:.1} GB/s (read + write)",
        STREAM_BYTES >> 20,
        MIN_RUN.as_millis()
    );
    let mut rows = Vec::new();
    for &&(name, k, n) in &shapes {
        for dtype in &a.dtype {
            let pool = Pool::new(dtype, n, k)?;
            let hot_ok = (n * k) as f64 * elem_bytes(dtype) <= HOT_MAX_BYTES as f64;
            for &m in &a.ms {
                let x = fill(m * k, 11);
                let mut c = vec![0f32; m * n];
                let mut turn = 0;
                let mut call = |streamed: bool| {
                    if streamed {
                        turn = (turn + 1) % pool.copies();
                    }
                    xwt(m, n, k, &x, k, pool.get(turn), k, &mut c, n, false)
                        .expect("benchmark operands are valid");
                };
                let flops = 2.0 * (m * n * k) as f64 / 1e9;
                let streamed = flops / time_median_of(RUNS, MIN_RUN, || call(true));
                let hot = hot_ok.then(|| flops / time_median_of(RUNS, MIN_RUN, || call(false)));
                let gemm = match (&pool, dtype.as_str()) {
                    (Pool::F32(ws), "f32") => {
                        let mut t = 0;
                        Some(
                            flops
                                / time_median_of(RUNS, MIN_RUN, || {
                                    t = (t + 1) % ws.len();
                                    kf_engine::gemm::gemm(
                                        m, n, k, &x, k, 1, &ws[t], 1, k, &mut c, n, 1, false,
                                    )
                                    .expect("benchmark operands are valid");
                                }),
                        )
                    }
                    _ => None,
                };
                rows.push(Row {
                    name,
                    m,
                    k,
                    n,
                    dtype: dtype.clone(),
                    streamed,
                    hot,
                    gemm,
                    blas: None,
                });
            }
        }
    }
    let blas_name = match numpy_streamed(&a.python, threads, &shapes, &a.ms)? {
        Some((name, np_rows)) => {
            for r in rows.iter_mut().filter(|r| r.dtype == "f32") {
                r.blas = np_rows
                    .iter()
                    .find(|v| {
                        v["m"].as_u64() == Some(r.m as u64)
                            && v["k"].as_u64() == Some(r.k as u64)
                            && v["n"].as_u64() == Some(r.n as u64)
                    })
                    .and_then(|v| v["gflops"].as_f64());
            }
            name
        }
        None => "numpy/OpenBLAS unavailable".into(),
    };
    print_table(&rows, copy, &blas_name);
    if let Some(path) = &a.json {
        let json_rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "weight": r.name, "m": r.m, "k": r.k, "n": r.n, "dtype": r.dtype,
                    "streamed_gflops": r.streamed, "hot_gflops": r.hot, "gemm_gflops": r.gemm,
                    "blas_gflops": r.blas, "weight_gb_s": r.gb_s(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "bench": "decode_xwt", "threads": threads, "copy_gb_s": copy,
            "baseline": blas_name, "rows": json_rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print_table(rows: &[Row], copy: f64, blas_name: &str) {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!("baseline: {blas_name} (f32, the same streamed weights)");
    println!("| weight | m | W | streamed GF/s | hot GF/s | streamed/hot | W GB/s | gemm GF/s | OpenBLAS GF/s | ours/OpenBLAS |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.1} | {} | {} | {} |",
            r.name,
            r.m,
            r.dtype,
            r.streamed,
            f(r.hot),
            r.hot
                .map_or("-".into(), |h| format!("{:.2}", r.streamed / h)),
            r.gb_s(),
            f(r.gemm),
            f(r.blas),
            r.blas
                .map_or("-".into(), |b| format!("{:.2}x", r.streamed / b)),
        );
    }
    // The targets: m >= 32 streamed >= 70% of hot; m = 1 reads W at >= 85% of copy.
    for r in rows {
        if r.m >= 32 {
            if let Some(h) = r.hot {
                let ok = r.streamed >= 0.7 * h;
                if !ok {
                    println!(
                        "MISS {} m {} {}: streamed {:.0}% of hot (target 70%)",
                        r.name,
                        r.m,
                        r.dtype,
                        100.0 * r.streamed / h
                    );
                }
            }
        }
    }
    for r in rows.iter().filter(|r| r.m == 1) {
        let pct = 100.0 * r.gb_s() / copy;
        println!(
            "{} m 1 {}: W read at {:.1} GB/s = {pct:.0}% of copy bandwidth ({})",
            r.name,
            r.dtype,
            r.gb_s(),
            if pct >= 85.0 {
                "PASS"
            } else {
                "MISS, target 85%"
            }
        );
    }
}

/// numpy's x @ W.T on streamed f32 weights; Ok(None) with a printed reason without numpy.
fn numpy_streamed(
    python: &str,
    threads: usize,
    shapes: &[&(&str, usize, usize)],
    ms: &[usize],
) -> Result<Option<(String, Vec<serde_json::Value>)>> {
    let spec: Vec<String> = shapes
        .iter()
        .flat_map(|&&(_, k, n)| ms.iter().map(move |m| format!("{m},{k},{n}")))
        .collect();
    let stream = STREAM_BYTES.to_string();
    let extra = ["--stream-bytes", stream.as_str()];
    run_numpy(python, threads, &spec.join(";"), RUNS, MIN_RUN, &extra)
}
