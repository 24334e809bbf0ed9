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
    let checks =
        verify::verify_layout_on_gpu(&gpu, &layout, "mqa", &[0, 77, 257], &[1], 140, &mut |c| {
            eprintln!("{c}")
        });
    assert_all_pass(&checks);
}
