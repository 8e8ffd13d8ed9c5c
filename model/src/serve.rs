//! The serving engine: one scheduler thread owns the model and runs [`batch::step`] over
//! every live sequence; requests are submitted from any thread, wait in a bounded queue,
//! join the batch between steps and leave it when they finish or are cancelled. Tokens come
//! back as events on a per-request channel (an iterator for blocking callers, `recv().await`
//! for async ones). `kfrun serve` is an HTTP front end on this API.
//!
//! ```no_run
//! use kf_model::batch::SeqParams;
//! use kf_model::serve::{Engine, EngineOptions, Event};
//! use kf_engine::Device;
//!
//! let engine = Engine::load("models/default/student".as_ref(), Device::Cpu, EngineOptions::default())?;
//! let tok = engine.tokenizer().expect("the model directory has a tokenizer");
//! let params = SeqParams {
//!     max_new: 32,
//!     k: engine.info().max_k,
//!     ..SeqParams::new(tok.encode("Once upon a time")?)
//! };
//! for event in engine.submit(params)? {
//!     match event {
//!         Event::Tokens { ids, .. } => print!("{}", tok.decode(&ids)?),
//!         Event::Done(why) => println!("\n[{why:?}]"),
//!         Event::Error(e) => anyhow::bail!(e),
//!         Event::PromptLogprobs(_) => {}
//!     }
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```

use crate::batch::{self, Finish, Model, SeqParams, Sequence};
use crate::checkpoint;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use kf_engine::Device;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Limits of an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Sequences advanced together per step at most.
    pub max_batch: usize,
    /// Requests waiting to join at most; one more is refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// Prompt tokens admitted into one step at most (at least one request is always
    /// admitted): long prompts joining do not stall the running sequences for long.
    pub max_prefill_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 64,
            max_queue: 256,
            max_prefill_tokens: 2048,
        }
    }
}

/// What is being served.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The model directory's name.
    pub name: String,
    /// Tokens per pass at most (1 for an AR model).
    pub max_k: usize,
    pub is_pflm: bool,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub eos: Option<u32>,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Its stop token.
    Eos,
    /// `max_new` tokens.
    Length,
    /// Cancelled by the caller (or its receiver was dropped).
    Cancelled,
    /// The engine shut down before it finished.
    Shutdown,
}

/// What a request receives, in order: optionally `PromptLogprobs`, then `Tokens` events,
/// then exactly one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Log-probabilities of the prompt's tokens after the first (when asked for).
    PromptLogprobs(Vec<f64>),
    /// The tokens of one step (k of them for a student), with their log-probs when asked.
    Tokens {
        ids: Vec<u32>,
        logprobs: Vec<f64>,
    },
    Done(Done),
    Error(String),
}

/// Why a request was not queued.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds `max_queue` requests already.
    QueueFull(usize),
    /// The request does not fit the model (the message names the field).
    Invalid(anyhow::Error),
    /// The engine is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull(n) => write!(f, "the queue is full ({n} requests waiting)"),
            SubmitError::Invalid(e) => write!(f, "{e:#}"),
            SubmitError::ShuttingDown => write!(f, "the server is shutting down"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// A submitted request: its events, and a handle to cancel it. Dropping it cancels it.
pub struct Stream {
    id: u64,
    rx: mpsc::UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Stream {
    /// The engine's id of this request.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The next event, waiting for it (async); `None` after the last.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
    /// Stops the request: it leaves the batch before the next step and ends with
    /// `Done(Cancelled)` (unless it finished first).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
        self.shared.wake.notify_all();
    }
}

impl Iterator for Stream {
    type Item = Event;
    /// The next event, blocking the calling thread (not for use inside an async runtime).
    fn next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The serving engine (module docs).
pub struct Engine {
    shared: Arc<Shared>,
    info: ModelInfo,
    tokenizer: Option<Arc<Tokenizer>>,
    thread: Option<JoinHandle<()>>,
}

struct Job {
    params: SeqParams,
    tx: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
}

struct Queue {
    waiting: VecDeque<Job>,
    accepting: bool,
    /// After this instant, sequences still running end with `Done(Shutdown)`.
    deadline: Option<Instant>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    opts: EngineOptions,
    metrics: Metrics,
    next_id: AtomicU64,
}

impl Engine {
    /// Loads the model in `dir` ([`Model::load`]) and its tokenizer (when the directory has
    /// one), then starts the scheduler.
    pub fn load(dir: &Path, device: Device, opts: EngineOptions) -> Result<Engine> {
        Engine::load_then(dir, device, opts, Ok)
    }

    /// [`Engine::load`] with the model changed on the CPU first (see [`Model::load_then`]).
    pub fn load_then(
        dir: &Path,
        device: Device,
        opts: EngineOptions,
        change: impl FnOnce(Model) -> Result<Model>,
    ) -> Result<Engine> {
        let model = Model::load_then(dir, device, change)?;
        let tok = if crate::llama::is_gguf(dir) {
            Some(checkpoint::read_tokenizer(dir, model.cfg())?)
        } else {
            match checkpoint::model_file(dir, "tokenizer.json") {
                Ok(p) => Some(Tokenizer::from_file(p)?),
                Err(_) => None,
            }
        };
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Engine::start(model, tok, name, opts)
    }

    /// Starts the scheduler thread on `model` (`tokenizer` only travels with it, for the
    /// caller's use; `name` is what [`ModelInfo::name`] reports).
    ///
    /// ```
    /// use kf_model::batch::{Model, SeqParams};
    /// use kf_model::serve::{Done, Engine, EngineOptions, Event};
    /// use kf_model::{Ddit, DditConfig};
    ///
    /// let model = Model::Ar(Ddit::init(&DditConfig::preset("tiny")?, 0)?);
    /// let engine = Engine::start(model, None, "tiny".into(), EngineOptions::default())?;
    /// // two requests in flight at once: they share decode steps
    /// let a = engine.submit(SeqParams { max_new: 5, ..SeqParams::new(vec![1, 2, 3]) })?;
    /// let b = engine.submit(SeqParams { max_new: 3, seed: 9, ..SeqParams::new(vec![4]) })?;
    /// let count = |events: Vec<Event>| -> usize {
    ///     assert_eq!(events.last(), Some(&Event::Done(Done::Length)));
    ///     events.iter().map(|e| match e { Event::Tokens { ids, .. } => ids.len(), _ => 0 }).sum()
    /// };
    /// assert_eq!(count(b.collect()), 3);
    /// assert_eq!(count(a.collect()), 5);
    /// // a request the model cannot take is refused before it is queued, naming the field
    /// let err = engine.submit(SeqParams { k: 2, ..SeqParams::new(vec![1]) }).err().unwrap();
    /// assert!(err.to_string().starts_with("k:"));
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn start(
        model: Model,
        tokenizer: Option<Tokenizer>,
        name: String,
        opts: EngineOptions,
    ) -> Result<Engine> {
        anyhow::ensure!(opts.max_batch >= 1, "max_batch must be at least 1");
        let cfg = model.cfg();
        let info = ModelInfo {
            name,
            max_k: model.max_k(),
            is_pflm: model.is_pflm(),
            vocab_size: cfg.vocab_size,
            max_seq_len: cfg.max_seq_len,
            eos: tokenizer
                .as_ref()
                .and_then(|t| t.eos_id())
                .or(cfg.eos_token_id),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                accepting: true,
                deadline: None,
            }),
            wake: Condvar::new(),
            opts,
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kf-scheduler".into())
            .spawn(move || Scheduler::new(model, s2).run())
            .context("cannot start the scheduler thread")?;
        Ok(Engine {
            shared,
            info,
            tokenizer: tokenizer.map(Arc::new),
            thread: Some(thread),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// The model directory's tokenizer, if it has one.
    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }
    pub fn options(&self) -> &EngineOptions {
        &self.shared.opts
    }

    /// Queues a request. It is checked against the model first (`SubmitError::Invalid`
    /// names the field); a full queue refuses it at once.
    pub fn submit(&self, params: SeqParams) -> Result<Stream, SubmitError> {
        self.check(&params).map_err(SubmitError::Invalid)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = self.shared.queue.lock().expect("engine queue poisoned");
            if !q.accepting {
                return Err(SubmitError::ShuttingDown);
            }
            if q.waiting.len() >= self.shared.opts.max_queue {
                self.shared.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(SubmitError::QueueFull(q.waiting.len()));
            }
            q.waiting.push_back(Job {
                params,
                tx,
                cancel: cancel.clone(),
                submitted: Instant::now(),
            });
            self.shared
                .metrics
                .queued
                .store(q.waiting.len() as u64, Ordering::Relaxed);
        }
        self.shared.metrics.requests.fetch_add(1, Ordering::Relaxed);
        self.shared
            .metrics
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        self.shared.wake.notify_all();
        Ok(Stream {
            id,
            rx,
            cancel,
            shared: self.shared.clone(),
        })
    }

    /// The checks [`Engine::submit`] runs, without queuing (the same as
    /// [`SeqParams::check`], on the model's shape only).
    pub fn check(&self, p: &SeqParams) -> Result<()> {
        p.check_shape(
            self.info.vocab_size,
            self.info.max_seq_len,
            self.info.max_k,
            self.info.is_pflm,
        )
    }

    /// Whether new requests are taken (false once shutting down).
    pub fn is_accepting(&self) -> bool {
        self.shared
            .queue
            .lock()
            .expect("engine queue poisoned")
            .accepting
    }

    /// Requests queued or running.
    pub fn in_flight(&self) -> u64 {
        self.shared.metrics.in_flight.load(Ordering::Relaxed)
    }

    /// Stops accepting requests; those running or queued finish, until `grace` has passed,
    /// after which the rest end with `Done(Shutdown)`. Returns at once (see [`Engine::join`]).
    pub fn shutdown(&self, grace: Duration) {
        let mut q = self.shared.queue.lock().expect("engine queue poisoned");
        q.accepting = false;
        q.deadline = Some(Instant::now() + grace);
        drop(q);
        self.shared.wake.notify_all();
    }

    /// Waits for the scheduler to end (after [`Engine::shutdown`]).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        let q = self
            .shared
            .queue
            .lock()
            .expect("engine queue poisoned")
            .waiting
            .len();
        self.shared.metrics.render(q)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shutdown(Duration::ZERO);
            let _ = t.join();
        }
    }
}

