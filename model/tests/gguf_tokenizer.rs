//! The tokenizer and chat template of a GGUF file against llama.cpp: token ids of varied
//! texts (English, digits, code, Unicode, whitespace runs, contractions, special tokens)
//! from SmolLM2-135M-Instruct's GGUF must equal llama.cpp's (`Llama.tokenize(...,
//! add_bos=False, special=True)`, printed by tools/scripts/llama_cpp_tokenize.py), ids
//! must decode back to the text, and the rendered chat prompt must equal the Jinja
//! rendering of the file's template. Needs `KF_SMOLLM2_GGUF` (the file's path); skips
//! with the reason otherwise.

use kf_engine::gguf::{write_gguf, Gguf, GgufValue};
use kf_model::tokenizer::{apply_chat_template, Tokenizer};
use std::path::{Path, PathBuf};

// keep in sync with TEXTS in tools/scripts/llama_cpp_tokenize.py
const TEXTS: &[&str] = &[
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Numbers: 12345 3.14 -0.5e10 2024-06-11 1,000,000 and x2y3",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: print('ok')\n",
    "naïve café — ünïcode ✓ 日本語のテキスト 😀👍🏽 Ελληνικά русский",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, trailing spaces   \n\n\n  multiple\r\nlines\t\ttabs  ",
    "I'm sure they'll've done it; it's JOHN'S and we'd've",
    "<|endoftext|>a<file_sep>b<|im_end|><|unknown|>",
    "",
    " ",
    "\n",
];

// llama-cpp-python 0.3.36, SmolLM2-135M-Instruct.Q4_1.gguf
const EXPECTED: &[&[u32]] = &[
    &[
        19556, 905, 17, 378, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30,
    ],
    &[
        39006, 42, 216, 33, 34, 35, 36, 37, 216, 35, 30, 33, 36, 731, 32, 30, 37, 85, 33, 32, 216,
        34, 32, 34, 36, 29, 32, 38, 29, 33, 33, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32, 284, 1792,
        34, 105, 35,
    ],
    &[
        1604, 275, 24, 104, 727, 472, 1003, 1792, 1903, 216, 34, 216, 907, 5222, 1116, 197, 342,
        253, 6541, 278, 42, 1628, 1305, 2231, 1465, 198,
    ],
    &[
        3546, 46494, 37366, 1841, 5549, 137, 94, 25972, 4635, 4636, 246, 237, 17097, 241, 115,
        40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 40303, 218,
        10813, 235, 231, 10813, 233, 138, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118,
        26112, 216, 9175, 14714, 9382, 39511, 7872, 24958,
    ],
    &[1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198],
    &[
        216, 2899, 5600, 28, 35079, 5600, 333, 1116, 3805, 2701, 201, 198, 5110, 197, 197, 100,
        7366, 256,
    ],
    &[
        57, 5248, 2090, 502, 3060, 3543, 2294, 357, 43, 357, 506, 530, 18692, 62, 23, 67, 284, 392,
        6737, 3543,
    ],
    &[0, 81, 5, 82, 2, 44, 108, 31295, 108, 46],
    &[],
    &[216],
    &[198],
];

/// The file's template rendered by jinja2 for one user message "What is 2+2?" with
/// add_generation_prompt (tools/scripts/llama_cpp_tokenize.py).
const CHAT_WHAT_IS: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
/// llama.cpp's ids of CHAT_WHAT_IS.
const CHAT_IDS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198,
];

fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("KF_SMOLLM2_GGUF") {
        None => {
            eprintln!(
                "skipped: KF_SMOLLM2_GGUF is not set (path of SmolLM2-135M-Instruct.Q4_1.gguf)"
            );
            None
        }
        Some(p) if !Path::new(&p).is_file() => {
            eprintln!("skipped: KF_SMOLLM2_GGUF={p:?} is not a file");
            None
        }
        Some(p) => Some(p.into()),
    }
}

#[test]
fn smollm2_ids_equal_llama_cpp() {
    let Some(path) = smollm2() else { return };
    let g = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(TEXTS.len(), EXPECTED.len());
    for (text, want) in TEXTS.iter().zip(EXPECTED) {
        let ids = tok.encode(text).unwrap();
        assert_eq!(&ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), *text, "decode of {text:?}");
    }
}

