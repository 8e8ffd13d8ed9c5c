//! Kernel devices for the ops: the device trait itself lives in the engine
//! ([`kf_engine::kernel_device`], re-exported here), so tensors can hold device memory. This
//! module adds a small device tensor [`DTensor`], the checks every launcher shares, and
//! [`launch`], which gathers the launchers: one per kernel op, forward and backward, each
//! written in its op family's file beside the CPU body and the backward rule
//! (`crate::<family>::launch`). Two backends implement [`KernelDevice`]: the CPU emulator
//! (`kf_engine::emu::Emu`, which runs the unmodified .cu files and stands in for cuBLAS with the
//! CPU GEMM of [`crate::gemm`]) and, with the `cuda` feature, the CUDA layer of the engine
//! (`kf_engine::cuda::Cuda`: cuBLAS for [`KernelDevice::gemm`]).
//!
//! A launcher checks shapes and dtypes and returns an error naming the op before anything is
//! launched, allocates its outputs, and launches with the launch shapes of `kf_kernels`.
//! Values the CPU op would reject only after reading the data (ids >= V, fully masked rows,
//! NaN logits) are handled as the kernels do: NaN rows, an error from the softmax's bad-row
//! flag, token sentinels turned into errors by `launch::tokens_to_host`.
//! Buffers are handles: launches write through `&DeviceBuf`, as CUDA kernels write through
//! device pointers. Every method returns `anyhow::Result` with the entry point or operation named.
//! Letters: n elements, R rows, D features, C columns, V vocabulary, B batch, T rows of a
//! sequence, H heads, Dh head dim.

use anyhow::{ensure, Context, Result};
pub use kf_engine::kernel_device::{DeviceBuf, DeviceMemory, GemmSpec, KArg, KernelDevice};
use kf_engine::storage::{KernelStorage, Storage};
use kf_engine::{DType, Device, Layout, Tensor};
pub use kf_kernels::LaunchConfig;
use std::sync::Arc;

pub mod bridge;

/// Every launcher by name. Each lives beside its op's CPU body and backward rule, in the op
/// family's file (`crate::<family>::launch`); this module gathers them for callers outside
/// the family (tests, benchmarks, the fused ops).
pub mod launch {
    pub use crate::adamw::launch::*;
    pub use crate::argmax::launch::*;
    pub use crate::attention::launch::*;
    pub use crate::cross_entropy::launch::*;
    pub use crate::elementwise::launch::*;
    pub use crate::embedding::launch::*;
    pub use crate::gelu::launch::*;
    pub use crate::layernorm::launch::*;
    pub use crate::matmul::launch::*;
    pub use crate::noise::launch::*;
    pub use crate::reduce::launch::*;
    pub use crate::rope::launch::*;
    pub use crate::sampling::launch::*;
    pub use crate::softmax::launch::*;
}

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

pub(crate) type Out = Result<DTensor>;

/// Launches `entry`, naming it (and the op) in the error.
pub(crate) fn run<D: KernelDevice + ?Sized>(
    dev: &D,
    entry: &str,
    cfg: kf_kernels::LaunchConfig,
    args: &[KArg<'_>],
) -> Result<()> {
    dev.launch(entry, cfg, args)
        .with_context(|| format!("launching {entry} on {} ({cfg:?})", dev.name()))
}

pub(crate) fn f32_in(op: &str, what: &str, t: &DTensor) -> Result<()> {
    t.expect_dtype(op, what, DType::F32)
}

/// A weight matrix: f32, or f16 / bf16 storage (see [`matmul_into`]).
pub(crate) fn weight_in(op: &str, w: &DTensor) -> Result<()> {
    ensure!(
        matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16),
        "{op}: weight is {}, expected f32, f16 or bf16",
        w.dtype()
    );
    Ok(())
}

/// (rows, last dim) of a tensor of rank >= 1.
pub(crate) fn rows_cols(op: &str, t: &DTensor) -> Result<(usize, usize)> {
    ensure!(
        t.rank() >= 1,
        "{op}: input must have at least one dimension"
    );
    let c = *t.shape().last().unwrap();
    Ok((t.numel() / c.max(1), c))
}

pub(crate) fn same_shape(op: &str, a: &DTensor, b: &DTensor) -> Result<()> {
    ensure!(
        a.shape() == b.shape(),
        "{op}: shapes {:?} and {:?} differ",
        a.shape(),
        b.shape()
    );
    Ok(())
}

pub(crate) fn u32_fits(op: &str, vals: &[usize]) -> Result<()> {
    ensure!(
        vals.iter().all(|&v| v <= u32::MAX as usize),
        "{op}: sizes {vals:?} past u32"
    );
    Ok(())
}

/// A kernel `entry(a, b, out, n)` over two f32 tensors of the same shape (the elementwise
/// binary ops, and the GELU backward), launched over `cfg`; errors name `op`.
pub(crate) fn same_shape_binary<D: KernelDevice + ?Sized>(
    dev: &D,
    op: &str,
    entry: &str,
    cfg: kf_kernels::LaunchConfig,
    a: &DTensor,
    b: &DTensor,
) -> Out {
    f32_in(op, "a", a)?;
    f32_in(op, "b", b)?;
    same_shape(op, a, b).context("the kernel does not broadcast")?;
    let n = a.numel();
    let out = DTensor::uninit(dev, a.shape(), DType::F32)?;
    run(
        dev,
        entry,
        cfg,
        &[
            KArg::Buf(&a.buf),
            KArg::Buf(&b.buf),
            KArg::Buf(&out.buf),
            KArg::U64(n as u64),
        ],
    )?;
    Ok(out)
}

/// Elements a strided `[B, T, H, D]` view (strides over B, T, H in elements, D unit-stride)
/// spans from its first element; 0 when empty.
pub(crate) fn view_span(dims: [usize; 4], strides: [usize; 3]) -> usize {
    if dims.contains(&0) {
        return 0;
    }
    (dims[0] - 1) * strides[0] + (dims[1] - 1) * strides[1] + (dims[2] - 1) * strides[2] + dims[3]
}
