//! Elementwise arithmetic: `add`, `sub`, `mul` with numpy broadcasting in both
//! directions, `scale` by a constant, and `bias_add` (x [.., N] + b [N], the
//! bias of a linear layer). Backward rules sum gradients over broadcast dims.
//! Letters: N the last (feature) dimension, R all leading dims flattened.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::reduce::{sum_axis_into, sum_to_shape};
use crate::util::{expect_rank, float_dtype};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::autograd::{should_record, BackwardOp};
use kf_engine::layout::Layout;
use kf_engine::{Element, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Below this many output elements a kernel runs on the calling thread.
const PAR_MIN: usize = 1 << 14;

/// Run `f` on the whole CPU storage slice of `t` (index it with `t.layout()`),
/// for kernels that read strided views without copying.
pub(crate) fn with_raw<T: Element, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    ensure!(
        t.dtype() == T::DTYPE,
        "tensor has dtype {}, kernel expects {}",
        t.dtype(),
        T::DTYPE
    );
    let g = t.storage()?;
    let s = g.cpu()?;
    let buf = T::buf(s).context("storage variant differs from the tensor dtype")?;
    Ok(f(buf.as_slice()))
}

/// Storage offset of the first element of row `r` (rows = all dims but the last).
#[inline]
fn row_offset(l: &Layout, mut r: usize) -> usize {
    let (shape, strides) = (l.shape(), l.strides());
    let mut off = l.offset();
    for d in (0..shape.len() - 1).rev() {
        off += (r % shape[d]) * strides[d];
        r /= shape[d];
    }
    off
}

/// `out[i] = f(a[la(i)], b[lb(i)])` over the logical elements of two layouts of
/// the same shape (broadcast views allowed: stride 0), rows in parallel.
fn strided_binary<T: Float>(
    xa: &[T],
    la: &Layout,
    xb: &[T],
    lb: &Layout,
    out: &mut [T],
    f: impl Fn(T, T) -> T + Sync,
) {
    let rank = la.rank();
    if out.is_empty() {
        return;
    }
    if rank == 0 {
        out[0] = f(xa[la.offset()], xb[lb.offset()]);
        return;
    }
    let inner = la.shape()[rank - 1];
    let (sa, sb) = (la.strides()[rank - 1], lb.strides()[rank - 1]);
    let row = |(r, dst): (usize, &mut [T])| {
        let (oa, ob) = (row_offset(la, r), row_offset(lb, r));
        match (sa, sb) {
            (1, 1) => {
                let (ra, rb) = (&xa[oa..oa + inner], &xb[ob..ob + inner]);
                for ((o, &p), &q) in dst.iter_mut().zip(ra).zip(rb) {
                    *o = f(p, q);
                }
            }
            (1, 0) => {
                let q = xb[ob];
                for (o, &p) in dst.iter_mut().zip(&xa[oa..oa + inner]) {
                    *o = f(p, q);
                }
            }
            (0, 1) => {
                let p = xa[oa];
                for (o, &q) in dst.iter_mut().zip(&xb[ob..ob + inner]) {
                    *o = f(p, q);
                }
            }
            _ => {
                for (j, o) in dst.iter_mut().enumerate() {
                    *o = f(xa[oa + j * sa], xb[ob + j * sb]);
                }
            }
        }
    };
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(inner)
            .enumerate()
            .with_min_len((4096 / inner).max(1))
            .for_each(row);
    } else {
        out.chunks_mut(inner).enumerate().for_each(row);
    }
}

/// A contiguous copy of `t` (which may be a strided or broadcast view), made
/// in parallel; not recorded on the tape.
pub(crate) fn materialize(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        return Ok(t.detach());
    }
    if !t.device().is_cpu() {
        return Ok(t.whole_buffer()?.detach());
    }
    let d = float_dtype("materialize", &[t])?;
    fn go<T: Float>(t: &Tensor) -> Result<Tensor> {
        let mut out = OutBuf::<T>::uninit(t.numel());
        with_raw::<T, _>(t, |x| {
            strided_binary(x, t.layout(), x, t.layout(), out.as_mut_slice(), |p, _| p)
        })?;
        out.finish(t.shape(), None)
    }
    dispatch_float!("materialize", d, go::<T>(t))
}

/// The numpy broadcast of two shapes (aligned at the right; each pair of sizes
/// equal or one of them 1).
pub fn broadcast_shapes(op: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => bail!("{op}: shapes {a:?} and {b:?} do not broadcast"),
        };
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinOp {
    Add,
    Sub,
    Mul,
}

impl BinOp {
    fn name(self) -> &'static str {
        match self {
            BinOp::Add => "add",
            BinOp::Sub => "sub",
            BinOp::Mul => "mul",
        }
    }
}

