//! The one place where portwatch's kernel/userspace contract is defined: map names, key and value
//! layouts, flag bits and the layout version. `ctl-ebpf` and `ctl` both use these types; neither
//! restates a layout. Every struct is `#[repr(C)]` with explicit padding so that its bytes are the
//! same on both sides and documented byte by byte in `bpffs-layout.md`.
#![no_std]

/// Bumped whenever a pinned map's name, type, key, value or meaning changes. A `ctl` that finds
/// pinned state of another version refuses to touch it.
pub const LAYOUT_VERSION: u32 = 7;

/// Map names, as they appear in the object file and as the pin file names under the pin path.
pub mod map_names {
    /// `ARRAY[65536]` of `u8` port flags (`PROTO_TCP | PROTO_UDP`), indexed by port number.
    pub const WATCHED_PORTS: &str = "watched_ports";
    /// `PERCPU_HASH` `CounterKey -> Counters`, generation 0.
    pub const COUNTERS_0: &str = "counters_0";
    /// `PERCPU_HASH` `CounterKey -> Counters`, generation 1.
    pub const COUNTERS_1: &str = "counters_1";
    /// `PERCPU_ARRAY[FRONT_SLOTS]` of `FrontSlot`: generation 0's front cache.
    pub const FRONT_0: &str = "front_0";
    /// `PERCPU_ARRAY[FRONT_SLOTS]` of `FrontSlot`: generation 1's front cache.
    pub const FRONT_1: &str = "front_1";
    /// `PERCPU_HASH` `CounterKey -> Counters` (the address masked to its /24 or /48):
    /// generation 0's prefix tier, where a remote that finds the per-IP map full is counted.
    pub const TIER1_0: &str = "tier1_0";
    pub const TIER1_1: &str = "tier1_1";
    /// `PERCPU_HASH` `CounterKey -> Counters` (the address masked to its /16 or /32): the wide
    /// prefix tier, for a remote that finds the prefix tier full too.
    pub const TIER2_0: &str = "tier2_0";
    pub const TIER2_1: &str = "tier2_1";
    /// `PERCPU_ARRAY[2 * FRONT_SLOTS]` of `FrontSlot`: the two prefix tiers' front caches (tier 1's
    /// slots first), as `front_<g>` is the per-IP map's.
    pub const TIER_FRONT_0: &str = "tier_front_0";
    pub const TIER_FRONT_1: &str = "tier_front_1";
    /// `PERCPU_HASH` (not preallocated) `PortKey -> Counters`: the per-port overflow, for a remote
    /// that finds both prefix tiers full.
    pub const PORT_OVERFLOW_0: &str = "port_overflow_0";
    pub const PORT_OVERFLOW_1: &str = "port_overflow_1";
    /// `PERCPU_ARRAY[PORT_SLOTS]` of `PortSlot`: per port, protocol and direction, what went to the
    /// per-port overflow on this CPU, and the distinct-source registers of everything counted past
    /// the per-IP map.
    pub const PORT_SLOTS_0: &str = "port_slots_0";
    pub const PORT_SLOTS_1: &str = "port_slots_1";
    /// `ARRAY` (`BPF_F_MMAPABLE`, `TierSizes::filter_words` entries) of `u64`, eight one-byte
    /// marks each: which keys may be in the generation's per-IP map and prefix tiers
    /// (`filter_index`), so that a key that cannot be there skips the hash lookup once a map is
    /// full.
    pub const FILTER_0: &str = "filter_0";
    pub const FILTER_1: &str = "filter_1";
    /// `PERCPU_ARRAY[8]` of `u32`, indexed by `full_hint_index(generation, tier)`: 1 once an insert
    /// into that generation's map of that tier failed for lack of room (the program never deletes,
    /// so it stays full until userspace removes entries, and userspace then clears the hint). While
    /// set, new keys go straight to the next tier.
    pub const MAP_FULL: &str = "map_full";
    /// `ARRAY[1]` of `Config`: what the program reads on every packet.
    pub const CONFIG: &str = "config";
    /// `PERCPU_ARRAY[1]` of `Stats`: global statistics.
    pub const STATS: &str = "stats";
    /// `ARRAY[1]` of `Meta`: the layout version and what `load` was given. Never read by the program.
    pub const META: &str = "meta";
    /// `HASH` `AttachKey -> Attachment`: where the programs are attached, so that `detach` and
    /// `unload` remove exactly those (classic tc attachments cannot be pinned as links). Never read
    /// by the program.
    pub const ATTACHMENTS: &str = "attachments";

    /// `HASH` `PortKey -> Counters`: what resets took out of the counter maps, summed per watched
    /// port, protocol and direction, so that the exported per-port counters never go down. Written
    /// by `reset` (under the pin path's lock); never read by the program.
    pub const DRAINED: &str = "drained";

    /// `ARRAY_OF_MAPS[1]`, created and pinned by userspace (not in the object) and never read by
    /// the program: updating it makes the kernel wait for running programs (see "Reset").
    pub const BARRIER: &str = "barrier";

    /// `ARRAY[1]` of `Journal`: the state of the reset in progress (or of one that was interrupted),
    /// so that the next command that takes the lock finishes or rolls it back. Never read by the
    /// program.
    pub const JOURNAL: &str = "journal";
    /// `HASH` (not preallocated) `JournalKey -> Counters`: what that reset needs to finish after a
    /// crash (see `JournalKind`). Never read by the program.
    pub const JOURNAL_ENTRIES: &str = "journal_entries";

    /// The maps of the object (the barrier is created by `load`).
    pub const ALL: [&str; 25] = [
        WATCHED_PORTS,
        COUNTERS_0,
        COUNTERS_1,
        FRONT_0,
        FRONT_1,
        TIER1_0,
        TIER1_1,
        TIER2_0,
        TIER2_1,
        TIER_FRONT_0,
        TIER_FRONT_1,
        PORT_OVERFLOW_0,
        PORT_OVERFLOW_1,
        PORT_SLOTS_0,
        PORT_SLOTS_1,
        FILTER_0,
        FILTER_1,
        MAP_FULL,
        CONFIG,
        STATS,
        META,
        ATTACHMENTS,
        DRAINED,
        JOURNAL,
        JOURNAL_ENTRIES,
    ];
}

/// Which of the two counter generations `generation` (`Config::generation`) names: 0 or 1. Only
/// its bit 0 counts.
pub const fn generation_index(generation: u32) -> usize {
    (generation & 1) as usize
}

/// The counter map of a generation.
pub const fn counters_map(generation: u32) -> &'static str {
    if generation_index(generation) == 0 {
        map_names::COUNTERS_0
    } else {
        map_names::COUNTERS_1
    }
}

