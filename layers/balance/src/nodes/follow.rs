//! How the set notices info changes: by one shared epoch, or by every node's version.

use hybrid_cluster_core::{Epoch, LiveNodeInfo};

#[derive(Debug)]
pub(super) enum Follow {
    /// No node inserted yet: the first one's epoch is adopted.
    Undecided,
    /// Cells with different epochs were inserted: every refresh checks every version.
    EachNode,
    /// Every cell bumps this epoch: a refresh first checks whether it moved.
    Shared { epoch: Epoch, seen: u64 },
}

impl Follow {
    /// Follows one more cell: adopts its epoch when none is known yet, and falls back to
    /// checking every node when the cell bumps another epoch.
    pub(super) fn admit(&mut self, live: &LiveNodeInfo) {
        match self {
            Self::Undecided => {
                *self = Self::Shared {
                    seen: live.epoch().current(),
                    epoch: live.epoch().clone(),
                }
            }
            Self::Shared { epoch, .. } if !epoch.same_as(live.epoch()) => *self = Self::EachNode,
            Self::Shared { .. } | Self::EachNode => {}
        }
    }
}
