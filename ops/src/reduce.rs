//! Sums: `sum` / `mean` of all elements (shape []), `sum_dim`, and the kernels
//! bias and broadcast gradients share (`sum_axis_into` over x viewed as
//! [outer, n, inner]; `sum_to_shape`). Sums accumulate in f64 over blocks fixed
//! by the shape, so results are accurate and identical at any thread count.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::float_dtype;
use anyhow::{ensure, Context, Result};
use kf_engine::autograd::{should_record, BackwardOp};
use kf_engine::layout::Layout;
use kf_engine::{Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Column chunk of a task: a task sums at most this many output columns.
const COL_CHUNK: usize = 2048;
/// With fewer (output row, column chunk) tasks than this, the summed axis is
/// also split into blocks whose partial sums are added in block order.
const MIN_TASKS: usize = 16;
/// Elements per block when the summed axis is split, and the most blocks per task.
const BLOCK_ELEMS: usize = 1 << 15;
const MAX_BLOCKS: usize = 64;
/// Below this many input elements a reduction runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// f64 sum of a contiguous run, 8 independent lanes (vectorisable) combined in
/// a fixed order.
fn sum_run<T: Float>(xs: &[T]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v.to_f64();
        }
    }
    let mut tail = 0f64;
    for &v in chunks.remainder() {
        tail += v.to_f64();
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

/// `out[o, i] = scale * sum_k x[o, k, i]` for contiguous `x` viewed as
/// [outer, n, inner]; `out` holds outer * inner elements. The blocking below
/// depends on the shape only (never on the thread count), so every output
/// element is summed in the same order on every run.
pub(crate) fn sum_axis_into<T: Float>(
    x: &[T],
    outer: usize,
    n: usize,
    inner: usize,
    scale: f64,
    out: &mut [T],
) {
    debug_assert_eq!(x.len(), outer * n * inner);
    debug_assert_eq!(out.len(), outer * inner);
    if out.is_empty() {
        return;
    }
    if n == 0 {
        out.fill(T::ZERO);
        return;
    }
    let cw = inner.min(COL_CHUNK);
    let ncol = inner.div_ceil(cw);
    let rows_per_block = if outer * ncol >= MIN_TASKS {
        n
    } else {
        (BLOCK_ELEMS / cw).max(n.div_ceil(MAX_BLOCKS)).max(1)
    };
    let nblocks = n.div_ceil(rows_per_block);
    // Adds rows k0..k1 of block `blk`, columns of chunk `c`, of output row `o` into `acc`.
    let block_sum = |o: usize, c: usize, blk: usize, acc: &mut [f64]| {
        let k0 = blk * rows_per_block;
        let k1 = (k0 + rows_per_block).min(n);
        let base = o * n * inner;
        if inner == 1 {
            acc[0] += sum_run(&x[base + k0..base + k1]);
        } else {
            let c0 = c * cw;
            for k in k0..k1 {
                let row = &x[base + k * inner + c0..base + k * inner + c0 + acc.len()];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v.to_f64();
                }
            }
        }
    };
    let par = x.len() >= PAR_MIN_ELEMS;
    // Sums of (row o, chunk c) over blocks 0..nblocks, added in block order.
    let partials: Vec<Vec<f64>> = if nblocks == 1 {
        vec![]
    } else {
        let partial = |t: usize| {
            let (oc, blk) = (t / nblocks, t % nblocks);
            let (o, c) = (oc / ncol, oc % ncol);
            let mut acc = vec![0f64; (inner - c * cw).min(cw)];
            block_sum(o, c, blk, &mut acc);
            acc
        };
        let tasks = outer * ncol * nblocks;
        if par {
            (0..tasks).into_par_iter().map(partial).collect()
        } else {
            (0..tasks).map(partial).collect()
        }
    };
    let task = |o: usize, c: usize, dst: &mut [T]| {
        let mut one = [0f64];
        let mut heap;
        let acc: &mut [f64] = if dst.len() == 1 {
            &mut one
        } else {
            heap = vec![0f64; dst.len()];
            &mut heap
        };
        if nblocks == 1 {
            block_sum(o, c, 0, acc);
        } else {
            let first = (o * ncol + c) * nblocks;
            for p in &partials[first..first + nblocks] {
                for (a, &v) in acc.iter_mut().zip(p) {
                    *a += v;
                }
            }
        }
        for (d, &a) in dst.iter_mut().zip(acc.iter()) {
            *d = T::from_f64(a * scale);
        }
    };
    if par {
        let min_len = (PAR_MIN_ELEMS / (n * inner)).max(1);
        out.par_chunks_mut(inner)
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(o, row)| {
                if ncol == 1 {
                    task(o, 0, row);
                } else {
                    row.par_chunks_mut(cw)
                        .enumerate()
                        .for_each(|(c, dst)| task(o, c, dst));
                }
            });
    } else {
        for (o, row) in out.chunks_mut(inner).enumerate() {
            for (c, dst) in row.chunks_mut(cw).enumerate() {
                task(o, c, dst);
            }
        }
    }
}

