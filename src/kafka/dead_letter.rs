//! Dead letters: records that cannot become rows go to a topic of their own,
//! unchanged, with headers saying where they came from and why they failed.
//!
//! A dead-lettered record counts as handled only once the broker has
//! acknowledged its copy: until then its offset stays held, so a crash or a
//! refused produce can never commit past a record that is neither in
//! ClickHouse nor in the dead-letter topic.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::config::KafkaConfig;
use crate::kafka::offsets::Segment;
use crate::kafka::refusal::{Refusal, Security};
use crate::kafka::Record;
use crate::sink::SinkEvent;

/// Headers chbridge adds to every dead letter.
pub const H_TOPIC: &str = "chbridge.origin.topic";
pub const H_PARTITION: &str = "chbridge.origin.partition";
pub const H_OFFSET: &str = "chbridge.origin.offset";
pub const H_TIMESTAMP: &str = "chbridge.origin.timestamp";
pub const H_TABLE: &str = "chbridge.table";
pub const H_CLASS: &str = "chbridge.error.class";
pub const H_MESSAGE: &str = "chbridge.error.message";

/// Who waits for a dead letter's acknowledgement.
pub enum Ticket {
    /// The consumer thread holds the record's offset until the broker has it
    /// (`table`: index of the table the record failed for, whose memory
    /// budget the copy counts against for `bytes` until then).
    Hold {
        segment: Segment,
        table: usize,
        bytes: usize,
    },
    /// A sink task waits before reporting its batch done.
    Notify(oneshot::Sender<Result<(), String>>),
}

pub struct DeliveryContext {
    events: std_mpsc::Sender<SinkEvent>,
    /// The consumer's: a producer the brokers refuse stops the bridge too.
    refusal: Refusal,
    security: Security,
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !self.refusal.note(&self.security, &error, reason) {
            tracing::warn!(target: "librdkafka", error = %error, "dead-letter producer: {reason}");
        }
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.to_string()),
        };
        match *ticket {
            Ticket::Hold {
                segment,
                table,
                bytes,
            } => {
                let _ = self.events.send(SinkEvent::DeadLettered {
                    segment,
                    table,
                    bytes,
                    error: outcome.err(),
                });
            }
            Ticket::Notify(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// Where a record is: topic, partition, offset.
pub type RecordAt = (String, i32, i64);

/// Why it failed.
pub struct Failure<'a> {
    pub table: &'a str,
    /// Why, in one word: the decoder's reason (`malformed`, `conversion`,
    /// `empty`, `unknown_field`) for a record that cannot become a row, or
    /// `data` for a row ClickHouse refused.
    pub class: &'a str,
    pub message: &'a str,
}

pub struct DeadLetters {
    producer: ThreadedProducer<DeliveryContext>,
    /// For reading a record again by its offset (rows ClickHouse refused are
    /// only held encoded; the original bytes are fetched when one is refused).
    fetch: ClientConfig,
}

/// Properties of the user's Kafka configuration that concern the connection
/// (brokers, TLS, SASL), which the producer and fetcher need as well.
fn connection_properties(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in cfg.properties.iter() {
        let shared = [
            "security.",
            "sasl.",
            "ssl.",
            "socket.",
            "broker.",
            "client.",
            "api.version",
        ]
        .iter()
        .any(|p| k.starts_with(p));
        if shared {
            c.set(k, v);
        }
    }
    c
}

/// What a dead letter of `origin` costs in memory until the broker has it:
/// its key, value and headers, plus the headers chbridge adds.
pub fn size_of(origin: &Record<'_>) -> usize {
    use rdkafka::message::Headers as _;
    let headers = origin.headers.map_or(0, |h| {
        h.iter()
            .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len))
            .sum()
    });
    origin.key.map_or(0, <[u8]>::len) + origin.value.map_or(0, <[u8]>::len) + headers + 512
}

