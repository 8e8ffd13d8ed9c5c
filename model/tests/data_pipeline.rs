//! Tokenizer and data pipeline on the committed corpus excerpt (data/excerpt): BPE
//! training, round trips, streaming decode, shards, split by document, window sampling
//! determinism and resume, and one clear error for each malformed input.

use kf_model::data::{
    self, read_corpus, Document, PrepareOptions, SequentialWindows, TokenData, TokenDtype,
    TokenShard, WindowSampler,
};
use kf_model::tokenizer::{BpeTrainOptions, Tokenizer, EOS_TOKEN};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

fn excerpt() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/excerpt/corpus.jsonl")
}

fn docs() -> &'static Vec<Document> {
    static D: OnceLock<Vec<Document>> = OnceLock::new();
    D.get_or_init(|| read_corpus(&excerpt()).expect("the committed excerpt loads"))
}

/// A fresh empty directory under the system temp dir.
fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "kf-data-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const VOCAB: usize = 1024;

/// The tokenizer trained on the whole excerpt, saved once (path, loaded tokenizer).
fn trained() -> &'static (PathBuf, Tokenizer) {
    static T: OnceLock<(PathBuf, Tokenizer)> = OnceLock::new();
    T.get_or_init(|| {
        let tok = Tokenizer::train_bpe(
            docs().iter().map(|d| d.text.as_str()),
            &BpeTrainOptions {
                vocab_size: VOCAB,
                min_frequency: 2,
            },
        )
        .unwrap();
        let p = scratch("tok").join("tokenizer.json");
        tok.save(&p).unwrap();
        (p.clone(), Tokenizer::from_file(&p).unwrap())
    })
}

/// The excerpt prepared once with these options.
fn prepared() -> &'static (PathBuf, TokenData) {
    static P: OnceLock<(PathBuf, TokenData)> = OnceLock::new();
    P.get_or_init(|| {
        let out = scratch("shards");
        data::prepare(
            &excerpt(),
            &trained().0,
            &out,
            &PrepareOptions {
                val_fraction: 0.1,
                seed: 3,
            },
        )
        .unwrap();
        let d = TokenData::open(&out).unwrap();
        (out, d)
    })
}

fn err_string<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn excerpt_has_every_source_and_fits_the_budget() {
    let sources: HashSet<&str> = docs().iter().map(|d| d.source.as_str()).collect();
    for s in ["sotu", "wikipedia", "austen", "shakespeare", "kjv"] {
        assert!(sources.contains(s), "excerpt lacks source {s}");
    }
    let dir = excerpt().parent().unwrap().to_path_buf();
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= 1_000_000, "data/excerpt holds {total} bytes");
    let keys: HashSet<String> = docs().iter().map(|d| d.key()).collect();
    assert_eq!(keys.len(), docs().len(), "document keys are unique");
}

#[test]
fn trained_tokenizer_shape() {
    let tok = &trained().1;
    assert_eq!(tok.vocab_size(), VOCAB);
    assert_eq!(tok.eos_id(), Some(0));
    assert_eq!(tok.token_to_id(EOS_TOKEN), Some(0));
    // the EOS token encodes as one id and decodes back
    assert_eq!(tok.encode(EOS_TOKEN).unwrap(), vec![0]);
    assert_eq!(tok.decode(&[0]).unwrap(), EOS_TOKEN);
    // an id outside the vocabulary is an error, not a silent drop
    let e = err_string(tok.decode(&[5, VOCAB as u32]));
    assert!(e.contains("outside the vocabulary"), "{e}");
}

#[test]
fn training_is_deterministic() {
    let texts: Vec<&str> = docs().iter().take(120).map(|d| d.text.as_str()).collect();
    let opts = BpeTrainOptions {
        vocab_size: 600,
        min_frequency: 2,
    };
    let a = Tokenizer::train_bpe(texts.iter(), &opts).unwrap();
    let b = Tokenizer::train_bpe(texts.iter(), &opts).unwrap();
    assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
    assert!(Tokenizer::train_bpe(
        texts.iter(),
        &BpeTrainOptions {
            vocab_size: 200,
            min_frequency: 2
        }
    )
    .is_err());
}

