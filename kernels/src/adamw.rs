//! The AdamW family (kernels/adamw.cu, `adamw_f32`): its launch shape and the
//! f32 scalars of one step, derived in f64 exactly as the CPU op
//! (ops/src/adamw.rs) derives them, so kernel and CPU op agree to the bit.

use crate::LaunchConfig;

/// The launch over `n` parameters (the elementwise grid-stride loop).
pub fn config(n: usize) -> LaunchConfig {
    crate::elementwise::config(n)
}

/// The scalar arguments of `adamw_f32`, in its parameter order after `n`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scalars {
    pub decay: f32,
    pub b1: f32,
    pub b2: f32,
    pub c1: f32,
    pub c2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl Scalars {
    /// The scalars of step `step` (counted from 1; the launcher checks the
    /// hyper-parameters as the CPU op does).
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) -> Scalars {
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        Scalars {
            decay: (1.0 - lr * weight_decay) as f32,
            b1: beta1 as f32,
            b2: beta2 as f32,
            c1: (1.0 - beta1) as f32,
            c2: (1.0 - beta2) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: eps as f32,
        }
    }

    /// In kernel order.
    pub fn as_array(&self) -> [f32; 8] {
        [
            self.decay,
            self.b1,
            self.b2,
            self.c1,
            self.c2,
            self.step_size,
            self.bc2_sqrt,
            self.eps,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_has_no_bias_correction_left() {
        // step 1: bc1 = 1 - b1, so step_size = lr / (1 - b1); bc2 = 1 - b2
        let s = Scalars::new(1e-3, 0.9, 0.95, 1e-8, 0.1, 1);
        assert_eq!(s.step_size, (1e-3f64 / (1.0 - 0.9f64)) as f32);
        assert_eq!(s.bc2_sqrt, (1.0 - 0.95f64).sqrt() as f32);
        assert_eq!(s.decay, (1.0 - 1e-4f64) as f32);
        // late steps: the corrections go to 1
        let late = Scalars::new(1e-3, 0.9, 0.95, 1e-8, 0.1, 100_000);
        assert_eq!((late.step_size, late.bc2_sqrt), (1e-3, 1.0));
    }
}
