//! The command line: its definitions, and the conversions of what clap parsed into the domain's
//! types (`Direction`, `Directions`, `View`, `Filter`). Only this module knows clap's own types;
//! each verb's work lives in `cmd::<verb>`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use portwatch_common::{Direction, Directions, TierSizes, DEFAULT_MAX_ENTRIES, MAX_ENTRIES_LIMIT};

use crate::{
    attach::Mode,
    filter::{Cidr, Filter},
    memory,
    pinned::DEFAULT_PIN_PATH,
    ports::PortSpec,
    report::{By, SortBy, View},
    threshold::Range,
};

const EXAMPLES: &str = "\
Examples:
  portwatch load --iface eth0 --port 443        count traffic to 443 (tcp and udp) on eth0
  portwatch load --iface eth0 --port 53/udp --port 8000-8100/tcp --direction ingress
  portwatch ports add 8080                      watch 8080 too, from the next packet on
  portwatch ports del 443/udp
  portwatch status                              what is loaded, attached, watched, counted
  portwatch top                                 the top 10 remote IPs by bytes
  portwatch reset --json >> /var/log/portwatch.jsonl    zero, printing exactly what was zeroed
  portwatch detach eth0                         stop counting on eth0, keep the rest
  portwatch unload                              remove everything portwatch attached and pinned

Exit codes:
  0 success    1 other failure    2 bad arguments (a bad SPEC, --max-entries 0...) or config file,
    or maps that would take more memory than --memory-limit (load, apply: see --force)
  3 not root / missing CAP_BPF or CAP_NET_ADMIN    4 nothing loaded
  5 pinned state of another layout version, or a load that conflicts with it
  6 unknown or not-attached interface    7 bpffs missing and cannot be mounted
  8 a history record file or database that cannot be used";

