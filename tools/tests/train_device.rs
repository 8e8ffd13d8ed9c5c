//! `kfrun train --device emu`: the AR teacher trained on a kernel device (the CUDA sources on
//! the CPU emulator) through the same step loop and files as the CPU trainer. Checks, on a
//! 2-layer model with head dim 64 (the attention kernels' sizes) on the committed excerpt:
//! the device run's losses, grad norms and validation losses follow the CPU run's (f32
//! summation order apart); a device run stopped with --max-steps and resumed repeats the
//! uninterrupted device run bit for bit; a CPU checkpoint resumes on the device and a device
//! checkpoint on the CPU (same files). Then `kfrun distill --device emu` from that teacher
//! (AR -> 1 -> 2 -> 4 and the inversion variant) against `--device cpu`. With
//! `--features cuda` and a GPU the same runs use `--device cuda` as well.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kfrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(["--threads", "2"])
        .args(args)
        .output()
        .expect("kfrun runs")
}

fn ok(o: &Output) -> String {
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "kfrun failed:\n{se}\n{so}");
    so
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Tokenizer and shards of the excerpt, and a 4-step config with head dim 64, in `root`.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let corpus = repo("data/excerpt/corpus.jsonl");
    let (tok, shards) = (root.join("tok.json"), root.join("shards"));
    ok(&kfrun(&[
        "tokenizer",
        "train",
        "--corpus",
        s(&corpus),
        "--vocab-size",
        "300",
        "--out",
        s(&tok),
    ]));
    ok(&kfrun(&[
        "data",
        "prepare",
        "--corpus",
        s(&corpus),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&shards),
        "--val-fraction",
        "0.1",
        "--seed",
        "0",
    ]));
    // the shards' own tokenizer, found by `kfrun train` without --tokenizer
    std::fs::copy(&tok, shards.join("tokenizer.json")).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/tiny.json")).unwrap()).unwrap();
    cfg["model"] = serde_json::json!({"n_layers": 2, "d_model": 64, "n_heads": 1});
    for (k, v) in [
        ("batch_size", 2),
        ("seq_len", 12),
        ("grad_accum", 2),
        ("warmup_steps", 1),
        ("total_steps", 4),
        ("eval_every", 2),
        ("eval_windows", 3),
        ("checkpoint_every", 2),
    ] {
        cfg[k] = v.into();
    }
    let cfg_path = root.join("config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    (shards, cfg_path)
}

fn train(shards: &Path, cfg: &Path, out: &Path, device: &str, extra: &[&str]) -> String {
    let mut a = vec![
        "train",
        "--data",
        s(shards),
        "--out",
        s(out),
        "--device",
        device,
    ];
    if !extra.contains(&"--resume") {
        a.extend_from_slice(&["--config", s(cfg)]);
    }
    a.extend_from_slice(extra);
    ok(&kfrun(&a))
}

/// Every metrics line of a run: (step, loss, grad_norm, lr, val_loss).
fn metrics(out: &Path) -> Vec<(u64, f64, f64, f64, Option<f64>)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
                v["lr"].as_f64().unwrap(),
                v["val_loss"].as_f64(),
            )
        })
        .collect()
}

/// Every logged loss, grad norm and validation loss of a device run within this of the
/// CPU run's (relative): the f32 sums run in another order on the device.
const TOL: f64 = 1e-6;

fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    rel_diff(a, b) <= rel
}

/// Same steps, learning rates and validation points; losses, norms and validation losses
/// within `rel`.
fn follows(
    what: &str,
    got: &[(u64, f64, f64, f64, Option<f64>)],
    want: &[(u64, f64, f64, f64, Option<f64>)],
    rel: f64,
) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    let worst = got
        .iter()
        .zip(want)
        .flat_map(|(g, w)| {
            let v = g.4.zip(w.4).map_or(0.0, |(a, b)| rel_diff(a, b));
            [rel_diff(g.1, w.1), rel_diff(g.2, w.2), v]
        })
        .fold(0f64, f64::max);
    println!("{what}: largest relative difference of a loss, grad norm or val loss {worst:.2e}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.0, g.3), (w.0, w.3), "{what}: step / lr {g:?} vs {w:?}");
        assert!(close(g.1, w.1, rel), "{what}: loss {g:?} vs {w:?}");
        assert!(close(g.2, w.2, rel), "{what}: grad norm {g:?} vs {w:?}");
        match (g.4, w.4) {
            (Some(a), Some(b)) => assert!(close(a, b, rel), "{what}: val loss {g:?} vs {w:?}"),
            (None, None) => {}
            _ => panic!("{what}: validation at different steps {g:?} vs {w:?}"),
        }
    }
}

