//! Harness cases of the normalisation / activation / loss family: layer norm
//! (with and without bias), RMSNorm, rope, SwiGLU, the two GELUs (and GELU with its bias), softmax (and
//! log-softmax) and the fused cross-entropy, and the inputs each must refuse. References are naive f64 loops written apart from
//! the ops. Letters: R rows, D features, B T H D for rope, N rows and V vocab.

use crate::harness::{filled, indices, refusing, Case, Gen, Input};
use kf_engine::Tensor;

/// The DDiT LayerNorm epsilon.
const EPS: f64 = 1e-5;
/// The RoPE base of the backbone.
pub(crate) const ROPE_BASE: f64 = 10000.0;

/// Plain RoPE at [`ROPE_BASE`].
pub(crate) fn plain_rope() -> kf_ops::rope::RopeFreqs {
    kf_ops::rope::RopeFreqs::plain(ROPE_BASE)
}
/// GPT-2's vocabulary: the real size a logits row has.
const BIG_V: usize = 50257;

pub fn layer_norm() -> Vec<Case> {
    refusing(
        layer_norm_cases(false),
        [Case::refused(
            "layer_norm x [2, 4], weight [3]",
            vec![filled(&[2, 4]), filled(&[3])],
            |t| {
                Ok(vec![kf_ops::layernorm::layer_norm(
                    &t[0], &t[1], None, EPS,
                )?])
            },
            "layer_norm",
        )],
    )
}

pub fn layer_norm_bias() -> Vec<Case> {
    refusing(
        layer_norm_cases(true),
        [Case::refused(
            "layer_norm x [2, 4], weight [4], bias [3]",
            vec![filled(&[2, 4]), filled(&[4]), filled(&[3])],
            |t| {
                Ok(vec![kf_ops::layernorm::layer_norm(
                    &t[0],
                    &t[1],
                    Some(&t[2]),
                    EPS,
                )?])
            },
            "layer_norm",
        )],
    )
}

/// RMSNorm: widths 1 to 768 (SmolLM2's 576 among them), leading dims [D], [3, D], [1, 17, D].
pub fn rms_norm() -> Vec<Case> {
    let mut cases = vec![];
    for &d in &[1usize, 2, 7, 64, 129, 576] {
        for &rows in &[1usize, 3, 17] {
            let mut g = Gen::new((d * 977 + rows) as u64);
            let x = g.normal_vec(rows * d, 1.5);
            let w = g.vec(d, -1.5, 1.5);
            let shape = match rows {
                1 => vec![d],
                3 => vec![3, d],
                _ => vec![1, rows, d],
            };
            let n = x.len();
            cases.push(
                Case::new(
                    format!("rms_norm rows={rows} D={d}"),
                    vec![Input::float(&shape, x), Input::float(&[d], w)],
                    |t: &[Tensor]| Ok(vec![kf_ops::rmsnorm::rms_norm(&t[0], &t[1], EPS)?]),
                    move |v: &[Vec<f64>]| {
                        let mut out = Vec::with_capacity(v[0].len());
                        for row in v[0].chunks(d) {
                            let ms = row.iter().map(|a| a * a).sum::<f64>() / d as f64;
                            let r = 1.0 / (ms + EPS).sqrt();
                            out.extend(row.iter().zip(&v[1]).map(|(a, w)| a * r * w));
                        }
                        vec![out]
                    },
                )
                .grad(&[0, 1])
                .cost(4.0 * n as f64, 8.0 * n as f64),
            );
        }
    }
    refusing(
        cases,
        [Case::refused(
            "rms_norm x [2, 4], weight [3]",
            vec![filled(&[2, 4]), filled(&[3])],
            |t| Ok(vec![kf_ops::rmsnorm::rms_norm(&t[0], &t[1], EPS)?]),
            "rms_norm",
        )],
    )
}

