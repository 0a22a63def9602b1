package signal

import (
	"cmp"
	"context"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/nat"
	"peerlink/party"
	"peerlink/relayreg"
)

// Options configures a Client. The zero value is ready to use.
type Options struct {
	// TLSConfig is used for wss:// URLs; nil means the system's roots.
	TLSConfig *tls.Config
	// MaxSkew is how far a received message's timestamp may be from the local clock;
	// zero means 60 s.
	MaxSkew time.Duration
	// RecvQueue is how many verified messages wait for Recv; when it is full, new
	// messages are dropped and counted (Stats). Zero means 256.
	RecvQueue int
	// ReplayEntries bounds the replay guard; zero means 100,000.
	ReplayEntries int
	// MaxFrame is the largest frame accepted from the server; zero means 1 MiB.
	MaxFrame int
	// PingInterval is how often the client pings the server to notice a dead
	// connection; zero means 30 s, negative disables pings.
	PingInterval time.Duration
	// WriteTimeout bounds one write; zero means 10 s.
	WriteTimeout time.Duration
	// Logger receives rejected messages and connection events; nil means quiet.
	Logger *slog.Logger
	// Clock is the time source; nil means the real clock.
	Clock clock.Clock
	// DialContext opens the TCP connection to the server, or to the proxy when one is
	// used; nil means the host's network. A kernel-lab host's DialContext reaches
	// servers inside the lab.
	DialContext func(ctx context.Context, network, address string) (net.Conn, error)
	// Proxy picks the HTTP proxy to reach the server through, given a request for the
	// server's URL as http:// (for ws) or https:// (for wss). nil means
	// EnvironmentProxy (http.ProxyFromEnvironment: HTTPS_PROXY, HTTP_PROXY and
	// NO_PROXY; never for loopback servers). DirectOnly never uses one. Both ws and wss
	// tunnel through the proxy with HTTP CONNECT; user info in the proxy's URL is sent
	// as Basic proxy authentication. Only http:// proxies are supported.
	Proxy func(*http.Request) (*url.URL, error)

	// RelayBacklog is how many relay sessions opened to this node may wait for
	// AcceptRelay; more are refused. Zero means 16.
	RelayBacklog int
	// RelayRecvQueue is how many datagrams may wait for each relay session's reader;
	// more are dropped and counted. Zero means 1024.
	RelayRecvQueue int
	// RelaySendQueue bounds the bytes of datagrams waiting to be written to the server,
	// all sessions together; more are dropped and counted. Zero means 512 KiB.
	RelaySendQueue int
	// RelayFilter decides whether to offer an incoming relay session to AcceptRelay
	// (true) or refuse it at once; nil offers every one.
	RelayFilter func(from identity.NodeID, tag string) bool
}

// ClientStats are a client's counters.
type ClientStats struct {
	Received uint64 // verified messages queued for Recv
	Rejected uint64 // messages that failed verification or replay checks
	Dropped  uint64 // verified messages dropped because the Recv queue was full
}

// Client is a connection to a rendezvous server, authenticated as one identity. It is
// safe for concurrent use. It does not reconnect: when Done is closed, Dial again.
type Client struct {
	id     *identity.Identity
	opts   Options
	clock  clock.Clock
	log    *slog.Logger
	ws     *websocket.Conn
	replay *ReplayGuard
	in     chan *Message

	nextID  atomic.Uint64
	mu      sync.Mutex
	pending map[uint64]chan Frame
	err     error

	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup

	nReceived, nRejected, nDropped atomic.Uint64

	maxFrame int // the server's frame limit, from its challenge
	rl       clientRelay
}

