//! Dequantization of ggml tensor data (GGUF files) to f32: the float types (F32, F16,
//! BF16, F64), the legacy 32-element block quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the
//! 256-element K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K), with ggml's block layouts
//! (all little endian) and ggml's order of float operations, so results equal ggml's
//! reference dequantization bit for bit. Large tensors are split over rayon threads.
//! The other way, [`quantize`] rounds f32 values into the block formats the integer decode
//! kernels read (Q8_0, Q4_0, Q4_1), the method written from the formats' definitions.

use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::gguf::GgmlType;

/// Elements of a K-quant super-block.
pub const QK_K: usize = 256;

/// Tensors with at least this many elements are dequantized on several threads.
const PAR_MIN_ELEMS: usize = 1 << 16;
/// Elements per parallel work item (a multiple of every block size).
const PAR_CHUNK_ELEMS: usize = 1 << 14;

/// Whether [`dequantize`] supports `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    block_fn(ty).is_some()
}

/// Dequantizes `bytes` of type `ty` into `out`: `out.len()` must be a whole number of
/// blocks and `bytes` exactly that many blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let Some(f) = block_fn(ty) else {
        bail!("dequantizing {ty} is not supported");
    };
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    if !out.len().is_multiple_of(be) {
        bail!(
            "{} elements are not a whole number of {ty} blocks ({be} elements each)",
            out.len()
        );
    }
    let n_blocks = out.len() / be;
    if n_blocks.checked_mul(bb) != Some(bytes.len()) {
        bail!(
            "{} elements of {ty} take {n_blocks} blocks of {bb} bytes, but {} bytes were given",
            out.len(),
            bytes.len()
        );
    }
    let run = |out: &mut [f32], bytes: &[u8]| {
        for (y, x) in out.chunks_exact_mut(be).zip(bytes.chunks_exact(bb)) {
            f(x, y);
        }
    };
    if out.len() >= PAR_MIN_ELEMS {
        let blocks = PAR_CHUNK_ELEMS / be;
        out.par_chunks_mut(blocks * be)
            .zip(bytes.par_chunks(blocks * bb))
            .for_each(|(y, x)| run(y, x));
    } else {
        run(out, bytes);
    }
    Ok(())
}

/// Whether [`quantize`] can write `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1)
}

/// Rounds `x` (a whole number of 32-element blocks, each block along a row) into blocks
/// of `ty` (Q8_0, Q4_0 or Q4_1), the layouts [`dequantize`] reads. Per block: Q8_0 scales
/// by max|x| / 127 and rounds to nearest (halves away from zero); Q4_0 maps the
/// value of largest magnitude to -8 (scale max / -8, 16 levels); Q4_1 spans [min, max]
/// in 15 steps. The quotients use the f32 scale; the stored scale is its f16 rounding.
/// Non-finite input is refused (its blocks would dequantize to garbage).
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let f: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::Q8_0 => quant_q8_0,
        GgmlType::Q4_0 => quant_q4_0,
        GgmlType::Q4_1 => quant_q4_1,
        _ => bail!("quantizing to {ty} is not supported (Q8_0, Q4_0 or Q4_1)"),
    };
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    if !x.len().is_multiple_of(be) {
        bail!(
            "{} elements are not a whole number of {ty} blocks ({be} elements each)",
            x.len()
        );
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!("cannot quantize to {ty}: element {i} is {}", x[i]);
    }
    let mut out = vec![0u8; x.len() / be * bb];
    let blocks = PAR_CHUNK_ELEMS / be;
    out.par_chunks_mut(blocks * bb)
        .zip(x.par_chunks(blocks * be))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(bb).zip(x.chunks_exact(be)) {
                f(x, o);
            }
        });
    Ok(out)
}

