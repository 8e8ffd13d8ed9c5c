//! Data parallelism under `mpirun` (issue 22): `mpirun -n 2 kfrun train|distill` ends with the
//! same weights and the same logged losses as one process with the same global batch, bit for
//! bit (also when a run changes its world size on resume); a killed or hung rank ends the run with an error instead of a hang, and `--resume`
//! then finishes with the uninterrupted run's weights; a config whose micro-batches do not
//! split over the ranks is refused with one clear error.
//!
//! Needs kfrun built with `--features mpi` (`.ci/run` installs Open MPI and runs this file
//! with it); without the feature only the check that a launched rank is refused runs, and
//! without `mpirun` on PATH the tests say that they skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kfrun() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A fresh directory with a tokenizer and shards of the repository's excerpt corpus.
fn setup(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("kf-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let corpus = repo("data/excerpt/corpus.jsonl");
    let tok = root.join("tok.json");
    ok(
        kfrun()
            .args(["tokenizer", "train", "--corpus", s(&corpus)])
            .args(["--vocab-size", "320", "--out", s(&tok)])
            .output()
            .unwrap(),
        "tokenizer train",
    );
    ok(
        kfrun()
            .args([
                "data",
                "prepare",
                "--corpus",
                s(&corpus),
                "--tokenizer",
                s(&tok),
            ])
            .args([
                "--out",
                s(&root.join("shards")),
                "--val-fraction",
                "0.1",
                "--seed",
                "0",
            ])
            .output()
            .unwrap(),
        "data prepare",
    );
    root
}

/// configs/tiny-dp.json (tiny's global batch of 8 windows as 2 micro-batches of 4) with
/// `edit` applied, written into `root`.
fn config(root: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/tiny-dp.json")).unwrap())
            .unwrap();
    edit(&mut c);
    let p = root.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    p
}

/// Every metrics line without its timings (elapsed_s, tokens_per_s).
#[cfg(feature = "mpi")]
fn metrics(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("tokens_per_s");
            serde_json::to_string(o).unwrap()
        })
        .collect()
}

