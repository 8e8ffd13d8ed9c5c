//! Harness cases of the non-differentiable K-Forcing ops: noise features of
//! `u`/`tau`, the inverse-CDF sampler and the penalised argmax read-off.
//! Sampled tokens and argmax tokens are compared EXACTLY. N positions,
//! d features, R rows, B batch, K hint positions, V vocabulary.

use crate::harness::{filled, indices, refusing, Case, Gen, Input, Tol};
use kf_engine::Tensor;

pub fn noise_features() -> Vec<Case> {
    refusing(
        noise_cases(),
        [Case::refused(
            "noise_features s [2, 2] (not [N])",
            vec![filled(&[2, 2])],
            |t| Ok(vec![kf_ops::noise::noise_features(&t[0], 4, t[0].dtype())?]),
            "noise_features",
        )],
    )
}

pub fn sample_inverse_cdf() -> Vec<Case> {
    refusing(
        sample_cases(),
        [Case::refused(
            "sample_inverse_cdf logits [2, 5], u [3]",
            vec![filled(&[2, 5]), filled(&[3])],
            |t| {
                Ok(vec![kf_ops::sampling::sample_inverse_cdf(
                    &t[0], &t[1], 1.0,
                )?])
            },
            "sample_inverse_cdf",
        )],
    )
}

pub fn argmax_penalty() -> Vec<Case> {
    refusing(
        argmax_cases(),
        [Case::refused(
            "argmax_penalty logits [2, 1, 5], counts [2, 4]",
            vec![filled(&[2, 1, 5]), indices(&[2, 4])],
            |t| Ok(vec![kf_ops::argmax::argmax_penalty(&t[0], &t[1], 1.0)?]),
            "argmax_penalty",
        )],
    )
}

// ------------------------------------------------------------ noise features

fn noise_cases() -> Vec<Case> {
    let mut out = vec![];
    for (ci, (&d, &n)) in [2usize, 8, 768].iter().zip(&[5usize, 17, 9]).enumerate() {
        let mut g = Gen::new(100 + ci as u64);
        // u-like values in (0, 1) including the ends of the range, and taus.
        let mut s = vec![1e-7, 1.0 - 1e-7, 0.5, 1.0, 2.0];
        s.extend(g.vec(n - s.len().min(n), 0.0, 1.0));
        s.truncate(n);
        out.push(
            Case::new(
                format!("noise_features n={n} d={d}"),
                vec![Input::float(&[n], s)],
                move |t| Ok(vec![kf_ops::noise::noise_features(&t[0], d, t[0].dtype())?]),
                move |x| vec![ref_noise(&x[0], d)],
            )
            // f32 output: only the final cast rounds (|value| <= 1, so 6e-8),
            // the features are computed in f64 from the same rounded s.
            .tol(Tol::new(1e-6, 0.0))
            .cost((n * d) as f64 * 20.0, (n * 8 + n * d * 4) as f64),
        );
    }
    out
}

/// Independent reference: frequencies via exp/ln, cos block then sin block.
fn ref_noise(s: &[f64], d: usize) -> Vec<f64> {
    let half = d / 2;
    let mut out = vec![0.0; s.len() * d];
    for (n, &sv) in s.iter().enumerate() {
        for j in 0..half {
            let f = (-(10000f64).ln() * j as f64 / half as f64).exp();
            let a = 2.0 * std::f64::consts::PI * sv * f;
            out[n * d + j] = a.cos();
            out[n * d + half + j] = a.sin();
        }
    }
    out
}

// ------------------------------------------------------------------ sampler

/// Naive f64 reference of KFORCING.md section 3: softmax(l / tau), cumulative
/// sum in index order, linear search; tau = 0 is the first maximum.
fn ref_sample_row(l: &[f64], u: f64, tau: f64) -> usize {
    if tau == 0.0 {
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        return l.iter().position(|&x| x == m).unwrap();
    }
    let p = ref_softmax(l, tau);
    let mut cum = 0.0;
    for (v, &pv) in p.iter().enumerate() {
        cum += pv;
        if pv > 0.0 && cum >= u {
            return v;
        }
    }
    p.iter().rposition(|&pv| pv > 0.0).unwrap()
}

fn ref_softmax(l: &[f64], tau: f64) -> Vec<f64> {
    let z: Vec<f64> = l.iter().map(|&x| x / tau).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|&x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|&x| x / s).collect()
}

