//! Device tests of the CUDA layer (feature `cuda`): copy round trips and the
//! caching allocator on the driver, cuBLAS GEMM against the CPU GEMM of kf-ops,
//! kf-kernels entry points launched through `CudaDevice::launch` against the
//! CPU ops, all on ragged shapes. Each needs a GPU and prints why it skipped
//! without one (`KF_REQUIRE_GPU=1` turns the skip into a failure). The no-GPU
//! paths run everywhere: no driver library, and a driver that sees no device
//! (a stand-in libcuda built with `cc`, loaded by a child process).
//! Letters: M, N, K of a GEMM, Z batches; n elements, R rows, D features.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use kf_engine::cuda::{check_driver, CudaBuffer, CudaDevice, GemmElem, GemmShape, KernelArg};
use kf_engine::{no_grad, DType, Device, Element, Tensor};
use kf_kernels::{elementwise, layernorm};
use kf_tests::harness::{compare, Gen, Tol};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// cuda:0, or None after printing why the test is skipped.
fn gpu() -> Option<Arc<CudaDevice>> {
    match CudaDevice::get(0) {
        Ok(d) => {
            println!("running on {d:?}");
            Some(d)
        }
        Err(e) if std::env::var("KF_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("KF_REQUIRE_GPU=1 but cuda:0 is not usable: {e:#}")
        }
        Err(e) => {
            println!("skipped: no usable GPU: {e:#}");
            None
        }
    }
}

fn rounded<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

fn to_f64<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

#[test]
fn copies_round_trip_and_blocks_are_reused() {
    let Some(dev) = gpu() else { return };
    let mut g = Gen::new(1);
    for n in [0usize, 1, 7, 255, 257, 4097, 100_003] {
        let v = g.vec(n, -1e3, 1e3);
        macro_rules! round_trip {
            ($t:ty) => {{
                let host: Vec<$t> = rounded(&v);
                let d = dev.htod(&host).unwrap();
                assert_eq!(d.len(), n);
                let back = dev.dtoh(&d).unwrap();
                assert!(
                    bytemuck::cast_slice::<$t, u8>(&back) == bytemuck::cast_slice::<$t, u8>(&host),
                    "{} round trip of {n}",
                    <$t>::DTYPE
                );
                let copy = dev.dtod(&d).unwrap();
                assert_eq!(dev.dtoh(&copy).unwrap(), back);
                let z = dev.zeros::<$t>(n).unwrap();
                assert!(dev.dtoh(&z).unwrap().iter().all(|x| x.to_f64() == 0.0));
            }};
        }
        round_trip!(f32);
        round_trip!(f16);
        round_trip!(bf16);
        round_trip!(u32);
        round_trip!(i32);
        round_trip!(f64);
    }
    // a dropped block comes back for a request of the same size class
    dev.synchronize().unwrap();
    let before = dev.alloc_stats();
    let a = dev.alloc::<f32>(4096).unwrap();
    let p = a.device_ptr();
    drop(a);
    let b = dev.alloc::<f32>(4000).unwrap(); // 16000 B: the 16 KiB class too
    let after = dev.alloc_stats();
    assert_eq!(b.device_ptr(), p);
    assert!(after.hits > before.hits);
    drop(b);
    dev.trim_cache().unwrap();
    let s = dev.alloc_stats();
    assert_eq!(s.reserved, s.in_use, "trim left cached blocks: {s:?}");
    // wrong lengths are errors, not copies
    let mut small = dev.alloc::<f32>(3).unwrap();
    assert!(dev.htod_into(&[1.0f32; 4], &mut small).is_err());
}

/// Host matrix [rows, cols] -> its transpose.
fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

fn cpu_matmul(
    a: &[f64],
    b: &[f64],
    z: usize,
    m: usize,
    n: usize,
    k: usize,
    shared_b: bool,
) -> Vec<f64> {
    let _g = no_grad();
    let ta = Tensor::from_vec(a.to_vec(), &[z, m, k], Device::Cpu).unwrap();
    let tb = if shared_b {
        Tensor::from_vec(b.to_vec(), &[k, n], Device::Cpu).unwrap()
    } else {
        Tensor::from_vec(b.to_vec(), &[z, k, n], Device::Cpu).unwrap()
    };
    kf_ops::matmul::matmul(&ta, &tb)
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

/// cuBLAS vs kf-ops' f64 GEMM on the same (storage-rounded) inputs. The
/// bound is rigorous, so it cannot fail for a correct GEMM: f32 accumulation
/// of K products errs by at most K u32 sum|a||b|, and the output is rounded to
/// storage once more (u of the storage type times |C|).
fn check_gemm<T: GemmElem>(dev: &Arc<CudaDevice>, s: GemmShape, seed: u64) {
    let mut g = Gen::new(seed);
    let nb = if s.shared_b { 1 } else { s.batch };
    let a_log: Vec<f64> = to_f64(&rounded::<T>(&g.vec(s.batch * s.m * s.k, -1.0, 1.0)));
    let b_log: Vec<f64> = to_f64(&rounded::<T>(&g.vec(nb * s.k * s.n, -1.0, 1.0)));
    // stored layouts: transposed per matrix where asked
    let store = |v: &[f64], z: usize, rows: usize, cols: usize, t: bool| -> Vec<T> {
        let per = rows * cols;
        let mut out = Vec::with_capacity(v.len());
        for i in 0..z {
            let m = &v[i * per..(i + 1) * per];
            out.extend(rounded::<T>(&if t {
                transpose(m, rows, cols)
            } else {
                m.to_vec()
            }));
        }
        out
    };
    let a = dev
        .htod(&store(&a_log, s.batch, s.m, s.k, s.trans_a))
        .unwrap();
    let b = dev.htod(&store(&b_log, nb, s.k, s.n, s.trans_b)).unwrap();
    let c0: Vec<f64> = g.vec(s.batch * s.m * s.n, -1.0, 1.0);
    let mut c: CudaBuffer<T> = dev.htod(&rounded::<T>(&c0)).unwrap();
    let (alpha, beta) = (1.5f32, -0.5f32);
    dev.gemm(s, alpha, &a, &b, beta, &mut c).unwrap();
    let got = to_f64(&dev.dtoh(&c).unwrap());
    let ab = cpu_matmul(&a_log, &b_log, s.batch, s.m, s.n, s.k, s.shared_b);
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let ab_abs = cpu_matmul(
        &abs(&a_log),
        &abs(&b_log),
        s.batch,
        s.m,
        s.n,
        s.k,
        s.shared_b,
    );
    let c0r = to_f64(&rounded::<T>(&c0));
    let u_out = match T::DTYPE {
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 1.0 / 2048.0,
        _ => 1.0 / 256.0,
    };
    let u32_ = f32::EPSILON as f64 / 2.0;
    for i in 0..got.len() {
        let want = alpha as f64 * ab[i] + beta as f64 * c0r[i];
        let bound =
            (s.k as f64 + 2.0) * u32_ * (alpha as f64 * ab_abs[i] + (beta as f64 * c0r[i]).abs())
                + u_out * want.abs()
                + 1e-30;
        assert!(
            (got[i] - want).abs() <= bound,
            "{} gemm {s:?} element {i}: got {}, want {want} (bound {bound})",
            T::DTYPE,
            got[i]
        );
    }
}

#[test]
fn gemm_matches_the_cpu_gemm() {
    let Some(dev) = gpu() else { return };
    let mut seed = 0;
    // ragged sizes, head dims 64/128, and the vocabulary projections
    let shapes = [
        (1, 1, 1),
        (37, 129, 65),
        (64, 64, 64),
        (5, 30522, 64),
        (3, 50257, 128),
    ];
    for &(m, n, k) in &shapes {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            if n > 1000 && (ta || !tb) {
                continue; // the big ones as in the model: x [M, K] · Wᵀ, W [V, K]
            }
            let s = GemmShape {
                trans_a: ta,
                trans_b: tb,
                ..GemmShape::new(m, n, k)
            };
            seed += 1;
            check_gemm::<f32>(&dev, s, seed);
            check_gemm::<f16>(&dev, s, seed);
            check_gemm::<bf16>(&dev, s, seed);
        }
    }
    for shared_b in [false, true] {
        let s = GemmShape {
            batch: 3,
            shared_b,
            trans_b: shared_b,
            ..GemmShape::new(17, 33, 129)
        };
        check_gemm::<f32>(&dev, s, 100);
        check_gemm::<bf16>(&dev, s, 101);
    }
    // a length that does not fit the shape is an error before cuBLAS
    let a = dev.zeros::<f32>(6).unwrap();
    let b = dev.zeros::<f32>(6).unwrap();
    let mut c = dev.zeros::<f32>(5).unwrap();
    let e = dev
        .gemm(GemmShape::new(2, 2, 3), 1.0, &a, &b, 0.0, &mut c)
        .unwrap_err();
    assert!(e.to_string().contains("C holds 5"), "{e}");
}

/// Storage types of the elementwise kernels.
trait Store: Element {
    const SUFFIX: &'static str;
    /// Kernel vs the f32 CPU op rounded to storage: as kernels/emu/tests/parity.rs.
    const TOL: Tol;
}
impl Store for f32 {
    const SUFFIX: &'static str = "f32";
    // device expf and the CPU's differ by a few ulps (gelu); sums are exact
    const TOL: Tol = Tol::F32;
}
impl Store for f16 {
    const SUFFIX: &'static str = "f16";
    // one rounding of a few-ulp f32 difference can flip: 1 ulp of f16
    const TOL: Tol = Tol::new(1e-3, 1.0 / 1024.0);
}
impl Store for bf16 {
    const SUFFIX: &'static str = "bf16";
    // likewise, 1 ulp of bf16
    const TOL: Tol = Tol::new(1e-2, 1.0 / 128.0);
}

fn cpu_f32(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(
        v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        shape,
        Device::Cpu,
    )
    .unwrap()
}

fn cpu_out<T: Store>(t: Tensor) -> Vec<f64> {
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| T::from_f64(v as f64).to_f64())
        .collect()
}

