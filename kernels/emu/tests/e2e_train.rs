//! End to end: one (and two) training steps of a tiny AR teacher (DDiT, d = 128, 2 heads of
//! 64, 2 layers, V = 97, B = 2, T = 40: ragged against every tile) on the emulated kernels
//! (kf_model::kdev_train::DevTrainer on kf_kernels_emu::device::Emu) against the CPU
//! trainer's step (kf_model::train::optim::Trainer::train_step on the teacher's loss: mean
//! next-token cross-entropy of `Ddit::forward_train`), from the same initial weights and
//! batches: the loss, every parameter's gradient (step 1; and bit-for-bit equal on a second
//! device run), the gradient norm (with the clip engaged; and with accumulation over two
//! micro-batches, unclipped), and every updated weight after steps 1 and 2. Likewise the
//! PFLM stage-1 step (student from the teacher, k = 1, staircase pass over [context |
//! hints] with the noise encoder, targets from `pflm::stage1_targets`).
//!
//! Tolerances. Gradients: the two sides sum in different orders in f32 (GEMMs, reductions),
//! so each element may differ by `GRAD_RTOL` of itself plus `GRAD_ATOL_REL` of its tensor's
//! largest gradient (measured: at most ~0.2 of that). Weights: AdamW's first steps move an
//! element by lr times a ratio of moments, m̂ / (sqrt(v̂) + eps), so each weight may differ
//! by `W_ATOL` plus, per step, lr times how far that ratio moves when the CPU's gradients
//! move within the gradient tolerance ([`ratio_sensitivity`]; about 2 lr where a gradient is
//! within the tolerance of zero, its sign undetermined at f32 precision). The test requires such loose tolerances to be rare (`MAX_LOOSE`) and prints
//! how many weights differ by more than `W_ATOL` at all.

use kf_engine::Tensor;
use kf_kernels_emu::device::Emu;
use kf_model::kdev_train::{Batch, DevStepStats, DevTrainer, StairBatch};
use kf_model::pflm::{stage1_targets, Pflm};
use kf_model::train::optim::{OptimConfig, Trainer};
use kf_model::{Ddit, DditConfig};
use kf_ops::kdev::KernelDevice;
use kf_tests::harness::{compare, Gen, Tol};
use std::collections::BTreeMap;
use std::time::Instant;

const GRAD_RTOL: f64 = 1e-4;
const GRAD_ATOL_REL: f64 = 2e-6;
const W_ATOL: f64 = 1e-6;
/// A weight tolerance above this (1% of lr) counts as loose; at most `MAX_LOOSE` of all
/// elements may have one.
const LOOSE: f64 = 1e-5;
const MAX_LOOSE: f64 = 1e-3;

