//! `Tensor`: shared storage + layout (shape, strides, offset) + dtype + device,
//! plus the autograd node that produced it. Views (reshape of contiguous data,
//! transpose, permute, narrow, broadcast) share storage; `contiguous()` copies
//! only when the layout needs it. The backward rules of these views live here.

use crate::autograd::{self, BackwardOp, GradStore};
use crate::dtype::{DType, Element};
use crate::layout::{checked_numel, Layout};
use crate::storage::{Buf, CpuStorage, KernelStorage, Storage};
use crate::Device;
use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Unique id of a tensor (views get their own id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

struct Inner {
    id: TensorId,
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    dtype: DType,
    device: Device,
    node: Option<Arc<dyn BackwardOp>>,
    is_var: bool,
}

/// A cheaply clonable handle to a tensor.
#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}, {}{}]",
            self.shape(),
            self.dtype(),
            self.device(),
            if self.tracks_grad() { ", grad" } else { "" }
        )
    }
}

/// Read access to the contiguous CPU data of a tensor.
pub struct CpuRef<'a, T> {
    guard: RwLockReadGuard<'a, Storage>,
    start: usize,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element> std::ops::Deref for CpuRef<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let Storage::Cpu(s) = &*self.guard else {
            unreachable!("a CpuRef is made for CPU storage only")
        };
        let buf = T::buf(s).expect("dtype checked when the CpuRef was made");
        &buf.as_slice()[self.start..self.start + self.len]
    }
}

fn poisoned<T>(_: T) -> anyhow::Error {
    anyhow::anyhow!("tensor storage lock poisoned by an earlier panic")
}

/// A contiguous tensor of `shape` on a kernel device holding `bytes` (host to device).
fn upload_bytes(bytes: &[u8], dtype: DType, shape: &[usize], device: Device) -> Result<Tensor> {
    let dev = device.kernel()?;
    let n = checked_numel(shape)?;
    let buf = dev
        .upload(bytes)
        .with_context(|| format!("uploading {shape:?} {dtype} to {device}"))?;
    let storage = KernelStorage::new(buf, dev, device, dtype, n)?;
    Tensor::from_storage(Storage::Kernel(storage), Layout::contiguous(shape), None)
}

impl Tensor {
    // ---------------------------------------------------------------- creation

