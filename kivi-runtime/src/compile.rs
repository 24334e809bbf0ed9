//! NVRTC: CUDA C++ text to CUBIN for one GPU architecture, with an in-memory and an on-disk cache.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Result, RuntimeError};
use crate::toolkit::{locate_nvrtc, NvrtcInfo};

/// A GPU architecture to compile for, as its compute capability (e.g. (9, 0) is `sm_90`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Major compute capability.
    pub major: u32,
    /// Minor compute capability.
    pub minor: u32,
}

impl Arch {
    /// Parses `sm_90`, `sm90`, `90` or `9.0`.
    ///
    /// # Errors
    /// [`RuntimeError::State`] for anything else, or an arch below sm_80 (kivi's kernels use mma.sync, cp.async and
    /// movmatrix).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text
            .trim()
            .trim_start_matches("sm_")
            .trim_start_matches("sm");
        let (major, minor) = if let Some((a, b)) = t.split_once('.') {
            (a.parse::<u32>().ok(), b.parse::<u32>().ok())
        } else if t.len() >= 2 && t.chars().all(|c| c.is_ascii_digit()) {
            let (a, b) = t.split_at(t.len() - 1);
            (a.parse().ok(), b.parse().ok())
        } else {
            (None, None)
        };
        match (major, minor) {
            (Some(major), Some(minor))
                if major.saturating_mul(10).saturating_add(minor) >= 80 && minor < 10 =>
            {
                Ok(Arch { major, minor })
            }
            _ => Err(RuntimeError::State(format!(
                "arch `{text}` is not a compute capability kivi's kernels run on: they need sm_80 or newer \
                 (mma.sync, cp.async, movmatrix); write e.g. sm_80, sm_90 or 9.0"
            ))),
        }
    }

    /// `sm_XY`.
    pub fn sm(&self) -> String {
        format!("sm_{}{}", self.major, self.minor)
    }
}

/// Compiled machine code of one module for one arch.
#[derive(Clone, Debug)]
pub struct Cubin {
    /// The ELF image NVRTC produced.
    pub image: Arc<Vec<u8>>,
    /// NVRTC's log: warnings, empty when there are none.
    pub log: String,
    /// Where it came from and how long that took.
    pub origin: CubinOrigin,
    /// Set when the module could not be written to the disk cache (the CUBIN itself is fine).
    pub cache_warning: Option<String>,
}

/// Where a [`Cubin`] came from, with the time it took (wall clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CubinOrigin {
    /// Compiled by NVRTC now (cold).
    Compiled(Duration),
    /// Read from the on-disk cache.
    Disk(Duration),
    /// Found in this process's memory.
    Memory,
}

/// A module in the in-memory cache: its CUBIN and NVRTC's log.
type MemoryEntry = (Arc<Vec<u8>>, String);

/// NVRTC compiler with a module cache keyed by the SHA-256 of (source, arch, NVRTC version, options).
///
/// The disk cache lives in `$KIVI_CACHE_DIR/modules`, else `$XDG_CACHE_HOME/kivi/modules`, else
/// `~/.cache/kivi/modules` (see [`Compiler::default_cache_dir`]); files are written atomically (temp file +
/// rename), so concurrent processes never see half a file.
#[derive(Debug)]
pub struct Compiler {
    nvrtc: NvrtcInfo,
    cache_dir: Option<PathBuf>,
    memory: Mutex<HashMap<String, MemoryEntry>>,
}

/// The options every kivi module is compiled with besides the arch. No fast-math: the quantize kernels rely on
/// correctly rounded division.
pub const NVRTC_OPTIONS: [&str; 3] = [
    "--std=c++17",
    "--fmad=true",
    "--device-as-default-execution-space",
];

impl Compiler {
    /// A compiler that loads libnvrtc (see [`crate::toolkit::nvrtc_candidates`]) and caches on disk in
    /// `cache_dir` (`None`: memory only).
    ///
    /// # Errors
    /// [`RuntimeError::NvrtcMissing`] if libnvrtc cannot be loaded.
    pub fn new(nvrtc_path: Option<&Path>, cache_dir: Option<PathBuf>) -> Result<Self> {
        let nvrtc = locate_nvrtc(nvrtc_path)?;
        Ok(Compiler {
            nvrtc,
            cache_dir,
            memory: Mutex::new(HashMap::new()),
        })
    }

    /// The process-wide compiler of embedders that open modules one at a time (the C ABI, the Python package):
    /// made on first success with the default NVRTC search and [`Compiler::default_cache_dir`], then shared, so
    /// every module of a layout after the first comes from its memory (and a later process from the disk cache)
    /// instead of NVRTC. A failure is not remembered: a later call searches again.
    ///
    /// # Errors
    /// As [`Compiler::new`].
    pub fn shared() -> Result<std::sync::Arc<Compiler>> {
        static SHARED: Mutex<Option<std::sync::Arc<Compiler>>> = Mutex::new(None);
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = std::sync::Arc::new(Compiler::new(None, Compiler::default_cache_dir())?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The default disk cache folder (see the type's docs); `None` if no home folder is known.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("KIVI_CACHE_DIR") {
            return Some(PathBuf::from(d).join("modules"));
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(d).join("kivi").join("modules"));
        }
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache").join("kivi").join("modules"))
    }

