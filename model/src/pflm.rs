//! The push-forward student (PFLM) of KFORCING.md sections 4, 5 and 7: the DDiT backbone
//! plus a noise encoder whose output replaces the token embedding at "hint" positions.
//!
//! ```text
//! noise encoder (per hint, independent of its neighbours):
//!   f = [features(u) | features(tau)]          (kf_ops::noise::noise_features, f64, cast; 2d)
//!   x = f W_cᵀ + b_c                             (combined_proj, Linear(2d, d, bias))
//!   e = x + W_2 · gelu_erf(W_0 · LN(x) + b_0) + b_2   (LN with weight AND bias, eps = cfg.ln_eps)
//! positions: hint i (1-based) of the window after context position t sits at RoPE t + i.
//! read-off: argmax (optional frequency penalty, kf_ops::argmax::argmax_penalty).
//! ```
//!
//! Passes (all use `Ddit::backbone_hidden` with an `AttnPattern`; no dense mask):
//! - [`Pflm::forward_staircase`]: `[N context | N·k hints]`, `AttnPattern::Staircase`, every
//!   window of the sequence in one pass, on the tape when trainable (student training).
//! - [`Pflm::rollout_double`]: the k -> 2k teacher rollout. The context K/V are computed ONCE
//!   (a causal prefill into a scratch `KvCache`), then pass 1 = the `N·k` hint rows with
//!   `Staircase` at `q_start = N` over the cached context (uncommitted, dropped), F1 = argmax;
//!   pass 2 = `[N·k F1 tokens | N·k hints]` with `DoubleStaircase` at `q_start = N` over the
//!   same cached context; F2 = argmax. No tape.
//! - [`Pflm::step_logits`] / [`Pflm::step`]: the KV-cached inference step, queries
//!   `[n_new committed | K hints]` over keys `[cache | n_new | K hints]`, causal by absolute
//!   row; only the `n_new` committed rows are committed (hint K/V dropped).
//! - [`generate_pflm`]: prompts -> continuations, K tokens per pass.
//!
//! # The prompt's tail (KFORCING.md section 7)
//!
//! The KV cache always holds every token EXCEPT those committed by the last step: a step's
//! queries are `[tokens committed last step | K hints]`, so those tokens get their K/V (as
//! real tokens) in the same pass that reads the next window. On step 1 "the tokens committed
//! last step" are the prompt's last token: the prefill caches `prompt[..L-1]` (nothing when
//! L = 1), and step 1 feeds `[prompt[L-1] | K hints]`, hint i at position `L - 1 + i`. Every
//! step thus has the same shape `[n_new >= 1 | K]` (n_new = 1 on step 1, K afterwards).
//!
//! # Noise
//!
//! The hint for generated position `j` (0-based after the prompt) of sequence stream `s` uses
//! `generate::noise_u(seed, s, j)` — the same `u` the AR teacher's `generate` consumes at that
//! position, so a perfect student reproduces the teacher's samples for the same seed.
//!
//! # Noise-encoder init (new at stage 1, inherited afterwards)
//!
//! Parameter `i` of [`noise_param_specs`] draws from Philox stream `i` of the seed, as
//! `Ddit::init` does: linear weights `N(0, 0.02²)`, biases 0, LayerNorm weight 1 and bias 0.

use crate::checkpoint::{self, WEIGHTS_FILE};
use crate::config::DditConfig;
use crate::ddit::{Ddit, Init, ParamSpec, INIT_STD};
use crate::generate::{forbid_tail, left_pad, noise_u, GenerateOptions, Generated, LeftPadded};
use crate::kv_cache::KvCache;
use crate::weights::{self, WeightStore};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::autograd::{no_grad, should_record, BackwardOp};
use kf_engine::{io, DType, Device, Tensor};
use kf_ops::argmax::argmax_penalty;
use kf_ops::attention::{AttnParams, AttnPattern};
use kf_ops::gelu::gelu_erf;
use kf_ops::layernorm::layer_norm;
use kf_ops::matmul::{linear, linear_residual};
use kf_ops::noise::noise_features;
use kf_ops::sampling::sample_inverse_cdf;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// `format` metadata of a student's `model.safetensors`.
pub const PFLM_WEIGHTS_FORMAT: &str = "kforcing-pflm";

/// The noise encoder's parameters in checkpoint order (KFORCING.md section 2 names).
pub fn noise_param_specs(d: usize) -> Vec<ParamSpec> {
    let w = Init::Normal(INIT_STD);
    let s = |name: &str, shape: Vec<usize>, init: Init| ParamSpec {
        name: format!("noise_encoder.{name}"),
        shape,
        init,
    };
    vec![
        s("combined_proj.weight", vec![d, 2 * d], w),
        s("combined_proj.bias", vec![d], Init::Zeros),
        s("norm.weight", vec![d], Init::Ones),
        s("norm.bias", vec![d], Init::Zeros),
        s("mlp.0.weight", vec![4 * d, d], w),
        s("mlp.0.bias", vec![4 * d], Init::Zeros),
        s("mlp.2.weight", vec![d, 4 * d], w),
        s("mlp.2.bias", vec![d], Init::Zeros),
    ]
}