fn binary(a: &Tensor, b: &Tensor, op: BinOp) -> Result<Tensor> {
    if let Some(on) = bridge::device_of(op.name(), &[a, b])? {
        // the kernels take equal shapes: a broadcast operand is materialised (bridge::dt)
        let shape = broadcast_shapes(op.name(), a.shape(), b.shape())?;
        let (da, db) = (
            bridge::dt(&a.broadcast_as(&shape)?)?,
            bridge::dt(&b.broadcast_as(&shape)?)?,
        );
        let r = match op {
            BinOp::Add => launch::add(&*on.dev, &da, &db)?,
            BinOp::Sub => launch::sub(&*on.dev, &da, &db)?,
            BinOp::Mul => launch::mul(&*on.dev, &da, &db)?,
        };
        return bridge::back_recorded(&on, r, &[a, b], || {
            Arc::new(BinaryBackward {
                a: a.clone(),
                b: b.clone(),
                op,
            })
        });
    }
    let d = float_dtype(op.name(), &[a, b])?;
    let shape = broadcast_shapes(op.name(), a.shape(), b.shape())?;
    let node = should_record(&[a, b]).then(|| {
        Arc::new(BinaryBackward {
            a: a.clone(),
            b: b.clone(),
            op,
        }) as Arc<dyn BackwardOp>
    });
    dispatch_float!(op.name(), d, binary_t::<T>(a, b, &shape, op, node))
}

fn binary_t<T: Float>(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    op: BinOp,
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    match op {
        BinOp::Add => binary_f::<T>(a, b, shape, node, |p, q| p + q),
        BinOp::Sub => binary_f::<T>(a, b, shape, node, |p, q| p - q),
        BinOp::Mul => binary_f::<T>(a, b, shape, node, |p, q| p * q),
    }
}

fn binary_f<T: Float>(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    node: Option<Arc<dyn BackwardOp>>,
    f: impl Fn(T, T) -> T + Sync + Send,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut out = OutBuf::<T>::uninit(n);
    if a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous() {
        // fast path: equal shapes, plain zip
        let (xa, xb) = (a.cpu_data::<T>()?, b.cpu_data::<T>()?);
        let o = out.as_mut_slice();
        if n >= PAR_MIN {
            o.par_iter_mut()
                .zip(xa.par_iter())
                .zip(xb.par_iter())
                .with_min_len(4096)
                .for_each(|((o, &p), &q)| *o = f(p, q));
        } else {
            for ((o, &p), &q) in o.iter_mut().zip(xa.iter()).zip(xb.iter()) {
                *o = f(p, q);
            }
        }
    } else {
        let la = a.layout().broadcast_as(shape)?;
        let lb = b.layout().broadcast_as(shape)?;
        with_raw::<T, _>(a, |xa| {
            with_raw::<T, _>(b, |xb| {
                strided_binary(xa, &la, xb, &lb, out.as_mut_slice(), f)
            })
        })??;
    }
    out.finish(shape, node)
}

/// `a + b` with numpy broadcasting.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinOp::Add)
}

/// `a - b` with numpy broadcasting.
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinOp::Sub)
}

/// `a * b` (elementwise) with numpy broadcasting.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinOp::Mul)
}

struct BinaryBackward {
    a: Tensor,
    b: Tensor,
    op: BinOp,
}

impl BackwardOp for BinaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&self.a, &self.b);
        let ga = if a.tracks_grad() {
            Some(match self.op {
                BinOp::Add | BinOp::Sub => sum_to_shape(g, a.shape())?,
                BinOp::Mul => sum_to_shape(&mul(g, b)?, a.shape())?,
            })
        } else {
            None
        };
        let gb = if b.tracks_grad() {
            Some(match self.op {
                BinOp::Add => sum_to_shape(g, b.shape())?,
                BinOp::Sub => scale(&sum_to_shape(g, b.shape())?, -1.0)?,
                BinOp::Mul => sum_to_shape(&mul(g, a)?, b.shape())?,
            })
        } else {
            None
        };
        Ok(vec![ga, gb])
    }
}

/// `x * s` for a constant `s`.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("scale", &[x])? {
        let y = launch::scale(&*on.dev, &bridge::dt(x)?, s as f32)?;
        return bridge::back_recorded(&on, y, &[x], || Arc::new(ScaleBackward { x: x.clone(), s }));
    }
    let d = float_dtype("scale", &[x])?;
    dispatch_float!("scale", d, scale_t::<T>(x, s))
}

