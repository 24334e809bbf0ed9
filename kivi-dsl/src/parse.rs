//! The spec grammar, parsed with `syn` over `proc_macro2` tokens. One parser serves the `kivi_layout!`
//! proc-macro ([`parse_tokens`]) and text specs ([`parse_spec`]).
//!
//! ```text
//! spec   := item (',' item)* ','?
//! item   := preset | field ':' value
//! preset := piece ('-' piece)*          piece := identifier | literal   (`kivi-2`, `llama-3-8b`, `kivi - 2`)
//! field  := top-level: keys | values | residual_length | sink_tokens | head_dim | num_heads | num_kv_heads
//!                      | dtype | scale_dtype | rounding | quant
//!           in `keys: { ... }` / `values: { ... }` (each at most once per block):
//!                      bits | axis | group_size | head_dim | quant | scale_dtype | rounding
//! ```
//! Items apply in order; a later item overrides what an earlier one set.

use std::str::FromStr;

use proc_macro2::{Delimiter, Punct, Spacing, Span, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{Ident, LitInt, Token};

use crate::error::{LayoutError, SpecError};
use crate::layout::{
    Dtype, GroupSize, Layout, QuantAxis, Rounding, ScaleDtype, Symmetry, TensorQuant,
};
use crate::presets::{model_preset, preset_names, quant_preset, ModelPreset, QuantPreset};
use crate::presets::{MODEL_PRESETS, QUANT_PRESETS};

/// Fields allowed at the top level of a spec, in the order error messages list them.
pub const TOP_LEVEL_FIELDS: &[&str] = &[
    "keys",
    "values",
    "residual_length",
    "sink_tokens",
    "head_dim",
    "num_heads",
    "num_kv_heads",
    "dtype",
    "scale_dtype",
    "rounding",
    "quant",
];

/// Fields allowed inside a `keys: { ... }` or `values: { ... }` block, in the order error messages list them.
pub const TENSOR_FIELDS: &[&str] = &[
    "bits",
    "axis",
    "group_size",
    "head_dim",
    "quant",
    "scale_dtype",
    "rounding",
];

const AXES: &[(&str, QuantAxis)] = &[
    ("per_channel", QuantAxis::PerChannel),
    ("per_token", QuantAxis::PerToken),
];
const SYMMETRIES: &[(&str, Symmetry)] = &[
    ("asymmetric", Symmetry::Asymmetric),
    ("symmetric", Symmetry::Symmetric),
];
const SCALE_DTYPES: &[(&str, ScaleDtype)] = &[
    ("fp16", ScaleDtype::F16),
    ("bf16", ScaleDtype::Bf16),
    ("fp32", ScaleDtype::F32),
];
const ROUNDINGS: &[(&str, Rounding)] = &[("half", Rounding::Half), ("fp32", Rounding::F32)];
const DTYPES: &[(&str, Dtype)] = &[("fp16", Dtype::F16), ("bf16", Dtype::Bf16)];

/// Parses a text spec (a `.kivi` file or a command-line string), fills defaults and runs
/// [`Layout::validate`] (not [`Layout::check_supported`]: callers decide).
///
/// # Errors
/// A [`SpecError`] at the line and column of the offending token: a token the grammar does not accept, an
/// unknown field or preset, a value of the wrong kind, a field given twice in one block, a mandatory field
/// still unset, or a [`LayoutError`] (pointed at where that field was last set).
pub fn parse_spec(text: &str) -> Result<Layout, SpecError> {
    parse_text(text, false)
}

/// [`parse_spec`], then [`Layout::check_supported`]; an unsupported choice is reported at the place that set
/// it, with [`SpecError::layout_error`] holding [`LayoutError::NotYetSupported`].
///
/// # Errors
/// As [`parse_spec`], plus the first choice the code generator does not emit yet.
pub fn parse_spec_supported(text: &str) -> Result<Layout, SpecError> {
    parse_text(text, true)
}

/// Parses spec tokens (the input of `kivi_layout!`), fills defaults and runs [`Layout::validate`].
///
/// # Errors
/// A `syn::Error` spanning the offending tokens; the same cases as [`parse_spec`].
pub fn parse_tokens(tokens: TokenStream) -> Result<Layout, syn::Error> {
    parse_tokens_inner(tokens, false).map_err(|(e, _)| e)
}

/// [`parse_tokens`], then [`Layout::check_supported`] (what `kivi_layout!` calls).
///
/// # Errors
/// As [`parse_tokens`], plus the first choice the code generator does not emit yet, spanning the tokens that
/// set it.
pub fn parse_tokens_supported(tokens: TokenStream) -> Result<Layout, syn::Error> {
    parse_tokens_inner(tokens, true).map_err(|(e, _)| e)
}

impl FromStr for Layout {
    type Err = SpecError;

    /// [`parse_spec`].
    fn from_str(s: &str) -> Result<Layout, SpecError> {
        parse_spec(s)
    }
}

fn parse_text(text: &str, supported: bool) -> Result<Layout, SpecError> {
    let tokens = match TokenStream::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let err = syn::Error::new(
                e.span(),
                "cannot split the spec into tokens (an unclosed `(`, `[`, `{`, string or `/*` comment, or a \
                 character that is not a Rust token)",
            );
            return Err(SpecError::from_syn(text, &err, None));
        }
    };
    parse_tokens_inner(tokens, supported).map_err(|(e, le)| SpecError::from_syn(text, &e, le))
}