/// True if `u` is more than 1e-9 away from every cumulative probability of
/// the row, both for the f64 values and after rounding logits and `u` to f32
/// (so op and reference, which differ only in the rounding of the running
/// sum, cannot disagree).
fn clear_of_boundaries(l: &[f64], u: f64, tau: f64) -> bool {
    if tau == 0.0 {
        return true;
    }
    let l32: Vec<f64> = l.iter().map(|&x| x as f32 as f64).collect();
    [(l, u), (&l32[..], u as f32 as f64)]
        .iter()
        .all(|&(row, uu)| {
            if !(uu > 0.0 && uu < 1.0) {
                return false;
            }
            let mut cum = 0.0;
            ref_softmax(row, tau).iter().all(|&p| {
                cum += p;
                (cum - uu).abs() > 1e-9
            })
        })
}

/// `want` if it is clear of boundaries, else a nearby value that is.
fn safe_u(g: &mut Gen, l: &[f64], tau: f64, want: f64) -> f64 {
    let mut u = want;
    for _ in 0..1000 {
        if clear_of_boundaries(l, u, tau) {
            return u;
        }
        // stay on the same side of 0.5 and within (0, 1) even in f32
        u = if want < 0.5 {
            want * g.range(1.0, 3.0)
        } else {
            1.0 - (1.0 - want) * g.range(1.0, 3.0)
        };
    }
    panic!("no u near {want} clear of the CDF boundaries")
}

/// Logits of `rows x v`: normal with standard deviation `std` (quantised to
/// quarters when `ties`), with -inf (the reserved token) at the start, the
/// end or the middle of each row depending on the row, and a -1000 entry.
fn sampler_logits(g: &mut Gen, rows: usize, v: usize, std: f64, ties: bool) -> Vec<f64> {
    let mut l = g.normal_vec(rows * v, std);
    if ties {
        l.iter_mut().for_each(|x| *x = (*x * 4.0).round() / 4.0);
    }
    if v >= 2 {
        for r in 0..rows {
            let row = &mut l[r * v..(r + 1) * v];
            let at = match r % 3 {
                0 => 0,
                1 => v - 1,
                _ => g.below(v as u64) as usize,
            };
            row[at] = f64::NEG_INFINITY;
            if v >= 7 {
                let at2 = (at + 1 + g.below(v as u64 - 1) as usize) % v;
                row[at2] = -1000.0;
            }
        }
    }
    l
}

fn sample_case(name: String, v: usize, l: Vec<f64>, us: Vec<f64>, tau: f64) -> Case {
    let rows = us.len();
    Case::new(
        name,
        vec![Input::float(&[rows, v], l), Input::float(&[rows], us)],
        move |t| {
            Ok(vec![kf_ops::sampling::sample_inverse_cdf(
                &t[0], &t[1], tau,
            )?])
        },
        move |x| {
            let v = x[0].len() / x[1].len();
            vec![x[1]
                .iter()
                .enumerate()
                .map(|(r, &u)| ref_sample_row(&x[0][r * v..(r + 1) * v], u, tau) as f64)
                .collect()]
        },
    )
    .tol(Tol::EXACT)
    .tol_f64(Tol::EXACT)
    .cost((rows * v) as f64 * 25.0, (rows * v * 4 + rows * 8) as f64)
}

