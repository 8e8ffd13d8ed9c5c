//! `kfrun bench kernels`: on the emulator every kernel family the model's forward, decode and
//! training step use is timed and reported with consistent fields (bytes, FLOPs, GB/s of the cost model's
//! traffic); a GPU device on a build or machine without one is one clear error.

use serde_json::Value;
use std::process::Command;

fn kfrun(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("kfrun runs")
}

#[test]
fn every_family_runs_on_the_emulator() {
    let dir = std::env::temp_dir().join(format!("kfrun-bk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("k.json");
    let o = kfrun(&[
        "bench",
        "kernels",
        "--device",
        "emu",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}\n{err}");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["device"], "emu");
    assert!(j["copy_gb_s"].as_f64().unwrap() > 0.0);
    assert!(j["gemm_gflop_s"].as_f64().unwrap() > 0.0);
    let rows = j["rows"].as_array().unwrap();
    let fams: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["family"].as_str().unwrap()).collect();
    for f in [
        "elementwise",
        "gelu",
        "layernorm",
        "embedding",
        "rope",
        "attention",
        "softmax",
        "sampling",
        "argmax",
        "noise",
        "philox",
        "gemm",
        "cross_entropy",
        "adamw",
        "reduce",
        "gemv",
    ] {
        assert!(fams.contains(f), "no row for family {f}: {fams:?}");
    }
    for r in rows {
        let (us, bytes, gb) = (
            r["median_us"].as_f64().unwrap(),
            r["bytes"].as_f64().unwrap(),
            r["gb_s"].as_f64().unwrap(),
        );
        assert!(us > 0.0 && bytes > 0.0, "{r}");
        // GB/s is the cost model's bytes over the measured time
        assert!((gb - bytes / us / 1e3).abs() <= 1e-9 * gb.max(1.0), "{r}");
        assert!(
            out.contains(r["kernel"].as_str().unwrap()),
            "table lacks {r}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gpu_without_one_is_one_error() {
    let o = kfrun(&["bench", "kernels", "--device", "cuda", "--runs", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--device cuda"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for (dev, want) in [("cpu", "runs the CUDA kernels"), ("tpu", "unknown device")] {
        let o = kfrun(&["bench", "kernels", "--device", dev]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "--device {dev}: {err}");
    }
    let o = kfrun(&["bench", "kernels", "--device", "emu", "--size", "huge"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--size huge"), "{err}");
}
