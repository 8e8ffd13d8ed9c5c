//! Where a tensor lives and a model runs — the one name for it, with the one parser of
//! `--device`: `cpu` (the CPU ops; always available, the reference), `emu` (the CUDA kernels
//! of kernels/*.cu on the CPU emulator) or `cuda[:N]` (a GPU, in a build with the `cuda`
//! feature and with a driver and device present). [`Device::kernel`] opens the kernel device
//! behind `emu` / `cuda:N`.

use crate::kernel_device::KernelDevice;
use anyhow::{bail, Result};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA kernels on the CPU emulator (kernels/emu): a slow, exact correctness check.
    Emu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

/// The one message for a CUDA device in a build without the `cuda` feature (callers put the
/// device or the flag in front).
pub fn built_without_cuda() -> anyhow::Error {
    anyhow::anyhow!(
        "this kfrun was built without the cuda feature \
         (cargo build --release -p kf-tools --features cuda); use --device cpu or emu"
    )
}

impl Device {
    /// Parse a `--device` flag value: `cpu`, `emu`, `cuda`, `cuda:N` (`gpu` = `cuda`).
    /// Without the `cuda` feature a CUDA device is an error saying so.
    pub fn parse(s: &str) -> Result<Device> {
        let ordinal = match s {
            "cpu" => return Ok(Device::Cpu),
            "emu" => return Ok(Device::Emu),
            "cuda" | "gpu" => 0,
            other => match other.strip_prefix("cuda:") {
                Some(n) => match n.parse::<usize>() {
                    Ok(n) => n,
                    Err(_) => bail!("the ordinal after cuda: must be a number, got \"{n}\""),
                },
                None => bail!("unknown device \"{other}\" (expected cpu, emu, cuda or cuda:N)"),
            },
        };
        if !cfg!(feature = "cuda") {
            return Err(built_without_cuda());
        }
        Ok(Device::Cuda(ordinal))
    }

    /// Ok if this device can be used now: always for the CPU and the emulator; for a GPU,
    /// the driver library, a device with this ordinal and a new enough architecture must be
    /// there (the error is one sentence naming what is not).
    pub fn ensure_available(&self) -> Result<()> {
        match *self {
            Device::Cpu | Device::Emu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => crate::cuda::CudaDevice::get(n).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(built_without_cuda().context(self.to_string())),
        }
    }

    /// The kernel device behind `emu` or `cuda:N` (one per process and device, opened on
    /// first use); an error for `cpu`, which runs the CPU ops instead.
    pub fn kernel(&self) -> Result<Arc<dyn KernelDevice>> {
        crate::kernel_device::open(*self)
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// True for the devices that run the CUDA kernels (`emu`, `cuda:N`).
    pub fn is_kernel_device(&self) -> bool {
        !self.is_cpu()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Emu => f.write_str("emu"),
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
        assert_eq!(Device::parse("emu").unwrap(), Device::Emu);
        assert_eq!(Device::Emu.to_string(), "emu");
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "EMU"] {
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
        assert!(Device::Emu.ensure_available().is_ok());
        assert!(Device::Cpu.kernel().is_err());
        assert_eq!(Device::Emu.kernel().unwrap().name(), "emu");
    }
}
