//! The data pipeline: corpus (JSONL documents) -> token shards on disk -> memory-mapped
//! readers -> batches of windows for training and validation.
//!
//! # Corpus
//! `corpus.jsonl`: one JSON object per line, `{"source": .., "id": .., "text": ..}`
//! (`source` and `id` optional). `kfrun data fetch` writes it (tools/data/fetch.py).
//!
//! # Shards (`kfrun data prepare`)
//! Every document is tokenised (in parallel) and followed by the tokenizer's EOS id.
//! Documents go whole to either the training or the validation split: with `n`
//! documents and fraction `f`, the `round(f * n)` documents (at least one when `f > 0`
//! and `n >= 2`, never all) with the smallest `Philox(seed, SPLIT_STREAM).uniform_f64(i)`
//! (`i` = line index of the document, ties by index) are validation. Each split is the
//! concatenation, in corpus order, of its documents' tokens:
//!
//! * `train.bin`, `val.bin`: little-endian `u16` when the vocabulary has at most 65,536
//!   ids (every id fits), else `u32`; no header;
//! * `meta.json`: [`ShardMeta`] (dtype, vocabulary size, EOS id, token and document
//!   counts, SHA-256 of the tokenizer file and of the corpus, seed, validation ids).
//!
//! Every file is written to a temporary name and renamed; `meta.json` last, so a
//! directory with a `meta.json` is complete.
//!
//! # Sampling
//! [`WindowSampler`]: window `b` of step `s` (batch `B`, length `L`) starts at
//! `floor(u * (N - L))` with `u = Philox(seed, WINDOW_STREAM).uniform_f64(s * B + b)`,
//! over a shard of `N` tokens, and holds the `L + 1` tokens from there (inputs are the
//! first `L`, targets the last `L`). Nothing is carried from step to step, so a run
//! resumed at step `s` sees exactly the windows an uninterrupted run would.
//! [`SequentialWindows`]: the validation shard in order, window `w` = tokens
//! `[w L, w L + L + 1)`, for a deterministic validation loss.

use crate::tokenizer::Tokenizer;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::rng::Philox;
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Philox stream of the train/validation split ("SPLI").
pub const SPLIT_STREAM: u64 = 0x5350_4C49;
/// Philox stream of the training windows ("WIND").
pub const WINDOW_STREAM: u64 = 0x5749_4E44;
/// `format` of `meta.json`.
pub const SHARD_FORMAT: &str = "kf-tokens-v1";
/// File names inside a prepared directory.
pub const TRAIN_FILE: &str = "train.bin";
pub const VAL_FILE: &str = "val.bin";
pub const META_FILE: &str = "meta.json";

/// One corpus document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub id: String,
    pub text: String,
}

impl Document {
    /// `source/id`, the name used in `meta.json`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.source, self.id)
    }
}

/// Reads a JSONL corpus; errors name the file (and line).
pub fn read_corpus(path: &Path) -> Result<Vec<Document>> {
    let f = File::open(path).with_context(|| format!("cannot open corpus {}", path.display()))?;
    let mut docs = Vec::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line =
            line.with_context(|| format!("cannot read corpus {} line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut d: Document = serde_json::from_str(&line).with_context(|| {
            format!(
                "corpus {} line {}: not a JSON document with a \"text\" string",
                path.display(),
                n + 1
            )
        })?;
        if d.id.is_empty() {
            d.id = format!("line{}", n + 1);
        }
        docs.push(d);
    }
    ensure!(
        !docs.is_empty(),
        "corpus {} holds no documents",
        path.display()
    );
    Ok(docs)
}

/// Element type of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// `u16` when every id of a `vocab_size` vocabulary fits, else `u32`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::U16 => "u16",
            TokenDtype::U32 => "u32",
        }
    }
}

/// One split in `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    pub file: String,
    pub tokens: u64,
    pub documents: u64,
}

/// `meta.json` of a prepared directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub format: String,
    pub dtype: TokenDtype,
    pub vocab_size: usize,
    pub eos_id: u32,
    /// SHA-256 (hex) of the tokenizer.json bytes the shards were made with.
    pub tokenizer_sha256: String,
    /// SHA-256 (hex) of the corpus file.
    pub corpus_sha256: String,
    pub seed: u64,
    pub val_fraction: f64,
    pub train: SplitMeta,
    pub val: SplitMeta,
    /// `source/id` of every validation document, in corpus order.
    pub val_documents: Vec<String>,
}

