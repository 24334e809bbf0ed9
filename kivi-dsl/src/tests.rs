//! Unit tests: presets, overrides, defaults, every error kind with its position and text, validation rules,
//! the canonical text round trip and robustness against garbage input.

use proptest::prelude::*;

use super::*;

fn llama3_kivi2() -> Layout {
    parse_spec("kivi-2, llama-3-8b").unwrap()
}

fn err(text: &str) -> SpecError {
    match parse_spec(text) {
        Ok(l) => panic!("{text:?} parsed to {l}"),
        Err(e) => e,
    }
}

/// Asserts the error's 1-based line, column and message.
fn assert_err(text: &str, line: usize, column: usize, message: &str) {
    let e = err(text);
    assert_eq!(
        (e.line(), e.column(), e.message()),
        (line, column, message),
        "{text:?}:\n{e}"
    );
}

// ---------------------------------------------------------------- presets

#[test]
fn every_model_and_quant_preset_combines_in_either_order() {
    for m in MODEL_PRESETS {
        for q in QUANT_PRESETS {
            let expected = Layout::from_presets(m, q);
            let a = parse_spec(&format!("{}, {}", q.name, m.name)).unwrap();
            let b = parse_spec(&format!("{}, {},", m.name, q.name)).unwrap();
            assert_eq!(a, expected, "{} {}", q.name, m.name);
            assert_eq!(b, expected, "{} {}", m.name, q.name);
            assert_eq!(preset_layout(m.name, q.name), Some(expected));
            assert_eq!(a.num_heads, m.num_heads);
            assert_eq!(a.num_kv_heads, m.num_kv_heads);
            assert_eq!(
                (a.keys.head_dim, a.values.head_dim),
                (m.head_dim, m.head_dim)
            );
            assert_eq!((a.keys.bits, a.values.bits), (q.key_bits, q.value_bits));
            assert_eq!(a.keys.axis, QuantAxis::PerChannel);
            assert_eq!(a.values.axis, QuantAxis::PerToken);
            assert_eq!(a.keys.group_size, GroupSize::Elements(32));
            assert_eq!(a.values.group_size, GroupSize::Elements(32));
            assert_eq!(a.residual_length, 128);
            a.check_supported().unwrap();
        }
    }
}

#[test]
fn preset_table_values() {
    let shape = |n: &str| {
        let p = model_preset(n).unwrap();
        (p.num_heads, p.num_kv_heads, p.head_dim)
    };
    assert_eq!(shape("llama-2-7b"), (32, 32, 128));
    assert_eq!(shape("llama-3-8b"), (32, 8, 128));
    assert_eq!(shape("mistral-7b"), (32, 8, 128));
    assert_eq!(shape("smollm2-135m"), (9, 3, 64));
    assert_eq!(quant_preset("kivi-2").unwrap().key_bits, 2);
    assert_eq!(quant_preset("kivi-4").unwrap().value_bits, 4);
    assert_eq!(quant_preset("KIVI-4").unwrap().name, "kivi-4");
    assert!(model_preset("llama-9").is_none());
    assert!(preset_layout("llama-3-8b", "kivi-3").is_none());
    assert_eq!(
        preset_names(),
        "llama-2-7b, llama-3-8b, mistral-7b, smollm2-135m, kivi-2, kivi-4"
    );
}

#[test]
fn defaults() {
    let l = llama3_kivi2();
    for t in [l.keys, l.values] {
        assert_eq!(t.symmetry, Symmetry::Asymmetric);
        assert_eq!(t.scale_dtype, ScaleDtype::F16);
        assert_eq!(t.rounding, Rounding::Half);
    }
    assert_eq!(l.dtype, Dtype::F16);
    assert_eq!(l.sink_tokens, 0);
    // Axes default to the paper's even without a quantization preset.
    let l = parse_spec(
        "llama-3-8b, keys: { bits: 2, group_size: 32 }, values: { bits: 2, group_size: 32 }, residual_length: 64",
    )
    .unwrap();
    assert_eq!(
        (l.keys.axis, l.values.axis),
        (QuantAxis::PerChannel, QuantAxis::PerToken)
    );
}

#[test]
fn the_readme_example_parses() {
    let text = "llama-3-8b, kivi-2,                 // presets
residual_length: 128,
sink_tokens: 0,
keys: { bits: 2, axis: per_channel, group_size: 32 },
values: { bits: 2, axis: per_token, group_size: 32, head_dim: 128 },
head_dim: 128,                      // sets both
num_heads: 32, num_kv_heads: 8,
dtype: fp16,
scale_dtype: fp16,
rounding: half,
quant: asymmetric,
";
    let l = parse_spec(text).unwrap();
    assert_eq!(l, llama3_kivi2());
    let from_str: Layout = text.parse().unwrap();
    assert_eq!(from_str, l);
}

// ---------------------------------------------------------------- overrides