/// The run checks on one kernel device (`emu`, or `cuda` under the cuda feature).
fn runs_on(device: &str, root: &Path) {
    let (shards, cfg) = setup(root);
    let cpu = root.join("cpu");
    train(&shards, &cfg, &cpu, "cpu", &[]);
    let want = metrics(&cpu);
    assert_eq!(want.len(), 4);

    // the whole run on the device follows the CPU's
    let dev = root.join("dev");
    let text = train(&shards, &cfg, &dev, device, &[]);
    assert!(text.contains("trained 4 steps"), "{text}");
    let got = metrics(&dev);
    follows(&format!("{device} vs cpu"), &got, &want, TOL);
    for f in [
        "final/model.safetensors",
        "final/tokenizer.json",
        "ckpt/optimizer.safetensors",
    ] {
        assert!(dev.join(f).is_file(), "{device} run lacks {f}");
    }

    // stopped at step 2 and resumed on the device: the same run bit for bit
    let paused = root.join("paused");
    let text = train(&shards, &cfg, &paused, device, &["--max-steps", "2"]);
    assert!(text.contains("step 2"), "{text}");
    train(&shards, &cfg, &paused, device, &["--resume"]);
    assert_eq!(metrics(&paused), got, "{device}: resumed run differs");
    assert_eq!(
        std::fs::read(paused.join("final/model.safetensors")).unwrap(),
        std::fs::read(dev.join("final/model.safetensors")).unwrap(),
        "{device}: resumed weights differ"
    );

    // a CPU checkpoint continues on the device, a device checkpoint on the CPU
    for (first, then, tag) in [
        ("cpu", device, "cpu-then-dev"),
        (device, "cpu", "dev-then-cpu"),
    ] {
        let out = root.join(tag);
        train(&shards, &cfg, &out, first, &["--max-steps", "2"]);
        train(&shards, &cfg, &out, then, &["--resume"]);
        follows(tag, &metrics(&out), &want, TOL);
    }
    distill_on(device, root, &shards, &cpu.join("final"));
}

/// A recipe of three short stages (AR -> 1 -> 2 -> 4) on contexts of 6 tokens.
fn recipe(root: &Path) -> PathBuf {
    let mut r: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/distill-tiny.json")).unwrap())
            .unwrap();
    for (k, v) in [
        ("batch_size", 2),
        ("ctx_len", 6),
        ("eval_windows", 3),
        ("eval_every", 2),
        ("checkpoint_every", 2),
    ] {
        r[k] = v.into();
    }
    r["optim"]["warmup_steps"] = 1.into();
    r["optim"]["grad_accum"] = 2.into();
    r["stages"] = serde_json::json!([
        {"k": 1, "total_steps": 3},
        {"k": 2, "total_steps": 2},
        {"k": 4, "total_steps": 2}
    ]);
    let p = root.join("recipe.json");
    std::fs::write(&p, r.to_string()).unwrap();
    p
}

fn distill(
    teacher: &Path,
    shards: &Path,
    recipe: &Path,
    out: &Path,
    device: &str,
    extra: &[&str],
) -> String {
    let mut a = vec![
        "distill",
        "--teacher",
        s(teacher),
        "--data",
        s(shards),
        "--recipe",
        s(recipe),
        "--out",
        s(out),
        "--device",
        device,
    ];
    a.extend_from_slice(extra);
    if !extra.contains(&"--k") {
        a.extend_from_slice(&["--k", "4"]);
    }
    ok(&kfrun(&a))
}

