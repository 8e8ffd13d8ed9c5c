//! Harness cases of the key-range attention op: every section-5 pattern, the KV-cached step,
//! the double staircase's second pass, key_skip, and strided (packed qkv, head-major) inputs.
//! The reference re-derives visibility from the KFORCING.md section 5 definitions (it does not
//! call `key_ranges`) and computes softmax(QKᵀ·scale) V with naive f64 loops.
//! Dimensions: B batch, Tq query rows, Tk keys, H heads, D head dim; N context, k hints.

use crate::harness::{filled, refusing, Case, Gen, Input};
use kf_engine::Tensor;
use kf_ops::attention::{rope_attention, AttnParams, AttnPattern};

/// How the inputs reach the op.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// q [B, Tq, H, D], k and v [B, Tk, H, D], contiguous.
    Separate,
    /// One [B, T, 3H, D] input (the [B, T, 3, H, D] qkv layout) narrowed into strided q, k, v.
    Packed,
    /// q, k, v stored [B, H, T, D] and passed as transposed [B, T, H, D] views.
    HeadMajor,
}

#[derive(Clone, Debug)]
struct Spec {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    d: usize,
    pattern: AttnPattern,
    q_start: usize,
    scale: f64,
    key_skip: Vec<usize>,
    layout: Layout,
    /// Heads of k and v (grouped-query attention when below `h`; Separate layout only).
    hk: usize,
}

impl Spec {
    /// A training pass (queries = all key rows) of `pattern` over `tk` keys.
    fn full(b: usize, h: usize, d: usize, pattern: AttnPattern, tk: usize) -> Spec {
        Spec {
            b,
            tq: tk,
            tk,
            h,
            d,
            pattern,
            q_start: 0,
            scale: 1.0 / (d as f64).sqrt(),
            key_skip: vec![],
            layout: Layout::Separate,
            hk: h,
        }
    }
    fn stair(b: usize, h: usize, d: usize, n: usize, k: usize) -> Spec {
        Spec::full(b, h, d, AttnPattern::Staircase { n, k }, n + n * k)
    }
    /// A staircase with `m` blocks of hints (m noise windows per context position).
    fn stair_blocks(b: usize, h: usize, d: usize, n: usize, k: usize, m: usize) -> Spec {
        Spec::full(b, h, d, AttnPattern::Staircase { n, k }, n + m * n * k)
    }
    fn double(b: usize, h: usize, d: usize, n: usize, k: usize) -> Spec {
        Spec::full(
            b,
            h,
            d,
            AttnPattern::DoubleStaircase { n, k },
            n + 2 * n * k,
        )
    }
    /// Queries are the last `tq` key rows.
    fn tail(mut self, tq: usize) -> Spec {
        self.q_start = self.tk - tq;
        self.tq = tq;
        self
    }
    fn skip(mut self, s: Vec<usize>) -> Spec {
        self.key_skip = s;
        self
    }
    fn scale(mut self, s: f64) -> Spec {
        self.scale = s;
        self
    }
    fn layout(mut self, l: Layout) -> Spec {
        self.layout = l;
        self
    }
    /// Grouped-query attention: `hk` key/value heads shared by the `h` query heads.
    fn gqa(mut self, hk: usize) -> Spec {
        self.hk = hk;
        self
    }

    fn params(&self) -> AttnParams {
        AttnParams {
            pattern: self.pattern,
            q_start: self.q_start,
            scale: self.scale,
            key_skip: self.key_skip.clone(),
        }
    }

    fn name(&self) -> String {
        let pat = match self.pattern {
            AttnPattern::Causal => "causal".to_string(),
            AttnPattern::Staircase { n, k } => format!("staircase N={n} k={k}"),
            AttnPattern::DoubleStaircase { n, k } => format!("double N={n} k={k}"),
        };
        let mut s = format!(
            "attention {pat} B={} Tq={} Tk={} H={} D={}",
            self.b, self.tq, self.tk, self.h, self.d
        );
        if self.q_start > 0 {
            s += &format!(" q_start={}", self.q_start);
        }
        if !self.key_skip.is_empty() {
            s += &format!(" skip={:?}", self.key_skip);
        }
        if self.layout != Layout::Separate {
            s += &format!(" {:?}", self.layout);
        }
        if self.hk != self.h {
            s += &format!(" Hk={}", self.hk);
        }
        s
    }