/// SwiGLU of `[.., 2F]`: F = 1, 5, 1536 (SmolLM2's), large |gate| both ways.
pub fn swiglu() -> Vec<Case> {
    let mut g = Gen::new(41);
    let shapes: [&[usize]; 4] = [&[2], &[3, 10], &[2, 2, 14], &[2, 3072]];
    let mut cases: Vec<Case> = shapes
        .iter()
        .map(|&shape| {
            let n: usize = shape.iter().product();
            let mut x = g.vec(n, -6.0, 6.0);
            if n >= 10 {
                x[0] = 40.0;
                x[1] = -40.0;
            }
            let f = shape[shape.len() - 1] / 2;
            Case::new(
                format!("swiglu {shape:?}"),
                vec![Input::float(shape, x)],
                |t: &[Tensor]| Ok(vec![kf_ops::swiglu::swiglu(&t[0])?]),
                move |v: &[Vec<f64>]| {
                    let mut out = vec![];
                    for row in v[0].chunks(2 * f) {
                        for j in 0..f {
                            let a = row[j];
                            out.push(a / (1.0 + (-a).exp()) * row[f + j]);
                        }
                    }
                    vec![out]
                },
            )
            .grad(&[0])
            .cost(6.0 * n as f64, 6.0 * n as f64)
        })
        .collect();
    cases.push(Case::refused(
        "swiglu of an odd last dim",
        vec![filled(&[2, 5])],
        |t| Ok(vec![kf_ops::swiglu::swiglu(&t[0])?]),
        "swiglu",
    ));
    cases
}

pub fn rope() -> Vec<Case> {
    refusing(
        rope_cases(),
        [Case::refused(
            "rope x [1, 2, 1, 4], positions [3]",
            vec![filled(&[1, 2, 1, 4]), indices(&[3])],
            |t| Ok(vec![kf_ops::rope::rope(&t[0], &t[1], &plain_rope())?]),
            "rope",
        )],
    )
}

pub fn gelu_tanh() -> Vec<Case> {
    refusing(
        gelu_cases(false),
        [Case::refused(
            "gelu_tanh of u32 ids",
            vec![indices(&[5])],
            |t| Ok(vec![kf_ops::gelu::gelu_tanh(&t[0])?]),
            "gelu_tanh",
        )],
    )
}

pub fn gelu_erf() -> Vec<Case> {
    refusing(
        gelu_cases(true),
        [Case::refused(
            "gelu_erf of u32 ids",
            vec![indices(&[5])],
            |t| Ok(vec![kf_ops::gelu::gelu_erf(&t[0])?]),
            "gelu_erf",
        )],
    )
}

pub fn softmax() -> Vec<Case> {
    refusing(
        softmax_cases(),
        [Case::refused(
            "softmax of u32 ids",
            vec![indices(&[2, 3])],
            |t| Ok(vec![kf_ops::softmax::softmax(&t[0])?]),
            "softmax",
        )],
    )
}

pub fn cross_entropy() -> Vec<Case> {
    refusing(
        cross_entropy_cases(),
        [Case::refused(
            "cross_entropy logits [2, 5], targets [3]",
            vec![filled(&[2, 5]), indices(&[3])],
            |t| {
                Ok(vec![
                    kf_ops::cross_entropy::cross_entropy(&t[0], &t[1], None)?.0,
                ])
            },
            "cross_entropy",
        )],
    )
}

// ------------------------------------------------------------------ layer norm

/// Naive layer norm of `rows` rows of `d` (two passes in f64).
fn ln_ref(x: &[f64], w: &[f64], b: Option<&[f64]>, d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + EPS).sqrt();
        for j in 0..d {
            out.push((row[j] - mean) * rstd * w[j] + b.map_or(0.0, |b| b[j]));
        }
    }
    out
}

