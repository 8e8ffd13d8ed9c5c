//! The DDiT backbone and the PFLM student on a kernel device (`kf_ops::kdev::KernelDevice`:
//! the CPU emulator or a GPU): f32 weights uploaded once, the AR forward (uncached, and
//! prefill + KV-cached steps with the cache on the device), the PFLM inference step
//! (`Pflm::step_logits` / `Pflm::step`) and the generation loop mirroring `generate_pflm`:
//! the same Philox noise stream (drawn on the device by the `philox_uniform_f64` kernel), the
//! same frequency penalty (argmax + counts on the device, `argmax_penalty`), K <= k tokens per
//! pass. Only the chosen tokens come back to the host each step. The distillation targets
//! too: `stage1_targets_dev` (AR teacher + inverse-CDF sampler), `rollout_double_dev` (the
//! k -> 2k rollout of a student teacher) and `teacher_logits_dev` (the AR teacher's logits on
//! the host, for the noise-inversion variant).
//!
//! Same maths as ddit.rs / pflm.rs, with these device-side choices:
//! - weight matrices are f32, or with [`WeightStore::Exact`] each in the narrowest of f16 / bf16
//!   / f32 that holds it exactly (a model read from an f16 file keeps half the bytes on the
//!   device; `launch::matmul_into` multiplies f32 activations by them in f32); norms, biases
//!   and the embedding table (gathered, not multiplied) stay f32;
//! - q, k, v come from three GEMMs over the row blocks of `attn_qkv.weight` (no fused buffer);
//! - the reserved token's logit (-1000 exactly on the CPU) comes from the head's weights: its
//!   row of `output_layer.linear.weight` is zeroed and its bias set to -1000 at upload, so the
//!   logit is exactly -1000 for any finite input;
//! - the noise encoder's `combined_proj` runs as two accumulating GEMMs over the u and tau
//!   halves of its weight (no concatenated feature buffer); its LayerNorm eps is `cfg.ln_eps`
//!   (what `Pflm::from_teacher` and `Pflm::load` use);
//! - attention kernels exist for head dims 64 and 128 only: other head dims fail at upload.
//!
//! Letters: B batch, T rows of a pass, d model width, H heads, Dh head dim, V vocabulary,
//! K hints per step.

use crate::config::DditConfig;
use crate::ddit::{Ddit, MASK_LOGIT};
use crate::generate::{check_request, left_pad, Generated, LeftPadded};
use crate::pflm::{Pflm, PflmGenerateOptions};
use anyhow::{ensure, Context, Result};
use kf_engine::{DType, Tensor};
use kf_ops::attention::{AttnParams, AttnPattern};
use kf_ops::kdev::launch::{self as kl, AttnDims, AttnPath, AttnView};
use kf_ops::kdev::{DTensor, DeviceBuf, GemmSpec, KernelDevice};
use std::time::Instant;

/// An f32 copy of a CPU parameter.
fn up<D: KernelDevice + ?Sized>(dev: &D, t: &Tensor, name: &str) -> Result<DTensor> {
    ensure!(
        t.dtype() == DType::F32,
        "kernel device: parameter {name} is {}, only f32 models run on the kernels",
        t.dtype()
    );
    DTensor::upload(dev, t).with_context(|| format!("uploading {name}"))
}

/// How a model's weight matrices (the linear layers' `[out, in]` weights, the LM head
/// included) are stored on a kernel device; the kernels compute in f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightStore {
    /// f32 (what training updates).
    #[default]
    F32,
    /// Each matrix in the narrowest of f16, bf16 and f32 that holds all its values exactly: a
    /// model read from an f16 or bf16 file (widened on load) goes back to its file's precision,
    /// half the bytes a decode step reads, with the outputs of [`WeightStore::F32`] up to the
    /// order of the sums; any other model stays f32.
    Exact,
}

/// The narrowest of f16, bf16 and f32 holding every value of `v` exactly.
fn exact_dtype(v: &[f32]) -> DType {
    if v.iter().all(|&x| half::f16::from_f32(x).to_f32() == x) {
        DType::F16
    } else if v.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x) {
        DType::BF16
    } else {
        DType::F32
    }
}

/// A weight matrix on the device, stored as `store` says.
fn up_matrix<D: KernelDevice + ?Sized>(
    dev: &D,
    t: &Tensor,
    name: &str,
    store: WeightStore,
) -> Result<DTensor> {
    if store == WeightStore::F32 || t.dtype() != DType::F32 {
        return up(dev, t, name);
    }
    // the engine's cast and DTensor::upload carry the half storage (exact: dt holds every value)
    let dt = exact_dtype(&t.to_vec::<f32>()?);
    DTensor::upload(dev, &t.to_dtype(dt)?).with_context(|| format!("uploading {name}"))
}

/// Bytes and element type of device weights: (bytes, description such as "f16 matrices").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightBytes {
    /// Bytes of every parameter on the device.
    pub total: usize,
    /// Bytes of the weight matrices by storage: (f32, f16, bf16).
    pub matrices: (usize, usize, usize),
}

impl WeightBytes {
    fn add(&mut self, t: &DTensor, matrix: bool) {
        let b = t.numel() * t.dtype().size();
        self.total += b;
        if matrix {
            match t.dtype() {
                DType::F16 => self.matrices.1 += b,
                DType::BF16 => self.matrices.2 += b,
                _ => self.matrices.0 += b,
            }
        }
    }
    /// "f16 weight matrices, 29.4 MB in all" and the like.
    pub fn describe(&self) -> String {
        let (f, h, b) = self.matrices;
        let kinds: Vec<&str> = [(f, "f32"), (h, "f16"), (b, "bf16")]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(_, s)| *s)
            .collect();
        format!(
            "{} weight matrices, {:.1} MB of parameters in all",
            if kinds.is_empty() {
                "no".to_string()
            } else {
                kinds.join(" + ")
            },
            self.total as f64 / 1e6
        )
    }
}

fn param<'a>(m: &'a Ddit, name: &str) -> Result<&'a Tensor> {
    m.param(name)
        .with_context(|| format!("the model has no parameter {name}"))
}

