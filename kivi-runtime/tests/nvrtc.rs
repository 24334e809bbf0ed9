//! Compile-only tests: every kernel of every preset through NVRTC for sm_80 and sm_90, no GPU needed.
//! Without libnvrtc they skip with a message, unless KIVI_REQUIRE_NVRTC=1 (CI), where they fail.

use kivi_codegen::{generate_module, KernelTiles, LayoutKernels};
use kivi_dsl::{parse_spec, MODEL_PRESETS, QUANT_PRESETS};
use kivi_runtime::{Arch, Compiler, CubinOrigin, RuntimeError};

fn compiler(cache_dir: Option<std::path::PathBuf>) -> Option<Compiler> {
    match Compiler::new(None, cache_dir) {
        Ok(c) => Some(c),
        Err(e @ RuntimeError::NvrtcMissing { .. }) => {
            if std::env::var("KIVI_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("KIVI_REQUIRE_NVRTC=1 but {e}");
            }
            eprintln!("SKIPPED (no NVRTC): {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Compiles the module of `layout` with `tiles` for sm_80 and sm_90: a CUBIN each and no NVRTC warning.
fn compiles_cleanly(
    compiler: &Compiler,
    spec: &str,
    layout: &kivi_dsl::Layout,
    tiles: &KernelTiles,
) {
    let kernels = LayoutKernels::new(layout, tiles).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let module = generate_module(&kernels.specs).unwrap();
    for arch in ["sm_80", "sm_90"] {
        let arch = Arch::parse(arch).unwrap();
        let cubin = compiler
            .compile(&module.name, &module.source, arch)
            .unwrap_or_else(|e| panic!("{spec} {}: {e}", arch.sm()));
        assert!(
            cubin.log.is_empty(),
            "{spec} {}: NVRTC warnings:\n{}",
            arch.sm(),
            cubin.log
        );
        assert!(cubin.image.starts_with(b"\x7fELF"), "{spec}: not a CUBIN");
    }
}

#[test]
fn every_preset_compiles_for_sm80_and_sm90_without_warnings_contiguous_and_paged() {
    let Some(compiler) = compiler(None) else {
        return;
    };
    let mut count = 0;
    for q in QUANT_PRESETS {
        for m in MODEL_PRESETS {
            let spec = format!("{}, {}", q.name, m.name);
            let layout = parse_spec(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
            // The contiguous module, and the paged one (its decode kernel reads through a block table).
            for tiles in [
                KernelTiles::heuristic(&layout),
                KernelTiles::heuristic(&layout).paged(),
            ] {
                compiles_cleanly(&compiler, &spec, &layout, &tiles);
                count += 2;
            }
        }
    }
    eprintln!(
        "compiled {count} modules ({} kernels each)",
        kivi_codegen::KernelKind::ALL.len()
    );
}

/// Symmetric quantization and fp32 rounding change the quantize paths (prefill kernels and the decode kernel's
/// flushes): every combination, at each width (3-bit packs included), compiles warning-free; so do per_block
/// groups (the largest) and sink tokens.
#[test]
fn symmetric_fp32_rounding_and_per_block_layouts_compile_without_warnings() {
    let Some(compiler) = compiler(None) else {
        return;
    };
    for spec in [
        "kivi-2, llama-3-8b, keys: { group_size: per_block }, values: { group_size: per_block }",
        "kivi-2, num_heads: 4, num_kv_heads: 4, head_dim: 256, keys: { bits: 4, group_size: per_block }, \
         values: { group_size: per_block }",
        "kivi-2, llama-3-8b, sink_tokens: 4",
        "kivi-4, num_heads: 8, num_kv_heads: 1, head_dim: 64, keys: { bits: 3 }, sink_tokens: 200",
    ] {
        let layout = parse_spec(spec).unwrap();
        compiles_cleanly(&compiler, spec, &layout, &KernelTiles::heuristic(&layout));
    }
    for (bits, quant, rounding) in [
        (2, "symmetric", "half"),
        (4, "symmetric", "fp32"),
        (8, "asymmetric", "fp32"),
        (1, "asymmetric", "fp32"),
        (3, "symmetric", "fp32"),
        (3, "asymmetric", "half"),
    ] {
        let spec = format!(
            "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 64, keys: {{ bits: {bits}, quant: {quant}, \
             rounding: {rounding} }}, values: {{ bits: {}, quant: symmetric }}",
            bits.max(2)
        );
        let layout = parse_spec(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        compiles_cleanly(&compiler, &spec, &layout, &KernelTiles::heuristic(&layout));
    }
}

/// bf16 activations and bf16 or fp32 scales, with every quantization option they meet (symmetric, fp32
/// rounding, 3-bit packs, sinks, paged): warning-free for sm_80 and sm_90 (with NVRTC 12.9 too in CI).
#[test]
fn bf16_activations_and_bf16_or_fp32_scales_compile_without_warnings() {
    let Some(compiler) = compiler(None) else {
        return;
    };
    for spec in [
        "kivi-2, llama-3-8b, dtype: bf16",
        "kivi-4, llama-2-7b, scale_dtype: fp32, rounding: fp32",
        "kivi-2, llama-3-8b, dtype: bf16, scale_dtype: bf16, quant: symmetric",
        "kivi-2, num_heads: 8, num_kv_heads: 1, head_dim: 80, dtype: bf16, keys: { bits: 3, group_size: 16, \
         scale_dtype: fp32 }, values: { bits: 1, group_size: 16, scale_dtype: bf16 }, sink_tokens: 4",
        "kivi-2, num_heads: 4, num_kv_heads: 4, keys: { head_dim: 192, bits: 8 }, values: { head_dim: 128, \
         bits: 4, scale_dtype: fp32 }, scale_dtype: bf16",
    ] {
        let layout = parse_spec(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        compiles_cleanly(&compiler, spec, &layout, &KernelTiles::heuristic(&layout));
        compiles_cleanly(&compiler, spec, &layout, &KernelTiles::heuristic(&layout).paged());
    }
}

/// Layouts whose decode plan lands at or near the 48 KiB static shared-memory limit: the heuristic tile must
/// compile (the codegen's byte count matches what NVRTC allocates), or the layout must be refused up front.
#[test]
fn layouts_at_the_shared_memory_limit_compile_or_are_refused() {
    let Some(compiler) = compiler(None) else {
        return;
    };
    let arch = Arch::parse("sm_90").unwrap();
    for spec in [
        "kivi-2, llama-3-8b, head_dim: 256",
        "kivi-2, llama-3-8b, keys: { group_size: 16 }, values: { group_size: 16 }",
        "kivi-4, llama-3-8b, keys: { bits: 8 }, values: { group_size: 16 }",
        "kivi-2, smollm2-135m, keys: { bits: 1, group_size: 16 }, values: { bits: 4 }",
        "kivi-2, num_heads: 16, num_kv_heads: 1, head_dim: 256, keys: { bits: 1, group_size: 16 }, values: { bits: 8, group_size: 16 }",
    ] {
        let layout = parse_spec(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        match LayoutKernels::new(&layout, &KernelTiles::heuristic(&layout)) {
            Ok(kernels) => {
                let module = generate_module(&kernels.specs).unwrap();
                let cubin = compiler
                    .compile(&module.name, &module.source, arch)
                    .unwrap_or_else(|e| panic!("{spec}: {e}"));
                assert!(cubin.log.is_empty(), "{spec}: {}", cubin.log);
            }
            Err(e) => assert!(e.to_string().contains("not yet supported"), "{spec}: {e}"),
        }
    }
}

#[test]
fn disk_cache_serves_a_second_compiler_and_keys_on_arch() {
    let dir = tempfile::tempdir().unwrap();
    let Some(first) = compiler(Some(dir.path().to_path_buf())) else {
        return;
    };
    let layout = parse_spec("kivi-2, smollm2-135m").unwrap();
    let kernels = LayoutKernels::new(&layout, &KernelTiles::heuristic(&layout)).unwrap();
    let module = generate_module(&kernels.specs).unwrap();
    let sm90 = Arch::parse("sm_90").unwrap();
    let cold = first.compile(&module.name, &module.source, sm90).unwrap();
    assert!(
        matches!(cold.origin, CubinOrigin::Compiled(_)),
        "{:?}",
        cold.origin
    );
    let again = first.compile(&module.name, &module.source, sm90).unwrap();
    assert_eq!(again.origin, CubinOrigin::Memory);
    let second = compiler(Some(dir.path().to_path_buf())).unwrap();
    let warm = second.compile(&module.name, &module.source, sm90).unwrap();
    assert!(
        matches!(warm.origin, CubinOrigin::Disk(_)),
        "{:?}",
        warm.origin
    );
    assert_eq!(warm.image, cold.image);
    if let (CubinOrigin::Compiled(c), CubinOrigin::Disk(w)) = (cold.origin, warm.origin) {
        eprintln!("cold compile {c:?}, warm load from disk {w:?}");
    }
    let sm80 = Arch::parse("sm_80").unwrap();
    assert_ne!(
        second.cache_key(&module.source, sm80),
        second.cache_key(&module.source, sm90)
    );
    let other = second.compile(&module.name, &module.source, sm80).unwrap();
    assert!(matches!(other.origin, CubinOrigin::Compiled(_)));
    // Files are written whole: no temp file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".cubin")), "{names:?}");
}

#[test]
fn a_compile_error_returns_nvrtc_log() {
    let Some(c) = compiler(None) else { return };
    let err = c
        .compile(
            "broken",
            "extern \"C\" __global__ void f() { undefined_thing(); }",
            Arch::parse("sm_90").unwrap(),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("undefined_thing"), "{msg}");
}
