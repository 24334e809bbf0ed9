//! The persistent tuning cache: one JSON file of tuned tile configurations, keyed by everything that can change
//! which configuration wins (autotune issue).
//!
//! File format (`kivi-tune-cache`, version [`FORMAT_VERSION`]): `{"format": "kivi-tune-cache", "version": 1,
//! "entries": {KEY: ENTRY, ...}}`. A file that cannot be read, does not parse, or has another format or version
//! is reported (see [`TuneCache::load`]'s warning) and treated as empty, never trusted; the next save rebuilds
//! it. Saves write a temporary file in the same folder and rename it over the old one, so a reader or a second
//! writer only ever sees a whole file; a save first re-reads the file and keeps the entries other processes
//! wrote meanwhile (for one key, the last writer wins).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kivi_codegen::TileConfig;
use serde::{Deserialize, Serialize};

/// The `format` field of a tuning cache file.
pub const FORMAT: &str = "kivi-tune-cache";
/// The `version` field this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Smallest context bucket, tokens.
pub const MIN_CONTEXT_BUCKET: u32 = 256;

/// The context-length bucket of `tokens`: the next power of two, at least [`MIN_CONTEXT_BUCKET`]. Shapes in one
/// bucket share a tuning result (a 3000-token and a 4000-token context both tune as 4096).
pub fn context_bucket(tokens: u32) -> u32 {
    tokens
        .max(MIN_CONTEXT_BUCKET)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The batch bucket of `sequences` (batch x KV heads): the next power of two, at least 1.
pub fn batch_bucket(sequences: u32) -> u32 {
    sequences
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// FNV-1a, 64 bit: a stable hash for keys (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Everything a tuned result depends on. Two runs with equal keys may share a result.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TuneKey {
    /// GPU name, e.g. `NVIDIA H200`.
    pub gpu: String,
    /// Compute capability, e.g. `9.0`.
    pub compute_capability: String,
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// CUDA driver version as the driver reports it (e.g. 13000).
    pub driver: i32,
    /// NVRTC version, e.g. `13.0`.
    pub nvrtc: String,
    /// Kernel kind (`decode`, ...).
    pub kind: String,
    /// Hash of the layout (its canonical spec text).
    pub layout_hash: u64,
    /// Hash of the candidate set and of the generated code it compiles, so a codegen change invalidates results.
    pub candidates_hash: u64,
    /// [`context_bucket`] of the tuned context.
    pub context_bucket: u32,
    /// [`batch_bucket`] of the tuned number of sequences.
    pub batch_bucket: u32,
}

impl fmt::Display for TuneKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gpu={}|cc={}|sms={}|driver={}|nvrtc={}|kind={}|layout={:016x}|candidates={:016x}|ctx={}|seqs={}",
            self.gpu,
            self.compute_capability,
            self.sm_count,
            self.driver,
            self.nvrtc,
            self.kind,
            self.layout_hash,
            self.candidates_hash,
            self.context_bucket,
            self.batch_bucket
        )
    }
}

/// A tile configuration as stored (the fields of [`TileConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTile {
    /// Threads per block.
    pub threads: u32,
    /// Tokens per split (0: automatic).
    pub split_tokens: u32,
    /// Pipeline stages.
    pub stages: u32,
    /// Blocks per multiprocessor the registers are budgeted for (0: the compiler's choice).
    pub min_blocks: u32,
}

impl fmt::Display for StoredTile {
    /// `threads,stages,split_tokens,min_blocks`, the form `kivi bench --decode-tile` takes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{},{}",
            self.threads, self.stages, self.split_tokens, self.min_blocks
        )
    }
}

impl From<TileConfig> for StoredTile {
    fn from(t: TileConfig) -> Self {
        StoredTile {
            threads: t.threads,
            split_tokens: t.split_tokens,
            stages: t.stages,
            min_blocks: t.min_blocks,
        }
    }
}

impl From<StoredTile> for TileConfig {
    fn from(t: StoredTile) -> Self {
        TileConfig {
            threads: t.threads,
            split_tokens: t.split_tokens,
            stages: t.stages,
            min_blocks: t.min_blocks,
            // Tuned on contiguous caches; a paged cache sets it on the tuned tile.
            paged: false,
        }
    }
}