/// Options of [`prepare`].
#[derive(Clone, Copy, Debug)]
pub struct PrepareOptions {
    /// Fraction of the documents that go to validation, in [0, 1).
    pub val_fraction: f64,
    pub seed: u64,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            val_fraction: 0.02,
            seed: 0,
        }
    }
}

/// Hex SHA-256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

use kf_engine::fs::{write_atomic, write_atomic_with};

/// Which documents are validation (`true`): see the module docs.
pub fn split_documents(n: usize, val_fraction: f64, seed: u64) -> Result<Vec<bool>> {
    ensure!(
        val_fraction.is_finite() && (0.0..1.0).contains(&val_fraction),
        "validation fraction {val_fraction} is not in [0, 1)"
    );
    let mut is_val = vec![false; n];
    if val_fraction == 0.0 || n < 2 {
        return Ok(is_val);
    }
    let n_val = ((val_fraction * n as f64).round() as usize).clamp(1, n - 1);
    let g = Philox::new(seed, SPLIT_STREAM);
    let mut order: Vec<(f64, usize)> = (0..n).map(|i| (g.uniform_f64(i as u64), i)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for &(_, i) in &order[..n_val] {
        is_val[i] = true;
    }
    Ok(is_val)
}

fn write_tokens(w: &mut impl Write, ids: &[u32], dtype: TokenDtype) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(ids.len() * dtype.size());
    match dtype {
        TokenDtype::U16 => ids
            .iter()
            .for_each(|&i| buf.extend_from_slice(&(i as u16).to_le_bytes())),
        TokenDtype::U32 => ids
            .iter()
            .for_each(|&i| buf.extend_from_slice(&i.to_le_bytes())),
    }
    w.write_all(&buf)
}

/// Tokenises `corpus` with the tokenizer at `tokenizer_path` and writes `train.bin`,
/// `val.bin` and `meta.json` into `out` (created if missing). Returns the metadata.
pub fn prepare(
    corpus: &Path,
    tokenizer_path: &Path,
    out: &Path,
    opts: &PrepareOptions,
) -> Result<ShardMeta> {
    let tok = Tokenizer::from_file(tokenizer_path)?;
    let eos = tok.eos_id().with_context(|| {
        format!(
            "tokenizer {} has no end-of-text token (<|endoftext|>, </s>, <eos>)",
            tokenizer_path.display()
        )
    })?;
    let docs = read_corpus(corpus)?;
    let is_val = split_documents(docs.len(), opts.val_fraction, opts.seed)?;
    let encoded: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|d| {
            tok.encode(&d.text)
                .with_context(|| format!("corpus {}: document {}", corpus.display(), d.key()))
        })
        .collect::<Result<_>>()?;
    let dtype = TokenDtype::for_vocab(tok.vocab_size());
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create directory {}", out.display()))?;

    let mut splits = Vec::new();
    for (want_val, file) in [(false, TRAIN_FILE), (true, VAL_FILE)] {
        let (mut tokens, mut documents) = (0u64, 0u64);
        write_atomic_with(&out.join(file), |w| {
            for (ids, _) in encoded.iter().zip(&is_val).filter(|(_, &v)| v == want_val) {
                write_tokens(w, ids, dtype)?;
                write_tokens(w, &[eos], dtype)?;
                tokens += ids.len() as u64 + 1;
                documents += 1;
            }
            Ok(())
        })?;
        splits.push(SplitMeta {
            file: file.to_string(),
            tokens,
            documents,
        });
    }
    let val = splits.pop().unwrap();
    let train = splits.pop().unwrap();
    let meta = ShardMeta {
        format: SHARD_FORMAT.to_string(),
        dtype,
        vocab_size: tok.vocab_size(),
        eos_id: eos,
        tokenizer_sha256: file_sha256(tokenizer_path)?,
        corpus_sha256: file_sha256(corpus)?,
        seed: opts.seed,
        val_fraction: opts.val_fraction,
        train,
        val,
        val_documents: docs
            .iter()
            .zip(&is_val)
            .filter(|(_, &v)| v)
            .map(|(d, _)| d.key())
            .collect(),
    };
    let json = serde_json::to_string_pretty(&meta)?;
    write_atomic(&out.join(META_FILE), json.as_bytes())?;
    Ok(meta)
}