    /// A tensor over `storage` with a given layout and an optional backward node.
    pub fn from_storage(
        storage: Storage,
        layout: Layout,
        node: Option<Arc<dyn BackwardOp>>,
    ) -> Result<Tensor> {
        ensure!(
            layout.storage_extent() <= storage.len(),
            "layout {:?} exceeds storage of {} elements",
            layout,
            storage.len()
        );
        let dtype = storage.dtype();
        let device = storage.device();
        Ok(Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: Arc::new(RwLock::new(storage)),
            layout,
            dtype,
            device,
            node,
            is_var: false,
        })))
    }

    /// The usual way an op returns its result: contiguous CPU data + node.
    pub fn from_cpu_op<T: Element>(
        data: Vec<T>,
        shape: &[usize],
        node: Option<Arc<dyn BackwardOp>>,
    ) -> Result<Tensor> {
        let n = checked_numel(shape)?;
        ensure!(
            data.len() == n,
            "{} elements do not fill shape {shape:?} ({n} elements)",
            data.len()
        );
        Tensor::from_storage(Storage::Cpu(T::wrap(data)), Layout::contiguous(shape), node)
    }

    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize], device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Tensor::from_cpu_op(data, shape, None),
            Device::Emu | Device::Cuda(_) => {
                ensure!(
                    data.len() == checked_numel(shape)?,
                    "{} elements do not fill shape {shape:?}",
                    data.len()
                );
                upload_bytes(bytemuck::cast_slice(&data), T::DTYPE, shape, device)
            }
        }
    }

    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    pub fn scalar<T: Element>(v: T, device: Device) -> Result<Tensor> {
        Tensor::from_vec(vec![v], &[], device)
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n = checked_numel(shape)?;
        match device {
            Device::Cpu => Tensor::from_storage(
                Storage::Cpu(CpuStorage::zeros(dtype, n)),
                Layout::contiguous(shape),
                None,
            ),
            Device::Emu | Device::Cuda(_) => {
                let dev = device.kernel()?;
                let bytes = n
                    .checked_mul(dtype.size())
                    .context("tensor size overflows")?;
                let buf = dev
                    .alloc_zeroed(bytes)
                    .with_context(|| format!("allocating {shape:?} {dtype} on {device}"))?;
                let storage = KernelStorage::new(buf, dev, device, dtype, n)?;
                Tensor::from_storage(Storage::Kernel(storage), Layout::contiguous(shape), None)
            }
        }
    }

    pub fn full(shape: &[usize], value: f64, dtype: DType, device: Device) -> Result<Tensor> {
        let n = checked_numel(shape)?;
        let storage = match dtype {
            DType::F16 => f16::wrap(vec![f16::from_f64(value); n]),
            DType::BF16 => bf16::wrap(vec![bf16::from_f64(value); n]),
            DType::F32 => f32::wrap(vec![value as f32; n]),
            DType::F64 => f64::wrap(vec![value; n]),
            DType::U32 => u32::wrap(vec![value as u32; n]),
            DType::I32 => i32::wrap(vec![value as i32; n]),
        };
        Tensor::from_storage(Storage::Cpu(storage), Layout::contiguous(shape), None)?
            .to_device(device)
    }

    pub fn ones(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(shape, 1.0, dtype, device)
    }

    /// Uniform values in (0, 1) from Philox element indices `0..numel` of
    /// `(seed, stream)`, cast to a float `dtype`.
    pub fn rand_uniform(
        shape: &[usize],
        dtype: DType,
        seed: u64,
        stream: u64,
        device: Device,
    ) -> Result<Tensor> {
        let n = checked_numel(shape)?;
        let mut v = vec![0f64; n];
        crate::rng::Philox::new(seed, stream).fill_uniform_f64(0, &mut v);
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }

    /// Standard normal values from Philox `(seed, stream)`, cast to `dtype`.
    pub fn rand_normal(
        shape: &[usize],
        dtype: DType,
        seed: u64,
        stream: u64,
        device: Device,
    ) -> Result<Tensor> {
        let n = checked_numel(shape)?;
        let mut v = vec![0f64; n];
        crate::rng::Philox::new(seed, stream).fill_normal_f64(0, &mut v);
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }

    // --------------------------------------------------------------- accessors

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        self.0.layout.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.shape()
    }
    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn device(&self) -> Device {
        self.0.device
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn strides(&self) -> &[usize] {
        self.0.layout.strides()
    }
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }
    /// Size of dimension `d`, with a clear error when out of range.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape()
            .get(d)
            .copied()
            .with_context(|| format!("dimension {d} out of range for shape {:?}", self.shape()))
    }
    /// True if both handles share one storage buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }
    /// True if the storage is a zero-copy window into a memory-mapped file.
    pub fn is_mapped(&self) -> Result<bool> {
        let g = self.0.storage.read().map_err(poisoned)?;
        Ok(match &*g {
            Storage::Cpu(s) => s.is_mapped(),
            Storage::Kernel(_) => false,
        })
    }

    pub fn storage(&self) -> Result<RwLockReadGuard<'_, Storage>> {
        self.0.storage.read().map_err(poisoned)
    }

    /// Write access to the storage (in-place optimiser updates). The caller
    /// must not hold another guard on the same storage.
    pub fn storage_mut(&self) -> Result<RwLockWriteGuard<'_, Storage>> {
        self.0.storage.write().map_err(poisoned)
    }

    fn check_dtype<T: Element>(&self, what: &str) -> Result<()> {
        ensure!(
            self.dtype() == T::DTYPE,
            "{what}: tensor has dtype {} but {} was requested",
            self.dtype(),
            T::DTYPE
        );
        Ok(())
    }

    /// The contiguous CPU data of this tensor (errors when the layout is not
    /// contiguous or the dtype differs: call `contiguous()` first).
    pub fn cpu_data<T: Element>(&self) -> Result<CpuRef<'_, T>> {
        self.check_dtype::<T>("cpu_data")?;
        ensure!(
            self.is_contiguous(),
            "cpu_data: tensor of shape {:?} with strides {:?} is not contiguous",
            self.shape(),
            self.strides()
        );
        let guard = self.storage()?;
        guard.cpu().context("cpu_data")?;
        Ok(CpuRef {
            guard,
            start: self.0.layout.offset(),
            len: self.numel(),
            _t: std::marker::PhantomData,
        })
    }

    /// Mutate the contiguous CPU data in place (optimiser steps). The tensor
    /// must not be a view into a larger buffer that others read as different data.
    pub fn with_cpu_data_mut<T: Element, R>(&self, f: impl FnOnce(&mut [T]) -> R) -> Result<R> {
        self.check_dtype::<T>("with_cpu_data_mut")?;
        ensure!(
            self.is_contiguous(),
            "with_cpu_data_mut: tensor of shape {:?} is not contiguous",
            self.shape()
        );
        let (start, len) = (self.0.layout.offset(), self.numel());
        let mut g = self.storage_mut()?;
        let s = g.cpu_mut().context("with_cpu_data_mut")?;
        let buf: &mut Buf<T> = T::buf_mut(s).context("dtype checked above")?;
        Ok(f(&mut buf.as_mut_slice()[start..start + len]))
    }

    /// Copy out all elements in logical (row-major) order.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.check_dtype::<T>("to_vec")?;
        if !self.device().is_cpu() {
            return self.to_device(Device::Cpu)?.to_vec::<T>();
        }
        let g = self.storage()?;
        let s = g.cpu()?;
        let data = T::buf(s).context("dtype checked above")?.as_slice();
        let mut out = Vec::with_capacity(self.numel());
        self.0.layout.for_each_index(|i| out.push(data[i]));
        Ok(out)
    }

    /// All elements as f64 in logical order, whatever the dtype.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        fn go<T: Element>(t: &Tensor) -> Result<Vec<f64>> {
            Ok(t.to_vec::<T>()?.into_iter().map(|x| x.to_f64()).collect())
        }
        match self.dtype() {
            DType::F16 => go::<f16>(self),
            DType::BF16 => go::<bf16>(self),
            DType::F32 => go::<f32>(self),
            DType::F64 => go::<f64>(self),
            DType::U32 => go::<u32>(self),
            DType::I32 => go::<i32>(self),
        }
    }

    /// The single element of a one-element tensor, as f64.
    pub fn to_scalar_f64(&self) -> Result<f64> {
        ensure!(
            self.numel() == 1,
            "to_scalar: tensor of shape {:?} has {} elements",
            self.shape(),
            self.numel()
        );
        Ok(self.to_vec_f64()?[0])
    }

    // ---------------------------------------------------------------- autograd

    /// A leaf variable that requires grad, sharing this tensor's storage.
    pub fn var(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: self.0.storage.clone(),
            layout: self.0.layout.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            node: None,
            is_var: true,
        }))
    }

    /// The same data, cut from the tape.
    pub fn detach(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: self.0.storage.clone(),
            layout: self.0.layout.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            node: None,
            is_var: false,
        }))
    }

    pub fn is_var(&self) -> bool {
        self.0.is_var
    }

    /// Whether this handle is the only one on its storage: no clone, view, `var` or `detach`
    /// shares it, so writing into it changes nothing another tensor can see (an op may then
    /// write its result into this buffer instead of a copy).
    pub fn is_sole_owner(&self) -> bool {
        Arc::strong_count(&self.0) == 1 && Arc::strong_count(&self.0.storage) == 1
    }

    /// The same storage and layout under a new id, with `node` as its backward node: for ops
    /// that wrote their result into the buffer of an input they solely own
    /// ([`Tensor::is_sole_owner`]).
    pub fn rewrap(&self, node: Option<Arc<dyn BackwardOp>>) -> Tensor {
        self.view(self.0.layout.clone(), node)
    }
    /// True for variables and for results of recorded ops.
    pub fn tracks_grad(&self) -> bool {
        self.0.is_var || self.0.node.is_some()
    }
    pub fn grad_node(&self) -> Option<&Arc<dyn BackwardOp>> {
        self.0.node.as_ref()
    }

    /// Reverse-mode gradients of this tensor's elements summed (seed = ones).
    pub fn backward(&self) -> Result<GradStore> {
        autograd::backward(self, None)
    }

    /// Reverse-mode gradients with an explicit seed gradient.
    pub fn backward_with(&self, seed: Tensor) -> Result<GradStore> {
        autograd::backward(self, Some(seed))
    }

    // ------------------------------------------------------------------- views

    fn view(&self, layout: Layout, node: Option<Arc<dyn BackwardOp>>) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: self.0.storage.clone(),
            layout,
            dtype: self.0.dtype,
            device: self.0.device,
            node,
            is_var: false,
        }))
    }

    fn view_node(&self, kind: ViewKind) -> Option<Arc<dyn BackwardOp>> {
        if autograd::should_record(&[self]) {
            Some(Arc::new(ViewBackward {
                input: self.clone(),
                kind,
            }))
        } else {
            None
        }
    }

    /// Same data, new shape; copies first when the layout is not contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n = checked_numel(shape)?;
        ensure!(
            n == self.numel(),
            "reshape: cannot reshape {:?} ({} elements) to {shape:?} ({n} elements)",
            self.shape(),
            self.numel()
        );
        let src = self.contiguous()?;
        let layout = Layout::new(
            shape.to_vec(),
            crate::layout::contiguous_strides(shape),
            src.layout().offset(),
        )?;
        let node = src.view_node(ViewKind::Reshape(src.shape().to_vec()));
        Ok(src.view(layout, node))
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        let layout = self.0.layout.transpose(d0, d1)?;
        Ok(self.view(layout, self.view_node(ViewKind::Transpose(d0, d1))))
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let layout = self.0.layout.permute(perm)?;
        Ok(self.view(layout, self.view_node(ViewKind::Permute(perm.to_vec()))))
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let layout = self.0.layout.narrow(dim, start, len)?;
        Ok(self.view(layout, self.view_node(ViewKind::Narrow(dim, start))))
    }

    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        let layout = self.0.layout.broadcast_as(shape)?;
        Ok(self.view(layout, self.view_node(ViewKind::Broadcast)))
    }

    /// Insert a size-1 dimension at `dim` (a view, never a copy).
    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        ensure!(
            dim <= self.rank(),
            "unsqueeze: dimension {dim} out of range for shape {:?}",
            self.shape()
        );
        let mut shape = self.shape().to_vec();
        let mut strides = self.strides().to_vec();
        shape.insert(dim, 1);
        strides.insert(dim, 0);
        let layout = Layout::new(shape, strides, self.0.layout.offset())?;
        Ok(self.view(
            layout,
            self.view_node(ViewKind::Reshape(self.shape().to_vec())),
        ))
    }

    /// Remove the size-1 dimension `dim` (a view, never a copy).
    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        ensure!(
            self.shape().get(dim) == Some(&1),
            "squeeze: dimension {dim} of shape {:?} is not of size 1",
            self.shape()
        );
        let mut shape = self.shape().to_vec();
        let mut strides = self.strides().to_vec();
        shape.remove(dim);
        strides.remove(dim);
        let layout = Layout::new(shape, strides, self.0.layout.offset())?;
        Ok(self.view(
            layout,
            self.view_node(ViewKind::Reshape(self.shape().to_vec())),
        ))
    }

    /// The same values on `device` (self when already there): the explicit move between the
    /// CPU and a kernel device (contiguous on arrival; not recorded by autograd).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        if !self.device().is_cpu() {
            // device -> host: the whole buffer, then this tensor's window of it
            let bytes = {
                let g = self.storage()?;
                let k = g.kernel()?;
                k.dev
                    .download(&k.buf)
                    .with_context(|| format!("downloading {:?} from {}", self.shape(), k.device))?
            };
            let host = Tensor::from_storage(
                Storage::Cpu(CpuStorage::from_bytes(self.dtype(), &bytes)),
                self.0.layout.clone(),
                None,
            )?
            .contiguous()?;
            return host.to_device(device);
        }
        let c = self.contiguous()?;
        let g = c.storage()?;
        let bytes = g.cpu()?.as_bytes();
        let esize = self.dtype().size();
        let start = c.0.layout.offset() * esize;
        upload_bytes(
            &bytes[start..start + c.numel() * esize],
            self.dtype(),
            self.shape(),
            device,
        )
    }

    /// A contiguous tensor with the same values (self when already contiguous).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let storage = {
            let g = self.storage()?;
            match &*g {
                Storage::Cpu(s) => Storage::Cpu(gather(s, &self.0.layout)),
                Storage::Kernel(k) => {
                    let out = k.alloc_like(self.numel())?;
                    copy_on_device(k, &self.0.layout, &out, &Layout::contiguous(self.shape()))
                        .context("contiguous")?;
                    Storage::Kernel(out)
                }
            }
        };
        let node = self.view_node(ViewKind::Copy);
        Tensor::from_storage(storage, Layout::contiguous(self.shape()), node)
    }

    /// This tensor as the whole of a contiguous buffer from its first element (what a
    /// kernel takes): itself when it already is, else a copy (not recorded by autograd).
    pub fn whole_buffer(&self) -> Result<Tensor> {
        if self.is_contiguous() && self.0.layout.offset() == 0 {
            return Ok(self.clone());
        }
        let c = self.contiguous()?;
        if c.0.layout.offset() == 0 {
            return Ok(c.rewrap(None));
        }
        let out = Tensor::zeros(self.shape(), self.dtype(), self.device())?;
        out.copy_from(&c)?;
        Ok(out)
    }

    /// Convert to another dtype (differentiable between float dtypes).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if !self.device().is_cpu() {
            let (from, to) = (self.dtype().to_string(), dtype.to_string());
            if let Some(entry) = kf_kernels::copy::cast_entry(&from, &to) {
                return self.cast_on_device(entry, dtype);
            }
        }
        let v = self.to_vec_f64()?;
        let storage = match dtype {
            DType::F16 => f16::wrap(v.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::BF16 => bf16::wrap(v.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::F32 => f32::wrap(v.iter().map(|&x| x as f32).collect()),
            DType::F64 => f64::wrap(v),
            DType::U32 => {
                ensure!(
                    v.iter()
                        .all(|&x| x >= 0.0 && x <= u32::MAX as f64 && x.fract() == 0.0),
                    "to_dtype: values of a {} tensor do not all fit u32 exactly",
                    self.dtype()
                );
                u32::wrap(v.iter().map(|&x| x as u32).collect())
            }
            DType::I32 => {
                ensure!(
                    v.iter()
                        .all(|&x| x >= i32::MIN as f64 && x <= i32::MAX as f64 && x.fract() == 0.0),
                    "to_dtype: values of a {} tensor do not all fit i32 exactly",
                    self.dtype()
                );
                i32::wrap(v.iter().map(|&x| x as i32).collect())
            }
        };
        let node = if self.dtype().is_float() && dtype.is_float() {
            self.view_node(ViewKind::Cast(self.dtype()))
        } else {
            None
        };
        let out = Tensor::from_storage(
            Storage::Cpu(storage),
            Layout::contiguous(self.shape()),
            node,
        )?;
        // a device tensor without a cast kernel for this pair (integers, f64 <-> 16-bit) is
        // converted through the host and goes back
        if self.device().is_cpu() {
            Ok(out)
        } else {
            let _g = autograd::no_grad();
            Ok(out
                .to_device(self.device())?
                .rewrap(out.grad_node().cloned()))
        }
    }

    /// [`Tensor::to_dtype`] on a kernel device with copy.cu's `entry` (`cast_<from>_<to>`):
    /// rounds as the host conversion does, so either gives the same bits.
    fn cast_on_device(&self, entry: &str, dtype: DType) -> Result<Tensor> {
        let c = {
            let _g = autograd::no_grad();
            self.contiguous()?
        };
        let n = c.numel();
        let g = c.storage()?;
        let k = g.kernel()?;
        let out = k.alloc_of(n, dtype)?;
        if n > 0 {
            use crate::kernel_device::KArg;
            k.dev
                .launch(
                    entry,
                    kf_kernels::copy::config(n),
                    &[
                        KArg::Buf(&k.buf),
                        KArg::U64(c.layout().offset() as u64),
                        KArg::Buf(&out.buf),
                        KArg::U64(n as u64),
                    ],
                )
                .with_context(|| format!("{entry} on {}", self.device()))?;
        }
        let node = self.view_node(ViewKind::Cast(self.dtype()));
        Tensor::from_storage(Storage::Kernel(out), Layout::contiguous(self.shape()), node)
    }

    /// Elementwise sum of two tensors of equal shape and dtype (not recorded;
    /// used to accumulate gradients).
    pub fn add_same_shape(&self, other: &Tensor) -> Result<Tensor> {
        ensure!(
            self.shape() == other.shape() && self.dtype() == other.dtype(),
            "add: {:?} {} and {:?} {} differ",
            self.shape(),
            self.dtype(),
            other.shape(),
            other.dtype()
        );
        ensure!(
            self.device() == other.device(),
            "add: tensors on {} and {}",
            self.device(),
            other.device()
        );
        if !self.device().is_cpu() {
            return add_on_device(self, other);
        }
        fn go<T: Element>(a: &Tensor, b: &Tensor, f: impl Fn(T, T) -> T + Sync) -> Result<Tensor> {
            let (a, b) = (a.contiguous()?, b.contiguous()?);
            let (x, y) = (a.cpu_data::<T>()?, b.cpu_data::<T>()?);
            let v: Vec<T> = x.iter().zip(y.iter()).map(|(&p, &q)| f(p, q)).collect();
            Tensor::from_cpu_op(v, a.shape(), None)
        }
        match self.dtype() {
            DType::F16 => go::<f16>(self, other, |p, q| p + q),
            DType::BF16 => go::<bf16>(self, other, |p, q| p + q),
            DType::F32 => go::<f32>(self, other, |p, q| p + q),
            DType::F64 => go::<f64>(self, other, |p, q| p + q),
            DType::U32 => go::<u32>(self, other, |p, q| p.wrapping_add(q)),
            DType::I32 => go::<i32>(self, other, |p, q| p.wrapping_add(q)),
        }
    }

    /// Sum a broadcast gradient back to `shape` (reverse of `broadcast_as`).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        // check broadcast compatibility: shape -> self.shape()
        Layout::contiguous(shape)
            .broadcast_as(self.shape())
            .with_context(|| format!("sum_to_shape: {:?} -> {shape:?}", self.shape()))?;
        let src = self.to_vec_f64()?;
        let n = checked_numel(shape)?;
        let mut acc = vec![0f64; n];
        let bl = Layout::contiguous(shape).broadcast_as(self.shape())?;
        let mut k = 0;
        bl.for_each_index(|i| {
            acc[i] += src[k];
            k += 1;
        });
        Tensor::from_vec(acc, shape, self.device())?.to_dtype(self.dtype())
    }

    /// Zeros of `shape` with `self` written into the window `start..start+len`
    /// of dimension `dim` (reverse of `narrow`).
    pub fn pad_narrow(&self, shape: &[usize], dim: usize, start: usize) -> Result<Tensor> {
        let out = Tensor::zeros(shape, self.dtype(), self.device())?;
        let window = out.layout().narrow(dim, start, self.dim(dim)?)?;
        ensure!(
            window.shape() == self.shape(),
            "pad_narrow: {:?} does not fit window {:?}",
            self.shape(),
            window.shape()
        );
        copy_layout(self, &out, &window).context("pad_narrow")?;
        Ok(out)
    }

    /// Writes `src`'s values into this tensor's elements in place (`self` is typically a
    /// view of a larger buffer: the rows of a KV cache, a window of a concatenation): same
    /// shape, dtype and device, different storage. Not recorded by autograd.
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        ensure!(
            self.shape() == src.shape() && self.dtype() == src.dtype(),
            "copy_from: source {:?} {} does not fit destination {:?} {}",
            src.shape(),
            src.dtype(),
            self.shape(),
            self.dtype()
        );
        ensure!(
            self.device() == src.device(),
            "copy_from: source on {} and destination on {} (move it with to_device first)",
            src.device(),
            self.device()
        );
        ensure!(
            !self.same_storage(src),
            "copy_from: source and destination share storage"
        );
        copy_layout(src, self, self.layout())
    }
}