fn layer_norm_cases(bias: bool) -> Vec<Case> {
    let tag = if bias {
        "layer_norm_bias"
    } else {
        "layer_norm"
    };
    let mut cases = vec![];
    let mut add =
        |name: String, xshape: Vec<usize>, x: Vec<f64>, d: usize, g: &mut Gen, transposed: bool| {
            let w = g.vec(d, -1.5, 1.5);
            let b = g.vec(d, -1.0, 1.0);
            let n = x.len();
            let mut inputs = vec![Input::float(&xshape, x), Input::float(&[d], w)];
            if bias {
                inputs.push(Input::float(&[d], b));
            }
            let (rows, dd) = (n / d.max(1), d);
            let c = Case::new(
                name,
                inputs,
                move |t: &[Tensor]| {
                    let x = if transposed {
                        t[0].transpose(0, 1)?
                    } else {
                        t[0].clone()
                    };
                    Ok(vec![kf_ops::layernorm::layer_norm(
                        &x,
                        &t[1],
                        t.get(2),
                        EPS,
                    )?])
                },
                move |v: &[Vec<f64>]| {
                    let x = if transposed {
                        // stored [D, R]: logical row r is column r
                        (0..rows * dd)
                            .map(|k| v[0][(k % dd) * rows + k / dd])
                            .collect()
                    } else {
                        v[0].clone()
                    };
                    vec![ln_ref(&x, &v[1], v.get(2).map(|b| b.as_slice()), dd)]
                },
            )
            .grad(if bias { &[0, 1, 2] } else { &[0, 1] })
            .cost(8.0 * n as f64, 8.0 * n as f64);
            cases.push(c);
        };
    for &d in &[1usize, 2, 7, 64, 129, 768] {
        for &rows in &[1usize, 3, 17] {
            let mut g = Gen::new((d * 131 + rows) as u64);
            let x: Vec<f64> = g
                .normal_vec(rows * d, 1.5)
                .iter()
                .map(|v| v + 0.5)
                .collect();
            // vary the leading dims: [D], [3, D], [1, 17, D]
            let shape = match rows {
                1 => vec![d],
                3 => vec![3, d],
                _ => vec![1, rows, d],
            };
            add(
                format!("{tag} rows={rows} D={d}"),
                shape,
                x,
                d,
                &mut g,
                false,
            );
        }
    }
    // a large common offset: catches a one-pass E[x^2] - mean^2 variance
    let mut g = Gen::new(77);
    let x: Vec<f64> = g
        .normal_vec(3 * 768, 1.0)
        .iter()
        .map(|v| v + 100.0)
        .collect();
    add(
        format!("{tag} rows=3 D=768 offset=100"),
        vec![3, 768],
        x,
        768,
        &mut g,
        false,
    );
    // a non-contiguous input (transposed view)
    let x = g.normal_vec(7 * 5, 1.0);
    add(
        format!("{tag} rows=5 D=7 transposed"),
        vec![7, 5],
        x,
        7,
        &mut g,
        true,
    );
    cases
}

// ------------------------------------------------------------------------ rope

/// Naive rotate-half rope of a contiguous `[B, T, H, D]` buffer; frequency j divided by
/// `div[j]` when given (a scaled RoPE).
pub(crate) fn rope_ref(
    x: &[f64],
    pos: &[f64],
    shape: [usize; 4],
    batched_pos: bool,
    div: Option<&[f64]>,
) -> Vec<f64> {
    let [b, t, h, d] = shape;
    let half = d / 2;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for ti in 0..t {
            let p = if batched_pos {
                pos[bi * t + ti]
            } else {
                pos[ti]
            };
            for hi in 0..h {
                let o = ((bi * t + ti) * h + hi) * d;
                for j in 0..half {
                    let theta =
                        p / ROPE_BASE.powf(2.0 * j as f64 / d as f64) / div.map_or(1.0, |v| v[j]);
                    let (c, s) = (theta.cos(), theta.sin());
                    let (x1, x2) = (x[o + j], x[o + j + half]);
                    out[o + j] = x1 * c - x2 * s;
                    out[o + j + half] = x2 * c + x1 * s;
                }
            }
        }
    }
    out
}

fn rope_cases() -> Vec<Case> {
    let mut cases = vec![];
    for &d in &[2usize, 8, 64, 128] {
        // (B, T, H, batched positions, strided view out of a [B, T, 3H, D] qkv, scaled:
        // every frequency divided by its own factor, as a Llama 3 file's rope_freqs)
        for &(b, t, h, batched, strided, scaled) in &[
            (1usize, 1usize, 1usize, false, false, false),
            (2, 5, 3, false, false, false),
            (2, 5, 3, true, false, false),
            (2, 4, 2, true, true, false),
            (1, 6, 2, false, true, false),
            (2, 5, 3, true, false, true),
            (2, 4, 2, false, true, true),
        ] {
            let div: Option<Vec<f64>> =
                scaled.then(|| (0..d / 2).map(|j| 1.0 + 0.37 * j as f64).collect());
            let freqs = kf_ops::rope::RopeFreqs {
                base: ROPE_BASE,
                div: div.clone().map(Into::into),
            };
            let mut g = Gen::new((d * 1000 + b * 100 + t * 10 + h) as u64 + batched as u64);
            let np = if batched { b * t } else { t };
            // non-monotonic positions, repeats, 0, and a large one
            let mut pos: Vec<u32> = (0..np).map(|_| g.below(4096) as u32).collect();
            if np > 2 {
                pos[1] = 0;
                pos[2] = pos[0];
                pos[np - 1] = 100_000;
            }
            let pshape = if batched { vec![b, t] } else { vec![t] };
            let xshape = if strided {
                vec![b, t, 3 * h, d]
            } else {
                vec![b, t, h, d]
            };
            let x = g.normal_vec(xshape.iter().product(), 1.0);
            let name = format!(
                "rope B={b} T={t} H={h} D={d} pos={}{}{}",
                if batched { "[B,T]" } else { "[T]" },
                if strided { " k-view of qkv" } else { "" },
                if scaled { " scaled" } else { "" }
            );
            let n = b * t * h * d;
            cases.push(
                Case::new(
                    name,
                    vec![Input::float(&xshape, x), Input::index(&pshape, pos)],
                    move |ts: &[Tensor]| {
                        let x = if strided {
                            ts[0].narrow(2, h, h)?
                        } else {
                            ts[0].clone()
                        };
                        Ok(vec![kf_ops::rope::rope(&x, &ts[1], &freqs)?])
                    },
                    move |v: &[Vec<f64>]| {
                        let x: Vec<f64> = if strided {
                            // the k block: heads h..2h of each [3H, D] row
                            v[0].chunks(3 * h * d)
                                .flat_map(|r| r[h * d..2 * h * d].to_vec())
                                .collect()
                        } else {
                            v[0].clone()
                        };
                        vec![rope_ref(&x, &v[1], [b, t, h, d], batched, div.as_deref())]
                    },
                )
                .grad(&[0])
                .cost(3.0 * n as f64, 8.0 * n as f64),
            );
        }
    }
    cases
}