/// The front cache of a generation.
pub const fn front_map(generation: u32) -> &'static str {
    if generation_index(generation) == 0 {
        map_names::FRONT_0
    } else {
        map_names::FRONT_1
    }
}

/// The names of every map a generation counts into: the one place that pairs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationMaps {
    pub counters: &'static str,
    pub front: &'static str,
    pub tier1: &'static str,
    pub tier2: &'static str,
    pub tier_front: &'static str,
    pub port_overflow: &'static str,
    pub port_slots: &'static str,
    pub filter: &'static str,
}

/// The maps of generation `generation` (only its bit 0 counts).
pub const fn generation_maps(generation: u32) -> GenerationMaps {
    use map_names::*;
    if generation_index(generation) == 0 {
        GenerationMaps {
            counters: COUNTERS_0,
            front: FRONT_0,
            tier1: TIER1_0,
            tier2: TIER2_0,
            tier_front: TIER_FRONT_0,
            port_overflow: PORT_OVERFLOW_0,
            port_slots: PORT_SLOTS_0,
            filter: FILTER_0,
        }
    } else {
        GenerationMaps {
            counters: COUNTERS_1,
            front: FRONT_1,
            tier1: TIER1_1,
            tier2: TIER2_1,
            tier_front: TIER_FRONT_1,
            port_overflow: PORT_OVERFLOW_1,
            port_slots: PORT_SLOTS_1,
            filter: FILTER_1,
        }
    }
}

/// Where a remote's traffic is counted: by address while the per-IP map has room, then by
/// ever wider prefix, then by port alone. Stored as one byte (`as u8`) in `JournalKey::tier`, and
/// the index of a tier's "map full" hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Tier {
    /// The per-IP map (`counters_<g>`): one remote address.
    Ip = 0,
    /// `tier1_<g>`: the remote's /24 (IPv4) or /48 (IPv6).
    Prefix = 1,
    /// `tier2_<g>`: the remote's /16 (IPv4) or /32 (IPv6).
    WidePrefix = 2,
    /// `port_overflow_<g>` and the port slots: the port, protocol and direction alone.
    Port = 3,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Ip, Tier::Prefix, Tier::WidePrefix, Tier::Port];

    pub const fn from_u8(byte: u8) -> Option<Tier> {
        Some(match byte {
            0 => Tier::Ip,
            1 => Tier::Prefix,
            2 => Tier::WidePrefix,
            3 => Tier::Port,
            _ => return None,
        })
    }

    /// As the outputs name it (`tier` in JSON, the metrics' `tier` label).
    pub const fn name(self) -> &'static str {
        match self {
            Tier::Ip => "ip",
            Tier::Prefix => "prefix",
            Tier::WidePrefix => "wide-prefix",
            Tier::Port => "port",
        }
    }

    /// The prefix length a tier keeps of an IPv4 address (0: none).
    pub const fn prefix4(self) -> u8 {
        match self {
            Tier::Ip => 32,
            Tier::Prefix => 24,
            Tier::WidePrefix => 16,
            Tier::Port => 0,
        }
    }

    /// The prefix length a tier keeps of an IPv6 address (0: none).
    pub const fn prefix6(self) -> u8 {
        match self {
            Tier::Ip => 128,
            Tier::Prefix => 48,
            Tier::WidePrefix => 32,
            Tier::Port => 0,
        }
    }
}

/// Whether a `CounterKey::remote_ip` is an IPv4-mapped address (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_ipv4_mapped(remote_ip: &[u32; 4]) -> bool {
    remote_ip[0] == 0 && remote_ip[1] == 0 && remote_ip[2] == IPV4_MAPPED_WORD
}

/// A word of address bytes in network order with only its first `bytes` bytes kept.
const fn keep_bytes(bytes: usize) -> u32 {
    let mut kept = [0u8; 4];
    let mut i = 0;
    while i < bytes {
        kept[i] = 0xff;
        i += 1;
    }
    u32::from_ne_bytes(kept)
}

/// `remote_ip` masked to the prefix `tier` keeps (`Tier::prefix4` of an IPv4-mapped address,
/// `Tier::prefix6` of an IPv6 one; every prefix length is a whole number of bytes). `Tier::Ip`
/// keeps the address, `Tier::Port` none of it.
#[inline(always)]
pub const fn mask_remote(remote_ip: [u32; 4], tier: Tier) -> [u32; 4] {
    let [a, b, c, d] = remote_ip;
    match tier {
        Tier::Ip => remote_ip,
        Tier::Port => [0; 4],
        Tier::Prefix if is_ipv4_mapped(&remote_ip) => [a, b, c, d & keep_bytes(3)],
        Tier::WidePrefix if is_ipv4_mapped(&remote_ip) => [a, b, c, d & keep_bytes(2)],
        Tier::Prefix => [a, b & keep_bytes(2), 0, 0],
        Tier::WidePrefix => [a, 0, 0, 0],
    }
}

/// Bits of a `watched_ports` entry.
pub const PROTO_TCP: u8 = 1 << 0;
pub const PROTO_UDP: u8 = 1 << 1;
pub const PROTO_ALL: u8 = PROTO_TCP | PROTO_UDP;

/// IANA protocol numbers, as stored in `CounterKey::proto`.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The `watched_ports` bit of an IANA protocol number (`PROTO_UDP` for anything but TCP: the
/// program only hands TCP and UDP on).
pub const fn proto_bit(ip_proto: u8) -> u8 {
    if ip_proto == IPPROTO_TCP {
        PROTO_TCP
    } else {
        PROTO_UDP
    }
}

/// Which way a packet crossed the interface, seen from the watched local port: `Ingress`, from a
/// remote IP to the port; `Egress`, the port's replies to it. Stored as one byte (`as u8`: 0
/// ingress, 1 egress) in `CounterKey::direction` and `AttachKey::direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The byte stored in keys: 0 is ingress, anything else egress (the program writes 0 and 1).
    pub const fn from_u8(byte: u8) -> Direction {
        if byte == Direction::Ingress as u8 {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }

    /// As the CLI, the pin names and the outputs spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The program (function) that counts this direction, in the object file.
    pub const fn program_name(self) -> &'static str {
        match self {
            Direction::Ingress => "portwatch_ingress",
            Direction::Egress => "portwatch_egress",
        }
    }

    /// Its bit in a `Directions` set (`Meta::directions`).
    pub const fn bit(self) -> u8 {
        1 << self as u8
    }

    pub const fn other(self) -> Direction {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }
}

/// A set of directions, as `Meta::directions` stores it: bit 0 ingress, bit 1 egress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Directions(u8);