enum ShardBytes {
    Mapped(Mmap),
    Empty,
}

/// A memory-mapped, validated token shard (`train.bin` / `val.bin`).
pub struct TokenShard {
    path: PathBuf,
    dtype: TokenDtype,
    len: usize,
    bytes: ShardBytes,
}

impl std::fmt::Debug for TokenShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenShard")
            .field("path", &self.path)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .finish()
    }
}

impl TokenShard {
    /// Maps `path` and checks it: size a multiple of the element size, and (in parallel)
    /// every id below `vocab_size`. Errors name the file.
    pub fn open(path: &Path, dtype: TokenDtype, vocab_size: usize) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open token shard {}", path.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("cannot stat token shard {}", path.display()))?
            .len();
        if size % dtype.size() as u64 != 0 {
            bail!(
                "token shard {}: size {size} bytes is not a multiple of {} ({} tokens); the file is truncated or not a shard",
                path.display(),
                dtype.size(),
                dtype.name()
            );
        }
        let bytes = if size == 0 {
            ShardBytes::Empty
        } else {
            // SAFETY: the file is opened read-only; the shards are written once through a
            // temporary file + rename and never modified in place afterwards.
            let m = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map token shard {}", path.display()))?;
            ShardBytes::Mapped(m)
        };
        let shard = Self {
            path: path.to_path_buf(),
            dtype,
            len: (size / dtype.size() as u64) as usize,
            bytes,
        };
        shard.check_ids(vocab_size)?;
        Ok(shard)
    }

    fn raw(&self) -> &[u8] {
        match &self.bytes {
            ShardBytes::Mapped(m) => m,
            ShardBytes::Empty => &[],
        }
    }

    fn check_ids(&self, vocab_size: usize) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let n_chunks = self.len.div_ceil(CHUNK);
        let bad = (0..n_chunks).into_par_iter().find_map_first(|c| {
            let (s, e) = (c * CHUNK, ((c + 1) * CHUNK).min(self.len));
            (s..e).find_map(|i| {
                let t = self.get(i);
                (t as usize >= vocab_size).then_some((i, t))
            })
        });
        if let Some((i, t)) = bad {
            bail!(
                "token shard {}: token {t} at position {i} is not below the vocabulary size {vocab_size}",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Token `i` (panics when `i >= len`).
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let b = self.raw();
        match self.dtype {
            TokenDtype::U16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32,
            TokenDtype::U32 => {
                u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }
        }
    }

    /// Copies tokens `[start, start + out.len())` into `out` (panics when out of range).
    pub fn copy_to(&self, start: usize, out: &mut [u32]) {
        let end = start + out.len();
        assert!(
            end <= self.len,
            "window [{start}, {end}) outside the {} tokens of {}",
            self.len,
            self.path.display()
        );
        let es = self.dtype.size();
        let b = &self.raw()[start * es..end * es];
        match self.dtype {
            TokenDtype::U16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = u16::from_le_bytes([c[0], c[1]]) as u32;
                }
            }
            TokenDtype::U32 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }

    /// All tokens as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = vec![0; self.len];
        self.copy_to(0, &mut v);
        v
    }
}

/// A prepared directory: `meta.json` and both shards, checked against each other.
#[derive(Debug)]
pub struct TokenData {
    pub dir: PathBuf,
    pub meta: ShardMeta,
    pub train: Arc<TokenShard>,
    pub val: Arc<TokenShard>,
}

