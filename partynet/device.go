// Package partynet runs a party's virtual LAN on a node: a TUN interface with the
// member's virtual addresses and a userspace WireGuard device whose packets travel
// over peerlink connections to the other members.
package partynet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/party"
	"peerlink/signal"
)

// Errors that say what to do about them.
var (
	// ErrTUNPermission: the process may not create a TUN device.
	ErrTUNPermission = errors.New("partynet: no permission to create a TUN device (run as root, or give the binary CAP_NET_ADMIN: setcap cap_net_admin+ep; /dev/net/tun must exist)")
	// ErrAddressConflict: the party's subnet overlaps a route or address the host
	// already has on another interface.
	ErrAddressConflict = errors.New("partynet: the party's addresses conflict with the host's routes")
	// ErrNotMember: this node is not (or no longer) a member of the party.
	ErrNotMember = errors.New("partynet: this node is not a member of the party")
	// errNoIPv6: the host has IPv6 disabled; the interface runs IPv4 only.
	errNoIPv6 = errors.New("partynet: IPv6 disabled on this host")
	// ErrClosed: the device was closed.
	ErrClosed = errors.New("partynet: device closed")
)

// Directory is where the device learns the party's members and their published
// information: the node's rendezvous connection (*signal.Client).
type Directory interface {
	Party(ctx context.Context, name string) (*party.Party, error)
	Lookup(ctx context.Context, node identity.NodeID) (*signal.Peer, error)
}

// Config configures a party device. Party, Node and Directory are required.
type Config struct {
	// Party is the party's name; the node must be a member.
	Party string
	// Node carries the connections to the other members. The device sets the node's
	// WireGuard public key (connect.Node.SetWGPublicKey) and dials members; members'
	// incoming connections reach it through Device.Accept.
	Node *connect.Node
	// Directory answers the party's membership; it is asked every Poll.
	Directory Directory
	// Interface names the TUN interface; empty means "pl-" and the party's name, cut
	// to the kernel's 15 characters.
	Interface string
	// MTU of the interface; zero means 1380, which leaves room for WireGuard, peerlink's
	// framing and a TURN channel header inside a 1500-byte path.
	MTU int
	// Forward says which broadcasts and multicasts reach every member; the zero value
	// forwards broadcasts and the common discovery groups.
	Forward Forward
	// Poll is how often the member list is fetched again; zero means 5 s.
	Poll time.Duration
	// Connect tunes the connections the device dials; the zero value is connect's
	// defaults.
	Connect connect.Options
	// Logger receives progress; nil means quiet.
	Logger *slog.Logger
}

const (
	defaultMTU   = 1380
	defaultPoll  = 5 * time.Second
	probeEvery   = 2 * time.Second
	redialMin    = time.Second
	redialMax    = 30 * time.Second
	maxIfNameLen = 15
)

// member is what the device knows of one other member.
type member struct {
	m       party.Member
	key     string // WireGuard public key (hex), once a connection told it
	conn    *connect.Conn
	dialing bool
	nextTry time.Time
	backoff time.Duration

	rtt      time.Duration // smoothed probe round trip; zero before the first pong
	lastPong time.Time
}

// Device is one member's side of a party's virtual LAN.
type Device struct {
	cfg    Config
	log    *slog.Logger
	self   identity.NodeID
	name   string
	tun    *forwardingTUN
	wg     *device.Device
	bind   *bind
	wgPub  string
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	group  sync.WaitGroup

	mu      sync.Mutex
	party   *party.Party
	me      party.Member
	members map[identity.NodeID]*member
	err     error
	closed  bool
}

