//! A real container runtime: podman with its CNI backend runs containers on a ferrynet network
//! (the README's "Tests" section gives the recipe). Everything podman touches is the test's own: a config file
//! (`CONTAINERS_CONF`), storage and run dirs in a temporary directory, the conflist dir, a network
//! namespace standing for the host, and a cgroup parent that is removed afterwards.
use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use ferrynet_ipam::Store;
use ferrynet_tests::{REFERENCE_PLUGIN_DIR, cni_bin_dir, netns::Netns, require_root, run, unique};
use serde_json::json;

struct Podman {
    host: Netns,
    dir: tempfile::TempDir,
    cgroup_parent: String,
}

const NETWORK: &str = "fnpodman";

impl Podman {
    fn new() -> Self {
        require_root();
        let host = Netns::host("host", "192.168.93.1", "fd93::1");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("net.d")).unwrap();
        // podman's default limits need CAP_SYS_RESOURCE, which this VM lacks: use the hard limit.
        let nofile = run(Command::new("sh").args(["-c", "ulimit -Hn"])).trim().to_string();
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc=32768:32768\"]\n\
             [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\ncni_plugin_dirs = [\"{}\", \"{REFERENCE_PLUGIN_DIR}\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
            d.join("net.d").display(),
            cni_bin_dir().display()
        );
        std::fs::write(d.join("containers.conf"), conf).unwrap();
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                {"type": "ferrynet", "mtu": 1400,
                 "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.60.0.0/24"}]], "dataDir": d.join("ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(
            d.join("net.d").join(format!("{NETWORK}.conflist")),
            conflist.to_string(),
        )
        .unwrap();
        let podman = Self {
            host,
            dir,
            cgroup_parent: format!("/{}", unique("podman")),
        };
        podman.import_busybox();
        podman
    }

    /// Runs podman with this test's config, storage and network namespace.
    fn podman(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        let host_fd = self.host.fd().as_raw_fd();
        // SAFETY: only the async-signal-safe setns runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(host_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.output().expect("run podman")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// No registry is reachable: the image is a busybox rootfs built here and imported.
    fn import_busybox(&self) {
        let rootfs = self.dir.path().join("rootfs");
        for sub in ["bin", "tmp", "www", "proc", "sys", "dev", "etc"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static is installed");
        let applets = run(Command::new(rootfs.join("bin/busybox")).arg("--list"));
        for applet in applets.lines().filter(|a| *a != "busybox") {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let tar = self.dir.path().join("rootfs.tar");
        run(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."));
        self.ok(&[
            "import",
            "--change",
            "CMD [\"/bin/sh\"]",
            tar.to_str().unwrap(),
            "localhost/busybox:latest",
        ]);
    }

    /// Starts a container serving `name` over HTTP on port 8080.
    fn start_web(&self, name: &str) -> (String, String) {
        let script = format!("echo hello from {name} > /www/index.html && exec httpd -f -p 8080 -h /www");
        let id = self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NETWORK,
            "--cgroup-parent",
            &self.cgroup_parent,
            "localhost/busybox:latest",
            "sh",
            "-c",
            &script,
        ]);
        let ip = self.ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{NETWORK}.IPAddress}}}}"),
            name,
        ]);
        (id, ip)
    }

    fn store(&self) -> Store {
        Store::open(&self.dir.path().join("ipam"), NETWORK).unwrap()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-af", "-t", "0"]);
        // The cgroup parent podman created for this test, in every hierarchy, deepest first.
        // conmon may take a moment to leave it, so this retries for a bounded time.
        let parent = self.cgroup_parent.trim_start_matches('/');
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|h| h.path().join(parent))
            .collect();
        // A cgroup-v2-only host has the hierarchy at the root itself.
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            dirs.push(Path::new("/sys/fs/cgroup").join(parent));
        }
        ferrynet_tests::wait_for(std::time::Duration::from_secs(10), || {
            dirs.iter().for_each(|d| remove_cgroup_tree(d));
            dirs.iter().all(|d| !d.exists()).then_some(())
        });
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        let subdirs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        for sub in subdirs {
            remove_cgroup_tree(&sub);
        }
        let _ = std::fs::remove_dir(dir);
    }
}

#[test]
fn podman_containers_get_ferrynet_addresses_and_talk_over_tcp() {
    let podman = Podman::new();
    let (id_a, ip_a) = podman.start_web("a");
    let (id_b, ip_b) = podman.start_web("b");
    assert!(
        ip_a.starts_with("10.60.0.") && ip_b.starts_with("10.60.0.") && ip_a != ip_b,
        "{ip_a} {ip_b}"
    );

    // The addresses come from ferrynet's store, keyed by podman's container IDs.
    let records = podman.store().lock().unwrap().attachments().unwrap();
    let held: Vec<(String, String)> = records
        .iter()
        .map(|r| (r.container_id.clone(), r.ips[0].addr().to_string()))
        .collect();
    assert!(held.contains(&(id_a.clone(), ip_a.clone())), "{held:?}");
    assert!(held.contains(&(id_b.clone(), ip_b.clone())), "{held:?}");

    // Inside the containers: a /32 on eth0 and the link-local default route.
    let inside = podman.ok(&["exec", "a", "ip", "-4", "route"]);
    assert!(inside.contains("default via 169.254.1.1 dev eth0"), "{inside}");

    // The containers reach each other over TCP (HTTP with nc: static busybox's wget crashes in
    // glibc's resolver in a bare rootfs), both ways. The servers may still be starting.
    for (from, to, ip) in [("a", "b", &ip_b), ("b", "a", &ip_a)] {
        let get = format!("printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 {ip} 8080 | tail -n 1");
        let mut last = String::new();
        let got = ferrynet_tests::wait_for(std::time::Duration::from_secs(10), || {
            let out = podman.podman(&["exec", from, "sh", "-c", &get]);
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && !body.is_empty()).then_some(body)
        });
        assert_eq!(
            got.as_deref(),
            Some(format!("hello from {to}").as_str()),
            "{from} -> {to}: {last}"
        );
    }

    // Removing the containers frees their addresses and their veths.
    podman.ok(&["rm", "-f", "-t", "0", "a", "b"]);
    assert!(podman.store().lock().unwrap().attachments().unwrap().is_empty());
    assert!(
        podman.host.links().iter().all(|l| !l.starts_with("fnv")),
        "{:?}",
        podman.host.links()
    );
}
