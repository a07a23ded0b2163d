//! (d) Bad records are counted and handled per policy; good ones land.

use std::time::Duration;

use crate::common::*;

/// Malformed or unconvertible values for the simple table, one per kind.
const BAD: &[&[u8]] = &[
    b"not json at all",
    b"{\"id\": 1, \"p\": 0",
    b"[1, 2, 3]",
    b"",
    b"{\"id\": \"seven\", \"p\": 0, \"payload\": \"x\"}",
    b"{\"id\": 1, \"p\": 300, \"payload\": \"out of range for UInt8\"}",
    b"{\"id\": -5, \"p\": 0}",
];

#[test]
fn skip_policy_counts_bad_records_and_lands_every_good_one() {
    let (db, topic, group, cfg) = simple_setup("skip", 2, "on_error = \"skip\"");
    let prod = TestProducer::new();
    let good = 2_000u64;
    let mut bad_sent = 0u64;
    for id in 0..good {
        let p = (id % 2) as i32;
        prod.send(&topic, Some(p), id, &simple_record(id, p));
        if id % 100 == 50 {
            let bad = BAD[(bad_sent as usize) % BAD.len()];
            prod.send(&topic, Some(p), 1_000_000 + bad_sent, bad);
            bad_sent += 1;
        }
    }
    prod.flush();
    let dir = test_dir(&db);
    let bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || ch_u64(&format!(
            "SELECT count() FROM {db}.t"
        )) >= good),
        "good rows did not land; log:\n{}",
        bridge.log_text()
    );
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), good);
    assert_eq!(
        ch_u64(&format!(
            "SELECT uniqExact(id) FROM {db}.t WHERE id < {good}"
        )),
        good
    );
    assert_eq!(
        ch(&format!("SELECT payload FROM {db}.t WHERE id = 1234")),
        "record number 1234\n"
    );
    assert!(
        wait_until(Duration::from_secs(10), || bridge
            .metric("chbridge_records_failed_total", "")
            == bad_sent as f64),
        "failed metric {} != {bad_sent} bad records sent",
        bridge.metric("chbridge_records_failed_total", "")
    );
    assert_eq!(
        bridge.metric("chbridge_records_failed_total", "reason=\"conversion\""),
        (0..bad_sent).filter(|i| (4..7).contains(&(i % 7))).count() as f64,
        "conversion failures"
    );
    // Skipped records are committed past: the partitions are fully committed.
    let placement = prod.placement();
    let ends: Vec<i64> = (0..2)
        .map(|p| {
            placement
                .values()
                .filter(|(pp, _)| *pp == p)
                .map(|(_, o)| o + 1)
                .max()
                .unwrap_or(0)
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || committed(&group, &topic, 2)
            == ends),
        "committed {:?}, want the partition ends {ends:?}",
        committed(&group, &topic, 2)
    );
    let log = bridge.log_text();
    assert!(
        log.contains(&format!("topic=\"{topic}\"")) && log.contains("offset="),
        "log names where: {log}"
    );
    drop(bridge);
    drop_database(&db);
}

#[test]
fn stop_policy_stops_before_the_bad_record_and_commits_up_to_it() {
    let (db, topic, group, cfg) = simple_setup("stop", 1, "on_error = \"stop\"");
    let prod = TestProducer::new();
    for id in 0..100u64 {
        prod.send(&topic, Some(0), id, &simple_record(id, 0));
    }
    prod.send(&topic, Some(0), 999, br#"{"id": 100, "p": "zero"}"#);
    for id in 101..150u64 {
        prod.send(&topic, Some(0), id, &simple_record(id, 0));
    }
    prod.flush();
    let bad_offset = prod.placement()[&999].1;
    assert_eq!(bad_offset, 100);

    let dir = test_dir(&db);
    let mut bridge = Bridge::start(&cfg, &dir);
    let status = bridge
        .wait(Duration::from_secs(60))
        .expect("chbridge did not stop on the bad record");
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(2), "exit code; log:\n{log}");
    assert!(
        log.contains(&format!("record {topic}[0] at offset {bad_offset}"))
            && log.contains("column `p`"),
        "the error must say where and which column; log:\n{log}"
    );
    // Everything before the bad record landed and is committed; nothing after.
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), 100);
    assert_eq!(ch_u64(&format!("SELECT max(id) FROM {db}.t")), 99);
    assert_eq!(committed(&group, &topic, 1), vec![bad_offset]);
    drop_database(&db);
}

#[test]
fn a_batch_clickhouse_refuses_stops_the_bridge_without_committing_it() {
    let db = unique("it_refused");
    let topic = unique("refused");
    let group = unique("g_refused");
    create_database(&db);
    // The decoder cannot know this rule: ClickHouse refuses the whole batch (code 469).
    ch(&format!(
        "CREATE TABLE {db}.t (id UInt64, p UInt8, payload String, \
         CONSTRAINT small_ids CHECK id < 1000) ENGINE = MergeTree ORDER BY id"
    ));
    create_topic(&topic, 1);
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, 1, 0, 500);
    prod.flush();
    let cfg = BridgeConfig::new(
        &group,
        &db,
        &format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\n"),
    );
    let dir = test_dir(&db);
    let mut bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || committed(&group, &topic, 1)
            == vec![500]),
        "the good batch was not committed; log:\n{}",
        bridge.log_text()
    );
    produce_simple(&prod, &topic, 1, 500, 1000);
    prod.flush();
    let status = bridge
        .wait(Duration::from_secs(60))
        .expect("chbridge did not stop");
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(
        log.contains("ClickHouse refused a batch")
            && log.contains(&format!("{db}.t"))
            && log.contains("Code: 469")
            && log.contains(&format!("{topic}[0] from offset 500")),
        "the error must name the table, the cause and the records; log:\n{log}"
    );
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), 500);
    assert_eq!(
        committed(&group, &topic, 1),
        vec![500],
        "nothing of the refused batch is committed"
    );
    drop_database(&db);
}

