//! A route's mapping from a record to the columns of its table: which field
//! (a path into nested records), constant or piece of Kafka metadata fills
//! each column, and what happens to fields no column takes.
//!
//! Every format but plain JSON comes through here: the format hands over the
//! record's top-level fields (parsed JSON values, an Avro or Protobuf record,
//! CSV cells), and [`Mapping::write_row`] writes one RowBinaryWithDefaults row.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;

use super::value::{write_value, Value};
use super::{Meta, RecordError, RecordErrorKind, UnknownFields};
use crate::schema::{ColumnType, Fill, TableSchema};

/// Where a column's value comes from, as written in `[routes.columns]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ColumnSource {
    /// `col = "a.b.c"`: a field, nested fields separated by dots.
    Path(String),
    /// `col = { field = ["a.b", "c"] }`: a path whose names contain dots.
    Field { field: Vec<String> },
    /// `col = { const = "web" }`: the same value in every row.
    Const {
        #[serde(rename = "const")]
        value: toml::Value,
    },
    /// `col = { meta = "timestamp" }`: topic, partition, offset, timestamp, key or value.
    Meta { meta: MetaField },
    /// `col = { header = "trace-id" }`: a Kafka header's value.
    Header { header: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetaField {
    Topic,
    Partition,
    Offset,
    /// The record's timestamp (milliseconds since the epoch).
    Timestamp,
    Key,
    /// The whole message value, undecoded.
    Value,
}

/// How one inserted column is filled.
#[derive(Debug, Clone)]
enum Fill1 {
    /// A path of field names into the record.
    Path(Vec<String>),
    /// Encoded once.
    Const(Vec<u8>),
    Meta(MetaField),
    Header(String),
    /// Nothing fills it: the column's default.
    Nothing,
}

struct MappedColumn {
    name: String,
    ty: ColumnType,
    fill: Fill1,
    /// What a missing value becomes (see json.rs: explicit zero without a DEFAULT expression).
    missing: crate::schema::Missing,
}

/// A route's mapping for one table.
pub struct Mapping {
    columns: Vec<MappedColumn>,
    unknown: UnknownFields,
    /// `flatten = "_"`: a column `a_b` without a source takes field `b` of object `a`.
    flatten: Option<String>,
}

/// The top-level fields of one record, as a format hands them over.
pub trait Fields<'a> {
    /// The value at `path` (one name per level), or None when absent.
    /// Borrowed when the format holds it already (a decoded record), so that
    /// no subtree is copied per column.
    fn get(&self, path: &[String]) -> Option<Cow<'_, Value<'a>>>;
    /// Every top-level field name, for `unknown_fields = "error"`.
    fn names(&self) -> Vec<Cow<'_, str>>;
}

impl Mapping {
    /// Builds the mapping of `table` for a route's `[routes.columns]` and
    /// `flatten`. An error names the column and what is wrong with its source.
    pub fn new(
        table: &TableSchema,
        sources: &BTreeMap<String, ColumnSource>,
        unknown: UnknownFields,
        flatten: Option<String>,
    ) -> Result<Mapping, String> {
        for name in sources.keys() {
            match table.columns.iter().find(|c| &c.name == name) {
                None => {
                    return Err(format!(
                        "routes.columns names `{name}`, which is not a column of {table}"
                    ))
                }
                Some(c) if !c.is_inserted() => {
                    return Err(format!(
                    "routes.columns names `{name}`, which ClickHouse computes ({:?}): remove it",
                    c.default_kind
                ))
                }
                Some(_) => {}
            }
        }
        let mut columns = Vec::new();
        for c in table.insert_columns() {
            let fill = match sources.get(&c.name) {
                _ if c.fill() != Fill::Field => Fill1::Nothing,
                None => Fill1::Path(vec![c.name.clone()]),
                Some(ColumnSource::Path(p)) => {
                    Fill1::Path(p.split('.').map(str::to_string).collect())
                }
                Some(ColumnSource::Field { field }) if !field.is_empty() => {
                    Fill1::Path(field.clone())
                }
                Some(ColumnSource::Field { .. }) => {
                    return Err(format!("routes.columns.{}: `field` is empty", c.name))
                }
                Some(ColumnSource::Const { value }) => {
                    let json = serde_json::to_string(value).map_err(|e| e.to_string())?;
                    let mut bytes = Vec::new();
                    super::json::convert_json(&c.ty, &json, &mut bytes).map_err(|e| {
                        format!(
                            "routes.columns.{}: the constant {json} is not a {}: {e}",
                            c.name, c.type_text
                        )
                    })?;
                    Fill1::Const(bytes)
                }
                Some(ColumnSource::Meta { meta }) => Fill1::Meta(*meta),
                Some(ColumnSource::Header { header }) => Fill1::Header(header.clone()),
            };
            let missing = c.missing();
            columns.push(MappedColumn {
                name: c.name.clone(),
                ty: c.ty.clone(),
                fill,
                missing,
            });
        }
        Ok(Mapping {
            columns,
            unknown,
            flatten: flatten.filter(|s| !s.is_empty()),
        })
    }

