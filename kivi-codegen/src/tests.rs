use super::*;
use crate::MemoryBreakdown;

fn layout(spec: &str) -> Layout {
    kivi_dsl::parse_spec(spec).unwrap()
}

#[test]
fn names_spell_the_parameters() {
    let l = layout("kivi-2, llama-3-8b");
    let k = LayoutKernels::new(&l, &KernelTiles::heuristic(&l)).unwrap();
    assert_eq!(
        k.spec(KernelKind::DecodePartial).name(),
        "kivi_decode_k2c32_v2t32_r128_d128_fp16_gqa4_t128_p3_b4"
    );
    assert_eq!(
        k.spec(KernelKind::QuantizeKeys).name(),
        "kivi_quant_keys_k2c32_v2t32_r128_d128_fp16_gqa4_t128"
    );
}

/// 3-bit packs: 16 codes per three half-words, the sixteenth spread over their top bits; a code written at its
/// position reads back, and whole packs waste nothing.
#[test]
fn three_bit_packs_waste_nothing_and_read_back() {
    let s = StorageLayout::new(&layout(
        "kivi-2, llama-2-7b, keys: { bits: 3 }, values: { bits: 3 }",
    ));
    assert_eq!(s.key_chunk_tokens(), 64);
    assert_eq!(s.key_words_per_step(), 3);
    // 128 tokens x 128 channels x 3 bits / 32: no padding.
    assert_eq!(s.key_block_words(), 128 * 128 * 3 / 32);
    assert_eq!(s.value_words_per_pair(), 3); // 16 codes per token pair and lane: one pack
    assert_eq!(s.value_block_words(), 128 * 128 * 3 / 32);
    let p = s.key_code_position(8 * 7 + 3, 8 + 5); // j = 7, s = 1: slot 15, the spread one
    assert!(p.spread);
    assert_eq!(p.bit, 16 + 15);
    let mut words = vec![0u32; s.key_block_words() as usize];
    for (w, b) in p.bit_positions(3) {
        words[w] |= 1 << b;
    }
    assert_eq!(p.read(&words, 3), 7);
    let q = s.key_code_position(8 * 2 + 3, 8 + 5); // j = 2, s = 1: slot 5, word 1 of the pack, bits 16..19
    assert!(!q.spread);
    assert_eq!((q.word, q.bit), (p.word + 1, 16));
    assert_eq!(q.read(&words, 3), 0);
    // head_dim 64: 8 codes per token pair and lane, two half-words (5 + 3).
    let s = StorageLayout::new(&layout(
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, residual_length: 64, values: { bits: 3 }",
    ));
    assert_eq!(s.value_words_per_pair(), 2);
}

/// Sink tokens: rows after each ring, never in a block; Algorithm 1's counts start after them; names spell them.
#[test]
fn sink_tokens_take_rows_after_the_rings_and_shift_the_counts() {
    let l = layout("kivi-2, llama-3-8b, sink_tokens: 4");
    let s = StorageLayout::new(&l);
    assert_eq!((s.key_res_rows(), s.value_res_rows()), (132, 133));
    assert_eq!(s.ring_bytes(), 2 * 128 * (132 + 133));
    assert_eq!(s.blocks_for(4 + 256), 2);
    assert_eq!(s.blocks_for(3), 1);
    assert_eq!(s.after_sinks(3), 0);
    // 300 tokens: 4 sinks, then 296: 256 quantized keys, 168 quantized values.
    assert_eq!((s.quantized_keys(300), s.quantized_values(300)), (256, 168));
    assert_eq!((s.quantized_keys(131), s.quantized_values(131)), (0, 0));
    assert!(layout_tag(&l).contains("_r128_s4_"), "{}", layout_tag(&l));
    let none = StorageLayout::new(&layout("kivi-2, llama-3-8b"));
    assert_eq!(
        (none.quantized_keys(300), none.quantized_values(300)),
        (256, 172)
    );
    // The decode plan's splits cut the tokens after the sinks, as the kernel's seq_step does; at least one split
    // (a sink step has no other token).
    let (p, q) = (
        DecodePlan::new(&l),
        DecodePlan::new(&layout("kivi-2, llama-3-8b")),
    );
    assert_eq!(p.split_plan(0, 32768, 0), q.split_plan(0, 32764, 0));
    assert_eq!(p.split_plan(0, 32768, 0), (2208, 15));
    assert_eq!(p.split_plan(256, 3, 0), (256, 1));
    assert_eq!(p.grid_splits(0, 32768, 0), q.grid_splits(0, 32764, 0));
    assert_eq!(p.max_splits(256, 4 + 1024), 4);
    assert_eq!(p.max_splits(256, 2), 1);
}

