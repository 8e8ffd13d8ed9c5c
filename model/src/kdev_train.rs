//! Training steps on a kernel device (`kf_ops::kdev::KernelDevice`: the CPU emulator of
//! kernels/*.cu or a GPU), equal to the CPU trainer's step
//! (`train::optim::Trainer::train_step`): the AR teacher on `TeacherTask`'s loss (mean
//! next-token cross-entropy of `Ddit::forward_train`), and a PFLM student on the
//! distillation stage's loss (`Pflm::forward_staircase` on `[context | hints]`, mean
//! cross-entropy of the hint rows against given targets, e.g. `pflm::stage1_targets`).
//! Each is a forward with saved activations, a hand-written backward through every layer
//! (llm.c style: each op's gradient from its saved inputs) including the noise encoder, and
//! the update: gradient accumulation, the global grad-norm clip and AdamW with the CPU
//! trainer's hyper-parameters, schedule, decay rule (rank >= 2 only) and step numbering.
//! The same forward code without saved activations evaluates: `eval_loss` (the teacher's
//! loss) and `staircase_eval` (a student's per-target losses and argmax predictions, as
//! `DistillTask::window_loss`). Any staircase window kk >= 1 (stage 1, and k -> 2k).
//!
//! The forward is the CPU model's, op for op: q, k and v are three GEMMs against the row
//! blocks of `attn_qkv.weight` (the CPU's one GEMM and zero-copy split, so the same values up
//! to summation order), RoPE uses the CPU op's f64 tables cast to f32, attention the
//! flash-style kernels (causal or staircase, scale 1/sqrt(Dh)). Backward of the fused qkv:
//! `dW_qkv`'s row blocks are written by three GEMMs, `dx` sums three GEMMs (beta = 1).
//! Training configs have no mask token (`TrainConfig::model_config` clears it); a config
//! with one is refused. Letters: B batch, T time, N = B T rows (the teacher), d width,
//! H heads, Dh = d / H, V vocabulary, L layers; staircase: N context positions, kk hints per
//! position, M = N kk hint rows per sequence.

use crate::config::DditConfig;
use crate::ddit::Ddit;
use crate::kdev_model::{cat_time, narrow_time};
use crate::pflm::Pflm;
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
/// Parameters of the noise encoder (`pflm::noise_param_specs` order), after the backbone's.
const NOISE_PARAMS: usize = 8;
const NC_W: usize = 0;
const NC_B: usize = 1;
const NLN_W: usize = 2;
const NLN_B: usize = 3;
const N0_W: usize = 4;
const N0_B: usize = 5;
const N2_W: usize = 6;
const N2_B: usize = 7;

/// One micro-batch: u32 inputs and next-token targets, both `[B, T]` row-major.
#[derive(Clone, Debug)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
}

/// One staircase micro-batch of a PFLM student (`Pflm::forward_staircase` + mean
/// cross-entropy against `targets`): u32 context `[B, N]`, f64 noises `u [B, N, kk]`, one
/// temperature, u32 targets `[B, N, kk]` (row-major).
#[derive(Clone, Debug)]
pub struct StairBatch {
    pub b: usize,
    pub n: usize,
    pub kk: usize,
    pub ctx: Vec<u32>,
    pub u: Vec<f64>,
    pub tau: f64,
    pub targets: Vec<u32>,
}

/// Per-target cross-entropies `[B N kk]` and the student's argmax predictions (same order).
pub type TargetRows = (Vec<f64>, Vec<u32>);

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
struct BlockSaved {
    h_in: DTensor,
    ln1: LayerNormOut,
    /// q, k after RoPE, v: `[B, T, H, Dh]` contiguous.
    q: DTensor,
    k: DTensor,
    v: DTensor,
    att: AttnOut,
    h_mid: DTensor,
    ln2: LayerNormOut,
    /// MLP pre-activation and activation `[N, 4d]`.
    m_pre: DTensor,
    act: DTensor,
}

/// The cos and sin tables of one position list.
type Tables<'a> = (&'a DTensor, &'a DTensor);
/// The residual stream after the last block, and each block's saved activations.
type BackboneOut = (DTensor, Vec<BlockSaved>);
/// The final LayerNorm (with its statistics) and the logits.
type HeadOut = (LayerNormOut, DTensor);

