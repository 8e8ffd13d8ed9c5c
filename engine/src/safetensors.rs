//! Byte-level safetensors reader (memory-mapped, fully validated) and writer
//! (aligned, atomic). Knows nothing about tensors: it hands out dtype, shape and
//! raw little-endian bytes; the engine's `Tensor` builds on top of it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::DType;

/// Largest JSON header we accept (guards against absurd allocations).
const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// Key of the optional string->string metadata object in the header.
const METADATA_KEY: &str = "__metadata__";

/// One tensor described by a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute offset of the first data byte in the file.
    pub data_start: usize,
    pub len_bytes: usize,
}

/// A validated, memory-mapped safetensors file.
#[derive(Debug)]
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Arc<memmap2::Mmap>,
    /// Sorted by data offset (ties, i.e. zero-sized tensors, in header order).
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl SafeTensorsFile {
    /// Memory-maps `path` and validates its header and data layout.
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let file = File::open(path).with_context(|| format!("{label}: cannot open file"))?;
        // SAFETY: the file is opened read-only and the mapping is only ever read
        // through shared slices, i.e. treated as immutable. Another process
        // truncating or rewriting the file while it is mapped is outside our
        // contract (save() never rewrites in place: it renames a new file over).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{label}: cannot memory-map file"))?;
        let (tensors, metadata) = Self::parse_header(&mmap, &label)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            tensors,
            index,
            metadata,
        })
    }

    /// Validates a whole safetensors file held in `bytes` and returns its
    /// tensors (sorted by data offset) and metadata. `file_label` prefixes every
    /// error message. Never panics, whatever the input.
    pub fn parse_header(
        bytes: &[u8],
        file_label: &str,
    ) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>)> {
        parse(bytes).map_err(|e| anyhow!("{file_label}: {e}"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors sorted by data offset.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Zero-copy view of a tensor's bytes. `info` must come from this file
    /// (panics if its range lies outside the mapping).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let range = info
            .data_start
            .checked_add(info.len_bytes)
            .and_then(|end| self.mmap.get(info.data_start..end));
        match range {
            Some(b) => b,
            None => panic!(
                "{}: tensor {:?} (bytes {}+{}) is not from this file ({} bytes)",
                self.path.display(),
                info.name,
                info.data_start,
                info.len_bytes,
                self.mmap.len()
            ),
        }
    }

    /// The shared mapping, so zero-copy storage can keep it alive.
    pub fn mmap(&self) -> &Arc<memmap2::Mmap> {
        &self.mmap
    }
}

/// One tensor to be written by [`save`].
#[derive(Clone, Copy, Debug)]
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Writes `tensors` (in the given order, contiguous) and `metadata` to `path`
/// atomically ([`crate::fs::write_atomic_with`]: never half-written). The data section
/// starts at a multiple of 8 bytes.
pub fn save(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let label = path.display().to_string();
    let header = build_header(tensors, metadata).map_err(|e| anyhow!("{label}: {e}"))?;

    crate::fs::write_atomic_with(path, |w| write_body(w, &header, tensors))
        .with_context(|| format!("{label}: cannot save"))
}

fn write_body(w: &mut impl Write, header: &str, tensors: &[TensorToWrite<'_>]) -> Result<()> {
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for t in tensors {
        w.write_all(t.data)?;
    }
    Ok(())
}

/// Header JSON, padded with spaces so that 8 + len is a multiple of 8.
fn build_header(
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut header = String::from("{");
    if !metadata.is_empty() {
        header.push_str(&json_str(METADATA_KEY));
        header.push(':');
        header.push_str(&serde_json::to_string(metadata).map_err(|e| e.to_string())?);
    }
    let mut seen = HashSet::new();
    let mut offset = 0usize;
    for t in tensors {
        if t.name.is_empty() {
            return Err("tensor names must not be empty".into());
        }
        if t.name == METADATA_KEY {
            return Err(format!("{METADATA_KEY:?} is reserved, not a tensor name"));
        }
        if !seen.insert(t.name) {
            return Err(format!("duplicate tensor name {:?}", t.name));
        }
        let sz = byte_len(t.shape, t.dtype).ok_or_else(|| {
            format!(
                "tensor {:?}: shape {:?} of {} overflows usize",
                t.name,
                t.shape,
                t.dtype.safetensors_name()
            )
        })?;
        if sz.bytes != t.data.len() {
            return Err(format!(
                "tensor {:?}: shape {:?} ({}) but {} bytes of data given",
                t.name,
                t.shape,
                sz,
                t.data.len()
            ));
        }
        let end = offset
            .checked_add(sz.bytes)
            .ok_or_else(|| format!("tensor {:?}: total data size overflows usize", t.name))?;
        if header.len() > 1 {
            header.push(',');
        }
        header.push_str(&json_str(t.name));
        header.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{end}]}}",
            t.dtype.safetensors_name(),
            serde_json::to_string(t.shape).map_err(|e| e.to_string())?,
        ));
        offset = end;
    }
    header.push('}');
    let pad = (8 - (8 + header.len()) % 8) % 8;
    header.extend(std::iter::repeat_n(' ', pad));
    if header.len() as u64 > MAX_HEADER_LEN {
        return Err(format!(
            "oversized header: {} bytes (limit {MAX_HEADER_LEN})",
            header.len()
        ));
    }
    Ok(header)
}