// Dial connects to the rendezvous server at rawURL (ws://, wss://, http:// or https://)
// and authenticates as id.
func Dial(ctx context.Context, rawURL string, id *identity.Identity, opts *Options) (*Client, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	o.MaxSkew = cmp.Or(o.MaxSkew, 60*time.Second)
	o.RecvQueue = cmp.Or(o.RecvQueue, 256)
	o.MaxFrame = cmp.Or(o.MaxFrame, 1<<20)
	o.PingInterval = cmp.Or(o.PingInterval, 30*time.Second)
	o.WriteTimeout = cmp.Or(o.WriteTimeout, 10*time.Second)
	o.RelayBacklog = cmp.Or(o.RelayBacklog, 16)
	o.RelayRecvQueue = cmp.Or(o.RelayRecvQueue, 1024)
	o.RelaySendQueue = cmp.Or(o.RelaySendQueue, 512<<10)
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("signal: %w", err)
	}
	switch u.Scheme {
	case "ws", "http":
		u.Scheme = "ws"
	case "wss", "https":
		u.Scheme = "wss"
	default:
		return nil, fmt.Errorf("signal: URL %q: scheme must be ws, wss, http or https", rawURL)
	}
	dial := o.DialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	proxy, err := proxyFor(&o, u)
	if err != nil {
		return nil, err
	}
	if proxy != nil {
		direct := dial
		dial = func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dialConnect(ctx, direct, proxy, addr)
		}
	}
	// The transport's own proxy support is off: for ws:// it would forward a plain
	// request instead of tunnelling, which proxies do not reliably upgrade.
	dopts := &websocket.DialOptions{
		Subprotocols: []string{Subprotocol},
		HTTPClient:   &http.Client{Transport: &http.Transport{TLSClientConfig: o.TLSConfig, DialContext: dial}},
	}
	ws, _, err := websocket.Dial(ctx, u.String(), dopts)
	if err != nil {
		return nil, fmt.Errorf("signal: dial %s: %w", u.Redacted(), err)
	}
	ws.SetReadLimit(int64(o.MaxFrame))
	c := &Client{
		id:      id,
		opts:    o,
		clock:   clock.Or(o.Clock),
		log:     o.Logger,
		ws:      ws,
		replay:  NewReplayGuard(o.MaxSkew, o.ReplayEntries),
		in:      make(chan *Message, o.RecvQueue),
		pending: make(map[uint64]chan Frame),
		done:    make(chan struct{}),
	}
	c.rl.incoming = make(chan *RelayConn, o.RelayBacklog)
	c.rl.wake = make(chan struct{}, 1)
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if err := c.handshake(ctx, u.Host); err != nil {
		ws.CloseNow()
		return nil, err
	}
	c.wg.Go(c.readLoop)
	c.wg.Go(c.relayWriteLoop)
	if o.PingInterval > 0 {
		c.wg.Go(c.pingLoop)
	}
	return c, nil
}

// handshake answers the server's challenge. Reads here use ctx, so a cancelled Dial
// closes the connection, which is what Dial wants.
func (c *Client) handshake(ctx context.Context, host string) error {
	f, err := c.readFrame(ctx)
	if err != nil {
		return err
	}
	if f.Type != TypeChallenge {
		return fmt.Errorf("signal: server sent %s before its challenge", f.Type)
	}
	var ch challengeBody
	if err := json.Unmarshal(f.Body, &ch); err != nil || ch.Nonce == "" {
		return fmt.Errorf("signal: bad challenge from server")
	}
	c.maxFrame = ch.MaxFrame
	if c.maxFrame < RelayHeaderLen+MaxRelayPayload {
		c.maxFrame = RelayHeaderLen + MaxRelayPayload
	}
	node := c.id.NodeID()
	sig := c.id.Sign(AuthSigningInput(host, ch.Nonce, node))
	auth, err := marshalFrame(1, TypeAuth, authBody{NodeID: node.String(), Host: host, Signature: hex.EncodeToString(sig)})
	if err != nil {
		return err
	}
	if err := c.ws.Write(ctx, websocket.MessageText, auth); err != nil {
		return fmt.Errorf("signal: auth: %w", err)
	}
	f, err = c.readFrame(ctx)
	if err != nil {
		return err
	}
	switch f.Type {
	case TypeWelcome:
		c.nextID.Store(1)
		return nil
	case TypeError:
		return decodeError(f.Body)
	}
	return fmt.Errorf("signal: server answered auth with %s", f.Type)
}

func (c *Client) readFrame(ctx context.Context) (Frame, error) {
	typ, data, err := c.ws.Read(ctx)
	if err != nil {
		return Frame{}, connError(err)
	}
	if typ != websocket.MessageText {
		return Frame{}, errors.New("signal: server sent a binary frame")
	}
	return ParseFrame(data)
}

