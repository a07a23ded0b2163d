//! (a) 100,000 JSON records over 4 partitions of 2 topics, routed to 2 tables
//! (one topic feeds both), land with exact counts and exact content: every row
//! is compared with what ClickHouse itself parses from the same JSON.

use std::time::{Duration, Instant};

use crate::common::*;

const PER_TOPIC: u64 = 50_000;
const PARTITIONS: i32 = 4;

const RICH_COLUMNS: &str = "(
    id UInt64,
    name String,
    score Float64,
    flag Bool,
    ts DateTime('UTC'),
    ts64 DateTime64(3, 'UTC'),
    uid UUID,
    tags Array(String),
    opt Nullable(Int32),
    lc LowCardinality(String),
    d Date,
    small Int8,
    note String DEFAULT 'none',
    pair Tuple(UInt8, String),
    point Tuple(x Int32, tags Array(String), m Map(String, UInt16)),
    day Date MATERIALIZED toDate(ts)
) ENGINE = MergeTree ORDER BY id";

/// A deterministic record exercising every spine type, a missing field with a
/// DEFAULT, a null, an escaped string and an unknown nested field.
pub fn rich_record(id: u64) -> String {
    let ms = 1_700_000_000_000i64 + id as i64 * 7;
    let ts64 = chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    let tags = match id % 3 {
        0 => "[]".to_string(),
        1 => r#"["a"]"#.to_string(),
        _ => r#"["b","c\"q"]"#.to_string(),
    };
    let opt = if id % 4 == 0 {
        "null".to_string()
    } else {
        ((id % 1000) as i64 - 500).to_string()
    };
    let note = if id % 5 == 0 {
        format!(r#","note":"n{id}""#)
    } else {
        String::new()
    };
    format!(
        r#"{{"id":{id},"pair":[{pair},"p{id}"],"point":{point},"name":"név {id}\ttab","score":{score},"flag":{flag},"ts":{ts},"ts64":"{ts64}","uid":"{id:08x}-0000-4000-8000-{uid:012x}","tags":{tags},"opt":{opt},"lc":"{lc}","d":"2024-01-{day:02}","small":{small},"extra":{{"ignored":[1,2]}}{note}}}"#,
        score = id as f64 * 0.25,
        flag = id % 2 == 0,
        ts = 1_700_000_000 + id,
        uid = id * 31,
        lc = ["x", "y", "z"][(id % 3) as usize],
        day = id % 28 + 1,
        small = (id % 256) as i64 - 128,
        pair = id % 200,
        // Named elements in any order; `m` missing on every third record.
        point = if id % 3 == 0 {
            format!(r#"{{"tags":["t{id}"],"x":-{id}}}"#)
        } else {
            format!(r#"{{"x":{id},"m":{{"k":{m}}},"tags":[]}}"#, m = id % 1000)
        },
    )
}

#[test]
fn hundred_thousand_records_to_two_tables_exact_content() {
    let db = unique("it_e2e");
    let (topic_a, topic_b) = (unique("e2e_a"), unique("e2e_b"));
    create_database(&db);
    for t in ["t_a", "t_all", "ref_a", "ref_all"] {
        ch(&format!("CREATE TABLE {db}.{t} {RICH_COLUMNS}"));
    }
    create_topic(&topic_a, PARTITIONS);
    create_topic(&topic_b, PARTITIONS);

    let prod = TestProducer::new();
    let mut lines_a = String::new();
    let mut lines_all = String::new();
    for id in 0..2 * PER_TOPIC {
        let rec = rich_record(id);
        let topic = if id < PER_TOPIC { &topic_a } else { &topic_b };
        prod.send(
            topic,
            Some((id % PARTITIONS as u64) as i32),
            id,
            rec.as_bytes(),
        );
        if id < PER_TOPIC {
            lines_a.push_str(&rec);
            lines_a.push('\n');
        }
        lines_all.push_str(&rec);
        lines_all.push('\n');
    }
    prod.flush();
    // ClickHouse's own parse of the same JSON is the reference.
    let settings =
        "SETTINGS date_time_input_format = 'best_effort', input_format_skip_unknown_fields = 1";
    ch(&format!(
        "INSERT INTO {db}.ref_a {settings} FORMAT JSONEachRow\n{lines_a}"
    ));
    ch(&format!(
        "INSERT INTO {db}.ref_all {settings} FORMAT JSONEachRow\n{lines_all}"
    ));

    let group = unique("g_e2e");
    let cfg = BridgeConfig::new(
        &group,
        &db,
        &format!(
            r#"
[[routes]]
topics = ["{topic_a}"]
table = "t_a"

[[routes]]
topics = ["{topic_a}", "{topic_b}"]
table = "t_all"
"#
        ),
    );
    let dir = test_dir(&db);
    let started = Instant::now();
    let bridge = Bridge::start(&cfg, &dir);
    let total = 2 * PER_TOPIC;
    assert!(
        wait_until(Duration::from_secs(180), || ch_u64(&format!(
            "SELECT count() FROM {db}.t_all"
        )) >= total
            && ch_u64(&format!("SELECT count() FROM {db}.t_a")) >= PER_TOPIC),
        "rows did not arrive; log:\n{}",
        bridge.log_text()
    );
    eprintln!(
        "e2e: {} rows into 2 tables in {:.1}s",
        total + PER_TOPIC,
        started.elapsed().as_secs_f64()
    );

    for (t, r, n) in [("t_a", "ref_a", PER_TOPIC), ("t_all", "ref_all", total)] {
        assert_eq!(
            ch_u64(&format!("SELECT count() FROM {db}.{t}")),
            n,
            "{t} count"
        );
        assert_eq!(
            ch_u64(&format!("SELECT uniqExact(id) FROM {db}.{t}")),
            n,
            "{t} ids"
        );
        let diff = |x: &str, y: &str| {
            ch_u64(&format!(
                "SELECT count() FROM (SELECT * FROM {db}.{x} EXCEPT SELECT * FROM {db}.{y})"
            ))
        };
        assert_eq!(
            diff(t, r),
            0,
            "{t} has rows that differ from ClickHouse's own parse"
        );
        assert_eq!(diff(r, t), 0, "{t} lacks rows of ClickHouse's own parse");
    }
    // A few values checked literally, so that a shared mistake cannot hide.
    assert_eq!(
        ch(&format!(
            "SELECT * FROM {db}.t_all WHERE id = 10 FORMAT TSV"
        )),
        "10\tnév 10\\ttab\t2.5\ttrue\t2023-11-14 22:13:30\t2023-11-14 22:13:20.070\t\
         0000000a-0000-4000-8000-000000000136\t['a']\t-490\ty\t2024-01-11\t-118\tn10\t\
         (10,'p10')\t(10,[],{'k':10})\n"
    );
    assert_eq!(
        ch(&format!(
            "SELECT tags, opt FROM {db}.t_all WHERE id = 11 FORMAT TSV"
        )),
        "['b','c\"q']\t-489\n"
    );
    assert_eq!(
        ch(&format!(
            "SELECT opt, note, day FROM {db}.t_all WHERE id = 7 FORMAT TSV"
        )),
        "-493\tnone\t2023-11-14\n"
    );

    // Every record is committed once its rows are in both tables.
    for topic in [&topic_a, &topic_b] {
        let per_partition = PER_TOPIC as i64 / PARTITIONS as i64;
        assert!(
            wait_until(Duration::from_secs(15), || committed(
                &group, topic, PARTITIONS
            )
            .iter()
            .all(|&o| o == per_partition)),
            "committed offsets of {topic}: {:?}, want {per_partition} each",
            committed(&group, topic, PARTITIONS)
        );
    }
    // The metrics show the same: committed offsets and zero lag per partition.
    for topic in [&topic_a, &topic_b] {
        let filter = format!("topic=\"{topic}\"");
        assert!(
            wait_until(Duration::from_secs(15), || bridge
                .metric("chbridge_committed_offset", &filter)
                == PER_TOPIC as f64
                && bridge.metric("chbridge_consumer_lag", &filter) == 0.0
                && bridge.metric("chbridge_high_watermark_offset", &filter)
                    == PER_TOPIC as f64),
            "metrics of {topic}: committed {}, lag {}, high watermark {}",
            bridge.metric("chbridge_committed_offset", &filter),
            bridge.metric("chbridge_consumer_lag", &filter),
            bridge.metric("chbridge_high_watermark_offset", &filter)
        );
    }
    assert_eq!(
        bridge.metric("chbridge_rows_inserted_total", ""),
        (total + PER_TOPIC) as f64
    );
    let consumed = bridge.metric("chbridge_records_consumed_total", "");
    assert_eq!(consumed, total as f64, "records consumed metric");
    drop(bridge);
    drop_database(&db);
}
