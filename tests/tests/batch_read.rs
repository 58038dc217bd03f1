//! The reader under `top`, `reset` and `status`: batch reads and their fallback agree.

use std::collections::BTreeMap;

use portwatch::generation::Key;
use portwatch_common::Counters;
use portwatch_tests::{cli::Pw, fill_counters, kernel_test};

/// The batch read `top` and `reset` use (`BPF_MAP_LOOKUP_BATCH`, 16384 entries a call, a reader
/// thread) and the key-at-a-time walk that is its fallback on kernels without batch operations see
/// the same entries and values, over both generations, with more entries than one batch holds.
#[kernel_test]
fn batch_and_key_by_key_reads_agree() {
    let lo = Pw::on_loopback("batch", &[]);
    let pw = &lo.pw;
    let entries = portwatch_tests::synthetic_entries(40_000);
    fill_counters(&pw.pin, 0, &entries).unwrap();
    // Generation 1 holds every third key again, with other values.
    let again: Vec<_> = entries
        .iter()
        .step_by(3)
        .map(|(k, c)| {
            (
                *k,
                Counters {
                    bytes: c.bytes * 2 + 1,
                    packets: 3,
                },
            )
        })
        .collect();
    fill_counters(&pw.pin, 1, &again).unwrap();

    let mut pinned = pw.pinned();
    let mut walked: BTreeMap<Key, Counters> = BTreeMap::new();
    let mut batched: BTreeMap<Key, Counters> = BTreeMap::new();
    for generation in [0, 1] {
        let generation_maps = pinned.generation(generation).unwrap();
        let mut by_key: BTreeMap<Key, Counters> = BTreeMap::new();
        generation_maps
            .for_each_key_by_key(|k, c| assert!(by_key.insert(k, c).is_none(), "{k:?} handed out twice"))
            .unwrap();
        let by_batch = generation_maps.read().unwrap();
        assert_eq!(by_batch.len(), by_key.len(), "generation {generation}");
        assert_eq!(
            by_batch.into_iter().collect::<BTreeMap<_, _>>(),
            by_key,
            "generation {generation}"
        );
        for (k, c) in by_key {
            *walked.entry(k).or_default() += c;
        }
    }
    pinned
        .for_each_count(|k, c| *batched.entry(k).or_default() += c)
        .unwrap();
    assert_eq!(batched, walked);
    // Known figures, not only agreement: 40,000 keys plus the two overflow keys per generation.
    let total = batched.values().fold(Counters::default(), |mut a, c| {
        a += *c;
        a
    });
    let expected_bytes: u64 =
        entries.iter().map(|(_, c)| c.bytes).sum::<u64>() + again.iter().map(|(_, c)| c.bytes).sum::<u64>();
    assert_eq!(
        total,
        Counters {
            bytes: expected_bytes,
            packets: 40_000 + 3 * again.len() as u64
        }
    );
    assert_eq!(batched.len(), 40_000 + 2);
}
