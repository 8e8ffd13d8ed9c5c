//! Tensors in kernel-device memory: `Tensor::to_device` between the CPU and the emulator
//! (and a GPU, with the `cuda` feature, when one is present), for every dtype, from views,
//! and what CPU-only code says when handed device data.

use half::{bf16, f16};
use kf_engine::{DType, Device, Tensor};

/// The kernel devices to check here: the emulator always; GPU 0 where one can be used.
fn kernel_devices() -> Vec<Device> {
    let mut v = vec![Device::Emu];
    if cfg!(feature = "cuda") {
        match Device::Cuda(0).ensure_available() {
            Ok(()) => v.push(Device::Cuda(0)),
            Err(e) => {
                assert!(
                    std::env::var_os("KF_REQUIRE_GPU").is_none(),
                    "KF_REQUIRE_GPU is set but: {e:#}"
                );
                println!("cuda:0 skipped: {e:#}");
            }
        }
    }
    v
}

fn every_dtype(device: Device) -> Vec<Tensor> {
    let shape = [3, 5];
    let f: Vec<f64> = (0..15).map(|i| i as f64 * 0.75 - 4.0).collect();
    vec![
        Tensor::from_vec(f.iter().map(|&x| x as f32).collect(), &shape, device).unwrap(),
        Tensor::from_vec(f.clone(), &shape, device).unwrap(),
        Tensor::from_vec(
            f.iter().map(|&x| f16::from_f64(x)).collect(),
            &shape,
            device,
        )
        .unwrap(),
        Tensor::from_vec(
            f.iter().map(|&x| bf16::from_f64(x)).collect(),
            &shape,
            device,
        )
        .unwrap(),
        Tensor::from_vec((0..15u32).map(|i| i * 7).collect(), &shape, device).unwrap(),
        Tensor::from_vec((0..15i32).map(|i| 3 - i).collect(), &shape, device).unwrap(),
    ]
}

#[test]
fn every_dtype_round_trips_through_each_kernel_device() {
    for device in kernel_devices() {
        for cpu in every_dtype(Device::Cpu) {
            let on = cpu.to_device(device).unwrap();
            assert_eq!(on.device(), device);
            assert_eq!((on.shape(), on.dtype()), (cpu.shape(), cpu.dtype()));
            assert!(on.storage().unwrap().kernel().is_ok());
            let back = on.to_device(Device::Cpu).unwrap();
            assert_eq!(back.device(), Device::Cpu);
            assert_eq!(
                back.to_vec_f64().unwrap(),
                cpu.to_vec_f64().unwrap(),
                "{device}"
            );
            // made on the device directly: the same values
            assert_eq!(on.to_vec_f64().unwrap(), cpu.to_vec_f64().unwrap());
        }
        for t in every_dtype(device) {
            assert_eq!(t.device(), device);
        }
        // same device: the same storage, no copy
        let t = Tensor::zeros(&[4], DType::F32, device).unwrap();
        assert!(t.to_device(device).unwrap().same_storage(&t));
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![0.0; 4]);
        let o = Tensor::ones(&[2, 2], DType::BF16, device).unwrap();
        assert_eq!(o.to_vec_f64().unwrap(), vec![1.0; 4]);
    }
}

#[test]
fn views_move_as_their_logical_values() {
    let x = Tensor::from_vec((0..24).map(|i| i as f32).collect(), &[2, 3, 4], Device::Cpu).unwrap();
    let views = [
        x.transpose(0, 2).unwrap(),
        x.narrow(1, 1, 2).unwrap(),
        x.narrow(2, 3, 1).unwrap().transpose(1, 0).unwrap(),
    ];
    for device in kernel_devices() {
        for v in &views {
            let on = v.to_device(device).unwrap();
            assert_eq!(on.shape(), v.shape());
            assert!(on.is_contiguous());
            assert_eq!(on.to_vec::<f32>().unwrap(), v.to_vec::<f32>().unwrap());
            // a view of a device tensor comes back as its own values
            let w = on.transpose(0, 1).unwrap();
            assert_eq!(
                w.to_device(Device::Cpu).unwrap().to_vec::<f32>().unwrap(),
                v.transpose(0, 1).unwrap().to_vec::<f32>().unwrap()
            );
        }
    }
}

