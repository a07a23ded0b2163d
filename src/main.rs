//! The `chbridge` command line.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use chbridge::config::Config;
use chbridge::observability::{self, Health, Metrics};
use chbridge::pipeline::{self, PipelineError};

/// Kafka-to-ClickHouse bridge: consumes topics, inserts rows in batches, and
/// commits offsets only after ClickHouse acknowledged every row below them.
#[derive(Parser)]
#[command(
    name = "chbridge",
    version,
    after_help = "Examples:\n  \
    chbridge check --config config/example.toml   # validate config, servers and tables\n  \
    chbridge run --config config/example.toml     # run the bridge\n  \
    CHBRIDGE_CLICKHOUSE_PASSWORD=... chbridge run --config /etc/chbridge/chbridge.toml\n\n\
    Exit codes: 0 stopped cleanly; 1 configuration or check failed; \
    2 stopped on an error (bad record with on_error = \"stop\", refused insert); \
    3 stopped on request but the drain timed out (uncommitted records will be read again)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge until SIGTERM/SIGINT or a fatal error.
    Run {
        /// Path of the TOML configuration file.
        #[arg(short, long, env = "CHBRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Validate the configuration, connect to Kafka and ClickHouse, and show
    /// how every column of every target table will be filled.
    Check {
        #[arg(short, long, env = "CHBRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Per topic and partition: the group's committed offset, the end offset,
    /// the lag, the oldest record waiting, the owner, and the last insert per
    /// table. Works whether bridges run or not. Exit code 2 when a partition
    /// is stalled (its oldest record waits longer than `stall_timeout` and its
    /// commit does not move), 3 when a partition could not be read.
    Status {
        #[arg(short, long, env = "CHBRIDGE_CONFIG")]
        config: PathBuf,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Give up reading after this long (partitions not read show as unknown).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Exit 0 if a running bridge's health endpoint answers 200 (for a
    /// container HEALTHCHECK: the runtime image has no curl).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9187/healthz")]
        url: String,
    },
    /// Dead letters: `chbridge dlq replay` inserts a route's dead letters into
    /// its table after a fix.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The exactly-once state: `chbridge state clear` forgets the recorded
    /// batch ranges of the group (needed after a deliberate offset reset).
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Read the route's dead-letter topic (optionally a range of it), decode
    /// each dead letter the route wrote, insert the rows into its table and
    /// list what still fails. Safe to repeat on a table with a deduplication window.
    Replay {
        #[arg(short, long, env = "CHBRIDGE_CONFIG")]
        config: PathBuf,
        /// Index of the route in the configuration (routes[N]).
        #[arg(long, default_value_t = 0)]
        route: usize,
        /// Only this partition of the dead-letter topic.
        #[arg(long)]
        partition: Option<i32>,
        /// First dead-letter offset to replay.
        #[arg(long)]
        from: Option<i64>,
        /// Stop before this dead-letter offset.
        #[arg(long)]
        to: Option<i64>,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Forget the group's recorded ranges (of one topic, or all). Stop every
    /// bridge of the group first; records below the old ranges will then be
    /// inserted again from wherever the group's offsets stand.
    Clear {
        #[arg(short, long, env = "CHBRIDGE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        topic: Option<String>,
    },
}

fn main() -> ExitCode {
    keep_large_buffers_out_of_the_heap();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chbridge: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Check { config } => runtime.block_on(check(&config)),
        Command::Run { config } => runtime.block_on(run(&config)),
        Command::Status {
            config,
            json,
            timeout,
        } => runtime.block_on(status(&config, json, timeout)),
        Command::Healthcheck { url } => healthcheck(&url),
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    config,
                    route,
                    partition,
                    from,
                    to,
                },
        } => runtime.block_on(dlq_replay(
            &config,
            chbridge::replay::Range {
                route,
                partition,
                from,
                to,
            },
        )),
        Command::State {
            command: StateCommand::Clear { config, topic },
        } => runtime.block_on(state_clear(&config, topic.as_deref())),
    }
}

async fn dlq_replay(path: &std::path::Path, range: chbridge::replay::Range) -> ExitCode {
    let config = match load(path, "dlq replay") {
        Ok(c) => c,
        Err(code) => return code,
    };
    match chbridge::replay::replay(&config, &range).await {
        Err(e) => {
            eprintln!("chbridge dlq replay: {e}");
            ExitCode::from(1)
        }
        Ok(r) => {
            println!(
                "dlq replay: read {} dead letters, inserted {} rows, {} belong to other routes, {} still fail",
                r.read,
                r.inserted,
                r.other,
                r.failing.len()
            );
            for (p, o, origin, e) in &r.failing {
                println!("  dead letter [{p}] at offset {o} (from {origin}): {e}");
            }
            ExitCode::from(if r.failing.is_empty() { 0 } else { 2 })
        }
    }
}

async fn state_clear(path: &std::path::Path, topic: Option<&str>) -> ExitCode {
    let config = match load(path, "state clear") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let client = match chbridge::sink::client(&config.clickhouse) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chbridge state clear: {e}");
            return ExitCode::from(1);
        }
    };
    let store = chbridge::exactly_once::StateStore::new(
        client,
        config.state_table(),
        &config.kafka.group_id,
    );
    match store.clear(topic).await {
        Ok(n) => {
            println!(
                "state clear: removed {n} recorded ranges of group {} from {}",
                config.kafka.group_id,
                store.name()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chbridge state clear: {}: {e}", store.name());
            ExitCode::from(1)
        }
    }
}

