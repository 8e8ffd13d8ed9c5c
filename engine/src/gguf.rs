//! GGUF files (llama.cpp's model format): a memory-mapped, fully validated reader and a
//! small atomic writer. The reader checks everything up front (counts and lengths against
//! the file size before anything is allocated, UTF-8 strings, alignment, each tensor's
//! byte range, duplicate names, element counts), so later accessors cannot fail on a
//! malformed file; tensors come out as raw (quantized) bytes without a copy, or
//! dequantized to an f32 CPU [`Tensor`] through [`crate::quant`].
//!
//! Layout (little endian): magic `GGUF`, version u32 (2 or 3), tensor count u64, metadata
//! count u64, the metadata key/value pairs, the tensor infos (name, n_dims u32, ne[n_dims]
//! u64 with ne[0] the contiguous dimension, ggml type u32, offset u64 into the data
//! section), then the data section at the next multiple of `general.alignment` (default 32).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::{Device, Tensor};

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Largest tensor rank ggml knows (GGML_MAX_DIMS).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays we accept (keeps recursion bounded on hostile files).
const MAX_ARRAY_DEPTH: usize = 8;

const MAGIC: &[u8; 4] = b"GGUF";

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

// GGUF value type ids
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

impl GgufValue {
    /// An unsigned or non-negative signed integer (booleans and floats are not integers).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number, as f64 (64-bit integers beyond 2^53 are rounded).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The GGUF type id of this value.
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => T_U8,
            GgufValue::I8(_) => T_I8,
            GgufValue::U16(_) => T_U16,
            GgufValue::I16(_) => T_I16,
            GgufValue::U32(_) => T_U32,
            GgufValue::I32(_) => T_I32,
            GgufValue::U64(_) => T_U64,
            GgufValue::I64(_) => T_I64,
            GgufValue::F32(_) => T_F32,
            GgufValue::F64(_) => T_F64,
            GgufValue::Bool(_) => T_BOOL,
            GgufValue::Str(_) => T_STR,
            GgufValue::Array(_) => T_ARRAY,
        }
    }

    /// A short description for error messages and listings (arrays by type and length).
    pub fn summary(&self) -> String {
        match self {
            GgufValue::Str(s) if s.chars().count() > 60 => {
                let head: String = s.chars().take(60).collect();
                format!("{head:?}... ({} bytes)", s.len())
            }
            GgufValue::Str(s) => format!("{s:?}"),
            GgufValue::Array(a) => match a.first() {
                None => "[] (empty array)".to_string(),
                Some(x) => format!("[{}, ...] ({} elements)", x.summary(), a.len()),
            },
            GgufValue::Bool(b) => b.to_string(),
            GgufValue::F32(v) => v.to_string(),
            GgufValue::F64(v) => v.to_string(),
            v => v
                .as_u64()
                .map(|u| u.to_string())
                .or_else(|| v.as_f64().map(|f| f.to_string()))
                .unwrap_or_default(),
        }
    }
}

/// A ggml tensor type. Ids are ggml's; [`crate::quant::dequantize`] covers the float
/// types, the legacy quants (Q4_0..Q8_0) and the K-quants Q2_K..Q8_K; the others are
/// known (so files holding them open and list) but not dequantized.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    F64,
    I8,
    I16,
    I32,
    I64,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    IQ1_M,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// (type, ggml id, elements per block, bytes per block, name)
