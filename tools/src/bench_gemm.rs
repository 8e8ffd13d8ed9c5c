//! `kfrun bench gemm`: f32 throughput of `kf_ops::gemm::gemm` next to numpy/OpenBLAS.
//!
//! For each (M, K, N) shape and both B layouts (B stored K x N, and Bᵀ stored N x K as a
//! Linear layer's weight is), our result is first checked against an f64 product on sampled
//! entries, then timed inside a rayon pool of exactly `threads` threads (warm-up, then the
//! median of 7 runs, each repeated to last >= 50 ms). `bench/gemm_numpy.py` is then run once
//! as a child process with the BLAS thread variables set to `threads`, and the table shows
//! both GFLOP/s, their ratio and the target (>= 0.8x OpenBLAS at M >= 64, >= 0.7x at M <= 8).
//! This is a benchmark, not a test: a MISS is reported, never turned into an error.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// (M, K, N): A is M x K, B is K x N, C is M x N.
pub const SHAPES: [(usize, usize, usize); 5] = [
    (1, 768, 768),
    (8, 768, 3072),
    (64, 768, 3072),
    (512, 768, 768),
    (1024, 1024, 1024),
];

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/gemm_numpy.py");
const RUNS: usize = 7;
const MIN_RUN: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// B stored K x N row-major.
    Nn,
    /// B given as Bᵀ stored N x K row-major (numpy: `a @ bt.T`).
    Nt,
}

impl Layout {
    fn key(self) -> &'static str {
        match self {
            Layout::Nn => "nn",
            Layout::Nt => "nt",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Layout::Nn => "B[K,N]",
            Layout::Nt => "Bt[N,K]",
        }
    }
}

struct Row {
    m: usize,
    k: usize,
    n: usize,
    layout: Layout,
    ours: f64,
    blas: Option<f64>,
}

fn target(m: usize) -> f64 {
    if m >= 64 {
        0.8
    } else {
        0.7
    }
}

/// Deterministic values in [-1, 1).
pub(crate) fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// B strides (row, col) of the logical K x N operand for each storage layout.
fn b_strides(layout: Layout, k: usize, n: usize) -> (usize, usize) {
    match layout {
        Layout::Nn => (n, 1),
        Layout::Nt => (1, k),
    }
}

fn multiply(m: usize, k: usize, n: usize, layout: Layout, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (b_rs, b_cs) = b_strides(layout, k, n);
    kf_ops::gemm::gemm(m, n, k, a, k, 1, b, b_rs, b_cs, c, n, 1, false)
        .expect("benchmark operands are valid");
}

/// Compares sampled entries of C against an f64 dot product.
fn validate(
    m: usize,
    k: usize,
    n: usize,
    layout: Layout,
    a: &[f32],
    b: &[f32],
    c: &[f32],
) -> Result<()> {
    let (b_rs, b_cs) = b_strides(layout, k, n);
    let mut picks = vec![(0, 0), (m - 1, n - 1), (0, n - 1), (m - 1, 0)];
    let mut x = 12345u64;
    for _ in 0..28 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        picks.push(((x >> 33) as usize % m, (x >> 13) as usize % n));
    }
    for (i, j) in picks {
        let (mut want, mut mag) = (0f64, 0f64);
        for p in 0..k {
            let t = a[i * k + p] as f64 * b[p * b_rs + j * b_cs] as f64;
            want += t;
            mag += t.abs();
        }
        let got = c[i * n + j] as f64;
        if (got - want).abs() > 1e-5 * mag + 1e-6 {
            bail!(
                "gemm {m}x{k}x{n} {}: C[{i},{j}] = {got}, f64 reference {want}",
                layout.label()
            );
        }
    }
    Ok(())
}

/// Median seconds per call: warm-up, then RUNS runs each repeating the call >= MIN_RUN.
fn time_median(f: impl FnMut()) -> f64 {
    time_median_of(RUNS, MIN_RUN, f)
}

/// Median seconds per call: warm-up, then `runs` runs each repeating the call >= `min_run`.
pub(crate) fn time_median_of(runs: usize, min_run: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let one = t.elapsed().max(Duration::from_nanos(100));
    let reps = (min_run.as_secs_f64() / one.as_secs_f64()).ceil().max(1.0) as usize;
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Busy jiffies of the whole machine and of this process (Linux only), to report how much
/// other processes competed for the CPUs while we were timing.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<&str> = me.rsplit(')').next()?.split_whitespace().collect();
    let mine = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((busy, mine))
}

/// Runs the numpy script; Ok(None) with a printed reason when python3 or numpy is missing.
fn numpy_medians(threads: usize) -> Result<Option<(String, Vec<serde_json::Value>)>> {
    let shapes = SHAPES
        .iter()
        .map(|(m, k, n)| format!("{m},{k},{n}"))
        .collect::<Vec<_>>()
        .join(";");
    run_numpy("python3", threads, &shapes, RUNS, MIN_RUN, &[])
}