#[test]
fn later_items_override_earlier_ones() {
    assert_eq!(
        parse_spec("kivi-2, kivi-4, llama-3-8b").unwrap().keys.bits,
        4
    );
    assert_eq!(
        parse_spec("kivi-2, llama-3-8b, residual_length: 64")
            .unwrap()
            .residual_length,
        64
    );
    assert_eq!(
        parse_spec("residual_length: 64, kivi-2, llama-3-8b")
            .unwrap()
            .residual_length,
        128
    );
    assert_eq!(
        parse_spec("kivi-2, llama-3-8b, llama-2-7b")
            .unwrap()
            .num_kv_heads,
        32
    );
    assert_eq!(
        parse_spec("kivi-2, llama-3-8b, num_kv_heads: 4, num_kv_heads: 2")
            .unwrap()
            .num_kv_heads,
        2
    );

    // A model preset sets both head dims, a later block overrides one of them.
    let l = parse_spec("kivi-2, llama-3-8b, values: { head_dim: 64 }").unwrap();
    assert_eq!((l.keys.head_dim, l.values.head_dim), (128, 64));
    let l = parse_spec("kivi-2, llama-3-8b, head_dim: 64").unwrap();
    assert_eq!((l.keys.head_dim, l.values.head_dim), (64, 64));

    // A block only touches the fields it names.
    let l = parse_spec("kivi-2, llama-3-8b, keys: { bits: 4 }").unwrap();
    assert_eq!(
        (l.keys.bits, l.values.bits, l.keys.group_size),
        (4, 2, GroupSize::Elements(32))
    );

    // Top-level scale_dtype / rounding / quant set both tensors; a block may override one.
    let l =
        parse_spec("kivi-2, llama-3-8b, scale_dtype: fp32, keys: { scale_dtype: bf16 }").unwrap();
    assert_eq!(
        (l.keys.scale_dtype, l.values.scale_dtype),
        (ScaleDtype::Bf16, ScaleDtype::F32)
    );
    let l = parse_spec("kivi-2, llama-3-8b, rounding: fp32, values: { rounding: half }").unwrap();
    assert_eq!(
        (l.keys.rounding, l.values.rounding),
        (Rounding::F32, Rounding::Half)
    );
    let l = parse_spec("kivi-2, llama-3-8b, quant: symmetric").unwrap();
    assert_eq!(
        (l.keys.symmetry, l.values.symmetry),
        (Symmetry::Symmetric, Symmetry::Symmetric)
    );
    let l =
        parse_spec("kivi-2, llama-3-8b, values: { quant: symmetric }, dtype: bf16, sink_tokens: 4")
            .unwrap();
    assert_eq!(
        (l.keys.symmetry, l.values.symmetry),
        (Symmetry::Asymmetric, Symmetry::Symmetric)
    );
    assert_eq!((l.dtype, l.sink_tokens), (Dtype::Bf16, 4));

    let l = parse_spec("kivi-2, llama-3-8b, keys: { group_size: per_block, axis: per_channel }")
        .unwrap();
    assert_eq!(l.keys.group_size, GroupSize::PerBlock);
    assert_eq!(l.keys.group_elems(l.residual_length), 128);
}

#[test]
fn comments_doc_comments_and_trailing_commas() {
    let l =
        parse_spec("/// a doc comment\n//! inner doc\nkivi-2, /* block */ llama-3-8b, // line\n")
            .unwrap();
    assert_eq!(l, llama3_kivi2());
    assert_eq!(
        parse_spec("kivi-2,llama-3-8b,keys:{bits:4,},")
            .unwrap()
            .keys
            .bits,
        4
    );
    // Spaces around the `-` of a preset name are fine (rustfmt writes them inside `kivi_layout!(...)`).
    assert_eq!(
        parse_spec("kivi - 2, llama - 3 - 8b").unwrap(),
        llama3_kivi2()
    );
}

// ---------------------------------------------------------------- syntax errors with positions

#[test]
fn unknown_field_on_line_two() {
    let text = "kivi-2, llama-3-8b,\n  residual_lenght: 64,\n";
    assert_err(
        text,
        2,
        3,
        "unknown field `residual_lenght`; expected one of: keys, values, residual_length, sink_tokens, head_dim, \
         num_heads, num_kv_heads, dtype, scale_dtype, rounding, quant",
    );
    let e = err(text);
    assert_eq!(e.source_line(), "  residual_lenght: 64,");
    assert_eq!(e.layout_error(), None);
    assert_eq!(
        e.to_string(),
        "2:3: unknown field `residual_lenght`; expected one of: keys, values, residual_length, sink_tokens, \
         head_dim, num_heads, num_kv_heads, dtype, scale_dtype, rounding, quant\n  residual_lenght: 64,\n  \
         ^^^^^^^^^^^^^^^"
    );
}

