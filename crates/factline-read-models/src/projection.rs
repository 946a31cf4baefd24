//! A declared read model as a [`SqlProjection`]: the engine's runner,
//! sinks, checkpoints, versions, parking and partitions apply to it as to
//! a read model written in Rust.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use factline_core::RecordedEvent;
use factline_projections::{ApplyError, Dialect, SqlProjection, SqlValue, Statement, Tables};
use serde_json::Value;

use crate::cache::{CachePlan, LookupCache};
use crate::check::type_problem;
use crate::data::DataFields;
use crate::expr::{ColumnType, Val};
use crate::model::ReadModel;
use crate::sql::{create_table, render, Param, Rendered};

/// A read model from a definitions file, run by the projection engine.
pub struct DeclaredProjection {
    model: Arc<ReadModel>,
    table_names: Vec<&'static str>,
    handlers: foldhash::HashMap<String, usize>,
    /// Per handler, the data fields its operations read.
    fields: Vec<DataFields>,
    /// Per event type and operation, how its rows merge in a batch (none:
    /// they run one by one).
    templates: Arc<Templates>,
    /// The same with lookups resolved from the cache, where they may be.
    resolved: Arc<Templates>,
    plan: Arc<CachePlan>,
    pub(crate) cache: LookupCache,
    /// Each handler's operations rendered for the tables of one version.
    rendered: Option<(u32, Vec<HandlerSql>)>,
}

/// Per event type and operation, a template (if its rows merge).
type Templates = Vec<Vec<Option<crate::batch::Template>>>;

/// The statements of one event type's operations, by operation.
type HandlerSql = Vec<Vec<Rendered>>;

/// Table names live as long as the process: a projection hands them out
/// as `&[&str]`, and there are few (interned, so rebuilding a projection
/// many times does not grow this).
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match names.get(name) {
        Some(interned) => interned,
        None => {
            let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
            names.insert(leaked);
            leaked
        }
    }
}

impl DeclaredProjection {
    /// The projection of `model`.
    pub fn new(model: Arc<ReadModel>) -> Self {
        let templates_with = |cached: Option<&[bool]>| -> Templates {
            model
                .handlers
                .iter()
                .map(|(_, ops)| {
                    ops.iter()
                        .map(|op| crate::batch::template(&model, op, cached))
                        .collect()
                })
                .collect()
        };
        let templates = templates_with(None);
        let plan = CachePlan::of(&model, &templates);
        let resolved = templates_with(Some(&plan.cached));
        DeclaredProjection {
            table_names: model.tables.iter().map(|t| intern(&t.name)).collect(),
            handlers: model
                .handlers
                .iter()
                .enumerate()
                .map(|(i, (event_type, _))| (event_type.clone(), i))
                .collect(),
            fields: model
                .handlers
                .iter()
                .map(|(_, ops)| DataFields::of(&model, ops))
                .collect(),
            templates: Arc::new(templates),
            resolved: Arc::new(resolved),
            plan: Arc::new(plan),
            cache: LookupCache::default(),
            model,
            rendered: None,
        }
    }

    pub(crate) fn model_arc(&self) -> Arc<ReadModel> {
        self.model.clone()
    }

    pub(crate) fn templates(&self) -> Arc<Templates> {
        self.templates.clone()
    }

    /// The templates of rows resolved from the cache, and what fills it.
    pub(crate) fn cache_plan(&self) -> (Arc<Templates>, Arc<CachePlan>) {
        (self.resolved.clone(), self.plan.clone())
    }

    /// The handler that applies `event` and its data, or `None` when the
    /// read model does not apply it (another category or type, or its
    /// condition does not hold).
    pub(crate) fn applies(
        &self,
        event: &RecordedEvent,
    ) -> Result<Option<(usize, Value)>, ApplyError> {
        let Some(&handler) = self.handlers.get(&event.event_type) else {
            return Ok(None);
        };
        if !self.model.categories.is_empty()
            && !self
                .model
                .categories
                .iter()
                .any(|c| c == event.stream_id.category())
        {
            return Ok(None);
        }
        let data = self.fields[handler]
            .read(event.data.as_str())
            .map_err(|e| refused(event, format!("its data is not JSON: {e}")))?;
        if let Some(when) = &self.model.when {
            if !when.holds(event, &data) {
                return Ok(None);
            }
        }
        Ok(Some((handler, data)))
    }

    /// The statements of one operation for one event.
    pub(crate) fn op_statements(
        &mut self,
        tables: &Tables,
        handler: usize,
        index: usize,
        event: &RecordedEvent,
        data: &Value,
    ) -> Result<Vec<Statement>, ApplyError> {
        let rendered = &self.rendered(tables)[handler];
        let Some(op_statements) = rendered.get(index) else {
            return Ok(Vec::new());
        };
        let mut statements = Vec::new();
        for r in op_statements {
            let params = r
                .params
                .iter()
                .map(|p| bind(p, event, data))
                .collect::<Result<Vec<_>, _>>()?;
            let statement = Statement::new(r.sql.clone(), params);
            statements.push(match &r.must_find {
                Some(message) => statement.requiring_a_row(refused(event, message).into_message()),
                None => statement,
            });
        }
        Ok(statements)
    }