/// How a fresh noise encoder's input projection starts (a distillation study knob).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseInit {
    /// Every matrix N(0, 0.02²), biases zero (the spec's default).
    #[default]
    Normal,
    /// `combined_proj.weight` zero: every hint starts as the same all-zero embedding (a
    /// neutral token) and learns its dependence on `u` from there.
    ZeroProj,
}

/// The noise encoder (module docs): `(u, tau)` per hint -> an embedding `[d]`. A clone
/// shares the parameter tensors.
#[derive(Clone)]
pub struct NoiseEncoder {
    d: usize,
    eps: f64,
    params: Vec<(String, Tensor)>,
    trainable: bool,
}

impl std::fmt::Debug for NoiseEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoiseEncoder[d {}, {}]", self.d, self.dtype())
    }
}

impl NoiseEncoder {
    /// Fresh f32 weights (module docs, "Noise-encoder init"). `eps`: the LayerNorm's epsilon.
    pub fn init(d: usize, eps: f64, seed: u64) -> Result<NoiseEncoder> {
        Self::init_with(d, eps, seed, NoiseInit::Normal)
    }

    /// [`Self::init`] with a choice of how the input projection starts.
    pub fn init_with(d: usize, eps: f64, seed: u64, how: NoiseInit) -> Result<NoiseEncoder> {
        ensure!(
            d >= 2 && d % 2 == 0,
            "noise encoder: d = {d} must be even and >= 2"
        );
        let mut params = Vec::new();
        for (stream, spec) in noise_param_specs(d).into_iter().enumerate() {
            let t = match spec.init {
                Init::Ones => Tensor::ones(&spec.shape, DType::F32, Device::Cpu)?,
                Init::Zeros => Tensor::zeros(&spec.shape, DType::F32, Device::Cpu)?,
                Init::Normal(_)
                    if how == NoiseInit::ZeroProj
                        && spec.name.ends_with("combined_proj.weight") =>
                {
                    Tensor::zeros(&spec.shape, DType::F32, Device::Cpu)?
                }
                Init::Normal(std) => {
                    let n = Tensor::rand_normal(
                        &spec.shape,
                        DType::F64,
                        seed,
                        stream as u64,
                        Device::Cpu,
                    )?;
                    let v: Vec<f64> = n.to_vec::<f64>()?.iter().map(|x| x * std).collect();
                    Tensor::from_vec(v, &spec.shape, Device::Cpu)?.to_dtype(DType::F32)?
                }
            };
            params.push((spec.name, t));
        }
        Ok(NoiseEncoder {
            d,
            eps,
            params,
            trainable: false,
        })
    }

    /// An encoder from named tensors (any order, f32 or f64, all one dtype): exactly the
    /// tensors of [`noise_param_specs`].
    pub fn from_params(d: usize, eps: f64, named: Vec<(String, Tensor)>) -> Result<NoiseEncoder> {
        let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
        for (n, t) in named {
            ensure!(
                by_name.insert(n.clone(), t).is_none(),
                "tensor \"{n}\" appears twice"
            );
        }
        let mut params = Vec::new();
        let mut dtype = None;
        for spec in noise_param_specs(d) {
            let t = by_name.remove(&spec.name).with_context(|| {
                format!(
                    "missing noise-encoder tensor \"{}\" (shape {:?})",
                    spec.name, spec.shape
                )
            })?;
            ensure!(
                t.shape() == spec.shape,
                "tensor \"{}\" has shape {:?}, expected {:?}",
                spec.name,
                t.shape(),
                spec.shape
            );
            weights::check_dtype(&spec.name, &t, &mut dtype)?;
            params.push((spec.name, t));
        }
        if !by_name.is_empty() {
            let extra: Vec<&str> = by_name.keys().map(|s| s.as_str()).take(5).collect();
            bail!("unexpected noise-encoder tensor(s): {}", extra.join(", "));
        }
        Ok(NoiseEncoder {
            d,
            eps,
            params,
            trainable: false,
        })
    }

