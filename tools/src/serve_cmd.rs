//! `kfrun serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the serving
//! engine (`kf_model::serve`): `POST /v1/completions` (streamed as server-sent events or
//! not), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). Requests are
//! checked field by field (OpenAI-style JSON errors, 4xx), turned into engine requests (one
//! per prompt), and their token events into completion text, with stop strings applied
//! to the text. SIGTERM / Ctrl-C: stop accepting, let running requests finish (up to
//! `--shutdown-grace`; the rest end with finish_reason "shutdown"), exit 0.

use crate::device_arg::select_device;
use crate::weights_arg::ServeAs;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream as FStream, StreamExt};
use kf_model::batch::SeqParams;
use kf_model::serve::{Done, Engine, EngineOptions, Event, Stream, SubmitError};
use kf_model::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory: an AR model or a PFLM student (config.json, model.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the bound address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Device: cpu, cuda / cuda:N (a build with the cuda feature) or emu (the CUDA kernels on
    /// the CPU emulator: slow, a check only).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Serve the weight matrices as f32, f16 or bf16, or as ggml blocks q8_0, q4_0 or q4_1
    /// (rounded; integer kernels, CPU only) [default: the file's precision].
    #[arg(long, value_parser = crate::weights_arg::VALUES)]
    pub dtype: Option<String>,
    /// Sequences advanced together per decode step at most.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Requests waiting for a batch slot at most; more get 429 at once.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest max_tokens a request may ask for (default: the model's context).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Seconds running requests get to finish after SIGTERM before they are ended.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
}

pub fn run(a: &Args) -> Result<()> {
    anyhow::ensure!(a.max_batch >= 1, "--max-batch must be at least 1");
    anyhow::ensure!(
        a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0,
        "--shutdown-grace must be >= 0 seconds"
    );
    let device = select_device(&a.device)?;
    let opts = EngineOptions {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        ..EngineOptions::default()
    };
    let serve_as = ServeAs::of(a.dtype.as_deref())?;
    if let Some(d) = serve_as {
        d.check_device(device)?;
    }
    let engine = Engine::load_then(&a.model, device, opts, |m| match serve_as {
        Some(d) => d.model(m),
        None => Ok(m),
    })
    .with_context(|| format!("loading {}", a.model.display()))?;
    let tok = engine.tokenizer().cloned().with_context(|| {
        format!(
            "{} has no tokenizer.json: the server takes text prompts",
            a.model.display()
        )
    })?;
    let max_tokens = a
        .max_tokens
        .unwrap_or(engine.info().max_seq_len)
        .min(engine.info().max_seq_len);
    let rt = runtime()?;
    let app = App::new(engine, tok, max_tokens);
    let grace = Duration::from_secs_f64(a.shutdown_grace);
    let (host, port) = (a.host.as_str(), a.port);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        let info = app.engine.info();
        let kind = if info.is_pflm {
            "PFLM student"
        } else {
            "AR model"
        };
        println!(
            "kfrun serve: {} ({kind}, {} tokens per pass at most) on http://{addr}",
            info.name, info.max_k
        );
        serve_on(listener, app, grace, async {
            shutdown_signal().await;
        })
        .await?;
        eprintln!("kfrun serve: stopped");
        Ok(())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")
}

/// A server running on a background thread (`kfrun bench serve`), on 127.0.0.1.
pub struct Background {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Background {
    /// Starts `engine` behind the HTTP API on a free loopback port.
    pub fn start(engine: Engine, tok: Arc<Tokenizer>, max_tokens: usize) -> Result<Background> {
        let rt = runtime()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = App::new(engine, tok, max_tokens);
        let thread = std::thread::spawn(move || {
            rt.block_on(serve_on(listener, app, Duration::ZERO, async {
                let _ = rx.await;
            }))
        });
        Ok(Background {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the server thread panicked"),
            None => Ok(()),
        }
    }
}

/// Serves `app` on `listener` until `stop` completes, then lets running requests finish
/// (up to `grace`).
async fn serve_on(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    grace: Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let router = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            api_error(StatusCode::NOT_FOUND, "not_found", None, "no such endpoint")
        })
        .with_state(app.clone());
    let stop_app = app.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            stop.await;
            eprintln!("kfrun serve: shutting down (running requests get {grace:?} to finish)");
            stop_app.engine.shutdown(grace);
        })
        .await
        .context("the HTTP server failed")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

