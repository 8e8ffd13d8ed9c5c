//! Launch shapes of the attention family (kernels/attention.cu): the tile of each kernel and head
//! dim (the template arguments of its entry points there: keep the two in step), grids, dynamic
//! shared memory, the split-key plan of the decode path, and the pattern codes the kernels take.
//! Letters: B batch, Tq query rows, Tk keys, H heads, D head dim.
//!
//! Kernel parameters (`*_<dtype>` storage T in {f32, f16, bf16}; lse, dvec and partials are f32):
//! - common inputs `IN` = q, k, v (T*), key_skip (u32* [B] or null), the strides in elements of
//!   q, k, v over (batch, row, head) as 9 x i64 (last dim unit-stride), tq, tk, q_start (u32),
//!   kind (i32, [`CAUSAL`] ...), n, k of the pattern (u32), scale (f32);
//! - `attn_fwd_d{64,128}` and `attn_decode_d{64,128}`: IN, o (T* [B, Tq, H, D]), lse (f32*
//!   [B, H, Tq] or null), opart (f32* [B, H, S, Tq, D]), lsepart (f32* [B, H, S, Tq]), nsplit,
//!   chunk (u32). With nsplit = 1 the kernel writes o and lse (the partials may be null); with
//!   nsplit > 1 it writes the partials and `attn_decode_combine` (opart, lsepart, o, lse, tq, d,
//!   nsplit) merges them;
//! - backward: `attn_bwd_dot` (o, dO (T* [B, Tq, H, D] contiguous), dvec (f32* [B, H, Tq]), B,
//!   tq, H, d), then `attn_bwd_dq_d*` (IN, dO, lse, dvec, dq) and `attn_bwd_dkdv_d*` (IN, dO, lse,
//!   dvec, dk, dv); dq [B, Tq, H, D], dk and dv [B, Tk, H, D], contiguous.
//!
//! Dynamic shared memory above [`SMEM_DEFAULT_LIMIT`] (the D = 128 forward and backward tiles)
//! needs `cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)` before the launch
//! ([`needs_smem_optin`]); every size here is below the 163 KiB of sm_80.

use super::LaunchConfig;

/// Head dims with kernels (template instances).
pub const HEAD_DIMS: &[usize] = &[64, 128];
/// Pattern codes (`kind`): AttnPattern::Causal, Staircase { n, k }, DoubleStaircase { n, k }.
pub const CAUSAL: i32 = 0;
pub const STAIRCASE: i32 = 1;
pub const DOUBLE_STAIRCASE: i32 = 2;
/// Dynamic shared memory a block gets without the opt-in attribute.
pub const SMEM_DEFAULT_LIMIT: u32 = 48 * 1024;
/// Query rows up to which [`use_decode`] picks the decode kernels (two of their 16-row tiles):
/// a KV-cached step has at most 2k rows (n_new committed tokens + K hints).
pub const DECODE_MAX_ROWS: usize = 32;
/// Most splits of the decode path (`KF_ATTN_MAX_SPLITS` in attention.cu).
pub const MAX_SPLITS: usize = 128;
/// Blocks the decode plan aims for: about two per SM of an H100 (132 SMs).
pub const TARGET_BLOCKS: usize = 264;
/// Threads per block of the small kernels (combine, rowsum).
const SMALL_BLOCK: u32 = 256;

/// The tiled kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Fwd,
    Decode,
    BwdDq,
    BwdDkdv,
}

impl Kernel {
    /// Entry-point stem: `<stem>_d<D>` then `_<dtype>`.
    pub fn stem(self) -> &'static str {
        match self {
            Kernel::Fwd => "attn_fwd",
            Kernel::Decode => "attn_decode",
            Kernel::BwdDq => "attn_bwd_dq",
            Kernel::BwdDkdv => "attn_bwd_dkdv",
        }
    }
}

/// A tile: `rows` (query rows; keys for dK/dV) x `cols` (keys per block; query rows per step
/// for dK/dV) with `threads` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub rows: usize,
    pub cols: usize,
    pub threads: usize,
}

/// A shape the kernels cannot take (head dim without an instance, sizes past u32 or the grid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "attention kernels: {}", self.0)
    }
}

impl std::error::Error for ShapeError {}