#[test]
fn smollm2_chat_template_equals_jinja() {
    let Some(path) = smollm2() else { return };
    let g = Gguf::open(&path).unwrap();
    let prompt = apply_chat_template(&g, "What is 2+2?").unwrap();
    assert_eq!(prompt, CHAT_WHAT_IS);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.encode(&prompt).unwrap(), CHAT_IDS);
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kf-gguf-tok-{}-{name}", std::process::id()))
}

/// A tiny gpt2-style GGUF vocabulary: the byte symbols of "ab c", one merge, a control token.
fn tiny(extra: Vec<(String, GgufValue)>) -> Vec<(String, GgufValue)> {
    let s = |x: &str| GgufValue::Str(x.into());
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s("gpt-2")),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(["<|end|>", "a", "b", "c", "Ġ", "ab", "Ġc"].map(s).to_vec()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array([3, 1, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            GgufValue::Array(["a b", "Ġ c"].map(s).to_vec()),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(0)),
    ];
    for (k, v) in extra {
        match m.iter_mut().find(|(key, _)| *key == k) {
            Some(e) => e.1 = v,
            None => m.push((k, v)),
        }
    }
    m
}

fn load(meta: Vec<(String, GgufValue)>) -> anyhow::Result<(Gguf, Tokenizer)> {
    // one file per call: the tests run in parallel threads of one process
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = tmp(&format!("tiny-{n}.gguf"));
    write_gguf(&p, &meta, &[]).unwrap();
    let g = Gguf::open(&p)?;
    let t = Tokenizer::from_gguf(&g);
    std::fs::remove_file(&p).unwrap();
    Ok((g, t?))
}

#[test]
fn tiny_vocabulary_encodes_with_merges_and_control_tokens() {
    let (_, tok) = load(tiny(vec![])).unwrap();
    assert_eq!(tok.encode("ab c<|end|>").unwrap(), vec![5, 6, 0]);
    assert_eq!(tok.decode(&[5, 6, 0]).unwrap(), "ab c<|end|>");
    assert_eq!(tok.eos_id(), Some(0));
}