impl Directions {
    pub const BOTH: Directions = Directions(Direction::Ingress.bit() | Direction::Egress.bit());

    pub const fn from_bits(bits: u8) -> Directions {
        Directions(bits & Directions::BOTH.0)
    }

    pub const fn bits(self) -> u8 {
        self.0
    }

    pub const fn contains(self, direction: Direction) -> bool {
        self.0 & direction.bit() != 0
    }

    /// Its directions, ingress first.
    pub fn iter(self) -> impl Iterator<Item = Direction> {
        Direction::ALL.into_iter().filter(move |d| self.contains(*d))
    }

    /// As `load --direction` spells it: `ingress`, `egress` or `both`.
    pub const fn name(self) -> &'static str {
        if self.0 == Direction::Ingress.bit() {
            "ingress"
        } else if self.0 == Direction::Egress.bit() {
            "egress"
        } else {
            "both"
        }
    }
}

impl From<Direction> for Directions {
    fn from(direction: Direction) -> Directions {
        Directions(direction.bit())
    }
}

/// Number of entries of `watched_ports`: one per port number.
pub const PORT_COUNT: u32 = 65536;

/// Remote-IP keys a counter map holds when `load` is not given `--max-entries`.
pub const DEFAULT_MAX_ENTRIES: u32 = 65536;

/// The most `--max-entries` may ask for: the kernel's hash maps hold at most 2^31 entries, and the
/// overflow keys come on top.
pub const MAX_ENTRIES_LIMIT: u32 = 1 << 30;

/// Entries each counter map holds beyond the user's `--max-entries`: one overflow key per direction,
/// inserted by userspace before the program can run, so a full map always has them.
pub const RESERVED_ENTRIES: u32 = 2;

/// The key of a counter: who (the remote IP), on which watched port, protocol and direction.
///
/// Bytes 0..16 `remote_ip` (IPv4 stored IPv4-mapped, `::ffff:a.b.c.d`), 16..18 `port` in host byte
/// order, 18 `proto` (6 or 17), 19 `direction` (0 ingress, 1 egress). No padding.
///
/// `remote_ip` is declared as four `u32` words so that the kernel program builds it with word
/// stores (byte arrays cost it a byte loop); the words hold the address bytes in network order, so
/// the bytes in the map are exactly the 16-byte address. Use `remote_ip_octets`/`with_octets`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CounterKey {
    pub remote_ip: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as stored in `remote_ip[2]`.
pub const IPV4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl CounterKey {
    pub fn with_octets(octets: [u8; 16], port: u16, proto: u8, direction: Direction) -> Self {
        let mut remote_ip = [0u32; 4];
        for (i, w) in remote_ip.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([octets[4 * i], octets[4 * i + 1], octets[4 * i + 2], octets[4 * i + 3]]);
        }
        CounterKey {
            remote_ip,
            port,
            proto,
            direction: direction as u8,
        }
    }

    pub const fn direction(&self) -> Direction {
        Direction::from_u8(self.direction)
    }

    /// The remote address as 16 bytes in network order (IPv4 as `::ffff:a.b.c.d`).
    pub fn remote_ip_octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, w) in self.remote_ip.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        out
    }

    /// The reserved key that collects traffic the counter map had no room for: the unspecified
    /// address `::`, port 0 and protocol 0, which no real packet can produce (port 0 cannot be
    /// watched). One per direction.
    pub const fn overflow(direction: Direction) -> Self {
        CounterKey {
            remote_ip: [0; 4],
            port: 0,
            proto: 0,
            direction: direction as u8,
        }
    }

    pub const fn is_overflow(&self) -> bool {
        self.port == 0 && self.proto == 0
    }

    /// Field by field, as the kernel program compares keys (a derived `==` may become a `memcmp`
    /// call, which BPF has not): the word most likely to differ first.
    #[inline(always)]
    pub fn same(&self, other: &CounterKey) -> bool {
        self.remote_ip[3] == other.remote_ip[3]
            && self.remote_ip[2] == other.remote_ip[2]
            && self.remote_ip[1] == other.remote_ip[1]
            && self.remote_ip[0] == other.remote_ip[0]
            && self.port == other.port
            && self.proto == other.proto
            && self.direction == other.direction
    }
}

/// A counter value (one per CPU in the per-CPU maps): L3 bytes and wire packets.
/// Bytes 0..8 `bytes`, 8..16 `packets`, both native-endian `u64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub bytes: u64,
    pub packets: u64,
}

/// Slots of each front cache, per CPU (a power of two: `front_index` keeps `FRONT_BITS` bits),
/// and after them one slot per direction for the overflow keys (`overflow_slot`).
pub const FRONT_BITS: u32 = 10;
pub const FRONT_SLOTS: u32 = 1 << FRONT_BITS;
pub const FRONT_ENTRIES: u32 = FRONT_SLOTS + 2;

/// The front-cache slot of a direction's overflow key: after the hashed ones, so a flood of new
/// keys into a full map counts in place whatever owns the hashed slots.
pub const fn overflow_slot(direction: Direction) -> u32 {
    FRONT_SLOTS + direction as u32
}

/// One slot of a front cache (`front_0`, `front_1`): a key the program has counted in the
/// generation's counter map and that owns this slot on this CPU until userspace clears it, with
/// what the program counted here for it since. A packet whose key owns its slot is added here (an
/// array lookup the verifier inlines: no call, no hash of the key) instead of in the hash map;
/// readers add every owned slot to its key's entry. A slot is claimed once, by the first key counted
/// in the hash while it is free, and never changes owner until userspace clears it (idle
/// generations only, in a reset), so nothing moves between a slot and the hash while anything reads
/// them: each key's total only grows.
///
/// Bytes 0..4 `owned` (1 once claimed), 4..24 `key`, 24..32 `bytes`, 32..40 `packets`. The program
/// writes `owned` after the key; `owned` comes first, so a reader that copies the slot forward and
/// sees it set also sees the whole key (on a CPU that keeps stores and loads in order: x86).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrontSlot {
    pub owned: u32,
    pub key: CounterKey,
    pub bytes: u64,
    pub packets: u64,
}

/// The front-cache slot of a prefix tier's key: `front_index` within the tier's half of
/// `tier_front_<g>` (tier 1's first).
#[inline(always)]
pub const fn tier_slot(tier: Tier, key: &CounterKey) -> u32 {
    let base = if matches!(tier, Tier::WidePrefix) {
        FRONT_SLOTS
    } else {
        0
    };
    base + front_index(key)
}

/// Entries of `tier_front_<g>`.
pub const TIER_FRONT_ENTRIES: u32 = 2 * FRONT_SLOTS;