    fn inputs(&self, g: &mut Gen) -> Vec<Input> {
        let (b, h, d) = (self.b, self.h, self.d);
        match self.layout {
            Layout::Separate => {
                let hk = self.hk;
                vec![
                    Input::float(&[b, self.tq, h, d], g.normal_vec(b * self.tq * h * d, 1.0)),
                    Input::float(
                        &[b, self.tk, hk, d],
                        g.normal_vec(b * self.tk * hk * d, 1.0),
                    ),
                    Input::float(
                        &[b, self.tk, hk, d],
                        g.normal_vec(b * self.tk * hk * d, 1.0),
                    ),
                ]
            }
            Layout::Packed => vec![Input::float(
                &[b, self.tk, 3 * h, d],
                g.normal_vec(b * self.tk * 3 * h * d, 1.0),
            )],
            Layout::HeadMajor => vec![
                Input::float(&[b, h, self.tq, d], g.normal_vec(b * self.tq * h * d, 1.0)),
                Input::float(&[b, h, self.tk, d], g.normal_vec(b * self.tk * h * d, 1.0)),
                Input::float(&[b, h, self.tk, d], g.normal_vec(b * self.tk * h * d, 1.0)),
            ],
        }
    }

    /// The op's q, k, v from the case's tensors.
    fn qkv(&self, t: &[Tensor]) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
        Ok(match self.layout {
            Layout::Separate => (t[0].clone(), t[1].clone(), t[2].clone()),
            Layout::Packed => (
                t[0].narrow(2, 0, self.h)?,
                t[0].narrow(2, self.h, self.h)?,
                t[0].narrow(2, 2 * self.h, self.h)?,
            ),
            Layout::HeadMajor => (
                t[0].transpose(1, 2)?,
                t[1].transpose(1, 2)?,
                t[2].transpose(1, 2)?,
            ),
        })
    }

    /// Element (b, t, h, dd) of q (which = 0), k (1) or v (2) in the flat inputs.
    fn at(&self, x: &[Vec<f64>], which: usize, b: usize, t: usize, h: usize, dd: usize) -> f64 {
        let (nh, d) = (self.h, self.d);
        let tl = if which == 0 { self.tq } else { self.tk };
        match self.layout {
            Layout::Separate if which > 0 => {
                let hk = self.hk;
                x[which][((b * tl + t) * hk + h / (nh / hk)) * d + dd]
            }
            Layout::Separate => x[which][((b * tl + t) * nh + h) * d + dd],
            Layout::HeadMajor => x[which][((b * nh + h) * tl + t) * d + dd],
            Layout::Packed => x[0][((b * self.tk + t) * 3 * nh + which * nh + h) * d + dd],
        }
    }

    /// Number of (query row, key) pairs that are visible, per (b, h).
    fn pairs(&self, b: usize) -> usize {
        let skip = self.key_skip.get(b).copied().unwrap_or(0);
        (0..self.tq)
            .map(|qi| {
                (skip..self.tk)
                    .filter(|&c| sees(self.pattern, self.q_start + qi, c))
                    .count()
            })
            .sum()
    }
}

/// Where row `idx` of a staircase sequence sits: context position, or hint `i` (1-based) of the
/// window after context position `t` in pass 1 (staircase hints / F1) or pass 2 (F2); for a
/// staircase with several blocks of hints, `pass` is the block.
#[derive(Clone, Copy)]
enum Slot {
    Ctx(usize),
    Hint { pass: usize, t: usize, i: usize },
}

fn slot(n: usize, k: usize, idx: usize) -> Slot {
    if idx < n {
        return Slot::Ctx(idx);
    }
    let j = idx - n;
    let within = j % (n * k);
    Slot::Hint {
        pass: 1 + j / (n * k),
        t: within / k,
        i: within % k + 1,
    }
}

