//! Tensors <-> safetensors files. Loading maps the file and hands out
//! zero-copy tensors when the dtype is kept and the data is aligned; saving
//! goes through a temporary file and a rename (see `safetensors::save`).

use crate::layout::Layout;
use crate::safetensors::{self, SafeTensorsFile, TensorToWrite};
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Tensor};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Every tensor of a safetensors file, in data order, plus its metadata.
pub struct LoadedTensors {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: BTreeMap<String, String>,
}

impl LoadedTensors {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// Load all tensors of `path` (CPU, zero-copy where possible).
pub fn load(path: &Path) -> Result<LoadedTensors> {
    let file = SafeTensorsFile::open(path)?;
    let mut tensors = Vec::with_capacity(file.tensors().len());
    for info in file.tensors() {
        let n = info.len_bytes / info.dtype.size();
        let storage = CpuStorage::from_mmap(info.dtype, file.mmap().clone(), info.data_start, n);
        let t = Tensor::from_storage(Storage::Cpu(storage), Layout::contiguous(&info.shape), None)
            .with_context(|| format!("{}: tensor \"{}\"", path.display(), info.name))?;
        tensors.push((info.name.clone(), t));
    }
    Ok(LoadedTensors {
        tensors,
        metadata: file.metadata().clone(),
    })
}

/// Save tensors (any layout, any device: device tensors are downloaded) atomically to `path`.
pub fn save(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let contig: Vec<Tensor> = tensors
        .iter()
        .map(|(_, t)| t.to_device(crate::Device::Cpu)?.contiguous())
        .collect::<Result<_>>()?;
    let guards: Vec<_> = contig.iter().map(|t| t.storage()).collect::<Result<_>>()?;
    let mut items = Vec::with_capacity(tensors.len());
    for ((name, _), (t, g)) in tensors.iter().zip(contig.iter().zip(&guards)) {
        let s = g.cpu()?;
        let esize = t.dtype().size();
        let start = t.layout().offset() * esize;
        let bytes = &s.as_bytes()[start..start + t.numel() * esize];
        ensure!(
            t.dtype() == s.dtype(),
            "tensor \"{name}\": storage dtype mismatch"
        );
        items.push(TensorToWrite {
            name,
            dtype: t.dtype(),
            shape: t.shape(),
            data: bytes,
        });
    }
    safetensors::save(path, &items, metadata)
}

/// Convenience: the dtype histogram of a file, for `kfrun inspect`.
pub fn dtype_counts(file: &SafeTensorsFile) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in file.tensors() {
        *m.entry(DType::to_string(&i.dtype)).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn round_trip_is_zero_copy_and_exact() {
        let dir = std::env::temp_dir().join(format!("kf-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        let a = Tensor::from_vec(
            (0..12).map(|x| x as f32 * 0.5).collect(),
            &[3, 4],
            Device::Cpu,
        )
        .unwrap();
        let b = Tensor::from_vec(vec![7u32, 9], &[2], Device::Cpu).unwrap();
        let at = a.transpose(0, 1).unwrap();
        save(&p, &[("a", &a), ("at", &at), ("b", &b)], &BTreeMap::new()).unwrap();
        let l = load(&p).unwrap();
        let la = l.get("a").unwrap();
        assert!(
            la.is_mapped().unwrap(),
            "aligned f32 data should be mapped, not copied"
        );
        assert_eq!(la.to_vec::<f32>().unwrap(), a.to_vec::<f32>().unwrap());
        assert_eq!(
            l.get("at").unwrap().to_vec::<f32>().unwrap(),
            at.to_vec::<f32>().unwrap()
        );
        assert_eq!(l.get("b").unwrap().to_vec::<u32>().unwrap(), vec![7, 9]);
        assert_eq!(l.get("at").unwrap().shape(), &[4, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
