//! Quantization of one group, code packing, and the two KIVI tensor layouts (per-channel keys, per-token values).
//!
//! # The arithmetic (the paper's reference code, bit-exact)
//!
//! For a group of fp16 values `x` quantized to `bits` bits (`qmax = 2^bits - 1`):
//!
//! ```text
//! mn    = min(x)                       (an fp16 value, stored as the group's min)
//! diff  = f16(mx - mn)                 (f32 subtraction, rounded to fp16, round-to-nearest-even)
//! scale = f16(f32(diff) / qmax)        (f32 division, rounded to fp16)
//! code  = rne(clamp(f16(f32(f16(x - mn)) / f32(scale)), 0, qmax))
//! ```
//!
//! Each step is one correctly rounded f32 operation followed by a round to fp16, exactly what a GPU does with
//! `__fsub_rn` / `__fdiv_rn` and `__float2half_rn`, and (double rounding f32 -> f16 being innocuous for a single
//! add, subtract or divide of fp16 operands) exactly the reference's fp16 tensor arithmetic. `rne` rounds half to
//! even (`torch.round`).
//!
//! Dequantization is `f32(code) * f32(scale) + f32(mn)` as one fused multiply-add (GPU `fmaf`).
//!
//! The other rounding mode, [`Rounding::F32`] (`rounding: fp32` in a spec), keeps every intermediate in f32:
//! `scale = f16((mx - mn) / qmax)` and `code = rne(clamp((x - mn) / f32(scale), 0, qmax))`, with `x - mn` and
//! the division in f32 (the fp32 path the paper's reference does not take; about 0.05% of 2-bit codes differ
//! from the half mode by one step). The `_with` functions take the mode; the others use [`Rounding::Half`].
//!
//! # Other activation and scale dtypes (not in the paper's code, so defined here)
//!
//! The inputs are numbers of the layout's activation dtype A (fp16 or bf16: the functions are generic over
//! [`Activation`]), and scales and mins are stored in its scale dtype S (fp16, bf16 or fp32). The half mode
//! rounds each step on activations to A, as the paper's PyTorch code would with tensors of that dtype, and the
//! scale to S, the format it is computed for (for A = S = fp16 that is the paper's single rounding to fp16; with
//! fp32 scales the scale keeps fp32's precision). The codes are computed with the scale and min as stored, so
//! that dequantization inverts exactly what was quantized:
//!
//! ```text
//! m     = S(mn)                        (the stored min; exact unless S is narrower than A)
//! diff  = A(mx - mn)                   (f32 subtraction, rounded to A)
//! scale = S(f32(diff) / qmax)          (the stored scale; saturated to S's largest number)
//! code  = rne(clamp(A(f32(A(x - m)) / scale), 0, qmax))
//! ```
//!
//! Every step is a correctly rounded f32 operation followed by a rounding to A or S, exactly what the kernels
//! do. For A = S = fp16 these are the formulas above, bit for bit. [`Rounding::F32`] takes every step in f32
//! (the scale still rounded to S). A group whose min S cannot hold (a bf16 number beyond fp16's 65504 with fp16
//! scales) is stored as NaN, like a group holding NaN or Inf, so the error reaches the output instead of being
//! hidden. The wider-than-A fallback below applies when `mx - mn` overflows A (bf16 overflows only near f32's
//! limit).
//!
//! # Symmetric quantization (`quant: symmetric`; not in the paper's code, so defined here)
//!
//! With `h = 2^(bits-1)` and `q = h - 1` (bits >= 2; the DSL rejects 1-bit symmetric), a group's zero point is its
//! middle code:
//!
//! ```text
//! amax  = max |x|                      (a number of A)
//! scale = S(f32(amax) / q)             (fp16 for the default S = fp16)
//! mn    = S(-h * scale)                (exact: a power of two times a number of S, unless it overflows)
//! code  = rne(clamp(A(f32(x) / f32(scale)), -q, q)) + h
//! ```
//!
//! so that it is stored and dequantized like an asymmetric group (`code * scale + mn = (code - h) * scale`): the
//! kernels need nothing new, and a zero dequantizes to exactly zero. [`Rounding::F32`] skips the rounding of the
//! quotient. A group whose `h * scale` would overflow S (|x| above about 65504 * q / h
//! for fp16 scales) is quantized asymmetrically instead (below), as is any group in which `scale` rounds to 0
//! (all zeros: codes `h`, scale 0).
//!
//! # Cases the reference leaves undefined, and what this crate does
//!
//! - **scale == 0** (a constant group, or a range so small that `diff / qmax` underflows fp16): every code is 0,
//!   scale is `+0`, min is the group's min. A constant group therefore dequantizes exactly to the constant (the
//!   reference divides by zero there). In the underflow case the error is at most `diff`, below `qmax * 2^-25`.
//! - **range wider than fp16** (`f16(mx - mn)` is infinite, e.g. `-60000` and `60000`): the group falls back to
//!   fp32 steps, `scale = f16((mx - mn) / qmax)` and `code = rne(clamp((x - mn) / f32(scale), 0, qmax))` with
//!   `x - mn` and the division in f32 and no fp16 rounding of intermediates. Codes stay meaningful and the
//!   dequantization error stays within `scale / 2` (plus the fp16 rounding of scale). Only with `bits = 1` can
//!   that scale itself overflow fp16; it is then clamped to `f16::MAX` (65504) and the error is within `scale`.
//!   (With other dtypes: A in place of fp16 for the range test, S's largest number for the clamp.)
//! - **signed zeros**: for min and max, `-0` orders below `+0` (IEEE 754-2019 `minimum`/`maximum`), so a
//!   group whose smallest value is zero stores min `-0` if it holds a `-0`.
//! - **any NaN or +-Inf in the group**: scale = NaN, min = NaN, every code 0. The whole group dequantizes to NaN,
//!   so garbage input is never silently hidden; it propagates to the attention output as NaN.
//!
//! # Packing
//!
//! A run of codes is one little-endian bit stream over 32-bit words (stored as int32 in the reference files):
//! code `j` sits in stream bits `[bits * j, bits * j + bits)`, i.e. from bit `(bits * j) % 32` of word
//! `bits * j / 32`, continuing into the next word where it crosses a word boundary. For bits dividing 32 (1, 2,
//! 4, 8) that is the reference's layout, `32 / bits` codes per word and none crossing; for 3, 5, 6 and 7 bits
//! nothing is wasted: 32 codes take exactly `bits` words (3-bit: a group of 32 in three words). A run must hold
//! a multiple of [`codes_per_pack`] codes (32 / gcd(bits, 32)), so that it fills whole words; the one exception
//! is a per-token run (a token's codes, [`QuantizedValues`]), each token its own run of [`value_words_per_token`]
//! words, the last one zero-padded where head_dim codes do not fill it (1-bit or 3-bit values at head_dim 80,
//! for example).
//!
//! # Axes
//!
//! [`quantize_keys_per_channel`] and [`quantize_values_per_token`] are named after the paper's choice, but
//! quantize any tensor of one head along that axis: a layout with `axis: per_token` keys or `axis: per_channel`
//! values uses the other function for that tensor (see [`crate::RefCache`] for when each axis flushes).