/// A route that fails too often stops alone: its topic pauses with the commit
/// below the record that crossed the limit, while another topic goes on.
#[test]
fn a_route_over_its_failure_ratio_stops_alone() {
    let db = unique("it_ratio");
    let junk = unique("ratio_junk");
    let good = unique("ratio_good");
    let group = unique("g_ratio");
    create_database(&db);
    ch(&format!("CREATE TABLE {db}.t {SIMPLE_TABLE}"));
    ch(&format!("CREATE TABLE {db}.u {SIMPLE_TABLE}"));
    create_topic(&junk, 1);
    create_topic(&good, 1);
    let cfg = BridgeConfig::new(
        &group,
        &db,
        &format!(
            "[[routes]]\ntopics = [\"{junk}\"]\ntable = \"t\"\non_error = \"skip\"\n\
             [[routes]]\ntopics = [\"{good}\"]\ntable = \"u\"\n"
        ),
    );
    let prod = TestProducer::new();
    for id in 0..300 {
        prod.send(&junk, Some(0), id, b"<xml>not the format</xml>");
    }
    produce_simple(&prod, &good, 1, 0, 1_000);
    prod.flush();
    let dir = test_dir(&db);
    let mut bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || ch_u64(&format!(
            "SELECT count() FROM {db}.u"
        )) == 1_000),
        "the good topic did not land; log:\n{}",
        bridge.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(20), || committed(&group, &good, 1)
            == vec![1_000]),
        "good topic committed {:?}",
        committed(&group, &good, 1)
    );
    // All 300 fail: the limit trips at the 100th record (offset 99), which
    // is neither skipped nor committed.
    assert!(
        wait_until(Duration::from_secs(20), || committed(&group, &junk, 1)
            == vec![99]),
        "junk topic committed {:?}; log:\n{}",
        committed(&group, &junk, 1),
        bridge.log_text()
    );
    assert_eq!(bridge.metric("chbridge_route_stopped", "route=\"0\""), 1.0);
    assert!(bridge
        .log_text()
        .contains("more than max_failed_ratio = 0.5"));
    assert!(
        bridge.wait(Duration::from_secs(1)).is_none(),
        "the bridge keeps running"
    );
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), 0);
    drop_database(&db);
}

/// Item 9 of the delivery review: a broken materialized view makes
/// ClickHouse refuse every row, and splitting the batch to find "bad rows"
/// would insert the table's part once per split (ClickHouse writes the table
/// before its views) and dead-letter every record, with max_failed_ratio = 1
/// never failing the batch. The bridge must stop, name the view, dead-letter
/// nothing and commit nothing of the batch.
#[test]
fn a_broken_materialized_view_stops_the_bridge_instead_of_dead_lettering_every_row() {
    let db = unique("it_view");
    let topic = unique("view");
    let dlq = unique("view_dlq");
    let group = unique("g_view");
    create_database(&db);
    ch(&format!("CREATE TABLE {db}.t {SIMPLE_TABLE}"));
    ch(&format!(
        "CREATE TABLE {db}.agg (id UInt64) ENGINE = MergeTree ORDER BY id"
    ));
    ch(&format!(
        "CREATE MATERIALIZED VIEW {db}.mv TO {db}.agg AS \
         SELECT id + throwIf(id >= 0, 'the view is broken') AS id FROM {db}.t"
    ));
    create_topic(&topic, 1);
    create_topic(&dlq, 1);
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, 1, 0, 200);
    prod.flush();
    let cfg = BridgeConfig::new(
        &group,
        &db,
        &format!(
            "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\non_error = \"dead-letter\"\n\
             dead_letter_topic = \"{dlq}\"\nmax_failed_ratio = 1.0\n"
        ),
    );
    let dir = test_dir(&db);
    let mut bridge = Bridge::start(&cfg, &dir);
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "log:\n{log}");
    assert!(
        log.contains("while pushing to view") && log.contains("fix the view"),
        "the error must name the view; log:\n{log}"
    );
    assert!(
        committed(&group, &topic, 1)[0] <= 0,
        "committed past the batch: {:?}",
        committed(&group, &topic, 1)
    );
    // No split: the table holds each row at most once (ClickHouse kept the
    // first attempt's part), and the dead-letter topic holds nothing.
    assert!(
        ch_u64(&format!("SELECT count() FROM {db}.t")) <= 200,
        "the batch was split and its parts inserted again"
    );
    assert_eq!(
        ch_u64(&format!("SELECT count() - uniqExact(id) FROM {db}.t")),
        0
    );
    let c: rdkafka::consumer::BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    use rdkafka::consumer::Consumer;
    let (_, high) = c
        .fetch_watermarks(&dlq, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(high, 0, "rows were dead-lettered for the view's failure");
    drop_database(&db);
}