/// Whether query row `row` sees key `col` (section 5, written out case by case).
fn sees(pattern: AttnPattern, row: usize, col: usize) -> bool {
    let (n, k) = match pattern {
        AttnPattern::Causal => return col <= row,
        AttnPattern::Staircase { n, k } | AttnPattern::DoubleStaircase { n, k } => (n, k),
    };
    match (slot(n, k, row), slot(n, k, col)) {
        // context rows: causal over the context only
        (Slot::Ctx(r), Slot::Ctx(c)) => c <= r,
        (Slot::Ctx(_), Slot::Hint { .. }) => false,
        // a window's rows see the context up to its own position t
        (Slot::Hint { t, .. }, Slot::Ctx(c)) => c <= t,
        (
            Slot::Hint {
                pass: pr,
                t: tr,
                i: ir,
            },
            Slot::Hint {
                pass: pc,
                t: tc,
                i: ic,
            },
        ) => {
            // same window only; same pass: causal 1..=i; F2 sees all of its F1; the blocks
            // of a staircase do not see each other
            let double = matches!(pattern, AttnPattern::DoubleStaircase { .. });
            tr == tc
                && (if pr == pc {
                    ic <= ir
                } else {
                    double && pc < pr
                })
        }
    }
}

/// softmax(q kᵀ scale + mask) v over the visible keys, naive f64.
fn reference(s: &Spec, x: &[Vec<f64>]) -> Vec<f64> {
    let (d, nh) = (s.d, s.h);
    let mut out = vec![0.0; s.b * s.tq * nh * d];
    for b in 0..s.b {
        let skip = s.key_skip.get(b).copied().unwrap_or(0);
        for qi in 0..s.tq {
            let row = s.q_start + qi;
            for h in 0..nh {
                let keys: Vec<usize> = (skip..s.tk).filter(|&c| sees(s.pattern, row, c)).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&c| {
                        let dot: f64 = (0..d)
                            .map(|e| s.at(x, 0, b, qi, h, e) * s.at(x, 1, b, c, h, e))
                            .sum();
                        dot * s.scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|z| (z - m).exp()).collect();
                let total: f64 = w.iter().sum();
                let o = &mut out[((b * s.tq + qi) * nh + h) * d..][..d];
                for (&c, wc) in keys.iter().zip(&w) {
                    for (e, oe) in o.iter_mut().enumerate() {
                        *oe += wc / total * s.at(x, 2, b, c, h, e);
                    }
                }
            }
        }
    }
    out
}

/// The attention kernels have instances for head dims 64 and 128; on a kernel device other
/// head dims must be a clear error.
fn kernel_head_dim(d: usize) -> bool {
    kf_ops::kdev::launch::check_head_dim(d).is_ok()
}

fn case(s: Spec, seed: u64, grad: bool) -> Case {
    let mut g = Gen::new(seed);
    let inputs = s.inputs(&mut g);
    let n_in = inputs.len();
    let pairs: usize = (0..s.b).map(|b| s.pairs(b)).sum::<usize>() * s.h;
    let flops = 4.0 * (pairs * s.d) as f64;
    let bytes = 4.0 * (s.d * s.h * s.b * (2 * s.tq + 2 * s.tk)) as f64;
    let (sf, sr) = (s.clone(), s.clone());
    let c = Case::new(
        s.name(),
        inputs,
        move |t| {
            let (q, k, v) = sf.qkv(t)?;
            Ok(vec![kf_ops::attention::attention(
                &q,
                &k,
                &v,
                &sf.params(),
            )?])
        },
        move |x| vec![reference(&sr, x)],
    )
    .cost(flops, bytes)
    .on_kernels(kernel_head_dim(s.d));
    if grad {
        c.grad(&(0..n_in).collect::<Vec<_>>())
    } else {
        c
    }
}