impl TokenData {
    /// Opens `dir/meta.json`, `dir/train.bin`, `dir/val.bin`; checks the format, the token
    /// counts against the metadata and every id against the vocabulary.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path)
            .with_context(|| format!("cannot read {}", meta_path.display()))?;
        let meta: ShardMeta = serde_json::from_str(&text)
            .with_context(|| format!("invalid shard metadata {}", meta_path.display()))?;
        ensure!(
            meta.format == SHARD_FORMAT,
            "{}: format {:?}, expected {SHARD_FORMAT:?}",
            meta_path.display(),
            meta.format
        );
        ensure!(
            meta.dtype == TokenDtype::for_vocab(meta.vocab_size),
            "{}: dtype {} does not match the vocabulary size {}",
            meta_path.display(),
            meta.dtype.name(),
            meta.vocab_size
        );
        ensure!(
            (meta.eos_id as usize) < meta.vocab_size,
            "{}: eos_id {} is not below the vocabulary size {}",
            meta_path.display(),
            meta.eos_id,
            meta.vocab_size
        );
        let open = |s: &SplitMeta| -> Result<Arc<TokenShard>> {
            ensure!(
                !s.file.contains('/') && !s.file.contains('\\') && !s.file.is_empty(),
                "{}: shard file name {:?} is not a plain file name",
                meta_path.display(),
                s.file
            );
            let sh = TokenShard::open(&dir.join(&s.file), meta.dtype, meta.vocab_size)?;
            ensure!(
                sh.len() as u64 == s.tokens,
                "token shard {} holds {} tokens but {} says {}",
                sh.path().display(),
                sh.len(),
                meta_path.display(),
                s.tokens
            );
            Ok(Arc::new(sh))
        };
        let train = open(&meta.train)?;
        let val = open(&meta.val)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            train,
            val,
        })
    }

    /// Errors unless `tokenizer_path` is byte-identical to the tokenizer the shards were made with.
    pub fn check_tokenizer(&self, tokenizer_path: &Path) -> Result<()> {
        let h = file_sha256(tokenizer_path)?;
        ensure!(
            h == self.meta.tokenizer_sha256,
            "tokenizer {} (sha256 {h}) is not the one the shards in {} were made with (sha256 {})",
            tokenizer_path.display(),
            self.dir.display(),
            self.meta.tokenizer_sha256
        );
        Ok(())
    }
}

/// `rows` windows of `seq_len + 1` tokens, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowBatch {
    pub rows: usize,
    pub seq_len: usize,
    /// `rows * (seq_len + 1)` tokens.
    pub tokens: Vec<u32>,
}

impl WindowBatch {
    /// Window `r` (`seq_len + 1` tokens).
    pub fn row(&self, r: usize) -> &[u32] {
        let w = self.seq_len + 1;
        &self.tokens[r * w..(r + 1) * w]
    }

    /// Inputs: the first `seq_len` tokens of each window (`rows * seq_len`).
    pub fn inputs(&self) -> Vec<u32> {
        (0..self.rows)
            .flat_map(|r| self.row(r)[..self.seq_len].iter().copied())
            .collect()
    }

    /// Targets: the last `seq_len` tokens of each window (`rows * seq_len`).
    pub fn targets(&self) -> Vec<u32> {
        (0..self.rows)
            .flat_map(|r| self.row(r)[1..].iter().copied())
            .collect()
    }
}

/// Random training windows, a pure function of `(seed, step)`: see the module docs.
#[derive(Clone, Debug)]
pub struct WindowSampler {
    shard: Arc<TokenShard>,
    seq_len: usize,
    batch: usize,
    rng: Philox,
    n_starts: u64,
}

impl WindowSampler {
    /// Windows of `seq_len + 1` tokens, `batch` per step. Errors when the shard holds
    /// fewer than `seq_len + 1` tokens.
    pub fn new(shard: Arc<TokenShard>, seq_len: usize, batch: usize, seed: u64) -> Result<Self> {
        ensure!(
            seq_len > 0 && batch > 0,
            "window length and batch must be positive"
        );
        ensure!(
            shard.len() > seq_len,
            "token shard {} holds {} tokens, too few for windows of {} (+1)",
            shard.path().display(),
            shard.len(),
            seq_len
        );
        let n_starts = (shard.len() - seq_len) as u64;
        Ok(Self {
            shard,
            seq_len,
            batch,
            rng: Philox::new(seed, WINDOW_STREAM),
            n_starts,
        })
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// First token of window `b` of step `step`.
    pub fn window_start(&self, step: u64, b: usize) -> usize {
        let index = step
            .checked_mul(self.batch as u64)
            .and_then(|x| x.checked_add(b as u64))
            .expect("step * batch overflows u64");
        let u = self.rng.uniform_f64(index);
        ((u * self.n_starts as f64) as u64).min(self.n_starts - 1) as usize
    }

    /// The windows of `step`.
    pub fn batch(&self, step: u64) -> WindowBatch {
        let w = self.seq_len + 1;
        let mut tokens = vec![0u32; self.batch * w];
        for (b, row) in tokens.chunks_exact_mut(w).enumerate() {
            self.shard.copy_to(self.window_start(step, b), row);
        }
        WindowBatch {
            rows: self.batch,
            seq_len: self.seq_len,
            tokens,
        }
    }
}

/// The shard's non-overlapping windows in order (validation), `batch` per item; the last
/// item may hold fewer rows. Window `w` is tokens `[w L, w L + L + 1)`.
#[derive(Clone, Debug)]
pub struct SequentialWindows {
    shard: Arc<TokenShard>,
    seq_len: usize,
    batch: usize,
    next: usize,
    n_windows: usize,
}

impl SequentialWindows {
    /// All `(N - 1) / L` full windows, or the first `max_windows` of them.
    pub fn new(
        shard: Arc<TokenShard>,
        seq_len: usize,
        batch: usize,
        max_windows: Option<usize>,
    ) -> Result<Self> {
        ensure!(
            seq_len > 0 && batch > 0,
            "window length and batch must be positive"
        );
        let all = shard.len().saturating_sub(1) / seq_len;
        ensure!(
            all > 0,
            "token shard {} holds {} tokens, too few for one window of {} (+1)",
            shard.path().display(),
            shard.len(),
            seq_len
        );
        Ok(Self {
            shard,
            seq_len,
            batch,
            next: 0,
            n_windows: max_windows.map_or(all, |m| m.min(all)),
        })
    }

