//! The consumer's callbacks: rebalances, commits, statistics and librdkafka's logs.
//!
//! librdkafka runs the rebalance callback inside `poll`, on the consumer
//! thread. The pipeline's state lives here, behind a mutex that only that
//! thread takes (the loop between polls, the callback during one), so that a
//! revocation can flush, wait for acknowledgements and commit before the
//! partitions are given away.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;

use crate::kafka::refusal::{Refusal, Security};
use crate::observability::{Health, Metrics};
use crate::pipeline::core::Core;
use crate::sink::SinkEvent;

pub type Consumer = BaseConsumer<BridgeContext>;

pub struct BridgeContext {
    core: Mutex<Core>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Failed commits reach the core through its events: the callback can run
    /// inside a synchronous commit the core itself makes, lock held.
    events: std_mpsc::Sender<SinkEvent>,
    /// Shared with the dead-letter producer: the loop stops on either's.
    refusal: Refusal,
    security: Security,
}

impl BridgeContext {
    pub fn new(
        core: Core,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        events: std_mpsc::Sender<SinkEvent>,
        refusal: Refusal,
        security: Security,
    ) -> BridgeContext {
        BridgeContext {
            core: Mutex::new(core),
            metrics,
            health,
            events,
            refusal,
            security,
        }
    }

    /// A refusal of the brokers (wrong password, certificate), if any client met one.
    pub fn refused(&self) -> Option<&str> {
        self.refusal.get()
    }

    /// The pipeline state. Never held across `poll`.
    pub fn core(&self) -> MutexGuard<'_, Core> {
        // A poisoned lock means a panic on the consumer thread, which has
        // already ended the loop; the state is still what it was.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for BridgeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{message}")
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !self.refusal.note(&self.security, &error, reason) {
            tracing::warn!(target: "librdkafka", error = %error, "{reason}");
        }
    }

    /// Lag per partition. The high watermark comes from fetch responses: some
    /// Kafka-compatible brokers answer ListOffsets(LATEST) wrongly, so no
    /// separate query is made.
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.fetch_state == "none" || p.hi_offset < 0 {
                    continue;
                }
                let labels = [topic.as_str(), &partition.to_string()];
                self.metrics
                    .high_watermark
                    .with_label_values(&labels)
                    .set(p.hi_offset);
                if p.committed_offset >= 0 {
                    self.metrics
                        .committed_offset
                        .with_label_values(&labels)
                        .set(p.committed_offset);
                }
                let base = if p.committed_offset >= 0 {
                    p.committed_offset
                } else {
                    p.lo_offset.max(0)
                };
                self.metrics
                    .consumer_lag
                    .with_label_values(&labels)
                    .set((p.hi_offset - base).max(0));
            }
        }
    }
}

/// The partitions of a list, by topic name.
fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for BridgeContext {
    fn pre_rebalance(&self, consumer: &Consumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let lost = rdkafka::consumer::Consumer::assignment_lost(consumer);
                self.metrics
                    .rebalances
                    .with_label_values(&[if lost { "lost" } else { "revoke" }])
                    .inc();
                self.core().on_revoke(consumer, &partitions(tpl), lost);
            }
            Rebalance::Assign(tpl) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                self.core().on_assign(&partitions(tpl));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &Consumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.health.set_joined(true);
            self.core().after_assign(consumer, &partitions(tpl));
        }
        if let Ok(a) = rdkafka::consumer::Consumer::assignment(consumer) {
            self.metrics.assigned_partitions.set(a.count() as i64);
        }
    }

    /// Reports failed commits. Successful ones show in `chbridge_committed_offset`,
    /// which comes from librdkafka's statistics (its view of what the broker stored).
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            self.metrics.commits.with_label_values(&["failed"]).inc();
            tracing::warn!(error = %e, "offset commit failed; the next commit will repeat it");
            let _ = self
                .events
                .send(SinkEvent::CommitFailed(partitions(offsets)));
        }
    }
}
