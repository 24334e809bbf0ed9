//! [`RefCache`]: KIVI's streaming KV cache (Algorithm 1 of Liu et al., ICML 2024, as the paper's reference code
//! implements it), and exact attention helpers.
//!
//! Keys are quantized per channel in blocks of R (`residual_length`) tokens; values per token, oldest first,
//! keeping the newest R in fp16. A decode step appends the new key and value, attends over
//! `[dequantized keys, fp16 keys]` and `[dequantized values, fp16 values]`, then flushes.
//!
//! The attention is computed in f64 (dot products, softmax with the max subtracted, weighted sum) on the exact
//! f32 dequantized values and the fp16 residuals, and returned as f32: this is the oracle, free of the
//! reference's own fp16 rounding of scores and weights (which costs it about 1.5e-3 relative error).

use kivi_dsl::{Dtype, Layout, QuantAxis, ScaleDtype};

use crate::dtype::{to_f32s, Activation, Format};
use crate::error::RefError;
use crate::quant::{
    check_mode, codes_per_pack, dequantize_keys_per_channel, dequantize_values_per_token,
    quantize_per_channel, quantize_per_token, GroupQuant, QuantizedKeys,
};

/// How one tensor (keys or values) is quantized, and so when it flushes.
#[derive(Clone, Copy, Debug)]
struct TensorSpec {
    bits: u32,
    /// Group size in elements along the axis.
    group: usize,
    mode: GroupQuant,
    axis: QuantAxis,
    /// This tensor's head_dim.
    d: usize,
}

impl TensorSpec {
    /// Tokens quantized (after the sinks) once `n` tokens have gone through Algorithm 1: per-channel tensors
    /// whole blocks of R (the paper's keys), per-token tensors all but the newest R (the paper's values).
    fn quantized(&self, n: usize, r: usize) -> usize {
        match self.axis {
            QuantAxis::PerChannel => n / r * r,
            QuantAxis::PerToken => n.saturating_sub(r),
        }
    }
}

/// One tensor of one (batch, KV head): its quantized part, full-precision residual and sinks. Every value is
/// held as f32, exactly (activations of the layout's dtype; scales and mins of the tensor's scale dtype).
#[derive(Clone, Debug, Default)]
struct Stream {
    /// Per-channel: the quantized blocks of R tokens, oldest first.
    blocks: Vec<QuantizedKeys>,
    /// Per-token: packed codes `[nq, ceil(D * bits / 32)]` (a run per token).
    codes: Vec<u32>,
    /// Per-token: scales `[nq, D/G]`.
    scale: Vec<f32>,
    /// Per-token: mins `[nq, D/G]`.
    mn: Vec<f32>,
    /// The dequantized tokens, `[nq, D]`.
    deq: Vec<f32>,
    /// Full-precision (residual) tokens, `[nr, D]`.
    res: Vec<f32>,
    /// The sink tokens, `[min(len, S), D]` (never quantized).
    sink: Vec<f32>,
}

impl Stream {
    /// Quantizes the oldest `n` residual tokens (per-channel: `n` is R, one block).
    fn flush(&mut self, t: &TensorSpec, act: Format, n: usize) {
        let x: Vec<f32> = self.res.drain(..n * t.d).collect();
        match t.axis {
            QuantAxis::PerChannel => {
                let q = quantize_per_channel(&x, act, n, t.d, t.bits, t.group, t.mode);
                self.deq
                    .extend(dequantize_keys_per_channel(&q).expect("dims validated in new()"));
                self.blocks.push(q);
            }
            QuantAxis::PerToken => {
                let q = quantize_per_token(&x, act, n, t.d, t.bits, t.group, t.mode);
                self.deq
                    .extend(dequantize_values_per_token(&q).expect("dims validated in new()"));
                self.codes.extend(q.codes);
                self.scale.extend(q.scale);
                self.mn.extend(q.mn);
            }
        }
    }

