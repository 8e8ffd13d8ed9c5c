//! The NCCL backend of [`Collective`] (`--features nccl`), for ranks that each drive one GPU.
//! It bootstraps over the MPI backend (rank, size, and NCCL's unique id broadcast from rank 0)
//! and moves the gradient sum over NCCL point-to-point transfers (NVLink, InfiniBand, ...).
//!
//! * `sum_ordered` keeps the determinism contract, which NCCL's all-reduce does not (its
//!   reduction order depends on the ring/tree it picks): the same pipelined chain as the MPI
//!   backend — rank r receives rank r-1's partial sum chunk by chunk (`ncclRecv`), adds its
//!   own parts in order, and passes it on (`ncclSend`); the last rank's result is then
//!   broadcast (`ncclBroadcast`, which copies values and so cannot change them).
//! * `broadcast`, `all_gather`, `barrier`: delegated to the MPI collective (small messages).
//! * Deadlines: every wait on the GPU stream polls it (and NCCL's asynchronous error) until the
//!   [`Timeout`]; past it the NCCL communicator is aborted and the error names the peer. The
//!   communicator's creation has the same deadline.
//! * Nothing panics for a missing piece: libnccl and the CUDA driver are probed with
//!   libloading before cudarc touches them (cudarc's dynamic loading panics on a missing
//!   library or symbol), and every rank's setup outcome is exchanged over MPI first, so a rank
//!   without a GPU makes every rank fail with the same sentence instead of leaving its peers
//!   hanging in `ncclCommInitRank`.