/// Rows `start..start + len` of the time axis of `x [B, T, d]` (device copies).
pub fn narrow_time<D: KernelDevice + ?Sized>(
    dev: &D,
    x: &DTensor,
    start: usize,
    len: usize,
) -> Result<DTensor> {
    ensure!(
        x.rank() == 3,
        "narrow_time: x must be [B, T, d], got {:?}",
        x.shape()
    );
    let (b, t, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    ensure!(
        start + len <= t,
        "narrow_time: rows {start}..{} of {t}",
        start + len
    );
    let out = DTensor::uninit(dev, &[b, len, d], x.dtype())?;
    let es = x.dtype().size();
    for bi in 0..b {
        dev.copy(
            &x.buf,
            (bi * t + start) * d * es,
            &out.buf,
            bi * len * d * es,
            len * d * es,
        )?;
    }
    Ok(out)
}

/// `[B, Ta, d]` and `[B, Tb, d]` -> `[B, Ta + Tb, d]` (device copies).
pub fn cat_time<D: KernelDevice + ?Sized>(dev: &D, a: &DTensor, b: &DTensor) -> Result<DTensor> {
    ensure!(
        a.rank() == 3
            && b.rank() == 3
            && a.shape()[0] == b.shape()[0]
            && a.shape()[2] == b.shape()[2],
        "cat_time: {:?} and {:?} must be [B, T, d] with equal B and d",
        a.shape(),
        b.shape()
    );
    let (nb, ta, tb, d) = (a.shape()[0], a.shape()[1], b.shape()[1], a.shape()[2]);
    let out = DTensor::uninit(dev, &[nb, ta + tb, d], DType::F32)?;
    for bi in 0..nb {
        dev.copy(
            &a.buf,
            bi * ta * d * 4,
            &out.buf,
            bi * (ta + tb) * d * 4,
            ta * d * 4,
        )?;
        dev.copy(
            &b.buf,
            bi * tb * d * 4,
            &out.buf,
            (bi * (ta + tb) + ta) * d * 4,
            tb * d * 4,
        )?;
    }
    Ok(out)
}

/// The first `l` columns of `x [..., V]` (device copies, one per row).
fn narrow_last<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, l: usize) -> Result<DTensor> {
    let v = *x.shape().last().context("narrow_last: scalar")?;
    let rows = x.numel() / v.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = l;
    let out = DTensor::uninit(dev, &shape, x.dtype())?;
    let es = x.dtype().size();
    for r in 0..rows {
        dev.copy(&x.buf, r * v * es, &out.buf, r * l * es, l * es)?;
    }
    Ok(out)
}

/// One block's weights on the device.
struct DevBlock {
    norm1: DTensor,
    qkv: DTensor,
    out: DTensor,
    norm2: DTensor,
    mlp0_w: DTensor,
    mlp0_b: DTensor,
    mlp2_w: DTensor,
    mlp2_b: DTensor,
}

/// A KV cache on the device: per layer K (after RoPE) and V `[B, Tmax, H, Dh]` f32; rows
/// `0..len` committed; a pass writes rows `len..len + T` of every layer, then
/// [`DevKvCache::commit`] keeps the first `n` (as `KvCache`).
pub struct DevKvCache {
    k: Vec<DeviceBuf>,
    v: Vec<DeviceBuf>,
    batch: usize,
    cap: usize,
    heads: usize,
    head_dim: usize,
    len: usize,
    pending: usize,
}

impl DevKvCache {
    /// An empty cache for `batch` sequences of up to `capacity` rows.
    pub fn new<D: KernelDevice + ?Sized>(
        dev: &D,
        cfg: &DditConfig,
        batch: usize,
        capacity: usize,
    ) -> Result<Self> {
        ensure!(
            batch >= 1 && capacity >= 1,
            "KV cache: batch and capacity must be >= 1"
        );
        let (h, dh) = (cfg.n_heads, cfg.head_dim());
        let bytes = batch * capacity * h * dh * 4;
        let mk = || {
            (0..cfg.n_layers)
                .map(|_| dev.alloc_zeroed(bytes))
                .collect::<Result<Vec<DeviceBuf>>>()
        };
        Ok(DevKvCache {
            k: mk().context("allocating the device KV cache")?,
            v: mk().context("allocating the device KV cache")?,
            batch,
            cap: capacity,
            heads: h,
            head_dim: dh,
            len: 0,
            pending: 0,
        })
    }
    /// Committed rows.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Keeps the first `n` rows the last pass wrote.
    pub fn commit(&mut self, n: usize) -> Result<()> {
        ensure!(
            n <= self.pending,
            "KV cache: cannot commit {n} rows, the last pass wrote {}",
            self.pending
        );
        self.len += n;
        self.pending = 0;
        Ok(())
    }
}

/// The DDiT backbone and head on a kernel device.
pub struct DevDdit {
    pub cfg: DditConfig,
    embed: DTensor,
    blocks: Vec<DevBlock>,
    norm_f: DTensor,
    head_w: DTensor,
    head_b: DTensor,
}

impl DevDdit {
    /// Uploads an f32 model with f32 weights (head dim 64 or 128: the attention kernels'
    /// instances).
    pub fn upload<D: KernelDevice + ?Sized>(dev: &D, m: &Ddit) -> Result<Self> {
        Self::upload_with(dev, m, WeightStore::F32)
    }