    /// Appends this stream's quantized part to an export in its axis's layout (see [`CacheExport`]).
    fn export_quantized(
        &self,
        d: usize,
        code: &mut Vec<i32>,
        scale: &mut Vec<f32>,
        mn: &mut Vec<f32>,
    ) {
        if self.blocks.is_empty() {
            code.extend(self.codes.iter().map(|&w| w as i32));
            scale.extend_from_slice(&self.scale);
            mn.extend_from_slice(&self.mn);
            return;
        }
        for ch in 0..d {
            for blk in &self.blocks {
                let (wpc, gpc) = (blk.codes.len() / d, blk.scale.len() / d);
                code.extend(
                    blk.codes[ch * wpc..(ch + 1) * wpc]
                        .iter()
                        .map(|&w| w as i32),
                );
                scale.extend_from_slice(&blk.scale[ch * gpc..(ch + 1) * gpc]);
                mn.extend_from_slice(&blk.mn[ch * gpc..(ch + 1) * gpc]);
            }
        }
    }
}

/// The cache of one (batch, KV head).
#[derive(Clone, Debug, Default)]
struct HeadCache {
    k: Stream,
    v: Stream,
}

/// The reference KIVI cache for `batch` sequences x `num_kv_heads` KV heads (Algorithm 1).
///
/// Supports every layout kivi-dsl validates: 1 to 8 bits (codes packed as one bit stream, see [`crate::quant`]),
/// either rounding, asymmetric or symmetric (from 2 bits), fp16, bf16 or fp32 scales, fp16 or bf16 activations
/// (the inputs' type, [`Activation`], must be the layout's dtype), either axis for either tensor, and sink
/// tokens: the first `sink_tokens` tokens of a sequence stay in full precision for good and Algorithm 1 runs on
/// the tokens after them (its residual counts and flush points start at the first non-sink token).
///
/// The flush rule follows a tensor's axis, as in the paper: a per-channel tensor (the paper's keys) quantizes R
/// tokens at a time once R full-precision tokens exist (its groups run along tokens, so they must be complete);
/// a per-token tensor (the paper's values) quantizes its oldest token once R + 1 exist. GQA: query head `h`
/// reads KV head `h / (num_heads / num_kv_heads)`. Keys (and queries) and values (and outputs) may have
/// different head_dims, Dk and Dv; scores are scaled by 1 / sqrt(Dk).
#[derive(Clone, Debug)]
pub struct RefCache {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    r: usize,
    /// The activation dtype (inputs, residuals, sinks).
    dtype: Dtype,
    keys: TensorSpec,
    values: TensorSpec,
    sinks: usize,
    len: usize,
    nqk: usize,
    nqv: usize,
    caches: Vec<HeadCache>,
}

