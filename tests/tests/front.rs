//! The front cache (`FrontSlot`, layout 5): a key counted in the hash map claims its free slot
//! and is counted there from then on; keys that share a slot, or that a full map refuses, stay
//! exact; every reader adds the slots to their keys. `BPF_PROG_TEST_RUN` on the embedded program.

use portwatch::generation::{Key, Remote};
use portwatch_common::{front_index, Counters, Direction, IPPROTO_TCP, PROTO_ALL};
use portwatch_tests::{kernel_test, key, packet::Packet, Harness};

fn frame(src: &str) -> Vec<u8> {
    Packet::tcp4(src, 40000, "198.18.0.1", 443).payload(100).build()
}

fn times(one: Counters, n: u64) -> Counters {
    Counters {
        bytes: one.bytes * n,
        packets: one.packets * n,
    }
}

/// Two sources whose keys (443/tcp ingress) want the same slot.
fn colliding_sources() -> (String, String) {
    let src = |i: u32| format!("198.18.{}.{}", 10 + i / 256, i % 256);
    let slot = |i: u32| front_index(&key(&src(i), 443, IPPROTO_TCP, Direction::Ingress).counter_key());
    let first = slot(0);
    let other = (1..4096)
        .find(|&i| slot(i) == first)
        .expect("two of 4,096 keys share a slot");
    (src(0), src(other))
}

#[kernel_test]
fn a_repeat_sender_is_counted_in_its_slot_and_read_with_its_key() {
    let mut h = Harness::new(65536).unwrap();
    h.watch(443, PROTO_ALL).unwrap();
    let k = key("198.18.9.9", 443, IPPROTO_TCP, Direction::Ingress);
    h.run(Direction::Ingress, &frame("198.18.9.9")).unwrap();
    let one = h.counter(0, &k).unwrap().expect("the key is counted");
    assert_eq!(one.packets, 1);
    assert!(
        h.front(0).unwrap().iter().any(|(key, _)| *key == k),
        "the key claimed its slot"
    );
    for _ in 0..9 {
        h.run(Direction::Ingress, &frame("198.18.9.9")).unwrap();
    }
    // The first packet is in the hash entry, the nine after it in the slot; readers add both.
    assert_eq!(h.hash_counter(0, &k).unwrap(), Some(one));
    assert_eq!(h.counter(0, &k).unwrap(), Some(times(one, 10)));
    assert_eq!(h.counters(0).unwrap()[&k], times(one, 10));
    let stats = h.stats().unwrap();
    assert_eq!((stats.matched_packets, stats.matched_bytes), (10, one.bytes * 10));
}

#[kernel_test]
fn keys_that_share_a_slot_are_both_exact() {
    let mut h = Harness::new(65536).unwrap();
    h.watch(443, PROTO_ALL).unwrap();
    let (a, b) = colliding_sources();
    let (ka, kb) = (
        key(&a, 443, IPPROTO_TCP, Direction::Ingress),
        key(&b, 443, IPPROTO_TCP, Direction::Ingress),
    );
    for _ in 0..7 {
        h.run(Direction::Ingress, &frame(&a)).unwrap();
        h.run(Direction::Ingress, &frame(&b)).unwrap();
    }
    let one = {
        let mut fresh = Harness::new(16).unwrap();
        fresh.watch(443, PROTO_ALL).unwrap();
        fresh.run(Direction::Ingress, &frame(&a)).unwrap();
        fresh.counter(0, &ka).unwrap().unwrap()
    };
    let all = h.counters(0).unwrap();
    assert_eq!(all[&ka], times(one, 7));
    assert_eq!(all[&kb], times(one, 7));
    // `a` came first and owns the slot; `b` is counted in the hash, all of it.
    let front = h.front(0).unwrap();
    assert!(front.iter().any(|(k, _)| *k == ka));
    assert!(!front.iter().any(|(k, _)| *k == kb));
    assert_eq!(h.hash_counter(0, &kb).unwrap(), Some(times(one, 7)));
}

