//! Launch shapes of the RoPE family (kernels/rope.cu): `rope_fwd_<dtype>` /
//! `rope_bwd_<dtype>` run one block per (b, t) row over its H * D/2 pairs;
//! `rope_tables_f32` / `rope_tables_scaled_f32` are grid-stride loops over the table entries.
//! Letters: B batch, T time, H heads, D head dim, P table rows.

use crate::LaunchConfig;

/// At most this many blocks (rows beyond take more grid-stride steps).
pub const MAX_BLOCKS: u32 = 65_535;

/// The rotation of `x [B, T, H, D]`.
pub fn config(b: usize, t: usize, h: usize, d: usize) -> LaunchConfig {
    let pairs = h * (d / 2);
    LaunchConfig {
        grid_dim: ((b * t).clamp(1, MAX_BLOCKS as usize) as u32, 1, 1),
        block_dim: (pairs.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The tables of `np` positions of head dim `d` (`np * d/2` entries).
pub fn tables_config(np: usize, d: usize) -> LaunchConfig {
    crate::elementwise::config(np * (d / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(config(2, 3, 1, 2).block_dim.0, 32);
        assert_eq!(config(2, 3, 4, 64).block_dim.0, 128);
        assert_eq!(config(2, 3, 12, 64).block_dim.0, 256);
        assert_eq!(config(2, 3, 12, 64).grid_dim.0, 6);
        assert_eq!(config(0, 3, 12, 64).grid_dim.0, 1);
        assert_eq!(config(1 << 20, 1, 1, 64).grid_dim.0, MAX_BLOCKS);
    }
}