#[derive(Parser)]
#[command(
    name = "portwatch",
    version,
    about = "Count, in the kernel, the traffic each remote IP sends to your ports",
    long_about = "Count, in the kernel, the traffic each remote IP sends to your ports.\n\n\
        `load` attaches an eBPF TC program and pins it, its links and its maps under the pin path, \
        then exits: counting goes on in the kernel with no portwatch process running. Every other \
        command opens the pinned state, does one thing and exits.",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Where portwatch's programs, links and maps are pinned (on bpffs)
    #[arg(long, global = true, env = "PORTWATCH_PIN_PATH", default_value = DEFAULT_PIN_PATH, value_name = "DIR")]
    pub pin_path: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the program, pin it and its maps, attach it to interfaces and watch ports, then exit
    #[command(after_help = "Examples:\n  portwatch load --iface eth0 --port 443\n  \
        portwatch load --iface eth0 --iface eth1 --port https --port 53/udp --max-entries 1000000\n\n\
        Run again when loaded, it attaches the new interfaces and adds the new ports.\n\n\
        Before it makes the maps it weighs them: it prints the kernel memory they take, and refuses \
        (exit code 2) maps past --memory-limit unless given --force (docs/memory.md).")]
    Load(LoadArgs),
    /// Attach the loaded program to one more interface
    #[command(after_help = "Example:\n  portwatch attach eth1 --direction ingress")]
    Attach {
        /// Interface name
        iface: String,
        /// Directions to count on it (default: those `load` was given)
        #[arg(long, value_enum)]
        direction: Option<DirectionArg>,
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// The interface is in this network namespace (`ip netns` NAME, or a PATH such as
        /// /proc/PID/ns/net); the pins stay in this bpffs
        #[arg(long, value_name = "NAME|PATH")]
        netns: Option<String>,
    },
    /// Detach from one interface; the others keep counting
    #[command(after_help = "Examples:\n  portwatch detach eth1\n  portwatch detach eth0 --netns web")]
    Detach {
        /// Interface name (also the name of an interface that has vanished since)
        iface: String,
        /// The interface is in this network namespace (as given to `load` or `attach`)
        #[arg(long, value_name = "NAME|PATH")]
        netns: Option<String>,
    },
    /// Change or list the watched ports; changes apply to the next packet, with no reload
    #[command(subcommand)]
    Ports(PortsCommand),
    /// Show what is loaded, where it is attached, what is watched and counted
    #[command(after_help = "Examples:\n  portwatch status\n  portwatch status --json | jq .stats")]
    Status {
        /// One JSON object on stdout
        #[arg(long)]
        json: bool,
    },
    /// Show the top talkers: remote IPs by bytes (or packets) since the last reset
    #[command(after_help = TOP_EXAMPLES)]
    Top(TopArgs),
    /// Zero the counters (all, or those selected) and print exactly what was zeroed
    #[command(after_help = RESET_EXAMPLES)]
    Reset(ResetArgs),
    /// Detach everywhere and remove every pin; afterwards nothing of portwatch is left
    #[command(after_help = "Examples:\n  portwatch unload\n  \
        portwatch unload --drain-to /var/log/portwatch/portwatch.jsonl    (as portwatch.service stops)")]
    Unload {
        /// First detach everything and append every counter to FILE (one JSON line, as `reset
        /// --json` writes it): nothing counted is lost
        #[arg(long, value_name = "FILE")]
        drain_to: Option<PathBuf>,
        /// Unload even when a reset that was interrupted cannot be finished (its record's file was
        /// replaced or cannot be written): the counts it holds are removed with everything else
        #[arg(long)]
        force: bool,
    },
    /// Make the pinned state match a configuration file: load, attach, detach, watch ports
    #[command(after_help = APPLY_EXAMPLES)]
    Apply(ApplyArgs),
    /// Apply a configuration file, then again within a second of every change to it
    #[command(after_help = WATCH_EXAMPLES)]
    Watch {
        /// The configuration file (see examples/portwatch.yaml)
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// The configuration file of what is pinned
    #[command(subcommand)]
    Config(ConfigCommand),
    /// A monitoring-plugin check (Nagios, Icinga, Sensu): rates over an interval against thresholds,
    /// exit code 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
    #[command(after_help = ALERT_EXAMPLES)]
    Alert(AlertArgs),
    /// Print the metrics in the Prometheus text format (or write them for node_exporter's
    /// textfile collector)
    #[command(after_help = METRICS_EXAMPLES)]
    Metrics {
        /// Write FILE atomically (a temporary file beside it, fsync, rename) instead of stdout
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Serve the metrics over HTTP (GET /metrics) until SIGINT or SIGTERM
    #[command(after_help = SERVE_EXAMPLES)]
    Serve {
        /// Address and port to listen on
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9814")]
        listen: String,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Traffic over days and months, from the reset records: ingest them, then sum or rank
    #[command(after_help = HISTORY_EXAMPLES, args_conflicts_with_subcommands = true)]
    History(HistoryArgs),
    /// Print a shell completion script
    #[command(
        after_help = "Examples:\n  portwatch completions bash > /etc/bash_completion.d/portwatch\n  \
        portwatch completions zsh > /usr/local/share/zsh/site-functions/_portwatch\n  \
        portwatch completions fish > ~/.config/fish/completions/portwatch.fish"
    )]
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff)
    #[command(after_help = "Example:\n  portwatch man > /usr/local/share/man/man8/portwatch.8")]
    Man,
    /// Load the embedded program through the verifier, report, and unload it; changes nothing
    Check,
}

#[derive(Args)]
pub struct LoadArgs {
    /// Interface to attach to (repeat for more)
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,
    /// Port SPEC to watch: 443, 443/tcp, 53/udp, 8000-8100, 8000-8100/udp, https (repeat for more)
    #[arg(long = "port", value_name = "SPEC", allow_hyphen_values = true, value_parser = parse_spec)]
    pub ports: Vec<PortSpec>,
    /// Which traffic to count: to the watched ports (ingress), their replies (egress), or both
    /// [default: both]
    #[arg(long, value_enum)]
    pub direction: Option<DirectionArg>,
    #[arg(long, value_name = "N", value_parser = parse_max_entries, help = format!(
        "Remote-IP keys the per-IP map holds; past it, new remote IPs are counted under their \
         prefix (docs/flood.md) [default: {DEFAULT_MAX_ENTRIES}]"
    ))]
    pub max_entries: Option<u32>,
    /// Keys of the prefix tier (a remote's /24 or /48, once the per-IP map is full)
    /// [default: a quarter of --max-entries, at least 1024]
    #[arg(long, value_name = "N", value_parser = parse_max_entries)]
    pub prefix_entries: Option<u32>,
    /// Keys of the wide prefix tier (a remote's /16 or /32, once the prefix tier is full too)
    /// [default: a sixteenth of --max-entries, at least 256]
    #[arg(long, value_name = "N", value_parser = parse_max_entries)]
    pub wide_prefix_entries: Option<u32>,
    /// How to attach: TCX links, falling back to clsact when refused (auto), or force one
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// The interfaces are in this network namespace (`ip netns` NAME, or a PATH such as
    /// /proc/PID/ns/net); the pins stay in this bpffs
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// The memory guard of a first load (`load`, `apply`): docs/memory.md.
#[derive(Args)]
pub struct MemoryArgs {
    /// Refuse to create maps that would take more kernel memory than this: a share of the
    /// machine's memory (10%) or a size (512M, 2G; K, M, G, T are powers of 1024)
    #[arg(long, value_name = "SIZE|PERCENT%", default_value = "10%", value_parser = parse_memory_limit)]
    pub memory_limit: memory::Limit,
    /// Create the maps whatever kernel memory they take
    #[arg(long)]
    pub force: bool,
}

