use super::*;

fn layout(spec: &str) -> Layout {
    kivi_dsl::parse_spec(spec).unwrap()
}

#[test]
fn names_spell_the_parameters() {
    let l = layout("kivi-2, llama-3-8b");
    let k = LayoutKernels::new(&l, &KernelTiles::heuristic(&l)).unwrap();
    assert_eq!(
        k.spec(KernelKind::DecodePartial).name(),
        "kivi_decode_k2c32_v2t32_r128_d128_fp16_gqa4_t128_s256"
    );
    assert_eq!(
        k.spec(KernelKind::QuantizeKeys).name(),
        "kivi_quant_keys_k2c32_v2t32_r128_d128_fp16_gqa4_t128"
    );
}

#[test]
fn storage_numbers_follow_the_layout() {
    let s = StorageLayout::new(&layout("kivi-4, smollm2-135m, residual_length: 64"));
    assert_eq!(s.key_codes_per_word, 8);
    assert_eq!(s.key_words_per_channel, 8); // 64 tokens / 8 codes per word
    assert_eq!(s.key_groups_per_channel, 2); // 64 / 32
    assert_eq!(s.value_words_per_token, 8); // 64 dims / 8
    assert_eq!(s.value_groups_per_token, 2);
    assert_eq!(s.value_ring, 65);
    assert_eq!(s.key_block_words(), 64 * 8);
    assert_eq!(s.blocks_for(129), 3);
    // 3 blocks x (keys 512 + values 512 words x 4 bytes + 4 x 128 params x 2 bytes) + rings (64 + 65) x 64 x 2.
    assert_eq!(
        s.bytes_per_sequence(129),
        3 * (4 * 1024 + 2 * 2 * 256) + 2 * 64 * 129
    );
}

#[test]
fn templates_receive_derived_constants() {
    let l = layout("kivi-2, smollm2-135m");
    let k = LayoutKernels::new(&l, &KernelTiles::heuristic(&l)).unwrap();
    let m = generate_module(&k.specs).unwrap();
    assert!(!m.source.contains("{{"), "unrendered template text");
    assert!(
        m.source.contains("__shared__ float sm_acc[3][64];"),
        "GQA 3 x head_dim 64"
    );
    assert!(
        m.source.contains("const float sm_scale = 1.250000000e-1f;"),
        "1/sqrt(64)"
    );
    assert!(!m.source.contains("#include"), "compiles with NVRTC alone");
    assert_eq!(m.kernels.len(), KernelKind::ALL.len());
}

#[test]
fn tiles_are_checked() {
    let l = layout("kivi-2, llama-2-7b");
    let bad = TileConfig {
        threads: 100,
        split_tokens: 256,
    };
    let e = KernelSpec::new(KernelKind::DecodePartial, l, bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("threads 100 must be a multiple of 32"),
        "{e}"
    );
    let no_split = TileConfig {
        threads: 128,
        split_tokens: 0,
    };
    assert!(KernelSpec::new(KernelKind::DecodePartial, l, no_split).is_err());
    let big = layout("kivi-2, num_heads: 64, num_kv_heads: 1, head_dim: 256");
    let e = KernelSpec::new(
        KernelKind::DecodePartial,
        big,
        KernelTiles::heuristic(&big).decode,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not yet supported"), "{e}");
}

#[test]
fn unsupported_layouts_are_refused() {
    let l = layout("kivi-2, llama-2-7b, keys: { bits: 3 }");
    let e = KernelSpec::new(
        KernelKind::QuantizeKeys,
        l,
        KernelTiles::heuristic(&l).quantize_keys,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not yet supported"), "{e}");
}
