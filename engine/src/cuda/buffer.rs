//! A typed device buffer: `len` elements of `T` in one block of the device's
//! caching allocator, returned to that allocator on drop. Letters: n elements.

use super::context::CudaDevice;
use crate::Element;
use std::marker::PhantomData;
use std::sync::Arc;

/// Element types a device buffer holds: the tensor element types (f16, bf16,
/// f32, f64, u32, i32), all plain bytes (`bytemuck::Pod`).
pub trait DeviceElem: Element {}
impl<T: Element> DeviceElem for T {}

/// `len` elements of `T` on one device. Not `Clone`: copies are explicit
/// (`CudaDevice::dtod`).
pub struct CudaBuffer<T: DeviceElem> {
    pub(super) dev: Arc<CudaDevice>,
    /// Device address; 0 for an empty buffer.
    pub(super) ptr: u64,
    pub(super) len: usize,
    /// The allocator's size class of the block (0: empty, nothing to release).
    pub(super) class: usize,
    pub(super) _t: PhantomData<T>,
}

impl<T: DeviceElem> CudaBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address, for kernel arguments and cuBLAS.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}

impl<T: DeviceElem> Drop for CudaBuffer<T> {
    fn drop(&mut self) {
        if self.class > 0 {
            self.dev.release_block(self.ptr, self.class);
        }
    }
}

impl<T: DeviceElem> std::fmt::Debug for CudaBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuffer<{}>[{}] on cuda:{} at {:#x}",
            T::DTYPE,
            self.len,
            self.dev.ordinal(),
            self.ptr
        )
    }
}