/// [`Tensor::add_same_shape`] on a kernel device: the `add_f32` kernel (gradients are f32
/// there); other dtypes go through the host.
fn add_on_device(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let device = a.device();
    if a.dtype() != DType::F32 {
        let host = a
            .to_device(Device::Cpu)?
            .add_same_shape(&b.to_device(Device::Cpu)?)?;
        return host.to_device(device);
    }
    let (a, b) = (a.whole_buffer()?, b.whole_buffer()?);
    let n = a.numel();
    let (ga, gb) = (a.storage()?, b.storage()?);
    let (ka, kb) = (ga.kernel()?, gb.kernel()?);
    let out = ka.alloc_like(n)?;
    ka.dev
        .launch(
            "add_f32",
            kf_kernels::elementwise::config(n),
            &[
                crate::kernel_device::KArg::Buf(&ka.buf),
                crate::kernel_device::KArg::Buf(&kb.buf),
                crate::kernel_device::KArg::Buf(&out.buf),
                crate::kernel_device::KArg::U64(n as u64),
            ],
        )
        .with_context(|| format!("add_f32 on {device}"))?;
    Tensor::from_storage(Storage::Kernel(out), Layout::contiguous(a.shape()), None)
}

/// Copies `src`'s elements to the positions `dst_l` of `dst`'s storage (same device, dtype
/// and number of elements; different storages).
fn copy_layout(src: &Tensor, dst: &Tensor, dst_l: &Layout) -> Result<()> {
    let sg = src.storage()?;
    let mut dg = dst.storage_mut()?;
    match (&*sg, &mut *dg) {
        (Storage::Cpu(s), Storage::Cpu(d)) => scatter(s, src.layout(), d, dst_l),
        (Storage::Kernel(s), Storage::Kernel(d)) => copy_on_device(s, src.layout(), d, dst_l),
        _ => bail!(
            "copy: source on {} and destination on {}",
            src.device(),
            dst.device()
        ),
    }
}

