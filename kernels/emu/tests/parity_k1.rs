//! Emulated-kernel parity for the embedding, rope, gelu, softmax, layernorm
//! backward, noise and adamw kernels (kernels/*.cu), run by the CPU emulator
//! with the launch shapes of kf-kernels, against the CPU ops of kf-ops on
//! ragged shapes (sizes off the block/tile, head dims 64 and 128, V = 30522
//! and 50257), with the parity harness's comparison. f16/bf16 storage kernels
//! get the f32 CPU op's inputs rounded to storage and are compared with its
//! output rounded once; where a backward reads a saved forward output (softmax
//! y) or statistics, the f16/bf16 reference is the op's formula in f64 on the
//! kernel's own (rounded) inputs. Letters: n elements, N positions, R rows,
//! V vocabulary / softmax width, D features, B batch, T time, H heads.

use kf_engine::{no_grad, DType, Device, Tensor};
use kf_kernels::{adamw, embedding, gelu, noise, rope, softmax};
use kf_kernels_emu::{launch, Arg, DeviceBuffer};
use kf_tests::harness::{compare, Gen, Tol};

// ------------------------------------------------------------ helpers (as in parity.rs)

mod common;
use common::{cpu_out, f32s, inputs, tensor, St, ALL};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The gradient of `wrt` when `out` is seeded with `g`.
fn grad_of(out: &Tensor, g: &[f32], wrt: &Tensor) -> Tensor {
    let seed = tensor(g, out.shape());
    out.backward_with(seed)
        .unwrap()
        .get(wrt)
        .expect("a gradient")
        .clone()
}

/// One ulp of f32 at 1: the bound of a double result rounded to f32 on two
/// machines whose double sin / cos / pow differ by an ulp or two (|v| <= 1).
const ONE_F32_ULP: Tol = Tol::new(1.2e-7, 0.0);

// ------------------------------------------------------------ embedding

/// (V, D, N): tiny, D = 1, D odd and off the block, and the two vocabularies
/// with head-dim-like widths.
const EMB_SHAPES: &[(usize, usize, usize)] = &[
    (7, 1, 5),
    (100, 33, 300),
    (9, 257, 41),
    (30522, 64, 37),
    (50257, 128, 19),
];

/// N ids below `v` with repeats (a few frequent ids), 0 and V - 1 included.
fn ids_for(v: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut g = Gen::new(seed);
    let hot: Vec<u32> = (0..3).map(|_| g.below(v as u64) as u32).collect();
    (0..n)
        .map(|p| match p {
            0 => 0,
            1 => v as u32 - 1,
            _ if p % 3 == 0 => hot[p % hot.len()],
            _ => g.below(v as u64) as u32,
        })
        .collect()
}

#[test]
fn embedding_forward_matches_the_cpu_op() {
    let _g = no_grad();
    for st in ALL {
        for &(v, d, n) in EMB_SHAPES {
            let table = inputs(v * d, (v + d) as u64, st, -1.0, 1.0);
            let ids = ids_for(v, n, n as u64);
            let (tb, ib, out) = (
                st.upload(&table),
                DeviceBuffer::from_slice(&ids),
                st.alloc(n * d),
            );
            let kernel = format!("embedding_fwd_{}", st.suffix());
            launch(
                &kernel,
                embedding::fwd_config(n),
                &[
                    Arg::Buf(&ib),
                    Arg::Buf(&tb),
                    Arg::Buf(&out),
                    Arg::U64(n as u64),
                    Arg::U32(d as u32),
                    Arg::U32(v as u32),
                ],
            )
            .unwrap();
            let idt = Tensor::from_vec(ids.clone(), &[n], Device::Cpu).unwrap();
            let cpu = kf_ops::embedding::embedding(&idt, &tensor(&table, &[v, d])).unwrap();
            // a gather copies: exact
            compare(
                &format!("{kernel} V={v} D={d} N={n}"),
                &st.download(&out),
                &cpu_out(&cpu, st),
                Tol::EXACT,
            )
            .unwrap();
        }
    }
}

