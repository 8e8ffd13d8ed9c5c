//! `kfrun init-weights`: random weights with the DDiT checkpoint names and
//! shapes of KFORCING.md section 2 (optionally with the student's noise
//! encoder), drawn from Philox so the same seed gives the same file. Used for
//! benchmarks (`--preset paper`) and as the demo file of the README.

use anyhow::{ensure, Result};
use kf_engine::{io, DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Size preset: tiny (2 layers, d=64), paper (12 layers, d=768, 12 heads, V=30522).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Override the model width d.
    #[arg(long)]
    dim: Option<usize>,
    /// Override the vocabulary size.
    #[arg(long)]
    vocab: Option<usize>,
    /// Include the PFLM noise encoder tensors.
    #[arg(long)]
    student: bool,
    /// Storage dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Philox seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: &Args) -> Result<()> {
    let (mut layers, mut d, mut vocab) = match a.preset.as_str() {
        "tiny" => (2usize, 64usize, 512usize),
        "paper" => (12, 768, 30522),
        other => anyhow::bail!("unknown --preset \"{other}\" (expected tiny or paper)"),
    };
    layers = a.layers.unwrap_or(layers);
    d = a.dim.unwrap_or(d);
    vocab = a.vocab.unwrap_or(vocab);
    ensure!(
        layers >= 1 && d >= 2 && d % 2 == 0 && vocab >= 2,
        "need layers >= 1, an even dim >= 2 and vocab >= 2"
    );
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("unsupported --dtype \"{other}\" (expected f32, f16 or bf16)"),
    };
    let mut specs: Vec<(String, Vec<usize>, f64)> =
        vec![("vocab_embed.embedding".into(), vec![vocab, d], 0.02)];
    for i in 0..layers {
        let p = format!("blocks.{i}");
        specs.push((format!("{p}.norm1.weight"), vec![d], -1.0));
        specs.push((format!("{p}.attn_qkv.weight"), vec![3 * d, d], 0.02));
        specs.push((format!("{p}.attn_out.weight"), vec![d, d], 0.02));
        specs.push((format!("{p}.norm2.weight"), vec![d], -1.0));
        specs.push((format!("{p}.mlp.0.weight"), vec![4 * d, d], 0.02));
        specs.push((format!("{p}.mlp.0.bias"), vec![4 * d], 0.0));
        specs.push((format!("{p}.mlp.2.weight"), vec![d, 4 * d], 0.02));
        specs.push((format!("{p}.mlp.2.bias"), vec![d], 0.0));
    }
    specs.push(("output_layer.norm_final.weight".into(), vec![d], -1.0));
    specs.push(("output_layer.linear.weight".into(), vec![vocab, d], 0.02));
    specs.push(("output_layer.linear.bias".into(), vec![vocab], 0.0));
    if a.student {
        specs.push((
            "noise_encoder.combined_proj.weight".into(),
            vec![d, 2 * d],
            0.02,
        ));
        specs.push(("noise_encoder.combined_proj.bias".into(), vec![d], 0.0));
        specs.push(("noise_encoder.norm.weight".into(), vec![d], -1.0));
        specs.push(("noise_encoder.norm.bias".into(), vec![d], 0.0));
        specs.push(("noise_encoder.mlp.0.weight".into(), vec![4 * d, d], 0.02));
        specs.push(("noise_encoder.mlp.0.bias".into(), vec![4 * d], 0.0));
        specs.push(("noise_encoder.mlp.2.weight".into(), vec![d, 4 * d], 0.02));
        specs.push(("noise_encoder.mlp.2.bias".into(), vec![d], 0.0));
    }
    let mut tensors = Vec::with_capacity(specs.len());
    for (stream, (name, shape, std)) in specs.iter().enumerate() {
        // std < 0 marks a LayerNorm weight (ones); 0 a bias (zeros)
        let t = if *std < 0.0 {
            Tensor::ones(shape, dtype, Device::Cpu)?
        } else if *std == 0.0 {
            Tensor::zeros(shape, dtype, Device::Cpu)?
        } else {
            let n = Tensor::rand_normal(shape, DType::F64, a.seed, stream as u64, Device::Cpu)?;
            let v: Vec<f64> = n.to_vec::<f64>()?.iter().map(|x| x * std).collect();
            Tensor::from_vec(v, shape, Device::Cpu)?.to_dtype(dtype)?
        };
        tensors.push((name.as_str(), t));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "kforcing-ddit".to_string());
    meta.insert(
        "note".to_string(),
        "random weights from kfrun init-weights".to_string(),
    );
    meta.insert("n_layers".to_string(), layers.to_string());
    meta.insert("d_model".to_string(), d.to_string());
    meta.insert("vocab_size".to_string(), vocab.to_string());
    meta.insert("seed".to_string(), a.seed.to_string());
    io::save(&a.out, &refs, &meta)?;
    let params: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
    eprintln!(
        "wrote {} ({} tensors, {} parameters, {})",
        a.out.display(),
        tensors.len(),
        params,
        dtype
    );
    Ok(())
}
