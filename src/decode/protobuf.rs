//! Protobuf input: one message per Kafka value, decoded with the message's
//! descriptor into a [`Value::Record`].
//!
//! The descriptor comes either from a FileDescriptorSet file named in the config
//! (plain protobuf bytes of one configured message), or from the Confluent Schema
//! Registry: the value then starts with magic byte 0, the schema id, and the
//! message indexes, a path through the schema's message declarations
//! (Confluent's `MessageIndexes`). Registry schemas are .proto source text; they
//! are compiled with their references by `protox` and kept per schema id.
//!
//! Conversion keeps everything the message says, and keeps "absent" apart from
//! "zero": a field with explicit presence that is unset is left out of the
//! record so its column takes its DEFAULT, except the well-known types that
//! become a scalar (Timestamp, Duration, the wrappers, Struct/Value/ListValue),
//! which are [`Value::Null`] when unset, as a nullable scalar would be.
//!
//! Hostile input: prost bounds every length by the buffer and stops nesting
//! (messages and groups, known or unknown fields) at depth 100, so decoding
//! allocates at most a constant factor of the value's size and the recursive
//! conversion below is as deep as the decoded message, no deeper.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use prost_reflect::{
    DescriptorPool, DynamicMessage, EnumDescriptor, FileDescriptor, Kind, MapKey,
    MessageDescriptor, ReflectMessage, Value as PValue,
};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

use super::registry::{self, Registry, RegistryError, SchemaType};
use super::value::Value;
use super::{RecordError, RecordErrorKind, RecordReader};

pub struct ProtobufReader {
    source: Source,
    /// Reused for the message indexes of each framed value.
    indexes: Vec<i32>,
}

enum Source {
    /// Plain protobuf bytes of one message type.
    Fixed(MessageDescriptor),
    /// Confluent-framed values; schemas fetched by id and compiled once.
    Registry {
        registry: Arc<Registry>,
        /// When configured, the fully qualified name the indexes must name.
        message: Option<String>,
        files: HashMap<u32, FileDescriptor>,
    },
}

impl ProtobufReader {
    /// With a registry: values are Confluent-framed (magic, schema id, message
    /// indexes); the schema (.proto text plus its references, fetched
    /// recursively with `by_subject_version` and given to protox under their
    /// reference `name`s) comes from the registry by id; the message is the one
    /// the indexes name, and must be `message` when that is given. Without a
    /// registry: plain protobuf bytes of `message` from the FileDescriptorSet
    /// file `descriptor_set` (both then required). Message names are fully
    /// qualified (`package.Outer.Inner`), a leading dot allowed.
    ///
    /// `Err` is a configuration message naming the file or message at fault.
    pub fn new(
        descriptor_set: Option<&Path>,
        message: Option<&str>,
        registry: Option<Arc<Registry>>,
    ) -> Result<ProtobufReader, String> {
        let message = message.map(|m| m.strip_prefix('.').unwrap_or(m));
        let source = match (registry, descriptor_set, message) {
            (Some(_), Some(path), _) => {
                return Err(format!(
                    "protobuf: descriptor set `{}` and a schema registry exclude each other \
                     (with a registry, schemas come from the registry)",
                    path.display()
                ))
            }
            (Some(registry), None, message) => Source::Registry {
                registry,
                message: message.map(str::to_owned),
                files: HashMap::new(),
            },
            (None, Some(path), Some(message)) => Source::Fixed(load_message(path, message)?),
            (None, None, _) => {
                return Err(
                    "protobuf: without a schema registry, a descriptor set file and a message \
                     name are required"
                        .to_owned(),
                )
            }
            (None, Some(path), None) => {
                return Err(format!(
                    "protobuf: descriptor set `{}` given but no message name: which message \
                     do the values hold?",
                    path.display()
                ))
            }
        };
        Ok(ProtobufReader {
            source,
            indexes: Vec::new(),
        })
    }
}

impl RecordReader for ProtobufReader {
    fn read<'a>(&mut self, value: &'a [u8]) -> Result<Value<'a>, RecordError> {
        let (desc, payload) = match &mut self.source {
            // An empty value is a valid message (every field at its default).
            Source::Fixed(desc) => (desc.clone(), value),
            Source::Registry {
                registry,
                message,
                files,
            } => {
                if value.is_empty() {
                    return Err(error(RecordErrorKind::Empty, "empty value".to_owned()));
                }
                let (id, rest) = registry::split_confluent(value).map_err(|e| {
                    error(
                        RecordErrorKind::Malformed,
                        format!("Confluent framing: {e}"),
                    )
                })?;
                let payload = read_indexes(rest, &mut self.indexes)?;
                let file = match files.get(&id) {
                    Some(file) => file.clone(),
                    None => {
                        let file = compile(registry, id)?;
                        files.insert(id, file.clone());
                        file
                    }
                };
                let desc = message_at(&file, &self.indexes).ok_or_else(|| {
                    error(
                        RecordErrorKind::UnknownSchema,
                        format!(
                            "message indexes {:?} name no message in schema id {id}",
                            self.indexes
                        ),
                    )
                })?;
                if let Some(expected) = message {
                    if desc.full_name() != expected.as_str() {
                        return Err(error(
                            RecordErrorKind::UnknownSchema,
                            format!(
                                "schema id {id}, indexes {:?}: message `{}`, but the route \
                                 expects `{expected}`",
                                self.indexes,
                                desc.full_name()
                            ),
                        ));
                    }
                }
                (desc, payload)
            }
        };
        let message = DynamicMessage::decode(desc.clone(), payload).map_err(|e| {
            error(
                RecordErrorKind::Malformed,
                format!("invalid protobuf `{}`: {e}", desc.full_name()),
            )
        })?;
        record(message)
    }
}

fn error(kind: RecordErrorKind, message: String) -> RecordError {
    RecordError {
        kind,
        column: None,
        message,
    }
}

fn registry_error(e: &RegistryError, what: String) -> RecordError {
    error(e.record_kind(), format!("{what}: {e}"))
}