// ------------------------------------------------------------------------ gelu

/// erf by its everywhere-positive series `2/sqrt(pi) e^{-z^2} sum 2^n z^{2n+1} / (2n+1)!!`
/// for |z| < 1.5 (no cancellation), and erfc by its continued fraction beyond
/// (150 terms). Returns `1 + erf(z)` to ~1e-13 relative for all z, negative
/// tail included (checked against the op's fdlibm erfc while writing this).
fn one_plus_erf_ref(z: f64) -> f64 {
    let sqrt_pi = std::f64::consts::PI.sqrt();
    if z.abs() < 1.5 {
        let (mut term, mut sum, mut n) = (z, z, 0.0);
        while term.abs() > 1e-18 * sum.abs() {
            n += 1.0;
            term *= 2.0 * z * z / (2.0 * n + 1.0);
            sum += term;
        }
        1.0 + 2.0 / sqrt_pi * (-z * z).exp() * sum
    } else {
        // erfc(a) = e^{-a^2}/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))
        let a = z.abs();
        let mut t = a;
        for k in (1..=150).rev() {
            t = a + (k as f64 / 2.0) / t;
        }
        let erfc = (-a * a).exp() / sqrt_pi / t;
        if z > 0.0 {
            2.0 - erfc
        } else {
            erfc
        }
    }
}

fn gelu_ref(x: f64, erf: bool) -> f64 {
    if erf {
        0.5 * x * one_plus_erf_ref(x / 2f64.sqrt())
    } else {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
    }
}

fn gelu_cases(erf: bool) -> Vec<Case> {
    let tag = if erf { "gelu_erf" } else { "gelu_tanh" };
    let mut g = Gen::new(if erf { 11 } else { 12 });
    let edges = vec![
        -1e4, -30.0, -8.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0,
        2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 30.0, 1e4,
    ];
    let inputs: Vec<(String, Vec<usize>, Vec<f64>)> = vec![
        ("n=1".into(), vec![1], vec![0.3]),
        ("n=7".into(), vec![7], g.vec(7, -8.0, 8.0)),
        (format!("edges n={}", edges.len()), vec![edges.len()], edges),
        ("3x5x7".into(), vec![3, 5, 7], g.vec(105, -8.0, 8.0)),
        ("n=10000".into(), vec![10000], g.vec(10000, -8.0, 8.0)),
    ];
    inputs
        .into_iter()
        .map(|(name, shape, x)| {
            let n = x.len();
            Case::new(
                format!("{tag} {name}"),
                vec![Input::float(&shape, x)],
                move |t: &[Tensor]| {
                    Ok(vec![if erf {
                        kf_ops::gelu::gelu_erf(&t[0])?
                    } else {
                        kf_ops::gelu::gelu_tanh(&t[0])?
                    }])
                },
                move |v: &[Vec<f64>]| vec![v[0].iter().map(|&a| gelu_ref(a, erf)).collect()],
            )
            .grad(&[0])
            .cost(20.0 * n as f64, 8.0 * n as f64)
        })
        .collect()
}

