// Package connect gets two peerlink nodes a path: it plans from both NAT profiles, opens
// a relayed path at once when relaying is allowed, punches a direct one through the NATs
// and moves the connection onto it, and says how the connection was made.
package connect

import (
	"errors"
	"fmt"
	"time"

	"peerlink/detect"
	"peerlink/nat"
	"peerlink/punch"
	"peerlink/relayreg"
	"peerlink/signal"
)

// Method is how a connection's current path was made.
type Method uint8

// Methods.
const (
	MethodNone Method = iota
	// MethodDirect: one peer was reachable (public, full cone, same LAN) and was dialled.
	MethodDirect
	// MethodPunched: hole punching opened a path through the NATs.
	MethodPunched
	// MethodRelayed: traffic goes through a TURN relay.
	MethodRelayed
	// MethodRelayedHTTPS: traffic goes through the rendezvous server over the nodes'
	// WebSocket connections (HTTPS, through HTTP proxies too): the last resort, when
	// neither UDP nor a TURN relay gets through.
	MethodRelayedHTTPS
)

var methodNames = []string{"none", "direct", "punched", "relayed", "relayed-https"}

// Relayed reports whether the path goes through a relay of either kind.
func (m Method) Relayed() bool { return m == MethodRelayed || m == MethodRelayedHTTPS }

func (m Method) String() string {
	if int(m) < len(methodNames) {
		return methodNames[m]
	}
	return fmt.Sprintf("Method(%d)", uint8(m))
}

// MarshalText returns the method's name: "direct", "punched", "relayed" or "relayed-https".
func (m Method) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// methodOf says how a path found by technique t was made.
func methodOf(t nat.Technique) Method {
	switch t {
	case nat.Direct, nat.Reversal, nat.Local:
		return MethodDirect
	case nat.Relay, nat.TechniqueNone:
		return MethodRelayed
	}
	return MethodPunched
}

// Errors. Connect's errors wrap one of these with their cause.
var (
	// ErrPeerOffline: the target is not connected to the rendezvous service.
	ErrPeerOffline = signal.ErrPeerOffline
	// ErrPunchFailed: hole punching found no path and relaying is not allowed.
	ErrPunchFailed = punch.ErrPunchFailed
	// ErrSymmetricNAT: both peers' NATs are too hard to punch and relaying is not
	// allowed.
	ErrSymmetricNAT = errors.New("connect: both peers are behind NATs that cannot be punched (symmetric); enable relay")
	// ErrNoRelay: a relay was needed but none could be used.
	ErrNoRelay = relayreg.ErrNoRelay
	// ErrDetectionTimeout and ErrNoObservers come from NAT profiling.
	ErrDetectionTimeout = detect.ErrDetectionTimeout
	ErrNoObservers      = detect.ErrNoObservers
	// ErrClosed: the node or connection was closed.
	ErrClosed = errors.New("connect: closed")
	// ErrTimeout: no path came up within Options.Timeout.
	ErrTimeout = errors.New("connect: timed out")
)

// Options are per-connection choices. The zero value is the defaults.
type Options struct {
	// Timeout bounds Connect until the first path works; zero means 10 s.
	Timeout time.Duration
	// NoDirect disables the upgrade to a direct path: the connection stays relayed.
	// (The zero value prefers direct paths, as PreferDirect: true would.)
	NoDirect bool
	// NoRelay disallows relaying: Connect fails with ErrPunchFailed or ErrSymmetricNAT
	// when no direct path works. (The zero value allows the relay fallback.)
	NoRelay bool
	// MaxPunchAttempts is how many punching rounds to run; zero means 3.
	MaxPunchAttempts int
	// MaxAttempts is how many times the whole procedure (offer to path) runs before
	// Connect gives up, each within Timeout; zero means 1. An offline peer or a plan
	// that cannot work is not retried.
	MaxAttempts int
}

func (o Options) timeout() time.Duration {
	if o.Timeout <= 0 {
		return 10 * time.Second
	}
	return o.Timeout
}

func (o Options) attempts() int {
	if o.MaxPunchAttempts <= 0 {
		return 3
	}
	return o.MaxPunchAttempts
}