pub use kivi_dsl::{Rounding, ScaleDtype, Symmetry};

use crate::dtype::{to_f32s, Activation, Format};

/// How a group is quantized: the rounding mode, the symmetry and the scale dtype (module docs). A [`Rounding`]
/// alone means asymmetric with fp16 scales, the paper's choice. The activation dtype is the input's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupQuant {
    /// Steps rounded to the activation dtype (the reference's) or fp32.
    pub rounding: Rounding,
    /// Asymmetric (scale and min) or symmetric (scale; min = -2^(bits-1) * scale).
    pub symmetry: Symmetry,
    /// What the scale and min are stored as (and the codes computed with).
    pub scale_dtype: ScaleDtype,
}

impl GroupQuant {
    /// `rounding` and `symmetry` with fp16 scales.
    pub fn new(rounding: Rounding, symmetry: Symmetry) -> GroupQuant {
        GroupQuant {
            rounding,
            symmetry,
            scale_dtype: ScaleDtype::F16,
        }
    }

    /// The same with scales and mins stored as `scale_dtype`.
    pub fn with_scale_dtype(self, scale_dtype: ScaleDtype) -> GroupQuant {
        GroupQuant {
            scale_dtype,
            ..self
        }
    }

    /// The mode of a layout's tensor: its rounding, symmetry and scale dtype.
    pub fn of(t: &kivi_dsl::TensorQuant) -> GroupQuant {
        GroupQuant {
            rounding: t.rounding,
            symmetry: t.symmetry,
            scale_dtype: t.scale_dtype,
        }
    }
}

