//! The op registry: one list naming every op of the engine, with its name, the harness file
//! that holds its cases (tests/src/cases/<family>.rs, function `<name>`), whether it has a
//! backward rule and whether it runs on kernel devices. `OpKind` is generated from the list,
//! and so are the harness's dispatch and its one test per op (`for_each_op!`): an op added
//! here does not compile until its cases exist, and gets its test without another edit.
//! Adding an op touches its family's file in ops/src (CPU body, backward rule, launchers),
//! this list, and its cases; a new kernel adds its .cu entry point and launch shape.

/// Calls `$m!` with the list of every op: `Variant => name, case_family, grad: bool,
/// kernels: bool;` (the one place an op is registered).
#[macro_export]
macro_rules! for_each_op {
    ($m:ident) => {
        $m! {
            Matmul => matmul, linalg, grad: true, kernels: true;
            Linear => linear, linalg, grad: true, kernels: true;
            LinearResidual => linear_residual, linalg, grad: true, kernels: true;
            Add => add, linalg, grad: true, kernels: true;
            Mul => mul, linalg, grad: true, kernels: true;
            Scale => scale, linalg, grad: true, kernels: true;
            BiasAdd => bias_add, linalg, grad: true, kernels: true;
            Sum => sum, linalg, grad: true, kernels: true;
            Mean => mean, linalg, grad: true, kernels: true;
            Embedding => embedding, linalg, grad: true, kernels: true;
            LayerNorm => layer_norm, norm, grad: true, kernels: true;
            LayerNormBias => layer_norm_bias, norm, grad: true, kernels: true;
            RmsNorm => rms_norm, norm, grad: true, kernels: true;
            Rope => rope, norm, grad: true, kernels: true;
            GeluTanh => gelu_tanh, norm, grad: true, kernels: true;
            GeluErf => gelu_erf, norm, grad: true, kernels: true;
            BiasGeluTanh => bias_gelu_tanh, norm, grad: true, kernels: true;
            Swiglu => swiglu, norm, grad: true, kernels: true;
            Softmax => softmax, norm, grad: true, kernels: true;
            CrossEntropy => cross_entropy, norm, grad: true, kernels: true;
            Attention => attention, attention, grad: true, kernels: true;
            NoiseFeatures => noise_features, sampling, grad: false, kernels: true;
            SampleInverseCdf => sample_inverse_cdf, sampling, grad: false, kernels: true;
            ArgmaxPenalty => argmax_penalty, sampling, grad: false, kernels: true;
            AdamW => adamw, linalg, grad: false, kernels: true;
        }
    };
}

macro_rules! define_ops {
    ($($op:ident => $name:ident, $family:ident, grad: $grad:literal, kernels: $kern:literal;)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind {
            $($op,)*
        }

        impl OpKind {
            pub const ALL: &'static [OpKind] = &[$(OpKind::$op,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(OpKind::$op => stringify!($name),)*
                }
            }

            /// Whether the op has a backward rule (and so needs gradient cases).
            pub fn differentiable(self) -> bool {
                match self {
                    $(OpKind::$op => $grad,)*
                }
            }

            /// Whether the op runs its kernels when its inputs are on a kernel device (the
            /// backend axis of the harness); an op without them must refuse there.
            pub fn on_kernel_devices(self) -> bool {
                match self {
                    $(OpKind::$op => $kern,)*
                }
            }
        }
    };
}

for_each_op!(define_ops);

impl OpKind {
    pub fn from_name(s: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|o| o.name() == s)
    }
}