/// The slot a key may own in a front cache: a multiplicative hash of its words, `FRONT_BITS` bits.
#[inline(always)]
pub const fn front_index(key: &CounterKey) -> u32 {
    let x = key.remote_ip[0]
        ^ key.remote_ip[1].rotate_left(8)
        ^ key.remote_ip[2].rotate_left(16)
        ^ key.remote_ip[3]
        ^ ((key.port as u32) << 16)
        ^ ((key.direction as u32) << 8)
        ^ key.proto as u32;
    x.wrapping_mul(0x9e37_79b1) >> (32 - FRONT_BITS)
}

/// What the program reads on every packet. Bytes 0..4 `generation` (only bit 0 is used: which
/// generation's maps are written), 4..8 `filter_mask` (the filters' bytes minus one: a power of
/// two minus one), 8..12 `seed` (random, set by `load`: the filter and distinct-source hashes
/// depend on it, so that a sender cannot choose addresses that collide), 12..16 `seed_v4`
/// (`source_seed_v4(seed)`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    pub generation: u32,
    pub filter_mask: u32,
    pub seed: u32,
    pub seed_v4: u32,
}

impl Config {
    /// The generation the program writes: 0 or 1 (see `counters_map`).
    pub const fn active_generation(&self) -> u32 {
        generation_index(self.generation) as u32
    }
}

/// The byte of a generation's filter that says whether `key` may be in the map of `tier`, before
/// the caller keeps its low bits (`Config::filter_mask`). A per-IP key's is `ip_filter_index` of
/// its `source_hash`: the hash the program computes anyway for the distinct-source registers of
/// a remote that finds the per-IP map full, so a flood's new source hashes once. A prefix's: its
/// words folded (each rotated by its place, so that no byte of the address cancels another), then
/// mixed with the tier and `seed` by murmur3's finalizer (`fmix32`), whose low bits depend on every
/// input bit. The program sets the byte before it inserts the key, and never clears it; userspace
/// zeroes a filter and sets the bytes of the keys left when it removes entries (idle generations
/// only). A byte that is set for a key the map does not have costs one hash lookup.
#[inline(always)]
pub const fn filter_index(key: &CounterKey, tier: Tier, seed: u32) -> u32 {
    if matches!(tier, Tier::Ip) {
        return ip_filter_index(key, source_hash(&key.remote_ip, seed));
    }
    let folded = key.remote_ip[0]
        ^ key.remote_ip[1].rotate_left(8)
        ^ key.remote_ip[2].rotate_left(16)
        ^ key.remote_ip[3].rotate_left(24)
        ^ ((key.port as u32) << 16 | (key.proto as u32) << 8 | key.direction as u32).rotate_left(4);
    fmix32(folded ^ seed ^ (tier as u32).wrapping_mul(0x9e37_79b9))
}

/// A per-IP key's `filter_index`, given `source_hash(&key.remote_ip, seed)`: the hash, xored with
/// the key's port, protocol and direction (one word, times an odd constant, its high half then
/// folded onto its low one: a bijection, whose low bits depend on the protocol and direction too),
/// so that one remote's keys of other ports and directions take other bytes. `source_hash` is
/// keyed and mixes every bit of the address into the low bits the filter keeps.
#[inline(always)]
pub const fn ip_filter_index(key: &CounterKey, source_hash: u32) -> u32 {
    let word = (key.port as u32 | (key.proto as u32) << 16 | (key.direction as u32) << 24).wrapping_mul(0x9e37_79b1);
    source_hash ^ word ^ (word >> 16)
}

/// The element of `map_full` that holds the hint of `tier`'s map in `generation`.
#[inline(always)]
pub const fn full_hint_index(generation: u32, tier: Tier) -> u32 {
    (generation & 1) * 4 + tier as u32
}

/// Entries of `map_full`: two generations of four tiers (the per-port overflow has no hint).
pub const FULL_HINTS: u32 = 8;

/// Entries of the per-port overflow (`port_overflow_<g>`): every port, protocol and direction
/// (not preallocated: it takes memory for the ports that overflowed only).
pub const PORT_OVERFLOW_ENTRIES: u32 = PORT_COUNT * 4;

/// Port slots per CPU (`port_slots_<g>`), a power of two. A port, protocol and direction takes
/// the first free of its two slots (`port_slot_index`) the first time its traffic passes the
/// per-IP map on a CPU, and keeps it until a reset clears it.
pub const PORT_SLOT_BITS: u32 = 6;
pub const PORT_SLOTS: u32 = 1 << PORT_SLOT_BITS;

/// One of the two port slots a port, protocol and direction may take (`choice` 0 or 1).
#[inline(always)]
pub const fn port_slot_index(key: &PortKey, choice: u32) -> u32 {
    let x = (key.port as u32) << 16 | (key.proto as u32) << 8 | key.direction as u32;
    let multiplier = if choice == 0 { 0x9e37_79b1 } else { 0x85eb_ca6b };
    x.wrapping_mul(multiplier) >> (32 - PORT_SLOT_BITS)
}

/// A port slot (`port_slots_<g>`, per CPU): owned by a port, protocol and direction on this CPU,
/// with what the per-port overflow counted here for it, and the distinct-source registers of
/// every remote counted past the per-IP map for it on this CPU (`hll_register`; readers merge the
/// CPUs' registers by maximum).
///
/// Bytes 0..4 `owned` (1 once claimed), 4..8 `key` (a `PortKey`), 8..16 `bytes`, 16..24
/// `packets`, 24..24+HLL_REGISTERS `registers`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSlot {
    pub owned: u32,
    pub key: PortKey,
    pub bytes: u64,
    pub packets: u64,
    pub registers: [u8; HLL_REGISTERS],
}

impl Default for PortSlot {
    fn default() -> PortSlot {
        PortSlot {
            owned: 0,
            key: PortKey::new(0, 0, Direction::Ingress),
            bytes: 0,
            packets: 0,
            registers: [0; HLL_REGISTERS],
        }
    }
}

/// Why the program saw a packet but counted it under no port: each reason has its `Stats` field.
/// (A TCP or UDP packet of a port that is not watched is `Stats::unwatched_packets`, not one of
/// these: it was understood, just not asked for.) When several reasons apply, the first check
/// that fails in the order of bpffs-layout.md ("What is parsed") decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotCounted {
    /// Neither IPv4 nor IPv6 (ARP, LLDP...), after VLAN tags.
    NonIp,
    /// IP, but the L4 protocol is not TCP or UDP (ICMP, ESP, no next header...).
    UnknownL4,
    /// A non-first fragment: no L4 header, so no port.
    Fragment,
    /// A header cut short by the end of the frame or of the IP datagram (the length its IP header
    /// gives: bytes after it, such as Ethernet padding, are not headers), or an IP datagram longer
    /// than the frame.
    Truncated,
    /// A header with impossible fields, including an IP length of 0 outside a GSO packet (IPv6:
    /// without a valid Jumbo Payload option).
    Malformed,
    /// More IPv6 extension headers (or VLAN tags, or hop-by-hop options before a Jumbo Payload
    /// option) than the program walks.
    HeaderLimit,
}

