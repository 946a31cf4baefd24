//! Parsing values and conditions: a tokenizer and a small recursive
//! descent (`or` of `and` of `not` of comparisons).

use super::*;

/// Why an expression or condition does not parse: the message and the
/// byte offset in its text.
#[derive(Debug, PartialEq)]
pub(crate) struct ParseError {
    pub offset: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Number(String),
    Op(CmpOp),
    Open,
    Close,
}

fn tokens(text: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let fail = |offset, message: &str| ParseError {
        offset,
        message: message.to_owned(),
    };
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((start, Token::Open));
                i += 1;
            }
            b')' => {
                out.push((start, Token::Close));
                i += 1;
            }
            b'\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match text[i..].find('\'') {
                        None => return Err(fail(start, "a text constant is not closed with '")),
                        Some(n) => {
                            s.push_str(&text[i..i + n]);
                            i += n + 1;
                            if bytes.get(i) == Some(&b'\'') {
                                s.push('\'');
                                i += 1;
                            } else {
                                break;
                            }
                        }
                    }
                }
                out.push((start, Token::Text(s)));
            }
            b'=' | b'!' | b'<' | b'>' => {
                let two = bytes.get(i + 1) == Some(&b'=');
                let op = match (c, two) {
                    (b'=', true) => CmpOp::Eq,
                    (b'!', true) => CmpOp::Ne,
                    (b'<', true) => CmpOp::Le,
                    (b'>', true) => CmpOp::Ge,
                    (b'<', false) if bytes.get(i + 1) == Some(&b'>') => {
                        i += 1;
                        CmpOp::Ne
                    }
                    (b'<', false) => CmpOp::Lt,
                    (b'>', false) => CmpOp::Gt,
                    (b'=', false) => CmpOp::Eq,
                    _ => {
                        return Err(fail(
                            start,
                            "`!` is only used in `!=`; write `not` to negate",
                        ))
                    }
                };
                i += if two { 2 } else { 1 };
                out.push((start, Token::Op(op)));
            }
            b'-' | b'0'..=b'9' => {
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                out.push((start, Token::Number(text[start..i].to_owned())));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'.' | b'-'))
                {
                    i += 1;
                }
                out.push((start, Token::Word(text[start..i].to_owned())));
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or('?');
                return Err(fail(start, &format!("unexpected {ch:?}")));
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<(usize, Token)>,
    at: usize,
    end: usize,
    lookups_allowed: bool,
    _text: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }
    fn offset(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |(o, _)| *o)
    }
    fn fail<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            offset: self.offset(),
            message: message.into(),
        })
    }
    fn keyword(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Token::Word(w)) if w == word) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Cond, ParseError> {
        let mut all = vec![self.and()?];
        while self.keyword("or") {
            all.push(self.and()?);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Cond::Or(all)
        })
    }

    fn and(&mut self) -> Result<Cond, ParseError> {
        let mut all = vec![self.not()?];
        while self.keyword("and") {
            all.push(self.not()?);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Cond::And(all)
        })
    }

    fn not(&mut self) -> Result<Cond, ParseError> {
        if self.keyword("not") {
            return Ok(Cond::Not(Box::new(self.not()?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let inner = self.or()?;
            if self.peek() != Some(&Token::Close) {
                return self.fail("expected `)`");
            }
            self.at += 1;
            return Ok(inner);
        }
        let left = self.operand()?;
        if let Some(Token::Op(op)) = self.peek().cloned() {
            self.at += 1;
            let right = self.operand()?;
            return Ok(Cond::Cmp(left, op, right));
        }
        Ok(Cond::Truthy(left))
    }

    fn operand(&mut self) -> Result<Expr, ParseError> {
        let offset = self.offset();
        let token = match self.tokens.get(self.at) {
            Some((_, t)) => t.clone(),
            None => return self.fail("expected a value"),
        };
        self.at += 1;
        match token {
            Token::Text(s) => Ok(Expr::Const(Val::Text(s))),
            Token::Number(n) => match (n.parse::<i64>(), n.parse::<f64>()) {
                (Ok(i), _) => Ok(Expr::Const(Val::Int(i))),
                (_, Ok(f)) if f.is_finite() => Ok(Expr::Const(Val::Real(f))),
                _ => Err(ParseError {
                    offset,
                    message: format!("{n:?} is not a number"),
                }),
            },
            Token::Word(w) if w == "len" && self.peek() == Some(&Token::Open) => {
                self.at += 1;
                let inner = self.operand()?;
                if self.peek() != Some(&Token::Close) {
                    return self.fail("expected `)` after len's value");
                }
                self.at += 1;
                Ok(Expr::Len(Box::new(inner)))
            }
            Token::Word(w) => self.word(offset, &w),
            Token::Open | Token::Close | Token::Op(_) => Err(ParseError {
                offset,
                message: "expected a value".into(),
            }),
        }
    }

    fn word(&self, offset: usize, word: &str) -> Result<Expr, ParseError> {
        let fail = |message: String| Err(ParseError { offset, message });
        let mut parts = word.split('.');
        let head = parts.next().unwrap_or_default();
        let rest: Vec<String> = parts.map(str::to_owned).collect();
        if rest.iter().any(String::is_empty) {
            return fail(format!("{word:?} has an empty part between dots"));
        }
        let bare = |e: Expr| {
            if rest.is_empty() {
                Ok(e)
            } else {
                Err(ParseError {
                    offset,
                    message: format!("{head} has no fields ({word:?})"),
                })
            }
        };
        match head {
            "data" => Ok(Expr::Data(rest)),
            "metadata" => match rest.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["correlation_id"] | ["causation_id"] | ["schema_version"] | ["headers", _] => {
                    Ok(Expr::Metadata(rest))
                }
                _ => fail(format!(
                    "{word:?}: metadata has correlation_id, causation_id, schema_version and headers.<name>"
                )),
            },
            "lookup" if rest.len() == 1 => {
                if self.lookups_allowed {
                    Ok(Expr::Lookup(rest[0].clone()))
                } else {
                    fail(format!(
                        "{word:?}: a condition cannot read a lookup (it is read by the operation's SQL)"
                    ))
                }
            }
            "lookup" => fail(format!("{word:?}: write lookup.<name>")),
            "true" => bare(Expr::Const(Val::Bool(true))),
            "false" => bare(Expr::Const(Val::Bool(false))),
            "null" => bare(Expr::Const(Val::Null)),
            "stream_id" => bare(Expr::StreamId),
            "entity_id" => bare(Expr::EntityId),
            "category" => bare(Expr::Category),
            "event_type" => bare(Expr::EventType),
            "event_id" => bare(Expr::EventId),
            "version" => bare(Expr::Version),
            "position" => bare(Expr::Position),
            "recorded_at" => bare(Expr::RecordedAt),
            "recorded_day" => bare(Expr::RecordedDay),
            "recorded_hour" => bare(Expr::RecordedHour),
            _ => fail(format!(
                "unknown value {word:?}: use data.<path>, metadata.<field>, lookup.<name>, a 'text' constant, a number, or one of {}",
                BUILT_INS.join(", ")
            )),
        }
    }
}

fn parser(text: &str, lookups_allowed: bool) -> Result<Parser<'_>, ParseError> {
    Ok(Parser {
        tokens: tokens(text)?,
        at: 0,
        end: text.len(),
        lookups_allowed,
        _text: text,
    })
}

/// A value expression, e.g. `data.amount` or `'paid'`.
pub(crate) fn parse_value(text: &str) -> Result<Expr, ParseError> {
    let mut p = parser(text, true)?;
    let expr = p.operand()?;
    if p.at < p.tokens.len() {
        return p.fail("a value is one expression: nothing may follow it");
    }
    Ok(expr)
}

/// A condition, e.g. `data.refund_cents > 0 and not data.test`.
pub(crate) fn parse_condition(text: &str) -> Result<Cond, ParseError> {
    let mut p = parser(text, false)?;
    let cond = p.or()?;
    if p.at < p.tokens.len() {
        return p.fail("expected `and`, `or` or the end of the condition");
    }
    Ok(cond)
}
