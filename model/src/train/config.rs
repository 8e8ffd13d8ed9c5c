//! The training config of `kfrun train` (model preset and dimensions, batch, lengths,
//! optimiser, schedule; strict JSON with errors naming the key), the memory estimates the
//! runs check before they start, and the JSON diff the resume checks report.

use super::OptimConfig;
use crate::config::DditConfig;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The model part of a training config: a preset and/or explicit dimensions (explicit
/// ones override the preset's). The vocabulary size and EOS id come from the data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_model: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_base: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ln_eps: Option<f64>,
}

/// A training config file (`configs/*.json`). Every field is required except inside
/// `model`; unknown fields are errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSpec,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (training and validation windows).
    pub seq_len: usize,
    /// Micro-batches per update (effective batch = batch_size * grad_accum sequences).
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// AdamW decoupled weight decay on matrices and embeddings (not LN weights, biases).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global grad-norm clip; 0 = off.
    pub grad_clip: f64,
    /// Validation every N steps (and at the end); 0 = only at the end.
    pub eval_every: u64,
    /// Validation windows (the first ones of the validation shard, in order).
    pub eval_windows: usize,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    pub checkpoint_every: u64,
    /// Seeds the initialisation and the training windows.
    pub seed: u64,
}

impl TrainConfig {
    /// Parses a config; errors name `label` (the file) and the offending key.
    pub fn from_json(text: &str, label: &str) -> Result<TrainConfig> {
        let c: TrainConfig =
            from_json_named(text).with_context(|| format!("training config {label}"))?;
        c.validate()
            .with_context(|| format!("training config {label}"))?;
        Ok(c)
    }

    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read training config {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    pub fn optim(&self) -> OptimConfig {
        OptimConfig {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            grad_accum: self.grad_accum,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch_size > 0, "batch_size must be at least 1");
        ensure!(self.seq_len > 0, "seq_len must be at least 1");
        ensure!(self.eval_windows > 0, "eval_windows must be at least 1");
        self.optim().validate()?;
        let m = &self.model;
        ensure!(
            m.preset.is_some()
                || (m.n_layers.is_some() && m.d_model.is_some() && m.n_heads.is_some()),
            "model: give a \"preset\" (tiny, small, paper) or all of n_layers, d_model, n_heads"
        );
        Ok(())
    }

    /// The model's architecture for a vocabulary of `vocab_size` ids with EOS `eos`.
    pub fn model_config(&self, vocab_size: usize, eos: u32) -> Result<DditConfig> {
        let m = &self.model;
        // without a preset, the explicit dimensions replace tiny's (rope_base and ln_eps
        // keep the preset's defaults unless given; max_seq_len defaults to seq_len)
        let mut c =
            DditConfig::preset(m.preset.as_deref().unwrap_or("tiny")).context("model.preset")?;
        if m.preset.is_none() {
            c.max_seq_len = self.seq_len;
        }
        if let Some(v) = m.n_layers {
            c.n_layers = v;
        }
        if let Some(v) = m.d_model {
            c.d_model = v;
        }
        if let Some(v) = m.n_heads {
            c.n_heads = v;
        }
        if let Some(v) = m.max_seq_len {
            c.max_seq_len = v;
        }
        if let Some(v) = m.rope_base {
            c.rope_base = v;
        }
        if let Some(v) = m.ln_eps {
            c.ln_eps = v;
        }
        c.vocab_size = vocab_size;
        c.eos_token_id = Some(eos);
        c.mask_token_id = None;
        c.k = None;
        ensure!(c.n_layers > 0, "model: n_layers must be at least 1");
        ensure!(
            c.n_heads > 0 && c.d_model % c.n_heads == 0 && (c.d_model / c.n_heads) % 2 == 0,
            "model: d_model {} must split into n_heads {} heads of even size (RoPE)",
            c.d_model,
            c.n_heads
        );
        ensure!(
            self.seq_len <= c.max_seq_len,
            "seq_len {} exceeds the model's max_seq_len {} (set model.max_seq_len)",
            self.seq_len,
            c.max_seq_len
        );
        ensure!(
            c.rope_base.is_finite() && c.rope_base > 0.0 && c.ln_eps.is_finite() && c.ln_eps > 0.0,
            "model: rope_base and ln_eps must be finite and > 0"
        );
        c.validate().context("model")?;
        Ok(c)
    }
}

/// Deserialises JSON; a type error names the key path (`model.d_model: invalid type ..`).
pub fn from_json_named<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                Err(inner.into())
            } else {
                Err(anyhow::anyhow!("{path}: {inner}"))
            }
        }
    }
}

