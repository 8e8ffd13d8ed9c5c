//! Launchers: one function per kernel op of kernels/*.cu, generic over a [`KernelDevice`], f32
//! storage (`<op>_f32` entry points). Each checks shapes and dtypes and returns an error naming
//! the op before anything is launched, allocates its outputs, and launches with the launch
//! shapes of `kf_kernels` (the same ones the emulated parity tests in kernels/emu/tests use).
//! Values the CPU op would reject only after reading the data (ids >= V, fully masked rows, NaN
//! logits) are handled as the kernels do: NaN rows, an error from the softmax's bad-row flag,
//! token sentinels turned into errors by [`tokens_to_host`].
//! Letters: n elements, R rows, D features, V vocabulary, B batch, T rows of a sequence, H heads.

use super::{DTensor, DeviceBuf, GemmSpec, KArg, KernelDevice};
use crate::attention::{AttnParams, AttnPattern};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::DType;
use kf_kernels::{
    argmax, attention as at, elementwise, embedding as emb, gelu, gemv, layernorm, noise, philox,
    rope, sampling, softmax,
};

type Out = Result<DTensor>;

/// Launches `entry`, naming it (and the op) in the error.
pub fn run<D: KernelDevice + ?Sized>(
    dev: &D,
    entry: &str,
    cfg: kf_kernels::LaunchConfig,
    args: &[KArg<'_>],
) -> Result<()> {
    dev.launch(entry, cfg, args)
        .with_context(|| format!("launching {entry} on {} ({cfg:?})", dev.name()))
}

fn f32_in(op: &str, what: &str, t: &DTensor) -> Result<()> {
    t.expect_dtype(op, what, DType::F32)
}

/// A weight matrix: f32, or f16 / bf16 storage (see [`matmul_into`]).
fn weight_in(op: &str, w: &DTensor) -> Result<()> {
    ensure!(
        matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16),
        "{op}: weight is {}, expected f32, f16 or bf16",
        w.dtype()
    );
    Ok(())
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

// ------------------------------------------------------------------ elementwise

/// Elementwise binary op (`add`, `sub`, `mul`) of two f32 tensors of the same shape.
fn binary<D: KernelDevice + ?Sized>(dev: &D, op: &str, a: &DTensor, b: &DTensor) -> Out {
    let entry = format!("{op}_f32");
    same_shape_binary(dev, op, &entry, elementwise::config(a.numel()), a, b)
}

/// A kernel `entry(a, b, out, n)` over two f32 tensors of the same shape (the elementwise
/// binary ops, and the GELU backward of kdev::backward), launched over `cfg`; errors name `op`.
pub(crate) fn same_shape_binary<D: KernelDevice + ?Sized>(
    dev: &D,
    op: &str,
    entry: &str,
    cfg: kf_kernels::LaunchConfig,
    a: &DTensor,
    b: &DTensor,
) -> Out {
    f32_in(op, "a", a)?;
    f32_in(op, "b", b)?;
    ensure!(
        a.shape() == b.shape(),
        "{op}: shapes {:?} and {:?} differ (the kernel does not broadcast)",
        a.shape(),
        b.shape()
    );
    let n = a.numel();
    let out = DTensor::uninit(dev, a.shape(), DType::F32)?;
    run(
        dev,
        entry,
        cfg,
        &[
            KArg::Buf(&a.buf),
            KArg::Buf(&b.buf),
            KArg::Buf(&out.buf),
            KArg::U64(n as u64),
        ],
    )?;
    Ok(out)
}

/// `a + b` (same shapes).
pub fn add<D: KernelDevice + ?Sized>(dev: &D, a: &DTensor, b: &DTensor) -> Out {
    binary(dev, "add", a, b)
}
/// `a - b` (same shapes).
pub fn sub<D: KernelDevice + ?Sized>(dev: &D, a: &DTensor, b: &DTensor) -> Out {
    binary(dev, "sub", a, b)
}
/// `a * b` (same shapes).
pub fn mul<D: KernelDevice + ?Sized>(dev: &D, a: &DTensor, b: &DTensor) -> Out {
    binary(dev, "mul", a, b)
}

/// `s * x`.
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

/// `x [..., C] + b [C]` (the bias broadcast over rows).
pub fn bias_add<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, b: &DTensor) -> Out {
    row_bias(dev, "bias_add", x, b)
}

/// `gelu_tanh(x [..., C] + b [C])` in one pass (the MLP's bias fused into its activation).
pub fn bias_gelu_tanh<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, b: &DTensor) -> Out {
    row_bias(dev, "bias_gelu_tanh", x, b)
}

/// An elementwise kernel of `x [..., C]` and a row bias `b [C]`: `<op>_f32(x, b, out, n, C)`.
fn row_bias<D: KernelDevice + ?Sized>(dev: &D, op: &str, x: &DTensor, b: &DTensor) -> Out {
    f32_in(op, "x", x)?;
    f32_in(op, "bias", b)?;
    let (_, cols) = rows_cols(op, x)?;
    ensure!(
        b.shape() == [cols],
        "{op}: bias {:?} must be [{cols}] for x {:?}",
        b.shape(),
        x.shape()
    );
    let n = x.numel();
    let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
    run(
        dev,
        &format!("{op}_f32"),
        elementwise::config(n),
        &[
            KArg::Buf(&x.buf),
            KArg::Buf(&b.buf),
            KArg::Buf(&out.buf),
            KArg::U64(n as u64),
            KArg::U64(cols.max(1) as u64),
        ],
    )?;
    Ok(out)
}