impl From<Rounding> for GroupQuant {
    fn from(rounding: Rounding) -> Self {
        GroupQuant::new(rounding, Symmetry::Asymmetric)
    }
}

use crate::error::RefError;

/// Checks that `bits` is a code width the reference quantizes and packs: 1 to 8.
///
/// # Errors
/// [`RefError::Unsupported`] for any other width.
pub fn check_bits(bits: u32) -> Result<(), RefError> {
    match bits {
        1..=8 => Ok(()),
        _ => Err(RefError::unsupported(format!(
            "{bits}-bit codes (supported: 1 to 8)"
        ))),
    }
}

/// Codes per 32-bit word, `32 / bits`, for the widths that divide 32 (1, 2, 4, 8: the reference files' formats);
/// for the others see [`codes_per_pack`].
pub fn codes_per_word(bits: u32) -> usize {
    (32 / bits.max(1)) as usize
}

/// The fewest codes that fill whole 32-bit words: `32 / gcd(bits, 32)` (32 / bits for 1, 2, 4, 8; 32 for 3, 5,
/// 7; 16 for 6). A packed run's length must be a multiple of it.
pub fn codes_per_pack(bits: u32) -> usize {
    let bits = bits.clamp(1, 32);
    (32 / (1u32 << bits.trailing_zeros().min(5))) as usize
}

/// Words one token's `head_dim` packed `bits`-bit value codes take: `ceil(head_dim * bits / 32)` (the last one
/// zero-padded where the codes do not fill it).
pub fn value_words_per_token(head_dim: usize, bits: u32) -> usize {
    (head_dim * bits as usize).div_ceil(32)
}

/// Words that `codes` packed `bits`-bit codes take: `codes * bits / 32` (`codes` a multiple of
/// [`codes_per_pack`]).
pub fn packed_words(codes: usize, bits: u32) -> usize {
    codes * bits as usize / 32
}

/// The quantization of one group: its codes (one per input element, each in `0..2^bits`), its scale and its min.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantGroup {
    /// One code per input element, in input order.
    pub codes: Vec<u8>,
    /// The group's scale, a number of the mode's scale dtype held exactly as f32 (fp16 by default); see the
    /// module docs for the special cases (0, NaN).
    pub scale: f32,
    /// The group's min (the zero point of the asymmetric quantization), a number of the scale dtype as f32.
    pub mn: f32,
}

/// Quantizes one group of activations (fp16 or bf16) to `bits`-bit codes with the reference's half rounding and
/// fp16 scales (module docs).
///
/// # Errors
/// [`RefError::Unsupported`] for bits outside 1..=8; [`RefError::Invalid`] for an empty group.
pub fn quantize_group<T: Activation>(x: &[T], bits: u32) -> Result<QuantGroup, RefError> {
    let mut codes = vec![0u8; x.len()];
    let (scale, mn) = quantize_group_into(x, bits, &mut codes)?;
    Ok(QuantGroup { codes, scale, mn })
}

/// Like [`quantize_group`], writing the codes into `codes` (same length as `x`) and returning `(scale, mn)`.
///
/// # Errors
/// [`RefError::Unsupported`] for bad bits, [`RefError::Invalid`] for an empty group, [`RefError::Shape`] if
/// `codes.len() != x.len()`.
pub fn quantize_group_into<T: Activation>(
    x: &[T],
    bits: u32,
    codes: &mut [u8],
) -> Result<(f32, f32), RefError> {
    check_bits(bits)?;
    if x.is_empty() {
        return Err(RefError::Invalid("cannot quantize an empty group".into()));
    }
    if codes.len() != x.len() {
        return Err(RefError::shape(
            "codes buffer of a group",
            x.len(),
            codes.len(),
        ));
    }
    Ok(quantize_group_unchecked(
        &to_f32s(x),
        T::DTYPE.into(),
        bits,
        Rounding::Half.into(),
        codes,
    ))
}

/// [`quantize_group`] with the rounding mode, and optionally the symmetry and scale dtype, given (module docs).
///
/// # Errors
/// As [`quantize_group`]; [`RefError::Unsupported`] for symmetric 1-bit.
pub fn quantize_group_with<T: Activation>(
    x: &[T],
    bits: u32,
    mode: impl Into<GroupQuant>,
) -> Result<QuantGroup, RefError> {
    let mode = mode.into();
    check_mode(bits, mode)?;
    if x.is_empty() {
        return Err(RefError::Invalid("cannot quantize an empty group".into()));
    }
    let mut codes = vec![0u8; x.len()];
    let (scale, mn) =
        quantize_group_unchecked(&to_f32s(x), T::DTYPE.into(), bits, mode, &mut codes);
    Ok(QuantGroup { codes, scale, mn })
}

