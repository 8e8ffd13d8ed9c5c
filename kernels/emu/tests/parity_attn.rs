//! Emulated-kernel parity of the attention family (kernels/attention.cu), run by the CPU emulator
//! with the launch shapes of kf_kernels::attention, against the CPU op (kf_ops::attention:
//! attention_with_lse, attention_backward): every pattern (causal, staircase, double staircase,
//! with and without q_start), head dims 64 and 128, ragged lengths (1, 17, 70: not multiples of
//! any tile), batch > 1 with key_skip (left padding: rows that see nothing are zeros), strided
//! q/k/v with NaN in the gaps, the decode path (split keys + combine) against the full
//! computation, and f16/bf16 storage against the f32 CPU op on the same rounded inputs.
//! Letters: B batch, Tq query rows, Tk keys, H heads, D head dim.

use kf_engine::{no_grad, Tensor};
use kf_kernels::attention::{self as at, Kernel};
use kf_kernels_emu::{launch, Arg, DeviceBuffer};
use kf_ops::attention::{attention_backward, attention_with_lse, AttnParams, AttnPattern};
use kf_tests::harness::{compare, Tol};

mod common;
use common::{tensor, St};

/// Each value rounded to f32 (what an f32 output could hold).
fn f32s(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

/// `n` inputs in [-1, 1), rounded to the storage dtype.
fn inputs(n: usize, seed: u64, st: St) -> Vec<f32> {
    common::inputs(n, seed, st, -1.0, 1.0)
}

// ------------------------------------------------------------------------------------ cases

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    h: usize,
    d: usize,
    tq: usize,
    tk: usize,
    q_start: usize,
    pattern: AttnPattern,
    skip: Vec<usize>,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{:?} B{} H{} D{} Tq{} Tk{} q_start {} skip {:?}",
            self.pattern, self.b, self.h, self.d, self.tq, self.tk, self.q_start, self.skip
        )
    }
    fn params(&self) -> AttnParams {
        AttnParams {
            pattern: self.pattern,
            q_start: self.q_start,
            // peakier than 1/sqrt(D) on inputs in [-1, 1]: the softmax does not flatten out
            scale: 0.5,
            key_skip: self.skip.clone(),
        }
    }
    fn code(&self) -> (i32, u32, u32) {
        match self.pattern {
            AttnPattern::Causal => (at::CAUSAL, 0, 0),
            AttnPattern::Staircase { n, k } => (at::STAIRCASE, n as u32, k as u32),
            AttnPattern::DoubleStaircase { n, k } => (at::DOUBLE_STAIRCASE, n as u32, k as u32),
        }
    }
}

/// Self-attention over a pattern's whole sequence (q_start 0, Tq = Tk = t).
fn full(b: usize, h: usize, d: usize, t: usize, pattern: AttnPattern, skip: &[usize]) -> Case {
    Case {
        b,
        h,
        d,
        tq: t,
        tk: t,
        q_start: 0,
        pattern,
        skip: skip.to_vec(),
    }
}

/// The training-time cases of head dim `d`: every pattern, ragged lengths, padding.
fn train_cases(d: usize) -> Vec<Case> {
    use AttnPattern::*;
    vec![
        full(1, 1, d, 1, Causal, &[]),
        full(2, 2, d, 17, Causal, &[3, 0]),
        // batch 1's first 21 rows are padding: a 64-row tile that is partly zeros
        full(2, 1, d, 70, Causal, &[0, 21]),
        full(2, 2, d, 20, Staircase { n: 5, k: 3 }, &[0, 2]),
        full(1, 2, d, 70, Staircase { n: 14, k: 4 }, &[]),
        full(1, 2, d, 15, DoubleStaircase { n: 3, k: 2 }, &[]),
        full(2, 1, d, 70, DoubleStaircase { n: 10, k: 3 }, &[4, 0]),
        // the rollout's passes over a cached context: queries start at N
        Case {
            q_start: 6,
            tq: 18,
            ..full(1, 2, d, 24, Staircase { n: 6, k: 3 }, &[])
        },
        Case {
            q_start: 5,
            tq: 20,
            ..full(2, 1, d, 25, DoubleStaircase { n: 5, k: 2 }, &[])
        },
        // a KV-cached step through the forward tiles
        Case {
            q_start: 33,
            tq: 7,
            ..full(2, 1, d, 40, Causal, &[5, 0])
        },
    ]
}