fn load_message(path: &Path, message: &str) -> Result<MessageDescriptor, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "protobuf: cannot read descriptor set `{}`: {e}",
            path.display()
        )
    })?;
    // Starting from the well-known types lets a set made without
    // --include_imports still resolve google/protobuf/*.proto.
    let mut pool = DescriptorPool::global();
    pool.decode_file_descriptor_set(bytes.as_slice())
        .map_err(|e| {
            format!(
                "protobuf: `{}` is not a usable FileDescriptorSet (compile with protoc \
             --include_imports --descriptor_set_out): {e}",
                path.display()
            )
        })?;
    pool.get_message_by_name(message).ok_or_else(|| {
        let known: Vec<String> = pool
            .all_messages()
            .filter(|m| !m.is_map_entry() && !m.full_name().starts_with("google.protobuf."))
            .take(20)
            .map(|m| m.full_name().to_owned())
            .collect();
        format!(
            "protobuf: message `{message}` is not in descriptor set `{}` (it has: {})",
            path.display(),
            known.join(", ")
        )
    })
}

/// Reads Confluent's message indexes into `out` and returns the bytes after
/// them: a zigzag varint count, then that many zigzag varint indexes; a count
/// of 0 (the single byte 0) means `[0]`, the first message of the file.
fn read_indexes<'a>(mut bytes: &'a [u8], out: &mut Vec<i32>) -> Result<&'a [u8], RecordError> {
    out.clear();
    let count = read_zigzag(&mut bytes)?;
    if count == 0 {
        out.push(0);
        return Ok(bytes);
    }
    // Every index takes at least one byte: a count beyond that is not framing
    // (and must not size an allocation).
    if count < 0 || count as usize > bytes.len() {
        return Err(error(
            RecordErrorKind::Malformed,
            format!(
                "Confluent framing: message index count {count} with {} bytes left",
                bytes.len()
            ),
        ));
    }
    for _ in 0..count {
        let index = read_zigzag(&mut bytes)?;
        if index < 0 {
            return Err(error(
                RecordErrorKind::Malformed,
                format!("Confluent framing: negative message index {index}"),
            ));
        }
        out.push(index);
    }
    Ok(bytes)
}

/// One zigzag varint of at most 32 bits (Kafka's `ByteUtils.readVarint`).
fn read_zigzag(bytes: &mut &[u8]) -> Result<i32, RecordError> {
    let mut raw: u64 = 0;
    for i in 0..5 {
        let Some((&b, rest)) = bytes.split_first() else {
            return Err(error(
                RecordErrorKind::Malformed,
                "Confluent framing: message indexes cut short".to_owned(),
            ));
        };
        *bytes = rest;
        raw |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let Ok(raw) = u32::try_from(raw) else { break };
            return Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32));
        }
    }
    Err(error(
        RecordErrorKind::Malformed,
        "Confluent framing: message index varint longer than 32 bits".to_owned(),
    ))
}

/// The message that `indexes` name: the first picks a top-level message of
/// the file, each next one a message nested in the previous. Map entries are
/// not counted: they are not declarations in the source Confluent indexes.
fn message_at(file: &FileDescriptor, indexes: &[i32]) -> Option<MessageDescriptor> {
    let (&first, rest) = indexes.split_first()?;
    let mut message = file.messages().nth(usize::try_from(first).ok()?)?;
    for &i in rest {
        let i = usize::try_from(i).ok()?;
        let child = message
            .child_messages()
            .filter(|m| !m.is_map_entry())
            .nth(i)?;
        message = child;
    }
    Some(message)
}

/// The name the root schema gets among its references' names.
fn root_name(id: u32, files: &HashMap<String, String>) -> String {
    let mut name = format!("chbridge-schema-{id}.proto");
    while files.contains_key(&name) {
        name.insert(0, '_');
    }
    name
}

/// Fetches schema `id` and every schema it references, and compiles them.
fn compile(registry: &Registry, id: u32) -> Result<FileDescriptor, RecordError> {
    let schema = registry
        .by_id(id)
        .map_err(|e| registry_error(&e, format!("schema id {id}")))?;
    if !matches!(schema.schema_type, SchemaType::Protobuf) {
        return Err(error(
            RecordErrorKind::UnknownSchema,
            format!(
                "schema id {id} is {}, not PROTOBUF",
                type_name(schema.schema_type)
            ),
        ));
    }
    // Reference name -> .proto text, fetched depth-first; a name seen once is
    // not fetched again, so shared and cyclic references end.
    let mut files: HashMap<String, String> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut pending: Vec<registry::Reference> = schema.references.clone();
    while let Some(reference) = pending.pop() {
        if !seen.insert(reference.name.clone()) {
            continue;
        }
        let what = format!(
            "schema id {id}: reference `{}` (subject `{}` version {})",
            reference.name, reference.subject, reference.version
        );
        let referenced = registry
            .by_subject_version(&reference.subject, reference.version)
            .map_err(|e| registry_error(&e, what.clone()))?;
        if !matches!(referenced.schema_type, SchemaType::Protobuf) {
            return Err(error(
                RecordErrorKind::Schema,
                format!(
                    "{what} is {}, not PROTOBUF",
                    type_name(referenced.schema_type)
                ),
            ));
        }
        pending.extend(referenced.references.iter().cloned());
        files.insert(reference.name, referenced.schema.clone());
    }
    let root = root_name(id, &files);
    files.insert(root.clone(), schema.schema.clone());

    let mut resolver = ChainFileResolver::new();
    resolver.add(SourceFiles(files));
    resolver.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.open_file(&root).map_err(|e| {
        error(
            RecordErrorKind::Schema,
            format!("schema id {id} does not compile: {e}"),
        )
    })?;
    compiler
        .descriptor_pool()
        .get_file_by_name(&root)
        .ok_or_else(|| {
            error(
                RecordErrorKind::Schema,
                format!("schema id {id}: compiled file missing"),
            )
        })
}