/// `acc += x [..., in] · wᵀ` with `w [out, in]`, `acc [..., out]`: the residual add done by
/// the GEMM itself (beta = 1), no separate pass over `acc`.
pub fn linear_acc<D: KernelDevice + ?Sized>(
    dev: &D,
    x: &DTensor,
    w: &DTensor,
    acc: &DTensor,
) -> Result<()> {
    let op = "linear_acc";
    f32_in(op, "x", x)?;
    weight_in(op, w)?;
    f32_in(op, "acc", acc)?;
    ensure!(
        w.rank() == 2,
        "{op}: weight must be [out, in], got {:?}",
        w.shape()
    );
    let (rows, k) = rows_cols(op, x)?;
    let (n, win) = (w.shape()[0], w.shape()[1]);
    ensure!(
        win == k && acc.numel() == rows * n && acc.shape().last() == Some(&n),
        "{op}: x {:?} · weight {:?}ᵀ does not fit acc {:?}",
        x.shape(),
        w.shape(),
        acc.shape()
    );
    let spec = GemmSpec {
        beta: 1.0,
        ..GemmSpec::simple(rows, n, k, true)
    };
    matmul_into(dev, &spec, x, w, acc)
}

fn unary<D: KernelDevice + ?Sized>(
    dev: &D,
    entry: &str,
    cfg: kf_kernels::LaunchConfig,
    x: &DTensor,
) -> Out {
    f32_in(entry, "x", x)?;
    let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
    run(
        dev,
        entry,
        cfg,
        &[
            KArg::Buf(&x.buf),
            KArg::Buf(&out.buf),
            KArg::U64(x.numel() as u64),
        ],
    )?;
    Ok(out)
}

/// GELU, tanh approximation (the elementwise family's `gelu_tanh`).
pub fn gelu_tanh<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor) -> Out {
    unary(dev, "gelu_tanh_f32", elementwise::config(x.numel()), x)
}

/// GELU with the exact erf.
pub fn gelu_erf<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor) -> Out {
    unary(dev, "gelu_erf_f32", gelu::config(x.numel()), x)
}

// ------------------------------------------------------------------ layernorm

/// LayerNorm output and the saved statistics (per row, f32) the backward takes.
pub struct LayerNormOut {
    pub y: DTensor,
    pub mean: DTensor,
    pub rstd: DTensor,
}

/// LayerNorm over the last dimension of `x [..., D]` with weight `[D]` and optional bias `[D]`.
pub fn layer_norm<D: KernelDevice + ?Sized>(
    dev: &D,
    x: &DTensor,
    w: &DTensor,
    b: Option<&DTensor>,
    eps: f32,
) -> Result<LayerNormOut> {
    let op = "layer_norm";
    f32_in(op, "x", x)?;
    f32_in(op, "weight", w)?;
    let (rows, d) = rows_cols(op, x)?;
    ensure!(
        d > 0,
        "{op}: the normalised dimension is empty ({:?})",
        x.shape()
    );
    ensure!(
        w.shape() == [d],
        "{op}: weight {:?} must be [{d}]",
        w.shape()
    );
    if let Some(b) = b {
        f32_in(op, "bias", b)?;
        ensure!(b.shape() == [d], "{op}: bias {:?} must be [{d}]", b.shape());
    }
    ensure!(
        eps.is_finite() && eps >= 0.0,
        "{op}: eps {eps} must be finite and >= 0"
    );
    ensure!(
        rows <= u32::MAX as usize && d <= u32::MAX as usize,
        "{op}: {:?} too large",
        x.shape()
    );
    let y = DTensor::uninit(dev, x.shape(), DType::F32)?;
    let mean = DTensor::uninit(dev, &[rows], DType::F32)?;
    let rstd = DTensor::uninit(dev, &[rows], DType::F32)?;
    if rows > 0 {
        let (cfg, cached) = layernorm::config(rows, d);
        run(
            dev,
            "layernorm_fwd_f32",
            cfg,
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&w.buf),
                b.map_or(KArg::Null, |b| KArg::Buf(&b.buf)),
                KArg::Buf(&y.buf),
                KArg::Buf(&mean.buf),
                KArg::Buf(&rstd.buf),
                KArg::U32(rows as u32),
                KArg::U32(d as u32),
                KArg::F32(eps),
                KArg::I32(cached as i32),
            ],
        )?;
    }
    Ok(LayerNormOut { y, mean, rstd })
}

// ------------------------------------------------------------------ embedding

/// Rows of `table [V, D]` at u32 `ids [...]`: `[..., D]`. An id >= V gives a NaN row (the
/// kernel reads nothing out of range; the CPU op errors instead).
pub fn embedding<D: KernelDevice + ?Sized>(dev: &D, ids: &DTensor, table: &DTensor) -> Out {
    let op = "embedding";
    ids.expect_dtype(op, "ids", DType::U32)?;
    f32_in(op, "table", table)?;
    ensure!(
        table.rank() == 2,
        "{op}: table must be [V, D], got {:?}",
        table.shape()
    );
    let (v, d) = (table.shape()[0], table.shape()[1]);
    ensure!(
        v <= u32::MAX as usize && d <= u32::MAX as usize,
        "{op}: table {:?} too large",
        table.shape()
    );
    let n = ids.numel();
    let mut shape = ids.shape().to_vec();
    shape.push(d);
    let out = DTensor::uninit(dev, &shape, DType::F32)?;
    if n > 0 && d > 0 {
        run(
            dev,
            "embedding_fwd_f32",
            emb::fwd_config(n),
            &[
                KArg::Buf(&ids.buf),
                KArg::Buf(&table.buf),
                KArg::Buf(&out.buf),
                KArg::U64(n as u64),
                KArg::U32(d as u32),
                KArg::U32(v as u32),
            ],
        )?;
    }
    Ok(out)
}

