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
//! [`Tokenizer::from_gguf`] builds the same kind of tokenizer from a GGUF file's
//! `tokenizer.ggml.*` metadata (llama.cpp's "gpt2" byte-level BPE), and
//! [`apply_chat_template`] renders the file's ChatML chat template for one user turn.
//!
//! Encoding never adds special tokens (`add_special_tokens = false`): the data pipeline
//! appends EOS itself. Note that a literal `<|endoftext|>` inside a text still encodes as
//! the special token, as in every HF tokenizer that declares it.

use anyhow::{anyhow, bail, ensure, Context, Result};
use kf_engine::gguf::{Gguf, GgufValue};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerImpl,
};

/// The end-of-text token: document separator in the shards and EOS of generation.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// llama.cpp's split regex of the "llama-bpe" pre-tokenizer (Llama 3).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's split regex of the "qwen2" pre-tokenizer: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's space ("▁", U+2581).
const SPM_SPACE: &str = "\u{2581}";

/// The tokenizer under construction (our normaliser / pre-tokenizer / decoder wrappers).
type Tk = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

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

    /// Builds the tokenizer of a GGUF file from its `tokenizer.ggml.*` metadata:
    /// `tokenizer.ggml.model` must be "gpt2" (byte-level BPE: `tokens`, `merges` as "a b"
    /// strings, optional `token_type`), with `tokenizer.ggml.pre` "gpt-2" (GPT-2's split
    /// regex), "smollm" (each digit split off first, then GPT-2's regex), "llama-bpe" (Llama
    /// 3's regex: numbers in runs of up to 3 digits, case-insensitive contractions) or
    /// "qwen2" (the same with single digits), as llama.cpp does. Control tokens (type 3) become special added tokens and user-defined ones
    /// (type 4) plain added tokens, so their text in the input maps to their id. EOS is
    /// `tokenizer.ggml.eos_token_id`. Other models and pre-tokenizers are clear errors.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let mut t = guarded("build the tokenizer", || Self::build_from_gguf(g))
            .with_context(|| format!("{}: tokenizer", g.path().display()))?;
        t.source = Some(g.path().to_path_buf());
        Ok(t)
    }

    fn build_from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model = meta_str(g, "tokenizer.ggml.model")?;
        ensure!(
            matches!(model, "gpt2" | "llama"),
            "tokenizer.ggml.model {model:?} is not supported (\"gpt2\", byte-level BPE, and \"llama\", SentencePiece BPE, are)"
        );
        let tokens = meta_array(g, "tokenizer.ggml.tokens")?;
        ensure!(!tokens.is_empty(), "tokenizer.ggml.tokens is empty");
        ensure!(
            tokens.len() <= u32::MAX as usize,
            "tokenizer.ggml.tokens has {} entries, more than u32 ids",
            tokens.len()
        );
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => {
                let a = v
                    .as_array()
                    .ok_or_else(|| anyhow!("tokenizer.ggml.token_type is not an array"))?;
                ensure!(
                    a.len() == tokens.len(),
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    a.len(),
                    tokens.len()
                );
                a.iter()
                    .enumerate()
                    .map(|(i, x)| match x.as_f64() {
                        Some(f) if f.fract() == 0.0 => Ok(f as i64),
                        _ => Err(anyhow!("tokenizer.ggml.token_type[{i}] is not an integer")),
                    })
                    .collect::<Result<_>>()?
            }
        };
        let mut vocab = Vocab::default();
        let mut added = Vec::new();
        // the first unknown-type token: SentencePiece's unk
        let mut unk = None;
        for (id, tok) in tokens.iter().enumerate() {
            let s = tok
                .as_str()
                .ok_or_else(|| anyhow!("tokenizer.ggml.tokens[{id}] is not a string"))?;
            if let Some(prev) = vocab.insert(s.to_string(), id as u32) {
                bail!("tokenizer.ggml.tokens: {s:?} appears twice (ids {prev} and {id})");
            }
            match types[id] {
                TOKEN_TYPE_CONTROL => added.push(AddedToken::from(s.to_string(), true)),
                TOKEN_TYPE_USER_DEFINED => added.push(AddedToken::from(s.to_string(), false)),
                TOKEN_TYPE_UNKNOWN if unk.is_none() => unk = Some(s.to_string()),
                _ => {}
            }
        }
        let mut tk = if model == "gpt2" {
            Self::gpt2_from_gguf(g, vocab)?
        } else {
            Self::spm_from_gguf(g, vocab, &types, unk)?
        };
        let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
        tk.add_special_tokens(&special);
        tk.add_tokens(&plain);
        let mut t = Self::wrap(tokenizers::Tokenizer::from(tk), None)?;
        ensure!(
            t.vocab_size == tokens.len(),
            "the tokenizer has {} ids for {} tokens",
            t.vocab_size,
            tokens.len()
        );
        t.eos = match g.get("tokenizer.ggml.eos_token_id") {
            None => t.eos,
            Some(v) => {
                let id = v
                    .as_u64()
                    .filter(|&i| i < tokens.len() as u64)
                    .ok_or_else(|| {
                        anyhow!(
                            "tokenizer.ggml.eos_token_id = {} is not a token id below {}",
                            v.summary(),
                            tokens.len()
                        )
                    })?;
                Some(id as u32)
            }
        };
        Ok(t)
    }

    /// The byte-level BPE of a "gpt2" GGUF vocabulary: its merges, the pre-tokenizer
    /// `tokenizer.ggml.pre` names, the byte-level decoder.
    fn gpt2_from_gguf(g: &Gguf, vocab: Vocab) -> Result<Tk> {
        let pre = match g.get("tokenizer.ggml.pre") {
            None => "gpt-2",
            Some(v) => v
                .as_str()
                .ok_or_else(|| anyhow!("tokenizer.ggml.pre is not a string"))?,
        };
        // (split digits first, a split regex in front of the byte-level step)
        let (split_digits, regex) = match pre {
            "gpt-2" => (false, None),
            "smollm" => (true, None),
            "llama-bpe" | "llama3" => (false, Some(LLAMA3_SPLIT)),
            "qwen2" => (false, Some(QWEN2_SPLIT)),
            p => bail!(
                "pre-tokenizer tokenizer.ggml.pre = {p:?} is not supported yet (gpt-2, smollm, llama-bpe and qwen2 are)"
            ),
        };
        let merges = meta_array(g, "tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let s = m
                    .as_str()
                    .ok_or_else(|| anyhow!("tokenizer.ggml.merges[{i}] is not a string"))?;
                // like llama.cpp: the separator is the first space after the first character
                let first = s.chars().next().map_or(0, char::len_utf8);
                let sp = s[first..]
                    .find(' ')
                    .map(|p| p + first)
                    .ok_or_else(|| anyhow!("tokenizer.ggml.merges[{i}] = {s:?} has no space"))?;
                Ok((s[..sp].to_string(), s[sp + 1..].to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
        let byte_level = ByteLevel::default()
            .add_prefix_space(false)
            .trim_offsets(true)
            // GPT-2's regex unless another one splits first
            .use_regex(regex.is_none());
        let mut tk = Tk::new(bpe);
        if let Some(re) = regex {
            let split = Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("cannot build the {pre} split regex: {e}"))?;
            tk.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
        } else if split_digits {
            tk.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        } else {
            tk.with_pre_tokenizer(Some(byte_level));
        }
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(tk)
    }

    /// The SentencePiece BPE of a "llama" GGUF vocabulary, as llama.cpp tokenizes it: the
    /// text with a space in front (`tokenizer.ggml.add_space_prefix`, default on) and every
    /// space as "▁" is one word; adjacent pieces merge while their concatenation is a
    /// token, the highest `tokenizer.ggml.scores` first (ties: leftmost), and what no token
    /// covers falls back to its bytes (<0xXX> tokens). As `tokenizers` BPE: every split of a
    /// token into two tokens is a merge, ranked by the merged token's score.
    fn spm_from_gguf(g: &Gguf, vocab: Vocab, types: &[i64], unk: Option<String>) -> Result<Tk> {
        let scores = meta_array(g, "tokenizer.ggml.scores")?;
        ensure!(
            scores.len() == types.len(),
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            types.len()
        );
        let scores: Vec<f64> = scores
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| anyhow!("tokenizer.ggml.scores[{i}] is not a finite number"))
            })
            .collect::<Result<_>>()?;
        let add_prefix = g
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        // pieces that merge: normal, user-defined and unused tokens (not control, unknown
        // or byte tokens)
        let mergeable = |id: u32| matches!(types[id as usize], 1 | 4 | 5);
        let mut ranked: Vec<(f64, u32, String, String)> = vec![];
        for (tok, &id) in &vocab {
            if !mergeable(id) {
                continue;
            }
            for (at, _) in tok.char_indices().skip(1) {
                let (l, r) = tok.split_at(at);
                if vocab.get(l).is_some_and(|&i| mergeable(i))
                    && vocab.get(r).is_some_and(|&i| mergeable(i))
                {
                    ranked.push((scores[id as usize], id, l.to_string(), r.to_string()));
                }
            }
        }
        // best score first; one token's splits together, left split first
        ranked.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.len().cmp(&b.2.len()))
        });
        let merges = ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect();
        let mut b = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(u) = unk {
            b = b.unk_token(u);
        }
        let bpe = b
            .build()
            .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
        let mut tk = Tk::new(bpe);
        let space = Replace::new(" ", SPM_SPACE).map_err(tk_err)?;
        let mut norm: Vec<NormalizerWrapper> = vec![];
        if add_prefix {
            norm.push(Prepend::new(SPM_SPACE.into()).into());
        }
        norm.push(space.into());
        tk.with_normalizer(Some(NormalizerSequence::new(norm)));
        let mut dec: Vec<DecoderWrapper> = vec![
            Replace::new(SPM_SPACE, " ").map_err(tk_err)?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_prefix {
            dec.push(Strip::new(' ', 1, 0).into());
        }
        tk.with_decoder(Some(DecoderSequence::new(dec)));
        Ok(tk)
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

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

fn meta_str<'a>(g: &'a Gguf, key: &str) -> Result<&'a str> {
    g.get(key)
        .ok_or_else(|| anyhow!("metadata {key} is missing"))?
        .as_str()
        .ok_or_else(|| anyhow!("metadata {key} is not a string"))
}