    pub fn d(&self) -> usize {
        self.d
    }
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
    /// The compute dtype: that of the bias of the first projection (its matrix may be kept in
    /// half precision, see `weights::WeightStore`).
    pub fn dtype(&self) -> DType {
        self.params[1].1.dtype()
    }
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }
    /// As `Ddit::set_trainable`: fresh `var()` leaves sharing storage, or plain tensors.
    pub fn set_trainable(&mut self, on: bool) {
        weights::set_trainable(&mut self.params, on);
        self.trainable = on;
    }
    /// A copy with every parameter on `device`, matrices stored as `store` says (as
    /// `Ddit::to_device_with`).
    pub fn to_device_with(&self, device: Device, store: WeightStore) -> Result<NoiseEncoder> {
        Ok(NoiseEncoder {
            d: self.d,
            eps: self.eps,
            params: weights::params_to_device(&self.params, device, store)?,
            trainable: false,
        })
    }
    /// Where the parameters are.
    pub fn device(&self) -> Device {
        self.params[0].1.device()
    }

    /// A copy in `dtype` (f32 or f64), trainable flag kept.
    pub fn to_dtype(&self, dtype: DType) -> Result<NoiseEncoder> {
        let mut m = NoiseEncoder {
            d: self.d,
            eps: self.eps,
            params: weights::params_to_dtype(&self.params, dtype)?,
            trainable: false,
        };
        if self.trainable {
            m.set_trainable(true);
        }
        Ok(m)
    }

    fn p(&self, i: usize) -> &Tensor {
        &self.params[i].1
    }

    /// Hint embeddings `[M, d]` of the noises `u[m]` at temperatures `tau[m]` (equal lengths).
    pub fn forward(&self, u: &[f64], tau: &[f64]) -> Result<Tensor> {
        ensure!(
            u.len() == tau.len(),
            "noise encoder: {} noises but {} temperatures",
            u.len(),
            tau.len()
        );
        let (m, d) = (u.len(), self.d);
        // the features of u_0, tau_0, u_1, tau_1, ..: [2m, d] rows that are the [m, 2d] rows
        // [f(u_r), f(tau_r)]; on a kernel device only the 2m levels travel and the features
        // are made there (computed in f64 and rounded once, as on the CPU)
        let s: Vec<f64> = u.iter().zip(tau).flat_map(|(&a, &t)| [a, t]).collect();
        let f = noise_features(
            &Tensor::from_vec(s, &[2 * m], self.device())?,
            d,
            self.dtype(),
        )?
        .reshape(&[m, 2 * d])?;
        let x = linear(&f, self.p(0), Some(self.p(1)))?;
        let y = layer_norm(&x, self.p(2), Some(self.p(3)), self.eps)?;
        let y = gelu_erf(&linear(&y, self.p(4), Some(self.p(5)))?)?;
        linear_residual(&x, &y, self.p(6), Some(self.p(7)))
    }
}

/// The student: backbone (initialised from the teacher), noise encoder, trained window `k`.
/// A clone shares the parameter tensors.
#[derive(Clone)]
pub struct Pflm {
    pub backbone: Ddit,
    pub noise: NoiseEncoder,
    pub k: usize,
}

impl std::fmt::Debug for Pflm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pflm[k {}, {:?}, {:?}]",
            self.k, self.backbone, self.noise
        )
    }
}

/// Options of one inference step's read-off.
#[derive(Clone, Debug)]
pub struct ReadOff {
    /// Frequency penalty (0 = plain argmax).
    pub penalty: f64,
    /// Ids `>= vocab_limit` are never emitted (logits set to -inf). `None`: all V.
    pub vocab_limit: Option<usize>,
}

impl Default for ReadOff {
    fn default() -> Self {
        ReadOff {
            penalty: 0.0,
            vocab_limit: None,
        }
    }
}

impl Pflm {
    /// A stage-1 student: the teacher's backbone (config `k` set) plus a fresh noise encoder
    /// from `seed` (in the teacher's dtype).
    pub fn from_teacher(teacher: Ddit, k: usize, seed: u64) -> Result<Pflm> {
        Self::from_teacher_with(teacher, k, seed, NoiseInit::Normal)
    }

    /// [`Self::from_teacher`] with a choice of the noise encoder's initialisation.
    pub fn from_teacher_with(teacher: Ddit, k: usize, seed: u64, how: NoiseInit) -> Result<Pflm> {
        let noise = NoiseEncoder::init_with(teacher.cfg.d_model, teacher.cfg.ln_eps, seed, how)?
            .to_dtype(teacher.dtype())?;
        Pflm::from_parts(teacher, noise, k)
    }

    /// A student from its parts (config `k` is set to `k`).
    pub fn from_parts(mut backbone: Ddit, noise: NoiseEncoder, k: usize) -> Result<Pflm> {
        ensure!(k >= 1, "a PFLM student needs k >= 1");
        ensure!(
            noise.d == backbone.cfg.d_model,
            "noise encoder width {} != model width {}",
            noise.d,
            backbone.cfg.d_model
        );
        ensure!(
            noise.dtype() == backbone.dtype(),
            "noise encoder is {} but the backbone is {}",
            noise.dtype(),
            backbone.dtype()
        );
        backbone.cfg.k = Some(k);
        Ok(Pflm { backbone, noise, k })
    }

    /// The next stage's student (k -> `k`, usually 2k): every tensor inherited.
    pub fn with_k(mut self, k: usize) -> Result<Pflm> {
        ensure!(k >= 1, "a PFLM student needs k >= 1");
        self.k = k;
        self.backbone.cfg.k = Some(k);
        Ok(self)
    }

    pub fn cfg(&self) -> &DditConfig {
        &self.backbone.cfg
    }
    pub fn dtype(&self) -> DType {
        self.backbone.dtype()
    }
    /// A copy with every parameter on `device` (the explicit move).
    pub fn to_device(&self, device: Device) -> Result<Pflm> {
        self.to_device_with(device, WeightStore::F32)
    }
    /// [`Pflm::to_device`] with the weight matrices stored as `store` says.
    pub fn to_device_with(&self, device: Device, store: WeightStore) -> Result<Pflm> {
        Ok(Pflm {
            backbone: self.backbone.to_device_with(device, store)?,
            noise: self.noise.to_device_with(device, store)?,
            k: self.k,
        })
    }
    /// Where the parameters are.
    pub fn device(&self) -> Device {
        self.backbone.device()
    }

