//! Reference parity (issue 3, item 7): our DDiT forward against the independent numpy
//! implementation tools/reference/ddit_numpy.py, written from KFORCING.md section 2, on a
//! small random model saved as f32 and as f16 (logits relative error <= 1e-4). Python 3
//! with numpy is required: without it the test fails, unless KF_SKIP_PYTHON=1.

mod common;

use common::{ids, random_model, small_cfg, temp_dir};
use kf_engine::{DType, Device, Tensor};
use kf_model::Ddit;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference/ddit_numpy.py")
}

/// Whether python3 with numpy runs; panics with the reason unless KF_SKIP_PYTHON=1.
fn python_ready() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import numpy; print(numpy.__version__)"])
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "python3 cannot import numpy: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("python3 not found: {e}"),
    };
    if std::env::var("KF_SKIP_PYTHON").as_deref() == Ok("1") {
        eprintln!("SKIPPED the numpy reference parity test: {why} (KF_SKIP_PYTHON=1)");
        return false;
    }
    panic!(
        "the reference parity test needs python3 with numpy ({why}); install it \
         (pip install numpy) or set KF_SKIP_PYTHON=1 to skip this test"
    );
}

/// Logits of the numpy reference for `ids [B, T]` of the model in `dir`.
fn reference_logits(dir: &Path, ids: &[u32], b: usize, t: usize) -> Vec<f64> {
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
    let bytes = std::fs::read(&out).unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn logits_match_the_numpy_reference() {
    if !python_ready() {
        return;
    }
    let cfg = small_cfg();
    let model = random_model(&cfg, 7);
    let (b, t, v) = (3, 13, cfg.vocab_size);
    let tokens = ids(b, t, v, 1);
    let mask = cfg.mask_token_id.unwrap() as usize;
    for dtype in [DType::F32, DType::F16] {
        let dir = temp_dir(&format!("parity-{dtype}"));
        model.save(&dir, dtype).unwrap();
        // what we compare is the model as loaded from the file (f16 -> f32 exactly)
        let loaded = Ddit::load(&dir).unwrap();
        let x = Tensor::from_vec(tokens.clone(), &[b, t], Device::Cpu).unwrap();
        let ours = loaded.forward_train(&x).unwrap();
        assert_eq!(ours.shape(), &[b, t, v]);
        let ours = ours.to_vec_f64().unwrap();
        let want = reference_logits(&dir, &tokens, b, t);
        assert_eq!(ours.len(), want.len(), "reference logits have another size");
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let mut worst = 0f64;
        for (i, (a, r)) in ours.iter().zip(&want).enumerate() {
            if i % v == mask {
                assert_eq!(*a, -1000.0, "mask logit at flat index {i}");
                assert_eq!(*r, -1000.0);
                continue;
            }
            worst = worst.max((a - r).abs());
        }
        // the mask column dominates `scale`; relate the error to the real logits
        let real = want
            .iter()
            .enumerate()
            .filter(|(i, _)| i % v != mask)
            .fold(0f64, |m, (_, x)| m.max(x.abs()));
        let rel = worst / real;
        eprintln!(
            "{dtype}: max |ours - numpy| = {worst:.3e}, max |logit| = {real:.3} (scale incl. mask {scale}), relative {rel:.3e}"
        );
        assert!(real > 1.0, "logits too small to be a meaningful comparison");
        assert!(rel <= 1e-4, "{dtype}: relative error {rel:.3e} > 1e-4");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
