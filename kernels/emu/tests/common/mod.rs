//! Helpers shared by the emulated-kernel parity tests: the storage dtypes (f32, f16, bf16)
//! with their rounding, upload/download to emulator buffers, and the tolerance of a storage
//! kernel against the f32 CPU op.
#![allow(dead_code)]

use half::{bf16, f16};
use kf_engine::{Device, Tensor};
use kf_kernels_emu::DeviceBuffer;
use kf_tests::harness::{Gen, Tol};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum St {
    F32,
    F16,
    Bf16,
}

impl St {
    pub fn suffix(self) -> &'static str {
        match self {
            St::F32 => "f32",
            St::F16 => "f16",
            St::Bf16 => "bf16",
        }
    }
    /// The value after a round trip through the storage dtype.
    pub fn round(self, v: f32) -> f32 {
        match self {
            St::F32 => v,
            St::F16 => f16::from_f32(v).to_f32(),
            St::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }
    pub fn upload(self, v: &[f32]) -> DeviceBuffer {
        match self {
            St::F32 => DeviceBuffer::from_slice(v),
            St::F16 => DeviceBuffer::from_slice(
                &v.iter()
                    .map(|&x| f16::from_f32(x).to_bits())
                    .collect::<Vec<u16>>(),
            ),
            St::Bf16 => DeviceBuffer::from_slice(
                &v.iter()
                    .map(|&x| bf16::from_f32(x).to_bits())
                    .collect::<Vec<u16>>(),
            ),
        }
    }
    pub fn bytes(self) -> usize {
        if self == St::F32 {
            4
        } else {
            2
        }
    }
    pub fn alloc(self, n: usize) -> DeviceBuffer {
        DeviceBuffer::uninit(n * self.bytes())
    }
    pub fn download(self, b: &DeviceBuffer) -> Vec<f64> {
        match self {
            St::F32 => b.to_vec::<f32>().iter().map(|&x| x as f64).collect(),
            St::F16 => b
                .to_vec::<u16>()
                .iter()
                .map(|&x| f16::from_bits(x).to_f64())
                .collect(),
            St::Bf16 => b
                .to_vec::<u16>()
                .iter()
                .map(|&x| bf16::from_bits(x).to_f64())
                .collect(),
        }
    }
    /// Kernel output vs the f32 CPU op's output rounded to this dtype: both
    /// round an f32 value that differs by a few f32 ulps, which can flip one
    /// rounding (1 ulp of the storage dtype), plus an absolute term near zero.
    pub fn tol(self) -> Tol {
        match self {
            St::F32 => Tol::F32,
            St::F16 => Tol::new(1e-3, 1.0 / 1024.0),
            St::Bf16 => Tol::new(1e-2, 1.0 / 128.0),
        }
    }
}

pub const ALL: [St; 3] = [St::F32, St::F16, St::Bf16];

/// A CPU tensor of `v` with `shape`.
pub fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
}

/// The CPU op's f32 output, rounded through the storage dtype.
pub fn cpu_out(t: &Tensor, st: St) -> Vec<f64> {
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| st.round(v) as f64)
        .collect()
}

/// `n` uniform values in [lo, hi), rounded to the storage dtype.
pub fn inputs(n: usize, seed: u64, st: St, lo: f64, hi: f64) -> Vec<f32> {
    let mut g = Gen::new(seed);
    g.vec(n, lo, hi)
        .iter()
        .map(|&v| st.round(v as f32))
        .collect()
}

/// An f32 device buffer, widened to f64.
pub fn f32s(b: &DeviceBuffer) -> Vec<f64> {
    b.to_vec::<f32>().iter().map(|&v| v as f64).collect()
}

/// The tiny model of the end-to-end tests: d 128, 2 heads of head dim 64 (the attention
/// kernels' instances), 2 layers, V 97 with mask token 96, no EOS.
pub fn tiny_model_cfg() -> kf_model::config::DditConfig {
    let mut c = kf_model::config::DditConfig::preset("tiny").unwrap();
    c.n_layers = 2;
    c.d_model = 128;
    c.n_heads = 2;
    c.vocab_size = 97;
    c.max_seq_len = 64;
    c.mask_token_id = Some(96);
    c.eos_token_id = None;
    c
}

