//! Wiring: reads the target tables, starts one insert task per table, runs
//! the consumer loop on its own thread, and shuts everything down in order.

pub mod core;
mod rewind;
mod route;

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::core::{
    ClickHouseAccess, Core, ExactlyOnce, Flow, Limits, Reload, RouteState, Shared, TableState,
};
use crate::config::{Config, Delivery, OnError};
use crate::decode::{self, RecordError};
use crate::exactly_once::{self, RangeStore, StateStore};
use crate::kafka::context::{BridgeContext, Consumer};
use crate::kafka::dead_letter::DeadLetters;
use crate::kafka::offsets::Ownership;
use crate::kafka::Record;
use crate::observability::{Health, Metrics};
use crate::schema::{self, TableSchema};
use crate::sink::{self, ClickHouseWriter, InsertError, RowPolicies, RowPolicy, TableSink};

/// Why the pipeline stopped before being asked to.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The configuration does not fit the servers (bad librdkafka property,
    /// missing or unfillable table, ClickHouse unreachable at start).
    #[error("{0}")]
    Config(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error(
        "record {topic}[{partition}] at offset {offset} cannot be a row of {table}: {error}. \
         The route has on_error = \"stop\", so chbridge stopped and committed nothing at or \
         after this offset. Fix the producer (or the table), or set on_error = \"skip\" on \
         the route to count and skip such records."
    )]
    BadRecord {
        topic: String,
        partition: i32,
        offset: i64,
        table: String,
        error: RecordError,
    },
    #[error(
        "ClickHouse refused a batch of {rows} rows for {table} (records from {origin}): {error}. \
         Nothing from these offsets on was committed; fix the cause and start chbridge again."
    )]
    Insert {
        table: String,
        rows: usize,
        origin: String,
        error: InsertError,
    },
    #[error(
        "route {route} ({table}): {failed} of the last {total} records failed within {window:?}, \
         more than max_failed_ratio = {max_ratio}; the last: {last}. The route is stopped rather \
         than divert the whole topic, and nothing from this record on is committed for it: check \
         the route's format and table (or the producer), then restart chbridge; raise \
         routes[{route}].max_failed_ratio if this share is expected."
    )]
    TooManyFailures {
        route: usize,
        table: String,
        failed: u64,
        total: u64,
        window: Duration,
        max_ratio: f64,
        last: String,
    },
    #[error("dead letters: {0}")]
    DeadLetter(String),
    /// ClickHouse did not answer at start; retried until it does.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// How a requested stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Every batch was acknowledged and committed before the consumer left.
    pub drained: bool,
}

/// Batches queued per table beyond the one being inserted: enough to keep
/// ClickHouse busy while the next batch fills, small enough to bound memory.
const SINK_QUEUE: usize = 2;

/// Longest time between two housekeeping turns of the consumer loop while
/// records keep arriving (bounds how late a `max_wait` flush can be).
const SERVICE_INTERVAL: Duration = Duration::from_millis(2);

/// Records between two looks at the clock for SERVICE_INTERVAL (64 records
/// take well under a millisecond).
const CLOCK_EVERY: u32 = 64;

/// The schema registry client, when one is configured.
pub fn registry(
    config: &Config,
) -> Result<Option<std::sync::Arc<decode::registry::Registry>>, PipelineError> {
    config
        .schema_registry
        .as_ref()
        .map(|cfg| {
            decode::registry::Registry::new(cfg)
                .map(std::sync::Arc::new)
                .map_err(|e| PipelineError::Config(format!("schema_registry: {e}")))
        })
        .transpose()
}

