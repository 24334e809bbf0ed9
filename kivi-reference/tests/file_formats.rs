//! Files written in the reference formats by a user (here: by this test, from RefCache itself) load and check;
//! malformed files give typed errors naming the tensor.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{h, layout, rand_f16, rng};
use half::f16;
use kivi_reference::{check_pack, check_stream, FileKind, RefCache, RefError, ReferenceFile};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn bytes_f16(x: &[f16]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_i32(x: &[i32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn write(file: &str, tensors: &[T], configs: Option<&str>) -> PathBuf {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let meta = configs.map(|c| HashMap::from([("configs".to_string(), c.to_string())]));
    let bytes = safetensors::serialize(views, meta).unwrap();
    let path = std::env::temp_dir().join(format!("kivi-reference-{}-{file}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A small GQA stream (B 1, H 4, Hkv 2, D 32, prefill 40, 30 steps, G 16, R 32, 2-bit keys, 4-bit values)
/// recorded from RefCache in the decode-stream format.
fn stream_tensors() -> (Vec<T>, String) {
    let (b, hq, hkv, d, p, s, g, r) = (
        1usize, 4usize, 2usize, 32usize, 40usize, 30usize, 16u32, 32u32,
    );
    let mut rn = rng(21);
    let pk = rand_f16(&mut rn, b * hkv * p * d, 1.0);
    let pv = rand_f16(&mut rn, b * hkv * p * d, 1.0);
    let sq = rand_f16(&mut rn, b * hq * s * d, 1.0);
    let sk = rand_f16(&mut rn, b * hkv * s * d, 1.0);
    let sv = rand_f16(&mut rn, b * hkv * s * d, 1.0);
    let mut c = RefCache::new(&layout(2, 4, g, r, d as u32, hq as u32, hkv as u32), b).unwrap();
    c.prefill(&pk, &pv, p).unwrap();
    let mut out = vec![f16::ZERO; b * hq * s * d];
    let slice = |x: &[f16], heads: usize, step: usize| -> Vec<f16> {
        (0..heads)
            .flat_map(|hh| x[(hh * s + step) * d..(hh * s + step + 1) * d].to_vec())
            .collect()
    };
    for step in 0..s {
        let o = c
            .decode_step(
                &slice(&sq, hq, step),
                &slice(&sk, hkv, step),
                &slice(&sv, hkv, step),
            )
            .unwrap();
        for hh in 0..hq {
            for di in 0..d {
                out[(hh * s + step) * d + di] = f16::from_f32(o[hh * d + di]);
            }
        }
    }
    let e = c.export();
    let (nqk, nrk, nqv, nrv) = (
        e.quantized_keys,
        e.residual_keys,
        e.quantized_values,
        e.residual_values,
    );
    assert_eq!((nqk, nrk, nqv, nrv), (64, 6, 38, 32));
    let n = "user";
    let f = |name: &str, shape: Vec<usize>, x: &[f16]| T {
        name: format!("{n}.{name}"),
        dtype: Dtype::F16,
        shape,
        data: bytes_f16(x),
    };
    let i = |name: &str, shape: Vec<usize>, x: &[i32]| T {
        name: format!("{n}.{name}"),
        dtype: Dtype::I32,
        shape,
        data: bytes_i32(x),
    };
    let g = g as usize;
    let tensors = vec![
        f("prefill_k", vec![b, hkv, p, d], &pk),
        f("prefill_v", vec![b, hkv, p, d], &pv),
        f("step_q", vec![b, hq, s, d], &sq),
        f("step_k", vec![b, hkv, s, d], &sk),
        f("step_v", vec![b, hkv, s, d], &sv),
        f("step_out", vec![b, hq, s, d], &out),
        i("final_k_code", vec![b, hkv, d, nqk / 16], &e.k_code),
        f("final_k_scale", vec![b, hkv, d, nqk / g], &h(&e.k_scale)),
        f("final_k_mn", vec![b, hkv, d, nqk / g], &h(&e.k_mn)),
        f("final_k_residual", vec![b, hkv, nrk, d], &h(&e.k_residual)),
        i("final_v_code", vec![b, hkv, nqv, d / 8], &e.v_code),
        f("final_v_scale", vec![b, hkv, nqv, d / g], &h(&e.v_scale)),
        f("final_v_mn", vec![b, hkv, nqv, d / g], &h(&e.v_mn)),
        f("final_v_residual", vec![b, hkv, nrv, d], &h(&e.v_residual)),
    ];
    let cfg = format!(
        r#"{{"{n}": {{"B": {b}, "H": {hq}, "Hkv": {hkv}, "D": {d}, "prefill": {p}, "steps": {s}, "group": {g}, "residual": {r}, "k_bits": 2, "v_bits": 4}}}}"#
    );
    (tensors, cfg)
}

#[test]
fn user_stream_file_round_trips() {
    let (tensors, cfg) = stream_tensors();
    let path = write("stream.safetensors", &tensors, Some(&cfg));
    let f = ReferenceFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(f.kind, FileKind::DecodeStreams);
    let case = f.stream("user").unwrap();
    assert_eq!((case.k_bits, case.v_bits, case.kv_heads), (2, 4, 2));
    let r = check_stream(case).unwrap();
    eprintln!("{r}");
    assert_eq!(r.cache_mismatches(), 0);
    // Only the fp16 rounding of the recorded outputs differs.
    assert!(r.out_rel_l2 < 1e-3 && r.max_step_rel_l2 < 1e-3, "{r}");
}

#[test]
fn stream_file_errors_name_the_tensor() {
    let (mut tensors, cfg) = stream_tensors();
    // Missing input tensor.
    let step_k = tensors.remove(3);
    let path = write("missing.safetensors", &tensors, Some(&cfg));
    let err = ReferenceFile::open(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    match &err {
        RefError::MissingTensor { name, .. } => assert_eq!(name, "user.step_k"),
        other => panic!("{other:?}"),
    }
    eprintln!("{err}");
    // Wrong shape.
    tensors.insert(
        3,
        T {
            shape: vec![1, 2, 29, 32],
            data: step_k.data[..2 * 29 * 32 * 2].to_vec(),
            ..step_k
        },
    );
    let path = write("shape.safetensors", &tensors, Some(&cfg));
    let err = ReferenceFile::open(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    match &err {
        RefError::TensorShape {
            name,
            expected,
            got,
            ..
        } => {
            assert_eq!(name, "user.step_k");
            assert_eq!(
                (expected.clone(), got.clone()),
                (vec![1, 2, 30, 32], vec![1, 2, 29, 32])
            );
        }
        other => panic!("{other:?}"),
    }
    eprintln!("{err}");
    // Malformed configs.
    let path = write("badcfg.safetensors", &tensors, Some("{not json"));
    assert!(matches!(
        ReferenceFile::open(&path),
        Err(RefError::Metadata { .. })
    ));
    let path2 = write(
        "nobits.safetensors",
        &tensors,
        Some(r#"{"user": {"B": 1}}"#),
    );
    assert!(matches!(
        ReferenceFile::open(&path2),
        Err(RefError::Metadata { .. })
    ));
    // No configs and no *.k_code: unrecognized.
    let path3 = write("unknown.safetensors", &tensors, None);
    assert!(matches!(
        ReferenceFile::open(&path3),
        Err(RefError::Metadata { .. })
    ));
    for p in [path, path2, path3] {
        std::fs::remove_file(&p).ok();
    }
    // Not a file / not safetensors.
    assert!(matches!(
        ReferenceFile::open("/nonexistent/kivi.safetensors"),
        Err(RefError::Io { .. })
    ));
    let junk = std::env::temp_dir().join(format!("kivi-reference-{}-junk", std::process::id()));
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert!(matches!(
        ReferenceFile::open(&junk),
        Err(RefError::SafeTensors { .. })
    ));
    std::fs::remove_file(&junk).ok();
}

#[test]
fn user_pack_file_loads_and_wrong_dtype_is_named() {
    let (b, hh, t, d) = (1usize, 1usize, 64usize, 32usize);
    let mut rn = rng(2);
    let k = rand_f16(&mut rn, b * hh * t * d, 3.0);
    let q = kivi_reference::quantize_keys_per_channel(&k, t, d, 4, 32).unwrap();
    let codes: Vec<i32> = q.codes.iter().map(|&w| w as i32).collect();
    let mk = |name: &str, dtype, shape: Vec<usize>, data| T {
        name: format!("mine.{name}"),
        dtype,
        shape,
        data,
    };
    let mut tensors = vec![
        mk("k", Dtype::F16, vec![b, hh, t, d], bytes_f16(&k)),
        mk(
            "k_code",
            Dtype::I32,
            vec![b, hh, d, t / 8],
            bytes_i32(&codes),
        ),
        mk(
            "k_scale",
            Dtype::F16,
            vec![b, hh, d, 2],
            bytes_f16(&h(&q.scale)),
        ),
        mk("k_mn", Dtype::F16, vec![b, hh, d, 2], bytes_f16(&h(&q.mn))),
    ];
    let path = write("pack.safetensors", &tensors, None);
    let f = ReferenceFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(f.kind, FileKind::PackVectors);
    let c = f.pack("mine").unwrap();
    assert_eq!((c.bits, c.group, c.values.is_none()), (4, 32, true));
    assert_eq!(check_pack(c).unwrap().mismatches(), 0);
    tensors[3].dtype = Dtype::BF16;
    let path = write("pack-dtype.safetensors", &tensors, None);
    let err = ReferenceFile::open(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(
        matches!(&err, RefError::TensorDtype { name, .. } if name == "mine.k_mn"),
        "{err:?}"
    );
}