// ------------------------------------------------------------------ rope

/// `(cos, sin)` tables of [`rope_tables`].
pub type RopeTables = (DTensor, DTensor);

/// The RoPE tables of u32 positions `pos [P]` at head dim `d` (even): `(cos, sin)`, each
/// `[P, d/2]` f32 (the `rope_tables_f32` kernel; within one f32 ulp of the CPU's f64 tables).
pub fn rope_tables<D: KernelDevice + ?Sized>(
    dev: &D,
    pos: &DTensor,
    d: usize,
    base: f64,
) -> Result<RopeTables> {
    let op = "rope_tables";
    pos.expect_dtype(op, "positions", DType::U32)?;
    ensure!(
        d >= 2 && d.is_multiple_of(2),
        "{op}: head dim {d} must be even and >= 2"
    );
    ensure!(
        base.is_finite() && base > 0.0,
        "{op}: base {base} must be positive"
    );
    let np = pos.numel();
    let cos = DTensor::uninit(dev, &[np, d / 2], DType::F32)?;
    let sin = DTensor::uninit(dev, &[np, d / 2], DType::F32)?;
    if np > 0 {
        run(
            dev,
            "rope_tables_f32",
            rope::tables_config(np, d),
            &[
                KArg::Buf(&pos.buf),
                KArg::Buf(&cos.buf),
                KArg::Buf(&sin.buf),
                KArg::U64(np as u64),
                KArg::U32(d as u32),
                KArg::F64(base),
            ],
        )?;
    }
    Ok((cos, sin))
}

/// Elements a strided `[B, T, H, D]` view (strides over B, T, H in elements, D unit-stride)
/// spans from its first element; 0 when empty.
fn view_span(dims: [usize; 4], strides: [usize; 3]) -> usize {
    if dims.contains(&0) {
        return 0;
    }
    (dims[0] - 1) * strides[0] + (dims[1] - 1) * strides[1] + (dims[2] - 1) * strides[2] + dims[3]
}

/// RoPE of a strided view `x` = `[B, T, H, D]` of the f32 buffer `x` (strides over B, T, H in
/// elements, D unit-stride: e.g. q of a fused qkv) with tables from [`rope_tables`]: cos/sin
/// `[T, D/2]` (positions shared by the batch) or `[B*T, D/2]` (per batch row). Output
/// `[B, T, H, D]` contiguous.
pub fn rope_view<D: KernelDevice + ?Sized>(
    dev: &D,
    x: &DeviceBuf,
    dims: [usize; 4],
    strides: [usize; 3],
    cos: &DTensor,
    sin: &DTensor,
) -> Out {
    let op = "rope";
    let [b, t, h, d] = dims;
    ensure!(
        d >= 2 && d.is_multiple_of(2),
        "{op}: head dim {d} must be even and >= 2"
    );
    f32_in(op, "cos", cos)?;
    f32_in(op, "sin", sin)?;
    ensure!(
        cos.shape() == sin.shape(),
        "{op}: cos {:?} and sin {:?} differ",
        cos.shape(),
        sin.shape()
    );
    let batched = if cos.shape() == [t, d / 2] {
        false
    } else if cos.shape() == [b * t, d / 2] {
        true
    } else {
        bail!(
            "{op}: tables {:?} must be [T, D/2] = [{t}, {}] or [B*T, D/2] = [{}, {}]",
            cos.shape(),
            d / 2,
            b * t,
            d / 2
        )
    };
    let span = view_span(dims, strides);
    let have = dev.buf_bytes(x) / 4;
    ensure!(
        span <= have,
        "{op}: the view {dims:?} with strides {strides:?} spans {span} f32, the buffer holds {have}"
    );
    ensure!(
        b <= u32::MAX as usize && t <= u32::MAX as usize && h <= u32::MAX as usize,
        "{op}: {dims:?} too large"
    );
    let out = DTensor::uninit(dev, &dims, DType::F32)?;
    if span > 0 {
        run(
            dev,
            "rope_fwd_f32",
            rope::config(b, t, h, d),
            &[
                KArg::Buf(x),
                KArg::Buf(&cos.buf),
                KArg::Buf(&sin.buf),
                KArg::Buf(&out.buf),
                KArg::U32(b as u32),
                KArg::U32(t as u32),
                KArg::U32(h as u32),
                KArg::U32(d as u32),
                KArg::U64(strides[0] as u64),
                KArg::U64(strides[1] as u64),
                KArg::U64(strides[2] as u64),
                KArg::I32(batched as i32),
            ],
        )?;
    }
    Ok(out)
}