/// Sum over `n` of `x` viewed as [outer, n, inner] into a new tensor of `shape`.
fn sum_axis_t<T: Float>(
    x: &Tensor,
    (outer, n, inner): (usize, usize, usize),
    scale: f64,
    shape: &[usize],
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    let xc = x.contiguous()?;
    let xs = xc.cpu_data::<T>()?;
    let mut out = OutBuf::<T>::uninit(outer * inner);
    sum_axis_into(&xs, outer, n, inner, scale, out.as_mut_slice());
    out.finish(shape, node)
}

/// Sum of all elements, as a tensor of shape [].
pub fn sum(x: &Tensor) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("sum", &[x])? {
        return full_sum_on(&on, x, 1.0, "sum");
    }
    let d = float_dtype("sum", &[x])?;
    let node = should_record(&[x]).then(|| {
        Arc::new(FullBackward {
            x: x.clone(),
            scale: 1.0,
            name: "sum",
        }) as Arc<dyn BackwardOp>
    });
    let n = x.numel();
    dispatch_float!("sum", d, sum_axis_t::<T>(x, (1, n, 1), 1.0, &[], node))
}

/// `scale * sum(x)` of all elements on a kernel device, shape []: the deterministic column-sum
/// kernels over `x` as one column (f32 accumulation in a fixed order).
fn full_sum_on(
    on: &bridge::OnDevice,
    x: &Tensor,
    scale: f64,
    name: &'static str,
) -> Result<Tensor> {
    let n = x.numel();
    if n == 0 {
        return Tensor::zeros(&[], x.dtype(), on.device);
    }
    let dev = &*on.dev;
    let col = launch::colsum(dev, &bridge::dt(x)?.reshape(&[n, 1])?)
        .with_context(|| format!("{name} of {:?} on {}", x.shape(), on.device))?;
    let col = if scale == 1.0 {
        col
    } else {
        crate::elementwise::launch::scale(dev, &col, scale as f32)?
    };
    bridge::back_recorded(on, col.reshape(&[])?, &[x], || {
        Arc::new(FullBackward {
            x: x.clone(),
            scale,
            name,
        })
    })
}

/// Mean of all elements, as a tensor of shape [] (NaN for an empty tensor).
pub fn mean(x: &Tensor) -> Result<Tensor> {
    let n = x.numel();
    if let Some(on) = bridge::device_of("mean", &[x])? {
        if n == 0 {
            return Tensor::full(&[], f64::NAN, x.dtype(), on.device);
        }
        return full_sum_on(&on, x, 1.0 / n as f64, "mean");
    }
    let d = float_dtype("mean", &[x])?;
    let scale = 1.0 / n as f64;
    let node = should_record(&[x]).then(|| {
        Arc::new(FullBackward {
            x: x.clone(),
            scale,
            name: "mean",
        }) as Arc<dyn BackwardOp>
    });
    if n == 0 {
        return Tensor::full(&[], f64::NAN, d, x.device());
    }
    dispatch_float!("mean", d, sum_axis_t::<T>(x, (1, n, 1), scale, &[], node))
}

/// `sum over tensors and elements of (x * scale)^2` of f32 tensors on one device, as f64: the
/// squared global norm of a gradient list. On the CPU each tensor's sum is sequential in f64
/// (tensors in parallel, added in list order: the same bits at any thread count); on a kernel
/// device the fixed-order `sumsq` kernels (f32 partials) of the unscaled buffers, times
/// `scale^2`.
pub fn sum_squares(ts: &[&Tensor], scale: f64) -> Result<f64> {
    if let Some(on) = bridge::device_of("sum_squares", ts)? {
        let d: Vec<crate::kdev::DTensor> =
            ts.iter().map(|t| bridge::dt(t)).collect::<Result<_>>()?;
        let refs: Vec<&crate::kdev::DTensor> = d.iter().collect();
        let s = launch::sumsq(&*on.dev, &refs)?;
        let v = bridge::back(&on, s)?.to_vec::<f32>()?[0] as f64;
        return Ok(v * scale * scale);
    }
    let sq: Vec<f64> = ts
        .par_iter()
        .map(|t| -> Result<f64> {
            let c = t.contiguous()?;
            let xs = c.cpu_data::<f32>()?;
            Ok(xs
                .iter()
                .map(|&x| {
                    let y = x as f64 * scale;
                    y * y
                })
                .sum())
        })
        .collect::<Result<_>>()?;
    Ok(sq.iter().sum())
}