    /// True when every column is filled from the top-level field of its own
    /// name: the plain JSON decoder then does the whole job faster.
    pub fn is_plain(&self) -> bool {
        self.flatten.is_none()
            && self.columns.iter().all(|c| match &c.fill {
                Fill1::Path(p) => p.len() == 1 && p[0] == c.name,
                Fill1::Nothing => true,
                _ => false,
            })
    }

    /// The field names (first level) that some column reads.
    fn used(&self, name: &str) -> bool {
        self.columns.iter().any(|c| match &c.fill {
            Fill1::Path(p) => p[0] == name,
            _ => false,
        }) || self.flatten.as_deref().is_some_and(|sep| {
            self.columns
                .iter()
                .any(|c| c.name.starts_with(&format!("{name}{sep}")))
        })
    }

    /// Appends one row, or returns why the record cannot be one (leaving `out` as it was).
    pub fn write_row<'a>(
        &self,
        fields: &dyn Fields<'a>,
        value: Option<&[u8]>,
        meta: &Meta<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if self.unknown == UnknownFields::Error {
            if let Some(name) = fields.names().into_iter().find(|n| !self.used(n)) {
                return Err(RecordError {
                    kind: RecordErrorKind::UnknownField,
                    column: None,
                    message: format!(
                        "unknown field `{name}` matches no column (unknown_fields = \"error\")"
                    ),
                });
            }
        }
        let start = out.len();
        for c in &self.columns {
            let v = match &c.fill {
                Fill1::Const(bytes) => {
                    out.push(0);
                    out.extend_from_slice(bytes);
                    continue;
                }
                Fill1::Nothing => None,
                Fill1::Path(path) => fields.get(path).or_else(|| {
                    // `flatten`: the column's own name taken apart at the separator.
                    let sep = self.flatten.as_deref()?;
                    (path.len() == 1 && path[0] == c.name)
                        .then(|| flattened(fields, &c.name, sep))
                        .flatten()
                }),
                Fill1::Meta(m) => meta_value(*m, value, meta).map(Cow::Owned),
                Fill1::Header(h) => meta
                    .header(h)
                    .map(|b| Cow::Owned(Value::Bytes(Cow::Owned(b.to_vec())))),
            };
            // A null (JSON's `null` text too) in a non-Nullable column is a missing value.
            let null = v.as_deref().is_some_and(|v| match v {
                Value::Null => true,
                Value::Json(t) => t.trim() == "null",
                _ => false,
            });
            let v = if null && !c.ty.is_nullable() { None } else { v };
            match v {
                None => c.missing.write(out),
                Some(v) => {
                    out.push(0);
                    if let Err(e) = write_value(&c.ty, &v, out) {
                        out.truncate(start);
                        return Err(RecordError {
                            kind: RecordErrorKind::Conversion,
                            column: Some(c.name.clone()),
                            message: e.0,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// `a_b_c` with separator `_`: field `a_b_c`, or `b_c` (recursively) inside
/// object `a`, or `c` inside `a_b`.
fn flattened<'f, 'a>(
    fields: &'f dyn Fields<'a>,
    name: &str,
    sep: &str,
) -> Option<Cow<'f, Value<'a>>> {
    let mut path: Vec<String> = Vec::new();
    fn walk<'f, 'a>(
        fields: &'f dyn Fields<'a>,
        path: &mut Vec<String>,
        rest: &str,
        sep: &str,
    ) -> Option<Cow<'f, Value<'a>>> {
        path.push(rest.to_string());
        if let Some(v) = fields.get(path) {
            return Some(v);
        }
        path.pop();
        for (i, _) in rest.match_indices(sep) {
            path.push(rest[..i].to_string());
            if let Some(v) = walk(fields, path, &rest[i + sep.len()..], sep) {
                return Some(v);
            }
            path.pop();
        }
        None
    }
    walk(fields, &mut path, name, sep)
}

fn meta_value<'a>(m: MetaField, value: Option<&[u8]>, meta: &Meta<'_>) -> Option<Value<'a>> {
    Some(match m {
        MetaField::Topic => Value::Str(Cow::Owned(meta.topic.to_string())),
        MetaField::Partition => Value::Int(i128::from(meta.partition)),
        MetaField::Offset => Value::Int(i128::from(meta.offset)),
        MetaField::Timestamp => Value::Timestamp(i128::from(meta.timestamp_ms?) * 1_000_000),
        MetaField::Key => Value::Bytes(Cow::Owned(meta.key?.to_vec())),
        MetaField::Value => Value::Bytes(Cow::Owned(value?.to_vec())),
    })
}

/// A decoded record (Avro, Protobuf) as fields.
impl<'a> Fields<'a> for Value<'a> {
    fn get(&self, path: &[String]) -> Option<Cow<'_, Value<'a>>> {
        let mut cur = self;
        for name in path {
            let Value::Record(fields) = cur else {
                return None;
            };
            cur = &fields.iter().find(|(n, _)| n == name)?.1;
        }
        Some(Cow::Borrowed(cur))
    }

    fn names(&self) -> Vec<Cow<'_, str>> {
        match self {
            Value::Record(fields) => fields.iter().map(|(n, _)| Cow::Borrowed(&**n)).collect(),
            _ => Vec::new(),
        }
    }
}