/// A snapshot of a [`RefCache`] in the reference files' layouts (`final_*` tensors of
/// `kivi_decode_streams.safetensors`). All tensors row-major; `nqk`/`nrk` are quantized/full-precision key
/// counts, `nqv`/`nrv` the same for values, `G` the group size; packed codes are bit streams of `bits` bits per
/// code (`n * bits / 32` words for `n` codes, per-token codes padded per token; see [`crate::quant`]). D is
/// `head_dim` in key tensors and `value_head_dim` in value tensors.
///
/// A tensor's quantized part is laid out by its axis: per-channel (the paper's keys) `codes [B, Hkv, D,
/// nq * bits / 32]`, `scales [B, Hkv, D, nq / G]`; per-token (the paper's values) `codes [B, Hkv, nq,
/// ceil(D * bits / 32)]`, `scales [B, Hkv, nq, D / G]`. Scales and mins are numbers of the tensor's scale dtype,
/// residuals and sinks numbers of the activation dtype, all held exactly as f32 (compare them by bits, with any
/// two NaNs equal: [`crate::TensorDiff::values`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheExport {
    /// Batch B.
    pub batch: usize,
    /// KV heads Hkv.
    pub kv_heads: usize,
    /// Head dim D of keys (the D of the key tensors below).
    pub head_dim: usize,
    /// Head dim of values (the D of the value tensors below; equal to `head_dim` unless the layout differs).
    pub value_head_dim: usize,
    /// The activation dtype of the residuals and sinks.
    pub dtype: Dtype,
    /// Key bits.
    pub k_bits: u32,
    /// Value bits.
    pub v_bits: u32,
    /// Key group size (tokens per-channel, head-dim entries per-token).
    pub k_group: usize,
    /// Value group size (head-dim entries per-token, tokens per-channel).
    pub v_group: usize,
    /// The keys' axis (the layout of `k_code`, `k_scale`, `k_mn`).
    pub k_axis: QuantAxis,
    /// The values' axis.
    pub v_axis: QuantAxis,
    /// The keys' scale dtype.
    pub k_scale_dtype: ScaleDtype,
    /// The values' scale dtype.
    pub v_scale_dtype: ScaleDtype,
    /// Tokens in the cache (sink tokens included).
    pub len: usize,
    /// Sink tokens held (full precision, never quantized): `min(len, sink_tokens)`.
    pub sink_tokens: usize,
    /// Sink keys `[B, Hkv, sink_tokens, D]`.
    pub k_sink: Vec<f32>,
    /// Sink values `[B, Hkv, sink_tokens, D]`.
    pub v_sink: Vec<f32>,
    /// Quantized keys `nqk`.
    pub quantized_keys: usize,
    /// Full-precision keys `nrk`.
    pub residual_keys: usize,
    /// Quantized values `nqv`.
    pub quantized_values: usize,
    /// Full-precision values `nrv`.
    pub residual_values: usize,
    /// Key codes (u32 words as i32): `[B, Hkv, D, nqk * bits / 32]` per-channel.
    pub k_code: Vec<i32>,
    /// Key scales: `[B, Hkv, D, nqk/G]` per-channel.
    pub k_scale: Vec<f32>,
    /// Key mins, as `k_scale`.
    pub k_mn: Vec<f32>,
    /// Full-precision keys `[B, Hkv, nrk, D]`.
    pub k_residual: Vec<f32>,
    /// Value codes (u32 words as i32): `[B, Hkv, nqv, ceil(D * bits / 32)]` per-token (a zero-padded bit stream
    /// per token).
    pub v_code: Vec<i32>,
    /// Value scales: `[B, Hkv, nqv, D/G]` per-token.
    pub v_scale: Vec<f32>,
    /// Value mins, as `v_scale`.
    pub v_mn: Vec<f32>,
    /// Full-precision values `[B, Hkv, nrv, D]`.
    pub v_residual: Vec<f32>,
}

impl Default for CacheExport {
    /// An empty export of the paper's layout (fp16, keys per-channel, values per-token).
    fn default() -> Self {
        CacheExport {
            batch: 0,
            kv_heads: 0,
            head_dim: 0,
            value_head_dim: 0,
            dtype: Dtype::F16,
            k_bits: 0,
            v_bits: 0,
            k_group: 0,
            v_group: 0,
            k_axis: QuantAxis::PerChannel,
            v_axis: QuantAxis::PerToken,
            k_scale_dtype: ScaleDtype::F16,
            v_scale_dtype: ScaleDtype::F16,
            len: 0,
            sink_tokens: 0,
            k_sink: Vec::new(),
            v_sink: Vec::new(),
            quantized_keys: 0,
            residual_keys: 0,
            quantized_values: 0,
            residual_values: 0,
            k_code: Vec::new(),
            k_scale: Vec::new(),
            k_mn: Vec::new(),
            k_residual: Vec::new(),
            v_code: Vec::new(),
            v_scale: Vec::new(),
            v_mn: Vec::new(),
            v_residual: Vec::new(),
        }
    }
}

/// Attention of one query (`[dk]`) over keys (segments of `[n_i, dk]`) and values (`[n_i, dv]`), row-major f32,
/// in f64; scores scaled by 1 / sqrt(dk). Returns `[dv]`.
fn attend(q: &[f32], keys: &[&[f32]], values: &[&[f32]], dk: usize, dv: usize) -> Vec<f32> {
    let scale = 1.0 / (dk as f64).sqrt();
    let qd: Vec<f64> = q.iter().map(|&x| f64::from(x)).collect();
    let mut scores = Vec::new();
    for seg in keys {
        for k in seg.chunks(dk) {
            let s: f64 = qd.iter().zip(k).map(|(a, &b)| a * f64::from(b)).sum();
            scores.push(s * scale);
        }
    }
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let m = if scores.iter().any(|s| s.is_nan()) {
        f64::NAN
    } else {
        m
    };
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - m).exp();
        sum += *s;
    }
    let mut out = vec![0f64; dv];
    let mut t = 0;
    for seg in values {
        for v in seg.chunks(dv) {
            let w = scores[t];
            t += 1;
            for (o, &x) in out.iter_mut().zip(v) {
                *o += w * f64::from(x);
            }
        }
    }
    out.iter().map(|o| (o / sum) as f32).collect()
}

