//! Launch shapes of the reduce family (kernels/reduce.cu): column sums
//! `colsum_<dtype>` (blocks of 32 x 8 threads over 32 columns and a chunk of
//! rows, writing K partial rows [K, C]; K = 1 writes the output directly) and
//! `colsum_finish_f32` (adds the K partials per column, in order); the sum of
//! squares `sumsq_<dtype>` (one launch per buffer, G partials each, at its own
//! slot of one partial buffer) and `sumsq_finish_f32` (one block adds the P
//! partials). Every shape depends on the sizes only, so the sums are
//! deterministic. Letters: R rows, C columns, K row chunks, n elements,
//! G blocks of one buffer, P partials in all.

use crate::LaunchConfig;

/// Rows per chunk of the column-sum partials, at least; more when R is large,
/// so that K stays at most `MAX_CHUNKS`.
pub const MIN_CHUNK_ROWS: usize = 64;
/// Most row chunks (K): bounds the partial buffer (K C floats) and the finish's walk.
pub const MAX_CHUNKS: usize = 256;
/// Threads per block of the sum of squares (both passes).
pub const SUMSQ_BLOCK: u32 = 256;
/// Elements per thread before a buffer gets another block, and the most blocks
/// per buffer (G): partials stay few, the finish is one block.
pub const SUMSQ_PER_THREAD: usize = 16;
pub const SUMSQ_MAX_BLOCKS: usize = 128;

/// The column-sum partials of [R, C]: the launch, the kernel's `chunk` (rows
/// per chunk) and K (rows of the partial buffer; K = 1: no finish launch).
pub fn colsum_config(rows: usize, cols: usize) -> (LaunchConfig, u32, u32) {
    let chunk = rows.div_ceil(MAX_CHUNKS).max(MIN_CHUNK_ROWS);
    let nchunks = rows.div_ceil(chunk).max(1);
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(32).max(1) as u32, nchunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    (cfg, chunk as u32, nchunks as u32)
}

/// The finish of the column sums over C columns.
pub fn colsum_finish_config(cols: usize) -> LaunchConfig {
    crate::elementwise::config(cols)
}

/// G, the partials (blocks) of the sum of squares of a buffer of `n`.
pub fn sumsq_blocks(n: usize) -> usize {
    n.div_ceil(SUMSQ_BLOCK as usize * SUMSQ_PER_THREAD)
        .clamp(1, SUMSQ_MAX_BLOCKS)
}

/// The first pass over a buffer of `n` elements (writes `sumsq_blocks(n)` partials).
pub fn sumsq_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (sumsq_blocks(n) as u32, 1, 1),
        block_dim: (SUMSQ_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The slots of a list of buffers with `lens` elements: each buffer's first
/// partial, and P, the total.
pub fn sumsq_slots(lens: &[usize]) -> (Vec<u32>, u32) {
    let mut slots = Vec::with_capacity(lens.len());
    let mut p = 0usize;
    for &n in lens {
        slots.push(p as u32);
        p += sumsq_blocks(n);
    }
    (slots, p as u32)
}

/// The finish: one block over the P partials.
pub fn sumsq_finish_config() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (SUMSQ_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let (c, chunk, k) = colsum_config(1, 7);
        assert_eq!((c.grid_dim, chunk, k), ((1, 1, 1), 64, 1));
        let (c, chunk, k) = colsum_config(1000, 33);
        assert_eq!((c.grid_dim, chunk, k), ((2, 16, 1), 64, 16));
        let (_, chunk, k) = colsum_config(100_000, 768);
        assert!(k as usize <= MAX_CHUNKS && chunk as usize * k as usize >= 100_000);
        assert_eq!(sumsq_blocks(0), 1);
        assert_eq!(sumsq_blocks(4096), 1);
        assert_eq!(sumsq_blocks(4097), 2);
        assert_eq!(sumsq_blocks(1 << 30), SUMSQ_MAX_BLOCKS);
        assert_eq!(sumsq_slots(&[1, 4097, 5]), (vec![0, 1, 3], 4));
    }
}
