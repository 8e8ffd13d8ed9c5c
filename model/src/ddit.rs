//! The DDiT backbone of KFORCING.md section 2: a pre-norm causal Transformer shared by the
//! AR teacher and the PFLM student, built from `kf_ops` on the autograd tape.
//!
//! ```text
//! h = embed[ids]                                   (untied from the head)
//! per block i:  x = LN1(h)                          (weight only, eps 1e-5)
//!               [q|k|v] = x W_qkvᵀ  -> view [B, T, 3, H, D]    (no bias; zero-copy split)
//!               h += W_o · Attn(RoPE(q), RoPE(k), v)           (rotate-half, base 10000,
//!                                                    scale 1/sqrt(D), no bias)
//!               h += W_2 · gelu_tanh(W_0 · LN2(h) + b_0) + b_2
//! logits = LN_f(h) W_outᵀ + b_out;  logits[.., mask] = -1000 exactly (gradient 0 there)
//! ```
//! The Llama family (`arch: llama`, pretrained teachers from GGUF / Hugging Face files) is
//! the same loop with its own block, written in the same function:
//! ```text
//! per block i:  x = RMS1(h);  [q|k|v] = x W_qkvᵀ  (H query heads, Hk ≤ H K/V heads)
//!               h += W_o · Attn(RoPE(q), RoPE(k), v)       (grouped-query, no bias)
//!               h += W_down · swiglu(x' W_gate_upᵀ)  with x' = RMS2(h)
//! logits = RMS_f(h) W_headᵀ   (W_head the embedding table when tied)
//! ```
//! Letters: B batch, T time, d model width, H heads, D = d / H, V vocabulary.
//!
//! Parameters are kept in checkpoint order (`param_specs`), under the reference's
//! state-dict names. The compute dtype is the parameters' dtype: f32 normally, f64 for
//! gradient checks (`to_dtype`).

use crate::checkpoint::{self, WEIGHTS_FILE, WEIGHTS_FORMAT};
use crate::config::{Arch, DditConfig};
use crate::kv_cache::KvCache;
use crate::weights::{self, WeightStore};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::autograd::{grad_enabled, should_record, BackwardOp};
use kf_engine::gemm::{xwt, QFormat, WRows};
use kf_engine::gguf::GgmlType;
use kf_engine::{io, DType, Device, Float, Tensor};
use kf_ops::attention::{attention, rope_attention, AttnParams, AttnPattern};
use kf_ops::embedding::embedding;
use kf_ops::gelu::bias_gelu_tanh;
use kf_ops::layernorm::layer_norm;
use kf_ops::matmul::{linear, linear_residual};
use kf_ops::rmsnorm::rms_norm;
use kf_ops::rope::RopeAt;
use kf_ops::swiglu::swiglu;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Standard deviation of the normal init of every linear and embedding weight.
pub const INIT_STD: f64 = 0.02;
/// The logit of the reserved (mask) token.
pub const MASK_LOGIT: f64 = -1000.0;

/// How a parameter starts (see [`Ddit::init`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// `N(0, std²)`.
    Normal(f64),
    Ones,
    Zeros,
}

/// Name, shape and init of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// DDiT parameters per block, in this order: norm1, attn_qkv, attn_out, norm2,
/// mlp.0.weight, mlp.0.bias, mlp.2.weight, mlp.2.bias.
const PER_BLOCK: usize = 8;
const NORM1: usize = 0;
const QKV: usize = 1;
const OUT: usize = 2;
const NORM2: usize = 3;
const MLP0_W: usize = 4;
const MLP0_B: usize = 5;
const MLP2_W: usize = 6;
const MLP2_B: usize = 7;
/// Llama parameters per block: input_layernorm, qkv_proj (q, k, v rows stacked), o_proj,
/// post_attention_layernorm, gate_up_proj (gate rows over up rows), down_proj. The norms,
/// QKV and output projection sit at the DDiT's indices.
const LLAMA_PER_BLOCK: usize = 6;
const GATE_UP: usize = 4;
const DOWN: usize = 5;

fn per_block(cfg: &DditConfig) -> usize {
    match cfg.arch {
        Arch::Ddit => PER_BLOCK,
        Arch::Llama => LLAMA_PER_BLOCK,
    }
}

/// The Llama family's parameters: `model.embed_tokens.weight`, per layer `model.layers.{i}.`
/// `input_layernorm.weight`, `self_attn.qkv_proj.weight` [(H + 2 Hk)·D, d],
/// `self_attn.o_proj.weight`, `post_attention_layernorm.weight`, `mlp.gate_up_proj.weight`
/// [2 f, d], `mlp.down_proj.weight`; then `model.norm.weight` and, untied,
/// `lm_head.weight`. (Hugging Face's names, with q/k/v and gate/up stacked: one GEMM each.)
fn llama_param_specs(cfg: &DditConfig) -> Vec<ParamSpec> {
    let (d, v, hd, f) = (cfg.d_model, cfg.vocab_size, cfg.head_dim(), cfg.ffn());
    let (h, hk) = (cfg.n_heads, cfg.kv_heads());
    let w = Init::Normal(INIT_STD);
    let mut s = vec![];
    let mut push =
        |name: String, shape: Vec<usize>, init: Init| s.push(ParamSpec { name, shape, init });
    push("model.embed_tokens.weight".into(), vec![v, d], w);
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        push(format!("{p}.input_layernorm.weight"), vec![d], Init::Ones);
        push(
            format!("{p}.self_attn.qkv_proj.weight"),
            vec![(h + 2 * hk) * hd, d],
            w,
        );
        push(format!("{p}.self_attn.o_proj.weight"), vec![d, h * hd], w);
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            Init::Ones,
        );
        push(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * f, d], w);
        push(format!("{p}.mlp.down_proj.weight"), vec![d, f], w);
    }
    push("model.norm.weight".into(), vec![d], Init::Ones);
    if !cfg.tie_embeddings {
        push("lm_head.weight".into(), vec![v, d], w);
    }
    s
}