/// Checks bits (1..=8) and that symmetric groups have at least 2 of them.
pub(crate) fn check_mode(bits: u32, mode: GroupQuant) -> Result<(), RefError> {
    check_bits(bits)?;
    if bits == 1 && mode.symmetry == Symmetry::Symmetric {
        return Err(RefError::unsupported(
            "symmetric 1-bit quantization (codes -q..=q need q = 2^(bits-1) - 1 >= 1)",
        ));
    }
    Ok(())
}

/// The format intermediate steps round to: the activations' in the half mode, f32 in the fp32 mode.
fn step_format(act: Format, rounding: Rounding) -> Format {
    match rounding {
        Rounding::Half => act,
        Rounding::F32 => Format::F32,
    }
}

/// `x` rounded to the scale format, saturated to its largest finite number (a scale never becomes infinite).
fn store_saturated(s: Format, x: f32) -> f32 {
    let v = s.round(x);
    if v.is_infinite() {
        s.max().copysign(v)
    } else {
        v
    }
}

/// The symmetric arithmetic (module docs), or None where the group falls back to the asymmetric one.
fn quantize_symmetric(
    x: &[f32],
    act: Format,
    bits: u32,
    mode: GroupQuant,
    codes: &mut [u8],
) -> Option<(f32, f32)> {
    let (w, s_fmt) = (
        step_format(act, mode.rounding),
        Format::from(mode.scale_dtype),
    );
    let h = (1u32 << (bits - 1)) as f32;
    let q = h - 1.0;
    let amax = x.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    let scale = s_fmt.round(amax / q);
    let mn = s_fmt.round(-h * scale);
    if scale == 0.0 || scale.is_infinite() || mn.is_infinite() {
        return None;
    }
    for (c, &v) in codes.iter_mut().zip(x) {
        let t = w.round(v / scale);
        *c = (t.clamp(-q, q).round_ties_even() + h) as u8;
    }
    Some((scale, mn))
}

/// The arithmetic of [`quantize_group_into`], without argument checks (`x` non-empty, numbers of `act`, same
/// length as `codes`, symmetric only with bits >= 2). Returns the stored `(scale, min)`.
pub(crate) fn quantize_group_unchecked(
    x: &[f32],
    act: Format,
    bits: u32,
    mode: GroupQuant,
    codes: &mut [u8],
) -> (f32, f32) {
    let qmax = ((1u32 << bits) - 1) as f32;
    if x.iter().any(|v| !v.is_finite()) {
        codes.fill(0);
        return (f32::NAN, f32::NAN);
    }
    if mode.symmetry == Symmetry::Symmetric {
        if let Some(params) = quantize_symmetric(x, act, bits, mode, codes) {
            return params;
        }
    }
    let s_fmt = Format::from(mode.scale_dtype);
    let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
    for &f in x {
        // -0 orders below +0 (IEEE 754-2019 minimum/maximum), so the stored min is deterministic.
        if f < mn || (f == mn && f.is_sign_negative()) {
            mn = f;
        }
        if f > mx || (f == mx && f.is_sign_positive()) {
            mx = f;
        }
    }
    // The stored min: mn itself unless the scale dtype is narrower than the activations'.
    let m = s_fmt.round(mn);
    if m.is_infinite() {
        // A min the scale dtype cannot hold (module docs): the group is stored as NaN.
        codes.fill(0);
        return (f32::NAN, f32::NAN);
    }
    let diff = act.round(mx - mn);
    if diff.is_infinite() || mode.rounding == Rounding::F32 {
        // Range wider than the activation dtype, or fp32 rounding: fp32 steps (module docs).
        let scale = store_saturated(s_fmt, (mx - mn) / qmax);
        if scale == 0.0 {
            codes.fill(0);
            return (0.0, m);
        }
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = ((v - m) / scale).clamp(0.0, qmax).round_ties_even() as u8;
        }
        return (scale, m);
    }
    let scale = store_saturated(s_fmt, diff / qmax);
    if scale == 0.0 {
        codes.fill(0);
        return (0.0, m);
    }
    for (c, &v) in codes.iter_mut().zip(x) {
        let d = act.round(v - m);
        let q = act.round(d / scale);
        *c = q.clamp(0.0, qmax).round_ties_even() as u8;
    }
    (scale, m)
}