    /// Uploads an f32 model, its weight matrices stored as `store` says.
    pub fn upload_with<D: KernelDevice + ?Sized>(
        dev: &D,
        m: &Ddit,
        store: WeightStore,
    ) -> Result<Self> {
        let cfg = m.cfg.clone();
        cfg.validate()?;
        kl::check_head_dim(cfg.head_dim()).with_context(|| {
            format!(
                "model d_model {} / n_heads {} on {}",
                cfg.d_model,
                cfg.n_heads,
                dev.name()
            )
        })?;
        let p = |name: &str| -> Result<DTensor> { up(dev, param(m, name)?, name) };
        let w = |name: &str| -> Result<DTensor> { up_matrix(dev, param(m, name)?, name, store) };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blocks.{i}.{s}");
            blocks.push(DevBlock {
                norm1: p(&n("norm1.weight"))?,
                qkv: w(&n("attn_qkv.weight"))?,
                out: w(&n("attn_out.weight"))?,
                norm2: p(&n("norm2.weight"))?,
                mlp0_w: w(&n("mlp.0.weight"))?,
                mlp0_b: p(&n("mlp.0.bias"))?,
                mlp2_w: w(&n("mlp.2.weight"))?,
                mlp2_b: p(&n("mlp.2.bias"))?,
            });
        }
        // the reserved token: zero weight row and bias -1000 give its logit exactly -1000
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let mut hw = param(m, "output_layer.linear.weight")?.to_vec::<f32>()?;
        let mut hb = param(m, "output_layer.linear.bias")?.to_vec::<f32>()?;
        if let Some(id) = cfg.mask_token_id.map(|x| x as usize).filter(|&x| x < v) {
            hw[id * d..(id + 1) * d].fill(0.0);
            hb[id] = MASK_LOGIT as f32;
        }
        Ok(DevDdit {
            embed: p("vocab_embed.embedding")?,
            blocks,
            norm_f: p("output_layer.norm_final.weight")?,
            head_w: up_matrix(
                dev,
                &Tensor::from_vec(hw, &[v, d], kf_engine::Device::Cpu)?,
                "output_layer.linear.weight",
                store,
            )?,
            head_b: DTensor::from_slice(dev, &hb, &[v])?,
            cfg,
        })
    }

    /// Bytes of the parameters on the device, and the weight matrices' storage.
    pub fn weight_bytes(&self) -> WeightBytes {
        let mut wb = WeightBytes::default();
        wb.add(&self.embed, false);
        for b in &self.blocks {
            for (t, matrix) in [
                (&b.norm1, false),
                (&b.qkv, true),
                (&b.out, true),
                (&b.norm2, false),
                (&b.mlp0_w, true),
                (&b.mlp0_b, false),
                (&b.mlp2_w, true),
                (&b.mlp2_b, false),
            ] {
                wb.add(t, matrix);
            }
        }
        wb.add(&self.norm_f, false);
        wb.add(&self.head_w, true);
        wb.add(&self.head_b, false);
        wb
    }

    /// Token embeddings `[B, T, d]` of host ids (`ids.len() = B * T`).
    pub fn embed<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<DTensor> {
        ensure!(
            ids.len() == b * t,
            "embed: {} ids for [B, T] = [{b}, {t}]",
            ids.len()
        );
        if let Some(&bad) = ids.iter().find(|&&x| x as usize >= self.cfg.vocab_size) {
            anyhow::bail!(
                "embed: token id {bad} outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let di = DTensor::from_slice(dev, ids, &[b, t])?;
        kl::embedding(dev, &di, &self.embed)
    }

    /// The residual stream after the last block of `h0 [B, T, d]`, with host positions `pos`
    /// (`T` shared or `B * T`), attention parameters and an optional device KV cache (then
    /// `attn.q_start` must be its committed length; the pass writes T rows after it; commit
    /// with [`DevKvCache::commit`]). As `Ddit::backbone_hidden`.
    pub fn backbone_hidden<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        h0: &DTensor,
        pos: &[u32],
        attn: &AttnParams,
        mut cache: Option<&mut DevKvCache>,
    ) -> Result<DTensor> {
        let cfg = &self.cfg;
        let (d, nh, hd) = (cfg.d_model, cfg.n_heads, cfg.head_dim());
        ensure!(
            h0.rank() == 3 && h0.shape()[2] == d && h0.dtype() == DType::F32,
            "backbone: input embeddings must be f32 [B, T, d = {d}], got {:?} {:?}",
            h0.dtype(),
            h0.shape()
        );
        let (b, t) = (h0.shape()[0], h0.shape()[1]);
        ensure!(
            pos.len() == t || pos.len() == b * t,
            "backbone: {} positions for [B, T] = [{b}, {t}] (T or B*T)",
            pos.len()
        );
        if let Some(&mx) = pos.iter().max() {
            ensure!(
                (mx as usize) < cfg.max_seq_len,
                "backbone: position {mx} is beyond the model's max_seq_len {}",
                cfg.max_seq_len
            );
        }
        if let Some(c) = cache.as_deref() {
            ensure!(
                c.k.len() == cfg.n_layers && c.batch == b && c.heads == nh && c.head_dim == hd,
                "backbone: the device KV cache does not fit this model and batch {b}"
            );
            ensure!(
                attn.q_start == c.len,
                "backbone: with a KV cache the queries start at its committed length {}, not at q_start {}",
                c.len,
                attn.q_start
            );
            ensure!(
                c.len + t <= c.cap,
                "KV cache: a pass of {t} rows after {} committed rows exceeds the capacity of {} rows",
                c.len,
                c.cap
            );
        }
        let dpos = DTensor::from_slice(dev, pos, &[pos.len()])?;
        let (cos, sin) = kl::rope_tables(dev, &dpos, hd, cfg.rope_base)?;
        let eps = cfg.ln_eps as f32;
        let rows = b * t;
        let row_bytes = nh * hd * 4;
        let mut h = narrow_time(dev, h0, 0, t)?; // own copy: h0 stays the caller's
        for (layer, blk) in self.blocks.iter().enumerate() {
            let x = kl::layer_norm(dev, &h, &blk.norm1, None, eps)?.y;
            let proj = |part: usize| -> Result<DTensor> {
                let out = DTensor::uninit(dev, &[b, t, nh, hd], DType::F32)?;
                let spec = GemmSpec {
                    b_off: part * d * d,
                    ..GemmSpec::simple(rows, d, d, true)
                };
                kl::matmul_into(dev, &spec, &x, &blk.qkv, &out)?;
                Ok(out)
            };
            let q = kl::rope(dev, &proj(0)?, &cos, &sin)?;
            let k = kl::rope(dev, &proj(1)?, &cos, &sin)?;
            let v = proj(2)?;
            let a = match cache.as_deref_mut() {
                Some(c) => {
                    for bi in 0..b {
                        let (src, dst) = (bi * t * row_bytes, (bi * c.cap + c.len) * row_bytes);
                        dev.copy(&k.buf, src, &c.k[layer], dst, t * row_bytes)?;
                        dev.copy(&v.buf, src, &c.v[layer], dst, t * row_bytes)?;
                    }
                    c.pending = t;
                    let strides = [c.cap * nh * hd, nh * hd, hd];
                    let dims = AttnDims {
                        b,
                        h: nh,
                        d: hd,
                        tq: t,
                        tk: c.len + t,
                    };
                    kl::attention(
                        dev,
                        AttnView::contiguous(&q)?,
                        AttnView {
                            buf: &c.k[layer],
                            strides,
                        },
                        AttnView {
                            buf: &c.v[layer],
                            strides,
                        },
                        dims,
                        attn,
                        AttnPath::Auto,
                    )?
                }
                None => {
                    let dims = AttnDims {
                        b,
                        h: nh,
                        d: hd,
                        tq: t,
                        tk: t,
                    };
                    kl::attention(
                        dev,
                        AttnView::contiguous(&q)?,
                        AttnView::contiguous(&k)?,
                        AttnView::contiguous(&v)?,
                        dims,
                        attn,
                        AttnPath::Auto,
                    )?
                }
            }
            .o
            .reshape(&[b, t, d])?;
            // fused: the residual adds are the GEMMs' beta = 1 epilogue, the MLP's first bias
            // rides in its GELU; the second bias is one pass over h
            kl::linear_acc(dev, &a, &blk.out, &h)?;
            let x = kl::layer_norm(dev, &h, &blk.norm2, None, eps)?.y;
            let m = kl::linear(dev, &x, &blk.mlp0_w, None)?;
            let m = kl::bias_gelu_tanh(dev, &m, &blk.mlp0_b)?;
            kl::linear_acc(dev, &m, &blk.mlp2_w, &h)?;
            h = kl::bias_add(dev, &h, &blk.mlp2_b)?;
        }
        Ok(h)
    }

    /// The final layer on `h [.., d]`: LN_f, Linear(d, V), the reserved token at -1000.
    pub fn head<D: KernelDevice + ?Sized>(&self, dev: &D, h: &DTensor) -> Result<DTensor> {
        let x = kl::layer_norm(dev, h, &self.norm_f, None, self.cfg.ln_eps as f32)?.y;
        kl::linear(dev, &x, &self.head_w, Some(&self.head_b))
    }

    /// The AR forward without a cache: logits `[B, T, V]` of host ids `[B, T]` at positions
    /// `0..T`, causal (`Ddit::forward_train` off the tape).
    pub fn forward<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<DTensor> {
        ensure!(
            t >= 1 && t <= self.cfg.max_seq_len,
            "sequence length {t} must be in 1..={} (max_seq_len)",
            self.cfg.max_seq_len
        );
        let h0 = self.embed(dev, ids, b, t)?;
        let pos: Vec<u32> = (0..t as u32).collect();
        let h = self.backbone_hidden(dev, &h0, &pos, &self.attn_params(0, vec![]), None)?;
        self.head(dev, &h)
    }

    /// One KV-cached AR pass: host ids `[B, T]` at positions `cache.len()..`, causal over the
    /// cache and themselves; commits all T rows. Logits `[B, T, V]`.
    pub fn forward_cached<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        cache: &mut DevKvCache,
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<DTensor> {
        let h0 = self.embed(dev, ids, b, t)?;
        let start = cache.len();
        let pos: Vec<u32> = (start as u32..(start + t) as u32).collect();
        let h = self.backbone_hidden(
            dev,
            &h0,
            &pos,
            &self.attn_params(start, vec![]),
            Some(&mut *cache),
        )?;
        cache.commit(t)?;
        self.head(dev, &h)
    }

    /// Causal attention parameters (`Ddit::attn_params`).
    pub fn attn_params(&self, q_start: usize, key_skip: Vec<usize>) -> AttnParams {
        AttnParams {
            pattern: kf_ops::attention::AttnPattern::Causal,
            q_start,
            scale: 1.0 / (self.cfg.head_dim() as f64).sqrt(),
            key_skip,
        }
    }
}