/// RoPE of a contiguous `x [B, T, H, D]` (see [`rope_view`]).
pub fn rope<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, cos: &DTensor, sin: &DTensor) -> Out {
    f32_in("rope", "x", x)?;
    ensure!(
        x.rank() == 4,
        "rope: x must be [B, T, H, D], got {:?}",
        x.shape()
    );
    let s = x.shape();
    let dims = [s[0], s[1], s[2], s[3]];
    rope_view(
        dev,
        &x.buf,
        dims,
        [s[1] * s[2] * s[3], s[2] * s[3], s[3]],
        cos,
        sin,
    )
}

// ------------------------------------------------------------------ softmax

/// Softmax (or log-softmax) over the last dimension of `x [..., V]`; a row with no entry
/// above -inf is an error naming the first such row, as in the CPU op.
pub fn softmax<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, log: bool) -> Out {
    let op = if log { "log_softmax" } else { "softmax" };
    f32_in(op, "x", x)?;
    let (rows, v) = rows_cols(op, x)?;
    ensure!(
        v > 0,
        "{op}: the softmax dimension is empty ({:?})",
        x.shape()
    );
    ensure!(
        rows <= u32::MAX as usize && v <= u32::MAX as usize,
        "{op}: {:?} too large",
        x.shape()
    );
    let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
    if rows == 0 {
        return Ok(out);
    }
    let bad = DTensor::from_slice(dev, &[softmax::NO_BAD_ROW], &[1])?;
    run(
        dev,
        "softmax_fwd_f32",
        softmax::config(rows, v),
        &[
            KArg::Buf(&x.buf),
            KArg::Buf(&out.buf),
            KArg::U32(rows as u32),
            KArg::U32(v as u32),
            KArg::I32(log as i32),
            KArg::Buf(&bad.buf),
        ],
    )?;
    let row = bad.to_vec::<D, u32>(dev)?[0];
    ensure!(
        row == softmax::NO_BAD_ROW,
        "{op}: row {row} of input {:?} has no entry above -inf (a fully masked row)",
        x.shape()
    );
    Ok(out)
}

// ------------------------------------------------------------------ GEMM

/// `x [..., in] · wᵀ + b` with `w [out, in]` (PyTorch layout) and optional `b [out]`:
/// `[..., out]`, by [`KernelDevice::gemm`] and the `bias_add` kernel.
pub fn linear<D: KernelDevice + ?Sized>(
    dev: &D,
    x: &DTensor,
    w: &DTensor,
    b: Option<&DTensor>,
) -> Out {
    let op = "linear";
    f32_in(op, "x", x)?;
    weight_in(op, w)?;
    ensure!(
        w.rank() == 2,
        "{op}: weight must be [out, in], got {:?}",
        w.shape()
    );
    let (rows, k) = rows_cols(op, x)?;
    let (n, win) = (w.shape()[0], w.shape()[1]);
    ensure!(
        win == k,
        "{op}: x {:?} has {k} features, weight {:?} takes {win}",
        x.shape(),
        w.shape()
    );
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    let out = DTensor::uninit(dev, &shape, DType::F32)?;
    matmul_into(dev, &GemmSpec::simple(rows, n, k, true), x, w, &out)?;
    match b {
        None => Ok(out),
        Some(b) => bias_add(dev, &out, b).context("linear: bias"),
    }
}

/// The GEMM of `spec` on f32 tensors (checked against their sizes first). B may also be f16 or
/// bf16 weights in the `x · Wᵀ` form of a linear layer (`trans_b`, no `trans_a`, batch 1,
/// alpha 1; offsets, leading dimensions and beta as for f32): see [`matmul_half_weights`].
pub fn matmul_into<D: KernelDevice + ?Sized>(
    dev: &D,
    spec: &GemmSpec,
    a: &DTensor,
    b: &DTensor,
    c: &DTensor,
) -> Result<()> {
    if matches!(b.dtype(), DType::F16 | DType::BF16) {
        return matmul_half_weights(dev, spec, a, b, c);
    }
    f32_in("gemm", "A", a)?;
    f32_in("gemm", "B", b)?;
    f32_in("gemm", "C", c)?;
    spec.check(a.numel(), b.numel(), c.numel())?;
    dev.gemm(spec, &a.buf, &b.buf, &c.buf)
        .with_context(|| format!("gemm on {}: {spec:?}", dev.name()))
}