/// One tuned result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneEntry {
    /// The winning configuration.
    pub tile: StoredTile,
    /// Its median time, microseconds.
    pub best_us: f64,
    /// The heuristic configuration's median time, microseconds.
    pub heuristic_us: f64,
    /// The slowest candidate's median time, microseconds.
    pub worst_us: f64,
    /// Candidates timed.
    pub candidates: usize,
    /// Whether every candidate was tried (false when the time budget ran out first: `kivi tune` tries again).
    #[serde(default)]
    pub complete: bool,
    /// The shape it was tuned on: batch, query heads, KV heads, head_dim, context.
    pub shape: [u32; 5],
    /// When (seconds since the Unix epoch).
    pub tuned_at: u64,
}

#[derive(Serialize)]
struct FileContents {
    format: String,
    version: u32,
    entries: BTreeMap<String, TuneEntry>,
}

/// The tuning cache of one file.
#[derive(Clone, Debug, Default)]
pub struct TuneCache {
    path: PathBuf,
    entries: BTreeMap<String, TuneEntry>,
    /// Keys set by this process since loading: a save writes these over what the file holds then.
    inserted: std::collections::BTreeSet<String>,
}

impl TuneCache {
    /// The default file: `$KIVI_CACHE_DIR/tune.json`, else `$XDG_CACHE_HOME/kivi/tune.json`, else
    /// `~/.cache/kivi/tune.json`; `None` without any of these variables.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("KIVI_CACHE_DIR") {
            return Some(PathBuf::from(d).join("tune.json"));
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(d).join("kivi").join("tune.json"));
        }
        std::env::var_os("HOME").map(|h| {
            PathBuf::from(h)
                .join(".cache")
                .join("kivi")
                .join("tune.json")
        })
    }

    /// Reads `path`. A missing file is an empty cache; an unreadable, corrupt or foreign-version file is an empty
    /// cache too, with the reason returned as a warning (the next [`TuneCache::save`] replaces it).
    pub fn load(path: &Path) -> (Self, Option<String>) {
        let (entries, warning) = read_entries(path);
        (
            TuneCache {
                path: path.to_path_buf(),
                entries,
                inserted: Default::default(),
            },
            warning,
        )
    }

    /// The file this cache reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry of `key`, if tuned.
    pub fn get(&self, key: &TuneKey) -> Option<&TuneEntry> {
        self.entries.get(&key.to_string())
    }

    /// Every entry, by key text.
    pub fn entries(&self) -> &BTreeMap<String, TuneEntry> {
        &self.entries
    }

    /// Sets the entry of `key` (in memory; [`TuneCache::save`] writes it). An entry with a time that is not a
    /// finite number is refused (JSON cannot hold it).
    ///
    /// # Errors
    /// The offending time.
    pub fn insert(&mut self, key: &TuneKey, entry: TuneEntry) -> Result<(), String> {
        for (what, v) in [
            ("best", entry.best_us),
            ("heuristic", entry.heuristic_us),
            ("worst", entry.worst_us),
        ] {
            if !v.is_finite() {
                return Err(format!("{what} time {v} us is not a finite number"));
            }
        }
        self.entries.insert(key.to_string(), entry);
        self.inserted.insert(key.to_string());
        Ok(())
    }

    /// Writes the cache atomically (temporary file + rename in the same folder): the entries the file holds now
    /// (other processes' results included), with the ones this process inserted written over them. Creates the
    /// folder. Saves of all processes are serialized by an exclusive lock on `<file>.lock` beside the cache (an
    /// advisory OS file lock, released when the save ends), so concurrent tuners lose no entry; readers never wait
    /// and always see a whole file. (No fsync: a power cut can lose the last save, not corrupt the file's old state.)
    ///
    /// # Errors
    /// The message of the failed file operation, with the path.
    pub fn save(&mut self) -> Result<(), String> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut lock_name = self.path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock_path = std::path::PathBuf::from(lock_name);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        lock.lock()
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        // A file that exists but cannot be read is not replaced (its entries would be lost); a corrupt or
        // foreign-version one is rebuilt, as on load.
        if let Err(e) = std::fs::File::open(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(format!(
                    "cannot read {} ({e}); not replacing it: fix its permissions or pass another --cache",
                    self.path.display()
                ));
            }
        }
        let (mut merged, _) = read_entries(&self.path);
        for k in &self.inserted {
            if let Some(v) = self.entries.get(k) {
                merged.insert(k.clone(), v.clone());
            }
        }
        self.entries = merged;
        let contents = FileContents {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&contents).map_err(|e| e.to_string())?;
        // Unique per process and per save within it: concurrent writers never share a temporary file.
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".tune.{}.{}.tmp",
            std::process::id(),
            SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&tmp, text).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", tmp.display())
        })?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot replace {}: {e}", self.path.display())
        })
    }
}

