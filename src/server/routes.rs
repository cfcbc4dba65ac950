//! The node server's plain HTTP routes: the status page, the client for browsers, the nodes,
//! placement and health.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{ACCESS_CONTROL_ALLOW_ORIGIN, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use axum::response::{Html, IntoResponse, Response};
use hybrid_cluster_core::NodeInfo;

use super::AppState;
use crate::hybrid::{RETRY_AFTER_SECS, Refusal};

/// The status page: every node, its status, connections against capacity, CPU and memory,
/// refreshed every 2 s from `/cluster/nodes`. Plain HTML and JavaScript, no build step.
pub const STATUS_PAGE: &str = include_str!("status.html");

pub(super) async fn status_page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

/// The client for browsers (and Node.js): an ES module without dependency nor build step,
/// exporting `connect(url, options)`, which asks `/cluster/placement` where to go, follows
/// in-band redirects, and reconnects after a drain or a lost connection with backoff and
/// jitter. Served at `GET /cluster/client.js` to pages of any origin.
pub const CLIENT_JS: &str = include_str!("client.js");

pub(super) async fn client_js() -> impl IntoResponse {
    // Pages served from another origin import it as a module, which takes CORS.
    let headers = [ANY_ORIGIN, (CONTENT_TYPE, "text/javascript; charset=utf-8")];
    (headers, CLIENT_JS)
}

pub(super) async fn nodes(State(state): State<AppState>) -> Json<Vec<NodeInfo>> {
    Json(
        state
            .cluster
            .nodes()
            .iter()
            .map(|n| (**n).clone())
            .collect(),
    )
}

/// Answers whatever origin asks: pages served elsewhere call these routes.
const ANY_ORIGIN: (axum::http::HeaderName, &str) = (ACCESS_CONTROL_ALLOW_ORIGIN, "*");

/// 200 with `{"url":URL,"node_id":ID}`, the node a new client should connect to now; 503
/// with `Retry-After: 5` and `{"type":"unavailable","retry_after_ms":5000}` when no node has
/// room. Any origin may ask.
pub(super) async fn placement(State(state): State<AppState>) -> Response {
    match state.cluster.placement() {
        Some(advice) => ([ANY_ORIGIN], Json(advice)).into_response(),
        None => {
            let headers = [ANY_ORIGIN, (CONTENT_TYPE, "application/json")];
            let body = Refusal::UNAVAILABLE.to_json();
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, headers, body).into_response();
            let retry_after = HeaderValue::from(RETRY_AFTER_SECS);
            response.headers_mut().insert(RETRY_AFTER, retry_after);
            response
        }
    }
}

/// 200 (no body) while the node serves as it should; 503, saying why, while it drains or
/// does not receive from the broker.
pub(super) async fn health(State(state): State<AppState>) -> (StatusCode, String) {
    match state.cluster.health() {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}
