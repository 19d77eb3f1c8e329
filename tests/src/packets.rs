//! Hand-made packets for tests that must send what no well-behaved socket sends: a pod spoofing
//! another's address, a stranger injecting VXLAN into the pod network.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sendto, socket};

use crate::netns::Netns;

/// The Internet checksum (RFC 1071) of `data`, starting from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_header(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut udp = Vec::with_capacity(len as usize);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    udp
}

/// An IPv4 packet of protocol `proto` around `l4` (a UDP or TCP header and payload), with
/// correct checksums: the L4 one at `csum_at` within `l4`.
fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, mut l4: Vec<u8>, csum_at: usize) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let sum = checksum(&pseudo, 0);
    // 0 means "no checksum" to UDP; one's complement has two zeros.
    l4[csum_at..csum_at + 2].copy_from_slice(&(if sum == 0 { 0xffff } else { sum }).to_be_bytes());
    let total = (20 + l4.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&l4);
    ip
}

/// An IPv6 packet of protocol `proto` around `l4`, with a correct L4 checksum at `csum_at`.
fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, mut l4: Vec<u8>, csum_at: usize) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(&l4);
    let sum = checksum(&pseudo, 0);
    l4[csum_at..csum_at + 2].copy_from_slice(&(if sum == 0 { 0xffff } else { sum }).to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[proto, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&l4);
    ip
}

/// An IPv4 UDP packet (header included), with correct checksums.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_packet(src, dst, 17, udp_header(sport, dport, payload), 6)
}

/// An IPv6 UDP packet (header included), with a correct UDP checksum.
pub fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv6_packet(src, dst, 17, udp_header(sport, dport, payload), 6)
}

/// A UDP packet of either family.
pub fn ip_udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_udp(s, d, sport, dport, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_udp(s, d, sport, dport, payload),
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// A TCP SYN (a connection's first segment, as a flood sends it) of either family.
pub fn ip_tcp_syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&u32::from(sport).wrapping_mul(2_654_435_761).to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    // Header length 5 words; SYN; a common window; checksum and urgent pointer 0.
    tcp.extend_from_slice(&[5 << 4, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, 6, tcp, 16),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, 6, tcp, 16),
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// A VXLAN payload (what goes in the outer UDP datagram): the VXLAN header and an Ethernet frame
/// carrying `inner` (an IP packet).
pub fn vxlan_payload(vni: u32, dst_mac: [u8; 6], src_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut out = vec![0x08, 0, 0, 0];
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    let ethertype: u16 = if inner[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(inner);
    out
}

/// Sends `packet` (an IP packet, header included, with whatever source it says) from a raw socket
/// in `ns`, as only a process with CAP_NET_RAW can.
pub fn send_raw(ns: &Netns, packet: &[u8]) -> io::Result<()> {
    let v6 = packet[0] >> 4 == 6;
    RawSender::open(ns, v6)?.send(packet)
}

/// A raw socket in a namespace, for sending many hand-made packets of one family.
pub struct RawSender {
    fd: std::os::fd::OwnedFd,
}

impl RawSender {
    pub fn open(ns: &Netns, v6: bool) -> io::Result<Self> {
        let family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        // IPPROTO_RAW: the packets carry their own IP header.
        let fd = ferrynet_kernel::netns::run_in(ns.fd(), move || {
            socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::Raw).map_err(io::Error::from)
        })?;
        Ok(Self { fd })
    }

    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        if packet[0] >> 4 == 6 {
            let dst: [u8; 16] = packet[24..40].try_into().expect("IPv6 header");
            let to = SockaddrIn6::from(std::net::SocketAddrV6::new(Ipv6Addr::from(dst), 0, 0, 0));
            sendto(raw, packet, &to, nix::sys::socket::MsgFlags::empty())?;
        } else {
            let dst: [u8; 4] = packet[16..20].try_into().expect("IPv4 header");
            let to = SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::from(dst), 0));
            sendto(raw, packet, &to, nix::sys::socket::MsgFlags::empty())?;
        }
        Ok(())
    }
}

/// A UDP socket bound in `ns`, to see what arrives.
pub struct UdpProbe {
    socket: UdpSocket,
}

impl UdpProbe {
    pub fn bind(ns: &Netns, addr: SocketAddr) -> io::Result<Self> {
        let socket = ferrynet_kernel::netns::run_in(ns.fd(), move || UdpSocket::bind(addr))?;
        Ok(Self { socket })
    }

    /// The next datagram's payload and source within `timeout`, if any arrives.
    pub fn receive(&self, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        self.socket.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = [0u8; 2048];
        let (n, from) = self.socket.recv_from(&mut buf).ok()?;
        Some((buf[..n].to_vec(), from))
    }

    /// Discards what has arrived so far.
    pub fn drain(&self) {
        while self.receive(Duration::from_millis(1)).is_some() {}
    }
}

/// Sends one UDP datagram from `ns` to `to` and returns the ICMP error the network answers with
/// within `timeout` (unreachable, refused), if any. The socket asks for every ICMP error
/// (`IP_RECVERR`, `IPV6_RECVERR`): without it, the kernel reports only the ones it deems fatal.
pub fn udp_icmp_error(ns: &Netns, to: SocketAddr, timeout: Duration) -> io::Result<Option<io::Error>> {
    ferrynet_kernel::netns::run_in(ns.fd(), move || {
        let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .expect("valid");
        let socket = UdpSocket::bind(any)?;
        if to.is_ipv4() {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvErr, &true)?;
        } else {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6RecvErr, &true)?;
        }
        socket.connect(to)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        Ok(match socket.recv(&mut buf) {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
            Err(e) => Some(e),
            Ok(_) => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let p = ipv4_udp(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            1234,
            53,
            b"hello",
        );
        assert_eq!(checksum(&p[..20], 0), 0, "IPv4 header");
        assert_eq!(p.len(), 20 + 8 + 5);
        let p6 = ipv6_udp("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), 1, 2, b"x");
        assert_eq!(p6.len(), 40 + 8 + 1);
        let v = vxlan_payload(4242, [2; 6], [4; 6], &p);
        assert_eq!(&v[4..7], &[0, 0x10, 0x92]);
        assert_eq!(&v[20..22], &[0x08, 0x00]);
    }
}