#[test]
fn storage_numbers_follow_the_layout() {
    let s = StorageLayout::new(&layout("kivi-4, smollm2-135m, residual_length: 64"));
    assert_eq!(s.key_chunk_tokens(), 16); // 64 / 4 bits
    assert_eq!(s.key_words_per_lane(), 4); // head_dim 64 / 16
    assert_eq!(s.key_groups_per_block(), 2); // 64 / 32
    assert_eq!(s.value_words_per_pair(), 2); // 8 codes of a pair per lane, 4 per half-word
    assert_eq!(s.value_groups_per_token(), 2);
    assert_eq!(s.value_ring, 65);
    // Key codes: 64 tokens x 64 channels x 4 bits / 32 = 512 words; values the same (no padding here).
    assert_eq!(s.key_block_words(), 512);
    assert_eq!(s.value_block_words(), 512);
    assert_eq!(s.blocks_for(129), 3);
    // 3 blocks x (keys 512 + values 512 words x 4 bytes + 2 x 2 x 128 params x 2 bytes) + rings (64 + 65) x 64 x 2.
    assert_eq!(
        s.bytes_per_sequence(129),
        3 * (4 * 1024 + 2 * 2 * 256) + 2 * 64 * 129
    );
    let m = s.memory(129);
    assert_eq!(
        (
            m.key_codes,
            m.key_scales_mins,
            m.value_codes,
            m.value_scales_mins,
            m.residual
        ),
        (3 * 2048, 3 * 512, 3 * 2048, 3 * 512, 2 * 64 * 129)
    );
    assert_eq!(m.total(), s.bytes_per_sequence(129));
    assert_eq!(MemoryBreakdown::fp16_bytes(129, 64, 64), 4 * 64 * 129);
    assert_eq!(
        MemoryBreakdown::fp16_bytes(10, 192, 128),
        2 * (192 + 128) * 10
    );
}

/// Every (token, channel) of a block has its own code bits inside the block, and every group its own scale
/// slot: the packing loses nothing and overlaps nothing, for every width and a few shapes.
#[test]
fn storage_positions_are_a_bijection() {
    for spec in [
        "kivi-2, llama-2-7b",
        "kivi-4, smollm2-135m",
        "kivi-2, llama-3-8b, keys: { bits: 8 }, values: { bits: 1, group_size: 64 }",
        "kivi-4, num_heads: 4, num_kv_heads: 4, head_dim: 80, keys: { bits: 1 }, values: { bits: 8, group_size: 16 }",
        "kivi-2, num_heads: 4, num_kv_heads: 4, head_dim: 32, values: { bits: 1, group_size: 16 }",
        "kivi-2, num_heads: 4, num_kv_heads: 4, head_dim: 48, keys: { bits: 1, group_size: 16 }, values: { bits: 4, group_size: 16 }",
        "kivi-2, llama-2-7b, keys: { bits: 3 }, values: { bits: 3 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 32, keys: { bits: 3, group_size: 16 }, values: { bits: 3, group_size: 16 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, residual_length: 64, keys: { bits: 3 }, values: { bits: 3 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 160, residual_length: 192, keys: { bits: 3, group_size: 64 }, values: { bits: 3 }",
        "kivi-2, num_heads: 4, num_kv_heads: 4, head_dim: 80, residual_length: 64, keys: { bits: 3 }, values: { bits: 2, group_size: 16 }",
        "kivi-2, num_heads: 8, num_kv_heads: 2, keys: { head_dim: 192, bits: 3 }, values: { head_dim: 128, bits: 4 }",
        "kivi-2, num_heads: 8, num_kv_heads: 2, keys: { head_dim: 64 }, values: { head_dim: 256, bits: 1, group_size: 64 }",
    ] {
        let l = layout(spec);
        l.check_supported().unwrap();
        let s = StorageLayout::new(&l);
        let r = s.residual_length;
        for (bits, words, d, pos) in [
            (
                s.key_bits,
                s.key_block_words(),
                s.key_head_dim,
                &(|t, c| s.key_code_position(t, c)) as &dyn Fn(u32, u32) -> CodePosition,
            ),
            (s.value_bits, s.value_block_words(), s.value_head_dim, &|t, c| {
                s.value_code_position(t, c)
            }),
        ] {
            let mut used = vec![0u32; words as usize];
            for t in 0..r {
                for c in 0..d {
                    let p = pos(t, c);
                    // Every bit of the code lies in the block and in the half-word of its channel or token
                    // parity (the decode kernel turns a word's two halves into one fp16 pair).
                    let half = p.bit / 16;
                    for (w, b) in p.bit_positions(bits) {
                        assert!(w < words as usize, "{spec}: ({t},{c}) word {w}");
                        assert_eq!(b / 16, half, "{spec}: ({t},{c}) crosses a half-word");
                        assert_eq!(used[w] & (1 << b), 0, "{spec}: ({t},{c}) overlaps");
                        used[w] |= 1 << b;
                    }
                }
            }
        }
        let mut keys = vec![false; s.key_block_params() as usize];
        for t in (0..r).step_by(s.key_group_size as usize) {
            for c in 0..s.key_head_dim {
                let (scale, min) = s.key_param_index(t, c);
                for i in [scale, min] {
                    assert!(!keys[i], "{spec}: key param ({t},{c}) reused");
                    keys[i] = true;
                }
                // Every token of the group maps to the same slots.
                assert_eq!(s.key_param_index(t + s.key_group_size - 1, c), (scale, min));
            }
        }
        assert!(keys.iter().all(|&u| u), "{spec}: unused key param slots");
        let mut values = vec![false; s.value_block_params() as usize];
        for t in 0..r {
            for c in (0..s.value_head_dim).step_by(s.value_group_size as usize) {
                let i = s.value_param_index(t, c);
                assert!(!values[i], "{spec}: value param ({t},{c}) reused");
                values[i] = true;
                assert_eq!(s.value_param_index(t, c + s.value_group_size - 1), i);
            }
        }
        assert!(values.iter().all(|&u| u), "{spec}: unused value param slots");
    }
}

