//! The Kafka side: the consumer's settings, its callbacks, and offset tracking.

pub mod context;
pub mod control;
pub mod dead_letter;
pub mod group;
pub mod offsets;
pub mod refusal;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Message, OwnedMessage};

use crate::config::{GroupProtocol, KafkaConfig, Properties};

/// One record as read from Kafka, borrowed from its message: what the
/// pipeline places into batches and what a dead letter carries.
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Option<&'a BorrowedHeaders>,
}

impl<'a> Record<'a> {
    /// A record that is only a value (tests, benchmarks).
    pub fn value_only(value: Option<&'a [u8]>) -> Record<'a> {
        Record {
            topic: "",
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
            value,
            headers: None,
        }
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        use rdkafka::message::Headers;
        self.headers?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
    }

    /// A record the consumer just returned.
    pub fn of(m: &'a BorrowedMessage<'_>) -> Record<'a> {
        Record::with_headers(m, m.headers())
    }

    /// A record read again and kept (owned).
    pub fn of_owned(m: &'a OwnedMessage) -> Record<'a> {
        Record::with_headers(m, m.headers().map(|h| h.as_borrowed()))
    }

    /// The two kinds of message differ only in how their headers are held.
    fn with_headers<M: Message>(m: &'a M, headers: Option<&'a BorrowedHeaders>) -> Record<'a> {
        Record {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key(),
            value: m.payload(),
            headers,
        }
    }
}

/// A record kept beyond its message (a failure waiting for a check of its
/// table): everything a [`Record`] borrows, owned.
#[derive(Debug, Clone)]
pub struct OwnedRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Option<rdkafka::message::OwnedHeaders>,
}

impl OwnedRecord {
    pub fn of(rec: &Record<'_>) -> OwnedRecord {
        OwnedRecord {
            topic: rec.topic.to_string(),
            partition: rec.partition,
            offset: rec.offset,
            timestamp_ms: rec.timestamp_ms,
            key: rec.key.map(<[u8]>::to_vec),
            value: rec.value.map(<[u8]>::to_vec),
            headers: rec.headers.map(BorrowedHeaders::detach),
        }
    }

    pub fn as_record(&self) -> Record<'_> {
        Record {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: self.headers.as_ref().map(|h| h.as_borrowed()),
        }
    }
}

/// Builds the librdkafka configuration. User properties come first; the
/// settings the delivery guarantee depends on are then forced (and
/// `Config::validate` already refused user values for them).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    // Defaults a user may override. The client id names the member in the
    // group's description (`chbridge status`, broker tools).
    c.set("client.id", client_id(cfg));
    if cfg.group_protocol == GroupProtocol::Classic {
        // Incremental: a rebalance moves only the partitions that change
        // owner; the others keep being read. (KIP-848 is incremental always,
        // and there the broker assigns.)
        c.set("partition.assignment.strategy", "cooperative-sticky");
    }
    // librdkafka >= 2.4 idles ~1 s whenever its prefetch queue fills with
    // the default of 1000 ms; 10 ms keeps the pipeline fed.
    c.set("fetch.queue.backoff.ms", "10")
        // Bound librdkafka's own prefetch memory (default 64 MiB).
        .set("queued.max.messages.kbytes", "32768")
        // Lag and committed-offset metrics come from librdkafka's statistics.
        .set("statistics.interval.ms", "2000");
    for (k, v) in cfg.properties.iter() {
        c.set(k, v);
    }
    // Forced: offsets move only when the pipeline says so.
    if cfg.group_protocol == GroupProtocol::Consumer {
        c.set("group.protocol", "consumer");
    }
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", cfg.auto_offset_reset.as_str());
    if let Some(id) = &cfg.instance_id {
        c.set("group.instance.id", id);
    }
    c
}

