//! factline on a store that is not the demo's: invoices and tickets
//! appended over HTTP, a read model whose code only the embedding service
//! has. The dashboard, the admin API and `factline projections` work with
//! what the store's database holds, not with a compiled list.

use std::sync::Arc;

use factline::projections::{
    ApplyError, PostgresSink, Runner, SqlProjection, SqlValue, SqliteSink, Statement, Tables,
};
use factline::{EventStore, Location, RecordedEvent};
use serde_json::{json, Value};

use crate::common::*;

on_every_backend!(
    the_dashboard_counts_any_domain_and_hides_the_orders_panels,
    a_projection_this_binary_has_no_code_for_is_listed_paused_and_refused_a_rebuild,
);

/// Sorted `[name, figures…]` rows of a `/dashboard/data` list.
fn rows(list: &Value, keys: &[&str]) -> Vec<Value> {
    let mut rows: Vec<Value> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|row| Value::Array(keys.iter().map(|k| row[*k].clone()).collect()))
        .collect();
    rows.sort_by_key(|r| r.to_string());
    rows
}

fn append(served: &Served, stream: &str, event_type: &str) {
    let body = json!([{ "event_type": event_type, "data": { "cents": 100 } }]).to_string();
    let (status, answer) = served.call("POST", &format!("/streams/{stream}"), "", Some(&body));
    assert_eq!(status, 201, "{answer}");
}

fn the_dashboard_counts_any_domain_and_hides_the_orders_panels(db: Db) {
    let served = Served::start(&db.spec, &["--listen", "127.0.0.1:0"]);

    // An empty store: every generic figure is there, and zero.
    let (status, empty) = served.call("GET", "/dashboard/data", "", None);
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["head_position"], 0);
    assert_eq!(empty["events"]["streams"], 0);
    assert_eq!(empty["events"]["categories"], json!([]));
    assert_eq!(empty["projections"], json!([]));
    assert_eq!(empty["read_models"], Value::Null, "no orders panels");
    assert_eq!(empty["read_models_error"], Value::Null, "and no error");
    assert_eq!(empty["outbox"]["relays"], json!([]));

    append(&served, "Invoice-1", "InvoiceIssued");
    append(&served, "Invoice-1", "InvoicePaid");
    append(&served, "Invoice-2", "InvoiceIssued");
    let (_, first) = served.call("GET", "/dashboard/data", "", None);
    // Counted again after more appends: the running totals add up.
    append(&served, "Ticket-7", "TicketOpened");
    append(&served, "Invoice-2", "InvoicePaid");
    append(&served, "Invoice-3", "InvoiceIssued");
    let (status, data) = served.call("GET", "/dashboard/data", "", None);
    assert_eq!(status, 200, "{data}");

    assert_eq!(first["events"]["counted_to"], 3);
    assert_eq!(
        rows(
            &first["events"]["categories"],
            &["category", "streams", "events"]
        ),
        vec![json!(["Invoice", 2, 3])]
    );
    assert_eq!(data["head_position"], 6);
    assert_eq!(data["events"]["counted_to"], 6);
    assert_eq!(data["events"]["streams"], 4);
    assert_eq!(
        rows(
            &data["events"]["categories"],
            &["category", "streams", "events"]
        ),
        vec![json!(["Invoice", 3, 5]), json!(["Ticket", 1, 1])]
    );
    assert_eq!(
        rows(&data["events"]["event_types"], &["event_type", "events"]),
        vec![
            json!(["InvoiceIssued", 3]),
            json!(["InvoicePaid", 2]),
            json!(["TicketOpened", 1])
        ]
    );
    assert_eq!(data["read_models"], Value::Null);
    assert_eq!(data["read_models_error"], Value::Null);

    // The page itself keeps the orders panels hidden until the data says
    // otherwise.
    let page = served.text("/");
    assert!(
        page.contains(r#"id="domain" class="group" hidden"#),
        "{page}"
    );
    assert!(page.contains(r#"id="categories""#) && page.contains(r#"id="event-types""#));
}

/// A read model an embedding service defines: invoice totals per stream.
struct InvoiceTotals;

impl SqlProjection for InvoiceTotals {
    fn name(&self) -> &str {
        "invoice_totals"
    }
    fn tables(&self) -> &[&str] {
        &["invoice_totals"]
    }
    fn create_tables(&self, tables: &Tables) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} (invoice TEXT PRIMARY KEY, cents BIGINT NOT NULL)",
            tables.get("invoice_totals")
        )]
    }
    fn statements(
        &mut self,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        Ok(vec![Statement::new(
            format!(
                "INSERT INTO {} (invoice, cents) VALUES ($1, 1) ON CONFLICT (invoice) DO UPDATE SET cents = {}.cents + 1",
                tables.get("invoice_totals"),
                tables.get("invoice_totals")
            ),
            vec![SqlValue::Text(event.stream_id.to_string())],
        )])
    }
}

