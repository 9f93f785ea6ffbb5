#!/usr/bin/env bash
# Brings a fresh Debian 12 machine to the point where every make target runs.
# Idempotent: a second run checks, changes nothing and takes seconds.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  say "run as root: it installs Debian packages, mounts bpffs and loads eBPF programs" >&2
  exit 1
fi

# Debian packages, each for a reason:
#   python3-bpfcc       bcc: compiles and loads the C at run time (not on PyPI)
#   python3-venv        the venv over /usr/bin/python3, the only Python bcc imports into
#   linux-headers-amd64 bcc's clang needs kernel headers (see the link below)
#   iproute2 ethtool    testbed namespaces, veth, bridges, offload switches
#   iptables ipset      the iptables backend
#   nftables            the nftables peer in bench/
#   conntrack           inspecting and cutting connection-tracking entries
#   iperf3 socat        real traffic in the integration tests and benchmarks
#   netsniff-ng         trafgen: the benchmarks' packet generator (one pinned process)
#   xdp-tools           xdp-filter: the XDP project's own filter, the benchmarks' XDP peer
#   python3-matplotlib  the benchmarks' plots (the venv sees system site-packages)
#   vagrant             `vagrant validate` keeps vagrant/Vagrantfile valid
#   graphviz            `make architecture` draws docs/architecture.svg with dot
#   etcd-server         the cluster mode's tests start real etcd members (control/lab/etcd.py)
#                       on free ports; Debian's own etcd service (localhost:2379) is unused
#   etcd-client         etcdctl: the lab's leader, compaction and roles go over gRPC
#   openssl             the lab's CA and certificates for etcd's TLS (not essential in Debian)
#   docker.io           the Docker tests start their own dockerd (with its containerd, runc,
#                       docker-init) inside a namespace (control/lab/docker.py); Debian's own
#                       docker service is unused, and on a machine with systemd it starts
#   busybox-static      the lab's only image: one static binary (sh, nc, httpd, ping) imported
#                       with `docker import`, so no registry is needed
#   prometheus          a real server scrapes the agent in the tests, and promtool checks and
#                       unit-tests deploy/isoebpf-alerts.yaml; Debian's own prometheus service is unused
#   chromium            the live page's test opens it in a real headless browser (Playwright
#                       drives this one; it never downloads a browser of its own)
packages=(python3-bpfcc python3-venv linux-headers-amd64 iproute2 ethtool
          iptables ipset nftables conntrack iperf3 socat netsniff-ng xdp-tools python3-matplotlib vagrant
          graphviz etcd-server etcd-client openssl docker.io busybox-static prometheus chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/build. A kernel without its own
# headers gets Debian's: XDP and TC programs use only the stable UAPI, so a
# version gap between those headers and the running kernel does no harm.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ] || [ -z "$common" ]; then
    say "no kernel headers under /usr/src: bcc cannot compile" >&2
    exit 1
  fi
  say "kernel $(uname -r) has no headers: linking $kdir/build -> $hdr (UAPI only is used)"
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

# Pins live in bpffs; a machine without systemd does not mount it.
if ! mountpoint -q /sys/fs/bpf; then
  say "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# pip runs only when pyproject.toml changed since the last install.
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv over /usr/bin/python3 (bcc is importable only there)"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  say "installing isoebpf and its test dependencies into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$here[test]"
  touch "$stamp"
fi
