//! Launch shapes of the embedding family (kernels/embedding.cu): the gather
//! (`embedding_fwd_<dtype>`, one warp per position) and the deterministic
//! scatter-add backward (`embedding_bwd_<dtype>`, one block per bucket of
//! table rows `v % NB`, see the .cu). Letters: N positions, V table rows,
//! D features, NB buckets (blocks of the backward).

use crate::LaunchConfig;

/// Threads per block of the gather (8 warps, 8 positions at a time).
pub const FWD_BLOCK: u32 = 256;
/// At most this many blocks of the gather; more positions take more grid-stride steps.
pub const FWD_MAX_BLOCKS: u32 = 4096;
/// At most this many buckets (blocks) in the backward. Each block reads all N
/// ids, so more buckets cost more id reads; fewer leave SMs idle and make the
/// per-block walk longer. 1024 is ~8 blocks per SM of an H100.
pub const BWD_MAX_BUCKETS: u32 = 1024;

/// The gather over `n` positions.
pub fn fwd_config(n: usize) -> LaunchConfig {
    let warps_per_block = (FWD_BLOCK / 32) as usize;
    let blocks = n
        .div_ceil(warps_per_block)
        .clamp(1, FWD_MAX_BLOCKS as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (FWD_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The backward into `dtable [V, D]` (f32; every element is written, no
/// memset needed): `min(V, BWD_MAX_BUCKETS)` blocks of one thread per column
/// (a multiple of 32, at most 256).
pub fn bwd_config(d: usize, v: usize) -> LaunchConfig {
    let buckets = v.clamp(1, BWD_MAX_BUCKETS as usize) as u32;
    let block = d.next_multiple_of(32).clamp(32, 256) as u32;
    LaunchConfig {
        grid_dim: (buckets, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(fwd_config(0).grid_dim.0, 1);
        assert_eq!(fwd_config(9).grid_dim.0, 2);
        assert_eq!(fwd_config(1 << 30).grid_dim.0, FWD_MAX_BLOCKS);
        assert_eq!(bwd_config(64, 7).grid_dim.0, 7);
        assert_eq!(bwd_config(64, 50257).grid_dim.0, BWD_MAX_BUCKETS);
        assert_eq!(bwd_config(33, 5).block_dim.0, 64);
        assert_eq!(bwd_config(768, 5).block_dim.0, 256);
    }
}
