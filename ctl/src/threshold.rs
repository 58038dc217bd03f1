//! Thresholds of a monitoring-plugin check (`portwatch alert`): ranges in the syntax of the
//! monitoring-plugins development guidelines, with rate units on their ends, and the state a value
//! is in against a warning and a critical range.
//!
//! A range is `[@]start:end`. `start` is 0 when left out (`10` is `0:10`), `~` is minus infinity, an
//! empty `end` is plus infinity (`10:`). A value outside `start..=end` alerts; with `@`, a value
//! inside it (ends included) alerts. So `10` alerts above 10 (and below 0), `10:` below 10,
//! `~:10` above 10, `10:20` outside 10..20, `@10:20` inside 10..20.
//!
//! Units: rates are bytes per second, or packets per second with `--packets`. Byte prefixes are SI
//! (`kB/s` or `KB/s` = 1,000 B/s, `MB/s` = 10^6, `GB/s`, `TB/s`), as monitoring users read them;
//! IEC prefixes are accepted too (`KiB/s` = 1,024 B/s, `MiB/s`, `GiB/s`, `TiB/s`). `/s` may be left
//! out (`80MB`: the value is a rate anyway). Bits are not accepted (`b`, `bit`, `Mbit/s`): an
//! operator who thinks in bits converts, rather than portwatch guessing. Packet rates: `pps`,
//! `kpps`, `Mpps`, `Gpps` (SI). A number without a unit is in the measure's own unit (bytes/s,
//! packets/s, or a count of addresses).

use std::fmt;

/// What a check measures, and so the unit its thresholds and perfdata are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quantity {
    /// Bytes per second.
    ByteRate,
    /// Packets per second.
    PacketRate,
    /// A number of distinct remote addresses (no unit).
    Count,
}

impl Quantity {
    /// How the command line spells the unit, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Quantity::ByteRate => "a byte rate (B/s, kB/s, MB/s, KiB/s...)",
            Quantity::PacketRate => "a packet rate (pps, kpps, Mpps)",
            Quantity::Count => "a number of addresses (no unit)",
        }
    }

    /// A value in this unit for people: SI prefixes, as the thresholds are written.
    pub(crate) fn human(self, value: f64) -> String {
        let (unit, divisors): (&str, &[(&str, f64)]) = match self {
            Quantity::ByteRate => ("B/s", &[("G", 1e9), ("M", 1e6), ("k", 1e3)]),
            Quantity::PacketRate => ("pps", &[("G", 1e9), ("M", 1e6), ("k", 1e3)]),
            Quantity::Count => return format!("{}", value.round()),
        };
        for (prefix, divisor) in divisors {
            if value.abs() >= *divisor {
                return format!("{:.1} {prefix}{unit}", value / divisor);
            }
        }
        format!("{} {unit}", number(value, 1))
    }
}

/// The state of a check, with its exit code (0 to 3), in the order of severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum State {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl State {
    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    /// The word of the status line.
    pub(crate) fn word(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

/// A threshold range, its ends in the quantity's base unit (bytes/s, packets/s, addresses).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Range {
    /// `f64::NEG_INFINITY` for `~`.
    pub start: f64,
    /// `f64::INFINITY` when left out.
    pub end: f64,
    /// `@`: alert inside the range instead of outside.
    pub inside: bool,
    /// The quantity a unit on either end named (`None`: plain numbers).
    unit: Option<Quantity>,
    /// As given, for the status line.
    text: String,
}

impl Range {
    /// Whether `value` is one to alert on.
    pub(crate) fn alerts(&self, value: f64) -> bool {
        let within = self.start <= value && value <= self.end;
        within == self.inside
    }

    /// How far past the range `value` is (0 when it does not alert): which of several alerting
    /// values the status line names.
    pub(crate) fn excess(&self, value: f64) -> f64 {
        if !self.alerts(value) {
            0.0
        } else if self.inside {
            (value - self.start).min(self.end - value)
        } else if value < self.start {
            self.start - value
        } else {
            value - self.end
        }
    }

    /// Fails when an end was given in a unit of another quantity (`MB/s` with `--packets`).
    pub(crate) fn check_unit(&self, quantity: Quantity) -> Result<(), String> {
        match self.unit {
            Some(unit) if unit != quantity => Err(format!(
                "{:?}: this check measures {}, not {}",
                self.text,
                quantity.name(),
                unit.name()
            )),
            _ => Ok(()),
        }
    }