#[test]
fn embedding_forward_out_of_range_id_gives_a_nan_row_and_no_stray_access() {
    let (v, d) = (5, 9);
    let table = inputs(v * d, 1, St::F32, -1.0, 1.0);
    let ids = [2u32, 5, u32::MAX, 4];
    let (tb, ib, out) = (
        DeviceBuffer::from_slice(&table),
        DeviceBuffer::from_slice(&ids),
        DeviceBuffer::uninit(4 * ids.len() * d),
    );
    launch(
        "embedding_fwd_f32",
        embedding::fwd_config(ids.len()),
        &[
            Arg::Buf(&ib),
            Arg::Buf(&tb),
            Arg::Buf(&out),
            Arg::U64(ids.len() as u64),
            Arg::U32(d as u32),
            Arg::U32(v as u32),
        ],
    )
    .unwrap();
    let o = out.to_vec::<f32>();
    assert_eq!(&o[..d], &table[2 * d..3 * d]);
    assert!(o[d..3 * d].iter().all(|x| x.is_nan()), "rows of ids >= V");
    assert_eq!(&o[3 * d..], &table[4 * d..5 * d]);
}

/// `embedding_bwd` with the given number of buckets (grid), into a fresh
/// (NaN-filled) dtable: every element must be written.
fn emb_bwd(st: St, ids: &[u32], g: &[f32], v: usize, d: usize, buckets: Option<u32>) -> Vec<f32> {
    let n = ids.len();
    let (ib, gb, dt) = (
        DeviceBuffer::from_slice(ids),
        st.upload(g),
        DeviceBuffer::uninit(4 * v * d),
    );
    let mut cfg = embedding::bwd_config(d, v);
    if let Some(b) = buckets {
        cfg.grid_dim.0 = b;
    }
    launch(
        &format!("embedding_bwd_{}", st.suffix()),
        cfg,
        &[
            Arg::Buf(&ib),
            Arg::Buf(&gb),
            Arg::Buf(&dt),
            Arg::U64(n as u64),
            Arg::U32(d as u32),
            Arg::U32(v as u32),
        ],
    )
    .unwrap();
    dt.to_vec::<f32>()
}

#[test]
fn embedding_backward_matches_the_cpu_op_and_is_deterministic() {
    for st in ALL {
        for &(v, d, n) in EMB_SHAPES {
            let ids = ids_for(v, n, 3 * n as u64);
            let table = inputs(v * d, 5, St::F32, -1.0, 1.0);
            let g = inputs(n * d, (n * d) as u64, st, -1.0, 1.0);
            let got = emb_bwd(st, &ids, &g, v, d, None);
            // the CPU op: g (rounded to storage) summed in f64 in position order, cast to f32
            let idt = Tensor::from_vec(ids.clone(), &[n], Device::Cpu).unwrap();
            let tv = tensor(&table, &[v, d]).var();
            let out = kf_ops::embedding::embedding(&idt, &tv).unwrap();
            let want = grad_of(&out, &g, &tv).to_vec::<f32>().unwrap();
            let name = format!("embedding_bwd_{} V={v} D={d} N={n}", st.suffix());
            // a sequential f32 sum of k terms in (-1, 1) is within k^2 half-ulps
            // (2^-24) of the f64 sum; k is at most the count of the most frequent id
            let mut count = std::collections::HashMap::new();
            ids.iter()
                .for_each(|&i| *count.entry(i).or_insert(0usize) += 1);
            let k = *count.values().max().unwrap() as f64;
            let tol = Tol::new(k * k * 6e-8, 0.0);
            compare(
                &name,
                &got.iter().map(|&x| x as f64).collect::<Vec<_>>(),
                &want.iter().map(|&x| x as f64).collect::<Vec<_>>(),
                tol,
            )
            .unwrap();
            // the order of every sum is position order whatever the grid: same
            // bits (on the small tables: one block zeroing all of a V = 50257
            // table is slow under emulation)
            for b in [1, 3].into_iter().filter(|_| v * d <= 100_000) {
                let other = emb_bwd(st, &ids, &g, v, d, Some(b));
                assert_eq!(bits(&got), bits(&other), "{name}: {b} buckets differ");
            }
        }
    }
}