fn check_attention_args(q: usize, k: usize, v: usize, head_dim: usize) -> Result<(), RefError> {
    if head_dim == 0 {
        return Err(RefError::Invalid("head_dim must be positive".into()));
    }
    if q != head_dim {
        return Err(RefError::shape("query [D]", head_dim, q));
    }
    if k == 0 || !k.is_multiple_of(head_dim) {
        return Err(RefError::Invalid(format!(
            "keys: {k} elements is not a positive multiple of D={head_dim}"
        )));
    }
    if v != k {
        return Err(RefError::shape("values [T, D]", k, v));
    }
    Ok(())
}

/// Exact (unquantized) attention of one query against fp16 or bf16 keys and values:
/// `softmax(q . k_t / sqrt(D)) x v`, computed in f64, returned as `[D]` f32.
///
/// `q` is `[D]`, `k` and `v` are `[T, D]` row-major, T >= 1.
///
/// # Errors
/// [`RefError::Shape`] / [`RefError::Invalid`] for inconsistent lengths, T = 0 or D = 0.
pub fn attention_exact<T: Activation>(
    q: &[T],
    k: &[T],
    v: &[T],
    head_dim: usize,
) -> Result<Vec<f32>, RefError> {
    check_attention_args(q.len(), k.len(), v.len(), head_dim)?;
    let (k, v) = (to_f32s(k), to_f32s(v));
    Ok(attend(&to_f32s(q), &[&k], &[&v], head_dim, head_dim))
}

/// [`attention_exact`] on f32 inputs (e.g. dequantized keys and values from [`RefCache::effective_kv`]):
/// `q` `[D]`, `k`, `v` `[T, D]`; f64 arithmetic, `[D]` f32 output.
///
/// # Errors
/// As [`attention_exact`].
pub fn attention_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    head_dim: usize,
) -> Result<Vec<f32>, RefError> {
    check_attention_args(q.len(), k.len(), v.len(), head_dim)?;
    Ok(attend(q, &[k], &[v], head_dim, head_dim))
}