fn meta_array<'a>(g: &'a Gguf, key: &str) -> Result<&'a [GgufValue]> {
    g.get(key)
        .ok_or_else(|| anyhow!("metadata {key} is missing"))?
        .as_array()
        .ok_or_else(|| anyhow!("metadata {key} is not an array"))
}

/// The ChatML chat loop (Hugging Face's default ChatML template without a system prompt).
const CHATML_LOOP: &str = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const CHATML_FOR: &str = "{% for message in messages %}";
/// The optional default system prompt before the loop body (SmolLM2's): the string
/// literal between these two is printed when the first message is not a system message.
const DEFAULT_SYSTEM_OPEN: &str = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '";
const DEFAULT_SYSTEM_CLOSE: &str = "' }}{% endif %}";

/// Renders the GGUF file's chat template (`tokenizer.chat_template`) for one user message
/// followed by the start of the assistant's turn (`add_generation_prompt`), exactly as
/// the Jinja template would. Supported: the ChatML template, with or without a default
/// system prompt printed when the conversation has none (SmolLM2's template); any other
/// template is an error naming what was found.
pub fn apply_chat_template(g: &Gguf, user: &str) -> Result<String> {
    let file = g.path().display();
    let tpl = meta_str(g, "tokenizer.chat_template")
        .with_context(|| format!("{file}: no chat template"))?;
    ensure!(
        tpl.contains("<|im_start|>"),
        "{file}: the chat template is not ChatML (no <|im_start|>); only ChatML templates are supported"
    );
    // Jinja string literals may spell a newline as \n or hold it verbatim; Jinja drops
    // one trailing newline of the template
    let norm = tpl.replace("\\n", "\n");
    let norm = norm.strip_suffix('\n').unwrap_or(&norm);
    let unsupported = || {
        anyhow!(
            "{file}: the ChatML chat template is not one kfrun can render exactly (only plain ChatML with an optional default system prompt): {:?}",
            tpl.chars().take(200).collect::<String>()
        )
    };
    let body = norm.strip_prefix(CHATML_FOR).ok_or_else(unsupported)?;
    let (system, rest) = match body.strip_prefix(DEFAULT_SYSTEM_OPEN) {
        None => ("", body),
        Some(b) => {
            let end = b.find(DEFAULT_SYSTEM_CLOSE).ok_or_else(unsupported)?;
            let lit = &b[..end];
            if lit.contains('\'') || lit.contains('\\') {
                return Err(unsupported());
            }
            (lit, &b[end + DEFAULT_SYSTEM_CLOSE.len()..])
        }
    };
    if rest != CHATML_LOOP {
        return Err(unsupported());
    }
    Ok(format!(
        "{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ))
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
