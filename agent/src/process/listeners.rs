//! Which socket inodes listen on the `--port` ports.
//!
//! The kernel is asked through `sock_diag` netlink (`NETLINK_SOCK_DIAG`, an `inet_diag` dump
//! filtered to the LISTEN state), which walks only its table of listening sockets. Reading
//! `/proc/net/tcp` instead walks the whole established-connection hash, every bucket of it,
//! whether used or not: 262 144 buckets on a 24 GiB machine, a few milliseconds per read, more on
//! larger hosts. At a rescan every 2 s that was 2.2 ms of CPU a second for an idle agent started
//! with `--port` (0.15 ms with `--pid`). `/proc/net/tcp{,6}` remain the fallback when netlink is
//! refused (a seccomp profile, say).
//!
//! Both views belong to one network namespace. The agent's own is read directly; the namespace
//! of every other process the rescan looks at (a container's, a Kubernetes pod's) is read from
//! a short-lived thread that enters it with `setns` (`CAP_SYS_ADMIN`, which the agent has), one
//! dump per namespace. Without that, `--port 8080` on a node would miss a pod that was already
//! listening when the agent started and serves only connections accepted before (the kernel side
//! traces a process when it listens on or accepts from a watched port, in any namespace).

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    os::fd::AsRawFd,
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// Socket inodes listening on any of `ports` (TCP, IPv4 and IPv6), in the agent's network
/// namespace and in the namespaces of `pids`.
pub fn listening_inodes(ports: &[u16], pids: impl IntoIterator<Item = u32>) -> HashSet<u64> {
    let own = netns("self");
    let mut out = in_namespace(ports, "self");
    // One process per other namespace.
    let others: BTreeMap<u64, u32> =
        pids.into_iter().filter_map(|p| Some((netns(&p.to_string())?, p))).filter(|(ns, _)| Some(*ns) != own).collect();
    if !others.is_empty() {
        // setns changes the calling thread's namespace: a thread of its own, which then ends.
        let found = std::thread::scope(|s| {
            s.spawn(|| {
                let mut found = HashSet::new();
                for (ns, pid) in others {
                    match enter_netns(pid) {
                        Ok(()) => found.extend(in_namespace(ports, &pid.to_string())),
                        Err(e) => tracing::debug!(pid, netns = ns, error = %e, "cannot enter its network namespace"),
                    }
                }
                found
            })
            .join()
            .unwrap_or_default()
        });
        out.extend(found);
    }
    out
}

/// The listeners on `ports` in the namespace this thread is in, which is that of process `pid`
/// (or "self") for the /proc fallback.
fn in_namespace(ports: &[u16], pid: &str) -> HashSet<u64> {
    match netlink_listeners() {
        Ok(all) => all.into_iter().filter(|(port, _)| ports.contains(port)).map(|(_, inode)| inode).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag netlink refused; reading /proc/PID/net/tcp instead");
            proc_listening_inodes(ports, pid)
        }
    }
}

/// The inode of a process's network namespace ("self" for the agent).
fn netns(pid: &str) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    link.to_str()?.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Moves the calling thread into the network namespace of `pid`.
fn enter_netns(pid: u32) -> io::Result<()> {
    let f = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // SAFETY: setns on a descriptor we own; it affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// (port, inode) of every listening TCP socket, from one `inet_diag` dump per address family.
fn netlink_listeners() -> io::Result<Vec<(u16, u64)>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (family, socket_id) in [(AF_INET, SocketId::new_v4()), (AF_INET6, SocketId::new_v6())] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut req = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        req.finalize();
        let mut bytes = vec![0u8; req.buffer_len()];
        req.serialize(&mut bytes);
        socket.send(&bytes, 0)?;
        'dump: loop {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        out.push((r.header.socket_id.source_port, u64::from(r.header.inode)));
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }
    Ok(out)
}

/// The same from `/proc/PID/net/tcp` and `tcp6` (the fallback).
fn proc_listening_inodes(ports: &[u16], pid: &str) -> HashSet<u64> {
    let mut out = HashSet::new();
    for f in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{f}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue; // 0A = TCP_LISTEN
            }
            let Some(port) = cols[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) else {
                continue;
            };
            if ports.contains(&port) {
                if let Ok(inode) = cols[9].parse() {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// netlink and /proc agree on real listeners (IPv4 and IPv6), and a connected socket on the
    /// same port is not a listener. (Not checked: that a closed listener is gone. Other tests fork
    /// children, which hold a copy of every descriptor until they exec.)
    #[test]
    fn netlink_and_proc_find_the_same_listeners() {
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port4 = l4.local_addr().unwrap().port();
        let _conn = std::net::TcpStream::connect(("127.0.0.1", port4)).unwrap();
        let l6 = std::net::TcpListener::bind("[::1]:0").ok();
        let mut ports = vec![port4];
        ports.extend(l6.as_ref().map(|l| l.local_addr().unwrap().port()));

        let via_netlink: HashSet<u64> =
            netlink_listeners().unwrap().into_iter().filter(|(p, _)| ports.contains(p)).map(|(_, i)| i).collect();
        assert_eq!(via_netlink.len(), ports.len(), "one listener per port, the connection not counted");
        assert_eq!(via_netlink, proc_listening_inodes(&ports, "self"));
        assert_eq!(listening_inodes(&ports, [std::process::id()]), via_netlink);
    }
}