use super::mpi::MpiCollective;
use super::{add_into, backoff, Collective, Timeout};
use crate::cuda::{check_driver, driver_error_text, CudaDevice};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::{result as nccl, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Instant;

/// Elements per transfer of the chain and of the final broadcast (4 MiB of f32), and the size
/// of the one device staging buffer.
const CHUNK: usize = 1 << 20;
const F32: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;

/// libnccl entry points this backend calls (ncclSend/ncclRecv need NCCL 2.7 or newer).
const NCCL_SYMBOLS: &[&str] = &[
    "ncclGetVersion",
    "ncclGetErrorString",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommAbort",
    "ncclCommGetAsyncError",
    "ncclSend",
    "ncclRecv",
    "ncclBroadcast",
];

/// Driver entry points this backend reaches beyond those of the device layer's probe
/// (`crate::cuda::DRIVER_SYMBOLS`): the stream query of the deadline, and what cudarc's
/// `CudaSlice` uses (stream-ordered allocation, its usage events).
const EXTRA_DRIVER_SYMBOLS: &[&str] = &[
    "cuStreamQuery",
    "cuDeviceGetUuid",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventDestroy_v2",
    "cuStreamWaitEvent",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
];

/// Open the first of cudarc's candidate names for `lib` that loads and check that it exports
/// `symbols`: Ok(file name), or Err(None) when no candidate loads, Err(Some(sentence)) for a
/// missing symbol.
fn probe_symbols(lib: &str, what: &str, symbols: &[&str]) -> Result<String, Option<String>> {
    for name in cudarc::get_lib_name_candidates(lib) {
        // SAFETY: loading runs the library's initialisers; this is the library cudarc would
        // load under the same name a moment later.
        let Ok(handle) = (unsafe { libloading::Library::new(&name) }) else {
            continue;
        };
        for sym in symbols {
            // SAFETY: only the address is looked up, never called through this type.
            if unsafe { handle.get::<*const ()>(sym.as_bytes()) }.is_err() {
                return Err(Some(format!(
                    "the {what} library {name} has no {sym} (too old)"
                )));
            }
        }
        return Ok(name);
    }
    Err(None)
}

/// Ok (the library's file name) when libnccl loads under a name cudarc opens and has every
/// symbol this backend calls; else one sentence saying what is missing and how to fix it.
pub fn check_library() -> Result<String> {
    static NCCL: OnceLock<Result<String, String>> = OnceLock::new();
    let probed = NCCL.get_or_init(|| {
        probe_symbols("nccl", "NCCL", NCCL_SYMBOLS).map_err(|e| {
            e.unwrap_or_else(|| {
                let (pre, suf) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
                let plain = format!("{pre}nccl{suf}");
                // NCCL's soname; cudarc's candidate names do not include it
                let soname = format!("{plain}.2");
                // SAFETY: as in probe_symbols (NCCL's own initialisers).
                if unsafe { libloading::Library::new(&soname) }.is_ok() {
                    format!(
                        "the NCCL library is installed as {soname} but cudarc opens it as {plain}: \
                         install the NCCL development package (libnccl-dev) or put a symlink \
                         {plain} -> {soname} in a directory on LD_LIBRARY_PATH"
                    )
                } else {
                    format!(
                        "the NCCL library was not found (looked for {plain} and {soname} on the loader's path): \
                         install NCCL (libnccl2 and libnccl-dev, or the nvidia-nccl-cu12 wheel with a {plain} \
                         symlink) or put its lib directory on LD_LIBRARY_PATH"
                    )
                }
            })
        })
    });
    match probed {
        Ok(name) => Ok(name.clone()),
        Err(e) => bail!("{e}"),
    }
}

/// The CUDA driver symbols beyond the device layer's probe (see [`EXTRA_DRIVER_SYMBOLS`]).
fn check_driver_extras() -> Result<()> {
    static EXTRAS: OnceLock<Result<(), String>> = OnceLock::new();
    let probed = EXTRAS.get_or_init(|| {
        probe_symbols("cuda", "CUDA driver", EXTRA_DRIVER_SYMBOLS)
            .map(|_| ())
            .map_err(|e| e.unwrap_or_else(|| "the CUDA driver library was not found".into()))
    });
    match probed {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

/// An NCCL result code with NCCL's own description of it.
fn nccl_text(e: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString (probed) returns a pointer to a static string for any code.
    let p = unsafe { sys::ncclGetErrorString(e) };
    if p.is_null() {
        format!("{e:?}")
    } else {
        // SAFETY: non-null and NUL-terminated, static in libnccl.
        let s = unsafe { CStr::from_ptr(p) };
        format!("{e:?} ({})", s.to_string_lossy())
    }
}

/// The NCCL result code `c` as the binding's enum, for the codes every NCCL since 2.7 uses
/// the same way (None for others: an out-of-range enum value would be undefined behaviour).
fn known_result(c: u32) -> Option<sys::ncclResult_t> {
    use sys::ncclResult_t::*;
    Some(match c {
        0 => ncclSuccess,
        1 => ncclUnhandledCudaError,
        2 => ncclSystemError,
        3 => ncclInternalError,
        4 => ncclInvalidArgument,
        5 => ncclInvalidUsage,
        6 => ncclRemoteError,
        7 => ncclInProgress,
        _ => return None,
    })
}

/// `Result<T, DriverError>` -> anyhow naming what was attempted.
fn drv<T>(r: Result<T, DriverError>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| anyhow!("{}: {}", what(), driver_error_text(e)))
}

/// `Result<T, NcclError>` -> anyhow naming what was attempted.
fn nccl_ok<T>(r: Result<T, nccl::NcclError>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| anyhow!("{}: {}", what(), nccl_text(e.0)))
}

/// Run `f`, turning a panic (cudarc on a library or symbol the probes did not foresee) into
/// an error.
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        bail!("{what} failed inside cudarc: {msg}")
    })
}

