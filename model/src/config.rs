//! The backbone's architecture as a config (what `config.json` of a model directory
//! holds): the DDiT of KFORCING.md section 2 (the default) or the Llama family (a pretrained
//! teacher read from GGUF or Hugging Face files), its size presets and validation.
//! Letters: L layers, d model width, H heads, D = d / H head dim, V vocabulary.

use anyhow::{bail, ensure, Context, Result};
use kf_ops::rope::RopeFreqs;
use serde::{Deserialize, Serialize};
use std::path::Path;

fn default_rope_base() -> f64 {
    10000.0
}

fn default_ln_eps() -> f64 {
    1e-5
}

/// Most layers a config may declare: far above any real model, it bounds the per-layer
/// bookkeeping (parameter lists, caches) that a hostile `config.json` could make us build.
pub const MAX_LAYERS: usize = 1 << 16;

/// Which block the backbone stacks (see `ddit.rs` for both).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// LayerNorm (weight only), fused QKV, GELU MLP with biases, untied head with a bias.
    #[default]
    Ddit,
    /// RMSNorm, grouped-query attention, SwiGLU MLP, no biases, tied or untied head.
    Llama,
}

impl Arch {
    fn is_ddit(&self) -> bool {
        *self == Arch::Ddit
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Architecture of the backbone (teacher and student share it). `config.json` of a model
/// directory is this struct as JSON; unknown keys are an error (a typo must not silently
/// fall back to a default), `rope_base` and `ln_eps` default to 10000 and 1e-5, the
/// optional ids to none.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DditConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub vocab_size: usize,
    /// Longest sequence (positions 0..max_seq_len) the model is trained and run on.
    pub max_seq_len: usize,
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
    #[serde(default = "default_ln_eps")]
    pub ln_eps: f64,
    /// The reserved (mask) token: its logit is forced to -1000, so it is never sampled.
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    /// End of sequence: generation stops a sequence when it samples this id.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Tokens per forward pass of a PFLM student; `None` for the AR teacher.
    #[serde(default)]
    pub k: Option<usize>,
    /// The block (absent = DDiT; the other fields below are the Llama family's).
    #[serde(default, skip_serializing_if = "Arch::is_ddit")]
    pub arch: Arch,
    /// Key/value heads of grouped-query attention (absent = `n_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    /// Width of the MLP's hidden layer (absent = 4 d, the DDiT's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_dim: Option<usize>,
    /// The head reuses the embedding table (Llama family only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub tie_embeddings: bool,
    /// Beginning of sequence: prepended to every prompt when set (Llama family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// RoPE scaling (Llama family; absent = plain RoPE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// How a pretrained model stretches RoPE over a longer context: frequency `j`,
/// `base^(-2j/D)`, is divided by a factor ([`RopeScaling::divisors`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions compressed `factor` times).
    Linear { factor: f64 },
    /// Llama 3.1's: wavelengths longer than `original_max_position_embeddings /
    /// low_freq_factor` divided by `factor`, shorter than `.. / high_freq_factor` kept, a
    /// smooth blend between (Hugging Face's `rope_type: "llama3"`, the divisors llama.cpp's
    /// converter writes as `rope_freqs.weight`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency (a GGUF file's `rope_freqs.weight`).
    Factors { factors: Vec<f64> },
}

impl RopeScaling {
    /// The D/2 divisors of the frequencies of head dim `d` at `base`.
    pub fn divisors(&self, base: f64, d: usize) -> Vec<f64> {
        let half = d / 2;
        match self {
            RopeScaling::Linear { factor } => vec![*factor; half],
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: old,
            } => (0..half)
                .map(|j| {
                    let wavelen = 2.0 * std::f64::consts::PI * base.powf((2 * j) as f64 / d as f64);
                    if wavelen < old / hi {
                        1.0
                    } else if wavelen > old / lo {
                        *factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect(),
            RopeScaling::Factors { factors } => factors.clone(),
        }
    }

    /// Errors name the parameter and the rule it breaks.
    fn validate(&self, d: usize) -> Result<()> {
        let pos = |what: &str, v: f64| {
            ensure!(
                v.is_finite() && v > 0.0,
                "rope_scaling: {what} must be finite and > 0, got {v}"
            );
            Ok(())
        };
        match self {
            RopeScaling::Linear { factor } => pos("factor", *factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                pos("factor", *factor)?;
                pos("low_freq_factor", *low_freq_factor)?;
                pos(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?;
                ensure!(
                    high_freq_factor.is_finite() && high_freq_factor > low_freq_factor,
                    "rope_scaling: high_freq_factor ({high_freq_factor}) must be above low_freq_factor ({low_freq_factor})"
                );
                Ok(())
            }
            RopeScaling::Factors { factors } => {
                ensure!(
                    factors.len() == d / 2,
                    "rope_scaling: {} factors for head dim {d} (one per frequency: {})",
                    factors.len(),
                    d / 2
                );
                for &f in factors {
                    pos("every factor", f)?;
                }
                Ok(())
            }
        }
    }
}

impl DditConfig {
    /// Size presets. `vocab_size` (and the ids) are defaults that a trainer replaces with
    /// its tokenizer's.
    /// - `tiny`: 2 layers, d 64, 4 heads, V 512, seq 128 — tests, seconds;
    /// - `small`: 4 layers, d 256, 4 heads, V 8192, seq 256 — the shipped teacher (about
    ///   7.4 M parameters, 3.2 M of them outside the embedding and head), sized for
    ///   teacher + distillation in a few hours on a 2-core CPU;
    /// - `paper`: 12 layers, d 768, 12 heads, V 30522, seq 1024 — the reference's size
    ///   (LM1B's BERT vocabulary), for benchmarks.
    pub fn preset(name: &str) -> Result<DditConfig> {
        let (n_layers, d_model, n_heads, vocab_size, max_seq_len) = match name {
            "tiny" => (2, 64, 4, 512, 128),
            "small" => (4, 256, 4, 8192, 256),
            "paper" => (12, 768, 12, 30522, 1024),
            other => bail!("unknown model preset \"{other}\" (expected tiny, small or paper)"),
        };
        Ok(DditConfig {
            n_layers,
            d_model,
            n_heads,
            vocab_size,
            max_seq_len,
            rope_base: default_rope_base(),
            ln_eps: default_ln_eps(),
            mask_token_id: None,
            eos_token_id: None,
            k: None,
            arch: Arch::Ddit,
            n_kv_heads: None,
            ffn_dim: None,
            tie_embeddings: false,
            bos_token_id: None,
            rope_scaling: None,
        })
    }

    /// The rotation's frequencies: `rope_base`, divided as `rope_scaling` says.
    pub fn rope(&self) -> RopeFreqs {
        RopeFreqs {
            base: self.rope_base,
            div: self
                .rope_scaling
                .as_ref()
                .map(|s| s.divisors(self.rope_base, self.head_dim()).into()),
        }
    }

    /// Head dimension D = d / H.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Key/value heads (grouped-query attention when below `n_heads`).
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Width of the MLP's hidden layer.
    pub fn ffn(&self) -> usize {
        self.ffn_dim.unwrap_or(4 * self.d_model)
    }

    /// Errors name the field and the rule it breaks.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.n_layers >= 1, "n_layers must be at least 1, got 0");
        ensure!(
            self.n_layers <= MAX_LAYERS,
            "n_layers = {} is more than {MAX_LAYERS}",
            self.n_layers
        );
        ensure!(self.n_heads >= 1, "n_heads must be at least 1, got 0");
        ensure!(
            self.d_model >= 2 && self.d_model.is_multiple_of(self.n_heads),
            "d_model = {} must be a positive multiple of n_heads = {}",
            self.d_model,
            self.n_heads
        );
        ensure!(
            self.head_dim().is_multiple_of(2),
            "the head dim d_model / n_heads = {} must be even (rotate-half RoPE)",
            self.head_dim()
        );
        ensure!(
            self.vocab_size >= 2 && self.vocab_size <= u32::MAX as usize,
            "vocab_size must be in 2..=2^32-1, got {}",
            self.vocab_size
        );
        ensure!(
            self.max_seq_len >= 1 && self.max_seq_len <= u32::MAX as usize,
            "max_seq_len must be in 1..=2^32-1, got {}",
            self.max_seq_len
        );
        ensure!(
            self.rope_base.is_finite() && self.rope_base > 1.0,
            "rope_base must be finite and > 1, got {}",
            self.rope_base
        );
        if let Some(r) = &self.rope_scaling {
            r.validate(self.head_dim())?;
        }
        ensure!(
            self.ln_eps.is_finite() && self.ln_eps >= 0.0,
            "ln_eps must be finite and >= 0, got {}",
            self.ln_eps
        );
        for (what, id) in [
            ("mask_token_id", self.mask_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id {
                ensure!(
                    (id as usize) < self.vocab_size,
                    "{what} = {id} is outside the vocabulary of {}",
                    self.vocab_size
                );
            }
        }
        if let (Some(m), Some(e)) = (self.mask_token_id, self.eos_token_id) {
            ensure!(
                m != e,
                "mask_token_id and eos_token_id are both {m}: the mask token can never be sampled"
            );
        }
        if let Some(k) = self.k {
            ensure!(
                k >= 1,
                "k must be at least 1 for a student (omit it for the AR teacher)"
            );
        }
        if let Some(id) = self.bos_token_id {
            ensure!(
                (id as usize) < self.vocab_size,
                "bos_token_id = {id} is outside the vocabulary of {}",
                self.vocab_size
            );
        }
        let hk = self.kv_heads();
        ensure!(
            hk >= 1 && self.n_heads.is_multiple_of(hk),
            "n_kv_heads = {hk} must divide n_heads = {} (grouped-query attention)",
            self.n_heads
        );
        ensure!(self.ffn() >= 1, "ffn_dim must be at least 1, got 0");
        if self.arch == Arch::Ddit {
            ensure!(
                self.n_kv_heads.is_none_or(|h| h == self.n_heads)
                    && self.ffn_dim.is_none_or(|f| f == 4 * self.d_model)
                    && !self.tie_embeddings,
                "n_kv_heads, ffn_dim and tie_embeddings are Llama-family fields (\"arch\": \"llama\"); a DDiT has n_heads K/V heads, a 4 d MLP and an untied head"
            );
        }
        // f64 weights must be addressable: this bounds every size derived from the config
        ensure!(
            self.checked_n_params()
                .and_then(|n| n.checked_mul(8))
                .is_some_and(|b| usize::try_from(b).is_ok()),
            "the dimensions (n_layers {}, d_model {}, vocab_size {}) give more parameters than this machine can address",
            self.n_layers,
            self.d_model,
            self.vocab_size
        );
        Ok(())
    }

    /// Parameters of the backbone: embedding, blocks, final layer (the student's noise
    /// encoder is not counted here). Saturates at `usize::MAX` for absurd dimensions
    /// (which [`DditConfig::validate`] rejects).
    pub fn n_params(&self) -> usize {
        self.checked_n_params()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(usize::MAX)
    }

    /// [`DditConfig::n_params`] in u64, `None` on overflow.
    pub fn checked_n_params(&self) -> Option<u64> {
        let (d, v, l) = (
            self.d_model as u64,
            self.vocab_size as u64,
            self.n_layers as u64,
        );
        let vd = v.checked_mul(d)?;
        let (block, head) = match self.arch {
            Arch::Ddit => {
                let dd = d.checked_mul(d)?;
                // d + 3d² + d² + d + (4d² + 4d) + (4d² + d) = 12 d² + 7 d
                let block = dd.checked_mul(12)?.checked_add(d.checked_mul(7)?)?;
                (block, vd.checked_add(v)?)
            }
            Arch::Llama => {
                let hd = self.head_dim() as u64;
                let (h, hk, f) = (
                    self.n_heads as u64,
                    self.kv_heads() as u64,
                    self.ffn() as u64,
                );
                // norms 2d, qkv d·(H + 2 Hk)·D, out H·D·d, gate+up 2 f d, down f d
                let qkv = d.checked_mul(h.checked_add(hk.checked_mul(2)?)?.checked_mul(hd)?)?;
                let out = h.checked_mul(hd)?.checked_mul(d)?;
                let mlp = f.checked_mul(d)?.checked_mul(3)?;
                let block = d
                    .checked_mul(2)?
                    .checked_add(qkv)?
                    .checked_add(out)?
                    .checked_add(mlp)?;
                (block, if self.tie_embeddings { 0 } else { vd })
            }
        };
        vd.checked_add(l.checked_mul(block)?)?
            .checked_add(d)?
            .checked_add(head)
    }

    /// Reads and validates `config.json`; every failure names the file.
    pub fn from_file(path: &Path) -> Result<DditConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let cfg: DditConfig = serde_json::from_str(&text)
            .with_context(|| format!("malformed model config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("invalid model config {}", path.display()))?;
        Ok(cfg)
    }

    /// Pretty JSON of this config (what `config.json` holds).
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_count() {
        for name in ["tiny", "small", "paper"] {
            DditConfig::preset(name).unwrap().validate().unwrap();
        }
        let p = DditConfig::preset("paper").unwrap();
        // 12 * 7.08 M in the blocks + 2 * 23.4 M embedding/head + small vectors
        assert_eq!(p.n_params(), 131_912_250);
        assert!(DditConfig::preset("huge").is_err());
    }

    #[test]
    fn json_round_trip_defaults_and_errors() {
        let c = DditConfig::preset("tiny").unwrap();
        let back: DditConfig = serde_json::from_str(&c.to_json().unwrap()).unwrap();
        assert_eq!(back, c);
        let minimal = r#"{"n_layers":1,"d_model":8,"n_heads":2,"vocab_size":10,"max_seq_len":4}"#;
        let m: DditConfig = serde_json::from_str(minimal).unwrap();
        assert_eq!((m.rope_base, m.ln_eps, m.k), (10000.0, 1e-5, None));
        let typo = r#"{"n_layers":1,"d_model":8,"n_heads":2,"vocab_size":10,"max_seq_len":4,"ropebase":3}"#;
        assert!(serde_json::from_str::<DditConfig>(typo).is_err());
        let mut bad = m.clone();
        bad.n_heads = 3;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of n_heads"));
        let mut bad = m.clone();
        bad.d_model = 6; // head dim 3: odd
        assert!(bad.validate().unwrap_err().to_string().contains("even"));
        let mut bad = m.clone();
        bad.mask_token_id = Some(10);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mask_token_id"));
        let mut bad = m;
        bad.mask_token_id = Some(3);
        bad.eos_token_id = Some(3);
        assert!(bad.validate().is_err());
    }

    /// Llama 3's divisors against Hugging Face's form of the rule (smoothed inverse
    /// frequencies, not divisors) at Llama 3.1 8B's settings; the config round-trips
    /// through JSON and bad settings are named.
    #[test]
    fn rope_scaling_divisors_and_json() {
        let (base, d) = (500000.0f64, 128usize);
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let div = s.divisors(base, d);
        for (j, &v) in div.iter().enumerate() {
            let inv = 1.0 / base.powf((2 * j) as f64 / d as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            let scaled = if wavelen < 8192.0 / 4.0 {
                inv
            } else if wavelen > 8192.0 / 1.0 {
                inv / 8.0
            } else {
                let sm = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - sm) * inv / 8.0 + sm * inv
            };
            assert!(
                (v - inv / scaled).abs() < 1e-12 * v,
                "j {j}: {v} vs {}",
                inv / scaled
            );
        }
        // short wavelengths kept (j <= 28), long ones divided by 8 (j >= 35), blended between
        assert!(div[..29].iter().all(|&v| v == 1.0));
        assert!(div[35..].iter().all(|&v| v == 8.0));
        assert!(div[29..35]
            .windows(2)
            .all(|w| 1.0 < w[0] && w[0] < w[1] && w[1] < 8.0));
        let mut c = DditConfig::preset("tiny").unwrap();
        c.rope_scaling = Some(s);
        let back: DditConfig = serde_json::from_str(&c.to_json().unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.rope().div.unwrap().len(), c.head_dim() / 2);
        let j = r#"{"n_layers": 2, "d_model": 64, "n_heads": 4, "vocab_size": 512, "max_seq_len": 128,
            "rope_scaling": {"type": "linear", "factr": 2.0}}"#;
        assert!(serde_json::from_str::<DditConfig>(j).is_err());
        c.rope_scaling = Some(RopeScaling::Linear { factor: 0.0 });
        assert!(c.validate().unwrap_err().to_string().contains("factor"));
        c.rope_scaling = Some(RopeScaling::Factors {
            factors: vec![1.0; 3],
        });
        assert!(c.validate().unwrap_err().to_string().contains("3 factors"));
    }
}
