//! Who is on the other end of a connection. Listen identifies it, admission
//! and the registry key instances by it, and an instance records it.

/// A build client: a pod (on its CSI socket), a peer's credentials and
/// cgroup (on the node socket), or one connection (connection scope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// What instances are keyed by: same key, same instance.
    pub key: String,
    /// For logs: uid, pid and cgroup of the peer.
    pub display: String,
    /// The pod, when the client is one known from a CSI volume context: the
    /// object Kubernetes Events about its instance are posted on.
    pub pod: Option<PodRef>,
}

/// A pod as the API names it (from the CSI volume context, podInfoOnMount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Client {
    pub fn new(key: impl Into<String>, display: impl Into<String>) -> Client {
        Client { key: key.into(), display: display.into(), pod: None }
    }

    /// The client that is one connection (connection scope, or a node-socket
    /// peer the agent cannot tell apart from others): never shared, and its
    /// instance ends when that connection closes.
    pub fn of_connection(seq: u64, display: impl Into<String>) -> Client {
        Client::new(format!("conn={seq}"), display)
    }

    pub fn is_one_connection(&self) -> bool {
        self.key.starts_with("conn=")
    }
}
