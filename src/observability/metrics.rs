//! Every metric chbridge exports, in one place. docs/metrics.md describes each.
//!
//! Labels are low-cardinality by construction: topic, partition, table, and a
//! small fixed set of reasons or error classes.

use crate::config::OnError;
use crate::decode::RecordErrorKind;
use crate::sink::ErrorClass;

/// `chbridge_records_failed_total` reason of rows ClickHouse refused (the
/// other reasons are `RecordErrorKind`s).
pub const REJECTED: &str = "rejected";
/// `chbridge_dead_letters_total` classes: records that could not become a
/// row, and rows ClickHouse refused.
pub const DEAD_LETTER_DECODE: &str = "decode";
pub const DEAD_LETTER_DATA: &str = "data";

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// Records read from Kafka, by topic.
    pub records_consumed: IntCounterVec,
    /// Records that could not become rows, by topic, table and reason.
    pub records_failed: IntCounterVec,
    /// Rows ClickHouse acknowledged, by table.
    pub rows_inserted: IntCounterVec,
    /// Uncompressed bytes of acknowledged inserts, by table.
    pub insert_bytes: IntCounterVec,
    /// Inserts acknowledged, by table.
    pub batches_inserted: IntCounterVec,
    /// Rows per inserted batch, by table.
    pub batch_rows: HistogramVec,
    /// Insert duration of the successful attempt, by table.
    pub insert_duration: HistogramVec,
    /// Failed insert attempts, by table and error class (transient, data, fatal).
    pub insert_errors: IntCounterVec,
    /// Insert attempts repeated after a transient failure, by table.
    pub insert_retries: IntCounterVec,
    pub records_redecoded: IntCounterVec,
    pub replays: IntCounterVec,
    /// Offset last committed, by topic and partition (librdkafka's statistics).
    pub committed_offset: IntGaugeVec,
    /// Commit requests, by result (sent, failed).
    pub commits: IntCounterVec,
    /// High watermark seen in fetch responses, by topic and partition.
    pub high_watermark: IntGaugeVec,
    /// Records not yet committed: high watermark minus committed offset.
    pub consumer_lag: IntGaugeVec,
    /// Encoded bytes held in memory (open batches and batches being inserted).
    pub buffered_bytes: IntGauge,
    /// 1 while consumption is paused because buffers are full.
    pub paused: IntGauge,
    /// Partitions currently assigned to this process.
    pub assigned_partitions: IntGauge,
    /// Rebalance events, by kind (assign, revoke, lost).
    pub rebalances: IntCounterVec,
    /// Seconds from a record's Kafka timestamp to its row being acknowledged.
    pub end_to_end_latency: Histogram,
    pub dead_letters: IntCounterVec,
    pub bisect_inserts: IntCounterVec,
    pub state_writes: IntCounterVec,
    pub partition_stalled: IntGaugeVec,
    pub route_stopped: IntGaugeVec,
    /// The configured `max_buffered_bytes`, so that alerts can compare.
    pub buffered_bytes_limit: IntGauge,
    /// Unix time of the last acknowledged insert, by table.
    pub last_insert: IntGaugeVec,
    /// 1 per (route, topic, table): joins topics' lag to tables in queries.
    pub route_info: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
        panic!("metric {name} is malformed: {e}") // a programming error, found by the unit test
    });
    register(registry, Box::new(c.clone()));
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    register(registry, Box::new(g.clone()));
    g
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    register(registry, Box::new(g.clone()));
    g
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    register(registry, Box::new(h.clone()));
    h
}

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = registry.register(c) {
        panic!("metric registered twice: {e}");
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "chbridge_end_to_end_latency_seconds",
                "Seconds from a record's Kafka timestamp to ClickHouse acknowledging its row",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric malformed: {e}"));
        register(&r, Box::new(latency.clone()));
        gauge_vec(
            &r,
            "chbridge_build_info",
            "Always 1; the version label tells which chbridge runs",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        // process_resident_memory_bytes, process_cpu_seconds_total, open fds:
        // the standard names every dashboard and alert already knows.
        #[cfg(target_os = "linux")]
        register(
            &r,
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        );
        Metrics {
            records_consumed: counter(
                &r,
                "chbridge_records_consumed_total",
                "Records read from Kafka",
                &["topic"],
            ),
            records_failed: counter(
                &r,
                "chbridge_records_failed_total",
                "Records that could not become a row (reason: why; rejected = refused by ClickHouse)",
                &["topic", "table", "reason"],
            ),
            rows_inserted: counter(
                &r,
                "chbridge_rows_inserted_total",
                "Rows acknowledged by ClickHouse",
                &["table"],
            ),
            insert_bytes: counter(
                &r,
                "chbridge_insert_bytes_total",
                "Uncompressed RowBinary bytes acknowledged by ClickHouse",
                &["table"],
            ),
            batches_inserted: counter(
                &r,
                "chbridge_batches_inserted_total",
                "Inserts acknowledged by ClickHouse",
                &["table"],
            ),
            batch_rows: histogram_vec(
                &r,
                "chbridge_batch_rows",
                "Rows per inserted batch",
                &["table"],
                prometheus::exponential_buckets(10.0, 4.0, 9)
                    .unwrap_or_else(|_| vec![10.0, 1e3, 1e5, 1e6]),
            ),
            insert_duration: histogram_vec(
                &r,
                "chbridge_insert_duration_seconds",
                "Duration of successful inserts",
                &["table"],
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
            insert_errors: counter(
                &r,
                "chbridge_insert_errors_total",
                "Failed insert attempts by error class",
                &["table", "class"],
            ),
            insert_retries: counter(
                &r,
                "chbridge_insert_retries_total",
                "Insert attempts repeated after a transient failure, by ClickHouse's error code (none: no answer)",
                &["table", "code"],
            ),
            records_redecoded: counter(
                &r,
                "chbridge_records_redecoded_total",
                "Records read again from Kafka for a table: after its columns changed, or once it was checked after a record failed",
                &["table"],
            ),
            replays: counter(
                &r,
                "chbridge_exactly_once_replays_total",
                "Exactly-once: recorded batch ranges cut again after an assignment, to be inserted with their token",
                &["table"],
            ),
            committed_offset: gauge_vec(
                &r,
                "chbridge_committed_offset",
                "Offset last committed for the partition",
                &["topic", "partition"],
            ),
            commits: {
                let c = counter(
                    &r,
                    "chbridge_commits_total",
                    "Offset commit requests sent, and those that failed",
                    &["result"],
                );
                // At 0 from the start, so that the first failure is an increase.
                for result in ["sent", "failed"] {
                    c.with_label_values(&[result]);
                }
                c
            },
            high_watermark: gauge_vec(
                &r,
                "chbridge_high_watermark_offset",
                "High watermark of the partition, from fetch responses",
                &["topic", "partition"],
            ),
            consumer_lag: gauge_vec(
                &r,
                "chbridge_consumer_lag",
                "Records in the partition not yet committed (high watermark - committed offset)",
                &["topic", "partition"],
            ),
            buffered_bytes: gauge(
                &r,
                "chbridge_buffered_bytes",
                "Encoded bytes in memory: open batches plus batches being inserted",
            ),
            paused: gauge(
                &r,
                "chbridge_consumer_paused",
                "1 while consumption is paused because buffers are full",
            ),
            assigned_partitions: gauge(
                &r,
                "chbridge_assigned_partitions",
                "Partitions assigned to this process",
            ),
            rebalances: counter(
                &r,
                "chbridge_rebalances_total",
                "Rebalance events by kind",
                &["kind"],
            ),
            end_to_end_latency: latency,
            dead_letters: counter(
                &r,
                "chbridge_dead_letters_total",
                "Records sent to a dead-letter topic and acknowledged by the broker",
                &["topic", "table", "class"],
            ),
            bisect_inserts: counter(
                &r,
                "chbridge_bisect_inserts_total",
                "Inserts of parts of a batch ClickHouse refused, made to isolate the bad rows",
                &["table"],
            ),
            state_writes: counter(
                &r,
                "chbridge_exactly_once_state_writes_total",
                "Batch ranges recorded in the exactly-once state table, by result",
                &["result"],
            ),
            partition_stalled: gauge_vec(
                &r,
                "chbridge_partition_stalled",
                "1 while the partition has lag but its commit position has not moved for stall_timeout",
                &["topic", "partition"],
            ),
            route_stopped: gauge_vec(
                &r,
                "chbridge_route_stopped",
                "1 once a route was stopped for failing more than max_failed_ratio (its topics pause until a restart)",
                &["route", "table"],
            ),
            buffered_bytes_limit: gauge(
                &r,
                "chbridge_buffered_bytes_limit",
                "The configured max_buffered_bytes: consumption pauses as chbridge_buffered_bytes nears it",
            ),
            last_insert: gauge_vec(
                &r,
                "chbridge_last_insert_timestamp_seconds",
                "Unix time of the last insert ClickHouse acknowledged, by table",
                &["table"],
            ),
            route_info: gauge_vec(
                &r,
                "chbridge_route_info",
                "Always 1: route N reads topic into table (to join lag by topic with inserts by table)",
                &["route", "topic", "table"],
            ),
            registry: r,
        }
    }

    /// Creates a table's series at 0, and those of the routes into it, so
    /// that the first insert, error or dead letter is an increase Prometheus
    /// can see: a counter that appears at 1 shows no increase.
    pub fn init_table(&self, table: &str, routes: &[(usize, &str, OnError)]) {
        for c in [
            &self.rows_inserted,
            &self.insert_bytes,
            &self.batches_inserted,
            &self.bisect_inserts,
            &self.records_redecoded,
            &self.replays,
        ] {
            c.with_label_values(&[table]);
        }
        for class in ErrorClass::ALL {
            self.insert_errors
                .with_label_values(&[table, class.as_str()]);
        }
        for &(route, topic, on_error) in routes {
            self.route_info
                .with_label_values(&[&route.to_string(), topic, table])
                .set(1);
            let reasons = RecordErrorKind::ALL.map(RecordErrorKind::as_str);
            for reason in reasons.into_iter().chain([REJECTED]) {
                self.records_failed
                    .with_label_values(&[topic, table, reason]);
            }
            if on_error == OnError::DeadLetter {
                for class in [DEAD_LETTER_DECODE, DEAD_LETTER_DATA] {
                    self.dead_letters.with_label_values(&[topic, table, class]);
                }
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        buf
    }

    /// Forgets the per-partition series of a partition this process no longer owns.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let p = partition.to_string();
        for g in [
            &self.committed_offset,
            &self.high_watermark,
            &self.consumer_lag,
            &self.partition_stalled,
        ] {
            let _ = g.remove_label_values(&[topic, &p]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders() {
        let m = Metrics::new();
        m.records_consumed.with_label_values(&["t"]).inc_by(3);
        m.committed_offset.with_label_values(&["t", "0"]).set(42);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("chbridge_records_consumed_total{topic=\"t\"} 3"),
            "{text}"
        );
        assert!(text.contains("chbridge_committed_offset{partition=\"0\",topic=\"t\"} 42"));
        m.forget_partition("t", 0);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("chbridge_committed_offset{"));
    }
}