/// The GPU of this rank: its local rank on the host as the launcher tells it (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK`/`_LOCAL_SIZE`, MPICH's `MPI_LOCALRANKID`/`MPI_LOCALNRANKS`),
/// else the world rank modulo the device count. More local ranks than GPUs is an error, unless
/// `CUDA_VISIBLE_DEVICES` is set (`isolated`: a launcher may show each rank its own GPU as
/// cuda:0). Where two ranks could still land on one GPU, `init` finds it by the GPUs' UUIDs.
/// Pure, for the tests: `local` is (local rank, local size if known).
fn choose_ordinal(
    rank: usize,
    gpus: usize,
    local: Option<(usize, Option<usize>)>,
    isolated: bool,
) -> Result<usize> {
    ensure!(
        gpus > 0,
        "no CUDA device: the driver is installed but sees no GPU"
    );
    match local {
        Some((lr, ls)) => {
            let ranks = ls.unwrap_or(lr + 1).max(lr + 1);
            ensure!(
                ranks <= gpus || isolated,
                "this host runs {ranks} ranks but has only {gpus} CUDA device(s) (local rank {lr} has none): \
                 NCCL needs one GPU per rank, so start at most {gpus} rank(s) per host"
            );
            Ok(lr % gpus)
        }
        None => Ok(rank % gpus),
    }
}

/// (local rank, local size) from the launcher's environment.
fn local_rank_env() -> Option<(usize, Option<usize>)> {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    [
        ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ]
    .into_iter()
    .find_map(|(r, s)| get(r).map(|lr| (lr, get(s))))
}

/// An NCCL communicator handle, aborted at most once (then null).
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it run
// at once; it is only reached through `&mut NcclCollective` (or, before that exists, by the
// one thread that created it).
unsafe impl Send for RawComm {}

impl RawComm {
    /// ncclCommAbort: frees this rank's resources and ends its in-flight operations without
    /// waiting for any peer (ncclCommDestroy may wait for operations a dead peer never
    /// completes). Used for every teardown: every operation of this backend has been waited
    /// for, or has failed, when it runs.
    fn abort(&mut self) {
        let c = std::mem::replace(&mut self.0, std::ptr::null_mut());
        if !c.is_null() {
            // SAFETY: `c` is a communicator from ncclCommInitRank, aborted only here, once
            // (the handle is null afterwards).
            let _ = unsafe { nccl::comm_abort(c) };
        }
    }
}

/// This rank's CUDA side, opened before the ranks agree to create the communicator.
struct Local {
    ordinal: usize,
    /// The GPU's UUID in hex (two ranks on one GPU is an error).
    uuid: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    buf: CudaSlice<f32>,
    /// NCCL's unique id (rank 0 only).
    id: Option<sys::ncclUniqueId>,
}

impl Local {
    fn open(rank: usize) -> Result<Local> {
        // what is missing, all of it at once
        let mut missing = Vec::new();
        let gpus = check_driver()
            .and_then(|_| check_driver_extras())
            .and_then(|_| CudaDevice::count())
            .and_then(|n| {
                ensure!(
                    n > 0,
                    "no CUDA device: the driver is installed but sees no GPU"
                );
                Ok(n)
            });
        let gpus = gpus.unwrap_or_else(|e| {
            missing.push(format!("{e:#}"));
            0
        });
        if let Err(e) = check_library() {
            missing.push(format!("{e:#}"));
        }
        if !missing.is_empty() {
            bail!("{}", missing.join(". Also, "));
        }
        let isolated = std::env::var_os("CUDA_VISIBLE_DEVICES").is_some();
        let ordinal = choose_ordinal(rank, gpus, local_rank_env(), isolated)?;
        let ctx = drv(CudaContext::new(ordinal), || {
            format!("opening cuda:{ordinal}")
        })?;
        let uuid = drv(ctx.uuid(), || format!("the UUID of cuda:{ordinal}"))?;
        let uuid: String = uuid
            .bytes
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
            .collect();
        let stream = drv(ctx.new_stream(), || {
            format!("creating a stream on cuda:{ordinal}")
        })?;
        let buf = drv(stream.alloc_zeros::<f32>(CHUNK), || {
            format!(
                "allocating the NCCL staging buffer ({} MiB) on cuda:{ordinal}",
                (CHUNK * 4) >> 20
            )
        })?;
        let id = if rank == 0 {
            Some(nccl_ok(nccl::get_uniqueid(), || "ncclGetUniqueId".into())?)
        } else {
            None
        };
        Ok(Local {
            ordinal,
            uuid,
            ctx,
            stream,
            buf,
            id,
        })
    }
}

