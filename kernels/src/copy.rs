//! Launch shapes of the copy family (kernels/copy.cu): `strided_copy_<b16|b32|b64>` (a view
//! gathered or scattered by element size, rank at most [`RANK`] after collapsing) and the casts
//! `cast_<from>_<to>`; both grid-stride loops over the elements, launched like the elementwise
//! family. Letters: n elements.

/// Entry points: the strided copies by element size, then the casts.
pub const ENTRIES: &[&str] = &[
    "strided_copy_b16",
    "strided_copy_b32",
    "strided_copy_b64",
    "cast_f32_f16",
    "cast_f32_bf16",
    "cast_f16_f32",
    "cast_bf16_f32",
    "cast_f64_f32",
    "cast_f32_f64",
];

/// Dimensions `strided_copy` takes (shape and both strides as scalar arguments).
pub const RANK: usize = 6;

/// The strided copy's entry for elements of `bytes` bytes, if there is one.
pub fn strided_entry(bytes: usize) -> Option<&'static str> {
    match bytes {
        2 => Some("strided_copy_b16"),
        4 => Some("strided_copy_b32"),
        8 => Some("strided_copy_b64"),
        _ => None,
    }
}

/// The launch of either over `n` elements.
pub fn config(n: usize) -> crate::LaunchConfig {
    crate::elementwise::config(n)
}

/// The cast entry from dtype `from` to `to` (names as in the entries: f32, f16, bf16, f64), if
/// there is one.
pub fn cast_entry(from: &str, to: &str) -> Option<&'static str> {
    let want = format!("cast_{from}_{to}");
    ENTRIES.iter().copied().find(|e| *e == want)
}
