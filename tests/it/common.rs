//! Test harness: the real local stack (ClickHouse and the broker started by
//! `scripts/stack.sh`), a ClickHouse HTTP client, a Kafka producer that records
//! where each record landed, and the chbridge binary run as a real process.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};

pub fn env_port(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn ch_port() -> u16 {
    env_port("CH_HTTP_PORT", 8123)
}

pub fn brokers() -> String {
    format!("127.0.0.1:{}", env_port("KAFKA_PORT", 9092))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A name unique to this test run, safe as a topic, table or group name.
/// The start time is part of it: Apache Kafka keeps its topics and groups
/// across runs, and a process id alone comes back.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 1_000_000)
            .unwrap_or(0)
    });
    format!(
        "{prefix}_{}_{start}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// One HTTP/1.0 request to 127.0.0.1:`port`; returns (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Runs SQL on the ClickHouse at `port`; panics with ClickHouse's message on failure.
pub fn ch_at(port: u16, sql: &str) -> String {
    match http(port, "POST", "/?default_format=TSV", sql.as_bytes()) {
        Ok((200, body)) => body,
        Ok((status, body)) => panic!("ClickHouse {status} for `{sql}`: {body}"),
        Err(e) => panic!("ClickHouse unreachable on {port} for `{sql}`: {e}"),
    }
}

pub fn ch(sql: &str) -> String {
    ch_at(ch_port(), sql)
}

pub fn ch_u64_at(port: u16, sql: &str) -> u64 {
    let out = ch_at(port, sql);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number from `{sql}`: {out:?}"))
}

pub fn ch_u64(sql: &str) -> u64 {
    ch_u64_at(ch_port(), sql)
}

/// Polls `f` until it returns true or `timeout` passes; returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let res = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .expect("create_topics");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
    // Wait until the metadata shows every partition.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("consumer");
    assert!(
        wait_until(Duration::from_secs(10), || {
            c.fetch_metadata(Some(name), Duration::from_secs(2))
                .map(|m| {
                    m.topics().first().map_or(0, |t| t.partitions().len()) == partitions as usize
                })
                .unwrap_or(false)
        }),
        "topic {name} did not show {partitions} partitions"
    );
}

/// Where each produced record landed: id -> (partition, offset).
#[derive(Default)]
pub struct Delivered {
    pub at: Mutex<HashMap<u64, (i32, i64)>>,
    pub errors: AtomicUsize,
}