#[test]
fn cpu_only_code_names_the_device_instead_of_panicking() {
    let t = Tensor::from_vec(vec![1.0f32, 2.0], &[2], Device::Emu).unwrap();
    let e = t.cpu_data::<f32>().map(|_| ()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("on emu") && msg.contains("to_device"), "{msg}");
    let e = t.with_cpu_data_mut::<f32, _>(|_| ()).unwrap_err();
    assert!(format!("{e:#}").contains("on emu"), "{e:#}");
    // a wrong element count is refused before anything is uploaded
    assert!(Tensor::from_vec(vec![1.0f32; 3], &[2, 2], Device::Emu).is_err());
    // saving downloads first
    let dir = std::env::temp_dir().join(format!("kf-to-device-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.safetensors");
    kf_engine::io::save(&path, &[("t", &t)], &Default::default()).unwrap();
    let back = kf_engine::io::load(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let got = back.get("t").unwrap().to_vec::<f32>().unwrap();
    assert_eq!(got, vec![1.0, 2.0]);
}

/// Views of every element size gathered on a device (`contiguous`, one `strided_copy` launch;
/// past six dims after collapsing, one memcpy per run) and scattered into a view
/// (`copy_from`) give the CPU's values.
#[test]
fn device_views_gather_and_scatter_like_the_cpu() {
    let base: Vec<f64> = (0..2 * 3 * 4 * 5).map(|i| (i * 7 % 113) as f64).collect();
    let typed = |dtype: DType| {
        Tensor::from_vec(base.clone(), &[2, 3, 4, 5], Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let views = |x: &Tensor| -> Vec<Tensor> {
        vec![
            x.permute(&[3, 1, 0, 2]).unwrap(),
            x.narrow(2, 1, 2).unwrap().transpose(0, 3).unwrap(),
            x.narrow(0, 1, 1).unwrap().narrow(3, 2, 3).unwrap(),
            x.narrow(1, 2, 1)
                .unwrap()
                .broadcast_as(&[2, 3, 4, 5])
                .unwrap(),
            // seven dims that do not collapse: the per-run fallback
            x.reshape(&[2, 3, 4, 5, 1, 1, 1])
                .unwrap()
                .permute(&[3, 2, 1, 0, 4, 5, 6])
                .unwrap(),
        ]
    };
    let seven = Tensor::from_vec(
        (0..2 * 2 * 2 * 2 * 2 * 2 * 3).map(|i| i as f32).collect(),
        &[2, 2, 2, 2, 2, 2, 3],
        Device::Cpu,
    )
    .unwrap();
    let seven_view = seven.permute(&[6, 0, 5, 1, 4, 2, 3]).unwrap();
    for device in kernel_devices() {
        for dtype in [DType::F16, DType::F32, DType::F64, DType::U32] {
            let x = typed(dtype);
            let xd = x.to_device(device).unwrap();
            for (v, vd) in views(&x).iter().zip(views(&xd)) {
                let got = vd.contiguous().unwrap();
                assert!(got.is_contiguous() && got.device() == device);
                assert_eq!(
                    got.to_device(Device::Cpu).unwrap().to_vec_f64().unwrap(),
                    v.to_vec_f64().unwrap(),
                    "{dtype} view {:?} strides {:?} on {device}",
                    v.shape(),
                    v.strides()
                );
            }
            // scatter: a transposed source into a narrowed destination
            let src = x.narrow(3, 0, 2).unwrap().transpose(1, 2).unwrap();
            let want = Tensor::zeros(&[2, 4, 3, 4], dtype, Device::Cpu).unwrap();
            want.narrow(3, 1, 2).unwrap().copy_from(&src).unwrap();
            let dst = Tensor::zeros(&[2, 4, 3, 4], dtype, device).unwrap();
            let src_d = xd.narrow(3, 0, 2).unwrap().transpose(1, 2).unwrap();
            dst.narrow(3, 1, 2).unwrap().copy_from(&src_d).unwrap();
            assert_eq!(
                dst.to_device(Device::Cpu).unwrap().to_vec_f64().unwrap(),
                want.to_vec_f64().unwrap(),
                "{dtype} scatter on {device}"
            );
        }
        let got = seven_view.to_device(device).unwrap();
        assert_eq!(
            got.to_vec::<f32>().unwrap(),
            seven_view.to_vec::<f32>().unwrap()
        );
        let on = seven
            .to_device(device)
            .unwrap()
            .permute(&[6, 0, 5, 1, 4, 2, 3])
            .unwrap();
        assert_eq!(
            on.contiguous().unwrap().to_vec::<f32>().unwrap(),
            seven_view.to_vec::<f32>().unwrap(),
            "a rank-7 view on {device}"
        );
    }
}

/// Float casts on a device (copy.cu's `cast_<from>_<to>`, from a view too) give the host
/// conversion's bits: ties to even, subnormals, overflow to infinity, signed zeros; NaN stays
/// NaN.
#[test]
fn device_casts_give_the_host_conversions_bits() {
    let mut v: Vec<f64> = vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65520.0, // past f16's largest: infinity
        1e-7,    // an f16 subnormal
        1e-40,   // an f32 subnormal
        3.0e38,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        1.0 + 1.0 / 2048.0, // halfway between f16 neighbours: ties to even
        1.0 + 3.0 / 2048.0,
        1.0 + 1.0 / 256.0, // halfway between bf16 neighbours
        1.0 + 3.0 / 256.0,
        0.1,
        std::f64::consts::PI,
    ];
    v.extend((0..200).map(|i| ((i as f64) * 0.731).sin() * 10f64.powi(i % 9 - 4)));
    let n = v.len();
    let pairs = [
        (DType::F32, DType::F16),
        (DType::F32, DType::BF16),
        (DType::F16, DType::F32),
        (DType::BF16, DType::F32),
        (DType::F64, DType::F32),
        (DType::F32, DType::F64),
    ];
    let host = Tensor::from_vec(v, &[2, n / 2], Device::Cpu).unwrap();
    for device in kernel_devices() {
        for (from, to) in pairs {
            let x = host.to_dtype(from).unwrap();
            for (want_src, got_src) in [
                (x.clone(), x.to_device(device).unwrap()),
                (
                    x.narrow(1, 3, n / 2 - 3).unwrap(),
                    x.to_device(device)
                        .unwrap()
                        .narrow(1, 3, n / 2 - 3)
                        .unwrap(),
                ),
            ] {
                let want = want_src.to_dtype(to).unwrap().to_vec_f64().unwrap();
                let got_t = got_src.to_dtype(to).unwrap();
                assert_eq!((got_t.device(), got_t.dtype()), (device, to));
                let got = got_t.to_device(Device::Cpu).unwrap().to_vec_f64().unwrap();
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{from} -> {to} on {device}, element {i}: {g:e} vs the host's {w:e}"
                    );
                }
            }
        }
    }
}
