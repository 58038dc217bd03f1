//! The two counter generations: what readers sum, and the reset protocol that drains them
//! without losing or double-counting a byte.
//!
//! The program writes only the generation `config.generation` names, incrementing values in place
//! through the pointer its lookup returned. Userspace therefore never deletes from or writes to the
//! generation the program writes. A reset:
//!
//! 1. flips `config.generation` to the other map, then waits until every program that was running
//!    has finished (`sys::wait_for_running_programs`: the kernel's `synchronize_rcu` behind an
//!    `ARRAY_OF_MAPS` update). From then on nothing writes the old map;
//! 2. reads the old map and deletes the selected entries from it: exact, nothing races;
//! 3. flips back and waits again, and drains the selected entries of the other map the same way
//!    (a selective reset leaves unselected entries in both maps, so both must be drained).
//!
//! Every byte the program counts is in exactly one place: a map entry still in place (readers sum
//! both generations), or one reset's snapshot.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::maps::PerCpuValues;
use portwatch_common::{map_names, Config, CounterKey, Counters};

use crate::{maps, pinned::Pinned, ports::PortSpec};

/// Hands every entry of both generations to `each`: summed per key, they are the counters since
/// the last reset (a key can be in both).
pub fn for_each(pinned: &Pinned, mut each: impl FnMut(CounterKey, Counters)) -> Result<()> {
    for generation in [0, 1] {
        maps::for_each_in_generation(pinned, generation, &mut each)?;
    }
    Ok(())
}

/// An IPv4 or IPv6 prefix, stored as an IPv6 prefix (IPv4 mapped), as keys store addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: [u8; 16],
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: &[u8; 16]) -> bool {
        let full = (self.len / 8) as usize;
        if ip[..full] != self.addr[..full] {
            return false;
        }
        let rest = self.len % 8;
        rest == 0 || (ip[full] ^ self.addr[full]) & (0xffu8 << (8 - rest)) == 0
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (
                ip,
                Some(
                    len.parse::<u8>()
                        .map_err(|_| format!("{s}: {len:?} is not a prefix length"))?,
                ),
            ),
            None => (s, None),
        };
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("{s}: not an IP address or CIDR (198.18.0.0/15, 2001:db8::/32)"))?;
        let (addr, len) = match ip {
            std::net::IpAddr::V4(v4) => {
                let len = len.unwrap_or(32);
                if len > 32 {
                    return Err(format!("{s}: an IPv4 prefix is at most /32"));
                }
                (v4.to_ipv6_mapped().octets(), 96 + len)
            }
            std::net::IpAddr::V6(v6) => {
                let len = len.unwrap_or(128);
                if len > 128 {
                    return Err(format!("{s}: an IPv6 prefix is at most /128"));
                }
                (v6.octets(), len)
            }
        };
        let mut masked = Cidr { addr, len };
        for (i, b) in masked.addr.iter_mut().enumerate() {
            let bits = (len as i32 - 8 * i as i32).clamp(0, 8) as u32;
            *b &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
        }
        Ok(masked)
    }
}

/// Which counters a reset zeroes: all of them, or those matching every given filter.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub ports: Vec<PortSpec>,
    pub cidrs: Vec<Cidr>,
}

impl Selector {
    pub fn is_everything(&self) -> bool {
        self.ports.is_empty() && self.cidrs.is_empty()
    }

    /// Overflow entries (traffic of unknown remote IP, port and protocol) only go with a reset
    /// of everything.
    pub fn selects(&self, key: &CounterKey) -> bool {
        if key.is_overflow() {
            return self.is_everything();
        }
        let bit = if key.proto == portwatch_common::IPPROTO_TCP {
            portwatch_common::PROTO_TCP
        } else {
            portwatch_common::PROTO_UDP
        };
        let port_ok = self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|s| s.ports().contains(&key.port) && s.protocols & bit != 0);
        let ip = key.remote_ip_octets();
        let ip_ok = self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(&ip));
        port_ok && ip_ok
    }
}

/// Signals that would interrupt a reset between draining and reporting are held until it is done.
struct HoldSignals(nix::sys::signal::SigSet);

impl HoldSignals {
    fn new() -> Result<Self> {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal};
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGPIPE,
        ] {
            set.add(s);
        }
        let mut old = SigSet::empty();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))?;
        Ok(HoldSignals(old))
    }
}

impl Drop for HoldSignals {
    fn drop(&mut self) {
        let _ = nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&self.0), None);
    }
}

/// What a reset took out of the maps, per key (sorted by key), before it is reported.
pub struct Drained {
    pub entries: Vec<(CounterKey, Counters)>,
    /// Held until the snapshot is written; `restore` puts it back if writing fails.
    _signals: HoldSignals,
}

fn set_generation(pinned: &Pinned, generation: u32) -> Result<()> {
    pinned
        .config()?
        .set(
            0,
            Config {
                generation,
                _reserved: 0,
            },
            0,
        )
        .context("writing the config map")?;
    let barrier = pinned.map_data(map_names::BARRIER)?;
    crate::sys::wait_for_running_programs(barrier.fd().as_fd()).context("waiting for running programs")
}

