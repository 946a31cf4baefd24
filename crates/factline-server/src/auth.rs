//! Bearer tokens with read, write and admin scopes per category (X6).
//!
//! The tokens file is JSON:
//!
//! ```json
//! {"tokens": [
//!   {"name": "orders-service", "token": "…at least 16 characters…",
//!    "read": ["*"], "write": ["Order", "Customer"]},
//!   {"name": "ops", "sha256": "<hex SHA-256 of the token>", "admin": ["*"]}
//! ]}
//! ```
//!
//! A token is kept only as its SHA-256 digest, so the server holds no
//! secret it could leak, and a presented token is compared with every
//! digest in constant time. `read` lets a token read and subscribe to the
//! categories listed, `write` append to them; `$all` needs `read: ["*"]`;
//! the admin API, `/metrics` and the dashboard's data need `admin: ["*"]`.
//! `query` lists the declared read models a token may query
//! (`/read-models/…`; `*` for all); `admin: ["*"]` may query every one.

use std::collections::HashSet;
use std::path::Path;

use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ApiError;

/// The shortest token accepted: shorter ones can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token may do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes {
    /// Categories it may read.
    pub read: CategorySet,
    /// Categories it may append to.
    pub write: CategorySet,
    /// Categories it may administer (projections, outbox, dashboard need every category).
    pub admin: CategorySet,
    /// Read models it may query (`*`: all).
    pub query: CategorySet,
}

/// A set of categories; `*` is every category.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CategorySet {
    every: bool,
    named: HashSet<String>,
}

impl CategorySet {
    /// Every category, `*`.
    pub fn every() -> Self {
        CategorySet {
            every: true,
            named: HashSet::new(),
        }
    }

    /// Whether `category` is in the set.
    pub fn contains(&self, category: &str) -> bool {
        self.every || self.named.contains(category)
    }

    /// Whether the set is every category.
    pub fn is_every(&self) -> bool {
        self.every
    }

    /// Read-model names: 1 to 100 letters, digits, `_`, `-` or `.`.
    fn parse_names(token: &str, entries: Vec<String>) -> Result<Self, TokensError> {
        let mut set = CategorySet::default();
        for entry in entries {
            if entry == "*" {
                set.every = true;
            } else if factline_projections::is_valid_name(&entry) {
                set.named.insert(entry);
            } else {
                return Err(TokensError::Invalid(format!(
                    "token {token:?}: query scope: {entry:?} is not a read model's name (or \"*\" for every read model)"
                )));
            }
        }
        Ok(set)
    }

    fn parse(token: &str, scope: &str, entries: Vec<String>) -> Result<Self, TokensError> {
        let mut set = CategorySet::default();
        for entry in entries {
            if entry == "*" {
                set.every = true;
            } else if let Err(e) = factline_core::check_category(&entry) {
                return Err(TokensError::Invalid(format!(
                    "token {token:?}: {scope} scope: {e} (or \"*\" for every category)"
                )));
            } else {
                set.named.insert(entry);
            }
        }
        Ok(set)
    }
}

/// One configured token. Its `Debug` shows the name only.
#[derive(Clone)]
pub struct Token {
    /// The token's name, for logs and metrics.
    pub name: String,
    digest: [u8; 32],
    /// What it may do.
    pub scopes: Scopes,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// The tokens a server accepts.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

/// Why a tokens file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokensError {
    #[error("cannot read the tokens file {path}: {source}")]
    /// The file cannot be read.
    Read {
        /// The file's path.
        path: String,
        /// What the system said.
        source: std::io::Error,
    },
    #[error("the tokens file is not valid: {0}")]
    /// The file is not a valid tokens file: what is wrong.
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
    #[serde(default)]
    query: Vec<String>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hex_digest(name: &str, hex: &str) -> Result<[u8; 32], TokensError> {
    let bad = || {
        TokensError::Invalid(format!(
            "token {name:?}: sha256 must be 64 hexadecimal digits"
        ))
    };
    // from_str_radix alone would take a sign ("+f"), so check every digit.
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// A secret must be sendable as `Authorization: Bearer <token>` (visible
/// ASCII, no spaces) and long enough not to be guessed.
fn check_secret(name: &str, token: &str) -> Result<(), TokensError> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokensError::Invalid(format!(
            "token {name:?} must be visible ASCII characters without spaces, as a bearer token is sent"
        )));
    }
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(TokensError::Invalid(format!(
            "token {name:?} is shorter than {MIN_TOKEN_LEN} characters"
        )));
    }
    Ok(())
}

