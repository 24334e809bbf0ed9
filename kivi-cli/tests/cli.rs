//! The `kivi` command as a user runs it: generated CUDA, and clear errors for bad input (no GPU needed).

use std::path::Path;
use std::process::{Command, Output};

fn kivi(args: &[&str], env: &[(&str, &str)]) -> Output {
    // KIVI_BIN: the binary's path where the test runs outside this checkout (e.g. on the GPU machine).
    let bin = std::env::var("KIVI_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kivi").to_string());
    let mut c = Command::new(bin);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run kivi")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn gen_prints_every_kernel_of_the_default_preset() {
    let o = kivi(&["gen", "kivi-2"], &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let src = text(&o.stdout);
    for name in [
        "kivi_quant_keys_k2c32_v2t32_r128_d128_fp16_gqa4_t128",
        "kivi_quant_values_k2c32_v2t32_r128_d128_fp16_gqa4_t128",
        "kivi_store_residual_k2c32_v2t32_r128_d128_fp16_gqa4_t128",
        "kivi_decode_k2c32_v2t32_r128_d128_fp16_gqa4_t128_p3_b4",
    ] {
        assert!(
            src.contains(&format!("void __launch_bounds__(128) {name}("))
                || src.contains(&format!("void __launch_bounds__(128, 4) {name}(")),
            "{name} missing"
        );
    }
    assert!(
        src.contains("__fdiv_rn"),
        "the quantize kernels divide with correct rounding"
    );
    assert!(
        text(&o.stderr).contains("llama-3-8b"),
        "the default model is announced"
    );
}

#[test]
fn gen_out_writes_one_file_per_kernel_and_reads_kivi_files() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("smol.kivi");
    std::fs::write(
        &spec,
        "// SmolLM2 with 4-bit KIVI\nsmollm2-135m,\nkivi-4,\nresidual_length: 64,\n",
    )
    .unwrap();
    let out = dir.path().join("cuda");
    let o = kivi(
        &[
            "gen",
            spec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 5, "4 kernels + the module: {files:?}");
    assert!(
        files.contains(&"kivi_decode_k4c32_v4t32_r64_d64_fp16_gqa3_t128_p3_b4.cu".to_string()),
        "{files:?}"
    );
}