/// One rank of an NCCL world: one GPU, one stream, one communicator, and the MPI collective
/// it was bootstrapped over.
pub struct NcclCollective {
    comm: RawComm,
    /// The staging buffer of the chain; None once leaked after a timeout (a kernel NCCL could
    /// not stop may still write it).
    buf: Option<CudaSlice<f32>>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Dropped (MPI_Finalize) after the NCCL communicator is gone.
    mpi: Option<MpiCollective>,
    rank: usize,
    size: usize,
    ordinal: usize,
    timeout: Timeout,
    broken: bool,
}

impl NcclCollective {
    /// Initialises MPI, opens this rank's GPU (by local rank) and creates the NCCL
    /// communicator. Every missing piece (libnccl, the CUDA driver, a GPU, enough GPUs for
    /// the ranks on a host) is an error on every rank, with one sentence per failing rank.
    pub fn init(timeout: Timeout) -> Result<NcclCollective> {
        let mut mpi = MpiCollective::init(timeout)?;
        let (rank, size) = (mpi.rank(), mpi.size());
        let host = ::mpi::environment::processor_name().unwrap_or_else(|_| "?".into());
        let local = no_panic("opening the GPU for NCCL", || Local::open(rank));

        // Every rank's outcome, so that no rank goes on to ncclCommInitRank (which waits for
        // all ranks, with no timeout) while another has failed.
        let status = match &local {
            Ok(l) => format!("ok\n{}\n{host}\n{}", l.uuid, l.ordinal),
            Err(e) => format!("err\n{e:#}"),
        };
        let all = match mpi.all_gather(status.as_bytes()) {
            Ok(all) => all,
            Err(e) => return Err(abandon(mpi, e.context("exchanging the NCCL setup status"))),
        };
        let mut failed = Vec::new();
        let mut errs: Vec<(usize, String)> = Vec::new();
        // GPU UUID -> the first rank on it
        let mut placed: HashMap<String, usize> = HashMap::new();
        for (q, s) in all.iter().enumerate() {
            let s = String::from_utf8_lossy(s);
            match s.split_once('\n') {
                Some(("ok", rest)) => {
                    let mut f = rest.splitn(3, '\n');
                    let uuid = f.next().unwrap_or("?");
                    let (h, o) = (f.next().unwrap_or("?"), f.next().unwrap_or("?"));
                    if let Some(p) = placed.insert(uuid.to_string(), q) {
                        failed.push(format!(
                            "ranks {p} and {q} on host {h} both chose the same GPU (cuda:{o} of rank {q}, UUID {uuid}): \
                             NCCL needs one GPU per rank; launch with mpirun (it sets OMPI_COMM_WORLD_LOCAL_RANK) \
                             or start fewer ranks per host"
                        ));
                    }
                }
                Some(("err", msg)) => errs.push((q, msg.to_string())),
                _ => errs.push((q, "an unreadable setup status".into())),
            }
        }
        // ranks failing the same way are named together ("ranks 0, 1: ...")
        while let Some((_, msg)) = errs.first().cloned() {
            let (same, rest): (Vec<_>, Vec<_>) = errs.into_iter().partition(|(_, m)| *m == msg);
            let who: Vec<String> = same.iter().map(|(q, _)| q.to_string()).collect();
            let s = if who.len() == 1 { "" } else { "s" };
            failed.push(format!("rank{s} {}: {msg}", who.join(", ")));
            errs = rest;
        }
        if !failed.is_empty() {
            bail!(
                "the NCCL backend could not start (this is rank {rank} of {size}): {}",
                failed.join("; ")
            );
        }
        let local = local?;

        let mut id = match local.id {
            Some(id) => id.internal.iter().map(|&c| c as u8).collect(),
            None => Vec::new(),
        };
        if let Err(e) = mpi.broadcast(0, &mut id) {
            return Err(abandon(
                mpi,
                e.context("receiving NCCL's unique id from rank 0"),
            ));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        if id.len() != internal.len() {
            let e = anyhow!(
                "rank {rank}: NCCL's unique id from rank 0 has {} bytes, not 128",
                id.len()
            );
            return Err(abandon(mpi, e));
        }
        for (d, s) in internal.iter_mut().zip(&id) {
            *d = *s as std::ffi::c_char;
        }
        let comm = match create_comm(
            &local.ctx,
            rank,
            size,
            sys::ncclUniqueId { internal },
            timeout,
        ) {
            Ok(c) => c,
            Err(e) => return Err(abandon(mpi, e)),
        };
        Ok(NcclCollective {
            comm,
            buf: Some(local.buf),
            stream: local.stream,
            ctx: local.ctx,
            mpi: Some(mpi),
            rank,
            size,
            ordinal: local.ordinal,
            timeout,
            broken: false,
        })
    }

    /// The CUDA device this rank's NCCL traffic runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn live(&self) -> Result<()> {
        ensure!(
            !self.broken,
            "the NCCL communicator of rank {} is broken by an earlier failure",
            self.rank
        );
        Ok(())
    }

