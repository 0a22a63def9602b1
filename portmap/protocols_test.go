package portmap

import (
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"peerlink/clock"
)

var testExternal = netip.MustParseAddr("198.51.100.7")

// unitConfig waits long for answers that come (a loaded CI machine is slow); tests of
// silence set a short Timeout themselves (silentConfig).
func unitConfig(t *testing.T, gw netip.Addr, protos ...Protocol) Config {
	return Config{Gateway: gw, Protocols: protos, Timeout: 5 * time.Second, Lifetime: time.Hour, Logger: testLogger(t)}
}

// silentConfig is unitConfig for a gateway that will not answer.
func silentConfig(t *testing.T, gw netip.Addr, protos ...Protocol) Config {
	c := unitConfig(t, gw, protos...)
	c.Timeout = 400 * time.Millisecond
	return c
}

// wantErr checks err against a sentinel (nil: no error) and, when code is set, the
// ResultError code.
func wantErr(t *testing.T, err, sentinel error, code int) {
	t.Helper()
	if sentinel == nil {
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
		return
	}
	if !errors.Is(err, sentinel) {
		t.Fatalf("error %v, want one wrapping %v", err, sentinel)
	}
	if code != 0 {
		var re *ResultError
		if !errors.As(err, &re) || re.Code != code {
			t.Fatalf("error %v, want result code %d", err, code)
		}
	}
}

func TestNATPMP(t *testing.T) {
	for _, tc := range []struct {
		name     string
		gw       natpmpGateway
		want     error
		code     int
		wantPort uint16
		wantLife time.Duration
	}{
		{name: "success", gw: natpmpGateway{extPort: 40000, lifetime: 600}, wantPort: 40000, wantLife: 600 * time.Second},
		{name: "suggested port kept", gw: natpmpGateway{}, wantPort: 4242, wantLife: time.Hour},
		{name: "not authorized", gw: natpmpGateway{mapResult: natpmpResultRefused}, want: ErrRefused, code: 2},
		{name: "out of resources", gw: natpmpGateway{mapResult: natpmpResultNoRes}, want: ErrRefused, code: 4},
		{name: "network failure", gw: natpmpGateway{addrResult: natpmpResultNetFail}, want: ErrRefused, code: 3},
		{name: "unsupported version", gw: natpmpGateway{addrResult: natpmpResultBadVer}, want: ErrNotSupported, code: 1},
		{name: "unsupported opcode", gw: natpmpGateway{mapResult: natpmpResultBadOpcode}, want: ErrNotSupported, code: 5},
		{name: "silent", gw: natpmpGateway{silent: true}, want: ErrNotSupported},
		{name: "garbage", gw: natpmpGateway{garbage: []byte{0, 128, 0}}, want: ErrMalformed},
		{name: "wrong version", gw: natpmpGateway{garbage: []byte{7, 128, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4}}, want: ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gw := newGatewayAddr(t)
			tc.gw.external = testExternal
			srv := startUDP(t, netip.AddrPortFrom(gw, natpmpPort), tc.gw.handle)
			cfg := unitConfig(t, gw, NATPMP)
			if tc.gw.silent {
				cfg = silentConfig(t, gw, NATPMP)
			}
			m, err := Map(context.Background(), cfg, 4242)
			wantErr(t, err, tc.want, tc.code)
			if err != nil {
				return
			}
			if got, want := m.External(), netip.AddrPortFrom(testExternal, tc.wantPort); got != want {
				t.Errorf("External() = %v, want %v", got, want)
			}
			if m.Protocol() != NATPMP || m.Gateway() != gw || m.InternalPort() != 4242 {
				t.Errorf("mapping %v via %v for %d", m.Protocol(), m.Gateway(), m.InternalPort())
			}
			if left := time.Until(m.Expires()); left < tc.wantLife-time.Minute || left > tc.wantLife {
				t.Errorf("expires in %v, want about %v", left, tc.wantLife)
			}
			if err := m.Close(); err != nil {
				t.Fatal(err)
			}
			reqs := srv.requests()
			last := reqs[len(reqs)-1]
			if len(last) != 12 || last[1] != natpmpOpMapUDP || binary.BigEndian.Uint16(last[4:6]) != 4242 ||
				binary.BigEndian.Uint16(last[6:8]) != 0 || binary.BigEndian.Uint32(last[8:12]) != 0 {
				t.Errorf("Close sent %x, want a UDP delete (lifetime 0, suggested port 0) for 4242", last)
			}
		})
	}
}

