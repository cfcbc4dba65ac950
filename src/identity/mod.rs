//! Who a client is, from its upgrade request: [`IdentityLayer`] runs an [`Identify`] (such as
//! [`Jwt`]) on each request and puts the [`UserId`] it finds in the request's extensions,
//! where the cluster layer behind it reads it; a request it refuses gets `401 Unauthorized`
//! before any upgrade.
//!
//! ```no_run
//! # #[cfg(feature = "jwt")]
//! # fn stack(cluster: hybrid_cluster::Cluster, app: axum::Router) -> axum::Router {
//! use hybrid_cluster::{IdentityLayer, Jwt};
//!
//! let jwt = Jwt::hs256(b"a secret the issuer shares").expect("a secret");
//! let identity = IdentityLayer::new(jwt).required();
//! // Layers added later run first: identity, then the cluster's admission, then the handler.
//! app.route_layer(cluster.layer()).route_layer(identity)
//! # }
//! ```

#[cfg(feature = "jwt")]
mod jwt;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use hybrid_cluster_core::UserId;
use tower_layer::Layer;
use tower_service::Service;

#[cfg(feature = "jwt")]
pub use self::jwt::{Jwt, JwtKeyError};

/// Tells who an upgrade request is from.
pub trait Identify: Send + Sync + 'static {
    /// The user `headers` and `uri` (with its query) name: `Ok(None)` for a request that
    /// carries no credentials at all, an error for credentials that do not hold (a client
    /// that sent a bad token hears it, rather than going on as nobody).
    fn identify(&self, headers: &HeaderMap, uri: &Uri) -> Result<Option<UserId>, Unauthorized>;
}

impl<I: Identify + ?Sized> Identify for Arc<I> {
    fn identify(&self, headers: &HeaderMap, uri: &Uri) -> Result<Option<UserId>, Unauthorized> {
        (**self).identify(headers, uri)
    }
}

/// Why a request was refused: the body of its `401`. It never holds the credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Unauthorized {
    message: Cow<'static, str>,
}

impl Unauthorized {
    /// A refusal saying `message` to the client.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// What the client is told.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `401` answer: `WWW-Authenticate: Bearer` and the JSON body
    /// `{"type":"error","code":"unauthorized","message":…}`.
    pub fn into_response<B: From<String>>(self) -> Response<B> {
        let body = crate::protocol::ServerMessage::Error {
            id: None,
            code: "unauthorized",
            message: &self.message,
        }
        .to_json();
        let mut response = Response::new(B::from(body));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        let headers = response.headers_mut();
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// The bearer token of a request: `Authorization: Bearer …`, else the `token` parameter of
/// its query (browsers cannot set headers on a WebSocket), percent-decoded.
pub fn bearer_token<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<Cow<'a, str>> {
    let from_header = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| Cow::Borrowed(token.trim()))
        });
    from_header.or_else(|| {
        url::form_urlencoded::parse(uri.query()?.as_bytes())
            .find(|(name, _)| name == "token")
            .map(|(_, token)| token)
    })
}

/// Identifies requests with an [`Identify`]: see the [module docs](self).
///
/// By default a request without credentials goes on with no user (the cluster serves it as
/// an anonymous connection); [`required`](IdentityLayer::required) refuses it. Credentials
/// that do not hold are refused either way.
#[derive(Clone)]
pub struct IdentityLayer<I> {
    identify: Arc<I>,
    required: bool,
}

impl<I> fmt::Debug for IdentityLayer<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityLayer")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl<I: Identify> IdentityLayer<I> {
    /// A layer identifying requests with `identify`; anonymous requests go on.
    pub fn new(identify: I) -> Self {
        Self {
            identify: Arc::new(identify),
            required: false,
        }
    }

    /// Refuses requests that carry no credentials too.
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// Whether requests without credentials are refused.
    pub fn is_required(&self) -> bool {
        self.required
    }

    /// The user of a request, `None` for an anonymous one this layer lets through.
    pub fn check(&self, headers: &HeaderMap, uri: &Uri) -> Result<Option<UserId>, Unauthorized> {
        match self.identify.identify(headers, uri)? {
            None if self.required => Err(Unauthorized::new(
                "a token is required: send `Authorization: Bearer TOKEN` or `?token=TOKEN`",
            )),
            user => Ok(user),
        }
    }
}