/// The noise encoder on the device (pflm.rs `NoiseEncoder`).
struct DevNoise {
    d: usize,
    eps: f32,
    comb_w: DTensor,
    comb_b: DTensor,
    norm_w: DTensor,
    norm_b: DTensor,
    mlp0_w: DTensor,
    mlp0_b: DTensor,
    mlp2_w: DTensor,
    mlp2_b: DTensor,
}

impl DevNoise {
    /// Hint embeddings `[M, d]` of f64 noises `u [M]` at temperatures `tau [M]`.
    fn forward<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        u: &DTensor,
        tau: &DTensor,
    ) -> Result<DTensor> {
        let (m, d) = (u.numel(), self.d);
        ensure!(
            tau.numel() == m,
            "noise encoder: {m} noises but {} temperatures",
            tau.numel()
        );
        let fu = kl::noise_features(dev, u, d)?;
        let ft = kl::noise_features(dev, tau, d)?;
        // [fu | ft] · W_cᵀ as two GEMMs over the column halves of W_c [d, 2d]
        let x = DTensor::uninit(dev, &[m, d], DType::F32)?;
        let half = |b_off: usize, beta: f32| GemmSpec {
            ldb: 2 * d,
            b_off,
            beta,
            ..GemmSpec::simple(m, d, d, true)
        };
        kl::matmul_into(dev, &half(0, 0.0), &fu, &self.comb_w, &x)?;
        kl::matmul_into(dev, &half(d, 1.0), &ft, &self.comb_w, &x)?;
        let x = kl::bias_add(dev, &x, &self.comb_b)?;
        let y = kl::layer_norm(dev, &x, &self.norm_w, Some(&self.norm_b), self.eps)?.y;
        let y = kl::gelu_erf(dev, &kl::linear(dev, &y, &self.mlp0_w, Some(&self.mlp0_b))?)?;
        let y = kl::linear(dev, &y, &self.mlp2_w, Some(&self.mlp2_b))?;
        kl::add(dev, &x, &y)
    }
}