    /// As the command line gave it.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

/// In perfdata: the range in the base unit, without units, in the guidelines' shortest form.
impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inside {
            f.write_str("@")?;
        }
        let end = if self.end.is_finite() {
            number(self.end, 6)
        } else {
            String::new()
        };
        if self.start == f64::NEG_INFINITY {
            write!(f, "~:{end}")
        } else if self.start == 0.0 && self.end.is_finite() && !self.inside {
            f.write_str(&end)
        } else {
            write!(f, "{}:{end}", number(self.start, 6))
        }
    }
}

impl std::str::FromStr for Range {
    type Err = String;

    fn from_str(text: &str) -> Result<Range, String> {
        let bad = |why: &str| {
            format!(
                "{text:?}: {why}; a range is [@]START:END, START:, ~:END or END (10, 10:, ~:10, 10:20, \
                 @10:20), with units such as 80MB/s or 5kpps"
            )
        };
        let (inside, body) = match text.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if body.is_empty() {
            return Err(bad("empty"));
        }
        let mut unit = None;
        let mut amount = |s: &str| -> Result<f64, String> {
            let (value, named) = parse_amount(s).map_err(|why| bad(&why))?;
            match (unit, named) {
                (Some(a), Some(b)) if a != b => Err(bad("its two ends are in units of different quantities")),
                (_, Some(b)) => {
                    unit = Some(b);
                    Ok(value)
                }
                _ => Ok(value),
            }
        };
        let (start, end) = match body.split_once(':') {
            None => (0.0, amount(body)?),
            Some((start, end)) => {
                if matches!(start, "" | "~") && end.is_empty() {
                    return Err(bad("it has no end"));
                }
                let start = match start {
                    "~" => f64::NEG_INFINITY,
                    "" => 0.0,
                    s => amount(s)?,
                };
                let end = if end.is_empty() { f64::INFINITY } else { amount(end)? };
                (start, end)
            }
        };
        if start > end {
            return Err(bad("its start is above its end"));
        }
        Ok(Range {
            start,
            end,
            inside,
            unit,
            text: text.to_string(),
        })
    }
}

/// A number with an optional unit: its value in the base unit, and the quantity the unit names.
fn parse_amount(s: &str) -> Result<(f64, Option<Quantity>), String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    if unit.is_empty() {
        return Ok((value, None));
    }
    let (multiplier, quantity) = unit_of(unit).ok_or_else(|| {
        if unit.contains('b') && !unit.contains("pps") {
            format!("{unit:?} is a unit of bits: portwatch measures bytes (B, kB/s, MB/s)")
        } else {
            format!("{unit:?} is not a unit portwatch knows (B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s, pps, kpps)")
        }
    })?;
    Ok((value * multiplier, Some(quantity)))
}

/// The multiplier and quantity of a unit suffix.
fn unit_of(unit: &str) -> Option<(f64, Quantity)> {
    if let Some(prefix) = unit.strip_suffix("pps") {
        let m = match prefix {
            "" => 1.0,
            "k" | "K" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            _ => return None,
        };
        return Some((m, Quantity::PacketRate));
    }
    let bytes = unit.strip_suffix("/s").unwrap_or(unit).strip_suffix('B')?;
    let m = match bytes {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((m, Quantity::ByteRate))
}

/// A number in the C locale: `.` for the decimal point, no thousands separators, no exponent, at
/// most `decimals` decimals and no trailing zeros.
pub(crate) fn number(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

/// The state of `value` against the thresholds: critical first, then warning.
pub(crate) fn state(value: f64, warning: Option<&Range>, critical: Option<&Range>) -> State {
    if critical.is_some_and(|r| r.alerts(value)) {
        State::Critical
    } else if warning.is_some_and(|r| r.alerts(value)) {
        State::Warning
    } else {
        State::Ok
    }
}

/// One performance-data value: `'label'=value[UOM];warn;crit;min;max`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Perf {
    pub label: String,
    pub value: f64,
    /// One of the guidelines' UOMs: empty, `s`, `B`...
    pub uom: &'static str,
    pub warning: Option<Range>,
    pub critical: Option<Range>,
    pub min: Option<f64>,
}

/// What a check found: its state, one line for people, and the performance data.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Outcome {
    pub state: State,
    pub summary: String,
    pub perf: Vec<Perf>,
}

