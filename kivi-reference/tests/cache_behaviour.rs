//! RefCache behaviour: dominating tokens, flush boundaries, GQA, empty cache, NaN propagation, errors.

mod common;

use common::{h, layout, max_abs_diff, rand_f16, rng};
use half::f16;
use kivi_dsl::{Dtype, QuantAxis, Symmetry};
use kivi_reference::dtype::to_f32s;
use kivi_reference::{
    attention_exact, attention_f32, dequantize_keys_per_channel, dequantize_values_per_token,
    QuantizedKeys, QuantizedValues, RefCache, RefError,
};

/// Keys of token `t` all 4.0 and a query of all 8.0: its score exceeds every other by > 100, so the output is
/// that token's value as the cache holds it (dequantized if quantized, fp16 otherwise).
#[test]
fn dominating_token_quantized_and_residual() {
    let (d, r, g) = (32usize, 32u32, 32u32);
    for bits in [2u32, 4, 8] {
        let l = layout(bits, bits, g, r, d as u32, 1, 1);
        let mut c = RefCache::new(&l, 1).unwrap();
        let mut rn = rng(7 + u64::from(bits));
        let p = 64;
        let mut k = rand_f16(&mut rn, p * d, 0.1);
        let v = rand_f16(&mut rn, p * d, 1.0);
        let hot = 5;
        k[hot * d..(hot + 1) * d].fill(f16::from_f32(4.0));
        c.prefill(&k, &v, p).unwrap();
        assert_eq!((c.quantized_keys(), c.quantized_values()), (64, 32));
        let (_, deq_v) = c.effective_kv(0, 0).unwrap();
        let expect_q: Vec<f32> = deq_v[hot * d..(hot + 1) * d].to_vec();
        let orig: Vec<f32> = v[hot * d..(hot + 1) * d]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        // Quantized part: the new token's key is small, so token 5 dominates.
        let q = vec![f16::from_f32(8.0); d];
        let out = c
            .decode_step(&q, &rand_f16(&mut rn, d, 0.1), &rand_f16(&mut rn, d, 1.0))
            .unwrap();
        let err = max_abs_diff(&out, &expect_q);
        eprintln!("bits {bits}: quantized dominating token: max |out - dequantized v| = {err:e}");
        assert!(err <= 1e-5, "bits {bits}: {err}");
        if bits == 2 {
            assert!(
                max_abs_diff(&out, &orig) > 1e-3,
                "2-bit output should be the dequantized, not the fp16 value"
            );
        }
        // Residual part: the new token itself dominates; its fp16 value comes out.
        let vnew = rand_f16(&mut rn, d, 1.0);
        let out = c
            .decode_step(&q, &vec![f16::from_f32(8.0); d], &vnew)
            .unwrap();
        let expect: Vec<f32> = vnew.iter().map(|x| x.to_f32()).collect();
        let err = max_abs_diff(&out, &expect);
        eprintln!("bits {bits}: residual dominating token: max |out - v| = {err:e}");
        assert!(err <= 1e-5, "bits {bits}: {err}");
    }
}

/// Reassembles (keys, values) `[len, D]` of (0, kv_head) from `export()` with the quant module's dequantizers.
fn from_export(
    c: &RefCache,
    kv_head: usize,
    kv_heads: usize,
    d: usize,
    bits: u32,
    g: usize,
) -> (Vec<f32>, Vec<f32>) {
    let e = c.export();
    let (nqk, nrk, nqv, nrv) = (
        e.quantized_keys,
        e.residual_keys,
        e.quantized_values,
        e.residual_values,
    );
    assert_eq!(e.k_code.len(), kv_heads * d * nqk * bits as usize / 32);
    let cpw = 32 / bits as usize;
    let kw = d * nqk / cpw;
    let ks = d * nqk / g;
    let qk = QuantizedKeys {
        bits,
        group: g,
        tokens: nqk,
        head_dim: d,
        codes: e.k_code[kv_head * kw..(kv_head + 1) * kw]
            .iter()
            .map(|&w| w as u32)
            .collect(),
        scale: e.k_scale[kv_head * ks..(kv_head + 1) * ks].to_vec(),
        mn: e.k_mn[kv_head * ks..(kv_head + 1) * ks].to_vec(),
    };
    let mut keys = dequantize_keys_per_channel(&qk).unwrap();
    keys.extend(
        e.k_residual[kv_head * nrk * d..(kv_head + 1) * nrk * d]
            .iter()
            .copied(),
    );
    let vw = nqv * d / cpw;
    let vs = nqv * d / g;
    let qv = QuantizedValues {
        bits,
        group: g,
        tokens: nqv,
        head_dim: d,
        codes: e.v_code[kv_head * vw..(kv_head + 1) * vw]
            .iter()
            .map(|&w| w as u32)
            .collect(),
        scale: e.v_scale[kv_head * vs..(kv_head + 1) * vs].to_vec(),
        mn: e.v_mn[kv_head * vs..(kv_head + 1) * vs].to_vec(),
    };
    let mut values = dequantize_values_per_token(&qv).unwrap();
    values.extend(
        e.v_residual[kv_head * nrv * d..(kv_head + 1) * nrv * d]
            .iter()
            .copied(),
    );
    (keys, values)
}