/// The parameters of a config in checkpoint order: `vocab_embed.embedding`, the blocks,
/// `output_layer.norm_final.weight`, `output_layer.linear.weight|bias` (the same order as
/// `kfrun init-weights`, so equal seeds give equal tensors).
pub fn param_specs(cfg: &DditConfig) -> Vec<ParamSpec> {
    if cfg.arch == Arch::Llama {
        return llama_param_specs(cfg);
    }
    let (d, v) = (cfg.d_model, cfg.vocab_size);
    let w = Init::Normal(INIT_STD);
    let mut s = vec![ParamSpec {
        name: "vocab_embed.embedding".into(),
        shape: vec![v, d],
        init: w,
    }];
    let mut push =
        |name: String, shape: Vec<usize>, init: Init| s.push(ParamSpec { name, shape, init });
    for i in 0..cfg.n_layers {
        let p = format!("blocks.{i}");
        push(format!("{p}.norm1.weight"), vec![d], Init::Ones);
        push(format!("{p}.attn_qkv.weight"), vec![3 * d, d], w);
        push(format!("{p}.attn_out.weight"), vec![d, d], w);
        push(format!("{p}.norm2.weight"), vec![d], Init::Ones);
        push(format!("{p}.mlp.0.weight"), vec![4 * d, d], w);
        push(format!("{p}.mlp.0.bias"), vec![4 * d], Init::Zeros);
        push(format!("{p}.mlp.2.weight"), vec![d, 4 * d], w);
        push(format!("{p}.mlp.2.bias"), vec![d], Init::Zeros);
    }
    push("output_layer.norm_final.weight".into(), vec![d], Init::Ones);
    push("output_layer.linear.weight".into(), vec![v, d], w);
    push("output_layer.linear.bias".into(), vec![v], Init::Zeros);
    s
}

/// The DDiT model: config plus named parameters in checkpoint order. A clone shares the
/// parameters' storage (tensors are handles).
#[derive(Clone)]
pub struct Ddit {
    pub cfg: DditConfig,
    params: Vec<(String, Tensor)>,
    trainable: bool,
    /// Matrices as a GGUF file stored them (Q8_0 / Q4_0 / Q4_1 blocks), by parameter
    /// index: a CPU inference pass multiplies with these (like llama.cpp: activations
    /// rounded to 8-bit blocks, ~4.5 bits a weight read per step); everything else (the
    /// tape, devices, saving) uses the f32 parameter, their exact dequantization. Empty
    /// for models of other origins; dropped by every conversion.
    quant: Arc<BTreeMap<usize, Arc<QMat>>>,
}

/// A weight matrix `[rows, cols]` in ggml blocks along `cols` (see [`Ddit::set_quantized`]).
pub struct QMat {
    pub format: QFormat,
    pub bytes: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl std::fmt::Debug for Ddit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ddit[{} layers, d {}, {} heads, V {}, {}{}]",
            self.cfg.n_layers,
            self.cfg.d_model,
            self.cfg.n_heads,
            self.cfg.vocab_size,
            self.dtype(),
            if self.trainable { ", trainable" } else { "" }
        )
    }
}