/// A sequence in the batch, with where its events go.
struct Live {
    job: Job,
    seq: Sequence,
    first_at: Option<Instant>,
    last_at: Instant,
}

struct Scheduler {
    model: Model,
    shared: Arc<Shared>,
    live: Vec<Live>,
}

impl Scheduler {
    fn new(model: Model, shared: Arc<Shared>) -> Scheduler {
        Scheduler {
            model,
            shared,
            live: Vec::new(),
        }
    }

    fn run(mut self) {
        loop {
            let (admit, deadline_passed, stop) = self.wait_for_work();
            if deadline_passed {
                for l in self.live.drain(..) {
                    finish(&self.shared.metrics, &l.job, Event::Done(Done::Shutdown));
                }
            }
            for job in admit {
                self.admit(job);
            }
            self.drop_cancelled();
            if stop && self.live.is_empty() {
                return;
            }
            if !self.live.is_empty() {
                self.step();
            }
        }
    }

    /// Blocks until there is something to do; returns the jobs to admit now, whether the
    /// shutdown deadline has passed, and whether the engine is stopping (nothing queued,
    /// not accepting).
    fn wait_for_work(&mut self) -> (Vec<Job>, bool, bool) {
        let opts = &self.shared.opts;
        let mut q = self.shared.queue.lock().expect("engine queue poisoned");
        while self.live.is_empty() && q.waiting.is_empty() && q.accepting {
            q = self.shared.wake.wait(q).expect("engine queue poisoned");
        }
        let passed = q.deadline.is_some_and(|d| Instant::now() >= d);
        let mut admit = Vec::new();
        if passed {
            admit.extend(q.waiting.drain(..));
        } else {
            let mut tokens = 0;
            while self.live.len() + admit.len() < opts.max_batch {
                let Some(j) = q.waiting.front() else { break };
                let n = j.params.prompt.len();
                if !admit.is_empty() && tokens + n > opts.max_prefill_tokens {
                    break;
                }
                tokens += n;
                admit.push(q.waiting.pop_front().expect("front exists"));
            }
        }
        self.shared
            .metrics
            .queued
            .store(q.waiting.len() as u64, Ordering::Relaxed);
        let stop = !q.accepting && q.waiting.is_empty();
        if passed {
            // queued jobs end at once
            let jobs = std::mem::take(&mut admit);
            drop(q);
            for j in jobs {
                finish(&self.shared.metrics, &j, Event::Done(Done::Shutdown));
            }
            return (vec![], true, stop);
        }
        (admit, false, stop)
    }

