//! Exactly-once mode: crashes at any point leave every record in its table
//! exactly once, on a plain MergeTree table without Keeper.

use std::thread;
use std::time::Duration;

use crate::common::*;

const PARTITIONS: i32 = 4;

/// The simple table with the deduplication window exactly-once needs.
const DEDUP_TABLE: &str = "(id UInt64, p UInt8, payload String) ENGINE = MergeTree ORDER BY id \
                           SETTINGS non_replicated_deduplication_window = 1000";

fn setup(name: &str, commit_interval: &str) -> (String, String, String, BridgeConfig) {
    let db = unique(&format!("it_{name}"));
    let topic = unique(name);
    let group = unique(&format!("g_{name}"));
    create_database(&db);
    ch(&format!("CREATE TABLE {db}.t {DEDUP_TABLE}"));
    create_topic(&topic, PARTITIONS);
    let mut cfg = BridgeConfig::new(
        &group,
        &db,
        &format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\n"),
    );
    cfg.extra = format!(
        "delivery = \"exactly-once\"\n[exactly_once]\nstate_table = \"{db}.state\"\n\
         [commit]\ninterval = \"{commit_interval}\"\n"
    );
    (db, topic, group, cfg)
}

/// With commits far apart, a crash leaves every landed batch uncommitted: an
/// at-least-once restart would insert all of them again. Exactly-once skips
/// what the recorded ranges cover and replays the last range with its token.
#[test]
fn a_crash_with_nothing_committed_duplicates_nothing() {
    let (db, topic, group, cfg) = setup("eos_nocommit", "1h");
    let prod = TestProducer::new();
    // Two batches or more per partition (batch.max_rows is 5000): the
    // restart skips the first and replays the last.
    produce_simple(&prod, &topic, PARTITIONS, 0, 40_000);
    prod.flush();
    let dir = test_dir(&db);
    let count = || ch_u64(&format!("SELECT count() FROM {db}.t"));
    let mut bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || count() == 40_000),
        "rows did not land; log:\n{}",
        bridge.log_text()
    );
    bridge.kill9();
    assert_eq!(
        committed(&group, &topic, PARTITIONS),
        vec![-1; PARTITIONS as usize],
        "nothing may be committed yet with a 1h commit interval"
    );
    let ranges = || {
        ch(&format!(
            "SELECT partition, argMax(first, (first, written)), argMax(last, (first, written)) \
             FROM {db}.state WHERE group = '{group}' GROUP BY partition ORDER BY partition FORMAT CSV"
        ))
    };
    let before = ranges();
    let bridge = Bridge::start(&cfg, &dir);
    // Everything is read again from the start...
    assert!(
        wait_until(Duration::from_secs(60), || bridge
            .metric("chbridge_records_consumed_total", "")
            >= 40_000.0),
        "restart did not read the records again; log:\n{}",
        bridge.log_text()
    );
    // ...the last recorded range of every partition is cut again and
    // inserted with its token (it was in: ClickHouse drops it), everything
    // below it is skipped...
    assert!(
        wait_until(Duration::from_secs(30), || bridge
            .metric("chbridge_exactly_once_replays_total", "")
            >= PARTITIONS as f64),
        "the recorded ranges were not replayed: {} replays; log:\n{}",
        bridge.metric("chbridge_exactly_once_replays_total", ""),
        bridge.log_text()
    );
    thread::sleep(Duration::from_secs(2));
    let log = bridge.log_text();
    assert_eq!(
        log.matches("replaying the last recorded batch with its token")
            .count(),
        PARTITIONS as usize,
        "{log}"
    );
    assert_eq!(
        log.matches("are in the table already and are skipped")
            .count(),
        PARTITIONS as usize,
        "{log}"
    );
    assert_eq!(
        ranges(),
        before,
        "the replays recorded the same ranges again"
    );
    // ...and nothing lands twice.
    assert_eq!(count(), 40_000, "log:\n{log}");
    // New records still flow.
    produce_simple(&prod, &topic, PARTITIONS, 40_000, 5_000);
    prod.flush();
    assert!(
        wait_until(Duration::from_secs(60), || count() >= 45_000),
        "new rows did not land; log:\n{}",
        bridge.log_text()
    );
    thread::sleep(Duration::from_secs(1));
    assert_eq!(count(), 45_000);
    assert_eq!(ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")), 45_000);
    // The state table holds the last range of every partition.
    assert_eq!(
        ch_u64(&format!(
            "SELECT uniqExact(partition) FROM {db}.state WHERE group = '{group}'"
        )),
        PARTITIONS as u64
    );
    drop(bridge);
    // After a deliberate offset reset the ranges must go: `state clear`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chbridge"))
        .args(["state", "clear", "--config"])
        .arg(write_config(&cfg, &dir))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("removed"), "{text}");
    assert_eq!(
        ch_u64(&format!(
            "SELECT count() FROM {db}.state WHERE group = '{group}'"
        )),
        0
    );
    drop_database(&db);
}