/// The saved statistics of [`layernorm_fwd`]: mean and rstd per row (f32).
pub struct LnStats {
    pub mean: DeviceBuffer,
    pub rstd: DeviceBuffer,
}

/// `layernorm_fwd_<st>` of `x [rows, d]` with weight `w`, optional bias `b`, into `out`
/// (`rms`: the RMS mode), with the launch shape of kf_kernels::layernorm; the statistics.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    st: St,
    x: &DeviceBuffer,
    w: &DeviceBuffer,
    b: Option<&DeviceBuffer>,
    out: &DeviceBuffer,
    (rows, d): (usize, usize),
    eps: f32,
    rms: bool,
) -> LnStats {
    use kf_kernels_emu::{launch, Arg};
    let s = LnStats {
        mean: DeviceBuffer::uninit(4 * rows),
        rstd: DeviceBuffer::uninit(4 * rows),
    };
    let (cfg, cached) = kf_kernels::layernorm::config(rows, d);
    launch(
        &format!("layernorm_fwd_{}", st.suffix()),
        cfg,
        &[
            Arg::Buf(x),
            Arg::Buf(w),
            b.map_or(Arg::Null, Arg::Buf),
            Arg::Buf(out),
            Arg::Buf(&s.mean),
            Arg::Buf(&s.rstd),
            Arg::U32(rows as u32),
            Arg::U32(d as u32),
            Arg::F32(eps),
            Arg::I32(cached as i32),
            Arg::I32(rms as i32),
        ],
    )
    .unwrap();
    s
}

/// LayerNorm's backward as the launcher plans it (`layernorm_bwd_dx_<st>`, then
/// `layernorm_bwd_dwdb_<st>` over row chunks and `layernorm_bwd_reduce_f32` when there is more
/// than one): dx (storage dtype), dw and, with `bias`, db (f32). A null `mean` is RMSNorm's.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    st: St,
    x: &DeviceBuffer,
    w: &DeviceBuffer,
    g: &DeviceBuffer,
    mean: Option<&DeviceBuffer>,
    rstd: &DeviceBuffer,
    (rows, d): (usize, usize),
    bias: bool,
) -> (DeviceBuffer, DeviceBuffer, Option<DeviceBuffer>) {
    use kf_kernels::layernorm_bwd;
    use kf_kernels_emu::{launch, Arg};
    let sfx = st.suffix();
    let dx = st.alloc(rows * d);
    launch(
        &format!("layernorm_bwd_dx_{sfx}"),
        layernorm_bwd::dx_config(rows, d),
        &[
            Arg::Buf(x),
            Arg::Buf(w),
            Arg::Buf(g),
            mean.map_or(Arg::Null, Arg::Buf),
            Arg::Buf(rstd),
            Arg::Buf(&dx),
            Arg::U32(rows as u32),
            Arg::U32(d as u32),
        ],
    )
    .unwrap();
    let (cfg, chunk, nchunks) = layernorm_bwd::dwdb_config(rows, d);
    let (dw, db) = (DeviceBuffer::uninit(4 * d), DeviceBuffer::uninit(4 * d));
    let (pdw, pdb) = (
        DeviceBuffer::uninit(4 * d * nchunks as usize),
        DeviceBuffer::uninit(4 * d * nchunks as usize),
    );
    let direct = nchunks == 1;
    let (tw, tb) = if direct { (&dw, &db) } else { (&pdw, &pdb) };
    launch(
        &format!("layernorm_bwd_dwdb_{sfx}"),
        cfg,
        &[
            Arg::Buf(x),
            Arg::Buf(g),
            mean.map_or(Arg::Null, Arg::Buf),
            Arg::Buf(rstd),
            Arg::Buf(tw),
            if bias { Arg::Buf(tb) } else { Arg::Null },
            Arg::U32(rows as u32),
            Arg::U32(d as u32),
            Arg::U32(chunk),
        ],
    )
    .unwrap();
    if !direct {
        launch(
            "layernorm_bwd_reduce_f32",
            layernorm_bwd::reduce_config(d),
            &[
                Arg::Buf(&pdw),
                if bias { Arg::Buf(&pdb) } else { Arg::Null },
                Arg::Buf(&dw),
                if bias { Arg::Buf(&db) } else { Arg::Null },
                Arg::U32(d as u32),
                Arg::U32(nchunks),
            ],
        )
        .unwrap();
    }
    (dx, dw, bias.then_some(db))
}
