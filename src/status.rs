//! `chbridge status`: what each partition of the group is doing, read from
//! Kafka and ClickHouse alone, so that it answers the same whether bridges
//! run or not, and needs no address of any of them.
//!
//! Per partition: the group's committed offset, the end offset, the lag, the
//! age of the oldest record waiting (the one at the committed offset), its
//! owner from the group's description, and a state:
//! - `ok`: nothing waits, or the oldest record waits less than `stall_timeout`;
//! - `behind`: the oldest record waits longer, but the commit moved while we
//!   watched (a backlog being worked off);
//! - `stalled`: the oldest record waits longer and the commit did not move
//!   (no bridge runs, or one is stuck): the command exits 2.
//!
//! The end offset is read, not asked: some Kafka-compatible brokers answer
//! ListOffsets(LATEST) wrongly (tansu gives the last batch's base offset + 1),
//! so chbridge fetches from the reported end up to the partition's EOF, which
//! the fetch responses' high watermark decides. On Kafka that reads nothing.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::Consumer;

use crate::kafka::refusal::{self, WatchedConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Config, OffsetReset};
use crate::kafka::group::{self, Group};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Behind,
    Stalled,
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// None: the group never committed this partition.
    pub committed: Option<i64>,
    /// None: the end could not be read before the timeout.
    pub end: Option<i64>,
    pub lag: Option<i64>,
    /// Milliseconds since the Kafka timestamp of the record at the committed
    /// offset (the oldest one waiting); None when nothing waits.
    pub oldest_waiting_ms: Option<i64>,
    pub owner: Option<String>,
    pub state: State,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    pub table: String,
    /// Unix seconds of the last insert of this group ClickHouse logged.
    pub last_insert: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub group: String,
    /// The coordinator's view; None when the broker did not describe it.
    pub group_state: Option<String>,
    pub members: Vec<group::Member>,
    pub partitions: Vec<PartitionStatus>,
    pub tables: Vec<TableStatus>,
    /// What could not be read, and why.
    pub notes: Vec<String>,
}

impl State {
    /// As in `--json` (serde's lowercase names).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Behind => "behind",
            State::Stalled => "stalled",
            State::Unknown => "unknown",
        }
    }
}

impl Status {
    pub fn stalled(&self) -> usize {
        self.count(State::Stalled)
    }

    pub fn count(&self, state: State) -> usize {
        self.partitions.iter().filter(|p| p.state == state).count()
    }
}

/// Reads the whole status. Kafka errors that leave nothing to show are
/// returned; partial failures become notes.
pub async fn status(config: &Config, timeout: Duration) -> Result<Status, String> {
    let cfg = config.clone();
    let kafka = tokio::task::spawn_blocking(move || read_kafka(&cfg, timeout))
        .await
        .map_err(|e| format!("status reader failed: {e}"))??;
    let (partitions, group, mut notes) = kafka;
    let (tables, note) = last_inserts(config, timeout).await;
    notes.extend(note);
    let (group_state, members) = match group {
        Ok(g) => (Some(g.state), g.members),
        Err(e) => {
            notes.push(e);
            (None, Vec::new())
        }
    };
    Ok(Status {
        group: config.kafka.group_id.clone(),
        group_state,
        members,
        partitions,
        tables,
        notes,
    })
}

type KafkaView = (Vec<PartitionStatus>, Result<Group, String>, Vec<String>);

fn read_kafka(config: &Config, timeout: Duration) -> Result<KafkaView, String> {
    let deadline = Instant::now()
        .checked_add(timeout)
        .ok_or("--timeout is too large")?;
    let mut cc = crate::kafka::client_config(&config.kafka);
    // Never take a running pod's static identity, never join, never commit:
    // assign() reads without joining the group.
    cc.remove("group.instance.id");
    cc.set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("statistics.interval.ms", "0")
        .set("client.id", "chbridge-status");
    let consumer = refusal::watched(&cc, &config.kafka)?;
    refusal::explain(&consumer, read_with(&consumer, config, deadline))
}

