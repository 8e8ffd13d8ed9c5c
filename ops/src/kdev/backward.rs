//! Backward and optimiser launchers on a [`KernelDevice`] (f32 storage, `<op>_f32` entry
//! points): LayerNorm (dx, dw/db with the partial-sum reduce), the embedding's deterministic
//! scatter-add, RoPE, GELU (tanh and erf), softmax, cross-entropy (forward with the saved
//! log-sum-exp, mean, backward), attention (rowsum, dQ, dK/dV), the reduce family (column
//! sums for biases, the sum of squares of a gradient list), AdamW, and the GEMM backward of a
//! linear layer through [`KernelDevice::gemm`] with transposes. Like [`super::launch`], each
//! launcher checks shapes and dtypes first and names the op in its errors.
//! Letters: R rows, D features, C columns, V vocabulary / softmax width, N positions,
//! B batch, T rows of a sequence, H heads, Dh head dim.

use super::launch::{
    attn_common_args, key_skip_tensor, run, same_shape_binary, AttnDims, AttnView,
};
use super::{DTensor, GemmSpec, KArg, KernelDevice};
use crate::attention::AttnParams;
use anyhow::{ensure, Context, Result};
use kf_engine::DType;
use kf_kernels::{
    adamw, attention as at, cross_entropy as ce, elementwise, embedding as emb, gelu,
    layernorm_bwd, reduce, rope, softmax,
};

type Out = Result<DTensor>;

fn f32_in(op: &str, what: &str, t: &DTensor) -> Result<()> {
    t.expect_dtype(op, what, DType::F32)
}

/// (rows, last dim) of a tensor of rank >= 1.
fn rows_cols(op: &str, t: &DTensor) -> Result<(usize, usize)> {
    ensure!(
        t.rank() >= 1,
        "{op}: input must have at least one dimension"
    );
    let c = *t.shape().last().unwrap();
    Ok((t.numel() / c.max(1), c))
}

fn same_shape(op: &str, a: &DTensor, b: &DTensor) -> Result<()> {
    ensure!(
        a.shape() == b.shape(),
        "{op}: shapes {:?} and {:?} differ",
        a.shape(),
        b.shape()
    );
    Ok(())
}

fn u32_fits(op: &str, vals: &[usize]) -> Result<()> {
    ensure!(
        vals.iter().all(|&v| v <= u32::MAX as usize),
        "{op}: sizes {vals:?} past u32"
    );
    Ok(())
}

// ------------------------------------------------------------------ reduce

/// Column sums of `x [.., C]` over all rows: `[C]` (f32 accumulation, fixed order).
pub fn colsum<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor) -> Out {
    let op = "colsum";
    f32_in(op, "x", x)?;
    let (rows, cols) = rows_cols(op, x)?;
    u32_fits(op, &[rows, cols])?;
    let out = DTensor::uninit(dev, &[cols], DType::F32)?;
    if cols == 0 {
        return Ok(out);
    }
    let (cfg, chunk, k) = reduce::colsum_config(rows, cols);
    if k == 1 {
        run(
            dev,
            "colsum_f32",
            cfg,
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&out.buf),
                KArg::U32(rows as u32),
                KArg::U32(cols as u32),
                KArg::U32(chunk),
            ],
        )?;
    } else {
        let part = DTensor::uninit(dev, &[k as usize, cols], DType::F32)?;
        run(
            dev,
            "colsum_f32",
            cfg,
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&part.buf),
                KArg::U32(rows as u32),
                KArg::U32(cols as u32),
                KArg::U32(chunk),
            ],
        )?;
        run(
            dev,
            "colsum_finish_f32",
            reduce::colsum_finish_config(cols),
            &[
                KArg::Buf(&part.buf),
                KArg::Buf(&out.buf),
                KArg::U32(cols as u32),
                KArg::U32(k),
            ],
        )?;
    }
    Ok(out)
}

