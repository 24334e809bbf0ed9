//! The reference data files (tests/data, or $KIVI_DATA): pack vectors bit-exact, decode streams and real-model
//! streams with identical final caches and outputs within tolerance.

use kivi_reference::{check_pack, check_stream, data_dir, FileKind, ReferenceFile};

const STREAM_TOL: f64 = 5e-3;
const STEP_TOL: f64 = 1e-2;

#[test]
fn pack_vectors_bit_exact() {
    let f = ReferenceFile::open(data_dir().join("kivi_pack_vectors.safetensors")).unwrap();
    assert_eq!(f.kind, FileKind::PackVectors);
    assert!(!f.pack_cases.is_empty());
    let mut with_values = 0;
    for case in &f.pack_cases {
        let r = check_pack(case).unwrap();
        eprintln!("{r}");
        with_values += usize::from(case.values.is_some());
        assert_eq!(r.mismatches(), 0, "{r}");
    }
    eprintln!(
        "{} pack cases, {with_values} with values",
        f.pack_cases.len()
    );
}

fn check_file(file: &str, kind: FileKind) {
    let f = ReferenceFile::open(data_dir().join(file)).unwrap();
    assert_eq!(f.kind, kind);
    assert!(!f.stream_cases.is_empty());
    let mut failures = Vec::new();
    for case in &f.stream_cases {
        let r = check_stream(case).unwrap();
        eprintln!("{r}");
        if !r.passes(STREAM_TOL, STEP_TOL) {
            failures.push(r.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "failing streams:\n{}",
        failures.join("\n")
    );
}

#[test]
fn decode_streams_match() {
    check_file("kivi_decode_streams.safetensors", FileKind::DecodeStreams);
}

#[test]
fn real_model_streams_match() {
    check_file("real_kv_smollm2_135m.safetensors", FileKind::RealModel);
}