#[test]
fn repeated_kill_9_mid_stream_loses_and_duplicates_nothing() {
    let (db, topic, group, cfg) = setup("eos_kill9", "300ms");
    let dir = test_dir(&db);
    let total = 40_000u64;
    let producer = {
        let topic = topic.clone();
        thread::spawn(move || {
            let prod = TestProducer::new();
            for c in 0..40 {
                produce_simple(&prod, &topic, PARTITIONS, c * 1_000, 1_000);
                thread::sleep(Duration::from_millis(200));
            }
            prod.flush();
        })
    };
    let count = || ch_u64(&format!("SELECT count() FROM {db}.t"));
    let mut bridge = Bridge::start(&cfg, &dir);
    for at in [6_000, 14_000, 24_000] {
        assert!(
            wait_until(Duration::from_secs(60), || count() >= at),
            "stuck below {at} rows; log:\n{}",
            bridge.log_text()
        );
        bridge.kill9();
        bridge = Bridge::start(&cfg, &dir);
    }
    producer.join().unwrap();
    assert!(
        wait_until(Duration::from_secs(90), || committed(
            &group, &topic, PARTITIONS
        ) == vec![
            (total / PARTITIONS as u64)
                as i64;
            PARTITIONS as usize
        ]),
        "commits did not reach the ends: {:?}; log:\n{}",
        committed(&group, &topic, PARTITIONS),
        bridge.log_text()
    );
    assert_eq!(
        ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")),
        total,
        "lost rows"
    );
    assert_eq!(count(), total, "duplicated rows");
    drop(bridge);
    drop_database(&db);
}

/// The state table's SQL against the real server (the unit tests use an
/// in-memory store with the same rule): the latest range of each (table,
/// topic, partition) is the one with the highest `first`, the newest write
/// among equal ones (a range decoded again after a table change), per group;
/// `clear` forgets one topic or all.
#[test]
fn the_state_table_keeps_the_latest_range_of_every_partition() {
    use chbridge::exactly_once::{BatchRange, StateStore};
    let db = unique("it_state");
    create_database(&db);
    let client = clickhouse::Client::default()
        .with_url(format!("http://127.0.0.1:{}", ch_port()))
        .with_setting("async_insert", "0");
    let store = StateStore::new(client.clone(), (db.clone(), "state".into()), "g");
    let other = StateStore::new(client, (db.clone(), "state".into()), "h");
    let range = |topic: &str, partition, first, last| BatchRange {
        table: "db.t".into(),
        topic: topic.into(),
        partition,
        first,
        last,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        store.ensure().await.unwrap();
        store
            .record(&[range("a", 0, 0, 9), range("a", 1, 0, 4)])
            .await
            .unwrap();
        store.record(&[range("a", 0, 10, 19)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.record(&[range("a", 0, 10, 15)]).await.unwrap();
        store.record(&[range("b", 0, 3, 7)]).await.unwrap();
        other.record(&[range("a", 0, 100, 199)]).await.unwrap();
        let latest = store.latest(&["a".to_string()]).await.unwrap();
        let mut got: Vec<_> = latest
            .into_iter()
            .map(|(k, r)| (k, (r.first, r.last)))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (("db.t".to_string(), "a".to_string(), 0), (10, 15)),
                (("db.t".to_string(), "a".to_string(), 1), (0, 4)),
            ]
        );
        // How a refused range was split comes back with it, and only with it.
        let split = chbridge::exactly_once::Split {
            lo: 10,
            hi: 15,
            at: 12,
            single: true,
        };
        store
            .record_split(&range("a", 0, 10, 15), split)
            .await
            .unwrap();
        store
            .record_split(&range("a", 0, 10, 19), split)
            .await
            .unwrap();
        let latest = store.latest(&["a".to_string()]).await.unwrap();
        assert_eq!(
            latest[&("db.t".to_string(), "a".to_string(), 0)].splits,
            vec![split]
        );
        assert!(latest[&("db.t".to_string(), "a".to_string(), 1)]
            .splits
            .is_empty());
        assert_eq!(store.clear(Some("a")).await.unwrap(), 4);
        assert!(store.latest(&["a".to_string()]).await.unwrap().is_empty());
        assert_eq!(store.latest(&["b".to_string()]).await.unwrap().len(), 1);
        assert_eq!(other.latest(&["a".to_string()]).await.unwrap().len(), 1);
    });
    drop_database(&db);
}

#[test]
fn check_names_what_a_table_lacks_for_exactly_once() {
    let (db, _topic, _group, cfg) = setup("eos_check", "1s");
    ch(&format!(
        "CREATE TABLE {db}.plain (id UInt64) ENGINE = MergeTree ORDER BY id"
    ));
    let mut cfg = cfg;
    cfg.routes = cfg.routes.replace("table = \"t\"", "table = \"plain\"");
    let dir = test_dir(&db);
    let path = write_config(&cfg, &dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chbridge"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "ALTER TABLE {db}.plain MODIFY SETTING non_replicated_deduplication_window = 1000"
        )),
        "{text}"
    );
    // What the window must be, and why, from the configuration.
    assert!(
        text.contains(&format!(
            "exactly-once: {db}.plain must remember at least 300 insert tokens \
             (4 partitions x (ceil(22s session timeout and shutdown_timeout / 300ms batch.max_wait) + 1))"
        )),
        "{text}"
    );
    // `check` changes nothing: it says the state table will be created.
    assert!(text.contains("does not exist yet"), "{text}");
    assert_eq!(
        ch_u64(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'state'"
        )),
        0
    );
    // `run` refuses it too, before consuming anything.
    let mut bridge = Bridge::start(&cfg, &dir);
    let status = bridge.wait(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{}",
        bridge.log_text()
    );
    drop_database(&db);
}
