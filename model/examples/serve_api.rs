//! Embedding the engine: load a model directory, submit requests from several threads,
//! stream their tokens as text, cancel one. Run from the repository root:
//!
//! ```text
//! cargo run --release -p kf-model --example serve_api -- models/default/student
//! ```

use anyhow::{Context, Result};
use kf_engine::Device;
use kf_model::batch::SeqParams;
use kf_model::serve::{Engine, EngineOptions, Event};

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/default/student".into());
    let engine = Engine::load(dir.as_ref(), Device::Cpu, EngineOptions::default())
        .with_context(|| format!("loading {dir}"))?;
    let tok = engine
        .tokenizer()
        .context("the model has no tokenizer.json")?
        .clone();
    let info = engine.info().clone();
    println!("{} ({} tokens per pass at most)", info.name, info.max_k);
    std::thread::scope(|s| -> Result<()> {
        let mut jobs = Vec::new();
        for (i, prompt) in ["Once upon a time", "The king said", "To be or not"]
            .iter()
            .enumerate()
        {
            let (engine, tok) = (&engine, &tok);
            jobs.push(s.spawn(move || -> Result<String> {
                let params = SeqParams {
                    max_new: 24,
                    k: info.max_k,
                    seed: i as u64,
                    eos: info.eos,
                    ..SeqParams::new(tok.encode(prompt)?)
                };
                let mut stream = engine.submit(params)?;
                let mut dec = tok.stream_decoder();
                let mut text = prompt.to_string();
                let mut steps = 0;
                while let Some(ev) = stream.next() {
                    match ev {
                        Event::Tokens { ids, .. } => {
                            text += &dec.extend(&ids)?;
                            steps += 1;
                            // the third request is cancelled after two steps
                            if i == 2 && steps == 2 {
                                stream.cancel();
                            }
                        }
                        Event::Done(why) => text += &format!("{}  [{why:?}]", dec.finish()?),
                        Event::Error(e) => anyhow::bail!(e),
                        Event::PromptLogprobs(_) => {}
                    }
                }
                Ok(text)
            }));
        }
        for j in jobs {
            let text = j
                .join()
                .map_err(|_| anyhow::anyhow!("a thread panicked"))??;
            println!("---\n{text}");
        }
        Ok(())
    })
}