impl DeadLetters {
    /// `queue_bytes` bounds what the producer holds unacknowledged: a send
    /// waits (up to a minute, then fails) rather than grow it further.
    pub fn new(
        cfg: &KafkaConfig,
        events: std_mpsc::Sender<SinkEvent>,
        queue_bytes: u64,
        refusal: Refusal,
    ) -> Result<DeadLetters, KafkaError> {
        let mut p = connection_properties(cfg);
        // A dead letter must not be lost or doubled by the producer itself.
        p.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "queue.buffering.max.kbytes",
                (queue_bytes / 1024).max(1024).to_string(),
            );
        let producer = p.create_with_context(DeliveryContext {
            events,
            refusal,
            security: Security::of(cfg),
        })?;
        let mut fetch = connection_properties(cfg);
        fetch
            .set("group.id", format!("{}.chbridge-refetch", cfg.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.queue.backoff.ms", "10");
        Ok(DeadLetters { producer, fetch })
    }

    /// Sends the failed record to `dlq_topic`; `ticket` learns the outcome.
    /// Blocks while librdkafka's queue is full (it is drained by its own thread).
    pub fn send(
        &self,
        dlq_topic: &str,
        origin: &Record<'_>,
        failure: &Failure<'_>,
        ticket: Ticket,
    ) -> Result<(), String> {
        let mut headers = OwnedHeaders::new();
        if let Some(h) = origin.headers {
            for i in 0..h.count() {
                let header = h.get(i);
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let timestamp = origin
            .timestamp_ms
            .map(|t| t.to_string())
            .unwrap_or_default();
        for (k, v) in [
            (H_TOPIC, origin.topic),
            (H_PARTITION, partition.as_str()),
            (H_OFFSET, offset.as_str()),
            (H_TIMESTAMP, timestamp.as_str()),
            (H_TABLE, failure.table),
            (H_CLASS, failure.class),
            (H_MESSAGE, failure.message),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], Box<Ticket>> =
            BaseRecord::with_opaque_to(dlq_topic, Box::new(ticket)).headers(headers);
        if let Some(k) = origin.key {
            record = record.key(k);
        }
        if let Some(v) = origin.value {
            record = record.payload(v);
        }
        if let Some(ts) = origin.timestamp_ms {
            record = record.timestamp(ts);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    return Err(format!("cannot send to dead-letter topic {dlq_topic}: {e}"));
                }
            }
        }
    }

    /// Reads the records at `wanted` (topic, partition, offset) again, with
    /// one consumer for all of them: each partition is read from its lowest
    /// wanted offset to its highest (rows refused in one batch lie close
    /// together). Blocking. Returns what was found, and a reason for each
    /// record that could not be read.
    pub fn fetch_originals(
        &self,
        wanted: &[RecordAt],
    ) -> (HashMap<RecordAt, OwnedMessage>, HashMap<RecordAt, String>) {
        let mut found = HashMap::new();
        let mut missing: HashMap<RecordAt, String> = HashMap::new();
        let fail_all = |why: String| -> HashMap<_, _> {
            wanted.iter().map(|w| (w.clone(), why.clone())).collect()
        };
        let consumer: BaseConsumer = match self.fetch.create() {
            Ok(c) => c,
            Err(e) => {
                return (
                    found,
                    fail_all(format!("cannot create a consumer to re-read records: {e}")),
                )
            }
        };
        // Per partition: the offsets still wanted.
        let mut todo: HashMap<(String, i32), BTreeSet<i64>> = HashMap::new();
        for (t, p, o) in wanted {
            todo.entry((t.clone(), *p)).or_default().insert(*o);
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), offsets) in &todo {
            let first = offsets.first().copied().unwrap_or(0);
            if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(first)) {
                return (found, fail_all(format!("cannot re-read {t}[{p}]: {e}")));
            }
        }
        if let Err(e) = consumer.assign(&tpl) {
            return (found, fail_all(format!("cannot re-read records: {e}")));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !todo.is_empty() && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let key = (m.topic().to_string(), m.partition());
                    let Some(offsets) = todo.get_mut(&key) else {
                        continue;
                    };
                    // Offsets below the record read are gone (retention, compaction).
                    while let Some(&o) = offsets.first().filter(|&&o| o < m.offset()) {
                        offsets.remove(&o);
                        missing.insert(
                            (key.0.clone(), key.1, o),
                            format!("no longer in the topic (next is {})", m.offset()),
                        );
                    }
                    if offsets.remove(&m.offset()) {
                        found.insert((key.0.clone(), key.1, m.offset()), m.detach());
                    }
                    if offsets.is_empty() {
                        todo.remove(&key);
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "re-reading refused records"),
                None => {}
            }
        }
        for ((t, p), offsets) in todo {
            for o in offsets {
                missing.insert(
                    (t.clone(), p, o),
                    "could not be read again within 30 s".into(),
                );
            }
        }
        (found, missing)
    }

    /// Waits until every dead letter sent so far was acknowledged or failed.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