// ------------------------------------------------------------------------- device plumbing

/// Values [B, T, H, D] placed in a strided buffer: row stride `row_mult` * H * D, `extra` unused
/// rows per batch; the gaps hold NaN, so reading one poisons the result. Returns the buffer's
/// values and the (batch, row, head) strides.
fn strided(
    v: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    row_mult: usize,
    extra: usize,
) -> (Vec<f32>, [u64; 3]) {
    let st = row_mult * h * d;
    let sb = (t + extra) * st;
    let mut out = vec![f32::NAN; b * sb];
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let src = ((bi * t + ti) * h + hi) * d;
                let dst = bi * sb + ti * st + hi * d;
                out[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
    }
    (out, [sb as u64, st as u64, d as u64])
}

/// q, k, v on the device with their strides: q as a view of a [B, Tq, 3, H, D] buffer, k and v
/// as `[B, Tk + 3, H, D]` caches (or, with `cache_rows`, that many rows).
struct Dev {
    q: DeviceBuffer,
    k: DeviceBuffer,
    v: DeviceBuffer,
    skip: Option<DeviceBuffer>,
    qs: [u64; 3],
    ks: [u64; 3],
    vs: [u64; 3],
}

fn upload(st: St, c: &Case, q: &[f32], k: &[f32], v: &[f32]) -> Dev {
    let (qv, qs) = strided(q, c.b, c.tq, c.h, c.d, 3, 1);
    let (kv, ks) = strided(k, c.b, c.tk, c.h, c.d, 1, 3);
    let (vv, vs) = strided(v, c.b, c.tk, c.h, c.d, 2, 0);
    let skip = (!c.skip.is_empty())
        .then(|| DeviceBuffer::from_slice(&c.skip.iter().map(|&s| s as u32).collect::<Vec<u32>>()));
    Dev {
        q: st.upload(&qv),
        k: st.upload(&kv),
        v: st.upload(&vv),
        skip,
        qs,
        ks,
        vs,
    }
}

/// The common kernel inputs (`IN` in kf_kernels::attention).
fn common<'a>(c: &Case, dv: &'a Dev) -> Vec<Arg<'a>> {
    let (kind, pn, pk) = c.code();
    let mut a = vec![
        Arg::Buf(&dv.q),
        Arg::Buf(&dv.k),
        Arg::Buf(&dv.v),
        dv.skip.as_ref().map_or(Arg::Null, Arg::Buf),
    ];
    for s in [dv.qs, dv.ks, dv.vs] {
        a.extend(s.iter().map(|&x| Arg::U64(x)));
    }
    a.extend([
        Arg::U32(c.tq as u32),
        Arg::U32(c.tk as u32),
        Arg::U32(c.q_start as u32),
        Arg::I32(kind),
        Arg::U32(pn),
        Arg::U32(pk),
        Arg::F32(c.params().scale as f32),
    ]);
    a
}