#[test]
fn unknown_field_inside_a_block_and_block_field_at_top_level() {
    assert_err(
        "kivi-2, llama-3-8b,\nkeys: { bits: 2, size: 4 }",
        2,
        18,
        "unknown field `size` in `keys`; expected one of: bits, axis, group_size, head_dim, quant, scale_dtype, \
         rounding",
    );
    let e = err("kivi-2, llama-3-8b, bits: 4");
    assert_eq!((e.line(), e.column()), (1, 21));
    assert!(
        e.message()
            .starts_with("unknown field `bits` (`bits` goes inside `keys: { ... }`"),
        "{e}"
    );
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let text = "kivi-2,\n    llama-9";
    assert_err(
        text,
        2,
        5,
        "unknown preset `llama-9`; known: llama-2-7b, llama-3-8b, mistral-7b, smollm2-135m, kivi-2, kivi-4",
    );
    // The caret covers the whole joined name.
    assert!(
        err(text).to_string().ends_with("    llama-9\n    ^^^^^^^"),
        "{}",
        err(text)
    );
    assert_err(
        "kivi-3, llama-3-8b",
        1,
        1,
        "unknown preset `kivi-3`; known: llama-2-7b, llama-3-8b, mistral-7b, smollm2-135m, kivi-2, kivi-4",
    );
}

#[test]
fn wrong_value_types() {
    assert_err(
        "kivi-2, llama-3-8b, keys: { bits: two }",
        1,
        35,
        "expected an integer for `keys.bits`, found `two`",
    );
    assert_err(
        "kivi-2, llama-3-8b, residual_length: fp16",
        1,
        38,
        "expected an integer for `residual_length`, found `fp16`",
    );
    assert_err(
        "kivi-2, llama-3-8b, dtype: 16",
        1,
        28,
        "expected one of fp16, bf16 for `dtype`, found `16`",
    );
    assert_err(
        "kivi-2, llama-3-8b, dtype: fp8",
        1,
        28,
        "unknown dtype `fp8`; expected one of: fp16, bf16",
    );
    assert_err(
        "kivi-2, llama-3-8b, scale_dtype: fp8",
        1,
        34,
        "unknown scale_dtype `fp8`; expected one of: fp16, bf16, fp32",
    );
    assert_err(
        "kivi-2, llama-3-8b, rounding: up",
        1,
        31,
        "unknown rounding `up`; expected one of: half, fp32",
    );
    assert_err(
        "kivi-2, llama-3-8b, quant: yes",
        1,
        28,
        "unknown quant `yes`; expected one of: asymmetric, symmetric",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys: { axis: per_head }",
        1,
        35,
        "unknown keys.axis `per_head`; expected one of: per_channel, per_token",
    );
    assert_err(
        "kivi-2, llama-3-8b, values: { group_size: \"32\" }",
        1,
        43,
        "expected an integer or `per_block` for `values.group_size`, found `\"32\"`",
    );
    assert_err(
        "kivi-2, llama-3-8b, values: { group_size: whole }",
        1,
        43,
        "unknown values.group_size `whole`; expected one of: per_block",
    );
    assert_err("kivi-2, llama-3-8b, keys: 4", 1, 27, "expected `{ ... }` after `keys:` (fields: bits, axis, group_size, head_dim, quant, scale_dtype, rounding), found `4`");
    assert_err(
        "kivi-2, llama-3-8b, num_heads: -4",
        1,
        32,
        "expected a non-negative integer for `num_heads`, found `-4`",
    );
    assert_err(
        "kivi-2, llama-3-8b, num_heads: 4.5",
        1,
        32,
        "expected an integer for `num_heads`, found `4.5`",
    );
    assert_err(
        "kivi-2, llama-3-8b, num_heads: 4u8",
        1,
        32,
        "unexpected suffix `u8` on `num_heads`: write a plain integer",
    );
    assert_err(
        "kivi-2, llama-3-8b, num_heads: 4294967296",
        1,
        32,
        "`num_heads` 4294967296 does not fit in 32 bits",
    );
}

#[test]
fn duplicated_field_in_one_block() {
    assert_err(
        "kivi-2, llama-3-8b,\nvalues: { bits: 2, group_size: 32, bits: 4 }",
        2,
        36,
        "duplicate field `bits` in this `values` block",
    );
    // Across blocks (and at the top level) a repeat is an override, not an error.
    assert_eq!(
        parse_spec("kivi-2, llama-3-8b, keys: { bits: 2 }, keys: { bits: 4 }")
            .unwrap()
            .keys
            .bits,
        4
    );
}

