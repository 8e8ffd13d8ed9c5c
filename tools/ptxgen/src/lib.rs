//! ptxgen: compiles every `kernels/<family>.cu` with the pinned NVRTC (loaded
//! from its pip wheel with libloading) to `ptx/<family>.ptx`, assembles each
//! PTX with the pinned `ptxas` for sm_80 and sm_90, and writes the resource
//! report `ptx/ptxas-report.txt` (registers, shared memory, stack, spills per
//! kernel). `check` regenerates everything in memory and fails on any
//! difference from the committed files, a compile error, or a spill in a
//! kernel marked `// kf-hot: <names>` in its .cu.
//!
//! Why libloading and not cudarc: cudarc's NVRTC loader finds the library by
//! name through the dynamic loader's search path, and a pip wheel's lib
//! directory is on no such path (LD_LIBRARY_PATH is read once, at process
//! start). Opening the wheel's `libnvrtc.so.12` by its full path takes five
//! functions and no CUDA-version feature flags.

use anyhow::{bail, ensure, Context, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Virtual architecture of the committed PTX.
pub const PTX_ARCH: &str = "compute_80";
/// Real architectures the resource report assembles for.
pub const SASS_ARCHS: &[&str] = &["sm_80", "sm_90"];
/// The pins file, relative to the repository root.
pub const PINS: &str = "kernels/requirements.txt";
/// The report, relative to the repository root.
pub const REPORT: &str = "ptx/ptxas-report.txt";
/// Sources that must compile but are not shipped (the emulator's self-tests).
pub const COMPILE_ONLY: &[&str] = &["kernels/emu/selftest.cu"];

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tools/ptxgen lies two levels below the root")
        .to_path_buf()
}

/// `(package, version)` of every `name==version` line of the pins file.
pub fn pins(root: &Path) -> Result<Vec<(String, String)>> {
    let p = root.join(PINS);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once("=="))
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .collect())
}

/// Where the pinned wheels put NVRTC, the CUDA headers and ptxas.
#[derive(Clone, Debug)]
pub struct Toolchain {
    pub nvrtc_lib: PathBuf,
    pub cuda_include: PathBuf,
    pub ptxas: PathBuf,
}

/// Find the pinned wheels through `python3` and check their versions against
/// the pins. The error says what to install; it is the "skip" reason of tests.
pub fn locate(root: &Path) -> Result<Toolchain> {
    let pins = pins(root)?;
    let script = "import importlib.metadata as m, importlib.util as u, os, sys\n\
        for pkg, mod in [('nvidia-cuda-nvrtc-cu12','nvidia.cuda_nvrtc'),('nvidia-cuda-runtime-cu12','nvidia.cuda_runtime'),('nvidia-cuda-nvcc-cu12','nvidia.cuda_nvcc')]:\n\
        \x20   try:\n\
        \x20       s = u.find_spec(mod); print(pkg, m.version(pkg), list(s.submodule_search_locations)[0])\n\
        \x20   except Exception as e:\n\
        \x20       print(pkg, 'missing', '-')\n";
    let python = std::env::var("KF_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-c", script])
        .output()
        .with_context(|| format!("cannot run {python} to find the NVIDIA wheels"))?;
    ensure!(
        out.status.success(),
        "{python} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut dirs = std::collections::HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.splitn(3, ' ').collect();
        if f.len() != 3 {
            continue;
        }
        let (pkg, ver, dir) = (f[0], f[1], f[2]);
        let pinned = pins
            .iter()
            .find(|(p, _)| p == pkg)
            .map(|(_, v)| v.as_str())
            .with_context(|| format!("{pkg} is not pinned in {PINS}"))?;
        ensure!(
            ver == pinned,
            "{pkg} {ver} is installed but {PINS} pins {pinned}: \
             python3 -m pip install -r {PINS}"
        );
        dirs.insert(pkg.to_string(), PathBuf::from(dir));
    }
    let dir = |pkg: &str| -> Result<PathBuf> {
        dirs.get(pkg)
            .cloned()
            .with_context(|| format!("{pkg} is not installed: python3 -m pip install -r {PINS}"))
    };
    let tc = Toolchain {
        nvrtc_lib: dir("nvidia-cuda-nvrtc-cu12")?.join("lib/libnvrtc.so.12"),
        cuda_include: dir("nvidia-cuda-runtime-cu12")?.join("include"),
        ptxas: dir("nvidia-cuda-nvcc-cu12")?.join("bin/ptxas"),
    };
    for p in [&tc.nvrtc_lib, &tc.cuda_include, &tc.ptxas] {
        ensure!(p.exists(), "{} is missing from its wheel", p.display());
    }
    Ok(tc)
}

