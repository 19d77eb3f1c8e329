//! The key every attachment is known by: the CNI (container ID, ifname) pair, validated with the
//! spec's rules. DEL, GC and the IPAM store need nothing else to find an attachment's state.

/// The CNI spec's rule for container IDs and network names: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
/// Such a name is also safe as a file name (no `/`, never `.` or `..`).
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A container ID or interface name that breaks the spec's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidAttachmentKey(pub String);

/// The (container ID, ifname) pair of one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttachmentKey {
    container_id: String,
    ifname: String,
}

impl AttachmentKey {
    /// Validates with the CNI spec's rules: container IDs are `[A-Za-z0-9][A-Za-z0-9_.-]*`, and
    /// interface names are 1 to 15 bytes without `/`, `:` or whitespace and not `.` or `..`.
    pub fn new(container_id: &str, ifname: &str) -> Result<Self, InvalidAttachmentKey> {
        if !is_valid_name(container_id) {
            return Err(InvalidAttachmentKey(format!(
                "container ID {container_id:?} is not valid"
            )));
        }
        let if_ok = !ifname.is_empty()
            && ifname.len() <= 15
            && ifname != "."
            && ifname != ".."
            && !ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if !if_ok {
            return Err(InvalidAttachmentKey(format!("interface name {ifname:?} is not valid")));
        }
        Ok(Self {
            container_id: container_id.into(),
            ifname: ifname.into(),
        })
    }

    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernels_rules_and_carry_no_control_characters() {
        for ok in ["eth0", "net1", "a", "x-y_z.1", "fifteen-chars-x"] {
            AttachmentKey::new("c1", ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-xx",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "eth0\n",
            "eth\u{1b}[31m",
            "e\u{7f}",
            "\u{0}",
        ] {
            assert!(AttachmentKey::new("c1", bad).is_err(), "{bad:?} was accepted");
        }
    }
}
