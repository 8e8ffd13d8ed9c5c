//! kf-tests: the op parity and gradient harness (`harness`) and its cases, one
//! file per op family (`cases`). The test binaries under tests/ drive them.

pub mod cases;
pub mod harness;
