//! kfrun: the single binary of the K-Forcing engine. Subcommands so far:
//! `inspect` (list the tensors of a safetensors file), `init-weights` (random
//! DDiT-shaped weights with the checkpoint names of KFORCING.md section 2) and
//! `bench gemm` (CPU GEMM against numpy/OpenBLAS). Errors print one line and
//! exit non-zero; usage errors exit 2.

mod bench_gemm;
mod init_weights;
mod inspect;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kfrun",
    version,
    about = "K-Forcing engine: train an AR teacher, distill a push-forward LM, generate k tokens per pass",
    propagate_version = true
)]
struct Cli {
    /// Worker threads for CPU ops (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List name, dtype, shape and bytes of every tensor in a .safetensors file.
    Inspect {
        /// The .safetensors file.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write random DDiT-shaped weights (KFORCING.md tensor names) to a .safetensors file.
    InitWeights(init_weights::Args),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// f32 GEMM GFLOP/s for the Transformer's shapes, next to numpy/OpenBLAS on the same threads.
    Gemm {
        /// Write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = match cli.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot start {threads} worker threads: {e}"))?;
    match cli.cmd {
        Cmd::Inspect { file, json } => inspect::run(&file, json),
        Cmd::InitWeights(a) => init_weights::run(&a),
        Cmd::Bench { which } => match which {
            BenchCmd::Gemm { json } => bench_gemm::run(threads, json.as_deref()),
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // one line: the chain of contexts joined with ": "
            eprintln!("kfrun: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