const GGML_TYPES: &[(GgmlType, u32, usize, usize, &str)] = &[
    (GgmlType::F32, 0, 1, 4, "F32"),
    (GgmlType::F16, 1, 1, 2, "F16"),
    (GgmlType::Q4_0, 2, 32, 18, "Q4_0"),
    (GgmlType::Q4_1, 3, 32, 20, "Q4_1"),
    (GgmlType::Q5_0, 6, 32, 22, "Q5_0"),
    (GgmlType::Q5_1, 7, 32, 24, "Q5_1"),
    (GgmlType::Q8_0, 8, 32, 34, "Q8_0"),
    (GgmlType::Q2_K, 10, 256, 84, "Q2_K"),
    (GgmlType::Q3_K, 11, 256, 110, "Q3_K"),
    (GgmlType::Q4_K, 12, 256, 144, "Q4_K"),
    (GgmlType::Q5_K, 13, 256, 176, "Q5_K"),
    (GgmlType::Q6_K, 14, 256, 210, "Q6_K"),
    (GgmlType::Q8_K, 15, 256, 292, "Q8_K"),
    (GgmlType::IQ2_XXS, 16, 256, 66, "IQ2_XXS"),
    (GgmlType::IQ2_XS, 17, 256, 74, "IQ2_XS"),
    (GgmlType::IQ3_XXS, 18, 256, 98, "IQ3_XXS"),
    (GgmlType::IQ1_S, 19, 256, 50, "IQ1_S"),
    (GgmlType::IQ4_NL, 20, 32, 18, "IQ4_NL"),
    (GgmlType::IQ3_S, 21, 256, 110, "IQ3_S"),
    (GgmlType::IQ2_S, 22, 256, 82, "IQ2_S"),
    (GgmlType::IQ4_XS, 23, 256, 136, "IQ4_XS"),
    (GgmlType::I8, 24, 1, 1, "I8"),
    (GgmlType::I16, 25, 1, 2, "I16"),
    (GgmlType::I32, 26, 1, 4, "I32"),
    (GgmlType::I64, 27, 1, 8, "I64"),
    (GgmlType::F64, 28, 1, 8, "F64"),
    (GgmlType::IQ1_M, 29, 256, 56, "IQ1_M"),
    (GgmlType::BF16, 30, 1, 2, "BF16"),
    (GgmlType::TQ1_0, 34, 256, 54, "TQ1_0"),
    (GgmlType::TQ2_0, 35, 256, 66, "TQ2_0"),
    (GgmlType::MXFP4, 39, 32, 17, "MXFP4"),
];

impl GgmlType {
    fn entry(self) -> &'static (GgmlType, u32, usize, usize, &'static str) {
        // every variant has exactly one row (checked by a unit test)
        GGML_TYPES
            .iter()
            .find(|e| e.0 == self)
            .unwrap_or(&GGML_TYPES[0])
    }

    /// The type with ggml id `id`, if known.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().find(|e| e.1 == id).map(|e| e.0)
    }

    /// ggml's id of this type.
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// Elements per quantization block (1 for plain types).
    pub fn block_elems(self) -> usize {
        self.entry().2
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.entry().3
    }

    /// ggml's name of the type, e.g. "Q4_K".
    pub fn name(self) -> &'static str {
        self.entry().4
    }

    /// Bytes of `n_elems` elements, or `None` when `n_elems` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n_elems: usize) -> Option<usize> {
        if !n_elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n_elems / self.block_elems()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Row-major shape: ggml's `ne` reversed (a `[rows, cols]` matrix has ne = [cols, rows]).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute offset of the first data byte in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Number of elements (the product of `shape`; validated not to overflow on open).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A validated, memory-mapped GGUF file.
pub struct Gguf {
    path: PathBuf,
    mmap: memmap2::Mmap,
    version: u32,
    alignment: usize,
    data_start: usize,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Memory-maps `path` and validates the whole file (module docs). Every error is one
    /// line that starts with the path.
    pub fn open(path: &Path) -> Result<Gguf> {
        let label = path.display().to_string();
        let file = File::open(path).with_context(|| format!("{label}: cannot open file"))?;
        // SAFETY: the file is opened read-only and the mapping is only read through shared
        // slices, i.e. treated as immutable. Another process truncating or rewriting the
        // file while it is mapped is outside our contract (write_gguf never rewrites in
        // place: it renames a new file over the old one).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{label}: cannot memory-map file"))?;
        let parsed = parse(&mmap).map_err(|e| anyhow!("{label}: {e}"))?;
        let meta_index = parsed
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Gguf {
            path: path.to_path_buf(),
            mmap,
            version: parsed.version,
            alignment: parsed.alignment,
            data_start: parsed.data_start,
            metadata: parsed.metadata,
            meta_index,
            tensors: parsed.tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the data section and tensors (`general.alignment` or 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// The metadata pairs in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The tensors in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| anyhow!("{}: no tensor named {name:?}", self.path.display()))
    }

    /// The raw (possibly quantized) bytes of a tensor, without a copy.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info_or_err(name)?;
        // the range was checked against the file size on open
        t.offset
            .checked_add(t.n_bytes)
            .and_then(|end| self.mmap.get(t.offset..end))
            .ok_or_else(|| {
                anyhow!(
                    "{}: tensor {name:?} lies outside the file",
                    self.path.display()
                )
            })
    }

    /// A tensor dequantized to an f32 CPU tensor of its (row-major) shape.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let t = self.info_or_err(name)?;
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.numel()];
        crate::quant::dequantize(t.ty, bytes, &mut out).with_context(|| {
            format!(
                "{}: tensor {name:?} ({}, shape {:?})",
                self.path.display(),
                t.ty,
                t.shape
            )
        })?;
        Tensor::from_vec(out, &t.shape, Device::Cpu)
            .with_context(|| format!("{}: tensor {name:?}", self.path.display()))
    }
}

