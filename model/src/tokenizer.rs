//! The tokenizer: a thin wrapper over the Hugging Face `tokenizers` crate, so any
//! `tokenizer.json` of that format loads (GPT-2's included), plus the byte-level BPE
//! trainer behind `kfrun tokenizer train` and a streaming decoder for generation.
//!
//! Trained tokenizers are GPT-2-shaped: no normaliser, the byte-level pre-tokenizer
//! (GPT-2's split regex, no prefix space), BPE over the 256 byte symbols, the byte-level
//! decoder, and one special token [`EOS_TOKEN`] (id 0) that ends every document in the
//! token shards. Training is deterministic: the BPE trainer breaks count ties by the
//! (deterministic) ids of the pair, so the same corpus and options give the same file.
//!
//! Encoding never adds special tokens (`add_special_tokens = false`): the data pipeline
//! appends EOS itself. Note that a literal `<|endoftext|>` inside a text still encodes as
//! the special token, as in every HF tokenizer that declares it.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerImpl,
};

/// The end-of-text token: document separator in the shards and EOS of generation.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Token strings recognised as end-of-sequence, in order of preference.
const EOS_CANDIDATES: [&str; 4] = [EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>"];

/// Options of [`Tokenizer::train_bpe`].
#[derive(Clone, Debug)]
pub struct BpeTrainOptions {
    /// Vocabulary size including the 256 byte symbols and the special token.
    pub vocab_size: usize,
    /// A pair is merged only if it occurs at least this often.
    pub min_frequency: u64,
}

impl Default for BpeTrainOptions {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            min_frequency: 2,
        }
    }
}

/// A loaded Hugging Face tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it was loaded from (error messages); `None` for an in-memory one.
    source: Option<PathBuf>,
    vocab_size: usize,
    eos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

thread_local! {
    /// Set while [`guarded`] runs: the panic hook stays silent for this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a call into the `tokenizers` crate and turns a panic into an error. Version 0.22
/// panics on some malformed files instead of returning an error (a decoder section that
/// does not deserialize: `expect("Helper")` in decoders/mod.rs; a BPE merge shorter than
/// its `continuing_subword_prefix`: a slice out of bounds in models/bpe/model.rs), found
/// by model/tests/hostile_files.rs. The panic message is kept out of stderr (kfrun prints
/// one line per error); other panics still go to the previous hook.
fn guarded<R>(what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                prev(info)
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            bail!(
                "the tokenizers library failed to {what} (it panicked: {})",
                msg.replace('\n', " ")
            )
        }
    }
}

impl Tokenizer {
    fn wrap(inner: tokenizers::Tokenizer, source: Option<PathBuf>) -> Result<Self> {
        let vocab = inner.get_vocab(true);
        // the number of ids an embedding must cover: one past the largest id
        let vocab_size = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        ensure!(vocab_size > 0, "the tokenizer has an empty vocabulary");
        let eos = EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        Ok(Self {
            inner,
            source,
            vocab_size,
            eos,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. Any failure (missing file, bad JSON, a
    /// model it cannot build) is one error that names the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        Self::from_json(&text)
            .with_context(|| format!("invalid tokenizer file {}", path.display()))
            .map(|mut t| {
                t.source = Some(path.to_path_buf());
                t
            })
    }

    /// Parses the JSON text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        // syntax first: a JSON error is reported as such, not from inside the library
        serde_json::from_str::<serde::de::IgnoredAny>(json).context("not valid JSON")?;
        let inner: tokenizers::Tokenizer =
            guarded("load the file", || json.parse().map_err(tk_err))?;
        guarded("read the vocabulary", || Self::wrap(inner, None))
    }

    /// The JSON of this tokenizer (Hugging Face format, pretty-printed).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tk_err)
    }

    /// Writes `tokenizer.json` atomically (temporary file + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.to_json()?;
        kf_engine::fs::write_atomic(path, json.as_bytes())
            .with_context(|| format!("cannot write tokenizer {}", path.display()))
    }

    /// Trains a byte-level BPE on `texts` (one item per document), with [`EOS_TOKEN`]
    /// as its only special token (id 0). Deterministic for the same texts and options.
    pub fn train_bpe<I, S>(texts: I, opts: &BpeTrainOptions) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        ensure!(
            opts.vocab_size >= 257,
            "vocabulary size {} is too small: a byte-level BPE needs at least 257 (256 bytes + {EOS_TOKEN})",
            opts.vocab_size
        );
        ensure!(
            opts.vocab_size <= u32::MAX as usize,
            "vocabulary size {} does not fit u32 ids",
            opts.vocab_size
        );
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(opts.vocab_size)
            .min_frequency(opts.min_frequency)
            .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let byte_level = ByteLevel::default()
            .add_prefix_space(false)
            .trim_offsets(true)
            .use_regex(true);
        let mut tk: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerImpl::new(BPE::default());
        tk.with_pre_tokenizer(Some(byte_level));
        tk.with_post_processor(Some(byte_level));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        tk.train(&mut trainer, texts).map_err(tk_err)?;
        let t = Self::wrap(tokenizers::Tokenizer::from(tk), None)?;
        ensure!(
            t.eos == Some(0),
            "internal: trained tokenizer has {EOS_TOKEN} at {:?}, expected id 0",
            t.eos
        );
        Ok(t)
    }

    /// Where the tokenizer was loaded from, if from a file.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    fn name(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => "tokenizer".to_string(),
        }
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded("encode", || {
            self.inner.encode_fast(text, false).map_err(tk_err)
        })
        .with_context(|| format!("{}: cannot encode text", self.name()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept). An id outside the vocabulary is an error;
    /// bytes that are not valid UTF-8 (a character cut between tokens) decode as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            bail!(
                "{}: token id {bad} is outside the vocabulary of {}",
                self.name(),
                self.vocab_size
            );
        }
        guarded("decode", || self.inner.decode(ids, false).map_err(tk_err))
            .with_context(|| format!("{}: cannot decode", self.name()))
    }

    /// Number of ids an embedding must cover (one past the largest id, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The end-of-sequence id: `<|endoftext|>`, else `</s>`, `<eos>` or `<|end_of_text|>`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Id of a token string, if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A streaming decoder for one generated sequence.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// Incremental detokenisation for streaming generation: feed the ids one at a time (or
/// a few), get back the text they completed. A byte-level BPE can split one UTF-8
/// character over several tokens, and some decoders treat a token differently at the
/// start of a text, so the decoder keeps a short window: it decodes
/// `ids[prefix..read]` and `ids[prefix..]` and emits the difference once that no longer
/// ends in an incomplete character (U+FFFD). The concatenation of everything
/// [`StreamDecoder::push`] returns, followed by [`StreamDecoder::finish`], equals
/// [`Tokenizer::decode`] of all the ids for byte-level tokenizers.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the context window (already emitted text, decoded again for context).
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder with no tokens yet.
    pub fn new(tok: &'t Tokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one id; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.extend(&[id])
    }

    /// Adds several ids; returns the newly completed text (possibly empty).
    pub fn extend(&mut self, ids: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(ids);
        self.emit(false)
    }

    /// Text still held back (an incomplete character at the end), decoded lossily;
    /// call once when the sequence ends.
    pub fn finish(&mut self) -> Result<String> {
        self.emit(true)
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn emit(&mut self, flush: bool) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        let complete = flush || !now.ends_with('\u{FFFD}');
        if complete && now.len() > before.len() && now.starts_with(&before) {
            let out = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(out)
        } else {
            if flush {
                // nothing printable came of the rest
                self.prefix = self.read;
                self.read = self.ids.len();
            }
            Ok(String::new())
        }
    }
}