/// The attention family: `attention` and the fused `rope_attention` (which has no registry
/// entry of its own: its cases run under `attention`).
pub fn attention() -> Vec<Case> {
    refusing(
        {
            let mut out = attention_cases();
            out.extend(rope_attention_cases());
            out
        },
        [Case::refused(
            "attention k [1, 5, 1, 8] for q, v [1, 4, 1, 8]",
            vec![
                filled(&[1, 4, 1, 8]),
                filled(&[1, 5, 1, 8]),
                filled(&[1, 4, 1, 8]),
            ],
            |t| {
                let p = AttnParams {
                    pattern: AttnPattern::Causal,
                    q_start: 0,
                    scale: 0.35,
                    key_skip: vec![],
                };
                Ok(vec![kf_ops::attention::attention(&t[0], &t[1], &t[2], &p)?])
            },
            "attention",
        )],
    )
}

fn attention_cases() -> Vec<Case> {
    let causal = |b, h, d, t| Spec::full(b, h, d, AttnPattern::Causal, t);
    let grad_specs = vec![
        // grouped-query attention (Llama family): 4 query heads on 2 and on 1 K/V heads
        causal(1, 4, 8, 6).gqa(2),
        causal(2, 3, 4, 5).gqa(1),
        // plain causal
        causal(1, 1, 2, 1),
        causal(2, 2, 4, 5),
        causal(1, 2, 8, 7).scale(0.7),
        // KV-cached step: cache 5, 2 new tokens + 2 hints
        causal(2, 1, 4, 9).tail(4),
        // left-padded prompts in batched generation: key_skip on a cached step
        causal(2, 2, 4, 9).tail(3).skip(vec![0, 4]),
        // staircase
        Spec::stair(1, 1, 2, 1, 1),
        Spec::stair(2, 1, 4, 2, 3),
        Spec::stair(1, 2, 8, 3, 2),
        Spec::stair(1, 1, 4, 5, 1),
        Spec::stair(1, 2, 2, 5, 3),
        // hint rows only, with key_skip (windows with t < skip see only their own hints)
        Spec::stair(2, 1, 4, 3, 2).tail(6).skip(vec![1, 2]),
        // several noise windows per context position: 2 and 3 blocks of hints
        Spec::stair_blocks(1, 1, 4, 3, 2, 2),
        Spec::stair_blocks(2, 2, 2, 4, 1, 3),
        // double staircase, full and the second pass that reuses the context K/V
        Spec::double(1, 1, 2, 1, 1),
        Spec::double(1, 2, 4, 2, 2),
        Spec::double(2, 1, 8, 3, 1),
        Spec::double(1, 1, 4, 2, 3).tail(12),
        Spec::double(2, 1, 2, 3, 2).tail(12).skip(vec![2, 0]),
        // several query tiles and key blocks through the backward
        causal(1, 1, 2, 70),
        Spec::stair(1, 1, 2, 14, 4),
        // strided inputs read in place
        causal(1, 2, 4, 5).layout(Layout::Packed),
        Spec::stair(1, 2, 2, 2, 2).layout(Layout::Packed),
        Spec::double(1, 2, 4, 2, 1).layout(Layout::HeadMajor),
        causal(2, 1, 4, 6).tail(3).layout(Layout::HeadMajor),
    ];
    // Real head dims; lengths that are not multiples of the 32-row / 64-key tiles.
    let fwd_specs = vec![
        causal(1, 2, 64, 130),
        // SmolLM2's shapes: 9 query heads on 3 K/V heads; a prefill, a decode step with
        // left padding, a PFLM step of k + 1 rows
        causal(1, 9, 64, 70).gqa(3),
        causal(2, 9, 64, 40).gqa(3).tail(1).skip(vec![0, 6]),
        causal(1, 9, 64, 77).gqa(3).tail(5),
        causal(2, 1, 128, 37),
        causal(1, 1, 64, 1),
        Spec::stair(1, 2, 64, 26, 4),
        Spec::stair(1, 1, 128, 37, 1),
        Spec::double(1, 1, 128, 10, 3),
        Spec::double(1, 2, 64, 13, 2).tail(52),
        causal(2, 2, 64, 130).tail(37).skip(vec![0, 50]),
        causal(1, 2, 64, 130).layout(Layout::Packed),
        Spec::stair(1, 1, 64, 13, 4).layout(Layout::HeadMajor),
        Spec::stair_blocks(1, 2, 64, 20, 1, 4),
    ];
    let mut out = vec![];
    for (i, s) in grad_specs.into_iter().enumerate() {
        out.push(case(s, 100 + i as u64, true));
    }
    for (i, s) in fwd_specs.into_iter().enumerate() {
        out.push(case(s, 200 + i as u64, false));
    }
    out
}

