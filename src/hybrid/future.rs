//! The response future of [`HybridCluster`](super::HybridCluster).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project::pin_project;

/// The inner service's response, or the cluster layer's own: a redirect or a refusal, in HTTP
/// or (in-band) the `101` of a socket that only says where to go.
#[pin_project(project = Projection)]
#[derive(Debug)]
pub struct ResponseFuture<F, B> {
    #[pin]
    kind: Kind<F, B>,
}

#[pin_project(project = KindProjection)]
#[derive(Debug)]
enum Kind<F, B> {
    Inner(#[pin] F),
    Ready(Option<Response<B>>),
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner(future),
        }
    }

    pub(crate) fn ready(response: Response<B>) -> Self {
        Self {
            kind: Kind::Ready(Some(response)),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProjection::Inner(future) => future.poll(cx),
            KindProjection::Ready(response) => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}
