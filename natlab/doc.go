// Package natlab is an in-memory, deterministic network of hosts and NATs for testing
// peerlink without root, namespaces or wall-clock waits.
//
// A Network holds the internet (public hosts and NATs' public sides) and, behind each
// NAT, a LAN of hosts and possibly further NATs (carrier-grade NAT). Every Host is a
// nettype.PacketListener: its ListenPacket returns a net.PacketConn whose addresses are
// *net.UDPAddr, so the code that runs on kernel sockets runs here unchanged.
//
// # NAT behaviour
//
// A NAT follows one of the 27 NATCracker types (nat.Type):
//
//   - Mapping: EI keeps one external port per internal ip:port for every destination;
//     HD makes a new mapping per destination IP; PD per destination ip:port.
//   - Filtering: EI admits any source to a live mapping; HD only IPs the mapping has
//     sent to; PD only ip:port pairs it has sent to.
//   - Allocation: PP uses the internal port when it is free and otherwise a seeded random
//     free port (so a collision never fakes a contiguity pattern); PC gives each new
//     mapping the previous candidate plus Delta, NAT-wide, from a seeded random base,
//     stepping on by Delta past ports in use; RD picks a seeded random free port in
//     1024-65535.
//
// A mapping, and each of its filter permissions, lives until MappingTimeout passes with
// no outbound packet through it; inbound packets refresh it only when RefreshOnInbound
// is set. Expiry is evaluated lazily against the network's clock. A hairpinned packet
// (sent from inside to the NAT's own public address) is translated like any outbound
// packet and then meets the target mapping's filter as if it had come from outside.
// With Firewall set the element translates nothing and only filters, so hosts behind
// it keep their own, publicly routed addresses.
//
// # Links and time
//
// A NAT's uplink and a host's attachment can each have latency, jitter and loss. A
// packet on a zero-latency path is delivered before WriteTo returns, so tests need no
// waiting; delayed packets are scheduled with the network's clock.Clock, which may be
// a clock.Fake. Connection deadlines are read on the same clock.
//
// # Determinism
//
// Every random choice (ephemeral ports, allocated ports, loss, jitter) comes from a PCG
// generator seeded with Config.Seed and the element's name, so the same seed and the
// same sequence of operations give the same ports and the same lost packets, and adding
// an element does not disturb the others.
//
// Stats, on the Network or one NAT, count packets by fate, so a test can assert why a
// packet did not arrive.
package natlab
