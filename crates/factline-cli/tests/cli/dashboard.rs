//! The dashboard end to end: a real `factline demo`, a real headless
//! Chromium driven through chromedriver, the shown figures checked against
//! the API, and a screenshot saved.
//!
//! Needs Chromium and its driver (Debian: `apt-get install -y chromium
//! chromium-driver`; `FACTLINE_CHROMIUM` and `FACTLINE_CHROMEDRIVER` name
//! other binaries). The screenshot goes to `target/dashboard.png`, or to
//! `FACTLINE_SCREENSHOT`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::KillOnDrop;

use fantoccini::{ClientBuilder, Locator};

use crate::common::{code, run, spawn_serving, stderr};
use serde_json::{json, Value};

const INSTALL: &str = "install Chromium and its WebDriver (Debian/Ubuntu: apt-get install -y chromium chromium-driver), or name them in FACTLINE_CHROMIUM and FACTLINE_CHROMEDRIVER";

fn binary(env: &str, candidates: &[&str]) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("the dashboard test needs {}: {INSTALL}", candidates[0]))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the demo with a bounded load that keeps serving afterwards, and
/// returns it with the dashboard's address.
fn start_demo(db: &std::path::Path) -> (KillOnDrop, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_factline"))
        .args(["--db", db.to_str().unwrap()])
        .args(["demo", "--orders", "60", "--rate", "40", "--keep-serving"])
        .args(["--listen", "127.0.0.1:0", "--duration", "300"])
        .env_remove("FACTLINE_DB")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo prints its dashboard address");
        if let Some(url) = line.strip_prefix("Dashboard: ") {
            let url = url.trim().to_owned();
            // Keep draining its output so that it never blocks on a pipe.
            std::thread::spawn(move || for _ in rx {});
            return (child, url);
        }
    }
}

