//! Clients the lab runs *inside* a pod or node (as processes in its network namespace and
//! cgroup, so that socket-level load balancing sees them as it sees a pod's own processes):
//! single requests over TCP or UDP, connected UDP and TCP clients that keep their sockets, and a
//! steady load that counts every failure.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// One request: a line over a new TCP connection, or one datagram; returns the answer.
pub fn request(to: SocketAddr, udp: bool, timeout: Duration) -> Result<String> {
    if udp {
        let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let socket = UdpSocket::bind(any)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(b"hello\n", to)?;
        let mut buf = [0u8; 2048];
        let (n, from) = socket.recv_from(&mut buf)?;
        // `from` is what recvmsg says the answer came from: the Service address, not the
        // backend's, when the datapath translates.
        return Ok(format!("{} peer={from}", String::from_utf8_lossy(&buf[..n]).trim_end()));
    }
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"hello\n")?;
    let mut answer = String::new();
    BufReader::new(&mut stream).read_line(&mut answer)?;
    if answer.is_empty() {
        bail!("the connection closed without an answer");
    }
    // What getpeername says the connection goes to.
    Ok(format!("{} peer={}", answer.trim_end(), stream.peer_addr()?))
}

/// Where tests take fixed source ports from: below the kernel's ephemeral range (32768-60999 by
/// default) and the NodePort range (30000-32767). A connection given an ephemeral port keeps it
/// in TIME_WAIT for a minute without SO_REUSEADDR, and then a bind to that port fails with
/// EADDRINUSE even with SO_REUSEADDR: a fixed port inside the range collides with whichever
/// earlier connection the kernel happened to give it.
pub const FIXED_SOURCE_PORTS: std::ops::Range<u16> = 20_000..30_000;

/// A TCP connection to `to` from local port `port` (bound with SO_REUSEADDR, so that a port
/// whose last connection is in TIME_WAIT can be taken again); connecting gives up after
/// `timeout`, and reads time out after it too.
pub fn connect_from_port(to: SocketAddr, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt};
    let (family, any) = if to.is_ipv4() {
        (AddressFamily::Inet, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    } else {
        (AddressFamily::Inet6, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    // A blocking connect gives up after the send timeout.
    let limit = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    socket::setsockopt(&fd, sockopt::SendTimeout, &limit)?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &limit)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(any, port)))?;
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// Makes closing `stream` send a reset (SO_LINGER 0): neither side keeps the connection in
/// TIME_WAIT, so its tuple may be used again at once.
pub fn reset_on_close(stream: &TcpStream) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    Ok(())
}

/// One TCP request from each source port of `ports` in turn, each connection ended with a reset
/// (SO_LINGER 0), so that the next round may reuse the same tuple at once: the same flows, asked
/// again, show which backend each lands on. One line per port: `<port> <answer>`, or
/// `<port> error <error>`.
pub fn flows(to: SocketAddr, ports: std::ops::RangeInclusive<u16>, timeout: Duration) -> Vec<String> {
    let one = |port: u16| -> Result<String> {
        let mut stream =
            connect_from_port(to, port, timeout).with_context(|| format!("connecting from port {port}"))?;
        stream.write_all(b"hello\n")?;
        let mut answer = String::new();
        BufReader::new(&mut stream).read_line(&mut answer)?;
        reset_on_close(&stream)?;
        if answer.is_empty() {
            bail!("the connection closed without an answer");
        }
        Ok(answer.trim_end().to_string())
    };
    ports
        .map(|port| match one(port) {
            Ok(answer) => format!("{port} {answer}"),
            Err(e) => format!("{port} error {e:#}"),
        })
        .collect()
}

/// What [`connected_udp`] saw: each line is `<unix ms> ok <answer>` or `<unix ms> error <error>`.
pub fn connected_udp(to: SocketAddr, duration: Duration, interval: Duration, out: &Path) -> Result<()> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let mut socket = UdpSocket::bind(any)?;
    socket.connect(to)?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut log = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    while started.elapsed() < duration {
        let result = socket.send(b"hello\n").and_then(|_| socket.recv(&mut buf));
        let at = unix_ms();
        match result {
            Ok(n) => writeln!(log, "{at} ok {}", String::from_utf8_lossy(&buf[..n]).trim_end())?,
            Err(e) => {
                writeln!(log, "{at} error {e}")?;
                // A socket the datapath aborted must be made anew, as DNS clients do: connecting
                // again picks a live backend.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::ECONNREFUSED | libc::EDESTADDRREQ)
                ) {
                    socket = UdpSocket::bind(any)?;
                    socket.connect(to)?;
                    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
                }
            }
        }
        log.flush()?;
        std::thread::sleep(interval);
    }
    Ok(())
}

/// A TCP connection held open, asking once every interval; each line of `out` is what
/// [`connected_udp`] writes. The first answer of each connection, and the first after the file
/// `ask_peer` (if given) appears (which it then removes), is followed by `peer=<getpeername>`: asked at
/// every request, `getpeername` would keep the socket's datapath entry in use, which a real
/// long-lived connection does not. After an error (a socket the datapath aborted, say) it
/// connects again, as a client with a connection pool would.
pub fn connected_tcp(
    to: SocketAddr,
    duration: Duration,
    interval: Duration,
    out: &Path,
    ask_peer: Option<&Path>,
) -> Result<()> {
    let connect = || -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok((stream, reader))
    };
    let mut log = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let mut connection = None;
    while started.elapsed() < duration {
        let fresh = connection.is_none();
        let result = match &mut connection {
            Some(_) => Ok(()),
            None => connect().map(|c| connection = Some(c)),
        }
        .and_then(|()| {
            let (stream, reader) = connection.as_mut().expect("connected above");
            stream.write_all(b"hello\n")?;
            let mut answer = String::new();
            if reader.read_line(&mut answer)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection was closed",
                ));
            }
            // What `getpeername` says: the Service address, when the datapath translates.
            if fresh || ask_peer.is_some_and(|file| std::fs::remove_file(file).is_ok()) {
                return Ok(format!("{} peer={}", answer.trim_end(), stream.peer_addr()?));
            }
            Ok(answer.trim_end().to_string())
        });
        let at = unix_ms();
        match result {
            Ok(answer) => writeln!(log, "{at} ok {answer}")?,
            Err(e) => {
                writeln!(log, "{at} error {e}")?;
                connection = None;
            }
        }
        log.flush()?;
        std::thread::sleep(interval);
    }
    Ok(())
}

/// Milliseconds since the epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A steady load: a new TCP connection per request, back to back, until `stop` exists (or
/// `max` passes). Writes `<ok> <failed>` and then every failure, one per line, to `out`.
pub fn load(to: SocketAddr, stop: &Path, max: Duration, out: &Path) -> Result<()> {
    let started = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut failures = Vec::new();
    while !stop.exists() && started.elapsed() < max {
        match request(to, false, Duration::from_secs(2)) {
            Ok(answer) if answer.starts_with("pod=") => ok += 1,
            Ok(other) => {
                failed += 1;
                failures.push(format!(
                    "{:.3} unexpected answer {other:?}",
                    started.elapsed().as_secs_f64()
                ));
            }
            Err(e) => {
                failed += 1;
                failures.push(format!("{:.3} {e:#}", started.elapsed().as_secs_f64()));
            }
        }
        // Progress for whoever waits on it.
        if (ok + failed) % 20 == 0 {
            std::fs::write(out, format!("{ok} {failed}\n{}", failures.join("\n")))?;
        }
    }
    std::fs::write(out, format!("{ok} {failed}\n{}", failures.join("\n")))?;
    Ok(())
}