/// Dequantizes one code: `f32(code) * scale + mn` as a fused multiply-add (GPU `fmaf`), in f32, with the
/// group's stored scale and min (numbers of its scale dtype). NaN scale/min (a group that held NaN or Inf)
/// gives NaN.
pub fn dequantize(code: u8, scale: f32, mn: f32) -> f32 {
    f32::from(code).mul_add(scale, mn)
}

/// Packs codes into a little-endian bit stream of 32-bit words (module docs): code `j` in stream bits
/// `[bits*j, bits*j + bits)`. Returns `codes.len() * bits / 32` words.
///
/// # Errors
/// [`RefError::Unsupported`] for bad bits; [`RefError::Invalid`] if `codes.len()` is not a multiple of
/// [`codes_per_pack`] or a code does not fit in `bits` bits.
pub fn pack_codes(codes: &[u8], bits: u32) -> Result<Vec<u32>, RefError> {
    check_bits(bits)?;
    let unit = codes_per_pack(bits);
    if !codes.len().is_multiple_of(unit) {
        return Err(RefError::Invalid(format!(
            "{} {bits}-bit codes do not fill whole 32-bit words (give a multiple of {unit})",
            codes.len()
        )));
    }
    pack_codes_padded(codes, bits)
}

/// [`pack_codes`] for a run of any length: `ceil(codes.len() * bits / 32)` words, the last one zero-padded where
/// the codes do not fill it (a token's value codes, [`value_words_per_token`]).
///
/// # Errors
/// [`RefError::Unsupported`] for bad bits; [`RefError::Invalid`] if a code does not fit in `bits` bits.
pub fn pack_codes_padded(codes: &[u8], bits: u32) -> Result<Vec<u32>, RefError> {
    check_bits(bits)?;
    if let Some(c) = codes.iter().find(|&&c| u32::from(c) >> bits != 0) {
        return Err(RefError::Invalid(format!(
            "code {c} does not fit in {bits} bits"
        )));
    }
    Ok(pack_unchecked(codes, bits))
}

/// [`pack_codes`] without checks (a length that is not a multiple of [`codes_per_pack`] gets a zero-padded last
/// word).
pub(crate) fn pack_unchecked(codes: &[u8], bits: u32) -> Vec<u32> {
    let mut out = vec![0u32; (codes.len() * bits as usize).div_ceil(32)];
    for (j, &c) in codes.iter().enumerate() {
        let bit = bits as usize * j;
        let wide = u64::from(c) << (bit % 32);
        out[bit / 32] |= wide as u32;
        if let Some(next) = out.get_mut(bit / 32 + 1) {
            *next |= (wide >> 32) as u32;
        }
    }
    out
}

/// Unpacks a bit stream of 32-bit words into codes (the inverse of [`pack_codes`]): `words.len() * 32 / bits`
/// codes (rounded down).
///
/// # Errors
/// [`RefError::Unsupported`] for bad bits.
pub fn unpack_codes(words: &[u32], bits: u32) -> Result<Vec<u8>, RefError> {
    check_bits(bits)?;
    let n = words.len() * 32 / bits as usize;
    let mask = (1u64 << bits) - 1;
    Ok((0..n)
        .map(|j| {
            let bit = bits as usize * j;
            let lo = u64::from(words[bit / 32]);
            let hi = words.get(bit / 32 + 1).map_or(0, |&w| u64::from(w));
            (((lo | (hi << 32)) >> (bit % 32)) & mask) as u8
        })
        .collect())
}

/// One head's tensor quantized per channel (KIVI's key layout, as in `kivi_pack_vectors.safetensors`; values
/// too in a layout with `axis: per_channel` values).
///
/// A group is `group` consecutive tokens of one channel; codes are packed along tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedKeys {
    /// Bits per code.
    pub bits: u32,
    /// Group size G, in tokens.
    pub group: usize,
    /// Tokens T.
    pub tokens: usize,
    /// Channels D.
    pub head_dim: usize,
    /// Packed codes, `[D, T * bits / 32]` row-major (each row one bit stream).
    pub codes: Vec<u32>,
    /// Scales, `[D, T / G]` row-major: numbers of the scale dtype (fp16 by default), exactly, as f32.
    pub scale: Vec<f32>,
    /// Mins, `[D, T / G]` row-major, as `scale`.
    pub mn: Vec<f32>,
}

