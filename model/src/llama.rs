//! Pretrained Llama-family teachers: the importers that turn a GGUF file (llama.cpp's
//! format) or a Hugging Face `LlamaForCausalLM` directory (config.json + safetensors,
//! sharded or not) into the one backbone (`Ddit` with `arch: llama`), and the writer of the
//! Hugging Face form. Weights become f32 (dequantized); every malformed file is one error
//! naming the file and what is wrong.
//!
//! Layouts: our checkpoint keeps Hugging Face's row order (rotate-half RoPE), with q/k/v
//! and gate/up stacked into one matrix each. llama.cpp's converter permutes the rows of
//! `attn_q` / `attn_k` within each head for its interleaved RoPE; the GGUF importer undoes
//! that permutation (row `h·D + 2j + s` of the file is row `h·D + s·D/2 + j` here).
//!
//! RoPE scaling: Hugging Face's `rope_scaling` (linear, llama3) and GGUF's linear type and
//! `rope_freqs.weight` divisors (Llama 3.1's scaling as llama.cpp stores it) become the
//! config's `rope_scaling` ([`RopeScaling`]); yarn and the others are one clear error.

use crate::config::{Arch, DditConfig, RopeScaling};
use crate::ddit::{Ddit, QMat};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::gemm::QFormat;
use kf_engine::gguf::{GgmlType, Gguf, GgufValue};
use kf_engine::{io, DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The Hugging Face config keys this importer reads; `model_type` must be "llama" (or a
/// Llama-shaped family with the same tensors: mistral without sliding windows, smollm).
#[derive(Debug, serde::Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<serde_json::Value>,
    head_dim: Option<usize>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

/// Whether `path` holds a Hugging Face model directory (its config.json names a
/// `model_type`), as opposed to one of ours.
pub fn is_hf_dir(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("model_type").cloned())
        .is_some()
}

/// Whether `path` names a GGUF file (by its magic, not its name).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

fn meta<'a>(g: &'a Gguf, key: &str) -> Result<&'a GgufValue> {
    g.get(key)
        .with_context(|| format!("{}: no metadata key {key}", g.path().display()))
}

fn meta_usize(g: &Gguf, key: &str) -> Result<usize> {
    let v = meta(g, key)?;
    v.as_u64()
        .and_then(|x| usize::try_from(x).ok())
        .with_context(|| {
            format!(
                "{}: {key} must be an unsigned integer, got {}",
                g.path().display(),
                v.summary()
            )
        })
}

fn meta_f64(g: &Gguf, key: &str, default: f64) -> Result<f64> {
    match g.get(key) {
        None => Ok(default),
        Some(v) => v.as_f64().with_context(|| {
            format!(
                "{}: {key} must be a number, got {}",
                g.path().display(),
                v.summary()
            )
        }),
    }
}

fn meta_id(g: &Gguf, key: &str) -> Result<Option<u32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .with_context(|| {
                format!(
                    "{}: {key} must be a token id, got {}",
                    g.path().display(),
                    v.summary()
                )
            }),
    }
}

