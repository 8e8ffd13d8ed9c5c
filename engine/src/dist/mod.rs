//! Collectives for data-parallel training (issue 22): the small interface the trainer uses
//! when the process is one rank of several — an ordered sum of gradient buffers, broadcast,
//! all-gather of small messages, barrier — with two backends: MPI for CPU hosts (`--features
//! mpi`, the `mpi` crate over Open MPI or MPICH) and NCCL for GPUs (`--features nccl`, through
//! cudarc; it bootstraps over MPI).
//!
//! Determinism is the contract: [`Collective::sum_ordered`] adds the parts left to right in
//! one fixed order (rank 0's parts, then rank 1's, ...), element by element in f32, so the sum
//! is the one a single process accumulating the same parts in that order computes — bit for
//! bit, whatever the timing and whatever the world size. Every wait has a deadline
//! ([`Timeout`]): a rank that died or hangs ends its peers with one error, never a hang.

use anyhow::{bail, Result};
use std::time::Duration;

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// The collective operations of one rank.
pub trait Collective: Send {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// "mpi" or "nccl".
    fn backend(&self) -> &'static str;
    /// On every rank, `out` becomes the sum of every rank's `parts` (each as long as `out`),
    /// accumulated left to right in rank order and, within a rank, in the order given:
    /// `((r0p0 + r0p1) + r1p0) + ...`. Every rank must pass at least one part.
    fn sum_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()>;
    /// Root's `buf` replaces every other rank's (whose length need not match).
    fn broadcast(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `bytes`, in rank order (this rank's included).
    fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Returns once every rank has called it (within the timeout).
    fn barrier(&mut self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
    /// The GPU this rank's collective runs on (NCCL), where the rank's model belongs too.
    fn cuda_ordinal(&self) -> Option<usize> {
        None
    }
}

/// A boxed collective, as the trainer holds it.
pub type BoxCollective = Box<dyn Collective>;

/// How long one collective waits for a peer before it gives up with an error: long enough for
/// the slowest rank's step, validation and rank 0's checkpoint write in between.
#[derive(Clone, Copy, Debug)]
pub struct Timeout(pub Duration);

impl Default for Timeout {
    fn default() -> Self {
        Timeout(Duration::from_secs(300))
    }
}

/// Which collective backend to use (`--distributed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// MPI when the process was launched as one rank of several (`mpirun -n N`), else none.
    Auto,
    /// One process, even under a launcher (refused when the launcher started several).
    None,
    Mpi,
    Nccl,
}

impl std::str::FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Backend::Auto,
            "none" => Backend::None,
            "mpi" => Backend::Mpi,
            "nccl" => Backend::Nccl,
            _ => bail!("unknown --distributed {s:?}: expected auto, none, mpi or nccl"),
        })
    }
}

/// The (rank, size) an MPI launcher put in the environment (Open MPI's `OMPI_COMM_WORLD_*`,
/// MPICH/Hydra's `PMI_*`), if any.
pub fn launcher_env() -> Option<(usize, usize)> {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    for (r, s) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "OMPI_UNIVERSE_SIZE"),
    ] {
        if let (Some(r), Some(s)) = (get(r), get(s)) {
            return Some((r, s));
        }
    }
    None
}

/// The collective of this process for `backend`, or `None` for a single-process run.
/// Errors say what is missing (a build without the feature, a launcher that started several
/// ranks with `--distributed none`).
pub fn connect(backend: Backend, timeout: Timeout) -> Result<Option<BoxCollective>> {
    let launched = launcher_env();
    let several = launched.is_some_and(|(_, s)| s > 1);
    match backend {
        Backend::None => {
            if let Some((r, s)) = launched.filter(|_| several) {
                bail!(
                    "this process is rank {r} of {s} started by an MPI launcher, but --distributed none runs one process: \
                     drop --distributed (or use mpi) so the ranks train together instead of overwriting one another's output"
                );
            }
            Ok(None)
        }
        Backend::Auto if !several => Ok(None),
        Backend::Auto | Backend::Mpi => mpi_connect(timeout, launched),
        Backend::Nccl => nccl_connect(timeout, launched),
    }
}