impl Outcome {
    /// A check that could not measure: UNKNOWN, saying what to do.
    pub(crate) fn unknown(summary: impl Into<String>) -> Outcome {
        Outcome {
            state: State::Unknown,
            summary: summary.into(),
            perf: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Range {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Each form of the guidelines' table, at and around its ends (ends are inside the range).
    #[test]
    fn every_form_alerts_where_the_guidelines_say() {
        let cases: &[(&str, &[(f64, bool)])] = &[
            (
                "10",
                &[(-0.5, true), (0.0, false), (5.0, false), (10.0, false), (10.5, true)],
            ),
            ("10:", &[(9.99, true), (10.0, false), (1e12, false)]),
            ("~:10", &[(-1e12, false), (10.0, false), (10.01, true)]),
            ("10:20", &[(9.0, true), (10.0, false), (20.0, false), (21.0, true)]),
            (
                "@10:20",
                &[(9.0, false), (10.0, true), (15.0, true), (20.0, true), (20.5, false)],
            ),
            ("0:", &[(0.0, false), (-1.0, true)]),
            (":10", &[(0.0, false), (11.0, true), (-1.0, true)]),
            ("@~:0", &[(-1.0, true), (0.0, true), (0.1, false)]),
            ("-5:-1", &[(-3.0, false), (0.0, true)]),
        ];
        for (text, values) in cases {
            let r = range(text);
            for &(value, alerts) in *values {
                assert_eq!(r.alerts(value), alerts, "{text} at {value}");
            }
        }
    }

    #[test]
    fn units_are_si_unless_iec_and_bytes_only() {
        let ends = |s: &str| {
            let r = range(s);
            (r.start, r.end)
        };
        assert_eq!(ends("80MB/s"), (0.0, 80e6));
        assert_eq!(ends("80MB"), (0.0, 80e6));
        assert_eq!(ends("1kB/s:2KB/s"), (1e3, 2e3));
        assert_eq!(ends("1.5GB/s:"), (1.5e9, f64::INFINITY));
        assert_eq!(ends("~:2TB/s"), (f64::NEG_INFINITY, 2e12));
        assert_eq!(ends("1KiB/s:1MiB/s"), (1024.0, 1048576.0));
        assert_eq!(ends("1GiB"), (0.0, 1073741824.0));
        assert_eq!(ends("100B/s"), (0.0, 100.0));
        assert_eq!(ends("5kpps:1Mpps"), (5e3, 1e6));
        assert_eq!(ends("12pps"), (0.0, 12.0));
        for bits in ["10Mb/s", "10Mbit/s", "10b", "10kbps"] {
            let e = bits.parse::<Range>().unwrap_err();
            assert!(e.contains("bits"), "{bits}: {e}");
        }
    }

    #[test]
    fn bad_ranges_are_refused() {
        for bad in [
            "",
            "@",
            ":",
            "~:",
            "@:",
            "~",
            "20:10",
            "abc",
            "10:abc",
            "10XB/s",
            "inf",
            "NaN",
            "1e3",
            "10:20:30",
            "1kB/s:5kpps",
            "~10",
            "@@10",
        ] {
            assert!(bad.parse::<Range>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_unit_of_another_quantity_is_refused() {
        assert!(range("80MB/s").check_unit(Quantity::ByteRate).is_ok());
        assert!(range("80").check_unit(Quantity::PacketRate).is_ok());
        assert!(range("80MB/s").check_unit(Quantity::PacketRate).is_err());
        assert!(range("5kpps").check_unit(Quantity::ByteRate).is_err());
        assert!(range("5kpps").check_unit(Quantity::Count).is_err());
    }

    #[test]
    fn perfdata_ranges_are_in_base_units_in_the_shortest_form() {
        for (given, printed) in [
            ("80MB/s", "80000000"),
            ("10:", "10:"),
            ("~:10", "~:10"),
            ("10:20", "10:20"),
            ("@10:20", "@10:20"),
            ("@10", "@0:10"),
            (":0.5KiB", "512"),
            ("1.25kB/s:", "1250:"),
        ] {
            assert_eq!(range(given).to_string(), printed, "{given}");
        }
    }

    #[test]
    fn critical_wins_over_warning() {
        let (w, c) = (range("10"), range("20"));
        assert_eq!(state(5.0, Some(&w), Some(&c)), State::Ok);
        assert_eq!(state(10.0, Some(&w), Some(&c)), State::Ok);
        assert_eq!(state(15.0, Some(&w), Some(&c)), State::Warning);
        assert_eq!(state(25.0, Some(&w), Some(&c)), State::Critical);
        assert_eq!(state(25.0, None, None), State::Ok);
        assert_eq!(state(25.0, None, Some(&c)), State::Critical);
    }

    #[test]
    fn numbers_are_in_the_c_locale() {
        assert_eq!(number(1234567.0, 3), "1234567");
        assert_eq!(number(2469.126, 2), "2469.13");
        assert_eq!(number(0.1, 3), "0.1");
        assert_eq!(number(-0.0001, 2), "0");
        assert_eq!(number(1e20, 0), "100000000000000000000");
    }
}
