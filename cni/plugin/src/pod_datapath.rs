//! The service datapath's pod programs, attached by the CNI itself when the agent has pinned
//! them: on the host veth before the pod's interface comes up, so that no packet the pod sends
//! escapes translation, and without ever waiting for the agent. Without pinned programs (service
//! translation off, or the agent never ran), nothing happens and pods are wired as always.
use std::path::Path;

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions};
use ferrynet_common::{FROM_POD_PROGRAM, TO_POD_PROGRAM};
use ferrynet_kernel::pins::PinLayout;

/// The pod programs and their hooks, as the agent pins them.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (FROM_POD_PROGRAM, TcAttachType::Ingress, "from"),
    (TO_POD_PROGRAM, TcAttachType::Egress, "to"),
];

/// Attaches the pinned pod programs to `veth` (in the calling thread's namespace), pinning the
/// links where the agent finds them. Returns whether there was anything to attach.
pub fn attach(pin_root: &Path, veth: &str) -> Result<bool, String> {
    let pins = PinLayout::new(pin_root);
    if HOOKS.iter().any(|(program, _, _)| !pins.program(program).exists()) {
        return Ok(false);
    }
    for (program, hook, suffix) in HOOKS {
        let mut classifier =
            SchedClassifier::from_pin(pins.program(program)).map_err(|e| format!("pinned program {program}: {e}"))?;
        let link_path = pins.pod_link(veth, suffix);
        // A link of an earlier veth of the same name (a repeated ADD) is defunct: replaced.
        let _ = std::fs::remove_file(&link_path);
        let id = match classifier.attach_with_options(veth, hook, TcAttachOptions::TcxOrder(LinkOrder::first())) {
            Ok(id) => id,
            // The agent, which also attaches to veths it finds without the programs, got there
            // first: its link is pinned, and the veth is covered.
            Err(_) if link_path.exists() => continue,
            Err(e) => return Err(format!("attaching {program} to {veth}: {e}")),
        };
        let link: FdLink = classifier
            .take_link(id)
            .map_err(|e| format!("{program} on {veth}: {e}"))?
            .try_into()
            .map_err(|e| format!("{program} on {veth}: {e}"))?;
        link.pin(&link_path)
            .map_err(|e| format!("pinning {}: {e}", link_path.display()))?;
    }
    Ok(true)
}

/// Forgets `veth`'s links (the veth is gone, so they are defunct). Missing pins are fine.
pub fn forget(pin_root: &Path, veth: &str) {
    let pins = PinLayout::new(pin_root);
    for (_, _, suffix) in HOOKS {
        let _ = std::fs::remove_file(pins.pod_link(veth, suffix));
    }
}