struct App {
    engine: Engine,
    /// Ids past the tokenizer's vocabulary are never produced (a model's padded vocabulary).
    vocab_limit: Option<usize>,
    tok: Arc<Tokenizer>,
    max_tokens: usize,
    created: u64,
    /// Seeds for requests without one (each gets a different one).
    next_seed: AtomicU64,
}

impl App {
    fn new(engine: Engine, tok: Arc<Tokenizer>, max_tokens: usize) -> Arc<App> {
        let v = tok.vocab_size();
        Arc::new(App {
            vocab_limit: (v < engine.info().vocab_size).then_some(v),
            engine,
            tok,
            max_tokens,
            created: unix_now(),
            next_seed: AtomicU64::new(unix_now() ^ 0x9e37_79b9_7f4a_7c15),
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An OpenAI-style error response.
fn api_error(
    code: StatusCode,
    kind: &str,
    param: Option<&str>,
    msg: impl Into<String>,
) -> Response {
    let body = json!({
        "error": {"message": msg.into(), "type": kind, "param": param, "code": Value::Null}
    });
    (code, Json(body)).into_response()
}

/// A request error naming the field.
struct BadField(&'static str, String);

impl BadField {
    fn into_response(self) -> Response {
        api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some(self.0),
            self.1,
        )
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.engine.is_accepting() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let body = Json(json!({"status": "shutting down"}));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let i = app.engine.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": i.name, "object": "model", "created": app.created, "owned_by": "kfrun",
            "k": i.max_k, "max_seq_len": i.max_seq_len,
            "kind": if i.is_pflm { "pflm" } else { "ar" },
        }]
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.engine.metrics_text(),
    )
        .into_response()
}

/// A parsed completion request.
struct Completion {
    prompts: Vec<Vec<u32>>,
    prompt_texts: Vec<String>,
    max_tokens: usize,
    temperature: f64,
    seed: u64,
    stop: Vec<String>,
    stream: bool,
    logprobs: bool,
    echo: bool,
    k: usize,
    penalty: f64,
    /// vLLM's extension: generate max_tokens tokens even past the stop token.
    ignore_eos: bool,
}

fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn uint(o: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, BadField> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            BadField(
                name,
                format!("'{name}' must be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn number(o: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, BadField> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| BadField(name, format!("'{name}' must be a number, got {v}"))),
    }
}

fn boolean(o: &Map<String, Value>, name: &'static str) -> Result<bool, BadField> {
    match field(o, name) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| BadField(name, format!("'{name}' must be true or false, got {v}"))),
    }
}

/// One string or a list of strings (`what` for the messages).
fn strings(o: &Map<String, Value>, name: &'static str) -> Result<Option<Vec<String>>, BadField> {
    let bad = || {
        BadField(
            name,
            format!("'{name}' must be a string or a list of strings"),
        )
    };
    match field(o, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(bad()),
    }
}

impl App {
    /// Checks the body field by field against the model and the server's limits.
    fn parse(&self, body: &[u8]) -> Result<Completion, Response> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(o) = v else {
            return Err(BadField("body", "the body must be a JSON object".into()).into_response());
        };
        self.parse_fields(&o).map_err(|e| match e {
            Err(r) => r,
            Ok(b) => b.into_response(),
        })
    }

