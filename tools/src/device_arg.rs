//! `--device` of kfrun's model commands (generate, bench, eval, train, distill):
//! parse it, check that the device can be used, and say plainly that the model
//! itself runs on the CPU only so far (tensors have no CUDA storage yet).

use anyhow::{bail, Result};
use kf_engine::Device;

/// The device of `kfrun <cmd> --device <flag>`; an error in one sentence for
/// anything but a CPU: a build without the cuda feature, a missing driver or
/// GPU, or (with a usable GPU) the missing CUDA path of the model.
pub fn select(cmd: &str, flag: &str) -> Result<Device> {
    let device = Device::parse(flag)?;
    if let Err(e) = device.ensure_available() {
        bail!("--device {flag}: {e:#}");
    }
    if !device.is_cpu() {
        bail!(
            "--device {flag}: {device} is usable, but kfrun {cmd} runs its model on the CPU only \
             so far (tensors have no CUDA storage yet); use --device cpu"
        );
    }
    Ok(device)
}
