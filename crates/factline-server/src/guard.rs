//! Keeps web pages from using a server through a visitor's browser: a
//! page on another site may not read or write (its `Origin` is refused), may
//! not reach a local server under a name of its own (DNS rebinding: the
//! `Host` must be an address, `localhost` or a configured name), and may
//! not post a form or plain text (writes need `Content-Type:
//! application/json`, which a browser sends cross-site only after a CORS
//! preflight this server never grants; [`JsonWrite`] checks it in every
//! handler of a `POST`, so other methods still answer 405).

use axum::extract::{Request, State};
use axum::http::header::{CONTENT_TYPE, HOST, ORIGIN};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{ApiError, Shared};

/// Which `Host` names and which other origins a server answers.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct BrowserPolicy {
    /// Host names (without port) besides IP addresses and `localhost`, for
    /// a server reached by name, e.g. behind a reverse proxy.
    pub allowed_hosts: Vec<String>,
    /// Origins besides the server's own whose pages may call it, e.g.
    /// `https://ops.example.com`.
    pub allowed_origins: Vec<String>,
}

impl BrowserPolicy {
    /// This policy with `name` also accepted as `Host`.
    pub fn allow_host(mut self, name: impl Into<String>) -> Self {
        self.allowed_hosts.push(name.into().to_ascii_lowercase());
        self
    }

    /// This policy with pages of `origin` also allowed.
    pub fn allow_origin(mut self, origin: impl Into<String>) -> Self {
        self.allowed_origins
            .push(origin.into().trim_end_matches('/').to_ascii_lowercase());
        self
    }

    fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = headers.get(HOST).and_then(|v| v.to_str().ok());
        if let Some(host) = host {
            if !self.host_allowed(host) {
                return Err(ApiError::Forbidden(format!(
                    "this server does not answer to the name {:?}: start it with --allowed-host for a name of its own",
                    host_name(host)
                )));
            }
        }
        if let Some(origin) = headers.get(ORIGIN) {
            let origin = origin.to_str().unwrap_or("").to_ascii_lowercase();
            if !self.origin_allowed(&origin, host) {
                return Err(ApiError::Forbidden(format!(
                    "requests from pages of {origin:?} are refused: only the server's own pages (or --allowed-origin) may call it"
                )));
            }
        }
        Ok(())
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || self.allowed_hosts.contains(&name)
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let own = host.is_some_and(|host| {
            let host = host.to_ascii_lowercase();
            origin == format!("http://{host}") || origin == format!("https://{host}")
        });
        own || self.allowed_origins.iter().any(|allowed| allowed == origin)
    }
}

/// `Host` without its port: `[::1]:80` → `::1`, `a.b:80` → `a.b`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// A write's proof that its body is declared JSON: every `POST` handler
/// takes it, so a form or plain-text post is 415 and writes nothing.
pub(crate) struct JsonWrite;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for JsonWrite {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        if is_json(&parts.headers) {
            Ok(JsonWrite)
        } else {
            Err(ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".into(),
            ))
        }
    }
}

/// The layer: refuses before any route or token is looked at.
pub(crate) async fn browsers(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    match state.config.browsers.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts_are_addresses_localhost_or_configured_names() {
        let policy = BrowserPolicy::default().allow_host("Events.Example.com");
        for host in [
            "127.0.0.1:7480",
            "[::1]:7480",
            "localhost:1",
            "LOCALHOST",
            "10.1.2.3",
            "events.example.com:443",
        ] {
            assert!(policy.host_allowed(host), "{host}");
        }
        for host in [
            "evil.example:7480",
            "127.0.0.1.evil.example",
            "localhost.evil",
            "example.com",
        ] {
            assert!(!policy.host_allowed(host), "{host}");
        }
    }

    #[test]
    fn only_own_or_configured_origins_and_json_bodies_pass() {
        let policy = BrowserPolicy::default().allow_origin("https://ops.example.com/");
        for origin in ["http://127.0.0.1:7480", "https://ops.example.com"] {
            let h = headers(&[("host", "127.0.0.1:7480"), ("origin", origin)]);
            assert!(policy.check(&h).is_ok(), "{origin}");
        }
        for origin in ["http://evil.example", "null", "http://127.0.0.1:7481"] {
            let h = headers(&[("host", "127.0.0.1:7480"), ("origin", origin)]);
            assert!(
                matches!(policy.check(&h), Err(ApiError::Forbidden(_))),
                "{origin}"
            );
        }
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("application/jsonx"),
        ] {
            let mut h = HeaderMap::new();
            if let Some(t) = content_type {
                h.insert(CONTENT_TYPE, t.parse().unwrap());
            }
            assert!(!is_json(&h), "{content_type:?}");
        }
        assert!(is_json(&headers(&[(
            "content-type",
            "Application/JSON; charset=utf-8"
        )])));
    }
}