/// Every step around the key flush (R fp16 keys) and the value flushes (R + 1 fp16 values): counts follow
/// Algorithm 1, the output equals attention over the cache as it stood plus the new token, and `export()`
/// dequantizes back to exactly what attention uses.
#[test]
fn flush_boundaries() {
    let (d, r, g, hq, hkv, bits) = (32usize, 32usize, 16usize, 4usize, 2usize, 2u32);
    let l = layout(
        bits, bits, g as u32, r as u32, d as u32, hq as u32, hkv as u32,
    );
    let mut c = RefCache::new(&l, 1).unwrap();
    let mut rn = rng(11);
    let p = 20;
    c.prefill(
        &rand_f16(&mut rn, hkv * p * d, 1.0),
        &rand_f16(&mut rn, hkv * p * d, 1.0),
        p,
    )
    .unwrap();
    assert_eq!(
        (c.len(), c.quantized_keys(), c.quantized_values()),
        (20, 0, 0)
    );
    let mut key_flushes = 0;
    for step in 0..60 {
        let before: Vec<(Vec<f32>, Vec<f32>)> =
            (0..hkv).map(|j| c.effective_kv(0, j).unwrap()).collect();
        let q = rand_f16(&mut rn, hq * d, 1.0);
        let k = rand_f16(&mut rn, hkv * d, 1.0);
        let v = rand_f16(&mut rn, hkv * d, 1.0);
        let nqk_before = c.quantized_keys();
        let out = c.decode_step(&q, &k, &v).unwrap();
        let len = p + step + 1;
        assert_eq!(c.len(), len);
        // Keys: flushed as one block of R the moment R fp16 keys exist.
        assert_eq!(c.quantized_keys(), len / r * r, "step {step}");
        assert!(c.residual_keys() < r);
        if c.quantized_keys() != nqk_before {
            assert_eq!(c.quantized_keys(), nqk_before + r, "key flush jumps by R");
            key_flushes += 1;
        }
        // Values: oldest flushed once R + 1 fp16 values exist.
        assert_eq!(c.quantized_values(), len.saturating_sub(r), "step {step}");
        for qh in 0..hq {
            let j = qh / (hq / hkv);
            let (mut kk, mut vv) = before[j].clone();
            kk.extend(k[j * d..(j + 1) * d].iter().map(|x| x.to_f32()));
            vv.extend(v[j * d..(j + 1) * d].iter().map(|x| x.to_f32()));
            let qf: Vec<f32> = q[qh * d..(qh + 1) * d].iter().map(|x| x.to_f32()).collect();
            let expect = attention_f32(&qf, &kk, &vv, d).unwrap();
            let err = max_abs_diff(&out[qh * d..(qh + 1) * d], &expect);
            assert!(err <= 1e-6, "step {step} head {qh}: {err}");
        }
        for j in 0..hkv {
            let (ke, ve) = from_export(&c, j, hkv, d, bits, g);
            let (kc, vc) = c.effective_kv(0, j).unwrap();
            assert_eq!(ke, kc, "step {step}: exported keys");
            assert_eq!(ve, vc, "step {step}: exported values");
        }
    }
    assert_eq!(key_flushes, 2, "flushes at len 32 and 64");
}