impl Ddit {
    /// Fresh f32 weights from Philox: parameter number `i` of [`param_specs`] draws from
    /// stream `i` of `seed` (normals in f64, `Philox::normal_f64` element order, times the
    /// std, then rounded to f32). Linear and embedding weights `N(0, 0.02²)`, LayerNorm
    /// weights 1, biases 0.
    pub fn init(cfg: &DditConfig, seed: u64) -> Result<Ddit> {
        cfg.validate()?;
        let mut params = Vec::new();
        for (stream, spec) in param_specs(cfg).into_iter().enumerate() {
            let t = match spec.init {
                Init::Ones => Tensor::ones(&spec.shape, DType::F32, Device::Cpu)?,
                Init::Zeros => Tensor::zeros(&spec.shape, DType::F32, Device::Cpu)?,
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
        Ok(Ddit {
            cfg: cfg.clone(),
            params,
            trainable: false,
            quant: Default::default(),
        })
    }

    /// A model from named tensors (any order; f32 or f64, all the same dtype). Every
    /// parameter of the config must be present with its shape, and nothing else.
    pub fn from_params(cfg: &DditConfig, named: Vec<(String, Tensor)>) -> Result<Ddit> {
        cfg.validate()?;
        let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
        for (n, t) in named {
            ensure!(
                by_name.insert(n.clone(), t).is_none(),
                "tensor \"{n}\" appears twice"
            );
        }
        let mut params = Vec::new();
        let mut dtype = None;
        for spec in param_specs(cfg) {
            let t = by_name.remove(&spec.name).with_context(|| {
                format!(
                    "missing tensor \"{}\" (shape {:?}) required by the config",
                    spec.name, spec.shape
                )
            })?;
            ensure!(
                t.shape() == spec.shape,
                "tensor \"{}\" has shape {:?}, the config needs {:?}",
                spec.name,
                t.shape(),
                spec.shape
            );
            weights::check_dtype(&spec.name, &t, &mut dtype)?;
            params.push((spec.name, t));
        }
        if !by_name.is_empty() {
            let extra: Vec<&str> = by_name.keys().map(|s| s.as_str()).take(5).collect();
            bail!(
                "{} unexpected tensor(s) that are not DDiT parameters of this config: {}",
                by_name.len(),
                extra.join(", ")
            );
        }
        Ok(Ddit {
            cfg: cfg.clone(),
            params,
            trainable: false,
            quant: Default::default(),
        })
    }

    /// Loads a model directory (`config.json` + `model.safetensors`; the tokenizer is read
    /// by the caller, see `checkpoint::read_tokenizer`), a Llama-family GGUF file or a
    /// Hugging Face Llama directory (`llama.rs`). Weights of any float dtype are
    /// converted to f32 (f32 ones stay memory-mapped, no copy). A student directory
    /// (config `k` set) may also hold `noise_encoder.*` tensors, which are skipped here.
    pub fn load(dir: &Path) -> Result<Ddit> {
        Ddit::load_with(dir, WeightStore::F32)
    }

    /// [`Ddit::load`] for serving: under [`WeightStore::Exact`] the weight matrices and the
    /// embedding table of an f16 / bf16 file stay 16-bit in memory (`weights::load_param`).
    pub fn load_with(dir: &Path, store: WeightStore) -> Result<Ddit> {
        // pretrained Llama-family teachers: a GGUF file or a Hugging Face directory
        if crate::llama::is_gguf(dir) {
            // serving keeps the file's blocks (as 16-bit tables stay 16-bit)
            return crate::llama::load_gguf_with(dir, store == WeightStore::Exact);
        }
        if crate::llama::is_hf_dir(dir) {
            return crate::llama::load_hf(dir);
        }
        let cfg = checkpoint::read_config(dir)?;
        let path = checkpoint::model_file(dir, WEIGHTS_FILE)?;
        let loaded = io::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
        let mut named = Vec::with_capacity(loaded.tensors.len());
        for (name, t) in loaded.tensors {
            if cfg.k.is_some() && name.starts_with("noise_encoder.") {
                continue;
            }
            ensure!(
                t.dtype().is_float(),
                "{}: tensor \"{name}\" is {}, expected a float dtype",
                path.display(),
                t.dtype()
            );
            let t = weights::load_param(&name, t, store)?;
            named.push((name, t));
        }
        Ddit::from_params(&cfg, named).with_context(|| {
            format!(
                "{} does not match {}",
                path.display(),
                dir.join(checkpoint::CONFIG_FILE).display()
            )
        })
    }

    /// Writes `config.json` and `model.safetensors` (parameters cast to `dtype`) into `dir`
    /// (created if needed), each atomically through a temporary file and a rename.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        ensure!(
            dtype.is_float(),
            "cannot save model weights as {dtype} (expected f32, f16, bf16 or f64)"
        );
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create model directory {}", dir.display()))?;
        let cast: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, t)| t.detach().to_dtype(dtype))
            .collect::<Result<_>>()?;
        let refs: Vec<(&str, &Tensor)> = self
            .params
            .iter()
            .zip(&cast)
            .map(|((n, _), t)| (n.as_str(), t))
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), WEIGHTS_FORMAT.to_string());
        meta.insert("n_params".to_string(), self.cfg.n_params().to_string());
        let path = dir.join(WEIGHTS_FILE);
        io::save(&path, &refs, &meta)
            .with_context(|| format!("cannot write {}", path.display()))?;
        checkpoint::write_config(dir, &self.cfg)
    }

    /// The parameters in checkpoint order, under their checkpoint names.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// One parameter by checkpoint name.
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The compute dtype (that of the parameters; tables may be stored 16-bit, see
    /// `weights::is_table`, so it is read off the final LayerNorm's weight).
    pub fn dtype(&self) -> DType {
        self.p(self.final_idx()).dtype()
    }

    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// `on`: every parameter becomes a fresh `Tensor::var()` leaf sharing its storage (so
    /// in-place optimiser updates are seen by the model); `off`: plain tensors.
    pub fn set_trainable(&mut self, on: bool) {
        weights::set_trainable(&mut self.params, on);
        self.trainable = on;
    }

    /// A copy with every parameter converted to `dtype` (f32 or f64; f64 for gradient
    /// checks). The trainable flag is kept (new leaves).
    pub fn to_dtype(&self, dtype: DType) -> Result<Ddit> {
        let mut m = Ddit {
            cfg: self.cfg.clone(),
            params: weights::params_to_dtype(&self.params, dtype)?,
            trainable: false,
            quant: Default::default(),
        };
        if self.trainable {
            m.set_trainable(true);
        }
        Ok(m)
    }

    /// A copy served at `dtype` (f32, f16 or bf16): the weight matrices and the embedding
    /// table stored so (rounded), the rest f32 (not trainable). `kfrun bench --dtype`.
    pub fn with_tables_in(&self, dtype: DType) -> Result<Ddit> {
        Ddit::from_params(&self.cfg, weights::tables_in(&self.params, dtype)?)
    }

    /// A copy with every parameter on `device` (the explicit move; not trainable).
    pub fn to_device(&self, device: Device) -> Result<Ddit> {
        self.to_device_with(device, WeightStore::F32)
    }

    /// [`Ddit::to_device`] with the weight matrices stored as `store` says (an f16 model
    /// file serves from f16 matrices under `WeightStore::Exact`).
    pub fn to_device_with(&self, device: Device, store: WeightStore) -> Result<Ddit> {
        Ok(Ddit {
            cfg: self.cfg.clone(),
            params: weights::params_to_device(&self.params, device, store)?,
            trainable: false,
            quant: Default::default(),
        })
    }

    /// Where the parameters are.
    pub fn device(&self) -> Device {
        self.p(0).device()
    }

    fn p(&self, i: usize) -> &Tensor {
        &self.params[i].1
    }

    /// Attaches the stored blocks of parameter `name` (a `[rows, cols]` matrix whose f32
    /// value must be their dequantization; the importer guarantees it).
    pub fn set_quantized(&mut self, name: &str, q: QMat) -> Result<()> {
        let i = self
            .params
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no parameter {name}"))?;
        let t = &self.params[i].1;
        let qk = kf_engine::gemm::QK;
        ensure!(
            t.shape() == [q.rows, q.cols]
                && q.cols % qk == 0
                && q.bytes.len() == q.rows * q.cols / qk * q.format.block_bytes(),
            "{name}: quantized blocks for {} x {} do not fit the parameter {:?}",
            q.rows,
            q.cols,
            t.shape()
        );
        Arc::make_mut(&mut self.quant).insert(i, Arc::new(q));
        Ok(())
    }

    /// The matrices a pass multiplies activations by, as parameter indices: per layer the
    /// attention and MLP projections, then the output head (the embedding table when the
    /// head is tied to it).
    fn matrix_indices(&self) -> Vec<usize> {
        let which: &[usize] = match self.cfg.arch {
            Arch::Ddit => &[QKV, OUT, MLP0_W, MLP2_W],
            Arch::Llama => &[QKV, OUT, GATE_UP, DOWN],
        };
        let mut v: Vec<usize> = (0..self.cfg.n_layers)
            .flat_map(|l| which.iter().map(move |&w| self.block_idx(l, w)))
            .collect();
        v.push(match self.cfg.arch {
            Arch::Llama if self.cfg.tie_embeddings => 0,
            _ => self.final_idx() + 1,
        });
        v
    }

    /// A copy whose weight matrices (projections and head) are rounded to ggml blocks of
    /// `format` and multiplied from those blocks on the CPU (activations rounded to 8-bit
    /// blocks, the integer kernels: 4.5-8.5 bits read a weight instead of 16 or 32). Its
    /// f32 parameters hold the blocks' exact dequantization, so every other path (a
    /// device, the tape, saving) computes the same model. Rows along K must be whole
    /// blocks of 32.
    pub fn quantized(&self, format: QFormat) -> Result<Ddit> {
        let ty = match format {
            QFormat::Q8_0 => GgmlType::Q8_0,
            QFormat::Q4_0 => GgmlType::Q4_0,
            QFormat::Q4_1 => GgmlType::Q4_1,
        };
        let mut m = self.to_dtype(DType::F32)?;
        m.set_trainable(false);
        for i in m.matrix_indices() {
            let (name, t) = &m.params[i];
            let (rows, cols) = (t.shape()[0], t.shape()[1]);
            ensure!(
                cols.is_multiple_of(kf_engine::gemm::QK),
                "cannot quantize {name} [{rows}, {cols}] to {format}: its rows are not whole blocks of {}",
                kf_engine::gemm::QK
            );
            let bytes = kf_engine::quant::quantize(ty, &t.to_vec::<f32>()?)
                .with_context(|| format!("quantizing {name} to {format}"))?;
            let mut deq = vec![0f32; rows * cols];
            kf_engine::quant::dequantize(ty, &bytes, &mut deq)?;
            let name = name.clone();
            m.params[i].1 = Tensor::from_vec(deq, &[rows, cols], Device::Cpu)?;
            m.set_quantized(
                &name,
                QMat {
                    format,
                    bytes,
                    rows,
                    cols,
                },
            )?;
        }
        Ok(m)
    }

    /// The bytes of the parameters as an inference pass reads them: a matrix kept in
    /// blocks counts its blocks (its f32 dequantization is never read on the CPU).
    pub fn weight_bytes(&self) -> weights::WeightBytes {
        let mut wb = weights::WeightBytes::default();
        for (i, (name, t)) in self.params.iter().enumerate() {
            match self.quant.get(&i) {
                Some(q) => {
                    wb.total += q.bytes.len();
                    wb.blocks += q.bytes.len();
                }
                None => wb.add(
                    t.numel() * t.dtype().size(),
                    t.dtype(),
                    weights::is_matrix(name, t),
                ),
            }
        }
        // parameter 0 is the embedding table; a tied Llama head reads it whole every step
        let tied = self.cfg.arch == Arch::Llama && self.cfg.tie_embeddings;
        if !tied {
            wb.gathered = match self.quant.get(&0) {
                Some(q) => q.bytes.len(),
                None => self.params[0].1.numel() * self.params[0].1.dtype().size(),
            };
        }
        wb
    }

    /// Parameters multiplied from stored blocks on the CPU.
    pub fn n_quantized(&self) -> usize {
        self.quant.len()
    }

    /// `[h +] x · W_iᵀ [+ b]`: from the stored blocks when there are some, the pass is off
    /// the tape and on the CPU in f32; else the f32 (or 16-bit) parameter.
    fn lin(&self, h: Option<&Tensor>, x: &Tensor, i: usize, b: Option<&Tensor>) -> Result<Tensor> {
        if let Some(q) = self.quant.get(&i) {
            let mut ins = vec![x];
            ins.extend(h);
            if x.device().is_cpu() && x.dtype() == DType::F32 && !should_record(&ins) {
                return qlinear(h, x, q, b);
            }
        }
        match h {
            Some(h) => linear_residual(h, x, self.p(i), b),
            None => linear(x, self.p(i), b),
        }
    }
    fn block(&self, layer: usize, which: usize) -> &Tensor {
        self.p(self.block_idx(layer, which))
    }
    fn block_idx(&self, layer: usize, which: usize) -> usize {
        1 + layer * per_block(&self.cfg) + which
    }
    fn final_idx(&self) -> usize {
        1 + self.cfg.n_layers * per_block(&self.cfg)
    }

    /// Causal attention parameters of this model: scale 1/sqrt(D), queries at absolute rows
    /// `q_start..`, and per-sequence leading keys to ignore (empty = none).
    pub fn attn_params(&self, q_start: usize, key_skip: Vec<usize>) -> AttnParams {
        AttnParams {
            pattern: AttnPattern::Causal,
            q_start,
            scale: 1.0 / (self.cfg.head_dim() as f64).sqrt(),
            key_skip,
        }
    }

    /// Token embeddings `[B, T, d]` of u32 ids `[B, T]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        ensure!(
            ids.dtype() == DType::U32 && ids.rank() == 2,
            "token ids must be u32 [B, T], got {} {:?}",
            ids.dtype(),
            ids.shape()
        );
        embedding(ids, self.p(0))
    }

    /// The teacher's training forward: logits `[B, T, V]` of ids `[B, T]` at positions
    /// `0..T`, causal (on the tape when the model is trainable and grad is enabled).
    pub fn forward_train(&self, ids: &Tensor) -> Result<Tensor> {
        let t = ids.dim(1).context("token ids must be [B, T]")?;
        ensure!(
            t >= 1 && t <= self.cfg.max_seq_len,
            "sequence length {t} must be in 1..={} (max_seq_len)",
            self.cfg.max_seq_len
        );
        let h0 = self.embed(ids)?;
        let pos = positions(t)?.to_device(self.device())?;
        self.backbone(&h0, &pos, &self.attn_params(0, vec![]), None)
    }

    /// The backbone on given input embeddings `h0 [B, T, d]` (the student replaces some rows
    /// by its noise encoder's output): u32 positions `[T]` or `[B, T]` for RoPE, attention
    /// parameters (pattern, `q_start`, scale, `key_skip`), and an optional KV cache (then
    /// `attn.q_start` must equal the cache's committed length; this step's K/V are written
    /// after it and attended together with the cached rows; commit with `KvCache::commit`).
    /// Returns logits `[B, T, V]`.
    pub fn backbone(
        &self,
        h0: &Tensor,
        pos: &Tensor,
        attn: &AttnParams,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.backbone_hidden(h0, pos, attn, cache)?;
        self.head(&h)
    }

    /// [`Ddit::backbone`] without the final layer: the residual stream `[B, T, d]` after the
    /// last block (so a caller can apply [`Ddit::head`] to the rows it needs only).
    pub fn backbone_hidden(
        &self,
        h0: &Tensor,
        pos: &Tensor,
        attn: &AttnParams,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        ensure!(
            h0.rank() == 3 && h0.shape()[2] == d,
            "backbone: input embeddings must be [B, T, d = {d}], got {:?}",
            h0.shape()
        );
        ensure!(
            h0.dtype() == self.dtype(),
            "backbone: input embeddings are {} but the model computes in {}",
            h0.dtype(),
            self.dtype()
        );
        let (b, t) = (h0.shape()[0], h0.shape()[1]);
        ensure!(
            pos.dtype() == DType::U32 && (pos.shape() == [t] || pos.shape() == [b, t]),
            "backbone: positions must be u32 [T] or [B, T] = [{b}, {t}], got {} {:?}",
            pos.dtype(),
            pos.shape()
        );
        // positions on a kernel device are not read back (a sync per pass): the generation
        // and serving loops bound prompt + new tokens by max_seq_len before any pass
        if pos.device().is_cpu() {
            if let Some(&mx) = pos.to_vec::<u32>()?.iter().max() {
                ensure!(
                    (mx as usize) < cfg.max_seq_len,
                    "backbone: position {mx} is beyond the model's max_seq_len {}",
                    cfg.max_seq_len
                );
            }
        }
        if let Some(c) = cache.as_deref() {
            ensure!(
                !(grad_enabled() && (self.trainable || h0.tracks_grad())),
                "backbone: a KV-cached pass is inference only (run it under no_grad())"
            );
            ensure!(
                c.n_layers() == cfg.n_layers && c.batch() == b && c.dtype() == self.dtype(),
                "backbone: {c:?} does not fit this model ({} layers) and batch {b} ({})",
                cfg.n_layers,
                self.dtype()
            );
            ensure!(
                attn.q_start == c.len(),
                "backbone: with a KV cache the queries start at its committed length {}, not at q_start {}",
                c.len(),
                attn.q_start
            );
            ensure!(
                c.pending() == 0,
                "backbone: the KV cache holds {} uncommitted rows of the previous step (commit first)",
                c.pending()
            );
        }
        let fused = cfg.arch == Arch::Ddit;
        // the rotation's tables once for every layer of the pass
        let ra = RopeAt::new(pos, cfg.head_dim(), &cfg.rope())?;
        self.blocks(h0, |layer, qkv| match cache.as_deref_mut() {
            Some(c) => {
                let q = ra.apply(&qkv.q()?)?;
                let k = ra.apply(&qkv.k()?)?;
                let (kc, vc) = c.write(layer, &k, &qkv.v()?)?;
                attention(&q, &kc, &vc, attn)
            }
            // the fused op: same values as rope + attention on the q, k, v views, but
            // its backward writes one [B, T, 3, H, D] gradient (no zero-padded
            // per-part gradients summed on the tape)
            None if fused => rope_attention(&qkv.packed()?, pos, ra.freqs(), attn),
            None => {
                let q = ra.apply(&qkv.q()?)?;
                let k = ra.apply(&qkv.k()?)?;
                attention(&q, &k, &qkv.v()?, attn)
            }
        })
    }

    /// The blocks on `h0 [B, T, d]`, written once for every pass and both block kinds:
    /// `mix(layer, qkv)` turns the layer's projected [`Qkv`] into the attention output
    /// (`B·T·H·D` values, any `[B, T, ..]` shape); the norms, projections and MLP are the
    /// same for every caller.
    fn blocks(
        &self,
        h0: &Tensor,
        mut mix: impl FnMut(usize, &Qkv) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, hk, hd) = (cfg.n_heads, cfg.kv_heads(), cfg.head_dim());
        let (b, t) = (h0.shape()[0], h0.shape()[1]);
        let eps = cfg.ln_eps;
        let llama = cfg.arch == Arch::Llama;
        let norm = |x: &Tensor, w: &Tensor| {
            if llama {
                rms_norm(x, w, eps)
            } else {
                layer_norm(x, w, None, eps)
            }
        };
        let mut h = h0.clone();
        for layer in 0..cfg.n_layers {
            let x = norm(&h, self.block(layer, NORM1))?;
            // [B, T, (H + 2 Hk) D] viewed as heads: q, k, v are strided views
            let all = self
                .lin(None, &x, self.block_idx(layer, QKV), None)?
                .reshape(&[b, t, nh + 2 * hk, hd])?;
            let qkv = Qkv { all, nh, hk };
            let a = mix(layer, &qkv)?.reshape(&[b, t, nh * hd])?;
            // the residual adds done by the GEMMs (they accumulate into h)
            h = self.lin(Some(&h), &a, self.block_idx(layer, OUT), None)?;
            let x = norm(&h, self.block(layer, NORM2))?;
            h = if llama {
                let gu = self.lin(None, &x, self.block_idx(layer, GATE_UP), None)?;
                self.lin(Some(&h), &swiglu(&gu)?, self.block_idx(layer, DOWN), None)?
            } else {
                // the first bias in the GELU's pass (one kernel on a device)
                let m = self.lin(None, &x, self.block_idx(layer, MLP0_W), None)?;
                self.lin(
                    Some(&h),
                    &bias_gelu_tanh(&m, self.block(layer, MLP0_B))?,
                    self.block_idx(layer, MLP2_W),
                    Some(self.block(layer, MLP2_B)),
                )?
            };
        }
        Ok(h)
    }

    /// A ragged inference pass (continuous batching): the rows of several sequences packed
    /// one after another in `h0 [1, R, d]`, sequence `s` owning the next `seqs[s].pos.len()`
    /// rows at RoPE positions `pos` and its own KV cache (batch 1, nothing pending). Every
    /// matrix product runs once over all R rows; each sequence's attention reads only its
    /// own cache, causal by absolute row, so a sequence computes what it computes alone.
    /// Writes every cache (the caller commits); returns the residual stream `[1, R, d]`.
    pub fn ragged_hidden(&self, h0: &Tensor, seqs: &mut [RaggedSeq<'_>]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (d, nh, hd) = (cfg.d_model, cfg.n_heads, cfg.head_dim());
        let r: usize = seqs.iter().map(|s| s.pos.len()).sum();
        ensure!(
            h0.rank() == 3 && h0.shape() == [1, r, d] && h0.dtype() == self.dtype(),
            "ragged pass: input must be {} [1, R = {r}, d = {d}], got {} {:?}",
            self.dtype(),
            h0.dtype(),
            h0.shape()
        );
        ensure!(
            !(grad_enabled() && (self.trainable || h0.tracks_grad())),
            "ragged pass: inference only (run it under no_grad())"
        );
        let dev = self.device();
        let freqs = cfg.rope();
        let mut pos = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let c = &s.cache;
            ensure!(!s.pos.is_empty(), "ragged pass: sequence {i} has no rows");
            ensure!(
                c.n_layers() == cfg.n_layers && c.batch() == 1 && c.dtype() == self.dtype(),
                "ragged pass: sequence {i}'s {c:?} does not fit this model ({} layers, batch 1, {})",
                cfg.n_layers,
                self.dtype()
            );
            ensure!(
                c.pending() == 0,
                "ragged pass: sequence {i}'s KV cache holds uncommitted rows (commit first)"
            );
            if let Some(&mx) = s.pos.iter().max() {
                ensure!(
                    (mx as usize) < cfg.max_seq_len,
                    "ragged pass: position {mx} is beyond the model's max_seq_len {}",
                    cfg.max_seq_len
                );
            }
            let p = Tensor::from_vec(s.pos.clone(), &[1, s.pos.len()], dev)?;
            pos.push(RopeAt::new(&p, hd, &freqs)?);
        }
        self.blocks(h0, |layer, qkv| {
            let out = Tensor::zeros(&[1, r, nh, hd], self.dtype(), dev)?;
            let mut at = 0;
            for (s, p) in seqs.iter_mut().zip(&pos) {
                let t = s.pos.len();
                let rows = qkv.rows(at, t)?;
                let q = p.apply(&rows.q()?)?;
                let k = p.apply(&rows.k()?)?;
                let (kc, vc) = s.cache.write(layer, &k, &rows.v()?)?;
                let attn = self.attn_params(s.cache.len(), vec![]);
                out.narrow(1, at, t)?
                    .copy_from(&attention(&q, &kc, &vc, &attn)?)?;
                at += t;
            }
            Ok(out)
        })
    }

    /// The final layer on a residual stream `h [.., d]`: LN_f (weight only), then
    /// `Linear(d, V, bias)`, then the reserved token's logit set to -1000.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let f = self.final_idx();
        if self.cfg.arch == Arch::Llama {
            let x = rms_norm(h, self.p(f), self.cfg.ln_eps)?;
            let w = if self.cfg.tie_embeddings { 0 } else { f + 1 };
            return mask_logit(self.lin(None, &x, w, None)?, self.cfg.mask_token_id);
        }
        let x = layer_norm(h, self.p(f), None, self.cfg.ln_eps)?;
        let logits = self.lin(None, &x, f + 1, Some(self.p(f + 2)))?;
        mask_logit(logits, self.cfg.mask_token_id)
    }
}