// Up joins the node to its party's virtual LAN: it creates the TUN interface, gives
// it the member's addresses, starts WireGuard and connects to the other members. The
// device runs until Close, or until the node is no longer a member (Done, Err).
func Up(ctx context.Context, cfg Config) (*Device, error) {
	if cfg.Node == nil || cfg.Directory == nil || cfg.Party == "" {
		return nil, errors.New("partynet: Config needs Party, Node and Directory")
	}
	if cfg.MTU <= 0 {
		cfg.MTU = defaultMTU
	}
	if cfg.Poll <= 0 {
		cfg.Poll = defaultPoll
	}
	name := cfg.Interface
	if name == "" {
		name = InterfaceName(cfg.Party)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p, err := cfg.Directory.Party(ctx, cfg.Party)
	if err != nil {
		return nil, fmt.Errorf("partynet: fetching party %q: %w", cfg.Party, err)
	}
	self := cfg.Node.NodeID()
	me, ok := p.Member(self)
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrNotMember, cfg.Party)
	}
	if err := checkConflicts(name, p.Prefix4, p.Prefix6); err != nil {
		return nil, err
	}
	var priv [32]byte
	rand.Read(priv[:])
	priv[0] &= 248
	priv[31] = (priv[31] & 127) | 64
	pub, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		return nil, err
	}
	tdev, err := tun.CreateTUN(name, cfg.MTU)
	if err != nil {
		if isPermission(err) {
			return nil, fmt.Errorf("%w: %v", ErrTUNPermission, err)
		}
		return nil, fmt.Errorf("partynet: creating TUN interface %s: %w", name, err)
	}
	if real, err := tdev.Name(); err == nil {
		name = real
	}
	d := &Device{
		cfg:     cfg,
		log:     log.With("party", cfg.Party),
		self:    self,
		name:    name,
		bind:    newBind(),
		wgPub:   hex.EncodeToString(pub),
		done:    make(chan struct{}),
		party:   p,
		me:      me,
		members: make(map[identity.NodeID]*member),
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.tun = newForwardingTUN(tdev, cfg.Forward, me.IPv4, p.Prefix4)
	d.bind.probe = d.onProbe
	wlog := d.log.With("component", "wireguard")
	d.wg = device.NewDevice(d.tun, d.bind, &device.Logger{
		Verbosef: func(f string, a ...any) { wlog.Debug(fmt.Sprintf(f, a...)) },
		Errorf:   func(f string, a ...any) { wlog.Warn(fmt.Sprintf(f, a...)) },
	})
	fail := func(err error) (*Device, error) {
		d.cancel()
		d.wg.Close()
		return nil, err
	}
	if err := d.wg.IpcSet("private_key=" + hex.EncodeToString(priv[:]) + "\n"); err != nil {
		return fail(fmt.Errorf("partynet: configuring WireGuard: %w", err))
	}
	if err := d.wg.Up(); err != nil {
		return fail(fmt.Errorf("partynet: starting WireGuard: %w", err))
	}
	if err := configure(name, netip.PrefixFrom(me.IPv4, p.Prefix4.Bits()), netip.PrefixFrom(me.IPv6, p.Prefix6.Bits())); errors.Is(err, errNoIPv6) {
		d.log.Warn("IPv6 is disabled here: the party interface has its IPv4 address only", "ipv6", me.IPv6)
	} else if err != nil {
		return fail(err)
	}
	if err := cfg.Node.SetWGPublicKey(ctx, d.wgPub); err != nil {
		return fail(err)
	}
	d.log.Info("party interface up", "interface", name, "ipv4", me.IPv4, "ipv6", me.IPv6)
	d.update(p)
	d.group.Go(d.run)
	return d, nil
}

// InterfaceName is the default TUN name for a party: "pl-" and the name, cut to fit.
func InterfaceName(partyName string) string {
	n := "pl-" + partyName
	if len(n) > maxIfNameLen {
		n = n[:maxIfNameLen]
	}
	return n
}

func isPermission(err error) bool {
	s := err.Error()
	return strings.Contains(s, "permission denied") || strings.Contains(s, "operation not permitted") || strings.Contains(s, "no such file")
}