    /// Loads a student directory (`config.json` with `k`, `model.safetensors` holding the
    /// backbone and `noise_encoder.*`). Weights of any float dtype are converted to f32.
    pub fn load(dir: &Path) -> Result<Pflm> {
        Pflm::load_with(dir, WeightStore::F32)
    }

    /// [`Pflm::load`] for serving: under [`WeightStore::Exact`] the matrices and the
    /// embedding table of an f16 / bf16 file stay 16-bit in memory.
    pub fn load_with(dir: &Path, store: WeightStore) -> Result<Pflm> {
        let cfg = checkpoint::read_config(dir)?;
        let k = cfg.k.with_context(|| {
            format!(
                "{} has no \"k\": it is an AR teacher, not a PFLM student",
                dir.join(checkpoint::CONFIG_FILE).display()
            )
        })?;
        let path = checkpoint::model_file(dir, WEIGHTS_FILE)?;
        let loaded = io::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
        let (mut bb, mut ne) = (Vec::new(), Vec::new());
        for (name, t) in loaded.tensors {
            ensure!(
                t.dtype().is_float(),
                "{}: tensor \"{name}\" is {}, expected a float dtype",
                path.display(),
                t.dtype()
            );
            let t = weights::load_param(&name, t, store)?;
            if name.starts_with("noise_encoder.") {
                ne.push((name, t));
            } else {
                bb.push((name, t));
            }
        }
        let backbone = Ddit::from_params(&cfg, bb)
            .with_context(|| format!("{} does not match its config", path.display()))?;
        let noise = NoiseEncoder::from_params(cfg.d_model, cfg.ln_eps, ne)
            .with_context(|| format!("{}: noise encoder", path.display()))?;
        let p = Pflm::from_parts(backbone, noise, k)?;
        checkpoint::check_finite(&path, &p.params())?;
        Ok(p)
    }