/// Runs `InvoiceTotals` in this process, as its service would, until it
/// has every event stored.
fn run_invoice_totals(db: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let location = Location::parse(db).unwrap();
        let store: Arc<dyn EventStore> = location.open().await.unwrap();
        let head = store.head_position().await.unwrap();
        match &location {
            Location::Sqlite(path) => {
                let sink =
                    SqliteSink::open(path, factline::projections::Portable::new(InvoiceTotals));
                let mut runner = Runner::new(store, sink.unwrap());
                runner.catch_up(head).await.unwrap();
            }
            Location::Postgres(url) => {
                let sink = PostgresSink::connect(
                    url,
                    "orders_read",
                    factline::projections::Portable::new(InvoiceTotals),
                )
                .await
                .unwrap();
                let mut runner = Runner::new(store, sink);
                runner.catch_up(head).await.unwrap();
            }
            other => panic!("no read models on {other:?}"),
        }
    });
}

fn a_projection_this_binary_has_no_code_for_is_listed_paused_and_refused_a_rebuild(db: Db) {
    for (stream, event_type) in [
        ("Invoice-1", "InvoiceIssued"),
        ("Invoice-2", "InvoiceIssued"),
    ] {
        let out = run(
            &db.spec,
            &["append", stream, "--type", event_type, "--data", "{}"],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    run_invoice_totals(&db.spec);
    let out = run(
        &db.spec,
        &[
            "append",
            "Invoice-1",
            "--type",
            "InvoicePaid",
            "--data",
            "{}",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // The CLI finds it in the registry: its version, checkpoint and lag.
    let out = run(&db.spec, &["projections", "status", "invoice_totals"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let status = &json_lines(&out)[0];
    assert_eq!(status["name"], "invoice_totals");
    assert_eq!(status["active_version"], 1);
    assert_eq!(status["checkpoint"], 2);
    assert_eq!(status["events_behind"], 1);

    let out = run(&db.spec, &["projections", "pause", "invoice_totals"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&db.spec, &["projections", "list", "--json"]);
    let listed = &json_lines(&out)[0];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["state"], "paused");

    // A rebuild needs the code: the answer says who must run it, and
    // nothing changes.
    let out = run(&db.spec, &["projections", "rebuild", "invoice_totals"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the service that defines them"),
        "{}",
        stderr(&out)
    );

    let served = Served::start(&db.spec, &["--listen", "127.0.0.1:0"]);
    let (status, list) = served.call("GET", "/admin/projections", "", None);
    assert_eq!(status, 200, "{list}");
    let view = projection(&list, "invoice_totals");
    assert_eq!(view["state"], "paused");
    assert_eq!(view["lag_events"], 1);
    let (status, refused) = served.call(
        "POST",
        "/admin/projections/invoice_totals/rebuild",
        "",
        None,
    );
    assert!((400..500).contains(&status), "{status} {refused}");
    assert!(
        refused
            .to_string()
            .contains("the service that defines them"),
        "{refused}"
    );
    let (status, _) = served.call("POST", "/admin/projections/invoice_totals/resume", "", None);
    assert_eq!(status, 200);
    let (_, list) = served.call("GET", "/admin/projections", "", None);
    assert_eq!(projection(&list, "invoice_totals")["state"], "stopped");
    let (_, data) = served.call("GET", "/dashboard/data", "", None);
    assert_eq!(data["projections"].as_array().map(Vec::len), Some(1));
    assert_eq!(data["read_models"], Value::Null);
}
