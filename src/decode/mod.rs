//! Record decoding: from a Kafka message value to one encoded row of a target
//! table. One file per input format; each implements [`Decoder`].

pub mod avro;
#[cfg(test)]
mod hostile;
pub mod json;
pub mod mapping;
pub mod protobuf;
pub mod registry;
pub mod text;
pub mod value;

use std::fmt;

use serde::Deserialize;

use crate::config::RouteConfig;
pub use crate::kafka::Record as Meta;
use crate::schema::TableSchema;

/// What to do with a field that matches no column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownFields {
    /// Drop it silently (the default: producers may add fields before the table has them).
    #[default]
    Ignore,
    /// Treat the record as bad.
    Error,
}

/// Why one record could not become a row. The pipeline adds where it came from
/// (topic, partition, offset) and which table it was meant for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub kind: RecordErrorKind,
    /// The column the failing value was meant for, when one is known.
    pub column: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordErrorKind {
    /// The message has no value (a tombstone) or an empty one.
    Empty,
    /// Not valid input of the format (e.g. broken JSON, not an object).
    Malformed,
    /// A value does not fit its column's type.
    Conversion,
    /// A field that matches no column, with `unknown_fields = "error"`.
    UnknownField,
    /// Over one of the route's `limits` (size, nesting depth, array or string length).
    Limit,
    /// The record names a schema the registry does not have (or one of
    /// another format), or a Protobuf message its schema does not define:
    /// the record is corrupt or misplaced, and follows the route's `on_error`.
    UnknownSchema,
    /// The record's schema does not fit the table, or the registry refuses
    /// chbridge: a configuration problem, so the route stops whatever
    /// `on_error` says.
    Schema,
    /// The schema registry cannot be reached: nothing is wrong with the record,
    /// so the bridge stops without committing past it and is restarted.
    Unavailable,
}

impl RecordErrorKind {
    pub const ALL: [RecordErrorKind; 8] = [
        RecordErrorKind::Empty,
        RecordErrorKind::Malformed,
        RecordErrorKind::Conversion,
        RecordErrorKind::UnknownField,
        RecordErrorKind::Limit,
        RecordErrorKind::UnknownSchema,
        RecordErrorKind::Schema,
        RecordErrorKind::Unavailable,
    ];

    /// Short stable name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordErrorKind::Empty => "empty",
            RecordErrorKind::Malformed => "malformed",
            RecordErrorKind::Conversion => "conversion",
            RecordErrorKind::UnknownField => "unknown_field",
            RecordErrorKind::Limit => "limit",
            RecordErrorKind::UnknownSchema => "unknown_schema",
            RecordErrorKind::Schema => "schema",
            RecordErrorKind::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(c) => write!(f, "{} (column `{c}`): {}", self.kind.as_str(), self.message),
            None => write!(f, "{}: {}", self.kind.as_str(), self.message),
        }
    }
}

impl std::error::Error for RecordError {}

/// The formats that decode a whole record before mapping it (Avro, Protobuf):
/// a message value in, a [`value::Value::Record`] out. The mapping to columns
/// is shared (mapping.rs).
pub trait RecordReader: Send {
    fn read<'a>(&mut self, value: &'a [u8]) -> Result<value::Value<'a>, RecordError>;
}

/// Turns a record into one row of the table it was built for.
pub trait Decoder: Send {
    /// Appends exactly one encoded row (RowBinaryWithDefaults, in the order of
    /// [`TableSchema::insert_columns`]) to `out`, or returns why the record
    /// cannot be a row, leaving `out` as it was. `rec` gives the value and the
    /// Kafka metadata a mapping may put into columns.
    fn decode(&mut self, rec: &Meta<'_>, out: &mut Vec<u8>) -> Result<(), RecordError>;

    /// `auto_add_columns`: the columns (name, ClickHouse type) the record's
    /// fields need that the table lacks. Only the JSON decoder finds any.
    fn new_columns(&mut self, _rec: &Meta<'_>) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The input formats a route can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    #[default]
    Json,
    Avro,
    Protobuf,
    Csv,
    Tsv,
    /// The whole value, undecoded, into one column.
    Raw,
}

/// Limits on what one record may make the decoder do, so that a hostile
/// record is refused instead of exhausting memory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Largest message value accepted. Default: "8MiB".
    pub max_message_bytes: bytesize::ByteSize,
    /// Deepest nesting of records, arrays and maps in a decoded Avro,
    /// Protobuf or mapped JSON record. (Plain JSON stops at serde_json's
    /// fixed 128 levels.) Default: 64.
    pub max_depth: usize,
    /// Most elements in one array or map of a decoded record. Default: 1000000.
    pub max_array_len: usize,
    /// Longest string or bytes value in a decoded record. Default: "4MiB".
    pub max_string_bytes: bytesize::ByteSize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_message_bytes: bytesize::ByteSize::mib(8),
            max_depth: 64,
            max_array_len: 1_000_000,
            max_string_bytes: bytesize::ByteSize::mib(4),
        }
    }
}

