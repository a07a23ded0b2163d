//! `chbridge check`: validates the configuration against the real servers and
//! says, column by column, how each target table will be filled.

use std::fmt::Write as _;
use std::time::Duration;

use rdkafka::consumer::Consumer;

use crate::kafka::refusal;

use crate::config::{Config, Delivery};
use crate::exactly_once::{self, StateStore};
use crate::schema::{Fill, TableSchema};
use crate::sink;

/// The report to print, and whether everything is usable.
pub struct Report {
    pub text: String,
    pub problems: Vec<String>,
}

pub async fn check(config: &Config) -> Report {
    let mut text = String::new();
    let mut problems = Vec::new();
    let mut partitions = std::collections::HashMap::new();

    // Kafka: reachable, and every topic exists.
    let kafka = crate::kafka::client_config(&config.kafka);
    match refusal::watched(&kafka, &config.kafka) {
        Err(e) => problems.push(format!("kafka: cannot create a client: {e}")),
        Ok(consumer) => {
            let topics = config.topics();
            let found = tokio::task::spawn_blocking(move || {
                let found = topics
                    .into_iter()
                    .map(|t| {
                        let r = consumer
                            .fetch_metadata(Some(&t), Duration::from_secs(10))
                            .map(|m| {
                                m.topics()
                                    .first()
                                    .map(|mt| (mt.partitions().len(), mt.error().is_some()))
                            });
                        (t, r)
                    })
                    .collect::<Vec<_>>();
                let refused = found
                    .iter()
                    .any(|(_, r)| r.is_err())
                    .then(|| refusal::refused(&consumer))
                    .flatten();
                (found, refused)
            })
            .await;
            match found {
                Err(e) => problems.push(format!("kafka: metadata lookup failed: {e}")),
                Ok((_, Some(refused))) => problems.push(format!("kafka: {refused}")),
                Ok((list, None)) => {
                    let _ = writeln!(text, "kafka: {}", config.kafka.brokers);
                    for (topic, r) in list {
                        match r {
                            Ok(Some((n, false))) if n > 0 => {
                                let _ = writeln!(text, "  topic {topic}: {n} partitions");
                                partitions.insert(topic, n);
                            }
                            Ok(_) => problems.push(format!(
                                "kafka: topic {topic} does not exist on {}: create it (with the \
                                 partition count you want to scale to) or fix the route's `topics`",
                                config.kafka.brokers
                            )),
                            Err(e) => problems.push(format!(
                                "kafka: cannot reach {} to look up topic {topic}: {e}",
                                config.kafka.brokers
                            )),
                        }
                    }
                }
            }
        }
    }

    // ClickHouse: reachable, every table exists and can be filled.
    let client = sink::client(&config.clickhouse);
    let reached = match &client {
        Ok(client) => client
            .query("SELECT version()")
            .fetch_one::<String>()
            .await
            .map(|version| (version, client))
            .map_err(|e| sink::errors::classify(&e).message),
        Err(e) => Err(e.clone()),
    };
    match reached {
        Err(e) => problems.push(format!(
            "clickhouse: cannot query {} as user {}: {e}",
            config.clickhouse.url, config.clickhouse.user,
        )),
        Ok((version, client)) => {
            let _ = writeln!(
                text,
                "clickhouse: {} (version {version}), user {}",
                config.clickhouse.url, config.clickhouse.user
            );
            for i in 0..config.routes.len() {
                let (db, t) = config.route_table(i);
                let r = &config.routes[i];
                let _ = writeln!(
                    text,
                    "route {i}: {:?} -> {db}.{t} (format {:?}, unknown_fields {:?}, on_error {:?})",
                    r.topics, r.format, r.unknown_fields, r.on_error
                );
                match crate::schema::load_table(client, &db, &t).await {
                    Err(e) => problems.push(format!("routes[{i}]: {e}")),
                    Ok(schema) => {
                        describe_columns(&schema, &mut text);
                        for (column, source) in &r.columns {
                            let _ = writeln!(text, "  {column} <- {source:?}");
                        }
                        problems.extend(schema.problems());
                        // The route's format, mapping and schema files, as `run` builds them.
                        match crate::pipeline::registry(config) {
                            Err(e) => problems.push(e.to_string()),
                            Ok(registry) => {
                                if let Err(e) =
                                    crate::decode::decoder_for(r, &schema, registry.as_ref())
                                {
                                    problems.push(format!("routes[{i}]: {e}"));
                                }
                            }
                        }
                    }
                }
            }
            if config.delivery == Delivery::ExactlyOnce {
                check_exactly_once(config, client, &partitions, &mut text, &mut problems).await;
            }
        }
    }
    Report { text, problems }
}

