//! `kfrun inspect FILE`: validate a safetensors file fully and list its
//! tensors (name, dtype, shape, bytes) with totals.

use anyhow::Result;
use kf_engine::safetensors::SafeTensorsFile;
use std::path::Path;

pub fn run(path: &Path, json: bool) -> Result<()> {
    let f = SafeTensorsFile::open(path)?;
    let total_bytes: usize = f.tensors().iter().map(|t| t.len_bytes).sum();
    let total_elems: usize = f
        .tensors()
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    if json {
        let rows: Vec<serde_json::Value> = f
            .tensors()
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "dtype": t.dtype.safetensors_name(),
                    "shape": t.shape, "bytes": t.len_bytes,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "file": path.display().to_string(),
            "tensors": rows,
            "metadata": f.metadata(),
            "total_bytes": total_bytes,
            "total_elements": total_elems,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let name_w = f
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<name_w$}  {:<5}  {:<20}  {:>12}",
        "name", "dtype", "shape", "bytes"
    );
    for t in f.tensors() {
        let shape = format!("{:?}", t.shape);
        println!(
            "{:<name_w$}  {:<5}  {:<20}  {:>12}",
            t.name,
            t.dtype.safetensors_name(),
            shape,
            t.len_bytes
        );
    }
    for (k, v) in f.metadata() {
        println!("metadata {k} = {v}");
    }
    println!(
        "{} tensors, {} elements, {} bytes ({:.2} MiB) in {}",
        f.tensors().len(),
        total_elems,
        total_bytes,
        total_bytes as f64 / (1 << 20) as f64,
        path.display()
    );
    Ok(())
}
