//! Output buffers for CPU kernels. Ops allocate results through `OutBuf`; in
//! the test harness's canary mode the buffer gets guard elements before and
//! after the tensor (checked when the tensor is finished, so a write outside
//! it fails) and an "uninitialised" body filled with NaN bytes (so an element
//! the kernel forgot to write fails the NaN check).

use crate::autograd::BackwardOp;
use crate::dtype::Element;
use crate::layout::{checked_numel, Layout};
use crate::storage::Storage;
use crate::Tensor;
use anyhow::{ensure, Result};
use std::cell::Cell;
use std::sync::Arc;

/// Guard elements on each side in canary mode.
pub const CANARY_ELEMS: usize = 64;
const CANARY_BYTE: u8 = 0xA5;

thread_local! {
    static CANARY: Cell<bool> = const { Cell::new(false) };
}

/// Turn canary mode on or off for allocations made on this thread.
pub fn set_canary_mode(on: bool) {
    CANARY.with(|c| c.set(on));
}

pub fn canary_mode() -> bool {
    CANARY.with(|c| c.get())
}

pub struct OutBuf<T> {
    v: Vec<T>,
    pad: usize,
    n: usize,
}

impl<T: Element> OutBuf<T> {
    fn alloc(n: usize, body: u8) -> Self {
        let pad = if canary_mode() { CANARY_ELEMS } else { 0 };
        if pad == 0 {
            // a recycled buffer (see storage::pool): stale values for uninit, cleared for zeros
            if let Some(mut v) = crate::storage::pool::take::<T>(n) {
                if body == 0 {
                    v.fill(T::zeroed());
                }
                return OutBuf { v, pad, n };
            }
        }
        let mut v: Vec<T> = vec![T::zeroed(); n + 2 * pad];
        if pad > 0 {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
            let es = std::mem::size_of::<T>();
            bytes[..pad * es].fill(CANARY_BYTE);
            bytes[(pad + n) * es..].fill(CANARY_BYTE);
            bytes[pad * es..(pad + n) * es].fill(body);
        }
        OutBuf { v, pad, n }
    }

    /// A buffer the kernel must write completely (NaN-filled in canary mode; otherwise
    /// zeros, or the stale values of a recycled buffer when it is large).
    pub fn uninit(n: usize) -> Self {
        Self::alloc(n, 0xFF)
    }

    /// A zero-filled buffer (for kernels that accumulate).
    pub fn zeros(n: usize) -> Self {
        Self::alloc(n, 0)
    }

    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.v[self.pad..self.pad + self.n]
    }

    /// The whole allocation including guards and the body's start index, for
    /// kernels that work with raw pointers (the canaries must survive them).
    pub fn raw_parts(&mut self) -> (&mut [T], usize) {
        (&mut self.v, self.pad)
    }

    fn check(&self) -> Result<()> {
        if self.pad == 0 {
            return Ok(());
        }
        let bytes: &[u8] = bytemuck::cast_slice(&self.v);
        let es = std::mem::size_of::<T>();
        let before = bytes[..self.pad * es].iter().all(|&b| b == CANARY_BYTE);
        let after = bytes[(self.pad + self.n) * es..]
            .iter()
            .all(|&b| b == CANARY_BYTE);
        ensure!(
            before && after,
            "canary overwritten {} the output buffer of {} elements: a kernel wrote out of bounds",
            if before { "after" } else { "before" },
            self.n
        );
        Ok(())
    }

    /// Verify the guards and wrap the body as a contiguous tensor.
    pub fn finish(self, shape: &[usize], node: Option<Arc<dyn BackwardOp>>) -> Result<Tensor> {
        let n = checked_numel(shape)?;
        ensure!(
            n == self.n,
            "output of {} elements does not fill shape {shape:?}",
            self.n
        );
        self.check()?;
        let layout = Layout::new(
            shape.to_vec(),
            crate::layout::contiguous_strides(shape),
            self.pad,
        )?;
        Tensor::from_storage(Storage::Cpu(T::wrap(self.v)), layout, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_catches_out_of_bounds_and_unwritten() {
        set_canary_mode(true);
        let mut b = OutBuf::<f32>::uninit(5);
        b.as_mut_slice().fill(1.0);
        let t = b.finish(&[5], None).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0; 5]);

        let mut b = OutBuf::<f32>::uninit(5);
        let (raw, start) = b.raw_parts();
        raw[start + 5] = 0.0; // one past the end
        assert!(b
            .finish(&[5], None)
            .unwrap_err()
            .to_string()
            .contains("out of bounds"));

        let b = OutBuf::<f32>::uninit(3);
        let t = b.finish(&[3], None).unwrap();
        assert!(t.to_vec::<f32>().unwrap().iter().all(|x| x.is_nan()));
        set_canary_mode(false);
        let b = OutBuf::<f32>::uninit(3);
        assert_eq!(
            b.finish(&[3], None).unwrap().to_vec::<f32>().unwrap(),
            vec![0.0; 3]
        );
    }
}
