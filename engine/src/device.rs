//! Where a tensor lives. CPU is always available and is the reference;
//! `Device::Cuda(ordinal)` names a GPU, usable when kfrun is built with the
//! `cuda` feature (engine/src/cuda/) and a driver and device are present.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl Device {
    /// Parse a `--device` flag value: `cpu`, `cuda`, `cuda:N` (`gpu` = `cuda`).
    /// Without the `cuda` feature a CUDA device is an error saying so.
    pub fn parse(s: &str) -> Result<Device> {
        let ordinal = match s {
            "cpu" => return Ok(Device::Cpu),
            "cuda" | "gpu" => 0,
            other => match other.strip_prefix("cuda:") {
                Some(n) => match n.parse::<usize>() {
                    Ok(n) => n,
                    Err(_) => bail!("device \"{other}\": the ordinal after cuda: must be a number"),
                },
                None => bail!("unknown device \"{other}\" (expected cpu, cuda or cuda:N)"),
            },
        };
        if !cfg!(feature = "cuda") {
            bail!(
                "device \"{s}\": this kfrun was built without the cuda feature \
                 (cargo build --release -p kf-tools --features cuda); use --device cpu"
            );
        }
        Ok(Device::Cuda(ordinal))
    }

    /// Ok if this device can be used now: always for the CPU; for a GPU, the
    /// driver library, a device with this ordinal and a new enough
    /// architecture must be there (the error is one sentence naming what is not).
    pub fn ensure_available(&self) -> Result<()> {
        match *self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => crate::cuda::CudaDevice::get(n).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!("{self}: this kfrun was built without the cuda feature"),
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_and_errors() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            assert!(Device::parse(bad).is_err(), "{bad}");
        }
        let e = Device::parse("cuda:x").unwrap_err().to_string();
        assert!(e.contains("must be a number"), "{e}");
        for (s, n) in [("cuda", 0), ("gpu", 0), ("cuda:0", 0), ("cuda:3", 3)] {
            match Device::parse(s) {
                Ok(d) => {
                    assert!(cfg!(feature = "cuda"));
                    assert_eq!(d, Device::Cuda(n));
                    assert_eq!(d.to_string(), format!("cuda:{n}"));
                }
                Err(e) => {
                    assert!(!cfg!(feature = "cuda"));
                    assert!(
                        e.to_string().contains("built without the cuda feature"),
                        "{e}"
                    );
                }
            }
        }
        assert!(Device::Cpu.ensure_available().is_ok());
    }
}