fn parse_tokens_inner(
    tokens: TokenStream,
    supported: bool,
) -> Result<Layout, (syn::Error, Option<LayoutError>)> {
    let mut b = Builder::default();
    let mut iter = tokens.clone().into_iter();
    if let Some(first) = iter.next() {
        let last = iter.last().unwrap_or_else(|| first.clone());
        b.whole = Some(Site {
            start: first.span(),
            end: last.span(),
            seq: 0,
        });
    }
    let parser = |input: ParseStream| parse_items(&mut b, input);
    parser.parse2(tokens).map_err(|e| (e, None))?;
    let layout = b.finish().map_err(|e| (e, None))?;
    let checked = if supported {
        layout.check_supported()
    } else {
        layout.validate()
    };
    match checked {
        Ok(()) => Ok(layout),
        Err(le) => {
            // Of the fields the rule involves, point at the one set last (ties: the main field).
            let mut site: Option<Site> = None;
            for f in le.fields() {
                if let Some(s) = b.site_of(f) {
                    if site.is_none_or(|best| s.seq > best.seq) {
                        site = Some(s);
                    }
                }
            }
            let site = site.or(b.whole);
            let msg = le.to_string();
            let err = match site {
                Some(site) => site.error(msg),
                None => syn::Error::new(Span::call_site(), msg),
            };
            Err((err, Some(le)))
        }
    }
}

/// A range of tokens: where a value was set.
#[derive(Clone, Copy)]
struct Site {
    start: Span,
    end: Span,
    /// Index of the top-level item that set the value: the larger, the later.
    seq: usize,
}

impl Site {
    fn error(self, msg: impl std::fmt::Display) -> syn::Error {
        let mut a = Punct::new('-', Spacing::Alone);
        a.set_span(self.start);
        let mut b = Punct::new('-', Spacing::Alone);
        b.set_span(self.end);
        let tokens: TokenStream = [TokenTree::Punct(a), TokenTree::Punct(b)]
            .into_iter()
            .collect();
        syn::Error::new_spanned(tokens, msg)
    }
}

/// A value and where it was last set (`None` when still unset).
struct Slot<T> {
    value: Option<T>,
    site: Option<Site>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            value: None,
            site: None,
        }
    }
}

impl<T: Copy> Slot<T> {
    fn set(&mut self, value: T, site: Site) {
        self.value = Some(value);
        self.site = Some(site);
    }
}

