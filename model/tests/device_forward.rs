//! The model written once: `Ddit::forward_train` — the CPU code — run with its parameters and
//! ids on the emulator (`Device::Emu`, the CUDA kernels of kernels/*.cu on the CPU), the ops
//! dispatching on the tensors' device, against the same forward on the CPU.

mod common;

use common::{ids, random_model, small_cfg};
use kf_engine::{no_grad, Device, Tensor};
use kf_model::DditConfig;

/// The small test model at head dim 64 (the attention kernels have instances for 64 and
/// 128 only); mask token 5.
fn cfg() -> DditConfig {
    DditConfig {
        d_model: 128,
        n_heads: 2,
        ..small_cfg()
    }
}

#[test]
fn the_cpu_forward_runs_on_the_emulator_and_agrees() {
    let cfg = cfg();
    let model = random_model(&cfg, 3);
    let on_emu = model.to_device(Device::Emu).unwrap();
    assert_eq!(on_emu.device(), Device::Emu);
    let (b, t, v) = (2, 19, cfg.vocab_size);
    let x = ids(b, t, v, 4);
    let _g = no_grad();
    let cpu = model
        .forward_train(&Tensor::from_vec(x.clone(), &[b, t], Device::Cpu).unwrap())
        .unwrap();
    let emu = on_emu
        .forward_train(&Tensor::from_vec(x.clone(), &[b, t], Device::Emu).unwrap())
        .unwrap();
    assert_eq!(emu.device(), Device::Emu);
    assert_eq!(emu.shape(), cpu.shape());
    let (c, e) = (cpu.to_vec::<f32>().unwrap(), emu.to_vec::<f32>().unwrap());
    let scale = c
        .iter()
        .enumerate()
        .filter(|(i, _)| i % v != 5)
        .fold(0f32, |m, (_, x)| m.max(x.abs()));
    let mut worst = 0f32;
    for (i, (a, r)) in c.iter().zip(&e).enumerate() {
        if i % v == 5 {
            assert_eq!((*a, *r), (-1000.0, -1000.0), "mask column at {i}");
        } else {
            worst = worst.max((a - r).abs());
        }
    }
    eprintln!("max |cpu - emu| = {worst:.3e} of max |logit| {scale:.3}");
    assert!(scale > 1.0, "logits too small to compare");
    assert!(
        worst <= 1e-4 * scale,
        "emu differs: {worst} (scale {scale})"
    );
    // the argmax tokens agree
    let am = |x: &[f32]| -> Vec<usize> {
        x.chunks(v)
            .map(|r| (0..v).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap())
            .collect()
    };
    assert_eq!(am(&c), am(&e));
}

#[test]
fn mixed_devices_and_device_gradients_are_clear_errors() {
    let cfg = cfg();
    let model = random_model(&cfg, 3).to_device(Device::Emu).unwrap();
    let x = Tensor::from_vec(ids(1, 4, cfg.vocab_size, 1), &[1, 4], Device::Cpu).unwrap();
    let e = format!("{:#}", model.forward_train(&x).unwrap_err());
    assert!(e.contains("different devices"), "{e}");
    // a parameter that wants gradients on a kernel device is refused, not silently detached
    let w = Tensor::from_vec(vec![1.0f32; 4], &[2, 2], Device::Emu)
        .unwrap()
        .var();
    let e = format!("{:#}", kf_ops::gelu::gelu_tanh(&w).unwrap_err());
    assert!(
        e.contains("not recorded yet") && e.contains("no_grad"),
        "{e}"
    );
}