fn sample_cases() -> Vec<Case> {
    let mut out = vec![];
    let row_counts = [1usize, 2, 5, 17];
    for (vi, &v) in [1usize, 2, 7, 1000, 30522, 50257].iter().enumerate() {
        for (ti, &tau) in [0.0, 0.5, 1.0, 2.0].iter().enumerate() {
            let rows = row_counts[(vi + ti) % row_counts.len()];
            let mut g = Gen::new(1000 + 10 * vi as u64 + ti as u64);
            let std = if ti % 2 == 0 { 3.0 } else { 1.0 };
            let l = sampler_logits(&mut g, rows, v, std, tau == 0.0 && v <= 1000);
            let us: Vec<f64> = (0..rows)
                .map(|r| {
                    let want = match (r + ti) % 4 {
                        0 => 1e-7,
                        1 => 1.0 - 1e-7,
                        _ => g.range(0.01, 0.99),
                    };
                    safe_u(&mut g, &l[r * v..(r + 1) * v], tau, want)
                })
                .collect();
            out.push(sample_case(
                format!("sample_inverse_cdf R={rows} V={v} tau={tau}"),
                v,
                l,
                us,
                tau,
            ));
        }
    }
    // Edges: the reserved token at both ends of the vocabulary with u next to
    // 0 and 1, so the first/last token of probability zero must be skipped.
    for &v in &[7usize, 50257] {
        let mut g = Gen::new(2000 + v as u64);
        let mut l = g.normal_vec(4 * v, 2.0);
        for r in 0..4 {
            l[r * v] = f64::NEG_INFINITY;
            l[r * v + v - 1] = f64::NEG_INFINITY;
        }
        let wants = [1e-7, 1.0 - 1e-7, 1e-7, 1.0 - 1e-7];
        let us: Vec<f64> = (0..4)
            .map(|r| safe_u(&mut g, &l[r * v..(r + 1) * v], 1.0, wants[r]))
            .collect();
        out.push(sample_case(
            format!("sample_inverse_cdf edges R=4 V={v} tau=1"),
            v,
            l,
            us,
            1.0,
        ));
    }
    out
}

// ------------------------------------------------------------------ argmax

fn ref_argmax(l: &[f64], counts: &[f64], b: usize, k: usize, penalty: f64) -> Vec<Vec<f64>> {
    let v = counts.len() / b;
    let mut c = counts.to_vec();
    let mut toks = vec![0.0; b * k];
    for bi in 0..b {
        for i in 0..k {
            let row = &l[(bi * k + i) * v..(bi * k + i + 1) * v];
            let mut best = 0;
            for j in 1..v {
                if row[j] - penalty * c[bi * v + j] > row[best] - penalty * c[bi * v + best] {
                    best = j;
                }
            }
            toks[bi * k + i] = best as f64;
            c[bi * v + best] += 1.0;
        }
    }
    vec![toks, c]
}

fn argmax_cases() -> Vec<Case> {
    let mut out = vec![];
    let shapes = [
        (1usize, 1usize, 1usize),
        (3, 4, 7),
        (2, 8, 7),
        (5, 1, 1000),
        (3, 8, 1000),
        (2, 4, 50257),
    ];
    for (si, &(b, k, v)) in shapes.iter().enumerate() {
        for (pi, &penalty) in [0.0, 0.3, 1.0].iter().enumerate() {
            let mut g = Gen::new(3000 + 10 * si as u64 + pi as u64);
            // Quartered logits in a narrow range make exact ties common; for
            // the real vocabulary, continuous logits with a few planted ties.
            let mut l: Vec<f64> = if v <= 1000 {
                (0..b * k * v)
                    .map(|_| (g.range(-2.0, 2.0) * 4.0).round() / 4.0)
                    .collect()
            } else {
                g.normal_vec(b * k * v, 2.0)
            };
            if v >= 7 {
                for row in l.chunks_mut(v) {
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let at = g.below(v as u64) as usize;
                    row[at] = m; // a tie with the maximum somewhere
                    row[(at + 1) % v] = f64::NEG_INFINITY;
                }
            }
            let counts: Vec<u32> = (0..b * v)
                .map(|_| {
                    if g.below(3) == 0 {
                        g.below(4) as u32
                    } else {
                        0
                    }
                })
                .collect();
            out.push(
                Case::new(
                    format!("argmax_penalty B={b} K={k} V={v} penalty={penalty}"),
                    vec![Input::float(&[b, k, v], l), Input::index(&[b, v], counts)],
                    move |t| {
                        // The op updates counts in place: work on a copy so a
                        // case run twice sees the same input.
                        let c =
                            Tensor::from_vec(t[1].to_vec::<u32>()?, t[1].shape(), t[1].device())?;
                        let toks = kf_ops::argmax::argmax_penalty(&t[0], &c, penalty)?;
                        Ok(vec![toks, c])
                    },
                    move |x| ref_argmax(&x[0], &x[1], b, k, penalty),
                )
                .tol(Tol::EXACT)
                .tol_f64(Tol::EXACT)
                .cost((b * k * v) as f64 * 3.0, (b * k * v * 4 + b * v * 8) as f64),
            );
        }
    }
    out
}
