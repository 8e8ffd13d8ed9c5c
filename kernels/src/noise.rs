//! Launch shape of the noise-feature family (kernels/noise.cu): a 1-D
//! grid-stride loop over the N * d/2 (cos, sin) pairs. Letters: N values,
//! d features.

use crate::LaunchConfig;

/// The features of `n` values, `d` per value.
pub fn config(n: usize, d: usize) -> LaunchConfig {
    crate::elementwise::config(n * (d / 2))
}
