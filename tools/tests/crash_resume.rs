//! Crash safety (issue 8.2): `kfrun train` and `kfrun distill` on tiny configs are killed
//! with SIGKILL at seeded random moments, 20 times each, and resumed with --resume after
//! every kill. After each kill every checkpoint and model directory on disk must load
//! (config, weights, optimizer state, trainer.json), and the checkpoint a resume would pick
//! is never a temporary directory; at the end no temporary file or directory is left, and
//! the final model and every logged loss equal an uninterrupted run's with the same seed
//! (one thread, so bit-exact).

use kf_model::train::checkpoint::{self, TrainerState};
use kf_model::train::{OptimConfig, Trainer};
use kf_model::{Ddit, DditConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Kills per command.
const KILLS: usize = 20;

fn kfrun_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kfrun"));
    c.args(["--threads", "1"]).args(args);
    c
}

fn ok(args: &[&str]) -> Output {
    let o = kfrun_cmd(args).output().expect("kfrun runs");
    assert!(
        o.status.success(),
        "kfrun {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kf-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tokenizer and shards of the committed excerpt in `root`.
fn prepare(root: &Path) -> (PathBuf, PathBuf) {
    let corpus = repo("data/excerpt/corpus.jsonl");
    let (tok, shards) = (root.join("tok.json"), root.join("shards"));
    ok(&[
        "tokenizer",
        "train",
        "--corpus",
        s(&corpus),
        "--vocab-size",
        "320",
        "--out",
        s(&tok),
    ]);
    ok(&[
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
    ]);
    (tok, shards)
}

/// A tiny teacher config: a checkpoint every other step, so kills land in and between
/// checkpoint writes.
fn teacher_config(root: &Path, steps: u64) -> PathBuf {
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/tiny.json")).unwrap()).unwrap();
    c["total_steps"] = steps.into();
    c["warmup_steps"] = 4.into();
    c["batch_size"] = 4.into();
    c["seq_len"] = 32.into();
    c["eval_every"] = 10.into();
    c["eval_windows"] = 4.into();
    c["checkpoint_every"] = 2.into();
    let p = root.join("teacher.json");
    std::fs::write(&p, c.to_string()).unwrap();
    p
}

fn recipe(root: &Path) -> PathBuf {
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/distill-tiny.json")).unwrap())
            .unwrap();
    c["batch_size"] = 2.into();
    c["ctx_len"] = 16.into();
    c["eval_windows"] = 2.into();
    c["eval_every"] = 4.into();
    c["checkpoint_every"] = 2.into();
    c["stages"] = serde_json::json!([
        {"k": 1, "total_steps": 10},
        {"k": 2, "total_steps": 8},
        {"k": 4, "total_steps": 8}
    ]);
    let p = root.join("recipe.json");
    std::fs::write(&p, c.to_string()).unwrap();
    p
}

/// Every directory under `root` (recursively) that holds a `model.safetensors`, and the
/// temporary names found.
fn scan(root: &Path, models: &mut Vec<PathBuf>, temps: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp") {
            temps.push(e.path());
        }
        if e.file_type().unwrap().is_dir() {
            if name.contains(".tmp") {
                continue; // a half-written directory: never loaded, removed on resume
            }
            if e.path().join("model.safetensors").exists() {
                models.push(e.path());
            }
            scan(&e.path(), models, temps);
        }
    }
}

/// Loads a model directory, and its training state when it is a checkpoint.
fn check_loads(dir: &Path) {
    let cfg = DditConfig::from_file(&dir.join("config.json"))
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    let params = if cfg.k.is_some() {
        kf_model::pflm::Pflm::load(dir)
            .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
            .params()
    } else {
        Ddit::load(dir)
            .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
            .params()
            .to_vec()
    };
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{}: no tokenizer.json",
        dir.display()
    );
    if dir.join(checkpoint::TRAINER_FILE).exists() || dir.ends_with("ckpt") {
        let st = TrainerState::read(dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        let opt = OptimConfig {
            lr: 1e-3,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 1000,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 0.0,
            grad_accum: 1,
        };
        let trainable: Vec<_> = params.iter().map(|(n, t)| (n.clone(), t.var())).collect();
        let mut tr = Trainer::new(&trainable, opt).unwrap();
        tr.load_optimizer(&dir.join(checkpoint::OPTIMIZER_FILE), st.step)
            .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    }
}

/// Checks every model directory under `out` and that the checkpoint a resume would take
/// (`checkpoint::find`) is not a temporary one. Returns the temporaries seen.
fn check_disk(out: &Path) -> Vec<PathBuf> {
    let (mut models, mut temps) = (Vec::new(), Vec::new());
    if out.exists() {
        scan(out, &mut models, &mut temps);
    }
    for m in &models {
        check_loads(m);
    }
    for stage in std::iter::once(out.to_path_buf()).chain(
        ["k1", "k2", "k4"]
            .iter()
            .map(|k| out.join(k))
            .filter(|p| p.exists()),
    ) {
        if let Some(c) = checkpoint::find(&stage) {
            assert!(
                !c.to_string_lossy().contains(".tmp"),
                "resume would take {}",
                c.display()
            );
        }
    }
    temps
}

