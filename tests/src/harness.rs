//! The one parity/gradient harness. A `Case` is an op call on concrete
//! inputs plus an independent, naive f64 reference. Runners check:
//! - forward in f32 against the reference (magnitude-aware tolerance, NaN fails),
//! - forward in f64 against the reference (tight tolerance),
//! - gradients in f64 against central finite differences,
//! with canary-padded output buffers (`OutBuf` canary mode) throughout.
//! A refused case (`Case::refused`: shapes or dtypes the op must reject) must fail with one
//! error naming the op on the CPU and on every kernel device, never a panic or a result.

use anyhow::{bail, ensure, Context, Result};
use kf_engine::outbuf::set_canary_mode;
use kf_engine::{no_grad, DType, Device, Tensor};

/// A deterministic generator for test data (SplitMix64; independent of the
/// engine's Philox so the harness does not test the RNG with itself).
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.range(lo, hi)).collect()
    }
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let u1 = self.unit().max(1e-300);
                let u2 = self.unit();
                std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect()
    }
}

/// One input of a case.
#[derive(Clone, Debug)]
pub enum Input {
    /// Float data, cast to the dtype under test.
    Float { shape: Vec<usize>, data: Vec<f64> },
    /// Integer data (token ids, counts), always u32.
    Index { shape: Vec<usize>, data: Vec<u32> },
}