/// The sum of squares of every element of `xs` (f32 tensors): `[1]` on the device.
pub fn sumsq<D: KernelDevice + ?Sized>(dev: &D, xs: &[&DTensor]) -> Out {
    let op = "sumsq";
    for (i, x) in xs.iter().enumerate() {
        f32_in(op, &format!("buffer {i}"), x)?;
    }
    let lens: Vec<usize> = xs.iter().map(|x| x.numel()).collect();
    let (slots, p) = reduce::sumsq_slots(&lens);
    let part = DTensor::uninit(dev, &[(p as usize).max(1)], DType::F32)?;
    for ((x, &slot), &n) in xs.iter().zip(&slots).zip(&lens) {
        run(
            dev,
            "sumsq_f32",
            reduce::sumsq_config(n),
            &[
                KArg::Buf(&x.buf),
                KArg::U64(n as u64),
                KArg::Buf(&part.buf),
                KArg::U32(slot),
            ],
        )?;
    }
    let out = DTensor::uninit(dev, &[1], DType::F32)?;
    run(
        dev,
        "sumsq_finish_f32",
        reduce::sumsq_finish_config(),
        &[KArg::Buf(&part.buf), KArg::U32(p), KArg::Buf(&out.buf)],
    )?;
    Ok(out)
}

// ------------------------------------------------------------------ elementwise helpers

/// `s * x` into a new tensor (the elementwise `scale` kernel).
pub fn scale<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, s: f32) -> Out {
    f32_in("scale", "x", x)?;
    let n = x.numel();
    let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
    run(
        dev,
        "scale_f32",
        elementwise::config(n),
        &[
            KArg::Buf(&x.buf),
            KArg::Buf(&out.buf),
            KArg::F32(s),
            KArg::U64(n as u64),
        ],
    )?;
    Ok(out)
}

// ------------------------------------------------------------------ linear (GEMM backward)

/// Gradients of `y = x wᵀ (+ b)` with `x [R, in]` (any shape of R * in elements), `w [out, in]`, from `g [.., out]`:
/// `dx = g w` (shape of x), `dw = gᵀ x` ([out, in]), `db = colsum(g)` (when `bias`).
pub struct LinearGrads {
    pub dx: DTensor,
    pub dw: DTensor,
    pub db: Option<DTensor>,
}

pub fn linear_bwd<D: KernelDevice + ?Sized>(
    dev: &D,
    x: &DTensor,
    w: &DTensor,
    g: &DTensor,
    bias: bool,
) -> Result<LinearGrads> {
    let op = "linear_bwd";
    f32_in(op, "x", x)?;
    f32_in(op, "weight", w)?;
    f32_in(op, "grad", g)?;
    ensure!(
        w.rank() == 2,
        "{op}: weight must be [out, in], got {:?}",
        w.shape()
    );
    let (o, i) = (w.shape()[0], w.shape()[1]);
    // rows from g; x may have any shape of rows * in elements (e.g. attention's
    // [B, T, H, Dh] output read as [N, d]); dx takes x's shape
    let (rows, gout) = rows_cols(op, g)?;
    ensure!(
        gout == o && x.numel() == rows * i,
        "{op}: x {:?}, weight {:?} and grad {:?} do not fit",
        x.shape(),
        w.shape(),
        g.shape()
    );
    let dx = DTensor::uninit(dev, x.shape(), DType::F32)?;
    let dw = DTensor::uninit(dev, &[o, i], DType::F32)?;
    // dx [R, in] = g [R, out] · w [out, in]
    gemm(dev, &GemmSpec::simple(rows, i, o, false), g, w, &dx).context(op)?;
    // dw [out, in] = gᵀ (g stored [R, out]) · x [R, in]
    let spec = GemmSpec {
        trans_a: true,
        lda: o,
        ..GemmSpec::simple(o, i, rows, false)
    };
    gemm(dev, &spec, g, x, &dw).context(op)?;
    let db = if bias { Some(colsum(dev, g)?) } else { None };
    Ok(LinearGrads { dx, dw, db })
}

/// The GEMM of `spec` on f32 tensors, checked against their sizes.
pub fn gemm<D: KernelDevice + ?Sized>(
    dev: &D,
    spec: &GemmSpec,
    a: &DTensor,
    b: &DTensor,
    c: &DTensor,
) -> Result<()> {
    super::launch::matmul_into(dev, spec, a, b, c)
}

// ------------------------------------------------------------------ layernorm