    fn admit(&mut self, job: Job) {
        if job.cancel.load(Ordering::Acquire) {
            finish(&self.shared.metrics, &job, Event::Done(Done::Cancelled));
            return;
        }
        match Sequence::new(&self.model, job.params.clone()) {
            Ok(seq) => self.live.push(Live {
                job,
                seq,
                first_at: None,
                last_at: Instant::now(),
            }),
            Err(e) => finish(&self.shared.metrics, &job, Event::Error(format!("{e:#}"))),
        }
    }

    fn drop_cancelled(&mut self) {
        let m = &self.shared.metrics;
        self.live.retain(|l| {
            let gone = l.job.cancel.load(Ordering::Acquire) || l.job.tx.is_closed();
            if gone {
                finish(m, &l.job, Event::Done(Done::Cancelled));
            }
            !gone
        });
    }

    fn step(&mut self) {
        let m = &self.shared.metrics;
        let t0 = Instant::now();
        let rows: usize = self.live.iter().map(|l| l.seq.next_rows()).sum();
        let mut seqs: Vec<&mut Sequence> = self.live.iter_mut().map(|l| &mut l.seq).collect();
        let outs = batch::step(&self.model, &mut seqs);
        let dt = t0.elapsed().as_secs_f64();
        m.step_seconds.observe(dt);
        m.batch_size.observe(self.live.len() as f64);
        m.steps.fetch_add(1, Ordering::Relaxed);
        m.step_rows.fetch_add(rows as u64, Ordering::Relaxed);
        let outs = match outs {
            Ok(o) => o,
            Err(e) => {
                // the batch's state is unknown: every sequence in it ends with the error
                let msg = format!("generation failed: {e:#}");
                for l in self.live.drain(..) {
                    finish(m, &l.job, Event::Error(msg.clone()));
                }
                return;
            }
        };
        let now = Instant::now();
        let mut keep = Vec::with_capacity(self.live.len());
        for (mut l, o) in self.live.drain(..).zip(outs) {
            if let Some(lp) = o.prompt_logprobs {
                let _ = l.job.tx.send(Event::PromptLogprobs(lp));
            }
            if !o.tokens.is_empty() {
                m.tokens.fetch_add(o.tokens.len() as u64, Ordering::Relaxed);
                match l.first_at {
                    None => {
                        m.ttft_seconds
                            .observe((now - l.job.submitted).as_secs_f64());
                        l.first_at = Some(now);
                    }
                    Some(_) => m
                        .inter_token_seconds
                        .observe((now - l.last_at).as_secs_f64()),
                }
                l.last_at = now;
                let _ = l.job.tx.send(Event::Tokens {
                    ids: o.tokens,
                    logprobs: o.logprobs,
                });
            }
            match o.finished {
                Some(f) => {
                    let d = match f {
                        Finish::Eos => Done::Eos,
                        Finish::Length => Done::Length,
                    };
                    finish(m, &l.job, Event::Done(d));
                }
                None => keep.push(l),
            }
        }
        self.live = keep;
    }
}

