//! `--device` of kfrun's model commands (generate, bench, eval, train, distill):
//! parse it and check that the device can be used. generate, bench and eval run their
//! model on a kernel device ([`select_target`]: the CUDA kernels on a GPU, or on the
//! emulator); train and distill run on the CPU only so far and say so ([`select`]).

use anyhow::{bail, Result};
use kf_engine::Device;

/// The device of `kfrun <cmd> --device <flag>`; an error in one sentence for
/// anything but a CPU: a build without the cuda feature, a missing driver or
/// GPU, or (with a usable GPU) the missing CUDA path of the model.
pub fn select(cmd: &str, flag: &str) -> Result<Device> {
    if flag == "emu" {
        bail!(
            "--device emu: kfrun {cmd} runs on the CPU only so far (the emulated kernels serve \
             generate, bench and eval); use --device cpu"
        );
    }
    let device = Device::parse(flag)?;
    if let Err(e) = device.ensure_available() {
        bail!("--device {flag}: {e:#}");
    }
    if !device.is_cpu() {
        bail!(
            "--device {flag}: {device} is usable, but kfrun {cmd} runs its model on the CPU only \
             so far (generate, bench and eval run on the GPU); use --device cpu"
        );
    }
    Ok(device)
}

/// Where `kfrun generate`, `bench` or `eval` runs its model.
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

/// The target of `--device <flag>` for a command whose model runs on kernel devices:
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