/// Copies the elements of `src_l` in `src` to the positions `dst_l` in `dst` on their kernel
/// device: one memcpy when both are one contiguous run, else one `strided_copy` launch
/// (kernels/copy.cu) over the layouts collapsed to at most `kf_kernels::copy::RANK` dims, else
/// (a higher rank) one memcpy per common run.
fn copy_on_device(
    src: &KernelStorage,
    src_l: &Layout,
    dst: &KernelStorage,
    dst_l: &Layout,
) -> Result<()> {
    use crate::kernel_device::KArg;
    ensure!(
        src.device == dst.device && src.dtype() == dst.dtype(),
        "copy: {} {} to {} {}",
        src.device,
        src.dtype(),
        dst.device,
        dst.dtype()
    );
    let es = src.dtype().size();
    let n = src_l.numel();
    let ctx = || format!("device copy on {}", src.device);
    if n == 0 {
        return Ok(());
    }
    let (shape, ss, ds) = crate::layout::collapse_pair(src_l, dst_l);
    if shape.len() <= 1 && ss.first().is_none_or(|&s| s == 1) && ds.first().is_none_or(|&s| s == 1)
    {
        return src
            .dev
            .copy(
                &src.buf,
                src_l.offset() * es,
                &dst.buf,
                dst_l.offset() * es,
                n * es,
            )
            .with_context(ctx);
    }
    const R: usize = kf_kernels::copy::RANK;
    if let (true, Some(entry)) = (shape.len() <= R, kf_kernels::copy::strided_entry(es)) {
        // leading dims padded with size 1
        let pad = R - shape.len();
        let dim = |v: &[usize], one: usize, k: usize| if k < pad { one } else { v[k - pad] };
        let mut args = vec![
            KArg::Buf(&src.buf),
            KArg::U64(src_l.offset() as u64),
            KArg::Buf(&dst.buf),
            KArg::U64(dst_l.offset() as u64),
            KArg::U64(n as u64),
        ];
        args.extend((0..R).map(|k| KArg::U64(dim(&shape, 1, k) as u64)));
        args.extend((0..R).map(|k| KArg::U64(dim(&ss, 0, k) as u64)));
        args.extend((0..R).map(|k| KArg::U64(dim(&ds, 0, k) as u64)));
        return src
            .dev
            .launch(entry, kf_kernels::copy::config(n), &args)
            .with_context(ctx);
    }
    let mut runs = Vec::new();
    let run = crate::layout::for_each_common_run(src_l, dst_l, |a, b| runs.push((a, b)));
    for (a, b) in runs {
        src.dev
            .copy(&src.buf, a * es, &dst.buf, b * es, run * es)
            .with_context(ctx)?;
    }
    Ok(())
}

