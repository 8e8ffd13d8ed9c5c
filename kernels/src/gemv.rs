//! Launch shapes of the gemv family (kernels/gemv.cu): `gemv_wt_<f16|bf16>`, f32 rows times
//! half-precision weights `[N, K]` transposed (one warp per `COLS` output columns, `ROWS` rows
//! per `blockIdx.y`); past `MAX_ROWS` the launcher widens the weights with copy.cu's
//! `cast_<f16|bf16>_f32`. Letters: M rows, N output columns, K inputs.

use crate::LaunchConfig;

/// Entry points (weights f16 or bf16; activations f32).
pub const ENTRIES: &[&str] = &["gemv_wt_f16", "gemv_wt_bf16"];
/// Rows per `blockIdx.y` (`KF_GEMV_ROWS` in gemv.cu): the weights are read once per this many.
pub const ROWS: usize = 8;
/// Output columns per warp (`KF_GEMV_COLS`).
pub const COLS: usize = 4;
/// Warps per block (`KF_GEMV_WARPS`).
pub const WARPS: u32 = 4;
/// The launcher runs `gemv_wt` up to this many rows (the weights are then read at most 8 times,
/// mostly from L2) and widens the weights for the f32 GEMM beyond: widening moves 2 + 4 bytes
/// per weight and the GEMM reads 4 more, about what 5 reads of the half weights cost.
pub const MAX_ROWS: usize = 64;

/// The launch of `gemv_wt` over `m` rows and `n` output columns.
pub fn config(m: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(WARPS as usize * COLS).max(1) as u32,
            m.div_ceil(ROWS).max(1) as u32,
            1,
        ),
        block_dim: (WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether the kernel may take its 16-byte path: K a multiple of 8 and every row of the
/// weights (2-byte elements, offset and leading dimension in elements) and of x (f32) starting
/// 16 bytes after the buffers' starts (which are 256-byte aligned on the device).
pub fn vectorized(k: usize, x_off: usize, lda: usize, w_off: usize, ldw: usize) -> bool {
    k % 8 == 0 && x_off % 4 == 0 && lda % 4 == 0 && w_off % 8 == 0 && ldw % 8 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let c = config(1, 768);
        assert_eq!(c.grid_dim, (48, 1, 1));
        assert_eq!(c.block_dim.0, 128);
        assert_eq!(config(9, 1).grid_dim, (1, 2, 1));
        assert_eq!(config(8, 17).grid_dim, (2, 1, 1));
        assert!(vectorized(768, 0, 768, 768 * 768, 768));
        assert!(!vectorized(12, 0, 12, 0, 12));
        assert!(!vectorized(64, 2, 64, 0, 64));
    }
}
