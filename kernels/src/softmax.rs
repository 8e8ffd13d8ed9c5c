//! Launch shapes of the softmax family (kernels/softmax.cu): one block per
//! row. Letters: R rows, V the softmax dimension.

use crate::LaunchConfig;

/// Most threads per block: a V = 50257 row is ~100 elements per thread.
pub const MAX_BLOCK: u32 = 512;

/// Forward or backward over `rows` rows of `v`: a multiple of 32 threads,
/// no more than V (rounded up) and at most `MAX_BLOCK`.
pub fn config(rows: usize, v: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (
            v.next_multiple_of(32).clamp(32, MAX_BLOCK as usize) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    }
}

/// The launcher's initial value of the `bad_row` flag: no fully masked row.
pub const NO_BAD_ROW: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(config(3, 1).block_dim.0, 32);
        assert_eq!(config(3, 33).block_dim.0, 64);
        assert_eq!(config(3, 50257).block_dim.0, MAX_BLOCK);
        assert_eq!(config(0, 5).grid_dim.0, 1);
    }
}