    fn mpi(&mut self) -> Result<&mut MpiCollective> {
        self.live()?;
        self.mpi
            .as_mut()
            .ok_or_else(|| anyhow!("the MPI collective under NCCL is gone"))
    }

    /// Marks the collective broken: aborts the communicator now (its kernels stop) and leaks
    /// the staging buffer (a kernel may still hold it).
    fn fail(&mut self) {
        self.broken = true;
        self.comm.abort();
        if let Some(b) = self.buf.take() {
            std::mem::forget(b);
        }
    }

    /// Waits (with the deadline) until the stream has run everything queued on it.
    /// `what` names the operation ("receiving from rank 2"), `blame` who stalls it.
    fn wait(&mut self, what: &dyn Fn() -> String, blame: &dyn Fn() -> String) -> Result<()> {
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: the stream belongs to self.ctx and lives as long as self.
            let q = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            match q {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                e => {
                    self.fail();
                    bail!(
                        "rank {}: {} failed on cuda:{}: {}",
                        self.rank,
                        what(),
                        self.ordinal,
                        driver_error_text(DriverError(e))
                    );
                }
            }
            if let Some(e) = self.async_error() {
                self.fail();
                bail!(
                    "rank {}: {} failed: NCCL reports {e} ({} died or its connection broke?)",
                    self.rank,
                    what(),
                    blame()
                );
            }
            if t0.elapsed() > self.timeout.0 {
                self.fail();
                bail!(
                    "rank {}: {} did not complete within the collective timeout ({} s): \
                     {} died or hangs (--collective-timeout sets the limit)",
                    self.rank,
                    what(),
                    self.timeout.0.as_secs(),
                    blame()
                );
            }
            backoff(&mut spins);
        }
    }

    /// NCCL's asynchronous error of the communicator (a peer's network failure), if any.
    fn async_error(&self) -> Option<String> {
        if self.comm.0.is_null() {
            return None;
        }
        // read as a plain integer: a code this binding does not know must not become an
        // invalid enum value
        let mut code: u32 = 0;
        // SAFETY: a live communicator; NCCL writes one ncclResult_t (a C enum, 32 bits).
        let r = unsafe {
            sys::ncclCommGetAsyncError(self.comm.0, &mut code as *mut u32 as *mut sys::ncclResult_t)
        };
        if r != sys::ncclResult_t::ncclSuccess {
            return Some(format!("{} querying its state", nccl_text(r)));
        }
        match code {
            0 => None,                                                  // ncclSuccess
            c if c == sys::ncclResult_t::ncclInProgress as u32 => None, // still connecting
            c => Some(match known_result(c) {
                Some(r) => nccl_text(r),
                None => format!("error code {c}"),
            }),
        }
    }

    /// The raw stream for NCCL (its own `cudaStream_t` type, the same handle).
    fn nccl_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Receives `len` f32 from `from` into the staging buffer, then copies them to `out`.
    fn recv_chunk(&mut self, from: usize, out: &mut [f32]) -> Result<()> {
        let len = out.len();
        let (comm, stream) = (self.comm.0, self.nccl_stream());
        let buf = self
            .buf
            .as_mut()
            .ok_or_else(|| anyhow!("NCCL staging buffer gone"))?;
        let r = {
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` is a live device allocation of CHUNK >= len f32 on the
            // communicator's device; the receive is ordered on self.stream, and the host
            // touches the buffer only after `wait` saw the stream drain.
            unsafe { nccl::recv(ptr as *mut c_void, len, F32, from as i32, comm, stream) }
        };
        if let Err(e) = r {
            self.fail();
            bail!(
                "rank {}: ncclRecv from rank {from}: {}",
                self.rank,
                nccl_text(e.0)
            );
        }
        self.wait(&|| format!("receiving from rank {from}"), &|| {
            format!("rank {from}")
        })?;
        self.download(out)
    }

    /// Copies `src` into the staging buffer and sends it to `to`.
    fn send_chunk(&mut self, to: usize, src: &[f32]) -> Result<()> {
        self.upload(src)?;
        let (comm, stream) = (self.comm.0, self.nccl_stream());
        let buf = self
            .buf
            .as_ref()
            .ok_or_else(|| anyhow!("NCCL staging buffer gone"))?;
        let r = {
            let (ptr, _record) = buf.device_ptr(&self.stream);
            // SAFETY: as in recv_chunk; the upload before it is ordered on the same stream.
            unsafe {
                nccl::send(
                    ptr as *const c_void,
                    src.len(),
                    F32,
                    to as i32,
                    comm,
                    stream,
                )
            }
        };
        if let Err(e) = r {
            self.fail();
            bail!(
                "rank {}: ncclSend to rank {to}: {}",
                self.rank,
                nccl_text(e.0)
            );
        }
        self.wait(&|| format!("sending to rank {to}"), &|| {
            format!("rank {to}")
        })
    }

    /// Broadcasts `data` (same length on every rank) from `root` through the staging buffer.
    fn broadcast_chunk(&mut self, root: usize, data: &mut [f32]) -> Result<()> {
        if self.rank == root {
            self.upload(data)?;
        }
        let (comm, stream) = (self.comm.0, self.nccl_stream());
        let buf = self
            .buf
            .as_mut()
            .ok_or_else(|| anyhow!("NCCL staging buffer gone"))?;
        let r = {
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: as in recv_chunk; in place (send and receive buffer the same, which
            // ncclBroadcast allows).
            unsafe {
                nccl::broadcast(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    data.len(),
                    F32,
                    root as i32,
                    comm,
                    stream,
                )
            }
        };
        if let Err(e) = r {
            self.fail();
            bail!(
                "rank {}: ncclBroadcast from rank {root}: {}",
                self.rank,
                nccl_text(e.0)
            );
        }
        self.wait(
            &|| format!("the broadcast of the sum from rank {root}"),
            &|| "a rank".to_string(),
        )?;
        if self.rank != root {
            self.download(data)?;
        }
        Ok(())
    }

    /// Host -> staging buffer (`src.len() <= CHUNK`), queued on the stream.
    fn upload(&mut self, src: &[f32]) -> Result<()> {
        let buf = self
            .buf
            .as_mut()
            .ok_or_else(|| anyhow!("NCCL staging buffer gone"))?;
        let mut dst = buf.slice_mut(0..src.len());
        drv(self.stream.memcpy_htod(src, &mut dst), || {
            format!(
                "copying {} bytes to cuda:{}",
                std::mem::size_of_val(src),
                self.ordinal
            )
        })
    }

    /// Staging buffer -> host (`dst.len() <= CHUNK`), waited for.
    fn download(&mut self, dst: &mut [f32]) -> Result<()> {
        let buf = self
            .buf
            .as_ref()
            .ok_or_else(|| anyhow!("NCCL staging buffer gone"))?;
        let src = buf.slice(0..dst.len());
        drv(self.stream.memcpy_dtoh(&src, dst), || {
            format!(
                "copying {} bytes from cuda:{}",
                std::mem::size_of_val(dst),
                self.ordinal
            )
        })?;
        // pageable copies return once done, but cudarc does not promise it: wait
        let ordinal = self.ordinal;
        self.wait(&|| format!("copying from cuda:{ordinal}"), &|| {
            format!("cuda:{ordinal}")
        })
    }
}

/// Gives up on MPI after a failed or timed-out exchange during `init`: no MPI_Finalize (it
/// would wait for a dead peer) and no MPI_Abort (it would end this process before the caller
/// reports `e`); the launcher ends the other ranks once this one exits without finalizing.
fn abandon(mpi: MpiCollective, e: anyhow::Error) -> anyhow::Error {
    std::mem::forget(mpi);
    e
}

/// ncclCommInitRank with the deadline: it waits for every rank without a timeout of its own,
/// so it runs on a helper thread that is left behind (blocked) if the deadline passes.
fn create_comm(
    ctx: &Arc<CudaContext>,
    rank: usize,
    size: usize,
    id: sys::ncclUniqueId,
    timeout: Timeout,
) -> Result<RawComm> {
    let ordinal = ctx.ordinal();
    let (tx, rx) = mpsc::channel::<Result<RawComm>>();
    let ctx = ctx.clone();
    let spawned = std::thread::Builder::new()
        .name("nccl-init".into())
        .spawn(move || {
            let made = no_panic("ncclCommInitRank", || {
                drv(ctx.bind_to_thread(), || {
                    format!("making cuda:{ordinal} current")
                })?;
                let mut comm: sys::ncclComm_t = std::ptr::null_mut();
                // SAFETY: `comm` receives the new handle; the id is the one rank 0 made
                // and every rank passes the same world size and its own distinct rank.
                let r = unsafe { nccl::comm_init_rank(&mut comm, size as i32, id, rank as i32) };
                nccl_ok(r, || {
                    format!("ncclCommInitRank (rank {rank} of {size}, cuda:{ordinal})")
                })?;
                Ok(RawComm(comm))
            });
            // a receiver gone after the deadline leaves the communicator unused
            let _ = tx.send(made);
        })
        .context("starting the NCCL setup thread")?;
    drop(spawned);
    match rx.recv_timeout(timeout.0) {
        Ok(made) => made,
        Err(mpsc::RecvTimeoutError::Timeout) => bail!(
            "rank {rank}: creating the NCCL communicator did not complete within the collective timeout ({} s): \
             a rank died or hangs, or NCCL cannot connect the ranks (NCCL_DEBUG=INFO says why)",
            timeout.0.as_secs()
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            bail!("rank {rank}: the NCCL setup thread ended without a result")
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn cuda_ordinal(&self) -> Option<usize> {
        Some(self.ordinal)
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    /// The chain of the MPI backend over NCCL p2p. Cost, per chunk of 4 MiB: rank 0 uploads
    /// its partial (1 host->device copy); every middle rank downloads what it received, adds
    /// its parts on the host (the contract's f32 adds, [`add_into`]: no new kernel needed)
    /// and uploads the result (2 PCIe copies); the broadcast back costs one more copy per
    /// rank. The parts live on the host anyway (the trait takes host slices), so the GPU is
    /// only the transport; each transfer is waited for before the next (exact peer in the
    /// error), as in the MPI backend. One small MPI all-gather first checks that every rank
    /// sums the same length (a mismatched NCCL receive would hang or corrupt, not fail).
    fn sum_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()> {
        self.live()?;
        super::check_parts(self.rank, parts, out)?;
        let (r, w, n) = (self.rank, self.size, out.len());
        if w > 1 {
            let lens = self.mpi()?.all_gather(&(n as u64).to_le_bytes())?;
            for (q, l) in lens.iter().enumerate() {
                let theirs = <[u8; 8]>::try_from(&l[..]).map(u64::from_le_bytes).ok();
                ensure!(
                    theirs == Some(n as u64),
                    "rank {r}: sum_ordered of {n} values, but rank {q} sums {}: the ranks disagree on the buffer \
                     (different models or configs?)",
                    theirs.map_or("an unreadable length".to_string(), |t| t.to_string())
                );
            }
            drv(self.ctx.bind_to_thread(), || {
                format!("making cuda:{} current", self.ordinal)
            })?;
        }
        let mut c0 = 0;
        while c0 < n {
            let c1 = (c0 + CHUNK).min(n);
            if r == 0 {
                out[c0..c1].copy_from_slice(&parts[0][c0..c1]);
                for p in &parts[1..] {
                    add_into(&mut out[c0..c1], &p[c0..c1]);
                }
            } else {
                self.recv_chunk(r - 1, &mut out[c0..c1])?;
                for p in parts {
                    add_into(&mut out[c0..c1], &p[c0..c1]);
                }
            }
            if r + 1 < w {
                self.send_chunk(r + 1, &out[c0..c1])?;
            }
            c0 = c1;
        }
        if w > 1 {
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + CHUNK).min(n);
                self.broadcast_chunk(w - 1, &mut out[c0..c1])?;
                c0 = c1;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.mpi()?.broadcast(root, buf)
    }

    fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.mpi()?.all_gather(bytes)
    }

    fn barrier(&mut self) -> Result<()> {
        self.mpi()?.barrier()
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // every operation was waited for (or failed and aborted it): abort frees this rank's
        // resources without a collective teardown
        let _ = self.ctx.bind_to_thread();
        self.comm.abort();
        if self.broken {
            // A peer is dead or hung: end the whole job, as the MPI backend does (the error
            // was returned to the caller, who reported it before dropping us).
            if ::mpi::environment::is_initialized() && !::mpi::environment::is_finalized() {
                use ::mpi::topology::{Communicator, SimpleCommunicator};
                SimpleCommunicator::world().abort(1);
            }
        }
        // MPI_Finalize, after NCCL is gone
        drop(self.mpi.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_is_the_local_rank_and_too_few_gpus_is_an_error() {
        assert_eq!(choose_ordinal(5, 4, Some((1, Some(4))), false).unwrap(), 1);
        assert_eq!(choose_ordinal(5, 4, None, false).unwrap(), 1);
        assert_eq!(choose_ordinal(3, 2, Some((1, None)), false).unwrap(), 1);
        let e = choose_ordinal(0, 2, Some((0, Some(3))), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runs 3 ranks but has only 2 CUDA device(s)"),
            "{e}"
        );
        let e = choose_ordinal(2, 2, Some((2, None)), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("local rank 2 has none"), "{e}");
        let e = choose_ordinal(0, 0, None, false).unwrap_err().to_string();
        assert!(e.contains("no CUDA device"), "{e}");
        // one visible GPU per rank (CUDA_VISIBLE_DEVICES set by the launcher): each uses cuda:0
        assert_eq!(choose_ordinal(3, 1, Some((1, Some(2))), true).unwrap(), 0);
        assert!(choose_ordinal(0, 0, Some((0, Some(1))), true).is_err());
    }

    #[test]
    fn a_missing_library_is_none_and_a_missing_symbol_is_named() {
        assert_eq!(
            probe_symbols("kf_no_such_library", "test", &["x"]),
            Err(None)
        );
        // zlib is found as libz.so.1 (a name on cudarc's candidate list) and has no ncclSend
        if probe_symbols("z", "zlib", &["inflate"]).is_err() {
            println!("skipped: libz.so.1 is not on this machine");
            return;
        }
        let e = probe_symbols("z", "zlib", &["inflate", "ncclSend"]).unwrap_err();
        assert!(e.is_some_and(|e| e.contains("has no ncclSend")));
    }
}
