//! The model written once: `Ddit::forward_train` — the CPU code — run with its parameters and
//! ids on the emulator (`Device::Emu`, the CUDA kernels of kernels/*.cu on the CPU), the ops
//! dispatching on the tensors' device, against the same forward on the CPU.

mod common;

use common::{ids, random_model, small_cfg};
use kf_engine::{no_grad, Device, GradStore, Tensor};
use kf_model::pflm::Pflm;
use kf_model::DditConfig;
use kf_ops::cross_entropy::cross_entropy;

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
fn mixed_devices_are_a_clear_error() {
    let cfg = cfg();
    let model = random_model(&cfg, 3).to_device(Device::Emu).unwrap();
    let x = Tensor::from_vec(ids(1, 4, cfg.vocab_size, 1), &[1, 4], Device::Cpu).unwrap();
    let e = format!("{:#}", model.forward_train(&x).unwrap_err());
    assert!(e.contains("different devices"), "{e}");
}

/// Every parameter's gradient on `device` against the CPU's (f32 both): within `rel` of the
/// largest CPU gradient of that parameter.
fn assert_grads_agree(
    what: &str,
    params: &[(String, Tensor)],
    cpu: &GradStore,
    dev_params: &[(String, Tensor)],
    dev: &GradStore,
    rel: f32,
) {
    let mut n = 0;
    for ((name, p), (dname, dp)) in params.iter().zip(dev_params) {
        assert_eq!(name, dname);
        let Some(want) = cpu.get(p) else { continue };
        let got = dev
            .get(dp)
            .unwrap_or_else(|| panic!("{what}: no gradient for {name} on the device"));
        assert_eq!(got.device(), Device::Emu, "{what}: {name}");
        let (w, g) = (want.to_vec::<f32>().unwrap(), got.to_vec::<f32>().unwrap());
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = w
            .iter()
            .zip(&g)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= rel * scale.max(1e-6),
            "{what}: {name}: max |cpu - emu| {worst:.3e} of max |grad| {scale:.3e}"
        );
        n += 1;
    }
    assert!(
        n >= params.len() / 2,
        "{what}: only {n} parameters had gradients"
    );
}

/// The CPU model's training loss (cross-entropy of the next-token logits) differentiated by
/// autograd on the emulator — every op's backward kernel — equals the CPU's gradients.
#[test]
fn the_cpu_backward_runs_on_the_emulator_and_agrees() {
    let cfg = cfg();
    let (b, t, v) = (2, 9, cfg.vocab_size);
    let x = ids(b, t, v, 4);
    let y = ids(b * t, 1, v, 5);
    let run = |device: Device| {
        let mut m = random_model(&cfg, 3).to_device(device).unwrap();
        m.set_trainable(true);
        let xi = Tensor::from_vec(x.clone(), &[b, t], device).unwrap();
        let yi = Tensor::from_vec(y.clone(), &[b * t], device).unwrap();
        let logits = m.forward_train(&xi).unwrap().reshape(&[b * t, v]).unwrap();
        let loss = cross_entropy(&logits, &yi, None).unwrap().0;
        let g = loss.backward().unwrap();
        (m, loss.to_scalar_f64().unwrap(), g)
    };
    let (mc, lc, gc) = run(Device::Cpu);
    let (me, le, ge) = run(Device::Emu);
    assert!((lc - le).abs() <= 1e-5 * lc.abs(), "loss {lc} vs {le}");
    assert_grads_agree("AR loss", mc.params(), &gc, me.params(), &ge, 1e-3);

    // the student's staircase pass (noise encoder, hint rows, the staircase attention pattern)
    let k = 2;
    let u: Vec<f64> = (0..b * t * k)
        .map(|i| ((i * 37 % 101) as f64 + 0.5) / 101.0)
        .collect();
    let yk = ids(b * t * k, 1, v, 6);
    let run = |device: Device| {
        let mut s = Pflm::from_teacher(random_model(&cfg, 3), k, 7)
            .unwrap()
            .to_device(device)
            .unwrap();
        s.set_trainable(true);
        let ctx = Tensor::from_vec(x.clone(), &[b, t], device).unwrap();
        let ut = Tensor::from_vec(u.clone(), &[b, t, k], Device::Cpu).unwrap();
        let logits = s.forward_staircase(&ctx, &ut, &[1.0]).unwrap();
        let yi = Tensor::from_vec(yk.clone(), &[b * t * k], device).unwrap();
        let loss = cross_entropy(&logits.reshape(&[b * t * k, v]).unwrap(), &yi, None)
            .unwrap()
            .0;
        let g = loss.backward().unwrap();
        (s.params(), g)
    };
    let (pc, gc) = run(Device::Cpu);
    let (pe, ge) = run(Device::Emu);
    assert_grads_agree("PFLM staircase loss", &pc, &gc, &pe, &ge, 1e-3);
}