impl NotCounted {
    pub const ALL: [NotCounted; 6] = [
        NotCounted::NonIp,
        NotCounted::UnknownL4,
        NotCounted::Fragment,
        NotCounted::Truncated,
        NotCounted::Malformed,
        NotCounted::HeaderLimit,
    ];

    /// Its name in `status --json` (`stats.not_counted.<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            NotCounted::NonIp => "non_ip",
            NotCounted::UnknownL4 => "unknown_l4",
            NotCounted::Fragment => "fragment",
            NotCounted::Truncated => "truncated",
            NotCounted::Malformed => "malformed",
            NotCounted::HeaderLimit => "header_limit",
        }
    }

    /// As `status` says it to a person.
    pub const fn description(self) -> &'static str {
        match self {
            NotCounted::NonIp => "non-IP",
            NotCounted::UnknownL4 => "other protocol",
            NotCounted::Fragment => "non-first fragment",
            NotCounted::Truncated => "truncated",
            NotCounted::Malformed => "malformed",
            NotCounted::HeaderLimit => "too many headers",
        }
    }
}

/// Global statistics, one copy per CPU. Every field is a native-endian `u64`, in this order.
/// `matched_*` is all traffic of watched ports (counted in the counter maps, overflow included, but
/// for `overflow_missing_packets`, which never happens in normal operation); every other packet the
/// program saw is in exactly one of `unwatched` or a `NotCounted` reason's field (`non_ip`,
/// `unknown_l4`, `fragment`, `truncated`, `malformed`, `header_limit`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Wire packets of a watched port and protocol.
    pub matched_packets: u64,
    /// Their L3 bytes.
    pub matched_bytes: u64,
    /// TCP/UDP packets whose port/protocol is not watched.
    pub unwatched_packets: u64,
    /// Neither IPv4 nor IPv6 (ARP, LLDP...), after VLAN tags.
    pub non_ip_packets: u64,
    /// IP packets whose L4 protocol is not TCP or UDP (ICMP, ESP, no next header...).
    pub unknown_l4_packets: u64,
    /// Non-first fragments: they carry no L4 header, so no port.
    pub fragment_packets: u64,
    /// A header cut short by the end of the frame or of the IP datagram (VLAN, IP, extension
    /// header, TCP as long as its data offset, UDP), or an IP datagram longer than the frame.
    pub truncated_packets: u64,
    /// A header with impossible fields: IP version mismatch, IHL < 5, total length below the header,
    /// an IP length of 0 outside a GSO packet (IPv6: without a Jumbo Payload option), TCP data
    /// offset < 5.
    pub malformed_packets: u64,
    /// More IPv6 extension headers (or VLAN tags, or hop-by-hop options before a Jumbo Payload
    /// option) than the program walks.
    pub header_limit_packets: u64,
    /// Matched packets that found the per-IP map full: counted past it, in a prefix tier, the
    /// per-port overflow or (no tier with room) the overflow key; all of them but
    /// `overflow_missing_packets`.
    pub map_full_packets: u64,
    /// Their L3 bytes.
    pub map_full_bytes: u64,
    /// Matched packets that found no tier with room and no overflow key (never in normal
    /// operation). Their bytes are in `matched_bytes` only.
    pub overflow_missing_packets: u64,
}

impl Stats {
    /// The packets not counted for `reason`.
    pub const fn not_counted(&self, reason: NotCounted) -> u64 {
        match reason {
            NotCounted::NonIp => self.non_ip_packets,
            NotCounted::UnknownL4 => self.unknown_l4_packets,
            NotCounted::Fragment => self.fragment_packets,
            NotCounted::Truncated => self.truncated_packets,
            NotCounted::Malformed => self.malformed_packets,
            NotCounted::HeaderLimit => self.header_limit_packets,
        }
    }

    /// The field that counts packets not counted for `reason`.
    #[inline(always)]
    pub fn not_counted_mut(&mut self, reason: NotCounted) -> &mut u64 {
        match reason {
            NotCounted::NonIp => &mut self.non_ip_packets,
            NotCounted::UnknownL4 => &mut self.unknown_l4_packets,
            NotCounted::Fragment => &mut self.fragment_packets,
            NotCounted::Truncated => &mut self.truncated_packets,
            NotCounted::Malformed => &mut self.malformed_packets,
            NotCounted::HeaderLimit => &mut self.header_limit_packets,
        }
    }

    /// Every field, in declaration order.
    fn fields_mut(&mut self) -> &mut [u64; STATS_FIELDS] {
        // SAFETY: `Stats` is #[repr(C)] and made of STATS_FIELDS u64s only (asserted below), so it
        // has the layout of an array of them.
        unsafe { &mut *(self as *mut Stats).cast::<[u64; STATS_FIELDS]>() }
    }
}

const STATS_FIELDS: usize = 12;

/// Pinned metadata, written once by `load`. Bytes 0..4 `layout_version`, 4..8 `max_entries` (the
/// user's figure, without `RESERVED_ENTRIES`), 8 `directions` (a `Directions`: bit 0 ingress, bit 1
/// egress), 9..12 reserved (zero), 12..16 `prefix_entries` and 16..20 `wide_prefix_entries` (the
/// prefix tiers' sizes), 20..24 reserved (zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    pub layout_version: u32,
    pub max_entries: u32,
    pub directions: u8,
    pub _reserved: [u8; 3],
    pub prefix_entries: u32,
    pub wide_prefix_entries: u32,
    pub _reserved2: u32,
}

impl Meta {
    /// The directions `load` was given.
    pub const fn directions(&self) -> Directions {
        Directions::from_bits(self.directions)
    }

    /// The sizes of the tiers `load` was given.
    pub const fn sizes(&self) -> TierSizes {
        TierSizes {
            ip: self.max_entries,
            prefix: self.prefix_entries,
            wide_prefix: self.wide_prefix_entries,
        }
    }
}

/// How many keys each tier of a counter generation holds (the per-IP map's overflow keys come on
/// top of `ip`; the per-port overflow holds every port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierSizes {
    pub ip: u32,
    pub prefix: u32,
    pub wide_prefix: u32,
}

