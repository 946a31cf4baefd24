//! Read models declared in a file, run by `factline serve --read-models`
//! for a domain factline has no code for: events appended over HTTP,
//! poison events parked, a version bump rebuilt by `factline projections
//! rebuild --read-models`, and mistakes in the file refused with their
//! line and column before anything runs.

use factline_testkit::fixtures::INVOICES_READ_MODELS;
use serde_json::{json, Value};

use crate::common::*;

on_every_backend!(
    declared_read_models_follow_http_appends_park_poison_and_rebuild_on_a_version_bump,
    a_client_reads_its_own_writes_pages_and_queries_within_its_scope,
    a_read_model_that_stops_on_error_stops_at_the_event_and_says_why,
    read_models_may_live_in_another_database_than_the_events,
);

/// `path`'s answer over HTTP, which must be 200.
fn get(served: &Served, path: &str) -> Value {
    let (status, body) = served.call("GET", path, "", None);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Values of `columns` in each row of an answer.
fn columns(answer: &Value, columns: &[&str]) -> Vec<Vec<Value>> {
    answer["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| columns.iter().map(|c| row[*c].clone()).collect())
        .collect()
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
    let list = served.until("/admin/projections/invoices", "", |p| {
        p["checkpoint"] == 5 && p["parked"] == 1
    });
    assert_eq!(list["active_version"], 1);
    let invoices = get(&served, "/read-models/invoices/tables/invoices");
    assert_eq!(invoices["position"], 5);
    assert_eq!(
        columns(
            &invoices,
            &["invoice_id", "status", "paid_cents", "lines", "note"]
        ),
        vec![
            vec![json!("1"), json!("paid"), json!(900), json!(2), Value::Null],
            vec![json!("2"), json!("open"), json!(0), json!(0), json!("rush")],
        ]
    );
    let listed = get(&served, "/read-models");
    assert_eq!(listed["read_models"][0]["name"], "invoices");
    assert_eq!(listed["read_models"][0]["version"], 1);
    assert_eq!(listed["read_models"][0]["checkpoint"], 5);
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
    let revenue = get(&served, "/read-models/invoices/tables/revenue_per_day");
    assert_eq!(
        columns(&revenue, &["customer", "payments", "cents"]),
        vec![vec![json!("acme"), json!(4), json!(900)]],
        "the views show version 2"
    );

    // The serving process still has version 1's definition: at its next
    // event it does not compute version 2 its own way, and says why.
    append(
        &served,
        "Invoice-3",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"zeta","total_cents":1,"lines":[]}}]"#,
    );
    let list = served.until("/admin/projections/invoices", "", |p| {
        p["error"].is_string()
    });
    let error = list["error"].as_str().unwrap().to_owned();
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

    // A server started with a newer version rebuilds it beside the active
    // one by itself and swaps it in.
    let v3 = dir.path().join("invoices-v3.toml");
    std::fs::write(
        &v3,
        changed
            .replace("payments = 2", "payments = 3")
            .replace("version = 1", "version = 3"),
    )
    .unwrap();
    let mut served = Served::start(
        &db.spec,
        &[
            "--listen",
            "127.0.0.1:0",
            "--read-models",
            v3.to_str().unwrap(),
        ],
    );
    served.until("/admin/projections/invoices", "", |p| {
        p["active_version"] == 3 && p["state"] == "running"
    });
    let revenue = get(
        &served,
        "/read-models/invoices/tables/revenue_per_day?customer=acme",
    );
    assert_eq!(
        columns(&revenue, &["payments"]),
        vec![vec![json!(6)]],
        "version 3 counts each payment three times"
    );
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