// Done is closed when the device stops: after Close, or when the node left the party.
func (d *Device) Done() <-chan struct{} { return d.done }

// Err returns why the device stopped, nil while it runs.
func (d *Device) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// Close removes the interface and ends the members' connections. It is idempotent.
func (d *Device) Close() error {
	d.stop(ErrClosed)
	d.group.Wait()
	return nil
}

func (d *Device) stop(why error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	d.closed = true
	d.err = why
	var conns []*connect.Conn
	for _, m := range d.members {
		if m.conn != nil {
			conns = append(conns, m.conn)
		}
	}
	d.mu.Unlock()
	d.cancel()
	for _, c := range conns {
		c.Close()
	}
	d.wg.Close() // closes the TUN device: the interface goes
	close(d.done)
}

// run polls the member list, dials the members this node dials, and probes
// latency, until the device stops.
func (d *Device) run() {
	poll := time.NewTicker(d.cfg.Poll)
	defer poll.Stop()
	probe := time.NewTicker(probeEvery)
	defer probe.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-poll.C:
			d.fetch()
		case <-probe.C:
			d.sendProbes()
		}
		d.dialDue()
	}
}

func (d *Device) fetch() {
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	p, err := d.cfg.Directory.Party(ctx, d.cfg.Party)
	if err != nil {
		if errors.Is(err, party.ErrNotMember) || errors.Is(err, party.ErrNoParty) {
			d.log.Warn("no longer a member of the party; taking the interface down", "err", err)
			d.stop(fmt.Errorf("%w %q: %v", ErrNotMember, d.cfg.Party, err))
			return
		}
		d.log.Debug("fetching the member list", "err", err)
		return
	}
	d.update(p)
}

// update applies a member list: new members are added, gone ones removed from
// WireGuard and their connections closed.
func (d *Device) update(p *party.Party) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	d.party = p
	var gone []*member
	seen := make(map[identity.NodeID]bool)
	for _, pm := range p.Members {
		if pm.NodeID == d.self {
			d.me = pm
			continue
		}
		seen[pm.NodeID] = true
		m := d.members[pm.NodeID]
		if m == nil {
			m = &member{}
			d.members[pm.NodeID] = m
		}
		m.m = pm
	}
	for id, m := range d.members {
		if !seen[id] {
			gone = append(gone, m)
			delete(d.members, id)
		}
	}
	d.mu.Unlock()
	for _, m := range gone {
		d.log.Info("member left the party", "member", m.m.NodeID.Short())
		if m.key != "" {
			d.wg.IpcSet("public_key=" + m.key + "\nremove=true\n")
		}
		if m.conn != nil {
			m.conn.Close()
		}
	}
	d.updateBroadcastTargets()
}

func (d *Device) updateBroadcastTargets() {
	d.mu.Lock()
	var addrs []netip.Addr
	for _, m := range d.members {
		if m.conn != nil && m.key != "" {
			addrs = append(addrs, m.m.IPv4)
		}
	}
	d.mu.Unlock()
	slices.SortFunc(addrs, netip.Addr.Compare)
	d.tun.setMembers(addrs)
}

// dials reports whether this node is the one that dials peer: the smaller NodeID
// dials, so two members do not both connect at once.
func (d *Device) dials(peer identity.NodeID) bool { return bytes.Compare(d.self[:], peer[:]) < 0 }

// dialDue starts a dial to every member this node dials that is online, has no
// connection and whose back-off has passed.
func (d *Device) dialDue() {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return
	}
	for id, m := range d.members {
		if m.conn != nil || m.dialing || !d.dials(id) || !m.m.Online || now.Before(m.nextTry) {
			continue
		}
		m.dialing = true
		d.group.Go(func() { d.dial(id) })
	}
}

