//! Who a client is when it comes through a reverse proxy the operator trusts
//! (`--trusted-proxy`): what its live subscriptions cost is charged to it,
//! and it alone is refused when they cost too much (see
//! [`crate::pubsub`]). Behind a proxy every connection's peer is the proxy,
//! and all its users would be one client, cut together for one costly
//! dashboard.
//!
//! A connection from a trusted proxy names its client in `X-Forwarded-For`
//! (gRPC: the `x-forwarded-for` metadata): the right-most address that is
//! not itself a trusted proxy, as each proxy appends the address it got the
//! request from. What lies left of it was written by the client and is not
//! read. An absent or unreadable header leaves the peer itself as the
//! client. Any other peer's header is ignored: a client must not pick its
//! own identity to escape a refusal.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

/// The header (gRPC: metadata key) a proxy names its client in.
pub const HEADER: &str = "x-forwarded-for";

/// A `--trusted-proxy` value that is neither an address nor a network.
#[derive(Debug, thiserror::Error)]
#[error("not an IP address or network (127.0.0.1, 10.0.0.0/8, fd00::/8): {0:?}")]
pub struct NotAProxy(String);

/// One `--trusted-proxy`: an address or a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedProxy(IpNet);

impl FromStr for TrustedProxy {
    type Err = NotAProxy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net = match s.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr.to_canonical()),
            Err(_) => (s.parse::<IpNet>()).map_err(|_| NotAProxy(s.to_owned()))?,
        };
        Ok(TrustedProxy(net.trunc()))
    }
}

/// The proxies whose forwarded addresses are believed; none by default.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<TrustedProxy>);

impl TrustedProxies {
    pub fn new(proxies: Vec<TrustedProxy>) -> TrustedProxies {
        TrustedProxies(proxies)
    }

    fn trust(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|proxy| proxy.0.contains(&addr))
    }

    /// The client of a connection from `peer` whose request carried
    /// `forwarded` (the values of every `X-Forwarded-For`, in order; one
    /// that is not text given as `""`).
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        forwarded: impl IntoIterator<Item = &'a str>,
    ) -> ClientAddr {
        // A dual-stack listener sees IPv4 peers as mapped IPv6 addresses.
        let peer = peer.to_canonical();
        let direct = ClientAddr {
            addr: peer,
            via: None,
        };
        if !self.trust(peer) {
            return direct;
        }
        let hops: Vec<&str> = (forwarded.into_iter())
            .flat_map(|value| value.split(','))
            .collect();
        // Left-most if every hop is trusted: the request began among them.
        let mut client = None;
        for hop in hops.iter().rev() {
            let Some(addr) = hop_addr(hop) else {
                return direct;
            };
            client = Some(addr);
            if !self.trust(addr) {
                break;
            }
        }
        match client {
            Some(addr) => ClientAddr {
                addr,
                via: Some(peer),
            },
            None => direct,
        }
    }
}

/// One `X-Forwarded-For` entry: an address, which some proxies write with
/// its port (`192.0.2.7:41000`, `[2001:db8::7]:41000`) or an IPv6 one in
/// brackets without it (`[2001:db8::7]`, as RFC 7239's `Forwarded` does).
fn hop_addr(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    let bare = |hop: &str| {
        hop.strip_prefix('[')?
            .strip_suffix(']')?
            .parse::<IpAddr>()
            .ok()
    };
    let addr = (hop.parse::<IpAddr>().ok())
        .or_else(|| Some(hop.parse::<SocketAddr>().ok()?.ip()))
        .or_else(|| bare(hop))?;
    Some(addr.to_canonical())
}

/// A client of live subscriptions: its address, and the trusted proxy it
/// came through, if any (only named in logs: the client is its address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    pub addr: IpAddr,
    pub via: Option<IpAddr>,
}

