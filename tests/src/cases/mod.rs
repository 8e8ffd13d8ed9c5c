//! Harness cases for every op, one file per op family. The match below is
//! exhaustive on purpose: a new `OpKind` does not compile until it has cases.

use crate::harness::Case;
use kf_ops::OpKind;

pub mod attention;
pub mod linalg;
pub mod norm;
pub mod sampling;

/// All harness cases of `op`.
pub fn cases(op: OpKind) -> Vec<Case> {
    match op {
        OpKind::Matmul
        | OpKind::Linear
        | OpKind::Add
        | OpKind::Mul
        | OpKind::Scale
        | OpKind::BiasAdd
        | OpKind::Sum
        | OpKind::Mean
        | OpKind::Embedding
        | OpKind::AdamW => linalg::cases(op),
        OpKind::LayerNorm
        | OpKind::LayerNormBias
        | OpKind::Rope
        | OpKind::GeluTanh
        | OpKind::GeluErf
        | OpKind::Softmax
        | OpKind::CrossEntropy => norm::cases(op),
        OpKind::Attention => attention::cases(op),
        OpKind::NoiseFeatures | OpKind::SampleInverseCdf | OpKind::ArgmaxPenalty => {
            sampling::cases(op)
        }
    }
}
