//! Launch shapes of the LayerNorm backward (kernels/layernorm.cu):
//! `layernorm_bwd_dx_<dtype>` (one block per row), `layernorm_bwd_dwdb_<dtype>`
//! (blocks of 32 x 8 threads over 32 columns and a chunk of rows, writing
//! partial sums [C, D]) and `layernorm_bwd_reduce_f32` (adds the C partials;
//! skipped when C = 1, the partials being dw / db themselves).
//! Letters: R rows, D features, C chunks.

use crate::LaunchConfig;

/// Rows per chunk of the dw/db partials, at least; more when R is large, so
/// that C stays at most `MAX_CHUNKS`.
pub const MIN_CHUNK_ROWS: usize = 64;
/// Most chunks (C): bounds the partial buffers (2 C D floats) and the reduce's walk.
pub const MAX_CHUNKS: usize = 256;

/// The dx launch: as the forward's, without the shared-memory row cache.
pub fn dx_config(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (d.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The dw/db partials: the launch, the kernel's `chunk` (rows per chunk)
/// and C, the number of chunks (rows of the partial buffers).
pub fn dwdb_config(rows: usize, d: usize) -> (LaunchConfig, u32, u32) {
    let chunk = rows.div_ceil(MAX_CHUNKS).max(MIN_CHUNK_ROWS);
    let nchunks = rows.div_ceil(chunk).max(1);
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(32).max(1) as u32, nchunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    (cfg, chunk as u32, nchunks as u32)
}

/// The reduce of C partials per column.
pub fn reduce_config(d: usize) -> LaunchConfig {
    crate::elementwise::config(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let (c, chunk, n) = dwdb_config(1, 7);
        assert_eq!((c.grid_dim, chunk, n), ((1, 1, 1), 64, 1));
        let (c, chunk, n) = dwdb_config(1000, 33);
        assert_eq!((c.grid_dim, chunk, n), ((2, 16, 1), 64, 16));
        let (_, chunk, n) = dwdb_config(100_000, 768);
        assert!(n as usize <= MAX_CHUNKS && chunk as usize * n as usize >= 100_000);
        assert_eq!(dx_config(3, 4097).block_dim.0, 256);
    }
}
