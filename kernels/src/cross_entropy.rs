//! Launch shapes of the cross-entropy family (kernels/cross_entropy.cu):
//! forward one block per row, the mean one block, the backward a grid of
//! (rows, column chunks). Letters: N rows, V vocabulary.

use crate::LaunchConfig;

/// Entry points: forward and backward per storage dtype, the mean in f32
/// (the per-row losses are f32 whatever the logits' dtype).
pub const ENTRIES: &[&str] = &[
    "cross_entropy_fwd_f32",
    "cross_entropy_fwd_f16",
    "cross_entropy_fwd_bf16",
    "cross_entropy_bwd_f32",
    "cross_entropy_bwd_f16",
    "cross_entropy_bwd_bf16",
    "cross_entropy_mean_f32",
];

/// Threads per block of the forward and backward (at most; fewer for small V).
pub const BLOCK: u32 = 256;
/// Elements of a row each backward thread writes, at least (sets the chunks).
pub const BWD_PER_THREAD: usize = 16;

fn block_for(v: usize) -> u32 {
    // a multiple of 32 (the reductions are warp-wide), no more threads than logits
    v.next_multiple_of(32).clamp(32, BLOCK as usize) as u32
}

/// `cross_entropy_fwd_<dt>`: one block per row.
pub fn fwd_config(n: usize, v: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.max(1) as u32, 1, 1),
        block_dim: (block_for(v), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `cross_entropy_mean_f32`: one block over the N per-row losses.
pub fn mean_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (block_for(n), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `cross_entropy_bwd_<dt>`: grid (N, chunks of a row).
pub fn bwd_config(n: usize, v: usize) -> LaunchConfig {
    let block = block_for(v);
    let chunks = v
        .div_ceil(block as usize * BWD_PER_THREAD)
        .clamp(1, u16::MAX as usize) as u32;
    LaunchConfig {
        grid_dim: (n.max(1) as u32, chunks, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(fwd_config(0, 5).grid_dim, (1, 1, 1));
        assert_eq!(fwd_config(7, 5).block_dim.0, 32);
        assert_eq!(fwd_config(7, 50257).block_dim.0, BLOCK);
        assert_eq!(bwd_config(3, 50257).grid_dim, (3, 13, 1));
        assert_eq!(bwd_config(3, 1).grid_dim, (3, 1, 1));
        assert_eq!(mean_config(1000).block_dim.0, BLOCK);
    }
}
