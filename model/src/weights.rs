//! How a model's weight matrices are stored when it moves to a device: f32 (what training
//! updates), or each in the narrowest precision that holds its values exactly, so a model
//! read from an f16 or bf16 file serves from half-precision matrices (half the bytes a
//! decode step reads; the ops compute in f32 either way). Also what the model families share
//! about their named parameter lists (moving, casting, making them trainable) and the byte
//! count of a parameter set by storage, for `kfrun generate` / `bench` reports.

use anyhow::Result;
use kf_engine::{DType, Tensor};

/// How weight matrices (the linear layers' `[out, in]` weights, the LM head and the noise
/// encoder's included) are stored on a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightStore {
    /// f32 (what training updates).
    #[default]
    F32,
    /// Each matrix in the narrowest of f16, bf16 and f32 that holds all its values exactly: a
    /// model read from an f16 or bf16 file (widened on load) goes back to its file's precision,
    /// with the outputs of [`WeightStore::F32`] up to the order of the sums; any other model
    /// stays f32.
    Exact,
}

/// The narrowest of f16, bf16 and f32 holding every value of `v` exactly.
pub fn exact_dtype(v: &[f32]) -> DType {
    if v.iter().all(|&x| half::f16::from_f32(x).to_f32() == x) {
        DType::F16
    } else if v.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x) {
        DType::BF16
    } else {
        DType::F32
    }
}

/// A parameter the linear op multiplies by: a rank-2 `*.weight` (embedding tables and norm
/// weights are not).
pub fn is_matrix(name: &str, t: &Tensor) -> bool {
    name.ends_with(".weight") && t.rank() == 2
}

/// A parameter the CPU ops also read in 16-bit (a model served from an f16 / bf16 file keeps
/// it so, see [`load_param`]): a weight matrix or an embedding table.
pub fn is_table(name: &str, t: &Tensor) -> bool {
    t.rank() == 2 && (name.ends_with(".weight") || name.ends_with(".embedding"))
}

/// A tensor read from a model file as `store` keeps it in memory: under
/// [`WeightStore::Exact`] a 16-bit table stays 16-bit (no widening at load: half the bytes
/// in memory and per decode step), anything else becomes f32.
pub fn load_param(name: &str, t: Tensor, store: WeightStore) -> Result<Tensor> {
    let half = matches!(t.dtype(), DType::F16 | DType::BF16);
    if store == WeightStore::Exact && half && is_table(name, &t) {
        return Ok(t);
    }
    t.to_dtype(DType::F32)
}

/// Checks a model parameter's dtype: the model computes in f32 or f64 (one for all), and
/// its tables may be f16 / bf16 (read as such, see [`is_table`]). `dtype` carries the
/// compute dtype seen so far.
pub fn check_dtype(name: &str, t: &Tensor, dtype: &mut Option<DType>) -> Result<()> {
    if matches!(t.dtype(), DType::F16 | DType::BF16) && is_table(name, t) {
        return Ok(());
    }
    anyhow::ensure!(
        t.dtype() == DType::F32 || t.dtype() == DType::F64,
        "tensor \"{name}\" is {}; the model computes in f32 or f64",
        t.dtype()
    );
    let d = *dtype.get_or_insert(t.dtype());
    anyhow::ensure!(
        t.dtype() == d,
        "tensor \"{name}\" is {} but the others are {d}",
        t.dtype()
    );
    Ok(())
}

/// `t` (parameter `name`) as `store` keeps it: an f32 matrix under [`WeightStore::Exact`]
/// in its exact dtype, anything else unchanged. Not on the tape.
pub fn stored(name: &str, t: &Tensor, store: WeightStore) -> Result<Tensor> {
    let t = t.detach();
    if matches!(t.dtype(), DType::F16 | DType::BF16) && !is_matrix(name, &t) {
        // a 16-bit embedding table: the kernel devices gather from f32 tables
        return t.to_dtype(DType::F32);
    }
    if store == WeightStore::F32 || t.dtype() != DType::F32 || !is_matrix(name, &t) {
        return Ok(t);
    }
    let dt = exact_dtype(&t.to_vec::<f32>()?);
    t.to_dtype(dt)
}