/// The backbone config of a GGUF file's `llama.*` metadata (other architectures: one
/// error naming theirs).
pub fn config_from_gguf(g: &Gguf) -> Result<DditConfig> {
    let p = g.path().display();
    let arch = meta(g, "general.architecture")?
        .as_str()
        .with_context(|| format!("{p}: general.architecture is not a string"))?;
    ensure!(
        arch == "llama",
        "{p}: architecture \"{arch}\" is not supported (only the Llama family: \"llama\")"
    );
    let n_heads = meta_usize(g, "llama.attention.head_count")?;
    let d_model = meta_usize(g, "llama.embedding_length")?;
    let vocab_size = match g.get("llama.vocab_size") {
        Some(_) => meta_usize(g, "llama.vocab_size")?,
        None => meta(g, "tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len())
            .with_context(|| format!("{p}: tokenizer.ggml.tokens is not an array"))?,
    };
    ensure!(n_heads >= 1, "{p}: llama.attention.head_count is 0");
    let rope_scaling = gguf_rope_scaling(g, d_model / n_heads)?;
    if let Some(v) = g.get("llama.rope.dimension_count") {
        let rd = v.as_u64().unwrap_or(0) as usize;
        ensure!(
            rd == d_model / n_heads,
            "{p}: llama.rope.dimension_count {rd} differs from the head dim {} (partial RoPE is not supported)",
            d_model / n_heads
        );
    }
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let cfg = DditConfig {
        n_layers: meta_usize(g, "llama.block_count")?,
        d_model,
        n_heads,
        vocab_size,
        max_seq_len: meta_usize(g, "llama.context_length")?,
        rope_base: meta_f64(g, "llama.rope.freq_base", 10000.0)?,
        ln_eps: meta_f64(g, "llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        mask_token_id: None,
        eos_token_id: meta_id(g, "tokenizer.ggml.eos_token_id")?,
        k: None,
        arch: Arch::Llama,
        n_kv_heads: Some(match g.get("llama.attention.head_count_kv") {
            Some(_) => meta_usize(g, "llama.attention.head_count_kv")?,
            None => n_heads,
        }),
        ffn_dim: Some(meta_usize(g, "llama.feed_forward_length")?),
        tie_embeddings: g.tensor_info("output.weight").is_none(),
        bos_token_id: if add_bos {
            meta_id(g, "tokenizer.ggml.bos_token_id")?
        } else {
            None
        },
        rope_scaling,
    };
    cfg.validate()
        .with_context(|| format!("{p}: the llama.* metadata"))?;
    Ok(cfg)
}

/// A GGUF file's RoPE scaling: `llama.rope.scaling.type` "linear" (with
/// `llama.rope.scaling.factor`) and the per-frequency divisors of a `rope_freqs.weight`
/// tensor (how llama.cpp stores Llama 3.1's scaling); both multiply. Other types (yarn,
/// longrope) are one clear error.
fn gguf_rope_scaling(g: &Gguf, hd: usize) -> Result<Option<RopeScaling>> {
    let p = g.path().display();
    let linear = match g.get("llama.rope.scaling.type") {
        None => None,
        Some(v) => match v.as_str() {
            Some("none") => None,
            Some("linear") => Some(meta_f64(g, "llama.rope.scaling.factor", f64::NAN)?),
            t => bail!(
                "{p}: RoPE scaling {} is not supported (none, linear, and Llama 3's rope_freqs.weight are)",
                t.map_or("(not a string)".to_string(), |t| format!("\"{t}\""))
            ),
        },
    };
    let factors = match g.tensor_info("rope_freqs.weight") {
        None => None,
        Some(info) => {
            ensure!(
                info.shape == [hd / 2],
                "{p}: rope_freqs.weight has shape {:?}, the head dim {hd} needs [{}]",
                info.shape,
                hd / 2
            );
            let v = g.tensor_f32("rope_freqs.weight")?.to_vec::<f32>()?;
            Some(v.into_iter().map(f64::from).collect::<Vec<f64>>())
        }
    };
    Ok(match (linear, factors) {
        (None, None) => None,
        (Some(factor), None) => Some(RopeScaling::Linear { factor }),
        (l, Some(f)) => Some(RopeScaling::Factors {
            factors: f.into_iter().map(|v| v * l.unwrap_or(1.0)).collect(),
        }),
    })
}

/// A Hugging Face `rope_scaling` (null, or an object whose `rope_type` — older files:
/// `type` — is "default", "linear" or "llama3"); other types are one clear error.
fn hf_rope_scaling(v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let ty = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .with_context(|| format!("rope_scaling {v}: no rope_type"))?;
    let num = |key: &str| {
        v.get(key)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("rope_scaling {v}: {key} is missing or not a number"))
    };
    Ok(match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => {
            bail!("rope_scaling type \"{other}\" is not supported (default, linear and llama3 are)")
        }
    })
}