/// Backward of `sum` / `mean`: every input element gets `scale * g`.
struct FullBackward {
    x: Tensor,
    scale: f64,
    name: &'static str,
}

impl BackwardOp for FullBackward {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let v = g.to_scalar_f64()? * self.scale;
        let gx = Tensor::full(self.x.shape(), v, self.x.dtype(), self.x.device())?;
        Ok(vec![Some(gx)])
    }
}

/// Sum along `dim`; `keepdim` keeps it as a size-1 dimension.
pub fn sum_dim(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    ensure!(
        dim < x.rank(),
        "sum_dim: dimension {dim} out of range for shape {:?}",
        x.shape()
    );
    let shape = x.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    if keepdim {
        out_shape[dim] = 1;
    } else {
        out_shape.remove(dim);
    }
    if let Some(on) = bridge::device_of("sum_dim", &[x])? {
        // `dim` first (a view, gathered by the bridge), then the column-sum kernels over it
        let mut perm: Vec<usize> = vec![dim];
        perm.extend((0..x.rank()).filter(|&i| i != dim));
        let rest = x.numel() / shape[dim].max(1);
        let xt = bridge::dt(&x.permute(&perm)?)?.reshape(&[shape[dim], rest])?;
        let s = launch::colsum(&*on.dev, &xt)?;
        return bridge::back_recorded(&on, s.reshape(&out_shape)?, &[x], || {
            Arc::new(SumDimBackward { x: x.clone(), dim })
        });
    }
    let d = float_dtype("sum_dim", &[x])?;
    let node = should_record(&[x])
        .then(|| Arc::new(SumDimBackward { x: x.clone(), dim }) as Arc<dyn BackwardOp>);
    dispatch_float!(
        "sum_dim",
        d,
        sum_axis_t::<T>(x, (outer, shape[dim], inner), 1.0, &out_shape, node)
    )
}

struct SumDimBackward {
    x: Tensor,
    dim: usize,
}

impl BackwardOp for SumDimBackward {
    fn name(&self) -> &'static str {
        "sum_dim"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut keep = self.x.shape().to_vec();
        keep[self.dim] = 1;
        let gk = g.reshape(&keep)?.broadcast_as(self.x.shape())?;
        Ok(vec![Some(crate::elementwise::materialize(&gk)?)])
    }
}