fn a_client_reads_its_own_writes_pages_and_queries_within_its_scope(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("invoices.toml");
    std::fs::write(&file, INVOICES_READ_MODELS).unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"tokens":[
            {"name":"billing","token":"billing-secret-0123","write":["Invoice"],"query":["invoices"]},
            {"name":"other","token":"other-secret-012345","query":["tickets"]}]}"#,
    )
    .unwrap();
    let served = Served::start(
        &db.spec,
        &[
            "--listen",
            "127.0.0.1:0",
            "--read-models",
            file.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
        ],
    );
    let billing = "billing-secret-0123";

    // Each append is read back at once, with min_position at its position.
    for i in 1..=12 {
        let body = format!(
            r#"[{{"event_type":"InvoiceIssued","data":{{"customer":"c{}","total_cents":{},"lines":[]}}}}]"#,
            i % 3,
            i * 100
        );
        let (status, appended) = served.call(
            "POST",
            &format!("/streams/Invoice-{i:02}"),
            billing,
            Some(&body),
        );
        assert_eq!(status, 201, "{appended}");
        let position = appended["last_position"].as_u64().unwrap();
        let path = format!(
            "/read-models/invoices/tables/invoices?invoice_id={i:02}&min_position={position}"
        );
        let (status, answer) = served.call("GET", &path, billing, None);
        assert_eq!(status, 200, "{answer}");
        assert!(answer["position"].as_u64().unwrap() >= position);
        assert_eq!(
            answer["rows"][0]["total_cents"],
            i * 100,
            "read your write {i}"
        );
    }

    // Pages of 5 by descending total, followed by their cursors.
    let mut seen = Vec::new();
    let mut path = "/read-models/invoices/tables/invoices?order=-total_cents&limit=5".to_owned();
    loop {
        let (status, page) = served.call("GET", &path, billing, None);
        assert_eq!(status, 200, "{page}");
        seen.extend(
            columns(&page, &["total_cents"])
                .into_iter()
                .map(|r| r[0].as_i64().unwrap()),
        );
        match page["next"].as_str() {
            Some(next) => {
                path = format!(
                "/read-models/invoices/tables/invoices?order=-total_cents&limit=5&cursor={next}"
            )
            }
            None => break,
        }
    }
    assert_eq!(seen, (1..=12).rev().map(|i| i * 100).collect::<Vec<i64>>());

    // A named query with its parameter.
    let (status, open) = served.call(
        "GET",
        "/read-models/invoices/queries/open_by_customer?customer=c1",
        billing,
        None,
    );
    assert_eq!(status, 200, "{open}");
    assert_eq!(
        columns(&open, &["invoice_id", "due"]),
        vec![
            vec![json!("01"), json!(100)],
            vec![json!("04"), json!(400)],
            vec![json!("07"), json!(700)],
            vec![json!("10"), json!(1000)]
        ]
    );

    // A position the read model does not reach in time: 504, saying where it is.
    let (status, late) = served.call(
        "GET",
        "/read-models/invoices/tables/invoices?min_position=1000&timeout_ms=200",
        billing,
        None,
    );
    assert_eq!(status, 504, "{late}");
    assert_eq!(
        (
            late["error"].clone(),
            late["position"].clone(),
            late["wanted"].clone()
        ),
        (json!("not_caught_up"), json!(12), json!(1000))
    );

    // Bad requests say what is wrong; other read models are not found.
    let (status, bad) = served.call(
        "GET",
        "/read-models/invoices/tables/invoices?colour=red",
        billing,
        None,
    );
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("\"colour\" is not a column of invoices"),
        "{bad}"
    );
    let (status, _) = served.call(
        "GET",
        "/read-models/invoices/tables/invoices?limit=1001",
        billing,
        None,
    );
    assert_eq!(status, 400);
    let (status, _) = served.call("GET", "/read-models/invoices/tables/bills", billing, None);
    assert_eq!(status, 404);
    // A mistake is answered before any wait: 404, not 504 after the wait.
    let (status, _) = served.call(
        "GET",
        "/read-models/invoices/tables/bills?min_position=99999&timeout_ms=1000",
        billing,
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = served.call(
        "GET",
        "/read-models/invoices/queries/open_by_customer?min_position=99999&timeout_ms=1000",
        billing,
        None,
    );
    assert_eq!(status, 400, "the query's parameter is missing");

    // Scopes: a token whose query scope does not name the read model is
    // refused, and does not see it listed; no token is unauthorized.
    let other = "other-secret-012345";
    let (status, refused) =
        served.call("GET", "/read-models/invoices/tables/invoices", other, None);
    assert_eq!(status, 403, "{refused}");
    let (status, listed) = served.call("GET", "/read-models", other, None);
    assert_eq!((status, listed["read_models"].clone()), (200, json!([])));
    let (status, listed) = served.call("GET", "/read-models", billing, None);
    assert_eq!(
        (status, listed["read_models"][0]["name"].clone()),
        (200, json!("invoices"))
    );
    let (status, _) = served.call("GET", "/read-models/invoices/tables/invoices", "", None);
    assert_eq!(status, 401);
    let mut served = served;
    terminate(&mut served.child);
}

