//! The inverse-CDF map of KFORCING.md section 3 — the ONE sampler behind AR
//! sampling, stage-1 targets, evaluation — and its inverse (noise inversion).
//! R rows (batch rows of AR, or the k positions of a window), V vocabulary.
//!
//! Arithmetic, per row, in f64 whatever the logits' dtype (both directions
//! use exactly this, so they agree bit for bit):
//! - `m = max_v l_v`, weights `e_v = exp((l_v - m) * (1 / tau))` with our own
//!   exp (`exp_nonpos`: plain f64 ops, vectorisable, the same bits on every
//!   machine, within 2 ulp of libm);
//! - cumulative sums in index order (no sorting), two-level: the vocabulary is
//!   cut into blocks of `BLOCK` = 64; `L_{j,i}` is the running sum inside
//!   block j (left to right from 0), `B_j` its total (the same chain),
//!   `P_j = B_0 + ... + B_{j-1}` left to right, and `c_v = P_j + L_{j,i}`
//!   for `v = 64 j + i`; `S = P_{#blocks}`, which equals `c_{V-1}` exactly.
//!   This differs from one flat running sum only by rounding, keeps `c`
//!   monotone, and lets the block totals be computed independently (several
//!   chains in flight on a CPU; one thread per block on a GPU, which must use
//!   the same blocking to match bit for bit);
//! - the token for `u` is the first `v` with `c_v >= u * S`, i.e.
//!   `min { v : p_v > 0 and CDF(v) >= u }` with `p = softmax(l / tau)` and
//!   `CDF(v) = c_v / S` up to the rounding of the normalisation. The first
//!   `v` that reaches `u * S` has `c_v > c_{v-1}`, hence `e_v > 0`: a token of
//!   probability zero (logit -inf, the reserved token) is never returned.
//!   Since `c_{V-1} == S` and `u < 1`, the spec's "total below u" fallback
//!   (the last token of nonzero probability) cannot trigger; it is kept as a
//!   guard.
//!
//! Kernel per row, no scratch of size V: pass 1 reads the logits for the max
//! (and the NaN check); pass 2 computes the weights block by block into a
//! small stack buffer and sums `GROUP` = 16 blocks at a time (16 independent
//! add chains);
//! then a serial sum over the ~V/64 block totals, a search for the block that
//! crosses `u * S`, and a rescan of that one block. Pass 2 uses AVX2 when the
//! CPU has it (same bits: no FMA, IEEE mul/add are lane-width independent).
//! Rows run in parallel. Timings: `tests/tests/fused_sampling.rs`
//! (`perf_sampling_per_row`) and the note at `BLOCK`.
//!
//! `tau == 0` is greedy: the first maximum of the logits, whatever `u` is.
//! `+inf` logits: the limit of the softmax — equal mass on the `+inf` entries.