impl Tokens {
    /// Reads and checks the tokens file at `path`.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks the JSON of a tokens file.
    pub fn parse(text: &str) -> Result<Self, TokensError> {
        let file: TokensFile =
            serde_json::from_str(text).map_err(|e| TokensError::Invalid(e.to_string()))?;
        if file.tokens.is_empty() {
            return Err(TokensError::Invalid(
                "it lists no tokens; leave --tokens out to run without access control on 127.0.0.1"
                    .into(),
            ));
        }
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        let mut tokens = Vec::with_capacity(file.tokens.len());
        for entry in file.tokens {
            let name = entry.name;
            if name.trim().is_empty() {
                return Err(TokensError::Invalid("a token has an empty name".into()));
            }
            if !names.insert(name.clone()) {
                return Err(TokensError::Invalid(format!(
                    "the name {name:?} is used twice"
                )));
            }
            let digest = match (entry.token, entry.sha256) {
                (Some(token), None) => {
                    check_secret(&name, &token)?;
                    digest(&token)
                }
                (None, Some(hex)) => parse_hex_digest(&name, &hex)?,
                _ => {
                    return Err(TokensError::Invalid(format!(
                        "token {name:?} needs exactly one of \"token\" and \"sha256\""
                    )))
                }
            };
            if !digests.insert(digest) {
                return Err(TokensError::Invalid(format!(
                    "token {name:?} is the same secret as another token"
                )));
            }
            let scopes = Scopes {
                read: CategorySet::parse(&name, "read", entry.read)?,
                write: CategorySet::parse(&name, "write", entry.write)?,
                admin: CategorySet::parse(&name, "admin", entry.admin)?,
                query: CategorySet::parse_names(&name, entry.query)?,
            };
            tokens.push(Token {
                name,
                digest,
                scopes,
            });
        }
        Ok(Tokens { tokens })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token whose secret `presented` is. Every digest is compared, in
    /// constant time, so the timing tells nothing about which one matched
    /// or how much of a wrong one did.
    pub fn find(&self, presented: &str) -> Option<&Token> {
        let candidate = digest(presented);
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&candidate)) {
                found = Some(token);
            }
        }
        found
    }
}

/// Who is calling: everyone (no tokens configured) or one token.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No tokens are configured: everyone may do everything.
    Anonymous,
    /// A configured token.
    Token {
        /// The token's name.
        name: String,
        /// What it may do (boxed: a caller is passed around by value).
        scopes: Box<Scopes>,
    },
}

