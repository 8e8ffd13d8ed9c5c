//! The MPI backend of [`Collective`] (`--features mpi`): point-to-point messages of the `mpi`
//! crate over Open MPI or MPICH, polled with a deadline so that a dead or hung peer is an
//! error, not a hang (MPI's own collectives block without a timeout).
//!
//! * `sum_ordered`: a pipelined chain — rank 0 sends its partial sum chunk by chunk to rank 1,
//!   which adds its parts and passes it on; the last rank holds the result and a chain
//!   broadcast brings it back. Each rank sends and receives about twice the buffer, like a
//!   ring all-reduce, and the order of the additions is fixed (the determinism contract).
//! * `broadcast`: a chain from the root, chunked; `all_gather`: every rank sends to every other.
//!
//! After a timeout the communicator is broken: its pending requests (and their buffers) are
//! leaked on purpose, and dropping it skips `MPI_Finalize` (a dead peer never reaches it):
//! the process reports the error and exits non-zero, and the launcher ends the other ranks.

use super::{add_into, backoff, Collective, Timeout};
use anyhow::{anyhow, ensure, Result};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source};
use mpi::request::StaticScope;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;
use std::time::Instant;

/// Elements per message of the chunked chain (4 MiB of f32).
const CHUNK: usize = 1 << 20;
const TAG_SUM: i32 = 11;
const TAG_BCAST: i32 = 12;
const TAG_GATHER: i32 = 13;

/// One MPI rank (the world communicator).
pub struct MpiCollective {
    // dropped after `world`; None once leaked (broken)
    universe: Option<Universe>,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Timeout,
    broken: bool,
}

// SAFETY: MPI is initialised with at least `Funneled` threading and the collective is used by
// one thread at a time (it is `&mut self` everywhere); moving it between threads is allowed
// under MPI_THREAD_SERIALIZED, which we request.
unsafe impl Send for MpiCollective {}