#[test]
fn missing_colon_comma_and_values() {
    assert_err(
        "kivi-2, llama-3-8b, residual_length 64",
        1,
        37,
        "expected `:` after `residual_length`, found `64`",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys { bits: 2 }",
        1,
        26,
        "expected `:` after `keys`, found `{`",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys: { bits 2 }",
        1,
        34,
        "expected `:` after `bits`, found `2`",
    );
    assert_err(
        "kivi-2 llama-3-8b",
        1,
        8,
        "expected `,` between items, found `llama`",
    );
    assert_err(
        "kivi-2, llama-3-8b\nresidual_length: 64",
        2,
        1,
        "expected `,` between items, found `residual_length`",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys: { bits: 2 group_size: 32 }",
        1,
        37,
        "expected `,` between `keys` fields, found `group_size`",
    );
    // A value missing at the very end points at the last token; inside a block, at the closing brace.
    assert_err(
        "kivi-2, llama-3-8b, residual_length:",
        1,
        36,
        "expected an integer for `residual_length`, found end of input",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys: { bits: }",
        1,
        35,
        "expected an integer for `keys.bits`, found end of input",
    );
    assert_err(
        "kivi-2,, llama-3-8b",
        1,
        8,
        "expected a preset name (llama-2-7b, llama-3-8b, mistral-7b, smollm2-135m, kivi-2, kivi-4) or `field: value`, \
         found `,`",
    );
    assert_err(
        "kivi-2, (llama-3-8b)",
        1,
        9,
        "expected a preset name (llama-2-7b, llama-3-8b, mistral-7b, smollm2-135m, kivi-2, kivi-4) \
         or `field: value`, found `(`",
    );
    assert_err(
        "kivi-2, llama-3-8b; residual_length: 4",
        1,
        19,
        "expected `,` between items, found `;`",
    );
    assert_err(
        "kivi-2, llama-, residual_length: 4",
        1,
        15,
        "expected the rest of the preset name after `llama-`, found `,`",
    );
    assert_err(
        "kivi-2, llama-",
        1,
        14,
        "expected the rest of the preset name after `llama-`, found end of input",
    );
    assert_err(
        "kivi-2, llama-3-8b, #[cfg(x)] dtype: fp16",
        1,
        21,
        "attributes are not allowed in a kivi spec",
    );
}

#[test]
fn tokenizer_errors_have_positions() {
    let e = err("kivi-2,\nllama-3-8b, keys: { bits: 2");
    assert_eq!((e.line(), e.column()), (2, 19), "{e}");
    assert!(
        e.message().starts_with("cannot split the spec into tokens"),
        "{e}"
    );
    let e = err("kivi-2, \"llama");
    assert_eq!((e.line(), e.column()), (1, 9), "{e}");
}

#[test]
fn missing_mandatory_fields() {
    let quant = "name a quantization preset (kivi-2, kivi-4)";
    let model = "name a model preset (llama-2-7b, llama-3-8b, mistral-7b, smollm2-135m)";
    let cases = [
        (
            "llama-3-8b",
            format!("no value for keys.bits: {quant} or set `keys: {{ bits: N }}`"),
        ),
        (
            "llama-3-8b, keys: { bits: 2 }",
            format!("no value for keys.group_size: {quant} or set `keys: {{ group_size: N }}`"),
        ),
        (
            "llama-3-8b, keys: { bits: 2, group_size: 32 }",
            format!("no value for values.bits: {quant} or set `values: {{ bits: N }}`"),
        ),
        (
            "llama-3-8b, keys: { bits: 2, group_size: 32 }, values: { bits: 2 }",
            format!("no value for values.group_size: {quant} or set `values: {{ group_size: N }}`"),
        ),
        (
            "llama-3-8b, keys: { bits: 2, group_size: 32 }, values: { bits: 2, group_size: 32 }",
            format!("no value for residual_length: {quant} or set `residual_length: N`"),
        ),
        (
            "kivi-2",
            format!("no value for keys.head_dim: {model} or set `head_dim: N`"),
        ),
        (
            "kivi-2, keys: { head_dim: 128 }",
            format!("no value for values.head_dim: {model} or set `head_dim: N`"),
        ),
        (
            "kivi-2, head_dim: 128",
            format!("no value for num_heads: {model} or set `num_heads: N`"),
        ),
        (
            "kivi-2, head_dim: 128, num_heads: 8",
            format!("no value for num_kv_heads: {model} or set `num_kv_heads: N`"),
        ),
    ];
    for (text, message) in cases {
        assert_err(text, 1, 1, &message);
    }
    // An empty spec (or one of only comments) reports at 1:1.
    assert_err(
        "",
        1,
        1,
        &format!("no value for keys.bits: {quant} or set `keys: {{ bits: N }}`"),
    );
    assert_err(
        "// nothing\n",
        1,
        1,
        &format!("no value for keys.bits: {quant} or set `keys: {{ bits: N }}`"),
    );
}

// ---------------------------------------------------------------- validation (via specs: spans and messages)