func TestPCP(t *testing.T) {
	for _, tc := range []struct {
		name string
		gw   pcpGateway
		want error
		code int
	}{
		{name: "success", gw: pcpGateway{extPort: 50000}},
		{name: "answer for another nonce ignored", gw: pcpGateway{extPort: 50000, wrongOnce: true}},
		{name: "not authorized", gw: pcpGateway{result: 2}, want: ErrRefused, code: 2},
		{name: "no resources", gw: pcpGateway{result: 8}, want: ErrRefused, code: 8},
		{name: "cannot provide external", gw: pcpGateway{result: 11}, want: ErrRefused, code: 11},
		{name: "unsupported opcode", gw: pcpGateway{result: pcpUnsuppOpcode}, want: ErrNotSupported, code: pcpUnsuppOpcode},
		{name: "unsupported protocol", gw: pcpGateway{result: pcpUnsuppProtocol}, want: ErrNotSupported, code: pcpUnsuppProtocol},
		{name: "silent", gw: pcpGateway{silent: true}, want: ErrNotSupported},
		{name: "zero external port", gw: pcpGateway{extPort: 0}, want: ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gw := newGatewayAddr(t)
			tc.gw.external = testExternal
			var mu sync.Mutex
			srv := startUDP(t, netip.AddrPortFrom(gw, natpmpPort), func(req []byte, from netip.AddrPort) [][]byte {
				mu.Lock()
				defer mu.Unlock()
				return tc.gw.handle(req, from)
			})
			cfg := unitConfig(t, gw, PCP)
			if tc.gw.silent {
				cfg = silentConfig(t, gw, PCP)
			}
			m, err := Map(context.Background(), cfg, 4242)
			wantErr(t, err, tc.want, tc.code)
			if err != nil {
				return
			}
			if got, want := m.External(), netip.AddrPortFrom(testExternal, 50000); got != want {
				t.Errorf("External() = %v, want %v", got, want)
			}
			if err := m.Close(); err != nil {
				t.Fatal(err)
			}
			reqs := srv.requests()
			first, last := reqs[0], reqs[len(reqs)-1]
			if binary.BigEndian.Uint32(last[4:8]) != 0 || string(last[pcpHeaderLen:pcpHeaderLen+12]) != string(first[pcpHeaderLen:pcpHeaderLen+12]) {
				t.Errorf("Close sent %x, want lifetime 0 with the mapping's nonce", last)
			}
			if c := netip.AddrFrom16([16]byte(first[8:24])); !c.Is4In6() || c.Unmap() != netip.MustParseAddr("127.0.0.1") {
				t.Errorf("client address %v, want IPv4-mapped 127.0.0.1", c)
			}
		})
	}
}

// A NAT-PMP-only gateway answers PCP with its "unsupported version": the default order
// then falls back to NAT-PMP at once, without waiting out a timeout.
func TestFallbackToNATPMP(t *testing.T) {
	gw := newGatewayAddr(t)
	g := natpmpGateway{external: testExternal}
	startUDP(t, netip.AddrPortFrom(gw, natpmpPort), g.handle)
	cfg := unitConfig(t, gw)
	cfg.Timeout = 5 * time.Second
	start := time.Now()
	m, err := Map(context.Background(), cfg, 4000)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Protocol() != NATPMP {
		t.Errorf("mapped with %v, want nat-pmp", m.Protocol())
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("fallback took %v", d)
	}
}

// With nothing answering, every protocol's error is reported.
func TestNothingAnswers(t *testing.T) {
	gw := newGatewayAddr(t)
	cfg := unitConfig(t, gw)
	cfg.Timeout = 200 * time.Millisecond
	cfg.SSDPAddr = netip.AddrPortFrom(gw, 1)
	_, err := Map(context.Background(), cfg, 4000)
	if !errors.Is(err, ErrNotSupported) {
		t.Fatalf("error %v, want ErrNotSupported", err)
	}
	for _, p := range []string{"pcp:", "nat-pmp:", "upnp:"} {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not mention %s", err, p)
		}
	}
}

