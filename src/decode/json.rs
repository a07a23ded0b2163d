//! JSON input: one object per message, top-level fields matched to columns by name.
//!
//! Values are converted while parsing (a serde `DeserializeSeed` per column
//! type writes RowBinary bytes straight into a scratch buffer), so a record is
//! parsed once and no intermediate tree is built. The row is assembled in
//! column order only when the whole record converted, so a bad record leaves
//! nothing behind.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{Decoder, RecordError, RecordErrorKind, UnknownFields};
use crate::schema::encode::{self, ConvertError};
use crate::schema::{ColumnType, Fill, TableSchema};

pub struct JsonDecoder {
    types: Vec<ColumnType>,
    /// Per column, what a missing value becomes: None sends "use the
    /// default" so that ClickHouse evaluates the column's DEFAULT expression;
    /// a column without one gets its type's default value written out,
    /// because RowBinaryWithDefaults would store an invalid 0 for an Enum.
    missing: Vec<crate::schema::Missing>,
    names: Vec<String>,
    /// Field name -> position among the inserted columns. Columns that the
    /// record cannot fill (DEFAULT-only) are absent: they always take their default.
    fields: Fields,
    unknown: UnknownFields,
    limits: super::DecodeLimits,
    /// The limits as the parser checks them, worked out once.
    top: Depth,
    scratch: Vec<u8>,
    slots: Vec<Slot>,
    /// `auto_add_columns`: every column name of the table (computed ones
    /// too), to tell a new field from one the table has.
    auto_add: Option<foldhash::HashSet<String>>,
}

#[derive(Clone, Copy)]
enum Slot {
    /// No field: the column's DEFAULT applies.
    Missing,
    /// Encoded bytes in the scratch buffer.
    Value(usize, usize),
}

impl JsonDecoder {
    pub fn new(
        table: &TableSchema,
        unknown: UnknownFields,
        limits: super::DecodeLimits,
    ) -> JsonDecoder {
        let mut types = Vec::new();
        let mut names = Vec::new();
        let mut fields = Vec::new();
        let mut missing = Vec::new();
        for (i, c) in table.insert_columns().enumerate() {
            if c.fill() == Fill::Field {
                fields.push((c.name.clone(), i));
            }
            missing.push(c.missing());
            types.push(c.ty.clone());
            names.push(c.name.clone());
        }
        JsonDecoder {
            slots: vec![Slot::Missing; types.len()],
            missing,
            types,
            names,
            fields: Fields::new(fields),
            unknown,
            top: Depth::top(&limits),
            limits,
            auto_add: None,
            scratch: Vec::with_capacity(1024),
        }
    }
}

impl JsonDecoder {
    /// Finds the fields that need new columns (see `Decoder::new_columns`).
    pub fn with_auto_add(mut self, table: &TableSchema, on: bool) -> JsonDecoder {
        self.auto_add = on.then(|| table.columns.iter().map(|c| c.name.clone()).collect());
        self
    }
}

/// The column type `auto_add_columns` gives a new field, from its first
/// value: whole numbers Int64 (UInt64 above its range), other numbers
/// Float64, strings String, booleans Bool, arrays Array(String) (any
/// element keeps its text), objects String (their JSON text). A null says
/// nothing: no column yet.
fn infer_type(raw: &str) -> Option<&'static str> {
    Some(match raw.as_bytes().first()? {
        b'"' => "String",
        b't' | b'f' => "Bool",
        b'[' => "Array(String)",
        b'{' => "String",
        b'n' => return None,
        _ if raw.parse::<i64>().is_ok() => "Int64",
        _ if raw.parse::<u64>().is_ok() => "UInt64",
        _ => "Float64",
    })
}

impl Decoder for JsonDecoder {
    fn new_columns(&mut self, rec: &super::Meta<'_>) -> Vec<(String, String)> {
        let Some(known) = &mut self.auto_add else {
            return Vec::new();
        };
        let Some(text) = rec
            .value
            .filter(|v| self.limits.check(Some(v)).is_ok())
            .and_then(|v| std::str::from_utf8(v).ok())
        else {
            return Vec::new();
        };
        // A record that does not parse is the decoder's to refuse, not ours.
        let Ok(fields) = raw_object(text) else {
            return Vec::new();
        };
        let mut new: Vec<(String, String)> = Vec::new();
        for (name, raw) in fields {
            if known.contains(&*name) || new.iter().any(|(n, _)| *n == *name) {
                continue;
            }
            if let Some(ty) = infer_type(raw.get()) {
                new.push((name.into_owned(), ty.to_string()));
            }
        }
        // Asked for once: if the column still does not come (another
        // replica's type, a concurrent DROP), the field is ignored like any
        // unknown one instead of asking on every record.
        known.extend(new.iter().map(|(n, _)| n.clone()));
        new
    }