/// The PFLM student on a kernel device.
pub struct DevPflm {
    pub backbone: DevDdit,
    noise: DevNoise,
    pub k: usize,
}

impl DevPflm {
    /// Uploads an f32 student with f32 weights.
    pub fn upload<D: KernelDevice + ?Sized>(dev: &D, m: &Pflm) -> Result<Self> {
        Self::upload_with(dev, m, WeightStore::F32)
    }

    /// Bytes of the parameters on the device, and the weight matrices' storage.
    pub fn weight_bytes(&self) -> WeightBytes {
        let mut wb = self.backbone.weight_bytes();
        let n = &self.noise;
        for (t, matrix) in [
            (&n.comb_w, true),
            (&n.comb_b, false),
            (&n.norm_w, false),
            (&n.norm_b, false),
            (&n.mlp0_w, true),
            (&n.mlp0_b, false),
            (&n.mlp2_w, true),
            (&n.mlp2_b, false),
        ] {
            wb.add(t, matrix);
        }
        wb
    }

    /// Uploads an f32 student, its weight matrices stored as `store` says.
    pub fn upload_with<D: KernelDevice + ?Sized>(
        dev: &D,
        m: &Pflm,
        store: WeightStore,
    ) -> Result<Self> {
        let backbone = DevDdit::upload_with(dev, &m.backbone, store)?;
        let d = backbone.cfg.d_model;
        let p = |s: &str| -> Result<DTensor> {
            let name = format!("noise_encoder.{s}");
            let t = m
                .noise
                .param(&name)
                .with_context(|| format!("the student has no parameter {name}"))?;
            if s.ends_with(".weight") && t.rank() == 2 {
                up_matrix(dev, t, &name, store)
            } else {
                up(dev, t, &name)
            }
        };
        let noise = DevNoise {
            d,
            eps: backbone.cfg.ln_eps as f32,
            comb_w: p("combined_proj.weight")?,
            comb_b: p("combined_proj.bias")?,
            norm_w: p("norm.weight")?,
            norm_b: p("norm.bias")?,
            mlp0_w: p("mlp.0.weight")?,
            mlp0_b: p("mlp.0.bias")?,
            mlp2_w: p("mlp.2.weight")?,
            mlp2_b: p("mlp.2.bias")?,
        };
        ensure!(
            noise.comb_w.shape() == [d, 2 * d],
            "noise encoder: combined_proj.weight {:?} must be [d, 2d]",
            noise.comb_w.shape()
        );
        Ok(DevPflm {
            backbone,
            noise,
            k: m.k,
        })
    }

    /// One KV-cached inference pass (`Pflm::step_logits`): host tokens `committed [B, n_new]`
    /// (row-major, n_new may be 0), `pos0[b]` the RoPE position of row b's first new row,
    /// `key_skip` per sequence (empty = none), f64 noises `u [B, K]` on the device, `tau` (one
    /// value or one per sequence). Commits the n_new token rows. Hint logits `[B, K, V]`.
    #[allow(clippy::too_many_arguments)]
    pub fn step_logits<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        cache: &mut DevKvCache,
        committed: &[u32],
        n_new: usize,
        pos0: &[usize],
        key_skip: &[usize],
        u: &DTensor,
        tau: &[f64],
    ) -> Result<DTensor> {
        let bb = &self.backbone;
        u.expect_dtype("PFLM step", "u", DType::F64)?;
        ensure!(
            u.rank() == 2,
            "PFLM step: u must be [B, K], got {:?}",
            u.shape()
        );
        let (b, kk) = (u.shape()[0], u.shape()[1]);
        ensure!(
            kk >= 1 && kk <= self.k,
            "PFLM step: K = {kk} must be in 1..={} (the student's trained k)",
            self.k
        );
        ensure!(
            committed.len() == b * n_new,
            "PFLM step: {} committed tokens for [B, n_new] = [{b}, {n_new}]",
            committed.len()
        );
        ensure!(
            pos0.len() == b,
            "PFLM step: {} positions for B = {b}",
            pos0.len()
        );
        ensure!(
            n_new > 0 || pos0.iter().all(|&p| p >= 1),
            "PFLM step: with no new tokens the hints need a context before them"
        );
        ensure!(
            tau.len() == 1 || tau.len() == b,
            "tau: expected 1 or B = {b} values, got {}",
            tau.len()
        );
        ensure!(
            tau.iter().all(|t| t.is_finite() && *t >= 0.0),
            "tau must be finite and >= 0, got {tau:?}"
        );
        let tv: Vec<f64> = (0..b * kk)
            .map(|r| if tau.len() == 1 { tau[0] } else { tau[r / kk] })
            .collect();
        let dtau = DTensor::from_slice(dev, &tv, &[b * kk])?;
        let du = DTensor::from_buf(dev, dev.alloc(b * kk * 8)?, &[b * kk], DType::F64)?;
        dev.copy(&u.buf, 0, &du.buf, 0, b * kk * 8)?;
        let hints = self
            .noise
            .forward(dev, &du, &dtau)?
            .reshape(&[b, kk, bb.cfg.d_model])?;
        let h0 = if n_new > 0 {
            cat_time(dev, &bb.embed(dev, committed, b, n_new)?, &hints)?
        } else {
            hints
        };
        let mut pos = Vec::with_capacity(b * (n_new + kk));
        for &p in pos0 {
            pos.extend((0..n_new).map(|j| (p + j) as u32));
            pos.extend((1..=kk).map(|i| (p + n_new + i - 1) as u32));
        }
        let attn = bb.attn_params(cache.len(), key_skip.to_vec());
        let h = bb.backbone_hidden(dev, &h0, &pos, &attn, Some(&mut *cache))?;
        cache.commit(n_new)?;
        bb.head(dev, &narrow_time(dev, &h, n_new, kk)?)
    }

    /// [`DevPflm::step_logits`] then the read-off on the device: `vocab_limit` (ids >= it are
    /// never emitted; `counts` is then `[B, limit]`), argmax with frequency penalty (`counts`
    /// u32 updated in place, left to right). Tokens `[B, K]` on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn step<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        cache: &mut DevKvCache,
        committed: &[u32],
        n_new: usize,
        pos0: &[usize],
        key_skip: &[usize],
        u: &DTensor,
        tau: &[f64],
        penalty: f64,
        vocab_limit: Option<usize>,
        counts: &DTensor,
    ) -> Result<Vec<u32>> {
        let logits = self.step_logits(dev, cache, committed, n_new, pos0, key_skip, u, tau)?;
        let v = self.backbone.cfg.vocab_size;
        let logits = match vocab_limit.filter(|&l| l < v) {
            Some(l) => narrow_last(dev, &logits, l)?,
            None => logits,
        };
        let toks = kl::argmax_penalty(dev, &logits, counts, penalty)?;
        kl::tokens_to_host(dev, &toks)
    }
}