#[test]
fn decode_bytes_count_codes_params_and_residual() {
    let s = StorageLayout::new(&layout("kivi-2, llama-2-7b"));
    // 4096 tokens, 3968 keys and 3968 values quantized, 128 + 128 residual.
    let b = s.decode_read_bytes(4096, 3968, 3968);
    let codes = 2 * 3968 * 128 * 2 / 8;
    let params = 3968 / 32 * 128 * 4 + 3968 * 4 * 4;
    assert_eq!(b, codes + params + 2 * 128 * 128 * 2);
}

/// Scales and mins of fp32 take 4 bytes each, of bf16 2, and activations 2 whatever their dtype: the memory
/// breakdown, the decode byte count and the decode stage follow.
#[test]
fn scale_dtypes_size_the_parameters() {
    let base = StorageLayout::new(&layout("kivi-2, llama-2-7b"));
    let f32s = StorageLayout::new(&layout(
        "kivi-2, llama-2-7b, keys: { scale_dtype: fp32 }, dtype: bf16",
    ));
    let bf16s = StorageLayout::new(&layout("kivi-2, llama-2-7b, scale_dtype: bf16"));
    assert_eq!(
        (f32s.key_param_bytes, f32s.value_param_bytes, f32s.act_bytes),
        (4, 2, 2)
    );
    let (m0, m1) = (base.memory(4096), f32s.memory(4096));
    assert_eq!(m1.key_scales_mins, 2 * m0.key_scales_mins);
    assert_eq!(
        (
            m1.key_codes,
            m1.value_codes,
            m1.value_scales_mins,
            m1.residual
        ),
        (
            m0.key_codes,
            m0.value_codes,
            m0.value_scales_mins,
            m0.residual
        )
    );
    assert_eq!(bf16s.memory(4096), m0);
    assert_eq!(
        f32s.decode_read_bytes(4096, 3968, 3968),
        base.decode_read_bytes(4096, 3968, 3968) + 3968 / 32 * 128 * 4
    );
    let (p0, p1) = (
        DecodePlan::new(&layout("kivi-2, llama-2-7b")),
        DecodePlan::new(&layout("kivi-2, llama-2-7b, scale_dtype: fp32")),
    );
    // One 32-token iteration: key params 2 x 128 numbers, value params 2 x 32 x 4 numbers, 2 bytes more each.
    assert_eq!(
        p1.stage_bytes,
        p0.stage_bytes + 2 * 128 * 2 + 2 * 32 * 4 * 2
    );
    // The names spell the dtype; the scale dtype changes the code, so it is in the module's source.
    let l = layout("kivi-2, llama-3-8b, dtype: bf16, scale_dtype: fp32");
    let k = LayoutKernels::new(&l, &KernelTiles::heuristic(&l)).unwrap();
    let name = k.spec(KernelKind::DecodePartial).name();
    assert!(
        name.contains("k2c32p32_v2t32p32_r128_d128_bf16_gqa4"),
        "{name}"
    );
    let m = generate_module(&k.specs).unwrap();
    assert!(m.source.contains("constexpr int KFMT = KIVI_FMT_F32;"));
    assert!(m.source.contains("#define KIVI_ACT KIVI_FMT_BF16"));
}