impl From<&MemoryArgs> for memory::Guard {
    fn from(args: &MemoryArgs) -> memory::Guard {
        memory::Guard {
            limit: args.memory_limit,
            force: args.force,
        }
    }
}

fn parse_memory_limit(s: &str) -> Result<memory::Limit, String> {
    if let Some(percent) = s.strip_suffix('%') {
        return match percent.parse::<u8>() {
            Ok(p @ 1..=100) => Ok(memory::Limit::Share(p)),
            _ => Err(format!("{s:?} is not a share from 1% to 100%")),
        };
    }
    let (digits, shift) = match s.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: the units are K, M, G and T (powers of 1024)")),
            };
            (&s[..at], shift)
        }
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|bytes| *bytes > 0)
        .map(memory::Limit::Bytes)
        .ok_or_else(|| format!("{s:?} is not a size (512M, 2G) nor a share (10%)"))
}

const APPLY_EXAMPLES: &str = "\
Examples:
  portwatch apply -f /etc/portwatch/portwatch.yaml              load, attach, watch as the file says
  portwatch apply -f portwatch.yaml --dry-run                   print what would change, change nothing
  portwatch apply -f portwatch.yaml --reload --drain-to /var/log/portwatch.jsonl

One line per change (`+ port 8080/tcp`, `- attach eth1 egress`), or `no changes`. All or nothing: if
a step fails, what it changed is undone. A new max_entries or direction needs a reload: `--reload`
detaches, drains every counter into the --drain-to log (one JSON line, as `reset --json` writes
it), unloads and loads again. A load or reload weighs its maps first, as `load` does: it says the
kernel memory they take (`  maps: ...`) and refuses past --memory-limit without --force.";

const WATCH_EXAMPLES: &str = "\
Example:
  portwatch watch -f /etc/portwatch/portwatch.yaml

Applies the file, then again within a second of every change (an editor's rename over it, a delete
and create included). An edit that cannot be applied is reported on stderr and the state stays as
it was. SIGINT or SIGTERM ends it (exit 0), and counting goes on in the kernel.";

const METRICS_EXAMPLES: &str = "\
Examples:
  portwatch metrics                                           the metrics on stdout
  portwatch metrics --output /var/lib/node_exporter/portwatch.prom    for node_exporter's textfile collector
  portwatch metrics --per-ip 10                               and the top 10 remote IPs of each port

Per port, portwatch_port_bytes_total and _packets_total never go down: what a reset takes is kept in
the pinned drained totals. Per-remote series are opt-in (--per-ip, --per-cidr), capped by
--max-series, and restart from zero after each reset.";

const SERVE_EXAMPLES: &str = "\
Examples:
  portwatch serve                                   http://127.0.0.1:9814/metrics
  portwatch serve --listen 0.0.0.0:9814 --per-cidr 24,64

Each scrape reads the pinned state afresh; serve keeps nothing. While nothing is loaded it answers
portwatch_loaded 0. Counting never depends on it.";