impl RefCache {
    /// An empty cache for `layout` and `batch` sequences.
    ///
    /// # Errors
    /// [`RefError::Unsupported`] for bits outside 1 to 8 or symmetric 1-bit; per-channel groups (keys by default)
    /// that do not divide R, or R not a multiple of [`codes_per_pack`]`(bits)` of a per-channel tensor; per-token
    /// groups (values by default) that do not divide that tensor's head_dim (a token's codes are packed in whole
    /// words, the last zero-padded); [`RefError::Invalid`] for zero sizes or `num_heads` not a multiple of
    /// `num_kv_heads`.
    pub fn new(layout: &Layout, batch: usize) -> Result<Self, RefError> {
        let r = layout.residual_length as usize;
        let (heads, kv_heads) = (layout.num_heads as usize, layout.num_kv_heads as usize);
        let (dk, dv) = (
            layout.keys.head_dim as usize,
            layout.values.head_dim as usize,
        );
        if dk == 0 || dv == 0 || r == 0 || heads == 0 || kv_heads == 0 || batch == 0 {
            return Err(RefError::Invalid(format!(
                "sizes must be positive: head_dim {dk} (keys) and {dv} (values), residual_length {r}, num_heads {heads}, \
                 num_kv_heads {kv_heads}, batch {batch}"
            )));
        }
        if heads % kv_heads != 0 {
            return Err(RefError::Invalid(format!(
                "num_heads {heads} not a multiple of num_kv_heads {kv_heads}"
            )));
        }
        let spec = |name: &str, t: &kivi_dsl::TensorQuant| -> Result<TensorSpec, RefError> {
            let mode = GroupQuant::of(t);
            check_mode(t.bits, mode)?;
            let (d, group) = (
                t.head_dim as usize,
                t.group_elems(layout.residual_length) as usize,
            );
            match t.axis {
                QuantAxis::PerChannel => {
                    let unit = codes_per_pack(t.bits);
                    if group == 0 || !r.is_multiple_of(group) || !r.is_multiple_of(unit) {
                        return Err(RefError::unsupported(format!(
                            "residual_length {r} not a multiple of the per-channel {name} group {group} and of \
                             {unit} (the {}-bit codes that fill whole words)",
                            t.bits
                        )));
                    }
                }
                QuantAxis::PerToken => {
                    if group == 0 || !d.is_multiple_of(group) {
                        return Err(RefError::unsupported(format!(
                            "{name}' head_dim {d} not a multiple of the per-token {name} group {group}"
                        )));
                    }
                }
            }
            Ok(TensorSpec {
                bits: t.bits,
                group,
                mode,
                axis: t.axis,
                d,
            })
        };
        let keys = spec("keys", &layout.keys)?;
        let values = spec("values", &layout.values)?;
        Ok(RefCache {
            batch,
            heads,
            kv_heads,
            r,
            dtype: layout.dtype,
            keys,
            values,
            sinks: layout.sink_tokens as usize,
            len: 0,
            nqk: 0,
            nqv: 0,
            caches: vec![HeadCache::default(); batch * kv_heads],
        })
    }

    /// Tokens in the cache (prefill plus decode steps).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token has been added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The activation dtype the inputs must have.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Quantized keys per (batch, KV head): a multiple of R for per-channel keys (the paper's).
    pub fn quantized_keys(&self) -> usize {
        self.nqk
    }

    /// Quantized values per (batch, KV head).
    pub fn quantized_values(&self) -> usize {
        self.nqv
    }

    /// Sink tokens held per (batch, KV head): `min(len, sink_tokens)`.
    pub fn sink_tokens(&self) -> usize {
        self.len.min(self.sinks)
    }

    /// Full-precision (residual) keys per (batch, KV head): `len - sink_tokens - quantized_keys` (per-channel: in
    /// `0..R`; per-token: at most R).
    pub fn residual_keys(&self) -> usize {
        self.len - self.sink_tokens() - self.nqk
    }

    /// Full-precision (residual) values per (batch, KV head): `len - sink_tokens - quantized_values` (per-token:
    /// at most R; per-channel: in `0..R`).
    pub fn residual_values(&self) -> usize {
        self.len - self.sink_tokens() - self.nqv
    }

    fn check_dtype<T: Activation>(&self, what: &str) -> Result<(), RefError> {
        if T::DTYPE != self.dtype {
            return Err(RefError::Invalid(format!(
                "{what}: {} inputs for a layout of {} activations",
                T::DTYPE.as_str(),
                self.dtype.as_str()
            )));
        }
        Ok(())
    }

