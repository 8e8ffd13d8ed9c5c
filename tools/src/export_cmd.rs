//! `kfrun export`: rewrites a model directory (AR teacher or PFLM student) with its weights
//! in another dtype (f16 for shipping), config.json and tokenizer.json alongside. The
//! output directory appears complete or not at all (temporary directory + rename).

use anyhow::{bail, ensure, Context, Result};
use kf_engine::DType;
use kf_model::checkpoint;
use kf_model::pflm::Pflm;
use kf_model::train::checkpoint::write_dir_atomic;
use kf_model::Ddit;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Source model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Destination model directory (replaced if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
}

pub fn run(a: &Args) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => bail!("--dtype {other}: expected f16, bf16 or f32"),
    };
    let cfg = checkpoint::read_config(&a.model)?;
    let tok = checkpoint::read_tokenizer(&a.model, &cfg)?;
    let name = a
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("--out {}: needs a directory name", a.out.display()))?
        .to_string();
    let parent = match a.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ensure!(
        parent.is_dir(),
        "--out {}: the parent directory {} does not exist",
        a.out.display(),
        parent.display()
    );
    let what = match cfg.k {
        None => {
            let m = Ddit::load(&a.model)?;
            write_dir_atomic(&parent, &name, |d| {
                m.save(d, dtype)?;
                tok.save(d.join(checkpoint::TOKENIZER_FILE))
            })?;
            "AR model".to_string()
        }
        Some(k) => {
            let m = Pflm::load(&a.model)?;
            write_dir_atomic(&parent, &name, |d| {
                m.save(d, dtype)?;
                tok.save(d.join(checkpoint::TOKENIZER_FILE))
            })?;
            format!("PFLM student (k = {k})")
        }
    };
    let bytes = std::fs::metadata(a.out.join("model.safetensors"))?.len();
    println!(
        "{}: {what}, {} weights, {:.1} MB",
        a.out.display(),
        a.dtype,
        bytes as f64 / 1e6
    );
    Ok(())
}