// connError turns a WebSocket read error into the reason the connection ended: the
// server's error code when it closed with one.
func connError(err error) error {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		switch {
		case ce.Code == websocket.StatusMessageTooBig:
			return &Error{Code: CodeTooLarge, Message: "server closed the connection: frame too large"}
		case ce.Reason != "":
			return &Error{Code: Code(ce.Reason), Message: fmt.Sprintf("server closed the connection (status %d)", ce.Code)}
		}
		return fmt.Errorf("signal: server closed the connection (status %d)", ce.Code)
	}
	return fmt.Errorf("signal: connection lost: %w", err)
}

func decodeError(body []byte) error {
	var e Error
	if err := json.Unmarshal(body, &e); err != nil || e.Code == "" {
		return &Error{Code: CodeMalformed, Message: "unreadable error from server"}
	}
	return &e
}

func (c *Client) readLoop() {
	for {
		typ, data, err := c.ws.Read(context.Background())
		if err != nil {
			c.shutdown(connError(err))
			return
		}
		if typ == websocket.MessageBinary {
			c.relayData(data)
			continue
		}
		f, err := ParseFrame(data)
		if err != nil {
			c.log.Warn("unreadable frame from server", "err", err)
			continue
		}
		if c.relayFrame(f) {
			continue
		}
		switch {
		case f.Type.Routed():
			c.receive(f)
		case f.ID != 0:
			c.mu.Lock()
			ch := c.pending[f.ID]
			delete(c.pending, f.ID)
			if ch != nil {
				ch <- f // buffered, and under the lock so an abandoning request sees it
			}
			c.mu.Unlock()
			if ch == nil {
				c.abandoned(f)
			}
		case f.Type == TypeError:
			c.log.Warn("error from server", "err", decodeError(f.Body))
		default:
			c.log.Debug("ignoring frame", "type", f.Type)
		}
	}
}

func (c *Client) receive(f Frame) {
	m, err := DecodeMessage(f.Type, f.Body)
	if err == nil {
		now := c.clock.Now()
		err = m.Verify(c.id.NodeID(), now, c.opts.MaxSkew)
		if err == nil {
			err = c.replay.Check(m.From, m.Nonce, now)
		}
	}
	if err != nil {
		c.nRejected.Add(1)
		c.log.Warn("rejected message", "type", f.Type, "err", err)
		return
	}
	select {
	case c.in <- m:
		c.nReceived.Add(1)
	default:
		c.nDropped.Add(1)
		c.log.Warn("receive queue full, message dropped", "type", m.Type, "from", m.From.Short())
	}
}

func (c *Client) pingLoop() {
	t := time.NewTicker(c.opts.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), c.opts.WriteTimeout)
			err := c.ws.Ping(ctx)
			cancel()
			if err != nil {
				c.ws.CloseNow()
				return
			}
		}
	}
}

func (c *Client) shutdown(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.closeOnce.Do(func() { close(c.done) })
}

// Done is closed when the connection has ended; Err says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended (ErrClosed after Close; the server's error code
// as an *Error when it closed the connection with one), or nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the connection and waits for the client's goroutines. It is idempotent.
func (c *Client) Close() error {
	c.shutdown(ErrClosed)
	c.ws.Close(websocket.StatusNormalClosure, "")
	c.wg.Wait()
	return nil
}

// NodeID returns the client's node ID.
func (c *Client) NodeID() identity.NodeID { return c.id.NodeID() }

// Stats returns the client's counters.
func (c *Client) Stats() ClientStats {
	return ClientStats{Received: c.nReceived.Load(), Rejected: c.nRejected.Load(), Dropped: c.nDropped.Load()}
}

// roundTrip sends a frame built for a fresh request id and waits for its answer. An
// error answer is returned as an *Error.
func (c *Client) roundTrip(ctx context.Context, build func(id uint64) ([]byte, error)) (Frame, error) {
	id := c.nextID.Add(1)
	frame, err := build(id)
	if err != nil {
		return Frame{}, err
	}
	ch := make(chan Frame, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return Frame{}, err
	}
	c.pending[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		var late *Frame
		select {
		case f := <-ch: // answered as the request was given up
			late = &f
		default:
		}
		c.mu.Unlock()
		if late != nil {
			c.abandoned(*late)
		}
	}()
	// Not ctx: a write cut short by a cancelled context closes the whole connection.
	wctx, cancel := context.WithTimeout(context.Background(), c.opts.WriteTimeout)
	err = c.ws.Write(wctx, websocket.MessageText, frame)
	cancel()
	if err != nil {
		c.ws.CloseNow()
		return Frame{}, fmt.Errorf("signal: write: %w", err)
	}
	select {
	case f := <-ch:
		if f.Type == TypeError {
			return f, decodeError(f.Body)
		}
		return f, nil
	case <-c.done:
		return Frame{}, c.Err()
	case <-ctx.Done():
		return Frame{}, ctx.Err()
	}
}