/// What both device generation loops start from: the left-padded prompts, their lengths,
/// an empty result, and the vocabulary columns read (`vocab_limit`).
struct Start {
    nb: usize,
    lp: LeftPadded,
    lens: Vec<usize>,
    out: Generated,
    done: Vec<bool>,
    v_read: usize,
}

impl Start {
    /// Also refuses `use_cache = false` (only the KV-cached path runs on a kernel device).
    fn new<D: KernelDevice + ?Sized>(
        dev: &D,
        cfg: &DditConfig,
        prompts: &[Vec<u32>],
        o: &crate::generate::GenerateOptions,
    ) -> Result<Start> {
        ensure!(
            o.use_cache,
            "generate on {}: only the KV-cached path runs on a kernel device (use_cache = true)",
            dev.name()
        );
        let nb = prompts.len();
        Ok(Start {
            nb,
            lp: left_pad(prompts),
            lens: prompts.iter().map(|p| p.len()).collect(),
            out: Generated {
                tokens: vec![Vec::new(); nb],
                stopped_at_eos: vec![false; nb],
                ..Default::default()
            },
            done: vec![false; nb],
            v_read: o
                .vocab_limit
                .filter(|&l| l < cfg.vocab_size)
                .unwrap_or(cfg.vocab_size),
        })
    }
}

/// `generate_pflm` on a kernel device (always with the KV cache, which stays on the device):
/// the same prompts' tail handling, noise stream (`noise_u(seed, first_stream + b, j)`, drawn by
/// the Philox kernel), frequency penalty, `vocab_limit`, EOS and `on_token` order. With equal
/// weights, prompts and options it returns the CPU's tokens (the logits agree to f32 rounding).
pub fn generate_pflm_dev<D: KernelDevice + ?Sized>(
    dev: &D,
    model: &DevPflm,
    prompts: &[Vec<u32>],
    opts: &PflmGenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generated> {
    let cfg = &model.backbone.cfg;
    let o = &opts.base;
    check_request(cfg, prompts, o)?;
    ensure!(
        opts.k >= 1 && opts.k <= model.k,
        "generate: K = {} must be in 1..={} (the student's trained k)",
        opts.k,
        model.k
    );
    ensure!(
        opts.freq_penalty.is_finite(),
        "generate: the frequency penalty must be finite"
    );
    let tau = [o.tau];
    let Start {
        nb,
        lp:
            LeftPadded {
                lmax,
                skips,
                key_skip,
                mut rows,
            },
        lens,
        mut out,
        mut done,
        v_read,
    } = Start::new(dev, cfg, prompts, o)?;
    let counts = DTensor::zeros(dev, &[nb, v_read], DType::U32)?;
    let mut cache = DevKvCache::new(dev, cfg, nb, lmax + o.max_new + opts.k)?;
    let bb = &model.backbone;
    // prefill all but the prompt's last token (pflm.rs module docs)
    if lmax > 1 {
        let t0 = Instant::now();
        let t = lmax - 1;
        let ids: Vec<u32> = rows.iter().flat_map(|r| r[..t].iter().copied()).collect();
        let pos: Vec<u32> = skips
            .iter()
            .flat_map(|&s| (0..t).map(move |i| i.saturating_sub(s) as u32))
            .collect();
        let h0 = bb.embed(dev, &ids, nb, t)?;
        bb.backbone_hidden(
            dev,
            &h0,
            &pos,
            &bb.attn_params(0, key_skip.clone()),
            Some(&mut cache),
        )?;
        cache.commit(t)?;
        out.passes += 1;
        out.prefill_secs = t0.elapsed().as_secs_f64();
    }
    let t_dec = Instant::now();
    let mut pending: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| vec![*r.last().expect("non-empty")])
        .collect();
    let mut pos0: Vec<usize> = lens.iter().map(|&l| l - 1).collect();
    let mut g = 0usize;
    while g < o.max_new && !done.iter().all(|&d| d) {
        let kk = opts.k.min(o.max_new - g);
        // u[b, i] = noise_u(seed, first_stream + b, g + i): Philox uniforms on the device
        let u = DTensor::from_buf(dev, dev.alloc(nb * kk * 8)?, &[nb, kk], DType::F64)?;
        for b in 0..nb {
            let ub = kl::philox_uniform_f64(dev, kk, o.seed, o.first_stream + b as u64, g as u64)?;
            dev.copy(&ub.buf, 0, &u.buf, b * kk * 8, kk * 8)?;
        }
        let n_new = pending[0].len();
        let ids: Vec<u32> = pending.iter().flatten().copied().collect();
        let toks = model.step(
            dev,
            &mut cache,
            &ids,
            n_new,
            &pos0,
            &key_skip,
            &u,
            &tau,
            opts.freq_penalty,
            o.vocab_limit,
            &counts,
        )?;
        for (p, pend) in pos0.iter_mut().zip(&pending) {
            *p += pend.len();
        }
        out.passes += 1;
        for b in 0..nb {
            let w = &toks[b * kk..(b + 1) * kk];
            pending[b] = w.to_vec();
            rows[b].extend_from_slice(w);
            if done[b] {
                continue;
            }
            for &tok in w {
                out.tokens[b].push(tok);
                on_token(b, tok)?;
                if Some(tok) == o.eos {
                    done[b] = true;
                    out.stopped_at_eos[b] = true;
                    break;
                }
            }
        }
        g += kk;
    }
    out.decode_secs = t_dec.elapsed().as_secs_f64();
    Ok(out)
}

