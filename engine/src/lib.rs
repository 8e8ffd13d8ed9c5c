//! kf-engine: tensors and devices for kfrun. Dtypes, layouts (views without
//! copies), storage (owned or memory-mapped), the autograd tape, the Philox
//! counter-based RNG and safetensors I/O. Nothing here knows about
//! transformers; the ops live in `kf-ops`.

pub mod autograd;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dist;
pub mod dtype;
pub mod emu;
pub mod fs;
pub mod gemm;
pub mod gguf;
pub mod io;
pub mod kernel_device;
pub mod layout;
pub mod outbuf;
pub mod quant;
pub mod rng;
pub mod safetensors;
pub mod storage;
pub mod tensor;

pub use autograd::{no_grad, BackwardOp, GradStore};
pub use device::Device;
pub use dtype::{DType, Element, Float};
pub use kernel_device::{DeviceBuf, KernelDevice};
pub use layout::Layout;
pub use outbuf::OutBuf;
pub use tensor::{Tensor, TensorId};