    /// Prefill an empty cache with `len` tokens: `k` is `[B, Hkv, len, Dk]`, `v` `[B, Hkv, len, Dv]`, row-major,
    /// of the layout's activation dtype (`f16` or `bf16`).
    ///
    /// The first `min(len, S)` tokens are sinks (full precision). Of the `n = len - sinks` others, a per-channel
    /// tensor (the paper's keys) quantizes the first `n - n mod R` (none if `n < R`) and keeps the rest; a
    /// per-token tensor (the paper's values) quantizes all but the newest R (none if `n <= R`). No attention is
    /// computed.
    ///
    /// # Errors
    /// [`RefError::Shape`] if `k` is not `B * Hkv * len * Dk` long or `v` not `B * Hkv * len * Dv`;
    /// [`RefError::Invalid`] if the cache is not empty or `T` is not the layout's dtype.
    pub fn prefill<T: Activation>(&mut self, k: &[T], v: &[T], len: usize) -> Result<(), RefError> {
        self.check_dtype::<T>("prefill")?;
        if self.len != 0 {
            return Err(RefError::Invalid(format!(
                "prefill on a cache already holding {} tokens",
                self.len
            )));
        }
        let (b, hkv, dk, dv) = (self.batch, self.kv_heads, self.keys.d, self.values.d);
        let (nk, nv) = (b * hkv * len * dk, b * hkv * len * dv);
        if k.len() != nk {
            return Err(RefError::shape(
                format!("prefill keys [B={b}, Hkv={hkv}, len={len}, D={dk}]"),
                nk,
                k.len(),
            ));
        }
        if v.len() != nv {
            return Err(RefError::shape(
                format!("prefill values [B={b}, Hkv={hkv}, len={len}, D={dv}]"),
                nv,
                v.len(),
            ));
        }
        let sinks = len.min(self.sinks);
        let n = len - sinks;
        let r = self.r;
        let (nqk, nqv) = (self.keys.quantized(n, r), self.values.quantized(n, r));
        let act = Format::from(self.dtype);
        for (i, c) in self.caches.iter_mut().enumerate() {
            for (x, st, t, nq) in [
                (
                    &k[i * len * dk..(i + 1) * len * dk],
                    &mut c.k,
                    &self.keys,
                    nqk,
                ),
                (
                    &v[i * len * dv..(i + 1) * len * dv],
                    &mut c.v,
                    &self.values,
                    nqv,
                ),
            ] {
                let x = to_f32s(x);
                st.sink.extend_from_slice(&x[..sinks * t.d]);
                st.res.extend_from_slice(&x[sinks * t.d..]);
                match t.axis {
                    QuantAxis::PerChannel => (0..nq / r).for_each(|_| st.flush(t, act, r)),
                    QuantAxis::PerToken if nq > 0 => st.flush(t, act, nq),
                    QuantAxis::PerToken => {}
                }
            }
        }
        self.len = len;
        self.nqk = nqk;
        self.nqv = nqv;
        Ok(())
    }

