//! The OpenAPI document tells the truth: a schema-driven fuzzer
//! (schemathesis, from PyPI) generates requests from `/openapi.json` and
//! runs them against a live server with tokens, and fails on any 5xx, any
//! status, content type, header or body the document does not declare,
//! any schema-valid request refused, any undeclared method not answered
//! 405, and any protected operation answered without a token.

use std::process::Command;

use crate::common::*;

/// The schemathesis command: `FACTLINE_SCHEMATHESIS`, or `st` on the path.
fn schemathesis() -> String {
    let program = std::env::var("FACTLINE_SCHEMATHESIS").unwrap_or_else(|_| "st".into());
    let found = Command::new(&program).arg("--version").output();
    match found {
        Ok(out) if out.status.success() => program,
        _ => panic!(
            "schemathesis is not installed: install it (pip install schemathesis) or set FACTLINE_SCHEMATHESIS to its `st` command"
        ),
    }
}

#[test]
fn a_schema_driven_fuzzer_finds_the_document_true() {
    let st = schemathesis();
    let db = sqlite_db();
    // Read models and an outbox to answer about.
    let out = run(&db.spec, &["demo", "--orders", "20", "--sink", "none"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&db.spec, &["outbox", "publish", "--category", "Order"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let secret = "fuzzing-token-0123456789abcdef";
    let tokens = one_token_file(
        dir.path(),
        "fuzzer",
        secret,
        r#""read":["*"],"write":["*"],"admin":["*"]"#,
    );
    // An idempotency key reused with another body is refused by contract
    // (422), so a schema-valid request may get it; a read that waits for a
    // position the read model has not reached answers 504 by contract.
    let config = dir.path().join("schemathesis.toml");
    let mut toml = "[checks.positive_data_acceptance]\nexpected-statuses = [\"2xx\", \"401\", \"403\", \"404\", \"409\", \"422\", \"429\", \"5xx\"]\n".to_owned();
    for operation in [
        "GET /read-models/{name}/tables/{table}",
        "GET /read-models/{name}/queries/{query}",
    ] {
        toml.push_str(&format!(
            "\n[[operations]]\ninclude-name = \"{operation}\"\nchecks.not_a_server_error.expected-statuses = [\"2xx\", \"3xx\", \"4xx\", \"504\"]\n"
        ));
    }
    std::fs::write(&config, toml).unwrap();
    let served = Served::start(
        &db.spec,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            tokens.to_str().unwrap(),
            "--projections",
        ],
    );
    let out = Command::new(&st)
        .current_dir(dir.path())
        .args(["--config-file", config.to_str().unwrap(), "run"])
        .arg(format!("{}/openapi.json", served.base))
        .args(["-H", &format!("Authorization: Bearer {secret}")])
        // Subscriptions stay open for as long as the client reads.
        .args(["--exclude-path-regex", "^/subscribe/"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,positive_data_acceptance,unsupported_method,ignored_auth",
        ])
        .args(["--max-examples", "40", "--workers", "2", "--request-timeout", "20"])
        // The coverage phase has crashed inside schemathesis itself
        // (errors in its own schema walk, not answers of this server).
        .args(["--phases", "fuzzing,stateful"])
        .args(["--max-time", "150"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the fuzzer found the document untrue:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Served { mut child, .. } = served;
    terminate(&mut child);
}
