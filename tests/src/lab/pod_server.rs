//! The server each lab pod runs, so that tests and the demo can see who answered.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, TcpListener, UdpSocket},
    time::Duration,
};

use anyhow::Result;

/// The server each lab pod runs: every line (or HTTP GET) on TCP, and every datagram on UDP (on
/// each of `ips`), gets `pod=<name> node=<node> ip=<address it came in on> client=<peer>`.
pub fn pod_server(name: &str, node: &str, port: u16, ips: &[IpAddr]) -> Result<()> {
    for ip in ips {
        let socket = UdpSocket::bind((*ip, port))?;
        let (name, node, ip) = (name.to_string(), node.to_string(), *ip);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let answer = format!("pod={name} node={node} ip={ip} client={}", peer.ip().to_canonical());
                let _ = socket.send_to(answer.as_bytes(), peer);
            }
        });
    }
    let listener = TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
    for stream in listener.incoming().flatten() {
        let (name, node) = (name.to_string(), node.to_string());
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let peer = stream
                .peer_addr()
                .map(|a| a.ip().to_canonical().to_string())
                .unwrap_or_default();
            // The pod's own address as the kernel delivered the connection to it: after a
            // translation, this is the backend, not the address the client dialled.
            let ip = stream
                .local_addr()
                .map(|a| a.ip().to_canonical().to_string())
                .unwrap_or_default();
            let Ok(mut writer) = stream.try_clone() else { return };
            let mut reader = BufReader::new(stream);
            let answer = format!("pod={name} node={node} ip={ip} client={peer}");
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.starts_with("GET ") {
                    let mut header = String::new();
                    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                        header.clear();
                    }
                    let _ = write!(
                        writer,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{answer}\n",
                        answer.len() + 1
                    );
                    return;
                }
                if writeln!(writer, "{answer}").is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
    Ok(())
}