/// Exactly-once: the target tables deduplicate inserts, and the state table
/// exists or can be created.
async fn check_exactly_once(
    config: &Config,
    client: &clickhouse::Client,
    partitions: &std::collections::HashMap<String, usize>,
    text: &mut String,
    problems: &mut Vec<String>,
) {
    let mut tables: Vec<(String, String, exactly_once::DedupNeeds)> = Vec::new();
    for i in 0..config.routes.len() {
        let (db, t) = config.route_table(i);
        if tables.iter().any(|(d, n, _)| *d == db && *n == t) {
            continue;
        }
        let needs = exactly_once::DedupNeeds::of(
            config,
            exactly_once::partitions_into(config, &db, &t, partitions),
        );
        let _ = writeln!(
            text,
            "exactly-once: {db}.{t} must remember at least {} insert tokens ({})",
            needs.window(),
            needs.explain()
        );
        tables.push((db, t, needs));
    }
    match exactly_once::table_problems(client, &tables).await {
        Ok(p) if p.is_empty() => {
            let _ = writeln!(
                text,
                "exactly-once: every target table deduplicates inserts for that long, \
                 and every batch is one insert block"
            );
        }
        Ok(p) => problems.extend(p),
        Err(e) => problems.push(format!(
            "exactly-once: cannot read the tables' engines: {e}"
        )),
    }
    // `check` changes nothing: it only says whether `run` will find or create the table.
    let store = StateStore::new(client.clone(), config.state_table(), &config.kafka.group_id);
    let (db, table) = config.state_table();
    let exists = client
        .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
        .bind(&db)
        .bind(&table)
        .fetch_one::<u64>()
        .await;
    match exists {
        Ok(1) => {
            let _ = writeln!(text, "exactly-once: state table {} exists", store.name());
        }
        Ok(_) => {
            let _ = writeln!(
                text,
                "exactly-once: state table {} does not exist yet; `chbridge run` creates it \
                 and {} (it needs CREATE TABLE on {db}), or create them yourself:\n  {}\n  {}",
                store.name(),
                store.splits_name(),
                store.create_sql(),
                store.create_splits_sql()
            );
        }
        Err(e) => problems.push(format!(
            "exactly-once: cannot look up the state table {}: {}",
            store.name(),
            crate::sink::errors::classify(&e).message
        )),
    }
}

fn describe_columns(schema: &TableSchema, out: &mut String) {
    let width = schema
        .columns
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let twidth = schema
        .columns
        .iter()
        .map(|c| c.type_text.len())
        .max()
        .unwrap_or(0);
    for c in &schema.columns {
        let how = match c.fill() {
            Fill::Field => {
                let dflt = if c.default_expression.is_empty() {
                    if c.ty.is_nullable() {
                        "NULL".to_string()
                    } else {
                        "type default".to_string()
                    }
                } else {
                    c.default_expression.clone()
                };
                format!("<- field \"{}\" (missing: {dflt})", c.name)
            }
            Fill::Computed => "computed by ClickHouse, not sent".to_string(),
            Fill::DefaultOnly(why) => format!("always DEFAULT {} ({why})", c.default_expression),
            Fill::Unfillable(why) => format!("CANNOT BE FILLED: {why}"),
        };
        let _ = writeln!(out, "  {:width$}  {:twidth$}  {how}", c.name, c.type_text);
    }
}
