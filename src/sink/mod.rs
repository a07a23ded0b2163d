//! Inserting batches into ClickHouse: one task per table, each retrying the
//! same encoded bytes until ClickHouse acknowledges them, and reporting the
//! outcome back to the pipeline, which alone moves offsets.

pub mod errors;

use std::future::Future;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ClickHouseConfig, RetryConfig};
use crate::kafka::offsets::Segment;
use crate::observability::{Health, Metrics};
pub use errors::{ErrorClass, InsertError};

/// A batch closed for insertion.
#[derive(Debug)]
pub struct ReadyBatch {
    pub table: usize,
    pub rows: usize,
    pub body: Bytes,
    /// Where the rows came from: released when ClickHouse acknowledges them.
    pub segments: Vec<Segment>,
    /// Oldest Kafka timestamp in the batch (ms since the epoch), for latency.
    pub oldest_timestamp_ms: Option<i64>,
}

/// What a sink task reports back.
#[derive(Debug)]
pub enum SinkEvent {
    Inserted(ReadyBatch),
    /// The batch cannot be inserted (data or fatal error, or attempts exhausted).
    Failed {
        batch: ReadyBatch,
        error: InsertError,
    },
}

/// Sends one encoded batch to ClickHouse. A trait because the retry loop is
/// tested against a writer that fails on cue.
pub trait Writer: Send + Sync + 'static {
    fn insert(
        &self,
        sql: &str,
        body: Bytes,
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
pub fn client(cfg: &ClickHouseConfig) -> clickhouse::Client {
    let mut c = clickhouse::Client::default()
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
    c
}

impl ClickHouseWriter {
    pub fn new(cfg: &ClickHouseConfig) -> ClickHouseWriter {
        ClickHouseWriter {
            client: client(cfg),
            timeout: cfg.insert_timeout,
        }
    }
}

impl Writer for ClickHouseWriter {
    async fn insert(&self, sql: &str, body: Bytes) -> Result<(), InsertError> {
        let mut insert = self
            .client
            .insert_formatted_with(sql.to_string())
            .with_timeouts(Some(self.timeout), Some(self.timeout));
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

/// Everything a table's sink task needs.
pub struct TableSink<W> {
    pub writer: Arc<W>,
    pub table_name: String,
    pub sql: String,
    pub retry: RetryConfig,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl<W: Writer> TableSink<W> {
    /// Inserts batches in the order received until the channel closes or
    /// `cancel` fires. Reports every outcome on `events`.
    pub async fn run(
        self,
        mut batches: mpsc::Receiver<ReadyBatch>,
        events: std_mpsc::Sender<SinkEvent>,
        cancel: CancellationToken,
    ) {
        while let Some(batch) = tokio::select! {
            b = batches.recv() => b,
            _ = cancel.cancelled() => None,
        } {
            let outcome = tokio::select! {
                r = self.insert_with_retry(&batch) => r,
                _ = cancel.cancelled() => return,
            };
            let event = match outcome {
                Ok(()) => SinkEvent::Inserted(batch),
                Err(error) => SinkEvent::Failed { batch, error },
            };
            if events.send(event).is_err() {
                return;
            }
        }
    }

    async fn insert_with_retry(&self, batch: &ReadyBatch) -> Result<(), InsertError> {
        let table = self.table_name.as_str();
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            match self.writer.insert(&self.sql, batch.body.clone()).await {
                Ok(()) => {
                    self.health.set_clickhouse_ok(true);
                    let m = &self.metrics;
                    m.insert_duration
                        .with_label_values(&[table])
                        .observe(started.elapsed().as_secs_f64());
                    m.rows_inserted
                        .with_label_values(&[table])
                        .inc_by(batch.rows as u64);
                    m.insert_bytes
                        .with_label_values(&[table])
                        .inc_by(batch.body.len() as u64);
                    m.batches_inserted.with_label_values(&[table]).inc();
                    m.batch_rows
                        .with_label_values(&[table])
                        .observe(batch.rows as f64);
                    if attempt > 0 {
                        tracing::info!(
                            table,
                            attempts = attempt + 1,
                            "insert succeeded after retries"
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    self.metrics
                        .insert_errors
                        .with_label_values(&[table, e.class.as_str()])
                        .inc();
                    attempt += 1;
                    if e.class != ErrorClass::Transient {
                        return Err(e);
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
                    tracing::warn!(
                        table,
                        rows = batch.rows,
                        attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %e,
                        "insert failed, will retry the same batch"
                    );
                    self.metrics
                        .insert_retries
                        .with_label_values(&[table])
                        .inc();
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Fails with the given errors in turn, then succeeds; records every body.
    struct ScriptedWriter {
        failures: Mutex<Vec<InsertError>>,
        bodies: Mutex<Vec<Bytes>>,
    }

    impl Writer for ScriptedWriter {
        async fn insert(&self, _sql: &str, body: Bytes) -> Result<(), InsertError> {
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

    fn sink(failures: Vec<InsertError>, max_attempts: u32) -> TableSink<ScriptedWriter> {
        TableSink {
            writer: Arc::new(ScriptedWriter {
                failures: Mutex::new(failures),
                bodies: Mutex::new(Vec::new()),
            }),
            table_name: "db.t".into(),
            sql: "INSERT".into(),
            retry: RetryConfig {
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
                max_attempts,
            },
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(Duration::from_secs(60))),
        }
    }

    fn batch() -> ReadyBatch {
        ReadyBatch {
            table: 0,
            rows: 2,
            body: Bytes::from_static(b"rows"),
            segments: vec![],
            oldest_timestamp_ms: None,
        }
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
        s.insert_with_retry(&batch()).await.unwrap();
        let bodies = s.writer.bodies.lock().unwrap();
        assert_eq!(bodies.len(), 3);
        assert!(bodies.iter().all(|b| b == &Bytes::from_static(b"rows")));
        assert_eq!(
            s.metrics.insert_retries.with_label_values(&["db.t"]).get(),
            2
        );
        assert_eq!(
            s.metrics.rows_inserted.with_label_values(&["db.t"]).get(),
            2
        );
    }

    #[tokio::test]
    async fn data_errors_are_not_retried() {
        let s = sink(vec![err(ErrorClass::Data, 27)], 0);
        let e = s.insert_with_retry(&batch()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Data);
        assert_eq!(s.writer.bodies.lock().unwrap().len(), 1);
        assert_eq!(
            s.metrics.rows_inserted.with_label_values(&["db.t"]).get(),
            0
        );
    }

    #[tokio::test]
    async fn max_attempts_bounds_retries() {
        let s = sink(vec![err(ErrorClass::Transient, 241); 5], 3);
        let e = s.insert_with_retry(&batch()).await.unwrap_err();
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
}