/// RoPE tables of positions `pos [T]`: (pos, cos, sin), `[T, Dh/2]` f32.
type RopeAt = (Vec<u32>, DTensor, DTensor);

/// What the teacher's forward leaves for the loss and the backward (`blocks` empty when the
/// forward did not save them).
struct TeacherFwd {
    ids: DTensor,
    targets: DTensor,
    pos: Vec<u32>,
    ap: AttnParams,
    /// The residual stream after the last block `[B T, d]`.
    h: DTensor,
    blocks: Vec<BlockSaved>,
    lnf: LayerNormOut,
    logits: DTensor,
    ce: bw::CrossEntropy,
    /// The mean cross-entropy on the host.
    loss: f64,
}

/// The noise encoder's activations that its backward reads.
struct NoiseSaved {
    /// Noise features of u and tau `[B M, d]`.
    fu: DTensor,
    ft: DTensor,
    /// `combined_proj`'s output `[B M, d]`, its LayerNorm, the MLP pre-activation and
    /// activation `[B M, 4d]`.
    x: DTensor,
    ln: LayerNormOut,
    m_pre: DTensor,
    act: DTensor,
}

/// What a PFLM student's staircase forward leaves for the loss and the backward (`blocks`
/// empty when the forward did not save them).
struct StairFwd {
    /// (B, N, kk).
    shape: (usize, usize, usize),
    ctx: DTensor,
    targets: DTensor,
    pos: Vec<u32>,
    ap: AttnParams,
    noise: NoiseSaved,
    blocks: Vec<BlockSaved>,
    /// The hint rows of the last block's output `[B M, d]`.
    hh: DTensor,
    lnf: LayerNormOut,
    /// `[B M, V]`.
    logits: DTensor,
    ce: bw::CrossEntropy,
    loss: f64,
}

/// The teacher's parameters, AdamW moments and step on a kernel device.
pub struct DevTrainer<'d, D: KernelDevice + ?Sized> {
    dev: &'d D,
    cfg: DditConfig,
    opt: OptimConfig,
    names: Vec<String>,
    params: Vec<DTensor>,
    m: Vec<DTensor>,
    v: Vec<DTensor>,
    decay: Vec<bool>,
    /// RoPE tables per position list.
    rope: Vec<RopeAt>,
    /// A PFLM student: the window k (its noise encoder's parameters follow the backbone's).
    noise: Option<usize>,
    step: u64,
}

fn gemm<D: KernelDevice + ?Sized>(
    dev: &D,
    spec: &GemmSpec,
    a: &DTensor,
    b: &DTensor,
    c: &DTensor,
) -> Result<()> {
    bw::gemm(dev, spec, a, b, c)
}

