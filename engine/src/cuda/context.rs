//! `CudaDevice`: one per ordinal for the whole process (the primary context,
//! one stream, the caching allocator, the module cache, the cuBLAS handle),
//! opened on first use; and the host<->device copies. Every method makes the
//! context current on the calling thread first, so any thread may call.

use super::alloc::{AllocStats, CachingAllocator, RawMemory};
use super::blas::Blas;
use super::buffer::{CudaBuffer, DeviceElem};
use super::module::Module;
use super::{driver_error_text, probe, DriverContext};
use anyhow::{bail, ensure, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::{result, CudaContext, CudaStream};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The oldest architecture the PTX of kf-kernels is compiled for (`compute_80`).
const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// cuMemAlloc / cuMemFree of one context, behind the caching allocator.
pub(super) struct DriverMemory {
    ctx: Arc<CudaContext>,
}

impl RawMemory for DriverMemory {
    fn raw_alloc(&mut self, bytes: usize) -> Result<u64> {
        self.ctx
            .bind_to_thread()
            .drv(|| "making the CUDA context current".into())?;
        // SAFETY: a plain allocation in the current context; the address is
        // only used through the allocator, which frees it at most once.
        unsafe { result::malloc_sync(bytes) }.drv(|| format!("cuMemAlloc of {bytes} bytes"))
    }
    fn raw_free(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .drv(|| "making the CUDA context current".into())?;
        // SAFETY: `ptr` came from `raw_alloc` and is on no free list any more
        // (the allocator hands each cached block to the driver once).
        unsafe { result::free_sync(ptr) }.drv(|| format!("cuMemFree of {bytes} bytes at {ptr:#x}"))
    }
}

/// One GPU: context, stream, allocator, modules, cuBLAS.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    /// Largest dynamic shared memory a block may opt in to, bytes.
    pub(super) max_shared_optin: u32,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    alloc: Mutex<CachingAllocator<DriverMemory>>,
    pub(super) modules: Mutex<HashMap<&'static str, Arc<Module>>>,
    pub(super) blas: Mutex<Option<Blas>>,
}

