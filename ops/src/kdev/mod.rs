//! Kernel devices for the ops: the device trait itself lives in the engine
//! ([`kf_engine::kernel_device`], re-exported here), so tensors can hold device memory. This
//! module adds a small device tensor [`DTensor`] and (in [`launch`] and [`backward`]) one
//! launcher per kernel op, generic over the device. Two backends implement [`KernelDevice`]:
//! the CPU emulator (`kf_engine::emu::Emu`, which runs the unmodified .cu files and
//! stands in for cuBLAS with the CPU GEMM of [`crate::gemm`]) and, with the `cuda` feature,
//! the CUDA layer of the engine (`kf_engine::cuda::Cuda`: cuBLAS for [`KernelDevice::gemm`]).
//!
//! Buffers are handles: launches write through `&DeviceBuf`, as CUDA kernels write through
//! device pointers. Every method returns `anyhow::Result` with the entry point or operation named.

use anyhow::{ensure, Context, Result};
pub use kf_engine::kernel_device::{DeviceBuf, DeviceMemory, GemmSpec, KArg, KernelDevice};
use kf_engine::storage::{KernelStorage, Storage};
use kf_engine::{DType, Device, Layout, Tensor};
pub use kf_kernels::LaunchConfig;
use std::sync::Arc;

pub mod backward;
pub mod bridge;
pub mod launch;

