//! End to end: one (and two) training steps of a tiny AR teacher (DDiT, d = 128, 2 heads of
//! 64, 2 layers, V = 97, B = 2, T = 40: ragged against every tile) on the emulated kernels
//! (kf_model::kdev_train::DevTrainer on kf_engine::emu::Emu) against the CPU
//! trainer's step (kf_model::train::optim::Trainer::train_step on the teacher's loss: mean
//! next-token cross-entropy of `Ddit::forward_train`), from the same initial weights and
//! batches: the loss, every parameter's gradient (step 1; and bit-for-bit equal on a second
//! device run), the gradient norm (with the clip engaged; and with accumulation over two
//! micro-batches, unclipped), and every updated weight after steps 1 and 2. Likewise the
//! PFLM stage-1 step (student from the teacher, k = 1, staircase pass over [context |
//! hints] with the noise encoder, targets from `pflm::stage1_targets`).
//!
//! Tolerances and the step comparison: common/e2e.rs (shared with e2e_distill.rs).

#[path = "common/e2e.rs"]
mod e2e;

use e2e::*;
use kf_engine::emu::Emu;
use kf_engine::Tensor;
use kf_model::kdev_train::{Batch, DevTrainer, StairBatch};
use kf_model::pflm::{stage1_targets, Pflm};
use kf_model::train::optim::OptimConfig;
use kf_model::Ddit;
use kf_ops::kdev::KernelDevice;
use kf_tests::harness::{compare, Gen, Tol};
use std::collections::BTreeMap;
use std::time::Instant;

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

/// Step 1's loss and every parameter's gradient, device against CPU.
#[test]
fn tiny_teacher_loss_and_gradients_match_the_cpu_autograd() {
    teacher_loss_and_gradients_on(&Emu);
}

/// The loss and every gradient of one teacher forward / backward on `emu` against the CPU
/// autograd, and the same bits on a second run.
fn teacher_loss_and_gradients_on<D: KernelDevice + ?Sized>(emu: &D) {
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
fn steps<D: KernelDevice + ?Sized>(emu: &D, opt: OptimConfig, micro: &[Vec<Batch>], clipped: bool) {
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

/// Distillation stage 1 (AR teacher -> k = 1 student): the student's staircase pass over
/// `[context | hints]` (noise encoder, staircase attention, N = 23 ragged) against stage-1
/// targets drawn from the CPU teacher: loss and every gradient (backbone and noise encoder)
/// at step 1, then two clipped steps, device against the CPU trainer.
#[test]
fn pflm_stage1_staircase_steps_match_the_cpu_trainer() {
    pflm_stage1_steps_on(&Emu);
}

/// Stage-1 staircase loss, gradients and two steps of a student on `emu` against the CPU.
fn pflm_stage1_steps_on<D: KernelDevice + ?Sized>(emu: &D) {
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
    let Some(dev) = kf_engine::cuda::Cuda::for_tests() else {
        return;
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
