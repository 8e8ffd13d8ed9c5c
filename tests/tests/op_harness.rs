//! Every registered op through the parity/gradient harness: f32 and f64
//! forwards against an independent f64 reference, f64 gradients against
//! finite differences, canary-padded outputs, and the same on every kernel device.
//! One test per op, generated from the op registry (`kf_ops::for_each_op!`).

use kf_ops::OpKind;
use kf_tests::harness::check_op;

macro_rules! op_tests {
    ($($op:ident => $name:ident, $family:ident, grad: $grad:literal, kernels: $kern:literal;)*) => {
        $(
            #[test]
            fn $name() {
                let n = check_op(OpKind::$op).unwrap_or_else(|e| panic!("{e:#}"));
                eprintln!("{}: {n} cases passed", OpKind::$op.name());
            }
        )*
    };
}

kf_ops::for_each_op!(op_tests);