impl TierSizes {
    /// The prefix tiers' sizes when `load` is given only `--max-entries`: a quarter and a
    /// sixteenth of it, at least 1,024 and 256.
    pub const fn derived(ip: u32) -> TierSizes {
        let prefix = ip / 4;
        let wide_prefix = ip / 16;
        TierSizes {
            ip,
            prefix: if prefix < 1024 { 1024 } else { prefix },
            wide_prefix: if wide_prefix < 256 { 256 } else { wide_prefix },
        }
    }

    /// The bytes of each filter (`filter_<g>`): 16 per key the per-IP map and the prefix tiers can
    /// hold, rounded up to a power of two (a filter a sixteenth full sends one new key in sixteen to
    /// a hash lookup), at most 2^30.
    pub const fn filter_bytes(&self) -> u32 {
        let keys = self.ip as u64 + RESERVED_ENTRIES as u64 + self.prefix as u64 + self.wide_prefix as u64;
        let bytes = (keys * 16).next_power_of_two();
        if bytes > 1 << 30 {
            1 << 30
        } else {
            bytes as u32
        }
    }

    /// The entries of each filter: `u64` elements of eight filter bytes (an array map stores every
    /// element in 8 bytes, whatever its value's size).
    pub const fn filter_words(&self) -> u32 {
        self.filter_bytes() / 8
    }
}

/// Entries of the `attachments` map: interfaces times two directions.
pub const MAX_ATTACHMENTS: u32 = 1024;

/// Entries of the `drained` map: every port, protocol and direction.
pub const DRAINED_ENTRIES: u32 = PORT_COUNT * 4;

/// Key of the `drained` map: a watched port, protocol and direction. Bytes 0..2 `port` (host
/// order), 2 `proto` (6 or 17), 3 `direction` (`Direction as u8`), as in `CounterKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PortKey {
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
}

impl PortKey {
    pub const fn new(port: u16, proto: u8, direction: Direction) -> PortKey {
        PortKey {
            port,
            proto,
            direction: direction as u8,
        }
    }

    /// The port, protocol and direction of a counter key.
    pub const fn of(key: &CounterKey) -> PortKey {
        PortKey {
            port: key.port,
            proto: key.proto,
            direction: key.direction,
        }
    }

    pub const fn direction(&self) -> Direction {
        Direction::from_u8(self.direction)
    }
}

/// Key of an attachment. Bytes 0..8 `netns`: the inode of the network namespace the interface is
/// in (interfaces of two namespaces can share an index and a name), 8..12 `ifindex`, 12
/// `direction` (`Direction as u8`), 13..16 reserved (zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AttachKey {
    pub netns: u64,
    pub ifindex: u32,
    pub direction: u8,
    pub _reserved: [u8; 3],
}

impl AttachKey {
    pub const fn new(netns: u64, ifindex: u32, direction: Direction) -> AttachKey {
        AttachKey {
            netns,
            ifindex,
            direction: direction as u8,
            _reserved: [0; 3],
        }
    }

    pub const fn direction(&self) -> Direction {
        Direction::from_u8(self.direction)
    }
}

/// `Attachment::mode`: how an attachment was made, a pinned TCX link or a classic clsact/cls_bpf
/// filter. Read and written only through `Attachment::mode` and `set_mode` (`AttachMode`).
pub const ATTACH_MODE_TCX: u8 = 1;
pub const ATTACH_MODE_TC: u8 = 2;

/// `Attachment::flags`: portwatch added the interface's clsact qdisc (mode tc), so the last
/// detach removes it again when no filter is left on it.
pub const ATTACH_FLAG_OWN_QDISC: u8 = 1 << 0;
/// `Attachment::flags`: recorded before the attachment is made (`mode` 0 until it is); a command
/// that finds it (after a crash) looks at the kernel and completes the record or removes it.
pub const ATTACH_FLAG_PENDING: u8 = 1 << 1;
/// `Attachment::flags`, with `ATTACH_FLAG_PENDING`: the interface had no clsact qdisc when the
/// attachment was recorded, so one found empty afterwards is portwatch's to remove.
pub const ATTACH_FLAG_QDISC_ABSENT: u8 = 1 << 2;

/// Bytes of `Attachment::netns`.
pub const ATTACH_NETNS_LEN: usize = 64;

/// An attachment. Bytes 0 `mode` (`ATTACH_MODE_*`), 1 `flags` (`ATTACH_FLAG_*`), 2..4 `priority`
/// and 4..8 `handle` of a tc filter (0 for TCX), 8..24 `ifname`: the interface's name when
/// attached, NUL-padded; 24..88 `netns`: the network namespace as it was given (an `ip netns` name
/// or a path such as `/proc/PID/ns/net`), NUL-padded, empty for the namespace the command ran in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub mode: u8,
    pub flags: u8,
    pub priority: u16,
    pub handle: u32,
    pub ifname: [u8; 16],
    pub netns: [u8; ATTACH_NETNS_LEN],
}

impl Default for Attachment {
    fn default() -> Attachment {
        Attachment {
            mode: 0,
            flags: 0,
            priority: 0,
            handle: 0,
            ifname: [0; 16],
            netns: [0; ATTACH_NETNS_LEN],
        }
    }
}

/// How an attachment was made, decoded once from its record (`Attachment::mode`): the only reading
/// of the `mode` byte and the `pending` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link, pinned under `links/`.
    Tcx,
    /// A classic clsact qdisc with a cls_bpf filter (its priority and handle recorded).
    Tc,
    /// Not made yet: recorded with `ATTACH_FLAG_PENDING` (an `attach` interrupted), or a `mode`
    /// byte that is neither of the two above.
    Pending,
}

impl AttachMode {
    /// As `status` and the metrics name it.
    pub const fn name(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Tc => "tc",
            AttachMode::Pending => "pending",
        }
    }
}

impl Attachment {
    pub const fn mode(&self) -> AttachMode {
        if self.flags & ATTACH_FLAG_PENDING != 0 {
            return AttachMode::Pending;
        }
        match self.mode {
            ATTACH_MODE_TCX => AttachMode::Tcx,
            ATTACH_MODE_TC => AttachMode::Tc,
            _ => AttachMode::Pending,
        }
    }

    /// Records how the attachment was made (`Tcx`, `Tc`: no longer pending), or that it is not yet
    /// (`Pending`: `mode` 0 and the `pending` flag).
    pub fn set_mode(&mut self, mode: AttachMode) {
        self.mode = match mode {
            AttachMode::Tcx => ATTACH_MODE_TCX,
            AttachMode::Tc => ATTACH_MODE_TC,
            AttachMode::Pending => 0,
        };
        if mode == AttachMode::Pending {
            self.flags |= ATTACH_FLAG_PENDING;
        } else {
            self.flags &= !ATTACH_FLAG_PENDING;
        }
    }
}

