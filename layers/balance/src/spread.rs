//! Spreading many clients at once over the nodes with room: where the clients of a draining
//! node are told to reconnect.
//!
//! When a node drains, all its clients reconnect at about the same time. Naming one node for
//! all of them (one pick) is a reconnect storm on that node, and can take it past its limit.
//! [`apportion`] splits the clients in proportion to each node's free places
//! (largest-remainder apportionment) and never gives a node more than its free places;
//! [`Placer::spread`](crate::Placer::spread) applies it to the placer's view and shuffles the
//! result, so that which client goes where is random while the counts follow the proportions.
//!
//! ```
//! use hybrid_cluster_balance::spread::apportion;
//!
//! // 1,000 clients over nodes with 400, 600 and 1,000 free places: 200, 300 and 500.
//! assert_eq!(apportion(1_000, &[400, 600, 1_000]), [200, 300, 500]);
//! // More clients than places: each node is filled, the rest get no node.
//! assert_eq!(apportion(1_000, &[100, 200]), [100, 200]);
//! ```

use std::cmp::Reverse;

/// How many of `clients` each node takes, given each node's `free` places (same order): in
/// proportion to the free places, rounded by largest remainder (ties to the node with more
/// free places, then to the first), and never more than a node's free places.
///
/// The shares add up to `clients`, or to the total of the free places when that is smaller
/// (the clients left over then have no node to go to). Each share is within one of its exact
/// quota `clients × free / total`.
pub fn apportion(clients: u64, free: &[u64]) -> Vec<u64> {
    let total: u128 = free.iter().map(|&places| u128::from(places)).sum();
    if u128::from(clients) >= total {
        return free.to_vec();
    }
    let mut shares = Vec::with_capacity(free.len());
    let mut remainders = Vec::with_capacity(free.len());
    for (node, &places) in free.iter().enumerate() {
        let exact = u128::from(clients) * u128::from(places);
        // Below `places`, as `clients < total`: it fits.
        shares.push(u64::try_from(exact / total).unwrap_or(places));
        remainders.push((Reverse(exact % total), Reverse(places), node));
    }
    // The quotas' fractional parts add up to the clients still to place, each below one: as
    // many nodes as are left to fill have a non-zero remainder, so none goes past its places.
    let placed: u64 = shares.iter().sum();
    let left = usize::try_from(clients - placed).unwrap_or(usize::MAX);
    remainders.sort_unstable();
    for &(_, _, node) in remainders.iter().take(left) {
        shares[node] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn splits_in_proportion_to_free_places() {
        assert_eq!(apportion(1_000, &[400, 600, 1_000]), [200, 300, 500]);
        assert_eq!(apportion(10, &[1, 1, 1]), [1, 1, 1]);
        assert_eq!(apportion(2, &[5, 5, 5]), [1, 1, 0]);
        // 7 × 6/12 = 3.5, 7 × 4/12 = 2.33, 7 × 2/12 = 1.17: the last one to the largest
        // remainder.
        assert_eq!(apportion(7, &[6, 4, 2]), [4, 2, 1]);
        // Equal remainders (0.5 and 1.5): to the node with more free places, then the first.
        assert_eq!(apportion(5, &[1, 3, 6]), [0, 2, 3]);
        assert_eq!(apportion(2, &[3, 3, 6]), [1, 0, 1]);
        assert_eq!(apportion(1, &[2, 2]), [1, 0]);
    }

    #[test]
    fn never_more_than_the_free_places() {
        assert_eq!(apportion(1_000, &[100, 0, 200]), [100, 0, 200]);
        assert_eq!(apportion(5, &[]), Vec::<u64>::new());
        assert_eq!(apportion(0, &[3, 4]), [0, 0]);
        assert_eq!(apportion(3, &[0, 0, 4]), [0, 0, 3]);
    }

    proptest! {
        #[test]
        fn shares_add_up_stay_within_places_and_one_of_the_quota(
            clients in 0u64..5_000,
            free in proptest::collection::vec(0u64..3_000, 0..12),
        ) {
            let shares = apportion(clients, &free);
            let total: u64 = free.iter().sum();
            prop_assert_eq!(shares.len(), free.len());
            prop_assert_eq!(shares.iter().sum::<u64>(), clients.min(total));
            for (share, places) in shares.iter().zip(&free) {
                prop_assert!(share <= places);
                if clients < total {
                    let quota = clients as f64 * *places as f64 / total as f64;
                    prop_assert!((*share as f64 - quota).abs() < 1.0, "{share} for {quota}");
                }
            }
        }
    }
}