/// `C = A · Wᵀ (+ beta C)` with f32 A and C and half-precision weights W (`w`, f16 or bf16,
/// stored `[n, k]` through `spec.ldb` from `spec.b_off`): every product and sum in f32, so the
/// result is the f32 GEMM's with the weights widened (exactly) up to the order of the sums. Up
/// to `kf_kernels::gemv::MAX_ROWS` rows the `gemv_wt` kernel reads the half weights directly (a
/// decode step moves half the bytes of f32 weights); more rows widen the weights the GEMM reads
/// into a temporary f32 buffer (`widen`) and run the f32 GEMM (cuBLAS on a GPU).
pub fn matmul_half_weights<D: KernelDevice + ?Sized>(
    dev: &D,
    spec: &GemmSpec,
    a: &DTensor,
    w: &DTensor,
    c: &DTensor,
) -> Result<()> {
    let op = "gemm with half weights";
    f32_in(op, "A", a)?;
    f32_in(op, "C", c)?;
    let suffix = match w.dtype() {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("{op}: weights are {other}, expected f16 or bf16"),
    };
    ensure!(
        spec.trans_b && !spec.trans_a && spec.batch == 1 && spec.alpha == 1.0,
        "{op}: only C = A · Wᵀ (+ beta C) with W stored [n, k] runs on half weights (trans_b, \
         no trans_a, batch 1, alpha 1), got {spec:?}"
    );
    spec.check(a.numel(), w.numel(), c.numel())?;
    let (m, n, k) = (spec.m, spec.n, spec.k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let u32_of = |what: &str, v: usize| -> Result<u32> {
        u32::try_from(v).map_err(|_| anyhow::anyhow!("{op}: {what} {v} exceeds the kernel's u32"))
    };
    if m <= gemv::MAX_ROWS {
        let vec = gemv::vectorized(k, spec.a_off, spec.lda, spec.b_off, spec.ldb);
        return run(
            dev,
            &format!("gemv_wt_{suffix}"),
            gemv::config(m, n),
            &[
                KArg::Buf(&a.buf),
                KArg::U64(spec.a_off as u64),
                KArg::U32(u32_of("lda", spec.lda)?),
                KArg::Buf(&w.buf),
                KArg::U64(spec.b_off as u64),
                KArg::U32(u32_of("ldb", spec.ldb)?),
                KArg::Buf(&c.buf),
                KArg::U64(spec.c_off as u64),
                KArg::U32(u32_of("ldc", spec.ldc)?),
                KArg::U32(u32_of("m", m)?),
                KArg::U32(u32_of("n", n)?),
                KArg::U32(u32_of("k", k)?),
                KArg::F32(spec.beta),
                KArg::U32(vec as u32),
            ],
        );
    }
    // the rows of W this product reads, widened: n rows ldb apart from b_off (the last k wide)
    let len = (n - 1) * spec.ldb + k;
    let wide = DTensor::uninit(dev, &[len], DType::F32)?;
    run(
        dev,
        &format!("widen_{suffix}"),
        elementwise::config(len),
        &[
            KArg::Buf(&w.buf),
            KArg::U64(spec.b_off as u64),
            KArg::Buf(&wide.buf),
            KArg::U64(len as u64),
        ],
    )?;
    let wspec = GemmSpec { b_off: 0, ..*spec };
    matmul_into(dev, &wspec, a, &wide, c)
}

// ------------------------------------------------------------------ attention

/// A strided `[B, T, H, D]` operand of attention: a buffer of f32 and its strides over
/// (batch, row, head) in elements (D unit-stride), e.g. a KV cache `[B, Tmax, H, D]` of which
/// the first Tk rows are used.
pub struct AttnView<'a> {
    pub buf: &'a DeviceBuf,
    pub strides: [usize; 3],
}

impl<'a> AttnView<'a> {
    /// A contiguous `[B, T, H, D]` tensor.
    pub fn contiguous(t: &'a DTensor) -> Result<AttnView<'a>> {
        ensure!(
            t.rank() == 4,
            "attention: operand must be [B, T, H, D], got {:?}",
            t.shape()
        );
        t.expect_dtype("attention", "operand", DType::F32)?;
        let s = t.shape();
        Ok(AttnView {
            buf: &t.buf,
            strides: [s[1] * s[2] * s[3], s[2] * s[3], s[3]],
        })
    }
}

/// Sizes of an attention call: batch, heads, head dim, query rows, keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub h: usize,
    pub d: usize,
    pub tq: usize,
    pub tk: usize,
}

/// Which kernels run the forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnPath {
    /// Split-key decode kernels up to `kf_kernels::attention::DECODE_MAX_ROWS` query rows,
    /// the forward tiles beyond.
    Auto,
    /// The forward tiles (`attn_fwd_d*`).
    Tiles,
    /// The decode kernels with at most `max_splits` key splits (then `attn_decode_combine`).
    Decode { max_splits: usize },
}

/// Attention output `o [B, Tq, H, D]` and the log-sum-exp `lse [B, H, Tq]` (f32) the
/// backward takes.
pub struct AttnOut {
    pub o: DTensor,
    pub lse: DTensor,
}