#[derive(Default)]
struct TensorSlots {
    bits: Slot<u32>,
    axis: Slot<QuantAxis>,
    group_size: Slot<GroupSize>,
    head_dim: Slot<u32>,
    symmetry: Slot<Symmetry>,
    scale_dtype: Slot<ScaleDtype>,
    rounding: Slot<Rounding>,
}

#[derive(Default)]
struct Builder {
    keys: TensorSlots,
    values: TensorSlots,
    residual_length: Slot<u32>,
    sink_tokens: Slot<u32>,
    num_heads: Slot<u32>,
    num_kv_heads: Slot<u32>,
    dtype: Slot<Dtype>,
    /// First and last token of the whole spec.
    whole: Option<Site>,
    /// Index of the item being parsed.
    seq: usize,
}

fn list(names: impl IntoIterator<Item = &'static str>) -> String {
    names.into_iter().collect::<Vec<_>>().join(", ")
}

fn model_names() -> String {
    list(MODEL_PRESETS.iter().map(|p| p.name))
}

fn quant_names() -> String {
    list(QUANT_PRESETS.iter().map(|p| p.name))
}

impl Builder {
    fn apply_model(&mut self, p: &ModelPreset, site: Site) {
        self.num_heads.set(p.num_heads, site);
        self.num_kv_heads.set(p.num_kv_heads, site);
        self.keys.head_dim.set(p.head_dim, site);
        self.values.head_dim.set(p.head_dim, site);
    }

    fn apply_quant(&mut self, p: &QuantPreset, site: Site) {
        self.keys.bits.set(p.key_bits, site);
        self.keys.axis.set(p.key_axis, site);
        self.keys.group_size.set(p.key_group_size, site);
        self.values.bits.set(p.value_bits, site);
        self.values.axis.set(p.value_axis, site);
        self.values.group_size.set(p.value_group_size, site);
        self.residual_length.set(p.residual_length, site);
    }

    /// Where the field at `path` (`"keys.bits"`, `"residual_length"`, ...) was last set.
    fn site_of(&self, path: &str) -> Option<Site> {
        let (tensor, field) = match path.split_once('.') {
            Some(("keys", f)) => (Some(&self.keys), f),
            Some(("values", f)) => (Some(&self.values), f),
            _ => (None, path),
        };
        match (tensor, field) {
            (Some(t), "bits") => t.bits.site,
            (Some(t), "axis") => t.axis.site,
            (Some(t), "group_size") => t.group_size.site,
            (Some(t), "head_dim") => t.head_dim.site,
            (Some(t), "quant") => t.symmetry.site,
            (Some(t), "scale_dtype") => t.scale_dtype.site,
            (Some(t), "rounding") => t.rounding.site,
            (None, "residual_length") => self.residual_length.site,
            (None, "sink_tokens") => self.sink_tokens.site,
            (None, "num_heads") => self.num_heads.site,
            (None, "num_kv_heads") => self.num_kv_heads.site,
            (None, "dtype") => self.dtype.site,
            _ => None,
        }
    }

    fn missing(&self, path: &str, hint: String) -> syn::Error {
        let msg = format!("no value for {path}: {hint}");
        match self.whole {
            Some(site) => site.error(msg),
            None => syn::Error::new(Span::call_site(), msg),
        }
    }