/// One sequence of a [`Ddit::ragged_hidden`] pass: its KV cache and the RoPE positions of
/// its rows (one per row).
pub struct RaggedSeq<'a> {
    pub cache: &'a mut KvCache,
    pub pos: Vec<u32>,
}

/// One layer's projected queries, keys and values `[B, T, H + 2 Hk, D]` (q heads, then k,
/// then v; a DDiT has Hk = H, so this is its `[B, T, 3, H, D]`): the parts as strided views.
pub struct Qkv {
    all: Tensor,
    nh: usize,
    hk: usize,
}

impl Qkv {
    /// Queries `[B, T, H, D]`.
    pub fn q(&self) -> Result<Tensor> {
        self.all.narrow(2, 0, self.nh)
    }
    /// Keys `[B, T, Hk, D]`.
    pub fn k(&self) -> Result<Tensor> {
        self.all.narrow(2, self.nh, self.hk)
    }
    /// Values `[B, T, Hk, D]`.
    pub fn v(&self) -> Result<Tensor> {
        self.all.narrow(2, self.nh + self.hk, self.hk)
    }
    /// The packed `[B, T, 3, H, D]` of the fused rope + attention op (needs Hk = H).
    pub fn packed(&self) -> Result<Tensor> {
        ensure!(
            self.hk == self.nh,
            "packed qkv needs as many K/V heads as query heads"
        );
        let s = self.all.shape();
        self.all.reshape(&[s[0], s[1], 3, self.nh, s[3]])
    }
    /// Rows `at..at + t` (of a batch-1 ragged pass).
    fn rows(&self, at: usize, t: usize) -> Result<Qkv> {
        Ok(Qkv {
            all: self.all.narrow(1, at, t)?,
            nh: self.nh,
            hk: self.hk,
        })
    }
}