/// Errors unless the attention kernels have an instance for head dim `d` (64 and 128).
pub fn check_head_dim(d: usize) -> Result<()> {
    at::tile(at::Kernel::Fwd, d)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn pattern_code(p: AttnPattern) -> (i32, u32, u32) {
    match p {
        AttnPattern::Causal => (at::CAUSAL, 0, 0),
        AttnPattern::Staircase { n, k } => (at::STAIRCASE, n as u32, k as u32),
        AttnPattern::DoubleStaircase { n, k } => (at::DOUBLE_STAIRCASE, n as u32, k as u32),
    }
}

/// Checks of the CPU op that do not need the data: pattern length, query rows inside the keys,
/// key_skip per batch row, head dim with a kernel, views inside their buffers.
fn check_attention<D: KernelDevice + ?Sized>(
    dev: &D,
    q: &AttnView<'_>,
    k: &AttnView<'_>,
    v: &AttnView<'_>,
    dims: AttnDims,
    p: &AttnParams,
) -> Result<()> {
    let ctx = || {
        format!(
            "attention ({:?}, q_start {}, {dims:?})",
            p.pattern, p.q_start
        )
    };
    at::tile(at::Kernel::Fwd, dims.d).map_err(|e| anyhow::anyhow!("{}: {e}", ctx()))?;
    ensure!(
        p.scale.is_finite(),
        "{}: scale {} is not finite",
        ctx(),
        p.scale
    );
    ensure!(
        dims.b >= 1 && dims.h >= 1,
        "{}: B and H must be >= 1",
        ctx()
    );
    ensure!(dims.tk >= 1 || dims.tq == 0, "{}: no keys", ctx());
    let want = match p.pattern {
        AttnPattern::Causal => None,
        AttnPattern::Staircase { n, k } => n.checked_mul(k).and_then(|x| x.checked_add(n)),
        AttnPattern::DoubleStaircase { n, k } => n
            .checked_mul(k)
            .and_then(|x| x.checked_mul(2))
            .and_then(|x| x.checked_add(n)),
    };
    if !matches!(p.pattern, AttnPattern::Causal) {
        ensure!(
            want == Some(dims.tk),
            "{}: Tk = {} but the pattern needs {:?}",
            ctx(),
            dims.tk,
            want
        );
    }
    ensure!(
        p.q_start.checked_add(dims.tq).is_some_and(|e| e <= dims.tk),
        "{}: query rows {}..{} exceed Tk = {}",
        ctx(),
        p.q_start,
        p.q_start.saturating_add(dims.tq),
        dims.tk
    );
    ensure!(
        p.key_skip.is_empty() || p.key_skip.len() == dims.b,
        "{}: key_skip has {} entries, expected B = {} (or none)",
        ctx(),
        p.key_skip.len(),
        dims.b
    );
    ensure!(
        p.key_skip.iter().all(|&s| s <= u32::MAX as usize) && p.q_start <= u32::MAX as usize,
        "{}: key_skip / q_start past u32",
        ctx()
    );
    for (name, view, rows) in [("q", q, dims.tq), ("k", k, dims.tk), ("v", v, dims.tk)] {
        let span = view_span([dims.b, rows, dims.h, dims.d], view.strides);
        let have = dev.buf_bytes(view.buf) / 4;
        ensure!(
            span <= have,
            "{}: {name} [B, {rows}, H, D] with strides {:?} spans {span} f32, the buffer holds {have}",
            ctx(),
            view.strides
        );
    }
    Ok(())
}

/// The per-batch `key_skip` of `p` as a u32 device tensor `[B]`, or `None` when there is none.
pub(crate) fn key_skip_tensor<D: KernelDevice + ?Sized>(
    dev: &D,
    p: &AttnParams,
    b: usize,
) -> Result<Option<DTensor>> {
    if p.key_skip.is_empty() {
        return Ok(None);
    }
    let s: Vec<u32> = p.key_skip.iter().map(|&s| s as u32).collect();
    Ok(Some(DTensor::from_slice(dev, &s, &[b])?))
}

/// The inputs every attention kernel takes first (`IN` in kf_kernels::attention): q, k, v,
/// key_skip, their strides, Tq, Tk, q_start, the pattern code and its (n, k), the scale.
pub(crate) fn attn_common_args<'a>(
    q: &AttnView<'a>,
    k: &AttnView<'a>,
    v: &AttnView<'a>,
    skip: Option<&'a DTensor>,
    dims: AttnDims,
    p: &AttnParams,
) -> Vec<KArg<'a>> {
    let (kind, pn, pk) = pattern_code(p.pattern);
    let mut args: Vec<KArg<'a>> = vec![
        KArg::Buf(q.buf),
        KArg::Buf(k.buf),
        KArg::Buf(v.buf),
        skip.map_or(KArg::Null, |s| KArg::Buf(&s.buf)),
    ];
    for s in [q.strides, k.strides, v.strides] {
        args.extend(s.iter().map(|&x| KArg::U64(x as u64)));
    }
    args.extend([
        KArg::U32(dims.tq as u32),
        KArg::U32(dims.tk as u32),
        KArg::U32(p.q_start as u32),
        KArg::I32(kind),
        KArg::U32(pn),
        KArg::U32(pk),
        KArg::F32(p.scale as f32),
    ]);
    args
}