/// Reads the schemas of every route's table, in route order, deduplicated.
/// Returns the schemas and, per route, the index of its table.
pub async fn load_tables(
    config: &Config,
    client: &clickhouse::Client,
) -> Result<(Vec<TableSchema>, Vec<usize>), PipelineError> {
    let mut schemas: Vec<TableSchema> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut route_tables = Vec::new();
    for i in 0..config.routes.len() {
        let (db, t) = config.route_table(i);
        let ti = match index.get(&(db.clone(), t.clone())) {
            Some(&ti) => ti,
            None => {
                let s = schema::load_table(client, &db, &t).await.map_err(|e| {
                    let transient = matches!(
                        &e,
                        schema::SchemaError::ClickHouse { source, .. }
                            if crate::sink::errors::classify(source).class
                                == crate::sink::ErrorClass::Transient
                    );
                    if transient {
                        PipelineError::Unavailable(format!("routes[{i}]: {e}"))
                    } else {
                        PipelineError::Config(format!("routes[{i}]: {e}"))
                    }
                })?;
                schemas.push(s);
                index.insert((db, t), schemas.len() - 1);
                schemas.len() - 1
            }
        };
        route_tables.push(ti);
    }
    let problems: Vec<String> = schemas.iter().flat_map(TableSchema::problems).collect();
    if !problems.is_empty() {
        return Err(PipelineError::Config(problems.join("\n")));
    }
    Ok((schemas, route_tables))
}

