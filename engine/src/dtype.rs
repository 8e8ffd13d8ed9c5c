//! Element types a tensor can hold, and the `Element` trait that ties a Rust
//! scalar type to its `DType` and to the CPU storage variant that holds it.

use crate::storage::{Buf, CpuStorage};
use half::{bf16, f16};

/// Element type of a tensor. f64 exists for CPU reference checks only; u32/i32
/// hold token ids and counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
    U32,
    I32,
}

impl DType {
    pub const ALL: [DType; 6] = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::U32,
        DType::I32,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F64 => 8,
        }
    }

    /// The dtype string used in safetensors headers.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::U32 => "U32",
            DType::I32 => "I32",
        }
    }

    /// Parse a safetensors dtype string; `None` for dtypes we do not support.
    pub fn from_safetensors_name(s: &str) -> Option<DType> {
        Some(match s {
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            "U32" => DType::U32,
            "I32" => DType::I32,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::U32 => "u32",
            DType::I32 => "i32",
        };
        f.write_str(s)
    }
}

/// A Rust scalar type that can live in a tensor.
pub trait Element: bytemuck::Pod + Send + Sync + Copy + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// The CPU buffer of this element type, if `s` holds this type.
    fn buf(s: &CpuStorage) -> Option<&Buf<Self>>;
    fn buf_mut(s: &mut CpuStorage) -> Option<&mut Buf<Self>>;
    /// Wrap an owned vector as CPU storage.
    fn wrap(v: Vec<Self>) -> CpuStorage;
}

macro_rules! element {
    ($t:ty, $d:expr, $var:ident, |$x:ident| $to:expr, |$y:ident| $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            #[inline]
            fn to_f64(self) -> f64 {
                let $x = self;
                $to
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                let $y = v;
                $from
            }
            #[inline]
            fn buf(s: &CpuStorage) -> Option<&Buf<Self>> {
                match s {
                    CpuStorage::$var(b) => Some(b),
                    _ => None,
                }
            }
            #[inline]
            fn buf_mut(s: &mut CpuStorage) -> Option<&mut Buf<Self>> {
                match s {
                    CpuStorage::$var(b) => Some(b),
                    _ => None,
                }
            }
            #[inline]
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$var(Buf::Owned(v))
            }
        }
    };
}

element!(f16, DType::F16, F16, |x| x.to_f64(), |v| f16::from_f64(v));
element!(bf16, DType::BF16, BF16, |x| x.to_f64(), |v| bf16::from_f64(
    v
));
element!(f32, DType::F32, F32, |x| x as f64, |v| v as f32);
element!(f64, DType::F64, F64, |x| x, |v| v);
element!(u32, DType::U32, U32, |x| x as f64, |v| v as u32);
element!(i32, DType::I32, I32, |x| x as f64, |v| v as i32);

/// Floating types the CPU ops compute in (f32 for speed, f64 for references and
/// finite-difference gradient checks).
pub trait Float:
    Element
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
    + std::iter::Sum
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn powi(self, n: i32) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn is_finite(self) -> bool;
    fn is_nan(self) -> bool;
    fn from_usize(n: usize) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline]
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
            #[inline]
            fn powi(self, n: i32) -> Self {
                <$t>::powi(self, n)
            }
            #[inline]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline]
            fn from_usize(n: usize) -> Self {
                n as $t
            }
        }
    };
}
float!(f32);
float!(f64);
