// Package relay is peerlink's TURN relay (RFC 8656, with RFC 6156 IPv6), its operator
// limits and hooks, and a client that gets relayed addresses from any TURN server.
package relay

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"peerlink/clock"
)

// Transport is how a client reaches the relay.
type Transport string

// Client transports. Relayed transport addresses are always UDP.
const (
	UDP Transport = "udp"
	TCP Transport = "tcp"
	TLS Transport = "tls"
)

// RFC 8656 lifetimes.
const (
	DefaultLifetime    = 600 * time.Second
	MaxLifetime        = 3600 * time.Second
	PermissionLifetime = 300 * time.Second
	ChannelLifetime    = 600 * time.Second
	// reservationLifetime is how long an EVEN-PORT reservation is held (RFC 8656 §7.2).
	reservationLifetime = 30 * time.Second
)

// Errors.
var (
	// ErrClosed is returned by Start and ListenAndServe on a closed server.
	ErrClosed = errors.New("relay: server closed")
	// ErrNoCredentials means the configuration has neither Users nor a Secret: the
	// relay never runs open.
	ErrNoCredentials = errors.New("relay: no credentials configured (Users or Secret)")
	// ErrUnsupported is returned by Start where the server cannot run (it needs Linux).
	ErrUnsupported = errors.New("relay: the server runs on Linux only")
)

// ConfigError reports an invalid Config field.
type ConfigError struct {
	Field string
	Err   error
}

func (e *ConfigError) Error() string { return fmt.Sprintf("relay: config %s: %v", e.Field, e.Err) }
func (e *ConfigError) Unwrap() error { return e.Err }

// Config configures a Server. The zero value of each field is documented and usable,
// except that at least one listen address and one kind of credential are needed.
type Config struct {
	// ListenUDP is the host:port clients send UDP to ("" means no UDP). An unspecified
	// host listens on every IPv4 address, and on every IPv6 address too when the host
	// has IPv6.
	ListenUDP string
	// ListenTCP is the host:port for TURN over TCP ("" means none).
	ListenTCP string
	// ListenTLS is the host:port for TURN over TLS ("" means none), 443 in production so
	// clients whose UDP is blocked still get relayed. TLSConfig must then hold a
	// certificate.
	ListenTLS string
	TLSConfig *tls.Config

	// RelayIP is the IPv4 address relayed addresses are bound to and advertised with.
	// Zero means the UDP listen address when that is a specific IPv4 address, else the
	// address the host would use to reach the internet.
	RelayIP netip.Addr
	// RelayIPv6 is the same for IPv6 allocations (RFC 6156). Zero means the IPv6 listen
	// address when specific, else the host's outbound IPv6 address if it has one;
	// without one, IPv6 allocations get 440 Address Family not Supported.
	RelayIPv6 netip.Addr
	// MinPort and MaxPort bound relayed ports; zero means the kernel's ephemeral range.
	MinPort, MaxPort uint16

	// Realm is the long-term credential realm; "" means "peerlink".
	Realm string
	// Users are long-term credentials, user name to password.
	Users map[string]string
	// Secret enables the TURN REST ephemeral scheme (coturn's use-auth-secret): user
	// name "expiry:id" with expiry in Unix seconds, password
	// base64(HMAC-SHA1(Secret, user name)). "" disables it.
	Secret string
	// NonceLifetime is how long a nonce stays valid before 438 Stale Nonce; zero means
	// 10 minutes.
	NonceLifetime time.Duration

	// AllowLoopbackPeers lets clients relay to loopback addresses (labs and tests).
	// By default loopback, private, link-local, multicast and unspecified peers are
	// refused with 403, so the relay cannot be used to reach the operator's network.
	AllowLoopbackPeers bool
	// AllowPrivatePeers lets clients relay to private (RFC 1918, RFC 6598, ULA) and
	// link-local addresses (labs behind NAT).
	AllowPrivatePeers bool
	// DeniedPeers are further prefixes peers may never be in.
	DeniedPeers []netip.Prefix

	// MaxSessions caps concurrent allocations; over it Allocate gets 486 Allocation
	// Quota Reached. Zero means no cap.
	MaxSessions int
	// PerUserQuota caps one user's concurrent allocations (486 too); zero means no cap.
	PerUserQuota int
	// PerSourceQuota caps the concurrent allocations of one source (an IPv4 address or
	// an IPv6 /64), whatever users it authenticates as: 486 beyond it. One leaked or
	// REST credential then cannot take every relayed port from one machine. Zero means
	// DefaultPerSourceQuota; negative means no cap (benchmarks that load the relay from
	// one address).
	PerSourceQuota int
	// RequestLimit bounds the STUN requests each source may make; its zero value is on,
	// with the defaults of its fields.
	RequestLimit RequestLimit
	// BandwidthLimit is each session's relayed bytes per second, both directions
	// together, enforced by a token bucket; packets over it are dropped. Zero means no
	// limit.
	BandwidthLimit int64
	// TotalCapacity is the relay's bytes per second over all sessions, enforced the
	// same way; zero means no limit. It is also what the relay registers as capacity.
	TotalCapacity int64
	// SessionTimeout ends a session that relayed nothing, either way, for this long,
	// even if its client keeps refreshing it. Zero means sessions end only when their
	// lifetime runs out.
	SessionTimeout time.Duration

	// OnSessionStart is called when an allocation gets its first peer permission: the
	// relay then connects the client to a peer. OnSessionEnd is called when a started
	// session's allocation ends. Both run on one goroutine of their own, in order; nil
	// means no call.
	OnSessionStart func(SessionInfo)
	OnSessionEnd   func(SessionInfo)

	// Registrar, when set, is told the relay's endpoints and capacity at start and its
	// load every HeartbeatInterval (zero means 10 s).
	Registrar         Registrar
	HeartbeatInterval time.Duration

	// Metrics receives the relay's Prometheus metrics; nil means none.
	Metrics prometheus.Registerer
	// Logger receives the relay's log; nil means quiet.
	Logger *slog.Logger
	// Clock is the time source; nil means the real clock.
	Clock clock.Clock
	// Loops is the number of event loops relaying UDP; zero means half of GOMAXPROCS,
	// at least one. Each has its own UDP socket, sharing the port with SO_REUSEPORT.
	Loops int
}

