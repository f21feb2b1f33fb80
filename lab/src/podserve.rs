//! What runs "in" a lab pod or outside host: a server that answers on each declared port with
//! the workload's name, and the probe client that `warren-lab probe/matrix` uses.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl std::str::FromStr for Proto {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            "SCTP" => Ok(Proto::Sctp),
            other => bail!("unknown protocol {other:?} (TCP, UDP or SCTP)"),
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        })
    }
}

/// `9097/TCP` → (9097, Tcp); a bare port is TCP.
pub fn parse_port_spec(s: &str) -> Result<(u16, Proto)> {
    let (p, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = p.parse().with_context(|| format!("bad port {p:?}"))?;
    Ok((port, proto.parse()?))
}

fn sctp() -> Protocol {
    Protocol::from(libc::IPPROTO_SCTP)
}

/// Serves `name\n` on every port until killed. Binds everything before returning from setup so a
/// caller that waits for the process's "ready" line knows the ports are open.
pub fn serve(name: &str, ports: &[(u16, Proto)]) -> Result<()> {
    let mut threads = Vec::new();
    for &(port, proto) in ports {
        let addr: SocketAddr = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port);
        let name = name.to_string();
        match proto {
            Proto::Tcp | Proto::Sctp => {
                let proto_opt = if proto == Proto::Sctp {
                    Some(sctp())
                } else {
                    Some(Protocol::TCP)
                };
                let s = Socket::new(Domain::IPV4, Type::STREAM, proto_opt)
                    .with_context(|| format!("opening a {proto} socket"))?;
                s.set_reuse_address(true)?;
                s.bind(&addr.into())
                    .with_context(|| format!("binding {addr}/{proto}"))?;
                s.listen(128)?;
                threads.push(std::thread::spawn(move || loop {
                    if let Ok((mut c, peer)) = s.accept() {
                        let peer = peer.as_socket().map(|a| a.ip().to_string()).unwrap_or_default();
                        let _ = c.write_all(format!("{name} {peer}\n").as_bytes());
                        let _ = c.flush();
                        let _ = c.shutdown(std::net::Shutdown::Write);
                        // Wait briefly for the peer's close so the reply is not cut by a RST.
                        let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 64];
                        let _ = c.read(&mut buf);
                    }
                }));
            }
            Proto::Udp => {
                let s = UdpSocket::bind(addr).with_context(|| format!("binding {addr}/UDP"))?;
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    loop {
                        if let Ok((_, peer)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(format!("{name} {}\n", peer.ip()).as_bytes(), peer);
                        }
                    }
                }));
            }
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub connected: bool,
    /// The name the server answered with (whom we reached), when connected.
    pub reply: String,
    /// The source address the server saw (after any SNAT on the way), when connected.
    #[serde(default)]
    pub seen_as: String,
    /// Why not, when blocked (timeout, refused, …).
    pub detail: String,
}

impl ProbeResult {
    fn blocked(detail: impl Into<String>) -> Self {
        Self {
            connected: false,
            reply: String::new(),
            seen_as: String::new(),
            detail: detail.into(),
        }
    }
}

/// Connects from the calling thread's network namespace.
pub fn probe(to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> ProbeResult {
    let addr = SocketAddr::new(to, port);
    match proto {
        Proto::Tcp => match TcpStream::connect_timeout(&addr, timeout) {
            Ok(mut s) => read_reply(&mut s, timeout),
            Err(e) => ProbeResult::blocked(e.to_string()),
        },
        Proto::Sctp => {
            let s = match Socket::new(Domain::IPV4, Type::STREAM, Some(sctp())) {
                Ok(s) => s,
                Err(e) => return ProbeResult::blocked(format!("SCTP socket: {e}")),
            };
            match s.connect_timeout(&addr.into(), timeout) {
                Ok(()) => {
                    let mut s: TcpStream = s.into();
                    read_reply(&mut s, timeout)
                }
                Err(e) => ProbeResult::blocked(e.to_string()),
            }
        }
        Proto::Udp => {
            let s = match UdpSocket::bind(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0)) {
                Ok(s) => s,
                Err(e) => return ProbeResult::blocked(e.to_string()),
            };
            let _ = s.set_read_timeout(Some(timeout));
            if let Err(e) = s.send_to(b"probe\n", addr) {
                return ProbeResult::blocked(e.to_string());
            }
            let mut buf = [0u8; 512];
            match s.recv_from(&mut buf) {
                Ok((n, _)) => answered(&buf[..n]),
                Err(e) => ProbeResult::blocked(e.to_string()),
            }
        }
    }
}

fn read_reply(s: &mut TcpStream, timeout: Duration) -> ProbeResult {
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.contains(&b'\n') {
                    break;
                }
            }
            Err(e) if buf.is_empty() => return ProbeResult::blocked(format!("connected but no answer: {e}")),
            Err(_) => break,
        }
    }
    if buf.is_empty() {
        return ProbeResult::blocked("connection closed without an answer");
    }
    answered(&buf)
}

/// Splits the server's `"<name> <peer address>"` line.
fn answered(buf: &[u8]) -> ProbeResult {
    let text = String::from_utf8_lossy(buf);
    let mut it = text.trim().splitn(2, ' ');
    let reply = it.next().unwrap_or_default().to_string();
    let seen_as = it.next().unwrap_or_default().trim().to_string();
    ProbeResult {
        connected: true,
        reply,
        seen_as,
        detail: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_parse_port_specs() {
        assert_eq!(parse_port_spec("9097").unwrap(), (9097, Proto::Tcp));
        assert_eq!(parse_port_spec("53/udp").unwrap(), (53, Proto::Udp));
        assert_eq!(parse_port_spec("80/SCTP").unwrap(), (80, Proto::Sctp));
        assert!(parse_port_spec("x/TCP").is_err());
        assert!(parse_port_spec("80/ICMP").is_err());
    }

    #[test]
    fn should_answer_a_tcp_and_udp_probe_on_loopback() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        drop(tcp);
        let ports = vec![(port, Proto::Tcp), (port, Proto::Udp)];
        std::thread::spawn(move || serve("pod-a", &ports));
        let mut res = ProbeResult::blocked("");
        for _ in 0..50 {
            res = probe(
                "127.0.0.1".parse().unwrap(),
                port,
                Proto::Tcp,
                Duration::from_millis(500),
            );
            if res.connected {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(res.reply, "pod-a");
        assert_eq!(res.seen_as, "127.0.0.1");
        let udp = probe("127.0.0.1".parse().unwrap(), port, Proto::Udp, Duration::from_secs(1));
        assert!(udp.connected, "{udp:?}");
        let closed = probe("127.0.0.1".parse().unwrap(), 1, Proto::Tcp, Duration::from_millis(300));
        assert!(!closed.connected);
    }
}
