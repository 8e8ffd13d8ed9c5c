//! Reference parity: our DDiT forward against the independent numpy implementation
//! tools/reference/ddit_numpy.py (written from KFORCING.md section 2), on a small random
//! model saved as f32 and as f16 (logits relative error <= 1e-4).
//!
//! The numpy logits are committed under model/tests/golden/ddit_parity/ (with the SHA-256 of
//! the model file they were computed from), so this test needs no Python: it runs on a fresh
//! machine. Where python3 with numpy is present, the script is also run live and must give
//! the committed logits. Regenerate them (after a change to the script or to the random
//! model) with:
//!
//!     KF_REGEN_GOLDEN=1 cargo test --release -p kf-model --test model_parity

mod common;

use common::{ids, random_model, small_cfg, temp_dir};
use kf_engine::{DType, Device, Tensor};
use kf_model::Ddit;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference/ddit_numpy.py")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ddit_parity")
}

/// `Err(reason)` when python3 cannot import numpy.
fn python_with_numpy() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import numpy; print(numpy.__version__)"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "python3 cannot import numpy: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!("python3 not found: {e}")),
    }
}

/// Logits of the numpy reference for `ids [B, T]` of the model in `dir` (run live).
fn reference_logits(dir: &Path, ids: &[u32], b: usize, t: usize) -> Vec<u8> {
    let rows: Vec<Vec<u32>> = ids.chunks(t).map(|r| r.to_vec()).collect();
    assert_eq!(rows.len(), b);
    let ids_path = dir.join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = dir.join("logits.f64");
    let o = Command::new("python3")
        .arg(script())
        .arg("--model")
        .arg(dir)
        .arg("--ids")
        .arg(&ids_path)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run python3");
    assert!(
        o.status.success(),
        "ddit_numpy.py failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(&out).unwrap()
}

fn f64s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn logits_match_the_numpy_reference() {
    let regen = std::env::var("KF_REGEN_GOLDEN").as_deref() == Ok("1");
    let live = python_with_numpy();
    if let Err(why) = &live {
        assert!(!regen, "KF_REGEN_GOLDEN=1 needs the numpy script: {why}");
        eprintln!("numpy reference not run live ({why}); comparing with the committed logits");
    }
    let cfg = small_cfg();
    let model = random_model(&cfg, 7);
    let (b, t, v) = (3, 13, cfg.vocab_size);
    let tokens = ids(b, t, v, 1);
    let mask = cfg.mask_token_id.unwrap() as usize;
    for dtype in [DType::F32, DType::F16] {
        let dir = temp_dir(&format!("parity-{dtype}"));
        model.save(&dir, dtype).unwrap();
        let model_sha = sha256_hex(&std::fs::read(dir.join("model.safetensors")).unwrap());
        let golden = golden_dir().join(format!("logits-{dtype}.f64"));
        let golden_sha = golden_dir().join(format!("model-{dtype}.sha256"));
        if regen {
            let bytes = reference_logits(&dir, &tokens, b, t);
            std::fs::create_dir_all(golden_dir()).unwrap();
            std::fs::write(&golden, bytes).unwrap();
            std::fs::write(&golden_sha, format!("{model_sha}\n")).unwrap();
        }
        let recorded = std::fs::read_to_string(&golden_sha)
            .unwrap_or_else(|e| panic!("{}: {e}", golden_sha.display()));
        assert_eq!(
            recorded.trim(),
            model_sha,
            "{dtype}: the random test model is no longer the one the committed numpy logits \
             were computed from; regenerate them: KF_REGEN_GOLDEN=1 cargo test --release \
             -p kf-model --test model_parity"
        );
        let want_bytes =
            std::fs::read(&golden).unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
        if live.is_ok() {
            let now = reference_logits(&dir, &tokens, b, t);
            assert!(
                now == want_bytes,
                "{dtype}: ddit_numpy.py now gives other logits than the committed ones; \
                 regenerate them if the script changed on purpose"
            );
        }
        let want = f64s(&want_bytes);
        // what we compare is the model as loaded from the file (f16 -> f32 exactly)
        let loaded = Ddit::load(&dir).unwrap();
        let x = Tensor::from_vec(tokens.clone(), &[b, t], Device::Cpu).unwrap();
        let ours = loaded.forward_train(&x).unwrap();
        assert_eq!(ours.shape(), &[b, t, v]);
        let ours = ours.to_vec_f64().unwrap();
        assert_eq!(ours.len(), want.len(), "reference logits have another size");
        let mut worst = 0f64;
        for (i, (a, r)) in ours.iter().zip(&want).enumerate() {
            if i % v == mask {
                assert_eq!(*a, -1000.0, "mask logit at flat index {i}");
                assert_eq!(*r, -1000.0);
                continue;
            }
            worst = worst.max((a - r).abs());
        }
        // the mask column (-1000) would dominate a scale; relate the error to the real logits
        let real = want
            .iter()
            .enumerate()
            .filter(|(i, _)| i % v != mask)
            .fold(0f64, |m, (_, x)| m.max(x.abs()));
        let rel = worst / real;
        eprintln!(
            "{dtype}: max |ours - numpy| = {worst:.3e}, max |logit| = {real:.3}, relative {rel:.3e}"
        );
        assert!(real > 1.0, "logits too small to be a meaningful comparison");
        assert!(rel <= 1e-4, "{dtype}: relative error {rel:.3e} > 1e-4");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