/// Copy the elements of `layout` out of `s` into a new contiguous buffer.
fn gather(s: &CpuStorage, layout: &Layout) -> CpuStorage {
    fn go<T: Element>(s: &CpuStorage, layout: &Layout) -> CpuStorage {
        let data = T::buf(s).expect("variant matches dtype").as_slice();
        let mut out = Vec::with_capacity(layout.numel());
        let dense = Layout::contiguous(layout.shape());
        let run = crate::layout::common_run_len(layout, &dense);
        crate::layout::for_each_common_run(layout, &dense, |a, _| {
            out.extend_from_slice(&data[a..a + run])
        });
        T::wrap(out)
    }
    match s.dtype() {
        DType::F16 => go::<f16>(s, layout),
        DType::BF16 => go::<bf16>(s, layout),
        DType::F32 => go::<f32>(s, layout),
        DType::F64 => go::<f64>(s, layout),
        DType::U32 => go::<u32>(s, layout),
        DType::I32 => go::<i32>(s, layout),
    }
}

/// Copy the elements of (`src`, `src_l`) into the positions of `dst_l` in `dst`.
fn scatter(src: &CpuStorage, src_l: &Layout, dst: &mut CpuStorage, dst_l: &Layout) -> Result<()> {
    fn go<T: Element>(src: &CpuStorage, src_l: &Layout, dst: &mut CpuStorage, dst_l: &Layout) {
        let s = T::buf(src).expect("variant matches dtype").as_slice();
        let d = T::buf_mut(dst)
            .expect("variant matches dtype")
            .as_mut_slice();
        // one slice copy per run contiguous in both (a KV-cache row block, a window)
        let run = crate::layout::common_run_len(src_l, dst_l);
        crate::layout::for_each_common_run(src_l, dst_l, |a, b| {
            d[b..b + run].copy_from_slice(&s[a..a + run])
        });
    }
    ensure!(src.dtype() == dst.dtype(), "scatter: dtype mismatch");
    match src.dtype() {
        DType::F16 => go::<f16>(src, src_l, dst, dst_l),
        DType::BF16 => go::<bf16>(src, src_l, dst, dst_l),
        DType::F32 => go::<f32>(src, src_l, dst, dst_l),
        DType::F64 => go::<f64>(src, src_l, dst, dst_l),
        DType::U32 => go::<u32>(src, src_l, dst, dst_l),
        DType::I32 => go::<i32>(src, src_l, dst, dst_l),
    }
    Ok(())
}

