//! `kfrun bench` (generation throughput) end to end on the tiny architecture: every
//! (mode, K, batch) row is present in the JSON with consistent fields, the plot is written,
//! and bad flags give one clear error.

use std::process::Command;

fn kfrun(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("kfrun runs")
}

/// `kfrun bench ARGS --json FILE`, which must succeed: its stdout and the parsed JSON.
fn bench_json(args: &[&str], json: &std::path::Path) -> (String, serde_json::Value) {
    let o = kfrun(&[args, &["--json", json.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (String::from_utf8_lossy(&o.stdout).into_owned(), j)
}

#[test]
fn generation_bench_rows_and_plot() {
    let dir = std::env::temp_dir().join(format!("kfrun-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let tiny = [
        "bench",
        "--arch",
        "tiny",
        "--k",
        "2",
        "--runs",
        "1",
        "--max-new",
        "5",
    ];
    let (out, j) = bench_json(
        &[
            &tiny[..],
            &["--batches", "1,3", "--plot", svg.to_str().unwrap()],
        ]
        .concat(),
        &json,
    );
    assert!(
        out.contains("batch-1 AR decode reads") && out.contains("MB a step"),
        "{out}"
    );
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * 3, "AR + K = 1, 2 at two batch sizes");
    for r in rows {
        let tps = r["tokens_per_s"].as_f64().unwrap();
        assert!(tps > 0.0, "{r}");
        let b = r["batch"].as_u64().unwrap();
        let med = r["median_s"].as_f64().unwrap();
        assert!((tps * med - (b * 5) as f64).abs() < 1e-6 * tps * med, "{r}");
        match r["mode"].as_str().unwrap() {
            "ar" => assert!(r["speedup"].is_null()),
            _ => {
                assert!(r["speedup"].as_f64().unwrap() > 0.0);
                let p = r["predicted_speedup"].as_f64().unwrap();
                let k = r["k"].as_f64().unwrap();
                assert!(p > 0.0 && p <= k + 1e-9, "{r}");
                // K = 2 needs fewer passes per token than AR
                if k == 2.0 {
                    assert!(r["passes_per_token"].as_f64().unwrap() <= 0.8, "{r}");
                }
            }
        }
    }
    assert!(j["machine"]["copy_gb_s"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("K = 2"));
    // the matrices in 8-bit blocks: a step reads about a quarter of the f32 bytes
    let qjson = dir.join("q.json");
    let (_, q) = bench_json(
        &[&tiny[..], &["--batches", "1", "--dtype", "q8_0"]].concat(),
        &qjson,
    );
    let (wq, wf) = (
        q["weight_bytes"].as_f64().unwrap(),
        j["weight_bytes"].as_f64().unwrap(),
    );
    assert!(
        wq < 0.5 * wf && wq > 0.2 * wf,
        "q8_0 {wq} vs f32 {wf} bytes a step"
    );
    let bad = kfrun(&[
        "bench", "--arch", "tiny", "--dtype", "q4_0", "--device", "emu",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("CPU only"));
    let bad = kfrun(&["bench"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--arch"));
    let bad = kfrun(&["bench", "--arch", "huge", "--runs", "1"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown model preset"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--device emu`: the AR and PFLM runs go through the CUDA kernels on the emulator (the
/// shipped student: head dim 64); the JSON names the device and has every (mode, K) row.
#[test]
fn generation_bench_runs_on_the_emulated_kernels() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let json = std::env::temp_dir().join(format!("kfrun-bench-emu-{}.json", std::process::id()));
    let student = root.join("models/default/student");
    let (_, j) = bench_json(
        &[
            "bench",
            "--model",
            student.to_str().unwrap(),
            "--batches",
            "1",
            "--max-new",
            "4",
            "--runs",
            "1",
            "--device",
            "emu",
        ],
        &json,
    );
    assert_eq!(j["device"], "emu");
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "AR + PFLM K = 1..4: {rows:?}");
    assert!(rows
        .iter()
        .all(|r| r["tokens_per_s"].as_f64().unwrap() > 0.0));
    let _ = std::fs::remove_file(&json);
}

/// `--peer torch` without a usable interpreter still prints our rows and says why the peer did
/// not run (the JSON records it); with `--device` other than cpu it is one clear error.
#[test]
fn torch_peer_missing_is_reported_not_fatal() {
    let json = std::env::temp_dir().join(format!("kfrun-bench-peer-{}.json", std::process::id()));
    let o = kfrun(&[
        "bench",
        "--arch",
        "tiny",
        "--k",
        "1",
        "--batches",
        "1",
        "--runs",
        "1",
        "--max-new",
        "2",
        "--peer",
        "torch",
        "--python",
        "/nonexistent/python3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("peer: PyTorch not run: cannot run /nonexistent/python3"),
        "{out}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(j["peer"]["error"].as_str().unwrap().contains("cannot run"));
    assert_eq!(j["rows"].as_array().unwrap().len(), 2);
    let _ = std::fs::remove_file(&json);
    let bad = kfrun(&[
        "bench", "--arch", "tiny", "--peer", "torch", "--device", "emu",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--peer torch compares the CPU"));
}

/// `kfrun bench llama` on SmolLM2 (needs KF_SMOLLM2_GGUF, as the parity tests; CI sets it),
/// ours only (the llama.cpp side needs llama-cpp-python): a row of positive speeds in the
/// JSON; a file that is no model is one clear error.
#[test]
fn llama_bench_reports_our_speeds_and_refuses_a_non_model() {
    let dir = std::env::temp_dir().join(format!("kfrun-bench-llama-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("x.gguf");
    std::fs::write(&bogus, b"not a gguf file at all").unwrap();
    let o = kfrun(&[
        "bench",
        "llama",
        "--model",
        bogus.to_str().unwrap(),
        "--no-peer",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("x.gguf") && !err.contains("panicked"), "{err}");
    let Some(gguf) = std::env::var_os("KF_SMOLLM2_GGUF") else {
        eprintln!(
            "skipped the SmolLM2 half: set KF_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf"
        );
        return;
    };
    let json = dir.join("l.json");
    let o = kfrun(&[
        "bench",
        "llama",
        "--model",
        gguf.to_str().unwrap(),
        "--no-peer",
        "--new",
        "8",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("llama.cpp: not run (--no-peer)"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in ["decode_tok_s", "prefill_tok_s"] {
        let x = v["ours"][k].as_f64().unwrap();
        assert!(x.is_finite() && x > 0.0, "{k} = {x}");
    }
    assert!(v["llama_cpp"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}
