//! End to end: the distillation pieces on a kernel device (the emulated kernels, `Emu`; with
//! `--features cuda` also a GPU) against the CPU functions they stand in for, on tiny models
//! (common/e2e.rs: d 128, 2 heads of head dim 64, 2 layers, V 97) and a ragged batch (B = 2,
//! N = 5 context positions):
//! - `DevTrainer::eval_loss` (teacher, forward only) against the CPU loss and, bit for bit,
//!   against the loss of `loss_and_grads` (the same forward code);
//! - `DevTrainer::staircase_eval` (student, forward only) against `DistillTask::window_loss`'s
//!   per-target losses and argmax predictions (computed here from the CPU ops it uses);
//! - `stage1_targets_dev` against `pflm::stage1_targets` (tau 1, 0.7 and greedy);
//! - `rollout_double_dev` against `Pflm::rollout_double` (k = 1 and k = 2 teachers, their
//!   weights scaled so that the tokens vary with context and noise);
//! - `teacher_logits_dev` against `Ddit::forward_train`;
//! - the student's staircase step for stage k -> 2k (kk = 2 and kk = 4, targets from the CPU
//!   rollout of a k = kk / 2 teacher): loss and every gradient, then two clipped updates,
//!   against the CPU trainer (`run_steps` in common/e2e.rs).

#[path = "common/e2e.rs"]
mod e2e;

use e2e::*;
use kf_engine::emu::Emu;
use kf_engine::{no_grad, Device, Tensor};
use kf_model::kdev_model::{
    rollout_double_dev, stage1_targets_dev, teacher_logits_dev, DevDdit, DevPflm,
};
use kf_model::kdev_train::{Batch, DevTrainer, StairBatch};
use kf_model::pflm::{stage1_targets, NoiseEncoder, Pflm};
use kf_model::Ddit;
use kf_ops::kdev::KernelDevice;
use kf_tests::harness::{compare, Gen, Tol};
use std::time::Instant;

const B: usize = 2;
const N: usize = 5;
/// Logits and losses of an f32 model agree with the CPU to f32 rounding of sums over d.
const LOGIT_TOL: Tol = Tol::new(1e-4, 1e-4);
/// Per-target losses: 1e-4 relative.
const ROW_TOL: Tol = Tol::new(0.0, 1e-4);

fn cpu_u32(v: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
}
fn cpu_f64(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
}
fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Random context ids `[B, N]` and uniforms `[B, N, per]` (in (0, 1)).
fn ctx_and_u(seed: u64, per: usize, v: usize) -> (Vec<u32>, Vec<f64>) {
    let mut g = Gen::new(seed);
    let ctx = (0..B * N).map(|_| g.below(v as u64) as u32).collect();
    let u = (0..B * N * per).map(|_| g.unit()).collect();
    (ctx, u)
}

/// At least `want` distinct values (the comparison is not of two constant outputs).
fn assert_varied(what: &str, toks: &[u32], want: usize) {
    let mut d = toks.to_vec();
    d.sort();
    d.dedup();
    assert!(d.len() >= want, "{what}: degenerate tokens {toks:?}");
}

#[test]
fn teacher_eval_loss_and_logits_match_the_cpu() {
    teacher_eval_loss_and_logits(&Emu);
}

