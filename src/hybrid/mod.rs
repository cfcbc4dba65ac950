//! The cluster layer around a WebSocket server: admission at upgrade time (see
//! [`HybridCluster`]).

mod admission;
mod future;
mod layer;

use std::task::{Context, Poll};

use http::header::{CONNECTION, HeaderValue, LOCATION, RETRY_AFTER, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use tower_service::Service;

pub(crate) use self::admission::{Admission, admit};
pub use self::future::ResponseFuture;
pub use self::layer::HybridClusterLayer;
use crate::cluster::Cluster;
use crate::handle::ConnectionSlot;

/// Seconds a refused client is told to wait before it tries again.
pub const RETRY_AFTER_SECS: u32 = 5;

/// The cluster layer's service: admission at upgrade time.
///
/// A WebSocket handler returns the 101 at once and serves the socket in a task of its own, so
/// all the cluster layer can see is the upgrade request; its work happens there:
///
/// - **admission**: the balancer's [placement](hybrid_cluster_balance::Placer) decides whether
///   the client stays on this node, goes to another (`307 Temporary Redirect`, `Location:` the
///   other node's WebSocket URL, query string kept) or nowhere (`503 Service Unavailable`,
///   `Retry-After: 5`, when no node has room). A node over its connection limit or draining
///   never accepts;
/// - **registration**: an accepted client gets a connection id and an inbox, and the handler
///   finds its [`ClusterConnection`](crate::ClusterConnection) in the request's extensions.
///
/// Requests that are not WebSocket upgrades pass through untouched.
#[derive(Clone, Debug)]
pub struct HybridCluster<S> {
    inner: S,
    cluster: Cluster,
}

impl<S> HybridCluster<S> {
    /// Wraps `inner`, a WebSocket server, in the cluster of `cluster`.
    pub fn new(inner: S, cluster: Cluster) -> Self {
        Self { inner, cluster }
    }
}

/// Whether a request asks for a WebSocket (HTTP/1.1 `Upgrade: websocket`).
pub fn is_websocket_upgrade<B>(request: &Request<B>) -> bool {
    let has_token = |name, token: &str| {
        request.headers().get_all(name).iter().any(|value| {
            value
                .to_str()
                .map(|v| {
                    v.split(',')
                        .any(|part| part.trim().eq_ignore_ascii_case(token))
                })
                .unwrap_or(false)
        })
    };
    request.method() == Method::GET
        && has_token(UPGRADE, "websocket")
        && has_token(CONNECTION, "upgrade")
}

fn respond<B: Default>(
    status: StatusCode,
    header: Option<(http::HeaderName, HeaderValue)>,
) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    if let Some((name, value)) = header {
        response.headers_mut().insert(name, value);
    }
    response
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HybridCluster<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if !is_websocket_upgrade(&request) {
            return ResponseFuture::inner(self.inner.call(request));
        }
        match admit(&self.cluster.node) {
            Admission::Accept(connection) => {
                request
                    .extensions_mut()
                    .insert(ConnectionSlot::new(connection));
                ResponseFuture::inner(self.inner.call(request))
            }
            Admission::Redirect(mut url) => {
                if let Some(query) = request.uri().query() {
                    url.push('?');
                    url.push_str(query);
                }
                match HeaderValue::try_from(url) {
                    Ok(location) => ResponseFuture::ready(respond(
                        StatusCode::TEMPORARY_REDIRECT,
                        Some((LOCATION, location)),
                    )),
                    Err(_) => ResponseFuture::ready(unavailable()),
                }
            }
            Admission::Unavailable => ResponseFuture::ready(unavailable()),
        }
    }
}

fn unavailable<B: Default>() -> Response<B> {
    respond(
        StatusCode::SERVICE_UNAVAILABLE,
        Some((RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(upgrade: &str, connection: &str) -> Request<()> {
        Request::builder()
            .uri("/ws")
            .header(UPGRADE, upgrade)
            .header(CONNECTION, connection)
            .body(())
            .unwrap()
    }

    #[test]
    fn recognises_websocket_upgrades() {
        assert!(is_websocket_upgrade(&request("websocket", "Upgrade")));
        assert!(is_websocket_upgrade(&request(
            "WebSocket",
            "keep-alive, upgrade"
        )));
        assert!(!is_websocket_upgrade(&request("h2c", "upgrade")));
        assert!(!is_websocket_upgrade(&request("websocket", "keep-alive")));
        assert!(!is_websocket_upgrade(&Request::new(())));
    }
}