const ALERT_EXAMPLES: &str = "\
Examples:
  portwatch alert -w 80MB/s -c 100MB/s                  every watched port, bytes/s over 5 s
  portwatch alert --port 443/tcp --direction ingress -w 50MB/s -c 80MB/s
  portwatch alert --packets -w 50kpps -c 100kpps --interval 10 -t 20
  portwatch alert --per-remote -w 5MB/s -c 20MB/s       the heaviest single remote (IP or prefix)
  portwatch alert --port 53/udp -c 1kB/s:               CRITICAL when port 53 gets under 1 kB/s
  portwatch alert --sources -w 1000 -c 10000            distinct sources past the per-IP map

Prints one line, `PORTWATCH OK - ... | perfdata`, and exits 0 OK, 1 WARNING, 2 CRITICAL, or 3 UNKNOWN
(nothing loaded, missing privileges, bad arguments, a timeout): portwatch's other exit codes do not
apply. It reads the live counters twice, --interval apart, and never resets them.

Ranges (monitoring-plugins guidelines): 10 alerts outside 0..10, 10: below 10, ~:10 above 10,
10:20 outside 10..20, @10:20 inside 10..20 (ends included). Units on either end: B/s, kB/s (or
KB/s), MB/s, GB/s, TB/s are SI (10^3...); KiB/s, MiB/s, GiB/s, TiB/s are IEC (2^10...); `/s` may be
left out; bits are not accepted. A plain number is bytes/s. With --packets: pps, kpps, Mpps, Gpps.
--sources takes plain numbers.

Every port, protocol and direction selected is measured (a silent one at 0); the worst sets the
state and is named. Performance data per port: '443/tcp/ingress_Bps' (bytes/s, no UOM: the
guidelines have none for rates), '443/tcp/ingress_bytes' (the exact bytes of the interval, B), or
_pps and _packets with --packets, _top_remote_Bps with --per-remote, _sources with --sources; and
'interval' (s).";

const TOP_EXAMPLES: &str = "\
Examples:
  portwatch top                          top 10 remote IPs by bytes, all watched ports
  portwatch top -n 20 --by ip-port       per IP, port, protocol and direction
  portwatch top --by cidr --prefix4 16   per /16 (IPv4) and /64 (IPv6)
  portwatch top --port 443 --direction ingress --interval 5    with rates over 5 s
  portwatch top --interval 10 --json | ...   one JSON object every 10 s (JSON lines), until interrupted
  portwatch top --watch                  a live view, redrawn every second; q quits
  portwatch top --json | jq '.rows[0]'

Counters run from the last `portwatch reset`. The totals line adds every row the filters keep
(not only the rows shown) and the overflow entry's traffic (remote IPs that found the counter
map full), unless --port is given: overflow traffic has no known port.";

const RESET_EXAMPLES: &str = "\
Examples:
  portwatch reset                                   zero everything, print what was zeroed
  portwatch reset --json >> /var/log/portwatch.jsonl
  */5 * * * * portwatch reset --json --output /var/log/portwatch.jsonl    (crontab)
  portwatch reset --port 443 --ip 198.18.0.0/15     zero only those counters

Lossless: every byte the kernel counts lands in exactly one reset's output or in the counters
still in place, even under full-rate traffic (see bpffs-layout.md, \"Reset\"). If the output cannot
be written, the drained counts are put back and the reset fails.";

/// What a row of `top` and `history top` is, and how many are shown.
#[derive(Args)]
pub struct RowsArgs {
    /// Rows to show (0: all)
    #[arg(short = 'n', long = "limit", value_name = "N", default_value_t = 10)]
    pub limit: usize,
    /// What a row is
    #[arg(long, value_enum, default_value_t = By::Ip)]
    pub by: By,
    /// IPv4 prefix length for --by cidr
    #[arg(long, value_name = "LEN", default_value_t = 24, value_parser = clap::value_parser!(u8).range(0..=32))]
    pub prefix4: u8,
    /// IPv6 prefix length for --by cidr
    #[arg(long, value_name = "LEN", default_value_t = 64, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub prefix6: u8,
}

#[derive(Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub rows: RowsArgs,
    /// Only these ports (SPEC as for `ports add`; repeat for more)
    #[arg(long = "port", value_name = "SPEC", allow_hyphen_values = true, value_parser = parse_spec)]
    pub ports: Vec<PortSpec>,
    /// Only this direction
    #[arg(long, value_enum)]
    pub direction: Option<OneDirection>,
    /// Order rows by bytes or packets (by their rate when --interval or --watch is given)
    #[arg(long, value_enum, default_value_t = SortBy::Bytes)]
    pub sort: SortBy,
    /// Read every SECS and add per-second rates: a table once; with --json or --csv, one object
    /// (or block of rows) per interval, until interrupted or --count
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    pub interval: Option<f64>,
    /// With --interval: stop after K intervals
    #[arg(long, value_name = "K", requires = "interval", conflicts_with = "watch", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Redraw the view every interval (default 1 s) as a live screen, until q or Ctrl-C
    #[arg(long, conflicts_with_all = ["json", "csv"])]
    pub watch: bool,
    /// One JSON object on one line
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// A header line and one line per row
    #[arg(long)]
    pub csv: bool,
    /// Exact byte counts instead of KiB/MiB/GiB
    #[arg(long)]
    pub exact: bool,
}

