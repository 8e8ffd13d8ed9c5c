//! Metrics as JSON lines (`metrics.jsonl`, one object per step) and the loss-curve
//! plot (`loss.svg`, written by hand: train loss and validation loss against step).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.svg";

/// One metrics line. `tokens_per_s` and `elapsed_s` are wall-clock measurements; every
/// other field is a pure function of the seed, the data and the thread count.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens consumed by the run so far.
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub val_loss: Option<f64>,
    pub extras: Vec<(String, f64)>,
}

fn num(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

impl StepRecord {
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("step".into(), Value::from(self.step));
        m.insert("loss".into(), num(self.loss));
        m.insert("lr".into(), num(self.lr));
        m.insert("grad_norm".into(), num(self.grad_norm));
        m.insert("tokens".into(), Value::from(self.tokens));
        m.insert("tokens_per_s".into(), num(self.tokens_per_s));
        m.insert("elapsed_s".into(), num(self.elapsed_s));
        if let Some(v) = self.val_loss {
            m.insert("val_loss".into(), num(v));
            m.insert("val_ppl".into(), num(v.exp()));
        }
        for (k, v) in &self.extras {
            m.insert(k.clone(), num(*v));
        }
        Value::Object(m)
    }
}

/// The points a plot needs, read back from metrics lines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    pub train: Vec<(u64, f64)>,
    pub val: Vec<(u64, f64)>,
}

impl Curves {
    pub fn push(&mut self, r: &StepRecord) {
        self.train.push((r.step, r.loss));
        if let Some(v) = r.val_loss {
            self.val.push((r.step, v));
        }
    }
}

/// `metrics.jsonl`, appended line by line (flushed per line).
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    bytes: u64,
}

