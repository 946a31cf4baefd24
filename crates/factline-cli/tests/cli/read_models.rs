//! Read models declared in a file, run by `factline serve --read-models`
//! for a domain factline has no code for: events appended over HTTP,
//! poison events parked, a version bump rebuilt by `factline projections
//! rebuild --read-models`, and mistakes in the file refused with their
//! line and column before anything runs.

use factline_testkit::fixtures::INVOICES_READ_MODELS;
use serde_json::Value;

use crate::common::*;

on_every_backend!(
    declared_read_models_follow_http_appends_park_poison_and_rebuild_on_a_version_bump
);

/// Rows of `sql` (on the read models' views; `{s}` is the schema prefix)
/// as text.
fn rows(db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    if db.starts_with("postgres") {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = factline_testkit::pg::connect(db).await;
            let rows = client
                .query(&sql.replace("{s}", "orders_read."), &[])
                .await
                .unwrap();
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.get::<_, Option<String>>(i))
                        .collect()
                })
                .collect()
        })
    } else {
        let conn = rusqlite::Connection::open(db).unwrap();
        let mut stmt = conn.prepare(&sql.replace("{s}", "")).unwrap();
        let width = stmt.column_count();
        stmt.query_map([], |r| {
            (0..width).map(|i| r.get::<_, Option<String>>(i)).collect()
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }
}

fn append(served: &Served, stream: &str, events: &str) {
    let (status, body) = served.call("POST", &format!("/streams/{stream}"), "", Some(events));
    assert_eq!(status, 201, "{body}");
}

fn declared_read_models_follow_http_appends_park_poison_and_rebuild_on_a_version_bump(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("invoices.toml");
    std::fs::write(&v1, INVOICES_READ_MODELS).unwrap();
    let served = Served::start(
        &db.spec,
        &[
            "--listen",
            "127.0.0.1:0",
            "--read-models",
            v1.to_str().unwrap(),
        ],
    );

    append(
        &served,
        "Invoice-1",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"acme","total_cents":900,"lines":[{},{}]}},
        {"event_type":"PaymentReceived","data":{"cents":400}},{"event_type":"PaymentReceived","data":{"cents":500}}]"#,
    );
    append(
        &served,
        "Invoice-2",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"acme","total_cents":300,"lines":[],"note":"rush"}}]"#,
    );
    // A payment of an invoice never issued: no row to update, no customer
    // to look up.
    append(
        &served,
        "Invoice-9",
        r#"[{"event_type":"PaymentReceived","data":{"cents":1}}]"#,
    );
    let list = served.until("/admin/projections", "", |list| {
        list["projections"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == "invoices"))
            .is_some_and(|p| p["checkpoint"] == 5 && p["parked"] == 1)
    });
    assert_eq!(projection(&list, "invoices")["active_version"], 1);
    assert_eq!(
        rows(&db.spec, "SELECT invoice_id, status, CAST(paid_cents AS TEXT), CAST(lines AS TEXT), note FROM {s}invoices ORDER BY invoice_id"),
        vec![
            vec![Some("1".into()), Some("paid".into()), Some("900".into()), Some("2".into()), None],
            vec![Some("2".into()), Some("open".into()), Some("0".into()), Some("0".into()), Some("rush".into())],
        ]
    );
    let parked = json_lines(&run(&db.spec, &["projections", "parked", "invoices"]));
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["position"], 5);
    assert!(
        parked[0]["error"].as_str().unwrap().contains(
            "PaymentReceived at position 5 (stream Invoice-9): update of invoices found no row"
        ),
        "{}",
        parked[0]
    );

    // The definition changes: each payment now counts twice. Its version
    // goes up, and a rebuild builds version 2 beside version 1.
    let v2 = dir.path().join("invoices-v2.toml");
    let changed = INVOICES_READ_MODELS.replace("payments = 1", "payments = 2");
    std::fs::write(&v2, changed.replace("version = 1", "version = 2")).unwrap();
    let out = run(
        &db.spec,
        &[
            "projections",
            "rebuild",
            "invoices",
            "--quiet",
            "--read-models",
            v2.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: Value = json_lines(&out).pop().unwrap();
    assert_eq!(
        (report["version"].clone(), report["swapped"].clone()),
        (2.into(), true.into()),
        "{report}"
    );
    assert_eq!(
        rows(
            &db.spec,
            "SELECT customer, CAST(payments AS TEXT), CAST(cents AS TEXT) FROM {s}revenue_per_day"
        ),
        vec![vec![
            Some("acme".into()),
            Some("4".into()),
            Some("900".into())
        ]]
    );

    // The serving process still has version 1's definition: at its next
    // event it does not compute version 2 its own way, and says why.
    append(
        &served,
        "Invoice-3",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"zeta","total_cents":1,"lines":[]}}]"#,
    );
    let list = served.until("/admin/projections", "", |list| {
        list["projections"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == "invoices"))
            .is_some_and(|p| p["error"].is_string())
    });
    let error = projection(&list, "invoices")["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("version 2 was built from another definition"),
        "{error}"
    );

    // The same change without a new version is refused, naming the read
    // model.
    let unversioned = dir.path().join("invoices-unversioned.toml");
    std::fs::write(
        &unversioned,
        changed
            .replace("payments = 2", "payments = 3")
            .replace("version = 1", "version = 2"),
    )
    .unwrap();
    let out = run(
        &db.spec,
        &[
            "projections",
            "retry",
            "invoices",
            "--read-models",
            unversioned.to_str().unwrap(),
        ],
    );
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("projection invoices: version 2 was built from another definition"),
        "{}",
        stderr(&out)
    );
    let mut served = served;
    terminate(&mut served.child);
}

