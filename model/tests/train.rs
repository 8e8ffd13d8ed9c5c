//! Teacher training on the committed excerpt with a `tiny` model: exact resume (also
//! after a simulated crash and after a stop request), NaN stop keeping the last good
//! checkpoint, one clear error per malformed checkpoint file and per bad config.

use kf_model::data::{self, read_corpus, PrepareOptions};
use kf_model::tokenizer::{BpeTrainOptions, Tokenizer};
use kf_model::train::{self, Event, Outcome, TeacherOptions, TrainerState};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "kf-train-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The excerpt tokenised with a 512-id BPE; the tokenizer sits in the data dir.
fn data_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/excerpt/corpus.jsonl");
        let docs = read_corpus(&corpus).unwrap();
        let tok = Tokenizer::train_bpe(
            docs.iter().map(|d| d.text.as_str()),
            &BpeTrainOptions {
                vocab_size: 512,
                min_frequency: 2,
            },
        )
        .unwrap();
        let out = scratch("data");
        tok.save(out.join("tokenizer.json")).unwrap();
        data::prepare(
            &corpus,
            &out.join("tokenizer.json"),
            &out,
            &PrepareOptions {
                val_fraction: 0.1,
                seed: 1,
            },
        )
        .unwrap();
        out
    })
}

/// The repository's tiny config with overrides, written into `dir/config.json`.
fn config(dir: &Path, edits: &[(&str, Value)]) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(base).unwrap()).unwrap();
    for (k, x) in edits {
        v[*k] = x.clone();
    }
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    p
}

/// 20 steps in micro-batches of 4 x 2, validation and checkpoints every 5 steps.
fn short(dir: &Path) -> PathBuf {
    config(
        dir,
        &[
            ("total_steps", 20.into()),
            ("warmup_steps", 4.into()),
            ("batch_size", 4.into()),
            ("grad_accum", 2.into()),
            ("eval_every", 5.into()),
            ("eval_windows", 16.into()),
            ("checkpoint_every", 5.into()),
        ],
    )
}

fn opts(cfg: Option<PathBuf>, out: &Path) -> TeacherOptions {
    TeacherOptions {
        config: cfg,
        data: data_dir().clone(),
        tokenizer: None,
        out: out.to_path_buf(),
        resume: false,
        max_steps: None,
        stop: None,
        comm: None,
    }
}

fn train_quiet(o: &TeacherOptions) -> anyhow::Result<Outcome> {
    train::train_teacher(o, &mut |_| {})
}

/// The deterministic fields of every metrics line.
fn trajectory(out: &Path) -> Vec<(u64, u64, u64, u64, Option<u64>)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap().to_bits();
            (
                v["step"].as_u64().unwrap(),
                f("loss"),
                f("grad_norm"),
                f("lr"),
                v.get("val_loss").map(|x| x.as_f64().unwrap().to_bits()),
            )
        })
        .collect()
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One uninterrupted 20-step run, shared by the tests that compare against it.
fn reference() -> &'static PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let out = scratch("reference");
        let cfg = short(&out);
        let o = train_quiet(&opts(Some(cfg), &out.join("run"))).unwrap();
        assert!(matches!(o, Outcome::Finished { step: 20, .. }), "{o:?}");
        out.join("run")
    })
}

fn assert_same_run(a: &Path, b: &Path) {
    let (ta, tb) = (trajectory(a), trajectory(b));
    assert_eq!(ta.len(), 20);
    assert_eq!(ta, tb, "loss trajectories differ");
    assert_eq!(ta.iter().filter(|t| t.4.is_some()).count(), 4);
    assert!(
        bytes(&a.join("final/model.safetensors")) == bytes(&b.join("final/model.safetensors")),
        "final parameters differ"
    );
    assert!(
        bytes(&a.join("ckpt/optimizer.safetensors"))
            == bytes(&b.join("ckpt/optimizer.safetensors")),
        "final optimizer states differ"
    );
}