#[test]
fn embedding_backward_skips_out_of_range_ids() {
    let (v, d) = (4, 3);
    let ids = [1u32, 4, 1, 9];
    let g: Vec<f32> = (0..ids.len() * d).map(|i| i as f32).collect();
    let got = emb_bwd(St::F32, &ids, &g, v, d, None);
    let mut want = vec![0.0f32; v * d];
    for j in 0..d {
        want[d + j] = g[j] + g[2 * d + j];
    }
    assert_eq!(got, want);
}

// ------------------------------------------------------------ rope

/// (B, T, H, D): D = 2, odd T and H, head dims 64 and 128, a pair count off the block.
const ROPE_SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 2),
    (2, 3, 3, 6),
    (2, 5, 3, 64),
    (1, 7, 2, 128),
    (3, 2, 5, 128),
];
const ROPE_BASE: f64 = 10_000.0;

fn positions(n: usize, seed: u64) -> Vec<u32> {
    let mut g = Gen::new(seed);
    // arbitrary, not increasing, up to a few thousand (large angles)
    (0..n)
        .map(|i| if i == 0 { 0 } else { g.below(4096) as u32 })
        .collect()
}

/// `rope_tables` of the CPU op, cast to f32 as the CPU op casts them.
fn host_tables(pos: &[u32], d: usize, freqs: &kf_ops::rope::RopeFreqs) -> (Vec<f32>, Vec<f32>) {
    let (c, s) = kf_ops::rope::rope_tables(pos, d, freqs);
    (
        c.iter().map(|&v| v as f32).collect(),
        s.iter().map(|&v| v as f32).collect(),
    )
}

#[allow(clippy::too_many_arguments)]
fn rope_launch(
    kernel: &str,
    x: &DeviceBuffer,
    cos: &DeviceBuffer,
    sin: &DeviceBuffer,
    out: &DeviceBuffer,
    (b, t, h, d): (usize, usize, usize, usize),
    strides: [usize; 3],
    batched: bool,
) {
    launch(
        kernel,
        rope::config(b, t, h, d),
        &[
            Arg::Buf(x),
            Arg::U64(0),
            Arg::Buf(cos),
            Arg::Buf(sin),
            Arg::Buf(out),
            Arg::U32(b as u32),
            Arg::U32(t as u32),
            Arg::U32(h as u32),
            Arg::U32(d as u32),
            Arg::U64(strides[0] as u64),
            Arg::U64(strides[1] as u64),
            Arg::U64(strides[2] as u64),
            Arg::I32(batched as i32),
        ],
    )
    .unwrap();
}

#[test]
fn rope_forward_and_backward_match_the_cpu_op_bit_for_bit() {
    for st in ALL {
        for &(b, t, h, d) in ROPE_SHAPES {
            for batched in [false, true] {
                let sfx = st.suffix();
                let seed = (b * 1000 + t * 100 + h * 10 + d) as u64;
                let pos = positions(if batched { b * t } else { t }, seed);
                let (c, s) = host_tables(&pos, d, &kf_ops::rope::RopeFreqs::plain(ROPE_BASE));
                let (cb, sb) = (DeviceBuffer::from_slice(&c), DeviceBuffer::from_slice(&s));
                let pt = if batched {
                    Tensor::from_vec(pos.clone(), &[b, t], Device::Cpu).unwrap()
                } else {
                    Tensor::from_vec(pos.clone(), &[t], Device::Cpu).unwrap()
                };
                // x is q of a fused qkv [B, T, 3H, D]: a strided view, read in place
                let qkv = inputs(b * t * 3 * h * d, seed, st, -2.0, 2.0);
                let xv = tensor(&qkv, &[b, t, 3 * h, d]).narrow(2, 0, h).unwrap();
                let xs = xv.strides().to_vec();
                assert!(b * t == 1 || !xv.is_contiguous());
                let (xb, out) = (st.upload(&qkv), st.alloc(b * t * h * d));
                let name = format!("rope {sfx} {b}x{t}x{h}x{d} batched={batched}");
                rope_launch(
                    &format!("rope_fwd_{sfx}"),
                    &xb,
                    &cb,
                    &sb,
                    &out,
                    (b, t, h, d),
                    [xs[0], xs[1], xs[2]],
                    batched,
                );
                let xvar = xv.var();
                let cpu =
                    kf_ops::rope::rope(&xvar, &pt, &kf_ops::rope::RopeFreqs::plain(ROPE_BASE))
                        .unwrap();
                // the same f32 products and differences, rounded once to storage
                compare(
                    &format!("{name} fwd"),
                    &st.download(&out),
                    &cpu_out(&cpu, st),
                    Tol::EXACT,
                )
                .unwrap();

                let g = inputs(b * t * h * d, seed + 7, st, -1.0, 1.0);
                let (gb, dx) = (st.upload(&g), st.alloc(b * t * h * d));
                rope_launch(
                    &format!("rope_bwd_{sfx}"),
                    &gb,
                    &cb,
                    &sb,
                    &dx,
                    (b, t, h, d),
                    [t * h * d, h * d, d],
                    batched,
                );
                let want = grad_of(&cpu, &g, &xvar);
                compare(
                    &format!("{name} bwd"),
                    &st.download(&dx),
                    &cpu_out(&want, st),
                    Tol::EXACT,
                )
                .unwrap();
            }
        }
    }
}

