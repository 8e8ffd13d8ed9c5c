//! kfrun end to end: --help, init-weights + inspect, and malformed files
//! (truncated, random bytes, missing) giving one clear error line and a
//! non-zero exit, never a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

fn kfrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(args)
        .output()
        .expect("kfrun runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kfrun-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn assert_one_clear_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    assert_eq!(
        o.status.code(),
        Some(1),
        "errors exit with 1 (not a panic's 101)"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

#[test]
fn help_lists_subcommands() {
    let o = kfrun(&["--help"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for c in ["inspect", "init-weights", "bench"] {
        assert!(s.contains(c), "--help lacks {c}");
    }
}

#[test]
fn init_weights_then_inspect() {
    let p = tmp("tiny.safetensors");
    let o = kfrun(&["init-weights", "--out", p.to_str().unwrap(), "--student"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kfrun(&["inspect", p.to_str().unwrap()]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    let row = s
        .lines()
        .find(|l| l.starts_with("blocks.1.attn_qkv.weight "))
        .expect("qkv row");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["blocks.1.attn_qkv.weight", "F32", "[192,", "64]", "49152"]
    );
    assert!(s.contains("noise_encoder.combined_proj.weight"));
    assert!(s.contains("28 tensors"), "{s}");
    let o = kfrun(&["inspect", "--json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tensors"].as_array().unwrap().len(), 28);
}

#[test]
fn malformed_files_give_one_clear_error() {
    let good = tmp("good.safetensors");
    assert!(kfrun(&["init-weights", "--out", good.to_str().unwrap()])
        .status
        .success());
    let bytes = std::fs::read(&good).unwrap();

    // truncated inside the data section
    let t = tmp("trunc.safetensors");
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_clear_error(&kfrun(&["inspect", t.to_str().unwrap()]), "truncated");
    // truncated inside the header
    std::fs::write(&t, &bytes[..100]).unwrap();
    assert_one_clear_error(&kfrun(&["inspect", t.to_str().unwrap()]), "truncated");
    // random bytes (deterministic)
    let mut x = 0x1234_5678_9abc_def0u64;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let r = tmp("random.safetensors");
    std::fs::write(&r, &junk).unwrap();
    assert_one_clear_error(
        &kfrun(&["inspect", r.to_str().unwrap()]),
        "random.safetensors",
    );
    // empty file, missing file
    std::fs::write(&t, b"").unwrap();
    assert_one_clear_error(
        &kfrun(&["inspect", t.to_str().unwrap()]),
        "trunc.safetensors",
    );
    assert_one_clear_error(
        &kfrun(&["inspect", "/nonexistent/x.safetensors"]),
        "cannot open",
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let o = kfrun(&["inspect"]);
    assert_eq!(o.status.code(), Some(2));
    let o = kfrun(&[
        "init-weights",
        "--out",
        "/tmp/x.safetensors",
        "--preset",
        "huge",
    ]);
    assert_one_clear_error(&o, "unknown --preset");
    let o = kfrun(&["--threads", "0", "inspect", "x"]);
    assert_one_clear_error(&o, "--threads");
}
