//! From the file as written to checked [`ReadModel`]s: every name
//! resolved, every expression parsed, every type compared, each mistake
//! reported with its line and column.

use std::collections::HashSet;
use std::ops::Range;

use factline_projections::{is_plain_name as plain_name, is_valid_name as model_name};
use indexmap::IndexMap;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::expr::{parse_condition, parse_value, ColumnType, Cond, Expr, Val};
use crate::file::{
    ColumnDef, FileDef, IfExistsDef, IfMissingDef, LookupDef, OnErrorDef, OpDef, PanelDef,
    QueryDef, ReadModelDef, TableDef, ValueDef,
};
use crate::model::{
    Change, Column, Lookup, OnError, Op, OpKind, Panel, PanelParam, Query, ReadModel, Table,
    ValueSpec,
};
use crate::sql::{not_read_only, scan, Piece};
use crate::{DefinitionError, DefinitionErrors, Definitions};

mod operations;
mod queries;

use operations::op_def;
use queries::{panel_def, query_def};

/// Collects errors with their place in the file.
pub(crate) struct Checker<'a> {
    text: &'a str,
    origin: &'a str,
    pub errors: Vec<DefinitionError>,
}

impl<'a> Checker<'a> {
    pub fn new(text: &'a str, origin: &'a str) -> Self {
        Checker {
            text,
            origin,
            errors: Vec::new(),
        }
    }

    pub fn error_at(&mut self, offset: usize, message: impl Into<String>) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.errors.push(DefinitionError {
            origin: self.origin.to_owned(),
            line,
            column,
            message: message.into(),
        });
    }

    fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.error_at(span.start, message);
    }

    /// Where inside a quoted string value an offset of its content is.
    fn inside(span: &Range<usize>, offset: usize) -> usize {
        span.start + 1 + offset
    }

    fn condition(&mut self, text: &Spanned<String>) -> Option<Cond> {
        match parse_condition(text.get_ref()) {
            Ok(c) => Some(c),
            Err(e) => {
                let at = Self::inside(&text.span(), e.offset);
                self.error_at(at, format!("condition: {}", e.message));
                None
            }
        }
    }
}

pub(crate) fn check(text: &str, origin: &str) -> Result<Definitions, DefinitionErrors> {
    let mut checker = Checker::new(text, origin);
    let file: FileDef = match toml::from_str(text) {
        Ok(file) => file,
        Err(e) => {
            let at = e.span().map_or(0, |s| s.start);
            checker.error_at(at, e.message().trim_end().to_owned());
            return Err(DefinitionErrors(checker.errors));
        }
    };
    // The same file untyped, for fingerprints that ignore layout and
    // comments.
    let untyped: toml::Table = toml::from_str(text).unwrap_or_default();
    let mut seen = HashSet::new();
    let mut read_models = Vec::new();
    for (index, def) in file.read_models.iter().enumerate() {
        if !seen.insert(def.name.get_ref().clone()) {
            checker.error(
                &def.name.span(),
                format!("a second read model named {:?}", def.name.get_ref()),
            );
        }
        let raw = untyped
            .get("read_model")
            .and_then(|v| v.as_array())
            .and_then(|all| all.get(index));
        if let Some(model) = read_model(&mut checker, def, raw) {
            read_models.push(model);
        }
    }
    if checker.errors.is_empty() {
        Ok(Definitions { read_models })
    } else {
        Err(DefinitionErrors(checker.errors))
    }
}

