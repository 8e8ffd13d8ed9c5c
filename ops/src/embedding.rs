//! Token embedding lookup `embedding(ids [..], table [V, D]) -> [.., D]` and its
//! backward, a scatter-add into [V, D]: positions are grouped by id (a stable
//! counting sort), each table row summed by one task in position order, so no
//! races and the same bits at any thread count. A 16-bit table gives f32 rows. Letters:
//! V vocabulary, D width.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::{expect_rank, float_dtype};
use anyhow::{bail, ensure, Result};
use half::{bf16, f16};
use kf_engine::autograd::{should_record, BackwardOp};
use kf_engine::{DType, Element, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Below this many output elements the kernels run on the calling thread.
const PAR_MIN: usize = 1 << 14;

/// The row `table[ids[..]]` for every id. Ids are u32; an id >= V is an error
/// naming the id, its position and V.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("embedding", &[ids, table])? {
        let y = launch::embedding(&*on.dev, &bridge::dt(ids)?, &bridge::dt(table)?)?;
        return bridge::back_recorded(&on, y, &[ids, table], || {
            Arc::new(EmbeddingBackward {
                ids: ids.clone(),
                table: table.clone(),
            })
        });
    }
    ensure!(
        ids.dtype() == DType::U32,
        "embedding: ids must be u32, got {} (shape {:?})",
        ids.dtype(),
        ids.shape()
    );
    let half = matches!(table.dtype(), DType::F16 | DType::BF16);
    if half && should_record(&[ids, table]) {
        // a 16-bit table on the tape: widened first, so the backward sees one dtype
        return embedding(ids, &table.to_dtype(DType::F32)?);
    }
    let d = if half {
        table.dtype()
    } else {
        float_dtype("embedding", &[table])?
    };
    expect_rank("embedding", "table", table, 2)?;
    let (v, dim) = (table.shape()[0], table.shape()[1]);
    let idc = ids.contiguous()?;
    let idv = idc.cpu_data::<u32>()?;
    if let Some(pos) = idv.iter().position(|&i| i as usize >= v) {
        // the multi-index of the flat position, for the message
        let mut rem = pos;
        let mut index = vec![0; ids.rank()];
        for (k, &s) in ids.shape().iter().enumerate().rev() {
            index[k] = rem % s;
            rem /= s;
        }
        bail!(
            "embedding: id {} at position {index:?} of ids {:?} is out of range for a table of V = {v} rows",
            idv[pos],
            ids.shape()
        );
    }
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    let node = should_record(&[ids, table]).then(|| {
        Arc::new(EmbeddingBackward {
            ids: ids.clone(),
            table: table.clone(),
        }) as Arc<dyn BackwardOp>
    });
    match d {
        // a 16-bit table (a model served from an f16 / bf16 file): its rows gathered, then
        // widened to the f32 activations (exact)
        DType::F16 => gather_t::<f16>(&idv, table, &shape, None)?.to_dtype(DType::F32),
        DType::BF16 => gather_t::<bf16>(&idv, table, &shape, None)?.to_dtype(DType::F32),
        _ => dispatch_float!("embedding", d, gather_t::<T>(&idv, table, &shape, node)),
    }
}

fn gather_t<T: Element>(
    ids: &[u32],
    table: &Tensor,
    shape: &[usize],
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    let dim = table.shape()[1];
    let tc = table.contiguous()?;
    let tab = tc.cpu_data::<T>()?;
    let mut out = OutBuf::<T>::uninit(ids.len() * dim);
    if dim > 0 {
        let row = |(o, &id): (&mut [T], &u32)| {
            let s = id as usize * dim;
            o.copy_from_slice(&tab[s..s + dim]);
        };
        let o = out.as_mut_slice();
        if o.len() >= PAR_MIN {
            o.par_chunks_mut(dim)
                .zip(ids.par_iter())
                .with_min_len((4096 / dim).max(1))
                .for_each(row);
        } else {
            o.chunks_mut(dim).zip(ids.iter()).for_each(row);
        }
    }
    out.finish(shape, node)
}