/// The tile of `kernel` at head dim `d` (the template arguments in attention.cu).
pub fn tile(kernel: Kernel, d: usize) -> Result<Tile, ShapeError> {
    let t = |rows, cols, threads| Tile {
        rows,
        cols,
        threads,
    };
    Ok(match (kernel, d) {
        (Kernel::Fwd, 64) => t(64, 32, 128),
        (Kernel::Fwd, 128) => t(64, 32, 128),
        (Kernel::Decode, 64) => t(16, 64, 64),
        (Kernel::Decode, 128) => t(16, 32, 64),
        (Kernel::BwdDq, 64) => t(32, 32, 64),
        (Kernel::BwdDq, 128) => t(32, 32, 64),
        (Kernel::BwdDkdv, 64) => t(32, 32, 64),
        (Kernel::BwdDkdv, 128) => t(32, 32, 128),
        _ => {
            return Err(ShapeError(format!(
                "head dim {d} has no kernel (instances: {HEAD_DIMS:?})"
            )))
        }
    })
}

/// Entry point of `kernel` for head dim `d` and storage dtype `dtype` ("f32", "f16", "bf16").
pub fn entry(kernel: Kernel, d: usize, dtype: &str) -> String {
    format!("{}_d{d}_{dtype}", kernel.stem())
}

/// Dynamic shared memory of `kernel` at head dim `d` in bytes: the layout written at each
/// kernel in attention.cu (k-major operands of row stride R + 4, [.][D] operands of stride
/// D + 4, 8 ints of key intervals per row, lse and dvec per row).
pub fn smem_bytes(kernel: Kernel, d: usize) -> Result<u32, ShapeError> {
    let Tile {
        rows: r, cols: c, ..
    } = tile(kernel, d)?;
    let (ldr, ldd) = (r + 4, d + 4);
    let floats = match kernel {
        // qt, ks, vs, pt, rng
        Kernel::Fwd | Kernel::Decode => d * ldr + 2 * c * ldd + c * ldr + 8 * r,
        // qt, gt, ks, vs, dst, rng, lse, dvec
        Kernel::BwdDq => 2 * d * ldr + 2 * c * ldd + c * ldr + 8 * r + 2 * r,
        // kt, vt, qs, gs, ps, dss, rng, lse, dvec (rows = keys, cols = query rows)
        Kernel::BwdDkdv => 2 * d * ldr + 2 * c * ldd + 2 * c * ldr + 8 * c + 2 * c,
    };
    Ok((floats * 4) as u32)
}

/// Whether a launch needs the dynamic shared memory opt-in attribute.
pub fn needs_smem_optin(cfg: &LaunchConfig) -> bool {
    cfg.shared_mem_bytes > SMEM_DEFAULT_LIMIT
}

/// Whether a pass of `tq` query rows runs on the decode kernels (split keys) rather than the
/// forward's 64-row tiles.
pub fn use_decode(tq: usize) -> bool {
    tq <= DECODE_MAX_ROWS
}

fn check(b: usize, h: usize, tq: usize, tk: usize) -> Result<(), ShapeError> {
    // indices are u32 / i32 in the kernels; batch and heads are grid dimensions (<= 65535)
    if tq > i32::MAX as usize || tk > i32::MAX as usize {
        return Err(ShapeError(format!(
            "Tq = {tq} or Tk = {tk} exceeds {}",
            i32::MAX
        )));
    }
    if b == 0 || h == 0 || b > 65535 || h > 65535 {
        return Err(ShapeError(format!(
            "B = {b} and H = {h} must be in 1..=65535"
        )));
    }
    Ok(())
}

fn cfg(grid: (usize, usize, usize), threads: usize, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0.max(1) as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The forward over tiles of query rows (nsplit = 1): grid (Tq tiles, H, B).
pub fn fwd(b: usize, h: usize, tq: usize, tk: usize, d: usize) -> Result<LaunchConfig, ShapeError> {
    check(b, h, tq, tk)?;
    let t = tile(Kernel::Fwd, d)?;
    Ok(cfg(
        (tq.div_ceil(t.rows), h, b),
        t.threads,
        smem_bytes(Kernel::Fwd, d)?,
    ))
}

/// The decode path: `main` runs `attn_decode_d*` with `nsplit` splits of `chunk` keys (grid
/// (Tq tiles, H, B * nsplit)); when nsplit > 1 it writes `part_rows` rows of partial results
/// (opart holds `part_rows * D` floats, lsepart `part_rows`) and `combine` merges them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub main: LaunchConfig,
    pub nsplit: u32,
    pub chunk: u32,
    pub combine: Option<LaunchConfig>,
    pub part_rows: usize,
}