#[test]
fn templates_receive_derived_constants() {
    let l = layout("kivi-2, smollm2-135m");
    let k = LayoutKernels::new(&l, &KernelTiles::heuristic(&l)).unwrap();
    let m = generate_module(&k.specs).unwrap();
    assert!(!m.source.contains("{{"), "unrendered template text");
    assert!(m.source.contains("constexpr int DK = 64;"), "head_dim 64");
    assert!(m.source.contains("constexpr int DV = 64;"), "head_dim 64");
    assert!(m.source.contains("constexpr int HT = 3;"), "GQA 3");
    // The automatic split of the host (DecodePlan::split_tokens) is the kernel's.
    assert!(
        m.source.contains("min(max(span / 2048, 1), 64)"),
        "automatic split"
    );
    assert!(!m.source.contains("#include"), "compiles with NVRTC alone");
    assert_eq!(m.kernels.len(), KernelKind::ALL.len());
}

#[test]
fn the_automatic_split_depends_on_the_span_only_and_covers_it() {
    let p = DecodePlan::new(&layout("kivi-2, llama-3-8b"));
    for len in [
        1u32,
        31,
        1300,
        2048,
        2049,
        4095,
        4096,
        4097,
        32768,
        131072,
        1 << 20,
    ] {
        let (split, splits) = p.split_plan(0, len, 0);
        assert_eq!(split % p.iter_tokens, 0, "{len}");
        assert!(splits * split >= len);
        assert_eq!(
            splits,
            DecodePlan::auto_splits(len),
            "{len}: the rounding never adds a split"
        );
        assert!(splits <= p.max_splits(0, len.max(2048)), "{len}");
    }
    // Just past 2048 tokens: one split, not a tiny second one.
    assert_eq!(p.split_tokens(0, 2049), 2080);
    assert_eq!(p.split_tokens(0, 131072), 2048);
    // A tuned split is used as is.
    assert_eq!(p.split_tokens(1024, 131072), 1024);
    assert_eq!(p.max_splits(1024, 131072), 128);
    // A sliding window of 1000 over 5000 tokens attends [4000, 5000); splits start at 4000 rounded down to
    // the iteration (32 tokens at 2 bits) = 4000, and one split covers the span.
    assert_eq!(p.attended(5000, 1000), (4000, 4000));
    assert_eq!(p.split_plan(0, 5000, 1000), (1024, 1));
    assert_eq!(p.attended(5001, 1000), (4001, 4000));
    assert_eq!(p.split_plan(256, 5001, 1000), (256, 4));
}

#[test]
fn the_grid_serves_every_shorter_sequence_of_a_ragged_batch() {
    // The split count is not monotone in the length: with a window, a shorter sequence can span more tokens
    // (its start rounds down further), and the automatic split rounds up. The grid must cover every length.
    for spec in [
        "kivi-2, llama-3-8b",
        "keys: { bits: 1 }, kivi-2, llama-3-8b",
        "kivi-4, llama-3-8b",
    ] {
        let p = DecodePlan::new(&layout(spec));
        for (fixed, window) in [(0u32, 0u32), (0, 4095), (0, 1000), (1024, 4096), (256, 300)] {
            for max_len in [1u32, 100, 2049, 7295, 8192, 69633, 70000] {
                let grid = p.grid_splits(fixed, max_len, window);
                for len in (1..=max_len)
                    .step_by(7)
                    .chain(max_len.saturating_sub(200).max(1)..=max_len)
                {
                    let splits = p.split_plan(fixed, len, window).1;
                    assert!(
                        splits <= grid,
                        "{spec} fixed {fixed} window {window}: len {len} needs {splits} > grid {grid} of {max_len}"
                    );
                }
            }
        }
    }
    // The reviewer's cases: 2-bit, window 4095: lengths 7295 and 7294 make 1 and 2 splits.
    let p = DecodePlan::new(&layout("kivi-2, llama-3-8b"));
    assert_eq!(p.split_plan(0, 7295, 4095).1, 1);
    assert_eq!(p.split_plan(0, 7294, 4095).1, 2);
    assert!(p.grid_splits(0, 7295, 4095) >= 2);
}