impl DecodeLimits {
    /// Refuses a value over the size limit before any parsing.
    pub fn check(&self, value: Option<&[u8]>) -> Result<(), RecordError> {
        let len = value.map_or(0, <[u8]>::len) as u64;
        if len > self.max_message_bytes.as_u64() {
            return Err(RecordError {
                kind: RecordErrorKind::Limit,
                column: None,
                message: format!(
                    "the value has {len} bytes, more than limits.max_message_bytes ({})",
                    self.max_message_bytes
                ),
            });
        }
        Ok(())
    }

    /// Refuses a decoded record deeper, longer or with longer strings than allowed.
    pub fn check_value(&self, v: &value::Value<'_>) -> Result<(), RecordError> {
        use value::Value as V;
        fn walk(l: &DecodeLimits, v: &V<'_>, depth: usize) -> Result<(), String> {
            if depth > l.max_depth {
                return Err(format!(
                    "nested deeper than limits.max_depth ({})",
                    l.max_depth
                ));
            }
            let long = |n: usize| n as u64 > l.max_string_bytes.as_u64();
            match v {
                V::Str(s) | V::Json(s) if long(s.len()) => Err(format!(
                    "a string of {} bytes is longer than limits.max_string_bytes ({})",
                    s.len(),
                    l.max_string_bytes
                )),
                V::Bytes(b) if long(b.len()) => Err(format!(
                    "a value of {} bytes is longer than limits.max_string_bytes ({})",
                    b.len(),
                    l.max_string_bytes
                )),
                V::Array(items) => {
                    if items.len() > l.max_array_len {
                        return Err(format!(
                            "an array of {} elements is longer than limits.max_array_len ({})",
                            items.len(),
                            l.max_array_len
                        ));
                    }
                    items.iter().try_for_each(|i| walk(l, i, depth + 1))
                }
                V::Map(pairs) => {
                    if pairs.len() > l.max_array_len {
                        return Err(format!(
                            "a map of {} entries is longer than limits.max_array_len ({})",
                            pairs.len(),
                            l.max_array_len
                        ));
                    }
                    pairs.iter().try_for_each(|(k, v)| {
                        walk(l, k, depth + 1)?;
                        walk(l, v, depth + 1)
                    })
                }
                V::Record(fields) => fields.iter().try_for_each(|(_, v)| walk(l, v, depth + 1)),
                _ => Ok(()),
            }
        }
        walk(self, v, 0).map_err(|message| RecordError {
            kind: RecordErrorKind::Limit,
            column: None,
            message,
        })
    }
}

/// Builds the decoder of a route for its target table. An error is a
/// configuration problem and names what is wrong.
pub fn decoder_for(
    route: &RouteConfig,
    table: &TableSchema,
    registry: Option<&std::sync::Arc<registry::Registry>>,
) -> Result<Box<dyn Decoder>, String> {
    let mut sources = route.columns.clone();
    if route.format == Format::Raw
        && !sources.values().any(|s| {
            matches!(
                s,
                mapping::ColumnSource::Meta {
                    meta: mapping::MetaField::Value
                }
            )
        })
    {
        // Raw: the value goes to the table's first column unless mapped elsewhere.
        let first = table
            .insert_columns()
            .find(|c| !sources.contains_key(&c.name))
            .ok_or_else(|| format!("table {table} has no column for the raw value"))?;
        sources.insert(
            first.name.clone(),
            mapping::ColumnSource::Meta {
                meta: mapping::MetaField::Value,
            },
        );
    }
    let mapping =
        mapping::Mapping::new(table, &sources, route.unknown_fields, route.flatten.clone())?;
    let limits = route.limits.clone();
    let registry = registry.filter(|_| route.registry).cloned();
    let need_registry = |what: &str| {
        format!(
            "format = \"{what}\" needs either [schema_registry] or the route's schema_file{}",
            if what == "protobuf" {
                " and message"
            } else {
                ""
            }
        )
    };
    Ok(match route.format {
        Format::Json if mapping.is_plain() => Box::new(
            json::JsonDecoder::new(table, route.unknown_fields, limits)
                .with_auto_add(table, route.auto_add_columns),
        ),
        Format::Json => Box::new(text::MappedJson { mapping, limits }),
        Format::Csv | Format::Tsv => {
            let names = match &route.fields {
                Some(f) => f.clone(),
                None => table.insert_columns().map(|c| c.name.clone()).collect(),
            };
            Box::new(text::Delimited::new(
                route.format == Format::Tsv,
                names,
                mapping,
                limits,
            ))
        }
        Format::Raw => Box::new(text::Raw { mapping, limits }),
        Format::Avro => {
            if registry.is_none() && route.schema_file.is_none() {
                return Err(need_registry("avro"));
            }
            let reader = avro::AvroReader::new(route.schema_file.as_deref(), registry)?;
            Box::new(text::Records {
                reader,
                mapping,
                limits,
            })
        }
        Format::Protobuf => {
            if registry.is_none() && (route.schema_file.is_none() || route.message.is_none()) {
                return Err(need_registry("protobuf"));
            }
            // A descriptor set names the schema itself: the registry is then not asked.
            let registry = if route.schema_file.is_some() {
                None
            } else {
                registry
            };
            let reader = protobuf::ProtobufReader::new(
                route.schema_file.as_deref(),
                route.message.as_deref(),
                registry,
            )?;
            Box::new(text::Records {
                reader,
                mapping,
                limits,
            })
        }
    })
}
