//! GGUF reader and dequantization against the `gguf` Python package (llama.cpp's numpy
//! reference): `data/quants.gguf` (written by `data/make_gguf.py`) holds a tensor of each
//! type beside its dequantization by that package, and metadata of every value type; our
//! dequantization must equal it bit for bit. The real SmolLM2-135M-Instruct Q4_1 file is
//! checked when `KF_SMOLLM2_GGUF` names it (metadata, tensor list, and hashes of
//! dequantized tensors from `data/smollm2_checksums.py`); the test skips otherwise.

use kf_engine::gguf::{GgmlType, Gguf, GgufValue};
use std::path::{Path, PathBuf};

fn fixture() -> Gguf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quants.gguf");
    Gguf::open(&p).unwrap()
}

fn fnv1a64(xs: &[f32]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for x in xs {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01B3);
        }
    }
    h
}

#[test]
fn dequantization_equals_gguf_python_for_every_type() {
    let g = fixture();
    let types = [
        ("f32", GgmlType::F32),
        ("f16", GgmlType::F16),
        ("bf16", GgmlType::BF16),
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q5_0", GgmlType::Q5_0),
        ("q5_1", GgmlType::Q5_1),
        ("q8_0", GgmlType::Q8_0),
        ("q2_k", GgmlType::Q2_K),
        ("q3_k", GgmlType::Q3_K),
        ("q4_k", GgmlType::Q4_K),
        ("q5_k", GgmlType::Q5_K),
        ("q6_k", GgmlType::Q6_K),
    ];
    assert_eq!(g.tensors().len(), 2 * types.len());
    for (name, ty) in types {
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.ty, ty, "{name}");
        assert_eq!(info.shape, vec![2, 256], "{name}");
        assert_eq!(info.n_bytes, 512 / ty.block_elems() * ty.block_bytes());
        assert_eq!(info.offset % g.alignment(), 0);
        let ours = g.tensor_f32(name).unwrap();
        assert_eq!(ours.shape(), &[2, 256]);
        let ours = ours.to_vec::<f32>().unwrap();
        let want = g
            .tensor_f32(&format!("{name}.expected"))
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let bad: Vec<_> = ours
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .take(4)
            .collect();
        assert!(bad.is_empty(), "{name}: (index, (ours, gguf-py)) {bad:?}");
        assert!(
            want.iter().any(|&x| x != 0.0),
            "{name}: an all-zero fixture"
        );
    }
}

#[test]
fn metadata_of_every_value_type() {
    let g = fixture();
    assert_eq!(g.version(), 3);
    let s = |k: &str| g.get(k).unwrap().clone();
    assert_eq!(s("general.architecture").as_str(), Some("kftest"));
    assert_eq!(s("test.u32"), GgufValue::U32(4_000_000_000));
    assert_eq!(s("test.i32"), GgufValue::I32(-7));
    assert_eq!(s("test.u64"), GgufValue::U64(1 << 40));
    assert_eq!(s("test.i64"), GgufValue::I64(-(1 << 40)));
    assert_eq!(s("test.f32"), GgufValue::F32(0.1));
    assert_eq!(s("test.f64"), GgufValue::F64(1e-300));
    assert_eq!(s("test.bool"), GgufValue::Bool(true));
    assert_eq!(s("test.u8"), GgufValue::U8(255));
    assert_eq!(s("test.i8"), GgufValue::I8(-128));
    assert_eq!(s("test.u16"), GgufValue::U16(65535));
    assert_eq!(s("test.i16"), GgufValue::I16(-32768));
    assert_eq!(s("test.str").as_str(), Some("naïve ✓ <|im_start|>"));
    let strs: Vec<_> = s("test.strs")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(strs, ["a", "", "ü"]);
    // gguf-py stores Python ints as I32, floats as F32
    assert_eq!(
        s("test.ints"),
        GgufValue::Array(vec![
            GgufValue::I32(1),
            GgufValue::I32(-2),
            GgufValue::I32(3)
        ])
    );
    assert_eq!(
        s("test.floats"),
        GgufValue::Array(vec![GgufValue::F32(0.5), GgufValue::F32(-1.25)])
    );
    // file order
    let keys: Vec<_> = g.metadata().iter().map(|(k, _)| k.as_str()).collect();
    let u32_at = keys.iter().position(|&k| k == "test.u32").unwrap();
    assert_eq!(keys[u32_at + 1], "test.i32");
}