#[test]
fn tiles_are_checked() {
    let l = layout("kivi-2, llama-2-7b");
    let bad = TileConfig {
        threads: 100,
        ..KernelTiles::heuristic(&l).decode
    };
    let e = KernelSpec::new(KernelKind::DecodePartial, l, bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("threads 100 must be a multiple of 32"),
        "{e}"
    );
    let split = TileConfig {
        split_tokens: 100,
        ..KernelTiles::heuristic(&l).decode
    };
    let e = KernelSpec::new(KernelKind::DecodePartial, l, split).unwrap_err();
    assert!(e.to_string().contains("multiple of 32"), "{e}");
    let stages = TileConfig {
        stages: 7,
        ..KernelTiles::heuristic(&l).decode
    };
    assert!(KernelSpec::new(KernelKind::DecodePartial, l, stages).is_err());
    let blocks = TileConfig {
        min_blocks: 32,
        ..KernelTiles::heuristic(&l).decode
    };
    let e = KernelSpec::new(KernelKind::DecodePartial, l, blocks).unwrap_err();
    assert!(e.to_string().contains("min_blocks 32 x threads 128"), "{e}");
    let big = TileConfig {
        threads: 1024,
        split_tokens: 0,
        stages: 4,
        min_blocks: 0,
        paged: false,
    };
    let e = KernelSpec::new(KernelKind::DecodePartial, l, big).unwrap_err();
    assert!(e.to_string().contains("shared memory"), "{e}");
    // The paged decode kernel has its own name; the prefill kernels take the table at run time.
    let paged = KernelTiles::heuristic(&l).paged();
    let name = KernelSpec::new(KernelKind::DecodePartial, l, paged.decode)
        .unwrap()
        .name();
    assert!(name.ends_with("_b4_pg"), "{name}");
    let e = KernelSpec::new(
        KernelKind::QuantizeKeys,
        l,
        TileConfig {
            paged: true,
            ..TileConfig::plain(128)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("decode kernel only"), "{e}");
}

#[test]
fn heuristic_fits_every_supported_shape() {
    for spec in [
        "kivi-2, llama-2-7b",
        "kivi-2, num_heads: 64, num_kv_heads: 1, head_dim: 256, keys: { bits: 8 }, values: { bits: 8 }",
        "kivi-4, num_heads: 16, num_kv_heads: 16, head_dim: 256",
    ] {
        let l = layout(spec);
        LayoutKernels::new(&l, &KernelTiles::heuristic(&l)).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
}

#[test]
fn heuristic_budgets_registers_only_where_the_accumulator_fits() {
    // head_dim 128, 4 heads per KV head: 8 x 1 x 4 = 32 accumulator registers: 128 registers per thread.
    let l = layout("kivi-2, llama-3-8b");
    let t = KernelTiles::heuristic(&l).decode;
    assert_eq!(t.min_blocks * t.threads, 512, "{t:?}");
    // head_dim 128, 16 heads per KV head: 8 x 2 x 4 = 64: still budgeted.
    let l = layout("kivi-2, num_heads: 32, num_kv_heads: 2, head_dim: 128");
    let t = KernelTiles::heuristic(&l).decode;
    assert_eq!(t.min_blocks * t.threads, 512, "{t:?}");
    // head_dim 256 with 16 heads on one KV head: 16 x 2 x 4 = 128: the compiler's own choice.
    let l = layout("kivi-2, num_heads: 16, num_kv_heads: 1, head_dim: 256");
    assert_eq!(KernelTiles::heuristic(&l).decode.min_blocks, 0);
    // 3-bit keys: registers for 256 threads per multiprocessor (255 each), not 512.
    let l = layout("kivi-2, llama-2-7b, keys: { bits: 3 }, values: { bits: 3 }");
    let t = KernelTiles::heuristic(&l).decode;
    assert_eq!(t.min_blocks * t.threads, 256);
}

/// The one support rule left to the generator: a decode iteration (64 tokens with 3-bit keys) that no pipeline
/// fits in 48 KiB is refused as not yet supported, although the DSL's check passes it.
#[test]
fn a_decode_iteration_past_the_shared_memory_is_not_yet_supported() {
    let l = layout("kivi-2, num_heads: 4, num_kv_heads: 4, head_dim: 256, keys: { bits: 3 }, values: { bits: 8 }");
    l.check_supported().unwrap();
    let e = LayoutKernels::new(&l, &KernelTiles::heuristic(&l)).unwrap_err();
    assert!(
        matches!(&e, CodegenError::Layout(le) if le.is_unsupported()),
        "{e}"
    );
    assert!(e.to_string().contains("shared memory"), "{e}");
}

#[test]
fn unsupported_layouts_are_refused() {
    let l = layout("kivi-2, llama-2-7b, keys: { bits: 5 }");
    let e = KernelSpec::new(
        KernelKind::QuantizeKeys,
        l,
        KernelTiles::heuristic(&l).quantize_keys,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not yet supported"), "{e}");
}

/// The value quantize kernel's shared-memory stage: 8 padded rows per warp where values are coded by thresholds
/// (fp16, asymmetric, fp16 rounding, 1 to 3 bits, fp16 or fp32 scales) and the stage fits 32 KiB, else none;
/// the kernel declares exactly that (static_asserts in the template check its size and the threshold path).
#[test]
fn the_value_stage_is_8_padded_rows_per_warp_on_the_threshold_path() {
    let cases = [
        ("kivi-2, llama-2-7b", 128, 4 * 8 * 136 * 2),
        ("kivi-2, llama-2-7b", 256, 8 * 8 * 136 * 2),
        ("kivi-2, llama-2-7b, values: { bits: 3 }", 128, 8704),
        (
            "kivi-2, llama-2-7b, values: { bits: 1, group_size: 16 }",
            64,
            4352,
        ),
        (
            "kivi-2, llama-2-7b, head_dim: 80, values: { group_size: 16 }",
            128,
            4 * 8 * 88 * 2,
        ),
        ("kivi-2, llama-2-7b, head_dim: 256", 128, 4 * 8 * 264 * 2),
        ("kivi-2, llama-2-7b, head_dim: 256", 256, 0), // 33792 bytes: over 32 KiB
        (
            "kivi-2, llama-2-7b, values: { scale_dtype: fp32 }",
            128,
            8704,
        ),
        ("kivi-4, llama-2-7b", 128, 0), // 4 bits: fp32 steps
        ("kivi-2, llama-2-7b, dtype: bf16", 128, 0),
        ("kivi-2, llama-2-7b, values: { quant: symmetric }", 128, 0),
        ("kivi-2, llama-2-7b, values: { rounding: fp32 }", 128, 0),
        ("kivi-2, llama-2-7b, values: { scale_dtype: bf16 }", 128, 0),
    ];
    for (spec, threads, bytes) in cases {
        let l = layout(spec);
        assert_eq!(value_stage_bytes(&l, threads), bytes, "{spec} t{threads}");
        let k = KernelSpec::new(KernelKind::QuantizeValues, l, TileConfig::plain(threads)).unwrap();
        assert_eq!(k.shared_bytes(), bytes, "{spec} t{threads}");
    }
}

/// The key quantize kernel's shared-memory stage: whole units (max(group, chunk) tokens) that divide R and fit
/// 32 KiB of activation rows, and the bytes the kernel declares for it.
#[test]
fn the_key_stage_holds_the_most_whole_units_that_fit_32_kib() {
    let cases = [
        ("kivi-2, llama-2-7b", 128, 32768), // 4 units of 32 tokens x 256 B
        ("kivi-2, llama-2-7b, head_dim: 256", 64, 32768), // 2 of the 4 units
        ("kivi-2, llama-2-7b, head_dim: 64", 128, 16384), // the whole block
        (
            "kivi-2, llama-2-7b, head_dim: 256, keys: { bits: 3 }",
            64,
            32768,
        ), // units of a 64-token chunk
        (
            "kivi-2, llama-2-7b, residual_length: 96, head_dim: 256",
            32,
            16384,
        ), // 3 units: only 1 divides and fits
        (
            "kivi-2, llama-2-7b, head_dim: 256, keys: { group_size: 128 }",
            0,
            0,
        ), // one unit is 64 KiB: no stage
    ];
    for (spec, tokens, bytes) in cases {
        let l = layout(spec);
        assert_eq!(key_stage_tokens(&l), tokens, "{spec}");
        let k = KernelSpec::new(
            KernelKind::QuantizeKeys,
            l,
            KernelTiles::heuristic(&l).quantize_keys,
        )
        .unwrap();
        assert_eq!(k.shared_bytes(), bytes, "{spec}");
    }
}