#[cfg(feature = "mpi")]
fn mpi_connect(
    timeout: Timeout,
    _launched: Option<(usize, usize)>,
) -> Result<Option<BoxCollective>> {
    Ok(Some(Box::new(mpi::MpiCollective::init(timeout)?)))
}

#[cfg(not(feature = "mpi"))]
fn mpi_connect(
    _timeout: Timeout,
    launched: Option<(usize, usize)>,
) -> Result<Option<BoxCollective>> {
    let who = match launched {
        Some((r, s)) => format!("this process is rank {r} of {s} started by an MPI launcher, but "),
        None => String::new(),
    };
    bail!(
        "{who}this kfrun was built without MPI support: install Open MPI (Debian: libopenmpi-dev openmpi-bin libclang-dev) \
         and build with `cargo build --release -p kf-tools --features mpi`"
    )
}

#[cfg(feature = "nccl")]
fn nccl_connect(
    timeout: Timeout,
    _launched: Option<(usize, usize)>,
) -> Result<Option<BoxCollective>> {
    Ok(Some(Box::new(nccl::NcclCollective::init(timeout)?)))
}

#[cfg(not(feature = "nccl"))]
fn nccl_connect(
    _timeout: Timeout,
    _launched: Option<(usize, usize)>,
) -> Result<Option<BoxCollective>> {
    bail!(
        "--distributed nccl: this kfrun was built without NCCL support: build with \
         `cargo build --release -p kf-tools --features nccl` (needs MPI too: the ranks exchange NCCL's id over MPI)"
    )
}

/// `dst[i] += src[i]` in f32, the accumulation every backend and the single-process trainer
/// share (no FMA, no reordering: the sum's bits depend only on the order of the parts).
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// Spin briefly, then yield, then sleep: a rank waiting for a peer must not steal its core's
/// time from a co-located rank's compute. Shared by the backends' polling loops.
#[cfg(feature = "mpi")]
pub(crate) fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 200 {
        std::hint::spin_loop();
    } else if *spins < 2000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The arguments every backend's [`Collective::sum_ordered`] checks first.
pub(crate) fn check_parts(rank: usize, parts: &[&[f32]], out: &[f32]) -> Result<()> {
    anyhow::ensure!(!parts.is_empty(), "sum_ordered: rank {rank} has no parts");
    anyhow::ensure!(
        parts.iter().all(|p| p.len() == out.len()),
        "sum_ordered: parts of different lengths"
    );
    Ok(())
}