/// Reads and removes the selected entries of a generation the program no longer writes, adding
/// them to `into`. If removing fails midway, `into` still gets exactly what was removed (found by
/// reading the map again: nothing else writes it), so that the caller can put it back.
fn drain(pinned: &Pinned, generation: u32, selector: &Selector, into: &mut Vec<(CounterKey, Counters)>) -> Result<()> {
    let selected: Vec<_> = maps::read_generation(pinned, generation)?
        .into_iter()
        .filter(|(k, _)| selector.selects(k))
        .collect();
    let mut counters = pinned.counters(generation)?;
    let (overflow, removable): (Vec<_>, Vec<_>) = selected.into_iter().partition(|(k, _)| k.is_overflow());
    // The overflow keys stay (the program needs them when the map is full): zeroed.
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for (key, value) in overflow {
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
        counters.insert(key, zero, 0).context("zeroing an overflow key")?;
        into.push((key, value));
    }
    let mut keys = Vec::with_capacity(removable.len() * std::mem::size_of::<CounterKey>());
    for (key, _) in &removable {
        // SAFETY: CounterKey is plain bytes (Pod).
        keys.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (key as *const CounterKey).cast::<u8>(),
                std::mem::size_of::<CounterKey>(),
            )
        });
    }
    let data = pinned.counters_data(generation)?;
    let removed = match crate::sys::delete_batch(data.fd().as_fd(), &keys, removable.len()) {
        Ok(()) => Ok(()),
        Err(e) if crate::sys::batch_unsupported(&e) => removable
            .iter()
            .try_for_each(|(key, _)| counters.remove(key))
            .context("deleting a drained counter"),
        Err(e) => Err(e).context("BPF_MAP_DELETE_BATCH on a drained counter map"),
    };
    match removed {
        Ok(()) => {
            into.extend(removable);
            Ok(())
        }
        Err(e) => {
            let left: std::collections::HashSet<CounterKey> = maps::read_generation(pinned, generation)?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            into.extend(removable.into_iter().filter(|(k, _)| !left.contains(k)));
            Err(e)
        }
    }
}

/// The reset protocol (see the module's documentation). The caller holds the pin path's lock,
/// writes the snapshot, and calls `restore` if it could not. If a step fails, what was already
/// drained is put back before the error returns: a failed reset zeroes nothing.
pub fn reset(pinned: &Pinned, selector: &Selector) -> Result<Drained> {
    let signals = HoldSignals::new()?;
    let active = pinned.config()?.get(&0, 0)?.generation & 1;
    let other = active ^ 1;
    for generation in [0, 1] {
        maps::ensure_overflow_keys(&mut pinned.counters(generation)?)?;
    }
    let mut entries = Vec::new();
    let steps = (|| {
        set_generation(pinned, other)?;
        drain(pinned, active, selector, &mut entries)?;
        set_generation(pinned, active)?;
        drain(pinned, other, selector, &mut entries)
    })();
    if let Err(e) = steps {
        return match put_back(pinned, &entries) {
            Ok(()) => Err(e.context("the reset failed; nothing was zeroed")),
            Err(lost) => Err(e.context(format!(
                "the reset failed, and {} drained counters could not be put back ({lost:#})",
                entries.len()
            ))),
        };
    }
    // A key drained from both generations is one row.
    maps::sum_sorted(&mut entries);
    Ok(Drained {
        entries,
        _signals: signals,
    })
}

/// Puts drained counts back into the generation the program does not write (adding to what is
/// there), so that a snapshot that could not be written is not lost.
pub fn restore(pinned: &Pinned, drained: Drained) -> Result<()> {
    put_back(pinned, &drained.entries)
}

fn put_back(pinned: &Pinned, entries: &[(CounterKey, Counters)]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    // After a failure between a flip and its wait, a program may still write the map that is idle
    // now: wait again first (if even that fails, putting the counts back is still better than not).
    let _ = pinned
        .map_data(map_names::BARRIER)
        .map(|barrier| crate::sys::wait_for_running_programs(barrier.fd().as_fd()));
    let idle = (pinned.config()?.get(&0, 0)?.generation & 1) ^ 1;
    let mut counters = pinned.counters(idle)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for (key, value) in entries {
        let mut per_cpu = counters
            .get(key, 0)
            .map(|v| v.to_vec())
            .unwrap_or_else(|_| vec![Counters::default(); cpus]);
        per_cpu[0] += *value;
        counters
            .insert(key, PerCpuValues::try_from(per_cpu)?, 0)
            .context("restoring a drained counter")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> [u8; 16] {
        match s.parse::<std::net::IpAddr>().unwrap() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        }
    }

    #[test]
    fn cidrs_match_by_prefix() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains(&ip("198.18.7.7")) && c.contains(&ip("198.19.255.1")));
        assert!(!c.contains(&ip("198.20.0.1")) && !c.contains(&ip("2001:db8::1")));
        let c: Cidr = "198.18.3.9/24".parse().unwrap();
        assert_eq!(c, "198.18.3.0/24".parse().unwrap(), "host bits are masked");
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains(&ip("2001:db8:ffff::1")) && !c.contains(&ip("2001:db9::1")));
        let c: Cidr = "198.18.0.7".parse().unwrap();
        assert!(c.contains(&ip("198.18.0.7")) && !c.contains(&ip("198.18.0.8")));
        for bad in ["198.18.0.0/33", "2001:db8::/129", "nope", "1.2.3.4/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
