package punch_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/mux"
	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/punch"
	"peerlink/stun"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	stunIP1 = netip.MustParseAddr("203.0.113.10")
	stunIP2 = netip.MustParseAddr("203.0.113.11")
	obsIP   = netip.MustParseAddr("203.0.113.20")
	natIPA  = netip.MustParseAddr("198.51.100.1")
	natIPB  = netip.MustParseAddr("198.51.100.2")
	hostIPA = netip.MustParseAddr("10.0.1.2")
	hostIPB = netip.MustParseAddr("10.0.2.2")
)

// fast is the engine configuration of the emulator tests: the emulator has no latency,
// so pacing, retransmissions and acks run 10 to 250 times faster than the defaults a real
// network gets; birthday probing's 1,024 probes then take milliseconds, not 3 s. Attempts
// keep the default timeout: under the race detector on a loaded machine, timers fire late.
var fast = punch.Config{
	CheckInterval: 5 * time.Millisecond,
	Pace:          20 * time.Microsecond,
	AckSpacing:    200 * time.Microsecond,
	ProbeInterval: 20 * time.Microsecond,
}

// world is an emulated internet with an RFC 5780 STUN server (two IPs) and a single-IP
// observer, to which peers behind NATs are added.
type world struct {
	net      *natlab.Network
	stun     netip.AddrPort
	stop     []func()
	observer netip.AddrPort
}

func newWorld(seed uint64) (*world, error) {
	n := natlab.New(natlab.Config{Seed: seed})
	w := &world{net: n, stun: netip.AddrPortFrom(stunIP1, 3478), observer: netip.AddrPortFrom(obsIP, 3478)}
	w.stop = append(w.stop, func() { n.Close() })
	start := func(h *natlab.Host, cfg stun.Config) error {
		cfg.Net = h
		s, err := stun.Listen(context.Background(), cfg)
		if err != nil {
			return err
		}
		done := make(chan error, 1)
		go func() { done <- s.Serve(context.Background()) }()
		w.stop = append(w.stop, func() { s.Close(); <-done })
		return nil
	}
	if err := start(n.AddPublicHost("stun", stunIP1, stunIP2), stun.Config{Listen: w.stun.String(), AltIP: stunIP2, AltPort: 3479}); err != nil {
		w.close()
		return nil, err
	}
	if err := start(n.AddPublicHost("observer", obsIP), stun.Config{Listen: w.observer.String()}); err != nil {
		w.close()
		return nil, err
	}
	return w, nil
}

// close tears down in reverse order of creation.
func (w *world) close() {
	for i := len(w.stop) - 1; i >= 0; i-- {
		w.stop[i]()
	}
}

// peer is a node behind its own NAT with its main socket and engine.
type peer struct {
	name    string
	nat     *natlab.NAT
	host    *natlab.Host
	eng     *punch.Engine
	main    *mux.Mux
	profile nat.Profile
	hostAP  netip.AddrPort // host candidate
	refl    netip.AddrPort // server-reflexive candidate
}

type peerOpts struct {
	typ    nat.Type
	delta  int
	natIP  netip.Addr
	hostIP netip.Addr
	cfg    punch.Config
	uplink natlab.Link
	wrap   func(net.PacketConn) net.PacketConn // wraps the main socket, if set
}

// addPeer builds the NAT and host, opens the main socket and learns its reflexive
// address, as the connector's gathering would. Its profile is the configured type.
func (w *world) addPeer(ctx context.Context, name string, o peerOpts) (*peer, error) {
	r := w.net.AddNAT(natlab.NATConfig{Name: "nat-" + name, Type: o.typ, PublicIP: o.natIP, Delta: o.delta, Uplink: o.uplink})
	h := r.AddHost(name, o.hostIP)
	cfg := o.cfg
	cfg.Net, cfg.STUNServer = h, w.stun
	p := &peer{name: name, nat: r, host: h, eng: punch.New(cfg)}
	conn, err := h.ListenPacket(ctx, "udp4", ":0")
	if err != nil {
		return nil, err
	}
	if o.wrap != nil {
		conn = o.wrap(conn)
	}
	p.main = p.eng.NewMux(conn, mux.Config{})
	w.stop = append(w.stop, func() { p.eng.Close(); p.main.Close() })
	p.refl, err = p.main.Binding(ctx, w.stun, 20*time.Millisecond)
	if err != nil {
		return nil, fmt.Errorf("%s: gathering: %w", name, err)
	}
	p.hostAP = netip.AddrPortFrom(o.hostIP, p.main.LocalAddr().Port())
	p.profile = nat.Profile{
		Mapping: o.typ.Mapping, Filtering: o.typ.Filtering, Allocation: o.typ.Allocation,
		PublicIP: o.natIP, PublicPort: p.refl.Port(),
	}
	if o.typ.Allocation == nat.AllocationPC {
		p.profile.PortDelta = o.delta
	}
	return p, nil
}

