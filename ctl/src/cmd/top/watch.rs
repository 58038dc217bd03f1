//! `portwatch top --watch`: a live screen like top(1), redrawn every interval with per-second
//! rates, until q, Esc or Ctrl-C. The terminal is restored on every exit path.

use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Paragraph, Row as TableRow, Table, Wrap},
};

use crate::{
    output,
    pinned::Pinned,
    report::{Report, View},
};

pub(super) fn run(pinned: &mut Pinned, view: &View, interval: f64, exact: bool) -> Result<()> {
    // ratatui::init enters raw mode and the alternate screen, and installs a panic hook that
    // restores the terminal; ratatui::restore undoes it on the normal path.
    let mut terminal = ratatui::init();
    let result = watch_loop(&mut terminal, pinned, view, interval, exact);
    ratatui::restore();
    result
}

fn watch_loop(
    terminal: &mut ratatui::DefaultTerminal,
    pinned: &mut Pinned,
    view: &View,
    interval: f64,
    exact: bool,
) -> Result<()> {
    let mut before = view.read(pinned)?;
    let mut before_at = Instant::now();
    let mut report = Report::new(view, &before, None);
    loop {
        terminal.draw(|frame| draw(frame, &report, pinned, interval, exact))?;
        let deadline = before_at + Duration::from_secs_f64(interval);
        while Instant::now() < deadline {
            if event::poll(deadline.saturating_duration_since(Instant::now()))? {
                if let Event::Key(key) = event::read()? {
                    let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
            }
        }
        let now = view.read(pinned)?;
        let secs = before_at.elapsed().as_secs_f64();
        report = Report::new(view, &now, Some((&before, secs)));
        before = now;
        before_at = Instant::now();
    }
}

fn draw(frame: &mut ratatui::Frame, report: &Report, pinned: &Pinned, interval: f64, exact: bool) {
    let [head, body] = Layout::vertical([Constraint::Length(3), Constraint::Min(1)]).areas(frame.area());
    let header = vec![
        Line::from(format!(
            "portwatch top: {}  every {interval} s  (q to quit)",
            pinned.pin.root.display()
        )),
        Line::from(output::summary(report)),
    ];
    frame.render_widget(Paragraph::new(header).wrap(Wrap { trim: true }), head);

    // The rate columns from the first screen on: `-` until there is a second reading.
    let columns = output::columns(report.by, true);
    let titles: Vec<&str> = columns.iter().map(|c| c.title()).collect();
    let rows: Vec<TableRow> = report
        .rows
        .iter()
        .map(|row| {
            TableRow::new(
                output::cells(row, &columns)
                    .iter()
                    .map(|c| c.text(exact))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let widths = columns.iter().map(|c| Constraint::Length(c.screen_width()));
    let table = Table::new(rows, widths)
        .header(TableRow::new(titles).style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED)));
    frame.render_widget(table, body);
}