    /// Number of windows the iterator yields in all.
    pub fn num_windows(&self) -> usize {
        self.n_windows
    }
}

impl Iterator for SequentialWindows {
    type Item = WindowBatch;

    fn next(&mut self) -> Option<WindowBatch> {
        if self.next >= self.n_windows {
            return None;
        }
        let rows = self.batch.min(self.n_windows - self.next);
        let w = self.seq_len + 1;
        let mut tokens = vec![0u32; rows * w];
        for (r, row) in tokens.chunks_exact_mut(w).enumerate() {
            self.shard.copy_to((self.next + r) * self.seq_len, row);
        }
        self.next += rows;
        Some(WindowBatch {
            rows,
            seq_len: self.seq_len,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_counts_and_determinism() {
        let a = split_documents(1000, 0.02, 7).unwrap();
        assert_eq!(a.iter().filter(|&&v| v).count(), 20);
        assert_eq!(a, split_documents(1000, 0.02, 7).unwrap());
        assert_ne!(a, split_documents(1000, 0.02, 8).unwrap());
        // tiny corpora still get one validation document, never all
        assert_eq!(
            split_documents(3, 0.01, 0)
                .unwrap()
                .iter()
                .filter(|&&v| v)
                .count(),
            1
        );
        assert_eq!(
            split_documents(2, 0.9, 0)
                .unwrap()
                .iter()
                .filter(|&&v| v)
                .count(),
            1
        );
        assert!(split_documents(1, 0.5, 0).unwrap().iter().all(|&v| !v));
        assert!(split_documents(10, 0.0, 0).unwrap().iter().all(|&v| !v));
        assert!(split_documents(10, 1.0, 0).is_err());
        assert!(split_documents(10, f64::NAN, 0).is_err());
    }

    #[test]
    fn dtype_choice() {
        assert_eq!(TokenDtype::for_vocab(50257), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::U32);
    }

    #[test]
    fn windows_cover_the_range() {
        let dir = std::env::temp_dir().join(format!("kf-data-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.bin");
        let ids: Vec<u32> = (0..100).collect();
        let mut f = File::create(&p).unwrap();
        write_tokens(&mut f, &ids, TokenDtype::U32).unwrap();
        drop(f);
        let sh = Arc::new(TokenShard::open(&p, TokenDtype::U32, 100).unwrap());
        let s = WindowSampler::new(sh.clone(), 10, 4, 1).unwrap();
        let mut seen_last = false;
        for step in 0..500 {
            let b = s.batch(step);
            for r in 0..4 {
                let row = b.row(r);
                assert_eq!(row.len(), 11);
                // consecutive ids: a contiguous window
                assert!(row.windows(2).all(|w| w[1] == w[0] + 1));
                assert!(row[10] <= 99);
                seen_last |= row[10] == 99;
            }
        }
        assert!(seen_last, "the last window start is reachable");
        let v: Vec<WindowBatch> = SequentialWindows::new(sh, 10, 4, None).unwrap().collect();
        assert_eq!(v.iter().map(|b| b.rows).sum::<usize>(), 9);
        assert_eq!(v[2].rows, 1);
        assert_eq!(v[2].row(0)[0], 80);
        assert_eq!(v[0].inputs().len(), 40);
        assert_eq!(v[0].targets()[0], 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
