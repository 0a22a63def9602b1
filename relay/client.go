package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/pion/logging"
	"github.com/pion/stun/v3"
	"github.com/pion/turn/v4"

	"peerlink/nettype"
)

// ClientConfig says how to get a relayed address from a TURN server (peerlink's relay,
// coturn or any RFC 8656 server).
type ClientConfig struct {
	// Server is the TURN server's host:port (IPv4).
	Server string
	// Transport reaches the server over UDP, TCP or TLS; "" means UDP. TCP and TLS get
	// through networks that block UDP; the relayed address is UDP either way.
	Transport Transport
	// Username and Password are long-term credentials (see RESTCredentials for the
	// ephemeral kind).
	Username, Password string
	// TLSConfig is used for TLS; nil means verifying the server's certificate for the
	// host in Server against the system roots.
	TLSConfig *tls.Config
	// Listener opens the client's UDP socket; nil means the host's network.
	Listener nettype.PacketListener
	// DialContext opens the TCP connection for TCP and TLS; nil means the host's
	// network. A kernel-lab host's DialContext reaches a relay inside the lab.
	DialContext func(ctx context.Context, network, address string) (net.Conn, error)
	// KeepAlive is how often the client sends a Binding request to the server when
	// nothing else would, so that NATs on the way keep the client's mapping: when it
	// expires, the NAT picks a new port and the server no longer knows the client.
	// Each keepalive also checks the allocation (see Conn.Check). Zero means 15 s
	// (NATs commonly drop idle UDP mappings after 30 s); negative turns keepalives and
	// checks off.
	KeepAlive time.Duration
	// Logger receives the TURN client's log; nil means quiet.
	Logger *slog.Logger
}

// ErrAllocate wraps the server's refusal or a failed exchange while allocating.
var ErrAllocate = errors.New("relay: allocation failed")

// ErrAllocationLost is a Conn's error once its allocation is of no more use: the
// server forgot it (it restarted, or the allocation expired), no longer answers, or
// sees the client from another address than the one it allocated for (a NAT on the way
// rebound the client's mapping). Dial again for a new allocation.
var ErrAllocationLost = errors.New("relay: allocation lost")

// checkFailures is how many checks in a row may go unanswered before the allocation
// counts as lost. Each unanswered check already went out seven times over about 8 s,
// but one stretch of loss is no reason to drop an allocation.
const checkFailures = 2

// Conn is an allocation on a TURN server: a net.PacketConn whose LocalAddr is the
// relayed address. Writes to a peer install its permission (and a channel) first;
// the allocation, permissions and channels are refreshed until Close.
type Conn struct {
	net.PacketConn
	client *turn.Client
	base   io.Closer
	once   sync.Once
	stop   chan struct{}
	wg     sync.WaitGroup

	checkMu  sync.Mutex // one check at a time
	mapped   net.Addr   // the client's address as the server saw it first
	silent   int        // checks in a row without an answer
	lost     chan struct{}
	lostOnce sync.Once
	lostErr  error
}

// Dial connects to the TURN server in cfg and allocates a relayed address.
func Dial(ctx context.Context, cfg ClientConfig) (*Conn, error) {
	var (
		pc   net.PacketConn
		base io.Closer
	)
	switch cfg.Transport {
	case "", UDP:
		c, err := nettype.Or(cfg.Listener).ListenPacket(ctx, "udp4", "0.0.0.0:0")
		if err != nil {
			return nil, fmt.Errorf("relay: client socket: %w", err)
		}
		pc, base = c, c
	case TCP, TLS:
		dial := cfg.DialContext
		if dial == nil {
			dial = (&net.Dialer{}).DialContext
		}
		c, err := dial(ctx, "tcp", cfg.Server)
		if err != nil {
			return nil, fmt.Errorf("relay: dial %s: %w", cfg.Server, err)
		}
		if cfg.Transport == TLS {
			tc := cfg.TLSConfig
			if tc == nil {
				host, _, _ := net.SplitHostPort(cfg.Server)
				tc = &tls.Config{ServerName: host}
			}
			t := tls.Client(c, tc)
			if err := t.HandshakeContext(ctx); err != nil {
				c.Close()
				return nil, fmt.Errorf("relay: tls %s: %w", cfg.Server, err)
			}
			c = t
		}
		pc, base = turn.NewSTUNConn(c), c
	default:
		return nil, fmt.Errorf("relay: unknown transport %q", cfg.Transport)
	}
	client, err := turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: cfg.Server,
		TURNServerAddr: cfg.Server,
		Username:       cfg.Username,
		Password:       cfg.Password,
		Conn:           pc,
		LoggerFactory:  slogFactory{cfg.Logger},
	})
	if err != nil {
		base.Close()
		return nil, fmt.Errorf("relay: %w", err)
	}
	if err := client.Listen(); err != nil {
		client.Close()
		base.Close()
		return nil, fmt.Errorf("relay: %w", err)
	}
	// The TURN client takes no context: closing its socket is what cuts it short.
	stop := context.AfterFunc(ctx, func() { base.Close() })
	relayed, err := client.Allocate()
	cancelled := !stop()
	if err != nil || cancelled {
		client.Close()
		base.Close()
		if cancelled {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%w: %s via %s: %w", ErrAllocate, cfg.Server, cmpTransport(cfg.Transport), err)
	}
	c := &Conn{PacketConn: relayed, client: client, base: base, stop: make(chan struct{}), lost: make(chan struct{})}
	if ka := cfg.KeepAlive; ka >= 0 {
		if ka == 0 {
			ka = 15 * time.Second
		}
		if cfg.Transport == "" || cfg.Transport == UDP {
			// The address the server sees now is the one the allocation belongs to;
			// a later Binding answered with another means the NAT rebound.
			c.mapped, _ = client.SendBindingRequest()
		}
		c.wg.Go(func() { c.keepAlive(ka) })
	}
	return c, nil
}