#[test]
fn a_malformed_spec_points_at_the_offending_token() {
    let o = kivi(&["gen", "kivi-2, llama-3-8b, residual_lenght: 64"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("1:21:"), "{err}");
    assert!(err.contains("residual_lenght"), "{err}");
    assert!(err.contains('^'), "a caret under the span: {err}");
}

#[test]
fn an_impossible_layout_names_the_value_and_the_rule() {
    let o = kivi(&["gen", "kivi-2, llama-3-8b, residual_length: 100"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("residual_length 100 is not a multiple of the key group_size 32"),
        "{err}"
    );

    let o = kivi(&["gen", "kivi-2, llama-3-8b, head_dim: 80"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("80") && err.contains("16"),
        "names the group sizes that would work: {err}"
    );
}

#[test]
fn verify_matrix_and_reference_files_are_one_or_the_other() {
    let o = kivi(
        &[
            "verify",
            "--matrix",
            "--reference",
            "no-such-file.safetensors",
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("--matrix") && err.contains("--reference"),
        "{err}"
    );
}

#[test]
fn an_unsupported_layout_says_not_yet_supported() {
    let o = kivi(&["gen", "kivi-2, llama-3-8b, keys: { bits: 5 }"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("not yet supported"), "{err}");
    assert!(err.contains("keys.bits"), "{err}");
}

#[test]
fn a_missing_libnvrtc_is_reported_with_the_places_searched() {
    if Path::new("/usr/local/cuda/lib64/libnvrtc.so.13").exists() {
        eprintln!("SKIPPED: this machine has /usr/local/cuda/lib64/libnvrtc.so.13, which is always searched");
        return;
    }
    let o = kivi(
        &["compile", "kivi-2"],
        &[
            ("KIVI_NVRTC", "/nonexistent/nvrtc"),
            ("CUDA_HOME", "/nonexistent/cuda"),
            ("LD_LIBRARY_PATH", ""),
        ],
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("libnvrtc (CUDA 13) not found"), "{err}");
    assert!(
        err.contains("/nonexistent/nvrtc") && err.contains("/nonexistent/cuda/lib64"),
        "{err}"
    );
}

#[test]
fn verify_without_a_gpu_says_so() {
    if kivi_runtime::toolkit::driver_present() {
        eprintln!("SKIPPED: this machine has a CUDA driver");
        return;
    }
    let o = kivi(&["verify"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("no CUDA driver") || err.contains("libnvrtc"),
        "{err}"
    );
}

#[test]
fn tune_show_reads_the_cache_and_reports_a_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().to_str().unwrap();
    let o = kivi(&["tune", "--show"], &[("KIVI_CACHE_DIR", cache_dir)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("(0 entries)"),
        "{}",
        text(&o.stdout)
    );
    std::fs::write(dir.path().join("tune.json"), "{ half a file").unwrap();
    let o = kivi(&["tune", "--show"], &[("KIVI_CACHE_DIR", cache_dir)]);
    assert!(o.status.success());
    assert!(
        text(&o.stderr).contains("not a valid tuning cache"),
        "{}",
        text(&o.stderr)
    );
    assert!(text(&o.stdout).contains("(0 entries)"));
}

#[test]
fn bench_checks_its_shapes_then_needs_a_gpu() {
    let o = kivi(&["bench", "--shapes", "8,32,8,128"], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("expected B,H,Hkv,D,T"),
        "{}",
        text(&o.stderr)
    );
    let o = kivi(&["bench", "--shapes", "8,30,8,128,1024"], &[]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("num_heads"), "{}", text(&o.stderr));
    if kivi_runtime::toolkit::driver_present() {
        eprintln!("SKIPPED (the no-GPU half): this machine has a CUDA driver");
        return;
    }
    let o = kivi(&["bench", "--no-baseline"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("no CUDA driver") || err.contains("libnvrtc"),
        "{err}"
    );
}

#[test]
fn verify_reference_checks_a_file_on_the_cpu() {
    let file = kivi_reference::data_dir().join("kivi_decode_streams.safetensors");
    let o = kivi(
        &[
            "verify",
            "--cpu-only",
            "--reference",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(out.contains("PASS cpu stream mha_d128_b2"), "{out}");
    assert!(out.contains("2 passed, 0 failed"), "{out}");
}

#[test]
fn verify_reference_rejects_a_file_that_is_not_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("junk.safetensors");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let o = kivi(
        &["verify", "--cpu-only", "--reference", bad.to_str().unwrap()],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("junk.safetensors"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn memory_breaks_a_cache_down_and_checks_its_arguments() {
    let o = kivi(
        &[
            "memory",
            "kivi-2, llama-3-8b",
            "--context",
            "131072",
            "--layers",
            "32",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    // 131072 tokens x 128 channels x 2 bits / 8 = 4 MiB of key codes per sequence; 8 KV heads; 32 layers.
    assert!(
        out.contains("| key codes | 4194304 | 32.00 | 1024.00 |"),
        "{out}"
    );
    assert!(
        out.contains("| fp16 cache, same capacity | 67108864 | 512.00 | 16384.00 |"),
        "{out}"
    );
    assert!(out.contains("5.31x smaller than fp16"), "{out}");
    let o = kivi(&["memory", "kivi-2", "--batch", "0"], &[]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--batch 0"), "{}", text(&o.stderr));
}

#[test]
fn gen_paged_emits_the_paged_decode_kernel_and_compile_checks_archs_first() {
    let o = kivi(&["gen", "kivi-2, llama-3-8b", "--paged"], &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("kivi_decode_k2c32_v2t32_r128_d128_fp16_gqa4_t128_p3_b4_pg("));
    // A bad arch is refused before NVRTC is looked for (here: a missing --nvrtc library).
    let o = kivi(
        &[
            "compile",
            "kivi-2, llama-3-8b",
            "--arch",
            "sm_75",
            "--nvrtc",
            "/nonexistent",
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("sm_75") && !err.contains("libnvrtc"), "{err}");
    // An explicit --nvrtc that does not exist is an error, whatever else would be found.
    let o = kivi(
        &["compile", "kivi-2, llama-3-8b", "--nvrtc", "/nonexistent"],
        &[("KIVI_NVRTC", "/tmp")],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("/nonexistent (given explicitly: no such file)"),
        "{}",
        text(&o.stderr)
    );
}