fn fingerprint(raw: Option<&toml::Value>) -> String {
    let mut value = serde_json::to_value(raw).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        // What does not decide the tables' content.
        for key in ["name", "version", "description", "queries", "panels"] {
            map.remove(key);
        }
    }
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn read_model(
    c: &mut Checker<'_>,
    def: &ReadModelDef,
    raw: Option<&toml::Value>,
) -> Option<ReadModel> {
    let errors_before = c.errors.len();
    let name = def.name.get_ref().clone();
    if !model_name(&name) {
        c.error(
            &def.name.span(),
            format!("read model name {name:?} must be 1 to 100 letters, digits, `_`, `-` or `.`"),
        );
    }
    let version = match u32::try_from(*def.version.get_ref()) {
        Ok(v) if v >= 1 => v,
        _ => {
            c.error(&def.version.span(), "version must be a whole number from 1");
            1
        }
    };
    let mut categories = Vec::new();
    for category in &def.categories {
        match factline_core::check_category(category.get_ref()) {
            Ok(()) => categories.push(category.get_ref().clone()),
            Err(e) => c.error(&category.span(), format!("category: {e}")),
        }
    }
    let when = def.when.as_ref().and_then(|w| c.condition(w));
    if def.tables.is_empty() {
        c.error(
            &def.name.span(),
            format!("read model {name} declares no tables"),
        );
    }
    let tables: Vec<Table> = def
        .tables
        .iter()
        .filter_map(|(table_name, table)| table_def(c, table_name, table))
        .collect();
    let mut model = ReadModel {
        name: name.clone(),
        version,
        description: def.description.clone(),
        categories,
        when,
        on_error: match def.on_error {
            Some(OnErrorDef::Stop) => OnError::Stop,
            _ => OnError::Park,
        },
        tables,
        lookups: Vec::new(),
        handlers: Vec::new(),
        queries: Vec::new(),
        panels: Vec::new(),
        fingerprint: fingerprint(raw),
    };
    for (lookup_name, lookup) in &def.lookups {
        if let Some(l) = lookup_def(c, &model, lookup_name, lookup) {
            model.lookups.push(l);
        }
    }
    if def.on.is_empty() {
        c.error(&def.name.span(), format!("read model {name} applies no event types: add [[read_model.on.<EventType>]] operations"));
    }
    for (event_type, ops) in &def.on {
        let checked: Vec<Op> = ops.iter().filter_map(|op| op_def(c, &model, op)).collect();
        model.handlers.push((event_type.clone(), checked));
    }
    for (query_name, query) in &def.queries {
        if let Some(q) = query_def(c, &model, query_name, query) {
            model.queries.push(q);
        }
    }
    for panel in &def.panels {
        if let Some(p) = panel_def(c, &model, panel) {
            model.panels.push(p);
        }
    }
    (c.errors.len() == errors_before).then_some(model)
}

fn table_def(c: &mut Checker<'_>, name: &str, def: &Spanned<TableDef>) -> Option<Table> {
    let span = def.span();
    let def = def.get_ref();
    if !plain_name(name) {
        c.error(&span, format!("table name {name:?} must be 1 to 50 lower-case letters, digits or _, not starting with a digit"));
    }
    if def.columns.is_empty() {
        c.error(&span, format!("table {name} has no columns"));
    }
    let mut columns = Vec::new();
    for (column_name, column) in &def.columns {
        let at = column.span();
        if !plain_name(column_name) {
            c.error(&at, format!("column name {column_name:?} must be 1 to 50 lower-case letters, digits or _, not starting with a digit"));
        }
        let (ty, nullable, default) = match column.get_ref() {
            ColumnDef::Type(ty) => (ty.as_str(), false, None),
            ColumnDef::Full {
                ty,
                nullable,
                default,
            } => (ty.as_str(), *nullable, default.as_ref()),
        };
        let Some(ty) = ColumnType::parse(ty) else {
            c.error(
                &at,
                format!("column {name}.{column_name}: unknown type {ty:?} (text, integer or real)"),
            );
            continue;
        };
        let default = match default.map(|d| (d, Val::from_toml(d))) {
            None => None,
            Some((d, None)) => {
                c.error(&at, format!("column {name}.{column_name}: default {d:?} is not a text, number or boolean"));
                None
            }
            Some((_, Some(v))) => {
                if let Some(problem) = type_problem(&v, ty) {
                    c.error(
                        &at,
                        format!("column {name}.{column_name}: default {v} {problem}"),
                    );
                }
                Some(v)
            }
        };
        columns.push(Column {
            name: column_name.clone(),
            ty,
            nullable,
            default,
        });
    }
    let known = |c: &str| columns.iter().any(|col| col.name == c);
    let mut key = Vec::new();
    for k in &def.key {
        if !known(k.get_ref()) {
            c.error(
                &k.span(),
                format!("key column {:?} is not a column of {name}", k.get_ref()),
            );
        }
        key.push(k.get_ref().clone());
    }
    let mut indexes = Vec::new();
    for index in &def.indexes {
        if index.get_ref().is_empty() {
            c.error(&index.span(), format!("an index of {name} has no columns"));
        }
        for column in index.get_ref() {
            if !known(column) {
                c.error(
                    &index.span(),
                    format!("index column {column:?} is not a column of {name}"),
                );
            }
        }
        indexes.push(index.get_ref().clone());
    }
    Some(Table {
        name: name.to_owned(),
        columns,
        key,
        indexes,
    })
}

/// Why `value` cannot be stored in a column of type `ty`, if it cannot.
pub(crate) fn type_problem(value: &Val, ty: ColumnType) -> Option<String> {
    let fits = matches!(
        (value, ty),
        (Val::Null, _)
            | (Val::Text(_), ColumnType::Text)
            | (Val::Int(_) | Val::Bool(_), ColumnType::Integer)
            | (Val::Int(_) | Val::Real(_), ColumnType::Real)
    );
    (!fits).then(|| format!("is {}, not {}", value.kind(), ty.name()))
}