    /// Writes `config.json` (with `k`) and `model.safetensors` (backbone then noise encoder,
    /// cast to `dtype`), each atomically.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        ensure!(
            dtype.is_float(),
            "cannot save model weights as {dtype} (expected f32, f16, bf16 or f64)"
        );
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create model directory {}", dir.display()))?;
        let all = self.params();
        let cast: Vec<Tensor> = all
            .iter()
            .map(|(_, t)| t.detach().to_dtype(dtype))
            .collect::<Result<_>>()?;
        let refs: Vec<(&str, &Tensor)> = all
            .iter()
            .zip(&cast)
            .map(|((n, _), t)| (n.as_str(), t))
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), PFLM_WEIGHTS_FORMAT.to_string());
        meta.insert("k".to_string(), self.k.to_string());
        let path = dir.join(WEIGHTS_FILE);
        io::save(&path, &refs, &meta)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut cfg = self.backbone.cfg.clone();
        cfg.k = Some(self.k);
        checkpoint::write_config(dir, &cfg)
    }

    /// Every parameter (backbone in checkpoint order, then the noise encoder's).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = self.backbone.params().to_vec();
        v.extend(self.noise.params().iter().cloned());
        v
    }

    /// The bytes of the parameters as an inference pass reads them (`Ddit::weight_bytes`,
    /// then the noise encoder's).
    pub fn weight_bytes(&self) -> weights::WeightBytes {
        let mut wb = self.backbone.weight_bytes();
        for (name, t) in self.noise.params() {
            wb.add(
                t.numel() * t.dtype().size(),
                t.dtype(),
                weights::is_matrix(name, t),
            );
        }
        wb
    }

    pub fn set_trainable(&mut self, on: bool) {
        self.backbone.set_trainable(on);
        self.noise.set_trainable(on);
    }
    pub fn is_trainable(&self) -> bool {
        self.backbone.is_trainable()
    }

    /// A copy in `dtype` (f32 or f64).
    pub fn to_dtype(&self, dtype: DType) -> Result<Pflm> {
        Pflm::from_parts(
            self.backbone.to_dtype(dtype)?,
            self.noise.to_dtype(dtype)?,
            self.k,
        )
    }

    /// A copy served at `dtype` (f32, f16 or bf16; see `Ddit::with_tables_in`).
    pub fn with_tables_in(&self, dtype: DType) -> Result<Pflm> {
        let noise = NoiseEncoder {
            d: self.noise.d,
            eps: self.noise.eps,
            params: weights::tables_in(&self.noise.params, dtype)?,
            trainable: false,
        };
        Pflm::from_parts(self.backbone.with_tables_in(dtype)?, noise, self.k)
    }

    /// A copy whose backbone's weight matrices are multiplied from ggml blocks of `format`
    /// on the CPU (see `Ddit::quantized`); the noise encoder stays as it is.
    pub fn quantized(&self, format: kf_engine::gemm::QFormat) -> Result<Pflm> {
        let noise = self.noise.to_dtype(DType::F32)?;
        Pflm::from_parts(self.backbone.quantized(format)?, noise, self.k)
    }

    fn attn(&self, pattern: AttnPattern, q_start: usize, key_skip: Vec<usize>) -> AttnParams {
        let mut a = self.backbone.attn_params(q_start, key_skip);
        a.pattern = pattern;
        a
    }

    /// Hint embeddings `[B, M, d]` of `u` (B·M values, row-major) with per-row `tau`.
    fn hints(&self, u: &[f64], b: usize, m: usize, tau: &[f64]) -> Result<Tensor> {
        let taus = per_row_tau(tau, b)?;
        let tv: Vec<f64> = (0..b * m).map(|r| taus[r / m.max(1)]).collect();
        self.noise
            .forward(u, &tv)?
            .reshape(&[b, m, self.cfg().d_model])
    }

    /// The staircase training pass: ctx u32 `[B, N]`, noises `u [B, N, kk]` (any float; the
    /// student's window is `kk`, normally `self.k`), `tau` (one value or one per sequence).
    /// Returns the logits at every hint, `[B, N, kk, V]`: entry `(b, t, i-1)` predicts the
    /// token at position `t + i` from context `0..=t` and hints `(t, 1..=i)`. On the tape
    /// when the model is trainable and grad is enabled.
    ///
    /// With `u [B, M, N, kk]`, M noise windows per context position: M blocks of hints after
    /// one copy of the context rows (each block sees the context and its own windows only), so
    /// one context pass serves M (context, u) pairs; the logits are `[B, M, N, kk, V]`.
    pub fn forward_staircase(&self, ctx: &Tensor, u: &Tensor, tau: &[f64]) -> Result<Tensor> {
        let m = if u.rank() == 4 { u.dim(1)? } else { 1 };
        ensure!(m >= 1, "noises: no windows (u {:?})", u.shape());
        let first = if u.rank() == 4 {
            u.narrow(1, 0, 1)?.squeeze(1)?
        } else {
            u.clone()
        };
        let (b, n, kk) = check_ctx_u(ctx, &first, None)?;
        let uv = u.contiguous()?.to_vec_f64()?;
        let h0 = cat_time(
            &self.backbone.embed(ctx)?,
            &self.hints(&uv, b, m * n * kk, tau)?,
        )?;
        let mut pos: Vec<u32> = (0..n as u32).collect();
        for _ in 0..m {
            for t in 0..n {
                pos.extend((1..=kk).map(|i| (t + i) as u32));
            }
        }
        let pos = Tensor::from_vec(pos, &[n + m * n * kk], self.device())?;
        let attn = self.attn(AttnPattern::Staircase { n, k: kk }, 0, vec![]);
        let h = self.backbone.backbone_hidden(&h0, &pos, &attn, None)?;
        let logits = self.backbone.head(&h.narrow(1, n, m * n * kk)?)?;
        let v = self.cfg().vocab_size;
        match u.rank() {
            4 => logits.reshape(&[b, m, n, kk, v]),
            _ => logits.reshape(&[b, n, kk, v]),
        }
    }

    /// The k -> 2k teacher rollout (KFORCING.md 6.2) with this model (window `k = self.k`) as
    /// the teacher: ctx u32 `[B, N]`, `u [B, N, 2k]`. Returns u32 `[B, N, 2k]` = `[F1 | F2]`
    /// per window: F1 = argmax of the staircase pass on `u[.., ..k]`; F2 = argmax at the hints
    /// of pass 2 (`[F1 tokens at t+1..t+k | hints u[.., k..] at t+k+1..t+2k]`, double
    /// staircase). The context K/V are computed once and reused by both passes. No tape.
    pub fn rollout_double(&self, ctx: &Tensor, u: &Tensor, tau: &[f64]) -> Result<Tensor> {
        let k = self.k;
        let (b, n, k2) = check_ctx_u(ctx, u, Some(2 * k))?;
        let _ng = no_grad();
        let bb = &self.backbone;
        let (v, nk) = (self.cfg().vocab_size, n * k);
        let uv = u.contiguous()?.to_vec_f64()?;
        let (mut u1, mut u2) = (Vec::with_capacity(b * nk), Vec::with_capacity(b * nk));
        for w in uv.chunks_exact(k2) {
            u1.extend_from_slice(&w[..k]);
            u2.extend_from_slice(&w[k..]);
        }
        let dev = self.device();
        let mut cache = KvCache::new_on(self.cfg(), b, n + 2 * nk, self.dtype(), dev)?;
        // context K/V once (the hidden output of these rows is not needed)
        let pos = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), &[n], dev)?;
        bb.backbone_hidden(
            &bb.embed(ctx)?,
            &pos,
            &bb.attn_params(0, vec![]),
            Some(&mut cache),
        )?;
        cache.commit(n)?;
        // pass 1: the N·k hints over the cached context (staircase, q_start = N)
        let mut p1 = Vec::with_capacity(nk);
        for t in 0..n {
            for i in 1..=k {
                p1.push((t + i) as u32);
            }
        }
        let pos1 = Tensor::from_vec(p1.clone(), &[nk], dev)?;
        let h = bb.backbone_hidden(
            &self.hints(&u1, b, nk, tau)?,
            &pos1,
            &self.attn(AttnPattern::Staircase { n, k }, n, vec![]),
            Some(&mut cache),
        )?;
        cache.commit(0)?;
        let counts = Tensor::zeros(&[b, v], DType::U32, dev)?;
        let f1 = argmax_penalty(&bb.head(&h)?, &counts, 0.0)?; // [B, N·k]
                                                               // pass 2: [F1 tokens | F2 hints] over the same cached context (double staircase)
        let mut p2 = p1;
        p2.extend((0..n).flat_map(|t| (1..=k).map(move |i| (t + k + i) as u32)));
        let pos2 = Tensor::from_vec(p2, &[2 * nk], dev)?;
        let h0 = cat_time(&bb.embed(&f1)?, &self.hints(&u2, b, nk, tau)?)?;
        let h = bb.backbone_hidden(
            &h0,
            &pos2,
            &self.attn(AttnPattern::DoubleStaircase { n, k }, n, vec![]),
            Some(&mut cache),
        )?;
        cache.commit(0)?;
        let f2 = argmax_penalty(&bb.head(&h.narrow(1, nk, nk)?)?, &counts, 0.0)?;
        let (f1, f2) = (
            crate::generate::tokens_to_host(&f1)?,
            crate::generate::tokens_to_host(&f2)?,
        );
        let mut out = Vec::with_capacity(b * n * k2);
        for w in 0..b * n {
            out.extend_from_slice(&f1[w * k..(w + 1) * k]);
            out.extend_from_slice(&f2[w * k..(w + 1) * k]);
        }
        Tensor::from_vec(out, &[b, n, k2], dev)
    }

    /// One KV-cached inference pass: `committed` u32 `[B, n_new]` (tokens not yet in the
    /// cache; n_new may be 0), `pos0[b]` = RoPE position of row b's first new row (of its
    /// first hint when n_new = 0), `key_skip` per sequence (left padding; empty = none),
    /// noises `u [B, K]` (1 <= K <= k), `tau`. Hint i sits at `pos0 + n_new - 1 + i`. Commits
    /// the n_new token rows (hint K/V are dropped). Returns the hint logits `[B, K, V]`.
    pub fn step_logits(
        &self,
        cache: &mut KvCache,
        committed: &Tensor,
        pos0: &[usize],
        key_skip: &[usize],
        u: &Tensor,
        tau: &[f64],
    ) -> Result<Tensor> {
        let _ng = no_grad();
        let bb = &self.backbone;
        ensure!(
            committed.dtype() == DType::U32 && committed.rank() == 2,
            "PFLM step: committed tokens must be u32 [B, n_new], got {} {:?}",
            committed.dtype(),
            committed.shape()
        );
        let (b, n_new) = (committed.shape()[0], committed.shape()[1]);
        ensure!(
            u.rank() == 2 && u.shape()[0] == b,
            "PFLM step: u must be [B = {b}, K], got {:?}",
            u.shape()
        );
        let kk = u.shape()[1];
        ensure!(
            kk >= 1 && kk <= self.k,
            "PFLM step: K = {kk} must be in 1..={} (the student's trained k)",
            self.k
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
        let uv = u.contiguous()?.to_vec_f64()?;
        let hints = self.hints(&uv, b, kk, tau)?;
        let h0 = if n_new > 0 {
            cat_time(&bb.embed(committed)?, &hints)?
        } else {
            hints
        };
        let mut pos = Vec::with_capacity(b * (n_new + kk));
        for &p in pos0 {
            pos.extend((0..n_new).map(|j| (p + j) as u32));
            pos.extend((1..=kk).map(|i| (p + n_new + i - 1) as u32));
        }
        let pos = Tensor::from_vec(pos, &[b, n_new + kk], self.device())?;
        let attn = bb.attn_params(cache.len(), key_skip.to_vec());
        let h = bb.backbone_hidden(&h0, &pos, &attn, Some(&mut *cache))?;
        cache.commit(n_new)?;
        bb.head(&h.narrow(1, n_new, kk)?)
    }

    /// [`Pflm::step_logits`] then the read-off: argmax with frequency penalty (`counts` u32
    /// `[B, V]`, updated in place left to right). Returns u32 `[B, K]`.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        cache: &mut KvCache,
        committed: &Tensor,
        pos0: &[usize],
        key_skip: &[usize],
        u: &Tensor,
        tau: &[f64],
        read: &ReadOff,
        counts: &Tensor,
    ) -> Result<Tensor> {
        let logits = self.step_logits(cache, committed, pos0, key_skip, u, tau)?;
        read_off(logits, read, counts)
    }
}