impl ClientAddr {
    /// A client that connected itself.
    pub const fn direct(addr: IpAddr) -> ClientAddr {
        ClientAddr { addr, via: None }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            Some(proxy) => write!(f, "{} via proxy {proxy}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusting(proxies: &[&str]) -> TrustedProxies {
        TrustedProxies::new(proxies.iter().map(|p| p.parse().unwrap()).collect())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn via(addr: &str, proxy: &str) -> ClientAddr {
        ClientAddr {
            addr: ip(addr),
            via: Some(ip(proxy)),
        }
    }

    #[test]
    fn a_trusted_proxy_names_the_right_most_untrusted_address() {
        let proxies = trusting(&["127.0.0.1", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        assert_eq!(
            proxies.client(peer, ["192.0.2.7"]),
            via("192.0.2.7", "127.0.0.1")
        );
        // What the client wrote itself, left of the first proxy's entry, is not read.
        assert_eq!(
            proxies.client(peer, ["6.6.6.6, 192.0.2.7, 10.1.2.3"]),
            via("192.0.2.7", "127.0.0.1")
        );
        assert_eq!(
            proxies.client(peer, ["garbage, 192.0.2.7"]),
            via("192.0.2.7", "127.0.0.1")
        );
        // Several header lines are one list, in order.
        assert_eq!(
            proxies.client(peer, ["192.0.2.7", "10.1.2.3"]),
            via("192.0.2.7", "127.0.0.1")
        );
        assert_eq!(
            proxies.client(peer, ["192.0.2.7:41000", "[2001:db8::7]:443"]),
            via("2001:db8::7", "127.0.0.1")
        );
        assert_eq!(
            proxies.client(peer, ["192.0.2.7, [2001:db8::7]"]),
            via("2001:db8::7", "127.0.0.1")
        );
        // All trusted: the request began among the proxies, at the left-most.
        assert_eq!(
            proxies.client(peer, ["10.9.9.9, 10.1.2.3"]),
            via("10.9.9.9", "127.0.0.1")
        );
    }

    #[test]
    fn an_absent_or_unreadable_header_leaves_the_peer() {
        let proxies = trusting(&["127.0.0.1"]);
        let peer = ip("127.0.0.1");
        let direct = ClientAddr::direct(peer);
        assert_eq!(proxies.client(peer, []), direct);
        assert_eq!(proxies.client(peer, [""]), direct);
        assert_eq!(proxies.client(peer, ["unknown"]), direct);
        assert_eq!(proxies.client(peer, ["192.0.2.7, nonsense"]), direct);
    }

    #[test]
    fn an_untrusted_peer_is_its_own_client_whatever_it_forwards() {
        let proxies = trusting(&["127.0.0.1"]);
        let peer = ip("127.0.0.2");
        assert_eq!(
            proxies.client(peer, ["192.0.2.7"]),
            ClientAddr::direct(peer)
        );
        assert_eq!(
            TrustedProxies::default().client(ip("127.0.0.1"), ["192.0.2.7"]),
            ClientAddr::direct(ip("127.0.0.1"))
        );
    }

    /// Every address of a trusted network is believed: a client inside one
    /// names whom it likes, directly or through the proxy (README: trust
    /// the proxies' own addresses).
    #[test]
    fn a_client_inside_a_trusted_network_names_whom_it_likes() {
        let proxies = trusting(&["10.0.0.0/8"]);
        let pod = ip("10.2.3.4");
        assert_eq!(
            proxies.client(pod, ["192.0.2.9"]),
            via("192.0.2.9", "10.2.3.4")
        );
        assert_eq!(
            proxies.client(ip("10.0.0.1"), ["192.0.2.9, 10.2.3.4"]),
            via("192.0.2.9", "10.0.0.1")
        );
        let proxy_only = trusting(&["10.0.0.1"]);
        assert_eq!(
            proxy_only.client(ip("10.0.0.1"), ["192.0.2.9, 10.2.3.4"]),
            via("10.2.3.4", "10.0.0.1")
        );
    }

    #[test]
    fn a_mapped_ipv4_peer_is_its_ipv4_address() {
        let proxies = trusting(&["127.0.0.1"]);
        assert_eq!(
            proxies.client(ip("::ffff:127.0.0.1"), ["::ffff:192.0.2.7"]),
            via("192.0.2.7", "127.0.0.1")
        );
    }

    #[test]
    fn a_proxy_is_an_address_or_a_network() {
        assert!("127.0.0.1".parse::<TrustedProxy>().is_ok());
        assert!("fd00::/8".parse::<TrustedProxy>().is_ok());
        // Host bits set: the network they are in.
        let net: TrustedProxy = "10.1.2.3/8".parse().unwrap();
        assert!(TrustedProxies::new(vec![net]).trust(ip("10.200.0.1")));
        let wrong = "10.0.0.0/33".parse::<TrustedProxy>().unwrap_err();
        assert_eq!(
            wrong.to_string(),
            r#"not an IP address or network (127.0.0.1, 10.0.0.0/8, fd00::/8): "10.0.0.0/33""#
        );
        assert!("proxy.local".parse::<TrustedProxy>().is_err());
    }

    #[test]
    fn a_client_is_shown_with_the_proxy_it_came_through() {
        assert_eq!(
            via("192.0.2.7", "127.0.0.1").to_string(),
            "192.0.2.7 via proxy 127.0.0.1"
        );
        assert_eq!(ClientAddr::direct(ip("127.0.0.2")).to_string(), "127.0.0.2");
    }
}
