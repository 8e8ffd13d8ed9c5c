//! Device storage behind tensors. CPU buffers are either owned vectors or
//! zero-copy windows into a memory-mapped safetensors file (copied on first
//! write). The CUDA issue adds a `Storage::Cuda` variant next to `Cpu`.

use crate::dtype::{DType, Element};
use half::{bf16, f16};
use memmap2::Mmap;
use std::sync::Arc;

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
            DType::F32 => CpuStorage::F32(Buf::Owned(vec![0.0; n])),
            DType::F64 => CpuStorage::F64(Buf::Owned(vec![0.0; n])),
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

/// Storage on some device.
pub enum Storage {
    Cpu(CpuStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn device(&self) -> crate::Device {
        match self {
            Storage::Cpu(_) => crate::Device::Cpu,
        }
    }
}