/// Lock a mutex, taking the data of a poisoned one (every critical section
/// here leaves its data consistent before anything that can panic).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CudaDevice {
    /// The device `cuda:ordinal`, opened on first use. Errors are one sentence
    /// naming what is missing: the driver library, a device, this ordinal, or
    /// a new enough architecture.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let mut devices = lock(DEVICES.get_or_init(Default::default));
        if let Some(d) = devices.get(&ordinal) {
            return Ok(d.clone());
        }
        probe::check_driver()?;
        // cudarc panics on a symbol the probe did not foresee; keep that an error
        let opened =
            std::panic::catch_unwind(|| CudaDevice::open(ordinal)).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                bail!("the CUDA driver could not be used: {msg}")
            })?;
        let dev = Arc::new(opened);
        devices.insert(ordinal, dev.clone());
        Ok(dev)
    }

    /// Number of CUDA devices, or the sentence saying why there are none.
    pub fn count() -> Result<usize> {
        probe::check_driver()?;
        init_driver()?;
        let n = result::device::get_count().drv(|| "counting CUDA devices".into())?;
        Ok(n.max(0) as usize)
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        init_driver()?;
        let count = result::device::get_count().drv(|| "counting CUDA devices".into())?;
        if count <= 0 {
            bail!("no CUDA device: the driver is installed but sees no GPU");
        }
        ensure!(
            ordinal < count as usize,
            "cuda:{ordinal} does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{}",
            count - 1
        );
        let ctx = CudaContext::new(ordinal).drv(|| format!("opening cuda:{ordinal}"))?;
        let name = ctx.name().drv(|| format!("naming cuda:{ordinal}"))?;
        let cc = ctx
            .compute_capability()
            .drv(|| format!("compute capability of cuda:{ordinal}"))?;
        ensure!(
            cc >= MIN_COMPUTE_CAPABILITY,
            "cuda:{ordinal} ({name}) has compute capability {}.{}; kfrun's kernels need {}.{} (Ampere) or newer",
            cc.0,
            cc.1,
            MIN_COMPUTE_CAPABILITY.0,
            MIN_COMPUTE_CAPABILITY.1
        );
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .drv(|| format!("shared memory limit of cuda:{ordinal}"))?;
        let stream = ctx
            .new_stream()
            .drv(|| format!("creating a stream on cuda:{ordinal}"))?;
        Ok(CudaDevice {
            ordinal,
            name,
            compute_capability: cc,
            max_shared_optin: optin.max(0) as u32,
            alloc: Mutex::new(CachingAllocator::new(DriverMemory { ctx: ctx.clone() })),
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The GPU's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Make this device's context current on the calling thread.
    pub(super) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .drv(|| format!("making the context of cuda:{} current", self.ordinal))
    }

    /// Wait for all work queued on the device's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .drv(|| format!("waiting for cuda:{}", self.ordinal))
    }

    /// Free and total device memory in bytes (the driver's numbers).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().drv(|| format!("memory of cuda:{}", self.ordinal))
    }

    /// Counters of the caching allocator.
    pub fn alloc_stats(&self) -> AllocStats {
        lock(&self.alloc).stats()
    }

    /// Give every cached block back to the driver (after the stream drains, so
    /// no queued kernel still reads one).
    pub fn trim_cache(&self) -> Result<()> {
        self.synchronize()?;
        lock(&self.alloc).trim()
    }

    pub(super) fn release_block(&self, ptr: u64, class: usize) {
        lock(&self.alloc).release(ptr, class);
    }

    /// `n` elements of uninitialised device memory.
    pub fn alloc<T: DeviceElem>(self: &Arc<Self>, n: usize) -> Result<CudaBuffer<T>> {
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| anyhow::anyhow!("{n} elements of {} overflow usize", T::DTYPE))?;
        let (ptr, class) = if bytes == 0 {
            (0, 0)
        } else {
            self.bind()?;
            lock(&self.alloc).alloc(bytes).map_err(|e| {
                e.context(format!(
                    "allocating {n} x {} ({bytes} bytes) on cuda:{}",
                    T::DTYPE,
                    self.ordinal
                ))
            })?
        };
        Ok(CudaBuffer {
            dev: self.clone(),
            ptr,
            len: n,
            class,
            _t: PhantomData,
        })
    }

    /// `n` zeros.
    pub fn zeros<T: DeviceElem>(self: &Arc<Self>, n: usize) -> Result<CudaBuffer<T>> {
        let buf = self.alloc::<T>(n)?;
        if n > 0 {
            // SAFETY: the block holds `num_bytes` bytes and belongs to `buf`
            // alone; the memset is queued on the device's one stream.
            unsafe {
                result::memset_d8_async(buf.ptr, 0, buf.num_bytes(), self.stream.cu_stream())
            }
            .drv(|| format!("zeroing {} bytes on cuda:{}", buf.num_bytes(), self.ordinal))?;
        }
        Ok(buf)
    }

    /// A device copy of `src`.
    pub fn htod<T: DeviceElem>(self: &Arc<Self>, src: &[T]) -> Result<CudaBuffer<T>> {
        let mut buf = self.alloc::<T>(src.len())?;
        self.htod_into(src, &mut buf)?;
        Ok(buf)
    }

    /// Overwrite `dst` with `src` (same length).
    pub fn htod_into<T: DeviceElem>(&self, src: &[T], dst: &mut CudaBuffer<T>) -> Result<()> {
        self.same_device(dst.device())?;
        ensure!(
            src.len() == dst.len(),
            "copying {} host elements into a device buffer of {}",
            src.len(),
            dst.len()
        );
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` holds src.len() elements of T. `src` is pageable host
        // memory: cuMemcpyHtoDAsync returns only once it has been staged, so
        // the borrow may end when this call does.
        unsafe { result::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }.drv(|| {
            format!(
                "copying {} bytes to cuda:{}",
                std::mem::size_of_val(src),
                self.ordinal
            )
        })
    }

    /// The contents of `src` on the host (waits for the stream).
    pub fn dtoh<T: DeviceElem>(&self, src: &CudaBuffer<T>) -> Result<Vec<T>> {
        self.same_device(src.device())?;
        let mut out = vec![T::zeroed(); src.len()];
        if src.is_empty() {
            return Ok(out);
        }
        self.bind()?;
        // SAFETY: `out` has room for src.len() elements and lives until the
        // stream is synchronized below; `src` is a live device block of that size.
        unsafe { result::memcpy_dtoh_async(&mut out, src.ptr, self.stream.cu_stream()) }.drv(
            || {
                format!(
                    "copying {} bytes from cuda:{}",
                    src.num_bytes(),
                    self.ordinal
                )
            },
        )?;
        self.synchronize()?;
        Ok(out)
    }

    /// A new device buffer with the contents of `src`.
    pub fn dtod<T: DeviceElem>(self: &Arc<Self>, src: &CudaBuffer<T>) -> Result<CudaBuffer<T>> {
        self.same_device(src.device())?;
        let out = self.alloc::<T>(src.len())?;
        if !src.is_empty() {
            self.bind()?;
            // SAFETY: both blocks hold num_bytes bytes; stream-ordered copy.
            unsafe {
                result::memcpy_dtod_async(
                    out.ptr,
                    src.ptr,
                    src.num_bytes(),
                    self.stream.cu_stream(),
                )
            }
            .drv(|| format!("copying {} bytes on cuda:{}", src.num_bytes(), self.ordinal))?;
        }
        Ok(out)
    }

    /// Stream-ordered copy of `bytes` bytes from device address `src` to `dst`
    /// (sub-ranges of buffers, for the kernel-device backend of kf-ops).
    ///
    /// # Safety
    /// `[src, src + bytes)` and `[dst, dst + bytes)` lie in live blocks of this
    /// device and do not overlap.
    pub unsafe fn copy_raw(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller's contract; the copy is ordered on the one stream.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .drv(|| format!("copying {bytes} bytes on cuda:{}", self.ordinal))
    }

    pub(super) fn same_device(&self, other: &CudaDevice) -> Result<()> {
        ensure!(
            std::ptr::eq(self, other),
            "a buffer of cuda:{} used on cuda:{}",
            other.ordinal,
            self.ordinal
        );
        Ok(())
    }
}

/// cuInit, with "no device" told apart from other failures.
fn init_driver() -> Result<()> {
    match result::init() {
        Ok(()) => Ok(()),
        Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => bail!(
            "no CUDA device: the driver is installed but sees no GPU ({})",
            driver_error_text(e)
        ),
        Err(e) => bail!(
            "the CUDA driver failed to initialise: {}",
            driver_error_text(e)
        ),
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.compute_capability.0, self.compute_capability.1
        )
    }
}