func (c *Client) request(ctx context.Context, t Type, body any, want Type) (Frame, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return Frame{}, err
	}
	f, err := c.roundTrip(ctx, func(id uint64) ([]byte, error) { return AppendFrame(nil, id, t, b), nil })
	if err != nil {
		return f, err
	}
	if f.Type != want {
		return f, fmt.Errorf("signal: server answered %s with %s", t, f.Type)
	}
	return f, nil
}

// Send signs m as this client (filling From, and Time and Nonce when empty) and sends
// it. It returns when the server has delivered it to the target's connection, or with
// ErrPeerOffline at once when the target is not connected.
func (c *Client) Send(ctx context.Context, m *Message) error {
	if err := m.Sign(c.id, c.clock.Now()); err != nil {
		return err
	}
	return c.SendSigned(ctx, m)
}

// SendSigned sends a message signed earlier (see Message.Sign), as Send does.
func (c *Client) SendSigned(ctx context.Context, m *Message) error {
	_, err := c.roundTrip(ctx, func(id uint64) ([]byte, error) { return m.AppendFrame(nil, id) })
	return err
}

// Recv returns the next verified message addressed to this node.
func (c *Client) Recv(ctx context.Context) (*Message, error) {
	select {
	case m := <-c.in:
		return m, nil
	default:
	}
	select {
	case m := <-c.in:
		return m, nil
	case <-c.done:
		return nil, c.Err()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Publish signs and stores this node's connection information on the server, where
// Lookup finds it until the server's profile TTL passes.
func (c *Client) Publish(ctx context.Context, info ConnectionInfo) error {
	m := &Message{Type: TypePublish, Info: &info}
	if err := m.Sign(c.id, c.clock.Now()); err != nil {
		return err
	}
	_, err := c.roundTrip(ctx, func(id uint64) ([]byte, error) { return m.AppendFrame(nil, id) })
	return err
}

// Lookup returns what the server knows about node: presence, and its published
// connection information with the node's signature checked, so the server cannot have
// altered it. It fails with ErrNotFound for a node the server never saw.
func (c *Client) Lookup(ctx context.Context, node identity.NodeID) (*Peer, error) {
	f, err := c.request(ctx, TypeLookup, lookupBody{NodeID: node.String()}, TypePeer)
	if err != nil {
		return nil, err
	}
	var pb peerBody
	if err := json.Unmarshal(f.Body, &pb); err != nil {
		return nil, errorf(CodeMalformed, "peer: %v", err)
	}
	p := &Peer{NodeID: node, Online: pb.Online}
	if pb.LastSeen > 0 {
		p.LastSeen = time.UnixMilli(pb.LastSeen)
	}
	if len(pb.Published) > 0 {
		m, err := DecodeMessage(TypePublish, pb.Published)
		if err != nil {
			return nil, err
		}
		if m.From != node {
			return nil, errorf(CodeSpoofed, "server returned %s's record for %s", m.From.Short(), node.Short())
		}
		if err := m.verifySignature(); err != nil {
			return nil, err
		}
		p.Info, p.Published = m.Info, m.Time
	}
	return p, nil
}

// FetchProfile returns node's published NAT profile (ErrNotFound when it has none),
// which makes a Client a natcache.Fetcher.
func (c *Client) FetchProfile(ctx context.Context, node identity.NodeID) (nat.Profile, error) {
	p, err := c.Lookup(ctx, node)
	if err != nil {
		return nat.Profile{}, err
	}
	if p.Info == nil || p.Info.Profile == nil {
		return nat.Profile{}, errorf(CodeNotFound, "%s has published no NAT profile", node.Short())
	}
	return *p.Info.Profile, nil
}

// TURNCredentials asks the server for short-lived TURN credentials (ErrTURNUnavailable
// when it has no TURN secret).
func (c *Client) TURNCredentials(ctx context.Context) (TURNCredentials, error) {
	f, err := c.request(ctx, TypeTURN, struct{}{}, TypeTURNCredentials)
	if err != nil {
		return TURNCredentials{}, err
	}
	var cred TURNCredentials
	if err := json.Unmarshal(f.Body, &cred); err != nil {
		return TURNCredentials{}, errorf(CodeMalformed, "turnCredentials: %v", err)
	}
	return cred, nil
}

// RegisterRelay registers (or heartbeats) this node as a relay; info.NodeID is ignored,
// the server uses the connection's node. It makes a Client a relayreg.Announcer.
func (c *Client) RegisterRelay(ctx context.Context, info relayreg.Info) error {
	_, err := c.request(ctx, TypeRelayRegister, relayRegisterBody{Endpoints: info.Endpoints, Capacity: info.Capacity, Load: info.Load}, TypeOK)
	return err
}

// ListRelays returns the registered relays, which makes a Client a relayreg.Source.
func (c *Client) ListRelays(ctx context.Context) ([]relayreg.Info, error) {
	f, err := c.request(ctx, TypeRelayList, struct{}{}, TypeRelays)
	if err != nil {
		return nil, err
	}
	var r relaysBody
	if err := json.Unmarshal(f.Body, &r); err != nil {
		return nil, errorf(CodeMalformed, "relays: %v", err)
	}
	return r.Relays, nil
}

// CreateParty creates party name with this node as its owner and first member
// (party.ErrPartyExists when the name is taken, party.ErrBadName for a bad name).
func (c *Client) CreateParty(ctx context.Context, name string) (*party.Party, error) {
	return c.partyRequest(ctx, TypePartyCreate, partyNameBody{Name: name})
}

// JoinParty joins the party an invite token (party.NewInvite) is for. The server checks
// the invite's signature and expiry (party.ErrInviteForged, party.ErrInviteExpired) and
// that its inviter is still a member.
func (c *Client) JoinParty(ctx context.Context, token string) (*party.Party, error) {
	return c.partyRequest(ctx, TypePartyJoin, partyJoinBody{Invite: token})
}

// LeaveParty leaves party name. An owner leaving hands the party to the member who
// joined first; the last member leaving deletes it.
func (c *Client) LeaveParty(ctx context.Context, name string) error {
	_, err := c.request(ctx, TypePartyLeave, partyNameBody{Name: name}, TypeOK)
	return err
}

// KickFromParty removes node from party name; only the owner may (party.ErrNotOwner).
func (c *Client) KickFromParty(ctx context.Context, name string, node identity.NodeID) error {
	_, err := c.request(ctx, TypePartyKick, partyKickBody{Name: name, NodeID: node.String()}, TypeOK)
	return err
}

// Party returns party name with its members' Online and LastSeen; only members may ask
// (party.ErrNotMember).
func (c *Client) Party(ctx context.Context, name string) (*party.Party, error) {
	return c.partyRequest(ctx, TypePartyGet, partyNameBody{Name: name})
}

// Parties returns the names of this node's parties, sorted.
func (c *Client) Parties(ctx context.Context) ([]string, error) {
	f, err := c.request(ctx, TypePartyList, struct{}{}, TypeParties)
	if err != nil {
		return nil, err
	}
	return decodeParties(f.Body)
}

func (c *Client) partyRequest(ctx context.Context, t Type, body any) (*party.Party, error) {
	f, err := c.request(ctx, t, body, TypeParty)
	if err != nil {
		return nil, err
	}
	return decodeParty(f.Body)
}

// decodeParty decodes and checks a party body from the server.
func decodeParty(b []byte) (*party.Party, error) {
	p := new(party.Party)
	if err := json.Unmarshal(b, p); err != nil {
		return nil, errorf(CodeMalformed, "party: %v", err)
	}
	if err := p.Validate(); err != nil {
		return nil, errorf(CodeMalformed, "party from server: %v", err)
	}
	return p, nil
}

// decodeParties decodes a parties body from the server.
func decodeParties(b []byte) ([]string, error) {
	var pb partiesBody
	if err := json.Unmarshal(b, &pb); err != nil {
		return nil, errorf(CodeMalformed, "parties: %v", err)
	}
	for _, n := range pb.Names {
		if err := party.ValidName(n); err != nil {
			return nil, errorf(CodeMalformed, "parties: %v", err)
		}
	}
	return pb.Names, nil
}
