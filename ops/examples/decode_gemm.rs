//! Decode-shaped GEMM probe: the x·Wᵀ products of one paper-size (12 x 768, V 30522)
//! decode step with weights streamed from DRAM, at m = 1..16 rows. Prints ms per step and
//! the implied weight-read GB/s and GFLOP/s. `cargo run --release -p kf-ops --example decode_gemm`
use kf_ops::gemm::gemm;
use std::time::Instant;

fn main() {
    let d = 768;
    let mut shapes: Vec<(usize, usize)> = Vec::new(); // (out, in)
    for _ in 0..12 {
        shapes.extend([(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]);
    }
    shapes.push((30522, d));
    let ws: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(o, i)| (0..o * i).map(|t| (t % 7) as f32 * 1e-3).collect())
        .collect();
    let bytes: usize = shapes.iter().map(|&(o, i)| o * i * 4).sum();
    for m in [1usize, 2, 4, 8, 16, 32] {
        let x = vec![0.5f32; m * 4 * d];
        let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(o, _)| vec![0f32; m * o]).collect();
        let mut times = Vec::new();
        for _ in 0..7 {
            let t0 = Instant::now();
            for (s, (w, y)) in shapes.iter().zip(ws.iter().zip(ys.iter_mut())) {
                let (o, i) = *s;
                gemm(m, o, i, &x, i, 1, w, 1, i, y, o, 1, false).unwrap();
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let t = times[3];
        println!(
            "m {m:2}: {:7.2} ms/step  {:6.1} GB/s weights  {:6.1} GFLOP/s",
            t * 1e3,
            bytes as f64 / t / 1e9,
            2.0 * (bytes / 4 * m) as f64 / t / 1e9
        );
    }
}