/// `eval_loss` against the CPU loss and bit for bit against `loss_and_grads`'s loss (no
/// update), and `teacher_logits_dev` against `forward_train`.
fn teacher_eval_loss_and_logits<D: KernelDevice + ?Sized>(dev: &D) {
    let t0 = Instant::now();
    let cfg = config();
    let v = cfg.vocab_size;
    let model = Ddit::init(&cfg, 11).unwrap();
    let mut g = Gen::new(3);
    let (mut ids, mut targets) = (vec![], vec![]);
    for _ in 0..B {
        let w: Vec<u32> = (0..=N).map(|_| g.below(v as u64) as u32).collect();
        ids.extend_from_slice(&w[..N]);
        targets.extend_from_slice(&w[1..]);
    }
    let bt = Batch {
        b: B,
        t: N,
        ids: ids.clone(),
        targets: targets.clone(),
    };
    let cpu_logits = {
        let _g = no_grad();
        model.forward_train(&cpu_u32(&ids, &[B, N])).unwrap()
    };
    let cpu_l = kf_ops::cross_entropy::cross_entropy(
        &cpu_logits.reshape(&[B * N, v]).unwrap(),
        &cpu_u32(&targets, &[B * N]),
        None,
    )
    .unwrap()
    .0
    .to_scalar_f64()
    .unwrap();
    let mut tr = DevTrainer::new(dev, &model, optim()).unwrap();
    let ev = tr.eval_loss(&bt).unwrap();
    let (lg, _) = tr.loss_and_grads(&bt).unwrap();
    println!("teacher loss: cpu {cpu_l}, eval {ev}, loss_and_grads {lg}");
    compare("eval_loss", &[ev], &[cpu_l], Tol::new(1e-5, 1e-5)).unwrap();
    assert_eq!(ev.to_bits(), lg.to_bits(), "eval_loss != loss_and_grads");
    assert_eq!(tr.step(), 0, "evaluation does not update");
    // a different batch gives a different loss (eval_loss reads its batch)
    let mut other = bt.clone();
    other.targets.rotate_left(1);
    assert_ne!(tr.eval_loss(&other).unwrap(), ev);

    let dm = DevDdit::upload(dev, &model).unwrap();
    let got = teacher_logits_dev(dev, &dm, &ids, B, N).unwrap();
    let want = cpu_logits.to_vec::<f32>().unwrap();
    assert_eq!(got.len(), B * N * v);
    compare("teacher logits", &f64s(&got), &f64s(&want), LOGIT_TOL).unwrap();
    assert!(teacher_logits_dev(dev, &dm, &ids[1..], B, N).is_err());
    println!("teacher eval + logits {:.1?}", t0.elapsed());
}

#[test]
fn stage1_targets_match_the_cpu() {
    stage1_targets_on(&Emu);
}

/// `stage1_targets_dev` equals `stage1_targets` at tau 1, 0.7 and 0 (greedy).
fn stage1_targets_on<D: KernelDevice + ?Sized>(dev: &D) {
    let cfg = config();
    let model = Ddit::init(&cfg, 11).unwrap();
    let dm = DevDdit::upload(dev, &model).unwrap();
    let (ctx, u) = ctx_and_u(7, 1, cfg.vocab_size);
    for tau in [1.0, 0.7, 0.0] {
        let want = stage1_targets(&model, &cpu_u32(&ctx, &[B, N]), &cpu_f64(&u, &[B, N]), tau)
            .unwrap()
            .to_vec::<u32>()
            .unwrap();
        let got = stage1_targets_dev(dev, &dm, &ctx, B, N, &u, tau).unwrap();
        assert_eq!(got, want, "stage-1 targets at tau {tau}");
        assert_varied(&format!("stage-1 targets tau {tau}"), &got, 3);
    }
    assert!(stage1_targets_dev(dev, &dm, &ctx, B, N, &u[1..], 1.0).is_err());
}