    fn finish_tensor(
        &self,
        name: &str,
        t: &TensorSlots,
        default_axis: QuantAxis,
    ) -> syn::Result<TensorQuant> {
        let quant_hint = |field: &str| {
            format!(
                "name a quantization preset ({}) or set `{name}: {{ {field}: N }}`",
                quant_names()
            )
        };
        let bits = t
            .bits
            .value
            .ok_or_else(|| self.missing(&format!("{name}.bits"), quant_hint("bits")))?;
        let group_size = t
            .group_size
            .value
            .ok_or_else(|| self.missing(&format!("{name}.group_size"), quant_hint("group_size")))?;
        let head_dim = t.head_dim.value.ok_or_else(|| {
            self.missing(
                &format!("{name}.head_dim"),
                format!(
                    "name a model preset ({}) or set `head_dim: N`",
                    model_names()
                ),
            )
        })?;
        Ok(TensorQuant {
            bits,
            axis: t.axis.value.unwrap_or(default_axis),
            group_size,
            head_dim,
            symmetry: t.symmetry.value.unwrap_or(Symmetry::Asymmetric),
            scale_dtype: t.scale_dtype.value.unwrap_or(ScaleDtype::F16),
            rounding: t.rounding.value.unwrap_or(Rounding::Half),
        })
    }

    fn finish(&self) -> syn::Result<Layout> {
        let keys = self.finish_tensor("keys", &self.keys, QuantAxis::PerChannel)?;
        let values = self.finish_tensor("values", &self.values, QuantAxis::PerToken)?;
        let residual_length = self.residual_length.value.ok_or_else(|| {
            self.missing(
                "residual_length",
                format!(
                    "name a quantization preset ({}) or set `residual_length: N`",
                    quant_names()
                ),
            )
        })?;
        let model_hint = |field: &str| {
            format!(
                "name a model preset ({}) or set `{field}: N`",
                model_names()
            )
        };
        let num_heads = self
            .num_heads
            .value
            .ok_or_else(|| self.missing("num_heads", model_hint("num_heads")))?;
        let num_kv_heads = self
            .num_kv_heads
            .value
            .ok_or_else(|| self.missing("num_kv_heads", model_hint("num_kv_heads")))?;
        Ok(Layout {
            keys,
            values,
            residual_length,
            sink_tokens: self.sink_tokens.value.unwrap_or(0),
            num_heads,
            num_kv_heads,
            dtype: self.dtype.value.unwrap_or(Dtype::F16),
        })
    }
}

/// How the next token reads in an error message.
fn found(input: ParseStream) -> String {
    match input.cursor().token_tree() {
        None => "end of input".to_string(),
        Some((TokenTree::Group(g), _)) => match g.delimiter() {
            Delimiter::Brace => "`{`".to_string(),
            Delimiter::Bracket => "`[`".to_string(),
            Delimiter::Parenthesis => "`(`".to_string(),
            Delimiter::None => format!("`{}`", g.stream()),
        },
        Some((tt, _)) => format!("`{tt}`"),
    }
}

/// An error at the next token, or at `end` (the last token of the spec) when the input is used up.
fn error_here(input: ParseStream, end: Option<Span>, msg: impl std::fmt::Display) -> syn::Error {
    let span = match end {
        Some(end) if input.is_empty() => end,
        _ => input.span(),
    };
    syn::Error::new(span, msg)
}

