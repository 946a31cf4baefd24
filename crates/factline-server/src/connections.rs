//! Accepting connections: a cap on how many are open, a deadline for a
//! request's headers, a graceful end, and JSON bodies on the error answers
//! the HTTP parser writes by itself.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::{CONNECTIONS, CONNECTIONS_REFUSED};
use crate::ApiError;

/// Limits on connections, before any request is read.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's headers; a
    /// connection that has not finished them by then is closed.
    pub header_read_timeout: Duration,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

impl ConnectionLimits {
    /// These limits with another header deadline.
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// These limits with another connection cap (at least 1).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`
/// completes, then lets the requests in flight finish.
pub async fn serve_with_limits(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    let busy = Router::new().fallback(at_capacity);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset
                    // before it was taken: wait a moment, go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(JsonParseErrors::new(stream));
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let service = TowerToHyperService::new(router.clone());
                let connection = graceful.watch(http.serve_connection(io, service));
                metrics::gauge!(CONNECTIONS).increment(1.0);
                tokio::spawn(async move {
                    let _ = connection.await;
                    metrics::gauge!(CONNECTIONS).decrement(1.0);
                    drop(permit);
                });
            }
            Err(_) => {
                metrics::counter!(CONNECTIONS_REFUSED).increment(1);
                let mut over_cap = http.clone();
                over_cap.keep_alive(false);
                let connection =
                    over_cap.serve_connection(io, TowerToHyperService::new(busy.clone()));
                tokio::spawn(async move {
                    // Bounded: the header deadline applies here too.
                    let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The answer on a connection over the cap: the usual error shape.
async fn at_capacity() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::RETRY_AFTER, "1")],
        ApiError::Unavailable(
            "the server has as many connections open as it allows; try again shortly".into(),
        ),
    )
}

/// A connection whose writes pass through, except the bodiless error
/// answers the HTTP parser sends on its own (400 for a malformed request,
/// 414, 431): those get a JSON body like every other error.
struct JsonParseErrors<IO> {
    io: IO,
    /// The answer being written in place of the parser's, and how much of
    /// it is out.
    replacing: Option<(Vec<u8>, usize)>,
}

impl<IO> JsonParseErrors<IO> {
    fn new(io: IO) -> Self {
        JsonParseErrors {
            io,
            replacing: None,
        }
    }
}

/// The JSON answer for a parser's own error answer, if `written` is one.
/// Ours always carry a body, so a bodiless 400, 414 or 431 is the parser's.
fn parser_answer(written: &[u8]) -> Option<Vec<u8>> {
    const MARK: &[u8] = b"\r\ncontent-length: 0\r\n";
    if written.len() > 512 || !written.ends_with(b"\r\n\r\n") {
        return None;
    }
    let status = written.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let (code, message) = match status {
        b"400" => ("invalid_request", "the request is not valid HTTP"),
        b"414" => (
            "uri_too_long",
            "the request's URI is longer than this server reads",
        ),
        b"431" => (
            "headers_too_large",
            "the request's headers are larger than this server reads",
        ),
        _ => return None,
    };
    if !written
        .windows(MARK.len())
        .any(|w| w.eq_ignore_ascii_case(MARK))
    {
        return None;
    }
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let status = std::str::from_utf8(status).ok()?;
    Some(
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            hyper::StatusCode::from_bytes(status.as_bytes())
                .ok()?
                .canonical_reason()
                .unwrap_or(""),
            body.len()
        )
        .into_bytes(),
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for JsonParseErrors<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacing.is_none() {
            this.replacing = parser_answer(buf).map(|answer| (answer, 0));
        }
        let Some((answer, sent)) = &mut this.replacing else {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        };
        while *sent < answer.len() {
            match Pin::new(&mut this.io).poll_write(cx, &answer[*sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Called again with the same `buf`: carries on from `sent`.
                Poll::Pending => return Poll::Pending,
            }
        }
        this.replacing = None;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_parsers_bodiless_error_answers_are_replaced() {
        let parser =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(parser_answer(parser).unwrap()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "headers_too_large");
        assert!(answer.contains(&format!("content-length: {}\r\n", body.len())));
        for ours in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n{\"a\":1}",
        ] {
            assert!(parser_answer(ours).is_none(), "{}", String::from_utf8_lossy(ours));
        }
    }
}