/// Forbids the tail past `vocab_limit`, then argmax with penalty.
fn read_off(logits: Tensor, read: &ReadOff, counts: &Tensor) -> Result<Tensor> {
    let v = logits.dim(logits.rank() - 1)?;
    let logits = match read.vocab_limit.filter(|&l| l < v) {
        Some(l) => forbid_tail(logits, l)?,
        None => logits,
    };
    argmax_penalty(&logits, counts, read.penalty)
}

/// `tau` as one value per sequence (one value broadcasts).
fn per_row_tau(tau: &[f64], b: usize) -> Result<Vec<f64>> {
    ensure!(
        tau.len() == 1 || tau.len() == b,
        "tau: expected 1 or B = {b} values, got {}",
        tau.len()
    );
    for &t in tau {
        ensure!(
            t.is_finite() && t >= 0.0,
            "tau must be finite and >= 0, got {t}"
        );
    }
    Ok(if tau.len() == 1 {
        vec![tau[0]; b]
    } else {
        tau.to_vec()
    })
}

/// Checks ctx u32 `[B, N]` and u `[B, N, kk]` (kk = `want` when given); returns (B, N, kk).
fn check_ctx_u(ctx: &Tensor, u: &Tensor, want: Option<usize>) -> Result<(usize, usize, usize)> {
    ensure!(
        ctx.dtype() == DType::U32 && ctx.rank() == 2,
        "context must be u32 [B, N], got {} {:?}",
        ctx.dtype(),
        ctx.shape()
    );
    let (b, n) = (ctx.shape()[0], ctx.shape()[1]);
    ensure!(n >= 1, "context must have at least one position");
    ensure!(
        u.rank() == 3 && u.shape()[0] == b && u.shape()[1] == n && u.dtype().is_float(),
        "noises must be float [B = {b}, N = {n}, k], got {} {:?}",
        u.dtype(),
        u.shape()
    );
    let kk = u.shape()[2];
    ensure!(kk >= 1, "noises: the window k must be at least 1");
    if let Some(w) = want {
        ensure!(kk == w, "noises: expected {w} per window, got {kk}");
    }
    Ok((b, n, kk))
}