struct Parsed {
    version: u32,
    alignment: usize,
    data_start: usize,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
}

/// Little-endian cursor over the file; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {} bytes",
                self.pos,
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A gguf string: u64 length + UTF-8 bytes.
    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            bail!(
                "{what} at offset {at} claims {len} bytes but only {} remain in the file",
                self.remaining()
            );
        }
        let bytes = self.take(len as usize, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => bail!("{what} at offset {at} is not valid UTF-8 ({e})"),
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = "a metadata value";
        Ok(match ty {
            T_U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            T_I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            T_U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T_I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T_U32 => GgufValue::U32(self.u32(what)?),
            T_I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T_U64 => GgufValue::U64(self.u64(what)?),
            T_I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T_F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T_F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            T_BOOL => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => bail!("metadata {key:?}: boolean at offset {at} has byte value {b}"),
                }
            }
            T_STR => GgufValue::Str(self.string(&format!("string value of {key:?}"))?),
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("metadata {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}");
                }
                let at = self.pos;
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                let min = min_value_size(elem).ok_or_else(|| {
                    anyhow!("metadata {key:?}: unknown array element type {elem} at offset {at}")
                })?;
                // each element takes at least `min` bytes: bound the count before allocating
                if count > (self.remaining() / min) as u64 {
                    bail!(
                        "metadata {key:?}: array at offset {at} claims {count} elements but only {} bytes remain",
                        self.remaining()
                    );
                }
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            t => bail!("metadata {key:?}: unknown value type {t}"),
        })
    }
}

/// The fewest bytes one value of GGUF type `ty` can take (None: unknown type).
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STR => 8,
        T_ARRAY => 12,
        _ => return None,
    })
}

fn parse(buf: &[u8]) -> Result<Parsed> {
    let mut r = Reader { buf, pos: 0 };
    let (version, n_tensors, n_kv) = read_header(&mut r)?;
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let key = read_unique(&mut r, &mut keys, "metadata key", i)?;
        let ty = r.u32("a metadata type")?;
        let v = r.value(ty, &key, 0)?;
        metadata.push((key, v));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => *a as usize,
        Some((_, v)) => bail!(
            "{ALIGNMENT_KEY} must be a u32 power of two, found {}",
            v.summary()
        ),
    };

    let mut raws = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = read_unique(&mut r, &mut names, "tensor name", i)?;
        raws.push(read_tensor_info(&mut r, name, alignment)?);
    }
    let data_start = r
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| anyhow!("the data section offset overflows"))?;
    let tensors = place(raws, data_start, buf.len())?;
    Ok(Parsed {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

/// The string `what` #`i`, refused when `seen` already holds it.
fn read_unique(
    r: &mut Reader<'_>,
    seen: &mut HashSet<String>,
    what: &str,
    i: u64,
) -> Result<String> {
    let s = r.string(&format!("{what} #{i}"))?;
    if !seen.insert(s.clone()) {
        bail!("duplicate {what} {s:?}");
    }
    Ok(s)
}

/// The magic, the version (2 or 3), and the tensor and metadata counts, checked against the
/// bytes the file has.
fn read_header(r: &mut Reader<'_>) -> Result<(u32, u64, u64)> {
    let buf = r.buf;
    let magic = r
        .take(4, "the magic")
        .map_err(|_| anyhow!("not a GGUF file: {} bytes, too short", buf.len()))?;
    if magic != MAGIC {
        bail!("not a GGUF file: the magic is {magic:?}, expected \"GGUF\"");
    }
    let version = r.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (only 2 and 3)"),
        v if v.swap_bytes() <= 3 => {
            bail!(
                "big-endian GGUF (version {}) is not supported",
                v.swap_bytes()
            )
        }
        v => bail!("unsupported GGUF version {v} (only 2 and 3)"),
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    // a key/value pair takes at least 8 (key length) + 4 (type) + 1 bytes
    if n_kv > (r.remaining() / 13) as u64 {
        bail!(
            "the header claims {n_kv} metadata pairs but the file has only {} bytes",
            buf.len()
        );
    }
    // a tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset)
    if n_tensors > (r.remaining() / 24) as u64 {
        bail!(
            "the header claims {n_tensors} tensors but the file has only {} bytes",
            buf.len()
        );
    }

    Ok((version, n_tensors, n_kv))
}

/// A tensor's header entry as read, before its bytes are placed in the data section.
struct RawTensor {
    name: String,
    shape: Vec<usize>,
    ty: GgmlType,
    rel_offset: u64,
    n_bytes: usize,
}

/// The rest of tensor `name`'s header entry: rank, dims, type and offset, checked.
fn read_tensor_info(r: &mut Reader<'_>, name: String, alignment: usize) -> Result<RawTensor> {
    let n_dims = r.u32("a tensor rank")?;
    if n_dims as usize > MAX_DIMS {
        bail!("tensor {name:?}: {n_dims} dimensions (at most {MAX_DIMS})");
    }
    let mut ne = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        let d = r.u64("a tensor dimension")?;
        if d > i64::MAX as u64 || usize::try_from(d).is_err() {
            bail!("tensor {name:?}: dimension {d} is out of range");
        }
        ne.push(d as usize);
    }
    let id = r.u32("a tensor type")?;
    let ty = GgmlType::from_id(id).ok_or_else(|| {
        let hint = if id == 9 {
            " (Q8_1 is an activation format, not stored in files)"
        } else {
            ""
        };
        anyhow!("tensor {name:?}: unknown ggml type id {id}{hint}")
    })?;
    let rel_offset = r.u64("a tensor offset")?;
    let numel = ne
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow!("tensor {name:?}: element count of ne {ne:?} overflows"))?;
    let row = ne.first().copied().unwrap_or(1);
    if !row.is_multiple_of(ty.block_elems()) {
        bail!(
            "tensor {name:?}: row length {row} is not a multiple of the {ty} block size {}",
            ty.block_elems()
        );
    }
    let n_bytes = ty
        .bytes_for(numel)
        .ok_or_else(|| anyhow!("tensor {name:?}: byte size of {numel} {ty} overflows"))?;
    if !rel_offset.is_multiple_of(alignment as u64) {
        bail!(
            "tensor {name:?}: offset {rel_offset} is not a multiple of the alignment {alignment}"
        );
    }
    let shape = ne.iter().rev().copied().collect();
    Ok(RawTensor {
        name,
        shape,
        ty,
        rel_offset,
        n_bytes,
    })
}