const NON_ASCII: [&str; 6] = [
    "naïve café, Ångström, façade — “quoted” ‘text’ … 5 €",
    "日本語のテキストと中文",
    "emoji: 🙂👍🏽 and a flag 🇫🇷",
    "Ελληνικά, русский текст, עברית, العربية",
    "  leading spaces,\ttabs\n\n\nand blank lines  ",
    "",
];

#[test]
fn round_trip_on_real_and_non_ascii_text() {
    let tok = &trained().1;
    let mut n_tokens = 0;
    let mut n_bytes = 0;
    for d in docs() {
        let ids = tok.encode(&d.text).unwrap();
        assert_eq!(
            tok.decode(&ids).unwrap(),
            d.text,
            "round trip of {}",
            d.key()
        );
        n_tokens += ids.len();
        n_bytes += d.text.len();
    }
    // a trained BPE compresses (well over one byte per token even at vocab 1024)
    assert!(n_bytes as f64 / n_tokens as f64 > 2.0);
    for s in NON_ASCII {
        let ids = tok.encode(s).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < VOCAB));
        assert_eq!(tok.decode(&ids).unwrap(), s);
    }
}

#[test]
fn streaming_decoder_equals_full_decode() {
    let tok = &trained().1;
    let mut texts: Vec<String> = NON_ASCII.iter().map(|s| s.to_string()).collect();
    texts.extend(
        docs()
            .iter()
            .take(40)
            .map(|d| d.text.chars().take(3000).collect()),
    );
    texts.push(format!("end of one{EOS_TOKEN}start of the next: 日本"));
    let mut held_back = 0;
    for t in &texts {
        let ids = tok.encode(t).unwrap();
        let mut dec = tok.stream_decoder();
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(id).unwrap();
            if piece.is_empty() {
                held_back += 1;
            }
            assert!(
                !piece.contains('\u{FFFD}'),
                "partial character emitted for {t:?}"
            );
            out += &piece;
        }
        out += &dec.finish().unwrap();
        assert_eq!(out, tok.decode(&ids).unwrap());
        assert_eq!(out, *t);
        assert_eq!(dec.ids(), &ids[..]);
    }
    // CJK and emoji are split over several byte tokens at this vocabulary size
    assert!(held_back > 0);
    // a sequence cut inside a character: finish() flushes it lossily
    let ids = tok.encode("🙂").unwrap();
    assert!(ids.len() > 1);
    let mut dec = tok.stream_decoder();
    assert_eq!(dec.push(ids[0]).unwrap(), "");
    assert_eq!(dec.finish().unwrap(), tok.decode(&ids[..1]).unwrap());
}

#[test]
fn saved_tokenizer_reloads_identically() {
    let (path, tok) = trained();
    let again = Tokenizer::from_file(path).unwrap();
    let text = &docs()[1].text;
    assert_eq!(again.encode(text).unwrap(), tok.encode(text).unwrap());
    assert_eq!(again.to_json().unwrap(), tok.to_json().unwrap());
    assert_eq!(again.source(), Some(path.as_path()));
}

/// A tokenizer.json shaped exactly like GPT-2's (legacy "a b" merges, ByteLevel
/// pre-tokenizer / post-processor / decoder, `<|endoftext|>` as an added token at the
/// end), with a vocabulary cut down to the 256 byte symbols and a few merges.
fn gpt2_shaped_json() -> String {
    // GPT-2's byte -> unicode table
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, char)> = bs
        .iter()
        .zip(&cs)
        .map(|(&b, &c)| (b, char::from_u32(c).unwrap()))
        .collect();
    pairs.sort();
    let mut vocab = serde_json::Map::new();
    for (b, c) in &pairs {
        vocab.insert(c.to_string(), (*b).into());
    }
    let merges = ["Ġ t", "Ġ a", "h e", "i n", "Ġt he"];
    for (i, m) in merges.iter().enumerate() {
        vocab.insert(m.replace(' ', ""), (256 + i).into());
    }
    let eos = 256 + merges.len();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": eos, "content": EOS_TOKEN, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": true, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    })
    .to_string()
}

