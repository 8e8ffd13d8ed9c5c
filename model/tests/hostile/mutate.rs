//! Seeded mutations of valid files for the hostile-input tests (model/tests/hostile_files.rs)
//! and the longer fuzz driver (fuzz/): byte-level (bit flips, truncation, splices, random
//! tails), JSON-aware (a node replaced by a huge, negative, fractional or mistyped value, a
//! key deleted or added) and safetensors-aware (header JSON mutated and re-framed, NaN/Inf
//! written into the data). Deterministic: a case is reproduced from its seed.

#![allow(dead_code)]

use serde_json::Value;

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n >= 1`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Numbers that break naive parsers: zero, negatives, fractions, powers of two at the
/// u32/u64/f64 edges, overflowing and out-of-range literals.
pub const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "-0",
    "0.5",
    "1.5",
    "-2.5",
    "1e-300",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e30",
    "-1e30",
    "1e308",
    "1e400",
    "-9223372036854775808",
];

/// Values of other JSON types (and odd strings) to put where a number or object was.
pub const OTHERS: &[&str] = &[
    "null",
    "true",
    "\"\"",
    "\"NaN\"",
    "\"inf\"",
    "\"-1\"",
    "\"../../etc/passwd\"",
    "\"/\"",
    "\"a/b\"",
    "\"\\u0000\"",
    "\"F64\"",
    "\"I8\"",
    "\"u32\"",
    "[]",
    "[1]",
    "[0, 0]",
    "[-1, 4]",
    "[4, 0]",
    "{}",
    "{\"a\": 1}",
];

fn random_value(rng: &mut Rng) -> Value {
    let s = if rng.below(3) == 0 {
        *rng.pick(OTHERS)
    } else {
        *rng.pick(NUMBERS)
    };
    // "1e400" and friends do not parse as a Value: they are spliced in as text instead
    serde_json::from_str(s).unwrap_or(Value::Null)
}

/// Paths to every node of a JSON value (object keys and array indices).
fn paths(v: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                prefix.push(Step::Key(k.clone()));
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate().take(64) {
                prefix.push(Step::Index(i));
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn node_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut cur = v;
    for s in path {
        cur = match (s, cur) {
            (Step::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// One structural mutation of a JSON document (`text` must parse), serialised again;
/// some mutations splice a literal that `serde_json::Value` cannot hold (`1e400`,
/// `18446744073709551616` as an integer) into the text.
pub fn mutate_json_value(rng: &mut Rng, text: &str) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return mutate_bytes(rng, text.as_bytes());
    };
    let mut all = Vec::new();
    paths(&v, &mut Vec::new(), &mut all);
    let n_mut = 1 + rng.below(3);
    let mut splice: Option<(String, &str)> = None;
    for _ in 0..n_mut {
        let p = all[rng.below(all.len())].clone();
        let Some(node) = node_mut(&mut v, &p) else {
            continue;
        };
        match rng.below(8) {
            0..=2 => *node = random_value(rng),
            3 => {
                // a marker replaced by a raw literal after serialisation
                let lit = *rng.pick(NUMBERS);
                *node = Value::String("@@RAW@@".into());
                splice = Some(("\"@@RAW@@\"".into(), lit));
            }
            4 => {
                // delete a key or an element
                if let Value::Object(m) = node {
                    if let Some(k) = m.keys().nth(rng.below(m.len().max(1))).cloned() {
                        m.remove(&k);
                    }
                } else if let Value::Array(a) = node {
                    if !a.is_empty() {
                        let i = rng.below(a.len());
                        a.remove(i);
                    }
                }
            }
            5 => {
                // an unknown key, or an extra element
                if let Value::Object(m) = node {
                    m.insert(format!("extra{}", rng.below(3)), random_value(rng));
                } else if let Value::Array(a) = node {
                    a.push(random_value(rng));
                }
            }
            6 => {
                // numbers nudged: off by one, doubled, negated
                if let Some(x) = node.as_i64() {
                    let y = match rng.below(4) {
                        0 => x.wrapping_add(1),
                        1 => x.wrapping_sub(1),
                        2 => x.wrapping_mul(2),
                        _ => x.wrapping_neg(),
                    };
                    *node = Value::from(y);
                } else if let Some(x) = node.as_f64() {
                    *node = serde_json::Number::from_f64(-x * 1e10)
                        .map(Value::Number)
                        .unwrap_or(Value::Null);
                }
            }
            _ => {
                // a huge array or string in place of the node
                *node = if rng.below(2) == 0 {
                    Value::Array(vec![Value::from(1); 1 + rng.below(5000)])
                } else {
                    Value::String("x".repeat(rng.below(100_000)))
                };
            }
        }
    }
    let mut s = serde_json::to_string(&v).unwrap_or_default();
    if let Some((marker, lit)) = splice {
        s = s.replacen(&marker, lit, 1);
    }
    s.into_bytes()
}

/// Generic byte-level mutations.
pub fn mutate_bytes(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut b = valid.to_vec();
    match rng.below(9) {
        0 => b.truncate(rng.below(b.len() + 1)),
        1 => {
            for _ in 0..1 + rng.below(8) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
        }
        2 => {
            for _ in 0..1 + rng.below(4) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = *rng.pick(b"{}[]\",:-.0123456789eE \x00\xff\n\\");
                }
            }
        }
        3 => {
            // delete a range
            if !b.is_empty() {
                let i = rng.below(b.len());
                let n = rng.below(b.len() - i + 1).min(1 + rng.below(64));
                b.drain(i..i + n);
            }
        }
        4 => {
            // duplicate a range
            if !b.is_empty() {
                let i = rng.below(b.len());
                let n = (b.len() - i).min(1 + rng.below(64));
                let chunk = b[i..i + n].to_vec();
                let at = rng.below(b.len() + 1);
                b.splice(at..at, chunk);
            }
        }
        5 => b.extend((0..rng.below(256)).map(|_| rng.next() as u8)),
        6 => b.clear(),
        7 => {
            // random bytes of random length
            let n = rng.below(512);
            b = (0..n).map(|_| rng.next() as u8).collect();
        }
        _ => {
            // overwrite a run with 0x00 or 0xff
            if !b.is_empty() {
                let i = rng.below(b.len());
                let n = (b.len() - i).min(1 + rng.below(32));
                let v = if rng.below(2) == 0 { 0 } else { 0xff };
                b[i..i + n].fill(v);
            }
        }
    }
    b
}

/// A JSON file: structural (60%) or byte-level mutations.
pub fn mutate_json(rng: &mut Rng, text: &str) -> Vec<u8> {
    if rng.below(5) < 3 {
        mutate_json_value(rng, text)
    } else {
        mutate_bytes(rng, text.as_bytes())
    }
}

/// The JSON header of a safetensors file and the offset of its data section.
pub fn split_safetensors(file: &[u8]) -> (String, usize) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    (String::from_utf8(file[8..8 + n].to_vec()).unwrap(), 8 + n)
}

/// A safetensors file: header mutations re-framed with a correct length prefix (so they
/// reach the layout checks), NaN/Inf/huge values in the data, byte-level mutations.
pub fn mutate_safetensors(rng: &mut Rng, file: &[u8]) -> Vec<u8> {
    let (header, start) = split_safetensors(file);
    match rng.below(10) {
        0..=4 => {
            let h = mutate_json_value(rng, &header);
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            let data = &file[start..];
            match rng.below(4) {
                0 => out.extend_from_slice(&data[..rng.below(data.len() + 1)]),
                _ => out.extend_from_slice(data),
            }
            out
        }
        5..=6 => {
            // non-finite or absurd f32 values at aligned places of the data
            let mut b = file.to_vec();
            let n = (b.len() - start) / 4;
            for _ in 0..1 + rng.below(4) {
                if n == 0 {
                    break;
                }
                let i = start + 4 * rng.below(n);
                let v: f32 = *rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38, -3e38]);
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            b
        }
        7 => {
            // a wrong length prefix
            let mut b = file.to_vec();
            let v: u64 = match rng.below(4) {
                0 => rng.next(),
                1 => (start as u64 - 8)
                    .wrapping_add(rng.below(17) as u64)
                    .wrapping_sub(8),
                2 => u64::MAX,
                _ => rng.below(b.len() + 64) as u64,
            };
            b[..8].copy_from_slice(&v.to_le_bytes());
            b
        }
        _ => mutate_bytes(rng, file),
    }
}

/// Text with one JSON document per line (a corpus): mutate one line, or the bytes.
pub fn mutate_jsonl(rng: &mut Rng, text: &str) -> Vec<u8> {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() || rng.below(3) == 0 {
        return mutate_bytes(rng, text.as_bytes());
    }
    let i = rng.below(lines.len());
    let mut out = Vec::new();
    for (j, l) in lines.iter().enumerate() {
        if j == i {
            out.extend(mutate_json(rng, l));
        } else {
            out.extend_from_slice(l.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

/// Values that break naive GGUF readers when written over a count, length, rank,
/// dimension, type id or offset: zero, small, just past a limit, 2^31/2^32/2^60 edges.
const GGUF_NUMBERS: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    9,
    13,
    31,
    33,
    255,
    256,
    4096,
    65535,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    1 << 40,
    1 << 60,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX,
];

/// A GGUF file: a hostile number written as u32 or u64 over any position (counts,
/// string lengths, value and tensor types, ranks, dimensions, offsets are all such
/// fields), a random small type id, or byte-level mutations.
pub fn mutate_gguf(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut b = valid.to_vec();
    if b.len() < 8 || rng.below(3) == 0 {
        return mutate_bytes(rng, valid);
    }
    for _ in 0..1 + rng.below(3) {
        let v = match rng.below(4) {
            0 => rng.below(48) as u64,
            _ => *rng.pick(GGUF_NUMBERS),
        };
        if rng.below(2) == 0 {
            let i = rng.below(b.len() - 3);
            b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
        } else {
            let i = rng.below(b.len() - 7);
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}