const HISTORY_EXAMPLES: &str = "\
Examples:
  portwatch history ingest /var/log/portwatch/portwatch.jsonl      add the records not in the store yet
  portwatch history --days                       traffic per day (local days), with a bar chart
  portwatch history --hours --since 24h --port 443
  portwatch history top --since 7d               the top remotes of the last 7 days
  portwatch history top --since 2026-11-01 --until 2026-12-01 --by port --json

The store: /var/lib/portwatch/history.db (--db, or `history: db:` in /etc/portwatch/portwatch.yaml).
Each answer says which buckets (5-minute, hourly, daily, monthly) it read and whether retention
had already removed part of the window.

Exit codes: 0 success, 1 failure, 2 bad arguments or configuration, 8 a record file or database
that cannot be used (not a reset record, a damaged database, another schema version).";

/// `history`: with no subcommand, the traffic per period.
#[derive(Args)]
pub struct HistoryArgs {
    #[command(subcommand)]
    pub command: Option<HistoryCommand>,
    #[command(flatten)]
    pub periods: PeriodArgs,
}

#[derive(Subcommand)]
pub enum HistoryCommand {
    /// Add reset records (JSON lines; rotated `.gz` files too) to the store; what is already in
    /// it is skipped, so running it again, or on a grown file, adds only what is new
    #[command(
        after_help = "Examples:\n  portwatch history ingest /var/log/portwatch/portwatch.jsonl\n  \
        portwatch history ingest /var/log/portwatch/portwatch.jsonl.*.gz /var/log/portwatch/portwatch.jsonl\n  \
        portwatch history ingest --keep-five-minutes 7d --cap 5000 records.jsonl"
    )]
    Ingest(IngestArgs),
    /// The top remotes (or ports, or prefixes) over a window of the history, as `top` shows them
    #[command(after_help = "Examples:\n  portwatch history top --since 24h\n  \
        portwatch history top --since 2026-12-01 --by ip-port --port 443 -n 20\n  \
        portwatch history top --since 30d --ip 198.18.0.0/15 --json")]
    Top(HistoryTopArgs),
}

/// Where the store is.
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// The history database [default: `history: db:` in the configuration file, else
    /// /var/lib/portwatch/history.db]
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// The configuration file whose `history:` section applies (read when it exists)
    #[arg(long, value_name = "FILE", default_value = "/etc/portwatch/portwatch.yaml")]
    pub config: PathBuf,
}

#[derive(Args)]
pub struct IngestArgs {
    /// Record files (as `reset --json --output FILE` writes them; gzip-compressed too)
    #[arg(value_name = "RECORD", default_value = "/var/log/portwatch/portwatch.jsonl")]
    pub records: Vec<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// How long 5-minute buckets are kept (48h unless the configuration file says)
    #[arg(long, value_name = "DURATION")]
    pub keep_five_minutes: Option<String>,
    /// How long hourly buckets are kept (35d)
    #[arg(long, value_name = "DURATION")]
    pub keep_hours: Option<String>,
    /// How long daily buckets are kept (400d)
    #[arg(long, value_name = "DURATION")]
    pub keep_days: Option<String>,
    /// How long monthly buckets are kept (forever)
    #[arg(long, value_name = "DURATION")]
    pub keep_months: Option<String>,
    /// Remotes each bucket keeps per port, protocol and direction; the rest is summed as `other`
    /// (1000)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub cap: Option<u32>,
    /// Print nothing when all went well (for timers and cron)
    #[arg(long, short)]
    pub quiet: bool,
}

