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

use super::top::read;
use crate::{
    output::human_bytes,
    pinned::Pinned,
    report::{Report, View},
};

pub fn run(pinned: &Pinned, view: &View, interval: f64, exact: bool) -> Result<()> {
    // ratatui::init enters raw mode and the alternate screen, and installs a panic hook that
    // restores the terminal; ratatui::restore undoes it on the normal path.
    let mut terminal = ratatui::init();
    let result = watch_loop(&mut terminal, pinned, view, interval, exact);
    ratatui::restore();
    result
}

fn watch_loop(
    terminal: &mut ratatui::DefaultTerminal,
    pinned: &Pinned,
    view: &View,
    interval: f64,
    exact: bool,
) -> Result<()> {
    let mut before = read(pinned, view)?;
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
        let now = read(pinned, view)?;
        let secs = before_at.elapsed().as_secs_f64();
        report = Report::new(view, &now, Some((&before, secs)));
        before = now;
        before_at = Instant::now();
    }
}

fn draw(frame: &mut ratatui::Frame, report: &Report, pinned: &Pinned, interval: f64, exact: bool) {
    let bytes = |b: u64| if exact { b.to_string() } else { human_bytes(b) };
    let [head, body] = Layout::vertical([Constraint::Length(3), Constraint::Min(1)]).areas(frame.area());
    let header = vec![
        Line::from(format!(
            "portwatch top: {}  every {interval} s  (q to quit)",
            pinned.pin.root.display()
        )),
        Line::from(report.summary()),
    ];
    frame.render_widget(Paragraph::new(header).wrap(Wrap { trim: true }), head);

    let json = report.to_json(&[]);
    let rows = json["rows"].as_array().cloned().unwrap_or_default();
    let id_keys: Vec<&str> = ["ip", "cidr", "port", "proto", "direction"]
        .into_iter()
        .filter(|k| rows.first().is_some_and(|r| r.get(k).is_some()))
        .collect();
    let id_keys = if id_keys.is_empty() { vec!["ip"] } else { id_keys };
    let mut titles: Vec<String> = id_keys.iter().map(|k| k.to_uppercase()).collect();
    titles.extend(["BYTES", "PACKETS", "BYTES/S", "PKTS/S"].map(String::from));
    let table_rows: Vec<TableRow> = rows
        .iter()
        .map(|r| {
            let mut cells: Vec<String> = id_keys
                .iter()
                .map(|k| r[*k].as_str().map(String::from).unwrap_or(r[*k].to_string()))
                .collect();
            cells.push(bytes(r["bytes"].as_u64().unwrap_or(0)));
            cells.push(r["packets"].to_string());
            let bps = r["bytes_per_sec"].as_f64();
            cells.push(
                bps.map(|b| format!("{}/s", bytes(b as u64)))
                    .unwrap_or_else(|| "-".into()),
            );
            cells.push(
                r["packets_per_sec"]
                    .as_f64()
                    .map(|p| format!("{p:.0}"))
                    .unwrap_or_else(|| "-".into()),
            );
            TableRow::new(cells)
        })
        .collect();
    let mut widths: Vec<Constraint> = id_keys
        .iter()
        .map(|k| match *k {
            "ip" => Constraint::Length(39),
            "cidr" => Constraint::Length(43),
            "port" => Constraint::Length(6),
            "proto" => Constraint::Length(6),
            _ => Constraint::Length(10),
        })
        .collect();
    widths.extend([
        Constraint::Length(14),
        Constraint::Length(12),
        Constraint::Length(14),
        Constraint::Length(10),
    ]);
    let table = Table::new(table_rows, widths)
        .header(TableRow::new(titles).style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED)));
    frame.render_widget(table, body);
}