func TestMapContextCancelled(t *testing.T) {
	gw := newGatewayAddr(t)
	g := natpmpGateway{silent: true}
	startUDP(t, netip.AddrPortFrom(gw, natpmpPort), g.handle)
	cfg := unitConfig(t, gw, NATPMP)
	cfg.Timeout = 10 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Map(ctx, cfg, 4000)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want the context's", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cancellation took %v", d)
	}
}

func TestNoGateway(t *testing.T) {
	if _, err := parseRoutes([]byte("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n")); !errors.Is(err, ErrNoGateway) {
		t.Fatalf("error %v, want ErrNoGateway", err)
	}
}

const routeTable = `Iface	Destination	Gateway 	Flags	RefCnt	Use	Metric	Mask		MTU	Window	IRTT
eth0	0000A8C0	00000000	0001	0	0	100	00FFFFFF	0	0	0
eth1	00000000	FE01A8C0	0003	0	0	200	00000000	0	0	0
eth0	00000000	0101A8C0	0003	0	0	100	00000000	0	0	0
wg0	00000000	00000000	0001	0	0	50	00000000	0	0	0
`

func TestParseRoutes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		table string
		want  string
		err   error
	}{
		{"lowest metric", routeTable, "192.168.1.1", nil},
		{"no header", "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n", "10.0.0.1", nil},
		{"down route skipped", "Iface\nx\t00000000\t0100000A\t0002\t0\t0\t0\t00000000\t0\t0\t0\n", "", ErrNoGateway},
		{"bad hex", "Iface\nx\t0000000G\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n", "", ErrMalformed},
		{"empty", "", "", ErrNoGateway},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseRoutes([]byte(tc.table))
			if tc.err != nil {
				wantErr(t, err, tc.err, 0)
				return
			}
			if err != nil || got.String() != tc.want {
				t.Fatalf("parseRoutes = %v, %v; want %s", got, err, tc.want)
			}
		})
	}
}

