//! `kfrun distill` end to end on a tiny teacher trained for a few steps on the committed
//! excerpt: the chain AR -> 1 -> 2 -> 4, stop with --max-steps and --resume (the resumed
//! chain ends with the same student, bit for bit, as an uninterrupted one), the inversion
//! variant, then `kfrun generate --k` with the student, and one clear error per bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kfrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("kfrun runs")
}

fn ok(o: &Output) -> (String, String) {
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "kfrun failed:\n{se}\n{so}");
    (so, se)
}

fn one_clear_error(o: &Output, needle: &str) {
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure, got success");
    assert!(se.contains(needle), "stderr lacks {needle:?}:\n{se}");
    assert!(!se.contains("panicked"), "panic instead of an error:\n{se}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Tokenizer, shards and a 30-step tiny teacher in `root`.
fn setup(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let corpus = repo("data/excerpt/corpus.jsonl");
    let (tok, shards) = (root.join("tok.json"), root.join("shards"));
    ok(&kfrun(&[
        "tokenizer",
        "train",
        "--corpus",
        s(&corpus),
        "--vocab-size",
        "400",
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
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/tiny.json")).unwrap()).unwrap();
    let mut cfg = base.clone();
    cfg["total_steps"] = 30.into();
    cfg["eval_every"] = 0.into();
    cfg["checkpoint_every"] = 0.into();
    let cfg_path = root.join("teacher.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let teacher = root.join("teacher");
    ok(&kfrun(&[
        "train",
        "--config",
        s(&cfg_path),
        "--data",
        s(&shards),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&teacher),
    ]));
    (tok, shards, teacher.join("final"))
}

#[test]
fn distill_chain_resumes_and_the_student_generates() {
    let root = std::env::temp_dir().join(format!("kfrun-distill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let (tok, shards, teacher) = setup(&root);
    let recipe = repo("configs/distill-tiny.json");
    let distill_with = |recipe: &Path, out: &Path, extra: &[&str]| {
        let mut a = vec![
            "distill",
            "--teacher",
            s(&teacher),
            "--out",
            s(out),
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--recipe",
            s(&recipe),
        ];
        a.extend_from_slice(extra);
        if !extra.contains(&"--k") {
            a.extend_from_slice(&["--k", "4"]);
        }
        kfrun(&a)
    };
    let distill = |out: &Path, extra: &[&str]| distill_with(&recipe, out, extra);

    // uninterrupted
    let a = root.join("a");
    let (table, _) = ok(&distill(&a, &[]));
    for k in ["k=1", "k=2", "k=4"] {
        assert!(table.contains(k), "{table}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    let stages = summary["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    for (st, k) in stages.iter().zip([1u64, 2, 4]) {
        assert_eq!(st["k"], k);
        let acc = st["metrics"]["acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(
            st["metrics"]["acc_per_offset"].as_array().unwrap().len() as u64,
            k
        );
    }
    let metrics = std::fs::read_to_string(a.join("k4/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"acc_o4\"") && metrics.contains("\"val_acc\""));

    // interrupted in stage 1 and in stage 2, then resumed
    let b = root.join("b");
    let (o, _) = ok(&distill(&b, &["--max-steps", "13"]));
    assert!(o.contains("stopped stage k = 1 at step 13"), "{o}");
    one_clear_error(&distill(&b, &[]), "pass --resume");
    // a chain to k = 1 finishes stage 1; extended to k = 4 it skips it and stage 2 stops
    // at its step 5 (--max-steps counts each stage's own steps)
    let (o, _) = ok(&distill(&b, &["--resume", "--k", "1"]));
    assert!(o.contains("k=1") && !o.contains("k=2"), "{o}");
    let (o, _) = ok(&distill(&b, &["--resume", "--max-steps", "5"]));
    assert!(o.contains("stopped stage k = 2 at step 5"), "{o}");
    let (_, err) = ok(&distill(&b, &["--resume"]));
    assert!(err.contains("already finished"), "{err}");
    for k in [1, 2, 4] {
        let f = |d: &Path| std::fs::read(d.join(format!("k{k}/final/model.safetensors"))).unwrap();
        assert!(
            f(&a) == f(&b),
            "stage k = {k}: the resumed student differs from the uninterrupted one"
        );
    }

    // the student generates, K <= k chosen at run time, with a frequency penalty
    let student = a.join("k4/final");
    let gen = |extra: &[&str]| {
        let mut v = vec!["generate", "--model", s(&student), "--prompt", "The"];
        v.extend_from_slice(extra);
        kfrun(&v)
    };
    let (text, err) = ok(&gen(&["--max-new", "16", "--k", "4", "--seed", "2"]));
    assert!(text.starts_with("The"), "{text}");
    assert!(err.contains("4 tokens per pass"), "{err}");
    // K = 4 needs 4 decode passes for 16 tokens (+ the prefill)
    assert!(err.contains("(5 passes)"), "{err}");
    let (_, err) = ok(&gen(&[
        "--max-new",
        "16",
        "--k",
        "2",
        "--freq-penalty",
        "0.5",
    ]));
    assert!(err.contains("(9 passes)"), "{err}");
    one_clear_error(&gen(&["--k", "8"]), "trained with k = 4");
    one_clear_error(&gen(&["--k", "0"]), "--k 0");
    one_clear_error(
        &kfrun(&[
            "generate",
            "--model",
            s(&teacher),
            "--prompt",
            "a",
            "--k",
            "2",
        ]),
        "is an AR model",
    );

    // kfrun eval: AR plus K = 1..4 x 2 penalties, a table and JSON rows
    let ev = root.join("eval.json");
    let (table, _) = ok(&kfrun(&[
        "eval",
        "--teacher",
        s(&teacher),
        "--student",
        s(&student),
        "--data",
        s(&shards),
        "--prompts",
        "4",
        "--max-new",
        "8",
        "--penalties",
        "0,1",
        "--json",
        s(&ev),
    ]));
    assert!(table.contains("| pflm | 4 | 1 |"), "{table}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ev).unwrap()).unwrap();
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 4 * 2);
    assert_eq!(rows[0]["mode"], "ar");
    for r in &rows[1..] {
        let a = r["agree_tokens"].as_f64().unwrap();
        let w = r["agree_windows"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&w), "{r}");
        assert!(r["gen_ppl"].as_f64().unwrap() >= 1.0, "{r}");
        assert_eq!(r["tokens"], 32);
    }
    // prompts from text instead of shards: lines (blank ones skipped) cut to --prompt-len
    let pf = root.join("prompts.txt");
    std::fs::write(
        &pf,
        "The cat sat on the mat and looked around\n\nIt was a long day for everyone\nA new law was passed today\n",
    )
    .unwrap();
    let ev2 = root.join("eval-text.json");
    let text_args = |len: &str| {
        kfrun(&[
            "eval",
            "--teacher",
            s(&teacher),
            "--student",
            s(&student),
            "--prompts-file",
            s(&pf),
            "--prompt-len",
            len,
            "--max-new",
            "8",
            "--ks",
            "4",
            "--penalties",
            "0",
            "--json",
            s(&ev2),
        ])
    };
    let (table, err) = ok(&text_args("2"));
    assert!(table.contains("| pflm | 4 | 0 |"), "{table}");
    assert!(err.contains("3 prompts of 2 tokens from"), "{err}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ev2).unwrap()).unwrap();
    assert_eq!(j["rows"].as_array().unwrap().len(), 2);
    assert_eq!(j["rows"][1]["tokens"], 3 * 8);
    one_clear_error(&text_args("40"), "line 1 has");
    one_clear_error(
        &kfrun(&["eval", "--teacher", s(&teacher), "--student", s(&student)]),
        "--data",
    );
    one_clear_error(
        &kfrun(&[
            "eval",
            "--teacher",
            s(&student),
            "--student",
            s(&student),
            "--data",
            s(&shards),
        ]),
        "pass the AR teacher",
    );

    // the inversion variant runs the same chain from the AR teacher
    let c = root.join("c");
    let (table, _) = ok(&distill(&c, &["--variant", "inversion"]));
    assert!(table.contains("k=4"), "{table}");

    // bad inputs: one clear error each
    let bad = root.join("bad.json");
    std::fs::write(&bad, "{\"batch_size\": 2}").unwrap();
    one_clear_error(&distill_with(&bad, &root.join("d"), &[]), "bad.json");
    one_clear_error(
        &distill(&root.join("e"), &["--k", "3"]),
        "no stage with k = 3",
    );
    let mut args = vec!["distill", "--teacher", s(&student), "--out"];
    let f = root.join("f");
    args.extend_from_slice(&[s(&f), "--data", s(&shards), "--recipe", s(&recipe)]);
    one_clear_error(&kfrun(&args), "starts from the AR teacher");
    let _ = std::fs::remove_dir_all(&root);
}
