//! The fused cross-entropy against its composed slow path: log_softmax, then
//! a gather of the target entries and a mean over the counted rows. Forward
//! losses must agree, and so must the gradient with autograd through the
//! composed path (log_softmax's backward, seeded with the gather+mean's
//! gradient, `-g/count` at each counted target). Letters: N rows, V vocab.

use anyhow::Result;
use kf_engine::{DType, Device, Tensor};
use kf_ops::cross_entropy::cross_entropy;
use kf_ops::softmax::{log_softmax, softmax};
use kf_tests::harness::{compare, Gen, Tol};

struct Shape {
    n: usize,
    v: usize,
    ignore: Option<u32>,
    /// rows whose target is set to the ignore index
    ignored_rows: &'static [usize],
}

const SHAPES: &[Shape] = &[
    Shape {
        n: 1,
        v: 1,
        ignore: None,
        ignored_rows: &[],
    },
    Shape {
        n: 5,
        v: 7,
        ignore: Some(3),
        ignored_rows: &[1, 4],
    },
    Shape {
        n: 17,
        v: 129,
        ignore: Some(u32::MAX),
        ignored_rows: &[0, 16],
    },
    Shape {
        n: 3,
        v: 7,
        ignore: Some(7),
        ignored_rows: &[0, 1, 2],
    },
    Shape {
        n: 4,
        v: 50257,
        ignore: Some(50257),
        ignored_rows: &[2],
    },
];

/// Logits and targets of a shape: targets 0 and V-1 appear, ignored rows set.
fn data(s: &Shape, seed: u64) -> (Vec<f64>, Vec<u32>) {
    let mut g = Gen::new(seed);
    let x = g.normal_vec(s.n * s.v, 3.0);
    let mut t: Vec<u32> = (0..s.n).map(|_| g.below(s.v as u64) as u32).collect();
    t[0] = 0;
    t[s.n - 1] = s.v as u32 - 1;
    for &r in s.ignored_rows {
        t[r] = s.ignore.expect("ignored rows need an ignore index");
    }
    (x, t)
}

/// The slow path's per-row losses and mean: -log_softmax gathered at targets.
fn composed_forward(logits: &Tensor, t: &[u32], ignore: Option<u32>) -> Result<(f64, Vec<f64>)> {
    let v = logits.shape()[1];
    let lp = log_softmax(logits)?.to_vec_f64()?;
    let per: Vec<f64> = t
        .iter()
        .enumerate()
        .map(|(i, &ti)| {
            if Some(ti) == ignore {
                0.0
            } else {
                -lp[i * v + ti as usize]
            }
        })
        .collect();
    let count = t.iter().filter(|&&ti| Some(ti) != ignore).count();
    let mean = if count == 0 {
        0.0
    } else {
        per.iter().sum::<f64>() / count as f64
    };
    Ok((mean, per))
}

fn check_shape(s: &Shape, dtype: DType, tol: Tol) -> Result<()> {
    let (x, t) = data(s, (s.n * 1000 + s.v) as u64);
    let what = format!("N={} V={} ignore={:?} {dtype}", s.n, s.v, s.ignore);
    let logits = Tensor::from_vec(x, &[s.n, s.v], Device::Cpu)?.to_dtype(dtype)?;
    let targets = Tensor::from_slice(&t, &[s.n], Device::Cpu)?;

    // forward
    let (fused, fused_per) = cross_entropy(&logits, &targets, s.ignore)?;
    let (slow, slow_per) = composed_forward(&logits, &t, s.ignore)?;
    compare(
        &format!("{what} loss"),
        &[fused.to_scalar_f64()?],
        &[slow],
        tol,
    )?;
    compare(
        &format!("{what} per-row"),
        &fused_per.to_vec_f64()?,
        &slow_per,
        tol,
    )?;

    // gradient of g * loss
    let gscale = 0.7;
    let xv = logits.var();
    let (l, _) = cross_entropy(&xv, &targets, s.ignore)?;
    let seed = Tensor::full(&[], gscale, dtype, Device::Cpu)?;
    let fused_grad = l
        .backward_with(seed)?
        .get(&xv)
        .expect("grad")
        .to_vec_f64()?;

    let xv2 = logits.var();
    let lp = log_softmax(&xv2)?;
    let count = t.iter().filter(|&&ti| Some(ti) != s.ignore).count();
    let mut gseed = vec![0.0; s.n * s.v];
    for (i, &ti) in t.iter().enumerate() {
        if Some(ti) != s.ignore {
            gseed[i * s.v + ti as usize] = -gscale / count as f64;
        }
    }
    let gseed = Tensor::from_vec(gseed, &[s.n, s.v], Device::Cpu)?.to_dtype(dtype)?;
    let slow_grad = lp
        .backward_with(gseed)?
        .get(&xv2)
        .expect("grad")
        .to_vec_f64()?;
    compare(&format!("{what} dlogits"), &fused_grad, &slow_grad, tol)?;
    Ok(())
}

#[test]
fn fused_cross_entropy_matches_composed_path() {
    for s in SHAPES {
        check_shape(s, DType::F64, Tol::new(1e-12, 1e-11)).unwrap_or_else(|e| panic!("{e:#}"));
        // f32: both paths round differently (lse vs per-entry log-probs)
        check_shape(s, DType::F32, Tol::new(1e-6, 1e-5)).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[test]
fn softmax_is_exp_of_log_softmax() {
    let mut g = Gen::new(5);
    for &(r, v) in &[(1usize, 1usize), (3, 129), (2, 50257)] {
        let x = Tensor::from_vec(g.normal_vec(r * v, 4.0), &[r, v], Device::Cpu).unwrap();
        let p = softmax(&x).unwrap().to_vec_f64().unwrap();
        let lp: Vec<f64> = log_softmax(&x)
            .unwrap()
            .to_vec_f64()
            .unwrap()
            .iter()
            .map(|a| a.exp())
            .collect();
        compare(&format!("softmax {r}x{v}"), &p, &lp, Tol::new(1e-15, 1e-12)).unwrap();
    }
}
