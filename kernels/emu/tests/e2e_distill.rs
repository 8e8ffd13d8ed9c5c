//! End to end: the distillation pieces through the one model code with their tensors on a
//! kernel device (the emulated kernels, `Device::Emu`; with `--features cuda` also a GPU)
//! against the same calls on the CPU, on tiny models (d 128, 2 heads of head dim 64, 2 layers,
//! V 97) and a ragged batch (B = 2, N = 5 context positions):
//! - `pflm::stage1_targets` (tau 1, 0.7 and greedy): tokens identical;
//! - `Pflm::rollout_double` (k = 1 and k = 2 teachers, their weights scaled so that the tokens
//!   vary with context and noise): tokens identical.
//! Training on a device (the staircase loss, its gradients, the trainer's steps, resume and
//! checkpoints moving between devices) is covered by model/tests/device_forward.rs and
//! tools/tests/train_device.rs (`kfrun train` / `kfrun distill --device emu`).

mod common;

use kf_engine::{no_grad, Device, Tensor};
use kf_model::config::DditConfig;
use kf_model::pflm::{stage1_targets, NoiseEncoder, Pflm};
use kf_model::Ddit;
use kf_tests::harness::Gen;

const B: usize = 2;
const N: usize = 5;

fn config() -> DditConfig {
    common::tiny_model_cfg()
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

fn stage1_targets_on(device: Device) {
    let _g = no_grad();
    let cfg = config();
    let model = Ddit::init(&cfg, 11).unwrap();
    let on_dev = model.to_device(device).unwrap();
    let (ctx, u) = ctx_and_u(7, 1, cfg.vocab_size);
    let ut = Tensor::from_vec(u, &[B, N], Device::Cpu).unwrap();
    for tau in [1.0, 0.7, 0.0] {
        let run = |m: &Ddit| {
            let c = Tensor::from_vec(ctx.clone(), &[B, N], m.device()).unwrap();
            let t = stage1_targets(m, &c, &ut, tau).unwrap();
            assert_eq!(t.device(), m.device());
            t.to_vec::<u32>().unwrap()
        };
        let (want, got) = (run(&model), run(&on_dev));
        assert_eq!(got, want, "stage-1 targets at tau {tau} on {device}");
        assert_varied(&format!("stage-1 targets tau {tau}"), &got, 3);
    }
}

#[test]
fn stage1_targets_match_the_cpu() {
    stage1_targets_on(Device::Emu);
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

fn double_rollout_on(device: Device) {
    let _g = no_grad();
    let cfg = config();
    for k in [1, 2] {
        let teacher = sharp_teacher(k);
        let on_dev = teacher.to_device(device).unwrap();
        let (ctx, u) = ctx_and_u(20 + k as u64, 2 * k, cfg.vocab_size);
        let ut = Tensor::from_vec(u.clone(), &[B, N, 2 * k], Device::Cpu).unwrap();
        let run = |t: &Pflm| {
            let c = Tensor::from_vec(ctx.clone(), &[B, N], t.device()).unwrap();
            t.rollout_double(&c, &ut, &[1.0])
                .unwrap()
                .to_vec::<u32>()
                .unwrap()
        };
        let (want, got) = (run(&teacher), run(&on_dev));
        assert_eq!(got.len(), B * N * 2 * k);
        assert_eq!(got, want, "double rollout of a k = {k} teacher on {device}");
        assert_varied(&format!("rollout k {k}"), &got, 4);
        // wrong noise count: a clear error
        let short = Tensor::from_vec(u[..B * N * k].to_vec(), &[B, N, k], Device::Cpu).unwrap();
        let c = Tensor::from_vec(ctx.clone(), &[B, N], device).unwrap();
        assert!(on_dev.rollout_double(&c, &short, &[1.0]).is_err());
    }
}

#[test]
fn double_rollout_matches_the_cpu() {
    double_rollout_on(Device::Emu);
}

/// The same checks on a real GPU (`--features cuda`): skipped with the reason when there is
/// none (KF_REQUIRE_GPU=1 makes that a failure).
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_distillation_pieces_match_the_cpu() {
    if kf_engine::cuda::Cuda::for_tests().is_none() {
        return;
    }
    stage1_targets_on(Device::Cuda(0));
    double_rollout_on(Device::Cuda(0));
}