func (d *Device) dial(id identity.NodeID) {
	c, err := d.cfg.Node.Connect(d.ctx, id, d.cfg.Connect)
	d.mu.Lock()
	m := d.members[id]
	if m != nil {
		m.dialing = false
		if err != nil {
			m.backoff = min(max(2*m.backoff, redialMin), redialMax)
			m.nextTry = time.Now().Add(m.backoff)
		}
	}
	d.mu.Unlock()
	if err != nil {
		d.log.Debug("connecting to member", "member", id.Short(), "err", err)
		return
	}
	if m == nil || !d.adopt(c) {
		c.Close()
	}
}

// Accept offers the device a connection a peer started. It takes it (true) when the
// peer is a member of the party, checking the member list again first if the peer is
// not on it yet; otherwise the caller should close it: the rendezvous server should
// not have let a non-member reach this node, and the node checks again on its side.
func (d *Device) Accept(c *connect.Conn) bool {
	if !d.isMember(c.Peer()) {
		d.fetch()
		if !d.isMember(c.Peer()) {
			d.log.Warn("refused a connection from a node that is not a member", "peer", c.Peer().Short())
			return false
		}
	}
	return d.adopt(c)
}

func (d *Device) isMember(id identity.NodeID) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.members[id]
	return ok
}

// adopt makes c the connection to its member: it learns the member's WireGuard key
// from the signed signaling (the connection's offer or answer, or else the member's
// published information), configures the WireGuard peer and starts reading.
func (d *Device) adopt(c *connect.Conn) bool {
	id := c.Peer()
	key := c.PeerInfo().WGPublicKey
	if key == "" {
		ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
		peer, err := d.cfg.Directory.Lookup(ctx, id)
		cancel()
		if err == nil && peer.Info != nil {
			key = peer.Info.WGPublicKey
		}
	}
	if key == "" {
		d.log.Warn("member offers no WireGuard key (it does not run the party's interface)", "member", id.Short())
		return false
	}
	d.mu.Lock()
	m := d.members[id]
	if m == nil || d.closed {
		d.mu.Unlock()
		return false
	}
	old, oldKey := m.conn, m.key
	m.conn, m.key, m.backoff, m.nextTry = c, key, 0, time.Time{}
	m.rtt = 0
	pm := m.m
	d.mu.Unlock()
	if old != nil {
		old.Close()
	}
	var conf strings.Builder
	if oldKey != "" && oldKey != key {
		fmt.Fprintf(&conf, "public_key=%s\nremove=true\n", oldKey)
	}
	fmt.Fprintf(&conf, "public_key=%s\nreplace_allowed_ips=true\nallowed_ip=%s/32\nallowed_ip=%s/128\nendpoint=%s\n",
		key, pm.IPv4, pm.IPv6, id)
	if err := d.wg.IpcSet(conf.String()); err != nil {
		d.log.Warn("configuring WireGuard peer", "member", id.Short(), "err", err)
		d.drop(id, c)
		return false
	}
	d.bind.attach(id, c)
	d.updateBroadcastTargets()
	d.log.Info("member connected", "member", id.Short(), "ipv4", pm.IPv4, "method", c.Method())
	d.group.Go(func() { d.read(id, c) })
	return true
}

// read hands the connection's datagrams to WireGuard until it ends.
func (d *Device) read(id identity.NodeID, c *connect.Conn) {
	for {
		b, err := c.Recv(d.ctx)
		if err != nil {
			break
		}
		d.bind.deliver(id, b)
	}
	d.drop(id, c)
	d.log.Info("member disconnected", "member", id.Short())
}

// drop forgets c as the connection to id (if it still is) so that it is dialled again.
func (d *Device) drop(id identity.NodeID, c *connect.Conn) {
	c.Close()
	d.bind.detach(id, c)
	d.mu.Lock()
	if m := d.members[id]; m != nil && m.conn == c {
		m.conn = nil
		m.backoff = redialMin
		m.nextTry = time.Now().Add(redialMin)
	}
	d.mu.Unlock()
	d.updateBroadcastTargets()
}
