//! Prometheus metrics. The numbers live where they are counted (atomics on backends, pools,
//! listeners); a [`Collector`] reads them at scrape time, so the data path never touches a
//! metrics registry or a lock.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::server::Server;

/// Reads a running server's numbers at scrape time.
#[derive(Debug)]
struct ServerCollector {
    server: Weak<Server>,
}

/// A value with label pairs.
type Sample<'a, V> = (Vec<(&'static str, String)>, V);

fn counter<V: prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[Sample<'_, V>],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        metric
            .encode_family(labels)?
            .encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(value, None)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[Sample<'_, V>],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        metric.encode_family(labels)?.encode_gauge(value)?;
    }
    Ok(())
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(server) = self.server.upgrade() else {
            return Ok(());
        };
        let pools = server.pools();
        let mut requests = Vec::new();
        let mut in_flight = Vec::new();
        let mut up = Vec::new();
        let mut weight = Vec::new();
        let mut agent_percent = Vec::new();
        let mut ejections = Vec::new();
        let mut failures = Vec::new();
        let mut upstream_open = Vec::new();
        let mut upstream_opened = Vec::new();
        let mut upstream_reused = Vec::new();
        let mut local = Vec::new();
        let mut retries = Vec::new();
        let mut sessions = Vec::new();
        let mut session_bytes = Vec::new();
        for (name, handle) in pools.iter() {
            let pool = &handle.pool;
            let snapshot = pool.snapshot();
            for backend in snapshot.backends.iter().chain(&snapshot.retiring) {
                let labels = || vec![("pool", name.clone()), ("backend", backend.id.clone())];
                for (class, label) in CLASSES.iter().enumerate() {
                    let mut l = labels();
                    l.push(("class", label.to_string()));
                    requests.push((l, backend.response_count(class)));
                }
                in_flight.push((labels(), i64::from(backend.in_flight_count())));
                up.push((labels(), i64::from(backend.is_available())));
                weight.push((labels(), i64::from(backend.effective_weight())));
                agent_percent.push((labels(), i64::from(backend.agent_percent())));
                ejections.push((labels(), backend.ejection_count()));
                failures.push((labels(), backend.failure_count()));
                let stats = backend.connections.stats();
                upstream_open.push((labels(), stats.open.load(Ordering::Relaxed) as i64));
                upstream_opened.push((labels(), stats.opened.load(Ordering::Relaxed)));
                upstream_reused.push((labels(), stats.reused.load(Ordering::Relaxed)));
                let tunnels = &backend.sessions;
                sessions.push((labels(), tunnels.opened.load(Ordering::Relaxed)));
                for (direction, bytes) in [
                    ("to_backend", &tunnels.bytes_to_backend),
                    ("to_client", &tunnels.bytes_to_client),
                ] {
                    let mut l = labels();
                    l.push(("direction", direction.to_string()));
                    session_bytes.push((l, bytes.load(Ordering::Relaxed)));
                }
            }
            for (status, count) in pool.local_error_counts() {
                local.push((
                    vec![("pool", name.clone()), ("status", status.to_string())],
                    count,
                ));
            }
            retries.push((vec![("pool", name.clone())], pool.retry_count()));
        }
        counter(
            &mut encoder,
            "fulcrum_backend_responses",
            "Backend answers by pool, backend and status class.",
            &requests,
        )?;
        counter(
            &mut encoder,
            "fulcrum_local_responses",
            "Responses Fulcrum generated itself (502, 503, 504) by pool.",
            &local,
        )?;
        gauge(
            &mut encoder,
            "fulcrum_backend_in_flight",
            "Requests in flight per backend.",
            &in_flight,
        )?;
        gauge(
            &mut encoder,
            "fulcrum_backend_up",
            "1 when the backend can take new requests (healthy, enabled, not ejected).",
            &up,
        )?;
        gauge(
            &mut encoder,
            "fulcrum_backend_effective_weight",
            "Weight the balancer uses now.",
            &weight,
        )?;
        gauge(
            &mut encoder,
            "fulcrum_backend_agent_percent",
            "Weight percent the backend's agent last reported (100 without an agent).",
            &agent_percent,
        )?;
        counter(
            &mut encoder,
            "fulcrum_backend_ejections",
            "Passive ejections per backend.",
            &ejections,
        )?;
        counter(
            &mut encoder,
            "fulcrum_backend_failures",
            "Failed exchanges (connect errors, resets, timeouts) per backend.",
            &failures,
        )?;
        counter(
            &mut encoder,
            "fulcrum_retries",
            "Requests retried on another backend, by pool.",
            &retries,
        )?;
        gauge(
            &mut encoder,
            "fulcrum_upstream_connections_open",
            "Open connections to backends.",
            &upstream_open,
        )?;
        counter(
            &mut encoder,
            "fulcrum_upstream_connections_opened",
            "Connections opened to backends.",
            &upstream_opened,
        )?;
        counter(
            &mut encoder,
            "fulcrum_upstream_requests_reused",
            "Requests sent on a reused backend connection.",
            &upstream_reused,
        )?;

        counter(
            &mut encoder,
            "fulcrum_backend_sessions",
            "TCP-mode sessions and upgraded (WebSocket) connections opened per backend.",
            &sessions,
        )?;
        counter(
            &mut encoder,
            "fulcrum_backend_session_bytes",
            "Bytes relayed by TCP sessions and upgraded connections, per backend and direction.",
            &session_bytes,
        )?;

        let mut histogram = encoder.encode_descriptor(
            "fulcrum_request_duration_seconds",
            "Time from receiving a request to sending the backend's response head, by pool.",
            None,
            MetricType::Histogram,
        )?;
        for (name, handle) in pools.iter() {
            let (sum, count, buckets) = handle.pool.latency.snapshot();
            let labels = vec![("pool", name.clone())];
            histogram
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }

        let listeners = server.listener_stats();
        let open: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    vec![("listener", n.clone())],
                    s.open.load(Ordering::Relaxed) as i64,
                )
            })
            .collect();
        let accepted: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    vec![("listener", n.clone())],
                    s.accepted.load(Ordering::Relaxed),
                )
            })
            .collect();
        let parked: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    vec![("listener", n.clone())],
                    s.parked.load(Ordering::Relaxed) as i64,
                )
            })
            .collect();
        let by_worker: Vec<_> = listeners
            .iter()
            .filter(|(_, s)| s.accepted_by_worker.len() > 1)
            .flat_map(|(n, s)| {
                s.accepted_by_worker
                    .iter()
                    .enumerate()
                    .map(move |(worker, count)| {
                        (
                            vec![("listener", n.clone()), ("worker", worker.to_string())],
                            count.load(Ordering::Relaxed),
                        )
                    })
            })
            .collect();
        let refused: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    vec![("listener", n.clone())],
                    s.refused.load(Ordering::Relaxed),
                )
            })
            .collect();
        let refused_per_ip: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    vec![("listener", n.clone())],
                    s.refused_per_ip.load(Ordering::Relaxed),
                )
            })
            .collect();
        let refused_requests: Vec<_> = listeners
            .iter()
            .flat_map(|(n, s)| {
                let counts = &s.refused_requests;
                [("431", &counts.headers), ("414", &counts.uri)].map(|(status, count)| {
                    (
                        vec![("listener", n.clone()), ("status", status.to_string())],
                        count.load(Ordering::Relaxed),
                    )
                })
            })
            .collect();
        let rate_limited: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    vec![("listener", n.clone())],
                    s.refused_requests.rate_limited.load(Ordering::Relaxed),
                )
            })
            .collect();
        gauge(
            &mut encoder,
            "fulcrum_client_connections_open",
            "Open client connections by listener.",
            &open,
        )?;
        counter(
            &mut encoder,
            "fulcrum_client_connections_accepted",
            "Client connections accepted by listener.",
            &accepted,
        )?;
        gauge(
            &mut encoder,
            "fulcrum_client_connections_parked",
            "Idle keep-alive client connections parked (no task, no buffers) by listener.",
            &parked,
        )?;
        if !by_worker.is_empty() {
            counter(
                &mut encoder,
                "fulcrum_worker_connections_accepted",
                "Client connections accepted by listener and worker (per-core runtime).",
                &by_worker,
            )?;
        }
        counter(
            &mut encoder,
            "fulcrum_client_connections_refused",
            "Client connections refused at the connection limit.",
            &refused,
        )?;
        counter(
            &mut encoder,
            "fulcrum_client_connections_refused_per_ip",
            "Client connections refused at the limit per client IP (max_connections_per_ip).",
            &refused_per_ip,
        )?;
        counter(
            &mut encoder,
            "fulcrum_requests_refused",
            "Requests refused for their head, by listener and status: 431 (max_header_count, max_header_bytes), 414 (max_uri_bytes).",
            &refused_requests,
        )?;
        counter(
            &mut encoder,
            "fulcrum_requests_rate_limited",
            "Requests answered 429 at the limit per client IP (requests_per_ip).",
            &rate_limited,
        )?;
        let reloads = vec![
            (
                vec![("result", "applied".to_string())],
                server.reloads.applied.load(Ordering::Relaxed),
            ),
            (
                vec![("result", "refused".to_string())],
                server.reloads.refused.load(Ordering::Relaxed),
            ),
        ];
        counter(
            &mut encoder,
            "fulcrum_reloads",
            "Configuration reloads by result.",
            &reloads,
        )?;
        encode_autoscale(&mut encoder, &server)?;
        Ok(())
    }
}