    fn decode(&mut self, rec: &super::Meta<'_>, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.limits.check(rec.value)?;
        let value = match rec.value {
            Some(v) if !v.iter().all(u8::is_ascii_whitespace) => v,
            _ => {
                return Err(RecordError {
                    kind: RecordErrorKind::Empty,
                    column: None,
                    message: "the message has no value; expected a JSON object".into(),
                })
            }
        };
        self.scratch.clear();
        self.slots.fill(Slot::Missing);
        // Validated once here, so that the parser need not check each string.
        let value = std::str::from_utf8(value).map_err(|e| RecordError {
            kind: RecordErrorKind::Malformed,
            column: None,
            message: format!("the message is not UTF-8 text: {e}"),
        })?;
        let mut current = None;
        let mut de = serde_json::Deserializer::from_str(value);
        self.fields.next = 0;
        let parsed = de
            .deserialize_map(RowVisitor {
                types: &self.types,
                fields: &mut self.fields,
                unknown: self.unknown,
                scratch: &mut self.scratch,
                slots: &mut self.slots,
                current: &mut current,
                top: self.top,
            })
            .and_then(|()| de.end());
        if let Err(e) = parsed {
            let kind = match e.classify() {
                serde_json::error::Category::Data if e.to_string().starts_with(LIMIT) => {
                    RecordErrorKind::Limit
                }
                serde_json::error::Category::Data if current.is_some() => {
                    RecordErrorKind::Conversion
                }
                serde_json::error::Category::Data if e.to_string().starts_with(UNKNOWN) => {
                    RecordErrorKind::UnknownField
                }
                _ => RecordErrorKind::Malformed,
            };
            return Err(RecordError {
                kind,
                column: current.map(|i| self.names[i].clone()),
                message: e.to_string(),
            });
        }
        out.reserve(self.scratch.len() + self.slots.len());
        for (slot, missing) in self.slots.iter().zip(&self.missing) {
            match *slot {
                Slot::Missing => missing.write(out),
                Slot::Value(start, end) => {
                    out.push(0);
                    out.extend_from_slice(&self.scratch[start..end]);
                }
            }
        }
        Ok(())
    }
}

const UNKNOWN: &str = "unknown field";

/// Field names and their columns. Producers usually write the fields of
/// every record in the same order, so the field after the last one found is
/// tried first; only a miss pays for the hash lookup.
struct Fields {
    /// (name, column position), in the order fields were last seen.
    order: Vec<(String, usize)>,
    /// A fast hash: its keys are the table's column names, and a crafted
    /// field name can at worst collide with those few.
    index: foldhash::HashMap<String, usize>,
    /// Where in `order` the next field is expected.
    next: usize,
}

impl Fields {
    fn new(order: Vec<(String, usize)>) -> Fields {
        let index = order.iter().map(|(n, i)| (n.clone(), *i)).collect();
        Fields {
            order,
            index,
            next: 0,
        }
    }

    fn find(&mut self, key: &str) -> Option<usize> {
        if let Some((name, i)) = self.order.get(self.next) {
            if name == key {
                self.next += 1;
                return Some(*i);
            }
        }
        let i = *self.index.get(key)?;
        // Learn the producer's order: move the field to where it was expected.
        if let Some(at) = self.order.iter().position(|(_, c)| *c == i) {
            let target = self.next.min(self.order.len() - 1);
            let entry = self.order.remove(at);
            self.order.insert(target, entry);
            self.next = target + 1;
        }
        Some(i)
    }
}

struct RowVisitor<'a> {
    types: &'a [ColumnType],
    fields: &'a mut Fields,
    unknown: UnknownFields,
    scratch: &'a mut Vec<u8>,
    slots: &'a mut [Slot],
    current: &'a mut Option<usize>,
    top: Depth,
}