/// Every step's training agreement (`acc`, from the training forward) in metrics.jsonl.
fn step_agreements(out: &Path) -> Vec<Option<f64>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["acc"].as_f64())
        .collect()
}

/// The validation agreement of each stage in a chain's summary.json.
fn agreements(out: &Path) -> Vec<f64> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| st["metrics"]["acc"].as_f64().unwrap())
        .collect()
}

/// `kfrun distill --device`: every stage's losses, norms and validation follow the CPU's
/// (the teacher's targets made on the device: stage 1's inverse-CDF map, the k -> 2k
/// rollout, the inversion variant's logits), the agreements are the CPU's, and a chain
/// stopped inside a stage and resumed ends with the same student bit for bit.
fn distill_on(device: &str, root: &Path, shards: &Path, teacher: &Path) {
    let recipe = recipe(root);
    let (cpu, dev) = (root.join("d-cpu"), root.join("d-dev"));
    distill(teacher, shards, &recipe, &cpu, "cpu", &[]);
    let text = distill(teacher, shards, &recipe, &dev, device, &[]);
    assert!(text.contains("k=4"), "{text}");
    for k in ["k1", "k2", "k4"] {
        follows(
            &format!("distill {k}: {device} vs cpu"),
            &metrics(&dev.join(k)),
            &metrics(&cpu.join(k)),
            TOL,
        );
    }
    assert_eq!(
        agreements(&dev),
        agreements(&cpu),
        "{device}: agreements differ"
    );
    for k in ["k1", "k2", "k4"] {
        let (a, b) = (step_agreements(&dev.join(k)), step_agreements(&cpu.join(k)));
        assert!(
            a.iter().all(Option::is_some),
            "{device} {k}: steps without acc: {a:?}"
        );
        assert_eq!(a, b, "{device} {k}: per-step agreements differ");
    }

    let paused = root.join("d-paused");
    let text = distill(
        teacher,
        shards,
        &recipe,
        &paused,
        device,
        &["--max-steps", "1"],
    );
    assert!(text.contains("stopped stage k = 1 at step 1"), "{text}");
    distill(teacher, shards, &recipe, &paused, device, &["--resume"]);
    for k in ["k1", "k2", "k4"] {
        let f = |d: &Path| std::fs::read(d.join(k).join("final/model.safetensors")).unwrap();
        assert!(
            f(&paused) == f(&dev),
            "{device} {k}: the resumed student differs"
        );
    }

    let (icpu, idev) = (root.join("i-cpu"), root.join("i-dev"));
    let inv = ["--variant", "inversion", "--k", "2"];
    distill(teacher, shards, &recipe, &icpu, "cpu", &inv);
    distill(teacher, shards, &recipe, &idev, device, &inv);
    for k in ["k1", "k2"] {
        follows(
            &format!("inversion {k}: {device} vs cpu"),
            &metrics(&idev.join(k)),
            &metrics(&icpu.join(k)),
            TOL,
        );
    }
    assert_eq!(
        agreements(&idev),
        agreements(&icpu),
        "{device}: inversion agreements differ"
    );
}

#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "the emulator run is the cuda-less build's (CI runs it there); this build checks the GPU"
)]
fn training_and_distillation_on_the_emulator_follow_the_cpu_and_resume_exactly() {
    let root = std::env::temp_dir().join(format!("kfrun-train-emu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    runs_on("emu", &root);
    let _ = std::fs::remove_dir_all(&root);
}

/// The same on a GPU (`--features cuda`); skipped with the reason without one
/// (KF_REQUIRE_GPU=1 makes that a failure).
#[cfg(feature = "cuda")]
#[test]
fn training_and_distillation_on_a_gpu_follow_the_cpu_and_resume_exactly() {
    if let Err(e) = kf_engine::cuda::CudaDevice::get(0) {
        assert!(
            std::env::var("KF_REQUIRE_GPU").is_err(),
            "KF_REQUIRE_GPU is set but there is no GPU: {e:#}"
        );
        println!("skipped: no usable GPU ({e:#})");
        return;
    }
    let root = std::env::temp_dir().join(format!("kfrun-train-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    runs_on("cuda", &root);
    let _ = std::fs::remove_dir_all(&root);
}
