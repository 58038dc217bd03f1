//! `portwatch serve [--listen ADDR]`: the metrics over HTTP, `GET /metrics`, read afresh from the
//! pinned state for each scrape (nothing kept in between), until SIGINT or SIGTERM (exit 0).
//! Optional and resident by choice: counting never depends on it.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::{
    lifecycle,
    metrics::{self, Options},
    pinned::{Access, PinPath, Pinned},
};

/// How often the loop looks at the stop flag when no request comes.
const TICK: Duration = Duration::from_millis(200);

pub(super) fn run(pin: &PinPath, listen: &str, options: &Options) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("handling SIGINT and SIGTERM")?;
    }
    let server = Server::http(listen).map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    eprintln!("portwatch: serving the metrics at http://{listen}/metrics");
    while !stop.load(Ordering::Relaxed) {
        if let Some(request) = server.recv_timeout(TICK).context("accepting a connection")? {
            // A client that goes away mid-answer is its own problem, not the server's.
            let _ = answer(request, pin, options);
        }
    }
    Ok(())
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name, value).expect("a valid header")
}

fn answer(request: Request, pin: &PinPath, options: &Options) -> std::io::Result<()> {
    let text = |code: u16, body: String| {
        Response::from_string(body)
            .with_status_code(code)
            .with_header(header("Content-Type", "text/plain; charset=utf-8"))
    };
    if !matches!(request.method(), Method::Get | Method::Head) {
        return request.respond(text(405, "only GET\n".into()).with_header(header("Allow", "GET, HEAD")));
    }
    match request.url().split('?').next().unwrap_or("") {
        "/metrics" => {
            // What a crash interrupted (a reset) is finished first, so that the totals are whole.
            if let Err(e) = lifecycle::recover_interrupted(pin, &mut |note| eprintln!("portwatch: {note}")) {
                eprintln!("portwatch: warning: {e:#}");
            }
            match Pinned::probe(pin, Access::Snapshot).and_then(|mut p| metrics::render(p.as_mut(), options)) {
                Ok(body) => request
                    .respond(Response::from_string(body).with_header(header("Content-Type", metrics::CONTENT_TYPE))),
                Err(e) => request.respond(text(500, format!("portwatch: {e:#}\n"))),
            }
        }
        "/" => request.respond(text(200, "portwatch exporter: the metrics are at /metrics\n".into())),
        _ => request.respond(text(404, "not found: the metrics are at /metrics\n".into())),
    }
}
