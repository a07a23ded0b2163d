//! Target tables: their columns as ClickHouse reports them, which of them an
//! insert names, and how each is filled from a record.

pub mod drift;
pub mod encode;
pub mod types;

use std::fmt;

pub use types::ColumnType;

/// How ClickHouse computes a column when an insert does not give it a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultKind {
    /// No expression: the type's zero value (NULL for Nullable).
    None,
    Default,
    Materialized,
    Alias,
    Ephemeral,
}

impl DefaultKind {
    pub fn parse(s: &str) -> DefaultKind {
        match s {
            "DEFAULT" => DefaultKind::Default,
            "MATERIALIZED" => DefaultKind::Materialized,
            "ALIAS" => DefaultKind::Alias,
            "EPHEMERAL" => DefaultKind::Ephemeral,
            _ => DefaultKind::None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// ClickHouse's own spelling of the type, for messages.
    pub type_text: String,
    pub default_kind: DefaultKind,
    pub default_expression: String,
}

/// What happens to a column on insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// Filled from the record's field of the same name; when the field is
    /// missing, ClickHouse applies the column's default.
    Field,
    /// Computed by ClickHouse (MATERIALIZED or ALIAS); never sent.
    Computed,
    /// The record cannot fill it but the column has a DEFAULT expression: sent as "use default".
    DefaultOnly(String),
    /// Nothing can fill it: the reason says why.
    Unfillable(String),
}

/// What an insert sends for a column a record leaves out: "use the default"
/// when the column has a DEFAULT expression, for ClickHouse to evaluate it;
/// otherwise the type's default value itself, because RowBinaryWithDefaults
/// would store 0 in an Enum, which need not be one of its values.
#[derive(Debug, Clone)]
pub struct Missing(Option<Vec<u8>>);

impl Missing {
    /// Appends the column's flag and, when needed, its value.
    pub fn write(&self, out: &mut Vec<u8>) {
        match &self.0 {
            Some(value) => {
                out.push(0);
                out.extend_from_slice(value);
            }
            None => out.push(1),
        }
    }
}

impl Column {
    pub fn missing(&self) -> Missing {
        Missing(self.default_expression.is_empty().then(|| {
            let mut value = Vec::new();
            encode::write_zero(&self.ty, &mut value);
            value
        }))
    }

    pub fn fill(&self) -> Fill {
        match self.default_kind {
            DefaultKind::Materialized | DefaultKind::Alias => return Fill::Computed,
            _ => {}
        }
        if self.ty.is_supported() {
            return Fill::Field;
        }
        let why = format!("chbridge cannot write values of type {}", self.type_text);
        if self.default_kind == DefaultKind::Default {
            Fill::DefaultOnly(why)
        } else {
            Fill::Unfillable(format!(
                "{why} and the column has no DEFAULT expression; give it a DEFAULT, \
                 make it MATERIALIZED, or route to another table"
            ))
        }
    }

    /// True when the insert names this column.
    pub fn is_inserted(&self) -> bool {
        !matches!(self.fill(), Fill::Computed)
    }
}

/// A target table and its columns in table order.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub database: String,
    pub table: String,
    pub columns: Vec<Column>,
}

impl TableSchema {
    /// The columns an insert names, in the order rows are encoded.
    pub fn insert_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.is_inserted())
    }

    /// Problems that make the table impossible to fill, one line each.
    pub fn problems(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter_map(|c| match c.fill() {
                Fill::Unfillable(why) => Some(format!(
                    "table {self}: column `{}` cannot be filled: {why}",
                    c.name
                )),
                _ => None,
            })
            .collect()
    }

    /// The INSERT statement for RowBinaryWithDefaults rows. Columns are named so
    /// that a changed column order can never shift values.
    pub fn insert_sql(&self) -> String {
        let cols: Vec<String> = self
            .insert_columns()
            .map(|c| quote_ident(&c.name))
            .collect();
        // JSON columns travel as JSON text, which ClickHouse parses itself.
        let settings = if self
            .insert_columns()
            .any(|c| c.ty.contains(&|t| *t == ColumnType::Json))
        {
            " SETTINGS input_format_binary_read_json_as_string = 1"
        } else {
            ""
        };
        format!(
            "INSERT INTO {}.{} ({}){settings} FORMAT RowBinaryWithDefaults",
            quote_ident(&self.database),
            quote_ident(&self.table),
            cols.join(", ")
        )
    }
}