enum ViewKind {
    Reshape(Vec<usize>),
    Transpose(usize, usize),
    Permute(Vec<usize>),
    Narrow(usize, usize),
    Broadcast,
    Copy,
    Cast(DType),
}

struct ViewBackward {
    input: Tensor,
    kind: ViewKind,
}

impl BackwardOp for ViewBackward {
    fn name(&self) -> &'static str {
        match self.kind {
            ViewKind::Reshape(_) => "reshape",
            ViewKind::Transpose(..) => "transpose",
            ViewKind::Permute(_) => "permute",
            ViewKind::Narrow(..) => "narrow",
            ViewKind::Broadcast => "broadcast",
            ViewKind::Copy => "contiguous",
            ViewKind::Cast(_) => "to_dtype",
        }
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.input.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let in_shape = self.input.shape();
        let gi = match &self.kind {
            ViewKind::Reshape(s) => g.reshape(s)?,
            ViewKind::Transpose(a, b) => g.transpose(*a, *b)?.contiguous()?,
            ViewKind::Permute(p) => {
                let mut inv = vec![0; p.len()];
                for (i, &pi) in p.iter().enumerate() {
                    inv[pi] = i;
                }
                g.permute(&inv)?.contiguous()?
            }
            ViewKind::Narrow(dim, start) => g.pad_narrow(in_shape, *dim, *start)?,
            ViewKind::Broadcast => g.sum_to_shape(in_shape)?,
            ViewKind::Copy => g.clone(),
            ViewKind::Cast(d) => g.to_dtype(*d)?,
        };
        if gi.shape() != in_shape {
            bail!(
                "{} backward produced shape {:?}, expected {:?}",
                self.name(),
                gi.shape(),
                in_shape
            );
        }
        Ok(vec![Some(gi)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], s: &[usize]) -> Tensor {
        Tensor::from_slice(v, s, Device::Cpu).unwrap()
    }

