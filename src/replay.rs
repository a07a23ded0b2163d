//! `chbridge dlq replay`: after a fix (of the table, the mapping or the
//! producer's data), inserts a route's dead letters into the route's table.
//!
//! Records are read from the dead-letter topic without a consumer group and
//! decoded with the route's decoder as the bridge would have: the original
//! key, timestamp and headers (chbridge's own `chbridge.*` headers removed)
//! and the origin topic, partition and offset from the headers. Only dead
//! letters the route itself wrote (header `chbridge.table` naming its table,
//! origin topic among its topics) are taken. The topic is streamed: rows are
//! inserted every `batch.max_rows`, so memory does not grow with the topic.
//! It is read up to the end offsets it had when the replay started (and
//! whatever else arrives meanwhile); a partition that stops short of its end
//! is an error, not a finished replay. Each insert carries a deduplication
//! token naming the group, the dead-letter topic, the table and its
//! dead-letter offsets, so replaying the same range twice into a table with
//! a deduplication window inserts nothing twice, and two routes' replays
//! never take each other for duplicates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::Consumer as _;

use crate::kafka::refusal::{self, WatchedConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::decode::{self, Decoder};
use crate::kafka::dead_letter::{H_OFFSET, H_PARTITION, H_TABLE, H_TIMESTAMP, H_TOPIC};
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

/// A partition that yields no record for this long before its end offset
/// is reached makes the replay fail: the broker is down or slow, and a
/// replay that stopped there would look complete.
const STALL: Duration = Duration::from_secs(30);

/// Once every partition is read to the end offset it had at the start,
/// records that still arrive within this time are replayed too (new dead
/// letters; a broker that reported its end offsets short).
const TAIL: Duration = Duration::from_secs(1);

/// The deduplication token of dead letters `first..=last` of partition
/// `partition` of `dlq`, replayed by `group` into `table`.
pub fn token(group: &str, dlq: &str, table: &str, partition: i32, first: i64, last: i64) -> String {
    format!("chbridge-replay|{group}|{dlq}|{table}|{partition}|{first}-{last}")
}

/// Where reading the dead-letter topic stands.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    Reading,
    Done,
    /// Stuck before the end: which partitions, where, and their ends.
    Stalled(String),
}

/// `ends`: per partition, the end offset to read to; `next`: one past the
/// last offset read; `idle`: time since the last record.
fn progress(ends: &BTreeMap<i32, i64>, next: &BTreeMap<i32, i64>, idle: Duration) -> Progress {
    let behind: Vec<String> = ends
        .iter()
        .filter(|(p, end)| next.get(*p).is_none_or(|n| n < *end))
        .map(|(p, end)| format!("[{p}] at {} of {end}", next.get(p).copied().unwrap_or(-1)))
        .collect();
    match (behind.is_empty(), idle) {
        (true, idle) if idle >= TAIL => Progress::Done,
        (false, idle) if idle >= STALL => Progress::Stalled(behind.join(", ")),
        _ => Progress::Reading,
    }
}

/// The rows of the dead letters of one dead-letter partition not inserted yet.
struct Pending {
    body: Vec<u8>,
    rows: u64,
    first: i64,
    last: i64,
}

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
    let client = crate::sink::client(&config.clickhouse)?;
    let (db, t) = config.route_table(range.route);
    let schema = crate::schema::load_table(&client, &db, &t)
        .await
        .map_err(|e| e.to_string())?;
    let table = schema.to_string();
    let registry = crate::pipeline::registry(config).map_err(|e| e.to_string())?;
    let decoder = decode::decoder_for(route, &schema, registry.as_ref())?;
    let mut c = crate::kafka::client_config(&config.kafka);
    c.set(
        "group.id",
        format!("{}.chbridge-replay", config.kafka.group_id),
    );
    let consumer = refusal::watched(&c, &config.kafka)?;
    let job = Job {
        writer: ClickHouseWriter::new(&config.clickhouse, &config.kafka.group_id)?,
        sql: schema.insert_sql(),
        table,
        topics: route.topics.clone(),
        group: config.kafka.group_id.clone(),
        dlq,
        max_rows: config.batch.max_rows.max(1) as u64,
        runtime: tokio::runtime::Handle::current(),
    };
    let (partition, from, to) = (range.partition, range.from, range.to);
    // Reading and decoding are blocking librdkafka work: off the async workers.
    tokio::task::spawn_blocking(move || {
        let result = job.run(&consumer, decoder, partition, from, to);
        refusal::explain(&consumer, result)
    })
    .await
    .map_err(|e| format!("reading the dead-letter topic failed: {e}"))?
}

struct Job {
    writer: ClickHouseWriter,
    sql: String,
    table: String,
    topics: Vec<String>,
    group: String,
    dlq: String,
    max_rows: u64,
    runtime: tokio::runtime::Handle,
}