/// Gradients of LayerNorm over the last dimension: `dx` (shape of x), `dw [D]`, `db [D]`
/// (when `bias`), from the forward's saved per-row `mean` and `rstd`.
pub struct LayerNormGrads {
    pub dx: DTensor,
    pub dw: DTensor,
    pub db: Option<DTensor>,
}

pub fn layer_norm_bwd<D: KernelDevice + ?Sized>(
    dev: &D,
    x: &DTensor,
    w: &DTensor,
    g: &DTensor,
    mean: &DTensor,
    rstd: &DTensor,
    bias: bool,
) -> Result<LayerNormGrads> {
    let op = "layer_norm_bwd";
    for (what, t) in [
        ("x", x),
        ("weight", w),
        ("grad", g),
        ("mean", mean),
        ("rstd", rstd),
    ] {
        f32_in(op, what, t)?;
    }
    same_shape(op, x, g)?;
    let (rows, d) = rows_cols(op, x)?;
    ensure!(d > 0, "{op}: the normalised dimension is empty");
    ensure!(
        w.shape() == [d],
        "{op}: weight {:?} must be [{d}]",
        w.shape()
    );
    ensure!(
        mean.shape() == [rows] && rstd.shape() == [rows],
        "{op}: mean {:?} / rstd {:?} must be [{rows}]",
        mean.shape(),
        rstd.shape()
    );
    u32_fits(op, &[rows, d])?;
    let dx = DTensor::uninit(dev, x.shape(), DType::F32)?;
    let dw = DTensor::uninit(dev, &[d], DType::F32)?;
    let db = if bias {
        Some(DTensor::uninit(dev, &[d], DType::F32)?)
    } else {
        None
    };
    if rows == 0 {
        // no rows: zero weight gradients
        let z = DTensor::zeros(dev, &[d], DType::F32)?;
        return Ok(LayerNormGrads {
            dx,
            dw: z,
            db: if bias {
                Some(DTensor::zeros(dev, &[d], DType::F32)?)
            } else {
                None
            },
        });
    }
    run(
        dev,
        "layernorm_bwd_dx_f32",
        layernorm_bwd::dx_config(rows, d),
        &[
            KArg::Buf(&x.buf),
            KArg::Buf(&w.buf),
            KArg::Buf(&g.buf),
            KArg::Buf(&mean.buf),
            KArg::Buf(&rstd.buf),
            KArg::Buf(&dx.buf),
            KArg::U32(rows as u32),
            KArg::U32(d as u32),
        ],
    )?;
    let (cfg, chunk, k) = layernorm_bwd::dwdb_config(rows, d);
    let direct = k == 1;
    let (pw, pb) = if direct {
        (None, None)
    } else {
        (
            Some(DTensor::uninit(dev, &[k as usize, d], DType::F32)?),
            if bias {
                Some(DTensor::uninit(dev, &[k as usize, d], DType::F32)?)
            } else {
                None
            },
        )
    };
    let tw = pw.as_ref().unwrap_or(&dw);
    let tb = if direct { db.as_ref() } else { pb.as_ref() };
    run(
        dev,
        "layernorm_bwd_dwdb_f32",
        cfg,
        &[
            KArg::Buf(&x.buf),
            KArg::Buf(&g.buf),
            KArg::Buf(&mean.buf),
            KArg::Buf(&rstd.buf),
            KArg::Buf(&tw.buf),
            tb.map_or(KArg::Null, |t| KArg::Buf(&t.buf)),
            KArg::U32(rows as u32),
            KArg::U32(d as u32),
            KArg::U32(chunk),
        ],
    )?;
    if !direct {
        run(
            dev,
            "layernorm_bwd_reduce_f32",
            layernorm_bwd::reduce_config(d),
            &[
                KArg::Buf(&tw.buf),
                tb.map_or(KArg::Null, |t| KArg::Buf(&t.buf)),
                KArg::Buf(&dw.buf),
                db.as_ref().map_or(KArg::Null, |t| KArg::Buf(&t.buf)),
                KArg::U32(d as u32),
                KArg::U32(k),
            ],
        )?;
    }
    Ok(LayerNormGrads { dx, dw, db })
}

// ------------------------------------------------------------------ embedding