    /// The read model it runs.
    pub fn model(&self) -> &ReadModel {
        &self.model
    }

    fn rendered(&mut self, tables: &Tables) -> &[HandlerSql] {
        let current = self
            .rendered
            .as_ref()
            .is_some_and(|(v, _)| *v == tables.version());
        if !current {
            let model = &self.model;
            let all = model
                .handlers
                .iter()
                .map(|(_, ops)| ops.iter().map(|op| render(model, op, tables)).collect())
                .collect();
            self.rendered = Some((tables.version(), all));
        }
        self.rendered.as_ref().map_or(&[][..], |(_, r)| r)
    }
}

/// An event a definition cannot apply: the message names the event, the
/// value and the rule.
fn refused(event: &RecordedEvent, message: impl std::fmt::Display) -> ApplyError {
    ApplyError::new(format!(
        "{} at position {} (stream {}): {message}",
        event.event_type, event.position, event.stream_id
    ))
}

/// A parameter's value for `event`, checked against its column.
pub(crate) fn bind(
    param: &Param,
    event: &RecordedEvent,
    data: &Value,
) -> Result<SqlValue, ApplyError> {
    let mut value = param.value.expr.eval(event, data);
    if value == Val::Null {
        if let Some(default) = &param.value.default {
            value = default.clone();
        }
    }
    if value == Val::Null {
        if param.nullable {
            return Ok(SqlValue::Null);
        }
        return Err(refused(
            event,
            format!(
                "{} is missing or null, and {} is not nullable (give the value a default, or make the column nullable)",
                param.value.expr, param.what
            ),
        ));
    }
    if let Some(ty) = param.ty {
        if let Some(problem) = type_problem(&value, ty) {
            return Err(refused(
                event,
                format!("{} {problem} (for {})", param.value.expr, param.what),
            ));
        }
        if ty == ColumnType::Real {
            if let Val::Int(i) = value {
                return Ok(SqlValue::Real(i as f64));
            }
        }
    }
    Ok(match value {
        Val::Null => SqlValue::Null,
        Val::Bool(b) => SqlValue::Int(i64::from(b)),
        Val::Int(i) => SqlValue::Int(i),
        Val::Real(r) => SqlValue::Real(r),
        Val::Text(s) => SqlValue::Text(s),
        Val::Json(v) => SqlValue::Text(v.to_string()),
    })
}

impl SqlProjection for DeclaredProjection {
    fn name(&self) -> &str {
        &self.model.name
    }
    fn version(&self) -> u32 {
        self.model.version
    }
    fn tables(&self) -> &[&str] {
        &self.table_names
    }
    fn create_tables(&self, tables: &Tables) -> Vec<String> {
        self.create_tables_for(Dialect::Postgres, tables)
    }
    fn create_tables_for(&self, dialect: Dialect, tables: &Tables) -> Vec<String> {
        self.model
            .tables
            .iter()
            .flat_map(|t| create_table(t, tables, dialect == Dialect::Sqlite))
            .collect()
    }
    fn fingerprint(&self) -> Option<String> {
        Some(self.model.fingerprint.clone())
    }
    fn resuming(&mut self, checkpoint: u64, sole_writer: bool) {
        self.cache.resuming(checkpoint, sole_writer);
    }
    fn statements(
        &mut self,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        let fills = self.handlers.get(&event.event_type).is_some_and(|h| {
            self.plan.fills[*h]
                .iter()
                .any(|fill| !fill.lookups.is_empty())
        });
        self.cache.applied_singly(event.position, fills);
        let Some((handler, data)) = self.applies(event)? else {
            return Ok(Vec::new());
        };
        let model = self.model.clone();
        let mut statements = Vec::new();
        for (index, op) in model.handlers[handler].1.iter().enumerate() {
            if op.when.as_ref().is_some_and(|w| !w.holds(event, &data)) {
                continue;
            }
            statements.extend(self.op_statements(tables, handler, index, event, &data)?);
        }
        Ok(statements)
    }

    /// A batch of more than one event as a few set-based statements (see
    /// `batch.rs`); one event runs as its own statements, whose refusals
    /// name the event.
    fn batch_statements(
        &mut self,
        dialect: Dialect,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Option<Result<Vec<Statement>, ApplyError>> {
        if events.len() < 2 {
            return None;
        }
        Some(crate::batch::statements(self, dialect, tables, events))
    }
}
