//! CPU GEMM entry point (interim): C = [C +] A·B over strided operands through
//! the `gemm` crate. Transposes are swapped strides. The measured choice of
//! backend (and the small-M path) replaces this file.

use anyhow::{ensure, Result};

pub trait GemmElem: Copy + Send + Sync + 'static + num_one::One {}
impl GemmElem for f32 {}
impl GemmElem for f64 {}

mod num_one {
    pub trait One {
        fn one() -> Self;
        fn zero() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }
    impl One for f64 {
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }
}

fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

/// C (m x n) = [C if accumulate] + A (m x k) · B (k x n); each operand is a
/// slice plus row and column strides in elements.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
    c: &mut [T],
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
) -> Result<()> {
    let ea = extent(m, k, a_rs, a_cs);
    let eb = extent(k, n, b_rs, b_cs);
    let ec = extent(m, n, c_rs, c_cs);
    ensure!(
        ea.is_some_and(|e| e <= a.len())
            && eb.is_some_and(|e| e <= b.len())
            && ec.is_some_and(|e| e <= c.len()),
        "gemm: operands too short for m={m} n={n} k={k} and the given strides"
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] = T::zero();
                }
            }
        }
        return Ok(());
    }
    let threads = if m * n * k < 48 * 48 * 48 {
        1
    } else {
        rayon::current_num_threads()
    };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the extents of all three operands were checked against the
    // slice lengths above, so every element the kernel touches is in bounds;
    // `c` is borrowed mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}