// DefaultPerSourceQuota is Config.PerSourceQuota's zero value: room for a NAT shared by
// a few dozen clients each holding an allocation or two.
const DefaultPerSourceQuota = 64

// RequestLimit configures the per-source token buckets in front of the relay's request
// handling. A source (an IPv4 address, or an IPv6 /64: one host usually owns a whole
// /64) earns Rate tokens a second up to Burst. A request costs one token, or
// UnauthenticatedCost when it carries no MESSAGE-INTEGRITY and is not a Binding: it is
// answered with a 401 and a fresh nonce, work (an HMAC and a response larger than the
// request) anyone can ask for without a credential. A request its source has no tokens
// for is dropped unanswered, as on a lossy path, and clients retransmit. The data path,
// ChannelData and Send indications, is not counted here: BandwidthLimit bounds it.
// Every zero field means its default.
//
// A client needs a handful of requests per allocation (a 401, Allocate, permissions,
// channels) and one every few minutes to keep it. The default burst lets one source
// fill DefaultPerSourceQuota at once (a 401 and an Allocate each, three tokens), and
// the rate leaves room for a NAT shared by dozens of clients.
//
// Over UDP a source address can be forged: a forger can use up another source's tokens
// and so have that source's requests dropped for as long as it keeps sending, but not
// its relayed data, and the relay's cost stays bounded by the limit either way.
type RequestLimit struct {
	// Disabled turns the limiter off, for benchmarks and trusted networks.
	Disabled bool
	// Rate is the tokens a source earns a second; 0 means DefaultRequestRate.
	Rate float64
	// Burst is the bucket size; 0 means DefaultRequestBurst.
	Burst float64
	// UnauthenticatedCost is what a request without credentials costs; 0 means
	// DefaultUnauthenticatedCost.
	UnauthenticatedCost float64
	// MaxSources bounds the sources tracked at once, and so the limiter's memory (32
	// bytes a source, allocated at New). When full, a new source takes the place of the
	// least recently seen of the eight it competes with. 0 means DefaultMaxSources.
	MaxSources int
}

// Defaults for RequestLimit's zero fields.
const (
	DefaultRequestRate         = 100
	DefaultRequestBurst        = 200
	DefaultUnauthenticatedCost = 2
	DefaultMaxSources          = 65536
)

func (r RequestLimit) withDefaults() RequestLimit {
	r.Rate = cmp.Or(r.Rate, DefaultRequestRate)
	r.Burst = cmp.Or(r.Burst, DefaultRequestBurst)
	r.UnauthenticatedCost = cmp.Or(r.UnauthenticatedCost, DefaultUnauthenticatedCost)
	r.MaxSources = cmp.Or(r.MaxSources, DefaultMaxSources)
	return r
}

func (r RequestLimit) check() error {
	if r.Disabled {
		return nil
	}
	if r.Rate < 0 || r.Burst < 0 || r.UnauthenticatedCost < 0 || r.MaxSources < 0 {
		return errors.New("negative field")
	}
	if r.Burst < 1 || r.UnauthenticatedCost > r.Burst {
		return fmt.Errorf("burst %v admits no request (unauthenticated cost %v)", r.Burst, r.UnauthenticatedCost)
	}
	return nil
}

