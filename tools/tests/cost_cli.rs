//! `kfrun bench cost` end to end: the printed tables and the JSON agree (tokens/s are
//! batch / step time, speedups are the ratio of the two tokens/s), every requested batch
//! has a row in every mode, and bad flags give one clear error.

use std::process::Command;

fn kfrun(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(args)
        .output()
        .expect("kfrun runs")
}

#[test]
fn cost_command_json_and_errors() {
    let dir = std::env::temp_dir().join(format!("kfrun-cost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("cost.json");
    let o = kfrun(&[
        "bench",
        "cost",
        "--batches",
        "1,3,64",
        "--k",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("| batch | AR tokens/s | PFLM K=2 tokens/s |"),
        "{out}"
    );
    assert!(out.contains("### PFLM step, batch 64"), "{out}");
    assert!(
        out.contains("| sample_inverse_cdf |") && out.contains("| adamw |"),
        "{out}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let modes = j["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 3);
    for m in modes {
        let rows = m["rows"].as_array().unwrap();
        let batches: Vec<u64> = rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, [1, 3, 64]);
        for r in rows {
            let b = r["batch"].as_f64().unwrap();
            let ar = r["ar_tokens_per_s"].as_f64().unwrap();
            let pf = r["pflm_tokens_per_s"].as_f64().unwrap();
            let ar_t = r["ar_step"]["total_s"].as_f64().unwrap();
            let pf_t = r["pflm_step"]["total_s"].as_f64().unwrap();
            assert!((ar * ar_t - b).abs() < 1e-9 * b, "{r}");
            assert!((pf * pf_t - 2.0 * b).abs() < 1e-9 * b, "{r}");
            let sp = r["speedup"].as_f64().unwrap();
            assert!((sp - pf / ar).abs() < 1e-9 * sp, "{r}");
            assert!(sp > 1.0 && sp < 2.0, "K = 2: {r}");
            // the step's total is its three parts
            let s = &r["pflm_step"];
            let parts = s["mem_s"].as_f64().unwrap()
                + s["comp_s"].as_f64().unwrap()
                + s["overhead_s"].as_f64().unwrap();
            assert!((parts - pf_t).abs() < 1e-12, "{r}");
        }
    }
    // the per-kernel tables: AR and PFLM at the two default batches
    assert_eq!(j["kernels"].as_array().unwrap().len(), 4);
    assert_eq!(j["config"]["d_model"].as_u64(), Some(768));
    let bad = kfrun(&["bench", "cost", "--dtype", "fp8"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--dtype"));
    let bad = kfrun(&["bench", "cost", "--arch", "huge"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown model preset"));
    let bad = kfrun(&["bench", "cost", "--batches", "0"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--batches"));
    let _ = std::fs::remove_dir_all(&dir);
}
