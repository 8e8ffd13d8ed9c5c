//! The model directory (ARCHITECTURE.md "Formats"): `config.json` (a [`DditConfig`]),
//! `model.safetensors` (tensor names of KFORCING.md section 2) and `tokenizer.json`
//! (Hugging Face format). Each file is written atomically (temporary file + rename); reading
//! checks that the directory and each file exist and says which one is missing or malformed.
//! Training checkpoints (optimizer state, data cursor) live with the trainer.

use crate::config::DditConfig;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::{DType, Tensor};
use std::path::{Path, PathBuf};

/// The architecture file of a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file of a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The tokenizer file of a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// `format` entry of the safetensors metadata we write.
pub const WEIGHTS_FORMAT: &str = "kforcing-ddit";

/// Error unless `dir` is an existing directory.
pub fn check_dir(dir: &Path) -> Result<()> {
    ensure!(
        dir.exists(),
        "model directory {} does not exist",
        dir.display()
    );
    ensure!(
        dir.is_dir(),
        "model directory {} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE} + {TOKENIZER_FILE} inside)",
        dir.display()
    );
    Ok(())
}

/// `dir/name`, with an error naming the directory when the file is missing.
pub fn model_file(dir: &Path, name: &str) -> Result<PathBuf> {
    check_dir(dir)?;
    let p = dir.join(name);
    ensure!(
        p.is_file(),
        "model directory {} has no {name}",
        dir.display()
    );
    Ok(p)
}

/// The validated `config.json` of a model directory; for a pretrained Llama-family model
/// (a GGUF file, or a Hugging Face directory) the config its metadata describes.
pub fn read_config(dir: &Path) -> Result<DditConfig> {
    if crate::llama::is_gguf(dir) {
        return crate::llama::config_from_gguf(&kf_engine::gguf::Gguf::open(dir)?);
    }
    if crate::llama::is_hf_dir(dir) {
        return crate::llama::config_from_hf(dir);
    }
    DditConfig::from_file(&model_file(dir, CONFIG_FILE)?)
}

/// The file that holds a model's weights (for messages): the GGUF file itself, the
/// directory of a Hugging Face model, else `dir/model.safetensors`.
pub fn weights_path(dir: &Path) -> PathBuf {
    if crate::llama::is_gguf(dir) || crate::llama::is_hf_dir(dir) {
        dir.to_path_buf()
    } else {
        dir.join(WEIGHTS_FILE)
    }
}

/// Writes `config.json` atomically.
pub fn write_config(dir: &Path, cfg: &DditConfig) -> Result<()> {
    let p = dir.join(CONFIG_FILE);
    kf_engine::fs::write_atomic(&p, cfg.to_json()?.as_bytes())
        .with_context(|| format!("cannot write model config {}", p.display()))
}

/// The tokenizer of a model directory, checked against the model's vocabulary: every id
/// the tokenizer can produce must have an embedding row.
pub fn read_tokenizer(dir: &Path, cfg: &DditConfig) -> Result<Tokenizer> {
    if crate::llama::is_gguf(dir) {
        // the vocabulary of a GGUF file is its own metadata
        return Tokenizer::from_gguf(&kf_engine::gguf::Gguf::open(dir)?);
    }
    let tok = Tokenizer::from_file(model_file(dir, TOKENIZER_FILE)?)?;
    ensure!(
        tok.vocab_size() <= cfg.vocab_size,
        "{}: the tokenizer has {} ids but the model's vocabulary (config.json vocab_size) is {}",
        dir.join(TOKENIZER_FILE).display(),
        tok.vocab_size(),
        cfg.vocab_size
    );
    Ok(tok)
}

/// Errors unless every weight is finite: a NaN or infinite weight (a corrupted file, or
/// one saved after a diverged update) would only show up later as NaN logits. The error
/// names the file, the tensor and the first bad element. One pass over the weights.
pub fn check_finite(path: &Path, params: &[(String, Tensor)]) -> Result<()> {
    for (name, t) in params {
        let t = t.detach().contiguous()?;
        // no copy for the usual (memory-mapped f32, or 16-bit served) weights
        fn first_bad<T: Copy>(d: &[T], f: impl Fn(T) -> f64) -> Option<(usize, f64)> {
            d.iter()
                .map(|&x| f(x))
                .enumerate()
                .find(|(_, x)| !x.is_finite())
        }
        let bad = if t.dtype() == DType::F32 {
            first_bad(&t.cpu_data::<f32>()?, |x| x as f64)
        } else if t.dtype() == DType::F16 {
            first_bad(&t.cpu_data::<half::f16>()?, |x| x.to_f64())
        } else if t.dtype() == DType::BF16 {
            first_bad(&t.cpu_data::<half::bf16>()?, |x| x.to_f64())
        } else {
            let v = t.to_vec_f64()?;
            v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))
        };
        if let Some((i, x)) = bad {
            bail!(
                "{}: tensor \"{name}\" holds {x} at element {i}: the weights must be finite",
                path.display()
            );
        }
    }
    Ok(())
}

/// Writes `tokenizer.json` into a model directory (atomically).
pub fn write_tokenizer(dir: &Path, tok: &Tokenizer) -> Result<()> {
    tok.save(dir.join(TOKENIZER_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pieces_are_named() {
        let base = std::env::temp_dir().join(format!("kf-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let e = read_config(&base).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::create_dir_all(&base).unwrap();
        let e = read_config(&base).unwrap_err().to_string();
        assert!(e.contains("has no config.json"), "{e}");
        std::fs::write(base.join(CONFIG_FILE), "{\"n_layers\": 2,").unwrap();
        let e = format!("{:#}", read_config(&base).unwrap_err());
        assert!(e.contains("malformed model config"), "{e}");
        std::fs::write(
            base.join(CONFIG_FILE),
            r#"{"n_layers":1,"d_model":8,"n_heads":3,"vocab_size":10,"max_seq_len":4}"#,
        )
        .unwrap();
        let e = format!("{:#}", read_config(&base).unwrap_err());
        assert!(
            e.contains("invalid model config") && e.contains("n_heads"),
            "{e}"
        );
        let cfg = DditConfig::preset("tiny").unwrap();
        write_config(&base, &cfg).unwrap();
        assert_eq!(read_config(&base).unwrap(), cfg);
        let e = read_tokenizer(&base, &cfg).unwrap_err().to_string();
        assert!(e.contains("has no tokenizer.json"), "{e}");
        std::fs::write(base.join(TOKENIZER_FILE), "not json").unwrap();
        let e = format!("{:#}", read_tokenizer(&base, &cfg).unwrap_err());
        assert!(e.contains("invalid tokenizer file"), "{e}");
        let f = base.join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(read_config(&f)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