    /// One decode step: appends `k` (`[B, Hkv, Dk]`) and `v` (`[B, Hkv, Dv]`; as a sink token while the cache
    /// holds fewer than `sink_tokens`), computes attention of `q` (`[B, H, Dk]`) over all cached tokens including
    /// the new one, then flushes (a per-channel tensor its R full-precision tokens as one block once there are
    /// R; a per-token tensor its oldest full-precision token once there are R + 1). Inputs are of the layout's
    /// activation dtype. Returns the attention output `[B, H, Dv]` f32.
    ///
    /// Scores are `q . k / sqrt(Dk)` over `[sinks, dequantized keys, full-precision keys]`, softmax subtracts the
    /// max, output is the weighted sum of the values in the same order; all in f64. Works on an empty cache too.
    ///
    /// # Errors
    /// [`RefError::Shape`] for wrong lengths, [`RefError::Invalid`] if `T` is not the layout's dtype (the cache
    /// is left unchanged).
    pub fn decode_step<T: Activation>(
        &mut self,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Vec<f32>, RefError> {
        self.check_dtype::<T>("decode step")?;
        let (b, h, hkv, dk, dv) = (
            self.batch,
            self.heads,
            self.kv_heads,
            self.keys.d,
            self.values.d,
        );
        if q.len() != b * h * dk {
            return Err(RefError::shape(
                format!("decode query [B={b}, H={h}, D={dk}]"),
                b * h * dk,
                q.len(),
            ));
        }
        if k.len() != b * hkv * dk {
            return Err(RefError::shape(
                format!("decode key [B={b}, Hkv={hkv}, D={dk}]"),
                b * hkv * dk,
                k.len(),
            ));
        }
        if v.len() != b * hkv * dv {
            return Err(RefError::shape(
                format!("decode value [B={b}, Hkv={hkv}, D={dv}]"),
                b * hkv * dv,
                v.len(),
            ));
        }
        let sink = self.len < self.sinks;
        for (i, c) in self.caches.iter_mut().enumerate() {
            let (kt, vt) = (
                to_f32s(&k[i * dk..(i + 1) * dk]),
                to_f32s(&v[i * dv..(i + 1) * dv]),
            );
            if sink {
                c.k.sink.extend_from_slice(&kt);
                c.v.sink.extend_from_slice(&vt);
            } else {
                c.k.res.extend_from_slice(&kt);
                c.v.res.extend_from_slice(&vt);
            }
        }
        self.len += 1;
        let ratio = h / hkv;
        let mut out = vec![0f32; b * h * dv];
        for bi in 0..b {
            for kh in 0..hkv {
                let c = &self.caches[bi * hkv + kh];
                for qh in kh * ratio..(kh + 1) * ratio {
                    let (qo, o) = ((bi * h + qh) * dk, (bi * h + qh) * dv);
                    let qf = to_f32s(&q[qo..qo + dk]);
                    let a = attend(
                        &qf,
                        &[&c.k.sink, &c.k.deq, &c.k.res],
                        &[&c.v.sink, &c.v.deq, &c.v.res],
                        dk,
                        dv,
                    );
                    out[o..o + dv].copy_from_slice(&a);
                }
            }
        }
        if !sink {
            let (r, act) = (self.r, Format::from(self.dtype));
            let flush_of = |t: &TensorSpec, residual: usize| match t.axis {
                QuantAxis::PerChannel => (residual == r).then_some(r),
                QuantAxis::PerToken => (residual == r + 1).then_some(1),
            };
            let fk = flush_of(&self.keys, self.residual_keys());
            let fv = flush_of(&self.values, self.residual_values());
            for c in self.caches.iter_mut() {
                if let Some(n) = fk {
                    c.k.flush(&self.keys, act, n);
                }
                if let Some(n) = fv {
                    c.v.flush(&self.values, act, n);
                }
            }
            self.nqk += fk.unwrap_or(0);
            self.nqv += fv.unwrap_or(0);
        }
        Ok(out)
    }

    /// The keys and values attention sees for (`batch`, `kv_head`): `[len, Dk]` and `[len, Dv]` f32, in token
    /// order: the sink tokens, the dequantized part, then the full-precision residual.
    ///
    /// # Errors
    /// [`RefError::Invalid`] for an out-of-range batch or KV head index.
    pub fn effective_kv(
        &self,
        batch: usize,
        kv_head: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), RefError> {
        if batch >= self.batch || kv_head >= self.kv_heads {
            return Err(RefError::Invalid(format!(
                "(batch {batch}, kv head {kv_head}) out of range ({}, {})",
                self.batch, self.kv_heads
            )));
        }
        let c = &self.caches[batch * self.kv_heads + kv_head];
        let join = |s: &Stream| [s.sink.as_slice(), &s.deq, &s.res].concat();
        Ok((join(&c.k), join(&c.v)))
    }

    /// The cache in the reference files' layouts (see [`CacheExport`]).
    pub fn export(&self) -> CacheExport {
        let mut e = CacheExport {
            batch: self.batch,
            kv_heads: self.kv_heads,
            head_dim: self.keys.d,
            value_head_dim: self.values.d,
            dtype: self.dtype,
            k_bits: self.keys.bits,
            v_bits: self.values.bits,
            k_group: self.keys.group,
            v_group: self.values.group,
            k_axis: self.keys.axis,
            v_axis: self.values.axis,
            k_scale_dtype: self.keys.mode.scale_dtype,
            v_scale_dtype: self.values.mode.scale_dtype,
            len: self.len,
            sink_tokens: self.sink_tokens(),
            quantized_keys: self.nqk,
            residual_keys: self.residual_keys(),
            quantized_values: self.nqv,
            residual_values: self.residual_values(),
            ..CacheExport::default()
        };
        for c in &self.caches {
            c.k.export_quantized(self.keys.d, &mut e.k_code, &mut e.k_scale, &mut e.k_mn);
            c.v.export_quantized(self.values.d, &mut e.v_code, &mut e.v_scale, &mut e.v_mn);
            e.k_sink.extend_from_slice(&c.k.sink);
            e.v_sink.extend_from_slice(&c.v.sink);
            e.k_residual.extend_from_slice(&c.k.res);
            e.v_residual.extend_from_slice(&c.v.res);
        }
        e
    }
}
