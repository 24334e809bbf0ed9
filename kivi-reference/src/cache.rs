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

use half::f16;
use kivi_dsl::{Dtype, Layout, QuantAxis, ScaleDtype};

use crate::error::RefError;
use crate::quant::{
    check_mode, codes_per_pack, dequantize_keys_per_channel, dequantize_values_per_token,
    quantize_keys_per_channel_with, quantize_values_per_token_with, GroupQuant, QuantizedKeys,
};

/// How one tensor is quantized: bits, group size (elements), rounding mode and symmetry.
type Quant = (u32, usize, GroupQuant);

/// The cache of one (batch, KV head).
#[derive(Clone, Debug, Default)]
struct HeadCache {
    /// Quantized key blocks of R tokens each, oldest first.
    k_blocks: Vec<QuantizedKeys>,
    /// The dequantized keys, `[nqk, Dk]` f32 (Dk: the keys' head_dim, Dv: the values').
    k_deq: Vec<f32>,
    /// fp16 keys, `[nrk, Dk]`.
    k_res: Vec<f16>,
    /// Packed value codes `[nqv, ceil(Dv * bits / 32)]` (a run per token).
    v_code: Vec<u32>,
    /// Value scales `[nqv, Dv/G]`.
    v_scale: Vec<f16>,
    /// Value mins `[nqv, Dv/G]`.
    v_mn: Vec<f16>,
    /// The dequantized values, `[nqv, Dv]` f32.
    v_deq: Vec<f32>,
    /// fp16 values, `[nrv, Dv]`.
    v_res: Vec<f16>,
    /// The sink tokens' keys, `[min(len, S), Dk]` fp16 (never quantized).
    k_sink: Vec<f16>,
    /// The sink tokens' values, `[min(len, S), Dv]` fp16.
    v_sink: Vec<f16>,
}

/// The reference KIVI cache for `batch` sequences x `num_kv_heads` KV heads (Algorithm 1).
///
/// Supports the paper's configuration (keys per-channel, values per-token, asymmetric, fp16 scale and min, half
/// rounding, fp16 activations) at any width from 1 to 8 bits (codes packed as one bit stream, see
/// [`crate::quant`]), plus sink tokens: the first `sink_tokens` tokens of a sequence stay fp16 for good and
/// Algorithm 1 runs on the tokens after them (its residual counts and flush points start at the first non-sink
/// token). GQA: query head `h` reads KV head `h / (num_heads / num_kv_heads)`. Keys (and queries) and values (and
/// outputs) may have different head_dims, Dk and Dv; scores are scaled by 1 / sqrt(Dk).
#[derive(Clone, Debug)]
pub struct RefCache {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    /// Keys' (and queries') head_dim.
    dk: usize,
    /// Values' (and outputs') head_dim.
    dv: usize,
    r: usize,
    k_bits: u32,
    v_bits: u32,
    k_group: usize,
    v_group: usize,
    k_mode: GroupQuant,
    v_mode: GroupQuant,
    sinks: usize,
    len: usize,
    nqk: usize,
    nqv: usize,
    caches: Vec<HeadCache>,
}

/// A snapshot of a [`RefCache`] in the reference files' layouts (`final_*` tensors of
/// `kivi_decode_streams.safetensors`). All tensors row-major; `nqk`/`nrk` are quantized/fp16 key counts,
/// `nqv`/`nrv` the same for values, `G` the group size; packed codes are bit streams of `bits` bits per code
/// (`n * bits / 32` words for `n` codes, value codes padded per token; see [`crate::quant`]). D is `head_dim` in
/// key tensors and `value_head_dim` in value tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheExport {
    /// Batch B.
    pub batch: usize,
    /// KV heads Hkv.
    pub kv_heads: usize,
    /// Head dim D of keys (the D of the key tensors below).
    pub head_dim: usize,
    /// Head dim of values (the D of the value tensors below; equal to `head_dim` unless the layout differs).
    pub value_head_dim: usize,
    /// Key bits.
    pub k_bits: u32,
    /// Value bits.
    pub v_bits: u32,
    /// Key group size (tokens).
    pub k_group: usize,
    /// Value group size (head-dim entries).
    pub v_group: usize,
    /// Tokens in the cache (sink tokens included).
    pub len: usize,
    /// Sink tokens held (fp16, never quantized): `min(len, sink_tokens)`.
    pub sink_tokens: usize,
    /// Sink keys `[B, Hkv, sink_tokens, D]`.
    pub k_sink: Vec<f16>,
    /// Sink values `[B, Hkv, sink_tokens, D]`.
    pub v_sink: Vec<f16>,
    /// Quantized keys `nqk`.
    pub quantized_keys: usize,
    /// fp16 keys `nrk`.
    pub residual_keys: usize,
    /// Quantized values `nqv`.
    pub quantized_values: usize,
    /// fp16 values `nrv`.
    pub residual_values: usize,
    /// Key codes `[B, Hkv, D, nqk * bits / 32]` (u32 words as i32).
    pub k_code: Vec<i32>,
    /// Key scales `[B, Hkv, D, nqk/G]`.
    pub k_scale: Vec<f16>,
    /// Key mins `[B, Hkv, D, nqk/G]`.
    pub k_mn: Vec<f16>,
    /// fp16 keys `[B, Hkv, nrk, D]`.
    pub k_residual: Vec<f16>,
    /// Value codes `[B, Hkv, nqv, ceil(D * bits / 32)]` (u32 words as i32; a bit stream per token, zero-padded).
    pub v_code: Vec<i32>,
    /// Value scales `[B, Hkv, nqv, D/G]`.
    pub v_scale: Vec<f16>,
    /// Value mins `[B, Hkv, nqv, D/G]`.
    pub v_mn: Vec<f16>,
    /// fp16 values `[B, Hkv, nrv, D]`.
    pub v_residual: Vec<f16>,
}

