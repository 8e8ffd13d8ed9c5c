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
