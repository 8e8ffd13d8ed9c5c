//! Storage behind tensors: CPU buffers (owned vectors, or zero-copy windows into a
//! memory-mapped safetensors file, copied on first write) or the memory of a kernel device
//! (`emu`, `cuda:N`: a [`DeviceBuf`] with the device that owns it).

use crate::dtype::{DType, Element};
use crate::kernel_device::{DeviceBuf, KernelDevice};
use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::sync::Arc;

/// `n` zeros, in a recycled buffer when the pool has one of that length.
fn pooled_zeros<T: Element>(n: usize) -> Vec<T> {
    match pool::take::<T>(n) {
        Some(mut v) => {
            v.fill(T::zeroed());
            v
        }
        None => vec![T::zeroed(); n],
    }
}

/// A typed CPU buffer.
pub enum Buf<T> {
    Owned(Vec<T>),
    /// `len` elements starting at byte `start` of a read-only mapping; `start`
    /// is aligned for `T` (checked when the view is created).
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
}

impl<T: Element> Buf<T> {
    /// A mapped view if `start` is aligned for `T`, else `None` (caller copies).
    pub fn mapped(map: Arc<Mmap>, start: usize, len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = start.checked_add(bytes)?;
        if end > map.len() {
            return None;
        }
        let ptr = map[start..end].as_ptr();
        if (ptr as usize) % std::mem::align_of::<T>() != 0 {
            return None;
        }
        Some(Buf::Mapped { map, start, len })
    }

    pub fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, start, len } => {
                let bytes = &map[*start..*start + *len * std::mem::size_of::<T>()];
                bytemuck::cast_slice(bytes)
            }
        }
    }

    /// Mutable access; a mapped buffer is first copied into an owned one.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        if let Buf::Mapped { .. } = self {
            *self = Buf::Owned(self.as_slice().to_vec());
        }
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { .. } => unreachable!("converted to owned above"),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buf::Owned(v) => v.len(),
            Buf::Mapped { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Buf::Mapped { .. })
    }
}

/// CPU storage: one variant per dtype.
pub enum CpuStorage {
    F16(Buf<f16>),
    BF16(Buf<bf16>),
    F32(Buf<f32>),
    F64(Buf<f64>),
    U32(Buf<u32>),
    I32(Buf<i32>),
}

macro_rules! each_buf {
    ($s:expr, |$b:ident| $body:expr) => {
        match $s {
            CpuStorage::F16($b) => $body,
            CpuStorage::BF16($b) => $body,
            CpuStorage::F32($b) => $body,
            CpuStorage::F64($b) => $body,
            CpuStorage::U32($b) => $body,
            CpuStorage::I32($b) => $body,
        }
    };
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::I32(_) => DType::I32,
        }
    }

    pub fn len(&self) -> usize {
        each_buf!(self, |b| b.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_mapped(&self) -> bool {
        each_buf!(self, |b| b.is_mapped())
    }

    /// Zero-filled storage of `n` elements.
    pub fn zeros(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F16 => CpuStorage::F16(Buf::Owned(vec![f16::ZERO; n])),
            DType::BF16 => CpuStorage::BF16(Buf::Owned(vec![bf16::ZERO; n])),
            DType::F32 => CpuStorage::F32(Buf::Owned(pooled_zeros(n))),
            DType::F64 => CpuStorage::F64(Buf::Owned(pooled_zeros(n))),
            DType::U32 => CpuStorage::U32(Buf::Owned(vec![0; n])),
            DType::I32 => CpuStorage::I32(Buf::Owned(vec![0; n])),
        }
    }

    /// The raw bytes of the whole buffer (little-endian host order).
    pub fn as_bytes(&self) -> &[u8] {
        each_buf!(self, |b| bytemuck::cast_slice(b.as_slice()))
    }

    /// Storage from little-endian bytes, copying (used when a mapping is not
    /// aligned for the dtype).
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Self {
        fn copy<T: Element>(bytes: &[u8]) -> Vec<T> {
            let n = bytes.len() / std::mem::size_of::<T>();
            let mut v: Vec<T> = vec![T::zeroed(); n];
            bytemuck::cast_slice_mut::<T, u8>(&mut v)
                .copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
            v
        }
        match dtype {
            DType::F16 => f16::wrap(copy(bytes)),
            DType::BF16 => bf16::wrap(copy(bytes)),
            DType::F32 => f32::wrap(copy(bytes)),
            DType::F64 => f64::wrap(copy(bytes)),
            DType::U32 => u32::wrap(copy(bytes)),
            DType::I32 => i32::wrap(copy(bytes)),
        }
    }

    /// Zero-copy storage over `len` elements of `map` at byte `start`, or a
    /// copy when the address is not aligned for the dtype.
    pub fn from_mmap(dtype: DType, map: Arc<Mmap>, start: usize, len: usize) -> Self {
        fn view<T: Element>(map: Arc<Mmap>, start: usize, len: usize) -> CpuStorage {
            match Buf::<T>::mapped(map.clone(), start, len) {
                Some(b) => {
                    let mut s = T::wrap(Vec::new());
                    *T::buf_mut(&mut s).expect("wrap gives the matching variant") = b;
                    s
                }
                None => {
                    let bytes = &map[start..start + len * std::mem::size_of::<T>()];
                    CpuStorage::from_bytes(T::DTYPE, bytes)
                }
            }
        }
        match dtype {
            DType::F16 => view::<f16>(map, start, len),
            DType::BF16 => view::<bf16>(map, start, len),
            DType::F32 => view::<f32>(map, start, len),
            DType::F64 => view::<f64>(map, start, len),
            DType::U32 => view::<u32>(map, start, len),
            DType::I32 => view::<i32>(map, start, len),
        }
    }
}

