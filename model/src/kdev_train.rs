//! One training step of the AR teacher (the DDiT of `ddit.rs`) on a kernel device
//! (`kf_ops::kdev::KernelDevice`: the CPU emulator of kernels/*.cu now, CUDA later), equal to
//! the CPU trainer's step (`train::optim::Trainer::train_step` on `TeacherTask`'s loss):
//! forward with saved activations, mean next-token cross-entropy, a hand-written backward
//! through every layer (llm.c style: each op's gradient from its saved inputs), the global
//! grad-norm clip and AdamW with the CPU trainer's hyper-parameters, schedule, decay rule
//! (rank >= 2 only) and step numbering.
//!
//! The forward is the CPU model's, op for op: q, k and v are three GEMMs against the row
//! blocks of `attn_qkv.weight` (the CPU's one GEMM and zero-copy split, so the same values up
//! to summation order), RoPE uses the CPU op's f64 tables cast to f32, attention the
//! flash-style kernels (causal, scale 1/sqrt(Dh)). Backward of the fused qkv: `dW_qkv`'s row
//! blocks are written by three GEMMs, `dx` sums three GEMMs (beta = 1).
//! The teacher's config has no mask token (`TrainConfig::model_config` clears it); a config
//! with one is refused. Letters: B batch, T time, N = B T rows, d width, H heads,
//! Dh = d / H, V vocabulary, L layers.

use crate::config::DditConfig;
use crate::ddit::Ddit;
use crate::train::optim::{NonFinite, OptimConfig};
use anyhow::{ensure, Context, Result};
use kf_engine::{DType, Tensor};
use kf_ops::adamw::AdamWConfig;
use kf_ops::attention::{AttnParams, AttnPattern};
use kf_ops::kdev::backward as bw;
use kf_ops::kdev::launch::{self as fw, AttnDims, AttnOut, AttnPath, AttnView, LayerNormOut};
use kf_ops::kdev::{DTensor, GemmSpec, KernelDevice};

/// Parameters per block and their offsets (the order of `ddit::param_specs`).
const PER_BLOCK: usize = 8;
const NORM1: usize = 0;
const QKV: usize = 1;
const OUT: usize = 2;
const NORM2: usize = 3;
const MLP0_W: usize = 4;
const MLP0_B: usize = 5;
const MLP2_W: usize = 6;
const MLP2_B: usize = 7;

/// One micro-batch: u32 inputs and next-token targets, both `[B, T]` row-major.
#[derive(Clone, Debug)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
}

/// What one device update did (the CPU `StepStats` fields that apply).
#[derive(Clone, Debug, PartialEq)]
pub struct DevStepStats {
    /// 1-based number of this update.
    pub step: u64,
    /// Mean of the micro-batch losses.
    pub loss: f64,
    pub lr: f64,
    /// L2 norm of the averaged gradient before clipping.
    pub grad_norm: f64,
}

/// Activations of one block that the backward reads.
struct BlockSaved<B> {
    h_in: DTensor<B>,
    ln1: LayerNormOut<B>,
    /// q, k after RoPE, v: `[B, T, H, Dh]` contiguous.
    q: DTensor<B>,
    k: DTensor<B>,
    v: DTensor<B>,
    att: AttnOut<B>,
    h_mid: DTensor<B>,
    ln2: LayerNormOut<B>,
    /// MLP pre-activation and activation `[N, 4d]`.
    m_pre: DTensor<B>,
    act: DTensor<B>,
}

/// The forward's output: loss pieces and what the backward reads.
struct Forward<B> {
    ids: DTensor<B>,
    targets: DTensor<B>,
    blocks: Vec<BlockSaved<B>>,
    h_last: DTensor<B>,
    lnf: LayerNormOut<B>,
    logits: DTensor<B>,
    ce: bw::CrossEntropy<B>,
}

/// RoPE tables of positions 0..T: (T, cos, sin), `[T, Dh/2]` f32.
type RopeAt<B> = (usize, DTensor<B>, DTensor<B>);

/// The teacher's parameters, AdamW moments and step on a kernel device.
pub struct DevTrainer<'d, D: KernelDevice> {
    dev: &'d D,
    cfg: DditConfig,
    opt: OptimConfig,
    names: Vec<String>,
    params: Vec<DTensor<D::Buf>>,
    m: Vec<DTensor<D::Buf>>,
    v: Vec<DTensor<D::Buf>>,
    decay: Vec<bool>,
    /// RoPE tables per sequence length T.
    rope: Vec<RopeAt<D::Buf>>,
    step: u64,
}

