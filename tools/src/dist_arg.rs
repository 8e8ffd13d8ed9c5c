//! `--distributed` and `--collective-timeout` of `kfrun train` and `kfrun distill`: joins the
//! ranks an MPI launcher started (`mpirun -n N kfrun train ...`) into one data-parallel run
//! (kf_engine::dist), or refuses with one clear error when that cannot work.

use anyhow::Result;
use clap::Args;
use kf_engine::dist::{self, Backend, Timeout};
use kf_model::train::SharedCollective;
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct DistArgs {
    /// Data parallelism: auto (MPI when started by `mpirun -n N` with N > 1, else one
    /// process), none, mpi, or nccl (GPUs, bootstrapped over MPI; `--device cuda` then means
    /// each rank's own GPU). Every rank must see the same input files and --out (one host or
    /// a shared filesystem); rank 0 alone writes. The result equals one process with the same
    /// config, bit for bit; grad_accum must be a multiple of the number of ranks (each rank
    /// computes whole micro-batches).
    #[arg(long, default_value = "auto")]
    pub distributed: String,
    /// Seconds a rank waits for another in a collective before it ends the run with an
    /// error naming the silent rank (it died or hangs).
    #[arg(long, default_value_t = 300.0)]
    pub collective_timeout: f64,
}

/// What `kfrun train` and `kfrun distill` start from: the collective (None: one process),
/// this rank, its device and its progress display (silent but on rank 0).
pub struct RunSetup {
    pub comm: Option<SharedCollective>,
    pub rank: usize,
    pub device: kf_engine::Device,
    pub progress: crate::progress::RunProgress,
}

impl DistArgs {
    /// Joins the ranks (if any), picks this rank's device from `--device`, and opens the
    /// progress display; `out` is named in the data-parallel banner.
    pub fn setup(&self, device: &str, resume: bool, out: &std::path::Path) -> Result<RunSetup> {
        let comm = self.connect()?;
        let (rank, ranks) = rank_size(&comm)?;
        let device = crate::device_arg::select_device(&rank_device(device, &comm)?)?;
        let progress = crate::progress::RunProgress::new(resume).silent(rank > 0);
        if ranks > 1 {
            progress.say(format!(
                "data parallel over {ranks} ranks ({}); rank 0 writes {}",
                self.distributed,
                out.display()
            ));
        }
        Ok(RunSetup {
            comm,
            rank,
            device,
            progress,
        })
    }

    /// The collective of this process, or None for a single-process run.
    pub fn connect(&self) -> Result<Option<SharedCollective>> {
        let backend: Backend = self.distributed.parse()?;
        anyhow::ensure!(
            self.collective_timeout.is_finite() && self.collective_timeout > 0.0,
            "--collective-timeout must be a positive number of seconds, got {}",
            self.collective_timeout
        );
        let t = Timeout(Duration::from_secs_f64(self.collective_timeout));
        Ok(dist::connect(backend, t)?.map(SharedCollective::new))
    }
}

/// The `--device` of this rank: under NCCL a bare `cuda` means the rank's own GPU (the one
/// its collective runs on); an explicit `cuda:N` must be that GPU.
pub fn rank_device(flag: &str, comm: &Option<SharedCollective>) -> Result<String> {
    let Some(ord) = comm
        .as_ref()
        .map(|c| c.lock().map(|c| c.cuda_ordinal()))
        .transpose()?
        .flatten()
    else {
        return Ok(flag.to_string());
    };
    match flag {
        "cuda" => Ok(format!("cuda:{ord}")),
        f if f == format!("cuda:{ord}") => Ok(f.to_string()),
        f => anyhow::bail!(
            "--device {f}: this rank's NCCL communicator is on cuda:{ord}; use --device cuda (each rank then takes its own GPU)"
        ),
    }
}

/// (rank, size) of `comm` ((0, 1) without one).
pub fn rank_size(comm: &Option<SharedCollective>) -> Result<(usize, usize)> {
    match comm {
        None => Ok((0, 1)),
        Some(c) => {
            let c = c.lock()?;
            Ok((c.rank(), c.size()))
        }
    }
}