/// The window and the filters of a history question.
#[derive(Args, Clone)]
pub struct WindowArgs {
    /// From: a duration back from now (24h, 7d), a date (2026-12-01) or a date and time
    /// (2026-12-01 10:00), local unless --utc [default: the oldest record]
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// To (as --since) [default: now]
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// Only these ports (SPEC as for `ports add`; repeat for more)
    #[arg(long = "port", value_name = "SPEC", allow_hyphen_values = true, value_parser = parse_spec)]
    pub ports: Vec<PortSpec>,
    /// Only remotes in this CIDR, or this IP (repeat for more)
    #[arg(long = "ip", value_name = "CIDR", value_parser = parse_cidr)]
    pub cidrs: Vec<Cidr>,
    /// Only this direction
    #[arg(long, value_enum)]
    pub direction: Option<OneDirection>,
    /// Times in UTC (daily and monthly buckets stay the local days they were summed in)
    #[arg(long)]
    pub utc: bool,
    /// One JSON object on one line
    #[arg(long)]
    pub json: bool,
    /// Exact byte counts instead of KiB/MiB/GiB
    #[arg(long)]
    pub exact: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl WindowArgs {
    pub fn filter(&self) -> Filter {
        Filter {
            ports: self.ports.clone(),
            cidrs: self.cidrs.clone(),
            direction: self.direction.map(Direction::from),
        }
    }
}

#[derive(Args)]
pub struct PeriodArgs {
    /// Per hour
    #[arg(long, group = "period")]
    pub hours: bool,
    /// Per day (the default)
    #[arg(long, group = "period")]
    pub days: bool,
    /// Per month
    #[arg(long, group = "period")]
    pub months: bool,
    /// Per 5 minutes
    #[arg(long, group = "period")]
    pub five_minutes: bool,
    #[command(flatten)]
    pub window: WindowArgs,
}

#[derive(Args)]
pub struct HistoryTopArgs {
    #[command(flatten)]
    pub rows: RowsArgs,
    /// Order rows by bytes or packets
    #[arg(long, value_enum, default_value_t = SortBy::Bytes)]
    pub sort: SortBy,
    /// A header line and one line per row
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    #[command(flatten)]
    pub window: WindowArgs,
}

impl From<&HistoryTopArgs> for View {
    fn from(args: &HistoryTopArgs) -> View {
        View {
            by: args.rows.by,
            prefix4: args.rows.prefix4,
            prefix6: args.rows.prefix6,
            filter: args.window.filter(),
            sort: args.sort,
            limit: args.rows.limit,
        }
    }
}

#[derive(Args)]
pub struct AlertArgs {
    /// WARNING when the measure is in this alert range (10, 10:, ~:10, 10:20, @10:20; units:
    /// 80MB/s, 5kpps)
    #[arg(short = 'w', long, value_name = "RANGE", allow_hyphen_values = true)]
    pub warning: Option<Range>,
    /// CRITICAL when the measure is in this alert range
    #[arg(short = 'c', long, value_name = "RANGE", allow_hyphen_values = true)]
    pub critical: Option<Range>,
    /// Only these ports (SPEC as for `ports add`; repeat for more) [default: every watched port]
    #[arg(long = "port", value_name = "SPEC", allow_hyphen_values = true, value_parser = parse_spec)]
    pub ports: Vec<PortSpec>,
    /// Only this direction [default: those loaded]
    #[arg(long, value_enum)]
    pub direction: Option<OneDirection>,
    /// Measure packets per second instead of bytes per second
    #[arg(long, conflicts_with = "sources")]
    pub packets: bool,
    /// Measure the heaviest single remote (an IP, or a prefix counted past the per-IP map) of each
    /// port, protocol and direction instead of the port's total; the summary names it
    #[arg(long, conflicts_with = "sources")]
    pub per_remote: bool,
    /// Measure the distinct remote addresses counted past the per-IP map since the last reset
    /// (estimated; 0 while the per-IP map has room). One reading, no interval
    #[arg(long)]
    pub sources: bool,
    /// Seconds between the two readings of the counters
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_interval)]
    pub interval: f64,
    /// UNKNOWN ("timed out") when the check takes longer than SECS; more than --interval
    #[arg(short = 't', long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_timeout)]
    pub timeout: f64,
    /// Measure the last period of the history store (the newest 5-minute bucket, the last
    /// reset's traffic) instead of the live counters: no interval, no privileges beyond reading
    /// the store
    #[arg(long, conflicts_with = "sources")]
    pub history: bool,
    /// With --history: UNKNOWN when the newest record in the store is older than this (the
    /// resets, or their ingest, stopped)
    #[arg(long, value_name = "DURATION", default_value = "15m", requires = "history", value_parser = parse_age)]
    pub max_age: std::time::Duration,
    #[command(flatten)]
    pub store: StoreArgs,
}

