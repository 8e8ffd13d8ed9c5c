//! Shared by the model tests: a DDiT with "unit-scale" random weights. The N(0, 0.02)
//! init gives near-uniform attention and logits, which would hide bugs in RoPE, the
//! attention pattern or the head; here activations are O(1) and every part matters.

#![allow(dead_code)]

use kf_engine::{DType, Device, Tensor};
use kf_model::ddit::{param_specs, Init};
use kf_model::pflm::{noise_param_specs, NoiseEncoder, Pflm};
use kf_model::{Ddit, DditConfig};

/// Weights `N(0, 1/fan_in)` (embedding N(0, 1)), LayerNorm weights `1 + N(0, 0.2²)`,
/// biases `N(0, 0.1²)`; parameter `i` from Philox stream `i` of `seed`; f32.
pub fn random_model(cfg: &DditConfig, seed: u64) -> Ddit {
    let named = param_specs(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let n = Tensor::rand_normal(&s.shape, DType::F64, seed, i as u64, Device::Cpu)
                .unwrap()
                .to_vec::<f64>()
                .unwrap();
            let (scale, shift) = match s.init {
                Init::Ones => (0.2, 1.0),
                Init::Zeros => (0.1, 0.0),
                Init::Normal(_) if s.name == "vocab_embed.embedding" => (1.0, 0.0),
                Init::Normal(_) => (1.0 / (s.shape[1] as f64).sqrt(), 0.0),
            };
            let v: Vec<f32> = n.iter().map(|x| (x * scale + shift) as f32).collect();
            (s.name, Tensor::from_vec(v, &s.shape, Device::Cpu).unwrap())
        })
        .collect();
    Ddit::from_params(cfg, named).unwrap()
}

/// A small config: `n_layers` 2, d 32, 4 heads, V 97, mask token 5, seq 64.
pub fn small_cfg() -> DditConfig {
    DditConfig {
        n_layers: 2,
        d_model: 32,
        n_heads: 4,
        vocab_size: 97,
        max_seq_len: 64,
        rope_base: 10000.0,
        ln_eps: 1e-5,
        mask_token_id: Some(5),
        eos_token_id: None,
        ..DditConfig::preset("tiny").unwrap()
    }
}

/// Deterministic pseudo-random ids in `0..v` (an LCG; no dependence on the model's RNG).
pub fn ids(b: usize, t: usize, v: usize, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..b * t)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % v as u64) as u32
        })
        .collect()
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kf-model-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A student with unit-scale random weights everywhere (backbone as `random_model`, the
/// noise encoder likewise), so that the hints matter.
pub fn random_student(k: usize, seed: u64) -> Pflm {
    let cfg = small_cfg();
    let d = cfg.d_model;
    let named = noise_param_specs(d)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let n = Tensor::rand_normal(&s.shape, DType::F64, seed + 1000, i as u64, Device::Cpu)
                .unwrap()
                .to_vec::<f64>()
                .unwrap();
            let (scale, shift) = match s.init {
                Init::Ones => (0.2, 1.0),
                Init::Zeros => (0.1, 0.0),
                Init::Normal(_) => (1.0 / (s.shape[1] as f64).sqrt(), 0.0),
            };
            let v: Vec<f32> = n.iter().map(|x| (x * scale + shift) as f32).collect();
            (s.name, Tensor::from_vec(v, &s.shape, Device::Cpu).unwrap())
        })
        .collect();
    let noise = NoiseEncoder::from_params(d, cfg.ln_eps, named).unwrap();
    Pflm::from_parts(random_model(&cfg, seed), noise, k).unwrap()
}