pub struct DeliveryCtx(pub std::sync::Arc<Delivered>);
impl ClientContext for DeliveryCtx {}
impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Box<u64>;
    fn delivery(&self, r: &DeliveryResult<'_>, id: Box<u64>) {
        match r {
            Ok(m) => {
                use rdkafka::message::Message;
                self.0
                    .at
                    .lock()
                    .unwrap()
                    .insert(*id, (m.partition(), m.offset()));
            }
            Err((e, _)) => {
                eprintln!("delivery of id {id} failed: {e}");
                self.0.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub struct TestProducer {
    pub producer: BaseProducer<DeliveryCtx>,
    pub delivered: std::sync::Arc<Delivered>,
}

impl TestProducer {
    pub fn new() -> TestProducer {
        let delivered = std::sync::Arc::new(Delivered::default());
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create_with_context(DeliveryCtx(delivered.clone()))
            .expect("producer");
        TestProducer {
            producer,
            delivered,
        }
    }

    /// Sends `payload` with `id` to an explicit partition (None: the partitioner's choice).
    pub fn send(&self, topic: &str, partition: Option<i32>, id: u64, payload: &[u8]) {
        let mut rec: BaseRecord<'_, [u8], [u8], Box<u64>> =
            BaseRecord::with_opaque_to(topic, Box::new(id)).payload(payload);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    self.producer.poll(Duration::from_millis(50));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    /// Waits for every delivery; panics if any failed.
    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(60)).expect("flush");
        assert_eq!(
            self.delivered.errors.load(Ordering::Relaxed),
            0,
            "deliveries failed"
        );
    }

    pub fn placement(&self) -> HashMap<u64, (i32, i64)> {
        self.delivered.at.lock().unwrap().clone()
    }
}

/// Committed offsets of `group` for `topic` partitions 0..n (-1 when none).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

/// A config file for one test. `routes` is TOML for the [[routes]] entries.
#[derive(Clone)]
pub struct BridgeConfig {
    pub group: String,
    pub database: String,
    pub routes: String,
    /// Top-level keys.
    pub extra: String,
    /// More keys of the [batch] section.
    pub batch_extra: String,
    pub ch_port: u16,
    /// The HTTPS port of the same server, used when `over_https()`.
    pub ch_https_port: u16,
    /// The `[clickhouse]` keys that reach the server (url, TLS), instead of
    /// those worked out from the ports.
    pub ch_keys: Option<String>,
    /// Another listener of the broker (security tests), instead of `brokers()`.
    pub brokers: Option<String>,
    /// More `[kafka.properties]` lines (security settings).
    pub kafka_properties: String,
    /// `kafka.group_protocol` ("consumer": KIP-848, whose timeouts are the
    /// broker's); None: the default (classic) with short test timeouts.
    pub group_protocol: Option<String>,
    pub http_port: u16,
}

/// The stack's certificates (scripts/stack.sh): a CA, the server's, a client's.
pub fn tls_dir() -> PathBuf {
    repo().join(".stack/tls")
}

pub fn ch_https_port() -> u16 {
    env_port("CH_HTTPS_PORT", 8443)
}

/// `CHBRIDGE_IT_HTTPS=1` (make it-https) runs the bridges of the tests over
/// HTTPS with a client certificate, against the stack's ClickHouse.
pub fn over_https() -> bool {
    std::env::var("CHBRIDGE_IT_HTTPS").is_ok_and(|v| v == "1")
}

/// The `[clickhouse]` keys that reach a ClickHouse of the tests over HTTPS on
/// `port`, trusting the stack's CA and presenting the client certificate.
pub fn https_keys(port: u16) -> String {
    let tls = tls_dir();
    format!(
        "url = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        port,
        tls.join("ca.pem").display(),
        tls.join("client.pem").display(),
        tls.join("client.key").display()
    )
}

impl BridgeConfig {
    fn clickhouse(&self) -> String {
        if let Some(keys) = &self.ch_keys {
            keys.clone()
        } else if over_https() {
            https_keys(self.ch_https_port)
        } else {
            format!("url = \"http://127.0.0.1:{}\"", self.ch_port)
        }
    }

    pub fn new(group: &str, database: &str, routes: &str) -> BridgeConfig {
        BridgeConfig {
            group: group.to_string(),
            database: database.to_string(),
            routes: routes.to_string(),
            extra: String::new(),
            batch_extra: String::new(),
            ch_port: ch_port(),
            ch_https_port: ch_https_port(),
            ch_keys: None,
            brokers: None,
            kafka_properties: String::new(),
            group_protocol: None,
            http_port: free_port(),
        }
    }

    pub fn toml(&self) -> String {
        format!(
            r#"
shutdown_timeout = "20s"
{extra_top}
[kafka]
brokers = "{brokers}"
group_id = "{group}"
{group_protocol}
[kafka.properties]
{timeouts}
{kafka_properties}

[clickhouse]
{clickhouse}
database = "{db}"

[batch]
max_rows = 5000
max_wait = "300ms"
{batch_extra}

[retry]
initial_backoff = "100ms"
max_backoff = "1s"

[http]
listen = "127.0.0.1:{http}"

[log]
level = "info,librdkafka=warn"

{routes}
"#,
            extra_top = self.extra,
            batch_extra = self.batch_extra,
            brokers = self.brokers.clone().unwrap_or_else(brokers),
            kafka_properties = self.kafka_properties,
            group_protocol = self
                .group_protocol
                .as_ref()
                .map(|p| format!("group_protocol = \"{p}\""))
                .unwrap_or_default(),
            timeouts = match self.group_protocol.as_deref() {
                Some("consumer") => "",
                _ => "\"session.timeout.ms\" = \"2000\"\n\"heartbeat.interval.ms\" = \"600\"",
            },
            group = self.group,
            clickhouse = self.clickhouse(),
            db = self.database,
            http = self.http_port,
            routes = self.routes,
        )
    }
}

/// A running chbridge process.
pub struct Bridge {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
}

pub fn test_dir(name: &str) -> PathBuf {
    let d = repo().join("target").join("it").join(name);
    std::fs::create_dir_all(&d).expect("test dir");
    d
}

pub fn write_config(cfg: &BridgeConfig, dir: &Path) -> PathBuf {
    let path = dir.join("chbridge.toml");
    std::fs::write(&path, cfg.toml()).expect("write config");
    path
}

impl Bridge {
    pub fn start(cfg: &BridgeConfig, dir: &Path) -> Bridge {
        let config = write_config(cfg, dir);
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!(
            "bridge-{}.log",
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_chbridge"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn chbridge");
        Bridge {
            child,
            http_port: cfg.http_port,
            log,
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of a metric line (summed over label sets whose text contains `filter`).
    pub fn metric(&self, name: &str, filter: &str) -> f64 {
        let Ok((200, body)) = http(self.http_port, "GET", "/metrics", b"") else {
            return -1.0;
        };
        body.lines()
            // The exact name: `chbridge_buffered_bytes` is not `..._limit`.
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    && l.contains(filter)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn ready(&self) -> bool {
        matches!(http(self.http_port, "GET", "/readyz", b""), Ok((200, _)))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private ClickHouse server (own data directory and ports) that a test may kill.
pub struct PrivateClickHouse {
    pub http_port: u16,
    pub https_port: u16,
    pub tcp_port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl PrivateClickHouse {
    pub fn start(dir: &Path) -> PrivateClickHouse {
        let mut ch = PrivateClickHouse {
            http_port: free_port(),
            https_port: free_port(),
            tcp_port: free_port(),
            dir: dir.join("clickhouse"),
            child: None,
        };
        std::fs::create_dir_all(ch.dir.join("data")).expect("ch dir");
        ch.restart();
        ch
    }

    pub fn restart(&mut self) {
        let venv = std::env::var("VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join(".venv"));
        let child = Command::new(venv.join("bin").join("python"))
            .arg(repo().join("scripts").join("clickhouse_server.py"))
            .arg(self.dir.join("data"))
            .arg(self.http_port.to_string())
            .arg(self.tcp_port.to_string())
            .arg(self.https_port.to_string())
            .arg(tls_dir())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("server.log")).expect("log"))
            .spawn()
            .expect("start private ClickHouse");
        self.child = Some(child);
        let port = self.http_port;
        assert!(
            wait_until(Duration::from_secs(60), || matches!(
                http(port, "POST", "/", b"SELECT 1"),
                Ok((200, _))
            )),
            "private ClickHouse did not start; see {}",
            self.dir.join("server.log").display()
        );
    }

    /// A real crash: SIGKILL, no shutdown.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sql(&self, sql: &str) -> String {
        ch_at(self.http_port, sql)
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The simple table most tests use: every record carries its id and partition.
pub const SIMPLE_TABLE: &str =
    "(id UInt64, p UInt8, payload String) ENGINE = MergeTree ORDER BY id";

pub fn simple_record(id: u64, p: i32) -> Vec<u8> {
    format!(r#"{{"id":{id},"p":{p},"payload":"record number {id}"}}"#).into_bytes()
}

/// Produces `count` simple records with ids from `first`, round-robin over partitions.
pub fn produce_simple(prod: &TestProducer, topic: &str, partitions: i32, first: u64, count: u64) {
    for id in first..first + count {
        let p = (id % partitions as u64) as i32;
        prod.send(topic, Some(p), id, &simple_record(id, p));
    }
}

pub fn create_database(name: &str) {
    ch(&format!("CREATE DATABASE IF NOT EXISTS {name}"));
}

pub fn drop_database(name: &str) {
    ch(&format!("DROP DATABASE IF EXISTS {name}"));
}

/// A fresh database with the simple table `t`, a topic with `partitions`, a
/// group, and a config routing the topic to `t` (`route_extra`: more route keys).
pub fn simple_setup(
    name: &str,
    partitions: i32,
    route_extra: &str,
) -> (String, String, String, BridgeConfig) {
    let db = unique(&format!("it_{name}"));
    let topic = unique(name);
    let group = unique(&format!("g_{name}"));
    create_database(&db);
    ch(&format!("CREATE TABLE {db}.t {SIMPLE_TABLE}"));
    create_topic(&topic, partitions);
    let cfg = BridgeConfig::new(
        &group,
        &db,
        &format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\n{route_extra}\n"),
    );
    (db, topic, group, cfg)
}

/// Reads `count` records of partition 0 of `topic` from the beginning (or
/// panics after `timeout`).
pub fn read_topic(
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    assert_eq!(out.len(), count, "records read from {topic}");
    out
}
