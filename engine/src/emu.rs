//! The CPU emulator of kernels/*.cu (kf-kernels-emu) as a [`KernelDevice`]: buffers are the
//! emulator's `DeviceBuffer`s (behind [`DeviceBuf`]), launches go through its `launch`, and
//! the GEMM — cuBLAS's job on a GPU — is the engine's CPU GEMM ([`crate::gemm::gemm`], f32)
//! run directly on the emulator's host memory, with alpha and beta applied as cuBLAS does
//! (beta = 0: C is not read).

use crate::kernel_device::{DeviceBuf, DeviceMemory, GemmSpec, KArg, KernelDevice, LaunchConfig};
use anyhow::{ensure, Context, Result};
use kf_kernels_emu::{launch, Arg, DeviceBuffer};

/// The CPU emulator of kernels/*.cu as a kernel device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Emu;

/// What the emulator was asked to do on this thread since [`reset_counts`]: the host-side
/// traffic a GPU would pay for (launches, device copies, uploads, downloads, allocations),
/// so tests can bound a decode step's overhead without a GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Kernel launches, GEMMs included (cuBLAS launches on a GPU).
    pub launches: u64,
    /// Device-to-device copies (a cudaMemcpy each).
    pub copies: u64,
    /// Host-to-device uploads.
    pub uploads: u64,
    /// Device-to-host downloads (each a sync on a GPU).
    pub downloads: u64,
    /// Buffer allocations.
    pub allocs: u64,
    /// Launches per entry point (GEMMs as "gemm").
    pub by_entry: std::collections::BTreeMap<String, u64>,
    /// With [`trace`] on: every launch (its entry point), copy ("copy"), upload ("upload") and
    /// download ("download") in order.
    pub trace: Option<Vec<String>>,
}

thread_local! {
    static COUNTS: std::cell::RefCell<Counts> = std::cell::RefCell::new(Counts::default());
}

fn count(f: impl FnOnce(&mut Counts)) {
    COUNTS.with(|c| f(&mut c.borrow_mut()));
}

/// The counts of this thread's emulator calls since the last [`reset_counts`].
pub fn counts() -> Counts {
    COUNTS.with(|c| c.borrow().clone())
}

/// Zeroes this thread's counts (and empties the trace, keeping it on or off).
pub fn reset_counts() {
    count(|c| {
        let on = c.trace.is_some();
        *c = Counts::default();
        c.trace = on.then(Vec::new);
    });
}

/// Records (or stops recording) this thread's calls in order in [`Counts::trace`]; off by
/// default, as a long emulated run would grow it without bound.
pub fn trace(on: bool) {
    count(|c| c.trace = on.then(Vec::new));
}

fn count_launch(entry: &str) {
    count(|c| {
        c.launches += 1;
        *c.by_entry.entry(entry.to_string()).or_default() += 1;
        if let Some(t) = &mut c.trace {
            t.push(entry.to_string());
        }
    });
}

fn count_transfer(what: &str, f: impl FnOnce(&mut Counts)) {
    count(|c| {
        f(c);
        if let Some(t) = &mut c.trace {
            t.push(what.to_string());
        }
    });
}

fn range_in(what: &str, off: usize, bytes: usize, b: &DeviceBuffer) -> Result<()> {
    ensure!(
        off.checked_add(bytes).is_some_and(|e| e <= b.len_bytes()),
        "emu copy: {what} range {off}..{} outside {b:?}",
        off.saturating_add(bytes)
    );
    Ok(())
}

impl DeviceMemory for DeviceBuffer {
    fn bytes(&self) -> usize {
        self.len_bytes()
    }
    fn backend(&self) -> &'static str {
        "emu"
    }
}

