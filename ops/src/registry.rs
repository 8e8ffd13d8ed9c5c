//! The op registry: one enum naming every op of the engine. The test harness
//! matches on it exhaustively (no `_ =>`), so an op added here fails to compile
//! until it has parity and gradient cases; benchmarks and the CUDA parity run
//! iterate the same list.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Matmul,
    Linear,
    Add,
    Mul,
    Scale,
    BiasAdd,
    Sum,
    Mean,
    Embedding,
    LayerNorm,
    LayerNormBias,
    Rope,
    GeluTanh,
    GeluErf,
    Softmax,
    CrossEntropy,
    Attention,
    NoiseFeatures,
    SampleInverseCdf,
    ArgmaxPenalty,
    AdamW,
}

impl OpKind {
    pub const ALL: &'static [OpKind] = &[
        OpKind::Matmul,
        OpKind::Linear,
        OpKind::Add,
        OpKind::Mul,
        OpKind::Scale,
        OpKind::BiasAdd,
        OpKind::Sum,
        OpKind::Mean,
        OpKind::Embedding,
        OpKind::LayerNorm,
        OpKind::LayerNormBias,
        OpKind::Rope,
        OpKind::GeluTanh,
        OpKind::GeluErf,
        OpKind::Softmax,
        OpKind::CrossEntropy,
        OpKind::Attention,
        OpKind::NoiseFeatures,
        OpKind::SampleInverseCdf,
        OpKind::ArgmaxPenalty,
        OpKind::AdamW,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Matmul => "matmul",
            OpKind::Linear => "linear",
            OpKind::Add => "add",
            OpKind::Mul => "mul",
            OpKind::Scale => "scale",
            OpKind::BiasAdd => "bias_add",
            OpKind::Sum => "sum",
            OpKind::Mean => "mean",
            OpKind::Embedding => "embedding",
            OpKind::LayerNorm => "layer_norm",
            OpKind::LayerNormBias => "layer_norm_bias",
            OpKind::Rope => "rope",
            OpKind::GeluTanh => "gelu_tanh",
            OpKind::GeluErf => "gelu_erf",
            OpKind::Softmax => "softmax",
            OpKind::CrossEntropy => "cross_entropy",
            OpKind::Attention => "attention",
            OpKind::NoiseFeatures => "noise_features",
            OpKind::SampleInverseCdf => "sample_inverse_cdf",
            OpKind::ArgmaxPenalty => "argmax_penalty",
            OpKind::AdamW => "adamw",
        }
    }

    /// Whether the op has a backward rule (and so needs gradient cases).
    pub fn differentiable(self) -> bool {
        match self {
            OpKind::Matmul
            | OpKind::Linear
            | OpKind::Add
            | OpKind::Mul
            | OpKind::Scale
            | OpKind::BiasAdd
            | OpKind::Sum
            | OpKind::Mean
            | OpKind::Embedding
            | OpKind::LayerNorm
            | OpKind::LayerNormBias
            | OpKind::Rope
            | OpKind::GeluTanh
            | OpKind::GeluErf
            | OpKind::Softmax
            | OpKind::CrossEntropy
            | OpKind::Attention => true,
            OpKind::NoiseFeatures
            | OpKind::SampleInverseCdf
            | OpKind::ArgmaxPenalty
            | OpKind::AdamW => false,
        }
    }

    pub fn from_name(s: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|o| o.name() == s)
    }
}