#[test]
fn gpt2_shaped_tokenizer_loads() {
    let p = scratch("gpt2").join("tokenizer.json");
    std::fs::write(&p, gpt2_shaped_json()).unwrap();
    let tok = Tokenizer::from_file(&p).unwrap();
    assert_eq!(tok.vocab_size(), 262);
    assert_eq!(tok.eos_id(), Some(261));
    let ids = tok.encode("in the tin").unwrap();
    // "in" | "Ġthe" | "Ġt" "in"
    assert_eq!(ids, vec![259, 260, 256, 259]);
    assert_eq!(tok.decode(&ids).unwrap(), "in the tin");
    let s = "Grüße — 🙂";
    assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
}

/// With KF_GPT2_TOKENIZER=path/to/gpt2/tokenizer.json, checks the real GPT-2 ids.
#[test]
fn real_gpt2_tokenizer_when_available() {
    let Ok(p) = std::env::var("KF_GPT2_TOKENIZER") else {
        eprintln!("KF_GPT2_TOKENIZER not set: skipped");
        return;
    };
    let tok = Tokenizer::from_file(&p).unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eos_id(), Some(50256));
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    let s = "The quick brown fox — naïve 日本語 🙂";
    assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
}

#[test]
fn shards_are_the_documents_split_by_document() {
    let (tok_path, tok) = trained();
    let (dir, data) = prepared();
    let m = &data.meta;
    assert_eq!(m.dtype, TokenDtype::U16);
    assert_eq!(m.vocab_size, VOCAB);
    assert_eq!(m.eos_id, 0);
    assert_eq!(m.seed, 3);
    assert_eq!(m.tokenizer_sha256, data::file_sha256(tok_path).unwrap());
    assert_eq!(m.corpus_sha256, data::file_sha256(&excerpt()).unwrap());
    data.check_tokenizer(tok_path).unwrap();
    assert_eq!((m.train.documents + m.val.documents) as usize, docs().len());
    assert_eq!(
        m.val.documents as usize,
        (0.1 * docs().len() as f64).round() as usize
    );
    let val_keys: HashSet<&str> = m.val_documents.iter().map(|s| s.as_str()).collect();
    assert_eq!(val_keys.len(), m.val.documents as usize);
    // rebuild both shards from the documents: each document lies whole in exactly one
    let (mut want_train, mut want_val) = (Vec::new(), Vec::new());
    for d in docs() {
        let target = if val_keys.contains(d.key().as_str()) {
            &mut want_val
        } else {
            &mut want_train
        };
        target.extend(tok.encode(&d.text).unwrap());
        target.push(0);
    }
    assert_eq!(data.train.to_vec(), want_train);
    assert_eq!(data.val.to_vec(), want_val);
    assert_eq!(data.train.len() as u64, m.train.tokens);
    assert_eq!(
        std::fs::metadata(dir.join("train.bin")).unwrap().len(),
        2 * m.train.tokens
    );
    // no leftovers from the atomic writes
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "{name} left behind");
    }
}

#[test]
fn prepare_is_deterministic_and_the_seed_moves_the_split() {
    let (dir, data) = prepared();
    let again = scratch("again");
    let opts = PrepareOptions {
        val_fraction: 0.1,
        seed: 3,
    };
    data::prepare(&excerpt(), &trained().0, &again, &opts).unwrap();
    for f in ["train.bin", "val.bin", "meta.json"] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f} differs between two runs"
        );
    }
    let other = scratch("seed4");
    let m4 = data::prepare(
        &excerpt(),
        &trained().0,
        &other,
        &PrepareOptions { seed: 4, ..opts },
    )
    .unwrap();
    assert_ne!(m4.val_documents, data.meta.val_documents);
}