fn elementwise_for<T: Store>(dev: &Arc<CudaDevice>) {
    let _g = no_grad();
    let sfx = T::SUFFIX;
    for n in [1usize, 33, 255, 257, 4097, 300_001] {
        let mut g = Gen::new(n as u64);
        let x = to_f64(&rounded::<T>(&g.vec(n, -6.0, 6.0)));
        let y = to_f64(&rounded::<T>(&g.vec(n, -2.0, 2.0)));
        let (xd, yd) = (
            dev.htod(&rounded::<T>(&x)).unwrap(),
            dev.htod(&rounded::<T>(&y)).unwrap(),
        );
        let out = dev.alloc::<T>(n).unwrap();
        let cfg = elementwise::config(n);
        let run = |entry: &str, args: &[KernelArg]| {
            // SAFETY: every pointer is a live buffer of n elements (bias: cols)
            // of this device, and each kernel touches indices < n only.
            unsafe { dev.launch("elementwise", &format!("{entry}_{sfx}"), cfg, args) }.unwrap();
            to_f64(&dev.dtoh(&out).unwrap())
        };
        let (p, q, o) = (
            KernelArg::buf(&xd),
            KernelArg::buf(&yd),
            KernelArg::buf(&out),
        );
        let (tx, ty) = (cpu_f32(&x, &[n]), cpu_f32(&y, &[n]));
        let got = run("add", &[p, q, o, KernelArg::size(n)]);
        let want = cpu_out::<T>(kf_ops::elementwise::add(&tx, &ty).unwrap());
        compare(&format!("add_{sfx} n={n}"), &got, &want, T::TOL).unwrap();
        let got = run("mul", &[p, q, o, KernelArg::size(n)]);
        let want = cpu_out::<T>(kf_ops::elementwise::mul(&tx, &ty).unwrap());
        compare(&format!("mul_{sfx} n={n}"), &got, &want, T::TOL).unwrap();
        let got = run("scale", &[p, o, KernelArg::F32(-0.75), KernelArg::size(n)]);
        let want = cpu_out::<T>(kf_ops::elementwise::scale(&tx, -0.75).unwrap());
        compare(&format!("scale_{sfx} n={n}"), &got, &want, T::TOL).unwrap();
        let got = run("gelu_tanh", &[p, o, KernelArg::size(n)]);
        let want = cpu_out::<T>(kf_ops::gelu::gelu_tanh(&tx).unwrap());
        compare(&format!("gelu_tanh_{sfx} n={n}"), &got, &want, T::TOL).unwrap();
    }
    // bias_add over rows of the vocabulary sizes
    for (rows, cols) in [(3usize, 30522usize), (2, 50257), (5, 7)] {
        let n = rows * cols;
        let mut g = Gen::new(cols as u64);
        let x = to_f64(&rounded::<T>(&g.vec(n, -3.0, 3.0)));
        let b = to_f64(&rounded::<T>(&g.vec(cols, -3.0, 3.0)));
        let (xd, bd) = (
            dev.htod(&rounded::<T>(&x)).unwrap(),
            dev.htod(&rounded::<T>(&b)).unwrap(),
        );
        let out = dev.alloc::<T>(n).unwrap();
        let args = [
            KernelArg::buf(&xd),
            KernelArg::buf(&bd),
            KernelArg::buf(&out),
            KernelArg::size(n),
            KernelArg::size(cols),
        ];
        // SAFETY: x and out hold n elements, b holds cols; bias_add reads b[i % cols].
        unsafe {
            dev.launch(
                "elementwise",
                &format!("bias_add_{sfx}"),
                elementwise::config(n),
                &args,
            )
        }
        .unwrap();
        let want = cpu_out::<T>(
            kf_ops::elementwise::bias_add(&cpu_f32(&x, &[rows, cols]), &cpu_f32(&b, &[cols]))
                .unwrap(),
        );
        compare(
            &format!("bias_add_{sfx} {rows}x{cols}"),
            &to_f64(&dev.dtoh(&out).unwrap()),
            &want,
            T::TOL,
        )
        .unwrap();
    }
}

