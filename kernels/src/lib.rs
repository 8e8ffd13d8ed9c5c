//! kf-kernels: the CUDA kernels of kfrun as data. Each family is one
//! `kernels/<family>.cu`, compiled by `ptxgen` (tools/ptxgen, pinned NVRTC) to
//! `ptx/<family>.ptx`, committed and embedded here; entry point names
//! `<op>_<dtype>` are written once, below. Launch shapes live here too, so the
//! CUDA backend, the CPU emulator (kernels/emu) and benchmarks launch alike.
//! Letters: n elements, R rows, D features per row.

/// Grid, block and dynamic shared memory of one launch (the fields of cudarc's
/// `LaunchConfig`, so a CUDA launcher can convert field by field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// One kernel family: its source file stem, PTX, and entry points.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub ptx: &'static str,
    pub entries: &'static [&'static str],
}

/// Entry point names of a family for every storage dtype, `<op>_<dtype>`.
/// After a `;`: entry points with one dtype only, named in full.
macro_rules! entries {
    ($($op:literal),* $(,)?) => {
        &[$(concat!($op, "_f32"), concat!($op, "_f16"), concat!($op, "_bf16")),*]
    };
    ($($op:literal),* ; $($one:literal),+ $(,)?) => {
        &[$(concat!($op, "_f32"), concat!($op, "_f16"), concat!($op, "_bf16"),)* $($one),+]
    };
}

/// Every kernel family (one per `kernels/*.cu`; a test checks the directory).
pub const FAMILIES: &[Family] = &[
    Family {
        name: "elementwise",
        ptx: include_str!("../../ptx/elementwise.ptx"),
        entries: entries!(
            "add",
            "sub",
            "mul",
            "scale",
            "bias_add",
            "gelu_tanh",
            "bias_gelu_tanh"
        ),
    },
    Family {
        name: "layernorm",
        ptx: include_str!("../../ptx/layernorm.ptx"),
        entries: entries!("layernorm_fwd", "layernorm_bwd_dx", "layernorm_bwd_dwdb"; "layernorm_bwd_reduce_f32"),
    },
    Family {
        name: "embedding",
        ptx: include_str!("../../ptx/embedding.ptx"),
        entries: entries!("embedding_fwd", "embedding_bwd"),
    },
    Family {
        name: "rope",
        ptx: include_str!("../../ptx/rope.ptx"),
        entries: entries!("rope_fwd", "rope_bwd"; "rope_tables_f32", "rope_tables_scaled_f32"),
    },
    Family {
        name: "gelu",
        ptx: include_str!("../../ptx/gelu.ptx"),
        entries: entries!("gelu_erf", "gelu_erf_bwd", "gelu_tanh_bwd"),
    },
    Family {
        name: "softmax",
        ptx: include_str!("../../ptx/softmax.ptx"),
        entries: entries!("softmax_fwd", "softmax_bwd"),
    },
    Family {
        name: "noise",
        ptx: include_str!("../../ptx/noise.ptx"),
        entries: entries!("noise_features"),
    },
    Family {
        name: "adamw",
        ptx: include_str!("../../ptx/adamw.ptx"),
        entries: &["adamw_f32"],
    },
    Family {
        name: "argmax",
        ptx: include_str!("../../ptx/argmax.ptx"),
        entries: entries!("argmax_penalty"),
    },
    Family {
        name: "cross_entropy",
        ptx: include_str!("../../ptx/cross_entropy.ptx"),
        entries: cross_entropy::ENTRIES,
    },
    Family {
        name: "philox",
        ptx: include_str!("../../ptx/philox.ptx"),
        entries: philox::ENTRIES,
    },
    Family {
        name: "sampling",
        ptx: include_str!("../../ptx/sampling.ptx"),
        entries: entries!("sample_inverse_cdf", "inverse_cdf_noise"),
    },
    Family {
        name: "attention_mma",
        ptx: include_str!("../../ptx/attention_mma.ptx"),
        entries: &["attn_fwd_mma_d64_bf16", "attn_fwd_mma_d128_bf16"],
    },
    Family {
        name: "attention",
        ptx: include_str!("../../ptx/attention.ptx"),
        entries: entries!(
            "attn_fwd_d64",
            "attn_fwd_d128",
            "attn_decode_d64",
            "attn_decode_d128",
            "attn_decode_combine",
            "attn_bwd_dot",
            "attn_bwd_dq_d64",
            "attn_bwd_dq_d128",
            "attn_bwd_dkdv_d64",
            "attn_bwd_dkdv_d128",
        ),
    },
    Family {
        name: "reduce",
        ptx: include_str!("../../ptx/reduce.ptx"),
        entries: entries!("colsum", "sumsq"; "colsum_finish_f32", "sumsq_finish_f32"),
    },
    Family {
        name: "gemv",
        ptx: include_str!("../../ptx/gemv.ptx"),
        entries: gemv::ENTRIES,
    },
    Family {
        name: "swiglu",
        ptx: include_str!("../../ptx/swiglu.ptx"),
        entries: entries!("swiglu_fwd", "swiglu_bwd"),
    },
    Family {
        name: "copy",
        ptx: include_str!("../../ptx/copy.ptx"),
        entries: copy::ENTRIES,
    },
];

