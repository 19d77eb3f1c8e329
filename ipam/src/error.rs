use std::{io, net::IpAddr, path::PathBuf, time::Duration};

/// Everything the IPAM library can fail with. The CNI layer maps each kind to a spec error code.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid IPAM configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid attachment key: {0}")]
    InvalidKey(String),
    #[error("no free address left in range set {0}")]
    Exhausted(String),
    #[error("requested address {0} is not inside any configured range")]
    RequestedOutOfRange(IpAddr),
    #[error("requested address {addr} is already allocated to {owner}")]
    RequestedInUse { addr: IpAddr, owner: String },
    #[error("timed out after {0:?} waiting for the IPAM store lock")]
    LockTimeout(Duration),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt store file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The store's directories or files are not what the store made: a symlink, or writable or
    /// owned by someone else. Using them would let that someone redirect the store's writes.
    #[error("refusing the IPAM store: {path} {reason}")]
    UnsafeStore { path: PathBuf, reason: String },
}

impl From<ferrynet_cni_protocol::InvalidAttachmentKey> for IpamError {
    fn from(e: ferrynet_cni_protocol::InvalidAttachmentKey) -> Self {
        Self::InvalidKey(e.0)
    }
}

impl IpamError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;