impl Job {
    fn run(
        &self,
        consumer: &WatchedConsumer,
        mut decoder: Box<dyn Decoder>,
        partition: Option<i32>,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<Report, String> {
        let dlq = self.dlq.as_str();
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
        // Per partition: the end to read to (exclusive), and how far it got.
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in partitions
            .into_iter()
            .filter(|p| partition.is_none_or(|x| x == *p))
        {
            let (low, high) = consumer
                .fetch_watermarks(dlq, p, Duration::from_secs(10))
                .map_err(|e| format!("cannot read the end offsets of {dlq}[{p}]: {e}"))?;
            let start = from.unwrap_or(low).max(low);
            let end = to.map_or(high, |t| t.min(high));
            if start < end {
                ends.insert(p, end);
                tpl.add_partition_offset(dlq, p, Offset::Offset(start))
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut report = Report::default();
        if ends.is_empty() {
            return Ok(report);
        }
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let mut pending: BTreeMap<i32, Pending> = BTreeMap::new();
        let mut last_record = Instant::now();
        loop {
            match progress(&ends, &next, last_record.elapsed()) {
                Progress::Reading => {}
                Progress::Done => break,
                Progress::Stalled(behind) => {
                    return Err(format!(
                        "no dead letter arrived from {dlq} for {}s before its end was reached \
                         ({behind}); {} rows were inserted up to there, and replaying again \
                         inserts nothing twice",
                        STALL.as_secs(),
                        report.inserted
                    ))
                }
            }
            let m = match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(e)) => return Err(format!("reading {dlq} failed: {e}")),
                Some(Ok(m)) => m,
            };
            last_record = Instant::now();
            next.insert(m.partition(), m.offset() + 1);
            if to.is_some_and(|t| m.offset() >= t) {
                continue;
            }
            report.read += 1;
            let header = |name: &str| -> String {
                m.headers()
                    .and_then(|h| h.iter().find(|x| x.key == name))
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            let origin_topic = header(H_TOPIC);
            if header(H_TABLE) != self.table || !self.topics.contains(&origin_topic) {
                report.other += 1;
                continue;
            }
            // The record as it was: its own headers, key and timestamp.
            let mut own = OwnedHeaders::new();
            if let Some(h) = m.headers() {
                for x in h.iter().filter(|x| !x.key.starts_with("chbridge.")) {
                    own = own.insert(Header {
                        key: x.key,
                        value: x.value,
                    });
                }
            }
            let rec = crate::kafka::Record {
                topic: &origin_topic,
                partition: header(H_PARTITION).parse().unwrap_or(m.partition()),
                offset: header(H_OFFSET).parse().unwrap_or(m.offset()),
                timestamp_ms: header(H_TIMESTAMP)
                    .parse()
                    .ok()
                    .or_else(|| m.timestamp().to_millis()),
                key: m.key(),
                value: m.payload(),
                headers: Some(own.as_borrowed()),
            };
            let p = pending.entry(m.partition()).or_insert_with(|| Pending {
                body: Vec::new(),
                rows: 0,
                first: m.offset(),
                last: m.offset(),
            });
            let before = p.body.len();
            match decoder.decode(&rec, &mut p.body) {
                Ok(()) => {
                    p.rows += 1;
                    p.last = m.offset();
                }
                Err(e) => {
                    p.body.truncate(before);
                    report.failing.push((
                        m.partition(),
                        m.offset(),
                        format!(
                            "{origin_topic}[{}] at offset {}",
                            header(H_PARTITION),
                            header(H_OFFSET)
                        ),
                        e.to_string(),
                    ));
                }
            }
            if p.rows >= self.max_rows {
                self.flush(m.partition(), &mut pending, &mut report)?;
            }
        }
        let partitions: Vec<i32> = pending.keys().copied().collect();
        for p in partitions {
            self.flush(p, &mut pending, &mut report)?;
        }
        Ok(report)
    }

    /// Inserts what partition `p` of the dead-letter topic has pending. One
    /// insert never spans two dead-letter partitions: its token names an
    /// offset range of one, so the same range replayed again gets the same
    /// token whatever order the partitions were read in.
    fn flush(
        &self,
        p: i32,
        pending: &mut BTreeMap<i32, Pending>,
        report: &mut Report,
    ) -> Result<(), String> {
        let Some(batch) = pending.remove(&p) else {
            return Ok(());
        };
        if batch.rows == 0 {
            return Ok(());
        }
        let token = token(
            &self.group,
            &self.dlq,
            &self.table,
            p,
            batch.first,
            batch.last,
        );
        let body = Bytes::from(batch.body);
        self.runtime
            .block_on(self.writer.insert(&self.sql, body, Some(&token)))
            .map_err(|e| {
                format!(
                    "inserting replayed rows into {} failed: {e}; {} rows were inserted before, \
                     and replaying again inserts nothing twice",
                    self.table, report.inserted
                )
            })?;
        report.inserted += batch.rows;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 12 of the delivery review: the token ignored the dead-letter topic
    /// and the group, so a second route's replay into the same table was
    /// taken for a duplicate of the first and silently dropped.
    #[test]
    fn tokens_tell_routes_groups_and_ranges_apart() {
        let a = token("g", "dlq_a", "db.t", 0, 0, 9);
        assert_eq!(a, "chbridge-replay|g|dlq_a|db.t|0|0-9");
        assert_ne!(a, token("g", "dlq_b", "db.t", 0, 0, 9));
        assert_ne!(a, token("h", "dlq_a", "db.t", 0, 0, 9));
        assert_ne!(a, token("g", "dlq_a", "db.t", 1, 0, 9));
        assert_ne!(a, token("g", "dlq_a", "db.t", 0, 0, 8));
    }

    /// Item 12: a pause of the broker is not the end of the topic. The
    /// replay ends once every partition is read to the end it had, and
    /// fails (it does not report success) when records stop coming first.
    #[test]
    fn a_replay_ends_at_the_end_offsets_and_fails_when_reading_stalls_before() {
        let ends = BTreeMap::from([(0, 100), (1, 50)]);
        let mut next = BTreeMap::from([(0, 100)]);
        let s = Duration::from_secs;
        // Partition 1 not read yet: three idle seconds are no end.
        assert_eq!(progress(&ends, &next, s(3)), Progress::Reading);
        assert_eq!(
            progress(&ends, &next, STALL),
            Progress::Stalled("[1] at -1 of 50".into())
        );
        next.insert(1, 50);
        assert_eq!(progress(&ends, &next, Duration::ZERO), Progress::Reading);
        assert_eq!(progress(&ends, &next, TAIL), Progress::Done);
    }
}