/// GQA: query head h reads KV head h / (H / Hkv). Each KV head holds a distinct constant value (a constant
/// per-token group dequantizes exactly), so each query head's output names its KV head.
#[test]
fn gqa_mapping() {
    let (d, r, hq, hkv) = (32usize, 32u32, 6usize, 3usize);
    let l = layout(2, 2, 32, r, d as u32, hq as u32, hkv as u32);
    let b = 2;
    let mut c = RefCache::new(&l, b).unwrap();
    let mut rn = rng(3);
    let p = 80;
    let k = rand_f16(&mut rn, b * hkv * p * d, 1.0);
    let mut v = Vec::new();
    for bi in 0..b {
        for j in 0..hkv {
            v.extend(std::iter::repeat_n(
                f16::from_f32((10 * bi + j + 1) as f32),
                p * d,
            ));
        }
    }
    c.prefill(&k, &v, p).unwrap();
    let mut newv = Vec::new();
    for bi in 0..b {
        for j in 0..hkv {
            newv.extend(std::iter::repeat_n(
                f16::from_f32((10 * bi + j + 1) as f32),
                d,
            ));
        }
    }
    let out = c
        .decode_step(
            &rand_f16(&mut rn, b * hq * d, 1.0),
            &rand_f16(&mut rn, b * hkv * d, 1.0),
            &newv,
        )
        .unwrap();
    for bi in 0..b {
        for qh in 0..hq {
            let want = (10 * bi + qh / (hq / hkv) + 1) as f32;
            for &o in &out[(bi * hq + qh) * d..(bi * hq + qh + 1) * d] {
                assert!(
                    (o - want).abs() <= 1e-5,
                    "batch {bi} head {qh}: {o} != {want}"
                );
            }
        }
    }
}

#[test]
fn decode_on_empty_cache() {
    let d = 64;
    let l = layout(4, 4, 32, 128, d as u32, 2, 1);
    let mut c = RefCache::new(&l, 1).unwrap();
    assert!(c.is_empty());
    let mut rn = rng(5);
    let v = rand_f16(&mut rn, d, 2.0);
    let out = c
        .decode_step(
            &rand_f16(&mut rn, 2 * d, 1.0),
            &rand_f16(&mut rn, d, 1.0),
            &v,
        )
        .unwrap();
    let vf: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
    assert_eq!(&out[..d], &vf[..]);
    assert_eq!(&out[d..], &vf[..]);
    assert_eq!(
        (c.len(), c.quantized_keys(), c.quantized_values()),
        (1, 0, 0)
    );
}

#[test]
fn attention_exact_matches_hand_computation() {
    // Two tokens, D = 4: scores q.k/2 = 0 and ln 3 -> weights 1/4, 3/4.
    let q = h(&[1.0, 0.0, 0.0, 0.0]);
    let ln3x2 = (3.0f32).ln() * 2.0;
    let k = h(&[0.0, 0.0, 0.0, 0.0, ln3x2, 0.0, 0.0, 0.0]);
    let v = h(&[4.0, 0.0, 0.0, 8.0, 0.0, 4.0, 0.0, 0.0]);
    let out = attention_exact(&q, &k, &v, 4).unwrap();
    let w1 = 1.0 / (1.0 + (f16::from_f32(ln3x2).to_f32() / 2.0).exp());
    let want = [4.0 * w1, 4.0 * (1.0 - w1), 0.0, 8.0 * w1];
    assert!(max_abs_diff(&out, &want) < 1e-6, "{out:?}");
}

/// A NaN in a value that gets quantized, or an Inf key, turns the attention output of the heads that read it
/// into NaN; other KV heads are unaffected.
#[test]
fn nan_and_inf_propagate() {
    let (d, hkv) = (32usize, 2usize);
    for (poison_key, poison) in [
        (false, f16::NAN),
        (true, f16::INFINITY),
        (false, f16::NEG_INFINITY),
    ] {
        let l = layout(2, 2, 32, 32, d as u32, 2, hkv as u32);
        let mut c = RefCache::new(&l, 1).unwrap();
        let mut rn = rng(9);
        let p = 64;
        let mut k = rand_f16(&mut rn, hkv * p * d, 1.0);
        let mut v = rand_f16(&mut rn, hkv * p * d, 1.0);
        if poison_key {
            k[3 * d + 7] = poison; // head 0, token 3 (quantized), channel 7
        } else {
            v[3 * d + 7] = poison; // head 0, token 3 (quantized)
        }
        c.prefill(&k, &v, p).unwrap();
        let e = c.export();
        if poison_key {
            // [Hkv, D, nqk/G] with nqk/G = 2: channel 7, group 0 of head 0.
            assert!(e.k_scale[14].is_nan() && e.k_mn[14].is_nan());
            assert!(e.k_scale[15].is_finite() && e.k_scale[12].is_finite());
        } else {
            assert!(e.v_scale[3].is_nan() && e.v_mn[3].is_nan());
        }
        let out = c
            .decode_step(
                &rand_f16(&mut rn, 2 * d, 1.0),
                &rand_f16(&mut rn, hkv * d, 1.0),
                &rand_f16(&mut rn, hkv * d, 1.0),
            )
            .unwrap();
        assert!(
            out[..d].iter().all(|x| x.is_nan()),
            "head 0 reads the poisoned KV head"
        );
        assert!(out[d..].iter().all(|x| x.is_finite()), "head 1 does not");
    }
}

