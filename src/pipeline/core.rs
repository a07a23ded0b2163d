//! The pipeline's state on the consumer thread: routing each record to its
//! tables, the open batch of every table, and the offsets that may be committed.
//!
//! Records flow: message -> route(s) -> decoder -> the table's open batch ->
//! (full or old) -> the table's sink task -> acknowledgement back here ->
//! offsets released -> commit. Offsets travel with the data as the batch's
//! segments; only an acknowledgement, or a record skipped by policy, releases
//! them (see `kafka::offsets` for the rule itself). A table whose columns
//! changed reads its unacknowledged records again (`pipeline::rewind`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OnError};
use crate::decode::{RecordError, RecordErrorKind};
use crate::exactly_once::{BatchRange, RangeStore, Split};
use crate::kafka::control::{ConsumerControl, TopicPartition};
use crate::kafka::dead_letter::{DeadLetters, Failure, Ticket};
use crate::kafka::offsets::{FastMap, FastSet, OffsetTracker, Ownership, PartitionKey, Segment};
use crate::kafka::{OwnedRecord, Record};
use crate::observability::Metrics;
use crate::schema::drift::{History, Versioned};
use crate::sink::{InsertError, ReadyBatch, RowOrigin, SinkEvent, ROW_ORIGIN_BYTES};

use super::rewind::{Admit, Reread};
use super::route::FailureRate;
pub use super::route::RouteState;
use super::PipelineError;

/// Limits the core enforces, taken from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
    pub commit_interval: Duration,
    pub max_buffered_bytes: usize,
    pub drain_timeout: Duration,
    pub stall_timeout: Duration,
}

impl Limits {
    pub fn from_config(c: &Config) -> Limits {
        Limits {
            max_rows: c.batch.max_rows,
            max_bytes: c.batch.max_bytes.as_u64() as usize,
            max_wait: c.batch.max_wait,
            commit_interval: c.commit.interval,
            max_buffered_bytes: c.max_buffered_bytes.as_u64() as usize,
            drain_timeout: c.shutdown_timeout,
            stall_timeout: c.stall_timeout,
        }
    }
}

/// The part of a reloaded configuration the consumer thread applies: batch
/// limits and, per route, its error policy.
#[derive(Debug, Clone)]
pub struct Reload {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
    pub routes: Vec<(OnError, Option<String>, Duration, f64)>,
}

impl Reload {
    pub fn of(c: &Config) -> Reload {
        Reload {
            max_rows: c.batch.max_rows,
            max_bytes: c.batch.max_bytes.as_u64() as usize,
            max_wait: c.batch.max_wait,
            routes: c
                .routes
                .iter()
                .map(|r| {
                    (
                        r.on_error,
                        r.dead_letter_topic.clone(),
                        r.failed_window,
                        r.max_failed_ratio,
                    )
                })
                .collect(),
        }
    }
}

/// What the consumer loop does after a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on polling.
    Go,
    /// Go on after the housekeeping: a table reached its share of the
    /// memory budget, so its batch closes and its topics pause now.
    Service,
    /// Stop taking records: drain, commit what was acknowledged, exit.
    Stop,
}

/// Why placing a record stops short.
enum Halt {
    /// The bridge stops with this error; the record is taken back.
    Stop(PipelineError),
    /// The route's topic stops (too many failures); the record is taken back.
    StopTopic(PipelineError),
    /// A shutdown was asked for while the record waited for ClickHouse.
    Quit,
}

pub struct TopicState {
    pub name: String,
    /// Indexes into `Core::routes`.
    pub routes: Vec<usize>,
    consumed: IntCounter,
}

/// A batch being filled.
struct OpenBatch {
    /// Exactly-once: the one partition the batch holds. At-least-once: None.
    partition: Option<PartitionKey>,
    body: Vec<u8>,
    rows: Vec<RowOrigin>,
    segments: Vec<Segment>,
    opened: Instant,
    oldest_timestamp_ms: Option<i64>,
    /// Exactly-once: the range covered so far (records that failed count too).
    first: i64,
    last: i64,
    /// Exactly-once: a range a previous owner recorded, cut at exactly its end.
    replay_last: Option<i64>,
    schema_version: u64,
    /// What the batch counts for in its table's `buffered` (body and rows).
    accounted: usize,
}

/// Exactly-once: what the state table says of a (table, partition) newly
/// assigned, until the first records read settle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// The latest recorded range.
    Recorded { first: i64, last: i64 },
    /// Records up to here are in the table already.
    SkipThrough(i64),
    /// Records below `first` are in the table; [first, last] is cut as one
    /// batch and inserted with the recorded range's token.
    Replay { first: i64, last: i64 },
}

/// What to do with a record for one table, exactly-once.
enum Step {
    Skip,
    Place { replay: Option<(i64, i64)> },
}

/// A record that failed for a table, waiting for a check of the table's
/// columns before it is judged: its offset is held, and the table's batches
/// holding later records of its partition are not sent meanwhile (exactly-
/// once: no recorded range may claim it; `on_error = "stop"`: nothing after
/// it may land).
struct Judging {
    route: usize,
    key: PartitionKey,
    generation: u64,
    record: OwnedRecord,
    error: RecordError,
    /// The schema version the record was decoded for.
    version: u64,
    hold: Segment,
    /// What the copy counts for in the table's budget.
    bytes: usize,
    /// Judged: the bridge (or the route's topic) stopped on it. It stays,
    /// so that nothing after it is sent.
    stopped: bool,
}

/// A check of a table's columns the core asked for.
#[derive(Default)]
struct SchemaCheck {
    /// When the last check answered (or failed).
    last: Option<Instant>,
    /// Asked for and not answered yet: per partition, one past the highest
    /// offset read when it was asked.
    pending: Option<FastMap<PartitionKey, i64>>,
}

pub struct TableState {
    pub name: String,
    /// At-least-once: at most one batch. Exactly-once: one per partition.
    open: Vec<OpenBatch>,
    tx: mpsc::Sender<ReadyBatch>,
    /// Closed batches the sink's queue had no room for yet.
    waiting: VecDeque<ReadyBatch>,
    /// Batches handed to the sink that it has not answered for.
    in_sink: usize,
    /// Size to pre-allocate for the next batch (the last batch's size).
    capacity_hint: usize,
    /// What this table holds in memory: its open, waiting and in-flight
    /// batches (as accounted when they grew) and its dead letters the broker
    /// has not acknowledged. The only place the budget is counted.
    buffered: usize,
    recovery: FastMap<PartitionKey, Recovery>,
    /// The schema version the routes' decoders encode for, and where the
    /// sink announces a new one.
    schema_version: u64,
    schema_feed: Option<watch::Receiver<Versioned>>,
    schema_history: Option<Arc<History>>,
    /// Records read again for this table (see `pipeline::rewind`).
    reread: Reread,
    /// Per partition: records below this offset were read before the last
    /// check of the table's columns, so a failure of theirs is judged
    /// against columns read after them.
    checked: FastMap<PartitionKey, i64>,
    check: SchemaCheck,
    /// Records whose failure a table change could explain, waiting for a
    /// check of the columns before they are judged, in the order they failed.
    judging: Vec<Judging>,
    /// Exactly-once: how the latest recorded range of a partition was split,
    /// for its replay (from the state table, or from a stale batch).
    replay_splits: FastMap<PartitionKey, Vec<Split>>,
    /// Exactly-once: per partition, offsets whose dead letters the broker
    /// has not acknowledged. A batch whose range reaches one is not sent:
    /// once its range is recorded, recovery would skip the record for good.
    dead_letters: FastMap<PartitionKey, BTreeMap<i64, u32>>,
}

impl TableState {
    pub fn new(name: String, tx: mpsc::Sender<ReadyBatch>) -> TableState {
        TableState {
            name,
            open: Vec::new(),
            tx,
            waiting: VecDeque::new(),
            in_sink: 0,
            capacity_hint: 64 * 1024,
            buffered: 0,
            recovery: FastMap::default(),
            schema_version: 0,
            schema_feed: None,
            schema_history: None,
            reread: Reread::default(),
            checked: FastMap::default(),
            check: SchemaCheck::default(),
            judging: Vec::new(),
            replay_splits: FastMap::default(),
            dead_letters: FastMap::default(),
        }
    }

    /// Follows the table's schema as its sink sees it (schema drift).
    pub fn with_schema_feed(
        mut self,
        feed: watch::Receiver<Versioned>,
        history: Arc<History>,
    ) -> TableState {
        self.schema_version = feed.borrow().version;
        self.schema_feed = Some(feed);
        self.schema_history = Some(history);
        self
    }

    fn batch_index(&self, partition: Option<PartitionKey>) -> Option<usize> {
        self.open.iter().position(|b| b.partition == partition)
    }

    /// Whether a failure of record `offset` of `key` was read before the
    /// last check of the table's columns (a table that cannot be checked is
    /// always judged as it is).
    fn covers(&self, key: PartitionKey, offset: i64) -> bool {
        self.schema_history.is_none() || self.checked.get(&key).is_some_and(|&h| offset < h)
    }

    /// Whether `batch` must wait: exactly-once, for a dead letter below its
    /// end; in both modes, for the judgement of a failed record of one of
    /// its partitions below one of its rows.
    fn gated(&self, batch: &ReadyBatch) -> bool {
        let dead_letter = batch.range.as_ref().is_some_and(|r| {
            batch.segments.iter().any(|s| {
                self.dead_letters
                    .get(&s.key)
                    .and_then(|m| m.keys().next())
                    .is_some_and(|&o| o <= r.last)
            })
        });
        dead_letter
            || self.judging.iter().any(|j| {
                batch
                    .rows
                    .iter()
                    .any(|r| r.key == j.key && r.offset > j.record.offset)
            })
    }

    /// Whether an open batch replays a recorded range of `key` not yet read to its end.
    fn replaying(&self, key: PartitionKey) -> bool {
        self.open
            .iter()
            .any(|b| b.partition == Some(key) && b.replay_last.is_some())
    }

    fn recovery_step(&mut self, key: PartitionKey, offset: i64, topic: &str) -> Step {
        loop {
            let Some(r) = self.recovery.get(&key).copied() else {
                return Step::Place { replay: None };
            };
            match r {
                Recovery::Recorded { first, last } => {
                    // The first record read is where the group's commit
                    // stands; a commit past `first` means that batch was
                    // acknowledged (the commit rule), so all of it is in.
                    let next = if offset > first {
                        tracing::info!(table = %self.name, topic, partition = key.partition, first, last, resume_at = offset,
                            "exactly-once: the last recorded batch is in the table; skipping what it covers");
                        Recovery::SkipThrough(last)
                    } else {
                        if offset < first {
                            tracing::info!(table = %self.name, topic, partition = key.partition, from = offset, to = first,
                                "exactly-once: records below the last recorded batch are in the table already and are skipped \
                                 for it (after a deliberate offset reset, clear the state: chbridge state clear)");
                        }
                        tracing::info!(table = %self.name, topic, partition = key.partition, first, last,
                            "exactly-once: replaying the last recorded batch with its token");
                        Recovery::Replay { first, last }
                    };
                    self.recovery.insert(key, next);
                }
                Recovery::SkipThrough(last) => {
                    if offset <= last {
                        return Step::Skip;
                    }
                    self.recovery.remove(&key);
                }
                Recovery::Replay { first, last } => {
                    if offset < first {
                        return Step::Skip;
                    }
                    if offset <= last {
                        return Step::Place {
                            replay: Some((first, last)),
                        };
                    }
                    self.recovery.remove(&key);
                }
            }
        }
    }
}

/// Exactly-once: where recorded ranges are read on assignment.
pub struct ExactlyOnce {
    pub state: Arc<dyn RangeStore>,
    pub runtime: tokio::runtime::Handle,
    pub retry: crate::config::RetryConfig,
    /// Waiting for ClickHouse on assignment is not a stuck loop: `/healthz`
    /// stays green (`/readyz` shows ClickHouse unreachable).
    pub health: Arc<crate::observability::Health>,
}

/// Where the core reads a table's columns when a failed record asks for a
/// check, and adds columns (`auto_add_columns`). Answers come back on the
/// events channel, so the consumer thread never waits for ClickHouse here.
pub struct ClickHouseAccess {
    pub client: clickhouse::Client,
    pub runtime: tokio::runtime::Handle,
    pub events: std_mpsc::Sender<SinkEvent>,
    /// Bounds every request (the inserts' timeout).
    pub timeout: Duration,
}

pub struct Core {
    limits: Limits,
    /// `limits.max_buffered_bytes` split evenly between the tables.
    share: usize,
    topics: Vec<TopicState>,
    topic_index: FastMap<String, u32>,
    routes: Vec<RouteState>,
    tables: Vec<TableState>,
    tracker: OffsetTracker,
    ownership: Arc<Ownership>,
    events: std_mpsc::Receiver<SinkEvent>,
    last_commit: Instant,
    /// Topics (indexes) that feed full tables; their partitions are paused
    /// except those replaying a recorded range (`pause_state`).
    paused: BTreeSet<u32>,
    /// The partitions paused now.
    paused_partitions: BTreeSet<PartitionKey>,
    /// The last pause left a replaying partition of a paused topic running.
    pause_exempt: bool,
    /// Set once the final drain ran: the revocation that closing the consumer
    /// triggers must not wait for ClickHouse a second time.
    closing: bool,
    /// The first fatal error; once set the loop drains and stops.
    fatal: Option<PipelineError>,
    /// Segments of batches ClickHouse refused: they stay held for good, so a
    /// drain waits for everything else only.
    refused: Vec<Segment>,
    /// Segments of replayed ranges a drain could not complete: held too,
    /// without making the drain a failure.
    abandoned: Vec<Segment>,
    /// The batches the record being placed went into (reused per record).
    undo: Vec<Undo>,
    dead_letters: Option<Arc<DeadLetters>>,
    exactly_once: Option<ExactlyOnce>,
    /// Exactly-once: partitions whose recorded ranges were read.
    recovered: FastSet<PartitionKey>,
    /// Topics of routes stopped for failing too often (`stop_topic`).
    stopped_topics: BTreeSet<u32>,
    watchdog: Watchdog,
    reloads: Option<std_mpsc::Receiver<Reload>>,
    /// For decoders built again after a table changed.
    registry: Option<Arc<crate::decode::registry::Registry>>,
    clickhouse: Option<ClickHouseAccess>,
    /// `auto_add_columns`: columns added so far per table.
    auto_added: Option<FastMap<usize, usize>>,
    /// A shutdown was asked for: every drain ends by `stop_deadline`.
    stop: CancellationToken,
    stop_deadline: Option<Instant>,
    metrics: Arc<Metrics>,
}

/// Notices partitions whose commit position stopped moving while records
/// wait behind it (see `Core::watch`).
#[derive(Default)]
struct Watchdog {
    last_run: Option<Instant>,
    /// Per partition: the position last seen and since when it has not moved.
    progress: FastMap<PartitionKey, (i64, Instant)>,
    stalled: FastSet<PartitionKey>,
}

/// At most this many columns are added to one table per run: a producer
/// that puts ids or timestamps into field names must not grow a table
/// without bound.
const MAX_AUTO_ADDED_COLUMNS: usize = 100;

/// Checks of a table's columns that failed records ask for are at least
/// this far apart: a flood of bad records costs four small queries a second
/// and holds the batches after each failure back for about as long.
pub const SCHEMA_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// A table's batch state before a record was appended to it.
struct Undo {
    table: usize,
    partition: Option<PartitionKey>,
    created: bool,
    body_len: usize,
    rows: usize,
    segments: usize,
    oldest_timestamp_ms: Option<i64>,
    last: i64,
    accounted: usize,
}