/// Gradient of the table `[V, D]` of an embedding gather at u32 `ids [..]` from
/// `g [.., D]`: rows summed in position order (deterministic, no atomics). Ids >= V are an
/// error (checked on the host, as the CPU op does).
pub fn embedding_bwd<D: KernelDevice + ?Sized>(
    dev: &D,
    ids: &DTensor,
    g: &DTensor,
    v: usize,
) -> Out {
    let op = "embedding_bwd";
    ids.expect_dtype(op, "ids", DType::U32)?;
    f32_in(op, "grad", g)?;
    let (n, d) = rows_cols(op, g)?;
    ensure!(
        n == ids.numel(),
        "{op}: {} ids but grad {:?} has {n} rows",
        ids.numel(),
        g.shape()
    );
    u32_fits(op, &[d, v])?;
    if let Some(&bad) = ids
        .to_vec::<D, u32>(dev)?
        .iter()
        .find(|&&i| i as usize >= v)
    {
        anyhow::bail!("{op}: id {bad} outside the table of {v} rows");
    }
    let out = DTensor::uninit(dev, &[v, d], DType::F32)?;
    if v == 0 || d == 0 {
        return Ok(out);
    }
    run(
        dev,
        "embedding_bwd_f32",
        emb::bwd_config(d, v),
        &[
            KArg::Buf(&ids.buf),
            KArg::Buf(&g.buf),
            KArg::Buf(&out.buf),
            KArg::U64(n as u64),
            KArg::U32(d as u32),
            KArg::U32(v as u32),
        ],
    )?;
    Ok(out)
}

// ------------------------------------------------------------------ rope, gelu, softmax

/// Gradient of RoPE: `g [B, T, H, Dh]` contiguous through the inverse rotation with the
/// forward's tables `cos`, `sin` (`[T, Dh/2]` or `[B*T, Dh/2]`); contiguous output.
pub fn rope_bwd<D: KernelDevice + ?Sized>(
    dev: &D,
    g: &DTensor,
    cos: &DTensor,
    sin: &DTensor,
) -> Out {
    let op = "rope_bwd";
    f32_in(op, "grad", g)?;
    f32_in(op, "cos", cos)?;
    f32_in(op, "sin", sin)?;
    ensure!(
        g.rank() == 4,
        "{op}: grad must be [B, T, H, Dh], got {:?}",
        g.shape()
    );
    let s = g.shape();
    let (b, t, h, d) = (s[0], s[1], s[2], s[3]);
    ensure!(d >= 2 && d % 2 == 0, "{op}: head dim {d} must be even");
    let batched = if cos.shape() == [t, d / 2] {
        false
    } else if cos.shape() == [b * t, d / 2] {
        true
    } else {
        anyhow::bail!(
            "{op}: tables {:?} fit neither [T, Dh/2] nor [B*T, Dh/2]",
            cos.shape()
        )
    };
    same_shape(op, cos, sin)?;
    u32_fits(op, &[b, t, h, d])?;
    let out = DTensor::uninit(dev, s, DType::F32)?;
    if g.numel() == 0 {
        return Ok(out);
    }
    run(
        dev,
        "rope_bwd_f32",
        rope::config(b, t, h, d),
        &[
            KArg::Buf(&g.buf),
            KArg::Buf(&cos.buf),
            KArg::Buf(&sin.buf),
            KArg::Buf(&out.buf),
            KArg::U32(b as u32),
            KArg::U32(t as u32),
            KArg::U32(h as u32),
            KArg::U32(d as u32),
            KArg::U64((t * h * d) as u64),
            KArg::U64((h * d) as u64),
            KArg::U64(d as u64),
            KArg::I32(batched as i32),
        ],
    )?;
    Ok(out)
}

/// `entry(x, g, out, n)`: a GELU backward at the forward's input `x`.
fn gelu_bwd<D: KernelDevice + ?Sized>(dev: &D, entry: &str, x: &DTensor, g: &DTensor) -> Out {
    same_shape_binary(dev, entry, entry, gelu::config(x.numel()), x, g)
}

/// Gradient of GELU (tanh approximation) at the forward's input `x`.
pub fn gelu_tanh_bwd<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, g: &DTensor) -> Out {
    gelu_bwd(dev, "gelu_tanh_bwd_f32", x, g)
}