/// `[h +] x · Wᵀ [+ b]` with W in stored blocks (off the tape, CPU, f32): x's rows are
/// rounded to 8-bit blocks by the kernel, as llama.cpp does.
fn qlinear(h: Option<&Tensor>, x: &Tensor, q: &QMat, b: Option<&Tensor>) -> Result<Tensor> {
    let k = q.cols;
    ensure!(
        x.dim(x.rank() - 1)? == k,
        "linear: input {:?} does not fit a [{}, {k}] weight",
        x.shape(),
        q.rows
    );
    let m = x.numel() / k;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = q.rows;
    let mut c = match h {
        Some(h) => {
            ensure!(
                h.shape() == shape,
                "linear: residual {:?} vs {shape:?}",
                h.shape()
            );
            h.contiguous()?.to_vec::<f32>()?
        }
        None => vec![0f32; m * q.rows],
    };
    let xc = x.contiguous()?;
    let xs = xc.cpu_data::<f32>()?;
    let w = match q.format {
        QFormat::Q8_0 => WRows::Q8_0(&q.bytes),
        QFormat::Q4_0 => WRows::Q4_0(&q.bytes),
        QFormat::Q4_1 => WRows::Q4_1(&q.bytes),
    };
    xwt(m, q.rows, k, &xs, k, w, k, &mut c, q.rows, h.is_some())?;
    drop(xs);
    let out = Tensor::from_vec(c, &shape, Device::Cpu)?;
    match b {
        Some(b) => kf_ops::elementwise::bias_add(&out, b),
        None => Ok(out),
    }
}