/// A PFLM teacher of window `k` whose matrices (rank >= 2) are `SHARPEN` times a fresh
/// init's: at init the residual stream barely moves and the argmax hardly depends on the
/// hints; scaled, the rollout's tokens vary with context and noise.
fn sharp_teacher(k: usize) -> Pflm {
    const SHARPEN: f32 = 4.0;
    let cfg = config();
    let t = Pflm::from_teacher(Ddit::init(&cfg, 13).unwrap(), k, 17).unwrap();
    let scale = |named: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
        named
            .iter()
            .map(|(n, p)| {
                let p = if p.rank() >= 2 {
                    let v: Vec<f32> = p.to_vec::<f32>().unwrap();
                    let v: Vec<f32> = v.iter().map(|x| x * SHARPEN).collect();
                    Tensor::from_vec(v, p.shape(), Device::Cpu).unwrap()
                } else {
                    p.clone()
                };
                (n.clone(), p)
            })
            .collect()
    };
    let mut bcfg = t.backbone.cfg.clone();
    bcfg.k = None;
    let bb = Ddit::from_params(&bcfg, scale(t.backbone.params())).unwrap();
    let noise =
        NoiseEncoder::from_params(cfg.d_model, cfg.ln_eps, scale(t.noise.params())).unwrap();
    Pflm::from_parts(bb, noise, k).unwrap()
}

#[test]
fn double_rollout_matches_the_cpu() {
    double_rollout_on(&Emu);
}

/// `rollout_double_dev` equals `Pflm::rollout_double` for k = 1 and k = 2 teachers.
fn double_rollout_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let cfg = config();
    for k in [1, 2] {
        let teacher = sharp_teacher(k);
        let dt = DevPflm::upload(dev, &teacher).unwrap();
        let (ctx, u) = ctx_and_u(20 + k as u64, 2 * k, cfg.vocab_size);
        let want = teacher
            .rollout_double(
                &cpu_u32(&ctx, &[B, N]),
                &cpu_f64(&u, &[B, N, 2 * k]),
                &[1.0],
            )
            .unwrap()
            .to_vec::<u32>()
            .unwrap();
        let got = rollout_double_dev(dev, &dt, &ctx, B, N, &u, 1.0).unwrap();
        assert_eq!(got.len(), B * N * 2 * k);
        assert_eq!(got, want, "double rollout of a k = {k} teacher");
        println!("rollout k {k}: {got:?}");
        assert_varied(&format!("rollout k {k}"), &got, 4);
        // wrong noise count: a clear error
        assert!(rollout_double_dev(dev, &dt, &ctx, B, N, &u[..B * N * k], 1.0).is_err());
    }
}

/// A stage k -> 2k batch for a student of window `kk`: random context and noises, targets
/// the CPU rollout of a k = kk / 2 teacher (as `DistillTeacher::Pflm`).
fn stair_batch(seed: u64, kk: usize) -> StairBatch {
    let _g = no_grad();
    let cfg = config();
    let teacher = sharp_teacher(kk / 2);
    let (ctx, u) = ctx_and_u(seed, kk, cfg.vocab_size);
    let targets = teacher
        .rollout_double(&cpu_u32(&ctx, &[B, N]), &cpu_f64(&u, &[B, N, kk]), &[1.0])
        .unwrap()
        .to_vec::<u32>()
        .unwrap();
    StairBatch {
        b: B,
        n: N,
        kk,
        ctx,
        u,
        tau: 1.0,
        targets,
    }
}

/// `DistillTask::window_loss`'s per-target losses and predictions on the CPU: the staircase
/// logits, cross-entropy rows, argmax with zero counts and no penalty.
fn cpu_window_eval(st: &Pflm, sb: &StairBatch) -> (Vec<f64>, Vec<u32>) {
    let _g = no_grad();
    let v = st.cfg().vocab_size;
    let m = sb.b * sb.n * sb.kk;
    let logits = st
        .forward_staircase(
            &cpu_u32(&sb.ctx, &[sb.b, sb.n]),
            &cpu_f64(&sb.u, &[sb.b, sb.n, sb.kk]),
            &[sb.tau],
        )
        .unwrap();
    let rows = kf_ops::cross_entropy::cross_entropy(
        &logits.reshape(&[m, v]).unwrap(),
        &cpu_u32(&sb.targets, &[m]),
        None,
    )
    .unwrap()
    .1
    .to_vec_f64()
    .unwrap();
    let counts = Tensor::zeros(&[sb.b, v], kf_engine::DType::U32, Device::Cpu).unwrap();
    let pred = kf_ops::argmax::argmax_penalty(
        &logits.reshape(&[sb.b, sb.n * sb.kk, v]).unwrap(),
        &counts,
        0.0,
    )
    .unwrap()
    .to_vec::<u32>()
    .unwrap();
    (rows, pred)
}

