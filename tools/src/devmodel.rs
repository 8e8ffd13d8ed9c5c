//! A model on a kernel device for kfrun's model commands (generate, bench, eval): the AR teacher
//! or PFLM student uploaded to the CUDA kernels on a GPU or to the CPU emulator of the same
//! kernels, behind one object-safe trait so the commands need not be generic over the device.
//! Weight matrices keep the precision the model was read at (`WeightStore::Exact`: an f16 model
//! file serves from f16 matrices, half the bytes a decode step reads; the maths stays f32).

use anyhow::{Context, Result};
use kf_engine::Device;
use kf_model::eval::EvalBackend;
use kf_model::generate::{GenerateOptions, Generated};
use kf_model::kdev_model::{
    generate_ar_dev, generate_pflm_dev, DevDdit, DevPflm, WeightBytes, WeightStore,
};
use kf_model::pflm::{Pflm, PflmGenerateOptions};
use kf_model::Ddit;
use kf_ops::kdev::launch as kl;
use kf_ops::kdev::{DTensor, GemmSpec, KernelDevice};
use std::sync::Arc;
use std::time::Instant;

/// The host model to upload.
#[derive(Clone, Copy)]
pub enum HostModel<'a> {
    Ar(&'a Ddit),
    Pflm(&'a Pflm),
}

/// A model uploaded to a kernel device.
pub trait DevModel {
    fn name(&self) -> String;
    /// Bytes of the parameters on the device, and the weight matrices' storage.
    fn weight_bytes(&self) -> WeightBytes;
    /// The device's copy bandwidth (GB/s, read + write) over `bytes`, and its f32 GEMM rate
    /// (GFLOP/s) at m = n = k = `gemm`: medians of three.
    fn probes(&self, bytes: usize, gemm: usize) -> Result<(f64, f64)>;
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        opts: &PflmGenerateOptions,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<Generated>;
}

enum DevWeights {
    Ar(DevDdit),
    Pflm(DevPflm),
}

struct OnDevice {
    dev: Arc<dyn KernelDevice>,
    weights: DevWeights,
}

impl DevModel for OnDevice {
    fn name(&self) -> String {
        self.dev.name()
    }
    fn weight_bytes(&self) -> WeightBytes {
        match &self.weights {
            DevWeights::Ar(m) => m.weight_bytes(),
            DevWeights::Pflm(m) => m.weight_bytes(),
        }
    }
    fn probes(&self, bytes: usize, gemm: usize) -> Result<(f64, f64)> {
        probes(&*self.dev, bytes, gemm)
    }
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        opts: &PflmGenerateOptions,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<Generated> {
        match &self.weights {
            DevWeights::Ar(m) => generate_ar_dev(&*self.dev, m, prompts, &opts.base, on_token),
            DevWeights::Pflm(m) => generate_pflm_dev(&*self.dev, m, prompts, opts, on_token),
        }
    }
}

fn on_device(dev: Arc<dyn KernelDevice>, model: HostModel) -> Result<Box<dyn DevModel>> {
    let weights = match model {
        HostModel::Ar(m) => DevWeights::Ar(DevDdit::upload_with(&*dev, m, WeightStore::Exact)?),
        HostModel::Pflm(m) => DevWeights::Pflm(DevPflm::upload_with(&*dev, m, WeightStore::Exact)?),
    };
    Ok(Box::new(OnDevice { dev, weights }))
}

/// The model's weights on kernel device `device` (matrices at the precision they were read
/// at, see the module's text), or `None` for the CPU.
pub fn upload(device: Device, model: HostModel) -> Result<Option<Box<dyn DevModel>>> {
    if device.is_cpu() {
        return Ok(None);
    }
    on_device(device.kernel()?, model)
        .with_context(|| format!("uploading the model to {device}"))
        .map(Some)
}

/// Median of three synchronised runs of `f` (after one warm-up), in seconds.
fn median3<D: KernelDevice + ?Sized>(dev: &D, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = [0.0; 3];
    for x in &mut t {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        *x = t0.elapsed().as_secs_f64();
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[1])
}

/// Copy bandwidth (GB/s, read + write) and f32 GEMM rate (GFLOP/s) of a kernel device.
pub fn probes<D: KernelDevice + ?Sized>(dev: &D, bytes: usize, gemm: usize) -> Result<(f64, f64)> {
    let (src, dst) = (dev.alloc_zeroed(bytes)?, dev.alloc_zeroed(bytes)?);
    let tc = median3(dev, &mut || dev.copy(&src, 0, &dst, 0, bytes))?;
    drop((src, dst));
    let g = gemm;
    let x = vec![0.5f32; g * g];
    let (a, b) = (
        DTensor::from_slice(dev, &x, &[g, g])?,
        DTensor::from_slice(dev, &x, &[g, g])?,
    );
    let c = DTensor::zeros(dev, &[g, g], kf_engine::DType::F32)?;
    let spec = GemmSpec::simple(g, g, g, true);
    let tg = median3(dev, &mut || kl::matmul_into(dev, &spec, &a, &b, &c))?;
    Ok((
        2.0 * bytes as f64 / tc / 1e9,
        2.0 * (g as f64).powi(3) / tg / 1e9,
    ))
}

/// Teacher and student on a kernel device for `kfrun eval`.
struct EvalOnDevice {
    dev: Arc<dyn KernelDevice>,
    teacher: DevDdit,
    student: DevPflm,
}

impl EvalBackend for EvalOnDevice {
    fn generate_ar(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Generated> {
        generate_ar_dev(&*self.dev, &self.teacher, prompts, opts, |_, _| Ok(()))
    }
    fn generate_pflm(&self, prompts: &[Vec<u32>], opts: &PflmGenerateOptions) -> Result<Generated> {
        generate_pflm_dev(&*self.dev, &self.student, prompts, opts, |_, _| Ok(()))
    }
    fn teacher_logits(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (b, t) = (rows.len(), rows[0].len());
        self.teacher
            .forward(&*self.dev, &rows.concat(), b, t)?
            .to_vec::<dyn KernelDevice, f32>(&*self.dev)
    }
    fn teacher_last_logits(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (b, t) = (rows.len(), rows[0].len());
        let all = self.teacher_logits(rows)?;
        let v = all.len() / (b * t);
        Ok((0..b)
            .flat_map(|i| all[(i * t + t - 1) * v..(i * t + t) * v].iter().copied())
            .collect())
    }
}

/// Teacher and student on kernel device `device` for `kfrun eval`, or `None` (CPU).
pub fn eval_backend(
    device: Device,
    teacher: &Ddit,
    student: &Pflm,
) -> Result<Option<Box<dyn EvalBackend>>> {
    if device.is_cpu() {
        return Ok(None);
    }
    let dev = device.kernel()?;
    let upload = || -> Result<Box<dyn EvalBackend>> {
        let teacher = DevDdit::upload_with(&*dev, teacher, WeightStore::Exact)?;
        let student = DevPflm::upload_with(&*dev, student, WeightStore::Exact)?;
        Ok(Box::new(EvalOnDevice {
            dev: dev.clone(),
            teacher,
            student,
        }))
    };
    upload()
        .with_context(|| format!("uploading teacher and student to {device}"))
        .map(Some)
}

/// Runs `f` with the training backend of `device` (`kfrun train` and `distill`): the CPU
/// autograd trainer, or the kernel-device trainer on the emulator or a GPU.
pub fn with_train_backend<R>(
    device: Device,
    f: impl FnOnce(&dyn kf_model::train::TrainBackend) -> Result<R>,
) -> Result<R> {
    use kf_model::train::{CpuBackend, DevBackend};
    if device.is_cpu() {
        return f(&CpuBackend);
    }
    let dev = device.kernel()?;
    let name = match device {
        Device::Emu => "the emulator".to_string(),
        d => d.to_string(),
    };
    f(&DevBackend::new(&*dev, name))
}