/// Our writer's files read back the same through our reader (and the fixture rewritten by
/// us keeps every tensor's bytes).
#[test]
fn rewrite_of_the_fixture_round_trips() {
    let g = fixture();
    let tensors: Vec<_> = g
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.ty,
                t.shape.clone(),
                g.tensor_bytes(&t.name).unwrap().to_vec(),
            )
        })
        .collect();
    let p = std::env::temp_dir().join(format!("kf-gguf-rewrite-{}.gguf", std::process::id()));
    kf_engine::gguf::write_gguf(&p, g.metadata(), &tensors).unwrap();
    let h = Gguf::open(&p).unwrap();
    assert_eq!(h.metadata(), g.metadata());
    for t in g.tensors() {
        let u = h.tensor_info(&t.name).unwrap();
        assert_eq!((&u.shape, u.ty), (&t.shape, t.ty));
        assert_eq!(
            h.tensor_bytes(&t.name).unwrap(),
            g.tensor_bytes(&t.name).unwrap()
        );
    }
    std::fs::remove_file(&p).unwrap();
}

/// The SmolLM2 file named by `KF_SMOLLM2_GGUF`, or `None` (with the reason printed).
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
fn smollm2_q4_1_file() {
    let Some(path) = smollm2() else { return };
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    let u = |k: &str| g.get(k).and_then(GgufValue::as_u64).unwrap();
    assert_eq!(
        g.get("general.architecture").and_then(GgufValue::as_str),
        Some("llama")
    );
    assert_eq!(u("llama.block_count"), 30);
    assert_eq!(u("llama.context_length"), 8192);
    assert_eq!(u("llama.embedding_length"), 576);
    assert_eq!(u("llama.feed_forward_length"), 1536);
    assert_eq!(u("llama.attention.head_count"), 9);
    assert_eq!(u("llama.attention.head_count_kv"), 3);
    assert_eq!(u("tokenizer.ggml.eos_token_id"), 2);
    assert_eq!(
        g.get("llama.rope.freq_base").and_then(GgufValue::as_f64),
        Some(100000.0)
    );
    let tokens = g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1].as_str(), Some("<|im_start|>"));

    // 272 tensors: the embedding (Q8_0, tied with the output), 2 norms per block and the
    // final norm (F32), 7 Q4_1 matrices per block
    let ts = g.tensors();
    assert_eq!(ts.len(), 272);
    let count = |ty| ts.iter().filter(|t| t.ty == ty).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );
    let shape = |n: &str| g.tensor_info(n).unwrap().shape.clone();
    assert_eq!(shape("token_embd.weight"), vec![49152, 576]);
    assert_eq!(shape("output_norm.weight"), vec![576]);
    assert!(g.tensor_info("output.weight").is_none());
    for b in 0..30 {
        for (n, s) in [
            ("attn_norm", vec![576]),
            ("ffn_norm", vec![576]),
            ("attn_q", vec![576, 576]),
            ("attn_k", vec![192, 576]),
            ("attn_v", vec![192, 576]),
            ("attn_output", vec![576, 576]),
            ("ffn_gate", vec![1536, 576]),
            ("ffn_up", vec![1536, 576]),
            ("ffn_down", vec![576, 1536]),
        ] {
            assert_eq!(shape(&format!("blk.{b}.{n}.weight")), s, "blk.{b}.{n}");
        }
    }

    // (name, type, f64 sum, FNV-1a of the f32 bytes: whole tensor or the listed rows) from
    // data/smollm2_checksums.py
    let whole: [(&str, GgmlType, f64, u64); 4] = [
        (
            "blk.0.attn_norm.weight",
            GgmlType::F32,
            0.6129436492919922,
            3445707643661092966,
        ),
        (
            "blk.0.attn_q.weight",
            GgmlType::Q4_1,
            59.22322082519531,
            7687605685260441164,
        ),
        (
            "blk.29.ffn_down.weight",
            GgmlType::Q4_1,
            49.83570861816406,
            168523619712188090,
        ),
        (
            "output_norm.weight",
            GgmlType::F32,
            1038.33203125,
            16897870759804396292,
        ),
    ];
    for (name, ty, sum, hash) in whole {
        assert_eq!(g.tensor_info(name).unwrap().ty, ty);
        let x = g.tensor_f32(name).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(fnv1a64(&x), hash, "{name}");
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        assert!(
            (s - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "{name}: {s} vs {sum}"
        );
    }
    let emb = g.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(emb.shape(), &[49152, 576]);
    let emb = emb.to_vec::<f32>().unwrap();
    for (row, hash) in [
        (0, 481468305193071277u64),
        (1000, 16772409145349813551),
        (49151, 8889623442303688607),
    ] {
        assert_eq!(fnv1a64(&emb[row * 576..(row + 1) * 576]), hash, "row {row}");
    }
    let s: f64 = emb.iter().map(|&v| v as f64).sum();
    assert!((s - -15353.04449415207).abs() < 1e-6, "embedding sum {s}");
}