fn parse_age(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration such as 15m or 1h ({e})"))
}

impl From<&AlertArgs> for Filter {
    fn from(args: &AlertArgs) -> Filter {
        Filter {
            ports: args.ports.clone(),
            cidrs: vec![],
            direction: args.direction.map(Direction::from),
        }
    }
}

/// Whether the command line's verb is `alert` (read from the arguments themselves, for when clap
/// refuses them): a check reports bad arguments in its own format and exit code.
pub(crate) fn is_alert(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    let mut args = args.into_iter().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--pin-path") => {
                args.next();
            }
            Some(a) if a.starts_with('-') => {}
            verb => return verb == Some("alert"),
        }
    }
    false
}

#[derive(Args)]
pub struct ResetArgs {
    /// Only counters of these ports (repeat for more)
    #[arg(long = "port", value_name = "SPEC", allow_hyphen_values = true, value_parser = parse_spec)]
    pub ports: Vec<PortSpec>,
    /// Only counters of remote IPs in this CIDR, or this IP (repeat for more)
    #[arg(long = "ip", value_name = "CIDR", value_parser = parse_cidr)]
    pub cidrs: Vec<Cidr>,
    /// What was zeroed as one JSON object on one line (the schema of `top --json`)
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// What was zeroed as CSV
    #[arg(long)]
    pub csv: bool,
    /// Append what was zeroed to FILE (created if missing) instead of stdout
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Exact byte counts instead of KiB/MiB/GiB
    #[arg(long)]
    pub exact: bool,
}

impl From<&TopArgs> for View {
    fn from(args: &TopArgs) -> View {
        View {
            by: args.rows.by,
            prefix4: args.rows.prefix4,
            prefix6: args.rows.prefix6,
            filter: Filter {
                ports: args.ports.clone(),
                cidrs: vec![],
                direction: args.direction.map(Direction::from),
            },
            sort: args.sort,
            limit: args.rows.limit,
        }
    }
}

impl From<&ResetArgs> for Filter {
    fn from(args: &ResetArgs) -> Filter {
        Filter {
            ports: args.ports.clone(),
            cidrs: args.cidrs.clone(),
            direction: None,
        }
    }
}

impl From<&ResetArgs> for crate::output::RecordFormat {
    fn from(args: &ResetArgs) -> crate::output::RecordFormat {
        use crate::output::RecordFormat;
        if args.json {
            RecordFormat::Json
        } else if args.csv {
            RecordFormat::Csv
        } else {
            RecordFormat::Table { exact: args.exact }
        }
    }
}

/// One direction, for filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OneDirection {
    Ingress,
    Egress,
}

impl From<OneDirection> for Direction {
    fn from(d: OneDirection) -> Direction {
        match d {
            OneDirection::Ingress => Direction::Ingress,
            OneDirection::Egress => Direction::Egress,
        }
    }
}

