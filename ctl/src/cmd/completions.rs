//! `portwatch completions SHELL` and `portwatch man`: generated from the command line's own
//! definitions, so they cannot drift from it.

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::Cli;

pub(super) fn completions(shell: clap_complete::Shell) -> Result<()> {
    clap_complete::generate(shell, &mut Cli::command(), "portwatch", &mut std::io::stdout());
    Ok(())
}

/// The manual page: the command's own page, then a section per verb (its synopsis, description,
/// options and examples, as its `--help` has them).
pub(super) fn man() -> Result<()> {
    let command = Cli::command();
    let mut top = vec![];
    clap_mangen::Man::new(command.clone()).section("8").render(&mut top)?;
    let mut top = String::from_utf8(top)?.replace(".SH EXTRA", ".SH \"EXAMPLES AND EXIT CODES\"");
    // The verbs are sections of this page, not pages of their own.
    for verb in command.get_subcommands() {
        top = top.replace(
            &format!("portwatch\\-{}(8)", verb.get_name()),
            &format!("portwatch {}", verb.get_name()),
        );
    }
    let mut page = top.into_bytes();
    for verb in command.get_subcommands().filter(|v| v.get_name() != "help") {
        let name = format!("portwatch {}", verb.get_name());
        let man = clap_mangen::Man::new(verb.clone().name(name.clone()).bin_name(name.clone()));
        let mut part = vec![];
        man.render_synopsis_section(&mut part)?;
        man.render_description_section(&mut part)?;
        man.render_options_section(&mut part)?;
        if verb.has_subcommands() {
            man.render_subcommands_section(&mut part)?;
        }
        man.render_extra_section(&mut part)?;
        // The verb's sections become subsections of its own.
        let part = String::from_utf8(part)?
            .replace(".SH EXTRA", ".SS EXAMPLES")
            .replace(".SH ", ".SS ");
        page.extend_from_slice(format!(".SH \"{}\"\n{part}", name.to_uppercase()).as_bytes());
    }
    std::io::Write::write_all(&mut std::io::stdout().lock(), &page)?;
    Ok(())
}
