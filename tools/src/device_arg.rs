//! `--device` of kfrun's model commands (generate, bench, eval, train, distill): parse it
//! with the engine's one parser and check that the device can be used now.

use anyhow::{anyhow, bail, Result};
use kf_engine::Device;

/// The device of `--device <flag>`: cpu, emu, cuda / cuda:N / gpu; one sentence when it
/// cannot be used.
pub fn select_device(flag: &str) -> Result<Device> {
    let device = Device::parse(flag).map_err(|e| anyhow!("--device {flag}: {e:#}"))?;
    if let Err(e) = device.ensure_available() {
        bail!("--device {flag}: {e:#}");
    }
    Ok(device)
}