#[derive(Args)]
pub struct ApplyArgs {
    /// The configuration file (see examples/portwatch.yaml)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Print what would change; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Unload and load again when max_entries or direction changes (needs --drain-to)
    #[arg(long, requires = "drain_to")]
    pub reload: bool,
    /// Where --reload appends every counter (one JSON line, as `reset --json` writes it) before
    /// unloading
    #[arg(long, value_name = "FILE", requires = "reload")]
    pub drain_to: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// Which per-remote series `metrics` and `serve` export (none by default: remote IPs are unbounded).
#[derive(Args)]
pub struct ExportArgs {
    /// Export the top N remote IPs of each port as portwatch_remote_*_total{remote=...}, the rest as
    /// remote="other"
    #[arg(long, value_name = "N", conflicts_with = "per_cidr")]
    pub per_ip: Option<usize>,
    /// Export per remote prefix instead: IPv4 /V4 and IPv6 /V6 (for example 24,64)
    #[arg(long, value_name = "V4,V6", value_parser = parse_prefixes)]
    pub per_cidr: Option<(u8, u8)>,
    /// The most per-remote series; the smallest are folded into remote="other"
    #[arg(long, value_name = "N", default_value_t = crate::metrics::DEFAULT_MAX_SERIES)]
    pub max_series: usize,
}

impl From<&ExportArgs> for crate::metrics::Options {
    fn from(args: &ExportArgs) -> crate::metrics::Options {
        use crate::metrics::PerRemote;
        crate::metrics::Options {
            per_remote: match (args.per_ip, args.per_cidr) {
                (Some(n), _) => Some(PerRemote::TopIps(n)),
                (None, Some((prefix4, prefix6))) => Some(PerRemote::Prefixes { prefix4, prefix6 }),
                (None, None) => None,
            },
            max_series: args.max_series,
        }
    }
}

fn parse_prefixes(s: &str) -> Result<(u8, u8), String> {
    let bad = || format!("{s:?}: give the IPv4 and IPv6 prefix lengths, as 24,64");
    let (v4, v6) = s.split_once(',').ok_or_else(bad)?;
    match (v4.trim().parse::<u8>(), v6.trim().parse::<u8>()) {
        (Ok(v4), Ok(v6)) if v4 <= 32 && v6 <= 128 => Ok((v4, v6)),
        _ => Err(bad()),
    }
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the pinned state as a configuration file that `apply -f` takes
    #[command(after_help = "Example:\n  portwatch config show > /etc/portwatch/portwatch.yaml")]
    Show,
}

#[derive(Subcommand)]
pub enum PortsCommand {
    /// Watch these ports too
    #[command(after_help = "Examples:\n  portwatch ports add 8080\n  portwatch ports add 8000-8100/udp https")]
    Add {
        #[arg(value_name = "SPEC", required = true, allow_hyphen_values = true, value_parser = parse_spec)]
        specs: Vec<PortSpec>,
    },
    /// Stop watching these ports (for the protocols given; both when none is)
    #[command(after_help = "Examples:\n  portwatch ports del 8080\n  portwatch ports del 443/udp")]
    Del {
        #[arg(value_name = "SPEC", required = true, allow_hyphen_values = true, value_parser = parse_spec)]
        specs: Vec<PortSpec>,
    },
    /// Watch exactly these ports, no others
    #[command(after_help = "Example:\n  portwatch ports set 443 53/udp")]
    Set {
        #[arg(value_name = "SPEC", required = true, allow_hyphen_values = true, value_parser = parse_spec)]
        specs: Vec<PortSpec>,
    },
    /// List the watched ports, folded into ranges
    List {
        /// One JSON object on stdout
        #[arg(long)]
        json: bool,
    },
}

/// Directions to count, for `load` and `attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    Ingress,
    Egress,
    Both,
}

impl From<DirectionArg> for Directions {
    fn from(d: DirectionArg) -> Directions {
        match d {
            DirectionArg::Ingress => Direction::Ingress.into(),
            DirectionArg::Egress => Direction::Egress.into(),
            DirectionArg::Both => Directions::BOTH,
        }
    }
}

fn parse_spec(s: &str) -> Result<PortSpec, String> {
    s.parse()
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!(
            "{s:?}: the interval is a number of seconds above 0, at most 3600"
        )),
    }
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!(
            "{s:?}: the timeout is a number of seconds above 0, at most 3600"
        )),
    }
}

impl LoadArgs {
    /// The tier sizes asked for: `--max-entries` (or its default), the prefix tiers derived from it
    /// unless given.
    pub(crate) fn sizes(&self) -> TierSizes {
        let derived = TierSizes::derived(self.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES));
        TierSizes {
            prefix: self.prefix_entries.unwrap_or(derived.prefix),
            wide_prefix: self.wide_prefix_entries.unwrap_or(derived.wide_prefix),
            ..derived
        }
    }
}

fn parse_max_entries(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    match n {
        0 => Err("a number of entries must be at least 1".into()),
        n if n > MAX_ENTRIES_LIMIT => Err(format!(
            "{n} is more than the {MAX_ENTRIES_LIMIT} entries portwatch allows"
        )),
        n => Ok(n),
    }
}
