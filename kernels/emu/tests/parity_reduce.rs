//! Emulated-kernel parity for the reduce family (kernels/reduce.cu): column
//! sums (`colsum_<dtype>` + `colsum_finish_f32`, bias gradients) against
//! kf_ops::reduce::sum_dim over rows, and the global sum of squares of a list
//! of buffers (`sumsq_<dtype>` + `sumsq_finish_f32`, grad-norm clip) against
//! kf_ops::reduce::sum of the squares per buffer added in f64 (as the CPU
//! trainer adds them), on ragged shapes (R, C off the 32 x 8 tile and the row
//! chunk, n off the block), storage f32/f16/bf16 (the CPU ops get the rounded
//! inputs in f32). Both are run twice to check they are bit-for-bit
//! deterministic. Letters: R rows, C columns, K row chunks, n elements.

use kf_engine::no_grad;
use kf_kernels::reduce;
use kf_kernels_emu::{launch, Arg, DeviceBuffer};
use kf_tests::harness::{compare, Tol};

mod common;
use common::{f32s, inputs, tensor, St, ALL};

/// One f32 rounding of a sum, relative to the sum of the magnitudes.
const ULP: f64 = 1.0 / (1u64 << 24) as f64;

/// (R, C): tiny, one row, one column, C one off the 32-column tile, R over
/// one chunk (K = 16 with chunks of 64) with a ragged last chunk, and a
/// vocabulary-wide row (C = 30522).
const COLSUM_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 33),
    (70, 1),
    (3, 31),
    (65, 257),
    (1000, 33),
    (130, 129),
    (3, 30522),
];

/// The column sums of `x` [R, C] on the emulator (both passes).
fn colsum(st: St, x: &[f32], rows: usize, cols: usize) -> (Vec<f64>, u32) {
    let xb = st.upload(x);
    let out = DeviceBuffer::uninit(4 * cols);
    let (cfg, chunk, k) = reduce::colsum_config(rows, cols);
    let part = DeviceBuffer::uninit(4 * cols * k as usize);
    let dst = if k == 1 { &out } else { &part };
    launch(
        &format!("colsum_{}", st.suffix()),
        cfg,
        &[
            Arg::Buf(&xb),
            Arg::Buf(dst),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::U32(chunk),
        ],
    )
    .unwrap();
    if k > 1 {
        launch(
            "colsum_finish_f32",
            reduce::colsum_finish_config(cols),
            &[
                Arg::Buf(&part),
                Arg::Buf(&out),
                Arg::U32(cols as u32),
                Arg::U32(k),
            ],
        )
        .unwrap();
    }
    (f32s(&out), k)
}

#[test]
fn column_sums_match_the_cpu_op_and_are_deterministic() {
    let _g = no_grad();
    for st in ALL {
        for &(rows, cols) in COLSUM_SHAPES {
            let name = format!("colsum_{} {rows}x{cols}", st.suffix());
            // an offset keeps the sums away from zero, where an absolute
            // error bound would hide nothing
            let x = inputs(rows * cols, (rows * 7919 + cols) as u64, st, -1.0, 1.5);
            let (got, k) = colsum(st, &x, rows, cols);
            let want: Vec<f64> = kf_ops::reduce::sum_dim(&tensor(&x, &[rows, cols]), 0, false)
                .unwrap()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            // f32 additions in a chain of at most chunk / 8 + 8 + K, each off
            // by an ulp of a partial sum of at most R * 1.5 in magnitude; plus
            // the reference's own rounding
            let chunk = reduce::colsum_config(rows, cols).1 as f64;
            let chain = chunk / 8.0 + 8.0 + k as f64 + 1.0;
            let tol = Tol::new(chain * ULP * rows as f64 * 1.5, 0.0);
            compare(&name, &got, &want, tol).unwrap();
            // chunks are at least 64 rows: the finish pass runs exactly when R > 64
            assert_eq!(k > 1, rows > reduce::MIN_CHUNK_ROWS, "{name}: K = {k}");
            let again = colsum(st, &x, rows, cols).0;
            assert!(
                got.iter()
                    .zip(&again)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: two runs differ"
            );
        }
    }
}

