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
        /// The module of a paged cache (its decode kernel reads blocks through a block table, `_pg`).
        #[arg(long)]
        paged: bool,
    },
    /// Device memory of a KIVI cache for a layout: bytes of codes, scales and mins, and residual per sequence, per
    /// layer and per model, against an fp16 cache (no GPU needed).
    Memory {
        /// A spec, a preset, or a path to a .kivi file.
        spec: String,
        /// Tokens per sequence the cache has room for.
        #[arg(long, default_value_t = 32768)]
        context: u32,
        /// Sequences (batch entries).
        #[arg(long, default_value_t = 1)]
        batch: u32,
        /// Layers of the model.
        #[arg(long, default_value_t = 1)]
        layers: u32,
    },
    /// Compile every kernel of a layout with NVRTC and report success and time.
    Compile {
        /// A spec, a preset, or a path to a .kivi file.
        spec: String,
        /// Target archs (sm_80, sm_90, ...); repeat or separate with commas.
        #[arg(long, value_delimiter = ',', default_values_t = ["sm_80".to_string(), "sm_90".to_string()])]
        arch: Vec<String>,
        /// Also write `<module>.<sm>.cubin` per arch into this folder (inspect it with `cuobjdump --dump-sass`
        /// or `cuobjdump --dump-resource-usage`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// libnvrtc to use (a file or its folder); default: KIVI_NVRTC, CUDA_HOME, /usr/local/cuda, the loader.
        #[arg(long)]
        nvrtc: Option<PathBuf>,
        /// The module of a paged cache (its decode kernel reads blocks through a block table, `_pg`).
        #[arg(long)]
        paged: bool,
    },
    /// Time decode steps and prefill on the GPU against FP16 attention (PyTorch SDPA) and the copy bandwidth.
    ///
    /// Per shape: the median time of a decode step (append, split-K attention, combine, flush: CUDA events,
    /// after warm-up, rotating over cache copies that together pass 4x the L2 cache), the bytes it must read
    /// (codes, scales, mins, fp16 residual, queries), GB/s, % of copy bandwidth, the best SDPA backend's time on
    /// the same shape and the speedup; then the prefill (quantize + pack) throughput. The FP16 numbers come from
    /// benches/sdpa_baseline.py, run in the same invocation (skipped with a note when PyTorch is missing).
    Bench {
        /// Quantization spec the shapes run with (the shape sets the heads and head_dim).
        #[arg(long, default_value = "kivi-2")]
        spec: String,
        /// Shapes B,H,Hkv,D,T (tokens attended per step); default: the decode-speed issue's five.
        #[arg(long, value_delimiter = ';')]
        shapes: Vec<String>,
        /// Untimed decode steps first.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Timed decode steps.
        #[arg(long, default_value_t = 50)]
        iters: usize,
        /// Skip the prefill timing.
        #[arg(long)]
        no_prefill: bool,
        /// Decode tiles to compare, each THREADS,STAGES,SPLIT[,BLOCKS] (split 0: automatic; BLOCKS: blocks per
        /// multiprocessor the registers are budgeted for, 0: the compiler's choice, default 512 / THREADS),
        /// separated by ';'; default: the heuristic one.
        #[arg(long, value_delimiter = ';')]
        decode_tile: Vec<String>,
        /// The FP16 baseline script.
        #[arg(long, default_value = "benches/sdpa_baseline.py")]
        baseline: PathBuf,
        /// Python interpreter for the baseline script.
        #[arg(long, default_value = "python3")]
        python: String,
        /// Do not run the baseline script.
        #[arg(long)]
        no_baseline: bool,
        /// Also write the table and the baseline's raw JSON here (markdown).
        #[arg(long)]
        out: Option<PathBuf>,
        /// libnvrtc to use (a file or its folder).
        #[arg(long)]
        nvrtc: Option<PathBuf>,
    },
    /// Tune the decode tile per GPU and shape, and remember the winner in the tuning cache.
    ///
    /// Per shape: every candidate configuration (threads, pipeline stages, split size, register budget; the
    /// heuristic first) is checked against the CPU reference at a small shape and against the heuristic's output at
    /// the shape, then timed like `kivi bench`; the fastest is stored, keyed by GPU, compute capability, SM count,
    /// driver and NVRTC versions, layout, candidate set and generated code, and the context and batch buckets
    /// (powers of two). A shape already in the cache is not tuned again unless --force. `kivi bench` then uses it.
    Tune {
        /// Quantization spec the shapes run with (the shape sets the heads and head_dim).
        #[arg(long, default_value = "kivi-2")]
        spec: String,
        /// Shapes B,H,Hkv,D,T; default: the decode-speed issue's five.
        #[arg(long, value_delimiter = ';')]
        shapes: Vec<String>,
        /// Seconds per shape: screening stops early enough that the final still fits.
        #[arg(long, default_value_t = 15.0)]
        budget: f64,
        /// Timed decode steps of each final timing (after 5 untimed).
        #[arg(long, default_value_t = 40)]
        iters: usize,
        /// Print every candidate (resources, screening time or why it was rejected) and the phases' times.
        #[arg(long, short)]
        verbose: bool,
        /// Tune again even where the cache has the shape.
        #[arg(long)]
        force: bool,
        /// Print the tuning cache and exit (no GPU needed).
        #[arg(long)]
        show: bool,
        /// The tuning cache file (default: $KIVI_CACHE_DIR/tune.json, else $XDG_CACHE_HOME/kivi/tune.json, else ~/.cache/kivi/tune.json).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// libnvrtc to use (a file or its folder).
        #[arg(long)]
        nvrtc: Option<PathBuf>,
    },
    /// The attention-output error of layouts on captured q/k/v, against exact attention (CPU, no GPU needed).
    ///
    /// For a reference-format file (e.g. tests/data/real_kv_smollm2_135m.safetensors, or your own capture with
    /// step_out_fp32_unquantized): each layout replays every stream through the CPU reference; the table gives the
    /// relative L2 error per stream (layer), pooled over all, and the worst single (batch, head, step); an FP8
    /// e4m3 cache with one scale per head is a comparison row.
    Eval {
        /// The file of captured q/k/v.
        #[arg(long)]
        reference: PathBuf,
        /// Quantization specs to compare (repeatable); the file sets the heads and head_dim.
        #[arg(long, default_values_t = ["kivi-2".to_string(), "kivi-4".to_string()])]
        layout: Vec<String>,
        /// Leave out the FP8 row.
        #[arg(long)]
        no_fp8: bool,
    },
    /// Check the kernels on the GPU against the CPU reference and the paper's reference files.
    ///
    /// Without --reference: the presets (kivi-2 and kivi-4 with the llama-2-7b, llama-3-8b and smollm2-135m
    /// shapes, MQA with one sequence, 32 heads on one KV head, 1- and 8-bit codes, 16- and 64-element groups,
    /// head_dim 96) over awkward prefill lengths, then every reference file found in KIVI_DATA (or tests/data).
    /// With --reference FILE: that file only, on the CPU reference, and on the GPU too when there is one.
    Verify {
        /// A reference file (safetensors, one of the formats in tests/data/README.md).
        #[arg(long)]
        reference: Vec<PathBuf>,
        /// Specs to verify instead of the default presets.
        #[arg(long)]
        spec: Vec<String>,
        /// Verify the sampled layout matrix (80 layouts: every bit width 1, 2, 3, 4, 8 for keys and values, head_dim
        /// 32 to 256, MHA, GQA and MQA, groups 16 to 128 and per_block, symmetric, fp32 rounding, sink tokens,
        /// different key and value head_dims) instead of the default presets, after any --spec (not with
        /// --reference).
        #[arg(long)]
        matrix: bool,
        /// Decode steps per run.
        #[arg(long, default_value_t = 300)]
        steps: u32,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_values_t = [1u32, 3])]
        batch: Vec<u32>,
        /// Prefill lengths.
        #[arg(long, value_delimiter = ',', default_values_t = verify::AWKWARD_PREFILLS.to_vec())]
        prefill: Vec<u32>,
        /// With --reference: check the files on the CPU reference only, even where there is a GPU.
        #[arg(long)]
        cpu_only: bool,
        /// Decode tiles to verify instead of the heuristic one: THREADS,STAGES,SPLIT[,BLOCKS] (split 0 =
        /// automatic), separated by ';' (e.g. a tuned tile from `kivi tune --show`).
        #[arg(long, value_delimiter = ';')]
        decode_tile: Vec<String>,
        /// libnvrtc to use (a file or its folder).
        #[arg(long)]
        nvrtc: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gen { spec, out, paged } => gen(&spec, out.as_deref(), paged),
        Command::Memory {
            spec,
            context,
            batch,
            layers,
        } => memory(&spec, context, batch, layers),
        Command::Compile {
            spec,
            arch,
            out,
            nvrtc,
            paged,
        } => compile(&spec, &arch, out.as_deref(), nvrtc.as_deref(), paged),
        Command::Bench {
            spec,
            shapes,
            warmup,
            iters,
            no_prefill,
            decode_tile,
            baseline,
            python,
            no_baseline,
            out,
            nvrtc,
        } => bench_cmd(
            &spec,
            &shapes,
            &decode_tile,
            kivi_cli::bench::BenchOptions {
                quant: spec.clone(),
                warmup,
                iters,
                prefill: !no_prefill,
                decode_tile: None,
            },
            (!no_baseline).then_some((python.as_str(), baseline.as_path())),
            out.as_deref(),
            nvrtc.as_deref(),
        ),
        Command::Tune {
            spec,
            shapes,
            budget,
            iters,
            verbose,
            force,
            show,
            cache,
            nvrtc,
        } => tune_cmd(
            &spec,
            &shapes,
            budget,
            iters,
            verbose,
            force,
            show,
            cache.as_deref(),
            nvrtc.as_deref(),
        ),
        Command::Eval {
            reference,
            layout,
            no_fp8,
        } => kivi_cli::eval::eval_file(&reference, &layout, !no_fp8).map(|rows| {
            println!("{}", kivi_cli::eval::table(&rows));
            ExitCode::SUCCESS
        }),
        Command::Verify {
            reference,
            mut spec,
            matrix,
            steps,
            batch,
            prefill,
            cpu_only,
            decode_tile,
            nvrtc,
        } => {
            if matrix {
                spec.extend(verify::sampled_matrix());
            }
            if matrix && !reference.is_empty() {
                Err("--matrix verifies generated layouts on the GPU and --reference checks files: give one or the \
                     other"
                    .to_string())
            } else {
                verify_cmd(
                    &reference,
                    &spec,
                    steps,
                    &batch,
                    &prefill,
                    cpu_only,
                    &decode_tile,
                    nvrtc.as_deref(),
                )
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn memory(spec: &str, context: u32, batch: u32, layers: u32) -> Result<ExitCode, String> {
    let r = load_spec(spec)?;
    let l = &r.layout;
    for (what, v) in [("context", context), ("batch", batch), ("layers", layers)] {
        if v == 0 {
            return Err(format!("--{what} 0: give at least 1"));
        }
    }
    if context > kivi_runtime::MAX_CAPACITY {
        return Err(format!(
            "--context {context}: a cache holds at most {} tokens per sequence",
            kivi_runtime::MAX_CAPACITY
        ));
    }
    let st = kivi_codegen::StorageLayout::new(l);
    if l.sink_tokens > context {
        eprintln!(
            "note: sink_tokens {} exceeds the context {context}: a cache still keeps {} {} sink rows per sequence",
            l.sink_tokens,
            l.sink_tokens,
            l.dtype.as_str()
        );
    }
    let m = st.memory(context);
    let seqs = u64::from(batch) * u64::from(l.num_kv_heads);
    let per_layer = seqs * m.total();
    let fp16 = seqs
        * kivi_codegen::MemoryBreakdown::fp16_bytes(context, l.keys.head_dim, l.values.head_dim);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let dt = l.dtype.as_str();
    let residual = format!("{dt} residual rings and sinks");
    println!(
        "{}\ncontext {context} tokens, batch {batch}, {} KV heads, {layers} layer{}",
        l.to_spec(),
        l.num_kv_heads,
        if layers == 1 { "" } else { "s" }
    );
    println!("| part | bytes per sequence (one KV head) | MiB per layer | MiB per model |");
    println!("|---|---|---|---|");
    for (name, b) in [
        ("key codes", m.key_codes),
        ("key scales + mins", m.key_scales_mins),
        ("value codes", m.value_codes),
        ("value scales + mins", m.value_scales_mins),
        (residual.as_str(), m.residual),
        ("total", m.total()),
    ] {
        println!(
            "| {name} | {b} | {:.2} | {:.2} |",
            mib(seqs * b),
            mib(seqs * b * u64::from(layers))
        );
    }
    println!(
        "| {dt} cache, same capacity | {} | {:.2} | {:.2} |",
        fp16 / seqs,
        mib(fp16),
        mib(fp16 * u64::from(layers))
    );
    let ratio = fp16 as f64 / per_layer as f64;
    let comparison = if ratio >= 1.0 {
        format!("{ratio:.2}x smaller than {dt}")
    } else {
        // Tiny contexts: the fp16 rings and whole blocks outweigh what the codes save.
        format!("{:.2}x larger than {dt}", 1.0 / ratio)
    };
    // The automatic split's most splits over any length up to the context (tokens after the sinks).
    let splits = kivi_codegen::DecodePlan::new(l).max_splits(0, context);
    println!(
        "{comparison}. Blocks of {} tokens are allocated for the whole capacity (less the sink tokens, which sit beside \
         the rings); the decode kernel's split-K scratch (batch x num_heads x splits x (value head_dim + 2) x 4 \
         bytes, at most {:.2} MiB per layer with the automatic split's {splits} at this context) comes on top.",
        l.residual_length,
        mib(u64::from(batch)
            * u64::from(l.num_heads)
            * u64::from(splits)
            * (u64::from(l.values.head_dim) + 2)
            * 4)
    );
    Ok(ExitCode::SUCCESS)
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

/// The kernels of the layout with the heuristic tiles (`paged`: the paged decode kernel).
fn kernels_of(spec: &ResolvedSpec, paged: bool) -> Result<LayoutKernels, String> {
    let mut tiles = KernelTiles::heuristic(&spec.layout);
    if paged {
        tiles = tiles.paged();
    }
    LayoutKernels::new(&spec.layout, &tiles).map_err(|e| e.to_string())
}

fn gen(arg: &str, out: Option<&Path>, paged: bool) -> Result<ExitCode, String> {
    let spec = load_spec(arg)?;
    let kernels = kernels_of(&spec, paged)?;
    let module = generate_module(&kernels.specs).map_err(|e| e.to_string())?;
    match out {
        None => {
            // A closed pipe (`kivi gen | head`) ends the output quietly, as for any Unix filter.
            use std::io::Write;
            match std::io::stdout().lock().write_all(module.source.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(format!("writing to stdout: {e}"))
                }
                _ => {}
            }
        }
        Some(dir) => {
            if dir.exists() && !dir.is_dir() {
                return Err(format!(
                    "--out {}: not a folder (--out takes a folder; one .cu file per kernel goes into it)",
                    dir.display()
                ));
            }
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

fn compile(
    arg: &str,
    archs: &[String],
    out: Option<&Path>,
    nvrtc: Option<&Path>,
    paged: bool,
) -> Result<ExitCode, String> {
    // Every argument is checked before anything is compiled.
    let archs = archs
        .iter()
        .map(|a| Arch::parse(a).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    let spec = load_spec(arg)?;
    let kernels = kernels_of(&spec, paged)?;
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
    for arch in archs {
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
                if let Some(dir) = out {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                    let path = dir.join(format!("{}.{}.cubin", module.name, arch.sm()));
                    std::fs::write(&path, c.image.as_slice())
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    println!("  wrote {}", path.display());
                }
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

#[allow(clippy::too_many_arguments)]
fn tune_cmd(
    spec: &str,
    shapes: &[String],
    budget: f64,
    iters: usize,
    verbose: bool,
    force: bool,
    show: bool,
    cache: Option<&Path>,
    nvrtc: Option<&Path>,
) -> Result<ExitCode, String> {
    use kivi_cli::bench::{layout_for, shapes_for};
    use kivi_cli::tune;
    let mut tc = tune::open_cache(cache)?;
    if show {
        print!("{}", tune::show(&tc));
        return Ok(ExitCode::SUCCESS);
    }
    let shapes = shapes_for(spec, shapes)?;
    let gpu = open_gpu(nvrtc)?;
    println!(
        "kivi tune on {} ({}), spec {spec}, cache {}",
        gpu.name(),
        gpu.arch().sm(),
        tc.path().display()
    );
    let opts = tune::TuneOptions {
        budget_s: budget,
        iters,
        ..tune::TuneOptions::default()
    };
    let mut rows = String::from(
        "| shape B,H,Hkv,D,T | candidates (timed / all) | modules compiled (s) | best tile (threads,stages,split,blocks) | best us | heuristic us | worst us | gain over heuristic | seconds |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let run_start = std::time::Instant::now();
    for s in &shapes {
        let layout = layout_for(spec, s)?;
        if tune::tuned_completely(&gpu, &tc, &layout, s) && !force {
            println!("  {}: in the cache (use --force to tune again)", s.label());
            continue;
        }
        let t0 = std::time::Instant::now();
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "  {prefix} [{bar:30}] {pos}/{len} {elapsed} {msg}",
            )
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
        );
        bar.set_prefix(s.label());
        let mut best = f64::MAX;
        let report = tune::tune_shape(&gpu, spec, s, &opts, &mut tc, &mut |i, n, r| {
            bar.set_length(n as u64);
            bar.set_position(i as u64 + 1);
            if let Some(us) = r.screen_us {
                best = best.min(us);
            }
            bar.set_message(format!("best screened {best:.1} us"));
            if verbose {
                let res = r.resources.map_or(String::new(), |x| {
                    format!(
                        " [{} regs, {} B local, {} warps/SM]",
                        x.registers,
                        x.local_bytes,
                        x.warps_per_sm()
                    )
                });
                let what = match (r.screen_us, &r.rejected) {
                    (Some(us), _) => format!("{us:.1} us"),
                    (None, reason) => format!("rejected: {}", reason.as_deref().unwrap_or("")),
                };
                bar.suspend(|| {
                    println!(
                        "  {} [{}/{n}] {},{},{},{}{res}: {what}",
                        s.label(),
                        i + 1,
                        r.tile.threads,
                        r.tile.stages,
                        r.tile.split_tokens,
                        r.tile.min_blocks
                    )
                });
            }
        });
        bar.finish_and_clear();
        let report = report?;
        tc.save()?;
        let e = &report.entry;
        if verbose {
            for r in report.results.iter().filter(|r| r.final_us.is_some()) {
                println!(
                    "  {} final {}: {:.1} us",
                    s.label(),
                    kivi_autotune::cache::StoredTile::from(r.tile),
                    r.final_us.unwrap_or(f64::NAN)
                );
            }
            println!(
                "  {}: compile {:.1} s, CPU reference {:.1} s, checks + screening {:.1} s, final {:.1} s",
                s.label(),
                report.compiled.1,
                report.phases[0],
                report.phases[1],
                report.phases[2]
            );
        }
        rows.push_str(&format!(
            "| {} | {} / {}{} | {} ({:.1}) | {} | {:.1} | {:.1} | {:.1} | {:.1}% | {:.1} |\n",
            s.label(),
            e.candidates,
            report.candidates,
            if e.complete { "" } else { " (budget)" },
            report.compiled.0,
            report.compiled.1,
            e.tile,
            e.best_us,
            e.heuristic_us,
            e.worst_us,
            100.0 * (e.heuristic_us / e.best_us - 1.0),
            t0.elapsed().as_secs_f64()
        ));
    }
    println!("{rows}");
    println!(
        "kivi tune: {:.1} s for {} shapes",
        run_start.elapsed().as_secs_f64(),
        shapes.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_tile(text: &str) -> Result<kivi_codegen::TileConfig, String> {
    let bad =
        || format!("decode tile {text:?}: expected THREADS,STAGES,SPLIT[,BLOCKS], e.g. 128,3,0,4");
    let n: Vec<u32> = text
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let (threads, stages, split_tokens, min_blocks) = match n[..] {
        [t, p, s] => (t, p, s, 512 / t.max(1)),
        [t, p, s, b] => (t, p, s, b),
        _ => return Err(bad()),
    };
    Ok(kivi_codegen::TileConfig {
        threads,
        split_tokens,
        stages,
        min_blocks,
        paged: false,
    })
}

fn bench_cmd(
    spec: &str,
    shapes: &[String],
    tiles: &[String],
    opts: kivi_cli::bench::BenchOptions,
    baseline: Option<(&str, &Path)>,
    out: Option<&Path>,
    nvrtc: Option<&Path>,
) -> Result<ExitCode, String> {
    use kivi_cli::bench::{run_baseline, run_shape, shapes_for, table, Baseline};
    let shapes = shapes_for(spec, shapes)?;
    let tiles: Vec<Option<kivi_codegen::TileConfig>> = if tiles.is_empty() {
        vec![None]
    } else {
        tiles
            .iter()
            .map(|t| parse_tile(t).map(Some))
            .collect::<Result<_, _>>()?
    };
    let gpu = open_gpu(nvrtc)?;
    println!(
        "kivi bench on {} ({}), spec {spec}",
        gpu.name(),
        gpu.arch().sm()
    );
    // Without --decode-tile, a tuned tile from the tuning cache where one exists (kivi tune).
    let tune_cache = kivi_cli::tune::open_cache(None).ok();
    let mut results = Vec::new();
    for (s, tile) in shapes
        .iter()
        .flat_map(|s| tiles.iter().map(move |t| (s, *t)))
    {
        let tile = match (tile, &tune_cache) {
            (None, Some(tc)) => {
                let layout = kivi_cli::bench::layout_for(spec, s)?;
                match kivi_cli::tune::tiles_for(&gpu, tc, &layout, s) {
                    (t, true) => {
                        println!(
                            "  {}: using the tuned decode tile {:?}",
                            s.label(),
                            t.decode
                        );
                        Some(t.decode)
                    }
                    _ => None,
                }
            }
            (t, _) => t,
        };
        let opts = kivi_cli::bench::BenchOptions {
            decode_tile: tile,
            ..opts.clone()
        };
        let r = match run_shape(&gpu, s, &opts) {
            Ok(r) => r,
            Err(e) => {
                println!("  {} with decode tile {:?}: not run: {e}", s.label(), tile);
                continue;
            }
        };
        println!(
            "  {}: decode step median {:.1} us (min {:.1}, max {:.1}, {} steps over {} cache copies)",
            s.label(),
            r.decode.median_ms * 1e3,
            r.decode.min_ms * 1e3,
            r.decode.max_ms * 1e3,
            r.decode.samples,
            r.copies
        );
        results.push(r);
    }
    drop(gpu);
    let base = match baseline {
        Some((python, script)) => {
            println!("running the FP16 baseline: {python} {}", script.display());
            run_baseline(python, script, &shapes)
        }
        None => Baseline {
            raw: "not run (--no-baseline)".into(),
            ..Baseline::default()
        },
    };
    if base.copy_gbps.is_none() {
        println!("FP16 baseline unavailable: {}", base.raw);
    } else {
        println!(
            "copy bandwidth (PyTorch, >= 2 GiB device-to-device, read + write): {:.0} GB/s",
            base.copy_gbps.unwrap_or(0.0)
        );
    }
    let t = table(&results, &base);
    println!("{t}");
    if let Some(path) = out {
        let text = format!(
            "{t}
baseline JSON: {}
",
            base.raw
        );
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn open_gpu(nvrtc: Option<&Path>) -> Result<Gpu, String> {
    // The driver first: without it no GPU can run, whatever NVRTC does.
    if !kivi_runtime::toolkit::driver_present() {
        return Err(kivi_runtime::RuntimeError::DriverMissing.to_string());
    }
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
    decode_tiles: &[String],
    nvrtc: Option<&Path>,
) -> Result<ExitCode, String> {
    let start = Instant::now();
    let decode_tiles: Vec<kivi_codegen::TileConfig> = decode_tiles
        .iter()
        .map(|t| parse_tile(t))
        .collect::<Result<_, _>>()?;
    if !decode_tiles.is_empty() && !references.is_empty() {
        return Err(
            "--decode-tile verifies tiles on generated runs (--spec or the presets); reference files (--reference) \
             run with the heuristic tiles: give one or the other"
                .into(),
        );
    }
    // Specs are resolved before the GPU is opened, so that a typo is reported as a typo.
    let list: Vec<String> = if specs.is_empty() {
        verify::VERIFY_PRESETS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        specs.to_vec()
    };
    let resolved: Vec<(&String, ResolvedSpec)> = list
        .iter()
        .map(|s| load_spec(s).map(|r| (s, r)))
        .collect::<Result<_, _>>()?;
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
                return Err(format!(
                "{e} (use --reference FILE to check reference files on the CPU, e.g. the bundled \
                     tests/data/*.safetensors)"
            ))
            }
            Err(e) => {
                println!("no GPU ({e}): checking on the CPU reference only");
                None
            }
        }
    };
    let mut checks: Vec<Check> = Vec::new();
    if references.is_empty() {
        let gpu = gpu.as_ref().ok_or(
            "--cpu-only checks reference files on the CPU and needs --reference FILE (e.g. the bundled \
             tests/data/*.safetensors)",
        )?;
        for (s, spec) in &resolved {
            if decode_tiles.is_empty() {
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
            for &t in &decode_tiles {
                let mut tiles = kivi_codegen::KernelTiles::heuristic(&spec.layout);
                tiles.decode = t;
                checks.extend(verify::verify_tiles_on_gpu(
                    gpu,
                    &spec.layout,
                    &tiles,
                    &format!(
                        "{s} [decode tile {}]",
                        kivi_autotune::cache::StoredTile::from(t)
                    ),
                    prefills,
                    batches,
                    steps,
                    &mut report,
                ));
            }
        }
        // The reference files run with the heuristic tiles: with --decode-tile they would not test the tiles.
        let files = if decode_tiles.is_empty() {
            default_reference_files()
        } else {
            println!(
                "--decode-tile: skipping the reference files (they run with the heuristic tiles)"
            );
            Vec::new()
        };
        if files.is_empty() && decode_tiles.is_empty() {
            println!(
                "no reference files in {} (set KIVI_DATA to the folder holding them)",
                kivi_reference::data_dir().display()
            );
        }
        for f in &files {
            checks.extend(verify::verify_file_on_gpu(gpu, f, &mut report)?);
        }
    } else {
        // The path leads every error, once.
        let with_path = |f: &Path, e: String| {
            let p = f.display().to_string();
            if e.contains(&p) {
                e
            } else {
                format!("{p}: {e}")
            }
        };
        for f in references {
            checks.extend(verify::verify_file_on_cpu(f, &mut report).map_err(|e| with_path(f, e))?);
            if let Some(gpu) = &gpu {
                checks.extend(
                    verify::verify_file_on_gpu(gpu, f, &mut report).map_err(|e| with_path(f, e))?,
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
