//! `pick()` cost per algorithm at 3, 100 and 1000 backends, least_conn's pick with the two
//! load notifications a request pays, and Maglev table rebuild at 1000.
//! Run with `cargo bench -p fulcrum-balance`.

// criterion_group! and criterion_main! generate undocumented functions.
#![allow(missing_docs)]

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fulcrum_balance::{
    splitmix64, Algorithm, Balancer, BuildOptions, Candidate, Member, PeakEwma, PickContext,
    Selector,
};

/// A backend with live-looking numbers: varied in-flight counts and latency estimates.
struct Bench {
    weight: u32,
    in_flight: AtomicU32,
    latency: PeakEwma,
}

impl Candidate for Bench {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
    fn is_eligible(&self) -> bool {
        true
    }
    fn latency_ns(&self, now_ns: u64) -> u64 {
        self.latency.estimate(now_ns)
    }
}

fn pool(n: usize) -> (Vec<String>, Vec<Bench>) {
    let ids = (0..n)
        .map(|i| format!("10.0.{}.{}:8080", i / 256, i % 256))
        .collect();
    let backends = (0..n as u64)
        .map(|i| {
            let latency = PeakEwma::default();
            latency.observe(500_000 + splitmix64(i) % 1_000_000, 1_000);
            Bench {
                weight: 100,
                in_flight: AtomicU32::new((splitmix64(i ^ 77) % 8) as u32),
                latency,
            }
        })
        .collect();
    (ids, backends)
}

fn members(ids: &[String]) -> Vec<Member<'_>> {
    ids.iter().map(|id| Member { id, weight: 100 }).collect()
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    let variants: Vec<(&str, Algorithm, Option<f64>)> = Algorithm::ALL
        .iter()
        .map(|(name, algorithm)| (*name, *algorithm, None))
        .chain([("maglev_bounded", Algorithm::Maglev, Some(1.25))])
        .collect();
    for (name, algorithm, bounded_load) in variants {
        for n in [3usize, 100, 1000] {
            let (ids, backends) = pool(n);
            let options = BuildOptions {
                bounded_load,
                ..BuildOptions::default()
            };
            let selector = Selector::build(algorithm, &members(&ids), &options);
            selector.refresh_all(&backends);
            let mut random = 1u64;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    random = splitmix64(random);
                    let ctx = PickContext {
                        key_hash: random,
                        random,
                        now_ns: 2_000_000_000,
                        excluded: &[],
                    };
                    black_box(selector.pick(black_box(&backends), &ctx))
                })
            });
        }
    }
    group.finish();
}

/// What a least_conn request pays: the pick, the in-flight increment and its notification,
/// and (for the request `OUTSTANDING` picks earlier) the decrement and its notification.
fn pick_with_notify(c: &mut Criterion) {
    const OUTSTANDING: usize = 64;
    let mut group = c.benchmark_group("pick");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    for n in [3usize, 100, 1000] {
        let (ids, backends) = pool(n);
        let selector = Selector::build(
            Algorithm::LeastConn,
            &members(&ids),
            &BuildOptions::default(),
        );
        selector.refresh_all(&backends);
        let mut random = 1u64;
        let mut running = VecDeque::with_capacity(OUTSTANDING + 1);
        group.bench_with_input(BenchmarkId::new("least_conn_notify", n), &n, |b, _| {
            b.iter(|| {
                random = splitmix64(random);
                let index = selector
                    .pick(black_box(&backends), &PickContext::with_random(random))
                    .unwrap();
                backends[index].in_flight.fetch_add(1, Ordering::Relaxed);
                selector.load_changed(index, &backends);
                running.push_back(index);
                if running.len() > OUTSTANDING {
                    let done = running.pop_front().unwrap();
                    backends[done].in_flight.fetch_sub(1, Ordering::Relaxed);
                    selector.load_changed(done, &backends);
                }
            })
        });
    }
    group.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    let (ids, _) = pool(1000);
    let members = members(&ids);
    for (name, algorithm) in [
        ("maglev", Algorithm::Maglev),
        ("round_robin", Algorithm::RoundRobin),
    ] {
        group.bench_function(BenchmarkId::new(name, 1000), |b| {
            b.iter(|| {
                black_box(Selector::build(
                    algorithm,
                    black_box(&members),
                    &BuildOptions::default(),
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pick, pick_with_notify, rebuild);
criterion_main!(benches);