/// The sum of squares of `bufs` on the emulator: one first-pass launch per
/// buffer at its slot, then the finish.
fn sumsq(st: St, bufs: &[Vec<f32>]) -> (f64, u32) {
    let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
    let (slots, p) = reduce::sumsq_slots(&lens);
    let part = DeviceBuffer::uninit(4 * p as usize);
    for (b, &slot) in bufs.iter().zip(&slots) {
        let xb = st.upload(b);
        launch(
            &format!("sumsq_{}", st.suffix()),
            reduce::sumsq_config(b.len()),
            &[
                Arg::Buf(&xb),
                Arg::U64(b.len() as u64),
                Arg::Buf(&part),
                Arg::U32(slot),
            ],
        )
        .unwrap();
    }
    let out = DeviceBuffer::uninit(4);
    launch(
        "sumsq_finish_f32",
        reduce::sumsq_finish_config(),
        &[Arg::Buf(&part), Arg::U32(p), Arg::Buf(&out)],
    )
    .unwrap();
    (f32s(&out)[0], p)
}

#[test]
fn sum_of_squares_of_a_buffer_list_matches_the_cpu_op_and_is_deterministic() {
    let _g = no_grad();
    // (a) a model-like list: scalars, vectors off the block, a matrix over one
    // block's share, one that fills the grid cap with a second grid-stride
    // round (> 128 blocks * 256 threads * 16); (b) 300 small buffers, so the
    // finish walks more partials (P > 256) than it has threads
    let lists: Vec<Vec<usize>> = vec![
        vec![1, 33, 257, 4097, 65 * 129, 600_001],
        (0..300).map(|i| 1 + (i * 37) % 61).collect(),
    ];
    for st in ALL {
        for (l, lens) in lists.iter().enumerate() {
            if st != St::F32 && l == 0 {
                // the big buffer once (f32) is enough; f16/bf16 take the small list
                continue;
            }
            let name = format!("sumsq_{} list {l}", st.suffix());
            let bufs: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| inputs(n, (i * 1009 + n) as u64, st, -2.0, 2.0))
                .collect();
            let (got, p) = sumsq(st, &bufs);
            assert_eq!(p as usize, reduce::sumsq_slots(lens).1 as usize);
            if l == 1 {
                assert!(p > reduce::SUMSQ_BLOCK, "{name}: P = {p}");
            }
            // the CPU: sum(x * x) per buffer (f32 squares, f64 sum), added in f64
            let want: f64 = bufs
                .iter()
                .map(|b| {
                    let t = tensor(b, &[b.len()]);
                    let sq = kf_ops::elementwise::mul(&t, &t).unwrap();
                    kf_ops::reduce::sum(&sq).unwrap().to_scalar_f64().unwrap()
                })
                .sum();
            // all terms >= 0: relative error at most the chain length in ulps
            // (a thread's grid-stride run, the block tree, the finish's run and
            // tree) plus the squares' and the reference's roundings
            let longest = lens.iter().copied().max().unwrap();
            let run = longest.div_ceil(reduce::sumsq_blocks(longest) * 256) as f64;
            let chain = run + 8.0 + (p as f64 / 256.0).ceil() + 8.0 + 3.0;
            compare(&name, &[got], &[want], Tol::new(0.0, chain * ULP)).unwrap();
            assert!(want > 0.0);
            let again = sumsq(st, &bufs).0;
            assert_eq!(got.to_bits(), again.to_bits(), "{name}: two runs differ");
        }
    }
}

#[test]
fn empty_buffers_add_nothing() {
    // n = 0 still writes its one partial (zero): no stale slot reaches the total
    let bufs = vec![vec![], vec![3.0f32, 4.0], vec![]];
    let (got, p) = sumsq(St::F32, &bufs);
    assert_eq!((got, p), (25.0, 3));
    // C = 0 and R = 0: nothing to write / zeros
    let (z, _) = colsum(St::F32, &[], 0, 5);
    assert_eq!(z, vec![0.0; 5]);
}
