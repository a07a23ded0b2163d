//! Hostile input against every decoder, end to end through `decoder_for`
//! (format, mapping, conversion, encoding). No nightly toolchain is available
//! for `cargo fuzz`, so this is a property test over a generated corpus: for
//! each format, valid records mutated many ways (truncated, bits flipped,
//! bytes inserted, duplicated, replaced by random bytes) plus crafted
//! records that break each limit. The properties:
//! - no panic;
//! - a refused record leaves the batch as it was, and says why;
//! - an accepted record appends exactly one row that reads back as a row of
//!   the table (schema/drift.rs's reader, column by column, to the byte);
//! - limits refuse with kind `limit`.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{decoder_for, Decoder, RecordErrorKind};
use crate::config::{Config, RouteConfig};
use crate::kafka::Record;
use crate::schema::drift::split_row;
use crate::schema::TableSchema;

const COLUMNS: &[(&str, &str)] = &[
    ("id", "UInt64"),
    ("name", "String"),
    ("price", "Decimal(18, 4)"),
    ("ts", "DateTime64(3, 'UTC')"),
    ("tags", "Array(String)"),
    ("attrs", "Map(String, Int32)"),
    ("score", "Nullable(Float64)"),
    ("kind", "Enum8('a' = 1, 'b' = 2)"),
    ("inner_city", "String"),
];

/// Mutated records per format.
const MUTATIONS: usize = 20_000;

fn table() -> TableSchema {
    TableSchema::from_columns("db", "t", COLUMNS)
}