/// `gelu_tanh(x + b)` with the bias broadcast over rows: ragged row widths, one row, a
/// whole number of the CPU body's tasks and more (12,000 elements), and large |x + b|.
pub fn bias_gelu_tanh() -> Vec<Case> {
    refusing(
        {
            let mut g = Gen::new(13);
            let shapes: [&[usize]; 5] = [&[1, 1], &[3, 7], &[2, 5, 33], &[40, 300], &[4, 6]];
            shapes
                .iter()
                .enumerate()
                .map(|(i, &shape)| {
                    let c = *shape.last().unwrap();
                    let n: usize = shape.iter().product();
                    // the last case pushes x + b into GELU's saturated tails
                    let span = if i == 4 { 40.0 } else { 6.0 };
                    let x = g.vec(n, -span, span);
                    let b = g.vec(c, -2.0, 2.0);
                    Case::new(
                        format!("bias_gelu_tanh {shape:?}"),
                        vec![Input::float(shape, x), Input::float(&[c], b)],
                        |t: &[Tensor]| Ok(vec![kf_ops::gelu::bias_gelu_tanh(&t[0], &t[1])?]),
                        move |v: &[Vec<f64>]| {
                            let out = v[0].iter().enumerate();
                            vec![out
                                .map(|(j, &a)| gelu_ref(a + v[1][j % c], false))
                                .collect()]
                        },
                    )
                    .grad(&[0, 1])
                    .cost(21.0 * n as f64, 8.0 * (2 * n + c) as f64)
                })
                .collect()
        },
        [Case::refused(
            "bias_gelu_tanh x [2, 3] + bias [4]",
            vec![filled(&[2, 3]), filled(&[4])],
            |t| Ok(vec![kf_ops::gelu::bias_gelu_tanh(&t[0], &t[1])?]),
            "bias_gelu_tanh",
        )],
    )
}

// --------------------------------------------------------------------- softmax

/// Naive softmax (or log-softmax) of rows of `v` (`-inf` entries give 0).
fn softmax_ref(x: &[f64], v: usize, log: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(v) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|a| (a - m).exp()).sum();
        for a in row {
            out.push(if log {
                a - m - s.ln()
            } else {
                (a - m).exp() / s
            });
        }
    }
    out
}

fn softmax_case(
    name: String,
    shape: Vec<usize>,
    x: Vec<f64>,
    log: bool,
    grad: bool,
    transposed: bool,
) -> Case {
    let n = x.len();
    let (r, v) = (shape[0], shape[1]);
    let c = Case::new(
        name,
        vec![Input::float(&shape, x)],
        move |t: &[Tensor]| {
            let x = if transposed {
                t[0].transpose(0, 1)?
            } else {
                t[0].clone()
            };
            Ok(vec![if log {
                kf_ops::softmax::log_softmax(&x)?
            } else {
                kf_ops::softmax::softmax(&x)?
            }])
        },
        move |vv: &[Vec<f64>]| {
            if transposed {
                // stored [r, v] is logically [v, r]: softmax over r
                let x: Vec<f64> = (0..r * v).map(|k| vv[0][(k % r) * v + k / r]).collect();
                vec![softmax_ref(&x, r, log)]
            } else {
                vec![softmax_ref(&vv[0], v, log)]
            }
        },
    )
    .cost(5.0 * n as f64, 8.0 * n as f64);
    if grad {
        c.grad(&[0])
    } else {
        c
    }
}

fn softmax_cases() -> Vec<Case> {
    let mut cases = vec![];
    for &v in &[1usize, 2, 7, 64, 129, 768] {
        for &rows in &[1usize, 3, 17] {
            let mut g = Gen::new((v * 31 + rows) as u64);
            let x = g.normal_vec(rows * v, 3.0);
            cases.push(softmax_case(
                format!("softmax rows={rows} V={v}"),
                vec![rows, v],
                x,
                false,
                true,
                false,
            ));
        }
    }
    for &v in &[1usize, 7, 129] {
        let mut g = Gen::new(v as u64 + 5000);
        let x = g.normal_vec(3 * v, 3.0);
        cases.push(softmax_case(
            format!("log_softmax rows=3 V={v}"),
            vec![3, v],
            x,
            true,
            true,
            false,
        ));
    }
    let mut g = Gen::new(4242);
    // masked entries (-inf) get probability 0; forward only (finite
    // differences cannot step an infinite input)
    let mut x = g.normal_vec(3 * 9, 2.0);
    for k in [0usize, 4, 5, 9, 17, 26] {
        x[k] = f64::NEG_INFINITY;
    }
    cases.push(softmax_case(
        "softmax rows=3 V=9 masked".into(),
        vec![3, 9],
        x.clone(),
        false,
        false,
        false,
    ));
    cases.push(softmax_case(
        "log_softmax rows=3 V=9 masked".into(),
        vec![3, 9],
        x,
        true,
        false,
        false,
    ));
    // non-contiguous input
    let x = g.normal_vec(11 * 4, 2.0);
    cases.push(softmax_case(
        "softmax rows=4 V=11 transposed".into(),
        vec![11, 4],
        x,
        false,
        true,
        true,
    ));
    // the real vocabulary, forward only
    let mut x = g.normal_vec(3 * BIG_V, 4.0);
    x[7] = 30.0;
    x[BIG_V + 123] = -30.0;
    cases.push(softmax_case(
        format!("softmax rows=3 V={BIG_V}"),
        vec![3, BIG_V],
        x.clone(),
        false,
        false,
        false,
    ));
    cases.push(softmax_case(
        format!("log_softmax rows=3 V={BIG_V}"),
        vec![3, BIG_V],
        x,
        true,
        false,
        false,
    ));
    cases
}