#[test]
fn shape_errors_are_typed() {
    let d = 64;
    let l = layout(2, 2, 32, 128, d as u32, 4, 2);
    let mut c = RefCache::new(&l, 2).unwrap();
    let z = |n: usize| vec![f16::ZERO; n];
    match c.prefill(&z(2 * 2 * 10 * d - 1), &z(2 * 2 * 10 * d), 10) {
        Err(RefError::Shape { expected, got, .. }) => assert_eq!((expected, got), (2560, 2559)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.prefill(&z(2560), &z(2561), 10),
        Err(RefError::Shape { .. })
    ));
    assert!(matches!(
        c.decode_step(&z(2 * 2 * d), &z(2 * 2 * d), &z(2 * 2 * d)),
        Err(RefError::Shape { .. })
    ));
    assert!(matches!(
        c.decode_step(&z(2 * 4 * d), &z(2 * d), &z(2 * 2 * d)),
        Err(RefError::Shape { .. })
    ));
    assert!(matches!(
        c.decode_step(&z(2 * 4 * d), &z(2 * 2 * d), &z(d)),
        Err(RefError::Shape { .. })
    ));
    assert!(c.is_empty(), "failed calls leave the cache unchanged");
    c.prefill(&z(2560), &z(2560), 10).unwrap();
    assert!(matches!(
        c.prefill(&z(2560), &z(2560), 10),
        Err(RefError::Invalid(_))
    ));
    assert!(matches!(c.effective_kv(2, 0), Err(RefError::Invalid(_))));
    assert!(matches!(
        attention_exact(&z(3), &z(8), &z(8), 4),
        Err(RefError::Shape { .. })
    ));
    assert!(matches!(
        attention_exact(&z(4), &z(8), &z(4), 4),
        Err(RefError::Shape { .. })
    ));
    assert!(matches!(
        attention_exact(&z(4), &[], &[], 4),
        Err(RefError::Invalid(_))
    ));
}

