//! How an op of this crate runs on a kernel device: [`device_of`] says where its inputs live
//! (all on the CPU: the op's CPU body runs; all on one kernel device: its launcher runs), and
//! [`dt`] / [`back`] move between the engine's [`Tensor`] and the launchers' [`DTensor`] without
//! copying (both share the device buffer). Each op keeps its device branch next to its CPU
//! body, in its own file.

use super::{DTensor, KernelDevice};
use anyhow::{bail, ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{Device, Tensor};
use std::sync::Arc;

/// A kernel device that runs an op, with its name.
pub struct OnDevice {
    pub device: Device,
    pub dev: Arc<dyn KernelDevice>,
}

/// `None` when every input is on the CPU; the kernel device when they all are on the same
/// one. Errors for inputs on different devices, and for inputs that need gradients (autograd
/// on kernel devices records no backward nodes yet: run such passes under `no_grad`).
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
    if should_record(inputs) {
        bail!(
            "{op} on {device}: gradients through kernel-device ops are not recorded yet; run \
             this pass under no_grad(), or on the cpu to train"
        );
    }
    Ok(Some(OnDevice {
        device,
        dev: device.kernel()?,
    }))
}

/// The launchers' view of a device tensor: shares the buffer when the tensor is a whole
/// contiguous buffer; a view (transposed, narrowed, broadcast) is first gathered into a new
/// contiguous device buffer — through the host, as there is no strided-copy kernel yet (a
/// synchronising round trip: correct everywhere, slow on a GPU).
pub fn dt(t: &Tensor) -> Result<DTensor> {
    if t.is_contiguous() && t.layout().offset() == 0 {
        return DTensor::from_tensor(t);
    }
    let device = t.device();
    DTensor::from_tensor(&t.to_device(Device::Cpu)?.to_device(device)?)
}

/// [`dt`] of `t` in `dtype`, for kernels that read one element type (f64 noise levels and
/// uniforms): another dtype is converted through the host, like a view (small per-row inputs).
pub fn dt_as(t: &Tensor, dtype: kf_engine::DType) -> Result<DTensor> {
    if t.dtype() == dtype {
        return dt(t);
    }
    let device = t.device();
    DTensor::from_tensor(
        &t.to_device(Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?,
    )
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
