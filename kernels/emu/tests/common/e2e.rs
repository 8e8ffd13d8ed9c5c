//! Shared by the end-to-end training tests (e2e_train.rs, e2e_distill.rs; included with
//! `#[path]`): the tiny model and optimiser configs, and the device-against-CPU comparison
//! of gradients and of whole training steps (`DevTrainer` against `Trainer::train_step`).
//!
//! Tolerances. Gradients: the two sides sum in different orders in f32 (GEMMs, reductions),
//! so each element may differ by `GRAD_RTOL` of itself plus `GRAD_ATOL_REL` of its tensor's
//! largest gradient (measured: at most ~0.2 of that). Weights: AdamW's first steps move an
//! element by lr times a ratio of moments, m̂ / (sqrt(v̂) + eps), so each weight may differ
//! by `W_ATOL` plus, per step, lr times how far that ratio moves when the CPU's gradients
//! move within the gradient tolerance ([`ratio_sensitivity`]; about 2 lr where a gradient is
//! within the tolerance of zero, its sign undetermined at f32 precision). [`run_steps`]
//! requires such loose tolerances to be rare (`MAX_LOOSE`) and prints how many weights differ
//! by more than `W_ATOL` at all.
#![allow(dead_code)]

use kf_engine::Tensor;
use kf_model::kdev_train::{DevStepStats, DevTrainer, StairBatch};
use kf_model::pflm::Pflm;
use kf_model::train::optim::{OptimConfig, Trainer};
use kf_model::DditConfig;
use kf_ops::kdev::{DTensor, KernelDevice};
use kf_tests::harness::{compare, Tol};
use std::collections::BTreeMap;
use std::time::Instant;

pub const GRAD_RTOL: f64 = 1e-4;
pub const GRAD_ATOL_REL: f64 = 2e-6;
pub const W_ATOL: f64 = 1e-6;
/// A weight tolerance above this (1% of lr) counts as loose; at most `MAX_LOOSE` of all
/// elements may have one.
pub const LOOSE: f64 = 1e-5;
pub const MAX_LOOSE: f64 = 1e-3;

/// AdamW's normalised step m̂ / (sqrt(v̂) + eps) after the gradients `gs` (one per step so far,
/// as AdamW sees them: averaged and clipped), in units of lr.
pub fn adam_ratio(gs: &[f64], opt: &OptimConfig) -> f64 {
    let (mut m, mut v) = (0.0, 0.0);
    for &g in gs {
        m = opt.beta1 * m + (1.0 - opt.beta1) * g;
        v = opt.beta2 * v + (1.0 - opt.beta2) * g * g;
    }
    let t = gs.len() as i32;
    let mh = m / (1.0 - opt.beta1.powi(t));
    let vh = v / (1.0 - opt.beta2.powi(t));
    mh / (vh.sqrt() + opt.eps)
}

/// How far the step ratio can move when every gradient of `gs` is off by up to its `tols`:
/// the largest change over the grid {g - tol, g, g + tol} per step (the ratio is monotone
/// in each gradient between sign changes, and a sign change within the tolerance is a grid
/// point's extreme). An exactly zero gradient (embedding rows of unused tokens) must be
/// exactly zero on the device too, so it is not perturbed.
pub fn ratio_sensitivity(gs: &[f64], tols: &[f64], opt: &OptimConfig) -> f64 {
    let base = adam_ratio(gs, opt);
    let n = gs.len() as u32;
    let mut worst = 0.0f64;
    let mut p = gs.to_vec();
    for code in 0..3usize.pow(n) {
        let mut c = code;
        for j in 0..gs.len() {
            let k = c % 3;
            c /= 3;
            p[j] = if gs[j] == 0.0 {
                0.0
            } else {
                gs[j] + (k as f64 - 1.0) * tols[j]
            };
        }
        worst = worst.max((adam_ratio(&p, opt) - base).abs());
    }
    worst
}

pub fn config() -> DditConfig {
    DditConfig {
        n_layers: 2,
        d_model: 128,
        n_heads: 2,
        vocab_size: 97,
        max_seq_len: 48,
        rope_base: 10000.0,
        ln_eps: 1e-5,
        mask_token_id: None,
        eos_token_id: Some(1),
        k: None,
    }
}

pub fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 2,
        total_steps: 10,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        // below the initial gradient norm: the clip is part of what is compared
        grad_clip: 0.5,
        grad_accum: 1,
    }
}