fn read_with(
    consumer: &WatchedConsumer,
    config: &Config,
    deadline: Instant,
) -> Result<KafkaView, String> {
    let mut notes = Vec::new();

    // Partitions of every topic the routes read.
    let mut tpl = TopicPartitionList::new();
    for topic in config.topics() {
        let md = consumer
            .fetch_metadata(Some(&topic), left(deadline))
            .map_err(|e| format!("cannot read the metadata of topic {topic}: {e}"))?;
        match md.topics().first() {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                for p in t.partitions() {
                    tpl.add_partition(&topic, p.id());
                }
            }
            _ => notes.push(format!("topic {topic} does not exist on the brokers")),
        }
    }
    let committed = consumer
        .committed_offsets(tpl.clone(), left(deadline))
        .map_err(|e| {
            format!(
                "cannot read the committed offsets of group {}: {e}",
                config.kafka.group_id
            )
        })?;
    let mut unreadable = HashSet::new();
    for e in committed.elements() {
        if let Err(err) = e.error() {
            notes.push(format!(
                "{}[{}]: cannot read the committed offset: {err}",
                e.topic(),
                e.partition()
            ));
            unreadable.insert((e.topic().to_string(), e.partition()));
        }
    }
    let mut parts: Vec<PartitionStatus> = committed
        .elements()
        .iter()
        .map(|e| PartitionStatus {
            topic: e.topic().to_string(),
            partition: e.partition(),
            committed: match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            },
            end: None,
            lag: None,
            oldest_waiting_ms: None,
            owner: None,
            state: State::Unknown,
        })
        .collect();

    // One topic at a time: librdkafka's end-of-partition event names only
    // the partition number.
    let mut oldest: HashMap<(String, i32), i64> = HashMap::new();
    let mut topics: Vec<String> = parts.iter().map(|p| p.topic.clone()).collect();
    topics.dedup();
    for topic in &topics {
        // A partition whose commit could not be read stays unknown: counting
        // its lag from the start would be wrong.
        let of_topic: Vec<&mut PartitionStatus> = parts
            .iter_mut()
            .filter(|p| &p.topic == topic && !unreadable.contains(&(p.topic.clone(), p.partition)))
            .collect();
        if let Err(e) = read_ends(
            consumer,
            config,
            of_topic,
            &mut oldest,
            deadline,
            &mut notes,
        ) {
            notes.push(format!("topic {topic}: {e}"));
        }
    }

    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for p in &mut parts {
        if let Some(ts) = oldest.get(&(p.topic.clone(), p.partition)) {
            if p.lag.is_some_and(|l| l > 0) {
                p.oldest_waiting_ms = Some(now_ms.saturating_sub(*ts).max(0));
            }
        }
    }

    let group = group::describe(consumer, &config.kafka.group_id, left(deadline));
    if let Ok(g) = &group {
        let owners = g.owners();
        for p in &mut parts {
            p.owner = owners.get(&(p.topic.clone(), p.partition)).cloned();
        }
    }

    judge(consumer, config, &mut parts);
    Ok((parts, group, notes))
}

/// Fills `end` and `lag` of one topic's partitions, and the timestamp of the
/// record at each committed offset into `oldest`. Problems of one partition
/// become notes; the others are still read.
fn read_ends(
    consumer: &WatchedConsumer,
    config: &Config,
    mut parts: Vec<&mut PartitionStatus>,
    oldest: &mut HashMap<(String, i32), i64>,
    deadline: Instant,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let Some(topic) = parts.first().map(|p| p.topic.clone()) else {
        return Ok(());
    };
    // Where the group reads next (clamped into the log), and the reported end.
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut first: HashMap<i32, i64> = HashMap::new();
    let mut reported: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in parts.iter() {
        let (low, high) = match consumer.fetch_watermarks(&p.topic, p.partition, left(deadline)) {
            Ok(w) => w,
            Err(e) => {
                notes.push(format!(
                    "{topic}[{}]: cannot read its offsets: {e}",
                    p.partition
                ));
                continue;
            }
        };
        let at = match (p.committed, config.kafka.auto_offset_reset) {
            (Some(c), _) if c < low => {
                notes.push(format!(
                    "{topic}[{}]: the committed offset {c} is below the log start {low}: \
                     retention deleted records the group never read",
                    p.partition
                ));
                low
            }
            // Not capped at the reported end: some brokers report less than
            // the real one. Beyond the real end (a recreated topic), the
            // fetch fails and the partition is reported unknown with the error.
            (Some(c), _) => c,
            (None, OffsetReset::Earliest) => low,
            (None, OffsetReset::Latest) => high,
        };
        next.insert(p.partition, at);
        first.insert(p.partition, at);
        reported.insert(p.partition, high);
        tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(at))
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut seen: HashSet<i32> = HashSet::new();
    let mut errors = 0;
    while ends.len() < next.len() && Instant::now() < deadline && errors < 10 {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let p = m.partition();
                if ends.contains_key(&p) {
                    continue;
                }
                if seen.insert(p) {
                    if let Some(ts) = m.timestamp().to_millis() {
                        oldest.insert((topic.clone(), p), ts);
                    }
                }
                let mut at = m.offset() + 1;
                // Skip what lies below the reported end: only the records
                // beyond it (none on Kafka) need reading to find the real end.
                let high = reported.get(&p).copied().unwrap_or(at);
                if high > at
                    && consumer
                        .seek(&topic, p, Offset::Offset(high), left(deadline))
                        .is_ok()
                {
                    at = high;
                }
                next.insert(p, at);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(&at) = next.get(&p) {
                    ends.insert(p, at);
                }
            }
            Some(Err(e)) => {
                errors += 1;
                notes.push(format!("{topic}: while reading to the end: {e}"));
            }
        }
    }
    let _ = consumer.unassign();
    let unread = next.len() - ends.len();
    if unread > 0 && Instant::now() >= deadline {
        notes.push(format!(
            "{topic}: the end of {unread} partition(s) was not reached within --timeout"
        ));
    }
    for p in parts.iter_mut() {
        p.end = ends.get(&p.partition).copied();
        // Never committed: the group would start where the reset points. Below
        // the log start: the deleted records will never be read.
        let from = first.get(&p.partition).copied();
        p.lag = p.end.zip(from).map(|(e, c)| (e - c).max(0));
    }
    Ok(())
}

