//! The pipeline's state on the consumer thread: routing each record to its
//! tables, the open batch of every table, and the offsets that may be committed.
//!
//! Records flow: message -> route(s) -> decoder -> the table's open batch ->
//! (full or old) -> the table's sink task -> acknowledgement back here ->
//! offsets released -> commit. Offsets travel with the data as the batch's
//! segments; only an acknowledgement, or a record skipped by policy, releases
//! them (see `kafka::offsets` for the rule itself).

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntCounter;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::{Config, OnError};
use crate::decode::Decoder;
use crate::kafka::context::Consumer;
use crate::kafka::offsets::{OffsetTracker, PartitionKey, Segment};
use crate::observability::Metrics;
use crate::sink::{InsertError, ReadyBatch, SinkEvent};

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
    pub on_error: OnError,
    /// Failure counters by reason, created on first use.
    failed: HashMap<&'static str, IntCounter>,
    skipped_log: LogBudget,
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
                    "more records were skipped than logged individually; \
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

pub struct TableState {
    pub name: String,
    rows: usize,
    body: Vec<u8>,
    segments: Vec<Segment>,
    opened: Option<Instant>,
    oldest_timestamp_ms: Option<i64>,
    tx: mpsc::Sender<ReadyBatch>,
    /// A closed batch the sink's queue had no room for yet.
    waiting: Option<ReadyBatch>,
    /// Size to pre-allocate for the next batch (the last batch's size).
    capacity_hint: usize,
}

impl TableState {
    pub fn new(name: String, tx: mpsc::Sender<ReadyBatch>) -> TableState {
        TableState {
            name,
            rows: 0,
            body: Vec::new(),
            segments: Vec::new(),
            opened: None,
            oldest_timestamp_ms: None,
            tx,
            waiting: None,
            capacity_hint: 64 * 1024,
        }
    }
}

impl RouteState {
    pub fn new(table: usize, decoder: Box<dyn Decoder>, on_error: OnError) -> RouteState {
        RouteState {
            table,
            decoder,
            on_error,
            failed: HashMap::new(),
            skipped_log: LogBudget::new(),
        }
    }
}

pub struct Core {
    limits: Limits,
    topics: Vec<TopicState>,
    topic_index: HashMap<String, u32>,
    routes: Vec<RouteState>,
    tables: Vec<TableState>,
    tracker: OffsetTracker,
    events: std_mpsc::Receiver<SinkEvent>,
    /// Encoded bytes in open batches plus batches handed to sinks and not yet acknowledged.
    buffered_bytes: usize,
    last_commit: Instant,
    paused: bool,
    /// Set once the final drain ran: the revocation that closing the consumer
    /// triggers must not wait for ClickHouse a second time.
    closing: bool,
    /// The first fatal error; once set the loop drains and stops.
    fatal: Option<PipelineError>,
    /// Segments of batches ClickHouse refused: they stay held for good, so a
    /// drain waits for everything else only.
    refused: Vec<Segment>,
    /// The batches the record being placed went into (reused per record).
    undo: Vec<Undo>,
    metrics: Arc<Metrics>,
}

/// A table's batch state before a record was appended to it.
struct Undo {
    table: usize,
    body_len: usize,
    rows: usize,
    segments: usize,
    opened: Option<Instant>,
    oldest_timestamp_ms: Option<i64>,
}

/// One record as the core needs it, borrowed from the consumer's message.
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub value: Option<&'a [u8]>,
}

impl Core {
    pub fn new(
        limits: Limits,
        topics: Vec<(String, Vec<usize>)>,
        routes: Vec<RouteState>,
        tables: Vec<TableState>,
        events: std_mpsc::Receiver<SinkEvent>,
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
            events,
            buffered_bytes: 0,
            last_commit: Instant::now(),
            paused: false,
            closing: false,
            fatal: None,
            refused: Vec::new(),
            undo: Vec::new(),
            metrics,
        }
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