/// The tensors at their absolute offsets: each inside the file, no two sharing bytes.
fn place(raws: Vec<RawTensor>, data_start: usize, file_len: usize) -> Result<Vec<GgufTensorInfo>> {
    let mut tensors = Vec::with_capacity(raws.len());
    for t in raws {
        let offset = usize::try_from(t.rel_offset)
            .ok()
            .and_then(|o| o.checked_add(data_start));
        let end = offset.and_then(|o| o.checked_add(t.n_bytes));
        let offset = match (offset, end) {
            (Some(o), Some(e)) if e <= file_len => o,
            _ => bail!(
                "tensor {:?}: bytes {}+{} (data section at {data_start}) lie outside the file ({} bytes)",
                t.name,
                t.rel_offset,
                t.n_bytes,
                file_len
            ),
        };
        tensors.push(GgufTensorInfo {
            name: t.name,
            shape: t.shape,
            ty: t.ty,
            offset,
            n_bytes: t.n_bytes,
        });
    }
    // tensors must not share bytes
    let mut by_offset: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for w in by_offset.windows(2) {
        if w[0].offset + w[0].n_bytes > w[1].offset {
            bail!(
                "tensors {:?} and {:?} overlap in the data section",
                w[0].name,
                w[1].name
            );
        }
    }
    Ok(tensors)
}

/// One tensor for [`write_gguf`]: name, type, row-major shape, raw bytes of that type.
pub type GgufTensorToWrite = (String, GgmlType, Vec<usize>, Vec<u8>);

/// Writes a GGUF (version 3) file atomically ([`crate::fs::write_atomic_with`]): the
/// metadata in the given order, then the tensors in the given order, each at a multiple
/// of the alignment (`general.alignment` when `metadata` sets it as a u32, else 32).
/// Arrays must hold values of one type.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensorToWrite],
) -> Result<()> {
    let label = path.display().to_string();
    let bytes = encode(metadata, tensors).map_err(|e| anyhow!("{label}: {e}"))?;
    crate::fs::write_atomic(path, &bytes).with_context(|| format!("{label}: cannot write GGUF"))
}