/// Positions `0..t` as u32 `[T]`.
pub fn positions(t: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..t as u32).collect();
    Tensor::from_vec(v, &[t], Device::Cpu)
}

/// Sets column `id` of `logits [.., V]` to exactly [`MASK_LOGIT`]. Off the tape this
/// writes in place (the logits are a fresh buffer of the head's linear); on the tape it
/// is an op whose output is a copy and whose gradient is `g` with that column zeroed (the
/// logit is a constant, so nothing flows into the head from it).
fn mask_logit(logits: Tensor, id: Option<u32>) -> Result<Tensor> {
    let Some(id) = id else { return Ok(logits) };
    let col = id as usize;
    let v = logits.dim(logits.rank() - 1)?;
    ensure!(col < v, "mask token {id} outside the {v} logits");
    if logits.device().is_kernel_device() {
        return mask_logit_on_device(logits, v, col);
    }
    fn set_col<T: Float>(x: &mut [T], v: usize, col: usize) {
        for row in x.chunks_exact_mut(v) {
            row[col] = T::from_f64(MASK_LOGIT);
        }
    }
    fn go<T: Float>(logits: Tensor, v: usize, col: usize) -> Result<Tensor> {
        if should_record(&[&logits]) && logits.is_contiguous() && logits.is_sole_owner() {
            // the head's fresh output, held by nobody else (its linear's backward does not
            // read it): write the column in place and re-wrap the buffer with this op's node,
            // instead of copying [N, V] logits
            logits.with_cpu_data_mut::<T, _>(|x| set_col(x, v, col))?;
            let node: Arc<dyn BackwardOp> = Arc::new(MaskLogitBackward {
                x: logits.clone(),
                col,
            });
            return Ok(logits.rewrap(Some(node)));
        }
        if should_record(&[&logits]) {
            let mut data = logits.contiguous()?.to_vec::<T>()?;
            set_col(&mut data, v, col);
            let node: Arc<dyn BackwardOp> = Arc::new(MaskLogitBackward {
                x: logits.clone(),
                col,
            });
            return Tensor::from_cpu_op(data, logits.shape(), Some(node));
        }
        let logits = logits.contiguous()?;
        logits.with_cpu_data_mut::<T, _>(|x| set_col(x, v, col))?;
        Ok(logits)
    }
    match logits.dtype() {
        DType::F32 => go::<f32>(logits, v, col),
        DType::F64 => go::<f64>(logits, v, col),
        other => bail!("mask_logit: unsupported dtype {other}"),
    }
}

