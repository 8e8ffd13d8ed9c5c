//! Philox4x32-10 counter-based random number generator, bit-exact with Random123
//! (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), plus the
//! engine's fixed mapping from `(seed, stream, index)` to uniform and normal samples.
//! Every formula here is mirrored verbatim by the CUDA kernels, so change both or neither.
//!
//! # Mapping `(seed, stream, counter)` -> Philox input
//!
//! ```text
//! key = [seed as u32, (seed >> 32) as u32]
//! ctr = [counter as u32, (counter >> 32) as u32, stream as u32, (stream >> 32) as u32]
//! block(counter) = philox4x32_10(ctr, key)      // four u32 words w[0..4]
//! ```
//!
//! # Derived samples (element `index` of a stream)
//!
//! * `uniform_f32(index)`: `w = block(index / 4)[index % 4]`, then
//!   `((w >> 9) as f32 + 0.5) * 2^-23` — every step exact in f32 (needs 24 significant
//!   bits), so the result lies in `[2^-24, 1 - 2^-24]`, strictly inside (0, 1).
//!   (A 24-bit grid `((w >> 8) + 0.5) * 2^-24` would need 25 bits and rounds to 1.0.)
//! * `uniform_f64(index)`: `b = block(index / 2)`, `j = 2 * (index % 2)`,
//!   `x = (b[j + 1] as u64) << 32 | b[j] as u64` (first word is the low half), then
//!   `((x >> 12) as f64 + 0.5) * 2^-52` — every step exact in f64 (needs 53 significant
//!   bits), so the result lies in `[2^-53, 1 - 2^-53]`, strictly inside (0, 1).
//! * `normal_f64(index)`: Box-Muller on pair `p = index / 2`:
//!   `u1 = uniform_f64(2p)`, `u2 = uniform_f64(2p + 1)` (i.e. both come from `block(p)`),
//!   `r = sqrt(-2 ln u1)`, `z0 = r cos(2π u2)`, `z1 = r sin(2π u2)` with
//!   `2π = 6.283185307179586` (f64); returns `z0` for even `index`, `z1` for odd.
//! * `normal_f32(index)`: computed in f64 exactly as `normal_f64`, then rounded to f32,
//!   so CUDA can match it with double-precision math.
//!
//! The integer blocks and both uniforms are bit-exact across implementations. Normals
//! depend on the platform's `ln`/`sqrt`/`cos`/`sin`; `sqrt` is correctly rounded everywhere,
//! but `ln`/`cos`/`sin` may differ from CUDA's libdevice by an ulp or so in f64.

/// First Philox4x32 round multiplier (Random123 `PHILOX_M4x32_0`).
pub const PHILOX_M4X32_0: u32 = 0xD251_1F53;
/// Second Philox4x32 round multiplier (Random123 `PHILOX_M4x32_1`).
pub const PHILOX_M4X32_1: u32 = 0xCD9E_8D57;
/// Weyl increment for key word 0 (golden ratio, Random123 `PHILOX_W32_0`).
pub const PHILOX_W32_0: u32 = 0x9E37_79B9;
/// Weyl increment for key word 1 (sqrt(3) - 1, Random123 `PHILOX_W32_1`).
pub const PHILOX_W32_1: u32 = 0xBB67_AE85;

/// 2^-23 as f32.
const TWO_POW_M23: f32 = 1.0 / 8_388_608.0;
/// 2^-52 as f64.
const TWO_POW_M52: f64 = 1.0 / 4_503_599_627_370_496.0;