async fn status(path: &std::path::Path, json: bool, timeout: std::time::Duration) -> ExitCode {
    let config = match load(path, "status") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = match chbridge::status::status(&config, timeout).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chbridge status: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        match serde_json::to_string_pretty(&s) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("chbridge status: cannot encode JSON: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        print!("{}", chbridge::status::render(&s, now));
    }
    // 2: something is stuck; 3: something could not be told.
    if s.stalled() > 0 {
        ExitCode::from(2)
    } else if s.count(chbridge::status::State::Unknown) > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn healthcheck(url: &str) -> ExitCode {
    match chbridge::observability::http::probe(url, std::time::Duration::from_secs(3)) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(code) => {
            eprintln!("chbridge healthcheck: {url} answered {code}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("chbridge healthcheck: {url}: {e}");
            ExitCode::from(1)
        }
    }
}

/// Batch bodies and librdkafka's fetch buffers are megabytes each. glibc
/// raises its mmap threshold after such blocks are freed, and then serves
/// them from the heap, which keeps their pages after `free`: with wide rows
/// that cost about 60 MiB of resident memory (179 vs 121 MiB peak, measured
/// with 400,000 records of 1.5 KB). A fixed threshold keeps every block above
/// 1 MiB in its own mapping, returned to the system when freed.
fn keep_large_buffers_out_of_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator parameter; called first in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Loads and validates the configuration, or says why not (exit code 1).
fn load(path: &std::path::Path, command: &str) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("chbridge {command}: {e}");
        ExitCode::from(1)
    })
}

async fn check(path: &std::path::Path) -> ExitCode {
    let config = match load(path, "check") {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("config: {} is valid", path.display());
    let report = chbridge::check::check(&config).await;
    print!("{}", report.text);
    if report.problems.is_empty() {
        println!("check: OK");
        ExitCode::SUCCESS
    } else {
        println!("check: {} problem(s):", report.problems.len());
        for p in &report.problems {
            println!("  - {p}");
        }
        ExitCode::from(1)
    }
}

async fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path, "run") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let levels = observability::logging::init(config.log.format, &config.log.level);
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(reload_on_sighup(
        path.to_path_buf(),
        config.clone(),
        levels,
        reload_tx,
    ));
    match run_bridge(config, reload_rx).await {
        Ok(pipeline::Outcome { drained: true }) => {
            tracing::info!("stopped cleanly: every batch inserted and committed");
            ExitCode::SUCCESS
        }
        Ok(pipeline::Outcome { drained: false }) => {
            tracing::error!("stopped, but some batches were not acknowledged before shutdown_timeout; their records were not committed and will be read again");
            ExitCode::from(3)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            let config_problem = matches!(
                e.downcast_ref::<PipelineError>(),
                Some(PipelineError::Config(_)) | None
            );
            ExitCode::from(if config_problem { 1 } else { 2 })
        }
    }
}

async fn run_bridge(
    config: Config,
    reloads: tokio::sync::mpsc::UnboundedReceiver<Config>,
) -> anyhow::Result<pipeline::Outcome> {
    let metrics = Arc::new(Metrics::new());
    // Revocation may block the loop for up to shutdown_timeout: only a longer
    // silence is a stall.
    let health = Arc::new(Health::new(
        config.shutdown_timeout * 2 + std::time::Duration::from_secs(30),
    ));
    let shutdown = CancellationToken::new();
    let http_cancel = CancellationToken::new();
    observability::http::serve(
        config.http.listen,
        metrics.clone(),
        health.clone(),
        http_cancel.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
    tokio::spawn(wait_for_signal(shutdown.clone()));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "chbridge starting");
    let result = pipeline::run(config, metrics, health, shutdown, reloads).await;
    http_cancel.cancel();
    Ok(result?)
}

/// On SIGHUP: re-reads the configuration file and applies what may change
/// while running (batching, log level, routes' error policy). Anything else
/// refuses the whole reload with a log line naming the keys; the running
/// configuration stays as it was.
async fn reload_on_sighup(
    path: PathBuf,
    mut current: Config,
    levels: observability::logging::LevelHandle,
    apply: tokio::sync::mpsc::UnboundedSender<Config>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler: configuration reload is off");
        return;
    };
    let dead_letter_producer = current.uses_dead_letters();
    while hup.recv().await.is_some() {
        let mut new = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(config = %path.display(), "reload refused, the running configuration stays: {e}");
                continue;
            }
        };
        let mut changed = match current.reload_changes(&new, dead_letter_producer) {
            Ok(changed) => changed,
            Err(keys) => {
                tracing::error!(
                    config = %path.display(),
                    "reload refused, nothing was changed: {} changed, which needs a restart \
                     (roll the pods, or stop and start chbridge)",
                    keys.join(", ")
                );
                continue;
            }
        };
        if changed.is_empty() {
            tracing::info!(config = %path.display(), "reload: nothing changed");
            continue;
        }
        if new.log.level != current.log.level {
            if let Err(e) = levels.set(&new.log.level) {
                // Kept as it was, so that the next SIGHUP tries again.
                tracing::warn!("log.level not reloaded: {e}");
                new.log.level = current.log.level.clone();
                changed.retain(|k| k != "log.level");
            }
        }
        if changed.is_empty() {
            continue;
        }
        if apply.send(new.clone()).is_err() {
            return;
        }
        tracing::info!(changed = %changed.join(", "), "configuration reloaded");
        current = new;
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL only");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