type CreateFn = unsafe extern "C" fn(
    *mut *mut c_void,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(*mut c_void, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut *mut c_void) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

/// NVRTC opened from the wheel.
pub struct Nvrtc {
    lib: libloading::Library,
}

impl Nvrtc {
    pub fn open(path: &Path) -> Result<Nvrtc> {
        // SAFETY: loading NVRTC runs its initialisers only; no other library state is touched.
        let lib = unsafe { libloading::Library::new(path) }
            .with_context(|| format!("cannot load {}", path.display()))?;
        Ok(Nvrtc { lib })
    }

    fn sym<T: Copy>(&self, name: &[u8]) -> Result<T> {
        // SAFETY: T is the documented C signature of the NVRTC function `name`.
        let s = unsafe { self.lib.get::<T>(name) }
            .with_context(|| format!("NVRTC lacks {}", String::from_utf8_lossy(name)))?;
        Ok(*s)
    }

    /// (major, minor) of the loaded NVRTC.
    pub fn version(&self) -> Result<(i32, i32)> {
        let f: VersionFn = self.sym(b"nvrtcVersion\0")?;
        let (mut a, mut b) = (0, 0);
        // SAFETY: two out-parameters.
        unsafe { f(&mut a, &mut b) };
        Ok((a, b))
    }

    /// PTX of `src` (named `name` in messages) compiled with `opts`.
    pub fn compile(&self, src: &str, name: &str, opts: &[String]) -> Result<String> {
        let create: CreateFn = self.sym(b"nvrtcCreateProgram\0")?;
        let compile: CompileFn = self.sym(b"nvrtcCompileProgram\0")?;
        let log_size: SizeFn = self.sym(b"nvrtcGetProgramLogSize\0")?;
        let log: GetFn = self.sym(b"nvrtcGetProgramLog\0")?;
        let ptx_size: SizeFn = self.sym(b"nvrtcGetPTXSize\0")?;
        let ptx: GetFn = self.sym(b"nvrtcGetPTX\0")?;
        let destroy: DestroyFn = self.sym(b"nvrtcDestroyProgram\0")?;
        let csrc = CString::new(src).context("source contains a NUL byte")?;
        let cname = CString::new(name)?;
        let copts: Vec<CString> = opts
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<_, _>>()?;
        let popts: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
        let mut prog: *mut c_void = std::ptr::null_mut();
        // SAFETY: NVRTC C API with valid NUL-terminated strings that outlive the
        // calls; the program is destroyed on every path below.
        unsafe {
            let rc = create(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            ensure!(rc == 0, "nvrtcCreateProgram({name}) failed with code {rc}");
            let rc = compile(prog, popts.len() as c_int, popts.as_ptr());
            let mut n = 0usize;
            log_size(prog, &mut n);
            let mut buf = vec![0u8; n.max(1)];
            log(prog, buf.as_mut_ptr() as *mut c_char);
            let log_text = CStr::from_bytes_until_nul(&buf)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            if rc != 0 {
                destroy(&mut prog);
                bail!("NVRTC could not compile {name}:\n{log_text}");
            }
            let mut n = 0usize;
            ptx_size(prog, &mut n);
            let mut buf = vec![0u8; n.max(1)];
            ptx(prog, buf.as_mut_ptr() as *mut c_char);
            destroy(&mut prog);
            let text = CStr::from_bytes_until_nul(&buf)
                .context("PTX without a terminating NUL")?
                .to_string_lossy()
                .into_owned();
            Ok(text)
        }
    }
}

/// The NVRTC options of every kernel: fixed arch, C++17, no fast math.
pub fn nvrtc_options(root: &Path, tc: &Toolchain) -> Vec<String> {
    vec![
        format!("--gpu-architecture={PTX_ARCH}"),
        "-std=c++17".into(),
        format!("--include-path={}", root.join("kernels").display()),
        format!("--include-path={}", tc.cuda_include.display()),
    ]
}

/// The kernel families: `kernels/*.cu`, sorted.
pub fn family_sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    v.retain(|p| p.extension().is_some_and(|x| x == "cu"));
    v.sort();
    Ok(v)
}

/// The `.visible .entry` names of a PTX text (as kf_kernels::ptx_entries;
/// not shared so that ptxgen builds before a new family's PTX exists).
pub fn ptx_entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or(l).trim())
        .collect()
}

/// Names after `// kf-hot:` in a source: kernels that must not spill.
pub fn hot_kernels(src: &str) -> Vec<String> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("// kf-hot:"))
        .flat_map(|l| l.split_whitespace().map(String::from))
        .collect()
}