/// Full 32x32 -> 64-bit product split as `(hi, lo)`.
#[inline(always)]
fn mulhilo32(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32 round (Random123 `_philox4x32round`).
#[inline(always)]
fn round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo32(PHILOX_M4X32_0, ctr[0]);
    let (hi1, lo1) = mulhilo32(PHILOX_M4X32_1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// Key schedule step (Random123 `_philox4x32bumpkey`).
#[inline(always)]
fn bump_key(key: [u32; 2]) -> [u32; 2] {
    [
        key[0].wrapping_add(PHILOX_W32_0),
        key[1].wrapping_add(PHILOX_W32_1),
    ]
}

/// Philox4x32 with 10 rounds, identical to Random123's `philox4x32_R(10, ctr, key)`:
/// round with the original key, then (bump key, round) nine more times.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = round(ctr, key);
    let mut k = key;
    for _ in 1..10 {
        k = bump_key(k);
        c = round(c, k);
    }
    c
}

/// Maps a u32 word to the open interval (0, 1): `((w >> 9) as f32 + 0.5) * 2^-23`.
/// Exact in f32 (the top 23 bits plus one half fit the 24-bit significand); the extremes
/// are `2^-24` (w = 0) and `1 - 2^-24` (w = 0xffffffff).
#[inline]
pub fn u32_to_unit_f32(w: u32) -> f32 {
    ((w >> 9) as f32 + 0.5) * TWO_POW_M23
}

/// Maps a u64 to the open interval (0, 1): `((x >> 12) as f64 + 0.5) * 2^-52`.
/// Exact in f64 (the top 52 bits plus one half fit the 53-bit significand); the extremes
/// are `2^-53` (x = 0) and `1 - 2^-53` (x = u64::MAX).
#[inline]
pub fn u64_to_unit_f64(x: u64) -> f64 {
    ((x >> 12) as f64 + 0.5) * TWO_POW_M52
}

/// Combines words `j` (low half) and `j + 1` (high half) of a block into a u64.
#[inline(always)]
fn pair_u64(b: &[u32; 4], j: usize) -> u64 {
    ((b[j + 1] as u64) << 32) | b[j] as u64
}

/// Box-Muller on one block: `u1` from words 0,1 and `u2` from words 2,3; returns `(z0, z1)`.
#[inline(always)]
fn box_muller(b: &[u32; 4]) -> (f64, f64) {
    let u1 = u64_to_unit_f64(pair_u64(b, 0));
    let u2 = u64_to_unit_f64(pair_u64(b, 2));
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// A Philox4x32-10 stream identified by `(seed, stream)`; stateless and cheap to copy.
/// See the module docs for the exact mapping to counters, keys and samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Philox {
    seed: u64,
    stream: u64,
}

impl Philox {
    /// Creates the generator for `seed` (the Philox key) and `stream` (upper counter half).
    pub fn new(seed: u64, stream: u64) -> Self {
        Self { seed, stream }
    }

    /// Raw 128-bit block number `counter` of this stream.
    #[inline]
    pub fn block(&self, counter: u64) -> [u32; 4] {
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let ctr = [
            counter as u32,
            (counter >> 32) as u32,
            self.stream as u32,
            (self.stream >> 32) as u32,
        ];
        philox4x32_10(ctr, key)
    }

    /// Uniform element `index`: word `index % 4` of `block(index / 4)` via [`u32_to_unit_f32`].
    #[inline]
    pub fn uniform_f32(&self, index: u64) -> f32 {
        u32_to_unit_f32(self.block(index / 4)[(index % 4) as usize])
    }

    /// Uniform element `index`: words `2*(index%2)` (low) and `2*(index%2)+1` (high) of
    /// `block(index / 2)` via [`u64_to_unit_f64`].
    #[inline]
    pub fn uniform_f64(&self, index: u64) -> f64 {
        let b = self.block(index / 2);
        u64_to_unit_f64(pair_u64(&b, 2 * (index % 2) as usize))
    }

    /// Standard normal element `index` (Box-Muller on `block(index / 2)`, see module docs).
    #[inline]
    pub fn normal_f64(&self, index: u64) -> f64 {
        let (z0, z1) = box_muller(&self.block(index / 2));
        if index.is_multiple_of(2) {
            z0
        } else {
            z1
        }
    }

    /// Standard normal element `index`: computed in f64 exactly as [`Philox::normal_f64`],
    /// then rounded to f32, so CUDA can match with double math.
    #[inline]
    pub fn normal_f32(&self, index: u64) -> f32 {
        self.normal_f64(index) as f32
    }

    /// `out[i] = uniform_f32(start + i)`, computing each block once.
    pub fn fill_uniform_f32(&self, start: u64, out: &mut [f32]) {
        fill_blocked(self, start, out, 4, |b, lane| u32_to_unit_f32(b[lane]));
    }

    /// `out[i] = uniform_f64(start + i)`, computing each block once.
    pub fn fill_uniform_f64(&self, start: u64, out: &mut [f64]) {
        fill_blocked(self, start, out, 2, |b, lane| {
            u64_to_unit_f64(pair_u64(b, 2 * lane))
        });
    }

    /// `out[i] = normal_f32(start + i)`, computing each block (and Box-Muller pair) once.
    pub fn fill_normal_f32(&self, start: u64, out: &mut [f32]) {
        fill_normal(self, start, out, |z| z as f32);
    }

    /// `out[i] = normal_f64(start + i)`, computing each block (and Box-Muller pair) once.
    pub fn fill_normal_f64(&self, start: u64, out: &mut [f64]) {
        fill_normal(self, start, out, |z| z);
    }
}

/// Fills `out[i]` with element `start + i` where element `e` is `f(block(e / per), e % per)`.
fn fill_blocked<T>(
    g: &Philox,
    start: u64,
    out: &mut [T],
    per: u64,
    f: impl Fn(&[u32; 4], usize) -> T,
) {
    let mut i = 0;
    let mut e = start;
    while i < out.len() {
        let b = g.block(e / per);
        let mut lane = (e % per) as usize;
        while lane < per as usize && i < out.len() {
            out[i] = f(&b, lane);
            lane += 1;
            i += 1;
        }
        e = e.wrapping_add(per - (e % per));
    }
}

/// Box-Muller fill: element `e` is `z0`/`z1` of `box_muller(block(e / 2))` by parity.
fn fill_normal<T>(g: &Philox, start: u64, out: &mut [T], cast: impl Fn(f64) -> T) {
    let mut i = 0;
    let mut e = start;
    while i < out.len() {
        let (z0, z1) = box_muller(&g.block(e / 2));
        if e.is_multiple_of(2) {
            out[i] = cast(z0);
            i += 1;
            if i < out.len() {
                out[i] = cast(z1);
                i += 1;
            }
            e = e.wrapping_add(2);
        } else {
            out[i] = cast(z1);
            i += 1;
            e = e.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kat_zero() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
    }

    #[test]
    fn kat_ones() {
        assert_eq!(
            philox4x32_10([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
    }

    #[test]
    fn kat_pi() {
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn mapping_to_counter_and_key() {
        let seed = 0x299f31d0_a4093822u64;
        let stream = 0x03707344_13198a2eu64;
        let counter = 0x85a308d3_243f6a88u64;
        assert_eq!(
            Philox::new(seed, stream).block(counter),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
        assert_eq!(
            Philox::new(0, 0).block(0),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            Philox::new(u64::MAX, u64::MAX).block(u64::MAX),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
    }

    #[test]
    fn unit_mapping_extremes() {
        let lo = u32_to_unit_f32(0);
        let hi = u32_to_unit_f32(0xffff_ffff);
        assert!(lo > 0.0 && lo < 1.0 && hi > 0.0 && hi < 1.0);
        assert_eq!(lo, 2f32.powi(-24));
        assert_eq!(hi, 1.0 - 2f32.powi(-24));

        let lo = u64_to_unit_f64(0);
        let hi = u64_to_unit_f64(u64::MAX);
        assert!(lo > 0.0 && lo < 1.0 && hi > 0.0 && hi < 1.0);
        assert_eq!(lo, 2f64.powi(-53));
        assert_eq!(hi, 1.0 - 2f64.powi(-53));
    }

    #[test]
    fn unit_mapping_exact_and_monotone() {
        // Every one of the 2^23 f32 grid points is exact, inside (0, 1) and increasing.
        let mut prev = 0.0f32;
        for k in 0u32..(1 << 23) {
            let v = u32_to_unit_f32(k << 9 | 0x1ff);
            assert_eq!(v, u32_to_unit_f32(k << 9));
            assert_eq!(((v as f64) * 8_388_608.0 - 0.5), k as f64);
            assert!(v > prev && v < 1.0);
            prev = v;
        }
        // Top and bottom of the f64 grid.
        for k in (0u64..4096).chain((1 << 52) - 4096..1 << 52) {
            let v = u64_to_unit_f64(k << 12 | 0xfff);
            assert_eq!(v, u64_to_unit_f64(k << 12));
            assert!(v > 0.0 && v < 1.0);
            assert_eq!(v, (k as f64 + 0.5) / 4_503_599_627_370_496.0);
        }
    }

    #[test]
    fn element_layout() {
        let g = Philox::new(42, 7);
        let b = g.block(5);
        for j in 0..4 {
            assert_eq!(g.uniform_f32(20 + j), u32_to_unit_f32(b[j as usize]));
        }
        let x0 = (b[1] as u64) << 32 | b[0] as u64;
        let x1 = (b[3] as u64) << 32 | b[2] as u64;
        assert_eq!(g.uniform_f64(10), u64_to_unit_f64(x0));
        assert_eq!(g.uniform_f64(11), u64_to_unit_f64(x1));
        let (u1, u2) = (g.uniform_f64(10), g.uniform_f64(11));
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        assert_eq!(g.normal_f64(10), r * t.cos());
        assert_eq!(g.normal_f64(11), r * t.sin());
        assert_eq!(g.normal_f32(11), (r * t.sin()) as f32);
    }

    #[test]
    fn fill_matches_elementwise() {
        let g = Philox::new(0x1234_5678_9abc_def0, 3);
        for start in [0u64, 1, 2, 3, 5, 1001] {
            for len in [0usize, 1, 2, 3, 7, 33] {
                let mut a = vec![0f32; len];
                g.fill_uniform_f32(start, &mut a);
                for (i, v) in a.iter().enumerate() {
                    assert_eq!(v.to_bits(), g.uniform_f32(start + i as u64).to_bits());
                }
                let mut b = vec![0f64; len];
                g.fill_uniform_f64(start, &mut b);
                for (i, v) in b.iter().enumerate() {
                    assert_eq!(v.to_bits(), g.uniform_f64(start + i as u64).to_bits());
                }
                let mut c = vec![0f32; len];
                g.fill_normal_f32(start, &mut c);
                for (i, v) in c.iter().enumerate() {
                    assert_eq!(v.to_bits(), g.normal_f32(start + i as u64).to_bits());
                }
                let mut d = vec![0f64; len];
                g.fill_normal_f64(start, &mut d);
                for (i, v) in d.iter().enumerate() {
                    assert_eq!(v.to_bits(), g.normal_f64(start + i as u64).to_bits());
                }
            }
        }
    }

    #[test]
    fn streams_and_seeds_differ() {
        let n = 64;
        let seq = |g: Philox| {
            let mut v = vec![0f32; n];
            g.fill_uniform_f32(0, &mut v);
            v
        };
        let base = seq(Philox::new(1, 0));
        assert_ne!(base, seq(Philox::new(1, 1)));
        assert_ne!(base, seq(Philox::new(2, 0)));
        assert_ne!(base, seq(Philox::new(1 << 32, 0)));
        assert_ne!(base, seq(Philox::new(1, 1 << 32)));
        assert_eq!(base, seq(Philox::new(1, 0)));
    }

    #[test]
    fn uniforms_open_interval_and_mean() {
        let g = Philox::new(2024, 0);
        let n = 100_000;
        let mut a = vec![0f32; n];
        g.fill_uniform_f32(0, &mut a);
        assert!(a.iter().all(|&x| x > 0.0 && x < 1.0));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "f32 mean {mean}");

        let mut b = vec![0f64; n];
        g.fill_uniform_f64(0, &mut b);
        assert!(b.iter().all(|&x| x > 0.0 && x < 1.0));
        let mean = b.iter().sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "f64 mean {mean}");
    }

    #[test]
    fn normal_moments() {
        let g = Philox::new(2024, 1);
        let n = 100_000;
        let mut a = vec![0f64; n];
        g.fill_normal_f64(0, &mut a);
        let mean = a.iter().sum::<f64>() / n as f64;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "f64 mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "f64 var {var}");

        let mut b = vec![0f32; n];
        g.fill_normal_f32(1, &mut b);
        assert!(b.iter().all(|x| x.is_finite()));
        let mean = b.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = b
            .iter()
            .map(|&x| (x as f64 - mean) * (x as f64 - mean))
            .sum::<f64>()
            / n as f64;
        assert!(mean.abs() < 0.02, "f32 mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "f32 var {var}");
    }
}
