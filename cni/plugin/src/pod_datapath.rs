//! The service datapath's pod programs, attached by the CNI itself when the agent has pinned
//! them: on the host veth before the pod's interface comes up, so that no packet the pod sends
//! escapes translation, and without ever waiting for the agent. Without pinned programs (service
//! translation off, or the agent never ran), nothing happens and pods are wired as always.
use std::{path::Path, time::Duration};

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions};
use ferrynet_common::{FROM_POD_PROGRAM, TO_POD_PROGRAM};
use ferrynet_kernel::pins::PinLayout;

/// The pod programs and their hooks, as the agent pins them.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (FROM_POD_PROGRAM, TcAttachType::Ingress, "from"),
    (TO_POD_PROGRAM, TcAttachType::Egress, "to"),
];

/// How long an ADD waits for the agent to finish a veth of its own before going on without the
/// lock (an agent stuck holding it must not hold pods up).
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Attaches the pinned pod programs to `veth` (in the calling thread's namespace), pinning the
/// links where the agent finds them. Returns whether there was anything to attach.
///
/// `from_pod` is pinned whenever the agent translates Services; `to_pod` only while the
/// per-packet path does (under socket LB alone it would have nothing to do): a hook whose
/// program is not pinned is left bare.
pub fn attach(pin_root: &Path, veth: &str) -> Result<bool, String> {
    let pins = PinLayout::new(pin_root);
    if !pins.program(FROM_POD_PROGRAM).exists() {
        return Ok(false);
    }
    // The agent attaches too, to veths it finds without links. Without the lock (the agent
    // held it past the wait), the hooks alone say what the agent did.
    let _lock = pins.lock_pod_links(LOCK_WAIT).ok();
    for (program, hook, suffix) in HOOKS {
        let link_path = pins.pod_link(veth, suffix);
        let mut classifier = match SchedClassifier::from_pin(pins.program(program)) {
            Ok(classifier) => classifier,
            // Out of force: a link of an earlier veth of the same name is defunct, and goes.
            Err(_) if program != FROM_POD_PROGRAM && !pins.program(program).exists() => {
                let _ = std::fs::remove_file(&link_path);
                continue;
            }
            Err(e) => return Err(format!("pinned program {program}: {e}")),
        };
        let program_id = classifier
            .info()
            .map_err(|e| format!("pinned program {program}: {e}"))?
            .id();
        // The agent's scan found the veth first (and pinned its link, under the lock).
        if hook_runs(veth, hook, program_id)? {
            continue;
        }
        // A link of an earlier veth of the same name (a repeated ADD) is defunct: replaced.
        let _ = std::fs::remove_file(&link_path);
        let id = match classifier.attach_with_options(veth, hook, TcAttachOptions::TcxOrder(LinkOrder::first())) {
            Ok(id) => id,
            // Only without the lock: the agent attached since the look above, and pins its link.
            Err(_) if hook_runs(veth, hook, program_id)? => continue,
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

/// Whether `hook` of `veth` runs the program `program_id`.
fn hook_runs(veth: &str, hook: TcAttachType, program_id: u32) -> Result<bool, String> {
    let (_, programs) = SchedClassifier::query_tcx(veth, hook).map_err(|e| format!("the programs on {veth}: {e}"))?;
    Ok(programs.iter().any(|p| p.id() == program_id))
}

/// Forgets `veth`'s links (the veth is gone, so they are defunct). Missing pins are fine.
pub fn forget(pin_root: &Path, veth: &str) {
    let pins = PinLayout::new(pin_root);
    for (_, _, suffix) in HOOKS {
        let _ = std::fs::remove_file(pins.pod_link(veth, suffix));
    }
}