/// Runs until `shutdown` fires (then drains and commits) or a fatal error.
/// Configurations received on `reloads` (checked by `Config::reload_changes`)
/// replace batching and the routes' error policy while running.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    reloads: mpsc::UnboundedReceiver<Config>,
) -> Result<Outcome, PipelineError> {
    metrics
        .buffered_bytes_limit
        .set(config.max_buffered_bytes.as_u64() as i64);
    let client = sink::client(&config.clickhouse).map_err(PipelineError::Config)?;
    // A bridge may start before ClickHouse (a pod restart, a whole-cluster
    // start): wait for it, as for any transient failure, instead of exiting.
    let mut attempt = 0;
    let prepare = || async {
        let (schemas, route_tables) = load_tables(&config, &client).await?;
        let state = match config.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce => Some(prepare_exactly_once(&config, &client, &schemas).await?),
        };
        Ok::<_, PipelineError>((schemas, route_tables, state))
    };
    let (schemas, route_tables, state) = loop {
        match prepare().await {
            Err(PipelineError::Unavailable(why)) => {
                let wait = sink::backoff(&config.retry, attempt);
                attempt += 1;
                tracing::warn!(error = %why, retry_in_ms = wait.as_millis() as u64, "ClickHouse unavailable at start (or Kafka, for exactly-once's checks); retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Outcome { drained: true }),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            other => break other?,
        }
    };
    health.set_clickhouse_ok(true);

    let (events_tx, events_rx) = std_mpsc::channel();
    let refusal = crate::kafka::refusal::Refusal::default();
    let dead_letters = if config.uses_dead_letters() {
        // Dead letters not yet acknowledged count in their table's budget;
        // the producer's own queue is bounded as well.
        let queue = (config.max_buffered_bytes.as_u64() / 4).max(1 << 20);
        let dl = DeadLetters::new(&config.kafka, events_tx.clone(), queue, refusal.clone())
            .map_err(|e| {
                PipelineError::Config(format!(
                    "cannot create the dead-letter producer: {}",
                    crate::kafka::describe_client_error(&e)
                ))
            })?;
        Some(Arc::new(dl))
    } else {
        None
    };
    let ownership = Arc::new(Ownership::default());
    let store: Option<Arc<dyn RangeStore>> = state.map(|s| Arc::new(s) as Arc<dyn RangeStore>);
    let topic_names: Vec<String> = config.topics();
    let topic_list = Arc::new(topic_names.clone());
    let sinks_cancel = CancellationToken::new();
    let writer = Arc::new(
        ClickHouseWriter::new(&config.clickhouse, &config.kafka.group_id)
            .map_err(PipelineError::Config)?,
    );
    let mut tables = Vec::new();
    let mut policy_txs = Vec::new();
    for (ti, s) in schemas.iter().enumerate() {
        let (tx, rx) = mpsc::channel(SINK_QUEUE);
        let (policy_tx, policies) =
            watch::channel(row_policies(&config, &route_tables, &topic_names, ti));
        policy_txs.push(policy_tx);
        let (history, feed) = crate::schema::drift::History::new(s.clone());
        let sink = TableSink {
            schema: Some(sink::SchemaWatch {
                client: client.clone(),
                database: s.database.clone(),
                table: s.table.clone(),
                history: history.clone(),
                sql_version: 0,
                timeout: config.clickhouse.insert_timeout,
            }),
            writer: writer.clone(),
            table_name: s.to_string(),
            sql: s.insert_sql(),
            retry: config.retry.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            topics: topic_list.clone(),
            policies,
            dead_letters: dead_letters.clone(),
            state: store.clone(),
            group: config.kafka.group_id.clone(),
            ownership: ownership.clone(),
        };
        tokio::spawn(sink.run(rx, events_tx.clone(), sinks_cancel.clone()));
        let into_table: Vec<(usize, &str, OnError)> = config
            .routes
            .iter()
            .enumerate()
            .filter(|&(i, _)| route_tables[i] == ti)
            .flat_map(|(i, r)| r.topics.iter().map(move |t| (i, t.as_str(), r.on_error)))
            .collect();
        metrics.init_table(&s.to_string(), &into_table);
        tables.push(TableState::new(s.to_string(), tx).with_schema_feed(feed, history));
        tracing::info!(table = %s, columns = s.insert_columns().count(), "target table ready");
    }

    let registry = registry(&config)?;
    let routes = config
        .routes
        .iter()
        .zip(&route_tables)
        .enumerate()
        .map(|(i, (r, &ti))| {
            let decoder = decode::decoder_for(r, &schemas[ti], registry.as_ref())
                .map_err(|e| PipelineError::Config(format!("routes[{i}]: {e}")))?;
            Ok(RouteState::new(ti, decoder, r))
        })
        .collect::<Result<_, PipelineError>>()?;
    let topics: Vec<(String, Vec<usize>)> = topic_names
        .iter()
        .map(|t| {
            let routes = (0..config.routes.len())
                .filter(|&i| config.routes[i].topics.contains(t))
                .collect();
            (t.clone(), routes)
        })
        .collect();
    let (core_reload_tx, core_reloads) = std_mpsc::channel();
    tokio::spawn(apply_reloads(
        reloads,
        policy_txs,
        core_reload_tx,
        route_tables.clone(),
        topic_names.clone(),
    ));
    let shared = Shared {
        reloads: Some(core_reloads),
        ownership,
        dead_letters: dead_letters.clone(),
        exactly_once: store.map(|state| ExactlyOnce {
            state,
            runtime: tokio::runtime::Handle::current(),
            retry: config.retry.clone(),
            health: health.clone(),
        }),
        clickhouse: Some(ClickHouseAccess {
            client: client.clone(),
            runtime: tokio::runtime::Handle::current(),
            events: events_tx.clone(),
            timeout: config.clickhouse.insert_timeout,
        }),
        stop: shutdown.clone(),
    };
    let mut core = Core::new(
        Limits::from_config(&config),
        topics,
        routes,
        tables,
        events_rx,
        shared,
        metrics.clone(),
    );
    core.set_registry(registry);
    if config.routes.iter().any(|r| r.auto_add_columns) {
        core.set_auto_add();
    }

    let consumer: Consumer = crate::kafka::client_config(&config.kafka)
        .create_with_context(BridgeContext::new(
            core,
            metrics.clone(),
            health.clone(),
            events_tx,
            refusal,
            crate::kafka::refusal::Security::of(&config.kafka),
        ))
        .map_err(|e| {
            PipelineError::Config(format!(
                "cannot create the Kafka consumer: {}",
                crate::kafka::describe_client_error(&e)
            ))
        })?;
    let names: Vec<&str> = topic_names.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| PipelineError::Kafka(format!("cannot subscribe to {names:?}: {e}")))?;
    tracing::info!(topics = ?names, group = %config.kafka.group_id, "subscribed");

    let ping = tokio::spawn(ping_clickhouse(
        client,
        health.clone(),
        sinks_cancel.clone(),
    ));
    let loop_health = health.clone();
    let result =
        tokio::task::spawn_blocking(move || consumer_loop(consumer, shutdown, loop_health))
            .await
            .map_err(|e| PipelineError::Internal(format!("consumer thread failed: {e}")))?;
    sinks_cancel.cancel();
    let _ = ping.await;
    if let Some(dl) = dead_letters {
        // Every dead letter whose offset was committed is acknowledged
        // already; this only avoids librdkafka's warning on close.
        tokio::task::spawn_blocking(move || dl.flush(Duration::from_secs(5)))
            .await
            .ok();
    }
    result
}