/// Attention forward over key-range patterns (causal, staircase, double staircase, `q_start`,
/// `key_skip`) on the attention kernels: the 64-row forward tiles, or the split-key decode
/// kernels and their combine (`path`). Head dims 64 and 128 only (others: an error).
pub fn attention<D: KernelDevice + ?Sized>(
    dev: &D,
    q: AttnView<'_>,
    k: AttnView<'_>,
    v: AttnView<'_>,
    dims: AttnDims,
    p: &AttnParams,
    path: AttnPath,
) -> Result<AttnOut> {
    check_attention(dev, &q, &k, &v, dims, p)?;
    let AttnDims { b, h, d, tq, tk } = dims;
    let o = DTensor::uninit(dev, &[b, tq, h, d], DType::F32)?;
    let lse = DTensor::uninit(dev, &[b, h, tq], DType::F32)?;
    if tq == 0 {
        return Ok(AttnOut { o, lse });
    }
    let skip = key_skip_tensor(dev, p, b)?;
    let mut args = attn_common_args(&q, &k, &v, skip.as_ref(), dims, p);
    let shape_err = |e: at::ShapeError| anyhow::anyhow!("{e}");
    let decode = match path {
        AttnPath::Auto => at::use_decode(tq).then_some(at::MAX_SPLITS),
        AttnPath::Tiles => None,
        AttnPath::Decode { max_splits } => Some(max_splits),
    };
    match decode {
        None => {
            let cfg = at::fwd(b, h, tq, tk, d).map_err(shape_err)?;
            args.extend([
                KArg::Buf(&o.buf),
                KArg::Buf(&lse.buf),
                KArg::Null,
                KArg::Null,
                KArg::U32(1),
                KArg::U32(0),
            ]);
            run(dev, &at::entry(at::Kernel::Fwd, d, "f32"), cfg, &args)?;
        }
        Some(max_splits) => {
            let plan = at::decode(b, h, tq, tk, d, max_splits).map_err(shape_err)?;
            let split = plan.nsplit > 1;
            let rows = plan.part_rows.max(1);
            let opart = DTensor::uninit(dev, &[rows, d], DType::F32)?;
            let lsepart = DTensor::uninit(dev, &[rows], DType::F32)?;
            args.extend([
                KArg::Buf(&o.buf),
                KArg::Buf(&lse.buf),
                if split {
                    KArg::Buf(&opart.buf)
                } else {
                    KArg::Null
                },
                if split {
                    KArg::Buf(&lsepart.buf)
                } else {
                    KArg::Null
                },
                KArg::U32(plan.nsplit),
                KArg::U32(plan.chunk),
            ]);
            run(
                dev,
                &at::entry(at::Kernel::Decode, d, "f32"),
                plan.main,
                &args,
            )?;
            if let Some(cfg) = plan.combine {
                run(
                    dev,
                    "attn_decode_combine_f32",
                    cfg,
                    &[
                        KArg::Buf(&opart.buf),
                        KArg::Buf(&lsepart.buf),
                        KArg::Buf(&o.buf),
                        KArg::Buf(&lse.buf),
                        KArg::U32(tq as u32),
                        KArg::U32(d as u32),
                        KArg::U32(plan.nsplit),
                    ],
                )?;
            }
        }
    }
    Ok(AttnOut { o, lse })
}

// ------------------------------------------------------------------ noise, read-off, sampling

/// Sinusoidal features of f64 noise levels `s [N]` (the CPU op `noise_features`): `[N, d]` f32.
pub fn noise_features<D: KernelDevice + ?Sized>(dev: &D, s: &DTensor, d: usize) -> Out {
    let out = DTensor::uninit(dev, &[s.numel(), d], DType::F32)?;
    noise_features_into(dev, s, d, &out.buf, d)?;
    Ok(out)
}

/// [`noise_features`] into rows `ld` f32 apart of `out` (columns `d..ld` untouched).
pub fn noise_features_into<D: KernelDevice + ?Sized>(
    dev: &D,
    s: &DTensor,
    d: usize,
    out: &DeviceBuf,
    ld: usize,
) -> Result<()> {
    let op = "noise_features";
    s.expect_dtype(op, "noise levels", DType::F64)?;
    ensure!(
        d >= 2 && d.is_multiple_of(2),
        "{op}: d = {d} must be even and >= 2"
    );
    ensure!(ld >= d, "{op}: row stride {ld} below d = {d}");
    let n = s.numel();
    let need = if n == 0 { 0 } else { (n - 1) * ld + d };
    ensure!(
        need <= dev.buf_bytes(out) / 4,
        "{op}: {n} rows of {d} at stride {ld} need {need} f32, the output holds {}",
        dev.buf_bytes(out) / 4
    );
    if n > 0 {
        run(
            dev,
            "noise_features_f32",
            noise::config(n, d),
            &[
                KArg::Buf(&s.buf),
                KArg::Buf(out),
                KArg::U64(n as u64),
                KArg::U32(d as u32),
                KArg::U64(ld as u64),
            ],
        )?;
    }
    Ok(())
}

/// Token sentinels of the argmax and sampling kernels.
pub const TOKEN_NAN: u32 = 0xffff_ffff;
pub const TOKEN_ALL_NEG_INF: u32 = 0xffff_fffe;