fn gemm<D: KernelDevice>(
    dev: &D,
    spec: &GemmSpec,
    a: &DTensor<D::Buf>,
    b: &DTensor<D::Buf>,
    c: &DTensor<D::Buf>,
) -> Result<()> {
    bw::gemm(dev, spec, a, b, c)
}

impl<'d, D: KernelDevice> DevTrainer<'d, D> {
    /// Uploads the model's f32 parameters (checkpoint order); moments start at zero, step 0.
    pub fn new(dev: &'d D, model: &Ddit, opt: OptimConfig) -> Result<DevTrainer<'d, D>> {
        opt.validate()?;
        let cfg = model.cfg.clone();
        ensure!(
            cfg.mask_token_id.is_none(),
            "device trainer: the AR teacher has no mask token (config sets {:?})",
            cfg.mask_token_id
        );
        ensure!(
            model.dtype() == DType::F32,
            "device trainer: the model is {}, training keeps f32 parameters",
            model.dtype()
        );
        ensure!(
            matches!(cfg.head_dim(), 64 | 128),
            "device trainer: head dim {} has no attention kernel (64 or 128)",
            cfg.head_dim()
        );
        let mut names = vec![];
        let (mut params, mut m, mut v, mut decay) = (vec![], vec![], vec![], vec![]);
        for (name, t) in model.params() {
            names.push(name.clone());
            params.push(
                DTensor::upload(dev, &t.detach()).with_context(|| format!("uploading {name}"))?,
            );
            m.push(DTensor::zeros(dev, t.shape(), DType::F32)?);
            v.push(DTensor::zeros(dev, t.shape(), DType::F32)?);
            decay.push(t.rank() >= 2);
        }
        Ok(DevTrainer {
            dev,
            cfg,
            opt,
            names,
            params,
            m,
            v,
            decay,
            rope: vec![],
            step: 0,
        })
    }

    /// Completed updates.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The parameters on the host, in checkpoint order under their names.
    pub fn params_to_host(&self) -> Result<Vec<(String, Tensor)>> {
        self.names
            .iter()
            .zip(&self.params)
            .map(|(n, p)| Ok((n.clone(), p.download(self.dev)?)))
            .collect()
    }

    fn p(&self, i: usize) -> &DTensor<D::Buf> {
        &self.params[i]
    }
    fn bi(&self, layer: usize, which: usize) -> usize {
        1 + layer * PER_BLOCK + which
    }
    fn final_idx(&self) -> usize {
        1 + self.cfg.n_layers * PER_BLOCK
    }

    fn attn_params(&self) -> AttnParams {
        AttnParams {
            pattern: AttnPattern::Causal,
            q_start: 0,
            scale: 1.0 / (self.cfg.head_dim() as f64).sqrt(),
            key_skip: vec![],
        }
    }

    /// The RoPE tables of positions 0..t: the CPU op's f64 tables cast to f32.
    fn rope_tables(&mut self, t: usize) -> Result<()> {
        if self.rope.iter().any(|r| r.0 == t) {
            return Ok(());
        }
        let hd = self.cfg.head_dim();
        let pos: Vec<u32> = (0..t as u32).collect();
        let (c, s) = kf_ops::rope::rope_tables(&pos, hd, self.cfg.rope_base);
        let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let cos = DTensor::from_slice(self.dev, &f(c), &[t, hd / 2])?;
        let sin = DTensor::from_slice(self.dev, &f(s), &[t, hd / 2])?;
        self.rope.push((t, cos, sin));
        Ok(())
    }

    fn tables(&self, t: usize) -> (&DTensor<D::Buf>, &DTensor<D::Buf>) {
        let r = self
            .rope
            .iter()
            .find(|r| r.0 == t)
            .expect("tables made first");
        (&r.1, &r.2)
    }

    /// `x [N, d] · W[rows r0.. r0+n of w]ᵀ`: `[N, n]` (one row block of a fused weight).
    fn linear_rows(
        &self,
        x: &DTensor<D::Buf>,
        w: &DTensor<D::Buf>,
        r0: usize,
        n: usize,
    ) -> Result<DTensor<D::Buf>> {
        let (rows, k) = (x.numel() / x.shape()[x.rank() - 1], x.shape()[x.rank() - 1]);
        let out = DTensor::uninit(self.dev, &[rows, n], DType::F32)?;
        let spec = GemmSpec {
            b_off: r0 * k,
            ..GemmSpec::simple(rows, n, k, true)
        };
        gemm(self.dev, &spec, x, w, &out)?;
        Ok(out)
    }

    fn forward(&mut self, batch: &Batch) -> Result<Forward<D::Buf>> {
        let (b, t) = (batch.b, batch.t);
        let c = self.cfg.clone();
        let (d, nh, hd) = (c.d_model, c.n_heads, c.head_dim());
        ensure!(
            t >= 1 && t <= c.max_seq_len && b >= 1,
            "device forward: batch [{b}, {t}] (T must be in 1..={})",
            c.max_seq_len
        );
        ensure!(
            batch.ids.len() == b * t && batch.targets.len() == b * t,
            "device forward: {} ids and {} targets for [{b}, {t}]",
            batch.ids.len(),
            batch.targets.len()
        );
        ensure!(
            batch.ids.iter().all(|&i| (i as usize) < c.vocab_size),
            "device forward: an id is outside the vocabulary of {}",
            c.vocab_size
        );
        self.rope_tables(t)?;
        let dev = self.dev;
        let n = b * t;
        let eps = c.ln_eps as f32;
        let ids = DTensor::from_slice(dev, &batch.ids, &[b, t])?;
        let targets = DTensor::from_slice(dev, &batch.targets, &[n])?;
        let mut h = fw::embedding(dev, &ids, self.p(0))?.reshape(&[n, d])?;
        let dims = AttnDims {
            b,
            h: nh,
            d: hd,
            tq: t,
            tk: t,
        };
        let ap = self.attn_params();
        let mut blocks = Vec::with_capacity(c.n_layers);
        for layer in 0..c.n_layers {
            let ln1 = fw::layer_norm(dev, &h, self.p(self.bi(layer, NORM1)), None, eps)?;
            let wqkv = self.p(self.bi(layer, QKV));
            let part = |i: usize| -> Result<DTensor<D::Buf>> {
                self.linear_rows(&ln1.y, wqkv, i * d, d)?
                    .reshape(&[b, t, nh, hd])
            };
            let (cos, sin) = self.tables(t);
            let q = fw::rope(dev, &part(0)?, cos, sin)?;
            let k = fw::rope(dev, &part(1)?, cos, sin)?;
            let v = part(2)?;
            let att = fw::attention(
                dev,
                AttnView::contiguous(&q)?,
                AttnView::contiguous(&k)?,
                AttnView::contiguous(&v)?,
                dims,
                &ap,
                AttnPath::Tiles,
            )?;
            // o [B, T, H, Dh] is [N, d] row-major: the projection reads it as such
            let proj = DTensor::uninit(dev, &[n, d], DType::F32)?;
            gemm(
                dev,
                &GemmSpec::simple(n, d, d, true),
                &att.o,
                self.p(self.bi(layer, OUT)),
                &proj,
            )?;
            let h_mid = fw::add(dev, &h, &proj)?;
            let ln2 = fw::layer_norm(dev, &h_mid, self.p(self.bi(layer, NORM2)), None, eps)?;
            let m_pre = fw::linear(
                dev,
                &ln2.y,
                self.p(self.bi(layer, MLP0_W)),
                Some(self.p(self.bi(layer, MLP0_B))),
            )?;
            let act = fw::gelu_tanh(dev, &m_pre)?;
            let mo = fw::linear(
                dev,
                &act,
                self.p(self.bi(layer, MLP2_W)),
                Some(self.p(self.bi(layer, MLP2_B))),
            )?;
            let h_out = fw::add(dev, &h_mid, &mo)?;
            blocks.push(BlockSaved {
                h_in: std::mem::replace(&mut h, h_out),
                ln1,
                q,
                k,
                v,
                att,
                h_mid,
                ln2,
                m_pre,
                act,
            });
        }
        let f = self.final_idx();
        let lnf = fw::layer_norm(dev, &h, self.p(f), None, eps)?;
        let logits = fw::linear(dev, &lnf.y, self.p(f + 1), Some(self.p(f + 2)))?;
        let ce = bw::cross_entropy(dev, &logits, &targets, None)?;
        Ok(Forward {
            ids,
            targets,
            blocks,
            h_last: h,
            lnf,
            logits,
            ce,
        })
    }
}

impl<'d, D: KernelDevice> DevTrainer<'d, D> {
    /// The mean cross-entropy of one batch and the gradient of every parameter (checkpoint
    /// order), on the device.
    pub fn loss_and_grads(&mut self, batch: &Batch) -> Result<(f64, Vec<DTensor<D::Buf>>)> {
        let f = self.forward(batch)?;
        let loss = f.ce.mean.to_vec::<D, f32>(self.dev)?[0] as f64;
        let grads = self.backward(batch, &f)?;
        Ok((loss, grads))
    }