func newSession() (string, []byte) {
	b := make([]byte, 8+16)
	rand.Read(b)
	return hex.EncodeToString(b[:8]), b[8:]
}

// outcome is one run of a pair.
type outcome struct {
	step       nat.Step
	resA, resB punch.Result
	errA, errB error
	elapsed    time.Duration // from the start until both sides had their result
	dataErr    error         // the path did not carry data both ways
}

func (o outcome) ok() bool { return o.errA == nil && o.errB == nil && o.dataErr == nil }

func (o outcome) err() error {
	return errors.Join(o.errA, o.errB, o.dataErr)
}

type runOpts struct {
	keyB    []byte // B's key when it differs from A's
	timeout time.Duration
	tries   int
	copies  int // data packets sent each way, for lossy links
}

// runPair runs one attempt of step between a (initiator) and b, exchanging their
// predictions in-process as signaling would, and checks that the path found carries data
// both ways.
func runPair(ctx context.Context, a, b *peer, step nat.Step, o runOpts) (outcome, error) {
	out := outcome{step: step}
	session, key := newSession()
	keyB := key
	if o.keyB != nil {
		keyB = o.keyB
	}
	atA, predA, err := a.eng.Prepare(ctx, punch.Setup{Session: session, Key: key, Step: step, Self: nat.SideA, Local: a.profile, Remote: b.profile, Main: a.main})
	if err != nil {
		return out, fmt.Errorf("prepare a: %w", err)
	}
	defer atA.Close()
	atB, predB, err := b.eng.Prepare(ctx, punch.Setup{Session: session, Key: keyB, Step: step, Self: nat.SideB, Local: b.profile, Remote: a.profile, Main: b.main})
	if err != nil {
		return out, fmt.Errorf("prepare b: %w", err)
	}
	defer atB.Close()
	params := func(remote *peer, pred punch.Prediction, start time.Time) punch.Params {
		return punch.Params{
			RemoteHost: []netip.AddrPort{remote.hostAP}, RemoteReflexive: []netip.AddrPort{remote.refl},
			RemotePrediction: pred, Start: start, Timeout: o.timeout, MaxAttempts: o.tries,
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		out.resA, out.errA = atA.Run(ctx, params(b, predB, start))
	}()
	go func() {
		defer wg.Done()
		out.resB, out.errB = atB.Run(ctx, params(a, predA, start))
	}()
	wg.Wait()
	out.elapsed = time.Since(start)
	if out.errA == nil && out.errB == nil {
		out.dataErr = errors.Join(sendData(out.resA, out.resB, "a→b", o.copies), sendData(out.resB, out.resA, "b→a", o.copies))
	}
	// The sockets the attempts handed over are ours now.
	for _, r := range []punch.Result{out.resA, out.resB} {
		if r.Local != nil && r.Local != a.main && r.Local != b.main {
			defer r.Local.Close()
		}
	}
	return out, nil
}

// sendData sends a data packet (not STUN) along from's path and reads it on to's socket.
func sendData(from, to punch.Result, text string, copies int) error {
	for range max(copies, 1) {
		if err := from.Local.WriteTo([]byte(text), from.Remote); err != nil {
			return fmt.Errorf("data %s: %w", text, err)
		}
	}
	d := to.Local.Data()
	d.SetReadDeadline(time.Now().Add(time.Second))
	defer d.SetReadDeadline(time.Time{})
	buf := make([]byte, 64)
	n, _, err := d.ReadFrom(buf)
	if err != nil {
		return fmt.Errorf("data %s: sent from %v to %v, nothing read on %v: %w", text, from.Local.LocalAddr(), from.Remote, to.Local.LocalAddr(), err)
	}
	if !bytes.Equal(buf[:n], []byte(text)) {
		return fmt.Errorf("data %s: read %q", text, buf[:n])
	}
	return nil
}

// recordingConn notes when each packet was sent and where.
type recordingConn struct {
	net.PacketConn
	mu   sync.Mutex
	sent []sentPacket
}

type sentPacket struct {
	at  time.Time
	dst netip.AddrPort
}

func (c *recordingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c.mu.Lock()
	c.sent = append(c.sent, sentPacket{time.Now(), addr.(*net.UDPAddr).AddrPort()})
	c.mu.Unlock()
	return c.PacketConn.WriteTo(b, addr)
}

func (c *recordingConn) packets() []sentPacket {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]sentPacket(nil), c.sent...)
}
