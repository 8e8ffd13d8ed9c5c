//! Numeric edge cases (issue 8.4) of the sampler (`sample_inverse_cdf`) and of the
//! student's read-off (`argmax_penalty`), as a seeded sweep of awkward rows rather than
//! hand-picked examples (those are in tests/tests/fused_sampling.rs and the unit tests):
//! -inf entries, all-equal rows, +inf, huge magnitudes, V = 1, u at 0+ and just below 1,
//! tau -> 0 and very large tau, NaN (an error, never a token), and frequency penalties
//! whose product with a count overflows f64. R rows, V vocabulary, B batch, K positions.

use kf_engine::{DType, Device, Tensor};
use kf_ops::argmax::argmax_penalty;
use kf_ops::sampling::sample_inverse_cdf;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An awkward row of `v` logits.
fn row(g: &mut Rng, v: usize) -> Vec<f64> {
    let kind = g.below(7);
    (0..v)
        .map(|_| match kind {
            0 => 0.0,                                  // all equal
            1 if g.below(2) == 0 => f64::NEG_INFINITY, // many -inf
            2 => (g.unit() - 0.5) * 1e30,              // huge spread
            3 => 1e30 + g.below(3) as f64 * 1e15,      // huge, near ties
            4 if g.below(4) == 0 => -1e30,             // one -1e30 tail
            5 => [1.0, 1.0, 2.0, 2.0][g.below(4)],     // exact ties
            _ => (g.unit() - 0.5) * 20.0,              // ordinary
        })
        .collect()
}

const U_EDGES: [f64; 6] = [
    f64::MIN_POSITIVE,
    1e-300,
    1e-17,
    0.5,
    1.0 - 1e-16,
    0.999_999_999_999_999_9, // rounds to the largest f64 below 1
];