/// The last-row logits `[B, V']` of a `[B, T, V]` logits tensor, keeping the first `v_read`
/// columns (the `vocab_limit` of a request: the CPU path sets the rest to -inf, which gives the
/// sampler the same CDF over the kept ones).
fn last_row_logits<D: KernelDevice + ?Sized>(
    dev: &D,
    logits: &DTensor,
    v_read: usize,
) -> Result<DTensor> {
    let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let out = DTensor::uninit(dev, &[b, v_read], DType::F32)?;
    for i in 0..b {
        dev.copy(
            &logits.buf,
            4 * ((i * t + t - 1) * v),
            &out.buf,
            4 * i * v_read,
            4 * v_read,
        )?;
    }
    Ok(out)
}

/// `generate` (AR sampling, KV-cached) on a kernel device: the same left padding, positions,
/// noise stream (`noise_u(seed, first_stream + b, j)`, drawn by the Philox kernel), fused
/// inverse-CDF sampling at `tau` (0 = greedy), `vocab_limit`, EOS and `on_token` order; with
/// equal weights it returns the CPU's tokens (the logits agree to f32 rounding).
pub fn generate_ar_dev<D: KernelDevice + ?Sized>(
    dev: &D,
    model: &DevDdit,
    prompts: &[Vec<u32>],
    o: &crate::generate::GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generated> {
    let cfg = &model.cfg;
    check_request(cfg, prompts, o)?;
    let Start {
        nb,
        lp:
            LeftPadded {
                lmax,
                skips,
                key_skip,
                mut rows,
            },
        lens,
        mut out,
        mut done,
        v_read,
    } = Start::new(dev, cfg, prompts, o)?;
    let mut cache = DevKvCache::new(dev, cfg, nb, lmax + o.max_new - 1)?;
    // prefill: the whole left-padded prompts, logits of the last row
    let t0 = Instant::now();
    let ids: Vec<u32> = rows.iter().flatten().copied().collect();
    let pos: Vec<u32> = skips
        .iter()
        .flat_map(|&s| (0..lmax).map(move |i| i.saturating_sub(s) as u32))
        .collect();
    let h0 = model.embed(dev, &ids, nb, lmax)?;
    let h = model.backbone_hidden(
        dev,
        &h0,
        &pos,
        &model.attn_params(0, key_skip.clone()),
        Some(&mut cache),
    )?;
    cache.commit(lmax)?;
    let last = narrow_time(dev, &h, lmax - 1, 1)?;
    let mut logits = last_row_logits(dev, &model.head(dev, &last)?, v_read)?;
    dev.synchronize()?;
    out.passes += 1;
    out.prefill_secs = t0.elapsed().as_secs_f64();
    let t_dec = Instant::now();
    for j in 0..o.max_new {
        let u = DTensor::from_buf(dev, dev.alloc(nb * 8)?, &[nb], DType::F64)?;
        for b in 0..nb {
            let ub = kl::philox_uniform_f64(dev, 1, o.seed, o.first_stream + b as u64, j as u64)?;
            dev.copy(&ub.buf, 0, &u.buf, b * 8, 8)?;
        }
        let toks = kl::tokens_to_host(dev, &kl::sample_inverse_cdf(dev, &logits, &u, o.tau)?)?;
        for b in 0..nb {
            if done[b] {
                continue;
            }
            out.tokens[b].push(toks[b]);
            on_token(b, toks[b])?;
            if Some(toks[b]) == o.eos {
                done[b] = true;
                out.stopped_at_eos[b] = true;
            }
        }
        if j + 1 == o.max_new || done.iter().all(|&d| d) {
            break;
        }
        // feed the sampled token (a finished sequence repeats its last one; ignored)
        for (b, r) in rows.iter_mut().enumerate() {
            r.push(*out.tokens[b].last().expect("a token per step until done"));
        }
        let ids: Vec<u32> = rows.iter().map(|r| *r.last().expect("non-empty")).collect();
        let pos: Vec<u32> = lens.iter().map(|&l| (l + j) as u32).collect();
        let h0 = model.embed(dev, &ids, nb, 1)?;
        let attn = model.attn_params(cache.len(), key_skip.clone());
        let h = model.backbone_hidden(dev, &h0, &pos, &attn, Some(&mut cache))?;
        cache.commit(1)?;
        logits = last_row_logits(dev, &model.head(dev, &h)?, v_read)?;
        out.passes += 1;
    }
    out.decode_secs = t_dec.elapsed().as_secs_f64();
    Ok(out)
}

// ------------------------------------------------------------------ distillation targets

impl DevPflm {
    /// Hint embeddings `[B, M, d]` of host noises `u [B, M]` (row-major) at one temperature.
    fn hints_host<D: KernelDevice + ?Sized>(
        &self,
        dev: &D,
        u: &[f64],
        b: usize,
        m: usize,
        tau: f64,
    ) -> Result<DTensor> {
        ensure!(
            u.len() == b * m,
            "hints: {} noises for [B, M] = [{b}, {m}]",
            u.len()
        );
        let du = DTensor::from_slice(dev, u, &[b * m])?;
        let dt = DTensor::from_slice(dev, &vec![tau; b * m], &[b * m])?;
        self.noise
            .forward(dev, &du, &dt)?
            .reshape(&[b, m, self.backbone.cfg.d_model])
    }
}

/// Checks a context `[B, N]` of host ids, its noises (`per` per position) and `tau`.
fn check_ctx(ctx: &[u32], b: usize, n: usize, u: &[f64], per: usize, tau: f64) -> Result<()> {
    ensure!(
        b >= 1 && n >= 1,
        "context [B, N] = [{b}, {n}]: B and N must be >= 1"
    );
    ensure!(
        ctx.len() == b * n,
        "context: {} ids for [B, N] = [{b}, {n}]",
        ctx.len()
    );
    ensure!(
        u.len() == b * n * per,
        "noises: {} values for [B, N, {per}] = [{b}, {n}, {per}]",
        u.len()
    );
    ensure!(
        tau.is_finite() && tau >= 0.0,
        "tau must be finite and >= 0, got {tau}"
    );
    Ok(())
}

/// The AR teacher's full-sequence logits `[B, T, V]` of host ids `[B, T]` (positions `0..T`,
/// causal; `Ddit::forward_train` off the tape), on the host (row-major).
pub fn teacher_logits_dev<D: KernelDevice + ?Sized>(
    dev: &D,
    teacher: &DevDdit,
    ids: &[u32],
    b: usize,
    t: usize,
) -> Result<Vec<f32>> {
    ensure!(b >= 1, "teacher logits: B must be >= 1");
    teacher
        .forward(dev, ids, b, t)?
        .to_vec::<D, f32>(dev)
        .context("teacher logits to the host")
}

/// Stage-1 targets (`pflm::stage1_targets`) on a kernel device: the AR teacher's
/// full-sequence logits of `ctx [B, N]`, then the inverse-CDF sampler (`sample_inverse_cdf`)
/// on every row with `u [B, N]` at temperature `tau`. Targets `[B, N]` on the host.
pub fn stage1_targets_dev<D: KernelDevice + ?Sized>(
    dev: &D,
    teacher: &DevDdit,
    ctx: &[u32],
    b: usize,
    n: usize,
    u: &[f64],
    tau: f64,
) -> Result<Vec<u32>> {
    check_ctx(ctx, b, n, u, 1, tau).context("stage-1 targets")?;
    let v = teacher.cfg.vocab_size;
    let logits = teacher.forward(dev, ctx, b, n)?.reshape(&[b * n, v])?;
    let du = DTensor::from_slice(dev, u, &[b * n])?;
    let toks = kl::sample_inverse_cdf(dev, &logits, &du, tau)?;
    kl::tokens_to_host(dev, &toks).context("stage-1 targets")
}

/// The k -> 2k teacher rollout (`Pflm::rollout_double`) on a kernel device, with the student
/// `teacher` (window `k = teacher.k`): ctx `[B, N]`, noises `u [B, N, 2k]`, one `tau`. The
/// context's K/V go once into a device cache; pass 1 runs the N k hints of `u[.., ..k]` over
/// it (staircase, q_start = N) and reads off F1 by argmax; pass 2 runs `[F1 tokens | hints of
/// u[.., k..]]` (double staircase, q_start = N) and reads off F2 at its hints (argmax, no
/// penalty). Tokens `[B, N, 2k]` = `[F1 | F2]` per window, on the host.
pub fn rollout_double_dev<D: KernelDevice + ?Sized>(
    dev: &D,
    teacher: &DevPflm,
    ctx: &[u32],
    b: usize,
    n: usize,
    u: &[f64],
    tau: f64,
) -> Result<Vec<u32>> {
    let k = teacher.k;
    let k2 = 2 * k;
    check_ctx(ctx, b, n, u, k2, tau).context("double rollout")?;
    let bb = &teacher.backbone;
    let cfg = &bb.cfg;
    let (v, nk) = (cfg.vocab_size, n * k);
    let (mut u1, mut u2) = (Vec::with_capacity(b * nk), Vec::with_capacity(b * nk));
    for w in u.chunks_exact(k2) {
        u1.extend_from_slice(&w[..k]);
        u2.extend_from_slice(&w[k..]);
    }
    let mut cache = DevKvCache::new(dev, cfg, b, n + 2 * nk)?;
    // context K/V once (the hidden output of these rows is not needed)
    let pos: Vec<u32> = (0..n as u32).collect();
    bb.backbone_hidden(
        dev,
        &bb.embed(dev, ctx, b, n)?,
        &pos,
        &bb.attn_params(0, vec![]),
        Some(&mut cache),
    )
    .context("double rollout: context")?;
    cache.commit(n)?;
    let pattern = |p| AttnParams {
        pattern: p,
        ..bb.attn_params(n, vec![])
    };
    // pass 1: the N k hints over the cached context (staircase, q_start = N)
    let mut p1 = Vec::with_capacity(2 * nk);
    for t in 0..n {
        p1.extend((1..=k).map(|i| (t + i) as u32));
    }
    let h = bb
        .backbone_hidden(
            dev,
            &teacher.hints_host(dev, &u1, b, nk, tau)?,
            &p1,
            &pattern(AttnPattern::Staircase { n, k }),
            Some(&mut cache),
        )
        .context("double rollout: pass 1")?;
    cache.commit(0)?;
    let counts = DTensor::zeros(dev, &[b, v], DType::U32)?;
    let f1 = kl::argmax_penalty(dev, &bb.head(dev, &h)?, &counts, 0.0)?; // [B, N k]
    let f1 = kl::tokens_to_host(dev, &f1).context("double rollout: F1")?;
    // pass 2: [F1 tokens | F2 hints] over the same cached context (double staircase)
    let mut p2 = p1;
    p2.extend((0..n).flat_map(|t| (1..=k).map(move |i| (t + k + i) as u32)));
    let h0 = cat_time(
        dev,
        &bb.embed(dev, &f1, b, nk)?,
        &teacher.hints_host(dev, &u2, b, nk, tau)?,
    )?;
    let h = bb
        .backbone_hidden(
            dev,
            &h0,
            &p2,
            &pattern(AttnPattern::DoubleStaircase { n, k }),
            Some(&mut cache),
        )
        .context("double rollout: pass 2")?;
    cache.commit(0)?;
    let logits = bb.head(dev, &narrow_time(dev, &h, nk, nk)?)?;
    let f2 = kl::argmax_penalty(dev, &logits, &counts, 0.0)?;
    let f2 = kl::tokens_to_host(dev, &f2).context("double rollout: F2")?;
    let mut out = Vec::with_capacity(b * n * k2);
    for w in 0..b * n {
        out.extend_from_slice(&f1[w * k..(w + 1) * k]);
        out.extend_from_slice(&f2[w * k..(w + 1) * k]);
    }
    Ok(out)
}