impl Drop for CpuStorage {
    /// Large owned f32/f64 buffers go back to the [`pool`] for the next `OutBuf`.
    fn drop(&mut self) {
        match self {
            CpuStorage::F32(Buf::Owned(v)) => pool::give(std::mem::take(v)),
            CpuStorage::F64(Buf::Owned(v)) => pool::give(std::mem::take(v)),
            _ => {}
        }
    }
}

/// Recycling of large float buffers. A training step allocates the same large activations
/// and gradients every micro-batch; fresh allocations of that size are mmapped, so every
/// page is faulted in and zeroed by the kernel on first touch (about 5% of a `small` update's
/// CPU time, profiled). Dropped owned f32/f64 storage of at least [`pool::MIN_BYTES`] is kept
/// here (at most [`pool::MAX_BYTES`] in all, the oldest dropped first), and
/// `OutBuf::uninit`/`zeros` and `CpuStorage::zeros` take a buffer of exactly the requested
/// length from it. A recycled buffer holds stale values: `OutBuf::uninit` hands it out as is
/// (its kernels write every element; the harness's canary mode, which never uses the pool,
/// checks that), `zeros` clears it.
pub mod pool {
    use std::any::Any;
    use std::sync::Mutex;

    /// Smaller buffers come from malloc's heap without page faults.
    pub const MIN_BYTES: usize = 1 << 20;
    /// Most memory the pool holds on to.
    pub const MAX_BYTES: usize = 256 << 20;

    enum Entry {
        F32(Vec<f32>),
        F64(Vec<f64>),
    }

    impl Entry {
        fn bytes(&self) -> usize {
            match self {
                Entry::F32(v) => v.len() * 4,
                Entry::F64(v) => v.len() * 8,
            }
        }
    }

    struct Pool {
        /// Oldest first.
        free: Vec<Entry>,
        bytes: usize,
    }

    static POOL: Mutex<Pool> = Mutex::new(Pool {
        free: Vec::new(),
        bytes: 0,
    });

    /// Keeps `v` (an f32 or f64 vector; anything else is dropped) for reuse when it is large.
    pub fn give<T: 'static>(v: Vec<T>) {
        let bytes = std::mem::size_of_val(v.as_slice());
        if !(MIN_BYTES..=MAX_BYTES).contains(&bytes) {
            return;
        }
        let mut slot = Some(v);
        let any: &mut dyn Any = &mut slot;
        let entry = if let Some(x) = any.downcast_mut::<Option<Vec<f32>>>() {
            Entry::F32(x.take().expect("set above"))
        } else if let Some(x) = any.downcast_mut::<Option<Vec<f64>>>() {
            Entry::F64(x.take().expect("set above"))
        } else {
            return;
        };
        let Ok(mut p) = POOL.lock() else { return };
        while p.bytes + bytes > MAX_BYTES && !p.free.is_empty() {
            let old = p.free.remove(0);
            p.bytes -= old.bytes();
        }
        p.bytes += bytes;
        p.free.push(entry);
    }

    /// A kept vector of exactly `n` elements of `T` (stale contents), newest first; None when
    /// there is none (or `T` is not f32/f64, or the request is below `MIN_BYTES`).
    pub fn take<T: 'static>(n: usize) -> Option<Vec<T>> {
        if n.saturating_mul(std::mem::size_of::<T>()) < MIN_BYTES {
            return None;
        }
        let is32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
        let is64 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f64>();
        if !is32 && !is64 {
            return None;
        }
        let entry = {
            let mut p = POOL.lock().ok()?;
            let i = p.free.iter().rposition(|e| match e {
                Entry::F32(v) => is32 && v.len() == n,
                Entry::F64(v) => is64 && v.len() == n,
            })?;
            let e = p.free.remove(i);
            p.bytes -= e.bytes();
            e
        };
        let mut out: Option<Vec<T>> = None;
        let any: &mut dyn Any = &mut out;
        match entry {
            Entry::F32(v) => {
                if let Some(o) = any.downcast_mut::<Option<Vec<f32>>>() {
                    *o = Some(v);
                }
            }
            Entry::F64(v) => {
                if let Some(o) = any.downcast_mut::<Option<Vec<f64>>>() {
                    *o = Some(v);
                }
            }
        }
        out
    }

    /// Frees every kept vector (after a large one-off conversion, e.g. f32 weights recast to
    /// bf16, so their memory goes back to the system instead of waiting in the pool).
    pub fn clear() {
        if let Ok(mut p) = POOL.lock() {
            p.free.clear();
            p.bytes = 0;
        }
    }

    /// Bytes held now (for tests).
    pub fn held_bytes() -> usize {
        POOL.lock().map(|p| p.bytes).unwrap_or(0)
    }
}

