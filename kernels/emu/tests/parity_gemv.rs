//! Emulated-kernel parity for the gemv family (kernels/gemv.cu) through its launcher,
//! `kf_ops::kdev::launch::matmul_into` with f16 / bf16 weights: `C = A · Wᵀ (+ beta C)` against
//! the f64 sum of the f32 products with the widened weights, on ragged shapes (K off the 8-wide
//! vector path and the 256-element warp stride, N off the 8 columns of a block, M off the 8 rows
//! of a block, one row, and past `gemv::MAX_ROWS`, where the launcher widens the weights and runs
//! the f32 GEMM), with the offsets and leading dimensions of the model's uses (q, k, v from the
//! row blocks of one [3d, d] weight; the noise encoder's column halves of a [d, 2d] weight, the
//! second accumulating with beta 1); both paths (gemv and widen + GEMM) agree with the f32 GEMM on
//! the widened weights; and calls the launcher must refuse. With `--features cuda`, the same on a
//! GPU (skipped without one). Letters: M rows, N output columns, K inputs.

use half::{bf16, f16};
use kf_engine::emu::Emu;
use kf_engine::DType;
use kf_kernels::gemv;
use kf_ops::kdev::launch as kl;
use kf_ops::kdev::{DTensor, GemmSpec, KernelDevice};
use kf_tests::harness::Gen;

/// One f32 rounding, relative.
const ULP: f64 = 1.0 / (1u64 << 24) as f64;

fn vals(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    Gen::new(seed)
        .vec(n, lo, hi)
        .iter()
        .map(|&x| x as f32)
        .collect()
}

/// Weights in `dt` (f16 or bf16) on the device, and their exact f32 values.
fn weights<D: KernelDevice + ?Sized>(
    dev: &D,
    dt: DType,
    v: &[f32],
    shape: &[usize],
) -> (DTensor, Vec<f32>) {
    match dt {
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let wide = h.iter().map(|x| x.to_f32()).collect();
            (DTensor::from_slice(dev, &h, shape).unwrap(), wide)
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let wide = h.iter().map(|x| x.to_f32()).collect();
            (DTensor::from_slice(dev, &h, shape).unwrap(), wide)
        }
        _ => unreachable!("f16 or bf16"),
    }
}

/// `spec` computed in f64 over f32 values (`w` widened), with each element's bound: a few f32
/// roundings of the sum of the magnitudes of its terms (K products and beta C).
fn reference(spec: &GemmSpec, a: &[f32], w: &[f32], c0: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut want = c0.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let mut bound = vec![0.0; c0.len()];
    for r in 0..spec.m {
        for j in 0..spec.n {
            let (mut s, mut mag) = (0.0f64, 0.0f64);
            for i in 0..spec.k {
                let p = a[spec.a_off + r * spec.lda + i] as f64
                    * w[spec.b_off + j * spec.ldb + i] as f64;
                s += p;
                mag += p.abs();
            }
            let o = spec.c_off + r * spec.ldc + j;
            let prev = if spec.beta != 0.0 {
                spec.beta as f64 * c0[o] as f64
            } else {
                0.0
            };
            want[o] = s + prev;
            bound[o] = (mag + prev.abs()) * ULP * (spec.k as f64).sqrt().max(4.0) * 4.0 + 1e-30;
        }
    }
    (want, bound)
}

fn check<D: KernelDevice + ?Sized>(
    dev: &D,
    dt: DType,
    spec: &GemmSpec,
    seed: u64,
    what: &str,
) -> Vec<f32> {
    let a_len = spec.a_off + spec.m.saturating_sub(1) * spec.lda + spec.k;
    let w_len = spec.b_off + spec.n.saturating_sub(1) * spec.ldb + spec.k;
    let c_len = spec.c_off + spec.m.saturating_sub(1) * spec.ldc + spec.n;
    let a = vals(seed, a_len, -1.0, 1.5);
    let (w, wide) = weights(dev, dt, &vals(seed + 1, w_len, -1.0, 1.0), &[w_len]);
    let c0 = vals(seed + 2, c_len, -2.0, 2.0);
    let da = DTensor::from_slice(dev, &a, &[a_len]).unwrap();
    let dc = DTensor::from_slice(dev, &c0, &[c_len]).unwrap();
    kl::matmul_into(dev, spec, &da, &w, &dc).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let got = dc.to_vec::<D, f32>(dev).unwrap();
    let (want, bound) = reference(spec, &a, &wide, &c0);
    // elements outside C's rows / columns stay as they were
    for (o, (&g, (&wv, &bd))) in got.iter().zip(want.iter().zip(&bound)).enumerate() {
        let err = (g as f64 - wv).abs();
        assert!(
            err <= bd,
            "{what} {dt:?}: C[{o}] = {g}, want {wv} (error {err:e} > bound {bd:e}; {spec:?})"
        );
    }
    // the same product with the widened weights on the f32 GEMM
    let dw = DTensor::from_slice(dev, &wide, &[w_len]).unwrap();
    let dc32 = DTensor::from_slice(dev, &c0, &[c_len]).unwrap();
    kl::matmul_into(dev, spec, &da, &dw, &dc32).unwrap();
    for (o, (&g, &h)) in got
        .iter()
        .zip(&dc32.to_vec::<D, f32>(dev).unwrap())
        .enumerate()
    {
        let err = (g as f64 - h as f64).abs();
        assert!(
            err <= 2.0 * bound[o],
            "{what} {dt:?}: C[{o}] = {g} on half weights, {h} on the f32 GEMM ({spec:?})"
        );
    }
    got
}