impl TableSchema {
    /// A table of plain columns (no DEFAULT expressions) given as (name,
    /// ClickHouse type), without asking a server: for tests and benchmarks.
    pub fn from_columns(database: &str, table: &str, cols: &[(&str, &str)]) -> TableSchema {
        TableSchema {
            database: database.into(),
            table: table.into(),
            columns: cols
                .iter()
                .map(|(n, t)| Column {
                    name: n.to_string(),
                    ty: ColumnType::parse(t),
                    type_text: t.to_string(),
                    default_kind: DefaultKind::None,
                    default_expression: String::new(),
                })
                .collect(),
        }
    }
}

impl fmt::Display for TableSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.database, self.table)
    }
}

/// Why `name` cannot be a column of a table, if it cannot: ClickHouse
/// refuses an empty name, and one with control characters could not be
/// written in the insert's column list.
pub fn column_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an empty name".into());
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Some(format!("it holds the control character {:?}", c));
    }
    None
}

/// `ALTER TABLE ... ADD COLUMN IF NOT EXISTS ...` for `columns` (name,
/// type): identifiers quoted, to be sent verbatim (`Client::query_raw`: a
/// `?` in a name is no bind placeholder).
pub fn add_columns_sql(table: &TableSchema, columns: &[(String, String)]) -> String {
    let clauses: Vec<String> = columns
        .iter()
        .map(|(name, ty)| format!("ADD COLUMN IF NOT EXISTS {} {ty}", quote_ident(name)))
        .collect();
    format!(
        "ALTER TABLE {}.{} {}",
        quote_ident(&table.database),
        quote_ident(&table.table),
        clauses.join(", ")
    )
}

/// Quotes an identifier with backticks, escaping backticks and backslashes.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
    out
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct SystemColumn {
    name: String,
    #[serde(rename = "type")]
    type_text: String,
    default_kind: String,
    default_expression: String,
}

/// Errors while reading a table's schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("table {database}.{table} does not exist: create it, or fix the route's `table`")]
    NoSuchTable { database: String, table: String },
    #[error(
        "could not read the schema of {database}.{table} from ClickHouse: {}",
        crate::sink::errors::classify(source).message
    )]
    ClickHouse {
        database: String,
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
}

/// Reads the columns of `database.table` from `system.columns`.
pub async fn load_table(
    client: &clickhouse::Client,
    database: &str,
    table: &str,
) -> Result<TableSchema, SchemaError> {
    let wrap = |source| SchemaError::ClickHouse {
        database: database.to_string(),
        table: table.to_string(),
        source,
    };
    let rows: Vec<SystemColumn> = client
        .query(
            "SELECT name, type, default_kind, default_expression FROM system.columns \
             WHERE database = ? AND table = ? ORDER BY position",
        )
        .bind(database)
        .bind(table)
        .fetch_all()
        .await
        .map_err(wrap)?;
    if rows.is_empty() {
        return Err(SchemaError::NoSuchTable {
            database: database.to_string(),
            table: table.to_string(),
        });
    }
    let columns = rows
        .into_iter()
        .map(|r| Column {
            ty: ColumnType::parse(&r.type_text),
            name: r.name,
            type_text: r.type_text,
            default_kind: DefaultKind::parse(&r.default_kind),
            default_expression: r.default_expression,
        })
        .collect();
    Ok(TableSchema {
        database: database.to_string(),
        table: table.to_string(),
        columns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str, kind: DefaultKind) -> Column {
        Column {
            name: name.into(),
            ty: ColumnType::parse(ty),
            type_text: ty.into(),
            default_kind: kind,
            default_expression: String::new(),
        }
    }

    #[test]
    fn insert_names_only_insertable_columns() {
        let t = TableSchema {
            database: "db".into(),
            table: "ev`ents".into(),
            columns: vec![
                col("id", "UInt64", DefaultKind::None),
                col("day", "Date", DefaultKind::Materialized),
                col("x", "AggregateFunction(uniq, UInt64)", DefaultKind::Default),
            ],
        };
        assert_eq!(
            t.insert_sql(),
            "INSERT INTO `db`.`ev\\`ents` (`id`, `x`) FORMAT RowBinaryWithDefaults"
        );
        assert!(t.problems().is_empty());
    }

    #[test]
    fn unsupported_column_without_default_is_a_problem_naming_it() {
        let t = TableSchema {
            database: "db".into(),
            table: "t".into(),
            columns: vec![col(
                "state",
                "AggregateFunction(uniq, UInt64)",
                DefaultKind::None,
            )],
        };
        let p = t.problems();
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("column `state`"), "{}", p[0]);
        assert!(p[0].contains("AggregateFunction(uniq, UInt64)"), "{}", p[0]);
    }
}