/// AdamW's normalised step m̂ / (sqrt(v̂) + eps) after the gradients `gs` (one per step so far,
/// as AdamW sees them: averaged and clipped), in units of lr.
fn adam_ratio(gs: &[f64], opt: &OptimConfig) -> f64 {
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
fn ratio_sensitivity(gs: &[f64], tols: &[f64], opt: &OptimConfig) -> f64 {
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

fn config() -> DditConfig {
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

fn optim() -> OptimConfig {
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

/// Random windows of T + 1 tokens: inputs are the first T, targets the last T.
fn batch(seed: u64, b: usize, t: usize, v: usize) -> Batch {
    let mut g = Gen::new(seed);
    let (mut ids, mut targets) = (vec![], vec![]);
    for _ in 0..b {
        let w: Vec<u32> = (0..=t).map(|_| g.below(v as u64) as u32).collect();
        ids.extend_from_slice(&w[..t]);
        targets.extend_from_slice(&w[1..]);
    }
    Batch { b, t, ids, targets }
}

/// The CPU teacher's loss (as `TeacherTask::window_loss`).
fn cpu_loss(model: &Ddit, bt: &Batch) -> anyhow::Result<Tensor> {
    let ids = Tensor::from_vec(bt.ids.clone(), &[bt.b, bt.t], kf_engine::Device::Cpu)?;
    let tg = Tensor::from_vec(bt.targets.clone(), &[bt.b * bt.t], kf_engine::Device::Cpu)?;
    let logits = model.forward_train(&ids)?;
    let v = *logits.shape().last().unwrap();
    let flat = logits.reshape(&[bt.b * bt.t, v])?;
    Ok(kf_ops::cross_entropy::cross_entropy(&flat, &tg, None)?.0)
}

/// The CPU gradients of every parameter (by name) for one batch, and the loss.
fn cpu_grads(model: &Ddit, bt: &Batch) -> (f64, BTreeMap<String, Vec<f64>>) {
    grads_of(model.params(), cpu_loss(model, bt).unwrap())
}

/// The loss value and the gradient of every parameter (by name).
fn grads_of(params: &[(String, Tensor)], loss: Tensor) -> (f64, BTreeMap<String, Vec<f64>>) {
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

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// Element tolerances of the gradient `g` (CPU values) of parameter `name`: `GRAD_RTOL` of
/// the element plus `GRAD_ATOL_REL` of the largest gradient of its block, where a block is
/// a set of elements summed from terms of one scale: the q, k and v row blocks of a fused
/// `attn_qkv.weight` [3d, d] (separate matrices; their gradients differ in scale by orders
/// of magnitude at init), each column of `combined_proj.weight` [d, 2d] (column j is
/// dxᵀ f_j for one noise feature f_j, and the features' scales span orders of magnitude),
/// and otherwise the whole tensor.
fn grad_tols(name: &str, g: &[f64]) -> Vec<f64> {
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
fn check_grad(what: &str, name: &str, got: &[f64], want: &[f64]) -> f64 {
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

/// Step 1's loss and every parameter's gradient, device against CPU.
#[test]
fn tiny_teacher_loss_and_gradients_match_the_cpu_autograd() {
    teacher_loss_and_gradients_on(&Emu);
}

/// The loss and every gradient of one teacher forward / backward on `emu` against the CPU
/// autograd, and the same bits on a second run.
fn teacher_loss_and_gradients_on<D: KernelDevice>(emu: &D) {
    let t0 = Instant::now();
    let cfg = config();
    let mut cpu = Ddit::init(&cfg, 11).unwrap();
    let mut dev = DevTrainer::new(emu, &cpu, optim()).unwrap();
    cpu.set_trainable(true);
    let bt = batch(1, 2, 40, cfg.vocab_size);
    let (cpu_l, cpu_g) = cpu_grads(&cpu, &bt);
    let (dev_l, dev_g) = dev.loss_and_grads(&bt).unwrap();
    println!("loss: cpu {cpu_l}, device {dev_l} ({:.1?})", t0.elapsed());
    compare("loss", &[dev_l], &[cpu_l], Tol::new(1e-5, 1e-5)).unwrap();
    assert!(
        (cpu_l - (cfg.vocab_size as f64).ln()).abs() < 0.5,
        "an untrained model's loss is near ln V"
    );
    assert_eq!(dev_g.len(), cpu.params().len());
    for ((name, _), g) in cpu.params().iter().zip(&dev_g) {
        let want = &cpu_g[name];
        let got: Vec<f64> = g
            .to_vec::<D, f32>(emu)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert!(max_abs(want) > 0.0, "{name}: a zero gradient tests nothing");
        let worst = check_grad("grad", name, &got, want);
        println!(
            "grad {name}: max |g| {:.3e}, worst error / tolerance {worst:.3}",
            max_abs(want)
        );
    }
    // deterministic: a second forward / backward gives the same bits (no float atomics)
    let (dev_l2, dev_g2) = dev.loss_and_grads(&bt).unwrap();
    assert_eq!(
        dev_l.to_bits(),
        dev_l2.to_bits(),
        "loss differs between runs"
    );
    for (((name, _), a), b) in cpu.params().iter().zip(&dev_g).zip(&dev_g2) {
        let (a, b) = (
            a.to_vec::<D, f32>(emu).unwrap(),
            b.to_vec::<D, f32>(emu).unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "grad {name} differs between runs"
        );
    }
    println!("total {:.1?}", t0.elapsed());
}

/// Two clipped steps of one micro-batch each.
#[test]
fn tiny_teacher_training_steps_match_the_cpu_trainer() {
    let v = config().vocab_size;
    steps(
        &Emu,
        optim(),
        &[vec![batch(1, 2, 40, v)], vec![batch(2, 2, 40, v)]],
        true,
    );
}

/// Two steps of two micro-batches each (gradient accumulation), without clipping.
#[test]
fn accumulated_unclipped_steps_match_the_cpu_trainer() {
    let v = config().vocab_size;
    let opt = OptimConfig {
        grad_clip: 0.0,
        grad_accum: 2,
        ..optim()
    };
    steps(
        &Emu,
        opt,
        &[
            vec![batch(3, 1, 33, v), batch(4, 1, 33, v)],
            vec![batch(5, 1, 33, v), batch(6, 1, 33, v)],
        ],
        false,
    );
}

/// Runs `micro.len()` updates on both sides (update s takes the micro-batches `micro[s]`)
/// and compares loss, gradient norm, learning rate and every weight after each.
fn steps<D: KernelDevice>(emu: &D, opt: OptimConfig, micro: &[Vec<Batch>], clipped: bool) {
    let cfg = config();
    let mut cpu = Ddit::init(&cfg, 11).unwrap();
    let mut dev = DevTrainer::new(emu, &cpu, opt.clone()).unwrap();
    cpu.set_trainable(true);
    let init = Ddit::init(&cfg, 11).unwrap().params().to_vec();
    run_steps(
        &opt,
        micro,
        clipped,
        cpu.params(),
        &init,
        &|bt| cpu_loss(&cpu, bt),
        &mut dev,
        &|d, mbs| d.train_step(mbs),
    );
}

type CpuLoss<'a, Bt> = &'a dyn Fn(&Bt) -> anyhow::Result<Tensor>;
type DevStep<'a, 'd, D, Bt> =
    &'a dyn Fn(&mut DevTrainer<'d, D>, &[Bt]) -> anyhow::Result<DevStepStats>;

/// The comparison of [`steps`] for any model and batch kind: `params` are the CPU model's
/// trainable handles (updated in place by the CPU trainer), `init` a copy of the initial
/// weights, `cpu_loss` the CPU loss of one micro-batch, `dev_step` the device update.
#[allow(clippy::too_many_arguments)]
fn run_steps<'d, D: KernelDevice, Bt>(
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

/// The backward launchers the teacher's step does not use (softmax, log-softmax, GELU erf)
/// against the CPU ops' autograd, on a ragged shape.
#[test]
fn other_backward_launchers_match_the_cpu_autograd() {
    use kf_ops::kdev::backward as bw;
    use kf_ops::kdev::launch as fw;
    use kf_ops::kdev::DTensor;
    let emu = Emu;
    let (rows, v) = (7, 301);
    let mut gen = Gen::new(5);
    let x: Vec<f32> = gen
        .vec(rows * v, -3.0, 3.0)
        .iter()
        .map(|&a| a as f32)
        .collect();
    let g: Vec<f32> = gen
        .vec(rows * v, -1.0, 1.0)
        .iter()
        .map(|&a| a as f32)
        .collect();
    let cpu = |t: &[f32]| Tensor::from_vec(t.to_vec(), &[rows, v], kf_engine::Device::Cpu).unwrap();
    let xd = DTensor::from_slice(&emu, &x, &[rows, v]).unwrap();
    let gd = DTensor::from_slice(&emu, &g, &[rows, v]).unwrap();
    type Op = fn(&Tensor) -> anyhow::Result<Tensor>;
    let cases: [(&str, Op); 3] = [
        ("softmax", kf_ops::softmax::softmax),
        ("log_softmax", kf_ops::softmax::log_softmax),
        ("gelu_erf", kf_ops::gelu::gelu_erf),
    ];
    for (name, op) in cases {
        let xv = cpu(&x).var();
        let y = op(&xv).unwrap();
        let want = y
            .backward_with(cpu(&g))
            .unwrap()
            .get(&xv)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let got = match name {
            "gelu_erf" => bw::gelu_erf_bwd(&emu, &xd, &gd).unwrap(),
            _ => {
                let log = name == "log_softmax";
                let yd = fw::softmax(&emu, &xd, log).unwrap();
                bw::softmax_bwd(&emu, &yd, &gd, log).unwrap()
            }
        };
        let got: Vec<f64> = got
            .to_vec::<Emu, f32>(&emu)
            .unwrap()
            .iter()
            .map(|&a| a as f64)
            .collect();
        compare(
            &format!("{name} backward"),
            &got,
            &want,
            Tol::new(1e-6, 1e-4),
        )
        .unwrap();
        assert!(
            max_abs(&want) > 1e-3,
            "{name}: a vanishing gradient tests nothing"
        );
    }
}

/// The CPU stage-1 loss of a staircase batch (as `DistillTask::window_loss`).
fn pflm_loss(st: &Pflm, sb: &StairBatch) -> anyhow::Result<Tensor> {
    let cpu = kf_engine::Device::Cpu;
    let ctx = Tensor::from_vec(sb.ctx.clone(), &[sb.b, sb.n], cpu)?;
    let u = Tensor::from_vec(sb.u.clone(), &[sb.b, sb.n, sb.kk], cpu)?;
    let logits = st.forward_staircase(&ctx, &u, &[sb.tau])?;
    let m = sb.b * sb.n * sb.kk;
    let tg = Tensor::from_vec(sb.targets.clone(), &[m], cpu)?;
    let v = st.cfg().vocab_size;
    Ok(kf_ops::cross_entropy::cross_entropy(&logits.reshape(&[m, v])?, &tg, None)?.0)
}

/// Distillation stage 1 (AR teacher -> k = 1 student): the student's staircase pass over
/// `[context | hints]` (noise encoder, staircase attention, N = 23 ragged) against stage-1
/// targets drawn from the CPU teacher: loss and every gradient (backbone and noise encoder)
/// at step 1, then two clipped steps, device against the CPU trainer.
#[test]
fn pflm_stage1_staircase_steps_match_the_cpu_trainer() {
    pflm_stage1_steps_on(&Emu);
}

/// Stage-1 staircase loss, gradients and two steps of a student on `emu` against the CPU.
fn pflm_stage1_steps_on<D: KernelDevice>(emu: &D) {
    let t0 = Instant::now();
    let cfg = config();
    let v = cfg.vocab_size;
    let teacher = Ddit::init(&cfg, 11).unwrap();
    let (b, n, kk, tau) = (2, 23, 1, 1.0);
    let cpu = kf_engine::Device::Cpu;
    let make = |seed: u64| -> StairBatch {
        let mut g = Gen::new(seed);
        let ctx: Vec<u32> = (0..b * n).map(|_| g.below(v as u64) as u32).collect();
        let u: Vec<f64> = (0..b * n * kk).map(|_| g.unit()).collect();
        let targets = stage1_targets(
            &teacher,
            &Tensor::from_vec(ctx.clone(), &[b, n], cpu).unwrap(),
            &Tensor::from_vec(u.clone(), &[b, n], cpu).unwrap(),
            tau,
        )
        .unwrap()
        .to_vec::<u32>()
        .unwrap();
        StairBatch {
            b,
            n,
            kk,
            ctx,
            u,
            tau,
            targets,
        }
    };
    let batches = [make(21), make(22)];
    let student = |seed| Pflm::from_teacher(Ddit::init(&cfg, 11).unwrap(), kk, seed).unwrap();
    let mut st = student(5);
    let init = student(5).params();
    let mut dev = DevTrainer::new_pflm(emu, &st, optim()).unwrap();
    st.set_trainable(true);
    let params = st.params();

    let (cpu_l, cpu_g) = grads_of(&params, pflm_loss(&st, &batches[0]).unwrap());
    let (dev_l, dev_g) = dev.staircase_loss_and_grads(&batches[0]).unwrap();
    println!(
        "pflm loss: cpu {cpu_l}, device {dev_l} ({:.1?})",
        t0.elapsed()
    );
    compare("pflm loss", &[dev_l], &[cpu_l], Tol::new(1e-5, 1e-5)).unwrap();
    assert_eq!(dev_g.len(), params.len());
    for ((name, _), g) in params.iter().zip(&dev_g) {
        let want = &cpu_g[name];
        let got: Vec<f64> = g
            .to_vec::<D, f32>(emu)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert!(max_abs(want) > 0.0, "{name}: a zero gradient tests nothing");
        let worst = check_grad("pflm grad", name, &got, want);
        println!(
            "pflm grad {name}: max |g| {:.3e}, worst error / tolerance {worst:.3}",
            max_abs(want)
        );
    }
    drop(dev_g);
    run_steps(
        &optim(),
        &[vec![batches[0].clone()], vec![batches[1].clone()]],
        true,
        &params,
        &init,
        &|sb| pflm_loss(&st, sb),
        &mut dev,
        &|d, mbs| d.train_step_staircase(mbs),
    );
}

/// The same training checks on a real GPU (`--features cuda`): skipped with the reason when
/// there is none (KF_REQUIRE_GPU=1 makes that a failure).
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_training_steps_match_the_cpu() {
    let dev = match kf_ops::kdev::cuda::Cuda::new(0) {
        Ok(d) => d,
        Err(e) => {
            assert!(
                std::env::var_os("KF_REQUIRE_GPU").is_none(),
                "KF_REQUIRE_GPU is set but: {e:#}"
            );
            println!("skipped: no usable GPU: {e:#}");
            return;
        }
    };
    teacher_loss_and_gradients_on(&dev);
    let v = config().vocab_size;
    steps(
        &dev,
        optim(),
        &[vec![batch(1, 2, 40, v)], vec![batch(2, 2, 40, v)]],
        true,
    );
    pflm_stage1_steps_on(&dev);
}
