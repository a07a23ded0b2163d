//! Micro-benchmarks of the consumer thread's hot path, per record:
//! - `decode_encode/<workload>`: one JSON record to one RowBinaryWithDefaults
//!   row (parse, convert every value, encode), for the three workloads of
//!   `make bench` (narrow, wide, nested);
//! - `batch_building`: `Core::on_record`, everything the consumer thread does
//!   with a record (route, decode, append to the partition's batch, track the
//!   offset), narrow records from 4 partitions;
//! - `offset_tracking`: holding and releasing offsets of 1,000 partitions and
//!   computing the commits.
//!
//! Run: `cargo bench --bench hot_path` (criterion prints records per second
//! as "thrpt" in elements/s, one core).

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use chbridge::config::Config;
use chbridge::decode::{decoder_for, Decoder};
use chbridge::kafka::offsets::{OffsetTracker, PartitionKey};
use chbridge::kafka::Record;
use chbridge::observability::Metrics;
use chbridge::pipeline::core::{Core, Limits, RouteState, Shared, TableState};
use chbridge::schema::TableSchema;

/// A deterministic generator (xorshift), so every run encodes the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn word(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| (b'a' + self.below(26) as u8) as char)
            .collect()
    }
}

struct Workload {
    name: &'static str,
    columns: Vec<(String, String)>,
    records: Vec<Vec<u8>>,
}

impl Workload {
    fn schema(&self) -> TableSchema {
        let cols: Vec<(&str, &str)> = self
            .columns
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        TableSchema::from_columns("bench", self.name, &cols)
    }

    fn avg_bytes(&self) -> usize {
        self.records.iter().map(Vec::len).sum::<usize>() / self.records.len()
    }
}

const EVENTS: [&str; 5] = ["view", "click", "purchase", "signup", "logout"];
const COUNTRIES: [&str; 6] = ["DE", "FR", "US", "JP", "BR", "IN"];

