//! Inserting batches into ClickHouse: one task per table, each retrying the
//! same encoded bytes until ClickHouse acknowledges them, and reporting the
//! outcome back to the pipeline, which alone moves offsets.

pub mod errors;
pub mod tls;

use std::future::Future;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ClickHouseConfig, RetryConfig};
use crate::exactly_once::{BatchRange, RangeStore, Split};
use crate::kafka::dead_letter::{DeadLetters, Failure, Ticket};
use crate::kafka::offsets::{Ownership, PartitionKey, Segment};
use crate::kafka::Record;
use crate::observability::{metrics, Health, Metrics};
pub use errors::{ErrorClass, InsertError};

/// A batch closed for insertion.
#[derive(Debug)]
pub struct ReadyBatch {
    pub table: usize,
    pub body: Bytes,
    /// One entry per row, in body order.
    pub rows: Vec<RowOrigin>,
    /// Where the rows came from: released when ClickHouse acknowledges them.
    pub segments: Vec<Segment>,
    /// Oldest Kafka timestamp in the batch (ms since the epoch), for latency.
    pub oldest_timestamp_ms: Option<i64>,
    /// Exactly-once: the offset range of the one partition the batch covers.
    pub range: Option<BatchRange>,
    /// Exactly-once: the range replays one a previous attempt recorded.
    pub replay: bool,
    /// Exactly-once: how a previous attempt of this range was split.
    pub splits: Vec<Split>,
    /// The table schema version the rows were encoded for.
    pub schema_version: u64,
    /// What the batch counts for in the memory budget (body and per-row
    /// origins, as they were added): given back when it is answered for.
    pub accounted: usize,
}

/// Where a row's encoding ends in its batch's body, and its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowOrigin {
    pub end: usize,
    pub key: PartitionKey,
    pub offset: i64,
}

/// What each row costs in memory besides its bytes, in the budget.
pub const ROW_ORIGIN_BYTES: usize = std::mem::size_of::<RowOrigin>();

impl ReadyBatch {
    /// The bytes of rows `lo..hi`.
    fn body_of(&self, lo: usize, hi: usize) -> Bytes {
        let start = if lo == 0 { 0 } else { self.rows[lo - 1].end };
        let end = if hi == 0 { 0 } else { self.rows[hi - 1].end };
        self.body.slice(start..end)
    }
}

/// What a sink task (or a task the pipeline started) reports back.
#[derive(Debug)]
pub enum SinkEvent {
    /// Every row is in ClickHouse, except `rejected` ones that ClickHouse
    /// refused and that were dead-lettered or skipped by the route's policy.
    Inserted { batch: ReadyBatch, rejected: usize },
    /// The batch cannot be inserted (data or fatal error, or attempts exhausted).
    Failed {
        batch: ReadyBatch,
        error: InsertError,
    },
    /// The batch's partitions were revoked (or lost) before its insert was
    /// done; their new owner reads their records again.
    Dropped(ReadyBatch),
    /// The table's columns changed since the rows were encoded: nothing was
    /// inserted, and the records are decoded again for the new columns.
    /// `recorded`: exactly-once, the range was written to the state table
    /// before the change was seen, so it is replayed as recorded, cut as
    /// `splits` say.
    Stale {
        batch: ReadyBatch,
        recorded: bool,
        splits: Vec<Split>,
    },
    /// A dead letter sent by the consumer thread was acknowledged (or not).
    /// `bytes`: what it counted for in its table's memory budget.
    DeadLettered {
        segment: Segment,
        table: usize,
        bytes: usize,
        error: Option<String>,
    },
    /// A check of table `table`'s columns that the pipeline asked for is
    /// done (the new columns, if any, are in the table's schema history).
    SchemaChecked {
        table: usize,
        result: Result<(), String>,
    },
    /// Commits the broker refused (from librdkafka's commit callback): their
    /// positions must be committed again even if they do not move.
    CommitFailed(Vec<(String, i32)>),
}

/// Sends one encoded batch to ClickHouse. A trait because the retry loop is
/// tested against a writer that fails on cue.
pub trait Writer: Send + Sync + 'static {
    /// `token`, when given, is the insert's `insert_deduplication_token`.
    fn insert(
        &self,
        sql: &str,
        body: Bytes,
        token: Option<&str>,
    ) -> impl Future<Output = Result<(), InsertError>> + Send;
}

/// The real writer: HTTP through the `clickhouse` crate, LZ4 when enabled.
pub struct ClickHouseWriter {
    client: clickhouse::Client,
    timeout: Duration,
}

/// Bodies are sent in chunks of this size so that compression and the network
/// overlap instead of one huge LZ4 block being built first.
const CHUNK: usize = 1 << 20;

/// The client every part of chbridge uses for one ClickHouse configuration.
pub fn client(cfg: &ClickHouseConfig) -> Result<clickhouse::Client, String> {
    let base = if cfg.url.starts_with("https://") {
        clickhouse::Client::with_http_client(tls::http_client(cfg)?)
    } else {
        clickhouse::Client::default()
    };
    let mut c = base
        .with_url(cfg.url.clone())
        .with_user(cfg.user.clone())
        .with_compression(if cfg.compression {
            clickhouse::Compression::Lz4
        } else {
            clickhouse::Compression::None
        })
        // The bridge batches itself; server-side buffering would acknowledge
        // rows before they are in a part (this server build defaults it to 1).
        .with_setting("async_insert", "0");
    if !cfg.password.is_empty() {
        c = c.with_password(cfg.password.expose().to_string());
    }
    Ok(c)
}

/// The `log_comment` of the group's inserts: `chbridge status` finds the
/// last insert per table in ClickHouse's query log by it.
pub fn log_comment(group: &str) -> String {
    format!("chbridge:{group}")
}

impl ClickHouseWriter {
    pub fn new(cfg: &ClickHouseConfig, group: &str) -> Result<ClickHouseWriter, String> {
        Ok(ClickHouseWriter {
            client: client(cfg)?.with_setting("log_comment", log_comment(group)),
            timeout: cfg.insert_timeout,
        })
    }
}

impl Writer for ClickHouseWriter {
    async fn insert(&self, sql: &str, body: Bytes, token: Option<&str>) -> Result<(), InsertError> {
        let mut insert = self
            .client
            .insert_formatted_with(sql.to_string())
            .with_timeouts(Some(self.timeout), Some(self.timeout));
        if let Some(token) = token {
            // Materialized views below the table deduplicate with it too.
            insert = insert
                .with_setting("insert_deduplicate", "1")
                .with_setting("insert_deduplication_token", token)
                .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1");
        }
        let mut offset = 0;
        while offset < body.len() {
            let end = (offset + CHUNK).min(body.len());
            insert
                .send(body.slice(offset..end))
                .await
                .map_err(|e| errors::classify(&e))?;
            offset = end;
        }
        insert.end().await.map_err(|e| errors::classify(&e))
    }
}

