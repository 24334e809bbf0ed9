//! `kivi`: generate, compile and verify the CUDA kernels of a KIVI quantized KV-cache layout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kivi_cli::spec::{resolve, ResolvedSpec};
use kivi_cli::verify::{self, Check};
use kivi_codegen::{generate_module, KernelSpec, KernelTiles, LayoutKernels};
use kivi_runtime::{toolkit, Arch, Compiler, CubinOrigin, Gpu};

/// kivi: CUDA kernels for KIVI quantized KV caches (ICML 2024), generated, compiled and checked.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CUDA C++ of every kernel of a layout (stdout, or one file per kernel with --out).
    Gen {
        /// A spec (e.g. "kivi-2, llama-3-8b"), a preset, or a path to a .kivi file.
        spec: String,
        /// Write one `<kernel>.cu` per kernel (plus the whole module) into this folder.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Compile every kernel of a layout with NVRTC and report success and time.
    Compile {
        /// A spec, a preset, or a path to a .kivi file.
        spec: String,
        /// Target archs (sm_80, sm_90, ...); repeat or separate with commas.
        #[arg(long, value_delimiter = ',', default_values_t = ["sm_80".to_string(), "sm_90".to_string()])]
        arch: Vec<String>,
        /// libnvrtc to use (a file or its folder); default: KIVI_NVRTC, CUDA_HOME, /usr/local/cuda, the loader.
        #[arg(long)]
        nvrtc: Option<PathBuf>,
    },
    /// Check the kernels on the GPU against the CPU reference and the paper's reference files.
    ///
    /// Without --reference: the presets kivi-2 and kivi-4 with the llama-2-7b, llama-3-8b and smollm2-135m shapes
    /// over awkward prefill lengths, then every reference file found in KIVI_DATA (or tests/data). With
    /// --reference FILE: that file only, on the CPU reference, and on the GPU too when there is one.
    Verify {
        /// A reference file (safetensors, one of the formats in tests/data/README.md).
        #[arg(long)]
        reference: Vec<PathBuf>,
        /// Specs to verify instead of the default presets.
        #[arg(long)]
        spec: Vec<String>,
        /// Decode steps per run.
        #[arg(long, default_value_t = 300)]
        steps: u32,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_values_t = [1u32, 3])]
        batch: Vec<u32>,
        /// Prefill lengths.
        #[arg(long, value_delimiter = ',', default_values_t = verify::AWKWARD_PREFILLS.to_vec())]
        prefill: Vec<u32>,
        /// CPU reference only, even where there is a GPU.
        #[arg(long)]
        cpu_only: bool,
        /// libnvrtc to use (a file or its folder).
        #[arg(long)]
        nvrtc: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gen { spec, out } => gen(&spec, out.as_deref()),
        Command::Compile { spec, arch, nvrtc } => compile(&spec, &arch, nvrtc.as_deref()),
        Command::Verify {
            reference,
            spec,
            steps,
            batch,
            prefill,
            cpu_only,
            nvrtc,
        } => verify_cmd(
            &reference,
            &spec,
            steps,
            &batch,
            &prefill,
            cpu_only,
            nvrtc.as_deref(),
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_spec(arg: &str) -> Result<ResolvedSpec, String> {
    let r = resolve(arg)?;
    if let Some(note) = &r.note {
        eprintln!("note: {note}");
    }
    r.layout
        .check_supported()
        .map_err(|e| format!("{arg}: {e}"))?;
    Ok(r)
}

fn kernels_of(spec: &ResolvedSpec) -> Result<LayoutKernels, String> {
    LayoutKernels::new(&spec.layout, &KernelTiles::heuristic(&spec.layout))
        .map_err(|e| e.to_string())
}

fn gen(arg: &str, out: Option<&Path>) -> Result<ExitCode, String> {
    let spec = load_spec(arg)?;
    let kernels = kernels_of(&spec)?;
    let module = generate_module(&kernels.specs).map_err(|e| e.to_string())?;
    match out {
        None => print!("{}", module.source),
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let write = |name: &str, text: &str| -> Result<(), String> {
                let path = dir.join(format!("{name}.cu"));
                std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
                println!("{}", path.display());
                Ok(())
            };
            for s in &kernels.specs {
                let single = generate_module(std::slice::from_ref::<KernelSpec>(s))
                    .map_err(|e| e.to_string())?;
                write(&s.name(), &single.source)?;
            }
            write(&module.name, &module.source)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn compile(arg: &str, archs: &[String], nvrtc: Option<&Path>) -> Result<ExitCode, String> {
    let spec = load_spec(arg)?;
    let kernels = kernels_of(&spec)?;
    let module = generate_module(&kernels.specs).map_err(|e| e.to_string())?;
    let compiler =
        Compiler::new(nvrtc, Compiler::default_cache_dir()).map_err(|e| e.to_string())?;
    let info = compiler.nvrtc();
    println!(
        "NVRTC {}.{} ({})",
        info.version.0, info.version.1, info.library
    );
    println!("module {} ({} kernels):", module.name, module.kernels.len());
    for (_, name) in &module.kernels {
        println!("  {name}");
    }
    let mut failed = false;
    for a in archs {
        let arch = Arch::parse(a).map_err(|e| e.to_string())?;
        match compiler.compile(&module.name, &module.source, arch) {
            Ok(c) => {
                let how = match c.origin {
                    CubinOrigin::Compiled(t) => {
                        format!("compiled in {:.0} ms (cold)", t.as_secs_f64() * 1e3)
                    }
                    CubinOrigin::Disk(t) => format!(
                        "loaded from the disk cache in {:.2} ms",
                        t.as_secs_f64() * 1e3
                    ),
                    CubinOrigin::Memory => "found in memory".into(),
                };
                println!("{}: ok, {} bytes of CUBIN, {how}", arch.sm(), c.image.len());
                if let Some(w) = &c.cache_warning {
                    eprintln!("warning: the module was not saved to the disk cache: {w}");
                }
                if !c.log.is_empty() {
                    println!("{}: NVRTC warnings:\n{}", arch.sm(), c.log);
                    failed = true;
                }
            }
            Err(e) => {
                println!("{}: FAILED: {e}", arch.sm());
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn open_gpu(nvrtc: Option<&Path>) -> Result<Gpu, String> {
    let compiler =
        Compiler::new(nvrtc, Compiler::default_cache_dir()).map_err(|e| e.to_string())?;
    Gpu::new(0, Arc::new(compiler)).map_err(|e| e.to_string())
}

fn default_reference_files() -> Vec<PathBuf> {
    let dir = kivi_reference::data_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[allow(clippy::too_many_arguments)]
fn verify_cmd(
    references: &[PathBuf],
    specs: &[String],
    steps: u32,
    batches: &[u32],
    prefills: &[u32],
    cpu_only: bool,
    nvrtc: Option<&Path>,
) -> Result<ExitCode, String> {
    let start = Instant::now();
    let mut report = |c: &Check| println!("{c}");
    let gpu = if cpu_only {
        None
    } else {
        match open_gpu(nvrtc) {
            Ok(g) => {
                println!("GPU: {} ({})", g.name(), g.arch().sm());
                Some(g)
            }
            Err(e) if references.is_empty() => {
                return Err(format!("{e} (use --reference FILE to check on the CPU)"))
            }
            Err(e) => {
                println!("no GPU ({e}): checking on the CPU reference only");
                None
            }
        }
    };
    let mut checks: Vec<Check> = Vec::new();
    if references.is_empty() {
        let gpu = gpu.as_ref().ok_or("--cpu-only needs --reference FILE")?;
        let list: Vec<String> = if specs.is_empty() {
            verify::VERIFY_PRESETS
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            specs.to_vec()
        };
        for s in &list {
            let spec = load_spec(s)?;
            checks.extend(verify::verify_layout_on_gpu(
                gpu,
                &spec.layout,
                s,
                prefills,
                batches,
                steps,
                &mut report,
            ));
        }
        let files = default_reference_files();
        if files.is_empty() {
            println!(
                "no reference files in {} (set KIVI_DATA to the folder holding them)",
                kivi_reference::data_dir().display()
            );
        }
        for f in &files {
            checks.extend(verify::verify_file_on_gpu(gpu, f, &mut report)?);
        }
    } else {
        for f in references {
            checks.extend(
                verify::verify_file_on_cpu(f, &mut report)
                    .map_err(|e| format!("{}: {e}", f.display()))?,
            );
            if let Some(gpu) = &gpu {
                checks.extend(
                    verify::verify_file_on_gpu(gpu, f, &mut report)
                        .map_err(|e| format!("{}: {e}", f.display()))?,
                );
            }
        }
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    println!(
        "{} passed, {} failed ({:.1} s; driver {}, nvrtc {})",
        checks.len() - failed,
        failed,
        start.elapsed().as_secs_f64(),
        if toolkit::driver_present() {
            "present"
        } else {
            "absent"
        },
        if gpu.is_some() { "used" } else { "not used" }
    );
    Ok(if failed == 0 && !checks.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