/// What the routes into table `ti` do with rows ClickHouse refuses, per topic.
fn row_policies(
    config: &Config,
    route_tables: &[usize],
    topic_names: &[String],
    ti: usize,
) -> RowPolicies {
    let feeding = |topic: &String| {
        config
            .routes
            .iter()
            .zip(route_tables)
            .find(|(r, &t)| t == ti && r.topics.contains(topic))
            .map(|(r, _)| r)
    };
    RowPolicies {
        by_topic: topic_names
            .iter()
            .map(|t| match feeding(t) {
                Some(r) if r.on_error == OnError::Skip => RowPolicy::Skip,
                Some(r) if r.on_error == OnError::DeadLetter => {
                    RowPolicy::DeadLetter(r.dead_letter_topic.clone().unwrap_or_default())
                }
                _ => RowPolicy::Stop,
            })
            .collect(),
        max_rejected_ratio: topic_names
            .iter()
            .filter_map(feeding)
            .filter(|r| r.on_error != OnError::Stop)
            .map(|r| r.max_failed_ratio)
            .fold(1.0, f64::min),
    }
}

/// Applies reloaded configurations (already checked by
/// `Config::reload_changes`) to the sinks and, through `core`, to the
/// consumer thread.
async fn apply_reloads(
    mut reloads: mpsc::UnboundedReceiver<Config>,
    policy_txs: Vec<watch::Sender<RowPolicies>>,
    core: std_mpsc::Sender<Reload>,
    route_tables: Vec<usize>,
    topic_names: Vec<String>,
) {
    while let Some(config) = reloads.recv().await {
        for (ti, tx) in policy_txs.iter().enumerate() {
            let _ = tx.send(row_policies(&config, &route_tables, &topic_names, ti));
        }
        if core.send(Reload::of(&config)).is_err() {
            return;
        }
    }
}

/// Exactly-once needs the state table, and target tables that deduplicate.
async fn prepare_exactly_once(
    config: &Config,
    client: &clickhouse::Client,
    schemas: &[TableSchema],
) -> Result<StateStore, PipelineError> {
    let store = StateStore::new(client.clone(), config.state_table(), &config.kafka.group_id)
        .with_timeout(config.clickhouse.insert_timeout);
    // What each table's deduplication must keep up with depends on how many
    // partitions feed it.
    let kafka = config.kafka.clone();
    let topics = config.topics();
    let counts =
        tokio::task::spawn_blocking(move || crate::kafka::partition_counts(&kafka, &topics))
            .await
            .map_err(|e| PipelineError::Internal(format!("metadata lookup failed: {e}")))?
            .map_err(PipelineError::Unavailable)?;
    let tables: Vec<(String, String, exactly_once::DedupNeeds)> = schemas
        .iter()
        .map(|s| {
            let partitions = exactly_once::partitions_into(config, &s.database, &s.table, &counts);
            (
                s.database.clone(),
                s.table.clone(),
                exactly_once::DedupNeeds::of(config, partitions),
            )
        })
        .collect();
    let problems = exactly_once::table_problems(client, &tables)
        .await
        .map_err(|e| {
            let message = format!(
                "cannot read the target tables' engines: {}",
                sink::errors::classify(&e).message
            );
            if sink::errors::classify(&e).class != sink::ErrorClass::Transient {
                return PipelineError::Config(message);
            }
            PipelineError::Unavailable(message)
        })?;
    if !problems.is_empty() {
        return Err(PipelineError::Config(format!(
            "delivery = \"exactly-once\" cannot be kept:\n{}",
            problems.join("\n")
        )));
    }
    store.ensure().await.map_err(|e| {
        if sink::errors::classify(&e).class == sink::ErrorClass::Transient {
            return PipelineError::Unavailable(format!(
                "cannot create the exactly-once state table: {e}"
            ));
        }
        PipelineError::Config(format!(
            "cannot create the exactly-once state table {}: {e}. Create it yourself (see \
             `chbridge check`) or grant CREATE TABLE on its database",
            store.name()
        ))
    })?;
    tracing::info!(state_table = %store.name(), "exactly-once: batch ranges are recorded before each insert");
    Ok(store)
}