/// Both table kernels: plain, and scaled (every frequency divided by its own factor, as a
/// Llama 3 file's rope_freqs; `rope_tables_scaled_f32`).
#[test]
fn rope_device_tables_match_the_host_tables() {
    for d in [2, 6, 64, 128] {
        for scaled in [false, true] {
            let div: Vec<f64> = (0..d / 2).map(|j| 1.0 + 0.37 * j as f64).collect();
            let freqs = kf_ops::rope::RopeFreqs {
                base: ROPE_BASE,
                div: scaled.then(|| div.clone().into()),
            };
            for np in [1, 7, 300] {
                let pos = positions(np, (np * d) as u64);
                let (c, s) = host_tables(&pos, d, &freqs);
                let half = d / 2;
                let (pb, cb, sb, db) = (
                    DeviceBuffer::from_slice(&pos),
                    DeviceBuffer::uninit(4 * np * half),
                    DeviceBuffer::uninit(4 * np * half),
                    DeviceBuffer::from_slice(&div),
                );
                let mut args = vec![
                    Arg::Buf(&pb),
                    Arg::Buf(&cb),
                    Arg::Buf(&sb),
                    Arg::U64(np as u64),
                    Arg::U32(d as u32),
                    Arg::F64(ROPE_BASE),
                ];
                let entry = if scaled {
                    args.push(Arg::Buf(&db));
                    "rope_tables_scaled_f32"
                } else {
                    "rope_tables_f32"
                };
                launch(entry, rope::tables_config(np, d), &args).unwrap();
                let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                compare(
                    &format!("{entry} cos D={d} P={np}"),
                    &f32s(&cb),
                    &f(&c),
                    ONE_F32_ULP,
                )
                .unwrap();
                compare(
                    &format!("{entry} sin D={d} P={np}"),
                    &f32s(&sb),
                    &f(&s),
                    ONE_F32_ULP,
                )
                .unwrap();
            }
        }
    }
}

// ------------------------------------------------------------ gelu

const SIZES: &[usize] = &[1, 7, 33, 255, 257, 1000, 4097];

/// n inputs in (-6, 6) with the extremes the CPU op's tests use in front.
fn gelu_inputs(n: usize, st: St) -> Vec<f32> {
    let mut x = inputs(n, 11 * n as u64, st, -6.0, 6.0);
    let extremes = [-1e30f32, -1e4, -40.0, -9.0, 0.0, 9.0, 40.0, 1e4, 1e30];
    // those that the storage dtype holds (f16 overflows to inf past 65504)
    let finite = extremes
        .iter()
        .map(|&e| st.round(e))
        .filter(|e| e.is_finite());
    for (a, e) in x.iter_mut().zip(finite) {
        *a = e;
    }
    x
}

