//! `kfrun serve` end to end: the real server on 127.0.0.1 (a free port) with the shipped
//! models, spoken to over HTTP: completions streamed and not, scoring with echo + logprobs
//! (equal to the model's own log-probabilities), field-named errors, 429 with a full queue,
//! cancellation when a client disconnects, seeded requests alone vs batched, graceful
//! shutdown on SIGTERM, a fuzz pass over bodies and headers (2,000 mutated requests), and the `openai` Python client.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn model(which: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/default")
        .join(which)
}

/// A running `kfrun serve`; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(which: &str, extra: &[&str]) -> Server {
        Server::start_on(2, which, extra)
    }

    /// `start` with `threads` worker threads.
    fn start_on(threads: usize, which: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kfrun"))
            .args([
                "--threads",
                &threads.to_string(),
                "serve",
                "--port",
                "0",
                "--model",
            ])
            .arg(model(which))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kfrun serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .rsplit("http://")
            .next()
            .map(|s| s.trim().to_string())
            .filter(|s| s.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Server { child, addr }
    }

    /// One request; returns the status and the body.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw)
    }

    fn post(&self, body: &Value) -> (u16, Value) {
        let (code, b) = self.request("POST", "/v1/completions", &body.to_string());
        (code, serde_json::from_str(&b).unwrap_or(Value::Null))
    }

    /// A streamed completion: the data payloads in order.
    fn stream(&self, body: &Value) -> Vec<String> {
        let (code, b) = self.request("POST", "/v1/completions", &body.to_string());
        assert_eq!(code, 200, "{b}");
        b.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, m) = self.request("GET", "/metrics", "");
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{m}"))
    }

    /// Waits until nothing is in flight (the engine leaked no sequence).
    fn drained(&self) {
        let t0 = Instant::now();
        while self.metric("kf_in_flight") != 0.0 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "requests still in flight"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and body of a raw HTTP/1.1 response (chunked bodies joined).
fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return (code, body.to_string());
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (code, out)
}

