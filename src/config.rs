//! The configuration file (TOML), its defaults, environment overrides and validation.
//!
//! The `///` comments on the fields are the user documentation: docs/configuration.md
//! repeats them. Every default is a named function so that the docs and the code agree.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::decode::mapping::ColumnSource;
use crate::decode::registry::RegistryConfig;
use crate::decode::{DecodeLimits, Format, UnknownFields};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub clickhouse: ClickHouseConfig,
    /// One or more routes: which topics feed which table.
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub commit: CommitConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Upper bound on encoded rows held in memory (open batches plus batches
    /// being inserted). Above it consumption pauses until inserts catch up.
    /// Default: "64MiB".
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: ByteSize,
    /// How long shutdown (SIGTERM/SIGINT) and partition revocation may take to
    /// flush batches and commit before giving up. Default: "30s".
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A partition with lag whose commit position has not moved for this long
    /// is reported stalled (`chbridge_partition_stalled`, a warning naming
    /// what holds it). Default: "5m".
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// "at-least-once" (default) or "exactly-once" (see docs/guarantees.md).
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub exactly_once: ExactlyOnceConfig,
    /// A Confluent-compatible schema registry, for Avro and Protobuf in the
    /// Confluent wire format.
    #[serde(default)]
    pub schema_registry: Option<RegistryConfig>,
}

/// What chbridge promises about each record reaching its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Every record lands; a crash may repeat the rows of uncommitted batches.
    #[default]
    AtLeastOnce,
    /// Every record lands once: batches are cut per partition at boundaries
    /// recorded in ClickHouse before each insert, and inserts carry a
    /// deduplication token derived from those boundaries.
    ExactlyOnce,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactlyOnceConfig {
    /// The table where chbridge records each batch's offset range before
    /// inserting it (`table` or `database.table`; created if missing).
    /// Default: "chbridge_batches" in `clickhouse.database`.
    #[serde(default = "default_state_table")]
    pub state_table: String,
}

