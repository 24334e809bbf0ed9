//! Quantization error of a layout on captured q/k/v: replays a decode stream of a reference-format file through
//! [`RefCache`] with any layout and compares each step's attention output with the exact, unquantized attention
//! the file holds (`step_out_fp32_unquantized`). Also an FP8 (e4m3, per-head scale) cache as a comparison row.
//! This is what `kivi eval` prints, so a user can pick bits and groups for their model.
//!
//! A layout of bf16 activations runs on the captures rounded to bf16 and is compared with exact attention over
//! those same rounded inputs (computed here, in f64), so that its row measures the cache's error, as the fp16
//! rows do, and not the rounding of the captures.

use half::{bf16, f16};
use kivi_dsl::{Dtype, Layout};

use crate::cache::{attention_f32, RefCache};
use crate::dtype::{from_f16s, to_f32s, Activation};
use crate::error::RefError;
use crate::files::StreamCase;

/// How far one stream's outputs are from exact attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalError {
    /// Relative L2 error over the whole stream: ||ours - exact|| / ||exact|| over every step, head and channel.
    pub stream: f64,
    /// The worst relative L2 error of one (batch, head, step) output.
    pub worst_step: f64,
    /// Sum of squared errors (to pool streams: sqrt(sum err2 / sum ref2)).
    pub err2: f64,
    /// Sum of squared exact outputs.
    pub ref2: f64,
}

impl EvalError {
    /// Pools several streams into one relative L2 error.
    pub fn pooled(items: &[EvalError]) -> f64 {
        let (e, r) = items
            .iter()
            .fold((0.0, 0.0), |a, x| (a.0 + x.err2, a.1 + x.ref2));
        if r > 0.0 {
            (e / r).sqrt()
        } else {
            0.0
        }
    }
}

fn exact_of(case: &StreamCase) -> Result<&[f32], RefError> {
    let expected = case.batch * case.heads * case.steps * case.head_dim;
    if case.step_out_unquantized.len() != expected {
        return Err(RefError::Invalid(format!(
            "{}: the file has no step_out_fp32_unquantized [B, H, S, D] (exact attention) to compare with",
            case.name
        )));
    }
    Ok(&case.step_out_unquantized)
}

/// Accumulates one step's outputs (`[B, H, D]`) against the exact ones.
fn compare_step(case: &StreamCase, exact: &[f32], step: usize, out: &[f32], acc: &mut EvalError) {
    let (h, s, d) = (case.heads, case.steps, case.head_dim);
    for bh in 0..case.batch * h {
        let (mut e, mut r) = (0.0f64, 0.0f64);
        for di in 0..d {
            let x = f64::from(exact[(bh * s + step) * d + di]);
            let o = f64::from(out[bh * d + di]);
            e += (o - x) * (o - x);
            r += x * x;
        }
        acc.err2 += e;
        acc.ref2 += r;
        let rel = if r > 0.0 { (e / r).sqrt() } else { e.sqrt() };
        acc.worst_step = acc.worst_step.max(rel);
    }
}

fn finish(mut acc: EvalError) -> EvalError {
    acc.stream = if acc.ref2 > 0.0 {
        (acc.err2 / acc.ref2).sqrt()
    } else {
        0.0
    };
    acc
}

/// Replays `case`'s prefill and decode steps through [`RefCache`] with `layout` (its heads and head_dim must be
/// the case's) and measures the outputs against exact attention.
///
/// # Errors
/// [`RefError`] if the layout does not fit the case or the reference does not run it, or the file has no exact
/// outputs.
pub fn eval_layout(case: &StreamCase, layout: &Layout) -> Result<EvalError, RefError> {
    let exact = exact_of(case)?;
    if (
        layout.num_heads as usize,
        layout.num_kv_heads as usize,
        layout.keys.head_dim as usize,
        layout.values.head_dim as usize,
    ) != (case.heads, case.kv_heads, case.head_dim, case.head_dim)
    {
        return Err(RefError::Invalid(format!(
            "{}: the layout has {} heads, {} KV heads and head_dim {} (keys) and {} (values); the file {}, {} and {} \
             (both)",
            case.name,
            layout.num_heads,
            layout.num_kv_heads,
            layout.keys.head_dim,
            layout.values.head_dim,
            case.heads,
            case.kv_heads,
            case.head_dim
        )));
    }
    match layout.dtype {
        Dtype::F16 => replay::<f16>(case, layout, exact),
        Dtype::Bf16 => replay::<bf16>(case, layout, &exact_attention::<bf16>(case)?),
    }
}

