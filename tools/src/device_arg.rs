//! `--device` of kfrun's model commands (generate, bench, eval, train, distill):
//! parse it and check that the device can be used ([`select_target`]): the CPU ops, or
//! the CUDA kernels on a GPU or on the emulator.

use anyhow::{bail, Result};
use kf_engine::Device;

/// Where a model command runs its model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The CPU ops (kf-ops).
    Cpu,
    /// The CUDA kernels on the CPU emulator (kernels/emu).
    Emu,
    /// The CUDA kernels on GPU `n` (a build with the cuda feature).
    Cuda(usize),
}

impl Target {
    pub fn is_kernel_device(&self) -> bool {
        !matches!(self, Target::Cpu)
    }
}

/// The target of `--device <flag>`:
/// cpu, emu, cuda / cuda:N / gpu; one sentence when the GPU cannot be used.
pub fn select_target(flag: &str) -> Result<Target> {
    if flag == "emu" {
        return Ok(Target::Emu);
    }
    let device = Device::parse(flag)?;
    if let Err(e) = device.ensure_available() {
        bail!("--device {flag}: {e:#}");
    }
    Ok(match device {
        Device::Cpu => Target::Cpu,
        Device::Cuda(n) => Target::Cuda(n),
    })
}