#[test]
fn unsupported_layouts_are_typed() {
    let base = layout(2, 2, 32, 128, 64, 4, 2);
    let unsupported =
        |l: kivi_dsl::Layout| matches!(RefCache::new(&l, 1), Err(RefError::Unsupported { .. }));
    let mut l = base;
    l.keys.bits = 3;
    assert!(RefCache::new(&l, 1).is_ok(), "3-bit keys are supported");
    let mut l = base;
    l.values.bits = 3;
    l.keys.head_dim = 48;
    l.values.head_dim = 48;
    l.values.group_size = kivi_dsl::GroupSize::Elements(16);
    // 48 3-bit codes of a token take 5 words, the last one zero-padded.
    let mut c = RefCache::new(&l, 1).expect("3-bit values at head_dim 48 are supported");
    let kv: Vec<f16> = (0..2 * 200 * 48)
        .map(|i| f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 25.0))
        .collect();
    c.prefill(&kv, &kv, 200).unwrap();
    let e = c.export();
    assert_eq!(e.quantized_values, 200 - 128);
    assert_eq!(e.v_code.len(), 2 * e.quantized_values * 5);
    for token in e.v_code.chunks(5) {
        // Bits 144.. of a token's run (the padding) are zero.
        assert_eq!(token[4] as u32 >> 16, 0);
    }
    let mut l = base;
    l.values.symmetry = Symmetry::Symmetric;
    assert!(
        RefCache::new(&l, 1).is_ok(),
        "symmetric values are supported"
    );
    let mut l = base;
    l.dtype = Dtype::Bf16;
    assert!(
        RefCache::new(&l, 1).is_ok(),
        "bf16 activations are supported"
    );
    let mut l = base;
    l.keys.axis = QuantAxis::PerToken;
    assert!(RefCache::new(&l, 1).is_ok(), "per-token keys are supported");
    l.keys.group_size = kivi_dsl::GroupSize::Elements(48); // does not divide D = 64
    assert!(unsupported(l));
    let mut l = base;
    l.values.axis = QuantAxis::PerChannel;
    assert!(
        RefCache::new(&l, 1).is_ok(),
        "per-channel values are supported"
    );
    l.residual_length = 48; // not a multiple of G = 32
    assert!(unsupported(l));
    let mut l = base;
    l.keys.rounding = kivi_dsl::Rounding::F32;
    assert!(RefCache::new(&l, 1).is_ok(), "fp32 rounding is supported");
    let mut l = base;
    l.values.scale_dtype = kivi_dsl::ScaleDtype::F32;
    assert!(RefCache::new(&l, 1).is_ok(), "fp32 scales are supported");
    let mut l = base;
    l.sink_tokens = 4;
    assert!(RefCache::new(&l, 1).is_ok(), "sink tokens are supported");
    let mut l = base;
    l.residual_length = 100; // not a multiple of G = 32
    assert!(unsupported(l));
    let mut l = base;
    l.values.group_size = kivi_dsl::GroupSize::Elements(48); // does not divide D = 64
    assert!(unsupported(l));
    let mut l = base;
    l.num_heads = 5;
    assert!(matches!(RefCache::new(&l, 1), Err(RefError::Invalid(_))));
    assert!(matches!(RefCache::new(&base, 0), Err(RefError::Invalid(_))));
    // PerBlock groups resolve: keys R tokens, values D entries.
    let mut l = base;
    l.keys.group_size = kivi_dsl::GroupSize::PerBlock;
    l.values.group_size = kivi_dsl::GroupSize::PerBlock;
    let c = RefCache::new(&l, 1).unwrap();
    assert_eq!(c.export().k_group, 128);
    assert_eq!(c.export().v_group, 64);
}

/// Sink tokens stay fp16 for good; the tokens after them go through Algorithm 1 exactly as a cache without sinks
/// would take them (same codes, scales, mins, residuals and flush points).
#[test]
fn sink_tokens_stay_exact_and_shift_algorithm_1() {
    let (d, r, g, sinks) = (32usize, 32u32, 32u32, 4usize);
    let mut with = layout(2, 2, g, r, d as u32, 2, 1);
    with.sink_tokens = sinks as u32;
    let without = layout(2, 2, g, r, d as u32, 2, 1);
    let mut rn = rng(99);
    for prefill in [0usize, 3, 4, 5, 36, 37, 100] {
        let steps = 80;
        let total = prefill + steps;
        let k = rand_f16(&mut rn, total * d, 1.0);
        let v = rand_f16(&mut rn, total * d, 1.0);
        let q = rand_f16(&mut rn, steps * 2 * d, 1.0);
        let mut a = RefCache::new(&with, 1).unwrap();
        a.prefill(&k[..prefill * d], &v[..prefill * d], prefill)
            .unwrap();
        for s in 0..steps {
            let t = prefill + s;
            a.decode_step(
                &q[s * 2 * d..(s + 1) * 2 * d],
                &k[t * d..(t + 1) * d],
                &v[t * d..(t + 1) * d],
            )
            .unwrap();
        }
        // The same tokens minus the sinks, into a cache without sinks.
        let skip = sinks.min(total);
        let p2 = prefill.saturating_sub(sinks);
        let mut b = RefCache::new(&without, 1).unwrap();
        b.prefill(
            &k[skip * d..(skip + p2) * d],
            &v[skip * d..(skip + p2) * d],
            p2,
        )
        .unwrap();
        for t in (skip + p2)..total {
            b.decode_step(&q[..2 * d], &k[t * d..(t + 1) * d], &v[t * d..(t + 1) * d])
                .unwrap();
        }
        let (ea, eb) = (a.export(), b.export());
        assert_eq!(ea.len, total);
        assert_eq!(ea.sink_tokens, skip, "prefill {prefill}");
        assert_eq!(ea.k_sink, to_f32s(&k[..skip * d]));
        assert_eq!(ea.v_sink, to_f32s(&v[..skip * d]));
        assert_eq!(
            (
                ea.quantized_keys,
                ea.residual_keys,
                ea.quantized_values,
                ea.residual_values
            ),
            (
                eb.quantized_keys,
                eb.residual_keys,
                eb.quantized_values,
                eb.residual_values
            ),
            "prefill {prefill}"
        );
        assert_eq!(
            (ea.k_code, ea.k_scale, ea.k_mn),
            (eb.k_code, eb.k_scale, eb.k_mn)
        );
        assert_eq!(
            (ea.v_code, ea.v_scale, ea.v_mn),
            (eb.v_code, eb.v_scale, eb.v_mn)
        );
        assert_eq!(
            (ea.k_residual, ea.v_residual),
            (eb.k_residual, eb.v_residual)
        );
        // Attention sees the sinks exactly, first.
        let (ek, ev) = a.effective_kv(0, 0).unwrap();
        assert_eq!(ek.len(), total * d);
        for i in 0..skip * d {
            assert_eq!(ek[i], k[i].to_f32());
            assert_eq!(ev[i], v[i].to_f32());
        }
    }
}