/// A contiguous row-major tensor on a kernel device: buffer, shape and element type
/// (F32 for activations and weights, U32 for ids / tokens / counts, F64 for noise levels
/// and uniforms).
pub struct DTensor {
    /// Shared with the [`Tensor`] it was made from or into ([`DTensor::from_tensor`],
    /// [`DTensor::into_tensor`]): no copy between the two.
    pub buf: Arc<DeviceBuf>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for DTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DTensor({:?}, {:?})", self.shape, self.dtype)
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl DTensor {
    /// Wraps a buffer; errors when it is smaller than `shape` of `dtype` needs.
    pub fn from_buf<D: KernelDevice + ?Sized>(
        dev: &D,
        buf: DeviceBuf,
        shape: &[usize],
        dtype: DType,
    ) -> Result<DTensor> {
        let need = numel(shape) * dtype.size();
        ensure!(
            dev.buf_bytes(&buf) >= need,
            "DTensor {shape:?} {dtype:?} needs {need} bytes, the buffer has {}",
            dev.buf_bytes(&buf)
        );
        Ok(DTensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }
    /// Zeros of `shape` and `dtype`.
    pub fn zeros<D: KernelDevice + ?Sized>(
        dev: &D,
        shape: &[usize],
        dtype: DType,
    ) -> Result<DTensor> {
        let buf = dev
            .alloc_zeroed(numel(shape) * dtype.size())
            .with_context(|| format!("allocating {shape:?} {dtype:?} on {}", dev.name()))?;
        Ok(DTensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }
    /// Unspecified contents of `shape` and `dtype` (for outputs a kernel writes in full).
    pub fn uninit<D: KernelDevice + ?Sized>(
        dev: &D,
        shape: &[usize],
        dtype: DType,
    ) -> Result<DTensor> {
        let buf = dev
            .alloc(numel(shape) * dtype.size())
            .with_context(|| format!("allocating {shape:?} {dtype:?} on {}", dev.name()))?;
        Ok(DTensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }
    /// A device copy of host values.
    pub fn from_slice<D: KernelDevice + ?Sized, T: kf_engine::Element>(
        dev: &D,
        data: &[T],
        shape: &[usize],
    ) -> Result<DTensor> {
        ensure!(
            data.len() == numel(shape),
            "DTensor::from_slice: {} values for shape {shape:?}",
            data.len()
        );
        let buf = dev
            .upload(bytemuck::cast_slice(data))
            .with_context(|| format!("uploading {shape:?} to {}", dev.name()))?;
        Ok(DTensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype: T::DTYPE,
        })
    }
    /// A device copy of a CPU tensor (any layout; F32, F16, BF16, F64, U32 or I32; kernels
    /// compute in f32, half tensors are weights of [`launch::matmul_into`]).
    pub fn upload<D: KernelDevice + ?Sized>(dev: &D, t: &Tensor) -> Result<DTensor> {
        match t.dtype() {
            DType::F32 => Self::from_slice(dev, &t.to_vec::<f32>()?, t.shape()),
            DType::F16 => Self::from_slice(dev, &t.to_vec::<half::f16>()?, t.shape()),
            DType::BF16 => Self::from_slice(dev, &t.to_vec::<half::bf16>()?, t.shape()),
            DType::F64 => Self::from_slice(dev, &t.to_vec::<f64>()?, t.shape()),
            DType::U32 => Self::from_slice(dev, &t.to_vec::<u32>()?, t.shape()),
            DType::I32 => Self::from_slice(dev, &t.to_vec::<i32>()?, t.shape()),
        }
    }
    /// The values as `T` (which must be this tensor's dtype).
    pub fn to_vec<D: KernelDevice + ?Sized, T: kf_engine::Element>(
        &self,
        dev: &D,
    ) -> Result<Vec<T>> {
        ensure!(
            T::DTYPE == self.dtype,
            "DTensor::to_vec: the tensor is {:?}, asked for {:?}",
            self.dtype,
            T::DTYPE
        );
        let bytes = dev
            .download(&self.buf)
            .with_context(|| format!("downloading {:?} from {}", self.shape, dev.name()))?;
        let n = self.numel();
        let mut out = vec![T::zeroed(); n];
        let want = n * std::mem::size_of::<T>();
        ensure!(
            bytes.len() >= want,
            "download: {} bytes, need {want}",
            bytes.len()
        );
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes[..want]);
        Ok(out)
    }
    /// A CPU tensor of the values (same shape and dtype).
    pub fn download<D: KernelDevice + ?Sized>(&self, dev: &D) -> Result<Tensor> {
        match self.dtype {
            DType::F32 => Tensor::from_vec(self.to_vec::<D, f32>(dev)?, &self.shape, Device::Cpu),
            DType::F16 => {
                Tensor::from_vec(self.to_vec::<D, half::f16>(dev)?, &self.shape, Device::Cpu)
            }
            DType::BF16 => {
                Tensor::from_vec(self.to_vec::<D, half::bf16>(dev)?, &self.shape, Device::Cpu)
            }
            DType::F64 => Tensor::from_vec(self.to_vec::<D, f64>(dev)?, &self.shape, Device::Cpu),
            DType::U32 => Tensor::from_vec(self.to_vec::<D, u32>(dev)?, &self.shape, Device::Cpu),
            DType::I32 => Tensor::from_vec(self.to_vec::<D, i32>(dev)?, &self.shape, Device::Cpu),
        }
    }
    /// The device tensor of a contiguous [`Tensor`] on a kernel device, sharing its memory.
    pub fn from_tensor(t: &Tensor) -> Result<DTensor> {
        let g = t.storage()?;
        let k = g.kernel()?;
        ensure!(
            t.is_contiguous() && t.layout().offset() == 0,
            "a device view of shape {:?} (strides {:?}, offset {}) is not a whole contiguous \
             buffer; the kernel ops take whole buffers",
            t.shape(),
            t.strides(),
            t.layout().offset()
        );
        Ok(DTensor {
            buf: k.buf.clone(),
            shape: t.shape().to_vec(),
            dtype: t.dtype(),
        })
    }
    /// The whole storage of a device tensor as a flat DTensor (any layout): for launches that
    /// read a view through offsets and strides of their own (a GEMM's leading dimensions).
    pub fn storage_of(t: &Tensor) -> Result<DTensor> {
        let g = t.storage()?;
        let k = g.kernel()?;
        Ok(DTensor {
            buf: k.buf.clone(),
            shape: vec![g.len()],
            dtype: t.dtype(),
        })
    }
    /// This device tensor as a [`Tensor`] on `device` (the device that made it), sharing its
    /// memory.
    pub fn into_tensor(self, device: Device) -> Result<Tensor> {
        let n = self.numel();
        let storage = KernelStorage::new(self.buf, device.kernel()?, device, self.dtype, n)?;
        Tensor::from_storage(
            Storage::Kernel(storage),
            Layout::contiguous(&self.shape),
            None,
        )
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// The same values under another shape of as many elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<DTensor> {
        self.set_shape(shape)?;
        Ok(self)
    }
    /// [`Self::reshape`] in place (for a tensor that is borrowed elsewhere).
    pub fn set_shape(&mut self, shape: &[usize]) -> Result<()> {
        ensure!(
            numel(shape) == self.numel(),
            "reshape {:?} -> {shape:?}: element counts differ",
            self.shape
        );
        self.shape = shape.to_vec();
        Ok(())
    }
    /// Errors unless the dtype is `want`.
    pub fn expect_dtype(&self, op: &str, what: &str, want: DType) -> Result<()> {
        ensure!(
            self.dtype == want,
            "{op}: {what} must be {want:?}, got {:?} {:?}",
            self.dtype,
            self.shape
        );
        Ok(())
    }
}