fn type_name(t: SchemaType) -> &'static str {
    match t {
        SchemaType::Avro => "AVRO",
        SchemaType::Protobuf => "PROTOBUF",
        SchemaType::Json => "JSON",
    }
}

/// .proto sources by file name, for protox's imports.
struct SourceFiles(HashMap<String, String>);

impl FileResolver for SourceFiles {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.get(name) {
            Some(source) => File::from_source(name, source),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// A message as a record: every field in declaration order, by its proto name.
fn record(mut message: DynamicMessage) -> Result<Value<'static>, RecordError> {
    let desc = message.descriptor();
    let mut fields = Vec::with_capacity(desc.fields().len());
    for field in desc.fields() {
        let kind = field.kind();
        let value = match message.take_field(&field) {
            Some(v) => v,
            // Unset with explicit presence: a scalar-like well-known type is
            // null, anything else is absent (the column's DEFAULT).
            None if field.supports_presence() => match &kind {
                Kind::Message(m) if is_scalar_wkt(m.full_name()) => {
                    fields.push((Cow::Owned(field.name().to_owned()), Value::Null));
                    continue;
                }
                _ => continue,
            },
            // Implicit presence: unset means its default, which is data.
            None => field.default_value(),
        };
        let enum_desc = match &kind {
            Kind::Enum(e) => Some(e.clone()),
            // A map's values: the entry's field 2.
            Kind::Message(entry) if field.is_map() => match entry.get_field(2).map(|f| f.kind()) {
                Some(Kind::Enum(e)) => Some(e),
                _ => None,
            },
            _ => None,
        };
        fields.push((
            Cow::Owned(field.name().to_owned()),
            convert(value, enum_desc.as_ref())?,
        ));
    }
    Ok(Value::Record(fields))
}

/// One protobuf value; `enum_desc` names the numbers of an enum field (or of
/// the elements of a repeated enum, or of the values of a map of enums).
fn convert(
    value: PValue,
    enum_desc: Option<&EnumDescriptor>,
) -> Result<Value<'static>, RecordError> {
    Ok(match value {
        PValue::Bool(b) => Value::Bool(b),
        PValue::I32(n) => Value::Int(n.into()),
        PValue::I64(n) => Value::Int(n.into()),
        PValue::U32(n) => Value::Int(n.into()),
        PValue::U64(n) => Value::Int(n.into()),
        PValue::F32(f) => Value::Float(f.into()),
        PValue::F64(f) => Value::Float(f),
        PValue::String(s) => Value::Str(Cow::Owned(s)),
        PValue::Bytes(b) => Value::Bytes(Cow::Owned(b.to_vec())),
        PValue::EnumNumber(n) => {
            let name = enum_desc
                .and_then(|e| e.get_value(n))
                .map_or_else(|| n.to_string(), |v| v.name().to_owned());
            Value::Enum {
                name: Cow::Owned(name),
                number: Some(n.into()),
            }
        }
        PValue::Message(m) => message_value(m)?,
        PValue::List(items) => Value::Array(
            items
                .into_iter()
                .map(|v| convert(v, enum_desc))
                .collect::<Result<_, _>>()?,
        ),
        PValue::Map(map) => {
            // Protobuf maps have no order; sorted keys make the output stable.
            let mut entries: Vec<(MapKey, PValue)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| Ok((map_key(k), convert(v, enum_desc)?)))
                    .collect::<Result<_, RecordError>>()?,
            )
        }
    })
}

fn map_key(key: MapKey) -> Value<'static> {
    match key {
        MapKey::Bool(b) => Value::Bool(b),
        MapKey::I32(n) => Value::Int(n.into()),
        MapKey::I64(n) => Value::Int(n.into()),
        MapKey::U32(n) => Value::Int(n.into()),
        MapKey::U64(n) => Value::Int(n.into()),
        MapKey::String(s) => Value::Str(Cow::Owned(s)),
    }
}

const WRAPPERS: [&str; 9] = [
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
];

const TIMESTAMP: &str = "google.protobuf.Timestamp";
const DURATION: &str = "google.protobuf.Duration";
const STRUCT: &str = "google.protobuf.Struct";
const JSON_VALUE: &str = "google.protobuf.Value";
const LIST_VALUE: &str = "google.protobuf.ListValue";

/// The well-known types that convert to a scalar (and so to Null when unset).
fn is_scalar_wkt(name: &str) -> bool {
    matches!(
        name,
        TIMESTAMP | DURATION | STRUCT | JSON_VALUE | LIST_VALUE
    ) || WRAPPERS.contains(&name)
}

/// A nested message: the well-known types as the scalar they stand for,
/// anything else (Any and Empty included) as a record.
fn message_value(message: DynamicMessage) -> Result<Value<'static>, RecordError> {
    let desc = message.descriptor();
    let name = desc.full_name();
    // A schema may declare its own google.protobuf.X with other fields; then
    // the field lookups below find nothing and it stays a plain record.
    let number = |n: u32| message.get_field_by_number(n).map(|v| v.into_owned());
    match name {
        TIMESTAMP | DURATION => {
            if let (Some(PValue::I64(seconds)), Some(PValue::I32(nanos))) = (number(1), number(2)) {
                // i128 holds every seconds * 10^9 + nanos exactly.
                let total = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
                return Ok(if name == TIMESTAMP {
                    Value::Timestamp(total)
                } else {
                    Value::Int(total)
                });
            }
        }
        STRUCT | JSON_VALUE | LIST_VALUE => match json(&message) {
            Ok(json) => return Ok(Value::Str(Cow::Owned(json.to_string()))),
            Err(Json::NotFinite) => {
                return Err(error(
                    RecordErrorKind::Malformed,
                    format!("{name} holds a NaN or infinite number, which JSON cannot carry"),
                ))
            }
            Err(Json::Shape) => {}
        },
        _ if WRAPPERS.contains(&name) => {
            if let Some(inner) = number(1) {
                if !matches!(inner, PValue::Message(_) | PValue::List(_) | PValue::Map(_)) {
                    return convert(inner, None);
                }
            }
        }
        _ => {}
    }
    record(message)
}

