//! The cluster layer around a WebSocket server: admission at upgrade time (see
//! [`HybridCluster`]).

mod admission;
mod future;
mod in_band;
mod layer;

use std::task::{Context, Poll};

use http::header::{CONNECTION, HeaderValue, LOCATION, RETRY_AFTER, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use hybrid_cluster_core::UserId;
use tower_service::Service;

pub(crate) use self::admission::{Admission, admit};
pub use self::future::ResponseFuture;
pub(crate) use self::in_band::Refusal;
pub use self::in_band::{CLOSE_REDIRECT, CLOSE_UNAVAILABLE, RETRY_AFTER_MS, RedirectReason};
pub use self::layer::HybridClusterLayer;
use crate::cluster::Cluster;
use crate::config::PlacementMode;
use crate::handle::{ConnectionSlot, ResumeRequest};

/// Seconds a refused client is told to wait before it tries again.
pub const RETRY_AFTER_SECS: u32 = 5;

/// The cluster layer's service: admission at upgrade time.
///
/// A WebSocket handler returns the 101 at once and serves the socket in a task of its own, so
/// all the cluster layer can see is the upgrade request; its work happens there:
///
/// - **admission**: the balancer's [placement](hybrid_cluster_balance::Placer) decides whether
///   the client stays on this node, goes to another (its WebSocket URL, query string kept) or
///   nowhere (no node has room). A node over its connection limit or draining never accepts.
///   The [placement mode](crate::PlacementMode) says how the client learns it: by default in
///   the WebSocket itself (a `101`, one JSON text frame, then a close with code 4000 or 4001:
///   browsers can read it), or with `307 Temporary Redirect` (`Location:`) and `503 Service
///   Unavailable` (`Retry-After: 5`) for native clients that follow redirects;
/// - **registration**: an accepted client gets a connection id and an inbox, and the handler
///   finds its [`ClusterConnection`](crate::ClusterConnection) in the request's extensions.
///   When a layer before this one put a [`UserId`] in the request's extensions (see
///   [`IdentityLayer`](crate::IdentityLayer)), the connection is that user's: messages to
///   the user reach it.
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
        let mode = self.cluster.node.config.placement_mode;
        let user = request.extensions().get::<UserId>().cloned();
        match admit(&self.cluster.node, user) {
            Admission::Accept(connection) => {
                let resume = request.uri().query().and_then(ResumeRequest::from_query);
                request
                    .extensions_mut()
                    .insert(ConnectionSlot::new(connection.with_resume(resume)));
                ResponseFuture::inner(self.inner.call(request))
            }
            Admission::Redirect { mut url, reason } => {
                if let Some(query) = request.uri().query() {
                    url.push('?');
                    url.push_str(query);
                }
                let refusal = Refusal::Redirect {
                    url: &url,
                    reason: Some(reason),
                };
                ResponseFuture::ready(refuse(&mut request, mode, refusal))
            }
            Admission::Unavailable => {
                ResponseFuture::ready(refuse(&mut request, mode, Refusal::UNAVAILABLE))
            }
        }
    }
}

/// The answer to an upgrade request the cluster does not keep here, in `mode`.
fn refuse<ReqBody, ResBody: Default>(
    request: &mut Request<ReqBody>,
    mode: PlacementMode,
    refusal: Refusal<'_>,
) -> Response<ResBody> {
    if mode == PlacementMode::InBand
        && let Some(response) = in_band::answer(request, refusal)
    {
        return response;
    }
    match refusal {
        Refusal::Redirect { url, .. } => match HeaderValue::try_from(url) {
            Ok(location) => respond(StatusCode::TEMPORARY_REDIRECT, Some((LOCATION, location))),
            Err(_) => unavailable(),
        },
        Refusal::Unavailable { .. } => unavailable(),
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
