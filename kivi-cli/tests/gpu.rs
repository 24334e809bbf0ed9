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
