//! The fused inverse-CDF sampler (`kf_ops::sampling`) against the composed
//! slow path (softmax op, then an explicit cumulative sum and linear search),
//! the noise-inversion round trip, and the edge cases of the map (KFORCING.md
//! section 3). R rows, V vocabulary.

use kf_engine::{DType, Device, Tensor};
use kf_ops::sampling::{
    inverse_cdf_noise, inverse_cdf_noise_row, inverse_cdf_row, sample_inverse_cdf,
};
use kf_tests::harness::Gen;

fn t2(v: &[f64], rows: usize, dtype: DType) -> Tensor {
    Tensor::from_slice(v, &[rows, v.len() / rows], Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}
fn t1(v: &[f64]) -> Tensor {
    Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap()
}
fn toks(t: &Tensor) -> Vec<u32> {
    t.to_vec::<u32>().unwrap()
}
fn first_argmax(row: &[f64]) -> usize {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    row.iter().position(|&x| x == m).unwrap()
}

/// The slow path: probabilities from the softmax op (in f64, on logits / tau),
/// then a cumulative sum and a linear search. Returns per row the token and
/// the distance from `u` to the nearest cumulative value (to skip rows where
/// the two paths may legitimately round differently).
fn composed(logits: &[f64], rows: usize, us: &[f64], tau: f64) -> Vec<(usize, f64)> {
    let scaled: Vec<f64> = logits.iter().map(|&x| x / tau).collect();
    let p = kf_ops::softmax::softmax(&t2(&scaled, rows, DType::F64))
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    let v = logits.len() / rows;
    (0..rows)
        .map(|r| {
            let (pr, u) = (&p[r * v..(r + 1) * v], us[r]);
            let mut cum = 0.0;
            let mut gap = f64::INFINITY;
            let mut tok = None;
            for (j, &pj) in pr.iter().enumerate() {
                cum += pj;
                gap = gap.min((cum - u).abs());
                if tok.is_none() && pj > 0.0 && cum >= u {
                    tok = Some(j);
                }
            }
            let tok = tok.unwrap_or_else(|| pr.iter().rposition(|&x| x > 0.0).unwrap());
            (tok, gap)
        })
        .collect()
}

/// Random logits with the reserved token (-inf) and a -1000 entry per row.
fn logits(g: &mut Gen, rows: usize, v: usize, std: f64) -> Vec<f64> {
    let mut l = g.normal_vec(rows * v, std);
    if v >= 3 {
        for row in l.chunks_mut(v) {
            let a = g.below(v as u64) as usize;
            row[a] = f64::NEG_INFINITY;
            row[(a + 1) % v] = -1000.0;
        }
    }
    l
}

#[test]
fn fused_matches_composed_slow_path() {
    let mut g = Gen::new(7);
    let mut compared = 0;
    for &(rows, v) in &[
        (200usize, 2usize),
        (200, 7),
        (100, 1000),
        (24, 30522),
        (24, 50257),
    ] {
        for &tau in &[0.5, 1.0, 2.0] {
            for dtype in [DType::F32, DType::F64] {
                let std = g.range(0.5, 4.0);
                let mut l = logits(&mut g, rows, v, std);
                if dtype == DType::F32 {
                    l.iter_mut().for_each(|x| *x = *x as f32 as f64);
                }
                let us: Vec<f64> = (0..rows)
                    .map(|r| match r % 5 {
                        0 => 1e-9,
                        1 => 1.0 - 1e-9,
                        _ => g.unit().max(1e-12),
                    })
                    .collect();
                let fused = toks(&sample_inverse_cdf(&t2(&l, rows, dtype), &t1(&us), tau).unwrap());
                for (r, (tok, gap)) in composed(&l, rows, &us, tau).into_iter().enumerate() {
                    if gap < 1e-12 {
                        continue; // u on a boundary: the two roundings may differ
                    }
                    compared += 1;
                    assert_eq!(
                        fused[r] as usize, tok,
                        "V={v} tau={tau} {dtype} row {r} u={}",
                        us[r]
                    );
                    let row = &l[r * v..(r + 1) * v];
                    assert!(row[tok] > f64::NEG_INFINITY);
                    // the slice API is the same kernel
                    assert_eq!(inverse_cdf_row(row, us[r], tau).unwrap(), fused[r]);
                }
            }
        }
    }
    assert!(compared > 3000, "only {compared} rows compared");
}

#[test]
fn noise_inversion_round_trip() {
    let mut g = Gen::new(11);
    for &(rows, v) in &[(300usize, 3usize), (100, 1000), (16, 50257)] {
        for &tau in &[0.5, 1.0, 2.0] {
            for dtype in [DType::F32, DType::F64] {
                let std = g.range(0.5, 3.0);
                let l = logits(&mut g, rows, v, std);
                let lt = t2(&l, rows, dtype);
                let lr = lt.to_vec_f64().unwrap();
                // Half the tokens sampled from the distribution, half uniform
                // over tokens of relative weight >= e^-27 (incl. very unlikely
                // ones; far smaller ones cannot be resolved by an f64 CDF and
                // are errors, tested in the op's unit tests).
                let us: Vec<f64> = (0..rows).map(|_| g.unit().max(1e-12)).collect();
                let sampled = toks(&sample_inverse_cdf(&lt, &t1(&us), tau).unwrap());
                let tk: Vec<u32> = (0..rows)
                    .map(|r| {
                        let row = &lr[r * v..(r + 1) * v];
                        if r % 2 == 0 {
                            return sampled[r];
                        }
                        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        loop {
                            let x = g.below(v as u64) as usize;
                            if (row[x] - m) / tau > -27.0 {
                                return x as u32;
                            }
                        }
                    })
                    .collect();
                let rs: Vec<f64> = (0..rows)
                    .map(|r| match r % 7 {
                        0 => 0.0,
                        1 => 1.0,
                        _ => g.unit(),
                    })
                    .collect();
                let tt = Tensor::from_slice(&tk, &[rows], Device::Cpu).unwrap();
                let u = inverse_cdf_noise(&lt, &tt, &t1(&rs), tau).unwrap();
                assert_eq!(u.dtype(), DType::F64);
                let uv = u.to_vec::<f64>().unwrap();
                assert!(uv.iter().all(|&x| x > 0.0 && x < 1.0));
                let back = toks(&sample_inverse_cdf(&lt, &u, tau).unwrap());
                assert_eq!(back, tk, "V={v} tau={tau} {dtype}");
                // u sits where the formula puts it (CDF from the naive path)
                for r in 0..rows {
                    let row: Vec<f64> = lr[r * v..(r + 1) * v].iter().map(|x| x / tau).collect();
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
                    let s: f64 = e.iter().sum();
                    let lo: f64 = e[..tk[r] as usize].iter().sum::<f64>() / s;
                    let hi = lo + e[tk[r] as usize] / s;
                    let want = lo + (hi - lo) * rs[r];
                    assert!(
                        (uv[r] - want).abs() < 1e-12,
                        "row {r}: u {} vs {want}",
                        uv[r]
                    );
                    // the slice API agrees
                    let row = &lr[r * v..(r + 1) * v];
                    assert_eq!(
                        inverse_cdf_noise_row(row, tk[r], rs[r], tau).unwrap(),
                        uv[r]
                    );
                }
            }
        }
    }
}

#[test]
fn noise_is_monotone_in_r() {
    let mut g = Gen::new(5);
    let l = logits(&mut g, 1, 1000, 2.0);
    let x = first_argmax(&l) as u32;
    let mut prev = 0.0;
    for i in 0..=100 {
        let u = inverse_cdf_noise_row(&l, x, i as f64 / 100.0, 1.0).unwrap();
        assert!(u >= prev);
        assert_eq!(inverse_cdf_row(&l, u, 1.0).unwrap(), x);
        prev = u;
    }
}

#[test]
fn vocabulary_of_one() {
    for tau in [0.0, 0.5, 1.0, 1e6] {
        for u in [1e-12, 0.3, 1.0 - 1e-12] {
            for l in [-5.0f32, 0.0, 1e30] {
                assert_eq!(inverse_cdf_row(&[l], u, tau).unwrap(), 0);
            }
        }
    }
}

#[test]
fn equal_logits_are_uniform() {
    let mut g = Gen::new(3);
    for &v in &[2usize, 7, 1000, 50257] {
        let row = vec![0.5f32; v];
        let row64: Vec<f64> = vec![0.5; v];
        for _ in 0..50 {
            let u = g.unit().max(1e-12);
            let got = inverse_cdf_row(&row, u, 1.0).unwrap() as usize;
            // the reference map on exact probabilities 1/V
            let (tok, gap) = composed(&row64, 1, &[u], 1.0)[0];
            if gap > 1e-12 {
                assert_eq!(got, tok, "V={v} u={u}");
            }
            let x = u * v as f64;
            if (x - x.round()).abs() > 1e-6 {
                assert_eq!(got, x.ceil() as usize - 1, "V={v} u={u}");
            }
        }
    }
}

#[test]
fn extreme_u_never_returns_a_zero_probability_token() {
    let mut g = Gen::new(9);
    for &v in &[3usize, 7, 1000, 50257] {
        for &tau in &[0.5, 1.0, 2.0, 1e6] {
            let mut row = g.normal_vec(v, 2.0);
            row[0] = f64::NEG_INFINITY;
            row[v - 1] = f64::NEG_INFINITY;
            for dtype in [DType::F32, DType::F64] {
                let l = t2(&row, 1, dtype);
                let lo = toks(&sample_inverse_cdf(&l, &t1(&[1e-12]), tau).unwrap())[0];
                let hi = toks(&sample_inverse_cdf(&l, &t1(&[1.0 - 1e-12]), tau).unwrap())[0];
                assert_eq!((lo, hi), (1, v as u32 - 2), "V={v} tau={tau} {dtype}");
            }
            // the smallest and largest u there are
            for u in [f64::MIN_POSITIVE, 1.0 - f64::EPSILON / 2.0] {
                let x = inverse_cdf_row(&row, u, tau).unwrap() as usize;
                assert!(x >= 1 && x <= v - 2);
            }
        }
    }
    // the reserved token forced to -1000 at tau 1 has probability exactly 0
    let row = [-1000.0f32, 0.0, 0.0, -1000.0];
    assert_eq!(inverse_cdf_row(&row, 1e-300, 1.0).unwrap(), 1);
    assert_eq!(inverse_cdf_row(&row, 1.0 - 1e-16, 1.0).unwrap(), 2);
}

#[test]
fn small_tau_is_argmax_and_huge_tau_is_uniform() {
    let mut g = Gen::new(13);
    for &v in &[7usize, 1000, 50257] {
        for _ in 0..10 {
            let mut row = g.normal_vec(v, 2.0);
            let at = g.below(v as u64) as usize;
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            row[at] = m + 0.5; // a clear maximum
            let u = g.unit().max(1e-12);
            assert_eq!(inverse_cdf_row(&row, u, 1e-6).unwrap() as usize, at);
            assert_eq!(inverse_cdf_row(&row, u, 0.0).unwrap() as usize, at);
            // tau = 1e6: weights within ~1e-5 of uniform
            let got = inverse_cdf_row(&row, u, 1e6).unwrap() as i64;
            let uniform = (u * v as f64).ceil() as i64 - 1;
            assert!(
                (got - uniform).abs() <= 1,
                "V={v} u={u}: {got} vs {uniform}"
            );
        }
    }
}

#[test]
fn nan_and_bad_arguments_are_errors() {
    let mut row = vec![0.0f64; 50257];
    row[50000] = f64::NAN;
    let two = [vec![0.0; 50257], row.clone()].concat();
    let e = sample_inverse_cdf(&t2(&two, 2, DType::F32), &t1(&[0.5, 0.5]), 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("logits contain NaN at row 1"), "{e}");
    assert!(inverse_cdf_row(&row, 0.5, 0.0).is_err());
    assert!(inverse_cdf_row(&[0.0f32, 1.0], 0.5, -1.0).is_err());
    assert!(inverse_cdf_row(&[0.0f32, 1.0], 1.0, 1.0).is_err());
    assert!(inverse_cdf_row(&[f32::NEG_INFINITY; 3], 0.5, 1.0).is_err());
    assert!(inverse_cdf_row::<f32>(&[], 0.5, 1.0).is_err());
}

#[test]
fn views_and_extreme_magnitudes() {
    // a transposed (non-contiguous) logits view samples like its copy
    let mut g = Gen::new(17);
    let l = g.normal_vec(6 * 9, 2.0);
    let base = t2(&l, 9, DType::F32).transpose(0, 1).unwrap(); // [6, 9] view
    let us = t1(&[0.1, 0.3, 0.5, 0.7, 0.9, 0.99]);
    let a = toks(&sample_inverse_cdf(&base, &us, 1.0).unwrap());
    let b = toks(&sample_inverse_cdf(&base.contiguous().unwrap(), &us, 1.0).unwrap());
    assert_eq!(a, b);
    // huge logits and a tiny tau do not overflow
    let row = [1e300, -1e300, 1e300 - 1e285, 0.0];
    assert_eq!(inverse_cdf_row(&row, 0.99, 1e-3).unwrap(), 0);
    assert_eq!(inverse_cdf_row(&row, 0.99, 1e300).unwrap(), 3);
}

/// Prints µs per row of the f32 sampler: one row at a time on one thread,
/// and a batch of rows through the tensor op (rows in parallel). Best of 7
/// (the dev box is shared). A record for reports, not an assertion; run with
/// `cargo test --release -p kf-tests --test fused_sampling -- --ignored --nocapture perf`.
#[test]
#[ignore]
fn perf_sampling_per_row() {
    fn best(mut f: impl FnMut()) -> f64 {
        (0..7)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }
    let mut g = Gen::new(21);
    for &v in &[30522usize, 50257] {
        let rows = 64;
        let l = t2(&g.normal_vec(rows * v, 2.0), rows, DType::F32);
        let lr: Vec<f32> = l.to_vec::<f32>().unwrap();
        let us: Vec<f64> = (0..rows).map(|_| g.unit().max(1e-9)).collect();
        let ut = t1(&us);
        let per_row = |secs: f64| secs * 1e6 / rows as f64;
        let single = per_row(best(|| {
            for r in 0..rows {
                std::hint::black_box(inverse_cdf_row(&lr[r * v..(r + 1) * v], us[r], 1.0).unwrap());
            }
        }));
        let batch = per_row(best(|| {
            std::hint::black_box(sample_inverse_cdf(&l, &ut, 1.0).unwrap());
        }));
        let batch_tau = per_row(best(|| {
            std::hint::black_box(sample_inverse_cdf(&l, &ut, 0.7).unwrap());
        }));
        eprintln!(
            "sample_inverse_cdf f32 V={v}: {single:.1} us/row one thread; batch of {rows} on {} \
             threads: {batch:.1} us/row (tau 1), {batch_tau:.1} us/row (tau 0.7)",
            rayon::current_num_threads()
        );
    }
}