/// Stage-1 targets (KFORCING.md 6.1): `token(p_T(· | x_<=t), u[b, t])` for every position of
/// ctx u32 `[B, N]` with noises `u [B, N]`, through the one inverse-CDF map
/// (`kf_ops::sampling::sample_inverse_cdf`) on the AR teacher's full-sequence logits. u32 `[B, N]`.
/// With `u [B, M, N]` (M noise windows per position), the one teacher pass serves every window:
/// u32 `[B, M, N]`.
pub fn stage1_targets(teacher: &Ddit, ctx: &Tensor, u: &Tensor, tau: f64) -> Result<Tensor> {
    let _ng = no_grad();
    let (b, n) = (ctx.dim(0)?, ctx.dim(1)?);
    let m = if u.rank() == 3 { u.dim(1)? } else { 1 };
    ensure!(
        u.shape() == [b, n] || u.shape() == [b, m, n],
        "stage-1 targets: u must be [B, N] = [{b}, {n}] (or [B, M, N]), got {:?}",
        u.shape()
    );
    let v = teacher.cfg.vocab_size;
    let logits = teacher.forward_train(ctx)?;
    let logits = match m {
        1 => logits,
        // each window's rows read the same logits
        _ => logits
            .unsqueeze(1)?
            .broadcast_as(&[b, m, n, v])?
            .contiguous()?,
    };
    let uu = u.reshape(&[b * m * n])?.to_device(teacher.device())?;
    sample_inverse_cdf(&logits.reshape(&[b * m * n, v])?, &uu, tau)?.reshape(u.shape())
}

// ------------------------------------------------------------------ generation

/// Options of [`generate_pflm`]: everything AR generation has, plus the window and penalty.
#[derive(Clone, Debug)]
pub struct PflmGenerateOptions {
    /// max_new, tau (fed to the noise encoder), seed, first_stream, eos, use_cache, vocab_limit.
    pub base: GenerateOptions,
    /// Tokens per pass, 1..=the student's k.
    pub k: usize,
    /// Frequency penalty (0 = none).
    pub freq_penalty: f64,
}

