//! The response future of [`Forward`](super::Forward).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{PublishError, Target};
use pin_project::pin_project;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::ForwardError;

/// Resolves once the broker confirmed the message, or with why it was not taken.
///
/// It holds one in-flight permit of its service until it resolves or is dropped.
#[pin_project]
pub struct ResponseFuture {
    #[pin]
    state: State,
}

#[pin_project(project = StateProj)]
enum State {
    Failed(Option<ForwardError>),
    Publishing {
        #[pin]
        publish: BoxFuture<'static, Result<(), PublishError>>,
        target: Option<Target>,
        permit: Option<OwnedSemaphorePermit>,
    },
}

impl ResponseFuture {
    pub(crate) fn failed(error: ForwardError) -> Self {
        Self {
            state: State::Failed(Some(error)),
        }
    }

    pub(crate) fn publishing(
        publish: BoxFuture<'static, Result<(), PublishError>>,
        target: Target,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            state: State::Publishing {
                publish,
                target: Some(target),
                permit: Some(permit),
            },
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Failed(_) => "failed",
            State::Publishing { .. } => "publishing",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl Future for ResponseFuture {
    type Output = Result<(), ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Failed(error) => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Ready(Err(ForwardError::NotReady)),
            },
            StateProj::Publishing {
                publish,
                target,
                permit,
            } => {
                let result = ready!(publish.poll(cx));
                // The message is settled: give its slot back at once.
                drop(permit.take());
                Poll::Ready(match (result, target.take()) {
                    (Ok(()), _) => Ok(()),
                    (Err(e), Some(target)) => Err(ForwardError::from_publish(e, target)),
                    (Err(e), None) => Err(ForwardError::from_publish(e, Target::Broadcast)),
                })
            }
        }
    }
}
