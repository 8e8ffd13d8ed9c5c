//! Harness cases for every op, one file per op family. The dispatch below is generated from the
//! op registry (`kf_ops::for_each_op!`): each op's cases are the function named after it in the
//! file its registry line names, so a new `OpKind` does not compile until it has cases.

use crate::harness::Case;
use kf_ops::OpKind;

pub mod attention;
pub mod linalg;
pub mod norm;
pub mod sampling;

macro_rules! dispatch {
    ($($op:ident => $name:ident, $family:ident, grad: $grad:literal, kernels: $kern:literal;)*) => {
        /// All harness cases of `op`.
        pub fn cases(op: OpKind) -> Vec<Case> {
            match op {
                $(OpKind::$op => $family::$name(),)*
            }
        }
    };
}

kf_ops::for_each_op!(dispatch);