/// Sends a request's last event and counts it out.
fn finish(m: &Metrics, job: &Job, last: Event) {
    let outcome = match &last {
        Event::Done(Done::Eos) | Event::Done(Done::Length) => &m.ok,
        Event::Done(Done::Cancelled) => &m.cancelled,
        Event::Done(Done::Shutdown) => &m.shut_down,
        _ => &m.failed,
    };
    outcome.fetch_add(1, Ordering::Relaxed);
    let _ = job.tx.send(last);
    m.in_flight.fetch_sub(1, Ordering::Relaxed);
}

// ------------------------------------------------------------------------ metrics

/// Counters and histograms of the engine (rendered by [`Engine::metrics_text`]).
#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    rejected: AtomicU64,
    ok: AtomicU64,
    cancelled: AtomicU64,
    shut_down: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    queued: AtomicU64,
    tokens: AtomicU64,
    steps: AtomicU64,
    step_rows: AtomicU64,
    step_seconds: Histogram<SECONDS>,
    ttft_seconds: Histogram<SECONDS>,
    inter_token_seconds: Histogram<SECONDS>,
    batch_size: Histogram<BATCH>,
}

const SECONDS: usize = 0;
const BATCH: usize = 1;
const BUCKETS: [&[f64]; 2] = [
    &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ],
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
];