// keepAlive checks the allocation every interval until Close or until it is lost.
func (c *Conn) keepAlive(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-c.lost:
			return
		case <-t.C:
			c.check()
		}
	}
}

// Lost is closed when the allocation is found lost (see ErrAllocationLost); Err then
// says why.
func (c *Conn) Lost() <-chan struct{} { return c.lost }

// Err is nil while the allocation works, and wraps ErrAllocationLost once it is lost.
func (c *Conn) Err() error {
	select {
	case <-c.lost:
		return c.lostErr
	default:
		return nil
	}
}

func (c *Conn) markLost(err error) error {
	c.lostOnce.Do(func() {
		c.lostErr = fmt.Errorf("%w: %w", ErrAllocationLost, err)
		close(c.lost)
	})
	return c.lostErr
}

// Check asks the server about the allocation now rather than at the next keepalive,
// as a caller does when traffic through the relay stops or the network changed. It
// returns nil while the allocation works, an error wrapping ErrAllocationLost once it
// is lost, or ctx's error. A check that goes unanswered counts toward the few in a
// row that make the allocation lost.
func (c *Conn) Check(ctx context.Context) error {
	done := make(chan error, 1)
	c.wg.Go(func() { done <- c.check() })
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// check is one round: a Binding to see the client's address as the server sees it,
// and a CreatePermission that only an existing allocation gets a success (or a refusal
// other than 437 Allocation Mismatch) for.
func (c *Conn) check() error {
	c.checkMu.Lock()
	defer c.checkMu.Unlock()
	if err := c.Err(); err != nil {
		return err
	}
	select {
	case <-c.stop:
		return net.ErrClosed
	default:
	}
	var err error
	if c.mapped != nil {
		var addr net.Addr
		addr, err = c.client.SendBindingRequest()
		if err == nil && addr.String() != c.mapped.String() {
			return c.markLost(fmt.Errorf("the server now sees this client at %v, not %v (a NAT rebound it)", addr, c.mapped))
		}
	}
	if err == nil {
		// The relayed address's own IP is as harmless a peer as any: a permission for
		// it lets nothing new in. A quick failure that is no error response is the
		// TURN client taking a new nonce (a restarted server has new ones): ask again
		// at once, so a restart is known now rather than at the next check.
		for try := 0; try < 2; try++ {
			start := time.Now()
			err = c.client.CreatePermission(c.PacketConn.LocalAddr())
			var te *stun.TurnError
			if err == nil || errors.As(err, &te) || time.Since(start) > time.Second {
				break
			}
		}
	}
	var te *stun.TurnError
	switch {
	case err == nil:
		c.silent = 0
		return nil
	case errors.As(err, &te) && (te.ErrorCodeAttr.Code == stun.CodeAllocMismatch || te.ErrorCodeAttr.Code == stun.CodeUnauthorized):
		return c.markLost(fmt.Errorf("the server no longer knows it (%d %s)", te.ErrorCodeAttr.Code, te.ErrorCodeAttr.Reason))
	case errors.As(err, &te):
		c.silent = 0 // the server answered for this allocation: it exists
		return nil
	}
	c.silent++
	if c.silent >= checkFailures {
		return c.markLost(fmt.Errorf("%d checks in a row failed, the last with: %w", c.silent, err))
	}
	return nil
}

func cmpTransport(t Transport) Transport {
	if t == "" {
		return UDP
	}
	return t
}

// RelayedAddr is the allocation's relayed transport address, the address peers send
// to.
func (c *Conn) RelayedAddr() net.Addr { return c.PacketConn.LocalAddr() }

// Close deletes the allocation and closes the connection to the server.
func (c *Conn) Close() error {
	c.once.Do(func() {
		close(c.stop)
		c.PacketConn.Close()
		c.client.Close()
		c.base.Close()
		c.wg.Wait()
	})
	return nil
}

// slogFactory routes the TURN client's log to a slog.Logger; nil means quiet.
type slogFactory struct{ l *slog.Logger }

func (f slogFactory) NewLogger(scope string) logging.LeveledLogger {
	l := f.l
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	return slogLeveled{l.With("scope", scope)}
}

type slogLeveled struct{ l *slog.Logger }

func (s slogLeveled) Trace(msg string)                  {}
func (s slogLeveled) Tracef(format string, args ...any) {}
func (s slogLeveled) Debug(msg string)                  { s.l.Debug(msg) }
func (s slogLeveled) Debugf(format string, args ...any) { s.l.Debug(fmt.Sprintf(format, args...)) }
func (s slogLeveled) Info(msg string)                   { s.l.Info(msg) }
func (s slogLeveled) Infof(format string, args ...any)  { s.l.Info(fmt.Sprintf(format, args...)) }
func (s slogLeveled) Warn(msg string)                   { s.l.Warn(msg) }
func (s slogLeveled) Warnf(format string, args ...any)  { s.l.Warn(fmt.Sprintf(format, args...)) }
func (s slogLeveled) Error(msg string)                  { s.l.Error(msg) }
func (s slogLeveled) Errorf(format string, args ...any) { s.l.Error(fmt.Sprintf(format, args...)) }