/// Backoff before attempt `attempt + 1`: exponential from `initial` to `max`,
/// with full jitter in its upper half so that replicas do not retry in step.
pub fn backoff(retry: &RetryConfig, attempt: u32) -> Duration {
    let base = retry
        .initial_backoff
        .saturating_mul(1u32 << attempt.min(20))
        .min(retry.max_backoff);
    let half = base / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// What happens to a row ClickHouse refuses, for the rows of one topic.
#[derive(Debug, Clone)]
pub enum RowPolicy {
    Stop,
    Skip,
    DeadLetter(String),
}

/// What the routes into a table say about the rows ClickHouse refuses.
/// A reload (SIGHUP) replaces it while the sink runs.
#[derive(Debug, Clone)]
pub struct RowPolicies {
    /// Per topic index: the policy of the route from that topic to this table.
    pub by_topic: Vec<RowPolicy>,
    /// Stop isolating bad rows once more than this share of a batch was refused.
    pub max_rejected_ratio: f64,
}

impl RowPolicies {
    fn of(&self, topic: u32) -> Option<&RowPolicy> {
        self.by_topic.get(topic as usize)
    }
}

/// Isolating bad rows is worth it unless every row's route says stop.
fn may_isolate(policies: &RowPolicies, batch: &ReadyBatch) -> bool {
    batch
        .rows
        .iter()
        .any(|r| !matches!(policies.of(r.key.topic), Some(RowPolicy::Stop) | None))
}

/// Everything a table's sink task needs.
pub struct TableSink<W> {
    pub writer: Arc<W>,
    pub table_name: String,
    pub sql: String,
    pub retry: RetryConfig,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Topic names, indexed like `PartitionKey::topic`.
    pub topics: Arc<Vec<String>>,
    pub policies: tokio::sync::watch::Receiver<RowPolicies>,
    pub dead_letters: Option<Arc<DeadLetters>>,
    /// Exactly-once: where batch ranges are recorded, and the group for tokens.
    pub state: Option<Arc<dyn RangeStore>>,
    pub group: String,
    pub ownership: Arc<Ownership>,
    /// Follows the table's columns (schema drift); None in unit tests.
    pub schema: Option<SchemaWatch>,
}

/// A sink's view of its table's columns: checked before every batch's
/// insert, so that rows encoded for columns that changed since are decoded
/// again (`SinkEvent::Stale`) instead of being misread.
pub struct SchemaWatch {
    pub client: clickhouse::Client,
    pub database: String,
    pub table: String,
    pub history: Arc<crate::schema::drift::History>,
    /// The version the sink's INSERT statement names the columns of.
    pub sql_version: u64,
    /// Bounds each read of the columns (the inserts' timeout).
    pub timeout: Duration,
}

impl SchemaWatch {
    fn current(&self) -> crate::schema::drift::Versioned {
        self.history.current()
    }

    /// Reads the table's columns; a change becomes a new version. A failure
    /// to read is not an error here: the insert that follows meets the same
    /// outage and retries.
    async fn refresh(&mut self) {
        let table = format!("{}.{}", self.database, self.table);
        let read = crate::schema::load_table(&self.client, &self.database, &self.table);
        let now = match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(table, error = %e, "could not check the table's columns");
                return;
            }
            Err(_) => {
                tracing::debug!(
                    table,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "checking the table's columns timed out"
                );
                return;
            }
        };
        if let Some(v) = self.history.observe(now) {
            announce(&v);
        }
    }
}

/// Logs a new version of a table's columns (whoever saw it first).
pub fn announce(v: &crate::schema::drift::Versioned) {
    let problems = v.schema.problems();
    tracing::warn!(
        table = %v.schema,
        version = v.version,
        columns = %v.schema.insert_columns().map(|c| format!("{} {}", c.name, c.type_text)).collect::<Vec<_>>().join(", "),
        problems = %problems.join("; "),
        "the table's columns changed: rows not yet inserted are decoded again from their records for the new columns"
    );
}

/// A row ClickHouse refused on its own.
struct Rejected {
    row: usize,
    error: InsertError,
}

/// How one batch's delivery ended, short of an error.
#[derive(Debug, PartialEq, Eq)]
enum Delivered {
    /// In ClickHouse, but for this many rows refused and handled by policy.
    Inserted(usize),
    /// Its partitions are no longer this process's: not (fully) inserted.
    Fenced,
    /// Encoded for columns the table no longer has as they were; `splits`:
    /// how it was cut so far (exactly-once, recorded).
    Stale { recorded: bool, splits: Vec<Split> },
}

/// How isolating the refused rows of a batch ended, short of an error.
enum Isolated {
    Done(Vec<Rejected>),
    Fenced,
    Stale(Vec<Split>),
}

/// A write to the exactly-once state table.
#[derive(Clone, Copy)]
enum StateWrite<'a> {
    Range(&'a BatchRange),
    Split(&'a BatchRange, Split),
}

/// How one insert (with its retries) ended, short of an error.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Acknowledged,
    /// The batch's partitions were given away between two attempts.
    Fenced,
}

impl<W: Writer> TableSink<W> {
    /// Inserts batches in the order received until the channel closes or
    /// `cancel` fires. Reports every outcome on `events`.
    pub async fn run(
        mut self,
        mut batches: mpsc::Receiver<ReadyBatch>,
        events: std_mpsc::Sender<SinkEvent>,
        cancel: CancellationToken,
    ) {
        while let Some(batch) = tokio::select! {
            b = batches.recv() => b,
            _ = cancel.cancelled() => None,
        } {
            let outcome = tokio::select! {
                r = self.follow_and_deliver(&batch) => r,
                _ = cancel.cancelled() => return,
            };
            let (event, failed) = match outcome {
                Ok(Delivered::Inserted(rejected)) => {
                    (SinkEvent::Inserted { batch, rejected }, false)
                }
                Ok(Delivered::Fenced) => (SinkEvent::Dropped(batch), false),
                Ok(Delivered::Stale { recorded, splits }) => (
                    SinkEvent::Stale {
                        batch,
                        recorded,
                        splits,
                    },
                    false,
                ),
                Err(error) => (SinkEvent::Failed { batch, error }, true),
            };
            // After a failure nothing more is inserted: the commit cannot
            // pass the failed batch anyway, and with exactly-once a later
            // batch's recorded range would claim the failed one had landed.
            if events.send(event).is_err() || failed {
                return;
            }
        }
    }

    /// Checks the table's columns and delivers the batch, unless it was
    /// encoded for columns that changed since. A refusal that a change made
    /// between the check and the insert could explain is checked once more.
    async fn follow_and_deliver(&mut self, batch: &ReadyBatch) -> Result<Delivered, InsertError> {
        if self.table_changed(batch).await {
            return Ok(Delivered::Stale {
                recorded: false,
                splits: batch.splits.clone(),
            });
        }
        if let Some(w) = self.schema.as_mut() {
            let current = w.current();
            if current.version != w.sql_version {
                self.sql = current.schema.insert_sql();
                w.sql_version = current.version;
            }
        }
        let delivered = self.deliver(batch).await;
        if let Err(e) = &delivered {
            if e.class != ErrorClass::Transient && self.table_changed(batch).await {
                tracing::info!(table = %self.table_name, error = %e,
                    "an insert refused after the table's columns changed: decoding its records again");
                return Ok(Delivered::Stale {
                    recorded: batch.range.is_some(),
                    splits: batch.splits.clone(),
                });
            }
        }
        delivered
    }

