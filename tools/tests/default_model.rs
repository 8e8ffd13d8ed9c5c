//! The shipped default model (models/default: f16 teacher + k = 4 student, issue 4): the
//! README's main command, `kfrun generate --k 4`, run from the repository root with no
//! --model, prints text; the teacher generates too; both load through `kfrun inspect`.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn main_command_prints_text() {
    let (ok, out, err) = run(&[
        "generate",
        "--k",
        "4",
        "--prompt",
        "The President said",
        "--max-new",
        "24",
        "--seed",
        "1",
    ]);
    assert!(ok, "kfrun generate --k 4 failed: {err}");
    let text = out.trim();
    assert!(text.starts_with("The President said"), "output: {text:?}");
    let new = &text["The President said".len()..];
    assert!(
        new.split_whitespace().count() >= 5,
        "expected several generated words, got {new:?}"
    );
}

#[test]
fn teacher_generates_and_both_are_small_f16() {
    let (ok, out, err) = run(&[
        "generate",
        "--model",
        "models/default/teacher",
        "--prompt",
        "It was",
        "--max-new",
        "12",
    ]);
    assert!(ok, "teacher generate failed: {err}");
    assert!(out.trim().len() > "It was".len(), "output: {out:?}");
    let mut total = 0;
    for m in ["teacher", "student"] {
        let f = root()
            .join("models/default")
            .join(m)
            .join("model.safetensors");
        total += std::fs::metadata(&f).unwrap().len();
        let (ok, out, err) = run(&["inspect", f.to_str().unwrap()]);
        assert!(ok, "inspect {m}: {err}");
        assert!(
            out.contains("F16") || out.contains("f16"),
            "{m} is not f16: {out}"
        );
    }
    assert!(
        total <= 60 << 20,
        "default model is {total} bytes (> 60 MiB)"
    );
}

/// The CUDA kernels end to end through kfrun: `--device emu` runs the shipped models on the
/// kernel device path (weights uploaded, KV cache on the device, Philox noise, fused sampler,
/// argmax with penalty, attention decode kernels) on the CPU emulator and prints exactly the
/// CPU's text, for the k = 4 student (two prompts, frequency penalty) and the AR teacher.
#[test]
fn the_kernel_path_on_the_emulator_prints_the_cpu_text() {
    let cases: [&[&str]; 2] = [
        &[
            "generate",
            "--k",
            "4",
            "--prompt",
            "The President said",
            "--prompt",
            "It was",
            "--max-new",
            "16",
            "--freq-penalty",
            "0.5",
            "--seed",
            "2",
        ],
        &[
            "generate",
            "--model",
            "models/default/teacher",
            "--prompt",
            "The President said",
            "--max-new",
            "12",
            "--seed",
            "2",
        ],
    ];
    for args in cases {
        let (ok, cpu, err) = run(args);
        assert!(ok, "{args:?} on the CPU: {err}");
        let mut emu_args = args.to_vec();
        emu_args.extend(["--device", "emu"]);
        let (ok, emu, err) = run(&emu_args);
        assert!(ok, "{emu_args:?}: {err}");
        assert!(err.contains("on emu"), "the banner names the device: {err}");
        assert_eq!(emu, cpu, "{args:?}: the emulated kernels print other text");
        assert!(cpu.split_whitespace().count() >= 8, "{cpu:?}");
    }
}

/// `kfrun eval --device emu`: the evaluation's model work (AR and PFLM generation, teacher
/// scoring and rollouts) on the emulated kernels gives the CPU's rows: same agreement, same
/// passes, perplexity and entropy within f32 rounding.
#[test]
fn eval_on_the_emulated_kernels_equals_the_cpu() {
    let dir = std::env::temp_dir().join(format!("kfrun-eval-emu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let shards = dir.join("shards");
    let (ok, _, err) = run(&[
        "data",
        "prepare",
        "--corpus",
        "data/excerpt/corpus.jsonl",
        "--tokenizer",
        "models/default/teacher/tokenizer.json",
        "--out",
        shards.to_str().unwrap(),
        "--val-fraction",
        "0.2",
    ]);
    assert!(ok, "data prepare: {err}");
    let mut rows = vec![];
    for device in ["cpu", "emu"] {
        let json = dir.join(format!("{device}.json"));
        let (ok, _, err) = run(&[
            "eval",
            "--teacher",
            "models/default/teacher",
            "--student",
            "models/default/student",
            "--data",
            shards.to_str().unwrap(),
            "--prompts",
            "2",
            "--max-new",
            "8",
            "--ks",
            "1,4",
            "--penalties",
            "0.5",
            "--device",
            device,
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(ok, "eval --device {device}: {err}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        rows.push(j["rows"].as_array().unwrap().clone());
    }
    assert_eq!(rows[0].len(), 3, "AR + K = 1, 4: {:?}", rows[0]);
    assert_eq!(rows[0].len(), rows[1].len());
    for (c, e) in rows[0].iter().zip(&rows[1]) {
        for key in [
            "mode",
            "k",
            "passes",
            "tokens",
            "agree_tokens",
            "agree_windows",
        ] {
            assert_eq!(c[key], e[key], "{key}: cpu {c} emu {e}");
        }
        for key in ["gen_nll", "entropy_mean"] {
            let (a, b) = (c[key].as_f64().unwrap(), e[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{key}: {a} vs {b}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--dtype q8_0`: the shipped student with its matrices in 8-bit blocks (integer kernels)
/// writes nearly the f16 student's greedy text; 4-bit blocks run too; a kernel device is
/// refused in one sentence (its copy would be the dequantized f32 model).
#[test]
fn the_student_in_blocks_writes_the_f16_students_text() {
    let gen = |dtype: Option<&str>| {
        let mut args = vec![
            "--threads",
            "1",
            "generate",
            "--prompt",
            "Once upon a time",
            "--max-new",
            "32",
            "--tau",
            "0",
        ];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        let (ok, out, err) = run(&args);
        assert!(ok, "generate --dtype {dtype:?} failed: {err}");
        out.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let f16 = gen(None);
    let q8 = gen(Some("q8_0"));
    let same = f16.iter().zip(&q8).filter(|(a, b)| a == b).count();
    assert!(
        same * 4 >= f16.len() * 3,
        "q8_0 text departs from f16's: {same} of {} words equal\nf16: {f16:?}\nq8_0: {q8:?}",
        f16.len()
    );
    assert!(gen(Some("q4_1")).len() > 4);
    let (ok, _, err) = run(&[
        "generate", "--prompt", "x", "--dtype", "q8_0", "--device", "emu",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--dtype q8_0") && err.contains("CPU only") && err.lines().count() == 1,
        "{err}"
    );
}
