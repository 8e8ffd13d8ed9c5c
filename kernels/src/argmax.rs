//! Launch shapes of the argmax family (kernels/argmax.cu): one block per
//! batch row, its K positions in order. Letters: B batch rows, V vocabulary.

use crate::LaunchConfig;

/// Most threads per block (a row of 50k logits is about 50 per thread).
pub const MAX_THREADS: u32 = 1024;

/// The launch of `argmax_penalty_<dt>` for `b` batch rows of `v` logits.
pub fn config(b: usize, v: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (b.max(1) as u32, 1, 1),
        block_dim: (
            v.div_ceil(16)
                .next_multiple_of(32)
                .clamp(32, MAX_THREADS as usize) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shapes() {
        assert_eq!(super::config(0, 3).grid_dim, (1, 1, 1));
        assert_eq!(super::config(2, 3).block_dim.0, 32);
        assert_eq!(super::config(2, 30522).block_dim.0, 1024);
    }
}