/// The decode plan for `tq` rows over `tk` keys: enough splits for about [`TARGET_BLOCKS`]
/// blocks, each split a whole number of key blocks; `max_splits` caps the splits (tests force
/// several splits on short caches with it).
pub fn decode(
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
    max_splits: usize,
) -> Result<DecodePlan, ShapeError> {
    check(b, h, tq, tk)?;
    let t = tile(Kernel::Decode, d)?;
    let base = b * h * tq.div_ceil(t.rows).max(1);
    let key_blocks = tk.div_ceil(t.cols).max(1);
    let want = TARGET_BLOCKS
        .div_ceil(base)
        .clamp(1, MAX_SPLITS.min(max_splits.max(1)));
    let want = want.min(key_blocks).min(65535 / b);
    let chunk = key_blocks.div_ceil(want) * t.cols;
    let nsplit = tk.div_ceil(chunk).max(1);
    let main = cfg(
        (tq.div_ceil(t.rows), h, b * nsplit),
        t.threads,
        smem_bytes(Kernel::Decode, d)?,
    );
    let combine = (nsplit > 1).then(|| cfg((tq, h, b), SMALL_BLOCK as usize, 0));
    Ok(DecodePlan {
        main,
        nsplit: nsplit as u32,
        chunk: chunk as u32,
        combine,
        part_rows: if nsplit > 1 { b * h * nsplit * tq } else { 0 },
    })
}

/// rowsum(dO * O): one warp per (b, t, h).
pub fn bwd_dot(b: usize, h: usize, tq: usize) -> LaunchConfig {
    let rows = b * h * tq;
    let per_block = (SMALL_BLOCK / 32) as usize;
    cfg((rows.div_ceil(per_block), 1, 1), SMALL_BLOCK as usize, 0)
}

/// dQ over tiles of query rows: grid (Tq tiles, H, B).
pub fn bwd_dq(
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
) -> Result<LaunchConfig, ShapeError> {
    check(b, h, tq, tk)?;
    let t = tile(Kernel::BwdDq, d)?;
    Ok(cfg(
        (tq.div_ceil(t.rows), h, b),
        t.threads,
        smem_bytes(Kernel::BwdDq, d)?,
    ))
}

/// dK and dV over blocks of keys: grid (Tk blocks, H, B).
pub fn bwd_dkdv(
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
) -> Result<LaunchConfig, ShapeError> {
    check(b, h, tq, tk)?;
    let t = tile(Kernel::BwdDkdv, d)?;
    Ok(cfg(
        (tk.div_ceil(t.rows), h, b),
        t.threads,
        smem_bytes(Kernel::BwdDkdv, d)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn d64_fits_without_optin_and_d128_fits_sm80() {
        for k in [Kernel::Fwd, Kernel::Decode, Kernel::BwdDq, Kernel::BwdDkdv] {
            assert!(smem_bytes(k, 64).unwrap() <= SMEM_DEFAULT_LIMIT, "{k:?}");
            assert!(smem_bytes(k, 128).unwrap() <= 163 * 1024, "{k:?}");
        }
        assert!(smem_bytes(Kernel::Decode, 128).unwrap() <= SMEM_DEFAULT_LIMIT);
        assert!(tile(Kernel::Fwd, 96).is_err());
        assert_eq!(
            entry(Kernel::BwdDkdv, 128, "bf16"),
            "attn_bwd_dkdv_d128_bf16"
        );
    }

    #[test]
    fn decode_plan_covers_the_keys() {
        for (b, h, tq, tk) in [
            (1, 12, 8, 4096),
            (2, 4, 1, 37),
            (1, 1, 16, 1),
            (64, 16, 4, 900),
        ] {
            let p = decode(b, h, tq, tk, 64, MAX_SPLITS).unwrap();
            let n = p.nsplit as usize;
            assert!(n >= 1 && n <= MAX_SPLITS);
            assert_eq!(p.chunk as usize % tile(Kernel::Decode, 64).unwrap().cols, 0);
            // every key in exactly one split, no empty split past the end
            assert!(n * p.chunk as usize >= tk && (n - 1) * (p.chunk as usize) < tk.max(1));
            assert_eq!(p.main.grid_dim.2 as usize, b * n);
            assert_eq!(p.combine.is_some(), n > 1);
        }
        // a long cache with one head: many splits; a large batch: none needed
        assert!(decode(1, 1, 4, 8192, 128, MAX_SPLITS).unwrap().nsplit > 16);
        assert_eq!(decode(64, 16, 4, 900, 64, MAX_SPLITS).unwrap().nsplit, 1);
        assert_eq!(decode(1, 1, 4, 8192, 64, 1).unwrap().nsplit, 1);
        assert!(fwd(0, 1, 1, 1, 64).is_err());
        assert!(fwd(1, 1, 1usize << 32, 1, 64).is_err());
    }
}
