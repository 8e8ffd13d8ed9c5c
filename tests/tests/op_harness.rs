//! Every registered op through the parity/gradient harness: f32 and f64
//! forwards against an independent f64 reference, f64 gradients against
//! finite differences, canary-padded outputs. One test per op.

use kf_ops::OpKind;
use kf_tests::harness::check_op;

macro_rules! op_tests {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let n = check_op(OpKind::$op).unwrap_or_else(|e| panic!("{e:#}"));
                eprintln!("{}: {n} cases passed", OpKind::$op.name());
            }
        )*
        /// The list above must name every op of the registry.
        #[test]
        fn every_registered_op_has_a_test() {
            let listed: Vec<OpKind> = vec![$(OpKind::$op),*];
            for op in OpKind::ALL {
                assert!(listed.contains(op), "op {} has no harness test in tests/op_harness.rs", op.name());
            }
        }
    };
}

op_tests! {
    matmul => Matmul,
    linear => Linear,
    add => Add,
    mul => Mul,
    scale => Scale,
    bias_add => BiasAdd,
    sum => Sum,
    mean => Mean,
    embedding => Embedding,
    layer_norm => LayerNorm,
    layer_norm_bias => LayerNormBias,
    rope => Rope,
    gelu_tanh => GeluTanh,
    gelu_erf => GeluErf,
    softmax => Softmax,
    cross_entropy => CrossEntropy,
    attention => Attention,
    noise_features => NoiseFeatures,
    sample_inverse_cdf => SampleInverseCdf,
    argmax_penalty => ArgmaxPenalty,
    adamw => AdamW,
}
