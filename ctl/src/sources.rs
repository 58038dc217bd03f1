//! How many distinct remote addresses were counted past the per-IP map: the HyperLogLog sketch the
//! kernel program keeps per watched port, protocol and direction, one copy per CPU in each counter
//! generation. A reader merges the copies (register-wise max, so the order does not matter and an
//! address seen on several CPUs or in both generations counts once) and estimates. Where an address
//! goes in the registers is `portwatch_common::{source_hash, hll_register}`, the kernel's own code.

use portwatch_common::{hll_register, HLL_BITS, HLL_REGISTERS};

/// The relative standard error of `Sketch::estimate`: 1.04/sqrt(`HLL_REGISTERS`) = 1.04/64 =
/// 0.01625, about 1.6%. The feature's "within 5%" is about three standard errors.
pub const STANDARD_ERROR: f64 = 1.04 / (1u32 << (HLL_BITS / 2)) as f64;

// STANDARD_ERROR's square root of HLL_REGISTERS is exact only for an even HLL_BITS.
const _: () = assert!(HLL_BITS.is_multiple_of(2));

/// 2^32: how many values a `source_hash` has.
const HASH_VALUES: f64 = 4_294_967_296.0;

/// The registers of one sketch: `HLL_REGISTERS` bytes, each the largest `hll_register` rank stored
/// into it (0 for none), in the kernel's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sketch {
    registers: Box<[u8; HLL_REGISTERS]>,
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::new()
    }
}

impl Sketch {
    /// A sketch that has seen nothing.
    pub fn new() -> Self {
        Sketch {
            registers: Box::new([0; HLL_REGISTERS]),
        }
    }