#[test]
fn gelu_erf_forward_and_both_backwards_match_the_cpu_ops() {
    type CpuOp = fn(&Tensor) -> anyhow::Result<Tensor>;
    for st in ALL {
        for &n in SIZES {
            let sfx = st.suffix();
            let x = gelu_inputs(n, st);
            let g = inputs(n, 13 * n as u64, st, -1.0, 1.0);
            let (xb, gb, out) = (st.upload(&x), st.upload(&g), st.alloc(n));
            let cfg = gelu::config(n);

            launch(
                &format!("gelu_erf_{sfx}"),
                cfg,
                &[Arg::Buf(&xb), Arg::Buf(&out), Arg::U64(n as u64)],
            )
            .unwrap();
            let want = {
                let _g = no_grad();
                kf_ops::gelu::gelu_erf(&tensor(&x, &[n])).unwrap()
            };
            compare(
                &format!("gelu_erf_{sfx} n={n}"),
                &st.download(&out),
                &cpu_out(&want, st),
                st.tol(),
            )
            .unwrap();

            let ops: [(&str, CpuOp); 2] = [
                ("gelu_erf_bwd", kf_ops::gelu::gelu_erf),
                ("gelu_tanh_bwd", kf_ops::gelu::gelu_tanh),
            ];
            for (kernel, cpu) in ops {
                launch(
                    &format!("{kernel}_{sfx}"),
                    cfg,
                    &[
                        Arg::Buf(&xb),
                        Arg::Buf(&gb),
                        Arg::Buf(&out),
                        Arg::U64(n as u64),
                    ],
                )
                .unwrap();
                let xv = tensor(&x, &[n]).var();
                let dx = grad_of(&cpu(&xv).unwrap(), &g, &xv);
                compare(
                    &format!("{kernel}_{sfx} n={n}"),
                    &st.download(&out),
                    &cpu_out(&dx, st),
                    st.tol(),
                )
                .unwrap();
            }
        }
    }
}

// ------------------------------------------------------------ softmax

/// (R, V): one element, odd V below a warp and just above, V off the block
/// (512), and the two vocabularies.
const SM_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (2, 33),
    (5, 256),
    (2, 1000),
    (2, 30522),
    (1, 50257),
];

/// Row-major [R, V] logits in (-8, 8), every 5th entry of odd rows -inf
/// (masked), never a whole row.
fn logits(rows: usize, v: usize, st: St, seed: u64) -> Vec<f32> {
    let mut x = inputs(rows * v, seed, st, -8.0, 8.0);
    for r in (1..rows).step_by(2) {
        for j in (1..v).step_by(5) {
            x[r * v + j] = f32::NEG_INFINITY;
        }
    }
    x
}

fn softmax_fwd(
    st: St,
    x: &DeviceBuffer,
    out: &DeviceBuffer,
    rows: usize,
    v: usize,
    log: bool,
) -> u32 {
    let bad = DeviceBuffer::from_slice(&[softmax::NO_BAD_ROW]);
    launch(
        &format!("softmax_fwd_{}", st.suffix()),
        softmax::config(rows, v),
        &[
            Arg::Buf(x),
            Arg::Buf(out),
            Arg::U32(rows as u32),
            Arg::U32(v as u32),
            Arg::I32(log as i32),
            Arg::Buf(&bad),
        ],
    )
    .unwrap();
    bad.to_vec::<u32>()[0]
}