/// [`mask_logit`] on a kernel device: `MASK_LOGIT` written into column `col` of the head's
/// fresh logits in place (its linear's backward does not read them), with this op's node
/// when recorded. One copy per row: fine for the emulator's checks; a GPU decode wants this
/// folded into the head's bias kernel.
fn mask_logit_on_device(logits: Tensor, v: usize, col: usize) -> Result<Tensor> {
    ensure!(
        logits.dtype() == DType::F32 && logits.is_contiguous() && logits.layout().offset() == 0,
        "mask_logit on {}: the head's logits must be contiguous f32",
        logits.device()
    );
    set_column_on_device(&logits, v, col, MASK_LOGIT as f32)?;
    if should_record(&[&logits]) {
        let node: Arc<dyn BackwardOp> = Arc::new(MaskLogitBackward {
            x: logits.clone(),
            col,
        });
        return Ok(logits.rewrap(Some(node)));
    }
    Ok(logits)
}

/// Writes `value` into column `col` of every row of the whole f32 device buffer `t [.., V]`:
/// one strided copy of the value broadcast over the column view (not one copy per row). The
/// value is uploaded once per device and value (an upload inside every decode step would be a
/// host-to-device copy, and a sync on a GPU, each time).
fn set_column_on_device(t: &Tensor, v: usize, col: usize, value: f32) -> Result<()> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static VALUES: OnceLock<Mutex<HashMap<(Device, u32), Tensor>>> = OnceLock::new();
    let rows = t.numel() / v;
    let _g = kf_engine::no_grad();
    let val = {
        let mut m = VALUES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| anyhow::anyhow!("device constants poisoned by an earlier panic"))?;
        match m.entry((t.device(), value.to_bits())) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
            std::collections::hash_map::Entry::Vacant(e) => e
                .insert(Tensor::from_vec(vec![value], &[1, 1], t.device())?)
                .clone(),
        }
    };
    t.reshape(&[rows, v])?
        .narrow(1, col, 1)?
        .copy_from(&val.broadcast_as(&[rows, 1])?)
}

struct MaskLogitBackward {
    x: Tensor,
    col: usize,
}

