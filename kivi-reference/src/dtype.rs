//! Number formats: the activation dtypes (fp16, bf16) as Rust types, and rounding to any format a layout names
//! (activations: [`Dtype`]; scales and mins: [`ScaleDtype`]).
//!
//! The reference holds every value as an `f32` that is exactly a value of its format (fp16 and bf16 numbers are
//! all f32 numbers), and rounds to a format with the IEEE round-to-nearest-even of `half`'s conversions, what a
//! GPU's `cvt.rn.f16.f32` and `cvt.rn.bf16.f32` do (no flush to zero: subnormals are kept).

use half::{bf16, f16};
pub use kivi_dsl::{Dtype, ScaleDtype};

/// An activation type of the cache's inputs (queries, keys, values): [`f16`] or [`bf16`]. The reference's
/// functions that take activations are generic over it; the type must be the layout's `dtype`.
pub trait Activation: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The layout dtype this type is.
    const DTYPE: Dtype;
    /// The value, exactly, as f32.
    fn to_f32(self) -> f32;
    /// The nearest value (ties to even; out of range: infinity; NaN stays NaN).
    fn from_f32(x: f32) -> Self;
}

impl Activation for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Activation for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A number format values are rounded to: fp16, bf16 or fp32 (for fp32, rounding is the identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// IEEE binary16: 11 significant bits, largest finite 65504.
    F16,
    /// bfloat16: 8 significant bits, the exponent range of f32.
    Bf16,
    /// IEEE binary32.
    F32,
}

impl Format {
    /// `x` rounded to the nearest number of this format (ties to even), as f32. Values beyond the largest
    /// finite number become infinite, as in IEEE arithmetic.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Format::F16 => f16::from_f32(x).to_f32(),
            Format::Bf16 => bf16::from_f32(x).to_f32(),
            Format::F32 => x,
        }
    }

    /// The largest finite number of the format.
    pub fn max(self) -> f32 {
        match self {
            Format::F16 => f16::MAX.to_f32(),
            Format::Bf16 => bf16::MAX.to_f32(),
            Format::F32 => f32::MAX,
        }
    }

    /// Bytes per number: 2, 2 or 4.
    pub fn bytes(self) -> usize {
        match self {
            Format::F16 | Format::Bf16 => 2,
            Format::F32 => 4,
        }
    }

    /// Whether `x` is exactly a number of this format (NaN counts as one).
    pub fn holds(self, x: f32) -> bool {
        x.is_nan() || self.round(x).to_bits() == x.to_bits()
    }

    /// The spelling in the spec language: `fp16`, `bf16` or `fp32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::F16 => "fp16",
            Format::Bf16 => "bf16",
            Format::F32 => "fp32",
        }
    }
}

impl From<Dtype> for Format {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F16 => Format::F16,
            Dtype::Bf16 => Format::Bf16,
        }
    }
}

impl From<ScaleDtype> for Format {
    fn from(d: ScaleDtype) -> Self {
        match d {
            ScaleDtype::F16 => Format::F16,
            ScaleDtype::Bf16 => Format::Bf16,
            ScaleDtype::F32 => Format::F32,
        }
    }
}

/// Activations as f32 (exact).
pub fn to_f32s<T: Activation>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// fp16 numbers rounded to the nearest `T` (exact for fp16; bf16 keeps 8 significant bits): how the reference
/// files' fp16 captures become the inputs of a bf16 layout.
pub fn from_f16s<T: Activation>(x: &[f16]) -> Vec<T> {
    x.iter().map(|v| T::from_f32(v.to_f32())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even_and_overflows_to_infinity() {
        // 1 + 2^-8 lies halfway between the bf16 numbers 1 and 1 + 2^-7: to even (1).
        assert_eq!(Format::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            Format::Bf16.round(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(Format::F16.round(65520.0), f32::INFINITY);
        assert_eq!(Format::F16.round(65519.0), 65504.0);
        assert!(Format::Bf16.round(f32::MAX).is_infinite());
        assert_eq!(Format::F32.round(0.1), 0.1);
        // Subnormals are kept, not flushed.
        assert_eq!(Format::F16.round(2f32.powi(-24)), 2f32.powi(-24));
        assert_eq!(Format::Bf16.round(2f32.powi(-130)), 2f32.powi(-130));
        assert!(Format::Bf16.holds(1.5) && !Format::Bf16.holds(1.0 + 2f32.powi(-9)));
        assert!(Format::F16.holds(-0.0) && Format::F16.holds(f32::NAN));
        assert_eq!(
            [Format::F16, Format::Bf16, Format::F32].map(Format::bytes),
            [2, 2, 4]
        );
    }

    #[test]
    fn activation_types_name_their_dtype() {
        assert_eq!(<f16 as Activation>::DTYPE, Dtype::F16);
        assert_eq!(<bf16 as Activation>::DTYPE, Dtype::Bf16);
        let x: Vec<bf16> = from_f16s(&[f16::from_f32(1.0 + 2f32.powi(-10))]);
        assert_eq!(to_f32s(&x), vec![1.0]);
    }
}
