//! The server each lab pod runs, so that tests and the demo can see who answered.
use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    time::Duration,
};

use anyhow::Result;

/// The server each lab pod runs: every line (or HTTP GET) gets
/// `pod=<name> node=<node> ip=<address the connection came in on> client=<peer>`.
pub fn pod_server(name: &str, node: &str, port: u16) -> Result<()> {
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