impl Default for ExactlyOnceConfig {
    fn default() -> Self {
        ExactlyOnceConfig {
            state_table: default_state_table(),
        }
    }
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_state_table() -> String {
    "chbridge_batches".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`. Required, here or in
    /// `CHBRIDGE_KAFKA_BROKERS`.
    #[serde(default)]
    pub brokers: String,
    /// Consumer group id. Required, here or in `CHBRIDGE_KAFKA_GROUP_ID`.
    #[serde(default)]
    pub group_id: String,
    /// Static membership id (`group.instance.id`), e.g. the pod name, so that a
    /// restarted replica gets its partitions back without a rebalance. Default:
    /// none. Env: `CHBRIDGE_KAFKA_INSTANCE_ID`.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Where a group with no committed offset starts: "earliest" (default) or "latest".
    #[serde(default = "default_offset_reset")]
    pub auto_offset_reset: OffsetReset,
    /// The consumer group protocol: "classic" (default; the client assigns,
    /// cooperative-sticky) or "consumer" (KIP-848: the broker assigns and
    /// owns the session timeout; Apache Kafka 4.0+).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
    /// librdkafka properties passed through as they are (e.g.
    /// `"security.protocol" = "SASL_SSL", "sasl.mechanism" = "SCRAM-SHA-512"`). Properties that the delivery
    /// guarantee depends on are refused. `sasl.password` can come from
    /// `CHBRIDGE_KAFKA_SASL_PASSWORD`.
    #[serde(default)]
    pub properties: Properties,
}

/// librdkafka properties; `Debug` hides the values of secret-looking keys.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, String>);

impl Properties {
    /// True for keys whose values must never be shown (passwords, keys, tokens).
    pub fn is_secret(key: &str) -> bool {
        ["password", "secret", "key", "token", "jaas"]
            .iter()
            .any(|w| key.contains(w))
    }
}

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                (
                    k,
                    if Properties::is_secret(k) {
                        "***"
                    } else {
                        v.as_str()
                    },
                )
            }))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    #[default]
    Classic,
    Consumer,
}

/// Properties of the classic protocol that the broker owns under KIP-848
/// (librdkafka refuses them with `group.protocol = consumer`).
pub const CLASSIC_ONLY_PROPERTIES: &[(&str, &str)] = &[
    (
        "session.timeout.ms",
        "the broker's group.consumer.session.timeout.ms",
    ),
    (
        "heartbeat.interval.ms",
        "the broker's group.consumer.heartbeat.interval.ms",
    ),
    (
        "partition.assignment.strategy",
        "the broker's assignor (group.remote.assignor to pick one)",
    ),
    ("group.protocol.type", "the protocol itself"),
];

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint. Env: `CHBRIDGE_CLICKHOUSE_URL`. Default: "http://127.0.0.1:8123".
    #[serde(default = "default_ch_url")]
    pub url: String,
    /// Database of routes whose `table` has no `db.` prefix. Default: "default".
    #[serde(default = "default_database")]
    pub database: String,
    /// Default: "default". Env: `CHBRIDGE_CLICKHOUSE_USER`.
    #[serde(default = "default_user")]
    pub user: String,
    /// Default: empty. Env: `CHBRIDGE_CLICKHOUSE_PASSWORD` (prefer it to the file).
    #[serde(default)]
    pub password: Secret,
    /// LZ4-compress insert bodies. Default: true.
    #[serde(default = "default_true")]
    pub compression: bool,
    /// Time an insert may take, from the first byte sent to ClickHouse's reply,
    /// before it is abandoned and retried. Default: "60s".
    #[serde(default = "default_insert_timeout", with = "humantime_serde")]
    pub insert_timeout: Duration,
    /// With an `https://` url: a PEM file of CA certificates trusted besides
    /// the system's (a private CA, a self-signed server). Default: none.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// With an `https://` url: a PEM client certificate, for servers that
    /// require one (`<verificationMode>strict</verificationMode>`). Needs
    /// `client_key`. Default: none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// The unencrypted PKCS#8 PEM key of `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &redact_url(&self.url))
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("compression", &self.compression)
            .field("insert_timeout", &self.insert_timeout)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

/// `url` with any `user:password@` replaced by `***@`, for messages.
pub fn redact_url(url: &str) -> String {
    match split_userinfo(url) {
        Some((scheme, _, rest)) => format!("{scheme}://***@{rest}"),
        None => url.to_string(),
    }
}

/// (scheme, userinfo, the rest) of a URL with a `user[:password]@`.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// Decodes `%XX` escapes (a password in a URL is percent-encoded).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ClickHouseConfig {
    /// Moves `user:password@` out of `url` into `user` and `password`, so
    /// that the password is sent as a credential and never shown with the
    /// URL (logs, `check`, errors). Set it once: in the URL, or in
    /// `password` / `CHBRIDGE_CLICKHOUSE_PASSWORD`.
    pub fn lift_url_credentials(&mut self) -> Result<(), ConfigError> {
        let Some((scheme, userinfo, rest)) = split_userinfo(&self.url) else {
            return Ok(());
        };
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
            None => (percent_decode(userinfo), None),
        };
        if password.is_some() && !self.password.is_empty() {
            return Err(invalid(
                "clickhouse.url",
                "has a password and clickhouse.password (or CHBRIDGE_CLICKHOUSE_PASSWORD) is set \
                 too: keep one (preferably the environment variable)",
            ));
        }
        let url = format!("{scheme}://{rest}");
        if !user.is_empty() {
            self.user = user;
        }
        if let Some(p) = password {
            self.password = Secret(p);
        }
        self.url = url;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Topics whose records go to `table`.
    pub topics: Vec<String>,
    /// Target table, `name` or `database.name`.
    pub table: String,
    /// Input format of the records. Default: "json".
    #[serde(default)]
    pub format: Format,
    /// Fields that match no column: "ignore" (default) or "error".
    #[serde(default)]
    pub unknown_fields: UnknownFields,
    /// Where columns come from when not from the top-level field of their own
    /// name: `col = "a.b"` (a nested field), `{ field = ["a.b", "c"] }`,
    /// `{ const = 1 }`, `{ meta = "topic" | "partition" | "offset" |
    /// "timestamp" | "key" | "value" }`, `{ header = "name" }`. See docs/mapping.md.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSource>,
    /// Fill a column `a_b` from field `b` of object `a` (separator "_"; "."
    /// suits Nested columns `n.x`). Off by default.
    #[serde(default)]
    pub flatten: Option<String>,
    /// format = "avro": the reader schema (.avsc), required without
    /// [schema_registry]. format = "protobuf": a FileDescriptorSet file
    /// (protoc --include_imports --descriptor_set_out), with `message`.
    #[serde(default)]
    pub schema_file: Option<std::path::PathBuf>,
    /// With [schema_registry] configured, false makes this route read plain
    /// values (no Confluent framing) with `schema_file` only. Default: true.
    #[serde(default = "default_true")]
    pub registry: bool,
    /// format = "protobuf" with `schema_file`: the full name of the message.
    #[serde(default)]
    pub message: Option<String>,
    /// format = "csv" or "tsv": the names of the fields of a line, in order.
    /// Default: the table's insertable columns in table order.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// format = "json": add a column to the table for a top-level field no
    /// column takes, before the record is decoded, with a type inferred from
    /// the field's value (see docs/mapping.md for the rules and the risks).
    /// Off by default.
    #[serde(default)]
    pub auto_add_columns: bool,
    /// Limits that make a hostile record a counted, explained failure.
    #[serde(default)]
    pub limits: DecodeLimits,
    /// A record that cannot be decoded or converted, or a row ClickHouse
    /// rejects: "dead-letter" (send it to `dead_letter_topic` with headers
    /// saying why, go on), "skip" (log it, count it in
    /// `chbridge_records_failed_total`, go on) or "stop" (default: stop the
    /// bridge without committing past it).
    #[serde(default)]
    pub on_error: OnError,
    /// Topic that receives this route's failed records when `on_error =
    /// "dead-letter"`. It must exist (or the broker must create topics).
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// With "skip" or "dead-letter": stop the route instead (pause its topics
    /// until a restart; other topics go on) when more than this share of its
    /// records failed within `failed_window` (a wrong format or table would
    /// otherwise divert a whole topic).
    /// 1.0 disables the limit. Default: 0.5.
    #[serde(default = "default_max_failed_ratio")]
    pub max_failed_ratio: f64,
    /// The sliding window for `max_failed_ratio` (evaluated once the window
    /// holds at least 100 records). Default: "1m".
    #[serde(default = "default_failed_window", with = "humantime_serde")]
    pub failed_window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    Skip,
    DeadLetter,
    #[default]
    Stop,
}

fn default_max_failed_ratio() -> f64 {
    0.5
}
fn default_failed_window() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Flush a table's batch at this many rows. Default: 100000.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Flush a table's batch at this many encoded bytes. Default: "16MiB".
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Flush a table's batch this long after its first row. Default: "1s".
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitConfig {
    /// How often acknowledged offsets are committed (asynchronously). Commits on
    /// revocation and shutdown are synchronous whatever this says. Default: "1s".
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First backoff after a transient insert failure. Default: "200ms".
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Backoff cap; the backoff doubles up to it, with jitter. Default: "30s".
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Give up (and stop the bridge) after this many attempts of one batch;
    /// 0 retries forever. Default: 0.
    #[serde(default)]
    pub max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`. Default: "0.0.0.0:9187".
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "text" (default) or "json".
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as "info" or "chbridge=debug,librdkafka=warn".
    /// `RUST_LOG` overrides it. Default: "info".
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A string that never appears in logs, errors or `Debug` output.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

fn default_max_buffered_bytes() -> ByteSize {
    ByteSize::mib(64)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_offset_reset() -> OffsetReset {
    OffsetReset::Earliest
}
fn default_ch_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_database() -> String {
    "default".into()
}
fn default_user() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}
fn default_insert_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_rows() -> usize {
    100_000
}
fn default_max_bytes() -> ByteSize {
    ByteSize::mib(16)
}
fn default_max_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9187))
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: default_max_rows(),
            max_bytes: default_max_bytes(),
            max_wait: default_max_wait(),
        }
    }
}
impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            interval: default_commit_interval(),
        }
    }
}
impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            max_attempts: 0,
        }
    }
}
impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

/// librdkafka properties that chbridge sets itself because the delivery
/// guarantee depends on them.
pub const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "chbridge commits offsets itself, only after ClickHouse acknowledged the rows",
    ),
    (
        "enable.auto.offset.store",
        "chbridge stores offsets itself, only after ClickHouse acknowledged the rows",
    ),
    ("group.id", "set `kafka.group_id` instead"),
    ("bootstrap.servers", "set `kafka.brokers` instead"),
    ("group.instance.id", "set `kafka.instance_id` instead"),
    ("auto.offset.reset", "set `kafka.auto_offset_reset` instead"),
    ("group.protocol", "set `kafka.group_protocol` instead"),
    ("enable.partition.eof", "chbridge relies on it being off"),
];

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads, applies environment overrides, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })?;
        config.apply_env(|k| std::env::var(k).ok());
        config.clickhouse.lift_url_credentials()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML; the message names the line and the key, as the toml crate reports them.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Overrides secrets and per-pod values from the environment.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("CHBRIDGE_KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = get("CHBRIDGE_KAFKA_GROUP_ID") {
            self.kafka.group_id = v;
        }
        if let Some(v) = get("CHBRIDGE_KAFKA_INSTANCE_ID") {
            self.kafka.instance_id = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("CHBRIDGE_KAFKA_SASL_PASSWORD") {
            self.kafka.properties.0.insert("sasl.password".into(), v);
        }
        if let Some(v) = get("CHBRIDGE_CLICKHOUSE_URL") {
            self.clickhouse.url = v;
        }
        if let Some(v) = get("CHBRIDGE_CLICKHOUSE_USER") {
            self.clickhouse.user = v;
        }
        if let Some(v) = get("CHBRIDGE_CLICKHOUSE_PASSWORD") {
            self.clickhouse.password = Secret(v);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("is not a filter such as \"info\" or \"info,chbridge=debug\": {e}"),
            ));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        for key in self.kafka.properties.keys() {
            if let Some((_, why)) = MANAGED_KAFKA_PROPERTIES.iter().find(|(k, _)| k == key) {
                return Err(invalid(
                    format!("kafka.properties.\"{key}\""),
                    format!("is managed by chbridge: {why}; remove it"),
                ));
            }
            if self.kafka.group_protocol == GroupProtocol::Consumer {
                if let Some((_, owner)) = CLASSIC_ONLY_PROPERTIES.iter().find(|(k, _)| k == key) {
                    return Err(invalid(
                        format!("kafka.properties.\"{key}\""),
                        format!(
                            "belongs to the classic group protocol; with group_protocol = \
                             \"consumer\" it is {owner}: remove it"
                        ),
                    ));
                }
            }
        }
        if !(self.clickhouse.url.starts_with("http://")
            || self.clickhouse.url.starts_with("https://"))
        {
            return Err(invalid(
                "clickhouse.url",
                format!(
                    "{:?} must start with http:// or https://",
                    self.clickhouse.url
                ),
            ));
        }
        let tls_files = [
            ("clickhouse.ca_file", &self.clickhouse.ca_file),
            ("clickhouse.client_cert", &self.clickhouse.client_cert),
            ("clickhouse.client_key", &self.clickhouse.client_key),
        ];
        if self.clickhouse.url.starts_with("https://") {
            crate::sink::tls::connector(&self.clickhouse).map_err(|e| invalid("clickhouse", e))?;
        } else if let Some((key, _)) = tls_files.iter().find(|(_, v)| v.is_some()) {
            return Err(invalid(
                *key,
                "is set but `clickhouse.url` is not https://: TLS settings apply to https only",
            ));
        }
        if self.routes.is_empty() {
            return Err(invalid(
                "routes",
                "at least one [[routes]] entry is required",
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.topics.is_empty() || r.topics.iter().any(|t| t.trim().is_empty()) {
                return Err(invalid(
                    format!("routes[{i}].topics"),
                    "must list at least one non-empty topic",
                ));
            }
            if r.table.trim().is_empty() || r.table.split('.').count() > 2 {
                return Err(invalid(
                    format!("routes[{i}].table"),
                    format!("{:?} must be `table` or `database.table`", r.table),
                ));
            }
            match (&r.on_error, r.dead_letter_topic.as_deref().map(str::trim)) {
                (OnError::DeadLetter, None | Some("")) => {
                    return Err(invalid(
                        format!("routes[{i}].dead_letter_topic"),
                        "is required with on_error = \"dead-letter\"",
                    ))
                }
                (OnError::DeadLetter, Some(t)) if r.topics.iter().any(|rt| rt == t) => {
                    return Err(invalid(
                        format!("routes[{i}].dead_letter_topic"),
                        format!("{t:?} is also one of the route's own topics: failed records would come back"),
                    ))
                }
                (OnError::Skip | OnError::Stop, Some(_)) => {
                    return Err(invalid(
                        format!("routes[{i}].dead_letter_topic"),
                        "is only used with on_error = \"dead-letter\"; set that or remove the key",
                    ))
                }
                _ => {}
            }
            if r.auto_add_columns {
                let why = if r.format != Format::Json {
                    Some("works with format = \"json\" only")
                } else if !r.columns.is_empty() || r.flatten.is_some() {
                    Some("works without [routes.columns] and flatten only")
                } else if self.delivery == Delivery::ExactlyOnce {
                    Some("is not available with delivery = \"exactly-once\" (a replayed range must be decoded for the columns it was recorded with)")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(invalid(format!("routes[{i}].auto_add_columns"), why));
                }
            }
            if !(r.max_failed_ratio > 0.0 && r.max_failed_ratio <= 1.0) {
                return Err(invalid(
                    format!("routes[{i}].max_failed_ratio"),
                    "must be more than 0 and at most 1 (1 disables the limit)",
                ));
            }
            if r.failed_window.is_zero() {
                return Err(invalid(
                    format!("routes[{i}].failed_window"),
                    "must be more than 0",
                ));
            }
        }
        if self.batch.max_rows == 0 {
            return Err(invalid("batch.max_rows", "must be at least 1"));
        }
        if self.batch.max_bytes.as_u64() == 0 {
            return Err(invalid("batch.max_bytes", "must be more than 0"));
        }
        if self.batch.max_wait.is_zero() {
            return Err(invalid("batch.max_wait", "must be more than 0"));
        }
        if self.max_buffered_bytes.as_u64() < self.batch.max_bytes.as_u64() {
            return Err(invalid(
                "max_buffered_bytes",
                format!(
                    "{} is less than batch.max_bytes ({}): no batch could ever fill",
                    self.max_buffered_bytes, self.batch.max_bytes
                ),
            ));
        }
        if self.stall_timeout.is_zero() {
            return Err(invalid("stall_timeout", "must be more than 0"));
        }
        let state = &self.exactly_once.state_table;
        if state.trim().is_empty() || state.split('.').count() > 2 {
            return Err(invalid(
                "exactly_once.state_table",
                format!("{state:?} must be `table` or `database.table`"),
            ));
        }
        if self.commit.interval.is_zero() {
            return Err(invalid("commit.interval", "must be more than 0"));
        }
        if self.retry.initial_backoff.is_zero()
            || self.retry.max_backoff < self.retry.initial_backoff
        {
            return Err(invalid(
                "retry.max_backoff",
                "must be at least retry.initial_backoff, which must be more than 0",
            ));
        }
        Ok(())
    }

    /// What a reload (SIGHUP) from `self` to `new` changes: the keys it
    /// may change while running (batching, the log level, the routes' error
    /// policy), or, if anything else changed, every other key that did. The
    /// rest shapes what was built at start (clients, group membership,
    /// decoders, table schemas, the delivery mode) and needs a restart.
    /// `dead_letter_producer`: whether the running bridge created one at start.
    pub fn reload_changes(
        &self,
        new: &Config,
        dead_letter_producer: bool,
    ) -> Result<Vec<String>, Vec<String>> {
        /// The keys whose values differ, in the order given.
        fn differing<const N: usize>(keys: [(&str, bool); N]) -> Vec<String> {
            keys.into_iter()
                .filter(|&(_, differs)| differs)
                .map(|(key, _)| key.to_string())
                .collect()
        }
        let mut changed = differing([
            ("batch.max_rows", self.batch.max_rows != new.batch.max_rows),
            (
                "batch.max_bytes",
                self.batch.max_bytes != new.batch.max_bytes,
            ),
            ("batch.max_wait", self.batch.max_wait != new.batch.max_wait),
            ("log.level", self.log.level != new.log.level),
        ]);
        // The new configuration with the reloadable keys put back: whatever
        // still differs needs a restart.
        let mut rest = new.clone();
        rest.batch = self.batch.clone();
        rest.log.level = self.log.level.clone();
        if rest.routes.len() == self.routes.len() {
            for (i, (r, old)) in rest.routes.iter_mut().zip(&self.routes).enumerate() {
                let keys = differing([
                    ("on_error", r.on_error != old.on_error),
                    (
                        "dead_letter_topic",
                        r.dead_letter_topic != old.dead_letter_topic,
                    ),
                    (
                        "max_failed_ratio",
                        r.max_failed_ratio != old.max_failed_ratio,
                    ),
                    ("failed_window", r.failed_window != old.failed_window),
                ]);
                changed.extend(keys.into_iter().map(|k| format!("routes[{i}].{k}")));
                r.on_error = old.on_error;
                r.dead_letter_topic = old.dead_letter_topic.clone();
                r.max_failed_ratio = old.max_failed_ratio;
                r.failed_window = old.failed_window;
            }
        }
        let mut refused = differing([
            ("kafka", rest.kafka != self.kafka),
            ("clickhouse", rest.clickhouse != self.clickhouse),
            (
                "routes (topics, tables, formats or their number)",
                rest.routes != self.routes,
            ),
            ("commit", rest.commit != self.commit),
            ("retry", rest.retry != self.retry),
            ("http", rest.http != self.http),
            ("log.format", rest.log != self.log),
            (
                "max_buffered_bytes",
                rest.max_buffered_bytes != self.max_buffered_bytes,
            ),
            (
                "shutdown_timeout",
                rest.shutdown_timeout != self.shutdown_timeout,
            ),
            ("stall_timeout", rest.stall_timeout != self.stall_timeout),
            ("delivery", rest.delivery != self.delivery),
            ("exactly_once", rest.exactly_once != self.exactly_once),
            (
                "schema_registry",
                rest.schema_registry != self.schema_registry,
            ),
        ]);
        // A key added later and not named above is refused too.
        if refused.is_empty() && rest != *self {
            refused.push("other keys".to_string());
        }
        // Dead letters need the producer, which is created at start only if
        // a route used them then.
        if new.uses_dead_letters() && !dead_letter_producer {
            refused.push(
                "on_error = \"dead-letter\" on a route (no route used dead letters at start, so \
                 the dead-letter producer does not exist)"
                    .to_string(),
            );
        }
        if refused.is_empty() {
            Ok(changed)
        } else {
            Err(refused)
        }
    }

    /// Whether a route sends failed records to a dead-letter topic.
    pub fn uses_dead_letters(&self) -> bool {
        self.routes
            .iter()
            .any(|r| r.on_error == OnError::DeadLetter)
    }

    /// Target table of route `i` as (database, table).
    pub fn route_table(&self, i: usize) -> (String, String) {
        self.qualify(&self.routes[i].table)
    }

    /// `table` or `database.table` as (database, table), the database
    /// defaulting to `clickhouse.database`.
    fn qualify(&self, t: &str) -> (String, String) {
        match t.split_once('.') {
            Some((db, name)) => (db.to_string(), name.to_string()),
            None => (self.clickhouse.database.clone(), t.to_string()),
        }
    }

    /// The exactly-once state table as (database, table).
    pub fn state_table(&self) -> (String, String) {
        self.qualify(&self.exactly_once.state_table)
    }

    /// Every topic of every route, once, in order of appearance.
    pub fn topics(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.routes {
            for t in &r.topics {
                if !out.contains(t) {
                    out.push(t.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"

[clickhouse]

[[routes]]
topics = ["events"]
table = "analytics.events"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.batch.max_rows, 100_000);
        assert_eq!(c.batch.max_wait, Duration::from_secs(1));
        assert_eq!(c.clickhouse.url, "http://127.0.0.1:8123");
        assert_eq!(c.routes[0].on_error, OnError::Stop);
        assert_eq!(c.route_table(0), ("analytics".into(), "events".into()));
        assert_eq!(c.http.listen.port(), 9187);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = Config::parse(&format!("{MINIMAL}\n[batch]\nmax_row = 5\n")).unwrap_err();
        assert!(e.contains("max_row"), "{e}");
    }

    #[test]
    fn human_units_parse() {
        let c = Config::parse(&format!(
            "{MINIMAL}\n[batch]\nmax_bytes = \"8MiB\"\nmax_wait = \"250ms\"\n"
        ))
        .unwrap();
        assert_eq!(c.batch.max_bytes, ByteSize::mib(8));
        assert_eq!(c.batch.max_wait, Duration::from_millis(250));
    }

    #[test]
    fn managed_kafka_properties_are_refused() {
        let c = Config::parse(&MINIMAL.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nproperties = { \"enable.auto.commit\" = \"true\" }",
        ))
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("enable.auto.commit"), "{e}");
    }

    #[test]
    fn reload_changes_only_what_is_safe() {
        let old = Config::parse(MINIMAL).unwrap();
        let mut new = old.clone();
        assert_eq!(old.reload_changes(&new, false), Ok(vec![]));
        new.batch.max_rows = 10;
        new.log.level = "debug".into();
        new.routes[0].on_error = OnError::Skip;
        new.routes[0].max_failed_ratio = 0.1;
        assert_eq!(
            old.reload_changes(&new, false),
            Ok(vec![
                "batch.max_rows".to_string(),
                "log.level".into(),
                "routes[0].on_error".into(),
                "routes[0].max_failed_ratio".into()
            ])
        );
        // Anything else refuses the whole reload, naming what needs a restart.
        new.kafka.group_id = "other".into();
        new.routes[0].table = "elsewhere".into();
        new.delivery = Delivery::ExactlyOnce;
        assert_eq!(
            old.reload_changes(&new, false),
            Err(vec![
                "kafka".to_string(),
                "routes (topics, tables, formats or their number)".into(),
                "delivery".into()
            ])
        );
        // Dead letters need a producer made at start.
        let mut dl = old.clone();
        dl.routes[0].on_error = OnError::DeadLetter;
        dl.routes[0].dead_letter_topic = Some("dlq".into());
        assert!(old.reload_changes(&dl, false).unwrap_err()[0].contains("dead-letter producer"));
        assert!(dl.reload_changes(&old, true).is_ok());
        // Back to dead letters: the producer made at start is still there.
        assert!(old.reload_changes(&dl, true).is_ok());
    }

    #[test]
    fn env_overrides_secrets_and_pod_values_and_debug_hides_them() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.apply_env(|k| match k {
            "CHBRIDGE_CLICKHOUSE_PASSWORD" => Some("hunter2".into()),
            "CHBRIDGE_KAFKA_INSTANCE_ID" => Some("pod-0".into()),
            "CHBRIDGE_KAFKA_SASL_PASSWORD" => Some("sasl-pw".into()),
            _ => None,
        });
        assert_eq!(c.clickhouse.password.expose(), "hunter2");
        assert_eq!(c.kafka.instance_id.as_deref(), Some("pod-0"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("sasl-pw"),
            "{shown}"
        );
    }

    /// Item 16 of the delivery review: a password written into
    /// `clickhouse.url` was printed by `check` and by `Debug`. It becomes the
    /// credential, and the URL keeps no trace of it.
    #[test]
    fn a_password_in_the_clickhouse_url_becomes_the_credential_and_is_never_shown() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.clickhouse.url = "https://ingest:s3cr%40t@ch.example.com:8443/?x=1".into();
        assert!(format!("{c:?}").contains("https://***@ch.example.com:8443/?x=1"));
        assert!(!format!("{c:?}").contains("s3cr"));
        c.clickhouse.lift_url_credentials().unwrap();
        assert_eq!(c.clickhouse.url, "https://ch.example.com:8443/?x=1");
        assert_eq!(c.clickhouse.user, "ingest");
        assert_eq!(c.clickhouse.password.expose(), "s3cr@t");
        assert!(!format!("{c:?}").contains("s3cr"), "{c:?}");
        // Twice is a conflict, named.
        c.clickhouse.url = "http://u:p@127.0.0.1:8123".into();
        let e = c.clickhouse.lift_url_credentials().unwrap_err().to_string();
        assert!(e.contains("clickhouse.url") && !e.contains(":p@"), "{e}");
        // An `@` after the host is no userinfo.
        assert_eq!(redact_url("http://h:8123/?q=a@b"), "http://h:8123/?q=a@b");
    }

    /// `https://` was refused ("not built into this binary yet"): ClickHouse
    /// Cloud users could not run chbridge at all.
    #[test]
    fn the_consumer_group_protocol_refuses_the_classic_timeouts() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.kafka
            .properties
            .0
            .insert("session.timeout.ms".into(), "6000".into());
        c.validate().unwrap();
        c.kafka.group_protocol = GroupProtocol::Consumer;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("session.timeout.ms") && e.contains("group.consumer.session.timeout.ms"),
            "{e}"
        );
        c.kafka.properties.0.clear();
        c.validate().unwrap();
        let parsed = Config::parse(&MINIMAL.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\ngroup_protocol = \"consumer\"",
        ))
        .unwrap();
        assert_eq!(parsed.kafka.group_protocol, GroupProtocol::Consumer);
    }

    #[test]
    fn https_urls_take_tls_files_and_http_urls_refuse_them() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.clickhouse.url = "https://ch.example.com:8443".into();
        c.validate().unwrap();
        let dir = std::env::temp_dir().join(format!("chbridge-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        c.clickhouse.ca_file = Some(junk.clone());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("clickhouse.ca_file") && e.contains("junk.pem"),
            "{e}"
        );
        c.clickhouse.ca_file = Some(dir.join("missing.pem"));
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        c.clickhouse.ca_file = None;
        c.clickhouse.client_cert = Some(junk.clone());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        c.clickhouse.url = "http://127.0.0.1:8123".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("clickhouse.client_cert") && e.contains("https only"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shipped_example_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in [
            "config/example.toml",
            "config/multi-route.toml",
            "config/formats.toml",
            "deploy/compose/chbridge.toml",
        ] {
            let c = Config::load(&root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(!c.routes.is_empty(), "{file}");
        }
        // The Kubernetes configurations take the connection settings from the
        // Deployment's environment.
        for file in [
            "deploy/kubernetes/base/chbridge.toml",
            "deploy/kubernetes/components/production/chbridge.toml",
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let mut c = Config::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(c.validate().is_err(), "{file} names no brokers itself");
            c.apply_env(|k| match k {
                "CHBRIDGE_KAFKA_BROKERS" => Some("kafka:9092".into()),
                "CHBRIDGE_KAFKA_GROUP_ID" => Some("chbridge".into()),
                "CHBRIDGE_CLICKHOUSE_URL" => Some("http://clickhouse:8123".into()),
                _ => None,
            });
            c.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn validation_names_the_bad_key() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.log.level = "info,chbridge=loud".into();
        assert!(c.validate().unwrap_err().to_string().contains("log.level"));
        let mut c = Config::parse(MINIMAL).unwrap();
        c.routes[0].table = "a.b.c".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("routes[0].table"));
        let mut c = Config::parse(MINIMAL).unwrap();
        c.max_buffered_bytes = ByteSize::mib(1);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_buffered_bytes"));
    }
}
