//! `kfrun eval`: quality of a teacher / student pair on held-out prompts (kf_model::eval):
//! generative perplexity under the teacher, unigram entropy per sample, push-forward
//! agreement, for AR and the student at K = 1..k with a frequency-penalty sweep, and with
//! `--judge` the perplexity under an independent model with its own tokenizer. A Markdown
//! table on stdout, JSON (options + rows) to `--json`.

use crate::weights_arg::ServeAs;
use anyhow::{bail, ensure, Context, Result};
use kf_model::checkpoint;
use kf_model::data::TokenData;
use kf_model::eval::{document_prompts, evaluate, markdown, text_prompts, EvalOptions, Judge};
use kf_model::pflm::Pflm;
use kf_model::weights::WeightStore;
use kf_model::Ddit;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The AR teacher's model directory.
    #[arg(long)]
    teacher: PathBuf,
    /// The PFLM student's model directory.
    #[arg(long)]
    student: PathBuf,
    /// Prepared token shards: prompts come from the validation split (val.bin).
    #[arg(
        long,
        required_unless_present = "prompts_file",
        conflicts_with = "prompts_file"
    )]
    data: Option<PathBuf>,
    /// Prompts as text instead, one per line (blank lines skipped), tokenised with the
    /// teacher's tokenizer: no shards needed.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Prompts (validation documents or lines, in order).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    prompts: usize,
    /// Tokens of each prompt (the start of its document or line).
    #[arg(long, default_value_t = 6, allow_negative_numbers = true)]
    prompt_len: usize,
    /// Tokens generated per prompt (fixed: no EOS stop).
    #[arg(long, default_value_t = 48, allow_negative_numbers = true)]
    max_new: usize,
    /// Frequency penalties of the student sweep, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.5,1,2",
        allow_negative_numbers = true
    )]
    penalties: Vec<f64>,
    /// Student windows K to evaluate, comma-separated [default: 1..=k].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    ks: Option<Vec<usize>>,
    /// Temperature (AR sampling; the student's noise encoder; the teacher's rollout).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    tau: f64,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// An independent judge (a GGUF file, a Hugging Face directory or a model directory,
    /// with its own tokenizer): scores every configuration's text after retokenising it, as
    /// the paper scores with GPT-2-Large (the "judge ppl" column).
    #[arg(long)]
    judge: Option<PathBuf>,
    /// Serve the student's weight matrices as f32, f16 or bf16, or as ggml blocks q8_0,
    /// q4_0 or q4_1 (integer kernels, CPU only): the quality a rounded student keeps. The
    /// teacher and the judge score at their own precision [default: the file's].
    #[arg(long, value_parser = crate::weights_arg::VALUES)]
    student_dtype: Option<String>,
    /// Write the options and rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Device: cpu (the CPU ops), cuda / cuda:N (the CUDA kernels on a GPU; a build with the
    /// cuda feature), or emu (the same kernels on the CPU emulator: slow, a check only).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: &Args) -> Result<()> {
    let device = crate::device_arg::select_device(&a.device)?;
    ensure!(
        a.tau.is_finite() && a.tau > 0.0,
        "--tau must be finite and > 0, got {}",
        a.tau
    );
    ensure!(a.max_new >= 1, "--max-new must be at least 1");
    for p in &a.penalties {
        ensure!(p.is_finite(), "--penalties: {p} is not finite");
    }
    // f16 / bf16 files serve from 16-bit tables, on every device
    let teacher = Ddit::load_with(&a.teacher, WeightStore::Exact)?;
    checkpoint::check_finite(&a.teacher.join(checkpoint::WEIGHTS_FILE), teacher.params())?;
    ensure!(
        teacher.cfg.k.is_none(),
        "--teacher {} is a k = {} student; pass the AR teacher",
        a.teacher.display(),
        teacher.cfg.k.unwrap_or(0)
    );
    let scfg = checkpoint::read_config(&a.student)?;
    ensure!(
        scfg.k.is_some(),
        "--student {} is an AR model (its config.json has no \"k\"); pass a PFLM student",
        a.student.display()
    );
    let student = Pflm::load_with(&a.student, WeightStore::Exact)?;
    let student = match ServeAs::of(a.student_dtype.as_deref())? {
        Some(d) => {
            d.check_device(device)?;
            d.pflm(&student).with_context(|| {
                format!(
                    "--student-dtype {}",
                    a.student_dtype.as_deref().unwrap_or("")
                )
            })?
        }
        None => student,
    };
    let tok = checkpoint::read_tokenizer(&a.teacher, &teacher.cfg)?;
    let judge = match &a.judge {
        None => None,
        Some(p) => {
            let load = || -> Result<_> {
                // f32 weights: the judge scores, so it computes exactly
                let m = Ddit::load(p)?;
                ensure!(
                    m.cfg.k.is_none(),
                    "it is a k = {} student; a judge is an AR model",
                    m.cfg.k.unwrap_or(0)
                );
                let t = checkpoint::read_tokenizer(p, &m.cfg)?;
                Ok((m, t))
            };
            Some(load().with_context(|| format!("--judge {}", p.display()))?)
        }
    };
    let (prompts, source) = match (&a.data, &a.prompts_file) {
        (Some(d), _) => {
            let data = TokenData::open(d)?;
            ensure!(
                data.meta.vocab_size == teacher.cfg.vocab_size,
                "--data {} has a vocabulary of {} but the teacher's is {}",
                d.display(),
                data.meta.vocab_size,
                teacher.cfg.vocab_size
            );
            let p = document_prompts(&data.val, data.meta.eos_id, a.prompts, a.prompt_len)?;
            (p, data.val.path().display().to_string())
        }
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("--prompts-file {}", f.display()))?;
            let p = text_prompts(&text, &tok, a.prompts, a.prompt_len)
                .with_context(|| format!("--prompts-file {}", f.display()))?;
            (p, f.display().to_string())
        }
        (None, None) => bail!("pass --data (prepared shards) or --prompts-file (text)"),
    };
    ensure!(
        a.prompt_len + a.max_new <= teacher.cfg.max_seq_len,
        "--prompt-len {} + --max-new {} exceeds the models' max_seq_len {}",
        a.prompt_len,
        a.max_new,
        teacher.cfg.max_seq_len
    );
    let opts = EvalOptions {
        n_prompts: prompts.len(),
        prompt_len: a.prompt_len,
        max_new: a.max_new,
        seed: a.seed,
        tau: a.tau,
        penalties: a.penalties.clone(),
        vocab_limit: Some(tok.vocab_size()),
        ks: a.ks.clone(),
    };
    eprintln!(
        "kfrun eval: {} prompts of {} tokens from {}, {} new tokens each, tau {}, seed {}; student k = {}",
        prompts.len(),
        a.prompt_len,
        source,
        a.max_new,
        a.tau,
        a.seed,
        student.k
    );
    // on a kernel device the matrices keep their file's precision (as kfrun generate)
    let (teacher, student, judge) = if device.is_cpu() {
        (teacher, student, judge)
    } else {
        let store = WeightStore::Exact;
        let moved = || -> Result<_> {
            Ok((
                teacher.to_device_with(device, store)?,
                student.to_device_with(device, store)?,
                judge
                    .map(|(m, t)| Ok::<_, anyhow::Error>((m.to_device(device)?, t)))
                    .transpose()?,
            ))
        };
        moved().with_context(|| format!("moving the models to {device}"))?
    };
    let judge = judge.as_ref().map(|(model, tokenizer)| Judge {
        model,
        tokenizer,
        source: &tok,
    });
    let rows = evaluate(
        &teacher,
        &student,
        judge.as_ref(),
        &prompts,
        &opts,
        &mut |r| {
            eprintln!(
                "  {} K={} penalty {}: gen. ppl {:.2}{}, entropy {:.3}{} ({:.1} s)",
                r.mode,
                r.k,
                r.freq_penalty,
                r.gen_ppl,
                r.judge_ppl
                    .map_or(String::new(), |j| format!(", judge ppl {j:.2}")),
                r.entropy_mean,
                r.agree_tokens
                    .map_or(String::new(), |t| format!(", agreement {t:.3}")),
                r.gen_secs
            )
        },
    )?;
    print!("{}", markdown(&rows));
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "teacher": a.teacher,
            "student": a.student,
            "student_dtype": a.student_dtype,
            "data": a.data,
            "prompts_file": a.prompts_file,
            "prompts": prompts.len(),
            "prompt_len": a.prompt_len,
            "max_new": a.max_new,
            "tau": a.tau,
            "seed": a.seed,
            "judge": a.judge,
            "rows": rows,
        });
        kf_engine::fs::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())
            .with_context(|| format!("--json {}", p.display()))?;
        eprintln!("kfrun eval: wrote {}", p.display());
    }
    Ok(())
}