    fn parse_fields(
        &self,
        o: &Map<String, Value>,
    ) -> Result<Completion, Result<BadField, Response>> {
        let info = self.engine.info();
        if let Some(m) = field(o, "model") {
            let ok = m.as_str().is_some_and(|m| m == info.name);
            if !ok {
                return Err(Err(api_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("model"),
                    format!(
                        "model {m} does not exist; this server serves \"{}\"",
                        info.name
                    ),
                )));
            }
        }
        let prompt_texts = strings(o, "prompt")
            .map_err(Ok)?
            .ok_or_else(|| Ok(BadField("prompt", "'prompt' is required".into())))?;
        if prompt_texts.is_empty() {
            return Err(Ok(BadField("prompt", "'prompt' is an empty list".into())));
        }
        let mut prompts = Vec::with_capacity(prompt_texts.len());
        for (i, t) in prompt_texts.iter().enumerate() {
            let ids = self.tok.encode(t).map_err(|e| {
                Ok(BadField(
                    "prompt",
                    format!("prompt {i} cannot be tokenised: {e:#}"),
                ))
            })?;
            if ids.is_empty() {
                return Err(Ok(BadField(
                    "prompt",
                    format!("prompt {i} is empty (no tokens)"),
                )));
            }
            prompts.push(ids);
        }
        let max_tokens = uint(o, "max_tokens").map_err(Ok)?.unwrap_or(16) as usize;
        if max_tokens > self.max_tokens {
            return Err(Ok(BadField(
                "max_tokens",
                format!(
                    "'max_tokens' {max_tokens} is above this server's limit of {}",
                    self.max_tokens
                ),
            )));
        }
        for (i, p) in prompts.iter().enumerate() {
            if p.len() + max_tokens > info.max_seq_len {
                return Err(Ok(BadField(
                    "max_tokens",
                    format!(
                        "prompt {i} has {} tokens; with 'max_tokens' {max_tokens} that is past the model's context of {} tokens",
                        p.len(),
                        info.max_seq_len
                    ),
                )));
            }
        }
        let temperature = number(o, "temperature").map_err(Ok)?.unwrap_or(1.0);
        if temperature < 0.0 {
            return Err(Ok(BadField(
                "temperature",
                "'temperature' must be >= 0".into(),
            )));
        }
        let seed = uint(o, "seed")
            .map_err(Ok)?
            .unwrap_or_else(|| self.next_seed.fetch_add(0x9e37_79b9, Ordering::Relaxed));
        let stop = strings(o, "stop").map_err(Ok)?.unwrap_or_default();
        if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
            return Err(Ok(BadField(
                "stop",
                "'stop' takes up to 4 non-empty strings".into(),
            )));
        }
        let stream = boolean(o, "stream").map_err(Ok)?;
        let echo = boolean(o, "echo").map_err(Ok)?;
        let logprobs = match uint(o, "logprobs").map_err(Ok)? {
            None => false,
            Some(n) if n <= 5 => true,
            Some(n) => {
                return Err(Ok(BadField(
                    "logprobs",
                    format!("'logprobs' must be in 0..=5, got {n}"),
                )))
            }
        };
        if logprobs && info.is_pflm {
            return Err(Ok(BadField(
                "logprobs",
                "log-probabilities come from an AR model; this server runs a PFLM student (argmax read-off)".into(),
            )));
        }
        if max_tokens == 0 && !(echo && logprobs) {
            return Err(Ok(BadField(
                "max_tokens",
                "'max_tokens' 0 generates nothing; use it with 'echo' and 'logprobs' to score a text".into(),
            )));
        }
        let k = uint(o, "k").map_err(Ok)?.map_or(info.max_k, |k| k as usize);
        if k < 1 || k > info.max_k {
            return Err(Ok(BadField(
                "k",
                format!("'k' must be in 1..={} for this model, got {k}", info.max_k),
            )));
        }
        let penalty = number(o, "frequency_penalty").map_err(Ok)?.unwrap_or(0.0);
        if penalty != 0.0 && !info.is_pflm {
            return Err(Ok(BadField(
                "frequency_penalty",
                "'frequency_penalty' is the PFLM student's argmax penalty; this server runs an AR model".into(),
            )));
        }
        for n in ["n", "best_of"] {
            if let Some(v) = field(o, n) {
                if v.as_u64() != Some(1) {
                    return Err(Ok(BadField(
                        if n == "n" { "n" } else { "best_of" },
                        format!("'{n}' must be 1 (one completion per prompt)"),
                    )));
                }
            }
        }
        let ignore_eos = boolean(o, "ignore_eos").map_err(Ok)?;
        Ok(Completion {
            ignore_eos,
            prompts,
            prompt_texts,
            max_tokens,
            temperature,
            seed,
            stop,
            stream,
            logprobs,
            echo,
            k,
            penalty,
        })
    }

    /// Queues one engine request per prompt (prompt `i` on noise stream `i`).
    fn submit(&self, c: &Completion) -> Result<Vec<Stream>, Response> {
        let mut out = Vec::with_capacity(c.prompts.len());
        for (i, p) in c.prompts.iter().enumerate() {
            let params = SeqParams {
                max_new: c.max_tokens,
                tau: c.temperature,
                seed: c.seed,
                stream: i as u64,
                k: c.k,
                penalty: c.penalty,
                eos: if c.ignore_eos {
                    None
                } else {
                    self.engine.info().eos
                },
                vocab_limit: self.vocab_limit,
                logprobs: c.logprobs,
                prompt_logprobs: c.logprobs && c.echo,
                ..SeqParams::new(p.clone())
            };
            match self.engine.submit(params) {
                Ok(s) => out.push(s),
                // the streams already queued are dropped, which cancels them
                Err(SubmitError::QueueFull(n)) => {
                    return Err(api_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        None,
                        format!("the server is busy ({n} requests waiting); retry later"),
                    ))
                }
                Err(SubmitError::ShuttingDown) => {
                    return Err(api_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        None,
                        "the server is shutting down",
                    ))
                }
                Err(SubmitError::Invalid(e)) => {
                    return Err(api_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        None,
                        format!("{e:#}"),
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// One prompt's completion being built from its events: text (stop strings applied,
/// held back while it could still be the start of one), tokens and log-probs.
struct Choice {
    index: usize,
    tok: Arc<Tokenizer>,
    stop: Vec<String>,
    ids: Vec<u32>,
    /// Full text so far (echoed prompt included) and how much of it was sent.
    text: String,
    sent: usize,
    logprobs: Option<LogprobsOut>,
    finish: Option<&'static str>,
    error: Option<String>,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Byte length of the echoed prompt at the start of `text`.
    echo_len: usize,
    /// The stop token (None with ignore_eos).
    eos: Option<u32>,
    /// Tokens taken since the last chunk was sent.
    unsent_tokens: usize,
}

#[derive(Default)]
struct LogprobsOut {
    tokens: Vec<String>,
    token_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
    sent: usize,
}

impl Choice {
    fn new(app: &App, c: &Completion, index: usize) -> Choice {
        let mut ch = Choice {
            index,
            tok: app.tok.clone(),
            stop: c.stop.clone(),
            ids: Vec::new(),
            text: String::new(),
            sent: 0,
            logprobs: c.logprobs.then(LogprobsOut::default),
            finish: None,
            error: None,
            prompt_tokens: c.prompts[index].len(),
            completion_tokens: 0,
            echo_len: 0,
            eos: if c.ignore_eos {
                None
            } else {
                app.engine.info().eos
            },
            unsent_tokens: 0,
        };
        if c.echo {
            ch.text = c.prompt_texts[index].clone();
            ch.echo_len = ch.text.len();
            if let Some(lp) = ch.logprobs.as_mut() {
                // the prompt's tokens; their log-probs arrive with PromptLogprobs
                let mut off = 0;
                for &id in &c.prompts[index] {
                    let s = ch.tok.decode(&[id]).unwrap_or_default();
                    lp.text_offset.push(off);
                    off += s.len();
                    lp.tokens.push(s);
                    lp.token_logprobs.push(Value::Null);
                }
            }
        }
        ch
    }

    /// Takes one engine event; returns true when the choice is complete.
    fn take(&mut self, ev: Event) -> bool {
        match ev {
            Event::PromptLogprobs(lp) => {
                if let Some(out) = self.logprobs.as_mut() {
                    for (i, x) in lp.into_iter().enumerate() {
                        if let Some(slot) = out.token_logprobs.get_mut(i + 1) {
                            *slot = json!(x);
                        }
                    }
                }
                false
            }
            Event::Tokens { ids, logprobs } => {
                for (j, id) in ids.iter().enumerate() {
                    if self.finish.is_some() {
                        break;
                    }
                    self.completion_tokens += 1;
                    self.unsent_tokens += 1;
                    if Some(*id) == self.eos {
                        // the stop token ends the text without being part of it
                        self.finish = Some("stop");
                        break;
                    }
                    self.ids.push(*id);
                    let before = self.text.len();
                    let full = self.tok.decode(&self.ids).unwrap_or_default();
                    let gen_start = self.echo_len;
                    self.text.truncate(gen_start);
                    self.text.push_str(&full);
                    if let Some(out) = self.logprobs.as_mut() {
                        out.text_offset.push(before);
                        out.tokens.push(self.tok.decode(&[*id]).unwrap_or_default());
                        out.token_logprobs
                            .push(logprobs.get(j).map_or(Value::Null, |x| json!(x)));
                    }
                    if let Some(at) = self.stop_at() {
                        self.text.truncate(at);
                        self.finish = Some("stop");
                    }
                }
                self.finish.is_some()
            }
            Event::Done(d) => {
                if self.finish.is_none() {
                    self.finish = Some(match d {
                        Done::Eos => "stop",
                        Done::Length => "length",
                        Done::Cancelled => "cancelled",
                        Done::Shutdown => "shutdown",
                    });
                }
                true
            }
            Event::Error(e) => {
                self.error = Some(e);
                self.finish = Some("error");
                true
            }
        }
    }

    /// Where the first stop string starts in the generated text, if any.
    fn stop_at(&self) -> Option<usize> {
        let gen = &self.text[self.echo_len..];
        self.stop
            .iter()
            .filter_map(|s| gen.find(s.as_str()))
            .min()
            .map(|i| self.echo_len + i)
    }

    /// Text not sent yet that can be sent: all of it once finished, otherwise all but a tail
    /// that could still grow into a stop string (and never a replacement character of an
    /// incomplete UTF-8 sequence at the end).
    fn delta(&mut self) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            let hold = self
                .stop
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            end = end.saturating_sub(hold).max(self.sent.min(end));
            if self.text[..end].ends_with('\u{fffd}') {
                end -= '\u{fffd}'.len_utf8();
            }
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        if end <= self.sent {
            return String::new();
        }
        let d = self.text[self.sent..end].to_string();
        self.sent = end;
        d
    }

    /// The logprobs object of the tokens not reported yet.
    fn logprobs_json(&mut self) -> Value {
        let Some(lp) = self.logprobs.as_mut() else {
            return Value::Null;
        };
        let (from, upto) = (lp.sent, lp.tokens.len());
        lp.sent = upto;
        json!({
            "tokens": lp.tokens[from..upto],
            "token_logprobs": lp.token_logprobs[from..upto],
            "top_logprobs": Value::Null,
            "text_offset": lp.text_offset[from..upto],
        })
    }
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let c = match app.parse(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let streams = match app.submit(&c) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let id = format!("cmpl-{}", streams[0].id());
    let created = unix_now();
    let model = app.engine.info().name.clone();
    if c.stream {
        let chunks = streams.into_iter().enumerate().map(|(i, s)| {
            choice_chunks(
                Choice::new(&app, &c, i),
                s,
                id.clone(),
                created,
                model.clone(),
            )
        });
        let events = stream::select_all(chunks)
            .map(|v| Ok::<_, std::convert::Infallible>(SseEvent::default().data(v.to_string())))
            .chain(stream::once(async {
                Ok(SseEvent::default().data("[DONE]"))
            }));
        return Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut ch = Choice::new(&app, &c, i);
        while let Some(ev) = s.recv().await {
            if ch.take(ev) {
                break;
            }
        }
        if let Some(e) = ch.error.take() {
            return api_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, e);
        }
        prompt_tokens += ch.prompt_tokens;
        completion_tokens += ch.completion_tokens;
        let finish = ch.finish.unwrap_or("length");
        choices.push(json!({
            "text": ch.text, "index": i, "logprobs": ch.logprobs_json(), "finish_reason": finish,
        }));
    }
    Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// The SSE chunks of one choice: a chunk per step with new text, then one with its
/// finish_reason. Dropping this stream (client gone) drops the engine stream: cancelled.
fn choice_chunks(
    ch: Choice,
    s: Stream,
    id: String,
    created: u64,
    model: String,
) -> impl FStream<Item = Value> + Send + Unpin {
    Box::pin(stream::unfold(Some((ch, s)), move |state| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            let (mut ch, mut s) = state?;
            loop {
                let done = match s.recv().await {
                    Some(ev) => ch.take(ev),
                    None => {
                        ch.finish.get_or_insert("shutdown");
                        true
                    }
                };
                let text = ch.delta();
                // a chunk for every step that produced tokens (its text may be held back)
                if done || ch.unsent_tokens > 0 {
                    ch.unsent_tokens = 0;
                    let finish = if done { ch.finish } else { None };
                    let mut v = json!({
                        "id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{
                            "text": text, "index": ch.index, "logprobs": ch.logprobs_json(),
                            "finish_reason": finish,
                        }],
                    });
                    if let Some(e) = &ch.error {
                        v["error"] = json!({"message": e, "type": "server_error"});
                    }
                    return Some((v, (!done).then_some((ch, s))));
                }
            }
        }
    }))
}
