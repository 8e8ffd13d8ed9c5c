//! A model on a kernel device for kfrun's model commands (generate, bench, eval): the AR teacher
//! or PFLM student uploaded to the CUDA kernels on a GPU or to the CPU emulator of the same
//! kernels, behind one object-safe trait so the commands need not be generic over the device.
//! Weight matrices keep the precision the model was read at (`WeightStore::Exact`: an f16 model
//! file serves from f16 matrices, half the bytes a decode step reads; the maths stays f32).

use crate::device_arg::Target;
use anyhow::{Context, Result};
use kf_model::eval::EvalBackend;
use kf_model::generate::{GenerateOptions, Generated};
use kf_model::kdev_model::{
    generate_ar_dev, generate_pflm_dev, DevDdit, DevPflm, WeightBytes, WeightStore,
};
use kf_model::pflm::{Pflm, PflmGenerateOptions};
use kf_model::Ddit;
use kf_ops::kdev::launch as kl;
use kf_ops::kdev::{DTensor, GemmSpec, KernelDevice};
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

struct OnDevice<D: KernelDevice> {
    dev: D,
    weights: DevWeights,
}

impl<D: KernelDevice> DevModel for OnDevice<D> {
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
        probes(&self.dev, bytes, gemm)
    }
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        opts: &PflmGenerateOptions,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<Generated> {
        match &self.weights {
            DevWeights::Ar(m) => generate_ar_dev(&self.dev, m, prompts, &opts.base, on_token),
            DevWeights::Pflm(m) => generate_pflm_dev(&self.dev, m, prompts, opts, on_token),
        }
    }
}

fn on_device<D: KernelDevice + 'static>(dev: D, model: HostModel) -> Result<Box<dyn DevModel>> {
    let weights = match model {
        HostModel::Ar(m) => DevWeights::Ar(DevDdit::upload_with(&dev, m, WeightStore::Exact)?),
        HostModel::Pflm(m) => DevWeights::Pflm(DevPflm::upload_with(&dev, m, WeightStore::Exact)?),
    };
    Ok(Box::new(OnDevice { dev, weights }))
}

/// The model's weights on the kernel device of `target` (matrices at the precision they were
/// read at, see the module's text), or `None` for the CPU.
pub fn upload(target: &Target, model: HostModel) -> Result<Option<Box<dyn DevModel>>> {
    let what = |t: &str| format!("uploading the model to {t}");
    match *target {
        Target::Cpu => Ok(None),
        Target::Emu => on_device(kf_kernels_emu::device::Emu, model)
            .with_context(|| what("the emulator"))
            .map(Some),
        #[cfg(feature = "cuda")]
        Target::Cuda(n) => on_device(kf_ops::kdev::cuda::Cuda::new(n)?, model)
            .with_context(|| what(&format!("cuda:{n}")))
            .map(Some),
        #[cfg(not(feature = "cuda"))]
        Target::Cuda(n) => anyhow::bail!("cuda:{n}: this kfrun was built without the cuda feature"),
    }
}

/// Median of three synchronised runs of `f` (after one warm-up), in seconds.
fn median3<D: KernelDevice>(dev: &D, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
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
pub fn probes<D: KernelDevice>(dev: &D, bytes: usize, gemm: usize) -> Result<(f64, f64)> {
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
struct EvalOnDevice<D: KernelDevice> {
    dev: D,
    teacher: DevDdit,
    student: DevPflm,
}

impl<D: KernelDevice> EvalBackend for EvalOnDevice<D> {
    fn generate_ar(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Generated> {
        generate_ar_dev(&self.dev, &self.teacher, prompts, opts, |_, _| Ok(()))
    }
    fn generate_pflm(&self, prompts: &[Vec<u32>], opts: &PflmGenerateOptions) -> Result<Generated> {
        generate_pflm_dev(&self.dev, &self.student, prompts, opts, |_, _| Ok(()))
    }
    fn teacher_logits(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (b, t) = (rows.len(), rows[0].len());
        self.teacher
            .forward(&self.dev, &rows.concat(), b, t)?
            .to_vec::<D, f32>(&self.dev)
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

fn eval_on<D: KernelDevice + 'static>(
    dev: D,
    teacher: &Ddit,
    student: &Pflm,
) -> Result<Box<dyn EvalBackend>> {
    let teacher = DevDdit::upload_with(&dev, teacher, WeightStore::Exact)?;
    let student = DevPflm::upload_with(&dev, student, WeightStore::Exact)?;
    Ok(Box::new(EvalOnDevice {
        dev,
        teacher,
        student,
    }))
}

/// Teacher and student on the kernel device of `target` for `kfrun eval`, or `None` (CPU).
pub fn eval_backend(
    target: &Target,
    teacher: &Ddit,
    student: &Pflm,
) -> Result<Option<Box<dyn EvalBackend>>> {
    let what = |t: &str| format!("uploading teacher and student to {t}");
    match *target {
        Target::Cpu => Ok(None),
        Target::Emu => eval_on(kf_kernels_emu::device::Emu, teacher, student)
            .with_context(|| what("the emulator"))
            .map(Some),
        #[cfg(feature = "cuda")]
        Target::Cuda(n) => eval_on(kf_ops::kdev::cuda::Cuda::new(n)?, teacher, student)
            .with_context(|| what(&format!("cuda:{n}")))
            .map(Some),
        #[cfg(not(feature = "cuda"))]
        Target::Cuda(n) => {
            anyhow::bail!("cuda:{n}: this kfrun was built without the cuda feature")
        }
    }
}

/// Runs `f` with the training backend of `target` (`kfrun train` and `distill`): the CPU
/// autograd trainer, or the kernel-device trainer on the emulator or a GPU.
pub fn with_train_backend<R>(
    target: Target,
    f: impl FnOnce(&dyn kf_model::train::TrainBackend) -> Result<R>,
) -> Result<R> {
    use kf_model::train::{CpuBackend, DevBackend};
    match target {
        Target::Cpu => f(&CpuBackend),
        Target::Emu => f(&DevBackend::new(
            &kf_kernels_emu::device::Emu,
            "the emulator",
        )),
        #[cfg(feature = "cuda")]
        Target::Cuda(n) => {
            let dev = kf_ops::kdev::cuda::Cuda::new(n)?;
            f(&DevBackend::new(&dev, format!("cuda:{n}")))
        }
        #[cfg(not(feature = "cuda"))]
        Target::Cuda(n) => anyhow::bail!("cuda:{n}: this kfrun was built without the cuda feature"),
    }
}
