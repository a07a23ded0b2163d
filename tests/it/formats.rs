//! Every input format end to end through a real topic: records written by
//! independent encoders (Python fastavro, protobuf and confluent-kafka's
//! serializers, scripts/produce_formats.py), schemas served by a local
//! registry over basic auth and TLS (scripts/schema_registry.py), a real bridge,
//! and a table compared with ClickHouse's own parse of the expected rows.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

pub const ROWS: u64 = 200;

pub const COLUMNS: &str = "id UInt64, name String, price Decimal(18, 4), ts DateTime64(3, 'UTC'), \
    ts_us DateTime64(6, 'UTC'), day Date32, uid UUID, tags Array(String), \
    attrs Map(String, Int32), score Nullable(Float64), ok Bool, \
    kind Enum8('a' = 1, 'b' = 2), inner_city String, inner_zip Int32";

/// Maps are compared sorted: the Protobuf wire order of map entries is not defined.
const COMPARED: &str = "id, name, price, ts, ts_us, day, uid, tags, mapSort(attrs), score, ok, \
    kind, inner_city, inner_zip";

pub struct Registry {
    child: Child,
    pub url: String,
}

impl Registry {
    pub fn start(dir: &Path, tls: bool) -> Registry {
        let python = repo().join(".venv/bin/python");
        let script = repo().join("scripts/schema_registry.py");
        let ready = dir.join("registry.url");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args(["--port", "0", "--user", "bridge:s3cret-pw"])
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null());
        if tls {
            let certs = dir.join("certs");
            let status = Command::new(&python)
                .arg(&script)
                .arg("make-cert")
                .arg(&certs)
                .status()
                .expect("make-cert");
            assert!(status.success());
            cmd.arg("--tls-cert")
                .arg(certs.join("server.pem"))
                .arg("--tls-key")
                .arg(certs.join("server.key"));
        }
        let child = cmd.spawn().expect("registry");
        assert!(
            wait_until(Duration::from_secs(20), || ready.exists()
                && std::fs::read_to_string(&ready)
                    .is_ok_and(|s| !s.trim().is_empty())),
            "the registry did not start"
        );
        let url = std::fs::read_to_string(&ready).unwrap().trim().to_string();
        Registry { child, url }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces `ROWS` records of `format`; returns the expected rows file.
pub fn produce(
    dir: &Path,
    topic: &str,
    format: &str,
    registry: Option<&Registry>,
    ca: Option<&Path>,
) -> (PathBuf, PathBuf) {
    let expected = dir.join(format!("{format}.expected.jsonl"));
    let schema = dir.join(format!("{format}.schema"));
    let mut cmd = Command::new(repo().join(".venv/bin/python"));
    cmd.arg(repo().join("scripts/produce_formats.py"))
        .args([
            "--brokers",
            &brokers(),
            "--topic",
            topic,
            "--format",
            format,
        ])
        .args(["--count", &ROWS.to_string()])
        .arg("--expected")
        .arg(&expected);
    if format.ends_with("-file") {
        cmd.arg("--schema-out").arg(&schema);
    }
    if let Some(r) = registry {
        cmd.args(["--registry", &r.url, "--registry-user", "bridge:s3cret-pw"]);
    }
    if let Some(ca) = ca {
        cmd.arg("--registry-ca").arg(ca);
    }
    let out = cmd.output().expect("produce_formats.py");
    assert!(
        out.status.success(),
        "produce_formats.py {format}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (expected, schema)
}

fn compare(db: &str, table: &str, columns: &str) {
    let select = |t: &str| {
        ch(&format!(
            "SELECT {columns} FROM {db}.{t} ORDER BY 1 FORMAT JSONEachRow"
        ))
    };
    let (ours, theirs) = (select(table), select(&format!("{table}_expected")));
    assert_eq!(ours.lines().count() as u64, ROWS, "{table}");
    for (a, b) in ours.lines().zip(theirs.lines()) {
        assert_eq!(
            a, b,
            "{table}: chbridge's row differs from ClickHouse's parse"
        );
    }
}

#[test]
fn every_format_lands_exactly_through_a_real_topic() {
    let db = unique("fmt");
    ch(&format!("CREATE DATABASE {db}"));
    let group = unique("fmt-group");
    let dir = test_dir(&group);
    let registry = Registry::start(&dir, true);
    let ca = dir.join("certs/ca.pem");

    // (format as produced, route keys)
    let desc = dir.join("protobuf-file.schema");
    let avsc = dir.join("avro-file.schema");
    let cases: Vec<(&str, String)> = vec![
        ("avro", "format = \"avro\"\nflatten = \"_\"".into()),
        (
            "avro-file",
            format!("format = \"avro\"\nflatten = \"_\"\nregistry = false\nschema_file = {:?}", avsc),
        ),
        ("protobuf", "format = \"protobuf\"\nflatten = \"_\"".into()),
        (
            "protobuf-file",
            format!(
                "format = \"protobuf\"\nflatten = \"_\"\nschema_file = {:?}\nmessage = \"chbridge.test.Row\"",
                desc
            ),
        ),
        ("csv", "format = \"csv\"".into()),
        ("tsv", "format = \"tsv\"".into()),
    ];
    let mut routes = String::new();
    let mut tables = Vec::new();
    for (format, keys) in &cases {
        let table = format.replace('-', "_");
        let topic = unique(&format!("fmt_{table}"));
        create_topic(&topic, 1);
        for suffix in ["", "_expected"] {
            ch(&format!(
                "CREATE TABLE {db}.{table}{suffix} ({COLUMNS}) ENGINE = MergeTree ORDER BY id"
            ));
        }
        let with_registry = !format.ends_with("-file") && format.starts_with(['a', 'p']);
        let (expected, _) = produce(
            &dir,
            &topic,
            format,
            with_registry.then_some(&registry),
            with_registry.then_some(ca.as_path()),
        );
        let lines = std::fs::read_to_string(&expected).unwrap();
        ch(&format!(
            "INSERT INTO {db}.{table}_expected FORMAT JSONEachRow\n{lines}"
        ));
        routes.push_str(&format!(
            "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"{table}\"\n{keys}\n\n"
        ));
        tables.push(table);
    }
    // raw: the value, with Kafka metadata from the mapping.
    let raw_topic = unique("fmt_raw");
    create_topic(&raw_topic, 1);
    ch(&format!(
        "CREATE TABLE {db}.raw (line String, topic String, off UInt64, k String) ENGINE = MergeTree ORDER BY off"
    ));
    ch(&format!(
        "CREATE TABLE {db}.raw_expected (line String) ENGINE = MergeTree ORDER BY line"
    ));
    let (expected, _) = produce(&dir, &raw_topic, "raw", None, None);
    let lines = std::fs::read_to_string(&expected).unwrap();
    ch(&format!(
        "INSERT INTO {db}.raw_expected FORMAT JSONEachRow\n{lines}"
    ));
    routes.push_str(&format!(
        "[[routes]]\ntopics = [\"{raw_topic}\"]\ntable = \"raw\"\nformat = \"raw\"\n\
         [routes.columns]\ntopic = {{ meta = \"topic\" }}\noff = {{ meta = \"offset\" }}\nk = {{ meta = \"key\" }}\n\n"
    ));

    let mut cfg = BridgeConfig::new(&group, &db, &routes);
    cfg.extra = format!(
        "[schema_registry]\nurl = \"{}\"\nusername = \"bridge\"\npassword = \"s3cret-pw\"\nca_file = {:?}\n",
        registry.url, ca
    );
    let mut bridge = Bridge::start(&cfg, &dir);
    let all = |t: &str| ch_u64(&format!("SELECT count() FROM {db}.{t}")) == ROWS;
    let done = wait_until(Duration::from_secs(90), || {
        tables.iter().all(|t| all(t)) && all("raw")
    });
    let log = bridge.log_text();
    bridge.signal(libc::SIGTERM);
    bridge.wait(Duration::from_secs(30));
    assert!(done, "not every format landed:\n{log}");
    assert!(
        !log.contains("s3cret-pw"),
        "the registry password leaked into the log"
    );
    for t in &tables {
        compare(&db, t, COMPARED);
    }
    compare(&db, "raw", "line");
    // The metadata columns hold each record's own topic, offset and key.
    assert_eq!(
        ch(&format!(
            "SELECT count(), uniqExact(off), min(off), max(off), countIf(topic = '{raw_topic}') FROM {db}.raw FORMAT CSV"
        ))
        .trim(),
        format!("{ROWS},{ROWS},0,{},{ROWS}", ROWS - 1)
    );
    assert_eq!(
        ch_u64(&format!(
            "SELECT count() FROM {db}.raw WHERE line != concat('line ', k, ' ', substring(line, length(concat('line ', k, ' ')) + 1))"
        )),
        0,
        "a raw row's key column does not hold its record's key"
    );
}

/// The per-route mapping end to end: nested paths, a rename, constants,
/// Kafka metadata and headers, flattening into Nested columns, and
/// `unknown_fields = "error"` sending an unexpected field to the dead letters.
#[test]
fn a_json_mapping_fills_columns_from_paths_constants_metadata_and_headers() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let db = unique("map");
    ch(&format!("CREATE DATABASE {db}"));
    ch(&format!(
        "CREATE TABLE {db}.t (id UInt64, user_name String, city LowCardinality(String), \
         source String, version UInt8, topic String, part Int32, off UInt64, \
         ts DateTime64(3, 'UTC'), k String, trace String, `n.x` Array(UInt8), `n.y` Array(String)) \
         ENGINE = MergeTree ORDER BY id"
    ));
    let topic = unique("map");
    let dlq = unique("map_dlq");
    create_topic(&topic, 2);
    create_topic(&dlq, 1);
    let group = unique("map-group");
    const N: u64 = 300;
    let producer: BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    for id in 0..N {
        // Every 10th record carries a field nothing maps: a dead letter.
        let extra = if id % 10 == 7 { r#","surprise":1"# } else { "" };
        let value = format!(
            r#"{{"id":{id},"user":{{"name":"u{id}","address":{{"city":"c{c}"}}}},"n":{{"x":[{id_mod},1],"y":["a","b{id}"]}}{extra}}}"#,
            c = id % 3,
            id_mod = id % 200
        );
        let key = format!("key-{id}");
        let trace = format!("trace-{id}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "trace-id",
            value: Some(trace.as_bytes()),
        });
        let rec = BaseRecord::to(&topic)
            .key(key.as_bytes())
            .payload(value.as_bytes())
            .headers(headers)
            .timestamp(1_700_000_000_000 + id as i64);
        producer.send(rec).map_err(|(e, _)| e).expect("send");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let routes = format!(
        r#"[[routes]]
topics = ["{topic}"]
table = "t"
unknown_fields = "error"
on_error = "dead-letter"
dead_letter_topic = "{dlq}"
flatten = "."
[routes.columns]
user_name = "user.name"
city = {{ field = ["user", "address", "city"] }}
source = {{ const = "web" }}
version = {{ const = 3 }}
topic = {{ meta = "topic" }}
part = {{ meta = "partition" }}
off = {{ meta = "offset" }}
ts = {{ meta = "timestamp" }}
k = {{ meta = "key" }}
trace = {{ header = "trace-id" }}
"#
    );
    let cfg = BridgeConfig::new(&group, &db, &routes);
    let dir = test_dir(&group);
    let mut bridge = Bridge::start(&cfg, &dir);
    let good = N - N / 10;
    let done = wait_until(Duration::from_secs(60), || {
        ch_u64(&format!("SELECT count() FROM {db}.t")) >= good
    });
    std::thread::sleep(Duration::from_secs(1));
    let log = bridge.log_text();
    let dead = bridge.metric("chbridge_records_failed_total", "reason=\"unknown_field\"");
    bridge.signal(libc::SIGTERM);
    bridge.wait(Duration::from_secs(30));
    assert!(done, "not every record landed:\n{log}");
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), good);
    assert_eq!(
        dead as u64,
        N / 10,
        "every record with an unknown field is a dead letter"
    );
    assert_eq!(
        ch_u64(&format!("SELECT countIf(id % 10 = 7) FROM {db}.t")),
        0
    );
    // Every column holds its record's own value.
    assert_eq!(
        ch_u64(&format!(
            "SELECT countIf(user_name = concat('u', toString(id)) AND city = concat('c', toString(id % 3)) \
             AND source = 'web' AND version = 3 AND topic = '{topic}' AND part IN (0, 1) \
             AND toUnixTimestamp64Milli(ts) = 1700000000000 + id AND k = concat('key-', toString(id)) \
             AND trace = concat('trace-', toString(id)) AND `n.x` = [id % 200, 1] \
             AND `n.y` = ['a', concat('b', toString(id))]) FROM {db}.t"
        )),
        good
    );
    // Offsets are each record's own: unique per partition.
    assert_eq!(
        ch_u64(&format!("SELECT uniqExact(part, off) FROM {db}.t")),
        good
    );
}