pub mod adamw;
pub mod argmax;
pub mod attention;
pub mod copy;
pub mod cross_entropy;
pub mod embedding;
pub mod gelu;
pub mod gemv;
pub mod layernorm_bwd;
pub mod noise;
pub mod philox;
pub mod reduce;
pub mod rope;
pub mod sampling;
pub mod softmax;

/// The family of `name`, if any.
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// The `.visible .entry` names of a PTX text, in order.
pub fn ptx_entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or(l).trim())
        .collect()
}

/// Launch shapes of the elementwise family: 1-D grid-stride loops.
pub mod elementwise {
    use super::LaunchConfig;
    /// Threads per block.
    pub const BLOCK: u32 = 256;
    /// At most this many blocks; larger inputs take more grid-stride steps
    /// (about 8 resident blocks on each SM of an H100 is plenty for a stream).
    pub const MAX_BLOCKS: u32 = 1024;

    pub fn config(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Launch shapes of the LayerNorm family: one block per row.
pub mod layernorm {
    use super::LaunchConfig;
    /// Rows up to this many features are cached in dynamic shared memory (the
    /// 48 KiB a block gets without an opt-in attribute).
    pub const MAX_CACHED_D: usize = 48 * 1024 / 4;

    /// The launch and the kernel's `cached` flag for `rows` rows of `d`.
    pub fn config(rows: usize, d: usize) -> (LaunchConfig, bool) {
        // a multiple of 32 (the block sums are warp sums), no more threads than features
        let block = d.next_multiple_of(32).clamp(32, 256) as u32;
        let cached = d <= MAX_CACHED_D;
        let cfg = LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: if cached { (d * 4) as u32 } else { 0 },
        };
        (cfg, cached)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.cu` has a family, and every family's PTX holds exactly the
    /// entry points listed here (a renamed kernel fails this, not a launch).
    #[test]
    fn families_match_sources_and_ptx() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut stems: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        stems.sort();
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort();
        assert_eq!(stems, names, "kernels/*.cu and FAMILIES differ");
        for f in FAMILIES {
            let mut got = ptx_entries(f.ptx);
            got.sort();
            let mut want = f.entries.to_vec();
            want.sort();
            assert_eq!(got, want, "entry points of ptx/{}.ptx", f.name);
            assert!(
                f.ptx.contains(".target sm_80"),
                "ptx/{}.ptx is not for compute_80",
                f.name
            );
        }
    }

    #[test]
    fn launch_shapes() {
        assert_eq!(elementwise::config(0).grid_dim.0, 1);
        assert_eq!(elementwise::config(257).grid_dim.0, 2);
        assert_eq!(
            elementwise::config(1 << 30).grid_dim.0,
            elementwise::MAX_BLOCKS
        );
        assert_eq!(layernorm::config(3, 1).0.block_dim.0, 32);
        assert_eq!(layernorm::config(3, 33).0.block_dim.0, 64);
        assert_eq!(layernorm::config(3, 4097).0.block_dim.0, 256);
        assert!(!layernorm::config(1, 20000).1);
    }
}
