//! kf-tests: shared helpers of the cross-crate tests.