/// Gradient of GELU (erf) at the forward's input `x`.
pub fn gelu_erf_bwd<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, g: &DTensor) -> Out {
    gelu_bwd(dev, "gelu_erf_bwd_f32", x, g)
}

/// Gradient of softmax (or log-softmax) over the last dimension from its output `y`.
pub fn softmax_bwd<D: KernelDevice + ?Sized>(dev: &D, y: &DTensor, g: &DTensor, log: bool) -> Out {
    let op = "softmax_bwd";
    f32_in(op, "y", y)?;
    f32_in(op, "grad", g)?;
    same_shape(op, y, g)?;
    let (rows, v) = rows_cols(op, y)?;
    u32_fits(op, &[rows, v])?;
    let out = DTensor::uninit(dev, y.shape(), DType::F32)?;
    if rows == 0 || v == 0 {
        return Ok(out);
    }
    run(
        dev,
        "softmax_bwd_f32",
        softmax::config(rows, v),
        &[
            KArg::Buf(&y.buf),
            KArg::Buf(&g.buf),
            KArg::Buf(&out.buf),
            KArg::U32(rows as u32),
            KArg::U32(v as u32),
            KArg::I32(log as i32),
        ],
    )?;
    Ok(out)
}

// ------------------------------------------------------------------ cross-entropy

/// Cross-entropy of `logits [N, V]` against u32 `targets [N]`: per-row loss and
/// log-sum-exp (`[N]`), the mean over rows not ignored (`[1]` f32) and their count (`[1]` u32).
pub struct CrossEntropy {
    pub loss: DTensor,
    pub lse: DTensor,
    pub mean: DTensor,
    pub count: DTensor,
}

fn ce_checks<D: KernelDevice + ?Sized>(
    dev: &D,
    op: &str,
    logits: &DTensor,
    targets: &DTensor,
    ignore: Option<u32>,
) -> Result<(usize, usize)> {
    f32_in(op, "logits", logits)?;
    targets.expect_dtype(op, "targets", DType::U32)?;
    ensure!(
        logits.rank() == 2,
        "{op}: logits must be [N, V], got {:?}",
        logits.shape()
    );
    let (n, v) = (logits.shape()[0], logits.shape()[1]);
    ensure!(
        targets.shape() == [n],
        "{op}: targets {:?} must be [{n}]",
        targets.shape()
    );
    ensure!(v > 0, "{op}: no classes");
    u32_fits(op, &[n, v])?;
    if let Some(&bad) = targets
        .to_vec::<D, u32>(dev)?
        .iter()
        .find(|&&t| t as usize >= v && Some(t) != ignore)
    {
        anyhow::bail!("{op}: target {bad} outside the {v} classes");
    }
    Ok((n, v))
}

pub fn cross_entropy<D: KernelDevice + ?Sized>(
    dev: &D,
    logits: &DTensor,
    targets: &DTensor,
    ignore: Option<u32>,
) -> Result<CrossEntropy> {
    let op = "cross_entropy";
    let (n, v) = ce_checks(dev, op, logits, targets, ignore)?;
    let loss = DTensor::uninit(dev, &[n], DType::F32)?;
    let lse = DTensor::uninit(dev, &[n], DType::F32)?;
    let mean = DTensor::uninit(dev, &[1], DType::F32)?;
    let count = DTensor::uninit(dev, &[1], DType::U32)?;
    let (ig, has) = (ignore.unwrap_or(0), ignore.is_some() as i32);
    if n > 0 {
        run(
            dev,
            "cross_entropy_fwd_f32",
            ce::fwd_config(n, v),
            &[
                KArg::Buf(&logits.buf),
                KArg::Buf(&targets.buf),
                KArg::Buf(&loss.buf),
                KArg::Buf(&lse.buf),
                KArg::U32(n as u32),
                KArg::U32(v as u32),
                KArg::U32(ig),
                KArg::I32(has),
            ],
        )?;
    }
    run(
        dev,
        "cross_entropy_mean_f32",
        ce::mean_config(n),
        &[
            KArg::Buf(&loss.buf),
            KArg::Buf(&targets.buf),
            KArg::Buf(&mean.buf),
            KArg::Buf(&count.buf),
            KArg::U32(n as u32),
            KArg::U32(ig),
            KArg::I32(has),
        ],
    )?;
    Ok(CrossEntropy {
        loss,
        lse,
        mean,
        count,
    })
}