/// The kernels' forward: (o [B, Tq, H, D], lse [B, H, Tq]). `decode`: the split-key kernels with
/// at most `max_splits` splits (then combined); else the forward tiles.
fn run_fwd(st: St, c: &Case, dv: &Dev, decode: bool, max_splits: usize) -> (Vec<f64>, Vec<f64>) {
    let n_o = c.b * c.tq * c.h * c.d;
    let (o, lse) = (st.alloc(n_o), DeviceBuffer::uninit(4 * c.b * c.h * c.tq));
    let sfx = st.suffix();
    let name = c.name();
    if !decode {
        let cfg = at::fwd(c.b, c.h, c.tq, c.tk, c.d).unwrap();
        let mut args = common(c, dv);
        args.extend([
            Arg::Buf(&o),
            Arg::Buf(&lse),
            Arg::Null,
            Arg::Null,
            Arg::U32(1),
            Arg::U32(0),
        ]);
        let kernel = at::entry(Kernel::Fwd, c.d, sfx);
        launch(&kernel, cfg, &args).unwrap_or_else(|e| panic!("{kernel} {name}: {e}"));
    } else {
        let plan = at::decode(c.b, c.h, c.tq, c.tk, c.d, max_splits).unwrap();
        let rows = plan.part_rows.max(1);
        let (opart, lsepart) = (
            DeviceBuffer::uninit(4 * rows * c.d),
            DeviceBuffer::uninit(4 * rows),
        );
        let split = plan.nsplit > 1;
        let mut args = common(c, dv);
        args.extend([
            Arg::Buf(&o),
            Arg::Buf(&lse),
            if split { Arg::Buf(&opart) } else { Arg::Null },
            if split { Arg::Buf(&lsepart) } else { Arg::Null },
            Arg::U32(plan.nsplit),
            Arg::U32(plan.chunk),
        ]);
        let kernel = at::entry(Kernel::Decode, c.d, sfx);
        launch(&kernel, plan.main, &args).unwrap_or_else(|e| panic!("{kernel} {name}: {e}"));
        if let Some(cfg) = plan.combine {
            let kernel = format!("attn_decode_combine_{sfx}");
            launch(
                &kernel,
                cfg,
                &[
                    Arg::Buf(&opart),
                    Arg::Buf(&lsepart),
                    Arg::Buf(&o),
                    Arg::Buf(&lse),
                    Arg::U32(c.tq as u32),
                    Arg::U32(c.d as u32),
                    Arg::U32(plan.nsplit),
                ],
            )
            .unwrap_or_else(|e| panic!("{kernel} {name}: {e}"));
        }
    }
    let lse: Vec<f64> = lse.to_vec::<f32>().iter().map(|&x| x as f64).collect();
    (st.download(&o), lse)
}

/// The kernels' backward: (dq, dk, dv) from o (T), lse (f32) and the output gradient g (T).
fn run_bwd(st: St, c: &Case, dv: &Dev, o: &[f32], lse: &[f32], g: &[f32]) -> [Vec<f64>; 3] {
    let sfx = st.suffix();
    let name = c.name();
    let (ob, gb, lb) = (st.upload(o), st.upload(g), DeviceBuffer::from_slice(lse));
    let dvec = DeviceBuffer::uninit(4 * c.b * c.h * c.tq);
    let kernel = format!("attn_bwd_dot_{sfx}");
    launch(
        &kernel,
        at::bwd_dot(c.b, c.h, c.tq),
        &[
            Arg::Buf(&ob),
            Arg::Buf(&gb),
            Arg::Buf(&dvec),
            Arg::U32(c.b as u32),
            Arg::U32(c.tq as u32),
            Arg::U32(c.h as u32),
            Arg::U32(c.d as u32),
        ],
    )
    .unwrap_or_else(|e| panic!("{kernel} {name}: {e}"));
    let dq = st.alloc(c.b * c.tq * c.h * c.d);
    let (dk, dvv) = (
        st.alloc(c.b * c.tk * c.h * c.d),
        st.alloc(c.b * c.tk * c.h * c.d),
    );
    let mut args = common(c, dv);
    args.extend([Arg::Buf(&gb), Arg::Buf(&lb), Arg::Buf(&dvec), Arg::Buf(&dq)]);
    let kernel = at::entry(Kernel::BwdDq, c.d, sfx);
    launch(
        &kernel,
        at::bwd_dq(c.b, c.h, c.tq, c.tk, c.d).unwrap(),
        &args,
    )
    .unwrap_or_else(|e| panic!("{kernel} {name}: {e}"));
    let mut args = common(c, dv);
    args.extend([
        Arg::Buf(&gb),
        Arg::Buf(&lb),
        Arg::Buf(&dvec),
        Arg::Buf(&dk),
        Arg::Buf(&dvv),
    ]);
    let kernel = at::entry(Kernel::BwdDkdv, c.d, sfx);
    launch(
        &kernel,
        at::bwd_dkdv(c.b, c.h, c.tq, c.tk, c.d).unwrap(),
        &args,
    )
    .unwrap_or_else(|e| panic!("{kernel} {name}: {e}"));
    [st.download(&dq), st.download(&dk), st.download(&dvv)]
}