/// The bytes of a GGUF file (see [`write_gguf`]).
pub fn encode(metadata: &[(String, GgufValue)], tensors: &[GgufTensorToWrite]) -> Result<Vec<u8>> {
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => *a as usize,
        Some((_, v)) => bail!(
            "{ALIGNMENT_KEY} must be a u32 power of two, found {}",
            v.summary()
        ),
    };
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    let mut keys = HashSet::new();
    for (k, v) in metadata {
        if !keys.insert(k.as_str()) {
            bail!("duplicate metadata key {k:?}");
        }
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v, k)?;
    }
    let mut offset = 0usize;
    let mut names = HashSet::new();
    for (name, ty, shape, bytes) in tensors {
        if !names.insert(name.as_str()) {
            bail!("duplicate tensor name {name:?}");
        }
        if shape.len() > MAX_DIMS {
            bail!("tensor {name:?}: rank {} (at most {MAX_DIMS})", shape.len());
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| anyhow!("tensor {name:?}: shape {shape:?} overflows"))?;
        let row = shape.last().copied().unwrap_or(1);
        let want = ty
            .bytes_for(numel)
            .filter(|_| row.is_multiple_of(ty.block_elems()))
            .ok_or_else(|| {
                anyhow!(
                    "tensor {name:?}: row length {row} is not a multiple of the {ty} block size {}",
                    ty.block_elems()
                )
            })?;
        if want != bytes.len() {
            bail!(
                "tensor {name:?}: shape {shape:?} of {ty} takes {want} bytes, {} given",
                bytes.len()
            );
        }
        put_str(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + bytes.len()).next_multiple_of(alignment);
    }
    out.resize(out.len().next_multiple_of(alignment), 0);
    for (_, _, _, bytes) in tensors {
        out.write_all(bytes)?;
        out.resize(out.len().next_multiple_of(alignment), 0);
    }
    Ok(out)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue, key: &str) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::Str(s) => put_str(out, s),
        GgufValue::Array(a) => {
            let elem = a.first().map_or(T_U8, GgufValue::type_id);
            if a.iter().any(|x| x.type_id() != elem) {
                bail!("metadata {key:?}: array elements of different types");
            }
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x, key)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kf-gguf-{}-{name}", std::process::id()))
    }

    #[test]
    fn every_type_has_one_table_row() {
        for (ty, id, ..) in GGML_TYPES {
            assert_eq!(GGML_TYPES.iter().filter(|e| e.0 == *ty).count(), 1);
            assert_eq!(GgmlType::from_id(*id), Some(*ty));
            assert_eq!(ty.id(), *id);
        }
        assert_eq!(GgmlType::Q4_K.block_bytes(), 144);
        assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
        assert_eq!(GgmlType::from_id(9), None);
    }

    fn sample() -> (Vec<(String, GgufValue)>, Vec<GgufTensorToWrite>) {
        let meta = vec![
            (
                "general.architecture".into(),
                GgufValue::Str("llama".into()),
            ),
            ("a.u32".into(), GgufValue::U32(7)),
            ("a.i64".into(), GgufValue::I64(-3)),
            ("a.f32".into(), GgufValue::F32(0.5)),
            ("a.bool".into(), GgufValue::Bool(true)),
            (
                "a.nested".into(),
                GgufValue::Array(vec![
                    GgufValue::Array(vec![GgufValue::Str("x".into())]),
                    GgufValue::Array(vec![]),
                ]),
            ),
        ];
        let f: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25, 8.0, 9.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let tensors = vec![
            ("w".to_string(), GgmlType::F32, vec![2, 3], f),
            ("q".to_string(), GgmlType::Q8_0, vec![1, 32], {
                let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
                b.extend((0..32).map(|i| (i as i8 - 16) as u8));
                b
            }),
        ];
        (meta, tensors)
    }

    #[test]
    fn write_then_read_round_trips() {
        let (meta, tensors) = sample();
        let p = tmp("rt.gguf");
        write_gguf(&p, &meta, &tensors).unwrap();
        let g = Gguf::open(&p).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.metadata(), &meta[..]);
        assert_eq!(g.get("a.u32").and_then(GgufValue::as_u64), Some(7));
        assert_eq!(g.get("a.i64").and_then(GgufValue::as_u64), None);
        assert_eq!(g.get("a.i64").and_then(GgufValue::as_f64), Some(-3.0));
        assert_eq!(g.tensors().len(), 2);
        let w = g.tensor_info("w").unwrap();
        assert_eq!(w.shape, vec![2, 3]);
        assert_eq!(w.offset % 32, 0);
        let t = g.tensor_f32("w").unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(
            t.to_vec::<f32>().unwrap(),
            vec![1.0, -2.0, 3.5, 0.25, 8.0, 9.0]
        );
        let q = g.tensor_f32("q").unwrap().to_vec::<f32>().unwrap();
        assert_eq!(q[0], -8.0);
        assert_eq!(q[31], 7.5);
        assert_eq!(g.tensor_bytes("q").unwrap(), &tensors[1].3[..]);
        assert!(g.tensor_f32("nope").is_err());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn ne_is_the_reversed_shape() {
        let (meta, tensors) = sample();
        let bytes = encode(&meta, &tensors).unwrap();
        // find the first tensor info: name "w", then n_dims 2, ne = [3, 2]
        let pat = [1u64.to_le_bytes().to_vec(), b"w".to_vec()].concat();
        let at = bytes.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len();
        assert_eq!(&bytes[at..at + 4], &2u32.to_le_bytes());
        assert_eq!(&bytes[at + 4..at + 12], &3u64.to_le_bytes());
        assert_eq!(&bytes[at + 12..at + 20], &2u64.to_le_bytes());
    }

    fn err_of(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    }

    #[test]
    fn hostile_counts_are_errors_not_allocations() {
        assert!(err_of(&header(1 << 60, 0)).contains("claims"));
        assert!(err_of(&header(0, 1 << 60)).contains("claims"));
        // an array of 2^60 u64s
        let mut b = header(0, 1);
        put_str(&mut b, "k");
        b.extend(T_ARRAY.to_le_bytes());
        b.extend(T_U64.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        b.extend([0u8; 64]);
        assert!(err_of(&b).contains("elements"));
        // a string of 2^62 bytes
        let mut b = header(0, 1);
        b.extend((1u64 << 62).to_le_bytes());
        b.extend([0u8; 64]);
        assert!(err_of(&b).contains("claims"));
    }

    #[test]
    fn malformed_files_are_named_errors() {
        assert!(err_of(b"GGU").contains("too short"));
        assert!(err_of(b"GGML\x03\0\0\0").contains("magic"));
        let mut b = header(0, 0);
        b[4] = 1;
        assert!(err_of(&b).contains("version 1"));
        // invalid UTF-8 key
        let mut b = header(0, 1);
        put_str(&mut b, "\u{e9}");
        let n = b.len();
        b[n - 1] = 0xff;
        b.extend(T_U8.to_le_bytes());
        b.push(0);
        assert!(err_of(&b).contains("UTF-8"));
        // duplicate keys
        let meta = vec![
            ("k".to_string(), GgufValue::U8(1)),
            ("k".to_string(), GgufValue::U8(2)),
        ];
        assert!(encode(&meta, &[]).is_err());
        // unknown tensor type, row not a multiple of the block, misaligned offset
        let (meta, tensors) = sample();
        let good = encode(&meta, &tensors).unwrap();
        let pat = [1u64.to_le_bytes().to_vec(), b"q".to_vec()].concat();
        let at = good.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len();
        let ty_at = at + 4 + 16;
        let mut b = good.clone();
        b[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = err_of(&b);
        assert!(e.contains("99") && e.contains("\"q\""), "{e}");
        let mut b = good.clone();
        b[at + 4..at + 12].copy_from_slice(&31u64.to_le_bytes());
        assert!(err_of(&b).contains("block size"));
        let mut b = good.clone();
        b[ty_at + 4..ty_at + 12].copy_from_slice(&8u64.to_le_bytes());
        assert!(err_of(&b).contains("alignment"));
        let mut b = good.clone();
        b[ty_at + 4..ty_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err_of(&b).contains("outside the file"));
        let mut b = good.clone();
        b[ty_at + 4..ty_at + 12].copy_from_slice(&0u64.to_le_bytes());
        assert!(err_of(&b).contains("overlap"));
        // truncation anywhere before the end of the last tensor's bytes is an error
        let last = parse(&good)
            .unwrap()
            .tensors
            .iter()
            .map(|t| t.offset + t.n_bytes)
            .max();
        for n in 0..last.unwrap() {
            assert!(parse(&good[..n]).is_err(), "truncated at {n} accepted");
        }
        assert!(parse(&good).is_ok());
    }

    #[test]
    fn open_errors_name_the_file() {
        let p = tmp("bad.gguf");
        std::fs::write(&p, b"nope").unwrap();
        let e = format!("{:#}", Gguf::open(&p).unwrap_err());
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        assert!(!e.contains('\n'));
        std::fs::remove_file(&p).unwrap();
    }
}