#[test]
fn softmax_forward_and_backward_match_the_cpu_ops() {
    for st in ALL {
        for &(rows, v) in SM_SHAPES {
            for log in [false, true] {
                let sfx = st.suffix();
                let name = format!("softmax_{sfx} {rows}x{v} log={log}");
                let seed = (rows * 100_000 + v) as u64;
                let x = logits(rows, v, st, seed);
                let (xb, y) = (st.upload(&x), st.alloc(rows * v));
                let bad = softmax_fwd(st, &xb, &y, rows, v, log);
                assert_eq!(
                    bad,
                    softmax::NO_BAD_ROW,
                    "{name}: a row reported fully masked"
                );
                let xv = tensor(&x, &[rows, v]).var();
                let cpu = if log {
                    kf_ops::softmax::log_softmax(&xv)
                } else {
                    kf_ops::softmax::softmax(&xv)
                }
                .unwrap();
                compare(
                    &format!("{name} fwd"),
                    &st.download(&y),
                    &cpu_out(&cpu, st),
                    st.tol(),
                )
                .unwrap();

                // backward from a saved output: f32 gets the CPU op's own y and
                // is compared with its backward; f16/bf16 get their y rounded
                // to storage, and the reference is the formula in f64 on it
                let g = inputs(rows * v, seed + 1, st, -1.0, 1.0);
                let yv: Vec<f32> = cpu
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&a| st.round(a))
                    .collect();
                let (yb, gb, dx) = (st.upload(&yv), st.upload(&g), st.alloc(rows * v));
                launch(
                    &format!("softmax_bwd_{sfx}"),
                    softmax::config(rows, v),
                    &[
                        Arg::Buf(&yb),
                        Arg::Buf(&gb),
                        Arg::Buf(&dx),
                        Arg::U32(rows as u32),
                        Arg::U32(v as u32),
                        Arg::I32(log as i32),
                    ],
                )
                .unwrap();
                let want: Vec<f64> = if st == St::F32 {
                    cpu_out(&grad_of(&cpu, &g, &xv), st)
                } else {
                    let mut w = vec![0.0; rows * v];
                    for r in 0..rows {
                        let (yr, gr) = (&yv[r * v..(r + 1) * v], &g[r * v..(r + 1) * v]);
                        let acc: f64 = if log {
                            gr.iter().map(|&a| a as f64).sum()
                        } else {
                            yr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum()
                        };
                        for j in 0..v {
                            let (yy, gg) = (yr[j] as f64, gr[j] as f64);
                            let d = if log {
                                gg - yy.exp() * acc
                            } else {
                                yy * (gg - acc)
                            };
                            w[r * v + j] = st.round(d as f32) as f64;
                        }
                    }
                    w
                };
                compare(&format!("{name} bwd"), &st.download(&dx), &want, st.tol()).unwrap();
            }
        }
    }
}

#[test]
fn softmax_fully_masked_rows_are_zeros_and_reported_like_the_cpu_op() {
    let (rows, v) = (5, 40);
    let mut x = logits(rows, v, St::F32, 9);
    for r in [3, 1] {
        x[r * v..(r + 1) * v].fill(f32::NEG_INFINITY);
    }
    let e = kf_ops::softmax::softmax(&tensor(&x, &[rows, v]))
        .unwrap_err()
        .to_string();
    for log in [false, true] {
        let (xb, y) = (
            DeviceBuffer::from_slice(&x),
            DeviceBuffer::uninit(4 * rows * v),
        );
        let bad = softmax_fwd(St::F32, &xb, &y, rows, v, log);
        // the CPU op names the first such row
        assert!(
            e.contains(&format!("row {bad}")),
            "kernel reports row {bad}, CPU op: {e}"
        );
        assert_eq!(bad, 1);
        let yv = y.to_vec::<f32>();
        assert!(yv[v..2 * v]
            .iter()
            .chain(&yv[3 * v..4 * v])
            .all(|&a| a == 0.0));
        assert!(yv[..v].iter().all(|a| a.is_finite()));
    }
}

// ------------------------------------------------------------ layernorm backward

/// (R, D): as the forward's shapes, plus enough rows for three dw/db chunks
/// (64 rows each, the last one short), so that the reduce runs.
const LN_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (2, 33),
    (5, 256),
    (2, 1000),
    (3, 4097),
    (130, 65),
];