/// Sets each partition's state. Partitions whose oldest record waits longer
/// than `stall_timeout` are watched: a commit that moves means a backlog
/// being worked off, not a stall. The watch lasts two commit intervals or two
/// batch waits, whichever is longer, plus 5 s for an insert, at most 30 s.
fn judge(consumer: &WatchedConsumer, config: &Config, parts: &mut [PartitionStatus]) {
    let stall = i64::try_from(config.stall_timeout.as_millis()).unwrap_or(i64::MAX);
    let mut suspects = TopicPartitionList::new();
    for p in parts.iter_mut() {
        p.state = match (p.lag, p.oldest_waiting_ms) {
            (None, _) => State::Unknown,
            (Some(0), _) => State::Ok,
            (Some(_), Some(age)) if age > stall => {
                suspects.add_partition(&p.topic, p.partition);
                State::Stalled
            }
            (Some(_), Some(_)) => State::Ok,
            // Lag but no record read at the committed offset: the read timed out.
            (Some(_), None) => State::Unknown,
        };
    }
    if suspects.count() == 0 {
        return;
    }
    let watch = config
        .commit
        .interval
        .max(config.batch.max_wait)
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(5))
        .min(Duration::from_secs(30));
    let until = Instant::now() + watch;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500).min(until - Instant::now()));
        let Ok(now) = consumer.committed_offsets(suspects.clone(), Duration::from_secs(5)) else {
            continue;
        };
        for e in now.elements() {
            let Offset::Offset(o) = e.offset() else {
                continue;
            };
            if let Some(p) = parts
                .iter_mut()
                .find(|p| p.topic == e.topic() && p.partition == e.partition())
            {
                // A first commit, or one beyond the last seen, is progress.
                if p.committed.is_none_or(|c| o > c) {
                    p.state = State::Behind;
                }
            }
        }
    }
}

fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

/// Last insert per target table, from ClickHouse's query log (inserts carry
/// the group in `log_comment`). Servers without a query log answer nothing.
async fn last_inserts(config: &Config, timeout: Duration) -> (Vec<TableStatus>, Option<String>) {
    let mut tables: Vec<String> = (0..config.routes.len())
        .map(|i| {
            let (db, t) = config.route_table(i);
            format!("{db}.{t}")
        })
        .collect();
    tables.sort();
    tables.dedup();
    let unknown = |tables: &[String]| {
        tables
            .iter()
            .map(|t| TableStatus {
                table: t.clone(),
                last_insert: None,
            })
            .collect()
    };
    let client = match crate::sink::client(&config.clickhouse) {
        Ok(c) => c,
        Err(e) => return (unknown(&tables), Some(format!("clickhouse: {e}"))),
    };
    let query = client
        .query(
            "SELECT t, toInt64(toUnixTimestamp(max(event_time))) FROM system.query_log \
             ARRAY JOIN tables AS t \
             WHERE event_date >= yesterday() AND type = 'QueryFinish' \
             AND query_kind = 'Insert' AND log_comment = ? AND has(?, t) GROUP BY t",
        )
        .bind(crate::sink::log_comment(&config.kafka.group_id))
        .bind(&tables);
    let rows = tokio::time::timeout(
        timeout.min(config.clickhouse.insert_timeout),
        query.fetch_all::<(String, i64)>(),
    )
    .await;
    match rows {
        Ok(Ok(rows)) => {
            let found: HashMap<String, i64> = rows.into_iter().collect();
            let out = tables
                .iter()
                .map(|t| TableStatus {
                    table: t.clone(),
                    last_insert: found.get(t).copied(),
                })
                .collect();
            (out, None)
        }
        Ok(Err(e)) => (
            unknown(&tables),
            Some(format!(
                "last insert times unknown: ClickHouse's system.query_log could not be read ({e})"
            )),
        ),
        Err(_) => (
            unknown(&tables),
            Some("last insert times unknown: ClickHouse did not answer in time".to_string()),
        ),
    }
}