    /// Places one record into the batch of every table its topic is routed
    /// to. A record that fails a route with `on_error = "stop"` becomes the
    /// fatal error, and its offset is not released: the commit stays below it.
    /// Returns false once the loop must stop taking records.
    pub fn on_record(&mut self, rec: &Record<'_>) -> bool {
        let Some(key) = self.key(rec.topic, rec.partition) else {
            return true;
        };
        let generation = self.tracker.generation(key);
        let ti = key.topic as usize;
        self.topics[ti].consumed.inc();
        self.undo.clear();
        for i in 0..self.topics[ti].routes.len() {
            let route = &mut self.routes[self.topics[ti].routes[i]];
            let table_idx = route.table;
            let table = &mut self.tables[table_idx];
            let before = Undo {
                table: table_idx,
                body_len: table.body.len(),
                rows: table.rows,
                segments: table.segments.len(),
                opened: table.opened,
                oldest_timestamp_ms: table.oldest_timestamp_ms,
            };
            match route.decoder.decode(rec.value, &mut table.body) {
                Ok(()) => {
                    if table.rows == 0 {
                        table.opened = Some(Instant::now());
                        table
                            .body
                            .reserve(table.capacity_hint.saturating_sub(table.body.len()));
                    }
                    table.rows += 1;
                    if let Some(ts) = rec.timestamp_ms {
                        table.oldest_timestamp_ms =
                            Some(table.oldest_timestamp_ms.map_or(ts, |o| o.min(ts)));
                    }
                    if !table
                        .segments
                        .iter()
                        .any(|s| s.key == key && s.generation == generation)
                    {
                        let seg = self.tracker.hold(key, generation, rec.offset);
                        table.segments.push(seg);
                    }
                    self.buffered_bytes += table.body.len() - before.body_len;
                    self.undo.push(before);
                }
                Err(error) => {
                    let reason = error.kind.as_str();
                    let counter = route.failed.entry(reason).or_insert_with(|| {
                        self.metrics.records_failed.with_label_values(&[
                            rec.topic,
                            &table.name,
                            reason,
                        ])
                    });
                    counter.inc();
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
        for u in 0..self.undo.len() {
            let ti = self.undo[u].table;
            let t = &self.tables[ti];
            if t.rows >= self.limits.max_rows || t.body.len() >= self.limits.max_bytes {
                self.close_batch(ti);
            }
        }
        true
    }

    /// Removes the current record from the batches of the routes that took it
    /// before another route stopped on it, so that the stop leaves no row of a
    /// record whose offset is not committed (a restart would repeat it).
    fn take_back_record(&mut self) {
        while let Some(u) = self.undo.pop() {
            let t = &mut self.tables[u.table];
            self.buffered_bytes -= t.body.len() - u.body_len;
            t.body.truncate(u.body_len);
            t.rows = u.rows;
            t.opened = u.opened;
            t.oldest_timestamp_ms = u.oldest_timestamp_ms;
            for seg in t.segments.drain(u.segments..) {
                self.tracker.release(&seg);
            }
        }
    }

    /// Closes table `ti`'s open batch and hands it to its sink (or keeps it
    /// waiting when the sink's queue is full).
    fn close_batch(&mut self, ti: usize) {
        let t = &mut self.tables[ti];
        if t.rows == 0 || t.waiting.is_some() {
            return;
        }
        t.capacity_hint = t.body.len().max(64 * 1024);
        // `Bytes` keeps the whole allocation: give back what a burst reserved.
        if t.body.capacity() > t.body.len() + t.body.len() / 4 {
            t.body.shrink_to_fit();
        }
        let batch = ReadyBatch {
            table: ti,
            rows: std::mem::take(&mut t.rows),
            body: Bytes::from(std::mem::take(&mut t.body)),
            segments: std::mem::take(&mut t.segments),
            oldest_timestamp_ms: t.oldest_timestamp_ms.take(),
        };
        t.opened = None;
        t.waiting = Some(batch);
        self.send_waiting(ti);
    }

    fn send_waiting(&mut self, ti: usize) {
        let t = &mut self.tables[ti];
        if let Some(batch) = t.waiting.take() {
            match t.tx.try_send(batch) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(b)) => t.waiting = Some(b),
                Err(mpsc::error::TrySendError::Closed(b)) => {
                    t.waiting = Some(b);
                    if self.fatal.is_none() {
                        self.fatal = Some(PipelineError::Internal(format!(
                            "the insert task of table {} has stopped",
                            t.name
                        )));
                    }
                }
            }
        }
    }

    /// Handles one sink outcome.
    fn on_event(&mut self, ev: SinkEvent) {
        match ev {
            SinkEvent::Inserted(batch) => {
                self.buffered_bytes = self.buffered_bytes.saturating_sub(batch.body.len());
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
            SinkEvent::Failed { batch, error } => {
                // The batch's offsets stay held: nothing at or above its first
                // offset in any of its partitions will be committed.
                let table = self.tables[batch.table].name.clone();
                self.refused.extend_from_slice(&batch.segments);
                if self.fatal.is_none() {
                    self.fatal = Some(self.insert_failure(&table, &batch, error));
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
            rows: batch.rows,
            origin,
            error,
        }
    }

    /// Housekeeping between polls: acknowledgements, batches that waited
    /// long enough, queued sends, periodic commits, and back-pressure.
    /// Returns how long the next poll may block.
    pub fn service(&mut self, consumer: &Consumer) -> Duration {
        while let Ok(ev) = self.events.try_recv() {
            self.on_event(ev);
        }
        let now = Instant::now();
        let mut next_deadline = self.limits.commit_interval.min(Duration::from_millis(100));
        for ti in 0..self.tables.len() {
            self.send_waiting(ti);
            if let Some(opened) = self.tables[ti].opened {
                let age = now.duration_since(opened);
                if age >= self.limits.max_wait {
                    self.close_batch(ti);
                } else {
                    next_deadline = next_deadline.min(self.limits.max_wait - age);
                }
            }
        }
        if now.duration_since(self.last_commit) >= self.limits.commit_interval {
            self.commit(consumer, CommitMode::Async, None);
        }
        // Open batches of several tables can fill the buffer together while each
        // is below batch.max_bytes: send the largest rather than wait for max_wait.
        if self.buffered_bytes >= self.limits.max_buffered_bytes {
            let largest = (0..self.tables.len())
                .filter(|&i| self.tables[i].rows > 0 && self.tables[i].waiting.is_none())
                .max_by_key(|&i| self.tables[i].body.len());
            if let Some(i) = largest {
                self.close_batch(i);
            }
        }
        self.apply_backpressure(consumer);
        self.metrics.buffered_bytes.set(self.buffered_bytes as i64);
        next_deadline
    }

    fn pressure(&self) -> bool {
        self.buffered_bytes >= self.limits.max_buffered_bytes
            || self.tables.iter().any(|t| t.waiting.is_some())
    }

    /// Pauses fetching while buffers are full and resumes once they drain.
    /// Pausing (rather than not polling) keeps the group membership alive
    /// however long ClickHouse is away.
    fn apply_backpressure(&mut self, consumer: &Consumer) {
        let want = self.pressure();
        if want == self.paused {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let result = if want {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                self.paused = want;
                self.metrics.paused.set(i64::from(want));
                tracing::info!(
                    buffered_bytes = self.buffered_bytes,
                    "{}",
                    if want {
                        "buffers full: consumption paused until inserts catch up"
                    } else {
                        "consumption resumed"
                    }
                );
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
        for e in tpl.elements() {
            if let Some(key) = self.key(e.topic(), e.partition()) {
                self.tracker.assign(key);
            }
        }
        tracing::info!(partitions = %describe(tpl), "partitions assigned");
    }

    /// Newly assigned partitions take the pause state of the rest. librdkafka
    /// keeps a partition's pause flag across revocation and reassignment, so a
    /// partition revoked while paused would otherwise come back paused for good.
    pub fn after_assign(&mut self, consumer: &Consumer, tpl: &TopicPartitionList) {
        if tpl.count() == 0 {
            return;
        }
        let result = if self.paused {
            consumer.pause(tpl)
        } else {
            consumer.resume(tpl)
        };
        if let Err(e) = result {
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
        for key in keys {
            self.tracker.revoke(key);
            self.metrics
                .forget_partition(&self.topics[key.topic as usize].name, key.partition);
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
            if self.tables[ti]
                .segments
                .iter()
                .any(|s| keys.contains(&s.key))
            {
                self.close_batch(ti);
            }
        }
        let deadline = Instant::now() + self.limits.drain_timeout;
        loop {
            for ti in 0..self.tables.len() {
                self.send_waiting(ti);
                // A batch that was waiting for room may hold these partitions
                // too; once it is sent, close the next one if it does.
                if self.tables[ti].waiting.is_none()
                    && self.tables[ti]
                        .segments
                        .iter()
                        .any(|s| keys.contains(&s.key))
                {
                    self.close_batch(ti);
                }
            }
            // Refused batches stay held for good: wait for everything else.
            let refused = self
                .refused
                .iter()
                .filter(|s| keys.contains(&s.key))
                .count();
            let held = keys
                .iter()
                .map(|k| self.tracker.held(*k))
                .sum::<usize>()
                .saturating_sub(refused);
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
        let a = TableSchema::for_tests("a", &[("id", "UInt64")]);
        let b = TableSchema::for_tests("b", &[("id", "UInt8")]);
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
                Box::new(JsonDecoder::new(&a, UnknownFields::Ignore)),
                OnError::Skip,
            ),
            RouteState::new(
                1,
                Box::new(JsonDecoder::new(&b, UnknownFields::Ignore)),
                b_policy,
            ),
        ];
        let limits = Limits {
            max_rows,
            max_bytes: 1 << 20,
            max_wait: Duration::from_secs(60),
            commit_interval: Duration::from_secs(60),
            max_buffered_bytes: 1 << 24,
            drain_timeout: Duration::from_secs(1),
        };
        let core = Core::new(
            limits,
            vec![("t".into(), vec![0, 1])],
            routes,
            tables,
            events_rx,
            metrics,
        );
        Harness {
            core,
            sinks,
            events,
        }
    }

    fn record(offset: i64, json: &str) -> Record<'_> {
        Record {
            topic: "t",
            partition: 0,
            offset,
            timestamp_ms: None,
            value: Some(json.as_bytes()),
        }
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
        assert_eq!((batch_a.rows, batch_b.rows), (2, 2));
        // RowBinaryWithDefaults: a 0 flag, then the value.
        assert_eq!(&batch_b.body[..], &[0, 1, 0, 2]);
        h.events.send(SinkEvent::Inserted(batch_a)).unwrap();
        while let Ok(ev) = h.core.events.try_recv() {
            h.core.on_event(ev);
        }
        assert_eq!(
            h.core.tracker.position(P0),
            Some(0),
            "table b still holds offset 0"
        );
        h.core.on_event(SinkEvent::Inserted(batch_b));
        assert_eq!(h.core.tracker.position(P0), Some(2));
        assert_eq!(h.core.buffered_bytes, 0);
    }

    #[test]
    fn a_record_skipped_by_one_route_still_lands_in_the_other() {
        let mut h = harness(OnError::Skip, 100);
        h.core.on_record(&record(0, r#"{"id":300}"#)); // too big for b's UInt8
        assert_eq!(h.core.tables[0].rows, 1);
        assert_eq!(h.core.tables[1].rows, 0);
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
        let before = (h.core.tables[0].body.len(), h.core.buffered_bytes);
        h.core.on_record(&record(1, r#"{"id":300}"#));
        assert!(matches!(
            h.core.fatal(),
            Some(PipelineError::BadRecord { offset: 1, .. })
        ));
        // Table a took offset 1 first; it was removed again.
        assert_eq!(h.core.tables[0].rows, 1);
        assert_eq!((h.core.tables[0].body.len(), h.core.buffered_bytes), before);
        assert_eq!(h.core.tables[0].segments.len(), 1);
        assert_eq!(
            h.core.tracker.held(P0),
            2,
            "offset 0 held by a and b, nothing else"
        );
    }
}