#[test]
fn training_lowers_the_loss_and_writes_the_run_directory() {
    let r = reference();
    let t = trajectory(r);
    let first = f64::from_bits(t[0].1);
    let last_val = f64::from_bits(t[19].4.unwrap());
    assert!(
        first > 5.5,
        "initial loss {first} should be near ln 512 = 6.24"
    );
    assert!(
        last_val < first - 0.7,
        "val loss {last_val} did not drop from {first}"
    );
    for f in [
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "loss.svg",
        "summary.json",
    ] {
        assert!(r.join(f).is_file(), "{f} missing");
    }
    assert!(bytes(&r.join("final/tokenizer.json")) == bytes(&data_dir().join("tokenizer.json")));
    let st = TrainerState::read(&r.join("ckpt")).unwrap();
    assert_eq!(st.step, 20);
    assert_eq!(st.tokens_seen, 20 * 8 * 64);
    assert_eq!(
        st.metrics_bytes,
        std::fs::metadata(r.join("metrics.jsonl")).unwrap().len()
    );
    let svg = std::fs::read_to_string(r.join("loss.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("validation loss"));
    // only the checkpoint, the final model and the files: no temporary directories
    let mut names: Vec<String> = std::fs::read_dir(r)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["ckpt", "final", "loss.svg", "metrics.jsonl", "summary.json"]
    );
    // the final directory is a model directory
    let m = kf_model::ddit::Ddit::load(&r.join("final")).unwrap();
    assert_eq!(m.cfg.vocab_size, 512);
}

/// Stop at step 8 (--max-steps), simulate a crash after it (metrics lines of later steps,
/// a half-written temporary directory, the checkpoint caught between its two renames),
/// resume: the same losses and the same final bytes as the uninterrupted run.
#[test]
fn resume_after_a_crash_reproduces_the_uninterrupted_run() {
    let out = scratch("crash");
    let cfg = short(&out);
    let run = out.join("run");
    let mut o = opts(Some(cfg.clone()), &run);
    o.max_steps = Some(8);
    match train_quiet(&o).unwrap() {
        Outcome::Paused { step: 8, .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(!run.join("final").exists());
    // what a kill at step 11, in the middle of a checkpoint, leaves behind
    let mut m = std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("metrics.jsonl"))
        .unwrap();
    use std::io::Write;
    writeln!(
        m,
        "{{\"step\":9,\"loss\":1.0}}\n{{\"step\":10,\"loss\":1.0}}\n{{\"step\":11,\"lo"
    )
    .unwrap();
    drop(m);
    std::fs::create_dir_all(run.join("ckpt.tmp-4242")).unwrap();
    std::fs::write(run.join("ckpt.tmp-4242/model.safetensors"), b"half").unwrap();
    std::fs::rename(run.join("ckpt"), run.join("ckpt.prev")).unwrap();

    // without --resume the run refuses to overwrite the checkpoint
    let e = format!(
        "{:#}",
        train_quiet(&opts(Some(cfg.clone()), &run)).unwrap_err()
    );
    assert!(e.contains("--resume"), "{e}");

    let mut o = opts(None, &run);
    o.resume = true;
    let mut resumed_at = None;
    let r = train::train_teacher(&o, &mut |ev| {
        if let Event::Start {
            step, resumed_from, ..
        } = ev
        {
            resumed_at = Some((*step, resumed_from.map(|p| p.to_path_buf())));
        }
    })
    .unwrap();
    assert!(matches!(r, Outcome::Finished { step: 20, .. }), "{r:?}");
    assert_eq!(resumed_at, Some((8, Some(run.join("ckpt.prev")))));
    assert!(
        !run.join("ckpt.tmp-4242").exists(),
        "stale temporary directory left"
    );
    assert!(!run.join("ckpt.prev").exists());
    assert_same_run(reference(), &run);
}

/// A stop request (what Ctrl-C sets) ends the run after the current step with a
/// checkpoint; resuming finishes it exactly like the uninterrupted run.
#[test]
fn stop_request_checkpoints_and_resumes_exactly() {
    let out = scratch("stop");
    let cfg = short(&out);
    let run = out.join("run");
    let stop = Arc::new(AtomicBool::new(false));
    let mut o = opts(Some(cfg.clone()), &run);
    o.stop = Some(stop.clone());
    let r = train::train_teacher(&o, &mut |ev| {
        if let Event::Step(rec) = ev {
            if rec.step == 13 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    match r {
        Outcome::Interrupted {
            step: 13,
            checkpoint,
        } => {
            assert_eq!(TrainerState::read(&checkpoint).unwrap().step, 13)
        }
        other => panic!("{other:?}"),
    }
    // resuming with the same config file given again is fine
    let mut o = opts(Some(cfg), &run);
    o.resume = true;
    assert!(matches!(
        train_quiet(&o).unwrap(),
        Outcome::Finished { step: 20, .. }
    ));
    assert_same_run(reference(), &run);
    // resuming a finished run only rewrites the final directory
    assert!(matches!(
        train_quiet(&o).unwrap(),
        Outcome::Finished { step: 20, .. }
    ));
    assert_eq!(trajectory(&run).len(), 20);
}

#[test]
fn nan_stops_training_and_keeps_the_last_good_checkpoint() {
    let out = scratch("nan");
    let cfg = config(
        &out,
        &[
            ("lr", 1e5.into()),
            ("min_lr", 0.0.into()),
            ("warmup_steps", 0.into()),
            ("checkpoint_every", 1.into()),
        ],
    );
    let run = out.join("run");
    let e = format!("{:#}", train_quiet(&opts(Some(cfg), &run)).unwrap_err());
    assert!(!e.contains('\n'), "one line: {e}");
    let step: u64 = e
        .strip_prefix("step ")
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("the message starts with the step: {e}"));
    assert!(e.contains("NaN") || e.contains("inf"), "{e}");
    let good = step - 1;
    assert!(good >= 1, "{e}");
    assert!(
        e.contains(&format!(
            "last good checkpoint is {} (step {good})",
            run.join("ckpt").display()
        )),
        "{e}"
    );
    let st = TrainerState::read(&run.join("ckpt")).unwrap();
    assert_eq!(st.step, good);
    let lines = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines as u64, good);
    assert!(!run.join("final").exists());
}

/// A copy of the reference run's checkpoint with `f` applied, resumed: the error.
fn resume_error(tag: &str, f: impl FnOnce(&Path)) -> String {
    let run = scratch(tag).join("run");
    std::fs::create_dir_all(run.join("ckpt")).unwrap();
    for e in std::fs::read_dir(reference().join("ckpt")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), run.join("ckpt").join(e.file_name())).unwrap();
    }
    std::fs::copy(reference().join("metrics.jsonl"), run.join("metrics.jsonl")).unwrap();
    f(&run.join("ckpt"));
    let mut o = opts(None, &run);
    o.resume = true;
    let e = format!(
        "{:#}",
        train_quiet(&o).expect_err("a malformed checkpoint must not load")
    );
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

#[test]
fn malformed_checkpoints_give_one_clear_error_naming_the_file() {
    let opt = "optimizer.safetensors";
    let e = resume_error("trunc-opt", |c| {
        let b = bytes(&c.join(opt));
        std::fs::write(c.join(opt), &b[..b.len() / 2]).unwrap();
    });
    assert!(e.contains(opt) && e.contains("ckpt"), "{e}");

    let e = resume_error("no-opt", |c| std::fs::remove_file(c.join(opt)).unwrap());
    assert!(e.contains(opt) && e.contains("missing"), "{e}");

    let e = resume_error("bad-trainer", |c| {
        std::fs::write(c.join("trainer.json"), "{\"format\": \"kf-tr").unwrap()
    });
    assert!(e.contains("trainer.json"), "{e}");

    let e = resume_error("trainer-field", |c| {
        let p = c.join("trainer.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["step"] = "twelve".into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    assert!(e.contains("trainer.json") && e.contains("step"), "{e}");

    // the training config in trainer.json describes a wider model than config.json holds
    let e = resume_error("shape", |c| {
        let p = c.join("trainer.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["config"]["model"]["d_model"] = 128.into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    assert!(e.contains("config.json"), "{e}");

    // optimizer moments of another shape than the parameters
    let e = resume_error("opt-shape", |c| {
        let l = kf_engine::io::load(&c.join(opt)).unwrap();
        let mut ts: Vec<(String, kf_engine::Tensor)> = l.tensors.clone();
        let n = ts
            .iter()
            .position(|(n, _)| n.starts_with("m.") && n.ends_with("mlp.0.weight"))
            .unwrap();
        let sh = ts[n].1.shape().to_vec();
        ts[n].1 = kf_engine::Tensor::zeros(
            &[sh[1], sh[0]],
            kf_engine::DType::F32,
            kf_engine::Device::Cpu,
        )
        .unwrap();
        let refs: Vec<(&str, &kf_engine::Tensor)> =
            ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        kf_engine::io::save(&c.join(opt), &refs, &l.metadata).unwrap();
    });
    assert!(e.contains(opt) && e.contains("mlp.0.weight"), "{e}");

    // an optimizer state of another step than trainer.json
    let e = resume_error("opt-step", |c| {
        let l = kf_engine::io::load(&c.join(opt)).unwrap();
        let mut meta = l.metadata.clone();
        meta.insert("step".into(), "7".into());
        let refs: Vec<(&str, &kf_engine::Tensor)> =
            l.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        kf_engine::io::save(&c.join(opt), &refs, &meta).unwrap();
    });
    assert!(e.contains(opt) && e.contains("step 7"), "{e}");

    let e = resume_error("trunc-model", |c| {
        let b = bytes(&c.join("model.safetensors"));
        std::fs::write(c.join("model.safetensors"), &b[..b.len() - 100]).unwrap();
    });
    assert!(e.contains("model.safetensors"), "{e}");

    // metrics.jsonl shorter than the checkpoint recorded
    let e = resume_error("metrics", |c| {
        std::fs::write(c.parent().unwrap().join("metrics.jsonl"), "").unwrap()
    });
    assert!(e.contains("metrics.jsonl"), "{e}");
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let dir = scratch("cfg");
    let run = dir.join("run");
    let err = |edits: &[(&str, Value)], drop_key: Option<&str>| -> String {
        let p = config(&dir, edits);
        if let Some(k) = drop_key {
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove(k);
            std::fs::write(&p, v.to_string()).unwrap();
        }
        let e = format!(
            "{:#}",
            train_quiet(&opts(Some(p.clone()), &run)).unwrap_err()
        );
        assert!(e.contains(&p.display().to_string()), "names the file: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
        e
    };
    assert!(err(&[("learning_rate", 1e-3.into())], None).contains("learning_rate"));
    assert!(err(&[], Some("warmup_steps")).contains("warmup_steps"));
    assert!(err(&[("lr", (-1.0).into())], None).contains("lr"));
    assert!(err(&[("warmup_steps", 1000.into())], None).contains("warmup_steps"));
    assert!(err(&[("seq_len", 4096.into())], None).contains("max_seq_len"));
    assert!(err(&[("model", serde_json::json!({"preset": "huge"}))], None).contains("huge"));
    assert!(err(
        &[("model", serde_json::json!({"preset": "tiny", "layers": 3}))],
        None
    )
    .contains("layers"));
    assert!(err(&[("batch_size", 0.into())], None).contains("batch_size"));
    assert!(!run.join("ckpt").exists());
    // a model that cannot fit in memory is refused before anything is allocated
    let p = config(
        &dir,
        &[
            (
                "model",
                serde_json::json!({"n_layers": 96, "d_model": 12288, "n_heads": 96}),
            ),
            ("batch_size", 512.into()),
        ],
    );
    let e = format!("{:#}", train_quiet(&opts(Some(p), &run)).unwrap_err());
    assert!(e.contains("GiB"), "{e}");
    // no tokenizer beside the shards and none given
    let bare = scratch("bare");
    for f in ["meta.json", "train.bin", "val.bin"] {
        std::fs::copy(data_dir().join(f), bare.join(f)).unwrap();
    }
    let mut o = opts(Some(config(&dir, &[])), &run);
    o.data = bare;
    let e = format!("{:#}", train_quiet(&o).unwrap_err());
    assert!(e.contains("--tokenizer"), "{e}");
}