/// A registry that cannot serve schemas is an outage, not bad data: the
/// bridge stops without committing or diverting anything, and once the
/// registry answers again every record lands.
#[test]
fn an_unreachable_registry_stops_the_bridge_without_losing_a_record() {
    let db = unique("reg");
    ch(&format!("CREATE DATABASE {db}"));
    ch(&format!(
        "CREATE TABLE {db}.avro ({COLUMNS}) ENGINE = MergeTree ORDER BY id"
    ));
    ch(&format!(
        "CREATE TABLE {db}.avro_expected ({COLUMNS}) ENGINE = MergeTree ORDER BY id"
    ));
    let group = unique("reg-group");
    let dir = test_dir(&group);
    let registry = Registry::start(&dir, false);
    let port: u16 = registry
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("registry port");
    let topic = unique("reg");
    create_topic(&topic, 1);
    let (expected, _) = produce(&dir, &topic, "avro", Some(&registry), None);
    let lines = std::fs::read_to_string(&expected).unwrap();
    ch(&format!(
        "INSERT INTO {db}.avro_expected FORMAT JSONEachRow\n{lines}"
    ));
    // From now on every schema request fails.
    let (status, _) = http(
        port,
        "POST",
        "/_admin/fail",
        br#"{"status":503,"count":1000000}"#,
    )
    .unwrap();
    assert_eq!(status, 200);
    let routes = format!(
        "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"avro\"\nformat = \"avro\"\nflatten = \"_\"\n\
         on_error = \"skip\"\n"
    );
    let mut cfg = BridgeConfig::new(&group, &db, &routes);
    cfg.extra = format!(
        "[schema_registry]\nurl = \"{}\"\nusername = \"bridge\"\npassword = \"s3cret-pw\"\ntimeout = \"1s\"\n",
        registry.url
    );
    let mut bridge = Bridge::start(&cfg, &dir);
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the bridge kept running without its schemas:\n{log}"
    );
    assert!(
        log.contains("unavailable") || log.contains("Unavailable"),
        "{log}"
    );
    assert!(!log.contains("s3cret-pw"), "the password leaked:\n{log}");
    // Nothing skipped, nothing inserted, nothing committed.
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.avro")), 0);
    assert!(
        committed(&group, &topic, 1)[0] <= 0,
        "an offset was committed past unread records"
    );

    let (status, _) = http(port, "POST", "/_admin/reset", b"{}").unwrap();
    assert_eq!(status, 200);
    let mut bridge = Bridge::start(&cfg, &dir);
    let done = wait_until(Duration::from_secs(60), || {
        ch_u64(&format!("SELECT count() FROM {db}.avro")) >= ROWS
    });
    let log = bridge.log_text();
    bridge.signal(libc::SIGTERM);
    bridge.wait(Duration::from_secs(30));
    assert!(
        done,
        "the records did not land once the registry was back:\n{log}"
    );
    compare(&db, "avro", COMPARED);
    // Schemas are cached by id: each of the two writer schemas was fetched once.
    let (_, stats) = http(port, "GET", "/_admin/stats", b"").unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("registry stats");
    let fetched: Vec<(String, u64)> = stats["calls"]
        .as_object()
        .expect("calls")
        .iter()
        .filter(|(k, _)| k.starts_with("GET /schemas/ids/"))
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(fetched.len(), 2, "{stats}");
    assert!(
        fetched.iter().all(|(_, n)| *n == 1),
        "a schema was fetched more than once: {stats}"
    );
}

