//! Where a tensor lives. CPU is always available and is the reference; the
//! CUDA issue adds `Device::Cuda(ordinal)` behind the `cuda` feature.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
}

impl Device {
    /// Parse a `--device` flag value.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => bail!(
                "device \"{s}\": this build of kfrun has no CUDA backend yet; use --device cpu"
            ),
            other => bail!("unknown device \"{other}\" (expected cpu or cuda)"),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}