/// The CPU op (f32) on the same values: (o, lse).
fn cpu_fwd(c: &Case, q: &[f32], k: &[f32], v: &[f32]) -> (Tensor, Tensor) {
    let (qs, ks) = ([c.b, c.tq, c.h, c.d], [c.b, c.tk, c.h, c.d]);
    attention_with_lse(
        &tensor(q, &qs),
        &tensor(k, &ks),
        &tensor(v, &ks),
        &c.params(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", c.name()))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

/// Rows of padding (inside key_skip) must be exact zeros with lse -inf, on both sides.
fn check_padding(c: &Case, o: &[f64], lse: &[f64]) {
    for (b, &skip) in c.skip.iter().enumerate() {
        for t in 0..c.tq {
            if c.q_start + t >= skip {
                continue;
            }
            for h in 0..c.h {
                let row = ((b * c.tq + t) * c.h + h) * c.d;
                assert!(
                    o[row..row + c.d].iter().all(|&x| x == 0.0),
                    "{}: padding row {t}",
                    c.name()
                );
                assert_eq!(
                    lse[(b * c.h + h) * c.tq + t],
                    f64::NEG_INFINITY,
                    "{}",
                    c.name()
                );
            }
        }
    }
}

fn seeded(c: &Case, salt: u64) -> u64 {
    (c.tq * 1_000_003 + c.tk * 1009 + c.d * 31 + c.b * 7 + c.h) as u64 * 16 + salt
}

/// Forward (f32 or rounded storage) of one case through the forward tiles and through the decode
/// kernels (split and unsplit): o and lse against the CPU op.
fn forward_case(st: St, c: &Case) {
    let (nq, nk) = (c.b * c.tq * c.h * c.d, c.b * c.tk * c.h * c.d);
    let q = inputs(nq, seeded(c, 1), st);
    let k = inputs(nk, seeded(c, 2), st);
    let v = inputs(nk, seeded(c, 3), st);
    let (o_cpu, lse_cpu) = cpu_fwd(c, &q, &k, &v);
    let want_o: Vec<f64> = values(&o_cpu).iter().map(|&x| st.round(x) as f64).collect();
    let want_lse: Vec<f64> = values(&lse_cpu).iter().map(|&x| x as f64).collect();
    let dv = upload(st, c, &q, &k, &v);
    let mut runs = vec![("fwd", false, 1)];
    if at::use_decode(c.tq) {
        runs.extend([("decode", true, 1), ("decode split", true, 3)]);
    }
    for (what, decode, splits) in runs {
        let (o, lse) = run_fwd(st, c, &dv, decode, splits);
        let name = format!("{what} {} {}", st.suffix(), c.name());
        compare(&format!("{name} o"), &o, &want_o, st.tol()).unwrap();
        // lse is f32 whatever the storage: the f32 tolerance
        compare(&format!("{name} lse"), &lse, &want_lse, Tol::F32).unwrap();
        check_padding(c, &o, &lse);
    }
}

/// Backward of one case: dq, dk, dv against the CPU op's. f32: the kernels' own forward feeds
/// their backward (the whole chain); f16/bf16: both sides take the CPU output rounded to storage
/// and the CPU lse, so a flipped rounding of o cannot masquerade as a gradient error.
fn backward_case(st: St, c: &Case) {
    let (nq, nk) = (c.b * c.tq * c.h * c.d, c.b * c.tk * c.h * c.d);
    let q = inputs(nq, seeded(c, 4), st);
    let k = inputs(nk, seeded(c, 5), st);
    let v = inputs(nk, seeded(c, 6), st);
    let g = inputs(nq, seeded(c, 7), st);
    let (o_cpu, lse_cpu) = cpu_fwd(c, &q, &k, &v);
    let dv = upload(st, c, &q, &k, &v);
    let (o_in, lse_in): (Vec<f32>, Vec<f32>) = if st == St::F32 {
        let (o, l) = run_fwd(st, c, &dv, false, 1);
        (
            o.iter().map(|&x| x as f32).collect(),
            l.iter().map(|&x| x as f32).collect(),
        )
    } else {
        (
            values(&o_cpu).iter().map(|&x| st.round(x)).collect(),
            values(&lse_cpu),
        )
    };
    let got = run_bwd(st, c, &dv, &o_in, &lse_in, &g);
    let (qs, ks) = ([c.b, c.tq, c.h, c.d], [c.b, c.tk, c.h, c.d]);
    let o_ref = if st == St::F32 {
        o_cpu.clone()
    } else {
        tensor(&o_in, &qs)
    };
    let (dq, dk, dvv) = attention_backward(
        &tensor(&q, &qs),
        &tensor(&k, &ks),
        &tensor(&v, &ks),
        &o_ref,
        &lse_cpu,
        &tensor(&g, &qs),
        &c.params(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", c.name()));
    // f32: the gradients pass through dS = P (dP - rowsum(dO O)), a difference of O(1) terms;
    // the CPU op and the kernels sum in different orders, so allow 2e-5 absolute
    let tol = if st == St::F32 {
        Tol::new(2e-5, 1e-4)
    } else {
        st.tol()
    };
    for (what, got, want) in [
        ("dq", &got[0], dq),
        ("dk", &got[1], dk),
        ("dv", &got[2], dvv),
    ] {
        let want: Vec<f64> = values(&want).iter().map(|&x| st.round(x) as f64).collect();
        let name = format!("bwd {} {} {what}", st.suffix(), c.name());
        compare(&name, got, &want, tol).unwrap();
    }
    // padding rows give and get nothing
    for (b, &skip) in c.skip.iter().enumerate() {
        for t in 0..c.tq.min(skip.saturating_sub(c.q_start)) {
            let row = (b * c.tq + t) * c.h * c.d;
            assert!(
                got[0][row..row + c.h * c.d].iter().all(|&x| x == 0.0),
                "{}: dq row {t}",
                c.name()
            );
        }
        for t in 0..c.tk.min(skip) {
            let row = (b * c.tk + t) * c.h * c.d;
            assert!(
                got[1][row..row + c.h * c.d].iter().all(|&x| x == 0.0),
                "{}: dk row {t}",
                c.name()
            );
            assert!(
                got[2][row..row + c.h * c.d].iter().all(|&x| x == 0.0),
                "{}: dv row {t}",
                c.name()
            );
        }
    }
}

// ------------------------------------------------------------------------------------ tests

#[test]
fn forward_matches_the_cpu_op_f32() {
    let _g = no_grad();
    for d in at::HEAD_DIMS.iter().copied() {
        for c in train_cases(d) {
            forward_case(St::F32, &c);
        }
    }
}

#[test]
fn backward_matches_the_cpu_op_f32() {
    let _g = no_grad();
    for d in at::HEAD_DIMS.iter().copied() {
        for c in train_cases(d) {
            backward_case(St::F32, &c);
        }
    }
}

#[test]
fn half_storage_matches_the_cpu_op() {
    use AttnPattern::*;
    let _g = no_grad();
    for st in [St::F16, St::Bf16] {
        for d in at::HEAD_DIMS.iter().copied() {
            for c in [
                full(2, 2, d, 17, Causal, &[3, 0]),
                full(1, 1, d, 15, DoubleStaircase { n: 3, k: 2 }, &[]),
            ] {
                forward_case(st, &c);
                backward_case(st, &c);
            }
        }
    }
}

/// KV-cached steps: queries [n_new | hints] at q_start = cache length over a cache with spare
/// rows, through the decode kernels (one split, several, as many as the plan wants) and the
/// forward tiles, against the full computation: the CPU op over the whole sequence (q_start 0,
/// the cached rows' queries included), whose last Tq rows the step must reproduce.
#[test]
fn decode_matches_the_full_computation() {
    let _g = no_grad();
    for st in [St::F32, St::Bf16] {
        for d in at::HEAD_DIMS.iter().copied() {
            // (B, H, cached rows, step rows, key_skip)
            for (b, h, len, tq, skip) in [
                (1, 3, 16, 1, vec![]),
                (2, 2, 60, 5, vec![7, 0]),
                (2, 1, 100, 8, vec![0, 30]),
            ] {
                let tk = len + tq;
                let fullc = full(b, h, d, tk, AttnPattern::Causal, &skip);
                let salt = (len * 100 + tq) as u64;
                let q_all = inputs(b * tk * h * d, salt + 1, st);
                let k = inputs(b * tk * h * d, salt + 2, st);
                let v = inputs(b * tk * h * d, salt + 3, st);
                let (o_full, lse_full) = cpu_fwd(&fullc, &q_all, &k, &v);
                let (o_full, lse_full) = (values(&o_full), values(&lse_full));
                // the step's queries: the last tq rows of every sequence
                let row = h * d;
                let mut q = Vec::with_capacity(b * tq * row);
                let (mut want_o, mut want_lse) = (vec![], vec![]);
                for bi in 0..b {
                    let r = (bi * tk + len) * row..(bi * tk + tk) * row;
                    q.extend_from_slice(&q_all[r.clone()]);
                    want_o.extend(o_full[r].iter().map(|&x| st.round(x) as f64));
                }
                for bh in 0..b * h {
                    want_lse.extend(
                        lse_full[bh * tk + len..bh * tk + tk]
                            .iter()
                            .map(|&x| x as f64),
                    );
                }
                let c = Case {
                    tq,
                    q_start: len,
                    ..fullc.clone()
                };
                // k, v as a cache with 3 spare rows per sequence (NaN), as KvCache holds them
                let dv = upload(st, &c, &q, &k, &v);
                for (what, decode, splits) in [
                    ("decode 1 split", true, 1),
                    ("decode 3 splits", true, 3),
                    ("decode planned", true, at::MAX_SPLITS),
                    ("fwd tiles", false, 1),
                ] {
                    let (o, lse) = run_fwd(st, &c, &dv, decode, splits);
                    let name = format!("{what} {} {}", st.suffix(), c.name());
                    compare(&format!("{name} o"), &o, &want_o, st.tol()).unwrap();
                    compare(&format!("{name} lse"), &lse, &f32s(&want_lse), Tol::F32).unwrap();
                    check_padding(&c, &o, &lse);
                }
            }
        }
    }
}

/// The plan really splits: several key chunks on these short caches, and with many heads the
/// decode path would not need to.
#[test]
fn decode_plans_split_short_caches_when_asked() {
    let p = at::decode(2, 2, 5, 65, 64, 3).unwrap();
    assert_eq!((p.nsplit, p.chunk), (2, 64), "{p:?}");
    let p = at::decode(2, 2, 5, 65, 128, 3).unwrap();
    assert_eq!(p.nsplit, 3, "{p:?}");
    assert!(p.combine.is_some());
    let p = at::decode(2, 1, 8, 108, 128, 3).unwrap();
    assert_eq!((p.nsplit, p.chunk), (2, 64), "{p:?}");
}