impl<'de> Visitor<'de> for RowVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            match self.fields.find(key.as_ref()) {
                Some(i) => {
                    *self.current = Some(i);
                    let start = self.scratch.len();
                    let filled = map.next_value_seed(ValueSeed {
                        ty: &self.types[i],
                        out: self.scratch,
                        at: self.top,
                    })?;
                    self.slots[i] = match filled {
                        Filled::Value => Slot::Value(start, self.scratch.len()),
                        // null for a non-Nullable column: the column's default, as ClickHouse does.
                        Filled::Null => Slot::Missing,
                    };
                    *self.current = None;
                }
                None if self.unknown == UnknownFields::Error => {
                    return Err(de::Error::custom(format!(
                        "{UNKNOWN} `{key}` matches no column (unknown_fields = \"error\")"
                    )));
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A map key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

enum Filled {
    Value,
    Null,
}

/// Converts one JSON value to the RowBinary form of `ty`.
struct ValueSeed<'a> {
    ty: &'a ColumnType,
    out: &'a mut Vec<u8>,
    /// How deep inside the record (inside an array or map there is no column
    /// default: a null for a non-Nullable type becomes the type's zero value).
    at: Depth,
}

/// A value's nesting level and the limits that bound what a record may make
/// the decoder do (`routes.limits`).
#[derive(Clone, Copy)]
struct Depth {
    level: u32,
    max_depth: u32,
    max_array_len: usize,
    max_string_bytes: usize,
}

/// Limit errors start with this, to be counted as `limit` failures.
const LIMIT: &str = "limit:";

impl Depth {
    fn top(limits: &super::DecodeLimits) -> Depth {
        Depth {
            level: 0,
            max_depth: u32::try_from(limits.max_depth).unwrap_or(u32::MAX),
            max_array_len: limits.max_array_len,
            max_string_bytes: usize::try_from(limits.max_string_bytes.as_u64())
                .unwrap_or(usize::MAX),
        }
    }

    fn nested(&self) -> bool {
        self.level > 0
    }

    /// One level further in, if the limit allows.
    fn inner<E: de::Error>(self) -> Result<Depth, E> {
        if self.level >= self.max_depth {
            return Err(E::custom(format!(
                "{LIMIT} nested deeper than limits.max_depth ({})",
                self.max_depth
            )));
        }
        Ok(Depth {
            level: self.level + 1,
            ..self
        })
    }

    fn string<E: de::Error>(&self, len: usize) -> Result<(), E> {
        if len > self.max_string_bytes {
            return Err(E::custom(format!(
                "{LIMIT} a string of {len} bytes is longer than limits.max_string_bytes ({})",
                self.max_string_bytes
            )));
        }
        Ok(())
    }

    fn count<E: de::Error>(&self, n: u64) -> Result<(), E> {
        if n > self.max_array_len as u64 {
            return Err(E::custom(format!(
                "{LIMIT} more than limits.max_array_len ({}) elements",
                self.max_array_len
            )));
        }
        Ok(())
    }
}

/// Strips the wrappers that do not change how a value is written (LowCardinality)
/// and says whether a null flag byte comes first (Nullable).
fn base_type(ty: &ColumnType) -> (&ColumnType, bool) {
    match ty {
        ColumnType::LowCardinality(t) => base_type(t),
        ColumnType::Nullable(t) => (base_type(t).0, true),
        t => (t, false),
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Filled;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Filled, D::Error> {
        let (base, nullable) = base_type(self.ty);
        let by_text = matches!(
            base,
            ColumnType::String | ColumnType::Json | ColumnType::Variant(_) | ColumnType::Dynamic
        ) || base.needs_exact_number();
        if !by_text {
            return d.deserialize_any(TypedVisitor {
                ty: base,
                nullable,
                out: self.out,
                at: self.at,
            });
        }
        // These types need the value's exact text: strings keep the text of
        // non-string values (numbers are not re-formatted, objects stay as
        // sent, as ClickHouse's JSON input does), decimals and wide integers
        // keep every digit, and Variant and Dynamic choose a type from it.
        let raw = <&RawValue as de::Deserialize>::deserialize(d)?;
        let text = raw.get();
        self.at.string(text.len())?;
        if text == "null" {
            return Ok(self.null(base, nullable));
        }
        if nullable {
            self.out.push(0);
        }
        match base {
            ColumnType::String => match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                Some(inner) if !inner.contains('\\') => {
                    encode::write_bytes(self.out, inner.as_bytes())
                }
                Some(_) => encode::write_bytes(self.out, unquote(text)?.as_bytes()),
                None => encode::write_bytes(self.out, text.as_bytes()),
            },
            ColumnType::Json if text.starts_with('{') => {
                encode::write_bytes(self.out, text.as_bytes())
            }
            ColumnType::Json => {
                return Err(de::Error::custom(format!(
                    "expected a JSON object for JSON, got {text}"
                )))
            }
            ColumnType::Variant(variants) => write_variant(variants, text, self.out, self.at)?,
            ColumnType::Dynamic => write_dynamic(text, self.out)?,
            _ => {
                let r = if text.starts_with('"') {
                    let s = unquote(text)?;
                    exact_number(base, &s, self.out)
                } else if text.starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])
                {
                    exact_number(base, text, self.out)
                } else {
                    Err(ConvertError(format!("expected {base}, got {text}")))
                };
                r.map_err(de::Error::custom)?;
            }
        }
        Ok(Filled::Value)
    }
}

