//! The node server's routes for operators: `POST /cluster/users/{user}/disconnect`, behind an
//! admin token.

use std::fmt;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hybrid_cluster_core::UserId;
use serde::Deserialize;

use super::AppState;
use crate::error::SendError;
use crate::protocol::ServerMessage;

/// The secret operators send as `Authorization: Bearer …` to the admin routes. Compared in
/// time that does not depend on where it differs; never printed.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token; `None` when it is empty (an empty token would let anyone in).
    pub fn new(token: impl Into<String>) -> Option<Self> {
        let token = token.into();
        (!token.is_empty()).then_some(Self(token))
    }

    fn matches(&self, given: &str) -> bool {
        let (ours, theirs) = (self.0.as_bytes(), given.as_bytes());
        ours.len() == theirs.len()
            && ours
                .iter()
                .zip(theirs)
                .fold(0u8, |differs, (a, b)| differs | (a ^ b))
                == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = ServerMessage::Error {
        id: None,
        code,
        message,
    }
    .to_json();
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

/// Whether `headers` carry the admin token; the refusal to send otherwise.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.auth.admin_token else {
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin routes are off: the node has no admin token",
        )));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if given.is_some_and(|given| token.matches(given.trim())) {
        return Ok(());
    }
    Err(Box::new(json_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send the admin token as `Authorization: Bearer TOKEN`",
    )))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /cluster/users/{user}/disconnect`, body `{"reason":…}` (optional): closes every
/// connection of the user on every node (close code 4003, the reason). 200
/// `{"user":U,"disconnected":true}`; 404 when the user has no connection; 401 without the
/// admin token; 403 when the node has none; 400 for a bad user id or body; 503 when the
/// broker did not take it.
pub(super) async fn disconnect_user(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = authorize(&state, &headers) {
        return *refused;
    }
    let user = match UserId::new(&user) {
        Ok(user) => user,
        Err(error) => {
            return json_error(StatusCode::BAD_REQUEST, "bad_request", &error.to_string());
        }
    };
    let body: DisconnectBody = if body.is_empty() {
        DisconnectBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(body) => body,
            Err(error) => {
                let message = format!("the body is not {{\"reason\":TEXT}}: {error}");
                return json_error(StatusCode::BAD_REQUEST, "bad_request", &message);
            }
        }
    };
    let reason = body
        .reason
        .as_deref()
        .unwrap_or("disconnected by an operator");
    match state.cluster.handle().disconnect_user(&user, reason).await {
        Ok(()) => {
            let body = serde_json::json!({ "user": user.as_str(), "disconnected": true });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(error @ SendError::UserNotFound { .. }) => {
            json_error(StatusCode::NOT_FOUND, error.code(), &error.to_string())
        }
        Err(error) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            error.code(),
            &crate::error_chain(&error),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_matches_only_itself_and_is_never_printed() {
        let token = AdminToken::new("s3cret-token").unwrap();
        assert!(token.matches("s3cret-token"));
        assert!(!token.matches("s3cret-tokem"));
        assert!(!token.matches("s3cret"));
        assert!(!token.matches(""));
        assert!(AdminToken::new("").is_none());
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
