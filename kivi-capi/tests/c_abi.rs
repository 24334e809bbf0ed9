//! The C ABI from C: the checked-in header is what cbindgen generates from the crate, and the example program
//! (`examples/c/decode.c`) compiles against it and links with the cdylib. Without a GPU the example must fail
//! cleanly with a message (exit code 2); on a GPU (ignored test, run with `--include-ignored`) it runs a prefill
//! and decode steps and checks them against an exact attention it computes itself.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The crate's folder: KIVI_SOURCE_DIR/kivi-capi when set (a test binary run on another machine, from the
/// checkout's root), else where it was built.
fn crate_dir() -> PathBuf {
    match std::env::var_os("KIVI_SOURCE_DIR") {
        Some(root) => PathBuf::from(root).join("kivi-capi"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

fn header_path() -> PathBuf {
    crate_dir().join("include/kivi.h")
}

fn generated_header() -> String {
    let config =
        cbindgen::Config::from_file(crate_dir().join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir())
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn the_header_is_what_cbindgen_generates() {
    let fresh = generated_header();
    if std::env::var_os("KIVI_BLESS").is_some() {
        std::fs::write(header_path(), &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(header_path()).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "include/kivi.h is stale: regenerate it with `KIVI_BLESS=1 cargo test -p kivi-capi --test c_abi`"
    );
    for f in [
        "kivi_module_load",
        "kivi_decode",
        "kivi_prefill",
        "kivi_buffer_bytes",
        "kivi_last_error",
    ] {
        assert!(fresh.contains(f), "{f} missing from the header");
    }
}

/// The folder of the cdylib: KIVI_CAPI_LIB_DIR when set, else the test binary's own folder (`cargo test` builds
/// the cdylib into `<target>/<profile>/deps` beside the test) or the one above it (`cargo build` puts it there).
fn lib_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KIVI_CAPI_LIB_DIR") {
        return std::fs::canonicalize(dir).unwrap();
    }
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    if deps.join("libkivi_capi.so").exists() {
        deps
    } else {
        deps.parent().unwrap().to_path_buf()
    }
}

/// Compiles examples/c/decode.c with the system C compiler (`CC` or `cc`) against the header and the cdylib, into
/// the executable `name` (one per test: tests run in parallel, and rewriting a program another test is starting
/// fails with ETXTBSY).
fn build_example(name: &str) -> PathBuf {
    let dir = lib_dir();
    assert!(
        dir.join("libkivi_capi.so").exists(),
        "libkivi_capi.so not found in {} (cargo builds the cdylib with the tests)",
        dir.display()
    );
    let out = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let source = crate_dir().join("../examples/c/decode.c");
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&dir)
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .args(["-lkivi_capi", "-lm"])
        .status()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        status.success(),
        "{cc} failed to build {}",
        source.display()
    );
    out
}

fn gpu_present() -> bool {
    Path::new("/dev/nvidiactl").exists()
}

#[test]
fn the_c_example_builds_and_fails_cleanly_without_a_gpu() {
    let exe = build_example("kivi_c_example_no_gpu");
    if gpu_present() {
        eprintln!("a GPU is present: the GPU test runs the example");
        return;
    }
    let out = Command::new(&exe).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("kivi_module_load failed")
            && (stderr.contains("driver") || stderr.contains("libnvrtc")),
        "stderr: {stderr}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_c_example_runs_prefill_and_decode_on_a_gpu() {
    let exe = build_example("kivi_c_example_gpu");
    let out = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("all checks passed"), "stdout: {stdout}");
}