/// The stream's prefill and steps through a cache of `layout` with the inputs as `T`, against `exact`.
fn replay<T: Activation>(
    case: &StreamCase,
    layout: &Layout,
    exact: &[f32],
) -> Result<EvalError, RefError> {
    let mut cache = RefCache::new(layout, case.batch)?;
    cache.prefill(
        &from_f16s::<T>(&case.prefill_k),
        &from_f16s::<T>(&case.prefill_v),
        case.prefill,
    )?;
    let mut acc = EvalError {
        stream: 0.0,
        worst_step: 0.0,
        err2: 0.0,
        ref2: 0.0,
    };
    for step in 0..case.steps {
        let (q, k, v) = case.step_inputs(step)?;
        let out = cache.decode_step(
            &from_f16s::<T>(&q),
            &from_f16s::<T>(&k),
            &from_f16s::<T>(&v),
        )?;
        compare_step(case, exact, step, &out, &mut acc);
    }
    Ok(finish(acc))
}

/// Row `t` of one (batch, KV head)'s keys or values over the whole stream (prefill, then steps), as f32.
fn token_row(case: &StreamCase, pre: &[f16], stp: &[f16], bk: usize, t: usize) -> Vec<f32> {
    let (p, s, d) = (case.prefill, case.steps, case.head_dim);
    let row = if t < p {
        &pre[(bk * p + t) * d..(bk * p + t + 1) * d]
    } else {
        &stp[(bk * s + t - p) * d..(bk * s + t - p + 1) * d]
    };
    to_f32s(row)
}

/// Exact attention `[B, H, S, D]` (f64, returned as f32) of every step over the stream's q/k/v rounded to `T`: the
/// file's `step_out_fp32_unquantized` recomputed for inputs of another dtype.
fn exact_attention<T: Activation>(case: &StreamCase) -> Result<Vec<f32>, RefError> {
    let (b, h, hkv, d, p, s) = (
        case.batch,
        case.heads,
        case.kv_heads,
        case.head_dim,
        case.prefill,
        case.steps,
    );
    let round =
        |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| T::from_f32(v).to_f32()).collect() };
    let group = h / hkv.max(1);
    let mut out = vec![0f32; b * h * s * d];
    for bk in 0..b * hkv {
        let keys = round(
            (0..p + s)
                .flat_map(|t| token_row(case, &case.prefill_k, &case.step_k, bk, t))
                .collect(),
        );
        let values = round(
            (0..p + s)
                .flat_map(|t| token_row(case, &case.prefill_v, &case.step_v, bk, t))
                .collect(),
        );
        for step in 0..s {
            let (q, _, _) = case.step_inputs(step)?;
            let len = p + step + 1;
            for hi in (bk % hkv) * group..(bk % hkv + 1) * group {
                let bh = (bk / hkv) * h + hi;
                let qf = round(to_f32s(&q[bh * d..(bh + 1) * d]));
                let o = attention_f32(&qf, &keys[..len * d], &values[..len * d], d)?;
                out[(bh * s + step) * d..(bh * s + step + 1) * d].copy_from_slice(&o);
            }
        }
    }
    Ok(out)
}

/// Rounds to the nearest FP8 e4m3 number (OCP "E4M3FN": 4 exponent bits, bias 7, 3 mantissa bits, max 448,
/// subnormals down to 2^-9, ties to even); values beyond 448 saturate. NaN stays NaN.
pub fn round_e4m3(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs().min(448.0);
    if a == 0.0 {
        return 0.0f32.copysign(x);
    }
    // The spacing at a: 2^(e - 3) for normal numbers (e = floor(log2 a) >= -6), 2^-9 below.
    let e = a.log2().floor().max(-6.0);
    let step = (e - 3.0).exp2();
    let q = (a / step).round_ties_even() * step;
    q.min(448.0).copysign(x)
}