impl Input {
    pub fn float(shape: &[usize], data: Vec<f64>) -> Input {
        Input::Float {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn index(shape: &[usize], data: Vec<u32>) -> Input {
        Input::Index {
            shape: shape.to_vec(),
            data,
        }
    }
    /// Flat values as f64 (what the reference sees).
    pub fn values(&self) -> Vec<f64> {
        match self {
            Input::Float { data, .. } => data.clone(),
            Input::Index { data, .. } => data.iter().map(|&x| x as f64).collect(),
        }
    }
    pub fn shape(&self) -> &[usize] {
        match self {
            Input::Float { shape, .. } | Input::Index { shape, .. } => shape,
        }
    }
    /// The values after a round trip through `dtype` (so the reference sees
    /// exactly what the op sees).
    fn rounded(&self, dtype: DType) -> Vec<f64> {
        match self {
            Input::Float { data, .. } => match dtype {
                DType::F32 => data.iter().map(|&x| x as f32 as f64).collect(),
                _ => data.clone(),
            },
            Input::Index { .. } => self.values(),
        }
    }
    fn tensor(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Input::Float { shape, data } => {
                Tensor::from_vec(data.clone(), shape, Device::Cpu)?.to_dtype(dtype)
            }
            Input::Index { shape, data } => Tensor::from_vec(data.clone(), shape, Device::Cpu),
        }
    }
}

/// A float input of `shape` with small distinct values (for refused cases: only shapes matter).
pub fn filled(shape: &[usize]) -> Input {
    let n: usize = shape.iter().product();
    Input::float(
        shape,
        (0..n).map(|i| 0.25 + 0.125 * (i % 7) as f64).collect(),
    )
}

/// Index inputs `0, 1, 2, ..` of `shape` (ids, targets, counts).
pub fn indices(shape: &[usize]) -> Input {
    let n: usize = shape.iter().product();
    Input::index(shape, (0..n as u32).collect())
}

/// `cases` followed by the op's refused cases.
pub fn refusing(mut cases: Vec<Case>, refused: impl IntoIterator<Item = Case>) -> Vec<Case> {
    cases.extend(refused);
    cases
}

/// `|a - b| <= atol + rtol * |b|` elementwise.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

impl Tol {
    pub const fn new(atol: f64, rtol: f64) -> Tol {
        Tol { atol, rtol }
    }
    /// Exact equality (integer outputs such as sampled tokens).
    pub const EXACT: Tol = Tol::new(0.0, 0.0);
    /// Default for f32 forwards of well-conditioned ops.
    pub const F32: Tol = Tol::new(1e-5, 1e-4);
}

pub type ForwardFn = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync>;
pub type ReferenceFn = Box<dyn Fn(&[Vec<f64>]) -> Vec<Vec<f64>> + Send + Sync>;

pub struct Case {
    /// Op name plus shapes and parameters, e.g. "matmul 3x17x5 bT".
    pub name: String,
    pub inputs: Vec<Input>,
    /// Runs the op under test on tensors built from `inputs`.
    pub forward: ForwardFn,
    /// Independent naive f64 implementation over the flat input values.
    pub reference: ReferenceFn,
    /// Inputs whose gradient is checked (w.r.t. output 0); empty: no grad check.
    pub grad_wrt: Vec<usize>,
    /// Tolerance of the f32 forward against the reference.
    pub tol: Tol,
    /// Tolerance of the f64 forward against the reference.
    pub tol_f64: Tol,
    /// Floating-point operations and bytes moved per call (perf mode).
    pub flops: f64,
    pub bytes: f64,
    /// False for a case outside the domain of the op's kernels (e.g. an attention head dim
    /// with no kernel instance): on a kernel device it must fail with an error.
    pub on_kernels: bool,
    /// For a case the op must refuse (bad shapes, dtypes): text its error names on every
    /// backend (the op's name, or the input at fault).
    pub refused: Option<String>,
}

impl Case {
    /// A case with default tolerances and no cost estimate.
    pub fn new(
        name: impl Into<String>,
        inputs: Vec<Input>,
        forward: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync + 'static,
        reference: impl Fn(&[Vec<f64>]) -> Vec<Vec<f64>> + Send + Sync + 'static,
    ) -> Case {
        Case {
            name: name.into(),
            inputs,
            forward: Box::new(forward),
            reference: Box::new(reference),
            grad_wrt: vec![],
            tol: Tol::F32,
            tol_f64: Tol::new(1e-10, 1e-9),
            flops: 0.0,
            bytes: 0.0,
            on_kernels: true,
            refused: None,
        }
    }
    /// Inputs the op must reject: on the CPU and on every kernel device the forward fails with
    /// an error whose text contains `names` (checked at f32; no reference, no gradient).
    pub fn refused(
        name: impl Into<String>,
        inputs: Vec<Input>,
        forward: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync + 'static,
        names: &str,
    ) -> Case {
        let mut c = Case::new(name, inputs, forward, |_| vec![]);
        c.refused = Some(names.to_string());
        c
    }
    pub fn on_kernels(mut self, yes: bool) -> Case {
        self.on_kernels = yes;
        self
    }
    pub fn grad(mut self, wrt: &[usize]) -> Case {
        self.grad_wrt = wrt.to_vec();
        self
    }
    pub fn tol(mut self, t: Tol) -> Case {
        self.tol = t;
        self
    }
    pub fn tol_f64(mut self, t: Tol) -> Case {
        self.tol_f64 = t;
        self
    }
    pub fn cost(mut self, flops: f64, bytes: f64) -> Case {
        self.flops = flops;
        self.bytes = bytes;
        self
    }
}

/// Compare `got` with `want`; the error names the worst element.
pub fn compare(what: &str, got: &[f64], want: &[f64], tol: Tol) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, reference has {}",
        got.len(),
        want.len()
    );
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() || w.is_nan() {
            bail!("{what}: NaN at index {i} (got {g}, reference {w})");
        }
        if g == w {
            continue; // covers equal infinities
        }
        let excess = (g - w).abs() - (tol.atol + tol.rtol * w.abs());
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        bail!(
            "{what}: index {i}: got {}, reference {} (|diff| {:.3e} > atol {:.1e} + rtol {:.1e} * |ref|)",
            got[i],
            want[i],
            (got[i] - want[i]).abs(),
            tol.atol,
            tol.rtol
        );
    }
    Ok(())
}