use crate::kdev::bridge;
use anyhow::{bail, ensure, Result};
use kf_engine::{DType, Device, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Below this many logits in total the op stays on one thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Block size of the two-level cumulative sum (part of the definition of the
/// map: changing it changes the rounding of `c`). Measured for the weights +
/// block totals of one f32 row, V = 50257, one thread (shared 2-core AMD EPYC
/// dev box, best of 30): libm exp + one flat running sum into a V-long f64
/// scratch row 240 us; own exp with Horner, same layout 200 us; blocked with
/// 4 chains, SSE2 220 us, AVX2 121 us; Estrin + 16 chains, SSE2 140 us, AVX2
/// 81 us — the exp alone (with a plain vector sum) is also 82 us, so the add
/// chains are fully hidden and the polynomial's throughput is the limit.
/// Whole sampler, f32, one thread: 56 us/row at V = 30522, 93 us/row at
/// V = 50257 (`perf_sampling_per_row`).
const BLOCK: usize = 64;
/// Blocks summed together (independent add chains in flight; 4 was too few).
const GROUP: usize = 16;

thread_local! {
    /// Prefix sums `P_j` of the block totals of the row being processed.
    static PREFIX: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// Why one row failed; the public functions turn it into a message that
/// names the op and the row.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowError {
    EmptyVocab,
    Nan {
        index: usize,
    },
    AllNegInf,
    /// The token has probability zero (or is not the greedy choice at tau 0).
    ZeroProb {
        token: usize,
    },
    /// The token's probability is positive but below what the f64 cumulative
    /// sum can resolve at its place: no `u` in (0, 1) maps to it.
    Unresolvable {
        token: usize,
        weight: f64,
    },
    TokenRange {
        token: usize,
        vocab: usize,
    },
}

impl RowError {
    fn message(self, op: &str, row: Option<usize>) -> String {
        let at = row.map(|r| format!(" at row {r}")).unwrap_or_default();
        match self {
            RowError::EmptyVocab => format!("{op}: empty vocabulary (V = 0)"),
            RowError::Nan { index } => {
                format!("{op}: logits contain NaN{at} (vocabulary index {index})")
            }
            RowError::AllNegInf => format!("{op}: all logits are -inf{at}"),
            RowError::ZeroProb { token } => {
                format!("{op}: token {token}{at} has probability zero at this tau")
            }
            RowError::Unresolvable { token, weight } => format!(
                "{op}: token {token}{at} has relative weight {weight:e}, too small for the f64 \
                 cumulative sum to give it an interval (no u in (0, 1) samples it)"
            ),
            RowError::TokenRange { token, vocab } => {
                format!("{op}: token {token}{at} is out of range for a vocabulary of {vocab}")
            }
        }
    }
}

fn check_tau(op: &str, tau: f64) -> Result<()> {
    ensure!(
        tau.is_finite() && tau >= 0.0,
        "{op}: tau must be finite and >= 0 (0 = greedy), got {tau}"
    );
    ensure!(
        tau == 0.0 || (1.0 / tau).is_finite(),
        "{op}: tau = {tau:e} is too small for 1/tau to be finite (use 0 for greedy)"
    );
    Ok(())
}

/// Max of the row, or the index of its first NaN.
fn row_max<T: Float>(row: &[T]) -> Result<T, RowError> {
    // Lane-wise max in blocks so the compiler can vectorise; NaN compares
    // false and is caught by the separate flag.
    const L: usize = 8;
    let mut lanes = [T::NEG_INFINITY; L];
    let mut nan = false;
    let mut blocks = row.chunks_exact(L);
    for b in &mut blocks {
        for k in 0..L {
            let x = b[k];
            nan |= x.is_nan();
            lanes[k] = if x > lanes[k] { x } else { lanes[k] };
        }
    }
    for &x in blocks.remainder() {
        nan |= x.is_nan();
        lanes[0] = if x > lanes[0] { x } else { lanes[0] };
    }
    if nan {
        let index = row.iter().position(|x| x.is_nan()).unwrap_or(0);
        return Err(RowError::Nan { index });
    }
    let m = lanes
        .iter()
        .fold(T::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if m == T::NEG_INFINITY {
        return Err(RowError::AllNegInf);
    }
    Ok(m)
}

/// Greedy choice: the first maximum.
fn first_argmax<T: Float>(row: &[T]) -> Result<usize, RowError> {
    if row.is_empty() {
        return Err(RowError::EmptyVocab);
    }
    let m = row_max(row)?;
    Ok(row.iter().position(|&x| x == m).unwrap_or(0))
}

/// `exp(x)` for `x <= 0` (or -inf), in plain f64 arithmetic (no libm call, no
/// FMA), so it vectorises and gives the same bits on every machine: Cody-Waite
/// reduction `x = k ln2 + r`, `|r| <= ln2/2`, degree-13 Taylor polynomial
/// (truncation < 1e-17) evaluated by Estrin's scheme, scaling by `2^k` through the exponent bits. Results
/// below 2^-1021 (x < -708) are flushed to 0: such a weight is far below what
/// the f64 cumulative sum (which holds the max's weight, 1) can resolve.
/// Accuracy: within 2 ulp of libm's exp (unit test).
#[inline(always)]
fn exp_nonpos(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 0.693_147_180_369_123_8; // 0x3FE62E42FEE00000: 32 significant bits
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10; // ln 2 - LN2_HI
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52: round to integer
    const C: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40320.0,
        1.0 / 362880.0,
        1.0 / 3628800.0,
        1.0 / 39916800.0,
        1.0 / 479001600.0,
        1.0 / 6227020800.0,
    ];
    let flush = x < -708.0;
    let xc = if flush { -708.0 } else { x };
    let t = xc * LOG2E + MAGIC;
    let k = t - MAGIC;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // Estrin's scheme: the same polynomial with a short dependency chain, so
    // the vectorised loop is limited by throughput rather than latency
    let r2 = r * r;
    let r4 = r2 * r2;
    let r8 = r4 * r4;
    let q = |i: usize| C[i] + C[i + 1] * r;
    let s0 = q(0) + q(2) * r2;
    let s1 = q(4) + q(6) * r2;
    let s2 = q(8) + q(10) * r2;
    let s3 = q(12);
    let p = (s0 + s1 * r4) + (s2 + s3 * r4) * r8;
    // the low bits of t hold k (two's complement): 2^k = (k + 1023) << 52
    let scale = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
    if flush {
        0.0
    } else {
        p * scale
    }
}

/// What the weights of a row are computed from.
#[derive(Clone, Copy)]
struct Weights {
    /// The row's max as f64.
    m: f64,
    inv_tau: f64,
    /// The max is +inf: weight 1 on the +inf entries, 0 elsewhere.
    inf: bool,
}

impl Weights {
    fn of<T: Float>(row: &[T], tau: f64) -> Result<Weights, RowError> {
        if row.is_empty() {
            return Err(RowError::EmptyVocab);
        }
        let m = row_max(row)?.to_f64();
        Ok(Weights {
            m,
            inv_tau: 1.0 / tau,
            inf: m == f64::INFINITY,
        })
    }

    #[inline(always)]
    fn at(self, x: f64) -> f64 {
        if self.inf {
            (x == f64::INFINITY) as u8 as f64
        } else {
            exp_nonpos((x - self.m) * self.inv_tau)
        }
    }

    /// Weights of one block (`xs.len() <= out.len()`).
    #[inline(always)]
    fn block<T: Float>(self, xs: &[T], out: &mut [f64]) {
        if self.inf {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = (x.to_f64() == f64::INFINITY) as u8 as f64;
            }
        } else {
            let (m, it) = (self.m, self.inv_tau);
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = exp_nonpos((x.to_f64() - m) * it);
            }
        }
    }

    /// Block totals `B_j` (each the left-to-right sum of its block from 0)
    /// into `totals`, one per block of `BLOCK`.
    #[inline(always)]
    fn totals_impl<T: Float>(self, row: &[T], totals: &mut Vec<f64>) {
        totals.clear();
        let mut buf = [0f64; GROUP * BLOCK];
        let mut groups = row.chunks_exact(GROUP * BLOCK);
        for g in &mut groups {
            self.block(g, &mut buf);
            // GROUP independent chains, each in index order within its block
            let mut s = [0f64; GROUP];
            for i in 0..BLOCK {
                for (k, sk) in s.iter_mut().enumerate() {
                    *sk += buf[k * BLOCK + i];
                }
            }
            totals.extend_from_slice(&s);
        }
        for b in groups.remainder().chunks(BLOCK) {
            let e = &mut buf[..b.len()];
            self.block(b, e);
            let mut s = 0f64;
            for &ei in e.iter() {
                s += ei;
            }
            totals.push(s);
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn totals_avx2<T: Float>(self, row: &[T], totals: &mut Vec<f64>) {
        self.totals_impl(row, totals)
    }

    fn totals<T: Float>(self, row: &[T], totals: &mut Vec<f64>) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked at run time.
            return unsafe { self.totals_avx2(row, totals) };
        }
        self.totals_impl(row, totals)
    }
}

