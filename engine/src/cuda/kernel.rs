//! The CUDA backend of [`KernelDevice`] (cargo feature `cuda`): the engine's CUDA layer
//! (`crate::cuda`: one stream per device, caching allocator, PTX modules of kf-kernels
//! loaded lazily per family, argument-checked launches) runs the kernels, cuBLAS runs the
//! GEMM (`CudaDevice::gemm_raw`, f32 accumulation). Buffers are byte buffers rounded up to
//! whole 32-bit words (the allocator's element type), with their byte length kept apart.
//! Without a driver or GPU, [`Cuda::new`] fails with the engine's one-sentence reason.

use super::{CudaBuffer, CudaDevice, KernelArg, RawGemm};
use crate::kernel_device::{DeviceBuf, DeviceMemory, GemmSpec, KArg, KernelDevice, LaunchConfig};
use anyhow::{anyhow, ensure, Context, Result};
use std::sync::Arc;

/// One GPU as a kernel device.
pub struct Cuda {
    dev: Arc<CudaDevice>,
}

/// A device buffer of `bytes` bytes (in `ceil(bytes / 4)` words).
pub struct CudaBuf {
    words: CudaBuffer<u32>,
    bytes: usize,
}

impl CudaBuf {
    fn ptr(&self) -> u64 {
        self.words.device_ptr()
    }
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} bytes at {:#x})", self.bytes, self.ptr())
    }
}

fn words(bytes: usize) -> usize {
    bytes.div_ceil(4)
}

impl Cuda {
    /// The GPU of `ordinal`; an error naming what is missing (driver, device) otherwise.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Ok(Cuda {
            dev: CudaDevice::get(ordinal)?,
        })
    }

    /// GPU 0 for the device tests: `None`, with the reason printed, when there is no usable GPU
    /// (the test then skips); a panic instead when `KF_REQUIRE_GPU` is set.
    pub fn for_tests() -> Option<Cuda> {
        match Cuda::new(0) {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(
                    std::env::var_os("KF_REQUIRE_GPU").is_none(),
                    "KF_REQUIRE_GPU is set but: {e:#}"
                );
                println!("skipped: no usable GPU: {e:#}");
                None
            }
        }
    }

    /// The engine's device (name, memory, allocator statistics).
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The CUDA buffer behind `b`, checked to belong to this GPU.
    fn own<'a>(&self, b: &'a DeviceBuf) -> Result<&'a CudaBuf> {
        let b = b.get::<CudaBuf>()?;
        ensure!(
            Arc::ptr_eq(b.words.device(), &self.dev),
            "a buffer of cuda:{} used on cuda:{}",
            b.words.device().ordinal(),
            self.dev.ordinal()
        );
        Ok(b)
    }
}

/// The family of kernel entry point `entry` (kf_kernels::FAMILIES).
fn family_of(entry: &str) -> Result<&'static str> {
    kf_kernels::FAMILIES
        .iter()
        .find(|f| f.entries.contains(&entry))
        .map(|f| f.name)
        .ok_or_else(|| anyhow!("no kernel family has an entry point named {entry}"))
}

impl DeviceMemory for CudaBuf {
    fn bytes(&self) -> usize {
        self.bytes
    }
    fn backend(&self) -> &'static str {
        "cuda"
    }
}