/// [`hf_rope_scaling`]'s inverse for the writer.
fn hf_rope_scaling_json(s: &Option<RopeScaling>) -> Result<serde_json::Value> {
    Ok(match s {
        None => serde_json::Value::Null,
        Some(RopeScaling::Linear { factor }) => {
            serde_json::json!({ "rope_type": "linear", "factor": factor })
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
        Some(RopeScaling::Factors { .. }) => bail!(
            "a RoPE scaling given as per-frequency factors (a GGUF file's rope_freqs.weight) has no Hugging Face config form"
        ),
    })
}

/// Undoes llama.cpp's per-head row permutation of `attn_q` / `attn_k` (module docs):
/// `w [heads·D, cols]` in the file's order -> Hugging Face's order.
/// Rows are `cols` items long (f32 values, or the bytes of a quantized row).
fn unpermute_rows<T: Copy + Default>(w: &[T], heads: usize, hd: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); w.len()];
    let half = hd / 2;
    for h in 0..heads {
        for j in 0..half {
            for s in 0..2 {
                let src = (h * hd + 2 * j + s) * cols;
                let dst = (h * hd + s * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Stacks 2-D f32 tensors with equal column counts row-wise.
fn stack_rows(parts: &[Vec<f32>], cols: usize) -> Result<Tensor> {
    let rows: usize = parts.iter().map(|p| p.len() / cols).sum();
    let mut all = Vec::with_capacity(rows * cols);
    for p in parts {
        all.extend_from_slice(p);
    }
    Tensor::from_vec(all, &[rows, cols], Device::Cpu)
}

/// Loads a Llama-family GGUF file as an f32 backbone (every tensor dequantized).
pub fn load_gguf(path: &Path) -> Result<Ddit> {
    load_gguf_with(path, false)
}

/// The ggml block format of the engine's quantized x·Wᵀ kernels, if `ty` is one.
fn kernel_format(ty: GgmlType) -> Option<QFormat> {
    match ty {
        GgmlType::Q8_0 => Some(QFormat::Q8_0),
        GgmlType::Q4_0 => Some(QFormat::Q4_0),
        GgmlType::Q4_1 => Some(QFormat::Q4_1),
        _ => None,
    }
}

/// [`load_gguf`]; with `keep_quantized`, the matrices stored as Q8_0 / Q4_0 / Q4_1 also keep
/// their blocks, which CPU inference multiplies with (`Ddit::set_quantized`; the f32
/// parameters stay, for the tape and the devices).
pub fn load_gguf_with(path: &Path, keep_quantized: bool) -> Result<Ddit> {
    // one validated mapping of the file for both the f32 values and the blocks
    let g = Gguf::open(path)?;
    let mut m = load_gguf_f32(&g, path)?;
    if !keep_quantized {
        return Ok(m);
    }
    let cfg = m.cfg.clone();
    let (d, hd, f) = (cfg.d_model, cfg.head_dim(), cfg.ffn());
    let (nh, hk) = (cfg.n_heads, cfg.kv_heads());
    // the blocks of tensors that all share one kernel format, rows stacked (q/k rows
    // un-permuted like the f32 values)
    let stacked = |parts: &[(&str, usize)]| -> Result<Option<(QFormat, Vec<u8>)>> {
        let mut fmt = None;
        let mut bytes = vec![];
        for &(name, heads) in parts {
            let info = g
                .tensor_info(name)
                .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
            let Some(q) = kernel_format(info.ty) else {
                return Ok(None);
            };
            if fmt.is_some_and(|f| f != q) {
                return Ok(None);
            }
            fmt = Some(q);
            let raw = g.tensor_bytes(name)?;
            let row = raw.len() / info.shape[0];
            if heads > 0 {
                bytes.extend(unpermute_rows(raw, heads, hd, row));
            } else {
                bytes.extend_from_slice(raw);
            }
        }
        Ok(fmt.map(|f| (f, bytes)))
    };
    let attach = |m: &mut Ddit,
                  param: &str,
                  parts: &[(&str, usize)],
                  rows: usize,
                  cols: usize|
     -> Result<()> {
        if let Some((format, bytes)) = stacked(parts)? {
            m.set_quantized(
                param,
                QMat {
                    format,
                    bytes,
                    rows,
                    cols,
                },
            )?;
        }
        Ok(())
    };
    attach(
        &mut m,
        "model.embed_tokens.weight",
        &[("token_embd.weight", 0)],
        cfg.vocab_size,
        d,
    )?;
    for i in 0..cfg.n_layers {
        let (b, l) = (format!("blk.{i}"), format!("model.layers.{i}"));
        let q = format!("{b}.attn_q.weight");
        let k = format!("{b}.attn_k.weight");
        let v = format!("{b}.attn_v.weight");
        attach(
            &mut m,
            &format!("{l}.self_attn.qkv_proj.weight"),
            &[(&q, nh), (&k, hk), (&v, 0)],
            (nh + 2 * hk) * hd,
            d,
        )?;
        attach(
            &mut m,
            &format!("{l}.self_attn.o_proj.weight"),
            &[(&format!("{b}.attn_output.weight"), 0)],
            d,
            nh * hd,
        )?;
        let gate = format!("{b}.ffn_gate.weight");
        let up = format!("{b}.ffn_up.weight");
        attach(
            &mut m,
            &format!("{l}.mlp.gate_up_proj.weight"),
            &[(&gate, 0), (&up, 0)],
            2 * f,
            d,
        )?;
        attach(
            &mut m,
            &format!("{l}.mlp.down_proj.weight"),
            &[(&format!("{b}.ffn_down.weight"), 0)],
            d,
            f,
        )?;
    }
    if !cfg.tie_embeddings {
        attach(
            &mut m,
            "lm_head.weight",
            &[("output.weight", 0)],
            cfg.vocab_size,
            d,
        )?;
    }
    Ok(m)
}

fn load_gguf_f32(g: &Gguf, path: &Path) -> Result<Ddit> {
    let cfg = config_from_gguf(&g)?;
    let p = path.display();
    let (d, hd, f) = (cfg.d_model, cfg.head_dim(), cfg.ffn());
    let (nh, hk) = (cfg.n_heads, cfg.kv_heads());
    let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let info = g
            .tensor_info(name)
            .with_context(|| format!("{p}: missing tensor {name}"))?;
        ensure!(
            info.shape == shape,
            "{p}: tensor {name} has shape {:?}, the metadata needs {shape:?}",
            info.shape
        );
        g.tensor_f32(name)?.to_vec::<f32>()
    };
    let vec1 =
        |name: &str| -> Result<Tensor> { Tensor::from_vec(get(name, &[d])?, &[d], Device::Cpu) };
    let mut named: Vec<(String, Tensor)> = vec![];
    let embed = get("token_embd.weight", &[cfg.vocab_size, d])?;
    named.push((
        "model.embed_tokens.weight".into(),
        Tensor::from_vec(embed, &[cfg.vocab_size, d], Device::Cpu)?,
    ));
    for i in 0..cfg.n_layers {
        let b = format!("blk.{i}");
        let l = format!("model.layers.{i}");
        named.push((
            format!("{l}.input_layernorm.weight"),
            vec1(&format!("{b}.attn_norm.weight"))?,
        ));
        let q = unpermute_rows(
            &get(&format!("{b}.attn_q.weight"), &[nh * hd, d])?,
            nh,
            hd,
            d,
        );
        let k = unpermute_rows(
            &get(&format!("{b}.attn_k.weight"), &[hk * hd, d])?,
            hk,
            hd,
            d,
        );
        let v = get(&format!("{b}.attn_v.weight"), &[hk * hd, d])?;
        named.push((
            format!("{l}.self_attn.qkv_proj.weight"),
            stack_rows(&[q, k, v], d)?,
        ));
        named.push((
            format!("{l}.self_attn.o_proj.weight"),
            Tensor::from_vec(
                get(&format!("{b}.attn_output.weight"), &[d, nh * hd])?,
                &[d, nh * hd],
                Device::Cpu,
            )?,
        ));
        named.push((
            format!("{l}.post_attention_layernorm.weight"),
            vec1(&format!("{b}.ffn_norm.weight"))?,
        ));
        let gate = get(&format!("{b}.ffn_gate.weight"), &[f, d])?;
        let up = get(&format!("{b}.ffn_up.weight"), &[f, d])?;
        named.push((
            format!("{l}.mlp.gate_up_proj.weight"),
            stack_rows(&[gate, up], d)?,
        ));
        named.push((
            format!("{l}.mlp.down_proj.weight"),
            Tensor::from_vec(
                get(&format!("{b}.ffn_down.weight"), &[d, f])?,
                &[d, f],
                Device::Cpu,
            )?,
        ));
    }
    named.push(("model.norm.weight".into(), vec1("output_norm.weight")?));
    if !cfg.tie_embeddings {
        let v = cfg.vocab_size;
        named.push((
            "lm_head.weight".into(),
            Tensor::from_vec(get("output.weight", &[v, d])?, &[v, d], Device::Cpu)?,
        ));
    }
    Ddit::from_params(&cfg, named).with_context(|| format!("{p}: the tensors"))
}

fn hf_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        // several EOS ids: the first
        Some(serde_json::Value::Array(a)) => a
            .first()
            .and_then(|x| x.as_u64())
            .and_then(|x| u32::try_from(x).ok()),
        _ => None,
    }
}

/// The backbone config of a Hugging Face `config.json`.
pub fn config_from_hf(dir: &Path) -> Result<DditConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let hf: HfConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a Llama config", path.display()))?;
    let p = path.display();
    let mt = hf.model_type.as_deref().unwrap_or("?");
    ensure!(
        matches!(mt, "llama" | "mistral"),
        "{p}: model_type \"{mt}\" is not supported (only the Llama family: \"llama\")"
    );
    let rope_scaling = match &hf.rope_scaling {
        Some(v) => hf_rope_scaling(v).with_context(|| format!("{p}"))?,
        None => None,
    };
    ensure!(
        !hf.attention_bias.unwrap_or(false) && !hf.mlp_bias.unwrap_or(false),
        "{p}: attention_bias / mlp_bias are not supported (Llama without biases only)"
    );
    ensure!(hf.num_attention_heads >= 1, "{p}: num_attention_heads is 0");
    if let Some(hd) = hf.head_dim {
        ensure!(
            hd * hf.num_attention_heads == hf.hidden_size,
            "{p}: head_dim {hd} x {} heads differs from hidden_size {} (not supported)",
            hf.num_attention_heads,
            hf.hidden_size
        );
    }
    let cfg = DditConfig {
        n_layers: hf.num_hidden_layers,
        d_model: hf.hidden_size,
        n_heads: hf.num_attention_heads,
        vocab_size: hf.vocab_size,
        max_seq_len: hf.max_position_embeddings.unwrap_or(2048),
        rope_base: hf.rope_theta.unwrap_or(10000.0),
        ln_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        mask_token_id: None,
        eos_token_id: hf_id(&hf.eos_token_id),
        k: None,
        arch: Arch::Llama,
        n_kv_heads: Some(hf.num_key_value_heads.unwrap_or(hf.num_attention_heads)),
        ffn_dim: Some(hf.intermediate_size),
        tie_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        bos_token_id: None,
        rope_scaling,
    };
    cfg.validate().with_context(|| format!("{p}"))?;
    Ok(cfg)
}