/// Sum a gradient of a broadcast result back to the operand's `shape` (the
/// reverse of numpy broadcasting); `g` itself when the shapes are equal.
/// Each run of consecutive broadcast dimensions is summed in one pass.
pub(crate) fn sum_to_shape(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    if !g.device().is_cpu() {
        // a broadcast operand's gradient on a kernel device: summed through the host (no
        // strided reduce kernel; the model's ops broadcast only biases, which bias_add owns)
        return g.sum_to_shape(shape);
    }
    let d = float_dtype("sum_to_shape", &[g])?;
    ensure!(
        Layout::contiguous(shape).broadcast_as(g.shape()).is_ok(),
        "sum_to_shape: {shape:?} does not broadcast to {:?}",
        g.shape()
    );
    let rank = g.rank();
    let lead = rank - shape.len();
    // target shape aligned to g's rank
    let tgt: Vec<usize> = std::iter::repeat_n(1, lead)
        .chain(shape.iter().copied())
        .collect();
    let mut cur = g.clone();
    let mut cur_shape = g.shape().to_vec();
    let mut i = 0;
    while i < rank {
        if tgt[i] != 1 || cur_shape[i] == 1 {
            i += 1;
            continue;
        }
        // a run [i, j) of dims the target keeps as 1 (size-1 dims may join it)
        let mut j = i;
        while j < rank && tgt[j] == 1 {
            j += 1;
        }
        let outer: usize = cur_shape[..i].iter().product();
        let n: usize = cur_shape[i..j].iter().product();
        let inner: usize = cur_shape[j..].iter().product();
        cur_shape[i..j].fill(1);
        cur = dispatch_float!(
            "sum_to_shape",
            d,
            sum_axis_t::<T>(&cur, (outer, n, inner), 1.0, &cur_shape, None)
        )?;
        i = j;
    }
    cur.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::{DType, Device};

    #[test]
    fn sums_are_accurate_and_thread_independent() {
        // 1 + many tiny values: a naive f32 running sum would lose them all.
        let n = 1 << 20;
        let mut v = vec![1e-8f32; n];
        v[0] = 1.0;
        let x = Tensor::from_vec(v, &[n], Device::Cpu).unwrap();
        let s = sum(&x).unwrap();
        assert_eq!(s.shape(), &[] as &[usize]);
        let want = 1.0 + 1e-8f32 as f64 * (n - 1) as f64;
        assert!((s.to_scalar_f64().unwrap() - want).abs() < 1e-6);
        let at = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let x =
                        Tensor::rand_normal(&[3, 70001, 5], DType::F32, 1, 2, Device::Cpu).unwrap();
                    let a = sum_dim(&x, 1, false).unwrap().to_vec::<f32>().unwrap();
                    let b = sum(&x).unwrap().to_vec::<f32>().unwrap();
                    (a, b)
                })
        };
        assert_eq!(at(1), at(2));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
        assert!(sum_dim(&x, 2, false).is_err());
        let i = Tensor::zeros(&[2], DType::U32, Device::Cpu).unwrap();
        assert!(sum(&i).is_err());
        assert!(sum_to_shape(&x, &[4]).is_err());
    }

    #[test]
    fn sum_to_shape_handles_inner_and_outer_runs() {
        let g =
            Tensor::from_vec((0..24).map(|v| v as f64).collect(), &[2, 3, 4], Device::Cpu).unwrap();
        let s = sum_to_shape(&g, &[3, 1]).unwrap();
        assert_eq!(s.shape(), &[3, 1]);
        // sum over dims 0 and 2 of arange(24).reshape(2,3,4)
        assert_eq!(s.to_vec::<f64>().unwrap(), vec![60.0, 92.0, 124.0]);
        let e = sum_to_shape(&g, &[]).unwrap();
        assert_eq!(e.to_vec::<f64>().unwrap(), vec![276.0]);
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, rows_cols, run, u32_fits, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};

    use kf_engine::DType;
    use kf_kernels::reduce;

    /// Column sums of `x [.., C]` over all rows: `[C]` (f32 accumulation, fixed order).
    pub fn colsum<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor) -> Out {
        let op = "colsum";
        f32_in(op, "x", x)?;
        let (rows, cols) = rows_cols(op, x)?;
        u32_fits(op, &[rows, cols])?;
        let out = DTensor::uninit(dev, &[cols], DType::F32)?;
        if cols == 0 {
            return Ok(out);
        }
        let (cfg, chunk, k) = reduce::colsum_config(rows, cols);
        if k == 1 {
            run(
                dev,
                "colsum_f32",
                cfg,
                &[
                    KArg::Buf(&x.buf),
                    KArg::Buf(&out.buf),
                    KArg::U32(rows as u32),
                    KArg::U32(cols as u32),
                    KArg::U32(chunk),
                ],
            )?;
        } else {
            let part = DTensor::uninit(dev, &[k as usize, cols], DType::F32)?;
            run(
                dev,
                "colsum_f32",
                cfg,
                &[
                    KArg::Buf(&x.buf),
                    KArg::Buf(&part.buf),
                    KArg::U32(rows as u32),
                    KArg::U32(cols as u32),
                    KArg::U32(chunk),
                ],
            )?;
            run(
                dev,
                "colsum_finish_f32",
                reduce::colsum_finish_config(cols),
                &[
                    KArg::Buf(&part.buf),
                    KArg::Buf(&out.buf),
                    KArg::U32(cols as u32),
                    KArg::U32(k),
                ],
            )?;
        }
        Ok(out)
    }

    /// The sum of squares of every element of `xs` (f32 tensors): `[1]` on the device.
    pub fn sumsq<D: KernelDevice + ?Sized>(dev: &D, xs: &[&DTensor]) -> Out {
        let op = "sumsq";
        for (i, x) in xs.iter().enumerate() {
            f32_in(op, &format!("buffer {i}"), x)?;
        }
        let lens: Vec<usize> = xs.iter().map(|x| x.numel()).collect();
        let (slots, p) = reduce::sumsq_slots(&lens);
        let part = DTensor::uninit(dev, &[(p as usize).max(1)], DType::F32)?;
        for ((x, &slot), &n) in xs.iter().zip(&slots).zip(&lens) {
            run(
                dev,
                "sumsq_f32",
                reduce::sumsq_config(n),
                &[
                    KArg::Buf(&x.buf),
                    KArg::U64(n as u64),
                    KArg::Buf(&part.buf),
                    KArg::U32(slot),
                ],
            )?;
        }
        let out = DTensor::uninit(dev, &[1], DType::F32)?;
        run(
            dev,
            "sumsq_finish_f32",
            reduce::sumsq_finish_config(),
            &[KArg::Buf(&part.buf), KArg::U32(p), KArg::Buf(&out.buf)],
        )?;
        Ok(out)
    }
}