async fn api(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Polls `check` until it holds or a minute has passed.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_says() {
    let chromium = binary(
        "FACTLINE_CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    );
    let chromedriver = binary("FACTLINE_CHROMEDRIVER", &["/usr/bin/chromedriver"]);
    let dir = tempfile::tempdir().unwrap();
    let (_demo, dashboard) = start_demo(&dir.path().join("factline.db"));
    let base = dashboard.trim_end_matches('/').to_owned();

    // The load ends after 60 orders; wait until every read model has
    // every event, so the figures stand still.
    eventually("the read models catch up", || async {
        let list = api(&format!("{base}/admin/projections")).await;
        let placed = api(&format!("{base}/categories/Order?limit=1000")).await;
        let orders = placed["events"].as_array().map_or(0, |e| {
            e.iter()
                .filter(|e| e["event_type"] == "OrderPlaced")
                .count()
        });
        let caught_up = list["projections"]
            .as_array()
            .is_some_and(|ps| ps.len() == 3 && ps.iter().all(|p| p["lag_events"] == 0));
        if orders == 60 && caught_up {
            Ok(())
        } else {
            Err(format!("{orders} orders placed; {list}"))
        }
    })
    .await;

    let port = free_port();
    let _driver = KillOnDrop(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL}", chromedriver.display())),
    );
    let profile = tempfile::tempdir().unwrap();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1400",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let driver_url = format!("http://127.0.0.1:{port}");
    let mut browser = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser.is_none() {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities.clone())
            .connect(&driver_url)
            .await
        {
            Ok(client) => browser = Some(client),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                panic!("chromedriver at {driver_url} did not start a browser: {e}; {INSTALL}")
            }
        }
    }
    let browser = browser.unwrap();
    browser.goto(&dashboard).await.unwrap();
    browser
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(
            "section[data-chart=stacked_bars_per_day] svg rect[data-series]",
        ))
        .await
        .expect("the revenue chart is drawn");
    browser
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(
            "section[data-panel^='order_list/orders_by_status/'] svg rect[data-label]",
        ))
        .await
        .expect("the status chart is drawn");

    // What the page shows, read from its elements.
    const READ_PAGE: &str = r##"
        const all = (sel, f) => [...document.querySelectorAll(sel)].map(f);
        return {
            events: Number(document.getElementById("events-total").dataset.value),
            backlog: document.getElementById("outbox-backlog").dataset.value,
            parked: Number(document.getElementById("parked-total").dataset.value),
            revenue: all("section[data-chart=stacked_bars_per_day] rect[data-series]", r => [r.dataset.day, r.dataset.series, Number(r.dataset.value)]),
            statuses: all("section[data-panel^='order_list/orders_by_status/'] rect[data-label]", r => [r.dataset.label, Number(r.dataset.value)]),
            customers: all("section[data-panel^='customer_totals/top_customers/'] tbody tr", tr => [tr.querySelector("[data-column=customer_id]").dataset.value, Number(tr.querySelector("[data-column=net_cents]").dataset.value)]),
            lags: all("#projections tbody tr", tr => [tr.children[0].dataset.projection, Number(tr.children[4].dataset.lag)]),
            rate_samples: Number(document.querySelector("#chart-rate polyline")?.dataset.samples ?? 0),
            streams: Number(document.getElementById("streams-total").dataset.value),
            categories: all("#categories tbody tr", tr => [tr.children[0].dataset.category, Number(tr.children[1].dataset.streams), Number(tr.children[2].dataset.events)]),
            types: all("#event-types tbody tr", tr => [tr.children[0].dataset.type, Number(tr.children[1].dataset.events)]),
            domain_shown: !document.getElementById("domain").hidden,
        };
    "##;
    eventually("the page shows the API's figures", || async {
        let shown = browser
            .execute(READ_PAGE, vec![])
            .await
            .map_err(|e| e.to_string())?;
        let data = api(&format!("{base}/dashboard/data")).await;
        let models = &data["read_models"];
        let expected = json!({
            "events": data["head_position"],
            "backlog": data["outbox"]["backlog"].to_string(),
            "parked": data["parked_total"],
            "revenue": models["revenue_by_region_day"].as_array().unwrap().iter()
                .filter(|r| r["net_cents"].as_i64() > Some(0))
                .map(|r| json!([r["day"], r["region"], r["net_cents"]])).collect::<Vec<_>>(),
            "statuses": models["orders_by_status"].as_array().unwrap().iter()
                .map(|r| json!([r["status"], r["orders"]])).collect::<Vec<_>>(),
            "customers": models["top_customers"].as_array().unwrap().iter()
                .map(|r| json!([r["customer_id"], r["net_cents"]])).collect::<Vec<_>>(),
            "lags": data["projections"].as_array().unwrap().iter()
                .map(|p| json!([p["name"], p["lag_events"]])).collect::<Vec<_>>(),
            "streams": data["events"]["streams"],
            "categories": data["events"]["categories"].as_array().unwrap().iter()
                .map(|c| json!([c["category"], c["streams"], c["events"]])).collect::<Vec<_>>(),
            "types": data["events"]["event_types"].as_array().unwrap().iter()
                .map(|t| json!([t["event_type"], t["events"]])).collect::<Vec<_>>(),
            "domain_shown": true,
        });
        let mut shown_figures = shown.clone();
        shown_figures
            .as_object_mut()
            .unwrap()
            .remove("rate_samples");
        if shown_figures == expected && shown["rate_samples"].as_u64() > Some(1) {
            Ok(())
        } else {
            Err(format!("shown {shown}\nAPI   {expected}"))
        }
    })
    .await;

    // The figures are the orders' own: 60 orders, and revenue in the chart.
    let data = api(&format!("{base}/dashboard/data")).await;
    let orders: i64 = data["read_models"]["orders_by_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["orders"].as_i64().unwrap())
        .sum();
    assert_eq!(orders, 60);

    // Every event is counted by category and type, whatever the domain.
    let counted: u64 = data["events"]["event_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["events"].as_u64().unwrap())
        .sum();
    assert_eq!(Some(counted), data["head_position"].as_u64());

    let png = browser.screenshot().await.unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    let path = std::env::var_os("FACTLINE_SCREENSHOT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard.png"),
        PathBuf::from,
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot saved to {}", path.display());

    // A store of another domain, invoices, whose read models are declared
    // in a file: the generic part shows its figures, and its own panels
    // show what its queries answer.
    let other = tempfile::tempdir().unwrap();
    let other_db = other.path().join("invoices.db");
    let other_db = other_db.to_str().unwrap();
    let definitions = other.path().join("invoices.toml");
    std::fs::write(
        &definitions,
        factline_testkit::fixtures::INVOICES_READ_MODELS,
    )
    .unwrap();
    for (stream, event_type, data) in [
        (
            "Invoice-1",
            "InvoiceIssued",
            r#"{"customer":"acme","total_cents":1200,"lines":[{}]}"#,
        ),
        ("Invoice-1", "PaymentReceived", r#"{"cents":200}"#),
        (
            "Invoice-2",
            "InvoiceIssued",
            r#"{"customer":"acme","total_cents":500,"lines":[]}"#,
        ),
        (
            "Invoice-3",
            "InvoiceIssued",
            r#"{"customer":"zeta","total_cents":700,"lines":[]}"#,
        ),
        ("Invoice-3", "PaymentReceived", r#"{"cents":700}"#),
    ] {
        let out = run(
            other_db,
            &["append", stream, "--type", event_type, "--data", data],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let (child, other_base, _) = spawn_serving(
        other_db,
        &[
            "--listen",
            "127.0.0.1:0",
            "--read-models",
            definitions.to_str().unwrap(),
        ],
    );
    let _other_server = KillOnDrop(child);
    browser.goto(&format!("{other_base}/")).await.unwrap();
    const READ_GENERIC: &str = r##"
        const all = (sel, f) => [...document.querySelectorAll(sel)].map(f);
        const panel = (query) => document.querySelector(`section[data-panel^='invoices/${query}/']`);
        return {
            loaded: document.body.dataset.loaded === "true",
            notice_shown: !document.getElementById("notice").hidden,
            streams: Number(document.getElementById("streams-total").dataset.value),
            categories: all("#categories tbody tr", tr => [tr.children[0].dataset.category, Number(tr.children[1].dataset.streams), Number(tr.children[2].dataset.events)]),
            types: all("#event-types tbody tr", tr => [tr.children[0].dataset.type, Number(tr.children[1].dataset.events)]),
            outstanding: Number(panel("outstanding")?.querySelector(".big")?.dataset.value),
            statuses: [...(panel("invoices_by_status")?.querySelectorAll("rect[data-label]") ?? [])].map(r => [r.dataset.label, Number(r.dataset.value)]),
            per_day: [...(panel("paid_per_day")?.querySelectorAll("circle[data-x]") ?? [])].map(c => [c.dataset.x, Number(c.dataset.value)]),
            open: [...(panel("open_by_customer")?.querySelectorAll("tbody tr") ?? [])].map(tr => [tr.querySelector("[data-column=invoice_id]").dataset.value, Number(tr.querySelector("[data-column=due]").dataset.value)]),
        };
    "##;
    let query = |name: &'static str, params: &'static str| {
        let base = other_base.clone();
        async move {
            api(&format!(
                "{base}/read-models/invoices/queries/{name}?min_position=5{params}"
            ))
            .await
        }
    };
    let rows = |answer: &Value, columns: &[&str]| -> Vec<Value> {
        answer["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                if columns.len() == 1 {
                    r[columns[0]].clone()
                } else {
                    json!(columns.iter().map(|c| r[*c].clone()).collect::<Vec<_>>())
                }
            })
            .collect()
    };
    let expected = json!({
        "loaded": true,
        "notice_shown": false,
        "streams": 3,
        "categories": [["Invoice", 3, 5]],
        "types": [["InvoiceIssued", 3], ["PaymentReceived", 2]],
        "outstanding": rows(&query("outstanding", "").await, &["cents"])[0],
        "statuses": rows(&query("invoices_by_status", "").await, &["status", "invoices"]),
        "per_day": rows(&query("paid_per_day", "").await, &["day", "cents"]),
        "open": rows(&query("open_by_customer", "&customer=acme").await, &["invoice_id", "due"]),
    });
    assert_eq!(
        expected["outstanding"], 1500,
        "what the queries answer: {expected}"
    );
    assert_eq!(expected["statuses"], json!([["open", 2], ["paid", 1]]));
    eventually(
        "the other domain's figures and panels are shown",
        || async {
            let shown = browser
                .execute(READ_GENERIC, vec![])
                .await
                .map_err(|e| e.to_string())?;
            if shown == expected {
                Ok(())
            } else {
                Err(format!("shown {shown}\nwanted {expected}"))
            }
        },
    )
    .await;
    browser.close().await.unwrap();
}