/// 3-bit codes (32 in three words) through the whole cache: every width from 1 to 8 keeps the dequantization
/// error within half a step, and the exported codes take `n * bits / 32` words.
/// The largest |dequantized - original| over the quantized keys and values of (batch 0, KV head 0), whose
/// original fp16 tokens are `k`, `v` (`[tokens, d]`).
fn quantized_errors(c: &RefCache, k: &[f16], v: &[f16], d: usize) -> (f32, f32) {
    let (ek, ev) = c.effective_kv(0, 0).unwrap();
    let (qk, qv) = (c.quantized_keys() * d, c.quantized_values() * d);
    let f32s = |x: &[f16]| x.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    (
        max_abs_diff(&ek[..qk], &f32s(&k[..qk])),
        max_abs_diff(&ev[..qv], &f32s(&v[..qv])),
    )
}

#[test]
fn every_width_from_1_to_8_bits_runs_the_cache() {
    let (d, r, g) = (64usize, 64u32, 32u32);
    for bits in 1..=8u32 {
        let l = layout(bits, bits, g, r, d as u32, 1, 1);
        let mut c = RefCache::new(&l, 1).unwrap_or_else(|e| panic!("{bits} bits: {e}"));
        let mut rn = rng(u64::from(bits));
        let p = 200;
        let k = rand_f16(&mut rn, p * d, 1.0);
        let v = rand_f16(&mut rn, p * d, 1.0);
        c.prefill(&k, &v, p).unwrap();
        let e = c.export();
        assert_eq!(e.quantized_keys, 192);
        assert_eq!(e.quantized_values, 136);
        assert_eq!(e.k_code.len(), d * 192 * bits as usize / 32, "{bits} bits");
        assert_eq!(e.v_code.len(), 136 * d * bits as usize / 32, "{bits} bits");
        let step = 2.0 / ((1u32 << bits) - 1) as f32; // ranges are within (-1, 1)
        let (worst_k, worst_v) = quantized_errors(&c, &k, &v, d);
        assert!(
            worst_k <= step * 0.5 + 2e-3,
            "{bits} bits: keys {worst_k} > {step}/2"
        );
        assert!(
            worst_v <= step * 0.5 + 2e-3,
            "{bits} bits: values {worst_v} > {step}/2"
        );
    }
}

