//! kf-ops: every op of the engine (CPU reference now; CUDA launch later) with
//! its backward rule next to its forward, and the op registry that tests,
//! benchmarks and the model share.