/// A collective over threads of one process: every "rank" is a thread holding one end. The
/// reference the MPI and NCCL backends are tested against, and the way the trainer's
/// data-parallel logic is tested without a launcher.
pub mod local {
    use super::{add_into, Collective, Timeout};
    use anyhow::{anyhow, ensure, Result};
    use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};

    type Msg = Vec<u8>;

    /// One rank's end: a sender to every rank and a receiver from every rank.
    pub struct LocalCollective {
        rank: usize,
        to: Vec<Sender<Msg>>,
        from: Vec<Receiver<Msg>>,
        timeout: Timeout,
    }

    /// `n` connected ranks (move each into its own thread).
    pub fn group(n: usize, timeout: Timeout) -> Vec<LocalCollective> {
        // chans[i][j]: from rank i to rank j
        let mut senders: Vec<Vec<Option<Sender<Msg>>>> = (0..n).map(|_| vec![None; n]).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Msg>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for i in 0..n {
            for j in 0..n {
                let (s, r) = channel();
                senders[i][j] = Some(s);
                receivers[j][i] = Some(r);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| LocalCollective {
                rank,
                to: to.into_iter().map(Option::unwrap).collect(),
                from: from.into_iter().map(Option::unwrap).collect(),
                timeout,
            })
            .collect()
    }

    impl LocalCollective {
        fn send(&self, to: usize, m: Msg) -> Result<()> {
            self.to[to]
                .send(m)
                .map_err(|_| anyhow!("rank {}: rank {to} has gone", self.rank))
        }
        fn recv(&self, from: usize) -> Result<Msg> {
            self.from[from].recv_timeout(self.timeout.0).map_err(|e| match e {
                RecvTimeoutError::Timeout => anyhow!(
                    "rank {}: no message from rank {from} within the collective timeout ({} s): it died or hangs",
                    self.rank,
                    self.timeout.0.as_secs()
                ),
                RecvTimeoutError::Disconnected => {
                    anyhow!("rank {}: rank {from} has gone", self.rank)
                }
            })
        }
    }

    impl Collective for LocalCollective {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.to.len()
        }
        fn backend(&self) -> &'static str {
            "local"
        }
        fn sum_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()> {
            super::check_parts(self.rank, parts, out)?;
            let (r, w) = (self.rank, self.size());
            if r == 0 {
                out.copy_from_slice(parts[0]);
                parts[1..].iter().for_each(|p| add_into(out, p));
            } else {
                let m = self.recv(r - 1)?;
                let got: &[f32] = bytemuck::try_cast_slice(&m)
                    .map_err(|e| anyhow!("sum_ordered: bad message: {e}"))?;
                ensure!(
                    got.len() == out.len(),
                    "sum_ordered: rank {} sums {} values, rank {} sent {}",
                    r,
                    out.len(),
                    r - 1,
                    got.len()
                );
                out.copy_from_slice(got);
                parts.iter().for_each(|p| add_into(out, p));
            }
            if r + 1 < w {
                self.send(r + 1, bytemuck::cast_slice(out).to_vec())?;
            }
            let mut b = bytemuck::cast_slice(out).to_vec();
            self.broadcast(w - 1, &mut b)?;
            out.copy_from_slice(bytemuck::cast_slice(&b));
            Ok(())
        }
        fn broadcast(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
            if self.rank == root {
                for q in (0..self.size()).filter(|&q| q != root) {
                    self.send(q, buf.clone())?;
                }
            } else {
                *buf = self.recv(root)?;
            }
            Ok(())
        }
        fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
            for q in (0..self.size()).filter(|&q| q != self.rank) {
                self.send(q, bytes.to_vec())?;
            }
            (0..self.size())
                .map(|q| {
                    if q == self.rank {
                        Ok(bytes.to_vec())
                    } else {
                        self.recv(q)
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::local::group;
    use super::*;

    #[test]
    fn ordered_sum_equals_the_sequential_sum_for_any_grouping() {
        // values whose sum depends on the order in f32
        let parts: Vec<Vec<f32>> = (0..6)
            .map(|i| {
                (0..37)
                    .map(|j| ((i * 37 + j) as f32 * 0.731).sin() * 10f32.powi(i % 4 * 3))
                    .collect()
            })
            .collect();
        let mut seq = parts[0].clone();
        parts[1..].iter().for_each(|p| add_into(&mut seq, p));
        for (w, per) in [(2usize, 3usize), (3, 2), (6, 1)] {
            let comms = group(w, Timeout::default());
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .map(|mut c| {
                        let parts = &parts;
                        s.spawn(move || {
                            let r = c.rank();
                            let mine: Vec<&[f32]> = parts[r * per..(r + 1) * per]
                                .iter()
                                .map(|v| &v[..])
                                .collect();
                            let mut out = vec![0f32; 37];
                            c.sum_ordered(&mine, &mut out).unwrap();
                            out
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for out in results {
                assert_eq!(
                    out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    seq.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "world {w}"
                );
            }
        }
        // and the order matters: the reversed sum differs somewhere (so the test can fail)
        let mut rev = parts[5].clone();
        parts[..5].iter().rev().for_each(|p| add_into(&mut rev, p));
        assert_ne!(rev, seq);
    }

    #[test]
    fn a_silent_peer_is_an_error_after_the_timeout() {
        let mut comms = group(2, Timeout(std::time::Duration::from_millis(200)));
        let _peer = comms.pop().unwrap(); // rank 1 never calls
        let mut c = comms.pop().unwrap();
        let t = std::time::Instant::now();
        let e = c.all_gather(b"x").unwrap_err().to_string();
        assert!(
            e.contains("no message from rank 1 within the collective timeout"),
            "{e}"
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn backend_names_parse_and_unknown_ones_are_refused() {
        assert_eq!("mpi".parse::<Backend>().unwrap(), Backend::Mpi);
        assert_eq!("auto".parse::<Backend>().unwrap(), Backend::Auto);
        let e = "gloo".parse::<Backend>().unwrap_err().to_string();
        assert!(e.contains("unknown --distributed \"gloo\""), "{e}");
    }
}