/// The prefix sums of one row: `P_0 = 0`, `P_{j+1} = P_j + B_j`; `S` is the
/// last. Runs `f(weights, P)` with them.
fn with_prefix<T: Float, O>(
    row: &[T],
    tau: f64,
    f: impl FnOnce(Weights, &[f64]) -> Result<O, RowError>,
) -> Result<O, RowError> {
    let w = Weights::of(row, tau)?;
    PREFIX.with(|p| {
        let mut p = p.borrow_mut();
        let mut totals = std::mem::take(&mut *p);
        w.totals(row, &mut totals);
        // turn totals into prefix sums in place: p[0] = 0, p[j+1] = p[j] + B_j
        let mut acc = 0f64;
        for b in totals.iter_mut() {
            let bj = *b;
            *b = acc;
            acc += bj;
        }
        totals.push(acc);
        let out = f(w, &totals);
        *p = totals;
        out
    })
}

/// `c_v` for every `v` of block `j` (the values the sampler compares), written
/// into `out[..len]`; returns `len`.
fn block_cum<T: Float>(
    row: &[T],
    w: Weights,
    p: &[f64],
    j: usize,
    out: &mut [f64; BLOCK],
) -> usize {
    let xs = &row[j * BLOCK..((j + 1) * BLOCK).min(row.len())];
    let mut l = 0f64;
    for (o, &x) in out.iter_mut().zip(xs) {
        l += w.at(x.to_f64());
        *o = p[j] + l;
    }
    xs.len()
}

fn sample_row<T: Float>(row: &[T], u: f64, tau: f64) -> Result<usize, RowError> {
    if tau == 0.0 {
        return first_argmax(row);
    }
    with_prefix(row, tau, |w, p| {
        let s = p[p.len() - 1];
        let target = u * s;
        let nb = p.len() - 1;
        // the first block whose end reaches the target, then the first v in it
        let j = p[1..].partition_point(|&c| c < target);
        let mut cum = [0f64; BLOCK];
        if j < nb {
            let n = block_cum(row, w, p, j, &mut cum);
            if let Some(i) = cum[..n].iter().position(|&c| c >= target) {
                return Ok(j * BLOCK + i);
            }
        }
        // Unreachable while S == c_{V-1} and u < 1; the spec's fallback: the
        // last token of nonzero weight.
        Ok((0..row.len())
            .rev()
            .find(|&v| w.at(row[v].to_f64()) > 0.0)
            .unwrap_or(row.len() - 1))
    })
}