// SessionInfo describes one relay session: an allocation and what it relayed.
type SessionInfo struct {
	ID        uint64
	User      string
	Transport Transport
	// Client is the client's address as the relay sees it (one peer of the session).
	Client netip.AddrPort
	// Relayed is the session's relayed transport address.
	Relayed netip.AddrPort
	// Peers are the other side: the peers the client was permitted to reach, in order
	// (at most 16; OnSessionStart gets the first).
	Peers []netip.AddrPort
	// BytesIn is the payload relayed from the client to its peers, BytesOut from the
	// peers to the client; PacketsIn and PacketsOut count the datagrams.
	BytesIn, BytesOut     uint64
	PacketsIn, PacketsOut uint64
	Start                 time.Time
	// End and Reason are set for OnSessionEnd: Reason is "deleted" (the client ended
	// it), "expired", "idle", "closed" (TCP connection) or "shutdown".
	End    time.Time
	Reason string
}

// Endpoint is one way to reach the relay.
type Endpoint struct {
	Transport Transport
	// Addr is host:port.
	Addr string
}

// Registration is what the relay registers with a rendezvous registry.
type Registration struct {
	Endpoints []Endpoint
	// MaxSessions and Capacity (bytes per second) are zero when unlimited.
	MaxSessions int
	Capacity    int64
}

// Load is what the relay heartbeats.
type Load struct {
	Enabled  bool
	Sessions int
	// BytesPerSecond is the relayed rate since the previous heartbeat.
	BytesPerSecond float64
}

// Registrar registers the relay with a rendezvous registry. The rendezvous client
// satisfies it; errors are logged and retried at the next heartbeat.
type Registrar interface {
	Register(ctx context.Context, r Registration) error
	Heartbeat(ctx context.Context, l Load) error
}

// DropReason says why the relay dropped a packet.
type DropReason uint8

// Drop reasons.
const (
	DropMalformed         DropReason = iota // not a TURN message, or truncated
	DropNoAllocation                        // data from a client without an allocation
	DropNoChannel                           // ChannelData on an unbound channel
	DropNoPermission                        // peer without a permission
	DropBandwidth                           // over the session's bandwidth limit
	DropCapacity                            // over the relay's total capacity
	DropTooLarge                            // datagram larger than the relay reads
	DropSendError                           // the kernel refused the send
	DropCongested                           // a TCP client's send queue is full
	DropForbidden                           // addressed to the relay's own listening ports
	DropRateLimited                         // a request with credentials, or a Binding, over its source's request rate
	DropRateLimitedUnauth                   // a request without credentials over its source's request rate
	numDropReasons
)

var dropNames = [numDropReasons]string{"malformed", "no_allocation", "no_channel", "no_permission", "bandwidth", "capacity", "too_large", "send_error", "congested", "forbidden",
	"rate_limited", "rate_limited_unauthenticated"}

// RefuseReason says why the relay refused an Allocate.
type RefuseReason uint8

// Refusal reasons.
const (
	RefuseDisabled    RefuseReason = iota // Disable was called
	RefuseMaxSessions                     // MaxSessions reached
	RefuseUserQuota                       // PerUserQuota reached
	RefuseSourceQuota                     // PerSourceQuota reached
	numRefuseReasons
)

var refuseNames = [numRefuseReasons]string{"disabled", "max_sessions", "user_quota", "source_quota"}

func (r RefuseReason) String() string {
	if r < numRefuseReasons {
		return refuseNames[r]
	}
	return fmt.Sprintf("RefuseReason(%d)", uint8(r))
}

func (r DropReason) String() string {
	if r < numDropReasons {
		return dropNames[r]
	}
	return fmt.Sprintf("DropReason(%d)", uint8(r))
}

// Stats is a snapshot of the relay's counters.
type Stats struct {
	Enabled bool
	// Sessions is the number of live allocations; SessionsTotal counts all there were.
	Sessions      int
	SessionsTotal uint64
	// Refused counts Allocate requests refused for a limit or because the relay was
	// disabled; RefusedBy splits it by reason.
	Refused   uint64
	RefusedBy [numRefuseReasons]uint64
	// To peers is client-to-peer payload, to clients the other way.
	BytesToPeers, BytesToClients     uint64
	PacketsToPeers, PacketsToClients uint64
	Drops                            [numDropReasons]uint64
}

// Dropped returns the drop count for one reason.
func (s Stats) Dropped(r DropReason) uint64 {
	if r < numDropReasons {
		return s.Drops[r]
	}
	return 0
}