/// Runs `bench/gemm_numpy.py` under `python` with the BLAS thread variables set to `threads`
/// (`shapes` "m,k,n;...", `extra` more flags): the BLAS name and the rows, or Ok(None) with a
/// printed reason when the interpreter or numpy is missing or the script fails.
pub(crate) fn run_numpy(
    python: &str,
    threads: usize,
    shapes: &str,
    runs: usize,
    min_run: Duration,
    extra: &[&str],
) -> Result<Option<(String, Vec<serde_json::Value>)>> {
    let t = threads.to_string();
    let out = Command::new(python)
        .arg(SCRIPT)
        .args(["--shapes", shapes, "--runs", &runs.to_string(), "--min-ms"])
        .arg(min_run.as_millis().to_string())
        .args(extra)
        .env("OPENBLAS_NUM_THREADS", &t)
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            println!("numpy baseline skipped: cannot run {python} ({e}); showing our numbers only");
            return Ok(None);
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed: Option<serde_json::Value> = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok());
    match parsed {
        Some(v) if v.get("error").is_some() => {
            println!(
                "numpy baseline skipped: {} (pip install numpy, or --python); showing our numbers only",
                v["error"].as_str().unwrap_or("numpy unavailable")
            );
            Ok(None)
        }
        Some(v) if out.status.success() => {
            let blas = format!(
                "numpy {} / {}",
                v["numpy"].as_str().unwrap_or("?"),
                v["blas"].as_str().unwrap_or("?")
            );
            let rows = v["rows"]
                .as_array()
                .cloned()
                .context("numpy JSON has no rows")?;
            Ok(Some((blas, rows)))
        }
        _ => {
            println!(
                "numpy baseline skipped: {SCRIPT} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(None)
        }
    }
}

/// Benchmarks our f32 GEMM against numpy/OpenBLAS on `threads` threads and prints a table;
/// with `json_out`, also writes the rows as JSON.
pub fn run(threads: usize, json_out: Option<&Path>) -> Result<()> {
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the rayon pool")?;
    println!(
        "gemm f32 benchmark: {threads} thread(s), median of {RUNS} runs of >= {} ms",
        MIN_RUN.as_millis()
    );

    let mut rows = Vec::new();
    let start = cpu_jiffies();
    let t0 = Instant::now();
    for &(m, k, n) in &SHAPES {
        let a = fill(m * k, 1);
        let b = fill(k * n, 2);
        let mut c = vec![0f32; m * n];
        for layout in [Layout::Nn, Layout::Nt] {
            let secs = pool.install(|| -> Result<f64> {
                multiply(m, k, n, layout, &a, &b, &mut c);
                validate(m, k, n, layout, &a, &b, &c)?;
                Ok(time_median(|| multiply(m, k, n, layout, &a, &b, &mut c)))
            })?;
            rows.push(Row {
                m,
                k,
                n,
                layout,
                ours: 2.0 * (m * n * k) as f64 / secs / 1e9,
                blas: None,
            });
        }
    }
    let foreign = match (start, cpu_jiffies()) {
        (Some((b0, m0)), Some((b1, m1))) => {
            let wall = t0.elapsed().as_secs_f64() * 100.0 * threads as f64; // jiffies at 100 Hz
            Some(((b1 - b0).saturating_sub(m1 - m0)) as f64 / wall.max(1.0) * 100.0)
        }
        _ => None,
    };

    let mut blas_name = String::from("numpy/OpenBLAS unavailable");
    if let Some((name, np_rows)) = numpy_medians(threads)? {
        blas_name = name;
        for r in &mut rows {
            r.blas = np_rows
                .iter()
                .find(|v| {
                    v["m"].as_u64() == Some(r.m as u64)
                        && v["k"].as_u64() == Some(r.k as u64)
                        && v["n"].as_u64() == Some(r.n as u64)
                        && v["layout"].as_str() == Some(r.layout.key())
                })
                .and_then(|v| v["gflops"].as_f64());
        }
    }

    println!("baseline: {blas_name}");
    println!(
        "{:>16}  {:<8} {:>10} {:>10} {:>7} {:>7}  result",
        "M x K x N", "B", "ours GF/s", "BLAS GF/s", "ratio", "target"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let shape = format!("{}x{}x{}", r.m, r.k, r.n);
        let ratio = r.blas.map(|b| r.ours / b);
        let tgt = target(r.m);
        let verdict = match ratio {
            Some(x) if x >= tgt => "PASS",
            Some(_) => "MISS",
            None => "-",
        };
        println!(
            "{:>16}  {:<8} {:>10.1} {:>10} {:>7} {:>6.1}x  {}",
            shape,
            r.layout.label(),
            r.ours,
            r.blas.map_or("-".into(), |b| format!("{b:.1}")),
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            tgt,
            verdict
        );
        json_rows.push(serde_json::json!({
            "m": r.m, "k": r.k, "n": r.n, "layout": r.layout.key(),
            "ours_gflops": r.ours, "blas_gflops": r.blas, "ratio": ratio,
            "target": tgt, "pass": ratio.map(|x| x >= tgt),
        }));
    }
    if let Some(f) = foreign {
        if f >= 10.0 {
            println!("note: other processes used ~{f:.0}% of {threads} CPU(s) while ours was timed; numbers are noisy");
        }
    }
    if let Some(path) = json_out {
        let doc = serde_json::json!({
            "bench": "gemm_f32", "threads": threads, "baseline": blas_name, "rows": json_rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
