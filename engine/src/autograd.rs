//! Reverse-mode autograd. Every op whose inputs track gradients attaches a
//! `BackwardOp` node (its inputs plus whatever it saved) to its output; the
//! nodes form the tape. `Tensor::backward` walks it in reverse topological
//! order and accumulates gradients into a `GradStore`. The backward rules live
//! next to their forwards in the `ops` crate (views' rules live in tensor.rs).

use crate::tensor::{Tensor, TensorId};
use anyhow::{ensure, Context, Result};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};

/// The backward rule of one recorded op.
pub trait BackwardOp: Send + Sync {
    /// Op name, for error messages.
    fn name(&self) -> &'static str;
    /// The op's tensor inputs, in the order `backward` returns their gradients.
    fn inputs(&self) -> Vec<Tensor>;
    /// Gradients w.r.t. each input (None where an input gets no gradient), given
    /// the op's output and the gradient flowing into it.
    fn backward(&self, output: &Tensor, grad_output: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

thread_local! {
    static NO_GRAD_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// True unless inside a `no_grad()` scope on this thread.
pub fn grad_enabled() -> bool {
    NO_GRAD_DEPTH.with(|d| d.get() == 0)
}

/// Guard returned by `no_grad()`; recording resumes when it is dropped.
pub struct NoGradGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

/// Disable recording on this thread until the guard is dropped (inference).
pub fn no_grad() -> NoGradGuard {
    NO_GRAD_DEPTH.with(|d| d.set(d.get() + 1));
    NoGradGuard {
        _not_send: std::marker::PhantomData,
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Whether an op with these inputs should record a backward node.
pub fn should_record(inputs: &[&Tensor]) -> bool {
    grad_enabled() && inputs.iter().any(|t| t.tracks_grad())
}

/// Gradients keyed by tensor id.
#[derive(Default)]
pub struct GradStore {
    grads: HashMap<TensorId, Tensor>,
}

impl GradStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.grads.get(&t.id())
    }
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.grads.get(&id)
    }
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.grads.remove(&t.id())
    }
    pub fn insert(&mut self, t: &Tensor, g: Tensor) {
        self.grads.insert(t.id(), g);
    }
    pub fn len(&self) -> usize {
        self.grads.len()
    }
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }
    /// Add `g` to the gradient stored for `id`.
    pub fn accumulate(&mut self, id: TensorId, g: Tensor) -> Result<()> {
        match self.grads.remove(&id) {
            None => {
                self.grads.insert(id, g);
            }
            Some(prev) => {
                let sum = prev.add_same_shape(&g)?;
                self.grads.insert(id, sum);
            }
        }
        Ok(())
    }
}

/// Tensors reachable from `root` through recorded nodes, inputs before users.
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut visited: HashSet<TensorId> = HashSet::new();
    // iterative post-order DFS: (tensor, children pushed?)
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !visited.insert(t.id()) {
            continue;
        }
        let children = t.grad_node().map(|n| n.inputs()).unwrap_or_default();
        stack.push((t, true));
        for c in children {
            if c.tracks_grad() && !visited.contains(&c.id()) {
                stack.push((c, false));
            }
        }
    }
    order
}

/// Backward pass from `root` seeded with `seed` (ones when `None`). Gradients
/// of intermediate tensors are freed as soon as they are consumed; the store
/// keeps those of leaf variables (`Tensor::var`).
pub fn backward(root: &Tensor, seed: Option<Tensor>) -> Result<GradStore> {
    ensure!(
        root.tracks_grad(),
        "backward: the tensor does not depend on any variable that requires grad"
    );
    let _guard = no_grad();
    let seed = match seed {
        Some(s) => {
            ensure!(
                s.shape() == root.shape(),
                "backward: seed shape {:?} differs from output shape {:?}",
                s.shape(),
                root.shape()
            );
            s
        }
        None => Tensor::ones(root.shape(), root.dtype(), root.device())?,
    };
    let order = topo_order(root);
    let mut store = GradStore::new();
    store.grads.insert(root.id(), seed);
    for t in order.iter().rev() {
        let Some(node) = t.grad_node() else { continue };
        let grad = if t.is_var() {
            match store.get(t) {
                Some(g) => g.clone(),
                None => continue,
            }
        } else {
            match store.grads.remove(&t.id()) {
                Some(g) => g,
                None => continue,
            }
        };
        let inputs = node.inputs();
        let in_grads = node
            .backward(t, &grad)
            .with_context(|| format!("backward of {}", node.name()))?;
        ensure!(
            in_grads.len() == inputs.len(),
            "backward of {} returned {} gradients for {} inputs",
            node.name(),
            in_grads.len(),
            inputs.len()
        );
        for (inp, g) in inputs.iter().zip(in_grads) {
            let Some(g) = g else { continue };
            if !inp.tracks_grad() {
                continue;
            }
            ensure!(
                g.shape() == inp.shape(),
                "backward of {}: gradient shape {:?} differs from input shape {:?}",
                node.name(),
                g.shape(),
                inp.shape()
            );
            store.accumulate(inp.id(), g)?;
        }
    }
    Ok(store)
}