/// (M, N, K): one row; K 1 and 7 (scalar path) and 8, 264 and 1000 (vector path, ragged against
/// the warp's 256-element stride); N off the 8-column block; M 8, 9 and 17 (row blocks), the
/// last row count of the gemv path, and two past it (widen + f32 GEMM).
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 33, 8),
    (3, 31, 7),
    (8, 257, 264),
    (9, 65, 300),
    (17, 40, 1000),
    (gemv::MAX_ROWS, 9, 64),
    (gemv::MAX_ROWS + 1, 9, 64),
    (130, 33, 72),
];

#[test]
fn half_weight_products_match_the_f64_sums() {
    on(&Emu);
}

fn on<D: KernelDevice + ?Sized>(dev: &D) {
    for dt in [DType::F16, DType::BF16] {
        for (si, &(m, n, k)) in SHAPES.iter().enumerate() {
            for beta in [0.0, 1.0] {
                let spec = GemmSpec {
                    beta,
                    ..GemmSpec::simple(m, n, k, true)
                };
                check(
                    dev,
                    dt,
                    &spec,
                    100 + si as u64,
                    &format!("{m}x{n}x{k} beta {beta}"),
                );
            }
        }
        // q, k, v: row blocks of a [3d, d] weight (offset part * d * d), d = 64, 5 rows
        let d = 64;
        for part in 0..3 {
            let spec = GemmSpec {
                b_off: part * d * d,
                ..GemmSpec::simple(5, d, d, true)
            };
            check(dev, dt, &spec, 7 + part as u64, &format!("qkv part {part}"));
        }
        // the noise encoder: column halves of a [d, 2d] weight, d = 24 (ldb 48; rows 48
        // elements apart keep the vector path), the second half accumulating; also with an
        // odd leading dimension (scalar path) and offsets into A and C
        for (ldb, b_off, beta) in [(48, 0, 0.0), (48, 24, 1.0), (49, 25, 1.0)] {
            let spec = GemmSpec {
                ldb,
                b_off,
                beta,
                ..GemmSpec::simple(6, 24, 24, true)
            };
            check(dev, dt, &spec, 11, &format!("ldb {ldb} b_off {b_off}"));
            let spec = GemmSpec {
                ldb,
                b_off,
                beta,
                a_off: 3,
                lda: 27,
                c_off: 5,
                ldc: 30,
                ..GemmSpec::simple(70, 24, 24, true)
            };
            check(
                dev,
                dt,
                &spec,
                12,
                &format!("strided ldb {ldb} b_off {b_off}"),
            );
        }
    }
    // the launchers of a linear layer take half weights: linear (+ bias) and linear_acc
    let (m, n, k) = (3, 40, 32);
    let x = vals(21, m * k, -1.0, 1.0);
    let (w16, wide) = weights(dev, DType::F16, &vals(22, n * k, -1.0, 1.0), &[n, k]);
    let dx = DTensor::from_slice(dev, &x, &[m, k]).unwrap();
    let dw32 = DTensor::from_slice(dev, &wide, &[n, k]).unwrap();
    let b = DTensor::from_slice(dev, &vals(23, n, -1.0, 1.0), &[n]).unwrap();
    let y16 = kl::linear(dev, &dx, &w16, Some(&b)).unwrap();
    let y32 = kl::linear(dev, &dx, &dw32, Some(&b)).unwrap();
    assert_eq!(y16.shape(), [m, n]);
    let (g16, g32) = (
        y16.to_vec::<D, f32>(dev).unwrap(),
        y32.to_vec::<D, f32>(dev).unwrap(),
    );
    for (a, b) in g16.iter().zip(&g32) {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "linear: {a} vs {b}"
        );
    }
    kl::linear_acc(dev, &dx, &w16, &y16).unwrap();
    kl::linear_acc(dev, &dx, &dw32, &y32).unwrap();
    let (g16, g32) = (
        y16.to_vec::<D, f32>(dev).unwrap(),
        y32.to_vec::<D, f32>(dev).unwrap(),
    );
    for (a, b) in g16.iter().zip(&g32) {
        assert!(
            (a - b).abs() <= 2e-5 * (1.0 + b.abs()),
            "linear_acc: {a} vs {b}"
        );
    }
    // refused before any launch: a transposed A, a batch, alpha != 1, half activations, a
    // weight buffer too small for the spec
    let err = |spec: GemmSpec, a: &DTensor, w: &DTensor| -> String {
        let c = DTensor::zeros(dev, &[spec.m * spec.n.max(1) + 64], DType::F32).unwrap();
        match kl::matmul_into(dev, &spec, a, w, &c) {
            Ok(()) => panic!("{spec:?} ran"),
            Err(e) => format!("{e:#}"),
        }
    };
    let base = GemmSpec::simple(m, n, k, true);
    let e = err(
        GemmSpec {
            trans_a: true,
            lda: m,
            ..base
        },
        &dx,
        &w16,
    );
    assert!(e.contains("only C = A · Wᵀ"), "{e}");
    let e = err(GemmSpec { alpha: 2.0, ..base }, &dx, &w16);
    assert!(e.contains("alpha 1"), "{e}");
    let e = err(GemmSpec { batch: 2, ..base }, &dx, &w16);
    assert!(e.contains("batch 1"), "{e}");
    let (xh, _) = weights(dev, DType::F16, &x, &[m, k]);
    let e = err(base, &xh, &w16);
    assert!(
        e.contains("A") && e.contains("F16") || e.contains("f16"),
        "{e}"
    );
    let e = err(GemmSpec::simple(m, n + 1, k, true), &dx, &w16);
    assert!(e.contains("needs"), "{e}");
}

/// The same on a real GPU (`--features cuda`): skipped with the reason when there is none
/// (KF_REQUIRE_GPU=1 makes that a failure).
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_half_weight_products_match_the_f64_sums() {
    let Some(dev) = kf_engine::cuda::Cuda::for_tests() else {
        return;
    };
    on(&dev);
}