/// A rough upper estimate of the memory one training step needs: parameters, gradients,
/// their accumulation buffer and two moments (f32), plus the activations the tape keeps
/// for one micro-batch and the logits with their gradient and softmax.
/// Saturates at `u64::MAX` (absurd configurations must fail the memory check, not wrap).
pub fn estimate_train_bytes(c: &DditConfig, batch: usize, seq_len: usize) -> u64 {
    let p = c.n_params() as u64;
    let n = (batch as u64).saturating_mul(seq_len as u64);
    let (d, v, l) = (c.d_model as u64, c.vocab_size as u64, c.n_layers as u64);
    let act = l.saturating_mul(n).saturating_mul(d).saturating_mul(40);
    let logits = n.saturating_mul(v).saturating_mul(4);
    p.saturating_mul(5)
        .saturating_add(act)
        .saturating_add(logits)
        .saturating_mul(4)
}

/// Bytes of the token windows one update draws: `rows` windows of `seq_len + 1` u32.
pub fn window_bytes(rows_per_micro: usize, grad_accum: usize, seq_len: usize) -> u64 {
    (rows_per_micro as u64)
        .saturating_mul(grad_accum as u64)
        .saturating_mul((seq_len as u64).saturating_add(1))
        .saturating_mul(4)
}

/// On the CPU, an error when a run needs more host memory than is available: "`subject` needs
/// about X GiB `detail` but Y GiB are available: `hint`". Kernel devices manage their own.
pub fn check_host_memory(
    device: kf_engine::Device,
    need: u64,
    subject: &str,
    detail: &str,
    hint: &str,
) -> Result<()> {
    if let (true, Some(avail)) = (device.is_cpu(), available_memory()) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        ensure!(
            need <= avail,
            "{subject} needs about {:.1} GiB {detail} but {:.1} GiB are available: {hint}",
            gib(need),
            gib(avail)
        );
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is no such file).
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The keys whose values differ between two JSON objects (dotted paths).
pub(crate) fn json_diff(
    a: &serde_json::Value,
    b: &serde_json::Value,
    prefix: &str,
    out: &mut Vec<String>,
) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => json_diff(u, v, &p, out),
                    _ => out.push(p),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(model: &str) -> TrainConfig {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.json"),
        )
        .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["model"] = serde_json::from_str(model).unwrap();
        TrainConfig::from_json(&v.to_string(), "test").unwrap()
    }

    #[test]
    fn model_from_preset_or_explicit_dimensions() {
        let c = cfg(r#"{"preset": "small"}"#).model_config(1000, 7).unwrap();
        let small = DditConfig::preset("small").unwrap();
        assert_eq!(
            (c.n_layers, c.d_model, c.n_heads),
            (small.n_layers, small.d_model, small.n_heads)
        );
        assert_eq!((c.vocab_size, c.eos_token_id, c.k), (1000, Some(7), None));
        let c = cfg(r#"{"n_layers": 3, "d_model": 32, "n_heads": 2}"#)
            .model_config(100, 0)
            .unwrap();
        assert_eq!(
            (c.n_layers, c.d_model, c.n_heads, c.max_seq_len),
            (3, 32, 2, 64)
        );
        let c = cfg(r#"{"preset": "tiny", "d_model": 96, "n_heads": 3}"#)
            .model_config(100, 0)
            .unwrap();
        assert_eq!((c.n_layers, c.d_model, c.n_heads), (2, 96, 3));
        let e = TrainConfig::from_json(r#"{"model": {"d_model": 32}}"#, "x.json").unwrap_err();
        assert!(format!("{e:#}").contains("x.json"), "{e:#}");
        let e = cfg(r#"{"n_layers": 2, "d_model": 30, "n_heads": 4}"#)
            .model_config(100, 0)
            .unwrap_err();
        assert!(format!("{e:#}").contains("d_model"), "{e:#}");
        assert!(estimate_train_bytes(&DditConfig::preset("paper").unwrap(), 8, 128) > 1 << 30);
    }
}
