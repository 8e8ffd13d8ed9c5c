//! Launch shapes of the GELU family (kernels/gelu.cu: gelu_erf, gelu_erf_bwd,
//! gelu_tanh_bwd; gelu_tanh's forward is in the elementwise family): the
//! elementwise family's 1-D grid-stride loop over n elements.

use crate::LaunchConfig;

/// The launch over `n` elements.
pub fn config(n: usize) -> LaunchConfig {
    crate::elementwise::config(n)
}