/// The same stream with keys and values stored as FP8 e4m3, one scale per (batch, KV head): amax / 448 over the
/// whole stream (prefill and every step: the most favourable static scale a cache could have chosen), attention
/// exact in f64 over the dequantized cache.
///
/// # Errors
/// As [`eval_layout`] (no exact outputs in the file, inconsistent lengths).
pub fn eval_fp8(case: &StreamCase) -> Result<EvalError, RefError> {
    let exact = exact_of(case)?;
    let (b, h, hkv, d, p, s) = (
        case.batch,
        case.heads,
        case.kv_heads,
        case.head_dim,
        case.prefill,
        case.steps,
    );
    let group = h / hkv.max(1);
    let mut acc = EvalError {
        stream: 0.0,
        worst_step: 0.0,
        err2: 0.0,
        ref2: 0.0,
    };
    // Per (batch, KV head): the dequantized keys and values of all P + S tokens, [P + S][D].
    let mut keys = Vec::with_capacity(b * hkv);
    let mut values = Vec::with_capacity(b * hkv);
    for bk in 0..b * hkv {
        for (pre, stp, out) in [
            (&case.prefill_k, &case.step_k, &mut keys),
            (&case.prefill_v, &case.step_v, &mut values),
        ] {
            let rows: Vec<f32> = (0..p + s)
                .flat_map(|t| token_row(case, pre, stp, bk, t))
                .collect();
            let amax = rows.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let scale = if amax > 0.0 { amax / 448.0 } else { 1.0 };
            out.push(
                rows.iter()
                    .map(|&x| round_e4m3(x / scale) * scale)
                    .collect::<Vec<f32>>(),
            );
        }
    }
    for step in 0..s {
        let (q, _, _) = case.step_inputs(step)?;
        let len = p + step + 1;
        let mut out = vec![0f32; b * h * d];
        for bi in 0..b {
            for hi in 0..h {
                let bk = bi * hkv + hi / group;
                let qf: Vec<f32> = q[(bi * h + hi) * d..(bi * h + hi + 1) * d]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let o = attention_f32(&qf, &keys[bk][..len * d], &values[bk][..len * d], d)?;
                out[(bi * h + hi) * d..(bi * h + hi + 1) * d].copy_from_slice(&o);
            }
        }
        compare_step(case, exact, step, &out, &mut acc);
    }
    Ok(finish(acc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_rounding_follows_the_format() {
        for (x, want) in [
            (0.0, 0.0),
            (1.0, 1.0),
            (1.0625, 1.0),  // halfway between 1 and 1.125: ties to even
            (1.1875, 1.25), // halfway between 1.125 and 1.25: to even (1.25)
            (448.0, 448.0),
            (1000.0, 448.0), // saturates
            (-3.3, -3.25),
            (0.001953125, 0.001953125), // 2^-9, the smallest subnormal
            (0.0009, 0.0),
        ] {
            assert_eq!(round_e4m3(x), want, "{x}");
        }
        assert!(round_e4m3(f32::NAN).is_nan());
    }

    /// The exact baseline a bf16 layout is compared with is computed like the file's own: for fp16 inputs the
    /// recomputation (f64) agrees with the file's `step_out_fp32_unquantized` (fp32 attention on the H200, 1.4e-4
    /// apart: the file's own GPU arithmetic), and rounding the captures to bf16 moves it by about bf16's
    /// precision, far more.
    #[test]
    fn exact_attention_recomputes_the_files_exact_outputs() {
        let path = crate::data_dir().join("real_kv_smollm2_135m.safetensors");
        if !path.exists() {
            eprintln!("SKIPPED: {} not found", path.display());
            return;
        }
        let file = crate::ReferenceFile::open(&path).unwrap();
        let case = file
            .stream_cases
            .iter()
            .find(|c| !c.step_out_unquantized.is_empty())
            .unwrap();
        let rel = |a: &[f32], b: &[f32]| {
            let e: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
            let r: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            (e / r).sqrt()
        };
        let ours = exact_attention::<f16>(case).unwrap();
        let vs_file = rel(&ours, &case.step_out_unquantized);
        assert!(vs_file < 5e-4, "{vs_file}");
        let moved = rel(&exact_attention::<bf16>(case).unwrap(), &ours);
        assert!(moved > 4.0 * vs_file && moved < 2e-2, "{moved}");
    }

    #[test]
    fn pooling_weights_streams_by_their_energy() {
        let a = EvalError {
            stream: 0.0,
            worst_step: 0.0,
            err2: 1.0,
            ref2: 100.0,
        };
        let b = EvalError {
            stream: 0.0,
            worst_step: 0.0,
            err2: 3.0,
            ref2: 300.0,
        };
        assert!((EvalError::pooled(&[a, b]) - 0.1).abs() < 1e-12);
        assert_eq!(EvalError::pooled(&[]), 0.0);
    }
}