    /// The NVRTC that was loaded.
    pub fn nvrtc(&self) -> &NvrtcInfo {
        &self.nvrtc
    }

    /// The cache key of a module: hex SHA-256 of source, arch, NVRTC version and options.
    pub fn cache_key(&self, source: &str, arch: Arch) -> String {
        let mut h = Sha256::new();
        h.update(source.as_bytes());
        h.update([0]);
        h.update(arch.sm().as_bytes());
        h.update(
            format!(
                "\0nvrtc {}.{}\0",
                self.nvrtc.version.0, self.nvrtc.version.1
            )
            .as_bytes(),
        );
        for o in NVRTC_OPTIONS {
            h.update(o.as_bytes());
            h.update([0]);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// CUBIN of `source` for `arch`: from memory, else from disk, else compiled by NVRTC (then stored in both).
    /// A disk cache that cannot be read is a miss; one that cannot be written sets [`Cubin::cache_warning`].
    /// `module_name` names the cache file (characters other than `[A-Za-z0-9_-]` become `_`).
    ///
    /// # Errors
    /// [`RuntimeError::Compile`] with NVRTC's log; [`RuntimeError::Nvrtc`] if NVRTC itself fails.
    pub fn compile(&self, module_name: &str, source: &str, arch: Arch) -> Result<Cubin> {
        let key = self.cache_key(source, arch);
        if let Some((image, log)) = self.memory.lock().map_err(poisoned)?.get(&key) {
            return Ok(Cubin {
                image: image.clone(),
                log: log.clone(),
                origin: CubinOrigin::Memory,
                cache_warning: None,
            });
        }
        let path = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{module_name}-{}.cubin", &key[..24])));
        if let Some(path) = &path {
            let start = Instant::now();
            if let Ok(bytes) = std::fs::read(path) {
                if is_elf(&bytes) {
                    let image = Arc::new(bytes);
                    self.remember(&key, &image, "");
                    return Ok(Cubin {
                        image,
                        log: String::new(),
                        origin: CubinOrigin::Disk(start.elapsed()),
                        cache_warning: None,
                    });
                }
            }
        }
        let start = Instant::now();
        let (bytes, log) = nvrtc_compile(module_name, source, arch)?;
        let elapsed = start.elapsed();
        // A cache that cannot be written costs a recompile next time, not this compile.
        let cache_warning = path
            .as_ref()
            .and_then(|p| write_atomic(p, &bytes).err())
            .map(|e| e.to_string());
        let image = Arc::new(bytes);
        self.remember(&key, &image, &log);
        Ok(Cubin {
            image,
            log,
            origin: CubinOrigin::Compiled(elapsed),
            cache_warning,
        })
    }

    fn remember(&self, key: &str, image: &Arc<Vec<u8>>, log: &str) {
        if let Ok(mut m) = self.memory.lock() {
            m.insert(key.to_string(), (image.clone(), log.to_string()));
        }
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> RuntimeError {
    RuntimeError::State("the module cache's lock was poisoned by a panic in another thread".into())
}

fn is_elf(bytes: &[u8]) -> bool {
    bytes.len() > 4 && &bytes[..4] == b"\x7fELF"
}

/// Writes `bytes` to `path` through a temp file in the same folder and a rename (atomic on POSIX).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| RuntimeError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn nvrtc_compile(module_name: &str, source: &str, arch: Arch) -> Result<(Vec<u8>, String)> {
    use cudarc::nvrtc::{result, sys};
    let nv = |e: cudarc::nvrtc::result::NvrtcError| RuntimeError::Nvrtc(format!("{e:?}"));
    let src = CString::new(source)
        .map_err(|_| RuntimeError::Nvrtc("source contains a NUL byte".into()))?;
    let name = CString::new(format!("{module_name}.cu"))
        .map_err(|_| RuntimeError::Nvrtc("module name contains a NUL byte".into()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(nv)?;
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={}", arch.sm()));
    // SAFETY: prog was created above and is destroyed exactly once below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| {
            let bytes: Vec<u8> = raw
                .iter()
                .map(|&c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        })
        .unwrap_or_default();
    let out = if compiled.is_err() {
        Err(RuntimeError::Compile {
            module: module_name.to_string(),
            arch: arch.sm(),
            log: log.clone(),
        })
    } else {
        let mut size = 0usize;
        // SAFETY: prog compiled successfully; size is a valid out-pointer; the buffer has `size` bytes.
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
            .result()
            .map_err(nv)
            .and_then(|_| {
                let mut buf = vec![0u8; size];
                unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }
                    .result()
                    .map_err(nv)
                    .map(|_| buf)
            })
    };
    // SAFETY: prog is valid and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out.map(|bytes| (bytes, log))
}