/// `params` with each tensor replaced by `f(name, tensor)` (names and order kept).
pub fn map_params(
    params: &[(String, Tensor)],
    f: impl Fn(&str, &Tensor) -> Result<Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    params
        .iter()
        .map(|(n, t)| Ok((n.clone(), f(n, t)?)))
        .collect()
}

/// `on`: every parameter becomes a fresh `Tensor::var()` leaf sharing its storage (so
/// in-place optimiser updates are seen by the model); `off`: plain tensors.
pub fn set_trainable(params: &mut [(String, Tensor)], on: bool) {
    for (_, t) in params {
        *t = if on { t.var() } else { t.detach() };
    }
}

/// `params` converted to `dtype` (f32 or f64), off the tape.
pub fn params_to_dtype(params: &[(String, Tensor)], dtype: DType) -> Result<Vec<(String, Tensor)>> {
    anyhow::ensure!(
        dtype == DType::F32 || dtype == DType::F64,
        "the model computes in f32 or f64, not {dtype}"
    );
    map_params(params, |_, t| t.detach().to_dtype(dtype))
}

/// `params` with their tables (see [`is_table`]) stored as `dtype` (f32, f16 or bf16: a model
/// served at that precision) and the rest as f32, off the tape.
pub fn tables_in(params: &[(String, Tensor)], dtype: DType) -> Result<Vec<(String, Tensor)>> {
    anyhow::ensure!(
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
        "weights are served as f32, f16 or bf16, not {dtype}"
    );
    map_params(params, |n, t| {
        let to = if is_table(n, t) { dtype } else { DType::F32 };
        t.detach().to_dtype(to)
    })
}

/// `params` on `device`, the matrices stored as `store` says, off the tape.
pub fn params_to_device(
    params: &[(String, Tensor)],
    device: kf_engine::Device,
    store: WeightStore,
) -> Result<Vec<(String, Tensor)>> {
    map_params(params, |n, t| stored(n, t, store)?.to_device(device))
}

/// Bytes of a parameter set, and of its weight matrices by storage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightBytes {
    /// Bytes of every parameter.
    pub total: usize,
    /// Bytes of the weight matrices by storage: (f32, f16, bf16).
    pub matrices: (usize, usize, usize),
    /// Bytes of the matrices a pass reads as ggml blocks (`Ddit::quantized`, GGUF files
    /// kept quantized), counted in `total` instead of their f32 copies.
    pub blocks: usize,
    /// Bytes of an embedding table a pass only gathers rows from (not the head's weight):
    /// counted in `total`, but a decode step does not read it whole.
    pub gathered: usize,
}

impl WeightBytes {
    /// The bytes of `params` (name, tensor).
    pub fn of(params: &[(String, Tensor)]) -> WeightBytes {
        let mut wb = WeightBytes::default();
        for (name, t) in params {
            wb.add(t.numel() * t.dtype().size(), t.dtype(), is_matrix(name, t));
        }
        wb
    }
    /// Bytes a decode step reads in full: every parameter but a gathered embedding table.
    pub fn read_per_step(&self) -> usize {
        self.total - self.gathered
    }
    pub fn add(&mut self, bytes: usize, dtype: DType, matrix: bool) {
        self.total += bytes;
        if matrix {
            match dtype {
                DType::F16 => self.matrices.1 += bytes,
                DType::BF16 => self.matrices.2 += bytes,
                _ => self.matrices.0 += bytes,
            }
        }
    }
    /// "f16 weight matrices, 29.4 MB in all" and the like.
    pub fn describe(&self) -> String {
        let (f, h, b) = self.matrices;
        let kinds: Vec<&str> = [
            (f, "f32"),
            (h, "f16"),
            (b, "bf16"),
            (self.blocks, "ggml-block"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(_, s)| *s)
        .collect();
        format!(
            "{} weight matrices, {:.1} MB of parameters in all",
            if kinds.is_empty() {
                "no".to_string()
            } else {
                kinds.join(" + ")
            },
            self.total as f64 / 1e6
        )
    }
}