    /// Reads the table's columns again: whether they are no longer those
    /// the batch was encoded for.
    async fn table_changed(&mut self, batch: &ReadyBatch) -> bool {
        match self.schema.as_mut() {
            None => false,
            Some(w) => {
                w.refresh().await;
                w.current().version != batch.schema_version
            }
        }
    }

    /// Whether this process still owns what the batch holds: with
    /// exactly-once, its one partition at the assignment it was read under;
    /// otherwise at least one of its partitions (a batch of partitions that
    /// were all revoked or lost is inserted by their new owner).
    fn owner_check(ownership: &Ownership, batch: &ReadyBatch) -> bool {
        if batch.range.is_some() {
            batch.segments.iter().all(|s| ownership.owns(s))
        } else {
            batch.segments.is_empty() || batch.segments.iter().any(|s| ownership.owns(s))
        }
    }

    /// Inserts one batch. The ownership fence is checked before every
    /// attempt (range write, insert, retry, each part of a split batch):
    /// after a revocation the new owner reads the same records again, and
    /// with exactly-once both inserting would race on the same range.
    async fn deliver(&mut self, batch: &ReadyBatch) -> Result<Delivered, InsertError> {
        let ownership = self.ownership.clone();
        let owned = move || Self::owner_check(&ownership, batch);
        if !owned() {
            return Ok(Delivered::Fenced);
        }
        let token = match &batch.range {
            None => None,
            Some(range) => {
                if self.write_state(StateWrite::Range(range), &owned).await? == Sent::Fenced {
                    return Ok(Delivered::Fenced);
                }
                Some(range.token(&self.group))
            }
        };
        let n = batch.rows.len();
        // A replay of a range that was split: never inserted whole, its
        // parts as recorded.
        let first = if batch.splits.is_empty() {
            match self
                .insert_with_retry(batch.body.clone(), n, token.as_deref(), &owned)
                .await
            {
                Ok(Sent::Acknowledged) => {
                    self.count_inserted(batch, n);
                    return Ok(Delivered::Inserted(0));
                }
                Ok(Sent::Fenced) => return Ok(Delivered::Fenced),
                Err(e) if matches!(e.class, ErrorClass::Data | ErrorClass::Split) => Some(e),
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        // One copy for the whole batch: a reload (SIGHUP) must not change
        // the rules between isolating rows and handling them.
        let policies = self.policies.borrow().clone();
        if let Some(e) = &first {
            if e.class == ErrorClass::Data && !may_isolate(&policies, batch) {
                return Err(e.clone());
            }
            // Refused by a table that changed since the check: decoded
            // again, not split (its parts could be misread as well).
            if self.table_changed(batch).await {
                return Ok(Delivered::Stale {
                    recorded: batch.range.is_some(),
                    splits: batch.splits.clone(),
                });
            }
        }
        let rejected = match self
            .isolate(batch, &policies, token.as_deref(), first, &owned)
            .await?
        {
            Isolated::Done(rejected) => rejected,
            Isolated::Fenced => return Ok(Delivered::Fenced),
            Isolated::Stale(splits) => {
                return Ok(Delivered::Stale {
                    recorded: batch.range.is_some(),
                    splits,
                })
            }
        };
        self.count_inserted(batch, n - rejected.len());
        self.handle_rejected(batch, &policies, &rejected).await?;
        Ok(Delivered::Inserted(rejected.len()))
    }

    /// A write to the exactly-once state table: retried like an insert, and
    /// fenced before every attempt.
    async fn write_state(
        &self,
        write: StateWrite<'_>,
        owned: &(dyn Fn() -> bool + Sync),
    ) -> Result<Sent, InsertError> {
        let Some(state) = &self.state else {
            return Ok(Sent::Acknowledged);
        };
        let mut attempt = 0u32;
        loop {
            if !owned() {
                return Ok(Sent::Fenced);
            }
            let result = match write {
                StateWrite::Range(range) => state.record(std::slice::from_ref(range)).await,
                StateWrite::Split(range, split) => state.record_split(range, split).await,
            };
            match result {
                Ok(()) => {
                    self.metrics.state_writes.with_label_values(&["ok"]).inc();
                    return Ok(Sent::Acknowledged);
                }
                Err(e) => {
                    self.metrics
                        .state_writes
                        .with_label_values(&["failed"])
                        .inc();
                    let e = errors::classify(&e);
                    let what = match write {
                        StateWrite::Range(_) => "the batch range",
                        StateWrite::Split(..) => "how a refused batch is split",
                    };
                    if e.class != ErrorClass::Transient {
                        return Err(InsertError {
                            message: format!(
                                "cannot record {what} in the exactly-once state table {}: {}",
                                state.name(),
                                e.message
                            ),
                            ..e
                        });
                    }
                    let wait = backoff(&self.retry, attempt);
                    attempt += 1;
                    if self.retry.max_attempts != 0 && attempt >= self.retry.max_attempts {
                        return Err(InsertError {
                            message: format!(
                                "gave up recording {what} in {} after {attempt} attempts \
                                 (retry.max_attempts): {}",
                                state.name(),
                                e.message
                            ),
                            ..e
                        });
                    }
                    tracing::warn!(table = %self.table_name, attempt, code = %e.code_label(), error = %e,
                        "recording {what} failed, will retry");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Splits a refused batch until the rows ClickHouse refuses on their own
    /// are found; every other row is inserted. A part is an interval of keys:
    /// record offsets with exactly-once (a batch holds one partition), row
    /// positions otherwise. ClickHouse's "at row N" points at a culprit,
    /// which is cut out; otherwise the part is halved; a batch over a server
    /// limit (`ErrorClass::Split`) is halved until its parts pass. With
    /// exactly-once each part carries a token naming its offsets, and each
    /// cut is recorded before its parts are inserted: a replay (after a
    /// crash, or decoded again after a table change) cuts the same way,
    /// skipping what landed. `first`: the whole batch's refusal; None for a
    /// replay of a range recorded as split. The table is checked before
    /// every part: a part encoded for columns that changed is not sent.
    async fn isolate(
        &mut self,
        batch: &ReadyBatch,
        policies: &RowPolicies,
        token: Option<&str>,
        first: Option<InsertError>,
        owned: &(dyn Fn() -> bool + Sync),
    ) -> Result<Isolated, InsertError> {
        let n = batch.rows.len();
        let limit = ((n as f64 * policies.max_rejected_ratio).ceil() as usize).max(10);
        let keys: Vec<i64> = match &batch.range {
            Some(_) => batch.rows.iter().map(|r| r.offset).collect(),
            None => (0..n as i64).collect(),
        };
        let root = match &batch.range {
            Some(r) => (r.first, r.last),
            None => (0, n as i64 - 1),
        };
        let rows_of = |lo: i64, hi: i64| {
            (
                keys.partition_point(|&k| k < lo),
                keys.partition_point(|&k| k <= hi),
            )
        };
        let mut splits: Vec<Split> = batch.splits.clone();
        let mut rejected = Vec::new();
        let mut work: Vec<((i64, i64), Option<InsertError>)> = vec![(root, first)];
        while let Some(((lo, hi), known)) = work.pop() {
            let (i, j) = rows_of(lo, hi);
            if i >= j {
                continue;
            }
            // Split before: its parts, never it whole.
            if let Some(split) = splits.iter().find(|s| (s.lo, s.hi) == (lo, hi)).copied() {
                work.extend(split.parts().into_iter().rev().map(|p| (p, None)));
                continue;
            }
            let err = match known {
                Some(e) => e,
                None => {
                    if self.table_changed(batch).await {
                        return Ok(Isolated::Stale(splits));
                    }
                    self.metrics
                        .bisect_inserts
                        .with_label_values(&[&self.table_name])
                        .inc();
                    let part_token = token.map(|t| format!("{t}/{lo}-{hi}"));
                    match self
                        .insert_with_retry(batch.body_of(i, j), j - i, part_token.as_deref(), owned)
                        .await
                    {
                        Ok(Sent::Acknowledged) => continue,
                        Ok(Sent::Fenced) => return Ok(Isolated::Fenced),
                        Err(e) if matches!(e.class, ErrorClass::Data | ErrorClass::Split) => e,
                        Err(e) => return Err(e),
                    }
                }
            };
            if j - i == 1 {
                let row = batch.rows[i];
                if err.class == ErrorClass::Split {
                    return Err(InsertError {
                        message: format!(
                            "the record at {}[{}] offset {} alone is over a ClickHouse limit: {}",
                            self.topic_name(row.key.topic),
                            row.key.partition,
                            row.offset,
                            err.message
                        ),
                        class: ErrorClass::Fatal,
                        ..err
                    });
                }
                if matches!(policies.of(row.key.topic), Some(RowPolicy::Stop) | None) {
                    return Err(InsertError {
                        message: format!(
                            "the record at {}[{}] offset {} was refused (route on_error = \"stop\"): {}",
                            self.topic_name(row.key.topic),
                            row.key.partition,
                            row.offset,
                            err.message
                        ),
                        ..err
                    });
                }
                rejected.push(Rejected { row: i, error: err });
                if rejected.len() > limit {
                    return Err(InsertError {
                        message: format!(
                            "ClickHouse refused more than {limit} rows of a batch of {n} \
                             (max_failed_ratio); the last: {}",
                            rejected
                                .last()
                                .map(|r| r.error.message.as_str())
                                .unwrap_or("")
                        ),
                        class: ErrorClass::Data,
                        code: None,
                    });
                }
                continue;
            }
            let hint = (err.class == ErrorClass::Data)
                .then(|| row_hint(&err.message))
                .flatten()
                .filter(|&h| h < j - i);
            let split = match hint {
                Some(h) => Split {
                    lo,
                    hi,
                    at: keys[i + h],
                    single: true,
                },
                None => Split {
                    lo,
                    hi,
                    at: keys[i + (j - i) / 2 - 1],
                    single: false,
                },
            };
            if let Some(range) = &batch.range {
                if self
                    .write_state(StateWrite::Split(range, split), owned)
                    .await?
                    == Sent::Fenced
                {
                    return Ok(Isolated::Fenced);
                }
            }
            splits.push(split);
            work.extend(split.parts().into_iter().rev().map(|p| (p, None)));
        }
        // Every row refused one by one is the table's problem (a view, a
        // constraint no row meets, a column every row misses), not bad rows:
        // dead-lettering them all would empty the topic into the dead letters.
        if n >= 2 && rejected.len() == n {
            let last = rejected.pop().map(|r| r.error);
            return Err(InsertError {
                message: format!(
                    "ClickHouse refused every one of the {n} rows of a batch, each on its own: \
                     the table refuses them, not bad records (a materialized view, a \
                     constraint or a column every row fails); fix the table and start \
                     chbridge again. The last refusal: {}",
                    last.as_ref().map_or("", |e| e.message.as_str())
                ),
                class: ErrorClass::Data,
                code: last.and_then(|e| e.code),
            });
        }
        Ok(Isolated::Done(rejected))
    }

    fn topic_name(&self, topic: u32) -> &str {
        self.topics
            .get(topic as usize)
            .map(String::as_str)
            .unwrap_or("?")
    }
    /// Dead-letters or counts the refused rows; returns once the broker has
    /// every dead letter, so the batch's offsets can be released.
    async fn handle_rejected(
        &self,
        batch: &ReadyBatch,
        policies: &RowPolicies,
        rejected: &[Rejected],
    ) -> Result<(), InsertError> {
        // What each refused row's route does with it.
        let mut letters: Vec<(String, String, i32, i64, String)> = Vec::new();
        for r in rejected {
            let row = batch.rows[r.row];
            let topic = self.topic_name(row.key.topic).to_string();
            self.metrics
                .records_failed
                .with_label_values(&[&topic, &self.table_name, metrics::REJECTED])
                .inc();
            match policies.of(row.key.topic) {
                Some(RowPolicy::DeadLetter(dlq)) => letters.push((
                    dlq.clone(),
                    topic,
                    row.key.partition,
                    row.offset,
                    r.error.message.clone(),
                )),
                _ => tracing::warn!(
                    table = %self.table_name,
                    topic,
                    partition = row.key.partition,
                    offset = row.offset,
                    error = %r.error,
                    "ClickHouse refused a row; skipped (on_error = \"skip\")"
                ),
            }
        }
        if letters.is_empty() {
            return Ok(());
        }
        let Some(dl) = self.dead_letters.clone() else {
            return Err(dead_letter_error(
                "no dead-letter producer was created".into(),
            ));
        };
        let table = self.table_name.clone();
        // Re-reading and producing are blocking librdkafka calls.
        let sent = tokio::task::spawn_blocking(move || {
            let wanted: Vec<(String, i32, i64)> = letters
                .iter()
                .map(|(_, t, p, o, _)| (t.clone(), *p, *o))
                .collect();
            let (found, missing) = dl.fetch_originals(&wanted);
            let mut waits = Vec::new();
            for (dlq, topic, partition, offset, message) in &letters {
                let key = (topic.clone(), *partition, *offset);
                let (tx, rx) = tokio::sync::oneshot::channel();
                let failure = Failure {
                    table: &table,
                    class: "data",
                    message,
                };
                let result = match found.get(&key) {
                    Some(m) => dl.send(dlq, &Record::of_owned(m), &failure, Ticket::Notify(tx)),
                    None => {
                        // Retention removed it: send what is known.
                        let why = missing.get(&key).map(String::as_str).unwrap_or("not found");
                        let message = format!(
                            "{message}; the original record could not be read again: {why}"
                        );
                        let origin = Record {
                            topic,
                            partition: *partition,
                            offset: *offset,
                            timestamp_ms: None,
                            key: None,
                            value: None,
                            headers: None,
                        };
                        let failure = Failure {
                            message: &message,
                            ..failure
                        };
                        dl.send(dlq, &origin, &failure, Ticket::Notify(tx))
                    }
                };
                result?;
                waits.push((rx, topic.clone()));
            }
            Ok(waits)
        })
        .await
        .unwrap_or_else(|e| Err(format!("dead-letter task failed: {e}")));
        let waits = sent.map_err(dead_letter_error)?;
        for (rx, topic) in waits {
            match rx.await {
                Ok(Ok(())) => self
                    .metrics
                    .dead_letters
                    .with_label_values(&[&topic, &self.table_name, metrics::DEAD_LETTER_DATA])
                    .inc(),
                Ok(Err(m)) => return Err(dead_letter_error(m)),
                Err(_) => return Err(dead_letter_error("the producer was closed".into())),
            }
        }
        Ok(())
    }

    fn count_inserted(&self, batch: &ReadyBatch, rows: usize) {
        if rows == 0 {
            return; // every row was refused: nothing was inserted
        }
        let table = self.table_name.as_str();
        let m = &self.metrics;
        m.rows_inserted
            .with_label_values(&[table])
            .inc_by(rows as u64);
        m.insert_bytes
            .with_label_values(&[table])
            .inc_by(batch.body.len() as u64);
        m.batches_inserted.with_label_values(&[table]).inc();
        m.batch_rows
            .with_label_values(&[table])
            .observe(rows as f64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        m.last_insert.with_label_values(&[table]).set(now);
    }

    /// Sends the same bytes until ClickHouse acknowledges them, an error
    /// says retrying cannot help, or the batch's partitions are given away
    /// (checked before every attempt). An error that may be the batch's own
    /// doing (a query's time or memory limit, an unknown code) is retried a
    /// bounded number of times, then taken as such (`InsertError::repeats`).
    /// Every retry is logged and counted with the table, code and attempt.
    async fn insert_with_retry(
        &self,
        body: Bytes,
        rows: usize,
        token: Option<&str>,
        owned: &(dyn Fn() -> bool + Sync),
    ) -> Result<Sent, InsertError> {
        let table = self.table_name.as_str();
        let mut attempt = 0u32;
        // Consecutive failures with the same code.
        let mut same = (None, 0u32);
        loop {
            if !owned() {
                tracing::info!(
                    table,
                    rows,
                    attempts = attempt,
                    "the batch's partitions were given away: its new owner inserts its records"
                );
                return Ok(Sent::Fenced);
            }
            let started = Instant::now();
            match self.writer.insert(&self.sql, body.clone(), token).await {
                Ok(()) => {
                    self.health.set_clickhouse_ok(true);
                    self.metrics
                        .insert_duration
                        .with_label_values(&[table])
                        .observe(started.elapsed().as_secs_f64());
                    if attempt > 0 {
                        tracing::info!(
                            table,
                            attempts = attempt + 1,
                            "insert succeeded after retries"
                        );
                    }
                    return Ok(Sent::Acknowledged);
                }
                Err(e) => {
                    self.metrics
                        .insert_errors
                        .with_label_values(&[table, e.class.as_str()])
                        .inc();
                    attempt += 1;
                    if e.class == ErrorClass::Split && token.is_some() && !e.splits_alike() {
                        return Err(repeated(e, 1, rows, ErrorClass::Split, true));
                    }
                    if e.class != ErrorClass::Transient {
                        return Err(e);
                    }
                    same = if same.0 == e.code {
                        (e.code, same.1 + 1)
                    } else {
                        (e.code, 1)
                    };
                    if let Some((_, becomes)) = e.repeats().filter(|(l, _)| same.1 >= *l) {
                        return Err(repeated(e, same.1, rows, becomes, token.is_some()));
                    }
                    if e.code.is_none() {
                        // No answer from the server at all.
                        self.health.set_clickhouse_ok(false);
                    }
                    if self.retry.max_attempts != 0 && attempt >= self.retry.max_attempts {
                        return Err(InsertError {
                            message: format!(
                                "gave up after {attempt} attempts (retry.max_attempts): {}",
                                e.message
                            ),
                            ..e
                        });
                    }
                    let wait = backoff(&self.retry, attempt - 1);
                    let code = e.code_label();
                    tracing::warn!(
                        table,
                        rows,
                        attempt,
                        code = %code,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %e,
                        "insert failed, will retry the same batch"
                    );
                    self.metrics
                        .insert_retries
                        .with_label_values(&[table, &code])
                        .inc();
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// The error a transient-looking failure becomes once the same bytes failed
/// with it `times` times. Splitting is only safe with exactly-once when the
/// server would refuse the same rows the same way on a replay; a timeout or
/// memory limit depends on the server's load, so there it stops instead.
fn repeated(
    e: InsertError,
    times: u32,
    rows: usize,
    becomes: ErrorClass,
    eos: bool,
) -> InsertError {
    let code = e.code.map_or_else(String::new, |c| {
        format!(
            "code {c} ({})",
            errors::code_name(c).unwrap_or("unknown to chbridge")
        )
    });
    match becomes {
        ErrorClass::Split if !eos => InsertError {
            message: format!(
                "ClickHouse answered {code} {times} times for the same {rows} rows: taken as the \
                 batch's size, it is split: {}",
                e.message
            ),
            class: ErrorClass::Split,
            ..e
        },
        ErrorClass::Split => InsertError {
            message: format!(
                "ClickHouse answered {code} {times} times for the same {rows} rows. Exactly-once \
                 cannot split a batch on an error that depends on the server's load (a replay \
                 might not split the same way): lower batch.max_rows or batch.max_bytes, or raise \
                 the server's limit, then start chbridge again: {}",
                e.message
            ),
            class: ErrorClass::Fatal,
            ..e
        },
        other => InsertError {
            message: format!(
                "ClickHouse answered {code} {times} times for the same {rows} rows; chbridge stops \
                 rather than send them forever: {}",
                e.message
            ),
            class: other,
            ..e
        },
    }
}

fn dead_letter_error(message: String) -> InsertError {
    InsertError {
        class: ErrorClass::Fatal,
        code: None,
        message: format!("the dead-letter producer failed: {message}"),
    }
}

/// ClickHouse names the failing row of an insert as "at row N" (1-based);
/// returns it 0-based.
fn row_hint(message: &str) -> Option<usize> {
    let rest = &message[message.find("at row ")? + 7..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse::<usize>().ok()?.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exactly_once::memory::MemoryStore;
    use std::sync::Mutex;

    /// Fails with the given errors in turn, then succeeds; records every body.
    struct ScriptedWriter {
        failures: Mutex<Vec<InsertError>>,
        bodies: Mutex<Vec<Bytes>>,
    }

    impl Writer for ScriptedWriter {
        async fn insert(
            &self,
            _sql: &str,
            body: Bytes,
            _token: Option<&str>,
        ) -> Result<(), InsertError> {
            self.bodies.lock().unwrap().push(body);
            match self.failures.lock().unwrap().pop() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }

    fn err(class: ErrorClass, code: u32) -> InsertError {
        InsertError {
            class,
            code: Some(code),
            message: format!("Code: {code}"),
        }
    }

    /// Refuses any insert holding one of the `bad` bytes (each row is one
    /// byte), naming the row as ClickHouse does when `hint` is set; keeps
    /// what landed.
    struct RefusingWriter {
        bad: Vec<u8>,
        hint: bool,
        landed: Mutex<Vec<u8>>,
        tokens: Mutex<Vec<String>>,
        /// Per insert: how many ranges the state store held at that moment.
        store: Mutex<Option<Arc<MemoryStore>>>,
        recorded_before: Mutex<Vec<usize>>,
    }

    impl Writer for RefusingWriter {
        async fn insert(
            &self,
            _sql: &str,
            body: Bytes,
            token: Option<&str>,
        ) -> Result<(), InsertError> {
            self.tokens
                .lock()
                .unwrap()
                .push(token.unwrap_or("").to_string());
            if let Some(store) = self.store.lock().unwrap().as_ref() {
                let n = store.written.lock().unwrap().len();
                self.recorded_before.lock().unwrap().push(n);
            }
            match body.iter().position(|b| self.bad.contains(b)) {
                Some(i) => Err(InsertError {
                    class: ErrorClass::Data,
                    code: Some(469),
                    message: if self.hint {
                        format!("Code: 469. Constraint `c` is violated at row {}.", i + 1)
                    } else {
                        "Code: 469. Constraint `c` is violated.".into()
                    },
                }),
                None => {
                    self.landed.lock().unwrap().extend_from_slice(&body);
                    Ok(())
                }
            }
        }
    }

    fn refusing(bad: &[u8], hint: bool) -> TableSink<RefusingWriter> {
        sink_with(
            RefusingWriter {
                bad: bad.to_vec(),
                hint,
                landed: Mutex::new(Vec::new()),
                tokens: Mutex::new(Vec::new()),
                store: Mutex::new(None),
                recorded_before: Mutex::new(Vec::new()),
            },
            0,
        )
    }

    #[tokio::test]
    async fn a_refused_batch_is_split_until_only_the_bad_rows_are_left() {
        for hint in [true, false] {
            let mut s = refusing(&[7, 13, 14], hint);
            let b = batch_of(40);
            let rejected = s.deliver(&b).await.unwrap();
            assert_eq!(rejected, Delivered::Inserted(3), "hint={hint}");
            let mut landed = s.writer.landed.lock().unwrap().clone();
            landed.sort();
            let expected: Vec<u8> = (0..40).filter(|b| ![7, 13, 14].contains(b)).collect();
            assert_eq!(landed, expected, "every good row lands once (hint={hint})");
            assert_eq!(
                s.metrics
                    .records_failed
                    .with_label_values(&["t", "db.t", "rejected"])
                    .get(),
                3
            );
            assert_eq!(
                s.metrics.rows_inserted.with_label_values(&["db.t"]).get(),
                37
            );
        }
        // ClickHouse's row number finds each culprit in a few inserts.
        let mut s = refusing(&[7, 13, 14], true);
        s.deliver(&batch_of(40)).await.unwrap();
        assert!(s.writer.tokens.lock().unwrap().len() <= 10);
    }

    #[tokio::test]
    async fn parts_of_an_exactly_once_batch_carry_tokens_derived_from_its_range() {
        let mut s = refusing(&[3], true);
        let store = Arc::new(MemoryStore::default());
        s.state = Some(store.clone());
        *s.writer.store.lock().unwrap() = Some(store.clone());
        let mut b = batch_of(8);
        b.range = Some(BatchRange {
            table: "db.t".into(),
            topic: "t".into(),
            partition: 0,
            first: 100,
            last: 107,
        });
        // The sink only inserts batches of partitions it owns.
        s.ownership.set(P0, 1);
        b.segments = vec![Segment {
            key: P0,
            generation: 1,
            first_offset: 100,
        }];
        assert_eq!(s.deliver(&b).await.unwrap(), Delivered::Inserted(1));
        // The range was recorded before anything was inserted.
        assert_eq!(
            *s.writer.recorded_before.lock().unwrap(),
            vec![1, 1, 1, 1],
            "every insert found the range in the store"
        );
        assert_eq!(
            store.written.lock().unwrap().clone(),
            vec![b.range.clone().unwrap()]
        );
        let tokens = s.writer.tokens.lock().unwrap().clone();
        assert_eq!(
            tokens,
            vec![
                "chbridge|g|db.t|t|0|100-107",
                "chbridge|g|db.t|t|0|100-107/100-102",
                "chbridge|g|db.t|t|0|100-107/103-103",
                "chbridge|g|db.t|t|0|100-107/104-107",
            ]
        );
        // The cut was recorded before its parts were inserted.
        assert_eq!(
            store.splits.lock().unwrap().clone(),
            vec![(
                b.range.clone().unwrap(),
                Split {
                    lo: 100,
                    hi: 107,
                    at: 103,
                    single: true
                }
            )]
        );
        // Revoked meanwhile: nothing is recorded or sent.
        s.ownership.remove(P0);
        assert_eq!(s.deliver(&b).await.unwrap(), Delivered::Fenced);
        assert_eq!(s.writer.tokens.lock().unwrap().len(), 4);
        assert_eq!(store.written.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn too_many_refused_rows_fail_the_batch_instead_of_splitting_forever() {
        let all: Vec<u8> = (0..40).collect();
        let mut s = refusing(&all, true);
        let e = s.deliver(&batch_of(40)).await.unwrap_err();
        assert!(e.message.contains("refused more than 20 rows"), "{e}");
    }

    #[test]
    fn row_hints_are_read_from_clickhouse_messages() {
        assert_eq!(
            row_hint("Constraint `c` for table t is violated at row 2. Expression"),
            Some(1)
        );
        assert_eq!(row_hint("Cannot parse input: (at row 1)\n"), Some(0));
        assert_eq!(row_hint("no row here"), None);
    }

    fn sink(failures: Vec<InsertError>, max_attempts: u32) -> TableSink<ScriptedWriter> {
        sink_with(
            ScriptedWriter {
                failures: Mutex::new(failures),
                bodies: Mutex::new(Vec::new()),
            },
            max_attempts,
        )
    }

    fn sink_with<W: Writer>(writer: W, max_attempts: u32) -> TableSink<W> {
        TableSink {
            schema: None,
            writer: Arc::new(writer),
            table_name: "db.t".into(),
            sql: "INSERT".into(),
            retry: RetryConfig {
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
                max_attempts,
            },
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(Duration::from_secs(60))),
            topics: Arc::new(vec!["t".into()]),
            policies: tokio::sync::watch::channel(RowPolicies {
                by_topic: vec![RowPolicy::Skip],
                max_rejected_ratio: 0.5,
            })
            .1,
            dead_letters: None,
            state: None,
            group: "g".into(),
            ownership: Arc::new(Ownership::default()),
        }
    }

    const P0: PartitionKey = PartitionKey {
        topic: 0,
        partition: 0,
    };

    /// `n` one-byte rows: row i is the byte i, at offset 100 + i.
    fn batch_of(n: usize) -> ReadyBatch {
        ReadyBatch {
            table: 0,
            body: Bytes::from((0..n as u8).collect::<Vec<u8>>()),
            rows: (0..n)
                .map(|i| RowOrigin {
                    end: i + 1,
                    key: P0,
                    offset: 100 + i as i64,
                })
                .collect(),
            segments: vec![],
            oldest_timestamp_ms: None,
            range: None,
            replay: false,
            splits: Vec::new(),
            schema_version: 0,
            accounted: 0,
        }
    }

    fn always_owned() -> bool {
        true
    }

    #[tokio::test]
    async fn transient_errors_resend_the_same_bytes_until_acknowledged() {
        let s = sink(
            vec![
                err(ErrorClass::Transient, 241),
                err(ErrorClass::Transient, 202),
            ],
            0,
        );
        let b = batch_of(2);
        s.insert_with_retry(b.body.clone(), 2, None, &always_owned)
            .await
            .unwrap();
        let bodies = s.writer.bodies.lock().unwrap();
        assert_eq!(bodies.len(), 3);
        assert!(bodies.iter().all(|b| b[..] == [0, 1]));
        // Counted by code: the retries say what ClickHouse answered.
        for code in ["241", "202"] {
            assert_eq!(
                s.metrics
                    .insert_retries
                    .with_label_values(&["db.t", code])
                    .get(),
                1
            );
        }
    }

    #[tokio::test]
    async fn data_errors_are_not_retried() {
        let s = sink(vec![err(ErrorClass::Data, 27)], 0);
        let e = s
            .insert_with_retry(batch_of(2).body, 2, None, &always_owned)
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Data);
        assert_eq!(s.writer.bodies.lock().unwrap().len(), 1);
        assert_eq!(
            s.metrics.rows_inserted.with_label_values(&["db.t"]).get(),
            0
        );
    }

    #[tokio::test]
    async fn max_attempts_bounds_retries() {
        let s = sink(vec![err(ErrorClass::Transient, 202); 5], 3);
        let e = s
            .insert_with_retry(batch_of(2).body, 2, None, &always_owned)
            .await
            .unwrap_err();
        assert!(e.message.contains("gave up after 3 attempts"), "{e}");
        assert_eq!(s.writer.bodies.lock().unwrap().len(), 3);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: 0,
        };
        let b0 = backoff(&r, 0);
        assert!(b0 >= Duration::from_millis(50) && b0 <= Duration::from_millis(100));
        let b10 = backoff(&r, 10);
        assert!(b10 >= Duration::from_millis(500) && b10 <= Duration::from_secs(1));
    }

    /// Fails every insert with `code` and `message` while the body holds more
    /// than `max_rows` one-byte rows; keeps what landed.
    struct LimitWriter {
        max_rows: usize,
        code: u32,
        message: &'static str,
        attempts: Mutex<usize>,
        landed: Mutex<Vec<u8>>,
    }

    impl Writer for LimitWriter {
        async fn insert(
            &self,
            _sql: &str,
            body: Bytes,
            _token: Option<&str>,
        ) -> Result<(), InsertError> {
            *self.attempts.lock().unwrap() += 1;
            if body.len() > self.max_rows {
                return Err(errors::classify(&clickhouse::error::Error::BadResponse(
                    format!("Code: {}. DB::Exception: {}", self.code, self.message),
                )));
            }
            self.landed.lock().unwrap().extend_from_slice(&body);
            Ok(())
        }
    }

    fn limited(max_rows: usize, code: u32, message: &'static str) -> TableSink<LimitWriter> {
        sink_with(
            LimitWriter {
                max_rows,
                code,
                message,
                attempts: Mutex::new(0),
                landed: Mutex::new(Vec::new()),
            },
            0,
        )
    }

    /// An exactly-once batch of `n` rows, owned at generation 1.
    fn owned_eos_batch(s: &TableSink<impl Writer>, n: usize) -> ReadyBatch {
        let mut b = batch_of(n);
        b.range = Some(BatchRange {
            table: "db.t".into(),
            topic: "t".into(),
            partition: 0,
            first: 100,
            last: 100 + n as i64 - 1,
        });
        s.ownership.set(P0, 1);
        b.segments = vec![Segment {
            key: P0,
            generation: 1,
            first_offset: 100,
        }];
        b
    }

    /// Item 7: a batch over a server limit that the same bytes always hit is
    /// split until its parts pass, instead of being sent again forever.
    #[tokio::test]
    async fn a_batch_over_a_server_limit_is_split_instead_of_retried_forever() {
        let cases = [
            (
                252,
                "Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS)",
            ),
            (
                241,
                "Memory limit (for query) exceeded: would use 9.31 GiB. (MEMORY_LIMIT_EXCEEDED)",
            ),
            (
                159,
                "Timeout exceeded: elapsed 5.1 seconds, maximum: 5. (TIMEOUT_EXCEEDED)",
            ),
        ];
        for (code, message) in cases {
            let mut s = limited(4, code, message);
            let b = batch_of(40);
            let got = tokio::time::timeout(Duration::from_secs(10), s.deliver(&b))
                .await
                .expect("the same bytes were sent again and again")
                .unwrap();
            assert_eq!(got, Delivered::Inserted(0), "code {code}");
            let mut landed = s.writer.landed.lock().unwrap().clone();
            landed.sort();
            assert_eq!(
                landed,
                (0..40).collect::<Vec<u8>>(),
                "every row once (code {code})"
            );
            assert_eq!(
                s.metrics.rows_inserted.with_label_values(&["db.t"]).get(),
                40
            );
        }
        // A timeout is retried TIMEOUT_REPEATS times before it is the batch's.
        let mut s = limited(4, 159, "Timeout exceeded. (TIMEOUT_EXCEEDED)");
        s.deliver(&batch_of(8)).await.unwrap();
        let attempts = *s.writer.attempts.lock().unwrap();
        assert_eq!(
            attempts,
            errors::TIMEOUT_REPEATS as usize + 2,
            "3 of 8 rows, then two halves"
        );
    }

    /// Item 7: with exactly-once, a load-dependent limit must not split (a
    /// replay might not split alike and would duplicate): it stops, saying
    /// what to change. Partitions per block split alike, so they do split.
    #[tokio::test]
    async fn exactly_once_splits_only_where_a_replay_splits_alike() {
        let mut s = limited(
            4,
            241,
            "Memory limit (for query) exceeded. (MEMORY_LIMIT_EXCEEDED)",
        );
        let b = owned_eos_batch(&s, 8);
        let e = s.deliver(&b).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal, "{e}");
        assert!(e.message.contains("lower batch.max_rows"), "{e}");
        assert!(s.writer.landed.lock().unwrap().is_empty());
        let mut s = limited(
            4,
            252,
            "Too many partitions for single INSERT block (more than 100).",
        );
        let b = owned_eos_batch(&s, 8);
        assert_eq!(s.deliver(&b).await.unwrap(), Delivered::Inserted(0));
        assert_eq!(s.writer.landed.lock().unwrap().len(), 8);
    }

    /// Item 7: a code chbridge does not know is retried a few times, then stops.
    #[tokio::test]
    async fn an_unknown_code_that_repeats_stops_with_the_code() {
        let mut s = limited(0, 9999, "something new");
        let e = tokio::time::timeout(Duration::from_secs(10), s.deliver(&batch_of(3)))
            .await
            .expect("retried forever")
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal);
        assert!(
            e.message.contains("code 9999") && e.message.contains("5 times"),
            "{e}"
        );
        assert_eq!(*s.writer.attempts.lock().unwrap(), 5);
        assert_eq!(
            s.metrics
                .insert_retries
                .with_label_values(&["db.t", "9999"])
                .get(),
            4
        );
    }

    /// Item 9: every row of a batch refused one by one is a batch-level
    /// problem (a broken view, a constraint no row meets), whatever
    /// max_failed_ratio allows: the batch fails, nothing is dead-lettered.
    #[tokio::test]
    async fn a_batch_whose_every_row_is_refused_fails() {
        let all: Vec<u8> = (0..8).collect();
        let mut s = refusing(&all, false);
        s.policies = tokio::sync::watch::channel(RowPolicies {
            by_topic: vec![RowPolicy::Skip],
            max_rejected_ratio: 1.0,
        })
        .1;
        let e = s.deliver(&batch_of(8)).await.unwrap_err();
        assert!(e.message.contains("refused every one of the 8 rows"), "{e}");
        assert_eq!(
            s.metrics
                .records_failed
                .with_label_values(&["t", "db.t", "rejected"])
                .get(),
            0,
            "no row was handled as a bad row"
        );
    }

    /// Fails with a transient error, and takes the batch's partition away
    /// after its first attempt (a rebalance during a ClickHouse outage).
    struct RevokingWriter {
        ownership: Arc<Ownership>,
        attempts: Mutex<usize>,
    }

    impl Writer for RevokingWriter {
        async fn insert(
            &self,
            _sql: &str,
            _body: Bytes,
            _token: Option<&str>,
        ) -> Result<(), InsertError> {
            *self.attempts.lock().unwrap() += 1;
            self.ownership.remove(P0);
            Err(err(ErrorClass::Transient, 210))
        }
    }

    /// Item 3: the fence is checked before every attempt, not once: a
    /// partition revoked while its insert is being retried is not inserted
    /// by this member any more (its new owner inserts it).
    #[tokio::test]
    async fn a_revocation_between_retries_stops_the_insert() {
        let ownership = Arc::new(Ownership::default());
        let mut s = sink_with(
            RevokingWriter {
                ownership: ownership.clone(),
                attempts: Mutex::new(0),
            },
            0,
        );
        s.ownership = ownership;
        let b = owned_eos_batch(&s, 4);
        let got = tokio::time::timeout(Duration::from_secs(5), s.deliver(&b))
            .await
            .expect("still retrying for a partition it no longer owns");
        assert_eq!(got.unwrap(), Delivered::Fenced);
        assert_eq!(*s.writer.attempts.lock().unwrap(), 1);
        // At-least-once: a batch whose partitions are all gone is dropped too.
        let mut b = batch_of(2);
        b.segments = vec![Segment {
            key: P0,
            generation: 1,
            first_offset: 100,
        }];
        s.ownership.set(P0, 1);
        assert_eq!(s.deliver(&b).await.unwrap(), Delivered::Fenced);
        assert_eq!(*s.writer.attempts.lock().unwrap(), 2);
    }

    /// Item 3: the range write is fenced inside its retry loop as well.
    #[tokio::test]
    async fn a_revocation_while_the_range_write_is_retried_records_nothing_more() {
        let mut s = sink(vec![], 0);
        let store = Arc::new(MemoryStore::default());
        store
            .fail_writes
            .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
        s.state = Some(store.clone());
        let b = owned_eos_batch(&s, 2);
        let ownership = s.ownership.clone();
        let revoke = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            ownership.remove(P0);
        });
        let got = tokio::time::timeout(Duration::from_secs(5), s.deliver(&b))
            .await
            .expect("still recording a range for a partition it no longer owns");
        revoke.await.unwrap();
        assert_eq!(got.unwrap(), Delivered::Fenced);
        assert!(store.written.lock().unwrap().is_empty());
        assert!(
            s.writer.bodies.lock().unwrap().is_empty(),
            "nothing inserted"
        );
    }

    /// Deduplicates by token as ClickHouse does (a refused insert leaves no
    /// token), refuses rows holding one of `refuse`, keeps what landed.
    struct DedupWriter {
        refuse: Mutex<Vec<u8>>,
        seen: Mutex<std::collections::HashSet<String>>,
        landed: Mutex<Vec<u8>>,
        tokens: Mutex<Vec<String>>,
    }

    impl Writer for DedupWriter {
        async fn insert(
            &self,
            _sql: &str,
            body: Bytes,
            token: Option<&str>,
        ) -> Result<(), InsertError> {
            let token = token.unwrap_or("").to_string();
            self.tokens.lock().unwrap().push(token.clone());
            if let Some(i) = body
                .iter()
                .position(|b| self.refuse.lock().unwrap().contains(b))
            {
                return Err(InsertError {
                    class: ErrorClass::Data,
                    code: Some(469),
                    message: format!("Code: 469. Constraint violated at row {}.", i + 1),
                });
            }
            if self.seen.lock().unwrap().insert(token) {
                self.landed.lock().unwrap().extend_from_slice(&body);
            }
            Ok(())
        }
    }

    /// A refused exactly-once batch is split; then the table changes so that
    /// it accepts the whole (a constraint dropped, a column widened) and the
    /// range is replayed (after a crash, or decoded again). The replay must
    /// cut it as recorded: inserted whole under its token (which never
    /// landed), the rows of the parts that landed would be there twice.
    #[tokio::test]
    async fn a_replay_of_a_split_range_cuts_it_as_recorded_and_repeats_nothing() {
        let writer = DedupWriter {
            refuse: Mutex::new(vec![3]),
            seen: Mutex::new(Default::default()),
            landed: Mutex::new(Vec::new()),
            tokens: Mutex::new(Vec::new()),
        };
        let mut s = sink_with(writer, 0);
        let store = Arc::new(MemoryStore::default());
        s.state = Some(store.clone());
        let b = owned_eos_batch(&s, 8);
        assert_eq!(s.deliver(&b).await.unwrap(), Delivered::Inserted(1));
        // Now row 3 is accepted; the replay brings the recorded cut along.
        s.writer.refuse.lock().unwrap().clear();
        let mut replay = owned_eos_batch(&s, 8);
        replay.replay = true;
        replay.splits = store
            .splits
            .lock()
            .unwrap()
            .iter()
            .map(|(_, x)| *x)
            .collect();
        assert_eq!(s.deliver(&replay).await.unwrap(), Delivered::Inserted(0));
        let mut landed = s.writer.landed.lock().unwrap().clone();
        landed.sort();
        assert_eq!(
            landed,
            (0..8).collect::<Vec<u8>>(),
            "every row exactly once"
        );
        assert!(
            !s.writer.tokens.lock().unwrap()[4..]
                .iter()
                .any(|t| t == "chbridge|g|db.t|t|0|100-107"),
            "the replay inserted the split range whole: {:?}",
            s.writer.tokens.lock().unwrap()
        );
    }
}