#[cfg(feature = "mpi")]
fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_feature_a_launched_rank_and_bad_flags_are_one_error() {
    let root = setup("nofeature");
    let cfg = config(&root, "cfg.json", |_| {});
    let train = || {
        let mut c = kfrun();
        c.args([
            "train",
            "--config",
            s(&cfg),
            "--data",
            s(&root.join("shards")),
        ])
        .args([
            "--tokenizer",
            s(&root.join("tok.json")),
            "--out",
            s(&root.join("run")),
        ]);
        c
    };
    let o = train()
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 0 of 2 started by an MPI launcher")
            && err.contains("built without MPI support")
            && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!root.join("run").exists(), "nothing may be written");
    // bad --distributed values and a build without NCCL: one sentence each, nothing written
    for (flag, want) in [
        (
            &["--distributed", "gloo"][..],
            "unknown --distributed \"gloo\"",
        ),
        (
            &["--collective-timeout", "0"][..],
            "--collective-timeout must be a positive number",
        ),
        (&["--distributed", "nccl"][..], "built without NCCL support"),
    ] {
        let o = train().args(flag).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{flag:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{flag:?}: one line: {err}"
        );
        assert!(
            !root.join("run").exists(),
            "{flag:?}: nothing may be written"
        );
    }
    eprintln!(
        "note: the mpirun tests of this file need `--features mpi` (see .ci/run); skipped here"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::*;
    use std::time::{Duration, Instant};

    /// `mpirun -n N` as root too (CI containers), oversubscribed (2 cores), one thread per rank.
    fn mpirun(n: usize) -> Option<Command> {
        let found = Command::new("mpirun").arg("--version").output().is_ok();
        if !found {
            eprintln!(
                "skipped: no mpirun on PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)"
            );
            return None;
        }
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-n", &n.to_string()])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .arg(env!("CARGO_BIN_EXE_kfrun"))
            .args(["--threads", "1"]);
        Some(c)
    }

    fn train_args<'a>(root: &'a Path, cfg: &'a Path, out: &'a Path) -> Vec<&'a str> {
        vec![
            "train",
            "--config",
            s(cfg),
            "--data",
            s(root.join("shards").leak()),
            "--tokenizer",
            s(root.join("tok.json").leak()),
            "--out",
            s(out),
        ]
    }

    /// `kfrun --threads 1 train` (one process) into `out`, checked to succeed.
    fn train_one(root: &Path, cfg: &Path, out: &Path, resume: bool, what: &str) {
        let mut c = kfrun();
        c.args(["--threads", "1"]).args(train_args(root, cfg, out));
        if resume {
            c.arg("--resume");
        }
        ok(c.output().unwrap(), what);
    }

    #[test]
    fn two_ranks_train_exactly_what_one_process_trains() {
        let Some(mut mp) = mpirun(2) else { return };
        let root = setup("train");
        let cfg = config(&root, "cfg.json", |c| {
            c["total_steps"] = 20.into();
            c["eval_every"] = 10.into();
            c["checkpoint_every"] = 10.into();
            c["warmup_steps"] = 5.into();
        });
        let (one, two) = (root.join("one"), root.join("two"));
        train_one(&root, &cfg, &one, false, "kfrun train");
        let o = ok(
            mp.args(train_args(&root, &cfg, &two)).output().unwrap(),
            "mpirun -n 2 kfrun train",
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            out.matches("trained 20 steps").count(),
            1,
            "rank 0 alone reports: {out}"
        );
        assert_eq!(metrics(&one), metrics(&two));
        assert_eq!(metrics(&one).len(), 20);
        assert!(weights(&one.join("final")) == weights(&two.join("final")));

        // the world size may change on resume: 2 ranks to step 10, then one process
        let mixed = root.join("mixed");
        ok(
            mpirun(2)
                .unwrap()
                .args(train_args(&root, &cfg, &mixed))
                .args(["--max-steps", "10"])
                .output()
                .unwrap(),
            "mpirun -n 2 kfrun train --max-steps 10",
        );
        train_one(
            &root,
            &cfg,
            &mixed,
            true,
            "kfrun train --resume (1 process after 2 ranks)",
        );
        assert_eq!(metrics(&one), metrics(&mixed));
        assert!(weights(&one.join("final")) == weights(&mixed.join("final")));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn two_ranks_distill_exactly_what_one_process_distills() {
        let Some(mut mp) = mpirun(2) else { return };
        let root = setup("distill");
        let cfg = config(&root, "cfg.json", |c| {
            c["total_steps"] = 10.into();
            c["checkpoint_every"] = 10.into();
        });
        let teacher = root.join("teacher");
        train_one(&root, &cfg, &teacher, false, "kfrun train (the teacher)");
        let mut r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo("configs/distill-tiny.json")).unwrap(),
        )
        .unwrap();
        r["batch_size"] = 2.into();
        r["optim"]["grad_accum"] = 2.into();
        r["eval_every"] = 5.into();
        r["checkpoint_every"] = 5.into();
        for st in r["stages"].as_array_mut().unwrap() {
            st["total_steps"] = 8.into();
        }
        let recipe = root.join("recipe.json");
        std::fs::write(&recipe, r.to_string()).unwrap();
        let args = |out: &Path| -> Vec<String> {
            [
                "distill",
                "--teacher",
                s(&teacher.join("final")),
                "--k",
                "2",
                "--data",
                s(&root.join("shards")),
                "--tokenizer",
                s(&root.join("tok.json")),
                "--recipe",
                s(&recipe),
                "--out",
                s(out),
            ]
            .map(String::from)
            .to_vec()
        };
        let (one, two) = (root.join("d1"), root.join("d2"));
        ok(
            kfrun()
                .args(["--threads", "1"])
                .args(args(&one))
                .output()
                .unwrap(),
            "kfrun distill",
        );
        ok(
            mp.args(args(&two)).output().unwrap(),
            "mpirun -n 2 kfrun distill",
        );
        for k in ["k1", "k2"] {
            assert_eq!(metrics(&one.join(k)), metrics(&two.join(k)), "stage {k}");
            assert!(
                weights(&one.join(k).join("final")) == weights(&two.join(k).join("final")),
                "stage {k}: weights differ"
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    /// The pid of rank `rank` of the mpirun started with `KF_MPI_TEST_TAG=tag`.
    fn rank_pid(tag: &str, rank: usize) -> Option<u32> {
        let want = [
            format!("KF_MPI_TEST_TAG={tag}"),
            format!("OMPI_COMM_WORLD_RANK={rank}"),
        ];
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(e.path().join("environ")) else {
                continue;
            };
            let vars: Vec<String> = env
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
            if want.iter().all(|w| vars.contains(w)) && exe.ends_with("kfrun") {
                return Some(pid);
            }
        }
        None
    }

    fn last_step(run: &Path) -> u64 {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["step"].as_u64())
            .last()
            .unwrap_or(0)
    }

    /// Starts the 2-rank run, waits for step `at`, sends `signal` to rank 1 and returns the
    /// run's output and how long it took to end after the signal.
    fn interrupt(
        root: &Path,
        cfg: &Path,
        out: &Path,
        at: u64,
        signal: &str,
        resume: bool,
    ) -> (Output, Duration) {
        let tag = format!("{}-{signal}-{at}", std::process::id());
        let mut c = mpirun(2).unwrap();
        c.args(train_args(root, cfg, out))
            .args(["--collective-timeout", "4"])
            .env("KF_MPI_TEST_TAG", &tag)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if resume {
            c.arg("--resume");
        }
        let child = c.spawn().unwrap();
        let t0 = Instant::now();
        while last_step(out) < at {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the run did not reach step {at}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = rank_pid(&tag, 1).expect("rank 1's process");
        let k = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(k.success());
        let t1 = Instant::now();
        let o = child.wait_with_output().unwrap();
        (o, t1.elapsed())
    }

    #[test]
    fn a_dead_or_hung_rank_ends_the_run_and_resume_finishes_it_exactly() {
        if mpirun(2).is_none() {
            return;
        }
        let root = setup("kill");
        let cfg = config(&root, "cfg.json", |c| {
            c["total_steps"] = 400.into();
            c["eval_every"] = 100.into();
            c["checkpoint_every"] = 10.into();
        });
        let (one, two) = (root.join("one"), root.join("two"));
        train_one(&root, &cfg, &one, false, "kfrun train (uninterrupted)");

        // rank 1 killed: the launcher ends the job (rank 0 would time out otherwise)
        let (o, took) = interrupt(&root, &cfg, &two, 60, "-KILL", false);
        assert!(!o.status.success(), "the run must fail when a rank dies");
        assert!(
            took < Duration::from_secs(30),
            "ended {took:?} after the kill"
        );
        let stopped = last_step(&two);
        assert!(stopped < 400, "killed at step {stopped}");

        // rank 1 hung (stopped): rank 0 gives up after --collective-timeout 4 with one error
        let (o, took) = interrupt(&root, &cfg, &two, stopped + 40, "-STOP", true);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "the run must fail when a rank hangs");
        assert!(
            err.contains("did not complete within the collective timeout (4 s)")
                && err.contains("rank 1 died or hangs"),
            "{err}"
        );
        assert!(
            took < Duration::from_secs(30),
            "ended {took:?} after the stop"
        );
        assert!(last_step(&two) < 400);

        // resume: the uninterrupted run's weights and losses
        ok(
            mpirun(2)
                .unwrap()
                .args(train_args(&root, &cfg, &two))
                .arg("--resume")
                .output()
                .unwrap(),
            "mpirun -n 2 kfrun train --resume",
        );
        assert_eq!(metrics(&one), metrics(&two));
        assert!(weights(&one.join("final")) == weights(&two.join("final")));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn micro_batches_that_do_not_split_over_the_ranks_are_refused() {
        let Some(mut mp) = mpirun(2) else { return };
        let root = setup("split");
        let o = mp
            .args(train_args(
                &root,
                &repo("configs/tiny.json"),
                &root.join("run"),
            ))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("grad_accum 1 is not a multiple of the 2 ranks"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