/// Bits of the largest f64 below 1.0 (u must lie in the open interval (0, 1)).
const BELOW_ONE_BITS: u64 = 0x3FEF_FFFF_FFFF_FFFF;

/// Smallest `u` in (0, 1) (as bits) with `pred(u)` true, for a predicate that
/// is monotone (false then true) in `u`; `None` if it is false at `1 - ε`.
fn first_true(pred: impl Fn(f64) -> bool) -> Option<u64> {
    if !pred(f64::from_bits(BELOW_ONE_BITS)) {
        return None;
    }
    // Invariant: pred(bits hi) true; pred(bits lo) false or lo == 0 (u = 0 excluded).
    let (mut lo, mut hi) = (0u64, BELOW_ONE_BITS);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(f64::from_bits(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

fn noise_row<T: Float>(row: &[T], token: usize, r: f64, tau: f64) -> Result<f64, RowError> {
    if token >= row.len() {
        return Err(RowError::TokenRange {
            token,
            vocab: row.len(),
        });
    }
    if tau == 0.0 {
        // Greedy: every u maps to the first maximum and nothing else.
        if first_argmax(row)? != token {
            return Err(RowError::ZeroProb { token });
        }
        return Ok(r.clamp(f64::MIN_POSITIVE, f64::from_bits(BELOW_ONE_BITS)));
    }
    with_prefix(row, tau, |w, p| {
        let s = p[p.len() - 1];
        let (j, i) = (token / BLOCK, token % BLOCK);
        let mut cum = [0f64; BLOCK];
        block_cum(row, w, p, j, &mut cum);
        // c_{x-1}: the previous entry of the block, or the end of the
        // previous block, which is P_j exactly
        let lo = if i == 0 { p[j] } else { cum[i - 1] };
        let hi = cum[i];
        let unresolvable = || {
            let weight = w.at(row[token].to_f64());
            if weight > 0.0 {
                RowError::Unresolvable { token, weight }
            } else {
                RowError::ZeroProb { token }
            }
        };
        if hi <= lo {
            return Err(unresolvable());
        }
        // The sampler returns `token` iff lo < u*S <= hi (as rounded by the
        // sampler's own multiply). u*S is monotone in u, so find the smallest
        // u above lo and the largest u not above hi, then clamp the ideal
        // value CDF(x-1) + (CDF(x) - CDF(x-1)) * r into that range.
        let u_min = first_true(|u| u * s > lo).ok_or_else(unresolvable)?;
        let u_max = match first_true(|u| u * s > hi) {
            Some(b) => b - 1,
            None => BELOW_ONE_BITS,
        };
        if u_min > u_max {
            return Err(unresolvable());
        }
        let (u_min, u_max) = (f64::from_bits(u_min), f64::from_bits(u_max));
        let ideal = (lo + (hi - lo) * r) / s;
        Ok(ideal.clamp(u_min, u_max))
    })
}

/// The token of one row of logits for the uniform `u` in (0, 1) (the map of
/// KFORCING.md section 3; see the module comment for the exact arithmetic).
/// `tau == 0` means greedy (first maximum). For callers that hold plain slices.
pub fn inverse_cdf_row<T: Float>(row: &[T], u: f64, tau: f64) -> Result<u32> {
    const OP: &str = "inverse_cdf_row";
    check_tau(OP, tau)?;
    ensure!(u > 0.0 && u < 1.0, "{OP}: u = {u} is not in (0, 1)");
    sample_row(row, u, tau)
        .map(|v| v as u32)
        .map_err(|e| anyhow::anyhow!(e.message(OP, None)))
}

/// The noise `u` for which `inverse_cdf_row(row, u, tau) == token`, placed at
/// fraction `r` in [0, 1] of the token's interval (see `inverse_cdf_noise`).
pub fn inverse_cdf_noise_row<T: Float>(row: &[T], token: u32, r: f64, tau: f64) -> Result<f64> {
    const OP: &str = "inverse_cdf_noise_row";
    check_tau(OP, tau)?;
    ensure!((0.0..=1.0).contains(&r), "{OP}: r = {r} is not in [0, 1]");
    noise_row(row, token as usize, r, tau).map_err(|e| anyhow::anyhow!(e.message(OP, None)))
}

/// Logits `[R, V]` as contiguous data, with the op's shape checks.
fn logits_rv(op: &str, logits: &Tensor) -> Result<(usize, usize, DType, Tensor)> {
    let d = crate::util::float_dtype(op, &[logits])?;
    ensure!(
        logits.rank() == 2,
        "{op}: logits must have shape [R, V], got {:?}",
        logits.shape()
    );
    let (r, v) = (logits.shape()[0], logits.shape()[1]);
    ensure!(
        v > 0 || r == 0,
        "{op}: empty vocabulary (logits {:?})",
        logits.shape()
    );
    Ok((r, v, d, logits.contiguous()?))
}

/// A float vector `[R]` (u or r) as f64, with the op's shape checks.
fn per_row_f64(op: &str, what: &str, t: &Tensor, rows: usize) -> Result<Vec<f64>> {
    ensure!(
        t.dtype().is_float() && t.device() == Device::Cpu,
        "{op}: {what} must be a float CPU tensor, got {}",
        t.dtype()
    );
    crate::util::expect_shape(op, what, t, &[rows])?;
    t.to_vec_f64()
}

/// Run `f` on each row (in parallel when the work is large) and report the
/// lowest failing row, so error messages do not depend on scheduling.
fn map_rows<T: Float, O: Send>(
    op: &str,
    data: &[T],
    rows: usize,
    vocab: usize,
    f: impl Fn(usize, &[T]) -> Result<O, RowError> + Sync,
) -> Result<Vec<Result<O, RowError>>> {
    let res: Vec<Result<O, RowError>> = if rows * vocab >= PAR_MIN_ELEMS && rows > 1 {
        data.par_chunks(vocab)
            .enumerate()
            .map(|(r, row)| f(r, row))
            .collect()
    } else {
        data.chunks(vocab)
            .enumerate()
            .map(|(r, row)| f(r, row))
            .collect()
    };
    if let Some((r, e)) = res
        .iter()
        .enumerate()
        .find_map(|(r, x)| x.as_ref().err().map(|e| (r, *e)))
    {
        bail!(e.message(op, Some(r)));
    }
    Ok(res)
}

/// Tokens sampled by this module's or `argmax`'s ops (u32, any shape) on the host. On a
/// kernel device the kernels mark a NaN or all -inf logit row with a sentinel id instead of
/// failing mid-launch; that becomes the error the CPU op gives.
pub fn tokens_to_host(t: &Tensor) -> Result<Vec<u32>> {
    let v = t.to_vec::<u32>()?;
    if !t.device().is_cpu() {
        launch::check_token_markers(&v, t.shape())?;
    }
    Ok(v)
}

/// Sample one token per row: `logits [R, V]` (f32 or f64), `u [R]` (float,
/// each in the open interval (0, 1)), temperature `tau` (0 = greedy). Returns
/// u32 `[R]`. Errors name the row for NaN logits, an all -inf row, or `u`
/// out of range. Never records a backward node.
pub fn sample_inverse_cdf(logits: &Tensor, u: &Tensor, tau: f64) -> Result<Tensor> {
    const OP: &str = "sample_inverse_cdf";
    check_tau(OP, tau)?;
    if let Some(on) = bridge::device_of(OP, &[logits, u])? {
        ensure!(logits.rank() >= 1, "{OP}: logits must be [.., V]");
        let v = logits.shape()[logits.rank() - 1];
        let rows = logits.numel() / v.max(1);
        ensure!(
            u.numel() == rows,
            "{OP}: {} uniforms for {rows} rows of logits {:?}",
            u.numel(),
            logits.shape()
        );
        let y = launch::sample_inverse_cdf(
            &*on.dev,
            &bridge::dt(&logits.reshape(&[rows, v])?)?,
            // the kernel reads f64 uniforms
            &bridge::dt_as(&u.reshape(&[rows])?, DType::F64)?,
            tau,
        )?;
        let shape = &logits.shape()[..logits.rank() - 1];
        return bridge::back(&on, y)?.reshape(shape);
    }
    let (rows, vocab, d, lc) = logits_rv(OP, logits)?;
    let us = per_row_f64(OP, "u", u, rows)?;
    if let Some(r) = us.iter().position(|&x| !(x > 0.0 && x < 1.0)) {
        bail!("{OP}: u = {} at row {r} is not in (0, 1)", us[r]);
    }
    fn go<T: Float>(
        lc: &Tensor,
        us: &[f64],
        rows: usize,
        vocab: usize,
        tau: f64,
    ) -> Result<Tensor> {
        let data = lc.cpu_data::<T>()?;
        let res = map_rows(OP, &data, rows, vocab, |r, row| sample_row(row, us[r], tau))?;
        let mut out = OutBuf::<u32>::uninit(rows);
        for (o, t) in out.as_mut_slice().iter_mut().zip(res) {
            *o = t.map_err(|e| anyhow::anyhow!(e.message(OP, None)))? as u32;
        }
        out.finish(&[rows], None)
    }
    crate::dispatch_float!(OP, d, go::<T>(&lc, &us, rows, vocab, tau))
}

/// Noise inversion: for each row, the `u` with
/// `sample_inverse_cdf(logits, u, tau) == tokens` exactly, at fraction `r` of
/// the token's interval: `u = CDF(x-1) + (CDF(x) - CDF(x-1)) * r` from the
/// sampler's own running sums, then clamped into the set of f64 values the
/// sampler maps to `x` (so the round trip holds bit for bit). `logits [R, V]`
/// f32/f64, `tokens` u32 `[R]`, `r [R]` float in [0, 1]. Returns f64 `[R]`:
/// keep it in f64 where it is fed back to the sampler (an f32 cast may move it
/// out of the interval). Errors: a token of probability zero, or one whose
/// probability is too small for the f64 running sum to separate it from its
/// predecessor (no u samples it), a token id out of range, NaN logits.
pub fn inverse_cdf_noise(logits: &Tensor, tokens: &Tensor, r: &Tensor, tau: f64) -> Result<Tensor> {
    const OP: &str = "inverse_cdf_noise";
    check_tau(OP, tau)?;
    let (rows, vocab, d, lc) = logits_rv(OP, logits)?;
    ensure!(
        tokens.dtype() == DType::U32,
        "{OP}: tokens must be u32, got {}",
        tokens.dtype()
    );
    crate::util::expect_shape(OP, "tokens", tokens, &[rows])?;
    let toks = tokens.to_vec::<u32>()?;
    let rs = per_row_f64(OP, "r", r, rows)?;
    if let Some(i) = rs.iter().position(|x| !(0.0..=1.0).contains(x)) {
        bail!("{OP}: r = {} at row {i} is not in [0, 1]", rs[i]);
    }
    fn go<T: Float>(
        lc: &Tensor,
        toks: &[u32],
        rs: &[f64],
        rows: usize,
        vocab: usize,
        tau: f64,
    ) -> Result<Tensor> {
        let data = lc.cpu_data::<T>()?;
        let res = map_rows(OP, &data, rows, vocab, |i, row| {
            noise_row(row, toks[i] as usize, rs[i], tau)
        })?;
        let mut out = OutBuf::<f64>::uninit(rows);
        for (o, u) in out.as_mut_slice().iter_mut().zip(res) {
            *o = u.map_err(|e| anyhow::anyhow!(e.message(OP, None)))?;
        }
        out.finish(&[rows], None)
    }
    crate::dispatch_float!(OP, d, go::<T>(&lc, &toks, &rs, rows, vocab, tau))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(v: &[f64], r: usize) -> Tensor {
        Tensor::from_slice(v, &[r, v.len() / r], Device::Cpu).unwrap()
    }
    fn vec1(v: &[f64]) -> Tensor {
        Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap()
    }
    fn err(r: Result<Tensor>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn exp_nonpos_is_within_2_ulp_of_libm() {
        let ulps = |a: f64, b: f64| (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs();
        let mut worst = 0;
        let n = 2_000_000;
        for i in 0..=n {
            // dense near 0, then the whole range down to the flush point
            let x = if i % 2 == 0 {
                -(i as f64) / n as f64
            } else {
                -708.0 * (i as f64) / n as f64
            };
            let (got, want) = (exp_nonpos(x), x.exp());
            worst = worst.max(ulps(got, want));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        eprintln!("exp_nonpos worst error {worst} ulp");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert_eq!(exp_nonpos(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-708.5), 0.0);
        assert_eq!(exp_nonpos(-1000.0), 0.0);
        assert!(exp_nonpos(-707.9) > 0.0);
    }

    #[test]
    fn round_trip_every_token_across_blocks_and_groups() {
        // two full groups of blocks, three more blocks and a partial one, so
        // both summation paths and every block boundary are crossed
        let v = 2 * GROUP * BLOCK + 3 * BLOCK + 17;
        let mut state = 0x1234_5678u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut row: Vec<f32> = (0..v).map(|_| (next() * 12.0 - 6.0) as f32).collect();
        row[0] = f32::NEG_INFINITY;
        row[BLOCK] = f32::NEG_INFINITY;
        row[v - 1] = f32::NEG_INFINITY;
        for tau in [0.5, 1.0] {
            let mut prev_hi = 0.0;
            for x in 0..v {
                for r in [0.0, 0.5, 1.0] {
                    match inverse_cdf_noise_row(&row, x as u32, r, tau) {
                        Ok(u) => {
                            assert!(u >= prev_hi, "u must grow with the token");
                            assert_eq!(inverse_cdf_row(&row, u, tau).unwrap(), x as u32);
                            prev_hi = u;
                        }
                        Err(e) => {
                            let w = ((row[x] as f64 - 6.0) / tau).exp();
                            assert!(w < 1e-12, "token {x}: {e:#}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_example_by_hand() {
        // p = softmax(ln [1, 2, 0, 1]) = [0.25, 0.5, 0, 0.25]
        let l = [0f64, 2f64.ln(), f64::NEG_INFINITY, 0.0];
        for (u, want) in [
            (0.1, 0),
            (0.25, 0),
            (0.26, 1),
            (0.74, 1),
            (0.76, 3),
            (0.999, 3),
        ] {
            assert_eq!(inverse_cdf_row(&l, u, 1.0).unwrap(), want, "u={u}");
        }
        assert_eq!(inverse_cdf_row(&l, 0.9, 0.0).unwrap(), 1); // greedy
    }

    #[test]
    fn plus_infinity_is_the_softmax_limit() {
        let l = [0f32, f32::INFINITY, 3.0, f32::INFINITY];
        assert_eq!(inverse_cdf_row(&l, 0.3, 1.0).unwrap(), 1);
        assert_eq!(inverse_cdf_row(&l, 0.7, 1.0).unwrap(), 3);
        assert_eq!(inverse_cdf_row(&l, 0.7, 0.0).unwrap(), 1);
    }

    #[test]
    fn errors_name_the_row() {
        let l = logits(&[0.0, 1.0, 0.5, f64::NAN], 2);
        let e = err(sample_inverse_cdf(&l, &vec1(&[0.5, 0.5]), 1.0));
        assert!(e.contains("logits contain NaN at row 1"), "{e}");
        let e = err(sample_inverse_cdf(&l, &vec1(&[0.5, 0.5]), 0.0));
        assert!(e.contains("NaN at row 1"), "{e}");
        let l = logits(&[0.0, 1.0, f64::NEG_INFINITY, f64::NEG_INFINITY], 2);
        let e = err(sample_inverse_cdf(&l, &vec1(&[0.5, 0.5]), 1.0));
        assert!(e.contains("all logits are -inf at row 1"), "{e}");
        let l = logits(&[0.0, 1.0, 0.0, 1.0], 2);
        for bad in [0.0, 1.0, -0.5, f64::NAN] {
            let e = err(sample_inverse_cdf(&l, &vec1(&[0.5, bad]), 1.0));
            assert!(e.contains("at row 1 is not in (0, 1)"), "{e}");
        }
        for tau in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(sample_inverse_cdf(&l, &vec1(&[0.5, 0.5]), tau).is_err());
        }
        assert!(sample_inverse_cdf(&l, &vec1(&[0.5]), 1.0).is_err()); // shape
        let ids = Tensor::from_slice(&[1u32, 2], &[2], Device::Cpu).unwrap();
        assert!(sample_inverse_cdf(&l, &ids, 1.0).is_err()); // u not float
        assert!(sample_inverse_cdf(&vec1(&[0.0, 1.0]), &vec1(&[0.5]), 1.0).is_err()); // rank
        let empty = Tensor::zeros(&[2, 0], DType::F32, Device::Cpu).unwrap();
        assert!(sample_inverse_cdf(&empty, &vec1(&[0.5, 0.5]), 1.0).is_err());
        let none = Tensor::zeros(&[0, 5], DType::F32, Device::Cpu).unwrap();
        let out = sample_inverse_cdf(&none, &vec1(&[]), 1.0).unwrap();
        assert_eq!(out.shape(), &[0]);
    }

    #[test]
    fn noise_errors() {
        let l = logits(&[0.0, f64::NEG_INFINITY, 1.0, 2.0], 2);
        let toks = |a: u32, b: u32| Tensor::from_slice(&[a, b], &[2], Device::Cpu).unwrap();
        let r = vec1(&[0.5, 0.5]);
        let e = err(inverse_cdf_noise(&l, &toks(1, 0), &r, 1.0));
        assert!(e.contains("token 1 at row 0 has probability zero"), "{e}");
        let e = err(inverse_cdf_noise(&l, &toks(0, 2), &r, 1.0));
        assert!(e.contains("out of range"), "{e}");
        let e = err(inverse_cdf_noise(&l, &toks(0, 0), &r, 0.0));
        assert!(e.contains("token 0 at row 1 has probability zero"), "{e}");
        assert!(inverse_cdf_noise(&l, &toks(0, 0), &vec1(&[0.5, 1.5]), 1.0).is_err());
        // probability 1e-40 after a mass of ~1: positive but unresolvable
        let l = logits(&[0.0, -92.0], 1);
        let t1 = Tensor::from_slice(&[1u32], &[1], Device::Cpu).unwrap();
        let e = err(inverse_cdf_noise(&l, &t1, &vec1(&[0.5]), 1.0));
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn noise_round_trip_exhaustive_small_v() {
        // Every token of every row, r at both ends and inside, several taus,
        // rows with -inf entries and with near-ties.
        let rows: Vec<Vec<f64>> = vec![
            vec![0.0],
            vec![0.0, 0.0],
            vec![f64::NEG_INFINITY, 3.0, -2.0, f64::NEG_INFINITY, 0.5],
            vec![1.0, 1.0 + 1e-15, 1.0, -30.0, 30.0],
            vec![-1000.0, 2.0, 2.0, 2.0, -1000.0, 7.0],
            vec![0.3, -0.7, 1.9, 0.0, 0.0, 0.0, -5.0],
        ];
        for row in &rows {
            for tau in [0.0, 0.25, 0.5, 1.0, 2.0, 1e6] {
                for (x, _) in row.iter().enumerate() {
                    for r in [0.0, 1e-300, 0.3, 0.5, 1.0 - 1e-16, 1.0] {
                        match inverse_cdf_noise_row(row, x as u32, r, tau) {
                            Ok(u) => {
                                assert!(u > 0.0 && u < 1.0);
                                let got = inverse_cdf_row(row, u, tau).unwrap();
                                assert_eq!(got, x as u32, "row {row:?} tau {tau} r {r} u {u}");
                                let got32: Vec<f32> = row.iter().map(|&v| v as f32).collect();
                                if let Ok(u32_) = inverse_cdf_noise_row(&got32, x as u32, r, tau) {
                                    assert_eq!(
                                        inverse_cdf_row(&got32, u32_, tau).unwrap(),
                                        x as u32
                                    );
                                }
                            }
                            Err(e) => {
                                // only zero-probability tokens may fail here
                                let s = format!("{e:#}");
                                assert!(s.contains("probability zero") || s.contains("too small"));
                                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                                let w = if tau == 0.0 {
                                    (row.iter().position(|&v| v == m) != Some(x)) as u8 as f64
                                } else {
                                    ((row[x] - m) / tau).exp()
                                };
                                assert!(tau == 0.0 || w < 1e-15, "{s} (w = {w})");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, run, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::{bail, ensure, Result};
    use kf_engine::DType;
    use kf_kernels::sampling;

    /// Token sentinels of the argmax and sampling kernels.
    pub const TOKEN_NAN: u32 = 0xffff_ffff;

    pub const TOKEN_ALL_NEG_INF: u32 = 0xffff_fffe;

    /// Inverse-CDF sampling (`kf_ops::sampling::sample_inverse_cdf`) of `logits [R, V]` at
    /// temperature `tau` (0 = greedy) with f64 uniforms `u [R]`: tokens `[R]` u32 (sentinels as in
    /// [`argmax_penalty`]).
    pub fn sample_inverse_cdf<D: KernelDevice + ?Sized>(
        dev: &D,
        logits: &DTensor,
        u: &DTensor,
        tau: f64,
    ) -> Out {
        let op = "sample_inverse_cdf";
        f32_in(op, "logits", logits)?;
        u.expect_dtype(op, "u", DType::F64)?;
        ensure!(
            logits.rank() == 2,
            "{op}: logits must be [R, V], got {:?}",
            logits.shape()
        );
        let (rows, v) = (logits.shape()[0], logits.shape()[1]);
        ensure!(
            u.shape() == [rows],
            "{op}: u {:?} must be [{rows}]",
            u.shape()
        );
        ensure!(v >= 1, "{op}: empty vocabulary");
        ensure!(
            tau.is_finite() && tau >= 0.0,
            "{op}: tau {tau} must be finite and >= 0"
        );
        let cfg = sampling::config(rows, v).map_err(|e| anyhow::anyhow!("{op}: {e}"))?;
        let out = DTensor::uninit(dev, &[rows], DType::U32)?;
        if rows > 0 {
            run(
                dev,
                "sample_inverse_cdf_f32",
                cfg,
                &[
                    KArg::Buf(&logits.buf),
                    KArg::Buf(&u.buf),
                    KArg::Buf(&out.buf),
                    KArg::U32(rows as u32),
                    KArg::U32(v as u32),
                    KArg::F64(tau),
                ],
            )?;
        }
        Ok(out)
    }

    /// Tokens on the host; a sentinel (a NaN or all -inf logit row) is an error naming its index.
    pub fn tokens_to_host<D: KernelDevice + ?Sized>(dev: &D, tokens: &DTensor) -> Result<Vec<u32>> {
        let t = tokens.to_vec::<D, u32>(dev)?;
        check_token_markers(&t, tokens.shape())?;
        Ok(t)
    }

    /// An error naming the first token of `t` (shaped `shape`) that is a kernel's marker of a
    /// NaN or all -inf logit row.
    pub fn check_token_markers(t: &[u32], shape: &[usize]) -> Result<()> {
        if let Some(i) = t
            .iter()
            .position(|&x| x == TOKEN_NAN || x == TOKEN_ALL_NEG_INF)
        {
            bail!(
                "token {i} of {shape:?}: its logit row {}",
                if t[i] == TOKEN_NAN {
                    "holds NaN"
                } else {
                    "is all -inf"
                }
            );
        }
        Ok(())
    }
}
