//! The pipeline's state on the consumer thread: routing each record to its
//! tables, the open batch of every table, and the offsets that may be committed.
//!
//! Records flow: message -> route(s) -> decoder -> the table's open batch ->
//! (full or old) -> the table's sink task -> acknowledgement back here ->
//! offsets released -> commit. Offsets travel with the data as the batch's
//! segments; only an acknowledgement, or a record skipped by policy, releases
//! them (see `kafka::offsets` for the rule itself).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntCounter;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OnError};
use crate::decode::{Decoder, RecordErrorKind};
use crate::exactly_once::{BatchRange, StateStore};
use crate::kafka::context::Consumer;
use crate::kafka::dead_letter::{DeadLetters, Failure, Ticket};
use crate::kafka::offsets::{FastMap, FastSet, OffsetTracker, Ownership, PartitionKey, Segment};
use crate::kafka::Record;
use crate::observability::Metrics;
use crate::schema::drift::Versioned;
use crate::sink::{InsertError, ReadyBatch, RowOrigin, SinkEvent};
use tokio::sync::watch;

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

pub struct TopicState {
    pub name: String,
    /// Indexes into `Core::routes`.
    pub routes: Vec<usize>,
    consumed: IntCounter,
}

pub struct RouteState {
    pub table: usize,
    pub decoder: Box<dyn Decoder>,
    /// To build the decoder again when the table changes.
    config: crate::config::RouteConfig,
    pub on_error: OnError,
    pub dead_letter_topic: Option<String>,
    /// Failure counters by reason, created on first use.
    failed: HashMap<&'static str, IntCounter>,
    skipped_log: LogBudget,
    rate: FailureRate,
}

/// Caps per-record warnings so that a flood of bad records cannot flood the
/// logs: the first few each second are logged with where they came from, the
/// rest are counted and summarised (the metric counts every one).
struct LogBudget {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    const PER_SECOND: u32 = 10;

