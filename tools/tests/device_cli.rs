//! `--device cuda` where the model cannot run on a GPU: every model command
//! (generate, bench, eval, train, distill) prints one clear error line and exits
//! 1, never panics. Built without the cuda feature the line says so; with it,
//! it names what is missing (the driver library; with a stand-in libcuda built
//! by `cc`, the device); with a usable GPU every command runs on it and fails later, on
//! its first missing file (bench: on the tiny architecture's head dim).

use std::path::Path;
use std::process::{Command, Output};

/// Each model command with just enough arguments to reach the device check
/// (which comes before any file is read).
const COMMANDS: &[&[&str]] = &[
    &["generate", "--model", "/nonexistent/m", "--prompt", "x"],
    &["bench", "--arch", "tiny", "--runs", "1"],
    &[
        "eval",
        "--teacher",
        "/nonexistent/t",
        "--student",
        "/nonexistent/s",
        "--data",
        "/nonexistent/d",
    ],
    &[
        "train",
        "--config",
        "/nonexistent/c.json",
        "--data",
        "/nonexistent/d",
        "--out",
        "/nonexistent/o",
    ],
    &[
        "distill",
        "--teacher",
        "/nonexistent/t",
        "--data",
        "/nonexistent/d",
        "--out",
        "/nonexistent/o",
        "--recipe",
        "/nonexistent/r.json",
    ],
];

fn kfrun(args: &[&str], device: &str, lib_dir: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kfrun"));
    c.args(args).args(["--device", device]);
    if let Some(d) = lib_dir {
        c.env("LD_LIBRARY_PATH", d);
    }
    c.output().expect("kfrun runs")
}

/// Exit code 1, nothing on stdout, exactly one line on stderr: the error
/// containing `want`, no panic.
fn one_clear_error(out: &Output, what: &str, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(out.stdout.is_empty(), "{what}: stdout not empty");
    assert!(!err.contains("panicked"), "{what}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: not one line:\n{err}");
    assert!(lines[0].starts_with("kfrun: error: "), "{what}: {err}");
    assert!(lines[0].contains(want), "{what}: {err}\nwanted: {want}");
}

/// What `--device cuda` should say on this machine and build.
#[cfg(not(feature = "cuda"))]
fn expected_cuda_error(_cmd: &str) -> String {
    "this kfrun was built without the cuda feature".to_string()
}

/// What `--device cuda` should say on this machine and build.
#[cfg(feature = "cuda")]
fn expected_cuda_error(cmd: &str) -> String {
    match kf_engine::cuda::CudaDevice::get(0) {
        // generate runs on a GPU: it gets as far as the missing model directory
        Ok(_) if cmd == "generate" => "/nonexistent/m".to_string(),
        // bench runs on a GPU too: --arch tiny has head dim 16, which no attention kernel takes
        Ok(_) if cmd == "bench" => "head dim 16 has no kernel".to_string(),
        // eval, train and distill too: they get as far as their first missing file
        Ok(_) => "/nonexistent/".to_string(),
        Err(e) => format!("--device cuda: {e:#}"),
    }
}

#[test]
fn cuda_is_one_clear_error_for_every_model_command() {
    for args in COMMANDS {
        let what = args[0];
        for device in ["cuda", "cuda:0", "gpu"] {
            let out = kfrun(args, device, None);
            let want =
                expected_cuda_error(what).replace("--device cuda", &format!("--device {device}"));
            one_clear_error(&out, &format!("{what} --device {device}"), &want);
        }
        one_clear_error(
            &kfrun(args, "cuda:x", None),
            what,
            "the ordinal after cuda: must be a number",
        );
        one_clear_error(&kfrun(args, "tpu", None), what, "unknown device");
    }
}

#[test]
fn without_a_driver_library_the_sentence_names_it() {
    #[cfg(feature = "cuda")]
    if kf_engine::cuda::check_driver().is_ok() {
        println!("skipped: a CUDA driver library is installed here");
        return;
    }
    let want = if cfg!(feature = "cuda") {
        "the CUDA driver library was not found"
    } else {
        "built without the cuda feature"
    };
    let out = kfrun(COMMANDS[0], "cuda", None);
    one_clear_error(&out, "generate --device cuda", want);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--device cpu"),
        "the error offers no way out: {err}"
    );
}

/// With a libcuda whose every call answers CUDA_ERROR_NO_DEVICE first on the
/// loader's path, the error says there is no device.
#[cfg(feature = "cuda")]
#[test]
fn with_a_driver_but_no_gpu_the_sentence_says_no_device() {
    let dir = std::env::temp_dir().join(format!("kfrun-fake-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut src = String::from(
        "int cuGetErrorName(int e, const char **s) { *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }\n\
         int cuGetErrorString(int e, const char **s) { *s = \"no CUDA-capable device is detected\"; return 0; }\n",
    );
    for s in kf_engine::cuda::DRIVER_SYMBOLS {
        if !s.starts_with("cuGetError") {
            src += &format!("int {s}(void) {{ return 100; }}\n");
        }
    }
    std::fs::write(dir.join("fake_cuda.c"), src).unwrap();
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.join("libcuda.so"))
        .arg(dir.join("fake_cuda.c"))
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        println!("skipped: no C compiler (cc) to build the stand-in libcuda");
        return;
    }
    for args in COMMANDS {
        one_clear_error(
            &kfrun(args, "cuda", Some(&dir)),
            args[0],
            "--device cuda: no CUDA device: the driver is installed but sees no GPU \
             (CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected))",
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