/// ptxas resources of one kernel on one architecture.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub smem: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Assemble `ptx` for `arch` with `ptxas -v` and parse its resource lines.
pub fn ptxas_resources(
    tc: &Toolchain,
    ptx: &str,
    family: &str,
    arch: &str,
) -> Result<Vec<Resources>> {
    let tmp = std::env::temp_dir().join(format!(
        "kf-ptxgen-{}-{family}-{arch}.ptx",
        std::process::id()
    ));
    std::fs::write(&tmp, ptx)?;
    let out = Command::new(&tc.ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&tmp)
        .args(["-o", "/dev/null"])
        .output()
        .with_context(|| format!("cannot run {}", tc.ptxas.display()));
    let _ = std::fs::remove_file(&tmp);
    let out = out?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "ptxas -arch={arch} failed on ptx/{family}.ptx:\n{text}"
    );
    let num_before = |s: &str, unit: &str| -> u32 {
        s.find(unit)
            .and_then(|i| s[..i].split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut v: Vec<Resources> = vec![];
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            v.push(Resources {
                kernel: name,
                arch: arch.to_string(),
                ..Default::default()
            });
        } else if let Some(r) = v.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack = num_before(line, "bytes stack frame");
                r.spill_stores = num_before(line, "bytes spill stores");
                r.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = num_before(line, "registers");
                r.smem = num_before(line, "bytes smem");
            }
        }
    }
    Ok(v)
}

/// Everything ptxgen writes: (path relative to the root, contents).
pub struct Generated {
    pub files: Vec<(String, String)>,
    pub resources: Vec<Resources>,
    /// Hot kernels that spill: `kernel on arch: N bytes`.
    pub hot_spills: Vec<String>,
}

/// Compile every family (and the compile-only sources), assemble, report.
pub fn generate(root: &Path, tc: &Toolchain) -> Result<Generated> {
    let nvrtc = Nvrtc::open(&tc.nvrtc_lib)?;
    let opts = nvrtc_options(root, tc);
    let mut files = vec![];
    let mut resources = vec![];
    let mut hot_spills = vec![];
    for src_path in family_sources(root)? {
        let family = src_path.file_stem().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(&src_path)?;
        let ptx = nvrtc.compile(&src, &format!("kernels/{family}.cu"), &opts)?;
        let hot = hot_kernels(&src);
        let entries = ptx_entries(&ptx);
        for h in &hot {
            ensure!(
                entries.contains(&h.as_str()),
                "kernels/{family}.cu marks {h} hot, but it has no such entry point"
            );
        }
        let mut fam = vec![];
        for arch in SASS_ARCHS {
            fam.extend(ptxas_resources(tc, &ptx, &family, arch)?);
        }
        fam.sort_by(|a, b| (&a.kernel, &a.arch).cmp(&(&b.kernel, &b.arch)));
        {
            for r in fam {
                if hot.contains(&r.kernel) && (r.spill_stores > 0 || r.spill_loads > 0) {
                    hot_spills.push(format!(
                        "{} on {}: {} bytes spill stores, {} bytes spill loads",
                        r.kernel, r.arch, r.spill_stores, r.spill_loads
                    ));
                }
                resources.push(r);
            }
        }
        files.push((format!("ptx/{family}.ptx"), ptx));
    }
    for rel in COMPILE_ONLY {
        let src = std::fs::read_to_string(root.join(rel))?;
        nvrtc.compile(&src, rel, &opts)?;
    }
    files.push((REPORT.to_string(), report(tc, &nvrtc, &resources)?));
    Ok(Generated {
        files,
        resources,
        hot_spills,
    })
}

/// The report text (committed, so a change of resources shows in review).
fn report(tc: &Toolchain, nvrtc: &Nvrtc, rs: &[Resources]) -> Result<String> {
    let (ma, mi) = nvrtc.version()?;
    let ptxas_v = Command::new(&tc.ptxas)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ptxas_v = ptxas_v
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mut s = format!(
        "# ptxas resource report, written by ptxgen (tools/ptxgen); do not edit.\n\
         # NVRTC {ma}.{mi}, {PTX_ARCH}; ptxas: {ptxas_v}\n\
         # kernel                      arch   regs  smem(B)  stack(B)  spill st/ld(B)\n"
    );
    for r in rs {
        s.push_str(&format!(
            "{:<30} {:<6} {:>4} {:>8} {:>9} {:>8}/{}\n",
            r.kernel, r.arch, r.registers, r.smem, r.stack, r.spill_stores, r.spill_loads
        ));
    }
    Ok(s)
}

/// Files whose committed contents differ from `g` (missing ones included),
/// plus stale `ptx/*.ptx` without a source.
pub fn differences(root: &Path, g: &Generated) -> Vec<String> {
    let mut bad = vec![];
    for (rel, text) in &g.files {
        match std::fs::read_to_string(root.join(rel)) {
            Ok(old) if &old == text => {}
            Ok(old) => {
                let line = old
                    .lines()
                    .zip(text.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or(old.lines().count().min(text.lines().count()));
                bad.push(format!(
                    "{rel} differs from a fresh compile (first at line {})",
                    line + 1
                ));
            }
            Err(_) => bad.push(format!("{rel} is missing")),
        }
    }
    if let Ok(rd) = std::fs::read_dir(root.join("ptx")) {
        for e in rd.flatten() {
            let rel = format!("ptx/{}", e.file_name().to_string_lossy());
            if rel.ends_with(".ptx") && !g.files.iter().any(|(r, _)| r == &rel) {
                bad.push(format!("{rel} has no kernels/*.cu source (stale)"));
            }
        }
    }
    bad
}
