//! ptxgen: `ptxgen` rewrites ptx/*.ptx and ptx/ptxas-report.txt from
//! kernels/*.cu with the pinned NVRTC and ptxas (kernels/requirements.txt);
//! `ptxgen --check` (CI) writes nothing and fails on any difference from the
//! committed files, on a compile error, or on a spill in a `kf-hot` kernel.
//! Both print the resource report.

use anyhow::{bail, Result};
use kf_ptxgen::{differences, generate, locate, repo_root};
use std::process::ExitCode;

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = match args.as_slice() {
        [] => false,
        [a] if a == "--check" => true,
        _ => bail!("usage: ptxgen [--check]"),
    };
    let root = repo_root();
    let tc = locate(&root)?;
    let t0 = std::time::Instant::now();
    let g = generate(&root, &tc)?;
    let report = &g.files.last().expect("the report").1;
    print!("{report}");
    if check {
        let bad = differences(&root, &g);
        if !bad.is_empty() {
            bail!(
                "the committed PTX is not what the pinned NVRTC makes of kernels/ \
                 (run `cargo run --release -p kf-ptxgen` and commit):\n  {}",
                bad.join("\n  ")
            );
        }
    } else {
        for (rel, text) in &g.files {
            std::fs::write(root.join(rel), text)?;
            println!("wrote {rel}");
        }
    }
    if !g.hot_spills.is_empty() {
        bail!("hot kernels spill:\n  {}", g.hot_spills.join("\n  "));
    }
    println!(
        "ptxgen: {} kernels, PTX {} ({:.1} s)",
        g.resources.len() / kf_ptxgen::SASS_ARCHS.len(),
        if check { "up to date" } else { "written" },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ptxgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