impl MpiCollective {
    /// Initialises MPI (once per process) and takes the world communicator.
    pub fn init(timeout: Timeout) -> Result<MpiCollective> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| anyhow!("MPI was already initialised in this process"))?;
        ensure!(
            level >= Threading::Serialized,
            "the MPI library offers thread level {level:?}; kfrun needs Serialized"
        );
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiCollective {
            universe: Some(universe),
            world,
            rank,
            size,
            timeout,
            broken: false,
        })
    }

    fn deadline_error(&mut self, what: &str, peer: usize) -> anyhow::Error {
        self.broken = true;
        anyhow!(
            "rank {}: {what} rank {peer} did not complete within the collective timeout ({} s): \
             rank {peer} died or hangs (--collective-timeout sets the limit)",
            self.rank,
            self.timeout.0.as_secs()
        )
    }

    /// Sends `data` to `to`, waiting (with the deadline) until MPI is done with the buffer.
    fn send<T: mpi::datatype::Equivalence + Copy + 'static>(
        &mut self,
        to: usize,
        tag: i32,
        data: &[T],
    ) -> Result<()> {
        ensure!(
            !self.broken,
            "the MPI communicator is broken by an earlier timeout"
        );
        // An owned copy MPI may still read after a timeout (then it is leaked, never freed).
        let raw: *mut [T] = Box::into_raw(data.to_vec().into_boxed_slice());
        // SAFETY: `raw` comes from Box::into_raw and is freed only once the request completed
        // (below) or never (after a timeout); nothing else aliases it.
        let buf: &'static [T] = unsafe { &*raw };
        let mut req = self
            .world
            .process_at_rank(to as i32)
            .immediate_send_with_tag(StaticScope, buf, tag);
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            match req.test() {
                Ok(_) => {
                    // SAFETY: the send completed, MPI no longer reads the buffer.
                    drop(unsafe { Box::from_raw(raw) });
                    return Ok(());
                }
                Err(r) => req = r,
            }
            if t0.elapsed() > self.timeout.0 {
                // SAFETY: the request is leaked with its buffer; neither is touched again.
                let _ = unsafe { req.into_raw() };
                return Err(self.deadline_error("sending to", to));
            }
            backoff(&mut spins);
        }
    }

    /// Receives the next message with `tag` from `from` (any length), with the deadline.
    fn recv<T: mpi::datatype::Equivalence + Copy + Default>(
        &mut self,
        from: usize,
        tag: i32,
    ) -> Result<Vec<T>> {
        ensure!(
            !self.broken,
            "the MPI communicator is broken by an earlier timeout"
        );
        let t0 = Instant::now();
        let mut spins = 0u32;
        let peer = self.world.process_at_rank(from as i32);
        loop {
            if let Some((msg, status)) = peer.immediate_matched_probe_with_tag(tag) {
                let n = status.count(T::equivalent_datatype());
                ensure!(
                    n >= 0,
                    "rank {}: a message of undefined length from rank {from}",
                    self.rank
                );
                let mut v = vec![T::default(); n as usize];
                msg.matched_receive_into(&mut v[..]);
                return Ok(v);
            }
            if t0.elapsed() > self.timeout.0 {
                return Err(self.deadline_error("receiving from", from));
            }
            backoff(&mut spins);
        }
    }

    /// Receives exactly `out.len()` values from `from` into `out`.
    fn recv_exact(&mut self, from: usize, tag: i32, out: &mut [f32]) -> Result<()> {
        let v: Vec<f32> = self.recv(from, tag)?;
        ensure!(
            v.len() == out.len(),
            "rank {}: expected {} values from rank {from}, got {}: the ranks disagree on the buffer (different models or configs?)",
            self.rank,
            out.len(),
            v.len()
        );
        out.copy_from_slice(&v);
        Ok(())
    }

    /// Chain broadcast of `buf` (same length everywhere) from `root`, chunked.
    fn broadcast_f32(&mut self, root: usize, buf: &mut [f32]) -> Result<()> {
        let w = self.size;
        // position in the chain root, root+1, ... (mod w)
        let pos = (self.rank + w - root) % w;
        let prev = (self.rank + w - 1) % w;
        let next = (self.rank + 1) % w;
        let n = buf.len();
        let mut c0 = 0;
        while c0 < n {
            let c1 = (c0 + CHUNK).min(n);
            if pos > 0 {
                self.recv_exact(prev, TAG_BCAST, &mut buf[c0..c1])?;
            }
            if pos + 1 < w {
                self.send(next, TAG_BCAST, &buf[c0..c1])?;
            }
            c0 = c1;
        }
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn sum_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()> {
        super::check_parts(self.rank, parts, out)?;
        let (r, w, n) = (self.rank, self.size, out.len());
        let mut c0 = 0;
        while c0 < n {
            let c1 = (c0 + CHUNK).min(n);
            if r == 0 {
                out[c0..c1].copy_from_slice(&parts[0][c0..c1]);
                for p in &parts[1..] {
                    add_into(&mut out[c0..c1], &p[c0..c1]);
                }
            } else {
                self.recv_exact(r - 1, TAG_SUM, &mut out[c0..c1])?;
                for p in parts {
                    add_into(&mut out[c0..c1], &p[c0..c1]);
                }
            }
            if r + 1 < w {
                self.send(r + 1, TAG_SUM, &out[c0..c1])?;
            }
            c0 = c1;
        }
        if w > 1 {
            self.broadcast_f32(w - 1, out)?;
        }
        Ok(())
    }

    fn broadcast(&mut self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        ensure!(
            root < self.size,
            "broadcast: root {root} of {} ranks",
            self.size
        );
        if self.size == 1 {
            return Ok(());
        }
        // the length first, then the bytes (as whole messages: byte buffers here are small)
        let w = self.size;
        let pos = (self.rank + w - root) % w;
        let (prev, next) = ((self.rank + w - 1) % w, (self.rank + 1) % w);
        if pos > 0 {
            *buf = self.recv::<u8>(prev, TAG_BCAST)?;
        }
        if pos + 1 < w {
            let b = std::mem::take(buf);
            self.send(next, TAG_BCAST, &b)?;
            *buf = b;
        }
        Ok(())
    }

    fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (r, w) = (self.rank, self.size);
        // Ranks below this one send first to it, it to those above: no two ranks wait on
        // each other's send (sends complete eagerly for small messages anyway).
        let mut got: Vec<Vec<u8>> = Vec::with_capacity(w);
        for q in 0..r {
            got.push(self.recv::<u8>(q, TAG_GATHER)?);
        }
        got.push(bytes.to_vec());
        for p in (0..w).filter(|&p| p != r) {
            self.send(p, TAG_GATHER, bytes)?;
        }
        for q in r + 1..w {
            got.push(self.recv::<u8>(q, TAG_GATHER)?);
        }
        Ok(got)
    }
}

impl Drop for MpiCollective {
    fn drop(&mut self) {
        if self.broken {
            // A peer is dead or hung: MPI_Finalize would wait for it. Skip it; the process
            // then exits non-zero after reporting the error, and the launcher ends the job.
            std::mem::forget(self.universe.take());
            return;
        }
        // MPI_Finalize, after every rank is done with its messages
        drop(self.universe.take());
    }
}