/// The loss value and the gradient of every parameter (by name).
pub fn grads_of(params: &[(String, Tensor)], loss: Tensor) -> (f64, BTreeMap<String, Vec<f64>>) {
    let lv = loss.to_scalar_f64().unwrap();
    let grads = loss.backward().unwrap();
    let g = params
        .iter()
        .map(|(n, t)| {
            let v = grads
                .get(t)
                .expect("every parameter has a gradient")
                .to_vec_f64()
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    (lv, g)
}

pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// Element tolerances of the gradient `g` (CPU values) of parameter `name`: `GRAD_RTOL` of
/// the element plus `GRAD_ATOL_REL` of the largest gradient of its block, where a block is
/// a set of elements summed from terms of one scale: the q, k and v row blocks of a fused
/// `attn_qkv.weight` [3d, d] (separate matrices; their gradients differ in scale by orders
/// of magnitude at init), each column of `combined_proj.weight` [d, 2d] (column j is
/// dxᵀ f_j for one noise feature f_j, and the features' scales span orders of magnitude),
/// and otherwise the whole tensor.
pub fn grad_tols(name: &str, g: &[f64]) -> Vec<f64> {
    let n = g.len();
    let cols = 2 * ((n / 2) as f64).sqrt() as usize;
    let (nblocks, block): (usize, Box<dyn Fn(usize) -> usize>) =
        if name.ends_with("attn_qkv.weight") {
            (3, Box::new(move |i| i * 3 / n))
        } else if name.ends_with("combined_proj.weight") {
            (cols, Box::new(move |i| i % cols))
        } else {
            (1, Box::new(|_| 0))
        };
    let mut mx = vec![0.0f64; nblocks];
    for (i, x) in g.iter().enumerate() {
        mx[block(i)] = mx[block(i)].max(x.abs());
    }
    g.iter()
        .enumerate()
        .map(|(i, x)| GRAD_ATOL_REL * mx[block(i)] + GRAD_RTOL * x.abs())
        .collect()
}

/// Checks a device gradient against the CPU's within [`grad_tols`]; returns the largest
/// |got - want| / tolerance (<= 1).
pub fn check_grad(what: &str, name: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what} {name}: lengths");
    let tols = grad_tols(name, want);
    let mut worst = 0.0f64;
    for (i, ((a, b), t)) in got.iter().zip(want).zip(&tols).enumerate() {
        let r = (a - b).abs() / t.max(f64::MIN_POSITIVE);
        assert!(
            r <= 1.0,
            "{what} {name}[{i}]: device {a}, cpu {b} (tolerance {t:e})"
        );
        worst = worst.max(r);
    }
    worst
}

pub type CpuLoss<'a, Bt> = &'a dyn Fn(&Bt) -> anyhow::Result<Tensor>;
pub type DevStep<'a, 'd, D, Bt> =
    &'a dyn Fn(&mut DevTrainer<'d, D>, &[Bt]) -> anyhow::Result<DevStepStats>;