#[kernel_test]
fn a_key_the_full_map_refuses_claims_no_slot() {
    const MAX: u32 = 8;
    let mut h = Harness::new(MAX).unwrap();
    h.watch(443, PROTO_ALL).unwrap();
    let src = |i: u32| format!("198.18.20.{i}");
    for i in 0..MAX {
        h.run(Direction::Ingress, &frame(&src(i))).unwrap();
    }
    // A newcomer whose slot is free: the map is full, so it goes to its /24, every time.
    let newcomer = (MAX..255)
        .map(src)
        .find(|s| {
            let k = key(s, 443, IPPROTO_TCP, Direction::Ingress);
            (0..MAX).all(|i| {
                front_index(&key(&src(i), 443, IPPROTO_TCP, Direction::Ingress).counter_key())
                    != front_index(&k.counter_key())
            })
        })
        .expect("a source with a free slot");
    for _ in 0..5 {
        h.run(Direction::Ingress, &frame(&newcomer)).unwrap();
    }
    let k = key(&newcomer, 443, IPPROTO_TCP, Direction::Ingress);
    let all = h.counters(0).unwrap();
    assert!(
        !all.contains_key(&k),
        "a key the map refused is nowhere but under its prefix"
    );
    assert!(!h.front(0).unwrap().iter().any(|(key, _)| *key == k));
    let prefix = Key {
        remote: Remote::Prefix("198.18.20.0/24".parse().unwrap()),
        ..k
    };
    let under_prefix = all[&prefix];
    assert_eq!(under_prefix.packets, 5);
    let stats = h.stats().unwrap();
    assert_eq!(
        (stats.map_full_packets, stats.map_full_bytes),
        (under_prefix.packets, under_prefix.bytes)
    );
}

#[kernel_test]
fn each_generation_has_its_own_slots() {
    let mut h = Harness::new(65536).unwrap();
    h.watch(443, PROTO_ALL).unwrap();
    let k = key("198.18.9.9", 443, IPPROTO_TCP, Direction::Ingress);
    for _ in 0..3 {
        h.run(Direction::Ingress, &frame("198.18.9.9")).unwrap();
    }
    h.set_generation(1).unwrap();
    for _ in 0..4 {
        h.run(Direction::Ingress, &frame("198.18.9.9")).unwrap();
    }
    assert_eq!(h.counter(0, &k).unwrap().unwrap().packets, 3);
    assert_eq!(h.counter(1, &k).unwrap().unwrap().packets, 4);
    // Clearing (as `clear` does, on both) leaves nothing behind in either cache.
    h.clear().unwrap();
    assert!(h.front(0).unwrap().is_empty() && h.front(1).unwrap().is_empty());
    assert!(h.counter(0, &k).unwrap().is_none());
}

/// The "map full" hint: once an insert found the map full, new keys skip the insert; a reset that
/// removes entries clears it, so new keys get entries of their own again.
#[kernel_test]
fn a_reset_that_makes_room_lets_new_keys_in_again() {
    use portwatch_tests::{
        cli::Pw,
        flood::{counted, frame as flood_frame, remote, PinnedPrograms},
    };
    const MAX: u64 = 16;
    let lo = Pw::on_loopback("fullhint", &["--max-entries", &MAX.to_string()]);
    let pw = &lo.pw;
    let mut progs = PinnedPrograms::open(&pw.pin).unwrap();
    let mut run = |i: u64| {
        let p = flood_frame(remote(i), Direction::Ingress, 10);
        progs.run(Direction::Ingress, &p.build(), 1).unwrap();
        counted(remote(i), Direction::Ingress, &p)
    };
    for i in 0..MAX {
        run(i);
    }
    // Full: two newcomers go past the per-IP map (the second one without trying an insert).
    for i in MAX..MAX + 2 {
        let (key, _) = run(i);
        assert!(!pw.counters().contains_key(&key));
    }
    assert_eq!(pw.stats().map_full_packets, 2);
    pw.ok(&["reset", "--json"]);
    // Room again in both generations: a newcomer is counted under its own key.
    for i in MAX + 2..MAX + 4 {
        let (key, value) = run(i);
        assert_eq!(
            pw.counters().get(&key),
            Some(&value),
            "source {i} has its own entry after the reset"
        );
    }
    assert_eq!(pw.stats().map_full_packets, 2);
}