fn text_of(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

/// The text of a stream's choice `i` and its finish_reason.
fn streamed(chunks: &[String], i: usize) -> (String, String) {
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let (mut text, mut finish) = (String::new(), String::new());
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        let ch = &v["choices"][0];
        if ch["index"] == i {
            text.push_str(ch["text"].as_str().unwrap());
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

#[test]
fn completions_streamed_and_not_agree_and_seeds_are_batch_independent() {
    for which in ["student", "teacher"] {
        let s = Server::start(which, &[]);
        let req = json!({"prompt": "The king", "max_tokens": 24, "seed": 7});
        let (code, alone) = s.post(&req);
        assert_eq!(code, 200, "{alone}");
        assert_eq!(alone["object"], "text_completion");
        assert_eq!(alone["model"], which);
        assert_eq!(alone["usage"]["completion_tokens"], 24);
        let want = text_of(&alone, 0);
        assert!(!want.is_empty());
        // the same request streamed gives the same text, then finish_reason and [DONE]
        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        let (text, finish) = streamed(&s.stream(&sreq), 0);
        assert_eq!((text, finish.as_str()), (want.clone(), "length"), "{which}");
        // batched with other requests (other seeds, other prompts, running concurrently)
        let others: Vec<_> = (0..6)
            .map(|i| {
                let addr = s.addr.clone();
                std::thread::spawn(move || {
                    let body = json!({"prompt": format!("Second {i} of them"), "max_tokens": 30, "seed": i}).to_string();
                    let mut t = TcpStream::connect(&addr).unwrap();
                    write!(t, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
                    let mut raw = Vec::new();
                    t.read_to_end(&mut raw).unwrap();
                    parse_response(&raw).0
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5));
        let (_, batched) = s.post(&req);
        assert!(others.into_iter().all(|h| h.join().unwrap() == 200));
        assert_eq!(
            text_of(&batched, 0),
            want,
            "{which}: seeded request alone vs batched"
        );
        // a list of prompts: one choice per prompt, prompt i on noise stream i
        let (_, two) =
            s.post(&json!({"prompt": ["The king", "The queen"], "max_tokens": 24, "seed": 7}));
        assert_eq!(text_of(&two, 0), want);
        assert_eq!(two["choices"].as_array().unwrap().len(), 2);
        // a stop string ends the text before it
        let cut: String = want.chars().skip(3).take(3).collect();
        let (_, stopped) =
            s.post(&json!({"prompt": "The king", "max_tokens": 24, "seed": 7, "stop": cut}));
        let got = text_of(&stopped, 0);
        assert!(
            want.starts_with(&got) && !got.contains(&cut),
            "{got:?} vs {want:?}"
        );
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
        // models, health
        let (code, m) = s.request("GET", "/v1/models", "");
        assert_eq!(code, 200);
        assert!(m.contains(&format!("\"id\":\"{which}\"")));
        assert_eq!(s.request("GET", "/health", "").0, 200);
        s.drained();
    }
}

#[test]
fn scoring_with_echo_and_logprobs_equals_the_models_log_probs() {
    let s = Server::start("teacher", &[]);
    let text = "To be, or not to be, that is the question";
    let (code, v) = s.post(&json!({"prompt": text, "max_tokens": 0, "echo": true, "logprobs": 0}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(text_of(&v, 0), text);
    let lp = &v["choices"][0]["logprobs"];
    let got: Vec<Value> = lp["token_logprobs"].as_array().unwrap().clone();
    assert!(got[0].is_null(), "the first token has no log-prob");
    // the model's own log-probs: the full causal forward in the library
    let dir = model("teacher");
    let tok = kf_model::tokenizer::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids = tok.encode(text).unwrap();
    let m = kf_model::Ddit::load(&dir).unwrap();
    let want = kf_model::batch::token_logprobs(&m, &ids).unwrap();
    assert_eq!(got.len(), ids.len());
    for (g, w) in got[1..].iter().zip(&want) {
        let g = g.as_f64().unwrap();
        assert!((g - w).abs() < 1e-3, "served {g} vs the model's {w}");
    }
    assert_eq!(
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        text
    );
    // generated tokens carry their log-probs too
    let (_, g) = s.post(&json!({"prompt": text, "max_tokens": 5, "logprobs": 1, "seed": 1}));
    let lps = g["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(lps.len(), 5);
    assert!(lps.iter().all(|x| x.as_f64().unwrap() <= 0.0));
    s.drained();
}

#[test]
fn bad_requests_get_openai_errors_naming_the_field() {
    let s = Server::start("student", &["--max-tokens", "100"]);
    let cases: Vec<(&str, u16, Option<&str>)> = vec![
        ("{not json", 400, None),
        ("[1, 2]", 400, Some("body")),
        (r#"{"max_tokens": 3}"#, 400, Some("prompt")),
        (r#"{"prompt": ""}"#, 400, Some("prompt")),
        (r#"{"prompt": []}"#, 400, Some("prompt")),
        (r#"{"prompt": 7}"#, 400, Some("prompt")),
        (r#"{"prompt": "a", "model": "gpt-4"}"#, 404, Some("model")),
        (r#"{"prompt": "a", "k": 5}"#, 400, Some("k")),
        (r#"{"prompt": "a", "k": 0}"#, 400, Some("k")),
        (
            r#"{"prompt": "a", "max_tokens": 101}"#,
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"prompt": "a", "max_tokens": -1}"#,
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"prompt": "a", "max_tokens": "9"}"#,
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"prompt": "a", "temperature": -1}"#,
            400,
            Some("temperature"),
        ),
        (
            r#"{"prompt": "a", "temperature": "hot"}"#,
            400,
            Some("temperature"),
        ),
        (r#"{"prompt": "a", "stream": 1}"#, 400, Some("stream")),
        (r#"{"prompt": "a", "stop": [1]}"#, 400, Some("stop")),
        (r#"{"prompt": "a", "logprobs": 1}"#, 400, Some("logprobs")),
        (r#"{"prompt": "a", "n": 2}"#, 400, Some("n")),
        (r#"{"prompt": "a", "seed": -4}"#, 400, Some("seed")),
    ];
    for (body, code, param) in cases {
        let (got, b) = s.request("POST", "/v1/completions", body);
        assert_eq!(got, code, "{body}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{body}: not JSON: {b}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{b}"
        );
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}: {b}");
        }
    }
    // past the model's context (256 positions)
    let long = "word ".repeat(250);
    let (code, v) = s.post(&json!({"prompt": long, "max_tokens": 100}));
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{v}"
    );
    assert_eq!(s.request("GET", "/nope", "").0, 404);
    s.drained();
}

#[test]
fn a_full_queue_gets_429_and_a_disconnect_cancels() {
    let s = Server::start("teacher", &["--max-batch", "1", "--max-queue", "1"]);
    // a burst of 8 at once: one runs, one waits, the others are refused at once
    let sr = &s;
    let codes: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                sc.spawn(move || sr.post(&json!({"prompt": "A", "max_tokens": 250, "seed": i})))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused = codes.iter().filter(|(c, _)| *c == 429).count();
    assert!(refused >= 1, "a full queue refuses with 429: {codes:?}");
    assert!(
        codes.iter().all(|(c, _)| *c == 200 || *c == 429),
        "{codes:?}"
    );
    for (_, b) in codes.iter().filter(|(c, _)| *c == 429) {
        assert_eq!(b["error"]["type"], "rate_limit_error");
    }
    assert_eq!(s.metric("kf_requests_rejected_total"), refused as f64);
    s.drained();
    let before = s.metric("kf_generated_tokens_total");
    // clients that go away: six streams (one running, the rest queued) closed after the
    // first response head; each is cancelled when its stream next writes
    let s2 = Server::start("teacher", &["--max-batch", "1", "--max-queue", "8"]);
    let body = json!({"prompt": "A", "max_tokens": 250, "stream": true}).to_string();
    let conns: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut t = TcpStream::connect(&s2.addr).unwrap();
            write!(
                t,
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            t
        })
        .collect();
    let mut first = &conns[0];
    let mut buf = [0u8; 64];
    let n = first.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(conns);
    s2.drained();
    let cancelled = s2.metric("kf_requests_finished_total{outcome=\"cancelled\"}");
    assert!(cancelled >= 1.0, "cancelled {cancelled}");
    let made = s2.metric("kf_generated_tokens_total");
    assert!(
        made < 6.0 * 250.0,
        "the sequences stopped early: {made} tokens"
    );
    assert!(before > 0.0);
}

#[test]
fn sigterm_finishes_running_streams_and_exits_zero() {
    let mut s = Server::start("teacher", &["--shutdown-grace", "0.2"]);
    // ignore_eos: a sampled EOS would end the stream with "stop" before the signal
    let body =
        json!({"prompt": "A", "max_tokens": 250, "stream": true, "ignore_eos": true}).to_string();
    let mut t = TcpStream::connect(&s.addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(t, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = [0u8; 64];
    let _ = t.read(&mut buf).unwrap();
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    unsafe {
        libc::kill(s.child.id() as i32, libc::SIGTERM);
    }
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).unwrap();
    let (_, body) = parse_response(
        &[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".as_slice(),
            &rest,
        ]
        .concat(),
    );
    let all = String::from_utf8_lossy(&rest);
    assert!(
        all.contains("[DONE]"),
        "the stream ends with [DONE]: {body}"
    );
    assert!(
        all.contains("\"finish_reason\":\"shutdown\"")
            || all.contains("\"finish_reason\":\"length\""),
        "{all}"
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn fuzzed_requests_never_crash_or_leak() {
    let mut s = Server::start("student", &["--max-tokens", "8"]);
    let seeds = [
        json!({"prompt": "The", "max_tokens": 4, "stream": true, "seed": 1, "k": 2}),
        json!({"prompt": ["a", "b"], "max_tokens": 3, "stop": ["x"], "frequency_penalty": 0.5}),
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let pieces = [
        "\"",
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "null",
        "-1",
        "1e309",
        "\u{0}",
        "é",
        "9999999999999999999",
        "true",
        "\"k\"",
        "\"prompt\"",
    ];
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..2000 {
        let mut b = seeds[i % 2].to_string().into_bytes();
        for _ in 0..1 + rnd(4) {
            match rnd(3) {
                0 if !b.is_empty() => {
                    let at = rnd(b.len());
                    b.remove(at);
                }
                1 => {
                    let at = rnd(b.len() + 1);
                    let p = pieces[rnd(pieces.len())].as_bytes();
                    b.splice(at..at, p.iter().copied());
                }
                _ if !b.is_empty() => {
                    let at = rnd(b.len());
                    b[at] = b[at].wrapping_add(1 + rnd(200) as u8);
                }
                _ => {}
            }
        }
        let mut t = TcpStream::connect(&s.addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // mutated headers too: a wrong length, a bogus content type, or a truncated head
        let len = if i % 7 == 0 {
            b.len() + rnd(5)
        } else {
            b.len()
        };
        let ctype = ["application/json", "text/plain", "\u{1}bad", ""][rnd(4)];
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        );
        let _ = t.write_all(head.as_bytes());
        let _ = t.write_all(&b);
        if len > b.len() {
            let _ = t.shutdown(std::net::Shutdown::Write);
        }
        let mut raw = Vec::new();
        let _ = t.read_to_end(&mut raw);
        let (code, _) = parse_response(&raw);
        *codes.entry(code).or_insert(0) += 1;
        assert!(
            code != 500 && code != 0 || len > b.len(),
            "request {i}: {}",
            String::from_utf8_lossy(&raw)
        );
    }
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the server is still up"
    );
    s.drained();
    assert!(
        codes.contains_key(&200) && codes.contains_key(&400),
        "{codes:?}"
    );
}

/// One worker thread, and the student's matrices in 8-bit blocks (`--dtype q8_0`): the
/// scheduler's parallel ops once waited forever for the main thread (a rayon worker busy
/// with the HTTP runtime); both requests finish.
#[test]
fn one_thread_and_blocks_serve() {
    let srv = Server::start_on(1, "student", &["--dtype", "q8_0"]);
    let req = json!({"prompt": ["Once upon a time", "The king"], "max_tokens": 12, "seed": 1});
    let (code, v) = srv.post(&req);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 24, "{v}");
    let bad = Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args([
            "serve", "--port", "0", "--dtype", "q4_1", "--device", "emu", "--model",
        ])
        .arg(model("student"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("CPU only"));
}

/// `--device emu` (the CUDA kernels on the CPU emulator) serves the CPU's text: the same
/// ragged steps, batched prompts, K = 4 and the penalty, on the one engine.
#[test]
fn the_emulator_serves_the_cpus_text() {
    let req = json!({"prompt": ["Once upon a time", "The king"], "max_tokens": 12, "seed": 1, "frequency_penalty": 0.5});
    let cpu = Server::start("student", &[]).post(&req);
    let emu = Server::start("student", &["--device", "emu"]).post(&req);
    assert_eq!(cpu.0, 200, "{}", cpu.1);
    assert_eq!(cpu.1["choices"], emu.1["choices"]);
}

/// The `openai` Python package (pinned in .ci/run) as the client. Skips, saying why, when
/// `python3` cannot import it, unless KF_REQUIRE_OPENAI=1 (CI).
#[test]
fn the_openai_python_client_talks_to_it() {
    let py = std::env::var("KF_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        assert!(
            std::env::var("KF_REQUIRE_OPENAI").is_err(),
            "KF_REQUIRE_OPENAI is set but {py} cannot import openai"
        );
        eprintln!("skipped: {py} cannot import the openai package (pip install openai==3.63.0)");
        return;
    }
    let s = Server::start("student", &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(&py)
        .arg(script)
        .arg(format!("http://{}/v1", s.addr))
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("ok"), "{so}");
    s.drained();
}