/// A value of the file, parsed; `lookups` says whether it may read one.
fn value_def(
    c: &mut Checker<'_>,
    model: &ReadModel,
    def: &Spanned<ValueDef>,
    lookups: bool,
) -> Option<ValueSpec> {
    let span = def.span();
    let (text, default) = match def.get_ref() {
        ValueDef::Int(i) => return Some(constant(Val::Int(*i))),
        ValueDef::Float(f) => return Some(constant(Val::Real(*f))),
        ValueDef::Bool(b) => return Some(constant(Val::Bool(*b))),
        ValueDef::Expr(text) => (text.as_str(), None),
        ValueDef::Full { from, default } => (from.as_str(), default.as_ref()),
    };
    let expr = match parse_value(text) {
        Ok(e) => e,
        Err(e) => {
            // A plain string's text starts one byte after its quote.
            let at = match def.get_ref() {
                ValueDef::Expr(_) => Checker::inside(&span, e.offset),
                _ => span.start,
            };
            c.error_at(at, format!("value {text:?}: {}", e.message));
            return None;
        }
    };
    if let Expr::Lookup(name) = &expr {
        if !lookups {
            c.error(
                &span,
                format!("{text:?}: a lookup's key cannot read another lookup"),
            );
            return None;
        }
        if model.lookup(name).is_none() {
            c.error(
                &span,
                format!("unknown lookup {name:?}: declare it under [read_model.lookups.{name}]"),
            );
            return None;
        }
    }
    let default = match default {
        None => None,
        Some(d) => match Val::from_toml(d) {
            Some(v) => Some(v),
            None => {
                c.error(
                    &span,
                    format!("default {d:?} is not a text, number or boolean"),
                );
                return None;
            }
        },
    };
    Some(ValueSpec { expr, default })
}

fn constant(v: Val) -> ValueSpec {
    ValueSpec {
        expr: Expr::Const(v),
        default: None,
    }
}

/// The type a value has before any event, counting its default.
fn value_type(model: &ReadModel, value: &ValueSpec) -> Option<ColumnType> {
    match &value.expr {
        Expr::Lookup(name) => {
            let lookup = model.lookup(name)?;
            Some(model.table(&lookup.table)?.column(&lookup.column)?.ty)
        }
        e => e.static_type(),
    }
}

/// Checks that `value` can go into `column` of `table`.
fn check_column_value(
    c: &mut Checker<'_>,
    model: &ReadModel,
    table: &Table,
    column: &str,
    value: &ValueSpec,
    span: &Range<usize>,
) {
    let Some(col) = table.column(column) else {
        c.error(
            span,
            format!("{column:?} is not a column of {}", table.name),
        );
        return;
    };
    if let Some(ty) = value_type(model, value) {
        let compatible = ty == col.ty || (ty == ColumnType::Integer && col.ty == ColumnType::Real);
        if !compatible {
            c.error(
                span,
                format!(
                    "{} is {}, column {}.{column} is {}",
                    value.expr,
                    ty.name(),
                    table.name,
                    col.ty.name()
                ),
            );
        }
    }
    if let Some(d) = &value.default {
        if let Some(problem) = type_problem(d, col.ty) {
            c.error(
                span,
                format!("default {d} for {}.{column} {problem}", table.name),
            );
        }
    }
    if matches!(value.expr, Expr::Const(Val::Null)) && !col.nullable {
        c.error(
            span,
            format!("column {}.{column} is not nullable", table.name),
        );
    }
}

fn lookup_def(
    c: &mut Checker<'_>,
    model: &ReadModel,
    name: &str,
    def: &Spanned<LookupDef>,
) -> Option<Lookup> {
    let span = def.span();
    let def = def.get_ref();
    let Some(table) = model.table(&def.table).cloned() else {
        c.error(
            &span,
            format!(
                "lookup {name}: table {:?} is not declared in this read model",
                def.table
            ),
        );
        return None;
    };
    if table.column(&def.column).is_none() {
        c.error(
            &span,
            format!(
                "lookup {name}: {:?} is not a column of {}",
                def.column, table.name
            ),
        );
    }
    if def.key.is_empty() {
        c.error(&span, format!("lookup {name} has no key"));
    }
    let mut key = Vec::new();
    for (column, value) in &def.key {
        if let Some(v) = value_def(c, model, value, false) {
            check_column_value(c, model, &table, column, &v, &value.span());
            key.push((column.clone(), v));
        }
    }
    Some(Lookup {
        name: name.to_owned(),
        table: def.table.clone(),
        key,
        column: def.column.clone(),
    })
}

fn values(
    c: &mut Checker<'_>,
    model: &ReadModel,
    table: Option<&Table>,
    map: &IndexMap<String, Spanned<ValueDef>>,
    lookups: bool,
) -> Vec<(String, ValueSpec)> {
    let mut out = Vec::new();
    for (column, value) in map {
        if let Some(v) = value_def(c, model, value, lookups) {
            if let Some(table) = table {
                check_column_value(c, model, table, column, &v, &value.span());
            }
            out.push((column.clone(), v));
        }
    }
    out
}
