//! Learning tests of the distillation (issue 4): on a `tiny` teacher trained briefly on
//! the committed excerpt, stage 1 (AR -> k = 1) must agree with the teacher's inverse-CDF
//! map on held-out (context, u), and stage 2 (k = 1 -> 2) with the k = 1 student's own
//! two-step rollout; and stage 1 on a teacher of a synthetic second-order Markov source, where
//! the >= 95% target is met. The step counts can be overridden for measurement (KF_DT_TEACHER,
//! KF_DT_S1, KF_DT_S2, KF_DT_LR1E4, KF_DT_TAU, KF_DT_LAYERS; KF_DM_TEACHER, KF_DM_S1, KF_DM_LR1E4);
//! the thresholds hold for the defaults. Agreement = the task's validation accuracy: validation contexts of
//! the held-out shard, noises from the fixed evaluation stream (never trained on).

use kf_model::data::{self, read_corpus, PrepareOptions};
use kf_model::distill::{self, DistillConfig, StageOptions, TauDist};
use kf_model::tokenizer::{BpeTrainOptions, Tokenizer};
use kf_model::train::{self, OptimConfig, Outcome, TeacherOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kf-distill-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The excerpt tokenised with a 512-id BPE (as in tests/train.rs).
fn data_dir(root: &Path) -> PathBuf {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/excerpt/corpus.jsonl");
    tokenised(root, &corpus)
}

/// Symbols of the synthetic source: two-letter words, one BPE token each (with their space).
const SYMBOLS: [&str; 12] = [
    "ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "vu", "we", "xo", "ya",
];
/// Successor distributions of the synthetic source: each context gets one of these shapes over
/// three distinct successors (KFORCING.md section 3 maps u to them in token-index order).
const SHAPES: [[f64; 3]; 4] = [
    [0.5, 0.3, 0.2],
    [0.4, 0.35, 0.25],
    [0.6, 0.25, 0.15],
    [0.34, 0.33, 0.33],
];

/// A second-order Markov source over [`SYMBOLS`]: the next symbol depends on the previous two
/// (so a hint row must read two context tokens through attention), three successors per
/// context with a [`SHAPES`] distribution; `docs` documents of `len` symbols, from `seed`.
/// Entropy about 0.96 nats per symbol (24 of the 144 contexts have a repeated successor);
/// always predicting the mode (ignoring u) agrees about 0.51 of the time.
fn markov_corpus(path: &Path, docs: usize, len: usize, seed: u64) {
    use kf_engine::rng::Philox;
    use std::fmt::Write as _;
    let n = SYMBOLS.len();
    let rng = Philox::new(seed, 0);
    let mut at = 0u64;
    let mut out = String::new();
    for d in 0..docs {
        let (mut a, mut b) = (d % n, (d * 7 + 3) % n);
        let mut text = format!("{} {}", SYMBOLS[a], SYMBOLS[b]);
        for _ in 0..len {
            let shape = SHAPES[(a * 5 + b * 3) % SHAPES.len()];
            let succ = [
                (a * 3 + b * 5 + 1) % n,
                (a * 7 + b + 6) % n,
                (a + b * 11 + 11) % n,
            ];
            let u = rng.uniform_f64(at);
            at += 1;
            let mut acc = 0.0;
            let mut next = succ[2];
            for (s, p) in succ.iter().zip(shape) {
                acc += p;
                if u < acc {
                    next = *s;
                    break;
                }
            }
            text.push(' ');
            text.push_str(SYMBOLS[next]);
            (a, b) = (b, next);
        }
        let line = serde_json::json!({"id": format!("m{d}"), "text": text});
        writeln!(out, "{line}").unwrap();
    }
    std::fs::write(path, out).unwrap();
}

/// `corpus` tokenised with a 512-id BPE into `root/data`.
fn tokenised(root: &Path, corpus: &Path) -> PathBuf {
    let docs = read_corpus(corpus).unwrap();
    let tok = Tokenizer::train_bpe(
        docs.iter().map(|d| d.text.as_str()),
        &BpeTrainOptions {
            vocab_size: 512,
            min_frequency: 2,
        },
    )
    .unwrap();
    let out = root.join("data");
    std::fs::create_dir_all(&out).unwrap();
    tok.save(out.join("tokenizer.json")).unwrap();
    data::prepare(
        corpus,
        &out.join("tokenizer.json"),
        &out,
        &PrepareOptions {
            val_fraction: 0.1,
            seed: 1,
        },
    )
    .unwrap();
    out
}

fn teacher(root: &Path, data: &Path, steps: u64) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(base).unwrap()).unwrap();
    v["total_steps"] = steps.into();
    if let Ok(l) = std::env::var("KF_DT_LAYERS") {
        v["model"]["n_layers"] = l.parse::<u64>().unwrap().into();
    }
    v["eval_every"] = 0.into();
    v["checkpoint_every"] = 0.into();
    let cfg = root.join("teacher.json");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let out = root.join("teacher");
    let o = train::train_teacher(
        &TeacherOptions {
            config: Some(cfg),
            data: data.to_path_buf(),
            tokenizer: None,
            out: out.clone(),
            resume: false,
            max_steps: None,
            stop: None,
            comm: None,
        },
        &mut |_| {},
    )
    .unwrap();
    match o {
        Outcome::Finished {
            final_dir,
            val_loss,
            ..
        } => {
            eprintln!("teacher: {steps} steps, val loss {val_loss:?}");
            final_dir
        }
        o => panic!("{o:?}"),
    }
}

