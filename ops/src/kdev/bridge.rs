//! How an op of this crate runs on a kernel device: [`device_of`] says where its inputs live
//! (all on the CPU: the op's CPU body runs; all on one kernel device: its launcher runs), and
//! [`dt`] / [`back`] move between the engine's [`Tensor`] and the launchers' [`DTensor`] without
//! copying (both share the device buffer). Each op keeps its device branch next to its CPU
//! body, in its own file.

use super::{DTensor, DeviceBuf, KernelDevice};
use anyhow::{ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, Device, Tensor};
use std::sync::Arc;

/// A kernel device that runs an op, with its name.
#[derive(Clone)]
pub struct OnDevice {
    pub device: Device,
    pub dev: Arc<dyn KernelDevice>,
}

/// `None` when every input is on the CPU; the kernel device when they all are on the same
/// one. Errors for inputs on different devices. The op records the same backward node on
/// either; its backward asks `device_of` again and runs the device's backward kernels.
pub fn device_of(op: &str, inputs: &[&Tensor]) -> Result<Option<OnDevice>> {
    let Some(first) = inputs.first() else {
        return Ok(None);
    };
    let device = first.device();
    for t in inputs {
        ensure!(
            t.device() == device,
            "{op}: inputs on different devices ({device} and {}); move them with to_device",
            t.device()
        );
    }
    if device.is_cpu() {
        return Ok(None);
    }
    Ok(Some(OnDevice {
        device,
        dev: device.kernel()?,
    }))
}

/// The launchers' view of a device tensor: shares the buffer when the tensor is a whole
/// contiguous buffer; a view (transposed, narrowed, broadcast) is first gathered into a new
/// contiguous buffer on the device (one `strided_copy` launch, kernels/copy.cu).
pub fn dt(t: &Tensor) -> Result<DTensor> {
    DTensor::from_tensor(&t.whole_buffer()?)
}

/// [`dt`] of `t` in `dtype`, for kernels that read one element type (f64 noise levels and
/// uniforms): another dtype is cast on the device (`Tensor::to_dtype`).
pub fn dt_as(t: &Tensor, dtype: kf_engine::DType) -> Result<DTensor> {
    dt(&t.to_dtype(dtype)?)
}

/// A `[B, T, H, D]` device tensor as the attention kernels read it: its buffer and the
/// strides of B, T and H, without a copy when it is a view from the buffer's start with
/// unit-stride rows (the rows `0..len` of a KV cache); otherwise gathered like [`dt`].
pub fn attn_operand(t: &Tensor) -> Result<(Arc<DeviceBuf>, [usize; 3])> {
    ensure!(
        t.rank() == 4,
        "attention: operand must be [B, T, H, D], got {:?}",
        t.shape()
    );
    let t = if t.layout().offset() == 0 && (t.shape()[3] <= 1 || t.strides()[3] == 1) {
        t.clone()
    } else {
        t.whole_buffer()?
    };
    let st = t.strides();
    let buf = t.storage()?.kernel()?.buf.clone();
    Ok((buf, [st[0], st[1], st[2]]))
}

/// The launchers' view of a device tensor a kernel updates in place (optimiser state, penalty
/// counts): it must be a whole contiguous buffer, as a gathered copy would drop the update.
pub fn dt_in_place(t: &Tensor) -> Result<DTensor> {
    DTensor::from_tensor(t)
}

/// A launcher's result as a tensor on `on.device` (shares the buffer).
pub fn back(on: &OnDevice, d: DTensor) -> Result<Tensor> {
    d.into_tensor(on.device)
}

/// [`back`] with the op's backward node when its inputs are recorded.
pub fn back_recorded(
    on: &OnDevice,
    d: DTensor,
    inputs: &[&Tensor],
    node: impl FnOnce() -> Arc<dyn BackwardOp>,
) -> Result<Tensor> {
    let t = back(on, d)?;
    Ok(if should_record(inputs) {
        t.rewrap(Some(node()))
    } else {
        t
    })
}

/// A `[.., R, C]` device tensor as a GEMM reads it: its storage, whether it is stored
/// transposed (`[C, R]` rows), the leading dimension, the stride between batch matrices and
/// the element offset of the first. Transposed and row-narrowed views need no copy (the
/// backward's `Aᵀ · G` reads A in place); a layout the GEMM cannot express is gathered first.
pub struct GemmOperand {
    pub t: DTensor,
    pub trans: bool,
    pub ld: usize,
    pub stride: usize,
    pub off: usize,
}

pub fn gemm_operand(t: &Tensor) -> Result<GemmOperand> {
    if let Some(o) = strided_operand(t)? {
        return Ok(o);
    }
    let w = t.whole_buffer()?;
    Ok(strided_operand(&w)?.expect("a whole contiguous buffer is a GEMM operand"))
}

fn strided_operand(t: &Tensor) -> Result<Option<GemmOperand>> {
    let (sh, st) = (t.shape(), t.strides());
    let r = t.rank();
    ensure!(r >= 2, "gemm operand must have rank >= 2, got {sh:?}");
    let (rows, cols) = (sh[r - 2], sh[r - 1]);
    let (sr, sc) = (st[r - 2], st[r - 1]);
    // row-major (unit column stride) or stored transposed (unit row stride)
    let (trans, ld) = if (sc == 1 || cols <= 1) && sr >= cols.max(1) {
        (false, sr.max(cols).max(1))
    } else if (sr == 1 || rows <= 1) && sc >= rows.max(1) {
        (true, sc.max(rows).max(1))
    } else {
        return Ok(None);
    };
    // the batch dims must fold into one stride
    let mut stride = 0;
    if r > 2 {
        stride = st[r - 3];
        for i in (0..r - 3).rev() {
            if sh[i] > 1 && st[i] != st[i + 1] * sh[i + 1] {
                return Ok(None);
            }
        }
        if sh[..r - 2].iter().product::<usize>() <= 1 {
            stride = 0;
        }
    }
    Ok(Some(GemmOperand {
        t: DTensor::storage_of(t)?,
        trans,
        ld,
        stride,
        off: t.layout().offset(),
    }))
}
