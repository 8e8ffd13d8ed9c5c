//! Launch shapes of the sampling family (kernels/sampling.cu): one block per
//! row, one thread per 64-block of the vocabulary (up to 256), and the f64
//! prefix sums of the 64-blocks in dynamic shared memory.
//! Letters: R rows, V vocabulary, nb = ceil(V / 64).

use crate::LaunchConfig;

/// Vocabulary block of the two-level cumulative sum (ops/src/sampling.rs BLOCK).
pub const CDF_BLOCK: usize = 64;
/// Most threads per block.
pub const MAX_THREADS: u32 = 256;
/// Dynamic shared memory a block gets without an opt-in attribute.
pub const MAX_SHARED: usize = 48 * 1024;
/// The largest vocabulary whose prefix sums fit `MAX_SHARED`.
pub const MAX_VOCAB: usize = (MAX_SHARED / 8 - 1) * CDF_BLOCK;

/// The launch of `sample_inverse_cdf_<dt>` and `inverse_cdf_noise_<dt>` for
/// `rows` rows of `v` logits; an error above [`MAX_VOCAB`].
pub fn config(rows: usize, v: usize) -> Result<LaunchConfig, String> {
    if v > MAX_VOCAB {
        return Err(format!(
            "sampling kernels: vocabulary {v} exceeds {MAX_VOCAB} (the f64 prefix sums of its \
             64-blocks must fit {MAX_SHARED} bytes of shared memory)"
        ));
    }
    let nb = v.div_ceil(CDF_BLOCK);
    Ok(LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (
            nb.next_multiple_of(32).clamp(32, MAX_THREADS as usize) as u32,
            1,
            1,
        ),
        shared_mem_bytes: ((nb + 1) * 8) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let c = config(4, 50257).unwrap();
        assert_eq!(c.grid_dim, (4, 1, 1));
        assert_eq!(c.block_dim.0, 256);
        assert_eq!(c.shared_mem_bytes, (786 + 1) * 8); // P_0 ..= P_nb
        assert_eq!(config(1, 65).unwrap().block_dim.0, 32);
        assert_eq!(config(1, 8192).unwrap().block_dim.0, 128);
        assert!(config(1, 262_144).is_ok());
        assert!(config(1, MAX_VOCAB).unwrap().shared_mem_bytes as usize <= MAX_SHARED);
        assert!(config(1, MAX_VOCAB + 1).unwrap_err().contains("exceeds"));
    }
}
