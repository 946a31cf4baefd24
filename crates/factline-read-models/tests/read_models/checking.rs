//! A definitions file is checked before anything runs: each mistake is
//! reported with its line and column.

use factline_read_models::{json_schema, DefinitionError, Definitions};

const INVOICES: &str = factline_testkit::fixtures::INVOICES_READ_MODELS;

/// The errors of `text`, as (line, column, message).
fn errors(text: &str) -> Vec<(usize, usize, String)> {
    match Definitions::parse(text, "test.toml") {
        Ok(_) => panic!("expected errors in:\n{text}"),
        Err(e) => {
            e.0.into_iter()
                .map(
                    |DefinitionError {
                         line,
                         column,
                         message,
                         ..
                     }| (line, column, message),
                )
                .collect()
        }
    }
}

/// The one error of `text`, whose message must contain `wanted`; its line.
fn one_error(text: &str, wanted: &str) -> (usize, usize) {
    let all = errors(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    let (line, column, message) = &all[0];
    assert!(
        message.contains(wanted),
        "{message:?} should say {wanted:?}"
    );
    (*line, *column)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect(needle) + 1
}

#[test]
fn the_invoices_file_is_valid_and_read_in_order() {
    let definitions = Definitions::parse(INVOICES, "invoices.toml").unwrap();
    let model = definitions.get("invoices").unwrap();
    assert_eq!(model.version(), 1);
    assert_eq!(model.categories(), ["Invoice"]);
    let tables: Vec<&str> = model.tables().iter().map(|t| t.name()).collect();
    assert_eq!(tables, ["invoices", "revenue_per_day", "invoice_customers"]);
    let columns: Vec<&str> = model.tables()[0]
        .columns()
        .iter()
        .map(|c| c.name())
        .collect();
    assert_eq!(columns[..3], ["invoice_id", "customer", "total_cents"]);
    let types: Vec<&str> = model.event_types().collect();
    assert_eq!(types, ["InvoiceIssued", "PaymentReceived", "InvoiceVoided"]);
    assert_eq!(model.queries()[0].name(), "open_by_customer");
}

#[test]
fn an_unknown_column_is_reported_at_its_value() {
    let text = INVOICES.replace("add = { paid_cents", "add = { paid_amount");
    let (line, _) = one_error(&text, "\"paid_amount\" is not a column of invoices");
    assert_eq!(line, line_of(&text, "paid_amount"));
}

#[test]
fn a_type_mismatch_names_both_types() {
    let text = INVOICES.replace(
        "last_position = \"position\" }\n\n[[read_model.on.PaymentReceived]]\nupsert",
        "last_position = \"recorded_day\" }\n\n[[read_model.on.PaymentReceived]]\nupsert",
    );
    one_error(
        &text,
        "recorded_day is text, column invoices.last_position is integer",
    );
}

#[test]
fn a_table_used_but_not_declared_is_an_error() {
    let text = INVOICES.replace("upsert = \"revenue_per_day\"", "upsert = \"revenue\"");
    let (line, _) = one_error(&text, "upsert \"revenue\": the table is not declared");
    assert_eq!(
        line,
        line_of(&text, "upsert = \"revenue\"") - 1,
        "the operation's table starts on the line before"
    );
    let text = INVOICES.replace("UPDATE {invoices}", "UPDATE {bills}");
    one_error(&text, "table {bills} is not declared");
}

#[test]
fn a_query_that_writes_is_refused() {
    let text = INVOICES.replace(
        "sql = \"SELECT invoice_id",
        "sql = \"WITH gone AS (DELETE FROM {invoices} RETURNING *) SELECT invoice_id",
    );
    let (line, column) = one_error(&text, "DELETE is not allowed");
    assert_eq!((line, column), (line_of(&text, "WITH gone"), 7));
}

#[test]
fn a_bad_expression_points_into_its_text() {
    let text = INVOICES.replace(
        "when = \"data.reason != 'test'\"",
        "when = \"data.reason !! 'test'\"",
    );
    let (line, column) = one_error(&text, "condition:");
    assert_eq!((line, column), (line_of(&text, "!!"), 21));
}

#[test]
fn a_syntax_error_of_toml_has_its_place() {
    let text = INVOICES.replace("version = 1\n", "version = = 1\n");
    let all = errors(&text);
    assert_eq!(all[0].0, line_of(&text, "version = = 1"));
}

#[test]
fn an_unknown_field_is_an_error() {
    let text = INVOICES.replace("if_exists = \"ignore\"", "if_exist = \"ignore\"");
    let (line, _) = one_error(&text, "unknown field `if_exist`");
    assert_eq!(line, line_of(&text, "if_exist"));
}

#[test]
fn a_new_row_must_fill_every_required_column() {
    let text = INVOICES.replace(", status = \"'open'\"", "");
    one_error(&text, "insert into invoices leaves column status empty");
}

#[test]
fn an_upsert_key_is_the_tables_key() {
    let text = INVOICES.replace(
        "key = { customer = \"lookup.customer\", day = \"recorded_day\" }",
        "key = { customer = \"lookup.customer\" }",
    );
    one_error(&text, "the key must be the table's key (customer, day)");
}

#[test]
fn add_min_and_max_take_numbers_only() {
    let text = INVOICES.replace(
        "max = { largest = \"data.cents\" }",
        "max = { largest = \"data.cents\", customer = \"data.who\" }",
    );
    let all = errors(&text);
    assert!(
        all.iter()
            .any(|(_, _, m)| m.contains("revenue_per_day.customer is not a number")),
        "{all:#?}"
    );
}

#[test]
fn unknown_lookups_and_parameters_are_errors() {
    let text = INVOICES.replace("\"lookup.customer\"", "\"lookup.client\"");
    one_error(&text, "unknown lookup \"client\"");
    let text = INVOICES.replace("invoice_id = :id AND", "invoice_id = :invoice AND");
    let all = errors(&text);
    assert!(
        all.iter()
            .any(|(_, _, m)| m.contains(":invoice is not in params")),
        "{all:#?}"
    );
    assert!(
        all.iter()
            .any(|(_, _, m)| m.contains("param id is not used")),
        "{all:#?}"
    );
}

#[test]
fn every_mistake_is_reported_at_once() {
    let text = INVOICES
        .replace("add = { paid_cents", "add = { paid_amount")
        .replace("upsert = \"revenue_per_day\"", "upsert = \"revenue\"");
    assert_eq!(errors(&text).len(), 2);
}

#[test]
fn the_json_schema_describes_the_file() {
    let schema = json_schema();
    let text = schema.to_string();
    for word in [
        "read_model",
        "tables",
        "lookups",
        "upsert",
        "if_missing",
        "queries",
    ] {
        assert!(text.contains(word), "the schema names {word}");
    }
}

#[test]
fn the_fingerprint_follows_content_not_layout() {
    let model = |text: &str| Definitions::parse(text, "f").unwrap().read_models()[0].clone();
    let base = model(INVOICES).fingerprint().to_owned();
    let relaid = INVOICES
        .replace("# Invoices", "#   Invoices, reformatted")
        .replace(
            "description = \"Every invoice",
            "description = \"All invoices",
        );
    assert_eq!(
        model(&relaid).fingerprint(),
        base,
        "comments and descriptions do not count"
    );
    let changed = INVOICES.replace("payments = 1", "payments = 2");
    assert_ne!(model(&changed).fingerprint(), base, "an operation does");
}

/// The reference's first example is a whole file: it must stay valid.
#[test]
fn the_reference_example_is_valid() {
    let reference = include_str!("../../../../docs/read-models.md");
    let start = reference
        .find("```toml\n[[read_model]]")
        .expect("an example")
        + "```toml\n".len();
    let end = start + reference[start..].find("```").unwrap();
    let definitions = Definitions::parse(&reference[start..end], "docs/read-models.md").unwrap();
    assert_eq!(definitions.read_models()[0].name(), "invoices");
}