// --------------------------------------------------------------- cross-entropy

/// Naive mean NLL and per-row losses.
fn ce_ref(x: &[f64], t: &[f64], v: usize, ignore: Option<u32>) -> (f64, Vec<f64>) {
    let mut per = vec![];
    let (mut sum, mut count) = (0.0, 0usize);
    for (row, &tt) in x.chunks(v.max(1)).zip(t) {
        if Some(tt as u32) == ignore {
            per.push(0.0);
            continue;
        }
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
        let l = lse - row[tt as usize];
        per.push(l);
        sum += l;
        count += 1;
    }
    (if count == 0 { 0.0 } else { sum / count as f64 }, per)
}

fn ce_case(
    n: usize,
    v: usize,
    targets: Vec<u32>,
    ignore: Option<u32>,
    grad: bool,
    seed: u64,
    what: &str,
) -> Case {
    let mut g = Gen::new(seed);
    let mut x = g.normal_vec(n * v, 2.0);
    if n * v > 4 {
        x[3] = 12.0; // one confident logit
    }
    let name = format!("cross_entropy N={n} V={v} ignore={ignore:?}{what}");
    let c = Case::new(
        name,
        vec![Input::float(&[n, v], x), Input::index(&[n], targets)],
        move |t: &[Tensor]| {
            let (l, per) = kf_ops::cross_entropy::cross_entropy(&t[0], &t[1], ignore)?;
            Ok(vec![l, per])
        },
        move |vv: &[Vec<f64>]| {
            let (l, per) = ce_ref(&vv[0], &vv[1], v, ignore);
            vec![vec![l], per]
        },
    )
    .cost(5.0 * (n * v) as f64, 4.0 * (n * v) as f64);
    if grad {
        c.grad(&[0])
    } else {
        c
    }
}

fn cross_entropy_cases() -> Vec<Case> {
    let mut cases = vec![];
    for &v in &[1usize, 2, 7, 64, 129, 768] {
        for &n in &[1usize, 3, 17] {
            let mut g = Gen::new((v * 7 + n) as u64);
            // first row targets 0, last row V-1; with N >= 3 row 1 is ignored
            let mut t: Vec<u32> = (0..n).map(|_| g.below(v as u64) as u32).collect();
            t[0] = 0;
            t[n - 1] = v as u32 - 1;
            let ignore = match n {
                1 => None,
                3 => Some(v as u32), // outside the vocabulary
                _ => Some(u32::MAX),
            };
            if let Some(ig) = ignore {
                t[1] = ig;
            }
            cases.push(ce_case(n, v, t, ignore, true, (v * 13 + n) as u64, ""));
        }
    }
    // an ignore index inside the vocabulary: rows targeting it are skipped
    let t: Vec<u32> = vec![0, 3, 2, 3, 6];
    cases.push(ce_case(5, 7, t, Some(3), true, 91, " in-vocab ignore"));
    // every row ignored: loss 0, zero gradient
    cases.push(ce_case(
        3,
        7,
        vec![9, 9, 9],
        Some(9),
        true,
        92,
        " all ignored",
    ));
    // the real vocabulary, forward only
    let t = vec![0, BIG_V as u32, BIG_V as u32 - 1, 17, 40000];
    cases.push(ce_case(5, BIG_V, t, Some(BIG_V as u32), false, 93, ""));
    cases
}
