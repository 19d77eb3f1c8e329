//! The lab's cluster DNS: Debian's dnsmasq, run by the lab's kubelet as the pod
//! `kube-system/kube-dns` (image `ferrynet-lab/dnsmasq`), behind the Service `kube-system/kube-dns`
//! at 10.96.0.10 and fd00:96::a, which is what pods' `resolv.conf` names, so every lookup crosses
//! the service translation like any other Service traffic.
//!
//! The controllers daemon writes one record per Service ClusterIP
//! (`<service>.<namespace>.svc.cluster.local`) into a hosts file in a directory dnsmasq watches
//! (`--hostsdir`), so a new or deleted Service is answered for at once, without restarting it
//! (dnsmasq 2.88 and later drop the records of a changed file; Debian bookworm has 2.90).
//! dnsmasq answers `cluster.local` alone (`--local`): an unknown name is NXDOMAIN, never forwarded.
//! Not served (yet): headless Services' pod records, ExternalName CNAMEs, SRV records.
use std::{collections::BTreeSet, net::IpAddr, path::Path};

use anyhow::Result;
use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Pod, PodSpec, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{ResourceExt, api::ObjectMeta};

use super::{
    Lab,
    kubelet::{CLUSTER_DOMAIN, DNS_V4, DNS_V6},
};

pub const DNS_NAMESPACE: &str = "kube-system";
pub const DNS_NAME: &str = "kube-dns";
const HOSTS_FILE: &str = "services";

/// The hosts-file lines for the Services' ClusterIPs (pure), sorted so that an unchanged set of
/// Services writes an unchanged file.
pub fn service_records(services: &[Service]) -> String {
    let mut lines = BTreeSet::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let name = format!(
            "{}.{}.svc.{CLUSTER_DOMAIN}",
            service.name_any(),
            service.namespace().unwrap_or_else(|| "default".into())
        );
        let ips = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse::<IpAddr>().ok());
        for ip in ips {
            lines.insert(format!("{ip} {name}"));
        }
    }
    lines.into_iter().map(|l| l + "\n").collect()
}

/// dnsmasq's command line: in the foreground, answering `cluster.local` from the records in
/// `hosts_dir` only.
pub fn dnsmasq_argv(hosts_dir: &Path) -> Vec<String> {
    vec![
        "/usr/sbin/dnsmasq".into(),
        "--keep-in-foreground".into(),
        "--log-facility=-".into(),
        // No pid file: the lab's kubelet keeps the pid (an empty value turns the file off).
        "--pid-file=".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        format!("--hostsdir={}", hosts_dir.display()),
        format!("--local=/{CLUSTER_DOMAIN}/"),
        "--domain-needed".into(),
        // The records live in the lab's state directory, which only root can read (no lab state
        // is readable by others): dnsmasq keeps root, inside the pod's namespaces, to reread them.
        "--user=root".into(),
    ]
}

/// The Service the pods' resolver points at.
pub fn dns_service() -> Service {
    let port = |name: &str, protocol: &str| ServicePort {
        name: Some(name.into()),
        port: 53,
        protocol: Some(protocol.into()),
        target_port: Some(IntOrString::Int(53)),
        ..Default::default()
    };
    Service {
        metadata: ObjectMeta {
            name: Some(DNS_NAME.into()),
            namespace: Some(DNS_NAMESPACE.into()),
            labels: Some([("k8s-app".to_string(), DNS_NAME.to_string())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(DNS_V4.into()),
            cluster_ips: Some(vec![DNS_V4.into(), DNS_V6.into()]),
            ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
            ip_family_policy: Some("RequireDualStack".into()),
            selector: Some([("k8s-app".to_string(), DNS_NAME.to_string())].into()),
            ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The DNS server's pod, for the scheduler and kubelet to run.
pub fn dns_pod() -> Pod {
    let port = |name: &str, protocol: &str| ContainerPort {
        name: Some(name.into()),
        container_port: 53,
        protocol: Some(protocol.into()),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(DNS_NAME.into()),
            namespace: Some(DNS_NAMESPACE.into()),
            labels: Some([("k8s-app".to_string(), DNS_NAME.to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "dnsmasq".into(),
                image: Some("ferrynet-lab/dnsmasq".into()),
                ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
                ..Default::default()
            }],
            restart_policy: Some("Always".into()),
            ..Default::default()
        }),
        status: None,
    }
}

impl Lab {
    /// The directory dnsmasq reads its records from.
    pub fn dns_hosts_dir(&self) -> std::path::PathBuf {
        self.dir.join("dns")
    }

    /// Writes the Services' records where dnsmasq watches, if they changed. The file is written
    /// next to the directory and renamed into it, so dnsmasq never reads half a file.
    pub fn write_dns_records(&self, services: &[Service]) -> Result<()> {
        let dir = self.dns_hosts_dir();
        std::fs::create_dir_all(&dir)?;
        let records = service_records(services);
        let path = dir.join(HOSTS_FILE);
        if std::fs::read_to_string(&path).is_ok_and(|current| current == records) {
            return Ok(());
        }
        let tmp = self.dir.join("dns-records.tmp");
        std::fs::write(&tmp, records)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, namespace: &str, ips: &[&str]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().map(|s| s.to_string()),
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_cluster_ip_gets_a_record_under_its_namespace_and_headless_services_none() {
        let records = service_records(&[
            service("demo", "default", &["10.96.0.20", "fd00:96::20"]),
            service("kube-dns", "kube-system", &["10.96.0.10"]),
            service("headless", "default", &["None"]),
        ]);
        assert_eq!(
            records,
            "10.96.0.10 kube-dns.kube-system.svc.cluster.local\n\
             10.96.0.20 demo.default.svc.cluster.local\n\
             fd00:96::20 demo.default.svc.cluster.local\n"
        );
    }

    #[test]
    fn the_dns_service_is_the_address_pods_resolve_through() {
        let svc = dns_service();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ips.unwrap(), [DNS_V4, DNS_V6]);
        assert!(super::super::kubelet::resolv_conf("default").starts_with(&format!("nameserver {DNS_V4}\n")));
        let argv = dnsmasq_argv(Path::new("/x"));
        assert!(argv.contains(&"--hostsdir=/x".to_string()) && argv.contains(&"--local=/cluster.local/".to_string()));
    }
}
