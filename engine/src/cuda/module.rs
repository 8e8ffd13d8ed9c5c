//! The module cache: a kernel family's PTX (embedded in kf-kernels) is loaded
//! into the device's context on the first launch of any of its entries, with
//! every entry's function handle and parameter list; later launches look them
//! up. Also the PTX parameter parser the launcher checks arguments with.

use super::context::{lock, CudaDevice};
use super::launch::ParamKind;
use super::DriverContext;
use anyhow::{anyhow, Context, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Arc;

/// One entry point: its handle and parameters (kind, bytes) from the PTX.
#[derive(Clone)]
pub(super) struct Function {
    pub(super) handle: sys::CUfunction,
    pub(super) params: Vec<(ParamKind, usize)>,
}

/// A loaded family.
pub(super) struct Module {
    handle: sys::CUmodule,
    pub(super) functions: HashMap<&'static str, Function>,
}

// SAFETY: CUmodule and CUfunction are driver handles valid in any thread where
// the owning context is current (CudaDevice binds it before every call); the
// map is never mutated after loading.
unsafe impl Send for Module {}
// SAFETY: as above; shared access only reads the handles.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: the handle came from cuModuleLoadData and is unloaded once;
        // a Module is dropped only with its CudaDevice, after all launches.
        let _ = unsafe { result::module::unload(self.handle) };
    }
}

/// Parameters of `entry` in a PTX text: (kind, bytes) each, or None when the
/// PTX has no `.visible .entry entry(`.
pub fn ptx_params(ptx: &str, entry: &str) -> Option<Vec<(ParamKind, usize)>> {
    let head = format!(".visible .entry {entry}(");
    let start = ptx.find(&head)? + head.len();
    let body = &ptx[start..start + ptx[start..].find(')')?];
    let mut params = Vec::new();
    for p in body.split(',') {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        // `.param .u64 name`, `.param .f32 name` or `.param .align 8 .b8 name[16]`
        let words: Vec<&str> = p.split_whitespace().collect();
        let ty = words
            .iter()
            .find(|w| w.starts_with('.') && **w != ".param" && **w != ".align" && **w != ".ptr")?;
        let bits: usize = ty[2..].parse().ok()?;
        let kind = match &ty[1..2] {
            "f" => ParamKind::Float,
            "u" | "s" | "b" => ParamKind::Int,
            _ => return None,
        };
        let last = words.last()?;
        let bytes = match last.find('[') {
            Some(i) => {
                let n: usize = last[i + 1..last.len() - 1].parse().ok()?;
                n * bits / 8
            }
            None => bits / 8,
        };
        let kind = if last.contains('[') {
            ParamKind::Bytes
        } else {
            kind
        };
        params.push((kind, bytes));
    }
    Some(params)
}

impl CudaDevice {
    /// The function `entry` of kernel family `family`, loading the family's
    /// module on first use.
    pub(super) fn function(&self, family: &str, entry: &str) -> Result<Function> {
        let fam = kf_kernels::family(family).ok_or_else(|| {
            anyhow!(
                "no kernel family \"{family}\" (kf-kernels has {})",
                kf_kernels::FAMILIES
                    .iter()
                    .map(|f| f.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(fam.name) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(self.load(fam)?);
                    modules.insert(fam.name, m.clone());
                    m
                }
            }
        };
        module.functions.get(entry).cloned().ok_or_else(|| {
            anyhow!(
                "kernel family {family} has no entry {entry} (it has {})",
                fam.entries.join(", ")
            )
        })
    }

    /// Load a family's PTX and look up every entry.
    fn load(&self, fam: &'static kf_kernels::Family) -> Result<Module> {
        self.bind()?;
        let image = CString::new(fam.ptx)
            .with_context(|| format!("ptx/{}.ptx contains a NUL byte", fam.name))?;
        // SAFETY: `image` is a NUL-terminated PTX text that outlives the call
        // (the driver JIT-compiles it and keeps no pointer to it).
        let handle = unsafe { result::module::load_data(image.as_ptr().cast()) }.drv(|| {
            format!(
                "loading the PTX of kernel family {} on cuda:{}",
                fam.name,
                self.ordinal()
            )
        })?;
        let mut module = Module {
            handle,
            functions: HashMap::new(),
        };
        for &entry in fam.entries {
            let name = CString::new(entry).context("entry name with a NUL byte")?;
            // SAFETY: `handle` is the module just loaded; `name` is NUL-terminated.
            let f = unsafe { result::module::get_function(handle, name) }
                .drv(|| format!("finding {entry} in ptx/{}.ptx", fam.name))?;
            let params = ptx_params(fam.ptx, entry).ok_or_else(|| {
                anyhow!(
                    "cannot read the parameters of {entry} in ptx/{}.ptx",
                    fam.name
                )
            })?;
            module
                .functions
                .insert(entry, Function { handle: f, params });
        }
        Ok(module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_of_the_embedded_ptx() {
        let ew = kf_kernels::family("elementwise").unwrap().ptx;
        let p8 = (ParamKind::Int, 8);
        // add(a, b, out, size_t n)
        assert_eq!(ptx_params(ew, "add_f32").unwrap(), vec![p8; 4]);
        // scale(x, out, float s, size_t n)
        assert_eq!(
            ptx_params(ew, "scale_bf16").unwrap(),
            vec![p8, p8, (ParamKind::Float, 4), p8]
        );
        // layernorm_fwd(x, w, b, out, mean, rstd, unsigned rows, unsigned d, float eps, int cached,
        // int rms)
        let ln = kf_kernels::family("layernorm").unwrap().ptx;
        let i4 = (ParamKind::Int, 4);
        assert_eq!(
            ptx_params(ln, "layernorm_fwd_f16").unwrap(),
            vec![
                p8,
                p8,
                p8,
                p8,
                p8,
                p8,
                i4,
                i4,
                (ParamKind::Float, 4),
                i4,
                i4
            ]
        );
        assert!(ptx_params(ew, "add_f64").is_none());
        // every entry of every family parses
        for f in kf_kernels::FAMILIES {
            for e in f.entries {
                let p = ptx_params(f.ptx, e).unwrap_or_else(|| panic!("{e}"));
                assert!(!p.is_empty(), "{e} has no parameters");
            }
        }
    }

    #[test]
    fn aggregate_and_empty_parameter_lists() {
        let ptx = ".visible .entry k(\n\t.param .align 8 .b8 k_param_0[24],\n\t.param .s32 k_param_1\n)\n{\n}\n.visible .entry z()\n{\n}\n";
        assert_eq!(
            ptx_params(ptx, "k").unwrap(),
            vec![(ParamKind::Bytes, 24), (ParamKind::Int, 4)]
        );
        assert_eq!(ptx_params(ptx, "z").unwrap(), vec![]);
    }
}