#[test]
fn sampler_sweep_never_returns_an_impossible_token() {
    let mut g = Rng(0xED6E);
    let mut cases = 0;
    for _ in 0..400 {
        let v = [1, 2, 3, 63, 64, 65, 1025][g.below(7)];
        let l = row(&mut g, v);
        let finite_max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        for dtype in [DType::F32, DType::F64] {
            let t = Tensor::from_slice(&l, &[1, v], Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lt = t.to_vec_f64().unwrap(); // as the sampler sees them
            let m = lt.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            for &tau in &[0.0, 1e-300, 1e-12, 0.5, 1.0, 1e6, 1e300] {
                for &u in &U_EDGES {
                    cases += 1;
                    let ut = Tensor::from_slice(&[u], &[1], Device::Cpu).unwrap();
                    let r = sample_inverse_cdf(&t, &ut, tau);
                    if finite_max == f64::NEG_INFINITY {
                        let e = format!("{:#}", r.unwrap_err());
                        assert!(e.contains("-inf"), "{e}");
                        continue;
                    }
                    if tau > 0.0 && !(1.0 / tau).is_finite() {
                        // tau = 1e-300: 1/tau overflows; an error that says use 0
                        let e = format!("{:#}", r.unwrap_err());
                        assert!(e.contains("tau"), "{e}");
                        continue;
                    }
                    let tok = r.unwrap().to_vec::<u32>().unwrap()[0] as usize;
                    assert!(tok < v);
                    assert!(
                        lt[tok] > f64::NEG_INFINITY,
                        "a -inf token: {l:?} tau {tau} u {u}"
                    );
                    if tau == 0.0 {
                        assert_eq!(tok, lt.iter().position(|&x| x == m).unwrap());
                    }
                    if tau == 1e-12 && lt.iter().all(|x| x.is_finite()) {
                        // tau -> 0: a maximum (any of tied ones), unless the gap to the
                        // runner-up is itself below ~tau
                        let gap = lt
                            .iter()
                            .filter(|&&x| x < m)
                            .fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                        if m - gap > 1e-9 {
                            assert_eq!(lt[tok], m, "tau 1e-12 must pick a maximum");
                        }
                    }
                }
            }
        }
    }
    assert!(cases > 30_000, "{cases}");
}

#[test]
fn sampler_huge_tau_is_uniform_over_possible_tokens() {
    // tau = 1e300: every finite logit has weight 1 (exp(~0)); -inf keeps weight 0
    let l = [3.0, f64::NEG_INFINITY, -1e6, 1e6, f64::NEG_INFINITY, 0.0];
    let t = Tensor::from_slice(&l, &[1, 6], Device::Cpu).unwrap();
    let mut seen = [0usize; 6];
    for i in 0..400 {
        let u = (i as f64 + 0.5) / 400.0;
        let ut = Tensor::from_slice(&[u], &[1], Device::Cpu).unwrap();
        let tok = sample_inverse_cdf(&t, &ut, 1e300)
            .unwrap()
            .to_vec::<u32>()
            .unwrap()[0];
        seen[tok as usize] += 1;
    }
    assert_eq!(seen, [100, 0, 100, 100, 0, 100]);
}

#[test]
fn sampler_nan_anywhere_is_an_error() {
    let mut g = Rng(7);
    for _ in 0..200 {
        let v = 1 + g.below(200);
        let mut l = row(&mut g, v);
        let at = g.below(v);
        l[at] = f64::NAN;
        for dtype in [DType::F32, DType::F64] {
            let t = Tensor::from_slice(&l, &[1, v], Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for tau in [0.0, 1.0] {
                let ut = Tensor::from_slice(&[0.5], &[1], Device::Cpu).unwrap();
                let e = format!("{:#}", sample_inverse_cdf(&t, &ut, tau).unwrap_err());
                assert!(
                    e.contains("NaN") && e.contains(&format!("index {at}")),
                    "{e}"
                );
            }
        }
    }
}

fn readoff(
    l: &[f64],
    b: usize,
    k: usize,
    v: usize,
    counts: &[u32],
    p: f64,
) -> anyhow::Result<Vec<u32>> {
    let lt = Tensor::from_slice(l, &[b, k, v], Device::Cpu)?;
    let c = Tensor::from_slice(counts, &[b, v], Device::Cpu)?;
    argmax_penalty(&lt, &c, p)?.to_vec::<u32>()
}

#[test]
fn readoff_sweep() {
    let mut g = Rng(0xA6);
    for _ in 0..2000 {
        let (b, k) = (1 + g.below(3), 1 + g.below(4));
        let v = [1, 2, 5, 64, 65][g.below(5)];
        let l: Vec<f64> = (0..b * k).flat_map(|_| row(&mut g, v)).collect();
        let counts: Vec<u32> = (0..b * v)
            .map(|_| [0, 1, 7, u32::MAX][g.below(4)])
            .collect();
        let p = [0.0, 0.5, -0.5, 1e300, -1e300, f64::MAX][g.below(6)];
        let res = readoff(&l, b, k, v, &counts, p);
        for bi in 0..b {
            for i in 0..k {
                let r = &l[(bi * k + i) * v..(bi * k + i + 1) * v];
                let all_neg_inf = r.iter().all(|&x| x == f64::NEG_INFINITY);
                match &res {
                    Ok(t) => {
                        let tok = t[bi * k + i] as usize;
                        assert!(tok < v);
                        assert!(r[tok] > f64::NEG_INFINITY, "-inf token read off");
                        if p == 0.0 {
                            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            assert_eq!(tok, r.iter().position(|&x| x == m).unwrap());
                        }
                    }
                    Err(e) => {
                        // only a position whose logits are all -inf may fail, and the
                        // first failing one is named
                        let e = format!("{e:#}");
                        assert!(e.contains("all logits are -inf"), "{e}");
                        let _ = all_neg_inf;
                    }
                }
            }
        }
        if let Err(e) = &res {
            let any = (0..b * k).any(|j| {
                l[j * v..(j + 1) * v]
                    .iter()
                    .all(|&x| x == f64::NEG_INFINITY)
            });
            assert!(any, "error without an all -inf position: {e:#}");
        }
    }
}

#[test]
fn readoff_edges() {
    // V = 1: the only token, whatever the penalty
    assert_eq!(
        readoff(&[5.0, -3.0], 1, 2, 1, &[9], 2.0).unwrap(),
        vec![0, 0]
    );
    // all equal: the first; with a penalty the block moves on to unused tokens
    assert_eq!(
        readoff(&[0.0; 9], 1, 3, 3, &[0; 3], 1.0).unwrap(),
        vec![0, 1, 2]
    );
    // a penalty so large that penalty * count overflows f64 is not "all -inf": the
    // unpenalised token wins, and with every token counted the first maximum does
    let t = readoff(&[1.0, 2.0, 3.0], 1, 1, 3, &[2, 2, 0], f64::MAX).unwrap();
    assert_eq!(t, vec![2]);
    let t = readoff(&[1.0, 2.0, 3.0], 1, 1, 3, &[2, 2, 2], f64::MAX).unwrap();
    assert_eq!(t.len(), 1);
    // +inf logits win over any penalty, -inf never does
    let t = readoff(
        &[f64::NEG_INFINITY, f64::INFINITY, 0.0],
        1,
        1,
        3,
        &[0, 5, 0],
        1e300,
    )
    .unwrap();
    assert_eq!(t, vec![1]);
    // NaN: an error naming the position, for f32 and f64
    let mut l = vec![0.0; 2 * 2 * 3];
    l[(2 + 1) * 3 + 2] = f64::NAN;
    let e = format!("{:#}", readoff(&l, 2, 2, 3, &[0; 6], 0.5).unwrap_err());
    assert!(e.contains("NaN at (b 1, i 1)"), "{e}");
    let l32 = Tensor::from_slice(&l, &[2, 2, 3], Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let c = Tensor::zeros(&[2, 3], DType::U32, Device::Cpu).unwrap();
    assert!(argmax_penalty(&l32, &c, 0.0).is_err());
}
