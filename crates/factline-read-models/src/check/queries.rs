//! Checking a read model's named queries (one read-only statement, typed
//! parameters) and its dashboard panels.

use super::*;

const CHARTS: &[&str] = &["number", "table", "bar", "stacked_bars_per_day", "line"];

pub(super) fn panel_def(
    c: &mut Checker<'_>,
    model: &ReadModel,
    def: &Spanned<PanelDef>,
) -> Option<Panel> {
    let span = def.span();
    let d = def.get_ref();
    let title = &d.title;
    let Some(query) = model.queries.iter().find(|q| q.name == d.query) else {
        c.error(
            &span,
            format!(
                "panel {title:?}: {:?} is not a query of this read model",
                d.query
            ),
        );
        return None;
    };
    if !CHARTS.contains(&d.chart.as_str()) {
        c.error(
            &span,
            format!(
                "panel {title:?}: chart {:?} is not one of {}",
                d.chart,
                CHARTS.join(", ")
            ),
        );
        return None;
    }
    let needs: &[(&str, bool)] = match d.chart.as_str() {
        "number" => &[("y", d.y.is_some())],
        "bar" | "line" => &[("x", d.x.is_some()), ("y", d.y.is_some())],
        "stacked_bars_per_day" => &[
            ("x", d.x.is_some()),
            ("y", d.y.is_some()),
            ("series", d.series.is_some()),
        ],
        _ => &[],
    };
    for (field, given) in needs {
        if !given {
            c.error(
                &span,
                format!("panel {title:?}: a {} chart needs `{field}`", d.chart),
            );
        }
    }
    let mut params = Vec::new();
    for (name, value) in &d.params {
        if !query.params.iter().any(|(p, _)| p == name) {
            c.error(
                &span,
                format!(
                    "panel {title:?}: query {} has no parameter {name:?}",
                    query.name
                ),
            );
            continue;
        }
        let days_ago = value
            .as_table()
            .and_then(|t| t.get("days_ago"))
            .and_then(|v| v.as_integer());
        let param = match (value, days_ago) {
            (_, Some(n)) if (0..=36_600).contains(&n) => PanelParam::DaysAgo(n as u32),
            (toml::Value::String(s), None) => PanelParam::Const(s.clone()),
            (toml::Value::Integer(i), None) => PanelParam::Const(i.to_string()),
            (toml::Value::Float(f), None) => PanelParam::Const(f.to_string()),
            _ => {
                c.error(&span, format!("panel {title:?}: parameter {name} is a text, a number or {{ days_ago = N }}"));
                continue;
            }
        };
        params.push((name.clone(), param));
    }
    for (name, _) in &query.params {
        if !d.params.contains_key(name) {
            c.error(
                &span,
                format!(
                    "panel {title:?}: query {} needs the parameter {name}",
                    query.name
                ),
            );
        }
    }
    Some(Panel {
        title: title.clone(),
        query: d.query.clone(),
        chart: d.chart.clone(),
        x: d.x.clone(),
        y: d.y.clone(),
        series: d.series.clone(),
        columns: d.columns.clone(),
        cents: d.cents.clone(),
        params,
    })
}

pub(super) fn query_def(
    c: &mut Checker<'_>,
    model: &ReadModel,
    name: &str,
    def: &Spanned<QueryDef>,
) -> Option<Query> {
    let d = def.get_ref();
    let span = d.sql.span();
    if !plain_name(name) {
        c.error(
            &def.span(),
            format!("query name {name:?} must be 1 to 50 lower-case letters, digits or _"),
        );
    }
    let sql = d.sql.get_ref();
    if let Some(problem) = not_read_only(sql) {
        c.error(&span, format!("query {name}: {problem}"));
    }
    let mut params = Vec::new();
    for (param, ty) in &d.params {
        match ColumnType::parse(ty) {
            Some(ty) => params.push((param.clone(), ty)),
            None => c.error(&def.span(), format!("query {name}: parameter {param} has unknown type {ty:?} (text, integer or real)")),
        }
    }
    let mut used = HashSet::new();
    for (_, piece) in scan(sql) {
        match piece {
            Piece::Table(t) if model.table(t).is_none() => {
                c.error(
                    &span,
                    format!("query {name}: table {{{t}}} is not declared in this read model"),
                );
            }
            Piece::Param(p) => {
                used.insert(p.to_owned());
                if !params.iter().any(|(n, _)| n == p) {
                    c.error(
                        &span,
                        format!("query {name}: parameter :{p} is not in params"),
                    );
                }
            }
            _ => {}
        }
    }
    for (param, _) in &params {
        if !used.contains(param) {
            c.error(
                &def.span(),
                format!("query {name}: param {param} is not used as :{param}"),
            );
        }
    }
    Some(Query {
        name: name.to_owned(),
        description: d.description.clone(),
        sql: sql.clone(),
        params,
    })
}
