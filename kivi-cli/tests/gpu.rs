//! GPU tests: the kernels against the CPU reference and the reference files, exactly as `kivi verify` runs them.
//! They need a CUDA GPU, so they are ignored by default; run them on one with `--include-ignored` (KIVI_DATA
//! pointing at the reference files when the binary runs outside this checkout).

use std::sync::Arc;

use kivi_cli::verify::{self, Check};
use kivi_runtime::{Compiler, Gpu};

fn gpu() -> Gpu {
    let compiler = Compiler::new(None, None).expect("NVRTC");
    Gpu::new(0, Arc::new(compiler)).expect("a CUDA GPU")
}

fn assert_all_pass(checks: &[Check]) {
    assert!(!checks.is_empty(), "no checks ran");
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} checks failed:\n{}",
        failed.len(),
        checks.len(),
        failed.join("\n")
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_reference_files() {
    let gpu = gpu();
    let mut checks = Vec::new();
    for file in [
        "kivi_pack_vectors.safetensors",
        "kivi_decode_streams.safetensors",
        "real_kv_smollm2_135m.safetensors",
    ] {
        let path = kivi_reference::data_dir().join(file);
        checks.extend(verify::verify_file_on_gpu(&gpu, &path, &mut |c| eprintln!("{c}")).unwrap());
    }
    assert_all_pass(&checks);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_cpu_reference_on_presets_at_awkward_lengths() {
    let gpu = gpu();
    let mut checks = Vec::new();
    for spec in verify::VERIFY_PRESETS {
        let layout = kivi_dsl::parse_spec(spec).unwrap();
        checks.extend(verify::verify_layout_on_gpu(
            &gpu,
            &layout,
            spec,
            &verify::AWKWARD_PREFILLS,
            &[1, 3],
            300,
            &mut |c| eprintln!("{c}"),
        ));
    }
    assert_all_pass(&checks);
}

/// `kivi verify`'s GPU-vs-CPU checks of each spec at prefills 31, 129 and 300 (a partial group, just past a block,
/// a partial block after two), batches 1 and 3, 140 decode steps (flushes of keys and values included).
fn verify_specs_at_awkward_lengths(specs: &[&str]) {
    let gpu = gpu();
    let mut checks = Vec::new();
    for spec in specs {
        let layout = kivi_dsl::parse_spec(spec).unwrap();
        checks.extend(verify::verify_layout_on_gpu(
            &gpu,
            &layout,
            spec,
            &[31, 129, 300],
            &[1, 3],
            140,
            &mut |c| eprintln!("{c}"),
        ));
    }
    assert_all_pass(&checks);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_symmetric_quantization_and_fp32_rounding_match_the_cpu_reference() {
    // The quantize paths (prefill and the decode step's flushes) of `quant: symmetric` and `rounding: fp32`, for
    // keys, values or both, at several widths: codes, scales and mins identical to the CPU reference.
    verify_specs_at_awkward_lengths(&[
        "kivi-2, smollm2-135m, quant: symmetric",
        "kivi-4, num_heads: 8, num_kv_heads: 2, head_dim: 128, keys: { quant: symmetric, rounding: fp32 }",
        "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 64, rounding: fp32",
        "keys: { bits: 8, group_size: 32, quant: symmetric }, values: { bits: 8, group_size: 32, quant: symmetric }, \
         residual_length: 128, num_heads: 4, num_kv_heads: 4, head_dim: 96",
        "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128, keys: { bits: 1, rounding: fp32 }, \
         values: { bits: 4, quant: symmetric }",
    ]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_three_bit_codes_match_the_cpu_reference() {
    // 3-bit packs (16 codes in three half-words, the sixteenth spread over their top bits) for keys and values:
    // whole packs (head_dim 128, 256), a partial last value pack (64: 8 codes per lane and token pair; 160: one
    // pack and 4 codes), head_dim 80 keys (15 words per lane and chunk), MQA and GQA, symmetric and fp32 rounding.
    verify_specs_at_awkward_lengths(&[
        "kivi-2, llama-2-7b, keys: { bits: 3 }, values: { bits: 3 }",
        "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 64, residual_length: 64, \
         keys: { bits: 3, group_size: 16 }, values: { bits: 3, group_size: 16 }",
        "kivi-2, num_heads: 8, num_kv_heads: 8, head_dim: 80, residual_length: 64, keys: { bits: 3 }, \
         values: { bits: 4, group_size: 16 }",
        "kivi-2, num_heads: 4, num_kv_heads: 1, head_dim: 160, keys: { bits: 2 }, values: { bits: 3 }",
        "kivi-4, num_heads: 8, num_kv_heads: 2, head_dim: 256, keys: { bits: 3, quant: symmetric }, \
         values: { bits: 3, rounding: fp32 }",
        "kivi-2, num_heads: 8, num_kv_heads: 4, head_dim: 32, keys: { bits: 3, group_size: 64 }, \
         values: { bits: 3, group_size: 16 }",
    ]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sink_tokens_match_the_cpu_reference() {
    // Sink tokens at prefills 31, 129 and 300 with 140 steps: 40 sinks (prefill 31 steps into Algorithm 1 after
    // 9 sink steps), 200 (prefill 31 and 129 decode sink steps, then flush around 328), 7 with 1-bit and 3-bit
    // codes (64-token iterations), 16 with MQA.
    verify_specs_at_awkward_lengths(&[
        "kivi-2, llama-3-8b, sink_tokens: 40",
        "kivi-4, num_heads: 8, num_kv_heads: 2, head_dim: 64, sink_tokens: 200",
        "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128, keys: { bits: 1 }, values: { bits: 3 }, sink_tokens: 7",
        "kivi-2, num_heads: 8, num_kv_heads: 1, head_dim: 96, residual_length: 64, keys: { group_size: 16 }, \
         values: { group_size: 16 }, sink_tokens: 16",
    ]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_different_key_and_value_head_dims_match_the_cpu_reference() {
    // Keys (and queries) of one head_dim, values (and outputs) of another: 192/128 (MHA), 64/256 with 3-bit keys,
    // 1-bit values and sinks (MQA), 128/80 (a value head_dim with 16-channel groups only).
    verify_specs_at_awkward_lengths(&[
        "kivi-2, num_heads: 16, num_kv_heads: 16, keys: { head_dim: 192 }, values: { head_dim: 128 }",
        "kivi-4, num_heads: 8, num_kv_heads: 1, keys: { head_dim: 64, bits: 3 }, \
         values: { head_dim: 256, bits: 1, group_size: 64 }, sink_tokens: 4",
        "kivi-2, num_heads: 8, num_kv_heads: 2, keys: { head_dim: 128 }, values: { head_dim: 80, group_size: 16 }",
    ]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_per_block_groups_match_the_cpu_reference() {
    // `group_size: per_block`: one scale and min per flush block of a key channel (R tokens) and per value token
    // (head_dim channels), i.e. the largest groups the kernels take (128- and 256-channel value groups, 64- and
    // 128-token key groups).
    verify_specs_at_awkward_lengths(&[
        "kivi-2, llama-3-8b, keys: { group_size: per_block }, values: { group_size: per_block }",
        "kivi-4, num_heads: 8, num_kv_heads: 2, head_dim: 64, residual_length: 64, \
         keys: { group_size: per_block }, values: { group_size: per_block }",
        "kivi-2, num_heads: 4, num_kv_heads: 4, head_dim: 256, keys: { bits: 4, group_size: per_block }, \
         values: { group_size: per_block }",
    ]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_one_sequence_and_one_kv_head() {
    // B * Hkv = 1 (MQA, batch 1) with a prefill that is not a multiple of anything.
    let gpu = gpu();
    let layout =
        kivi_dsl::parse_spec("kivi-2, num_heads: 8, num_kv_heads: 1, head_dim: 128").unwrap();
    let mut report = |c: &Check| eprintln!("{c}");
    let mut checks =
        verify::verify_layout_on_gpu(&gpu, &layout, "mqa", &[0, 77, 257], &[1], 140, &mut report);
    // More query heads per KV head (136) than decode threads (128): every head's partial sums must be written.
    let wide =
        kivi_dsl::parse_spec("kivi-4, num_heads: 136, num_kv_heads: 1, head_dim: 64").unwrap();
    checks.extend(verify::verify_layout_on_gpu(
        &gpu,
        &wide,
        "gqa136",
        &[129],
        &[2],
        130,
        &mut report,
    ));
    assert_all_pass(&checks);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_bf16_activations_and_bf16_or_fp32_scales_match_the_cpu_reference() {
    // bf16 activations (inputs rounded to bf16, steps rounded to bf16, the output bf16: tolerance 5e-3) and scales
    // stored as bf16 or fp32, alone and together: codes, scales, mins, residuals and sinks identical to the CPU
    // reference; 3-bit packs, sinks, symmetric and fp32 rounding, MQA and different head_dims among them.
    verify_specs_at_awkward_lengths(&[
        "kivi-2, llama-3-8b, dtype: bf16",
        "kivi-4, llama-2-7b, scale_dtype: fp32, rounding: fp32",
        "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 64, scale_dtype: bf16",
        "kivi-2, num_heads: 8, num_kv_heads: 1, head_dim: 80, dtype: bf16, keys: { bits: 3, group_size: 16, \
         scale_dtype: fp32 }, values: { bits: 1, group_size: 16, scale_dtype: bf16 }, sink_tokens: 4",
        "kivi-4, num_heads: 4, num_kv_heads: 4, dtype: bf16, quant: symmetric, keys: { head_dim: 192, \
         scale_dtype: fp32 }, values: { head_dim: 128 }",
    ]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_inputs_of_another_dtype_are_errors() {
    use half::{bf16, f16};
    use kivi_runtime::{KiviCache, RuntimeError};
    let gpu = gpu();
    let layout = kivi_dsl::parse_spec("kivi-2, smollm2-135m, dtype: bf16").unwrap();
    let module = gpu
        .load_layout(&layout, &kivi_codegen::KernelTiles::heuristic(&layout))
        .unwrap();
    let mut cache = KiviCache::new(&gpu, module, 2, 64).unwrap();
    let k = vec![f16::ONE; 2 * 3 * 10 * 64];
    let e = cache.prefill_host(&k, &k, 10).unwrap_err();
    assert!(matches!(e, RuntimeError::State(_)), "{e}");
    assert!(
        e.to_string().contains("fp16 tensors for a layout of bf16"),
        "{e}"
    );
    let kb = vec![bf16::ONE; 2 * 3 * 10 * 64];
    cache.prefill_host(&kb, &kb, 10).unwrap();
    let q = vec![bf16::ONE; 2 * 9 * 64];
    let kv = vec![bf16::ONE; 2 * 3 * 64];
    let out = cache.decode_step_host(&q, &kv, &kv).unwrap();
    // Every key and value is 1: every output is 1, in bf16.
    assert!(out.iter().all(|&x| x == bf16::ONE), "{:?}", &out[..4]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_inputs_that_do_not_match_the_layout_are_errors() {
    use half::f16;
    use kivi_runtime::{KiviCache, RuntimeError};
    let gpu = gpu();
    let layout = kivi_dsl::parse_spec("kivi-2, smollm2-135m").unwrap();
    let module = gpu
        .load_layout(&layout, &kivi_codegen::KernelTiles::heuristic(&layout))
        .unwrap();
    let mut cache = KiviCache::new(&gpu, module.clone(), 2, 64).unwrap();
    // prefill K with one token too few: [2, 3, 10, 64] expected.
    let k = vec![f16::ONE; 2 * 3 * 10 * 64 - 64];
    let v = vec![f16::ONE; 2 * 3 * 10 * 64];
    let e = cache.prefill_host(&k, &v, 10).unwrap_err();
    assert!(
        matches!(
            e,
            RuntimeError::Shape {
                what: "prefill k",
                ..
            }
        ),
        "{e}"
    );
    // q with num_kv_heads rows instead of num_heads.
    let small = vec![f16::ONE; 2 * 3 * 64];
    let e = cache.decode_step_host(&small, &small, &small).unwrap_err();
    assert!(e.to_string().contains("decode q"), "{e}");
    // more tokens than the capacity.
    let big = vec![f16::ONE; 2 * 3 * 65 * 64];
    let e = cache.prefill_host(&big, &big, 65).unwrap_err();
    assert!(e.to_string().contains("capacity is 64"), "{e}");
    // zero batch.
    assert!(KiviCache::new(&gpu, module, 0, 64).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_a_cache_switched_to_other_tiles_keeps_its_tokens() {
    // The autotuner times candidates on one cache by switching its module: the tokens stored with one tile
    // configuration must decode the same under another (storage depends on the layout only).
    use half::f16;
    use kivi_runtime::KiviCache;
    let gpu = gpu();
    let layout = kivi_dsl::parse_spec("kivi-2, smollm2-135m").unwrap();
    let heuristic = kivi_codegen::KernelTiles::heuristic(&layout);
    let mut other = heuristic;
    other.decode.threads = 64;
    other.decode.min_blocks = 8;
    other.decode.split_tokens = 64; // many splits: the scratch must grow
    let a = gpu.load_layout(&layout, &heuristic).unwrap();
    let b = gpu.load_layout(&layout, &other).unwrap();
    let (batch, prefill, d) = (2u32, 300u32, 64usize);
    let kv = batch as usize * 3;
    let heads = batch as usize * 9;
    let mut s = 12345u32;
    let mut rand = |n: usize| -> Vec<f16> {
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                f16::from_f32((s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0)
            })
            .collect()
    };
    let (pk, pv) = (
        rand(kv * prefill as usize * d),
        rand(kv * prefill as usize * d),
    );
    let steps: Vec<_> = (0..90)
        .map(|_| (rand(heads * d), rand(kv * d), rand(kv * d)))
        .collect();
    let mut plain = KiviCache::new(&gpu, a.clone(), batch, 512).unwrap();
    let mut switched = KiviCache::new(&gpu, a, batch, 512).unwrap();
    plain.prefill_host(&pk, &pv, prefill).unwrap();
    switched.prefill_host(&pk, &pv, prefill).unwrap();
    switched.set_module(b).unwrap();
    assert_eq!(switched.split_plan(prefill + 1), (64, 5));
    let mut worst = 0.0f64;
    for (q, k, v) in &steps {
        let x: Vec<f32> = plain
            .decode_step_host(q, k, v)
            .unwrap()
            .iter()
            .map(|h| h.to_f32())
            .collect();
        let y: Vec<f32> = switched
            .decode_step_host(q, k, v)
            .unwrap()
            .iter()
            .map(|h| h.to_f32())
            .collect();
        worst = worst.max(verify::rel_l2(&y, &x));
    }
    assert!(worst < 2e-3, "outputs differ by {worst:.2e}");
    // 90 steps from 300 tokens crossed a key flush (at 384): the caches are identical.
    let (ea, eb) = (plain.export().unwrap(), switched.export().unwrap());
    assert_eq!(ea.quantized_keys, 384);
    assert_eq!(ea, eb);
    // A module of another layout is refused.
    let other_layout = kivi_dsl::parse_spec("kivi-4, smollm2-135m").unwrap();
    let c = gpu
        .load_layout(
            &other_layout,
            &kivi_codegen::KernelTiles::heuristic(&other_layout),
        )
        .unwrap();
    let e = switched.set_module(c).unwrap_err();
    assert!(
        e.to_string().contains("kivi-4") || e.to_string().contains("bits: 4"),
        "{e}"
    );
}
