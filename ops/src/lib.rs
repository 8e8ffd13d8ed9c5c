//! kf-ops: every op of the engine (CPU reference now; CUDA launch later) with
//! its backward rule next to its forward, and the op registry that tests,
//! benchmarks and the model share. Ops take and return `Tensor`s, record a
//! backward node when an input tracks gradients, and compute in f32 or f64.

pub mod registry;
pub mod util;

// linear algebra and elementwise
pub mod adamw;
pub mod elementwise;
pub mod embedding;
/// The CPU GEMM lives in the engine (the emulator device multiplies with it too).
pub use kf_engine::gemm;
pub mod matmul;
pub mod reduce;

// normalisation, activations, losses
pub mod cross_entropy;
pub mod gelu;
pub mod layernorm;
pub mod rmsnorm;
pub mod rope;
pub mod softmax;
pub mod swiglu;

// attention with key-range patterns
pub mod attention;

// noise features, sampling, read-off
pub mod argmax;
pub mod noise;
pub mod sampling;

// the kernels of kernels/*.cu on a kernel device (the emulator or a GPU)
pub mod kdev;

pub use registry::OpKind;
