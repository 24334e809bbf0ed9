//! Finding the CUDA libraries: libnvrtc (to compile) and libcuda (to run).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Result, RuntimeError};

/// The CUDA major version this build's NVRTC bindings expect (`libnvrtc.so.13` with the default feature
/// `cuda-13`, `libnvrtc.so.12` with `cuda-12`).
#[cfg(all(feature = "cuda-13", not(feature = "cuda-12")))]
pub const CUDA_MAJOR: u32 = 13;
/// The CUDA major version this build's NVRTC bindings expect (`libnvrtc.so.12`: the `cuda-12` feature).
#[cfg(all(feature = "cuda-12", not(feature = "cuda-13")))]
pub const CUDA_MAJOR: u32 = 12;
#[cfg(not(any(
    all(feature = "cuda-13", not(feature = "cuda-12")),
    all(feature = "cuda-12", not(feature = "cuda-13"))
)))]
compile_error!(
    "kivi-runtime needs exactly one of the features `cuda-13` (the default) and `cuda-12`: build with \
     `--no-default-features --features cuda-12` for CUDA 12"
);

/// What [`locate_nvrtc`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvrtcInfo {
    /// The library file that was loaded, or the bare name the dynamic loader resolved.
    pub library: String,
    /// NVRTC's own version, (major, minor).
    pub version: (i32, i32),
}

fn lib_file_name() -> String {
    format!("libnvrtc.so.{CUDA_MAJOR}")
}

/// The places searched for libnvrtc, in order: `explicit` (a file or folder), `$KIVI_NVRTC` (file or folder),
/// `$CUDA_HOME`, `$CUDA_PATH` (their `lib64` and `lib`), `/usr/local/cuda/lib64`, then the dynamic loader's own
/// search (LD_LIBRARY_PATH, ldconfig).
pub fn nvrtc_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let name = lib_file_name();
    let mut out = Vec::new();
    let mut push_path = |p: PathBuf| {
        if p.is_dir() {
            out.push(p.join(&name));
        } else {
            out.push(p);
        }
    };
    if let Some(p) = explicit {
        push_path(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KIVI_NVRTC") {
        push_path(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            out.push(root.join("lib64").join(&name));
            out.push(root.join("lib").join(&name));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/lib64").join(&name));
    out
}

/// Loads a shared library with RTLD_LAZY | RTLD_GLOBAL and keeps it loaded for the life of the process, so that
/// later `dlopen`s of its soname (by cudarc, by NVRTC) find it. Returns false if it cannot be loaded.
fn keep_loaded(path: &Path) -> bool {
    const RTLD_LAZY_GLOBAL: i32 = 0x001 | 0x100;
    // SAFETY: loading a shared library runs its initialisers; NVIDIA's NVRTC libraries' are benign. The handle
    // is leaked on purpose: it must stay loaded.
    match unsafe { libloading::os::unix::Library::open(Some(path), RTLD_LAZY_GLOBAL) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

static NVRTC: OnceLock<std::result::Result<NvrtcInfo, String>> = OnceLock::new();

/// Finds and loads libnvrtc once per process (see [`nvrtc_candidates`] for the search order), so that the NVRTC
/// bindings find it by its soname, and checks that its major version is [`CUDA_MAJOR`]. A library cannot be
/// unloaded: later calls return the first call's answer, whatever `explicit` they pass. An `explicit` path (the
/// CLI's `--nvrtc`) must work: if it is not a loadable `libnvrtc.so.<major>`, nothing else is tried.
///
/// # Errors
/// [`RuntimeError::NvrtcMissing`] listing every place tried (or only the explicit one, saying why it failed).
pub fn locate_nvrtc(explicit: Option<&Path>) -> Result<NvrtcInfo> {
    let found = NVRTC.get_or_init(|| {
        let candidates = nvrtc_candidates(explicit);
        if explicit.is_some() {
            let c = &candidates[0];
            let name = c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !c.is_file() {
                return Err(format!("{} (given explicitly: no such file)", c.display()));
            }
            if !name.starts_with("libnvrtc.so") {
                return Err(format!(
                    "{} (given explicitly: not libnvrtc.so.{CUDA_MAJOR}, the NVRTC library)",
                    c.display()
                ));
            }
        }
        let mut library = None;
        for c in &candidates {
            if !c.is_file() {
                continue;
            }
            // NVRTC opens libnvrtc-builtins by name when it compiles: load the one beside it first, so that a
            // library found outside the loader's search path works too.
            if let Some(dir) = c.parent() {
                for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with("libnvrtc-builtins.so.") && !name.contains("alt") {
                        keep_loaded(&entry.path());
                    }
                }
            }
            if keep_loaded(c) {
                library = Some(c.display().to_string());
                break;
            }
        }
        // SAFETY: is_culib_present only tries to dlopen the library by name.
        let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
        if !present {
            let mut searched: Vec<String> =
                candidates.iter().map(|c| c.display().to_string()).collect();
            searched.push(format!("{} via the dynamic loader", lib_file_name()));
            return Err(searched.join(", "));
        }
        let library = library.unwrap_or_else(lib_file_name);
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is loaded (checked above); the out-pointers are valid.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
        if major != CUDA_MAJOR as i32 {
            return Err(format!(
                "{library} (found first by the loader) is NVRTC {major}.{minor}, but this build of kivi needs \
                 CUDA {CUDA_MAJOR}'s"
            ));
        }
        Ok(NvrtcInfo {
            library,
            version: (major, minor),
        })
    });
    found
        .clone()
        .map_err(|searched| RuntimeError::NvrtcMissing {
            cuda_major: CUDA_MAJOR,
            searched,
        })
}

/// True if the CUDA driver library (libcuda) can be loaded; without it no GPU can be used.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by name.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The CUDA include folder, if one is found (`$CUDA_HOME/include`, `$CUDA_PATH/include`,
/// `/usr/local/cuda/include`). kivi's kernels need no CUDA header; this is reported for users' own code.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
        .into_iter()
        .map(|r| r.join("include"))
        .find(|d| d.join("cuda_fp16.h").is_file())
}
