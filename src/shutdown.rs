//! What clients are told when their node shuts down.

use hybrid_cluster_balance::Redirect;

/// The WebSocket close code sent to clients when their node shuts down: 1012, service restart.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;

/// The longest reason a WebSocket close frame carries, in bytes.
pub const MAX_CLOSE_REASON: usize = 123;

/// The reason of the close frame sent to clients when their node shuts down: JSON naming a
/// node to reconnect to, e.g. `{"reconnect":"ws://10.0.0.6:5002/ws","node":"node-2"}`.
///
/// It always fits the 123 bytes of a close frame and is always valid JSON: when the full form
/// is too long, the URL is left out, then the node; with no node to suggest it is `{}`.
pub fn close_reason(redirect: Option<&Redirect>) -> String {
    let Some(redirect) = redirect else {
        return "{}".to_owned();
    };
    let url = redirect.ws_url();
    let candidates = [
        serde_json::json!({ "reconnect": url, "node": redirect.node.as_str() }),
        serde_json::json!({ "reconnect": url }),
        serde_json::json!({ "node": redirect.node.as_str() }),
    ];
    candidates
        .iter()
        .map(serde_json::Value::to_string)
        .find(|reason| reason.len() <= MAX_CLOSE_REASON)
        .unwrap_or_else(|| "{}".to_owned())
}

#[cfg(test)]
mod tests {
    use hybrid_cluster_core::NodeId;

    use super::*;

    fn redirect(node: &str, address: &str) -> Redirect {
        Redirect {
            node: NodeId::new(node).unwrap(),
            address: address.to_owned(),
            port: 5002,
            endpoint: "/ws".to_owned(),
            public_url: None,
        }
    }

    #[test]
    fn names_the_node_and_its_url() {
        let reason = close_reason(Some(&redirect("node-2", "10.0.0.6")));
        assert_eq!(
            reason,
            r#"{"node":"node-2","reconnect":"ws://10.0.0.6:5002/ws"}"#
        );
        assert_eq!(close_reason(None), "{}");
    }

    #[test]
    fn stays_valid_json_within_123_bytes() {
        for (node, address) in [
            ("n".repeat(64), "a".repeat(40)),
            ("n".repeat(64), "a".repeat(100)),
            ("n".repeat(10), "a".repeat(200)),
            ("x".repeat(64), "\"quoted\\address".repeat(20)),
        ] {
            let reason = close_reason(Some(&redirect(&node, &address)));
            assert!(reason.len() <= MAX_CLOSE_REASON, "{} bytes", reason.len());
            let json: serde_json::Value = serde_json::from_str(&reason).unwrap();
            assert!(json.is_object());
        }
    }
}