fn cols(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

fn timestamp(rng: &mut Rng) -> String {
    format!(
        "2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1000)
    )
}

/// About 8 columns and 150 bytes of JSON.
fn narrow(n: usize) -> Workload {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let records = (0..n)
        .map(|id| {
            format!(
                r#"{{"id":{id},"ts":"{ts}","user_id":{user},"event":"{event}","country":"{country}","amount":{amount:.2},"tags":["{t1}","{t2}"],"ok":{ok}}}"#,
                ts = timestamp(&mut rng),
                user = rng.below(1_000_000),
                event = EVENTS[rng.below(5) as usize],
                country = COUNTRIES[rng.below(6) as usize],
                amount = rng.below(100_000) as f64 / 100.0,
                t1 = rng.word(6),
                t2 = rng.word(5),
                ok = rng.below(2) == 0,
            )
            .into_bytes()
        })
        .collect();
    Workload {
        name: "narrow",
        columns: cols(&[
            ("id", "UInt64"),
            ("ts", "DateTime64(3, 'UTC')"),
            ("user_id", "UInt32"),
            ("event", "LowCardinality(String)"),
            ("country", "LowCardinality(String)"),
            ("amount", "Float64"),
            ("tags", "Array(String)"),
            ("ok", "Bool"),
        ]),
        records,
    }
}

/// 60 columns, about 1.5 KB of JSON.
fn wide(n: usize) -> Workload {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut columns = vec![("id".to_string(), "UInt64".to_string())];
    for i in 0..20 {
        columns.push((format!("n{i:02}"), "UInt32".into()));
    }
    for i in 0..20 {
        columns.push((format!("s{i:02}"), "String".into()));
    }
    for i in 0..10 {
        columns.push((format!("f{i:02}"), "Float64".into()));
    }
    for i in 0..5 {
        columns.push((format!("t{i:02}"), "DateTime64(3, 'UTC')".into()));
    }
    for i in 0..4 {
        columns.push((format!("l{i:02}"), "LowCardinality(String)".into()));
    }
    let records = (0..n)
        .map(|id| {
            let mut s = format!(r#"{{"id":{id}"#);
            for i in 0..20 {
                s += &format!(r#","n{i:02}":{}"#, rng.below(4_000_000_000));
            }
            for i in 0..20 {
                let len = 24 + rng.below(16) as usize;
                s += &format!(r#","s{i:02}":"{}""#, rng.word(len));
            }
            for i in 0..10 {
                s += &format!(r#","f{i:02}":{:.4}"#, rng.below(10_000_000) as f64 / 7.0);
            }
            for i in 0..5 {
                s += &format!(r#","t{i:02}":"{}""#, timestamp(&mut rng));
            }
            for i in 0..4 {
                s += &format!(r#","l{i:02}":"{}""#, EVENTS[rng.below(5) as usize]);
            }
            s.push('}');
            s.into_bytes()
        })
        .collect();
    Workload {
        name: "wide",
        columns,
        records,
    }
}

/// Arrays, maps and tuples, nested.
fn nested(n: usize) -> Workload {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let records = (0..n)
        .map(|id| {
            let tags: Vec<String> = (0..rng.below(5))
                .map(|_| format!("\"{}\"", rng.word(5)))
                .collect();
            let scores: Vec<String> = (0..rng.below(6))
                .map(|_| format!("{:.3}", rng.below(100_000) as f64 / 1000.0))
                .collect();
            let attrs: Vec<String> = (0..1 + rng.below(4))
                .map(|i| format!("\"k{i}\":\"{}\"", rng.word(8)))
                .collect();
            let counters: Vec<String> = (0..rng.below(4))
                .map(|i| format!("\"c{i}\":{}", rng.below(1_000_000)))
                .collect();
            let matrix: Vec<String> = (0..rng.below(3))
                .map(|_| format!("[{},{}]", rng.below(1000), rng.below(1000)))
                .collect();
            format!(
                r#"{{"id":{id},"tags":[{}],"scores":[{}],"attrs":{{{}}},"counters":{{{}}},"point":[{:.4},{:.4}],"matrix":[{}],"meta":{{"source":"{}","version":{},"flags":[{}]}}}}"#,
                tags.join(","),
                scores.join(","),
                attrs.join(","),
                counters.join(","),
                rng.below(180_000) as f64 / 1000.0,
                rng.below(90_000) as f64 / 1000.0,
                matrix.join(","),
                rng.word(7),
                rng.below(100),
                tags.join(","),
            )
            .into_bytes()
        })
        .collect();
    Workload {
        name: "nested",
        columns: cols(&[
            ("id", "UInt64"),
            ("tags", "Array(String)"),
            ("scores", "Array(Float64)"),
            ("attrs", "Map(String, String)"),
            ("counters", "Map(String, UInt64)"),
            ("point", "Tuple(Float64, Float64)"),
            ("matrix", "Array(Array(UInt32))"),
            (
                "meta",
                "Tuple(source String, version UInt16, flags Array(String))",
            ),
        ]),
        records,
    }
}

const RECORDS: usize = 10_000;

/// The decoder of a route of `format` (with extra route keys) for `schema`.
fn decoder(schema: &TableSchema, route: &str) -> Box<dyn Decoder> {
    let toml = format!(
        "[kafka]\nbrokers = \"b\"\ngroup_id = \"g\"\n[clickhouse]\n[[routes]]\ntopics = [\"t\"]\ntable = \"{}\"\n{route}\n",
        schema.table
    );
    let config = match Config::parse(&toml) {
        Ok(c) => c,
        Err(e) => panic!("bench route: {e}"),
    };
    match decoder_for(&config.routes[0], schema, None) {
        Ok(d) => d,
        Err(e) => panic!("bench decoder: {e}"),
    }
}

fn json_decoder(schema: &TableSchema) -> Box<dyn Decoder> {
    decoder(schema, "")
}

fn decode_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_encode");
    for w in [narrow(RECORDS), wide(RECORDS), nested(RECORDS)] {
        let schema = w.schema();
        let mut decoder = json_decoder(&schema);
        let mut out = Vec::with_capacity(1 << 20);
        // Every record must decode: a benchmark of errors would be meaningless.
        for r in &w.records {
            out.clear();
            if let Err(e) = decoder.decode(&Record::value_only(Some(r)), &mut out) {
                panic!("{} record does not decode: {e:?}", w.name);
            }
        }
        eprintln!("{}: {} B of JSON per record", w.name, w.avg_bytes());
        group.throughput(Throughput::Elements(w.records.len() as u64));
        group.bench_function(w.name, |b| {
            b.iter(|| {
                out.clear();
                for r in &w.records {
                    let _ = decoder.decode(&Record::value_only(Some(r)), &mut out);
                }
                out.len()
            })
        });
    }
    group.finish();
}

const CONFIG: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "bench"
[clickhouse]
[[routes]]
topics = ["events"]
table = "narrow"
on_error = "skip"
"#;

/// A core with one route, topic `events` to table `narrow`, whose batch
/// never fills during one iteration.
fn core(schema: &TableSchema) -> Core {
    let config = match Config::parse(CONFIG) {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    };
    let (tx, _rx) = tokio::sync::mpsc::channel(2);
    let (_events_tx, events) = std_mpsc::channel();
    let route = RouteState::new(0, json_decoder(schema), &config.routes[0]);
    Core::new(
        Limits {
            max_rows: usize::MAX,
            max_bytes: usize::MAX,
            max_wait: Duration::from_secs(3600),
            commit_interval: Duration::from_secs(3600),
            max_buffered_bytes: usize::MAX,
            drain_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(3600),
        },
        vec![("events".to_string(), vec![0])],
        vec![route],
        vec![TableState::new(schema.to_string(), tx)],
        events,
        Shared::default(),
        Arc::new(Metrics::new()),
    )
}

fn batch_building(c: &mut Criterion) {
    let w = narrow(RECORDS);
    let schema = w.schema();
    let mut group = c.benchmark_group("batch_building");
    group.throughput(Throughput::Elements(w.records.len() as u64));
    group.bench_function("narrow_4_partitions", |b| {
        b.iter_batched(
            || core(&schema),
            |mut core| {
                for (i, r) in w.records.iter().enumerate() {
                    let rec = Record {
                        topic: "events",
                        partition: (i % 4) as i32,
                        offset: (i / 4) as i64,
                        timestamp_ms: Some(1_764_000_000_000),
                        key: None,
                        value: Some(r),
                        headers: None,
                    };
                    core.on_record(&rec);
                }
                core
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn offset_tracking(c: &mut Criterion) {
    const PARTITIONS: i32 = 1000;
    const BATCHES: i64 = 10;
    let mut group = c.benchmark_group("offset_tracking");
    // Per partition and batch: a record consumed, its offset held by a
    // batch, the batch acknowledged; then the commits of all partitions.
    group.throughput(Throughput::Elements((PARTITIONS as i64 * BATCHES) as u64));
    group.bench_function("1000_partitions", |b| {
        b.iter(|| {
            let mut t = OffsetTracker::default();
            let keys: Vec<PartitionKey> = (0..PARTITIONS)
                .map(|p| PartitionKey {
                    topic: (p % 3) as u32,
                    partition: p,
                })
                .collect();
            for k in &keys {
                t.assign(*k);
            }
            let mut commits = 0;
            for batch in 0..BATCHES {
                let segments: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        let g = t.consumed(*k, batch);
                        t.hold(*k, g, batch)
                    })
                    .collect();
                for s in &segments {
                    t.release(s);
                }
                commits += t.take_commits(None).len();
            }
            commits
        })
    });
    group.finish();
}

/// The narrow workload's records in every input format, decoded and encoded
/// by the route decoder of that format (the same code path as the bridge).
fn formats(c: &mut Criterion) {
    use apache_avro::types::Value as Av;
    use prost_reflect::prost::Message as _;
    use prost_reflect::{DynamicMessage, Value as P};

    let w = narrow(RECORDS);
    let schema = w.schema();
    let parsed: Vec<serde_json::Value> = w
        .records
        .iter()
        .map(|r| serde_json::from_slice(r).unwrap_or_default())
        .collect();
    let field = |v: &serde_json::Value, k: &str| v.get(k).cloned().unwrap_or_default();
    let text =
        |v: &serde_json::Value, k: &str| field(v, k).as_str().unwrap_or_default().to_string();
    let millis = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(&text(v, "ts")).map_or(0, |t| t.timestamp_millis())
    };
    let dir = std::env::temp_dir().join(format!("chbridge-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);

    let avsc = r#"{"type":"record","name":"Narrow","fields":[
        {"name":"id","type":"long"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"user_id","type":"int"},
        {"name":"event","type":"string"},
        {"name":"country","type":"string"},
        {"name":"amount","type":"double"},
        {"name":"tags","type":{"type":"array","items":"string"}},
        {"name":"ok","type":"boolean"}]}"#;
    let avro_schema = match apache_avro::Schema::parse_str(avsc) {
        Ok(s) => s,
        Err(e) => panic!("bench avro schema: {e}"),
    };
    let avsc_path = dir.join("narrow.avsc");
    let _ = std::fs::write(&avsc_path, avsc);
    let proto = "syntax = \"proto3\";\npackage b;\nimport \"google/protobuf/timestamp.proto\";\n\
        message Narrow { uint64 id = 1; google.protobuf.Timestamp ts = 2; uint32 user_id = 3; \
        string event = 4; string country = 5; double amount = 6; repeated string tags = 7; bool ok = 8; }\n";
    let _ = std::fs::write(dir.join("narrow.proto"), proto);
    let fds = match protox::compile([dir.join("narrow.proto")], [&dir]) {
        Ok(f) => f,
        Err(e) => panic!("bench proto: {e}"),
    };
    let desc_path = dir.join("narrow.pb");
    let _ = std::fs::write(&desc_path, fds.encode_to_vec());
    let pool = match prost_reflect::DescriptorPool::from_file_descriptor_set(fds) {
        Ok(p) => p,
        Err(e) => panic!("bench pool: {e}"),
    };
    let (Some(msg_desc), Some(ts_desc)) = (
        pool.get_message_by_name("b.Narrow"),
        pool.get_message_by_name("google.protobuf.Timestamp"),
    ) else {
        panic!("bench proto messages")
    };

    let tags = |v: &serde_json::Value| -> Vec<String> {
        field(v, "tags")
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| t.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let delimited = |v: &serde_json::Value, sep: char| -> Vec<u8> {
        let tags_json = field(v, "tags").to_string();
        let tags_cell = if sep == ',' {
            format!("\"{}\"", tags_json.replace('"', "\"\""))
        } else {
            tags_json
        };
        [
            field(v, "id").to_string(),
            text(v, "ts"),
            field(v, "user_id").to_string(),
            text(v, "event"),
            text(v, "country"),
            field(v, "amount").to_string(),
            tags_cell,
            field(v, "ok").to_string(),
        ]
        .join(&sep.to_string())
        .into_bytes()
    };
    let avro: Vec<Vec<u8>> = parsed
        .iter()
        .map(|v| {
            let rec = Av::Record(vec![
                (
                    "id".into(),
                    Av::Long(field(v, "id").as_i64().unwrap_or_default()),
                ),
                ("ts".into(), Av::TimestampMillis(millis(v))),
                (
                    "user_id".into(),
                    Av::Int(field(v, "user_id").as_i64().unwrap_or_default() as i32),
                ),
                ("event".into(), Av::String(text(v, "event"))),
                ("country".into(), Av::String(text(v, "country"))),
                (
                    "amount".into(),
                    Av::Double(field(v, "amount").as_f64().unwrap_or_default()),
                ),
                (
                    "tags".into(),
                    Av::Array(tags(v).into_iter().map(Av::String).collect()),
                ),
                (
                    "ok".into(),
                    Av::Boolean(field(v, "ok").as_bool().unwrap_or_default()),
                ),
            ]);
            apache_avro::to_avro_datum(&avro_schema, rec).unwrap_or_default()
        })
        .collect();
    let protobuf: Vec<Vec<u8>> = parsed
        .iter()
        .map(|v| {
            let mut m = DynamicMessage::new(msg_desc.clone());
            let ms = millis(v);
            let mut ts = DynamicMessage::new(ts_desc.clone());
            ts.set_field_by_name("seconds", P::I64(ms.div_euclid(1000)));
            ts.set_field_by_name("nanos", P::I32((ms.rem_euclid(1000) * 1_000_000) as i32));
            m.set_field_by_name("id", P::U64(field(v, "id").as_u64().unwrap_or_default()));
            m.set_field_by_name("ts", P::Message(ts));
            m.set_field_by_name(
                "user_id",
                P::U32(field(v, "user_id").as_u64().unwrap_or_default() as u32),
            );
            m.set_field_by_name("event", P::String(text(v, "event")));
            m.set_field_by_name("country", P::String(text(v, "country")));
            m.set_field_by_name(
                "amount",
                P::F64(field(v, "amount").as_f64().unwrap_or_default()),
            );
            m.set_field_by_name(
                "tags",
                P::List(tags(v).into_iter().map(P::String).collect()),
            );
            m.set_field_by_name("ok", P::Bool(field(v, "ok").as_bool().unwrap_or_default()));
            m.encode_to_vec()
        })
        .collect();
    let csv: Vec<Vec<u8>> = parsed.iter().map(|v| delimited(v, ',')).collect();
    let tsv: Vec<Vec<u8>> = parsed.iter().map(|v| delimited(v, '\t')).collect();
    let raw_schema = TableSchema::from_columns("bench", "raw", &[("line", "String")]);

    let cases: Vec<(&str, &TableSchema, String, &Vec<Vec<u8>>)> = vec![
        ("json", &schema, String::new(), &w.records),
        ("csv", &schema, "format = \"csv\"".into(), &csv),
        ("tsv", &schema, "format = \"tsv\"".into(), &tsv),
        ("raw", &raw_schema, "format = \"raw\"".into(), &w.records),
        (
            "avro",
            &schema,
            format!("format = \"avro\"\nschema_file = {avsc_path:?}"),
            &avro,
        ),
        (
            "protobuf",
            &schema,
            format!("format = \"protobuf\"\nschema_file = {desc_path:?}\nmessage = \"b.Narrow\""),
            &protobuf,
        ),
    ];
    let mut group = c.benchmark_group("formats");
    for (name, table, route, records) in cases {
        let mut d = decoder(table, &route);
        let mut out = Vec::with_capacity(1 << 20);
        for r in records {
            out.clear();
            if let Err(e) = d.decode(&Record::value_only(Some(r)), &mut out) {
                panic!("{name} record does not decode: {e:?}");
            }
        }
        let bytes = records.iter().map(Vec::len).sum::<usize>() / records.len();
        eprintln!("formats/{name}: {bytes} B per narrow record");
        group.throughput(Throughput::Elements(records.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                for r in records {
                    let _ = d.decode(&Record::value_only(Some(r)), &mut out);
                }
                out.len()
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    decode_encode,
    formats,
    batch_building,
    offset_tracking
);
criterion_main!(benches);