/// Generates a continuation of each prompt with the student, K tokens per forward pass
/// (module docs: the prompt's tail, the noise). The last step may use fewer hints so that
/// exactly `max_new` tokens come out (exact: K' < K gives the first K' tokens of the
/// window). A sequence stops at EOS (tokens after it in the same window are dropped) and
/// stays in the batch, ignored, until all stop. `on_token(b, token)` as in `generate`.
pub fn generate_pflm(
    model: &Pflm,
    prompts: &[Vec<u32>],
    opts: &PflmGenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generated> {
    let cfg = model.cfg();
    let o = &opts.base;
    crate::generate::check_request(cfg, prompts, o)?;
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
    let _ng = no_grad();
    let read = ReadOff {
        penalty: opts.freq_penalty,
        vocab_limit: o.vocab_limit,
    };
    let tau = [o.tau];
    let nb = prompts.len();
    let LeftPadded {
        lmax,
        skips,
        key_skip,
        mut rows,
    } = left_pad(prompts);
    let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut out = Generated {
        tokens: vec![Vec::new(); nb],
        stopped_at_eos: vec![false; nb],
        ..Default::default()
    };
    let mut done = vec![false; nb];
    let dev = model.device();
    let counts = Tensor::zeros(&[nb, cfg.vocab_size], DType::U32, dev)?;
    let mut cache = if o.use_cache {
        Some(KvCache::new_on(
            cfg,
            nb,
            lmax + o.max_new + opts.k,
            model.dtype(),
            dev,
        )?)
    } else {
        None
    };
    // prefill all but the prompt's last token (module docs)
    if let Some(c) = cache.as_mut() {
        if lmax > 1 {
            let t0 = Instant::now();
            let t = lmax - 1;
            let ids: Vec<u32> = rows.iter().flat_map(|r| r[..t].iter().copied()).collect();
            let pos: Vec<u32> = skips
                .iter()
                .flat_map(|&s| (0..t).map(move |i| i.saturating_sub(s) as u32))
                .collect();
            let ids = Tensor::from_vec(ids, &[nb, t], dev)?;
            let pos = Tensor::from_vec(pos, &[nb, t], dev)?;
            let bb = &model.backbone;
            bb.backbone_hidden(
                &bb.embed(&ids)?,
                &pos,
                &bb.attn_params(0, key_skip.clone()),
                Some(&mut *c),
            )?;
            c.commit(t)?;
            out.passes += 1;
            out.prefill_secs = t0.elapsed().as_secs_f64();
        }
    }
    let t_dec = Instant::now();
    // the tokens not yet in the cache (the prompt's last on step 1) and the position of the first
    let mut pending: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| vec![*r.last().expect("non-empty")])
        .collect();
    let mut pos0: Vec<usize> = lens.iter().map(|&l| l - 1).collect();
    let mut g = 0usize;
    while g < o.max_new && !done.iter().all(|&d| d) {
        let kk = opts.k.min(o.max_new - g);
        let mut u = Vec::with_capacity(nb * kk);
        for b in 0..nb {
            for i in 0..kk {
                u.push(noise_u(o.seed, o.first_stream + b as u64, (g + i) as u64));
            }
        }
        let ut = Tensor::from_vec(u, &[nb, kk], Device::Cpu)?;
        let toks = match cache.as_mut() {
            Some(c) => {
                let n_new = pending[0].len();
                let ids: Vec<u32> = pending.iter().flatten().copied().collect();
                let ids = Tensor::from_vec(ids, &[nb, n_new], dev)?;
                let t = model.step(c, &ids, &pos0, &key_skip, &ut, &tau, &read, &counts)?;
                for (p, pend) in pos0.iter_mut().zip(&pending) {
                    *p += pend.len();
                }
                t
            }
            None => {
                let logits = uncached_logits(model, &rows, &skips, &key_skip, &ut, &tau)?;
                read_off(logits, &read, &counts)?
            }
        };
        let toks = crate::generate::tokens_to_host(&toks)?;
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

/// Without a cache: one pass over `[whole padded rows | K hints]`, causal (hint i after the
/// last token at its position + i). Hint logits `[B, K, V]`.
fn uncached_logits(
    model: &Pflm,
    rows: &[Vec<u32>],
    skips: &[usize],
    key_skip: &[usize],
    u: &Tensor,
    tau: &[f64],
) -> Result<Tensor> {
    let bb = &model.backbone;
    let (nb, t, kk) = (rows.len(), rows[0].len(), u.dim(1)?);
    let ids: Vec<u32> = rows.iter().flatten().copied().collect();
    let mut pos = Vec::with_capacity(nb * (t + kk));
    for &s in skips {
        pos.extend((0..t).map(|i| i.saturating_sub(s) as u32));
        let last = t - 1 - s;
        pos.extend((1..=kk).map(|i| (last + i) as u32));
    }
    let ids = Tensor::from_vec(ids, &[nb, t], model.device())?;
    let pos = Tensor::from_vec(pos, &[nb, t + kk], model.device())?;
    let uv = u.contiguous()?.to_vec_f64()?;
    let h0 = cat_time(&bb.embed(&ids)?, &model.hints(&uv, nb, kk, tau)?)?;
    let h = bb.backbone_hidden(&h0, &pos, &bb.attn_params(0, key_skip.to_vec()), None)?;
    bb.head(&h.narrow(1, t, kk)?)
}

// ------------------------------------------------------------ concat on the tape

/// `[B, Ta, d]` and `[B, Tb, d]` -> `[B, Ta + Tb, d]` (time concatenation), recorded on the
/// tape when either input tracks grad (the backward splits the gradient).
pub fn cat_time(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(
        a.rank() == 3
            && b.rank() == 3
            && a.shape()[0] == b.shape()[0]
            && a.shape()[2] == b.shape()[2],
        "cat_time: shapes {:?} and {:?} do not concatenate along time",
        a.shape(),
        b.shape()
    );
    ensure!(
        a.dtype() == b.dtype(),
        "cat_time: dtypes {} and {} differ",
        a.dtype(),
        b.dtype()
    );
    ensure!(
        a.device() == b.device(),
        "cat_time: inputs on {} and {}",
        a.device(),
        b.device()
    );
    let (nb, ta, tb, d) = (a.shape()[0], a.shape()[1], b.shape()[1], a.shape()[2]);
    let out = Tensor::zeros(&[nb, ta + tb, d], a.dtype(), a.device())?;
    out.narrow(1, 0, ta)?.copy_from(a)?;
    out.narrow(1, ta, tb)?.copy_from(b)?;
    let node: Option<Arc<dyn BackwardOp>> = should_record(&[a, b]).then(|| {
        Arc::new(CatBackward {
            a: a.clone(),
            b: b.clone(),
        }) as Arc<dyn BackwardOp>
    });
    Ok(out.rewrap(node))
}

struct CatBackward {
    a: Tensor,
    b: Tensor,
}

impl BackwardOp for CatBackward {
    fn name(&self) -> &'static str {
        "cat_time"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (ta, tb) = (self.a.shape()[1], self.b.shape()[1]);
        let ga = g.narrow(1, 0, ta)?.whole_buffer()?;
        let gb = g.narrow(1, ta, tb)?.whole_buffer()?;
        Ok(vec![
            self.a.tracks_grad().then_some(ga),
            self.b.tracks_grad().then_some(gb),
        ])
    }
}
