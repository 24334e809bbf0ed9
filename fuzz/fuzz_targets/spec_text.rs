//! Arbitrary text through everything a user's spec reaches before a GPU: the parser, the validator, the
//! generator's support check, the canonical printer (whose text must parse back to the same layout), the CPU
//! reference's constructor and, for supported layouts, code generation of every kernel. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(layout) = kivi_dsl::parse_spec(text) else {
        return;
    };
    let canonical = layout.to_spec();
    let again = kivi_dsl::parse_spec(&canonical)
        .unwrap_or_else(|e| panic!("the canonical text of a valid layout must parse: {canonical:?}: {e}"));
    assert_eq!(again, layout, "{canonical:?}");
    let _ = kivi_reference::RefCache::new(&layout, 1);
    if kivi_dsl::parse_spec_supported(text).is_ok() {
        let tiles = kivi_codegen::KernelTiles::heuristic(&layout);
        // The one check left to the generator: the decode iteration's shared memory (a "not yet supported" error).
        let kernels = match kivi_codegen::LayoutKernels::new(&layout, &tiles) {
            Ok(k) => k,
            Err(kivi_codegen::CodegenError::Layout(e)) if e.is_unsupported() => return,
            Err(e) => panic!("a supported layout must have kernels: {canonical:?}: {e}"),
        };
        kivi_codegen::generate_module(&kernels.specs)
            .unwrap_or_else(|e| panic!("a supported layout must generate: {canonical:?}: {e}"));
    }
});