#[test]
fn elementwise_kernels_match_the_cpu_ops() {
    let Some(dev) = gpu() else { return };
    elementwise_for::<f32>(&dev);
    elementwise_for::<f16>(&dev);
    elementwise_for::<bf16>(&dev);
    // a wrong argument list is refused before the launch
    let x = dev.zeros::<f32>(4).unwrap();
    // SAFETY: refused by the argument check, nothing is launched.
    let e = unsafe {
        dev.launch(
            "elementwise",
            "scale_f32",
            elementwise::config(4),
            &[KernelArg::buf(&x), KernelArg::buf(&x), KernelArg::size(4)],
        )
    }
    .unwrap_err();
    assert!(e.to_string().contains("takes 4 arguments"), "{e}");
    // SAFETY: refused by the lookup, nothing is launched.
    let e =
        unsafe { dev.launch("elementwise", "add_f64", elementwise::config(4), &[]) }.unwrap_err();
    assert!(e.to_string().contains("has no entry add_f64"), "{e}");
}

#[test]
fn layernorm_forward_matches_the_cpu_op() {
    let Some(dev) = gpu() else { return };
    let _g = no_grad();
    for (rows, d) in [(3usize, 64usize), (2, 128), (5, 769), (2, 50257)] {
        let mut g = Gen::new(d as u64);
        let x = to_f64(&rounded::<f32>(&g.vec(rows * d, -2.0, 4.0)));
        let w = g.vec(d, 0.5, 1.5);
        let b = g.vec(d, -0.5, 0.5);
        let (xd, wd, bd) = (
            dev.htod(&rounded::<f32>(&x)).unwrap(),
            dev.htod(&rounded::<f32>(&w)).unwrap(),
            dev.htod(&rounded::<f32>(&b)).unwrap(),
        );
        let out = dev.alloc::<f32>(rows * d).unwrap();
        let (mean, rstd) = (
            dev.alloc::<f32>(rows).unwrap(),
            dev.alloc::<f32>(rows).unwrap(),
        );
        let (cfg, cached) = layernorm::config(rows, d);
        let args = [
            KernelArg::buf(&xd),
            KernelArg::buf(&wd),
            KernelArg::buf(&bd),
            KernelArg::buf(&out),
            KernelArg::buf(&mean),
            KernelArg::buf(&rstd),
            KernelArg::U32(rows as u32),
            KernelArg::U32(d as u32),
            KernelArg::F32(1e-5),
            KernelArg::I32(cached as i32),
            KernelArg::I32(0),
        ];
        // SAFETY: x/out hold rows*d, w/b hold d, mean/rstd hold rows elements.
        unsafe { dev.launch("layernorm", "layernorm_fwd_f32", cfg, &args) }.unwrap();
        let want = kf_ops::layernorm::layer_norm(
            &cpu_f32(&x, &[rows, d]),
            &cpu_f32(&w, &[d]),
            Some(&cpu_f32(&b, &[d])),
            1e-5,
        )
        .unwrap()
        .to_vec_f64()
        .unwrap();
        compare(
            &format!("layernorm_fwd_f32 {rows}x{d}"),
            &to_f64(&dev.dtoh(&out).unwrap()),
            &want,
            Tol::F32,
        )
        .unwrap();
    }
}