/// Contiguous elements of one dtype in the memory of a kernel device.
pub struct KernelStorage {
    /// Shared with the device tensors of the kernel launchers (no copy between the two).
    pub buf: Arc<DeviceBuf>,
    /// The device that owns `buf` (launches and copies go through it).
    pub dev: Arc<dyn KernelDevice>,
    pub device: crate::Device,
    dtype: DType,
    len: usize,
}

impl KernelStorage {
    /// `len` elements of `dtype` in `buf`; errors when the buffer is smaller than that.
    pub fn new(
        buf: impl Into<Arc<DeviceBuf>>,
        dev: Arc<dyn KernelDevice>,
        device: crate::Device,
        dtype: DType,
        len: usize,
    ) -> Result<KernelStorage> {
        let buf = buf.into();
        let need = len
            .checked_mul(dtype.size())
            .ok_or_else(|| anyhow!("{len} elements of {dtype} overflow"))?;
        ensure!(
            buf.bytes() >= need,
            "{len} elements of {dtype} need {need} bytes, the {device} buffer has {}",
            buf.bytes()
        );
        Ok(KernelStorage {
            buf,
            dev,
            device,
            dtype,
            len,
        })
    }
}

impl KernelStorage {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// A new uninitialised buffer of `len` elements of this storage's dtype on its device.
    pub fn alloc_like(&self, len: usize) -> Result<KernelStorage> {
        self.alloc_of(len, self.dtype)
    }
    /// A new uninitialised buffer of `len` elements of `dtype` on this storage's device.
    pub fn alloc_of(&self, len: usize, dtype: DType) -> Result<KernelStorage> {
        let bytes = len
            .checked_mul(dtype.size())
            .ok_or_else(|| anyhow!("{len} elements of {dtype} overflow"))?;
        let buf = self
            .dev
            .alloc(bytes)
            .with_context(|| format!("allocating {bytes} bytes on {}", self.device))?;
        KernelStorage::new(buf, self.dev.clone(), self.device, dtype, len)
    }
}

/// Storage on some device.
pub enum Storage {
    Cpu(CpuStorage),
    Kernel(KernelStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Kernel(s) => s.dtype,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Kernel(s) => s.len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn device(&self) -> crate::Device {
        match self {
            Storage::Cpu(_) => crate::Device::Cpu,
            Storage::Kernel(s) => s.device,
        }
    }
    /// The CPU buffer, or an error naming the device the data is on.
    pub fn cpu(&self) -> Result<&CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s),
            Storage::Kernel(s) => Err(not_on_cpu(s.device)),
        }
    }
    /// [`Self::cpu`], mutable.
    pub fn cpu_mut(&mut self) -> Result<&mut CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s),
            Storage::Kernel(s) => Err(not_on_cpu(s.device)),
        }
    }
    /// The kernel-device storage, or an error for CPU data.
    pub fn kernel(&self) -> Result<&KernelStorage> {
        match self {
            Storage::Kernel(s) => Ok(s),
            Storage::Cpu(_) => {
                bail!("this needs the tensor on a kernel device (emu, cuda:N); it is on the cpu")
            }
        }
    }
}

fn not_on_cpu(device: crate::Device) -> anyhow::Error {
    anyhow!(
        "the tensor is on {device} and this needs its data on the cpu: move it with \
         to_device(Device::Cpu) first"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_recycles_large_float_buffers_only() {
        let n = pool::MIN_BYTES / 4 + 3;
        let v = vec![1.5f32; n];
        let p = v.as_ptr();
        drop(CpuStorage::F32(Buf::Owned(v)));
        let got = pool::take::<f32>(n).expect("kept");
        assert_eq!((got.as_ptr(), got.len()), (p, n));
        // zeros from the pool are cleared
        drop(CpuStorage::F32(Buf::Owned(got)));
        let z = CpuStorage::zeros(DType::F32, n);
        assert!(z.as_bytes().iter().all(|&b| b == 0));
        // small buffers and other dtypes are not kept
        pool::give(vec![0f32; 16]);
        assert!(pool::take::<f32>(16).is_none());
        pool::give(vec![0u32; n]);
        assert!(pool::take::<u32>(n).is_none());
        // a length that was never given
        assert!(pool::take::<f64>(n + 1).is_none());
        assert!(pool::held_bytes() <= pool::MAX_BYTES);
    }
}