#[test]
fn validation_errors_point_where_the_field_was_set() {
    assert_err(
        "kivi-2, llama-3-8b,\nresidual_length: 100",
        2,
        1,
        "residual_length 100 is not a multiple of the key group_size 32",
    );
    let e = err("kivi-2, llama-3-8b,\nresidual_length: 100");
    assert!(
        e.to_string()
            .ends_with("\nresidual_length: 100\n^^^^^^^^^^^^^^^^^^^^"),
        "{e}"
    );
    assert_eq!(
        e.layout_error(),
        Some(&LayoutError::ResidualNotMultipleOfGroup {
            tensor: "key",
            residual_length: 100,
            group_size: 32
        })
    );
    // Of the two fields a rule involves, the one set last is blamed: here the group size.
    assert_err(
        "llama-3-8b, kivi-2, keys: { group_size: 256 }",
        1,
        29,
        "residual_length 128 is not a multiple of the key group_size 256",
    );
    // Set by a preset: the preset name is blamed.
    let text = "kivi-2, values: { group_size: 128 }, smollm2-135m";
    assert_err(
        text,
        1,
        text.find("smollm2").unwrap() + 1,
        "values.head_dim 64 is not divisible by values.group_size 128; group sizes that divide it: 16, 32, 64",
    );
    // The README example: only 16 divides 80 among the sizes that hold whole words of 2-bit codes.
    assert_err(
        "kivi-2, llama-3-8b, values: { head_dim: 80 }",
        1,
        31,
        "values.head_dim 80 is not divisible by values.group_size 32; group sizes that divide it: 16",
    );
    assert_err(
        "kivi-2, llama-3-8b,\n  num_kv_heads: 5",
        2,
        3,
        "num_heads 32 is not a multiple of num_kv_heads 5",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys: { bits: 9 }",
        1,
        29,
        "keys.bits 9 is out of range; bits must be in 1..=8",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys: { bits: 1, quant: symmetric }",
        1,
        29,
        "keys.bits is 1, but symmetric quantization needs at least 2 bits (codes -q..=q with q = 2^(bits-1) - 1); \
         use 2 or more bits, or `quant: asymmetric`",
    );
    assert_err(
        "kivi-2, llama-3-8b, head_dim: 100",
        1,
        21,
        "keys.head_dim 100 is invalid; head_dim must be a multiple of 16 in 16..=256",
    );
    assert_err(
        "kivi-2, llama-3-8b, keys: { group_size: 0 }",
        1,
        29,
        "keys.group_size 0 is invalid; a group size must be a power of two (1, 2, 4, ..., 2^31)",
    );
    assert_err(
        "kivi-2, llama-3-8b, residual_length: 8192",
        1,
        21,
        "residual_length 8192 is out of range; it must be in 1..=4096 tokens",
    );
    assert_err(
        "kivi-2, llama-3-8b, sink_tokens: 70000",
        1,
        21,
        "sink_tokens 70000 is out of range; it must be at most 65536",
    );
    assert_err(
        "kivi-2, llama-3-8b, num_heads: 0",
        1,
        21,
        "num_heads is 0; a layout needs at least one head",
    );
}

#[test]
fn parse_spec_does_not_check_support_but_parse_spec_supported_does() {
    let text = "kivi-2, llama-3-8b,\nkeys: { bits: 5 }";
    let l = parse_spec(text).unwrap();
    assert_eq!(l.keys.bits, 5);
    let e = parse_spec_supported(text).unwrap_err();
    assert_eq!((e.line(), e.column()), (2, 9));
    assert_eq!(
        e.message(),
        "not yet supported: keys.bits 5 (the generator emits 1, 2, 3, 4 or 8 bits)"
    );
    assert!(e.layout_error().unwrap().is_unsupported());
    assert_eq!(e.layout_error().unwrap().field(), "keys.bits");
    parse_spec_supported("kivi-4, mistral-7b").unwrap();

    parse_spec_supported("kivi-2, llama-3-8b, dtype: bf16, scale_dtype: fp32").unwrap();
    let e = parse_spec_supported("kivi-2, llama-3-8b, keys: { axis: per_token }").unwrap_err();
    assert_eq!(
        (e.line(), e.column(), e.message()),
        (
            1,
            29,
            "not yet supported: keys.axis per_token (keys are quantized per_channel only)"
        )
    );
}

// ---------------------------------------------------------------- validation (direct)

fn with(f: impl FnOnce(&mut Layout)) -> Layout {
    let mut l = llama3_kivi2();
    f(&mut l);
    l
}

