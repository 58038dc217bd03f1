//! `portwatch serve [--listen ADDR]`: the metrics over HTTP, `GET /metrics`, read afresh from the
//! pinned state for each scrape, until SIGINT or SIGTERM (exit 0). Scrapes that arrive while one
//! reads the maps get that read's answer, byte for byte, instead of reading them again: a
//! read holds the shared lock, and a reset should wait for one, not for a crowd. Nothing is kept
//! once a read is done: the next scrape reads afresh. Optional and resident by choice: counting
//! never depends on it.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
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

/// How often each handler looks at the stop flag when no request comes.
const TICK: Duration = Duration::from_millis(200);

/// Requests answered at once: all but the one reading wait for its answer (a slow client only
/// holds its own handler).
const HANDLERS: usize = 8;

pub(super) fn run(pin: &PinPath, listen: &str, options: &Options) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("handling SIGINT and SIGTERM")?;
    }
    let server = Server::http(listen).map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    eprintln!("portwatch: serving the metrics at http://{listen}/metrics");
    let scrapes = Scrapes::default();
    let handle = || -> Result<()> {
        while !stop.load(Ordering::Relaxed) {
            let request = server.recv_timeout(TICK).context("accepting a connection");
            // Any handler's failure ends them all.
            let request = request.inspect_err(|_| stop.store(true, Ordering::Relaxed))?;
            if let Some(request) = request {
                // A client that goes away mid-answer is its own problem, not the server's.
                let _ = answer(request, pin, options, &scrapes);
            }
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let handlers: Vec<_> = (0..HANDLERS).map(|_| scope.spawn(handle)).collect();
        handlers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a request handler panicked")))
            })
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(())
}

/// A scrape's answer: the body, or what went wrong (a 500).
type Answer = std::result::Result<String, String>;

/// The read of the maps in flight, if any, and how many there were.
#[derive(Default)]
struct Scrapes {
    in_flight: Mutex<Option<Arc<Flight>>>,
    reads: AtomicU64,
}

/// One read of the maps, and the answer every scrape that joined it gets.
#[derive(Default)]
struct Flight {
    answer: Mutex<Option<Arc<Answer>>>,
    done: Condvar,
}

impl Scrapes {
    /// The answer of the read in flight, or of a new one (`read` is given its number, from 1).
    fn answer(&self, read: impl FnOnce(u64) -> Answer) -> Arc<Answer> {
        let (flight, joined) = {
            let mut in_flight = self.in_flight.lock().expect("no handler panics holding it");
            match &*in_flight {
                Some(flight) => (Arc::clone(flight), true),
                None => {
                    let flight = Arc::new(Flight::default());
                    *in_flight = Some(Arc::clone(&flight));
                    (flight, false)
                }
            }
        };
        if joined {
            let mut answer = flight.answer.lock().expect("no handler panics holding it");
            loop {
                match &*answer {
                    Some(answer) => return Arc::clone(answer),
                    None => answer = flight.done.wait(answer).expect("no handler panics holding it"),
                }
            }
        }
        let number = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        // Those who joined must get an answer whatever happens.
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(number)))
            .unwrap_or_else(|_| Err("portwatch: reading the metrics panicked\n".into()));
        let answer = Arc::new(answer);
        // A scrape from now on reads afresh; those that joined get this answer.
        *self.in_flight.lock().expect("no handler panics holding it") = None;
        *flight.answer.lock().expect("no handler panics holding it") = Some(Arc::clone(&answer));
        flight.done.notify_all();
        answer
    }
}

/// Reads the metrics, as the `number`th read of this server.
fn read(pin: &PinPath, options: &Options, number: u64) -> Answer {
    // What a crash interrupted (a reset) is finished first, so that the totals are whole.
    if let Err(e) = lifecycle::recover_interrupted(pin, &mut |note| eprintln!("portwatch: {note}")) {
        eprintln!("portwatch: warning: {e:#}");
    }
    Pinned::probe(pin, Access::Snapshot)
        .and_then(|mut p| metrics::render(p.as_mut(), options, Some(number)))
        .map_err(|e| format!("portwatch: {e:#}\n"))
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name, value).expect("a valid header")
}

fn answer(request: Request, pin: &PinPath, options: &Options, scrapes: &Scrapes) -> std::io::Result<()> {
    let text = |code: u16, body: String| {
        Response::from_string(body)
            .with_status_code(code)
            .with_header(header("Content-Type", "text/plain; charset=utf-8"))
    };
    if !matches!(request.method(), Method::Get | Method::Head) {
        return request.respond(text(405, "only GET\n".into()).with_header(header("Allow", "GET, HEAD")));
    }
    match request.url().split('?').next().unwrap_or("") {
        "/metrics" => match &*scrapes.answer(|number| read(pin, options, number)) {
            Ok(body) => request.respond(
                Response::from_data(body.as_bytes()).with_header(header("Content-Type", metrics::CONTENT_TYPE)),
            ),
            Err(e) => request.respond(text(500, e.clone())),
        },
        "/" => request.respond(text(200, "portwatch exporter: the metrics are at /metrics\n".into())),
        _ => request.respond(text(404, "not found: the metrics are at /metrics\n".into())),
    }
}