/// The table people read.
pub fn render(s: &Status, now_unix: i64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let members = match &s.group_state {
        None => "the broker did not describe the group".to_string(),
        Some(state) if s.members.is_empty() => format!("{state}, no members: no bridge runs"),
        Some(state) => format!(
            "{state}, {} member(s): {}",
            s.members.len(),
            s.members
                .iter()
                .map(group::Member::label)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let _ = writeln!(out, "group {}: {members}", s.group);
    let header = [
        "TOPIC",
        "PARTITION",
        "COMMITTED",
        "END",
        "LAG",
        "OLDEST WAITING",
        "OWNER",
        "STATE",
    ];
    let dash = || "-".to_string();
    let rows: Vec<[String; 8]> = s
        .partitions
        .iter()
        .map(|p| {
            [
                p.topic.clone(),
                p.partition.to_string(),
                p.committed.map_or_else(|| "none".into(), |v| v.to_string()),
                p.end.map_or_else(dash, |v| v.to_string()),
                p.lag.map_or_else(dash, |v| v.to_string()),
                p.oldest_waiting_ms
                    .map_or_else(dash, |ms| human(Duration::from_millis(ms as u64))),
                p.owner.clone().unwrap_or_else(dash),
                p.state.as_str().to_string(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            let _ = write!(l, "{}{c:<w$}", if i == 0 { "" } else { "  " });
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(&header.map(String::from)));
    for r in &rows {
        let _ = writeln!(out, "{}", line(r));
    }
    let total: i64 = s.partitions.iter().filter_map(|p| p.lag).sum();
    let _ = writeln!(
        out,
        "total lag {total} over {} partition(s); {} stalled",
        s.partitions.len(),
        s.stalled()
    );
    for t in &s.tables {
        let when = match t.last_insert {
            Some(at) => format!(
                "last insert {} ago",
                human(Duration::from_secs((now_unix - at).max(0) as u64))
            ),
            None => "no insert by this group in ClickHouse's query log".to_string(),
        };
        let _ = writeln!(out, "table {}: {when}", t.table);
    }
    for n in &s.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

/// 950ms, 42s, 6m12s, 3h05m.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(
        topic: &str,
        p: i32,
        committed: Option<i64>,
        end: i64,
        state: State,
    ) -> PartitionStatus {
        PartitionStatus {
            topic: topic.into(),
            partition: p,
            committed,
            end: Some(end),
            lag: Some(end - committed.unwrap_or(0)),
            oldest_waiting_ms: (end > committed.unwrap_or(0)).then_some(372_000),
            owner: None,
            state,
        }
    }

    #[test]
    fn renders_a_table_with_totals_and_notes() {
        let s = Status {
            group: "g".into(),
            group_state: Some("Empty".into()),
            members: vec![],
            partitions: vec![
                part("events", 0, Some(10), 10, State::Ok),
                part("events", 1, None, 25, State::Stalled),
            ],
            tables: vec![TableStatus {
                table: "default.events".into(),
                last_insert: Some(1_000),
            }],
            notes: vec!["something".into()],
        };
        let text = render(&s, 1_042);
        assert!(
            text.starts_with("group g: Empty, no members: no bridge runs\n"),
            "{text}"
        );
        assert!(
            text.contains("events  0          10         10   0    -               -      ok"),
            "{text}"
        );
        assert!(
            text.contains("events  1          none       25   25   6m12s           -      stalled"),
            "{text}"
        );
        assert!(
            text.contains("total lag 25 over 2 partition(s); 1 stalled"),
            "{text}"
        );
        assert!(
            text.contains("table default.events: last insert 42s ago"),
            "{text}"
        );
        assert!(text.contains("note: something"), "{text}");
        assert_eq!(s.stalled(), 1);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(950)), "950ms");
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(372)), "6m12s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 300)), "3h05m");
    }
}
