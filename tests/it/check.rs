//! (e) `chbridge check` accepts a usable setup and fails clearly for a missing
//! table and for a column the input cannot fill.

use std::process::Command;

use crate::common::*;

fn run_check(cfg: &BridgeConfig, name: &str) -> (Option<i32>, String) {
    let config = write_config(cfg, &test_dir(name));
    let out = Command::new(env!("CARGO_BIN_EXE_chbridge"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run chbridge check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn check_reports_missing_tables_and_unfillable_columns() {
    let db = unique("it_check");
    let topic = unique("check");
    create_database(&db);
    create_topic(&topic, 2);
    ch(&format!(
        "CREATE TABLE {db}.good (id UInt64, name String, at DateTime DEFAULT now(), \
         day Date MATERIALIZED toDate(at)) ENGINE = MergeTree ORDER BY id"
    ));
    ch(&format!(
        "CREATE TABLE {db}.agg (id UInt64, state AggregateFunction(uniq, UInt64)) \
         ENGINE = AggregatingMergeTree ORDER BY id"
    ));
    let route = |table: &str| format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"{table}\"\n");

    let (code, out) = run_check(&BridgeConfig::new("g", &db, &route("good")), &db);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("topic {topic}: 2 partitions")),
        "{out}"
    );
    assert!(out.contains("<- field \"name\""), "{out}");
    assert!(out.contains("computed by ClickHouse"), "{out}");
    assert!(out.contains("check: OK"), "{out}");

    let (code, out) = run_check(&BridgeConfig::new("g", &db, &route("nope")), &db);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("table {db}.nope does not exist")),
        "{out}"
    );

    let (code, out) = run_check(&BridgeConfig::new("g", &db, &route("agg")), &db);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("column `state` cannot be filled")
            && out.contains("AggregateFunction(uniq, UInt64)"),
        "{out}"
    );

    let missing_topic = BridgeConfig::new(
        "g",
        &db,
        "[[routes]]\ntopics = [\"no_such_topic_x\"]\ntable = \"good\"\n",
    );
    let (code, out) = run_check(&missing_topic, &db);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("topic no_such_topic_x does not exist"),
        "{out}"
    );

    let mut bad_key = BridgeConfig::new("g", &db, &route("good"));
    bad_key.extra = "max_buffered_byte = \"1MiB\"".into();
    let (code, out) = run_check(&bad_key, &db);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("max_buffered_byte"), "{out}");

    // A mapping is checked as `run` builds it: a column the table lacks, a
    // constant that does not fit its column, a schema file that is not there.
    for (keys, says) in [
        (
            "[routes.columns]\nnope = \"a.b\"",
            "`nope`, which is not a column",
        ),
        (
            "[routes.columns]\nid = { const = \"x\" }",
            "the constant \"x\" is not a UInt64",
        ),
        (
            "format = \"avro\"\nschema_file = \"/nonexistent.avsc\"",
            "/nonexistent.avsc",
        ),
    ] {
        let (code, out) = run_check(
            &BridgeConfig::new("g", &db, &format!("{}{keys}\n", route("good"))),
            &db,
        );
        assert_eq!(code, Some(1), "{keys}: {out}");
        assert!(out.contains(says), "{keys}: {out}");
    }
    let mapped = format!("{}[routes.columns]\nname = \"user.name\"\n", route("good"));
    let (code, out) = run_check(&BridgeConfig::new("g", &db, &mapped), &db);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("name <- Path(\"user.name\")"), "{out}");

    // `run` refuses the unfillable table too, before consuming anything.
    let cfg = BridgeConfig::new(&unique("g_check"), &db, &route("agg"));
    let mut bridge = Bridge::start(&cfg, &test_dir(&db));
    let status = bridge
        .wait(std::time::Duration::from_secs(30))
        .expect("run did not refuse");
    assert_eq!(status.code(), Some(1), "{}", bridge.log_text());
    assert!(bridge
        .log_text()
        .contains("column `state` cannot be filled"));
    drop_database(&db);
}