#[test]
fn window_sampler_is_deterministic_and_resumable() {
    let data = &prepared().1;
    let (l, b) = (64, 4);
    let s = WindowSampler::new(data.train.clone(), l, b, 11).unwrap();
    let same = WindowSampler::new(data.train.clone(), l, b, 11).unwrap();
    let other_seed = WindowSampler::new(data.train.clone(), l, b, 12).unwrap();
    let run: Vec<_> = (0..20).map(|step| s.batch(step)).collect();
    // same seed, same windows
    for (step, w) in run.iter().enumerate() {
        assert_eq!(*w, same.batch(step as u64));
        assert_eq!(w.rows, b);
        assert_eq!(w.tokens.len(), b * (l + 1));
        // inputs/targets are the window shifted by one
        assert_eq!(w.inputs()[1..l], w.targets()[..l - 1]);
    }
    // different steps and different seeds give different windows
    assert_ne!(run[0], run[1]);
    assert_ne!(run[0], other_seed.batch(0));
    // the windows are the shard's tokens at the reported starts
    let all = data.train.to_vec();
    for r in 0..b {
        let start = s.window_start(7, r);
        assert_eq!(run[7].row(r), &all[start..start + l + 1]);
    }
    // a sampler built at step 10 (a resumed run) continues the same sequence
    let resumed = WindowSampler::new(data.train.clone(), l, b, 11).unwrap();
    for (step, w) in run.iter().enumerate().skip(10) {
        assert_eq!(resumed.batch(step as u64), *w);
    }
    // starts spread over the shard
    let starts: HashSet<usize> = (0..200).map(|st| s.window_start(st, 0)).collect();
    assert!(starts.len() > 190);
    // too short a shard for the window: an error naming the file
    let e = err_string(WindowSampler::new(data.val.clone(), data.val.len(), 1, 0));
    assert!(e.contains("val.bin"), "{e}");
}

#[test]
fn validation_windows_are_in_order_and_complete() {
    let data = &prepared().1;
    let l = 128;
    let it = SequentialWindows::new(data.val.clone(), l, 3, None).unwrap();
    let n = it.num_windows();
    assert_eq!(n, (data.val.len() - 1) / l);
    let batches: Vec<_> = it.collect();
    assert_eq!(batches.iter().map(|b| b.rows).sum::<usize>(), n);
    let all = data.val.to_vec();
    let mut w = 0;
    for bt in &batches {
        for r in 0..bt.rows {
            assert_eq!(bt.row(r), &all[w * l..w * l + l + 1]);
            w += 1;
        }
    }
    let again: Vec<_> = SequentialWindows::new(data.val.clone(), l, 3, None)
        .unwrap()
        .collect();
    assert_eq!(batches, again);
    let capped = SequentialWindows::new(data.val.clone(), l, 3, Some(4)).unwrap();
    assert_eq!(capped.num_windows(), 4);
    assert_eq!(capped.map(|b| b.rows).collect::<Vec<_>>(), vec![3, 1]);
}