fn build_inputs(case: &Case, dtype: DType) -> Result<Vec<Tensor>> {
    case.inputs.iter().map(|i| i.tensor(dtype)).collect()
}

struct CanaryGuard;
impl CanaryGuard {
    fn on() -> Self {
        set_canary_mode(true);
        CanaryGuard
    }
}
impl Drop for CanaryGuard {
    fn drop(&mut self) {
        set_canary_mode(false);
    }
}

/// Whether `text` holds `word` as a whole word ("colsum" does not name "sum").
fn names_word(text: &str, word: &str) -> bool {
    let part = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    text.match_indices(word).any(|(i, _)| {
        !part(text[..i].chars().next_back()) && !part(text[i + word.len()..].chars().next())
    })
}

/// A refused case's forward on inputs already on their device: an error naming what it must.
fn check_refusal(case: &Case, names: &str, inputs: &[Tensor], tag: &str) -> Result<()> {
    match (case.forward)(inputs) {
        Ok(_) => bail!(
            "{} {tag}: the op must refuse these inputs, yet returned a result",
            case.name
        ),
        Err(e) => ensure!(
            names_word(&format!("{e:#}"), names),
            "{} {tag}: the error does not name {names:?}: {e:#}",
            case.name
        ),
    }
    Ok(())
}

/// Run the forward at `dtype` (f32 or f64) and compare with the reference.
pub fn check_forward(case: &Case, dtype: DType) -> Result<()> {
    let _c = CanaryGuard::on();
    let _g = no_grad();
    let inputs = build_inputs(case, dtype)?;
    if let Some(names) = &case.refused {
        return check_refusal(case, names, &inputs, &format!("[{dtype}]"));
    }
    let outs = (case.forward)(&inputs).with_context(|| format!("{}: forward failed", case.name))?;
    let tol = if dtype == DType::F64 {
        case.tol_f64
    } else {
        case.tol
    };
    compare_outputs(case, &outs, dtype, tol, &format!("[{dtype}]"), Device::Cpu)
}

/// The op's outputs (on `device`) against the reference on the inputs rounded to `dtype`.
fn compare_outputs(
    case: &Case,
    outs: &[Tensor],
    dtype: DType,
    tol: Tol,
    tag: &str,
    device: Device,
) -> Result<()> {
    let ref_inputs: Vec<Vec<f64>> = case.inputs.iter().map(|i| i.rounded(dtype)).collect();
    let want = (case.reference)(&ref_inputs);
    ensure!(
        outs.len() == want.len(),
        "{} {tag}: op returned {} outputs, reference {}",
        case.name,
        outs.len(),
        want.len()
    );
    for (k, (o, w)) in outs.iter().zip(&want).enumerate() {
        ensure!(
            o.device() == device,
            "{} {tag}: output {k} came back on {}",
            case.name,
            o.device()
        );
        let got = o.to_vec_f64()?;
        compare(&format!("{} {tag} output {k}", case.name), &got, w, tol)?;
    }
    Ok(())
}

/// At most this many elements per input are probed by finite differences.
const FD_MAX_PROBES: usize = 96;