/// Gradient of the mean cross-entropy w.r.t. the logits, scaled by the device scalar `g`
/// (`[1]` f32, the gradient of the mean loss; 1 for a loss that is the mean itself), from the
/// forward's `lse` and `count` ([`CrossEntropy`]).
pub fn cross_entropy_bwd<D: KernelDevice + ?Sized>(
    dev: &D,
    logits: &DTensor,
    targets: &DTensor,
    (lse, count): (&DTensor, &DTensor),
    g: &DTensor,
    ignore: Option<u32>,
) -> Out {
    let op = "cross_entropy_bwd";
    f32_in(op, "logits", logits)?;
    targets.expect_dtype(op, "targets", DType::U32)?;
    f32_in(op, "grad", g)?;
    ensure!(
        logits.rank() == 2,
        "{op}: logits must be [N, V], got {:?}",
        logits.shape()
    );
    let (n, v) = (logits.shape()[0], logits.shape()[1]);
    ensure!(
        targets.shape() == [n] && lse.shape() == [n] && g.numel() == 1,
        "{op}: targets {:?}, lse {:?}, grad {:?} do not fit logits {:?}",
        targets.shape(),
        lse.shape(),
        g.shape(),
        logits.shape()
    );
    let out = DTensor::uninit(dev, logits.shape(), DType::F32)?;
    if n == 0 {
        return Ok(out);
    }
    run(
        dev,
        "cross_entropy_bwd_f32",
        ce::bwd_config(n, v),
        &[
            KArg::Buf(&logits.buf),
            KArg::Buf(&targets.buf),
            KArg::Buf(&lse.buf),
            KArg::Buf(&g.buf),
            KArg::Buf(&count.buf),
            KArg::Buf(&out.buf),
            KArg::U32(n as u32),
            KArg::U32(v as u32),
            KArg::U32(ignore.unwrap_or(0)),
            KArg::I32(ignore.is_some() as i32),
        ],
    )?;
    Ok(out)
}

// ------------------------------------------------------------------ attention

/// Gradients of attention `o = Attn(q, k, v)` from `go [B, Tq, H, Dh]` (contiguous), the
/// forward's output `o` (contiguous) and `lse [B, H, Tq]`: `dq [B, Tq, H, Dh]`,
/// `dk`, `dv [B, Tk, H, Dh]`, all contiguous. q, k, v are the forward's (strided) views.
pub struct AttnGrads {
    pub dq: DTensor,
    pub dk: DTensor,
    pub dv: DTensor,
}