/// Skips doc comments (`///`, `//!`, `/** */`, which tokenize as `#[doc = ...]`); other attributes are errors.
fn skip_doc_comments(input: ParseStream) -> syn::Result<()> {
    while input.peek(Token![#]) {
        let pound: Token![#] = input.parse()?;
        if input.peek(Token![!]) {
            input.parse::<Token![!]>()?;
        }
        if !input.peek(syn::token::Bracket) {
            return Err(input.error(format!("expected `[` after `#`, found {}", found(input))));
        }
        let content;
        let bracket = syn::bracketed!(content in input);
        let is_doc = content.call(Ident::parse_any).is_ok_and(|id| id == "doc");
        if !is_doc {
            let site = Site {
                start: pound.span,
                end: bracket.span.close(),
                seq: 0,
            };
            return Err(site.error("attributes are not allowed in a kivi spec"));
        }
        // The rest of a doc attribute (`= "..."`) is ignored.
        let _: TokenStream = content.parse()?;
    }
    Ok(())
}

fn parse_items(b: &mut Builder, input: ParseStream) -> syn::Result<()> {
    let end = b.whole.map(|w| w.end);
    loop {
        skip_doc_comments(input)?;
        if input.is_empty() {
            return Ok(());
        }
        b.seq += 1;
        parse_item(b, input, end)?;
        skip_doc_comments(input)?;
        if input.is_empty() {
            return Ok(());
        }
        if !input.peek(Token![,]) {
            return Err(error_here(
                input,
                end,
                format!("expected `,` between items, found {}", found(input)),
            ));
        }
        input.parse::<Token![,]>()?;
    }
}

fn is_field_start(input: ParseStream) -> bool {
    input.peek(Ident::peek_any) && input.peek2(Token![:]) && !input.peek2(Token![::])
}

fn parse_item(b: &mut Builder, input: ParseStream, end: Option<Span>) -> syn::Result<()> {
    if is_field_start(input) {
        return parse_top_field(b, input, end);
    }
    if input.peek(Ident::peek_any) {
        let name = input.fork().call(Ident::parse_any)?.to_string();
        if TOP_LEVEL_FIELDS.contains(&name.as_str()) || TENSOR_FIELDS.contains(&name.as_str()) {
            input.call(Ident::parse_any)?;
            return Err(error_here(
                input,
                end,
                format!("expected `:` after `{name}`, found {}", found(input)),
            ));
        }
    }
    parse_preset(b, input, end)
}

fn parse_preset(b: &mut Builder, input: ParseStream, end: Option<Span>) -> syn::Result<()> {
    // A name is identifiers/literals joined by `-`: `llama-3-8b` is `llama` `-` `3` `-` `8b`. Spaces around
    // `-` are allowed (rustfmt writes `kivi - 2` inside `kivi_layout!(...)`); two pieces without a `-` between
    // them end the name (`kivi-2 llama-3-8b` is a missing comma).
    let mut name = String::new();
    let mut first: Option<Span> = None;
    let last = loop {
        let piece = match input.cursor().token_tree() {
            Some((TokenTree::Ident(i), _)) => Some(i.unraw().to_string()),
            Some((TokenTree::Literal(l), _)) => Some(l.to_string()),
            _ => None,
        };
        let Some(piece) = piece else {
            let msg = if first.is_none() {
                format!(
                    "expected a preset name ({}) or `field: value`, found {}",
                    preset_names(),
                    found(input)
                )
            } else {
                format!(
                    "expected the rest of the preset name after `{name}`, found {}",
                    found(input)
                )
            };
            return Err(error_here(input, end, msg));
        };
        let span = input.span();
        input.step(|cursor| match cursor.token_tree() {
            Some((_, rest)) => Ok(((), rest)),
            None => Err(cursor.error("unexpected end of input")),
        })?;
        name.push_str(&piece);
        first.get_or_insert(span);
        if !input.peek(Token![-]) {
            break span;
        }
        input.parse::<Token![-]>()?;
        name.push('-');
    };
    let first = first.unwrap_or(last);
    let site = Site {
        start: first,
        end: last,
        seq: b.seq,
    };
    if let Some(p) = model_preset(&name) {
        b.apply_model(p, site);
    } else if let Some(p) = quant_preset(&name) {
        b.apply_quant(p, site);
    } else {
        return Err(site.error(format!(
            "unknown preset `{name}`; known: {}",
            preset_names()
        )));
    }
    Ok(())
}

/// Parses `name:` and returns the name.
fn field_name(input: ParseStream) -> syn::Result<Ident> {
    let name = input.call(Ident::parse_any)?;
    input.parse::<Token![:]>()?;
    Ok(name)
}

fn parse_u32(input: ParseStream, end: Option<Span>, what: &str) -> syn::Result<(u32, Span)> {
    if !input.peek(LitInt) {
        return Err(error_here(
            input,
            end,
            format!("expected an integer for `{what}`, found {}", found(input)),
        ));
    }
    let lit: LitInt = input.parse()?;
    if lit.base10_digits().starts_with('-') {
        return Err(syn::Error::new(
            lit.span(),
            format!("expected a non-negative integer for `{what}`, found `{lit}`"),
        ));
    }
    if !lit.suffix().is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "unexpected suffix `{}` on `{what}`: write a plain integer",
                lit.suffix()
            ),
        ));
    }
    let value = lit.base10_parse::<u32>().map_err(|_| {
        syn::Error::new(
            lit.span(),
            format!("`{what}` {} does not fit in 32 bits", lit.base10_digits()),
        )
    })?;
    Ok((value, lit.span()))
}