#[test]
fn unsupported_tokenizers_and_templates_are_clear_errors() {
    let err = |extra| format!("{:#}", load(tiny(extra)).unwrap_err());
    let s = |x: &str| GgufValue::Str(x.into());
    let e = err(vec![("tokenizer.ggml.model".into(), s("t5"))]);
    assert!(e.contains("\"t5\" is not supported"), "{e}");
    // a SentencePiece vocabulary without its scores
    let e = err(vec![("tokenizer.ggml.model".into(), s("llama"))]);
    assert!(e.contains("tokenizer.ggml.scores is missing"), "{e}");
    let e = err(vec![("tokenizer.ggml.pre".into(), s("tekken"))]);
    assert!(
        e.contains("\"tekken\"") && e.contains("not supported") && e.contains("llama-bpe"),
        "{e}"
    );
    let e = err(vec![(
        "tokenizer.ggml.eos_token_id".into(),
        GgufValue::U32(99),
    )]);
    assert!(e.contains("eos_token_id"), "{e}");
    let e = err(vec![(
        "tokenizer.ggml.merges".into(),
        GgufValue::Array(vec![s("a x")]),
    )]);
    assert!(e.contains("tokenizer"), "{e}");
    assert!(!e.contains('\n'));

    // plain ChatML renders without a system prompt; other templates are errors
    let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let (g, _) = load(tiny(vec![("tokenizer.chat_template".into(), s(chatml))])).unwrap();
    assert_eq!(
        apply_chat_template(&g, "hi").unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let llama3 =
        "{% for message in messages %}<|start_header_id|>{{ message['role'] }}{% endfor %}";
    let (g, _) = load(tiny(vec![("tokenizer.chat_template".into(), s(llama3))])).unwrap();
    let e = format!("{:#}", apply_chat_template(&g, "hi").unwrap_err());
    assert!(e.contains("not ChatML"), "{e}");
    let qwenish = format!("{{%- if tools %}}{chatml}");
    let (g, _) = load(tiny(vec![("tokenizer.chat_template".into(), s(&qwenish))])).unwrap();
    let e = format!("{:#}", apply_chat_template(&g, "hi").unwrap_err());
    assert!(e.contains("not one kfrun can render"), "{e}");
    let (g, _) = load(tiny(vec![])).unwrap();
    assert!(apply_chat_template(&g, "hi").is_err());
}

/// The pre-tokenizers beyond GPT-2's split text as llama.cpp's regexes do: Llama 3's
/// ("llama-bpe": case-insensitive contractions, numbers in runs of up to three digits, no
/// space glued to a number) and Qwen 2's (single digits). Pieces in byte-level form.
#[test]
fn llama3_and_qwen2_pre_tokenizers_split_like_llama_cpp() {
    use tokenizers::PreTokenizer;
    let text = "I'VE 12345 cats\n\n  ok!!";
    let pieces = |pre: &str| -> Vec<String> {
        let (_, tok) = load(tiny(vec![(
            "tokenizer.ggml.pre".into(),
            GgufValue::Str(pre.into()),
        )]))
        .unwrap();
        let mut s = tokenizers::PreTokenizedString::from(text);
        tok.inner()
            .get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut s)
            .unwrap();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(p, _, _)| p.to_string())
        .collect()
    };
    let bl = |v: &[&str]| -> Vec<String> {
        v.iter()
            .map(|p| p.replace(' ', "Ġ").replace('\n', "Ċ"))
            .collect()
    };
    assert_eq!(
        pieces("gpt-2"),
        bl(&["I", "'", "VE", " 12345", " cats", "\n\n ", " ok", "!!"])
    );
    assert_eq!(
        pieces("llama-bpe"),
        bl(&["I", "'VE", " ", "123", "45", " cats", "\n\n", " ", " ok", "!!"])
    );
    assert_eq!(
        pieces("qwen2"),
        bl(&["I", "'VE", " ", "1", "2", "3", "4", "5", " cats", "\n\n", " ", " ok", "!!"])
    );
}

/// SentencePiece ("llama") vocabularies tokenize as llama.cpp does. No real SentencePiece
/// GGUF is fetchable here, so tools/scripts/llama_cpp_spm_reference.py learns a small
/// SPM-BPE vocabulary, writes it as a vocab-only GGUF and records llama.cpp's ids for a
/// dozen texts (model/tests/data/spm_llama_cpp.json, llama-cpp-python 0.3.36): merges by
/// score, the space prefix, "▁" for spaces, byte fallback for what no token covers
/// (accents, CJK, emoji, newlines). Decoding the ids gives the text back (without the
/// prefix space, as Hugging Face's Llama tokenizer; llama.cpp's detokenizer keeps it).
#[test]
fn sentencepiece_ids_equal_llama_cpp() {
    let j: serde_json::Value =
        serde_json::from_str(include_str!("data/spm_llama_cpp.json")).unwrap();
    let arr = |k: &str| j[k].as_array().unwrap().clone();
    let strs = |k: &str| -> Vec<String> {
        arr(k)
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let s = |x: &str| GgufValue::Str(x.into());
    let meta = vec![
        ("tokenizer.ggml.model".to_string(), s("llama")),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(strs("tokens").iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            GgufValue::Array(
                arr("scores")
                    .iter()
                    .map(|v| GgufValue::F32(v.as_f64().unwrap() as f32))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(
                arr("types")
                    .iter()
                    .map(|v| GgufValue::I32(v.as_i64().unwrap() as i32))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(2)),
        (
            "tokenizer.ggml.add_space_prefix".to_string(),
            GgufValue::Bool(true),
        ),
    ];
    let (_, tok) = load(meta).unwrap();
    assert_eq!(tok.eos_id(), Some(2));
    let (texts, ids) = (strs("texts"), arr("ids"));
    assert_eq!(texts.len(), ids.len());
    for (text, want) in texts.iter().zip(&ids) {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(&tok.decode(&want).unwrap(), text, "decode of {text:?}");
    }
}