impl KernelDevice for Emu {
    fn name(&self) -> String {
        "emu".into()
    }
    fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceBuf> {
        count(|c| c.allocs += 1);
        Ok(DeviceBuf::new(DeviceBuffer::zeros::<u8>(bytes)))
    }
    fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        count(|c| c.allocs += 1);
        Ok(DeviceBuf::new(DeviceBuffer::uninit(bytes)))
    }
    fn upload(&self, data: &[u8]) -> Result<DeviceBuf> {
        count_transfer("upload", |c| c.uploads += 1);
        Ok(DeviceBuf::new(DeviceBuffer::from_slice(data)))
    }
    fn download(&self, buf: &DeviceBuf) -> Result<Vec<u8>> {
        count_transfer("download", |c| c.downloads += 1);
        Ok(buf.get::<DeviceBuffer>()?.to_vec::<u8>())
    }
    fn copy(
        &self,
        src: &DeviceBuf,
        src_off: usize,
        dst: &DeviceBuf,
        dst_off: usize,
        bytes: usize,
    ) -> Result<()> {
        count_transfer("copy", |c| c.copies += 1);
        let (src, dst) = (src.get::<DeviceBuffer>()?, dst.get::<DeviceBuffer>()?);
        range_in("source", src_off, bytes, src)?;
        range_in("destination", dst_off, bytes, dst)?;
        if std::ptr::eq(src, dst) {
            ensure!(
                src_off + bytes <= dst_off || dst_off + bytes <= src_off,
                "emu copy: overlapping ranges in {src:?}"
            );
        }
        // SAFETY: both ranges lie inside their allocations (checked above) and do not overlap
        // (distinct allocations, or disjoint ranges of one); nothing else runs on them now.
        unsafe { std::ptr::copy(src.as_ptr().add(src_off), dst.as_ptr().add(dst_off), bytes) };
        Ok(())
    }
    fn launch(&self, entry: &str, cfg: LaunchConfig, args: &[KArg<'_>]) -> Result<()> {
        count_launch(entry);
        let args = args
            .iter()
            .map(|a| {
                Ok(match *a {
                    KArg::Buf(b) => Arg::Buf(b.get::<DeviceBuffer>()?),
                    KArg::Null => Arg::Null,
                    KArg::I32(v) => Arg::I32(v),
                    KArg::U32(v) => Arg::U32(v),
                    KArg::U64(v) => Arg::U64(v),
                    KArg::F32(v) => Arg::F32(v),
                    KArg::F64(v) => Arg::F64(v),
                })
            })
            .collect::<Result<Vec<Arg<'_>>>>()
            .with_context(|| format!("arguments of {entry}"))?;
        launch(entry, cfg, &args).with_context(|| format!("emulated launch of {entry}"))
    }
    fn gemm(&self, s: &GemmSpec, a: &DeviceBuf, b: &DeviceBuf, c: &DeviceBuf) -> Result<()> {
        count_launch("gemm");
        let (a, b, c) = (
            a.get::<DeviceBuffer>()?,
            b.get::<DeviceBuffer>()?,
            c.get::<DeviceBuffer>()?,
        );
        let len = |x: &DeviceBuffer| x.len_bytes() / 4;
        s.check(len(a), len(b), len(c))?;
        ensure!(
            !std::ptr::eq(a, c) && !std::ptr::eq(b, c),
            "emu gemm: C shares its buffer with A or B"
        );
        // SAFETY: the three buffers are live allocations of at least len(x) f32 each (4-byte
        // aligned host allocations of the emulator); C is a different allocation than A and B
        // (checked above), so the mutable slice aliases neither shared one.
        let (a, b, c) = unsafe {
            (
                std::slice::from_raw_parts(a.as_ptr() as *const f32, len(a)),
                std::slice::from_raw_parts(b.as_ptr() as *const f32, len(b)),
                std::slice::from_raw_parts_mut(c.as_ptr() as *mut f32, len(c)),
            )
        };
        // (row stride, column stride) of op(A) m x k and op(B) k x n
        let (a_rs, a_cs) = if s.trans_a { (1, s.lda) } else { (s.lda, 1) };
        let (b_rs, b_cs) = if s.trans_b { (1, s.ldb) } else { (s.ldb, 1) };
        let mut tmp = vec![];
        for i in 0..s.batch {
            let (ao, bo, co) = (
                s.a_off + i * s.stride_a,
                s.b_off + i * s.stride_b,
                s.c_off + i * s.stride_c,
            );
            let (a, b) = (&a[ao.min(a.len())..], &b[bo.min(b.len())..]);
            let cl = c.len();
            let c = &mut c[co.min(cl)..];
            let plain = s.alpha == 1.0 && (s.beta == 0.0 || s.beta == 1.0);
            if plain {
                crate::gemm::gemm(
                    s.m,
                    s.n,
                    s.k,
                    a,
                    a_rs,
                    a_cs,
                    b,
                    b_rs,
                    b_cs,
                    c,
                    s.ldc,
                    1,
                    s.beta == 1.0,
                )?;
            } else {
                tmp.resize(s.m * s.n, 0.0f32);
                crate::gemm::gemm(
                    s.m, s.n, s.k, a, a_rs, a_cs, b, b_rs, b_cs, &mut tmp, s.n, 1, false,
                )?;
                for r in 0..s.m {
                    for j in 0..s.n {
                        let o = &mut c[r * s.ldc + j];
                        let prod = s.alpha * tmp[r * s.n + j];
                        *o = if s.beta == 0.0 {
                            prod
                        } else {
                            prod + s.beta * *o
                        };
                    }
                }
            }
        }
        Ok(())
    }
}