/// One head's tensor quantized per token (KIVI's value layout, as in `kivi_pack_vectors.safetensors`; keys too
/// in a layout with `axis: per_token` keys).
///
/// A group is `group` consecutive head-dim entries of one token; codes are packed along head_dim.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedValues {
    /// Bits per code.
    pub bits: u32,
    /// Group size G, in head-dim entries.
    pub group: usize,
    /// Tokens T.
    pub tokens: usize,
    /// Channels D.
    pub head_dim: usize,
    /// Packed codes, `[T, ceil(D * bits / 32)]` row-major (each row one bit stream, zero-padded to whole words:
    /// [`value_words_per_token`]).
    pub codes: Vec<u32>,
    /// Scales, `[T, D / G]` row-major: numbers of the scale dtype (fp16 by default), exactly, as f32.
    pub scale: Vec<f32>,
    /// Mins, `[T, D / G]` row-major, as `scale`.
    pub mn: Vec<f32>,
}

fn check_dims(what: &str, len: usize, tokens: usize, head_dim: usize) -> Result<(), RefError> {
    let expected = tokens
        .checked_mul(head_dim)
        .ok_or_else(|| RefError::Invalid(format!("{what}: size overflow")))?;
    if len != expected {
        return Err(RefError::shape(
            format!("{what} [T={tokens}, D={head_dim}]"),
            expected,
            len,
        ));
    }
    Ok(())
}

/// Quantizes one head's keys per channel: `k` is `[T, D]` row-major (fp16 or bf16); a group is `group`
/// consecutive tokens of one channel; each channel's T codes are packed along tokens. Half rounding, fp16
/// scales.
///
/// # Errors
/// [`RefError::Shape`] if `k.len() != tokens * head_dim`; [`RefError::Unsupported`] for bad bits;
/// [`RefError::Invalid`] if `group` is 0 or `tokens` is not a multiple of `group` and of [`codes_per_pack`].
pub fn quantize_keys_per_channel<T: Activation>(
    k: &[T],
    tokens: usize,
    head_dim: usize,
    bits: u32,
    group: usize,
) -> Result<QuantizedKeys, RefError> {
    quantize_keys_per_channel_with(k, tokens, head_dim, bits, group, Rounding::Half)
}

/// [`quantize_keys_per_channel`] with the rounding mode, and optionally the symmetry and scale dtype, given
/// (module docs).
///
/// # Errors
/// As [`quantize_keys_per_channel`]; [`RefError::Unsupported`] for symmetric 1-bit.
pub fn quantize_keys_per_channel_with<T: Activation>(
    k: &[T],
    tokens: usize,
    head_dim: usize,
    bits: u32,
    group: usize,
    mode: impl Into<GroupQuant>,
) -> Result<QuantizedKeys, RefError> {
    let mode = mode.into();
    check_mode(bits, mode)?;
    check_dims("keys", k.len(), tokens, head_dim)?;
    check_channel_dims(tokens, bits, group)?;
    Ok(quantize_per_channel(
        &to_f32s(k),
        T::DTYPE.into(),
        tokens,
        head_dim,
        bits,
        group,
        mode,
    ))
}

fn check_channel_dims(tokens: usize, bits: u32, group: usize) -> Result<(), RefError> {
    let unit = codes_per_pack(bits);
    if group == 0 || !tokens.is_multiple_of(group) || !tokens.is_multiple_of(unit) {
        return Err(RefError::Invalid(format!(
            "per-channel groups: {tokens} tokens must be a multiple of the group size {group} and of {unit} (the \
             {bits}-bit codes that fill whole words)"
        )));
    }
    Ok(())
}

/// The arithmetic of [`quantize_keys_per_channel_with`] on activations held as f32 (numbers of `act`), without
/// argument checks.
pub(crate) fn quantize_per_channel(
    k: &[f32],
    act: Format,
    tokens: usize,
    head_dim: usize,
    bits: u32,
    group: usize,
    mode: GroupQuant,
) -> QuantizedKeys {
    let ng = tokens / group;
    let mut codes = vec![0u8; tokens * head_dim]; // [D, T]
    let mut scale = vec![0.0f32; head_dim * ng];
    let mut mn = vec![0.0f32; head_dim * ng];
    let mut buf = vec![0.0f32; group];
    for d in 0..head_dim {
        for g in 0..ng {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = k[(g * group + i) * head_dim + d];
            }
            let out = &mut codes[d * tokens + g * group..d * tokens + (g + 1) * group];
            let (s, m) = quantize_group_unchecked(&buf, act, bits, mode, out);
            scale[d * ng + g] = s;
            mn[d * ng + g] = m;
        }
    }
    QuantizedKeys {
        bits,
        group,
        tokens,
        head_dim,
        codes: pack_unchecked(&codes, bits),
        scale,
        mn,
    }
}