impl Caller {
    /// Identifies the caller of a request; 401 for a missing or unknown
    /// token when tokens are configured.
    pub fn identify(tokens: Option<&Tokens>, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(tokens) = tokens else {
            return Ok(Caller::Anonymous);
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "this server needs a bearer token: send `Authorization: Bearer <token>`".into(),
                )
            })?;
        match tokens.find(presented) {
            Some(token) => Ok(Caller::Token {
                name: token.name.clone(),
                scopes: Box::new(token.scopes.clone()),
            }),
            None => Err(ApiError::Unauthorized(
                "the bearer token is not one this server accepts".into(),
            )),
        }
    }

    /// [`Caller::identify`] from a request's parts.
    pub fn from_parts(tokens: Option<&Tokens>, parts: &Parts) -> Result<Caller, ApiError> {
        Self::identify(tokens, &parts.headers)
    }

    /// The token's name, for logs; never the secret.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::Token { name, .. } => name,
        }
    }

    fn check(
        &self,
        allowed: impl Fn(&Scopes) -> bool,
        what: impl FnOnce() -> String,
    ) -> Result<(), ApiError> {
        match self {
            Caller::Anonymous => Ok(()),
            Caller::Token { scopes, .. } if allowed(scopes.as_ref()) => Ok(()),
            Caller::Token { name, .. } => Err(ApiError::Forbidden(format!(
                "token {name:?} may not {}",
                what()
            ))),
        }
    }

    /// 403 unless the caller may read `category`.
    pub fn may_read(&self, category: &str) -> Result<(), ApiError> {
        self.check(
            |s| s.read.contains(category),
            || format!("read category {category:?}"),
        )
    }

    /// 403 unless the caller may read every category (`$all`).
    pub fn may_read_all(&self) -> Result<(), ApiError> {
        self.check(
            |s| s.read.is_every(),
            || "read $all (that needs read scope \"*\")".into(),
        )
    }

    /// 403 unless the caller may append to `category`.
    pub fn may_write(&self, category: &str) -> Result<(), ApiError> {
        self.check(
            |s| s.write.contains(category),
            || format!("write to category {category:?}"),
        )
    }

    /// 403 unless the caller may query the read model `name` (its
    /// `query` scope names it, or it administers everything).
    pub fn may_query(&self, name: &str) -> Result<(), ApiError> {
        self.check(
            |s| s.query.contains(name) || s.admin.is_every(),
            || format!("query read model {name:?} (its query scope does not list it)"),
        )
    }

    /// Whether the caller may query the read model `name`.
    pub fn can_query(&self, name: &str) -> bool {
        self.may_query(name).is_ok()
    }

    /// 403 unless the caller may administer every category.
    pub fn may_administer(&self) -> Result<(), ApiError> {
        self.check(
            |s| s.admin.is_every(),
            || "use the admin API (that needs admin scope \"*\")".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{"tokens":[
        {"name":"writer","token":"0123456789abcdef-writer","read":["Order"],"write":["Order"]},
        {"name":"ops","sha256":"SHA","admin":["*"],"read":["*"]}
    ]}"#;

    fn tokens() -> Tokens {
        let hex: String = digest("ops-token-0123456789")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Tokens::parse(&FILE.replace("SHA", &hex)).unwrap()
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn tokens_are_found_by_secret_or_digest_and_scoped() {
        let tokens = tokens();
        let writer =
            Caller::identify(Some(&tokens), &headers("Bearer 0123456789abcdef-writer")).unwrap();
        assert_eq!(writer.name(), "writer");
        assert!(writer.may_write("Order").is_ok());
        assert!(writer.may_read("Order").is_ok());
        assert!(matches!(
            writer.may_write("Customer"),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(writer.may_read_all(), Err(ApiError::Forbidden(_))));
        assert!(matches!(
            writer.may_administer(),
            Err(ApiError::Forbidden(_))
        ));

        let ops = Caller::identify(Some(&tokens), &headers("bearer ops-token-0123456789")).unwrap();
        assert_eq!(ops.name(), "ops");
        assert!(ops.may_administer().is_ok() && ops.may_read_all().is_ok());
        assert!(ops.may_write("Order").is_err());
    }

    #[test]
    fn missing_or_wrong_tokens_are_unauthorized() {
        let tokens = tokens();
        for h in [
            HeaderMap::new(),
            headers("Bearer nope-nope-nope-nope"),
            headers("Basic 0123456789abcdef-writer"),
            headers("Bearer"),
        ] {
            assert!(matches!(
                Caller::identify(Some(&tokens), &h),
                Err(ApiError::Unauthorized(_))
            ));
        }
        assert!(matches!(
            Caller::identify(None, &HeaderMap::new()),
            Ok(Caller::Anonymous)
        ));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, says) in [
            (r#"{"tokens":[]}"#, "no tokens"),
            (r#"{"tokens":[{"name":"a","token":"short"}]}"#, "shorter"),
            (
                r#"{"tokens":[{"name":"a","token":"                "}]}"#,
                "without spaces",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"ééééééééé"}]}"#,
                "visible ASCII",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789 abcdef"}]}"#,
                "without spaces",
            ),
            (
                r#"{"tokens":[{"name":"a","sha256":"+fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"}]}"#,
                "64 hexadecimal",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef","sha256":"00"}]}"#,
                "exactly one",
            ),
            (
                r#"{"tokens":[{"name":"a","sha256":"zz"}]}"#,
                "64 hexadecimal",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef","read":["Order-1"]}]}"#,
                "not a category",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef"},{"name":"a","token":"0123456789abcdeg"}]}"#,
                "used twice",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef"},{"name":"b","token":"0123456789abcdef"}]}"#,
                "same secret",
            ),
            (r#"{"tokens":[{"name":"a","tokn":"x"}]}"#, "unknown field"),
        ] {
            let err = Tokens::parse(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let shown = format!("{:?}", tokens());
        assert!(shown.contains("writer"));
        assert!(!shown.contains("0123456789abcdef-writer"));
    }

    #[test]
    fn a_query_scope_names_read_models_and_admins_query_all() {
        let tokens = Tokens::parse(
            r#"{"tokens":[
                {"name":"billing","token":"billing-token-0123","query":["invoices","revenue.v2"]},
                {"name":"ops","token":"ops-token-0123456789","admin":["*"]},
                {"name":"reader","token":"reader-token-012345","read":["*"]}]}"#,
        )
        .unwrap();
        let caller = |secret: &str| {
            let token = tokens.find(secret).unwrap();
            Caller::Token {
                name: token.name.clone(),
                scopes: Box::new(token.scopes.clone()),
            }
        };
        let billing = caller("billing-token-0123");
        assert!(billing.may_query("invoices").is_ok() && billing.may_query("revenue.v2").is_ok());
        assert!(matches!(
            billing.may_query("tickets"),
            Err(ApiError::Forbidden(_))
        ));
        assert!(caller("ops-token-0123456789").may_query("anything").is_ok());
        assert!(
            !caller("reader-token-012345").can_query("invoices"),
            "read scopes are for events"
        );
        let bad = Tokens::parse(
            r#"{"tokens":[{"name":"x","token":"x-token-0123456789","query":["a b"]}]}"#,
        );
        assert!(matches!(bad, Err(TokensError::Invalid(m)) if m.contains("query scope")));
    }
}