fn parse_choice<T: Copy>(
    input: ParseStream,
    end: Option<Span>,
    what: &str,
    choices: &[(&'static str, T)],
) -> syn::Result<(T, Span)> {
    let names = list(choices.iter().map(|c| c.0));
    if !input.peek(Ident::peek_any) {
        return Err(error_here(
            input,
            end,
            format!(
                "expected one of {names} for `{what}`, found {}",
                found(input)
            ),
        ));
    }
    let id = input.call(Ident::parse_any)?;
    let text = id.unraw().to_string();
    match choices.iter().find(|c| c.0 == text) {
        Some(c) => Ok((c.1, id.span())),
        None => Err(syn::Error::new(
            id.span(),
            format!("unknown {what} `{text}`; expected one of: {names}"),
        )),
    }
}

fn parse_group_size(
    input: ParseStream,
    end: Option<Span>,
    what: &str,
) -> syn::Result<(GroupSize, Span)> {
    if input.peek(Ident::peek_any) {
        let (_, span) = parse_choice(input, end, what, &[("per_block", ())])?;
        return Ok((GroupSize::PerBlock, span));
    }
    if !input.peek(LitInt) {
        return Err(error_here(
            input,
            end,
            format!(
                "expected an integer or `per_block` for `{what}`, found {}",
                found(input)
            ),
        ));
    }
    let (n, span) = parse_u32(input, end, what)?;
    Ok((GroupSize::Elements(n), span))
}

fn parse_top_field(b: &mut Builder, input: ParseStream, end: Option<Span>) -> syn::Result<()> {
    let ident = field_name(input)?;
    let name = ident.unraw().to_string();
    let start = ident.span();
    let seq = b.seq;
    let site = |span: Span| Site {
        start,
        end: span,
        seq,
    };
    match name.as_str() {
        "keys" | "values" => {
            if !input.peek(syn::token::Brace) {
                return Err(error_here(
                    input,
                    end,
                    format!(
                        "expected `{{ ... }}` after `{name}:` (fields: {}), found {}",
                        list(TENSOR_FIELDS.iter().copied()),
                        found(input)
                    ),
                ));
            }
            let content;
            syn::braced!(content in input);
            let t = if name == "keys" {
                &mut b.keys
            } else {
                &mut b.values
            };
            parse_tensor_block(t, &name, &content, seq)?;
        }
        "residual_length" | "sink_tokens" | "num_heads" | "num_kv_heads" | "head_dim" => {
            let (v, span) = parse_u32(input, end, &name)?;
            let s = site(span);
            match name.as_str() {
                "residual_length" => b.residual_length.set(v, s),
                "sink_tokens" => b.sink_tokens.set(v, s),
                "num_heads" => b.num_heads.set(v, s),
                "num_kv_heads" => b.num_kv_heads.set(v, s),
                _ => {
                    b.keys.head_dim.set(v, s);
                    b.values.head_dim.set(v, s);
                }
            }
        }
        "dtype" => {
            let (v, span) = parse_choice(input, end, "dtype", DTYPES)?;
            b.dtype.set(v, site(span));
        }
        "scale_dtype" => {
            let (v, span) = parse_choice(input, end, "scale_dtype", SCALE_DTYPES)?;
            b.keys.scale_dtype.set(v, site(span));
            b.values.scale_dtype.set(v, site(span));
        }
        "rounding" => {
            let (v, span) = parse_choice(input, end, "rounding", ROUNDINGS)?;
            b.keys.rounding.set(v, site(span));
            b.values.rounding.set(v, site(span));
        }
        "quant" => {
            let (v, span) = parse_choice(input, end, "quant", SYMMETRIES)?;
            b.keys.symmetry.set(v, site(span));
            b.values.symmetry.set(v, site(span));
        }
        _ => {
            let hint = if TENSOR_FIELDS.contains(&name.as_str()) {
                format!(" (`{name}` goes inside `keys: {{ ... }}` or `values: {{ ... }}`)")
            } else {
                String::new()
            };
            return Err(syn::Error::new(
                start,
                format!(
                    "unknown field `{name}`{hint}; expected one of: {}",
                    list(TOP_LEVEL_FIELDS.iter().copied())
                ),
            ));
        }
    }
    Ok(())
}

fn parse_tensor_block(
    t: &mut TensorSlots,
    tensor: &str,
    input: ParseStream,
    seq: usize,
) -> syn::Result<()> {
    let mut seen: Vec<String> = Vec::new();
    loop {
        skip_doc_comments(input)?;
        if input.is_empty() {
            return Ok(());
        }
        if !input.peek(Ident::peek_any) {
            return Err(input.error(format!(
                "expected a `{tensor}` field ({}), found {}",
                list(TENSOR_FIELDS.iter().copied()),
                found(input)
            )));
        }
        let ident = input.call(Ident::parse_any)?;
        let name = ident.unraw().to_string();
        if !TENSOR_FIELDS.contains(&name.as_str()) {
            return Err(syn::Error::new(
                ident.span(),
                format!(
                    "unknown field `{name}` in `{tensor}`; expected one of: {}",
                    list(TENSOR_FIELDS.iter().copied())
                ),
            ));
        }
        if seen.contains(&name) {
            return Err(syn::Error::new(
                ident.span(),
                format!("duplicate field `{name}` in this `{tensor}` block"),
            ));
        }
        seen.push(name.clone());
        if !input.peek(Token![:]) || input.peek(Token![::]) {
            return Err(input.error(format!(
                "expected `:` after `{name}`, found {}",
                found(input)
            )));
        }
        input.parse::<Token![:]>()?;
        let what = format!("{tensor}.{name}");
        let start = ident.span();
        let site = |span: Span| Site {
            start,
            end: span,
            seq,
        };
        match name.as_str() {
            "bits" => {
                let (v, span) = parse_u32(input, None, &what)?;
                t.bits.set(v, site(span));
            }
            "head_dim" => {
                let (v, span) = parse_u32(input, None, &what)?;
                t.head_dim.set(v, site(span));
            }
            "axis" => {
                let (v, span) = parse_choice(input, None, &what, AXES)?;
                t.axis.set(v, site(span));
            }
            "group_size" => {
                let (v, span) = parse_group_size(input, None, &what)?;
                t.group_size.set(v, site(span));
            }
            "quant" => {
                let (v, span) = parse_choice(input, None, &what, SYMMETRIES)?;
                t.symmetry.set(v, site(span));
            }
            "scale_dtype" => {
                let (v, span) = parse_choice(input, None, &what, SCALE_DTYPES)?;
                t.scale_dtype.set(v, site(span));
            }
            _ => {
                let (v, span) = parse_choice(input, None, &what, ROUNDINGS)?;
                t.rounding.set(v, site(span));
            }
        }
        skip_doc_comments(input)?;
        if input.is_empty() {
            return Ok(());
        }
        if !input.peek(Token![,]) {
            return Err(input.error(format!(
                "expected `,` between `{tensor}` fields, found {}",
                found(input)
            )));
        }
        input.parse::<Token![,]>()?;
    }
}