fn a_read_model_that_stops_on_error_stops_at_the_event_and_says_why(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("invoices.toml");
    let stopping = INVOICES_READ_MODELS.replacen(
        "categories = [\"Invoice\"]",
        "categories = [\"Invoice\"]\non_error = \"stop\"",
        1,
    );
    std::fs::write(&file, stopping).unwrap();
    let mut served = Served::start(
        &db.spec,
        &[
            "--listen",
            "127.0.0.1:0",
            "--read-models",
            file.to_str().unwrap(),
        ],
    );
    append(
        &served,
        "Invoice-1",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"acme","total_cents":900,"lines":[]}}]"#,
    );
    // A total that is text, not a number: the definition cannot apply it.
    append(
        &served,
        "Invoice-2",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"acme","total_cents":"nine","lines":[]}}]"#,
    );
    append(
        &served,
        "Invoice-3",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"zeta","total_cents":100,"lines":[]}}]"#,
    );
    let list = served.until("/admin/projections/invoices", "", |p| {
        p["state"] == "failed"
    });
    let p = &list;
    let error = p["error"].as_str().unwrap();
    assert!(
        error.contains("InvoiceIssued at position 2 (stream Invoice-2): data.total_cents is text, not integer (for invoices.total_cents)"),
        "{error}"
    );
    assert_eq!(
        (p["checkpoint"].clone(), p["parked"].clone()),
        (json!(1), json!(0)),
        "{p}"
    );
    let invoices = get(&served, "/read-models/invoices/tables/invoices");
    assert_eq!(
        columns(&invoices, &["invoice_id"]),
        vec![vec![json!("1")]],
        "nothing after the event is applied"
    );
    terminate(&mut served.child);
}

fn read_models_may_live_in_another_database_than_the_events(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("invoices.toml");
    std::fs::write(&file, INVOICES_READ_MODELS).unwrap();
    let other = if db.spec.starts_with("postgres") {
        postgres_db()
    } else {
        sqlite_db()
    };
    let mut served = Served::start(
        &db.spec,
        &[
            "--listen",
            "127.0.0.1:0",
            "--read-models",
            file.to_str().unwrap(),
            "--read-models-db",
            &other.spec,
        ],
    );
    append(
        &served,
        "Invoice-1",
        r#"[{"event_type":"InvoiceIssued","data":{"customer":"acme","total_cents":900,"lines":[]}}]"#,
    );
    let (status, answer) = served.call(
        "GET",
        "/read-models/invoices/tables/invoices?min_position=1",
        "",
        None,
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        columns(&answer, &["invoice_id", "total_cents"]),
        vec![vec![json!("1"), json!(900)]]
    );
    terminate(&mut served.child);

    // The read model is in the other database only.
    let listed_there = run(
        &db.spec,
        &[
            "projections",
            "list",
            "--json",
            "--read-models-db",
            &other.spec,
        ],
    );
    assert_eq!(code(&listed_there), 0, "{}", stderr(&listed_there));
    let there = json_lines(&listed_there).remove(0);
    assert_eq!(there[0]["name"], "invoices", "{there}");
    let listed_here = run(&db.spec, &["projections", "list", "--json"]);
    assert_eq!(
        json_lines(&listed_here).remove(0),
        json!([]),
        "the events' database has none"
    );
}
