//! What the lab's kubelet runs for a container image: a real program installed on this machine,
//! never a pretend server. An image the lab has no program for is refused, as a registry refuses
//! an image it does not have (`ErrImagePull`).
//!
//! | image                    | runs                                                            |
//! |--------------------------|-----------------------------------------------------------------|
//! | `nginx`                  | Debian's nginx, serving its welcome page on port 80             |
//! | `busybox`                | busybox with the container's command (default `sh`, as the image) |
//! | `curlimages/curl`        | `curl` (this machine's) or a busybox applet; default `curl`     |
//! | `ferrynet-lab/dnsmasq`   | the lab's DNS server: Debian's dnsmasq, answering for Services  |
//! | `ferrynet-lab/pod-server`| the lab's own test server (pod name and address on every request) |
//!
//! Registries, tags and digests are ignored (`docker.io/library/nginx:1.27` is `nginx`): the
//! programs are whatever version the machine has.
use std::path::Path;

/// The images the lab runs, for error messages.
pub const KNOWN_IMAGES: &str = "nginx, busybox, curlimages/curl, ferrynet-lab/dnsmasq, ferrynet-lab/pod-server";

/// A container's program, resolved from its image, command and args.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// Debian's nginx with the pod's own configuration (see [`nginx_config`]).
    Nginx,
    /// A command line to run as it is.
    Command(Vec<String>),
    /// The lab's DNS server.
    Dnsmasq,
    /// The lab's test server.
    PodServer,
}

/// An image name without registry, tag or digest.
pub fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    // A tag follows the last `:` after the last `/` (a registry may have a port).
    let image = match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    };
    let image = image
        .strip_prefix("docker.io/")
        .or_else(|| image.strip_prefix("index.docker.io/"))
        .unwrap_or(image);
    image.strip_prefix("library/").unwrap_or(image)
}

/// The program for a container, or why there is none (the message of its `ErrImagePull`).
pub fn program_for(image: &str, command: &[String], args: &[String]) -> Result<Program, String> {
    // Kubernetes: `command` replaces the image's entrypoint, `args` its default arguments.
    let argv = |entrypoint: &[&str], default: &[&str]| -> Vec<String> {
        let mut argv: Vec<String> = if command.is_empty() {
            entrypoint.iter().map(|s| s.to_string()).collect()
        } else {
            command.to_vec()
        };
        if args.is_empty() && command.is_empty() {
            argv.extend(default.iter().map(|s| s.to_string()));
        } else {
            argv.extend(args.iter().cloned());
        }
        argv
    };
    match repository(image) {
        "nginx" if command.is_empty() && args.is_empty() => Ok(Program::Nginx),
        "nginx" => Err(format!(
            "image {image:?}: the lab runs nginx with its own configuration only, not with a command ({:?})",
            argv(&[], &[])
        )),
        "busybox" => Ok(Program::Command(busybox(argv(&[], &["sh"])))),
        "curlimages/curl" => {
            let argv = argv(&[], &["curl"]);
            Ok(Program::Command(if argv.first().is_some_and(|a| a == "curl") {
                let mut with_path = vec!["/usr/bin/curl".to_string()];
                with_path.extend(argv.into_iter().skip(1));
                with_path
            } else {
                busybox(argv)
            }))
        }
        "ferrynet-lab/dnsmasq" => Ok(Program::Dnsmasq),
        "ferrynet-lab/pod-server" => Ok(Program::PodServer),
        other => Err(format!(
            "Failed to pull image {image:?}: repository {other:?} not found: the lab runs only {KNOWN_IMAGES}"
        )),
    }
}

/// The program of a pod's (first) container.
pub fn program_for_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Result<Program, String> {
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .ok_or_else(|| "the pod has no container".to_string())?;
    program_for(
        container.image.as_deref().unwrap_or_default(),
        container.command.as_deref().unwrap_or_default(),
        container.args.as_deref().unwrap_or_default(),
    )
}

/// A busybox command line: the applet runs through the machine's busybox.
fn busybox(argv: Vec<String>) -> Vec<String> {
    let mut with_busybox = vec!["/bin/busybox".to_string()];
    with_busybox.extend(argv);
    with_busybox
}

/// The configuration of one pod's nginx: the image's behaviour (the welcome page on port 80, both
/// families) with its runtime files in the pod's own directory.
pub fn nginx_config(pod_dir: &Path) -> String {
    let dir = pod_dir.display();
    format!(
        "daemon off;\n\
         worker_processes 1;\n\
         pid {dir}/nginx.pid;\n\
         error_log stderr notice;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   include /etc/nginx/mime.types;\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {dir}/client-body;\n\
         \x20   proxy_temp_path {dir}/proxy;\n\
         \x20   fastcgi_temp_path {dir}/fastcgi;\n\
         \x20   uwsgi_temp_path {dir}/uwsgi;\n\
         \x20   scgi_temp_path {dir}/scgi;\n\
         \x20   server {{\n\
         \x20       listen 80;\n\
         \x20       listen [::]:80;\n\
         \x20       root /var/www/html;\n\
         \x20       index index.html index.nginx-debian.html;\n\
         \x20   }}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn registries_tags_and_digests_name_the_same_image() {
        for image in [
            "nginx",
            "nginx:1.27",
            "docker.io/library/nginx:latest",
            "index.docker.io/nginx",
            "nginx@sha256:abc",
        ] {
            assert_eq!(repository(image), "nginx", "{image}");
        }
        assert_eq!(repository("localhost:5000/busybox"), "localhost:5000/busybox");
        assert_eq!(repository("curlimages/curl:8.10.1"), "curlimages/curl");
    }

    #[test]
    fn images_map_to_real_programs_with_kubernetes_command_semantics() {
        assert_eq!(program_for("nginx", &[], &[]), Ok(Program::Nginx));
        assert_eq!(
            program_for("busybox", &[], &[]),
            Ok(Program::Command(strings(&["/bin/busybox", "sh"])))
        );
        // `kubectl run x --image=busybox -- sleep 3600` sets args.
        assert_eq!(
            program_for("busybox:1.36", &[], &strings(&["sleep", "3600"])),
            Ok(Program::Command(strings(&["/bin/busybox", "sleep", "3600"])))
        );
        // `--command -- sh -c ...` sets command.
        assert_eq!(
            program_for("busybox", &strings(&["sh", "-c"]), &strings(&["true"])),
            Ok(Program::Command(strings(&["/bin/busybox", "sh", "-c", "true"])))
        );
        assert_eq!(
            program_for("curlimages/curl", &[], &strings(&["curl", "-s", "http://demo"])),
            Ok(Program::Command(strings(&["/usr/bin/curl", "-s", "http://demo"])))
        );
        assert_eq!(
            program_for("curlimages/curl", &[], &strings(&["sleep", "60"])),
            Ok(Program::Command(strings(&["/bin/busybox", "sleep", "60"])))
        );
    }

    #[test]
    fn an_unknown_image_is_refused_with_a_clear_reason_never_substituted() {
        let why = program_for("redis:7", &[], &[]).unwrap_err();
        assert!(why.contains("\"redis\" not found") && why.contains("nginx"), "{why}");
        assert!(program_for("nginx", &strings(&["nginx", "-g", "x"]), &[]).is_err());
    }
}