/// Greedy read-off with a frequency penalty (`kf_ops::argmax::argmax_penalty`): for each batch
/// row b and its K positions in order, the argmax of `logits[b, i] - penalty * counts[b]`,
/// counting each chosen token into `counts [B, V]` (u32, updated in place on the device).
/// Returns tokens `[B, K]` u32; a NaN row gives [`TOKEN_NAN`], an all -inf row
/// [`TOKEN_ALL_NEG_INF`] (see [`tokens_to_host`]).
pub fn argmax_penalty<D: KernelDevice + ?Sized>(
    dev: &D,
    logits: &DTensor,
    counts: &DTensor,
    penalty: f64,
) -> Out {
    let op = "argmax_penalty";
    f32_in(op, "logits", logits)?;
    counts.expect_dtype(op, "counts", DType::U32)?;
    ensure!(
        logits.rank() == 3,
        "{op}: logits must be [B, K, V], got {:?}",
        logits.shape()
    );
    let (b, k, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    ensure!(
        counts.shape() == [b, v],
        "{op}: counts {:?} must be [B, V] = [{b}, {v}]",
        counts.shape()
    );
    ensure!(v >= 1, "{op}: empty vocabulary");
    ensure!(penalty.is_finite(), "{op}: penalty {penalty} is not finite");
    let out = DTensor::uninit(dev, &[b, k], DType::U32)?;
    if b * k > 0 {
        run(
            dev,
            "argmax_penalty_f32",
            argmax::config(b, v),
            &[
                KArg::Buf(&logits.buf),
                KArg::Buf(&counts.buf),
                KArg::Buf(&out.buf),
                KArg::U32(b as u32),
                KArg::U32(k as u32),
                KArg::U32(v as u32),
                KArg::F64(penalty),
            ],
        )?;
    }
    Ok(out)
}

/// Inverse-CDF sampling (`kf_ops::sampling::sample_inverse_cdf`) of `logits [R, V]` at
/// temperature `tau` (0 = greedy) with f64 uniforms `u [R]`: tokens `[R]` u32 (sentinels as in
/// [`argmax_penalty`]).
pub fn sample_inverse_cdf<D: KernelDevice + ?Sized>(
    dev: &D,
    logits: &DTensor,
    u: &DTensor,
    tau: f64,
) -> Out {
    let op = "sample_inverse_cdf";
    f32_in(op, "logits", logits)?;
    u.expect_dtype(op, "u", DType::F64)?;
    ensure!(
        logits.rank() == 2,
        "{op}: logits must be [R, V], got {:?}",
        logits.shape()
    );
    let (rows, v) = (logits.shape()[0], logits.shape()[1]);
    ensure!(
        u.shape() == [rows],
        "{op}: u {:?} must be [{rows}]",
        u.shape()
    );
    ensure!(v >= 1, "{op}: empty vocabulary");
    ensure!(
        tau.is_finite() && tau >= 0.0,
        "{op}: tau {tau} must be finite and >= 0"
    );
    let cfg = sampling::config(rows, v).map_err(|e| anyhow::anyhow!("{op}: {e}"))?;
    let out = DTensor::uninit(dev, &[rows], DType::U32)?;
    if rows > 0 {
        run(
            dev,
            "sample_inverse_cdf_f32",
            cfg,
            &[
                KArg::Buf(&logits.buf),
                KArg::Buf(&u.buf),
                KArg::Buf(&out.buf),
                KArg::U32(rows as u32),
                KArg::U32(v as u32),
                KArg::F64(tau),
            ],
        )?;
    }
    Ok(out)
}

/// Tokens on the host; a sentinel (a NaN or all -inf logit row) is an error naming its index.
pub fn tokens_to_host<D: KernelDevice + ?Sized>(dev: &D, tokens: &DTensor) -> Result<Vec<u32>> {
    let t = tokens.to_vec::<D, u32>(dev)?;
    check_token_markers(&t, tokens.shape())?;
    Ok(t)
}

/// An error naming the first token of `t` (shaped `shape`) that is a kernel's marker of a
/// NaN or all -inf logit row.
pub fn check_token_markers(t: &[u32], shape: &[usize]) -> Result<()> {
    if let Some(i) = t
        .iter()
        .position(|&x| x == TOKEN_NAN || x == TOKEN_ALL_NEG_INF)
    {
        bail!(
            "token {i} of {shape:?}: its logit row {}",
            if t[i] == TOKEN_NAN {
                "holds NaN"
            } else {
                "is all -inf"
            }
        );
    }
    Ok(())
}

/// Elements `start .. start + n` of the f32 uniform stream (seed, stream) of
/// `kf_engine::rng::Philox::fill_uniform_f32`.
pub fn philox_uniform_f32<D: KernelDevice + ?Sized>(
    dev: &D,
    n: usize,
    seed: u64,
    stream: u64,
    start: u64,
) -> Out {
    philox_uniform(
        dev,
        "philox_uniform_f32",
        DType::F32,
        4,
        n,
        seed,
        stream,
        start,
    )
}

/// Elements `start .. start + n` of the f64 uniform stream (`Philox::fill_uniform_f64`).
pub fn philox_uniform_f64<D: KernelDevice + ?Sized>(
    dev: &D,
    n: usize,
    seed: u64,
    stream: u64,
    start: u64,
) -> Out {
    philox_uniform(
        dev,
        "philox_uniform_f64",
        DType::F64,
        2,
        n,
        seed,
        stream,
        start,
    )
}

#[allow(clippy::too_many_arguments)]
fn philox_uniform<D: KernelDevice + ?Sized>(
    dev: &D,
    entry: &str,
    dtype: DType,
    per: u64,
    n: usize,
    seed: u64,
    stream: u64,
    start: u64,
) -> Out {
    ensure!(
        start.checked_add(n as u64).is_some(),
        "{entry}: start {start} + n {n} overflows"
    );
    let out = DTensor::uninit(dev, &[n], dtype)?;
    if n > 0 {
        run(
            dev,
            entry,
            philox::config(philox::blocks_touched(start, n as u64, per)),
            &[
                KArg::Buf(&out.buf),
                KArg::U64(n as u64),
                KArg::U64(seed),
                KArg::U64(stream),
                KArg::U64(start),
            ],
        )?;
    }
    Ok(out)
}

/// `nb` raw Philox blocks (4 u32 words each) from `counter` (`Philox::block`): `[nb, 4]` u32.
pub fn philox_u32<D: KernelDevice + ?Sized>(
    dev: &D,
    nb: usize,
    seed: u64,
    stream: u64,
    counter: u64,
) -> Out {
    let out = DTensor::uninit(dev, &[nb, 4], DType::U32)?;
    if nb > 0 {
        run(
            dev,
            "philox_u32",
            philox::config(nb as u64),
            &[
                KArg::Buf(&out.buf),
                KArg::U64(nb as u64),
                KArg::U64(seed),
                KArg::U64(stream),
                KArg::U64(counter),
            ],
        )?;
    }
    Ok(out)
}