impl<'d, D: KernelDevice + ?Sized> DevTrainer<'d, D> {
    /// Uploads the AR teacher's f32 parameters (checkpoint order); moments start at zero,
    /// step 0.
    pub fn new(dev: &'d D, model: &Ddit, opt: OptimConfig) -> Result<DevTrainer<'d, D>> {
        ensure!(
            model.cfg.k.is_none(),
            "device trainer: {model:?} is a PFLM backbone (use new_pflm)"
        );
        Self::upload(dev, &model.cfg, model.params(), opt, None)
    }

    /// Uploads a PFLM student's f32 parameters (`Pflm::params` order: backbone, then noise
    /// encoder) for staircase training ([`Self::train_step_staircase`]).
    pub fn new_pflm(dev: &'d D, model: &Pflm, opt: OptimConfig) -> Result<DevTrainer<'d, D>> {
        Self::upload(dev, model.cfg(), &model.params(), opt, Some(model.k))
    }

    fn upload(
        dev: &'d D,
        cfg: &DditConfig,
        named: &[(String, Tensor)],
        opt: OptimConfig,
        noise: Option<usize>,
    ) -> Result<DevTrainer<'d, D>> {
        opt.validate()?;
        let cfg = cfg.clone();
        ensure!(
            cfg.mask_token_id.is_none(),
            "device trainer: training has no mask token (config sets {:?})",
            cfg.mask_token_id
        );
        ensure!(
            matches!(cfg.head_dim(), 64 | 128),
            "device trainer: head dim {} has no attention kernel (64 or 128)",
            cfg.head_dim()
        );
        let want =
            1 + cfg.n_layers * PER_BLOCK + 3 + if noise.is_some() { NOISE_PARAMS } else { 0 };
        ensure!(
            named.len() == want,
            "device trainer: {} parameters, the config needs {want}",
            named.len()
        );
        let mut names = vec![];
        let (mut params, mut m, mut v, mut decay) = (vec![], vec![], vec![], vec![]);
        for (name, t) in named {
            ensure!(
                t.dtype() == DType::F32,
                "device trainer: parameter {name} is {}, training keeps f32 parameters",
                t.dtype()
            );
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
            noise,
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

    fn p(&self, i: usize) -> &DTensor {
        &self.params[i]
    }
    fn bi(&self, layer: usize, which: usize) -> usize {
        1 + layer * PER_BLOCK + which
    }
    fn final_idx(&self) -> usize {
        1 + self.cfg.n_layers * PER_BLOCK
    }

    fn attn_params(&self, pattern: AttnPattern) -> AttnParams {
        AttnParams {
            pattern,
            q_start: 0,
            scale: 1.0 / (self.cfg.head_dim() as f64).sqrt(),
            key_skip: vec![],
        }
    }

    /// The RoPE tables of positions `pos`: the CPU op's f64 tables cast to f32.
    fn rope_tables(&mut self, pos: &[u32]) -> Result<()> {
        if self.rope.iter().any(|r| r.0 == pos) {
            return Ok(());
        }
        let hd = self.cfg.head_dim();
        let (c, s) = kf_ops::rope::rope_tables(pos, hd, self.cfg.rope_base);
        let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let cos = DTensor::from_slice(self.dev, &f(c), &[pos.len(), hd / 2])?;
        let sin = DTensor::from_slice(self.dev, &f(s), &[pos.len(), hd / 2])?;
        self.rope.push((pos.to_vec(), cos, sin));
        Ok(())
    }

    fn tables(&self, pos: &[u32]) -> Result<Tables<'_>> {
        let r = self
            .rope
            .iter()
            .find(|r| r.0 == pos)
            .context("RoPE tables are made before the pass")?;
        Ok((&r.1, &r.2))
    }

    /// `x [N, d] · W[rows r0.. r0+n of w]ᵀ`: `[N, n]` (one row block of a fused weight).
    fn linear_rows(&self, x: &DTensor, w: &DTensor, r0: usize, n: usize) -> Result<DTensor> {
        let (rows, k) = (x.numel() / x.shape()[x.rank() - 1], x.shape()[x.rank() - 1]);
        let out = DTensor::uninit(self.dev, &[rows, n], DType::F32)?;
        let spec = GemmSpec {
            b_off: r0 * k,
            ..GemmSpec::simple(rows, n, k, true)
        };
        gemm(self.dev, &spec, x, w, &out)?;
        Ok(out)
    }

    /// The blocks on input embeddings `h0 [B T, d]` at positions `pos [T]` (tables made
    /// first) with attention `ap`: the residual stream after the last block and, with
    /// `save`, what the backward reads (without it each block's activations are dropped as
    /// soon as the next block has its input: a forward-only pass, the list empty).
    fn backbone_fwd(
        &self,
        h0: DTensor,
        (b, t): (usize, usize),
        pos: &[u32],
        ap: &AttnParams,
        save: bool,
    ) -> Result<BackboneOut> {
        let dev = self.dev;
        let c = &self.cfg;
        let (d, nh, hd) = (c.d_model, c.n_heads, c.head_dim());
        let n = b * t;
        let eps = c.ln_eps as f32;
        let mut h = h0.reshape(&[n, d])?;
        let dims = AttnDims {
            b,
            h: nh,
            d: hd,
            tq: t,
            tk: t,
        };
        let (cos, sin) = self.tables(pos)?;
        let mut blocks = Vec::with_capacity(if save { c.n_layers } else { 0 });
        for layer in 0..c.n_layers {
            let ln1 = fw::layer_norm(dev, &h, self.p(self.bi(layer, NORM1)), None, eps)?;
            let wqkv = self.p(self.bi(layer, QKV));
            let part = |i: usize| -> Result<DTensor> {
                self.linear_rows(&ln1.y, wqkv, i * d, d)?
                    .reshape(&[b, t, nh, hd])
            };
            let q = fw::rope(dev, &part(0)?, cos, sin)?;
            let k = fw::rope(dev, &part(1)?, cos, sin)?;
            let v = part(2)?;
            let att = fw::attention(
                dev,
                AttnView::contiguous(&q)?,
                AttnView::contiguous(&k)?,
                AttnView::contiguous(&v)?,
                dims,
                ap,
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
            let h_in = std::mem::replace(&mut h, h_out);
            if !save {
                continue;
            }
            blocks.push(BlockSaved {
                h_in,
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
        Ok((h, blocks))
    }

    /// The final layer on rows `h [R, d]`: LN_f (weight only) and the output linear.
    fn head_fwd(&self, h: &DTensor) -> Result<HeadOut> {
        let f = self.final_idx();
        let lnf = fw::layer_norm(self.dev, h, self.p(f), None, self.cfg.ln_eps as f32)?;
        let logits = fw::linear(self.dev, &lnf.y, self.p(f + 1), Some(self.p(f + 2)))?;
        Ok((lnf, logits))
    }

    /// Backward of the mean cross-entropy and the head: the gradient of the head's input rows
    /// `h [R, d]` (the head's parameter gradients go to `grads`).
    fn loss_head_bwd(
        &self,
        h: &DTensor,
        lnf: &LayerNormOut,
        logits: &DTensor,
        targets: &DTensor,
        ce: &bw::CrossEntropy,
        grads: &mut [Option<DTensor>],
    ) -> Result<DTensor> {
        let dev = self.dev;
        let one = DTensor::from_slice(dev, &[1.0f32], &[1])?;
        let dlogits = bw::cross_entropy_bwd(dev, logits, targets, ce, &one, None)?;
        let fi = self.final_idx();
        let head =
            bw::linear_bwd(dev, &lnf.y, self.p(fi + 1), &dlogits, true).context("output layer")?;
        grads[fi + 1] = Some(head.dw);
        grads[fi + 2] = head.db;
        let g = bw::layer_norm_bwd(dev, h, self.p(fi), &head.dx, &lnf.mean, &lnf.rstd, false)
            .context("final LayerNorm")?;
        grads[fi] = Some(g.dw);
        Ok(g.dx)
    }

    /// The hand-written backward of [`Self::backbone_fwd`] from `dh` (the gradient of its
    /// output `[B T, d]`): the gradient of `h0` (the blocks' parameter gradients go to `grads`).
    #[allow(clippy::too_many_arguments)]
    fn backbone_bwd(
        &self,
        blocks: &[BlockSaved],
        mut dh: DTensor,
        (b, t): (usize, usize),
        pos: &[u32],
        ap: &AttnParams,
        grads: &mut [Option<DTensor>],
    ) -> Result<DTensor> {
        let dev = self.dev;
        let c = &self.cfg;
        let (d, nh, hd) = (c.d_model, c.n_heads, c.head_dim());
        let n = b * t;
        let dims = AttnDims {
            b,
            h: nh,
            d: hd,
            tq: t,
            tk: t,
        };
        ensure!(
            blocks.len() == c.n_layers,
            "device backward: {} blocks' activations saved, the model has {} (a forward-only pass saves none)",
            blocks.len(),
            c.n_layers
        );
        let (cos, sin) = self.tables(pos)?;
        for layer in (0..c.n_layers).rev() {
            let s = &blocks[layer];
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
                ap,
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
        Ok(dh)
    }

    fn collect(&self, grads: Vec<Option<DTensor>>) -> Result<Vec<DTensor>> {
        grads
            .into_iter()
            .zip(&self.names)
            .map(|(g, name)| g.with_context(|| format!("no gradient for {name}")))
            .collect()
    }

    /// The teacher's forward on one batch (the CPU's `forward_train` + mean cross-entropy),
    /// shared by [`Self::loss_and_grads`] (`save`: the blocks' activations for the backward)
    /// and [`Self::eval_loss`] (forward only).
    fn teacher_fwd(&mut self, batch: &Batch, save: bool) -> Result<TeacherFwd> {
        let (b, t) = (batch.b, batch.t);
        let c = self.cfg.clone();
        ensure!(
            self.noise.is_none(),
            "device trainer: a PFLM student trains on staircase batches"
        );
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
        // ids >= V: an error before anything runs (the gather would give NaN rows)
        ensure!(
            batch.ids.iter().all(|&i| (i as usize) < c.vocab_size),
            "device forward: an id is outside the vocabulary of {}",
            c.vocab_size
        );
        let pos: Vec<u32> = (0..t as u32).collect();
        self.rope_tables(&pos)?;
        let dev = self.dev;
        let ids = DTensor::from_slice(dev, &batch.ids, &[b, t])?;
        let targets = DTensor::from_slice(dev, &batch.targets, &[b * t])?;
        let h0 = fw::embedding(dev, &ids, self.p(0))?;
        let ap = self.attn_params(AttnPattern::Causal);
        let (h, blocks) = self.backbone_fwd(h0, (b, t), &pos, &ap, save)?;
        let (lnf, logits) = self.head_fwd(&h)?;
        let ce = bw::cross_entropy(dev, &logits, &targets, None)?;
        let loss = ce.mean.to_vec::<D, f32>(dev)?[0] as f64;
        Ok(TeacherFwd {
            ids,
            targets,
            pos,
            ap,
            h,
            blocks,
            lnf,
            logits,
            ce,
            loss,
        })
    }

    /// The teacher's mean next-token cross-entropy of one batch and the gradient of every
    /// parameter (checkpoint order), on the device.
    pub fn loss_and_grads(&mut self, batch: &Batch) -> Result<(f64, Vec<DTensor>)> {
        let (b, t) = (batch.b, batch.t);
        let f = self.teacher_fwd(batch, true)?;
        let mut grads: Vec<Option<DTensor>> = (0..self.params.len()).map(|_| None).collect();
        let dh = self.loss_head_bwd(&f.h, &f.lnf, &f.logits, &f.targets, &f.ce, &mut grads)?;
        let dh0 = self.backbone_bwd(&f.blocks, dh, (b, t), &f.pos, &f.ap, &mut grads)?;
        grads[0] = Some(
            bw::embedding_bwd(self.dev, &f.ids, &dh0, self.cfg.vocab_size).context("embedding")?,
        );
        Ok((f.loss, self.collect(grads)?))
    }

    /// The teacher's mean next-token cross-entropy of one batch, forward only (no
    /// activations kept for a backward, no gradients): the loss [`Self::loss_and_grads`]
    /// returns, from the same forward code.
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f64> {
        Ok(self.teacher_fwd(batch, false)?.loss)
    }

    /// A PFLM student's staircase forward (`Pflm::forward_staircase` on `[context | hints]`,
    /// the logits of the hint rows and their cross-entropy against the targets), shared by
    /// [`Self::staircase_loss_and_grads`] (`save`: the blocks' activations for the backward)
    /// and [`Self::staircase_eval`] (forward only).
    fn staircase_fwd(&mut self, sb: &StairBatch, save: bool) -> Result<StairFwd> {
        ensure!(
            self.noise.is_some(),
            "device trainer: staircase batches train a PFLM student (new_pflm)"
        );
        let c = self.cfg.clone();
        let (b, n, kk) = (sb.b, sb.n, sb.kk);
        ensure!(
            b >= 1 && n >= 1 && kk >= 1,
            "staircase batch: DeviceBuf, N and k must be >= 1"
        );
        let (m, d, v) = (n * kk, c.d_model, c.vocab_size);
        let t = n + m;
        ensure!(
            sb.ctx.len() == b * n && sb.u.len() == b * m && sb.targets.len() == b * m,
            "staircase batch: {} context ids, {} noises, {} targets for B {b}, N {n}, k {kk}",
            sb.ctx.len(),
            sb.u.len(),
            sb.targets.len()
        );
        ensure!(
            sb.tau.is_finite() && sb.tau >= 0.0,
            "tau must be finite and >= 0, got {}",
            sb.tau
        );
        ensure!(
            n - 1 + kk < c.max_seq_len,
            "staircase batch: position {} is beyond the model's max_seq_len {}",
            n - 1 + kk,
            c.max_seq_len
        );
        ensure!(
            sb.ctx.iter().all(|&i| (i as usize) < v),
            "staircase batch: a context id is outside the vocabulary of {v}"
        );
        // context at 0..N, hint i of the window after position p at p + i
        let mut pos: Vec<u32> = (0..n as u32).collect();
        for p in 0..n {
            for i in 1..=kk {
                pos.push((p + i) as u32);
            }
        }
        self.rope_tables(&pos)?;
        let dev = self.dev;
        let eps = c.ln_eps as f32;
        let ctx = DTensor::from_slice(dev, &sb.ctx, &[b, n])?;
        let targets = DTensor::from_slice(dev, &sb.targets, &[b * m])?;
        let emb = fw::embedding(dev, &ctx, self.p(0))?;
        // the noise encoder (pflm.rs): x = [f(u) | f(tau)] W_cᵀ + b_c,
        // e = x + W_2 gelu_erf(W_0 LN(x) + b_0) + b_2
        let nb = self.params.len() - NOISE_PARAMS;
        let np = |i: usize| &self.params[nb + i];
        let uu = DTensor::from_slice(dev, &sb.u, &[b * m])?;
        let tt = DTensor::from_slice(dev, &vec![sb.tau; b * m], &[b * m])?;
        let fu = fw::noise_features(dev, &uu, d)?;
        let ft = fw::noise_features(dev, &tt, d)?;
        let x = DTensor::uninit(dev, &[b * m, d], DType::F32)?;
        for (i, f) in [&fu, &ft].into_iter().enumerate() {
            let spec = GemmSpec {
                ldb: 2 * d,
                b_off: i * d,
                beta: i as f32,
                ..GemmSpec::simple(b * m, d, d, true)
            };
            gemm(dev, &spec, f, np(NC_W), &x)?;
        }
        let x = fw::bias_add(dev, &x, np(NC_B))?;
        let ln = fw::layer_norm(dev, &x, np(NLN_W), Some(np(NLN_B)), eps)?;
        let m_pre = fw::linear(dev, &ln.y, np(N0_W), Some(np(N0_B)))?;
        let act = fw::gelu_erf(dev, &m_pre)?;
        let y = fw::linear(dev, &act, np(N2_W), Some(np(N2_B)))?;
        let e = fw::add(dev, &x, &y)?.reshape(&[b, m, d])?;
        let h0 = cat_time(dev, &emb, &e)?;
        let ap = self.attn_params(AttnPattern::Staircase { n, k: kk });
        let (h, blocks) = self.backbone_fwd(h0, (b, t), &pos, &ap, save)?;
        let hh = narrow_time(dev, &h.reshape(&[b, t, d])?, n, m)?.reshape(&[b * m, d])?;
        let (lnf, logits) = self.head_fwd(&hh)?;
        let ce = bw::cross_entropy(dev, &logits, &targets, None)?;
        let loss = ce.mean.to_vec::<D, f32>(dev)?[0] as f64;
        Ok(StairFwd {
            shape: (b, n, kk),
            ctx,
            targets,
            pos,
            ap,
            noise: NoiseSaved {
                fu,
                ft,
                x,
                ln,
                m_pre,
                act,
            },
            blocks,
            hh,
            lnf,
            logits,
            ce,
            loss,
        })
    }

    /// A PFLM student's staircase loss (`Pflm::forward_staircase` on `[context | hints]`,
    /// then the mean cross-entropy of the hint rows against the targets) and the gradient of
    /// every parameter (`Pflm::params` order), on the device. Any window `kk >= 1`.
    pub fn staircase_loss_and_grads(&mut self, sb: &StairBatch) -> Result<(f64, Vec<DTensor>)> {
        self.staircase_grads(sb, None)
    }

    /// [`Self::staircase_loss_and_grads`]; with `rows`, also pushes the forward's per-target
    /// losses and predictions ([`Self::staircase_eval`]'s) onto it.
    fn staircase_grads(
        &mut self,
        sb: &StairBatch,
        rows: Option<&mut Vec<TargetRows>>,
    ) -> Result<(f64, Vec<DTensor>)> {
        let mut f = self.staircase_fwd(sb, true)?;
        if let Some(out) = rows {
            out.push(self.target_rows(&mut f)?);
        }
        let dev = self.dev;
        let (b, n, kk) = f.shape;
        let (m, d, v) = (n * kk, self.cfg.d_model, self.cfg.vocab_size);
        let t = n + m;
        let nb = self.params.len() - NOISE_PARAMS;
        let np = |i: usize| &self.params[nb + i];
        let mut grads: Vec<Option<DTensor>> = (0..self.params.len()).map(|_| None).collect();
        let dhh = self.loss_head_bwd(&f.hh, &f.lnf, &f.logits, &f.targets, &f.ce, &mut grads)?;
        // the head read only the hint rows: the context rows' gradient is zero
        let dh = DTensor::zeros(dev, &[b * t, d], DType::F32)?;
        for bi in 0..b {
            dev.copy(
                &dhh.buf,
                bi * m * d * 4,
                &dh.buf,
                (bi * t + n) * d * 4,
                m * d * 4,
            )?;
        }
        let dh0 = self
            .backbone_bwd(&f.blocks, dh, (b, t), &f.pos, &f.ap, &mut grads)?
            .reshape(&[b, t, d])?;
        let demb = narrow_time(dev, &dh0, 0, n)?;
        let de = narrow_time(dev, &dh0, n, m)?.reshape(&[b * m, d])?;
        grads[0] = Some(bw::embedding_bwd(dev, &f.ctx, &demb, v).context("embedding")?);
        let s = &f.noise;
        let l2 = bw::linear_bwd(dev, &s.act, np(N2_W), &de, true).context("noise mlp.2")?;
        let dpre = bw::gelu_erf_bwd(dev, &s.m_pre, &l2.dx)?;
        let l0 = bw::linear_bwd(dev, &s.ln.y, np(N0_W), &dpre, true).context("noise mlp.0")?;
        let lg = bw::layer_norm_bwd(dev, &s.x, np(NLN_W), &l0.dx, &s.ln.mean, &s.ln.rstd, true)
            .context("noise norm")?;
        let dx = fw::add(dev, &de, &lg.dx)?;
        // the column halves of dW_c [d, 2d]: dxᵀ f(u) and dxᵀ f(tau)
        let dwc = DTensor::uninit(dev, &[d, 2 * d], DType::F32)?;
        for (i, feat) in [&s.fu, &s.ft].into_iter().enumerate() {
            let spec = GemmSpec {
                trans_a: true,
                lda: d,
                ldc: 2 * d,
                c_off: i * d,
                ..GemmSpec::simple(d, d, b * m, false)
            };
            gemm(dev, &spec, &dx, feat, &dwc).context("noise combined_proj")?;
        }
        grads[nb + NC_W] = Some(dwc);
        grads[nb + NC_B] = Some(bw::colsum(dev, &dx)?);
        grads[nb + NLN_W] = Some(lg.dw);
        grads[nb + NLN_B] = lg.db;
        grads[nb + N0_W] = Some(l0.dw);
        grads[nb + N0_B] = l0.db;
        grads[nb + N2_W] = Some(l2.dw);
        grads[nb + N2_B] = l2.db;
        Ok((f.loss, self.collect(grads)?))
    }

    /// A PFLM student's staircase pass, forward only (no activations kept for a backward, no
    /// gradients): the cross-entropy of every target `[B N kk]` (the row order of
    /// `DistillTask::window_loss`'s per-target losses: sequence, then context position, then
    /// offset) and the student's prediction per target, the argmax of its logits without a
    /// frequency penalty (`argmax_penalty` with zero counts, as the CPU).
    pub fn staircase_eval(&mut self, sb: &StairBatch) -> Result<TargetRows> {
        let mut f = self.staircase_fwd(sb, false)?;
        self.target_rows(&mut f)
    }

    /// The per-target losses and argmax predictions of a staircase forward.
    fn target_rows(&self, f: &mut StairFwd) -> Result<TargetRows> {
        let dev = self.dev;
        let (b, n, kk) = f.shape;
        let v = self.cfg.vocab_size;
        let rows = f.ce.loss.to_vec::<D, f32>(dev)?;
        let flat = f.logits.shape().to_vec();
        f.logits.set_shape(&[b, n * kk, v])?;
        let counts = DTensor::zeros(dev, &[b, v], DType::U32)?;
        let pred = fw::argmax_penalty(dev, &f.logits, &counts, 0.0);
        f.logits.set_shape(&flat)?;
        let pred = fw::tokens_to_host(dev, &pred?).context("staircase predictions")?;
        Ok((rows.into_iter().map(f64::from).collect(), pred))
    }

    /// One update, as `Trainer::train_step`: the gradients of the `grad_accum` micro-batches
    /// summed in order and divided by `grad_accum`, clipped to `grad_clip` by global norm
    /// (`grad_clip / (norm + 1e-6)` when the norm exceeds it), AdamW at `lr_at(i)` with
    /// bias-correction step `i + 1`, decay on parameters of rank >= 2 only. A non-finite loss
    /// or norm returns [`NonFinite`] before any parameter changes.
    pub fn train_step(&mut self, micro: &[Batch]) -> Result<DevStepStats> {
        self.update(micro.len(), |me, j| me.loss_and_grads(&micro[j]))
    }

    /// [`Self::train_step`] for a PFLM student on staircase batches (the distillation
    /// stage's loss).
    pub fn train_step_staircase(&mut self, micro: &[StairBatch]) -> Result<DevStepStats> {
        self.update(micro.len(), |me, j| me.staircase_loss_and_grads(&micro[j]))
    }

    /// [`Self::train_step_staircase`], also returning each micro-batch's per-target losses
    /// and predictions from its training forward (the per-step agreement metrics).
    pub fn train_step_staircase_rows(
        &mut self,
        micro: &[StairBatch],
    ) -> Result<(DevStepStats, Vec<TargetRows>)> {
        let mut rows = Vec::with_capacity(micro.len());
        let st = self.update(micro.len(), |me, j| {
            me.staircase_grads(&micro[j], Some(&mut rows))
        })?;
        Ok((st, rows))
    }

    fn update<F>(&mut self, count: usize, mut loss_fn: F) -> Result<DevStepStats>
    where
        F: FnMut(&mut Self, usize) -> Result<(f64, Vec<DTensor>)>,
    {
        let accum = self.opt.grad_accum;
        ensure!(
            count == accum,
            "device train step: {count} micro-batches, grad_accum is {accum}"
        );
        let dev = self.dev;
        let i = self.step;
        let step1 = i + 1;
        let mut acc: Option<Vec<DTensor>> = None;
        let mut loss_sum = 0.0;
        for j in 0..count {
            let (loss, grads) =
                loss_fn(self, j).with_context(|| format!("step {step1}, micro-batch {j}"))?;
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
        let refs: Vec<&DTensor> = acc.iter().collect();
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

/// The optimizer state in and out of the device (checkpoints; `train::device`).
impl<D: KernelDevice + ?Sized> DevTrainer<'_, D> {
    /// Parameter names and shapes in checkpoint order.
    pub fn param_shapes(&self) -> Vec<(&str, &[usize])> {
        self.names
            .iter()
            .zip(&self.params)
            .map(|(n, p)| (n.as_str(), p.shape()))
            .collect()
    }

    /// Both AdamW moments of every parameter on the host: (name, m, v) in checkpoint order.
    pub fn moments_to_host(&self) -> Result<Vec<(String, Tensor, Tensor)>> {
        self.names
            .iter()
            .zip(self.m.iter().zip(&self.v))
            .map(|(n, (m, v))| Ok((n.clone(), m.download(self.dev)?, v.download(self.dev)?)))
            .collect()
    }

    /// Replaces both moments (f32, checkpoint order, each with its parameter's shape) and
    /// the step count, e.g. from `train::optim::read_optimizer`.
    pub fn load_state(&mut self, step: u64, moments: &[(Tensor, Tensor)]) -> Result<()> {
        ensure!(
            moments.len() == self.params.len(),
            "device trainer: {} moment pairs for {} parameters",
            moments.len(),
            self.params.len()
        );
        let mut fresh = Vec::with_capacity(moments.len());
        for ((m, v), (p, n)) in moments.iter().zip(self.params.iter().zip(&self.names)) {
            ensure!(
                m.shape() == p.shape() && v.shape() == p.shape(),
                "device trainer: moments of {n} are {:?} and {:?}, the parameter is {:?}",
                m.shape(),
                v.shape(),
                p.shape()
            );
            fresh.push((DTensor::upload(self.dev, m)?, DTensor::upload(self.dev, v)?));
        }
        (self.m, self.v) = fresh.into_iter().unzip();
        self.step = step;
        Ok(())
    }
}