fn f16s_to_f32(x: &[f16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
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

/// Exact (unquantized) attention of one query against fp16 keys and values:
/// `softmax(q . k_t / sqrt(D)) x v`, computed in f64, returned as `[D]` f32.
///
/// `q` is `[D]`, `k` and `v` are `[T, D]` row-major, T >= 1.
///
/// # Errors
/// [`RefError::Shape`] / [`RefError::Invalid`] for inconsistent lengths, T = 0 or D = 0.
pub fn attention_exact(
    q: &[f16],
    k: &[f16],
    v: &[f16],
    head_dim: usize,
) -> Result<Vec<f32>, RefError> {
    check_attention_args(q.len(), k.len(), v.len(), head_dim)?;
    let (k, v) = (f16s_to_f32(k), f16s_to_f32(v));
    Ok(attend(&f16s_to_f32(q), &[&k], &[&v], head_dim, head_dim))
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
    /// [`RefError::Unsupported`] for anything but keys per-channel / values per-token, fp16 scales, fp16
    /// activations, bits 1 to 8 (either rounding mode; asymmetric, or symmetric from 2 bits), a key group dividing R and R
    /// a multiple of [`codes_per_pack`]`(k_bits)`, a value group dividing head_dim (a token's value codes are
    /// packed in whole words, the last zero-padded);
    /// [`RefError::Invalid`] for zero sizes or `num_heads` not a multiple of `num_kv_heads`.
    pub fn new(layout: &Layout, batch: usize) -> Result<Self, RefError> {
        let (k, v) = (&layout.keys, &layout.values);
        if k.axis != QuantAxis::PerChannel {
            return Err(RefError::unsupported(
                "keys quantized per-token (only per-channel keys)",
            ));
        }
        if v.axis != QuantAxis::PerToken {
            return Err(RefError::unsupported(
                "values quantized per-channel (only per-token values)",
            ));
        }
        for (name, t) in [("keys", k), ("values", v)] {
            if t.scale_dtype != ScaleDtype::F16 {
                return Err(RefError::unsupported(format!(
                    "{} scales for {name}",
                    t.scale_dtype.as_str()
                )));
            }
            check_mode(
                t.bits,
                GroupQuant {
                    rounding: t.rounding,
                    symmetry: t.symmetry,
                },
            )?;
        }
        if layout.dtype != Dtype::F16 {
            return Err(RefError::unsupported(format!(
                "{} activations",
                layout.dtype.as_str()
            )));
        }
        let (dk, dv) = (k.head_dim as usize, v.head_dim as usize);
        let r = layout.residual_length as usize;
        let (heads, kv_heads) = (layout.num_heads as usize, layout.num_kv_heads as usize);
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
        let k_group = k.group_elems(layout.residual_length) as usize;
        let v_group = v.group_elems(layout.residual_length) as usize;
        let ku = codes_per_pack(k.bits);
        if k_group == 0 || !r.is_multiple_of(k_group) || !r.is_multiple_of(ku) {
            return Err(RefError::unsupported(format!(
                "residual_length {r} not a multiple of the key group {k_group} and of {ku} (the {}-bit codes \
                 that fill whole words)",
                k.bits
            )));
        }
        if v_group == 0 || !dv.is_multiple_of(v_group) {
            return Err(RefError::unsupported(format!(
                "values' head_dim {dv} not a multiple of the value group {v_group}"
            )));
        }
        Ok(RefCache {
            batch,
            heads,
            kv_heads,
            dk,
            dv,
            r,
            k_bits: k.bits,
            v_bits: v.bits,
            k_group,
            v_group,
            k_mode: GroupQuant {
                rounding: k.rounding,
                symmetry: k.symmetry,
            },
            v_mode: GroupQuant {
                rounding: v.rounding,
                symmetry: v.symmetry,
            },
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

    /// Quantized keys per (batch, KV head); always a multiple of R.
    pub fn quantized_keys(&self) -> usize {
        self.nqk
    }

    /// Quantized values per (batch, KV head).
    pub fn quantized_values(&self) -> usize {
        self.nqv
    }

    fn key_quant(&self) -> Quant {
        (self.k_bits, self.k_group, self.k_mode)
    }

    fn value_quant(&self) -> Quant {
        (self.v_bits, self.v_group, self.v_mode)
    }

    /// Sink tokens held per (batch, KV head): `min(len, sink_tokens)`.
    pub fn sink_tokens(&self) -> usize {
        self.len.min(self.sinks)
    }

    /// fp16 (residual) keys per (batch, KV head): `len - sink_tokens - quantized_keys`, in `0..R`.
    pub fn residual_keys(&self) -> usize {
        self.len - self.sink_tokens() - self.nqk
    }

    /// fp16 (residual) values per (batch, KV head): `len - sink_tokens - quantized_values`, at most R.
    pub fn residual_values(&self) -> usize {
        self.len - self.sink_tokens() - self.nqv
    }

    fn flush_keys(r: usize, d: usize, (bits, group, mode): Quant, c: &mut HeadCache) {
        let block: Vec<f16> = c.k_res.drain(..r * d).collect();
        let q = quantize_keys_per_channel_with(&block, r, d, bits, group, mode)
            .expect("dims validated in new()");
        c.k_deq
            .extend(dequantize_keys_per_channel(&q).expect("consistent"));
        c.k_blocks.push(q);
    }

    fn flush_values(n: usize, d: usize, (bits, group, mode): Quant, c: &mut HeadCache) {
        let vals: Vec<f16> = c.v_res.drain(..n * d).collect();
        let q = quantize_values_per_token_with(&vals, n, d, bits, group, mode)
            .expect("dims validated in new()");
        c.v_deq
            .extend(dequantize_values_per_token(&q).expect("consistent"));
        c.v_code.extend(q.codes);
        c.v_scale.extend(q.scale);
        c.v_mn.extend(q.mn);
    }

    /// Prefill an empty cache with `len` tokens: `k` is `[B, Hkv, len, Dk]`, `v` `[B, Hkv, len, Dv]`, row-major
    /// fp16.
    ///
    /// The first `min(len, S)` tokens are sinks (fp16). Of the `n = len - sinks` others: keys, the first
    /// `n - n mod R` are quantized (none if `n < R`), the rest stay fp16; values, all but the newest R are
    /// quantized (none if `n <= R`). No attention is computed.
    ///
    /// # Errors
    /// [`RefError::Shape`] if `k` is not `B * Hkv * len * Dk` long or `v` not `B * Hkv * len * Dv`;
    /// [`RefError::Invalid`] if the cache is not empty.
    pub fn prefill(&mut self, k: &[f16], v: &[f16], len: usize) -> Result<(), RefError> {
        if self.len != 0 {
            return Err(RefError::Invalid(format!(
                "prefill on a cache already holding {} tokens",
                self.len
            )));
        }
        let (b, hkv, dk, dv) = (self.batch, self.kv_heads, self.dk, self.dv);
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
        let nqk = n / self.r * self.r;
        let nqv = n.saturating_sub(self.r);
        let (r, kq, vq) = (self.r, self.key_quant(), self.value_quant());
        for (i, c) in self.caches.iter_mut().enumerate() {
            let ks = &k[i * len * dk..(i + 1) * len * dk];
            let vs = &v[i * len * dv..(i + 1) * len * dv];
            c.k_sink.extend_from_slice(&ks[..sinks * dk]);
            c.v_sink.extend_from_slice(&vs[..sinks * dv]);
            let (ks, vs) = (&ks[sinks * dk..], &vs[sinks * dv..]);
            c.k_res.extend_from_slice(ks);
            for _ in 0..nqk / r {
                Self::flush_keys(r, dk, kq, c);
            }
            c.v_res.extend_from_slice(vs);
            if nqv > 0 {
                Self::flush_values(nqv, dv, vq, c);
            }
        }
        self.len = len;
        self.nqk = nqk;
        self.nqv = nqv;
        Ok(())
    }

    /// One decode step: appends `k` (`[B, Hkv, Dk]` fp16) and `v` (`[B, Hkv, Dv]`; as a sink token while the
    /// cache holds fewer than `sink_tokens`), computes attention of `q` (`[B, H, Dk]` fp16) over all cached tokens
    /// including the new one, then flushes (the R fp16 keys as one block once there are R; the oldest fp16 value
    /// once there are R + 1). Returns the attention output `[B, H, Dv]` f32.
    ///
    /// Scores are `q . k / sqrt(Dk)` over `[dequantized keys, fp16 keys]`, softmax subtracts the max, output is
    /// the weighted sum of `[dequantized values, fp16 values]`; all in f64. Works on an empty cache too.
    ///
    /// # Errors
    /// [`RefError::Shape`] for wrong lengths (the cache is left unchanged).
    pub fn decode_step(&mut self, q: &[f16], k: &[f16], v: &[f16]) -> Result<Vec<f32>, RefError> {
        let (b, h, hkv, dk, dv) = (self.batch, self.heads, self.kv_heads, self.dk, self.dv);
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
            let (kt, vt) = (&k[i * dk..(i + 1) * dk], &v[i * dv..(i + 1) * dv]);
            if sink {
                c.k_sink.extend_from_slice(kt);
                c.v_sink.extend_from_slice(vt);
            } else {
                c.k_res.extend_from_slice(kt);
                c.v_res.extend_from_slice(vt);
            }
        }
        self.len += 1;
        let ratio = h / hkv;
        let mut out = vec![0f32; b * h * dv];
        for bi in 0..b {
            for kh in 0..hkv {
                let c = &self.caches[bi * hkv + kh];
                let kr = f16s_to_f32(&c.k_res);
                let vr = f16s_to_f32(&c.v_res);
                let (ks, vs) = (f16s_to_f32(&c.k_sink), f16s_to_f32(&c.v_sink));
                for qh in kh * ratio..(kh + 1) * ratio {
                    let (qo, o) = ((bi * h + qh) * dk, (bi * h + qh) * dv);
                    let qf = f16s_to_f32(&q[qo..qo + dk]);
                    let a = attend(&qf, &[&ks, &c.k_deq, &kr], &[&vs, &c.v_deq, &vr], dk, dv);
                    out[o..o + dv].copy_from_slice(&a);
                }
            }
        }
        let (r, kq, vq) = (self.r, self.key_quant(), self.value_quant());
        let flush_k = !sink && self.residual_keys() == r;
        let flush_v = !sink && self.residual_values() == r + 1;
        for c in self.caches.iter_mut() {
            if flush_k {
                Self::flush_keys(r, dk, kq, c);
            }
            if flush_v {
                Self::flush_values(1, dv, vq, c);
            }
        }
        if flush_k {
            self.nqk += r;
        }
        if flush_v {
            self.nqv += 1;
        }
        Ok(out)
    }

    /// The keys and values attention sees for (`batch`, `kv_head`): `[len, Dk]` and `[len, Dv]` f32, in token order: the
    /// sink tokens, the dequantized part, then the fp16 residual.
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
        let mut k = f16s_to_f32(&c.k_sink);
        k.extend_from_slice(&c.k_deq);
        k.extend(f16s_to_f32(&c.k_res));
        let mut v = f16s_to_f32(&c.v_sink);
        v.extend_from_slice(&c.v_deq);
        v.extend(f16s_to_f32(&c.v_res));
        Ok((k, v))
    }

    /// The cache in the reference files' layouts (see [`CacheExport`]).
    pub fn export(&self) -> CacheExport {
        let d = self.dk;
        let mut e = CacheExport {
            batch: self.batch,
            kv_heads: self.kv_heads,
            head_dim: d,
            value_head_dim: self.dv,
            k_bits: self.k_bits,
            v_bits: self.v_bits,
            k_group: self.k_group,
            v_group: self.v_group,
            len: self.len,
            sink_tokens: self.sink_tokens(),
            quantized_keys: self.nqk,
            residual_keys: self.residual_keys(),
            quantized_values: self.nqv,
            residual_values: self.residual_values(),
            ..CacheExport::default()
        };
        for c in &self.caches {
            for ch in 0..d {
                for blk in &c.k_blocks {
                    let (wpc, gpc) = (blk.codes.len() / d, blk.scale.len() / d);
                    e.k_code.extend(
                        blk.codes[ch * wpc..(ch + 1) * wpc]
                            .iter()
                            .map(|&w| w as i32),
                    );
                    e.k_scale
                        .extend_from_slice(&blk.scale[ch * gpc..(ch + 1) * gpc]);
                    e.k_mn.extend_from_slice(&blk.mn[ch * gpc..(ch + 1) * gpc]);
                }
            }
            e.k_sink.extend_from_slice(&c.k_sink);
            e.v_sink.extend_from_slice(&c.v_sink);
            e.k_residual.extend_from_slice(&c.k_res);
            e.v_code.extend(c.v_code.iter().map(|&w| w as i32));
            e.v_scale.extend_from_slice(&c.v_scale);
            e.v_mn.extend_from_slice(&c.v_mn);
            e.v_residual.extend_from_slice(&c.v_res);
        }
        e
    }
}