/// Keeps `/readyz` honest while no insert is running.
async fn ping_clickhouse(
    client: clickhouse::Client,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let ok = tokio::time::timeout(
            Duration::from_secs(5),
            client.query("SELECT 1").fetch_one::<u8>(),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        health.set_clickhouse_ok(ok);
    }
}

/// The consumer thread: poll, place records, service batches and commits;
/// on stop, drain and commit, then leave the group.
fn consumer_loop(
    consumer: Consumer,
    stop: CancellationToken,
    health: Arc<Health>,
) -> Result<Outcome, PipelineError> {
    let ctx = consumer.context().clone();
    // Housekeeping (acknowledgements, old batches, commits, back-pressure) runs
    // when the consumer is idle or at most every SERVICE_INTERVAL, not per record.
    let mut last_service: Option<Instant> = None;
    let mut timeout = Duration::ZERO;
    // Reading the clock costs more than handling a small record on some
    // machines (a VM's clock source): look at it every few records only.
    let mut since_check = 0u32;
    loop {
        since_check += 1;
        let due = last_service.is_none()
            || (since_check >= CLOCK_EVERY
                && last_service.is_some_and(|t| t.elapsed() >= SERVICE_INTERVAL));
        if since_check >= CLOCK_EVERY {
            since_check = 0;
        }
        if due {
            health.turn();
            if let Some(refused) = ctx.refused() {
                // Nothing can be read or committed; what is in flight is
                // read again after the fix (at-least-once and exactly-once alike).
                let e = PipelineError::Config(refused.to_string());
                ctx.core().abandon();
                return Err(e);
            }
            let mut core = ctx.core();
            if core.fatal().is_some() {
                break;
            }
            timeout = core.service(&consumer);
            last_service = Some(Instant::now());
        }
        if stop.is_cancelled() {
            tracing::info!("stopping: flushing batches and committing");
            break;
        }
        match consumer.poll(timeout) {
            None => last_service = None,
            Some(Ok(msg)) => {
                let rec = Record::of(&msg);
                match ctx.core().on_record(&rec) {
                    Flow::Go => {}
                    // A table reached its share of the budget: pause now.
                    Flow::Service => last_service = None,
                    Flow::Stop => break,
                }
                // Until the next service, poll without blocking: an empty poll
                // means idle, and idle runs the service at once.
                timeout = Duration::ZERO;
            }
            Some(Err(KafkaError::MessageConsumptionFatal(code)))
            | Some(Err(KafkaError::Global(code)))
                if code == RDKafkaErrorCode::Fatal =>
            {
                // The consumer is unusable (a fenced static member, for
                // one): its partitions are another member's. Inserting or
                // committing what it holds would race their new owner.
                let e = PipelineError::Kafka(format!(
                    "fatal consumer error: {code}; nothing more was inserted or committed"
                ));
                tracing::error!(error = %e, "stopping");
                ctx.core().abandon();
                return Err(e);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Kafka consumer error (librdkafka retries by itself)")
            }
        }
    }
    let (drained, fatal) = {
        let mut core = ctx.core();
        let drained = core.shutdown(&consumer);
        (drained, core.take_fatal())
    };
    // Dropping the consumer closes it: it leaves the group so the partitions
    // move to another member at once instead of after the session timeout
    // (with static membership librdkafka does not leave: the same instance id
    // is expected back, and gets its partitions without a rebalance).
    drop(consumer);
    match fatal {
        Some(e) => Err(e),
        None => Ok(Outcome { drained }),
    }
}
