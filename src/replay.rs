//! `chbridge dlq replay`: after a fix (of the table, the mapping or the
//! producer's data), inserts a route's dead letters into the route's table.
//!
//! Records are read from the dead-letter topic without a consumer group and
//! decoded with the route's decoder, as the bridge would have; only dead
//! letters the route itself wrote (header `chbridge.table` naming its table,
//! origin topic among its topics) are taken. Each insert carries a
//! deduplication token naming its dead-letter offsets, so replaying the same
//! range twice into a table with a deduplication window inserts nothing twice.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::decode;
use crate::kafka::dead_letter::{H_OFFSET, H_PARTITION, H_TABLE, H_TOPIC};
use crate::sink::{ClickHouseWriter, Writer as _};

/// Which dead letters to replay.
pub struct Range {
    pub route: usize,
    pub partition: Option<i32>,
    pub from: Option<i64>,
    /// Exclusive.
    pub to: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub read: u64,
    pub inserted: u64,
    /// Dead letters of other routes or tables, left alone.
    pub other: u64,
    /// Still failing: (dead-letter partition, offset, origin, error).
    pub failing: Vec<(i32, i64, String, String)>,
}

/// Stop reading a partition after this long without a record: the broker's
/// end offset is not trusted (some Kafka-compatible brokers report it wrongly).
const IDLE_END: Duration = Duration::from_secs(3);

pub async fn replay(config: &Config, range: &Range) -> Result<Report, String> {
    let route = config
        .routes
        .get(range.route)
        .ok_or_else(|| format!("there is no routes[{}] in the configuration", range.route))?;
    let dlq = route.dead_letter_topic.clone().ok_or_else(|| {
        format!(
            "routes[{}] has no dead_letter_topic: there is nothing to replay",
            range.route
        )
    })?;
    let client = crate::sink::client(&config.clickhouse);
    let (db, t) = config.route_table(range.route);
    let schema = crate::schema::load_table(&client, &db, &t)
        .await
        .map_err(|e| e.to_string())?;
    let table = schema.to_string();
    let registry = crate::pipeline::registry(config).map_err(|e| e.to_string())?;
    let mut decoder = decode::decoder_for(route, &schema, registry.as_ref())?;
    let sql = schema.insert_sql();
    let writer = ClickHouseWriter::new(&config.clickhouse, &config.kafka.group_id);

    let mut c = crate::kafka::client_config(&config.kafka);
    c.set(
        "group.id",
        format!("{}.chbridge-replay", config.kafka.group_id),
    );
    let consumer: BaseConsumer = c
        .create()
        .map_err(|e| crate::kafka::describe_client_error(&e))?;
    let topics: Vec<String> = route.topics.clone();
    let max_rows = config.batch.max_rows;
    let range_from = range.from;
    let range_to = range.to;
    let partition = range.partition;
    // Reading is blocking librdkafka work: keep it off the async workers.
    let (letters, mut report) = tokio::task::spawn_blocking(move || {
        read_letters(&consumer, &dlq, partition, range_from, range_to)
    })
    .await
    .map_err(|e| format!("reading the dead-letter topic failed: {e}"))??;

    let mut body = Vec::new();
    let mut rows = 0u64;
    let mut first: Option<(i32, i64)> = None;
    for (i, l) in letters.iter().enumerate() {
        let header = |name: &str| l.header(name);
        if header(H_TABLE) != table || !topics.iter().any(|t| *t == header(H_TOPIC)) {
            report.other += 1;
        } else {
            let before = body.len();
            let original = header(H_TOPIC);
            let rec = crate::kafka::Record {
                topic: &original,
                partition: header(H_PARTITION).parse().unwrap_or(l.partition),
                offset: header(H_OFFSET).parse().unwrap_or(l.offset),
                timestamp_ms: None,
                key: None,
                value: l.value.as_deref(),
                headers: None,
            };
            match decoder.decode(&rec, &mut body) {
                Ok(()) => {
                    rows += 1;
                    first.get_or_insert((l.partition, l.offset));
                }
                Err(e) => {
                    body.truncate(before);
                    let origin = format!(
                        "{}[{}] at offset {}",
                        header(H_TOPIC),
                        header(H_PARTITION),
                        header(H_OFFSET)
                    );
                    report
                        .failing
                        .push((l.partition, l.offset, origin, e.to_string()));
                }
            }
        }
        // One insert never spans two dead-letter partitions: its token names
        // an offset range of one partition, so the same range replayed again
        // gets the same token whatever order the partitions were read in.
        let boundary = letters
            .get(i + 1)
            .is_none_or(|n| n.partition != l.partition);
        if rows > 0 && (rows as usize >= max_rows || boundary) {
            let (p, o) = first.take().unwrap_or((l.partition, l.offset));
            let token = format!("chbridge-replay|{table}|{p}|{o}-{}", l.offset);
            writer
                .insert(&sql, Bytes::from(std::mem::take(&mut body)), Some(&token))
                .await
                .map_err(|e| format!("inserting replayed rows into {table} failed: {e}"))?;
            report.inserted += rows;
            rows = 0;
        }
    }
    Ok(report)
}

/// One dead letter, owned.
struct Letter {
    partition: i32,
    offset: i64,
    value: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
}

impl Letter {
    fn header(&self, name: &str) -> String {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

fn read_letters(
    consumer: &BaseConsumer,
    dlq: &str,
    partition: Option<i32>,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<(Vec<Letter>, Report), String> {
    let meta = consumer
        .fetch_metadata(Some(dlq), Duration::from_secs(10))
        .map_err(|e| format!("cannot read the metadata of {dlq}: {e}"))?;
    let partitions: Vec<i32> = meta
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(format!("the dead-letter topic {dlq} does not exist"));
    }
    let mut tpl = TopicPartitionList::new();
    for p in partitions
        .into_iter()
        .filter(|p| partition.is_none_or(|x| x == *p))
    {
        let start = from.map_or(Offset::Beginning, Offset::Offset);
        tpl.add_partition_offset(dlq, p, start)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut letters = Vec::new();
    let mut report = Report::default();
    let mut last_record = Instant::now();
    while last_record.elapsed() < IDLE_END {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_record = Instant::now();
                if to.is_some_and(|t| m.offset() >= t) {
                    continue;
                }
                report.read += 1;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .to_string(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                letters.push(Letter {
                    partition: m.partition(),
                    offset: m.offset(),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            Some(Err(e)) => return Err(format!("reading {dlq} failed: {e}")),
            None => {}
        }
    }
    Ok((letters, report))
}