/// Converts one JSON value given as text to `ty`, as the JSON decoder
/// converts a field (constants in the config, CSV cells of container types).
pub fn convert_json(ty: &ColumnType, text: &str, out: &mut Vec<u8>) -> Result<(), ConvertError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let start = out.len();
    let at = Depth {
        level: 1,
        ..Depth::top(&super::DecodeLimits::default())
    };
    let r = ValueSeed { ty, out, at }
        .deserialize(&mut de)
        .and_then(|_| de.end());
    r.map_err(|e| {
        out.truncate(start);
        ConvertError(e.to_string())
    })
}

/// A JSON object's top-level fields, each kept as its text: the mapped JSON
/// decoder finds nested fields by parsing only the objects on a path.
pub struct JsonFields<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> JsonFields<'a> {
    pub fn parse(text: &'a str) -> Result<JsonFields<'a>, serde_json::Error> {
        Ok(JsonFields {
            fields: raw_object(text)?,
        })
    }
}

fn raw_object(text: &str) -> Result<Vec<(Cow<'_, str>, &RawValue)>, serde_json::Error> {
    struct ObjectVisitor;
    impl<'de> Visitor<'de> for ObjectVisitor {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Vec::new();
            while let Some(Key(key)) = map.next_key()? {
                fields.push((key, map.next_value::<&RawValue>()?));
            }
            Ok(fields)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de.deserialize_map(ObjectVisitor)?;
    de.end()?;
    Ok(fields)
}

impl<'a> super::mapping::Fields<'a> for JsonFields<'a> {
    fn get(&self, path: &[String]) -> Option<Cow<'_, super::value::Value<'a>>> {
        let (first, rest) = path.split_first()?;
        let mut cur: &'a RawValue = self.fields.iter().find(|(n, _)| n == first)?.1;
        for name in rest {
            let text: &'a str = cur.get();
            cur = raw_object(text)
                .ok()?
                .into_iter()
                .find(|(n, _)| n == name)?
                .1;
        }
        Some(Cow::Owned(super::value::Value::Json(Cow::Borrowed(
            cur.get(),
        ))))
    }

    fn names(&self) -> Vec<Cow<'_, str>> {
        self.fields
            .iter()
            .map(|(n, _)| Cow::Borrowed(&**n))
            .collect()
    }
}

/// The text of a JSON string literal.
fn unquote<E: de::Error>(literal: &str) -> Result<String, E> {
    serde_json::from_str(literal).map_err(E::custom)
}

fn exact_number(ty: &ColumnType, text: &str, out: &mut Vec<u8>) -> Result<(), ConvertError> {
    match ty {
        ColumnType::Decimal { .. } => encode::write_decimal_str(ty, text, out),
        _ => encode::write_numeric_str(ty, text, out),
    }
}