/// What the pipeline shares with the sink tasks and the dead-letter producer.
pub struct Shared {
    /// Reloaded batching and error policies (SIGHUP).
    pub reloads: Option<std_mpsc::Receiver<Reload>>,
    pub ownership: Arc<Ownership>,
    pub dead_letters: Option<Arc<DeadLetters>>,
    pub exactly_once: Option<ExactlyOnce>,
    pub clickhouse: Option<ClickHouseAccess>,
    /// Cancelled when a shutdown is asked for (SIGTERM, SIGINT).
    pub stop: CancellationToken,
}

impl Default for Shared {
    /// Nothing shared: at-least-once, no dead letters, no ClickHouse access
    /// (benchmarks and unit tests).
    fn default() -> Shared {
        Shared {
            reloads: None,
            ownership: Arc::new(Ownership::default()),
            dead_letters: None,
            exactly_once: None,
            clickhouse: None,
            stop: CancellationToken::new(),
        }
    }
}

impl Core {
    pub fn new(
        limits: Limits,
        topics: Vec<(String, Vec<usize>)>,
        routes: Vec<RouteState>,
        tables: Vec<TableState>,
        events: std_mpsc::Receiver<SinkEvent>,
        shared: Shared,
        metrics: Arc<Metrics>,
    ) -> Core {
        let topic_index = topics
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i as u32))
            .collect();
        let topics = topics
            .into_iter()
            .map(|(name, routes)| TopicState {
                consumed: metrics.records_consumed.with_label_values(&[&name]),
                name,
                routes,
            })
            .collect();
        Core {
            share: limits.max_buffered_bytes / tables.len().max(1),
            limits,
            topics,
            topic_index,
            routes,
            tables,
            tracker: OffsetTracker::default(),
            ownership: shared.ownership,
            events,
            last_commit: Instant::now(),
            paused: BTreeSet::new(),
            paused_partitions: BTreeSet::new(),
            pause_exempt: false,
            closing: false,
            fatal: None,
            refused: Vec::new(),
            abandoned: Vec::new(),
            undo: Vec::new(),
            dead_letters: shared.dead_letters,
            exactly_once: shared.exactly_once,
            recovered: FastSet::default(),
            stopped_topics: BTreeSet::new(),
            registry: None,
            clickhouse: shared.clickhouse,
            auto_added: None,
            watchdog: Watchdog::default(),
            reloads: shared.reloads,
            stop: shared.stop,
            stop_deadline: None,
            metrics,
        }
    }

    /// What is held in memory, over all tables (see `TableState::buffered`).
    fn buffered_bytes(&self) -> usize {
        self.tables.iter().map(|t| t.buffered).sum()
    }

    pub fn fatal(&self) -> Option<&PipelineError> {
        self.fatal.as_ref()
    }

    pub fn take_fatal(&mut self) -> Option<PipelineError> {
        self.fatal.take()
    }

    fn key(&self, topic: &str, partition: i32) -> Option<PartitionKey> {
        self.topic_index
            .get(topic)
            .map(|&topic| PartitionKey { topic, partition })
    }

    fn keys_of(&self, partitions: &[TopicPartition]) -> Vec<PartitionKey> {
        partitions
            .iter()
            .filter_map(|(t, p)| self.key(t, *p))
            .collect()
    }

    fn topic_partition(&self, key: PartitionKey) -> TopicPartition {
        (self.topics[key.topic as usize].name.clone(), key.partition)
    }

    fn fail(&mut self, e: PipelineError) {
        if self.fatal.is_none() {
            self.fatal = Some(e);
        }
    }

    /// `auto_add_columns` is on for some route.
    pub fn set_auto_add(&mut self) {
        self.auto_added = Some(FastMap::default());
    }

    /// The decoders to use the registry when they are built again.
    pub fn set_registry(&mut self, registry: Option<Arc<crate::decode::registry::Registry>>) {
        self.registry = registry;
    }

    // ------------------------------------------------------------ records

    /// Places one record into the batch of every table its topic is routed
    /// to. A record that fails a route with `on_error = "stop"` becomes the
    /// fatal error, and its offset is not released: the commit stays below it.
    pub fn on_record(&mut self, rec: &Record<'_>) -> Flow {
        let Some(key) = self.key(rec.topic, rec.partition) else {
            return Flow::Go;
        };
        // A stopped route's topic: records still in librdkafka's queue when
        // it was paused are neither placed nor consumed, so the commit stays
        // below them.
        if self.stopped_topics.contains(&key.topic) {
            return Flow::Go;
        }
        if self.exactly_once.is_some() && !self.recovered.contains(&key) && !self.recover(&[key]) {
            return Flow::Stop;
        }
        let (generation, high) = self.tracker.read_state(key);
        // Read before: a table reads it again after a seek back.
        let seen = high.is_some_and(|h| rec.offset < h);
        let ti = key.topic as usize;
        if !seen {
            self.topics[ti].consumed.inc();
        }
        self.undo.clear();
        let mut full = false;
        for i in 0..self.topics[ti].routes.len() {
            let route = self.topics[ti].routes[i];
            match self.route_record(route, key, generation, seen, rec) {
                Ok(table_full) => full |= table_full,
                Err(Halt::Stop(e)) => {
                    self.take_back_record();
                    self.fail(e);
                    return Flow::Stop;
                }
                Err(Halt::StopTopic(e)) => {
                    self.take_back_record();
                    self.stop_topic(key.topic, route, e);
                    return Flow::Go;
                }
                Err(Halt::Quit) => {
                    self.take_back_record();
                    return Flow::Stop;
                }
            }
        }
        self.tracker.consumed(key, rec.offset);
        self.close_full(ti, key, rec.offset);
        if full {
            Flow::Service
        } else {
            Flow::Go
        }
    }

    /// One record for one route: re-reading, exactly-once recovery, new
    /// columns, decoding, and the route's policy when it fails. True when
    /// the route's table reached its share of the memory budget.
    fn route_record(
        &mut self,
        route_idx: usize,
        key: PartitionKey,
        generation: u64,
        seen: bool,
        rec: &Record<'_>,
    ) -> Result<bool, Halt> {
        let ti = self.routes[route_idx].table;
        let t = &mut self.tables[ti];
        match t
            .reread
            .admit(&mut self.tracker, key, generation, rec.offset, seen)
        {
            Admit::Skip | Admit::Defer => return Ok(false),
            Admit::Take => {}
        }
        if seen {
            self.metrics
                .records_redecoded
                .with_label_values(&[&t.name])
                .inc();
        }
        let replay = if self.exactly_once.is_some() {
            match t.recovery_step(key, rec.offset, rec.topic) {
                Step::Skip => return Ok(false),
                Step::Place { replay } => {
                    // A recovered range ends here or before: cut it first.
                    let ended = t
                        .batch_index(Some(key))
                        .filter(|&bi| replay.is_none() && t.open[bi].replay_last.is_some());
                    if let Some(bi) = ended {
                        self.close_batch(ti, bi);
                    }
                    replay
                }
            }
        } else {
            None
        };
        if self.routes[route_idx].config.auto_add_columns {
            if self.add_new_columns(route_idx, key, generation, rec)? {
                return Ok(false);
            }
            // Adding columns makes the table read its pending records
            // again, this one included.
            if let Some(r) = &mut self.tables[ti].reread.rewind {
                r.lower(&mut self.tracker, key, generation, rec.offset);
                return Ok(false);
            }
        }
        match self.decode_into(route_idx, key, generation, replay, rec) {
            Ok(()) => Ok(self.tables[ti].buffered >= self.table_share()),
            Err(error) => self
                .on_failure(route_idx, key, generation, rec, error)
                .map(|()| false),
        }
    }

    /// Decodes the record into its table's open batch (creating it), or
    /// leaves the batch as it was and says why not.
    fn decode_into(
        &mut self,
        route_idx: usize,
        key: PartitionKey,
        generation: u64,
        replay: Option<(i64, i64)>,
        rec: &Record<'_>,
    ) -> Result<(), RecordError> {
        let route = &mut self.routes[route_idx];
        let ti = route.table;
        let slot = self.exactly_once.is_some().then_some(key);
        let table = &mut self.tables[ti];
        let (bi, created) = match table.batch_index(slot) {
            Some(bi) => (bi, false),
            None => {
                let (first, replay_last) = match replay {
                    Some((first, last)) => (first, Some(last)),
                    None => (rec.offset, None),
                };
                // A replayed range holds the commit at its start, not at
                // its first row: a commit past `first` tells the next
                // owner that the whole range is in (see Recovery).
                let segments = match replay {
                    Some((first, _)) => {
                        self.metrics.replays.with_label_values(&[&table.name]).inc();
                        vec![self.tracker.hold(key, generation, first)]
                    }
                    None => Vec::new(),
                };
                table.open.push(OpenBatch {
                    partition: slot,
                    body: Vec::with_capacity(table.capacity_hint),
                    rows: Vec::new(),
                    segments,
                    opened: Instant::now(),
                    oldest_timestamp_ms: None,
                    first,
                    last: first,
                    replay_last,
                    schema_version: table.schema_version,
                    accounted: 0,
                });
                (table.open.len() - 1, true)
            }
        };
        let batch = &mut table.open[bi];
        let before = Undo {
            table: ti,
            partition: slot,
            created,
            body_len: batch.body.len(),
            rows: batch.rows.len(),
            segments: batch.segments.len(),
            oldest_timestamp_ms: batch.oldest_timestamp_ms,
            last: batch.last,
            accounted: batch.accounted,
        };
        match route.decoder.decode(rec, &mut batch.body) {
            Ok(()) => {
                batch.rows.push(RowOrigin {
                    end: batch.body.len(),
                    key,
                    offset: rec.offset,
                });
                if let Some(ts) = rec.timestamp_ms {
                    batch.oldest_timestamp_ms =
                        Some(batch.oldest_timestamp_ms.map_or(ts, |o| o.min(ts)));
                }
                if !batch
                    .segments
                    .iter()
                    .any(|s| s.key == key && s.generation == generation)
                {
                    let seg = self.tracker.hold(key, generation, rec.offset);
                    batch.segments.push(seg);
                }
                let added = batch.body.len() - before.body_len + ROW_ORIGIN_BYTES;
                batch.accounted += added;
                batch.last = rec.offset;
                table.buffered += added;
                self.undo.push(before);
                route.rate.success();
                Ok(())
            }
            Err(error) => {
                batch.body.truncate(before.body_len);
                // A batch opened for this record only: it has no rows to
                // insert (unless it replays a recorded range, whose end must
                // still be honoured).
                if created && batch.rows.is_empty() && replay.is_none() {
                    table.open.pop();
                } else {
                    // What handling the failure adds (its range) is taken back
                    // with the rest if another route stops on the record.
                    self.undo.push(before);
                }
                Err(error)
            }
        }
    }

    /// A record one route could not make a row of: the route's policy, once
    /// the table's columns were read after the record (a change may explain
    /// the failure). Registry outages and schemas that do not fit stop the
    /// bridge whatever the policy: they are not the record's fault.
    fn on_failure(
        &mut self,
        route_idx: usize,
        key: PartitionKey,
        generation: u64,
        rec: &Record<'_>,
        error: RecordError,
    ) -> Result<(), Halt> {
        let ti = self.routes[route_idx].table;
        let where_ = || {
            format!(
                "record {}[{}] at offset {} for {}",
                rec.topic, rec.partition, rec.offset, self.tables[ti].name
            )
        };
        match error.kind {
            RecordErrorKind::Unavailable => {
                return Err(Halt::Stop(PipelineError::Unavailable(format!(
                    "{}: {error}; nothing at or after it was committed",
                    where_()
                ))))
            }
            RecordErrorKind::Schema => {
                return Err(Halt::Stop(PipelineError::Config(format!(
                    "{}: {error}; nothing at or after it was committed",
                    where_()
                ))))
            }
            RecordErrorKind::Conversion | RecordErrorKind::UnknownField
                if !self.tables[ti].covers(key, rec.offset) =>
            {
                // Judged only against columns read after the record: the
                // table may have changed. It waits for a check.
                self.await_check(route_idx, key, generation, rec, error);
                return Ok(());
            }
            _ => {}
        }
        self.judge(route_idx, key, generation, rec, error)
    }

    /// The route's policy for a record it cannot make a row of: skip it,
    /// dead-letter it, or stop; and the failure rate that stops the route.
    fn judge(
        &mut self,
        route_idx: usize,
        key: PartitionKey,
        generation: u64,
        rec: &Record<'_>,
        error: RecordError,
    ) -> Result<(), Halt> {
        let ti = self.routes[route_idx].table;
        let eos = self.exactly_once.is_some();
        let route = &mut self.routes[route_idx];
        let table = &mut self.tables[ti];
        let reason = error.kind.as_str();
        let metrics = &self.metrics;
        route
            .failed
            .entry(reason)
            .or_insert_with(|| {
                metrics
                    .records_failed
                    .with_label_values(&[rec.topic, &table.name, reason])
            })
            .inc();
        if let Some((failed, total)) = route.rate.failure(Instant::now()) {
            return Err(Halt::StopTopic(PipelineError::TooManyFailures {
                route: route_idx,
                table: table.name.clone(),
                failed,
                total,
                window: route.rate.window,
                max_ratio: route.rate.max_ratio,
                last: format!(
                    "{}[{}] at offset {}: {error}",
                    rec.topic, rec.partition, rec.offset
                ),
            }));
        }
        match route.on_error {
            OnError::Skip => {
                if route.skipped_log.allow(&table.name) {
                    tracing::warn!(
                        topic = rec.topic,
                        partition = rec.partition,
                        offset = rec.offset,
                        table = %table.name,
                        error = %error,
                        "skipped a record that cannot become a row (on_error = \"skip\")"
                    )
                }
            }
            OnError::DeadLetter => {
                let (Some(dl), Some(dlq)) = (&self.dead_letters, &route.dead_letter_topic) else {
                    return Err(Halt::Stop(PipelineError::Internal(format!(
                        "route {route_idx} has on_error = \"dead-letter\" but no dead-letter producer"
                    ))));
                };
                if route.skipped_log.allow(&table.name) {
                    tracing::warn!(
                        topic = rec.topic,
                        partition = rec.partition,
                        offset = rec.offset,
                        table = %table.name,
                        dead_letter_topic = %dlq,
                        error = %error,
                        "sent a record that cannot become a row to the dead-letter topic"
                    )
                }
                let segment = self.tracker.hold(key, generation, rec.offset);
                let bytes = crate::kafka::dead_letter::size_of(rec);
                let message = error.to_string();
                let failure = Failure {
                    table: &table.name,
                    class: error.kind.as_str(),
                    message: &message,
                };
                let ticket = Ticket::Hold {
                    segment,
                    table: ti,
                    bytes,
                };
                if let Err(why) = dl.send(dlq, rec, &failure, ticket) {
                    self.tracker.release(&segment);
                    return Err(Halt::Stop(PipelineError::DeadLetter(format!(
                        "{why} (record {}[{}] at offset {}); nothing at or after it was committed",
                        rec.topic, rec.partition, rec.offset
                    ))));
                }
                table.buffered += bytes;
                if eos {
                    *table
                        .dead_letters
                        .entry(key)
                        .or_default()
                        .entry(rec.offset)
                        .or_insert(0) += 1;
                }
            }
            OnError::Stop => {
                return Err(Halt::Stop(PipelineError::BadRecord {
                    topic: rec.topic.to_string(),
                    partition: rec.partition,
                    offset: rec.offset,
                    table: table.name.clone(),
                    error,
                }));
            }
        }
        // Exactly-once: a record handled by policy counts inside its
        // partition's batch range, when a batch is open (judged after a
        // check, the batch may have gone on past it).
        if eos {
            if let Some(bi) = table.batch_index(Some(key)) {
                let b = &mut table.open[bi];
                b.last = b.last.max(rec.offset);
            }
        }
        Ok(())
    }

    /// Keeps a failed record until a check of its table's columns answers
    /// (`Core::judge_waiting`). Its offset is held; with `on_error = "stop"`
    /// the batch holding the records before it goes now, so that they land
    /// whatever the judgement, while later records of its partition wait.
    fn await_check(
        &mut self,
        route_idx: usize,
        key: PartitionKey,
        generation: u64,
        rec: &Record<'_>,
        error: RecordError,
    ) {
        let ti = self.routes[route_idx].table;
        let stop = self.routes[route_idx].on_error == OnError::Stop;
        let slot = self.exactly_once.is_some().then_some(key);
        // Not a replayed range: it is cut at its recorded end only.
        let t = &self.tables[ti];
        let open = t
            .batch_index(slot)
            .filter(|&bi| t.open[bi].replay_last.is_none());
        if let (true, Some(bi)) = (stop, open) {
            self.close_batch(ti, bi);
        }
        let hold = self.tracker.hold(key, generation, rec.offset);
        let bytes = crate::kafka::dead_letter::size_of(rec);
        let t = &mut self.tables[ti];
        t.buffered += bytes;
        t.judging.push(Judging {
            route: route_idx,
            key,
            generation,
            record: OwnedRecord::of(rec),
            error,
            version: t.schema_version,
            hold,
            bytes,
            stopped: false,
        });
    }

    /// A check of table `ti`'s columns answered: the records waiting for it
    /// are judged, or, if the table changed since they were decoded, read
    /// again for the new columns.
    fn judge_waiting(&mut self, ti: usize) {
        self.follow_schema(ti);
        let waiting = std::mem::take(&mut self.tables[ti].judging);
        for mut j in waiting {
            let t = &mut self.tables[ti];
            if j.stopped {
                t.judging.push(j);
                continue;
            }
            t.buffered = t.buffered.saturating_sub(j.bytes);
            if self.tracker.generation_of(j.key) != Some(j.generation) {
                continue; // revoked meanwhile: its new owner reads it
            }
            if j.version != t.schema_version || t.reread.rewind.is_some() {
                // Decoded for columns the table no longer has as they were:
                // read again, with the batches after it (never sent: they
                // waited for this judgement).
                t.reread.begin(&mut self.tracker).lower(
                    &mut self.tracker,
                    j.key,
                    j.generation,
                    j.record.offset,
                );
                self.tracker.release(&j.hold);
                self.drop_unsent(ti);
                continue;
            }
            let record = j.record.clone();
            let rec = record.as_record();
            match self.judge(j.route, j.key, j.generation, &rec, j.error.clone()) {
                Ok(()) => self.tracker.release(&j.hold),
                // The hold and the gate stay: nothing at or after the record
                // is committed, nothing after it sent.
                Err(Halt::Stop(e)) => {
                    self.fail(e);
                    j.stopped = true;
                    self.tables[ti].judging.push(j);
                }
                Err(Halt::StopTopic(e)) => {
                    self.stop_topic(j.key.topic, j.route, e);
                    j.stopped = true;
                    self.tables[ti].judging.push(j);
                }
                Err(Halt::Quit) => self.tables[ti].judging.push(j),
            }
        }
        self.send_waiting(ti);
    }

    /// Closes what is full after a record, and exactly-once batches that
    /// reached the end of a recorded range (also when the last record of it
    /// failed).
    fn close_full(&mut self, ti_topic: usize, key: PartitionKey, offset: i64) {
        let eos = self.exactly_once.is_some();
        for r in 0..self.topics[ti_topic].routes.len() {
            let table_idx = self.routes[self.topics[ti_topic].routes[r]].table;
            let t = &self.tables[table_idx];
            let Some(bi) = t.batch_index(eos.then_some(key)) else {
                continue;
            };
            let b = &t.open[bi];
            // A replayed range closes at its recorded end only, whatever the
            // size limits say now (they may have been lowered since).
            let close = match b.replay_last {
                Some(last) => offset >= last,
                None => {
                    b.rows.len() >= self.limits.max_rows || b.body.len() >= self.limits.max_bytes
                }
            };
            if close {
                self.close_batch(table_idx, bi);
            }
        }
    }

    /// Stops a route that fails too often without stopping the others: its
    /// topic is paused for good (until a restart) and the failing record is
    /// not consumed, so nothing at or after it is committed for that topic.
    /// The topic's other routes stop with it: their commit is the same.
    fn stop_topic(&mut self, topic: u32, route: usize, why: PipelineError) {
        self.stopped_topics.insert(topic);
        let table = &self.tables[self.routes[route].table].name;
        self.metrics
            .route_stopped
            .with_label_values(&[&route.to_string(), table])
            .set(1);
        tracing::error!(
            topic = %self.topics[topic as usize].name,
            "{why} The topic is paused; other topics go on."
        );
    }

    /// Removes the current record from the batches of the routes that took it
    /// before another route stopped on it, so that the stop leaves no row of a
    /// record whose offset is not committed (a restart would repeat it), and
    /// no batch range that claims it.
    fn take_back_record(&mut self) {
        while let Some(u) = self.undo.pop() {
            let t = &mut self.tables[u.table];
            let Some(bi) = t.batch_index(u.partition) else {
                continue;
            };
            let b = &mut t.open[bi];
            t.buffered -= b.accounted - u.accounted;
            b.accounted = u.accounted;
            b.body.truncate(u.body_len);
            b.rows.truncate(u.rows);
            b.oldest_timestamp_ms = u.oldest_timestamp_ms;
            b.last = u.last;
            for seg in b.segments.drain(u.segments..) {
                self.tracker.release(&seg);
            }
            if u.created {
                t.open.swap_remove(bi);
            }
        }
    }

    /// `auto_add_columns`: adds the columns the record's new fields need to
    /// the route's table before the record is decoded, so that no value is
    /// lost. A field name no column can have is the record's failure: true
    /// when the record was handled so (not to be decoded).
    fn add_new_columns(
        &mut self,
        route_idx: usize,
        key: PartitionKey,
        generation: u64,
        rec: &Record<'_>,
    ) -> Result<bool, Halt> {
        let wanted = self.routes[route_idx].decoder.new_columns(rec);
        if wanted.is_empty() {
            return Ok(false);
        }
        let ti = self.routes[route_idx].table;
        let (Some(history), Some(ch)) = (self.tables[ti].schema_history.clone(), &self.clickhouse)
        else {
            return Ok(false);
        };
        let (wanted, unfit): (Vec<_>, Vec<_>) = wanted
            .into_iter()
            .partition(|(name, _)| crate::schema::column_name_problem(name).is_none());
        let table = history.current().schema;
        let added = self
            .auto_added
            .get_or_insert_with(FastMap::default)
            .entry(ti)
            .or_insert(0);
        if *added + wanted.len() > MAX_AUTO_ADDED_COLUMNS {
            return Err(Halt::Stop(PipelineError::Config(format!(
                "auto_add_columns: record {}[{}] at offset {} would add {} more columns to {table} \
                 ({:?}), over the limit of {MAX_AUTO_ADDED_COLUMNS} per table and run; add them \
                 yourself or fix the producer's field names",
                rec.topic,
                rec.partition,
                rec.offset,
                wanted.len(),
                wanted.iter().map(|(n, _)| n).collect::<Vec<_>>()
            ))));
        }
        *added += wanted.len();
        if !wanted.is_empty() {
            let sql = crate::schema::add_columns_sql(&table, &wanted);
            let (client, timeout) = (ch.client.clone(), ch.timeout);
            let (db, name) = (table.database.clone(), table.table.clone());
            let stop = self.stop.clone();
            let result = ch.runtime.block_on(async move {
                let work = async {
                    // Sent as it is: `?` in a column name is no bind placeholder.
                    client.query_raw(&sql).execute().await?;
                    crate::schema::load_table(&client, &db, &name)
                        .await
                        .map_err(|e| clickhouse::error::Error::Custom(e.to_string()))
                };
                tokio::select! {
                    r = tokio::time::timeout(timeout, work) => Some(r.unwrap_or(Err(clickhouse::error::Error::TimedOut))),
                    _ = stop.cancelled() => None,
                }
            });
            match result {
                None => return Err(Halt::Quit),
                Some(Ok(now)) => {
                    tracing::warn!(
                        table = %table,
                        columns = %wanted.iter().map(|(n, t)| format!("{n} {t}")).collect::<Vec<_>>().join(", "),
                        topic = rec.topic,
                        partition = rec.partition,
                        offset = rec.offset,
                        "auto_add_columns: added columns for new fields"
                    );
                    if let Some(v) = history.observe(now) {
                        crate::sink::announce(&v);
                    }
                    self.follow_schema(ti);
                    if let Some(e) = self.fatal.take() {
                        return Err(Halt::Stop(e));
                    }
                }
                Some(Err(e)) => {
                    return Err(Halt::Stop(PipelineError::Unavailable(format!(
                        "auto_add_columns: could not add {:?} to {table} for record {}[{}] at offset {}: {e}; \
                         nothing at or after it was committed",
                        wanted.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                        rec.topic,
                        rec.partition,
                        rec.offset
                    ))));
                }
            }
        }
        if let Some((name, _)) = unfit.first() {
            // No check of the table can help: the record is judged now.
            let why = crate::schema::column_name_problem(name).unwrap_or_default();
            return self
                .judge(
                    route_idx,
                    key,
                    generation,
                    rec,
                    RecordError {
                        kind: RecordErrorKind::UnknownField,
                        column: None,
                        message: format!(
                            "auto_add_columns: field {name:?} cannot be a column name ({why})"
                        ),
                    },
                )
                .map(|()| true);
        }
        Ok(false)
    }

    // ------------------------------------------------------------ batches

    /// Closes open batch `bi` of table `ti` and hands it to its sink (or
    /// queues it while the sink's queue is full).
    fn close_batch(&mut self, ti: usize, bi: usize) {
        let t = &mut self.tables[ti];
        if bi >= t.open.len() {
            return;
        }
        let mut b = t.open.swap_remove(bi);
        if b.rows.is_empty() {
            // A replayed range whose records all failed: nothing to insert.
            for seg in &b.segments {
                self.tracker.release(seg);
            }
            t.buffered -= b.accounted;
            return;
        }
        t.capacity_hint = b.body.len().max(64 * 1024);
        // `Bytes` keeps the whole allocation: give back what a burst reserved.
        if b.body.capacity() > b.body.len() + b.body.len() / 4 {
            b.body.shrink_to_fit();
        }
        b.rows.shrink_to_fit();
        let range = b.partition.map(|k| BatchRange {
            table: t.name.clone(),
            topic: self.topics[k.topic as usize].name.clone(),
            partition: k.partition,
            first: b.first,
            last: b.replay_last.unwrap_or(b.last),
        });
        let splits = match (b.partition, b.replay_last) {
            (Some(key), Some(_)) => t.replay_splits.remove(&key).unwrap_or_default(),
            _ => Vec::new(),
        };
        t.waiting.push_back(ReadyBatch {
            table: ti,
            body: Bytes::from(b.body),
            rows: b.rows,
            segments: b.segments,
            oldest_timestamp_ms: b.oldest_timestamp_ms,
            range,
            replay: b.replay_last.is_some(),
            splits,
            schema_version: b.schema_version,
            accounted: b.accounted,
        });
        self.send_waiting(ti);
    }

    /// Closes every open batch of table `ti` that holds one of `keys`. A
    /// replayed range not read to its end yet is abandoned instead: its
    /// records stay uncommitted and the next owner replays the whole range.
    fn close_batches_of(&mut self, ti: usize, keys: &[PartitionKey]) {
        let mut bi = 0;
        while bi < self.tables[ti].open.len() {
            let b = &self.tables[ti].open[bi];
            let holds = b.segments.iter().any(|s| keys.contains(&s.key));
            if holds && b.replay_last.is_some() {
                let t = &mut self.tables[ti];
                let b = t.open.swap_remove(bi);
                t.buffered -= b.accounted;
                self.abandoned.extend_from_slice(&b.segments);
            } else if holds {
                // swap_remove moves the last batch here: look at `bi` again.
                self.close_batch(ti, bi);
            } else {
                bi += 1;
            }
        }
    }

    fn send_waiting(&mut self, ti: usize) {
        let t = &mut self.tables[ti];
        while let Some(front) = t.waiting.front() {
            if t.gated(front) {
                return;
            }
            let Some(batch) = t.waiting.pop_front() else {
                return;
            };
            match t.tx.try_send(batch) {
                Ok(()) => t.in_sink += 1,
                Err(mpsc::error::TrySendError::Full(b)) => {
                    t.waiting.push_front(b);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(b)) => {
                    t.waiting.push_front(b);
                    let e = PipelineError::Internal(format!(
                        "the insert task of table {} has stopped",
                        t.name
                    ));
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// A batch the sink answered for: its memory is given back.
    fn batch_done(&mut self, batch: &ReadyBatch) {
        let t = &mut self.tables[batch.table];
        t.in_sink = t.in_sink.saturating_sub(1);
        t.buffered = t.buffered.saturating_sub(batch.accounted);
    }

    // ------------------------------------------------------------ re-reading

    /// Makes table `ti` read again what `segments` hold (each the lowest
    /// offset of its partition in a batch that will not be inserted).
    fn rewind_segments(&mut self, ti: usize, segments: &[Segment]) {
        let t = &mut self.tables[ti];
        let rewind = t.reread.begin(&mut self.tracker);
        for s in segments {
            // A partition revoked meanwhile is read by its new owner.
            if self.tracker.generation_of(s.key) == Some(s.generation) {
                rewind.lower(&mut self.tracker, s.key, s.generation, s.first_offset);
            }
        }
    }

    /// Exactly-once: a batch that replayed a recorded range, or whose range
    /// was recorded already, is cut at exactly that range again, and split
    /// as it was.
    fn keep_recorded_range(&mut self, ti: usize, batch: &ReadyBatch, splits: Vec<Split>) {
        let (Some(r), Some(s)) = (&batch.range, batch.segments.first()) else {
            return;
        };
        let t = &mut self.tables[ti];
        t.recovery.insert(
            s.key,
            Recovery::Replay {
                first: r.first,
                last: r.last,
            },
        );
        if splits.is_empty() {
            t.replay_splits.remove(&s.key);
        } else {
            t.replay_splits.insert(s.key, splits);
        }
    }

    /// A table changed (its sink saw a new schema, a check found one, or
    /// `auto_add_columns` made one): the routes decode for the new columns
    /// from now on, and every row encoded for the old ones and not in
    /// ClickHouse yet is decoded again from its record. Batches still open or
    /// waiting here are dropped; those the sink has come back as stale; the
    /// rewind waits for all of them.
    fn follow_schema(&mut self, ti: usize) {
        let t = &mut self.tables[ti];
        let Some(feed) = t.schema_feed.as_mut() else {
            return;
        };
        if !feed.has_changed().unwrap_or(false) {
            return;
        }
        let v = feed.borrow_and_update().clone();
        if v.version == t.schema_version {
            return;
        }
        for (i, route) in self.routes.iter_mut().enumerate() {
            if route.table != ti {
                continue;
            }
            match crate::decode::decoder_for(&route.config, &v.schema, self.registry.as_ref()) {
                Ok(d) => route.decoder = d,
                Err(e) => {
                    self.fail(PipelineError::Config(format!(
                        "routes[{i}]: table {} changed and the route no longer fits it: {e}",
                        v.schema
                    )));
                    return;
                }
            }
        }
        let t = &mut self.tables[ti];
        t.schema_version = v.version;
        t.reread.begin(&mut self.tracker).sink = true;
        let dropped = self.drop_unsent(ti);
        tracing::info!(table = %v.schema, version = v.version, dropped_batches = dropped,
            in_sink = self.tables[ti].in_sink,
            "decoding for the table's new columns; its records not yet inserted are read again");
    }

    /// Drops table `ti`'s batches not sent yet (open or waiting): the
    /// rewind under way reads their records again. A replayed exactly-once
    /// range is cut again at exactly its range. Returns how many.
    fn drop_unsent(&mut self, ti: usize) -> usize {
        let t = &mut self.tables[ti];
        let open: Vec<OpenBatch> = t.open.drain(..).collect();
        let waiting: Vec<ReadyBatch> = t.waiting.drain(..).collect();
        let dropped = open.len() + waiting.len();
        for b in open {
            self.tables[ti].buffered -= b.accounted;
            if let (Some(key), Some(last)) = (b.partition, b.replay_last) {
                self.tables[ti].recovery.insert(
                    key,
                    Recovery::Replay {
                        first: b.first,
                        last,
                    },
                );
            }
            self.rewind_segments(ti, &b.segments);
            for s in &b.segments {
                self.tracker.release(s);
            }
        }
        for b in waiting {
            self.tables[ti].buffered -= b.accounted;
            if b.replay {
                let splits = b.splits.clone();
                self.keep_recorded_range(ti, &b, splits);
            }
            self.rewind_segments(ti, &b.segments);
            for s in &b.segments {
                self.tracker.release(s);
            }
        }
        dropped
    }

    /// Asks for the checks of tables' columns that failed records wait for,
    /// at most one per table per `SCHEMA_CHECK_INTERVAL`. The answer comes
    /// back as `SinkEvent::SchemaChecked`.
    fn request_checks(&mut self, now: Instant) {
        for ti in 0..self.tables.len() {
            let t = &self.tables[ti];
            let wanted = t.judging.iter().any(|j| !j.stopped);
            if !wanted
                || t.check.pending.is_some()
                || t.check
                    .last
                    .is_some_and(|l| now.duration_since(l) < SCHEMA_CHECK_INTERVAL)
            {
                continue;
            }
            let Some(history) = t.schema_history.clone() else {
                continue;
            };
            let coverage: FastMap<PartitionKey, i64> = self
                .tracker
                .keys()
                .filter_map(|k| Some((k, self.tracker.read_high(k)?)))
                .collect();
            self.tables[ti].check.pending = Some(coverage);
            // Without ClickHouse (unit tests) the answer is the test's to give.
            let Some(ch) = &self.clickhouse else {
                continue;
            };
            let (client, events, timeout) = (ch.client.clone(), ch.events.clone(), ch.timeout);
            ch.runtime.spawn(async move {
                let schema = history.current().schema;
                let read = crate::schema::load_table(&client, &schema.database, &schema.table);
                let result = match tokio::time::timeout(timeout, read).await {
                    Ok(Ok(now)) => {
                        if let Some(v) = history.observe(now) {
                            crate::sink::announce(&v);
                        }
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                let _ = events.send(SinkEvent::SchemaChecked { table: ti, result });
            });
        }
    }

    /// A check of table `ti`'s columns answered: the records read before it
    /// was asked for are judged against what it read.
    fn check_done(&mut self, ti: usize, result: Result<(), String>) {
        let t = &mut self.tables[ti];
        t.check.last = Some(Instant::now());
        let coverage = t.check.pending.take();
        match result {
            Ok(()) => {
                if let Some(c) = coverage {
                    t.checked = c;
                }
                self.judge_waiting(ti);
            }
            Err(e) => tracing::warn!(table = %t.name, error = %e,
                "could not check the table's columns; the records that wait for the check stay uncommitted, \
                 checking again"),
        }
    }

    /// Ends the rewinds that wait for nothing more: the consumer reads their
    /// partitions again from where each table needs them.
    fn finish_rewinds(&mut self, consumer: &dyn ConsumerControl) {
        for ti in 0..self.tables.len() {
            let in_sink = self.tables[ti].in_sink;
            let Some(seeks) = self.tables[ti].reread.finish(&mut self.tracker, in_sink) else {
                continue;
            };
            for (key, start) in seeks {
                // Another table may be reading the partition again from lower down.
                let target = self
                    .tables
                    .iter()
                    .filter_map(|t| t.reread.reading_from(key))
                    .fold(start, i64::min);
                let (topic, partition) = self.topic_partition(key);
                let high = self.tracker.read_high(key).unwrap_or(target);
                match consumer.seek(&topic, partition, target) {
                    Ok(()) => {
                        tracing::info!(table = %self.tables[ti].name, topic, partition, from = target, to = high,
                        "reading records again for the table")
                    }
                    Err(e) => self.fail(PipelineError::Kafka(format!(
                        "cannot read {topic}[{partition}] again from offset {target} for {}: {e}",
                        self.tables[ti].name
                    ))),
                }
            }
        }
    }

    // ------------------------------------------------------------ events

    /// Handles one sink outcome.
    fn on_event(&mut self, ev: SinkEvent) {
        match ev {
            SinkEvent::Inserted { batch, rejected: _ } => {
                self.batch_done(&batch);
                for seg in &batch.segments {
                    self.tracker.release(seg);
                }
                if let Some(ts) = batch.oldest_timestamp_ms {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(ts);
                    self.metrics
                        .end_to_end_latency
                        .observe((now_ms - ts).max(0) as f64 / 1000.0);
                }
            }
            SinkEvent::Dropped(batch) => {
                // Its partitions were revoked: the tracker no longer knows the
                // segments' generation, and the new owner reads them again.
                self.batch_done(&batch);
            }
            SinkEvent::Stale {
                batch,
                recorded,
                splits,
            } => {
                self.batch_done(&batch);
                let ti = batch.table;
                // The sink may have seen the new columns before this thread.
                self.follow_schema(ti);
                if batch.replay || recorded {
                    self.keep_recorded_range(ti, &batch, splits);
                }
                self.rewind_segments(ti, &batch.segments);
                for seg in &batch.segments {
                    self.tracker.release(seg);
                }
            }
            SinkEvent::Failed { batch, error } => {
                // The batch's offsets stay held: nothing at or above its first
                // offset in any of its partitions will be committed.
                self.batch_done(&batch);
                let table = self.tables[batch.table].name.clone();
                self.refused.extend_from_slice(&batch.segments);
                let e = self.insert_failure(&table, &batch, error);
                self.fail(e);
            }
            SinkEvent::DeadLettered {
                segment,
                table,
                bytes,
                error,
            } => {
                let t = &mut self.tables[table];
                t.buffered = t.buffered.saturating_sub(bytes);
                match error {
                    None => {
                        if let Some(m) = t.dead_letters.get_mut(&segment.key) {
                            if let Some(n) = m.get_mut(&segment.first_offset) {
                                *n -= 1;
                                if *n == 0 {
                                    m.remove(&segment.first_offset);
                                }
                            }
                        }
                        self.tracker.release(&segment);
                        let topic = &self.topics[segment.key.topic as usize].name;
                        self.metrics
                            .dead_letters
                            .with_label_values(&[
                                topic,
                                &self.tables[table].name,
                                crate::observability::metrics::DEAD_LETTER_DECODE,
                            ])
                            .inc();
                        self.send_waiting(table);
                    }
                    Some(why) => {
                        // Its hold stays, and so does the gate: nothing at or
                        // after it is committed or recorded.
                        self.refused.push(segment);
                        let topic = &self.topics[segment.key.topic as usize].name;
                        let e = PipelineError::DeadLetter(format!(
                            "the dead-letter topic did not take the record {topic}[{}] at offset {}: {why}; \
                             nothing at or after it was committed",
                            segment.key.partition, segment.first_offset
                        ));
                        self.fail(e);
                    }
                }
            }
            SinkEvent::SchemaChecked { table, result } => self.check_done(table, result),
            SinkEvent::CommitFailed(partitions) => {
                for key in self.keys_of(&partitions) {
                    self.tracker.forget_committed(key);
                }
            }
        }
    }

    fn insert_failure(&self, table: &str, batch: &ReadyBatch, error: InsertError) -> PipelineError {
        let origin = batch
            .segments
            .iter()
            .map(|s| {
                format!(
                    "{}[{}] from offset {}",
                    self.topics[s.key.topic as usize].name, s.key.partition, s.first_offset
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        PipelineError::Insert {
            table: table.to_string(),
            rows: batch.rows.len(),
            origin,
            error,
        }
    }

    /// New batch limits apply to open batches at their next check. A route
    /// whose failure window or ratio changed starts its window afresh; the
    /// others keep counting (a reload that only touched batching must not
    /// forget a route's recent failures).
    fn reload(&mut self, r: Reload) {
        self.limits.max_rows = r.max_rows;
        self.limits.max_bytes = r.max_bytes;
        self.limits.max_wait = r.max_wait;
        for (route, (on_error, dlq, window, ratio)) in self.routes.iter_mut().zip(r.routes) {
            route.on_error = on_error;
            route.dead_letter_topic = dlq;
            if route.rate.window != window || route.rate.max_ratio != ratio {
                route.rate = FailureRate::new(window, ratio);
            }
        }
        tracing::info!(
            max_rows = r.max_rows,
            max_bytes = r.max_bytes,
            max_wait_ms = r.max_wait.as_millis() as u64,
            "batching and route error policies reloaded"
        );
    }

    // ------------------------------------------------------------ housekeeping

    /// Housekeeping between polls: acknowledgements, table changes, records
    /// to read again, batches that waited long enough, queued sends,
    /// periodic commits, and back-pressure. Returns how long the next poll
    /// may block.
    pub fn service(&mut self, consumer: &dyn ConsumerControl) -> Duration {
        while let Ok(ev) = self.events.try_recv() {
            self.on_event(ev);
        }
        while let Some(r) = self.reloads.as_ref().and_then(|rx| rx.try_recv().ok()) {
            self.reload(r);
        }
        for ti in 0..self.tables.len() {
            self.follow_schema(ti);
        }
        let now = Instant::now();
        self.request_checks(now);
        self.finish_rewinds(consumer);
        for route in &mut self.routes {
            route.rate.roll(now);
        }
        let mut next_deadline = self.limits.commit_interval.min(Duration::from_millis(100));
        for ti in 0..self.tables.len() {
            self.send_waiting(ti);
            let mut bi = 0;
            while bi < self.tables[ti].open.len() {
                let b = &self.tables[ti].open[bi];
                // A replayed range closes at its recorded end, never earlier:
                // inserted short under its token, the rest would be dropped
                // as a duplicate.
                if b.replay_last.is_some() {
                    bi += 1;
                    continue;
                }
                let age = now.duration_since(b.opened);
                if age >= self.limits.max_wait {
                    self.close_batch(ti, bi);
                } else {
                    next_deadline = next_deadline.min(self.limits.max_wait - age);
                    bi += 1;
                }
            }
        }
        if now.duration_since(self.last_commit) >= self.limits.commit_interval {
            self.commit(consumer, false, None);
        }
        // A table's open batches (one per partition with exactly-once) can
        // fill its share while each is below batch.max_bytes: send the
        // largest rather than wait for max_wait, or the pause never ends.
        let share = self.table_share();
        for ti in 0..self.tables.len() {
            if self.tables[ti].buffered < share {
                continue;
            }
            let t = &self.tables[ti];
            let largest = (0..t.open.len())
                .filter(|&bi| t.open[bi].replay_last.is_none())
                .max_by_key(|&bi| t.open[bi].body.len());
            if let Some(bi) = largest {
                self.close_batch(ti, bi);
            }
        }
        self.apply_backpressure(consumer);
        self.metrics
            .buffered_bytes
            .set(self.buffered_bytes() as i64);
        if self
            .watchdog
            .last_run
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.watchdog.last_run = Some(now);
            self.watch(consumer, now);
        }
        next_deadline
    }

    /// The stall watchdog: a partition whose commit position has not moved
    /// for `stall_timeout` while the broker has records beyond it is marked
    /// stalled, with what holds it. When nothing holds it and it is not
    /// paused, librdkafka has stopped fetching it (seen in the wild): seeking
    /// to the position restarts the fetcher.
    fn watch(&mut self, consumer: &dyn ConsumerControl, now: Instant) {
        let keys: Vec<PartitionKey> = self.tracker.keys().collect();
        self.watchdog.progress.retain(|k, _| keys.contains(k));
        self.watchdog.stalled.retain(|k| keys.contains(k));
        for key in keys {
            let Some(position) = self.tracker.position(key) else {
                continue;
            };
            let topic = self.topics[key.topic as usize].name.clone();
            let labels = [topic.as_str(), &key.partition.to_string()];
            let (last, since) = *self.watchdog.progress.entry(key).or_insert((position, now));
            if position != last {
                self.watchdog.progress.insert(key, (position, now));
                if self.watchdog.stalled.remove(&key) {
                    self.metrics
                        .partition_stalled
                        .with_label_values(&labels)
                        .set(0);
                    tracing::info!(
                        topic,
                        partition = key.partition,
                        position,
                        "partition moving again"
                    );
                }
                continue;
            }
            let high = self.metrics.high_watermark.with_label_values(&labels).get();
            if high <= position
                || now.duration_since(since) < self.limits.stall_timeout
                || self.watchdog.stalled.contains(&key)
            {
                continue;
            }
            self.watchdog.stalled.insert(key);
            self.metrics
                .partition_stalled
                .with_label_values(&labels)
                .set(1);
            let reason = self.holder(key, position);
            tracing::warn!(
                topic,
                partition = key.partition,
                position,
                high_watermark = high,
                stalled_for_s = now.duration_since(since).as_secs(),
                reason = %reason,
                "partition stalled: its commit position has not moved while records wait behind it"
            );
            if self.tracker.held(key) == 0 && !self.paused_partitions.contains(&key) {
                match consumer.seek(&topic, key.partition, position) {
                    Ok(()) => tracing::warn!(
                        topic,
                        partition = key.partition,
                        position,
                        "restarted fetching of the stalled partition"
                    ),
                    Err(e) => {
                        tracing::warn!(topic, partition = key.partition, error = %e, "could not restart fetching of the stalled partition")
                    }
                }
            }
        }
    }

    /// What holds `key` at `position`, in words, for the stall warning.
    fn holder(&self, key: PartitionKey, position: i64) -> String {
        let holds = |segs: &[Segment]| {
            segs.iter()
                .any(|s| s.key == key && s.first_offset == position)
        };
        for t in &self.tables {
            if let Some(b) = t.open.iter().find(|b| holds(&b.segments)) {
                return match b.replay_last {
                    Some(last) => format!(
                        "a replayed exactly-once range of {} waits for records up to offset {last}",
                        t.name
                    ),
                    None => format!("an open batch of {} ({} rows)", t.name, b.rows.len()),
                };
            }
            if t.judging.iter().any(|j| j.key == key) {
                return format!(
                    "a record that failed for {} waits for a check of the table's columns",
                    t.name
                );
            }
            if let Some(b) = t.waiting.iter().find(|b| holds(&b.segments)) {
                return if t.gated(b) {
                    format!(
                        "a batch of {} waits for a dead letter or a failed record below it",
                        t.name
                    )
                } else {
                    format!(
                        "a batch of {} queued behind inserts that have not finished",
                        t.name
                    )
                };
            }
            if t.reread.holds().any(|s| s.key == key) {
                return match &t.reread.rewind {
                    Some(_) => format!(
                        "{} changed: its records wait for the batches in its sink before they are read again",
                        t.name
                    ),
                    None => format!("records are being read again for {}", t.name),
                };
            }
        }
        if self.refused.iter().any(|s| s.key == key) {
            return "a batch ClickHouse refused (see the error above)".into();
        }
        if self.tracker.held(key) > 0 {
            // Held by a batch a sink task has: name the tables with inserts in flight.
            let busy: Vec<String> = self.topics[key.topic as usize]
                .routes
                .iter()
                .map(|&r| &self.tables[self.routes[r].table])
                .filter(|t| t.in_sink > 0)
                .map(|t| {
                    format!(
                        "{} ({} batches in its sink; chbridge_insert_retries_total shows retries)",
                        t.name, t.in_sink
                    )
                })
                .collect();
            return if busy.is_empty() {
                "a dead letter not yet acknowledged by the broker".into()
            } else {
                format!("an insert into {} not yet acknowledged", busy.join(", "))
            };
        }
        if self.stopped_topics.contains(&key.topic) {
            return "a route of the topic was stopped for failing too often (see the error above)"
                .into();
        }
        if self.paused.contains(&key.topic) {
            return "consumption paused: the topic feeds a table whose inserts are behind".into();
        }
        "no records arrive from the broker although it reports more".into()
    }

    // ------------------------------------------------------------ back-pressure

    /// Each table's part of the memory budget: the budget split evenly, so
    /// that the sum of all tables' bytes never exceeds it.
    fn table_share(&self) -> usize {
        self.share
    }

    /// Topics to pause: those feeding a table whose sink is behind (batches
    /// queued), that holds its share of the memory budget, or that waits to
    /// read records again. The topics of healthy tables keep flowing.
    fn topics_to_pause(&self) -> BTreeSet<u32> {
        let share = self.table_share();
        // A batch held back for a failed record's judgement goes within a
        // check's time: only its memory counts, not the wait.
        let full: Vec<bool> = self
            .tables
            .iter()
            .map(|t| {
                t.buffered >= share
                    || t.reread.rewind.is_some()
                    || t.waiting
                        .iter()
                        .any(|b| t.judging.is_empty() || !t.gated(b))
            })
            .collect();
        (0..self.topics.len() as u32)
            .filter(|&ti| {
                self.stopped_topics.contains(&ti)
                    || self.topics[ti as usize]
                        .routes
                        .iter()
                        .any(|&r| full[self.routes[r].table])
            })
            .collect()
    }

    /// The partitions to pause now: every assigned partition of the topics
    /// to pause, except those replaying a recorded range, which must read
    /// on to the range's end or the memory they hold never comes back.
    fn pause_state(&self, assignment: &[TopicPartition]) -> BTreeSet<PartitionKey> {
        let topics = self.topics_to_pause();
        self.keys_of(assignment)
            .into_iter()
            .filter(|k| topics.contains(&k.topic))
            .filter(|k| {
                self.stopped_topics.contains(&k.topic)
                    || !self.tables.iter().any(|t| t.replaying(*k))
            })
            .collect()
    }

    /// Pauses fetching of the partitions that feed full tables and resumes
    /// them once they drain. Pausing (rather than not polling) keeps the
    /// group membership alive however long ClickHouse is away.
    fn apply_backpressure(&mut self, consumer: &dyn ConsumerControl) {
        let topics = self.topics_to_pause();
        let replaying = self
            .tables
            .iter()
            .any(|t| t.open.iter().any(|b| b.replay_last.is_some()));
        // Unchanged, and no replay that may have started or ended: the
        // steady state costs no call into librdkafka.
        if topics == self.paused && !replaying && !self.pause_exempt {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let want = self.pause_state(&assignment);
        let pause: Vec<TopicPartition> = want
            .difference(&self.paused_partitions)
            .map(|&k| self.topic_partition(k))
            .collect();
        let resume: Vec<TopicPartition> = self
            .paused_partitions
            .difference(&want)
            .filter(|k| assignment.contains(&self.topic_partition(**k)))
            .map(|&k| self.topic_partition(k))
            .collect();
        if let Err(e) = consumer
            .pause(&pause)
            .and_then(|()| consumer.resume(&resume))
        {
            tracing::warn!(error = %e, "could not pause/resume partitions");
            return;
        }
        if topics != self.paused {
            let names = topics
                .iter()
                .map(|&t| self.topics[t as usize].name.as_str())
                .collect::<Vec<_>>()
                .join(",");
            tracing::info!(
                buffered_bytes = self.buffered_bytes(),
                paused = %names,
                "{}",
                if topics.len() > self.paused.len() {
                    "tables full: consumption of the topics feeding them paused until inserts catch up"
                } else {
                    "consumption resumed"
                }
            );
        }
        self.metrics.paused.set(i64::from(!want.is_empty()));
        self.pause_exempt = replaying && !topics.is_empty();
        self.paused = topics;
        self.paused_partitions = want;
    }

    // ------------------------------------------------------------ commits

    /// Commits acknowledged positions: those that moved (periodic, async),
    /// or all of `only` (revocation, shutdown; synchronous). A request that
    /// fails at once is repeated by the next commit even if nothing moved.
    fn commit(
        &mut self,
        consumer: &dyn ConsumerControl,
        sync: bool,
        only: Option<&[PartitionKey]>,
    ) {
        self.last_commit = Instant::now();
        if only.is_none() {
            self.pass_offsets_without_records(consumer);
        }
        let positions = self.tracker.take_commits(only);
        if positions.is_empty() {
            return;
        }
        let list: Vec<(String, i32, i64)> = positions
            .iter()
            .map(|&(key, offset)| {
                let (t, p) = self.topic_partition(key);
                (t, p, offset)
            })
            .collect();
        self.metrics.commits.with_label_values(&["sent"]).inc();
        match consumer.commit(&list, sync) {
            Ok(()) if sync => tracing::debug!(partitions = list.len(), "committed synchronously"),
            Ok(()) => {}
            Err(e) => {
                self.metrics.commits.with_label_values(&["failed"]).inc();
                tracing::warn!(error = %e, "offset commit failed; the next commit will repeat it");
                for (key, _) in positions {
                    self.tracker.forget_committed(key);
                }
            }
        }
    }

    /// Transaction markers (and aborted records, under read_committed) take
    /// offsets the consumer never returns: the last one of an idle partition
    /// would stay uncommitted, a false lag of one for good. The consumer's
    /// own position says how far it passed them. A stopped topic's position
    /// is not taken: its last record was returned but not consumed.
    fn pass_offsets_without_records(&mut self, consumer: &dyn ConsumerControl) {
        let Ok(positions) = consumer.positions() else {
            return;
        };
        for (topic, partition, offset) in positions {
            if let Some(key) = self.key(&topic, partition) {
                if !self.stopped_topics.contains(&key.topic) {
                    self.tracker.passed(key, offset);
                }
            }
        }
    }

    // ------------------------------------------------------------ rebalances

    pub fn on_assign(&mut self, partitions: &[TopicPartition]) {
        let keys = self.keys_of(partitions);
        for &key in &keys {
            self.tracker.assign(key);
            self.ownership.set(key, self.tracker.generation(key));
        }
        tracing::info!(partitions = %describe(partitions), "partitions assigned");
        if self.exactly_once.is_some() {
            self.recover(&keys);
        }
    }

    /// Exactly-once: reads the ranges recorded for `keys` (by whichever
    /// process owned them before), waiting for ClickHouse as long as it takes
    /// unless a shutdown is requested. Returns false on shutdown.
    fn recover(&mut self, keys: &[PartitionKey]) -> bool {
        let Some(eo) = &self.exactly_once else {
            return true;
        };
        let topics: Vec<String> = keys
            .iter()
            .map(|k| self.topics[k.topic as usize].name.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut attempt = 0;
        let latest = loop {
            let stop = self.stop.clone();
            let read = eo.runtime.block_on(async {
                tokio::select! {
                    r = eo.state.latest(&topics) => Some(r),
                    _ = stop.cancelled() => None,
                }
            });
            match read {
                None => return false,
                Some(Ok(latest)) => break latest,
                Some(Err(e))
                    if crate::sink::errors::classify(&e).class
                        != crate::sink::ErrorClass::Transient =>
                {
                    let e = PipelineError::Config(format!(
                        "exactly-once: cannot read the recorded batch ranges from {}: {e}",
                        eo.state.name()
                    ));
                    self.fail(e);
                    return false;
                }
                Some(Err(e)) => {
                    tracing::warn!(state_table = %eo.state.name(), error = %e, attempt,
                        "exactly-once: cannot read the recorded batch ranges; consumption waits until ClickHouse answers")
                }
            }
            let wait = crate::sink::backoff(&eo.retry, attempt);
            attempt += 1;
            eo.health.turn();
            std::thread::sleep(wait);
        };
        for &key in keys {
            let topic = &self.topics[key.topic as usize];
            for &r in &topic.routes {
                let table = &mut self.tables[self.routes[r].table];
                match latest.get(&(table.name.clone(), topic.name.clone(), key.partition)) {
                    Some(r) => {
                        table.recovery.insert(
                            key,
                            Recovery::Recorded {
                                first: r.first,
                                last: r.last,
                            },
                        );
                        if r.splits.is_empty() {
                            table.replay_splits.remove(&key);
                        } else {
                            table.replay_splits.insert(key, r.splits.clone());
                        }
                    }
                    None => {
                        table.recovery.remove(&key);
                        table.replay_splits.remove(&key);
                    }
                }
            }
            self.recovered.insert(key);
        }
        true
    }

    /// Newly assigned partitions take the pause state of their topic.
    /// librdkafka keeps a partition's pause flag across revocation and
    /// reassignment, so a partition revoked while paused would otherwise
    /// come back paused for good.
    pub fn after_assign(&mut self, consumer: &dyn ConsumerControl, partitions: &[TopicPartition]) {
        let mut pause = Vec::new();
        let mut resume = Vec::new();
        for tp in partitions {
            let key = self.key(&tp.0, tp.1);
            if key.is_some_and(|k| self.paused.contains(&k.topic)) {
                if let Some(k) = key {
                    self.paused_partitions.insert(k);
                }
                pause.push(tp.clone());
            } else {
                if let Some(k) = key {
                    self.paused_partitions.remove(&k);
                }
                resume.push(tp.clone());
            }
        }
        if let Err(e) = consumer
            .pause(&pause)
            .and_then(|()| consumer.resume(&resume))
        {
            tracing::warn!(error = %e, "could not set the pause state of newly assigned partitions");
        }
    }

    /// Before partitions are given away: insert everything read from them,
    /// wait (up to the drain timeout) for ClickHouse, and commit, so the next
    /// owner starts exactly where this one stopped. Partitions *lost* (the
    /// session timed out, or the member was fenced) belong to another member
    /// already: their batches are discarded, not inserted, and nothing is
    /// committed for them.
    pub fn on_revoke(
        &mut self,
        consumer: &dyn ConsumerControl,
        partitions: &[TopicPartition],
        lost: bool,
    ) {
        let keys = self.keys_of(partitions);
        if lost {
            tracing::warn!(partitions = %describe(partitions),
                "partitions lost (session timed out or member fenced); their batches are discarded and their \
                 uncommitted records will be read again by their new owner");
            self.give_up(&keys);
        } else {
            let drained = self.closing || self.drain(consumer, Some(&keys));
            self.commit(consumer, true, Some(&keys));
            tracing::info!(partitions = %describe(partitions), drained, "partitions revoked");
            for &key in &keys {
                self.ownership.remove(key);
            }
            if self.exactly_once.is_some() {
                self.discard_batches_of(&keys);
            }
        }
        self.forget(&keys);
    }

    /// The member no longer owns anything it holds (a fatal consumer error,
    /// such as a fenced static member): nothing more is inserted or
    /// committed; the partitions' new owners read their records again.
    pub fn abandon(&mut self) {
        let keys: Vec<PartitionKey> = self.tracker.keys().collect();
        self.give_up(&keys);
        self.forget(&keys);
        self.closing = true;
    }

    /// Stops inserting what `keys` hold: the sinks drop their batches before
    /// the next attempt, and the batches not sent yet are discarded.
    fn give_up(&mut self, keys: &[PartitionKey]) {
        for &key in keys {
            self.ownership.remove(key);
        }
        self.discard_batches_of(keys);
    }

    /// Forgets everything about partitions no longer assigned.
    fn forget(&mut self, keys: &[PartitionKey]) {
        for &key in keys {
            self.tracker.revoke(key);
            self.recovered.remove(&key);
            self.paused_partitions.remove(&key);
            for t in &mut self.tables {
                t.recovery.remove(&key);
                t.reread.revoke(key);
                t.checked.remove(&key);
                t.dead_letters.remove(&key);
                t.replay_splits.remove(&key);
                let gone: usize = t
                    .judging
                    .iter()
                    .filter(|j| j.key == key)
                    .map(|j| j.bytes)
                    .sum();
                t.judging.retain(|j| j.key != key);
                t.buffered = t.buffered.saturating_sub(gone);
            }
            self.metrics
                .forget_partition(&self.topics[key.topic as usize].name, key.partition);
        }
        self.abandoned.retain(|s| !keys.contains(&s.key));
    }

    /// Batches holding only partitions no longer owned are not inserted
    /// (the new owner reads their records again); their memory is given
    /// back. A batch that also holds a partition still owned is kept.
    fn discard_batches_of(&mut self, keys: &[PartitionKey]) {
        for t in &mut self.tables {
            let gone = |segments: &[Segment]| {
                !segments.is_empty() && segments.iter().all(|s| keys.contains(&s.key))
            };
            let mut freed = 0;
            t.open.retain(|b| {
                let keep = !gone(&b.segments);
                if !keep {
                    freed += b.accounted;
                }
                keep
            });
            t.waiting.retain(|b| {
                let keep = !gone(&b.segments);
                if !keep {
                    freed += b.accounted;
                }
                keep
            });
            t.buffered = t.buffered.saturating_sub(freed);
        }
    }

    // ------------------------------------------------------------ drains

    /// When every drain must be over once a shutdown was asked for: the
    /// drain timeout after the request was first seen, shared by a
    /// revocation under way and the final drain, so that a stop never takes
    /// longer than `shutdown_timeout` however they follow each other.
    fn stop_deadline(&mut self) -> Option<Instant> {
        if !self.stop.is_cancelled() {
            return None;
        }
        let timeout = self.limits.drain_timeout;
        Some(
            *self
                .stop_deadline
                .get_or_insert_with(|| Instant::now() + timeout),
        )
    }

    /// Holds of `keys` a drain does not wait for: refused batches, replayed
    /// ranges it abandoned, records waiting to be read again, and batches
    /// held back by a dead letter that failed.
    fn parked(&self, keys: &[PartitionKey]) -> (usize, usize) {
        let of = |s: &&Segment| keys.contains(&s.key);
        let refused = self.refused.iter().filter(of).count();
        // Batches held back for good: by a dead letter that failed, or by a
        // record the bridge or its topic stopped on.
        let gated_failed: usize = self
            .tables
            .iter()
            .filter(|t| self.fatal.is_some() || t.judging.iter().any(|j| j.stopped))
            .flat_map(|t| t.waiting.iter().filter(|b| t.gated(b)))
            .flat_map(|b| &b.segments)
            .filter(of)
            .count();
        let other = self.abandoned.iter().filter(of).count()
            + self
                .tables
                .iter()
                .flat_map(|t| t.reread.holds().chain(t.judging.iter().map(|j| &j.hold)))
                .filter(of)
                .count()
            + gated_failed;
        (refused, other)
    }

    /// Closes every batch holding records of `keys` (all when `None`) and waits
    /// until ClickHouse acknowledged them or the drain timeout passed.
    /// Returns true when nothing of those partitions is left unacknowledged.
    pub fn drain(&mut self, consumer: &dyn ConsumerControl, keys: Option<&[PartitionKey]>) -> bool {
        let keys: Vec<PartitionKey> = match keys {
            Some(k) => k.to_vec(),
            None => self.tracker.keys().collect(),
        };
        for ti in 0..self.tables.len() {
            self.close_batches_of(ti, &keys);
        }
        let mut deadline = Instant::now() + self.limits.drain_timeout;
        loop {
            if let Some(d) = self.stop_deadline() {
                deadline = deadline.min(d);
            }
            // Failed records waiting for a check hold batches back: ask.
            self.request_checks(Instant::now());
            for ti in 0..self.tables.len() {
                self.send_waiting(ti);
            }
            let (refused, other) = self.parked(&keys);
            let held = keys
                .iter()
                .map(|k| self.tracker.held(*k))
                .sum::<usize>()
                .saturating_sub(refused + other);
            if held == 0 {
                return refused == 0;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    unacknowledged_batches = held,
                    "drain timeout passed with batches not yet acknowledged by ClickHouse; \
                     their records stay uncommitted and will be read again"
                );
                return false;
            }
            match self
                .events
                .recv_timeout((deadline - now).min(Duration::from_millis(100)))
            {
                Ok(ev) => self.on_event(ev),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return false,
            }
            // Keep the consumer's own liveness: commits of what is done so far.
            if Instant::now().duration_since(self.last_commit) >= self.limits.commit_interval {
                self.commit(consumer, false, None);
            }
        }
    }

    /// Final step of a shutdown: drain everything and commit synchronously.
    pub fn shutdown(&mut self, consumer: &dyn ConsumerControl) -> bool {
        let drained = self.drain(consumer, None);
        self.closing = true;
        let keys: Vec<PartitionKey> = self.tracker.keys().collect();
        self.commit(consumer, true, Some(&keys));
        drained
    }
}

fn describe(partitions: &[TopicPartition]) -> String {
    partitions
        .iter()
        .map(|(t, p)| format!("{t}[{p}]"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KafkaConfig;
    use crate::decode::{json::JsonDecoder, Decoder, RecordError, UnknownFields};
    use crate::exactly_once::memory::MemoryStore;
    use crate::kafka::control::fake::FakeConsumer;
    use crate::schema::TableSchema;

    struct Harness {
        core: Core,
        sinks: Vec<mpsc::Receiver<ReadyBatch>>,
        events: std_mpsc::Sender<SinkEvent>,
        store: Arc<MemoryStore>,
        _rt: Option<tokio::runtime::Runtime>,
    }

    const P0: PartitionKey = PartitionKey {
        topic: 0,
        partition: 0,
    };
    const P1: PartitionKey = PartitionKey {
        topic: 0,
        partition: 1,
    };

    fn table_a() -> TableSchema {
        TableSchema::from_columns("db", "a", &[("id", "UInt64")])
    }

    fn table_b() -> TableSchema {
        TableSchema::from_columns("db", "b", &[("id", "UInt8")])
    }

    fn json(schema: &TableSchema) -> Box<dyn Decoder> {
        Box::new(JsonDecoder::new(
            schema,
            UnknownFields::Ignore,
            crate::decode::DecodeLimits::default(),
        ))
    }

    fn limits(max_rows: usize) -> Limits {
        Limits {
            max_rows,
            max_bytes: 1 << 20,
            max_wait: Duration::from_secs(60),
            commit_interval: Duration::from_secs(60),
            max_buffered_bytes: 1 << 24,
            drain_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(60),
        }
    }

    /// One topic "t" fanned out to a lenient table "db.a" (UInt64, `a_policy`)
    /// and a strict table "db.b" (UInt8, `b_policy`).
    fn harness_with(
        a_policy: OnError,
        b_policy: OnError,
        limits: Limits,
        shared: Shared,
    ) -> Harness {
        let (a, b) = (table_a(), table_b());
        let (events, events_rx) = std_mpsc::channel();
        let metrics = Arc::new(Metrics::new());
        let mut tables = Vec::new();
        let mut sinks = Vec::new();
        for s in [&a, &b] {
            let (tx, rx) = mpsc::channel(8);
            tables.push(TableState::new(s.to_string(), tx));
            sinks.push(rx);
        }
        let mut ra = route_config(a_policy);
        let mut rb = route_config(b_policy);
        for r in [&mut ra, &mut rb] {
            if r.on_error == OnError::DeadLetter {
                r.dead_letter_topic = Some("dlq".into());
            }
        }
        let routes = vec![
            RouteState::new(0, json(&a), &ra),
            RouteState::new(1, json(&b), &rb),
        ];
        let core = Core::new(
            limits,
            vec![("t".into(), vec![0, 1])],
            routes,
            tables,
            events_rx,
            shared,
            metrics,
        );
        Harness {
            core,
            sinks,
            events,
            store: Arc::new(MemoryStore::default()),
            _rt: None,
        }
    }

    fn harness(b_policy: OnError, max_rows: usize) -> Harness {
        harness_with(OnError::Skip, b_policy, limits(max_rows), Shared::default())
    }

    fn route_config(on_error: OnError) -> crate::config::RouteConfig {
        crate::config::RouteConfig {
            topics: vec!["t".into()],
            table: "x".into(),
            format: Default::default(),
            unknown_fields: UnknownFields::Ignore,
            on_error,
            dead_letter_topic: None,
            max_failed_ratio: 0.5,
            failed_window: Duration::from_secs(60),
            columns: Default::default(),
            flatten: None,
            schema_file: None,
            message: None,
            fields: None,
            registry: true,
            auto_add_columns: false,
            limits: Default::default(),
        }
    }

    fn record(offset: i64, json: &str) -> Record<'_> {
        record_at(0, offset, json)
    }

    fn record_at(partition: i32, offset: i64, json: &str) -> Record<'_> {
        Record {
            topic: "t",
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            value: Some(json.as_bytes()),
            headers: None,
        }
    }

    /// The harness in exactly-once mode over a state store holding
    /// `recorded` (first, last) for table db.a, partition 0. Nothing is read
    /// from it before the first record of a partition: recovery runs as in
    /// the bridge (`Core::recover`).
    fn exactly_once_harness_with(
        recorded: &[(i32, i64, i64)],
        a_policy: OnError,
        b_policy: OnError,
        limits: Limits,
    ) -> Harness {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(MemoryStore::with(
            &recorded
                .iter()
                .map(|&(partition, first, last)| BatchRange {
                    table: "db.a".into(),
                    topic: "t".into(),
                    partition,
                    first,
                    last,
                })
                .collect::<Vec<_>>(),
        ));
        let shared = Shared {
            exactly_once: Some(ExactlyOnce {
                state: store.clone(),
                runtime: rt.handle().clone(),
                retry: crate::config::RetryConfig::default(),
                health: Arc::new(crate::observability::Health::new(Duration::from_secs(60))),
            }),
            ..Shared::default()
        };
        let mut h = harness_with(a_policy, b_policy, limits, shared);
        h.store = store;
        h._rt = Some(rt);
        h
    }

    fn exactly_once_harness(recorded: Option<(i64, i64)>) -> Harness {
        let recorded: Vec<(i32, i64, i64)> = recorded.map(|(f, l)| (0, f, l)).into_iter().collect();
        exactly_once_harness_with(&recorded, OnError::Skip, OnError::Skip, limits(1000))
    }

    fn ranges(h: &mut Harness, table: usize) -> Vec<(i32, i64, i64, usize)> {
        let mut out = Vec::new();
        while let Ok(b) = h.sinks[table].try_recv() {
            let r = b.range.unwrap();
            out.push((r.partition, r.first, r.last, b.rows.len()));
        }
        out
    }

    fn close_all(h: &mut Harness) {
        for ti in 0..h.core.tables.len() {
            while !h.core.tables[ti].open.is_empty() {
                h.core.close_batch(ti, 0);
            }
        }
    }

    /// Acknowledges every batch the sinks hold.
    fn ack_all(h: &mut Harness) {
        for ti in 0..h.sinks.len() {
            while let Ok(batch) = h.sinks[ti].try_recv() {
                h.core.on_event(SinkEvent::Inserted { batch, rejected: 0 });
            }
        }
    }

    fn offsets(b: &ReadyBatch) -> Vec<i64> {
        b.rows.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn exactly_once_batches_hold_one_partition_each() {
        let mut h = exactly_once_harness(None);
        for o in 0..3 {
            h.core.on_record(&record_at(0, o, r#"{"id":1}"#));
            h.core.on_record(&record_at(1, o + 10, r#"{"id":2}"#));
        }
        close_all(&mut h);
        let mut got = ranges(&mut h, 0);
        got.sort();
        assert_eq!(got, vec![(0, 0, 2, 3), (1, 10, 12, 3)]);
    }

    #[test]
    fn a_recorded_range_is_replayed_exactly_when_the_commit_is_below_it() {
        let mut h = exactly_once_harness(Some((10, 19)));
        // The group's commit stands at 5: 5..9 are in table a already.
        for o in 5..25 {
            h.core.on_record(&record(o, r#"{"id":1}"#));
        }
        close_all(&mut h);
        assert_eq!(ranges(&mut h, 0), vec![(0, 10, 19, 10), (0, 20, 24, 5)]);
        // Table b has no recorded range: everything from 5, in one batch.
        assert_eq!(ranges(&mut h, 1), vec![(0, 5, 24, 20)]);
        assert_eq!(h.core.tracker.position(P0), Some(5), "held by the batches");
        // Recovery went through the store, once for the partition.
        assert_eq!(h.store.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(h.core.metrics.replays.with_label_values(&["db.a"]).get(), 1);
    }

    #[test]
    fn a_replayed_range_keeps_its_end_when_its_last_records_fail() {
        let mut h = exactly_once_harness(Some((10, 14)));
        for o in 10..13 {
            h.core.on_record(&record(o, r#"{"id":1}"#));
        }
        // 13 and 14 cannot become rows; the range still ends at 14.
        h.core.on_record(&record(13, r#"{"id":"x"}"#));
        h.core.on_record(&record(14, r#"not json"#));
        h.core.on_record(&record(15, r#"{"id":1}"#));
        close_all(&mut h);
        assert_eq!(ranges(&mut h, 0), vec![(0, 10, 14, 3), (0, 15, 15, 1)]);
    }

    #[test]
    fn a_replayed_range_holds_the_commit_at_its_start() {
        let mut h = exactly_once_harness(Some((10, 14)));
        // 10 and 11 fail: without a hold at 10 the commit could pass the
        // range's start before its rows land, and the next owner would skip it.
        h.core.on_record(&record(10, "bad"));
        h.core.on_record(&record(11, "bad"));
        h.core.on_record(&record(12, r#"{"id":1}"#));
        assert_eq!(h.core.tracker.position(P0), Some(10));
        // A range whose records all fail releases its hold when it ends.
        let mut h = exactly_once_harness(Some((10, 11)));
        h.core.on_record(&record(10, "bad"));
        h.core.on_record(&record(11, "bad"));
        assert!(h.core.tables[0].open.is_empty());
        assert_eq!(h.core.tracker.held(P0), 0);
    }

    #[test]
    fn a_commit_past_a_recorded_range_start_skips_the_whole_range() {
        let mut h = exactly_once_harness(Some((10, 19)));
        // Commit at 12 > 10: the batch [10, 19] was acknowledged.
        for o in 12..22 {
            h.core.on_record(&record(o, r#"{"id":1}"#));
        }
        close_all(&mut h);
        assert_eq!(ranges(&mut h, 0), vec![(0, 20, 21, 2)]);
        assert_eq!(ranges(&mut h, 1), vec![(0, 12, 21, 10)]);
    }

    #[test]
    fn revoked_partitions_lose_their_exactly_once_batches() {
        let mut h = exactly_once_harness(None);
        h.core.on_record(&record_at(0, 0, r#"{"id":1}"#));
        h.core.on_record(&record_at(1, 0, r#"{"id":1}"#));
        let before = h.core.buffered_bytes();
        h.core.discard_batches_of(&[P0]);
        assert_eq!(h.core.tables[0].open.len(), 1);
        assert!(h.core.buffered_bytes() < before);
        close_all(&mut h);
        assert_eq!(ranges(&mut h, 0), vec![(1, 0, 0, 1)]);
    }

    #[test]
    fn a_route_failing_above_its_ratio_stops_with_the_counts() {
        let mut h = harness(OnError::Skip, 1000);
        for o in 0..300 {
            let json = if o % 3 == 0 { r#"{"id":1}"# } else { "bad" };
            assert_ne!(
                h.core.on_record(&record(o, json)),
                Flow::Stop,
                "the bridge goes on"
            );
        }
        assert!(h.core.fatal().is_none());
        // Two thirds fail: the limit (0.5) trips once 100 records are seen,
        // at offset 100. Its topic stops there: nothing from 100 on is
        // consumed, and the commit cannot pass it.
        assert!(h.core.stopped_topics.contains(&0));
        assert_eq!(h.core.topics_to_pause(), BTreeSet::from([0]));
        close_all(&mut h);
        for ti in 0..2 {
            while let Ok(b) = h.sinks[ti].try_recv() {
                assert!(b.rows.iter().all(|r| r.offset < 100), "{:?}", b.rows);
                h.core.on_event(SinkEvent::Inserted {
                    batch: b,
                    rejected: 0,
                });
            }
        }
        assert_eq!(h.core.tracker.position(P0), Some(100));
    }

    #[test]
    fn a_full_batch_goes_to_its_sink_and_only_its_ack_moves_the_position() {
        let mut h = harness(OnError::Skip, 2);
        h.core.on_record(&record(0, r#"{"id":1}"#));
        h.core.on_record(&record(1, r#"{"id":2}"#));
        assert_eq!(h.core.tracker.position(P0), Some(0));
        let batch_a = h.sinks[0].try_recv().unwrap();
        let batch_b = h.sinks[1].try_recv().unwrap();
        assert_eq!((batch_a.rows.len(), batch_b.rows.len()), (2, 2));
        // RowBinaryWithDefaults: a 0 flag, then the value.
        assert_eq!(&batch_b.body[..], &[0, 1, 0, 2]);
        h.events
            .send(SinkEvent::Inserted {
                batch: batch_a,
                rejected: 0,
            })
            .unwrap();
        while let Ok(ev) = h.core.events.try_recv() {
            h.core.on_event(ev);
        }
        assert_eq!(
            h.core.tracker.position(P0),
            Some(0),
            "table b still holds offset 0"
        );
        h.core.on_event(SinkEvent::Inserted {
            batch: batch_b,
            rejected: 0,
        });
        assert_eq!(h.core.tracker.position(P0), Some(2));
        assert_eq!(h.core.buffered_bytes(), 0);
    }

    #[test]
    fn a_record_skipped_by_one_route_still_lands_in_the_other() {
        let mut h = harness(OnError::Skip, 100);
        h.core.on_record(&record(0, r#"{"id":300}"#)); // too big for b's UInt8
        assert_eq!(h.core.tables[0].open[0].rows.len(), 1);
        assert!(h.core.tables[1].open.is_empty());
        assert_eq!(
            h.core.tracker.position(P0),
            Some(0),
            "held by a's open batch"
        );
    }

    #[test]
    fn a_stop_takes_the_record_back_from_the_routes_that_took_it() {
        let mut h = harness(OnError::Stop, 100);
        h.core.on_record(&record(0, r#"{"id":1}"#));
        let before = (h.core.tables[0].open[0].body.len(), h.core.buffered_bytes());
        h.core.on_record(&record(1, r#"{"id":300}"#));
        assert!(matches!(
            h.core.fatal(),
            Some(PipelineError::BadRecord { offset: 1, .. })
        ));
        // Table a took offset 1 first; it was removed again.
        assert_eq!(h.core.tables[0].open[0].rows.len(), 1);
        assert_eq!(
            (h.core.tables[0].open[0].body.len(), h.core.buffered_bytes()),
            before
        );
        assert_eq!(h.core.tables[0].open[0].segments.len(), 1);
        assert_eq!(
            h.core.tracker.held(P0),
            2,
            "offset 0 held by a and b, nothing else"
        );
    }

    /// Fails the record at `at` with `kind`, decodes the others with `inner`.
    struct FailAt {
        inner: Box<dyn Decoder>,
        at: i64,
        kind: RecordErrorKind,
    }

    impl Decoder for FailAt {
        fn decode(&mut self, rec: &Record<'_>, out: &mut Vec<u8>) -> Result<(), RecordError> {
            if rec.offset == self.at {
                return Err(RecordError {
                    kind: self.kind,
                    column: None,
                    message: "scripted".into(),
                });
            }
            self.inner.decode(rec, out)
        }
    }

    /// Item 1: a record the bridge stops on is in no batch's range, whatever
    /// made it stop and whichever route took it first: a closed range
    /// [first, X] would make the next start skip X for good.
    #[test]
    fn a_record_the_bridge_stops_on_is_in_no_recorded_range() {
        let stops = [
            (OnError::Stop, RecordErrorKind::Conversion),
            (OnError::Skip, RecordErrorKind::Unavailable),
            (OnError::DeadLetter, RecordErrorKind::Schema),
        ];
        for (policy, kind) in stops {
            let mut h = exactly_once_harness_with(&[], OnError::Skip, policy, limits(1000));
            h.core.routes[1].decoder = Box::new(FailAt {
                inner: json(&table_b()),
                at: 5,
                kind,
            });
            for o in 0..5 {
                assert_eq!(h.core.on_record(&record(o, r#"{"id":1}"#)), Flow::Go);
            }
            // Table a takes 5 first; table b stops on it.
            assert_eq!(
                h.core.on_record(&record(5, r#"{"id":1}"#)),
                Flow::Stop,
                "{kind:?}"
            );
            assert!(h.core.fatal().is_some());
            // What a shutdown drain would send:
            close_all(&mut h);
            assert_eq!(ranges(&mut h, 0), vec![(0, 0, 4, 5)], "{kind:?}: table a");
            assert_eq!(ranges(&mut h, 1), vec![(0, 0, 4, 5)], "{kind:?}: table b");
            assert_eq!(h.core.tracker.position(P0), Some(0));
        }
    }

    /// Item 1: a route stopped by max_failed_ratio leaves the record that
    /// tripped it out of every range too.
    #[test]
    fn a_route_stopped_for_failing_too_often_leaves_its_last_record_out_of_the_ranges() {
        let mut h = exactly_once_harness_with(&[], OnError::Skip, OnError::Skip, limits(10_000));
        for o in 0..300 {
            // Table b refuses two thirds (ids over 255); table a takes all.
            let json = if o % 3 == 0 {
                r#"{"id":1}"#
            } else {
                r#"{"id":300}"#
            };
            h.core.on_record(&record(o, json));
        }
        assert!(h.core.stopped_topics.contains(&0));
        close_all(&mut h);
        // The limit trips at offset 100 (the 100th record judged): nothing
        // from there on is in a range, in either table.
        assert_eq!(ranges(&mut h, 0), vec![(0, 0, 99, 100)]);
        let b = ranges(&mut h, 1);
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].1, b[0].2), (0, 99), "{b:?}");
    }

    fn dead_letters(events: std_mpsc::Sender<SinkEvent>) -> Arc<DeadLetters> {
        let cfg = KafkaConfig {
            // Nothing listens: sends are queued and never acknowledged
            // unless the test says so.
            brokers: "127.0.0.1:1".into(),
            group_id: "g".into(),
            instance_id: None,
            auto_offset_reset: crate::config::OffsetReset::Earliest,
            group_protocol: Default::default(),
            properties: Default::default(),
        };
        Arc::new(DeadLetters::new(&cfg, events, 1 << 20, Default::default()).unwrap())
    }

    /// Item 2: exactly-once, a batch whose range covers (or follows) a record
    /// sent to the dead-letter topic is not recorded or inserted until the
    /// broker has the dead letter: after a crash, recovery skips what the
    /// ranges cover, and a record neither inserted nor dead-lettered would
    /// be lost.
    #[test]
    fn a_batch_waits_for_the_dead_letters_below_its_end() {
        let mut h =
            exactly_once_harness_with(&[], OnError::DeadLetter, OnError::Skip, limits(1000));
        h.core.dead_letters = Some(dead_letters(h.events.clone()));
        h.core.on_record(&record(0, r#"{"id":1}"#));
        h.core.on_record(&record(1, "not json"));
        h.core.on_record(&record(2, r#"{"id":1}"#));
        close_all(&mut h);
        assert!(
            ranges(&mut h, 0).is_empty(),
            "sent before its dead letter was acknowledged"
        );
        assert_eq!(h.core.tables[0].waiting.len(), 1);
        assert_eq!(h.core.tables[0].in_sink, 0);
        // Table b does not dead-letter: its batch goes (1 is b's failure, skipped).
        assert_eq!(ranges(&mut h, 1), vec![(0, 0, 2, 2)]);
        let generation = h.core.tracker.generation(P0);
        h.core.on_event(SinkEvent::DeadLettered {
            segment: Segment {
                key: P0,
                generation,
                first_offset: 1,
            },
            table: 0,
            bytes: crate::kafka::dead_letter::size_of(&record(1, "not json")),
            error: None,
        });
        assert_eq!(ranges(&mut h, 0), vec![(0, 0, 2, 2)]);
        // A dead letter before the batch's first record holds it back too.
        h.core.on_record(&record(3, "not json"));
        h.core.on_record(&record(4, r#"{"id":1}"#));
        close_all(&mut h);
        assert!(ranges(&mut h, 0).is_empty());
    }

    /// Item 3: partitions lost (session timeout, fenced member) are another
    /// member's already: nothing of theirs is inserted or committed here.
    #[test]
    fn lost_partitions_discard_their_batches_and_commit_nothing() {
        let mut h = harness(OnError::Skip, 1000);
        let consumer = FakeConsumer::with(&[("t", 0), ("t", 1)]);
        h.core.on_assign(&[("t".into(), 0), ("t".into(), 1)]);
        for o in 0..3 {
            h.core.on_record(&record_at(0, o, r#"{"id":1}"#));
            h.core.on_record(&record_at(1, o, r#"{"id":1}"#));
        }
        h.core
            .on_revoke(&consumer, &[("t".into(), 0), ("t".into(), 1)], true);
        assert!(
            consumer.commits.borrow().is_empty(),
            "committed for lost partitions"
        );
        close_all(&mut h);
        assert!(
            h.sinks[0].try_recv().is_err(),
            "a lost partition's batch was sent"
        );
        assert_eq!(h.core.buffered_bytes(), 0);
        let seg = Segment {
            key: P0,
            generation: 1,
            first_offset: 0,
        };
        assert!(
            !h.core.ownership.owns(&seg),
            "the sinks still see it as owned"
        );
        // A fatal consumer error gives up everything the same way.
        let mut h = harness(OnError::Skip, 1000);
        h.core.on_assign(&[("t".into(), 0)]);
        h.core.on_record(&record(0, r#"{"id":1}"#));
        h.core.abandon();
        assert!(h.core.tables.iter().all(|t| t.open.is_empty()));
        assert!(!h.core.shutdown(&consumer) || consumer.commits.borrow().is_empty());
        assert!(consumer.commits.borrow().is_empty());
    }

    /// Item 5: a replayed range must read on to its end even while its table
    /// is full: paused, it could never finish, and the memory it holds would
    /// never come back.
    #[test]
    fn a_replay_reads_to_its_end_while_its_table_is_full() {
        let mut tiny = limits(1000);
        tiny.max_buffered_bytes = 16;
        let mut h =
            exactly_once_harness_with(&[(0, 0, 9), (1, 0, 9)], OnError::Skip, OnError::Skip, tiny);
        let consumer = FakeConsumer::with(&[("t", 0), ("t", 1)]);
        for o in 0..4 {
            h.core.on_record(&record_at(0, o, r#"{"id":1}"#));
        }
        h.core.service(&consumer);
        assert!(
            h.core.tables[0].buffered >= h.core.table_share(),
            "the table is full"
        );
        assert!(
            !consumer.is_paused("t", 0),
            "the replaying partition was paused"
        );
        assert!(consumer.is_paused("t", 1));
        for o in 4..10 {
            h.core.on_record(&record_at(0, o, r#"{"id":1}"#));
        }
        assert_eq!(
            ranges(&mut h, 0),
            vec![(0, 0, 9, 10)],
            "the replay completed"
        );
        h.core.service(&consumer);
        assert!(consumer.is_paused("t", 0), "paused once its replay ended");
    }

    /// Item 6: a batch's memory is given back as it was counted, whatever
    /// the sink did to its body.
    #[test]
    fn buffered_bytes_return_to_zero_whatever_the_sink_did_to_the_body() {
        let mut h = harness(OnError::Skip, 2);
        h.core.on_record(&record(0, r#"{"id":1}"#));
        h.core.on_record(&record(1, r#"{"id":2}"#));
        for ti in 0..2 {
            let mut b = h.sinks[ti].try_recv().unwrap();
            b.body = b.body.slice(..1); // re-encoded shorter (a dropped column)
            h.core.on_event(SinkEvent::Inserted {
                batch: b,
                rejected: 0,
            });
        }
        assert_eq!(h.core.buffered_bytes(), 0);
    }

    /// Item 13: each row's origin and each dead letter not yet acknowledged
    /// count in the budget, and a record that fills its table's share asks
    /// for the housekeeping at once.
    #[test]
    fn row_origins_and_dead_letters_count_in_the_budget() {
        let mut l = limits(1000);
        l.max_buffered_bytes = 2 * (10 * (9 + ROW_ORIGIN_BYTES));
        let mut h = harness_with(OnError::DeadLetter, OnError::Skip, l, Shared::default());
        h.core.dead_letters = Some(dead_letters(h.events.clone()));
        let mut flows = Vec::new();
        for o in 0..10 {
            flows.push(h.core.on_record(&record(o, r#"{"id":1}"#)));
        }
        // a: 10 rows of 9 bytes (flag + UInt64); b: 10 of 2.
        assert_eq!(h.core.tables[0].buffered, 10 * (9 + ROW_ORIGIN_BYTES));
        assert_eq!(h.core.tables[1].buffered, 10 * (2 + ROW_ORIGIN_BYTES));
        assert_eq!(flows.last(), Some(&Flow::Service), "{flows:?}");
        assert!(flows[..9].iter().all(|f| *f == Flow::Go), "{flows:?}");
        let before = h.core.tables[0].buffered;
        h.core.on_record(&record(10, "not json"));
        let letter = h.core.tables[0].buffered - before;
        assert_eq!(
            letter,
            crate::kafka::dead_letter::size_of(&record(10, "not json"))
        );
        let generation = h.core.tracker.generation(P0);
        h.core.on_event(SinkEvent::DeadLettered {
            segment: Segment {
                key: P0,
                generation,
                first_offset: 10,
            },
            table: 0,
            bytes: letter,
            error: None,
        });
        assert_eq!(h.core.tables[0].buffered, before);
    }

    /// Item 14: a commit that fails at once is sent again by the next
    /// periodic commit, even for a partition where nothing moved since;
    /// and so is one the broker refused later (the commit callback).
    #[test]
    fn a_commit_that_fails_is_repeated_for_an_idle_partition() {
        let mut l = limits(1000);
        l.commit_interval = Duration::ZERO;
        let mut h = harness_with(OnError::Skip, OnError::Skip, l, Shared::default());
        let consumer = FakeConsumer::with(&[("t", 0)]);
        h.core.on_assign(&[("t".into(), 0)]);
        h.core.on_record(&record(0, "bad")); // skipped by both: nothing held
        *consumer.fail_commits.borrow_mut() = 1;
        h.core.service(&consumer);
        assert_eq!(consumer.committed("t", 0), None);
        h.core.service(&consumer);
        assert_eq!(
            consumer.committed("t", 0),
            Some(1),
            "the failed commit was not repeated"
        );
        // Refused by the broker later: reported through the events channel.
        let sent = consumer.commits.borrow().len();
        h.core.service(&consumer);
        assert_eq!(
            consumer.commits.borrow().len(),
            sent,
            "nothing moved, nothing failed"
        );
        h.events
            .send(SinkEvent::CommitFailed(vec![("t".into(), 0)]))
            .unwrap();
        h.core.service(&consumer);
        assert_eq!(consumer.commits.borrow().len(), sent + 1);
    }

    /// Item 15: once a stop is asked for, a revocation drain and the final
    /// drain together take at most the drain timeout, not one each.
    #[test]
    fn a_stop_during_a_revocation_bounds_both_drains_together() {
        let stop = CancellationToken::new();
        let shared = Shared {
            stop: stop.clone(),
            ..Shared::default()
        };
        let mut h = harness_with(OnError::Skip, OnError::Skip, limits(1000), shared);
        let consumer = FakeConsumer::with(&[("t", 0), ("t", 1)]);
        h.core.on_assign(&[("t".into(), 0), ("t".into(), 1)]);
        h.core.on_record(&record_at(0, 0, r#"{"id":1}"#));
        h.core.on_record(&record_at(1, 0, r#"{"id":1}"#));
        // ClickHouse never answers; SIGTERM arrives as the revocation starts.
        stop.cancel();
        let started = Instant::now();
        h.core.on_revoke(&consumer, &[("t".into(), 0)], false);
        assert!(!h.core.shutdown(&consumer));
        let took = started.elapsed();
        assert!(
            took < h.core.limits.drain_timeout.mul_f64(1.5),
            "the two drains took {took:?} for a drain timeout of {:?}",
            h.core.limits.drain_timeout
        );
    }

    /// The harness with table a following a schema history; returns it.
    fn with_history(h: &mut Harness) -> Arc<History> {
        let (history, feed) = History::new(table_a());
        let t = std::mem::replace(
            &mut h.core.tables[0],
            TableState::new(String::new(), mpsc::channel(1).0),
        );
        h.core.tables[0] = t.with_schema_feed(feed, history.clone());
        history
    }

    /// Item 8: when a table's columns change, the rows decoded for the old
    /// ones and not inserted yet are decoded again from their records (a
    /// new column takes the records' values), not re-encoded with defaults.
    /// The other tables of the topic take nothing twice.
    #[test]
    fn a_table_change_decodes_pending_records_again_from_kafka() {
        let mut h = harness(OnError::Skip, 1000);
        let history = with_history(&mut h);
        let consumer = FakeConsumer::with(&[("t", 0)]);
        h.core.on_assign(&[("t".into(), 0)]);
        let rec = |o: i64| format!(r#"{{"id":{o},"c":{}}}"#, o * 10);
        for o in 0..5 {
            h.core.on_record(&record(o, &rec(o)));
        }
        // ALTER TABLE db.a ADD COLUMN c UInt64, seen by the sink.
        history.observe(TableSchema::from_columns(
            "db",
            "a",
            &[("id", "UInt64"), ("c", "UInt64")],
        ));
        h.core.service(&consumer);
        assert_eq!(*consumer.seeks.borrow(), vec![("t".to_string(), 0, 0)]);
        assert_eq!(
            h.core.tracker.position(P0),
            Some(0),
            "held while read again"
        );
        // The consumer reads 0..4 again, then goes on.
        for o in 0..8 {
            h.core.on_record(&record(o, &rec(o)));
        }
        close_all(&mut h);
        let a = h.sinks[0].try_recv().unwrap();
        assert_eq!(offsets(&a), (0..8).collect::<Vec<_>>());
        assert_eq!(a.schema_version, 1);
        // Every row carries its own `c`: flag 0 + UInt64 id, flag 0 + UInt64 c.
        for (i, row) in a.body.chunks(18).enumerate() {
            assert_eq!(&row[10..18], &(i as u64 * 10).to_le_bytes(), "row {i}");
        }
        let b = h.sinks[1].try_recv().unwrap();
        assert_eq!(
            offsets(&b),
            (0..8).collect::<Vec<_>>(),
            "table b took each record once"
        );
        assert_eq!(
            h.core
                .metrics
                .records_redecoded
                .with_label_values(&["db.a"])
                .get(),
            5
        );
        h.core.on_event(SinkEvent::Inserted {
            batch: a,
            rejected: 0,
        });
        h.core.on_event(SinkEvent::Inserted {
            batch: b,
            rejected: 0,
        });
        assert_eq!(h.core.tracker.position(P0), Some(8));
        assert_eq!(h.core.buffered_bytes(), 0);
    }

    /// Item 8: a batch the sink returns as stale (the table changed while it
    /// waited) is read again as well, and the re-read waits for every batch
    /// the sink still had.
    #[test]
    fn a_stale_batch_from_the_sink_is_read_again() {
        let mut h = harness(OnError::Skip, 3);
        let history = with_history(&mut h);
        let consumer = FakeConsumer::with(&[("t", 0)]);
        h.core.on_assign(&[("t".into(), 0)]);
        for o in 0..6 {
            h.core.on_record(&record(o, r#"{"id":1}"#));
        }
        let first = h.sinks[0].try_recv().unwrap();
        let second = h.sinks[0].try_recv().unwrap();
        assert_eq!(h.core.tables[0].in_sink, 2);
        history.observe(TableSchema::from_columns(
            "db",
            "a",
            &[("id", "UInt64"), ("c", "UInt64")],
        ));
        h.core.on_event(SinkEvent::Inserted {
            batch: first,
            rejected: 0,
        });
        h.core.service(&consumer);
        assert!(
            consumer.seeks.borrow().is_empty(),
            "a batch is still in the sink"
        );
        h.core.on_event(SinkEvent::Stale {
            batch: second,
            recorded: false,
            splits: vec![],
        });
        h.core.service(&consumer);
        assert_eq!(*consumer.seeks.borrow(), vec![("t".to_string(), 0, 3)]);
    }

    /// Item 8: a record whose value does not convert (or whose field no
    /// column takes) is judged only against columns read after it: it waits
    /// for a check of the table. With on_error = "stop" the records before
    /// it go, nothing after it does, and nothing at or after it is committed.
    #[test]
    fn a_failed_record_waits_for_a_check_of_the_table_before_it_is_judged() {
        let mut h = harness_with(
            OnError::Stop,
            OnError::Skip,
            limits(1000),
            Shared::default(),
        );
        let _history = with_history(&mut h);
        let consumer = FakeConsumer::with(&[("t", 0)]);
        h.core.on_assign(&[("t".into(), 0)]);
        h.core.on_record(&record(0, r#"{"id":1}"#));
        // -1 does not fit UInt64 (unless the column changed to Int64).
        assert_eq!(h.core.on_record(&record(1, r#"{"id":-1}"#)), Flow::Go);
        assert!(
            h.core.fatal().is_none(),
            "judged before the table was checked"
        );
        h.core.on_record(&record(2, r#"{"id":2}"#));
        assert_eq!(h.core.tracker.position(P0), Some(0));
        close_all(&mut h);
        h.core.service(&consumer);
        assert!(
            h.core.tables[0].check.pending.is_some(),
            "no check asked for"
        );
        // The batch before the record went; the one after it waits.
        assert_eq!(offsets(&h.sinks[0].try_recv().unwrap()), vec![0]);
        assert!(
            h.sinks[0].try_recv().is_err(),
            "a row after the failed record was sent"
        );
        // The check answers: the table did not change. Judged now: stop.
        h.events
            .send(SinkEvent::SchemaChecked {
                table: 0,
                result: Ok(()),
            })
            .unwrap();
        h.core.service(&consumer);
        assert!(matches!(
            h.core.fatal(),
            Some(PipelineError::BadRecord { offset: 1, .. })
        ));
        assert!(
            consumer.seeks.borrow().is_empty(),
            "nothing needs reading again"
        );
        assert!(
            h.sinks[0].try_recv().is_err(),
            "a row after the failed record was sent"
        );
        assert_eq!(h.core.tracker.position(P0), Some(0));
    }

    /// Item 8: ... and when the check finds the column changed, the record is
    /// decoded for the new type instead of being refused: it is read again
    /// with the rows not inserted yet.
    #[test]
    fn a_value_only_the_new_column_type_holds_lands_after_the_check() {
        let mut h = harness_with(
            OnError::Stop,
            OnError::Skip,
            limits(1000),
            Shared::default(),
        );
        let history = with_history(&mut h);
        let consumer = FakeConsumer::with(&[("t", 0)]);
        h.core.on_assign(&[("t".into(), 0)]);
        h.core.on_record(&record(0, r#"{"id":1}"#));
        h.core.on_record(&record(1, r#"{"id":-1}"#));
        h.core.on_record(&record(2, r#"{"id":2}"#));
        h.core.service(&consumer);
        // MODIFY COLUMN id Int64, found by the check.
        history.observe(TableSchema::from_columns("db", "a", &[("id", "Int64")]));
        h.events
            .send(SinkEvent::SchemaChecked {
                table: 0,
                result: Ok(()),
            })
            .unwrap();
        h.core.service(&consumer);
        assert!(h.core.fatal().is_none(), "{:?}", h.core.fatal());
        // The batch before the failed record (on_error = "stop" sends it at
        // once) comes back from the sink as stale; the batch after it was
        // dropped: both are read again, with the failed record.
        assert!(
            consumer.seeks.borrow().is_empty(),
            "read again before the sink answered"
        );
        let before = h.sinks[0].try_recv().unwrap();
        assert_eq!(offsets(&before), vec![0]);
        h.core.on_event(SinkEvent::Stale {
            batch: before,
            recorded: false,
            splits: vec![],
        });
        h.core.service(&consumer);
        assert_eq!(*consumer.seeks.borrow(), vec![("t".to_string(), 0, 0)]);
        for o in 0..3 {
            let json = if o == 1 {
                r#"{"id":-1}"#.to_string()
            } else {
                format!(r#"{{"id":{o}}}"#)
            };
            assert_eq!(h.core.on_record(&record(o, &json)), Flow::Go);
        }
        assert!(h.core.fatal().is_none());
        close_all(&mut h);
        let a = h.sinks[0].try_recv().unwrap();
        assert_eq!(offsets(&a), vec![0, 1, 2]);
        assert_eq!(&a.body[10..18], &(-1i64).to_le_bytes());
    }

    /// Fan-out during a re-read: records read again for one table are not
    /// given to the other, and the commit waits for the re-read.
    #[test]
    fn records_read_again_for_one_table_do_not_reach_the_other() {
        let mut h = harness(OnError::Skip, 1000);
        let history = with_history(&mut h);
        let consumer = FakeConsumer::with(&[("t", 0), ("t", 1)]);
        h.core.on_assign(&[("t".into(), 0), ("t".into(), 1)]);
        for o in 0..4 {
            h.core.on_record(&record_at(0, o, r#"{"id":1}"#));
            h.core.on_record(&record_at(1, o, r#"{"id":1}"#));
        }
        close_all(&mut h);
        ack_all(&mut h);
        for o in 4..6 {
            h.core.on_record(&record_at(0, o, r#"{"id":1}"#));
        }
        history.observe(TableSchema::from_columns(
            "db",
            "a",
            &[("id", "UInt64"), ("x", "String")],
        ));
        h.core.service(&consumer);
        // Only partition 0 had rows not yet inserted into a.
        assert_eq!(*consumer.seeks.borrow(), vec![("t".to_string(), 0, 4)]);
        for o in 4..7 {
            h.core.on_record(&record_at(0, o, r#"{"id":1}"#));
        }
        close_all(&mut h);
        assert_eq!(offsets(&h.sinks[0].try_recv().unwrap()), vec![4, 5, 6]);
        assert_eq!(offsets(&h.sinks[1].try_recv().unwrap()), vec![4, 5, 6]);
        assert!(h.sinks[1].try_recv().is_err());
        let _ = P1;
    }

    /// A model of the whole re-read machinery: three partitions of records
    /// read by a simulated consumer that follows seeks and pauses, two tables
    /// whose columns change at random, checks that answer late, a sink that
    /// returns batches of old versions as stale. Whatever the interleaving,
    /// each table gets every record it can hold exactly once, in both modes.
    #[test]
    fn under_random_table_changes_each_table_gets_every_record_exactly_once() {
        use rand::{Rng, SeedableRng};
        const N: i64 = 400;
        for seed in 0..40u64 {
            for eos in [false, true] {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut l = limits(7);
                l.max_buffered_bytes = 1 << 30;
                let mut h = if eos {
                    exactly_once_harness_with(&[], OnError::Skip, OnError::Skip, l)
                } else {
                    harness_with(OnError::Skip, OnError::Skip, l, Shared::default())
                };
                let histories: Vec<Arc<History>> = (0..2)
                    .map(|ti| {
                        let schema = if ti == 0 { table_a() } else { table_b() };
                        let (history, feed) = History::new(schema);
                        let t = std::mem::replace(
                            &mut h.core.tables[ti],
                            TableState::new(String::new(), mpsc::channel(1).0),
                        );
                        h.core.tables[ti] = t.with_schema_feed(feed, history.clone());
                        history
                    })
                    .collect();
                let parts: Vec<(String, i32)> = (0..3).map(|p| ("t".to_string(), p)).collect();
                let consumer = FakeConsumer::with(&[("t", 0), ("t", 1), ("t", 2)]);
                h.core.on_assign(&parts);
                // Record i of a partition: id i, too big for b's UInt8 from 256 on
                // (and then "conversion" failures for b, judged after checks).
                let values: Vec<String> = (0..N)
                    .map(|i| format!(r#"{{"id":{}}}"#, i * 7 % 300))
                    .collect();
                let mut position = [0i64; 3];
                let mut seeks_seen = 0;
                let mut inserted: Vec<Vec<(i32, i64)>> = vec![Vec::new(), Vec::new()];
                let mut extra = 0;
                let mut steps = 0;
                loop {
                    steps += 1;
                    assert!(steps < 200_000, "seed {seed} eos {eos}: no progress");
                    // The consumer: the next record of a partition that is not paused.
                    let ready: Vec<usize> = (0..3)
                        .filter(|&p| position[p] < N && !consumer.is_paused("t", p as i32))
                        .collect();
                    if !ready.is_empty() && rng.random_bool(0.8) {
                        let p = ready[rng.random_range(0..ready.len())];
                        let o = position[p];
                        position[p] += 1;

                        assert_ne!(
                            h.core
                                .on_record(&record_at(p as i32, o, &values[o as usize])),
                            Flow::Stop,
                            "seed {seed} eos {eos}: {:?}",
                            h.core.fatal()
                        );
                    }
                    // A table changes now and then (a column added).
                    if extra < 6 && rng.random_bool(0.01) {
                        let ti = rng.random_range(0..2);
                        extra += 1;
                        let mut cols = vec![("id", if ti == 0 { "UInt64" } else { "UInt8" })];
                        let names = ["x1", "x2", "x3", "x4", "x5", "x6"];
                        cols.extend(names[..extra].iter().map(|n| (*n, "String")));
                        let name = if ti == 0 { "a" } else { "b" };
                        histories[ti].observe(TableSchema::from_columns("db", name, &cols));
                    }
                    // The sinks: a batch of an old version comes back stale.
                    for ti in 0..2 {
                        if !rng.random_bool(0.3) {
                            continue;
                        }
                        if let Ok(batch) = h.sinks[ti].try_recv() {
                            if batch.schema_version != histories[ti].current().version {
                                h.core.on_event(SinkEvent::Stale {
                                    batch,
                                    recorded: false,
                                    splits: vec![],
                                });
                            } else {
                                inserted[ti]
                                    .extend(batch.rows.iter().map(|r| (r.key.partition, r.offset)));
                                h.core.on_event(SinkEvent::Inserted { batch, rejected: 0 });
                            }
                        }
                    }
                    // Checks answer late.
                    for ti in 0..2 {
                        if h.core.tables[ti].check.pending.is_some() && rng.random_bool(0.2) {
                            h.core.on_event(SinkEvent::SchemaChecked {
                                table: ti,
                                result: Ok(()),
                            });
                        }
                    }
                    if rng.random_bool(0.2) {
                        h.core.tables.iter_mut().for_each(|t| t.check.last = None);
                        h.core.service(&consumer);
                        let seeks = consumer.seeks.borrow();
                        for (_, p, o) in &seeks[seeks_seen..] {
                            position[*p as usize] = *o;
                        }
                        seeks_seen = seeks.len();
                    }
                    let idle = position.iter().all(|&p| p == N)
                        && h.core.tables.iter().all(|t| {
                            t.reread.is_idle()
                                && t.in_sink == 0
                                && t.judging.is_empty()
                                && t.waiting.is_empty()
                        })
                        && h.sinks.iter().all(|s| s.is_empty());
                    if idle {
                        close_all(&mut h);
                        if h.sinks.iter().all(|s| s.is_empty()) {
                            break;
                        }
                    }
                }
                for (ti, got) in inserted.iter_mut().enumerate() {
                    got.sort();
                    let want: Vec<(i32, i64)> = (0..3)
                        .flat_map(|p| (0..N).map(move |o| (p, o)))
                        .filter(|&(_, o)| ti == 0 || o * 7 % 300 <= 255)
                        .collect();
                    let dups: Vec<_> = got
                        .windows(2)
                        .filter(|w| w[0] == w[1])
                        .map(|w| w[0])
                        .collect();
                    assert!(
                        dups.is_empty(),
                        "seed {seed} eos {eos} table {ti}: twice: {dups:?}"
                    );
                    let missing: Vec<_> = want
                        .iter()
                        .filter(|w| got.binary_search(w).is_err())
                        .collect();
                    assert!(
                        missing.is_empty(),
                        "seed {seed} eos {eos} table {ti}: missing {missing:?}"
                    );
                    assert_eq!(got.len(), want.len(), "seed {seed} eos {eos} table {ti}");
                }
                for p in 0..3 {
                    let key = PartitionKey {
                        topic: 0,
                        partition: p,
                    };
                    assert_eq!(
                        h.core.tracker.position(key),
                        Some(N),
                        "seed {seed} eos {eos} p{p}"
                    );
                }
            }
        }
    }
}