/// A Prometheus histogram over the bucket bounds `BUCKETS[B]`.
#[derive(Default)]
struct Histogram<const B: usize> {
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl<const B: usize> Histogram<B> {
    fn observe(&self, x: f64) {
        let mut h = self.inner.lock().expect("histogram poisoned");
        if h.0.is_empty() {
            h.0 = vec![0; BUCKETS[B].len()];
        }
        for (c, &le) in h.0.iter_mut().zip(BUCKETS[B]) {
            if x <= le {
                *c += 1;
            }
        }
        h.1 += x;
        h.2 += 1;
    }
    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let h = self.inner.lock().expect("histogram poisoned");
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, &le) in BUCKETS[B].iter().enumerate() {
            let c = h.0.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.1, h.2);
    }
}

impl Metrics {
    fn render(&self, queue_depth: usize) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        counter(
            "kf_requests_total",
            "Requests queued.",
            "counter",
            get(&self.requests).to_string(),
        );
        counter(
            "kf_requests_rejected_total",
            "Requests refused with a full queue.",
            "counter",
            get(&self.rejected).to_string(),
        );
        counter(
            "kf_generated_tokens_total",
            "Tokens generated.",
            "counter",
            get(&self.tokens).to_string(),
        );
        counter(
            "kf_steps_total",
            "Forward passes (decode steps).",
            "counter",
            get(&self.steps).to_string(),
        );
        counter(
            "kf_step_rows_total",
            "Rows run through the model over all steps.",
            "counter",
            get(&self.step_rows).to_string(),
        );
        counter(
            "kf_in_flight",
            "Requests queued or running.",
            "gauge",
            get(&self.in_flight).to_string(),
        );
        counter(
            "kf_queue_depth",
            "Requests waiting to join the batch.",
            "gauge",
            queue_depth.to_string(),
        );
        let _ = writeln!(
            s,
            "# HELP kf_requests_finished_total Requests ended, by outcome.\n# TYPE kf_requests_finished_total counter"
        );
        for (o, a) in [
            ("ok", &self.ok),
            ("cancelled", &self.cancelled),
            ("shutdown", &self.shut_down),
            ("error", &self.failed),
        ] {
            let _ = writeln!(
                s,
                "kf_requests_finished_total{{outcome=\"{o}\"}} {}",
                get(a)
            );
        }
        self.step_seconds
            .render("kf_step_seconds", "Latency of one decode step.", &mut s);
        self.ttft_seconds.render(
            "kf_time_to_first_token_seconds",
            "From queued to the first token.",
            &mut s,
        );
        self.inter_token_seconds.render(
            "kf_inter_token_seconds",
            "Between a request's consecutive steps.",
            &mut s,
        );
        self.batch_size
            .render("kf_batch_size", "Sequences per step.", &mut s);
        s
    }
}