/// A Variant takes the first of its types that the value converts to, in an
/// order that keeps the value exact: for a JSON string the string types come
/// first; for a whole number the integer types, then Decimal, then floats; for
/// other numbers floats, then Decimal; the string types always last otherwise
/// (a number must not become its own text when a numeric type can hold it).
fn write_variant<E: de::Error>(
    variants: &[ColumnType],
    text: &str,
    out: &mut Vec<u8>,
    at: Depth,
) -> Result<(), E> {
    let quoted = text.starts_with('"');
    let whole = !quoted && !text.contains(['.', 'e', 'E']);
    let rank = |t: &ColumnType| -> u8 {
        let t = base_type(t).0;
        match t {
            ColumnType::String | ColumnType::FixedString(_) => {
                if quoted {
                    0
                } else {
                    4
                }
            }
            t if t.is_integer() && whole => 0,
            ColumnType::Decimal { .. } if !quoted => 1,
            ColumnType::Float32 | ColumnType::Float64 | ColumnType::BFloat16 if !quoted => {
                if whole {
                    2
                } else {
                    0
                }
            }
            _ => 3,
        }
    };
    let mut order: Vec<(usize, &ColumnType)> = variants.iter().enumerate().collect();
    order.sort_by_key(|(_, t)| rank(t));
    let mut tried = Vec::new();
    for (i, ty) in order {
        let start = out.len();
        out.push(i as u8);
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = ValueSeed {
            ty,
            out,
            at: Depth {
                level: at.level.max(1),
                ..at
            },
        };
        match seed.deserialize(&mut de) {
            Ok(_) => return Ok(()),
            Err(e) => {
                out.truncate(start);
                tried.push(format!("{ty}: {e}"));
            }
        }
    }
    Err(E::custom(format!(
        "{text} fits none of the Variant's types ({})",
        tried.join("; ")
    )))
}

/// A Dynamic value takes the type its JSON value has: Int64 (UInt64 above
/// its range), Float64, Bool, String, NULL, or an array of one such type.
/// Unlike ClickHouse's JSON input it does not guess dates inside strings.
fn write_dynamic<E: de::Error>(text: &str, out: &mut Vec<u8>) -> Result<(), E> {
    use encode::dynamic_type as t;
    let v: serde_json::Value = serde_json::from_str(text).map_err(E::custom)?;
    fn scalar_type(v: &serde_json::Value) -> Option<u8> {
        use serde_json::Value as J;
        Some(match v {
            J::Bool(_) => t::BOOL,
            J::Number(n) if n.is_i64() => t::INT64,
            J::Number(n) if n.is_u64() => t::UINT64,
            J::Number(_) => t::FLOAT64,
            J::String(_) => t::STRING,
            _ => return None,
        })
    }
    fn scalar(code: u8, v: &serde_json::Value, out: &mut Vec<u8>) {
        use serde_json::Value as J;
        match (code, v) {
            (t::BOOL, J::Bool(b)) => out.push(u8::from(*b)),
            (t::INT64, J::Number(n)) => {
                out.extend_from_slice(&n.as_i64().unwrap_or_default().to_le_bytes())
            }
            (t::UINT64, J::Number(n)) => {
                out.extend_from_slice(&n.as_u64().unwrap_or_default().to_le_bytes())
            }
            (t::FLOAT64, J::Number(n)) => {
                out.extend_from_slice(&n.as_f64().unwrap_or_default().to_le_bytes())
            }
            (t::STRING, J::String(s)) => encode::write_bytes(out, s.as_bytes()),
            _ => {}
        }
    }
    match &v {
        serde_json::Value::Null => out.push(t::NOTHING),
        serde_json::Value::Array(items) => {
            // One element type for all (Int64 widens to Float64); NULLs make it Nullable.
            let mut elem: Option<u8> = None;
            let mut nulls = false;
            for item in items {
                let code = match item {
                    serde_json::Value::Null => {
                        nulls = true;
                        continue;
                    }
                    other => scalar_type(other),
                };
                elem = match (elem, code) {
                    (_, None) => None,
                    (None, c) => c,
                    (Some(a), Some(b)) if a == b => Some(a),
                    (
                        Some(t::INT64 | t::UINT64 | t::FLOAT64),
                        Some(t::INT64 | t::UINT64 | t::FLOAT64),
                    ) => Some(t::FLOAT64),
                    _ => None,
                };
                if elem.is_none() {
                    return Err(E::custom(format!(
                        "the array {text} mixes element types; Dynamic takes arrays of one scalar type"
                    )));
                }
            }
            let code = elem.unwrap_or(t::STRING);
            out.push(t::ARRAY);
            if nulls {
                out.push(t::NULLABLE);
            }
            out.push(code);
            encode::write_varint(out, items.len() as u64);
            for item in items {
                match item {
                    // A NULL element of a Nullable array is its flag alone.
                    serde_json::Value::Null => out.push(1),
                    v => {
                        if nulls {
                            out.push(0);
                        }
                        if code == t::FLOAT64 {
                            scalar(
                                code,
                                &serde_json::Value::from(v.as_f64().unwrap_or_default()),
                                out,
                            );
                        } else {
                            scalar(code, v, out);
                        }
                    }
                }
            }
        }
        serde_json::Value::Object(_) => {
            return Err(E::custom(
                "an object cannot be a Dynamic value; use a JSON, Map or Tuple column",
            ))
        }
        v => {
            let code = scalar_type(v).unwrap_or(t::STRING);
            out.push(code);
            scalar(code, v, out);
        }
    }
    Ok(())
}