fn json_str(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

/// Element count and byte size of a shape.
struct Size {
    elems: usize,
    bytes: usize,
    dtype: DType,
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} elements of {} = {} bytes",
            self.elems,
            self.dtype.safetensors_name(),
            self.bytes
        )
    }
}

/// `None` on usize overflow.
fn byte_len(shape: &[usize], dtype: DType) -> Option<Size> {
    let elems = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let bytes = elems.checked_mul(dtype.size())?;
    Some(Size {
        elems,
        bytes,
        dtype,
    })
}

/// Top-level header entries in file order, duplicates kept (serde_json's own
/// map would silently keep only the last of duplicate keys).
struct OrderedEntries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedEntries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    v.push(entry);
                }
                Ok(OrderedEntries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Describes a JSON value's type for error messages.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_index(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

/// The validation behind [`SafeTensorsFile::parse_header`]; errors lack the
/// file label, which the caller adds.
fn parse(bytes: &[u8]) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>), String> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(format!(
            "file is {} bytes, shorter than 8 bytes (the header length field); not a safetensors file",
            bytes.len()
        ));
    };
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_LEN {
        return Err(format!(
            "oversized header: header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes; \
             not a safetensors file?"
        ));
    }
    let available = bytes.len() - 8;
    let header_len = usize::try_from(n).ok().filter(|&n| n <= available);
    let Some(header_len) = header_len else {
        return Err(format!(
            "header length {n} is larger than the {available} bytes following it; \
             file is truncated or not a safetensors file"
        ));
    };
    let data_base = 8 + header_len;
    let data_len = bytes.len() - data_base;
    let header = std::str::from_utf8(&bytes[8..data_base])
        .map_err(|e| format!("header is not valid UTF-8: {e}"))?;
    let entries = match serde_json::from_str::<OrderedEntries>(header) {
        Ok(e) => e.0,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Err(format!("header is not a JSON object: {e}"));
        }
        Err(e) => return Err(format!("header is not valid JSON: {e}")),
    };

    let mut seen = HashSet::new();
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(format!("duplicate key {name:?} in header"));
        }
        if name == METADATA_KEY {
            metadata = parse_metadata(value)?;
            continue;
        }
        let mut info = parse_entry(&name, &value).map_err(|e| format!("tensor {name:?}: {e}"))?;
        // info.data_start is still relative to the data section here.
        let end = info.data_start + info.len_bytes;
        if end > data_len {
            return Err(format!(
                "file is truncated: tensor {name:?} needs bytes up to {end} of the data section \
                 but only {data_len} are present"
            ));
        }
        // end <= data_len, and data_base + data_len is the file size.
        info.data_start += data_base;
        tensors.push(info);
    }

    // Stable: zero-sized tensors sharing an offset keep header order.
    tensors.sort_by_key(|t| t.data_start);
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.len_bytes > 0) {
        if let Some(p) = prev {
            // Both ranges were checked against the file size: no overflow.
            let p_end = p.data_start + p.len_bytes;
            if t.data_start < p_end {
                return Err(format!(
                    "tensors {:?} (data_offsets [{}, {}]) and {:?} (data_offsets [{}, {}]) overlap",
                    p.name,
                    p.data_start - data_base,
                    p_end - data_base,
                    t.name,
                    t.data_start - data_base,
                    t.data_start + t.len_bytes - data_base,
                ));
            }
        }
        prev = Some(t);
    }
    Ok((tensors, metadata))
}

