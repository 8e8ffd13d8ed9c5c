//! The NCCL backend's setup on whatever machine runs the tests (`--features nccl`): without a
//! GPU or without libnccl, `NcclCollective::init` must be one clear error naming what is
//! missing (not a panic, not a hang); with a GPU and libnccl, a one-rank world must start and
//! sum in the fixed order. The multi-rank chain needs `mpirun -n 2` on two GPUs and is not run
//! here (the printed line says so).
//!
//! MPI can be initialised once per process, so this is one test.

#![cfg(feature = "nccl")]

use kf_engine::cuda::CudaDevice;
use kf_engine::dist::nccl::{check_library, NcclCollective};
use kf_engine::dist::{add_into, Collective, Timeout};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

#[test]
fn init_names_what_is_missing_or_sums_in_order_on_one_gpu() {
    let gpus = CudaDevice::count();
    let lib = check_library();
    let found = format!(
        "found {} and {}",
        match &gpus {
            Ok(n) => format!("{n} GPU(s)"),
            Err(e) => format!("no usable GPU ({e:#})"),
        },
        match &lib {
            Ok(name) => format!("libnccl ({name})"),
            Err(e) => format!("no libnccl ({e:#})"),
        }
    );
    let timeout = Timeout(Duration::from_secs(60));
    let t0 = Instant::now();
    let got = catch_unwind(AssertUnwindSafe(|| NcclCollective::init(timeout)));
    let got = match got {
        Ok(r) => r,
        Err(_) => panic!("NcclCollective::init panicked ({found})"),
    };

    match (&gpus, &lib) {
        (Ok(n), Ok(_)) if *n >= 1 => {
            let mut c = got
                .unwrap_or_else(|e| panic!("init failed with a GPU and libnccl ({found}): {e:#}"));
            assert_eq!(c.backend(), "nccl");
            if c.size() != 1 {
                println!(
                    "skipped: started as one of {} ranks; this test runs alone",
                    c.size()
                );
                return;
            }
            // one rank: the sum is the sequential one, bit for bit (values whose f32 sum
            // depends on the order), and the MPI-delegated calls work
            let parts: Vec<Vec<f32>> = (0..3)
                .map(|i| {
                    (0..1000)
                        .map(|j| ((i * 1000 + j) as f32 * 0.731).sin() * 10f32.powi(i * 3))
                        .collect()
                })
                .collect();
            let mut seq = parts[0].clone();
            parts[1..].iter().for_each(|p| add_into(&mut seq, p));
            let views: Vec<&[f32]> = parts.iter().map(|p| &p[..]).collect();
            let mut out = vec![0f32; 1000];
            c.sum_ordered(&views, &mut out).unwrap();
            assert_eq!(
                out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                seq.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(c.all_gather(b"x").unwrap(), vec![b"x".to_vec()]);
            c.barrier().unwrap();
            if *n < 2 {
                println!("note: the two-rank NCCL chain needs 2 GPUs and mpirun -n 2; {found}");
            }
        }
        _ => {
            let e = match got {
                Ok(_) => panic!("NcclCollective::init succeeded, but {found}"),
                Err(e) => format!("{e:#}"),
            };
            println!("init refused as expected: {e}");
            // "rank 0: ..." alone, "ranks 0, 1: ..." under mpirun -n 2 on a machine like this
            assert!(
                e.starts_with("the NCCL backend could not start (this is rank "),
                "{e}"
            );
            assert!(
                e.contains("): rank 0: ") || e.contains("): ranks 0, "),
                "{e}"
            );
            // the sentence names every missing piece
            match &gpus {
                Err(g) => {
                    let g = format!("{g:#}");
                    // the driver's sentence (the count's error also covers "no device")
                    let head = g.split(';').next().unwrap_or(&g);
                    assert!(e.contains(head), "{e}\nshould contain: {head}");
                }
                Ok(0) => assert!(e.contains("no CUDA device"), "{e}"),
                Ok(_) => {}
            }
            if lib.is_err() {
                assert!(e.contains("the NCCL library"), "{e}");
                assert!(e.contains("libnccl.so"), "{e}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "init took {:?}",
                t0.elapsed()
            );
        }
    }
}