#[test]
fn validate_rules_and_fields() {
    let cases: Vec<(Layout, LayoutError, &str)> = vec![
        (
            with(|l| l.keys.bits = 0),
            LayoutError::BitsOutOfRange {
                field: "keys.bits",
                value: 0,
            },
            "keys.bits",
        ),
        (
            with(|l| l.values.bits = 9),
            LayoutError::BitsOutOfRange {
                field: "values.bits",
                value: 9,
            },
            "values.bits",
        ),
        (
            with(|l| l.num_heads = 0),
            LayoutError::ZeroHeads { field: "num_heads" },
            "num_heads",
        ),
        (
            with(|l| l.num_kv_heads = 0),
            LayoutError::ZeroHeads {
                field: "num_kv_heads",
            },
            "num_kv_heads",
        ),
        (
            with(|l| l.num_kv_heads = 3),
            LayoutError::HeadsNotMultiple {
                num_heads: 32,
                num_kv_heads: 3,
            },
            "num_kv_heads",
        ),
        (
            with(|l| l.keys.head_dim = 8),
            LayoutError::BadHeadDim {
                field: "keys.head_dim",
                value: 8,
            },
            "keys.head_dim",
        ),
        (
            with(|l| l.values.head_dim = 272),
            LayoutError::BadHeadDim {
                field: "values.head_dim",
                value: 272,
            },
            "values.head_dim",
        ),
        (
            with(|l| l.values.head_dim = 72),
            LayoutError::BadHeadDim {
                field: "values.head_dim",
                value: 72,
            },
            "values.head_dim",
        ),
        (
            with(|l| l.keys.group_size = GroupSize::Elements(0)),
            LayoutError::BadGroupSize {
                field: "keys.group_size",
                value: 0,
            },
            "keys.group_size",
        ),
        (
            with(|l| l.values.group_size = GroupSize::Elements(24)),
            LayoutError::BadGroupSize {
                field: "values.group_size",
                value: 24,
            },
            "values.group_size",
        ),
        (
            with(|l| l.residual_length = 100),
            LayoutError::ResidualNotMultipleOfGroup {
                tensor: "key",
                residual_length: 100,
                group_size: 32,
            },
            "residual_length",
        ),
        (
            with(|l| {
                l.values.axis = QuantAxis::PerChannel;
                l.values.group_size = GroupSize::Elements(256);
            }),
            LayoutError::ResidualNotMultipleOfGroup {
                tensor: "value",
                residual_length: 128,
                group_size: 256,
            },
            "residual_length",
        ),
        (
            with(|l| l.values.head_dim = 80),
            LayoutError::HeadDimNotMultipleOfGroup {
                tensor: "values",
                head_dim: 80,
                group_size: 32,
                working: vec![16],
            },
            "values.group_size",
        ),
        (
            with(|l| {
                l.keys.axis = QuantAxis::PerToken;
                l.keys.bits = 1;
                l.keys.head_dim = 48;
            }),
            // No divisor of 48 holds 32 one-bit codes: every power-of-two divisor is listed.
            LayoutError::HeadDimNotMultipleOfGroup {
                tensor: "keys",
                head_dim: 48,
                group_size: 32,
                working: vec![16],
            },
            "keys.group_size",
        ),
        (
            with(|l| l.residual_length = 0),
            LayoutError::ResidualOutOfRange { value: 0 },
            "residual_length",
        ),
        (
            with(|l| l.residual_length = 4097),
            LayoutError::ResidualOutOfRange { value: 4097 },
            "residual_length",
        ),
        (
            with(|l| l.sink_tokens = 65537),
            LayoutError::SinkTokensOutOfRange { value: 65537 },
            "sink_tokens",
        ),
    ];
    for (layout, expected, field) in cases {
        let e = layout.validate().unwrap_err();
        assert_eq!(e, expected, "{layout}");
        assert_eq!(e.field(), field, "{e}");
        assert!(!e.is_unsupported());
        // check_supported runs validate first.
        assert_eq!(layout.check_supported().unwrap_err(), expected);
    }
    assert_eq!(
        with(|l| l.values.head_dim = 80).validate().unwrap_err().to_string(),
        "values.head_dim 80 is not divisible by values.group_size 32; group sizes that divide it: 16"
    );
    assert_eq!(
        with(|l| l.values.head_dim = 80)
            .validate()
            .unwrap_err()
            .fields(),
        vec!["values.group_size", "values.head_dim"]
    );
    assert_eq!(dividing_group_sizes(80), vec![1, 2, 4, 8, 16]);
    assert_eq!(dividing_group_sizes(0), Vec::<u32>::new());

    // Edges that are valid.
    with(|l| l.residual_length = 4096).validate().unwrap();
    with(|l| l.sink_tokens = 65536).validate().unwrap();
    with(|l| {
        l.keys.head_dim = 16;
        l.values.head_dim = 256;
        l.values.group_size = GroupSize::Elements(16);
    })
    .validate()
    .unwrap();
    with(|l| l.keys.group_size = GroupSize::PerBlock)
        .validate()
        .unwrap();
    with(|l| l.residual_length = 96).validate().unwrap();
    with(|l| l.num_kv_heads = 1).validate().unwrap();
}