fn parse_metadata(value: Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "{METADATA_KEY:?} must be an object of strings, got {}",
            json_type(&value)
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(format!(
                "{METADATA_KEY:?} value for key {k:?} must be a string, got {}",
                json_type(&other)
            )),
        })
        .collect()
}

/// Parses one tensor entry; the returned `data_start` is relative to the data
/// section (the caller checks it against the file size and makes it absolute).
fn parse_entry(name: &str, value: &Value) -> Result<TensorInfo, String> {
    let Value::Object(obj) = value else {
        return Err(format!(
            "entry must be an object with dtype, shape and data_offsets, got {}",
            json_type(value)
        ));
    };
    let field = |key: &str| obj.get(key).ok_or_else(|| format!("missing {key:?}"));

    let dtype = match field("dtype")? {
        Value::String(s) => DType::from_safetensors_name(s).ok_or_else(|| {
            format!("unsupported dtype {s:?} (supported: F16, BF16, F32, F64, U32, I32)")
        })?,
        other => {
            return Err(format!(
                "\"dtype\" must be a string, got {}",
                json_type(other)
            ))
        }
    };

    let shape = match field("shape")? {
        Value::Array(dims) => dims
            .iter()
            .enumerate()
            .map(|(i, d)| {
                as_index(d).ok_or_else(|| {
                    format!("\"shape\"[{i}] must be a non-negative integer, got {d}")
                })
            })
            .collect::<Result<Vec<usize>, String>>()?,
        other => {
            return Err(format!(
                "\"shape\" must be an array, got {}",
                json_type(other)
            ))
        }
    };

    let (begin, end) = match field("data_offsets")? {
        Value::Array(o) if o.len() == 2 => {
            let get = |i: usize| {
                as_index(&o[i]).ok_or_else(|| {
                    format!(
                        "\"data_offsets\"[{i}] must be a non-negative integer, got {}",
                        o[i]
                    )
                })
            };
            (get(0)?, get(1)?)
        }
        other => {
            return Err(format!(
                "\"data_offsets\" must be an array of 2 integers, got {other}"
            ))
        }
    };
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] begin after end"));
    }

    let size = byte_len(&shape, dtype).ok_or_else(|| {
        format!(
            "shape {shape:?} of {} overflows usize",
            dtype.safetensors_name()
        )
    })?;
    if size.bytes != end - begin {
        return Err(format!(
            "shape {shape:?} ({size}) does not match data_offsets [{begin}, {end}] ({} bytes)",
            end - begin
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        data_start: begin,
        len_bytes: size.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh empty directory under the system temp dir, removed on drop.
    struct TmpDir(PathBuf);

    impl TmpDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!(
                "kf-safetensors-test-{}-{tag}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TmpDir(p)
        }
        fn entries(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Raw file bytes from a header string and a data section.
    fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn parse_err(bytes: &[u8]) -> String {
        match SafeTensorsFile::parse_header(bytes, "model.safetensors") {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn assert_err(bytes: &[u8], needles: &[&str]) {
        let msg = parse_err(bytes);
        assert!(msg.starts_with("model.safetensors: "), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{msg:?} lacks {n:?}");
        }
    }

    fn entry(dtype: &str, shape: &str, b: usize, e: usize) -> String {
        format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{b},{e}]}}"#)
    }

    #[test]
    fn round_trip_all_dtypes_and_metadata() {
        let dir = TmpDir::new("rt");
        let path = dir.0.join("model.safetensors");

        let f32s: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let f16s: Vec<f16> = (0..6).map(|i| f16::from_f32(i as f32)).collect();
        let bf16s: Vec<bf16> = (0..3).map(|i| bf16::from_f32(-(i as f32))).collect();
        let f64s: Vec<f64> = vec![std::f64::consts::PI, -0.0, 1e300];
        let u32s: Vec<u32> = vec![0, 1, u32::MAX, 7, 8];
        let i32s: Vec<i32> = vec![i32::MIN, -1, 0, i32::MAX];
        let scalar = [42.0f32];
        let tensors = [
            TensorToWrite {
                name: "blocks.0.w",
                dtype: DType::F32,
                shape: &[3, 4],
                data: bytemuck::cast_slice(&f32s),
            },
            TensorToWrite {
                name: "h",
                dtype: DType::F16,
                shape: &[2, 3],
                data: bytemuck::cast_slice(&f16s),
            },
            TensorToWrite {
                name: "empty",
                dtype: DType::F32,
                shape: &[0, 5],
                data: &[],
            },
            TensorToWrite {
                name: "b",
                dtype: DType::BF16,
                shape: &[3],
                data: bytemuck::cast_slice(&bf16s),
            },
            TensorToWrite {
                name: "scalar",
                dtype: DType::F32,
                shape: &[],
                data: bytemuck::cast_slice(&scalar),
            },
            TensorToWrite {
                name: "d",
                dtype: DType::F64,
                shape: &[3, 1],
                data: bytemuck::cast_slice(&f64s),
            },
            TensorToWrite {
                name: "tok \"ids\"/ü",
                dtype: DType::U32,
                shape: &[5],
                data: bytemuck::cast_slice(&u32s),
            },
            TensorToWrite {
                name: "i",
                dtype: DType::I32,
                shape: &[2, 2],
                data: bytemuck::cast_slice(&i32s),
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("step".to_string(), "1200".to_string());
        meta.insert("quote\"d".to_string(), "line\nbreak".to_string());
        save(&path, &tensors, &meta).unwrap();
        assert_eq!(dir.entries(), vec!["model.safetensors".to_string()]);

        let f = SafeTensorsFile::open(&path).unwrap();
        assert_eq!(f.path(), path.as_path());
        assert_eq!(f.metadata(), &meta);
        assert_eq!(f.tensors().len(), tensors.len());
        // Written contiguously in the given order, so offset order = given order.
        for (info, t) in f.tensors().iter().zip(&tensors) {
            assert_eq!(info.name, t.name);
            assert_eq!(info.dtype, t.dtype);
            assert_eq!(info.shape, t.shape);
            assert_eq!(info.len_bytes, t.data.len());
            assert_eq!(f.bytes(info), t.data);
            assert_eq!(f.get(t.name), Some(info));
        }
        assert!(f.get("missing").is_none());
        let w = f.get("blocks.0.w").unwrap();
        let back: Vec<f32> = f
            .bytes(w)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, f32s);
        assert_eq!(f.get("scalar").unwrap().shape, Vec::<usize>::new());
        assert_eq!(f.get("empty").unwrap().len_bytes, 0);

        // Data section is 8-byte aligned.
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0);
        assert_eq!(f.tensors()[0].data_start, 8 + n);
        assert_eq!(f.mmap().len(), bytes.len());
        assert_eq!(
            bytes.len(),
            8 + n + f32s.len() * 4 + 12 + 6 + 4 + 24 + 20 + 16
        );

        // Overwrite in place with different content and no metadata.
        save(&path, &tensors[..1], &BTreeMap::new()).unwrap();
        let f2 = SafeTensorsFile::open(&path).unwrap();
        assert!(f2.metadata().is_empty());
        assert_eq!(f2.tensors().len(), 1);
        // The old mapping stays valid after the rename.
        assert_eq!(
            f.bytes(f.get("i").unwrap()),
            bytemuck::cast_slice::<i32, u8>(&i32s)
        );
        assert_eq!(dir.entries(), vec!["model.safetensors".to_string()]);
    }

    #[test]
    fn header_alignment_for_many_name_lengths() {
        for len in 1..20 {
            let name = "x".repeat(len);
            let t = [TensorToWrite {
                name: &name,
                dtype: DType::F16,
                shape: &[1],
                data: &[1, 2],
            }];
            let h = build_header(&t, &BTreeMap::new()).unwrap();
            assert_eq!((8 + h.len()) % 8, 0);
            let bytes = raw(&h, &[1, 2]);
            let (infos, _) = SafeTensorsFile::parse_header(&bytes, "f").unwrap();
            assert_eq!(infos[0].data_start % 8, 0);
        }
        let h = build_header(&[], &BTreeMap::new()).unwrap();
        let (infos, meta) = SafeTensorsFile::parse_header(&raw(&h, &[]), "f").unwrap();
        assert!(infos.is_empty() && meta.is_empty());
    }

    #[test]
    fn sorted_by_offset_with_gaps_allowed() {
        let h = format!(
            r#"{{"late":{},"zero":{},"early":{}}}"#,
            entry("F32", "[2]", 16, 24),
            entry("F32", "[0]", 8, 8),
            entry("U32", "[1]", 0, 4)
        );
        let (infos, _) = SafeTensorsFile::parse_header(&raw(&h, &[0; 24]), "f").unwrap();
        let names: Vec<_> = infos.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["early", "zero", "late"]);
        let base = 8 + h.len();
        assert_eq!(infos[2].data_start, base + 16);
        // Trailing bytes after the last tensor are tolerated as well.
        assert!(SafeTensorsFile::parse_header(&raw(&h, &[0; 40]), "f").is_ok());
        // A zero-sized tensor inside another tensor's range is not an overlap.
        let h = format!(
            r#"{{"a":{},"z":{}}}"#,
            entry("F32", "[2]", 0, 8),
            entry("F32", "[3, 0]", 4, 4)
        );
        assert!(SafeTensorsFile::parse_header(&raw(&h, &[0; 8]), "f").is_ok());
    }

    #[test]
    fn rejects_short_and_oversized_files() {
        assert_err(&[], &["shorter than 8"]);
        assert_err(&[1, 0, 0], &["shorter than 8"]);
        let mut b = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert_err(&b, &["oversized header"]);
        assert_err(&u64::MAX.to_le_bytes(), &["oversized header"]);
        let mut b = 100u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert_err(&b, &["header length 100", "truncated"]);
    }

    #[test]
    fn rejects_bad_header_text() {
        assert_err(&raw("", &[]), &["not valid JSON"]);
        let mut b = 4u64.to_le_bytes().to_vec();
        b.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
        assert_err(&b, &["UTF-8"]);
        assert_err(&raw("{\"a\":", &[]), &["not valid JSON"]);
        assert_err(&raw("{} x", &[]), &["not valid JSON"]);
        assert_err(&raw("[1,2]", &[]), &["not a JSON object"]);
        assert_err(&raw("\"str\"", &[]), &["not a JSON object"]);
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10000), "]".repeat(10000));
        assert_err(&raw(&deep, &[]), &["JSON"]);
    }

    #[test]
    fn rejects_malformed_entries() {
        let one = |e: &str| raw(&format!(r#"{{"blocks.0.attn_qkv.weight":{e}}}"#), &[0; 64]);
        let name = "\"blocks.0.attn_qkv.weight\"";
        assert_err(&one("[]"), &[name, "must be an object"]);
        assert_err(
            &one(r#"{"shape":[1],"data_offsets":[0,4]}"#),
            &[name, "missing \"dtype\""],
        );
        assert_err(
            &one(r#"{"dtype":"F32","data_offsets":[0,4]}"#),
            &[name, "missing \"shape\""],
        );
        assert_err(
            &one(r#"{"dtype":"F32","shape":[1]}"#),
            &[name, "missing \"data_offsets\""],
        );
        assert_err(
            &one(r#"{"dtype":7,"shape":[1],"data_offsets":[0,4]}"#),
            &[name, "\"dtype\" must be a string"],
        );
        assert_err(
            &one(&entry("I8", "[4]", 0, 4)),
            &[name, "unsupported dtype \"I8\""],
        );
        assert_err(
            &one(&entry("F32", "3", 0, 12)),
            &[name, "\"shape\" must be an array"],
        );
        assert_err(
            &one(&entry("F32", "[1, -3]", 0, 4)),
            &[name, "\"shape\"[1]", "-3"],
        );
        assert_err(&one(&entry("F32", "[1.0]", 0, 4)), &[name, "\"shape\"[0]"]);
        assert_err(
            &one(&entry("F32", "[\"2\"]", 0, 8)),
            &[name, "\"shape\"[0]"],
        );
        assert_err(
            &one(&entry("F32", "[1e30]", 0, 4)),
            &[name, "non-negative integer"],
        );
        assert_err(
            &one(&entry("F32", "[99999999999999999999999]", 0, 4)),
            &[name, "non-negative integer"],
        );
        assert_err(
            &one(r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}"#),
            &[name, "\"data_offsets\" must be an array of 2"],
        );
        assert_err(
            &one(r#"{"dtype":"F32","shape":[1],"data_offsets":{"a":1}}"#),
            &[name, "\"data_offsets\" must be an array of 2"],
        );
        assert_err(
            &one(r#"{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}"#),
            &[name, "\"data_offsets\"[0]"],
        );
        assert_err(
            &one(r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4.5]}"#),
            &[name, "\"data_offsets\"[1]"],
        );
        assert_err(&one(&entry("F32", "[0]", 8, 4)), &[name, "begin after end"]);
        assert_err(
            &one(&entry("F32", "[4294967296, 4294967296]", 0, 4)),
            &[name, "overflows usize"],
        );
        assert_err(
            &one(&entry("F64", "[2305843009213693952]", 0, 4)),
            &[name, "overflows usize"],
        );
        assert_eq!(
            parse_err(&one(&entry("F32", "[3, 4]", 0, 40))),
            "model.safetensors: tensor \"blocks.0.attn_qkv.weight\": shape [3, 4] \
             (12 elements of F32 = 48 bytes) does not match data_offsets [0, 40] (40 bytes)"
        );
        assert_err(&one(&entry("F32", "[0]", 0, 4)), &[name, "does not match"]);
    }

    #[test]
    fn rejects_truncated_data() {
        let h = format!(r#"{{"x":{}}}"#, entry("F32", "[1024]", 0, 4096));
        assert_eq!(
            parse_err(&raw(&h, &[0; 1000])),
            "model.safetensors: file is truncated: tensor \"x\" needs bytes \
             up to 4096 of the data section but only 1000 are present"
        );
        // Even a zero-sized tensor must lie inside the data section.
        let h = format!(r#"{{"z":{}}}"#, entry("F32", "[0]", 9, 9));
        assert_err(&raw(&h, &[0; 8]), &["\"z\"", "truncated"]);
    }

    #[test]
    fn rejects_overlap_and_duplicates() {
        let h = format!(
            r#"{{"a":{},"b":{}}}"#,
            entry("F32", "[2]", 0, 8),
            entry("F32", "[2]", 4, 12)
        );
        assert_err(&raw(&h, &[0; 12]), &["\"a\"", "\"b\"", "overlap"]);
        // Same begin, reported regardless of header order.
        let h = format!(
            r#"{{"b":{},"a":{}}}"#,
            entry("F32", "[2]", 0, 8),
            entry("F16", "[2]", 0, 4)
        );
        assert_err(&raw(&h, &[0; 12]), &["\"a\"", "\"b\"", "overlap"]);
        let h = format!(
            r#"{{"a":{},"a":{}}}"#,
            entry("F32", "[1]", 0, 4),
            entry("F32", "[1]", 4, 8)
        );
        assert_err(&raw(&h, &[0; 8]), &["duplicate", "\"a\""]);
        let h = r#"{"__metadata__":{},"__metadata__":{}}"#;
        assert_err(&raw(h, &[]), &["duplicate", "__metadata__"]);
    }

    #[test]
    fn metadata_validation() {
        let ok = raw(r#"{"__metadata__":{"k":"v","a":""}}"#, &[]);
        let (t, m) = SafeTensorsFile::parse_header(&ok, "f").unwrap();
        assert!(t.is_empty());
        assert_eq!(m.get("k").map(String::as_str), Some("v"));
        assert_eq!(m.len(), 2);
        assert_err(
            &raw(r#"{"__metadata__":["k"]}"#, &[]),
            &["__metadata__", "must be an object"],
        );
        assert_err(
            &raw(r#"{"__metadata__":null}"#, &[]),
            &["__metadata__", "must be an object"],
        );
        assert_err(
            &raw(r#"{"__metadata__":{"step":12}}"#, &[]),
            &["__metadata__", "\"step\"", "must be a string"],
        );
    }

    /// splitmix64: deterministic pseudo-random numbers for the fuzz test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_parse_header_never_panics() {
        let t = [
            TensorToWrite {
                name: "w",
                dtype: DType::F32,
                shape: &[2, 3],
                data: &[7; 24],
            },
            TensorToWrite {
                name: "e",
                dtype: DType::BF16,
                shape: &[0],
                data: &[],
            },
            TensorToWrite {
                name: "s",
                dtype: DType::I32,
                shape: &[],
                data: &[1, 2, 3, 4],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        let header = build_header(&t, &meta).unwrap();
        let mut data = Vec::new();
        for x in &t {
            data.extend_from_slice(x.data);
        }
        let valid = raw(&header, &data);
        assert!(SafeTensorsFile::parse_header(&valid, "f").is_ok());

        let mut cases = 0usize;
        let mut oks = 0usize;
        let mut check = |b: &[u8]| {
            cases += 1;
            if SafeTensorsFile::parse_header(b, "fuzz").is_ok() {
                oks += 1;
            }
        };
        // Every truncation: all fail except the full file.
        for len in 0..valid.len() {
            assert!(SafeTensorsFile::parse_header(&valid[..len], "f").is_err());
        }
        let mut rng = Rng(0x5eed);
        let interesting = b"{}[]\",:-.0123456789eE \x00\xff";
        for _ in 0..5000 {
            let mut b = valid.clone();
            match rng.below(6) {
                0 => {
                    // Flip a few bits anywhere.
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(b.len());
                        b[i] ^= 1 << rng.below(8);
                    }
                }
                1 => {
                    // Replace header bytes with JSON-significant characters.
                    for _ in 0..1 + rng.below(3) {
                        let i = 8 + rng.below(header.len());
                        b[i] = interesting[rng.below(interesting.len())];
                    }
                }
                2 => {
                    // Random header length field.
                    let v = match rng.below(3) {
                        0 => rng.next(),
                        1 => rng.below(b.len() + 16) as u64,
                        _ => (header.len() as u64).wrapping_add(rng.below(9) as u64) - 4,
                    };
                    b[..8].copy_from_slice(&v.to_le_bytes());
                }
                3 => {
                    // Entirely random bytes of random length.
                    let n = rng.below(128);
                    b = (0..n).map(|_| rng.next() as u8).collect();
                    if n >= 8 && rng.below(2) == 0 {
                        let l = rng.below(n - 7) as u64;
                        b[..8].copy_from_slice(&l.to_le_bytes());
                    }
                }
                4 => {
                    // Mutate a digit inside the header into a large number.
                    let digits: Vec<usize> = (8..8 + header.len())
                        .filter(|&i| b[i].is_ascii_digit())
                        .collect();
                    let i = digits[rng.below(digits.len())];
                    let big =
                        ["18446744073709551615", "99999999999999999999", "-1", "1.5"][rng.below(4)];
                    let mut nb = b[..i].to_vec();
                    nb.extend_from_slice(big.as_bytes());
                    nb.extend_from_slice(&b[i + 1..]);
                    let n = (header.len() + big.len() - 1) as u64;
                    nb[..8].copy_from_slice(&n.to_le_bytes());
                    b = nb;
                }
                _ => {
                    // Truncate or extend the data section.
                    let cut = rng.below(b.len() + 1);
                    b.truncate(cut);
                    if rng.below(2) == 0 {
                        b.extend((0..rng.below(32)).map(|_| rng.next() as u8));
                    }
                }
            }
            check(&b);
        }
        assert_eq!(cases, 5000);
        // The mutations should not all be rejected (or all accepted).
        assert!(oks > 0 && oks < cases, "oks = {oks}");
    }

    #[test]
    fn open_errors_and_small_files() {
        let dir = TmpDir::new("open");
        let missing = dir.0.join("nope.safetensors");
        let e = format!("{:#}", SafeTensorsFile::open(&missing).unwrap_err());
        assert!(
            e.contains("nope.safetensors") && e.contains("cannot open"),
            "{e}"
        );

        let empty = dir.0.join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let e = format!("{:#}", SafeTensorsFile::open(&empty).unwrap_err());
        assert!(
            e.contains("empty.safetensors") && e.contains("shorter than 8"),
            "{e}"
        );

        let trunc = dir.0.join("trunc.safetensors");
        let h = format!(r#"{{"x":{}}}"#, entry("F32", "[4]", 0, 16));
        std::fs::write(&trunc, raw(&h, &[0; 10])).unwrap();
        let e = format!("{:#}", SafeTensorsFile::open(&trunc).unwrap_err());
        assert!(
            e.contains("trunc.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }

    #[test]
    fn save_errors_leave_no_temp_file() {
        let dir = TmpDir::new("save");
        let t = |name: &'static str, data: &'static [u8]| TensorToWrite {
            name,
            dtype: DType::F16,
            shape: &[2],
            data,
        };
        let no_meta = BTreeMap::new();

        let missing_dir = dir.0.join("no-such-dir").join("m.safetensors");
        let e = format!(
            "{:#}",
            save(&missing_dir, &[t("a", &[0; 4])], &no_meta).unwrap_err()
        );
        assert!(e.contains("m.safetensors"), "{e}");
        assert!(dir.entries().is_empty(), "{:?}", dir.entries());

        // Rename onto an existing non-empty directory fails after the temp file
        // has been written: it must be removed.
        let target = dir.0.join("occupied");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("f"), b"x").unwrap();
        assert!(save(&target, &[t("a", &[0; 4])], &no_meta).is_err());
        assert_eq!(dir.entries(), vec!["occupied".to_string()]);

        let path = dir.0.join("m.safetensors");
        let err =
            |ts: &[TensorToWrite<'_>]| format!("{:#}", save(&path, ts, &no_meta).unwrap_err());
        let e = err(&[t("a", &[0; 4]), t("a", &[0; 4])]);
        assert!(e.contains("duplicate") && e.contains("\"a\""), "{e}");
        let e = err(&[t("a", &[0; 3])]);
        assert!(e.contains("\"a\"") && e.contains("3 bytes of data"), "{e}");
        let e = err(&[t("", &[0; 4])]);
        assert!(e.contains("empty"), "{e}");
        let e = err(&[t("__metadata__", &[0; 4])]);
        assert!(e.contains("reserved"), "{e}");
        let big = [usize::MAX, 2];
        let e = err(&[TensorToWrite {
            name: "huge",
            dtype: DType::F32,
            shape: &big,
            data: &[],
        }]);
        assert!(e.contains("\"huge\"") && e.contains("overflows"), "{e}");
        assert!(save(Path::new("/"), &[], &no_meta).is_err());
        assert_eq!(dir.entries(), vec!["occupied".to_string()]);
    }
}