/// Runs `micro.len()` updates on the CPU trainer and the device (update s takes the
/// micro-batches `micro[s]`) and compares loss, gradient norm, learning rate and every weight
/// after each, for any model and batch kind: `params` are the CPU model's
/// trainable handles (updated in place by the CPU trainer), `init` a copy of the initial
/// weights, `cpu_loss` the CPU loss of one micro-batch, `dev_step` the device update.
#[allow(clippy::too_many_arguments)]
pub fn run_steps<'d, D: KernelDevice + ?Sized, Bt>(
    opt: &OptimConfig,
    micro: &[Vec<Bt>],
    clipped: bool,
    params: &[(String, Tensor)],
    init: &[(String, Tensor)],
    cpu_loss: CpuLoss<'_, Bt>,
    dev: &mut DevTrainer<'d, D>,
    dev_step: DevStep<'_, 'd, D, Bt>,
) {
    let t0 = Instant::now();
    let opt = opt.clone();
    let n_params: usize = params.iter().map(|(_, t)| t.numel()).sum();
    let mut trainer = Trainer::new(params, opt.clone()).unwrap();
    // per element: the gradients AdamW saw on the CPU, their tolerances, and how far the
    // weights may drift apart (see the module comment)
    type History = (Vec<Vec<f64>>, Vec<Vec<f64>>);
    let mut hist: BTreeMap<String, History> = BTreeMap::new();
    let mut wtol: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (s, mbs) in micro.iter().enumerate() {
        let step = s as u64 + 1;
        // the averaged CPU gradient of this update, and the clip the CPU will apply
        let mut avg: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for bt in mbs {
            for (name, gv) in grads_of(params, cpu_loss(bt).unwrap()).1 {
                let a = avg.entry(name).or_insert_with(|| vec![0.0; gv.len()]);
                a.iter_mut()
                    .zip(&gv)
                    .for_each(|(x, y)| *x += y / mbs.len() as f64);
            }
        }
        let norm = avg.values().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let clip = if opt.grad_clip > 0.0 && norm > opt.grad_clip {
            opt.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        let lr = opt.lr_at(s as u64);
        for (name, gv) in &avg {
            let tol = grad_tols(name, gv);
            let (gs, ts) = hist
                .entry(name.clone())
                .or_insert_with(|| (vec![vec![]; gv.len()], vec![vec![]; gv.len()]));
            let w = wtol
                .entry(name.clone())
                .or_insert_with(|| vec![W_ATOL; gv.len()]);
            for (i, &x) in gv.iter().enumerate() {
                gs[i].push(x * clip);
                ts[i].push(tol[i] * clip);
                w[i] += lr * ratio_sensitivity(&gs[i], &ts[i], &opt);
            }
        }
        let cs = trainer
            .train_step(|_, j| Ok((cpu_loss(&mbs[j])?, vec![])))
            .unwrap();
        let ds = dev_step(dev, mbs).unwrap();
        println!(
            "step {step}: cpu loss {} norm {} lr {}; device loss {} norm {} lr {} ({:.1?})",
            cs.loss,
            cs.grad_norm,
            cs.lr,
            ds.loss,
            ds.grad_norm,
            ds.lr,
            t0.elapsed()
        );
        assert_eq!((ds.step, ds.lr), (cs.step, cs.lr));
        compare(
            &format!("loss step {step}"),
            &[ds.loss],
            &[cs.loss],
            Tol::new(1e-5, 1e-5),
        )
        .unwrap();
        compare(
            &format!("grad norm step {step}"),
            &[ds.grad_norm],
            &[cs.grad_norm],
            Tol::new(0.0, 1e-5),
        )
        .unwrap();
        assert_eq!(
            cs.grad_norm > opt.grad_clip && opt.grad_clip > 0.0,
            clipped,
            "step {step}: the clip is (not) engaged as the case intends"
        );
        let host = dev.params_to_host().unwrap();
        let (mut loose, mut off) = (0usize, 0usize);
        for (name, t) in &host {
            let got = t.to_vec_f64().unwrap();
            let want = params
                .iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .detach()
                .to_vec_f64()
                .unwrap();
            let w = &wtol[name];
            loose += w.iter().filter(|&&x| x > LOOSE).count();
            let mut worst = 0.0f64;
            for (i, ((a, b), &tol)) in got.iter().zip(&want).zip(w).enumerate() {
                let diff = (a - b).abs();
                worst = worst.max(diff);
                off += (diff > W_ATOL) as usize;
                assert!(
                    diff <= tol,
                    "{name}[{i}] after step {step}: device {a}, cpu {b} (tolerance {tol:e})"
                );
            }
            println!(
                "weights {name} after step {step}: worst |diff| {worst:.3e}, {} loose",
                w.iter().filter(|&&x| x > LOOSE).count()
            );
        }
        println!(
            "step {step}: {off} of {n_params} weights differ by more than {W_ATOL:e}; \
             {loose} have a tolerance above {LOOSE:e}"
        );
        assert!(
            (loose as f64) <= MAX_LOOSE * n_params as f64,
            "step {step}: {loose} of {n_params} weights have a tolerance above {LOOSE:e}"
        );
    }
    // every parameter tensor changed (the comparison is not of two copies of the init)
    for ((name, a), (_, b)) in dev.params_to_host().unwrap().iter().zip(init) {
        assert_ne!(
            a.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
            "{name} did not change"
        );
    }
    println!("total {:.1?}", t0.elapsed());
}

/// The CPU stage-1 loss of a staircase batch (as `DistillTask::window_loss`).
pub fn pflm_loss(st: &Pflm, sb: &StairBatch) -> anyhow::Result<Tensor> {
    let cpu = kf_engine::Device::Cpu;
    let ctx = Tensor::from_vec(sb.ctx.clone(), &[sb.b, sb.n], cpu)?;
    let u = Tensor::from_vec(sb.u.clone(), &[sb.b, sb.n, sb.kk], cpu)?;
    let logits = st.forward_staircase(&ctx, &u, &[sb.tau])?;
    let m = sb.b * sb.n * sb.kk;
    let tg = Tensor::from_vec(sb.targets.clone(), &[m], cpu)?;
    let v = st.cfg().vocab_size;
    Ok(kf_ops::cross_entropy::cross_entropy(&logits.reshape(&[m, v])?, &tg, None)?.0)
}

/// Checks every device gradient `dev_g` (in `params` order) against the CPU's `cpu_g` (by
/// name) within [`grad_tols`]; a parameter whose CPU gradient is all zero fails (it would test
/// nothing).
pub fn check_grads<D: KernelDevice + ?Sized>(
    dev: &D,
    what: &str,
    params: &[(String, Tensor)],
    cpu_g: &BTreeMap<String, Vec<f64>>,
    dev_g: &[DTensor],
) {
    assert_eq!(dev_g.len(), params.len(), "{what}: gradient count");
    for ((name, _), g) in params.iter().zip(dev_g) {
        let want = &cpu_g[name];
        let got: Vec<f64> = g
            .to_vec::<D, f32>(dev)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert!(
            max_abs(want) > 0.0,
            "{what} {name}: a zero gradient tests nothing"
        );
        let worst = check_grad(what, name, &got, want);
        println!(
            "{what} {name}: max |g| {:.3e}, worst error / tolerance {worst:.3}",
            max_abs(want)
        );
    }
}