/// Dequantizes per-channel keys back to `[T, D]` row-major f32 ([`dequantize`] per element).
///
/// # Errors
/// [`RefError::Shape`] if the vectors' lengths do not match `tokens`, `head_dim`, `group` and `bits`;
/// [`RefError::Unsupported`] / [`RefError::Invalid`] as in [`quantize_keys_per_channel`].
pub fn dequantize_keys_per_channel(q: &QuantizedKeys) -> Result<Vec<f32>, RefError> {
    check_bits(q.bits)?;
    let (t, d) = (q.tokens, q.head_dim);
    check_channel_dims(t, q.bits, q.group)?;
    let ng = t / q.group;
    check_len(
        "key codes [D, T*bits/32]",
        d * packed_words(t, q.bits),
        q.codes.len(),
    )?;
    check_len("key scales [D, T/G]", d * ng, q.scale.len())?;
    check_len("key mins [D, T/G]", d * ng, q.mn.len())?;
    let codes = unpack_codes(&q.codes, q.bits)?; // [D, T]
    let mut out = vec![0f32; t * d];
    for c in 0..d {
        for tok in 0..t {
            let g = c * ng + tok / q.group;
            out[tok * d + c] = dequantize(codes[c * t + tok], q.scale[g], q.mn[g]);
        }
    }
    Ok(out)
}

/// Quantizes one head's values per token: `v` is `[T, D]` row-major (fp16 or bf16); a group is `group`
/// consecutive head-dim entries of one token; each token's D codes are packed along head_dim. Half rounding,
/// fp16 scales.
///
/// # Errors
/// [`RefError::Shape`] if `v.len() != tokens * head_dim`; [`RefError::Unsupported`] for bad bits;
/// [`RefError::Invalid`] if `group` is 0 or `head_dim` is not a multiple of `group`.
pub fn quantize_values_per_token<T: Activation>(
    v: &[T],
    tokens: usize,
    head_dim: usize,
    bits: u32,
    group: usize,
) -> Result<QuantizedValues, RefError> {
    quantize_values_per_token_with(v, tokens, head_dim, bits, group, Rounding::Half)
}

/// [`quantize_values_per_token`] with the rounding mode, and optionally the symmetry and scale dtype, given
/// (module docs).
///
/// # Errors
/// As [`quantize_values_per_token`]; [`RefError::Unsupported`] for symmetric 1-bit.
pub fn quantize_values_per_token_with<T: Activation>(
    v: &[T],
    tokens: usize,
    head_dim: usize,
    bits: u32,
    group: usize,
    mode: impl Into<GroupQuant>,
) -> Result<QuantizedValues, RefError> {
    let mode = mode.into();
    check_mode(bits, mode)?;
    check_dims("values", v.len(), tokens, head_dim)?;
    check_value_dims(head_dim, group)?;
    Ok(quantize_per_token(
        &to_f32s(v),
        T::DTYPE.into(),
        tokens,
        head_dim,
        bits,
        group,
        mode,
    ))
}

/// The arithmetic of [`quantize_values_per_token_with`] on activations held as f32 (numbers of `act`), without
/// argument checks.
pub(crate) fn quantize_per_token(
    v: &[f32],
    act: Format,
    tokens: usize,
    head_dim: usize,
    bits: u32,
    group: usize,
    mode: GroupQuant,
) -> QuantizedValues {
    let ng = head_dim / group;
    let mut codes = vec![0u8; tokens * head_dim];
    let mut scale = vec![0.0f32; tokens * ng];
    let mut mn = vec![0.0f32; tokens * ng];
    for (i, (x, c)) in v.chunks(group).zip(codes.chunks_mut(group)).enumerate() {
        let (s, m) = quantize_group_unchecked(x, act, bits, mode, c);
        scale[i] = s;
        mn[i] = m;
    }
    QuantizedValues {
        bits,
        group,
        tokens,
        head_dim,
        // One run per token (zero-padded to whole words).
        codes: codes
            .chunks(head_dim.max(1))
            .flat_map(|c| pack_unchecked(c, bits))
            .collect(),
        scale,
        mn,
    }
}

