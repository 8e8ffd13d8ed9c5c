//! Launch shapes of the Philox family (kernels/philox.cu): one thread per
//! 128-bit Philox block, grid-stride. Letters: n outputs, nb Philox blocks.

use crate::LaunchConfig;

/// Entry points (no storage-dtype variants: raw words and the uniforms of engine/src/rng.rs).
pub const ENTRIES: &[&str] = &["philox_u32", "philox_uniform_f32", "philox_uniform_f64"];

/// Threads per block.
pub const BLOCK: u32 = 256;
/// At most this many blocks (larger fills take more grid-stride steps).
pub const MAX_BLOCKS: u32 = 1024;

/// Philox blocks that elements `start .. start + n` touch at `per` elements a block.
pub fn blocks_touched(start: u64, n: u64, per: u64) -> u64 {
    if n == 0 {
        0
    } else {
        (start + n - 1) / per - start / per + 1
    }
}

/// The launch for `nb` Philox blocks (`philox_u32`: nb; `philox_uniform_f32`:
/// `blocks_touched(start, n, 4)`; `philox_uniform_f64`: `blocks_touched(start, n, 2)`).
pub fn config(nb: u64) -> LaunchConfig {
    let blocks = nb.div_ceil(BLOCK as u64).clamp(1, MAX_BLOCKS as u64) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(blocks_touched(0, 0, 4), 0);
        assert_eq!(blocks_touched(3, 2, 4), 2);
        assert_eq!(blocks_touched(4, 4, 4), 1);
        assert_eq!(blocks_touched(1, 3, 2), 2);
        assert_eq!(config(0).grid_dim.0, 1);
        assert_eq!(config(257).grid_dim.0, 2);
        assert_eq!(config(1 << 40).grid_dim.0, MAX_BLOCKS);
    }
}
