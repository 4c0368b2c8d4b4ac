//! The subscription index as it grows: the cost of matching one published topic must stay flat
//! as subscriptions on other topics are added, and wildcard matching must not scan the filters.
//!
//! `cargo bench -p mqttd-broker --bench topic_tree`; results and the machine they were taken
//! on are in docs/benchmarks.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mqttd_broker::topic_tree::{Match, TopicTree};
use mqttd_proto::{TopicFilter, TopicName};

const SIZES: [usize; 5] = [1, 1_000, 10_000, 100_000, 1_000_000];

fn filter(s: &str) -> TopicFilter {
    TopicFilter::try_from(s).expect("valid filter")
}

/// `n` subscriptions on distinct topics, as a fleet of devices each subscribed to its own.
fn exact_tree(n: usize) -> TopicTree<u64, ()> {
    let mut tree = TopicTree::new();
    for i in 0..n {
        tree.insert(
            &filter(&format!("site/{}/dev/{i}/cmd", i % 100)),
            i as u64,
            (),
        );
    }
    tree
}

/// `n` wildcard subscriptions, half `+` and half `#`, each on its own device.
fn wildcard_tree(n: usize) -> TopicTree<u64, ()> {
    let mut tree = TopicTree::new();
    for i in 0..n {
        let f = if i % 2 == 0 {
            format!("site/{}/dev/{i}/+", i % 100)
        } else {
            format!("site/{}/dev/{i}/#", i % 100)
        };
        tree.insert(&filter(&f), i as u64, ());
    }
    tree
}

fn count_matches(tree: &TopicTree<u64, ()>, topic: &TopicName) -> usize {
    let mut n = 0;
    tree.for_each_match(topic, |m| {
        if let Match::Direct(..) = m {
            n += 1;
        }
    });
    n
}

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("match one topic");
    group.sample_size(20);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for n in SIZES {
        let tree = exact_tree(n);
        let topic = TopicName::try_from(format!("site/{}/dev/{}/cmd", (n / 2) % 100, n / 2))
            .expect("valid topic");
        assert_eq!(count_matches(&tree, &topic), 1);
        group.bench_with_input(BenchmarkId::new("exact filters", n), &n, |b, _| {
            b.iter(|| count_matches(black_box(&tree), black_box(&topic)))
        });
        drop(tree);

        let tree = wildcard_tree(n);
        let i = n / 2;
        let topic =
            TopicName::try_from(format!("site/{}/dev/{i}/temp", i % 100)).expect("valid topic");
        assert_eq!(count_matches(&tree, &topic), 1);
        group.bench_with_input(BenchmarkId::new("wildcard filters", n), &n, |b, _| {
            b.iter(|| count_matches(black_box(&tree), black_box(&topic)))
        });
    }
    group.finish();
}

// The macro generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, matching);
}
criterion_main!(group::benches);