fn read_entries(path: &Path) -> (BTreeMap<String, TuneEntry>, Option<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (BTreeMap::new(), None),
        Err(e) => {
            return (
                BTreeMap::new(),
                Some(format!(
                    "{}: unreadable ({e}); starting an empty tuning cache",
                    path.display()
                )),
            )
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return (
                BTreeMap::new(),
                Some(format!(
                    "{}: not a valid tuning cache ({e}); ignoring it (it will be rebuilt)",
                    path.display()
                )),
            )
        }
    };
    let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
    let version = value.get("version").and_then(|v| v.as_u64());
    if format != FORMAT || version != Some(u64::from(FORMAT_VERSION)) {
        return (
            BTreeMap::new(),
            Some(format!(
                "{}: a {} file of version {}, not {FORMAT} version {FORMAT_VERSION}; ignoring it (it will be \
                 rebuilt)",
                path.display(),
                if format.is_empty() { "non-kivi" } else { format },
                version.map_or("?".to_string(), |v| v.to_string())
            )),
        );
    }
    let Some(raw) = value.get("entries").and_then(|v| v.as_object()) else {
        return (
            BTreeMap::new(),
            Some(format!(
                "{}: not a valid tuning cache (no entries object); ignoring it (it will be rebuilt)",
                path.display()
            )),
        );
    };
    // One bad entry is dropped, not the whole file.
    let mut entries = BTreeMap::new();
    let mut bad = 0;
    for (k, v) in raw {
        match serde_json::from_value::<TuneEntry>(v.clone()) {
            Ok(e) => {
                entries.insert(k.clone(), e);
            }
            Err(_) => bad += 1,
        }
    }
    let warning = (bad > 0).then(|| {
        format!(
            "{}: {bad} entries are not valid tuning results; ignoring them (they will be dropped on the next save)",
            path.display()
        )
    });
    (entries, warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ctx: u32) -> TuneKey {
        TuneKey {
            gpu: "NVIDIA H200".into(),
            compute_capability: "9.0".into(),
            sm_count: 132,
            driver: 13000,
            nvrtc: "13.0".into(),
            kind: "decode".into(),
            layout_hash: fnv1a(b"kivi-2, llama-3-8b"),
            candidates_hash: 7,
            context_bucket: context_bucket(ctx),
            batch_bucket: batch_bucket(64),
        }
    }

    fn entry(us: f64) -> TuneEntry {
        TuneEntry {
            tile: StoredTile {
                threads: 128,
                split_tokens: 0,
                stages: 3,
                min_blocks: 4,
            },
            best_us: us,
            heuristic_us: us * 1.1,
            worst_us: us * 2.0,
            candidates: 12,
            complete: true,
            shape: [8, 32, 8, 128, 32768],
            tuned_at: 0,
        }
    }

    #[test]
    fn buckets_round_up_to_powers_of_two() {
        assert_eq!(context_bucket(1), 256);
        assert_eq!(context_bucket(3000), 4096);
        assert_eq!(context_bucket(4096), 4096);
        assert_eq!(context_bucket(4097), 8192);
        assert_eq!(context_bucket(u32::MAX), 1 << 31);
        assert_eq!(batch_bucket(0), 1);
        assert_eq!(batch_bucket(64), 64);
        assert_eq!(batch_bucket(65), 128);
    }

    #[test]
    fn keys_differ_in_every_field_and_share_a_bucket() {
        let k = key(32768);
        assert_eq!(k.to_string(), key(20000).to_string(), "one context bucket");
        let variants = [
            TuneKey {
                gpu: "NVIDIA H100".into(),
                ..k.clone()
            },
            TuneKey {
                compute_capability: "8.0".into(),
                ..k.clone()
            },
            TuneKey {
                sm_count: 114,
                ..k.clone()
            },
            TuneKey {
                driver: 12090,
                ..k.clone()
            },
            TuneKey {
                nvrtc: "12.9".into(),
                ..k.clone()
            },
            TuneKey {
                kind: "quant_keys".into(),
                ..k.clone()
            },
            TuneKey {
                layout_hash: 1,
                ..k.clone()
            },
            TuneKey {
                candidates_hash: 8,
                ..k.clone()
            },
            TuneKey {
                context_bucket: 65536,
                ..k.clone()
            },
            TuneKey {
                batch_bucket: 128,
                ..k.clone()
            },
        ];
        for v in &variants {
            assert_ne!(v.to_string(), k.to_string(), "{v:?}");
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("tune.json");
        let (mut c, w) = TuneCache::load(&path);
        assert!(w.is_none() && c.entries().is_empty());
        c.insert(&key(4096), entry(50.0)).unwrap();
        c.save().unwrap();
        let (again, w) = TuneCache::load(&path);
        assert!(w.is_none(), "{w:?}");
        assert_eq!(again.get(&key(4096)), Some(&entry(50.0)));
        assert!(again.get(&key(65536)).is_none());
    }

    #[test]
    fn corrupt_or_foreign_files_are_reported_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tune.json");
        for (text, expect) in [
            ("{ not json", "not a valid tuning cache"),
            (
                r#"{"format": "kivi-tune-cache", "version": 99, "entries": {}}"#,
                "version 99",
            ),
            (
                r#"{"format": "something-else", "version": 1, "entries": {}}"#,
                "something-else",
            ),
            (
                r#"{"format": "kivi-tune-cache", "version": 1, "entries": {"k": {"tile": 3}}}"#,
                "1 entries are not valid tuning results",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let (mut c, w) = TuneCache::load(&path);
            let w = w.expect("a warning");
            assert!(w.contains(expect), "{w}");
            assert!(c.entries().is_empty());
            c.insert(&key(4096), entry(10.0)).unwrap();
            c.save().unwrap();
            let (rebuilt, w) = TuneCache::load(&path);
            assert!(w.is_none(), "{w:?}");
            assert_eq!(rebuilt.entries().len(), 1);
        }
    }

    #[test]
    fn a_save_does_not_roll_back_what_another_process_tuned_since() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tune.json");
        let (mut seed, _) = TuneCache::load(&path);
        seed.insert(&key(4096), entry(50.0)).unwrap();
        seed.save().unwrap();
        let (mut a, _) = TuneCache::load(&path); // A loads k1 = 50
        let (mut b, _) = TuneCache::load(&path);
        b.insert(&key(4096), entry(40.0)).unwrap(); // B re-tunes k1
        b.save().unwrap();
        a.insert(&key(65536), entry(70.0)).unwrap(); // A tunes another shape
        a.save().unwrap();
        let (c, _) = TuneCache::load(&path);
        assert_eq!(
            c.get(&key(4096)).unwrap().best_us,
            40.0,
            "B's newer k1 survives A's save"
        );
        assert_eq!(c.get(&key(65536)).unwrap().best_us, 70.0);
        let mut nan = entry(1.0);
        nan.worst_us = f64::NAN;
        assert!(a.insert(&key(1 << 20), nan).is_err());
    }

    /// A key unique to (writer, i).
    fn writer_key(writer: u32, i: u32) -> TuneKey {
        TuneKey {
            candidates_hash: u64::from(writer) * 1000 + u64::from(i),
            ..key(4096)
        }
    }

    /// Loads, inserts `n` keys of `writer` one save at a time, as a tuner does after each shape.
    fn write_entries(path: &Path, writer: u32, n: u32) {
        for i in 0..n {
            let (mut c, warning) = TuneCache::load(path);
            assert!(
                warning.is_none(),
                "a reader saw a partial file: {warning:?}"
            );
            c.insert(&writer_key(writer, i), entry(f64::from(writer * 100 + i)))
                .unwrap();
            c.save().unwrap();
        }
    }

    fn assert_all_entries(path: &Path, writers: u32, n: u32) {
        let (c, w) = TuneCache::load(path);
        assert!(w.is_none(), "{w:?}");
        for writer in 0..writers {
            for i in 0..n {
                assert!(
                    c.get(&writer_key(writer, i)).is_some(),
                    "writer {writer}'s entry {i} was lost"
                );
            }
        }
        // Only the cache and its lock file are left: no temporary file.
        let mut left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["tune.json", "tune.json.lock"]);
    }

    #[test]
    fn concurrent_writers_leave_a_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tune.json");
        std::thread::scope(|s| {
            for w in 0..8u32 {
                let path = path.clone();
                s.spawn(move || write_entries(&path, w, 20));
            }
        });
        assert_all_entries(&path, 8, 20);
    }

    /// Two processes (this test binary run again as writers) save into one cache at once.
    #[test]
    fn two_processes_tuning_at_once_leave_a_valid_file() {
        const ROLE: &str = "KIVI_TEST_CACHE_WRITER";
        if let Ok(role) = std::env::var(ROLE) {
            let (path, writer) = role.split_once('|').unwrap();
            write_entries(Path::new(path), writer.parse().unwrap(), 40);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tune.json");
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..2u32)
            .map(|w| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "cache::tests::two_processes_tuning_at_once_leave_a_valid_file",
                        "--test-threads=1",
                    ])
                    .env(ROLE, format!("{}|{w}", path.display()))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success(), "a writer process failed");
        }
        assert_all_entries(&path, 2, 40);
    }
}
