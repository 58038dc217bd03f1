//! `#[kernel_test]`: marks a test that needs root and a BPF-capable kernel. It expands to a
//! `#[test]` whose body first asks `portwatch_tests::kernel_available` with the test's own name:
//! outside CI a machine without what the test needs skips it with a line saying why; under
//! `CI=true` the test fails instead. Nothing skips silently.
//!
//! `#[kernel_test(tcx)]` also needs TCX links (kernel 6.6 and later): on a kernel without them
//! (Debian 12's 6.1) the test is skipped with a line saying so, under `CI=true` too; it is the only
//! skip CI allows, and the test's classic tc variant runs there instead.
//!
//! ```ignore
//! #[kernel_test]
//! fn lifecycle_with_classic_tc() { ... }
//! #[kernel_test(tcx)]
//! fn lifecycle_with_tcx_links() { ... }
//! ```
//!
//! Written on `proc_macro` alone (no syn): it only needs the function's name and body.

use proc_macro::{Delimiter, Group, Ident, Literal, Punct, Spacing, Span, TokenStream, TokenTree};

#[proc_macro_attribute]
pub fn kernel_test(attr: TokenStream, item: TokenStream) -> TokenStream {
    let needs_tcx = match attr.to_string().as_str() {
        "" => false,
        "tcx" => true,
        _ => return error("#[kernel_test] takes no argument, or `tcx`"),
    };
    let mut tokens: Vec<TokenTree> = item.into_iter().collect();
    let name = tokens.windows(2).find_map(|w| match (&w[0], &w[1]) {
        (TokenTree::Ident(f), TokenTree::Ident(name)) if f.to_string() == "fn" => Some(name.to_string()),
        _ => None,
    });
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
