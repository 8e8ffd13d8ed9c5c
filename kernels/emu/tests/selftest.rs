//! Self-tests of the CPU emulator on kernels/emu/selftest.cu: a shuffle-based
//! block reduction and a tiled shared-memory transpose give the right answers,
//! warp votes / atomics / dynamic shared memory / cp.async groups behave as on a GPU, and
//! the planted faults (race, out-of-bounds write, divergent barrier, a read before
//! cp.async.wait_group, ...) are
//! reported with kernel, block and thread instead of passing or hanging.

use kf_kernels_emu::{kernels, launch, Arg, DeviceBuffer, EmuError, LaunchConfig};

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: smem,
    }
}

/// Deterministic values in [-1, 1) (SplitMix64).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn launch_err(kernel: &str, c: LaunchConfig, args: &[Arg]) -> String {
    match launch(kernel, c, args) {
        Ok(()) => panic!("{kernel}: the planted fault was not reported"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_kernel_family_is_emulated() {
    let ks = kernels();
    for f in kf_kernels::FAMILIES {
        for e in f.entries {
            assert!(
                ks.iter().any(|(fam, k)| fam == &f.name && k == e),
                "{e} of {} is not in the emulator",
                f.name
            );
        }
    }
    assert!(ks.iter().any(|(_, k)| *k == "selftest_block_sum"));
}

#[test]
fn block_reduction_by_shuffles() {
    for &(n, block, grid) in &[
        (1usize, 32u32, 1u32),
        (31, 32, 1),
        (1000, 96, 3),
        (4097, 256, 5),
        (70_000, 1024, 2),
    ] {
        let x = data(n, n as u64);
        let xb = DeviceBuffer::from_slice(&x);
        let out = DeviceBuffer::uninit(4 * grid as usize);
        launch(
            "selftest_block_sum",
            cfg((grid, 1, 1), (block, 1, 1), 0),
            &[Arg::Buf(&xb), Arg::Buf(&out), Arg::U32(n as u32)],
        )
        .unwrap();
        let got = out.to_vec::<f32>();
        let stride = (block * grid) as usize;
        for (b, &g) in got.iter().enumerate() {
            let want: f64 = (0..n)
                .filter(|i| i % stride / block as usize == b)
                .map(|i| x[i] as f64)
                .sum();
            assert!(
                (g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n={n} block={block} grid={grid}: block {b} sum {g}, want {want}"
            );
        }
    }
}

#[test]
fn tiled_transpose() {
    for &(rows, cols) in &[(1usize, 1usize), (7, 33), (32, 32), (65, 100), (100, 3)] {
        let x = data(rows * cols, (rows * 1000 + cols) as u64);
        let xb = DeviceBuffer::from_slice(&x);
        let out = DeviceBuffer::uninit(4 * rows * cols);
        let grid = (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1);
        launch(
            "selftest_transpose",
            cfg(grid, (32, 8, 1), 0),
            &[
                Arg::Buf(&xb),
                Arg::Buf(&out),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
            ],
        )
        .unwrap();
        let got = out.to_vec::<f32>();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(
                    got[c * rows + r],
                    x[r * cols + c],
                    "{rows}x{cols} at ({r},{c})"
                );
            }
        }
    }
}

#[test]
fn warp_votes_scans_and_barrier_count() {
    let t = 96usize;
    let pred: Vec<i32> = (0..t as i32).map(|i| (i * 7 % 5 < 2) as i32).collect();
    let pb = DeviceBuffer::from_slice(&pred);
    let out = DeviceBuffer::uninit(4 * 4 * t);
    let out2 = DeviceBuffer::uninit(4 * 2 * t);
    launch(
        "selftest_warp_votes",
        cfg((1, 1, 1), (t as u32, 1, 1), 0),
        &[Arg::Buf(&pb), Arg::Buf(&out), Arg::Buf(&out2)],
    )
    .unwrap();
    let (o, o2) = (out.to_vec::<u32>(), out2.to_vec::<u32>());
    let count = pred.iter().filter(|&&p| p != 0).count() as u32;
    for i in 0..t {
        let w = i / 32 * 32;
        let warp = &pred[w..w + 32];
        let ballot = warp
            .iter()
            .enumerate()
            .fold(0u32, |m, (l, &p)| m | ((p as u32) << l));
        let scan: u32 = warp[..=i - w].iter().map(|&p| p as u32).sum();
        assert_eq!(o[4 * i], ballot, "ballot, thread {i}");
        assert_eq!(o[4 * i + 1], (ballot != 0) as u32, "any, thread {i}");
        assert_eq!(o[4 * i + 2], (ballot == u32::MAX) as u32, "all, thread {i}");
        assert_eq!(o[4 * i + 3], scan, "shfl_up scan, thread {i}");
        assert_eq!(
            o2[2 * i],
            pred[w] as u32 * 1000 + w as u32,
            "shfl from lane 0, thread {i}"
        );
        assert_eq!(o2[2 * i + 1], count, "__syncthreads_count, thread {i}");
    }
}

#[test]
fn atomics() {
    let n = 1000;
    let x = data(n, 9);
    let xb = DeviceBuffer::from_slice(&x);
    let sum = DeviceBuffer::zeros::<f32>(1);
    let maxv = DeviceBuffer::from_slice(&[i32::MIN]);
    let count = DeviceBuffer::zeros::<u32>(1);
    let cas = DeviceBuffer::zeros::<u32>(1);
    launch(
        "selftest_atomics",
        cfg((3, 1, 1), (64, 1, 1), 0),
        &[
            Arg::Buf(&xb),
            Arg::Buf(&sum),
            Arg::Buf(&maxv),
            Arg::Buf(&count),
            Arg::Buf(&cas),
            Arg::U32(n as u32),
        ],
    )
    .unwrap();
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    assert!((sum.to_vec::<f32>()[0] as f64 - want).abs() < 1e-3);
    let wmax = x.iter().map(|&v| (v * 1000.0) as i32).max().unwrap();
    assert_eq!(maxv.to_vec::<i32>()[0], wmax);
    assert_eq!(count.to_vec::<u32>()[0], n as u32);
    assert_eq!(cas.to_vec::<u32>()[0], n as u32);
}

#[test]
fn dynamic_shared_memory() {
    let (n, t) = (1000usize, 128u32);
    let x = data(n, 3);
    let xb = DeviceBuffer::from_slice(&x);
    let out = DeviceBuffer::uninit(4 * n);
    let blocks = n.div_ceil(t as usize) as u32;
    launch(
        "selftest_dyn_reverse",
        cfg((blocks, 1, 1), (t, 1, 1), 4 * t),
        &[Arg::Buf(&xb), Arg::Buf(&out), Arg::U32(n as u32)],
    )
    .unwrap();
    let got = out.to_vec::<f32>();
    for (j, &g) in got.iter().enumerate() {
        let (b, tj) = (j / t as usize, j % t as usize);
        let i = b * t as usize + (t as usize - 1 - tj);
        let want = if i < n { x[i] } else { 0.0 };
        assert_eq!(g, want, "element {j}");
    }
}

#[test]
fn planted_race_is_reported() {
    let out = DeviceBuffer::uninit(4 * 64);
    let e = launch_err(
        "fault_race",
        cfg((1, 1, 1), (64, 1, 1), 0),
        &[Arg::Buf(&out)],
    );
    eprintln!("{e}");
    assert!(e.contains("shared-memory race"), "{e}");
    assert!(
        e.contains("kernel fault_race, block (0,0,0), thread ("),
        "{e}"
    );
}

#[test]
fn planted_out_of_bounds_write_is_reported() {
    let n = 100u32;
    let out = DeviceBuffer::uninit(4 * n as usize);
    let e = launch_err(
        "fault_oob_write",
        cfg((2, 1, 1), (64, 1, 1), 0),
        &[Arg::Buf(&out), Arg::U32(n)],
    );
    eprintln!("{e}");
    assert!(
        e.contains("out-of-bounds write of 4 bytes at byte offset 400"),
        "{e}"
    );
    assert!(e.contains("block (1,0,0), thread (36,0,0)"), "{e}");
}

#[test]
fn planted_divergent_barrier_is_reported() {
    let out = DeviceBuffer::uninit(4 * 64);
    let e = launch_err(
        "fault_divergent_barrier",
        cfg((1, 1, 1), (64, 1, 1), 0),
        &[Arg::Buf(&out)],
    );
    eprintln!("{e}");
    assert!(
        e.contains("divergent __syncthreads(): 32 of 64 threads"),
        "{e}"
    );
    assert!(e.contains("thread (32,0,0) has exited"), "{e}");
}

#[test]
fn divergent_shuffle_and_smem_overrun_are_reported() {
    let out = DeviceBuffer::uninit(4 * 64);
    let e = launch_err(
        "fault_divergent_shuffle",
        cfg((1, 1, 1), (64, 1, 1), 0),
        &[Arg::Buf(&out)],
    );
    eprintln!("{e}");
    assert!(e.contains("divergent warp collective"), "{e}");
    let e = launch_err(
        "fault_dyn_smem_overrun",
        cfg((1, 1, 1), (64, 1, 1), 4 * 64),
        &[Arg::Buf(&out)],
    );
    eprintln!("{e}");
    assert!(e.contains("beyond the 256 bytes given at launch"), "{e}");
}

#[test]
fn bad_launches_are_errors() {
    let out = DeviceBuffer::uninit(4);
    let e = launch(
        "fault_race",
        cfg((1, 1, 1), (2048, 1, 1), 0),
        &[Arg::Buf(&out)],
    )
    .unwrap_err();
    assert!(e.to_string().contains("invalid block"), "{e}");
    let e = launch("fault_race", cfg((1, 1, 1), (32, 1, 1), 0), &[]).unwrap_err();
    assert!(matches!(e, EmuError::ArgCount { .. }), "{e}");
    let e = launch("no_such_kernel", cfg((1, 1, 1), (32, 1, 1), 0), &[]).unwrap_err();
    assert!(matches!(e, EmuError::UnknownKernel(_)), "{e}");
    // a failed launch leaves the emulator usable
    launch(
        "fault_oob_write",
        cfg((1, 1, 1), (32, 1, 1), 0),
        &[Arg::Buf(&out), Arg::U32(0)],
    )
    .unwrap();
}

#[test]
fn cp_async_lands_at_its_wait_and_a_missing_wait_is_reported() {
    let t = 128usize;
    let x = data(2 * t, 77);
    let xb = DeviceBuffer::from_slice(&x);
    let out = DeviceBuffer::uninit(4 * t);
    launch(
        "selftest_cp_async",
        cfg((1, 1, 1), (t as u32, 1, 1), 0),
        &[Arg::Buf(&xb), Arg::Buf(&out), Arg::I32(1)],
    )
    .unwrap();
    let got = out.to_vec::<f32>();
    for i in 0..t {
        assert_eq!(got[i], 2.0 * x[t - 1 - i], "element {i}");
    }
    // the planted fault: the barrier and the reads without cp.async.wait_group
    let e = launch_err(
        "selftest_cp_async",
        cfg((1, 1, 1), (t as u32, 1, 1), 0),
        &[Arg::Buf(&xb), Arg::Buf(&out), Arg::I32(0)],
    );
    eprintln!("{e}");
    assert!(
        e.contains("read of shared memory that a cp.async of thread")
            && e.contains("missing cp.async.wait_group"),
        "{e}"
    );
    assert!(e.contains("kernel selftest_cp_async, block (0,0,0)"), "{e}");
}

#[test]
fn cp_async_wait_group_keeps_the_newer_groups_in_flight() {
    let t = 64usize;
    let x = data(2 * t, 78);
    let xb = DeviceBuffer::from_slice(&x);
    let out = DeviceBuffer::uninit(4 * 2 * t);
    launch(
        "selftest_cp_async_groups",
        cfg((1, 1, 1), (t as u32, 1, 1), 0),
        &[Arg::Buf(&xb), Arg::Buf(&out), Arg::I32(1)],
    )
    .unwrap();
    assert_eq!(out.to_vec::<f32>(), x);
    // wait_group 1 lands the first group only: reading the second is the fault
    let e = launch_err(
        "selftest_cp_async_groups",
        cfg((1, 1, 1), (t as u32, 1, 1), 0),
        &[Arg::Buf(&xb), Arg::Buf(&out), Arg::I32(0)],
    );
    assert!(e.contains("missing cp.async.wait_group"), "{e}");
}

/// bf16 bits of `x` (round to nearest even) and back.
fn bf16(x: f32) -> u16 {
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}
fn f32_of(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[test]
fn mma_m16n8k16_bf16_computes_a_b_plus_c_from_fragments_and_from_ldmatrix() {
    let a: Vec<u16> = data(256, 91).iter().map(|&x| bf16(x)).collect();
    let b: Vec<u16> = data(128, 92).iter().map(|&x| bf16(x)).collect();
    let c = data(128, 93);
    let want: Vec<f64> = (0..128)
        .map(|i| {
            let (row, col) = (i / 8, i % 8);
            c[i] as f64
                + (0..16)
                    .map(|k| f32_of(a[row * 16 + k]) as f64 * f32_of(b[k * 8 + col]) as f64)
                    .sum::<f64>()
        })
        .collect();
    let (ab, bb, cb) = (
        DeviceBuffer::from_slice(&a),
        DeviceBuffer::from_slice(&b),
        DeviceBuffer::from_slice(&c),
    );
    for kernel in ["selftest_mma_bf16", "selftest_mma_ldmatrix"] {
        let d = DeviceBuffer::uninit(4 * 128);
        launch(
            kernel,
            cfg((1, 1, 1), (32, 1, 1), 0),
            &[Arg::Buf(&ab), Arg::Buf(&bb), Arg::Buf(&cb), Arg::Buf(&d)],
        )
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
        let got = d.to_vec::<f32>();
        for i in 0..128 {
            // bf16 products are exact in f32; 16 f32 additions round
            assert!(
                (got[i] as f64 - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()),
                "{kernel}: D[{}][{}] = {}, want {}",
                i / 8,
                i % 8,
                got[i],
                want[i]
            );
        }
    }
    // a warp with lanes missing cannot run mma.sync
    let d = DeviceBuffer::uninit(4 * 128);
    let e = launch_err(
        "selftest_mma_bf16",
        cfg((1, 1, 1), (16, 1, 1), 0),
        &[Arg::Buf(&ab), Arg::Buf(&bb), Arg::Buf(&cb), Arg::Buf(&d)],
    );
    assert!(e.contains("mma.sync needs all 32 lanes"), "{e}");
}