/// Check the gradients of sum(w * output0) w.r.t. `grad_wrt` inputs in f64
/// against central finite differences.
pub fn check_grad(case: &Case) -> Result<()> {
    if case.grad_wrt.is_empty() {
        return Ok(());
    }
    let _c = CanaryGuard::on();
    let base = build_inputs(case, DType::F64)?;
    let vars: Vec<Tensor> = base
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if case.grad_wrt.contains(&i) {
                t.var()
            } else {
                t.clone()
            }
        })
        .collect();
    let out = (case.forward)(&vars)
        .with_context(|| format!("{}: forward (grad) failed", case.name))?
        .into_iter()
        .next()
        .context("op returned no output")?;
    let mut gen = Gen::new(0xC0FFEE ^ case.name.len() as u64);
    let w = gen.vec(out.numel(), -1.0, 1.0);
    let seed = Tensor::from_vec(w.clone(), out.shape(), Device::Cpu)?;
    let grads = out
        .backward_with(seed)
        .with_context(|| format!("{}: backward failed", case.name))?;

    let loss = |inputs: &[Tensor]| -> Result<f64> {
        let _g = no_grad();
        let o = (case.forward)(inputs)?
            .into_iter()
            .next()
            .context("no output")?;
        Ok(o.to_vec_f64()?.iter().zip(&w).map(|(a, b)| a * b).sum())
    };
    for &i in &case.grad_wrt {
        let Input::Float { shape, data } = &case.inputs[i] else {
            bail!(
                "{}: grad_wrt names input {i}, which is not a float input",
                case.name
            );
        };
        let analytic = grads
            .get(&vars[i])
            .with_context(|| format!("{}: no gradient reached input {i}", case.name))?
            .to_vec_f64()?;
        ensure!(analytic.len() == data.len(), "{}: gradient size", case.name);
        let n = data.len();
        let probes: Vec<usize> = if n <= FD_MAX_PROBES {
            (0..n).collect()
        } else {
            let mut p: Vec<usize> = (0..FD_MAX_PROBES - 2)
                .map(|_| gen.below(n as u64) as usize)
                .collect();
            p.push(0);
            p.push(n - 1);
            p
        };
        for j in probes {
            let x = data[j];
            let eps = 1e-6 * x.abs().max(1.0);
            let mut plus = data.clone();
            plus[j] = x + eps;
            let mut minus = data.clone();
            minus[j] = x - eps;
            let mut ip = base.clone();
            ip[i] = Tensor::from_vec(plus, shape, Device::Cpu)?;
            let mut im = base.clone();
            im[i] = Tensor::from_vec(minus, shape, Device::Cpu)?;
            let numeric = (loss(&ip)? - loss(&im)?) / (2.0 * eps);
            let a = analytic[j];
            ensure!(
                a.is_finite() && (a - numeric).abs() <= 1e-6 + 1e-5 * numeric.abs().max(a.abs()),
                "{}: d/d input{i}[{j}]: analytic {a}, finite difference {numeric}",
                case.name
            );
        }
    }
    Ok(())
}

/// The kernel devices the harness runs ops on: the emulator always, GPU 0 where usable.
pub fn kernel_devices() -> Vec<Device> {
    let mut v = vec![Device::Emu];
    if cfg!(feature = "cuda") {
        match Device::Cuda(0).ensure_available() {
            Ok(()) => v.push(Device::Cuda(0)),
            Err(e) => assert!(
                std::env::var_os("KF_REQUIRE_GPU").is_none(),
                "KF_REQUIRE_GPU is set but: {e:#}"
            ),
        }
    }
    v
}

/// The f32 forward with every input moved to `device`, against the reference. An op without
/// kernels must fail with an error (never a panic or a silent CPU fallback).
pub fn check_forward_on(case: &Case, op: kf_ops::OpKind, device: Device) -> Result<()> {
    let _g = no_grad();
    let inputs = build_inputs(case, DType::F32)?
        .iter()
        .map(|t| t.to_device(device))
        .collect::<Result<Vec<_>>>()?;
    if let Some(names) = &case.refused {
        return check_refusal(case, names, &inputs, &format!("[f32 on {device}]"));
    }
    let run = (case.forward)(&inputs);
    if !op.on_kernel_devices() || !case.on_kernels {
        ensure!(
            run.is_err(),
            "{} on {device}: no kernel covers this case, yet it returned a result",
            case.name
        );
        return Ok(());
    }
    let outs = run.with_context(|| format!("{} on {device}: forward failed", case.name))?;
    let tag = format!("[f32 on {device}]");
    compare_outputs(case, &outs, DType::F32, case.tol, &tag, device)
}