/// Runs `args` (which must hold --resume) to completion, killing it `KILLS` times at
/// seeded random moments first (each within 5% of an
/// uninterrupted run's wall time `expected` from its start). Returns (kills, cycles, temps
/// seen right after kills).
fn kill_and_resume(
    args: &[&str],
    out: &Path,
    done: &Path,
    expected: Duration,
    seed: u64,
) -> (usize, usize) {
    let mut rng = Rng(seed);
    let (mut kills, mut cycles, mut temps_seen) = (0usize, 0usize, 0usize);
    let mut kills_before_done = 0usize;
    // the kill moments: mostly small fractions of a whole run (every cycle makes some
    // progress), some right at start-up
    while kills < KILLS {
        cycles += 1;
        assert!(
            cycles < 10 * KILLS,
            "the run keeps finishing before the kill"
        );
        let frac = if rng.unit() < 0.25 { 0.02 } else { 0.05 };
        let delay = expected.mul_f64(frac * rng.unit());
        let mut child = kfrun_cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kfrun starts");
        let t = Instant::now();
        let mut finished = false;
        while t.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !finished && child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
            kills_before_done += !done.exists() as usize;
        }
        let st = child.wait().unwrap();
        if finished {
            assert!(st.success(), "kfrun {args:?} failed on its own: {st}");
        }
        temps_seen += check_disk(out).len();
    }
    // and to the end
    ok(args);
    eprintln!(
        "{}: {kills} SIGKILLs in {cycles} runs, {kills_before_done} before the final model \
         existed ({temps_seen} temporaries seen right after kills)",
        args[0]
    );
    // most kills must land while training (not while re-finishing a finished run)
    assert!(
        kills_before_done >= KILLS / 2,
        "only {kills_before_done} kills during training"
    );
    (kills, cycles)
}

fn losses(metrics: &Path) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].to_string(),
                v["val_loss"].to_string(),
            )
        })
        .collect()
}

fn assert_no_temps(out: &Path) {
    let temps = check_disk(out);
    assert!(temps.is_empty(), "temporaries left: {temps:?}");
    let mut models = Vec::new();
    scan(out, &mut models, &mut Vec::new());
    assert!(
        !models
            .iter()
            .any(|m| m.to_string_lossy().ends_with(".prev")),
        "ckpt.prev left: {models:?}"
    );
}

#[test]
fn train_survives_sigkill_and_resumes_exactly() {
    let root = tmp("train");
    let (tok, shards) = prepare(&root);
    let cfg = teacher_config(&root, 80);
    let (reference, killed) = (root.join("ref"), root.join("killed"));
    let t = Instant::now();
    ok(&[
        "train",
        "--config",
        s(&cfg),
        "--data",
        s(&shards),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&reference),
    ]);
    let expected = t.elapsed();
    let args = [
        "train",
        "--config",
        s(&cfg),
        "--data",
        s(&shards),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&killed),
        "--resume",
    ];
    let (kills, _) = kill_and_resume(&args, &killed, &killed.join("final"), expected, 0x5EED_0001);
    assert_eq!(kills, KILLS);
    assert_no_temps(&killed);
    for f in ["final/model.safetensors", "ckpt/model.safetensors"] {
        assert!(
            std::fs::read(reference.join(f)).unwrap() == std::fs::read(killed.join(f)).unwrap(),
            "{f} differs from the uninterrupted run's"
        );
    }
    assert_eq!(
        losses(&reference.join("metrics.jsonl")),
        losses(&killed.join("metrics.jsonl"))
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn distill_survives_sigkill_and_resumes_exactly() {
    let root = tmp("distill");
    let (tok, shards) = prepare(&root);
    let cfg = teacher_config(&root, 20);
    let teacher = root.join("teacher");
    ok(&[
        "train",
        "--config",
        s(&cfg),
        "--data",
        s(&shards),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&teacher),
    ]);
    let teacher = teacher.join("final");
    let rec = recipe(&root);
    let (reference, killed) = (root.join("ref"), root.join("killed"));
    let base = |out: &Path| -> Vec<String> {
        [
            "distill",
            "--teacher",
            s(&teacher),
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--recipe",
            s(&rec),
            "--k",
            "4",
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let t = Instant::now();
    let r: Vec<String> = base(&reference);
    ok(&r.iter().map(String::as_str).collect::<Vec<_>>());
    let expected = t.elapsed();
    let mut a = base(&killed);
    a.push("--resume".into());
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    let (kills, _) = kill_and_resume(
        &args,
        &killed,
        &killed.join("k4/final"),
        expected,
        0x5EED_0002,
    );
    assert_eq!(kills, KILLS);
    assert_no_temps(&killed);
    for k in ["k1", "k2", "k4"] {
        let f = format!("{k}/final/model.safetensors");
        assert!(
            std::fs::read(reference.join(&f)).unwrap() == std::fs::read(killed.join(&f)).unwrap(),
            "{f} differs from the uninterrupted run's"
        );
        assert_eq!(
            losses(&reference.join(k).join("metrics.jsonl")),
            losses(&killed.join(k).join("metrics.jsonl")),
            "{k}: losses differ"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}
