//! Which events leave through the outbox, and the subject and key each
//! goes out with (O1).

use serde::{Deserialize, Serialize};

use crate::OutboxError;

/// The subject an event goes out on unless its publication says otherwise.
pub const DEFAULT_SUBJECT: &str = "factline.{category}";
/// The key (a partitioning hint for brokers that have one) by default.
pub const DEFAULT_KEY: &str = "{stream_id}";

/// One rule: events of `category` (every category when `None`) and of
/// `event_type` (every type when `None`) go out on `subject` with `key`.
/// Templates may use `{category}`, `{event_type}` and `{stream_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// Assigned when stored; 0 before.
    #[serde(default)]
    pub id: i64,
    /// The category published (every category when `None`).
    pub category: Option<String>,
    /// The event type published (every type when `None`).
    pub event_type: Option<String>,
    /// The subject template.
    pub subject: String,
    /// The partition key template.
    pub key: String,
}

impl Publication {
    /// Every event of `category`, on the default subject.
    pub fn category(category: impl Into<String>) -> Self {
        Publication {
            id: 0,
            category: Some(category.into()),
            event_type: None,
            subject: DEFAULT_SUBJECT.to_owned(),
            key: DEFAULT_KEY.to_owned(),
        }
    }

    /// Every event, on the default subject.
    pub fn everything() -> Self {
        Publication {
            id: 0,
            category: None,
            event_type: None,
            subject: DEFAULT_SUBJECT.to_owned(),
            key: DEFAULT_KEY.to_owned(),
        }
    }

    /// Publishes only events of this type.
    pub fn of_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Publishes on this subject template.
    pub fn on_subject(mut self, template: impl Into<String>) -> Self {
        self.subject = template.into();
        self
    }

    /// Uses this partition key template.
    pub fn with_key(mut self, template: impl Into<String>) -> Self {
        self.key = template.into();
        self
    }

    /// Refuses empty names and templates with unknown placeholders or
    /// characters no broker subject may hold.
    pub fn validate(&self) -> Result<(), OutboxError> {
        let invalid = |message: String| Err(OutboxError::InvalidInput(message));
        for (what, name) in [
            ("category", &self.category),
            ("event type", &self.event_type),
        ] {
            if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                return invalid(format!("the {what} of a publication is empty"));
            }
        }
        for (what, template) in [("subject", &self.subject), ("key", &self.key)] {
            check_template(what, template)?;
        }
        if self.subject.contains(['*', '>']) || self.subject.chars().any(char::is_whitespace) {
            return invalid(format!(
                "the subject {:?} holds a wildcard or whitespace: a published subject may not",
                self.subject
            ));
        }
        if self.subject.split('.').any(str::is_empty) {
            return invalid(format!(
                "the subject {:?} has an empty token (two dots, or a dot at an end)",
                self.subject
            ));
        }
        Ok(())
    }

    /// Whether an event of this stream category and type goes out here.
    pub fn matches(&self, category: &str, event_type: &str) -> bool {
        self.category.as_deref().is_none_or(|c| c == category)
            && self.event_type.as_deref().is_none_or(|t| t == event_type)
    }

    /// The subject for one event. Values are made safe as subject tokens
    /// (`.`, wildcards and whitespace become `_`), so a stream id cannot
    /// add tokens or wildcards.
    pub fn subject_for(&self, stream_id: &str, category: &str, event_type: &str) -> String {
        render(
            &self.subject,
            stream_id,
            category,
            event_type,
            push_subject_token,
        )
    }

    /// The key for one event (values as they are).
    pub fn key_for(&self, stream_id: &str, category: &str, event_type: &str) -> String {
        render(&self.key, stream_id, category, event_type, String::push_str)
    }
}

const PLACEHOLDERS: [&str; 3] = ["category", "event_type", "stream_id"];

fn check_template(what: &str, template: &str) -> Result<(), OutboxError> {
    if template.is_empty() {
        return Err(OutboxError::InvalidInput(format!(
            "the {what} template is empty"
        )));
    }
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(OutboxError::InvalidInput(format!(
                "the {what} template {template:?} has an unclosed '{{'"
            )));
        };
        let name = &rest[open + 1..open + close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(OutboxError::InvalidInput(format!(
                "the {what} template {template:?} uses {{{name}}}; known: {{category}}, {{event_type}}, {{stream_id}}"
            )));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// Fills a template in one pass, so a value that looks like a placeholder
/// stays as it is.
fn render(
    template: &str,
    stream_id: &str,
    category: &str,
    event_type: &str,
    push_value: impl Fn(&mut String, &str),
) -> String {
    let mut out = String::with_capacity(template.len() + stream_id.len() + event_type.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        rest = &rest[open..];
        let value = [
            ("{category}", category),
            ("{event_type}", event_type),
            ("{stream_id}", stream_id),
        ]
        .into_iter()
        .find(|(placeholder, _)| rest.starts_with(placeholder));
        match value {
            Some((placeholder, value)) => {
                push_value(&mut out, value);
                rest = &rest[placeholder.len()..];
            }
            None => {
                out.push('{');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn push_subject_token(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push('_');
    }
    out.extend(value.chars().map(|c| match c {
        '.' | '*' | '>' => '_',
        c if c.is_whitespace() || c.is_control() => '_',
        c => c,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_rendered_as_safe_tokens() {
        let p =
            Publication::category("Order").on_subject("shop.{category}.{event_type}.{stream_id}");
        assert!(p.validate().is_ok());
        assert_eq!(
            p.subject_for("Order-a.b *>", "Order", "OrderPlaced"),
            "shop.Order.OrderPlaced.Order-a_b___"
        );
        assert_eq!(p.key_for("Order-a.b", "Order", "X"), "Order-a.b");
        // Values are not templates: a stream id naming a placeholder stays.
        let keyed = Publication::everything().with_key("{category}/{stream_id}/{x");
        assert_eq!(keyed.key_for("{event_type}", "", "T"), "/{event_type}/{x");
        assert_eq!(
            Publication::everything().subject_for("S", "", "T"),
            "factline._"
        );
        assert!(p.matches("Order", "Anything"));
        assert!(!p.matches("Customer", "Anything"));
        let typed = Publication::everything().of_type("OrderPaid");
        assert!(typed.matches("Order", "OrderPaid"));
        assert!(!typed.matches("Order", "OrderPlaced"));
    }

    #[test]
    fn bad_publications_are_refused_with_the_reason() {
        let cases = [
            (
                Publication::category("Order").on_subject("a.{nope}"),
                "{nope}",
            ),
            (
                Publication::category("Order").on_subject("a.{category"),
                "unclosed",
            ),
            (Publication::category("Order").on_subject("a.>"), "wildcard"),
            (
                Publication::category("Order").on_subject("a..b"),
                "empty token",
            ),
            (Publication::category(" "), "category"),
            (
                Publication::category("Order").with_key(""),
                "key template is empty",
            ),
        ];
        for (publication, reason) in cases {
            let error = publication.validate().unwrap_err().to_string();
            assert!(error.contains(reason), "{error:?} should say {reason:?}");
        }
    }
}