#[test]
fn check_supported_rules() {
    let unsupported = |l: Layout| match l.check_supported() {
        Err(e @ LayoutError::NotYetSupported { .. }) => (e.field().to_string(), e.to_string()),
        other => panic!("{l}: {other:?}"),
    };
    let cases: Vec<(Layout, &str, &str)> = vec![
        (with(|l| l.keys.bits = 5), "keys.bits", "not yet supported: keys.bits 5 (the generator emits 1, 2, 3, 4 or 8 bits)"),
        (with(|l| l.values.bits = 6), "values.bits", "not yet supported: values.bits 6 (the generator emits 1, 2, 3, 4 or 8 bits)"),
        (
            with(|l| {
                l.keys.bits = 3;
                l.residual_length = 96;
            }),
            "residual_length",
            "not yet supported: residual_length 96 with 3-bit keys (a flush block must hold whole key chunks and \
             value tiles: use a multiple of 64)",
        ),
        (
            with(|l| l.keys.axis = QuantAxis::PerToken),
            "keys.axis",
            "not yet supported: keys.axis per_token (keys are quantized per_channel only)",
        ),
        (
            with(|l| l.values.axis = QuantAxis::PerChannel),
            "values.axis",
            "not yet supported: values.axis per_channel (values are quantized per_token only)",
        ),
        (
            with(|l| {
                l.values.group_size = GroupSize::PerBlock;
                l.keys.head_dim = 96;
                l.values.head_dim = 96;
            }),
            "values.group_size",
            "not yet supported: values.group_size per_block with head_dim 96 (the kernels group a power of two of \
             elements: use a head_dim that is one, or a number of elements)",
        ),
        (
            with(|l| l.values.group_size = GroupSize::Elements(8)),
            "values.group_size",
            "not yet supported: values.group_size 8 (the decode kernel needs groups of at least 16 elements: one \
             16-row tile of its tensor-core fragments shares a group)",
        ),
    ];
    for (layout, field, message) in cases {
        layout.validate().unwrap();
        assert_eq!(
            unsupported(layout),
            (field.to_string(), message.to_string())
        );
    }
    // bf16 activations, and bf16 and fp32 scales, are generated.
    with(|l| {
        l.dtype = Dtype::Bf16;
        l.keys.scale_dtype = ScaleDtype::F32;
        l.values.scale_dtype = ScaleDtype::Bf16;
    })
    .check_supported()
    .unwrap();
    // Supported edges: 1-bit keys, 8-bit values in groups of 16.
    with(|l| {
        l.keys.bits = 1;
        l.values.bits = 8;
        l.values.group_size = GroupSize::Elements(16);
    })
    .check_supported()
    .unwrap();
    // Different key and value head_dims.
    with(|l| l.values.head_dim = 64).check_supported().unwrap();
    // 3-bit keys and values, at a head_dim whose value codes leave a partial pack (80: 10 codes per lane).
    with(|l| {
        l.keys.bits = 3;
        l.values.bits = 3;
        l.keys.head_dim = 80;
        l.values.head_dim = 80;
        l.values.group_size = GroupSize::Elements(16);
    })
    .check_supported()
    .unwrap();
}

// ---------------------------------------------------------------- parse_tokens (the macro's entry)

#[test]
fn parse_tokens_matches_parse_spec_and_carries_spans() {
    let tokens: proc_macro2::TokenStream =
        "kivi-4, smollm2-135m, residual_length: 64".parse().unwrap();
    assert_eq!(
        parse_tokens(tokens).unwrap(),
        parse_spec("kivi-4, smollm2-135m, residual_length: 64").unwrap()
    );

    let tokens: proc_macro2::TokenStream = "kivi-2,\n llama-3-8b, foo: 1".parse().unwrap();
    let e = parse_tokens(tokens).unwrap_err();
    assert!(e.to_string().starts_with("unknown field `foo`"), "{e}");
    let start = e.span().start();
    assert_eq!((start.line, start.column), (2, 13));

    let tokens: proc_macro2::TokenStream = "kivi-2, llama-3-8b, keys: { bits: 5 }".parse().unwrap();
    parse_tokens(tokens.clone()).unwrap();
    let e = parse_tokens_supported(tokens).unwrap_err();
    assert!(
        e.to_string().starts_with("not yet supported: keys.bits 5"),
        "{e}"
    );
}

// ---------------------------------------------------------------- canonical text

#[test]
fn to_spec_is_canonical_and_display_matches() {
    let l = llama3_kivi2();
    assert_eq!(
        l.to_spec(),
        "keys: { bits: 2, axis: per_channel, group_size: 32, head_dim: 128, quant: asymmetric, scale_dtype: fp16, \
         rounding: half }, values: { bits: 2, axis: per_token, group_size: 32, head_dim: 128, quant: asymmetric, \
         scale_dtype: fp16, rounding: half }, residual_length: 128, sink_tokens: 0, num_heads: 32, num_kv_heads: 8, \
         dtype: fp16"
    );
    assert_eq!(l.to_string(), l.to_spec());
    let p = with(|l| l.keys.group_size = GroupSize::PerBlock);
    assert_eq!(parse_spec(&p.to_spec()).unwrap(), p);
}