    #[test]
    fn views_share_storage_and_read_correctly() {
        let a = t(&[0., 1., 2., 3., 4., 5.], &[2, 3]);
        let b = a.transpose(0, 1).unwrap();
        assert!(b.same_storage(&a));
        assert_eq!(b.to_vec::<f64>().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
        let c = a.narrow(1, 1, 2).unwrap();
        assert!(c.same_storage(&a));
        assert_eq!(c.to_vec::<f64>().unwrap(), vec![1., 2., 4., 5.]);
        let d = t(&[1., 2.], &[2, 1]).broadcast_as(&[2, 2, 3]).unwrap();
        assert_eq!(
            d.to_vec::<f64>().unwrap(),
            vec![1., 1., 1., 2., 2., 2., 1., 1., 1., 2., 2., 2.]
        );
        let r = a.reshape(&[3, 2]).unwrap();
        assert!(r.same_storage(&a));
        let bc = b.contiguous().unwrap();
        assert!(!bc.same_storage(&a));
        assert!(a.reshape(&[4]).is_err());
    }

    #[test]
    fn view_gradients_flow_back() {
        let a = t(&[0., 1., 2., 3., 4., 5.], &[2, 3]).var();
        // sum of (narrow of transposed a), seeded with distinct weights
        let b = a.transpose(0, 1).unwrap().narrow(0, 1, 2).unwrap(); // [[1,4],[2,5]]
        let seed = t(&[10., 20., 30., 40.], &[2, 2]);
        let g = b.backward_with(seed).unwrap();
        let ga = g.get(&a).unwrap().to_vec::<f64>().unwrap();
        assert_eq!(ga, vec![0., 10., 30., 0., 20., 40.]);
    }

    #[test]
    fn broadcast_gradient_sums() {
        let a = t(&[1., 2.], &[2, 1]).var();
        let b = a.broadcast_as(&[3, 2, 4]).unwrap();
        let g = b.backward().unwrap();
        assert_eq!(g.get(&a).unwrap().to_vec::<f64>().unwrap(), vec![12., 12.]);
    }

    #[test]
    fn no_grad_scope_records_nothing() {
        let a = t(&[1., 2.], &[2]).var();
        {
            let _g = autograd::no_grad();
            assert!(!a.transpose(0, 0).unwrap().grad_node().is_some());
        }
        assert!(a.transpose(0, 0).unwrap().grad_node().is_some());
    }

    #[test]
    fn squeeze_and_unsqueeze_are_views() {
        let a = t(&[0., 1., 2., 3., 4., 5.], &[1, 2, 3]).var();
        let qkv = a.narrow(2, 1, 1).unwrap(); // [1, 2, 1], strided
        let s = qkv.squeeze(2).unwrap();
        assert!(s.same_storage(&a));
        assert_eq!(s.shape(), &[1, 2]);
        assert_eq!(s.to_vec::<f64>().unwrap(), vec![1., 4.]);
        let u = s.unsqueeze(0).unwrap();
        assert!(u.same_storage(&a));
        assert_eq!(u.shape(), &[1, 1, 2]);
        let g = u.backward_with(t(&[5., 7.], &[1, 1, 2])).unwrap();
        assert_eq!(
            g.get(&a).unwrap().to_vec::<f64>().unwrap(),
            vec![0., 5., 0., 0., 7., 0.]
        );
        assert!(a.squeeze(1).is_err());
    }

    #[test]
    fn dtype_round_trip_and_errors() {
        let a = t(&[1.5, -2.0], &[2]);
        assert_eq!(
            a.to_dtype(DType::F16).unwrap().to_vec_f64().unwrap(),
            vec![1.5, -2.0]
        );
        assert!(a.to_dtype(DType::U32).is_err());
        assert!(a.to_vec::<f32>().is_err());
        assert!(a.dim(3).is_err());
    }
}