enum Json {
    /// A number JSON cannot write.
    NotFinite,
    /// Not the shape of the well-known type (a schema's own google.protobuf.X).
    Shape,
}

/// Canonical proto3 JSON of a google.protobuf.Struct, Value or ListValue
/// (object keys sorted, as serde_json writes them).
fn json(message: &DynamicMessage) -> Result<serde_json::Value, Json> {
    use serde_json::Value as J;
    let field = |n: u32| message.get_field_by_number(n).ok_or(Json::Shape);
    match message.descriptor().full_name() {
        STRUCT => match field(1)?.as_ref() {
            PValue::Map(map) => {
                let mut object = serde_json::Map::new();
                for (k, v) in map {
                    let (MapKey::String(k), PValue::Message(v)) = (k, v) else {
                        return Err(Json::Shape);
                    };
                    object.insert(k.clone(), json(v)?);
                }
                Ok(J::Object(object))
            }
            _ => Err(Json::Shape),
        },
        LIST_VALUE => match field(1)?.as_ref() {
            PValue::List(items) => items
                .iter()
                .map(|v| match v {
                    PValue::Message(m) => json(m),
                    _ => Err(Json::Shape),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(J::Array),
            _ => Err(Json::Shape),
        },
        JSON_VALUE => {
            // The `kind` oneof: whichever member is set (none set reads as null).
            let Some((f, v)) = message.fields().next() else {
                return Ok(J::Null);
            };
            match (f.number(), v) {
                (1, _) => Ok(J::Null),
                (2, PValue::F64(x)) => serde_json::Number::from_f64(*x)
                    .map(J::Number)
                    .ok_or(Json::NotFinite),
                (3, PValue::String(s)) => Ok(J::String(s.clone())),
                (4, PValue::Bool(b)) => Ok(J::Bool(*b)),
                (5 | 6, PValue::Message(m)) => json(m),
                _ => Err(Json::Shape),
            }
        }
        _ => Err(Json::Shape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::registry::{Reference, RegisteredSchema};
    use prost_reflect::prost::Message as _;

    const ROW_PROTO: &str = r#"
        syntax = "proto3";
        package test.v1;
        import "google/protobuf/timestamp.proto";
        import "google/protobuf/wrappers.proto";

        message Other { string note = 1; }

        message Row {
          enum Color { COLOR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }
          uint64 id = 1;
          string name = 2;
          google.protobuf.Timestamp at = 3;
          int32 count = 4;
          repeated string tags = 5;
          map<string, int32> attrs = 6;
          google.protobuf.DoubleValue score = 7;
          bool active = 8;
          Color color = 9;
          Inner inner = 10;
          optional int32 maybe = 11;
          oneof choice { string text = 12; int64 number = 13; }
          repeated Color colors = 14;
          // Declared after the map, so the map's entry type comes first among
          // the nested types of the descriptor: index [1, 0] must skip it.
          message Inner { sint64 a = 1; bytes b = 2; }
        }

        message Node { Node child = 1; int32 v = 2; }
    "#;

    fn compiler(files: &[(&str, &str)], root: &str) -> protox::Compiler {
        let mut resolver = ChainFileResolver::new();
        resolver.add(SourceFiles(
            files
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect(),
        ));
        resolver.add(GoogleFileResolver::new());
        let mut c = protox::Compiler::with_file_resolver(resolver);
        c.open_file(root).unwrap();
        c
    }

    fn pool() -> DescriptorPool {
        compiler(&[("row.proto", ROW_PROTO)], "row.proto").descriptor_pool()
    }

    fn message(pool: &DescriptorPool, name: &str, fields: Vec<(&str, PValue)>) -> DynamicMessage {
        let mut m = DynamicMessage::new(pool.get_message_by_name(name).unwrap());
        for (f, v) in fields {
            m.try_set_field_by_name(f, v).unwrap();
        }
        m
    }

    fn s(text: &str) -> PValue {
        PValue::String(text.to_owned())
    }

    fn full_row(pool: &DescriptorPool) -> DynamicMessage {
        let at = message(
            pool,
            TIMESTAMP,
            vec![
                ("seconds", PValue::I64(1_700_000_000)),
                ("nanos", PValue::I32(123_456_789)),
            ],
        );
        let score = message(
            pool,
            "google.protobuf.DoubleValue",
            vec![("value", PValue::F64(2.5))],
        );
        let inner = message(
            pool,
            "test.v1.Row.Inner",
            vec![
                ("a", PValue::I64(-7)),
                ("b", PValue::Bytes(vec![0, 255].into())),
            ],
        );
        let attrs = [
            (MapKey::String("y".into()), PValue::I32(2)),
            (MapKey::String("x".into()), PValue::I32(1)),
        ];
        message(
            pool,
            "test.v1.Row",
            vec![
                ("id", PValue::U64(u64::MAX)),
                ("name", s("ünï")),
                ("at", PValue::Message(at)),
                ("count", PValue::I32(-5)),
                ("tags", PValue::List(vec![s("a"), s("b")])),
                ("attrs", PValue::Map(attrs.into_iter().collect())),
                ("score", PValue::Message(score)),
                ("active", PValue::Bool(true)),
                ("color", PValue::EnumNumber(2)),
                ("inner", PValue::Message(inner)),
                // Explicit presence: set to zero is not unset.
                ("maybe", PValue::I32(0)),
                ("text", s("t")),
                (
                    "colors",
                    PValue::List(vec![PValue::EnumNumber(1), PValue::EnumNumber(7)]),
                ),
            ],
        )
    }

    fn str(text: &str) -> Value<'static> {
        Value::Str(Cow::Owned(text.to_owned()))
    }

    fn rec(fields: Vec<(&str, Value<'static>)>) -> Value<'static> {
        Value::Record(
            fields
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.to_owned()), v))
                .collect(),
        )
    }

    fn en(name: &str, number: i64) -> Value<'static> {
        Value::Enum {
            name: Cow::Owned(name.to_owned()),
            number: Some(number),
        }
    }

    fn full_row_value() -> Value<'static> {
        rec(vec![
            ("id", Value::Int(u64::MAX.into())),
            ("name", str("ünï")),
            ("at", Value::Timestamp(1_700_000_000_123_456_789)),
            ("count", Value::Int(-5)),
            ("tags", Value::Array(vec![str("a"), str("b")])),
            (
                "attrs",
                Value::Map(vec![(str("x"), Value::Int(1)), (str("y"), Value::Int(2))]),
            ),
            ("score", Value::Float(2.5)),
            ("active", Value::Bool(true)),
            ("color", en("GREEN", 2)),
            (
                "inner",
                rec(vec![
                    ("a", Value::Int(-7)),
                    ("b", Value::Bytes(Cow::Owned(vec![0, 255]))),
                ]),
            ),
            ("maybe", Value::Int(0)),
            ("text", str("t")),
            ("colors", Value::Array(vec![en("RED", 1), en("7", 7)])),
        ])
    }

    /// Every field unset: implicit ones at their zero, wrappers and Timestamp
    /// null, presence fields (message, `optional`, oneof) absent.
    fn empty_row_value() -> Value<'static> {
        rec(vec![
            ("id", Value::Int(0)),
            ("name", str("")),
            ("at", Value::Null),
            ("count", Value::Int(0)),
            ("tags", Value::Array(vec![])),
            ("attrs", Value::Map(vec![])),
            ("score", Value::Null),
            ("active", Value::Bool(false)),
            ("color", en("COLOR_UNSPECIFIED", 0)),
            ("colors", Value::Array(vec![])),
        ])
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("chbridge-protobuf-{}-{name}", std::process::id()))
    }

    /// A FileDescriptorSet file without the imported well-known files (as
    /// protoc writes it without --include_imports).
    fn descriptor_set_file(name: &str) -> std::path::PathBuf {
        let path = temp_path(name);
        let bytes = compiler(&[("row.proto", ROW_PROTO)], "row.proto").encode_file_descriptor_set();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn descriptor_set_reads_every_kind_of_field() {
        let pool = pool();
        let path = descriptor_set_file("kinds");
        let mut r = ProtobufReader::new(Some(&path), Some("test.v1.Row"), None).unwrap();
        let bytes = full_row(&pool).encode_to_vec();
        assert_eq!(r.read(&bytes).unwrap(), full_row_value());
        // Zero bytes are a valid message with every field unset.
        assert_eq!(r.read(&[]).unwrap(), empty_row_value());
        // The other oneof member, and a leading dot on the name.
        let mut r = ProtobufReader::new(Some(&path), Some(".test.v1.Row"), None).unwrap();
        let bytes =
            message(&pool, "test.v1.Row", vec![("number", PValue::I64(-1))]).encode_to_vec();
        let Value::Record(fields) = r.read(&bytes).unwrap() else {
            panic!()
        };
        assert!(
            fields.contains(&(Cow::Borrowed("number"), Value::Int(-1))),
            "{fields:?}"
        );
        assert!(!fields.iter().any(|(name, _)| name == "text"), "{fields:?}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn configuration_errors_name_the_file_and_message() {
        let path = descriptor_set_file("config");
        let e = ProtobufReader::new(Some(&path), Some("test.v1.Nope"), None)
            .err()
            .unwrap();
        assert!(
            e.contains("test.v1.Nope") && e.contains(&*path.to_string_lossy()),
            "{e}"
        );
        assert!(e.contains("test.v1.Row"), "lists what the set has: {e}");
        assert!(ProtobufReader::new(Some(&path), None, None)
            .err()
            .unwrap()
            .contains("no message"));
        assert!(ProtobufReader::new(None, Some("test.v1.Row"), None).is_err());
        let fake = Arc::new(Registry::fake(HashMap::new(), HashMap::new()));
        assert!(ProtobufReader::new(Some(&path), None, Some(fake)).is_err());
        std::fs::remove_file(&path).unwrap();
        let e = ProtobufReader::new(Some(&path), Some("test.v1.Row"), None)
            .err()
            .unwrap();
        assert!(
            e.contains("cannot read") && e.contains(&*path.to_string_lossy()),
            "{e}"
        );
        std::fs::write(&path, b"\xff\xff not a descriptor set").unwrap();
        let e = ProtobufReader::new(Some(&path), Some("test.v1.Row"), None)
            .err()
            .unwrap();
        assert!(e.contains("FileDescriptorSet"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    fn protobuf(schema: &str, references: Vec<Reference>) -> RegisteredSchema {
        RegisteredSchema {
            schema_type: SchemaType::Protobuf,
            schema: schema.to_owned(),
            references,
        }
    }

    fn reference(name: &str, subject: &str, version: i32) -> Reference {
        Reference {
            name: name.to_owned(),
            subject: subject.to_owned(),
            version,
        }
    }

    fn fake_registry() -> Arc<Registry> {
        let mut by_id = HashMap::new();
        by_id.insert(1, protobuf(ROW_PROTO, vec![]));
        by_id.insert(
            2,
            protobuf(
                r#"syntax = "proto3"; package shop; import "common/money.proto";
                   message Order { string sku = 1; common.Money price = 2; }"#,
                vec![reference("common/money.proto", "money-value", 1)],
            ),
        );
        by_id.insert(
            3,
            RegisteredSchema {
                schema_type: SchemaType::Avro,
                schema: "\"long\"".into(),
                references: vec![],
            },
        );
        by_id.insert(4, protobuf("syntax = \"proto3\"; message {", vec![]));
        by_id.insert(
            5,
            protobuf(
                r#"syntax = "proto3"; import "gone.proto"; message A { int32 a = 1; }"#,
                vec![reference("gone.proto", "gone-value", 2)],
            ),
        );
        let mut by_subject = HashMap::new();
        by_subject.insert(
            ("money-value".to_owned(), 1),
            protobuf(
                r#"syntax = "proto3"; package common; import "common/unit.proto";
                   message Money { int64 units = 1; Unit unit = 2; }"#,
                vec![reference("common/unit.proto", "unit-value", 3)],
            ),
        );
        by_subject.insert(
            ("unit-value".to_owned(), 3),
            protobuf(r#"syntax = "proto3"; package common; enum Unit { UNIT_UNSPECIFIED = 0; EUR = 1; }"#, vec![]),
        );
        Arc::new(Registry::fake(by_id, by_subject))
    }

    fn framed(id: u32, indexes: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(indexes);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn row_message_has_the_map_entry_first_among_nested_types() {
        // Proves the [1, 0] test below exercises skipping map entries.
        let row = pool().get_message_by_name("test.v1.Row").unwrap();
        let nested: Vec<_> = row.child_messages().map(|m| m.name().to_owned()).collect();
        assert_eq!(nested, ["AttrsEntry", "Inner"]);
    }

    #[test]
    fn registry_message_indexes_pick_the_message() {
        let pool = pool();
        let mut r = ProtobufReader::new(None, None, Some(fake_registry())).unwrap();
        // [0] as the single byte 0: the first message of the file.
        let other = message(&pool, "test.v1.Other", vec![("note", s("hi"))]).encode_to_vec();
        assert_eq!(
            r.read(&framed(1, &[0], &other)).unwrap(),
            rec(vec![("note", str("hi"))])
        );
        // [0] written out in full (count 1, index 0) means the same.
        assert_eq!(
            r.read(&framed(1, &[2, 0], &other)).unwrap(),
            rec(vec![("note", str("hi"))])
        );
        // [1]: zigzag count 1, index 1.
        let row = full_row(&pool).encode_to_vec();
        assert_eq!(r.read(&framed(1, &[2, 2], &row)).unwrap(), full_row_value());
        // [1, 0]: Row.Inner, map entries not counted.
        let inner = message(
            &pool,
            "test.v1.Row.Inner",
            vec![
                ("a", PValue::I64(3)),
                ("b", PValue::Bytes(b"x".to_vec().into())),
            ],
        )
        .encode_to_vec();
        assert_eq!(
            r.read(&framed(1, &[4, 2, 0], &inner)).unwrap(),
            rec(vec![
                ("a", Value::Int(3)),
                ("b", Value::Bytes(Cow::Owned(b"x".to_vec())))
            ])
        );
        assert_eq!(r.read(&framed(1, &[2, 2], &[])).unwrap(), empty_row_value());
    }

    #[test]
    fn registry_references_are_fetched_recursively() {
        let shop = compiler(
            &[
                ("order.proto", r#"syntax = "proto3"; package shop; import "common/money.proto";
                   message Order { string sku = 1; common.Money price = 2; }"#),
                ("common/money.proto", r#"syntax = "proto3"; package common; import "common/unit.proto";
                   message Money { int64 units = 1; Unit unit = 2; }"#),
                ("common/unit.proto", r#"syntax = "proto3"; package common; enum Unit { UNIT_UNSPECIFIED = 0; EUR = 1; }"#),
            ],
            "order.proto",
        )
        .descriptor_pool();
        let price = message(
            &shop,
            "common.Money",
            vec![("units", PValue::I64(12)), ("unit", PValue::EnumNumber(1))],
        );
        let order = message(
            &shop,
            "shop.Order",
            vec![("sku", s("A-1")), ("price", PValue::Message(price))],
        )
        .encode_to_vec();
        let mut r = ProtobufReader::new(None, Some("shop.Order"), Some(fake_registry())).unwrap();
        assert_eq!(
            r.read(&framed(2, &[0], &order)).unwrap(),
            rec(vec![
                ("sku", str("A-1")),
                (
                    "price",
                    rec(vec![("units", Value::Int(12)), ("unit", en("EUR", 1))])
                )
            ])
        );
    }

    fn read_err(r: &mut ProtobufReader, value: &[u8]) -> RecordError {
        r.read(value).err().unwrap()
    }

    /// Item 10 of the delivery review: a schema id or message index that does
    /// not resolve is the record's problem (on_error applies), not the
    /// bridge's; a schema that does not compile still stops it.
    #[test]
    fn registry_schema_errors_say_which_schema_and_why() {
        use RecordErrorKind::{Schema, UnknownSchema};
        let mut r = ProtobufReader::new(None, None, Some(fake_registry())).unwrap();
        let cases: [(Vec<u8>, RecordErrorKind, &str); 6] = [
            (framed(99, &[0], &[]), UnknownSchema, "schema id 99"),
            (framed(3, &[0], &[]), UnknownSchema, "AVRO, not PROTOBUF"),
            (framed(4, &[0], &[]), Schema, "does not compile"),
            (
                framed(5, &[0], &[]),
                UnknownSchema,
                "reference `gone.proto` (subject `gone-value` version 2)",
            ),
            (
                framed(1, &[2, 10], &[]),
                UnknownSchema,
                "indexes [5] name no message in schema id 1",
            ),
            (
                framed(1, &[4, 2, 6], &[]),
                UnknownSchema,
                "indexes [1, 3] name no message",
            ),
        ];
        for (value, kind, says) in cases {
            let e = read_err(&mut r, &value);
            assert_eq!(e.kind, kind, "{e}");
            assert!(e.message.contains(says), "{e} should say {says}");
        }
        let mut r =
            ProtobufReader::new(None, Some("test.v1.Other"), Some(fake_registry())).unwrap();
        let e = read_err(&mut r, &framed(1, &[2, 2], &[]));
        assert_eq!(e.kind, UnknownSchema);
        assert!(
            e.message
                .contains("`test.v1.Row`, but the route expects `test.v1.Other`"),
            "{e}"
        );
    }

    #[test]
    fn bad_framing_is_malformed() {
        let mut r = ProtobufReader::new(None, None, Some(fake_registry())).unwrap();
        assert_eq!(read_err(&mut r, &[]).kind, RecordErrorKind::Empty);
        let cases: [&[u8]; 7] = [
            &[1, 0, 0, 0, 1, 0],                                  // magic byte 1
            &[0, 0, 0],                                           // header cut short
            &[0, 0, 0, 0, 1],                                     // no indexes
            &[0, 0, 0, 0, 1, 0x80],                               // index varint cut short
            &[0, 0, 0, 0, 1, 0xfe, 0xff, 0xff, 0xff, 0x0f],       // count 2^31-1, nothing after
            &[0, 0, 0, 0, 1, 1, 0],                               // count -1
            &[0, 0, 0, 0, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], // varint over 32 bits
        ];
        for value in cases {
            assert_eq!(
                read_err(&mut r, value).kind,
                RecordErrorKind::Malformed,
                "{value:?}"
            );
        }
        // Framing fine, protobuf not: field 2 (string) claims 100 bytes.
        let e = read_err(&mut r, &framed(1, &[0], &[0x12, 100, b'a']));
        assert_eq!(e.kind, RecordErrorKind::Malformed);
        assert!(e.message.contains("test.v1.Other"), "{e}");
    }

    #[test]
    fn truncations_and_bit_flips_never_panic() {
        let pool = pool();
        let row = full_row(&pool).encode_to_vec();
        let path = descriptor_set_file("fuzz");
        let mut plain = ProtobufReader::new(Some(&path), Some("test.v1.Row"), None).unwrap();
        let mut framed_reader = ProtobufReader::new(None, None, Some(fake_registry())).unwrap();
        let whole = framed(1, &[2, 2], &row);
        let mut failures = 0;
        for cut in 0..row.len() {
            match plain.read(&row[..cut]) {
                Ok(v) => assert!(matches!(v, Value::Record(_))),
                Err(e) => {
                    assert_eq!(e.kind, RecordErrorKind::Malformed, "{e}");
                    failures += 1;
                }
            }
        }
        assert!(failures > row.len() / 2, "most cuts land inside a field");
        for cut in 0..whole.len() {
            if let Err(e) = framed_reader.read(&whole[..cut]) {
                assert!(
                    matches!(e.kind, RecordErrorKind::Malformed | RecordErrorKind::Empty),
                    "{e}"
                );
            }
        }
        let mut flipped_failures = 0;
        for i in 0..whole.len() {
            for bit in 0..8 {
                let mut v = whole.clone();
                v[i] ^= 1 << bit;
                if let Err(e) = framed_reader.read(&v) {
                    // A flip in the header may name another schema or message.
                    assert!(
                        matches!(
                            e.kind,
                            RecordErrorKind::Malformed
                                | RecordErrorKind::Schema
                                | RecordErrorKind::UnknownSchema
                        ),
                        "{e}"
                    );
                    flipped_failures += 1;
                }
                if i >= 7 {
                    if let Err(e) = plain.read(&v[7..]) {
                        assert_eq!(e.kind, RecordErrorKind::Malformed, "{e}");
                    }
                }
            }
        }
        assert!(flipped_failures > 0);
        std::fs::remove_file(path).unwrap();
    }

    fn nested(depth: usize) -> Vec<u8> {
        // Node { child = 1 } nested `depth` times around Node { v = 1 }.
        let mut bytes = vec![0x10, 1];
        for _ in 0..depth {
            let mut outer = vec![0x0a];
            let mut len = bytes.len();
            while len >= 0x80 {
                outer.push((len as u8 & 0x7f) | 0x80);
                len >>= 7;
            }
            outer.push(len as u8);
            outer.extend_from_slice(&bytes);
            bytes = outer;
        }
        bytes
    }

    #[test]
    fn deep_nesting_stops_at_the_recursion_limit() {
        let path = descriptor_set_file("deep");
        let mut r = ProtobufReader::new(Some(&path), Some("test.v1.Node"), None).unwrap();
        let bytes = nested(50);
        let mut v = r.read(&bytes).unwrap();
        for _ in 0..50 {
            let Value::Record(mut fields) = v else {
                panic!()
            };
            assert_eq!(fields.len(), 2);
            v = fields.swap_remove(0).1;
        }
        assert_eq!(v, rec(vec![("v", Value::Int(1))]));
        let e = read_err(&mut r, &nested(100_000));
        assert_eq!(e.kind, RecordErrorKind::Malformed, "{e}");
        assert!(e.message.contains("recursion limit"), "{e}");
        // Unknown fields nest too: 100k start-group tags of field 15.
        assert_eq!(
            read_err(&mut r, &[0x7b; 100_000]).kind,
            RecordErrorKind::Malformed
        );
        // A length far beyond the buffer allocates nothing.
        let huge = [0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        let mut r = ProtobufReader::new(Some(&path), Some("test.v1.Row"), None).unwrap();
        assert_eq!(read_err(&mut r, &huge).kind, RecordErrorKind::Malformed);
        std::fs::remove_file(path).unwrap();
    }

    const WKT_PROTO: &str = r#"
        syntax = "proto3";
        import "google/protobuf/any.proto";
        import "google/protobuf/duration.proto";
        import "google/protobuf/struct.proto";
        import "google/protobuf/wrappers.proto";
        message Wkt {
          google.protobuf.Struct s = 1;
          google.protobuf.Value v = 2;
          google.protobuf.ListValue l = 3;
          google.protobuf.Duration d = 4;
          google.protobuf.Any any = 5;
          google.protobuf.StringValue sv = 6;
          google.protobuf.Int64Value iv = 7;
          google.protobuf.BytesValue bv = 8;
          repeated google.protobuf.Int32Value ivs = 9;
        }
    "#;

    #[test]
    fn well_known_types() {
        let c = compiler(&[("wkt.proto", WKT_PROTO)], "wkt.proto");
        let pool = c.descriptor_pool();
        let path = temp_path("wkt");
        std::fs::write(&path, c.encode_file_descriptor_set()).unwrap();
        let mut r = ProtobufReader::new(Some(&path), Some("Wkt"), None).unwrap();
        std::fs::remove_file(&path).unwrap();

        let value =
            |field: &str, v: PValue| PValue::Message(message(&pool, JSON_VALUE, vec![(field, v)]));
        let list = message(
            &pool,
            LIST_VALUE,
            vec![(
                "values",
                PValue::List(vec![
                    value("number_value", PValue::F64(1.5)),
                    value("null_value", PValue::EnumNumber(0)),
                    value("string_value", s("x\"")),
                ]),
            )],
        );
        let fields = [
            (
                MapKey::String("b".into()),
                value("bool_value", PValue::Bool(true)),
            ),
            (
                MapKey::String("a".into()),
                value("list_value", PValue::Message(list.clone())),
            ),
        ];
        let st = message(
            &pool,
            STRUCT,
            vec![("fields", PValue::Map(fields.into_iter().collect()))],
        );
        let any = message(
            &pool,
            "google.protobuf.Any",
            vec![
                ("type_url", s("type.googleapis.com/X")),
                ("value", PValue::Bytes(vec![8, 1].into())),
            ],
        );
        let wrap =
            |name: &str, v: PValue| PValue::Message(message(&pool, name, vec![("value", v)]));
        let wkt = message(
            &pool,
            "Wkt",
            vec![
                ("s", PValue::Message(st.clone())),
                ("v", value("struct_value", PValue::Message(st))),
                ("l", PValue::Message(list)),
                (
                    "d",
                    PValue::Message(message(
                        &pool,
                        DURATION,
                        vec![("seconds", PValue::I64(-2)), ("nanos", PValue::I32(-500))],
                    )),
                ),
                ("any", PValue::Message(any)),
                ("sv", wrap("google.protobuf.StringValue", s(""))),
                (
                    "iv",
                    wrap("google.protobuf.Int64Value", PValue::I64(i64::MIN)),
                ),
                (
                    "bv",
                    wrap("google.protobuf.BytesValue", PValue::Bytes(vec![1].into())),
                ),
                (
                    "ivs",
                    PValue::List(vec![
                        wrap("google.protobuf.Int32Value", PValue::I32(4)),
                        wrap("google.protobuf.Int32Value", PValue::I32(0)),
                    ]),
                ),
            ],
        );
        let json = r#"{"a":[1.5,null,"x\""],"b":true}"#;
        assert_eq!(
            r.read(&wkt.encode_to_vec()).unwrap(),
            rec(vec![
                ("s", str(json)),
                ("v", str(json)),
                ("l", str(r#"[1.5,null,"x\""]"#)),
                ("d", Value::Int(-2_000_000_500)),
                (
                    "any",
                    rec(vec![
                        ("type_url", str("type.googleapis.com/X")),
                        ("value", Value::Bytes(Cow::Owned(vec![8, 1])))
                    ])
                ),
                // A set wrapper holding its zero is the zero, not null.
                ("sv", str("")),
                ("iv", Value::Int(i64::MIN.into())),
                ("bv", Value::Bytes(Cow::Owned(vec![1]))),
                ("ivs", Value::Array(vec![Value::Int(4), Value::Int(0)])),
            ])
        );
        // Unset: scalar-like well-known types are null, Any (a record) absent.
        assert_eq!(
            r.read(&[]).unwrap(),
            rec(vec![
                ("s", Value::Null),
                ("v", Value::Null),
                ("l", Value::Null),
                ("d", Value::Null),
                ("sv", Value::Null),
                ("iv", Value::Null),
                ("bv", Value::Null),
                ("ivs", Value::Array(vec![])),
            ])
        );
        // NaN has no JSON form.
        let nan = message(
            &pool,
            "Wkt",
            vec![("v", value("number_value", PValue::F64(f64::NAN)))],
        );
        let e = read_err(&mut r, &nan.encode_to_vec());
        assert_eq!(e.kind, RecordErrorKind::Malformed);
        assert!(e.message.contains("NaN"), "{e}");
    }

    #[test]
    fn proto2_presence_and_groups() {
        let proto = r#"
            syntax = "proto2";
            message P {
              optional int32 a = 1 [default = 5];
              required string b = 2;
              repeated int64 c = 3 [packed = true];
              optional group G = 4 { optional int32 x = 5; }
            }
        "#;
        let c = compiler(&[("p.proto", proto)], "p.proto");
        let pool = c.descriptor_pool();
        let path = temp_path("p2");
        std::fs::write(&path, c.encode_file_descriptor_set()).unwrap();
        let mut r = ProtobufReader::new(Some(&path), Some("P"), None).unwrap();
        std::fs::remove_file(&path).unwrap();
        let g = message(&pool, "P.G", vec![("x", PValue::I32(9))]);
        let p = message(
            &pool,
            "P",
            vec![
                ("b", s("")),
                ("c", PValue::List(vec![PValue::I64(1), PValue::I64(-1)])),
                ("g", PValue::Message(g)),
            ],
        );
        assert_eq!(
            r.read(&p.encode_to_vec()).unwrap(),
            rec(vec![
                // `a` unset: absent (the column's DEFAULT, not the proto default 5).
                ("b", str("")),
                ("c", Value::Array(vec![Value::Int(1), Value::Int(-1)])),
                ("g", rec(vec![("x", Value::Int(9))])),
            ])
        );
    }

    #[test]
    fn zigzag_matches_kafka_varints() {
        let cases: [(&[u8], i32); 6] = [
            (&[0], 0),
            (&[1], -1),
            (&[2], 1),
            (&[0x7f], -64),
            (&[0x80, 0x01], 64),
            (&[0xfe, 0xff, 0xff, 0xff, 0x0f], i32::MAX),
        ];
        for (mut bytes, n) in cases {
            assert_eq!(read_zigzag(&mut bytes).unwrap(), n);
            assert!(bytes.is_empty());
        }
        assert_eq!(
            read_zigzag(&mut &[0xff, 0xff, 0xff, 0xff, 0x0f][..]).unwrap(),
            i32::MIN
        );
    }
}