fn tensor_strategy() -> impl Strategy<
    Value = (
        u32,
        QuantAxis,
        Symmetry,
        ScaleDtype,
        Rounding,
        u32,
        bool,
        usize,
    ),
> {
    (
        1u32..=8,
        prop_oneof![Just(QuantAxis::PerChannel), Just(QuantAxis::PerToken)],
        prop_oneof![Just(Symmetry::Asymmetric), Just(Symmetry::Symmetric)],
        prop_oneof![
            Just(ScaleDtype::F16),
            Just(ScaleDtype::Bf16),
            Just(ScaleDtype::F32)
        ],
        prop_oneof![Just(Rounding::Half), Just(Rounding::F32)],
        1u32..=16,                 // head_dim / 16
        prop::bool::weighted(0.1), // per_block
        any::<usize>(),            // which dividing group size
    )
}

/// Valid layouts: every field drawn from its whole valid range, group sizes drawn among the ones that divide.
fn valid_layout() -> impl Strategy<Value = Layout> {
    (
        tensor_strategy(),
        tensor_strategy(),
        1u32..=4096,
        prop_oneof![Just(0u32), 0u32..=65536],
        1u32..=64,
        1u32..=16,
        prop_oneof![Just(Dtype::F16), Just(Dtype::Bf16)],
    )
        .prop_map(
            |(k, v, residual_length, sink_tokens, kv_heads, group, dtype)| {
                let tensor =
                    |(bits, axis, symmetry, scale_dtype, rounding, hd16, per_block, pick): (
                        u32,
                        QuantAxis,
                        Symmetry,
                        ScaleDtype,
                        Rounding,
                        u32,
                        bool,
                        usize,
                    )| {
                        let head_dim = hd16 * 16;
                        let along = if axis == QuantAxis::PerChannel {
                            residual_length
                        } else {
                            head_dim
                        };
                        let choices = dividing_group_sizes(along);
                        let group_size = if per_block {
                            GroupSize::PerBlock
                        } else {
                            GroupSize::Elements(choices[pick % choices.len()])
                        };
                        TensorQuant {
                            bits,
                            axis,
                            group_size,
                            head_dim,
                            // Symmetric needs 2 bits or more (a validation rule).
                            symmetry: if bits == 1 {
                                Symmetry::Asymmetric
                            } else {
                                symmetry
                            },
                            scale_dtype,
                            rounding,
                        }
                    };
                Layout {
                    keys: tensor(k),
                    values: tensor(v),
                    residual_length,
                    sink_tokens,
                    num_heads: kv_heads * group,
                    num_kv_heads: kv_heads,
                    dtype,
                }
            },
        )
}

/// Token soup close to the grammar, to reach deep parser states.
fn spec_like_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("kivi-2"),
        Just("llama-3-8b"),
        Just("smollm2-135m"),
        Just("llama"),
        Just("-"),
        Just("8b"),
        Just(","),
        Just(":"),
        Just("::"),
        Just("{"),
        Just("}"),
        Just("("),
        Just(")"),
        Just("keys"),
        Just("values"),
        Just("bits"),
        Just("group_size"),
        Just("head_dim"),
        Just("residual_length"),
        Just("num_heads"),
        Just("num_kv_heads"),
        Just("dtype"),
        Just("quant"),
        Just("axis"),
        Just("per_block"),
        Just("per_token"),
        Just("fp16"),
        Just("0"),
        Just("32"),
        Just("4294967296"),
        Just("2u8"),
        Just("\n"),
        Just(" "),
        Just("#"),
        Just("[doc = \"x\"]"),
        Just("///d\n"),
        Just("\""),
        Just("/*"),
        Just("'a"),
        Just("é"),
        Just("\t"),
    ];
    prop::collection::vec(token, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn to_spec_round_trips(layout in valid_layout()) {
        prop_assert_eq!(layout.validate(), Ok(()));
        let text = layout.to_spec();
        prop_assert_eq!(parse_spec(&text), Ok(layout));
        prop_assert_eq!(text.parse::<Layout>(), Ok(layout));
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = parse_spec(&text);
        let _ = parse_spec_supported(&text);
    }

    #[test]
    fn spec_like_text_never_panics_and_errors_point_into_the_text(text in spec_like_text()) {
        if let Err(e) = parse_spec(&text) {
            let lines = text.lines().count().max(1);
            prop_assert!(e.line() >= 1 && e.line() <= lines, "{:?}: {}", text, e);
            prop_assert!(e.column() >= 1 && e.column() <= e.source_line().chars().count() + 1, "{:?}: {}", text, e);
            let _ = e.to_string();
        }
    }
}