impl BackwardOp for MaskLogitBackward {
    fn name(&self) -> &'static str {
        "mask_logit"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        fn go<T: Float>(g: &Tensor, col: usize) -> Result<Tensor> {
            let v = g.dim(g.rank() - 1)?;
            if g.is_contiguous() && g.is_sole_owner() {
                // the tape's only handle on this gradient (the cross-entropy's fresh
                // [N, V] buffer): zero the column in place instead of copying it
                g.with_cpu_data_mut::<T, _>(|d| {
                    d.chunks_exact_mut(v).for_each(|r| r[col] = T::ZERO)
                })?;
                return Ok(g.clone());
            }
            let mut d = g.contiguous()?.to_vec::<T>()?;
            d.chunks_exact_mut(v).for_each(|r| r[col] = T::ZERO);
            Tensor::from_vec(d, g.shape(), Device::Cpu)
        }
        if g.device().is_kernel_device() {
            // the cross-entropy's fresh gradient when nobody else holds it, else a copy
            let gz = if g.is_sole_owner() && g.is_contiguous() && g.layout().offset() == 0 {
                g.clone()
            } else {
                let c = Tensor::zeros(g.shape(), g.dtype(), g.device())?;
                c.copy_from(g)?;
                c
            };
            set_column_on_device(&gz, g.dim(g.rank() - 1)?, self.col, 0.0)?;
            return Ok(vec![Some(gz)]);
        }
        let gz = match g.dtype() {
            DType::F32 => go::<f32>(g, self.col)?,
            DType::F64 => go::<f64>(g, self.col)?,
            other => bail!("mask_logit backward: unsupported dtype {other}"),
        };
        Ok(vec![Some(gz)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DditConfig {
        let mut c = DditConfig::preset("tiny").unwrap();
        c.n_layers = 1;
        c.vocab_size = 40;
        c.mask_token_id = Some(2);
        c
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kf-ddit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_is_deterministic_and_counts_match() {
        let c = cfg();
        let (a, b) = (Ddit::init(&c, 1).unwrap(), Ddit::init(&c, 1).unwrap());
        let n: usize = a.params().iter().map(|(_, t)| t.numel()).sum();
        assert_eq!(n, c.n_params());
        assert_eq!(a.params().len(), param_specs(&c).len());
        for ((na, ta), (nb, tb)) in a.params().iter().zip(b.params()) {
            assert_eq!(na, nb);
            assert_eq!(ta.to_vec::<f32>().unwrap(), tb.to_vec::<f32>().unwrap());
        }
        let w = a
            .param("blocks.0.attn_qkv.weight")
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let sd = (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64).sqrt();
        assert!((sd - INIT_STD).abs() < 0.002, "std {sd}");
        assert!(a
            .param("blocks.0.norm1.weight")
            .unwrap()
            .to_vec_f64()
            .unwrap()
            .iter()
            .all(|&x| x == 1.0));
        assert!(a
            .param("output_layer.linear.bias")
            .unwrap()
            .to_vec_f64()
            .unwrap()
            .iter()
            .all(|&x| x == 0.0));
        let c2 = Ddit::init(&c, 2).unwrap();
        assert_ne!(
            a.params()[0].1.to_vec::<f32>().unwrap(),
            c2.params()[0].1.to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn save_load_round_trip_in_each_dtype() {
        let c = cfg();
        let m = Ddit::init(&c, 3).unwrap();
        let dir = tmp("rt");
        m.save(&dir, DType::F32).unwrap();
        let l = Ddit::load(&dir).unwrap();
        assert_eq!(l.cfg, c);
        assert!(
            l.params()[0].1.is_mapped().unwrap(),
            "f32 weights load zero-copy"
        );
        for ((_, a), (_, b)) in m.params().iter().zip(l.params()) {
            assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        }
        m.save(&dir, DType::BF16).unwrap();
        let l = Ddit::load(&dir).unwrap();
        assert_eq!(l.dtype(), DType::F32);
        let (a, b) = (
            m.params()[0].1.to_vec_f64().unwrap(),
            l.params()[0].1.to_vec_f64().unwrap(),
        );
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| (x - y).abs() <= 0.004 * x.abs() + 1e-30));
        assert!(m.save(&dir, DType::U32).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn weights_that_do_not_fit_the_config_are_named() {
        let c = cfg();
        let m = Ddit::init(&c, 3).unwrap();
        let dir = tmp("bad");
        m.save(&dir, DType::F32).unwrap();
        // config says 2 layers, file has 1
        let mut c2 = c.clone();
        c2.n_layers = 2;
        checkpoint::write_config(&dir, &c2).unwrap();
        let e = format!("{:#}", Ddit::load(&dir).unwrap_err());
        assert!(
            e.contains("missing tensor \"blocks.1.norm1.weight\""),
            "{e}"
        );
        // wider model in the config
        let mut c3 = c.clone();
        c3.vocab_size = 41;
        checkpoint::write_config(&dir, &c3).unwrap();
        let e = format!("{:#}", Ddit::load(&dir).unwrap_err());
        assert!(
            e.contains("vocab_embed.embedding") && e.contains("[41, 64]"),
            "{e}"
        );
        // an extra tensor
        let mut named: Vec<(String, Tensor)> = m.params().to_vec();
        named.push((
            "blocks.0.attn_qkv.bias".into(),
            Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap(),
        ));
        let e = Ddit::from_params(&c, named).unwrap_err().to_string();
        assert!(
            e.contains("unexpected") && e.contains("attn_qkv.bias"),
            "{e}"
        );
        // a truncated weights file
        checkpoint::write_config(&dir, &c).unwrap();
        let w = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", Ddit::load(&dir).unwrap_err());
        assert!(e.contains("model.safetensors"), "{e}");
        std::fs::remove_file(&w).unwrap();
        let e = format!("{:#}", Ddit::load(&dir).unwrap_err());
        assert!(e.contains("has no model.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mask_logit_is_exact_on_and_off_the_tape() {
        let c = cfg();
        let mut m = Ddit::init(&c, 4).unwrap();
        let x = Tensor::from_vec(vec![1u32, 2, 3, 4, 5, 6], &[2, 3], Device::Cpu).unwrap();
        let off = m.forward_train(&x).unwrap();
        m.set_trainable(true);
        let on = m.forward_train(&x).unwrap();
        assert!(on.tracks_grad() && !off.tracks_grad());
        let (a, b) = (off.to_vec::<f32>().unwrap(), on.to_vec::<f32>().unwrap());
        assert_eq!(a, b);
        assert!(a.chunks(40).all(|r| r[2] == -1000.0));
        let g = on.backward().unwrap();
        let gb = g
            .get(m.param("output_layer.linear.bias").unwrap())
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(gb[2], 0.0);
        assert_eq!(gb[3], 6.0); // d(sum logits)/d bias = number of rows
    }

    #[test]
    fn forward_rejects_bad_inputs() {
        let c = cfg();
        let m = Ddit::init(&c, 4).unwrap();
        let long = Tensor::zeros(&[1, c.max_seq_len + 1], DType::U32, Device::Cpu).unwrap();
        assert!(m
            .forward_train(&long)
            .unwrap_err()
            .to_string()
            .contains("max_seq_len"));
        let oov = Tensor::from_vec(vec![40u32], &[1, 1], Device::Cpu).unwrap();
        assert!(m
            .forward_train(&oov)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        let f = Tensor::zeros(&[1, 2], DType::F32, Device::Cpu).unwrap();
        assert!(m.forward_train(&f).is_err());
        let h0 = Tensor::zeros(&[1, 2, 64], DType::F32, Device::Cpu).unwrap();
        let far = Tensor::from_vec(vec![0u32, c.max_seq_len as u32], &[2], Device::Cpu).unwrap();
        let e = m
            .backbone(&h0, &far, &m.attn_params(0, vec![]), None)
            .unwrap_err();
        assert!(e.to_string().contains("beyond"), "{e}");
        let mut cache = KvCache::new(&c, 1, 8, DType::F32).unwrap();
        let pos = positions(2).unwrap();
        let e = m
            .backbone(&h0, &pos, &m.attn_params(1, vec![]), Some(&mut cache))
            .unwrap_err();
        assert!(e.to_string().contains("committed length 0"), "{e}");
        let mut t = m.to_dtype(DType::F64).unwrap();
        t.set_trainable(true);
        let h64 = h0.to_dtype(DType::F64).unwrap();
        let mut c64 = KvCache::new(&c, 1, 8, DType::F64).unwrap();
        let e = t
            .backbone(&h64, &pos, &t.attn_params(0, vec![]), Some(&mut c64))
            .unwrap_err();
        assert!(e.to_string().contains("no_grad"), "{e}");
    }
}
