#!/usr/bin/env bash
# Installs what peerlink's tests use from the host: the kernel lab's tools and the external
# clients and servers peerlink interoperates with. Only as root; otherwise it says what is
# missing and the tests that need them skip with a message.
set -euo pipefail

need=()
check() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
check nft nftables
check ip iproute2
check conntrack conntrack
check turnserver coturn
check turnutils_natdiscovery coturn
check stun stun-client
check ping iputils-ping
check avahi-daemon avahi-daemon
check avahi-browse avahi-utils
check dbus-daemon dbus-daemon
check miniupnpd miniupnpd-nftables
check iperf3 iperf3
check chromium chromium
check tinyproxy tinyproxy

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
# shellcheck disable=SC2207
need=($(printf '%s\n' "${need[@]}" | sort -u))
if [ "$(id -u)" -ne 0 ]; then
  echo "deps: not root; missing Debian packages: ${need[*]} (tests that need them will skip)"
  exit 0
fi
echo "deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# coturn's package starts a server on install on some systems; peerlink's tests start their own.
if command -v systemctl >/dev/null 2>&1; then systemctl stop coturn >/dev/null 2>&1 || true; fi
pkill -x turnserver >/dev/null 2>&1 || true
# Likewise avahi: the mDNS tests run their own daemon inside a lab namespace.
if command -v systemctl >/dev/null 2>&1; then systemctl stop avahi-daemon.socket avahi-daemon >/dev/null 2>&1 || true; fi
pkill -x avahi-daemon >/dev/null 2>&1 || true
pkill -x miniupnpd >/dev/null 2>&1 || true
if command -v systemctl >/dev/null 2>&1; then systemctl stop iperf3 >/dev/null 2>&1 || true; fi
# tinyproxy starts on install; the proxy tests run their own on a loopback port.
if command -v systemctl >/dev/null 2>&1; then systemctl stop tinyproxy >/dev/null 2>&1 || true; fi
pkill -x tinyproxy >/dev/null 2>&1 || true