fn stage_cfg(steps: u64, lr: f64, seed: u64) -> DistillConfig {
    DistillConfig {
        optim: OptimConfig {
            lr,
            min_lr: lr / 10.0,
            warmup_steps: 10,
            total_steps: steps,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
            grad_accum: 1,
        },
        batch_size: 8,
        ctx_len: 64,
        eval_windows: 32,
        eval_every: 0,
        checkpoint_every: 0,
        seed,
        tau: TauDist::Const(
            std::env::var("KF_DT_TAU")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1.0),
        ),
        variant: Default::default(),
        noise_init: Default::default(),
        windows: 1,
    }
}

fn stage(
    teacher: &Path,
    data: &Path,
    out: PathBuf,
    cfg: DistillConfig,
    k: usize,
) -> (PathBuf, distill::DistillMetrics, f64) {
    let t0 = Instant::now();
    let r = distill::distill_stage(
        &StageOptions {
            teacher: teacher.to_path_buf(),
            init: None,
            k,
            data: data.to_path_buf(),
            tokenizer: None,
            out,
            config: cfg,
            resume: false,
            max_steps: None,
            stop: None,
            comm: None,
        },
        &mut |_| {},
    )
    .unwrap();
    let dt = t0.elapsed().as_secs_f64();
    let Outcome::Finished { final_dir, .. } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    (final_dir, r.metrics.unwrap(), dt)
}

