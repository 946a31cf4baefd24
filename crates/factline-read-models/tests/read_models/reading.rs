//! Reading declared read models: tables with filters, an order and
//! cursors, named queries with parameters, each answer with the position
//! its rows reflect; bad requests say what is wrong.

use std::collections::BTreeSet;
use std::sync::Arc;

use factline_core::{EventStore, InMemoryStore};
use factline_projections::{PostgresSink, SqliteSink};
use factline_read_models::{Definitions, QueryError, Reader, TableRequest};
use serde_json::Value;

use crate::running::{history, projection, run, Fold};

fn definitions() -> Arc<Definitions> {
    Arc::new(
        Definitions::parse(
            factline_testkit::fixtures::INVOICES_READ_MODELS,
            "invoices.toml",
        )
        .unwrap(),
    )
}

fn request(params: &[(&str, &str)]) -> TableRequest {
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    TableRequest::from_params(&params).unwrap()
}

fn ids(rows: &[serde_json::Map<String, Value>]) -> Vec<String> {
    rows.iter()
        .map(|r| r["invoice_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every page of `params` (with `limit`), following cursors.
async fn all_pages(
    reader: &Reader,
    params: &[(&str, &str)],
) -> Vec<serde_json::Map<String, Value>> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut asked: Vec<(&str, &str)> = params.to_vec();
        if let Some(c) = &cursor {
            asked.push(("cursor", c));
        }
        let answer = reader
            .table("invoices", "invoices", &request(&asked))
            .await
            .unwrap();
        assert!(answer.rows.len() <= 7);
        rows.extend(answer.rows);
        match answer.next {
            Some(next) => cursor = Some(next),
            None => return rows,
        }
    }
}

async fn reads_as_the_fold(reader: Reader, fold: Fold, head: u64) {
    // Everything, in key order, one page.
    let answer = reader
        .table("invoices", "invoices", &request(&[("limit", "1000")]))
        .await
        .unwrap();
    assert_eq!(answer.position, head);
    assert_eq!(answer.next, None);
    assert_eq!(
        ids(&answer.rows),
        fold.invoices.keys().cloned().collect::<Vec<_>>()
    );
    let first = &answer.rows[0];
    let (customer, total, paid, status, lines, last, note) =
        &fold.invoices[first["invoice_id"].as_str().unwrap()];
    assert_eq!(first["customer"], customer.as_str());
    assert_eq!(first["total_cents"], *total);
    assert_eq!(first["paid_cents"], *paid);
    assert_eq!(first["status"], status.as_str());
    assert_eq!(first["lines"], *lines);
    assert_eq!(first["last_position"], *last);
    assert_eq!(
        first["note"],
        note.clone().map_or(Value::Null, Value::String)
    );

    // Equality filters.
    let c1 = reader
        .table(
            "invoices",
            "invoices",
            &request(&[("customer", "c1"), ("status", "open")]),
        )
        .await
        .unwrap();
    let wanted: Vec<String> = fold
        .invoices
        .iter()
        .filter(|(_, r)| r.0 == "c1" && r.3 == "open")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ids(&c1.rows), wanted);

    // Pages of 7 cover every row once, in key order and in descending
    // total order.
    let paged = all_pages(&reader, &[("limit", "7")]).await;
    assert_eq!(
        ids(&paged),
        fold.invoices.keys().cloned().collect::<Vec<_>>()
    );
    let by_total = all_pages(&reader, &[("limit", "7"), ("order", "-total_cents")]).await;
    let mut wanted: Vec<(i64, String)> = fold
        .invoices
        .iter()
        .map(|(id, r)| (r.1, id.clone()))
        .collect();
    wanted.sort_by(|a, b| b.cmp(a));
    let got: Vec<(i64, String)> = by_total
        .iter()
        .map(|r| {
            (
                r["total_cents"].as_i64().unwrap(),
                r["invoice_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, wanted);
    assert_eq!(
        ids(&by_total).into_iter().collect::<BTreeSet<_>>().len(),
        fold.invoices.len()
    );

    // A named query with its parameter.
    let params = vec![("customer".to_owned(), "c2".to_owned())];
    let open = reader
        .query("invoices", "open_by_customer", &params)
        .await
        .unwrap();
    let wanted: Vec<(String, i64)> = fold
        .invoices
        .iter()
        .filter(|(_, r)| r.0 == "c2" && r.3 == "open")
        .map(|(id, r)| (id.clone(), r.1 - r.2))
        .collect();
    let got: Vec<(String, i64)> = open
        .rows
        .iter()
        .map(|r| {
            (
                r["invoice_id"].as_str().unwrap().to_owned(),
                r["due"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, wanted);
    assert_eq!(open.position, head);
    assert_eq!(reader.position("invoices").await.unwrap(), head);

    // Bad requests say what is wrong.
    let invalid = |e: QueryError, says: &str| match e {
        QueryError::Invalid(m) => assert!(m.contains(says), "{m:?} should say {says:?}"),
        other => panic!("{other:?} should be Invalid saying {says:?}"),
    };
    let asked = |params: &[(&str, &str)]| {
        let reader = &reader;
        let req = request(params);
        async move {
            reader
                .table("invoices", "invoices", &req)
                .await
                .unwrap_err()
        }
    };
    invalid(
        asked(&[("colour", "red")]).await,
        "\"colour\" is not a column of invoices",
    );
    invalid(
        asked(&[("total_cents", "ten")]).await,
        "invoices.total_cents is an integer",
    );
    invalid(asked(&[("order", "-note")]).await, "may be null");
    invalid(asked(&[("cursor", "zz")]).await, "cursor");
    invalid(
        TableRequest::from_params(&[("limit".into(), "1001".into())]).unwrap_err(),
        "limit must be",
    );
    invalid(
        reader
            .query("invoices", "open_by_customer", &[])
            .await
            .unwrap_err(),
        "needs the parameter customer",
    );
    invalid(
        reader
            .query(
                "invoices",
                "open_by_customer",
                &[("who".into(), "x".into())],
            )
            .await
            .unwrap_err(),
        "has no parameter \"who\"",
    );
    assert!(matches!(
        reader.table("invoices", "bills", &TableRequest::default()).await.unwrap_err(),
        QueryError::NotFound(m) if m.contains("has no table \"bills\"")
    ));
    assert!(matches!(
        reader.table("bills", "invoices", &TableRequest::default()).await.unwrap_err(),
        QueryError::NotFound(m) if m.contains("no read model \"bills\"")
    ));
}

#[tokio::test]
async fn tables_and_queries_read_on_sqlite_equal_the_fold_with_the_position_reached() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let fold = history(&store).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("read.db");
    let reader = Reader::sqlite(&path, definitions());
    assert_eq!(reader.position("invoices").await.unwrap_or(0), 0);
    run(&store, SqliteSink::open(&path, projection()).unwrap()).await;
    let head = store.head_position().await.unwrap();
    reads_as_the_fold(Reader::sqlite(&path, definitions()), fold, head).await;
}

#[tokio::test]
async fn tables_and_queries_read_on_postgres_equal_the_fold_with_the_position_reached() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let fold = history(&store).await;
    let db = factline_testkit::pg::database().await;
    let sink = PostgresSink::connect(&db.url, "invoices_read", projection())
        .await
        .unwrap();
    let reader = Reader::postgres(&db.url, "invoices_read", definitions()).unwrap();
    let before = reader
        .table("invoices", "invoices", &TableRequest::default())
        .await
        .unwrap();
    assert_eq!(
        (before.rows.len(), before.position),
        (0, 0),
        "nothing applied yet"
    );
    run(&store, sink).await;
    let head = store.head_position().await.unwrap();
    reads_as_the_fold(reader, fold, head).await;
}