struct EmbeddingBackward {
    ids: Tensor,
    table: Tensor,
}

impl BackwardOp for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.ids.clone(), self.table.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (v, dim) = (self.table.shape()[0], self.table.shape()[1]);
        if let Some(on) = bridge::device_of("embedding backward", &[&self.ids, g])? {
            let ids = bridge::dt(&self.ids.reshape(&[self.ids.numel()])?)?;
            let g2 = bridge::dt(&g.reshape(&[self.ids.numel(), dim])?)?;
            let gt = launch::embedding_bwd(&*on.dev, &ids, &g2, v)?;
            return Ok(vec![None, Some(bridge::back(&on, gt)?)]);
        }
        let d = float_dtype("embedding backward", &[g, &self.table])?;
        let idc = self.ids.contiguous()?;
        let ids = idc.cpu_data::<u32>()?;
        let gt = dispatch_float!("embedding", d, scatter_add_t::<T>(&ids, g, v, dim))?;
        Ok(vec![None, Some(gt)])
    }
}

/// `out[v] = sum of g[p] over positions p with ids[p] == v`, in increasing p.
fn scatter_add_t<T: Float>(ids: &[u32], g: &Tensor, v: usize, dim: usize) -> Result<Tensor> {
    ensure!(
        g.numel() == ids.len() * dim,
        "embedding backward: gradient of shape {:?} does not match {} ids of width {dim}",
        g.shape(),
        ids.len()
    );
    let gc = g.contiguous()?;
    let gs = gc.cpu_data::<T>()?;
    // stable counting sort of positions by id: positions of id r are
    // order[start[r]..start[r + 1]], increasing
    let mut start = vec![0usize; v + 1];
    for &i in ids.iter() {
        start[i as usize + 1] += 1;
    }
    for r in 0..v {
        start[r + 1] += start[r];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; ids.len()];
    for (p, &i) in ids.iter().enumerate() {
        order[fill[i as usize]] = p;
        fill[i as usize] += 1;
    }
    let mut out = OutBuf::<T>::uninit(v * dim);
    if dim > 0 {
        let row = |acc: &mut Vec<f64>, (r, o): (usize, &mut [T])| {
            let ps = &order[start[r]..start[r + 1]];
            match ps {
                [] => o.fill(T::ZERO),
                [p] => o.copy_from_slice(&gs[p * dim..(p + 1) * dim]),
                _ => {
                    acc.clear();
                    acc.resize(dim, 0.0);
                    for &p in ps {
                        for (a, &x) in acc.iter_mut().zip(&gs[p * dim..(p + 1) * dim]) {
                            *a += x.to_f64();
                        }
                    }
                    for (o, &a) in o.iter_mut().zip(acc.iter()) {
                        *o = T::from_f64(a);
                    }
                }
            }
        };
        let o = out.as_mut_slice();
        if o.len() + gs.len() >= PAR_MIN {
            o.par_chunks_mut(dim)
                .enumerate()
                .with_min_len((4096 / dim).max(1))
                .for_each_init(Vec::new, row);
        } else {
            let mut acc = Vec::new();
            for x in o.chunks_mut(dim).enumerate() {
                row(&mut acc, x);
            }
        }
    }
    out.finish(&[v, dim], None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::Device;

    #[test]
    fn out_of_range_id_is_an_error_naming_it() {
        let table = Tensor::zeros(&[5, 3], DType::F32, Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![0u32, 4, 1, 5], &[2, 2], Device::Cpu).unwrap();
        let e = embedding(&ids, &table).unwrap_err().to_string();
        assert!(
            e.contains("id 5") && e.contains("[1, 1]") && e.contains("V = 5"),
            "{e}"
        );
        let fids = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
        assert!(embedding(&fids, &table).is_err());
        let t1 = Tensor::zeros(&[5], DType::F32, Device::Cpu).unwrap();
        let ok = Tensor::from_vec(vec![0u32], &[1], Device::Cpu).unwrap();
        assert!(embedding(&ok, &t1).is_err());
    }

    #[test]
    fn backward_is_identical_at_one_and_two_threads() {
        let (v, dim, n) = (50, 33, 4000);
        // many repeats of few ids, so rows sum long runs of positions
        let ids: Vec<u32> = (0..n as u32).map(|p| (p * 7919 + p / 3) % 37).collect();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let ids = Tensor::from_vec(ids.clone(), &[n / 8, 8], Device::Cpu).unwrap();
                    let table =
                        Tensor::rand_normal(&[v, dim], DType::F32, 3, 0, Device::Cpu).unwrap();
                    let table = table.var();
                    let seed = Tensor::rand_normal(&[n / 8, 8, dim], DType::F32, 3, 1, Device::Cpu)
                        .unwrap();
                    let out = embedding(&ids, &table).unwrap();
                    let g = out.backward_with(seed).unwrap();
                    g.get(&table).unwrap().to_vec::<f32>().unwrap()
                })
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // ids 37..50 never occur: their rows are zero
        assert!(a[37 * dim..].iter().all(|&x| x == 0.0));
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, rows_cols, run, u32_fits, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::ensure;
    use kf_engine::DType;
    use kf_kernels::embedding as emb;

    /// Rows of `table [V, D]` at u32 `ids [...]`: `[..., D]`. An id >= V gives a NaN row (the
    /// kernel reads nothing out of range; the CPU op errors instead).
    pub fn embedding<D: KernelDevice + ?Sized>(dev: &D, ids: &DTensor, table: &DTensor) -> Out {
        let op = "embedding";
        ids.expect_dtype(op, "ids", DType::U32)?;
        f32_in(op, "table", table)?;
        ensure!(
            table.rank() == 2,
            "{op}: table must be [V, D], got {:?}",
            table.shape()
        );
        let (v, d) = (table.shape()[0], table.shape()[1]);
        ensure!(
            v <= u32::MAX as usize && d <= u32::MAX as usize,
            "{op}: table {:?} too large",
            table.shape()
        );
        let n = ids.numel();
        let mut shape = ids.shape().to_vec();
        shape.push(d);
        let out = DTensor::uninit(dev, &shape, DType::F32)?;
        if n > 0 && d > 0 {
            run(
                dev,
                "embedding_fwd_f32",
                emb::fwd_config(n),
                &[
                    KArg::Buf(&ids.buf),
                    KArg::Buf(&table.buf),
                    KArg::Buf(&out.buf),
                    KArg::U64(n as u64),
                    KArg::U32(d as u32),
                    KArg::U32(v as u32),
                ],
            )?;
        }
        Ok(out)
    }

    /// Gradient of the table `[V, D]` of an embedding gather at u32 `ids [..]` from
    /// `g [.., D]`: rows summed in position order (deterministic, no atomics). Ids >= V are an
    /// error (checked on the host, as the CPU op does).
    pub fn embedding_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        ids: &DTensor,
        g: &DTensor,
        v: usize,
    ) -> Out {
        let op = "embedding_bwd";
        ids.expect_dtype(op, "ids", DType::U32)?;
        f32_in(op, "grad", g)?;
        let (n, d) = rows_cols(op, g)?;
        ensure!(
            n == ids.numel(),
            "{op}: {} ids but grad {:?} has {n} rows",
            ids.numel(),
            g.shape()
        );
        u32_fits(op, &[d, v])?;
        if let Some(&bad) = ids
            .to_vec::<D, u32>(dev)?
            .iter()
            .find(|&&i| i as usize >= v)
        {
            anyhow::bail!("{op}: id {bad} outside the table of {v} rows");
        }
        let out = DTensor::uninit(dev, &[v, d], DType::F32)?;
        if v == 0 || d == 0 {
            return Ok(out);
        }
        run(
            dev,
            "embedding_bwd_f32",
            emb::bwd_config(d, v),
            &[
                KArg::Buf(&ids.buf),
                KArg::Buf(&g.buf),
                KArg::Buf(&out.buf),
                KArg::U64(n as u64),
                KArg::U32(d as u32),
                KArg::U32(v as u32),
            ],
        )?;
        Ok(out)
    }
}