fn check_value_dims(head_dim: usize, group: usize) -> Result<(), RefError> {
    if group == 0 || !head_dim.is_multiple_of(group) {
        return Err(RefError::Invalid(format!(
            "per-token groups: head_dim {head_dim} must be a multiple of the group size {group}"
        )));
    }
    Ok(())
}

fn check_len(what: &str, expected: usize, got: usize) -> Result<(), RefError> {
    if expected != got {
        return Err(RefError::shape(what, expected, got));
    }
    Ok(())
}

/// Dequantizes per-token values back to `[T, D]` row-major f32 ([`dequantize`] per element).
///
/// # Errors
/// [`RefError::Shape`] if the vectors' lengths do not match; [`RefError::Unsupported`] / [`RefError::Invalid`] as
/// in [`quantize_values_per_token`].
pub fn dequantize_values_per_token(q: &QuantizedValues) -> Result<Vec<f32>, RefError> {
    check_bits(q.bits)?;
    check_value_dims(q.head_dim, q.group)?;
    let (t, d) = (q.tokens, q.head_dim);
    let ng = d / q.group;
    let wpt = value_words_per_token(d, q.bits);
    check_len("value codes [T, ceil(D*bits/32)]", t * wpt, q.codes.len())?;
    check_len("value scales [T, D/G]", t * ng, q.scale.len())?;
    check_len("value mins [T, D/G]", t * ng, q.mn.len())?;
    let mut out = Vec::with_capacity(t * d);
    for (row, words) in q.codes.chunks(wpt.max(1)).take(t).enumerate() {
        let codes = unpack_codes(words, q.bits)?;
        out.extend(codes[..d].iter().enumerate().map(|(j, &c)| {
            let g = (row * d + j) / q.group;
            dequantize(c, q.scale[g], q.mn[g])
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn h(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    #[test]
    fn simple_group() {
        let q = quantize_group(&h(&[0.0, 1.0, 2.0, 3.0]), 2).unwrap();
        assert_eq!(q.codes, vec![0, 1, 2, 3]);
        assert_eq!(q.scale, 1.0);
        assert_eq!(q.mn, 0.0);
    }

    #[test]
    fn signed_zero_min() {
        let q = quantize_group(&[f16::ZERO, f16::NEG_ZERO, f16::ONE], 2).unwrap();
        assert_eq!(q.mn.to_bits(), (-0.0f32).to_bits());
        let q = quantize_group(&[f16::NEG_ZERO, f16::ZERO, f16::ONE], 2).unwrap();
        assert_eq!(q.mn.to_bits(), (-0.0f32).to_bits());
        assert_eq!(q.codes, vec![0, 0, 3]);
    }

    #[test]
    fn pack_layout() {
        let w = pack_codes(&[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3], 2).unwrap();
        assert_eq!(w, vec![1 | (2 << 2) | (3 << 4) | (3 << 30)]);
        assert!(pack_codes(&[4], 2).is_err());
        assert!(pack_codes(&[1, 1], 2).is_err());
        assert!(check_bits(0).is_err() && check_bits(9).is_err());
        assert!((1..=8).all(|b| check_bits(b).is_ok()));
    }

    #[test]
    fn three_bit_codes_fill_three_words_per_32() {
        // Code j at stream bits [3j, 3j + 3): code 10 straddles words 0 and 1 (bits 30..33), code 21 words 1
        // and 2 (bits 63..66).
        let mut codes = vec![0u8; 32];
        codes[0] = 5;
        codes[10] = 0b110;
        codes[21] = 0b011;
        codes[31] = 7;
        let w = pack_codes(&codes, 3).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], 5 | (0b10 << 30));
        assert_eq!(w[1], 0b1 | (0b1 << 31));
        assert_eq!(w[2], 0b1 | (7 << 29));
        assert_eq!(unpack_codes(&w, 3).unwrap(), codes);
        assert_eq!(codes_per_pack(3), 32);
        assert_eq!(codes_per_pack(6), 16);
        assert_eq!(codes_per_pack(4), 8);
        assert_eq!(packed_words(32, 3), 3);
        let e = pack_codes(&[1; 16], 3).unwrap_err();
        assert!(e.to_string().contains("multiple of 32"), "{e}");
    }
}