impl KernelDevice for Cuda {
    fn name(&self) -> String {
        format!("cuda:{}", self.dev.ordinal())
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceBuf> {
        Ok(DeviceBuf::new(CudaBuf {
            words: self.dev.zeros::<u32>(words(bytes))?,
            bytes,
        }))
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        Ok(DeviceBuf::new(CudaBuf {
            words: self.dev.alloc::<u32>(words(bytes))?,
            bytes,
        }))
    }

    fn upload(&self, data: &[u8]) -> Result<DeviceBuf> {
        let mut w = vec![0u32; words(data.len())];
        bytemuck::cast_slice_mut::<u32, u8>(&mut w)[..data.len()].copy_from_slice(data);
        Ok(DeviceBuf::new(CudaBuf {
            words: self.dev.htod(&w)?,
            bytes: data.len(),
        }))
    }

    fn download(&self, buf: &DeviceBuf) -> Result<Vec<u8>> {
        let buf = self.own(buf)?;
        let w = self.dev.dtoh(&buf.words)?;
        let mut out: Vec<u8> = bytemuck::cast_slice(&w).to_vec();
        out.truncate(buf.bytes);
        Ok(out)
    }

    fn copy(
        &self,
        src: &DeviceBuf,
        src_off: usize,
        dst: &DeviceBuf,
        dst_off: usize,
        bytes: usize,
    ) -> Result<()> {
        let (src, dst) = (self.own(src)?, self.own(dst)?);
        let fits = |off: usize, b: &CudaBuf| off.checked_add(bytes).is_some_and(|e| e <= b.bytes);
        ensure!(
            fits(src_off, src) && fits(dst_off, dst),
            "copy of {bytes} bytes from offset {src_off} of a {}-byte buffer to offset {dst_off} \
             of a {}-byte buffer is out of range",
            src.bytes,
            dst.bytes
        );
        let (s, d) = (src.ptr() + src_off as u64, dst.ptr() + dst_off as u64);
        ensure!(
            s + bytes as u64 <= d || d + bytes as u64 <= s,
            "copy ranges overlap"
        );
        // SAFETY: both ranges were checked to lie in live buffers of this device and
        // not to overlap.
        unsafe { self.dev.copy_raw(d, s, bytes) }
    }

    fn launch(&self, entry: &str, cfg: LaunchConfig, args: &[KArg<'_>]) -> Result<()> {
        let family = family_of(entry)?;
        let mut kargs = Vec::with_capacity(args.len());
        for a in args {
            kargs.push(match *a {
                KArg::Buf(b) => KernelArg::Ptr(self.own(b)?.ptr()),
                KArg::Null => KernelArg::Ptr(0),
                KArg::I32(v) => KernelArg::I32(v),
                KArg::U32(v) => KernelArg::U32(v),
                KArg::U64(v) => KernelArg::U64(v),
                KArg::F32(v) => KernelArg::F32(v),
                KArg::F64(v) => KernelArg::F64(v),
            });
        }
        // SAFETY: every pointer is a live buffer of this device (checked above); the
        // launchers of `kdev::launch` size the buffers for the shapes they launch over,
        // the same contract the emulator checks element by element in CI.
        unsafe { self.dev.launch(family, entry, cfg, &kargs) }
            .with_context(|| format!("{entry} on {}", self.name()))
    }

    fn gemm(&self, s: &GemmSpec, a: &DeviceBuf, b: &DeviceBuf, c: &DeviceBuf) -> Result<()> {
        let c_buf = c;
        let (a, b, c) = (self.own(a)?, self.own(b)?, self.own(c)?);
        s.check(a.bytes / 4, b.bytes / 4, c.bytes / 4)?;
        ensure!(
            c.ptr() != a.ptr() && c.ptr() != b.ptr(),
            "gemm: C shares memory with A or B"
        );
        let raw = RawGemm {
            m: s.m,
            n: s.n,
            k: s.k,
            trans_a: s.trans_a,
            trans_b: s.trans_b,
            lda: s.lda,
            ldb: s.ldb,
            ldc: s.ldc,
            stride_a: s.stride_a,
            stride_b: s.stride_b,
            stride_c: s.stride_c,
            batch: s.batch,
            a: a.ptr() + 4 * s.a_off as u64,
            b: b.ptr() + 4 * s.b_off as u64,
            c: c.ptr() + 4 * s.c_off as u64,
            alpha: s.alpha,
            beta: s.beta,
        };
        if s.k == 0 {
            // an empty sum: C = beta C, which cuBLAS is not asked to do
            ensure!(
                s.beta == 0.0,
                "gemm with k = 0 and beta != 0 is not supported"
            );
            let zeros = self.alloc_zeroed(4 * s.n)?;
            for i in 0..s.batch {
                for r in 0..s.m {
                    let off = 4 * (s.c_off + i * s.stride_c + r * s.ldc);
                    self.copy(&zeros, 0, c_buf, off, 4 * s.n)?;
                }
            }
            return Ok(());
        }
        // SAFETY: `check` placed every operand of every batch inside its buffer, all
        // three buffers belong to this device, and C is a different buffer from A and B.
        unsafe { self.dev.gemm_raw::<f32>(&raw) }
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_has_one_family() {
        for f in kf_kernels::FAMILIES {
            for e in f.entries {
                assert_eq!(family_of(e).unwrap(), f.name, "{e}");
            }
        }
        assert!(family_of("no_such_kernel_f32").is_err());
    }

    #[test]
    fn words_round_up() {
        assert_eq!(words(0), 0);
        assert_eq!(words(1), 1);
        assert_eq!(words(4), 1);
        assert_eq!(words(6), 2);
    }
}