/// The autoscalers' numbers: pool size, wanted size, smoothed load, decisions, failures.
fn encode_autoscale(
    encoder: &mut DescriptorEncoder<'_>,
    server: &Server,
) -> Result<(), std::fmt::Error> {
    let stats = server.autoscale_stats();
    if stats.is_empty() {
        return Ok(());
    }
    let pool = |name: &String| vec![("pool", name.clone())];
    let backends: Vec<_> = stats
        .iter()
        .map(|(n, s)| (pool(n), s.backends.load(Ordering::Relaxed) as i64))
        .collect();
    gauge(
        encoder,
        "fulcrum_autoscale_backends",
        "Backends in an autoscaled pool.",
        &backends,
    )?;
    let desired: Vec<_> = stats
        .iter()
        .map(|(n, s)| (pool(n), s.desired.load(Ordering::Relaxed) as i64))
        .collect();
    gauge(
        encoder,
        "fulcrum_autoscale_desired_backends",
        "Pool size the smoothed load asks for (within min..max).",
        &desired,
    )?;
    let load: Vec<_> = stats
        .iter()
        .map(|(n, s)| {
            (
                pool(n),
                s.load_per_backend_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            )
        })
        .collect();
    gauge(
        encoder,
        "fulcrum_autoscale_load_per_backend",
        "Smoothed autoscale metric per backend.",
        &load,
    )?;
    let decisions: Vec<_> = stats
        .iter()
        .flat_map(|(n, s)| {
            [
                (
                    vec![("pool", n.clone()), ("direction", "up".to_string())],
                    s.scale_ups.load(Ordering::Relaxed),
                ),
                (
                    vec![("pool", n.clone()), ("direction", "down".to_string())],
                    s.scale_downs.load(Ordering::Relaxed),
                ),
            ]
        })
        .collect();
    counter(
        encoder,
        "fulcrum_autoscale_decisions",
        "Scale decisions carried out, by direction.",
        &decisions,
    )?;
    let failures: Vec<_> = stats
        .iter()
        .map(|(n, s)| (pool(n), s.failures.load(Ordering::Relaxed)))
        .collect();
    counter(
        encoder,
        "fulcrum_autoscale_failures",
        "Provider failures (backend not started or not ready, command failed).",
        &failures,
    )?;
    let replacements: Vec<_> = stats
        .iter()
        .map(|(n, s)| (pool(n), s.replacements.load(Ordering::Relaxed)))
        .collect();
    counter(
        encoder,
        "fulcrum_autoscale_replacements",
        "Crashed autoscaled backends replaced.",
        &replacements,
    )
}

/// A registry exposing everything `server` counts.
pub fn registry(server: &Arc<Server>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ServerCollector {
        server: Arc::downgrade(server),
    }));
    registry
}

/// Renders the registry in the Prometheus / OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 * 1024);
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}