    /// The hand-written backward of [`Self::forward`], seeded with d(mean loss) = 1.
    fn backward(&self, batch: &Batch, f: &Forward<D::Buf>) -> Result<Vec<DTensor<D::Buf>>> {
        let dev = self.dev;
        let c = &self.cfg;
        let (b, t) = (batch.b, batch.t);
        let (d, nh, hd) = (c.d_model, c.n_heads, c.head_dim());
        let n = b * t;
        let mut grads: Vec<Option<DTensor<D::Buf>>> =
            (0..self.params.len()).map(|_| None).collect();
        let one = DTensor::from_slice(dev, &[1.0f32], &[1])?;
        let dlogits = bw::cross_entropy_bwd(dev, &f.logits, &f.targets, &f.ce, &one, None)?;
        let fi = self.final_idx();
        let head = bw::linear_bwd(dev, &f.lnf.y, self.p(fi + 1), &dlogits, true)
            .context("output layer")?;
        grads[fi + 1] = Some(head.dw);
        grads[fi + 2] = head.db;
        let lnf = bw::layer_norm_bwd(
            dev,
            &f.h_last,
            self.p(fi),
            &head.dx,
            &f.lnf.mean,
            &f.lnf.rstd,
            false,
        )
        .context("final LayerNorm")?;
        grads[fi] = Some(lnf.dw);
        let mut dh = lnf.dx;
        let dims = AttnDims {
            b,
            h: nh,
            d: hd,
            tq: t,
            tk: t,
        };
        let ap = self.attn_params();
        let (cos, sin) = self.tables(t);
        for layer in (0..c.n_layers).rev() {
            let s = &f.blocks[layer];
            let ix = |which: usize| self.bi(layer, which);
            let ctx = |what: &str| format!("block {layer}: {what}");
            // h_out = h_mid + gelu(LN2(h_mid) W0ᵀ + b0) W2ᵀ + b2
            let l2 = bw::linear_bwd(dev, &s.act, self.p(ix(MLP2_W)), &dh, true)
                .with_context(|| ctx("mlp.2"))?;
            grads[ix(MLP2_W)] = Some(l2.dw);
            grads[ix(MLP2_B)] = l2.db;
            let dpre = bw::gelu_tanh_bwd(dev, &s.m_pre, &l2.dx).with_context(|| ctx("gelu"))?;
            let l0 = bw::linear_bwd(dev, &s.ln2.y, self.p(ix(MLP0_W)), &dpre, true)
                .with_context(|| ctx("mlp.0"))?;
            grads[ix(MLP0_W)] = Some(l0.dw);
            grads[ix(MLP0_B)] = l0.db;
            let n2 = bw::layer_norm_bwd(
                dev,
                &s.h_mid,
                self.p(ix(NORM2)),
                &l0.dx,
                &s.ln2.mean,
                &s.ln2.rstd,
                false,
            )
            .with_context(|| ctx("norm2"))?;
            grads[ix(NORM2)] = Some(n2.dw);
            let dh_mid = fw::add(dev, &dh, &n2.dx)?;
            // h_mid = h_in + Attn(RoPE(q), RoPE(k), v) W_oᵀ, o [B, T, H, Dh] read as [N, d]
            let lo = bw::linear_bwd(dev, &s.att.o, self.p(ix(OUT)), &dh_mid, false)
                .with_context(|| ctx("attn_out"))?;
            grads[ix(OUT)] = Some(lo.dw);
            let ag = bw::attention_bwd(
                dev,
                AttnView::contiguous(&s.q)?,
                AttnView::contiguous(&s.k)?,
                AttnView::contiguous(&s.v)?,
                &s.att.o,
                &s.att.lse,
                &lo.dx,
                dims,
                &ap,
            )
            .with_context(|| ctx("attention"))?;
            let dq = bw::rope_bwd(dev, &ag.dq, cos, sin)?;
            let dk = bw::rope_bwd(dev, &ag.dk, cos, sin)?;
            // q | k | v = x1 W_qkv[row block i]ᵀ: dW block i = d_iᵀ x1, dx1 = Σ d_i W_i
            let wqkv = self.p(ix(QKV));
            let dw = DTensor::uninit(dev, &[3 * d, d], DType::F32)?;
            let dx1 = DTensor::uninit(dev, &[n, d], DType::F32)?;
            for (i, g) in [&dq, &dk, &ag.dv].into_iter().enumerate() {
                let spec = GemmSpec {
                    trans_a: true,
                    lda: d,
                    c_off: i * d * d,
                    ..GemmSpec::simple(d, d, n, false)
                };
                gemm(dev, &spec, g, &s.ln1.y, &dw).with_context(|| ctx("dW_qkv"))?;
                let spec = GemmSpec {
                    b_off: i * d * d,
                    beta: if i == 0 { 0.0 } else { 1.0 },
                    ..GemmSpec::simple(n, d, d, false)
                };
                gemm(dev, &spec, g, wqkv, &dx1).with_context(|| ctx("dx of qkv"))?;
            }
            grads[ix(QKV)] = Some(dw);
            let n1 = bw::layer_norm_bwd(
                dev,
                &s.h_in,
                self.p(ix(NORM1)),
                &dx1,
                &s.ln1.mean,
                &s.ln1.rstd,
                false,
            )
            .with_context(|| ctx("norm1"))?;
            grads[ix(NORM1)] = Some(n1.dw);
            dh = fw::add(dev, &dh_mid, &n1.dx)?;
        }
        grads[0] = Some(bw::embedding_bwd(dev, &f.ids, &dh, c.vocab_size).context("embedding")?);
        grads
            .into_iter()
            .zip(&self.names)
            .map(|(g, name)| g.with_context(|| format!("no gradient for {name}")))
            .collect()
    }