impl MetricsLog {
    /// A fresh, empty log at `path` (an existing file is truncated).
    pub fn create(path: &Path) -> Result<MetricsLog> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            bytes: 0,
        })
    }

    /// Reopens `path` for a resumed run: cuts it to the `bytes` that belong to the
    /// checkpoint (lines of later steps are dropped) and returns the curves in it.
    pub fn resume(path: &Path, bytes: u64) -> Result<(MetricsLog, Curves)> {
        let label = path.display();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {label} to resume (the checkpoint expects {bytes} bytes of metrics)"))?;
        let len = file.metadata()?.len();
        ensure!(
            len >= bytes,
            "{label} holds {len} bytes, fewer than the {bytes} the checkpoint recorded: the metrics file was truncated or replaced"
        );
        file.set_len(bytes)
            .with_context(|| format!("cannot truncate {label}"))?;
        let mut text = String::new();
        file.seek(SeekFrom::Start(0))?;
        file.read_to_string(&mut text)
            .with_context(|| format!("cannot read {label}"))?;
        let mut curves = Curves::default();
        for (n, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{label} line {}: not JSON", n + 1))?;
            let get = |k: &str| v.get(k).and_then(Value::as_f64);
            let (Some(step), Some(loss)) = (v.get("step").and_then(Value::as_u64), get("loss"))
            else {
                bail!("{label} line {}: no step or loss", n + 1);
            };
            curves.train.push((step, loss));
            if let Some(vl) = get("val_loss") {
                curves.val.push((step, vl));
            }
        }
        file.seek(SeekFrom::End(0))?;
        Ok((
            MetricsLog {
                path: path.to_path_buf(),
                file,
                bytes,
            },
            curves,
        ))
    }

    pub fn append(&mut self, rec: &StepRecord) -> Result<()> {
        let mut line = serde_json::to_string(&rec.to_json())?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    /// fsync; returns the length so far (what a checkpoint records).
    pub fn sync(&mut self) -> Result<u64> {
        self.file
            .sync_data()
            .with_context(|| format!("cannot fsync {}", self.path.display()))?;
        Ok(self.bytes)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// "Nice" tick values covering `[lo, hi]`, about `n` of them.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * step {
        out.push(t);
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// The SVG text of a loss plot: train loss (thin, plus a moving average when there are
/// many steps) and validation loss (points joined by a line) against step.
pub fn loss_svg(curves: &Curves, title: &str) -> String {
    let (w, h) = (800.0, 480.0);
    let (l, r, t, b) = (70.0, 20.0, 40.0, 50.0);
    let pts: Vec<&(u64, f64)> = curves
        .train
        .iter()
        .chain(&curves.val)
        .filter(|p| p.1.is_finite())
        .collect();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    if pts.is_empty() {
        s.push_str(
            "<text x=\"400\" y=\"240\" text-anchor=\"middle\">no steps yet</text>\n</svg>\n",
        );
        return s;
    }
    let x0 = pts.iter().map(|p| p.0).min().unwrap() as f64;
    let x1 = (pts.iter().map(|p| p.0).max().unwrap() as f64).max(x0 + 1.0);
    let mut y0 = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut y1 = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    y0 -= pad;
    y1 += pad;
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| t + (y1 - y) / (y1 - y0) * (h - t - b);
    // axes and grid
    s.push_str(&format!(
        "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n",
        w - l - r,
        h - t - b
    ));
    for v in ticks(x0, x1, 8) {
        let x = px(v);
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{t}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            h - b,
            h - b + 16.0,
            fmt_tick(v)
        ));
    }
    for v in ticks(y0, y1, 6) {
        let y = py(v);
        s.push_str(&format!(
            "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            w - r,
            l - 6.0,
            y + 4.0,
            fmt_tick(v)
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">loss (nats/token)</text>\n",
        (l + w - r) / 2.0,
        h - 10.0,
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    ));
    let path = |p: &[(u64, f64)]| -> String {
        p.iter()
            .filter(|q| q.1.is_finite())
            .map(|q| format!("{:.1},{:.1}", px(q.0 as f64), py(q.1)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let many = curves.train.len() > 50;
    let train_color = if many { "#9ecae1" } else { "#1f77b4" };
    s.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"{train_color}\" stroke-width=\"1\" points=\"{}\"/>\n",
        path(&curves.train)
    ));
    if many {
        let k = (curves.train.len() / 50).max(2);
        let sm: Vec<(u64, f64)> = curves
            .train
            .windows(k)
            .map(|win| {
                (
                    win[win.len() - 1].0,
                    win.iter().map(|q| q.1).sum::<f64>() / k as f64,
                )
            })
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
            path(&sm)
        ));
    }
    if !curves.val.is_empty() {
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"{}\"/>\n",
            path(&curves.val)
        ));
        for q in curves.val.iter().filter(|q| q.1.is_finite()) {
            s.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>\n",
                px(q.0 as f64),
                py(q.1)
            ));
        }
    }
    // legend
    let lx = w - r - 190.0;
    s.push_str(&format!(
        "<rect x=\"{lx}\" y=\"{}\" width=\"180\" height=\"44\" fill=\"white\" stroke=\"#aaa\"/>\n<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#1f77b4\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">train loss{}</text>\n<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#d62728\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">validation loss</text>\n",
        t + 8.0,
        lx + 8.0, t + 22.0, lx + 32.0, t + 22.0, lx + 38.0, t + 26.0,
        if many { " (smoothed)" } else { "" },
        lx + 8.0, t + 40.0, lx + 32.0, t + 40.0, lx + 38.0, t + 44.0,
    ));
    s.push_str("</svg>\n");
    s
}

/// Writes the plot to `path` atomically.
pub fn write_loss_svg(path: &Path, curves: &Curves, title: &str) -> Result<()> {
    kf_engine::fs::write_atomic(path, loss_svg(curves, title).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_and_ticks() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let mut c = Curves::default();
        assert!(loss_svg(&c, "t").contains("no steps"));
        for i in 1..=120u64 {
            c.train.push((i, 5.0 / (i as f64).sqrt()));
        }
        c.val = vec![(50, 1.0), (100, 0.8)];
        let s = loss_svg(&c, "a <b>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("a &lt;b&gt;") && s.contains("circle") && s.contains("smoothed"));
    }

    #[test]
    fn log_resume_truncates() {
        let dir = std::env::temp_dir().join(format!("kf-metrics-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(METRICS_FILE);
        let rec = |step: u64| StepRecord {
            step,
            loss: 2.0,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: step * 10,
            tokens_per_s: 100.0,
            elapsed_s: 1.0,
            val_loss: (step == 2).then_some(1.5),
            extras: vec![],
        };
        let mut log = MetricsLog::create(&p).unwrap();
        log.append(&rec(1)).unwrap();
        log.append(&rec(2)).unwrap();
        let keep = log.sync().unwrap();
        log.append(&rec(3)).unwrap();
        drop(log);
        let (mut log, c) = MetricsLog::resume(&p, keep).unwrap();
        assert_eq!(c.train.len(), 2);
        assert_eq!(c.val, vec![(2, 1.5)]);
        log.append(&rec(3)).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 3);
        let e = MetricsLog::resume(&p, 1 << 20).err().unwrap().to_string();
        assert!(e.contains("fewer than"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
