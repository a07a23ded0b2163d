//! Every input format end to end through a real topic: records written by
//! independent encoders (Python fastavro, protobuf and confluent-kafka's
//! serializers, scripts/produce_formats.py), schemas served by a local
//! registry over basic auth and TLS (scripts/schema_registry.py), a real bridge,
//! and a table compared with ClickHouse's own parse of the expected rows.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

const ROWS: u64 = 200;

const COLUMNS: &str = "id UInt64, name String, price Decimal(18, 4), ts DateTime64(3, 'UTC'), \
    ts_us DateTime64(6, 'UTC'), day Date32, uid UUID, tags Array(String), \
    attrs Map(String, Int32), score Nullable(Float64), ok Bool, \
    kind Enum8('a' = 1, 'b' = 2), inner_city String, inner_zip Int32";

/// Maps are compared sorted: the Protobuf wire order of map entries is not defined.
const COMPARED: &str = "id, name, price, ts, ts_us, day, uid, tags, mapSort(attrs), score, ok, \
    kind, inner_city, inner_zip";

struct Registry {
    child: Child,
    url: String,
}

impl Registry {
    fn start(dir: &Path, tls: bool) -> Registry {
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
fn produce(
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