/// The fused op `rope_attention(qkv [B, T, 3, H, D], pos)` against the composed references:
/// `rope_ref` of the q and k blocks, then the attention reference on (q, k, v). Gradients are
/// checked with respect to qkv (the one [B, T, 3, H, D] gradient the op writes).
fn rope_attention_case(s: Spec, batched_pos: bool, seed: u64, grad: bool) -> Case {
    use super::norm::{plain_rope, rope_ref};
    assert!(s.tq == s.tk && s.q_start == 0 && s.layout == Layout::Separate);
    let (b, t, h, d) = (s.b, s.tk, s.h, s.d);
    let mut g = Gen::new(seed);
    let qkv = g.normal_vec(b * t * 3 * h * d, 1.0);
    let np = if batched_pos { b * t } else { t };
    // positions: in order for [T] (the training pass), arbitrary with repeats for [B, T]
    let pos: Vec<u32> = if batched_pos {
        (0..np).map(|_| g.below(300) as u32).collect()
    } else {
        (0..np as u32).collect()
    };
    let pshape = if batched_pos { vec![b, t] } else { vec![t] };
    let name = format!(
        "rope_attention {} pos={}",
        s.name().trim_start_matches("attention "),
        if batched_pos { "[B,T]" } else { "[T]" }
    );
    let pairs: usize = (0..b).map(|bb| s.pairs(bb)).sum::<usize>() * h;
    let flops = 4.0 * (pairs * d) as f64 + 6.0 * (b * t * h * d) as f64;
    let bytes = 4.0 * (d * h * b * 4 * t) as f64;
    let (sf, sr) = (s.clone(), s.clone());
    let c = Case::new(
        name,
        vec![
            Input::float(&[b, t, 3, h, d], qkv),
            Input::index(&pshape, pos),
        ],
        move |ts| {
            Ok(vec![rope_attention(
                &ts[0],
                &ts[1],
                &plain_rope(),
                &sf.params(),
            )?])
        },
        move |x| {
            let part = |i: usize| -> Vec<f64> {
                x[0].chunks(3 * h * d)
                    .flat_map(|r| r[i * h * d..(i + 1) * h * d].to_vec())
                    .collect()
            };
            let shape = [b, t, h, d];
            let q = rope_ref(&part(0), &x[1], shape, batched_pos, None);
            let k = rope_ref(&part(1), &x[1], shape, batched_pos, None);
            vec![reference(&sr, &[q, k, part(2)])]
        },
    )
    .cost(flops, bytes)
    .on_kernels(kernel_head_dim(d));
    if grad {
        c.grad(&[0])
    } else {
        c
    }
}

fn rope_attention_cases() -> Vec<Case> {
    let causal = |b, h, d, t| Spec::full(b, h, d, AttnPattern::Causal, t);
    let grad_specs = vec![
        (causal(1, 1, 2, 1), false),
        (causal(2, 2, 4, 5), false),
        (causal(1, 2, 8, 7).scale(0.7), true),
        (Spec::stair(1, 2, 4, 2, 2), true),
        // several query tiles and key blocks through the backward
        (causal(1, 1, 2, 70), false),
    ];
    let fwd_specs = vec![
        (causal(2, 4, 64, 130), false),
        (causal(1, 2, 128, 37), true),
    ];
    let mut out = vec![];
    for (i, (s, bp)) in grad_specs.into_iter().enumerate() {
        out.push(rope_attention_case(s, bp, 300 + i as u64, true));
    }
    for (i, (s, bp)) in fwd_specs.into_iter().enumerate() {
        out.push(rope_attention_case(s, bp, 400 + i as u64, false));
    }
    out
}