#[test]
fn a_definitions_file_with_mistakes_is_refused_with_line_and_column_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        INVOICES_READ_MODELS
            .replace("add = { paid_cents", "add = { paid_amount")
            .replace("upsert = \"revenue_per_day\"", "upsert = \"revenue\""),
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let db = sqlite_db();

    let out = run(&db.spec, &["read-models", "check", bad]);
    assert_eq!(code(&out), 2);
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "{bad}:47:23: \"paid_amount\" is not a column of invoices"
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "{bad}:50:1: upsert \"revenue\": the table is not declared"
        )),
        "{said}"
    );

    let out = run(&db.spec, &["read-models", "check", bad, "--json"]);
    assert_eq!(code(&out), 2);
    let report = json_lines(&out).remove(0);
    assert_eq!(report["valid"], false);
    assert_eq!(report["errors"][0]["line"], 47);
    assert_eq!(report["errors"][0]["column"], 23);

    let out = factline(&db.spec)
        .args(["serve", "--listen", "127.0.0.1:0", "--read-models", bad])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "serve refuses the file: {}", stderr(&out));
    assert!(stderr(&out).contains(":47:23:"));
    assert!(
        !std::path::Path::new(&db.spec).exists(),
        "nothing was created"
    );
}

#[test]
fn a_valid_file_is_described_and_the_schema_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("invoices.toml");
    std::fs::write(&file, INVOICES_READ_MODELS).unwrap();
    let db = sqlite_db();
    let out = run(&db.spec, &["read-models", "check", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = json_lines(&out).remove(0);
    assert_eq!(report["valid"], true);
    assert_eq!(report["read_models"][0]["name"], "invoices");
    assert_eq!(
        report["read_models"][0]["event_types"],
        serde_json::json!(["InvoiceIssued", "PaymentReceived", "InvoiceVoided"])
    );

    let out = run(&db.spec, &["read-models", "schema"]);
    assert_eq!(code(&out), 0);
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "factline read models");
    assert!(schema["properties"]["read_model"].is_object(), "{schema}");
}
