//! Every record decoder under libFuzzer. The first byte picks the route
//! (plain JSON, mapped JSON, CSV, TSV, Avro, Protobuf), the rest is the
//! message value. Whatever the input: no panic, no unbounded allocation
//! (libFuzzer's -rss_limit_mb), a refusal leaves the batch as it was, and an
//! accepted record is exactly one well-formed row of the table.

#![no_main]

use std::sync::{Mutex, OnceLock};

use chbridge::config::Config;
use chbridge::decode::{decoder_for, Decoder};
use chbridge::kafka::Record;
use chbridge::schema::drift::split_row;
use chbridge::schema::TableSchema;
use libfuzzer_sys::fuzz_target;

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
    ("v", "Variant(String, UInt64, Array(Int32))"),
    ("d", "Dynamic"),
    ("t", "Tuple(x Int128, y LowCardinality(Nullable(String)))"),
];

/// The schemas src/decode/hostile.rs uses too.
const AVSC: &str = include_str!("../../tests/data/decoders.avsc");

const PROTO: &str = include_str!("../../tests/data/decoders.proto");

struct Setup {
    table: TableSchema,
    decoders: Vec<Box<dyn Decoder>>,
}

fn setup() -> Setup {
    let table = TableSchema::from_columns("db", "t", COLUMNS);
    let dir = std::env::temp_dir().join(format!("chbridge-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let avsc = dir.join("row.avsc");
    std::fs::write(&avsc, AVSC).expect("avsc");
    std::fs::write(dir.join("row.proto"), PROTO).expect("proto");
    let fds = protox::compile([dir.join("row.proto")], [&dir]).expect("compile proto");
    let desc = dir.join("row.pb");
    std::fs::write(&desc, prost_reflect::prost::Message::encode_to_vec(&fds)).expect("pb");
    let routes = [
        String::new(),
        "flatten = \"_\"\n[routes.columns]\nname = \"user.name\"\n".to_string(),
        "format = \"csv\"".to_string(),
        "format = \"tsv\"".to_string(),
        format!("format = \"avro\"\nflatten = \"_\"\nschema_file = {avsc:?}"),
        format!(
            "format = \"protobuf\"\nflatten = \"_\"\nschema_file = {desc:?}\nmessage = \"h.Row\""
        ),
    ];
    let decoders = routes
        .iter()
        .map(|keys| {
            let toml = format!(
                "[kafka]\nbrokers = \"b\"\ngroup_id = \"g\"\n[clickhouse]\n[[routes]]\ntopics = [\"t\"]\ntable = \"t\"\n{keys}\n[routes.limits]\nmax_message_bytes = \"64KiB\"\n"
            );
            let config = Config::parse(&toml).expect("route");
            decoder_for(&config.routes[0], &table, None).expect("decoder")
        })
        .collect();
    Setup { table, decoders }
}

/// Exactly one well-formed row of `t`: every cell reads with its type, nothing left over.
fn well_formed(t: &TableSchema, row: &[u8]) -> Result<(), String> {
    split_row(t.insert_columns(), row, &mut Vec::new())
}

static SETUP: OnceLock<Mutex<Setup>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((&which, value)) = data.split_first() else {
        return;
    };
    let mut s = SETUP
        .get_or_init(|| Mutex::new(setup()))
        .lock()
        .expect("setup");
    let s = &mut *s;
    let i = usize::from(which) % s.decoders.len();
    let mut out = vec![0xAB];
    match s.decoders[i].decode(&Record::value_only(Some(value)), &mut out) {
        Ok(()) => {
            if let Err(e) = well_formed(&s.table, &out[1..]) {
                panic!("decoder {i} accepted {value:?} but wrote a broken row: {e}");
            }
        }
        Err(e) => {
            assert_eq!(
                out,
                [0xAB],
                "decoder {i}: a refused record left bytes behind"
            );
            assert!(
                !e.message.is_empty(),
                "decoder {i}: a refusal without a reason"
            );
        }
    }
});