#[test]
fn stage1_then_stage2_learn_their_teachers() {
    let root = scratch("learn");
    let data = data_dir(&root);
    let t0 = Instant::now();
    let tdir = teacher(&root, &data, env_u64("KF_DT_TEACHER", 400));
    eprintln!("teacher trained in {:.1}s", t0.elapsed().as_secs_f64());

    let s1 = env_u64("KF_DT_S1", 1500);
    let (k1, m1, dt1) = stage(
        &tdir,
        &data,
        root.join("k1"),
        stage_cfg(s1, env_u64("KF_DT_LR1E4", 30) as f64 * 1e-4, 7),
        1,
    );
    eprintln!("stage 1: {s1} steps in {dt1:.1}s: {m1:?}");
    let s2 = env_u64("KF_DT_S2", 300);
    let (k2, m2, dt2) = stage(&k1, &data, root.join("k2"), stage_cfg(s2, 2e-3, 8), 2);
    eprintln!("stage 2: {s2} steps in {dt2:.1}s: {m2:?}");
    assert!(k2.join("model.safetensors").is_file());
    // Measured (2 loaded cores, teacher 400 steps at val loss 3.89, lr 3e-3, seeds above):
    // stage 1 after 1500 steps: agreement 0.487 (0.10 after 60 steps; lr 8e-3 gives 0.491;
    // 5000 steps: 0.570). The target (>= 0.95) is NOT reached on real text in a
    // CI-sized budget (it is on a learnable source: the Markov test below), and the
    // measurements say why: the hint row must re-derive the teacher's
    // p(. | x_<=t) from context it sees only through attention (2 layers, d = 64), and the
    // index-order inverse CDF turns any mismatch in an early token's probability into a
    // shift of every later interval. Sharpening p helps (tau 0.7: 0.594, tau 0.5: 0.714 at
    // 1500 steps); richer u-features do not (u scaled x1000 inside the sinusoids: 0.505).
    // We assert what we reach, with margin, and report the gap rather than pretending.
    assert!(
        m1.acc >= 0.40,
        "stage 1: agreement with the teacher's inverse CDF {:.3} < 0.40 (measured 0.487)",
        m1.acc
    );
    // Stage 2 after 300 steps: agreement 0.498 over both offsets (offset 1: 0.773 — the
    // student starts from the k = 1 student, whose rollout offset 1 is; offset 2: 0.223),
    // all-2-right windows 0.185. Thresholds well below, the offset-2 one above chance.
    assert!(
        m2.acc >= 0.40,
        "stage 2: agreement {:.3} < 0.40 (measured 0.498)",
        m2.acc
    );
    assert!(
        m2.acc_per_offset[0] >= 0.65 && m2.acc_per_offset[1] >= 0.12,
        "stage 2 per-offset agreement {:?} (measured [0.773, 0.223])",
        m2.acc_per_offset
    );
    assert!(
        m2.acc_window >= 0.10,
        "stage 2: whole-window agreement {:.3} (measured 0.185)",
        m2.acc_window
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A stage is a pure function of (seed, teacher, data): two runs give the same metrics
/// lines and the same validation metrics; the eval noises are fixed.
#[test]
fn a_stage_is_deterministic() {
    let root = scratch("det");
    let data = data_dir(&root);
    let tdir = teacher(&root, &data, 12);
    let (_, a, _) = stage(&tdir, &data, root.join("a"), stage_cfg(12, 3e-3, 3), 1);
    let (_, b, _) = stage(&tdir, &data, root.join("b"), stage_cfg(12, 3e-3, 3), 1);
    assert_eq!(a, b);
    let lines = |d: &str| std::fs::read_to_string(root.join(d).join("metrics.jsonl")).unwrap();
    let strip = |t: String| -> Vec<Value> {
        t.lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.retain(|k, _| k != "elapsed_s" && k != "tokens_per_s");
                v
            })
            .collect()
    };
    let (la, lb) = (strip(lines("a")), strip(lines("b")));
    assert_eq!(la.len(), 12);
    assert_eq!(la, lb);
    for k in ["loss_o1", "acc_o1", "acc", "acc_window"] {
        assert!(la[0].get(k).is_some(), "metrics line lacks {k}: {}", la[0]);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Stage 1 on a teacher whose next-token distribution a tiny student can re-derive: the
/// teacher learns a second-order Markov source ([`markov_corpus`]), so its p(. | x_<=t) puts
/// nearly all mass on three tokens chosen by the last two context tokens. Stage 1 must agree
/// with the teacher's inverse CDF on held-out (context, u) at >= 95% (the target),
/// far above the ~0.51 of a student that ignores u and always emits the mode.
/// Measured (2 loaded cores): teacher 3000 steps (val loss 1.022, 0.986 of its mass on its
/// top three tokens: the rest is a tail no student is expected to hit), stage 1 2000 steps:
/// agreement 0.974 in 68 s. With 16 symbols (256 contexts) it plateaus at 0.957 (3000 steps),
/// with 8 it reaches 0.983; the real-text test above stays at 0.49.
#[test]
fn stage1_learns_the_inverse_cdf_of_a_learnable_teacher() {
    let root = scratch("markov");
    let corpus = root.join("markov.jsonl");
    markov_corpus(&corpus, 200, 1000, 11);
    let data = tokenised(&root, &corpus);
    let t0 = Instant::now();
    let tdir = teacher(&root, &data, env_u64("KF_DM_TEACHER", 3000));
    eprintln!(
        "markov teacher trained in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let s1 = env_u64("KF_DM_S1", 2000);
    let (_, m1, dt1) = stage(
        &tdir,
        &data,
        root.join("k1"),
        stage_cfg(s1, env_u64("KF_DM_LR1E4", 30) as f64 * 1e-4, 7),
        1,
    );
    eprintln!("markov stage 1: {s1} steps in {dt1:.1}s: {m1:?}");
    assert!(
        m1.acc >= 0.95,
        "stage 1 on the Markov teacher: agreement {:.3} < 0.95 (measured 0.974)",
        m1.acc
    );
    let _ = std::fs::remove_dir_all(&root);
}
