//! Network namespaces for the fault suite: each node in a namespace of its
//! own, joined by a bridge in another namespace, so that iptables rules
//! inside a node's namespace cut real TCP traffic between real processes.
//!
//! Everything is named with a unique prefix and removed when the [`Netns`]
//! is dropped, even when a test fails. The test process itself stays in the
//! root namespace and reaches the nodes through one veth pair into the
//! bridge; partitions only ever cut node-to-node traffic.
//!
//! Needs root and `iptables`; without them [`Netns::create`] fails with a
//! message saying so. The suite never skips silently.

use std::process::Command;

use anyhow::{Context, bail};

/// One set of namespaces: `<prefix>sw` with the bridge, `<prefix>n<i>` per node.
pub struct Netns {
    prefix: String,
    subnet: u8,
    n_nodes: u64,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

impl Netns {
    /// Creates the namespaces, the bridge and the links for `n_nodes` nodes.
    pub fn create(n_nodes: u64) -> anyhow::Result<Netns> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
        if !is_root {
            bail!(
                "the network-namespace fault suite needs root (ip netns, iptables); it cannot run here"
            );
        }
        for tool in ["ip", "iptables"] {
            if Command::new(tool).arg("--version").output().is_err() {
                bail!(
                    "the network-namespace fault suite needs `{tool}`; install it (apt-get install -y iproute2 iptables)"
                );
            }
        }
        let pid = std::process::id();
        // Interface names are limited to 15 bytes: "tr" + 5 digits + "n1a" fits.
        let netns = Netns {
            prefix: format!("tr{:05}", pid % 100_000),
            subnet: (pid % 200 + 20) as u8,
            n_nodes,
        };
        netns.set_up().inspect_err(|_| netns.tear_down())?;
        Ok(netns)
    }

    fn set_up(&self) -> anyhow::Result<()> {
        let sw = format!("{}sw", self.prefix);
        run("ip", &["netns", "add", &sw])?;
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        for node in 1..=self.n_nodes {
            let ns = self.namespace(node);
            let (inside, outside) = (format!("{ns}a"), format!("{ns}b"));
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["link", "add", &inside, "type", "veth", "peer", "name", &outside])?;
            run("ip", &["link", "set", &inside, "netns", &ns])?;
            run("ip", &["link", "set", &outside, "netns", &sw])?;
            run("ip", &["-n", &sw, "link", "set", &outside, "master", "br0", "up"])?;
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{}/24", self.ip(node)), "dev", &inside],
            )?;
            run("ip", &["-n", &ns, "link", "set", &inside, "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (host, host_peer) = (format!("{}h", self.prefix), format!("{}hb", self.prefix));
        run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &host_peer])?;
        run("ip", &["link", "set", &host_peer, "netns", &sw])?;
        run("ip", &["-n", &sw, "link", "set", &host_peer, "master", "br0", "up"])?;
        run("ip", &["addr", "add", &format!("10.{}.0.254/24", self.subnet), "dev", &host])?;
        run("ip", &["link", "set", &host, "up"])?;
        Ok(())
    }

    fn tear_down(&self) {
        let _ = run("ip", &["link", "del", &format!("{}h", self.prefix)]);
        for node in 1..=self.n_nodes {
            let _ = run("ip", &["netns", "del", &self.namespace(node)]);
        }
        let _ = run("ip", &["netns", "del", &format!("{}sw", self.prefix)]);
    }

    pub fn namespace(&self, node: u64) -> String {
        format!("{}n{node}", self.prefix)
    }

    /// Node `node`'s address inside its namespace.
    pub fn ip(&self, node: u64) -> String {
        format!("10.{}.0.{node}", self.subnet)
    }

    /// Drops every packet from `from` to `to` (a one-way cut).
    pub fn cut_one_way(&self, from: u64, to: u64) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.namespace(to),
                "iptables",
                "-A",
                "INPUT",
                "-s",
                &self.ip(from),
                "-j",
                "DROP",
            ],
        )?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.namespace(from),
                "iptables",
                "-A",
                "OUTPUT",
                "-d",
                &self.ip(to),
                "-j",
                "DROP",
            ],
        )
    }

    /// Cuts `a` and `b` apart in both directions.
    pub fn cut(&self, a: u64, b: u64) -> anyhow::Result<()> {
        self.cut_one_way(a, b)?;
        self.cut_one_way(b, a)
    }

    /// Drops `percent` of the packets `node` receives from the other nodes.
    pub fn lose(&self, node: u64, percent: u32) -> anyhow::Result<()> {
        let probability = format!("{:.2}", f64::from(percent) / 100.0);
        for peer in (1..=self.n_nodes).filter(|peer| *peer != node) {
            let ns = self.namespace(node);
            let source = self.ip(peer);
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "iptables",
                    "-A",
                    "INPUT",
                    "-s",
                    &source,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(())
    }

    /// Removes every rule: the network is whole again.
    pub fn heal(&self) -> anyhow::Result<()> {
        for node in 1..=self.n_nodes {
            run("ip", &["netns", "exec", &self.namespace(node), "iptables", "-F"])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.tear_down();
    }
}