#[test]
fn layernorm_backward_matches_the_cpu_op() {
    const EPS: f32 = 1e-5;
    for st in ALL {
        for &(rows, d) in LN_SHAPES {
            for bias in [false, true] {
                let sfx = st.suffix();
                let name = format!("layernorm_bwd {sfx} {rows}x{d} bias={bias}");
                let seed = (rows * 100_000 + d) as u64 + 17;
                let x = inputs(rows * d, seed, st, 2.0, 4.0);
                let w = inputs(d, seed + 1, st, -1.5, 1.5);
                let b = inputs(d, seed + 2, st, -1.0, 1.0);
                let g = inputs(rows * d, seed + 3, st, -1.0, 1.0);
                let (xb, wb, bb, gb) = (st.upload(&x), st.upload(&w), st.upload(&b), st.upload(&g));
                // the statistics from the forward kernel, as in training
                let y = st.alloc(rows * d);
                let common::LnStats { mean, rstd } = common::layernorm_fwd(
                    st,
                    &xb,
                    &wb,
                    bias.then_some(&bb),
                    &y,
                    (rows, d),
                    EPS,
                    false,
                );
                let (dx, dw, db) =
                    common::layernorm_bwd(st, &xb, &wb, &gb, Some(&mean), &rstd, (rows, d), bias);

                // the reference: the CPU op's backward (f32); for f16/bf16 the
                // formulas in f64 on the same rounded x, w, g
                let (want_dx, want_dw, want_db): (Vec<f64>, Vec<f64>, Vec<f64>) = if st == St::F32 {
                    let (xv, wv, bv) = (
                        tensor(&x, &[rows, d]).var(),
                        tensor(&w, &[d]).var(),
                        tensor(&b, &[d]).var(),
                    );
                    let out =
                        kf_ops::layernorm::layer_norm(&xv, &wv, bias.then_some(&bv), EPS as f64)
                            .unwrap();
                    let grads = out.backward_with(tensor(&g, &[rows, d])).unwrap();
                    let f = |t: &Tensor| {
                        t.to_vec::<f32>()
                            .unwrap()
                            .iter()
                            .map(|&a| a as f64)
                            .collect()
                    };
                    let db = if bias {
                        f(grads.get(&bv).unwrap())
                    } else {
                        vec![]
                    };
                    (f(grads.get(&xv).unwrap()), f(grads.get(&wv).unwrap()), db)
                } else {
                    ln_bwd_f64(&x, &w, &g, d, EPS as f64, st)
                };
                compare(&format!("{name} dx"), &st.download(&dx), &want_dx, st.tol()).unwrap();
                // dw, db: f32 sums over R rows of terms below ~3 in magnitude
                let tol = Tol::new(rows as f64 * 3.0 * 1.2e-7, 1e-4);
                compare(&format!("{name} dw"), &f32s(&dw), &want_dw, tol).unwrap();
                if let Some(db) = &db {
                    compare(&format!("{name} db"), &f32s(db), &want_db, tol).unwrap();
                }
            }
        }
    }
}

/// LayerNorm's backward in f64 (dx rounded to `st`; dw, db unrounded: the
/// kernels write them in f32).
fn ln_bwd_f64(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    d: usize,
    eps: f64,
    st: St,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / d;
    let (mut dx, mut dw, mut db) = (vec![0.0; rows * d], vec![0.0; d], vec![0.0; d]);
    for r in 0..rows {
        let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&a| a as f64).collect();
        let gr = &g[r * d..(r + 1) * d];
        let m = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|a| (a - m).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps).sqrt();
        let xh: Vec<f64> = xr.iter().map(|a| (a - m) * rs).collect();
        let dxh: Vec<f64> = (0..d).map(|j| gr[j] as f64 * w[j] as f64).collect();
        let c1 = dxh.iter().sum::<f64>() / d as f64;
        let c2 = dxh.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / d as f64;
        for j in 0..d {
            dx[r * d + j] = st.round((rs * (dxh[j] - c1 - xh[j] * c2)) as f32) as f64;
            dw[j] += gr[j] as f64 * xh[j];
            db[j] += gr[j] as f64;
        }
    }
    (dx, dw, db)
}

// ------------------------------------------------------------ noise features

