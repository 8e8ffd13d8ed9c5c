//! The cost of the data-parallel gradient sum (issue 22): `Collective::sum_ordered` over MPI
//! for buffers of 1M to 32M f32 values, median of 7 runs, as seconds and ns per parameter.
//!
//! mpirun -n 2 target/release/examples/allreduce      (cargo build --release -p kf-engine --features mpi --example allreduce)

use anyhow::Result;
use kf_engine::dist::{mpi::MpiCollective, Collective, Timeout};
use std::time::Instant;

fn main() -> Result<()> {
    let mut c = MpiCollective::init(Timeout::default())?;
    let (r, w) = (c.rank(), c.size());
    if r == 0 {
        println!("ranks {w}: values, median s, ns/param, GB/s (buffer bytes / time)");
    }
    for n in [1usize << 20, 1 << 22, 1 << 24, 1 << 25] {
        let part: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 + r as f32).collect();
        let mut out = vec![0f32; n];
        let mut t = Vec::new();
        for _ in 0..7 {
            c.barrier()?;
            let t0 = Instant::now();
            c.sum_ordered(&[&part], &mut out)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        let m = t[t.len() / 2];
        if r == 0 {
            println!(
                "{n:>9} {m:>9.4} {:>7.2} {:>6.2}",
                m * 1e9 / n as f64,
                (n * 4) as f64 / m / 1e9
            );
        }
    }
    Ok(())
}
