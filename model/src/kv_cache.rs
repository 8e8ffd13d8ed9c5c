//! KV cache for incremental decoding (KFORCING.md sections 5 and 7). Per layer, K (after
//! RoPE) and V live in preallocated `[B, Tmax, H, D]` buffers. Rows `0..len` are
//! committed. A step writes its rows right after them (`len..len + T`), attends over keys
//! `0..len + T` (causal by absolute row: `AttnPattern::Causal` with `q_start = len`), and
//! then commits the first `n <= T` of those rows; the rest (the student's hint rows) are
//! overwritten by the next step. Batched prompts of different lengths are left-padded to
//! one length; `AttnParams::key_skip` hides each sequence's padding keys, and positions
//! restart at 0 at each sequence's first real token.
//! Letters: B batch, Tmax capacity, T rows of one step, H heads, D head dim.

use crate::config::DditConfig;
use anyhow::{ensure, Context, Result};
use kf_engine::{DType, Device, Tensor};

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    batch: usize,
    cap: usize,
    heads: usize,
    head_dim: usize,
    dtype: DType,
    /// Committed rows.
    len: usize,
    /// Rows written after `len` by the current step (all layers the same), not committed.
    pending: usize,
    /// Layers written in the current step (a step must write every layer before a commit).
    layers_written: usize,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvCache[{} layers, B {}, len {}/{}, H {}, D {}, {}]",
            self.k.len(),
            self.batch,
            self.len,
            self.cap,
            self.heads,
            self.head_dim,
            self.dtype
        )
    }
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` rows (padding included),
    /// in the model's compute dtype, on the CPU.
    pub fn new(cfg: &DditConfig, batch: usize, capacity: usize, dtype: DType) -> Result<KvCache> {
        Self::new_on(cfg, batch, capacity, dtype, Device::Cpu)
    }

    /// [`KvCache::new`] on `device` (the model's).
    pub fn new_on(
        cfg: &DditConfig,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: Device,
    ) -> Result<KvCache> {
        cfg.validate()?;
        ensure!(batch >= 1, "KV cache: batch must be at least 1");
        ensure!(capacity >= 1, "KV cache: capacity must be at least 1 row");
        ensure!(
            dtype == DType::F32 || dtype == DType::F64,
            "KV cache: dtype must be f32 or f64, got {dtype}"
        );
        let (h, d) = (cfg.kv_heads(), cfg.head_dim());
        let shape = [batch, capacity, h, d];
        let mk = || -> Result<Vec<Tensor>> {
            (0..cfg.n_layers)
                .map(|_| Tensor::zeros(&shape, dtype, device))
                .collect()
        };
        Ok(KvCache {
            k: mk().context("cannot allocate the KV cache")?,
            v: mk().context("cannot allocate the KV cache")?,
            batch,
            cap: capacity,
            heads: h,
            head_dim: d,
            dtype,
            len: 0,
            pending: 0,
            layers_written: 0,
        })
    }

    /// Committed rows (the absolute row of the next step's first query).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn n_layers(&self) -> usize {
        self.k.len()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Rows written by the current step and not yet committed.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Keeps the first `n` rows written by the last step (`n <= pending`); the others are
    /// dropped (overwritten by the next step).
    pub fn commit(&mut self, n: usize) -> Result<()> {
        ensure!(
            self.layers_written == 0 || self.layers_written == self.k.len(),
            "KV cache: commit after {} of {} layers were written",
            self.layers_written,
            self.k.len()
        );
        ensure!(
            n <= self.pending,
            "KV cache: cannot commit {n} rows, the last step wrote {}",
            self.pending
        );
        self.len += n;
        self.pending = 0;
        self.layers_written = 0;
        Ok(())
    }

    /// Forgets rows `len..` (rolls back to a shorter committed prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        ensure!(
            len <= self.len,
            "KV cache: cannot truncate to {len} rows, only {} are committed",
            self.len
        );
        self.len = len;
        self.pending = 0;
        self.layers_written = 0;
        Ok(())
    }

    /// Empties the cache (buffers are kept for reuse).
    pub fn reset(&mut self) {
        self.len = 0;
        self.pending = 0;
        self.layers_written = 0;
    }

    /// Writes this step's `k`, `v` `[B, T, H, D]` (any strides with a unit last stride) of
    /// `layer` at rows `len..len + T` and returns the views `[B, len + T, H, D]` of rows
    /// `0..len + T` to attend over. Layers are written in order, once per step.
    pub fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        ensure!(
            layer == self.layers_written,
            "KV cache: layer {layer} written out of order (expected layer {})",
            self.layers_written
        );
        let want = [self.batch, k.dim(1)?, self.heads, self.head_dim];
        for (what, t) in [("k", k), ("v", v)] {
            ensure!(
                t.shape() == want,
                "KV cache: {what} has shape {:?}, expected [B, T, H, D] = {want:?}",
                t.shape()
            );
            ensure!(
                t.dtype() == self.dtype,
                "KV cache: {what} is {}, the cache holds {}",
                t.dtype(),
                self.dtype
            );
        }
        let t = want[1];
        if layer == 0 {
            ensure!(
                self.len + t <= self.cap,
                "KV cache: a step of {t} rows after {} committed rows exceeds the capacity of {} rows",
                self.len,
                self.cap
            );
            self.pending = t;
        } else {
            ensure!(
                t == self.pending,
                "KV cache: layer {layer} writes {t} rows, layer 0 wrote {}",
                self.pending
            );
        }
        for (src, dst) in [(k, &self.k[layer]), (v, &self.v[layer])] {
            ensure!(
                !src.same_storage(dst),
                "KV cache: cannot write a view of the cache into itself"
            );
            dst.narrow(1, self.len, t)?
                .copy_from(src)
                .context("KV cache: writing this step's rows")?;
        }
        self.layers_written += 1;
        let rows = self.len + t;
        Ok((
            self.k[layer].narrow(1, 0, rows)?,
            self.v[layer].narrow(1, 0, rows)?,
        ))
    }
}