#[test]
fn stage_k_to_2k_staircase_eval_and_steps_match_the_cpu_kk2() {
    staircase_eval_and_steps(&Emu, 2);
}

#[test]
fn stage_k_to_2k_staircase_eval_and_steps_match_the_cpu_kk4() {
    staircase_eval_and_steps(&Emu, 4);
}

/// A student of window `kk` on stage k -> 2k batches: `staircase_eval` against the CPU's
/// per-target losses and predictions, the staircase loss and every gradient against the CPU
/// autograd, then two clipped updates against the CPU trainer.
fn staircase_eval_and_steps<D: KernelDevice + ?Sized>(dev: &D, kk: usize) {
    let t0 = Instant::now();
    let cfg = config();
    let batches = [stair_batch(31, kk), stair_batch(32, kk)];
    let student = |seed| Pflm::from_teacher(Ddit::init(&cfg, 11).unwrap(), kk, seed).unwrap();
    let mut st = student(5);
    let init = student(5).params();
    let mut tr = DevTrainer::new_pflm(dev, &st, optim()).unwrap();

    let sb = &batches[0];
    let (want_rows, want_pred) = cpu_window_eval(&st, sb);
    let (rows, pred) = tr.staircase_eval(sb).unwrap();
    assert_eq!(rows.len(), B * N * kk);
    compare(&format!("kk {kk} row losses"), &rows, &want_rows, ROW_TOL).unwrap();
    assert_eq!(pred, want_pred, "kk {kk}: predictions");
    assert_varied(&format!("kk {kk} predictions"), &pred, 2);
    // the rows differ (per-target values, not one broadcast mean)
    assert!(rows.iter().any(|&r| (r - rows[0]).abs() > 1e-3));
    println!("kk {kk}: staircase eval ok ({:.1?})", t0.elapsed());

    st.set_trainable(true);
    let params = st.params();
    let (cpu_l, cpu_g) = grads_of(&params, pflm_loss(&st, sb).unwrap());
    let (dev_l, dev_g) = tr.staircase_loss_and_grads(sb).unwrap();
    println!("kk {kk}: loss cpu {cpu_l}, device {dev_l}");
    compare("staircase loss", &[dev_l], &[cpu_l], Tol::new(1e-5, 1e-5)).unwrap();
    // the eval rows average to the training loss
    let mean = rows.iter().sum::<f64>() / rows.len() as f64;
    compare(
        "mean of the eval rows",
        &[mean],
        &[dev_l],
        Tol::new(1e-5, 1e-5),
    )
    .unwrap();
    check_grads(dev, &format!("kk {kk} grad"), &params, &cpu_g, &dev_g);
    drop(dev_g);
    run_steps(
        &optim(),
        &[vec![batches[0].clone()], vec![batches[1].clone()]],
        true,
        &params,
        &init,
        &|sb| pflm_loss(&st, sb),
        &mut tr,
        &|d, mbs| d.train_step_staircase(mbs),
    );
    println!("kk {kk}: total {:.1?}", t0.elapsed());
}

/// The same checks on a real GPU (`--features cuda`): skipped with the reason when there is
/// none (KF_REQUIRE_GPU=1 makes that a failure).
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_distillation_pieces_match_the_cpu() {
    let Some(dev) = kf_engine::cuda::Cuda::for_tests() else {
        return;
    };
    teacher_eval_loss_and_logits(&dev);
    stage1_targets_on(&dev);
    double_rollout_on(&dev);
    staircase_eval_and_steps(&dev, 2);
    staircase_eval_and_steps(&dev, 4);
}