/// Where a reset is (`Journal::state`). Each state says what a command that finds it after a crash
/// does (`bpffs-layout.md`, "Reset"): the forward path and recovery share these steps.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalState {
    /// No reset in progress.
    Idle = 0,
    /// The idle generation's selected entries are in the journal (`Stale`); the generation may have
    /// been flipped. Recovery: flip back, wait; nothing was written or removed.
    Prepared = 1,
    /// The record is being written. Recovery: cut the output file back to `output_len`, flip
    /// back, wait (the counts never left the maps).
    Writing = 2,
    /// The record (`record_len` bytes, `record_hash`) is written, maybe not yet synced. Recovery: if
    /// the file holds the whole record at `output_len`, as `Committed`; else as `Writing`.
    Written = 3,
    /// The record is durable. Recovery (roll forward): set the drained totals (`Drained`), remove
    /// the selected entries of the old active generation, then as `Deleted`.
    Committed = 4,
    /// Those entries are gone. Recovery: flip back, wait, compute what stays of the idle
    /// generation's `Stale` entries (`Subtract`), then as `Subtracting`.
    Deleted = 5,
    /// Recovery: write every `Subtract` entry into the idle generation (idempotent), then `Idle`.
    Subtracting = 6,
}

impl JournalState {
    pub const fn from_u32(state: u32) -> Option<JournalState> {
        Some(match state {
            0 => JournalState::Idle,
            1 => JournalState::Prepared,
            2 => JournalState::Writing,
            3 => JournalState::Written,
            4 => JournalState::Committed,
            5 => JournalState::Deleted,
            6 => JournalState::Subtracting,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            JournalState::Idle => "idle",
            JournalState::Prepared => "prepared",
            JournalState::Writing => "writing",
            JournalState::Written => "written",
            JournalState::Committed => "committed",
            JournalState::Deleted => "deleted",
            JournalState::Subtracting => "subtracting",
        }
    }
}

/// `Journal::output_kind`.
pub const JOURNAL_OUTPUT_STREAM: u32 = 0;
pub const JOURNAL_OUTPUT_FILE: u32 = 1;
/// Room for the output file's path and for the reset's filter, NUL-padded.
pub const JOURNAL_PATH_LEN: usize = 4096;
pub const JOURNAL_FILTER_LEN: usize = 1024;

/// The value of the `journal` map (5192 bytes): the reset in progress. Bytes 0..4 `state` (a
/// `JournalState`), 4..8 `generation` (the active one when the reset began), 8..16 `id`, 16..24
/// `time` (Unix seconds), 24..32 `output_len` (the output file's length before the record),
/// 32..40 `record_len`, 40..48 `record_hash` (FNV-1a 64 of the record's bytes), 48..56
/// `output_dev`, 56..64 `output_ino`, 64..68 `output_kind` (`JOURNAL_OUTPUT_*`), 68..72 reserved,
/// 72..1096 `filter` (the reset's `--port`/`--ip` as text), 1096..5192 `path` (the output file).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Journal {
    pub state: u32,
    pub generation: u32,
    pub id: u64,
    pub time: u64,
    pub output_len: u64,
    pub record_len: u64,
    pub record_hash: u64,
    pub output_dev: u64,
    pub output_ino: u64,
    pub output_kind: u32,
    pub _reserved: u32,
    pub filter: [u8; JOURNAL_FILTER_LEN],
    pub path: [u8; JOURNAL_PATH_LEN],
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            state: 0,
            generation: 0,
            id: 0,
            time: 0,
            output_len: 0,
            record_len: 0,
            record_hash: 0,
            output_dev: 0,
            output_ino: 0,
            output_kind: 0,
            _reserved: 0,
            filter: [0; JOURNAL_FILTER_LEN],
            path: [0; JOURNAL_PATH_LEN],
        }
    }
}

/// What a `journal_entries` entry holds (`JournalKey::kind`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum JournalKind {
    /// A selected entry of the generation that was idle when the reset began (summed over CPUs):
    /// it goes into the record, and stays in that map (which becomes the active one) until it is
    /// subtracted after the flip back.
    Stale = 1,
    /// The `drained` total of a port (its `PortKey` in `key.port`, `proto`, `direction`) once the
    /// record is committed.
    Drained = 2,
    /// What a `Stale` key's entry holds once that entry's share is subtracted.
    Subtract = 3,
}

/// Key of the `journal_entries` map (24 bytes): 0..20 a `CounterKey`, 20 `kind` (a
/// `JournalKind`), 21 `tier` (a `Tier`: which map of the generation the key is of; for a
/// per-port key its `PortKey` is in the `CounterKey`'s `port`, `proto` and `direction`, address
/// zero), 22..24 reserved.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct JournalKey {
    pub key: CounterKey,
    pub kind: u8,
    pub tier: u8,
    pub _reserved: [u8; 2],
}