impl<S, I> Layer<S> for IdentityLayer<I> {
    type Service = Identified<S, I>;

    fn layer(&self, inner: S) -> Self::Service {
        Identified {
            inner,
            layer: IdentityLayer {
                identify: Arc::clone(&self.identify),
                required: self.required,
            },
        }
    }
}

/// The service of an [`IdentityLayer`].
#[derive(Clone, Debug)]
pub struct Identified<S, I> {
    inner: S,
    layer: IdentityLayer<I>,
}

impl<S, I, ReqBody, ResBody> Service<Request<ReqBody>> for Identified<S, I>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    I: Identify,
    ResBody: From<String>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        match self.layer.check(request.headers(), request.uri()) {
            Ok(user) => {
                // Only what this layer found counts: never a user the request came with.
                request.extensions_mut().remove::<UserId>();
                if let Some(user) = user {
                    request.extensions_mut().insert(user);
                }
                Either::Left(self.inner.call(request))
            }
            Err(refused) => {
                tracing::debug!(
                    reason = refused.message(),
                    "refused an unidentified request"
                );
                Either::Right(std::future::ready(Ok(refused.into_response())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_header_first_then_the_query() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "/ws?x=1&token=a%2Bb".parse().unwrap();
        assert_eq!(bearer_token(&headers, &uri).as_deref(), Some("a+b"));
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("bearer  h.e.y "),
        );
        assert_eq!(bearer_token(&headers, &uri).as_deref(), Some("h.e.y"));
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwdw=="),
        );
        assert_eq!(bearer_token(&headers, &uri).as_deref(), Some("a+b"));
        let bare: Uri = "/ws".parse().unwrap();
        assert_eq!(bearer_token(&HeaderMap::new(), &bare), None);
    }

    struct Fixed(Result<Option<&'static str>, &'static str>);

    impl Identify for Fixed {
        fn identify(&self, _: &HeaderMap, _: &Uri) -> Result<Option<UserId>, Unauthorized> {
            match self.0 {
                Ok(user) => Ok(user.map(|u| UserId::new(u).unwrap())),
                Err(message) => Err(Unauthorized::new(message)),
            }
        }
    }

    #[tokio::test]
    async fn the_layer_puts_the_user_in_the_extensions_or_answers_401() {
        use tower::ServiceExt;
        let inner = tower::service_fn(|request: Request<()>| async move {
            let user = request.extensions().get::<UserId>().map(|u| u.to_string());
            Ok::<_, std::convert::Infallible>(Response::new(user.unwrap_or_default()))
        });
        let call = |layer: IdentityLayer<Fixed>| {
            let service = layer.layer(inner);
            let mut request = Request::new(());
            // A user the request came with is never taken on trust.
            request
                .extensions_mut()
                .insert(UserId::new("forged").unwrap());
            service.oneshot(request)
        };
        let ok = call(IdentityLayer::new(Fixed(Ok(Some("alice")))))
            .await
            .unwrap();
        assert_eq!((ok.status(), ok.body().as_str()), (StatusCode::OK, "alice"));
        let anonymous = call(IdentityLayer::new(Fixed(Ok(None)))).await.unwrap();
        assert_eq!(
            (anonymous.status(), anonymous.body().as_str()),
            (StatusCode::OK, "")
        );
        let required = call(IdentityLayer::new(Fixed(Ok(None))).required())
            .await
            .unwrap();
        assert_eq!(required.status(), StatusCode::UNAUTHORIZED);
        assert!(required.body().contains("required"), "{}", required.body());
        let bad = call(IdentityLayer::new(Fixed(Err("the token has expired"))))
            .await
            .unwrap();
        assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(bad.headers()[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            bad.body(),
            r#"{"type":"error","code":"unauthorized","message":"the token has expired"}"#
        );
    }
}