fn scale_t<T: Float>(x: &Tensor, s: f64) -> Result<Tensor> {
    let xc = x.contiguous()?;
    let xs = xc.cpu_data::<T>()?;
    let mut out = OutBuf::<T>::uninit(xs.len());
    let sv = T::from_f64(s);
    if xs.len() >= PAR_MIN {
        out.as_mut_slice()
            .par_iter_mut()
            .zip(xs.par_iter())
            .with_min_len(4096)
            .for_each(|(o, &a)| *o = a * sv);
    } else {
        for (o, &a) in out.as_mut_slice().iter_mut().zip(xs.iter()) {
            *o = a * sv;
        }
    }
    let node = should_record(&[x])
        .then(|| Arc::new(ScaleBackward { x: x.clone(), s }) as Arc<dyn BackwardOp>);
    out.finish(x.shape(), node)
}

struct ScaleBackward {
    x: Tensor,
    s: f64,
}

impl BackwardOp for ScaleBackward {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(scale(g, self.s)?)])
    }
}

/// `x [.., N] + b [N]`, b added to every row.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("bias_add", &[x, b])? {
        let y = launch::bias_add(&*on.dev, &bridge::dt(x)?, &bridge::dt(b)?)?;
        return bridge::back_recorded(&on, y, &[x, b], || {
            Arc::new(BiasAddBackward {
                x: x.clone(),
                b: b.clone(),
            })
        });
    }
    let d = float_dtype("bias_add", &[x, b])?;
    expect_rank("bias_add", "bias", b, 1)?;
    ensure!(
        x.rank() >= 1 && x.shape()[x.rank() - 1] == b.numel(),
        "bias_add: x of shape {:?} does not end in the bias size {}",
        x.shape(),
        b.numel()
    );
    dispatch_float!("bias_add", d, bias_add_t::<T>(x, b))
}

fn bias_add_t<T: Float>(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (xc, bc) = (x.contiguous()?, b.contiguous()?);
    let (xs, bs) = (xc.cpu_data::<T>()?, bc.cpu_data::<T>()?);
    let n = bs.len();
    let mut out = OutBuf::<T>::uninit(xs.len());
    if n > 0 {
        let row = |(o, r): (&mut [T], &[T])| {
            for ((o, &p), &q) in o.iter_mut().zip(r).zip(bs.iter()) {
                *o = p + q;
            }
        };
        if xs.len() >= PAR_MIN {
            out.as_mut_slice()
                .par_chunks_mut(n)
                .zip(xs.par_chunks(n))
                .with_min_len((4096 / n).max(1))
                .for_each(row);
        } else {
            out.as_mut_slice()
                .chunks_mut(n)
                .zip(xs.chunks(n))
                .for_each(row);
        }
    }
    let node = should_record(&[x, b]).then(|| {
        Arc::new(BiasAddBackward {
            x: x.clone(),
            b: b.clone(),
        }) as Arc<dyn BackwardOp>
    });
    out.finish(x.shape(), node)
}

/// Sum of `g [.., N]` over all rows: the gradient of a bias of size N.
pub(crate) fn sum_rows(g: &Tensor, n: usize) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("sum_rows", &[g])? {
        let g2 = bridge::dt(&g.reshape(&[g.numel() / n.max(1), n])?)?;
        return bridge::back(&on, crate::reduce::launch::colsum(&*on.dev, &g2)?);
    }
    let d = float_dtype("sum_rows", &[g])?;
    fn go<T: Float>(g: &Tensor, n: usize) -> Result<Tensor> {
        let gc = g.contiguous()?;
        let gs = gc.cpu_data::<T>()?;
        let rows = gs.len().checked_div(n).unwrap_or(0);
        let mut out = OutBuf::<T>::uninit(n);
        sum_axis_into(&gs, 1, rows, n, 1.0, out.as_mut_slice());
        out.finish(&[n], None)
    }
    dispatch_float!("sum_rows", d, go::<T>(g, n))
}

/// `dx = g`, `db = g` summed over rows (also the tail of `gelu::bias_gelu_tanh`'s rule).
pub(crate) struct BiasAddBackward {
    pub(crate) x: Tensor,
    pub(crate) b: Tensor,
}

impl BackwardOp for BiasAddBackward {
    fn name(&self) -> &'static str {
        "bias_add"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.b.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let gx = self.x.tracks_grad().then(|| g.clone());
        let gb = if self.b.tracks_grad() {
            Some(sum_rows(g, self.b.numel())?)
        } else {
            None
        };
        Ok(vec![gx, gb])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::{DType, Device};

    fn t(v: &[f64], s: &[usize]) -> Tensor {
        Tensor::from_slice(v, s, Device::Cpu).unwrap()
    }