impl JournalKey {
    pub const fn new(kind: JournalKind, tier: Tier, key: CounterKey) -> JournalKey {
        JournalKey {
            key,
            kind: kind as u8,
            tier: tier as u8,
            _reserved: [0; 2],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Journal {}
    unsafe impl aya::Pod for super::JournalKey {}
    // SAFETY: all of these are #[repr(C)], made of integers only, with no implicit padding.
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Stats {}
    unsafe impl aya::Pod for super::Meta {}
    unsafe impl aya::Pod for super::AttachKey {}
    unsafe impl aya::Pod for super::Attachment {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::FrontSlot {}
    unsafe impl aya::Pod for super::PortSlot {}
}

// Layouts are a contract with pinned state and with other tools: fail the build if one moves.
const _: () = {
    assert!(core::mem::size_of::<CounterKey>() == 20);
    assert!(core::mem::align_of::<CounterKey>() == 4);
    assert!(core::mem::size_of::<Counters>() == 16);
    assert!(core::mem::size_of::<Config>() == 16);
    assert!(core::mem::size_of::<Stats>() == STATS_FIELDS * 8);
    assert!(core::mem::size_of::<Meta>() == 24);
    assert!(core::mem::size_of::<AttachKey>() == 16);
    assert!(core::mem::size_of::<Attachment>() == 88);
    assert!(core::mem::size_of::<PortKey>() == 4);
    assert!(core::mem::size_of::<FrontSlot>() == 40);
    assert!(core::mem::size_of::<PortSlot>() == 24 + HLL_REGISTERS);
    assert!((24 + HLL_REGISTERS) & 7 == 0);
    assert!(core::mem::size_of::<Journal>() == 5192);
    assert!(core::mem::size_of::<JournalKey>() == 24);
};

impl core::ops::AddAssign for Counters {
    fn add_assign(&mut self, other: Self) {
        self.bytes += other.bytes;
        self.packets += other.packets;
    }
}

impl core::ops::Add for Counters {
    type Output = Counters;
    fn add(mut self, other: Self) -> Counters {
        self += other;
        self
    }
}

impl core::ops::AddAssign for Stats {
    fn add_assign(&mut self, mut other: Self) {
        for (mine, theirs) in self.fields_mut().iter_mut().zip(other.fields_mut().iter()) {
            *mine += *theirs;
        }
    }
}

// Distinct sources: the hash of a remote address and its place in a HyperLogLog sketch. The kernel
// program and userspace must compute exactly the same thing, so both are defined here only.

/// Bits of a hash that pick a HyperLogLog register: a sketch has `HLL_REGISTERS` one-byte
/// registers, and its standard error is 1.04/sqrt(HLL_REGISTERS) = 1.04/64, about 1.6%.
pub const HLL_BITS: u32 = 12;
/// Registers of a sketch (4096), indexed by the top `HLL_BITS` bits of a `source_hash`.
pub const HLL_REGISTERS: usize = 1 << HLL_BITS;

/// Murmur3's 32-bit finalizer: a bijection of `u32` in which each input bit flips each output bit
/// with probability close to 1/2.
#[inline(always)]
const fn fmix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^= x >> 16;
    x
}

/// The 32-bit hash of a remote address that the distinct-source sketches count (`hll_register`),
/// keyed with `seed`, a random value chosen at each load: without it, nobody can pick addresses
/// that share a register, and the hash of an address means nothing outside that load.
///
/// `remote_ip` is as `CounterKey::remote_ip` holds it: word `i` is bytes `4i..4i+4` of the 16-byte
/// address in network order (IPv4 as `::ffff:a.b.c.d`), read as a native-endian `u32`
/// (little-endian on bpfel, x86_64 and aarch64: the kernel program and userspace of one machine
/// read the same words). All arithmetic wraps modulo 2^32:
///
/// ```text
/// fmix32(x) = x ^= x >> 16; x *= 0x85ebca6b; x ^= x >> 13; x *= 0xc2b2ae35; x ^= x >> 16
/// h = seed
/// h = fmix32(h ^ remote_ip[0]); h = fmix32(h ^ remote_ip[1])
/// h = fmix32(h ^ remote_ip[2]); h = fmix32(h ^ remote_ip[3])
/// source_hash = h
/// ```
///
/// Each word goes through a whole murmur3 finalizer before the next one is mixed in. Murmur3's own
/// block function turns a chosen difference of one word into a difference of the state's bit 31
/// alone, whatever the seed, and the next word cancels it: pairs of words collide for every seed
/// (Aumasson and Bernstein, "Hash-flooding DoS reloaded", 2012), and a flood from chosen IPv6
/// sources could hide three in four of them. Through `fmix32`, the likeliest output difference of
/// any one- or two-bit input difference occurs with probability about 2^-6 (measured: 0x80008000
/// in), so such a pair collides in one load in 64. `fmix32` is a bijection: two addresses that
/// differ in one word only (any two IPv4 addresses, two IPv6 addresses of one /96) never collide.
/// Cost: 8 multiplications, 12 shifts, 16 xors, no branch.
#[inline(always)]
pub const fn source_hash(remote_ip: &[u32; 4], seed: u32) -> u32 {
    let mut h = seed;
    h = fmix32(h ^ remote_ip[0]);
    h = fmix32(h ^ remote_ip[1]);
    h = fmix32(h ^ remote_ip[2]);
    fmix32(h ^ remote_ip[3])
}

/// `source_hash`'s state after the three words every IPv4-mapped address shares (`::ffff:`): what
/// `load` stores in `Config::seed_v4`, so that the program hashes an IPv4 remote in one round.
pub const fn source_seed_v4(seed: u32) -> u32 {
    // Words 0 and 1 are zero: `h ^ 0` is `h`.
    fmix32(fmix32(fmix32(seed)) ^ IPV4_MAPPED_WORD)
}

/// `source_hash(remote_ip, seed)`, in one round for an IPv4-mapped address (`seed_v4` is
/// `source_seed_v4(seed)`).
#[inline(always)]
pub const fn source_hash_fast(remote_ip: &[u32; 4], seed: u32, seed_v4: u32) -> u32 {
    if is_ipv4_mapped(remote_ip) {
        fmix32(seed_v4 ^ remote_ip[3])
    } else {
        source_hash(remote_ip, seed)
    }
}

/// Where `hash` (a `source_hash`) goes in a sketch: `(index, rank)`.
///
/// `index` is bits 31..20 of `hash` (`hash >> (32 - HLL_BITS)`), so always below `HLL_REGISTERS`.
/// `rank` is 1 + the number of trailing zero bits of bits 19..0 (`hash & 0xf_ffff`): 1 when bit 0
/// is set, 20 when bit 19 is the lowest set bit, 21 when all 20 bits are zero. A register holds the
/// largest rank stored into it, 0 while none was: `if registers[index] < rank { registers[index] =
/// rank }`.
///
/// A fixed binary search (16, 8, 4, 2, 1 bits), no loop and no `trailing_zeros`: BPF has no
/// count-trailing-zeros instruction, and what LLVM emits for one is not always accepted.
#[inline(always)]
pub const fn hll_register(hash: u32) -> (u32, u8) {
    const RANK_BITS: u32 = 32 - HLL_BITS;
    let index = hash >> RANK_BITS;
    // A stop bit above the rank's bits: never zero, and at most RANK_BITS trailing zeros.
    let mut rest = (hash & ((1 << RANK_BITS) - 1)) | (1 << RANK_BITS);
    let mut rank = 1;
    if rest & 0xffff == 0 {
        rest >>= 16;
        rank += 16;
    }
    if rest & 0xff == 0 {
        rest >>= 8;
        rank += 8;
    }
    if rest & 0xf == 0 {
        rest >>= 4;
        rank += 4;
    }
    if rest & 0x3 == 0 {
        rest >>= 2;
        rank += 2;
    }
    if rest & 0x1 == 0 {
        rank += 1;
    }
    (index, rank)
}

// The rank's bits and their stop bit fit in a u32, a rank in a u8, an index in the registers.
const _: () = assert!(HLL_BITS >= 1 && HLL_BITS <= 16 && HLL_REGISTERS == 1 << HLL_BITS);