#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<D: KernelDevice + ?Sized>(
    dev: &D,
    q: AttnView<'_>,
    k: AttnView<'_>,
    v: AttnView<'_>,
    o: &DTensor,
    lse: &DTensor,
    go: &DTensor,
    dims: AttnDims,
    p: &AttnParams,
) -> Result<AttnGrads> {
    let op = "attention_bwd";
    let AttnDims { b, h, d, tq, tk } = dims;
    f32_in(op, "o", o)?;
    f32_in(op, "lse", lse)?;
    f32_in(op, "grad", go)?;
    ensure!(
        o.shape() == [b, tq, h, d] && go.shape() == [b, tq, h, d] && lse.shape() == [b, h, tq],
        "{op}: o {:?}, grad {:?}, lse {:?} do not fit {dims:?}",
        o.shape(),
        go.shape(),
        lse.shape()
    );
    let shape_err = |e: at::ShapeError| anyhow::anyhow!("{op}: {e}");
    at::tile(at::Kernel::BwdDq, d).map_err(shape_err)?;
    ensure!(
        p.key_skip.is_empty() || p.key_skip.len() == b,
        "{op}: key_skip has {} entries, expected B = {b}",
        p.key_skip.len()
    );
    ensure!(
        p.q_start + tq <= tk,
        "{op}: query rows {}..{} exceed Tk = {tk}",
        p.q_start,
        p.q_start + tq
    );
    for (name, view, rows) in [("q", &q, tq), ("k", &k, tk), ("v", &v, tk)] {
        if b * rows * h * d == 0 {
            continue;
        }
        let s = view.strides;
        let span = (b - 1) * s[0] + (rows - 1) * s[1] + (h - 1) * s[2] + d;
        ensure!(
            span <= dev.buf_bytes(view.buf) / 4,
            "{op}: {name} view with strides {s:?} exceeds its buffer"
        );
    }
    let dq = DTensor::uninit(dev, &[b, tq, h, d], DType::F32)?;
    let dk = DTensor::uninit(dev, &[b, tk, h, d], DType::F32)?;
    let dvv = DTensor::uninit(dev, &[b, tk, h, d], DType::F32)?;
    if tq == 0 {
        // no queries: zero key / value gradients
        return Ok(AttnGrads {
            dq,
            dk: DTensor::zeros(dev, &[b, tk, h, d], DType::F32)?,
            dv: DTensor::zeros(dev, &[b, tk, h, d], DType::F32)?,
        });
    }
    let dvec = DTensor::uninit(dev, &[b, h, tq], DType::F32)?;
    run(
        dev,
        "attn_bwd_dot_f32",
        at::bwd_dot(b, h, tq),
        &[
            KArg::Buf(&o.buf),
            KArg::Buf(&go.buf),
            KArg::Buf(&dvec.buf),
            KArg::U32(b as u32),
            KArg::U32(tq as u32),
            KArg::U32(h as u32),
            KArg::U32(d as u32),
        ],
    )?;
    let skip = key_skip_tensor(dev, p, b)?;
    let common = || attn_common_args(&q, &k, &v, skip.as_ref(), dims, p);
    let mut args = common();
    args.extend([
        KArg::Buf(&go.buf),
        KArg::Buf(&lse.buf),
        KArg::Buf(&dvec.buf),
        KArg::Buf(&dq.buf),
    ]);
    run(
        dev,
        &at::entry(at::Kernel::BwdDq, d, "f32"),
        at::bwd_dq(b, h, tq, tk, d).map_err(shape_err)?,
        &args,
    )?;
    let mut args = common();
    args.extend([
        KArg::Buf(&go.buf),
        KArg::Buf(&lse.buf),
        KArg::Buf(&dvec.buf),
        KArg::Buf(&dk.buf),
        KArg::Buf(&dvv.buf),
    ]);
    run(
        dev,
        &at::entry(at::Kernel::BwdDkdv, d, "f32"),
        at::bwd_dkdv(b, h, tq, tk, d).map_err(shape_err)?,
        &args,
    )?;
    Ok(AttnGrads { dq, dk, dv: dvv })
}

// ------------------------------------------------------------------ adamw

/// One AdamW step (`step` counted from 1) in place on f32 `p`, moments `m`, `v` with
/// gradient `g` (same shapes): the CPU op's hyper-parameters and scalars
/// (`kf_kernels::adamw::Scalars`, PyTorch's order), so the result has the CPU op's bits.
pub fn adamw_step<D: KernelDevice + ?Sized>(
    dev: &D,
    p: &DTensor,
    g: &DTensor,
    m: &DTensor,
    v: &DTensor,
    step: u64,
    cfg: &crate::adamw::AdamWConfig,
) -> Result<()> {
    let op = "adamw";
    ensure!(step >= 1, "{op}: step is counted from 1");
    let s = adamw::Scalars::new(
        cfg.lr,
        cfg.beta1,
        cfg.beta2,
        cfg.eps,
        cfg.weight_decay,
        step,
    );
    for (what, t) in [("param", p), ("grad", g), ("m", m), ("v", v)] {
        f32_in(op, what, t)?;
        same_shape(op, p, t)?;
    }
    let n = p.numel();
    let mut args = vec![
        KArg::Buf(&p.buf),
        KArg::Buf(&g.buf),
        KArg::Buf(&m.buf),
        KArg::Buf(&v.buf),
        KArg::U64(n as u64),
    ];
    args.extend(s.as_array().map(KArg::F32));
    run(dev, "adamw_f32", adamw::config(n), &args)
}
