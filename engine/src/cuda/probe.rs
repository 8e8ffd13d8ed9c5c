//! Finding libcuda and libcublas before cudarc touches them: cudarc's dynamic
//! loading panics when a library or a symbol is missing, so each is opened here
//! first with libloading (same candidate names as cudarc) and every symbol the
//! device layer calls is looked up. The result is one sentence for the user.

use anyhow::{bail, Result};
use std::sync::OnceLock;

/// Driver entry points the device layer reaches (through cudarc's safe context
/// and its `result` functions); one missing means a driver older than CUDA 12.4.
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuFuncSetAttribute",
    "cuLaunchKernel",
];

/// cuBLAS entry points of blas.rs.
const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasGemmStridedBatchedEx",
];

/// Open the first of cudarc's candidate names for `lib` that loads and check
/// that it exports `symbols`. `what` names the library for the user.
fn probe(lib: &str, what: &str, symbols: &[&str]) -> Result<String, String> {
    let candidates = cudarc::get_lib_name_candidates(lib);
    for name in &candidates {
        // SAFETY: loading runs the library's initialisers; these are NVIDIA's
        // driver/cuBLAS libraries (or whatever the system put under their
        // names), which cudarc would load the same way a moment later.
        let Ok(handle) = (unsafe { libloading::Library::new(name) }) else {
            continue;
        };
        for sym in symbols {
            // SAFETY: only the address is looked up, never called through this type.
            let found = unsafe { handle.get::<*const ()>(sym.as_bytes()) };
            if found.is_err() {
                return Err(format!(
                    "the {what} library {name} has no {sym} (it is older than CUDA 12.4)"
                ));
            }
        }
        return Ok(name.clone());
    }
    let plain = format!(
        "{}{lib}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let mut names: Vec<&str> = Vec::new();
    for c in candidates.iter().filter(|c| c.starts_with(&plain)) {
        if !names.contains(&c.as_str()) {
            names.push(c);
        }
    }
    Err(format!(
        "the {what} library was not found (looked for {} on the loader's path)",
        names.join(", ")
    ))
}

/// Ok (the library's file name) when the CUDA driver library loads and has
/// every symbol the device layer uses; else one sentence saying what is missing.
pub fn check_driver() -> Result<String> {
    static DRIVER: OnceLock<Result<String, String>> = OnceLock::new();
    match DRIVER.get_or_init(|| probe("cuda", "CUDA driver", DRIVER_SYMBOLS)) {
        Ok(name) => Ok(name.clone()),
        Err(e) => bail!("{e}; install the NVIDIA driver or use --device cpu"),
    }
}

/// Like `check_driver`, for cuBLAS (shipped with the CUDA toolkit or the
/// `nvidia-cublas-cu12` wheel, not with the driver).
pub fn check_cublas() -> Result<String> {
    static CUBLAS: OnceLock<Result<String, String>> = OnceLock::new();
    match CUBLAS.get_or_init(|| probe("cublas", "cuBLAS", CUBLAS_SYMBOLS)) {
        Ok(name) => Ok(name.clone()),
        Err(e) => bail!("{e}; put libcublas.so.12 on LD_LIBRARY_PATH"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_sentence() {
        let e = probe("kf_no_such_library", "test", &["x"]).unwrap_err();
        assert!(e.starts_with("the test library was not found"), "{e}");
        assert!(e.contains("libkf_no_such_library.so"), "{e}");
        // cudarc lists .so.12 twice (its CUDA major and a fixed 12): named once
        assert_eq!(e.matches("libkf_no_such_library.so.12").count(), 1, "{e}");
    }

    #[test]
    fn a_missing_symbol_is_named() {
        // zlib is found as libz.so.1 (a name on cudarc's candidate list) and has no cuInit
        if probe("z", "zlib", &["inflate"]).is_err() {
            println!("skipped: libz.so.1 is not on this machine");
            return;
        }
        let e = probe("z", "zlib", &["inflate", "cuInit"]).unwrap_err();
        assert!(e.contains("has no cuInit"), "{e}");
        assert!(e.contains("libz.so"), "{e}");
    }
}
