//! `#[kernel_test]`: marks a test that needs root and a BPF-capable kernel. It expands to a
//! `#[test]` whose body first asks `portwatch_tests::kernel_available` with the test's own name:
//! outside CI a machine without what the test needs skips it with a line saying why; under
//! `CI=true` the test fails instead. Nothing skips silently.
//!
//! `#[kernel_test(tcx)]` also needs TCX links (kernel 6.6 and later): on a kernel without them
//! (Debian 12's 6.1) the test is skipped with a line saying so, under `CI=true` too; it is the only
//! skip CI allows, and the test's classic tc variant runs there instead.
//!
//! `#[kernel_test(each_mode)]` goes on a function of the attach mode (`fn f(mode: &str)`): it
//! declares two tests, `f_tcx` (TCX links, as `#[kernel_test(tcx)]`) and `f_tc` (the classic clsact
//! qdisc, on every kernel), each calling `f` with its mode.
//!
//! ```ignore
//! #[kernel_test]
//! fn port_changes_apply_live_without_reload() { ... }
//! #[kernel_test(tcx)]
//! fn outputs_stay_the_same() { ... }
//! #[kernel_test(each_mode)]
//! fn lifecycle(mode: &str) { ... }
//! ```
//!
//! Written on `proc_macro` alone (no syn): it only needs the function's name and body.

use proc_macro::{Delimiter, Group, Ident, Literal, Punct, Spacing, Span, TokenStream, TokenTree};

#[proc_macro_attribute]
pub fn kernel_test(attr: TokenStream, item: TokenStream) -> TokenStream {
    let needs_tcx = match attr.to_string().as_str() {
        "" => false,
        "tcx" => true,
        "each_mode" => return each_mode(item),
        _ => return error("#[kernel_test] takes no argument, `tcx` or `each_mode`"),
    };
    let mut tokens: Vec<TokenTree> = item.into_iter().collect();
    let name = fn_name(&tokens);
    let (Some(name), Some(TokenTree::Group(body))) = (name, tokens.last().cloned()) else {
        return error("#[kernel_test] goes on a function");
    };
    if body.delimiter() != Delimiter::Brace {
        return error("#[kernel_test] goes on a function with a body");
    }
    let mut new_body = check("kernel_available", &name);
    if needs_tcx {
        new_body.extend(check("tcx_available", &name));
    }
    new_body.extend(body.stream());
    let mut group = Group::new(Delimiter::Brace, new_body);
    group.set_span(body.span());
    *tokens.last_mut().unwrap() = TokenTree::Group(group);

    let mut out: TokenStream = "#[test]".parse().unwrap();
    out.extend(tokens);
    out
}

/// The function unchanged, and a test per attach mode that calls it.
fn each_mode(item: TokenStream) -> TokenStream {
    let Some(name) = fn_name(&item.clone().into_iter().collect::<Vec<_>>()) else {
        return error("#[kernel_test(each_mode)] goes on a function");
    };
    let mut out = item;
    for (mode, tcx_check) in [("tcx", true), ("tc", false)] {
        let test = format!("{name}_{mode}");
        let tcx = if tcx_check {
            format!("if !::portwatch_tests::tcx_available({test:?}) {{ return; }}")
        } else {
            String::new()
        };
        let code = format!(
            "#[test] fn {test}() {{ if !::portwatch_tests::kernel_available({test:?}) {{ return; }} {tcx} {name}({mode:?}); }}"
        );
        out.extend(code.parse::<TokenStream>().unwrap());
    }
    out
}

fn fn_name(tokens: &[TokenTree]) -> Option<String> {
    tokens.windows(2).find_map(|w| match (&w[0], &w[1]) {
        (TokenTree::Ident(f), TokenTree::Ident(name)) if f.to_string() == "fn" => Some(name.to_string()),
        _ => None,
    })
}

/// `if !::portwatch_tests::<function>("<test>") { return; }`
fn check(function: &str, test: &str) -> TokenStream {
    [
        TokenTree::Ident(Ident::new("if", Span::call_site())),
        TokenTree::Punct(Punct::new('!', Spacing::Alone)),
    ]
    .into_iter()
    .chain(path(&["portwatch_tests", function]))
    .chain([
        TokenTree::Group(Group::new(
            Delimiter::Parenthesis,
            TokenTree::Literal(Literal::string(test)).into(),
        )),
        TokenTree::Group(Group::new(
            Delimiter::Brace,
            [
                TokenTree::Ident(Ident::new("return", Span::call_site())),
                TokenTree::Punct(Punct::new(';', Spacing::Alone)),
            ]
            .into_iter()
            .collect(),
        )),
    ])
    .collect()
}

/// `::a::b`
fn path(segments: &[&str]) -> Vec<TokenTree> {
    let mut out = vec![];
    for s in segments {
        out.push(TokenTree::Punct(Punct::new(':', Spacing::Joint)));
        out.push(TokenTree::Punct(Punct::new(':', Spacing::Alone)));
        out.push(TokenTree::Ident(Ident::new(s, Span::call_site())));
    }
    out
}

fn error(message: &str) -> TokenStream {
    format!("compile_error!({message:?});").parse().unwrap()
}