    #[test]
    fn bad_shapes_are_errors() {
        let a = t(&[1., 2., 3.], &[3]);
        let b = t(&[1., 2.], &[2]);
        let e = add(&a, &b).unwrap_err().to_string();
        assert!(
            e.contains("add") && e.contains("[3]") && e.contains("[2]"),
            "{e}"
        );
        assert!(mul(&a, &b).is_err());
        assert!(bias_add(&a, &b).is_err());
        assert!(bias_add(&t(&[1., 2.], &[1, 2]), &t(&[1., 2.], &[1, 2])).is_err());
        let f = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        assert!(add(&a, &f).is_err());
    }

    #[test]
    fn broadcasting_both_ways_and_views() {
        let a = t(&[1., 2., 3.], &[3, 1]);
        let b = t(&[10., 20.], &[2]);
        let c = add(&a, &b).unwrap();
        assert_eq!(c.shape(), &[3, 2]);
        assert_eq!(
            c.to_vec::<f64>().unwrap(),
            vec![11., 21., 12., 22., 13., 23.]
        );
        let s = sub(&b, &a).unwrap();
        assert_eq!(s.to_vec::<f64>().unwrap(), vec![9., 19., 8., 18., 7., 17.]);
        // a transposed view on the left
        let m = t(&[1., 2., 3., 4., 5., 6.], &[2, 3])
            .transpose(0, 1)
            .unwrap();
        let p = mul(&m, &t(&[1., 10.], &[2])).unwrap();
        assert_eq!(p.to_vec::<f64>().unwrap(), vec![1., 40., 2., 50., 3., 60.]);
    }

    #[test]
    fn sub_gradient() {
        let a = t(&[1., 2., 3.], &[3]).var();
        let b = t(&[5.], &[1]).var();
        let g = sub(&a, &b).unwrap().backward().unwrap();
        assert_eq!(g.get(&a).unwrap().to_vec::<f64>().unwrap(), vec![1.; 3]);
        assert_eq!(g.get(&b).unwrap().to_vec::<f64>().unwrap(), vec![-3.]);
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, rows_cols, run, same_shape_binary, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::ensure;
    use kf_engine::DType;
    use kf_kernels::elementwise;

    /// Elementwise binary op (`add`, `sub`, `mul`) of two f32 tensors of the same shape.
    fn binary<D: KernelDevice + ?Sized>(dev: &D, op: &str, a: &DTensor, b: &DTensor) -> Out {
        let entry = format!("{op}_f32");
        same_shape_binary(dev, op, &entry, elementwise::config(a.numel()), a, b)
    }

    /// `a + b` (same shapes).
    pub fn add<D: KernelDevice + ?Sized>(dev: &D, a: &DTensor, b: &DTensor) -> Out {
        binary(dev, "add", a, b)
    }

    /// `a - b` (same shapes).
    pub fn sub<D: KernelDevice + ?Sized>(dev: &D, a: &DTensor, b: &DTensor) -> Out {
        binary(dev, "sub", a, b)
    }

    /// `a * b` (same shapes).
    pub fn mul<D: KernelDevice + ?Sized>(dev: &D, a: &DTensor, b: &DTensor) -> Out {
        binary(dev, "mul", a, b)
    }

    /// `s * x`.
    pub fn scale<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, s: f32) -> Out {
        f32_in("scale", "x", x)?;
        let n = x.numel();
        let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
        run(
            dev,
            "scale_f32",
            elementwise::config(n),
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&out.buf),
                KArg::F32(s),
                KArg::U64(n as u64),
            ],
        )?;
        Ok(out)
    }

    /// `x [..., C] + b [C]` (the bias broadcast over rows).
    pub fn bias_add<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, b: &DTensor) -> Out {
        row_bias(dev, "bias_add", x, b)
    }

    /// An elementwise kernel of `x [..., C]` and a row bias `b [C]`: `<op>_f32(x, b, out, n, C)`.
    pub(crate) fn row_bias<D: KernelDevice + ?Sized>(
        dev: &D,
        op: &str,
        x: &DTensor,
        b: &DTensor,
    ) -> Out {
        f32_in(op, "x", x)?;
        f32_in(op, "bias", b)?;
        let (_, cols) = rows_cols(op, x)?;
        ensure!(
            b.shape() == [cols],
            "{op}: bias {:?} must be [{cols}] for x {:?}",
            b.shape(),
            x.shape()
        );
        let n = x.numel();
        let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
        run(
            dev,
            &format!("{op}_f32"),
            elementwise::config(n),
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&b.buf),
                KArg::Buf(&out.buf),
                KArg::U64(n as u64),
                KArg::U64(cols.max(1) as u64),
            ],
        )?;
        Ok(out)
    }
}