/// A symmetric cache (2 to 8 bits): every quantized group's min is -2^(bits-1) * scale, every element lies within
/// half a step (plus rounding slack) of its dequantized value, and the codes differ from the asymmetric ones.
#[test]
fn symmetric_layouts_run_the_cache() {
    let (d, r, g) = (64usize, 64u32, 32u32);
    for bits in 2..=8u32 {
        let mut l = layout(bits, bits, g, r, d as u32, 1, 1);
        let asym = l;
        l.keys.symmetry = Symmetry::Symmetric;
        l.values.symmetry = Symmetry::Symmetric;
        let (mut c, mut a) = (
            RefCache::new(&l, 1).unwrap(),
            RefCache::new(&asym, 1).unwrap(),
        );
        let mut rn = rng(100 + u64::from(bits));
        let p = 200;
        let k = rand_f16(&mut rn, p * d, 1.0);
        let v = rand_f16(&mut rn, p * d, 1.0);
        c.prefill(&k, &v, p).unwrap();
        a.prefill(&k, &v, p).unwrap();
        let e = c.export();
        let half = f32::from(1u16 << (bits - 1));
        for (s, m) in e
            .k_scale
            .iter()
            .zip(&e.k_mn)
            .chain(e.v_scale.iter().zip(&e.v_mn))
        {
            assert_eq!(*m, -half * s, "{bits} bits");
        }
        assert_ne!(
            e.k_code,
            a.export().k_code,
            "{bits} bits: symmetric codes differ"
        );
        // |x| < 1: scale <= 1 / (2^(bits-1) - 1), half a step plus the quotient's fp16 rounding.
        let step = 1.0 / (half - 1.0);
        let (worst_k, worst_v) = quantized_errors(&c, &k, &v, d);
        assert!(worst_k <= step * 0.5 + 2e-3, "{bits} bits: keys {worst_k}");
        assert!(
            worst_v <= step * 0.5 + 2e-3,
            "{bits} bits: values {worst_v}"
        );
    }
    // 1-bit symmetric is rejected by the layout rules.
    let mut l = layout(1, 1, g, r, d as u32, 1, 1);
    l.keys.symmetry = Symmetry::Symmetric;
    assert!(RefCache::new(&l, 1).is_err());
}

/// Keys and values with different head_dims (192 and 128, as some models use): queries and keys have 192
/// channels, values and outputs 128; the scores are scaled by 1 / sqrt(192); each step's output is exact
/// attention over the cache's own effective keys and values plus the new token; the export keeps both dims.
#[test]
fn different_key_and_value_head_dims() {
    let mut l = layout(2, 4, 32, 128, 192, 4, 2);
    l.values.head_dim = 128;
    let (dk, dv, h, hkv) = (192usize, 128usize, 4usize, 2usize);
    let mut c = RefCache::new(&l, 1).unwrap();
    let mut r = rng(41);
    let len = 200;
    let (k, v) = (
        rand_f16(&mut r, hkv * len * dk, 2.0),
        rand_f16(&mut r, hkv * len * dv, 1.0),
    );
    assert!(
        c.prefill(&v, &v, len).is_err(),
        "values as keys: wrong length"
    );
    c.prefill(&k, &v, len).unwrap();
    for _ in 0..60 {
        let q = rand_f16(&mut r, h * dk, 1.0);
        let kn = rand_f16(&mut r, hkv * dk, 2.0);
        let vn = rand_f16(&mut r, hkv * dv, 1.0);
        let before: Vec<_> = (0..hkv).map(|j| c.effective_kv(0, j).unwrap()).collect();
        let out = c.decode_step(&q, &kn, &vn).unwrap();
        assert_eq!(out.len(), h * dv);
        for head in 0..h {
            let j = head / (h / hkv);
            let (mut ek, mut ev) = before[j].clone();
            ek.extend(kn[j * dk..(j + 1) * dk].iter().map(|x| x.to_f32()));
            ev.extend(vn[j * dv..(j + 1) * dv].iter().map(|x| x.to_f32()));
            let qh: Vec<f64> = q[head * dk..(head + 1) * dk]
                .iter()
                .map(|x| f64::from(x.to_f32()))
                .collect();
            let scores: Vec<f64> = ek
                .chunks(dk)
                .map(|kt| {
                    qh.iter()
                        .zip(kt)
                        .map(|(a, &b)| a * f64::from(b))
                        .sum::<f64>()
                        / (dk as f64).sqrt()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            for ch in 0..dv {
                let expect: f64 = w
                    .iter()
                    .enumerate()
                    .map(|(t, wt)| wt * f64::from(ev[t * dv + ch]))
                    .sum::<f64>()
                    / sum;
                let got = f64::from(out[head * dv + ch]);
                assert!(
                    (got - expect).abs() <= 1e-5 * expect.abs().max(1.0),
                    "head {head} ch {ch}: {got} vs {expect}"
                );
            }
        }
    }
    let e = c.export();
    assert_eq!((e.head_dim, e.value_head_dim), (dk, dv));
    assert_eq!(e.k_scale.len(), hkv * dk * e.quantized_keys / 32);
    assert_eq!(e.v_scale.len(), hkv * e.quantized_values * dv / 32);
    assert_eq!(e.v_residual.len(), hkv * e.residual_values * dv);
}
