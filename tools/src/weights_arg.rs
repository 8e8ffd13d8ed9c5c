//! `--dtype` of the commands that serve a model (generate, serve, bench, bench serve): how its
//! weight matrices are held for inference. f32 / f16 / bf16: the matrices and the
//! embedding table stored so (rounded; activations and sums stay f32). q8_0 / q4_0 / q4_1:
//! the projections and the head rounded to ggml blocks and multiplied by the integer
//! kernels on the CPU (activations rounded to 8-bit blocks, as llama.cpp does). One parser
//! and one way to apply it.

use anyhow::{bail, Result};
use kf_engine::gemm::QFormat;
use kf_engine::{DType, Device};
use kf_model::batch::Model;
use kf_model::ddit::Ddit;
use kf_model::pflm::Pflm;

/// The values `--dtype` takes (clap's value parser).
pub const VALUES: [&str; 6] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"];

/// What `--dtype` asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServeAs {
    Float(DType),
    Blocks(QFormat),
}

impl ServeAs {
    pub fn parse(flag: &str) -> Result<ServeAs> {
        Ok(match flag.to_ascii_lowercase().as_str() {
            "f32" => ServeAs::Float(DType::F32),
            "f16" => ServeAs::Float(DType::F16),
            "bf16" => ServeAs::Float(DType::BF16),
            "q8_0" => ServeAs::Blocks(QFormat::Q8_0),
            "q4_0" => ServeAs::Blocks(QFormat::Q4_0),
            "q4_1" => ServeAs::Blocks(QFormat::Q4_1),
            _ => bail!("--dtype {flag}: expected one of {}", VALUES.join(", ")),
        })
    }

    /// `--dtype` if given.
    pub fn of(flag: Option<&str>) -> Result<Option<ServeAs>> {
        flag.map(ServeAs::parse).transpose()
    }

    /// Block formats are multiplied by CPU kernels only: refused on a kernel device (whose
    /// copy of the model would silently be the f32 dequantization).
    pub fn check_device(self, device: Device) -> Result<()> {
        if let ServeAs::Blocks(f) = self {
            if !device.is_cpu() {
                bail!(
                    "--dtype {}: block formats run on the CPU only (--device cpu); on {device} use f32, f16 or bf16",
                    f.to_string().to_lowercase()
                );
            }
        }
        Ok(())
    }

    pub fn ddit(self, m: &Ddit) -> Result<Ddit> {
        match self {
            ServeAs::Float(d) => m.with_tables_in(d),
            ServeAs::Blocks(f) => m.quantized(f),
        }
    }

    /// An AR model or a student, served as asked.
    pub fn model(self, m: Model) -> Result<Model> {
        Ok(match m {
            Model::Ar(m) => Model::Ar(self.ddit(&m)?),
            Model::Pflm(m) => Model::Pflm(self.pflm(&m)?),
        })
    }

    pub fn pflm(self, m: &Pflm) -> Result<Pflm> {
        match self {
            ServeAs::Float(d) => m.with_tables_in(d),
            ServeAs::Blocks(f) => m.quantized(f),
        }
    }
}