impl ValueSeed<'_> {
    fn null(self, base: &ColumnType, nullable: bool) -> Filled {
        null_value(base, nullable, self.at.nested(), self.out)
    }
}

fn null_value(base: &ColumnType, nullable: bool, nested: bool, out: &mut Vec<u8>) -> Filled {
    if nullable {
        out.push(1);
        Filled::Value
    } else if nested {
        encode::write_zero(base, out);
        Filled::Value
    } else {
        Filled::Null
    }
}

struct TypedVisitor<'a> {
    ty: &'a ColumnType,
    nullable: bool,
    out: &'a mut Vec<u8>,
    at: Depth,
}

impl TypedVisitor<'_> {
    /// A named tuple from an object, as ClickHouse's JSON input reads it:
    /// elements by name in any order, a missing one takes its type's default
    /// (zero) value, unknown keys are ignored.
    fn named_tuple<'de, A: MapAccess<'de>>(
        mut self,
        els: &[(Option<String>, ColumnType)],
        mut map: A,
    ) -> Result<Filled, A::Error> {
        if els.iter().any(|(name, _)| name.is_none()) {
            return self.wrong("an object (the tuple's elements have no names)");
        }
        let inner = self.at.inner()?;
        let mut values: Vec<Option<Vec<u8>>> = vec![None; els.len()];
        while let Some(Key(key)) = map.next_key()? {
            match els.iter().position(|(n, _)| n.as_deref() == Some(&*key)) {
                Some(i) => {
                    let mut buf = Vec::new();
                    map.next_value_seed(ValueSeed {
                        ty: &els[i].1,
                        out: &mut buf,
                        at: inner,
                    })?;
                    values[i] = Some(buf);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        self.begin();
        for (value, (_, ty)) in values.into_iter().zip(els) {
            match value {
                Some(v) => self.out.extend_from_slice(&v),
                None => encode::write_zero(ty, self.out),
            }
        }
        Ok(Filled::Value)
    }

    fn begin(&mut self) {
        if self.nullable {
            self.out.push(0);
        }
    }

    fn done<E: de::Error>(self, r: Result<(), ConvertError>) -> Result<Filled, E> {
        r.map(|()| Filled::Value).map_err(E::custom)
    }

    fn wrong<E: de::Error>(&self, what: &str) -> Result<Filled, E> {
        Err(E::custom(format!("expected {}, got {what}", self.ty)))
    }

    fn int<E: de::Error>(mut self, v: i128) -> Result<Filled, E> {
        if !self.ty.accepts_number() {
            return self.wrong(&format!("the number {v}"));
        }
        self.begin();
        let r = encode::write_integer(self.ty, v, self.out);
        self.done(r)
    }
}

impl<'de> Visitor<'de> for TypedVisitor<'_> {
    type Value = Filled;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a value of type {}", self.ty)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Filled, E> {
        Ok(null_value(
            self.ty,
            self.nullable,
            self.at.nested(),
            self.out,
        ))
    }

    fn visit_none<E: de::Error>(self) -> Result<Filled, E> {
        self.visit_unit()
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Filled, E> {
        match self.ty {
            t if t.is_integer() || matches!(t, ColumnType::Bool) => self.int(i128::from(v)),
            _ => self.wrong(&format!("the boolean {v}")),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Filled, E> {
        self.int(i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Filled, E> {
        self.int(i128::from(v))
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<Filled, E> {
        if !self.ty.accepts_number() || matches!(self.ty, ColumnType::Bool) {
            return self.wrong(&format!("the number {v}"));
        }
        self.begin();
        let r = encode::write_f64(self.ty, v, self.out);
        self.done(r)
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<Filled, E> {
        self.at.string(v.len())?;
        if !self.ty.accepts_text() {
            return self.wrong(&format!("the string {v:?}"));
        }
        self.begin();
        let r = encode::write_str(self.ty, v, self.out);
        self.done(r)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Filled, A::Error> {
        if let ColumnType::Tuple(els) = self.ty {
            // A tuple from an array: its elements in order, all of them.
            let inner = self.at.inner()?;
            self.begin();
            for (i, (_, ty)) in els.iter().enumerate() {
                let seed = ValueSeed {
                    ty,
                    out: self.out,
                    at: inner,
                };
                if seq.next_element_seed(seed)?.is_none() {
                    return Err(de::Error::custom(format!(
                        "expected {} elements for {}, got {i}",
                        els.len(),
                        self.ty
                    )));
                }
            }
            if seq.next_element::<IgnoredAny>()?.is_some() {
                return Err(de::Error::custom(format!(
                    "expected {} elements for {}, got more",
                    els.len(),
                    self.ty
                )));
            }
            return Ok(Filled::Value);
        }
        let (elem, exact) = match self.ty {
            ColumnType::Array(elem) => (&**elem, None),
            ColumnType::QBit(elem, n) => (&**elem, Some(*n as u64)),
            _ => return self.wrong("an array"),
        };
        let inner = self.at.inner()?;
        self.begin();
        let start = self.out.len();
        let mut count = 0u64;
        while seq
            .next_element_seed(ValueSeed {
                ty: elem,
                out: self.out,
                at: inner,
            })?
            .is_some()
        {
            count += 1;
            self.at.count(count)?;
        }
        if let Some(n) = exact.filter(|n| *n != count) {
            return Err(de::Error::custom(format!(
                "expected {n} elements for {}, got {count}",
                self.ty
            )));
        }
        encode::insert_len_prefix(self.out, start, count);
        Ok(Filled::Value)
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Filled, A::Error> {
        if let ColumnType::Tuple(els) = self.ty {
            return self.named_tuple(els, map);
        }
        let ColumnType::Map(key_ty, value_ty) = self.ty else {
            return self.wrong("an object");
        };
        let inner = self.at.inner()?;
        self.begin();
        let start = self.out.len();
        let mut count = 0u64;
        while let Some(Key(key)) = map.next_key()? {
            TypedVisitor {
                ty: base_type(key_ty).0,
                nullable: false,
                out: self.out,
                at: inner,
            }
            .visit_str::<A::Error>(&key)?;
            map.next_value_seed(ValueSeed {
                ty: value_ty,
                out: self.out,
                at: inner,
            })?;
            count += 1;
            self.at.count(count)?;
        }
        encode::insert_len_prefix(self.out, start, count);
        Ok(Filled::Value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cols: &[(&str, &str)]) -> TableSchema {
        TableSchema::from_columns("db", "t", cols)
    }

    fn decode(cols: &[(&str, &str)], json: &str) -> Result<Vec<u8>, RecordError> {
        let mut d = JsonDecoder::new(
            &table(cols),
            UnknownFields::Ignore,
            crate::decode::DecodeLimits::default(),
        );
        let mut out = Vec::new();
        d.decode(
            &crate::kafka::Record::value_only(Some(json.as_bytes())),
            &mut out,
        )
        .map(|()| out)
    }

    #[test]
    fn fields_map_by_name_in_column_order() {
        let out = decode(
            &[("id", "UInt32"), ("name", "String")],
            r#"{"name":"ab","extra":{"x":[1]},"id":7}"#,
        )
        .unwrap();
        assert_eq!(out, [0, 7, 0, 0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn missing_and_null_fields_take_the_default_and_nullable_gets_null() {
        // No DEFAULT expression: the type's default value is written out.
        let out = decode(
            &[
                ("a", "UInt8"),
                ("b", "Nullable(UInt8)"),
                ("c", "Enum8('x' = -2, 'y' = 1)"),
            ],
            r#"{"a":null,"b":null}"#,
        )
        .unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0, 0xfe]);
        // A DEFAULT expression: "use the default" is sent for ClickHouse to evaluate.
        let mut t = table(&[("a", "UInt8")]);
        t.columns[0].default_kind = crate::schema::DefaultKind::Default;
        t.columns[0].default_expression = "7".into();
        let mut d = JsonDecoder::new(
            &t,
            UnknownFields::Ignore,
            crate::decode::DecodeLimits::default(),
        );
        let mut out = Vec::new();
        d.decode(&crate::kafka::Record::value_only(Some(b"{}")), &mut out)
            .unwrap();
        assert_eq!(out, [1]);
    }

    #[test]
    fn strings_keep_the_exact_text_of_other_values() {
        let out = decode(&[("s", "String")], r#"{"s":12.50}"#).unwrap();
        assert_eq!(out, [0, 5, b'1', b'2', b'.', b'5', b'0']);
        let out = decode(&[("s", "LowCardinality(String)")], r#"{"s":"a\"b"}"#).unwrap();
        assert_eq!(out, [0, 3, b'a', b'"', b'b']);
    }

    #[test]
    fn arrays_and_maps_are_length_prefixed() {
        let out = decode(
            &[("a", "Array(Nullable(Int8))"), ("m", "Map(String, UInt8)")],
            r#"{"a":[1,null,-1],"m":{"k":2}}"#,
        )
        .unwrap();
        assert_eq!(out, [0, 3, 0, 1, 1, 0, 0xff, 0, 1, 1, b'k', 2]);
    }

    #[test]
    fn tuples_from_arrays_and_named_tuples_from_objects() {
        let cols = [
            ("t", "Tuple(UInt8, Nullable(String))"),
            ("n", "Tuple(a UInt16, b Array(String))"),
        ];
        // The named one: elements by name in any order; a missing one is zero,
        // an unknown key ignored.
        let out = decode(&cols, r#"{"t":[1,null],"n":{"b":["q"],"zz":1}}"#).unwrap();
        assert_eq!(out, [0, 1, 1, 0, 0, 0, 1, 1, b'q']);
        let out = decode(&cols, r#"{"t":[2,"x"],"n":{"a":258,"b":[]}}"#).unwrap();
        assert_eq!(out, [0, 2, 0, 1, b'x', 0, 2, 1, 0]);
        // An unnamed tuple needs all its elements, no more.
        for bad in [r#"{"t":[1]}"#, r#"{"t":[1,"x",3]}"#, r#"{"t":{"a":1}}"#] {
            let e = decode(&cols, bad).unwrap_err();
            assert_eq!(e.column.as_deref(), Some("t"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn conversion_errors_name_the_column_and_leave_nothing() {
        let mut d = JsonDecoder::new(
            &table(&[("a", "UInt8"), ("b", "UInt8")]),
            UnknownFields::Ignore,
            crate::decode::DecodeLimits::default(),
        );
        let mut out = vec![42];
        let e = d
            .decode(
                &crate::kafka::Record::value_only(Some(br#"{"a":1,"b":300}"#)),
                &mut out,
            )
            .unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::Conversion);
        assert_eq!(e.column.as_deref(), Some("b"));
        assert!(e.message.contains("300 is out of range for UInt8"), "{e}");
        assert_eq!(out, [42]);
    }

    #[test]
    fn malformed_and_empty_records_are_classified() {
        let cols = [("a", "UInt8")];
        assert_eq!(
            decode(&cols, "{\"a\":").unwrap_err().kind,
            RecordErrorKind::Malformed
        );
        assert_eq!(
            decode(&cols, "[1,2]").unwrap_err().kind,
            RecordErrorKind::Malformed
        );
        assert_eq!(
            decode(&cols, "{} x").unwrap_err().kind,
            RecordErrorKind::Malformed
        );
        let mut d = JsonDecoder::new(
            &table(&cols),
            UnknownFields::Ignore,
            crate::decode::DecodeLimits::default(),
        );
        assert_eq!(
            d.decode(&crate::kafka::Record::value_only(None), &mut Vec::new())
                .unwrap_err()
                .kind,
            RecordErrorKind::Empty
        );
    }

    #[test]
    fn unknown_fields_can_be_errors() {
        let mut d = JsonDecoder::new(
            &table(&[("a", "UInt8")]),
            UnknownFields::Error,
            crate::decode::DecodeLimits::default(),
        );
        let e = d
            .decode(
                &crate::kafka::Record::value_only(Some(br#"{"a":1,"zz":2}"#)),
                &mut Vec::new(),
            )
            .unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::UnknownField);
        assert!(e.message.contains("`zz`"), "{e}");
    }

    #[test]
    fn typed_values_from_numbers_and_strings() {
        let out = decode(
            &[
                ("d", "Date"),
                ("t", "DateTime"),
                ("b", "Bool"),
                ("u", "UInt64"),
                ("f", "Float32"),
            ],
            r#"{"d":"1970-01-03","t":86400,"b":true,"u":"42","f":1}"#,
        )
        .unwrap();
        let mut want = vec![0, 2, 0, 0];
        want.extend_from_slice(&86400u32.to_le_bytes());
        want.extend_from_slice(&[0, 1, 0]);
        want.extend_from_slice(&42u64.to_le_bytes());
        want.push(0);
        want.extend_from_slice(&1f32.to_le_bytes());
        assert_eq!(out, want);
    }
}