    fn new() -> LogBudget {
        LogBudget {
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// True when this event may be logged; reports what was held back in the last window.
    fn allow(&mut self, table: &str) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!(
                    table,
                    suppressed = self.suppressed,
                    "more records failed than logged individually; \
                     chbridge_records_failed_total counts them all"
                );
            }
            self.window = Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::PER_SECOND {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// The share of a route's records that failed over a sliding window,
/// estimated from the current and the previous window's counts.
struct FailureRate {
    window: Duration,
    max_ratio: f64,
    started: Instant,
    current: (f64, f64),
    previous: (f64, f64),
}

impl FailureRate {
    /// Failures are judged only over at least this many records.
    const MIN_RECORDS: f64 = 100.0;

    fn new(window: Duration, max_ratio: f64) -> FailureRate {
        FailureRate {
            window,
            max_ratio,
            started: Instant::now(),
            current: (0.0, 0.0),
            previous: (0.0, 0.0),
        }
    }

    /// Counts a record that became a row. Per record, so no clock: the
    /// window rolls in `Core::service` and before each failure is judged.
    fn success(&mut self) {
        self.current.1 += 1.0;
    }

    /// Counts a failed record; returns (failed, total) over the window when
    /// the share of failures is above the limit.
    fn failure(&mut self, now: Instant) -> Option<(u64, u64)> {
        if self.max_ratio >= 1.0 {
            return None;
        }
        self.roll(now);
        self.current.0 += 1.0;
        self.current.1 += 1.0;
        let weight = 1.0
            - now.saturating_duration_since(self.started).as_secs_f64() / self.window.as_secs_f64();
        let total = self.current.1 + self.previous.1 * weight;
        let bad = self.current.0 + self.previous.0 * weight;
        (total >= Self::MIN_RECORDS && bad / total > self.max_ratio)
            .then_some((bad.round() as u64, total.round() as u64))
    }

    /// Starts a new window once the current one is over.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= self.window {
            self.previous = if elapsed < self.window * 2 {
                self.current
            } else {
                (0.0, 0.0)
            };
            self.current = (0.0, 0.0);
            self.started = now;
        }
    }
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

pub struct TableState {
    pub name: String,
    /// At-least-once: at most one batch. Exactly-once: one per partition.
    open: Vec<OpenBatch>,
    tx: mpsc::Sender<ReadyBatch>,
    /// Closed batches the sink's queue had no room for yet.
    waiting: VecDeque<ReadyBatch>,
    /// Size to pre-allocate for the next batch (the last batch's size).
    capacity_hint: usize,
    /// Encoded bytes of this table's open, waiting and in-flight batches.
    buffered: usize,
    recovery: FastMap<PartitionKey, Recovery>,
    /// The schema version the routes' decoders encode for, and where the
    /// sink announces a new one.
    schema_version: u64,
    schema_feed: Option<watch::Receiver<Versioned>>,
    schema_history: Option<Arc<crate::schema::drift::History>>,
}

impl TableState {
    pub fn new(name: String, tx: mpsc::Sender<ReadyBatch>) -> TableState {
        TableState {
            name,
            open: Vec::new(),
            tx,
            waiting: VecDeque::new(),
            capacity_hint: 64 * 1024,
            buffered: 0,
            recovery: FastMap::default(),
            schema_version: 0,
            schema_feed: None,
            schema_history: None,
        }
    }

    /// Follows the table's schema as its sink sees it (schema drift).
    pub fn with_schema_feed(
        mut self,
        feed: watch::Receiver<Versioned>,
        history: Arc<crate::schema::drift::History>,
    ) -> TableState {
        self.schema_version = feed.borrow().version;
        self.schema_feed = Some(feed);
        self.schema_history = Some(history);
        self
    }

    fn batch_index(&self, partition: Option<PartitionKey>) -> Option<usize> {
        self.open.iter().position(|b| b.partition == partition)
    }

    /// Exactly-once: settles the recovery of `key` with the record at `offset`.
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

impl RouteState {
    pub fn new(
        table: usize,
        decoder: Box<dyn Decoder>,
        route: &crate::config::RouteConfig,
    ) -> RouteState {
        RouteState {
            table,
            decoder,
            config: route.clone(),
            on_error: route.on_error,
            dead_letter_topic: route.dead_letter_topic.clone(),
            failed: HashMap::new(),
            skipped_log: LogBudget::new(),
            rate: FailureRate::new(route.failed_window, route.max_failed_ratio),
        }
    }
}

/// Exactly-once: where recorded ranges are read on assignment.
pub struct ExactlyOnce {
    pub state: StateStore,
    pub runtime: tokio::runtime::Handle,
    pub retry: crate::config::RetryConfig,
    /// A shutdown stops waiting for ClickHouse on assignment.
    pub stop: CancellationToken,
    /// Waiting for ClickHouse on assignment is not a stuck loop: `/healthz`
    /// stays green (`/readyz` shows ClickHouse unreachable).
    pub health: Arc<crate::observability::Health>,
}

pub struct Core {
    limits: Limits,
    topics: Vec<TopicState>,
    topic_index: FastMap<String, u32>,
    routes: Vec<RouteState>,
    tables: Vec<TableState>,
    tracker: OffsetTracker,
    ownership: Arc<Ownership>,
    events: std_mpsc::Receiver<SinkEvent>,
    last_commit: Instant,
    /// Topics (indexes) whose partitions are paused because they feed full tables.
    paused: BTreeSet<u32>,
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
    auto_add: Option<AutoAdd>,
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

/// `auto_add_columns`: where columns are added, and how many so far per table.
struct AutoAdd {
    client: clickhouse::Client,
    runtime: tokio::runtime::Handle,
    added: FastMap<usize, usize>,
}

/// At most this many columns are added to one table per run: a producer
/// that puts ids or timestamps into field names must not grow a table
/// without bound.
const MAX_AUTO_ADDED_COLUMNS: usize = 100;

/// A table's batch state before a record was appended to it.
struct Undo {
    table: usize,
    partition: Option<PartitionKey>,
    created: bool,
    body_len: usize,
    rows: usize,
    segments: usize,
    oldest_timestamp_ms: Option<i64>,
}

/// What the pipeline shares with the sink tasks and the dead-letter producer.
pub struct Shared {
    /// Reloaded batching and error policies (SIGHUP).
    pub reloads: Option<std_mpsc::Receiver<Reload>>,
    pub ownership: Arc<Ownership>,
    pub dead_letters: Option<Arc<DeadLetters>>,
    pub exactly_once: Option<ExactlyOnce>,
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
            auto_add: None,
            watchdog: Watchdog::default(),
            reloads: shared.reloads,
            metrics,
        }
    }

    /// Encoded bytes in open batches plus batches handed to sinks and not
    /// yet acknowledged, over all tables.
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

    fn fail(&mut self, e: PipelineError) {
        if self.fatal.is_none() {
            self.fatal = Some(e);
        }
    }

    /// Places one record into the batch of every table its topic is routed
    /// to. A record that fails a route with `on_error = "stop"` becomes the
    /// fatal error, and its offset is not released: the commit stays below it.
    /// Returns false once the loop must stop taking records.
    pub fn on_record(&mut self, rec: &Record<'_>) -> bool {
        let Some(key) = self.key(rec.topic, rec.partition) else {
            return true;
        };
        // A stopped route's topic: records still in librdkafka's queue when
        // it was paused are neither placed nor consumed, so the commit stays
        // below them.
        if self.stopped_topics.contains(&key.topic) {
            return true;
        }
        let eos = self.exactly_once.is_some();
        if eos && !self.recovered.contains(&key) && !self.recover(&[key]) {
            return false;
        }
        let generation = self.tracker.generation(key);
        let ti = key.topic as usize;
        if self.auto_add.is_some() && !self.add_new_columns(ti, rec) {
            return false;
        }
        self.topics[ti].consumed.inc();
        self.undo.clear();
        for i in 0..self.topics[ti].routes.len() {
            let route_idx = self.topics[ti].routes[i];
            let route = &mut self.routes[route_idx];
            let table_idx = route.table;
            let table = &mut self.tables[table_idx];
            let slot = eos.then_some(key);
            let replay = if eos {
                match table.recovery_step(key, rec.offset, rec.topic) {
                    Step::Skip => continue,
                    Step::Place { replay } => {
                        // A recovered range ends here or before: cut it first.
                        if replay.is_none() {
                            if let Some(bi) = table.batch_index(slot) {
                                if table.open[bi].replay_last.is_some() {
                                    self.close_batch(table_idx, bi);
                                }
                            }
                        }
                        replay
                    }
                }
            } else {
                None
            };
            let route = &mut self.routes[route_idx];
            let table = &mut self.tables[table_idx];
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
                        Some((first, _)) => vec![self.tracker.hold(key, generation, first)],
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
                        last: rec.offset,
                        replay_last,
                        schema_version: table.schema_version,
                    });
                    (table.open.len() - 1, true)
                }
            };
            let batch = &mut table.open[bi];
            let before = Undo {
                table: table_idx,
                partition: slot,
                created,
                body_len: batch.body.len(),
                rows: batch.rows.len(),
                segments: batch.segments.len(),
                oldest_timestamp_ms: batch.oldest_timestamp_ms,
            };
            batch.last = rec.offset;
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
                    let added = batch.body.len() - before.body_len;
                    table.buffered += added;
                    self.undo.push(before);
                    route.rate.success();
                }
                Err(error) => {
                    batch.body.truncate(before.body_len);
                    let empty = batch.rows.is_empty();
                    // A batch opened for this record only: it has no rows
                    // to insert (unless it replays a recorded range, whose
                    // end must still be honoured).
                    if created && empty && replay.is_none() {
                        table.open.pop();
                    }
                    let reason = error.kind.as_str();
                    let counter = route.failed.entry(reason).or_insert_with(|| {
                        self.metrics.records_failed.with_label_values(&[
                            rec.topic,
                            &table.name,
                            reason,
                        ])
                    });
                    counter.inc();
                    // Not the record's fault: a schema that does not fit the
                    // table, or a registry that cannot be reached. Skipping or
                    // dead-lettering would divert good records; stop without
                    // committing past it instead, whatever `on_error` says.
                    if matches!(
                        error.kind,
                        RecordErrorKind::Schema | RecordErrorKind::Unavailable
                    ) {
                        let what = format!(
                            "record {}[{}] at offset {} for {}: {error}; nothing at or after it was committed",
                            rec.topic, rec.partition, rec.offset, table.name
                        );
                        self.fatal = Some(if error.kind == RecordErrorKind::Unavailable {
                            PipelineError::Unavailable(what)
                        } else {
                            PipelineError::Config(what)
                        });
                        self.take_back_record();
                        return false;
                    }
                    if let Some((failed, total)) = route.rate.failure(Instant::now()) {
                        let e = PipelineError::TooManyFailures {
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
                        };
                        self.take_back_record();
                        self.stop_topic(key.topic, route_idx, e);
                        return true;
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
                            let (Some(dl), Some(dlq)) =
                                (&self.dead_letters, &route.dead_letter_topic)
                            else {
                                self.fatal = Some(PipelineError::Internal(format!(
                                    "route {route_idx} has on_error = \"dead-letter\" but no dead-letter producer"
                                )));
                                self.take_back_record();
                                return false;
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
                            let seg = self.tracker.hold(key, generation, rec.offset);
                            let message = error.to_string();
                            let failure = Failure {
                                table: &table.name,
                                class: error.kind.as_str(),
                                message: &message,
                            };
                            if let Err(why) = dl.send(
                                dlq,
                                rec,
                                &failure,
                                Ticket::Hold {
                                    segment: seg,
                                    table: table_idx,
                                },
                            ) {
                                self.tracker.release(&seg);
                                self.fatal = Some(PipelineError::DeadLetter(format!(
                                    "{why} (record {}[{}] at offset {}); nothing at or after it was committed",
                                    rec.topic, rec.partition, rec.offset
                                )));
                                self.take_back_record();
                                return false;
                            }
                        }
                        OnError::Stop => {
                            self.fatal = Some(PipelineError::BadRecord {
                                topic: rec.topic.to_string(),
                                partition: rec.partition,
                                offset: rec.offset,
                                table: table.name.clone(),
                                error,
                            });
                            self.take_back_record();
                            return false;
                        }
                    }
                }
            }
        }
        self.tracker.consumed(key, rec.offset);
        // Close what is full, and exactly-once batches that reached the end
        // of a recorded range (also when the last record of it failed).
        for r in 0..self.topics[ti].routes.len() {
            let table_idx = self.routes[self.topics[ti].routes[r]].table;
            let t = &self.tables[table_idx];
            let Some(bi) = t.batch_index(eos.then_some(key)) else {
                continue;
            };
            let b = &t.open[bi];
            // A replayed range closes at its recorded end only, whatever the
            // size limits say now (they may have been lowered since).
            let close = match b.replay_last {
                Some(last) => rec.offset >= last,
                None => {
                    b.rows.len() >= self.limits.max_rows || b.body.len() >= self.limits.max_bytes
                }
            };
            if close {
                self.close_batch(table_idx, bi);
            }
        }
        true
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
    /// record whose offset is not committed (a restart would repeat it).
    fn take_back_record(&mut self) {
        while let Some(u) = self.undo.pop() {
            let t = &mut self.tables[u.table];
            let Some(bi) = t.batch_index(u.partition) else {
                continue;
            };
            let b = &mut t.open[bi];
            let removed = b.body.len() - u.body_len;
            t.buffered -= removed;
            b.body.truncate(u.body_len);
            b.rows.truncate(u.rows);
            b.oldest_timestamp_ms = u.oldest_timestamp_ms;
            for seg in b.segments.drain(u.segments..) {
                self.tracker.release(&seg);
            }
            if u.created {
                t.open.swap_remove(bi);
            }
        }
    }

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
            return;
        }
        t.capacity_hint = b.body.len().max(64 * 1024);
        // `Bytes` keeps the whole allocation: give back what a burst reserved.
        if b.body.capacity() > b.body.len() + b.body.len() / 4 {
            b.body.shrink_to_fit();
        }
        let range = b.partition.map(|k| BatchRange {
            table: t.name.clone(),
            topic: self.topics[k.topic as usize].name.clone(),
            partition: k.partition,
            first: b.first,
            last: b.replay_last.unwrap_or(b.last),
        });
        t.waiting.push_back(ReadyBatch {
            table: ti,
            body: Bytes::from(b.body),
            rows: b.rows,
            segments: b.segments,
            oldest_timestamp_ms: b.oldest_timestamp_ms,
            range,
            schema_version: b.schema_version,
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
                t.buffered = t.buffered.saturating_sub(b.body.len());
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
        while let Some(batch) = t.waiting.pop_front() {
            match t.tx.try_send(batch) {
                Ok(()) => {}
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

    fn batch_done(&mut self, batch: &ReadyBatch) {
        let t = &mut self.tables[batch.table];
        t.buffered = t.buffered.saturating_sub(batch.body.len());
    }

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
                // Its partition was revoked: the tracker no longer knows the
                // segments' generation, and the new owner replays the range.
                self.batch_done(&batch);
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
                error,
            } => match error {
                None => {
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
                }
                Some(why) => {
                    self.refused.push(segment);
                    let topic = &self.topics[segment.key.topic as usize].name;
                    let e = PipelineError::DeadLetter(format!(
                        "the dead-letter topic did not take the record {topic}[{}] at offset {}: {why}; \
                         nothing at or after it was committed",
                        segment.key.partition, segment.first_offset
                    ));
                    self.fail(e);
                }
            },
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
    /// `auto_add_columns`: ClickHouse and a runtime to add columns with.
    pub fn set_auto_add(&mut self, client: clickhouse::Client, runtime: tokio::runtime::Handle) {
        self.auto_add = Some(AutoAdd {
            client,
            runtime,
            added: FastMap::default(),
        });
    }

    /// `auto_add_columns`: adds the columns the record's new fields need to
    /// their tables before the record is decoded, so that no value is lost.
    /// False when the bridge must stop.
    fn add_new_columns(&mut self, topic: usize, rec: &Record<'_>) -> bool {
        for i in 0..self.topics[topic].routes.len() {
            let r = self.topics[topic].routes[i];
            if !self.routes[r].config.auto_add_columns {
                continue;
            }
            let wanted = self.routes[r].decoder.new_columns(rec);
            if wanted.is_empty() {
                continue;
            }
            let ti = self.routes[r].table;
            let Some(history) = self.tables[ti].schema_history.clone() else {
                continue;
            };
            let Some(auto) = self.auto_add.as_mut() else {
                return true;
            };
            let table = history.current().schema;
            let added = auto.added.entry(ti).or_insert(0);
            if *added + wanted.len() > MAX_AUTO_ADDED_COLUMNS {
                self.fatal = Some(PipelineError::Config(format!(
                    "auto_add_columns: record {}[{}] at offset {} would add {} more columns to {table} \
                     ({:?}), over the limit of {MAX_AUTO_ADDED_COLUMNS} per table and run; add them \
                     yourself or fix the producer's field names",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    wanted.len(),
                    wanted.iter().map(|(n, _)| n).collect::<Vec<_>>()
                )));
                return false;
            }
            *added += wanted.len();
            let clauses: Vec<String> = wanted
                .iter()
                .map(|(name, ty)| {
                    format!(
                        "ADD COLUMN IF NOT EXISTS {} {ty}",
                        crate::schema::quote_ident(name)
                    )
                })
                .collect();
            let sql = format!(
                "ALTER TABLE {}.{} {}",
                crate::schema::quote_ident(&table.database),
                crate::schema::quote_ident(&table.table),
                clauses.join(", ")
            );
            let client = auto.client.clone();
            let (db, name) = (table.database.clone(), table.table.clone());
            let result = auto.runtime.block_on(async move {
                client.query(&sql).execute().await?;
                crate::schema::load_table(&client, &db, &name)
                    .await
                    .map_err(|e| clickhouse::error::Error::Custom(e.to_string()))
            });
            match result {
                Ok(now) => {
                    tracing::warn!(
                        table = %table,
                        columns = %wanted.iter().map(|(n, t)| format!("{n} {t}")).collect::<Vec<_>>().join(", "),
                        topic = rec.topic,
                        partition = rec.partition,
                        offset = rec.offset,
                        "auto_add_columns: added columns for new fields"
                    );
                    history.observe(now);
                    self.follow_schema(ti);
                    if self.fatal.is_some() {
                        return false;
                    }
                }
                Err(e) => {
                    self.fatal = Some(PipelineError::Unavailable(format!(
                        "auto_add_columns: could not add {:?} to {table} for record {}[{}] at offset {}: {e}; \
                         nothing at or after it was committed",
                        wanted.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                        rec.topic,
                        rec.partition,
                        rec.offset
                    )));
                    return false;
                }
            }
        }
        true
    }

    /// The decoders to use the registry when they are built again.
    pub fn set_registry(&mut self, registry: Option<Arc<crate::decode::registry::Registry>>) {
        self.registry = registry;
    }

    /// A table changed (its sink saw a new schema): the open batches close
    /// with the rows encoded so far (the sink re-encodes them for the new
    /// columns), and the table's routes decode for the new columns from the
    /// next record on. A batch replaying a recorded range must end exactly
    /// at the range's end, so the change waits until it has.
    fn follow_schema(&mut self, ti: usize) {
        let t = &mut self.tables[ti];
        let Some(feed) = t.schema_feed.as_mut() else {
            return;
        };
        if !feed.has_changed().unwrap_or(false) || t.open.iter().any(|b| b.replay_last.is_some()) {
            return;
        }
        let v = feed.borrow_and_update().clone();
        if v.version == t.schema_version {
            return;
        }
        while !self.tables[ti].open.is_empty() {
            self.close_batch(ti, 0);
        }
        for (i, route) in self.routes.iter_mut().enumerate() {
            if route.table != ti {
                continue;
            }
            match crate::decode::decoder_for(&route.config, &v.schema, self.registry.as_ref()) {
                Ok(d) => route.decoder = d,
                Err(e) => {
                    self.fatal = Some(PipelineError::Config(format!(
                        "routes[{i}]: table {} changed and the route no longer fits it: {e}",
                        v.schema
                    )));
                    return;
                }
            }
        }
        self.tables[ti].schema_version = v.version;
        tracing::info!(table = %v.schema, version = v.version, "decoding for the table's new columns");
    }

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

    /// Housekeeping between polls: acknowledgements, batches that waited
    /// long enough, queued sends, periodic commits, and back-pressure.
    /// Returns how long the next poll may block.
    pub fn service(&mut self, consumer: &Consumer) -> Duration {
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
            self.commit(consumer, CommitMode::Async, None);
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
    fn watch(&mut self, consumer: &Consumer, now: Instant) {
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
            if self.tracker.held(key) == 0 && !self.paused.contains(&key.topic) {
                match consumer.seek(
                    &topic,
                    key.partition,
                    Offset::Offset(position),
                    Duration::from_secs(5),
                ) {
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
            if t.waiting.iter().any(|b| holds(&b.segments)) {
                return format!(
                    "a batch of {} queued behind inserts that have not finished",
                    t.name
                );
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
                .filter(|t| {
                    let queued: usize = t.open.iter().map(|b| b.body.len()).sum::<usize>()
                        + t.waiting.iter().map(|b| b.body.len()).sum::<usize>();
                    t.buffered > queued
                })
                .map(|t| {
                    let retries = self
                        .metrics
                        .insert_retries
                        .with_label_values(&[&t.name])
                        .get();
                    format!("{} ({retries} retries so far)", t.name)
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

    /// Each table's part of the memory budget: the budget split evenly, so
    /// that the sum of all tables' bytes never exceeds it.
    fn table_share(&self) -> usize {
        self.limits.max_buffered_bytes / self.tables.len().max(1)
    }

    /// Topics to pause: those feeding a table whose sink is behind (batches
    /// queued) or that holds its share of the memory budget. The topics of
    /// healthy tables keep flowing.
    fn topics_to_pause(&self) -> BTreeSet<u32> {
        let share = self.table_share();
        let full: Vec<bool> = self
            .tables
            .iter()
            .map(|t| !t.waiting.is_empty() || t.buffered >= share)
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

    /// Pauses fetching of the topics that feed full tables and resumes them
    /// once they drain. Pausing (rather than not polling) keeps the group
    /// membership alive however long ClickHouse is away.
    fn apply_backpressure(&mut self, consumer: &Consumer) {
        let want = self.topics_to_pause();
        if want == self.paused {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for e in assignment.elements() {
            let Some(key) = self.key(e.topic(), e.partition()) else {
                continue;
            };
            let (now, before) = (want.contains(&key.topic), self.paused.contains(&key.topic));
            if now && !before {
                pause.add_partition(e.topic(), e.partition());
            } else if before && !now {
                resume.add_partition(e.topic(), e.partition());
            }
        }
        let result = consumer
            .pause(&pause)
            .and_then(|()| consumer.resume(&resume));
        match result {
            Ok(()) => {
                let names = |set: &BTreeSet<u32>| {
                    set.iter()
                        .map(|&t| self.topics[t as usize].name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                tracing::info!(
                    buffered_bytes = self.buffered_bytes(),
                    paused = %names(&want),
                    "{}",
                    if want.len() > self.paused.len() {
                        "tables full: consumption of the topics feeding them paused until inserts catch up"
                    } else {
                        "consumption resumed"
                    }
                );
                self.metrics.paused.set(i64::from(!want.is_empty()));
                self.paused = want;
            }
            Err(e) => tracing::warn!(error = %e, "could not pause/resume partitions"),
        }
    }

    /// Commits acknowledged positions: those that moved (periodic, async),
    /// or all of `only` (revocation, shutdown; synchronous).
    fn commit(&mut self, consumer: &Consumer, mode: CommitMode, only: Option<&[PartitionKey]>) {
        self.last_commit = Instant::now();
        let positions = self.tracker.take_commits(only);
        let mut tpl = TopicPartitionList::new();
        for (key, offset) in positions {
            let topic = &self.topics[key.topic as usize].name;
            if let Err(e) = tpl.add_partition_offset(topic, key.partition, Offset::Offset(offset)) {
                tracing::warn!(topic, partition = key.partition, error = %e, "bad commit offset");
            }
        }
        if tpl.count() == 0 {
            return;
        }
        self.metrics.commits.with_label_values(&["sent"]).inc();
        if let Err(e) = consumer.commit(&tpl, mode) {
            self.metrics.commits.with_label_values(&["failed"]).inc();
            tracing::warn!(error = %e, "offset commit failed; the next commit will repeat it");
        } else if matches!(mode, CommitMode::Sync) {
            tracing::debug!(partitions = tpl.count(), "committed synchronously");
        }
    }

    pub fn on_assign(&mut self, tpl: &TopicPartitionList) {
        let mut keys = Vec::new();
        for e in tpl.elements() {
            if let Some(key) = self.key(e.topic(), e.partition()) {
                self.tracker.assign(key);
                self.ownership.set(key, self.tracker.generation(key));
                keys.push(key);
            }
        }
        tracing::info!(partitions = %describe(tpl), "partitions assigned");
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
            let read = eo.runtime.block_on(async {
                tokio::select! {
                    r = eo.state.latest(&topics) => Some(r),
                    _ = eo.stop.cancelled() => None,
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
                    Some(&(first, last)) => {
                        table
                            .recovery
                            .insert(key, Recovery::Recorded { first, last });
                    }
                    None => {
                        table.recovery.remove(&key);
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
    pub fn after_assign(&mut self, consumer: &Consumer, tpl: &TopicPartitionList) {
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for e in tpl.elements() {
            let paused = self
                .key(e.topic(), e.partition())
                .is_some_and(|k| self.paused.contains(&k.topic));
            let list = if paused { &mut pause } else { &mut resume };
            list.add_partition(e.topic(), e.partition());
        }
        if let Err(e) = consumer
            .pause(&pause)
            .and_then(|()| consumer.resume(&resume))
        {
            tracing::warn!(error = %e, "could not set the pause state of newly assigned partitions");
        }
    }

    /// A commit the broker refused: its positions are committed again next time.
    pub fn commit_failed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Some(key) = self.key(e.topic(), e.partition()) {
                self.tracker.forget_committed(key);
            }
        }
    }

    /// Before partitions are given away: insert everything read from them,
    /// wait (up to the drain timeout) for ClickHouse, and commit, so the next
    /// owner starts exactly where this one stopped.
    pub fn on_revoke(&mut self, consumer: &Consumer, tpl: &TopicPartitionList, lost: bool) {
        let keys: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .filter_map(|e| self.key(e.topic(), e.partition()))
            .collect();
        if lost {
            // Another member may already own them: committing would be refused
            // and inserts in flight will be repeated by the new owner.
            tracing::warn!(partitions = %describe(tpl), "partitions lost (session timed out); their uncommitted records will be read again by their new owner");
        } else {
            let drained = self.closing || self.drain(consumer, Some(&keys));
            self.commit(consumer, CommitMode::Sync, Some(&keys));
            tracing::info!(partitions = %describe(tpl), drained, "partitions revoked");
        }
        for &key in &keys {
            self.tracker.revoke(key);
            self.ownership.remove(key);
            self.recovered.remove(&key);
            for t in &mut self.tables {
                t.recovery.remove(&key);
            }
            self.metrics
                .forget_partition(&self.topics[key.topic as usize].name, key.partition);
        }
        self.abandoned.retain(|s| !keys.contains(&s.key));
        if self.exactly_once.is_some() {
            self.discard_batches_of(&keys);
        }
    }

    /// Exactly-once: batches of partitions no longer owned are not inserted
    /// (the new owner replays their ranges); their memory is given back.
    fn discard_batches_of(&mut self, keys: &[PartitionKey]) {
        for t in &mut self.tables {
            let mut gone = 0;
            t.open.retain(|b| {
                let keep = !b.partition.is_some_and(|k| keys.contains(&k));
                if !keep {
                    gone += b.body.len();
                }
                keep
            });
            t.waiting.retain(|b| {
                let keep = !b.segments.iter().any(|s| keys.contains(&s.key));
                if !keep {
                    gone += b.body.len();
                }
                keep
            });
            t.buffered = t.buffered.saturating_sub(gone);
        }
    }

    /// Closes every batch holding records of `keys` (all when `None`) and waits
    /// until ClickHouse acknowledged them or the drain timeout passed.
    /// Returns true when nothing of those partitions is left unacknowledged.
    pub fn drain(&mut self, consumer: &Consumer, keys: Option<&[PartitionKey]>) -> bool {
        let keys: Vec<PartitionKey> = match keys {
            Some(k) => k.to_vec(),
            None => self.tracker.keys().collect(),
        };
        for ti in 0..self.tables.len() {
            self.close_batches_of(ti, &keys);
        }
        let deadline = Instant::now() + self.limits.drain_timeout;
        loop {
            for ti in 0..self.tables.len() {
                self.send_waiting(ti);
            }
            // Refused batches stay held for good: wait for everything else.
            let refused = self
                .refused
                .iter()
                .filter(|s| keys.contains(&s.key))
                .count();
            let abandoned = self
                .abandoned
                .iter()
                .filter(|s| keys.contains(&s.key))
                .count();
            let held = keys
                .iter()
                .map(|k| self.tracker.held(*k))
                .sum::<usize>()
                .saturating_sub(refused + abandoned);
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
                self.commit(consumer, CommitMode::Async, None);
            }
        }
    }

    /// Final step of a shutdown: drain everything and commit synchronously.
    pub fn shutdown(&mut self, consumer: &Consumer) -> bool {
        let drained = self.drain(consumer, None);
        self.closing = true;
        let keys: Vec<PartitionKey> = self.tracker.keys().collect();
        self.commit(consumer, CommitMode::Sync, Some(&keys));
        drained
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{json::JsonDecoder, UnknownFields};
    use crate::schema::TableSchema;

    struct Harness {
        core: Core,
        sinks: Vec<mpsc::Receiver<ReadyBatch>>,
        events: std_mpsc::Sender<SinkEvent>,
    }

    /// One topic "t" fanned out to a lenient table "a" (skip) and a strict table "b".
    fn harness(b_policy: OnError, max_rows: usize) -> Harness {
        let a = TableSchema::from_columns("db", "a", &[("id", "UInt64")]);
        let b = TableSchema::from_columns("db", "b", &[("id", "UInt8")]);
        let (events, events_rx) = std_mpsc::channel();
        let metrics = Arc::new(Metrics::new());
        let mut tables = Vec::new();
        let mut sinks = Vec::new();
        for s in [&a, &b] {
            let (tx, rx) = mpsc::channel(8);
            tables.push(TableState::new(s.to_string(), tx));
            sinks.push(rx);
        }
        let routes = vec![
            RouteState::new(
                0,
                Box::new(JsonDecoder::new(
                    &a,
                    UnknownFields::Ignore,
                    crate::decode::DecodeLimits::default(),
                )),
                &route_config(OnError::Skip),
            ),
            RouteState::new(
                1,
                Box::new(JsonDecoder::new(
                    &b,
                    UnknownFields::Ignore,
                    crate::decode::DecodeLimits::default(),
                )),
                &route_config(b_policy),
            ),
        ];
        let limits = Limits {
            max_rows,
            max_bytes: 1 << 20,
            max_wait: Duration::from_secs(60),
            commit_interval: Duration::from_secs(60),
            max_buffered_bytes: 1 << 24,
            drain_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(60),
        };
        let core = Core::new(
            limits,
            vec![("t".into(), vec![0, 1])],
            routes,
            tables,
            events_rx,
            Shared {
                reloads: None,
                ownership: Arc::new(Ownership::default()),
                dead_letters: None,
                exactly_once: None,
            },
            metrics,
        );
        Harness {
            core,
            sinks,
            events,
        }
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

    /// The harness in exactly-once mode, with the recorded ranges of
    /// partition 0 already read (`recorded` for table a).
    fn exactly_once_harness(recorded: Option<(i64, i64)>) -> (Harness, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut h = harness(OnError::Skip, 1000);
        h.core.exactly_once = Some(ExactlyOnce {
            state: StateStore::new(
                clickhouse::Client::default(),
                ("db".into(), "state".into()),
                "g",
            ),
            runtime: rt.handle().clone(),
            retry: crate::config::RetryConfig::default(),
            stop: CancellationToken::new(),
            health: Arc::new(crate::observability::Health::new(Duration::from_secs(60))),
        });
        for p in [0, 1] {
            h.core.recovered.insert(PartitionKey {
                topic: 0,
                partition: p,
            });
        }
        if let Some((first, last)) = recorded {
            h.core.tables[0]
                .recovery
                .insert(P0, Recovery::Recorded { first, last });
        }
        (h, rt)
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

    #[test]
    fn exactly_once_batches_hold_one_partition_each() {
        let (mut h, _rt) = exactly_once_harness(None);
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
        let (mut h, _rt) = exactly_once_harness(Some((10, 19)));
        // The group's commit stands at 5: 5..9 are in table a already.
        for o in 5..25 {
            h.core.on_record(&record(o, r#"{"id":1}"#));
        }
        close_all(&mut h);
        assert_eq!(ranges(&mut h, 0), vec![(0, 10, 19, 10), (0, 20, 24, 5)]);
        // Table b has no recorded range: everything from 5, in one batch.
        assert_eq!(ranges(&mut h, 1), vec![(0, 5, 24, 20)]);
        assert_eq!(h.core.tracker.position(P0), Some(5), "held by the batches");
    }

    #[test]
    fn a_replayed_range_keeps_its_end_when_its_last_records_fail() {
        let (mut h, _rt) = exactly_once_harness(Some((10, 14)));
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
        let (mut h, _rt) = exactly_once_harness(Some((10, 14)));
        // 10 and 11 fail: without a hold at 10 the commit could pass the
        // range's start before its rows land, and the next owner would skip it.
        h.core.on_record(&record(10, "bad"));
        h.core.on_record(&record(11, "bad"));
        h.core.on_record(&record(12, r#"{"id":1}"#));
        assert_eq!(h.core.tracker.position(P0), Some(10));
        // A range whose records all fail releases its hold when it ends.
        let (mut h, _rt) = exactly_once_harness(Some((10, 11)));
        h.core.on_record(&record(10, "bad"));
        h.core.on_record(&record(11, "bad"));
        assert!(h.core.tables[0].open.is_empty());
        assert_eq!(h.core.tracker.held(P0), 0);
    }

    #[test]
    fn a_commit_past_a_recorded_range_start_skips_the_whole_range() {
        let (mut h, _rt) = exactly_once_harness(Some((10, 19)));
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
        let (mut h, _rt) = exactly_once_harness(None);
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
            assert!(h.core.on_record(&record(o, json)), "the bridge goes on");
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

    const P0: PartitionKey = PartitionKey {
        topic: 0,
        partition: 0,
    };

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
    fn skipped_record_warnings_are_capped_per_second() {
        let mut b = LogBudget::new();
        let allowed = (0..100).filter(|_| b.allow("db.t")).count();
        assert_eq!(allowed, LogBudget::PER_SECOND as usize);
        assert_eq!(b.suppressed, 90);
        b.window -= Duration::from_secs(2);
        assert!(b.allow("db.t"));
        assert_eq!(b.suppressed, 0);
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
}