/// The partition count of each of `topics` (0 for one that does not
/// exist), from the brokers' metadata. Blocking.
pub fn partition_counts(
    cfg: &KafkaConfig,
    topics: &[String],
) -> Result<std::collections::HashMap<String, usize>, String> {
    let consumer = refusal::watched(&client_config(cfg), cfg)?;
    refusal::explain(&consumer, counts(&consumer, cfg, topics))
}

fn counts(
    consumer: &refusal::WatchedConsumer,
    cfg: &KafkaConfig,
    topics: &[String],
) -> Result<std::collections::HashMap<String, usize>, String> {
    use rdkafka::consumer::Consumer as _;
    let mut out = std::collections::HashMap::new();
    for t in topics {
        let meta = consumer
            .fetch_metadata(Some(t), std::time::Duration::from_secs(10))
            .map_err(|e| {
                format!(
                    "cannot read the metadata of topic {t} from {}: {e}",
                    cfg.brokers
                )
            })?;
        let n = meta
            .topics()
            .first()
            .filter(|m| m.error().is_none())
            .map_or(0, |m| m.partitions().len());
        out.insert(t.clone(), n);
    }
    Ok(out)
}

/// `chbridge-<instance id>`, else `chbridge-<host name>` (the pod name in
/// Kubernetes), else `chbridge`.
fn client_id(cfg: &KafkaConfig) -> String {
    let host = cfg.instance_id.clone().or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
    });
    match host {
        Some(h) => format!("chbridge-{h}"),
        None => "chbridge".to_string(),
    }
}

/// Describes an error from creating a client without the offending
/// property's value: rdkafka's own message includes it, and it may be a secret.
pub fn describe_client_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, _, key, _) if Properties::is_secret(key) => format!(
            "librdkafka refused the property `{key}` (its value is not shown: it may be a \
             secret); check its name and value in kafka.properties"
        ),
        KafkaError::ClientConfig(_, desc, key, _) => {
            format!("librdkafka refused the property `{key}` in kafka.properties: {desc}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OffsetReset, Properties};

    #[test]
    fn safety_settings_are_forced_and_user_tuning_kept() {
        let mut props = std::collections::BTreeMap::new();
        props.insert("fetch.queue.backoff.ms".to_string(), "50".to_string());
        let cfg = KafkaConfig {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            instance_id: Some("pod-1".into()),
            auto_offset_reset: OffsetReset::Earliest,
            group_protocol: Default::default(),
            properties: Properties(props),
        };
        let c = client_config(&cfg);
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.instance.id"), Some("pod-1"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("50"));
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
    }

    #[test]
    fn the_consumer_protocol_leaves_assignment_to_the_broker() {
        let cfg = KafkaConfig {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            instance_id: None,
            auto_offset_reset: OffsetReset::Earliest,
            group_protocol: GroupProtocol::Consumer,
            properties: Properties::default(),
        };
        let c = client_config(&cfg);
        assert_eq!(c.get("group.protocol"), Some("consumer"));
        assert_eq!(c.get("partition.assignment.strategy"), None);
        // librdkafka takes the result as it is.
        assert!(c.create::<rdkafka::consumer::BaseConsumer>().is_ok());
    }

    #[test]
    fn client_errors_never_show_secret_values() {
        let mut props = std::collections::BTreeMap::new();
        props.insert(
            "sasl.jaas.config".to_string(),
            "org.apache.kafka... password=\"hunter2\";".to_string(),
        );
        let cfg = KafkaConfig {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            instance_id: None,
            auto_offset_reset: OffsetReset::Earliest,
            group_protocol: Default::default(),
            properties: Properties(props),
        };
        let err = client_config(&cfg)
            .create::<rdkafka::consumer::BaseConsumer>()
            .err()
            .expect("librdkafka refuses sasl.jaas.config");
        assert!(
            err.to_string().contains("hunter2"),
            "rdkafka's own message shows it"
        );
        let shown = describe_client_error(&err);
        assert!(
            shown.contains("sasl.jaas.config") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