/// The safetensors files of a Hugging Face directory: `model.safetensors`, or the shards
/// listed by `model.safetensors.index.json`.
fn hf_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no weight_map object", index.display()))?;
    let mut files: Vec<String> = vec![];
    for (name, f) in map {
        let f = f.as_str().with_context(|| {
            format!("{}: weight_map[{name}] is not a file name", index.display())
        })?;
        ensure!(
            !f.contains('/') && !f.contains('\\') && !f.starts_with('.'),
            "{}: weight_map[{name}] = {f:?} is not a file of this directory",
            index.display()
        );
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Loads a Hugging Face `LlamaForCausalLM` directory as an f32 backbone.
pub fn load_hf(dir: &Path) -> Result<Ddit> {
    let cfg = config_from_hf(dir)?;
    let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
    for f in hf_weight_files(dir)? {
        let loaded = io::load(&f).with_context(|| format!("cannot load {}", f.display()))?;
        for (name, t) in loaded.tensors {
            ensure!(
                t.dtype().is_float(),
                "{}: tensor {name} is {}, expected a float dtype",
                f.display(),
                t.dtype()
            );
            let t = t.to_dtype(DType::F32)?;
            ensure!(
                by_name.insert(name.clone(), t).is_none(),
                "{}: tensor {name} appears in two shards",
                f.display()
            );
        }
    }
    let p = dir.display();
    let mut take = |name: &str| -> Result<Vec<f32>> {
        by_name
            .remove(name)
            .with_context(|| format!("{p}: missing tensor {name}"))?
            .to_vec::<f32>()
    };
    let (d, hd, f) = (cfg.d_model, cfg.head_dim(), cfg.ffn());
    let (nh, hk) = (cfg.n_heads, cfg.kv_heads());
    let mut named: Vec<(String, Tensor)> = vec![];
    let vec1 = |v: Vec<f32>| Tensor::from_vec(v, &[d], Device::Cpu);
    let check = |name: &str, v: &[f32], n: usize| -> Result<()> {
        ensure!(
            v.len() == n,
            "{p}: tensor {name} has {} elements, the config needs {n}",
            v.len()
        );
        Ok(())
    };
    let e = take("model.embed_tokens.weight")?;
    check("model.embed_tokens.weight", &e, cfg.vocab_size * d)?;
    named.push((
        "model.embed_tokens.weight".into(),
        Tensor::from_vec(e, &[cfg.vocab_size, d], Device::Cpu)?,
    ));
    for i in 0..cfg.n_layers {
        let l = format!("model.layers.{i}");
        let mut part = |n: &str, count: usize| -> Result<Vec<f32>> {
            let name = format!("{l}.{n}");
            let v = take(&name)?;
            check(&name, &v, count)?;
            Ok(v)
        };
        let n1 = part("input_layernorm.weight", d)?;
        let q = part("self_attn.q_proj.weight", nh * hd * d)?;
        let k = part("self_attn.k_proj.weight", hk * hd * d)?;
        let v = part("self_attn.v_proj.weight", hk * hd * d)?;
        let o = part("self_attn.o_proj.weight", d * nh * hd)?;
        let n2 = part("post_attention_layernorm.weight", d)?;
        let gate = part("mlp.gate_proj.weight", f * d)?;
        let up = part("mlp.up_proj.weight", f * d)?;
        let down = part("mlp.down_proj.weight", d * f)?;
        named.push((format!("{l}.input_layernorm.weight"), vec1(n1)?));
        named.push((
            format!("{l}.self_attn.qkv_proj.weight"),
            stack_rows(&[q, k, v], d)?,
        ));
        named.push((
            format!("{l}.self_attn.o_proj.weight"),
            Tensor::from_vec(o, &[d, nh * hd], Device::Cpu)?,
        ));
        named.push((format!("{l}.post_attention_layernorm.weight"), vec1(n2)?));
        named.push((
            format!("{l}.mlp.gate_up_proj.weight"),
            stack_rows(&[gate, up], d)?,
        ));
        named.push((
            format!("{l}.mlp.down_proj.weight"),
            Tensor::from_vec(down, &[d, f], Device::Cpu)?,
        ));
    }
    let nf = take("model.norm.weight")?;
    check("model.norm.weight", &nf, d)?;
    named.push(("model.norm.weight".into(), vec1(nf)?));
    if cfg.tie_embeddings {
        // some files carry the tied head anyway
        by_name.remove("lm_head.weight");
    } else {
        let h = take("lm_head.weight")?;
        check("lm_head.weight", &h, cfg.vocab_size * d)?;
        named.push((
            "lm_head.weight".into(),
            Tensor::from_vec(h, &[cfg.vocab_size, d], Device::Cpu)?,
        ));
    }
    // rotary caches some exporters write are not parameters
    by_name.retain(|n, _| !n.ends_with("rotary_emb.inv_freq"));
    if !by_name.is_empty() {
        let extra: Vec<&str> = by_name.keys().map(|s| s.as_str()).take(5).collect();
        bail!(
            "{p}: {} tensor(s) that a LlamaForCausalLM does not have: {}",
            by_name.len(),
            extra.join(", ")
        );
    }
    Ddit::from_params(&cfg, named).with_context(|| format!("{p}: the tensors"))
}

/// Writes a Llama-family backbone as a Hugging Face `LlamaForCausalLM` directory
/// (config.json + model.safetensors in `dtype`, q/k/v and gate/up split again).
pub fn save_hf(model: &Ddit, dir: &Path, dtype: DType) -> Result<()> {
    let cfg = &model.cfg;
    ensure!(
        cfg.arch == Arch::Llama,
        "only a Llama-family model can be written as a Hugging Face LlamaForCausalLM"
    );
    // refused before anything is written
    let rope_scaling = hf_rope_scaling_json(&cfg.rope_scaling)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (d, hd, f) = (cfg.d_model, cfg.head_dim(), cfg.ffn());
    let (nh, hk) = (cfg.n_heads, cfg.kv_heads());
    let mut out: Vec<(String, Tensor)> = vec![];
    for (name, t) in model.params() {
        let t = t.detach();
        if let Some(l) = name.strip_suffix(".self_attn.qkv_proj.weight") {
            out.push((
                format!("{l}.self_attn.q_proj.weight"),
                t.narrow(0, 0, nh * hd)?,
            ));
            out.push((
                format!("{l}.self_attn.k_proj.weight"),
                t.narrow(0, nh * hd, hk * hd)?,
            ));
            out.push((
                format!("{l}.self_attn.v_proj.weight"),
                t.narrow(0, (nh + hk) * hd, hk * hd)?,
            ));
        } else if let Some(l) = name.strip_suffix(".mlp.gate_up_proj.weight") {
            out.push((format!("{l}.mlp.gate_proj.weight"), t.narrow(0, 0, f)?));
            out.push((format!("{l}.mlp.up_proj.weight"), t.narrow(0, f, f)?));
        } else {
            out.push((name.clone(), t));
        }
    }
    let cast: Vec<Tensor> = out
        .iter()
        .map(|(_, t)| t.contiguous()?.to_dtype(dtype))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &Tensor)> = out
        .iter()
        .zip(&cast)
        .map(|((n, _), t)| (n.as_str(), t))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let path = dir.join("model.safetensors");
    io::save(&path, &refs, &meta).with_context(|| format!("cannot write {}", path.display()))?;
    let hf = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": nh,
        "num_key_value_heads": hk,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.ln_eps,
        "rope_theta": cfg.rope_base,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": "silu",
        "torch_dtype": match dtype { DType::F16 => "float16", DType::BF16 => "bfloat16", _ => "float32" },
    });
    let cp = dir.join("config.json");
    kf_engine::fs::write_atomic(&cp, serde_json::to_string_pretty(&hf)?.as_bytes())
        .with_context(|| format!("cannot write {}", cp.display()))
}
