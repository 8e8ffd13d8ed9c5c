//! Shape, strides and offset of a tensor view over its storage. Views
//! (transpose, permute, narrow, broadcast) only rewrite a `Layout`; strides
//! are in elements, and a stride of 0 marks a broadcast dimension.

use anyhow::{bail, ensure, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Row-major strides of a contiguous tensor of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1usize;
    for i in (0..shape.len()).rev() {
        strides[i] = s;
        s = s.saturating_mul(shape[i].max(1));
    }
    strides
}

/// Number of elements of `shape`, or an error if it overflows.
pub fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| anyhow::anyhow!("shape {shape:?} has too many elements"))
    })
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
        }
    }

    pub fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Result<Self> {
        ensure!(
            shape.len() == strides.len(),
            "layout: shape {shape:?} and strides {strides:?} differ in rank"
        );
        Ok(Layout {
            shape,
            strides,
            offset,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements are laid out row-major without gaps from `offset`.
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true; // nothing to lay out
        }
        let mut expect = 1usize;
        for i in (0..self.shape.len()).rev() {
            if self.shape[i] != 1 && self.strides[i] != expect {
                return false;
            }
            expect *= self.shape[i];
        }
        true
    }

    /// One past the largest storage index this view can touch (0 if empty).
    pub fn storage_extent(&self) -> usize {
        if self.numel() == 0 {
            return self.offset;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    fn check_dim(&self, dim: usize, what: &str) -> Result<()> {
        ensure!(
            dim < self.rank(),
            "{what}: dimension {dim} out of range for shape {:?}",
            self.shape
        );
        Ok(())
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Self> {
        self.check_dim(d0, "transpose")?;
        self.check_dim(d1, "transpose")?;
        let mut l = self.clone();
        l.shape.swap(d0, d1);
        l.strides.swap(d0, d1);
        Ok(l)
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        ensure!(
            perm.len() == self.rank(),
            "permute: {perm:?} has rank {} but the shape {:?} has rank {}",
            perm.len(),
            self.shape,
            self.rank()
        );
        let mut seen = vec![false; perm.len()];
        for &p in perm {
            ensure!(
                p < perm.len() && !seen[p],
                "permute: {perm:?} is not a permutation"
            );
            seen[p] = true;
        }
        Ok(Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        self.check_dim(dim, "narrow")?;
        ensure!(
            start.checked_add(len).is_some_and(|e| e <= self.shape[dim]),
            "narrow: range {start}..{} out of bounds for dimension {dim} of shape {:?}",
            start.saturating_add(len),
            self.shape
        );
        let mut l = self.clone();
        l.shape[dim] = len;
        if len > 0 {
            l.offset += start * self.strides[dim];
        }
        Ok(l)
    }

    /// Broadcast to `shape` (numpy rules: leading dims added, size-1 dims stretched).
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Self> {
        ensure!(
            shape.len() >= self.rank(),
            "broadcast: cannot broadcast shape {:?} to lower rank {shape:?}",
            self.shape
        );
        let lead = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for (i, &d) in shape.iter().enumerate() {
            if i < lead {
                continue;
            }
            let src = self.shape[i - lead];
            if src == d {
                strides[i] = self.strides[i - lead];
            } else if src == 1 {
                strides[i] = 0;
            } else {
                bail!(
                    "broadcast: cannot broadcast shape {:?} to {shape:?}",
                    self.shape
                );
            }
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset,
        })
    }

    /// Calls `f(storage_index)` for every element in row-major logical order.
    pub fn for_each_index(&self, mut f: impl FnMut(usize)) {
        let n = self.numel();
        if n == 0 {
            return;
        }
        let rank = self.rank();
        if rank == 0 {
            f(self.offset);
            return;
        }
        let inner = self.shape[rank - 1];
        let inner_stride = self.strides[rank - 1];
        let mut idx = vec![0usize; rank];
        let mut base = self.offset;
        loop {
            for j in 0..inner {
                f(base + j * inner_stride);
            }
            // advance the outer multi-index
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                base += self.strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                base -= idx[d] * self.strides[d];
                idx[d] = 0;
            }
        }
    }
}

/// (run length, number of leading dims walked) of two layouts of one shape: the trailing
/// dims over which both are gap-free form the run.
fn common_run(a: &Layout, b: &Layout) -> (usize, usize) {
    let mut run = 1usize;
    let mut outer = a.rank();
    while outer > 0 {
        let d = outer - 1;
        let s = a.shape[d];
        if s != 1 && (a.strides[d] != run || b.strides[d] != run) {
            break;
        }
        run *= s;
        outer = d;
    }
    (run, outer)
}

/// The shape and both strides of two layouts of one shape with size-1 dims dropped and each
/// dim merged into the next where both layouts step over it as one (a stride copy then walks
/// the fewest dims). Offsets are not included.
pub fn collapse_pair(a: &Layout, b: &Layout) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    debug_assert_eq!(a.shape, b.shape, "collapse_pair: shapes differ");
    let (mut shape, mut sa, mut sb): (Vec<usize>, Vec<usize>, Vec<usize>) =
        (vec![], vec![], vec![]);
    for k in 0..a.shape.len() {
        let (d, x, y) = (a.shape[k], a.strides[k], b.strides[k]);
        if d == 1 {
            continue;
        }
        match (shape.last_mut(), sa.last_mut(), sb.last_mut()) {
            (Some(pd), Some(px), Some(py)) if *px == x * d && *py == y * d => {
                *pd *= d;
                *px = x;
                *py = y;
            }
            _ => {
                shape.push(d);
                sa.push(x);
                sb.push(y);
            }
        }
    }
    (shape, sa, sb)
}

/// The run length [`for_each_common_run`] walks `a` and `b` in (0 when empty).
pub fn common_run_len(a: &Layout, b: &Layout) -> usize {
    if a.numel() == 0 {
        0
    } else {
        common_run(a, b).0
    }
}

/// Walks two layouts of the same shape in row-major order as runs of elements that are
/// contiguous in both: calls `f(a_index, b_index)` with each run's first storage index in
/// `a` and `b`, and returns the run length (every run has the same; 0 calls when empty).
/// A device copies a view with one memcpy per run instead of one per element.
pub fn for_each_common_run(a: &Layout, b: &Layout, mut f: impl FnMut(usize, usize)) -> usize {
    debug_assert_eq!(a.shape, b.shape, "for_each_common_run: shapes differ");
    if a.numel() == 0 {
        return 0;
    }
    let (run, outer) = common_run(a, b);
    if outer == 0 {
        f(a.offset, b.offset);
        return run;
    }
    let mut idx = vec![0usize; outer];
    let (mut ia, mut ib) = (a.offset, b.offset);
    loop {
        f(ia, ib);
        let mut d = outer;
        loop {
            if d == 0 {
                return run;
            }
            d -= 1;
            idx[d] += 1;
            ia += a.strides[d];
            ib += b.strides[d];
            if idx[d] < a.shape[d] {
                break;
            }
            ia -= idx[d] * a.strides[d];
            ib -= idx[d] * b.strides[d];
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element's storage index under the collapsed dims equals the original's.
    #[test]
    fn collapse_pair_keeps_every_index() {
        let idx = |shape: &[usize], st: &[usize], mut i: usize| {
            let mut o = 0;
            for k in (0..shape.len()).rev() {
                o += (i % shape[k]) * st[k];
                i /= shape[k];
            }
            o
        };
        let cases = [
            (
                // the last two dims step as one in both: [4, 10]
                Layout::contiguous(&[4, 3, 5]).narrow(1, 1, 2).unwrap(),
                Layout::contiguous(&[4, 2, 5]),
                2,
            ),
            (
                Layout::contiguous(&[2, 1, 3, 4]).transpose(2, 3).unwrap(),
                Layout::contiguous(&[2, 1, 4, 3]),
                3,
            ),
            (
                Layout::contiguous(&[3, 1]).broadcast_as(&[3, 4]).unwrap(),
                Layout::contiguous(&[3, 4]),
                2,
            ),
            (
                Layout::contiguous(&[2, 3, 7]),
                Layout::contiguous(&[2, 3, 7]),
                1,
            ),
            (Layout::contiguous(&[1, 1]), Layout::contiguous(&[1, 1]), 0),
        ];
        for (a, b, rank) in cases {
            let (shape, sa, sb) = collapse_pair(&a, &b);
            assert_eq!(shape.len(), rank, "{a:?} / {b:?} -> {shape:?}");
            assert_eq!(shape.iter().product::<usize>(), a.numel());
            for i in 0..a.numel() {
                assert_eq!(idx(&shape, &sa, i), idx(a.shape(), a.strides(), i));
                assert_eq!(idx(&shape, &sb, i), idx(b.shape(), b.strides(), i));
            }
        }
    }

    #[test]
    fn common_runs_cover_every_element_once() {
        // a transposed-then-narrowed view against a contiguous destination, a narrowed
        // destination against a contiguous source, and a broadcast source
        let cases = [
            (
                Layout::contiguous(&[4, 3, 5]).narrow(1, 1, 2).unwrap(),
                Layout::contiguous(&[4, 2, 5]),
            ),
            (
                Layout::contiguous(&[2, 6, 3]),
                Layout::contiguous(&[2, 9, 3]).narrow(1, 2, 6).unwrap(),
            ),
            (
                Layout::contiguous(&[3, 1]).broadcast_as(&[3, 4]).unwrap(),
                Layout::contiguous(&[3, 4]),
            ),
            (Layout::contiguous(&[2, 3]), Layout::contiguous(&[2, 3])),
        ];
        for (a, b) in cases {
            let mut pairs = vec![];
            let run = for_each_common_run(&a, &b, |x, y| {
                for j in 0..RUN_PROBE {
                    pairs.push((x + j, y + j));
                }
            });
            assert!(run >= 1);
            let pairs: Vec<(usize, usize)> = pairs
                .chunks(RUN_PROBE)
                .flat_map(|c| c[..run].to_vec())
                .collect();
            let want: Vec<(usize, usize)> = indices(&a).into_iter().zip(indices(&b)).collect();
            assert_eq!(pairs, want, "{a:?} vs {b:?}");
        }
        // two contiguous layouts are one run
        let l = Layout::contiguous(&[2, 3, 4]);
        assert_eq!(for_each_common_run(&l, &l, |_, _| {}), 24);
    }
    const RUN_PROBE: usize = 64;

    fn indices(l: &Layout) -> Vec<usize> {
        let mut v = vec![];
        l.for_each_index(|i| v.push(i));
        v
    }

    #[test]
    fn contiguous_iterates_in_order() {
        let l = Layout::contiguous(&[2, 3, 4]);
        assert!(l.is_contiguous());
        assert_eq!(indices(&l), (0..24).collect::<Vec<_>>());
    }

    #[test]
    fn transpose_and_narrow() {
        let l = Layout::contiguous(&[2, 3]).transpose(0, 1).unwrap();
        assert!(!l.is_contiguous());
        assert_eq!(indices(&l), vec![0, 3, 1, 4, 2, 5]);
        let n = Layout::contiguous(&[3, 4]).narrow(1, 1, 2).unwrap();
        assert_eq!(indices(&n), vec![1, 2, 5, 6, 9, 10]);
        assert!(Layout::contiguous(&[3, 4]).narrow(1, 3, 2).is_err());
    }

    #[test]
    fn broadcast_strides() {
        let l = Layout::contiguous(&[3, 1])
            .broadcast_as(&[2, 3, 2])
            .unwrap();
        assert_eq!(indices(&l), vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
        assert!(Layout::contiguous(&[3]).broadcast_as(&[2]).is_err());
    }

    #[test]
    fn empty_shapes_are_contiguous() {
        assert!(Layout::contiguous(&[2, 0]).is_contiguous());
        assert!(Layout::contiguous(&[0, 3])
            .transpose(0, 1)
            .unwrap()
            .is_contiguous());
        assert!(indices(&Layout::contiguous(&[2, 0])).is_empty());
    }

    #[test]
    fn permute_rejects_non_permutations() {
        let l = Layout::contiguous(&[2, 3, 4]);
        assert!(l.permute(&[0, 0, 1]).is_err());
        assert_eq!(l.permute(&[2, 0, 1]).unwrap().shape(), &[4, 2, 3]);
    }
}