    /// One update, as `Trainer::train_step`: the gradients of the `grad_accum` micro-batches
    /// summed in order and divided by `grad_accum`, clipped to `grad_clip` by global norm
    /// (`grad_clip / (norm + 1e-6)` when the norm exceeds it), AdamW at `lr_at(i)` with
    /// bias-correction step `i + 1`, decay on parameters of rank >= 2 only. A non-finite loss
    /// or norm returns [`NonFinite`] before any parameter changes.
    pub fn train_step(&mut self, micro: &[Batch]) -> Result<DevStepStats> {
        let accum = self.opt.grad_accum;
        ensure!(
            micro.len() == accum,
            "device train step: {} micro-batches, grad_accum is {accum}",
            micro.len()
        );
        let dev = self.dev;
        let i = self.step;
        let step1 = i + 1;
        let mut acc: Option<Vec<DTensor<D::Buf>>> = None;
        let mut loss_sum = 0.0;
        for (j, mb) in micro.iter().enumerate() {
            let (loss, grads) = self
                .loss_and_grads(mb)
                .with_context(|| format!("step {step1}, micro-batch {j}"))?;
            if !loss.is_finite() {
                return Err(NonFinite {
                    step: step1,
                    what: "the training loss is",
                    value: loss,
                    micro: Some(j),
                }
                .into());
            }
            loss_sum += loss;
            acc = Some(match acc {
                None => grads,
                Some(a) => a
                    .iter()
                    .zip(&grads)
                    .map(|(x, y)| fw::add(dev, x, y))
                    .collect::<Result<_>>()?,
            });
        }
        let acc = acc.context("no micro-batches")?;
        let inv = 1.0 / accum as f64;
        let refs: Vec<&DTensor<D::Buf>> = acc.iter().collect();
        let sq = bw::sumsq(dev, &refs)?.to_vec::<D, f32>(dev)?[0] as f64;
        let grad_norm = (sq * inv * inv).sqrt();
        if !grad_norm.is_finite() {
            return Err(NonFinite {
                step: step1,
                what: "the gradient norm is",
                value: grad_norm,
                micro: None,
            }
            .into());
        }
        let clip = if self.opt.grad_clip > 0.0 && grad_norm > self.opt.grad_clip {
            self.opt.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let factor = (clip * inv) as f32;
        let lr = self.opt.lr_at(i);
        for (k, g) in acc.into_iter().enumerate() {
            let g = if factor != 1.0 {
                bw::scale(dev, &g, factor)?
            } else {
                g
            };
            let cfg = AdamWConfig {
                lr,
                beta1: self.opt.beta1,
                beta2: self.opt.beta2,
                eps: self.opt.eps,
                weight_decay: if self.decay[k] {
                    self.opt.weight_decay
                } else {
                    0.0
                },
            };
            bw::adamw_step(
                dev,
                &self.params[k],
                &g,
                &self.m[k],
                &self.v[k],
                step1,
                &cfg,
            )
            .with_context(|| format!("step {step1}: AdamW on {}", self.names[k]))?;
        }
        self.step = step1;
        Ok(DevStepStats {
            step: step1,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
        })
    }
}