    /// Adds another sketch's registers (a CPU's copy, the other generation's): afterwards this
    /// sketch is that of the union of what both saw.
    ///
    /// # Panics
    /// If `registers` is not `HLL_REGISTERS` bytes long: a map value of another layout.
    pub fn merge(&mut self, registers: &[u8]) {
        assert_eq!(registers.len(), HLL_REGISTERS, "a sketch has {HLL_REGISTERS} registers");
        for (mine, theirs) in self.registers.iter_mut().zip(registers) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// Counts one `source_hash`, as the kernel program does.
    pub fn add(&mut self, hash: u32) {
        let (index, rank) = hll_register(hash);
        let register = &mut self.registers[index as usize];
        if *register < rank {
            *register = rank;
        }
    }

    /// True while no address was counted.
    pub fn is_empty(&self) -> bool {
        self.registers.iter().all(|&r| r == 0)
    }

    /// How many distinct addresses were counted, within `STANDARD_ERROR` (relative) for one
    /// standard deviation. HyperLogLog (Flajolet et al., 2007) with its corrections: linear
    /// counting while the raw estimate is at most 2.5 times the registers and a register is still
    /// zero (exact for a single address, within a few for a hundred), and the large-range
    /// correction for hash collisions among 2^32 values past 2^32/30.
    pub fn estimate(&self) -> u64 {
        let m = HLL_REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let mut sum = 0.0;
        let mut zeros = 0u32;
        for &rank in self.registers.iter() {
            sum += (-f64::from(rank)).exp2();
            zeros += u32::from(rank == 0);
        }
        let raw = alpha * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            m * (m / f64::from(zeros)).ln()
        } else if raw > HASH_VALUES / 30.0 {
            // A raw estimate of 2^32 or more (every register at rank 21 gives 6.2e9) has no
            // finite correction: leave one hash value free, which caps the estimate at 2^32 ln 2^32
            // (9.5e10).
            let free = (1.0 - raw / HASH_VALUES).max(1.0 / HASH_VALUES);
            -HASH_VALUES * free.ln()
        } else {
            raw
        };
        estimate.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use portwatch_common::{source_hash, CounterKey, Direction};

    use super::*;

    /// The program hashes an IPv4 remote in one round from `Config::seed_v4`: the same hash.
    #[test]
    fn the_fast_hash_is_the_hash() {
        use portwatch_common::{source_hash, source_hash_fast, source_seed_v4, CounterKey, Direction};
        for seed in [0, 1, 0x9e37_79b9, u32::MAX] {
            for octets in [
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 7, 7],
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0],
                [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 198, 18, 7, 7],
            ] {
                let remote = CounterKey::with_octets(octets, 1, 6, Direction::Ingress).remote_ip;
                assert_eq!(
                    source_hash_fast(&remote, seed, source_seed_v4(seed)),
                    source_hash(&remote, seed)
                );
            }
        }
    }

    /// Seeds chosen before any test ran, not after: simple, bit-dense and random-looking ones.
    const SEEDS: [u32; 6] = [0, 1, 0x9e37_79b9, 0xdead_beef, 0x5bd1_e995, u32::MAX];

    /// The feature's promise: an estimate within 5% of the true count.
    const PROMISE: f64 = 0.05;

    /// The words of a counter key's `remote_ip`, as the kernel program stores (and hashes) them.
    fn words(octets: [u8; 16]) -> [u32; 4] {
        CounterKey::with_octets(octets, 9000, 17, Direction::Ingress).remote_ip
    }

    /// The `i`th address of 100.64.0.0/10, IPv4-mapped: consecutive addresses differ in the last
    /// bytes only.
    fn ipv4(i: u32) -> [u32; 4] {
        assert!(i < 1 << 22);
        words(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i)
                .to_ipv6_mapped()
                .octets(),
        )
    }

    /// The `i`th address of 2001:db8:1000::/36.
    fn ipv6(i: u32) -> [u32; 4] {
        let base = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0x1000, 0, 0, 0, 0, 0));
        words(Ipv6Addr::from(base + u128::from(i)).octets())
    }

    type Family = (&'static str, fn(u32) -> [u32; 4]);
    const FAMILIES: [Family; 2] = [("100.64.0.0/10", ipv4), ("2001:db8:1000::/36", ipv6)];

    fn relative_error(estimate: u64, truth: usize) -> f64 {
        (estimate as f64 - truth as f64).abs() / truth as f64
    }

    #[test]
    fn estimates_are_within_five_percent_of_the_distinct_count() {
        const COUNTS: [usize; 6] = [1, 100, 1_000, 50_000, 100_000, 1_000_000];
        // Per count: the largest relative error, and of which family and seed.
        let mut worst = [(0f64, "", 0u32); COUNTS.len()];
        for (family, address) in FAMILIES {
            for seed in SEEDS {
                // The sketch after the first n addresses is the sketch of those n: one walk checks
                // every count.
                let mut sketch = Sketch::new();
                let mut added = 0;
                for (worst, n) in worst.iter_mut().zip(COUNTS) {
                    while added < n {
                        sketch.add(source_hash(&address(added as u32), seed));
                        added += 1;
                    }
                    let estimate = sketch.estimate();
                    let error = relative_error(estimate, n);
                    assert!(
                        error <= PROMISE,
                        "{family}, seed {seed:#x}: {n} distinct addresses estimated as {estimate}"
                    );
                    if n == 1 {
                        assert_eq!(estimate, 1, "one address is counted exactly");
                    }
                    if error >= worst.0 {
                        *worst = (error, family, seed);
                    }
                }
            }
        }
        // Seen with --nocapture.
        for (n, (error, family, seed)) in COUNTS.iter().zip(worst) {
            println!(
                "{n:>9} addresses: largest error {:.2}% ({family}, seed {seed:#x})",
                100.0 * error
            );
        }
    }

    #[test]
    #[cfg(target_endian = "little")] // the documented words are read little-endian there
    fn source_hash_is_the_documented_function() {
        // Computed from ctl-common's description of `source_hash` by another program (Python).
        let cases: [(&str, u32, u32); 6] = [
            ("::", 0, 0),
            ("100.64.0.0", 0, 0x138c_9c00),
            ("100.64.0.0", 0x5bd1_e995, 0x51a9_0d90),
            ("198.18.0.1", 0x5bd1_e995, 0x5696_d15e),
            ("2001:db8:1000::1", 0x5bd1_e995, 0x37b8_7c0a),
            ("2001:db8:1000::1", 0xdead_beef, 0x8101_6ff6),
        ];
        for (address, seed, hash) in cases {
            let octets = crate::cidr::ip(address);
            assert_eq!(source_hash(&words(octets), seed), hash, "{address}, seed {seed:#x}");
        }
        // 0x51a90d90: register 0x51a = 1306; 0x90d90 has 4 trailing zeros.
        assert_eq!(hll_register(0x51a9_0d90), (1306, 5));
    }

    #[test]
    fn duplicates_do_not_change_the_estimate() {
        const N: u32 = 100_000;
        for (family, address) in FAMILIES {
            for seed in SEEDS {
                let mut once = Sketch::new();
                let mut thrice = Sketch::new();
                for i in 0..N {
                    once.add(source_hash(&address(i), seed));
                }
                // Forwards, backwards, forwards again.
                for i in (0..N).chain((0..N).rev()).chain(0..N) {
                    thrice.add(source_hash(&address(i), seed));
                }
                assert_eq!(once, thrice, "{family}, seed {seed:#x}");
                assert_eq!(once.estimate(), thrice.estimate());
            }
        }
    }

    /// The kernel program's update of its registers, word for word.
    fn kernel_update(registers: &mut [u8; HLL_REGISTERS], remote_ip: &[u32; 4], seed: u32) {
        let (i, r) = hll_register(source_hash(remote_ip, seed));
        if registers[i as usize] < r {
            registers[i as usize] = r;
        }
    }

    #[test]
    fn per_cpu_registers_merge_into_the_sketch_of_all_addresses() {
        const N: u32 = 200_000;
        for (family, address) in FAMILIES {
            for seed in SEEDS {
                let mut whole = Sketch::new();
                for i in 0..N {
                    whole.add(source_hash(&address(i), seed));
                }
                for cpus in [2, 8] {
                    // Each address on one CPU, and every third one on the next CPU too (its flow
                    // moved): merging must count it once.
                    let mut per_cpu = vec![[0u8; HLL_REGISTERS]; cpus];
                    for i in 0..N {
                        let cpu = i as usize % cpus;
                        kernel_update(&mut per_cpu[cpu], &address(i), seed);
                        if i % 3 == 0 {
                            kernel_update(&mut per_cpu[(cpu + 1) % cpus], &address(i), seed);
                        }
                    }
                    let mut merged = Sketch::new();
                    for registers in &per_cpu {
                        merged.merge(registers);
                    }
                    assert_eq!(merged, whole, "{family}, seed {seed:#x}, {cpus} CPUs");
                    assert_eq!(merged.estimate(), whole.estimate());
                }
            }
        }
    }

    #[test]
    fn both_generations_merge_into_the_sketch_of_their_union() {
        let seed = 0x5bd1_e995;
        for (family, address) in FAMILIES {
            // Generation 0 saw addresses 0..60,000 and generation 1 saw 40,000..100,000, each on two
            // CPUs: 100,000 distinct addresses, 20,000 of them in both.
            let mut generations = [[[0u8; HLL_REGISTERS]; 2]; 2];
            for i in 0..60_000 {
                kernel_update(&mut generations[0][i as usize % 2], &address(i), seed);
            }
            for i in 40_000..100_000 {
                kernel_update(&mut generations[1][i as usize % 2], &address(i), seed);
            }
            let mut merged = Sketch::new();
            for registers in generations.iter().flatten() {
                merged.merge(registers);
            }
            let mut union = Sketch::new();
            for i in 0..100_000 {
                union.add(source_hash(&address(i), seed));
            }
            assert_eq!(merged, union, "{family}");
            assert!(relative_error(merged.estimate(), 100_000) <= PROMISE);
        }
    }

    #[test]
    fn an_empty_sketch_estimates_zero() {
        let mut sketch = Sketch::new();
        assert!(sketch.is_empty());
        assert_eq!(sketch.estimate(), 0);
        sketch.merge(&[0; HLL_REGISTERS]);
        assert!(sketch.is_empty());
        sketch.add(source_hash(&ipv4(0), 7));
        assert!(!sketch.is_empty());
        assert_eq!(sketch.estimate(), 1);
    }

    #[test]
    fn full_registers_give_a_finite_estimate() {
        // Every register at the highest rank: past what 2^32 hash values can tell apart.
        let mut sketch = Sketch::new();
        sketch.merge(&[21; HLL_REGISTERS]);
        let estimate = sketch.estimate();
        assert!(estimate > 1 << 32 && estimate < 100_000_000_000, "{estimate}");
    }

    #[test]
    fn standard_error_is_1_04_over_the_square_root_of_the_registers() {
        assert_eq!(STANDARD_ERROR, 1.04 / (HLL_REGISTERS as f64).sqrt());
        const { assert!(3.0 * STANDARD_ERROR < PROMISE) };
    }

    /// `hll_register` restated with `trailing_zeros`, which the kernel program cannot use.
    fn reference_register(hash: u32) -> (u32, u8) {
        let rank_bits = 32 - HLL_BITS;
        let rest = hash & ((1 << rank_bits) - 1);
        let rank = if rest == 0 {
            rank_bits + 1
        } else {
            rest.trailing_zeros() + 1
        };
        (hash >> rank_bits, rank as u8)
    }

    #[test]
    fn hll_register_is_the_top_bits_and_one_plus_the_trailing_zeros() {
        assert_eq!(hll_register(0), (0, 21));
        assert_eq!(hll_register(1), (0, 1));
        assert_eq!(hll_register(1 << 19), (0, 20));
        assert_eq!(hll_register(1 << 20), (1, 21));
        assert_eq!(hll_register(u32::MAX), (4095, 1));
        assert_eq!(hll_register(0xfff0_0000), (4095, 21));
        let powers = (0..32).flat_map(|b| [1u32 << b, (1u32 << b) - 1, (1u32 << b) + 1, !(1u32 << b)]);
        // Every value of the rank's 20 bits (under varying index bits), and a sweep of all 2^32.
        let rank_bits = (0..1u32 << 20).map(|low| low | (low.wrapping_mul(0x9e37_79b1) & 0xfff0_0000));
        let sweep = (0..=u32::MAX).step_by(997);
        for hash in powers.chain(rank_bits).chain(sweep) {
            let (index, rank) = hll_register(hash);
            assert_eq!((index, rank), reference_register(hash), "{hash:#010x}");
            assert!((index as usize) < HLL_REGISTERS && (1..=21).contains(&rank));
        }
    }
}