#[test]
fn a_missing_driver_is_one_sentence() {
    if check_driver().is_ok() {
        println!("skipped: a CUDA driver library is installed here");
        return;
    }
    let e = format!("{:#}", CudaDevice::get(0).unwrap_err());
    assert!(e.contains("CUDA driver library was not found"), "{e}");
    assert!(e.contains("--device cpu"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    assert!(CudaDevice::count().is_err());
    assert!(Device::Cuda(0).ensure_available().is_err());
}

/// C source of a stand-in libcuda: every entry point the device layer uses,
/// all answering CUDA_ERROR_NO_DEVICE (100), as a driver on a machine whose
/// GPU is gone does.
pub fn fake_driver_source() -> String {
    let mut c = String::from(
        "int cuGetErrorName(int e, const char **s) { *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }\n\
         int cuGetErrorString(int e, const char **s) { *s = \"no CUDA-capable device is detected\"; return 0; }\n",
    );
    for s in kf_engine::cuda::DRIVER_SYMBOLS {
        if !s.starts_with("cuGetError") {
            c += &format!("int {s}(void) {{ return 100; }}\n");
        }
    }
    c
}

/// Build the stand-in as `dir/libcuda.so` (and `.so.1`); false without `cc`.
fn build_fake_driver(dir: &Path) -> bool {
    let src = dir.join("fake_cuda.c");
    std::fs::write(&src, fake_driver_source()).unwrap();
    let lib = dir.join("libcuda.so");
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    ok && std::fs::copy(&lib, dir.join("libcuda.so.1")).is_ok()
}

#[test]
fn a_driver_without_devices_is_one_sentence() {
    let dir = std::env::temp_dir().join(format!("kf-fake-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if !build_fake_driver(&dir) {
        println!("skipped: no C compiler (cc) to build the stand-in libcuda");
        return;
    }
    // the loader reads LD_LIBRARY_PATH at process start: ask a child
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fake_driver_child", "--ignored", "--nocapture"])
        .env("LD_LIBRARY_PATH", &dir)
        .env("KF_FAKE_DRIVER_CHILD", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// Runs in the child of `a_driver_without_devices_is_one_sentence` only.
#[test]
#[ignore = "run by a_driver_without_devices_is_one_sentence with a stand-in libcuda"]
fn fake_driver_child() {
    assert_eq!(
        std::env::var("KF_FAKE_DRIVER_CHILD").as_deref(),
        Ok("1"),
        "run only with the stand-in libcuda on LD_LIBRARY_PATH"
    );
    let name = check_driver().unwrap();
    assert!(name.starts_with("libcuda.so"), "{name}");
    let e = format!("{:#}", CudaDevice::get(0).unwrap_err());
    assert_eq!(
        e,
        "no CUDA device: the driver is installed but sees no GPU \
         (CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected))"
    );
    assert!(CudaDevice::count().is_err());
    // a second request gives the same answer (nothing half-opened is cached)
    assert!(CudaDevice::get(0).is_err());
}