/// Item 10 of the delivery review: one record naming a schema id the
/// registry does not have stopped the bridge whatever on_error said. It is
/// the record that is corrupt: it goes where the route says (here the
/// dead-letter topic) and the others land.
#[test]
fn a_record_naming_an_unknown_schema_follows_the_routes_policy() {
    let db = unique("regid");
    ch(&format!("CREATE DATABASE {db}"));
    ch(&format!(
        "CREATE TABLE {db}.avro ({COLUMNS}) ENGINE = MergeTree ORDER BY id"
    ));
    ch(&format!(
        "CREATE TABLE {db}.avro_expected ({COLUMNS}) ENGINE = MergeTree ORDER BY id"
    ));
    let group = unique("regid-group");
    let dir = test_dir(&group);
    let registry = Registry::start(&dir, false);
    let topic = unique("regid");
    let dlq = unique("regid_dlq");
    create_topic(&topic, 1);
    create_topic(&dlq, 1);
    let (expected, _) = produce(&dir, &topic, "avro", Some(&registry), None);
    let lines = std::fs::read_to_string(&expected).unwrap();
    ch(&format!(
        "INSERT INTO {db}.avro_expected FORMAT JSONEachRow\n{lines}"
    ));
    // Confluent framing naming schema id 999999, which nobody registered.
    let p = TestProducer::new();
    let corrupt = [0u8, 0x00, 0x0f, 0x42, 0x3f, 2, b'x'];
    for i in 0..3 {
        p.send(&topic, Some(0), 9_000_000 + i, &corrupt);
    }
    p.flush();
    let routes = format!(
        "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"avro\"\nformat = \"avro\"\nflatten = \"_\"\n\
         on_error = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"
    );
    let mut cfg = BridgeConfig::new(&group, &db, &routes);
    cfg.extra = format!(
        "[schema_registry]\nurl = \"{}\"\nusername = \"bridge\"\npassword = \"s3cret-pw\"\n",
        registry.url
    );
    let mut bridge = Bridge::start(&cfg, &dir);
    let done = wait_until(Duration::from_secs(60), || {
        ch_u64(&format!("SELECT count() FROM {db}.avro")) >= ROWS
            && committed(&group, &topic, 1) == vec![ROWS as i64 + 3]
    });
    let log = bridge.log_text();
    let unknown = bridge.metric("chbridge_records_failed_total", "reason=\"unknown_schema\"");
    let running = bridge.child.try_wait().ok().flatten().is_none();
    bridge.signal(libc::SIGTERM);
    bridge.wait(Duration::from_secs(30));
    assert!(
        running && done,
        "the bridge stopped or did not commit to the end:\n{log}"
    );
    assert_eq!(unknown, 3.0, "{log}");
    compare(&db, "avro", COMPARED);
    let letters = read_topic(&dlq, 3, Duration::from_secs(30));
    use rdkafka::message::Message;
    assert!(letters.iter().all(|m| m.payload() == Some(&corrupt[..])));
}