// Renewal runs at half the granted lifetime on the injected clock, and the mapping
// follows a gateway that moves it.
func TestRenew(t *testing.T) {
	gw := newGatewayAddr(t)
	var mu sync.Mutex
	g := natpmpGateway{external: testExternal, extPort: 40000, lifetime: 120}
	srv := startUDP(t, netip.AddrPortFrom(gw, natpmpPort), func(req []byte, from netip.AddrPort) [][]byte {
		mu.Lock()
		defer mu.Unlock()
		return g.handle(req, from)
	})
	clk := clock.NewFake(time.Unix(1_000_000, 0))
	cfg := unitConfig(t, gw, NATPMP)
	cfg.Clock = clk
	m, err := Map(context.Background(), cfg, 4242)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if want := clk.Now().Add(120 * time.Second); !m.Expires().Equal(want) {
		t.Fatalf("expires %v, want %v", m.Expires(), want)
	}
	maps := func() int {
		n := 0
		for _, r := range srv.requests() {
			if r[1] == natpmpOpMapUDP {
				n++
			}
		}
		return n
	}
	clk.Advance(59 * time.Second)
	time.Sleep(50 * time.Millisecond)
	if n := maps(); n != 1 {
		t.Fatalf("%d map requests before half the lifetime, want 1", n)
	}
	mu.Lock()
	g.extPort = 40001
	mu.Unlock()
	clk.Advance(time.Second)
	waitFor(t, func() bool { return m.External().Port() == 40001 })
	if n := maps(); n != 2 {
		t.Errorf("%d map requests after renewal, want 2", n)
	}
	if want := clk.Now().Add(120 * time.Second); !m.Expires().Equal(want) {
		t.Errorf("after renewal expires %v, want %v", m.Expires(), want)
	}
	// The renewal asks for the port it holds.
	reqs := srv.requests()
	for i := len(reqs) - 1; i >= 0; i-- {
		if reqs[i][1] == natpmpOpMapUDP {
			if p := binary.BigEndian.Uint16(reqs[i][6:8]); p != 40000 {
				t.Errorf("renewal suggested port %d, want the held 40000", p)
			}
			break
		}
	}

	// A failing renewal is reported by Err and retried before expiry.
	mu.Lock()
	g.mapResult = natpmpResultNoRes
	mu.Unlock()
	clk.Advance(60 * time.Second)
	waitFor(t, func() bool { return m.Err() != nil })
	if !errors.Is(m.Err(), ErrRefused) {
		t.Errorf("Err() = %v, want ErrRefused", m.Err())
	}
	mu.Lock()
	g.mapResult = 0
	mu.Unlock()
	clk.Advance(20 * time.Second)
	waitFor(t, func() bool { return m.Err() == nil })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 5 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Close is idempotent, safe from several goroutines, and a closed mapping is not
// renewed.
func TestCloseConcurrent(t *testing.T) {
	gw := newGatewayAddr(t)
	g := natpmpGateway{external: testExternal, lifetime: 10}
	srv := startUDP(t, netip.AddrPortFrom(gw, natpmpPort), g.handle)
	clk := clock.NewFake(time.Unix(1_000_000, 0))
	cfg := unitConfig(t, gw, NATPMP)
	cfg.Clock = clk
	m, err := Map(context.Background(), cfg, 4242)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			if err := m.Close(); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	n := len(srv.requests())
	clk.Advance(time.Hour)
	time.Sleep(20 * time.Millisecond)
	if got := len(srv.requests()); got != n {
		t.Errorf("%d requests after Close, want none", got-n)
	}
	if clk.Pending() != 0 {
		t.Errorf("%d timers left after Close", clk.Pending())
	}
}

func TestUPnP(t *testing.T) {
	type script func(action string, args map[string]string) (int, string)
	okIP := func(svc string, next script) script {
		return func(action string, args map[string]string) (int, string) {
			if action == "GetExternalIPAddress" {
				return soapOK(svc, action, "NewExternalIPAddress", testExternal.String())
			}
			if next == nil {
				return soapOK(svc, action)
			}
			return next(action, args)
		}
	}
	for _, tc := range []struct {
		name     string
		service  string
		maxV     int
		soap     func(svc string) script
		want     error
		code     int
		wantPort uint16   // 0: any
		actions  []string // expected calls through Close
		wantLife time.Duration
	}{
		{
			name: "igd2 any port", service: wanIPService2,
			soap: func(svc string) script {
				return okIP(svc, func(action string, _ map[string]string) (int, string) {
					if action == "AddAnyPortMapping" {
						return soapOK(svc, action, "NewReservedPort", "50123")
					}
					return soapOK(svc, action)
				})
			},
			wantPort: 50123, wantLife: time.Hour,
			actions: []string{"GetExternalIPAddress", "AddAnyPortMapping", "DeletePortMapping"},
		},
		{
			name: "igd2 used as v1", service: wanIPService2, maxV: 1,
			soap:     func(svc string) script { return okIP(svc, nil) },
			wantPort: 4242, wantLife: time.Hour,
			actions: []string{"GetExternalIPAddress", "AddPortMapping", "DeletePortMapping"},
		},
		{
			name: "igd1 own port", service: wanIPService1,
			soap:     func(svc string) script { return okIP(svc, nil) },
			wantPort: 4242, wantLife: time.Hour,
			actions: []string{"GetExternalIPAddress", "AddPortMapping", "DeletePortMapping"},
		},
		{
			name: "igd1 conflict then another port", service: wanIPService1,
			soap: func(svc string) script {
				return okIP(svc, func(action string, args map[string]string) (int, string) {
					if action == "AddPortMapping" && args["NewExternalPort"] == "4242" {
						return soapFaultBody(718, "ConflictInMappingEntry")
					}
					return soapOK(svc, action)
				})
			},
			wantLife: time.Hour,
			actions:  []string{"GetExternalIPAddress", "AddPortMapping", "AddPortMapping", "DeletePortMapping"},
		},
		{
			name: "igd1 only permanent leases", service: wanIPService1,
			soap: func(svc string) script {
				return okIP(svc, func(action string, args map[string]string) (int, string) {
					if action == "AddPortMapping" && args["NewLeaseDuration"] != "0" {
						return soapFaultBody(725, "OnlyPermanentLeasesSupported")
					}
					return soapOK(svc, action)
				})
			},
			wantPort: 4242, wantLife: 0,
			actions: []string{"GetExternalIPAddress", "AddPortMapping", "AddPortMapping", "DeletePortMapping"},
		},
		{
			name: "igd2 without AddAnyPortMapping", service: wanIPService2,
			soap: func(svc string) script {
				return okIP(svc, func(action string, _ map[string]string) (int, string) {
					if action == "AddAnyPortMapping" {
						return soapFaultBody(401, "Invalid Action")
					}
					return soapOK(svc, action)
				})
			},
			wantPort: 4242, wantLife: time.Hour,
			actions: []string{"GetExternalIPAddress", "AddAnyPortMapping", "AddPortMapping", "DeletePortMapping"},
		},
		{
			name: "not authorized", service: wanIPService1,
			soap: func(svc string) script {
				return okIP(svc, func(action string, _ map[string]string) (int, string) {
					return soapFaultBody(606, "Action not authorized")
				})
			},
			want: ErrRefused, code: 606,
		},
		{
			name: "no external address", service: wanIPService1,
			soap: func(svc string) script {
				return func(action string, _ map[string]string) (int, string) {
					return soapOK(svc, action, "NewExternalIPAddress", "0.0.0.0")
				}
			},
			want: ErrRefused,
		},
		{
			name: "garbled external address", service: wanIPService1,
			soap: func(svc string) script {
				return func(action string, _ map[string]string) (int, string) {
					return soapOK(svc, action, "NewExternalIPAddress", "not-an-ip")
				}
			},
			want: ErrMalformed,
		},
		{
			name: "http error without fault", service: wanIPService1,
			soap: func(svc string) script {
				return func(string, map[string]string) (int, string) { return 500, "oops" }
			},
			want: ErrRefused,
		},
		{
			name: "no WAN service", service: "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1",
			soap: func(svc string) script { return okIP(svc, nil) },
			want: ErrNotSupported,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := startUPnP(t, tc.service, nil)
			g.soap = tc.soap(tc.service)
			cfg := unitConfig(t, g.ip, UPnP)
			cfg.SSDPAddr = g.ssdp.addr()
			cfg.UPnPMaxVersion = tc.maxV
			m, err := Map(context.Background(), cfg, 4242)
			wantErr(t, err, tc.want, tc.code)
			if err != nil {
				return
			}
			ext := m.External()
			if ext.Addr() != testExternal || (tc.wantPort != 0 && ext.Port() != tc.wantPort) || ext.Port() == 0 {
				t.Errorf("External() = %v, want %v:%d", ext, testExternal, tc.wantPort)
			}
			if life := m.Expires(); (tc.wantLife == 0) != life.IsZero() {
				t.Errorf("Expires() = %v, want a lifetime of %v", life, tc.wantLife)
			}
			if err := m.Close(); err != nil {
				t.Fatal(err)
			}
			calls := g.callLog()
			var names []string
			for _, c := range calls {
				names = append(names, c.Action)
			}
			if len(names) != len(tc.actions) {
				t.Fatalf("actions %v, want %v", names, tc.actions)
			}
			for i := range names {
				if names[i] != tc.actions[i] {
					t.Fatalf("actions %v, want %v", names, tc.actions)
				}
			}
			for _, c := range calls {
				if c.Action == "AddPortMapping" || c.Action == "AddAnyPortMapping" {
					if c.Args["NewInternalClient"] != "127.0.0.1" || c.Args["NewInternalPort"] != "4242" || c.Args["NewProtocol"] != "UDP" || c.Args["NewPortMappingDescription"] != "peerlink" {
						t.Errorf("%s args %v", c.Action, c.Args)
					}
				}
			}
			del := calls[len(calls)-1].Args
			if del["NewExternalPort"] != strconv.Itoa(int(ext.Port())) || del["NewProtocol"] != "UDP" {
				t.Errorf("DeletePortMapping args %v, want external port %d", del, ext.Port())
			}
		})
	}
}

// An SSDP answer whose LOCATION points at another host than the one answering is not
// followed.
func TestSSDPLocationElsewhere(t *testing.T) {
	gw := newGatewayAddr(t)
	srv := startUDP(t, netip.AddrPortFrom(gw, 0), func([]byte, netip.AddrPort) [][]byte {
		return [][]byte{[]byte("HTTP/1.1 200 OK\r\nST: " + igdDevice1 + "\r\nLOCATION: http://127.0.0.99:80/desc.xml\r\n\r\n")}
	})
	cfg := unitConfig(t, gw, UPnP)
	cfg.SSDPAddr = srv.addr()
	cfg.Timeout = 300 * time.Millisecond
	_, err := Map(context.Background(), cfg, 4242)
	wantErr(t, err, ErrNotSupported, 0)
	if !errors.Is(err, ErrMalformed) {
		t.Errorf("error %v does not say why (ErrMalformed)", err)
	}
}