fn route(keys: &str) -> RouteConfig {
    let toml = format!(
        "[kafka]\nbrokers = \"b\"\ngroup_id = \"g\"\n[clickhouse]\n[[routes]]\ntopics = [\"t\"]\ntable = \"t\"\n{keys}\n"
    );
    match Config::parse(&toml) {
        Ok(c) => c.routes[0].clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Exactly one well-formed row of `t`: every cell reads with its type, nothing left over.
fn well_formed(t: &TableSchema, row: &[u8]) -> Result<(), String> {
    split_row(t.insert_columns(), row, &mut Vec::new())
}

fn mutate(r: &mut StdRng, valid: &[u8]) -> Vec<u8> {
    let mut v = valid.to_vec();
    match r.random_range(0..6) {
        0 => v.truncate(r.random_range(0..=v.len())),
        1 => {
            for _ in 0..r.random_range(1..4) {
                if !v.is_empty() {
                    let i = r.random_range(0..v.len());
                    v[i] ^= 1 << r.random_range(0..8);
                }
            }
        }
        2 => {
            let i = r.random_range(0..=v.len());
            let junk: Vec<u8> = (0..r.random_range(1..8)).map(|_| r.random()).collect();
            v.splice(i..i, junk);
        }
        3 => {
            if !v.is_empty() {
                let a = r.random_range(0..v.len());
                let b = r.random_range(a..=v.len());
                let piece = v[a..b].to_vec();
                v.splice(a..a, piece);
            }
        }
        4 => {
            // A byte set to a value that often means a length or a tag.
            if !v.is_empty() {
                let i = r.random_range(0..v.len());
                v[i] = [0x00, 0x7f, 0x80, 0xff, b'"', b'[', b'{', b'\\', b',', b'\t']
                    [r.random_range(0..10)];
            }
        }
        _ => v = (0..r.random_range(0..64)).map(|_| r.random()).collect(),
    }
    v
}

/// Runs the corpus through `decoder`; returns the refusals by kind.
fn run(
    name: &str,
    mut decoder: Box<dyn Decoder>,
    valid: &[Vec<u8>],
    seed: u64,
) -> BTreeMap<&'static str, usize> {
    let t = table();
    let mut r = StdRng::seed_from_u64(seed);
    let mut kinds = BTreeMap::new();
    let mut accepted = 0;
    for v in valid {
        let mut out = Vec::new();
        if let Err(e) = decoder.decode(&Record::value_only(Some(v)), &mut out) {
            panic!("{name}: a valid record was refused: {e}");
        }
        well_formed(&t, &out).unwrap_or_else(|e| panic!("{name}: valid record: {e}"));
    }
    for i in 0..MUTATIONS {
        let input = mutate(&mut r, &valid[i % valid.len()]);
        let mut out = vec![0xAB];
        match decoder.decode(&Record::value_only(Some(&input)), &mut out) {
            Ok(()) => {
                accepted += 1;
                if let Err(e) = well_formed(&t, &out[1..]) {
                    panic!("{name}: accepted {input:?} but wrote a broken row: {e}");
                }
            }
            Err(e) => {
                assert_eq!(out, [0xAB], "{name}: a refused record left bytes behind");
                assert!(!e.message.is_empty(), "{name}: a refusal without a reason");
                *kinds.entry(e.kind.as_str()).or_insert(0) += 1;
            }
        }
    }
    eprintln!("{name}: {accepted} of {MUTATIONS} mutations accepted, refused: {kinds:?}");
    kinds
}

fn json_records() -> Vec<Vec<u8>> {
    vec![
        br#"{"id":1,"name":"a\"b","price":"12.5","ts":"2024-01-31 12:00:00.123","tags":["x","y"],"attrs":{"k":1},"score":null,"kind":"a","inner":{"city":"Oslo"}}"#.to_vec(),
        br#"{"id":18446744073709551615,"name":"","price":-0.0001,"ts":1700000000.5,"tags":[],"attrs":{},"score":1e300,"kind":2}"#.to_vec(),
    ]
}

#[test]
fn json_plain_and_mapped() {
    let t = table();
    let kinds = run(
        "json",
        decoder_for(&route(""), &t, None).unwrap(),
        &json_records(),
        1,
    );
    assert!(kinds.contains_key("malformed"));
    let mapped = route("flatten = \"_\"\n[routes.columns]\nname = { meta = \"topic\" }");
    run(
        "json mapped",
        decoder_for(&mapped, &t, None).unwrap(),
        &json_records(),
        2,
    );
}

#[test]
fn csv_tsv_and_raw() {
    let t = table();
    let csv = vec![
        b"1,\"a,\"\"b\",12.5,2024-01-31 12:00:00.123,\"[\"\"x\"\"]\",\"{\"\"k\"\":1}\",,a,Oslo"
            .to_vec(),
        b"2,x,-3,1700000000,[],{},2.5,b,".to_vec(),
    ];
    run(
        "csv",
        decoder_for(&route("format = \"csv\""), &t, None).unwrap(),
        &csv,
        3,
    );
    let tsv = vec![
        b"1\ta\\tb\t12.5\t2024-01-31 12:00:00.123\t[\"x\"]\t{\"k\":1}\t\\N\ta\tOslo".to_vec(),
        b"2\tx\t-3\t1700000000\t[]\t{}\t2.5\tb\t".to_vec(),
    ];
    run(
        "tsv",
        decoder_for(&route("format = \"tsv\""), &t, None).unwrap(),
        &tsv,
        4,
    );
    let raw = vec![b"any bytes \xff\x00".to_vec()];
    let raw_route = route("format = \"raw\"\n[routes.columns]\nname = { meta = \"value\" }");
    let kinds = run("raw", decoder_for(&raw_route, &t, None).unwrap(), &raw, 5);
    assert!(
        kinds.keys().all(|k| *k == "empty"),
        "raw refuses nothing but no value: {kinds:?}"
    );
}

/// The Avro and Protobuf schemas the property test and the fuzz target share.
const AVSC: &str = include_str!("../../tests/data/decoders.avsc");

fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("chbridge-hostile-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn avro() {
    use apache_avro::types::Value as Av;
    let schema = apache_avro::Schema::parse_str(AVSC).unwrap();
    let datum = |id: i64, score: Option<f64>, tags: Vec<&str>| {
        let rec = Av::Record(vec![
            ("id".into(), Av::Long(id)),
            ("name".into(), Av::String(format!("n{id}"))),
            (
                "price".into(),
                Av::Decimal(apache_avro::Decimal::from(vec![0x01, 0xe2, 0x40])),
            ),
            ("ts".into(), Av::TimestampMillis(1_700_000_000_123)),
            (
                "tags".into(),
                Av::Array(tags.into_iter().map(|t| Av::String(t.into())).collect()),
            ),
            (
                "attrs".into(),
                Av::Map([("k".to_string(), Av::Int(1))].into_iter().collect()),
            ),
            (
                "score".into(),
                match score {
                    Some(s) => Av::Union(1, Box::new(Av::Double(s))),
                    None => Av::Union(0, Box::new(Av::Null)),
                },
            ),
            ("kind".into(), Av::Enum(1, "b".into())),
            (
                "inner".into(),
                Av::Record(vec![("city".into(), Av::String("Oslo".into()))]),
            ),
        ]);
        apache_avro::to_avro_datum(&schema, rec).unwrap()
    };
    let path = temp("row.avsc", AVSC.as_bytes());
    let r = route(&format!(
        "format = \"avro\"\nflatten = \"_\"\nschema_file = {path:?}"
    ));
    let valid = vec![datum(1, None, vec!["x"]), datum(5, Some(2.5), vec![])];
    let kinds = run("avro", decoder_for(&r, &table(), None).unwrap(), &valid, 6);
    assert!(kinds.contains_key("malformed"));
    std::fs::remove_file(path).unwrap();
}

const PROTO: &str = include_str!("../../tests/data/decoders.proto");

#[test]
fn protobuf() {
    use prost_reflect::prost::Message as _;
    use prost_reflect::{DynamicMessage, MapKey, Value as P};
    let dir = std::env::temp_dir().join(format!("chbridge-hostile-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("row.proto"), PROTO).unwrap();
    let fds = protox::compile([dir.join("row.proto")], [&dir]).unwrap();
    let set = temp("row.pb", &fds.encode_to_vec());
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(fds).unwrap();
    let row = pool.get_message_by_name("h.Row").unwrap();
    let msg = |id: u64, tags: Vec<&str>| {
        let mut m = DynamicMessage::new(row.clone());
        m.set_field_by_name("id", P::U64(id));
        m.set_field_by_name("name", P::String(format!("n{id}")));
        m.set_field_by_name("price", P::String("12.5".into()));
        let mut ts = DynamicMessage::new(
            pool.get_message_by_name("google.protobuf.Timestamp")
                .unwrap(),
        );
        ts.set_field_by_name("seconds", P::I64(1_700_000_000));
        ts.set_field_by_name("nanos", P::I32(123_000_000));
        m.set_field_by_name("ts", P::Message(ts));
        m.set_field_by_name(
            "tags",
            P::List(tags.into_iter().map(|t| P::String(t.into())).collect()),
        );
        m.set_field_by_name(
            "attrs",
            P::Map(
                [(MapKey::String("k".into()), P::I32(1))]
                    .into_iter()
                    .collect(),
            ),
        );
        m.set_field_by_name("kind", P::EnumNumber(2));
        let mut inner = DynamicMessage::new(pool.get_message_by_name("h.Row.Inner").unwrap());
        inner.set_field_by_name("city", P::String("Oslo".into()));
        m.set_field_by_name("inner", P::Message(inner));
        m.encode_to_vec()
    };
    let r = route(&format!(
        "format = \"protobuf\"\nflatten = \"_\"\nschema_file = {set:?}\nmessage = \"h.Row\""
    ));
    let valid = vec![msg(1, vec!["x", "y"]), msg(2, vec![])];
    let kinds = run(
        "protobuf",
        decoder_for(&r, &table(), None).unwrap(),
        &valid,
        7,
    );
    assert!(kinds.contains_key("malformed"));
    std::fs::remove_file(set).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn limits_refuse_with_kind_limit() {
    let t = table();
    let limited = route(
        "[routes.limits]\nmax_message_bytes = \"1KiB\"\nmax_depth = 3\nmax_array_len = 10\nmax_string_bytes = \"100B\"",
    );
    let mut d = decoder_for(&limited, &t, None).unwrap();
    let deep = format!("{{\"tags\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
    let cases: Vec<(String, Vec<u8>)> = vec![
        (
            "size".into(),
            format!("{{\"name\":\"{}\"}}", "x".repeat(2000)).into_bytes(),
        ),
        (
            "string".into(),
            format!("{{\"name\":\"{}\"}}", "x".repeat(200)).into_bytes(),
        ),
        (
            "array".into(),
            format!("{{\"tags\":[{}\"x\"]}}", "\"x\",".repeat(20)).into_bytes(),
        ),
        (
            "map".into(),
            format!(
                "{{\"attrs\":{{{}\"z\":1}}}}",
                (0..20).map(|i| format!("\"k{i}\":1,")).collect::<String>()
            )
            .into_bytes(),
        ),
    ];
    for (what, input) in cases {
        let mut out = Vec::new();
        let e = d
            .decode(&Record::value_only(Some(&input)), &mut out)
            .unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::Limit, "{what}: {e}");
        assert!(e.message.contains("limits."), "{what}: {e}");
        assert!(out.is_empty());
    }
    // Deeper than the limit, with room for it in size: refused, no stack overflow.
    let mut big = route("[routes.limits]\nmax_depth = 3");
    big.limits.max_message_bytes = bytesize::ByteSize::mib(1);
    let mut d = decoder_for(
        &big,
        &TableSchema::from_columns(
            "db",
            "t",
            &[("tags", "Array(Array(Array(Array(Array(String)))))")],
        ),
        None,
    )
    .unwrap();
    let e = d
        .decode(&Record::value_only(Some(deep.as_bytes())), &mut Vec::new())
        .unwrap_err();
    assert!(
        matches!(e.kind, RecordErrorKind::Limit | RecordErrorKind::Malformed),
        "{e}"
    );
    // Within the limits the same shapes are fine.
    let mut d = decoder_for(&route(""), &t, None).unwrap();
    let ok = br#"{"tags":["x","x","x"],"attrs":{"a":1}}"#;
    let mut out = Vec::new();
    d.decode(&Record::value_only(Some(ok)), &mut out).unwrap();
    well_formed(&t, &out).unwrap();
}