/// `1 / d`, 0 for a zero scale (an all-zero block).
fn inv(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn quant_q8_0(x: &[f32], o: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inv(d);
    o[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, v) in o[2..].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

fn quant_q4_0(x: &[f32], o: &mut [u8]) {
    // the signed value of largest magnitude becomes level 0 (-8 after the offset)
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = inv(d);
    o[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| ((v * id + 8.5) as u8).min(15);
    for j in 0..16 {
        o[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

fn quant_q4_1(x: &[f32], o: &mut [u8]) {
    let (lo, hi) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let d = (hi - lo) / 15.0;
    let id = inv(d);
    o[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    o[2..4].copy_from_slice(&f16::from_f32(lo).to_le_bytes());
    let q = |v: f32| (((v - lo) * id + 0.5) as u8).min(15);
    for j in 0..16 {
        o[4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

/// Dequantizes one block `x` (exactly `block_bytes` long) into `y` (`block_elems` long).
type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 => |x, y| y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
        GgmlType::F16 => |x, y| y[0] = f16::from_le_bytes([x[0], x[1]]).to_f32(),
        GgmlType::BF16 => |x, y| y[0] = bf16::from_le_bytes([x[0], x[1]]).to_f32(),
        GgmlType::F64 => |x, y| {
            let mut b = [0u8; 8];
            b.copy_from_slice(x);
            y[0] = f64::from_le_bytes(b) as f32
        },
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::Q8_K => q8_k,
        _ => return None,
    })
}

fn h(x: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([x[at], x[at + 1]]).to_f32()
}

/// Q4_0 {f16 d; u8 qs[16]}: x = (q - 8) * d; low nibbles are elements 0..16, high 16..32.
fn q4_0(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let qs = &x[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1 {f16 d; f16 m; u8 qs[16]}: x = q * d + m.
fn q4_1(x: &[u8], y: &mut [f32]) {
    let (d, m) = (h(x, 0), h(x, 2));
    let qs = &x[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5 block: bit j of the u32 `qh` is the fifth bit of element j.
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (qs[j] & 0x0F) | (h0 << 4);
        q[j + 16] = (qs[j] >> 4) | (h1 << 4);
    }
    q
}

/// Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: x = (q - 16) * d.
fn q5_0(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let q = q5_values(qh, &x[6..22]);
    for j in 0..32 {
        y[j] = (q[j] as i32 - 16) as f32 * d;
    }
}

/// Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: x = q * d + m.
fn q5_1(x: &[u8], y: &mut [f32]) {
    let (d, m) = (h(x, 0), h(x, 2));
    let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
    let q = q5_values(qh, &x[8..24]);
    for j in 0..32 {
        y[j] = q[j] as f32 * d + m;
    }
}

/// Q8_0 {f16 d; i8 qs[32]}: x = q * d.
fn q8_0(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    for j in 0..32 {
        y[j] = x[2 + j] as i8 as f32 * d;
    }
}

/// Q8_K {f32 d; i8 qs[256]; i16 bsums[16]}: x = d * q.
fn q8_k(x: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    for j in 0..QK_K {
        y[j] = d * x[4 + j] as i8 as f32;
    }
}

/// Q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: 16 sub-blocks of 16; scale byte =
/// (min << 4) | scale; x = d * scale * q - dmin * min with 2-bit q. Each 32-byte half of
/// qs holds 128 elements: bits 2s..2s+2 of qs[l] (s = 0..4) are element 32s + l.
fn q2_k(x: &[u8], y: &mut [f32]) {
    let scales = &x[0..16];
    let d = h(x, 80);
    let dmin = h(x, 82);
    let mut out = 0;
    let mut is = 0;
    for half in 0..2 {
        let q = &x[16 + 32 * half..16 + 32 * (half + 1)];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// The 16 six-bit scales of Q3_K, unpacked from 12 bytes: the low 4 bits of scale i are
/// nibble i of bytes 0..8 (scale i < 8: low nibble of byte i, else high nibble of byte
/// i - 8), the high 2 bits are bits 2(i % 4).. of byte 8 + i / 4. Values are biased by 32.
fn q3_k_scales(p: &[u8]) -> [i32; 16] {
    let mut s = [0i32; 16];
    for (i, v) in s.iter_mut().enumerate() {
        let low = if i < 8 { p[i] & 0x0F } else { p[i - 8] >> 4 };
        let high = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        *v = (low | (high << 4)) as i32 - 32;
    }
    s
}

/// Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: 16 sub-blocks of 16; x = d *
/// scale * (q - 4 * !hbit) with 2-bit q laid out as in Q2_K and bit k of hmask[l] the high
/// bit of element 32k + l.
fn q3_k(x: &[u8], y: &mut [f32]) {
    let hmask = &x[0..32];
    let scales = q3_k_scales(&x[96..108]);
    let d = h(x, 108);
    let mut out = 0;
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &x[32 + 32 * half..32 + 32 * (half + 1)];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let i = 16 * part + l;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let sub = if hmask[i] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (low - sub) as f32;
                    out += 1;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// Scale and min of sub-block `j` (0..8) of Q4_K/Q5_K: 6-bit values packed in 12 bytes.
/// j < 4: low 6 bits of bytes j (scale) and j + 4 (min); j >= 4: low nibbles of byte j + 4
/// (scale) and its high nibble (min), with the top 2 bits from bytes j - 4 and j.
fn scale_min_k4(j: usize, p: &[u8]) -> (u8, u8) {
    if j < 4 {
        (p[j] & 63, p[j + 4] & 63)
    } else {
        (
            (p[j + 4] & 0x0F) | ((p[j - 4] >> 6) << 4),
            (p[j + 4] >> 4) | ((p[j] >> 6) << 4),
        )
    }
}

/// Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: 8 sub-blocks of 32; x = d * sc * q
/// - dmin * m. Each 32 bytes of qs hold 64 elements: low nibbles first, then high.
fn q4_k(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let dmin = h(x, 2);
    let scales = &x[4..16];
    for c in 0..4 {
        let q = &x[16 + 32 * c..16 + 32 * (c + 1)];
        let (s1, m1) = scale_min_k4(2 * c, scales);
        let (s2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let y = &mut y[64 * c..64 * (c + 1)];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: Q4_K plus a fifth bit:
/// bit k of qh[l] is the high bit of element 32k + l.
fn q5_k(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let dmin = h(x, 2);
    let scales = &x[4..16];
    let qh = &x[16..48];
    for c in 0..4 {
        let q = &x[48 + 32 * c..48 + 32 * (c + 1)];
        let (s1, m1) = scale_min_k4(2 * c, scales);
        let (s2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 1u8 << (2 * c + 1));
        let y = &mut y[64 * c..64 * (c + 1)];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: 16 sub-blocks of 16; x = d * sc *
/// (q - 32) with 6-bit q. Per 128 elements (64 bytes of ql, 32 of qh, 8 scales): element
/// l + 32k (k = 0..4, l = 0..32) has low nibble from ql[l + 32 (k & 1)] (low nibble for
/// k < 2, high otherwise) and high 2 bits from bits 2k.. of qh[l].
fn q6_k(x: &[u8], y: &mut [f32]) {
    let d = h(x, 208);
    for half in 0..2 {
        let ql = &x[64 * half..64 * (half + 1)];
        let qh = &x[128 + 32 * half..128 + 32 * (half + 1)];
        let sc = &x[192 + 8 * half..192 + 8 * (half + 1)];
        let y = &mut y[128 * half..128 * (half + 1)];
        for l in 0..32 {
            let is = l / 16;
            for k in 0..4 {
                let lo = ql[l + 32 * (k & 1)];
                let lo = if k < 2 { lo & 0x0F } else { lo >> 4 };
                let hi = (qh[l] >> (2 * k)) & 3;
                let q = (lo | (hi << 4)) as i32 - 32;
                y[l + 32 * k] = d * (sc[is + 2 * k] as i8) as f32 * q as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / ty.block_bytes() * ty.block_elems();
        let mut out = vec![f32::NAN; n];
        dequantize(ty, bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn plain_types() {
        let v = [1.5f32, -0.0, 65504.0, 1e-3];
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::F32, &b), v);
        let b: Vec<u8> = v.iter().flat_map(|&x| f16b(x)).collect();
        let want: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(deq(GgmlType::F16, &b), want);
        // bf16 is the top half of the f32 bits
        let b: Vec<u8> = v
            .iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let want: Vec<f32> = v
            .iter()
            .map(|x| f32::from_bits(x.to_bits() & 0xFFFF_0000))
            .collect();
        assert_eq!(deq(GgmlType::BF16, &b), want);
    }

    /// Quantized values 0..32 of a test block (distinct, covering the whole range).
    fn qvals(bits: u32) -> Vec<u32> {
        (0..32u32).map(|i| (i * 7 + 3) % (1 << bits)).collect()
    }

    #[test]
    fn q4_0_and_q4_1() {
        let q = qvals(4);
        let mut qs = [0u8; 16];
        for j in 0..16 {
            qs[j] = (q[j] | (q[j + 16] << 4)) as u8;
        }
        let b = [&f16b(0.25)[..], &qs].concat();
        let want: Vec<f32> = q.iter().map(|&v| (v as f32 - 8.0) * 0.25).collect();
        assert_eq!(deq(GgmlType::Q4_0, &b), want);
        let b = [&f16b(0.5)[..], &f16b(-3.0), &qs].concat();
        let want: Vec<f32> = q.iter().map(|&v| v as f32 * 0.5 - 3.0).collect();
        assert_eq!(deq(GgmlType::Q4_1, &b), want);
    }

    #[test]
    fn q5_0_and_q5_1() {
        let q = qvals(5);
        let mut qs = [0u8; 16];
        let mut qh = 0u32;
        for j in 0..16 {
            qs[j] = ((q[j] & 15) | ((q[j + 16] & 15) << 4)) as u8;
        }
        for (j, v) in q.iter().enumerate() {
            qh |= (v >> 4) << j;
        }
        let b = [&f16b(0.125)[..], &qh.to_le_bytes(), &qs].concat();
        let want: Vec<f32> = q.iter().map(|&v| (v as f32 - 16.0) * 0.125).collect();
        assert_eq!(deq(GgmlType::Q5_0, &b), want);
        let b = [&f16b(2.0)[..], &f16b(0.5), &qh.to_le_bytes(), &qs].concat();
        let want: Vec<f32> = q.iter().map(|&v| v as f32 * 2.0 + 0.5).collect();
        assert_eq!(deq(GgmlType::Q5_1, &b), want);
    }

    #[test]
    fn q8_0_two_blocks() {
        let mut b = Vec::new();
        let mut want = Vec::new();
        for (blk, d) in [0.5f32, -0.25].into_iter().enumerate() {
            b.extend(f16b(d));
            for j in 0..32 {
                let q = (j * 8 - 128 + blk as i32) as i8;
                b.push(q as u8);
                want.push(q as f32 * d);
            }
        }
        assert_eq!(deq(GgmlType::Q8_0, &b), want);
    }

    /// A deterministic pseudo-random sequence for the K-quant blocks.
    fn lcg(seed: u32) -> impl FnMut() -> u32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            s >> 8
        }
    }

    /// Packs 8 six-bit (scale, min) pairs the way Q4_K/Q5_K store them.
    fn pack_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
        let mut p = [0u8; 12];
        for j in 0..4 {
            p[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            p[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            p[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
        }
        p
    }

    #[test]
    fn q4_k_and_q5_k() {
        let mut r = lcg(1);
        let sc: [u8; 8] = std::array::from_fn(|_| (r() % 64) as u8);
        let mn: [u8; 8] = std::array::from_fn(|_| (r() % 64) as u8);
        let q: Vec<u8> = (0..256).map(|_| (r() % 32) as u8).collect();
        let (d, dmin) = (0.0625f32, 0.5f32);
        let want: Vec<f32> = (0..256)
            .map(|i| d * sc[i / 32] as f32 * q[i] as f32 - dmin * mn[i / 32] as f32)
            .collect();
        let want4: Vec<f32> = (0..256)
            .map(|i| d * sc[i / 32] as f32 * (q[i] & 15) as f32 - dmin * mn[i / 32] as f32)
            .collect();
        // element 64c + l is the low nibble of qs[32c + l], element 64c + 32 + l its high one
        let mut qs = [0u8; 128];
        let mut qh = [0u8; 32];
        for (i, &v) in q.iter().enumerate() {
            let (c, w, l) = (i / 64, (i / 32) % 2, i % 32);
            qs[32 * c + l] |= (v & 15) << (4 * w);
            qh[l] |= (v >> 4) << (i / 32);
        }
        let packed = pack_k4(&sc, &mn);
        let b4 = [&f16b(d)[..], &f16b(dmin), &packed, &qs].concat();
        assert_eq!(deq(GgmlType::Q4_K, &b4), want4);
        let b5 = [&f16b(d)[..], &f16b(dmin), &packed, &qh, &qs].concat();
        assert_eq!(deq(GgmlType::Q5_K, &b5), want);
    }

    #[test]
    fn q6_k() {
        let mut r = lcg(2);
        let sc: [i8; 16] = std::array::from_fn(|_| (r() % 256) as u8 as i8);
        let q: Vec<u8> = (0..256).map(|_| (r() % 64) as u8).collect();
        let d = 0.03125f32;
        let want: Vec<f32> = (0..256)
            .map(|i| d * sc[i / 16] as f32 * (q[i] as i32 - 32) as f32)
            .collect();
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (i, &v) in q.iter().enumerate() {
            let (half, k, l) = (i / 128, (i % 128) / 32, i % 32);
            ql[64 * half + l + 32 * (k & 1)] |= (v & 15) << (4 * (k / 2));
            qh[32 * half + l] |= (v >> 4) << (2 * k);
        }
        let scb: Vec<u8> = sc.iter().map(|&s| s as u8).collect();
        let b = [&ql[..], &qh, &scb, &f16b(d)].concat();
        assert_eq!(deq(GgmlType::Q6_K, &b), want);
    }

    #[test]
    fn q2_k_and_q3_k() {
        let mut r = lcg(3);
        let q: Vec<u8> = (0..256).map(|_| (r() % 8) as u8).collect();
        // 2-bit layout shared by both: element 128h + 32s + l is bits 2s of qs[32h + l]
        let mut qs = [0u8; 64];
        let mut hmask = [0u8; 32];
        for (i, &v) in q.iter().enumerate() {
            let (hf, s, l) = (i / 128, (i % 128) / 32, i % 32);
            qs[32 * hf + l] |= (v & 3) << (2 * s);
            hmask[l] |= (v >> 2) << (i / 32);
        }
        // Q2_K: 4-bit scale and min per 16 elements
        let sc2: [u8; 16] = std::array::from_fn(|_| (r() % 256) as u8);
        let (d, dmin) = (0.25f32, 0.125f32);
        let want2: Vec<f32> = (0..256)
            .map(|i| {
                let s = sc2[i / 16];
                d * (s & 15) as f32 * (q[i] & 3) as f32 - dmin * (s >> 4) as f32
            })
            .collect();
        let b2 = [&sc2[..], &qs, &f16b(d), &f16b(dmin)].concat();
        assert_eq!(deq(GgmlType::Q2_K, &b2), want2);
        // Q3_K: 6-bit scales biased by 32, value = 3-bit q - 4
        let sc3: [u8; 16] = std::array::from_fn(|_| (r() % 64) as u8);
        let mut packed = [0u8; 12];
        for (i, &s) in sc3.iter().enumerate() {
            packed[i % 8] |= (s & 15) << (4 * (i / 8));
            packed[8 + i % 4] |= (s >> 4) << (2 * (i / 4));
        }
        let want3: Vec<f32> = (0..256)
            .map(|i| d * (sc3[i / 16] as i32 - 32) as f32 * (q[i] as i32 - 4) as f32)
            .collect();
        let b3 = [&hmask[..], &qs, &packed, &f16b(d)].concat();
        assert_eq!(deq(GgmlType::Q3_K, &b3), want3);
    }

    #[test]
    fn q8_k() {
        let mut b = 0.5f32.to_le_bytes().to_vec();
        b.extend((0..256).map(|i| i as u8));
        b.extend([0u8; 32]);
        let want: Vec<f32> = (0..256).map(|i| 0.5 * (i as u8 as i8) as f32).collect();
        assert_eq!(deq(GgmlType::Q8_K, &b), want);
    }

    #[test]
    fn parallel_path_equals_serial() {
        let mut r = lcg(4);
        let n_blocks = 3 * PAR_MIN_ELEMS / 32 + 5;
        let mut b = Vec::new();
        for _ in 0..n_blocks {
            b.extend(f16b((r() % 100) as f32 / 64.0));
            b.extend(f16b(-((r() % 100) as f32) / 64.0));
            b.extend((0..16).map(|_| r() as u8));
        }
        let par = deq(GgmlType::Q4_1, &b);
        let mut ser = vec![0f32; par.len()];
        for (y, x) in ser.chunks_exact_mut(32).zip(b.chunks_exact(20)) {
            q4_1(x, y);
        }
        assert_eq!(par, ser);
    }

    #[test]
    fn size_mismatches_and_unsupported_types_are_errors() {
        let mut out = vec![0f32; 32];
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out[..31]).is_err());
        let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0f32; 256]).unwrap_err();
        assert!(e.to_string().contains("IQ2_XXS"));
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        // values on a grid the formats hold exactly come back exactly; random values
        // within half a quantization step (plus the f16 scale's rounding)
        // Q8_0: amax = 127 / 8, so d = 1/8 exactly and every value is q * d
        let g8: Vec<f32> = (0..32).map(|j| (j * 8 - 127) as f32 * 0.125).collect();
        let y = deq(GgmlType::Q8_0, &quantize(GgmlType::Q8_0, &g8).unwrap());
        assert_eq!(y, g8);
        // Q4_1: min -2, max 1.75 = min + 15 * 0.25
        let g41: Vec<f32> = (0..32).map(|j| (j % 16) as f32 * 0.25 - 2.0).collect();
        let y = deq(GgmlType::Q4_1, &quantize(GgmlType::Q4_1, &g41).unwrap());
        assert_eq!(y, g41);
        // Q4_0: the largest magnitude 2 maps to level 0 (d = -0.25): x = (q - 8) * d
        let g4: Vec<f32> = (0..32).map(|j| ((j % 16) as f32 - 8.0) * -0.25).collect();
        let y = deq(GgmlType::Q4_0, &quantize(GgmlType::Q4_0, &g4).unwrap());
        assert_eq!(y, g4);
        let mut s = 7u64;
        let x: Vec<f32> = (0..32 * 64)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect();
        for (ty, levels) in [
            (GgmlType::Q8_0, 254.0),
            (GgmlType::Q4_0, 8.0),
            (GgmlType::Q4_1, 15.0),
        ] {
            let y = deq(ty, &quantize(ty, &x).unwrap());
            for (blk, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let (lo, hi) = xb
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let amax = lo.abs().max(hi.abs());
                // half a step of the format for this block, plus the f16 scale's error;
                // Q4_0 reaches only 7 steps on the side opposite its largest magnitude,
                // where a value may be clamped a whole step (amax / 8) away
                let tol = match ty {
                    GgmlType::Q4_1 => 0.5 * (hi - lo) / levels,
                    GgmlType::Q4_0 => amax / 8.0,
                    _ => amax / levels,
                };
                for (a, w) in yb.iter().zip(xb) {
                    assert!(
                        (a - w).abs() <= tol + 2e-3 * amax,
                        "{ty} block {blk}: {a} vs {w} (tolerance {tol})"
                    );
                }
            }
        }
        let zeros = quantize(GgmlType::Q4_1, &[0.0; 32]).unwrap();
        assert_eq!(deq(GgmlType::Q4_1, &zeros), vec![0.0; 32]);
    }

    #[test]
    fn quantize_refuses_what_it_cannot_write() {
        let e = quantize(GgmlType::Q8_0, &[0.0; 31])
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number"), "{e}");
        let e = quantize(GgmlType::Q6_K, &[0.0; 256])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
        let mut x = vec![0.0f32; 32];
        x[3] = f32::NAN;
        let e = quantize(GgmlType::Q4_0, &x).unwrap_err().to_string();
        assert!(e.contains("element 3"), "{e}");
    }
}