#[test]
fn noise_features_match_the_cpu_op() {
    for st in ALL {
        for d in [2, 8, 64, 254, 256] {
            for n in [1, 7, 130] {
                let sfx = st.suffix();
                let mut gen = Gen::new((n * d) as u64);
                // noise levels in [0, 1), and a few values beyond (tau, large angles)
                let mut s = gen.vec(n, 0.0, 1.0);
                for (k, e) in [0.0, 1.0, 3.75, 1000.5].into_iter().enumerate().take(n) {
                    s[k] = e;
                }
                let want = {
                    let t = Tensor::from_slice(&s, &[n], Device::Cpu).unwrap();
                    cpu_out(
                        &kf_ops::noise::noise_features(&t, d, DType::F32).unwrap(),
                        st,
                    )
                };
                // the exact f32 result on the emulator's (host) libm; a GPU's double
                // sin / cos may round to the neighbouring f32
                let tol = if st == St::F32 { ONE_F32_ULP } else { st.tol() };
                let sb = DeviceBuffer::from_slice(&s);
                for ld in [d, 2 * d] {
                    // rows ld apart (u and tau side by side): the other half stays untouched
                    let out = st.upload(&vec![7.0f32; n * ld]);
                    launch(
                        &format!("noise_features_{sfx}"),
                        noise::config(n, d),
                        &[
                            Arg::Buf(&sb),
                            Arg::Buf(&out),
                            Arg::U64(n as u64),
                            Arg::U32(d as u32),
                            Arg::U64(ld as u64),
                        ],
                    )
                    .unwrap();
                    let o = st.download(&out);
                    let got: Vec<f64> = o.chunks(ld).flat_map(|r| r[..d].to_vec()).collect();
                    compare(
                        &format!("noise_features_{sfx} N={n} d={d} ld={ld}"),
                        &got,
                        &want,
                        tol,
                    )
                    .unwrap();
                    assert!(o.chunks(ld).all(|r| r[d..].iter().all(|&a| a == 7.0)));
                }
            }
        }
    }
}

// ------------------------------------------------------------ adamw

#[test]
fn adamw_matches_the_cpu_op_bit_for_bit_over_several_steps() {
    let cfgs = [
        kf_ops::adamw::AdamWConfig::default(),
        kf_ops::adamw::AdamWConfig {
            lr: 1e-2,
            beta1: 0.8,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.0,
        },
    ];
    for (c, cfg) in cfgs.into_iter().enumerate() {
        // more elements than the grid (1024 blocks of 256) covers: two grid-stride steps
        let big: &[usize] = if c == 0 { &[300_001] } else { &[] };
        for &n in SIZES.iter().chain(big) {
            let p = inputs(n, n as u64, St::F32, -1.0, 1.0);
            let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (pb, mb, vb) = (
                DeviceBuffer::from_slice(&p),
                DeviceBuffer::from_slice(&m),
                DeviceBuffer::from_slice(&v),
            );
            let (pt, mt, vt) = (tensor(&p, &[n]), tensor(&m, &[n]), tensor(&v, &[n]));
            // steps 1, 2, 3 then a jump to 1000 (bias corrections near 1)
            for (k, step) in [1u64, 2, 3, 1000].into_iter().enumerate() {
                let g = inputs(n, (n + k) as u64 * 31, St::F32, -2.0, 2.0);
                let gb = DeviceBuffer::from_slice(&g);
                let s = adamw::Scalars::new(
                    cfg.lr,
                    cfg.beta1,
                    cfg.beta2,
                    cfg.eps,
                    cfg.weight_decay,
                    step,
                );
                let mut args = vec![
                    Arg::Buf(&pb),
                    Arg::Buf(&gb),
                    Arg::Buf(&mb),
                    Arg::Buf(&vb),
                    Arg::U64(n as u64),
                ];
                args.extend(s.as_array().map(Arg::F32));
                launch("adamw_f32", adamw::config(n), &args).unwrap();
                kf_ops::adamw::adamw_step(&pt, &tensor(&g, &[n]), &mt, &vt, step, &cfg).unwrap();
                let name = format!("adamw n={n} step={step} {cfg:?}");
                assert_eq!(
                    bits(&pb.to_vec::<f32>()),
                    bits(&pt.to_vec::<f32>().unwrap()),
                    "{name}: p"
                );
                m = mb.to_vec::<f32>();
                v = vb.to_vec::<f32>();
                assert_eq!(bits(&m), bits(&mt.to_vec::<f32>().unwrap()), "{name}: m");
                assert_eq!(bits(&v), bits(&vt.to_vec::<f32>().unwrap()), "{name}: v");
            }
            assert!(v.iter().all(|&a| a > 0.0) && m.iter().any(|&a| a != 0.0));
        }
    }
}