/// The f32 gradients of sum(w * output0) w.r.t. the case's `grad_wrt` inputs with every
/// input on `device` (autograd over the device's backward kernels), against the same on the
/// CPU in f32.
pub fn check_grad_on(case: &Case, op: kf_ops::OpKind, device: Device) -> Result<()> {
    if case.grad_wrt.is_empty() || !op.on_kernel_devices() || !case.on_kernels {
        return Ok(());
    }
    let grads = |dev: Device| -> Result<Vec<Vec<f64>>> {
        let vars: Vec<Tensor> = build_inputs(case, DType::F32)?
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let t = t.to_device(dev)?;
                Ok(if case.grad_wrt.contains(&i) {
                    t.var()
                } else {
                    t
                })
            })
            .collect::<Result<_>>()?;
        let out = (case.forward)(&vars)?
            .into_iter()
            .next()
            .context("op returned no output")?;
        let w = Gen::new(0xC0FFEE ^ case.name.len() as u64).vec(out.numel(), -1.0, 1.0);
        let seed = Tensor::from_vec(w, out.shape(), Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(dev)?;
        let store = out.backward_with(seed)?;
        case.grad_wrt
            .iter()
            .map(|&i| {
                let g = store
                    .get(&vars[i])
                    .with_context(|| format!("no gradient reached input {i}"))?;
                ensure!(
                    g.device() == dev,
                    "the gradient of input {i} came back on {}",
                    g.device()
                );
                g.to_vec_f64()
            })
            .collect()
    };
    let want = grads(Device::Cpu).with_context(|| format!("{}: cpu f32 gradients", case.name))?;
    let got = grads(device).with_context(|| format!("{} on {device}: gradients", case.name))?;
    // sums of gradients round in another order on the device (an exact forward, such as the
    // embedding's gather, still has a summed backward): at least the f32 tolerance
    let tol = Tol::new(
        case.tol.atol.max(Tol::F32.atol),
        case.tol.rtol.max(Tol::F32.rtol),
    );
    for ((g, w), i) in got.iter().zip(&want).zip(&case.grad_wrt) {
        compare(
            &format!("{} [f32 on {device}] d/d input{i}", case.name),
            g,
            w,
            tol,
        )?;
    }
    Ok(())
}

/// Run every check of every case of `op`; returns the number of cases.
pub fn check_op(op: kf_ops::OpKind) -> Result<usize> {
    let cases = crate::cases::cases(op);
    ensure!(!cases.is_empty(), "op {} has no harness case", op.name());
    let mut failures = vec![];
    for c in &cases {
        for d in [DType::F32, DType::F64] {
            if let Err(e) = check_forward(c, d) {
                failures.push(format!("{e:#}"));
            }
        }
        if let Err(e) = check_grad(c) {
            failures.push(format!("{e:#}"));
        }
        for device in kernel_devices() {
            if let Err(e) = check_forward_on(c, op, device) {
                failures.push(format!("{e:#}"));
            }
            if let Err(e) = check_grad_on(c, op, device) {
                failures.push(format!("{e:#}"));
            }
        }
    }
    ensure!(
        cases.iter().any(|c| c.refused.is_some()),
        "op {} has no refused case (inputs it must reject with an error)",
        op.name()
    );
    if op.differentiable() {
        ensure!(
            cases.iter().any(|c| !c.grad_wrt.is_empty()),
            "op {} is differentiable but no case checks its gradient",
            op.name()
        );
    }
    let on_dev = cases
        .iter()
        .filter(|c| op.on_kernel_devices() && c.on_kernels)
        .count();
    eprintln!(
        "{}: {on_dev} of {} cases also on {:?} (the rest: a clear error there)",
        op.name(),
        cases.len(),
        kernel_devices()
    );
    if !failures.is_empty() {
        bail!(
            "{} of the checks of op {} failed:\n  {}",
            failures.len(),
            op.name(),
            failures.join("\n  ")
        );
    }
    Ok(cases.len())
}