#[test]
fn malformed_tokenizer_files_are_one_clear_error() {
    let d = scratch("badtok");
    let cases = [
        ("garbage.json", "this is not json"),
        ("empty.json", ""),
        ("wrong.json", r#"{"model": {"type": "BPE", "vocab": 3}}"#),
        ("truncated.json", &gpt2_shaped_json()[..500]),
    ];
    for (name, body) in cases {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        let e = err_string(Tokenizer::from_file(&p));
        assert!(e.contains(name), "error for {name} does not name it: {e}");
        assert!(!e.contains('\n'), "multi-line error: {e}");
    }
    let e = err_string(Tokenizer::from_file(d.join("missing.json")));
    assert!(e.contains("missing.json"), "{e}");
    // prepare with a broken tokenizer names the tokenizer file
    let p = d.join("garbage.json");
    let e = err_string(data::prepare(
        &excerpt(),
        &p,
        &d.join("out"),
        &PrepareOptions::default(),
    ));
    assert!(e.contains("garbage.json"), "{e}");
}

#[test]
fn missing_or_malformed_corpus_is_an_error_naming_it() {
    let d = scratch("badcorpus");
    let e = err_string(read_corpus(&d.join("nope.jsonl")));
    assert!(e.contains("nope.jsonl"), "{e}");
    let p = d.join("bad.jsonl");
    std::fs::write(&p, "{\"text\": \"fine\"}\n{\"text\": 3}\n").unwrap();
    let e = err_string(read_corpus(&p));
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    let p = d.join("empty.jsonl");
    std::fs::write(&p, "\n").unwrap();
    let e = err_string(read_corpus(&p));
    assert!(e.contains("empty.jsonl"), "{e}");
    let e = err_string(data::prepare(
        &d.join("nope.jsonl"),
        &trained().0,
        &d.join("out"),
        &PrepareOptions::default(),
    ));
    assert!(e.contains("nope.jsonl"), "{e}");
    let e = err_string(data::prepare(
        &excerpt(),
        &trained().0,
        &d.join("out"),
        &PrepareOptions {
            val_fraction: 1.5,
            seed: 0,
        },
    ));
    assert!(e.contains("1.5"), "{e}");
}

/// Copies the prepared directory for corrupting.
fn copy_prepared(tag: &str) -> PathBuf {
    let src = &prepared().0;
    let d = scratch(tag);
    for f in ["train.bin", "val.bin", "meta.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    d
}

#[test]
fn corrupt_shards_are_errors_naming_the_file() {
    // odd size: not a whole number of u16 tokens
    let d = copy_prepared("odd");
    let mut b = std::fs::read(d.join("val.bin")).unwrap();
    b.pop();
    std::fs::write(d.join("val.bin"), &b).unwrap();
    let e = err_string(TokenData::open(&d));
    assert!(e.contains("val.bin") && e.contains("multiple"), "{e}");

    // whole tokens, but not the count meta.json records
    let d = copy_prepared("short");
    let mut b = std::fs::read(d.join("train.bin")).unwrap();
    b.truncate(b.len() - 2);
    std::fs::write(d.join("train.bin"), &b).unwrap();
    let e = err_string(TokenData::open(&d));
    assert!(e.contains("train.bin") && e.contains("meta.json"), "{e}");

    // an id >= vocabulary
    let d = copy_prepared("bigid");
    let mut b = std::fs::read(d.join("val.bin")).unwrap();
    b[10..12].copy_from_slice(&(VOCAB as u16).to_le_bytes());
    std::fs::write(d.join("val.bin"), &b).unwrap();
    let e = err_string(TokenData::open(&d));
    assert!(
        e.contains("val.bin") && e.contains("position 5") && e.contains("1024"),
        "{e}"
    );
    // the same check on a shard opened directly
    let e = err_string(TokenShard::open(&d.join("val.bin"), TokenDtype::U16, VOCAB));
    assert!(e.contains("val.bin"), "{e}");

    // missing and malformed meta.json, missing shard
    let d = copy_prepared("meta");
    std::fs::write(d.join("meta.json"), "{\"format\": 1}").unwrap();
    let e = err_string(TokenData::open(&d));
    assert!(e.contains("meta.json"), "{e}");
    std::fs::remove_file(d.join("meta.json")).unwrap();
    let e = err_string(TokenData::open(&d));
    assert!(e.contains("meta.json"), "{e}");
    let d = copy_prepared("noshard");
    std::fs::remove_file(d.join("train.bin")).unwrap();
    let e = err_string(TokenData::open(&d));
    assert!(e.contains("train.bin"), "{e}");

    // a different tokenizer than the one the shards were made with
    let other = scratch("othertok").join("tokenizer.json");
    std::fs::write(&other, gpt2_shaped_json()).unwrap();
    let e = err_string(prepared().1.check_tokenizer(&other));
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn empty_and_u32_shards_open() {
    let d = scratch("u32");
    std::fs::write(d.join("e.bin"), b"").unwrap();
    let sh = TokenShard::open(&d.join("e.bin"), TokenDtype::U16, 10).unwrap();
    assert!(sh.is_empty());
    let ids: Vec<u32> = vec![0, 70_000, 65_536, 3, 99_999];
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(d.join("w.bin"), &bytes).unwrap();
    let sh = Arc::new(TokenShard::open(&d.join("w.bin"), TokenDtype::U32, 100_000).unwrap());
    assert_eq!(sh.to_vec(), ids);
    let e = err_string(TokenShard::open(&d.join("w.bin"), TokenDtype::U32, 99_999));
    assert!(e.contains("w.bin") && e.contains("position 4"), "{e}");
    let w = WindowSampler::new(sh, 2, 2, 0).unwrap().batch(0);
    assert_eq!(w.tokens.len(), 6);
}
